//! The FGD experiment protocol (Weng et al., USENIX ATC'23): tasks never leave; the pod
//! list is shuffled by seed and extended until the arrived GPU request reaches `tune` (1.3)
//! times the cluster's GPU capacity; tasks are placed one at a time. At every whole percent of
//! arrived load it records the milli-GPU allocation ratio and the fragmentation, both as a
//! percentage of total GPU capacity.
//!
//! Fragmentation follows the paper's definition: for a task type `m` and a node `n`, the
//! idle GPU capacity on `n` that `m` cannot use — all of it when `m` asks for no GPU, does
//! not fit the node's CPU or memory, or does not accept its model; otherwise the idle parts
//! of GPUs too small for `m`'s share (for whole-GPU tasks, every partly used GPU) — weighted
//! by how often `m` occurs in the trace. Not yet validated against the artefact's curves.

use std::collections::HashMap;

use caravel_core::{JobId, Priority, TenantId};
use caravel_sched::fgd::{node_frag, WorkloadType};
use caravel_sched::{Config, JobReq, NodeSnap, Scheduler};

use crate::openb::{to_nodes, to_request, OpenbNode, OpenbPod};
use crate::rng::Rng;

/// Allocation and fragmentation (% of cluster GPU capacity) at arrived load 0..=max %.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    pub alloc_pct: Vec<f64>,
    pub frag_pct: Vec<f64>,
}

/// The trace's task types with how often each occurs: FGD's expected workload, and what
/// fragmentation is measured against.
pub fn task_types(pods: &[OpenbPod]) -> Vec<WorkloadType> {
    let mut counts: HashMap<(u64, u64, u32, u32, Vec<String>), u64> = HashMap::new();
    for p in pods {
        *counts
            .entry((
                p.cpu_milli,
                p.memory_mib << 20,
                p.num_gpu,
                p.gpu_milli,
                p.gpu_spec.clone(),
            ))
            .or_insert(0) += 1;
    }
    let total = pods.len().max(1) as f64;
    let mut v: Vec<WorkloadType> = counts
        .into_iter()
        .map(|((cpu, mem, num_gpu, gpu_milli, models), c)| WorkloadType {
            cpu_milli: cpu,
            memory_bytes: mem,
            num_gpu,
            gpu_milli,
            models,
            weight: c as f64 / total,
        })
        .collect();
    // A fixed order keeps the floating-point sums identical run to run.
    v.sort_by(|a, b| {
        (
            a.cpu_milli,
            a.memory_bytes,
            a.num_gpu,
            a.gpu_milli,
            &a.models,
        )
            .cmp(&(
                b.cpu_milli,
                b.memory_bytes,
                b.num_gpu,
                b.gpu_milli,
                &b.models,
            ))
    });
    v
}

fn cluster_frag(nodes: &[NodeSnap], types: &[WorkloadType]) -> f64 {
    nodes.iter().map(|n| node_frag(n, types)).sum()
}

/// The placement policies this experiment can run, all through the production scheduler.
pub const POLICIES: &[&str] = &["caravel", "fgd"];

/// Runs one seed of the protocol with the given policy (`caravel`: the indexed best fit the
/// server uses; `fgd`: fragmentation gradient descent against the trace's task types).
pub fn run(nodes: &[OpenbNode], pods: &[OpenbPod], seed: u64, tune: f64, policy: &str) -> Curve {
    let total: u64 = nodes.iter().map(|n| n.gpus as u64 * 1000).sum();
    let mut models: Vec<String> = nodes
        .iter()
        .filter(|n| n.gpus > 0)
        .map(|n| n.model.clone())
        .collect();
    models.sort();
    models.dedup();
    let types = task_types(pods);
    let max_pct = (tune * 100.0).round() as usize;
    let mut rng = Rng::new(seed);
    let mut cfg = Config::default();
    if policy == "fgd" {
        cfg.fgd = Some(std::sync::Arc::new(types.clone()));
    }
    let mut s = Scheduler::new(cfg, to_nodes(nodes));
    let mut tenants = HashMap::new();
    let mut curve = Curve {
        alloc_pct: Vec::with_capacity(max_pct + 1),
        frag_pct: Vec::with_capacity(max_pct + 1),
    };
    let (mut arrived, mut allocated) = (0u64, 0u64);
    let mut next_point = 0usize;
    let mut id = 0u64;
    let record = |curve: &mut Curve, s: &Scheduler, allocated: u64| {
        curve
            .alloc_pct
            .push(allocated as f64 * 100.0 / total as f64);
        curve
            .frag_pct
            .push(cluster_frag(s.nodes(), &types) * 100.0 / total as f64);
    };
    'outer: loop {
        let mut round: Vec<&OpenbPod> = pods.iter().collect();
        rng.shuffle(&mut round);
        for p in round {
            // Record every whole percent of arrived load passed before this task arrives.
            while next_point <= max_pct && arrived * 100 >= next_point as u64 * total {
                record(&mut curve, &s, allocated);
                next_point += 1;
            }
            if next_point > max_pct {
                break 'outer;
            }
            let req = JobReq {
                id: JobId(id),
                tenant: TenantId(0),
                priority: Priority::Batch,
                seq: id,
                resources: to_request(p, &models),
                gang: false,
                pending: vec![0],
                topology: None,
                max_runtime_ms: None,
            };
            id += 1;
            arrived += p.gpu_total_milli();
            let plan = s.schedule(&mut tenants, std::slice::from_ref(&req));
            if !plan.placements.is_empty() {
                allocated += p.gpu_total_milli();
            }
        }
        if pods.iter().all(|p| p.gpu_total_milli() == 0) {
            // Nothing ever arrives: every point is zero.
            while next_point <= max_pct {
                record(&mut curve, &s, allocated);
                next_point += 1;
            }
            break;
        }
    }
    curve
}

pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(sn: &str, gpus: u32, model: &str) -> OpenbNode {
        OpenbNode {
            sn: sn.into(),
            cpu_milli: 64000,
            memory_mib: 262144,
            gpus,
            model: model.into(),
        }
    }

    fn pod(num_gpu: u32, gpu_milli: u32) -> OpenbPod {
        OpenbPod {
            name: "p".into(),
            cpu_milli: 1000,
            memory_mib: 1024,
            num_gpu,
            gpu_milli,
            gpu_spec: vec![],
        }
    }

    #[test]
    fn a_workload_of_whole_gpus_fills_the_cluster_exactly() {
        let nodes = vec![node("a", 4, "T4"), node("b", 4, "T4")];
        let pods = vec![pod(1, 1000)];
        let c = run(&nodes, &pods, 42, 1.3, "caravel");
        assert_eq!(c.alloc_pct.len(), 131);
        assert!((c.alloc_pct[50] - 50.0).abs() < 1e-9);
        assert!((c.alloc_pct[100] - 100.0).abs() < 1e-9);
        assert!(
            (c.alloc_pct[130] - 100.0).abs() < 1e-9,
            "nothing beyond capacity"
        );
        assert!(
            c.frag_pct.iter().all(|f| *f == 0.0),
            "whole GPUs leave no fragments for whole-GPU tasks"
        );
    }

    #[test]
    fn fragments_are_what_the_workload_cannot_use_and_runs_are_deterministic() {
        let nodes = vec![node("a", 2, "T4")];
        let pods = vec![pod(1, 600), pod(1, 1000)];
        let c = run(&nodes, &pods, 7, 1.3, "caravel");
        assert_eq!(c, run(&nodes, &pods, 7, 1.3, "caravel"));
        assert_eq!(
            run(&nodes, &pods, 7, 1.3, "fgd"),
            run(&nodes, &pods, 7, 1.3, "fgd")
        );
        // One 600-milli task on a fresh GPU leaves 400 idle on it: useless to both task
        // types (each needs at least 600), so 400 of 2000 = 20 % is fragmented then.
        let n = &to_nodes(&nodes)[0];
        let mut n = n.clone();
        let r = to_request(&pods[0], &["T4".to_string()]);
        n.allocate(&r, &[0]);
        let types = task_types(&pods);
        assert!((cluster_frag(std::slice::from_ref(&n), &types) - 400.0).abs() < 1e-9);
    }
}
