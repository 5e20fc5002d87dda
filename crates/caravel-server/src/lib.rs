//! The Caravel control plane: HTTP API, authentication, the scheduling loop (which calls
//! the pure `caravel-sched` crate), node liveness and metering, over a durable `Store`.
//!
//! Agents talk to it only through the public `/v1/agent` API. It must not depend on the
//! agent crate.

pub mod api;
pub mod auth;
pub mod autoscale;
pub mod checkpoints;
pub mod committer;
pub mod core;
pub mod datadir;
pub mod edge;
pub mod error;
pub mod fault;
pub mod gateway;
pub mod logs;
pub mod metrics;
pub mod openapi;
pub mod serve;
pub mod workdirs;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use caravel_core::{Millis, NodeState};
use caravel_store::{PgStore, SqliteStore, Store, Sync};
use tokio::sync::Notify;

use crate::core::Core;

pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as Millis
}

/// A libpq `key=value` string with the value of `password` (spaces around `=`, quoted or
/// not) replaced by `***`.
fn redact_password(kv: &str) -> String {
    let mut out = String::new();
    let mut rest = kv;
    while let Some(i) = rest.find("password") {
        out.push_str(&rest[..i + "password".len()]);
        rest = &rest[i + "password".len()..];
        let after_key = rest.trim_start();
        let Some(v) = after_key.strip_prefix('=') else {
            continue;
        };
        let v = v.trim_start();
        let end = if let Some(q) = v.strip_prefix('\'') {
            // Quoted: up to the closing quote that is not escaped.
            let mut end = q.len();
            let mut esc = false;
            for (j, c) in q.char_indices() {
                match c {
                    '\\' if !esc => esc = true,
                    '\'' if !esc => {
                        end = j + 1;
                        break;
                    }
                    _ => esc = false,
                }
            }
            1 + end
        } else {
            v.find(char::is_whitespace).unwrap_or(v.len())
        };
        out.push_str("=***");
        rest = &v[end.min(v.len())..];
    }
    out.push_str(rest);
    out
}

/// Where the control plane keeps its state.
#[derive(Clone, PartialEq, Eq)]
pub enum Datastore {
    /// `DATA_DIR/caravel.db`, embedded (the default).
    Sqlite,
    /// A PostgreSQL database: a `postgres://` URL or a libpq `key=value` string. The
    /// server takes the store's lock; a second server on it is refused.
    Postgres(String),
}

impl std::fmt::Debug for Datastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Datastore {
    /// For logs and errors: a password in the URL or the `key=value` string is hidden.
    pub fn redacted(&self) -> String {
        match self {
            Datastore::Sqlite => "sqlite".into(),
            Datastore::Postgres(url) => {
                if let Some(rest) = url
                    .strip_prefix("postgres://")
                    .or_else(|| url.strip_prefix("postgresql://"))
                {
                    let scheme = &url[..url.len() - rest.len()];
                    let (auth, host) = match rest.split_once('@') {
                        Some((a, h)) => (Some(a), h),
                        None => (None, rest),
                    };
                    match auth.and_then(|a| a.split_once(':')) {
                        Some((user, _)) => format!("{scheme}{user}:***@{host}"),
                        None => url.clone(),
                    }
                } else {
                    redact_password(url)
                }
            }
        }
    }

    /// `sqlite`, a `postgres://` / `postgresql://` URL, or a libpq `key=value` string.
    pub fn parse(s: &str) -> Result<Datastore, String> {
        let s = s.trim();
        if s == "sqlite" {
            Ok(Datastore::Sqlite)
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") || s.contains('=')
        {
            Ok(Datastore::Postgres(s.to_string()))
        } else {
            Err(format!(
                "expected `sqlite` or a PostgreSQL URL (postgres://USER@HOST:PORT/DB), got `{s}`"
            ))
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub datastore: Datastore,
    /// PostgreSQL only: wait for the store's owner to go away instead of failing, then
    /// take over (a hot standby for the control plane).
    pub standby: bool,
    pub listen: SocketAddr,
    /// A node that has not been heard from for this long is lost.
    pub lost_after_ms: u64,
    /// How long an agent's sync may be held; also its heartbeat period.
    pub heartbeat_ms: u64,
    pub sync: Sync,
    /// Half-life of the usage history that fair share weighs.
    pub fair_share_half_life_ms: u64,
    /// Where the gateway runs: its default routing preference.
    pub zone: String,
    pub region: String,
    /// Least-attained-service order for batch work (off: priority, guarantee, fair share,
    /// FIFO).
    pub las: Option<caravel_sched::Las>,
    /// How many waiting jobs hold a backfill reservation at once (`Config::reservations`).
    pub reservations: usize,
    /// Drain nodes for a job that has waited this long without starting (0: never).
    pub starvation_ms: u64,
    /// An elastic gang's attempt runs this long before it may restart bigger.
    pub elastic_grow_after_ms: u64,
    /// HTTPS on the listener (the API and the gateway); plain HTTP when `None`.
    pub tls: Option<Tls>,
    /// Domains under which the gateway routes by host name (`SERVICE[--TENANT].DOMAIN`).
    pub gateway_domains: Vec<String>,
    /// Where task checkpoints are kept (`None`: `DATA_DIR/checkpoints`). A standby must
    /// see the same folder (shared storage) to serve them after a takeover.
    pub checkpoint_dir: Option<PathBuf>,
    /// The largest checkpoint one task may save, in bytes.
    pub checkpoint_max_bytes: u64,
    /// How long a finished job's checkpoints are kept.
    pub checkpoint_retention_ms: u64,
    /// Where tasks' output shipped by the agents is kept (`None`: `DATA_DIR/logs`). A
    /// standby must see the same folder, as with checkpoints.
    pub log_dir: Option<PathBuf>,
    /// The most bytes kept of each stream (stdout, stderr) of a run: beyond it the start
    /// is dropped and the end kept.
    pub log_max_bytes: u64,
    /// How long a finished job's output is kept.
    pub log_retention_ms: u64,
    /// Where shipped working directories are kept (`None`: `DATA_DIR/workdirs`).
    pub workdir_dir: Option<PathBuf>,
    /// The largest working directory archive a tenant may upload, in bytes.
    pub workdir_max_bytes: u64,
    /// How long an archive no live job or service names is kept after its last use.
    pub workdir_retention_ms: u64,
    /// Timeouts and the connection cap (`serve`).
    pub conn_limits: serve::ConnLimits,
    /// API requests per tenant token, and per address for callers without a valid token.
    /// The admin and agent tokens are not limited (the control loop must never wait).
    pub tenant_rate: serve::Rate,
    pub anonymous_rate: serve::Rate,
}

/// A tenant's API calls: 100 a second, 200 at once (a CLI user makes a few a second; a
/// script that loops on `GET` without pause is slowed, not refused outright).
pub const DEFAULT_TENANT_RATE: serve::Rate = serve::Rate {
    per_s: 100.0,
    burst: 200.0,
};
/// Calls without a valid token, per address: health checks and the CA certificate, and
/// strangers guessing tokens.
pub const DEFAULT_ANONYMOUS_RATE: serve::Rate = serve::Rate {
    per_s: 20.0,
    burst: 40.0,
};

/// Where the server's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// PEM files from the operator's own CA or a public one; re-read when they change.
    Files { cert: PathBuf, key: PathBuf },
    /// A pool CA made once in `DATA_DIR/tls` and a server certificate issued from it at
    /// each start for these names (with `localhost`, `127.0.0.1`, `::1` and the host
    /// name); clients trust `DATA_DIR/tls/ca.pem`.
    SelfSigned { names: Vec<String> },
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> ServerConfig {
        ServerConfig {
            data_dir,
            datastore: Datastore::Sqlite,
            standby: false,
            listen,
            lost_after_ms: 10_000,
            heartbeat_ms: 2_000,
            sync: Sync::Normal,
            fair_share_half_life_ms: 3_600_000,
            zone: String::new(),
            region: String::new(),
            las: None,
            reservations: 1,
            starvation_ms: 0,
            elastic_grow_after_ms: 60_000,
            tls: None,
            gateway_domains: vec![],
            checkpoint_dir: None,
            checkpoint_max_bytes: 4 << 30,
            checkpoint_retention_ms: 7 * 24 * 3_600_000,
            log_dir: None,
            log_max_bytes: 64 << 20,
            log_retention_ms: 7 * 24 * 3_600_000,
            workdir_dir: None,
            workdir_max_bytes: 256 << 20,
            workdir_retention_ms: 7 * 24 * 3_600_000,
            conn_limits: serve::ConnLimits::default(),
            tenant_rate: DEFAULT_TENANT_RATE,
            anonymous_rate: DEFAULT_ANONYMOUS_RATE,
        }
    }

    pub fn log_root(&self) -> PathBuf {
        self.log_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("logs"))
    }

    pub fn workdir_root(&self) -> PathBuf {
        self.workdir_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("workdirs"))
    }

    pub fn checkpoint_root(&self) -> PathBuf {
        self.checkpoint_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("checkpoints"))
    }

    /// `https` with TLS on, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

#[cfg(test)]
mod datastore_tests {
    use super::Datastore;

    #[test]
    fn datastore_values_parse_and_passwords_stay_out_of_logs() {
        assert_eq!(Datastore::parse("sqlite"), Ok(Datastore::Sqlite));
        let url = "postgres://cv:s3cret@db:5432/caravel";
        let d = Datastore::parse(url).unwrap();
        assert_eq!(d, Datastore::Postgres(url.into()));
        assert_eq!(d.redacted(), "postgres://cv:***@db:5432/caravel");
        assert_eq!(format!("{d:?}"), "postgres://cv:***@db:5432/caravel");
        let kv = Datastore::parse("host=db user=cv password=s3cret dbname=c").unwrap();
        assert_eq!(kv.redacted(), "host=db user=cv password=*** dbname=c");
        let spaced = Datastore::parse("host=db password = 'a b\\' c' dbname=c").unwrap();
        assert_eq!(spaced.redacted(), "host=db password=*** dbname=c");
        assert_eq!(
            Datastore::parse("postgresql://db/c").unwrap().redacted(),
            "postgresql://db/c"
        );
        let err = Datastore::parse("mysql:/db").unwrap_err();
        assert!(
            err.contains("expected `sqlite` or a PostgreSQL URL"),
            "{err}"
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Locked(#[from] datadir::LockError),
    #[error("opening the store: {0}")]
    Store(#[from] caravel_store::StoreError),
    /// The store's lock went to another server while this one was cut off from it: this
    /// one stops rather than serve state it can no longer write.
    #[error("stopped, cut off from the store while a standby took it over: {0}")]
    Superseded(String),
    #[error("--standby: only with a PostgreSQL datastore")]
    StandbyNeedsPostgres,
    #[error("{path} does not hold this pool's token (the database has another): remove it, and use the pool's token from the data directory of the server that made the pool")]
    TokenMismatch { path: PathBuf },
    #[error("loading state: {0}")]
    Load(#[from] error::ApiError),
    #[error("loading state: {0}")]
    Core(#[from] error::CoreError),
    #[error("TLS: {0}")]
    Tls(#[from] caravel_tls::TlsError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Checkpoints(#[from] checkpoints::CheckpointError),
    #[error(transparent)]
    Logs(#[from] logs::LogError),
    #[error(transparent)]
    Workdirs(#[from] workdirs::WorkdirError),
}

pub struct Shared {
    pub core: Mutex<Core>,
    /// The current core's commit progress, readable without the core lock. Replaced with
    /// the core at a reload.
    durability: Mutex<Arc<committer::Durability>>,
    pub metrics: metrics::Metrics,
    /// SHA-256 of the admin and agent tokens (`auth::hash_token`).
    pub admin_hash: String,
    pub agent_hash: String,
    pub sched_wake: Notify,
    pub cfg: ServerConfig,
    pub http: reqwest::Client,
    /// The probers' client to replicas (each probe carries its own timeout).
    pub proxy: reqwest::Client,
    pub gateway: gateway::Gateway,
    /// The pool CA (PEM) when this server made its own certificate: served at
    /// `/v1/tls/ca.pem` for agents that join by its fingerprint.
    pub ca_pem: Option<String>,
    pub checkpoints: checkpoints::Checkpoints,
    pub logs: logs::Logs,
    pub workdirs: workdirs::Workdirs,
    /// Bytes of checkpoints and output kept per tenant, counted every few seconds by
    /// `storage_loop` (and raised by each save in between): what storage quotas are
    /// checked against.
    pub storage_used: Mutex<std::collections::HashMap<caravel_core::TenantId, u64>>,
    /// Held open for the server's life: the data directory is this server's alone.
    _data_dir_lock: std::fs::File,
    /// Set (and `stopped` notified) when the server must stop: its store has another owner.
    superseded: Mutex<Option<String>>,
    stopped: Notify,
    /// The store's ownership lease (PostgreSQL), replaced with the core at a reload:
    /// while it is not valid the server answers nothing but 503.
    pub lease: Mutex<Option<Arc<caravel_store::Lease>>>,
    /// Open connections (`serve`).
    pub conns: Arc<Mutex<serve::Registry>>,
    pub rate: serve::RateLimiter,
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    /// The tokens, where this server knows them: a standby on PostgreSQL that did not make
    /// them knows only their hashes (its clients bring the pool's tokens).
    pub admin_token: Option<String>,
    pub agent_token: Option<String>,
    /// The pool CA clients must trust, when the server made its own certificate.
    pub ca: Option<PathBuf>,
    pub shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    pub fn url(&self) -> String {
        format!("{}://{}", self.shared.cfg.scheme(), self.addr)
    }

    /// Stops serving. Everything accepted is already durable.
    pub fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    /// Until the server stops: Err when it had to (another server owns its store now).
    pub async fn wait(mut self) -> Result<(), ServerError> {
        let Some(serve) = self.tasks.pop() else {
            return Ok(());
        };
        tokio::select! {
            _ = serve => {}
            _ = self.shared.stopped.notified() => {}
        }
        let why = self.shared.superseded.lock().expect("lock").take();
        match why {
            Some(why) => {
                self.abort();
                Err(ServerError::Superseded(why))
            }
            None => Ok(()),
        }
    }
}

/// Who may call a route (see `route_rules`; the authorisation matrix test holds every
/// route to its rule with every kind of caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a token.
    Public,
    /// Any valid token: a tenant's, the admin's or an agent's (agents fetch checkpoints
    /// and working directories for the tasks they start).
    Any,
    /// A tenant or the admin; agent tokens are refused.
    User,
    /// The admin alone.
    Admin,
    /// An agent or the admin.
    Agent,
    /// The gateway: a service's own access rules (public, or its tenant's tokens).
    Gateway,
}

/// One method of one route and who may call it.
#[derive(Debug, Clone)]
pub struct RouteRule {
    pub method: &'static str,
    /// As the router has it (`{*rest}` for a wildcard).
    pub path: String,
    pub access: Access,
}

/// Routes with their rules and their OpenAPI description, all three from one place: a
/// route is added only as a handler's `#[utoipa::path]` (its method, path, parameters,
/// bodies and answers, with the wire types' own schemas) together with a rule for each
/// of the methods it documents. Routing, authorisation and documentation cannot drift
/// apart: a method documented without a rule, or ruled without being documented, stops
/// the server from building its router (and every test with it).
struct Routes {
    router: Router<Arc<Shared>>,
    rules: Vec<RouteRule>,
    doc: utoipa::openapi::OpenApi,
}

/// The methods a documented path has, upper case.
fn documented_methods(item: &utoipa::openapi::path::PathItem) -> Vec<&'static str> {
    [
        ("GET", &item.get),
        ("PUT", &item.put),
        ("POST", &item.post),
        ("DELETE", &item.delete),
        ("OPTIONS", &item.options),
        ("HEAD", &item.head),
        ("PATCH", &item.patch),
        ("TRACE", &item.trace),
    ]
    .into_iter()
    .filter(|(_, op)| op.is_some())
    .map(|(m, _)| m)
    .collect()
}

impl Routes {
    fn new() -> Routes {
        Routes {
            router: Router::new(),
            rules: Vec::new(),
            doc: utoipa::openapi::OpenApiBuilder::new().build(),
        }
    }

    /// A route from `routes!(handler, ...)` (one path), who may call each of its methods.
    fn add(
        self,
        route: utoipa_axum::router::UtoipaMethodRouter<Arc<Shared>>,
        rules: &[(&'static str, Access)],
    ) -> Routes {
        self.add_with(route, rules, |mr| mr)
    }

    /// `add`, with the method router changed first (a body limit, a catch-all).
    fn add_with(
        mut self,
        (schemas, paths, mr): utoipa_axum::router::UtoipaMethodRouter<Arc<Shared>>,
        rules: &[(&'static str, Access)],
        change: impl FnOnce(
            axum::routing::MethodRouter<Arc<Shared>>,
        ) -> axum::routing::MethodRouter<Arc<Shared>>,
    ) -> Routes {
        assert_eq!(
            paths.paths.len(),
            1,
            "one path per route: {:?}",
            paths.paths.keys()
        );
        let (path, item) = paths.paths.into_iter().next().expect("one path");
        let mut documented = documented_methods(&item);
        let mut ruled: Vec<&str> = rules.iter().map(|(m, _)| *m).collect();
        documented.sort_unstable();
        ruled.sort_unstable();
        // A catch-all (the gateway) is ruled once as ANY and documented method by method.
        let any = ruled == ["ANY"];
        assert!(
            any || documented == ruled,
            "{path}: documented methods {documented:?}, ruled methods {ruled:?}"
        );
        self.router = self.router.route(&path, change(mr));
        for &(method, access) in rules {
            self.rules.push(RouteRule {
                method,
                path: path.clone(),
                access,
            });
        }
        // OpenAPI names a wildcard segment like any other.
        let doc_path = path.replace("{*", "{");
        self.doc.paths.paths.insert(doc_path, item);
        self.doc
            .components
            .get_or_insert_with(utoipa::openapi::Components::new)
            .schemas
            .extend(schemas);
        self
    }

    fn merge(mut self, other: Routes) -> Routes {
        self.router = self.router.merge(other.router);
        self.rules.extend(other.rules);
        self.doc.merge(other.doc);
        self
    }
}

use utoipa_axum::routes;
use Access::*;

/// The API proper: answered only once what it saw and changed is durable.
fn api_routes() -> Routes {
    Routes::new()
        .add(routes!(api::whoami), &[("GET", Any)])
        .add(
            routes!(api::submit, api::list_jobs),
            &[("POST", User), ("GET", User)],
        )
        .add(routes!(api::get_job), &[("GET", User)])
        .add(routes!(api::cancel_job), &[("POST", User)])
        .add(routes!(api::job_logs), &[("GET", User)])
        .add(routes!(api::list_checkpoints), &[("GET", Any)])
        .add(routes!(api::checkpoint_cut), &[("GET", Any)])
        .add(routes!(api::get_job_workdir), &[("GET", Any)])
        .add(routes!(api::list_registries), &[("GET", User)])
        .add(
            routes!(api::put_registry, api::delete_registry),
            &[("PUT", User), ("DELETE", User)],
        )
        .add_with(
            routes!(api::has_workdir, api::put_workdir),
            &[("HEAD", User), ("PUT", User)],
            // The limit is the server's own (`--workdir-max-size`), checked as the body
            // streams in.
            |mr| mr.layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .add(
            routes!(api::get_checkpoint, api::put_checkpoint),
            &[("GET", Any), ("PUT", Agent)],
        )
        .add(routes!(api::list_nodes), &[("GET", User)])
        .add(routes!(api::drain_node), &[("POST", Admin)])
        .add(routes!(api::undrain_node), &[("POST", Admin)])
        .add(
            routes!(api::create_tenant, api::list_tenants),
            &[("POST", Admin), ("GET", User)],
        )
        .add(routes!(api::usage), &[("GET", User)])
        .add(routes!(api::agent_register), &[("POST", Agent)])
        .add(routes!(api::agent_sync), &[("POST", Agent)])
        .add(routes!(api::agent_events), &[("POST", Agent)])
        .add(routes!(api::agent_shutdown), &[("POST", Agent)])
        // A batch carries up to 4 MiB of output, base64.
        .add_with(routes!(api::agent_logs), &[("POST", Agent)], |mr| {
            mr.layer(axum::extract::DefaultBodyLimit::max(8 << 20))
        })
        .add(
            routes!(api::deploy_service, api::list_services),
            &[("POST", User), ("GET", User)],
        )
        .add(
            routes!(api::get_service, api::delete_service),
            &[("GET", User), ("DELETE", User)],
        )
}

/// Routes that show no stored state and must answer while the store is down.
fn open_routes() -> Routes {
    Routes::new()
        .add(routes!(api::healthz), &[("GET", Public)])
        .add(routes!(api::ca_pem), &[("GET", Public)])
        .add(routes!(api::metrics), &[("GET", Admin)])
        .add(routes!(api::openapi), &[("GET", Public)])
}

fn gateway_routes() -> Routes {
    const ANY: &[(&str, Access)] = &[("ANY", Gateway)];
    // Documented method by method; routed for every method there is.
    Routes::new()
        .add_with(routes!(gateway::route_root), ANY, |_| {
            any(gateway::route_root)
        })
        .add_with(routes!(gateway::route_root_slash), ANY, |_| {
            any(gateway::route_root_slash)
        })
        .add_with(routes!(gateway::route), ANY, |_| any(gateway::route))
}

/// The OpenAPI description of every route (`openapi::document` completes it).
pub fn route_doc() -> utoipa::openapi::OpenApi {
    api_routes()
        .merge(open_routes())
        .merge(gateway_routes())
        .doc
}

/// Every route the server has, each method with who may call it.
pub fn route_rules() -> Vec<RouteRule> {
    api_routes()
        .merge(open_routes())
        .merge(gateway_routes())
        .rules
}

pub fn router(shared: Arc<Shared>) -> Router {
    api_routes()
        .router
        .fallback(api::fallback)
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            settle_writes,
        ))
        // After that layer: these do not show stored state, and must answer while the
        // store is down.
        .merge(open_routes().router)
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            edge::limit,
        ))
        .layer(axum::middleware::from_fn(edge::json_errors))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            owner_gate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            count_requests,
        ))
        // After the layer: gateway traffic is counted per service, not as API requests.
        .merge(gateway_routes().router)
        // Outermost: a request that names its service in a header goes to it whatever
        // its path (gRPC methods live at the root).
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            gateway::route_by_header,
        ))
        .with_state(shared)
}

impl Shared {
    /// Whether this server may answer as the store's owner now (see `caravel_store::Lease`).
    pub fn answers(&self) -> bool {
        self.lease
            .lock()
            .expect("lease lock")
            .as_ref()
            .is_none_or(|l| l.valid())
    }
}

/// Answers 503 to everything (health checks, reads, agents' syncs) while this server
/// cannot be sure it still owns its store: another server may, and it must never be two
/// answering. Agents and clients given both servers move on to the next one.
async fn owner_gate(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if s.answers() {
        return next.run(req).await;
    }
    error::ApiError::new(
        caravel_core::ErrorCode::Unavailable,
        "this server cannot confirm that it owns its store (its database session may have ended, or it has just taken the store over): another server may be the owner; retry, or use the next server",
    )
    .into_response()
}

/// Holds every API answer until what the request saw and changed is durable (group
/// commit, see `committer`). Every change queued before the handler returned is covered,
/// so no client learns of a job, run or report that a crash could still lose. If those
/// changes were not written, or the store was reloaded while the request ran, the answer
/// is a 503 instead: the request may have seen memory the store no longer matches.
async fn settle_writes(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let before = s.durability.lock().expect("durability lock").clone();
    let resp = next.run(req).await;
    let after = s.durability.lock().expect("durability lock").clone();
    let settled = if Arc::ptr_eq(&before, &after) {
        after.settle(after.high()).await
    } else {
        Err(error::ApiError::new(
            caravel_core::ErrorCode::Unavailable,
            "the server reloaded its state from the store while this request ran; retry it",
        ))
    };
    match settled {
        Ok(()) => {
            if let Some(points) = resp.extensions().get::<fault::Points>() {
                for p in &points.0 {
                    fault::after_commit(p);
                }
            }
            resp
        }
        Err(e) => {
            // Wake the scheduling loop: it reloads memory from the store.
            s.sched_wake.notify_one();
            e.into_response()
        }
    }
}

async fn count_requests(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let resp = next.run(req).await;
    s.metrics
        .api_requests
        .get_or_create(&vec![
            ("method".to_string(), method),
            ("code".to_string(), resp.status().as_u16().to_string()),
        ])
        .inc();
    resp
}

pub fn refresh_gauges(s: &Shared) {
    s.metrics
        .log_bytes_stored
        .set(s.logs.stored_bytes().min(i64::MAX as u64) as i64);
    let core = s.core.lock().expect("core lock");
    s.metrics.queue_depth.set(core.pending_tasks() as i64);
    s.metrics.running_tasks.set(core.runs.len() as i64);
    for st in [NodeState::Ready, NodeState::Lost, NodeState::Down] {
        let n = core.nodes.values().filter(|e| e.node.state == st).count();
        s.metrics
            .nodes
            .get_or_create(&vec![("state".to_string(), st.as_str().to_string())])
            .set(n as i64);
    }
    // Lock order: core, then the storage count (as in the API's tenant views).
    let used = s.storage_used.lock().expect("lock");
    for t in core.tenants.values() {
        s.metrics
            .tenant_storage
            .get_or_create(&vec![("tenant".to_string(), t.name.clone())])
            .set(used.get(&t.id).copied().unwrap_or(0).min(i64::MAX as u64) as i64);
    }
    drop(used);
    drop(core);
    let open = s.conns.lock().expect("registry lock").open();
    s.metrics.connections_open.set(open as i64);
}

/// Opens the data directory and store, binds the listener and starts serving, scheduling
/// and checking liveness.
pub async fn start(cfg: ServerConfig) -> Result<Server, ServerError> {
    if cfg.standby && cfg.datastore == Datastore::Sqlite {
        return Err(ServerError::StandbyNeedsPostgres);
    }
    let dd = |source| ServerError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    };
    std::fs::create_dir_all(&cfg.data_dir).map_err(dd)?;
    // Tokens, the database (job secrets among it), checkpoints and task output: nobody
    // else on this machine reads any of it.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(dd)?;
    }
    // Before anything reads or writes the store: it has exactly one owner.
    let mut data_dir_lock = datadir::lock(&cfg.data_dir)?;
    let (store, tokens) = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || open_first(&cfg))
            .await
            .expect("opening the store panicked")?
    };
    let [(admin_token, admin_hash), (agent_token, agent_hash)] = tokens;
    let metrics = metrics::Metrics::new();
    let mut core = Core::load_with(store, now_ms(), metrics.commits.clone())?;
    core.ensure_default_tenant(now_ms())?;
    core.fair_share_half_life_ms = cfg.fair_share_half_life_ms;
    core.sched_cfg.las = cfg.las.clone();
    core.sched_cfg.reservations = cfg.reservations;
    core.starvation_ms = cfg.starvation_ms;
    core.elastic_grow_after_ms = cfg.elastic_grow_after_ms;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let (tls, ca) = match &cfg.tls {
        None => (None, None),
        Some(Tls::Files { cert, key }) => (Some(caravel_tls::server_config(cert, key)?), None),
        Some(Tls::SelfSigned { names }) => {
            let issued = caravel_tls::self_signed(
                &cfg.data_dir.join("tls"),
                &certificate_names(names, &cfg.gateway_domains, cfg.listen),
            )?;
            (
                Some(caravel_tls::server_config(&issued.cert, &issued.key)?),
                Some(issued.ca),
            )
        }
    };
    datadir::record_url(&mut data_dir_lock, &format!("{}://{addr}", cfg.scheme())).map_err(dd)?;
    let metrics_conn = (
        metrics.connections_evicted.clone(),
        metrics.connections_refused.clone(),
        metrics.api_rate_limited.clone(),
    );
    let shared = Arc::new(Shared {
        lease: Mutex::new(core.lease.clone()),
        durability: Mutex::new(core.durability()),
        core: Mutex::new(core),
        metrics,
        admin_hash,
        agent_hash,
        sched_wake: Notify::new(),
        cfg: cfg.clone(),
        http: reqwest::Client::new(),
        proxy: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .expect("building an HTTP client"),
        gateway: gateway::Gateway::new(&cfg.zone, &cfg.region),
        ca_pem: match &ca {
            Some(p) => Some(std::fs::read_to_string(p).map_err(|source| {
                ServerError::Tls(caravel_tls::TlsError::Read {
                    what: "CA certificate",
                    path: p.clone(),
                    source,
                })
            })?),
            None => None,
        },
        checkpoints: checkpoints::Checkpoints::open(
            cfg.checkpoint_root(),
            cfg.checkpoint_max_bytes,
        )?,
        logs: logs::Logs::open(cfg.log_root(), cfg.log_max_bytes)?,
        workdirs: workdirs::Workdirs::open(cfg.workdir_root(), cfg.workdir_max_bytes)?,
        storage_used: Mutex::new(std::collections::HashMap::new()),
        _data_dir_lock: data_dir_lock,
        superseded: Mutex::new(None),
        stopped: Notify::new(),
        conns: Arc::new(Mutex::new(serve::Registry::new(
            metrics_conn.0,
            metrics_conn.1,
        ))),
        rate: serve::RateLimiter::new(metrics_conn.2),
    });
    let sched = tokio::spawn(scheduling_loop(shared.clone()));
    let live = tokio::spawn(liveness_loop(shared.clone()));
    let ctrl = tokio::spawn(gateway::controller_loop(shared.clone()));
    let sweep = tokio::spawn(retention_sweep_loop(shared.clone()));
    count_storage(&shared);
    let storage = tokio::spawn(storage_loop(shared.clone()));
    let app = router(shared.clone());
    let (limits, conns) = (cfg.conn_limits.clone(), shared.conns.clone());
    let serve = match tls {
        Some(tls) => {
            // Handshakes off the accept loop, no Nagle (as below), plain HTTP answered.
            let listener = caravel_tls::TlsListener::new(listener, tls).map_err(|source| {
                ServerError::Listen {
                    addr: cfg.listen,
                    source,
                }
            })?;
            tokio::spawn(serve::serve(listener, app, limits, conns))
        }
        None => {
            // No Nagle: an HTTP/2 answer goes out as several small frames (headers, data,
            // trailers), and a frame held back for the peer's delayed ACK costs 40 ms.
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            tokio::spawn(serve::serve(listener, app, limits, conns))
        }
    };
    tracing::info!(%addr, scheme = cfg.scheme(), data_dir = %cfg.data_dir.display(), datastore = %cfg.datastore.redacted(), "caravel server listening");
    Ok(Server {
        addr,
        admin_token,
        agent_token,
        ca,
        shared,
        tasks: vec![sched, live, ctrl, sweep, storage, serve],
    })
}

/// The names a self-signed server certificate covers: the operator's, the gateway domains
/// and every service host under them (`*.DOMAIN`), then the loopback names, the host name
/// and the listen address when it is a specific one.
fn certificate_names(given: &[String], domains: &[String], listen: SocketAddr) -> Vec<String> {
    let mut names: Vec<String> = given.to_vec();
    names.extend(domains.iter().flat_map(|d| [format!("*.{d}"), d.clone()]));
    names.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
    if let Some(h) = host_name() {
        names.push(h);
    }
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.to_ascii_lowercase()));
    names
}

fn host_name() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let h = h.trim();
    caravel_tls::check_name(h).ok()?;
    Some(h.to_string())
}

/// Full scheduling passes (the whole queue) take at most about 1 / (1 + this) of the time.
const FULL_PASS_GAP_FACTOR: u32 = 3;

async fn scheduling_loop(s: Arc<Shared>) {
    let mut wait = Duration::from_secs(1);
    loop {
        tokio::select! {
            _ = s.sched_wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        let t0 = Instant::now();
        // Read before the core lock: a save holds the checkpoint index's lock while it
        // asks the core whether its run is still current.
        // Two statements: a temporary guard in one expression would live until its end,
        // holding the core lock while `saved_by_run` waits for the index lock, which a
        // save holds while it waits for the core lock (a deadlock seen in the gang tests).
        let stale = s.core.lock().expect("core lock").saved.0 != s.checkpoints.generation();
        let saved = stale.then(|| s.checkpoints.saved_by_run());
        let placed_now;
        let (res, needs_reload, due) = {
            let mut core = s.core.lock().expect("core lock");
            if let Some(saved) = saved {
                core.saved = saved;
            }
            let r = core.schedule(now_ms());
            placed_now = matches!(&r, Ok(st) if st.placed > 0);
            if r.is_ok() {
                if let Err(e) = core.grow_elastic(now_ms()) {
                    tracing::warn!("growing elastic gangs: {e}");
                }
            }
            if let Ok(st) = &r {
                if st.full {
                    let gap = t0.elapsed() * FULL_PASS_GAP_FACTOR;
                    core.set_full_pass_gap(gap.as_millis() as Millis);
                }
            }
            (r, core.needs_reload(), core.full_pass_due())
        };
        // A full pass wanted but spaced out runs when its gap has passed, not at the next
        // tick.
        wait = due
            .map(|d| Duration::from_millis((d - now_ms()).clamp(1, 1000) as u64))
            .unwrap_or(Duration::from_secs(1));
        if placed_now && fault::armed() {
            let d = s.durability.lock().expect("durability lock").clone();
            if d.settle(d.high()).await.is_ok() {
                fault::after_commit("schedule");
            }
        }
        if needs_reload && res.is_ok() {
            tracing::error!("a commit failed earlier; reloading state from the store");
            reload_off_runtime(&s).await;
        }
        match res {
            Ok(st) if st.considered_jobs > 0 => {
                s.metrics.sched_latency.observe(t0.elapsed().as_secs_f64());
                s.metrics.placements.inc_by(st.placed as u64);
                let pass = if st.full { "full" } else { "incremental" };
                s.metrics
                    .sched_passes
                    .get_or_create(&vec![("pass".to_string(), pass.to_string())])
                    .inc();
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "scheduling cycle failed; reloading state from the store");
                reload_off_runtime(&s).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Opens the store at start. A standby waits for the lock, and for the database to be
/// reachable, for as long as it takes.
fn open_first(cfg: &ServerConfig) -> Result<(Box<dyn Store>, [Token; 2]), ServerError> {
    let dd = |source| ServerError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    };
    let Datastore::Postgres(url) = &cfg.datastore else {
        let admin = auth::load_or_create(&cfg.data_dir.join("admin.token"), "cvadm").map_err(dd)?;
        let agent = auth::load_or_create(&cfg.data_dir.join("agent.token"), "cvagt").map_err(dd)?;
        let tokens = [admin, agent].map(|t| {
            let h = auth::hash_token(&t);
            (Some(t), h)
        });
        return Ok((open_store(cfg)?, tokens));
    };
    let mut store = if cfg.standby {
        tracing::info!(datastore = %cfg.datastore.redacted(), "standing by: waiting to own the store");
        loop {
            match PgStore::open_waiting(url, &owner(cfg), None) {
                Ok(s) => {
                    tracing::info!("this server owns the store now; taking over");
                    break s;
                }
                Err(caravel_store::StoreError::Unavailable(e)) => {
                    tracing::warn!(error = %e, "standing by: the database cannot be reached; retrying");
                    std::thread::sleep(Duration::from_secs(2));
                }
                Err(e) => return Err(e.into()),
            }
        }
    } else {
        PgStore::open(url, &owner(cfg))?
    };
    let tokens = shared_tokens(cfg, &mut store)?;
    Ok((Box::new(store), tokens))
}

/// A token where this server knows it, and its hash.
type Token = (Option<String>, String);

/// The admin and agent tokens of a pool on PostgreSQL: the database keeps their hashes,
/// the first server's tokens being the pool's, so every server on it accepts the same
/// ones. A token file in the data directory must match; a server that finds none writes
/// the new pool's tokens there, or (a standby) knows only the hashes.
fn shared_tokens(cfg: &ServerConfig, store: &mut PgStore) -> Result<[Token; 2], ServerError> {
    let dd = |source| ServerError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    };
    let mut offered = Vec::new();
    for (name, prefix) in [("admin", "cvadm"), ("agent", "cvagt")] {
        let path = cfg.data_dir.join(format!("{name}.token"));
        let (token, made) = match auth::read_token(&path).map_err(dd)? {
            Some(t) => (t, false),
            None => {
                // Written before it is offered: a crash in between must not leave a hash
                // in the database whose token nobody has.
                let t = auth::new_token(prefix);
                auth::write_token(&path, &t).map_err(dd)?;
                (t, true)
            }
        };
        offered.push((name, path, token, made));
    }
    let stored = store.shared_secrets(
        offered
            .iter()
            .map(|(name, _, t, _)| (name.to_string(), auth::hash_token(t)))
            .collect(),
    )?;
    let matches = |name: &str, token: &str| {
        auth::ct_eq(
            stored.get(name).map(String::as_str).unwrap_or_default(),
            &auth::hash_token(token),
        )
    };
    let refused = offered
        .iter()
        .find(|(name, _, token, made)| !made && !matches(name, token))
        .map(|(_, path, _, _)| path.clone());
    let mut out = Vec::new();
    for (name, path, token, made) in offered {
        if made && (refused.is_some() || !matches(name, &token)) {
            // Not this pool's token (it had its own), or the start is refused: leave no
            // file behind that the next start would have to refuse.
            std::fs::remove_file(&path).map_err(dd)?;
        }
        let hash = stored.get(name).cloned().unwrap_or_default();
        out.push((matches(name, &token).then_some(token), hash));
    }
    if let Some(path) = refused {
        return Err(ServerError::TokenMismatch { path });
    }
    let [admin, agent]: [Token; 2] = out.try_into().expect("two tokens");
    Ok([admin, agent])
}

fn owner(cfg: &ServerConfig) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "an unknown host".into());
    format!("{host} (data directory {})", cfg.data_dir.display())
}

/// Opens the configured store. A PostgreSQL store is this server's while it is open.
fn open_store(cfg: &ServerConfig) -> Result<Box<dyn Store>, caravel_store::StoreError> {
    Ok(match &cfg.datastore {
        Datastore::Sqlite => Box::new(SqliteStore::open(
            &cfg.data_dir.join("caravel.db"),
            cfg.sync,
        )?),
        Datastore::Postgres(url) => Box::new(PgStore::open(url, &owner(cfg))?),
    })
}

/// `reload` on a blocking thread: reopening may wait seconds for the store's lock, and a
/// runtime worker blocked that long strands the requests queued on it (a task in a
/// worker's LIFO slot cannot be stolen), so a server that should answer 503 at once
/// would hang its callers instead.
async fn reload_off_runtime(s: &Arc<Shared>) {
    let s = s.clone();
    let _ = tokio::task::spawn_blocking(move || reload(&s)).await;
}

/// After a failed commit memory may be ahead of the store (and a PostgreSQL connection
/// may be gone): close the store, open it again and rebuild memory from it. Until that
/// succeeds writes are refused and the next cycle tries again.
fn reload(s: &Shared) {
    // Closed first, outside the reopen: the old session must end before a new one can
    // take the lock, and requests must not wait on a reconnect.
    s.core.lock().expect("core lock").close_store();
    let store = match open_store(&s.cfg) {
        Ok(st) => st,
        Err(caravel_store::StoreError::Owned(who)) => {
            // Cut off from the database long enough for a standby to take over: what is
            // in memory may already be stale, and nothing can be written. Stop.
            tracing::error!("{who}: another server took over this store; stopping");
            *s.superseded.lock().expect("lock") = Some(who);
            s.stopped.notify_one();
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot reopen the store");
            return;
        }
    };
    match Core::load_with(store, now_ms(), s.metrics.commits.clone()) {
        Ok(mut c) => {
            c.fair_share_half_life_ms = s.cfg.fair_share_half_life_ms;
            c.sched_cfg.las = s.cfg.las.clone();
            c.sched_cfg.reservations = s.cfg.reservations;
            c.starvation_ms = s.cfg.starvation_ms;
            c.elastic_grow_after_ms = s.cfg.elastic_grow_after_ms;
            let d = c.durability();
            let lease = c.lease.clone();
            let mut core = s.core.lock().expect("core lock");
            *core = c;
            *s.lease.lock().expect("lease lock") = lease;
            // Swapped while the core lock is held, so a request that saw the old core
            // finds the old committer and is refused (see `settle_writes`).
            *s.durability.lock().expect("durability lock") = d;
        }
        Err(e) => tracing::error!(error = %e, "cannot reload state"),
    }
}

/// Removes the checkpoints and the output of jobs that finished more than their retention
/// ago, and of jobs the store no longer has.
async fn retention_sweep_loop(s: Arc<Shared>) {
    fn past(
        s: &Shared,
        jobs: Vec<caravel_core::JobId>,
        retention_ms: u64,
    ) -> Vec<caravel_core::JobId> {
        let now = now_ms();
        let core = s.core.lock().expect("core lock");
        jobs.into_iter()
            .filter(|j| match core.jobs.get(j) {
                None => true,
                Some(e) => e
                    .rec
                    .finished_ms
                    .is_some_and(|f| now.saturating_sub(f) >= retention_ms as i64),
            })
            .collect()
    }
    loop {
        for j in past(&s, s.checkpoints.jobs(), s.cfg.checkpoint_retention_ms) {
            tracing::info!(job = %j, "removing the checkpoints of a job past their retention");
            s.checkpoints.remove_job(j);
        }
        for j in past(&s, s.logs.jobs(), s.cfg.log_retention_ms) {
            tracing::info!(job = %j, "removing the output of a job past its retention");
            s.logs.remove_job(j);
        }
        // Working directories: kept while a live job or a service names one, and for the
        // retention after their last use.
        let keep = {
            let core = s.core.lock().expect("core lock");
            core.workdirs_in_use()
        };
        let gone = s
            .workdirs
            .collect(&keep, now_ms(), s.cfg.workdir_retention_ms);
        if gone > 0 {
            tracing::info!(gone, "removed working directories past their retention");
        }
        let every = s.cfg.checkpoint_retention_ms.min(s.cfg.log_retention_ms);
        tokio::time::sleep(Duration::from_secs(60).min(Duration::from_millis(every.max(1000))))
            .await;
    }
}

/// Counts the bytes of checkpoints, task output and working directories each tenant has
/// kept.
pub fn count_storage(s: &Shared) {
    let mut by_job = s.logs.bytes_by_job();
    for (j, b) in s.checkpoints.bytes_by_job() {
        *by_job.entry(j).or_default() += b;
    }
    let mut by_tenant = s.workdirs.bytes_by_tenant();
    {
        let core = s.core.lock().expect("core lock");
        for (j, b) in by_job {
            if let Some(e) = core.jobs.get(&j) {
                *by_tenant.entry(e.rec.tenant).or_default() += b;
            }
        }
    }
    *s.storage_used.lock().expect("lock") = by_tenant;
}

/// What a tenant may still store: `None` when its quota sets no storage cap.
pub fn storage_left(s: &Shared, core: &Core, tenant: caravel_core::TenantId) -> Option<(u64, u64)> {
    let limit = core.tenants.get(&tenant)?.quota.storage_bytes?;
    let used = s
        .storage_used
        .lock()
        .expect("lock")
        .get(&tenant)
        .copied()
        .unwrap_or(0);
    Some((used, limit))
}

/// Every 2 s: counts each tenant's storage, and makes the output appended since the last
/// time durable (`Logs::sync`; agents check a run's output is still whole 10 s after it
/// was acknowledged, before they remove their copy).
async fn storage_loop(s: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let s2 = s.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = s2.logs.sync() {
                tracing::warn!("syncing task output to disk: {e}");
            }
            count_storage(&s2);
        })
        .await;
    }
}

async fn liveness_loop(s: Arc<Shared>) {
    let period = Duration::from_millis((s.cfg.lost_after_ms / 4).clamp(50, 1000));
    let mut answering = true;
    loop {
        tokio::time::sleep(period).await;
        // Not answering (store lease not valid): agents could not report here.
        if !s.answers() {
            answering = false;
            continue;
        }
        if !answering {
            answering = true;
            s.core.lock().expect("core lock").forgive_silence(now_ms());
            continue;
        }
        let res = s
            .core
            .lock()
            .expect("core lock")
            .check_liveness(now_ms(), s.cfg.lost_after_ms as i64);
        match res {
            Ok(lost) if !lost.is_empty() => s.sched_wake.notify_one(),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "liveness check failed"),
        }
    }
}
