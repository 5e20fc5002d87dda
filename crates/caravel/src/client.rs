//! The HTTP client the CLI and the bench use, and where it finds the server and token:
//! flags, then CARAVEL_SERVER / CARAVEL_TOKEN, then the config that `caravel up` writes.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use caravel_core::api::ErrorBody;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub server: Option<String>,
    pub token: Option<String>,
    /// CA certificates (PEM) an `https` server is checked against instead of the system's
    /// roots: a self-signed pool's `DATA_DIR/tls/ca.pem`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

pub fn config_path() -> PathBuf {
    if let Ok(p) = std::env::var("CARAVEL_CONFIG") {
        return PathBuf::from(p);
    }
    let base = std::env::var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|_| PathBuf::from("."));
    base.join("caravel").join("config.toml")
}

pub fn load_config() -> Result<ClientConfig> {
    let p = config_path();
    match std::fs::read_to_string(&p) {
        Ok(s) => toml::from_str(&s).with_context(|| format!("reading {}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClientConfig::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

pub fn write_config(c: &ClientConfig) -> Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = config_path();
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&p)
        .with_context(|| format!("writing {}", p.display()))?;
    f.write_all(toml::to_string(c)?.as_bytes())?;
    Ok(p)
}

/// An HTTP client builder that trusts `ca` (PEM) alone when given.
pub fn http_builder(ca: Option<&std::path::Path>) -> Result<reqwest::ClientBuilder> {
    let b = reqwest::Client::builder();
    let Some(ca) = ca else { return Ok(b) };
    let roots = caravel_tls::ca_roots(ca).map_err(|e| anyhow!("--ca: {e}"))?;
    let roots: Vec<reqwest::Certificate> = roots
        .iter()
        .map(|c| reqwest::Certificate::from_der(c))
        .collect::<Result<_, _>>()?;
    Ok(b.tls_certs_only(roots))
}

/// A request that failed on TLS settings (the CA, the scheme): what to do about it.
#[derive(Debug)]
pub struct TlsMisfit(pub &'static str);

impl std::fmt::Display for TlsMisfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// What to do about a request that failed before any answer, when the cause is TLS.
pub fn tls_hint(e: &reqwest::Error, url: &str) -> Option<&'static str> {
    let mut chain = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        chain.push_str(&c.to_string());
        src = c.source();
    }
    if chain.contains("UnknownIssuer") || chain.contains("invalid peer certificate") {
        Some(
            "the server's certificate is not signed by a CA this client trusts: pass --ca FILE \
             (or set CARAVEL_CA); a pool with a self-signed certificate has its CA in \
             DATA_DIR/tls/ca.pem",
        )
    } else if url.starts_with("https://")
        && (chain.contains("InvalidContentType") || chain.contains("corrupt message"))
    {
        Some("the server does not speak TLS: use an http:// URL")
    } else {
        None
    }
}

#[derive(Clone)]
pub struct Client {
    /// The server, or a server and its standbys (`--server URL[,URL...]`).
    bases: Vec<String>,
    /// The one that answered last: tried first.
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    token: String,
    http: reqwest::Client,
}

/// An API error as the CLI shows it: one line with the field, reason and code.
#[derive(Debug)]
pub struct ApiFailure {
    pub code: String,
    pub message: String,
    pub field: Option<String>,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            // Validation messages often start with their field already.
            Some(field) if !self.message.starts_with(field.as_str()) => {
                write!(f, "{field}: {} ({})", self.message, self.code)
            }
            _ => write!(f, "{} ({})", self.message, self.code),
        }
    }
}

impl std::error::Error for ApiFailure {}

impl Client {
    pub fn resolve(
        server: Option<String>,
        token: Option<String>,
        ca: Option<PathBuf>,
    ) -> Result<Client> {
        let cfg = load_config()?;
        // A server given here with no CA does not take the config's CA, which belongs to
        // the config's server.
        let ca = match (&server, ca) {
            (_, Some(ca)) => Some(ca),
            (Some(_), None) => None,
            (None, None) => cfg.ca,
        };
        let base = server.or(cfg.server).ok_or_else(|| {
            anyhow!("no server: pass --server, set CARAVEL_SERVER, or run `caravel up` first")
        })?;
        let token = token.or(cfg.token).ok_or_else(|| {
            anyhow!("no token: pass --token, set CARAVEL_TOKEN, or run `caravel up` first")
        })?;
        Client::with_ca(&base, &token, ca.as_deref())
    }

    /// `base`: a URL, or several separated by commas (a server and its standbys); a
    /// request that cannot connect to one goes to the next. `https` servers are checked
    /// against the system's roots.
    pub fn new(base: &str, token: &str) -> Client {
        Client::with_ca(base, token, None).expect("an HTTP client without a CA file")
    }

    /// As [`Client::new`], with `https` servers checked against the CA certificates in
    /// `ca` (PEM) instead of the system's roots.
    pub fn with_ca(base: &str, token: &str, ca: Option<&std::path::Path>) -> Result<Client> {
        Ok(Client {
            bases: base
                .split(',')
                .map(|b| b.trim().trim_end_matches('/').to_string())
                .filter(|b| !b.is_empty())
                .collect(),
            current: Default::default(),
            token: token.to_string(),
            http: http_builder(ca)?
                .timeout(std::time::Duration::from_secs(60))
                .build()?,
        })
    }

    async fn check(resp: reqwest::Response) -> Result<reqwest::Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => Err(ApiFailure {
                code: b.error.code.as_str().to_string(),
                message: b.error.message,
                field: b.error.field,
            }
            .into()),
            Err(_) => Err(anyhow!("server answered {status}: {text}")),
        }
    }

    /// The server in use (the first, until another one answered instead).
    pub fn base(&self) -> &str {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        self.bases.get(i).map(String::as_str).unwrap_or("")
    }

    /// Sends the request `make` builds for a server URL, to the server in use; if that
    /// one refuses the connection (nothing was sent), to the next, and so on.
    async fn send(
        &self,
        make: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        if self.bases.is_empty() {
            bail!("no server: the server list is empty");
        }
        let n = self.bases.len();
        let start = self.current.load(std::sync::atomic::Ordering::Relaxed);
        // Past the server's rate limit: wait as it says (Retry-After), a few times, as
        // kubectl's client-side throttle would have.
        let mut throttled = 0;
        let mut k = 0;
        while k < n {
            let i = (start + k) % n;
            match make(&self.bases[i]).bearer_auth(&self.token).send().await {
                Ok(r) if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS && throttled < 5 => {
                    throttled += 1;
                    let secs = r
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(1)
                        .clamp(1, 10);
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                    continue;
                }
                Ok(r) => {
                    self.current.store(i, std::sync::atomic::Ordering::Relaxed);
                    return Ok(r);
                }
                Err(e) if e.is_connect() && k + 1 < n => {
                    k += 1;
                    continue;
                }
                Err(e) => {
                    let hint = tls_hint(&e, &self.bases[i]);
                    let err = anyhow::Error::new(e).context(format!(
                        "cannot reach the server at {}",
                        self.bases.join(" or ")
                    ));
                    return Err(match hint {
                        Some(h) => err.context(TlsMisfit(h)),
                        None => err,
                    });
                }
            }
        }
        unreachable!("the last server's error returns")
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let r = self.send(|b| self.http.get(format!("{b}{path}"))).await?;
        Ok(Self::check(r).await?.json().await?)
    }

    /// A GET whose body may take long to arrive (a checkpoint of gigabytes): no overall
    /// time limit, only the connection's.
    pub async fn download(&self, path: &str) -> Result<reqwest::Response> {
        let r = self
            .send(|b| {
                self.http
                    .get(format!("{b}{path}"))
                    .timeout(std::time::Duration::from_secs(7 * 86_400))
            })
            .await?;
        Self::check(r).await
    }

    pub async fn get_raw(&self, path: &str) -> Result<reqwest::Response> {
        let r = self.send(|b| self.http.get(format!("{b}{path}"))).await?;
        Self::check(r).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let r = self
            .send(|b| self.http.post(format!("{b}{path}")).json(body))
            .await?;
        Ok(Self::check(r).await?.json().await?)
    }

    /// A POST carrying `Idempotency-Key: key`, repeated while no server can be reached or
    /// the one reached answers 503 (restarting, a standby taking over, its database away),
    /// for up to `patience`. The key makes a repeat of a request that did land return its
    /// first result instead of acting twice.
    pub async fn post_idempotent<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        key: &str,
        patience: Duration,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + patience;
        // 200 ms doubling to 2 s, jittered: clients cut off by a restart do not all
        // come back at the same instants.
        let mut delays = {
            use backon::BackoffBuilder;
            backon::ExponentialBuilder::new()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(2))
                .with_jitter()
                .without_max_times()
                .build()
        };
        loop {
            let sent = self
                .send(|b| {
                    self.http
                        .post(format!("{b}{path}"))
                        .header("idempotency-key", key)
                        .json(body)
                })
                .await;
            let retry = match &sent {
                // Trying again does not change which CA this client trusts.
                Err(e) => e.downcast_ref::<TlsMisfit>().is_none(),
                Ok(r) if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                    // Its store is out of reach: a standby may own it by now.
                    let n = self.bases.len();
                    self.current
                        .fetch_update(
                            std::sync::atomic::Ordering::Relaxed,
                            std::sync::atomic::Ordering::Relaxed,
                            |i| Some((i + 1) % n),
                        )
                        .ok();
                    true
                }
                Ok(_) => false,
            };
            let delay = delays.next().expect("endless");
            if !retry || tokio::time::Instant::now() + delay > deadline {
                return Ok(Self::check(sent?).await?.json().await?);
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// A request with no body, for actions that answer 204.
    async fn no_body(&self, method: reqwest::Method, path: &str) -> Result<()> {
        let r = self
            .send(|b| self.http.request(method.clone(), format!("{b}{path}")))
            .await?;
        Self::check(r).await?;
        Ok(())
    }

    /// The status of a HEAD request (any answer, success or not; only an unreachable
    /// server is an error).
    pub async fn head_status(&self, path: &str) -> Result<u16> {
        let r = self.send(|b| self.http.head(format!("{b}{path}"))).await?;
        Ok(r.status().as_u16())
    }

    /// PUTs a file as the body (streamed, its length declared), with no overall time
    /// limit: an upload of hundreds of MiB may take a while.
    pub async fn put_file<T: DeserializeOwned>(
        &self,
        path: &str,
        file: &std::path::Path,
        content_type: &str,
    ) -> Result<T> {
        let len = std::fs::metadata(file)?.len();
        let r = self
            .send(|b| {
                let f = std::fs::File::open(file).expect("checked above");
                let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
                    tokio::fs::File::from_std(f),
                    1 << 20,
                ));
                self.http
                    .put(format!("{b}{path}"))
                    .timeout(std::time::Duration::from_secs(7 * 86_400))
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    .header(reqwest::header::CONTENT_LENGTH, len)
                    .body(body)
            })
            .await?;
        Ok(Self::check(r).await?.json().await?)
    }

    /// A PUT of a JSON body whose answer has none (201 or 200).
    pub async fn put_json<B: Serialize>(&self, path: &str, body: &B) -> Result<()> {
        let r = self
            .send(|b| self.http.put(format!("{b}{path}")).json(body))
            .await?;
        Self::check(r).await?;
        Ok(())
    }

    pub async fn post_empty(&self, path: &str) -> Result<()> {
        self.no_body(reqwest::Method::POST, path).await
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        self.no_body(reqwest::Method::DELETE, path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_failure_names_its_field_once() {
        let f = |message: &str, field: Option<&str>| {
            ApiFailure {
                code: "unschedulable".into(),
                message: message.into(),
                field: field.map(str::to_string),
            }
            .to_string()
        };
        assert_eq!(
            f("a task asks for 65 CPUs", Some("resources.cpu_milli")),
            "resources.cpu_milli: a task asks for 65 CPUs (unschedulable)"
        );
        assert_eq!(
            f(
                "resources.cpu_milli: must be at least 1",
                Some("resources.cpu_milli")
            ),
            "resources.cpu_milli: must be at least 1 (unschedulable)"
        );
        assert_eq!(
            f("job 9 not found", None),
            "job 9 not found (unschedulable)"
        );
    }
}
