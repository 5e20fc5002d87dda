//! The control plane's state machine. Every operation takes the current time as an
//! argument, computes the mutations it implies, updates memory and queues the mutations
//! for the store's writer thread in the same order (`committer`). Memory may run ahead of
//! the store for the length of a commit; no answer does: every request waits for the
//! changes it saw and made to be durable (`settle_writes`), and a failed commit makes the
//! server rebuild memory from the store.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use caravel_core::api::{Assignment, ExitReason, RegisterRequest, RunEvent};
use caravel_core::*;
use caravel_sched::{JobReq, NodeSnap, TenantSnap};
use caravel_store::{Mutation, Store};

use crate::committer::{Committer, Durability};

use crate::error::CoreError;

pub const DEFAULT_TENANT: &str = "default";

#[derive(Debug, Clone, Default)]
pub struct NodeAlloc {
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    /// Devices held whole.
    pub devices: BTreeSet<u32>,
    /// Devices shared by fractional requests: index -> thousandths in use.
    pub shared: BTreeMap<u32, u32>,
    pub runs: BTreeSet<RunId>,
}

pub struct NodeEntry {
    pub node: Node,
    pub alloc: NodeAlloc,
    /// Bumped whenever this node's desired runs change; agents long-poll on it.
    pub version: tokio::sync::watch::Sender<u64>,
    /// Ports the agent found free at its last sync (`SyncRequest::free_ports`), less those
    /// given out since.
    pub free_ports: Vec<u16>,
}

pub struct JobEntry {
    pub rec: JobRecord,
    pub tasks: Vec<TaskRecord>,
    /// Why it waits, as of the last pass that offered it (shared by the jobs a full pass
    /// leaves out behind others of their class, see `full_offer`).
    pub reasons: std::sync::Arc<[PendingReason]>,
    pub active_runs: BTreeSet<RunId>,
}

/// A task preempted for a job: its run, node, and what it holds.
type Victim = (RunId, NodeId, TaskResources, Vec<u32>);

/// Outcome counters of one scheduling cycle.
#[derive(Debug, Default, Clone, Copy)]
pub struct CycleStats {
    pub considered_jobs: usize,
    pub placed: usize,
    /// The whole queue was offered, not only the work that arrived since the last cycle.
    pub full: bool,
}

/// However quiet the pool, the whole queue is offered at least this often, for what
/// changes with time alone: fair-share decay, least-attained-service boundaries, the
/// starvation guard's clock.
pub const FULL_PASS_EVERY_MS: Millis = 5_000;

pub struct Core {
    store: Committer,
    /// The store's ownership lease, where it has one (PostgreSQL): see `caravel_store::Lease`.
    pub lease: Option<std::sync::Arc<caravel_store::Lease>>,
    pub tenants: BTreeMap<TenantId, Tenant>,
    tenant_by_name: HashMap<String, TenantId>,
    tenant_by_token: HashMap<String, TenantId>,
    tenant_used: HashMap<TenantId, ResourceSum>,
    pub nodes: BTreeMap<NodeId, NodeEntry>,
    node_by_name: HashMap<String, NodeId>,
    pub jobs: BTreeMap<JobId, JobEntry>,
    /// Runs that are not terminal.
    pub runs: BTreeMap<RunId, RunRecord>,
    /// Jobs that have tasks waiting for placement.
    pending: BTreeSet<JobId>,
    next_job: u64,
    next_run: u64,
    next_seq: u64,
    next_node: u64,
    next_tenant: u64,
    pub sched_cfg: caravel_sched::Config,
    /// When runs last saved a checkpoint (with the generation of the checkpoint index it
    /// was read at): preempting a run loses only the work since, which victim choice
    /// weighs.
    pub saved: (u64, HashMap<RunId, Millis>),
    /// GPU service each job's ended runs received (GPU-milliseconds), for least-attained-
    /// service order (`sched_cfg.las`): filled from the usage records on first need, then
    /// kept as runs end.
    attained: HashMap<JobId, u64>,
    /// Decayed history of what each tenant held, for fair share; rebuilt from zero at start.
    tenant_history: HashMap<TenantId, caravel_sched::fair::UsageEma>,
    /// Jobs waiting for the tasks preempted on their behalf to exit, with what each
    /// victim holds: room a victim frees stays reserved until the last one is gone, so
    /// nobody else slips into it.
    preempting: HashMap<JobId, Vec<Victim>>,
    history_at: Option<Millis>,
    pub fair_share_half_life_ms: u64,
    /// A job that has waited this long without ever starting has nodes drained for it,
    /// oldest first, one job at a time (`Scheduler::protect`); 0: never.
    pub starvation_ms: u64,
    /// An elastic gang grows (restarts bigger) only once its attempt has run this long.
    pub elastic_grow_after_ms: u64,
    /// Set when a commit failed after memory changed; the server reloads from the store.
    needs_reload: bool,
    group: Option<Vec<Mutation>>,
    /// Deployed services by (tenant, name).
    pub services: BTreeMap<(TenantId, String), ServiceRecord>,
    /// Replica jobs of each service that may not have ended yet (pruned lazily).
    service_jobs: HashMap<(TenantId, String), BTreeSet<JobId>>,
    /// Jobs by their submitter's idempotency key.
    by_key: HashMap<(TenantId, String), JobId>,
    /// Jobs with work newly waiting since the last cycle. While nothing frees room or
    /// changes who may preempt whom (`full_needed`), a cycle offers only these: what
    /// already waited did not fit the same room at the last cycle and cannot now
    /// (Kubernetes parks unschedulable pods the same way until a cluster event).
    fresh: BTreeSet<JobId>,
    /// Room was freed, a node or tenant changed, or a task started (a new possible
    /// victim) since the last full pass.
    full_needed: bool,
    last_full_ms: Option<Millis>,
    /// The last pass held reservations or drained nodes for a starving job: those are
    /// re-planned against the whole queue every cycle.
    holding: bool,
    /// The expected workload of the last full pass, reused by the passes between.
    workload: Option<std::sync::Arc<Vec<caravel_sched::fgd::WorkloadType>>>,
    /// How that workload's GPU shares should fill GPUs, solved once per workload.
    share_plan: Option<std::sync::Arc<caravel_sched::plan::SharePlan>>,
    /// Least time between two full passes (see `set_full_pass_gap`).
    full_pass_gap_ms: Millis,
    /// Waiting single jobs that never started, by class (see `full_offer`).
    classes: HashMap<ClassKey, ClassQueue>,
    job_class: HashMap<JobId, ClassKey>,
    /// Waiting jobs in no class: every full pass offers them all.
    unclassed: BTreeSet<JobId>,
    /// Every pass offers the whole queue (tests compare the shortcuts against this).
    exhaustive: bool,
}

/// Single jobs alike in everything the scheduler orders and places a never-started job
/// by: tenant, priority, task shape, max runtime.
type ClassKey = (TenantId, Priority, TaskResources, Option<u64>);

#[derive(Default)]
struct ClassQueue {
    /// Jobs (oldest first: ids rise with submission, as queue order does) and their tasks.
    jobs: BTreeMap<JobId, u64>,
    tasks: u64,
    /// The last job the latest full pass offered; those after it show its reasons.
    rep: Option<JobId>,
}

/// One replica of a service as the gateway and the controller see it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaInfo {
    pub job: JobId,
    pub version: u64,
    pub run: Option<RunId>,
    /// `address:port` once the replica's process started.
    pub addr: Option<String>,
    pub zone: String,
    pub region: String,
    /// Asked to stop (drained, cancelled); it will leave.
    pub stopping: bool,
    /// Runs on a node an operator drained: to be replaced, then drained.
    pub evict: bool,
    /// Not placed yet: why (`[code] message`, the job's first pending reason).
    pub pending: Option<String>,
}

fn job_port(job: JobId) -> u16 {
    // Deterministic per job so every gang member agrees without a round trip.
    29500 + (job.0 % 20000) as u16
}

impl Core {
    /// Rebuilds memory from the store. Nodes get a fresh `last_seen` so that agents that
    /// kept running while the server was down have one lost-timeout to check back in and
    /// have their runs re-adopted.
    pub fn load(store: Box<dyn Store>, now: Millis) -> Result<Core, CoreError> {
        Core::load_with(store, now, crate::metrics::CommitStats::default())
    }

    /// `load`, with the writer thread's figures recorded in `stats` (the server's metrics).
    pub fn load_with(
        mut store: Box<dyn Store>,
        now: Millis,
        stats: crate::metrics::CommitStats,
    ) -> Result<Core, CoreError> {
        let snap = store.load()?;
        let lease = store.lease();
        let mut core = Core {
            lease,
            store: Committer::start(store, stats),
            tenants: BTreeMap::new(),
            tenant_by_name: HashMap::new(),
            tenant_by_token: HashMap::new(),
            tenant_used: HashMap::new(),
            nodes: BTreeMap::new(),
            node_by_name: HashMap::new(),
            jobs: BTreeMap::new(),
            runs: BTreeMap::new(),
            pending: BTreeSet::new(),
            next_job: 1,
            next_run: snap.max_run_id + 1,
            next_seq: 1,
            next_node: 1,
            next_tenant: 1,
            sched_cfg: Default::default(),
            saved: (0, HashMap::new()),
            attained: HashMap::new(),
            tenant_history: HashMap::new(),
            preempting: HashMap::new(),
            history_at: None,
            fair_share_half_life_ms: 3_600_000,
            starvation_ms: 0,
            elastic_grow_after_ms: 60_000,
            needs_reload: false,
            group: None,
            services: BTreeMap::new(),
            service_jobs: HashMap::new(),
            by_key: HashMap::new(),
            fresh: BTreeSet::new(),
            full_needed: true,
            last_full_ms: None,
            holding: false,
            workload: None,
            share_plan: None,
            full_pass_gap_ms: 0,
            classes: HashMap::new(),
            job_class: HashMap::new(),
            unclassed: BTreeSet::new(),
            exhaustive: false,
        };
        for s in snap.services {
            core.services.insert((s.tenant, s.spec.name.clone()), s);
        }
        for (t, h) in snap.tenants {
            core.next_tenant = core.next_tenant.max(t.id.0 + 1);
            core.tenant_by_name.insert(t.name.clone(), t.id);
            core.tenant_by_token.insert(h, t.id);
            core.tenants.insert(t.id, t);
        }
        for mut n in snap.nodes {
            core.next_node = core.next_node.max(n.id.0 + 1);
            if n.state == NodeState::Ready {
                n.last_seen_ms = n.last_seen_ms.max(now);
            }
            core.node_by_name.insert(n.name.clone(), n.id);
            core.nodes.insert(
                n.id,
                NodeEntry {
                    node: n,
                    alloc: NodeAlloc::default(),
                    version: tokio::sync::watch::Sender::new(1),
                    free_ports: Vec::new(),
                },
            );
        }
        for mut j in snap.jobs {
            j.spec.normalize();
            core.next_job = core.next_job.max(j.id.0 + 1);
            if let (Some(s), false) = (&j.service, j.state.is_terminal()) {
                core.service_jobs
                    .entry((j.tenant, s.service.clone()))
                    .or_default()
                    .insert(j.id);
            }
            core.next_seq = core.next_seq.max(j.seq + 1);
            if let Some(k) = &j.idempotency_key {
                core.by_key.insert((j.tenant, k.clone()), j.id);
            }
            core.jobs.insert(
                j.id,
                JobEntry {
                    rec: j,
                    tasks: Vec::new(),
                    reasons: Default::default(),
                    active_runs: BTreeSet::new(),
                },
            );
        }
        for t in snap.tasks {
            if let Some(j) = core.jobs.get_mut(&t.job) {
                j.tasks.push(t);
            }
        }
        for r in snap.active_runs {
            core.take_alloc(&r);
            if let Some(j) = core.jobs.get_mut(&r.job) {
                j.active_runs.insert(r.id);
            }
            core.runs.insert(r.id, r);
        }
        // Jobs that preempted work before the restart go on waiting for their victims.
        for r in core.runs.values() {
            let (Some(StopReason::Preempt), Some(j)) = (r.stop, r.preempted_for) else {
                continue;
            };
            let Some(victim) = core.jobs.get(&r.job) else {
                continue;
            };
            if core
                .jobs
                .get(&j)
                .is_some_and(|e| !e.rec.state.is_terminal())
            {
                let res = victim.rec.spec.resources.clone();
                core.preempting
                    .entry(j)
                    .or_default()
                    .push((r.id, r.node, res, r.devices.clone()));
            }
        }
        // Victims that all exited before the restart, of jobs still waiting: the cycle that
        // would have held their room for the job may not have run. Held through the first
        // cycle (room since taken is not held). A job with victims still stopping chose
        // them after its earlier victims' room was held (it preempts again only then), so
        // those earlier ones are not its claim any more.
        let waiting: Vec<JobId> = core
            .jobs
            .values()
            .filter(|e| !e.rec.state.is_terminal() && !core.preempting.contains_key(&e.rec.id))
            .filter(|e| e.tasks.iter().any(|t| t.state == TaskState::Pending))
            .map(|e| e.rec.id)
            .collect();
        for j in waiting {
            for r in core.store.read(move |st| st.ended_runs_preempted_for(j))? {
                let Some(victim) = core.jobs.get(&r.job) else {
                    continue;
                };
                let res = victim.rec.spec.resources.clone();
                core.preempting
                    .entry(j)
                    .or_default()
                    .push((r.id, r.node, res, r.devices));
            }
        }
        core.repair(now)?;
        Ok(core)
    }

    /// Restores invariants that a crash between two commits of one operation can leave
    /// broken: runs told to stop before they started are ended, and every job's own state
    /// is recomputed from its tasks.
    fn repair(&mut self, now: Millis) -> Result<(), CoreError> {
        let unstarted: Vec<RunId> = self
            .runs
            .values()
            .filter(|r| r.state == RunState::Assigned && r.stop.is_some())
            .map(|r| r.id)
            .collect();
        for r in unstarted {
            let msg = "stopped before start".to_string();
            self.finish_run(r, RunState::Killed, now, None, None, msg, None)?;
        }
        let ids: Vec<JobId> = self.jobs.keys().copied().collect();
        for id in ids {
            self.settle_job(id, now)?;
        }
        Ok(())
    }

    /// Starts collecting commits into one transaction (group commit), for operations that
    /// apply many small changes at once, such as a batch of agent reports.
    pub fn begin_group(&mut self) {
        self.group.get_or_insert_with(Vec::new);
    }

    /// Queues what was collected since `begin_group` as one transaction. The API answers
    /// only once it is durable (`settle_writes`).
    pub fn end_group(&mut self) -> Result<(), CoreError> {
        match self.group.take() {
            Some(batch) => self.commit(&batch),
            None => Ok(()),
        }
    }

    /// Queues `batch` for the commit thread (see `committer`). Memory changes right after,
    /// before the batch is durable: whoever answers a client waits for `durability()`
    /// first. If the commit fails, memory is rebuilt from the store.
    fn commit(&mut self, batch: &[Mutation]) -> Result<(), CoreError> {
        // A node or a tenant changed (capacity, readiness, drain, quota, guarantee): what
        // waits may fit or be entitled now.
        if batch
            .iter()
            .any(|m| matches!(m, Mutation::PutNode(_) | Mutation::PutTenant { .. }))
        {
            self.full_needed = true;
        }
        if let Some(g) = &mut self.group {
            g.extend_from_slice(batch);
            return Ok(());
        }
        match self.store.submit(batch.to_vec()) {
            Ok(_) => Ok(()),
            Err(e) => {
                self.needs_reload = true;
                Err(e.into())
            }
        }
    }

    /// What requests wait on before they answer: the changes queued so far and whether
    /// they are durable.
    pub fn durability(&self) -> std::sync::Arc<Durability> {
        self.store.durability()
    }

    /// Set when a commit failed after memory changed: the server rebuilds memory from the
    /// store.
    pub fn needs_reload(&self) -> bool {
        self.needs_reload
            || self.store.durability().failed().is_some()
            || self.lease.as_ref().is_some_and(|l| l.lost())
    }

    /// Every ready node counts as heard from at `now` (in memory only): nobody could reach
    /// this server while it was not answering (its store lease not yet valid), so no node
    /// may be counted lost for that time.
    pub fn forgive_silence(&mut self, now: Millis) {
        for e in self.nodes.values_mut() {
            if e.node.state == NodeState::Ready {
                e.node.last_seen_ms = e.node.last_seen_ms.max(now);
            }
        }
    }

    /// Closes the store after writing what is queued (a PostgreSQL store ends its session,
    /// freeing its lock for the store the server reopens) and marks memory for a reload;
    /// until then every write is refused, and nothing is half-written.
    pub fn close_store(&mut self) {
        self.store.close();
        self.needs_reload = true;
    }

    /// For reads from the store outside the core lock (see `committer::Reader`).
    pub fn reader(&self) -> crate::committer::Reader {
        self.store.reader()
    }

    /// Runs `f` on the store once every change queued so far is written.
    pub fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Store) -> caravel_store::Result<T> + Send + 'static,
    ) -> Result<T, CoreError> {
        Ok(self.store.read(f)?)
    }

    // ---- tenants ----

    pub fn ensure_default_tenant(&mut self, now: Millis) -> Result<(), CoreError> {
        if !self.tenant_by_name.contains_key(DEFAULT_TENANT) {
            // Its token is never shown: the admin acts for it.
            self.create_tenant(DEFAULT_TENANT, 1.0, Quota::default(), Quota::default(), now)?;
        }
        Ok(())
    }

    pub fn create_tenant(
        &mut self,
        name: &str,
        weight: f64,
        quota: Quota,
        guarantee: Quota,
        now: Millis,
    ) -> Result<(Tenant, String), CoreError> {
        validate_name("name", name)?;
        for m in guarantee.gpus.keys() {
            validate_model(m)
                .map_err(|r| ValidationError::new(format!("guarantee.gpus.{m}"), r))?;
        }
        if guarantee.storage_bytes.is_some() {
            return Err(ValidationError::new(
                "guarantee.storage_bytes",
                "storage is a cap (set it in the quota), not something a tenant is guaranteed",
            )
            .into());
        }
        let over = |g: Option<u64>, q: Option<u64>| matches!((g, q), (Some(g), Some(q)) if g > q);
        if over(guarantee.cpu_milli, quota.cpu_milli) {
            return Err(ValidationError::new(
                "guarantee.cpu_milli",
                "is more than the tenant's quota",
            )
            .into());
        }
        if over(guarantee.memory_bytes, quota.memory_bytes) {
            return Err(ValidationError::new(
                "guarantee.memory_bytes",
                "is more than the tenant's quota",
            )
            .into());
        }
        for (m, g) in &guarantee.gpus {
            if over(Some(*g as u64), quota.gpus.get(m).map(|q| *q as u64)) {
                return Err(ValidationError::new(
                    format!("guarantee.gpus.{m}"),
                    "is more than the tenant's quota",
                )
                .into());
            }
        }
        if !(weight.is_finite() && weight > 0.0 && weight <= 1e6) {
            return Err(ValidationError::new(
                "weight",
                "must be a number above 0 and at most 1000000",
            )
            .into());
        }
        for m in quota.gpus.keys() {
            validate_model(m).map_err(|r| ValidationError::new(format!("quota.gpus.{m}"), r))?;
        }
        if self.tenant_by_name.contains_key(name) {
            return Err(CoreError::conflict_on(
                "name",
                format!("tenant `{name}` already exists"),
            ));
        }
        let token = crate::auth::new_token("cvt");
        let hash = crate::auth::hash_token(&token);
        let t = Tenant {
            id: TenantId(self.next_tenant),
            name: name.to_string(),
            weight,
            quota,
            guarantee,
            created_ms: now,
            registries: Default::default(),
        };
        self.commit(&[Mutation::PutTenant {
            tenant: t.clone(),
            token_hash: hash.clone(),
        }])?;
        self.next_tenant += 1;
        self.tenant_by_name.insert(t.name.clone(), t.id);
        self.tenant_by_token.insert(hash, t.id);
        self.tenants.insert(t.id, t.clone());
        Ok((t, token))
    }

    /// Stores (`Some`) or forgets (`None`) a tenant's credentials for a registry.
    pub fn set_registry_credential(
        &mut self,
        tenant: TenantId,
        registry: &str,
        cred: Option<RegistryCredential>,
    ) -> Result<bool, CoreError> {
        let mut t = self
            .tenants
            .get(&tenant)
            .cloned()
            .ok_or_else(|| CoreError::not_found("tenant"))?;
        let changed = match cred {
            Some(c) => t.registries.insert(registry.to_string(), c).is_none(),
            None => t.registries.remove(registry).is_some(),
        };
        let token_hash = self
            .tenant_by_token
            .iter()
            .find(|(_, id)| **id == tenant)
            .map(|(h, _)| h.clone())
            .ok_or_else(|| CoreError::internal("the tenant has no token"))?;
        self.commit(&[Mutation::PutTenant {
            tenant: t.clone(),
            token_hash,
        }])?;
        self.tenants.insert(tenant, t);
        Ok(changed)
    }

    pub fn tenant_by_token_hash(&self, h: &str) -> Option<TenantId> {
        self.tenant_by_token.get(h).copied()
    }

    pub fn tenant_id(&self, name: &str) -> Option<TenantId> {
        self.tenant_by_name.get(name).copied()
    }

    pub fn tenant_name(&self, id: TenantId) -> String {
        self.tenants
            .get(&id)
            .map(|t| t.name.clone())
            .unwrap_or_else(|| id.to_string())
    }

    // ---- jobs ----

    /// Refuses work that no node could ever run or that exceeds its tenant's quota on its
    /// own.
    fn check_runnable(&self, tenant: TenantId, spec: &JobSpec) -> Result<(), CoreError> {
        let t = self
            .tenants
            .get(&tenant)
            .ok_or_else(|| CoreError::not_found("tenant"))?;
        if !self.nodes.is_empty() {
            let caps: Vec<Capacity> = self
                .nodes
                .values()
                .map(|n| n.node.capacity.clone())
                .collect();
            if let Some(g) = &spec.resources.gpu {
                if !g
                    .models()
                    .iter()
                    .any(|m| caps.iter().any(|c| c.gpu_count(m) > 0))
                {
                    let mut offered: BTreeSet<String> = BTreeSet::new();
                    for c in &caps {
                        offered.extend(c.gpu_models().into_keys());
                    }
                    let offered: Vec<String> = offered.into_iter().collect();
                    return Err(CoreError::unschedulable(
                        "resources.gpu.model",
                        format!(
                            "no node offers gpu model `{}` (offered: {})",
                            g.models().join("` or `"),
                            if offered.is_empty() {
                                "none".to_string()
                            } else {
                                offered.join(", ")
                            }
                        ),
                    ));
                }
            }
            if !caravel_sched::fits_when_empty(&caps, &spec.resources) {
                return Err(too_large(&caps, &spec.resources));
            }
            if let (true, Some(level)) = (spec.gang, spec.topology) {
                let nodes: Vec<_> = self
                    .nodes
                    .values()
                    .map(|n| (n.node.capacity.clone(), n.node.topology.clone(), n.node.id))
                    .collect();
                let room =
                    caravel_sched::gang_room_when_empty(&nodes, &spec.resources, Some(level));
                let least = spec.min_tasks.unwrap_or(spec.tasks);
                if room < u64::from(least) {
                    return Err(CoreError::unschedulable(
                        "topology",
                        format!(
                            "no {} could ever hold this gang: it needs all {} tasks in one {0}, and the largest {0} holds {room} of them even with nothing else running",
                            level.as_str(),
                            least
                        ),
                    ));
                }
            }
        }
        // An elastic gang needs only its minimum at once.
        let all_at_once = if spec.gang {
            spec.min_tasks.unwrap_or(spec.tasks) as u64
        } else {
            1
        };
        // With several acceptable models the job is fine if one of them could hold it.
        let models: Vec<Option<&str>> = match &spec.resources.gpu {
            Some(g) => g.models().into_iter().map(Some).collect(),
            None => vec![None],
        };
        let mut refusals = models.iter().map(|m| {
            t.quota
                .check_on(&ResourceSum::default(), &spec.resources, *m, all_at_once)
        });
        if let Some(Err(e)) = refusals
            .clone()
            .all(|c| c.is_err())
            .then(|| refusals.next())
            .flatten()
        {
            let unit = |v: u64| {
                if e.resource.starts_with("gpu/") {
                    format!("{}", v as f64 / 1000.0)
                } else {
                    v.to_string()
                }
            };
            return Err(CoreError::exceeds_quota(
                "resources",
                format!(
                    "tenant `{}` may hold at most {} of {}, this job needs {} at once",
                    t.name,
                    unit(e.limit),
                    e.resource,
                    unit(e.asked)
                ),
            ));
        }
        Ok(())
    }

    pub fn submit(
        &mut self,
        tenant: TenantId,
        spec: JobSpec,
        now: Millis,
    ) -> Result<JobId, CoreError> {
        self.submit_as(tenant, spec, None, None, now)
    }

    /// A submission a client may repeat safely (its answer lost, the server restarted, the
    /// store unreachable mid-commit): the same `key` from the same tenant returns the job
    /// it made the first time (`false`: not created now) — if the spec is the same; another
    /// spec under a used key is a conflict.
    pub fn submit_idempotent(
        &mut self,
        tenant: TenantId,
        mut spec: JobSpec,
        key: Option<String>,
        now: Millis,
    ) -> Result<(JobId, bool), CoreError> {
        spec.normalize();
        let Some(key) = key else {
            return Ok((self.submit(tenant, spec, now)?, true));
        };
        if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(CoreError::invalid(
                "Idempotency-Key",
                "must be 1 to 255 visible ASCII characters",
            ));
        }
        if let Some(&id) = self.by_key.get(&(tenant, key.clone())) {
            let same = self.jobs.get(&id).is_some_and(|j| j.rec.spec == spec);
            if !same {
                return Err(CoreError::conflict_on(
                    "Idempotency-Key",
                    format!("`{key}` was used for job {id} with a different spec"),
                ));
            }
            return Ok((id, false));
        }
        let id = self.submit_as(tenant, spec, None, Some(key.clone()), now)?;
        self.by_key.insert((tenant, key), id);
        Ok((id, true))
    }

    fn submit_as(
        &mut self,
        tenant: TenantId,
        mut spec: JobSpec,
        service: Option<ReplicaOf>,
        idempotency_key: Option<String>,
        now: Millis,
    ) -> Result<JobId, CoreError> {
        spec.normalize();
        spec.validate()?;
        self.check_runnable(tenant, &spec)?;
        let id = JobId(self.next_job);
        let rec = JobRecord {
            id,
            tenant,
            state: JobState::Pending,
            seq: self.next_seq,
            submitted_ms: now,
            started_ms: None,
            finished_ms: None,
            message: String::new(),
            gang_abort: None,
            gang_abort_free: false,
            cancel_requested: false,
            service,
            idempotency_key,
            spec,
        };
        let tasks: Vec<TaskRecord> = (0..rec.spec.tasks)
            .map(|i| TaskRecord {
                job: id,
                index: i,
                state: TaskState::Pending,
                attempts: 0,
                retries_used: 0,
                current_run: None,
                exit_code: None,
            })
            .collect();
        let mut batch = vec![Mutation::PutJob(rec.clone())];
        batch.extend(tasks.iter().cloned().map(Mutation::PutTask));
        self.commit(&batch)?;
        self.next_job += 1;
        self.next_seq += 1;
        if let Some(s) = &rec.service {
            self.service_jobs
                .entry((tenant, s.service.clone()))
                .or_default()
                .insert(id);
        }
        self.jobs.insert(
            id,
            JobEntry {
                rec,
                tasks,
                reasons: Default::default(),
                active_runs: BTreeSet::new(),
            },
        );
        self.pending.insert(id);
        self.fresh.insert(id);
        self.index_pending(id);
        Ok(id)
    }

    /// Creates or updates a service. A changed spec gets a new version, which the
    /// controller rolls out; an identical one changes nothing. Returns the record and
    /// whether it changed.
    pub fn deploy_service(
        &mut self,
        tenant: TenantId,
        spec: ServiceSpec,
        now: Millis,
    ) -> Result<(ServiceRecord, bool), CoreError> {
        spec.validate()?;
        // What a replica asks for must be runnable here and within quota, as for a job.
        self.check_runnable(tenant, &spec.replica_job())?;
        let key = (tenant, spec.name.clone());
        let rec = match self.services.get(&key) {
            Some(old) if old.spec == spec => return Ok((old.clone(), false)),
            Some(old) => ServiceRecord {
                tenant,
                spec,
                version: old.version + 1,
                created_ms: old.created_ms,
                updated_ms: now,
            },
            None => ServiceRecord {
                tenant,
                spec,
                version: 1,
                created_ms: now,
                updated_ms: now,
            },
        };
        self.commit(&[Mutation::PutService(rec.clone())])?;
        self.services.insert(key, rec.clone());
        Ok((rec, true))
    }

    /// Removes a service and stops its replicas (each gets its kill grace).
    pub fn delete_service(
        &mut self,
        tenant: TenantId,
        name: &str,
        now: Millis,
    ) -> Result<(), CoreError> {
        let key = (tenant, name.to_string());
        if !self.services.contains_key(&key) {
            return Err(CoreError::not_found(format!("service {name}")));
        }
        self.commit(&[Mutation::DeleteService {
            tenant,
            name: name.to_string(),
        }])?;
        self.services.remove(&key);
        let jobs: Vec<JobId> = self
            .service_jobs
            .remove(&key)
            .unwrap_or_default()
            .into_iter()
            .collect();
        for j in jobs {
            if self
                .jobs
                .get(&j)
                .is_some_and(|e| !e.rec.state.is_terminal())
            {
                self.cancel(j, now)?;
            }
        }
        Ok(())
    }

    /// Drains (or undrains) a node: while drained, nothing new is placed on it.
    pub fn set_drained(&mut self, name: &str, drained: bool) -> Result<Node, CoreError> {
        let id = *self
            .node_by_name
            .get(name)
            .ok_or_else(|| CoreError::not_found(format!("node {name}")))?;
        let mut n = self.nodes[&id].node.clone();
        if n.drained != drained {
            n.drained = drained;
            self.commit(&[Mutation::PutNode(n.clone())])?;
            self.nodes.get_mut(&id).expect("exists").node = n.clone();
        }
        Ok(n)
    }

    /// Starts one more replica of the service's current version.
    pub fn add_replica(
        &mut self,
        tenant: TenantId,
        name: &str,
        now: Millis,
    ) -> Result<JobId, CoreError> {
        let rec = self
            .services
            .get(&(tenant, name.to_string()))
            .ok_or_else(|| CoreError::not_found(format!("service {name}")))?;
        let version = rec.version;
        // Spread: the zone (among ready, undrained nodes) with the fewest replicas of this
        // service; placement falls back to other zones when it is full.
        let mut count: BTreeMap<String, usize> = self
            .nodes
            .values()
            .filter(|e| e.node.state == NodeState::Ready && !e.node.drained)
            .filter(|e| !e.node.topology.zone.is_empty())
            .map(|e| (e.node.topology.zone.clone(), 0))
            .collect();
        if count.len() > 1 {
            for r in self.replicas(tenant, name) {
                let z = if r.zone.is_empty() {
                    self.jobs[&r.job]
                        .rec
                        .service
                        .as_ref()
                        .and_then(|s| s.zone.clone())
                } else {
                    Some(r.zone.clone())
                };
                if let Some(c) = z.and_then(|z| count.get_mut(&z)) {
                    if !r.stopping {
                        *c += 1;
                    }
                }
            }
        }
        let zone = (count.len() > 1)
            .then(|| count.iter().min_by_key(|(z, c)| (**c, (*z).clone())))
            .flatten()
            .map(|(z, _)| z.clone());
        let rec = &self.services[&(tenant, name.to_string())];
        let of = ReplicaOf {
            service: name.to_string(),
            version,
            zone,
        };
        let spec = rec.spec.replica_job();
        self.submit_as(tenant, spec, Some(of), None, now)
    }

    /// The replicas of a service that have not ended, oldest first.
    pub fn replicas(&mut self, tenant: TenantId, name: &str) -> Vec<ReplicaInfo> {
        let key = (tenant, name.to_string());
        let Some(ids) = self.service_jobs.get_mut(&key) else {
            return Vec::new();
        };
        let jobs = &self.jobs;
        ids.retain(|j| jobs.get(j).is_some_and(|e| !e.rec.state.is_terminal()));
        let mut out = Vec::with_capacity(ids.len());
        for j in ids.iter() {
            let e = &self.jobs[j];
            let run = e.active_runs.iter().next().and_then(|r| self.runs.get(r));
            let node = run.and_then(|r| self.nodes.get(&r.node));
            out.push(ReplicaInfo {
                job: *j,
                version: e.rec.service.as_ref().map_or(0, |s| s.version),
                run: run.map(|r| r.id),
                addr: match (run, node) {
                    (Some(r), Some(n)) if r.state == RunState::Running => {
                        r.port.map(|p| format!("{}:{p}", n.node.address))
                    }
                    _ => None,
                },
                zone: node
                    .map(|n| n.node.topology.zone.clone())
                    .unwrap_or_default(),
                region: node
                    .map(|n| n.node.topology.region.clone())
                    .unwrap_or_default(),
                stopping: e.rec.cancel_requested || run.is_some_and(|r| r.stop.is_some()),
                evict: node.is_some_and(|n| n.node.drained),
                pending: run
                    .is_none()
                    .then(|| {
                        e.reasons
                            .first()
                            .map(|r| format!("[{}] {}", r.code, r.message))
                    })
                    .flatten(),
            });
        }
        out
    }

    pub fn cancel(&mut self, id: JobId, now: Millis) -> Result<(), CoreError> {
        let j = self
            .jobs
            .get(&id)
            .ok_or_else(|| CoreError::not_found(format!("job {id}")))?;
        if j.rec.state.is_terminal() {
            return Err(CoreError::conflict(format!(
                "job {id} already {}",
                j.rec.state.as_str()
            )));
        }
        let mut batch = Vec::new();
        let mut touched_nodes = BTreeSet::new();
        let mut finish_unstarted = Vec::new();
        {
            let j = self.jobs.get_mut(&id).expect("checked");
            j.rec.cancel_requested = true;
            for t in j.tasks.iter_mut() {
                if t.state == TaskState::Pending {
                    t.state = TaskState::Cancelled;
                    batch.push(Mutation::PutTask(t.clone()));
                }
            }
            for rid in &j.active_runs {
                let r = self.runs.get_mut(rid).expect("active run indexed");
                if r.state == RunState::Assigned {
                    finish_unstarted.push(*rid);
                } else if r.stop.is_none() {
                    r.stop = Some(StopReason::Cancel);
                    batch.push(Mutation::PutRun(r.clone()));
                    touched_nodes.insert(r.node);
                }
            }
            batch.push(Mutation::PutJob(j.rec.clone()));
        }
        self.commit(&batch)?;
        self.pending.remove(&id);
        self.index_pending(id);
        for n in touched_nodes {
            self.bump(n);
        }
        for rid in finish_unstarted {
            // Never started as far as we know; a late exit report still meters it.
            self.finish_run(
                rid,
                RunState::Killed,
                now,
                None,
                None,
                "cancelled before start".into(),
                None,
            )?;
        }
        self.settle_job(id, now)?;
        Ok(())
    }

    /// Recomputes the job's own state from its tasks and persists it when it changed.
    fn settle_job(&mut self, id: JobId, now: Millis) -> Result<(), CoreError> {
        let batch = self.settle_mutations(id, now);
        if !batch.is_empty() {
            self.commit(&batch)?;
        }
        self.refresh_pending(id);
        Ok(())
    }

    /// Updates the job's state in memory and returns the mutations that persist it, so a
    /// caller can commit them in the same transaction as the change that caused them.
    fn settle_mutations(&mut self, id: JobId, now: Millis) -> Vec<Mutation> {
        let mut batch = Vec::new();
        let Some(j) = self.jobs.get_mut(&id) else {
            return batch;
        };
        if j.rec.state.is_terminal() {
            return batch;
        }
        // A gang that lost a member restarts whole once every member has stopped.
        if j.rec.spec.gang && j.rec.gang_abort.is_some() && j.active_runs.is_empty() {
            let why = j.rec.gang_abort.take().unwrap_or_default();
            let free = std::mem::take(&mut j.rec.gang_abort_free);
            let used = j.tasks.iter().map(|t| t.retries_used).max().unwrap_or(0);
            let retryable = !why.contains("max runtime");
            if !j.rec.cancel_requested && free {
                // Preempted: back in the queue whole, no retry used.
                for t in j.tasks.iter_mut() {
                    t.state = TaskState::Pending;
                    t.current_run = None;
                    batch.push(Mutation::PutTask(t.clone()));
                }
                j.rec.message = format!("gang requeued: {why}");
            } else if !j.rec.cancel_requested && retryable && used < j.rec.spec.max_retries {
                for t in j.tasks.iter_mut() {
                    t.state = TaskState::Pending;
                    t.retries_used = used + 1;
                    t.current_run = None;
                    batch.push(Mutation::PutTask(t.clone()));
                }
                j.rec.message = format!(
                    "gang restarted (retry {} of {}): {why}",
                    used + 1,
                    j.rec.spec.max_retries
                );
            } else {
                for t in j.tasks.iter_mut() {
                    if !t.state.is_terminal() {
                        t.state = if j.rec.cancel_requested {
                            TaskState::Cancelled
                        } else {
                            TaskState::Failed
                        };
                        batch.push(Mutation::PutTask(t.clone()));
                    }
                }
                j.rec.message = why;
            }
        }
        let all_done = j.tasks.iter().all(|t| t.state.is_terminal());
        let new_state = if all_done {
            if j.rec.cancel_requested {
                JobState::Cancelled
            } else if j
                .tasks
                .iter()
                .all(|t| matches!(t.state, TaskState::Succeeded | TaskState::Skipped))
            {
                JobState::Succeeded
            } else {
                JobState::Failed
            }
        } else if !j.active_runs.is_empty() {
            JobState::Running
        } else {
            JobState::Pending
        };
        if new_state != j.rec.state || !batch.is_empty() {
            j.rec.state = new_state;
            if new_state.is_terminal() {
                j.rec.finished_ms = Some(now);
                if j.rec.message.is_empty() {
                    j.rec.message = match new_state {
                        JobState::Succeeded => "all tasks succeeded".into(),
                        JobState::Cancelled => "cancelled".into(),
                        _ => {
                            let failed = j
                                .tasks
                                .iter()
                                .filter(|t| t.state == TaskState::Failed)
                                .count();
                            format!("{failed} of {} tasks failed", j.tasks.len())
                        }
                    };
                }
            }
            batch.push(Mutation::PutJob(j.rec.clone()));
        }
        batch
    }

    fn refresh_pending(&mut self, id: JobId) {
        let Some(j) = self.jobs.get(&id) else { return };
        let waiting = !j.rec.state.is_terminal()
            && !j.rec.cancel_requested
            && j.tasks.iter().any(|t| t.state == TaskState::Pending);
        if waiting {
            if self.pending.insert(id) {
                self.fresh.insert(id);
            }
        } else {
            self.pending.remove(&id);
            if let Some(j) = self.jobs.get_mut(&id) {
                j.reasons = Default::default();
            }
        }
        self.index_pending(id);
    }

    /// Tasks waiting, for the queue-depth gauge: from the class index, so a scrape costs
    /// the classes and the unclassed jobs, not the whole queue.
    pub fn pending_tasks(&self) -> usize {
        let classed: u64 = self.classes.values().map(|c| c.tasks).sum();
        let rest: usize = self
            .unclassed
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .map(|j| {
                j.tasks
                    .iter()
                    .filter(|t| t.state == TaskState::Pending)
                    .count()
            })
            .sum();
        classed as usize + rest
    }

    // ---- scheduling ----

    /// Runs one cycle of the pure scheduler over the current state and commits the plan.
    /// Spaces full passes at least `ms` apart. The server sets it from how long the last
    /// full pass took, so that with a long queue in a busy pool (every cycle frees room)
    /// full passes take a bounded share of the state lock and the passes between still
    /// place new work at once. Room freed meanwhile waits for the next full pass.
    pub fn set_full_pass_gap(&mut self, ms: Millis) {
        self.full_pass_gap_ms = ms;
    }

    /// When the next full pass is wanted and may run: `None` when none is wanted before
    /// the periodic one.
    pub fn full_pass_due(&self) -> Option<Millis> {
        let last = self.last_full_ms?;
        (self.full_needed || self.holding).then_some(last + self.full_pass_gap_ms)
    }

    pub fn schedule(&mut self, now: Millis) -> Result<CycleStats, CoreError> {
        let full = match self.last_full_ms {
            _ if self.exhaustive => true,
            None => true,
            Some(t) => {
                now - t >= FULL_PASS_EVERY_MS.max(self.full_pass_gap_ms)
                    || ((self.full_needed || self.holding) && now - t >= self.full_pass_gap_ms)
            }
        };
        if !full && self.holding {
            // Reservations and drained nodes exist only in a pass over the whole queue; a
            // pass over new work alone would let it into room held for another job.
            return Ok(CycleStats::default());
        }
        let mut offer: Vec<JobId> = if full {
            self.full_needed = false;
            self.last_full_ms = Some(now);
            Vec::new()
        } else {
            self.fresh.intersection(&self.pending).copied().collect()
        };
        self.fresh.clear();
        if offer.is_empty() && (!full || self.pending.is_empty()) {
            return Ok(CycleStats::default());
        }
        let mut snaps: Vec<NodeSnap> = self
            .nodes
            .values()
            .map(|e| NodeSnap {
                id: e.node.id,
                ready: e.node.state == NodeState::Ready && !e.node.drained,
                not_ready: match e.node.state {
                    NodeState::Ready => "drained",
                    NodeState::Lost => "lost",
                    NodeState::Down => "down",
                },
                capacity: std::sync::Arc::new(e.node.capacity.clone()),
                used_cpu_milli: e.alloc.cpu_milli,
                used_memory_bytes: e.alloc.memory_bytes,
                used_devices: e.alloc.devices.clone(),
                shared: e.alloc.shared.clone(),
                gpu_shapes: Default::default(),
                topology: e.node.topology.clone(),
            })
            .collect();
        let dt = self
            .history_at
            .map(|a| (now - a).max(0) as u64)
            .unwrap_or(0);
        self.history_at = Some(now);
        for t in self.tenants.keys() {
            let held = self.tenant_used.get(t).cloned().unwrap_or_default();
            self.tenant_history.entry(*t).or_default().advance(
                &held,
                dt,
                self.fair_share_half_life_ms,
            );
        }
        let mut tenants: HashMap<TenantId, TenantSnap> = self
            .tenants
            .values()
            .map(|t| {
                (
                    t.id,
                    TenantSnap {
                        quota: t.quota.clone(),
                        used: self.tenant_used.get(&t.id).cloned().unwrap_or_default(),
                        weight: t.weight,
                        history: self.tenant_history.get(&t.id).cloned().unwrap_or_default(),
                        guarantee: t.guarantee.clone(),
                    },
                )
            })
            .collect();
        // A job whose victims are still checkpointing waits for them; choosing more now
        // would preempt twice for the same room.
        // Once they all have, the room they freed is held for it through this cycle.
        let runs = &self.runs;
        let mut holds = Vec::new();
        self.preempting.retain(|job, victims| {
            if victims.iter().any(|v| runs.contains_key(&v.0)) {
                return true;
            }
            if let Some(j) = self.jobs.get(job) {
                holds.extend(victims.drain(..).map(|(_, node, resources, devices)| {
                    caravel_sched::Hold {
                        job: *job,
                        priority: j.rec.spec.priority,
                        node,
                        resources,
                        devices,
                    }
                }));
            }
            false
        });
        for victims in self.preempting.values() {
            for (run, node, res, devs) in victims {
                if self.runs.contains_key(run) {
                    continue;
                }
                if let Some(n) = snaps.iter_mut().find(|n| n.id == *node) {
                    n.used_cpu_milli += res.cpu_milli;
                    n.used_memory_bytes += res.memory_bytes;
                    match res.gpu.as_ref().and_then(|g| g.milli) {
                        Some(m) => {
                            for d in devs {
                                let u = n.shared.entry(*d).or_insert(0);
                                *u = (*u + m).min(1000);
                            }
                        }
                        None => n.used_devices.extend(devs.iter().copied()),
                    }
                }
            }
        }
        if self.sched_cfg.las.is_some() {
            let jobs = &self.jobs;
            self.attained
                .retain(|j, _| jobs.get(j).is_some_and(|e| !e.rec.state.is_terminal()));
            let missing: Vec<JobId> = self
                .pending
                .iter()
                .chain(self.runs.values().map(|r| &r.job))
                .filter(|j| !self.attained.contains_key(j))
                .copied()
                .collect();
            // One trip to the writer thread for all of them (after a restart, every
            // pending job is missing at once).
            let found = self.store.read(move |st| {
                let mut out = Vec::with_capacity(missing.len());
                for id in missing {
                    let used = st.usage(&caravel_store::UsageFilter {
                        tenant: None,
                        job: Some(id),
                    })?;
                    out.push((id, used.iter().map(attained_by).sum::<u64>()));
                }
                Ok(out)
            })?;
            self.attained.extend(found);
        }
        let attained = |c: &Core, id: &JobId| c.attained.get(id).copied().unwrap_or(0);
        let mut left_out_shapes = Vec::new();
        let held: BTreeSet<JobId> = holds.iter().map(|h| h.job).collect();
        if full {
            (offer, left_out_shapes) = self.full_offer(&held);
        } else {
            // Room held for a job the pass does not offer would be let go.
            for j in &held {
                if self.pending.contains(j) && !offer.contains(j) {
                    offer.push(*j);
                }
            }
        }
        let mut reqs = Vec::with_capacity(offer.len());
        for id in &offer {
            let j = &self.jobs[id];
            // A gang waits until every member of a previous attempt has stopped.
            if j.rec.spec.gang && !j.active_runs.is_empty() {
                continue;
            }
            if self.preempting.contains_key(id) {
                continue;
            }
            reqs.push(JobReq {
                id: *id,
                tenant: j.rec.tenant,
                priority: j.rec.spec.priority,
                seq: j.rec.seq,
                resources: j.rec.spec.resources.clone(),
                gang: j.rec.spec.gang,
                min_tasks: j.rec.spec.min_tasks,
                pending: j
                    .tasks
                    .iter()
                    .filter(|t| t.state == TaskState::Pending)
                    .map(|t| t.index)
                    .collect(),
                topology: j.rec.spec.topology,
                max_runtime_ms: j.rec.spec.max_runtime_ms,
                // Ended runs, plus what the job's running tasks have received so far.
                attained_gpu_ms: attained(self, id)
                    + j.active_runs
                        .iter()
                        .filter_map(|r| self.runs.get(r))
                        .filter_map(|r| r.started_ms)
                        .map(|s| (now - s).max(0) as u64 * j.rec.spec.resources.gpu_milli() / 1000)
                        .sum::<u64>(),
            });
        }
        // Running tasks that may be preempted: started, and not already stopping.
        let running: Vec<caravel_sched::RunningTask> = self
            .runs
            .values()
            .filter(|r| r.state == RunState::Running && r.stop.is_none())
            .map(|r| {
                let spec = &self.jobs[&r.job].rec.spec;
                caravel_sched::RunningTask {
                    run: r.id,
                    job: r.job,
                    tenant: r.tenant,
                    node: r.node,
                    priority: spec.priority,
                    resources: spec.resources.clone(),
                    devices: r.devices.clone(),
                    started_ms: r.started_ms.unwrap_or(now),
                    min_runtime_ms: spec.min_runtime_ms.unwrap_or(0),
                    borrowed: r.borrowed,
                    expected_end_ms: spec
                        .max_runtime_ms
                        .map(|m| r.started_ms.unwrap_or(now) + m as i64),
                    gang_size: if spec.gang { spec.tasks } else { 1 },
                    attained_gpu_ms: attained(self, &r.job),
                    saved_ms: self.saved.1.get(&r.id).copied(),
                    save_every_ms: 0,
                }
            })
            .collect();
        let mut cfg = self.sched_cfg.clone();
        if full || self.workload_misses(&reqs) {
            // What a full pass left out still counts towards the workload's shape.
            self.workload = self.expected_workload(&reqs, &left_out_shapes);
            self.share_plan = self
                .workload
                .as_deref()
                .and_then(|w| caravel_sched::plan::SharePlan::new(w))
                .map(std::sync::Arc::new);
        }
        cfg.fgd = self.workload.clone();
        cfg.share_plan = self.share_plan.clone();
        let zone_preferences = reqs
            .iter()
            .filter_map(|r| {
                let z = self.jobs[&r.id].rec.service.as_ref()?.zone.clone()?;
                Some((r.id, z))
            })
            .collect();
        let mut starving = Vec::new();
        if self.starvation_ms > 0 {
            let limit = self.starvation_ms as i64;
            let mut waited: Vec<(Millis, u64, JobId)> = reqs
                .iter()
                .map(|r| &self.jobs[&r.id].rec)
                .filter(|j| j.started_ms.is_none() && now - j.submitted_ms >= limit)
                .map(|j| (j.submitted_ms, j.seq, j.id))
                .collect();
            waited.sort_unstable();
            starving = waited.into_iter().map(|(_, _, id)| id).collect();
        }
        self.holding = !starving.is_empty();
        let plan = caravel_sched::Scheduler::new(cfg, snaps).cycle(caravel_sched::CycleInput {
            now,
            jobs: &reqs,
            tenants: &mut tenants,
            running: Some(running),
            holds,
            starving,
            zone_preferences,
        });
        self.holding |= !plan.reservations.is_empty();
        let stats = CycleStats {
            considered_jobs: reqs.len(),
            placed: plan.placements.len(),
            full,
        };
        for (id, reasons) in plan.pending {
            if let Some(j) = self.jobs.get_mut(&id) {
                j.reasons = reasons.into();
            }
        }
        if !plan.preemptions.is_empty() {
            let mut batch = Vec::new();
            let mut nodes = BTreeSet::new();
            for p in &plan.preemptions {
                if let Some(r) = self.runs.get_mut(&p.run) {
                    r.stop = Some(StopReason::Preempt);
                    r.preempted_for = Some(p.for_job);
                    r.message = format!("preempted for job {}", p.for_job);
                    batch.push(Mutation::PutRun(r.clone()));
                    nodes.insert(r.node);
                    let res = self.jobs[&r.job].rec.spec.resources.clone();
                    self.preempting.entry(p.for_job).or_default().push((
                        p.run,
                        r.node,
                        res,
                        r.devices.clone(),
                    ));
                }
            }
            self.commit(&batch)?;
            for n in nodes {
                self.bump(n);
            }
            tracing::info!(victims = plan.preemptions.len(), "preempting running tasks");
        }
        if plan.placements.is_empty() {
            return Ok(stats);
        }
        // Build runs; gang members learn their local rank and rank 0's address.
        let mut per_job_node: HashMap<(JobId, NodeId), u32> = HashMap::new();
        let mut per_job: HashMap<JobId, u32> = HashMap::new();
        for p in &plan.placements {
            *per_job_node.entry((p.job, p.node)).or_insert(0) += 1;
            *per_job.entry(p.job).or_insert(0) += 1;
        }
        let mut seen_job_node: HashMap<(JobId, NodeId), u32> = HashMap::new();
        let mut master: HashMap<JobId, String> = HashMap::new();
        let mut master_port: HashMap<JobId, u16> = HashMap::new();
        for p in &plan.placements {
            if p.index == 0 {
                master.insert(p.job, self.nodes[&p.node].node.address.clone());
                if self.jobs[&p.job].rec.spec.gang {
                    let port = self.master_port_on(p.node, p.job);
                    master_port.insert(p.job, port);
                }
            }
        }
        let mut new_runs = Vec::with_capacity(plan.placements.len());
        let mut batch = Vec::with_capacity(plan.placements.len() * 3);
        let mut touched_jobs = BTreeSet::new();
        let mut next_run = self.next_run;
        for p in &plan.placements {
            let j = self.jobs.get_mut(&p.job).expect("planned job exists");
            let lr = seen_job_node.entry((p.job, p.node)).or_insert(0);
            let local_rank = *lr;
            *lr += 1;
            let t = &mut j.tasks[p.index as usize];
            t.attempts += 1;
            t.state = TaskState::Assigned;
            let run = RunRecord {
                id: RunId(next_run),
                job: p.job,
                tenant: j.rec.tenant,
                index: p.index,
                attempt: t.attempts,
                node: p.node,
                devices: p.devices.clone(),
                // The model placement chose (a job may accept several).
                gpu_model: p.devices.first().and_then(|d| {
                    self.nodes[&p.node]
                        .node
                        .capacity
                        .devices
                        .iter()
                        .find(|x| x.index == *d)
                        .map(|x| x.model.clone())
                }),
                local_rank,
                local_world_size: per_job_node[&(p.job, p.node)],
                borrowed: p.borrowed,
                master_addr: if j.rec.spec.gang {
                    master.get(&p.job).cloned()
                } else {
                    None
                },
                master_port: master_port.get(&p.job).copied(),
                port: None,
                preempted_for: None,
                state: RunState::Assigned,
                stop: None,
                assigned_ms: now,
                started_ms: None,
                ended_ms: None,
                exit_code: None,
                signal: None,
                message: String::new(),
                checkpoint: None,
                world_size: j.rec.spec.gang.then(|| per_job[&p.job]),
            };
            next_run += 1;
            t.current_run = Some(run.id);
            batch.push(Mutation::PutTask(t.clone()));
            batch.push(Mutation::PutRun(run.clone()));
            if j.rec.state == JobState::Pending {
                j.rec.state = JobState::Running;
                touched_jobs.insert(p.job);
            }
            new_runs.push(run);
        }
        // An elastic gang placed with fewer ranks than its tasks: the others sit this
        // attempt out (pending again when the gang restarts, to grow or shrink).
        for (id, n) in &per_job {
            let j = self.jobs.get_mut(id).expect("exists");
            if j.rec.spec.min_tasks.is_some() && *n < j.rec.spec.tasks {
                for t in j.tasks.iter_mut().filter(|t| t.state == TaskState::Pending) {
                    t.state = TaskState::Skipped;
                    batch.push(Mutation::PutTask(t.clone()));
                }
            }
        }
        for id in &touched_jobs {
            batch.push(Mutation::PutJob(self.jobs[id].rec.clone()));
        }
        if let Err(e) = self.commit(&batch) {
            // Memory must not run ahead of the store: reload is the only safe undo.
            tracing::error!(error = %e, "committing a plan failed; state will be reloaded");
            return Err(e);
        }
        self.next_run = next_run;
        let mut nodes_touched = BTreeSet::new();
        for r in new_runs {
            self.take_alloc(&r);
            nodes_touched.insert(r.node);
            let j = self.jobs.get_mut(&r.job).expect("exists");
            j.active_runs.insert(r.id);
            self.runs.insert(r.id, r);
        }
        for n in nodes_touched {
            self.bump(n);
        }
        let jobs: BTreeSet<JobId> = plan.placements.iter().map(|p| p.job).collect();
        for id in jobs {
            self.refresh_pending(id);
        }
        Ok(stats)
    }

    /// The workload fragmentation is measured against: the shapes of what runs and waits
    /// now, weighted by count. `None` (plain indexed best fit) when no GPU work is about.
    fn expected_workload(
        &self,
        reqs: &[JobReq],
        more: &[(TaskResources, u64)],
    ) -> Option<std::sync::Arc<Vec<caravel_sched::fgd::WorkloadType>>> {
        let running = self
            .runs
            .values()
            .map(|r| (&self.jobs[&r.job].rec.spec.resources, 1));
        let waiting = reqs.iter().map(|j| (&j.resources, j.pending.len() as u64));
        let more = more.iter().map(|(r, n)| (r, *n));
        caravel_sched::fgd::workload_of(running.chain(waiting).chain(more)).map(std::sync::Arc::new)
    }

    /// What a full pass offers: every waiting job, except that of each class of single
    /// never-started jobs (see `ClassKey`) only the oldest are offered — enough to fill the
    /// whole pool were it empty, plus one per backfill reservation. The scheduler takes a
    /// class oldest first, so once one of its jobs can neither start nor preempt, none
    /// after it can; with a long queue of one shape a full pass then costs the pool's
    /// size, not the queue's. Also returns, per class, the tasks left out (they still
    /// count towards the expected workload). Each class remembers its last offered job,
    /// whose reasons the jobs behind it show (`reasons_of`).
    fn full_offer(
        &mut self,
        must_offer: &BTreeSet<JobId>,
    ) -> (Vec<JobId>, Vec<(TaskResources, u64)>) {
        let (mut cpu, mut mem, mut devices) = (0u64, 0u64, 0u64);
        for n in self.nodes.values() {
            cpu += n.node.capacity.cpu_milli;
            mem += n.node.capacity.memory_bytes;
            devices += n.node.capacity.devices.len() as u64;
        }
        // Tasks of this shape an empty pool could hold at most (pool totals bound the
        // sum over nodes).
        let slots = |r: &TaskResources| -> u64 {
            let per = |total: u64, ask: u64| total.checked_div(ask).unwrap_or(u64::MAX);
            let gpu = match &r.gpu {
                None => u64::MAX,
                Some(g) => match g.milli {
                    Some(m) => devices.saturating_mul(per(1000, m as u64)),
                    None => per(devices, g.count as u64),
                },
            };
            per(cpu, r.cpu_milli).min(per(mem, r.memory_bytes)).min(gpu)
        };
        let reservations = self.sched_cfg.reservations.max(1);
        if self.exhaustive {
            return (self.pending.iter().copied().collect(), Vec::new());
        }
        let mut offer: Vec<JobId> = self.unclassed.iter().copied().collect();
        let mut left_out = Vec::new();
        for (key, class) in self.classes.iter_mut() {
            let cap = slots(&key.2);
            let (mut tasks, mut jobs) = (0u64, 0usize);
            class.rep = None;
            for (id, n) in &class.jobs {
                if tasks >= cap && jobs > reservations {
                    break;
                }
                tasks += *n;
                jobs += 1;
                class.rep = Some(*id);
                offer.push(*id);
            }
            if tasks < class.tasks {
                left_out.push((key.2.clone(), class.tasks - tasks));
                // Room held for a job (its victims have exited) is its own, wherever it
                // stands in its class.
                let rep = class.rep.expect("a class offers at least one job");
                offer.extend(
                    must_offer
                        .range(JobId(rep.0 + 1)..)
                        .filter(|j| class.jobs.contains_key(j)),
                );
            }
        }
        (offer, left_out)
    }

    /// Why a waiting job waits. A job a full pass left out behind others of its class
    /// shows the reasons of the last one offered.
    pub fn reasons_of(&self, j: &JobEntry) -> std::sync::Arc<[PendingReason]> {
        let id = j.rec.id;
        let rep = self
            .job_class
            .get(&id)
            .and_then(|k| self.classes.get(k))
            .and_then(|c| c.rep)
            .filter(|rep| *rep < id);
        match rep {
            None => j.reasons.clone(),
            Some(rep) => match self.jobs.get(&rep) {
                Some(r) if self.pending.contains(&rep) && !r.reasons.is_empty() => {
                    r.reasons.clone()
                }
                _ => std::sync::Arc::new([PendingReason {
                    code: ReasonCode::Queued,
                    unexplained: false,
                    message: "behind earlier jobs of the same shape that cannot start yet".into(),
                    counts: BTreeMap::new(),
                }]),
            },
        }
    }

    /// Keeps `classes`, `job_class` and `unclassed` in step with `pending` for one job.
    fn index_pending(&mut self, id: JobId) {
        let want: Option<ClassKey> = self
            .pending
            .contains(&id)
            .then(|| self.jobs.get(&id))
            .flatten()
            .filter(|j| {
                !j.rec.spec.gang
                    && j.rec.service.is_none()
                    && j.active_runs.is_empty()
                    && j.tasks
                        .iter()
                        .all(|t| t.attempts == 0 && t.state == TaskState::Pending)
            })
            .map(|j| {
                let s = &j.rec.spec;
                (
                    j.rec.tenant,
                    s.priority,
                    s.resources.clone(),
                    s.max_runtime_ms,
                )
            });
        if self.job_class.get(&id) != want.as_ref() {
            if let Some(old) = self.job_class.remove(&id) {
                if let Some(c) = self.classes.get_mut(&old) {
                    if let Some(n) = c.jobs.remove(&id) {
                        c.tasks -= n;
                    }
                    if c.jobs.is_empty() {
                        self.classes.remove(&old);
                    }
                }
            }
            if let Some(key) = want {
                let n = self.jobs[&id].tasks.len() as u64;
                let c = self.classes.entry(key.clone()).or_default();
                c.jobs.insert(id, n);
                c.tasks += n;
                self.job_class.insert(id, key);
            }
        }
        if self.pending.contains(&id) && !self.job_class.contains_key(&id) {
            self.unclassed.insert(id);
        } else {
            self.unclassed.remove(&id);
        }
    }

    /// Whether a job offered now asks for GPU work of a shape the cached workload lacks
    /// (a pass between full ones then measures fragmentation afresh).
    fn workload_misses(&self, reqs: &[JobReq]) -> bool {
        reqs.iter().any(|r| {
            let Some(g) = &r.resources.gpu else {
                return false;
            };
            let Some(w) = &self.workload else {
                return true;
            };
            !w.iter().any(|t| {
                t.cpu_milli == r.resources.cpu_milli
                    && t.memory_bytes == r.resources.memory_bytes
                    && t.num_gpu == g.count
                    && t.gpu_milli == g.milli.unwrap_or(1000)
                    && t.models.iter().map(String::as_str).eq(g.models_iter())
            })
        })
    }

    fn spec_of(&self, job: JobId) -> &JobSpec {
        &self.jobs[&job].rec.spec
    }

    fn take_alloc(&mut self, r: &RunRecord) {
        let res = self.spec_of(r.job).resources.clone();
        if let Some(n) = self.nodes.get_mut(&r.node) {
            n.alloc.cpu_milli += res.cpu_milli;
            n.alloc.memory_bytes += res.memory_bytes;
            match res.gpu.as_ref().and_then(|g| g.milli) {
                Some(m) => {
                    for d in &r.devices {
                        *n.alloc.shared.entry(*d).or_insert(0) += m;
                    }
                }
                None => n.alloc.devices.extend(r.devices.iter().copied()),
            }
            n.alloc.runs.insert(r.id);
        }
        self.tenant_used
            .entry(r.tenant)
            .or_default()
            .add_task_on(&res, r.gpu_model.as_deref(), 1);
    }

    fn give_alloc(&mut self, r: &RunRecord) {
        self.full_needed = true;
        let res = self.spec_of(r.job).resources.clone();
        if let Some(n) = self.nodes.get_mut(&r.node) {
            n.alloc.cpu_milli = n.alloc.cpu_milli.saturating_sub(res.cpu_milli);
            n.alloc.memory_bytes = n.alloc.memory_bytes.saturating_sub(res.memory_bytes);
            match res.gpu.as_ref().and_then(|g| g.milli) {
                Some(m) => {
                    for d in &r.devices {
                        if let Some(u) = n.alloc.shared.get_mut(d) {
                            *u = u.saturating_sub(m);
                            if *u == 0 {
                                n.alloc.shared.remove(d);
                            }
                        }
                    }
                }
                None => {
                    for d in &r.devices {
                        n.alloc.devices.remove(d);
                    }
                }
            }
            n.alloc.runs.remove(&r.id);
        }
        if let Some(u) = self.tenant_used.get_mut(&r.tenant) {
            u.sub_task_on(&res, r.gpu_model.as_deref(), 1);
        }
    }

    /// A MASTER_PORT for a gang whose rank 0 goes to `node`: one the agent found free and
    /// no other run there was given, or (from an agent that does not say) the job's
    /// default port, moved on past any other run's there.
    fn master_port_on(&mut self, node: NodeId, job: JobId) -> u16 {
        let used: BTreeSet<u16> = self.nodes[&node]
            .alloc
            .runs
            .iter()
            .filter_map(|r| self.runs.get(r)?.master_port)
            .collect();
        let n = self.nodes.get_mut(&node).expect("placed on a known node");
        n.free_ports.retain(|p| !used.contains(p));
        if !n.free_ports.is_empty() {
            return n.free_ports.remove(0);
        }
        let mut port = job_port(job);
        while used.contains(&port) {
            port = if port >= 49_499 { 29_500 } else { port + 1 };
        }
        port
    }

    /// Records the ports the node's agent found free.
    pub fn set_free_ports(&mut self, node: NodeId, ports: Vec<u16>) {
        if let Some(n) = self.nodes.get_mut(&node) {
            if !ports.is_empty() {
                n.free_ports = ports;
            }
        }
    }

    /// Grows elastic gangs: one running with fewer ranks than it may have, whose attempt
    /// has run `elastic_grow_after_ms`, is stopped (preempted: no retry used, its
    /// checkpoint saved at exit) when idle room holds more of its ranks and no other job
    /// waits for it; it is then placed again with as many ranks as fit. Topology-bound
    /// gangs do not grow (the room would have to be in their domain).
    pub fn grow_elastic(&mut self, now: Millis) -> Result<u32, CoreError> {
        let mut grown = 0;
        let candidates: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                j.rec.spec.min_tasks.is_some()
                    && j.rec.spec.topology.is_none()
                    && !j.rec.state.is_terminal()
                    && !j.rec.cancel_requested
                    && !j.active_runs.is_empty()
                    && (j.active_runs.len() as u32) < j.rec.spec.tasks
            })
            .map(|(id, _)| *id)
            .collect();
        for id in candidates {
            if self.pending.iter().any(|p| *p != id) {
                break;
            }
            let j = &self.jobs[&id];
            let runs: Vec<&RunRecord> = j
                .active_runs
                .iter()
                .filter_map(|r| self.runs.get(r))
                .collect();
            // Every rank still at work: a gang some of whose ranks have finished is ending,
            // not worth a restart.
            if runs
                .iter()
                .any(|r| r.state != RunState::Running || r.stop.is_some())
                || j.tasks
                    .iter()
                    .any(|t| !matches!(t.state, TaskState::Running | TaskState::Skipped))
            {
                continue;
            }
            let started = runs
                .iter()
                .filter_map(|r| r.started_ms)
                .max()
                .unwrap_or(now);
            if now - started < self.elastic_grow_after_ms as i64 {
                continue;
            }
            let res = j.rec.spec.resources.clone();
            let room: u64 = self
                .nodes
                .values()
                .filter(|e| e.node.state == NodeState::Ready && !e.node.drained)
                .map(|e| {
                    let cap = &e.node.capacity;
                    let free = Capacity {
                        cpu_milli: cap.cpu_milli.saturating_sub(e.alloc.cpu_milli),
                        memory_bytes: cap.memory_bytes.saturating_sub(e.alloc.memory_bytes),
                        devices: cap
                            .devices
                            .iter()
                            .filter(|d| {
                                !e.alloc.devices.contains(&d.index)
                                    && !e.alloc.shared.contains_key(&d.index)
                            })
                            .cloned()
                            .collect(),
                        ..cap.clone()
                    };
                    caravel_sched::tasks_when_empty(&free, &res)
                })
                .sum();
            if room == 0 {
                continue;
            }
            let k = runs.len();
            let ids: Vec<RunId> = runs.iter().map(|r| r.id).collect();
            let mut batch = Vec::new();
            let mut nodes = BTreeSet::new();
            for rid in ids {
                let r = self.runs.get_mut(&rid).expect("active");
                r.stop = Some(StopReason::Preempt);
                r.message = format!("stopped to grow from {k} ranks: room for {room} more");
                batch.push(Mutation::PutRun(r.clone()));
                nodes.insert(r.node);
            }
            self.commit(&batch)?;
            for n in nodes {
                self.bump(n);
            }
            tracing::info!(job = %id, ranks = k, room, "growing an elastic gang: stopping it to place it again bigger");
            grown += 1;
        }
        Ok(grown)
    }

    /// Whether the job is a gang of more than one task (its checkpoint is the gang's).
    pub fn is_gang_of_many(&self, job: JobId) -> bool {
        self.jobs
            .get(&job)
            .is_some_and(|j| j.rec.spec.gang && j.rec.spec.tasks > 1)
    }

    /// What the gang checkpoint protocol needs of each rank of a gang of more than one
    /// task; `None` for any other job.
    pub fn gang_ranks(&self, job: JobId) -> Option<Vec<crate::checkpoints::Rank>> {
        let j = self.jobs.get(&job)?;
        self.is_gang_of_many(job).then(|| {
            j.tasks
                .iter()
                .map(|t| crate::checkpoints::Rank {
                    attempts: t.attempts,
                    current: t.current_run,
                    sits_out: t.state == TaskState::Skipped,
                })
                .collect()
        })
    }

    /// Wakes the long polls of the nodes that run the job's current runs.
    pub fn wake_job_nodes(&mut self, job: JobId) {
        let nodes: BTreeSet<NodeId> = self
            .jobs
            .get(&job)
            .map(|j| {
                j.tasks
                    .iter()
                    .filter_map(|t| self.runs.get(&t.current_run?).map(|r| r.node))
                    .collect()
            })
            .unwrap_or_default();
        for n in nodes {
            self.bump(n);
        }
    }

    fn bump(&mut self, node: NodeId) {
        if let Some(n) = self.nodes.get(&node) {
            n.version.send_modify(|v| *v += 1);
        }
    }

    fn usage_of(&self, r: &RunRecord, start: Millis, end: Millis) -> UsageRecord {
        let res = &self.spec_of(r.job).resources;
        UsageRecord {
            run: r.id,
            tenant: r.tenant,
            job: r.job,
            index: r.index,
            node: r.node,
            start_ms: start,
            end_ms: end.max(start),
            cpu_milli: res.cpu_milli,
            memory_bytes: res.memory_bytes,
            gpu_model: r.gpu_model.clone(),
            gpu_count: r.devices.len() as u32,
            gpu_milli: res.gpu_milli(),
            priority: self.spec_of(r.job).priority,
        }
    }

    /// Ends an active run: records its final state and its usage in one batch, frees its
    /// resources, and moves its task on (done, retry, or wait for the gang).
    #[allow(clippy::too_many_arguments)]
    fn finish_run(
        &mut self,
        id: RunId,
        state: RunState,
        ended: Millis,
        exit_code: Option<i32>,
        signal: Option<i32>,
        message: String,
        started: Option<Millis>,
    ) -> Result<(), CoreError> {
        let Some(mut r) = self.runs.get(&id).cloned() else {
            return Ok(());
        };
        if r.started_ms.is_none() {
            r.started_ms = started;
        }
        r.state = state;
        r.ended_ms = Some(ended);
        r.exit_code = exit_code;
        r.signal = signal;
        r.message = message.clone();
        let mut batch = vec![Mutation::PutRun(r.clone())];
        if let Some(s) = r.started_ms {
            let u = self.usage_of(&r, s, ended);
            if let Some(a) = self.attained.get_mut(&r.job) {
                *a += attained_by(&u);
            }
            batch.push(Mutation::InsertUsage(u));
        }
        let job_id = r.job;
        let (gang, max_retries, cancel) = {
            let j = &self.jobs[&job_id];
            (
                j.rec.spec.gang,
                j.rec.spec.max_retries,
                j.rec.cancel_requested,
            )
        };
        let mut stop_others = Vec::new();
        {
            let j = self.jobs.get_mut(&job_id).expect("run's job exists");
            let t = &mut j.tasks[r.index as usize];
            let current = t.current_run == Some(id);
            if current {
                t.exit_code = exit_code;
                match state {
                    RunState::Succeeded => t.state = TaskState::Succeeded,
                    _ if cancel => t.state = TaskState::Cancelled,
                    _ if gang => {
                        // Stays where it is until the whole gang has stopped; settle_job
                        // then restarts or fails every member together.
                        if state != RunState::Killed && j.rec.gang_abort.is_none() {
                            j.rec.gang_abort_free = state == RunState::Preempted;
                            j.rec.gang_abort = Some(format!(
                                "task {} {}{}",
                                r.index,
                                state.as_str(),
                                if message.is_empty() {
                                    String::new()
                                } else {
                                    format!(": {message}")
                                }
                            ));
                            batch.push(Mutation::PutJob(j.rec.clone()));
                        }
                        t.state = TaskState::Failed;
                        stop_others = j.active_runs.iter().copied().filter(|x| *x != id).collect();
                    }
                    RunState::Preempted => {
                        // Requeued without using a retry: being preempted is not a failure.
                        t.state = TaskState::Pending;
                        t.current_run = None;
                    }
                    RunState::Failed | RunState::Lost if t.retries_used < max_retries => {
                        t.retries_used += 1;
                        t.state = TaskState::Pending;
                        t.current_run = None;
                    }
                    RunState::Killed => t.state = TaskState::Cancelled,
                    _ => t.state = TaskState::Failed,
                }
                batch.push(Mutation::PutTask(t.clone()));
            }
        }
        let mut touched = BTreeSet::new();
        let mut unstarted = Vec::new();
        let stop_others_nonempty = !stop_others.is_empty();
        for o in &stop_others {
            let or = self.runs.get_mut(o).expect("active");
            if or.stop.is_none() {
                if or.state == RunState::Assigned {
                    unstarted.push(*o);
                }
                or.stop = Some(StopReason::GangAbort);
                batch.push(Mutation::PutRun(or.clone()));
                touched.insert(or.node);
            }
        }
        self.runs.remove(&id);
        self.give_alloc(&r);
        self.jobs
            .get_mut(&job_id)
            .expect("exists")
            .active_runs
            .remove(&id);
        // The job's new state lands in the same transaction as the run's end: a crash can
        // never leave a finished run under a job that still says running.
        batch.extend(self.settle_mutations(job_id, ended));
        self.commit(&batch)?;
        self.refresh_pending(job_id);
        // A run that ended by itself needs nothing from its agent; only a run that ended
        // without its agent's word (lost, cancelled before start) must leave the desired set
        // now, so that the agent stops any copy it might still have.
        if !matches!(
            state,
            RunState::Succeeded | RunState::Failed | RunState::TimedOut
        ) || stop_others_nonempty
        {
            touched.insert(r.node);
        }
        for n in touched {
            self.bump(n);
        }
        for o in unstarted {
            self.finish_run(
                o,
                RunState::Killed,
                ended,
                None,
                None,
                "gang member failed".into(),
                None,
            )?;
        }
        Ok(())
    }

    // ---- agents ----

    pub fn register(&mut self, req: RegisterRequest, now: Millis) -> Result<NodeId, CoreError> {
        validate_name("name", &req.name)?;
        for d in &req.capacity.devices {
            validate_model(&d.model)
                .map_err(|r| ValidationError::new("capacity.devices.model", r))?;
        }
        let mut idx = BTreeSet::new();
        if !req.capacity.devices.iter().all(|d| idx.insert(d.index)) {
            return Err(
                ValidationError::new("capacity.devices", "device indices must be unique").into(),
            );
        }
        if let Some(f) = &req.agent_cert_sha256 {
            if f.len() != 64 || !f.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ValidationError::new(
                    "agent_cert_sha256",
                    "must be a SHA-256 in hex (64 characters)",
                )
                .into());
            }
        }
        if req.capacity.cpu_milli == 0 || req.capacity.memory_bytes == 0 {
            return Err(
                ValidationError::new("capacity", "a node needs some cpu and memory").into(),
            );
        }
        if req.isolation_missing.len() > 16 || req.isolation_missing.iter().any(|m| m.len() > 1024)
        {
            return Err(ValidationError::new(
                "isolation_missing",
                "at most 16 entries of at most 1024 bytes",
            )
            .into());
        }
        let running: BTreeSet<RunId> = req.running.iter().copied().collect();
        let existing = self.node_by_name.get(&req.name).copied();
        let id = existing.unwrap_or(NodeId(self.next_node));
        let node = Node {
            id,
            name: req.name.clone(),
            address: req.address,
            agent_url: req.agent_url,
            agent_secret: req.agent_secret,
            agent_cert_sha256: req.agent_cert_sha256.map(|f| f.to_ascii_lowercase()),
            topology: req.topology,
            labels: req.labels,
            capacity: req.capacity,
            state: NodeState::Ready,
            last_seen_ms: now,
            registered_ms: existing
                .map(|e| self.nodes[&e].node.registered_ms)
                .unwrap_or(now),
            instance: req.instance,
            // An agent restart does not undo an operator's drain.
            drained: existing.is_some_and(|e| self.nodes[&e].node.drained),
            isolation_missing: req.isolation_missing.clone(),
        };
        self.commit(&[Mutation::PutNode(node.clone())])?;
        if existing.is_none() {
            self.next_node += 1;
        }
        self.node_by_name.insert(node.name.clone(), id);
        match self.nodes.get_mut(&id) {
            Some(e) => e.node = node,
            None => {
                self.nodes.insert(
                    id,
                    NodeEntry {
                        node,
                        alloc: NodeAlloc::default(),
                        version: tokio::sync::watch::Sender::new(1),
                        free_ports: Vec::new(),
                    },
                );
            }
        }
        // A restarted agent that does not report a run no longer has it.
        let gone: Vec<RunId> = self.nodes[&id]
            .alloc
            .runs
            .iter()
            .copied()
            .filter(|r| !running.contains(r))
            .collect();
        for r in gone {
            let started = self.runs[&r].started_ms;
            self.finish_run(
                r,
                RunState::Lost,
                now,
                None,
                None,
                "agent restarted without it".into(),
                started,
            )?;
        }
        self.bump(id);
        Ok(id)
    }

    /// Records a heartbeat and returns the node's desired runs and their version.
    pub fn heartbeat(
        &mut self,
        node: NodeId,
        instance: &str,
        now: Millis,
    ) -> Result<(), CoreError> {
        let e = self
            .nodes
            .get_mut(&node)
            .ok_or_else(|| CoreError::not_found(format!("node {node}")))?;
        if e.node.instance != instance {
            return Err(CoreError::conflict(
                "agent instance changed; register again",
            ));
        }
        e.node.last_seen_ms = now;
        if e.node.state == NodeState::Lost {
            e.node.state = NodeState::Ready;
            tracing::info!(node = %e.node.name, "node is back");
            let n = e.node.clone();
            self.commit(&[Mutation::PutNode(n)])?;
        }
        Ok(())
    }

    /// A clean shutdown of the node's agent: nothing new is placed on it, runs it has not
    /// started are requeued at once, and the others are told to stop; each is requeued
    /// without using a retry when its exit comes in (the agent waits for that before it
    /// leaves). Returns how many runs were told to stop.
    pub fn shutdown_node(
        &mut self,
        node: NodeId,
        instance: &str,
        now: Millis,
    ) -> Result<u32, CoreError> {
        self.heartbeat(node, instance, now)?;
        let e = self.nodes.get_mut(&node).expect("heartbeat checked it");
        let mut n = e.node.clone();
        n.state = NodeState::Down;
        let name = n.name.clone();
        let mut batch = vec![Mutation::PutNode(n.clone())];
        e.node = n;
        let mut unstarted = Vec::new();
        let mut stopping = 0;
        for rid in &self.nodes[&node].alloc.runs {
            let r = self.runs.get_mut(rid).expect("allocated run exists");
            if r.state == RunState::Assigned {
                unstarted.push(*rid);
            } else if r.stop.is_none() {
                r.stop = Some(StopReason::Shutdown);
                batch.push(Mutation::PutRun(r.clone()));
                stopping += 1;
            }
        }
        self.commit(&batch)?;
        tracing::info!(node = %name, stopping, requeued = unstarted.len(), "node shutting down");
        for rid in unstarted {
            // Never started as far as we know; a late exit report still meters it.
            self.finish_run(
                rid,
                RunState::Preempted,
                now,
                None,
                None,
                format!("node {name} shut down before it started"),
                None,
            )?;
        }
        self.bump(node);
        Ok(stopping)
    }

    /// The node's desired runs, and full specs of those not in `known` (what the agent
    /// says it already runs).
    pub fn desired(
        &self,
        node: NodeId,
        known: &BTreeSet<RunId>,
    ) -> (u64, Vec<RunId>, Vec<Assignment>) {
        let Some(e) = self.nodes.get(&node) else {
            return (0, vec![], vec![]);
        };
        let version = *e.version.borrow();
        let mut ids = Vec::new();
        let mut out = Vec::new();
        for rid in &e.alloc.runs {
            let r = &self.runs[rid];
            if r.stop.is_some() {
                continue;
            }
            ids.push(*rid);
            if !known.contains(rid) {
                out.push(self.assignment(&self.jobs[&r.job], r));
            }
        }
        (version, ids, out)
    }

    /// The working directories live jobs (not finished) and services name, by tenant: the
    /// store keeps these whatever their age.
    pub fn workdirs_in_use(&self) -> std::collections::HashSet<(TenantId, String)> {
        let mut out = std::collections::HashSet::new();
        for j in self.jobs.values() {
            if let (false, Some(w)) = (j.rec.state.is_terminal(), &j.rec.spec.workdir) {
                out.insert((j.rec.tenant, w.clone()));
            }
        }
        for ((t, _), svc) in &self.services {
            if let Some(w) = &svc.spec.workdir {
                out.insert((*t, w.clone()));
            }
        }
        out
    }

    fn assignment(&self, j: &JobEntry, r: &RunRecord) -> Assignment {
        let s = &j.rec.spec;
        let mut env = s.env.clone();
        // Secrets reach the agent only inside an assignment (its channel is the agent's
        // authenticated sync), and from there only the task's environment.
        env.extend(s.secret_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.insert("CARAVEL_JOB_ID".into(), r.job.to_string());
        env.insert("CARAVEL_TASK_INDEX".into(), r.index.to_string());
        env.insert("CARAVEL_TASK_COUNT".into(), s.tasks.to_string());
        env.insert("CARAVEL_RUN_ID".into(), r.id.to_string());
        env.insert("CARAVEL_ATTEMPT".into(), r.attempt.to_string());
        env.insert("CARAVEL_TENANT".into(), self.tenant_name(r.tenant));
        env.insert(
            "CUDA_VISIBLE_DEVICES".into(),
            r.devices
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
        if let Some(m) = s.resources.gpu.as_ref().and_then(|g| g.milli) {
            // The device is shared: the task gets this many thousandths of it.
            env.insert("CARAVEL_GPU_MILLI".into(), m.to_string());
        }
        if s.gang {
            env.insert("RANK".into(), r.index.to_string());
            env.insert(
                "WORLD_SIZE".into(),
                r.world_size.unwrap_or(s.tasks).to_string(),
            );
            env.insert("LOCAL_RANK".into(), r.local_rank.to_string());
            env.insert("LOCAL_WORLD_SIZE".into(), r.local_world_size.to_string());
            env.insert(
                "MASTER_ADDR".into(),
                r.master_addr.clone().unwrap_or_else(|| "127.0.0.1".into()),
            );
            env.insert(
                "MASTER_PORT".into(),
                r.master_port.unwrap_or(29500).to_string(),
            );
            env.insert(
                "TORCHELASTIC_RESTART_COUNT".into(),
                (r.attempt - 1).to_string(),
            );
        }
        Assignment {
            // Filled in by the API as the assignment goes out (`with_checkpoints`).
            gang_cut: (s.gang && s.tasks > 1).then(caravel_core::api::GangCut::default),
            run: r.id,
            job: r.job,
            index: r.index,
            command: s.command.clone(),
            args: s.args.clone(),
            env,
            cpu_milli: s.resources.cpu_milli,
            memory_bytes: s.resources.memory_bytes,
            devices: r.devices.clone(),
            max_runtime_ms: s.max_runtime_ms,
            hang_timeout_ms: s.hang_timeout_ms,
            kill_grace_ms: s.kill_grace(),
            wants_port: j.rec.service.is_some(),
            fence: s.fence,
            checkpoint: None,
            tenant: j.rec.tenant,
            image: s.image.clone(),
            workdir: s.workdir.clone(),
            disk_bytes: s.disk_bytes,
            isolation: s.isolation,
            image_auth: s.image.as_deref().and_then(|i| {
                let r = caravel_core::ImageRef::parse(i).ok()?;
                self.tenants
                    .get(&j.rec.tenant)?
                    .registries
                    .get(&r.registry)
                    .cloned()
            }),
        }
    }

    pub fn apply_event(
        &mut self,
        node: NodeId,
        ev: RunEvent,
        now: Millis,
    ) -> Result<(), CoreError> {
        if let Some(e) = self.nodes.get_mut(&node) {
            // A report is a sign of life as good as a heartbeat.
            e.node.last_seen_ms = e.node.last_seen_ms.max(now);
        }
        let rid = ev.run();
        let active = self.runs.get(&rid).map(|r| r.node == node).unwrap_or(false);
        if !active {
            // A report about a run we already closed (lost node that came back, cancel
            // before start). Its usage is recorded only if nothing was recorded yet.
            if let RunEvent::Exited {
                started_ms: Some(s),
                at_ms,
                ..
            } = ev
            {
                if let Some(r) = self.store.read(move |st| st.run(rid))? {
                    if r.node == node
                        && !self.store.read(move |st| st.has_usage(rid))?
                        && self.jobs.contains_key(&r.job)
                    {
                        let u = self.usage_of(&r, s, at_ms);
                        self.commit(&[Mutation::InsertUsage(u)])?;
                    }
                }
            }
            return Ok(());
        }
        match ev {
            RunEvent::Started {
                pid: _,
                at_ms,
                port,
                checkpoint,
                ..
            } => {
                let r = self.runs.get_mut(&rid).expect("active");
                if r.state != RunState::Assigned {
                    return Ok(());
                }
                r.state = RunState::Running;
                r.started_ms = Some(at_ms);
                r.port = port;
                r.checkpoint = checkpoint;
                let r = r.clone();
                // A running task may be preempted; one that was only assigned may not.
                self.full_needed = true;
                let j = self.jobs.get_mut(&r.job).expect("exists");
                let t = &mut j.tasks[r.index as usize];
                let mut batch = vec![Mutation::PutRun(r.clone())];
                if t.current_run == Some(rid) && t.state == TaskState::Assigned {
                    t.state = TaskState::Running;
                    batch.push(Mutation::PutTask(t.clone()));
                }
                if j.rec.started_ms.is_none() {
                    j.rec.started_ms = Some(at_ms);
                    batch.push(Mutation::PutJob(j.rec.clone()));
                }
                self.commit(&batch)?;
            }
            RunEvent::Exited {
                started_ms,
                at_ms,
                exit_code,
                signal,
                reason,
                message,
                ..
            } => {
                let (stop, on) = (self.runs[&rid].stop, self.runs[&rid].node);
                let state = match reason {
                    ExitReason::MaxRuntime => RunState::TimedOut,
                    // Its node lost the server: the same outcome as the node counted lost
                    // (requeued within the retry budget), reported by the agent itself.
                    ExitReason::Fenced => RunState::Lost,
                    // Stopped by its agent for making no progress: a failure, whatever
                    // the process's own exit (it may exit 0 on SIGTERM).
                    ExitReason::Hung => RunState::Failed,
                    _ if matches!(stop, Some(StopReason::Preempt | StopReason::Shutdown)) => {
                        RunState::Preempted
                    }
                    _ if stop.is_some() => RunState::Killed,
                    ExitReason::SpawnFailed => RunState::Failed,
                    _ if exit_code == Some(0) => RunState::Succeeded,
                    _ => RunState::Failed,
                };
                let msg = if message.is_empty() {
                    match (exit_code, signal) {
                        (Some(c), _) => format!("exit code {c}"),
                        (None, Some(s)) => format!("killed by signal {s}"),
                        _ => reason.as_str().to_string(),
                    }
                } else {
                    message
                };
                let msg = if state == RunState::TimedOut {
                    format!("exceeded max runtime; {msg}")
                } else if state == RunState::Preempted
                    && stop == Some(StopReason::Preempt)
                    && self.runs[&rid].preempted_for.is_none()
                {
                    format!("stopped to grow its elastic gang; {msg}")
                } else if state == RunState::Preempted && stop == Some(StopReason::Shutdown) {
                    let name = self.nodes.get(&on).map(|e| e.node.name.as_str());
                    format!("node {} shut down; {msg}", name.unwrap_or("?"))
                } else {
                    msg
                };
                self.finish_run(rid, state, at_ms, exit_code, signal, msg, started_ms)?;
            }
        }
        Ok(())
    }

    /// Marks nodes that missed heartbeats for `lost_after_ms` as lost and their runs lost,
    /// metered up to the last moment the node was known alive.
    pub fn check_liveness(
        &mut self,
        now: Millis,
        lost_after_ms: i64,
    ) -> Result<Vec<String>, CoreError> {
        let lost: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|e| {
                // A node shut down cleanly is not lost, unless its agent vanished before
                // its runs were all handed back.
                let watched = e.node.state == NodeState::Ready
                    || (e.node.state == NodeState::Down && !e.alloc.runs.is_empty());
                watched && now - e.node.last_seen_ms > lost_after_ms
            })
            .map(|e| e.node.id)
            .collect();
        let mut names = Vec::new();
        for id in lost {
            let e = self.nodes.get_mut(&id).expect("exists");
            e.node.state = NodeState::Lost;
            let n = e.node.clone();
            names.push(n.name.clone());
            tracing::warn!(node = %n.name, "node lost: no heartbeat for {} ms", now - n.last_seen_ms);
            self.commit(&[Mutation::PutNode(n.clone())])?;
            let runs: Vec<RunId> = self.nodes[&id].alloc.runs.iter().copied().collect();
            for r in runs {
                let started = self.runs[&r].started_ms;
                let end = started
                    .map(|s| s.max(n.last_seen_ms))
                    .unwrap_or(n.last_seen_ms);
                self.finish_run(
                    r,
                    RunState::Lost,
                    end,
                    None,
                    None,
                    format!("node {} lost", n.name),
                    None,
                )?;
            }
            self.bump(id);
        }
        Ok(names)
    }
}

/// Why no node, even empty, can hold one task: the first resource that no node has
/// enough of on its own, else that none has them all together.
fn too_large(caps: &[Capacity], r: &TaskResources) -> CoreError {
    use caravel_core::quantity::{format_bytes, format_cpu};
    let refuse = |field: &str, msg: String| CoreError::unschedulable(field, msg);
    let max_cpu = caps.iter().map(|c| c.cpu_milli).max().unwrap_or(0);
    if r.cpu_milli > max_cpu {
        return refuse(
            "resources.cpu_milli",
            format!(
                "a task asks for {} CPUs; the largest node has {}",
                format_cpu(r.cpu_milli),
                format_cpu(max_cpu)
            ),
        );
    }
    let max_mem = caps.iter().map(|c| c.memory_bytes).max().unwrap_or(0);
    if r.memory_bytes > max_mem {
        return refuse(
            "resources.memory_bytes",
            format!(
                "a task asks for {} of memory; the largest node has {}",
                format_bytes(r.memory_bytes),
                format_bytes(max_mem)
            ),
        );
    }
    let mut gpus = String::new();
    if let Some(g) = &r.gpu {
        let need = if g.milli.is_some() { 1 } else { g.count };
        let models = g.models().join("` or `");
        let most = caps
            .iter()
            .flat_map(|c| g.models().into_iter().map(|m| c.gpu_count(m)))
            .max()
            .unwrap_or(0);
        if need > most {
            return refuse(
                "resources.gpu.count",
                format!("a task asks for {need} `{models}` GPUs; the most on one node is {most}"),
            );
        }
        gpus = format!(" and {need} `{models}` GPUs");
    }
    refuse(
        "resources",
        format!(
            "no node has {} CPUs, {} of memory{gpus} together",
            format_cpu(r.cpu_milli),
            format_bytes(r.memory_bytes)
        ),
    )
}

#[cfg(test)]
mod tests;

/// GPU-milliseconds of service a usage record stands for (a quarter GPU counts a quarter).
fn attained_by(u: &UsageRecord) -> u64 {
    (u.end_ms - u.start_ms).max(0) as u64 * u.gpu_milli / 1000
}
