//! `caravel`: the one binary. Server, agent, a first-try `up`, the kubectl/sbatch-style
//! client commands, and benchmarks.

// glibc's malloc spends ~15 % of the gateway's CPU under load (perf: malloc, free,
// consolidate across threads); mimalloc's per-thread heaps do not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod backend;
mod bench;
mod bench_autoscale;
mod bench_gateway;
mod bench_image;
mod bench_sched;
mod client;
mod jobfile;
mod pool;
mod raw_codec;
mod servicefile;
mod sim;
mod table;
mod workdir;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use caravel_core::api::*;
use caravel_core::quantity::{
    format_bytes, format_cpu, parse_bytes, parse_cpu_milli, parse_duration_ms,
};
use caravel_core::{JobSpec, JobState, Priority, Quota, Topology};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::client::Client;
use crate::table::Table;

#[derive(Parser)]
#[command(
    name = "caravel",
    version,
    about = "Caravel: one elastic, multi-tenant compute pool"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Conn {
    /// Server URL (else CARAVEL_SERVER, else the config `caravel up` wrote).
    #[arg(long, env = "CARAVEL_SERVER", global = true)]
    server: Option<String>,
    /// Bearer token (else CARAVEL_TOKEN, else the config `caravel up` wrote).
    #[arg(long, env = "CARAVEL_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// CA certificates (PEM) to check an https server against instead of the system's
    /// roots (else CARAVEL_CA, else the config's `ca`): a self-signed pool's
    /// DATA_DIR/tls/ca.pem.
    #[arg(long, env = "CARAVEL_CA", global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

impl Output {
    /// Under `-o json`, prints `value` (pretty) and answers true: the one place a client
    /// command's machine-readable form is decided; otherwise the command renders its own
    /// table or sentence.
    fn json<T: serde::Serialize + ?Sized>(self, value: &T) -> Result<bool> {
        if self != Output::Json {
            return Ok(false);
        }
        println!("{}", serde_json::to_string_pretty(value)?);
        Ok(true)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the control plane.
    Server(ServerArgs),
    /// Run a node agent.
    Agent(AgentArgs),
    /// A server on the embedded store plus one local agent, for a first try.
    Up(UpArgs),
    /// Stop the pool `caravel up` started (or any server) on a data directory.
    Down(DownArgs),
    /// Submit a job: `caravel submit [flags] -- CMD ARGS...` or `caravel submit -f job.toml`.
    Submit(SubmitArgs),
    /// List jobs.
    Jobs {
        #[command(flatten)]
        conn: Conn,
        /// Only these states (comma list; `active` = pending or running).
        #[arg(long)]
        state: Option<String>,
        /// Admin only: one tenant's jobs.
        #[arg(long)]
        tenant: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show one job.
    Job {
        #[command(subcommand)]
        cmd: JobCmd,
    },
    /// Print a task's output.
    Logs {
        #[command(flatten)]
        conn: Conn,
        id: String,
        #[arg(long, default_value_t = 0)]
        task: u32,
        /// stderr instead of stdout.
        #[arg(long)]
        stderr: bool,
        /// Keep printing until the task ends.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines (then, with --follow, what comes after).
        #[arg(short = 'n', long, value_name = "N")]
        tail: Option<u64>,
        /// The output of this run of the task (its id, as `job show` lists the runs)
        /// instead of the newest.
        #[arg(long, value_name = "RUN", conflicts_with = "all_runs")]
        run: Option<u64>,
        /// The output of every run of the task, oldest first, each line prefixed with
        /// `[run ID attempt N]`.
        #[arg(long, conflicts_with_all = ["follow", "tail"])]
        all_runs: bool,
    },
    /// Cancel a job: SIGTERM, then SIGKILL after its grace period.
    Cancel {
        #[command(flatten)]
        conn: Conn,
        id: String,
    },
    /// List nodes.
    Nodes {
        #[command(flatten)]
        conn: Conn,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Manage tenants.
    Tenant {
        #[command(subcommand)]
        cmd: TenantCmd,
    },
    /// List tenants.
    Tenants {
        #[command(flatten)]
        conn: Conn,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Metered usage per tenant and per job.
    Usage {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        job: Option<u64>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// A job's checkpoints (`CARAVEL_CHECKPOINT_DIR`, saved by the agents): list them, or
    /// download one task's.
    Checkpoint {
        #[command(subcommand)]
        cmd: CheckpointCmd,
    },
    /// Credentials for the OCI registries your jobs' images come from (kept by the
    /// server for your tenant, given to agents with your tasks, never shown back).
    Registry {
        #[command(subcommand)]
        cmd: RegistryCmd,
    },
    /// Drain a node (no new work; service replicas move elsewhere) or undrain it.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Manage inference services.
    Service {
        #[command(subcommand)]
        cmd: ServiceCmd,
    },
    /// List services.
    Services {
        #[command(flatten)]
        conn: Conn,
        /// Admin only: one tenant's services.
        #[arg(long)]
        tenant: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Replay public traces through the scheduler.
    Sim {
        #[command(subcommand)]
        cmd: sim::SimCmd,
    },
    /// Benchmarks that print figures.
    Bench {
        #[command(subcommand)]
        cmd: bench::BenchCmd,
    },
}

#[derive(Subcommand)]
enum JobCmd {
    Show {
        #[command(flatten)]
        conn: Conn,
        id: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum CheckpointCmd {
    /// Each task's newest checkpoint: version, size, the run that saved it, when.
    Ls {
        #[command(flatten)]
        conn: Conn,
        id: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Download a task's newest checkpoint: a tar archive to stdout (`> ckpt.tar`), to
    /// FILE with --to, or unpacked into a folder with --extract.
    Get {
        #[command(flatten)]
        conn: Conn,
        id: String,
        #[arg(long, default_value_t = 0)]
        task: u32,
        /// Write the archive to this file.
        #[arg(long, value_name = "FILE", conflicts_with = "extract")]
        to: Option<PathBuf>,
        /// Unpack the archive into this folder (made if need be).
        #[arg(long, value_name = "DIR")]
        extract: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum RegistryCmd {
    /// Store a user name and password (or access token) for a registry, HOST[:PORT] as
    /// in image references (docker.io's is registry-1.docker.io). The password is read
    /// from standard input, never from the command line.
    Login {
        #[command(flatten)]
        conn: Conn,
        registry: String,
        #[arg(short, long)]
        username: String,
        /// Read the password from standard input (required: a password in the command
        /// line would show in `ps` and the shell's history).
        #[arg(long)]
        password_stdin: bool,
        /// Admin only: for this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Forget the credentials for a registry.
    Logout {
        #[command(flatten)]
        conn: Conn,
        registry: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// The registries you have credentials for, with the user names.
    Ls {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Place nothing new on the node; running batch tasks finish, service replicas are
    /// replaced elsewhere before they leave.
    Drain {
        #[command(flatten)]
        conn: Conn,
        name: String,
    },
    /// Accept work on the node again.
    Undrain {
        #[command(flatten)]
        conn: Conn,
        name: String,
    },
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Create or update a service from a service file; a changed spec rolls out.
    Deploy {
        #[command(flatten)]
        conn: Conn,
        #[arg(short, long)]
        file: PathBuf,
        /// Admin only: deploy for this tenant.
        #[arg(long)]
        tenant: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show one service and its replicas.
    Show {
        #[command(flatten)]
        conn: Conn,
        name: String,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Delete a service and stop its replicas.
    Delete {
        #[command(flatten)]
        conn: Conn,
        name: String,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum TenantCmd {
    /// Create a tenant and print its token (shown once).
    Create {
        #[command(flatten)]
        conn: Conn,
        name: String,
        /// The most the tenant may hold, borrowing included: cpu=8,memory=32Gi,gpu/H100=8;
        /// storage=100Gi caps the checkpoints and task output the server keeps for it
        #[arg(long)]
        quota: Option<String>,
        /// What the tenant is guaranteed (same form); work within it reclaims borrowed capacity.
        #[arg(long)]
        guarantee: Option<String>,
        /// Fair-share weight relative to other tenants.
        #[arg(long, default_value_t = 1.0, value_parser = weight)]
        weight: f64,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Args)]
struct ServerArgs {
    #[arg(long, default_value = pool::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Where state is kept: `sqlite` (DATA_DIR/caravel.db, the default) or a PostgreSQL
    /// database, `postgres://USER[:PASSWORD]@HOST:PORT/DB` (or a libpq `key=value`
    /// string). One server owns a database at a time; the data directory still holds the
    /// tokens and the server's lock.
    #[arg(long, env = "CARAVEL_DATASTORE", hide_env_values = true, default_value = "sqlite", value_parser = caravel_server::Datastore::parse)]
    datastore: caravel_server::Datastore,
    /// With a PostgreSQL datastore: wait while another server owns it, then take over
    /// when that one's database session ends (killed, machine lost). Give agents both
    /// servers (`--server URL1,URL2`) so they follow.
    #[arg(long)]
    standby: bool,
    #[arg(long, default_value = "127.0.0.1:7080")]
    listen: SocketAddr,
    /// Mark a node lost after this long without a heartbeat.
    #[arg(long, default_value = "10s", value_parser = dur)]
    lost_after: u64,
    /// Agent heartbeat / long-poll period.
    #[arg(long, default_value = "2s", value_parser = dur)]
    heartbeat: u64,
    /// fsync every commit (survives power loss, slower).
    #[arg(long)]
    sync_full: bool,
    /// Half-life of the usage history fair share weighs (a tenant that used less recently
    /// goes first).
    #[arg(long, default_value = "1h", value_parser = dur)]
    fair_share_half_life: u64,
    /// Least-attained-service order for batch work (Tiresias): queue boundaries in GPU-hours
    /// of service a job has received, ascending (`16`, or `1,16`). A batch job in an earlier
    /// queue goes first and may preempt its own tenant's batch work in a later one. Off by
    /// default.
    #[arg(long, value_name = "GPU_HOURS[,...]")]
    las: Option<String>,
    /// With `--las`: a task runs at least this long before LAS may preempt it.
    #[arg(long, default_value = "0s", value_parser = dur)]
    las_slice: u64,
    /// A job that has waited this long without starting gets the reservation, oldest first,
    /// one job at a time (`6h`): from max runtimes when running work declares them (shorter
    /// work still backfills), else nodes drained so no other work starts there until it has
    /// started. Bounds the wait of large gangs at some cost; off (`0s`) by default.
    #[arg(long, default_value = "0s", value_parser = dur)]
    starvation: u64,
    /// How long an elastic gang's attempt runs before the gang may restart bigger when
    /// idle room holds more of its ranks (each growth is a restart from its checkpoint).
    #[arg(long, default_value = "60s", value_parser = dur)]
    elastic_grow_after: u64,
    /// How many waiting jobs hold a backfill reservation at once, in queue order. 1 is EASY
    /// backfill (only the head-of-line job's start is protected); more protects the starts
    /// of the next jobs too, so large gangs behind the head are not overtaken without end.
    #[arg(long, default_value_t = 1, value_parser = reservations)]
    reservations: usize,
    /// The gateway's own zone: callers that name none (X-Caravel-Zone) are served by
    /// replicas here first.
    #[arg(long, default_value = "")]
    zone: String,
    /// The gateway's own region (X-Caravel-Region), the next preference after the zone.
    #[arg(long, default_value = "")]
    region: String,
    /// Serve HTTPS (API and gateway) with this certificate chain (PEM); re-read when the
    /// file changes, so a renewed certificate needs no restart. With --tls-key.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        conflicts_with = "tls_self_signed"
    )]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve HTTPS with a certificate from a pool CA this server makes once in
    /// DATA_DIR/tls (clients and agents trust DATA_DIR/tls/ca.pem with --ca).
    #[arg(long)]
    tls_self_signed: bool,
    /// Names (DNS or IP) the self-signed certificate covers besides localhost, the
    /// loopback addresses, the host name and the listen address: those agents and
    /// clients use to reach this server. Repeatable or comma-separated.
    #[arg(long, value_name = "NAME", value_delimiter = ',', requires = "tls_self_signed", value_parser = tls_name)]
    tls_san: Vec<String>,
    /// Route requests by host name: `SERVICE.DOMAIN` reaches service SERVICE of tenant
    /// `default`, `SERVICE--TENANT.DOMAIN` another tenant's (point a wildcard DNS record,
    /// `*.DOMAIN`, at the server). Repeatable or comma-separated.
    #[arg(long, value_name = "DOMAIN", value_delimiter = ',', value_parser = gateway_domain)]
    gateway_domain: Vec<String>,
    /// Where tasks' checkpoints (`CARAVEL_CHECKPOINT_DIR`, saved by the agents) are kept;
    /// DATA_DIR/checkpoints by default. A standby must see the same folder.
    #[arg(long, value_name = "DIR")]
    checkpoint_dir: Option<PathBuf>,
    /// The largest checkpoint one task may save (`4Gi`); larger ones are refused, and the
    /// task keeps the one it saved before.
    #[arg(long, default_value = "4Gi", value_parser = checkpoint_size)]
    checkpoint_max_size: u64,
    /// How long the checkpoints of a finished job are kept (for `caravel checkpoint get`).
    #[arg(long, default_value = "7d", value_parser = dur)]
    checkpoint_retention: u64,
    /// Where tasks' output shipped by the agents is kept (for `caravel logs` once a node
    /// is gone); DATA_DIR/logs by default. A standby must see the same folder.
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// The most kept of each stream (stdout, stderr) of a run (`64Mi`): beyond it the
    /// start is dropped and the end kept.
    #[arg(long, default_value = "64Mi", value_parser = checkpoint_size)]
    log_max_size: u64,
    /// How long the output of a finished job is kept.
    #[arg(long, default_value = "7d", value_parser = dur)]
    log_retention: u64,
    /// The largest working directory (`caravel submit --workdir`) a tenant may upload:
    /// 256Mi, 1Gi.
    #[arg(long, default_value = "256Mi", value_parser = checkpoint_size)]
    workdir_max_size: u64,
    /// How long an uploaded working directory that no waiting or running job and no
    /// service names is kept after its last use: 7d.
    #[arg(long, default_value = "7d", value_parser = dur)]
    workdir_retention: u64,
    /// Close a connection that has not sent a whole request head within this long of
    /// opening or of its previous answer (also the idle keep-alive timeout).
    #[arg(long, default_value = "15s", value_parser = dur)]
    header_timeout: u64,
    /// Fail a request whose body sends nothing for this long.
    #[arg(long, default_value = "30s", value_parser = dur)]
    body_timeout: u64,
    /// The most connections open at once. Past it, a newcomer closes the oldest
    /// untrusted connection (not the admin's or an agent's), from the address holding the most.
    #[arg(long, default_value_t = 4096, value_parser = at_least_one)]
    max_connections: usize,
    /// The most connections one address may hold that have not shown the admin or an
    /// agent token (tenants' connections count here too).
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    max_connections_per_client: usize,
    /// API calls per tenant token: `RPS` or `RPS:BURST`, or `off`. The admin and agent
    /// tokens are not limited. Past it: 429 with Retry-After.
    #[arg(long, default_value = "100:200", value_parser = rate)]
    rate_limit: caravel_server::serve::Rate,
    /// API calls per address from callers without a valid token (`RPS[:BURST]`, `off`).
    #[arg(long, default_value = "20:40", value_parser = rate)]
    rate_limit_anonymous: caravel_server::serve::Rate,
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}`: expected a whole number of at least 1")),
    }
}

fn rate(s: &str) -> Result<caravel_server::serve::Rate, String> {
    caravel_server::serve::Rate::parse(s)
}

#[derive(Args)]
struct AgentArgs {
    /// The server's URL; with standbys, all of them separated by commas (the agent
    /// follows whichever one answers).
    #[arg(long, env = "CARAVEL_SERVER", value_name = "URL[,URL...]")]
    server: String,
    #[arg(long, env = "CARAVEL_TOKEN", hide_env_values = true)]
    token: String,
    /// Node name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "")]
    region: String,
    #[arg(long, default_value = "")]
    zone: String,
    #[arg(long, default_value = "")]
    rack: String,
    /// CPUs to offer (default: all). 2, 0.5 or 500m.
    #[arg(long, value_parser = cpu)]
    cpus: Option<u64>,
    /// Memory to offer (default: all). 4Gi, 512Mi.
    #[arg(long, value_parser = bytes)]
    memory: Option<u64>,
    /// Declared GPUs, MODEL:COUNT[,MODEL:COUNT], added to those NVML finds.
    #[arg(long, value_parser = gpus)]
    gpus: Option<GpuList>,
    /// Labels, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = kv)]
    labels: Vec<(String, String)>,
    /// Where task working directories and logs go.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Address of the agent's log endpoint.
    #[arg(long, default_value = "0.0.0.0:0")]
    listen: SocketAddr,
    /// Address other nodes use to reach this one (default: the route to the server).
    #[arg(long)]
    advertise: Option<String>,
    /// Do not use cgroups even where available.
    #[arg(long)]
    no_cgroups: bool,
    /// CA certificates (PEM) to check https servers against instead of the system's roots:
    /// a self-signed pool's DATA_DIR/tls/ca.pem.
    #[arg(long, env = "CARAVEL_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Instead of --ca: the SHA-256 of a self-signed pool's CA (the server prints it at
    /// start). The agent fetches the CA from the server and trusts it only if it matches.
    #[arg(long, value_name = "HEX", conflicts_with = "ca")]
    ca_sha256: Option<String>,
    /// How often tasks' output is shipped to the server (and soon after each run ends),
    /// where `caravel logs` finds it once the node is gone: 2s, 500ms.
    #[arg(long, default_value = "2s", value_parser = dur_nonzero)]
    log_ship_every: u64,
    /// How long an ended run's folder may stay on this node: it is removed as soon as the
    /// server holds all its output, and after this at the latest: 24h, 7d.
    #[arg(long, default_value = "24h", value_parser = dur)]
    run_retention: u64,
    #[command(flatten)]
    tasks: TaskArgs,
}

/// How an agent runs tasks (`caravel agent` and `caravel up`).
#[derive(Args, Clone)]
struct TaskArgs {
    /// Sandbox tasks: `on` when the agent can (it must be root), `off` to run every task
    /// as the agent's own user, unconfined (the node then reports isolation `none`).
    #[arg(long, value_enum, default_value = "on")]
    sandbox: OnOff,
    /// The uids (and gids) tasks run as, one per tenant: FIRST-LAST. No account of the
    /// machine may fall inside.
    #[arg(long, default_value = "200000-299999", value_parser = uid_range)]
    task_uids: caravel_agent::sandbox::UidRange,
    /// A host path every task gets, HOST[:TASK][:ro|rw], read-only unless `rw`
    /// (repeatable). Every tenant's tasks see it: share datasets, not secrets.
    #[arg(long = "task-mount", value_name = "HOST[:TASK][:ro|rw]", value_parser = task_mount)]
    task_mounts: Vec<caravel_agent::sandbox::TaskMount>,
    /// Ephemeral disk a task may fill when its job does not say: 10Gi, 500Mi.
    #[arg(long, default_value = "10Gi", value_parser = disk_size)]
    task_disk: u64,
    /// Most processes and threads a task may have at once.
    #[arg(long, default_value_t = caravel_agent::DEFAULT_TASK_PIDS, value_parser = clap::value_parser!(u64).range(16..))]
    task_pids: u64,
    /// A device file for each GPU declared with --gpus, in order: PATH[,PATH...]. A
    /// sandboxed task sees and may open only its own GPUs' files.
    #[arg(long, value_delimiter = ',', value_name = "PATH[,PATH...]")]
    gpu_devices: Vec<PathBuf>,
    /// The OCI runtime for tasks in images: auto (crun, runc or youki, the first found),
    /// none, a name on the PATH or a path.
    #[arg(long, default_value = "auto", value_name = "auto|none|NAME|PATH")]
    oci_runtime: String,
    /// How much unpacked image layers the node keeps (the layers used longest ago go
    /// first): 20Gi, 500Mi.
    #[arg(long, default_value = "20Gi", value_parser = parse_bytes)]
    image_cache: u64,
    /// A registry (HOST[:PORT]) reached over plain HTTP (repeatable); loopback ones always
    /// are. Only on a network you trust: nothing checks who answers.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]", value_parser = registry_host)]
    insecure_registries: Vec<String>,
    /// The ports a gang's rank 0 may be given as MASTER_PORT on this node: FIRST-LAST.
    /// The agent tells the server which of them it finds free.
    #[arg(long, default_value = "29500-31499", value_parser = port_range)]
    master_ports: (u16, u16),
}

/// `N` or `MIN:MAX` (an elastic gang).
pub fn task_count(s: &str) -> Result<(Option<u32>, u32), String> {
    let num = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("`{s}` is not a task count: N, or MIN:MAX for an elastic gang"))
    };
    match s.split_once(':') {
        None => Ok((None, num(s)?)),
        Some((a, b)) => {
            let (min, max) = (num(a)?, num(b)?);
            if min == 0 || min > max {
                return Err(format!("`{s}`: MIN:MAX needs 1 <= MIN <= MAX"));
            }
            Ok((Some(min), max))
        }
    }
}

fn port_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("`{s}` is not a port range FIRST-LAST (1024-65535, FIRST <= LAST)");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u16, u16) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a < 1024 || a > b {
        return Err(bad());
    }
    Ok((a, b))
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum OnOff {
    On,
    Off,
}

impl TaskArgs {
    /// The same settings as command-line arguments (for `up --detach`'s child).
    fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--sandbox".to_string(),
            if self.sandbox == OnOff::On {
                "on"
            } else {
                "off"
            }
            .to_string(),
            "--task-uids".into(),
            self.task_uids.to_string(),
            "--task-disk".into(),
            self.task_disk.to_string(),
            "--task-pids".into(),
            self.task_pids.to_string(),
        ];
        for m in &self.task_mounts {
            v.push("--task-mount".into());
            v.push(format!(
                "{}:{}:{}",
                m.host.display(),
                m.task.display(),
                if m.rw { "rw" } else { "ro" }
            ));
        }
        if !self.gpu_devices.is_empty() {
            v.push("--gpu-devices".into());
            let paths: Vec<String> = self
                .gpu_devices
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            v.push(paths.join(","));
        }
        v.push("--oci-runtime".into());
        v.push(self.oci_runtime.clone());
        v.push("--image-cache".into());
        v.push(self.image_cache.to_string());
        for r in &self.insecure_registries {
            v.push("--insecure-registry".into());
            v.push(r.clone());
        }
        v.push("--master-ports".into());
        v.push(format!("{}-{}", self.master_ports.0, self.master_ports.1));
        v
    }

    fn apply(&self, c: &mut caravel_agent::AgentConfig) {
        c.sandbox = self.sandbox == OnOff::On;
        c.task_uids = self.task_uids;
        c.task_mounts = self.task_mounts.clone();
        c.task_disk_bytes = self.task_disk;
        c.task_pids = self.task_pids;
        c.gpu_devices = self.gpu_devices.clone();
        c.oci_runtime = self.oci_runtime.clone();
        c.image_cache_bytes = self.image_cache;
        c.insecure_registries = self.insecure_registries.clone();
        c.master_ports = self.master_ports;
    }
}

async fn registry_cmd(cmd: RegistryCmd) -> Result<i32> {
    match cmd {
        RegistryCmd::Login {
            conn,
            registry,
            username,
            password_stdin,
            tenant,
        } => {
            registry_host(&registry).map_err(anyhow::Error::msg)?;
            if !password_stdin {
                anyhow::bail!("give the password on standard input with --password-stdin (`echo $TOKEN | caravel registry login {registry} -u {username} --password-stdin`)");
            }
            let mut password = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut password)?;
            let password = password.trim_end_matches(['\n', '\r']).to_string();
            if password.is_empty() {
                anyhow::bail!("no password on standard input");
            }
            let c = Client::resolve(conn.server, conn.token, conn.ca)?;
            c.put_json(
                &format!("/v1/registries/{registry}{}", tenant_query(&tenant)),
                &caravel_core::api::RegistryLogin { username, password },
            )
            .await?;
            println!("credentials for {registry} stored");
            Ok(0)
        }
        RegistryCmd::Logout {
            conn,
            registry,
            tenant,
        } => {
            registry_host(&registry).map_err(anyhow::Error::msg)?;
            let c = Client::resolve(conn.server, conn.token, conn.ca)?;
            c.delete(&format!(
                "/v1/registries/{registry}{}",
                tenant_query(&tenant)
            ))
            .await?;
            println!("credentials for {registry} forgotten");
            Ok(0)
        }
        RegistryCmd::Ls {
            conn,
            tenant,
            output,
        } => {
            let c = Client::resolve(conn.server, conn.token, conn.ca)?;
            let list: Vec<caravel_core::api::RegistryView> = c
                .get(&format!("/v1/registries{}", tenant_query(&tenant)))
                .await?;
            if !output.json(&list)? {
                println!("{:<40} USERNAME", "REGISTRY");
                for r in &list {
                    println!("{:<40} {}", r.registry, r.username);
                }
            }
            Ok(0)
        }
    }
}

fn registry_host(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("`{s}` is not HOST[:PORT]"))
    }
}

fn isolation_level(s: &str) -> Result<caravel_core::IsolationLevel, String> {
    caravel_core::IsolationLevel::parse(s)
}
fn uid_range(s: &str) -> Result<caravel_agent::sandbox::UidRange, String> {
    caravel_agent::sandbox::UidRange::parse(s)
}
fn task_mount(s: &str) -> Result<caravel_agent::sandbox::TaskMount, String> {
    caravel_agent::sandbox::TaskMount::parse(s)
}
fn disk_size(s: &str) -> Result<u64, String> {
    let b = parse_bytes(s)?;
    if !(caravel_core::MIN_DISK_BYTES..=caravel_core::MAX_DISK_BYTES).contains(&b) {
        return Err("must be 1Mi to 1Pi".into());
    }
    Ok(b)
}

#[derive(Args)]
struct UpArgs {
    #[arg(long, default_value = pool::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7080")]
    listen: SocketAddr,
    /// Declared GPUs for the local agent, MODEL:COUNT.
    #[arg(long, value_parser = gpus)]
    gpus: Option<GpuList>,
    /// Start in the background, wait until the pool is ready, and return.
    #[arg(short, long)]
    detach: bool,
    /// Serve HTTPS with a self-signed pool CA (DATA_DIR/tls/ca.pem, recorded in the client
    /// config so the commands here trust it).
    #[arg(long)]
    tls: bool,
    #[command(flatten)]
    tasks: TaskArgs,
}

#[derive(Args)]
struct DownArgs {
    #[arg(long, default_value = pool::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// How long to wait for a clean stop before SIGKILL: 60s, 2m. Running tasks get their
    /// kill grace (30 s unless the job says otherwise) to exit after SIGTERM.
    #[arg(long, default_value = "60s")]
    timeout: String,
}

#[derive(Args)]
struct SubmitArgs {
    #[command(flatten)]
    conn: Conn,
    /// Makes the submission safe to repeat: the same key (from the same tenant) names the
    /// job it made the first time. Default: a fresh key, so that this command's own retries
    /// (the server unreachable or answering 503 for up to 30 s) never submit twice.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// A job file (TOML). Flags given as well override it.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    #[arg(long, short = 'J')]
    name: Option<String>,
    /// Number of tasks; MIN:MAX for an elastic gang (with --gang): it starts once MIN
    /// fit and grows towards MAX.
    #[arg(short = 'n', long, value_name = "N|MIN:MAX", value_parser = task_count)]
    tasks: Option<(Option<u32>, u32)>,
    /// CPUs per task: 2, 0.5, 500m.
    #[arg(short = 'c', long)]
    cpus: Option<String>,
    /// Memory per task: 4Gi, 512Mi.
    #[arg(long, visible_alias = "mem")]
    memory: Option<String>,
    /// GPUs per task: MODEL:COUNT.
    #[arg(long, visible_alias = "gres")]
    gpus: Option<String>,
    #[arg(long, short = 'p', value_enum)]
    priority: Option<PriorityArg>,
    /// Max runtime: 90s, 30m, 2h.
    #[arg(long, short = 't', visible_alias = "time")]
    max_runtime: Option<String>,
    /// Stop and retry a run (a gang: the whole gang) that makes no progress for this
    /// long: no CPU time, output, checkpoint change or touch of $CARAVEL_HEARTBEAT_FILE.
    /// 10m, 90s. Off by default.
    #[arg(long, value_name = "DURATION")]
    hang_timeout: Option<String>,
    #[arg(long)]
    max_retries: Option<u32>,
    /// All tasks start together or none do (sets RANK, WORLD_SIZE, MASTER_ADDR...).
    #[arg(long)]
    gang: bool,
    /// Gangs: all members in one node, rack or zone.
    #[arg(long, value_enum)]
    topology: Option<TopologyArg>,
    /// At most one copy of each task, even across a network partition: a node cut off
    /// from the server kills these tasks before they could be started elsewhere.
    #[arg(long)]
    fence: bool,
    /// KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// KEY=VALUE whose value no view, listing or log shows after submission; only the
    /// job's tasks read it (repeatable).
    #[arg(long = "secret-env", value_name = "KEY=VALUE")]
    secret_env: Vec<String>,
    /// Run in this OCI image: [REGISTRY/]REPO[:TAG][@sha256:DIGEST].
    #[arg(long)]
    image: Option<String>,
    /// Ship this folder as every task's working directory (what .gitignore and
    /// .caravelignore name is left out; an unchanged folder is not uploaded again).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// The least isolation the tasks accept (they wait for a node that gives it).
    #[arg(long, value_parser = isolation_level)]
    isolation: Option<caravel_core::IsolationLevel>,
    /// Ephemeral disk per task (working directory, /tmp, checkpoints, output): 20Gi.
    #[arg(long)]
    disk: Option<String>,
    /// SIGTERM-to-SIGKILL grace on cancel, preemption and timeout (default 30s).
    #[arg(long)]
    kill_grace: Option<String>,
    /// Not preempted before it has run this long: 10m.
    #[arg(long)]
    min_runtime: Option<String>,
    /// Admin only: submit for this tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// Follow the job to its end and exit with its status.
    #[arg(short = 'W', long)]
    wait: bool,
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
    /// The command and its arguments, after `--`.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum TopologyArg {
    Node,
    Rack,
    Zone,
}

#[derive(Clone, Copy, ValueEnum)]
enum PriorityArg {
    Online,
    Batch,
    Spot,
}

fn dur(s: &str) -> Result<u64, String> {
    parse_duration_ms(s)
}
fn dur_nonzero(s: &str) -> Result<u64, String> {
    match parse_duration_ms(s)? {
        0 => Err("must be more than 0".into()),
        n => Ok(n),
    }
}
/// A size that must be more than 0 (`--checkpoint-max-size`, `--log-max-size`).
fn checkpoint_size(s: &str) -> Result<u64, String> {
    match parse_bytes(s)? {
        0 => Err("must be more than 0".into()),
        n => Ok(n),
    }
}
/// `--reservations`: 1 (EASY backfill) up to 1024. Each one costs a search of running
/// work's ends per cycle, so the bound keeps a typo from stalling every cycle.
pub(crate) fn reservations(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    match n {
        0 => Err("must be at least 1 (1 is EASY backfill: the head-of-line job's)".into()),
        1..=1024 => Ok(n),
        _ => Err(format!("{n} is more than 1024")),
    }
}
fn cpu(s: &str) -> Result<u64, String> {
    parse_cpu_milli(s)
}
fn bytes(s: &str) -> Result<u64, String> {
    parse_bytes(s)
}
/// A parsed `--gpus MODEL:COUNT[,MODEL:COUNT]`. A newtype, so clap takes the list as
/// one value rather than as repeated occurrences.
#[derive(Clone, Debug)]
struct GpuList(Vec<(String, u32)>);

/// A finite weight above zero: `nan` and `inf` parse as floats but would reach the
/// server as JSON null.
fn weight(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(w) if w.is_finite() && w > 0.0 => Ok(w),
        _ => Err(format!("`{s}` is not a number above 0")),
    }
}

fn gpus(s: &str) -> Result<GpuList, String> {
    caravel_core::parse_gpu_list(s).map(GpuList)
}
fn kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

fn main() {
    // The fence watchdog an agent starts (`caravel_agent::fence`): not a user's command.
    let mut args = std::env::args_os();
    if args
        .nth(1)
        .is_some_and(|a| a == caravel_agent::fence::WATCHDOG_ARG)
    {
        let dir = PathBuf::from(args.next().unwrap_or_default());
        let agent: i32 = args
            .next()
            .and_then(|a| a.to_str()?.parse().ok())
            .unwrap_or(0);
        if let Err(e) = caravel_agent::fence::watchdog_main(&dir, agent) {
            eprintln!("caravel fence watchdog: {}: {e}", dir.display());
            std::process::exit(1);
        }
        return;
    }
    let cli = Cli::parse();
    if matches!(&cli.cmd, Cmd::Server(_) | Cmd::Agent(_) | Cmd::Up(_)) {
        // What the control plane and agents write (tokens, the database, checkpoints,
        // task output, run folders) is theirs alone unless they say otherwise.
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    }
    let sandboxing = match &cli.cmd {
        Cmd::Agent(a) => a.tasks.sandbox == OnOff::On,
        Cmd::Up(a) => a.tasks.sandbox == OnOff::On,
        _ => false,
    };
    if sandboxing && rustix::process::geteuid().is_root() {
        // Before any thread starts: the whole process moves, and the sandbox template the
        // agent mounts then lives and dies with it.
        if let Err(e) = caravel_agent::sandbox::private_mount_namespace() {
            eprintln!("warning: {e}; the sandbox template is mounted where the host sees it");
        }
    }
    if !matches!(
        &cli.cmd,
        Cmd::Server(_) | Cmd::Agent(_) | Cmd::Up(_) | Cmd::Bench { .. }
    ) {
        // A client command piped into `head` stops quietly when the pipe closes, as `ls`
        // does, instead of panicking on the failed print. Not for the long-running
        // processes, whose sockets and children must not kill them with SIGPIPE.
        // SAFETY: before any thread starts; restores the default disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("CARAVEL_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(match &cli.cmd {
            Cmd::Server(_) | Cmd::Agent(_) | Cmd::Up(_) => "info",
            _ => "warn",
        })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Short blocking jobs (a run's cgroup removed, its folder emptied) come in bursts
        // as runs end: a small pool whose threads stay is cheaper than hundreds started
        // and stopped (each new thread's allocator start costs more than the job).
        .max_blocking_threads(64)
        .thread_keep_alive(Duration::from_secs(60))
        .build()
        .expect("tokio runtime");
    let code = match rt.block_on(dispatch(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            1
        }
    };
    rt.shutdown_timeout(Duration::from_millis(200));
    std::process::exit(code);
}

/// One line for the user: the error and its causes, each cause once. Typed errors often
/// name their source in their own message already (`listening on X: address in use`);
/// repeating it after a colon would only say it twice.
fn error_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if msg.is_empty() {
            msg = c;
        } else if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg.lines().next().unwrap_or_default().to_string()
}

async fn dispatch(cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Server(a) => {
            let mut cfg = caravel_server::ServerConfig::new(a.data_dir, a.listen);
            if a.sync_full && a.datastore != caravel_server::Datastore::Sqlite {
                bail!("--sync-full: only for the embedded SQLite store (PostgreSQL's own `synchronous_commit` decides there)");
            }
            if a.heartbeat == 0 {
                bail!("--heartbeat: must be more than 0");
            }
            // A sync is held up to one heartbeat, so a healthy node may go two heartbeats
            // between the requests the server sees; fencing needs room above that too.
            if a.lost_after < 3 * a.heartbeat {
                bail!(
                    "--lost-after {} ms: must be at least 3 × --heartbeat ({} ms): a healthy node is heard from only every two heartbeats at worst, and would be counted lost",
                    a.lost_after,
                    a.heartbeat
                );
            }
            cfg.datastore = a.datastore;
            cfg.standby = a.standby;
            cfg.lost_after_ms = a.lost_after;
            cfg.heartbeat_ms = a.heartbeat;
            cfg.fair_share_half_life_ms = a.fair_share_half_life;
            cfg.las = match a.las.as_deref() {
                Some(l) => Some(caravel_sched::Las {
                    thresholds_gpu_s: sim::parse_las(l)?,
                    min_slice_ms: a.las_slice,
                }),
                None if a.las_slice > 0 => bail!("--las-slice: only with --las"),
                None => None,
            };
            cfg.starvation_ms = a.starvation;
            cfg.elastic_grow_after_ms = a.elastic_grow_after;
            cfg.reservations = a.reservations;
            cfg.zone = a.zone;
            cfg.region = a.region;
            cfg.gateway_domains = a.gateway_domain;
            cfg.checkpoint_dir = a.checkpoint_dir;
            cfg.checkpoint_max_bytes = a.checkpoint_max_size;
            cfg.checkpoint_retention_ms = a.checkpoint_retention;
            cfg.log_dir = a.log_dir;
            cfg.log_max_bytes = a.log_max_size;
            cfg.log_retention_ms = a.log_retention;
            cfg.workdir_max_bytes = a.workdir_max_size;
            cfg.workdir_retention_ms = a.workdir_retention;
            if a.header_timeout == 0 || a.body_timeout == 0 {
                bail!("--header-timeout and --body-timeout: must be more than 0");
            }
            cfg.conn_limits = caravel_server::serve::ConnLimits {
                header_timeout: Duration::from_millis(a.header_timeout),
                body_timeout: Duration::from_millis(a.body_timeout),
                max_connections: a.max_connections,
                max_connections_per_client: a.max_connections_per_client,
            };
            cfg.tenant_rate = a.rate_limit;
            cfg.anonymous_rate = a.rate_limit_anonymous;
            cfg.tls = match (a.tls_cert, a.tls_key) {
                (Some(cert), Some(key)) => Some(caravel_server::Tls::Files { cert, key }),
                _ if a.tls_self_signed => {
                    Some(caravel_server::Tls::SelfSigned { names: a.tls_san })
                }
                _ => None,
            };
            if a.sync_full {
                cfg.sync = caravel_store::Sync::Full;
            }
            let s = caravel_server::start(cfg).await?;
            eprintln!("caravel server listening on {}", s.url());
            if let Some(ca) = &s.ca {
                eprintln!(
                    "clients and agents trust its certificate with --ca {}",
                    ca.display()
                );
                if let Some(fp) = std::fs::read(ca)
                    .ok()
                    .and_then(|pem| caravel_tls::pem_fingerprint(&pem))
                {
                    eprintln!(
                        "agents may join with --ca-sha256 {fp} instead of a copy of that file"
                    );
                }
            }
            tokio::select! {
                r = s.wait() => r?,
                _ = tokio::signal::ctrl_c() => {}
            }
            Ok(0)
        }
        Cmd::Agent(a) => {
            let cfg = agent_config(a)?;
            let agent = caravel_agent::start(cfg).await?;
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::spawn(agent.clone().main_loop());
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            // Whatever is left dies with the agent (PR_SET_PDEATHSIG); no cgroups stay behind.
            pool::stop_agent(&agent, &mut term).await;
            Ok(0)
        }
        Cmd::Up(a) => pool::up(a).await,
        Cmd::Down(a) => pool::down(a).await,
        Cmd::Submit(a) => submit(a).await,
        Cmd::Services {
            conn,
            tenant,
            output,
        } => {
            let c = Client::resolve(conn.server, conn.token, conn.ca)?;
            let q = tenant.map(|t| format!("?tenant={t}")).unwrap_or_default();
            let list: Vec<ServiceView> = c.get(&format!("/v1/services{q}")).await?;
            if output.json(&list)? {
                return Ok(0);
            }
            let mut t = Table::new(&[
                "NAME",
                "TENANT",
                "VERSION",
                "READY",
                "WANTED",
                "IN-FLIGHT",
                "PATH",
            ]);
            for s in list {
                t.row(vec![
                    s.name,
                    s.tenant,
                    s.version.to_string(),
                    format!("{}/{}", s.ready, s.replicas.len()),
                    s.wanted.to_string(),
                    s.in_flight.to_string(),
                    s.path,
                ]);
            }
            print!("{t}");
            Ok(0)
        }
        Cmd::Service { cmd } => service_cmd(cmd).await,
        Cmd::Checkpoint { cmd } => checkpoint_cmd(cmd).await,
        Cmd::Registry { cmd } => registry_cmd(cmd).await,
        Cmd::Node { cmd } => {
            let (conn, name, verb) = match cmd {
                NodeCmd::Drain { conn, name } => (conn, name, "drain"),
                NodeCmd::Undrain { conn, name } => (conn, name, "undrain"),
            };
            let c = Client::resolve(conn.server, conn.token, conn.ca)?;
            c.post_empty(&format!("/v1/nodes/{name}/{verb}")).await?;
            println!("node {name} {verb}ed");
            Ok(0)
        }
        Cmd::Jobs {
            conn,
            state,
            tenant,
            output,
        } => {
            let c = Client::resolve(conn.server, conn.token, conn.ca)?;
            let mut q = vec![];
            if let Some(s) = state {
                q.push(format!("state={s}"));
            }
            if let Some(t) = tenant {
                q.push(format!("tenant={t}"));
            }
            let jobs: Vec<JobSummary> = c.get(&format!("/v1/jobs?{}", q.join("&"))).await?;
            if output.json(&jobs)? {
                return Ok(0);
            }
            let mut t = Table::new(&[
                "ID", "NAME", "TENANT", "STATE", "PRIORITY", "TASKS", "AGE", "REASON",
            ]);
            let now = caravel_server::now_ms();
            for j in jobs {
                let reason = if j.state == JobState::Pending {
                    j.pending_reasons
                        .first()
                        .map(|r| r.message.clone())
                        .unwrap_or_default()
                } else {
                    j.message.clone()
                };
                t.row(vec![
                    j.id.to_string(),
                    j.name.unwrap_or_else(|| "-".into()),
                    j.tenant,
                    j.state.as_str().into(),
                    j.priority.as_str().into(),
                    format!("{}/{}", j.tasks_done, j.tasks),
                    age(now - j.submitted_ms),
                    reason,
                ]);
            }
            print!("{t}");
            Ok(0)
        }
        Cmd::Job {
            cmd: JobCmd::Show { conn, id, output },
        } => {
            let c = Client::resolve(conn.server, conn.token, conn.ca)?;
            let j: serde_json::Value = c.get(&format!("/v1/jobs/{}", job_id(&id)?)).await?;
            if output.json(&j)? {
                return Ok(0);
            }
            let j: JobDetail = serde_json::from_value(j)?;
            show_job(&j);
            Ok(0)
        }
        Cmd::Logs {
            conn,
            id,
            task,
            stderr,
            follow,
            tail,
            run,
            all_runs,
        } => {
            if all_runs {
                all_run_logs(conn, &id, task, stderr).await
            } else {
                logs(conn, &id, task, stderr, follow, tail, run).await
            }
        }
        Cmd::Cancel { conn, id } => {
            let c = Client::resolve(conn.server, conn.token, conn.ca)?;
            let j: JobSummary = c
                .post(
                    &format!("/v1/jobs/{}/cancel", job_id(&id)?),
                    &serde_json::json!({}),
                )
                .await?;
            println!(
                "job {} {}",
                j.id,
                if j.state.is_terminal() {
                    "cancelled"
                } else {
                    "cancelling"
                }
            );
            Ok(0)
        }
        Cmd::Nodes { conn, output } => {
            let c = Client::resolve(conn.server, conn.token, conn.ca)?;
            let nodes: Vec<NodeView> = c.get("/v1/nodes").await?;
            if output.json(&nodes)? {
                return Ok(0);
            }
            let mut t = Table::new(&[
                "NAME",
                "STATE",
                "CPU",
                "MEMORY",
                "GPUS",
                "TASKS",
                "ZONE",
                "RACK",
                "ISOLATION",
            ]);
            // Below the table: what keeps each node's isolation below `restricted`.
            let mut notes = Vec::new();
            for n in nodes {
                if !n.isolation_missing.is_empty() {
                    notes.push(format!(
                        "{}: isolation {}; missing: {}",
                        n.name,
                        n.capacity.isolation,
                        n.isolation_missing.join("; ")
                    ));
                }
                let isolation = if n.capacity.images {
                    format!("{},images", n.capacity.isolation)
                } else {
                    n.capacity.isolation.to_string()
                };
                let g = n.capacity.gpu_models();
                let gpus = if g.is_empty() {
                    "-".into()
                } else {
                    let used = n.allocated_devices.len() as f64
                        + n.shared_devices
                            .values()
                            .map(|m| *m as f64 / 1000.0)
                            .sum::<f64>();
                    let desc: Vec<String> = g.iter().map(|(m, c)| format!("{m}:{c}")).collect();
                    format!("{used}/{} ({})", n.capacity.devices.len(), desc.join(","))
                };
                t.row(vec![
                    n.name,
                    if n.drained {
                        format!("{},drained", n.state.as_str())
                    } else {
                        n.state.as_str().into()
                    },
                    format!(
                        "{}/{}",
                        format_cpu(n.allocated_cpu_milli),
                        format_cpu(n.capacity.cpu_milli)
                    ),
                    format!(
                        "{}/{}",
                        format_bytes(n.allocated_memory_bytes),
                        format_bytes(n.capacity.memory_bytes)
                    ),
                    gpus,
                    n.running_tasks.to_string(),
                    dash(&n.topology.zone),
                    dash(&n.topology.rack),
                    isolation,
                ]);
            }
            print!("{t}");
            for line in notes {
                println!("{line}");
            }
            Ok(0)
        }
        Cmd::Tenant {
            cmd:
                TenantCmd::Create {
                    conn,
                    name,
                    quota,
                    guarantee,
                    weight,
                    output,
                },
        } => {
            let guarantee = match guarantee {
                Some(q) => Quota::parse(&q).map_err(|e| anyhow!("--guarantee: {e}"))?,
                None => Quota::default(),
            };
            let c = Client::resolve(conn.server, conn.token, conn.ca)?;
            let quota = match quota {
                Some(q) => Quota::parse(&q).map_err(|e| anyhow!("--quota: {e}"))?,
                None => Quota::default(),
            };
            let r: CreateTenantResponse = c
                .post(
                    "/v1/tenants",
                    &CreateTenantRequest {
                        guarantee,
                        name,
                        weight,
                        quota,
                    },
                )
                .await?;
            if !output.json(&r)? {
                println!("tenant {} created (id {})", r.tenant.name, r.tenant.id);
                println!("token: {}", r.token);
                println!("(this token is shown once; the server keeps only its hash)");
            }
            Ok(0)
        }
        Cmd::Tenants { conn, output } => {
            let c = Client::resolve(conn.server, conn.token, conn.ca)?;
            let ts: Vec<TenantView> = c.get("/v1/tenants").await?;
            if output.json(&ts)? {
                return Ok(0);
            }
            let mut t = Table::new(&["NAME", "WEIGHT", "GUARANTEE", "QUOTA", "STORAGE"]);
            for x in ts {
                let g = if x.guarantee == Quota::default() {
                    "none".into()
                } else {
                    quota_text(&x.guarantee)
                };
                let storage = match x.quota.storage_bytes {
                    Some(q) => format!(
                        "{} of {}",
                        format_bytes(x.storage_used_bytes),
                        format_bytes(q)
                    ),
                    None => format_bytes(x.storage_used_bytes),
                };
                t.row(vec![
                    x.name,
                    x.weight.to_string(),
                    g,
                    quota_text(&x.quota),
                    storage,
                ]);
            }
            print!("{t}");
            Ok(0)
        }
        Cmd::Usage {
            conn,
            tenant,
            job,
            output,
        } => {
            let c = Client::resolve(conn.server, conn.token, conn.ca)?;
            let mut q = vec![];
            if let Some(t) = tenant {
                q.push(format!("tenant={t}"));
            }
            if let Some(j) = job {
                q.push(format!("job={j}"));
            }
            let u: UsageResponse = c.get(&format!("/v1/usage?{}", q.join("&"))).await?;
            if output.json(&u)? {
                return Ok(0);
            }
            let render = |rows: &[UsageTotals], by_job: bool| {
                let mut head = vec!["TENANT"];
                if by_job {
                    head.insert(0, "JOB");
                }
                head.extend(["RUNS", "WALL", "CPU-HOURS", "MEM-GIB-HOURS", "GPU-HOURS"]);
                let mut t = Table::new(&head);
                for r in rows {
                    let gpu: Vec<String> = r
                        .gpu_ms
                        .iter()
                        .map(|(m, ms)| format!("{m}:{:.3}", *ms as f64 / 3.6e6))
                        .collect();
                    let mut row = vec![];
                    if let Some(j) = r.job {
                        row.push(j.to_string());
                    }
                    row.extend([
                        r.tenant.clone(),
                        r.runs.to_string(),
                        format!("{:.1}s", r.wall_ms as f64 / 1000.0),
                        format!("{:.4}", r.cpu_milli_ms as f64 / 1000.0 / 3.6e6),
                        format!(
                            "{:.4}",
                            r.memory_byte_ms as f64 / (1u64 << 30) as f64 / 3.6e6
                        ),
                        if gpu.is_empty() {
                            "-".into()
                        } else {
                            gpu.join(",")
                        },
                    ]);
                    t.row(row);
                }
                t
            };
            println!("By tenant:");
            print!("{}", render(&u.by_tenant, false));
            println!("\nBy job:");
            print!("{}", render(&u.by_job, true));
            Ok(0)
        }
        Cmd::Bench { cmd } => bench::run(cmd).await,
        Cmd::Sim { cmd } => sim::run(cmd),
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.into()
    }
}

fn quota_text(q: &Quota) -> String {
    let mut v = vec![];
    if let Some(c) = q.cpu_milli {
        v.push(format!("cpu={}", format_cpu(c)));
    }
    if let Some(m) = q.memory_bytes {
        v.push(format!("memory={}", format_bytes(m)));
    }
    for (m, c) in &q.gpus {
        v.push(format!("gpu/{m}={c}"));
    }
    if let Some(s) = q.storage_bytes {
        v.push(format!("storage={}", format_bytes(s)));
    }
    if v.is_empty() {
        "unlimited".into()
    } else {
        v.join(",")
    }
}

fn age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn gateway_domain(s: &str) -> Result<String, String> {
    let d = s.trim_end_matches('.').to_ascii_lowercase();
    if d.starts_with("*.") || d.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "`{s}` must be a DNS name such as apps.example.com (no `*.`, not an IP address)"
        ));
    }
    caravel_tls::check_name(&d).map_err(|e| e.to_string())?;
    Ok(d)
}

fn tls_name(s: &str) -> Result<String, String> {
    caravel_tls::check_name(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

fn job_id(s: &str) -> Result<u64> {
    s.parse::<u64>()
        .map_err(|_| anyhow!("`{s}` is not a job id (a number, as `caravel jobs` shows)"))
}

fn agent_config(a: AgentArgs) -> Result<caravel_agent::AgentConfig> {
    let name = match a.name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "node".into()),
    };
    caravel_core::validate_name("--name", &name).map_err(|e| anyhow!("{e}"))?;
    let work_dir = a
        .work_dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("caravel-agent-{name}")));
    let mut c = caravel_agent::AgentConfig::new(a.server, a.token, name, work_dir);
    c.topology = Topology {
        region: a.region,
        zone: a.zone,
        rack: a.rack,
    };
    c.labels = a.labels.into_iter().collect();
    c.cpu_milli = a.cpus;
    c.memory_bytes = a.memory;
    c.gpus = a.gpus.map(|g| g.0).unwrap_or_default();
    c.listen = a.listen;
    c.advertise = a.advertise;
    c.use_cgroups = !a.no_cgroups;
    c.ca = a.ca;
    c.ca_sha256 = a.ca_sha256;
    c.log_ship_every = Duration::from_millis(a.log_ship_every);
    c.run_retention = Duration::from_millis(a.run_retention);
    a.tasks.apply(&mut c);
    c.watchdog_exe = std::env::current_exe().ok();
    Ok(c)
}

/// The spec, and the folder to ship as its working directory (`--workdir`, or the job
/// file's `workdir`, relative to the file).
fn build_spec(a: &SubmitArgs) -> Result<(JobSpec, Option<PathBuf>)> {
    let mut workdir = None;
    let mut spec = match &a.file {
        Some(f) => {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let mut jf = jobfile::JobFile::parse(&text, &f.display().to_string())?;
            if !a.command.is_empty() {
                jf.command = Some(a.command[0].clone());
                jf.args = a.command[1..].to_vec();
            }
            if let Some(w) = jf.workdir.take() {
                let base = f.parent().unwrap_or(Path::new("."));
                workdir = Some(base.join(w));
            }
            jf.into_spec()?
        }
        None => {
            if a.command.is_empty() && a.image.is_none() {
                bail!("command: missing; use `caravel submit [flags] -- CMD ARGS...` or `-f job.toml`");
            }
            // With an image and no command, the image's entrypoint and command run.
            JobSpec::simple(a.command.first().map(String::as_str).unwrap_or(""), &[])
        }
    };
    if a.file.is_none() && !a.command.is_empty() {
        spec.args = a.command[1..].to_vec();
    }
    if let Some(n) = &a.name {
        spec.name = Some(n.clone());
    }
    if let Some((min, n)) = a.tasks {
        spec.tasks = n;
        spec.min_tasks = min;
    }
    if let Some(c) = &a.cpus {
        spec.resources.cpu_milli = parse_cpu_milli(c).map_err(|e| anyhow!("--cpus: {e}"))?;
    }
    if let Some(m) = &a.memory {
        spec.resources.memory_bytes = parse_bytes(m).map_err(|e| anyhow!("--memory: {e}"))?;
    }
    if let Some(g) = &a.gpus {
        spec.resources.gpu = Some(jobfile::gpu_request(g, "--gpus")?);
    }
    if let Some(p) = a.priority {
        spec.priority = match p {
            PriorityArg::Online => Priority::Online,
            PriorityArg::Batch => Priority::Batch,
            PriorityArg::Spot => Priority::Spot,
        };
    }
    if let Some(t) = &a.max_runtime {
        spec.max_runtime_ms =
            Some(parse_duration_ms(t).map_err(|e| anyhow!("--max-runtime: {e}"))?);
    }
    if let Some(t) = &a.hang_timeout {
        spec.hang_timeout_ms =
            Some(parse_duration_ms(t).map_err(|e| anyhow!("--hang-timeout: {e}"))?);
    }
    if let Some(r) = a.max_retries {
        spec.max_retries = r;
    }
    if a.gang {
        spec.gang = true;
    }
    if a.fence {
        spec.fence = true;
    }
    if let Some(t) = a.topology {
        spec.topology = Some(match t {
            TopologyArg::Node => caravel_core::TopologyLevel::Node,
            TopologyArg::Rack => caravel_core::TopologyLevel::Rack,
            TopologyArg::Zone => caravel_core::TopologyLevel::Zone,
        });
    }
    if let Some(g) = &a.kill_grace {
        spec.kill_grace_ms = Some(parse_duration_ms(g).map_err(|e| anyhow!("--kill-grace: {e}"))?);
    }
    if let Some(m) = &a.min_runtime {
        spec.min_runtime_ms =
            Some(parse_duration_ms(m).map_err(|e| anyhow!("--min-runtime: {e}"))?);
    }
    for e in &a.env {
        let (k, v) = e
            .split_once('=')
            .ok_or_else(|| anyhow!("--env: `{e}` is not KEY=VALUE"))?;
        spec.env.insert(k.into(), v.into());
    }
    for e in &a.secret_env {
        let (k, v) = e
            .split_once('=')
            .ok_or_else(|| anyhow!("--secret-env: an argument is not KEY=VALUE (it is not shown here, in case it is the secret)"))?;
        spec.secret_env.insert(k.into(), v.into());
    }
    if let Some(i) = &a.image {
        spec.image = Some(i.clone());
    }
    if let Some(l) = a.isolation {
        spec.isolation = Some(l);
    }
    if let Some(d) = &a.disk {
        spec.disk_bytes = Some(parse_bytes(d).map_err(|e| anyhow!("--disk: {e}"))?);
    }
    if let Some(w) = &a.workdir {
        workdir = Some(w.clone());
    }
    spec.validate().map_err(|e| anyhow!("{e}"))?;
    Ok((spec, workdir))
}

async fn submit(a: SubmitArgs) -> Result<i32> {
    let (mut spec, workdir) = build_spec(&a)?;
    let c = Client::resolve(
        a.conn.server.clone(),
        a.conn.token.clone(),
        a.conn.ca.clone(),
    )?;
    if let Some(dir) = &workdir {
        spec.workdir = Some(workdir::ship(&c, dir, a.tenant.as_deref()).await?);
    }
    let path = match &a.tenant {
        Some(t) => format!("/v1/jobs?tenant={t}"),
        None => "/v1/jobs".into(),
    };
    let key = match &a.idempotency_key {
        Some(k) => k.clone(),
        None => {
            let mut b = [0u8; 16];
            getrandom::fill(&mut b)
                .map_err(|e| anyhow!("getting randomness for the idempotency key: {e}"))?;
            format!("cli-{}", hex::encode(b))
        }
    };
    let r: SubmitResponse = c
        .post_idempotent(&path, &spec, &key, Duration::from_secs(30))
        .await?;
    if a.output == Output::Json && !a.wait {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(0);
    }
    if !a.wait {
        println!("{}", r.id);
        return Ok(0);
    }
    eprintln!("job {} submitted", r.id);
    let mut last_state = None;
    loop {
        let j: JobDetail = c.get(&format!("/v1/jobs/{}", r.id)).await?;
        if last_state != Some(j.summary.state) {
            eprintln!("job {} {}", r.id, j.summary.state.as_str());
            last_state = Some(j.summary.state);
        }
        if j.summary.state.is_terminal() {
            // Print the first task's output like sbatch --wait users read slurm-N.out.
            for t in 0..j.summary.tasks.min(8) {
                if let Ok(resp) = c.get_raw(&format!("/v1/jobs/{}/logs?task={t}", r.id)).await {
                    let b = resp.bytes().await.unwrap_or_default();
                    if !b.is_empty() {
                        if j.summary.tasks > 1 {
                            println!("--- task {t} ---");
                        }
                        print!("{}", String::from_utf8_lossy(&b));
                    }
                }
            }
            if a.output == Output::Json {
                println!("{}", serde_json::to_string(&j.summary)?);
            }
            eprintln!(
                "job {} {}: {}",
                r.id,
                j.summary.state.as_str(),
                j.summary.message
            );
            return Ok(match j.summary.state {
                JobState::Succeeded => 0,
                JobState::Cancelled => 3,
                _ => j
                    .task_list
                    .iter()
                    .filter_map(|t| t.exit_code)
                    .find(|c| *c != 0)
                    .unwrap_or(1)
                    .clamp(1, 255),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn checkpoint_cmd(cmd: CheckpointCmd) -> Result<i32> {
    match cmd {
        CheckpointCmd::Ls { conn, id, output } => {
            let c = Client::resolve(conn.server, conn.token, conn.ca)?;
            let id = job_id(&id)?;
            let list: Vec<CheckpointView> = c.get(&format!("/v1/jobs/{id}/checkpoints")).await?;
            if output.json(&list)? {
                return Ok(0);
            }
            if list.is_empty() {
                eprintln!("job {id} has no checkpoints (tasks save them by writing into $CARAVEL_CHECKPOINT_DIR)");
                return Ok(0);
            }
            let now = caravel_server::now_ms();
            let mut t = Table::new(&["TASK", "VERSION", "SIZE", "RUN", "SAVED"]);
            for v in list {
                t.row(vec![
                    v.task.to_string(),
                    v.version.to_string(),
                    format_bytes(v.bytes),
                    v.run.to_string(),
                    format!("{} ago", age(now - v.saved_ms)),
                ]);
            }
            print!("{t}");
            Ok(0)
        }
        CheckpointCmd::Get {
            conn,
            id,
            task,
            to,
            extract,
        } => {
            use std::io::Write;
            use tokio::io::AsyncWriteExt;
            let c = Client::resolve(conn.server, conn.token, conn.ca)?;
            let id = job_id(&id)?;
            if to.is_none()
                && extract.is_none()
                && std::io::IsTerminal::is_terminal(&std::io::stdout())
            {
                bail!("the checkpoint is a tar archive: redirect it (`> ckpt.tar`), or use --to FILE or --extract DIR");
            }
            let mut resp = c
                .download(&format!("/v1/jobs/{id}/tasks/{task}/checkpoint"))
                .await?;
            let sha = resp
                .headers()
                .get("x-caravel-sha256")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let version = resp
                .headers()
                .get("x-caravel-checkpoint-version")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_string();
            // To a file next to the destination first: a download cut short never passes
            // for a checkpoint.
            let file = match (&to, &extract) {
                (Some(f), _) => {
                    let mut p = f.clone().into_os_string();
                    p.push(".part");
                    Some(PathBuf::from(p))
                }
                (None, Some(d)) => {
                    std::fs::create_dir_all(d)
                        .with_context(|| format!("--extract {}", d.display()))?;
                    Some(d.join(".caravel-checkpoint.tar.part"))
                }
                (None, None) => None,
            };
            use sha2::Digest;
            let mut hash = sha2::Sha256::new();
            let mut out = match &file {
                Some(p) => Some(tokio::io::BufWriter::with_capacity(
                    1 << 20,
                    tokio::fs::File::create(p)
                        .await
                        .with_context(|| p.display().to_string())?,
                )),
                None => None,
            };
            let mut stdout = std::io::stdout().lock();
            while let Some(chunk) = resp.chunk().await? {
                hash.update(&chunk);
                match &mut out {
                    Some(f) => f.write_all(&chunk).await?,
                    None => stdout.write_all(&chunk)?,
                }
            }
            stdout.flush()?;
            let got = hex::encode(hash.finalize());
            if sha.as_deref().is_some_and(|s| s != got) {
                if let Some(p) = &file {
                    let _ = std::fs::remove_file(p);
                }
                bail!(
                    "the checkpoint arrived damaged (SHA-256 {got}, not {})",
                    sha.unwrap_or_default()
                );
            }
            if let Some(mut f) = out {
                f.flush().await?;
            }
            match (to, extract, file) {
                (Some(dest), _, Some(part)) => {
                    std::fs::rename(&part, &dest).with_context(|| dest.display().to_string())?;
                    eprintln!(
                        "job {id} task {task}: checkpoint version {version} written to {}",
                        dest.display()
                    );
                }
                (None, Some(dir), Some(part)) => {
                    let r = caravel_agent::checkpoint::unpack(&part, &dir);
                    let _ = std::fs::remove_file(&part);
                    r.with_context(|| format!("unpacking into {}", dir.display()))?;
                    eprintln!(
                        "job {id} task {task}: checkpoint version {version} unpacked into {}",
                        dir.display()
                    );
                }
                _ => {}
            }
            Ok(0)
        }
    }
}

/// Where the last `n` lines of a task's stream start: reads back from the end, a window
/// four times larger each time, until it holds `n` line ends or reaches the first byte
/// kept. Returns the offset, the end it counted back from, and the run they are of.
async fn tail_start(
    c: &Client,
    id: u64,
    task: u32,
    stream: &str,
    n: u64,
    run_q: &str,
) -> Result<(u64, u64, Option<String>)> {
    let path = |offset: u64| {
        format!("/v1/jobs/{id}/logs?task={task}&stream={stream}&offset={offset}{run_q}")
    };
    let head = |resp: &reqwest::Response, k: &str| {
        resp.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let probe = c.get_raw(&path(u64::MAX / 2)).await?;
    let run = head(&probe, "x-caravel-run");
    let Some(end) = head(&probe, "x-caravel-log-end").and_then(|v| v.parse::<u64>().ok()) else {
        // A server or agent that does not say where the stream ends: from the start.
        return Ok((0, u64::MAX, run));
    };
    let mut window = 64u64 << 10;
    loop {
        let start = end.saturating_sub(window);
        let mut buf = Vec::new();
        let mut first = None;
        let mut at = start;
        while at < end {
            let resp = c.get_raw(&path(at)).await?;
            if head(&resp, "x-caravel-run") != run {
                // A retry began meanwhile: its stream is another one.
                return Ok((0, u64::MAX, head(&resp, "x-caravel-run")));
            }
            let from = head(&resp, "x-caravel-log-from")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(at);
            first.get_or_insert(from);
            let body = resp.bytes().await?;
            if body.is_empty() {
                break;
            }
            at = from + body.len() as u64;
            buf.extend_from_slice(&body);
        }
        let begin = first.unwrap_or(start);
        // A running task's stream grew while it was read: count back from `end`, where
        // the printing stops, not from what came after it.
        buf.truncate(end.saturating_sub(begin) as usize);
        let text = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let mut seen = 0;
        for (i, b) in text.iter().enumerate().rev() {
            if *b == b'\n' {
                seen += 1;
                if seen == n {
                    return Ok((begin + i as u64 + 1, end, run));
                }
            }
        }
        if n == 0 {
            return Ok((end, end, run));
        }
        // Fewer lines than asked in all there is: all of it.
        if begin > start || start == 0 {
            return Ok((begin, end, run));
        }
        window *= 4;
    }
}

/// The runs of a job's task, oldest first; an error naming the task when it has none.
async fn task_runs(c: &Client, id: u64, task: u32) -> Result<Vec<caravel_core::api::RunView>> {
    let j: JobDetail = c.get(&format!("/v1/jobs/{id}")).await?;
    if task >= j.summary.tasks {
        anyhow::bail!(
            "--task {task}: job {id} has tasks 0 to {}",
            j.summary.tasks.saturating_sub(1)
        );
    }
    let mut runs: Vec<_> = j.runs.into_iter().filter(|r| r.index == task).collect();
    runs.sort_by_key(|r| (r.attempt, r.id));
    Ok(runs)
}

/// `logs --all-runs`: every run's output of the task, each line prefixed by its run.
async fn all_run_logs(conn: Conn, id: &str, task: u32, stderr: bool) -> Result<i32> {
    use std::io::Write;
    let c = Client::resolve(conn.server, conn.token, conn.ca)?;
    let id = job_id(id)?;
    let stream = if stderr { "stderr" } else { "stdout" };
    let runs = task_runs(&c, id, task).await?;
    if runs.is_empty() {
        eprintln!("caravel: job {id} task {task} has not run yet");
        return Ok(0);
    }
    let mut out = std::io::stdout().lock();
    for r in runs {
        let prefix = format!("[run {} attempt {}] ", r.id, r.attempt);
        let mut offset = 0u64;
        let mut pending = Vec::new();
        loop {
            let resp = c
                .get_raw(&format!(
                    "/v1/jobs/{id}/logs?task={task}&stream={stream}&offset={offset}&run={}",
                    r.id
                ))
                .await?;
            let next: u64 = resp
                .headers()
                .get("x-caravel-next-offset")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(offset);
            let body = resp.bytes().await?;
            if body.is_empty() {
                break;
            }
            pending.extend_from_slice(&body);
            offset = next;
        }
        for line in pending.split_inclusive(|b| *b == b'\n') {
            out.write_all(prefix.as_bytes())?;
            out.write_all(line)?;
            if !line.ends_with(b"\n") {
                out.write_all(b"\n")?;
            }
        }
    }
    out.flush()?;
    Ok(0)
}

async fn logs(
    conn: Conn,
    id: &str,
    task: u32,
    stderr: bool,
    follow: bool,
    tail: Option<u64>,
    only_run: Option<u64>,
) -> Result<i32> {
    use std::io::Write;
    let c = Client::resolve(conn.server, conn.token, conn.ca)?;
    let id = job_id(id)?;
    let stream = if stderr { "stderr" } else { "stdout" };
    if let Some(r) = only_run {
        let runs = task_runs(&c, id, task).await?;
        if !runs.iter().any(|x| x.id.0 == r) {
            anyhow::bail!(
                "--run {r}: not a run of job {id} task {task} (its runs: {})",
                if runs.is_empty() {
                    "none yet".to_string()
                } else {
                    runs.iter()
                        .map(|x| x.id.0.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
        }
    }
    let run_q = only_run.map(|r| format!("&run={r}")).unwrap_or_default();
    let mut offset = 0u64;
    let mut run: Option<String> = None;
    // Without --follow, --tail prints the last lines as of now, not what comes after.
    let mut stop_at = u64::MAX;
    if let Some(n) = tail {
        let end;
        (offset, end, run) = tail_start(&c, id, task, stream, n, &run_q).await?;
        if !follow {
            stop_at = end;
        }
    }
    loop {
        if offset >= stop_at {
            return Ok(0);
        }
        let resp = c
            .get_raw(&format!(
                "/v1/jobs/{id}/logs?task={task}&stream={stream}&offset={offset}{run_q}"
            ))
            .await?;
        let h = |k: &str| {
            resp.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let this_run = h("x-caravel-run");
        if this_run.is_some() && run.is_some() && this_run != run {
            if stop_at != u64::MAX {
                // The lines counted were the old run's, and they were all printed.
                return Ok(0);
            }
            // A retry started: follow the new run from its beginning.
            offset = 0;
            run = this_run;
            continue;
        }
        run = this_run.or(run);
        let next: u64 = h("x-caravel-next-offset")
            .and_then(|v| v.parse().ok())
            .unwrap_or(offset);
        let done = h("x-caravel-done").as_deref() == Some("1");
        if let Some(from) = h("x-caravel-log-from").and_then(|v| v.parse::<u64>().ok()) {
            if from > offset {
                eprintln!(
                    "caravel: bytes {offset} to {} of this output ({} bytes) are no longer kept: the server keeps the end of each stream, up to its --log-max-size",
                    from - 1,
                    from - offset
                );
            }
        }
        let body = resp.bytes().await?;
        let start = next.saturating_sub(body.len() as u64);
        let body = &body[..body.len().min(stop_at.saturating_sub(start) as usize)];
        std::io::stdout().write_all(body)?;
        std::io::stdout().flush()?;
        offset = next;
        // Each answer carries at most a chunk: read on until one comes back empty.
        if body.is_empty() {
            if !follow || done {
                return Ok(0);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

fn show_job(j: &JobDetail) {
    let s = &j.summary;
    let now = caravel_server::now_ms();
    println!(
        "Job:        {}{}",
        s.id,
        s.name
            .as_ref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default()
    );
    println!("Tenant:     {}", s.tenant);
    println!("State:      {}", s.state.as_str());
    println!("Priority:   {}", s.priority.as_str());
    println!(
        "Command:    {} {}",
        j.spec.command,
        j.spec
            .args
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let r = &j.spec.resources;
    println!(
        "Resources:  {} x (cpu {}, memory {}{}){}",
        s.tasks,
        format_cpu(r.cpu_milli),
        format_bytes(r.memory_bytes),
        r.gpu
            .as_ref()
            .map(|g| format!(", gpu {}:{}", g.model, g.count))
            .unwrap_or_default(),
        match (s.gang, j.spec.fence) {
            (true, true) => ", gang, fenced",
            (true, false) => ", gang",
            (false, true) => ", fenced",
            (false, false) => "",
        }
    );
    println!("Submitted:  {} ago", age(now - s.submitted_ms));
    if !s.message.is_empty() {
        println!("Message:    {}", s.message);
    }
    if !s.pending_reasons.is_empty() {
        println!("Pending because:");
        for r in &s.pending_reasons {
            println!("  [{}] {}", r.code, r.message);
        }
    }
    let mut t = Table::new(&["TASK", "STATE", "ATTEMPTS", "NODE", "EXIT"]);
    for x in &j.task_list {
        t.row(vec![
            x.index.to_string(),
            x.state.as_str().into(),
            x.attempts.to_string(),
            x.node.clone().unwrap_or_else(|| "-".into()),
            x.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    println!("Tasks:");
    print!("{t}");
    if !j.runs.is_empty() {
        let mut t = Table::new(&[
            "RUN", "TASK", "ATTEMPT", "NODE", "DEVICES", "STATE", "DURATION", "FROM", "MESSAGE",
        ]);
        for r in &j.runs {
            let dur = match (r.started_ms, r.ended_ms) {
                (Some(a), Some(b)) => format!("{:.3}s", (b - a) as f64 / 1000.0),
                (Some(a), None) => format!("{:.1}s", (now - a) as f64 / 1000.0),
                _ => "-".into(),
            };
            t.row(vec![
                r.id.to_string(),
                r.index.to_string(),
                r.attempt.to_string(),
                r.node.clone(),
                if r.devices.is_empty() {
                    "-".into()
                } else {
                    r.devices
                        .iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                },
                r.state.as_str().into(),
                dur,
                // The checkpoint it started from (a gang's: its cut).
                match r.checkpoint {
                    Some(0) => "start".into(),
                    Some(v) => format!("ckpt {v}"),
                    None => "-".into(),
                },
                r.message.clone(),
            ]);
        }
        println!("Runs:");
        print!("{t}");
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn tenant_query(t: &Option<String>) -> String {
    t.as_ref()
        .map(|t| format!("?tenant={t}"))
        .unwrap_or_default()
}

fn show_service(s: &ServiceView) {
    println!("service   {}/{} (version {})", s.tenant, s.name, s.version);
    println!(
        "path      {}{}",
        s.path,
        if s.public { " (public)" } else { "" }
    );
    if let Some(h) = &s.host {
        println!("host      {h}");
    }
    println!(
        "replicas  {} ready, {} wanted (min {}, max {}), {} requests in flight",
        s.ready, s.wanted, s.spec.min_replicas, s.spec.max_replicas, s.in_flight
    );
    println!("command   {} {}", s.spec.command, s.spec.args.join(" "));
    let protocol = match s.spec.protocol {
        caravel_core::Protocol::Http => "http (HTTP/1.1)".to_string(),
        caravel_core::Protocol::H2c => "h2c (HTTP/2)".to_string(),
        caravel_core::Protocol::Grpc => match &s.host {
            Some(h) => format!("grpc (HTTP/2); gRPC clients dial {h}"),
            None => format!(
                "grpc (HTTP/2); gRPC clients send x-caravel-service: {}/{}",
                s.tenant, s.name
            ),
        },
    };
    println!("protocol  {protocol}");
    let r = &s.spec.readiness;
    let check = match r.grpc_check(s.spec.protocol) {
        Some("") => "gRPC health check of the server".to_string(),
        Some(g) => format!("gRPC health check of {g}"),
        None => format!("GET {}", r.path),
    };
    println!(
        "readiness {check} every {} ms, out after {} failures",
        r.period_ms, r.failure_threshold
    );
    if let Some(ro) = &s.rollout {
        if ro.state == "stuck" {
            println!("rollout   STUCK: {}", ro.message);
        } else {
            println!(
                "rollout   v{} progressing (started {} ago, last moved {} ago)",
                ro.version,
                age(caravel_server::now_ms() - ro.started_ms),
                age(caravel_server::now_ms() - ro.progress_ms)
            );
        }
    }
    if !s.replicas.is_empty() {
        let mut t = Table::new(&[
            "JOB",
            "VERSION",
            "STATE",
            "NODE",
            "ADDRESS",
            "ZONE",
            "IN-FLIGHT",
        ]);
        for r in &s.replicas {
            t.row(vec![
                r.job.to_string(),
                r.version.to_string(),
                r.state.clone(),
                r.node.clone().unwrap_or_else(|| "-".into()),
                r.addr.clone().unwrap_or_else(|| "-".into()),
                if r.zone.is_empty() {
                    "-".into()
                } else {
                    r.zone.clone()
                },
                r.in_flight.to_string(),
            ]);
        }
        print!("{t}");
    }
    if !s.events.is_empty() {
        println!("events");
        let now = caravel_server::now_ms();
        for e in s.events.iter().rev().take(10).rev() {
            println!("  {:>8} ago  {}", age(now - e.at_ms), e.message);
        }
    }
}

async fn service_cmd(cmd: ServiceCmd) -> Result<i32> {
    match cmd {
        ServiceCmd::Deploy {
            conn,
            file,
            tenant,
            output,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let base = std::fs::canonicalize(&file)
                .ok()
                .and_then(|p| p.parent().map(|d| d.to_path_buf()));
            let sf = servicefile::ServiceFile::parse(&text, &file.display().to_string())?;
            let shipped = sf
                .workdir
                .clone()
                .map(|w| file.parent().unwrap_or(std::path::Path::new(".")).join(w));
            let mut spec = sf.into_spec_at(base.as_deref())?;
            let c = Client::resolve(conn.server, conn.token, conn.ca)?;
            if let Some(dir) = &shipped {
                spec.workdir = Some(workdir::ship(&c, dir, tenant.as_deref()).await?);
            }
            let v: ServiceView = c
                .post(&format!("/v1/services{}", tenant_query(&tenant)), &spec)
                .await?;
            if output.json(&v)? {
                // printed
            } else if let (true, Some(host)) = (v.changed, &v.host) {
                println!(
                    "service {} version {} deployed; call it at {host} (or {}{})",
                    v.name,
                    v.version,
                    c.base(),
                    v.path
                );
            } else if v.changed && v.spec.protocol == caravel_core::Protocol::Grpc {
                println!(
                    "service {} version {} deployed; call it at {} with the header x-caravel-service: {}/{}",
                    v.name,
                    v.version,
                    c.base(),
                    v.tenant,
                    v.name
                );
            } else if v.changed {
                println!(
                    "service {} version {} deployed; call it at {}{}",
                    v.name,
                    v.version,
                    c.base(),
                    v.path
                );
            } else {
                println!("service {} unchanged (version {})", v.name, v.version);
            }
            Ok(0)
        }
        ServiceCmd::Show {
            conn,
            name,
            tenant,
            output,
        } => {
            let c = Client::resolve(conn.server, conn.token, conn.ca)?;
            let v: ServiceView = c
                .get(&format!("/v1/services/{name}{}", tenant_query(&tenant)))
                .await?;
            if !output.json(&v)? {
                show_service(&v);
            }
            Ok(0)
        }
        ServiceCmd::Delete {
            conn,
            name,
            tenant,
            output,
        } => {
            let c = Client::resolve(conn.server, conn.token, conn.ca)?;
            c.delete(&format!("/v1/services/{name}{}", tenant_query(&tenant)))
                .await?;
            if !output.json(&serde_json::json!({"deleted": name}))? {
                println!("service {name} deleted");
            }
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Like the server's typed errors: the message names the source, which is also its
    /// `source()`.
    #[derive(Debug)]
    struct Listen {
        source: std::io::Error,
    }
    impl std::fmt::Display for Listen {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "listening on 127.0.0.1:1: {}", self.source)
        }
    }
    impl std::error::Error for Listen {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn a_weight_is_a_finite_number_above_zero() {
        assert_eq!(weight("2.5"), Ok(2.5));
        for bad in ["nan", "inf", "-1", "0", "x", ""] {
            assert!(weight(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_error_line_names_each_cause_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let e = anyhow::Error::new(Listen { source: io() });
        assert_eq!(
            error_line(&e),
            "listening on 127.0.0.1:1: Address already in use"
        );
        // A cause the message does not contain is still shown, after a colon.
        let e = anyhow::Error::new(io()).context("reading job.toml");
        assert_eq!(error_line(&e), "reading job.toml: Address already in use");
    }
}
