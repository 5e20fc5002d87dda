//! Wire types of the `/v1` HTTP API, shared by the server, the agent and the CLI so that
//! all three agree on one shape.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    Capacity, ErrorCode, JobId, JobSpec, JobState, Millis, NodeId, NodeState, PendingReason,
    Priority, Quota, RunId, RunState, TaskState, TenantId, Topology,
};

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    #[serde(flatten)]
    pub spec: JobSpec,
}

/// `GET /v1/whoami`: who the caller's token makes it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WhoAmI {
    pub role: Role,
    /// The tenant's name, for `role: tenant`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Agent,
    Tenant,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubmitResponse {
    pub id: JobId,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobSummary {
    pub id: JobId,
    pub tenant: String,
    pub name: Option<String>,
    pub state: JobState,
    pub priority: Priority,
    pub tasks: u32,
    pub tasks_running: u32,
    pub tasks_done: u32,
    pub gang: bool,
    pub submitted_ms: Millis,
    pub started_ms: Option<Millis>,
    pub finished_ms: Option<Millis>,
    pub message: String,
    #[serde(default)]
    pub pending_reasons: Vec<PendingReason>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskView {
    pub index: u32,
    pub state: TaskState,
    pub attempts: u32,
    pub retries_used: u32,
    pub exit_code: Option<i32>,
    pub run: Option<RunId>,
    pub node: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunView {
    pub id: RunId,
    pub index: u32,
    pub attempt: u32,
    pub node: String,
    pub devices: Vec<u32>,
    pub state: RunState,
    pub assigned_ms: Millis,
    pub started_ms: Option<Millis>,
    pub ended_ms: Option<Millis>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub message: String,
    /// The checkpoint it started from (a task's version, a gang's cut; 0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobDetail {
    #[serde(flatten)]
    pub summary: JobSummary,
    pub spec: JobSpec,
    pub task_list: Vec<TaskView>,
    pub runs: Vec<RunView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeView {
    pub id: NodeId,
    pub name: String,
    pub state: NodeState,
    pub address: String,
    pub topology: Topology,
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    pub allocated_cpu_milli: u64,
    pub allocated_memory_bytes: u64,
    pub allocated_devices: Vec<u32>,
    /// Devices shared by fractional requests: index -> thousandths in use.
    #[serde(default)]
    pub shared_devices: BTreeMap<u32, u32>,
    pub running_tasks: u32,
    pub last_seen_ms: Millis,
    #[serde(default)]
    pub drained: bool,
    /// What keeps the node's isolation (`capacity.isolation`) below `restricted`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub isolation_missing: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenantRequest {
    pub name: String,
    #[serde(default = "default_weight")]
    pub weight: f64,
    #[serde(default)]
    pub quota: Quota,
    #[serde(default)]
    pub guarantee: Quota,
}

fn default_weight() -> f64 {
    1.0
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TenantView {
    pub id: TenantId,
    pub name: String,
    pub weight: f64,
    pub quota: Quota,
    pub guarantee: Quota,
    /// Bytes of checkpoints and task output the server keeps for the tenant now (counted
    /// every few seconds), against `quota.storage_bytes`.
    #[serde(default)]
    pub storage_used_bytes: u64,
    pub created_ms: Millis,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateTenantResponse {
    #[serde(flatten)]
    pub tenant: TenantView,
    /// Shown once; the server keeps only its hash.
    pub token: String,
}

/// Usage totals for one tenant or one job. Products are u128: a day of a 64 GiB task is
/// already past i64 byte-milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageTotals {
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobId>,
    pub runs: u64,
    pub wall_ms: u64,
    pub cpu_milli_ms: u128,
    pub memory_byte_ms: u128,
    #[serde(default)]
    pub gpu_ms: BTreeMap<String, u128>,
    /// Wall milliseconds of runs per priority class (spot is billed cheaper).
    #[serde(default)]
    pub wall_ms_by_priority: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageResponse {
    pub by_tenant: Vec<UsageTotals>,
    pub by_job: Vec<UsageTotals>,
}

// ---- agent protocol ----

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub name: String,
    pub address: String,
    pub agent_url: String,
    pub agent_secret: String,
    /// SHA-256 (hex) of the certificate an `https` agent endpoint serves: the server
    /// accepts that certificate and no other when it calls the agent.
    #[serde(default)]
    pub agent_cert_sha256: Option<String>,
    pub instance: String,
    #[serde(default)]
    pub topology: Topology,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    /// Runs this agent is running right now (non-empty when it re-registers).
    #[serde(default)]
    pub running: Vec<RunId>,
    /// What keeps the node's isolation (`capacity.isolation`) below `restricted`.
    #[serde(default)]
    pub isolation_missing: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegisterResponse {
    pub node_id: NodeId,
    pub heartbeat_ms: u64,
    /// After this long without hearing from the node the server counts it lost and
    /// restarts its runs elsewhere; the agent fences (`Assignment::fence`) runs before then.
    /// 0 from a server that does not say.
    #[serde(default)]
    pub lost_after_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    pub node_id: NodeId,
    pub instance: String,
    pub running: Vec<RunId>,
    /// The desired-state version the agent last acted on.
    pub known_version: u64,
    /// How long the server may hold the request when nothing changed.
    pub wait_ms: u64,
    /// Answers to `SyncResponse::confirm`: these gang runs' checkpoint folders still hold
    /// exactly the version named, checked after the question arrived.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub still: Vec<CheckpointStill>,
    /// Ports of the agent's `--master-ports` it found free just now: a gang whose rank 0
    /// is placed here gets one as MASTER_PORT.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub free_ports: Vec<u16>,
}

/// A question of the server's gang checkpoint protocol (docs/checkpoints.md): does run
/// `run`'s folder still hold what it last saved or restored? Asked in round `round`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckpointConfirm {
    pub run: RunId,
    pub round: u64,
}

/// Yes to a `CheckpointConfirm`: the folder holds version `version` of the task's own
/// part (0: nothing of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckpointStill {
    pub run: RunId,
    pub round: u64,
    pub version: u64,
}

/// The consistent cut of a gang's checkpoint that a run restores: every rank's part,
/// each unpacked into every rank's folder (docs/checkpoints.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GangCut {
    /// 1, 2, ... one more with each cut the server commits; 0 before the first.
    pub cut: u64,
    pub parts: Vec<CutPart>,
}

/// One rank's part of a `GangCut`: `GET /v1/jobs/{id}/tasks/{task}/checkpoint?version=V`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CutPart {
    pub task: u32,
    pub version: u64,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SyncResponse {
    pub version: u64,
    /// Every run that should be running on this node. Anything else the agent runs is stale
    /// and must be killed.
    pub desired: Vec<RunId>,
    /// Full specs of the desired runs the agent did not list as running: the others it
    /// already has, and re-sending them would make every sync as large as the node's load.
    pub assignments: Vec<Assignment>,
    /// Gang runs here whose checkpoint folder the server wants confirmed unchanged before
    /// it commits a cut of their gang's checkpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub confirm: Vec<CheckpointConfirm>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Assignment {
    pub run: RunId,
    pub job: JobId,
    pub index: u32,
    pub command: String,
    pub args: Vec<String>,
    /// The full environment Caravel adds (user env plus CARAVEL_*, CUDA_VISIBLE_DEVICES and
    /// the torchrun variables for gangs).
    pub env: BTreeMap<String, String>,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    pub devices: Vec<u32>,
    pub max_runtime_ms: Option<u64>,
    pub kill_grace_ms: u64,
    /// `JobSpec::hang_timeout_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hang_timeout_ms: Option<u64>,
    /// A service replica: the agent picks a free port, passes it as `PORT` and reports it.
    #[serde(default)]
    pub wants_port: bool,
    /// Kill this run (SIGKILL) when the agent has not reached the server for nearly the
    /// lost timeout (`JobSpec::fence`).
    #[serde(default)]
    pub fence: bool,
    /// The version of the task's checkpoint that the server holds, when it holds one: the
    /// agent fetches it into `CARAVEL_CHECKPOINT_DIR` before the task starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<u64>,
    /// Set for a gang of more than one task: its checkpoint is the gang's, every rank
    /// restores the whole cut, and the agent answers the server's confirmations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang_cut: Option<GangCut>,
    /// The job's tenant: the agent runs the task as this tenant's uid.
    #[serde(default = "no_tenant")]
    pub tenant: TenantId,
    /// `JobSpec::image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `JobSpec::workdir`: fetched from the server and unpacked as the task's working
    /// directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// `JobSpec::disk_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// `JobSpec::isolation`: the agent refuses to start the task with less.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<crate::IsolationLevel>,
    /// The tenant's credentials for `image`'s registry, when it stored some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_auth: Option<crate::RegistryCredential>,
}

/// A tenant id no tenant has: what an assignment from an older server carries.
fn no_tenant() -> TenantId {
    TenantId(0)
}

/// `PUT /v1/registries/{host}`: a tenant's credentials for one registry.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryLogin {
    pub username: String,
    pub password: String,
}

/// What `GET /v1/registries` shows of a stored credential: never the password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegistryView {
    pub registry: String,
    pub username: String,
}

/// A working directory a tenant uploaded (`PUT /v1/workdirs/{digest}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkdirView {
    /// `sha256:<hex>` of the tar archive.
    pub digest: String,
    pub bytes: u64,
}

/// A task's newest checkpoint (`GET /v1/jobs/{id}/checkpoints`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckpointView {
    pub task: u32,
    /// 1 for the task's first checkpoint, one more with each save.
    pub version: u64,
    /// The run (attempt) that saved it.
    pub run: RunId,
    pub bytes: u64,
    pub saved_ms: Millis,
    /// Of the tar archive as served by `GET /v1/jobs/{id}/tasks/{index}/checkpoint`.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RunEvent {
    Started {
        run: RunId,
        pid: u32,
        at_ms: Millis,
        /// The port the agent chose for a service replica.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        /// The checkpoint restored before the start (`CARAVEL_CHECKPOINT_VERSION`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        checkpoint: Option<u64>,
    },
    Exited {
        run: RunId,
        started_ms: Option<Millis>,
        at_ms: Millis,
        exit_code: Option<i32>,
        signal: Option<i32>,
        reason: ExitReason,
        message: String,
        /// The version of the task's own checkpoint part that its folder held at the end,
        /// every change saved (0: nothing of its own); `None` when the last state could
        /// not all be saved.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        checkpoint: Option<u64>,
    },
}

/// How a run ended, as its agent saw it (`RunEvent::Exited::reason`); the server turns it
/// into the run's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// The process ended by itself.
    Exited,
    /// Stopped at the job's `max_runtime_ms`.
    MaxRuntime,
    /// Stopped because the server asked (cancel, preemption, a stale copy).
    Killed,
    /// Never started: its directory, image, sandbox or process could not be made.
    SpawnFailed,
    /// Killed by its agent (or the fence watchdog): cut off from the server for nearly
    /// the lost timeout, so that no second copy runs.
    Fenced,
    /// Stopped for writing more than its ephemeral disk.
    DiskExceeded,
    /// Stopped for making no progress for `hang_timeout_ms`.
    Hung,
    /// A reason this server does not know (a newer agent's): treated by the exit code.
    #[serde(other)]
    Other,
}

impl ExitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Exited => "exited",
            ExitReason::MaxRuntime => "max_runtime",
            ExitReason::Killed => "killed",
            ExitReason::SpawnFailed => "spawn_failed",
            ExitReason::Fenced => "fenced",
            ExitReason::DiskExceeded => "disk_exceeded",
            ExitReason::Hung => "hung",
            ExitReason::Other => "other",
        }
    }
}

impl RunEvent {
    pub fn run(&self) -> RunId {
        match self {
            RunEvent::Started { run, .. } | RunEvent::Exited { run, .. } => *run,
        }
    }
}

/// `POST /v1/agent/shutdown`: the agent is stopping cleanly; stop and requeue its runs.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    pub node_id: NodeId,
    pub instance: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShutdownResponse {
    /// Runs told to stop; each is reported back as it exits.
    pub stopping: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventsRequest {
    pub node_id: NodeId,
    pub events: Vec<RunEvent>,
}

/// Output an agent ships to the control plane: each entry is bytes of one run's stdout
/// or stderr from `offset` on (`POST /v1/agent/logs`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogShipRequest {
    pub entries: Vec<LogShip>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogShip {
    pub job: JobId,
    /// The run's task (lets the server check the run without a store read while it is
    /// the task's newest).
    pub index: u32,
    pub run: RunId,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// Where `data` starts in the stream.
    pub offset: u64,
    /// The bytes, base64 (standard alphabet, padded).
    #[serde(default)]
    pub data: String,
    /// The sender leaves out the bytes before `offset` on purpose (they would be dropped
    /// by the server's limit anyway); without it an offset past the server's end is a gap.
    #[serde(default)]
    pub skip: bool,
    /// The stream is complete with this entry: the run has ended.
    #[serde(default)]
    pub done: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LogShipResponse {
    /// The most bytes the server keeps per stream of a run.
    pub limit: u64,
    /// One per entry, in order.
    pub results: Vec<LogShipResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LogShipResult {
    /// `ok`; `gap`: the server has only `end` bytes, resend from there; `unknown`: no such
    /// run of that job (or it is no longer kept): stop shipping it; `full`: the tenant's
    /// storage quota is used up, and the output stays on the node.
    pub state: String,
    /// The length the server holds of the stream.
    pub end: u64,
    pub done: bool,
}

/// A service as `caravel services` / `service show` see it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServiceView {
    pub tenant: String,
    pub name: String,
    pub version: u64,
    /// Path on the gateway: `/s/{tenant}/{name}/`.
    pub path: String,
    /// Host name on the gateway (`SERVICE[--TENANT].DOMAIN`), when the server has a
    /// gateway domain and the names fit one DNS label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub public: bool,
    /// Replicas the autoscaler wants now.
    pub wanted: u32,
    pub ready: u32,
    /// Requests in flight at the gateway (proxied plus held).
    pub in_flight: u64,
    pub replicas: Vec<ReplicaView>,
    pub spec: crate::ServiceSpec,
    pub created_ms: Millis,
    pub updated_ms: Millis,
    /// On deploy: whether the spec changed (a new version rolls out).
    #[serde(default)]
    pub changed: bool,
    /// The rolling update in progress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutView>,
    /// What happened lately (rollouts, scaling, crashes), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<ServiceEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutView {
    pub version: u64,
    /// `progressing` or `stuck`.
    pub state: String,
    pub started_ms: Millis,
    /// When it last moved (a new replica ready, an old one gone).
    pub progress_ms: Millis,
    /// Why it is stuck, and what it does about it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServiceEvent {
    pub at_ms: Millis,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaView {
    pub job: JobId,
    pub version: u64,
    /// `pending` (not placed or not started), `starting` (not yet ready), `ready`,
    /// `draining`.
    pub state: String,
    pub node: Option<String>,
    pub addr: Option<String>,
    pub zone: String,
    pub in_flight: u64,
}

#[cfg(test)]
mod exit_reason_tests {
    use super::*;

    #[test]
    fn exit_reasons_keep_their_wire_names_and_a_newer_agents_reason_is_not_an_error() {
        for (r, w) in [
            (ExitReason::Exited, "exited"),
            (ExitReason::MaxRuntime, "max_runtime"),
            (ExitReason::Killed, "killed"),
            (ExitReason::SpawnFailed, "spawn_failed"),
            (ExitReason::Fenced, "fenced"),
            (ExitReason::DiskExceeded, "disk_exceeded"),
            (ExitReason::Hung, "hung"),
        ] {
            assert_eq!(serde_json::to_value(r).unwrap(), w);
            assert_eq!(r.as_str(), w);
            assert_eq!(serde_json::from_value::<ExitReason>(w.into()).unwrap(), r);
        }
        let r: ExitReason = serde_json::from_value("evicted_by_gremlins".into()).unwrap();
        assert_eq!(r, ExitReason::Other);
    }
}
