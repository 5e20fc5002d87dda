//! Fragmentation gradient descent (Weng et al., "Beware of Fragmentation", USENIX ATC'23)
//! as a placement policy: among the nodes (and, for a GPU share, the devices) a task fits on,
//! pick the one whose GPU fragmentation — measured against the expected workload — grows
//! the least.
//!
//! Fragmentation of a node for a task type: the idle GPU capacity the type cannot use — all
//! of it when the type asks for no GPU, does not fit the node's CPU or memory, or does not
//! accept its model; otherwise the idle parts of GPUs too small for its share (for whole-GPU
//! types, every partly used GPU, or all idle GPU if too few are whole). The node's
//! fragmentation is the expectation over the workload's task types.
//!
//! Caravel adds one term FGD lacks: CPU stranding. FGD only sees a node's CPU when it is
//! already too short for a task type; by then the node's GPUs are lost. Caravel also
//! counts how many of the node's idle GPU thousandths its remaining CPU could no longer
//! feed at the workload's average CPU per GPU, so CPU-only work drifts to CPU-rich nodes
//! (or to nodes whose GPUs are taken) before it starves a GPU-dense node. On the openb
//! traces this lifts allocation at full load by ~0.6 pp over FGD (docs/simulator.md).

use crate::NodeSnap;
use caravel_core::TaskResources;

/// One kind of task in the expected workload, and how often it occurs (weights sum to 1).
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadType {
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub num_gpu: u32,
    /// Per-GPU share in thousandths (1000 for whole GPUs).
    pub gpu_milli: u32,
    /// Accepted models; empty means any.
    pub models: Vec<String>,
    pub weight: f64,
}

/// The workload fragmentation is measured against: task shapes weighted by how many tasks
/// have them. `None` when none asks for a GPU (placement is then plain indexed best fit).
/// The server passes what runs and waits now; the simulator the trace's tasks.
pub fn workload_of<'a>(
    tasks: impl IntoIterator<Item = (&'a TaskResources, u64)>,
) -> Option<Vec<WorkloadType>> {
    type Key = (u64, u64, u32, u32, Vec<String>);
    let mut counts: std::collections::BTreeMap<Key, u64> = std::collections::BTreeMap::new();
    for (r, n) in tasks {
        let (num, milli, models) = match &r.gpu {
            Some(g) => (
                g.count,
                g.milli.unwrap_or(1000),
                g.models().iter().map(|m| m.to_string()).collect(),
            ),
            None => (0, 0, vec![]),
        };
        *counts
            .entry((r.cpu_milli, r.memory_bytes, num, milli, models))
            .or_insert(0) += n;
    }
    if !counts.keys().any(|k| k.2 > 0) {
        return None;
    }
    let total: u64 = counts.values().sum();
    Some(
        counts
            .into_iter()
            .map(
                |((cpu_milli, memory_bytes, num_gpu, gpu_milli, models), c)| WorkloadType {
                    cpu_milli,
                    memory_bytes,
                    num_gpu,
                    gpu_milli,
                    models,
                    weight: c as f64 / total as f64,
                },
            )
            .collect(),
    )
}

/// What fragmentation needs of a node: free CPU, memory, per-device idle thousandths.
#[derive(Debug, Clone)]
struct Light {
    cpu: u64,
    mem: u64,
    free: Vec<(u32, u64)>,
    model: String,
}

fn light(n: &NodeSnap) -> Light {
    Light {
        cpu: n.capacity.cpu_milli.saturating_sub(n.used_cpu_milli),
        mem: n.capacity.memory_bytes.saturating_sub(n.used_memory_bytes),
        free: n
            .capacity
            .devices
            .iter()
            .map(|d| {
                let f = if n.used_devices.contains(&d.index) {
                    0
                } else {
                    1000 - n.shared.get(&d.index).copied().unwrap_or(0) as u64
                };
                (d.index, f)
            })
            .collect(),
        model: n
            .capacity
            .devices
            .first()
            .map(|d| d.model.clone())
            .unwrap_or_default(),
    }
}

fn frag(l: &Light, types: &[WorkloadType]) -> f64 {
    let idle: u64 = l.free.iter().map(|f| f.1).sum();
    if idle == 0 {
        return 0.0;
    }
    let mut total = 0.0;
    for t in types {
        let usable = t.num_gpu > 0
            && l.cpu >= t.cpu_milli
            && l.mem >= t.memory_bytes
            && (t.models.is_empty() || t.models.contains(&l.model));
        let f = if !usable {
            idle
        } else if t.num_gpu == 1 && t.gpu_milli < 1000 {
            l.free
                .iter()
                .filter(|f| f.1 < t.gpu_milli as u64)
                .map(|f| f.1)
                .sum()
        } else if l.free.iter().filter(|f| f.1 == 1000).count() as u32 >= t.num_gpu {
            l.free.iter().filter(|f| f.1 < 1000).map(|f| f.1).sum()
        } else {
            idle
        };
        total += t.weight * f as f64;
    }
    total
}

/// The node's fragmentation for the workload, in thousandths of a GPU.
pub fn node_frag(n: &NodeSnap, types: &[WorkloadType]) -> f64 {
    frag(&light(n), types)
}

/// How much placing `r` on `n` with `devices` grows the node's fragmentation (the long
/// way; `score` is what placement uses, and tests hold the two equal).
#[cfg(test)]
pub(crate) fn delta(
    n: &NodeSnap,
    r: &TaskResources,
    devices: &[u32],
    types: &[WorkloadType],
) -> f64 {
    let before = light(n);
    let mut after = before.clone();
    after.cpu = after.cpu.saturating_sub(r.cpu_milli);
    after.mem = after.mem.saturating_sub(r.memory_bytes);
    let take = r
        .gpu
        .as_ref()
        .map(|g| g.milli.map(u64::from).unwrap_or(1000))
        .unwrap_or(0);
    for d in devices {
        if let Some(f) = after.free.iter_mut().find(|f| f.0 == *d) {
            f.1 = f.1.saturating_sub(take);
        }
    }
    frag(&after, types) - frag(&before, types)
}

/// The device choices worth scoring for one task on `n`: for a share, each shared device
/// with room and one fresh device per model; for whole devices, the lowest free ones.
pub(crate) fn device_choices(n: &NodeSnap, r: &TaskResources) -> Vec<Vec<u32>> {
    let Some(g) = &r.gpu else { return vec![vec![]] };
    let mut out = Vec::new();
    // The accepted models without building a list: a repeat is skipped.
    let models = std::iter::once(g.model.as_str()).chain(g.any_of.iter().map(String::as_str));
    for (k, m) in models.enumerate() {
        if k > 0 && (g.model == m || g.any_of[..k - 1].iter().any(|x| x == m)) {
            continue;
        }
        let free = |d: &&caravel_core::Device| {
            d.model == m && !n.used_devices.contains(&d.index) && !n.shared.contains_key(&d.index)
        };
        match g.milli {
            Some(share) => {
                for (i, used) in &n.shared {
                    if used + share <= 1000 && n.model_of(*i) == Some(m) {
                        out.push(vec![*i]);
                    }
                }
                if let Some(f) = n.capacity.devices.iter().find(free) {
                    out.push(vec![f.index]);
                }
            }
            None => {
                let mut pick = Vec::with_capacity(g.count as usize);
                pick.extend(
                    n.capacity
                        .devices
                        .iter()
                        .filter(free)
                        .map(|d| d.index)
                        .take(g.count as usize),
                );
                if pick.len() == g.count as usize {
                    out.push(pick);
                }
            }
        }
    }
    out
}

/// Per GPU model, the expected GPU demand of work that accepts only some models (spread
/// evenly over the models it accepts) over the model's capacity. Work that accepts any
/// model placed on a high-pressure model takes GPUs only pinned work could have used.
pub fn pinned_pressure(
    types: &[WorkloadType],
    nodes: &[NodeSnap],
) -> std::collections::HashMap<String, f64> {
    let mut cap: std::collections::HashMap<String, f64> = std::collections::HashMap::new();
    for n in nodes {
        for d in &n.capacity.devices {
            *cap.entry(d.model.clone()).or_insert(0.0) += 1000.0;
        }
    }
    let all = cap.len();
    let mut demand: std::collections::HashMap<String, f64> = std::collections::HashMap::new();
    let mut total = 0.0;
    for t in types.iter().filter(|t| t.num_gpu > 0) {
        let g = t.weight * t.num_gpu as f64 * t.gpu_milli as f64;
        total += g;
        if t.models.is_empty() || t.models.len() >= all {
            continue;
        }
        for m in &t.models {
            *demand.entry(m.clone()).or_insert(0.0) += g / t.models.len() as f64;
        }
    }
    let cap_total: f64 = cap.values().sum();
    cap.into_iter()
        .map(|(m, c)| {
            // Demand as a share of all GPU demand, against the model's share of capacity.
            let p = if total > 0.0 {
                demand.get(&m).copied().unwrap_or(0.0) / total / (c / cap_total)
            } else {
                0.0
            };
            (m, p)
        })
        .collect()
}

/// CPU (milli) per thousandth of a GPU that the expected workload asks: what GPU work asks,
/// plus the CPU-only work's CPU in the share `on_gpu_nodes` of the pool's CPU that sits on
/// GPU nodes (CPU-only work lands on GPU nodes in about that share).
pub fn cpu_per_gpu(types: &[WorkloadType], on_gpu_nodes: f64) -> f64 {
    let (mut cpu, mut gpu) = (0.0, 0.0);
    for t in types {
        if t.num_gpu > 0 {
            cpu += t.weight * t.cpu_milli as f64;
            gpu += t.weight * (t.num_gpu as f64 * t.gpu_milli as f64);
        } else {
            cpu += t.weight * t.cpu_milli as f64 * on_gpu_nodes.clamp(0.0, 1.0);
        }
    }
    if gpu > 0.0 {
        cpu / gpu
    } else {
        0.0
    }
}

/// CPU (milli) the CPU-stranding term keeps per idle GPU thousandth. Normally what GPU work
/// asks per GPU: CPU-only work has room enough elsewhere. When the workload asks more CPU
/// per GPU than the pool has (CPU binds at full GPU load), CPU-only work competes with GPU
/// work for the GPU nodes' CPU, and its share of that CPU is counted too.
///
/// Measured on the openb lists (docs/simulator.md): only cpu250 and cpu300 ask more CPU
/// per GPU than the pool has; there Caravel went from behind FGD (−0.11 / −0.08 pp) to
/// +1.61 / +1.84 pp. Counting CPU-only work on every list instead lost 2.3 pp on gpuspec20.
pub fn kept_cpu_per_gpu(types: &[WorkloadType], nodes: &[NodeSnap]) -> f64 {
    let (mut cpu, mut gpu) = (0u64, 0u64);
    for n in nodes {
        cpu += n.capacity.cpu_milli;
        gpu += n.capacity.devices.len() as u64 * 1000;
    }
    let binds = gpu > 0 && cpu_per_gpu(types, 1.0) >= cpu as f64 / gpu as f64;
    cpu_per_gpu(
        types,
        if binds {
            gpu_node_cpu_share(nodes)
        } else {
            0.0
        },
    )
}

/// The share of the pool's CPU that sits on nodes with GPUs.
pub fn gpu_node_cpu_share(nodes: &[NodeSnap]) -> f64 {
    let (mut on, mut all) = (0u64, 0u64);
    for n in nodes {
        all += n.capacity.cpu_milli;
        if !n.capacity.devices.is_empty() {
            on += n.capacity.cpu_milli;
        }
    }
    if all == 0 {
        0.0
    } else {
        on as f64 / all as f64
    }
}

#[cfg(test)]
fn stranded(l: &Light, cpu_per_gpu: f64) -> f64 {
    let idle: u64 = l.free.iter().map(|f| f.1).sum();
    if cpu_per_gpu <= 0.0 {
        return 0.0;
    }
    (idle as f64 - l.cpu as f64 / cpu_per_gpu).max(0.0)
}

/// How much placing `r` grows the GPU capacity that the node's remaining CPU could not
/// feed at the workload's CPU-per-GPU ratio (thousandths of a GPU).
#[cfg(test)]
pub(crate) fn stranded_delta(
    n: &NodeSnap,
    r: &TaskResources,
    devices: &[u32],
    cpu_per_gpu: f64,
) -> f64 {
    let before = light(n);
    let mut after = before.clone();
    after.cpu = after.cpu.saturating_sub(r.cpu_milli);
    let take = r
        .gpu
        .as_ref()
        .map(|g| g.milli.map(u64::from).unwrap_or(1000))
        .unwrap_or(0);
    for d in devices {
        if let Some(f) = after.free.iter_mut().find(|f| f.0 == *d) {
            f.1 = f.1.saturating_sub(take);
        }
    }
    stranded(&after, cpu_per_gpu) - stranded(&before, cpu_per_gpu)
}

/// `delta + cpu_weight * stranded_delta` in one pass without allocating for nodes of up to
/// 32 devices: the hot loop of a placement scores every candidate node this way.
/// Which of `types` accept GPUs of `model` (the node's first device's; "" without any).
/// Placement keeps one list per model so `score` compares no strings.
pub(crate) fn models_ok(types: &[WorkloadType], model: &str) -> Vec<bool> {
    types
        .iter()
        .map(|t| t.models.is_empty() || t.models.iter().any(|m| m == model))
        .collect()
}

/// `model_ok`: `models_ok(types, the node's model)`.
pub(crate) fn score(
    n: &NodeSnap,
    r: &TaskResources,
    devices: &[u32],
    types: &[WorkloadType],
    model_ok: &[bool],
    cpu_per_gpu: f64,
    cpu_weight: f64,
) -> f64 {
    let k = n.capacity.devices.len();
    let (mut sb, mut sa) = ([0u64; 32], [0u64; 32]);
    let (mut hb, mut ha);
    let (before, after): (&mut [u64], &mut [u64]) = if k <= 32 {
        (&mut sb[..k], &mut sa[..k])
    } else {
        hb = vec![0u64; k];
        ha = vec![0u64; k];
        (&mut hb[..], &mut ha[..])
    };
    let take = r
        .gpu
        .as_ref()
        .map(|g| g.milli.map(u64::from).unwrap_or(1000))
        .unwrap_or(0);
    for (i, d) in n.capacity.devices.iter().enumerate() {
        let f = if n.used_devices.contains(&d.index) {
            0
        } else {
            1000 - n.shared.get(&d.index).copied().unwrap_or(0) as u64
        };
        before[i] = f;
        after[i] = if devices.contains(&d.index) {
            f.saturating_sub(take)
        } else {
            f
        };
    }
    let cpu_b = n.capacity.cpu_milli.saturating_sub(n.used_cpu_milli);
    let mem_b = n.capacity.memory_bytes.saturating_sub(n.used_memory_bytes);
    let cpu_a = cpu_b.saturating_sub(r.cpu_milli);
    let mem_a = mem_b.saturating_sub(r.memory_bytes);
    let sums = |free: &[u64], share: u64| -> (u64, u64, u64) {
        // (idle, idle on GPUs with less than `share` free, idle on partly used GPUs)
        let (mut idle, mut small, mut partial) = (0, 0, 0);
        for &f in free {
            idle += f;
            if f < share {
                small += f;
            }
            if f < 1000 {
                partial += f;
            }
        }
        (idle, small, partial)
    };
    let whole = |free: &[u64]| free.iter().filter(|f| **f == 1000).count() as u32;
    let (idle_b, _, partial_b) = sums(before, 0);
    let (idle_a, _, partial_a) = sums(after, 0);
    let (whole_b, whole_a) = (whole(before), whole(after));
    let (mut total_a, mut total_b) = (0.0f64, 0.0f64);
    for (t, &model_ok) in types.iter().zip(model_ok) {
        let one = |free: &[u64], idle: u64, partial: u64, whole: u32, cpu: u64, mem: u64| {
            if idle == 0 {
                return 0;
            }
            let usable = t.num_gpu > 0 && cpu >= t.cpu_milli && mem >= t.memory_bytes && model_ok;
            if !usable {
                idle
            } else if t.num_gpu == 1 && t.gpu_milli < 1000 {
                sums(free, t.gpu_milli as u64).1
            } else if whole >= t.num_gpu {
                partial
            } else {
                idle
            }
        };
        // Summed per side, then subtracted, exactly as `frag(after) - frag(before)` rounds:
        // equal scores must stay equal, or ties break differently from the long way.
        total_b += t.weight * one(before, idle_b, partial_b, whole_b, cpu_b, mem_b) as f64;
        total_a += t.weight * one(after, idle_a, partial_a, whole_a, cpu_a, mem_a) as f64;
    }
    let (total_a, total_b) = if idle_a == 0 {
        (0.0, total_b)
    } else {
        (total_a, total_b)
    };
    let total_b = if idle_b == 0 { 0.0 } else { total_b };
    let mut d = total_a - total_b;
    if cpu_per_gpu > 0.0 {
        let st = |idle: u64, cpu: u64| (idle as f64 - cpu as f64 / cpu_per_gpu).max(0.0);
        d += cpu_weight * (st(idle_a, cpu_a) - st(idle_b, cpu_b));
    }
    d
}
