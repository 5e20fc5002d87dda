//! Readers for the time-driven traces in `../shared/traces` (each folder's SOURCE.md gives
//! the schema) and their conversion into what a replay runs: jobs (Philly, the Pollux and
//! Sia workloads), cluster shapes (Alibaba PAI 2020 and spot 2026 machine inventories, or a
//! pool spec), and inference load (Azure LLM 2023, Alibaba GenAI 2026). Every malformed row
//! is rejected with `file:line` and the reason.

use std::collections::BTreeMap;
use std::path::Path;

use caravel_core::{Capacity, Device, GpuRequest, Millis, NodeId, Priority, TaskResources};
use caravel_sched::NodeSnap;

use crate::openb::{num, rows, Row};
use crate::replay::{Job, Service, Tenant, Workload};
use crate::TraceError;

const GIB: u64 = 1 << 30;

fn err(file: &str, line: usize, reason: impl Into<String>) -> TraceError {
    TraceError {
        file: file.to_string(),
        line,
        reason: reason.into(),
    }
}

fn float(file: &str, line: usize, col: &str, v: &str) -> Result<f64, TraceError> {
    match v.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(err(
            file,
            line,
            format!("{col}: `{v}` is not a non-negative number"),
        )),
    }
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD HH:MM:SS[.fraction]` as milliseconds since the epoch (the traces' local
/// time, taken as UTC: only differences matter).
pub fn parse_time(s: &str) -> Option<Millis> {
    let s = s.trim();
    let (date, time) = s.split_once(' ')?;
    let mut d = date.split('-');
    let (y, mo, da): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    if d.next().is_some() || !(1..=12).contains(&mo) || !(1..=31).contains(&da) {
        return None;
    }
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':');
    let (h, mi, se): (i64, i64, i64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    if t.next().is_some() || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let ms = if frac.is_empty() {
        0
    } else {
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let f: String = frac.chars().chain("000".chars()).take(3).collect();
        f.parse::<i64>().ok()?
    };
    Some(((days_from_civil(y, mo, da) * 24 + h) * 60 + mi) * 60_000 + se * 1000 + ms)
}

fn header(
    file: &str,
    lines: &mut std::vec::IntoIter<(usize, Row)>,
    want: &str,
) -> Result<(), TraceError> {
    match lines.next().map(|(l, h)| (l, h.text())) {
        Some((_, h)) if h.trim() == want => Ok(()),
        Some((l, h)) => Err(err(file, l, format!("header `{h}` is not `{want}`"))),
        None => Err(err(file, 0, "empty file")),
    }
}

fn cols<'a>(file: &str, line: usize, row: &'a Row, n: usize) -> Result<Vec<&'a str>, TraceError> {
    let c = row.fields();
    if c.len() != n {
        return Err(err(
            file,
            line,
            format!("{} columns, expected {n}", c.len()),
        ));
    }
    Ok(c)
}

// ---------------------------------------------------------------- Philly (Pollux's CSV)

/// One job of `philly.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct PhillyJob {
    pub line: usize,
    pub submit_ms: Millis,
    pub duration_ms: u64,
    pub num_gpus: u32,
    /// Virtual cluster: the tenant.
    pub cluster: String,
}

pub fn read_philly(path: &Path) -> Result<Vec<PhillyJob>, TraceError> {
    let (file, lines) = rows(path)?;
    let mut it = lines.into_iter();
    header(
        &file,
        &mut it,
        "timestamp,duration,num_gpus,gpu_time,cluster",
    )?;
    let mut out = Vec::new();
    for (l, row) in it {
        if row.is_blank() {
            continue;
        }
        let c = cols(&file, l, &row, 5)?;
        let submit_ms = parse_time(c[0]).ok_or_else(|| {
            err(
                &file,
                l,
                format!("timestamp: `{}` is not YYYY-MM-DD HH:MM:SS", c[0]),
            )
        })?;
        let duration = float(&file, l, "duration", c[1])?;
        let num_gpus: u32 = num(&file, l, "num_gpus", c[2])?;
        if num_gpus == 0 {
            return Err(err(&file, l, "num_gpus: must be at least 1"));
        }
        let cluster = c[4].trim().to_string();
        if cluster.is_empty() {
            return Err(err(&file, l, "cluster: empty"));
        }
        out.push(PhillyJob {
            line: l,
            submit_ms,
            duration_ms: (duration * 1000.0).round() as u64,
            num_gpus,
            cluster,
        });
    }
    Ok(out)
}

/// How a job's GPUs become tasks and what each task asks for besides GPUs.
#[derive(Debug, Clone)]
pub struct TaskShape {
    /// Accepted GPU models, preferred first.
    pub models: Vec<String>,
    /// GPUs one node offers: a job of more becomes a gang of tasks of at most this many.
    pub gpus_per_node: u32,
    pub cpu_milli_per_gpu: u64,
    pub memory_per_gpu: u64,
    pub checkpoint_ms: u64,
}

impl Default for TaskShape {
    fn default() -> Self {
        TaskShape {
            models: vec!["gpu".into()],
            gpus_per_node: 8,
            cpu_milli_per_gpu: 4_000,
            memory_per_gpu: 16 * GIB,
            checkpoint_ms: 30 * 60_000,
        }
    }
}

/// `n` GPUs as `(tasks, gpus per task)`: one task if it fits a node, else the fewest equal
/// tasks of at most a node each.
pub fn split_gpus(n: u32, per_node: u32) -> (u32, u32) {
    let per_node = per_node.max(1);
    if n <= per_node {
        return (1, n);
    }
    let g = (1..=per_node)
        .rev()
        .find(|g| n.is_multiple_of(*g))
        .unwrap_or(1);
    (n / g, g)
}

fn gpu_task(shape: &TaskShape, g: u32) -> TaskResources {
    TaskResources {
        needs: Default::default(),
        cpu_milli: shape.cpu_milli_per_gpu * g as u64,
        memory_bytes: shape.memory_per_gpu * g as u64,
        gpu: Some(GpuRequest {
            any_of: shape.models[1..].to_vec(),
            ..GpuRequest::whole(&shape.models[0], g)
        }),
    }
}

/// Philly jobs in submission order; each virtual cluster is a tenant of equal weight.
pub fn philly_workload(jobs: &[PhillyJob], shape: &TaskShape, name: &str) -> Workload {
    let mut sorted: Vec<&PhillyJob> = jobs.iter().collect();
    sorted.sort_by_key(|j| (j.submit_ms, j.line));
    let mut tenants: BTreeMap<&str, usize> = BTreeMap::new();
    for j in &sorted {
        let n = tenants.len();
        tenants.entry(j.cluster.as_str()).or_insert(n);
    }
    let mut w = Workload {
        name: name.to_string(),
        tenants: vec![Tenant::default(); tenants.len()],
        ..Default::default()
    };
    for (c, &i) in &tenants {
        w.tenants[i] = Tenant {
            name: format!("vc-{c}"),
            weight: 1.0,
            ..Default::default()
        };
    }
    for j in sorted {
        let (tasks, g) = split_gpus(j.num_gpus, shape.gpus_per_node);
        w.jobs.push(Job {
            name: format!("philly-{}", j.line),
            tenant: tenants[j.cluster.as_str()],
            submit_ms: j.submit_ms,
            priority: Priority::Batch,
            resources: gpu_task(shape, g),
            tasks,
            gang: tasks > 1,
            duration_ms: j.duration_ms.max(1),
            checkpoint_ms: shape.checkpoint_ms,
            max_runtime_ms: None,
            topology: None,
        });
    }
    w
}

// ------------------------------------------------------------- Pollux / Sia workloads

/// One job of a Pollux or Sia `workload-N.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct PolluxJob {
    pub line: usize,
    pub name: String,
    pub time_s: f64,
    pub application: String,
    pub num_replicas: u32,
    pub batch_size: u64,
}

pub fn read_pollux(path: &Path) -> Result<Vec<PolluxJob>, TraceError> {
    let (file, lines) = rows(path)?;
    let mut it = lines.into_iter();
    header(
        &file,
        &mut it,
        "name,time,application,num_replicas,batch_size",
    )?;
    let mut out = Vec::new();
    for (l, row) in it {
        if row.is_blank() {
            continue;
        }
        let c = cols(&file, l, &row, 5)?;
        let app = c[2].trim().to_string();
        if !POLLUX_APPS.contains(&app.as_str()) {
            return Err(err(
                &file,
                l,
                format!(
                    "application: `{app}` is not one of {}",
                    POLLUX_APPS.join(", ")
                ),
            ));
        }
        let num_replicas: u32 = num(&file, l, "num_replicas", c[3])?;
        if num_replicas == 0 {
            return Err(err(&file, l, "num_replicas: must be at least 1"));
        }
        let name = c[0].trim().to_string();
        if name.is_empty() {
            return Err(err(&file, l, "name: empty"));
        }
        out.push(PolluxJob {
            line: l,
            name,
            time_s: float(&file, l, "time", c[1])?,
            application: app,
            num_replicas,
            batch_size: num(&file, l, "batch_size", c[4])?,
        });
    }
    Ok(out)
}

/// The applications of the Pollux and Sia workloads.
pub const POLLUX_APPS: &[&str] = &[
    "ncf",
    "cifar10",
    "bert",
    "deepspeech2",
    "yolov3",
    "imagenet",
];

/// Run times of the Pollux/Sia applications. The workloads give no durations (their
/// simulators derive them from throughput profiles that are not in `../shared`), so they
/// are taken from the published Tiresias results, which run every job on exactly the
/// replicas its row asks for: for each (application, replicas), the shortest JCT Tiresias
/// achieved at any job load (0.5-2.0), which is the run time with the least queueing in
/// hundreds of samples. Pairs never seen scale the application's least GPU-time linearly.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolluxRuntimes {
    /// (application, replicas) -> run time in ms.
    pub exact: BTreeMap<(String, u32), u64>,
    /// application -> least GPU-milliseconds seen (run time × replicas).
    pub gpu_ms: BTreeMap<String, u64>,
}

impl PolluxRuntimes {
    /// Calibrates from a `philly-pollux` folder: results-jobload/tiresias-{0.5,1.0,1.5,2.0}
    /// and the matching workloads folders.
    pub fn calibrate(root: &Path) -> Result<PolluxRuntimes, TraceError> {
        let mut rt = PolluxRuntimes::default();
        for (load, dir) in [
            ("0.5", "workloads-0.5"),
            ("1.0", "workloads"),
            ("1.5", "workloads-1.5"),
            ("2.0", "workloads-2.0"),
        ] {
            let publ = read_published(
                &root.join(format!("results-jobload/tiresias-{load}/summary.json")),
                "tiresias",
            )?;
            for (w, jobs) in &publ.jcts {
                let path = root.join(format!("{dir}/{w}.csv"));
                let list = read_pollux(&path)?;
                for (name, jct) in jobs {
                    let j = list.iter().find(|j| &j.name == name).ok_or_else(|| {
                        err(
                            &path.display().to_string(),
                            0,
                            format!(
                                "job `{name}` of the published results is not in this workload"
                            ),
                        )
                    })?;
                    let ms = (jct * 1000.0).round() as u64;
                    let e = rt
                        .exact
                        .entry((j.application.clone(), j.num_replicas))
                        .or_insert(ms);
                    *e = (*e).min(ms);
                    let g = rt.gpu_ms.entry(j.application.clone()).or_insert(u64::MAX);
                    *g = (*g).min(ms * j.num_replicas as u64);
                }
            }
        }
        Ok(rt)
    }

    /// Run time of `app` on `replicas` GPUs.
    pub fn runtime_ms(&self, app: &str, replicas: u32) -> Option<u64> {
        self.exact
            .get(&(app.to_string(), replicas))
            .copied()
            .or_else(|| self.gpu_ms.get(app).map(|g| g / replicas.max(1) as u64))
    }
}

/// A Pollux/Sia workload as gangs of one-GPU replicas (no adaptivity: replicas and batch
/// size stay as the user gave them, as Tiresias runs them), one tenant.
pub fn pollux_workload(
    jobs: &[PolluxJob],
    runtimes: &PolluxRuntimes,
    shape: &TaskShape,
    name: &str,
) -> Result<Workload, String> {
    let mut sorted: Vec<&PolluxJob> = jobs.iter().collect();
    sorted.sort_by(|a, b| a.time_s.total_cmp(&b.time_s).then(a.line.cmp(&b.line)));
    let mut w = Workload {
        name: name.to_string(),
        tenants: vec![Tenant {
            name: "pollux".into(),
            weight: 1.0,
            ..Default::default()
        }],
        ..Default::default()
    };
    for j in sorted {
        let duration_ms = runtimes
            .runtime_ms(&j.application, j.num_replicas)
            .ok_or_else(|| {
                format!(
                    "job {}: no run time known for application {}",
                    j.name, j.application
                )
            })?;
        w.jobs.push(Job {
            name: j.name.clone(),
            tenant: 0,
            submit_ms: (j.time_s * 1000.0).round() as Millis,
            priority: Priority::Batch,
            resources: gpu_task(shape, 1),
            tasks: j.num_replicas,
            gang: j.num_replicas > 1,
            duration_ms: duration_ms.max(1),
            checkpoint_ms: shape.checkpoint_ms,
            max_runtime_ms: None,
            topology: None,
        });
    }
    Ok(w)
}

/// A published Pollux-artefact result: `summary.json` with `mean` and per-workload `avgs`.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    pub policy: String,
    pub mean_jct_s: f64,
    pub avgs: BTreeMap<String, f64>,
    /// Per workload, per job: JCT in seconds.
    pub jcts: BTreeMap<String, BTreeMap<String, f64>>,
}

pub fn read_published(path: &Path, policy: &str) -> Result<Published, TraceError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| err(&file, 0, e.to_string()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(&file, e.line(), e.to_string()))?;
    let mean_jct_s = v["mean"]
        .as_f64()
        .ok_or_else(|| err(&file, 0, "mean: missing or not a number"))?;
    let num_map = |key: &str| -> Result<BTreeMap<String, f64>, TraceError> {
        let o = v[key]
            .as_object()
            .ok_or_else(|| err(&file, 0, format!("{key}: missing or not an object")))?;
        o.iter()
            .map(|(k, x)| {
                x.as_f64()
                    .map(|f| (k.clone(), f))
                    .ok_or_else(|| err(&file, 0, format!("{key}.{k}: not a number")))
            })
            .collect()
    };
    let avgs = num_map("avgs")?;
    let mut jcts = BTreeMap::new();
    if let Some(o) = v["jcts"].as_object() {
        for (w, m) in o {
            let mut per = BTreeMap::new();
            for (k, x) in m.as_object().into_iter().flatten() {
                let f = x
                    .as_f64()
                    .ok_or_else(|| err(&file, 0, format!("jcts.{w}.{k}: not a number")))?;
                per.insert(k.clone(), f);
            }
            jcts.insert(w.clone(), per);
        }
    }
    Ok(Published {
        policy: policy.to_string(),
        mean_jct_s,
        avgs,
        jcts,
    })
}

// --------------------------------------------------------------------- cluster shapes

fn node(i: usize, cpu_cores: u64, mem: u64, gpus: u32, model: &str) -> NodeSnap {
    NodeSnap::new(
        NodeId(i as u64),
        Capacity {
            isolation: Default::default(),
            images: false,
            cpu_milli: cpu_cores * 1000,
            memory_bytes: mem,
            devices: (0..gpus)
                .map(|k| Device {
                    index: k,
                    model: model.to_string(),
                })
                .collect(),
        },
    )
}

/// Alibaba PAI 2020 `pai_machine_spec.csv` (no header: machine,gpu_type,cap_cpu,cap_mem,cap_gpu;
/// memory in GB).
pub fn read_pai_machines(path: &Path) -> Result<Vec<NodeSnap>, TraceError> {
    let (file, lines) = rows(path)?;
    let mut out = Vec::new();
    for (l, row) in lines {
        if row.is_blank() {
            continue;
        }
        let c = cols(&file, l, &row, 5)?;
        let model = c[1].trim();
        let gpus: u32 = num(&file, l, "cap_gpu", c[4])?;
        if model.is_empty() {
            return Err(err(&file, l, "gpu_type: empty"));
        }
        if gpus > 0 && model == "CPU" {
            return Err(err(&file, l, "gpu_type: `CPU` with cap_gpu above 0"));
        }
        let cpu: u64 = num(&file, l, "cap_cpu", c[2])?;
        let mem: u64 = num(&file, l, "cap_mem", c[3])?;
        if cpu == 0 {
            return Err(err(&file, l, "cap_cpu: must be at least 1"));
        }
        out.push(node(out.len(), cpu, mem * 1_000_000_000, gpus, model));
    }
    Ok(out)
}

/// Alibaba spot 2026 `node_info_df.csv` (gpu_model,gpu_capacity_num,cpu_num,node_name). It
/// gives no memory: each node gets 8 GiB per core.
pub fn read_spot_nodes(path: &Path) -> Result<Vec<NodeSnap>, TraceError> {
    let (file, lines) = rows(path)?;
    let mut it = lines.into_iter();
    header(
        &file,
        &mut it,
        "gpu_model,gpu_capacity_num,cpu_num,node_name",
    )?;
    let mut out = Vec::new();
    for (l, row) in it {
        if row.is_blank() {
            continue;
        }
        let c = cols(&file, l, &row, 4)?;
        let model = c[0].trim();
        if model.is_empty() {
            return Err(err(&file, l, "gpu_model: empty"));
        }
        let gpus: u32 = num(&file, l, "gpu_capacity_num", c[1])?;
        let cpu: u64 = num(&file, l, "cpu_num", c[2])?;
        if cpu == 0 {
            return Err(err(&file, l, "cpu_num: must be at least 1"));
        }
        out.push(node(out.len(), cpu, cpu * 8 * GIB, gpus, model));
    }
    Ok(out)
}

/// A pool from a spec like `16x4:T4` or `6x4:T4+3x8:RTX+2x8:A100` (nodes x GPUs:model,
/// `+` between groups; `32x0` for CPU-only nodes). Each node gets 12 cores and 48 GiB per
/// GPU (CPU-only: 64 cores, 256 GiB), unless `:cpu=N,mem=GiB` follows the model.
pub fn parse_pool(spec: &str) -> Result<Vec<NodeSnap>, String> {
    let mut out = Vec::new();
    for group in spec.split('+').map(str::trim) {
        let (counts, rest) = group.split_once(':').unwrap_or((group, ""));
        let (n, g) = counts
            .split_once('x')
            .ok_or_else(|| format!("pool group `{group}`: expected NODESxGPUS[:MODEL]"))?;
        let n: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("pool group `{group}`: node count `{n}` is not a number"))?;
        let g: u32 = g
            .trim()
            .parse()
            .map_err(|_| format!("pool group `{group}`: GPU count `{g}` is not a number"))?;
        if n == 0 {
            return Err(format!(
                "pool group `{group}`: node count must be at least 1"
            ));
        }
        let (model, opts) = if g > 0 {
            let (m, o) = rest.split_once(':').unwrap_or((rest, ""));
            let m = m.trim();
            if m.is_empty() || m.contains('=') {
                return Err(format!(
                    "pool group `{group}`: GPU nodes need a model (16x4:T4)"
                ));
            }
            (m.to_string(), o)
        } else {
            (String::new(), rest)
        };
        let parts = opts.split(',').map(str::trim).filter(|p| !p.is_empty());
        let (mut cpu, mut mem) = if g > 0 {
            (12 * g as u64, 48 * g as u64)
        } else {
            (64, 256)
        };
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| format!("pool group `{group}`: `{p}` is not cpu=N or mem=GiB"))?;
            let v: u64 = v.parse().ok().filter(|v| *v > 0).ok_or_else(|| {
                format!("pool group `{group}`: {k}=`{v}` is not a positive number")
            })?;
            match k {
                "cpu" => cpu = v,
                "mem" => mem = v,
                _ => {
                    return Err(format!(
                        "pool group `{group}`: unknown key `{k}` (cpu, mem)"
                    ))
                }
            }
        }
        for _ in 0..n {
            out.push(node(out.len(), cpu, mem * GIB, g, &model));
        }
    }
    Ok(out)
}

// ------------------------------------------------------------------ inference arrivals

/// One request: when it arrived and what it costs (tokens, or seconds of GPU work).
pub type Arrival = (Millis, f64);

/// Azure LLM inference 2023: `TIMESTAMP,ContextTokens,GeneratedTokens`; cost = tokens.
pub fn read_azure_llm(path: &Path) -> Result<Vec<Arrival>, TraceError> {
    let (file, lines) = rows(path)?;
    let mut it = lines.into_iter();
    header(&file, &mut it, "TIMESTAMP,ContextTokens,GeneratedTokens")?;
    let mut out = Vec::new();
    for (l, row) in it {
        if row.is_blank() {
            continue;
        }
        let c = cols(&file, l, &row, 3)?;
        let t = parse_time(c[0]).ok_or_else(|| {
            err(
                &file,
                l,
                format!("TIMESTAMP: `{}` is not YYYY-MM-DD HH:MM:SS.f", c[0]),
            )
        })?;
        let ctx: u64 = num(&file, l, "ContextTokens", c[1])?;
        let gen: u64 = num(&file, l, "GeneratedTokens", c[2])?;
        out.push((t, (ctx + gen) as f64));
    }
    out.sort_by_key(|a| a.0);
    Ok(out)
}

/// Alibaba GenAI 2026 `lora_request_trace.csv`: requests that succeeded, cost = seconds of
/// execution (one image pipeline per GPU at a time).
pub fn read_genai(path: &Path) -> Result<Vec<Arrival>, TraceError> {
    let (file, lines) = rows(path)?;
    let mut it = lines.into_iter();
    header(
        &file,
        &mut it,
        "gmt_create,predict_type,predict_status,exec_time_seconds,groupId,prompt_length,negative_prompt_length,num_images_per_prompt,num_inference_steps,checkpoint_model_version_id,num_lora",
    )?;
    let mut out = Vec::new();
    for (l, row) in it {
        if row.is_blank() {
            continue;
        }
        let c = cols(&file, l, &row, 11)?;
        let t = parse_time(c[0]).ok_or_else(|| {
            err(
                &file,
                l,
                format!("gmt_create: `{}` is not YYYY-MM-DD HH:MM:SS", c[0]),
            )
        })?;
        match c[2].trim() {
            "SUCCEED" => {}
            "FAILED" | "PENDING" | "PROCESSING" => continue,
            s => return Err(err(&file, l, format!("predict_status: unknown `{s}`"))),
        }
        out.push((t, float(&file, l, "exec_time_seconds", c[3])?));
    }
    out.sort_by_key(|a| a.0);
    Ok(out)
}

/// Offered load of `arrivals` as steps of `bucket_ms`: cost units per second in each bucket.
/// Times are shifted to start at `start_ms` and compressed by `speedup` (2: twice as fast).
/// Returns the steps and when the load ends.
pub fn load_steps(
    arrivals: &[Arrival],
    bucket_ms: u64,
    start_ms: Millis,
    speedup: f64,
) -> (Vec<(Millis, f64)>, Millis) {
    let Some(first) = arrivals.first().map(|a| a.0) else {
        return (Vec::new(), start_ms);
    };
    let b = bucket_ms.max(1) as i64;
    let mut buckets: BTreeMap<i64, f64> = BTreeMap::new();
    for (t, cost) in arrivals {
        let rel = ((t - first) as f64 / speedup.max(1e-9)) as i64;
        *buckets.entry(rel / b).or_insert(0.0) += cost;
    }
    let last = buckets.keys().next_back().copied().unwrap_or(0);
    let steps = (0..=last)
        .map(|k| {
            (
                start_ms + k * b,
                buckets.get(&k).copied().unwrap_or(0.0) / (b as f64 / 1000.0),
            )
        })
        .collect();
    (steps, start_ms + (last + 1) * b)
}

/// An inference service driven by `arrivals`, one GPU per replica.
pub fn service_from(
    name: &str,
    tenant: usize,
    arrivals: &[Arrival],
    replica_capacity: f64,
    models: &[String],
    start_ms: Millis,
    speedup: f64,
) -> Service {
    let (load, load_end_ms) = load_steps(arrivals, 10_000, start_ms, speedup);
    Service {
        name: name.to_string(),
        tenant,
        resources: TaskResources {
            needs: Default::default(),
            cpu_milli: 8_000,
            memory_bytes: 32 * GIB,
            gpu: Some(GpuRequest {
                any_of: models[1..].to_vec(),
                ..GpuRequest::whole(&models[0], 1)
            }),
        },
        replica_rps: replica_capacity,
        min_replicas: 1,
        max_replicas: 512,
        target_utilisation: 0.7,
        startup_ms: 30_000,
        load,
        load_end_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traces() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/traces")
    }

    /// A scratch file removed when the test is done with it.
    struct Tmp(std::path::PathBuf);

    impl std::ops::Deref for Tmp {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn tmp(name: &str, text: &str) -> Tmp {
        let p = std::env::temp_dir().join(format!("caravel-traces-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        Tmp(p)
    }

    #[test]
    fn times_parse_to_epoch_milliseconds() {
        assert_eq!(parse_time("1970-01-01 00:00:00"), Some(0));
        assert_eq!(parse_time("1970-01-02 00:00:01.5"), Some(86_401_500));
        assert_eq!(
            parse_time("2023-11-16 18:15:46.6805900"),
            Some(1_700_158_546_680)
        );
        assert_eq!(parse_time("2017-13-01 00:00:00"), None);
        assert_eq!(parse_time("2017-10-09T07:01:55"), None);
        assert_eq!(parse_time("2017-10-09 07:61:55"), None);
    }

    #[test]
    fn gpus_split_into_node_sized_tasks() {
        assert_eq!(split_gpus(1, 8), (1, 1));
        assert_eq!(split_gpus(8, 8), (1, 8));
        assert_eq!(split_gpus(16, 8), (2, 8));
        assert_eq!(split_gpus(12, 8), (2, 6));
        assert_eq!(split_gpus(128, 8), (16, 8));
        assert_eq!(split_gpus(12, 4), (3, 4));
        assert_eq!(split_gpus(7, 4), (7, 1));
    }

    #[test]
    fn the_real_traces_read() {
        let t = traces();
        let philly = read_philly(&t.join("philly-pollux/philly.csv")).unwrap();
        assert_eq!(philly.len(), 82_247);
        assert_eq!(philly.iter().filter(|j| j.num_gpus == 128).count(), 3);
        let w = philly_workload(&philly, &TaskShape::default(), "philly");
        assert_eq!(w.tenants.len(), 15);
        assert!(w.jobs.windows(2).all(|p| p[0].submit_ms <= p[1].submit_ms));
        let gpus: u64 = w
            .jobs
            .iter()
            .map(|j| j.tasks as u64 * j.resources.gpu_count() as u64)
            .sum();
        let want: u64 = philly.iter().map(|j| j.num_gpus as u64).sum();
        assert_eq!(gpus, want, "splitting into tasks keeps every GPU");

        let p = read_pollux(&t.join("philly-pollux/workloads/workload-1.csv")).unwrap();
        assert_eq!(p.len(), 160);
        for dir in ["philly", "saturn"] {
            let s =
                read_pollux(&t.join(format!("sia-sosp23-workloads/{dir}/workload-1.csv"))).unwrap();
            assert_eq!(s.len(), 160, "{dir}");
        }

        let pai = read_pai_machines(&t.join("alibaba-gpu-v2020-pai/pai_machine_spec.csv")).unwrap();
        assert_eq!(pai.len(), 1_897);
        let gpus: usize = pai.iter().map(|n| n.capacity.devices.len()).sum();
        assert_eq!(gpus, 6_742);
        let spot = read_spot_nodes(&t.join("alibaba-spot-gpu-v2026/node_info_df.csv")).unwrap();
        assert_eq!(spot.len(), 4_278);
        let gpus: usize = spot.iter().map(|n| n.capacity.devices.len()).sum();
        assert_eq!(gpus, 10_412);

        let conv =
            read_azure_llm(&t.join("azure-llm-inference-2023/AzureLLMInferenceTrace_conv.csv"))
                .unwrap();
        // SOURCE.md says 19,365 and 8,818; each file has one row more (the last lacks a newline).
        assert_eq!(conv.len(), 19_366);
        let code =
            read_azure_llm(&t.join("azure-llm-inference-2023/AzureLLMInferenceTrace_code.csv"))
                .unwrap();
        assert_eq!(code.len(), 8_819);
        let genai = read_genai(&t.join("alibaba-genai-v2026/lora_request_trace.csv")).unwrap();
        assert_eq!(genai.len(), 26_392, "the requests that succeeded");
    }

    #[test]
    fn pollux_run_times_come_from_the_shortest_published_tiresias_jct() {
        let root = traces().join("philly-pollux");
        let rt = PolluxRuntimes::calibrate(&root).unwrap();
        assert_eq!(rt.runtime_ms("ncf", 1), Some(77_000));
        assert_eq!(rt.runtime_ms("imagenet", 32), Some(27_495_000));
        assert_eq!(rt.runtime_ms("yolov3", 4), Some(14_135_000));
        // Never seen with 2 replicas: the least GPU-time (14,135 s x 4) over 2.
        assert_eq!(rt.runtime_ms("yolov3", 2), Some(28_270_000));
        assert_eq!(rt.runtime_ms("resnet", 2), None);
        let list = read_pollux(&root.join("workloads/workload-1.csv")).unwrap();
        let w = pollux_workload(&list, &rt, &TaskShape::default(), "w1").unwrap();
        assert_eq!(w.jobs.len(), 160);
        assert!(w
            .jobs
            .iter()
            .all(|j| j.resources.gpu_count() == 1 && j.gang == (j.tasks > 1)));
    }

    #[test]
    fn malformed_rows_name_file_line_and_reason() {
        let p = tmp("philly.csv", "timestamp,duration,num_gpus,gpu_time,cluster\n2017-10-09 07:01:55,66.0,1,66.0,a\n2017-10-09 07:01:55,-3,1,66.0,a\n");
        let e = read_philly(&p).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.reason.contains("duration"), "{e}");
        let p = tmp(
            "pollux.csv",
            "name,time,application,num_replicas,batch_size\na,1,resnet,1,32\n",
        );
        let e = read_pollux(&p).unwrap_err();
        assert_eq!((e.line, e.reason.contains("application")), (2, true), "{e}");
        let p = tmp("pai.csv", "m1,T4,96,512,2\nm2,T4,96,lots,2\n");
        let e = read_pai_machines(&p).unwrap_err();
        assert_eq!((e.line, e.reason.contains("cap_mem")), (2, true), "{e}");
        let p = tmp(
            "spot.csv",
            "gpu_model,gpu_capacity_num,cpu_num,node_name\nA10,1,0,n\n",
        );
        let e = read_spot_nodes(&p).unwrap_err();
        assert!(
            e.to_string().ends_with(":2: cpu_num: must be at least 1"),
            "{e}"
        );
        let p = tmp(
            "azure.csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n",
        );
        let e = read_azure_llm(&p).unwrap_err();
        assert!(e.reason.starts_with("TIMESTAMP"), "{e}");
        let p = tmp(
            "short.csv",
            "timestamp,duration,num_gpus,gpu_time,cluster\n2017-10-09 07:01:55,66.0,1\n",
        );
        assert_eq!(read_philly(&p).unwrap_err().reason, "3 columns, expected 5");
    }

    #[test]
    fn pools_parse_and_bad_specs_say_why() {
        let p = parse_pool("2x4:T4+1x0+1x8:A100:cpu=96,mem=1024").unwrap();
        assert_eq!(
            parse_pool("1x0:cpu=8").unwrap()[0].capacity.cpu_milli,
            8_000
        );
        assert_eq!(p.len(), 4);
        assert_eq!(p[0].capacity.devices.len(), 4);
        assert_eq!(p[0].capacity.cpu_milli, 48_000);
        assert!(p[2].capacity.devices.is_empty());
        assert_eq!(p[3].capacity.cpu_milli, 96_000);
        assert_eq!(p[3].capacity.memory_bytes, 1024 * GIB);
        for (bad, why) in [
            ("4:T4", "NODESxGPUS"),
            ("0x4:T4", "at least 1"),
            ("2x4", "need a model"),
            ("2x4:T4:gpu=3", "unknown key"),
            ("1x0:cpu=x", "positive number"),
            ("2xfour:T4", "not a number"),
        ] {
            let e = parse_pool(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn load_steps_are_cost_per_second() {
        let a = vec![(1_000, 2.0), (1_500, 4.0), (21_000, 10.0)];
        let (steps, end) = load_steps(&a, 10_000, 0, 1.0);
        assert_eq!(steps, vec![(0, 0.6), (10_000, 0.0), (20_000, 1.0)]);
        assert_eq!(end, 30_000);
        let (steps, _) = load_steps(&a, 10_000, 5, 2.0);
        assert_eq!(steps, vec![(5, 0.6), (10_005, 1.0)]);
    }
}
