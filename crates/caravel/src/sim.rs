//! `caravel sim`: experiments that replay public traces through the production scheduler.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use caravel_sim::baselines::Policy;
use caravel_sim::{artefact, fgd, openb, report};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum SimCmd {
    /// The FGD (USENIX ATC'23) protocol on an openb pod list: allocation and
    /// fragmentation against arrived load, per policy, mean ± sd over seeds.
    Fgd {
        /// openb pod list (CSV).
        #[arg(long)]
        trace: PathBuf,
        /// openb node list (CSV); the FGD experiments use openb_node_list_gpu_node.csv.
        #[arg(long)]
        nodes: PathBuf,
        /// Placement policy, several separated by commas, or `all`: random, dotprod,
        /// clustering, packing, bestfit, fgd, caravel.
        #[arg(long, default_value = "caravel")]
        policy: String,
        /// Seeds, e.g. 42-51 or 42,43.
        #[arg(long, default_value = "42-51")]
        seeds: String,
        /// Arrived load to reach, as a multiple of cluster GPU capacity.
        #[arg(long, default_value_t = 1.3)]
        tune: f64,
        /// EXPERIMENT, simulator only: share pacing for Caravel's policy, the fraction
        /// (above 0, at most 1) of the share plan's turn-away rate to apply (0.9 was the
        /// one tried most). It turns away pods that would fit, which the server never
        /// does, so its results are labelled as an experiment. Default `off`: every pod
        /// that fits is placed, as the server does. The baselines never pace.
        #[arg(long, default_value = "off")]
        pacing: String,
        /// The artefact's expected results folder (fgd-atc23-expected-results): compare
        /// every baseline with its published curve.
        #[arg(long)]
        expected: Option<PathBuf>,
        /// Worker threads (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Results folder: summary.json, summary.txt, curves.csv, allocation.svg,
        /// fragmentation.svg.
        #[arg(long)]
        out: PathBuf,
    },
    /// Time-driven replay: jobs arrive, run and leave, services follow their load through
    /// the autoscaler; JCT, queueing, utilisation over time, share and SLO attainment.
    Replay(ReplayArgs),
}

/// `caravel sim replay`.
#[derive(clap::Args)]
pub struct ReplayArgs {
    /// What arrives: philly:PATH (philly.csv), pollux:PATH (a Pollux/Sia workload CSV or
    /// a folder of workload-*.csv, each replayed on its own), synthetic:SPEC
    /// (nodes=,tasks=,load=,tenants=,services=,day_s=,seed=; brings its own pool), or
    /// none (services only).
    #[arg(long)]
    pub jobs: String,
    /// Inference services driven by request traces: azure:PATH (Azure LLM 2023),
    /// genai:PATH (Alibaba GenAI 2026). Repeatable.
    #[arg(long)]
    pub service: Vec<String>,
    /// The pool: pool:SPEC (16x4:T4+2x8:A100), openb:PATH (node list), pai:PATH
    /// (pai_machine_spec.csv), spot:PATH (node_info_df.csv). Required unless the jobs are
    /// synthetic.
    #[arg(long)]
    pub cluster: Option<String>,
    /// Placement policies, comma separated (random, dotprod, clustering, packing,
    /// bestfit, fgd, caravel). The baselines score every node per placement.
    #[arg(long, default_value = "caravel")]
    pub policy: String,
    /// Seed for the Random baseline.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Replay only jobs submitted in the first DAYS days of the trace.
    #[arg(long)]
    pub days: Option<f64>,
    /// Scheduling cycle interval in milliseconds of simulated time.
    #[arg(long, default_value_t = 1000)]
    pub cycle_ms: u64,
    /// GPUs per node for splitting a trace's multi-GPU jobs into tasks (philly, pollux).
    #[arg(long, default_value_t = 8)]
    pub gpus_per_node: u32,
    /// GPU model of the trace's jobs (philly, pollux) and services: a model of the pool,
    /// several as A|B (preferred first), or `any` (every model of the pool).
    #[arg(long)]
    pub model: Option<String>,
    /// Published results to compare with: a Pollux results-jobload folder; the
    /// <policy>-<LOAD>/summary.json of every policy there are read.
    #[arg(long)]
    pub published: Option<PathBuf>,
    /// The job load of `--published` results to read (0.5, 1.0, 1.5, 2.0).
    #[arg(long, default_value = "1.0")]
    pub load: String,
    /// With fragmentation-aware policies: score at most this many feasible nodes per
    /// placement, tightest first (0: every node). Pools up to this size are exact.
    #[arg(long, default_value_t = caravel_sched::Config::default().fgd_max_candidates)]
    pub candidates: usize,
    /// Caravel's policy: weight of the pinned-model pressure term (0 turns it off).
    #[arg(long, default_value_t = caravel_sched::Config::default().fgd_pin_weight)]
    pub pin_weight: f64,
    /// Least-attained-service order for batch work (Tiresias): queue boundaries in
    /// GPU-hours of service received, ascending, e.g. `16` (Tiresias' and Pollux's) or
    /// `1,16`. A batch job in an earlier queue goes first and may preempt its tenant's batch
    /// work in a later one. Off by default.
    #[arg(long, value_name = "GPU_HOURS[,...]")]
    pub las: Option<String>,
    /// With `--las`: a task runs at least this many seconds before LAS may preempt it.
    #[arg(long, default_value_t = 0)]
    pub las_slice_s: u64,
    /// A job that has waited this many seconds without starting gets the reservation
    /// (oldest first, one at a time): from max runtimes when they are declared, else nodes
    /// drained so no other work starts on them until it has. 0: never.
    #[arg(long, default_value_t = 0)]
    pub starvation_s: u64,
    /// How many waiting jobs hold a backfill reservation at once (1: EASY backfill).
    #[arg(long, default_value_t = 1, value_parser = crate::reservations)]
    pub reservations: usize,
    /// Choose preemption victims by the time since they started, as if no task
    /// checkpointed (by default the scheduler counts the work lost since each task's last
    /// checkpoint). For comparing the two.
    #[arg(long)]
    pub victims_ignore_checkpoints: bool,
    /// Worker threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Results folder: summary.json, summary.txt, jobs-POLICY.csv, timeline-POLICY.csv,
    /// utilisation.svg, queueing_cdf.svg.
    #[arg(long)]
    pub out: PathBuf,
}

/// `--las`: ascending GPU-hour boundaries, in GPU-seconds.
pub(crate) fn parse_las(s: &str) -> Result<Vec<u64>> {
    let mut out: Vec<u64> = Vec::new();
    for part in s.split(',') {
        let h: f64 = part
            .trim()
            .parse()
            .map_err(|_| anyhow!("--las: {part:?} is not a number of GPU-hours"))?;
        if !(h.is_finite() && h > 0.0) {
            bail!("--las: {part:?}: a boundary must be a positive number of GPU-hours");
        }
        let secs = (h * 3600.0).round() as u64;
        if out.last().is_some_and(|l| *l >= secs) {
            bail!("--las: boundaries must be ascending ({s:?})");
        }
        out.push(secs);
    }
    Ok(out)
}

fn split_source<'a>(flag: &str, s: &'a str, kinds: &[&str]) -> Result<(&'a str, &'a str)> {
    let (k, v) = s.split_once(':').unwrap_or((s, ""));
    if !kinds.contains(&k) {
        bail!(
            "{flag}: `{s}` must start with one of {}",
            kinds
                .iter()
                .map(|k| format!("{k}:"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok((k, v))
}

fn existing(flag: &str, p: &str) -> Result<PathBuf> {
    let p = PathBuf::from(p);
    if p.as_os_str().is_empty() {
        bail!("{flag}: give a path after the colon");
    }
    if !p.exists() {
        bail!("{flag}: {} does not exist", p.display());
    }
    Ok(p)
}

fn replay(a: ReplayArgs) -> Result<i32> {
    let ReplayArgs {
        jobs,
        service,
        cluster,
        policy,
        seed,
        days,
        cycle_ms,
        gpus_per_node,
        model,
        published,
        load,
        candidates,
        pin_weight,
        las,
        las_slice_s,
        starvation_s,
        reservations,
        victims_ignore_checkpoints,
        threads,
        out,
    } = a;
    use caravel_sim::{replay as rp, replay_report, synth, traces};
    let policies = parse_policies(&policy)?;
    if cycle_ms == 0 {
        bail!("--cycle-ms: must be at least 1");
    }
    if gpus_per_node == 0 {
        bail!("--gpus-per-node: must be at least 1");
    }
    if threads == Some(0) {
        bail!("--threads: must be at least 1");
    }
    let las = las
        .as_deref()
        .map(parse_las)
        .transpose()?
        .map(|thresholds_gpu_s| caravel_sched::Las {
            thresholds_gpu_s,
            min_slice_ms: las_slice_s.saturating_mul(1000),
        });
    if las.is_none() && las_slice_s > 0 {
        bail!("--las-slice-s: only with --las");
    }
    if let Some(d) = days {
        if !(d.is_finite() && d > 0.0) {
            bail!("--days: must be a positive number");
        }
    }
    // The pool.
    let mut pool: Option<(String, Vec<caravel_sched::NodeSnap>)> = match &cluster {
        None => None,
        Some(c) => {
            let (k, v) = split_source("--cluster", c, &["pool", "openb", "pai", "spot"])?;
            let nodes = match k {
                "pool" => traces::parse_pool(v).map_err(|e| anyhow!("--cluster: {e}"))?,
                "openb" => openb::to_nodes(&openb::read_nodes(&existing("--cluster", v)?)?),
                "pai" => traces::read_pai_machines(&existing("--cluster", v)?)?,
                _ => traces::read_spot_nodes(&existing("--cluster", v)?)?,
            };
            if nodes.is_empty() {
                bail!("--cluster: `{c}` has no nodes");
            }
            Some((c.clone(), nodes))
        }
    };
    let gpu_model = |pool: &Option<(String, Vec<caravel_sched::NodeSnap>)>| -> Result<Vec<String>> {
        let models: std::collections::BTreeSet<String> = pool
            .iter()
            .flat_map(|(_, n)| n.iter())
            .flat_map(|n| n.capacity.devices.iter().map(|d| d.model.clone()))
            .collect();
        let list = || models.iter().cloned().collect::<Vec<_>>().join(", ");
        match model.as_deref() {
            _ if models.is_empty() => bail!("--cluster: the pool has no GPUs for GPU jobs"),
            Some("any") => Ok(models.iter().cloned().collect()),
            Some(m) => {
                let want: Vec<String> = m.split('|').map(|x| x.trim().to_string()).collect();
                if let Some(bad) = want.iter().find(|x| !models.contains(*x)) {
                    bail!(
                        "--model: `{bad}` is not a GPU model of the pool ({})",
                        list()
                    );
                }
                Ok(want)
            }
            None if models.len() == 1 => Ok(models.iter().cloned().collect()),
            None => bail!(
                "--model: the pool has several GPU models ({}); name one, A|B, or any",
                list()
            ),
        }
    };
    let shape = |m: Vec<String>| traces::TaskShape {
        models: m,
        gpus_per_node,
        ..Default::default()
    };
    // The workloads: one, or one per Pollux workload file.
    let (k, v) = split_source("--jobs", &jobs, &["philly", "pollux", "synthetic", "none"])?;
    let mut workloads: Vec<rp::Workload> = Vec::new();
    let label;
    match k {
        "philly" => {
            let path = existing("--jobs", v)?;
            let list = traces::read_philly(&path)?;
            if pool.is_none() {
                bail!("--cluster: required for philly jobs");
            }
            workloads.push(traces::philly_workload(
                &list,
                &shape(gpu_model(&pool)?),
                "philly",
            ));
            label = format!("philly {}", path.display());
        }
        "pollux" => {
            let path = existing("--jobs", v)?;
            let files: Vec<PathBuf> = if path.is_dir() {
                let mut f: Vec<PathBuf> = std::fs::read_dir(&path)?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "csv"))
                    .collect();
                f.sort();
                f
            } else {
                vec![path.clone()]
            };
            if files.is_empty() {
                bail!("--jobs: {} has no .csv workload", path.display());
            }
            if pool.is_none() {
                bail!(
                    "--cluster: required for pollux jobs (the Pollux paper's pool is pool:16x4:T4)"
                );
            }
            let m = gpu_model(&pool)?;
            let root = published
                .as_ref()
                .and_then(|p| p.parent())
                .ok_or_else(|| anyhow!("--published: pollux jobs need the artefact's results-jobload folder (their run times are calibrated from it)"))?;
            let rt = traces::PolluxRuntimes::calibrate(root)?;
            for f in files {
                let name = f
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default();
                let w = traces::pollux_workload(
                    &traces::read_pollux(&f)?,
                    &rt,
                    &shape(m.clone()),
                    &name,
                )
                .map_err(|e| anyhow!("--jobs: {}: {e}", f.display()))?;
                workloads.push(w);
            }
            label = format!("pollux {}", path.display());
        }
        "synthetic" => {
            let spec = synth::Spec::parse(v).map_err(|e| anyhow!("--jobs: {e}"))?;
            let (nodes, w) = synth::generate(&spec);
            if pool.is_none() {
                pool = Some((
                    format!("synthetic mixed pool of {} nodes", nodes.len()),
                    nodes,
                ));
            }
            label = w.name.clone();
            workloads.push(w);
        }
        _ => {
            if service.is_empty() {
                bail!("--jobs none: give at least one --service");
            }
            workloads.push(rp::Workload {
                name: "services".into(),
                ..Default::default()
            });
            label = "services only".into();
        }
    }
    let (cluster_label, nodes) =
        pool.ok_or_else(|| anyhow!("--cluster: required for these jobs"))?;
    // Services: their own tenant, started with the first job (or at 0).
    for sv in &service {
        let (k, v) = split_source("--service", sv, &["azure", "genai"])?;
        let path = existing("--service", v)?;
        let pool_now = Some((String::new(), nodes.clone()));
        let m = gpu_model(&pool_now)?;
        let (arr, cap, name) = match k {
            // A replica serves ~2,000 tokens/s (prompt and generation together).
            "azure" => (traces::read_azure_llm(&path)?, 2_000.0, "azure"),
            // One image pipeline per GPU: a replica does one second of work per second.
            _ => (traces::read_genai(&path)?, 1.0, "genai"),
        };
        // Named after the file, so two services of one kind stay apart.
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let named = format!("{name}:{stem}");
        let name = named.as_str();
        for w in &mut workloads {
            let start = w.jobs.first().map(|j| j.submit_ms).unwrap_or(0);
            let tenant = w.tenants.len();
            w.tenants.push(rp::Tenant {
                name: format!("{name}-owner"),
                weight: 1.0,
                ..Default::default()
            });
            let svc = traces::service_from(name, tenant, &arr, cap, &m, start, 1.0);
            w.services.push(svc);
        }
    }
    if let Some(d) = days {
        for w in &mut workloads {
            if let Some(first) = w.jobs.first().map(|j| j.submit_ms) {
                let end = first + (d * 86_400_000.0) as i64;
                w.jobs.retain(|j| j.submit_ms < end);
            }
        }
    }
    let publ: Vec<traces::Published> = match &published {
        None => Vec::new(),
        Some(dir) => {
            let mut v = Vec::new();
            for name in ["pollux", "tiresias", "optimus"] {
                let f = dir.join(format!("{name}-{load}/summary.json"));
                if f.exists() {
                    v.push(traces::read_published(&f, name)?);
                }
            }
            if v.is_empty() {
                bail!(
                    "--published: no <policy>-{load}/summary.json under {}",
                    dir.display()
                );
            }
            v
        }
    };
    let threads = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let tasks: Vec<(usize, usize)> = (0..policies.len())
        .flat_map(|p| (0..workloads.len()).map(move |w| (p, w)))
        .collect();
    let results: std::sync::Mutex<Vec<Option<rp::Outcome>>> =
        std::sync::Mutex::new(vec![None; tasks.len()]);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t0 = std::time::Instant::now();
    let total_tasks: usize = workloads
        .iter()
        .map(|w| w.jobs.iter().map(|j| j.tasks as usize).sum::<usize>())
        .sum();
    eprintln!(
        "replaying {} on {} ({} nodes): {} workload(s), {} jobs, {} tasks, {} service(s), {} policies",
        label,
        cluster_label,
        nodes.len(),
        workloads.len(),
        workloads.iter().map(|w| w.jobs.len()).sum::<usize>(),
        total_tasks,
        workloads.first().map(|w| w.services.len()).unwrap_or(0),
        policies.len()
    );
    let done = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..threads.min(tasks.len()).max(1) {
            sc.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(&(p, wi)) = tasks.get(k) else { break };
                let w = &workloads[wi];
                let mut opts = rp::Options {
                    cycle_ms,
                    ..rp::Options::for_policy(policies[p], w, seed)
                };
                opts.sched.fgd_max_candidates = candidates;
                opts.sched.fgd_pin_weight = pin_weight;
                opts.sched.las = las.clone();
                opts.starvation_ms = starvation_s.saturating_mul(1000);
                opts.sched.reservations = reservations;
                opts.victims_know_checkpoints = !victims_ignore_checkpoints;
                let single = tasks.len() == 1;
                let mut last = std::time::Instant::now();
                let mut progress = |at: i64, span: i64| {
                    // At most twice a second: past the trace's span an overloaded pool
                    // still has hours of queued work, reported on every step.
                    if single && last.elapsed().as_millis() > 500 {
                        last = std::time::Instant::now();
                        let frac = (at as f64 / span.max(1) as f64).clamp(0.0, 1.0);
                        let filled = (frac * 30.0) as usize;
                        let what = if at > span {
                            format!(
                                "trace's span over, finishing queued work ({:.1}x the span)",
                                at as f64 / span.max(1) as f64
                            )
                        } else {
                            format!("{:.0}% of the trace's span", frac * 100.0)
                        };
                        eprint!(
                            "\r[{}{}] {what}, {:.0}s elapsed ",
                            "#".repeat(filled),
                            ".".repeat(30 - filled),
                            t0.elapsed().as_secs_f64()
                        );
                    }
                };
                let o = rp::run(nodes.clone(), w, &opts, &mut progress);
                results.lock().expect("no panics while held")[k] = Some(o);
                let d = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                if single {
                    eprintln!();
                } else {
                    eprint!(
                        "\r{d}/{} runs, {:.0}s elapsed ",
                        tasks.len(),
                        t0.elapsed().as_secs_f64()
                    );
                    if d == tasks.len() {
                        eprintln!();
                    }
                }
            });
        }
    });
    let wall = t0.elapsed().as_secs_f64();
    let mut outs = results.into_inner().expect("joined").into_iter();
    let runs: Vec<replay_report::PolicyRun> = policies
        .iter()
        .map(|p| replay_report::PolicyRun {
            policy: p.name().to_string(),
            runs: workloads
                .iter()
                .map(|w| {
                    (
                        w.name.clone(),
                        outs.next().flatten().expect("every run finished"),
                    )
                })
                .collect(),
        })
        .collect();
    replay_report::write(
        &out,
        &label,
        &format!("{cluster_label} ({} nodes)", nodes.len()),
        &runs,
        &publ,
        wall,
    )
    .with_context(|| format!("writing results to {}", out.display()))?;
    print!("{}", std::fs::read_to_string(out.join("summary.txt"))?);
    eprintln!("results in {}", out.display());
    Ok(0)
}

fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.parse()?, b.parse()?);
                if a > b || b - a > 10_000 {
                    bail!("--seeds: `{part}` is not a small ascending range");
                }
                out.extend(a..=b);
            }
            None => out.push(
                part.parse()
                    .map_err(|_| anyhow!("--seeds: `{part}` is not a number"))?,
            ),
        }
    }
    if out.is_empty() {
        bail!("--seeds: give at least one seed");
    }
    Ok(out)
}

fn parse_policies(s: &str) -> Result<Vec<Policy>> {
    if s.trim() == "all" {
        return Ok(Policy::ALL.to_vec());
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p = Policy::parse(part).ok_or_else(|| {
            anyhow!(
                "--policy: `{part}` is not a policy (one of: {}, or all)",
                fgd::POLICIES.join(", ")
            )
        })?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        bail!("--policy: give at least one policy");
    }
    Ok(out)
}

pub fn run(cmd: SimCmd) -> Result<i32> {
    match cmd {
        SimCmd::Replay(a) => replay(a),
        SimCmd::Fgd {
            trace,
            nodes,
            policy,
            seeds,
            tune,
            pacing,
            expected,
            threads,
            out,
        } => {
            let policies = parse_policies(&policy)?;
            if !(1.0..=3.0).contains(&tune) {
                bail!("--tune: must be 1.0 to 3.0");
            }
            let pacing = parse_pacing(&pacing)?;
            if threads == Some(0) {
                bail!("--threads: must be at least 1");
            }
            let seeds = parse_seeds(&seeds)?;
            let n = openb::read_nodes(&nodes)?;
            let p = openb::read_pods(&trace)?;
            if n.iter().all(|n| n.gpus == 0) {
                bail!("--nodes: {} has no GPU node", nodes.display());
            }
            let published = match &expected {
                Some(dir) => Some((
                    artefact::read(&dir.join("analysis_allo_discrete.csv"))?,
                    artefact::read(&dir.join("analysis_frag_discrete.csv"))?,
                )),
                None => None,
            };
            let workload = trace
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            let threads = threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            let t0 = std::time::Instant::now();
            let progress = |done: usize, total: usize| {
                let el = t0.elapsed().as_secs_f64();
                let eta = el / done as f64 * (total - done) as f64;
                let width = 30;
                let filled = done * width / total;
                eprint!(
                    "\r[{}{}] {done}/{total} runs, {el:.0}s elapsed, ~{eta:.0}s left ",
                    "#".repeat(filled),
                    ".".repeat(width - filled)
                );
                if done == total {
                    eprintln!();
                }
            };
            let results = report::run_all(
                &n,
                &p,
                &policies,
                &seeds,
                fgd::Setup { tune, pacing },
                threads,
                &progress,
            );
            let table = report::write(
                &out,
                &workload,
                &seeds,
                tune,
                &results,
                published
                    .as_ref()
                    .map(|(a, f)| (a.as_slice(), f.as_slice())),
            )
            .with_context(|| format!("writing results to {}", out.display()))?;
            print!("{table}");
            eprintln!("results in {}", out.display());
            Ok(0)
        }
    }
}

/// `--pacing`: `off`, or a fraction in (0, 1].
fn parse_pacing(s: &str) -> Result<Option<f64>> {
    if s.trim() == "off" {
        return Ok(None);
    }
    match s.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(Some(f)),
        _ => bail!("--pacing: `{s}` is neither `off` nor a fraction above 0 and at most 1"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pacing() {
        assert_eq!(super::parse_pacing("off").unwrap(), None);
        assert_eq!(super::parse_pacing("0.9").unwrap(), Some(0.9));
        assert_eq!(super::parse_pacing("1").unwrap(), Some(1.0));
        for bad in ["0", "1.5", "-0.2", "nan", "half", ""] {
            let e = super::parse_pacing(bad).unwrap_err().to_string();
            assert!(e.contains("--pacing"), "{bad}: {e}");
        }
    }

    #[test]
    fn seeds() {
        assert_eq!(super::parse_seeds("42-44").unwrap(), vec![42, 43, 44]);
        assert_eq!(super::parse_seeds("1,5").unwrap(), vec![1, 5]);
        assert!(super::parse_seeds("5-1").is_err());
        assert!(super::parse_seeds("x").is_err());
        assert_eq!(super::parse_policies("all").unwrap().len(), 7);
        assert_eq!(super::parse_policies("fgd, bestfit,fgd").unwrap().len(), 2);
        let e = super::parse_policies("best").unwrap_err().to_string();
        assert!(e.contains("--policy") && e.contains("bestfit"), "{e}");
    }
}
