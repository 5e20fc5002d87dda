//! Time-driven replay: jobs arrive, run for their durations and leave; inference services
//! follow their offered load through an autoscaler; the production scheduler places
//! everything under a virtual clock.
//!
//! The loop is the server's, minus the processes: events (arrivals, task ends, autoscaler
//! ticks) are applied in time order, and whenever something changed a scheduling cycle runs
//! at the next cycle boundary (`cycle_ms`, like the server's cycle interval) through the same
//! `caravel_sched::Scheduler` calls the server makes: `schedule_preempting` for the plan,
//! `add_running` / `remove_running` as tasks start and stop. Victims named by the plan stop
//! at once and resume from their last checkpoint. Nothing here reads a clock or draws an
//! unseeded random number: a replay is a pure function of its inputs.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};

use caravel_core::{
    JobId, Millis, NodeId, Priority, Quota, ResourceSum, RunId, TaskResources, TenantId,
};
use caravel_sched::{Config, JobReq, NodeSnap, RunningTask, Scheduler, TenantSnap};

/// A tenant of the pool.
#[derive(Debug, Clone, Default)]
pub struct Tenant {
    pub name: String,
    /// Fair-share weight.
    pub weight: f64,
    /// Hard cap (empty: none).
    pub quota: Quota,
    /// What it is guaranteed; beyond it, its work borrows and may be reclaimed.
    pub guarantee: Quota,
}

/// A batch or training job of the trace.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    /// Index into `Workload::tenants`.
    pub tenant: usize,
    pub submit_ms: Millis,
    pub priority: Priority,
    /// One task's resources.
    pub resources: TaskResources,
    pub tasks: u32,
    /// All tasks start together or not at all (training gangs).
    pub gang: bool,
    /// How long each task runs when never interrupted.
    pub duration_ms: u64,
    /// Progress is saved this often; a preempted task resumes from its last save
    /// (0: it starts over).
    pub checkpoint_ms: u64,
    /// What the user declared as its limit (lets it backfill).
    pub max_runtime_ms: Option<u64>,
    /// Every task in one such domain (a gang held to a rack).
    pub topology: Option<caravel_core::TopologyLevel>,
}

/// An inference service: replicas follow the offered load through the autoscaler.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub tenant: usize,
    pub resources: TaskResources,
    /// Requests per second one ready replica serves within its latency objective.
    pub replica_rps: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// The share of a replica's capacity the autoscaler aims to use, in (0, 1].
    pub target_utilisation: f64,
    /// From placement to ready.
    pub startup_ms: u64,
    /// Offered load as steps: from `.0` on, `.1` requests per second; sorted by time. The
    /// load is zero before the first step and after `load_end_ms`.
    pub load: Vec<(Millis, f64)>,
    pub load_end_ms: Millis,
}

impl Service {
    /// Offered requests per second at `t`.
    pub fn rps_at(&self, t: Millis) -> f64 {
        if t >= self.load_end_ms {
            return 0.0;
        }
        match self.load.partition_point(|(s, _)| *s <= t) {
            0 => 0.0,
            k => self.load[k - 1].1,
        }
    }
}

/// Everything a replay runs.
#[derive(Debug, Clone, Default)]
pub struct Workload {
    pub name: String,
    pub tenants: Vec<Tenant>,
    pub jobs: Vec<Job>,
    pub services: Vec<Service>,
}

/// How the replay runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub sched: Config,
    /// Scheduling cycles happen on multiples of this, when something changed.
    pub cycle_ms: u64,
    /// Time series resolution (0: a thousandth of the trace's span).
    pub sample_ms: u64,
    /// How often the autoscaler measures load and decides.
    pub autoscale_ms: u64,
    /// Scale down only to the highest count wanted over this window (hysteresis).
    pub scale_down_window_ms: u64,
    /// Half-life of the fair-share usage history (0: none), as in the server.
    pub fair_share_half_life_ms: u64,
    /// When nothing was released since the last cycle, offer the scheduler only the work
    /// that arrived since: what waited did not fit the same free room then and cannot now
    /// (Kubernetes parks unschedulable pods the same way until a cluster event). Off: every
    /// cycle sees the whole queue. Placements are the same either way (a test holds them
    /// equal); long queues replay far faster.
    pub incremental: bool,
    /// A job that has waited this long without starting has nodes drained for it, oldest
    /// first, one at a time (`Scheduler::protect`); 0: never.
    pub starvation_ms: u64,
    /// Victims are chosen by the work they would lose since their last checkpoint (the
    /// scheduler is told each task's checkpoint period). Off: by the time since they
    /// started, as if nobody checkpointed.
    pub victims_know_checkpoints: bool,
}

impl Default for Options {
    fn default() -> Self {
        let sched = Config {
            explain_pending: false,
            ..Config::default()
        };
        Options {
            sched,
            cycle_ms: 1_000,
            sample_ms: 0,
            autoscale_ms: 1_000,
            scale_down_window_ms: 300_000,
            fair_share_half_life_ms: 3_600_000,
            incremental: true,
            starvation_ms: 0,
            victims_know_checkpoints: true,
        }
    }
}

impl Options {
    /// Options for `policy` on `w`: FGD-based policies (Caravel's, FGD) measure fragmentation
    /// against the workload's task shapes weighted by count, as the server does with what runs
    /// and waits.
    pub fn for_policy(policy: crate::baselines::Policy, w: &Workload, seed: u64) -> Options {
        let mut o = Options::default();
        o.sched.baseline = policy.baseline();
        o.sched.seed = seed;
        o.sched.fgd = expected_workload(w).map(std::sync::Arc::new);
        o
    }
}

/// Task shapes of `w` weighted by how many tasks have them; `None` without GPU work.
pub fn expected_workload(w: &Workload) -> Option<Vec<caravel_sched::fgd::WorkloadType>> {
    let jobs = w.jobs.iter().map(|j| (&j.resources, j.tasks as u64));
    let services = w
        .services
        .iter()
        .map(|s| (&s.resources, s.min_replicas.max(1) as u64));
    caravel_sched::fgd::workload_of(jobs.chain(services))
}

/// One point of the time series.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub t_ms: Millis,
    /// Thousandths of a GPU held by tasks, over the pool's.
    pub gpu_alloc: f64,
    pub cpu_alloc: f64,
    /// GPU held by tasks doing work that is kept (not later lost to a preemption is not
    /// known yet at sample time, so: held by tasks past their startup), over the pool's.
    pub gpu_busy: f64,
    pub running_tasks: u64,
    pub pending_tasks: u64,
}

/// What happened to one job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutcome {
    pub name: String,
    pub tenant: usize,
    pub submit_ms: Millis,
    /// When its first task started.
    pub start_ms: Option<Millis>,
    /// When its last task ended.
    pub end_ms: Option<Millis>,
    pub preemptions: u32,
    pub gpu_milli: u64,
}

impl JobOutcome {
    pub fn queue_ms(&self) -> Option<Millis> {
        self.start_ms.map(|s| s - self.submit_ms)
    }
    pub fn jct_ms(&self) -> Option<Millis> {
        self.end_ms.map(|e| e - self.submit_ms)
    }
}

/// What happened to one service.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceOutcome {
    pub name: String,
    /// Requests offered over the run.
    pub offered: f64,
    /// Requests that found a ready replica with room.
    pub served: f64,
    pub replica_seconds: f64,
    pub scale_ups: u64,
    pub scale_downs: u64,
    pub max_replicas_seen: u32,
}

impl ServiceOutcome {
    /// The share of offered requests served within the objective (1 with no load).
    pub fn slo_attainment(&self) -> f64 {
        if self.offered <= 0.0 {
            1.0
        } else {
            self.served / self.offered
        }
    }
}

/// The whole result of a replay.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub jobs: Vec<JobOutcome>,
    pub services: Vec<ServiceOutcome>,
    pub samples: Vec<Sample>,
    /// Per tenant: GPU-time received within its entitlement over GPU-time it was entitled to
    /// and asked for (1: it always got what it was owed when it wanted it).
    pub share_attainment: Vec<f64>,
    pub preemptions: u64,
    /// GPU-hours of work thrown away by preemptions (progress since the last checkpoint).
    pub lost_gpu_hours: f64,
    /// GPU-hours held by tasks in total.
    pub gpu_hours: f64,
    pub cycles: u64,
    /// Passes that ended with the head-of-line job holding a reservation (EASY backfill).
    pub reserved_cycles: u64,
    /// Jobs offered to the scheduler, summed over cycles (the cost of long queues).
    pub job_offers: u64,
    pub placements: u64,
    pub end_ms: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// Task ends first at a given instant, so its room is free for arrivals.
    Finish(u64),
    Arrive(usize),
    Tick,
    /// A service replica finished starting.
    Ready(u64),
    /// Nothing happens: a scheduling cycle is due (preemptions still settling).
    Wake,
}

#[derive(Debug, Clone, Default)]
struct TaskSt {
    /// Work kept from earlier runs.
    saved_ms: u64,
    run: Option<u64>,
    done: bool,
}

#[derive(Debug, Clone)]
struct JobSt {
    tasks: Vec<TaskSt>,
    pending: BTreeSet<u32>,
    arrived: bool,
    first_start: Option<Millis>,
    done_tasks: u32,
    end: Option<Millis>,
    preemptions: u32,
    /// For services: which service.
    service: Option<usize>,
    /// GPU-milliseconds of service received by runs that have stopped (lost work too).
    attained_gpu_ms: u64,
}

#[derive(Debug, Clone)]
struct RunSt {
    job: usize,
    index: u32,
    model: Option<String>,
    start: Millis,
}

/// Requests of one job as the scheduler sees them (services included, after the trace's
/// jobs).
struct Spec {
    tenant: usize,
    priority: Priority,
    resources: TaskResources,
    gang: bool,
    duration_ms: u64,
    checkpoint_ms: u64,
    max_runtime_ms: Option<u64>,
    topology: Option<caravel_core::TopologyLevel>,
    seq: u64,
}

struct SvcSt {
    window: VecDeque<(Millis, u32)>,
    out: ServiceOutcome,
    /// Running replicas by start time (scale-down stops the newest first).
    running: BTreeSet<(Millis, u64)>,
    /// Replicas past their startup: they serve.
    ready: HashSet<u64>,
    /// Replica indices neither running nor waiting.
    free: BTreeSet<u32>,
}

fn gpu_milli(r: &TaskResources) -> u64 {
    r.gpu.as_ref().map(|g| g.milli_total()).unwrap_or(0)
}

fn percentile_sorted(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    // Nearest rank: the smallest value with at least q of the values at or below it.
    let k = ((q * v.len() as f64).ceil() as usize).max(1) - 1;
    v[k.min(v.len() - 1)]
}

/// Quantile `q` in [0, 1] of `v` (nearest rank on the sorted values); NaN when empty.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(|a, b| a.total_cmp(b));
    percentile_sorted(&s, q)
}

struct Engine<'a> {
    w: &'a Workload,
    opt: &'a Options,
    sched: Scheduler,
    specs: Vec<Spec>,
    jobs: Vec<JobSt>,
    runs: HashMap<u64, RunSt>,
    /// Room freed by the last preemptions, held for the jobs they were made for.
    holds: Vec<caravel_sched::Hold>,
    next_run: u64,
    events: BinaryHeap<Reverse<(Millis, Ev, u64)>>,
    seq: u64,
    tenants: HashMap<TenantId, TenantSnap>,
    /// Per tenant: GPU thousandths waiting.
    pending_gpu: Vec<u64>,
    pending_tasks: u64,
    /// Jobs with tasks to place, in submission order.
    queue: BTreeSet<usize>,
    dirty: bool,
    total_gpu: f64,
    total_cpu: f64,
    held_gpu: u64,
    held_cpu: u64,
    svcs: Vec<SvcSt>,
    out: Outcome,
    attained: Vec<(f64, f64)>,
    last_history: Millis,
    node_pos: HashMap<NodeId, usize>,
    /// Something was released (or time-driven state moved) since the last full cycle.
    full_needed: bool,
    /// Jobs with work newly waiting since the last cycle.
    fresh: BTreeSet<usize>,
    /// The last cycle held a reservation: the next must see the whole queue again.
    reserved: bool,
    /// The queue as the scheduler takes it, by job, kept in step with `touched` jobs so a
    /// cycle does not rebuild every request.
    reqs: Vec<JobReq>,
    touched: BTreeSet<usize>,
}

/// Replays `w` on `nodes` to the end: every job finished (or left unplaceable) and every
/// service's load over.
pub fn run(
    nodes: Vec<NodeSnap>,
    w: &Workload,
    opt: &Options,
    progress: &mut dyn FnMut(Millis, Millis),
) -> Outcome {
    let total_gpu: f64 = nodes
        .iter()
        .map(|n| n.capacity.devices.len() as f64 * 1000.0)
        .sum();
    let total_cpu: f64 = nodes.iter().map(|n| n.capacity.cpu_milli as f64).sum();
    let mut specs: Vec<Spec> = w
        .jobs
        .iter()
        .enumerate()
        .map(|(i, j)| Spec {
            tenant: j.tenant,
            priority: j.priority,
            resources: j.resources.clone(),
            gang: j.gang,
            duration_ms: j.duration_ms,
            checkpoint_ms: j.checkpoint_ms,
            max_runtime_ms: j.max_runtime_ms,
            topology: j.topology,
            seq: i as u64,
        })
        .collect();
    let mut jobs: Vec<JobSt> = w
        .jobs
        .iter()
        .map(|j| JobSt {
            tasks: vec![TaskSt::default(); j.tasks as usize],
            pending: BTreeSet::new(),
            arrived: false,
            first_start: None,
            done_tasks: 0,
            end: None,
            preemptions: 0,
            service: None,
            attained_gpu_ms: 0,
        })
        .collect();
    for (k, s) in w.services.iter().enumerate() {
        specs.push(Spec {
            tenant: s.tenant,
            priority: Priority::Online,
            resources: s.resources.clone(),
            gang: false,
            duration_ms: u64::MAX,
            checkpoint_ms: 0,
            max_runtime_ms: None,
            topology: None,
            seq: (w.jobs.len() + k) as u64,
        });
        jobs.push(JobSt {
            tasks: vec![TaskSt::default(); s.max_replicas as usize],
            pending: BTreeSet::new(),
            arrived: true,
            first_start: None,
            done_tasks: 0,
            end: None,
            preemptions: 0,
            service: Some(k),
            attained_gpu_ms: 0,
        });
    }
    let mut tenants = HashMap::new();
    for (i, t) in w.tenants.iter().enumerate() {
        tenants.insert(
            TenantId(i as u64),
            TenantSnap {
                quota: t.quota.clone(),
                used: ResourceSum::default(),
                weight: t.weight,
                history: Default::default(),
                guarantee: t.guarantee.clone(),
            },
        );
    }
    let node_pos = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
    let mut e = Engine {
        full_needed: true,
        fresh: BTreeSet::new(),
        reserved: false,
        reqs: Vec::new(),
        touched: BTreeSet::new(),
        node_pos,
        w,
        opt,
        sched: Scheduler::new(opt.sched.clone(), nodes),
        specs,
        jobs,
        runs: HashMap::new(),
        holds: Vec::new(),
        next_run: 1,
        events: BinaryHeap::new(),
        seq: 0,
        tenants,
        pending_gpu: vec![0; w.tenants.len()],
        pending_tasks: 0,
        queue: BTreeSet::new(),
        dirty: false,
        total_gpu,
        total_cpu,
        held_gpu: 0,
        held_cpu: 0,
        svcs: w
            .services
            .iter()
            .map(|s| SvcSt {
                running: BTreeSet::new(),
                ready: HashSet::new(),
                free: (0..s.max_replicas).collect(),
                window: VecDeque::new(),
                out: ServiceOutcome {
                    name: s.name.clone(),
                    ..Default::default()
                },
            })
            .collect(),
        out: Outcome::default(),
        attained: vec![(0.0, 0.0); w.tenants.len()],
        last_history: 0,
    };
    e.go(progress);
    e.out
}

impl Engine<'_> {
    fn push(&mut self, t: Millis, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse((t, ev, self.seq)));
    }

    fn go(&mut self, progress: &mut dyn FnMut(Millis, Millis)) {
        let w = self.w;
        for (i, j) in w.jobs.iter().enumerate() {
            self.push(j.submit_ms, Ev::Arrive(i));
        }
        let start = w
            .jobs
            .iter()
            .map(|j| j.submit_ms)
            .chain(
                w.services
                    .iter()
                    .filter_map(|s| s.load.first().map(|l| l.0)),
            )
            .min()
            .unwrap_or(0);
        let load_end = w.services.iter().map(|s| s.load_end_ms).max();
        let last_submit = w.jobs.iter().map(|j| j.submit_ms).max().unwrap_or(start);
        let span_guess = (last_submit.max(load_end.unwrap_or(start)) - start).max(1);
        let sample_ms = if self.opt.sample_ms > 0 {
            self.opt.sample_ms as i64
        } else {
            (span_guess / 1000).max(1000)
        };
        if !w.services.is_empty() {
            self.push(start, Ev::Tick);
        }
        self.last_history = start;
        let cycle = self.opt.cycle_ms.max(1) as i64;
        let mut next_sample = start;
        let mut now = start;
        let mut reported = start;
        while let Some(&Reverse((t, _, _))) = self.events.peek() {
            // Everything up to the next cycle boundary is applied, then one cycle runs there.
            let boundary = t.div_euclid(cycle) * cycle + if t % cycle == 0 { 0 } else { cycle };
            while next_sample < t {
                self.sample(next_sample);
                next_sample += sample_ms;
            }
            while let Some(&Reverse((te, ev, _))) = self.events.peek() {
                if te > boundary {
                    break;
                }
                self.events.pop();
                now = te;
                match ev {
                    Ev::Arrive(j) => self.arrive(j),
                    Ev::Finish(run) => self.finish(run, te),
                    Ev::Tick => self.tick(te, load_end.unwrap_or(te)),
                    Ev::Wake => {
                        self.dirty = true;
                        self.full_needed = true;
                    }
                    Ev::Ready(run) => {
                        if let Some(k) = self.runs.get(&run).and_then(|r| self.jobs[r.job].service)
                        {
                            self.svcs[k].ready.insert(run);
                        }
                    }
                }
            }
            if self.dirty {
                while next_sample < boundary {
                    self.sample(next_sample);
                    next_sample += sample_ms;
                }
                now = boundary;
                self.cycle(boundary);
            }
            if now - reported >= span_guess / 200 {
                reported = now;
                progress(now - start, span_guess);
            }
        }
        while next_sample <= now {
            self.sample(next_sample);
            next_sample += sample_ms;
        }
        // Services still up when their load ended: their replicas stop now.
        let up: Vec<u64> = self.runs.keys().copied().collect();
        let mut up = up;
        up.sort_unstable();
        for r in up {
            self.stop(r, now, false);
        }
        self.out.end_ms = now;
        for (i, j) in self.w.jobs.iter().enumerate() {
            let s = &self.jobs[i];
            self.out.jobs.push(JobOutcome {
                name: j.name.clone(),
                tenant: j.tenant,
                submit_ms: j.submit_ms,
                start_ms: s.first_start,
                end_ms: s.end,
                preemptions: s.preemptions,
                gpu_milli: gpu_milli(&j.resources) * j.tasks as u64,
            });
        }
        self.out.services = self.svcs.iter().map(|s| s.out.clone()).collect();
        self.out.share_attainment = self
            .attained
            .iter()
            .map(|(got, owed)| if *owed > 0.0 { got / owed } else { 1.0 })
            .collect();
        progress(span_guess, span_guess);
    }

    fn arrive(&mut self, j: usize) {
        let st = &mut self.jobs[j];
        st.arrived = true;
        let n = st.tasks.len() as u32;
        st.pending.extend(0..n);
        self.touched.insert(j);
        let sp = &self.specs[j];
        self.pending_gpu[sp.tenant] += gpu_milli(&sp.resources) * n as u64;
        self.pending_tasks += n as u64;
        if n > 0 {
            self.queue.insert(j);
            self.fresh.insert(j);
        }
        self.dirty = true;
    }

    fn finish(&mut self, run: u64, t: Millis) {
        let Some(r) = self.runs.get(&run) else {
            return; // stopped earlier (preempted or scaled down)
        };
        let (j, idx) = (r.job, r.index);
        self.stop(run, t, false);
        let st = &mut self.jobs[j];
        st.tasks[idx as usize].done = true;
        st.done_tasks += 1;
        if st.done_tasks as usize == st.tasks.len() {
            st.end = Some(t);
        }
    }

    /// Stops a running task: frees what it held; if `requeue`, its task waits again with
    /// the progress it saved.
    /// Stops `run` at `t` (requeued, or gone for good) and returns what it held.
    fn stop(&mut self, run: u64, t: Millis, requeue: bool) -> Option<caravel_sched::RunningTask> {
        let r = self.runs.remove(&run)?;
        let held = self.sched.remove_running(RunId(run));
        let sp = &self.specs[r.job];
        let g = gpu_milli(&sp.resources);
        if let Some(ts) = self.tenants.get_mut(&TenantId(sp.tenant as u64)) {
            ts.used.sub_task_on(&sp.resources, r.model.as_deref(), 1);
        }
        self.held_gpu -= g;
        self.held_cpu -= sp.resources.cpu_milli;
        let ran = (t - r.start).max(0) as u64;
        self.out.gpu_hours += g as f64 / 1000.0 * ran as f64 / 3.6e6;
        self.jobs[r.job].attained_gpu_ms += g * ran / 1000;
        if let Some(k) = self.jobs[r.job].service {
            let sv = &mut self.svcs[k];
            sv.out.replica_seconds += ran as f64 / 1000.0;
            sv.running.remove(&(r.start, run));
            sv.ready.remove(&run);
            if !requeue {
                sv.free.insert(r.index);
            }
        }
        let task = &mut self.jobs[r.job].tasks[r.index as usize];
        task.run = None;
        if requeue {
            let kept = ran
                .checked_div(sp.checkpoint_ms)
                .map_or(0, |k| k * sp.checkpoint_ms);
            self.out.lost_gpu_hours += g as f64 / 1000.0 * (ran - kept) as f64 / 3.6e6;
            task.saved_ms += kept;
            let st = &mut self.jobs[r.job];
            st.pending.insert(r.index);
            self.touched.insert(r.job);
            self.pending_gpu[sp.tenant] += g;
            self.pending_tasks += 1;
            self.queue.insert(r.job);
        }
        self.dirty = true;
        self.full_needed = true;
        held
    }

    fn cycle(&mut self, now: Millis) {
        self.dirty = false;
        if self.opt.fair_share_half_life_ms > 0 && now > self.last_history {
            let dt = (now - self.last_history) as u64;
            for t in self.tenants.values_mut() {
                let held = t.used.clone();
                t.history
                    .advance(&held, dt, self.opt.fair_share_half_life_ms);
            }
            self.last_history = now;
        }
        // A preemption frees room only for the next pass; a few passes settle it.
        for _ in 0..4 {
            self.dirty = false;
            if self.queue.is_empty() {
                return;
            }
            let protect = self.starving(now);
            let full =
                !self.opt.incremental || self.full_needed || self.reserved || !protect.is_empty();
            let offer: Vec<usize> = if full {
                self.queue.iter().copied().collect()
            } else {
                self.fresh.intersection(&self.queue).copied().collect()
            };
            self.full_needed = false;
            self.fresh.clear();
            if offer.is_empty() {
                return;
            }
            self.sync_reqs();
            let small: Vec<JobReq>;
            let reqs: &[JobReq] = if full {
                &self.reqs
            } else {
                small = offer
                    .iter()
                    .filter_map(|&j| {
                        let k = self
                            .reqs
                            .binary_search_by_key(&JobId(j as u64), |r| r.id)
                            .ok()?;
                        Some(self.reqs[k].clone())
                    })
                    .collect();
                &small
            };
            // The room the last pass's victims freed is held for the jobs they were
            // stopped for, as the server holds it.
            let plan = self.sched.cycle(caravel_sched::CycleInput {
                now,
                jobs: reqs,
                tenants: &mut self.tenants,
                // Told of every start and end as it happens.
                running: None,
                holds: std::mem::take(&mut self.holds),
                starving: protect,
                zone_preferences: HashMap::new(),
            });
            self.out.cycles += 1;
            self.reserved = !plan.reservations.is_empty();
            self.out.reserved_cycles += self.reserved as u64;
            self.out.job_offers += reqs.len() as u64;
            for p in &plan.placements {
                self.start(
                    p.job.0 as usize,
                    p.index,
                    p.node,
                    &p.devices,
                    now,
                    p.borrowed,
                );
            }
            if plan.preemptions.is_empty() {
                return;
            }
            let mut victims: Vec<(u64, JobId)> = plan
                .preemptions
                .iter()
                .map(|p| (p.run.0, p.for_job))
                .collect();
            // A gang stops as a whole: its other members cannot go on without the victim.
            let mut more = Vec::new();
            for (v, for_job) in &victims {
                if let Some(r) = self.runs.get(v) {
                    if self.specs[r.job].gang {
                        more.extend(
                            self.jobs[r.job]
                                .tasks
                                .iter()
                                .filter_map(|t| Some((t.run?, *for_job))),
                        );
                    }
                }
            }
            victims.extend(more);
            victims.sort_unstable();
            victims.dedup_by_key(|v| v.0);
            for (v, for_job) in victims {
                if let Some(r) = self.runs.get(&v) {
                    let j = r.job;
                    self.jobs[j].preemptions += 1;
                    self.out.preemptions += 1;
                    if let Some(t) = self.stop(v, now, true) {
                        self.holds.push(caravel_sched::Hold {
                            job: for_job,
                            priority: self.specs[for_job.0 as usize].priority,
                            node: t.node,
                            resources: t.resources,
                            devices: t.devices,
                        });
                    }
                }
            }
        }
        if self.dirty {
            self.push(now + self.opt.cycle_ms.max(1) as i64, Ev::Wake);
            self.dirty = false;
        }
    }

    /// Trace jobs that have waited `starvation_ms` or longer without starting, oldest first.
    fn starving(&self, now: Millis) -> Vec<JobId> {
        if self.opt.starvation_ms == 0 {
            return Vec::new();
        }
        let limit = self.opt.starvation_ms as i64;
        let mut v: Vec<(Millis, usize)> = self
            .queue
            .iter()
            .filter(|&&j| j < self.w.jobs.len() && self.jobs[j].first_start.is_none())
            .map(|&j| (self.w.jobs[j].submit_ms, j))
            .filter(|(t, _)| now - t >= limit)
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, j)| JobId(j as u64)).collect()
    }

    /// Brings `reqs` up to date with the jobs touched since the last cycle.
    fn sync_reqs(&mut self) {
        let touched = std::mem::take(&mut self.touched);
        // Updates in place; jobs that left the queue go in one pass and jobs that joined
        // it are appended and merged (a long queue would otherwise be shifted once for
        // every job that starts).
        let mut left: Vec<JobId> = Vec::new();
        let mut joined: Vec<JobReq> = Vec::new();
        for &j in &touched {
            let at = self.reqs.binary_search_by_key(&JobId(j as u64), |r| r.id);
            match (at, self.queue.contains(&j)) {
                (Ok(k), true) => {
                    self.reqs[k].pending = self.jobs[j].pending.iter().copied().collect();
                    self.reqs[k].attained_gpu_ms = self.jobs[j].attained_gpu_ms;
                }
                (Ok(_), false) => left.push(JobId(j as u64)),
                (Err(_), true) => joined.push(self.req_of(j)),
                (Err(_), false) => {}
            }
        }
        if !left.is_empty() {
            // Both in id order.
            let mut gone = left.into_iter().peekable();
            self.reqs.retain(|r| gone.next_if_eq(&r.id).is_none());
        }
        if !joined.is_empty() {
            let sorted = self.reqs.last().is_none_or(|r| r.id < joined[0].id);
            self.reqs.extend(joined);
            if !sorted {
                // Two sorted runs: the stable sort merges them in one pass.
                self.reqs.sort_by_key(|r| r.id);
            }
        }
    }

    fn req_of(&self, j: usize) -> JobReq {
        let sp = &self.specs[j];
        JobReq {
            id: JobId(j as u64),
            tenant: TenantId(sp.tenant as u64),
            priority: sp.priority,
            seq: sp.seq,
            resources: sp.resources.clone(),
            gang: sp.gang,
            min_tasks: None,
            pending: self.jobs[j].pending.iter().copied().collect(),
            topology: sp.topology,
            max_runtime_ms: sp.max_runtime_ms,
            attained_gpu_ms: self.jobs[j].attained_gpu_ms,
        }
    }

    fn start(
        &mut self,
        j: usize,
        index: u32,
        node: NodeId,
        devices: &[u32],
        now: Millis,
        borrowed: bool,
    ) {
        let run = self.next_run;
        self.next_run += 1;
        let sp = &self.specs[j];
        let model = devices
            .first()
            .and_then(|d| {
                let i = *self.node_pos.get(&node)?;
                self.sched.nodes()[i].model_of(*d)
            })
            .map(str::to_string);
        self.sched.add_running(RunningTask {
            run: RunId(run),
            job: JobId(j as u64),
            tenant: TenantId(sp.tenant as u64),
            node,
            priority: sp.priority,
            resources: sp.resources.clone(),
            devices: devices.to_vec(),
            started_ms: now,
            min_runtime_ms: 0,
            borrowed,
            expected_end_ms: sp.max_runtime_ms.map(|m| now + m as i64),
            gang_size: if sp.gang {
                self.jobs[j].tasks.len() as u32
            } else {
                1
            },
            attained_gpu_ms: self.jobs[j].attained_gpu_ms,
            saved_ms: None,
            save_every_ms: if self.opt.victims_know_checkpoints {
                sp.checkpoint_ms
            } else {
                0
            },
        });
        // Under LAS, queued work may preempt this job once it passes into a later queue
        // (or its minimum slice is over): a cycle must look then, even if nothing ends.
        let mut wakes: Vec<Millis> = Vec::new();
        if let Some(las) = self.opt.sched.las.as_ref() {
            let g = gpu_milli(&sp.resources)
                * if sp.gang {
                    self.jobs[j].tasks.len() as u64
                } else {
                    1
                };
            if sp.priority == Priority::Batch && g > 0 && (!sp.gang || index == 0) {
                let a = self.jobs[j].attained_gpu_ms;
                let next = las
                    .thresholds_gpu_s
                    .iter()
                    .map(|t| t.saturating_mul(1000))
                    .find(|t| *t > a);
                if let Some(t) = next {
                    let after = ((t - a) * 1000).div_ceil(g);
                    wakes.push(now + after as i64);
                }
                if las.min_slice_ms > 0 {
                    wakes.push(now + las.min_slice_ms as i64);
                }
            }
        }
        // A task that could be a victim changes what waiting work could preempt.
        if borrowed || sp.priority == Priority::Spot {
            self.full_needed = true;
        }
        let g = gpu_milli(&sp.resources);
        self.held_gpu += g;
        self.held_cpu += sp.resources.cpu_milli;
        self.pending_gpu[sp.tenant] -= g;
        self.pending_tasks -= 1;
        let remaining = sp.duration_ms;
        let st = &mut self.jobs[j];
        st.pending.remove(&index);
        self.touched.insert(j);
        if st.pending.is_empty() {
            self.queue.remove(&j);
        }
        st.first_start.get_or_insert(now);
        let task = &mut st.tasks[index as usize];
        task.run = Some(run);
        let left = remaining.saturating_sub(task.saved_ms);
        self.runs.insert(
            run,
            RunSt {
                job: j,
                index,

                model,
                start: now,
            },
        );
        self.out.placements += 1;
        if remaining != u64::MAX {
            self.push(now + left as i64, Ev::Finish(run));
        }
        if let Some(k) = self.jobs[j].service {
            self.svcs[k].running.insert((now, run));
            let up = self.w.services[k].startup_ms as i64;
            self.push(now + up, Ev::Ready(run));
        }
        for t in wakes {
            self.push(t, Ev::Wake);
        }
    }

    fn tick(&mut self, now: Millis, load_end: Millis) {
        let dt = self.opt.autoscale_ms.max(1) as f64 / 1000.0;
        for k in 0..self.w.services.len() {
            let s = &self.w.services[k];
            let j = self.w.jobs.len() + k;
            let rps = s.rps_at(now);
            let sv = &mut self.svcs[k];
            let ready = sv.ready.len();
            sv.out.offered += rps * dt;
            sv.out.served += rps.min(ready as f64 * s.replica_rps) * dt;
            let per = (s.replica_rps * s.target_utilisation.clamp(0.01, 1.0)).max(1e-9);
            let want = ((rps / per).ceil() as u32).clamp(s.min_replicas, s.max_replicas);
            sv.window.push_back((now, want));
            while sv
                .window
                .front()
                .is_some_and(|(t, _)| now - t > self.opt.scale_down_window_ms as i64)
            {
                sv.window.pop_front();
            }
            // The window's maximum: scale down only to what was wanted all along it.
            let target = sv
                .window
                .iter()
                .map(|x| x.1)
                .max()
                .unwrap_or(want)
                .max(want);
            let n = (sv.running.len() + self.jobs[j].pending.len()) as u32;
            let g = gpu_milli(&s.resources);
            if target > n {
                let add: Vec<u32> = sv
                    .free
                    .iter()
                    .take((target - n) as usize)
                    .copied()
                    .collect();
                for i in add {
                    sv.free.remove(&i);
                    self.jobs[j].pending.insert(i);
                    self.pending_gpu[s.tenant] += g;
                    self.pending_tasks += 1;
                }
                self.queue.insert(j);
                self.touched.insert(j);
                self.fresh.insert(j);
                sv.out.scale_ups += 1;
                self.dirty = true;
            } else if target < n {
                // Waiting replicas go first, then the newest running ones.
                let mut drop = (n - target) as usize;
                while drop > 0 {
                    let Some(i) = self.jobs[j].pending.pop_last() else {
                        break;
                    };
                    sv.free.insert(i);
                    self.pending_gpu[s.tenant] -= g;
                    self.pending_tasks -= 1;
                    drop -= 1;
                }
                self.touched.insert(j);
                if self.jobs[j].pending.is_empty() {
                    self.queue.remove(&j);
                }
                let newest: Vec<u64> = sv.running.iter().rev().take(drop).map(|x| x.1).collect();
                sv.out.scale_downs += 1;
                for r in newest {
                    self.stop(r, now, false);
                }
                self.dirty = true;
            }
            let out = &mut self.svcs[k].out;
            out.max_replicas_seen = out.max_replicas_seen.max(target.min(s.max_replicas));
        }
        let next = now + self.opt.autoscale_ms.max(1) as i64;
        if next <= load_end {
            self.push(next, Ev::Tick);
        } else {
            // The load is over: every replica goes.
            for k in 0..self.w.services.len() {
                let j = self.w.jobs.len() + k;
                let runs: Vec<u64> = self.svcs[k].running.iter().map(|x| x.1).collect();
                for r in runs {
                    self.stop(r, now, false);
                }
                let g = gpu_milli(&self.w.services[k].resources);
                let n = self.jobs[j].pending.len() as u64;
                self.pending_gpu[self.w.services[k].tenant] -= g * n;
                self.pending_tasks -= n;
                let waiting = std::mem::take(&mut self.jobs[j].pending);
                self.svcs[k].free.extend(waiting);
                self.queue.remove(&j);
                self.touched.insert(j);
            }
        }
    }

    fn sample(&mut self, t: Millis) {
        // Busy: held, less replicas still starting.
        let starting: u64 = self
            .svcs
            .iter()
            .zip(&self.w.services)
            .map(|(sv, s)| (sv.running.len() - sv.ready.len()) as u64 * gpu_milli(&s.resources))
            .sum();
        let busy = self.held_gpu - starting;
        let frac = |x: f64, tot: f64| if tot > 0.0 { x / tot } else { 0.0 };
        self.out.samples.push(Sample {
            t_ms: t,
            gpu_alloc: frac(self.held_gpu as f64, self.total_gpu),
            cpu_alloc: frac(self.held_cpu as f64, self.total_cpu),
            gpu_busy: frac(busy as f64, self.total_gpu),
            running_tasks: self.runs.len() as u64,
            pending_tasks: self.pending_tasks,
        });
        // Share attainment: what each tenant with GPU demand was owed now (its guarantee,
        // else its weighted share of the pool among tenants asking), capped by what it
        // asked for, against what it held.
        let held: Vec<u64> = (0..self.w.tenants.len())
            .map(|i| {
                self.tenants[&TenantId(i as u64)]
                    .used
                    .gpu_milli
                    .values()
                    .sum()
            })
            .collect();
        let demand: Vec<u64> = (0..held.len())
            .map(|i| held[i] + self.pending_gpu[i])
            .collect();
        let weights: f64 = (0..held.len())
            .filter(|i| demand[*i] > 0)
            .map(|i| self.w.tenants[i].weight.max(1e-9))
            .sum();
        for i in 0..held.len() {
            if demand[i] == 0 {
                continue;
            }
            let g = &self.w.tenants[i].guarantee;
            let owed = if g.gpus.is_empty() {
                self.total_gpu * self.w.tenants[i].weight.max(1e-9) / weights
            } else {
                g.gpus.values().map(|x| *x as f64 * 1000.0).sum()
            };
            let need = (demand[i] as f64).min(owed);
            self.attained[i].0 += (held[i] as f64).min(need);
            self.attained[i].1 += need;
        }
    }
}

/// Headline figures of an outcome.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    pub jobs: usize,
    pub jobs_finished: usize,
    pub jobs_never_started: usize,
    pub avg_jct_s: f64,
    pub p50_jct_s: f64,
    pub p99_jct_s: f64,
    pub avg_queue_s: f64,
    pub p50_queue_s: f64,
    pub p99_queue_s: f64,
    /// Over the whole run, drain included.
    pub gpu_alloc_mean_pct: f64,
    /// While jobs arrive (first to last submission): the steady state, without the drain.
    pub gpu_alloc_arrivals_pct: f64,
    pub gpu_busy_mean_pct: f64,
    pub cpu_alloc_mean_pct: f64,
    pub preemptions: u64,
    pub lost_gpu_hours: f64,
    pub gpu_hours: f64,
    pub share_attainment_min: f64,
    pub share_attainment_mean: f64,
    pub slo_attainment_min: f64,
    pub slo_attainment_mean: f64,
    pub makespan_s: f64,
    pub cycles: u64,
    pub reserved_cycles: u64,
    pub placements: u64,
}

impl Outcome {
    pub fn summary(&self) -> Summary {
        let jct: Vec<f64> = self
            .jobs
            .iter()
            .filter_map(|j| j.jct_ms())
            .map(|x| x as f64 / 1000.0)
            .collect();
        let q: Vec<f64> = self
            .jobs
            .iter()
            .filter_map(|j| j.queue_ms())
            .map(|x| x as f64 / 1000.0)
            .collect();
        let mean = |v: &[f64]| {
            if v.is_empty() {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        // Time-weighted over the busy span: from the first to the last sample.
        let alloc: Vec<f64> = self.samples.iter().map(|s| s.gpu_alloc * 100.0).collect();
        let busy: Vec<f64> = self.samples.iter().map(|s| s.gpu_busy * 100.0).collect();
        let cpu: Vec<f64> = self.samples.iter().map(|s| s.cpu_alloc * 100.0).collect();
        let slo: Vec<f64> = self.services.iter().map(|s| s.slo_attainment()).collect();
        let min = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::min);
        let start = self.jobs.iter().map(|j| j.submit_ms).min().unwrap_or(0);
        let last = self.jobs.iter().map(|j| j.submit_ms).max().unwrap_or(0);
        let window: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.t_ms >= start && s.t_ms <= last)
            .map(|s| s.gpu_alloc * 100.0)
            .collect();
        Summary {
            jobs: self.jobs.len(),
            jobs_finished: jct.len(),
            jobs_never_started: self.jobs.iter().filter(|j| j.start_ms.is_none()).count(),
            avg_jct_s: mean(&jct),
            p50_jct_s: percentile(&jct, 0.5),
            p99_jct_s: percentile(&jct, 0.99),
            avg_queue_s: mean(&q),
            p50_queue_s: percentile(&q, 0.5),
            p99_queue_s: percentile(&q, 0.99),
            gpu_alloc_mean_pct: mean(&alloc),
            gpu_alloc_arrivals_pct: mean(&window),
            gpu_busy_mean_pct: mean(&busy),
            cpu_alloc_mean_pct: mean(&cpu),
            preemptions: self.preemptions,
            lost_gpu_hours: self.lost_gpu_hours,
            gpu_hours: self.gpu_hours,
            share_attainment_min: min(&self.share_attainment),
            share_attainment_mean: mean(&self.share_attainment),
            slo_attainment_min: min(&slo),
            slo_attainment_mean: mean(&slo),
            makespan_s: (self.end_ms - start) as f64 / 1000.0,
            cycles: self.cycles,
            reserved_cycles: self.reserved_cycles,
            placements: self.placements,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caravel_core::{Capacity, Device, GpuRequest};

    fn node(i: u64, gpus: u32) -> NodeSnap {
        NodeSnap::new(
            NodeId(i),
            Capacity {
                isolation: Default::default(),
                images: false,
                cpu_milli: 32_000,
                memory_bytes: 256 << 30,
                devices: (0..gpus)
                    .map(|k| Device {
                        index: k,
                        model: "A100".into(),
                    })
                    .collect(),
            },
        )
    }

    fn gpus(n: u32) -> TaskResources {
        TaskResources {
            needs: Default::default(),
            cpu_milli: 1000,
            memory_bytes: 1 << 30,
            gpu: Some(GpuRequest::whole("A100", n)),
        }
    }

    fn job(name: &str, tenant: usize, at_s: i64, g: u32, tasks: u32, dur_s: u64) -> Job {
        Job {
            name: name.into(),
            tenant,
            submit_ms: at_s * 1000,
            priority: Priority::Batch,
            resources: gpus(g),
            tasks,
            gang: tasks > 1,
            duration_ms: dur_s * 1000,
            checkpoint_ms: 0,
            max_runtime_ms: None,
            topology: None,
        }
    }

    fn one_tenant(jobs: Vec<Job>) -> Workload {
        Workload {
            name: "t".into(),
            tenants: vec![Tenant {
                name: "a".into(),
                weight: 1.0,
                ..Default::default()
            }],
            jobs,
            services: vec![],
        }
    }

    fn replay(nodes: Vec<NodeSnap>, w: &Workload) -> Outcome {
        run(nodes, w, &Options::default(), &mut |_, _| {})
    }

    #[test]
    fn a_job_waits_for_room_and_its_times_add_up() {
        let w = one_tenant(vec![job("a", 0, 0, 8, 1, 100), job("b", 0, 10, 8, 1, 50)]);
        let o = replay(vec![node(0, 8)], &w);
        let a = &o.jobs[0];
        let b = &o.jobs[1];
        assert_eq!((a.queue_ms(), a.jct_ms()), (Some(0), Some(100_000)));
        // b arrives at 10 s, starts when a ends at 100 s, runs 50 s.
        assert_eq!(b.start_ms, Some(100_000));
        assert_eq!(b.jct_ms(), Some(140_000));
        let s = o.summary();
        assert_eq!((s.jobs_finished, s.preemptions), (2, 0));
        assert!(
            (s.gpu_hours - 8.0 * 150.0 / 3600.0).abs() < 1e-9,
            "{}",
            s.gpu_hours
        );
        assert_eq!(s.p50_queue_s, 0.0);
        assert_eq!(s.p99_queue_s, 90.0);
    }

    #[test]
    fn the_head_job_reserves_room_and_only_work_that_ends_before_it_backfills() {
        // One 8-GPU node; `a` holds half until 100 s. `head` needs all eight; `short` fits
        // beside `a` and ends by 100 s; `long` fits too but would run past it.
        let jobs = vec![
            job("a", 0, 0, 4, 1, 100),
            job("head", 0, 1, 8, 1, 10),
            job("short", 0, 2, 4, 1, 50),
            job("long", 0, 3, 4, 1, 200),
        ];
        let declared: Vec<Job> = jobs
            .iter()
            .cloned()
            .map(|mut j| {
                j.max_runtime_ms = Some(j.duration_ms);
                j
            })
            .collect();
        let o = replay(vec![node(0, 8)], &one_tenant(declared));
        let starts: Vec<Option<Millis>> = o.jobs.iter().map(|j| j.start_ms).collect();
        assert_eq!(
            starts,
            vec![Some(0), Some(100_000), Some(2_000), Some(110_000)]
        );
        assert!(o.reserved_cycles > 0);
        // Without declared limits nothing can be reserved: `long` takes the room after
        // `short` and the head job waits for it.
        let o = replay(vec![node(0, 8)], &one_tenant(jobs));
        assert_eq!(o.jobs[1].start_ms, Some(252_000));
        assert_eq!(o.reserved_cycles, 0);
    }

    #[test]
    fn gangs_start_whole_or_not_at_all() {
        // Two nodes of 4; a gang of 2x4 must wait for both to be free.
        let w = one_tenant(vec![
            job("small", 0, 0, 1, 1, 100),
            job("gang", 0, 1, 4, 2, 10),
        ]);
        let o = replay(vec![node(0, 4), node(1, 4)], &w);
        assert_eq!(o.jobs[1].start_ms, Some(100_000));
        assert_eq!(o.jobs[1].end_ms, Some(110_000));
        assert!(o.samples.iter().all(|s| s.gpu_alloc <= 1.0));
    }

    #[test]
    fn spot_work_is_preempted_and_resumes_from_its_checkpoint() {
        let mut spot = job("spot", 0, 0, 8, 1, 1000);
        spot.priority = Priority::Spot;
        spot.checkpoint_ms = 60_000;
        let w = one_tenant(vec![spot, job("batch", 0, 150, 8, 1, 100)]);
        let o = replay(vec![node(0, 8)], &w);
        let (s, b) = (&o.jobs[0], &o.jobs[1]);
        assert_eq!(
            b.start_ms,
            Some(150_000),
            "the batch job displaces spot at once"
        );
        assert_eq!(s.preemptions, 1);
        // 150 s ran, 120 s saved (two checkpoints): 880 s left after batch ends at 250 s.
        assert_eq!(s.end_ms, Some(250_000 + 880_000));
        assert_eq!(o.preemptions, 1);
        assert!((o.lost_gpu_hours - 8.0 * 30.0 / 3600.0).abs() < 1e-9);
    }

    #[test]
    fn borrowed_capacity_is_reclaimed_for_its_owner() {
        let mut g = Quota::default();
        g.gpus.insert("A100".into(), 8);
        let w = Workload {
            name: "t".into(),
            tenants: vec![
                Tenant {
                    name: "owner".into(),
                    weight: 1.0,
                    guarantee: g,
                    ..Default::default()
                },
                Tenant {
                    name: "borrower".into(),
                    weight: 1.0,
                    ..Default::default()
                },
            ],
            jobs: vec![
                job("borrow", 1, 0, 8, 1, 1000),
                job("own", 0, 100, 8, 1, 100),
            ],
            services: vec![],
        };
        let o = replay(vec![node(0, 8)], &w);
        assert_eq!(
            o.jobs[1].start_ms,
            Some(100_000),
            "the owner gets its guarantee back"
        );
        assert_eq!(o.jobs[0].preemptions, 1);
        assert!(o.share_attainment[0] > 0.99, "{:?}", o.share_attainment);
    }

    #[test]
    fn services_follow_their_load_and_count_what_they_could_not_serve() {
        let svc = Service {
            name: "s".into(),
            tenant: 0,
            resources: gpus(1),
            replica_rps: 10.0,
            min_replicas: 1,
            max_replicas: 8,
            target_utilisation: 1.0,
            startup_ms: 5_000,
            // 10 rps for a minute, then 60 rps for 5 minutes, then 10 again.
            load: vec![(0, 10.0), (60_000, 60.0), (360_000, 10.0)],
            load_end_ms: 1_200_000,
        };
        let w = Workload {
            services: vec![svc],
            ..one_tenant(vec![])
        };
        let opt = Options {
            scale_down_window_ms: 120_000,
            sample_ms: 10_000,
            ..Default::default()
        };
        let o = run(
            (0..2).map(|i| node(i, 8)).collect(),
            &w,
            &opt,
            &mut |_, _| {},
        );
        let s = &o.services[0];
        assert_eq!(s.max_replicas_seen, 6);
        assert!(s.scale_ups >= 2 && s.scale_downs >= 1, "{s:?}");
        // Short only while replicas start: the first 5 s and the 5 s after the step.
        let short = s.offered - s.served;
        assert!(short > 0.0 && short <= 10.0 * 6.0 + 50.0 * 6.0, "{short}");
        assert!(s.slo_attainment() > 0.98, "{}", s.slo_attainment());
        let at = |t: Millis| {
            o.samples
                .iter()
                .find(|x| x.t_ms == t)
                .unwrap()
                .running_tasks
        };
        assert_eq!(at(50_000), 1);
        assert_eq!(at(200_000), 6);
        // The window holds 6 for 120 s after the load drops at 360 s.
        assert_eq!(at(470_000), 6);
        assert_eq!(at(600_000), 1);
    }

    #[test]
    fn a_replay_is_a_pure_function_of_its_inputs() {
        let spec =
            crate::synth::Spec::parse("nodes=40,tasks=1500,load=1.2,services=2,seed=9").unwrap();
        let (nodes, w) = crate::synth::generate(&spec);
        let a = run(nodes.clone(), &w, &Options::default(), &mut |_, _| {});
        let b = run(nodes, &w, &Options::default(), &mut |_, _| {});
        assert_eq!(a.jobs, b.jobs);
        assert_eq!(a.samples, b.samples);
        assert_eq!(a.summary(), b.summary());
        let s = a.summary();
        assert_eq!(
            s.jobs_finished, s.jobs,
            "every job of the mix fits the pool and ends"
        );
        assert!(
            s.preemptions > 0,
            "spot and borrowed work was preempted: {s:?}"
        );
        for (j, spec) in a.jobs.iter().zip(&w.jobs) {
            // A job never ends before its work could have been done.
            assert!(j.jct_ms().unwrap() >= spec.duration_ms as i64, "{}", j.name);
        }
        assert!(a
            .samples
            .iter()
            .all(|x| x.gpu_alloc <= 1.0 + 1e-12 && x.cpu_alloc <= 1.0 + 1e-12));
    }

    #[test]
    fn offering_only_new_work_when_nothing_was_released_changes_no_placement() {
        // Overloaded, with spot and borrowed work: queues form and preemptions happen.
        let spec =
            crate::synth::Spec::parse("nodes=30,tasks=3000,load=1.5,services=2,seed=5").unwrap();
        let (nodes, w) = crate::synth::generate(&spec);
        for policy in [
            crate::baselines::Policy::Caravel,
            crate::baselines::Policy::BestFit,
        ] {
            let inc = Options::for_policy(policy, &w, 1);
            let full = Options {
                incremental: false,
                ..inc.clone()
            };
            let a = run(nodes.clone(), &w, &inc, &mut |_, _| {});
            let b = run(nodes.clone(), &w, &full, &mut |_, _| {});
            let first = a.jobs.iter().zip(&b.jobs).position(|(x, y)| x != y);
            assert_eq!(first.map(|k| (&a.jobs[k], &b.jobs[k])), None, "{policy:?}");
            assert_eq!(a.services, b.services, "{policy:?}");
            assert!(
                a.job_offers < b.job_offers,
                "{} vs {}",
                a.job_offers,
                b.job_offers
            );
            assert!(
                a.summary().p99_queue_s > 60.0,
                "the test needs queues: {:?}",
                a.summary()
            );
            assert!(a.preemptions > 0);
        }
    }

    #[test]
    fn gangs_held_to_racks_reserve_room_and_every_job_ends() {
        let spec = crate::synth::Spec::parse(
            "nodes=40,tasks=1500,load=1.2,services=2,seed=9,limits=2,rack_nodes=8",
        )
        .unwrap();
        let (nodes, w) = crate::synth::generate(&spec);
        assert!(w.jobs.iter().any(|j| j.topology.is_some()));
        let inc = Options::for_policy(crate::baselines::Policy::Caravel, &w, 1);
        let full = Options {
            incremental: false,
            ..inc.clone()
        };
        let a = run(nodes.clone(), &w, &inc, &mut |_, _| {});
        let b = run(nodes, &w, &full, &mut |_, _| {});
        assert_eq!(a.jobs, b.jobs);
        let s = a.summary();
        assert_eq!(s.jobs_finished, s.jobs, "{s:?}");
        assert!(a.reserved_cycles > 0);
    }

    #[test]
    fn work_that_can_never_fit_is_reported_not_waited_on_forever() {
        let w = one_tenant(vec![
            job("huge", 0, 0, 16, 1, 10),
            job("ok", 0, 0, 1, 1, 10),
        ]);
        let o = replay(vec![node(0, 8)], &w);
        let s = o.summary();
        assert_eq!((s.jobs_finished, s.jobs_never_started), (1, 1));
    }
}
