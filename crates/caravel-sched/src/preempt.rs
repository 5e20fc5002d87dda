//! Preemption: which running tasks to stop so that a job that is entitled to run can.
//!
//! Two entitlements exist. Non-spot work may always preempt `spot` tasks (spot runs only on
//! idle capacity). A tenant reclaiming its guarantee — the job keeps the tenant within its
//! guaranteed amount — may preempt tasks other tenants run on *borrowed* capacity (placed
//! while beyond their own guarantee). `online` tasks are never preempted by `batch` or
//! `spot` work, and no task is preempted before its job's minimum runtime.
//!
//! Victims are chosen to lose the least work: spot first, then the most recently started;
//! among nodes, the one needing the fewest victims, then the least work lost.

use std::collections::{BTreeSet, HashMap};

use caravel_core::{
    JobId, Millis, NodeId, Priority, Quota, ResourceSum, RunId, TaskResources, TenantId,
};

use crate::{JobReq, NodeSnap, TenantSnap};

/// A task running now, as the preemption pass needs to see it.
#[derive(Debug, Clone)]
pub struct RunningTask {
    pub run: RunId,
    pub job: JobId,
    pub tenant: TenantId,
    pub node: NodeId,
    pub priority: Priority,
    pub resources: TaskResources,
    pub devices: Vec<u32>,
    pub started_ms: Millis,
    /// The job's minimum runtime before it may be preempted.
    pub min_runtime_ms: u64,
    /// Placed while its tenant was beyond its guarantee.
    pub borrowed: bool,
}

/// Stop `run` so that `for_job` can be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preemption {
    pub run: RunId,
    pub for_job: JobId,
}

/// Does `used` plus `times` tasks of `r` stay within guarantee `g`? A tenant with an empty
/// guarantee is always borrowing. CPU or memory left out of a guarantee does not limit it;
/// an accelerator model left out is guaranteed zero (GPUs are what guarantees are for).
pub fn within_guarantee(g: &Quota, used: &ResourceSum, r: &TaskResources, times: u64) -> bool {
    if g.cpu_milli.is_none() && g.memory_bytes.is_none() && g.gpus.is_empty() {
        return false;
    }
    let cpu = g
        .cpu_milli
        .is_none_or(|c| used.cpu_milli + r.cpu_milli * times <= c);
    let mem = g
        .memory_bytes
        .is_none_or(|m| used.memory_bytes + r.memory_bytes * times <= m);
    let gpu = match &r.gpu {
        None => true,
        Some(q) => {
            used.gpus.get(&q.model).copied().unwrap_or(0) as u64 + q.count as u64 * times
                <= g.gpus.get(&q.model).copied().unwrap_or(0) as u64
        }
    };
    cpu && mem && gpu
}

/// Why a task may not be a victim for `job`, or `None` if it may.
fn ineligible(
    v: &RunningTask,
    job: &JobReq,
    reclaiming: bool,
    now: Millis,
) -> Option<&'static str> {
    if job.priority == Priority::Spot {
        return Some("spot work preempts nothing");
    }
    let spot_victim = v.priority == Priority::Spot;
    let borrowed_victim = reclaiming && v.borrowed && v.tenant != job.tenant;
    if !spot_victim && !borrowed_victim {
        return Some("not preemptible for this job");
    }
    if v.priority == Priority::Online && job.priority != Priority::Online {
        return Some("online work is preempted only by online work");
    }
    if now - v.started_ms < v.min_runtime_ms as i64 {
        return Some("min runtime");
    }
    None
}

fn fits_after(n: &NodeSnap, freed: &[&RunningTask], r: &TaskResources) -> bool {
    let cpu = n.capacity.cpu_milli.saturating_sub(n.used_cpu_milli)
        + freed.iter().map(|v| v.resources.cpu_milli).sum::<u64>();
    let mem = n.capacity.memory_bytes.saturating_sub(n.used_memory_bytes)
        + freed.iter().map(|v| v.resources.memory_bytes).sum::<u64>();
    if cpu < r.cpu_milli || mem < r.memory_bytes {
        return false;
    }
    match &r.gpu {
        None => true,
        Some(g) => {
            let released: BTreeSet<u32> = freed
                .iter()
                .flat_map(|v| v.devices.iter().copied())
                .collect();
            let free = n
                .capacity
                .devices
                .iter()
                .filter(|d| {
                    d.model == g.model
                        && (!n.used_devices.contains(&d.index) || released.contains(&d.index))
                })
                .count();
            free >= g.count as usize
        }
    }
}

/// Scratch view of the pool during one preemption pass: victims chosen so far are gone,
/// and space promised to preemptors is taken.
pub(crate) struct Pass<'a> {
    nodes: Vec<NodeSnap>,
    pos: HashMap<NodeId, usize>,
    by_node: HashMap<NodeId, Vec<&'a RunningTask>>,
    taken: BTreeSet<RunId>,
    now: Millis,
}

impl<'a> Pass<'a> {
    pub(crate) fn new(nodes: &[NodeSnap], running: &'a [RunningTask], now: Millis) -> Pass<'a> {
        let mut by_node: HashMap<NodeId, Vec<&RunningTask>> = HashMap::new();
        for r in running {
            by_node.entry(r.node).or_default().push(r);
        }
        for v in by_node.values_mut() {
            // Cheapest victims first: spot, then the most recently started.
            v.sort_by_key(|t| {
                (
                    t.priority != Priority::Spot,
                    std::cmp::Reverse(t.started_ms),
                    t.run,
                )
            });
        }
        Pass {
            pos: nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect(),
            nodes: nodes.to_vec(),
            by_node,
            taken: BTreeSet::new(),
            now,
        }
    }

    /// Chooses victims for every pending task of `job`, all or nothing. Returns the
    /// victims, or why none would do.
    pub(crate) fn try_job(
        &mut self,
        job: &JobReq,
        tenant: &TenantSnap,
    ) -> Result<Vec<RunId>, String> {
        let n = if job.gang {
            job.pending.len() as u64
        } else {
            1
        };
        let reclaiming = within_guarantee(&tenant.guarantee, &tenant.used, &job.resources, n);
        let members = if job.gang { job.pending.len() } else { 1 };
        let saved = (self.nodes.clone(), self.taken.clone());
        let mut chosen = Vec::new();
        let mut blocked_by_min_runtime = 0;
        for _ in 0..members {
            let mut best: Option<(usize, u64, usize, Vec<&RunningTask>)> = None;
            for (i, node) in self.nodes.iter().enumerate() {
                if !node.ready {
                    continue;
                }
                let mut freed: Vec<&RunningTask> = Vec::new();
                let mut ok = fits_after(node, &freed, &job.resources);
                if !ok {
                    for v in self
                        .by_node
                        .get(&node.id)
                        .map(|v| v.as_slice())
                        .unwrap_or(&[])
                    {
                        if self.taken.contains(&v.run) {
                            continue;
                        }
                        match ineligible(v, job, reclaiming, self.now) {
                            None => {}
                            Some("min runtime") => {
                                blocked_by_min_runtime += 1;
                                continue;
                            }
                            Some(_) => continue,
                        }
                        freed.push(*v);
                        if fits_after(node, &freed, &job.resources) {
                            ok = true;
                            break;
                        }
                    }
                }
                if ok {
                    let lost: u64 = freed
                        .iter()
                        .map(|v| (self.now - v.started_ms).max(0) as u64)
                        .sum();
                    let better = best
                        .as_ref()
                        .is_none_or(|b| (freed.len(), lost, i) < (b.2, b.1, b.0));
                    if better {
                        best = Some((i, lost, freed.len(), freed));
                    }
                }
            }
            let Some((i, _, _, freed)) = best else {
                (self.nodes, self.taken) = saved;
                return Err(if blocked_by_min_runtime > 0 {
                    format!("{blocked_by_min_runtime} possible victims are inside their minimum runtime")
                } else if reclaiming {
                    "no spot or borrowed tasks to preempt would make room".to_string()
                } else {
                    "no spot tasks to preempt would make room, and the tenant is beyond its guarantee".to_string()
                });
            };
            for v in &freed {
                self.taken.insert(v.run);
                self.nodes[i].release(&v.resources, &v.devices);
                chosen.push(v.run);
            }
            // Promise the freed space to this job so no one else counts it.
            let node = &mut self.nodes[i];
            node.used_cpu_milli += job.resources.cpu_milli;
            node.used_memory_bytes += job.resources.memory_bytes;
            if let Some(g) = &job.resources.gpu {
                let devs: Vec<u32> = node
                    .capacity
                    .devices
                    .iter()
                    .filter(|d| d.model == g.model && !node.used_devices.contains(&d.index))
                    .map(|d| d.index)
                    .take(g.count as usize)
                    .collect();
                node.used_devices.extend(devs);
            }
        }
        let _ = &self.pos;
        Ok(chosen)
    }
}
