//! A synthetic mixed pool: the workload Caravel is built for, at any size, from a seed.
//!
//! Nodes: half 8×A100, a quarter 8×H100, a tenth 4×L4, the rest CPU-only. Tenants share
//! the pool by weight, each guaranteed a slice of the A100s and H100s (60 % of them in
//! all; the rest is shared). Jobs arrive as a Poisson process sized so that the offered
//! GPU load is `load` × the pool's GPUs: training gangs of 2-16 eight-GPU tasks (hours,
//! checkpointed every 30 min), single-node training, small GPU batch work (whole GPUs and
//! fractions), CPU batch, and spot work. Inference services follow a diurnal load (a day
//! compressed to `day_s`). Durations are log-normal. With `limits=F` every job declares a
//! max runtime of F times its true duration, rounded up to a minute (users' time limits, as
//! Slurm's `--time`), which lets the head-of-line job reserve room and others backfill.

use caravel_core::{Capacity, Device, GpuRequest, Millis, NodeId, Priority, Quota, TaskResources};
use caravel_sched::NodeSnap;

use crate::replay::{Job, Service, Tenant, Workload};
use crate::rng::Rng;

const GIB: u64 = 1 << 30;

/// What to generate; parsed from `nodes=1000,tasks=100000,load=0.9,...`.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub nodes: usize,
    /// Tasks in total over all jobs (approximately: jobs are whole).
    pub tasks: u64,
    /// Offered GPU load as a fraction of the pool's GPUs.
    pub load: f64,
    pub tenants: usize,
    pub services: usize,
    /// Length of the services' load cycle, in seconds.
    pub day_s: u64,
    pub seed: u64,
    /// Declared max runtime over true duration (at least 1); 0: jobs declare none.
    pub limits: f64,
    /// Nodes per rack, in pool order; every training gang is then held to one rack (and
    /// no larger than one). 0: no topology.
    pub rack_nodes: usize,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            nodes: 200,
            tasks: 20_000,
            load: 0.9,
            tenants: 8,
            services: 4,
            day_s: 86_400,
            seed: 1,
            limits: 0.0,
            rack_nodes: 0,
        }
    }
}

impl Spec {
    pub fn parse(s: &str) -> Result<Spec, String> {
        let mut spec = Spec::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("synthetic: `{part}` is not KEY=VALUE"))?;
            let int = |v: &str| -> Result<u64, String> {
                v.replace('_', "")
                    .parse::<u64>()
                    .map_err(|_| format!("synthetic: {k}=`{v}` is not a whole number"))
            };
            match k {
                "nodes" => spec.nodes = int(v)? as usize,
                "tasks" => spec.tasks = int(v)?,
                "tenants" => spec.tenants = int(v)? as usize,
                "services" => spec.services = int(v)? as usize,
                "day_s" => spec.day_s = int(v)?,
                "seed" => spec.seed = int(v)?,
                "rack_nodes" => spec.rack_nodes = int(v)? as usize,
                "limits" => {
                    spec.limits = v
                        .parse::<f64>()
                        .ok()
                        .filter(|x| *x == 0.0 || (x.is_finite() && *x >= 1.0 && *x <= 100.0))
                        .ok_or_else(|| {
                            format!(
                                "synthetic: limits=`{v}` is not 0 (no max runtimes) or a factor in [1, 100]"
                            )
                        })?
                }
                "load" => {
                    spec.load = v
                        .parse::<f64>()
                        .ok()
                        .filter(|x| x.is_finite() && *x > 0.0 && *x <= 10.0)
                        .ok_or_else(|| format!("synthetic: load=`{v}` is not a number in (0, 10]"))?
                }
                _ => {
                    return Err(format!(
                        "synthetic: unknown key `{k}` (nodes, tasks, load, tenants, services, day_s, seed, limits, rack_nodes)"
                    ))
                }
            }
        }
        if spec.nodes < 10 {
            return Err("synthetic: nodes must be at least 10".into());
        }
        if spec.tenants == 0 {
            return Err("synthetic: tenants must be at least 1".into());
        }
        if spec.tasks == 0 {
            return Err("synthetic: tasks must be at least 1".into());
        }
        if spec.day_s == 0 {
            return Err("synthetic: day_s must be at least 1".into());
        }
        if spec.rack_nodes == 1 {
            return Err(
                "synthetic: rack_nodes must be 0 (no racks) or at least 2 (a gang has 2 or more members)"
                    .into(),
            );
        }
        Ok(spec)
    }
}

fn unit(r: &mut Rng) -> f64 {
    (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Log-normal with the given mean and shape `sigma`.
fn lognormal(r: &mut Rng, mean: f64, sigma: f64) -> f64 {
    let u1 = unit(r).max(1e-12);
    let u2 = unit(r);
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    (mean.ln() - sigma * sigma / 2.0 + sigma * z).exp()
}

fn gpu_node(i: usize, gpus: u32, model: &str, cpu: u64, mem_gib: u64) -> NodeSnap {
    NodeSnap::new(
        NodeId(i as u64),
        Capacity {
            isolation: Default::default(),
            images: false,
            cpu_milli: cpu * 1000,
            memory_bytes: mem_gib * GIB,
            devices: (0..gpus)
                .map(|k| Device {
                    index: k,
                    model: model.to_string(),
                })
                .collect(),
        },
    )
}

/// The pool of `spec.nodes` nodes.
pub fn pool(spec: &Spec) -> Vec<NodeSnap> {
    let n = spec.nodes;
    let (a100, h100, l4) = (n / 2, n / 4, n / 10);
    (0..n)
        .map(|i| {
            let mut node = if i < a100 {
                gpu_node(i, 8, "A100", 128, 1024)
            } else if i < a100 + h100 {
                gpu_node(i, 8, "H100", 192, 2048)
            } else if i < a100 + h100 + l4 {
                gpu_node(i, 4, "L4", 64, 256)
            } else {
                gpu_node(i, 0, "", 64, 256)
            };
            // rack_nodes = 0: no racks.
            if let Some(rack) = i.checked_div(spec.rack_nodes) {
                node.topology = caravel_core::Topology {
                    region: "region".into(),
                    zone: "zone".into(),
                    rack: format!("rack-{rack}"),
                };
            }
            node
        })
        .collect()
}

fn res(cpu: u64, mem_gib: u64, gpu: Option<GpuRequest>) -> TaskResources {
    TaskResources {
        needs: Default::default(),
        cpu_milli: cpu,
        memory_bytes: mem_gib * GIB,
        gpu,
    }
}

/// The kinds of job, with their share of arrivals.
const MIX: [(Kind, f64); 5] = [
    (Kind::Gang, 0.03),
    (Kind::Train, 0.12),
    (Kind::SmallGpu, 0.35),
    (Kind::Cpu, 0.35),
    (Kind::Spot, 0.15),
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Gang,
    Train,
    SmallGpu,
    Cpu,
    Spot,
}

/// `big_nodes`: for each of A100 and H100, the most nodes of it one gang may span (the
/// pool's, or with racks the fullest rack's), so every gang can run.
fn draw_job(
    r: &mut Rng,
    tenant: usize,
    submit_ms: Millis,
    seq: usize,
    big_nodes: (u64, u64),
) -> Job {
    let x = unit(r);
    let mut acc = 0.0;
    let mut kind = Kind::Cpu;
    for (k, p) in MIX {
        acc += p;
        if x < acc {
            kind = k;
            break;
        }
    }
    let big = if r.below(3) == 0 { "H100" } else { "A100" };
    let (name, priority, resources, tasks, gang, mean_s, ckpt_s) = match kind {
        Kind::Gang => {
            let room = if big == "H100" {
                big_nodes.1
            } else {
                big_nodes.0
            };
            let tasks = (1u32 << (1 + r.below(4))).min(room.max(1) as u32); // 2, 4, 8, 16
            let g = GpuRequest::whole(big, 8);
            (
                "train-gang",
                Priority::Batch,
                res(96_000, 640, Some(g)),
                tasks,
                true,
                4.0 * 3600.0,
                1800,
            )
        }
        Kind::Train => {
            let count = [1, 2, 4, 8][r.below(4) as usize];
            let g = GpuRequest::whole(big, count);
            let cpu = 12_000 * count as u64;
            (
                "train",
                Priority::Batch,
                res(cpu, 64 * count as u64, Some(g)),
                1,
                false,
                3600.0,
                1800,
            )
        }
        Kind::SmallGpu => {
            let mut g = GpuRequest::whole("L4", 1);
            g.any_of = vec!["A100".into()];
            if r.below(2) == 0 {
                g.milli = Some([250, 500][r.below(2) as usize]);
            }
            (
                "batch-gpu",
                Priority::Batch,
                res(4_000, 16, Some(g)),
                1,
                false,
                1200.0,
                0,
            )
        }
        Kind::Cpu => {
            let cpu = 1000 * (1 << r.below(5)); // 1-16 cores
            (
                "batch-cpu",
                Priority::Batch,
                res(cpu, 4 * (cpu / 1000).max(1), None),
                1,
                false,
                600.0,
                0,
            )
        }
        Kind::Spot => {
            let mut g = GpuRequest::whole("A100", 1);
            g.any_of = vec!["H100".into(), "L4".into()];
            (
                "spot",
                Priority::Spot,
                res(8_000, 32, Some(g)),
                1,
                false,
                1800.0,
                600,
            )
        }
    };
    let duration_ms = (lognormal(r, mean_s, 1.0) * 1000.0).clamp(1_000.0, 7.0 * 86_400_000.0);
    Job {
        name: format!("{name}-{seq}"),
        tenant,
        submit_ms,
        priority,
        resources,
        tasks,
        gang,
        duration_ms: duration_ms as u64,
        checkpoint_ms: ckpt_s * 1000,
        max_runtime_ms: None,
        topology: None,
    }
}

/// Expected (tasks, GPU-milliseconds of work) per job of the mix.
fn per_job() -> (f64, f64) {
    let mut tasks = 0.0;
    let mut gpu_ms = 0.0;
    for (k, p) in MIX {
        let (t, g, mean_s) = match k {
            Kind::Gang => (7.5, 7.5 * 8.0, 4.0 * 3600.0),
            Kind::Train => (1.0, 3.75, 3600.0),
            Kind::SmallGpu => (1.0, 0.5 + 0.5 * 0.375, 1200.0),
            Kind::Cpu => (1.0, 0.0, 600.0),
            Kind::Spot => (1.0, 1.0, 1800.0),
        };
        tasks += p * t;
        gpu_ms += p * g * mean_s * 1000.0;
    }
    (tasks, gpu_ms)
}

/// The pool and the workload for `spec`.
pub fn generate(spec: &Spec) -> (Vec<NodeSnap>, Workload) {
    let nodes = pool(spec);
    let mut r = Rng::new(spec.seed);
    let gpus: u64 = nodes.iter().map(|n| n.capacity.devices.len() as u64).sum();
    let (a100, h100) = (
        nodes
            .iter()
            .filter(|n| n.capacity.gpu_count("A100") > 0)
            .count() as u64
            * 8,
        nodes
            .iter()
            .filter(|n| n.capacity.gpu_count("H100") > 0)
            .count() as u64
            * 8,
    );
    // The most nodes of a model a gang may span: the pool's, or the fullest rack's.
    let span_of = |model: &str| -> u64 {
        let mut per_rack: std::collections::BTreeMap<&str, u64> = Default::default();
        for n in nodes.iter().filter(|n| n.capacity.gpu_count(model) > 0) {
            *per_rack.entry(n.topology.rack.as_str()).or_default() += 1;
        }
        per_rack.values().copied().max().unwrap_or(0)
    };
    let big_nodes = (span_of("A100"), span_of("H100"));
    // Weights 1..=3; guarantees of A100 and H100 in proportion, 60 % of them in all.
    let weights: Vec<f64> = (0..spec.tenants).map(|_| 1.0 + r.below(3) as f64).collect();
    let wsum: f64 = weights.iter().sum();
    let tenants: Vec<Tenant> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let mut g = Quota::default();
            g.gpus
                .insert("A100".into(), (0.6 * a100 as f64 * w / wsum) as u32);
            g.gpus
                .insert("H100".into(), (0.6 * h100 as f64 * w / wsum) as u32);
            Tenant {
                name: format!("tenant-{i}"),
                weight: *w,
                quota: Quota::default(),
                guarantee: g,
            }
        })
        .collect();
    let (tasks_per_job, gpu_ms_per_job) = per_job();
    let n_jobs = ((spec.tasks as f64 / tasks_per_job).round() as usize).max(1);
    // Poisson arrivals at the rate that offers `load` of the GPUs.
    let rate_per_ms = spec.load * gpus.max(1) as f64 / gpu_ms_per_job;
    let mut t = 0.0f64;
    let mut jobs = Vec::with_capacity(n_jobs);
    let mut total_tasks = 0u64;
    while total_tasks < spec.tasks {
        t += -unit(&mut r).max(1e-12).ln() / rate_per_ms;
        let tenant = r.below(spec.tenants as u64) as usize;
        let j = draw_job(&mut r, tenant, t as Millis, jobs.len(), big_nodes);
        total_tasks += j.tasks as u64;
        let mut j = j;
        if j.gang && spec.rack_nodes > 0 {
            j.topology = Some(caravel_core::TopologyLevel::Rack);
        }
        if spec.limits > 0.0 {
            // No draw from the generator: the same seed gives the same jobs either way.
            let minute = 60_000.0;
            j.max_runtime_ms =
                Some(((j.duration_ms as f64 * spec.limits / minute).ceil() * minute) as u64);
        }
        jobs.push(j);
    }
    let span = t.max(1.0) as Millis;
    // Services: diurnal, peaking at a few percent of the L4 and A100 capacity each.
    let day = spec.day_s as f64 * 1000.0;
    let services = (0..spec.services)
        .map(|k| {
            let model = if k % 2 == 0 { "L4" } else { "A100" };
            let peak = (gpus as f64 * 0.02).max(2.0) * 10.0; // requests/s at 10 per replica
            let phase = r.below(1000) as f64 / 1000.0;
            let step = 60_000;
            let load = (0..span / step + 1)
                .map(|i| {
                    let tt = (i * step) as f64;
                    let d = 0.5 + 0.45 * (2.0 * std::f64::consts::PI * (tt / day + phase)).sin();
                    let noise = 0.9 + 0.2 * unit(&mut r);
                    (i * step, peak * d * noise)
                })
                .collect();
            Service {
                name: format!("svc-{k}"),
                tenant: k % spec.tenants,
                resources: res(8_000, 32, Some(GpuRequest::whole(model, 1))),
                replica_rps: 10.0,
                min_replicas: 1,
                max_replicas: (peak / 5.0).ceil() as u32 + 1,
                target_utilisation: 0.7,
                startup_ms: 20_000,
                load,
                load_end_ms: span,
            }
        })
        .collect();
    let w = Workload {
        name: format!(
            "synthetic nodes={} tasks={} load={} tenants={} services={} seed={}{}{}",
            spec.nodes,
            spec.tasks,
            spec.load,
            spec.tenants,
            spec.services,
            spec.seed,
            if spec.limits > 0.0 {
                format!(" limits={}", spec.limits)
            } else {
                String::new()
            },
            if spec.rack_nodes > 0 {
                format!(" rack_nodes={}", spec.rack_nodes)
            } else {
                String::new()
            }
        ),
        tenants,
        jobs,
        services,
    };
    (nodes, w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let s = Spec::parse("nodes=100000,tasks=1_000_000,load=0.8,seed=7").unwrap();
        assert_eq!((s.nodes, s.tasks, s.seed), (100_000, 1_000_000, 7));
        assert_eq!(s.load, 0.8);
        for (bad, why) in [
            ("nodes=5", "at least 10"),
            ("load=-1", "load"),
            ("colour=red", "unknown key"),
            ("tasks", "KEY=VALUE"),
            ("tasks=many", "whole number"),
            ("limits=0.5", "factor in [1, 100]"),
            ("limits=NaN", "limits"),
            ("rack_nodes=1", "at least 2"),
            ("rack_nodes=two", "whole number"),
        ] {
            let e = Spec::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn generation_is_seeded_and_offers_the_load_asked() {
        let spec = Spec::parse("nodes=400,tasks=20000,load=0.9,seed=3").unwrap();
        let (nodes, w) = generate(&spec);
        let (_, w2) = generate(&spec);
        assert_eq!(
            format!("{:?}", w.jobs),
            format!("{:?}", w2.jobs),
            "same seed, same jobs"
        );
        let tasks: u64 = w.jobs.iter().map(|j| j.tasks as u64).sum();
        assert!((20_000..20_016).contains(&tasks), "{tasks}");
        let gpus: u64 = nodes.iter().map(|n| n.capacity.devices.len() as u64).sum();
        let span = w.jobs.last().unwrap().submit_ms as f64;
        let gpu_ms: f64 = w
            .jobs
            .iter()
            .map(|j| {
                j.resources.gpu_milli() as f64 / 1000.0 * j.tasks as f64 * j.duration_ms as f64
            })
            .sum();
        let offered = gpu_ms / span / gpus as f64;
        assert!((0.6..1.25).contains(&offered), "offered load {offered}");
        assert!(
            w.jobs.iter().any(|j| j.gang) && w.jobs.iter().any(|j| j.priority == Priority::Spot)
        );
        assert!(w.tenants.iter().all(|t| !t.guarantee.gpus.is_empty()));
        // Declared limits change nothing else, and every job ends within its limit.
        let limited = generate(&Spec {
            limits: 2.0,
            ..spec.clone()
        })
        .1;
        assert_eq!(limited.jobs.len(), w.jobs.len());
        for (a, b) in w.jobs.iter().zip(&limited.jobs) {
            assert_eq!((a.duration_ms, a.max_runtime_ms), (b.duration_ms, None));
            let m = b.max_runtime_ms.expect("a declared limit");
            assert!(m >= 2 * b.duration_ms && m < 2 * b.duration_ms + 60_000 && m % 60_000 == 0);
        }
        let other = generate(&Spec {
            seed: 4,
            ..spec.clone()
        })
        .1;
        assert_ne!(
            format!("{:?}", w.jobs[..50].to_vec()),
            format!("{:?}", other.jobs[..50].to_vec())
        );
    }

    #[test]
    fn racks_hold_each_gang_to_one_rack_it_fits_in() {
        let spec = Spec::parse("nodes=400,tasks=20000,load=0.9,seed=3,rack_nodes=6").unwrap();
        let (nodes, w) = generate(&spec);
        assert_eq!(nodes[0].topology.rack, "rack-0");
        assert_eq!(nodes[13].topology.rack, "rack-2");
        let plain = generate(&Spec {
            rack_nodes: 0,
            ..spec.clone()
        })
        .1;
        // The same jobs, drawn alike, but gangs are held to a rack and no larger than the
        // fullest one (so more jobs make up the tasks asked for).
        assert!(w.jobs.len() > plain.jobs.len());
        let mut capped = 0;
        for (a, b) in w.jobs.iter().zip(&plain.jobs) {
            assert_eq!((a.submit_ms, a.duration_ms), (b.submit_ms, b.duration_ms));
            if a.gang {
                assert_eq!(a.topology, Some(caravel_core::TopologyLevel::Rack));
                assert!(
                    a.tasks <= 6 && a.tasks == b.tasks.min(6),
                    "{} {}",
                    a.tasks,
                    b.tasks
                );
                capped += (a.tasks < b.tasks) as usize;
            } else {
                assert_eq!(a.topology, None);
            }
        }
        assert!(capped > 0, "some 8- and 16-member gangs were capped");
        assert!(plain.jobs.iter().all(|j| j.topology.is_none()));
    }
}
