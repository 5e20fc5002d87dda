//! A client of the OCI distribution API (`/v2/`): what pulling an image needs (manifests,
//! image indexes, blobs, with anonymous, Basic and Bearer-token authentication) and what
//! pushing one needs (blob uploads, manifests), the latter for tests and benchmarks that
//! build their own images.
//!
//! Registries are reached over HTTPS, checked against the system's roots; plain HTTP only
//! for loopback hosts (`localhost`, `127.0.0.0/8`, `[::1]`) and the hosts an operator names
//! (`--insecure-registry`), as Docker and containerd do.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use caravel_core::{ImageRef, RegistryCredential};
use serde::Deserialize;
use sha2::Digest;

pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The most a manifest or an image config may weigh (Docker's limit is 4 MiB as well).
const MAX_DOCUMENT: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{registry}: {source}")]
    Http {
        registry: String,
        source: reqwest::Error,
    },
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Bad(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A descriptor: what a manifest says of a blob.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    manifests: Vec<Descriptor>,
}

/// The part of an image's configuration a task's start uses.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct ImageConfig {
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    config: Option<ImageConfig>,
}

/// `sha256:<hex>` of `data`.
pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// The hex of a `sha256:` digest, checked (it names files and folders).
pub fn digest_hex(d: &str) -> Result<&str, RegistryError> {
    d.strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .ok_or_else(|| RegistryError::Bad(format!("`{d}` is not a sha256 digest")))
}

/// This machine's platform, as OCI names it.
pub fn platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    ("linux", arch)
}

/// How a registry asked to be authenticated (`WWW-Authenticate`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

fn parse_challenge(h: &str) -> Option<Challenge> {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    // key="value" pairs, values quoted (and may contain commas), separated by commas.
    let mut s = rest;
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        params.insert(k, v.to_string());
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

/// A registry client, shared by every pull of an agent: it keeps each repository's
/// token while it is valid.
pub struct Client {
    http: reqwest::Client,
    insecure: Vec<String>,
    /// (registry, repository, whose credentials) → the `Authorization` value that worked
    /// last. Never shared between credentials: a token one tenant's password earned must
    /// not open the repository to another tenant (or to an anonymous pull).
    auth: Mutex<HashMap<(String, String, String), String>>,
}

fn is_loopback(host: &str) -> bool {
    let h = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    };
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Client {
    pub fn new(insecure: Vec<String>) -> Result<Client, RegistryError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| RegistryError::Http {
                registry: "(client)".into(),
                source: e,
            })?;
        Ok(Client {
            http,
            insecure,
            auth: Mutex::new(HashMap::new()),
        })
    }

    fn base(&self, registry: &str) -> String {
        let scheme = if is_loopback(registry) || self.insecure.iter().any(|h| h == registry) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{registry}")
    }

    /// Sends a request built by `make`, answering the registry's authentication challenge
    /// once (a token fetched, or Basic credentials) and retrying.
    async fn send(
        &self,
        registry: &str,
        repository: &str,
        cred: Option<&RegistryCredential>,
        push: bool,
        make: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RegistryError> {
        let whose = cred
            .map(|c| {
                hex::encode(sha2::Sha256::digest(format!(
                    "{}\0{}",
                    c.username, c.password
                )))
            })
            .unwrap_or_default();
        let key = (registry.to_string(), repository.to_string(), whose);
        let http_err = |e| RegistryError::Http {
            registry: registry.to_string(),
            source: e,
        };
        let cached = self.auth.lock().expect("auth lock").get(&key).cloned();
        let mut req = make(&self.http);
        if let Some(a) = &cached {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        let resp = req.send().await.map_err(http_err)?;
        if resp.status() != reqwest::StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge)
            .ok_or_else(|| {
                RegistryError::Refused(format!(
                    "{registry} refused access to {repository} and did not say how to authenticate"
                ))
            })?;
        let basic = cred.map(|c| {
            use base64::Engine;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", c.username, c.password))
            )
        });
        let value = match challenge {
            Challenge::Basic => basic.ok_or_else(|| {
                RegistryError::Refused(format!(
                    "{registry} needs credentials for {repository}: store them with `caravel registry login {registry}`"
                ))
            })?,
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                let scope = scope.unwrap_or_else(|| {
                    format!(
                        "repository:{repository}:{}",
                        if push { "pull,push" } else { "pull" }
                    )
                });
                let mut q: Vec<(&str, &str)> = vec![("scope", &scope)];
                if let Some(s) = &service {
                    q.push(("service", s));
                }
                // A token over plain HTTP only from a registry reached over plain HTTP.
                let plain_ok =
                    realm.starts_with("http://") && self.base(registry).starts_with("http://");
                if !(realm.starts_with("https://") || plain_ok) {
                    return Err(RegistryError::Refused(format!(
                        "{registry} sends for tokens to `{realm}`, which is not https"
                    )));
                }
                let url = reqwest::Url::parse_with_params(&realm, &q).map_err(|e| {
                    RegistryError::Bad(format!("{registry}'s token service `{realm}`: {e}"))
                })?;
                let mut treq = self.http.get(url);
                if let Some(b) = &basic {
                    treq = treq.header(reqwest::header::AUTHORIZATION, b);
                }
                let tr = treq.send().await.map_err(http_err)?;
                if !tr.status().is_success() {
                    return Err(RegistryError::Refused(format!(
                        "{registry}'s token service refused {}: {}",
                        if cred.is_some() {
                            "the tenant's credentials"
                        } else {
                            "an anonymous pull (store credentials with `caravel registry login`)"
                        },
                        tr.status()
                    )));
                }
                #[derive(Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: Token = tr.json().await.map_err(http_err)?;
                let tok = t.token.or(t.access_token).ok_or_else(|| {
                    RegistryError::Bad(format!("{registry}'s token service sent no token"))
                })?;
                format!("Bearer {tok}")
            }
        };
        let resp = make(&self.http)
            .header(reqwest::header::AUTHORIZATION, &value)
            .send()
            .await
            .map_err(http_err)?;
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED
            || resp.status() == reqwest::StatusCode::FORBIDDEN
        {
            return Err(RegistryError::Refused(format!(
                "{registry} refused {} for {repository}",
                if cred.is_some() {
                    "the tenant's credentials"
                } else {
                    "anonymous access"
                }
            )));
        }
        self.auth.lock().expect("auth lock").insert(key, value);
        Ok(resp)
    }

    async fn document(
        &self,
        r: &ImageRef,
        cred: Option<&RegistryCredential>,
        reference: &str,
    ) -> Result<(String, Vec<u8>, String), RegistryError> {
        let url = format!(
            "{}/v2/{}/manifests/{reference}",
            self.base(&r.registry),
            r.repository
        );
        let accept = [
            MEDIA_OCI_INDEX,
            MEDIA_DOCKER_LIST,
            MEDIA_OCI_MANIFEST,
            MEDIA_DOCKER_MANIFEST,
        ]
        .join(", ");
        let resp = self
            .send(&r.registry, &r.repository, cred, false, |h| {
                h.get(&url).header(reqwest::header::ACCEPT, &accept)
            })
            .await?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(RegistryError::NotFound(format!(
                "{r}: no such image on {}",
                r.registry
            )));
        }
        if !status.is_success() {
            return Err(RegistryError::Bad(format!(
                "{r}: the registry answered {status}"
            )));
        }
        let ctype = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        let body = limited(resp, MAX_DOCUMENT, &r.registry).await?;
        let digest = digest_of(&body);
        if reference.starts_with("sha256:") && digest != reference {
            return Err(RegistryError::Bad(format!(
                "{r}: the registry sent a manifest whose digest is {digest}, not {reference}"
            )));
        }
        Ok((ctype, body, digest))
    }

    /// The image's manifest for this machine's platform, with its digest.
    pub async fn manifest(
        &self,
        r: &ImageRef,
        cred: Option<&RegistryCredential>,
    ) -> Result<(String, Manifest), RegistryError> {
        let (ctype, body, digest) = self.document(r, cred, r.reference()).await?;
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            #[serde(default)]
            media_type: String,
            #[serde(default)]
            manifests: Option<serde_json::Value>,
        }
        let probe: Probe = serde_json::from_slice(&body)
            .map_err(|e| RegistryError::Bad(format!("{r}: the manifest is not JSON: {e}")))?;
        let kind = if probe.media_type.is_empty() {
            ctype
        } else {
            probe.media_type
        };
        let is_index =
            kind == MEDIA_OCI_INDEX || kind == MEDIA_DOCKER_LIST || probe.manifests.is_some();
        let (body, digest) = if is_index {
            let idx: Index = serde_json::from_slice(&body)
                .map_err(|e| RegistryError::Bad(format!("{r}: a bad image index: {e}")))?;
            let (os, arch) = platform();
            let pick = idx
                .manifests
                .iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| p.os == os && p.architecture == arch)
                })
                .ok_or_else(|| RegistryError::NotFound(format!("{r} has no {os}/{arch} image")))?;
            let (_, body, d) = self.document(r, cred, &pick.digest).await?;
            (body, d)
        } else {
            (body, digest)
        };
        let m: Manifest = serde_json::from_slice(&body)
            .map_err(|e| RegistryError::Bad(format!("{r}: a bad image manifest: {e}")))?;
        if m.media_type == "application/vnd.docker.distribution.manifest.v1+prettyjws" {
            return Err(RegistryError::Bad(format!(
                "{r} is a Docker schema 1 image, which is not supported"
            )));
        }
        Ok((digest, m))
    }

    /// A small blob (an image config), checked against its digest.
    pub async fn small_blob(
        &self,
        r: &ImageRef,
        cred: Option<&RegistryCredential>,
        d: &Descriptor,
    ) -> Result<Vec<u8>, RegistryError> {
        digest_hex(&d.digest)?;
        if d.size as usize > MAX_DOCUMENT {
            return Err(RegistryError::Bad(format!("{r}: its config is over 4 MiB")));
        }
        let resp = self.blob_response(r, cred, &d.digest).await?;
        let body = limited(resp, MAX_DOCUMENT, &r.registry).await?;
        if digest_of(&body) != d.digest {
            return Err(RegistryError::Bad(format!(
                "{r}: blob {} does not match its digest",
                d.digest
            )));
        }
        Ok(body)
    }

    async fn blob_response(
        &self,
        r: &ImageRef,
        cred: Option<&RegistryCredential>,
        digest: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let url = format!(
            "{}/v2/{}/blobs/{digest}",
            self.base(&r.registry),
            r.repository
        );
        let resp = self
            .send(&r.registry, &r.repository, cred, false, |h| h.get(&url))
            .await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Err(RegistryError::NotFound(format!(
                "{r}: blob {digest} is missing from the registry"
            )));
        }
        if !resp.status().is_success() {
            return Err(RegistryError::Bad(format!(
                "{r}: blob {digest}: the registry answered {}",
                resp.status()
            )));
        }
        Ok(resp)
    }

    /// Streams a blob into `out`, checking its size and digest; returns the bytes
    /// written.
    pub async fn blob_to_file(
        &self,
        r: &ImageRef,
        cred: Option<&RegistryCredential>,
        d: &Descriptor,
        out: &std::path::Path,
    ) -> Result<u64, RegistryError> {
        use tokio::io::AsyncWriteExt;
        digest_hex(&d.digest)?;
        let mut resp = self.blob_response(r, cred, &d.digest).await?;
        let mut f = tokio::fs::File::create(out).await?;
        let mut h = sha2::Sha256::new();
        let mut n: u64 = 0;
        while let Some(chunk) = resp.chunk().await.map_err(|e| RegistryError::Http {
            registry: r.registry.clone(),
            source: e,
        })? {
            n += chunk.len() as u64;
            if n > d.size {
                return Err(RegistryError::Bad(format!(
                    "{r}: layer {} is larger than its manifest says ({} bytes)",
                    d.digest, d.size
                )));
            }
            h.update(&chunk);
            f.write_all(&chunk).await?;
        }
        f.flush().await?;
        let got = format!("sha256:{}", hex::encode(h.finalize()));
        if got != d.digest {
            return Err(RegistryError::Bad(format!(
                "{r}: layer {} arrived as {got} ({n} bytes): corrupted on the way",
                d.digest
            )));
        }
        Ok(n)
    }

    /// The config of an image, by its manifest.
    pub async fn config(
        &self,
        r: &ImageRef,
        cred: Option<&RegistryCredential>,
        m: &Manifest,
    ) -> Result<ImageConfig, RegistryError> {
        let body = self.small_blob(r, cred, &m.config).await?;
        let c: ConfigFile = serde_json::from_slice(&body)
            .map_err(|e| RegistryError::Bad(format!("{r}: a bad image config: {e}")))?;
        let (_, arch) = platform();
        if !c.architecture.is_empty() && c.architecture != arch {
            return Err(RegistryError::Bad(format!(
                "{r} is built for {}, and this node is {arch}",
                c.architecture
            )));
        }
        Ok(c.config.unwrap_or_default())
    }

    // ---- pushing (tests, benchmarks) ----

    /// Uploads a blob unless the registry has it; returns its digest.
    pub async fn push_blob(
        &self,
        registry: &str,
        repository: &str,
        cred: Option<&RegistryCredential>,
        data: bytes::Bytes,
    ) -> Result<String, RegistryError> {
        let digest = digest_of(&data);
        let base = self.base(registry);
        let head = format!("{base}/v2/{repository}/blobs/{digest}");
        let r = self
            .send(registry, repository, cred, true, |h| h.head(&head))
            .await?;
        if r.status().is_success() {
            return Ok(digest);
        }
        let start = format!("{base}/v2/{repository}/blobs/uploads/");
        let r = self
            .send(registry, repository, cred, true, |h| h.post(&start))
            .await?;
        if r.status() != reqwest::StatusCode::ACCEPTED {
            return Err(RegistryError::Bad(format!(
                "{registry}: starting an upload answered {}",
                r.status()
            )));
        }
        let loc = r
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Bad(format!("{registry}: an upload without a Location")))?
            .to_string();
        let loc = if loc.starts_with('/') {
            format!("{base}{loc}")
        } else {
            loc
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let put = format!("{loc}{sep}digest={digest}");
        let r = self
            .send(registry, repository, cred, true, |h| {
                h.put(&put)
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .body(data.clone())
            })
            .await?;
        if r.status() != reqwest::StatusCode::CREATED {
            return Err(RegistryError::Bad(format!(
                "{registry}: finishing an upload answered {}",
                r.status()
            )));
        }
        Ok(digest)
    }

    /// Stores a manifest under `tag`; returns its digest.
    pub async fn push_manifest(
        &self,
        registry: &str,
        repository: &str,
        cred: Option<&RegistryCredential>,
        tag: &str,
        media_type: &str,
        body: bytes::Bytes,
    ) -> Result<String, RegistryError> {
        let url = format!("{}/v2/{repository}/manifests/{tag}", self.base(registry));
        let r = self
            .send(registry, repository, cred, true, |h| {
                h.put(&url)
                    .header(reqwest::header::CONTENT_TYPE, media_type)
                    .body(body.clone())
            })
            .await?;
        if r.status() != reqwest::StatusCode::CREATED {
            let s = r.status();
            let text = r.text().await.unwrap_or_default();
            return Err(RegistryError::Bad(format!(
                "{registry}: storing the manifest answered {s}: {text}"
            )));
        }
        Ok(digest_of(&body))
    }
}

/// A response body of at most `max` bytes.
async fn limited(
    mut resp: reqwest::Response,
    max: usize,
    registry: &str,
) -> Result<Vec<u8>, RegistryError> {
    let mut out = Vec::new();
    while let Some(c) = resp.chunk().await.map_err(|e| RegistryError::Http {
        registry: registry.to_string(),
        source: e,
    })? {
        if out.len() + c.len() > max {
            return Err(RegistryError::Bad(format!(
                "{registry}: a document over {} MiB",
                max >> 20
            )));
        }
        out.extend_from_slice(&c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_are_read_as_registries_send_them() {
        assert_eq!(
            parse_challenge("Basic realm=\"Registry\""),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(
                "Bearer realm=\"https://auth.docker.io/token\",service=\"registry.docker.io\",scope=\"repository:library/busybox:pull\""
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull".into()),
            })
        );
        // A scope holding commas, in quotes, stays whole.
        assert_eq!(
            parse_challenge("bearer realm=\"https://t/x\", scope=\"repository:a/b:pull,push\""),
            Some(Challenge::Bearer {
                realm: "https://t/x".into(),
                service: None,
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(parse_challenge("Bearer service=\"x\""), None, "no realm");
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn only_loopback_and_named_hosts_get_plain_http() {
        let c = Client::new(vec!["reg.lan:5000".into()]).unwrap();
        assert_eq!(c.base("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(c.base("localhost:5000"), "http://localhost:5000");
        assert_eq!(c.base("[::1]:5000"), "http://[::1]:5000");
        assert_eq!(c.base("reg.lan:5000"), "http://reg.lan:5000");
        assert_eq!(c.base("reg.lan"), "https://reg.lan");
        assert_eq!(c.base("127.example.com"), "https://127.example.com");
        assert_eq!(
            c.base("registry-1.docker.io"),
            "https://registry-1.docker.io"
        );
    }

    #[test]
    fn a_digest_must_be_lowercase_sha256() {
        let ok = format!("sha256:{}", "a".repeat(64));
        assert!(digest_hex(&ok).is_ok());
        assert!(digest_hex(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(digest_hex("sha256:../../etc").is_err());
        assert!(digest_hex(&format!("sha512:{}", "a".repeat(64))).is_err());
    }
}
