//! `caravel bench sched --scenario NAME`: the pure scheduler alone, single thread, in
//! memory, on synthetic pools shaped after the benchmarks the issue names. Each call to
//! `Scheduler::schedule` is one decision (one job, or one whole gang), timed on its own.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, Result};
use caravel_core::{
    Capacity, Device, GpuRequest, JobId, NodeId, Priority, Quota, TaskResources, TenantId,
};
use caravel_sched::{Config, JobReq, NodeSnap, Scheduler, TenantSnap};

/// xorshift64*: a tiny seeded generator, so every run builds the same pool and workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn cpu_node(id: u64, cpus: u64, gib: u64) -> NodeSnap {
    NodeSnap::new(
        NodeId(id),
        Capacity {
            isolation: Default::default(),
            images: false,
            cpu_milli: cpus * 1000,
            memory_bytes: gib << 30,
            devices: vec![],
        },
    )
}

fn gpu_node(id: u64, model: &str, gpus: u32, cpus: u64, gib: u64) -> NodeSnap {
    NodeSnap::new(
        NodeId(id),
        Capacity {
            isolation: Default::default(),
            images: false,
            cpu_milli: cpus * 1000,
            memory_bytes: gib << 30,
            devices: (0..gpus)
                .map(|i| Device {
                    index: i,
                    model: model.to_string(),
                })
                .collect(),
        },
    )
}

fn job(id: u64, tenant: u64, tasks: u32, r: TaskResources, gang: bool) -> JobReq {
    JobReq {
        id: JobId(id),
        tenant: TenantId(tenant),
        priority: Priority::Batch,
        seq: id,
        resources: r,
        gang,
        min_tasks: None,
        pending: (0..tasks).collect(),
        topology: None,
        max_runtime_ms: None,
        attained_gpu_ms: 0,
    }
}

fn res(cpu_milli: u64, mem: u64, gpu: Option<(&str, u32)>) -> TaskResources {
    TaskResources {
        needs: Default::default(),
        cpu_milli,
        memory_bytes: mem,
        gpu: gpu.map(|(m, c)| GpuRequest::whole(m, c)),
    }
}

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[(((p / 100.0) * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
}

struct Outcome {
    placements: usize,
    pending_jobs: usize,
    elapsed_s: f64,
    decisions_ms: Vec<f64>,
}

/// Places `jobs` one decision at a time.
fn run(
    nodes: Vec<NodeSnap>,
    mut tenants: HashMap<TenantId, TenantSnap>,
    jobs: Vec<JobReq>,
) -> Outcome {
    let mut s = Scheduler::new(Config::default(), nodes);
    let mut decisions_ms = Vec::with_capacity(jobs.len());
    let mut placements = 0;
    let mut pending_jobs = 0;
    let t0 = Instant::now();
    for j in &jobs {
        let t = Instant::now();
        let plan = s.schedule(&mut tenants, std::slice::from_ref(j));
        decisions_ms.push(t.elapsed().as_secs_f64() * 1e3);
        placements += plan.placements.len();
        pending_jobs += plan.pending.len();
    }
    Outcome {
        placements,
        pending_jobs,
        elapsed_s: t0.elapsed().as_secs_f64(),
        decisions_ms,
    }
}

pub fn bench(scenario: &str) -> Result<i32> {
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    let build = Instant::now();
    let (nodes, tenants, jobs, note): (Vec<NodeSnap>, HashMap<TenantId, TenantSnap>, Vec<JobReq>, &str) =
        match scenario {
            // kube-scheduler scheduler_perf "SchedulingBasic" shape: 5,000 nodes of 4 CPU and
            // 32 GiB, 50,000 pods of 100m CPU and 500 MiB.
            "k8s-5k" => (
                (0..5000).map(|i| cpu_node(i, 4, 32)).collect(),
                HashMap::new(),
                (0..50_000).map(|i| job(i, 0, 1, res(100, 500 << 20, None), false)).collect(),
                "one pod per decision",
            ),
            // Nomad C1M shape: 5,000 nodes, 1,000,000 tasks in 1,000 jobs of 1,000.
            "c1m" => (
                (0..5000).map(|i| cpu_node(i, 64, 256)).collect(),
                HashMap::new(),
                (0..1000).map(|i| job(i, 0, 1000, res(100, 256 << 20, None), false)).collect(),
                "one 1,000-task job per decision",
            ),
            // One 1,024-member gang of 8 H100 each on 4,000 8-GPU nodes.
            "gang-1024" => (
                (0..4000).map(|i| gpu_node(i, "H100", 8, 96, 1024)).collect(),
                HashMap::new(),
                vec![job(0, 0, 1024, res(8000, 64 << 30, Some(("H100", 8))), true)],
                "one gang, one decision",
            ),
            // 4,000 gangs of 8 members x 1 H100 fill 4,000 8-GPU nodes.
            "gang-small" => (
                (0..4000).map(|i| gpu_node(i, "H100", 8, 96, 1024)).collect(),
                HashMap::new(),
                (0..4000).map(|i| job(i, 0, 8, res(4000, 32 << 30, Some(("H100", 1))), true)).collect(),
                "one gang per decision",
            ),
            // Gangs held to one rack: 4,000 8-GPU nodes in 125 racks of 32 (5 zones); gangs of
            // 2, 4 or 8 members of 4 H100 each until 105 % of the GPUs are asked for.
            "gang-rack" => {
                let nodes: Vec<NodeSnap> = (0..4000u64)
                    .map(|i| {
                        let mut n = gpu_node(i, "H100", 8, 96, 1024);
                        n.topology = caravel_core::Topology {
                            region: "r".into(),
                            zone: format!("z{}", i / 800),
                            rack: format!("rack-{}", i / 32),
                        };
                        n
                    })
                    .collect();
                let mut jobs = Vec::new();
                let mut gpus = 0u64;
                while gpus < 32_000 * 105 / 100 {
                    let members = [2u32, 4, 8][rng.below(3) as usize];
                    let mut j = job(jobs.len() as u64, 0, members, res(8000, 64 << 30, Some(("H100", 4))), true);
                    j.topology = Some(caravel_core::TopologyLevel::Rack);
                    gpus += 4 * members as u64;
                    jobs.push(j);
                }
                (nodes, HashMap::new(), jobs, "one rack-held gang per decision")
            }
            // 100,000 nodes: 60 % CPU-only, 40 % GPU nodes over 4 models; 1,000 tenants with
            // quota caps; 1,000,000 tasks in jobs of 1-20 tasks, 15 % of them GPU work.
            "pool-100k" => {
                let models = ["H100", "A100", "L40S", "T4"];
                let nodes: Vec<NodeSnap> = (0..100_000u64)
                    .map(|i| {
                        if i % 10 < 6 {
                            cpu_node(i, 64, 256)
                        } else {
                            gpu_node(i, models[(i % 4) as usize], 8, 96, 1024)
                        }
                    })
                    .collect();
                let tenants: HashMap<TenantId, TenantSnap> = (0..1000u64)
                    .map(|t| {
                        let mut q = Quota {
                            cpu_milli: Some(8_000_000),
                            memory_bytes: Some(32 << 40),
                            ..Default::default()
                        };
                        for m in models {
                            q.gpus.insert(m.to_string(), 400);
                        }
                        (
                            TenantId(t),
                            TenantSnap {
                                quota: q,
                                ..Default::default()
                            },
                        )
                    })
                    .collect();
                let mut jobs = Vec::new();
                let mut tasks = 0u64;
                let mut id = 0u64;
                while tasks < 1_000_000 {
                    let n = (1 + rng.below(20)).min(1_000_000 - tasks) as u32;
                    let r = if rng.below(100) < 15 {
                        let c = [1, 1, 1, 1, 1, 1, 1, 2, 2, 4][rng.below(10) as usize];
                        res(4000 * c as u64, (16 << 30) * c as u64, Some((models[rng.below(4) as usize], c)))
                    } else {
                        res(500 * (1 + rng.below(8)), (1 + rng.below(8)) << 30, None)
                    };
                    jobs.push(job(id, rng.below(1000), n, r, false));
                    tasks += n as u64;
                    id += 1;
                }
                (nodes, tenants, jobs, "one job per decision; quota caps, best fit; no fair share yet")
            }
            "fairshare-1k" => return fairshare_1k(&mut rng),
            "preempt-500k" => return preempt_500k(&mut rng),
            other => bail!(
                "unknown scenario `{other}` (k8s-5k, c1m, gang-1024, gang-small, gang-rack, pool-100k, fairshare-1k, preempt-500k)"
            ),
        };
    let tasks: usize = jobs.iter().map(|j| j.pending.len()).sum();
    eprintln!(
        "{scenario}: {} nodes, {} jobs, {tasks} tasks built in {:.1}s ({note})",
        nodes.len(),
        jobs.len(),
        build.elapsed().as_secs_f64()
    );
    let gang = jobs.iter().any(|j| j.gang);
    let mut o = run(nodes, tenants, jobs);
    let pps = o.placements as f64 / o.elapsed_s;
    let p50 = pct(&mut o.decisions_ms, 50.0);
    let p99 = pct(&mut o.decisions_ms, 99.0);
    let max = o.decisions_ms.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "{scenario}: {} placements in {:.2}s = {:.0}/s; decision p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; {} jobs left pending; peak RSS {} MiB",
        o.placements,
        o.elapsed_s,
        pps,
        p50,
        p99,
        max,
        o.pending_jobs,
        peak_rss_bytes() >> 20
    );
    let mut out = serde_json::json!({
        "scenario": scenario,
        "placements": o.placements,
        "placements_per_s": pps,
        "decision_p50_ms": p50,
        "decision_p99_ms": p99,
        "decisions": o.decisions_ms.len(),
        "pending_jobs": o.pending_jobs,
        "elapsed_s": o.elapsed_s,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    if gang {
        out["gang_decision_ms"] = serde_json::json!(p99);
        out["gangs_per_s"] = serde_json::json!(o.decisions_ms.len() as f64 / o.elapsed_s);
    }
    println!("{out}");
    Ok(0)
}

/// Recomputes every tenant's weighted dominant share (decaying its usage history first)
/// over 1,000 tenants and a pool with CPU, memory and four GPU models, 1,000 times.
fn fairshare_1k(rng: &mut Rng) -> Result<i32> {
    use caravel_core::ResourceSum;
    use caravel_sched::fair::{dominant_share, PoolTotals, UsageEma};
    let models = ["H100", "A100", "L40S", "T4"];
    let pool = PoolTotals {
        cpu_milli: 6.4e9,
        memory_bytes: 2.5e16,
        gpus: models
            .iter()
            .map(|m| (m.to_string(), 80_000_000.0))
            .collect(),
    };
    let held: Vec<ResourceSum> = (0..1000)
        .map(|_| ResourceSum {
            cpu_milli: rng.below(8_000_000),
            memory_bytes: rng.below(32 << 40),
            gpu_milli: models
                .iter()
                .map(|m| (m.to_string(), rng.below(400) * 1000))
                .collect(),
        })
        .collect();
    let weights: Vec<f64> = (0..1000).map(|_| 1.0 + rng.below(4) as f64).collect();
    let mut hist: Vec<UsageEma> = vec![UsageEma::default(); 1000];
    let mut times = Vec::with_capacity(1000);
    let mut checksum = 0.0;
    let t0 = Instant::now();
    for _ in 0..1000 {
        let t = Instant::now();
        let mut shares = Vec::with_capacity(1000);
        for i in 0..1000 {
            hist[i].advance(&held[i], 1000, 3_600_000);
            shares.push(dominant_share(&held[i], &hist[i], &pool, weights[i]));
        }
        // The order tenants take turns in.
        let mut order: Vec<usize> = (0..1000).collect();
        order.sort_by(|a, b| shares[*a].total_cmp(&shares[*b]));
        times.push(t.elapsed().as_secs_f64() * 1e3);
        checksum += shares[order[0]];
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let p50 = pct(&mut times, 50.0);
    let p99 = pct(&mut times, 99.0);
    eprintln!("fairshare-1k: 1,000 recomputes over 1,000 tenants: p50 {p50:.3} ms, p99 {p99:.3} ms (checksum {checksum:.3})");
    println!(
        "{}",
        serde_json::json!({
            "scenario": "fairshare-1k",
            "placements": 0,
            "placements_per_s": 0.0,
            "decision_p99_ms": p99,
            "recompute_ms": p99,
            "recompute_p50_ms": p50,
            "tenants": 1000,
            "elapsed_s": elapsed,
            "peak_rss_bytes": peak_rss_bytes(),
        })
    );
    Ok(0)
}

/// 10,000 nodes of 32 CPUs run 500,000 tasks (50 per node, 600m each) that tenant B placed
/// on borrowed capacity. Tenant A, guaranteed the whole pool, then submits 20,000 one-task
/// jobs of 4 CPUs: each needs victims. One preempting placement = the decision that names
/// the victims, their exit (freeing what they held), and the decision that places the job.
fn preempt_500k(rng: &mut Rng) -> Result<i32> {
    use caravel_core::{Millis, RunId};
    use caravel_sched::RunningTask;
    let nodes_n = 10_000u64;
    let per_node = 50u64;
    let mut nodes: Vec<NodeSnap> = (0..nodes_n).map(|i| cpu_node(i, 32, 256)).collect();
    let task = res(600, 2 << 30, None);
    let mut running = Vec::with_capacity((nodes_n * per_node) as usize);
    for (i, n) in nodes.iter_mut().enumerate() {
        for k in 0..per_node {
            n.used_cpu_milli += task.cpu_milli;
            n.used_memory_bytes += task.memory_bytes;
            running.push(RunningTask {
                run: RunId(i as u64 * per_node + k),
                job: JobId(1_000_000 + i as u64),
                tenant: TenantId(2),
                node: n.id,
                priority: if rng.below(10) == 0 {
                    Priority::Spot
                } else {
                    Priority::Batch
                },
                resources: task.clone(),
                devices: vec![],
                started_ms: rng.below(3_600_000) as Millis,
                min_runtime_ms: if rng.below(4) == 0 { 7_200_000 } else { 0 },
                borrowed: true,
                expected_end_ms: None,
                gang_size: 1,
                attained_gpu_ms: 0,
                saved_ms: None,
                save_every_ms: 0,
            });
        }
    }
    let mut tenants: HashMap<TenantId, TenantSnap> = HashMap::new();
    tenants.insert(
        TenantId(1),
        TenantSnap {
            guarantee: Quota {
                cpu_milli: Some(320_000_000),
                memory_bytes: Some(2560 << 40),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    tenants.insert(TenantId(2), TenantSnap::default());
    let mut s = Scheduler::new(Config::default(), nodes);
    let t0 = Instant::now();
    s.set_running(running);
    let setup_s = t0.elapsed().as_secs_f64();
    let now: Millis = 3_600_000;
    let mut times = Vec::new();
    let mut placed = 0usize;
    let mut victims_total = 0usize;
    let t0 = Instant::now();
    for id in 0..20_000u64 {
        let j = job(id, 1, 1, res(4000, 8 << 30, None), false);
        let t = Instant::now();
        let plan = s.schedule_preempting(now, &mut tenants, std::slice::from_ref(&j));
        victims_total += plan.preemptions.len();
        for p in &plan.preemptions {
            let v = s.remove_running(p.run).expect("victim was running");
            if let Some(u) = tenants.get_mut(&v.tenant) {
                u.used.sub_task(&v.resources, 1);
            }
        }
        let plan2 = s.schedule_preempting(now, &mut tenants, std::slice::from_ref(&j));
        times.push(t.elapsed().as_secs_f64() * 1e3);
        placed += plan.placements.len() + plan2.placements.len();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let pps = placed as f64 / elapsed;
    let p50 = pct(&mut times, 50.0);
    let p99 = pct(&mut times, 99.0);
    eprintln!(
        "preempt-500k: index of 500,000 running tasks built in {setup_s:.2}s; {placed} preempting placements ({victims_total} victims) in {elapsed:.2}s = {pps:.0}/s; p50 {p50:.3} ms, p99 {p99:.3} ms; peak RSS {} MiB",
        peak_rss_bytes() >> 20
    );
    println!(
        "{}",
        serde_json::json!({
            "scenario": "preempt-500k",
            "placements": placed,
            "placements_per_s": pps,
            "decision_p50_ms": p50,
            "decision_p99_ms": p99,
            "victims": victims_total,
            "running_tasks": 500_000,
            "elapsed_s": elapsed,
            "peak_rss_bytes": peak_rss_bytes(),
        })
    );
    Ok(if placed == 20_000 { 0 } else { 1 })
}
