//! Durable state for the control plane behind one `Store` trait.
//!
//! The server keeps its working state in memory and writes every change through
//! `Store::apply` as one atomic batch of mutations ("plan optimistically, commit once"):
//! a batch either lands whole or not at all, so a crash never leaves a job half-created or
//! a run finished without its usage record. At start the server rebuilds memory from
//! `Store::load`.
//!
//! Backends: SQLite in WAL mode (the embedded default) and PostgreSQL (`pg`). Every backend
//! passes the same `conformance` suite.
//!
//! This crate must not depend on the server or the scheduler, and its API is blocking: the
//! PostgreSQL client's own runtime stays on a thread of its own (see `pg`).

pub mod conformance;
mod pg;
mod sqlite;

use caravel_core::{
    JobId, JobRecord, Node, RunId, RunRecord, ServiceRecord, TaskRecord, Tenant, TenantId,
    UsageRecord,
};

pub use pg::PgStore;
pub use sqlite::{SqliteStore, Sync};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(String),
    /// The database cannot be reached (PostgreSQL: the connection is gone, the server is
    /// shutting down). Worth a retry; a write whose connection failed during COMMIT may
    /// have landed (reload to find out).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("constraint violated: {0}")]
    Constraint(String),
    #[error("corrupt record in {table}: {reason}")]
    Corrupt { table: &'static str, reason: String },
    /// Another server owns the store (PostgreSQL; SQLite's owner holds the data directory).
    #[error("{0}")]
    Owned(String),
    #[error("schema version {found} is newer than this binary understands ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Every backend stores a record as its JSON body next to the key columns.
fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records always serialise")
}

fn from_json<T: serde::de::DeserializeOwned>(table: &'static str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt {
        table,
        reason: e.to_string(),
    })
}

/// One change. Puts are upserts keyed by id; usage is insert-if-absent keyed by run id, so
/// re-delivering the same exit report can never meter a run twice.
#[derive(Debug, Clone)]
pub enum Mutation {
    PutTenant {
        tenant: Tenant,
        token_hash: String,
    },
    PutNode(Node),
    PutJob(JobRecord),
    PutTask(TaskRecord),
    PutRun(RunRecord),
    InsertUsage(UsageRecord),
    /// Upsert keyed by (tenant, service name).
    PutService(ServiceRecord),
    DeleteService {
        tenant: TenantId,
        name: String,
    },
}

/// Everything the server needs in memory at start.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub tenants: Vec<(Tenant, String)>,
    pub nodes: Vec<Node>,
    pub jobs: Vec<JobRecord>,
    pub tasks: Vec<TaskRecord>,
    /// Runs that are not terminal.
    pub active_runs: Vec<RunRecord>,
    pub max_run_id: u64,
    pub services: Vec<ServiceRecord>,
}

#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub tenant: Option<caravel_core::TenantId>,
    pub job: Option<JobId>,
}

pub trait Store: Send {
    fn load(&mut self) -> Result<Snapshot>;
    /// Applies every mutation in one transaction.
    fn apply(&mut self, batch: &[Mutation]) -> Result<()>;
    fn runs_of_job(&mut self, job: JobId) -> Result<Vec<RunRecord>>;
    /// Runs that have ended after being stopped for `job` (their `preempted_for`), by id:
    /// after a restart, the room they freed is still owed to it.
    fn ended_runs_preempted_for(&mut self, job: JobId) -> Result<Vec<RunRecord>>;
    fn run(&mut self, id: RunId) -> Result<Option<RunRecord>>;
    fn usage(&mut self, filter: &UsageFilter) -> Result<Vec<UsageRecord>>;
    fn has_usage(&mut self, run: RunId) -> Result<bool>;
}
