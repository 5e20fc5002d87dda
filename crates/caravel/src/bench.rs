//! `caravel bench e2e`: pushes trivial jobs end to end through a real server and a real
//! agent (separate processes, loopback, temporary directory) and prints figures. The last
//! line is one JSON object so scripts can read it.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use caravel_core::api::{JobSummary, NodeView, SubmitResponse};
use caravel_core::{JobSpec, JobState};
use clap::Subcommand;

use crate::client::Client;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// The pure scheduler alone, in memory, single thread.
    Sched {
        /// k8s-5k, c1m, gang-1024, gang-small, pool-100k.
        #[arg(long)]
        scenario: String,
    },
    /// Trivial jobs (`true`) through a server and a local agent.
    E2e {
        #[arg(long, default_value_t = 2000)]
        jobs: usize,
        /// Concurrent submitters.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Jobs for the light-load latency phase (one at a time).
        #[arg(long, default_value_t = 100)]
        light: usize,
        /// Run the agent without cgroups, to measure what per-task cgroups cost.
        #[arg(long)]
        no_cgroups: bool,
        /// Parent folder for the bench's server data and agent work dirs (default: the
        /// system temp dir). Each run gets its own directory, three inodes per task.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// The server's `--datastore` (default: the embedded SQLite store).
        #[arg(long, default_value = "sqlite")]
        datastore: String,
        /// fsync every SQLite commit (the server's `--sync-full`).
        #[arg(long)]
        sync_full: bool,
        /// Sandboxed tasks (`on`, the agent's default), unsandboxed (`off`), or both
        /// one after the other on fresh pools (`both`), to show what the sandbox costs.
        #[arg(long, value_enum, default_value = "both")]
        sandbox: SandboxMode,
    },
    /// The tinylm example service through the gateway: cold start, reaction to load steps,
    /// and platform errors over a long run with scale-up, scale-down and rolling updates.
    Autoscale {
        /// Load steps (1 client to --step-clients) to time.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Requests in the long run.
        #[arg(long, default_value_t = 200_000)]
        requests: u64,
        /// Clients during a load step (the service targets 2 in flight per replica).
        #[arg(long, default_value_t = 8)]
        step_clients: usize,
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// Gateway overhead against calling a replica directly, and throughput side by side
    /// with nginx as a reverse proxy on the same backend.
    Gateway {
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Seconds per target under load.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Unary gRPC calls over HTTP/2 instead of HTTP/1.1 GETs (nginx: grpc_pass).
        #[arg(long)]
        grpc: bool,
        /// HTTPS to the gateway (a self-signed pool CA) and to nginx (the same
        /// certificate); the replica is called in plain HTTP either way.
        #[arg(long, conflicts_with = "grpc")]
        tls: bool,
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// Tasks in OCI images: the start of a task in a cached image against one without,
    /// and how often each layer is downloaded when a burst of tasks starts an uncached
    /// image (a local docker-registry and a busybox image).
    Image {
        /// Jobs timed per case, one at a time.
        #[arg(long, default_value_t = 50)]
        jobs: usize,
        /// Tasks of the burst.
        #[arg(long, default_value_t = 100)]
        tasks: u32,
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// The replica of the gateway benches and tests (reads PORT); not for direct use.
    #[command(hide = true)]
    Backend {
        /// Serve gRPC (health and an echo) instead of plain HTTP.
        #[arg(long)]
        grpc: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    On,
    Off,
    Both,
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        // Agents first, so they do not log a lost server on the way out.
        for c in self.0.iter_mut().rev() {
            // SIGTERM lets the agent remove its cgroups; SIGKILL if it lingers.
            caravel_agent::signal_process(c.id() as i32, rustix::process::Signal::TERM);
            for _ in 0..50 {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A server and one agent (256 CPUs, 256 GiB declared, so placement never binds) as
/// child processes on loopback, data under `dir`; stopped when dropped.
pub struct BenchPool {
    pub url: String,
    pub admin: String,
    /// The pool CA, when the server runs with `--tls-self-signed`.
    pub ca: Option<std::path::PathBuf>,
    _procs: Procs,
}

/// A server and one agent (see `BenchPool`), with extra `caravel server` and `caravel agent`
/// arguments.
pub async fn start_pool_with(
    dir: &std::path::Path,
    no_cgroups: bool,
    server_args: &[String],
    agent_args: &[String],
) -> Result<BenchPool> {
    let exe = std::env::current_exe()?;
    let port = free_port()?;
    let tls = server_args.iter().any(|a| a == "--tls-self-signed");
    let url = format!("{}://127.0.0.1:{port}", if tls { "https" } else { "http" });
    let ca = tls.then(|| dir.join("server/tls/ca.pem"));
    let mut procs = Procs(vec![]);
    procs.0.push(
        Command::new(&exe)
            .args([
                "server",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(dir.join("server"))
            .args(server_args)
            // A/B runs of the server's own settings (`--rate-limit off ...`).
            .args(
                std::env::var("CARAVEL_BENCH_SERVER_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .env("CARAVEL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the server")?,
    );
    let admin_path = dir.join("server/admin.token");
    let agent_path = dir.join("server/agent.token");
    let t0 = Instant::now();
    while !(admin_path.exists()
        && agent_path.exists()
        && ca.as_ref().is_none_or(|c| c.exists())
        && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
    {
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("server did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let admin = std::fs::read_to_string(&admin_path)?.trim().to_string();
    let agent_tok = std::fs::read_to_string(&agent_path)?.trim().to_string();
    let mut agent = Command::new(&exe);
    agent
        .args([
            "agent", "--server", &url, "--token", &agent_tok, "--name", "bench",
        ])
        .args([
            "--cpus",
            "256",
            "--memory",
            "256Gi",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--work-dir")
        .arg(dir.join("agent"))
        .args(agent_args)
        .env("CARAVEL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if no_cgroups {
        agent.arg("--no-cgroups");
    }
    if let Some(ca) = &ca {
        agent.arg("--ca").arg(ca);
    }
    procs.0.push(agent.spawn().context("starting the agent")?);
    let c = Client::with_ca(&url, &admin, ca.as_deref())?;
    let t0 = Instant::now();
    loop {
        if let Ok(n) = c.get::<Vec<NodeView>>("/v1/nodes").await {
            if !n.is_empty() {
                break;
            }
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("agent did not register");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(BenchPool {
        url,
        admin,
        ca,
        _procs: procs,
    })
}

pub fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

pub async fn run(cmd: BenchCmd) -> Result<i32> {
    match cmd {
        BenchCmd::Sched { scenario } => crate::bench_sched::bench(&scenario),
        BenchCmd::Image { jobs, tasks, dir } => crate::bench_image::bench(jobs, tasks, dir).await,
        BenchCmd::E2e {
            jobs,
            clients,
            light,
            no_cgroups,
            dir,
            datastore,
            sync_full,
            sandbox,
        } => {
            let mut server_args = vec!["--datastore".to_string(), datastore];
            if sync_full {
                server_args.push("--sync-full".into());
            }
            let modes: &[bool] = match sandbox {
                SandboxMode::On => &[true],
                SandboxMode::Off => &[false],
                SandboxMode::Both => &[true, false],
            };
            let mut results = Vec::new();
            let mut code = 0;
            for &on in modes {
                eprintln!(
                    "-- tasks {}",
                    if on {
                        "sandboxed"
                    } else {
                        "unsandboxed (--sandbox off)"
                    }
                );
                let (c, r) = e2e(
                    jobs,
                    clients.max(1),
                    light,
                    no_cgroups,
                    dir.clone(),
                    &server_args,
                    on,
                )
                .await?;
                code = code.max(c);
                results.push(r);
            }
            if results.len() == 1 {
                println!("{}", results[0]);
            } else {
                println!(
                    "{}",
                    serde_json::json!({"bench": "e2e", "sandboxed": results[0], "unsandboxed": results[1]})
                );
            }
            Ok(code)
        }
        BenchCmd::Gateway {
            concurrency,
            seconds,
            grpc,
            tls,
            dir,
        } => crate::bench_gateway::run(concurrency.max(1), seconds, grpc, tls, dir).await,
        BenchCmd::Backend { grpc } => crate::backend::run(grpc).await,
        BenchCmd::Autoscale {
            steps,
            requests,
            step_clients,
            dir,
        } => {
            crate::bench_autoscale::run(crate::bench_autoscale::Args {
                steps,
                requests,
                step_clients: step_clients.max(2),
                dir,
            })
            .await
        }
    }
}

async fn wait_all(c: &Client, n_expected: usize, timeout: Duration) -> Result<Vec<JobSummary>> {
    let t0 = Instant::now();
    loop {
        // limit=1: the check stays cheap for the server however many jobs there are.
        let active: Vec<JobSummary> = c.get("/v1/jobs?state=active&limit=1").await?;
        if active.is_empty() {
            let all: Vec<JobSummary> = c.get("/v1/jobs?limit=100000").await?;
            if all.len() >= n_expected {
                return Ok(all);
            }
        }
        if t0.elapsed() > timeout {
            bail!("{} jobs still active after {:?}", active.len(), timeout);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One e2e run on a fresh pool: its exit code and its figures.
async fn e2e(
    jobs: usize,
    clients: usize,
    light: usize,
    no_cgroups: bool,
    parent: Option<std::path::PathBuf>,
    server_args: &[String],
    sandbox: bool,
) -> Result<(i32, serde_json::Value)> {
    let dir = match parent {
        Some(p) => tempfile::tempdir_in(p)?,
        None => tempfile::tempdir()?,
    };
    let agent_args = [
        "--sandbox".to_string(),
        if sandbox { "on" } else { "off" }.to_string(),
    ];
    let pool = start_pool_with(dir.path(), no_cgroups, server_args, &agent_args).await?;
    if sandbox {
        let nodes: Vec<NodeView> = Client::new(&pool.url, &pool.admin).get("/v1/nodes").await?;
        if nodes[0].capacity.isolation == caravel_core::IsolationLevel::None {
            bail!(
                "the agent cannot sandbox here ({}); run as root, or --sandbox off",
                nodes[0].isolation_missing.join("; ")
            );
        }
    }
    let c = Client::new(&pool.url, &pool.admin);
    let mut spec = JobSpec::simple("true", &[]);
    spec.resources.cpu_milli = 100;
    spec.resources.memory_bytes = 16 << 20;

    // Phase 1: light load, one job at a time, for submit->start latency.
    let mut light_lat = Vec::new();
    for _ in 0..light {
        let r: SubmitResponse = c.post("/v1/jobs", &spec).await?;
        loop {
            let j: JobSummary = c
                .get::<caravel_core::api::JobDetail>(&format!("/v1/jobs/{}", r.id))
                .await?
                .summary;
            if j.state.is_terminal() {
                if let Some(s) = j.started_ms {
                    light_lat.push((s - j.submitted_ms) as f64);
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    // Phase 2: throughput.
    let start = Instant::now();
    let c = Arc::new(c);
    let spec = Arc::new(spec);
    let mut handles = vec![];
    for k in 0..clients {
        let c = c.clone();
        let spec = spec.clone();
        let n = jobs / clients + usize::from(k < jobs % clients);
        handles.push(tokio::spawn(async move {
            for _ in 0..n {
                let _: SubmitResponse = c.post("/v1/jobs", &*spec).await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let submit_s = start.elapsed().as_secs_f64();
    let all = wait_all(&c, jobs + light, Duration::from_secs(600)).await?;
    let elapsed = start.elapsed().as_secs_f64();
    let heavy: Vec<&JobSummary> = all.iter().skip(light).collect();
    let ok = heavy
        .iter()
        .filter(|j| j.state == JobState::Succeeded)
        .count();
    let mut lat: Vec<f64> = heavy
        .iter()
        .filter_map(|j| j.started_ms.map(|s| (s - j.submitted_ms) as f64))
        .collect();
    let jobs_per_s = jobs as f64 / elapsed;
    let (lp50, lp99) = (pct(&mut light_lat.clone(), 50.0), pct(&mut light_lat, 99.0));
    let (hp50, hp99) = (pct(&mut lat.clone(), 50.0), pct(&mut lat, 99.0));
    eprintln!("jobs: {jobs} ({ok} succeeded) in {elapsed:.2}s: {jobs_per_s:.0} jobs/s end to end (submits took {submit_s:.2}s)");
    eprintln!("submit->start at light load ({light} jobs, one at a time): p50 {lp50:.1} ms, p99 {lp99:.1} ms");
    eprintln!("submit->start under the burst: p50 {hp50:.1} ms, p99 {hp99:.1} ms");
    Ok((
        if ok == jobs { 0 } else { 1 },
        serde_json::json!({
            "bench": "e2e",
            "sandbox": sandbox,
            "jobs": jobs,
            "succeeded": ok,
            "elapsed_s": elapsed,
            "jobs_per_s": jobs_per_s,
            "submit_to_start_p50_ms": lp50,
            "submit_to_start_p99_ms": lp99,
            "burst_submit_to_start_p50_ms": hp50,
            "burst_submit_to_start_p99_ms": hp99,
            "clients": clients,
            "cgroups": !no_cgroups,
        }),
    ))
}
