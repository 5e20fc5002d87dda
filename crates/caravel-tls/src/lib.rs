//! TLS for Caravel's listeners and clients.
//!
//! - A server serves HTTPS from PEM files an operator gives it ([`CertFiles`]), re-read when
//!   they change on disk so a renewed certificate needs no restart, or from a pool CA it
//!   makes itself ([`self_signed`]), the way k3s and Nomad's `tls cert create` bootstrap a
//!   private cluster.
//! - [`TlsListener`] does the handshakes off the accept loop (a slow or silent client holds
//!   only its own task) and answers a plain-HTTP request on the TLS port with a 400 that
//!   says to use `https://`, as Go's net/http does.
//! - An agent serves its log endpoint with a certificate it makes at start ([`ephemeral`]);
//!   the server learns its SHA-256 over the authenticated registration and accepts only
//!   that certificate when it calls the agent ([`pinned_client_config`]).
//!
//! One crypto provider workspace-wide: rustls' default (aws-lc-rs), the one reqwest's
//! `rustls` feature uses.

#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub use rustls;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} {path}: {reason}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("making a certificate: {0}")]
    Generate(String),
    #[error("TLS settings: {0}")]
    Config(String),
    /// A pinned CA that is not the pinned one, or a pin that is not a SHA-256: trying
    /// again will not help.
    #[error("{0}")]
    Refused(String),
}

/// How long a client has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A certificate file changed on disk is seen within this long.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Hex SHA-256 of a certificate's DER: what an agent's certificate is pinned by.
pub fn fingerprint(cert: &[u8]) -> String {
    hex::encode(Sha256::digest(cert))
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file, in order (a leaf and its intermediates, or CA roots).
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let invalid = |reason: String| TlsError::Invalid {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(
            "holds no certificate (expected a PEM block `-----BEGIN CERTIFICATE-----`)".into(),
        ));
    }
    for (i, c) in certs.iter().enumerate() {
        rustls::server::ParsedCertificate::try_from(c).map_err(|e| {
            invalid(format!(
                "certificate {} of {} does not parse: {e}",
                i + 1,
                certs.len()
            ))
        })?;
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("private key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Invalid {
        what: "private key",
        path: path.to_owned(),
        reason: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "holds no private key (expected a PEM block `-----BEGIN PRIVATE KEY-----`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`)".into()
            }
            e => format!("not valid PEM: {e}"),
        },
    })
}

/// A certificate chain and its key, checked to belong together.
fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_certs("certificate", cert)?;
    let key_der = load_key(key)?;
    let ck =
        CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| TlsError::Invalid {
            what: "private key",
            path: key.to_owned(),
            reason: format!(
                "does not go with the certificate in {}: {e}",
                cert.display()
            ),
        })?;
    Ok(Arc::new(ck))
}

type Stamp = [Option<(SystemTime, u64)>; 2];

fn stamp(cert: &Path, key: &Path) -> Stamp {
    [cert, key].map(|p| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    })
}

/// A certificate and key on disk, served as they are now: when either file changes, the
/// next handshake after [`RELOAD_CHECK`] reads them again. A pair that does not load (half
/// written, or a key that does not match) is logged and the last good one kept.
#[derive(Debug)]
pub struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    stamp: Stamp,
    checked: Instant,
    /// The stamp of a pair that failed to load: not tried (nor logged) again until it
    /// changes.
    failed: Option<Stamp>,
}

impl CertFiles {
    /// Loads the pair now: a missing or bad file is an error at start, not at the first
    /// handshake.
    pub fn load(cert: &Path, key: &Path) -> Result<CertFiles, TlsError> {
        let st = stamp(cert, key);
        let ck = certified_key(cert, key)?;
        Ok(CertFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            state: Mutex::new(Loaded {
                key: ck,
                stamp: st,
                checked: Instant::now(),
                failed: None,
            }),
        })
    }

    /// The pair to serve now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut st = self.state.lock().expect("cert lock");
        if st.checked.elapsed() >= RELOAD_CHECK {
            st.checked = Instant::now();
            let now = stamp(&self.cert, &self.key);
            if now != st.stamp && st.failed != Some(now) {
                match certified_key(&self.cert, &self.key) {
                    Ok(ck) => {
                        tracing::info!(cert = %self.cert.display(), "TLS certificate changed on disk; serving the new one");
                        st.key = ck;
                        st.stamp = now;
                        st.failed = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS certificate changed on disk but does not load; still serving the old one");
                        st.failed = Some(now);
                    }
                }
            }
        }
        st.key.clone()
    }
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A server's TLS settings (HTTP/2 and HTTP/1.1 offered by ALPN) for certificate files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let files = CertFiles::load(cert, key)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(files));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// What [`self_signed`] wrote.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The pool CA's certificate: what clients and agents trust (`--ca`).
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let w = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    // Written beside and renamed over: a reader (the reloading server) never sees half.
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(w)?;
    f.write_all(data).map_err(w)?;
    f.sync_all().map_err(w)?;
    std::fs::rename(&tmp, path).map_err(w)
}

/// The CA's parameters, rebuilt the same from its key at every start: a leaf names its
/// issuer by distinguished name and key identifier, and both follow from the key. The
/// name carries the key's hash so that two pools' CAs are told apart.
fn ca_params(ca_key: &rcgen::KeyPair) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    let id = &fingerprint(ca_key.public_key_raw())[..12];
    p.distinguished_name
        .push(rcgen::DnType::CommonName, format!("Caravel pool CA {id}"));
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(20 * 365);
    p
}

fn gen<T>(r: Result<T, rcgen::Error>) -> Result<T, TlsError> {
    r.map_err(|e| TlsError::Generate(e.to_string()))
}

/// A name a certificate can be issued for: an IP address, or a DNS name (letters, digits
/// and `-` in labels of 1 to 63, with `*.` allowed in front).
pub fn check_name(n: &str) -> Result<(), TlsError> {
    if n.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let bad = |why: &str| Err(TlsError::Config(format!("certificate name {n:?}: {why}")));
    let host = n.strip_prefix("*.").unwrap_or(n);
    if host.is_empty() || n.len() > 253 {
        return bad("must be an IP address or a DNS name of 1 to 253 characters");
    }
    for label in host.split('.') {
        if label.is_empty() || label.len() > 63 {
            return bad("each dot-separated label must be 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return bad("labels may hold only letters, digits and inner `-`");
        }
    }
    Ok(())
}

/// Makes (once) a pool CA in `dir`, and issues from it a fresh server certificate for
/// `names` (DNS names and IP addresses) at every call, so that a server started with
/// other names gets a certificate for them. Clients trust `dir/ca.pem`, which does not
/// change; its key (`dir/ca-key.pem`, mode 0600) never leaves the directory.
pub fn self_signed(dir: &Path, names: &[String]) -> Result<Issued, TlsError> {
    use std::os::unix::fs::DirBuilderExt;
    if names.is_empty() {
        return Err(TlsError::Config(
            "a server certificate needs at least one name".into(),
        ));
    }
    for n in names {
        check_name(n)?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| TlsError::Write {
            path: dir.to_owned(),
            source,
        })?;
    let ca_key_path = dir.join("ca-key.pem");
    let ca_path = dir.join("ca.pem");
    let ca_key = if ca_key_path.exists() {
        let pem = String::from_utf8_lossy(&read("CA key", &ca_key_path)?).into_owned();
        rcgen::KeyPair::from_pem(&pem).map_err(|e| TlsError::Invalid {
            what: "CA key",
            path: ca_key_path.clone(),
            reason: e.to_string(),
        })?
    } else {
        let k = gen(rcgen::KeyPair::generate())?;
        write_file(&ca_key_path, k.serialize_pem().as_bytes(), 0o600)?;
        let _ = std::fs::remove_file(&ca_path);
        k
    };
    let params = ca_params(&ca_key);
    if !ca_path.exists() {
        let ca = gen(params.self_signed(&ca_key))?;
        write_file(&ca_path, ca.pem().as_bytes(), 0o644)?;
    }
    let issuer = rcgen::Issuer::new(params, ca_key);
    let mut leaf = gen(rcgen::CertificateParams::new(names.to_vec()))?;
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "caravel server");
    leaf.is_ca = rcgen::IsCa::ExplicitNoCa;
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    leaf.not_before = now - time::Duration::hours(1);
    leaf.not_after = now + time::Duration::days(10 * 365);
    let key = gen(rcgen::KeyPair::generate())?;
    let cert = gen(leaf.signed_by(&key, &issuer))?;
    let out = Issued {
        ca: ca_path,
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
    };
    // Key first: until the certificate is replaced too the pair does not match, and a
    // reloading server keeps the old pair.
    write_file(&out.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&out.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(out)
}

/// A certificate made in memory for this process (an agent's log endpoint), and the
/// fingerprint its peers pin it by.
pub fn ephemeral(names: &[String]) -> Result<(Arc<rustls::ServerConfig>, String), TlsError> {
    let mut p = gen(rcgen::CertificateParams::new(names.to_vec()))?;
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "caravel agent");
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(10 * 365);
    let key = gen(rcgen::KeyPair::generate())?;
    let cert = gen(p.self_signed(&key))?;
    let fp = fingerprint(cert.der());
    let key_der = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(cfg), fp))
}

/// Accepts exactly the one certificate whose SHA-256 is `pin`, whatever name it carries:
/// the peer's identity is the fingerprint it registered over an authenticated channel, not
/// a name in a CA's book. Without a pin, any certificate: only for fetching a document
/// that is then checked by its own hash ([`fetch_pinned_ca`]).
#[derive(Debug)]
struct Pinned {
    pin: Option<String>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match &self.pin {
            None => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            Some(pin) if fingerprint(end_entity) == *pin => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            Some(pin) => Err(rustls::Error::General(format!(
                "the peer's certificate is not the one it registered (sha256 {pin})"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client's TLS settings that trust only the certificate with SHA-256 `pin` (hex).
pub fn pinned_client_config(pin: &str) -> Result<rustls::ClientConfig, TlsError> {
    client_config_with(Some(pin.to_ascii_lowercase()))
}

fn client_config_with(pin: Option<String>) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { pin, provider }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The SHA-256 (hex) of the first certificate in a PEM text: what `--ca-sha256` names.
pub fn pem_fingerprint(pem: &[u8]) -> Option<String> {
    let first = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    Some(fingerprint(&first))
}

/// Fetches a self-signed pool's CA from `server` (`GET /v1/tls/ca.pem`) and keeps it only
/// if its SHA-256 is `pin`: how an agent joins with a fingerprint instead of a copied CA
/// file, as k3s agents do with the CA hash in their join token. The connection is not
/// verified (the CA is what it would be verified with); the hash check is what makes the
/// answer trustworthy, and everything after it is verified against that CA.
pub async fn fetch_pinned_ca(server: &str, pin: &str) -> Result<String, TlsError> {
    let pin = pin.to_ascii_lowercase();
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TlsError::Refused(format!(
            "--ca-sha256 {pin:?}: must be a SHA-256 in hex (64 characters)"
        )));
    }
    let fetch = |e: String| TlsError::Config(format!("fetching the pool CA from {server}: {e}"));
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(client_config_with(None)?)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| fetch(e.to_string()))?;
    let resp = http
        .get(format!("{}/v1/tls/ca.pem", server.trim_end_matches('/')))
        .send()
        .await
        .map_err(|e| fetch(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(fetch(format!(
            "answered {}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        )));
    }
    let pem = resp.text().await.map_err(|e| fetch(e.to_string()))?;
    match pem_fingerprint(pem.as_bytes()) {
        Some(f) if f == pin => Ok(pem),
        Some(f) => Err(TlsError::Refused(format!(
            "the CA {server} serves has sha256 {f}, not {pin}: refusing it"
        ))),
        None => Err(fetch("the answer holds no certificate".into())),
    }
}

/// The certificates in a PEM text (a fetched CA).
pub fn pem_roots(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

/// The trust roots in a CA file, for a client's `--ca`.
pub fn ca_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    load_certs("CA certificate", path)
}

/// A TLS listener for `axum::serve`. Handshakes run in their own tasks, each bounded by
/// [`HANDSHAKE_TIMEOUT`], and finished connections queue for `accept`; a connection that
/// sends plain HTTP gets a 400 naming the fix.
pub struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    _accept: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// TLS handshakes in progress at once (see `TlsListener::new`).
const MAX_HANDSHAKES: usize = 1024;

/// The answer to a plain-HTTP request on a TLS port, in the API's error shape.
fn plain_http_answer() -> Vec<u8> {
    let body = "{\"error\":{\"code\":\"invalid_argument\",\"message\":\"this port speaks HTTPS and the client sent plain HTTP: use an https:// URL\"}}\n";
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl TlsListener {
    pub fn new(tcp: TcpListener, cfg: Arc<rustls::ServerConfig>) -> io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        // Handshakes in progress at once: a flood of connections that never finish theirs
        // holds at most this many descriptors (each for HANDSHAKE_TIMEOUT at most).
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let accept = tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    c = tcp.accept() => c,
                    _ = tx.closed() => return,
                };
                let (stream, peer) = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, as hyper's and
                        // axum's accept loops do, instead of spinning.
                        tracing::warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let done = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                        let mut first = [0u8; 1];
                        let n = stream.peek(&mut first).await.ok()?;
                        // 0x16: a TLS handshake record. Anything else that looks like
                        // text is a plain-HTTP client on the wrong scheme.
                        if n == 1 && first[0] != 0x16 {
                            if first[0].is_ascii_uppercase() {
                                let mut s = stream;
                                let mut buf = [0u8; 4096];
                                let _ = tokio::time::timeout(
                                    Duration::from_millis(200),
                                    s.read(&mut buf),
                                )
                                .await;
                                let _ = s.write_all(&plain_http_answer()).await;
                                let _ = s.shutdown().await;
                            }
                            return None;
                        }
                        acceptor.accept(stream).await.ok()
                    })
                    .await;
                    if let Ok(Some(tls)) = done {
                        let _ = tx.send((tls, peer)).await;
                    }
                });
            }
        });
        Ok(TlsListener {
            rx,
            local,
            _accept: AbortOnDrop(accept),
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task is gone only when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests;
