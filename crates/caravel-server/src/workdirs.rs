//! Working directories tenants ship with their jobs (`caravel submit --workdir DIR`): tar
//! archives the CLI packs, named by their SHA-256 and kept per tenant, so that an unchanged
//! folder is uploaded once, and a tenant can neither use nor learn of another's (the
//! existence check answers only for the caller's own).
//!
//! An upload is written to a hidden file, its hash checked against the name, its entries
//! checked (relative paths, plain files, folders and links, no devices), made durable and
//! renamed into place: a crash leaves the archive whole or absent. Archives count against
//! their tenant's storage quota. One that no waiting or running job and no service uses is
//! removed once it has not been used for the retention (`--workdir-retention`).
//!
//! Layout: `ROOT/<tenant id>/<64 hex>.tar`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use caravel_core::{Millis, TenantId};

#[derive(Debug, thiserror::Error)]
pub enum WorkdirError {
    #[error("working directory store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a usable working directory archive: {0}")]
    Archive(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WorkdirError + '_ {
    move |source| WorkdirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    bytes: u64,
    /// Upload or the last submission that named it.
    used_ms: Millis,
}

pub struct Workdirs {
    root: PathBuf,
    pub max_bytes: u64,
    index: Mutex<HashMap<(TenantId, String), Entry>>,
}

/// `sha256:<hex>` -> `<hex>`, when it is that.
pub fn hex_of(digest: &str) -> Option<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

fn mtime_ms(m: &std::fs::Metadata) -> Millis {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

impl Workdirs {
    /// Opens the store, finding what an earlier life of the server kept (and removing the
    /// uploads it did not finish).
    pub fn open(root: PathBuf, max_bytes: u64) -> Result<Workdirs, WorkdirError> {
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        let mut index = HashMap::new();
        for t in std::fs::read_dir(&root).map_err(io(&root))?.flatten() {
            let Some(tenant) = t.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let Ok(rd) = std::fs::read_dir(t.path()) else {
                continue;
            };
            for f in rd.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.starts_with(".upload-") {
                    let _ = std::fs::remove_file(f.path());
                    continue;
                }
                let Some(hex) = name.strip_suffix(".tar") else {
                    continue;
                };
                let Ok(m) = f.metadata() else { continue };
                if hex_of(&format!("sha256:{hex}")).is_some() {
                    index.insert(
                        (TenantId(tenant), format!("sha256:{hex}")),
                        Entry {
                            bytes: m.len(),
                            used_ms: mtime_ms(&m),
                        },
                    );
                }
            }
        }
        Ok(Workdirs {
            root,
            max_bytes,
            index: Mutex::new(index),
        })
    }

    fn path(&self, tenant: TenantId, digest: &str) -> Option<PathBuf> {
        let hex = hex_of(digest)?;
        Some(
            self.root
                .join(tenant.0.to_string())
                .join(format!("{hex}.tar")),
        )
    }

    /// The size of the tenant's archive, when it has it.
    pub fn has(&self, tenant: TenantId, digest: &str) -> Option<u64> {
        self.index
            .lock()
            .expect("lock")
            .get(&(tenant, digest.to_string()))
            .map(|e| e.bytes)
    }

    /// Marks an archive used now (a submission named it): it is kept for the retention
    /// from here.
    pub fn touch(&self, tenant: TenantId, digest: &str, now: Millis) {
        if let Some(e) = self
            .index
            .lock()
            .expect("lock")
            .get_mut(&(tenant, digest.to_string()))
        {
            e.used_ms = e.used_ms.max(now);
        }
        if let Some(p) = self.path(tenant, digest) {
            // The time survives a restart; nothing depends on it being exact.
            let _ = std::fs::File::options()
                .append(true)
                .open(&p)
                .and_then(|f| f.set_modified(SystemTime::now()));
        }
    }

    /// Where an upload for `tenant` is written before it is committed.
    pub fn upload_path(&self, tenant: TenantId) -> Result<PathBuf, WorkdirError> {
        let dir = self.root.join(tenant.0.to_string());
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).expect("the OS has randomness");
        Ok(dir.join(format!(".upload-{}", hex::encode(r))))
    }

    /// Makes a checked upload the tenant's archive `digest` (whose hash the caller
    /// checked). Returns its size.
    pub fn commit(
        &self,
        tenant: TenantId,
        digest: &str,
        upload: &Path,
        now: Millis,
    ) -> Result<u64, WorkdirError> {
        validate_archive(upload)?;
        let dst = self
            .path(tenant, digest)
            .ok_or_else(|| WorkdirError::Archive(format!("`{digest}` is not sha256:<hex>")))?;
        std::fs::rename(upload, &dst).map_err(io(&dst))?;
        if let Some(dir) = dst.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        let bytes = std::fs::metadata(&dst).map_err(io(&dst))?.len();
        self.index.lock().expect("lock").insert(
            (tenant, digest.to_string()),
            Entry {
                bytes,
                used_ms: now,
            },
        );
        Ok(bytes)
    }

    pub fn open_archive(&self, tenant: TenantId, digest: &str) -> Option<(std::fs::File, u64)> {
        let bytes = self.has(tenant, digest)?;
        let f = std::fs::File::open(self.path(tenant, digest)?).ok()?;
        Some((f, bytes))
    }

    /// Bytes each tenant keeps here (its storage quota counts them).
    pub fn bytes_by_tenant(&self) -> HashMap<TenantId, u64> {
        let mut out = HashMap::new();
        for ((t, _), e) in self.index.lock().expect("lock").iter() {
            *out.entry(*t).or_default() += e.bytes;
        }
        out
    }

    /// Removes the archives nothing in `keep` names and nothing used for `retention_ms`.
    /// Returns how many went.
    pub fn collect(
        &self,
        keep: &HashSet<(TenantId, String)>,
        now: Millis,
        retention_ms: u64,
    ) -> usize {
        let gone: Vec<(TenantId, String)> = self
            .index
            .lock()
            .expect("lock")
            .iter()
            .filter(|(k, e)| !keep.contains(*k) && now - e.used_ms > retention_ms as Millis)
            .map(|(k, _)| k.clone())
            .collect();
        for (t, d) in &gone {
            self.index.lock().expect("lock").remove(&(*t, d.clone()));
            if let Some(p) = self.path(*t, d) {
                let _ = std::fs::remove_file(p);
            }
        }
        gone.len()
    }
}

/// Checks an uploaded archive: a tar whose entries are files, folders or links under
/// relative paths with no `..`, and nothing else (no devices, no pipes).
pub fn validate_archive(path: &Path) -> Result<(), WorkdirError> {
    let f = std::fs::File::open(path).map_err(io(path))?;
    let mut ar = tar::Archive::new(std::io::BufReader::new(f));
    let entries = ar
        .entries()
        .map_err(|e| WorkdirError::Archive(e.to_string()))?;
    for e in entries {
        let e = e.map_err(|e| WorkdirError::Archive(e.to_string()))?;
        let kind = e.header().entry_type();
        let p = e
            .path()
            .map_err(|e| WorkdirError::Archive(e.to_string()))?
            .into_owned();
        let ok_kind = kind.is_file() || kind.is_dir() || kind.is_symlink();
        if !ok_kind {
            return Err(WorkdirError::Archive(format!(
                "`{}` is not a file, folder or link",
                p.display()
            )));
        }
        if p.components().any(|c| {
            !matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        }) {
            return Err(WorkdirError::Archive(format!(
                "`{}` is not a relative path inside the folder",
                p.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn an_archive_is_kept_per_tenant_and_found_again_after_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let w = Workdirs::open(d.path().to_path_buf(), 1 << 20).unwrap();
        let data = archive(&[("train.py", b"print(1)\n")]);
        let digest = format!("sha256:{}", "ab".repeat(32));
        let up = w.upload_path(TenantId(3)).unwrap();
        std::fs::write(&up, &data).unwrap();
        let n = w.commit(TenantId(3), &digest, &up, 1000).unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(w.has(TenantId(3), &digest), Some(n));
        assert_eq!(w.has(TenantId(4), &digest), None, "another tenant's is not");
        // A half-written upload left by a crash goes; the archive stays.
        let stale = w.upload_path(TenantId(3)).unwrap();
        std::fs::write(&stale, b"half").unwrap();
        drop(w);
        let w = Workdirs::open(d.path().to_path_buf(), 1 << 20).unwrap();
        assert_eq!(w.has(TenantId(3), &digest), Some(n));
        assert!(!stale.exists());
        assert_eq!(w.bytes_by_tenant()[&TenantId(3)], n);
        // Unused and past the retention: removed; named by a live job: kept.
        let now = mtime_ms(&std::fs::metadata(w.path(TenantId(3), &digest).unwrap()).unwrap());
        let keep: HashSet<_> = [(TenantId(3), digest.clone())].into();
        assert_eq!(w.collect(&keep, now + 10_000, 1000), 0);
        assert_eq!(w.collect(&HashSet::new(), now + 500, 1000), 0, "not yet");
        assert_eq!(w.collect(&HashSet::new(), now + 10_000, 1000), 1);
        assert_eq!(w.has(TenantId(3), &digest), None);
    }

    #[test]
    fn archives_with_escapes_or_devices_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.tar");
        // tar::Builder refuses `..` itself: write the header by hand.
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        let mut raw = h.as_bytes().to_vec();
        raw.extend_from_slice(b"x");
        raw.resize(1024, 0);
        raw.extend_from_slice(&[0u8; 1024]);
        std::fs::write(&p, &raw).unwrap();
        let e = validate_archive(&p).unwrap_err().to_string();
        assert!(e.contains("relative path"), "{e}");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Char);
        h.set_size(0);
        h.set_cksum();
        b.append_data(&mut h, "dev", std::io::empty()).unwrap();
        std::fs::write(&p, b.into_inner().unwrap()).unwrap();
        let e = validate_archive(&p).unwrap_err().to_string();
        assert!(e.contains("not a file, folder or link"), "{e}");
        std::fs::write(&p, archive(&[("ok/a.txt", b"a")])).unwrap();
        assert!(validate_archive(&p).is_ok());
    }
}
