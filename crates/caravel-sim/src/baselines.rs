//! The published baseline placement policies, as `caravel_sched::baseline::Baseline`s, scored the way
//! the FGD artefact (hkust-adsl/kubernetes-scheduler-simulator, USENIX ATC'23) scores them
//! inside the Kubernetes scheduler framework, so the simulator can put them side by side
//! with Caravel's own on the same trace:
//!
//! - every feasible node gets an integer score in 0..=100 (Go's `int64()` truncation);
//! - the highest score wins and ties are broken uniformly at random, as kube-scheduler's
//!   `selectHost` does (here with the scheduler's seeded generator, so runs repeat);
//! - the GPU(s) inside the chosen node are picked by the policy's device rule: best fit
//!   (the tightest GPU a share fits on) for DotProd, GpuClustering, GpuPacking and BestFit,
//!   a random GPU for Random, the least fragmenting GPU for FGD; whole-GPU tasks always
//!   take the lowest-numbered free GPUs.
//!
//! The artefact's resource model has CPU and GPU only (memory is still filtered on, as
//! Kubernetes' NodeResourcesFit does), and its normalising constants are 128 cores and
//! 8 GPUs. What the integer scores throw away is part of what the published curves
//! measure, which is why these are not Caravel's own placement.

use std::sync::Arc;

use caravel_sched::baseline::{Baseline, Req, ShareDevice, View};
use caravel_sched::fgd::WorkloadType;
use caravel_sched::NodeSnap;

/// Normalising constants of the artefact (its `MaxSpecCpu`, `MaxSpecGpu`).
const MAX_SPEC_CPU: f64 = 128_000.0;
const MAX_SPEC_GPU: f64 = 8_000.0;

/// A placement policy. `Caravel` is the production policy (indexed best fit, or exact
/// fragmentation gradient descent when an expected workload is configured); the others
/// are the baselines above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    #[default]
    Caravel,
    Random,
    DotProd,
    Clustering,
    Packing,
    BestFit,
    Fgd,
}

impl Policy {
    pub const ALL: [Policy; 7] = [
        Policy::Random,
        Policy::DotProd,
        Policy::Clustering,
        Policy::Packing,
        Policy::BestFit,
        Policy::Fgd,
        Policy::Caravel,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Caravel => "caravel",
            Policy::Random => "random",
            Policy::DotProd => "dotprod",
            Policy::Clustering => "clustering",
            Policy::Packing => "packing",
            Policy::BestFit => "bestfit",
            Policy::Fgd => "fgd",
        }
    }

    pub fn parse(s: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// BestFit: the less CPU and GPU left after placing (each over its constant), the higher.
pub fn best_fit(v: &View, q: &Req) -> i64 {
    let s = 0.5 * (v.cpu_left - q.cpu) as f64 / MAX_SPEC_CPU
        + 0.5 * (v.gpu_left_total() - q.total_gpu()) as f64 / MAX_SPEC_GPU;
    ((1.0 - s) * 100.0) as i64
}

/// DotProd (Tetris): the smaller the dot product of what is left and what is asked, the
/// higher ("merge" GPU dimension, normalised by the constants).
pub fn dot_prod(v: &View, q: &Req) -> i64 {
    let dot = (v.cpu_left as f64 / MAX_SPEC_CPU) * (q.cpu as f64 / MAX_SPEC_CPU)
        + (v.gpu_left_total() as f64 / MAX_SPEC_GPU) * (q.total_gpu() as f64 / MAX_SPEC_GPU);
    (100.0 * (1.0 - dot / 2.0)) as i64
}

/// GpuPacking: shared GPUs first (tighter is better), then free GPUs on a used node
/// (fewer is better), then an untouched node (fewer GPUs is better).
pub fn packing(v: &View, q: &Req) -> i64 {
    if q.total_gpu() <= 0 {
        return 0;
    }
    let free = v.gpu_left.iter().filter(|g| g.1 == 1000).count() as i64;
    if free == v.gpu_left.len() as i64 {
        return (33 - free).max(free);
    }
    let mut order: Vec<&(u32, i64)> = v.gpu_left.iter().collect();
    order.sort_by_key(|g| g.1); // stable: lowest index first among equals
    let mut need = q.count;
    let mut whole = 0;
    let mut used = Vec::new();
    for g in order {
        if need == 0 {
            break;
        }
        if q.milli <= g.1 {
            need -= 1;
            used.push(g.1);
            if g.1 == 1000 {
                whole += 1;
            }
        }
    }
    if need != 0 {
        return 0;
    }
    if whole > 0 {
        return (50 - whole).max(33);
    }
    let ratio: i64 = used.iter().map(|l| l * 100 / 1000).sum();
    (100 - ratio / 10).max(50)
}

/// GpuClustering: a node already running only this task's shape, then one mixing it with
/// others, then an empty node, then one running other shapes; fuller first within each.
pub fn clustering(n: &NodeSnap, v: &View, q: &Req) -> i64 {
    let Some(shape) = q.shape() else { return 0 };
    let fill = 25 * (MAX_SPEC_GPU as i64 - v.gpu_left_total()) / MAX_SPEC_GPU as i64;
    let tags = n.gpu_shapes.len();
    if n.gpu_shapes.contains_key(&shape) {
        fill + if tags == 1 { 75 } else { 50 }
    } else if tags == 0 {
        fill + 25
    } else {
        fill
    }
}

/// The artefact's fragmentation of a node for its typical tasks (thousandths of a GPU):
/// per task type, all idle GPU if the type cannot run here, else the idle parts of GPUs
/// too small for it.
pub fn frag(v: &View, model: &str, types: &[WorkloadType]) -> f64 {
    let idle: i64 = v.gpu_left_total();
    if idle == 0 {
        return 0.0;
    }
    let mut total = 0.0;
    for t in types {
        let milli = if t.num_gpu == 0 {
            0
        } else {
            t.gpu_milli as i64
        };
        let f = if milli == 0
            || (!t.models.is_empty() && !t.models.iter().any(|m| m == model))
            || v.cpu_left < t.cpu_milli as i64
        {
            idle
        } else {
            let fits = v.gpu_left.iter().filter(|g| g.1 >= milli).count() as u32;
            if fits >= t.num_gpu {
                v.gpu_left.iter().filter(|g| g.1 < milli).map(|g| g.1).sum()
            } else {
                idle
            }
        };
        total += t.weight * f as f64;
    }
    total
}

/// The artefact's fragmentation of one node for its typical tasks, in thousandths of a
/// GPU: what the simulator reports as "fragmentation" for every policy.
pub fn node_frag(n: &NodeSnap, types: &[WorkloadType]) -> f64 {
    let model = n.primary_model();
    frag(&View::of(n), model, types)
}

fn sigmoid_score(before: f64, after: f64) -> i64 {
    let x = (before - after) / 1000.0;
    (100.0 / (1.0 + (-x).exp())) as i64
}

/// FGD as the artefact scores it: sigmoid of the fragmentation decrease, as an integer;
/// returns the score and the devices (for a share: the best GPU, first on ties).
pub fn fgd(
    n: &NodeSnap,
    v: &View,
    q: &Req,
    types: &[WorkloadType],
    whole: &[u32],
) -> (i64, Vec<u32>) {
    let model = n.primary_model();
    let before = frag(v, model, types);
    let mut after = View {
        cpu_left: v.cpu_left - q.cpu,
        gpu_left: v.gpu_left.clone(),
    };
    if q.count == 1 && q.milli < 1000 {
        let mut best: Option<(i64, u32)> = None;
        for k in 0..v.gpu_left.len() {
            if v.gpu_left[k].1 < q.milli {
                continue;
            }
            after.gpu_left[k].1 -= q.milli;
            let s = sigmoid_score(before, frag(&after, model, types));
            after.gpu_left[k].1 += q.milli;
            if best.is_none_or(|b| s > b.0) {
                best = Some((s, v.gpu_left[k].0));
            }
        }
        return best.map(|(s, d)| (s, vec![d])).unwrap_or((0, vec![]));
    }
    for d in whole {
        if let Some(g) = after.gpu_left.iter_mut().find(|g| g.0 == *d) {
            g.1 = 0;
        }
    }
    (
        sigmoid_score(before, frag(&after, model, types)),
        whole.to_vec(),
    )
}

/// The best-fit GPU for a share: the tightest one it fits on, the first among equals.
pub fn best_gpu(v: &View, q: &Req) -> Option<u32> {
    let mut best: Option<(i64, u32)> = None;
    for g in &v.gpu_left {
        if g.1 >= q.milli && best.is_none_or(|b| g.1 < b.0) {
            best = Some((g.1, g.0));
        }
    }
    best.map(|b| b.1)
}

impl Policy {
    /// The scheduler's setting for this policy: `None` for Caravel's own.
    pub fn baseline(self) -> Option<Arc<dyn Baseline>> {
        (self != Policy::Caravel).then(|| Arc::new(Published(self)) as Arc<dyn Baseline>)
    }
}

/// A published policy, scored as the artefact scores it.
#[derive(Debug, Clone, Copy)]
pub struct Published(pub Policy);

impl Baseline for Published {
    fn score(
        &self,
        n: &NodeSnap,
        v: &View,
        q: &Req,
        types: &[WorkloadType],
        whole: &[u32],
    ) -> (i64, Vec<u32>) {
        match self.0 {
            Policy::Fgd => fgd(n, v, q, types, whole),
            p => {
                let s = match p {
                    Policy::BestFit => best_fit(v, q),
                    Policy::DotProd => dot_prod(v, q),
                    Policy::Packing => packing(v, q),
                    Policy::Clustering => clustering(n, v, q),
                    _ => 0,
                };
                (s, whole.to_vec())
            }
        }
    }

    fn uniform(&self) -> bool {
        self.0 == Policy::Random
    }

    fn share_device(&self, v: &View, q: &Req, draw: &mut dyn FnMut(u64) -> u64) -> ShareDevice {
        match self.0 {
            // FGD's score already chose the least fragmenting GPU.
            Policy::Fgd => ShareDevice::Scored,
            Policy::Random => {
                let fits: Vec<u32> = v
                    .gpu_left
                    .iter()
                    .filter(|g| g.1 >= q.milli)
                    .map(|g| g.0)
                    .collect();
                if fits.is_empty() {
                    return ShareDevice::NoRoom;
                }
                ShareDevice::Pick(fits[draw(fits.len() as u64) as usize])
            }
            _ => best_gpu(v, q).map_or(ShareDevice::NoRoom, ShareDevice::Pick),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(cpu: i64, gpus: &[i64]) -> View {
        View {
            cpu_left: cpu,
            gpu_left: gpus
                .iter()
                .enumerate()
                .map(|(i, g)| (i as u32, *g))
                .collect(),
        }
    }

    #[test]
    fn scores_follow_the_published_formulas() {
        let q = Req {
            cpu: 8000,
            count: 1,
            milli: 500,
        };
        // BestFit: 1 - (0.5*(32000-8000)/128000 + 0.5*(1500-500)/8000) = 0.84375 -> 84.
        assert_eq!(best_fit(&view(32000, &[1000, 500]), &q), 84);
        // DotProd: 1 - (0.25*0.0625 + 0.1875*0.0625)/2 = 0.98633 -> 98.
        assert_eq!(dot_prod(&view(32000, &[1000, 500]), &q), 98);
        // Packing: a share on a shared GPU with 500 left: 100 - 50/10 = 95.
        assert_eq!(packing(&view(32000, &[1000, 500]), &q), 95);
        // Packing: an untouched 8-GPU node: max(33 - 8, 8) = 25.
        assert_eq!(packing(&view(32000, &[1000; 8]), &q), 25);
        // Packing: whole GPUs on a used node: 50 - 2 = 48.
        let two = Req {
            cpu: 1000,
            count: 2,
            milli: 1000,
        };
        assert_eq!(packing(&view(32000, &[1000, 1000, 0, 300]), &two), 48);
        // CPU-only tasks get no packing preference.
        let cpu = Req {
            cpu: 1000,
            count: 0,
            milli: 0,
        };
        assert_eq!(packing(&view(32000, &[1000]), &cpu), 0);
        assert_eq!(best_gpu(&view(0, &[1000, 600, 700]), &q), Some(1));
    }

    #[test]
    fn fragmentation_counts_what_each_type_cannot_use() {
        let share = WorkloadType {
            cpu_milli: 1000,
            memory_bytes: 0,
            num_gpu: 1,
            gpu_milli: 600,
            models: vec![],
            weight: 0.5,
        };
        let whole = WorkloadType {
            num_gpu: 2,
            gpu_milli: 1000,
            ..share.clone()
        };
        let types = [share, whole];
        // GPUs left 1000, 400: the share type cannot use the 400 (frag 400); the 2-GPU
        // type cannot run at all (frag 1400). 0.5*400 + 0.5*1400 = 900.
        assert!((frag(&view(8000, &[1000, 400]), "T4", &types) - 900.0).abs() < 1e-9);
        // Without CPU every idle GPU is a fragment.
        assert!((frag(&view(500, &[1000, 400]), "T4", &types) - 1400.0).abs() < 1e-9);
    }

    /// Every published policy through the scheduler's extension point: the same seed
    /// gives the same plan, and nothing is committed beyond a node's capacity.
    #[test]
    fn every_published_policy_places_within_capacity_and_repeats_by_seed() {
        use caravel_core::{Capacity, Device, GpuRequest, JobId, NodeId, TenantId};
        use caravel_sched::{Config, JobReq, Scheduler};
        let nodes: Vec<NodeSnap> = (0..6)
            .map(|i| {
                NodeSnap::new(
                    NodeId(i),
                    Capacity {
                        cpu_milli: 16_000,
                        memory_bytes: 64 << 30,
                        devices: (0..4)
                            .map(|d| Device {
                                index: d,
                                model: "T4".into(),
                            })
                            .collect(),
                        ..Default::default()
                    },
                )
            })
            .collect();
        let jobs: Vec<JobReq> = (0..40u64)
            .map(|k| {
                let mut r = caravel_core::TaskResources {
                    cpu_milli: 1000 + 500 * (k % 5),
                    memory_bytes: 1 << 30,
                    ..Default::default()
                };
                r.gpu = match k % 3 {
                    0 => None,
                    1 => Some(GpuRequest {
                        milli: Some(250 * (1 + (k % 3) as u32)),
                        ..GpuRequest::whole("T4", 1)
                    }),
                    _ => Some(GpuRequest::whole("T4", 1 + (k % 2) as u32)),
                };
                JobReq {
                    id: JobId(k),
                    tenant: TenantId(1),
                    priority: caravel_core::Priority::Batch,
                    seq: k,
                    resources: r,
                    gang: false,
                    min_tasks: None,
                    pending: vec![0],
                    topology: None,
                    max_runtime_ms: None,
                    attained_gpu_ms: 0,
                }
            })
            .collect();
        for policy in Policy::ALL {
            let cfg = Config {
                baseline: policy.baseline(),
                seed: 7,
                fgd: Some(Arc::new(vec![])),
                ..Config::default()
            };
            let run = || {
                let mut s = Scheduler::new(cfg.clone(), nodes.clone());
                let plan = s.schedule(&mut Default::default(), &jobs);
                (plan, s.nodes().to_vec())
            };
            let (plan, after) = run();
            assert_eq!(plan, run().0, "{policy:?}: same seed, same plan");
            assert!(
                plan.placements.len() >= 20,
                "{policy:?}: {}",
                plan.placements.len()
            );
            for n in &after {
                assert!(n.used_cpu_milli <= n.capacity.cpu_milli, "{policy:?}");
                assert!(n.shared.values().all(|u| *u <= 1000), "{policy:?}");
                assert!(
                    n.shared.keys().all(|d| !n.used_devices.contains(d)),
                    "{policy:?}"
                );
            }
        }
    }
}
