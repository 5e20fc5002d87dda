//! `caravel bench autoscale`: starts its own pool (server and agent as processes, loopback,
//! temporary directory), deploys the tinylm example service and measures, through the
//! gateway:
//!
//! - cold start: a request to a service at zero replicas, sent to answered;
//! - reaction to load steps: from the moment the load jumps (1 → `step_clients` clients)
//!   to the autoscaler's decision (the service's wanted count rises, polled every 10 ms)
//!   and to an extra replica being ready (its ready count rises);
//! - a long run (`--requests`, 200,000 by default) with load swinging between light and
//!   heavy (scale-up and scale-down) and a rolling update every third of the way: every
//!   answer that is not 200 is a platform error, since the example answers 200 to every
//!   well-formed request.
//!
//! The last line printed is one JSON object.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use caravel_core::api::ServiceView;
use caravel_core::ServiceSpec;

use crate::bench::{pct, start_pool_with};
use crate::client::Client;

pub struct Args {
    pub steps: usize,
    pub requests: u64,
    pub step_clients: usize,
    pub dir: Option<std::path::PathBuf>,
}

/// Where the example lives: `examples/tinylm` under the current directory, else under the
/// source tree this binary was built from.
fn example_dir() -> Result<std::path::PathBuf> {
    let here = std::path::Path::new("examples/tinylm");
    if here.join("serve.py").exists() {
        return Ok(std::fs::canonicalize(here)?);
    }
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/tinylm");
    if src.join("serve.py").exists() {
        return Ok(std::fs::canonicalize(src)?);
    }
    bail!("examples/tinylm/serve.py not found: run from the repository root")
}

fn spec(dir: &std::path::Path, version: u32) -> ServiceSpec {
    let mut s = ServiceSpec::simple(
        "tinylm",
        "python3",
        &[dir.join("serve.py").to_string_lossy().as_ref()],
    );
    s.resources.cpu_milli = 250;
    s.resources.memory_bytes = 128 << 20;
    s.readiness.path = "/healthz".into();
    s.readiness.period_ms = 500;
    s.max_replicas = 8;
    s.target_concurrency = 2;
    // Short enough for a bench to see several cycles; the defaults are 10 and 5 minutes.
    s.scale_down_delay_ms = 4_000;
    s.scale_to_zero_after_ms = 5_000;
    s.env.insert("TINYLM_VERSION".into(), version.to_string());
    s
}

async fn view(c: &Client) -> Result<ServiceView> {
    c.get("/v1/services/tinylm").await
}

/// Clients sending requests in a loop; how many run is adjustable while it runs.
struct Load {
    want: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: &str, token: &str, max: usize, body: &'static str) -> Load {
        let want = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(max)
            .build()
            .expect("http client");
        let tasks = (0..max)
            .map(|i| {
                let (want, stop, sent, errors) =
                    (want.clone(), stop.clone(), sent.clone(), errors.clone());
                let (http, url, token) = (http.clone(), url.to_string(), token.to_string());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        if i as u64 >= want.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        }
                        let r = http
                            .post(&url)
                            .bearer_auth(&token)
                            .header("content-type", "application/json")
                            .body(body)
                            .send()
                            .await;
                        sent.fetch_add(1, Ordering::Relaxed);
                        let err = match r {
                            Ok(r) if r.status().as_u16() == 200 => match r.bytes().await {
                                Ok(_) => None,
                                Err(e) => Some(format!("body: {e}")),
                            },
                            Ok(r) => {
                                let st = r.status().as_u16();
                                Some(format!("{st}: {}", r.text().await.unwrap_or_default()))
                            }
                            Err(e) => Some(format!("transport: {e}")),
                        };
                        if let Some(e) = err {
                            errors.lock().expect("lock").push(e);
                        }
                    }
                })
            })
            .collect();
        Load {
            want,
            stop,
            sent,
            errors,
            tasks,
        }
    }

    fn set(&self, n: usize) {
        self.want.store(n as u64, Ordering::Relaxed);
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let e = self.errors.lock().expect("lock").clone();
        (self.sent.load(Ordering::Relaxed), e)
    }
}

async fn wait_until(
    c: &Client,
    what: &str,
    timeout: Duration,
    f: impl Fn(&ServiceView) -> bool,
) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        let v = view(c).await?;
        if f(&v) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn run(a: Args) -> Result<i32> {
    let ex = example_dir()?;
    let dir = match &a.dir {
        Some(p) => tempfile::tempdir_in(p)?,
        None => tempfile::tempdir()?,
    };
    // Replicas run sandboxed (the agent's default as root), where the node's files are
    // not theirs to see: the example's folder is given to them read-only, as an operator
    // shares a model directory.
    let pool = start_pool_with(
        dir.path(),
        false,
        &[],
        &["--task-mount".to_string(), ex.display().to_string()],
    )
    .await?;
    let c = Client::new(&pool.url, &pool.admin);
    let _: ServiceView = c
        .post("/v1/services", &spec(&ex, 1))
        .await
        .context("deploying tinylm")?;
    let url = format!("{}/s/default/tinylm/generate", pool.url);
    let http = reqwest::Client::new();
    let one = |body: &'static str| {
        http.post(&url)
            .bearer_auth(&pool.admin)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    // Cold starts: from zero replicas to the first answer, three times.
    let mut cold = Vec::new();
    for k in 0..3 {
        if k > 0 {
            wait_until(&c, "scale to zero", Duration::from_secs(60), |v| {
                v.replicas.is_empty()
            })
            .await?;
        }
        let t0 = Instant::now();
        let r = one(r#"{"prompt":"the pool","max_tokens":8}"#).await?;
        let st = r.status();
        r.bytes().await?;
        if !st.is_success() {
            bail!("cold-start request answered {st}");
        }
        cold.push(t0.elapsed().as_secs_f64() * 1000.0);
        eprintln!("cold start {}: {:.0} ms", k + 1, cold[k]);
    }

    // Load steps: 1 client (one replica) to `step_clients`, and back.
    let load = Load::start(
        &url,
        &pool.admin,
        a.step_clients,
        r#"{"prompt":"the pool","max_tokens":16}"#,
    );
    let (mut decide, mut ready) = (Vec::new(), Vec::new());
    for k in 0..a.steps {
        load.set(1);
        wait_until(
            &c,
            "one ready replica, nothing else",
            Duration::from_secs(90),
            |v| v.wanted == 1 && v.ready == 1 && v.replicas.len() == 1,
        )
        .await?;
        // Steady at one client for a moment, so the step starts from a settled window.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let before = view(&c).await?;
        let t0 = Instant::now();
        load.set(a.step_clients);
        let mut d = None;
        let mut r = None;
        while r.is_none() {
            let v = view(&c).await?;
            if d.is_none() && v.wanted > before.wanted {
                d = Some(t0.elapsed());
            }
            if v.ready > before.ready {
                r = Some(t0.elapsed());
                d.get_or_insert(t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("no extra replica 30 s after a load step");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (d, r) = (d.expect("set"), r.expect("set"));
        eprintln!(
            "step {}: decided after {:.0} ms, extra replica ready after {:.0} ms",
            k + 1,
            d.as_secs_f64() * 1000.0,
            r.as_secs_f64() * 1000.0
        );
        decide.push(d.as_secs_f64() * 1000.0);
        ready.push(r.as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (step_sent, step_errors) = load.finish().await;

    // The long run: load swings every 8 s between 2 and 12 clients; a rolling update at
    // one and two thirds.
    let load = Load::start(
        &url,
        &pool.admin,
        12,
        r#"{"prompt":"the pool","max_tokens":1}"#,
    );
    let t0 = Instant::now();
    let mut version = 1;
    let mut last_report = Instant::now();
    while load.sent.load(Ordering::Relaxed) < a.requests {
        let heavy = (t0.elapsed().as_secs() / 8) % 2 == 1;
        load.set(if heavy { 12 } else { 2 });
        let done = load.sent.load(Ordering::Relaxed);
        let due = (version as u64) * a.requests / 3;
        if version < 3 && done >= due {
            version += 1;
            let v: ServiceView = c.post("/v1/services", &spec(&ex, version)).await?;
            eprintln!("rolling update to version {} at {done} requests", v.version);
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            let v = view(&c).await?;
            eprintln!(
                "{done} requests, {:.0}/s, {} ready, {} wanted",
                done as f64 / t0.elapsed().as_secs_f64(),
                v.ready,
                v.wanted
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (sent, errors) = load.finish().await;
    let secs = t0.elapsed().as_secs_f64();
    for e in errors.iter().chain(step_errors.iter()).take(10) {
        eprintln!("error: {e}");
    }
    let (d50, d99) = (pct(&mut decide.clone(), 50.0), pct(&mut decide, 99.0));
    let (r50, r99) = (pct(&mut ready.clone(), 50.0), pct(&mut ready, 99.0));
    let cold_ms = pct(&mut cold.clone(), 50.0);
    eprintln!(
        "{sent} requests in {secs:.0} s ({:.0}/s) with 2 rolling updates: {} platform errors",
        sent as f64 / secs,
        errors.len()
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "autoscale",
            "decide_p50_ms": d50,
            "decide_p99_ms": d99,
            "ready_p50_ms": r50,
            "ready_p99_ms": r99,
            "steps": a.steps,
            "cold_start_ms": cold_ms,
            "cold_starts_ms": cold,
            "requests": sent + step_sent,
            "platform_errors": errors.len() + step_errors.len(),
            "long_run_requests": sent,
            "long_run_rps": sent as f64 / secs,
            "rolling_updates": version - 1,
        })
    );
    Ok(if errors.is_empty() && step_errors.is_empty() {
        0
    } else {
        1
    })
}
