//! Jobs, tasks and runs.
//!
//! A job is N tasks sharing one spec. Each attempt to run a task is a *run* with its own
//! id: a retried or rescheduled task gets a new run, so "which copy is this?" always has an
//! answer, and usage is metered per run exactly once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::resources::TaskResources;
use crate::{JobId, Millis, NodeId, RunId, TenantId, ValidationError};

pub const MAX_TASKS: u32 = 100_000;
pub const MAX_RETRIES: u32 = 100;
pub const MAX_RUNTIME_MS: u64 = 365 * 86_400_000;
pub const DEFAULT_KILL_GRACE_MS: u64 = 30_000;

#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Inference services.
    Online,
    #[default]
    Batch,
    /// Runs only on idle capacity.
    Spot,
}

impl Priority {
    /// Lower sorts first.
    pub fn rank(self) -> u8 {
        match self {
            Priority::Online => 0,
            Priority::Batch => 1,
            Priority::Spot => 2,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Online => "online",
            Priority::Batch => "batch",
            Priority::Spot => "spot",
        }
    }
}

/// The topology domain a gang must fit inside.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TopologyLevel {
    /// Every member on one node.
    Node,
    /// Every member in one rack.
    Rack,
    /// Every member in one zone.
    Zone,
}

impl TopologyLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            TopologyLevel::Node => "node",
            TopologyLevel::Rack => "rack",
            TopologyLevel::Zone => "zone",
        }
    }
}

/// What a user submits. The JSON API takes exactly this shape; unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Number of tasks (an elastic gang: the most it grows to).
    #[serde(default = "one")]
    pub tasks: u32,
    /// An elastic gang (`tasks = "MIN:MAX"`): it starts once `min_tasks` fit, grows towards
    /// `tasks` when room appears and shrinks instead of waiting, never below this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_tasks: Option<u32>,
    /// What runs. With an `image`, it may be left out (empty): the image's entrypoint and
    /// command then run, `args` replacing the command when given.
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: TaskResources,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_runtime_ms: Option<u64>,
    /// A run that makes no progress (no CPU time, output, checkpoint change or heartbeat)
    /// for this long is counted hung, stopped, and (a gang: the whole gang) retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hang_timeout_ms: Option<u64>,
    #[serde(default)]
    pub max_retries: u32,
    /// All tasks start together or none do.
    #[serde(default)]
    pub gang: bool,
    /// For gangs: pack every member into one node, rack or zone (the smallest that fits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<TopologyLevel>,
    /// Time between SIGTERM and SIGKILL when a task is cancelled, preempted or times out
    /// (default 30 s): the time a task has to checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_grace_ms: Option<u64>,
    /// A running task is not preempted before it has run this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_runtime_ms: Option<u64>,
    /// At most one copy of a task runs, even across a network partition: an agent cut off
    /// from the server kills this job's tasks (SIGKILL) before the server can count the
    /// node lost and start them elsewhere. For work that must not run twice at once (a
    /// trainer writing one checkpoint directory); costs the tasks on a node that only
    /// lost the server for longer than the lost timeout.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fence: bool,
    /// Run the task in this OCI image's root filesystem (`[REGISTRY/]REPO[:TAG][@DIGEST]`)
    /// instead of the node's own system directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The task's working directory: an archive `caravel submit --workdir` uploaded
    /// (`sha256:<hex>`); every task starts in a fresh copy of it on whatever node runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Environment variables whose values no view, listing or log shows after submission:
    /// only the job's own tasks read them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_env: BTreeMap<String, String>,
    /// The least isolation the job's tasks accept: they wait (with a reason) rather than
    /// run on a node that gives less.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<crate::IsolationLevel>,
    /// Ephemeral disk per task (its working directory, temp space, checkpoint folder,
    /// output and image layer changes): a task that writes more is stopped. Default: the
    /// node's `--task-disk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
}

/// What views show in place of a secret value.
pub const REDACTED: &str = "(secret)";

fn one() -> u32 {
    1
}

/// Checks environment variable names and values (`env`, `secret_env`).
pub fn validate_env(field: &str, env: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    for (k, v) in env {
        let ok = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(ValidationError::new(
                format!("{field}.{k}"),
                "is not a valid variable name (letters, digits and '_', not starting with a digit)",
            ));
        }
        if k.starts_with("CARAVEL_") {
            return Err(ValidationError::new(
                format!("{field}.{k}"),
                "CARAVEL_ variables are set by Caravel",
            ));
        }
        if v.contains('\0') {
            return Err(ValidationError::new(
                format!("{field}.{k}"),
                "must not contain NUL bytes",
            ));
        }
    }
    Ok(())
}

impl JobSpec {
    pub fn simple(command: &str, args: &[&str]) -> JobSpec {
        JobSpec {
            name: None,
            tasks: 1,
            command: command.to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            resources: TaskResources::default(),
            priority: Priority::Batch,
            min_tasks: None,
            max_runtime_ms: None,
            hang_timeout_ms: None,
            max_retries: 0,
            gang: false,
            topology: None,
            kill_grace_ms: None,
            min_runtime_ms: None,
            fence: false,
            image: None,
            workdir: None,
            secret_env: BTreeMap::new(),
            isolation: None,
            disk_bytes: None,
        }
    }

    /// What the job's tasks need of a node besides room (`TaskResources::needs`).
    pub fn needs(&self) -> crate::NodeNeeds {
        crate::NodeNeeds {
            isolation: self.isolation.unwrap_or_default(),
            image: self.image.is_some(),
        }
    }

    /// Fills in what the server derives from the rest of the spec (`resources.needs`): done
    /// to every spec that enters the server, so two equal submissions compare equal.
    pub fn normalize(&mut self) {
        self.resources.needs = self.needs();
    }

    /// The spec as views show it: secret values replaced.
    pub fn redacted(&self) -> JobSpec {
        let mut s = self.clone();
        for v in s.secret_env.values_mut() {
            *v = REDACTED.to_string();
        }
        s
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        if let Some(n) = &self.name {
            crate::tenant::validate_name("name", n)?;
        }
        if self.tasks == 0 || self.tasks > MAX_TASKS {
            return Err(ValidationError::new(
                "tasks",
                format!("must be 1 to {MAX_TASKS}"),
            ));
        }
        // In an image, no command means the image's own (its entrypoint, and its command
        // unless `args` replace it), as Kubernetes reads a container's.
        if self.command.trim().is_empty() && (self.image.is_none() || !self.command.is_empty()) {
            return Err(ValidationError::new(
                "command",
                "must not be empty (it may be left out only with an image)",
            ));
        }
        if self.command.contains('\0') || self.args.iter().any(|a| a.contains('\0')) {
            return Err(ValidationError::new(
                "command",
                "must not contain NUL bytes",
            ));
        }
        validate_env("env", &self.env)?;
        validate_env("secret_env", &self.secret_env)?;
        if let Some(k) = self.secret_env.keys().find(|k| self.env.contains_key(*k)) {
            return Err(ValidationError::new(
                format!("secret_env.{k}"),
                "is also in env: give each variable once",
            ));
        }
        if let Some(i) = &self.image {
            crate::ImageRef::parse(i).map_err(|e| ValidationError::new("image", e))?;
        }
        if let Some(w) = &self.workdir {
            crate::validate_digest("workdir", w)?;
        }
        if let Some(d) = self.disk_bytes {
            if !(crate::MIN_DISK_BYTES..=crate::MAX_DISK_BYTES).contains(&d) {
                return Err(ValidationError::new("disk_bytes", "must be 1 MiB to 1 PiB"));
            }
        }
        self.resources.validate("resources")?;
        if let Some(ms) = self.max_runtime_ms {
            if ms == 0 || ms > MAX_RUNTIME_MS {
                return Err(ValidationError::new(
                    "max_runtime_ms",
                    "must be 1 ms to 365 days",
                ));
            }
        }
        if let Some(ms) = self.hang_timeout_ms {
            if !(1_000..=MAX_RUNTIME_MS).contains(&ms) {
                return Err(ValidationError::new(
                    "hang_timeout_ms",
                    "must be 1 s to 365 days (progress is looked at about every fifth of it)",
                ));
            }
        }
        if let Some(min) = self.min_tasks {
            if !self.gang {
                return Err(ValidationError::new(
                    "min_tasks",
                    "only gang jobs are elastic (MIN:MAX tasks); other jobs' tasks start one by one anyway",
                ));
            }
            if min == 0 || min > self.tasks {
                return Err(ValidationError::new(
                    "min_tasks",
                    format!("must be 1 to tasks ({})", self.tasks),
                ));
            }
        }
        if self.max_retries > MAX_RETRIES {
            return Err(ValidationError::new(
                "max_retries",
                format!("must be at most {MAX_RETRIES}"),
            ));
        }
        if self.gang
            && self
                .resources
                .gpu
                .as_ref()
                .is_some_and(|g| !g.any_of.is_empty())
        {
            return Err(ValidationError::new(
                "resources.gpu.any_of",
                "a gang runs on one GPU model: name exactly one",
            ));
        }
        if self.topology.is_some() && !self.gang {
            return Err(ValidationError::new(
                "topology",
                "only gang jobs may ask for a topology domain",
            ));
        }
        if self.min_runtime_ms.is_some_and(|m| m > MAX_RUNTIME_MS) {
            return Err(ValidationError::new(
                "min_runtime_ms",
                "must be at most 365 days",
            ));
        }
        // Protection from preemption past the point the task is killed anyway is a typo
        // for one of the two (Slurm refuses --time-min above --time the same way).
        if let (Some(min), Some(max)) = (self.min_runtime_ms, self.max_runtime_ms) {
            if min > max {
                return Err(ValidationError::new(
                    "min_runtime_ms",
                    format!("must not exceed max_runtime_ms ({min} > {max})"),
                ));
            }
        }
        if let Some(g) = self.kill_grace_ms {
            if g > 3_600_000 {
                return Err(ValidationError::new(
                    "kill_grace_ms",
                    "must be at most one hour",
                ));
            }
        }
        Ok(())
    }

    pub fn kill_grace(&self) -> u64 {
        self.kill_grace_ms.unwrap_or(DEFAULT_KILL_GRACE_MS)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Pending,
    /// Placed on a node; the agent has not reported the process started yet.
    Assigned,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// A task of an elastic gang that the gang's current attempt does not use (it runs
    /// with fewer ranks); pending again when the gang restarts.
    Skipped,
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled | TaskState::Skipped
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Assigned => "assigned",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Assigned,
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited non-zero, was killed by a signal it did not ask for, or failed to start.
    Failed,
    /// Stopped by Caravel: cancel, or a gang member failed.
    Killed,
    /// Ran past max runtime.
    TimedOut,
    /// Its node stopped heartbeating.
    Lost,
    /// Stopped to make room for work entitled to the space, or because its node shut down
    /// cleanly; requeued without using a retry.
    Preempted,
}

impl RunState {
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunState::Assigned | RunState::Running)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Assigned => "assigned",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Killed => "killed",
            RunState::TimedOut => "timed_out",
            RunState::Lost => "lost",
            RunState::Preempted => "preempted",
        }
    }
}

/// Why Caravel asked a run to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Cancel,
    GangAbort,
    Preempt,
    /// Its node is shutting down cleanly: the run ends preempted and is requeued.
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobRecord {
    pub id: JobId,
    pub tenant: TenantId,
    pub spec: JobSpec,
    pub state: JobState,
    /// Submission order within the server; FIFO tie-break.
    pub seq: u64,
    pub submitted_ms: Millis,
    pub started_ms: Option<Millis>,
    pub finished_ms: Option<Millis>,
    /// Human summary of why the job ended the way it did.
    pub message: String,
    /// Set when a gang member failed or was lost: the other members are being stopped.
    pub gang_abort: Option<String>,
    /// The gang abort was caused by preemption: the restart uses no retry.
    #[serde(default)]
    pub gang_abort_free: bool,
    pub cancel_requested: bool,
    /// Set on the jobs that run a service's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<crate::ReplicaOf>,
    /// The submitter's `Idempotency-Key`: the same key from the same tenant names this
    /// job again instead of making another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskRecord {
    pub job: JobId,
    pub index: u32,
    pub state: TaskState,
    /// Runs so far (attempt numbers start at 1).
    pub attempts: u32,
    pub retries_used: u32,
    pub current_run: Option<RunId>,
    pub exit_code: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunRecord {
    pub id: RunId,
    pub job: JobId,
    pub tenant: TenantId,
    pub index: u32,
    pub attempt: u32,
    pub node: NodeId,
    pub devices: Vec<u32>,
    pub gpu_model: Option<String>,
    pub local_rank: u32,
    pub local_world_size: u32,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
    /// The port the agent gave a service replica (its `PORT`), once it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Placed while its tenant was beyond its guarantee: may be preempted to reclaim it.
    #[serde(default)]
    pub borrowed: bool,
    pub state: RunState,
    pub stop: Option<StopReason>,
    /// With `stop` = preempt: the job it makes room for, so a restarted server still knows
    /// the job waits for this run to exit (and does not preempt again for the same room).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preempted_for: Option<JobId>,
    pub assigned_ms: Millis,
    pub started_ms: Option<Millis>,
    pub ended_ms: Option<Millis>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub message: String,
    /// The checkpoint the run started from (`CARAVEL_CHECKPOINT_VERSION`: a task's
    /// version, a gang's cut), as its agent reported; `None` until it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<u64>,
    /// A gang member: how many ranks its attempt has (`WORLD_SIZE`; an elastic gang's
    /// may be fewer than its tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<u32>,
}

/// One metering record: a run held these resources from `start_ms` to `end_ms`.
/// Keyed by run id, so it is written exactly once whatever is retried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageRecord {
    pub run: RunId,
    pub tenant: TenantId,
    pub job: JobId,
    pub index: u32,
    pub node: NodeId,
    pub start_ms: Millis,
    pub end_ms: Millis,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub gpu_model: Option<String>,
    pub gpu_count: u32,
    /// Thousandths of a device held: 250 for a quarter GPU, 2000 for two GPUs.
    #[serde(default)]
    pub gpu_milli: u64,
    /// The job's priority class, so spot can be billed cheaper.
    #[serde(default)]
    pub priority: Priority,
}

impl UsageRecord {
    pub fn duration_ms(&self) -> u64 {
        (self.end_ms - self.start_ms).max(0) as u64
    }
    pub fn cpu_milli_ms(&self) -> u128 {
        self.cpu_milli as u128 * self.duration_ms() as u128
    }
    pub fn memory_byte_ms(&self) -> u128 {
        self.memory_bytes as u128 * self.duration_ms() as u128
    }
    /// Device-milliseconds: a quarter GPU for 4 s is 1,000 GPU-ms.
    pub fn gpu_ms(&self) -> u128 {
        let milli = if self.gpu_milli > 0 {
            self.gpu_milli
        } else {
            self.gpu_count as u64 * 1000
        };
        milli as u128 * self.duration_ms() as u128 / 1000
    }
}

/// A machine-readable reason a job is pending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PendingReason {
    pub code: ReasonCode,
    pub message: String,
    /// Per-reason counts, e.g. {"lack gpu/H100": 12, "lack memory": 3}.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counts: BTreeMap<String, u64>,
    /// A no-fit reason whose per-node counts the scheduler has yet to add (it scans the
    /// nodes once per request shape, for the jobs still pending at the end of a cycle).
    /// Never on the wire.
    #[serde(skip)]
    pub unexplained: bool,
}

impl PendingReason {
    pub fn new(code: ReasonCode, message: impl Into<String>) -> PendingReason {
        PendingReason {
            code,
            message: message.into(),
            counts: BTreeMap::new(),
            unexplained: false,
        }
    }

    pub fn with_counts(mut self, counts: BTreeMap<String, u64>) -> PendingReason {
        self.counts = counts;
        self
    }
}

/// Why a job waits, as the API and the CLI name it (`PendingReason::code`; the table of
/// codes with examples is in docs/jobs.md). Text is made from it only at the edge.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ReasonCode {
    /// The tenant's quota does not allow the job now.
    Quota,
    /// No node has room for a task (counts per lack).
    NoFit,
    /// Not all of a gang's tasks fit together.
    Gang,
    /// A gang does not fit inside one node, rack or zone as it asks.
    Topology,
    /// The job holds a reservation: the earliest time it can start, and where.
    Reserved,
    /// Room exists, but it is held for a reserved job this one would delay.
    Backfill,
    /// Other tenants are further below their fair share.
    FairShare,
    /// Victims are being stopped to make room.
    Preempting,
    /// Room could be made only by preempting work this job may not preempt.
    NoPreemption,
    /// No node is registered.
    NoNodes,
    /// Simulator-only share-pacing experiment: a GPU share turned away.
    Paced,
    /// The only nodes that could hold it are draining.
    Draining,
    /// Behind earlier jobs of the same shape that cannot start yet.
    Queued,
}

impl ReasonCode {
    pub const ALL: [ReasonCode; 13] = [
        ReasonCode::Quota,
        ReasonCode::NoFit,
        ReasonCode::Gang,
        ReasonCode::Topology,
        ReasonCode::Reserved,
        ReasonCode::Backfill,
        ReasonCode::FairShare,
        ReasonCode::Preempting,
        ReasonCode::NoPreemption,
        ReasonCode::NoNodes,
        ReasonCode::Paced,
        ReasonCode::Draining,
        ReasonCode::Queued,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::Quota => "quota",
            ReasonCode::NoFit => "no_fit",
            ReasonCode::Gang => "gang",
            ReasonCode::Topology => "topology",
            ReasonCode::Reserved => "reserved",
            ReasonCode::Backfill => "backfill",
            ReasonCode::FairShare => "fair_share",
            ReasonCode::Preempting => "preempting",
            ReasonCode::NoPreemption => "no_preemption",
            ReasonCode::NoNodes => "no_nodes",
            ReasonCode::Paced => "paced",
            ReasonCode::Draining => "draining",
            ReasonCode::Queued => "queued",
        }
    }

    /// The waits that are about room: nothing (or not enough together) fits.
    pub fn is_about_room(self) -> bool {
        matches!(
            self,
            ReasonCode::NoFit | ReasonCode::Gang | ReasonCode::Quota | ReasonCode::Topology
        )
    }
}

impl std::fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Tests and tools compare codes with their wire names.
impl PartialEq<&str> for ReasonCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for ReasonCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_codes_are_their_wire_names() {
        for c in ReasonCode::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
            let back: ReasonCode = serde_json::from_value(c.as_str().into()).unwrap();
            assert_eq!(back, c);
        }
        let r: PendingReason = serde_json::from_str(r#"{"code":"no_fit","message":"m"}"#).unwrap();
        assert_eq!(r, PendingReason::new(ReasonCode::NoFit, "m"));
        assert!(serde_json::from_str::<ReasonCode>(r#""nope""#).is_err());
    }

    #[test]
    fn elastic_gangs_and_hang_timeouts_are_checked() {
        let mut s = JobSpec::simple("train", &[]);
        s.tasks = 4;
        s.min_tasks = Some(2);
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "min_tasks", "only gangs are elastic");
        s.gang = true;
        s.validate().unwrap();
        for bad in [0, 5] {
            s.min_tasks = Some(bad);
            assert_eq!(s.validate().unwrap_err().field, "min_tasks", "{bad}");
        }
        s.min_tasks = Some(4);
        s.validate().unwrap();
        s.hang_timeout_ms = Some(999);
        assert_eq!(s.validate().unwrap_err().field, "hang_timeout_ms");
        s.hang_timeout_ms = Some(600_000);
        s.validate().unwrap();
    }

    #[test]
    fn spec_validation_names_fields() {
        let mut s = JobSpec::simple("echo", &["hi"]);
        assert!(s.validate().is_ok());
        s.command = " ".into();
        assert_eq!(s.validate().unwrap_err().field, "command");
        let mut s = JobSpec::simple("echo", &[]);
        s.tasks = 0;
        assert_eq!(s.validate().unwrap_err().field, "tasks");
        let mut s = JobSpec::simple("echo", &[]);
        s.env.insert("1BAD".into(), "x".into());
        assert_eq!(s.validate().unwrap_err().field, "env.1BAD");
        let mut s = JobSpec::simple("echo", &[]);
        s.env.insert("CARAVEL_JOB_ID".into(), "x".into());
        assert!(s.validate().is_err());
        let mut s = JobSpec::simple("echo", &[]);
        s.max_runtime_ms = Some(0);
        assert_eq!(s.validate().unwrap_err().field, "max_runtime_ms");
        let mut s = JobSpec::simple("echo", &[]);
        s.max_runtime_ms = Some(5_000);
        s.min_runtime_ms = Some(10_000);
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "min_runtime_ms");
        assert!(
            e.to_string().contains("must not exceed max_runtime_ms"),
            "{e}"
        );
        s.min_runtime_ms = Some(5_000);
        assert!(s.validate().is_ok(), "equal is fine");
    }

    #[test]
    fn unknown_fields_rejected() {
        let e = serde_json::from_str::<JobSpec>(r#"{"command":"x","gpus":3}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `gpus`"), "{e}");
        let e = serde_json::from_str::<JobSpec>(r#"{"command":"x","resources":{"cpu_milli":-1}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("invalid value"), "{e}");
    }

    #[test]
    fn usage_products_do_not_overflow() {
        let u = UsageRecord {
            run: RunId(1),
            tenant: TenantId(1),
            job: JobId(1),
            index: 0,
            node: NodeId(1),
            start_ms: 0,
            end_ms: 365 * 86_400_000,
            cpu_milli: 1_000_000,
            memory_bytes: 1 << 50,
            gpu_model: None,
            gpu_count: 0,
            gpu_milli: 0,
            priority: Priority::Spot,
        };
        assert_eq!(u.memory_byte_ms(), (1u128 << 50) * 365 * 86_400_000);
    }
}
