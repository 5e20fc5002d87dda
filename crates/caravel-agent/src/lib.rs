//! The Caravel node agent. It registers the machine, long-polls the server for the runs
//! that should be on this node, starts each as a real OS process (own process group, own
//! working directory, stdout/stderr to files, cgroup limits where available), enforces max
//! runtime, stops what the server no longer wants (SIGTERM, grace, SIGKILL), and reports
//! every start and exit until the server acknowledges it.
//!
//! It talks to the server only through the public `/v1/agent` API and must not depend on
//! the server crate. When the server is unreachable it keeps its tasks running and queues
//! their reports; when the server is back it reconciles.

pub mod cgroups;
pub mod checkpoint;
pub mod devfilter;
use checkpoint::Restore;
use rustix::process::Signal;
pub mod discover;
pub mod fence;
pub mod oci;
pub mod sandbox;
mod ship;
pub mod spawn;
mod workdir;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use caravel_core::api::*;
use caravel_core::{Capacity, Device, IsolationLevel, Millis, NodeId, RunId, Topology};
use tokio::sync::{oneshot, Notify};

pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as Millis
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The server's URL, or several separated by commas (a server and its standbys): the
    /// agent moves to the next one whenever the one it talks to cannot be reached.
    pub server: String,
    pub token: String,
    pub name: String,
    pub topology: Topology,
    pub labels: BTreeMap<String, String>,
    pub cpu_milli: Option<u64>,
    pub memory_bytes: Option<u64>,
    /// Declared GPUs (model, count) on top of what NVML finds.
    pub gpus: Vec<(String, u32)>,
    pub work_dir: PathBuf,
    pub listen: SocketAddr,
    /// Address other machines use to reach this one; found from the route to the server
    /// when not given.
    pub advertise: Option<String>,
    pub use_cgroups: bool,
    /// The folder of this agent's cgroups (`<root>/caravel/<this>`), where a restarted
    /// agent finds and kills what its previous life left. `None`: the node name. Two
    /// agents on one machine must not share it, or each kills the other's tasks at start.
    pub cgroup_name: Option<String>,
    /// CA certificates (PEM) that `https` servers are checked against instead of the
    /// system's roots: a self-signed pool's `DATA_DIR/tls/ca.pem`.
    pub ca: Option<PathBuf>,
    /// Instead of `ca`: the SHA-256 of a self-signed pool's CA, fetched from the server and
    /// kept only if it matches (`caravel_tls::fetch_pinned_ca`).
    pub ca_sha256: Option<String>,
    /// How often runs' output goes to the server (also soon after each run ends).
    pub log_ship_every: Duration,
    /// How long an ended run's folder may stay on this node: it goes as soon as the server
    /// holds all its output, and after this at the latest.
    pub run_retention: Duration,
    /// Sandbox tasks where this agent can (root); false runs every task as the agent's
    /// user, unconfined (isolation level `none`).
    pub sandbox: bool,
    /// The uids tasks run as, one per tenant.
    pub task_uids: sandbox::UidRange,
    /// Host paths every task gets (`--task-mount`).
    pub task_mounts: Vec<sandbox::TaskMount>,
    /// Ephemeral disk a task may fill when its job does not say.
    pub task_disk_bytes: u64,
    /// Most processes (and threads) one task may have at once.
    pub task_pids: u64,
    /// A device file for each GPU declared with `gpus`, in order (`--gpu-devices`).
    pub gpu_devices: Vec<PathBuf>,
    /// The OCI runtime for tasks in images: `auto` (crun, runc or youki, the first
    /// found), `none`, a name on the `PATH` or a path.
    pub oci_runtime: String,
    /// How much unpacked image layers the node keeps.
    pub image_cache_bytes: u64,
    /// Registries reached over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// The ports a gang's rank 0 may listen on (`SyncRequest::free_ports`).
    pub master_ports: (u16, u16),
    /// The program that enforces fenced runs' deadline when the agent cannot (see
    /// `fence`): run as `EXE __fence-watchdog DIR`. None: only the agent's own loop
    /// fences (a frozen agent's fenced runs outlive the deadline).
    pub watchdog_exe: Option<PathBuf>,
}

impl AgentConfig {
    /// A configuration with every optional setting at its default.
    pub fn new(server: String, token: String, name: String, work_dir: PathBuf) -> AgentConfig {
        AgentConfig {
            server,
            token,
            name,
            topology: Topology::default(),
            labels: BTreeMap::new(),
            cpu_milli: None,
            memory_bytes: None,
            gpus: vec![],
            work_dir,
            listen: "0.0.0.0:0".parse().expect("addr"),
            advertise: None,
            use_cgroups: true,
            cgroup_name: None,
            ca: None,
            ca_sha256: None,
            log_ship_every: Duration::from_secs(2),
            run_retention: Duration::from_secs(24 * 3600),
            sandbox: true,
            task_uids: sandbox::UidRange::DEFAULT,
            task_mounts: vec![],
            task_disk_bytes: DEFAULT_TASK_DISK,
            task_pids: DEFAULT_TASK_PIDS,
            gpu_devices: vec![],
            oci_runtime: "auto".into(),
            image_cache_bytes: DEFAULT_IMAGE_CACHE,
            insecure_registries: vec![],
            master_ports: (29500, 31499),
            watchdog_exe: None,
        }
    }
}

/// Unpacked image layers a node keeps by default.
pub const DEFAULT_IMAGE_CACHE: u64 = 20 << 30;

/// Ephemeral disk per task by default.
pub const DEFAULT_TASK_DISK: u64 = 10 << 30;
/// Processes per task by default (OpenShift's pod default; a data loader with many
/// workers and threads stays well below it, a fork bomb stops there).
pub const DEFAULT_TASK_PIDS: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("work directory {path}: {source}")]
    WorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("bad server URL `{0}`: expected http(s)://HOST:PORT[,http(s)://HOST:PORT...]")]
    ServerUrl(String),
    #[error("--ca: {0}")]
    Ca(caravel_tls::TlsError),
    #[error("--ca-sha256: {0}")]
    CaPin(caravel_tls::TlsError),
    #[error("TLS for the log endpoint: {0}")]
    Tls(caravel_tls::TlsError),
    #[error("sandbox: {0}")]
    Sandbox(String),
}

/// Why a run is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The server no longer wants it, or the agent is leaving: SIGTERM, grace, SIGKILL.
    Asked,
    /// The agent has been cut off from the server for nearly the lost timeout: SIGKILL now,
    /// before the server may start the run elsewhere.
    Fence,
}

struct Running {
    stop: Option<oneshot::Sender<Stop>>,
    kill_grace_ms: u64,
    fence: bool,
}

struct State_ {
    running: HashMap<RunId, Running>,
    /// Every run id this agent ever started: a run id is never started twice.
    started: HashSet<RunId>,
    outbox: Vec<RunEvent>,
}

pub struct Agent {
    cfg: AgentConfig,
    http: reqwest::Client,
    /// For checkpoints: no bound on the whole transfer (it may be gigabytes), only on
    /// each read.
    bulk: reqwest::Client,
    cgroups: cgroups::Cgroups,
    /// SHA-256 of the log endpoint's certificate, when it serves https.
    cert_sha256: Option<String>,
    /// When the newest request that a server answered with success was sent: the server
    /// heard from this node no earlier than that.
    contact: Mutex<Option<std::time::Instant>>,
    /// The server's lost timeout (`RegisterResponse::lost_after_ms`; 0: not known).
    lost_after_ms: std::sync::atomic::AtomicU64,
    secret: String,
    instance: String,
    st: Mutex<State_>,
    outbox_wake: Notify,
    /// A gang run saved its checkpoint: sync now rather than at the end of the long poll,
    /// so the run answers the question its own save raised (see `confirm`) at once.
    pub(crate) sync_wake: Notify,
    /// The id the server gave this agent at its last registration.
    node: Mutex<Option<NodeId>>,
    /// Shutting down: start nothing new.
    closing: std::sync::atomic::AtomicBool,
    capacity: Capacity,
    agent_url: String,
    address: String,
    /// `cfg.server` split; `current` indexes the one in use.
    servers: Vec<String>,
    current: std::sync::atomic::AtomicUsize,
    /// Runs whose output is shipped to the server (see `ship`).
    ship: Mutex<BTreeMap<RunId, ship::Shipping>>,
    ship_wake: Notify,
    /// The most bytes the server keeps per stream (learnt from its answers).
    log_limit: std::sync::atomic::AtomicU64,
    /// Finished run folders are emptied and reused (only where cgroups kill every process
    /// of a run, so none can still write to them).
    reuse_run_dirs: bool,
    spares: Mutex<ship::Spares>,
    /// Set when tasks here are sandboxed.
    sandbox: Option<sandbox::Runtime>,
    /// Where every task's process is started (never on the runtime's workers).
    spawner: spawn::Spawner,
    /// Shipped working directories being fetched.
    workdirs: workdir::Cache,
    /// Gang runs' checkpoint folders as last saved or restored, for the server's
    /// questions (`SyncResponse::confirm`).
    parts: Mutex<HashMap<RunId, Arc<Mutex<checkpoint::Part>>>>,
    /// Answers to send with the next sync.
    still: Mutex<Vec<CheckpointStill>>,
    /// What this node gives, as registered.
    isolation: sandbox::Capability,
    /// Set when tasks may run in images here.
    images: Option<(Arc<oci::Images>, oci::runtime::OciRuntime)>,
    /// The lease and targets the fence watchdog enforces (None: no watchdog runs).
    fence: Option<Arc<fence::Fence>>,
}

/// Delays for a retry loop: from `min_ms`, doubling to `max_ms`, each with up to as much
/// again of random jitter, so agents cut off together do not come back in step (a
/// restarted server would otherwise meet every agent's retry at the same instants).
pub(crate) fn retry_delays(min_ms: u64, max_ms: u64) -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(min_ms))
        .with_max_delay(Duration::from_millis(max_ms))
        .with_jitter()
        .without_max_times()
        .build()
}

/// The URLs of `--server URL[,URL...]`, each checked.
pub fn server_urls(list: &str) -> Result<Vec<String>, AgentError> {
    let urls: Vec<String> = list
        .split(',')
        .map(|u| u.trim().trim_end_matches('/').to_string())
        .collect();
    for u in &urls {
        if !u.starts_with("http://") && !u.starts_with("https://") {
            return Err(AgentError::ServerUrl(u.clone()));
        }
    }
    Ok(urls)
}

/// The pool CA from the first server that answers, checked against `pin`. A server that
/// cannot be reached yet is tried again (the agent may start first); a CA that does not
/// match is an error at once.
async fn pinned_ca(
    servers: &[String],
    pin: &str,
) -> Result<Vec<caravel_tls::rustls::pki_types::CertificateDer<'static>>, AgentError> {
    let mut delays = retry_delays(100, 2_000);
    loop {
        for s in servers {
            match caravel_tls::fetch_pinned_ca(s, pin).await {
                Ok(pem) => {
                    tracing::info!(server = %s, "pool CA fetched and matches --ca-sha256");
                    return Ok(caravel_tls::pem_roots(pem.as_bytes()));
                }
                Err(e @ caravel_tls::TlsError::Refused(_)) => return Err(AgentError::CaPin(e)),
                Err(e) => tracing::warn!("cannot fetch the pool CA yet: {e}"),
            }
        }
        tokio::time::sleep(delays.next().expect("endless")).await;
    }
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("the OS has randomness");
    hex::encode(b)
}

/// Finds the local address used to reach `host:port` (no packet is sent).
fn local_addr_towards(server: &str) -> Option<String> {
    let rest = server.split("://").nth(1)?;
    let hostport = rest.split('/').next()?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport)
        .ok()?
        .next()?;
    let sock = std::net::UdpSocket::bind(if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .ok()?;
    sock.connect(addr).ok()?;
    Some(sock.local_addr().ok()?.ip().to_string())
}

impl Agent {
    pub fn capacity(&self) -> &Capacity {
        &self.capacity
    }

    pub fn cgroups(&self) -> &cgroups::Cgroups {
        &self.cgroups
    }

    pub fn isolation(&self) -> &sandbox::Capability {
        &self.isolation
    }
}

/// Starts the agent: binds its log endpoint, then registers and serves forever.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    let agent = start(cfg).await?;
    agent.main_loop().await;
    Ok(())
}

/// Prepares the agent and its log endpoint; `main_loop` does the rest.
pub async fn start(cfg: AgentConfig) -> Result<Arc<Agent>, AgentError> {
    let servers = server_urls(&cfg.server)?;
    let wd = |source| AgentError::WorkDir {
        path: cfg.work_dir.clone(),
        source,
    };
    std::fs::create_dir_all(cfg.work_dir.join("runs")).map_err(wd)?;
    let cfg_runs = cfg.work_dir.join("runs");
    let cg = if cfg.use_cgroups {
        cgroups::Cgroups::detect(cfg.cgroup_name.as_deref().unwrap_or(&cfg.name))
    } else {
        cgroups::Cgroups::None {
            why: "disabled with --no-cgroups".into(),
        }
    };
    match &cg {
        cgroups::Cgroups::None { why } => {
            tracing::warn!("WARNING: tasks on this node run WITHOUT cpu and memory limits: {why}")
        }
        other => tracing::info!("resource limits through {}", other.describe()),
    }
    let reuse_run_dirs = !matches!(cg, cgroups::Cgroups::None { .. });
    let reaped = cg.reap_leftovers();
    if reaped > 0 {
        tracing::warn!(
            killed = reaped,
            "killed processes left by an earlier agent of this name"
        );
    }
    let (mut devices, nvidia): (Vec<Device>, Vec<(u32, u32)>) = match discover::nvml_devices() {
        Ok(d) => {
            tracing::info!(gpus = d.len(), "NVML found GPUs");
            let minors = d
                .iter()
                .map(|(dev, m)| (dev.index, m.unwrap_or(dev.index)))
                .collect();
            (d.into_iter().map(|(dev, _)| dev).collect(), minors)
        }
        Err(why) => {
            tracing::info!("no NVIDIA GPUs discovered: {why}");
            (vec![], vec![])
        }
    };
    let mut next = devices.iter().map(|d| d.index + 1).max().unwrap_or(0);
    for (model, count) in &cfg.gpus {
        for _ in 0..*count {
            devices.push(Device {
                index: next,
                model: model.clone(),
            });
            next += 1;
        }
    }
    let declared: Vec<u32> = devices
        .iter()
        .map(|d| d.index)
        .filter(|i| !nvidia.iter().any(|(n, _)| n == i))
        .collect();
    if cfg.gpu_devices.len() > declared.len() {
        return Err(AgentError::Sandbox(format!(
            "--gpu-devices names {} files for {} declared GPUs",
            cfg.gpu_devices.len(),
            declared.len()
        )));
    }
    let gpus = sandbox::devices::GpuDevices::discover(
        &nvidia,
        &declared
            .iter()
            .copied()
            .zip(cfg.gpu_devices.iter().cloned())
            .collect::<Vec<_>>(),
    )
    .map_err(AgentError::Sandbox)?;
    let (sandbox_rt, isolation) = if !cfg.sandbox {
        (
            None,
            sandbox::Capability {
                level: IsolationLevel::None,
                missing: vec!["sandboxing is off (--sandbox off)".into()],
            },
        )
    } else {
        match sandbox::Runtime::new(
            &cfg.work_dir,
            cfg.task_uids,
            cfg.task_mounts.clone(),
            gpus,
            &cg.controller_names(),
        ) {
            Ok(rt) => match probe(&rt, &cfg.work_dir).await {
                Ok(()) => {
                    let mut missing = cg.missing();
                    if !rt.seccomp() {
                        missing.push("a seccomp filter (none for this architecture)".into());
                    }
                    let level = if missing.is_empty() {
                        IsolationLevel::Restricted
                    } else {
                        IsolationLevel::Sandboxed
                    };
                    (Some(rt), sandbox::Capability { level, missing })
                }
                Err(e) => (
                    None,
                    sandbox::Capability {
                        level: IsolationLevel::None,
                        missing: vec![format!("a sandbox: trying one failed: {e}")],
                    },
                ),
            },
            Err(e) => (
                None,
                sandbox::Capability {
                    level: IsolationLevel::None,
                    missing: vec![e],
                },
            ),
        }
    };
    let mut isolation = isolation;
    let images = match &sandbox_rt {
        None => None,
        Some(_) if cfg.oci_runtime == "none" => {
            isolation
                .missing
                .push("tasks in images (--oci-runtime none)".into());
            None
        }
        Some(_) => match image_support(&cfg, &cg).await {
            Ok(x) => Some(x),
            Err(e) => {
                isolation.missing.push(format!("tasks in images: {e}"));
                None
            }
        },
    };
    if let Some((_, rt)) = &images {
        tracing::info!(runtime = %rt.describe(), "tasks may run in OCI images");
    }
    match isolation.level {
        IsolationLevel::Restricted => tracing::info!(
            uids = %cfg.task_uids,
            "tasks run sandboxed (isolation restricted): a uid per tenant, own namespaces, no capabilities, seccomp, cgroup and disk limits"
        ),
        level => tracing::warn!(
            "WARNING: tasks on this node get isolation `{level}`, missing: {}",
            isolation.missing.join("; ")
        ),
    }
    let capacity = Capacity {
        isolation: isolation.level,
        images: images.is_some(),
        cpu_milli: cfg.cpu_milli.unwrap_or_else(discover::cpus_milli),
        memory_bytes: cfg.memory_bytes.unwrap_or_else(discover::memory_bytes),
        devices,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let port = listener
        .local_addr()
        .map_err(|source| AgentError::Listen {
            addr: cfg.listen,
            source,
        })?
        .port();
    let address = cfg
        .advertise
        .clone()
        .or_else(|| local_addr_towards(&servers[0]))
        .unwrap_or_else(|| "127.0.0.1".into());
    // With TLS to the server, the log endpoint (which the server calls with the agent's
    // secret) is TLS too, with a certificate made now and pinned by the server.
    let endpoint_tls = if servers.iter().any(|u| u.starts_with("https://")) {
        let name = if caravel_tls::check_name(&address).is_ok() {
            address.clone()
        } else {
            "caravel-agent".to_string()
        };
        Some(caravel_tls::ephemeral(&[name]).map_err(AgentError::Tls)?)
    } else {
        None
    };
    let mut http = reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        // Well inside the server's idle timeout (`--header-timeout`, 15 s): a connection
        // is never reused just as the server closes it.
        .pool_idle_timeout(Duration::from_secs(5))
        // A server whose machine vanished answers nothing: move on to the next soon.
        .connect_timeout(Duration::from_secs(3));
    let mut bulk = reqwest::Client::builder()
        .read_timeout(Duration::from_secs(60))
        .connect_timeout(Duration::from_secs(3));
    let roots = match (&cfg.ca, &cfg.ca_sha256) {
        (Some(ca), _) => Some(caravel_tls::ca_roots(ca).map_err(AgentError::Ca)?),
        (None, Some(pin)) => Some(pinned_ca(&servers, pin).await?),
        (None, None) => None,
    };
    if let Some(roots) = roots {
        let certs = || {
            roots
                .iter()
                .map(|c| reqwest::Certificate::from_der(c).expect("a parsed certificate"))
        };
        http = http.tls_certs_only(certs());
        bulk = bulk.tls_certs_only(certs());
    }
    let fence = match &cfg.watchdog_exe {
        Some(exe) => {
            let f = Arc::new(fence::Fence::open(&cfg.work_dir.join("fence")).map_err(wd)?);
            match f.start_watchdog(exe) {
                Ok(child) => {
                    fence::supervise(f.clone(), exe.clone(), child);
                    Some(f)
                }
                Err(e) => {
                    tracing::warn!("fence: cannot start the watchdog {}: {e}; fenced runs depend on this process alone", exe.display());
                    None
                }
            }
        }
        None => None,
    };
    let agent = Arc::new(Agent {
        agent_url: format!(
            "{}://{address}:{port}",
            if endpoint_tls.is_some() {
                "https"
            } else {
                "http"
            }
        ),
        address,
        http: http.build().expect("http client"),
        bulk: bulk.build().expect("http client"),
        cgroups: cg,
        cert_sha256: endpoint_tls.as_ref().map(|(_, fp)| fp.clone()),
        contact: Mutex::new(None),
        lost_after_ms: std::sync::atomic::AtomicU64::new(0),
        secret: random_hex(32),
        instance: random_hex(8),
        st: Mutex::new(State_ {
            running: HashMap::new(),
            started: HashSet::new(),
            outbox: Vec::new(),
        }),
        outbox_wake: Notify::new(),
        sync_wake: Notify::new(),
        node: Mutex::new(None),
        closing: std::sync::atomic::AtomicBool::new(false),
        capacity,
        cfg,
        servers,
        current: std::sync::atomic::AtomicUsize::new(0),
        ship: Mutex::new(BTreeMap::new()),
        ship_wake: Notify::new(),
        log_limit: std::sync::atomic::AtomicU64::new(u64::MAX),
        reuse_run_dirs,
        spares: Mutex::new(ship::Spares::open(&cfg_runs)),
        sandbox: sandbox_rt,
        isolation,
        // A sandboxed start spends most of its time asleep (unmounting the host's tree
        // from the task's namespace waits for an RCU grace period): more threads than
        // CPUs keep the CPUs busy.
        spawner: spawn::Spawner::new(SPAWNER_THREADS),
        workdirs: Default::default(),
        parts: Default::default(),
        still: Default::default(),
        images,
        fence,
    });
    agent.ship_recover(&agent.cfg.work_dir.join("runs"));
    let app = axum::Router::new()
        .route("/runs/{run}/{stream}", axum::routing::get(serve_log))
        .with_state(agent.clone());
    match endpoint_tls {
        Some((tls, _)) => {
            let listener = caravel_tls::TlsListener::new(listener, tls).map_err(|source| {
                AgentError::Listen {
                    addr: agent.cfg.listen,
                    source,
                }
            })?;
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
        }
        None => {
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
        }
    }
    Ok(agent)
}

#[derive(serde::Deserialize)]
struct LogQ {
    offset: Option<u64>,
}

const LOG_CHUNK: u64 = 1 << 20;

async fn serve_log(
    State(a): State<Arc<Agent>>,
    headers: HeaderMap,
    Path((run, stream)): Path<(u64, String)>,
    Query(q): Query<LogQ>,
) -> Response {
    let ok = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t == a.secret);
    if !ok {
        return (StatusCode::UNAUTHORIZED, "bad token").into_response();
    }
    if stream != "stdout" && stream != "stderr" {
        return (StatusCode::BAD_REQUEST, "stream must be stdout or stderr").into_response();
    }
    let dir = a.cfg.work_dir.join("runs").join(run.to_string());
    // No folder: the run has not started here, or its folder was removed (its output is
    // on the server then).
    if !dir.is_dir() {
        return (StatusCode::NOT_FOUND, "no such run on this node").into_response();
    }
    let path = dir.join(format!("{stream}.log"));
    let offset = q.offset.unwrap_or(0);
    // An offset past the end reads from the end: how `--tail` finds it.
    let data = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, u64, Vec<u8>)> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0, Vec::new())),
            Err(e) => return Err(e),
        };
        let len = f.metadata()?.len();
        let from = offset.min(len);
        f.seek(SeekFrom::Start(from))?;
        let mut buf = Vec::new();
        f.take(LOG_CHUNK).read_to_end(&mut buf)?;
        Ok((from, len.max(from + buf.len() as u64), buf))
    })
    .await;
    match data {
        Ok(Ok((from, end, buf))) => {
            let next = from + buf.len() as u64;
            (
                [
                    ("x-caravel-next-offset", next.to_string()),
                    ("x-caravel-log-end", end.to_string()),
                ],
                buf,
            )
                .into_response()
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "cannot read log").into_response(),
    }
}

impl Agent {
    fn server(&self) -> (usize, &str) {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed) % self.servers.len();
        (i, &self.servers[i])
    }

    /// After server `i` failed to answer: use the next one (unless another call moved on
    /// already).
    fn next_server(&self, i: usize) {
        if self.servers.len() < 2 {
            return;
        }
        let next = (i + 1) % self.servers.len();
        if self
            .current
            .compare_exchange(
                i,
                next,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
        {
            tracing::warn!(
                "server {} does not answer; trying {}",
                self.servers[i],
                self.servers[next]
            );
        }
    }

    async fn post<T: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<R, (Option<u16>, String)> {
        let (i, server) = self.server();
        let sent = std::time::Instant::now();
        let resp = match self
            .http
            .post(format!("{server}{path}"))
            .bearer_auth(&self.cfg.token)
            .json(body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.next_server(i);
                return Err((None, e.to_string()));
            }
        };
        let status = resp.status();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // Its store is out of reach: a standby may own it by now.
            self.next_server(i);
        }
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err((Some(status.as_u16()), text));
        }
        {
            let mut c = self.contact.lock().expect("lock");
            if c.is_none_or(|c| c < sent) {
                *c = Some(sent);
            }
        }
        self.renew_fence(sent);
        if status == StatusCode::NO_CONTENT {
            return serde_json::from_str("null").map_err(|e| (None, e.to_string()));
        }
        resp.json::<R>().await.map_err(|e| (None, e.to_string()))
    }

    async fn register(&self) -> NodeId {
        let mut delays = retry_delays(100, 2_000);
        loop {
            let running: Vec<RunId> = self
                .st
                .lock()
                .expect("lock")
                .running
                .keys()
                .copied()
                .collect();
            let req = RegisterRequest {
                name: self.cfg.name.clone(),
                address: self.address.clone(),
                agent_url: self.agent_url.clone(),
                agent_secret: self.secret.clone(),
                agent_cert_sha256: self.cert_sha256.clone(),
                instance: self.instance.clone(),
                topology: self.cfg.topology.clone(),
                labels: self.cfg.labels.clone(),
                capacity: self.capacity.clone(),
                running,
                isolation_missing: self.isolation.missing.clone(),
            };
            match self
                .post::<_, RegisterResponse>("/v1/agent/register", &req)
                .await
            {
                Ok(r) => {
                    tracing::info!(node_id = %r.node_id, "registered with {}", self.server().1);
                    self.lost_after_ms
                        .store(r.lost_after_ms, std::sync::atomic::Ordering::Relaxed);
                    let contact = *self.contact.lock().expect("lock");
                    if let Some(c) = contact {
                        self.renew_fence(c);
                    }
                    *self.node.lock().expect("lock") = Some(r.node_id);
                    return r.node_id;
                }
                Err((Some(code), body))
                    if (400..500).contains(&code) && code != 404 && code != 409 =>
                {
                    tracing::error!("server refused registration ({code}): {body}");
                }
                Err((_, e)) => tracing::warn!("cannot register yet: {e}"),
            }
            tokio::time::sleep(delays.next().expect("endless")).await;
        }
    }

    /// A clean stop (SIGTERM, `caravel down`): tells the server this node is leaving, so
    /// its runs are stopped and requeued rather than lost with the agent; stops them (each
    /// with its kill grace) and waits until every exit is reported. Returns false when
    /// that could not be done in time (the server unreachable, a report not taken): the
    /// runs then die with the agent as before and the server counts them lost.
    /// `main_loop` must keep running meanwhile: it carries the reports.
    pub async fn shut_down(self: &Arc<Self>) -> bool {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let Some(node_id) = *self.node.lock().expect("lock") else {
            return true;
        };
        let req = ShutdownRequest {
            node_id,
            instance: self.instance.clone(),
        };
        match self
            .post::<_, ShutdownResponse>("/v1/agent/shutdown", &req)
            .await
        {
            Ok(r) => tracing::info!(stopping = r.stopping, "shutting down: runs handed back"),
            Err((code, e)) => {
                tracing::warn!(?code, "shutting down without the server: {e}");
                return false;
            }
        }
        // The server now wants nothing here; stop everything without waiting for the sync
        // that would say so.
        let grace = {
            let mut st = self.st.lock().expect("lock");
            let mut grace = 0;
            for r in st.running.values_mut() {
                grace = grace.max(r.kill_grace_ms);
                if let Some(tx) = r.stop.take() {
                    let _ = tx.send(Stop::Asked);
                }
            }
            grace
        };
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(grace) + Duration::from_secs(10);
        loop {
            {
                let st = self.st.lock().expect("lock");
                if st.running.is_empty() && st.outbox.is_empty() {
                    break;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("shutting down before every run's exit was reported");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The runs' last output, so that it is on the server when this node is gone. A
        // server that does not take it in a few seconds does not hold up the stop: the
        // next start of this agent ships what is left.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.ship_pending() > 0 && tokio::time::Instant::now() < deadline {
            self.ship_wake.notify_one();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// How long before the server's lost timeout a fenced run is killed: room for the kill
    /// itself and for the two machines' clocks running at slightly different rates.
    fn fence_margin_ms(lost_after_ms: u64) -> u64 {
        (lost_after_ms / 4).min(1000)
    }

    /// Moves the watchdog's deadline to the lost timeout less the margin after `sent`
    /// (when a request the server answered was sent).
    fn renew_fence(&self, sent: std::time::Instant) {
        let Some(f) = &self.fence else { return };
        let lost_after = self
            .lost_after_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        if lost_after == 0 {
            return;
        }
        let limit_ns = (lost_after - Self::fence_margin_ms(lost_after)) as i64 * 1_000_000;
        let sent_boot = fence::boottime_ns() - sent.elapsed().as_nanos() as i64;
        f.renew(sent_boot + limit_ns);
    }

    /// Kills fenced runs (`Assignment::fence`) once this agent has not reached a server
    /// for the lost timeout less the margin. The server counts the node lost no earlier
    /// than a lost timeout after it last heard from it, which is no earlier than the
    /// sending of the newest request it answered; so by then these runs are dead, and the
    /// copies the server starts elsewhere are the only ones.
    async fn fence_loop(self: Arc<Self>) {
        let mut fenced_since: Option<std::time::Instant> = None;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let lost_after = self
                .lost_after_ms
                .load(std::sync::atomic::Ordering::Relaxed);
            let Some(contact) = *self.contact.lock().expect("lock") else {
                continue;
            };
            if lost_after == 0 {
                continue;
            }
            let limit = Duration::from_millis(lost_after - Self::fence_margin_ms(lost_after));
            if contact.elapsed() < limit {
                if fenced_since.take().is_some() {
                    tracing::info!("the server answers again");
                }
                continue;
            }
            let mut st = self.st.lock().expect("lock");
            let mut killed = 0;
            for (id, r) in st.running.iter_mut() {
                if r.fence {
                    if let Some(tx) = r.stop.take() {
                        tracing::warn!(run = %id, "fencing: no answer from the server for {:.1} s, killing the run before the server starts it elsewhere", contact.elapsed().as_secs_f64());
                        let _ = tx.send(Stop::Fence);
                        killed += 1;
                    }
                }
            }
            if fenced_since.is_none() && killed > 0 {
                fenced_since = Some(std::time::Instant::now());
            }
        }
    }

    /// Registers, then alternates long-polls for desired state with reconciling.
    pub async fn main_loop(self: Arc<Self>) {
        let node = Arc::new(Mutex::new(self.register().await));
        let me = self.clone();
        let node2 = node.clone();
        tokio::spawn(async move { me.report_loop(node2).await });
        tokio::spawn(self.clone().fence_loop());
        tokio::spawn(self.clone().ship_loop());
        let mut known = 0u64;
        let mut first = true;
        // After a failed sync: 100 ms doubling to 500 ms, jittered (see `retry_delays`).
        let mut failing = retry_delays(100, 500);
        loop {
            let id = *node.lock().expect("lock");
            let running: Vec<RunId> = self
                .st
                .lock()
                .expect("lock")
                .running
                .keys()
                .copied()
                .collect();
            let req = SyncRequest {
                node_id: id,
                instance: self.instance.clone(),
                running,
                known_version: known,
                wait_ms: if first { 0 } else { 30_000 },
                still: std::mem::take(&mut *self.still.lock().expect("lock")),
                free_ports: free_ports(self.cfg.master_ports, 8),
            };
            let sent = tokio::select! {
                r = self.post::<_, SyncResponse>("/v1/agent/sync", &req) => Some(r),
                // Only a long poll is cut short, and its answers go again with the next.
                _ = self.sync_wake.notified(), if req.wait_ms > 0 => None,
            };
            let Some(sent) = sent else {
                self.still.lock().expect("lock").extend(req.still);
                continue;
            };
            match sent {
                Ok(resp) => {
                    first = false;
                    failing = retry_delays(100, 500);
                    known = resp.version;
                    self.reconcile(resp.desired, resp.assignments);
                    self.confirm(&resp.confirm);
                }
                Err((Some(404 | 409), body)) => {
                    tracing::warn!(
                        "server does not know this agent instance ({body}); registering again"
                    );
                    *node.lock().expect("lock") = self.register().await;
                    known = 0;
                    first = true;
                }
                Err((code, e)) => {
                    tracing::warn!(?code, "server unreachable, tasks keep running: {e}");
                    tokio::time::sleep(failing.next().expect("endless")).await;
                    first = true;
                }
            }
        }
    }

    fn reconcile(self: &Arc<Self>, desired: Vec<RunId>, assignments: Vec<Assignment>) {
        let want: HashSet<RunId> = desired.into_iter().collect();
        let mut st = self.st.lock().expect("lock");
        for (id, r) in st.running.iter_mut() {
            if !want.contains(id) {
                if let Some(tx) = r.stop.take() {
                    tracing::info!(run = %id, "stopping run the server no longer wants");
                    let _ = tx.send(Stop::Asked);
                }
            }
        }
        let closing = self.closing.load(std::sync::atomic::Ordering::SeqCst);
        for a in assignments {
            if closing || !want.contains(&a.run) || st.started.contains(&a.run) {
                continue;
            }
            st.started.insert(a.run);
            let (tx, rx) = oneshot::channel();
            st.running.insert(
                a.run,
                Running {
                    stop: Some(tx),
                    kill_grace_ms: a.kill_grace_ms,
                    fence: a.fence,
                },
            );
            let me = self.clone();
            tokio::spawn(async move { me.run_task(a, rx).await });
        }
        // Forget ids of finished runs the server has also forgotten; keep the rest so a
        // run that already exited is never started again while its report is in flight.
        let running: HashSet<RunId> = st.running.keys().copied().collect();
        let outbox: HashSet<RunId> = st.outbox.iter().map(|e| e.run()).collect();
        st.started
            .retain(|r| want.contains(r) || running.contains(r) || outbox.contains(r));
    }

    /// Answers the server's gang checkpoint questions for the runs whose folder still holds
    /// exactly what was last saved or restored; the others are asked again.
    fn confirm(&self, questions: &[CheckpointConfirm]) {
        for q in questions {
            let Some(part) = self.parts.lock().expect("lock").get(&q.run).cloned() else {
                continue;
            };
            let p = part.lock().expect("lock").clone();
            if checkpoint::list_own(&p.dir, &p.foreign).is_ok_and(|now| now == p.saved) {
                self.still.lock().expect("lock").push(CheckpointStill {
                    run: q.run,
                    round: q.round,
                    version: p.version,
                });
            }
        }
    }

    /// Reports the end of a run whose process never started.
    fn never_started(&self, run: RunId, reason: ExitReason, message: String) {
        self.st.lock().expect("lock").running.remove(&run);
        self.ship_end(run);
        self.emit(RunEvent::Exited {
            run,
            started_ms: None,
            at_ms: now_ms(),
            exit_code: None,
            signal: None,
            reason,
            message,
            checkpoint: None,
        });
    }

    fn emit(&self, ev: RunEvent) {
        self.st.lock().expect("lock").outbox.push(ev);
        self.outbox_wake.notify_one();
    }

    async fn report_loop(self: Arc<Self>, node: Arc<Mutex<NodeId>>) {
        let mut failing = retry_delays(100, 500);
        loop {
            let batch: Vec<RunEvent> = {
                let st = self.st.lock().expect("lock");
                st.outbox.clone()
            };
            if batch.is_empty() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), self.outbox_wake.notified()).await;
                continue;
            }
            let req = EventsRequest {
                node_id: *node.lock().expect("lock"),
                events: batch.clone(),
            };
            match self
                .post::<_, serde_json::Value>("/v1/agent/events", &req)
                .await
            {
                Ok(_) => {
                    failing = retry_delays(100, 500);
                    let mut st = self.st.lock().expect("lock");
                    let n = batch.len().min(st.outbox.len());
                    st.outbox.drain(..n);
                }
                Err((code, e)) => {
                    tracing::warn!(?code, "cannot report {} events yet: {e}", batch.len());
                    tokio::time::sleep(failing.next().expect("endless")).await;
                }
            }
        }
    }

    /// The uid a run's task gets here (`None`: unsandboxed, the agent's own), or why the
    /// run cannot start on this node.
    fn identity(&self, a: &Assignment) -> Result<Option<u32>, String> {
        if let Some(want) = a.isolation {
            if want > self.isolation.level {
                return Err(format!(
                    "the job asks for isolation {want}, and this node gives {} (missing: {})",
                    self.isolation.level,
                    self.isolation.missing.join("; ")
                ));
            }
        }
        match &self.sandbox {
            Some(rt) => rt.uids.of(a.tenant).map(Some),
            None => Ok(None),
        }
    }

    async fn run_task(self: Arc<Self>, a: Assignment, mut stop: oneshot::Receiver<Stop>) {
        let run = a.run;
        let dir = self.cfg.work_dir.join("runs").join(run.to_string());
        self.ship_start(run, a.job, a.index, dir.clone());
        self.take_spare(&dir);
        let meta = ship::RunMeta {
            job: a.job,
            index: a.index,
        };
        if let Err(e) = ship::write_meta(&dir, &meta) {
            let msg = format!("cannot make the run's folder {}: {e}", dir.display());
            tracing::warn!(run = %run, "{msg}");
            self.never_started(run, ExitReason::SpawnFailed, msg);
            return;
        }
        let uid = match self.identity(&a) {
            Ok(u) => u,
            Err(msg) => {
                tracing::warn!(run = %run, "cannot start: {msg}");
                let _ = std::fs::write(dir.join("stderr.log"), format!("caravel: {msg}\n"));
                self.never_started(run, ExitReason::SpawnFailed, msg);
                return;
            }
        };
        let ident = uid.map(|u| (u, u));
        // The task's own folders: its working directory, temp space and checkpoint
        // folder, each its own (mode 0700) when it runs sandboxed.
        let dirs = sandbox::RunDirs {
            work: std::path::absolute(dir.join("work")).unwrap_or(dir.join("work")),
            checkpoint: std::path::absolute(dir.join("checkpoint"))
                .unwrap_or(dir.join("checkpoint")),
            tmp: std::path::absolute(dir.join("tmp")).unwrap_or(dir.join("tmp")),
        };
        let made = [&dirs.work, &dirs.checkpoint, &dirs.tmp]
            .into_iter()
            .try_for_each(|d| match uid {
                Some(u) => sandbox::own_dir(d, u, u),
                None => std::fs::create_dir_all(d),
            });
        if let Err(e) = made {
            let msg = format!("cannot make the run's folders in {}: {e}", dir.display());
            self.never_started(run, ExitReason::SpawnFailed, msg);
            return;
        }
        if let Err(msg) = self.prepare_workdir(&a, &dirs.work, uid).await {
            tracing::warn!(run = %run, "cannot start: {msg}");
            let _ = std::fs::write(dir.join("stderr.log"), format!("caravel: {msg}\n"));
            self.never_started(run, ExitReason::SpawnFailed, msg);
            return;
        }
        // The image's layers, in the node's cache and held there while the task runs.
        let image = match (&a.image, &self.images) {
            (None, _) => None,
            (Some(_), None) => {
                let msg = "this node cannot run tasks in images (see `caravel nodes`)".to_string();
                let _ = std::fs::write(dir.join("stderr.log"), format!("caravel: {msg}\n"));
                self.never_started(run, ExitReason::SpawnFailed, msg);
                return;
            }
            (Some(img), Some((store, _))) => {
                let pulled = tokio::select! {
                    r = store.pull(a.tenant, img, a.image_auth.as_ref()) => r,
                    _ = &mut stop => {
                        self.never_started(run, ExitReason::Killed, "stopped before it started, while its image was pulled".into());
                        return;
                    }
                };
                match pulled {
                    Ok(p) => Some(p),
                    Err(msg) => {
                        tracing::warn!(run = %run, "cannot start: {msg}");
                        let _ = std::fs::write(dir.join("stderr.log"), format!("caravel: {msg}\n"));
                        self.never_started(run, ExitReason::SpawnFailed, msg);
                        return;
                    }
                }
            }
        };
        // A service replica listens on a port the agent found free (the kernel picks it;
        // the window until the replica binds it is the same one Nomad and Kubernetes'
        // hostPort allocation live with).
        let port = if a.wants_port {
            match std::net::TcpListener::bind(("0.0.0.0", 0)).and_then(|l| l.local_addr()) {
                Ok(addr) => Some(addr.port()),
                Err(e) => {
                    tracing::warn!(run = %run, "no free port: {e}");
                    None
                }
            }
        } else {
            None
        };
        // The task's checkpoint folder, filled with its newest saved checkpoint first (a
        // gang's: the whole cut).
        let ckpt = dirs.checkpoint.clone();
        let fresh = |version: u64| checkpoint::Part {
            dir: ckpt.clone(),
            version,
            saved: checkpoint::list(&ckpt).unwrap_or_default(),
            foreign: Default::default(),
        };
        let restored = match (&a.gang_cut, a.checkpoint) {
            (Some(cut), _) if !cut.parts.is_empty() => {
                match self
                    .restore_cut(&a, cut, &dir, &ckpt, ident, &mut stop)
                    .await
                {
                    Ok(part) => Ok((cut.cut, part)),
                    Err(Restore::Failed(msg)) => Err(msg),
                    Err(Restore::Done(_)) => Err("restoring the gang's checkpoint".into()),
                    Err(Restore::Stopped) => {
                        self.never_started(
                            run,
                            ExitReason::Killed,
                            "stopped before it started, while its checkpoint was fetched".into(),
                        );
                        return;
                    }
                }
            }
            (Some(_), _) | (None, None) => Ok((0, fresh(0))),
            (None, Some(_)) => match self
                .restore_checkpoint(&a, &dir, &ckpt, ident, &mut stop)
                .await
            {
                Restore::Done(v) => Ok((v, fresh(v))),
                Restore::Failed(msg) => Err(msg),
                Restore::Stopped => {
                    self.never_started(
                        run,
                        ExitReason::Killed,
                        "stopped before it started, while its checkpoint was fetched".into(),
                    );
                    return;
                }
            },
        };
        let (restored, part) = match restored {
            Ok((v, part)) => (Ok(v), Arc::new(Mutex::new(part))),
            Err(m) => (Err(m), Arc::new(Mutex::new(fresh(0)))),
        };
        if a.gang_cut.is_some() {
            self.parts.lock().expect("lock").insert(run, part.clone());
        }
        let restored_version = *restored.as_ref().unwrap_or(&0);
        let started = match (a.wants_port, port, restored) {
            (_, _, Err(msg)) => Err(msg),
            (true, None, _) => Err("no free port for the replica".to_string()),
            (_, _, Ok(version)) => self.spawn(&a, &dir, &dirs, port, version, uid, image).await,
        };
        let Launched {
            mut child,
            cg,
            pgid,
            t0,
            mut status,
            image,
        } = match started {
            Ok(x) => x,
            Err(msg) => {
                tracing::warn!(run = %run, "cannot start: {msg}");
                if let Some(f) = &self.fence {
                    f.release(run.0);
                }
                let _ = std::fs::create_dir_all(&dir);
                let _ = std::fs::write(dir.join("stderr.log"), format!("caravel: {msg}\n"));
                self.never_started(run, ExitReason::SpawnFailed, msg);
                return;
            }
        };
        if a.fence {
            if let Some(f) = &self.fence {
                if let Err(e) = f.guard(run.0, Some(pgid), &cg.dirs) {
                    tracing::warn!(run = %run, "fence: cannot name the run's process group to the watchdog: {e}");
                }
            }
        }
        self.emit(RunEvent::Started {
            run,
            pid: pgid as u32,
            at_ms: t0,
            port,
            checkpoint: Some(restored_version),
        });
        let (watch_stop, watch_rx) = tokio::sync::watch::channel(false);
        let watcher = tokio::spawn(self.clone().watch_checkpoint(
            a.job,
            a.index,
            run,
            dir.clone(),
            part,
            watch_rx,
        ));
        let deadline = a
            .max_runtime_ms
            .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
        let grace = Duration::from_millis(a.kill_grace_ms);
        let disk_cap = a.disk_bytes.unwrap_or(self.cfg.task_disk_bytes);
        let mut disk_paths = vec![
            dirs.work.clone(),
            dirs.tmp.clone(),
            dirs.checkpoint.clone(),
            dir.join("stdout.log"),
            dir.join("stderr.log"),
        ];
        if let Some(i) = &image {
            disk_paths.push(i.rootfs.upper.clone());
        }
        let mut disk_msg = String::new();
        let mut hang_msg = String::new();
        let hang = a.hang_timeout_ms.map(|ms| {
            hang_guard(
                Duration::from_millis(ms),
                cg.clone(),
                pgid,
                vec![
                    dir.join("stdout.log"),
                    dir.join("stderr.log"),
                    ckpt.join(HEARTBEAT),
                ],
                ckpt.clone(),
            )
        });
        let (status_of_init, mut reason) = tokio::select! {
            s = child.wait() => (s, ExitReason::Exited),
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => (terminate(&mut child, pgid, grace).await, ExitReason::MaxRuntime),
            m = disk_guard(disk_paths, disk_cap) => {
                disk_msg = m;
                (terminate(&mut child, pgid, Duration::ZERO).await, ExitReason::DiskExceeded)
            }
            m = async {
                match hang {
                    Some(h) => h.await,
                    None => std::future::pending().await,
                }
            } => {
                hang_msg = m;
                // A stopped process could not act on SIGTERM (and save its checkpoint).
                for p in cg.pids() {
                    signal_process(p, Signal::CONT);
                }
                signal_group(pgid, Signal::CONT);
                (terminate(&mut child, pgid, grace).await, ExitReason::Hung)
            }
            r = &mut stop => match r {
                Ok(Stop::Asked) => (terminate(&mut child, pgid, grace).await, ExitReason::Killed),
                Ok(Stop::Fence) => (terminate(&mut child, pgid, Duration::ZERO).await, ExitReason::Fenced),
                Err(_) => (child.wait().await, ExitReason::Exited),
            }
        };
        let at = now_ms();
        if a.fence && self.fence.as_ref().is_some_and(|f| f.release(run.0)) {
            tracing::warn!(run = %run, "fencing: the watchdog killed the run (this agent could not act in time)");
            reason = ExitReason::Fenced;
        }
        // Children that left the process group still sit in the cgroup.
        if !cg.is_empty() {
            let cg2 = cg.clone();
            let _ = tokio::task::spawn_blocking(move || {
                cg2.kill_all();
                cg2.remove();
            })
            .await;
        } else {
            signal_group(pgid, Signal::KILL);
        }
        // The last checkpoint goes to the server before the exit is reported: once the
        // server hears of the exit it may start the task elsewhere, which fetches it.
        let _ = watch_stop.send(reason != ExitReason::Fenced);
        // The server holds what the folder held: the node's copy is only disk used.
        // Otherwise it stays in the run's directory for whoever wants it by hand.
        let final_version = watcher.await.ok().flatten();
        self.parts.lock().expect("lock").remove(&run);
        if final_version.is_some() {
            let c = ckpt.clone();
            let _ = tokio::task::spawn_blocking(move || checkpoint::clear(&c)).await;
        } else if checkpoint::list(&ckpt).is_ok_and(|l| !l.is_empty()) {
            tracing::warn!(run = %run, "the checkpoint folder was not all saved; left in {}", ckpt.display());
        }
        use std::os::unix::process::ExitStatusExt;
        // The task's own end, as its sandbox's init saw it; init's own when it was killed
        // before it could say (SIGKILL after the grace kills it with the task).
        let mut task_status = None;
        if let Some(st) = status.as_mut() {
            while let Some(sandbox::Status::Exited(w)) = st.next().await {
                task_status = Some(std::process::ExitStatus::from_raw(w));
            }
        }
        let status = status_of_init.map(|s| task_status.unwrap_or(s));
        if let Some(mut i) = image {
            // Detaching is immediate; the runtime's state is left only by a runtime that
            // was killed.
            i.rootfs.unmount();
            if let Some((_, rt)) = &self.images {
                rt.delete(&i.id);
            }
        }
        let (code, sig) = match &status {
            Ok(s) => (s.code(), s.signal()),
            Err(_) => (None, None),
        };
        self.st.lock().expect("lock").running.remove(&run);
        self.ship_end(run);
        self.emit(RunEvent::Exited {
            run,
            started_ms: Some(t0),
            at_ms: at,
            exit_code: code,
            signal: sig,
            reason,
            message: match &status {
                Err(e) => format!("waiting for the process failed: {e}"),
                Ok(_) if reason == ExitReason::Fenced => {
                    "fenced: its node could not reach the server for nearly the lost timeout, and its agent killed it so that no second copy would run".into()
                }
                Ok(_) if reason == ExitReason::DiskExceeded => disk_msg,
                Ok(_) if reason == ExitReason::Hung => hang_msg,
                Ok(_) => String::new(),
            },
            checkpoint: final_version,
        });
    }

    #[allow(clippy::too_many_arguments)]
    async fn spawn(
        &self,
        a: &Assignment,
        dir: &std::path::Path,
        dirs: &sandbox::RunDirs,
        port: Option<u16>,
        ckpt_version: u64,
        uid: Option<u32>,
        image: Option<(Arc<oci::Resolved>, oci::Pinned)>,
    ) -> Result<Launched, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let out = std::fs::File::create(dir.join("stdout.log"))
            .map_err(|e| format!("stdout.log: {e}"))?;
        let err = std::fs::File::create(dir.join("stderr.log"))
            .map_err(|e| format!("stderr.log: {e}"))?;
        let sandbox = self.sandbox.as_ref().zip(uid);
        if let Some((_, u)) = sandbox {
            for f in [&out, &err] {
                std::os::unix::fs::fchown(f, Some(u), Some(u))
                    .map_err(|e| format!("handing the log files to uid {u}: {e}"))?;
            }
        }
        let nodes = sandbox
            .map(|(rt, _)| rt.gpus.for_run(&a.devices))
            .unwrap_or_default();
        let limits = match sandbox {
            Some(_) => cgroups::RunLimits {
                pids_max: Some(self.cfg.task_pids),
                devices: Some(sandbox::devices::rules(&nodes)),
            },
            None => cgroups::RunLimits::default(),
        };
        let cg = self
            .cgroups
            .create(a.run.0, a.cpu_milli, a.memory_bytes, &limits)
            .map_err(|e| format!("creating cgroup: {e}"))?;
        if a.fence {
            // Under the watchdog before the task's first instruction: a fenced run never
            // runs without a deadline something other than this process enforces.
            if let Some(f) = &self.fence {
                if let Err(e) = f.guard(a.run.0, None, &cg.dirs) {
                    cg.remove();
                    return Err(format!(
                        "fence: cannot register the run with the watchdog: {e}"
                    ));
                }
            }
        }
        let procs = cg.procs_paths();
        let stdin = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
        let mut env: BTreeMap<std::ffi::OsString, std::ffi::OsString> = match sandbox {
            Some(_) => sandbox::base_env().into_iter().collect(),
            None => sandbox::unsandboxed_env().into_iter().collect(),
        };
        env.extend(a.env.iter().map(|(k, v)| (k.into(), v.into())));
        env.insert("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into());
        if let Some(p) = port {
            env.insert("PORT".into(), p.to_string().into());
        }
        env.insert(
            "CARAVEL_CHECKPOINT_DIR".into(),
            dirs.checkpoint.clone().into(),
        );
        env.insert(
            "CARAVEL_CHECKPOINT_VERSION".into(),
            ckpt_version.to_string().into(),
        );
        // Touching it counts as progress for `hang_timeout` (hidden: never checkpointed).
        env.insert(
            "CARAVEL_HEARTBEAT_FILE".into(),
            dirs.checkpoint.join(HEARTBEAT).into(),
        );
        let program = a.command.clone();
        let args = a.args.clone();
        let (stdin, out, err): (
            std::os::fd::OwnedFd,
            std::os::fd::OwnedFd,
            std::os::fd::OwnedFd,
        ) = (stdin.into(), out.into(), err.into());
        // Taken before the clone, so the metered interval always covers the whole process
        // lifetime (the exit is observed after the process is gone).
        let t0 = now_ms();
        if let (Some((_, u)), Some((resolved, pinned)), Some((_, oci_rt))) =
            (sandbox, image, self.images.as_ref())
        {
            let started = self
                .spawn_in_image(ImageStart {
                    a,
                    dir,
                    dirs,
                    env,
                    uid: u,
                    nodes,
                    cg: &cg,
                    oci: oci_rt,
                    resolved,
                    pinned,
                    stdin,
                    out,
                    err,
                })
                .await;
            return match started {
                Ok((child, status, image)) => Ok(Launched {
                    pgid: child.id(),
                    child,
                    cg,
                    t0,
                    status: Some(status),
                    image: Some(image),
                }),
                Err(e) => {
                    cg.remove();
                    Err(e)
                }
            };
        }
        let started = match sandbox {
            Some((rt, u)) => {
                let env: Vec<(String, String)> = env
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            k.to_string_lossy().into_owned(),
                            v.to_string_lossy().into_owned(),
                        )
                    })
                    .collect();
                let prep = match rt.prepare(sandbox::TaskSpec {
                    dirs,
                    cgroup_dirs: cg.controller_dirs(),
                    devices: nodes,
                    // Shared memory is the task's memory: as much as its limit, as
                    // Kubernetes sizes a memory-backed emptyDir (Docker's 64 MiB breaks
                    // PyTorch's data loaders).
                    shm_bytes: a.memory_bytes,
                    env,
                    disk_bytes: Some(a.disk_bytes.unwrap_or(self.cfg.task_disk_bytes)),
                    cgroup_procs: cg.dirs.iter().map(|d| d.join("cgroup.procs")).collect(),
                }) {
                    Ok(p) => p,
                    Err(e) => {
                        cg.remove();
                        return Err(format!("sandbox: {e}"));
                    }
                };
                let (reaper, last_cap, filter) = (rt.reaper_fd(), rt.last_cap, rt.filter.clone());
                let sandbox::Prepared {
                    plan,
                    join,
                    env,
                    status_read,
                    status_write,
                } = prep;
                let r = self
                    .spawner
                    .spawn(move || {
                        use std::os::fd::AsRawFd;
                        spawn::start(spawn::Spec {
                            program: &program,
                            args: &args,
                            env: env.iter().map(|(k, v)| (k.into(), v.into())).collect(),
                            cwd: std::path::Path::new("/"),
                            stdin,
                            stdout: out,
                            stderr: err,
                            cgroup_procs: &[],
                            new_process_group: true,
                            parent_death_signal: Some(libc::SIGKILL),
                            namespaces: SANDBOX_NAMESPACES,
                            extra_fds: &[],
                            exec_fd: None,
                            detach: &[],
                            umask: None,
                            sandbox: Some(spawn::Sandbox {
                                ops: &plan.ops,
                                what: &plan.what,
                                join: &join,
                                uid: u,
                                gid: u,
                                last_cap,
                                filter: &filter,
                                reaper,
                                status: status_write.as_raw_fd(),
                            }),
                        })
                    })
                    .await
                    .and_then(|child| {
                        sandbox::StatusReader::new(status_read).map(|r| (child, Some(r)))
                    });
                r
            }
            // Unsandboxed: a plain start holds its thread for some 100 µs, less than the
            // hop to a spawner thread would cost.
            None => spawn::spawn(spawn::Spec {
                program: &program,
                args: &args,
                env,
                cwd: &dirs.work,
                stdin,
                stdout: out,
                stderr: err,
                cgroup_procs: &procs,
                new_process_group: true,
                // Die with the agent: a stale copy must not outlive the process that would
                // report it (the runtime's workers live as long as the agent).
                parent_death_signal: Some(libc::SIGKILL),
                namespaces: 0,
                extra_fds: &[],
                exec_fd: None,
                detach: &[],
                umask: None,
                sandbox: None,
            })
            .map(|child| (child, None)),
        };
        let (child, status) = started.map_err(|e| {
            cg.remove();
            format!("cannot start `{}`: {e}", a.command)
        })?;
        let pid = child.id();
        Ok(Launched {
            child,
            cg,
            pgid: pid,
            t0,
            status,
            image: None,
        })
    }

    /// Starts a task in its image: mounts its root, writes the bundle and starts the OCI
    /// runtime in the run's cgroups.
    async fn spawn_in_image(
        &self,
        s: ImageStart<'_>,
    ) -> Result<(spawn::Child, sandbox::StatusReader, ImageRun), String> {
        let ImageStart {
            a,
            dir,
            dirs,
            mut env,
            uid,
            nodes,
            cg,
            oci: oci_rt,
            resolved,
            pinned,
            stdin,
            out,
            err,
        } = s;
        let id = format!("caravel-run-{}", a.run);
        oci_rt.delete(&id);
        let lower = pinned.lower_dirs();
        let dir2 = dir.to_path_buf();
        let rootfs =
            tokio::task::spawn_blocking(move || oci::runtime::Rootfs::mount(&dir2, &lower))
                .await
                .map_err(|e| e.to_string())??;
        // The image's environment, below the job's and Caravel's own.
        let cfg = &resolved.config;
        for kv in cfg.env.iter().flatten() {
            if let Some((k, v)) = kv.split_once('=') {
                let set_by_job = a.env.contains_key(k)
                    || k.starts_with("CARAVEL_")
                    || k == "PORT"
                    || k == "CUDA_DEVICE_ORDER";
                if !set_by_job {
                    env.insert(k.into(), v.into());
                }
            }
        }
        env.insert(
            "CARAVEL_CHECKPOINT_DIR".into(),
            sandbox::TASK_CHECKPOINT_DIR.into(),
        );
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            })
            .collect();
        let mut argv = oci::argv(&a.command, &a.args, cfg)?;
        let path = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or(sandbox::DEFAULT_PATH);
        argv[0] = oci::runtime::resolve_program(&rootfs.rootfs, &argv[0], path)?;
        // The shipped folder is where it starts; without one, the image's own.
        let cwd = match (&a.workdir, cfg.working_dir.as_deref()) {
            (None, Some(w)) if w.starts_with('/') => w.to_string(),
            _ => sandbox::TASK_WORKDIR.to_string(),
        };
        let cgroups_path = (oci_rt.kind == oci::runtime::Kind::Runc)
            .then(|| cg.dirs.first().map(|d| cgroup_relative(d)))
            .flatten();
        let config = oci::runtime::config(&oci::runtime::TaskConfig {
            argv: &argv,
            env: &env,
            cwd: &cwd,
            uid,
            dirs,
            cgroup_dirs: &cg.controller_dirs(),
            cgroups_path,
            devices: &nodes,
            shm_bytes: a.memory_bytes,
            disk_bytes: Some(a.disk_bytes.unwrap_or(self.cfg.task_disk_bytes)),
            mounts: &self.cfg.task_mounts,
            init: oci_rt.init_path(),
            hostname: &self.cfg.name,
        });
        std::fs::write(
            rootfs.bundle.join("config.json"),
            serde_json::to_vec(&config).expect("json"),
        )
        .map_err(|e| format!("writing the bundle: {e}"))?;
        let (status_read, status_write) =
            sandbox::status_pipe().map_err(|e| format!("a pipe: {e}"))?;
        // The init's go: its read end in the container, ours written once it is in the
        // run's cgroups.
        let (go_read, go_write) = sandbox::status_pipe().map_err(|e| format!("a pipe: {e}"))?;
        let go_read = sandbox::high(go_read).map_err(|e| format!("a pipe: {e}"))?;
        // The init blocks on it.
        // SAFETY: fcntl on our descriptor.
        unsafe {
            use std::os::fd::AsRawFd;
            let fl = libc::fcntl(go_read.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(go_read.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
        let args = oci_rt.run_args(&rootfs.bundle, &id);
        let program = oci_rt.binary.to_string_lossy().into_owned();
        let detach: Vec<std::ffi::CString> = oci_rt.detach().to_vec();
        let bundle = rootfs.bundle.clone();
        let child = self
            .spawner
            .spawn(move || {
                use std::os::fd::AsRawFd;
                spawn::start(spawn::Spec {
                    program: &program,
                    args: &args,
                    env: [("PATH".into(), sandbox::DEFAULT_PATH.into())]
                        .into_iter()
                        .collect(),
                    cwd: &bundle,
                    stdin,
                    stdout: out,
                    stderr: err,
                    // The runtime's work is the node's, not the task's (see `oci::runtime`).
                    cgroup_procs: &[],
                    new_process_group: true,
                    parent_death_signal: Some(libc::SIGKILL),
                    namespaces: if detach.is_empty() {
                        0
                    } else {
                        libc::CLONE_NEWNS
                    },
                    extra_fds: &[(status_write.as_raw_fd(), 3), (go_read.as_raw_fd(), 4)],
                    exec_fd: None,
                    detach: &detach,
                    // The folders the runtime makes for mount points (`/caravel`,
                    // `/.caravel`) must be open to the task's uid.
                    umask: Some(0o022),
                    sandbox: None,
                })
            })
            .await
            .map_err(|e| {
                format!(
                    "cannot start the OCI runtime {program}: {e}",
                    program = oci_rt.binary.display()
                )
            })?;
        let mut status = sandbox::StatusReader::new(status_read).map_err(|e| e.to_string())?;
        // Until the init is ready, an ended runtime is a start that failed; what it said
        // is in the task's stderr.
        let ready = tokio::time::timeout(Duration::from_secs(60), status.next()).await;
        let stderr_tail = || {
            let t = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
            let t = t.trim();
            let mut from = t.len().saturating_sub(400);
            while !t.is_char_boundary(from) {
                from += 1;
            }
            t[from..].to_string()
        };
        match ready {
            Ok(Some(sandbox::Status::Ready)) => {}
            Ok(_) => {
                return Err(format!(
                    "the OCI runtime could not start the container: {}",
                    stderr_tail()
                ))
            }
            Err(_) => return Err("the OCI runtime did not start the container within 60 s".into()),
        }
        let pid = container_init_pid(child.id())
            .ok_or("the OCI runtime's container process cannot be found")?;
        for d in &cg.dirs {
            std::fs::write(d.join("cgroup.procs"), pid.to_string())
                .map_err(|e| format!("moving the container into {}: {e}", d.display()))?;
        }
        write_all(&go_write, b"g").map_err(|e| format!("starting the task: {e}"))?;
        drop(go_write);
        Ok((
            child,
            status,
            ImageRun {
                id,
                rootfs,
                _pinned: pinned,
            },
        ))
    }
}

/// The container's init: the runtime's child whose command line is the reaper's. crun
/// starts it as its own child; runc's reaches it as a reparented child of one of its
/// threads (it is their subreaper). crun's pid file comes only later.
fn container_init_pid(runtime: i32) -> Option<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{runtime}/task")).ok()?;
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|kids| {
            kids.split_whitespace()
                .filter_map(|k| k.parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
        .find(|k| {
            std::fs::read(format!("/proc/{k}/cmdline"))
                .is_ok_and(|c| c.starts_with(oci::runtime::INIT_PATH.as_bytes()))
        })
}

/// Writes `b` to a pipe.
fn write_all(fd: &std::os::fd::OwnedFd, b: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::from(fd.try_clone()?);
    f.write_all(b)
}

/// What `spawn_in_image` is given.
struct ImageStart<'a> {
    a: &'a Assignment,
    dir: &'a std::path::Path,
    dirs: &'a sandbox::RunDirs,
    env: BTreeMap<std::ffi::OsString, std::ffi::OsString>,
    uid: u32,
    nodes: Vec<sandbox::DevNode>,
    cg: &'a cgroups::RunCgroup,
    oci: &'a oci::runtime::OciRuntime,
    resolved: Arc<oci::Resolved>,
    pinned: oci::Pinned,
    stdin: std::os::fd::OwnedFd,
    out: std::os::fd::OwnedFd,
    err: std::os::fd::OwnedFd,
}

/// A task running in an image: what to undo when it ends.
struct ImageRun {
    id: String,
    rootfs: oci::runtime::Rootfs,
    _pinned: oci::Pinned,
}

/// A run's cgroup relative to its hierarchy's root (`/caravel/<agent>/run-<id>`), the
/// last three parts of its folder.
fn cgroup_relative(d: &std::path::Path) -> String {
    let parts: Vec<_> = d.components().rev().take(3).collect();
    let mut out = String::new();
    for p in parts.iter().rev() {
        out.push('/');
        out.push_str(&p.as_os_str().to_string_lossy());
    }
    out
}

/// Finds the OCI runtime, opens the image store and runs one container to prove both.
async fn image_support(
    cfg: &AgentConfig,
    _cg: &cgroups::Cgroups,
) -> Result<(Arc<oci::Images>, oci::runtime::OciRuntime), String> {
    let rt =
        oci::runtime::OciRuntime::find(&cfg.oci_runtime, &cfg.work_dir, sandbox::reaper_bytes())?
            .ok_or("no OCI runtime found (install crun, runc or youki)")?;
    let store = oci::Images::open(
        cfg.work_dir.join("images"),
        cfg.image_cache_bytes,
        cfg.insecure_registries.clone(),
    )?;
    probe_runtime(&rt, cfg).await?;
    Ok((Arc::new(store), rt))
}

/// Runs the reaper alone in an empty root through the runtime, with every control a task
/// gets: proof that the runtime works on this machine.
async fn probe_runtime(rt: &oci::runtime::OciRuntime, cfg: &AgentConfig) -> Result<(), String> {
    let base = cfg.work_dir.join("oci-probe");
    let _ = std::fs::remove_dir_all(&base);
    let uid = cfg.task_uids.first;
    let dirs = sandbox::RunDirs {
        work: base.join("work"),
        checkpoint: base.join("checkpoint"),
        tmp: base.join("tmp"),
    };
    let rootfs = base.join("bundle").join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| format!("{}: {e}", rootfs.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&rootfs, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", rootfs.display()))?;
    for d in [&dirs.work, &dirs.checkpoint, &dirs.tmp] {
        sandbox::own_dir(d, uid, uid).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let config = oci::runtime::config(&oci::runtime::TaskConfig {
        argv: &[],
        env: &[("PATH".into(), sandbox::DEFAULT_PATH.into())],
        cwd: sandbox::TASK_WORKDIR,
        uid,
        dirs: &dirs,
        cgroup_dirs: &[],
        cgroups_path: None,
        devices: &[],
        shm_bytes: 1 << 20,
        disk_bytes: Some(1 << 20),
        mounts: &[],
        init: rt.init_path(),
        hostname: "caravel-probe",
    });
    let bundle = base.join("bundle");
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec(&config).expect("json"),
    )
    .map_err(|e| e.to_string())?;
    let mut cmd = tokio::process::Command::new(&rt.binary);
    cmd.args(rt.run_args(&bundle, "caravel-probe"))
        .current_dir(&bundle)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let detach = rt.detach().to_vec();
    // A pipe already holding the go byte, whose read end is the init's descriptor 4; the
    // init's own lines go to a pipe nobody reads (it is big enough for them).
    let (go_r, go_w) = sandbox::status_pipe().map_err(|e| e.to_string())?;
    write_all(&go_w, b"g").map_err(|e| e.to_string())?;
    let (lines_r, lines_w) = sandbox::status_pipe().map_err(|e| e.to_string())?;
    use std::os::fd::AsRawFd;
    let (gr, gw) = (go_r.as_raw_fd(), lines_w.as_raw_fd());
    // SAFETY: unshare and umount2 are async-signal-safe; only prepared strings are used.
    unsafe {
        cmd.pre_exec(move || {
            if !detach.is_empty() {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for d in &detach {
                    libc::umount2(d.as_ptr(), libc::MNT_DETACH);
                }
            }
            libc::umask(0o022);
            // --preserve-fds 2: descriptor 3 takes the init's lines, 4 gives it its go
            // at once.
            libc::dup2(gw, 3);
            libc::dup2(gr, 4);
            Ok(())
        });
    }
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .map_err(|_| "the runtime's probe took over 20 s".to_string())?
        .map_err(|e| format!("{}: {e}", rt.binary.display()))?;
    drop((go_r, go_w, lines_r, lines_w));
    rt.delete("caravel-probe");
    let _ = std::fs::remove_dir_all(&base);
    if !out.status.success() {
        return Err(format!(
            "{} could not run a container here ({}): {}",
            rt.binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Threads that start sandboxed tasks (`spawn::Spawner`).
const SPAWNER_THREADS: usize = 8;

/// The namespaces a sandboxed task gets (its network stays the node's).
const SANDBOX_NAMESPACES: libc::c_int =
    libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;

/// A started task process.
struct Launched {
    child: spawn::Child,
    cg: cgroups::RunCgroup,
    pgid: i32,
    t0: Millis,
    /// Its sandbox's init's status lines, when sandboxed.
    status: Option<sandbox::StatusReader>,
    image: Option<ImageRun>,
}

/// How often a run's disk use is walked: often enough that a writer cannot go far past its
/// cap, rarely enough that a run with many files does not cost much.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Files and folders a task may make (each costs the node an inode and the disk walk
/// time).
const MAX_TASK_FILES: u64 = 1_000_000;

/// Resolves, with a message, once the run's files hold more than `cap`.
async fn disk_guard(paths: Vec<PathBuf>, cap: u64) -> String {
    // Not at once: a task has written nothing yet, and most short ones end before the
    // first look (each look is a thread of the blocking pool).
    tokio::time::sleep(DISK_CHECK_EVERY).await;
    loop {
        let t = std::time::Instant::now();
        let p = paths.clone();
        let used = tokio::task::spawn_blocking(move || {
            let refs: Vec<&std::path::Path> = p.iter().map(|p| p.as_path()).collect();
            sandbox::disk::usage(&refs)
        })
        .await
        .unwrap_or_default();
        if used.bytes > cap {
            return format!(
                "used {} of disk, past its cap of {} (working directory, /tmp, checkpoint folder and output); stopped",
                sandbox::disk::human(used.bytes),
                sandbox::disk::human(cap)
            );
        }
        if used.inodes > MAX_TASK_FILES {
            return format!(
                "made {} files and folders, past the most a task may ({MAX_TASK_FILES}); stopped",
                used.inodes
            );
        }
        if used.too_deep {
            return format!(
                "nested folders more than {} deep (what is below cannot be counted); stopped",
                sandbox::disk::MAX_DEPTH
            );
        }
        // A walk that took long (many files) waits longer before the next.
        tokio::time::sleep(DISK_CHECK_EVERY.max(t.elapsed() * 10)).await;
    }
}

/// Starts one sandboxed `true`, as the range's first uid (which no tenant has), to prove
/// the machinery works on this machine before the node says it sandboxes.
async fn probe(rt: &sandbox::Runtime, work_dir: &std::path::Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let base = work_dir.join("sandbox-probe");
    let _ = std::fs::remove_dir_all(&base);
    let dirs = sandbox::RunDirs {
        work: base.join("work"),
        checkpoint: base.join("checkpoint"),
        tmp: base.join("tmp"),
    };
    let uid = rt.uids.first;
    std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
    for d in [&dirs.work, &dirs.checkpoint, &dirs.tmp] {
        sandbox::own_dir(d, uid, uid).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let env = sandbox::base_env()
        .into_iter()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    let prep = rt.prepare(sandbox::TaskSpec {
        dirs: &dirs,
        cgroup_dirs: vec![],
        devices: vec![],
        shm_bytes: 1 << 20,
        env,
        disk_bytes: None,
        cgroup_procs: vec![],
    })?;
    let null = |w: bool| -> Result<std::os::fd::OwnedFd, String> {
        std::fs::OpenOptions::new()
            .read(!w)
            .write(w)
            .open("/dev/null")
            .map(Into::into)
            .map_err(|e| e.to_string())
    };
    let mut child = spawn::spawn(spawn::Spec {
        program: "true",
        args: &[],
        env: prep.env.iter().map(|(k, v)| (k.into(), v.into())).collect(),
        cwd: std::path::Path::new("/"),
        stdin: null(false)?,
        stdout: null(true)?,
        stderr: null(true)?,
        cgroup_procs: &[],
        new_process_group: true,
        parent_death_signal: Some(libc::SIGKILL),
        namespaces: SANDBOX_NAMESPACES,
        extra_fds: &[],
        exec_fd: None,
        detach: &[],
        umask: None,
        sandbox: Some(spawn::Sandbox {
            ops: &prep.plan.ops,
            what: &prep.plan.what,
            join: &[],
            uid,
            gid: uid,
            last_cap: rt.last_cap,
            filter: &rt.filter,
            reaper: rt.reaper_fd(),
            status: prep.status_write.as_raw_fd(),
        }),
    })
    .map_err(|e| e.to_string())?;
    drop(prep.status_write);
    let mut st = sandbox::StatusReader::new(prep.status_read).map_err(|e| e.to_string())?;
    let said = tokio::time::timeout(Duration::from_secs(20), st.next()).await;
    let _ = child.wait().await;
    let _ = std::fs::remove_dir_all(&base);
    match said {
        Ok(Some(sandbox::Status::Exited(0))) => Ok(()),
        Ok(other) => Err(format!("a sandboxed `true` ended with {other:?}")),
        Err(_) => Err("no answer from the sandbox within 20 s".into()),
    }
}

/// SIGTERM to the process group, then SIGKILL after the grace period.
async fn terminate(
    child: &mut spawn::Child,
    pgid: i32,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    signal_group(pgid, Signal::TERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(s) => s,
        Err(_) => {
            signal_group(pgid, Signal::KILL);
            child.wait().await
        }
    }
}

/// Sends `sig` to process `pid`; whether it was delivered (a process that is already gone
/// is not an error worth more than `false`).
pub fn signal_process(pid: i32, sig: Signal) -> bool {
    rustix::process::Pid::from_raw(pid)
        .is_some_and(|p| rustix::process::kill_process(p, sig).is_ok())
}

/// Sends `sig` to every process of process group `pgid`.
pub fn signal_group(pgid: i32, sig: Signal) -> bool {
    rustix::process::Pid::from_raw(pgid)
        .is_some_and(|p| rustix::process::kill_process_group(p, sig).is_ok())
}

/// The file under the checkpoint folder whose touch counts as progress (`hang_guard`).
const HEARTBEAT: &str = ".caravel-heartbeat";

/// What progress a run shows: its CPU time, and the size and time of its output, its
/// heartbeat file and every file of its checkpoint folder.
#[derive(PartialEq)]
struct Progress {
    cpu_ns: Option<u64>,
    files: Vec<(u64, i64, i64)>,
    checkpoint: Option<checkpoint::Listing>,
}

fn progress(
    cg: &cgroups::RunCgroup,
    pgid: i32,
    files: &[PathBuf],
    ckpt: &std::path::Path,
) -> Progress {
    use std::os::unix::fs::MetadataExt;
    Progress {
        cpu_ns: cg.cpu_ns().or_else(|| {
            if cg.is_empty() {
                proc_cpu_ns(pgid)
            } else {
                threads_cpu_ns(&cg.pids())
            }
        }),
        files: files
            .iter()
            .map(|f| {
                std::fs::metadata(f).map_or((0, 0, 0), |m| (m.len(), m.mtime(), m.mtime_nsec()))
            })
            .collect(),
        checkpoint: checkpoint::list(ckpt).ok(),
    }
}

/// CPU time, in ns, of every thread of these processes now (`/proc/*/task/*/schedstat`):
/// where the run's cgroup does not count it (cgroup v1 without `cpuacct` beside `cpu`).
fn threads_cpu_ns(pids: &[i32]) -> Option<u64> {
    let mut total = None;
    for p in pids {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in rd.flatten() {
            if let Some(ns) = std::fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            {
                *total.get_or_insert(0u64) += ns;
            }
        }
    }
    total
}

/// CPU time of a process and its waited-for children, from /proc (runs without cgroups).
fn proc_cpu_ns(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    // utime, stime, cutime, cstime: fields 14 to 17, here 11 to 14 after the state.
    let ticks: u64 = f
        .get(11..15)?
        .iter()
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Some(ticks * 1_000_000_000 / hz)
}

/// Returns why the run is hung once it has shown no progress (`Progress`) for `timeout`:
/// a process frozen (SIGSTOP), asleep for good, or blocked on a peer that is.
async fn hang_guard(
    timeout: Duration,
    cg: cgroups::RunCgroup,
    pgid: i32,
    files: Vec<PathBuf>,
    ckpt: PathBuf,
) -> String {
    let every = (timeout / 5).clamp(Duration::from_millis(200), Duration::from_secs(10));
    let look = {
        let cg = cg.clone();
        move || {
            let (cg, files, ckpt) = (cg.clone(), files.clone(), ckpt.clone());
            async move {
                tokio::task::spawn_blocking(move || progress(&cg, pgid, &files, &ckpt))
                    .await
                    .ok()
            }
        }
    };
    let stopped_of = |pids: &[i32]| {
        pids.iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .ok()
                    .and_then(|s| {
                        s.rsplit_once(')')
                            .and_then(|(_, r)| r.split_whitespace().next().map(|x| x == "T"))
                    })
                    .unwrap_or(false)
            })
            .count()
    };
    let pids_of = |cg: &cgroups::RunCgroup| if cg.is_empty() { vec![pgid] } else { cg.pids() };
    let mut last = look().await;
    let mut since = tokio::time::Instant::now();
    let (stopped, pids) = loop {
        tokio::time::sleep(every).await;
        let now = look().await;
        if now != last {
            since = tokio::time::Instant::now();
            last = now;
            continue;
        }
        if since.elapsed() < timeout {
            continue;
        }
        let pids = pids_of(&cg);
        let stopped = stopped_of(&pids);
        // A frozen rank's peers block on it and stop making progress a moment later: a
        // run that is only waiting gets two looks more, so that the frozen one is the
        // one caught (and blamed) first when both are on watch.
        if stopped > 0 || since.elapsed() >= timeout + 2 * every {
            break (stopped, pids);
        }
    };
    format!(
        "hung: no progress for {} (no CPU time, output, checkpoint change or touch of $CARAVEL_HEARTBEAT_FILE; hang_timeout){}",
        {
            let ms = timeout.as_millis();
            match ms {
                _ if ms.is_multiple_of(3_600_000) => format!("{} h", ms / 3_600_000),
                _ if ms.is_multiple_of(60_000) => format!("{} min", ms / 60_000),
                _ if ms.is_multiple_of(1000) => format!("{} s", ms / 1000),
                _ => format!("{ms} ms"),
            }
        },
        if stopped > 0 {
            format!("; {stopped} of its {} processes were stopped (SIGSTOP)", pids.len())
        } else {
            String::new()
        }
    )
}

/// Up to `n` ports of `range`, picked at random, that nothing listens on here now: the
/// server gives a gang's rank 0 one of them as MASTER_PORT (another process may still
/// take it before rank 0 binds it, the window torchrun's own free-port pick has too).
fn free_ports(range: (u16, u16), n: usize) -> Vec<u16> {
    let span = u32::from(range.1 - range.0) + 1;
    let mut out = Vec::new();
    for _ in 0..n * 2 {
        let mut r = [0u8; 4];
        if getrandom::fill(&mut r).is_err() {
            break;
        }
        let port = range.0 + (u32::from_le_bytes(r) % span) as u16;
        if !out.contains(&port) && std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            out.push(port);
            if out.len() == n {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod helper_tests {
    use super::*;

    #[tokio::test]
    async fn touching_the_heartbeat_file_is_progress_and_stopping_is_a_hang() {
        let t = tempfile::tempdir().unwrap();
        let ckpt = t.path().join("ckpt");
        std::fs::create_dir_all(&ckpt).unwrap();
        let hb = ckpt.join(HEARTBEAT);
        // A process that uses no CPU and writes nothing.
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let cg = cgroups::RunCgroup {
            dirs: vec![],
            names: vec![],
        };
        let hb2 = hb.clone();
        let beat = tokio::spawn(async move {
            for _ in 0..8 {
                std::fs::write(&hb2, b"").unwrap();
                let f = std::fs::File::options().write(true).open(&hb2).unwrap();
                f.set_modified(std::time::SystemTime::now()).unwrap();
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        let t0 = std::time::Instant::now();
        let m = hang_guard(
            Duration::from_secs(1),
            cg,
            child.id() as i32,
            vec![hb.clone()],
            ckpt.clone(),
        )
        .await;
        let took = t0.elapsed();
        let _ = child.kill();
        let _ = child.wait();
        beat.await.unwrap();
        assert!(m.starts_with("hung: no progress for 1 s"), "{m}");
        // Two seconds of heartbeats, then the timeout (and the waiting run's two more
        // looks): not caught while it beat.
        assert!(
            took >= Duration::from_millis(2_800) && took < Duration::from_secs(6),
            "{took:?}"
        );
    }

    #[test]
    fn free_ports_are_in_the_range_distinct_and_not_listened_on() {
        let taken = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap();
        let p = taken.local_addr().unwrap().port();
        // A range of one port that is taken, then of one beside it.
        assert_eq!(free_ports((p, p), 4), Vec::<u16>::new());
        let got = free_ports((p.saturating_sub(20).max(1024), p), 8);
        assert!(!got.contains(&p), "{got:?}");
        let mut d = got.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), got.len());
        assert!(got.iter().all(|x| *x <= p && *x >= p.saturating_sub(20)));
    }

    #[test]
    fn a_server_list_is_split_checked_and_trimmed() {
        assert_eq!(
            server_urls("http://a:7080/, http://b:7080").unwrap(),
            vec!["http://a:7080".to_string(), "http://b:7080".to_string()]
        );
        let e = server_urls("http://a:7080,ftp://b")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("bad server URL `ftp://b`"), "{e}");
        assert!(
            server_urls("http://a,").is_err(),
            "an empty entry is refused"
        );
    }
}
