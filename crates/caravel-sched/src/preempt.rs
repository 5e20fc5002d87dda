//! Preemption: which running tasks to stop so that a job that is entitled to run can.
//!
//! Two entitlements exist. Non-spot work may always preempt `spot` tasks (spot runs only on
//! idle capacity). A tenant reclaiming its guarantee — the job keeps the tenant within its
//! guaranteed amount — may preempt tasks other tenants run on *borrowed* capacity (placed
//! while beyond their own guarantee). `online` tasks are never preempted by `batch` or
//! `spot` work, and no task is preempted before its job's minimum runtime.
//!
//! Under least-attained-service scheduling (`Config::las`), a batch job may also preempt its
//! own tenant's batch tasks whose jobs have received more service (a later LAS queue).
//!
//! Victims are chosen to lose the least work: spot first, then the most recently started;
//! among nodes, the one needing the fewest victims, then the least work lost.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use caravel_core::{
    JobId, Millis, NodeId, Priority, Quota, ResourceSum, RunId, TaskResources, TenantId,
};

use crate::{JobReq, Las, NodeSnap, TenantSnap};

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
    /// When it will have ended at the latest (start + max runtime), if it has a max runtime.
    pub expected_end_ms: Option<Millis>,
    /// Tasks that stop when this one is preempted: its gang's size (a gang stops whole),
    /// 1 for a task of an ordinary job.
    pub gang_size: u32,
    /// The service its job had received when this task started, in GPU-milliseconds (see
    /// `JobReq::attained_gpu_ms`); what it has run since is added at `now`.
    pub attained_gpu_ms: u64,
    /// When this run last saved a checkpoint (the server knows it from the saves it kept):
    /// preempting it loses only the work since.
    pub saved_ms: Option<Millis>,
    /// It saves a checkpoint this often from its start (0: not known to; the simulator
    /// knows its workloads' periods, the server does not and uses `saved_ms`).
    pub save_every_ms: u64,
}

impl RunningTask {
    /// The work preempting it at `now` would throw away: since its last checkpoint, or
    /// since it started if it has saved none.
    pub fn unsaved_ms(&self, now: Millis) -> u64 {
        let ran = (now - self.started_ms).max(0) as u64;
        let mut lost = ran.checked_rem(self.save_every_ms).unwrap_or(ran);
        if let Some(s) = self.saved_ms.filter(|s| *s >= self.started_ms) {
            lost = lost.min((now - s).max(0) as u64);
        }
        lost
    }

    fn saves(&self) -> bool {
        self.saved_ms.is_some() || self.save_every_ms > 0
    }

    /// The service its job has received by `now`, counting this task's gang (or this task
    /// alone) as running since it started. For a job of several independent tasks started
    /// at different times this counts only this task's share since its start: a lower
    /// bound, so such a job is never demoted early.
    pub fn attained_at(&self, now: Millis) -> u64 {
        let gpu = self.resources.gpu.as_ref().map_or(0, |g| g.milli_total());
        let ran = (now - self.started_ms).max(0) as u64;
        self.attained_gpu_ms
            .saturating_add(ran.saturating_mul(gpu) / 1000 * self.gang_size.max(1) as u64)
    }
}

/// Stop `run` so that `for_job` can be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preemption {
    pub run: RunId,
    pub for_job: JobId,
}

/// A tenant guaranteed nothing: all its work borrows.
pub fn no_guarantee(g: &Quota) -> bool {
    g.cpu_milli.is_none() && g.memory_bytes.is_none() && g.gpus.is_empty()
}

/// Does `used` plus `times` tasks of `r` stay within guarantee `g`? A tenant with an empty
/// guarantee is always borrowing. CPU or memory left out of a guarantee does not limit it;
/// an accelerator model left out is guaranteed zero (GPUs are what guarantees are for).
pub fn within_guarantee(g: &Quota, used: &ResourceSum, r: &TaskResources, times: u64) -> bool {
    if no_guarantee(g) {
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
        // Within the guarantee on any model the task accepts.
        Some(q) => q.models_iter().any(|m| {
            used.gpu_milli.get(m).copied().unwrap_or(0) + q.milli_total() * times
                <= g.gpus.get(m).copied().unwrap_or(0) as u64 * 1000
        }),
    };
    cpu && mem && gpu
}

/// Why a task may not be a victim for `job`, or `None` if it may.
fn ineligible(
    v: &RunningTask,
    job: &JobReq,
    reclaiming: bool,
    now: Millis,
    las: Option<(&Las, u8)>,
) -> Option<&'static str> {
    if job.priority == Priority::Spot {
        return Some("spot work preempts nothing");
    }
    let spot_victim = v.priority == Priority::Spot;
    let borrowed_victim = reclaiming && v.borrowed && v.tenant != job.tenant;
    let las_victim = las.is_some_and(|(l, level)| {
        job.priority == Priority::Batch
            && v.priority == Priority::Batch
            && v.tenant == job.tenant
            && v.job != job.id
            && l.level(v.attained_at(now)) > level
    });
    if !spot_victim && !borrowed_victim && !las_victim {
        return Some("not preemptible for this job");
    }
    if !spot_victim && !borrowed_victim {
        if let Some((l, _)) = las {
            if now - v.started_ms < l.min_slice_ms as i64 {
                return Some("min runtime");
            }
        }
    }
    if v.priority == Priority::Online && job.priority != Priority::Online {
        return Some("online work is preempted only by online work");
    }
    if now - v.started_ms < v.min_runtime_ms as i64 {
        return Some("min runtime");
    }
    None
}

/// What a node would have free for `r` as victims are added, kept incrementally.
struct Room {
    cpu: u64,
    mem: u64,
    /// (device index, thousandths in use (1000: held whole), which of the ask's models)
    /// per device of an acceptable model: a handful per node, so a list beats a map.
    devs: Vec<(u32, u32, u8)>,
}

impl Room {
    fn of(n: &NodeSnap, r: &TaskResources) -> Room {
        let mut devs = Vec::new();
        if let Some(g) = &r.gpu {
            let models = g.models();
            for d in &n.capacity.devices {
                let Some(k) = models.iter().position(|m| *m == d.model) else {
                    continue;
                };
                let used = if n.used_devices.contains(&d.index) {
                    1000
                } else {
                    n.shared.get(&d.index).copied().unwrap_or(0)
                };
                devs.push((d.index, used, k as u8));
            }
        }
        Room {
            cpu: n.capacity.cpu_milli.saturating_sub(n.used_cpu_milli),
            mem: n.capacity.memory_bytes.saturating_sub(n.used_memory_bytes),
            devs,
        }
    }

    fn add(&mut self, _n: &NodeSnap, v: &RunningTask, _r: &TaskResources) {
        self.cpu += v.resources.cpu_milli;
        self.mem += v.resources.memory_bytes;
        let freed = v
            .resources
            .gpu
            .as_ref()
            .map(|g| g.milli.unwrap_or(1000))
            .unwrap_or(0);
        for d in &v.devices {
            if let Some((_, used, _)) = self.devs.iter_mut().find(|(i, _, _)| i == d) {
                *used = used.saturating_sub(freed);
            }
        }
    }

    /// Exactly what placement accepts: whole devices all of one model, or a fraction on
    /// one device.
    fn fits(&self, r: &TaskResources) -> bool {
        self.cpu >= r.cpu_milli
            && self.mem >= r.memory_bytes
            && r.gpu.as_ref().is_none_or(|g| match g.milli {
                None => {
                    let mut free = [0usize; 8];
                    let mut other = 0usize;
                    for (_, u, k) in &self.devs {
                        if *u == 0 {
                            match free.get_mut(*k as usize) {
                                Some(f) => *f += 1,
                                None => other += 1,
                            }
                        }
                    }
                    // More than eight accepted models is unheard of; counted together there
                    // (optimistic), and the promise below then takes what it can.
                    free.iter().any(|f| *f >= g.count as usize) || other >= g.count as usize
                }
                Some(m) => self.devs.iter().any(|(_, u, _)| *u + m <= 1000),
            })
    }
}

/// How many nodes that could host the job after preemption are compared per member.
const CANDIDATES: usize = 64;

/// Running tasks by node position, cheapest victims first on each node: spot, then the
/// most recently started. Kept by the `Scheduler` across decisions.
pub(crate) type ByNode = BTreeMap<usize, Vec<RunningTask>>;

pub(crate) fn sort_victims(v: &mut [RunningTask]) {
    // Spot first; then tasks that stop alone before gang members (preempting one member
    // stops the whole gang); then the most recently started (least work lost).
    v.sort_by_key(|t| {
        (
            t.priority != Priority::Spot,
            t.gang_size,
            std::cmp::Reverse(t.started_ms),
            t.run,
        )
    });
}

/// A node's victims in the order they are taken at `now`: `sort_victims`' order, with the
/// work each would lose counted from its last checkpoint. Without checkpoints that is the
/// same order (least work lost is the most recently started), so the stored order serves;
/// with them it changes as time passes and tasks save, so it is worked out per decision.
fn victims_at(tasks: &[RunningTask], now: Millis) -> impl Iterator<Item = &RunningTask> {
    let sorted = tasks.iter().any(RunningTask::saves).then(|| {
        let mut v: Vec<&RunningTask> = tasks.iter().collect();
        v.sort_by_key(|t| {
            (
                t.priority != Priority::Spot,
                t.gang_size,
                t.unsaved_ms(now),
                std::cmp::Reverse(t.started_ms),
                t.run,
            )
        });
        v
    });
    let stored = sorted.is_none().then(|| tasks.iter());
    sorted
        .into_iter()
        .flatten()
        .chain(stored.into_iter().flatten())
}

/// The runs of each running gang.
pub(crate) type GangRuns = HashMap<JobId, Vec<RunId>>;

/// Scratch view of the pool during one preemption pass: victims chosen so far are gone,
/// and space promised to preemptors is taken. Nodes are copied only when touched.
pub(crate) struct Pass<'a> {
    nodes: &'a [NodeSnap],
    scratch: HashMap<usize, NodeSnap>,
    by_node: &'a ByNode,
    taken: BTreeSet<RunId>,
    now: Millis,
    start: usize,
    last: Option<usize>,
    /// How many running tasks could be victims at all: spot, and borrowed per tenant. When
    /// there are none for a job, the node scan is skipped (long queues with nothing to
    /// preempt would otherwise rescan every busy node per job per cycle).
    pub(crate) victims: &'a Victims,
    /// Every running gang's runs and where each run is: a gang victim frees its whole gang.
    gangs: Option<(&'a GangRuns, &'a HashMap<RunId, usize>)>,
    las: Option<&'a Las>,
    /// While set, victims and room are looked for on these nodes only (one topology
    /// domain), idle ones included.
    only: Option<Vec<usize>>,
    /// Where there is room (before this pass): with it, the search visits only nodes with
    /// room or with possible victims; without it, every node with running tasks.
    index: Option<&'a crate::index::Index>,
}

/// Running tasks that may ever be preempted, counted as they start and stop, in all and
/// by node position.
#[derive(Debug, Clone, Default)]
pub(crate) struct Victims {
    pub(crate) spot: usize,
    pub(crate) borrowed: usize,
    pub(crate) borrowed_by: HashMap<TenantId, usize>,
    /// Batch tasks per tenant: possible victims of the tenant's own jobs under LAS.
    pub(crate) batch_by: HashMap<TenantId, usize>,
    /// Nodes holding spot tasks, borrowed tasks (any tenant's), and each tenant's batch
    /// tasks, with how many: the victim search visits only these and the nodes with room.
    /// In an overloaded pool most nodes are full of work nobody may preempt (10,000 nodes
    /// at load 1.1: 96 % of the nodes visited were), and a failed search visited them all.
    spot_nodes: BTreeMap<usize, usize>,
    borrowed_nodes: BTreeMap<usize, usize>,
    batch_nodes: HashMap<TenantId, BTreeMap<usize, usize>>,
    /// Per node holding spot tasks: (devices those tasks hold, the node's devices free as
    /// last told by `set_free`). `potential` orders those nodes by the sum — the most whole
    /// devices preempting spot work there could leave free — so a whole-device ask that
    /// only spot work may make room for visits only nodes that could hold it (at load 2.0
    /// on 10,000 nodes, walking every spot-holding node per failed ask was half the run).
    spot_devs: HashMap<usize, (u32, u32)>,
    potential: BTreeSet<(u32, usize)>,
    /// Nodes holding spot tasks with a minimum runtime: visited whatever their potential,
    /// since the search counts victims inside it for its reason.
    spot_min_runtime_nodes: BTreeMap<usize, usize>,
    /// Nodes holding spot tasks of a gang: stopping one frees its mates too, whatever
    /// they are, which `Pass::domain_could_hold` cannot bound from per-node counts.
    spot_gang_nodes: BTreeMap<usize, usize>,
}

fn step_node(m: &mut BTreeMap<usize, usize>, node: usize, by: isize) {
    let e = m.entry(node).or_insert(0);
    *e = e.saturating_add_signed(by);
    if *e == 0 {
        m.remove(&node);
    }
}

impl Victims {
    /// `t`, running on the node at position `node`, started (`by` 1) or stopped (-1).
    pub(crate) fn add(&mut self, t: &RunningTask, node: usize, by: isize) {
        let step = |x: &mut usize| *x = x.saturating_add_signed(by);
        if t.priority == Priority::Spot {
            step(&mut self.spot);
            step_node(&mut self.spot_nodes, node, by);
            if t.min_runtime_ms > 0 {
                step_node(&mut self.spot_min_runtime_nodes, node, by);
            }
            if t.gang_size > 1 {
                step_node(&mut self.spot_gang_nodes, node, by);
            }
            let (devs, free) = self.spot_devs.get(&node).copied().unwrap_or((0, 0));
            let devs = devs.saturating_add_signed(by as i32 * t.devices.len() as i32);
            self.rekey(node, devs, free);
        }
        if t.priority == Priority::Batch {
            let e = self.batch_by.entry(t.tenant).or_insert(0);
            step(e);
            if *e == 0 {
                self.batch_by.remove(&t.tenant);
            }
            let m = self.batch_nodes.entry(t.tenant).or_default();
            step_node(m, node, by);
            if m.is_empty() {
                self.batch_nodes.remove(&t.tenant);
            }
        }
        if t.borrowed {
            step(&mut self.borrowed);
            let e = self.borrowed_by.entry(t.tenant).or_insert(0);
            step(e);
            if *e == 0 {
                self.borrowed_by.remove(&t.tenant);
            }
            step_node(&mut self.borrowed_nodes, node, by);
        }
    }

    fn rekey(&mut self, node: usize, devs: u32, free: u32) {
        if let Some((d, f)) = self.spot_devs.remove(&node) {
            self.potential.remove(&(d + f, node));
        }
        if devs > 0 || self.spot_nodes.contains_key(&node) {
            self.spot_devs.insert(node, (devs, free));
            self.potential.insert((devs + free, node));
        }
    }

    /// Node `node` now has `free` devices held by no task, whole or shared (callers tell
    /// after every change to a node, so `potential` never understates a node).
    pub(crate) fn set_free(&mut self, node: usize, free: u32) {
        if let Some(&(devs, f)) = self.spot_devs.get(&node) {
            if f != free {
                self.rekey(node, devs, free);
            }
        }
    }

    /// Nodes holding spot work where free devices plus spot tasks' devices reach `want`,
    /// with the nodes holding spot tasks that have a minimum runtime, ascending.
    fn spot_nodes_reaching(&self, want: u32) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .potential
            .range((want, 0)..)
            .map(|(_, i)| *i)
            .chain(self.spot_min_runtime_nodes.keys().copied())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Node positions in `range` that hold a task of a class a job of `tenant` may preempt
    /// (reclaiming: within its guarantee; las: a batch job under LAS), merged with `room`
    /// (ascending), each once and in order.
    fn nodes_for<'s>(
        &'s self,
        tenant: TenantId,
        reclaiming: bool,
        las: bool,
        room: &'s [usize],
        spot: Option<&'s [usize]>,
        range: std::ops::Range<usize>,
    ) -> impl Iterator<Item = usize> + 's {
        let within = |v: &'s [usize]| {
            let lo = v.partition_point(|i| *i < range.start);
            let hi = v.partition_point(|i| *i < range.end);
            v[lo..hi].iter().copied()
        };
        let spot: Box<dyn Iterator<Item = usize> + 's> = match spot {
            Some(v) => Box::new(within(v)),
            None => Box::new(self.spot_nodes.range(range.clone()).map(|(i, _)| *i)),
        };
        let mut streams: Vec<Box<dyn Iterator<Item = usize> + 's>> =
            vec![spot, Box::new(within(room))];
        if reclaiming {
            streams.push(Box::new(
                self.borrowed_nodes.range(range.clone()).map(|(i, _)| *i),
            ));
        }
        if las {
            if let Some(m) = self.batch_nodes.get(&tenant) {
                streams.push(Box::new(m.range(range.clone()).map(|(i, _)| *i)));
            }
        }
        merge_sorted(streams)
    }

    /// Might any running task be a victim for a job of `tenant` (reclaiming: within its
    /// guarantee)?
    fn any_for(&self, tenant: TenantId, reclaiming: bool, las: bool) -> bool {
        let own = self.borrowed_by.get(&tenant).copied().unwrap_or(0);
        self.spot > 0
            || (reclaiming && self.borrowed > own)
            || (las && self.batch_by.get(&tenant).is_some_and(|n| *n > 0))
    }
}

/// The union of ascending streams, ascending and each value once.
pub(crate) fn merge_sorted<'s>(
    streams: Vec<Box<dyn Iterator<Item = usize> + 's>>,
) -> impl Iterator<Item = usize> + 's {
    let mut heads: Vec<std::iter::Peekable<Box<dyn Iterator<Item = usize> + 's>>> =
        streams.into_iter().map(|s| s.peekable()).collect();
    std::iter::from_fn(move || {
        let next = heads.iter_mut().filter_map(|h| h.peek().copied()).min()?;
        for h in heads.iter_mut() {
            while h.peek() == Some(&next) {
                h.next();
            }
        }
        Some(next)
    })
}

impl<'a> Pass<'a> {
    /// `start`: the node position the search begins at (it wraps around).
    pub(crate) fn new(
        nodes: &'a [NodeSnap],
        by_node: &'a ByNode,
        now: Millis,
        start: usize,
        victims: &'a Victims,
    ) -> Pass<'a> {
        Pass {
            victims,
            nodes,
            scratch: HashMap::new(),
            by_node,
            taken: BTreeSet::new(),
            now,
            start,
            last: None,
            gangs: None,
            las: None,
            only: None,
            index: None,
        }
    }

    pub(crate) fn with_index(mut self, index: &'a crate::index::Index) -> Self {
        self.index = Some(index);
        self
    }

    /// Lets the pass free every member of a gang it takes a victim from.
    pub(crate) fn with_gangs(mut self, gangs: &'a GangRuns, at: &'a HashMap<RunId, usize>) -> Self {
        self.gangs = Some((gangs, at));
        self
    }

    pub(crate) fn with_las(mut self, las: Option<&'a Las>) -> Self {
        self.las = las;
        self
    }

    /// The other members of `v`'s gang stop with it: their room is free from now on in
    /// this pass (the caller stops them; they are not named as victims).
    fn free_gang_of(&mut self, v: &RunningTask) {
        let Some((gangs, at)) = self.gangs else {
            return;
        };
        let Some(runs) = gangs.get(&v.job) else {
            return;
        };
        for r in runs {
            if *r == v.run || self.taken.contains(r) {
                continue;
            }
            let Some(&i) = at.get(r) else { continue };
            let Some(t) = self
                .by_node
                .get(&i)
                .and_then(|ts| ts.iter().find(|t| t.run == *r))
            else {
                continue;
            };
            self.taken.insert(*r);
            self.node_mut(i).release(&t.resources, &t.devices);
        }
    }

    /// The node the last victims were taken from.
    pub(crate) fn last_node(&self) -> Option<usize> {
        self.last
    }

    fn node(&self, i: usize) -> &NodeSnap {
        self.scratch.get(&i).unwrap_or(&self.nodes[i])
    }

    fn node_mut(&mut self, i: usize) -> &mut NodeSnap {
        let nodes = self.nodes;
        self.scratch.entry(i).or_insert_with(|| nodes[i].clone())
    }

    /// For a job its own tenant's cap blocks: victims among the tenant's running tasks of
    /// lower priority (spot first, then the most recently started), enough to bring `times`
    /// tasks of the job within the cap, and only if the job then also fits somewhere — with
    /// `domains` (each a list of node positions), all `times` inside one of them, the first
    /// in their order that holds them.
    pub(crate) fn try_own(
        &mut self,
        job: &JobReq,
        tenant: &TenantSnap,
        times: u64,
        domains: Option<&[Vec<usize>]>,
    ) -> Result<Vec<RunId>, String> {
        let mut cands: Vec<(usize, &RunningTask)> = self
            .by_node
            .iter()
            .flat_map(|(i, ts)| ts.iter().map(move |t| (*i, t)))
            .filter(|(_, t)| {
                t.tenant == job.tenant
                    && t.priority.rank() > job.priority.rank()
                    && !self.taken.contains(&t.run)
                    && self.now - t.started_ms >= t.min_runtime_ms as i64
            })
            .collect();
        cands.sort_by_key(|(_, t)| {
            (
                std::cmp::Reverse(t.priority.rank()),
                t.unsaved_ms(self.now),
                std::cmp::Reverse(t.started_ms),
                t.run,
            )
        });
        let mut used = tenant.used.clone();
        let mut chosen: Vec<(usize, &RunningTask)> = Vec::new();
        for c in cands {
            if tenant.quota.check(&used, &job.resources, times).is_ok() {
                break;
            }
            let model = c.1.resources.gpu.as_ref().map(|g| g.model.clone());
            used.sub_task_on(&c.1.resources, model.as_deref(), 1);
            chosen.push(c);
        }
        if chosen.is_empty() || tenant.quota.check(&used, &job.resources, times).is_err() {
            return Err(
                "the tenant is at its quota and has no lower-priority work to preempt".into(),
            );
        }
        let saved = (self.scratch.clone(), self.taken.clone());
        for (i, v) in &chosen {
            self.node_mut(*i).release(&v.resources, &v.devices);
        }
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        let domains: &[Vec<usize>] = domains.unwrap_or(std::slice::from_ref(&all));
        // Every task must now find room (inside one domain when there are several).
        let mut placed = false;
        for d in domains {
            let before = self.scratch.clone();
            if self.fit_all(job, times, d) {
                placed = true;
                break;
            }
            self.scratch = before;
        }
        if !placed {
            (self.scratch, self.taken) = saved;
            return Err(if domains.len() > 1 {
                "preempting the tenant's lower-priority work would not make room in any one domain"
                    .into()
            } else {
                "preempting the tenant's lower-priority work would not make room".into()
            });
        }
        let runs: Vec<RunId> = chosen.iter().map(|(_, v)| v.run).collect();
        self.taken.extend(runs.iter().copied());
        Ok(runs)
    }

    /// Allocates `times` tasks of `job` on the scratch copies of `nodes`, each on the first
    /// that fits; false (with some allocated) when they do not all fit.
    fn fit_all(&mut self, job: &JobReq, times: u64, nodes: &[usize]) -> bool {
        let cfg = crate::Config::default();
        for _ in 0..times {
            let spot = nodes.iter().find_map(|&i| {
                crate::fit(&cfg, self.node(i), &job.resources)
                    .ok()
                    .map(|(_, d)| (i, d))
            });
            match spot {
                Some((i, devs)) => self.node_mut(i).allocate(&job.resources, &devs),
                None => return false,
            }
        }
        true
    }

    /// For a gang that must share a topology domain: victims inside the one domain (of
    /// `domains`, each a list of node positions, in a fixed order) where the fewest tasks
    /// are named, all or nothing. Idle nodes of the domain take members without victims.
    pub(crate) fn try_job_in_domain(
        &mut self,
        job: &JobReq,
        tenant: &TenantSnap,
        domains: &[Vec<usize>],
        level: &str,
    ) -> Result<Vec<RunId>, String> {
        let mut best: Option<(usize, usize)> = None;
        // The reason given when no domain will do: the first domain's.
        let mut why = None;
        // With the index (not in the plain scan tests compare with), a domain whose free
        // room plus all the work this job may stop there cannot hold the gang is not
        // searched: a gang held to a rack is otherwise searched once per rack, each search
        // walking the rack's nodes once per member.
        let prune = self.index.is_some();
        for (k, d) in domains.iter().enumerate() {
            if prune && !self.domain_could_hold(job, tenant, d) {
                continue;
            }
            let tried = self.try_in(job, tenant, d);
            match tried {
                Ok(v) => {
                    if best.is_none_or(|b| v.len() < b.0) {
                        best = Some((v.len(), k));
                    }
                }
                Err(e) if k == 0 => why = Some(e),
                Err(_) => {}
            }
            if best.is_some_and(|b| b.0 <= 1) {
                break;
            }
        }
        let Some((_, k)) = best else {
            if why.is_none() && !domains.is_empty() {
                // The first domain was skipped; its search gives the same reason.
                let first = self.try_in(job, tenant, &domains[0]);
                debug_assert!(first.is_err(), "a skipped domain could hold the gang");
                why = first.err();
            }
            return Err(match why {
                Some(w) => format!("in no {level}: {w}"),
                None => format!("no {level} to preempt in"),
            });
        };
        self.only = Some(domains[k].clone());
        let r = self.try_job(job, tenant);
        self.only = None;
        r
    }

    /// `try_job` within one domain, leaving the pass as it was.
    fn try_in(
        &mut self,
        job: &JobReq,
        tenant: &TenantSnap,
        domain: &[usize],
    ) -> Result<Vec<RunId>, String> {
        let saved = (self.scratch.clone(), self.taken.clone(), self.last);
        self.only = Some(domain.to_vec());
        let r = self.try_job(job, tenant);
        (self.scratch, self.taken, self.last) = saved;
        self.only = None;
        r
    }

    /// Could the nodes of `domain` hold every pending member of gang `job` if everything
    /// this job might stop there stopped? An upper bound from the counts `Victims` keeps
    /// (O(1) per node), never `false` where `try_job` would succeed. Spot tasks may always
    /// be stopped: a whole-device ask counts per node its free devices plus the spot
    /// tasks' devices (a minimum runtime not subtracted); a node holding work of another
    /// victim class the job may take (borrowed, or its tenant's batch under LAS) or a spot
    /// gang member (its mates stop with it) could take every member, as could, for other
    /// asks, any node with room or spot work.
    fn domain_could_hold(&self, job: &JobReq, tenant: &TenantSnap, domain: &[usize]) -> bool {
        let members = job.pending.len() as u64;
        let reclaiming = within_guarantee(&tenant.guarantee, &tenant.used, &job.resources, members);
        let las = self.las.is_some() && job.priority == Priority::Batch;
        let v = self.victims;
        let batch = v.batch_nodes.get(&job.tenant).filter(|_| las);
        let want = job
            .resources
            .gpu
            .as_ref()
            .filter(|g| g.milli.is_none() && g.count > 0)
            .map(|g| g.count as usize);
        let mut bound = 0u64;
        for &i in domain {
            let node = self.node(i);
            if !node.ready {
                continue;
            }
            let other_class = (reclaiming && v.borrowed_nodes.contains_key(&i))
                || batch.is_some_and(|b| b.contains_key(&i))
                || v.spot_gang_nodes.contains_key(&i);
            bound += match want {
                _ if other_class => members,
                Some(want) => {
                    let free = node
                        .capacity
                        .devices
                        .len()
                        .saturating_sub(node.used_devices.len() + node.shared.len());
                    let spot = v.spot_devs.get(&i).map_or(0, |d| d.0 as usize);
                    ((free + spot) / want) as u64
                }
                None if node.room_for(&job.resources) > 0 || v.spot_nodes.contains_key(&i) => {
                    members
                }
                None => 0,
            };
            if bound >= members {
                return true;
            }
        }
        false
    }

    /// Chooses victims for every pending task of `job`, all or nothing. Returns the
    /// victims, or why none would do. Only nodes with running tasks are looked at: a node
    /// without any that has no room cannot be helped by preempting.
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
        let las = self
            .las
            .filter(|_| job.priority == Priority::Batch)
            .map(|l| (l, l.level(job.attained_gpu_ms)));
        if job.priority == Priority::Spot
            || !self.victims.any_for(job.tenant, reclaiming, las.is_some())
        {
            return Err(if reclaiming {
                "no spot or borrowed tasks to preempt would make room".to_string()
            } else {
                "no spot tasks to preempt would make room, and the tenant is beyond its guarantee"
                    .to_string()
            });
        }
        let members = if job.gang { job.pending.len() } else { 1 };
        let saved = (self.scratch.clone(), self.taken.clone());
        let mut chosen = Vec::new();
        let mut blocked_by_min_runtime = 0;
        let by_node = self.by_node;
        let victims = self.victims;
        // Only spot tasks may be victims (not reclaiming, not LAS), and the ask is whole
        // devices: the per-node bound below applies.
        // (With the index only: without it the search is the plain scan tests compare with.)
        let spot_only = !reclaiming && las.is_none() && self.index.is_some();
        let whole_devices = job
            .resources
            .gpu
            .as_ref()
            .filter(|g| g.milli.is_none())
            .map(|g| g.count as usize);
        // Within one domain (`only`) the scan walks the domain's nodes and needs no list
        // of the pool's nodes with room; a gang held to a rack is searched once per rack.
        let room = self
            .index
            .filter(|_| self.only.is_none())
            .map(|ix| ix.with_room(&job.resources));
        // Only nodes whose spot work could free enough devices (a bound fixed before the
        // pass: taking victims and promising their room never raises it).
        let spot_reaching = whole_devices
            .filter(|_| spot_only)
            .map(|want| victims.spot_nodes_reaching(want as u32));
        for _ in 0..members {
            let mut best: Option<(usize, u64, usize, Vec<&RunningTask>)> = None;
            let mut feasible = 0usize;
            // Nodes this pass touched may have room the index does not know of.
            let room: Option<Vec<usize>> = room.as_ref().map(|r| {
                let mut v = r.clone();
                v.extend(self.scratch.keys().copied());
                v.sort_unstable();
                v.dedup();
                v
            });
            let scan: Box<dyn Iterator<Item = (usize, &[RunningTask])>> = match (&self.only, &room)
            {
                (Some(domain), _) => Box::new(
                    domain
                        .iter()
                        .map(|i| (*i, by_node.get(i).map_or(&[][..], |v| v.as_slice()))),
                ),
                (None, Some(room)) => {
                    let l = las.is_some();
                    let spot = spot_reaching.as_deref();
                    Box::new(
                        victims
                            .nodes_for(
                                job.tenant,
                                reclaiming,
                                l,
                                room,
                                spot,
                                self.start..usize::MAX,
                            )
                            .chain(victims.nodes_for(
                                job.tenant,
                                reclaiming,
                                l,
                                room,
                                spot,
                                0..self.start,
                            ))
                            .filter_map(|i| by_node.get(&i).map(|v| (i, v.as_slice()))),
                    )
                }
                (None, None) => Box::new(
                    by_node
                        .range(self.start..)
                        .chain(by_node.range(..self.start))
                        .map(|(i, v)| (*i, v.as_slice())),
                ),
            };
            for (i, tasks) in scan {
                let node = self.node(i);
                if !node.ready {
                    continue;
                }
                // Where only spot work may be preempted, a node whose free devices and spot
                // tasks' devices together are fewer than the ask cannot be made to fit: skip
                // it without building its room (whole-node asks on a pool sprinkled with spot
                // work were 99 % of the failed searches at load 1.3). Not when a spot task
                // there is inside its minimum runtime: the search counts those for its reason.
                if let Some(want) = whole_devices.filter(|_| spot_only) {
                    let spot = || {
                        tasks
                            .iter()
                            .take_while(|v| v.priority == Priority::Spot)
                            .filter(|v| !self.taken.contains(&v.run))
                    };
                    let free = node
                        .capacity
                        .devices
                        .len()
                        .saturating_sub(node.used_devices.len() + node.shared.len());
                    let freeable: usize = spot().map(|v| v.devices.len()).sum();
                    if free.saturating_add(freeable) < want
                        && spot().all(|v| self.now - v.started_ms >= v.min_runtime_ms as i64)
                    {
                        continue;
                    }
                }
                // Most busy nodes of a large pool hold nothing this job may preempt and have
                // no room: skip them before building their room.
                let hopeless = node.room_for(&job.resources) == 0
                    && tasks.iter().all(|v| {
                        self.taken.contains(&v.run)
                            || matches!(
                                ineligible(v, job, reclaiming, self.now, las),
                                Some(w) if w != "min runtime"
                            )
                    });
                if hopeless {
                    continue;
                }
                let mut freed: Vec<&RunningTask> = Vec::new();
                let mut room = Room::of(node, &job.resources);
                let mut ok = room.fits(&job.resources);
                if !ok {
                    for v in victims_at(tasks, self.now) {
                        if self.taken.contains(&v.run) {
                            continue;
                        }
                        match ineligible(v, job, reclaiming, self.now, las) {
                            None => {}
                            Some("min runtime") => {
                                blocked_by_min_runtime += 1;
                                continue;
                            }
                            Some(_) => continue,
                        }
                        freed.push(v);
                        room.add(node, v, &job.resources);
                        if room.fits(&job.resources) {
                            ok = true;
                            break;
                        }
                    }
                }
                if ok {
                    // What preempting costs: every task that stops (a gang member stops its
                    // whole gang, counted once per gang) and the work they lose.
                    let mut gangs: Vec<JobId> = Vec::new();
                    let (mut stopped, mut lost) = (0usize, 0u64);
                    for v in &freed {
                        if v.gang_size > 1 {
                            if gangs.contains(&v.job) {
                                continue;
                            }
                            gangs.push(v.job);
                        }
                        stopped += v.gang_size.max(1) as usize;
                        lost += v.unsaved_ms(self.now) * v.gang_size.max(1) as u64;
                    }
                    let better = best
                        .as_ref()
                        .is_none_or(|b| (stopped, lost, i) < (b.2, b.1, b.0));
                    if better {
                        best = Some((i, lost, stopped, freed));
                    }
                    feasible += 1;
                    // One victim (or none) is the fewest possible: stop looking. Otherwise
                    // the best of the first CANDIDATES feasible nodes wins, as kube-scheduler
                    // samples candidate nodes for preemption, so a decision stays cheap
                    // however many tasks run.
                    if best.as_ref().is_some_and(|b| b.2 <= 1) || feasible >= CANDIDATES {
                        break;
                    }
                }
            }
            let Some((i, _, _, freed)) = best else {
                (self.scratch, self.taken) = saved;
                return Err(if blocked_by_min_runtime > 0 {
                    format!("{blocked_by_min_runtime} possible victims are inside their minimum runtime")
                } else if reclaiming {
                    "no spot or borrowed tasks to preempt would make room".to_string()
                } else {
                    "no spot tasks to preempt would make room, and the tenant is beyond its guarantee".to_string()
                });
            };
            self.last = Some(i);
            let freed: Vec<RunningTask> = freed.into_iter().cloned().collect();
            for v in &freed {
                self.taken.insert(v.run);
                self.node_mut(i).release(&v.resources, &v.devices);
                chosen.push(v.run);
            }
            for v in freed.iter().filter(|v| v.gang_size > 1) {
                self.free_gang_of(v);
            }
            // Promise the freed space to this job so no one else counts it: the devices
            // placement would pick, so the node's books stay consistent (a fraction on a
            // shared device, whole devices that no fraction holds).
            let node = self.node_mut(i);
            match node.pick_for(&job.resources) {
                Some(devs) => node.allocate(&job.resources, &devs),
                None => {
                    node.used_cpu_milli += job.resources.cpu_milli;
                    node.used_memory_bytes += job.resources.memory_bytes;
                }
            }
        }
        Ok(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caravel_core::{Capacity, Device, GpuRequest};

    fn h100s(n: u32, mem_gib: u64) -> NodeSnap {
        NodeSnap::new(
            NodeId(1),
            Capacity {
                isolation: Default::default(),
                images: false,
                cpu_milli: 8_000,
                memory_bytes: mem_gib << 30,
                devices: (0..n)
                    .map(|index| Device {
                        index,
                        model: "H100".into(),
                    })
                    .collect(),
            },
        )
    }

    fn ask(gpu: GpuRequest) -> TaskResources {
        TaskResources {
            needs: Default::default(),
            cpu_milli: 1_000,
            memory_bytes: 2 << 30,
            gpu: Some(gpu),
        }
    }

    fn batch(id: u64, gpu: GpuRequest) -> JobReq {
        JobReq {
            id: JobId(id),
            tenant: TenantId(1),
            priority: Priority::Batch,
            seq: id,
            resources: ask(gpu),
            gang: false,
            min_tasks: None,
            pending: vec![0],
            topology: None,
            max_runtime_ms: None,
            attained_gpu_ms: 0,
        }
    }

    fn half(model: &str) -> GpuRequest {
        GpuRequest {
            milli: Some(500),
            ..GpuRequest::whole(model, 1)
        }
    }

    /// A device is either held whole or shared by fractions, never both.
    fn consistent(n: &NodeSnap) -> bool {
        n.used_devices.iter().all(|d| !n.shared.contains_key(d))
    }

    #[test]
    fn the_room_promised_to_a_job_is_the_devices_placement_would_pick() {
        // Two spot halves share device 0 and fill the memory; device 1 is free. A whole-GPU
        // job's victim frees memory: the promise must take device 1, not the half-held 0.
        let mut node = h100s(2, 4);
        let spot: Vec<RunningTask> = (1..=2)
            .map(|r| RunningTask {
                run: RunId(r),
                job: JobId(100),
                tenant: TenantId(3),
                node: NodeId(1),
                priority: Priority::Spot,
                resources: ask(half("H100")),
                devices: vec![0],
                started_ms: 0,
                min_runtime_ms: 0,
                borrowed: false,
                expected_end_ms: None,
                gang_size: 1,
                attained_gpu_ms: 0,
                saved_ms: None,
                save_every_ms: 0,
            })
            .collect();
        for t in &spot {
            node.allocate(&t.resources, &t.devices);
        }
        let nodes = vec![node];
        let mut victims = Victims::default();
        for t in &spot {
            victims.add(t, 0, 1);
        }
        let by_node: ByNode = [(0usize, spot.clone())].into_iter().collect();
        let mut pass = Pass::new(&nodes, &by_node, 1_000, 0, &victims);
        let tenant = TenantSnap::default();
        let whole = pass.try_job(&batch(1, GpuRequest::whole("H100", 1)), &tenant);
        assert_eq!(whole.unwrap().len(), 1);
        let n = pass.node(0);
        assert!(consistent(n), "{:?} {:?}", n.used_devices, n.shared);
        assert_eq!(n.used_devices, BTreeSet::from([1]));
        assert_eq!(n.shared.get(&0), Some(&500));
        // A fraction after it: the last spot half goes, and the promise is a fraction of
        // device 0, not the whole device.
        let frac = pass.try_job(&batch(2, half("H100")), &tenant);
        assert_eq!(frac.unwrap().len(), 1);
        let n = pass.node(0);
        assert!(consistent(n), "{:?} {:?}", n.used_devices, n.shared);
        assert_eq!(n.used_devices, BTreeSet::from([1]));
        assert_eq!(n.shared.get(&0), Some(&500));
        assert_eq!(n.used_memory_bytes, 4 << 30);
    }

    #[test]
    fn whole_devices_for_one_task_must_be_of_one_model() {
        let mut node = h100s(1, 64);
        std::sync::Arc::make_mut(&mut node.capacity)
            .devices
            .push(Device {
                index: 1,
                model: "A100".into(),
            });
        let two = TaskResources {
            gpu: Some(GpuRequest {
                any_of: vec!["A100".into()],
                ..GpuRequest::whole("H100", 2)
            }),
            ..ask(GpuRequest::whole("H100", 2))
        };
        assert!(
            !Room::of(&node, &two).fits(&two),
            "one H100 and one A100 are not two of a model"
        );
        assert!(node.pick_for(&two).is_none());
        let one = ask(GpuRequest::whole("A100", 1));
        assert!(Room::of(&node, &one).fits(&one));
    }
}
