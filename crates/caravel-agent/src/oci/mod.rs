//! Tasks in OCI images: images pulled from any distribution registry into a layer cache
//! shared by every task of the node (`Images`), and each task run by an OCI runtime
//! (crun, runc or youki) on an overlay of those layers (`runtime`), with the identity,
//! limits, devices, environment and folders a sandboxed task has without an image.
//!
//! The cache holds each layer once, unpacked, by its digest: a hundred tasks of one image
//! starting together download each layer once (one download per digest at a time, the
//! others wait for it). Which image a tag names is asked of the registry per tenant, with
//! that tenant's credentials (or none): a tenant never runs an image because another
//! tenant could pull it. Past its size (`--image-cache`), the layers used longest ago and
//! by no running task go.

pub mod layer;
pub mod registry;
pub mod runtime;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use caravel_core::{ImageRef, RegistryCredential, TenantId};

pub use registry::ImageConfig;

/// How long which image a tag names is trusted before the registry is asked again.
const TAG_TTL: Duration = Duration::from_secs(60);

/// An image resolved for a tenant: its layers (bottom first) and configuration.
#[derive(Debug)]
pub struct Resolved {
    pub reference: String,
    pub digest: String,
    /// (hex digest, compression) of each layer, bottom first.
    layers: Vec<(String, layer::Compression, registry::Descriptor)>,
    pub config: ImageConfig,
}

struct LayerInfo {
    bytes: u64,
    last_used: SystemTime,
    pins: u32,
}

#[derive(Default)]
struct State {
    layers: HashMap<String, LayerInfo>,
}

/// An image reference as one tenant asked for it.
type ByTenant = (TenantId, String);

/// The node's image store.
pub struct Images {
    root: PathBuf,
    client: registry::Client,
    cap_bytes: u64,
    state: Mutex<State>,
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    resolving: Mutex<HashMap<ByTenant, Arc<tokio::sync::Mutex<()>>>>,
    resolved: Mutex<HashMap<ByTenant, (Instant, Arc<Resolved>)>>,
    /// Layers downloaded since start (for the log and tests).
    pub downloads: AtomicU64,
}

/// Layers a running task stands on: they stay in the cache until this is dropped.
pub struct Pinned {
    images: Arc<Images>,
    layers: Vec<String>,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let mut st = self.images.state.lock().expect("image state");
        for l in &self.layers {
            if let Some(i) = st.layers.get_mut(l) {
                i.pins = i.pins.saturating_sub(1);
            }
        }
    }
}

impl Pinned {
    /// The layers' folders, top first (overlayfs's `lowerdir` order).
    pub fn lower_dirs(&self) -> Vec<PathBuf> {
        self.layers
            .iter()
            .rev()
            .map(|h| self.images.layer_dir(h))
            .collect()
    }
}

fn size_file(root: &Path, hex: &str) -> PathBuf {
    root.join("layers").join(format!("{hex}.size"))
}

impl Images {
    /// Opens (and tidies) the store at `root`.
    pub fn open(root: PathBuf, cap_bytes: u64, insecure: Vec<String>) -> Result<Images, String> {
        let client = registry::Client::new(insecure).map_err(|e| e.to_string())?;
        for d in ["layers", "tmp"] {
            std::fs::create_dir_all(root.join(d))
                .map_err(|e| format!("{}: {e}", root.join(d).display()))?;
        }
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700));
        // Whatever an earlier life left half done goes.
        let _ = std::fs::remove_dir_all(root.join("tmp"));
        let _ = std::fs::create_dir_all(root.join("tmp"));
        let mut st = State::default();
        if let Ok(rd) = std::fs::read_dir(root.join("layers")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".size") {
                    continue;
                }
                let sf = size_file(&root, &name);
                let bytes = std::fs::read_to_string(&sf)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok());
                match (
                    bytes,
                    registry::digest_hex(&format!("sha256:{name}")).is_ok(),
                ) {
                    (Some(bytes), true) => {
                        let last_used = std::fs::metadata(&sf)
                            .and_then(|m| m.modified())
                            .unwrap_or(SystemTime::UNIX_EPOCH);
                        st.layers.insert(
                            name,
                            LayerInfo {
                                bytes,
                                last_used,
                                pins: 0,
                            },
                        );
                    }
                    _ => {
                        let _ = std::fs::remove_dir_all(e.path());
                        let _ = std::fs::remove_file(&sf);
                    }
                }
            }
        }
        let images = Images {
            root,
            client,
            cap_bytes,
            state: Mutex::new(st),
            fetching: Mutex::default(),
            resolving: Mutex::default(),
            resolved: Mutex::default(),
            downloads: AtomicU64::new(0),
        };
        // A smaller cap than the last life's takes effect at once.
        images.collect();
        Ok(images)
    }

    fn layer_dir(&self, hex: &str) -> PathBuf {
        self.root.join("layers").join(hex)
    }

    /// Bytes the cached layers hold.
    pub fn cached_bytes(&self) -> u64 {
        self.state
            .lock()
            .expect("image state")
            .layers
            .values()
            .map(|l| l.bytes)
            .sum()
    }

    /// Which image `image` is for `tenant`, asked of the registry with its credentials.
    async fn resolve(
        &self,
        tenant: TenantId,
        image: &str,
        cred: Option<&RegistryCredential>,
    ) -> Result<Arc<Resolved>, String> {
        let r = ImageRef::parse(image)?;
        let key = (tenant, image.to_string());
        let fresh = |at: Instant| r.tag.is_none() || at.elapsed() < TAG_TTL;
        let lock = {
            let cache = self.resolved.lock().expect("resolved");
            if let Some((at, res)) = cache.get(&key) {
                if fresh(*at) {
                    return Ok(res.clone());
                }
            }
            drop(cache);
            self.resolving
                .lock()
                .expect("resolving")
                .entry(key.clone())
                .or_default()
                .clone()
        };
        let _g = lock.lock().await;
        if let Some((at, res)) = self.resolved.lock().expect("resolved").get(&key) {
            if fresh(*at) {
                return Ok(res.clone());
            }
        }
        let (digest, m) = self
            .client
            .manifest(&r, cred)
            .await
            .map_err(|e| e.to_string())?;
        let config = self
            .client
            .config(&r, cred, &m)
            .await
            .map_err(|e| e.to_string())?;
        let mut layers = Vec::new();
        for d in &m.layers {
            let hex = registry::digest_hex(&d.digest).map_err(|e| e.to_string())?;
            let c = layer::Compression::of_media_type(&d.media_type)
                .map_err(|e| format!("{image}: {e}"))?;
            layers.push((hex.to_string(), c, d.clone()));
        }
        let res = Arc::new(Resolved {
            reference: image.to_string(),
            digest,
            layers,
            config,
        });
        self.resolved
            .lock()
            .expect("resolved")
            .insert(key.clone(), (Instant::now(), res.clone()));
        self.resolving.lock().expect("resolving").remove(&key);
        Ok(res)
    }

    /// Pins a cached layer; false when it is not cached.
    fn pin(&self, hex: &str) -> bool {
        let mut st = self.state.lock().expect("image state");
        match st.layers.get_mut(hex) {
            Some(i) => {
                i.pins += 1;
                i.last_used = SystemTime::now();
                true
            }
            None => false,
        }
    }

    /// The image `image` for a task of `tenant`: resolved, its layers in the cache and
    /// pinned there while the task runs.
    pub async fn pull(
        self: &Arc<Self>,
        tenant: TenantId,
        image: &str,
        cred: Option<&RegistryCredential>,
    ) -> Result<(Arc<Resolved>, Pinned), String> {
        let res = self.resolve(tenant, image, cred).await?;
        let r = ImageRef::parse(image)?;
        let mut pinned = Pinned {
            images: self.clone(),
            layers: Vec::new(),
        };
        for (hex, compression, desc) in &res.layers {
            if !self.pin(hex) {
                let lock = self
                    .fetching
                    .lock()
                    .expect("fetching")
                    .entry(hex.clone())
                    .or_default()
                    .clone();
                let _g = lock.lock().await;
                if !self.pin(hex) {
                    // Stored pinned: the collection that follows a download never takes it.
                    self.download(&r, cred, hex, *compression, desc)
                        .await
                        .map_err(|e| format!("pulling {image}: {e}"))?;
                }
                self.fetching.lock().expect("fetching").remove(hex);
            }
            pinned.layers.push(hex.clone());
        }
        // Marks the layers' use on disk, for the order of eviction after a restart.
        for h in &pinned.layers {
            let _ = std::fs::File::options()
                .append(true)
                .open(size_file(&self.root, h))
                .and_then(|f| f.set_modified(SystemTime::now()));
        }
        Ok((res, pinned))
    }

    async fn download(
        self: &Arc<Self>,
        r: &ImageRef,
        cred: Option<&RegistryCredential>,
        hex: &str,
        compression: layer::Compression,
        desc: &registry::Descriptor,
    ) -> Result<(), String> {
        let tmp = self.root.join("tmp");
        let blob = tmp.join(format!("{hex}.blob"));
        let unpack_dir = tmp.join(format!("{hex}.fs"));
        self.client
            .blob_to_file(r, cred, desc, &blob)
            .await
            .map_err(|e| e.to_string())?;
        self.downloads.fetch_add(1, Ordering::Relaxed);
        let (b2, u2) = (blob.clone(), unpack_dir.clone());
        let unpacked = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(&u2);
            std::fs::create_dir(&u2)?;
            let r = layer::unpack(&b2, compression, &u2);
            let _ = std::fs::remove_file(&b2);
            r
        })
        .await
        .map_err(|e| e.to_string())?;
        let unpacked = match unpacked {
            Ok(u) => u,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&unpack_dir);
                return Err(format!("unpacking layer sha256:{hex}: {e}"));
            }
        };
        let dst = self.layer_dir(hex);
        let _ = std::fs::remove_dir_all(&dst);
        std::fs::rename(&unpack_dir, &dst).map_err(|e| format!("{}: {e}", dst.display()))?;
        std::fs::write(size_file(&self.root, hex), unpacked.bytes.to_string())
            .map_err(|e| format!("{}: {e}", dst.display()))?;
        self.state.lock().expect("image state").layers.insert(
            hex.to_string(),
            LayerInfo {
                bytes: unpacked.bytes,
                last_used: SystemTime::now(),
                pins: 1,
            },
        );
        tracing::info!(layer = %hex, bytes = unpacked.bytes, image = %r, "layer pulled");
        self.collect();
        Ok(())
    }

    /// Evicts the layers used longest ago and by no running task until the cache fits
    /// its size; returns how many went.
    pub fn collect(&self) -> usize {
        let victims: Vec<String> = {
            let mut st = self.state.lock().expect("image state");
            let mut total: u64 = st.layers.values().map(|l| l.bytes).sum();
            if total <= self.cap_bytes {
                return 0;
            }
            let mut free: Vec<(SystemTime, String, u64)> = st
                .layers
                .iter()
                .filter(|(_, l)| l.pins == 0)
                .map(|(h, l)| (l.last_used, h.clone(), l.bytes))
                .collect();
            free.sort();
            let mut out = Vec::new();
            for (_, h, b) in free {
                if total <= self.cap_bytes {
                    break;
                }
                total -= b;
                st.layers.remove(&h);
                out.push(h);
            }
            out
        };
        for h in &victims {
            let _ = std::fs::remove_file(size_file(&self.root, h));
            let gone = self.root.join("tmp").join(format!("gc-{h}"));
            if std::fs::rename(self.layer_dir(h), &gone).is_ok() {
                let _ = std::fs::remove_dir_all(&gone);
            }
            tracing::info!(layer = %h, "layer evicted from the image cache");
        }
        victims.len()
    }

    /// Whether the layer is in the cache (tests).
    pub fn has_layer(&self, hex: &str) -> bool {
        self.state
            .lock()
            .expect("image state")
            .layers
            .contains_key(hex)
    }
}

/// Builds an image of `layers` (gzip archives, bottom first) and `config` and pushes it
/// to `registry` as `repository:tag`; returns the manifest's digest. For tests and
/// benchmarks that make their own images (`testimage`).
pub async fn push(
    client: &registry::Client,
    registry: &str,
    repository: &str,
    tag: &str,
    cred: Option<&RegistryCredential>,
    layers: Vec<Vec<u8>>,
    config: &ImageConfig,
) -> Result<String, String> {
    let (os, arch) = registry::platform();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        // The config names each layer by its uncompressed digest.
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&l[..]), &mut raw)
            .map_err(|e| format!("a layer that is not gzip: {e}"))?;
        diff_ids.push(registry::digest_of(&raw));
        let size = l.len() as u64;
        let d = client
            .push_blob(registry, repository, cred, l.into())
            .await
            .map_err(|e| e.to_string())?;
        descs.push(serde_json::json!({"mediaType": registry::MEDIA_OCI_LAYER_GZIP, "digest": d, "size": size}));
    }
    let cfg = serde_json::json!({
        "architecture": arch, "os": os, "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let cfg = serde_json::to_vec(&cfg).expect("json");
    let cfg_size = cfg.len();
    let cfg_digest = client
        .push_blob(registry, repository, cred, cfg.into())
        .await
        .map_err(|e| e.to_string())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": registry::MEDIA_OCI_MANIFEST,
        "config": {"mediaType": registry::MEDIA_OCI_CONFIG, "digest": cfg_digest, "size": cfg_size},
        "layers": descs,
    });
    client
        .push_manifest(
            registry,
            repository,
            cred,
            tag,
            registry::MEDIA_OCI_MANIFEST,
            serde_json::to_vec(&manifest).expect("json").into(),
        )
        .await
        .map_err(|e| e.to_string())
}

/// Layers of a small image made from the machine's `busybox` (a static one: Debian's
/// `busybox-static`), for tests and benchmarks.
pub mod testimage {
    use super::layer::Entry;

    /// The applets linked in `/bin`.
    pub const APPLETS: [&str; 24] = [
        "sh", "cat", "echo", "id", "ls", "sleep", "test", "[", "true", "false", "env", "mkdir",
        "rm", "touch", "head", "wc", "grep", "kill", "ps", "dd", "seq", "printf", "pwd", "nc",
    ];

    /// `/bin/busybox` and its applets, `/etc/passwd` and `/etc/group` (root and nobody),
    /// `/tmp`, `/usr/bin` and `/etc` folders: a root any shell script runs in.
    pub fn busybox_layer(busybox: &std::path::Path) -> std::io::Result<Vec<u8>> {
        let bin = std::fs::read(busybox)?;
        let mut e = vec![
            Entry::Dir {
                path: "bin".into(),
                mode: 0o755,
            },
            Entry::Dir {
                path: "etc".into(),
                mode: 0o755,
            },
            Entry::Dir {
                path: "usr".into(),
                mode: 0o755,
            },
            Entry::Dir {
                path: "usr/bin".into(),
                mode: 0o755,
            },
            Entry::Dir {
                path: "tmp".into(),
                mode: 0o1777,
            },
            Entry::File {
                path: "bin/busybox".into(),
                mode: 0o755,
                data: bin,
            },
            Entry::File {
                path: "etc/passwd".into(),
                mode: 0o644,
                data: b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
                    .to_vec(),
            },
            Entry::File {
                path: "etc/group".into(),
                mode: 0o644,
                data: b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
            },
        ];
        for a in APPLETS {
            e.push(Entry::Symlink {
                path: format!("bin/{a}"),
                target: "busybox".into(),
            });
        }
        super::layer::build(&e)
    }
}

/// The program a task runs and its arguments, as Kubernetes reads a container's: a
/// command replaces the image's entrypoint and command; without one, the entrypoint runs
/// with `args`, or with the image's command when there are none.
pub fn argv(command: &str, args: &[String], config: &ImageConfig) -> Result<Vec<String>, String> {
    let v: Vec<String> = if !command.is_empty() {
        std::iter::once(command.to_string())
            .chain(args.iter().cloned())
            .collect()
    } else {
        let ep = config.entrypoint.clone().unwrap_or_default();
        let rest = if args.is_empty() {
            config.cmd.clone().unwrap_or_default()
        } else {
            args.to_vec()
        };
        ep.into_iter().chain(rest).collect()
    };
    if v.first().is_none_or(|p| p.is_empty()) {
        return Err(
            "the job gives no command and the image has neither an entrypoint nor a command".into(),
        );
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ep: Option<&[&str]>, cmd: Option<&[&str]>) -> ImageConfig {
        let v = |x: Option<&[&str]>| x.map(|s| s.iter().map(|a| a.to_string()).collect());
        ImageConfig {
            entrypoint: v(ep),
            cmd: v(cmd),
            ..Default::default()
        }
    }

    #[test]
    fn the_command_is_read_as_kubernetes_reads_a_containers() {
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let c = cfg(Some(&["python", "-m", "srv"]), Some(&["--port", "80"]));
        assert_eq!(
            argv("", &[], &c).unwrap(),
            s(&["python", "-m", "srv", "--port", "80"])
        );
        assert_eq!(
            argv("", &s(&["--port", "9"]), &c).unwrap(),
            s(&["python", "-m", "srv", "--port", "9"])
        );
        assert_eq!(
            argv("sh", &s(&["-c", "x"]), &c).unwrap(),
            s(&["sh", "-c", "x"])
        );
        assert_eq!(
            argv("", &[], &cfg(None, Some(&["sh"]))).unwrap(),
            s(&["sh"])
        );
        let e = argv("", &[], &cfg(None, None)).unwrap_err();
        assert!(e.contains("no command"), "{e}");
    }
}
