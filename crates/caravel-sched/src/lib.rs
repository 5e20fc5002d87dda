//! The Caravel scheduler: a pure, deterministic function from a snapshot of the pool
//! (nodes, tenants' quota use, pending jobs) to a plan (placements) plus a machine-readable
//! reason for every job it could not place.
//!
//! It must never depend on tokio, do I/O or read a clock: the server calls it each cycle,
//! the trace simulator calls the same code under a virtual clock, and property tests call
//! it millions of times. Same input, same output.
//!
//! The pipeline per task follows Nomad and the Kubernetes framework: order the queue
//! (priority, then FIFO), check the tenant's quota, filter nodes (cheapest checks first,
//! each rejection counted by reason), score the survivors (best fit), select the best.
//! Gangs are placed tentatively and rolled back unless every member fits.

#![forbid(unsafe_code)]

pub mod baseline;
pub mod fair;
pub mod fgd;
mod index;
mod lp;
pub mod plan;
pub mod preempt;
mod reserve;
pub mod rng;
mod shape;

pub use preempt::{Preemption, RunningTask};
use shape::ShapeMemo;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use caravel_core::{
    Capacity, GpuRequest, JobId, NodeId, PendingReason, Priority, Quota, ReasonCode, ResourceSum,
    TaskResources, TenantId, Topology, TopologyLevel,
};

/// A node as the scheduler sees it: capacity and what is already allocated.
#[derive(Debug, Clone)]
pub struct NodeSnap {
    pub id: NodeId,
    pub ready: bool,
    /// Why a node that is not ready is not, as pending reasons say it ("drained",
    /// "lost"): an operator reading "1 node drained" knows what to undo.
    pub not_ready: &'static str,
    /// Shared, not copied: searches that play time forward (`reserve::RoomWalk`) clone
    /// nodes by the thousand, and the capacity (a device list with model names) never
    /// changes while the scheduler lives.
    pub capacity: std::sync::Arc<Capacity>,
    pub used_cpu_milli: u64,
    pub used_memory_bytes: u64,
    /// Devices held whole.
    pub used_devices: BTreeSet<u32>,
    /// Devices shared by fractional requests: index -> thousandths in use (1..=1000).
    pub shared: BTreeMap<u32, u32>,
    pub topology: Topology,
    /// Running GPU tasks by shape (0: a share of one GPU, k: k whole GPUs) -> count. Only
    /// the GpuClustering baseline reads it; the server leaves it empty.
    pub gpu_shapes: BTreeMap<u32, u32>,
}

impl NodeSnap {
    pub fn new(id: NodeId, capacity: Capacity) -> NodeSnap {
        NodeSnap {
            id,
            topology: Topology::default(),
            shared: BTreeMap::new(),
            gpu_shapes: BTreeMap::new(),
            ready: true,
            not_ready: "not ready",
            capacity: std::sync::Arc::new(capacity),
            used_cpu_milli: 0,
            used_memory_bytes: 0,
            used_devices: BTreeSet::new(),
        }
    }

    fn free_devices<'a>(&'a self, model: &'a str) -> impl Iterator<Item = u32> + 'a {
        self.capacity
            .devices
            .iter()
            .filter(move |d| {
                d.model == model
                    && !self.used_devices.contains(&d.index)
                    && !self.shared.contains_key(&d.index)
            })
            .map(|d| d.index)
    }

    /// The model of the node's first device ("" without any): what FGD's fragmentation
    /// measures a node's GPUs as.
    pub fn primary_model(&self) -> &str {
        self.capacity
            .devices
            .first()
            .map(|d| d.model.as_str())
            .unwrap_or("")
    }

    /// The model of device `index` on this node.
    pub fn model_of(&self, index: u32) -> Option<&str> {
        self.capacity
            .devices
            .iter()
            .find(|d| d.index == index)
            .map(|d| d.model.as_str())
    }

    /// Devices for one task of `g` on `model`, if this node has them: whole devices
    /// (lowest indices), or for a fraction the shared device it fits most tightly, else a
    /// fresh one, so fractions pack onto GPUs already in pieces and whole GPUs stay free.
    fn pick_devices(&self, g: &GpuRequest, model: &str) -> Option<Vec<u32>> {
        match g.milli {
            None => {
                let d: Vec<u32> = self.free_devices(model).take(g.count as usize).collect();
                (d.len() == g.count as usize).then_some(d)
            }
            Some(m) => {
                let shared = self
                    .shared
                    .iter()
                    .filter(|(i, used)| **used + m <= 1000 && self.model_of(**i) == Some(model))
                    .max_by_key(|(i, used)| (**used, std::cmp::Reverse(**i)))
                    .map(|(i, _)| *i);
                shared
                    .or_else(|| self.free_devices(model).next())
                    .map(|d| vec![d])
            }
        }
    }

    /// Devices for one task of `r` as placement picks them (the first accepted model that
    /// has them), ignoring CPU and memory; `Some(vec![])` for a CPU-only task.
    pub(crate) fn pick_for(&self, r: &TaskResources) -> Option<Vec<u32>> {
        let Some(g) = &r.gpu else {
            return Some(Vec::new());
        };
        let need = if g.milli.is_some() { 1 } else { g.count };
        g.models_iter()
            .filter(|m| self.capacity.gpu_count(m) >= need)
            .find_map(|m| self.pick_devices(g, m))
    }

    /// Allocates `r` with the given devices. Panics in debug builds on over-commit: the
    /// scheduler only calls it after `fit` said yes.
    pub fn allocate(&mut self, r: &TaskResources, devices: &[u32]) {
        if let Some(k) = baseline::shape_of(r) {
            *self.gpu_shapes.entry(k).or_insert(0) += 1;
        }
        self.used_cpu_milli += r.cpu_milli;
        self.used_memory_bytes += r.memory_bytes;
        let milli = r.gpu.as_ref().and_then(|g| g.milli);
        for d in devices {
            match milli {
                Some(m) => {
                    debug_assert!(!self.used_devices.contains(d), "device {d} is held whole");
                    let used = self.shared.entry(*d).or_insert(0);
                    *used += m;
                    debug_assert!(*used <= 1000, "device {d} on node {} over-shared", self.id);
                }
                None => {
                    let fresh = self.used_devices.insert(*d) && !self.shared.contains_key(d);
                    debug_assert!(fresh, "device {d} on node {} allocated twice", self.id);
                }
            }
        }
        debug_assert!(self.used_cpu_milli <= self.capacity.cpu_milli);
        debug_assert!(self.used_memory_bytes <= self.capacity.memory_bytes);
    }

    /// Could `r` be allocated with exactly these devices now?
    fn can_take(&self, r: &TaskResources, devices: &[u32]) -> bool {
        let milli = r.gpu.as_ref().and_then(|g| g.milli);
        self.ready
            && self.used_cpu_milli + r.cpu_milli <= self.capacity.cpu_milli
            && self.used_memory_bytes + r.memory_bytes <= self.capacity.memory_bytes
            && devices.iter().all(|d| {
                self.capacity.devices.iter().any(|c| c.index == *d)
                    && !self.used_devices.contains(d)
                    && match milli {
                        Some(m) => self.shared.get(d).copied().unwrap_or(0) + m <= 1000,
                        None => !self.shared.contains_key(d),
                    }
            })
    }

    /// Whether the node gives what a task needs besides room (isolation, an OCI runtime).
    pub fn meets(&self, needs: caravel_core::NodeNeeds) -> bool {
        self.capacity.isolation >= needs.isolation && (!needs.image || self.capacity.images)
    }

    /// How many tasks of `r` this node could take now (0 when not ready, or when it does
    /// not give what the task needs).
    pub fn room_for(&self, r: &TaskResources) -> u64 {
        if !self.ready || !self.meets(r.needs) {
            return 0;
        }
        let mut k =
            self.capacity.cpu_milli.saturating_sub(self.used_cpu_milli) / r.cpu_milli.max(1);
        k = k.min(
            self.capacity
                .memory_bytes
                .saturating_sub(self.used_memory_bytes)
                / r.memory_bytes.max(1),
        );
        if let Some(g) = &r.gpu {
            let mut fit = 0u64;
            for model in g.models_iter() {
                let free = self.free_devices(model).count() as u64;
                fit += match g.milli {
                    None => free / g.count.max(1) as u64,
                    Some(m) => {
                        let m = m as u64;
                        free * (1000 / m)
                            + self
                                .shared
                                .iter()
                                .filter(|(i, _)| self.model_of(**i) == Some(model))
                                .map(|(_, used)| (1000 - *used as u64) / m)
                                .sum::<u64>()
                    }
                };
            }
            k = k.min(fit);
        }
        k
    }

    pub fn release(&mut self, r: &TaskResources, devices: &[u32]) {
        if let Some(k) = baseline::shape_of(r) {
            if let Some(c) = self.gpu_shapes.get_mut(&k) {
                *c -= 1;
                if *c == 0 {
                    self.gpu_shapes.remove(&k);
                }
            }
        }
        self.used_cpu_milli = self.used_cpu_milli.saturating_sub(r.cpu_milli);
        self.used_memory_bytes = self.used_memory_bytes.saturating_sub(r.memory_bytes);
        let milli = r.gpu.as_ref().and_then(|g| g.milli);
        for d in devices {
            match milli {
                Some(m) => {
                    if let Some(u) = self.shared.get_mut(d) {
                        *u = u.saturating_sub(m);
                        if *u == 0 {
                            self.shared.remove(d);
                        }
                    }
                }
                None => {
                    self.used_devices.remove(d);
                }
            }
        }
    }
}

/// A tenant's quota and what its running work holds now.
#[derive(Debug, Clone, Default)]
pub struct TenantSnap {
    pub quota: Quota,
    pub used: ResourceSum,
    /// Fair-share weight; 0 is taken as 1.
    pub weight: f64,
    /// Decayed history of what the tenant held.
    pub history: fair::UsageEma,
    /// What the tenant is guaranteed; beyond it, it borrows others' idle capacity.
    pub guarantee: Quota,
}

/// A job with tasks still to place.
#[derive(Debug, Clone)]
pub struct JobReq {
    pub id: JobId,
    pub tenant: TenantId,
    pub priority: Priority,
    /// Submission order: FIFO within a priority class.
    pub seq: u64,
    pub resources: TaskResources,
    pub gang: bool,
    /// An elastic gang: placed with as many of `pending` as fit together, if at least
    /// this many (the first ones); `None`: all or nothing.
    pub min_tasks: Option<u32>,
    /// Indices of the tasks to place. For a gang this is every task.
    pub pending: Vec<u32>,
    /// For gangs: the domain every member must share.
    pub topology: Option<TopologyLevel>,
    /// The job's max runtime: a job with one may backfill into space reserved for a larger
    /// job if it will have ended by the time the reservation starts.
    pub max_runtime_ms: Option<u64>,
    /// Service the job has received so far, in GPU-milliseconds (one GPU for one second is
    /// 1,000; a quarter GPU counts a quarter), lost work included. Orders batch work under
    /// `Config::las`; ignored otherwise.
    pub attained_gpu_ms: u64,
}

/// Everything one scheduling cycle takes besides the pool, as one value: the server and
/// the simulator both run their cycles through [`Scheduler::cycle`], and neither has to
/// know in which order the scheduler wants to hear of running work, held room, starving
/// jobs and zone preferences.
pub struct CycleInput<'a> {
    pub now: caravel_core::Millis,
    /// The jobs offered this cycle (a full pass: every pending one).
    pub jobs: &'a [JobReq],
    /// Every tenant's quota, guarantee, usage and fair-share history; usage is updated
    /// with the cycle's placements.
    pub tenants: &'a mut HashMap<TenantId, TenantSnap>,
    /// Running tasks that may be preempted. `None` keeps the set the scheduler already
    /// has: one kept across cycles (the simulator's) is told of starts and ends as they
    /// happen; the server's is made fresh each cycle and is given the whole set.
    pub running: Option<Vec<RunningTask>>,
    /// Room the last cycle's victims freed, held for the jobs they were stopped for.
    pub holds: Vec<Hold>,
    /// Jobs that have waited past the starvation threshold, oldest first (see `protect`).
    pub starving: Vec<JobId>,
    /// Soft zone preferences by job (services spread over zones).
    pub zone_preferences: HashMap<JobId, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub job: JobId,
    pub index: u32,
    pub node: NodeId,
    pub devices: Vec<u32>,
    /// The task runs on borrowed capacity: beyond its tenant's guarantee at the moment it
    /// was placed (its tenant's usage before the cycle plus the cycle's earlier
    /// placements). Borrowed work is what an owner's reclaim preempts first; the server
    /// and the simulator both take this flag from the plan.
    pub borrowed: bool,
}

/// Room a preemption freed, held for the job it was freed for until that job's turn in the
/// next cycle (Kubernetes' nominated node): without it, work that comes earlier in the
/// cycle's order could take the room, and the job would preempt again for the same space.
/// Work of a higher priority class than the holder may still take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub job: JobId,
    pub priority: Priority,
    pub node: NodeId,
    pub resources: TaskResources,
    pub devices: Vec<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub placements: Vec<Placement>,
    /// Every job that still has unplaced tasks, with why.
    pub pending: BTreeMap<JobId, Vec<PendingReason>>,
    /// Running tasks to stop so that pending jobs entitled to the space can run.
    pub preemptions: Vec<Preemption>,
    /// The waiting jobs' reservations, head-of-line first (see `Config::reservations`):
    /// from this time on, these nodes.
    pub reservations: Vec<(JobId, caravel_core::Millis, Vec<NodeId>)>,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Added to the score of a GPU node for a CPU-only task, so CPU work fills CPU nodes
    /// first and GPUs stay reachable for GPU work. In parts per million of a "full node".
    pub gpu_node_penalty_ppm: u64,
    /// Place by fragmentation gradient descent against this expected workload (a full scan
    /// per placement) instead of the indexed best fit.
    pub fgd: Option<std::sync::Arc<Vec<fgd::WorkloadType>>>,
    /// A research policy that scores nodes instead of Caravel's own (the simulator's
    /// published baselines; see `baseline`). `None`, Caravel's own, everywhere else.
    /// FGD reads its workload from `fgd`.
    pub baseline: Option<std::sync::Arc<dyn baseline::Baseline>>,
    /// With `fgd`: weight of the CPU-stranding term (GPU thousandths the node's remaining
    /// CPU could no longer feed at the workload's CPU-per-GPU ratio) next to FGD's delta.
    /// 0 is plain FGD; 2 measured best on the openb traces (docs/simulator.md).
    pub fgd_cpu_weight: f64,
    /// With `fgd`: weight of the pinned-model pressure term (see `fgd::pinned_pressure`):
    /// a task that accepts several GPU models pays, per GPU thousandth it takes, this times
    /// the pressure of pinned work on the model it lands on. 0.2 measured best on the
    /// openb gpuspec traces (docs/simulator.md); traces without pins are unaffected.
    pub fgd_pin_weight: f64,
    /// Seeds the generator the Random baseline draws with.
    pub seed: u64,
    /// With `fgd`: score at most this many feasible nodes per placement, taken from the
    /// candidate index tightest first (0: every node). Like kube-scheduler's
    /// percentageOfNodesToScore, this bounds a placement's cost on pools of many thousands
    /// of nodes; pools up to this size are scored exactly.
    pub fgd_max_candidates: usize,
    /// Explain work that stays pending in full: per-node counts ("3 lack cpu, 5 lack free
    /// gpu/A100", a scan of every node per pending shape), the fair-share standing and why no
    /// preemption helps. Users read them; the simulator turns them off. Placements do not
    /// depend on it (a test holds plans equal either way but for the reasons).
    pub explain_pending: bool,
    /// Least-attained-service order for batch work (off: priority, fair share, FIFO).
    pub las: Option<Las>,
    /// How many waiting jobs hold a reservation at once, in queue order (at least 1). 1 is
    /// EASY backfill: only the head-of-line job's start is protected, and a large gang
    /// behind it waits as long as smaller work keeps filling each freed slot. More is
    /// closer to conservative backfill (Slurm reserves for every job its backfill pass
    /// tests): each job that gets one is placed in the node-time map, later reservations
    /// and backfill work around it.
    pub reservations: usize,
    /// With `fgd`: the plan GPU shares are placed by (`plan::SharePlan`). `None` builds
    /// it from `fgd` when the scheduler is made (a few milliseconds on the openb traces);
    /// callers that make a scheduler per pass for one workload pass it in to build it once.
    pub share_plan: Option<std::sync::Arc<plan::SharePlan>>,
    /// With a share plan: turn away this fraction of what the plan cannot afford
    /// (`SharePlan::turn_away`) of each share size that would open a fresh GPU, for work that
    /// will meet the pool's capacity. `None` (the default) places every task that fits.
    /// The shares turned away are spread evenly over the arrivals of their size, and only
    /// while GPUs are the scarcer resource (the GPU nodes' GPU use above their CPU use)
    /// and every GPU task accepts every model (the plan counts GPUs as one kind). The FGD
    /// experiment runs 0.9 (a scan of 0.8–1.0 on the openb traces, docs/simulator.md); the
    /// server never sets it: there a share waits rather than is dropped, and waiting for
    /// a pace would only delay it.
    pub share_pacing: Option<f64>,
}

/// Discretised least-attained-service scheduling of batch work (Tiresias, NSDI'19): batch
/// jobs wait in queues by the GPU service they have received so far; a job in an earlier
/// queue goes first and may preempt its own tenant's running batch work from a later queue.
/// Short jobs then never wait behind long ones, without knowing any job's length; a long
/// job resumes from its checkpoint. Preemption stays within a tenant: across tenants, fair
/// share and guarantees decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Las {
    /// Queue boundaries in GPU-seconds of attained service, ascending: below the first is
    /// queue 0. Tiresias' and Pollux's artefacts use one boundary, 16 GPU-hours (57,600).
    pub thresholds_gpu_s: Vec<u64>,
    /// A task runs at least this long before a LAS preemption may stop it (0: Tiresias').
    pub min_slice_ms: u64,
}

impl Las {
    /// The queue of a job that has received `attained_gpu_ms`.
    pub fn level(&self, attained_gpu_ms: u64) -> u8 {
        self.thresholds_gpu_s
            .iter()
            .filter(|t| attained_gpu_ms >= t.saturating_mul(1000))
            .count()
            .min(u8::MAX as usize) as u8
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            gpu_node_penalty_ppm: 1_000_000,
            fgd: None,
            baseline: None,
            fgd_cpu_weight: 2.0,
            fgd_pin_weight: 0.2,
            seed: 0,
            fgd_max_candidates: 2048,
            explain_pending: true,
            las: None,
            reservations: 1,
            share_plan: None,
            share_pacing: None,
        }
    }
}

/// Why one node refused one task. Ordered cheapest check first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Lack {
    NotReady(&'static str),
    /// Gives less isolation than the task asks for.
    Isolation(caravel_core::IsolationLevel),
    /// Has no OCI runtime, and the task runs in an image.
    Images,
    GpuModel(String),
    Gpus(String),
    Cpu,
    Memory,
}

impl Lack {
    fn label(&self) -> String {
        match self {
            Lack::NotReady(why) => (*why).into(),
            Lack::Isolation(l) => format!("lack isolation {l}"),
            Lack::Images => "lack an OCI runtime".into(),
            Lack::GpuModel(m) => format!("lack gpu/{m}"),
            Lack::Gpus(m) => format!("lack free gpu/{m}"),
            Lack::Cpu => "lack cpu".into(),
            Lack::Memory => "lack memory".into(),
        }
    }
}

/// Checks one node for one task; on success returns the devices it would get and a
/// best-fit score (lower is tighter).
pub(crate) fn fit(cfg: &Config, n: &NodeSnap, r: &TaskResources) -> Result<(u64, Vec<u32>), Lack> {
    if !n.ready {
        return Err(Lack::NotReady(n.not_ready));
    }
    if n.capacity.isolation < r.needs.isolation {
        return Err(Lack::Isolation(r.needs.isolation));
    }
    if r.needs.image && !n.capacity.images {
        return Err(Lack::Images);
    }
    let mut devices = Vec::new();
    let mut whole_taken = 0u64;
    if let Some(g) = &r.gpu {
        let need = if g.milli.is_some() { 1 } else { g.count };
        let offered: Vec<&str> = g
            .models_iter()
            .filter(|m| n.capacity.gpu_count(m) >= need)
            .collect();
        if offered.is_empty() {
            return Err(Lack::GpuModel(g.model.clone()));
        }
        match offered.iter().find_map(|m| n.pick_devices(g, m)) {
            Some(d) => devices = d,
            None => return Err(Lack::Gpus(g.model.clone())),
        }
        whole_taken = devices.iter().filter(|d| !n.shared.contains_key(d)).count() as u64;
    }
    let cpu_free = n.capacity.cpu_milli.saturating_sub(n.used_cpu_milli);
    if cpu_free < r.cpu_milli {
        return Err(Lack::Cpu);
    }
    let mem_free = n.capacity.memory_bytes.saturating_sub(n.used_memory_bytes);
    if mem_free < r.memory_bytes {
        return Err(Lack::Memory);
    }
    // Best fit: the fraction of each resource left free after placing, summed. Integer
    // parts-per-million keep the result identical on every platform.
    let ppm = |left: u64, cap: u64| {
        if cap == 0 {
            0
        } else {
            (left as u128 * 1_000_000 / cap as u128) as u64
        }
    };
    let mut score = ppm(cpu_free - r.cpu_milli, n.capacity.cpu_milli)
        + ppm(mem_free - r.memory_bytes, n.capacity.memory_bytes);
    let gpus_total = n.capacity.devices.len() as u64;
    if gpus_total > 0 {
        // Whole devices left free after this placement: a fraction placed on a device that
        // is already shared takes none, which keeps whole GPUs for whole-GPU work.
        let busy = n.used_devices.len() as u64 + n.shared.len() as u64;
        let gpus_left = gpus_total.saturating_sub(busy + whole_taken);
        score += ppm(gpus_left, gpus_total);
        if r.gpu.is_none() {
            score += cfg.gpu_node_penalty_ppm;
        }
    }
    Ok((score, devices))
}

/// Places `need` tasks of `r` on the nodes in `order` (each as `base` gives it), filling one
/// before the next; the nodes used, or `None` if they do not hold `need`.
fn fit_greedily<'n>(
    cfg: &Config,
    order: impl Iterator<Item = usize>,
    base: impl Fn(usize) -> &'n NodeSnap,
    r: &TaskResources,
    need: u64,
) -> Option<BTreeSet<usize>> {
    let mut left = need;
    let mut chosen = BTreeSet::new();
    for i in order {
        if left == 0 {
            break;
        }
        let b = base(i);
        if b.room_for(r) == 0 {
            continue;
        }
        let mut n = b.clone();
        while left > 0 {
            match fit(cfg, &n, r) {
                Ok((_, devs)) => {
                    n.allocate(r, &devs);
                    chosen.insert(i);
                    left -= 1;
                }
                Err(_) => break,
            }
        }
    }
    (left == 0).then_some(chosen)
}

/// The pool's topology domains at one level, numbered in key order (`domain_of`): a
/// scheduler's nodes, their topology and readiness never change, so this is built once, on
/// first use, and the domain searches compare numbers instead of names.
#[derive(Debug, Clone)]
struct Domains {
    /// Per node (by position), its domain's number.
    of: Vec<u32>,
    /// The ready nodes of each domain that has any, in domain order.
    ready: Vec<Vec<usize>>,
}

impl Domains {
    fn build(nodes: &[NodeSnap], level: TopologyLevel) -> Domains {
        let keys: BTreeSet<(&str, &str, &str, u64)> =
            nodes.iter().map(|n| domain_of(n, level)).collect();
        let number: HashMap<_, u32> = keys.into_iter().zip(0..).collect();
        let of: Vec<u32> = nodes.iter().map(|n| number[&domain_of(n, level)]).collect();
        let mut by: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, _) in nodes.iter().enumerate().filter(|(_, n)| n.ready) {
            by.entry(of[i]).or_default().push(i);
        }
        Domains {
            of,
            ready: by.into_values().collect(),
        }
    }
}

/// Which domain at `level` a node belongs to: (region, zone, rack, node id), the finer
/// parts left blank.
fn domain_of(n: &NodeSnap, level: TopologyLevel) -> (&str, &str, &str, u64) {
    let t = &n.topology;
    match level {
        TopologyLevel::Node => (&t.region, &t.zone, &t.rack, n.id.0),
        TopologyLevel::Rack => (&t.region, &t.zone, &t.rack, 0),
        TopologyLevel::Zone => (&t.region, &t.zone, "", 0),
    }
}

/// Picks the best node for one task, or counts why none fits.
fn select(
    cfg: &Config,
    nodes: &[NodeSnap],
    r: &TaskResources,
) -> Result<(usize, Vec<u32>), BTreeMap<Lack, u64>> {
    let mut best: Option<(u64, usize, Vec<u32>)> = None;
    let mut lacks: BTreeMap<Lack, u64> = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        match fit(cfg, n, r) {
            Ok((score, devs)) => {
                if best.as_ref().is_none_or(|b| score < b.0) {
                    best = Some((score, i, devs));
                }
            }
            Err(l) => *lacks.entry(l).or_insert(0) += 1,
        }
    }
    match best {
        Some((_, i, d)) => Ok((i, d)),
        None => Err(lacks),
    }
}

/// Sets `Placement::borrowed`: in plan order, each task against its tenant's guarantee
/// and what the tenant held before it (usage before the cycle, then each earlier
/// placement of the cycle counted whole, as metering counts it).
fn mark_borrowed(
    plan: &mut Plan,
    mut used: HashMap<TenantId, ResourceSum>,
    tenants: &HashMap<TenantId, TenantSnap>,
    jobs: &[JobReq],
) {
    if plan.placements.is_empty() {
        return;
    }
    // A decision often offers one job (the benchmarks, an incremental pass): an index
    // over the offered jobs only when there are many.
    let by_id: Option<HashMap<JobId, &JobReq>> =
        (jobs.len() > 16).then(|| jobs.iter().map(|j| (j.id, j)).collect());
    let find = |id: JobId| match &by_id {
        Some(m) => m.get(&id).copied(),
        None => jobs.iter().find(|j| j.id == id),
    };
    // A job's tasks come one after another: look each job up once.
    let mut last: Option<(JobId, &JobReq, Option<&Quota>)> = None;
    for p in &mut plan.placements {
        let (job, guarantee) = match last {
            Some((id, j, g)) if id == p.job => (j, g),
            _ => {
                let Some(j) = find(p.job) else {
                    continue;
                };
                let g = tenants
                    .get(&j.tenant)
                    .map(|t| &t.guarantee)
                    .filter(|g| !preempt::no_guarantee(g));
                last = Some((p.job, j, g));
                (j, g)
            }
        };
        // Guaranteed nothing: everything borrows, and its usage need not be followed.
        let Some(guarantee) = guarantee else {
            p.borrowed = true;
            continue;
        };
        let u = used.entry(job.tenant).or_default();
        p.borrowed = !preempt::within_guarantee(guarantee, u, &job.resources, 1);
        u.add_task(&job.resources, 1);
    }
}

fn no_fit_reason(lacks: &BTreeMap<Lack, u64>, total_nodes: usize) -> PendingReason {
    if total_nodes == 0 {
        return PendingReason {
            code: ReasonCode::NoNodes,
            unexplained: false,
            message: "no nodes registered".into(),
            counts: BTreeMap::new(),
        };
    }
    let counts: BTreeMap<String, u64> = lacks.iter().map(|(l, c)| (l.label(), *c)).collect();
    let parts: Vec<String> = lacks
        .iter()
        .map(|(l, c)| {
            let noun = if *c == 1 { "node" } else { "nodes" };
            match l {
                Lack::NotReady(why) => format!("{c} {noun} {why}"),
                // The label is also the counts key ("lack cpu"); the sentence agrees.
                other if *c == 1 => {
                    format!("1 node {}", other.label().replacen("lack", "lacks", 1))
                }
                other => format!("{c} {noun} {}", other.label()),
            }
        })
        .collect();
    PendingReason {
        code: ReasonCode::NoFit,
        // Every node that does not fit has a lack; none means the scan was left for later
        // (`lazy_explain`), and `fill_explanations` adds it.
        unexplained: lacks.is_empty(),
        message: format!("no node fits: {}", parts.join(", ")),
        counts,
    }
}

fn quota_reason(e: &caravel_core::tenant::QuotaExceeded) -> PendingReason {
    let mut counts = BTreeMap::new();
    counts.insert("in_use".into(), e.in_use);
    counts.insert("limit".into(), e.limit);
    counts.insert("asked".into(), e.asked);
    PendingReason {
        code: ReasonCode::Quota,
        unexplained: false,
        message: e.to_string(),
        counts,
    }
}

/// Checks a job's quota. For a job that accepts several GPU models, returns the request
/// narrowed to the models the quota still allows (`Some`), or `None` when unchanged.
fn quota_view(
    tenant: &TenantSnap,
    r: &TaskResources,
    times: u64,
) -> Result<Option<TaskResources>, caravel_core::tenant::QuotaExceeded> {
    let Some(g) = r.gpu.as_ref().filter(|g| !g.any_of.is_empty()) else {
        return tenant.quota.check(&tenant.used, r, times).map(|_| None);
    };
    let allowed = |m: &str| tenant.quota.check_on(&tenant.used, r, Some(m), times);
    let mut first_err = None;
    let mut any = false;
    for m in g.models_iter() {
        match allowed(m) {
            Ok(()) => any = true,
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match (any, first_err) {
        // Every model allowed, the usual case: the request stands (checked for every queued
        // job in every cycle, so it must not copy the request).
        (true, None) => return Ok(None),
        (false, e) => return Err(e.expect("at least one model was checked")),
        (true, Some(_)) => {}
    }
    let mut ok: Vec<String> = g
        .models_iter()
        .filter(|m| allowed(m).is_ok())
        .map(str::to_string)
        .collect();
    let mut narrowed = r.clone();
    let gg = narrowed.gpu.as_mut().expect("has a gpu");
    gg.model = ok.remove(0);
    gg.any_of = ok;
    Ok(Some(narrowed))
}

/// The scheduler over one set of nodes, with its candidate index kept across calls (the
/// simulator and the benchmarks call it once per decision).
pub struct Scheduler {
    pub cfg: Config,
    totals: fair::PoolTotals,
    nodes: Vec<NodeSnap>,
    index: index::Index,
    pos: HashMap<NodeId, usize>,
    /// Running tasks by node, for preemption; see `set_running`.
    running: preempt::ByNode,
    running_at: HashMap<caravel_core::RunId, usize>,
    /// Running tasks with a known end, in end order: what a reservation is computed from.
    ends: BTreeSet<(caravel_core::Millis, usize, caravel_core::RunId)>,
    /// While set, no-fit reasons are left without their per-node counts (a full scan) until
    /// the end of the cycle: jobs that get victims never need them.
    lazy_explain: bool,
    /// Where the next preemption search starts, so exhausted nodes are not rescanned first.
    preempt_cursor: usize,
    /// The current time, when the caller gave it (`schedule_preempting`): needed to reserve.
    now: Option<caravel_core::Millis>,
    /// This cycle's reservations, in the order they were made (`Config::reservations`).
    reservations: Vec<Reservation>,
    /// Per reserved node, the earliest start of a reservation on it: work that would still
    /// run then may not start there. Rebuilt whenever `reservations` changes.
    reserved_from: HashMap<usize, caravel_core::Millis>,
    /// SplitMix64 state for the baselines' random tie-breaks: seeded, so runs repeat.
    rng: std::cell::Cell<rng::SplitMix64>,
    /// Running tasks that could ever be preempted, kept with `running`.
    victims: preempt::Victims,
    /// Jobs whose tasks should land in a given zone when one there fits (service replicas
    /// spread across zones); elsewhere otherwise.
    zone_pref: HashMap<JobId, String>,
    /// While set, placement considers only nodes of this zone.
    zone_only: Option<String>,
    /// Per GPU model: expected GPU demand of work pinned to it, over its capacity.
    pinned_pressure: HashMap<String, f64>,
    /// CPU the stranding term keeps per idle GPU thousandth (`fgd::kept_cpu_per_gpu`).
    cpu_per_gpu: f64,
    /// How shares fill GPUs (`Config::share_plan`, built from `Config::fgd` if not given).
    share_plan: Option<std::sync::Arc<plan::SharePlan>>,
    /// `Config::share_pacing`, when it applies to this workload.
    pacing: Option<Pacing>,
    /// The runs of every running gang: preempting one member stops them all, so the
    /// victim search frees them all.
    gangs: HashMap<JobId, Vec<caravel_core::RunId>>,
    /// Room held for preemptors (`hold`), counted as used on its node (the index in
    /// `nodes`) until the holder's turn in the next `schedule`.
    held: Vec<(Hold, usize)>,
    /// Jobs the caller says have waited too long, oldest first (`protect`).
    protected: Vec<JobId>,
    /// For FGD scoring: per distinct GPU model, which workload types accept it
    /// (`fgd::models_ok`), and each node's entry (by position).
    models_ok: Vec<Vec<bool>>,
    node_models_ok: Vec<u32>,
    /// During the turn of the job nodes are drained for: how many.
    draining: Option<usize>,
    /// Per topology level (node, rack, zone), built on first use.
    domain_table: [std::cell::OnceCell<Domains>; 3],
    /// Tests only: the victim search visits every node with running tasks, not just those
    /// the index names, so the two can be compared.
    #[cfg(test)]
    scan_all_for_victims: bool,
    /// Tests: place every gang member tentatively, never counting room first.
    #[cfg(test)]
    place_gangs_tentatively: bool,
}

/// Shares of each size seen and turned away so far (`Config::share_pacing`).
#[derive(Debug, Clone, Default)]
struct Pacing {
    factor: f64,
    seen: BTreeMap<u32, u64>,
    turned: BTreeMap<u32, u64>,
}

/// Where a share would go, in the plan's order of preference (`plan::SharePlan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum OnPlan {
    /// Onto a used GPU whose fill stays on the plan.
    Joins,
    /// Onto a fresh GPU, the size being on the plan.
    Opens,
    /// Anywhere else it fits.
    Off,
}

/// Room held for a job that could not start: from `at` on, on these nodes.
#[derive(Debug, Clone)]
struct Reservation {
    job: JobId,
    at: caravel_core::Millis,
    /// When the job will be gone at the latest (`at` + its max runtime; `None`: unknown or
    /// drained): later reservations may use the nodes from then on.
    until: Option<caravel_core::Millis>,
    nodes: BTreeSet<usize>,
    /// Drained for a starving job (`protect`), not computed from max runtimes.
    drained: bool,
}

impl Scheduler {
    pub fn new(cfg: Config, nodes: Vec<NodeSnap>) -> Scheduler {
        let index = index::Index::build(&nodes);
        let pos = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
        let pinned_pressure = cfg
            .fgd
            .as_deref()
            .map(|t| fgd::pinned_pressure(t, &nodes))
            .unwrap_or_default();
        let cpu_per_gpu = cfg
            .fgd
            .as_deref()
            .map(|t| fgd::kept_cpu_per_gpu(t, &nodes))
            .unwrap_or(0.0);
        let share_plan = match (&cfg.share_plan, cfg.fgd.as_deref()) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(types)) if cfg.baseline.is_none() => {
                plan::SharePlan::new(types).map(std::sync::Arc::new)
            }
            _ => None,
        };
        // The plan's budget counts every GPU as alike: with work pinned to some models, the
        // GPUs a turned-away share leaves may be of a model nothing else can use.
        let pacing = match (cfg.share_pacing, &share_plan, cfg.fgd.as_deref()) {
            (Some(f), Some(p), Some(types)) if f > 0.0 && !p.turn_away.is_empty() => {
                let mut models: Vec<&str> = nodes
                    .iter()
                    .flat_map(|n| n.capacity.devices.iter().map(|d| d.model.as_str()))
                    .collect();
                models.sort_unstable();
                models.dedup();
                let any = |t: &fgd::WorkloadType| {
                    t.models.is_empty() || models.iter().all(|m| t.models.iter().any(|x| x == m))
                };
                types
                    .iter()
                    .all(|t| t.num_gpu == 0 || any(t))
                    .then(|| Pacing {
                        factor: f,
                        ..Pacing::default()
                    })
            }
            _ => None,
        };
        let (mut models_ok, mut node_models_ok) = (Vec::new(), Vec::with_capacity(nodes.len()));
        if let Some(types) = cfg.fgd.as_deref() {
            let mut seen: HashMap<&str, u32> = HashMap::new();
            for n in &nodes {
                let model = n.primary_model();
                let k = *seen.entry(model).or_insert_with(|| {
                    models_ok.push(fgd::models_ok(types, model));
                    models_ok.len() as u32 - 1
                });
                node_models_ok.push(k);
            }
        }
        Scheduler {
            models_ok,
            node_models_ok,
            zone_pref: HashMap::new(),
            zone_only: None,
            pinned_pressure,
            cpu_per_gpu,
            share_plan,
            pacing,
            gangs: HashMap::new(),
            held: Vec::new(),
            protected: Vec::new(),
            draining: None,
            domain_table: Default::default(),
            #[cfg(test)]
            scan_all_for_victims: false,
            #[cfg(test)]
            place_gangs_tentatively: false,
            ends: BTreeSet::new(),
            now: None,
            reservations: Vec::new(),
            reserved_from: HashMap::new(),
            rng: std::cell::Cell::new(rng::SplitMix64::new(cfg.seed)),
            victims: preempt::Victims::default(),
            lazy_explain: false,
            preempt_cursor: 0,
            running: BTreeMap::new(),
            running_at: HashMap::new(),
            totals: pool_totals(&nodes),
            cfg,
            nodes,
            index,
            pos,
        }
    }

    /// Soft zone preferences by job: a task of such a job is placed in its zone when some
    /// node there fits, else wherever it fits.
    pub(crate) fn set_zone_preferences(&mut self, prefs: HashMap<JobId, String>) {
        self.zone_pref = prefs;
    }

    /// Holds room for jobs that preempted for it (see `Hold`) through the next `schedule`
    /// call: counted as used until the holder's turn, or the turn of work of a higher
    /// priority class. A hold whose room is no longer free (the node is gone or not ready,
    /// or something else took it) is dropped.
    pub(crate) fn hold(&mut self, holds: impl IntoIterator<Item = Hold>) {
        for h in holds {
            let Some(&i) = self.pos.get(&h.node) else {
                continue;
            };
            if self.nodes[i].can_take(&h.resources, &h.devices) {
                self.allocate(i, &h.resources, &h.devices);
                self.held.push((h, i));
            }
        }
    }

    /// Jobs that have waited too long (the caller's threshold), oldest first, for the next
    /// `schedule` call. The first of them still pending (not spot) gets the cycle's
    /// reservation ahead of the head-of-line job: when the max runtimes of running work
    /// tell when it could start, an EASY reservation that work ending before then may
    /// backfill (inside one domain for a job held to one); otherwise, for a job not held to
    /// a domain, nodes are drained for it: from the start
    /// of the cycle no other job may start on them, so they empty as their tasks end and
    /// the job starts once they have (Slurm's reservation for the top job without known
    /// end times). Without it a large gang waits as long as smaller work keeps taking each
    /// freed slot first. One job at a time, so little capacity idles.
    pub(crate) fn protect(&mut self, jobs: Vec<JobId>) {
        self.protected = jobs;
    }

    /// Nodes to drain for `job`: those that can hold it when empty, the most room now first,
    /// then the least in use, until they hold every pending task.
    fn drain_for(&self, job: &JobReq) -> Option<BTreeSet<usize>> {
        let r = &job.resources;
        let need = job.pending.len() as u64;
        let mut cands: Vec<(std::cmp::Reverse<u64>, u64, usize, u64)> = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.ready {
                continue;
            }
            let mut empty = n.clone();
            empty.used_cpu_milli = 0;
            empty.used_memory_bytes = 0;
            empty.used_devices.clear();
            empty.shared.clear();
            let cap = empty.room_for(r);
            if cap == 0 {
                continue;
            }
            let busy = (n.used_devices.len() + n.shared.len()) as u64 * 1_000_000
                + n.used_cpu_milli * 1000 / n.capacity.cpu_milli.max(1);
            cands.push((std::cmp::Reverse(n.room_for(r)), busy, i, cap));
        }
        cands.sort_unstable();
        let mut got = 0;
        let mut nodes = BTreeSet::new();
        for (_, _, i, cap) in cands {
            if got >= need {
                break;
            }
            got += cap;
            nodes.insert(i);
        }
        (got >= need).then_some(nodes)
    }

    /// Frees the holds `job` may use: its own and those of lower priority classes. True if
    /// any was freed.
    fn release_holds_for(&mut self, job: &JobReq) -> bool {
        let mut freed = false;
        let mut k = 0;
        while k < self.held.len() {
            let h = &self.held[k].0;
            if h.job == job.id || h.priority.rank() > job.priority.rank() {
                let (h, i) = self.held.swap_remove(k);
                self.nodes[i].release(&h.resources, &h.devices);
                self.touched(i);
                freed = true;
            } else {
                k += 1;
            }
        }
        freed
    }

    fn release_all_holds(&mut self) {
        for (h, i) in std::mem::take(&mut self.held) {
            self.nodes[i].release(&h.resources, &h.devices);
            self.touched(i);
        }
    }

    /// Outside the zone placement is restricted to, if any.
    fn off_zone(&self, i: usize) -> bool {
        self.zone_only
            .as_ref()
            .is_some_and(|z| self.nodes[i].topology.zone != *z)
    }

    pub fn nodes(&self) -> &[NodeSnap] {
        &self.nodes
    }

    pub fn into_nodes(self) -> Vec<NodeSnap> {
        self.nodes
    }

    /// Frees what a finished task held.
    pub fn release(&mut self, node: NodeId, r: &TaskResources, devices: &[u32]) {
        if let Some(&i) = self.pos.get(&node) {
            self.nodes[i].release(r, devices);
            self.touched(i);
        }
    }

    /// Node `i`'s allocation changed: re-key it where the scheduler looks nodes up.
    fn touched(&mut self, i: usize) {
        self.index.update(&self.nodes, i);
        self.victims.set_free(i, free_devices(&self.nodes[i]));
    }

    fn allocate(&mut self, i: usize, r: &TaskResources, devices: &[u32]) {
        self.nodes[i].allocate(r, devices);
        self.touched(i);
    }

    /// The tightest node that fits, through the index; `None` means no ready node fits.
    fn place(&self, r: &TaskResources) -> Option<(usize, Vec<u32>)> {
        self.place_for(r, None, true)
    }

    /// May a job ending at `end` (None: no max runtime) use node `i`? Not a node reserved
    /// for a waiting job, unless it will be gone before the reservation starts.
    fn allowed(&self, i: usize, end: Option<caravel_core::Millis>) -> bool {
        // Called per candidate node; most cycles hold no reservation.
        if self.reserved_from.is_empty() {
            return true;
        }
        match self.reserved_from.get(&i) {
            Some(&at) => end.is_some_and(|e| e <= at),
            None => true,
        }
    }

    fn set_reservations(&mut self, reservations: Vec<Reservation>) {
        self.reservations = reservations;
        self.reserved_from.clear();
        for res in &self.reservations {
            for &i in &res.nodes {
                let at = self.reserved_from.entry(i).or_insert(res.at);
                *at = (*at).min(res.at);
            }
        }
    }

    fn add_reservation(&mut self, res: Reservation) {
        for &i in &res.nodes {
            let at = self.reserved_from.entry(i).or_insert(res.at);
            *at = (*at).min(res.at);
        }
        self.reservations.push(res);
    }

    /// Takes `job`'s reservation out for its turn (room reserved for a job is its own to
    /// use), with where it stood.
    fn lift_reservation(&mut self, job: JobId) -> Option<(usize, Reservation)> {
        let k = self.reservations.iter().position(|r| r.job == job)?;
        let mut all = std::mem::take(&mut self.reservations);
        let res = all.remove(k);
        self.set_reservations(all);
        Some((k, res))
    }

    fn place_for(
        &self,
        r: &TaskResources,
        end: Option<caravel_core::Millis>,
        ignore_reservation: bool,
    ) -> Option<(usize, Vec<u32>)> {
        if let Some(b) = self.cfg.baseline.clone() {
            return self.place_baseline(&*b, r, end, ignore_reservation);
        }
        if let Some(types) = &self.cfg.fgd {
            let cpu_per_gpu = self.cpu_per_gpu;
            // Shares go where the plan prefers first, by fragmentation among those.
            let mut best: Option<(OnPlan, f64, usize, Vec<u32>)> = None;
            let share = r.gpu.as_ref().and_then(|g| g.milli);
            let plan = self.share_plan.as_deref();
            let limit = self.cfg.fgd_max_candidates;
            let all: Box<dyn Iterator<Item = usize>> = if limit == 0 || self.nodes.len() <= limit {
                Box::new(0..self.nodes.len())
            } else {
                self.index.candidates(r)
            };
            let mut scored = 0usize;
            for i in all {
                if limit > 0 && scored >= limit {
                    break;
                }
                if (!ignore_reservation && !self.allowed(i, end)) || self.off_zone(i) {
                    continue;
                }
                let n = &self.nodes[i];
                // `fit`'s verdict, cheapest checks first and without building devices twice:
                // ready, CPU, memory, then some device choice exists.
                if !n.ready
                    || n.capacity.cpu_milli.saturating_sub(n.used_cpu_milli) < r.cpu_milli
                    || n.capacity.memory_bytes.saturating_sub(n.used_memory_bytes) < r.memory_bytes
                {
                    debug_assert!(fit(&self.cfg, n, r).is_err());
                    continue;
                }
                let choices = fgd::device_choices(n, r);
                if choices.is_empty() {
                    debug_assert!(fit(&self.cfg, n, r).is_err());
                    continue;
                }
                debug_assert!(fit(&self.cfg, n, r).is_ok());
                scored += 1;
                for devs in choices {
                    let mut d = fgd::score(
                        n,
                        r,
                        &devs,
                        types,
                        self.models_ok(i),
                        cpu_per_gpu,
                        self.cfg.fgd_cpu_weight,
                    );
                    if self.cfg.fgd_pin_weight != 0.0 {
                        if let Some(g) = &r.gpu {
                            let take = g.milli.unwrap_or(1000) as f64 * devs.len() as f64;
                            let model = devs.first().and_then(|d| n.model_of(*d)).unwrap_or("");
                            d += self.cfg.fgd_pin_weight
                                * take
                                * self.pinned_pressure.get(model).copied().unwrap_or(0.0);
                        }
                    }
                    let class = match (share, plan) {
                        (Some(m), Some(p)) => {
                            let u = n.shared.get(&devs[0]).copied().unwrap_or(0);
                            if u > 0 && p.on_plan(u) && p.on_plan(u + m) {
                                OnPlan::Joins
                            } else if u == 0 && p.on_plan(m) {
                                OnPlan::Opens
                            } else {
                                OnPlan::Off
                            }
                        }
                        _ => OnPlan::Joins,
                    };
                    if best.as_ref().is_none_or(|b| (class, d) < (b.0, b.1)) {
                        best = Some((class, d, i, devs));
                    }
                }
            }
            return best.map(|(_, _, i, d)| (i, d));
        }
        for i in self.index.candidates(r) {
            if (!ignore_reservation && !self.allowed(i, end)) || self.off_zone(i) {
                continue;
            }
            if let Ok((_, devs)) = fit(&self.cfg, &self.nodes[i], r) {
                return Some((i, devs));
            }
        }
        None
    }

    /// `Config::share_pacing`: counts a share of a paced size and says whether to turn it
    /// away rather than open the fresh GPU `devs` on node `i`.
    fn pace(&mut self, r: &TaskResources, i: usize, devs: &[u32]) -> Option<PendingReason> {
        let share = r.gpu.as_ref()?.milli?;
        let rate = *self.share_plan.as_ref()?.turn_away.get(&share)?;
        let pacing = self.pacing.as_mut()?;
        let seen = pacing.seen.entry(share).or_insert(0);
        *seen += 1;
        let owed = pacing.factor * rate * *seen as f64;
        let turned = pacing.turned.get(&share).copied().unwrap_or(0);
        let fresh = devs
            .first()
            .is_some_and(|d| !self.nodes[i].shared.contains_key(d));
        if !fresh || turned as f64 >= owed || !gpus_scarcer_than_cpu(&self.nodes) {
            return None;
        }
        let pacing = self.pacing.as_mut()?;
        pacing.turned.insert(share, turned + 1);
        let mut counts = BTreeMap::new();
        counts.insert("share_milli".to_string(), share as u64);
        counts.insert("turned_away".to_string(), turned + 1);
        counts.insert("seen".to_string(), pacing.seen[&share]);
        Some(PendingReason {
            code: ReasonCode::Paced,
            unexplained: false,
            message: format!(
                "a {share}-thousandth GPU share would open a fresh GPU and leave the rest of it to \
                 shares the workload rarely asks for; the share plan turns away {:.1}% of these \
                 while GPUs are the pool's scarce resource",
                pacing.factor * rate * 100.0
            ),
            counts,
        })
    }

    /// Which workload types accept node `i`'s GPU model (FGD placement only).
    fn models_ok(&self, i: usize) -> &[bool] {
        &self.models_ok[self.node_models_ok[i] as usize]
    }

    /// Uniform in 0..n (n > 0) from the scheduler's seeded generator.
    fn below(&self, n: u64) -> u64 {
        let mut g = self.rng.get();
        let x = g.next_u64();
        self.rng.set(g);
        ((x as u128 * n as u128) >> 64) as u64
    }

    /// A baseline policy: every feasible node scored, the best kept.
    fn place_baseline(
        &self,
        b: &dyn baseline::Baseline,
        r: &TaskResources,
        end: Option<caravel_core::Millis>,
        ignore_reservation: bool,
    ) -> Option<(usize, Vec<u32>)> {
        use baseline::{Req, ShareDevice, View};
        let q = Req::of(r);
        let empty = Vec::new();
        let types = self.cfg.fgd.as_deref().unwrap_or(&empty);
        let uniform = b.uniform();
        let mut best: Option<(i64, usize, Vec<u32>)> = None;
        let mut ties = 0u64;
        for i in 0..self.nodes.len() {
            if (!ignore_reservation && !self.allowed(i, end)) || self.off_zone(i) {
                continue;
            }
            let n = &self.nodes[i];
            let Ok((_, whole)) = fit(&self.cfg, n, r) else {
                continue;
            };
            let v = View::of(n);
            let (score, devs) = b.score(n, &v, &q, types, &whole);
            // A uniform policy scores every node alike: a uniform pick among the feasible.
            // The others keep the first best node in node order (the artefact's node names
            // carry a seeded random prefix, so its order is a seeded permutation; the
            // simulator shuffles the nodes by seed the same way).
            ties += 1;
            let replace = match &best {
                None => true,
                Some(_) if uniform => self.below(ties) == 0,
                Some(best) => score > best.0,
            };
            if replace {
                best = Some((score, i, devs));
            }
        }
        let (_, i, devs) = best?;
        if q.count == 1 && q.milli < 1000 {
            let v = View::of(&self.nodes[i]);
            match b.share_device(&v, &q, &mut |n| self.below(n)) {
                ShareDevice::Scored => {}
                ShareDevice::Pick(dev) => return Some((i, vec![dev])),
                ShareDevice::NoRoom => return None,
            }
        }
        Some((i, devs))
    }

    /// A job that cannot start gets a reservation (if the max runtimes of what runs tell
    /// when it could) while fewer than `Config::reservations` are held; any other job kept
    /// out says which reservation holds the room.
    fn reserve_or_hold(&mut self, job: &JobReq, reasons: &mut Vec<PendingReason>) {
        let Some(now) = self.now else { return };
        if let Some(n) = self.draining {
            // Nodes are being drained for this job (its reservation is lifted for its turn).
            reasons.push(draining_reason(n));
            return;
        }
        if job.priority != Priority::Spot && self.reservations.len() < self.cfg.reservations.max(1)
        {
            if let Some(res) = self.reserve(job, now) {
                reasons.push(reserved_reason(&res, now));
                self.add_reservation(res);
                return;
            }
        }
        // With several, the earliest one holding room this job would fit in (the first
        // otherwise).
        let holder = match self.reservations.len() {
            0 | 1 => self.reservations.first(),
            _ => self
                .place(&job.resources)
                .and_then(|(i, _)| {
                    self.reservations
                        .iter()
                        .filter(|r| r.nodes.contains(&i))
                        .min_by_key(|r| r.at)
                })
                .or(self.reservations.first()),
        };
        match holder {
            Some(res) if res.drained => {
                let mut counts = BTreeMap::new();
                counts.insert("nodes".to_string(), res.nodes.len() as u64);
                counts.insert("reserved_for_job".to_string(), res.job.0);
                reasons.push(PendingReason {
                    code: ReasonCode::Backfill,
                    unexplained: false,
                    message: format!(
                        "room that fits is on nodes drained for job {}, which waited past the starvation limit",
                        res.job
                    ),
                    counts,
                });
            }
            Some(res) => {
                let mut counts = BTreeMap::new();
                counts.insert("reserved_for_job".to_string(), res.job.0);
                counts.insert("starts_in_ms".to_string(), (res.at - now).max(0) as u64);
                if self.reservations.len() > 1 {
                    counts.insert("reservations".to_string(), self.reservations.len() as u64);
                }
                reasons.push(PendingReason {
                    code: ReasonCode::Backfill,
                    unexplained: false,
                    message: format!(
                        "held for the reservation of job {} (starts in {}s{}); only jobs whose max runtime ends before then may use that room",
                        res.job,
                        (res.at - now).max(0) / 1000,
                        match self.reservations.len() {
                            1 => String::new(),
                            n => format!("; {n} jobs hold reservations"),
                        }
                    ),
                    counts,
                });
            }
            None => {}
        }
    }

    /// Why a job that holds the cycle's reservation (lifted for its turn) still waits.
    fn own_reservation_reason(&self, res: &Reservation) -> PendingReason {
        if res.drained {
            draining_reason(res.nodes.len())
        } else {
            reserved_reason(res, self.now.unwrap_or(res.at))
        }
    }

    /// Why nothing fits: a full scan, done once per request shape per cycle.
    fn explain(&self, r: &TaskResources) -> BTreeMap<Lack, u64> {
        if self.lazy_explain {
            // Filled in by `fill_explanations` for the jobs that stay pending.
            return BTreeMap::new();
        }
        select(&self.cfg, &self.nodes, r).err().unwrap_or_default()
    }

    /// How many tasks of `r` node `i` could take now.
    fn room(&self, i: usize, r: &TaskResources) -> u64 {
        self.nodes[i].room_for(r)
    }

    /// The pool's domains at `level` (built on first use).
    fn domain_table(&self, level: TopologyLevel) -> &Domains {
        let k = match level {
            TopologyLevel::Node => 0,
            TopologyLevel::Rack => 1,
            TopologyLevel::Zone => 2,
        };
        self.domain_table[k].get_or_init(|| Domains::build(&self.nodes, level))
    }

    /// The ready nodes grouped by topology domain at `level`, in domain order.
    fn domains(&self, level: TopologyLevel) -> &[Vec<usize>] {
        &self.domain_table(level).ready
    }

    /// Places a whole gang inside one topology domain: the domains whose room adds up to
    /// the gang are tried smallest first (best fit at the domain level), so large domains
    /// stay whole for larger gangs.
    #[allow(clippy::type_complexity)]
    fn place_gang_in_domain(
        &mut self,
        job: &JobReq,
        level: TopologyLevel,
        end: Option<caravel_core::Millis>,
    ) -> Result<Vec<(usize, Vec<u32>, u32)>, PendingReason> {
        let need = job.pending.len() as u64;
        let of = &self.domain_table(level).of;
        let mut domains: BTreeMap<u32, (u64, Vec<usize>)> = BTreeMap::new();
        // Only nodes with room count, and the index names them (ascending, as a scan of
        // every node would visit them): a gang per cycle no longer walks the whole pool.
        for i in self.index.with_room(&job.resources) {
            let room = self.room(i, &job.resources);
            if room == 0 || !self.allowed(i, end) {
                continue;
            }
            let e = domains.entry(of[i]).or_default();
            e.0 += room;
            e.1.push(i);
        }
        let best_room = domains.values().map(|d| d.0).max().unwrap_or(0);
        // An elastic gang takes any domain that holds its minimum, the roomiest first (it
        // wants as many ranks as it can get); a fixed one the tightest that holds it all.
        let least = job.min_tasks.map_or(need, |m| u64::from(m).min(need));
        let mut fitting: Vec<(u64, Vec<usize>)> =
            domains.into_values().filter(|d| d.0 >= least).collect();
        // Stable sort: equal rooms keep the domain key order, so the choice is deterministic.
        if job.min_tasks.is_some() {
            fitting.sort_by_key(|d| std::cmp::Reverse(d.0));
        } else {
            fitting.sort_by_key(|d| d.0);
        }
        for (room, members) in fitting {
            let mut placed = Vec::new();
            let mut ok = true;
            let take = room.min(need) as usize;
            for &idx in &job.pending[..take] {
                // Tightest node of the domain first.
                let mut best: Option<(u64, usize, Vec<u32>)> = None;
                for &i in &members {
                    if let Ok((score, devs)) = fit(&self.cfg, &self.nodes[i], &job.resources) {
                        if best.as_ref().is_none_or(|b| score < b.0) {
                            best = Some((score, i, devs));
                        }
                    }
                }
                match best {
                    Some((_, i, devs)) => {
                        self.allocate(i, &job.resources, &devs);
                        placed.push((i, devs, idx));
                    }
                    None => {
                        ok = placed.len() as u64 >= least;
                        break;
                    }
                }
            }
            if ok {
                return Ok(placed);
            }
            for (i, devs, _) in placed {
                self.nodes[i].release(&job.resources, &devs);
                self.touched(i);
            }
        }
        let mut counts = BTreeMap::new();
        counts.insert("need".to_string(), need);
        counts.insert(format!("largest {}", level.as_str()), best_room);
        Err(PendingReason {
            code: ReasonCode::Topology,
            unexplained: false,
            message: format!(
                "gang: no {lvl} has room for all {need} tasks together (the roomiest {lvl} fits {best_room})",
                lvl = level.as_str()
            ),
            counts,
        })
    }

    /// Places a whole gang or nothing. On failure returns the reason and whether the
    /// request shape fits nowhere at all (so later jobs of that shape can skip the search).
    #[allow(clippy::type_complexity)]
    fn place_gang(
        &mut self,
        job: &JobReq,
        end: Option<caravel_core::Millis>,
    ) -> Result<Vec<(usize, Vec<u32>, u32)>, Box<(PendingReason, Option<PendingReason>)>> {
        if let Some(level) = job.topology {
            return self
                .place_gang_in_domain(job, level, end)
                .map_err(|r| Box::new((r, None)));
        }
        let need = job.pending.len();
        // Remembered as not fitting this cycle only if no member fits even in reserved
        // room: a later gang of this shape may end before the reservation and backfill.
        let failed = |lacks: &BTreeMap<Lack, u64>, placed: usize, total: usize, nowhere: bool| {
            let mut r = no_fit_reason(lacks, total);
            let cache = (placed == 0 && nowhere).then(|| r.clone());
            r.message = format!(
                "gang: only {placed} of {need} tasks fit together; {}",
                r.message
            );
            r.code = ReasonCode::Gang;
            r.counts.insert("fit".into(), placed as u64);
            r.counts.insert("need".into(), need as u64);
            Box::new((r, cache))
        };
        // A gang the pool cannot hold is told apart without placing members tentatively,
        // which costs two index updates a member: identical tasks fit on each node
        // independently of where the others went, so the nodes' rooms add up to how many
        // the greedy placement below would place. With reasons wanted, only when no member
        // fits: otherwise the counts must describe the pool with the members held. Not for
        // Random: each tentative member draws from its generator, and skipping the draws
        // would change every later pick.
        let count_first = self.cfg.baseline.as_ref().is_none_or(|b| !b.uniform());
        #[cfg(test)]
        let count_first = count_first && !self.place_gangs_tentatively;
        // An elastic gang is placed with as many members as fit, if at least its minimum.
        let least = job.min_tasks.map_or(need, |m| (m as usize).min(need));
        let mut take = need;
        if count_first {
            let room = self.gang_room(&job.resources, end, need as u64);
            if room < least as u64 && (room == 0 || !self.cfg.explain_pending) {
                let lacks = self.lacks_if_explained(&job.resources);
                let nowhere = room == 0 && !self.fits_in_reserved_room(&job.resources);
                return Err(failed(&lacks, room as usize, self.nodes.len(), nowhere));
            }
            if job.min_tasks.is_some() {
                take = (room as usize).clamp(least, need);
            }
        }
        let mut tentative: Vec<(usize, Vec<u32>, u32)> = Vec::new();
        for &idx in &job.pending[..take] {
            match self.place_for(&job.resources, end, false) {
                Some((ni, devs)) => {
                    self.allocate(ni, &job.resources, &devs);
                    tentative.push((ni, devs, idx));
                }
                None if tentative.len() >= least => break,
                None => {
                    // Counted now, while the members placed so far are still held: the
                    // reason must describe the pool the last member saw.
                    let lacks = self.lacks_if_explained(&job.resources);
                    let placed = tentative.len();
                    for (ni, devs, _) in tentative {
                        self.nodes[ni].release(&job.resources, &devs);
                        self.touched(ni);
                    }
                    let nowhere = placed == 0 && !self.fits_in_reserved_room(&job.resources);
                    return Err(failed(&lacks, placed, self.nodes.len(), nowhere));
                }
            }
        }
        Ok(tentative)
    }

    /// Why no node fits `r`, counted per node: a full scan, so only when reasons are
    /// wanted (the simulator does not read them).
    fn lacks_if_explained(&self, r: &TaskResources) -> BTreeMap<Lack, u64> {
        if self.cfg.explain_pending {
            select(&self.cfg, &self.nodes, r).err().unwrap_or_default()
        } else {
            BTreeMap::new()
        }
    }

    /// Does `r` fit somewhere, given that it did not fit outside the reservation?
    fn fits_in_reserved_room(&self, r: &TaskResources) -> bool {
        !self.reservations.is_empty() && self.place(r).is_some()
    }

    /// How many tasks of `r` the nodes a placement may use hold together, counted up to
    /// `need`.
    fn gang_room(&self, r: &TaskResources, end: Option<caravel_core::Millis>, need: u64) -> u64 {
        let mut room = 0;
        for i in self.index.candidates(r) {
            if !self.allowed(i, end) || self.off_zone(i) {
                continue;
            }
            room += self.room(i, r);
            if room >= need {
                break;
            }
        }
        room
    }

    /// Tells the scheduler which tasks run now (their resources must already be counted as
    /// used on their nodes), so that `schedule_preempting` can choose victims.
    pub fn set_running(&mut self, running: Vec<RunningTask>) {
        self.running.clear();
        self.running_at.clear();
        self.ends.clear();
        self.victims = preempt::Victims::default();
        self.gangs.clear();
        for r in running {
            if let Some(&i) = self.pos.get(&r.node) {
                self.victims.add(&r, i, 1);
                self.running_at.insert(r.run, i);
                if r.gang_size > 1 {
                    self.gangs.entry(r.job).or_default().push(r.run);
                }
                if let Some(e) = r.expected_end_ms {
                    self.ends.insert((e, i, r.run));
                }
                self.running.entry(i).or_default().push(r);
            }
        }
        for v in self.running.values_mut() {
            preempt::sort_victims(v);
        }
        for (i, n) in self.nodes.iter().enumerate() {
            self.victims.set_free(i, free_devices(n));
        }
    }

    /// A task the caller started from a plan's placement (its resources are already counted
    /// on its node): known from now on as a possible victim and, with an expected end, to
    /// reservations. Incremental `set_running` for callers that keep one scheduler alive.
    pub fn add_running(&mut self, t: RunningTask) {
        let Some(&i) = self.pos.get(&t.node) else {
            return;
        };
        self.running_at.insert(t.run, i);
        if let Some(e) = t.expected_end_ms {
            self.ends.insert((e, i, t.run));
        }
        if t.gang_size > 1 {
            self.gangs.entry(t.job).or_default().push(t.run);
        }
        self.victims.add(&t, i, 1);
        self.victims.set_free(i, free_devices(&self.nodes[i]));
        let list = self.running.entry(i).or_default();
        list.push(t);
        preempt::sort_victims(list);
    }

    /// A task stopped (say, a victim exited): forget it and free what it held.
    pub fn remove_running(&mut self, run: caravel_core::RunId) -> Option<RunningTask> {
        let i = self.running_at.remove(&run)?;
        let list = self.running.get_mut(&i)?;
        let k = list.iter().position(|t| t.run == run)?;
        let t = list.remove(k);
        self.victims.add(&t, i, -1);
        if let Some(g) = self.gangs.get_mut(&t.job) {
            g.retain(|r| *r != run);
            if g.is_empty() {
                self.gangs.remove(&t.job);
            }
        }
        if let Some(e) = t.expected_end_ms {
            self.ends.remove(&(e, i, t.run));
        }
        if list.is_empty() {
            self.running.remove(&i);
        }
        self.nodes[i].release(&t.resources, &t.devices);
        self.touched(i);
        Some(t)
    }

    /// One scheduling cycle from everything it takes, given at once (see `CycleInput`):
    /// the entry the server and the simulator both use.
    pub fn cycle(&mut self, input: CycleInput<'_>) -> Plan {
        let CycleInput {
            now,
            jobs,
            tenants,
            running,
            holds,
            starving,
            zone_preferences,
        } = input;
        if let Some(running) = running {
            self.set_running(running);
        }
        self.set_zone_preferences(zone_preferences);
        self.hold(holds);
        self.protect(starving);
        self.schedule_preempting(now, tenants, jobs)
    }

    /// `set_running(running)` then `schedule_preempting`.
    #[cfg(test)]
    pub(crate) fn schedule_with(
        &mut self,
        now: caravel_core::Millis,
        running: &[RunningTask],
        tenants: &mut HashMap<TenantId, TenantSnap>,
        jobs: &[JobReq],
    ) -> Plan {
        self.set_running(running.to_vec());
        self.schedule_preempting(now, tenants, jobs)
    }

    /// A scheduling cycle that may also preempt: after placing what fits, each job still
    /// blocked by lack of room is checked for victims among `running` (see `preempt`). The
    /// victims are only named in the plan; the job stays pending until they have exited.
    pub fn schedule_preempting(
        &mut self,
        now: caravel_core::Millis,
        tenants: &mut HashMap<TenantId, TenantSnap>,
        jobs: &[JobReq],
    ) -> Plan {
        self.lazy_explain = true;
        self.now = Some(now);
        self.set_reservations(Vec::new());
        let mut plan = self.schedule(tenants, jobs);
        self.lazy_explain = false;
        self.now = None;
        plan.reservations = self
            .reservations
            .iter()
            .map(|r| {
                (
                    r.job,
                    r.at,
                    r.nodes.iter().map(|i| self.nodes[*i].id).collect(),
                )
            })
            .collect();
        if self.running.is_empty() || plan.pending.is_empty() {
            self.fill_explanations(&mut plan, jobs);
            return plan;
        }
        let placed: HashMap<JobId, usize> =
            plan.placements.iter().fold(HashMap::new(), |mut m, p| {
                *m.entry(p.job).or_default() += 1;
                m
            });
        let mut pass = preempt::Pass::new(
            &self.nodes,
            &self.running,
            now,
            self.preempt_cursor,
            &self.victims,
        )
        .with_gangs(&self.gangs, &self.running_at)
        .with_las(self.cfg.las.as_ref());
        #[cfg(test)]
        let indexed = !self.scan_all_for_victims;
        #[cfg(not(test))]
        let indexed = true;
        if indexed {
            pass = pass.with_index(&self.index);
        }
        let mut order: Vec<&JobReq> = jobs
            .iter()
            .filter(|j| j.priority != Priority::Spot)
            .filter(|j| {
                plan.pending
                    .get(&j.id)
                    .is_some_and(|r| r.iter().any(|r| r.code.is_about_room()))
            })
            .collect();
        order.sort_by_key(|j| queue_order(self.cfg.las.as_ref(), j));
        let mut promised: HashMap<TenantId, TenantSnap> = HashMap::new();
        #[allow(clippy::type_complexity)]
        let mut hopeless: ShapeMemo<
            (u8, TenantId, usize, Option<u8>, bool, Option<TopologyLevel>),
            String,
        > = ShapeMemo::default();
        let mut cursor = self.preempt_cursor;
        for job in order {
            let t = promised
                .entry(job.tenant)
                .or_insert_with(|| tenants.get(&job.tenant).cloned().unwrap_or_default());
            let remaining = job.pending.len() - placed.get(&job.id).copied().unwrap_or(0);
            let mut victims = Vec::new();
            let mut why = None;
            let at_cap = plan.pending[&job.id]
                .iter()
                .any(|r| r.code == ReasonCode::Quota);
            let domain = job.topology.filter(|_| job.gang);
            let key = (
                job.priority.rank(),
                job.tenant,
                if job.gang { job.pending.len() } else { 1 },
                self.cfg.las.as_ref().map(|l| l.level(job.attained_gpu_ms)),
                at_cap,
                job.topology,
            );
            if let Some(w) = hopeless.get(&job.resources, key) {
                why = Some(w.clone());
            } else if at_cap {
                // Within a tenant at its cap, higher priority displaces its own lower
                // priority work (a topology gang: as long as it then fits in one domain).
                let times = if job.gang {
                    job.pending.len() as u64
                } else {
                    remaining as u64
                };
                let within = domain.map(|level| self.domains(level));
                match pass.try_own(job, t, times, within) {
                    Ok(v) => {
                        t.used.add_task(&job.resources, times);
                        victims = v;
                    }
                    Err(e) => why = Some(e),
                }
            } else if let Some(level) = domain {
                let domains = self.domains(level);
                match pass.try_job_in_domain(job, t, domains, level.as_str()) {
                    Ok(v) => {
                        t.used.add_task(&job.resources, job.pending.len() as u64);
                        victims = v;
                    }
                    Err(e) => why = Some(e),
                }
            } else if job.gang {
                match pass.try_job(job, t) {
                    Ok(v) => {
                        t.used.add_task(&job.resources, job.pending.len() as u64);
                        victims = v;
                    }
                    Err(e) => why = Some(e),
                }
            } else {
                let one = JobReq {
                    pending: vec![0],
                    ..job.clone()
                };
                for _ in 0..remaining {
                    match pass.try_job(&one, t) {
                        Ok(v) => {
                            t.used.add_task(&job.resources, 1);
                            victims.extend(v);
                        }
                        Err(e) => {
                            why = Some(e);
                            break;
                        }
                    }
                }
            }
            // A search that found no victims finds none for the same ask later in the
            // pass, unless a preemption frees room (a gang victim's mates): long queues of
            // one shape then cost one scan of the busy nodes, not one per job.
            if !victims.is_empty() {
                hopeless.clear();
            } else if let Some(w) = &why {
                hopeless.insert(&job.resources, key, w.clone());
            }
            let reasons = plan.pending.entry(job.id).or_default();
            if !victims.is_empty() {
                let mut counts = BTreeMap::new();
                counts.insert("victims".to_string(), victims.len() as u64);
                reasons.insert(
                    0,
                    PendingReason {
                        code: ReasonCode::Preempting,
                        unexplained: false,
                        message: format!(
                            "preempting {} running task{} to make room",
                            victims.len(),
                            if victims.len() == 1 { "" } else { "s" }
                        ),
                        counts,
                    },
                );
                plan.preemptions
                    .extend(victims.into_iter().map(|run| Preemption {
                        run,
                        for_job: job.id,
                    }));
                if let Some(c) = pass.last_node() {
                    cursor = c + 1;
                }
            } else if let Some(w) = why.filter(|_| self.cfg.explain_pending) {
                reasons.push(PendingReason {
                    code: ReasonCode::NoPreemption,
                    unexplained: false,
                    message: format!("cannot preempt: {w}"),
                    counts: BTreeMap::new(),
                });
            }
        }
        drop(pass);
        self.preempt_cursor = cursor;
        self.fill_explanations(&mut plan, jobs);
        plan
    }

    /// Adds the per-node counts to no-fit reasons left bare by `lazy_explain`.
    fn fill_explanations(&self, plan: &mut Plan, jobs: &[JobReq]) {
        if !self.cfg.explain_pending {
            return;
        }
        let total = self.nodes.len();
        // Jobs of one shape get the same counts: one scan per shape, not per job.
        let mut memo: ShapeMemo<(), PendingReason> = ShapeMemo::default();
        for j in jobs {
            let Some(reasons) = plan.pending.get_mut(&j.id) else {
                continue;
            };
            for r in reasons.iter_mut() {
                if !r.unexplained {
                    continue;
                }
                r.unexplained = false;
                let full = memo
                    .get_or_insert_with(&j.resources, (), || {
                        no_fit_reason(&self.explain(&j.resources), total)
                    })
                    .clone();
                r.message = format!(
                    "{}{}",
                    r.message.trim_end_matches("no node fits: "),
                    full.message
                );
                for (k, v) in full.counts {
                    r.counts.insert(k, v);
                }
            }
        }
    }

    /// Runs one scheduling cycle and updates the nodes and `tenants` to reflect the
    /// placements it made.
    pub fn schedule(
        &mut self,
        tenants: &mut HashMap<TenantId, TenantSnap>,
        jobs: &[JobReq],
    ) -> Plan {
        let mut plan = Plan::default();
        let mut unfit: ShapeMemo<(), PendingReason> = ShapeMemo::default();
        let total_nodes = self.nodes.len();
        // What each tenant that places anything held before its first placement of the
        // cycle (copied then: a pool has many tenants and most place nothing).
        let mut used_before: HashMap<TenantId, ResourceSum> = HashMap::new();

        // Each tenant's queue in priority then FIFO order, the jobs its guarantee covers
        // first; tenants take turns by weighted dominant share (progressive filling: one
        // task, or one whole gang, per turn).
        let mut queues: BTreeMap<TenantId, TenantQueue> = BTreeMap::new();
        let mut sorted: Vec<&JobReq> = jobs.iter().filter(|j| !j.pending.is_empty()).collect();
        if !self.held.is_empty() {
            // Room held for a job not offered this cycle (done, cancelled) is free now.
            let offered: BTreeSet<JobId> = sorted.iter().map(|j| j.id).collect();
            let (keep, drop): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
                .into_iter()
                .partition(|(h, _)| offered.contains(&h.job));
            self.held = drop;
            self.release_all_holds();
            self.held = keep;
        }
        let las = self.cfg.las.clone();
        sorted.sort_by_key(|j| queue_order(las.as_ref(), j));
        for j in sorted {
            let t = tenants.entry(j.tenant).or_default();
            let q = queues.entry(j.tenant).or_default();
            let key = queue_order(las.as_ref(), j);
            if covered(t, j) {
                q.within.push_back((key, j, 0));
            } else {
                q.rest.insert(key, (j, 0));
            }
        }
        let key = |s: &Scheduler, t: &TenantSnap, head: &JobReq, tid: TenantId| {
            let share = fair::dominant_share(&t.used, &t.history, &s.totals, t.weight);
            let n = if head.gang {
                head.pending.len() as u64
            } else {
                1
            };
            // Work within the tenant's guarantee goes first, spot last.
            let bucket = if head.priority == Priority::Spot {
                2u8
            } else if preempt::within_guarantee(&t.guarantee, &t.used, &head.resources, n) {
                0
            } else {
                1
            };
            let (rank, level, seq, id) = queue_order(s.cfg.las.as_ref(), head);
            (bucket, fair::share_key(share), rank, level, seq, id, tid)
        };
        // The longest-waiting protected job gets this cycle's reservation (see `protect`):
        // when the max runtimes of what runs tell when it could start, an EASY reservation
        // (work that ends before then still backfills); otherwise nodes are drained. A job
        // held to a topology domain is protected only by a reservation (draining picks
        // nodes across domains), so without one the next protected job gets the turn.
        for id in self.protected.clone() {
            let Some(j) = jobs
                .iter()
                .find(|j| j.id == id && !j.pending.is_empty() && j.priority != Priority::Spot)
            else {
                continue;
            };
            let now = self.now.unwrap_or(0);
            let res = self.now.and_then(|now| self.reserve(j, now)).or_else(|| {
                j.topology
                    .is_none()
                    .then(|| self.drain_for(j))
                    .flatten()
                    .map(|nodes| Reservation {
                        job: j.id,
                        at: now,
                        until: None,
                        nodes,
                        drained: true,
                    })
            });
            if res.is_some() || j.topology.is_none() {
                if let Some(res) = res {
                    self.set_reservations(vec![res]);
                }
                break;
            }
        }
        let mut turns = BTreeSet::new();
        for (tid, q) in queues.iter_mut() {
            let t = tenants.entry(*tid).or_default();
            q.settle(t);
            if let Some((head, _)) = q.front() {
                turns.insert(key(self, t, head, *tid));
            }
        }

        while let Some(turn) = turns.pop_first() {
            let tid = turn.6;
            let (job, k) = queues[&tid].front().expect("a tenant with a turn has work");
            if !self.held.is_empty() && self.release_holds_for(job) {
                // Shapes found not to fit may fit in the freed room.
                unfit.clear();
            }
            let tenant = tenants.entry(tid).or_default();
            let end = self
                .now
                .and_then(|n| job.max_runtime_ms.map(|m| n + m as i64));
            // Does this job stay at the head of its tenant's queue for another turn?
            let mut again = false;
            let times = if job.gang {
                job.pending.len() as u64
            } else {
                1
            };
            // A job that accepts several GPU models may use those its quota still allows.
            let view = match quota_view(tenant, &job.resources, times) {
                Ok(v) => v,
                Err(e) => {
                    plan.pending.insert(job.id, vec![quota_reason(&e)]);
                    let q = queues.get_mut(&tid).expect("queued tenant");
                    q.pop_front();
                    let t = &tenants[&tid];
                    q.settle(t);
                    if let Some((head, _)) = q.front() {
                        turns.insert(key(self, t, head, tid));
                    }
                    continue;
                }
            };
            let owned;
            let job: &JobReq = match view {
                Some(resources) => {
                    owned = JobReq {
                        resources,
                        ..job.clone()
                    };
                    &owned
                }
                None => job,
            };
            // Room reserved for this job is its own to use.
            let lifted = if self.reservations.is_empty() {
                None
            } else {
                self.lift_reservation(job.id)
            };
            self.draining = lifted
                .as_ref()
                .filter(|(_, r)| r.drained)
                .map(|(_, r)| r.nodes.len());
            if let Some(r) = unfit.get(&job.resources, ()) {
                // Known not to fit; if the job holds the reservation, it still says so.
                let mut reasons = vec![r.clone()];
                reasons.extend(
                    lifted
                        .as_ref()
                        .map(|(_, res)| self.own_reservation_reason(res)),
                );
                // It may still be owed a reservation of its own: its shape failing says
                // nothing about when this job (another gang size, another priority) could
                // start.
                if lifted.is_none() && self.reservations.len() < self.cfg.reservations.max(1) {
                    self.reserve_or_hold(job, &mut reasons);
                }
                plan.pending.insert(job.id, reasons);
            } else if job.gang {
                match self.place_gang(job, end) {
                    Ok(placed) => {
                        if !preempt::no_guarantee(&tenant.guarantee) {
                            used_before
                                .entry(job.tenant)
                                .or_insert_with(|| tenant.used.clone());
                        }
                        for (ni, devs, _) in &placed {
                            let model = devs.first().and_then(|d| self.nodes[*ni].model_of(*d));
                            tenant.used.add_task_on(&job.resources, model, 1);
                        }
                        for (ni, devs, idx) in placed {
                            plan.placements.push(Placement {
                                job: job.id,
                                index: idx,
                                node: self.nodes[ni].id,
                                devices: devs,
                                borrowed: false,
                            });
                        }
                    }
                    Err(e) => {
                        let (r, cache) = *e;
                        if let Some(c) = cache {
                            unfit.insert(&job.resources, (), c);
                        }
                        let mut reasons = vec![r];
                        self.reserve_or_hold(job, &mut reasons);
                        plan.pending.insert(job.id, reasons);
                    }
                }
            } else {
                let preferred = self.zone_pref.get(&job.id).cloned().and_then(|z| {
                    self.zone_only = Some(z);
                    let p = self.place_for(&job.resources, end, false);
                    self.zone_only = None;
                    p
                });
                let placed = preferred.or_else(|| self.place_for(&job.resources, end, false));
                let paced = placed
                    .as_ref()
                    .and_then(|(ni, devs)| self.pace(&job.resources, *ni, devs));
                match placed {
                    Some(_) if paced.is_some() => {
                        plan.pending.insert(job.id, paced.into_iter().collect());
                    }
                    Some((ni, devs)) => {
                        self.allocate(ni, &job.resources, &devs);
                        if !preempt::no_guarantee(&tenant.guarantee) {
                            used_before
                                .entry(job.tenant)
                                .or_insert_with(|| tenant.used.clone());
                        }
                        let model = devs.first().and_then(|d| self.nodes[ni].model_of(*d));
                        tenant.used.add_task_on(&job.resources, model, 1);
                        plan.placements.push(Placement {
                            job: job.id,
                            index: job.pending[k],
                            node: self.nodes[ni].id,
                            devices: devs,
                            borrowed: false,
                        });
                        again = k + 1 < job.pending.len();
                    }
                    None if self.place(&job.resources).is_some() => {
                        // It would fit, but only in room held for the head-of-line job.
                        let mut reasons = Vec::new();
                        self.reserve_or_hold(job, &mut reasons);
                        plan.pending.insert(job.id, reasons);
                    }
                    None => {
                        let mut r = no_fit_reason(&self.explain(&job.resources), total_nodes);
                        unfit.insert(&job.resources, (), r.clone());
                        if k > 0 {
                            r.message = format!(
                                "{} of {} tasks placed; {}",
                                k,
                                job.pending.len(),
                                r.message
                            );
                        }
                        let mut reasons = vec![r];
                        self.reserve_or_hold(job, &mut reasons);
                        plan.pending.insert(job.id, reasons);
                    }
                }
            }
            self.draining = None;
            if let Some((k, res)) = lifted.filter(|_| again || plan.pending.contains_key(&job.id)) {
                // Back where it stood; a reservation made for the job during its turn is
                // superseded by the one it held.
                let mut all = std::mem::take(&mut self.reservations);
                all.retain(|r| r.job != job.id);
                all.insert(k.min(all.len()), res);
                self.set_reservations(all);
            }
            let q = queues.get_mut(&tid).expect("queued tenant");
            if again {
                q.advance();
            } else {
                q.pop_front();
            }
            let t = &tenants[&tid];
            q.settle(t);
            if let Some((head, _)) = q.front() {
                turns.insert(key(self, t, head, tid));
            }
        }
        self.release_all_holds();
        if self.cfg.explain_pending {
            self.explain_fair_share(&mut plan, tenants, jobs);
        }
        mark_borrowed(&mut plan, used_before, tenants, jobs);
        plan
    }

    /// Where capacity ran out, says how the job's tenant stood in the fair-share order, so a
    /// user can tell "the pool is full" from "others are entitled to go first".
    fn explain_fair_share(
        &self,
        plan: &mut Plan,
        tenants: &HashMap<TenantId, TenantSnap>,
        jobs: &[JobReq],
    ) {
        if plan.pending.is_empty() {
            return;
        }
        let tenant_of: HashMap<JobId, TenantId> = jobs.iter().map(|j| (j.id, j.tenant)).collect();
        let waiting: BTreeSet<TenantId> = plan
            .pending
            .keys()
            .chain(plan.placements.iter().map(|p| &p.job))
            .filter_map(|id| tenant_of.get(id).copied())
            .collect();
        if waiting.len() < 2 {
            return;
        }
        let share = |t: &TenantId| {
            tenants
                .get(t)
                .map(|s| fair::dominant_share(&s.used, &s.history, &self.totals, s.weight))
                .unwrap_or(0.0)
        };
        let mut order: Vec<(u64, TenantId)> = waiting
            .iter()
            .map(|t| (fair::share_key(share(t)), *t))
            .collect();
        order.sort();
        for j in jobs {
            let Some(reasons) = plan.pending.get_mut(&j.id) else {
                continue;
            };
            if !reasons
                .iter()
                .any(|r| matches!(r.code, ReasonCode::NoFit | ReasonCode::Gang))
            {
                continue;
            }
            let rank = order.iter().position(|(_, t)| *t == j.tenant).unwrap_or(0) + 1;
            let ppm = order[rank - 1].0 / 1000;
            let mut counts = BTreeMap::new();
            counts.insert("share_ppm".to_string(), ppm);
            counts.insert("rank".to_string(), rank as u64);
            counts.insert("tenants".to_string(), order.len() as u64);
            reasons.push(PendingReason {
                code: ReasonCode::FairShare,
                unexplained: false,
                message: format!(
                    "fair share: this tenant's weighted dominant share is {:.3}, {} of {} tenants with work here (lowest goes first)",
                    ppm as f64 / 1e6,
                    ordinal(rank),
                    order.len()
                ),
                counts,
            });
        }
    }
}

type QueueKey = (u8, u8, u64, JobId);

/// Priority, then (batch work under LAS) the attained-service queue, then FIFO.
fn queue_order(las: Option<&Las>, j: &JobReq) -> QueueKey {
    let level = match las {
        Some(l) if j.priority == Priority::Batch => l.level(j.attained_gpu_ms),
        _ => 0,
    };
    (j.priority.rank(), level, j.seq, j.id)
}

/// Would the tenant's guarantee cover this job's next placement (a gang: all of it)?
fn covered(t: &TenantSnap, j: &JobReq) -> bool {
    let n = if j.gang { j.pending.len() as u64 } else { 1 };
    j.priority != Priority::Spot
        && preempt::within_guarantee(&t.guarantee, &t.used, &j.resources, n)
}

/// One tenant's waiting jobs in a cycle. Jobs its guarantee covers go before those that
/// would borrow, even when younger: otherwise an old job that can only borrow (say, of a
/// GPU model the tenant has no guarantee on) holds a covered job behind it while other
/// tenants' borrowing work takes the room, and the covered job, entitled to reclaim it,
/// preempts them every cycle only to lose the freed room again.
#[derive(Default)]
struct TenantQueue<'a> {
    /// Covered when last looked at. What a tenant holds only grows within a cycle, so a
    /// job leaves this queue for `rest` and never comes back.
    within: std::collections::VecDeque<(QueueKey, &'a JobReq, usize)>,
    /// In `queue_order`; `usize` counts tasks of the job already placed this cycle. A map:
    /// jobs move here from `within` one by one as the tenant's holdings grow.
    rest: BTreeMap<QueueKey, (&'a JobReq, usize)>,
}

impl<'a> TenantQueue<'a> {
    /// Moves heads the guarantee no longer covers to their place among the rest.
    fn settle(&mut self, t: &TenantSnap) {
        while let Some(&(key, j, k)) = self.within.front() {
            if covered(t, j) {
                break;
            }
            self.within.pop_front();
            self.rest.insert(key, (j, k));
        }
    }

    fn front(&self) -> Option<(&'a JobReq, usize)> {
        match self.within.front() {
            Some(&(_, j, k)) => Some((j, k)),
            None => self.rest.first_key_value().map(|(_, &v)| v),
        }
    }

    fn advance(&mut self) {
        if let Some(h) = self.within.front_mut() {
            h.2 += 1;
        } else if let Some(mut e) = self.rest.first_entry() {
            e.get_mut().1 += 1;
        }
    }

    fn pop_front(&mut self) {
        if self.within.pop_front().is_none() {
            self.rest.pop_first();
        }
    }
}

fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (1, 11) | (2, 12) | (3, 13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// What the ready nodes offer in total: the denominators of dominant shares.
fn draining_reason(n: usize) -> PendingReason {
    let mut counts = BTreeMap::new();
    counts.insert("nodes".to_string(), n as u64);
    PendingReason {
        code: ReasonCode::Draining,
        unexplained: false,
        message: format!(
            "waited past the starvation limit: {n} node{} drained for this job, which starts once they are free",
            if n == 1 { " is" } else { "s are" }
        ),
        counts,
    }
}

fn reserved_reason(res: &Reservation, now: caravel_core::Millis) -> PendingReason {
    let mut counts = BTreeMap::new();
    counts.insert("starts_in_ms".to_string(), (res.at - now).max(0) as u64);
    counts.insert("nodes".to_string(), res.nodes.len() as u64);
    PendingReason {
        code: ReasonCode::Reserved,
        unexplained: false,
        message: format!(
            "reserved: can start in {}s on {} node{}, when running tasks reach their max runtime; smaller jobs backfill only if they end before then",
            (res.at - now).max(0) / 1000,
            res.nodes.len(),
            if res.nodes.len() == 1 { "" } else { "s" }
        ),
        counts,
    }
}

/// Are the GPU nodes' GPUs clearly more used than their CPU (both as a share of
/// capacity)? Only then does a GPU freed by pacing go to GPU work rather than wait for
/// CPU. The share plan's budget counts GPUs alone, so where the two are about as used
/// (a workload asking about as much CPU per GPU as the pool has) CPU may bind first and
/// a turned-away share is lost; [`PACING_CPU_MARGIN`] keeps pacing off there.
fn gpus_scarcer_than_cpu(nodes: &[NodeSnap]) -> bool {
    let (mut cpu, mut cpu_used, mut gpu, mut gpu_used) = (0u64, 0u64, 0u64, 0u64);
    for n in nodes.iter().filter(|n| !n.capacity.devices.is_empty()) {
        cpu += n.capacity.cpu_milli;
        cpu_used += n.used_cpu_milli.min(n.capacity.cpu_milli);
        gpu += n.capacity.devices.len() as u64 * 1000;
        gpu_used +=
            n.used_devices.len() as u64 * 1000 + n.shared.values().map(|v| *v as u64).sum::<u64>();
    }
    let cpu_share = cpu_used as f64 / cpu.max(1) as f64;
    let gpu_share = gpu_used as f64 / gpu.max(1) as f64;
    cpu_share < gpu_share * (1.0 - PACING_CPU_MARGIN)
}

/// How much less used (relatively) CPU must be than GPUs for pacing to run: 5 %.
const PACING_CPU_MARGIN: f64 = 0.05;

/// Devices of the node held by no task, whole or in part.
fn free_devices(n: &NodeSnap) -> u32 {
    n.capacity
        .devices
        .len()
        .saturating_sub(n.used_devices.len() + n.shared.len()) as u32
}

pub fn pool_totals(nodes: &[NodeSnap]) -> fair::PoolTotals {
    let mut t = fair::PoolTotals::default();
    for n in nodes.iter().filter(|n| n.ready) {
        t.cpu_milli += n.capacity.cpu_milli as f64;
        t.memory_bytes += n.capacity.memory_bytes as f64;
        for d in &n.capacity.devices {
            // In thousandths, like what tenants hold.
            *t.gpus.entry(d.model.clone()).or_insert(0.0) += 1000.0;
        }
    }
    t
}

/// Runs one scheduling cycle over `nodes` (updated in place to reflect the placements).
pub fn schedule(
    cfg: &Config,
    nodes: &mut [NodeSnap],
    tenants: &mut HashMap<TenantId, TenantSnap>,
    jobs: &[JobReq],
) -> Plan {
    let mut s = Scheduler::new(cfg.clone(), nodes.to_vec());
    let plan = s.schedule(tenants, jobs);
    nodes.clone_from_slice(&s.nodes);
    plan
}

/// Can one task of `r` ever fit on any of these nodes when they are empty? Used at submit
/// time to reject jobs that could never run, as Slurm does.
pub fn fits_when_empty(nodes: &[Capacity], r: &TaskResources) -> bool {
    nodes.iter().any(|c| {
        c.cpu_milli >= r.cpu_milli
            && c.memory_bytes >= r.memory_bytes
            && r.gpu.as_ref().is_none_or(|g| {
                let need = if g.milli.is_some() { 1 } else { g.count };
                g.models().iter().any(|m| c.gpu_count(m) >= need)
            })
    })
}

/// How many tasks of `r` one empty node of capacity `c` holds.
pub fn tasks_when_empty(c: &Capacity, r: &TaskResources) -> u64 {
    let mut n = u64::MAX;
    if let Some(k) = c.cpu_milli.checked_div(r.cpu_milli) {
        n = n.min(k);
    }
    if let Some(k) = c.memory_bytes.checked_div(r.memory_bytes) {
        n = n.min(k);
    }
    if let Some(g) = &r.gpu {
        let per_model = g
            .models()
            .iter()
            .map(|m| {
                let devs = c.gpu_count(m) as u64;
                match g.milli {
                    Some(ml) if ml > 0 => devs * (1000 / u64::from(ml)),
                    _ if g.count == 0 => u64::MAX,
                    _ => devs / u64::from(g.count),
                }
            })
            .max()
            .unwrap_or(0);
        n = n.min(per_model);
    }
    n
}

/// The most tasks of `r` that one domain at `level` (none: the whole pool) holds when its
/// nodes are empty: a gang of more can never be placed. Used at submit time, like
/// `fits_when_empty`. Nodes are (capacity, topology, id).
pub fn gang_room_when_empty(
    nodes: &[(Capacity, Topology, NodeId)],
    r: &TaskResources,
    level: Option<TopologyLevel>,
) -> u64 {
    let mut per_domain: BTreeMap<(&str, &str, &str, u64), u64> = BTreeMap::new();
    for (c, t, id) in nodes {
        let key = match level {
            None => ("", "", "", 0),
            Some(TopologyLevel::Node) => (&*t.region, &*t.zone, &*t.rack, id.0),
            Some(TopologyLevel::Rack) => (&*t.region, &*t.zone, &*t.rack, 0),
            Some(TopologyLevel::Zone) => (&*t.region, &*t.zone, "", 0),
        };
        let e = per_domain.entry(key).or_default();
        *e = e.saturating_add(tasks_when_empty(c, r));
    }
    per_domain.values().copied().max().unwrap_or(0)
}

#[cfg(test)]
mod tests;
