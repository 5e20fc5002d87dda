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

#![forbid(unsafe_code)]

#[cfg(any(test, feature = "conformance"))]
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

#[cfg(test)]
mod lease_tests {
    use super::Lease;
    use std::time::{Duration, Instant};

    #[test]
    fn a_lease_is_valid_from_one_duration_after_the_lock_to_one_after_the_last_round_trip() {
        let t0 = Instant::now();
        let d = Duration::from_millis(2000);
        let l = Lease::new(t0, d);
        // Not before a duration has passed since the lock was taken: an owner whose
        // session just ended may still be answering.
        assert!(!l.valid_at(t0));
        assert!(!l.valid_at(t0 + Duration::from_millis(1999)));
        // Nor after, without a round trip.
        assert!(!l.valid_at(t0 + Duration::from_millis(2000)));
        l.renew(t0 + Duration::from_millis(1500));
        assert!(l.valid_at(t0 + Duration::from_millis(2000)));
        assert!(l.valid_at(t0 + Duration::from_millis(3499)));
        assert!(!l.valid_at(t0 + Duration::from_millis(3500)));
        // An older round trip finishing late moves nothing back.
        l.renew(t0 + Duration::from_millis(100));
        assert!(l.valid_at(t0 + Duration::from_millis(3000)));
        l.lose();
        assert!(!l.valid_at(t0 + Duration::from_millis(2500)));
    }
}

#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub tenant: Option<caravel_core::TenantId>,
    pub job: Option<JobId>,
}

/// How a store whose ownership can be lost without a write noticing (PostgreSQL's session
/// lock) tells its server whether it may still answer as the owner.
///
/// The store renews the lease at the *start* of every round trip that succeeds (a commit,
/// a read, or a ping when idle): the session, and so the lock, was alive then. The server
/// answers only while `valid()`: from `duration` after the lock was taken until `duration`
/// after the start of the newest successful round trip. Whoever takes the lock after this
/// session ended takes it after that session's last successful round trip started, and
/// waits `duration` before answering: by then this server has stopped. So no two servers
/// answer as owner at the same instant, without a write to notice it.
#[derive(Debug)]
pub struct Lease {
    epoch: std::time::Instant,
    duration: std::time::Duration,
    /// Milliseconds since `epoch`.
    valid_from: std::sync::atomic::AtomicU64,
    valid_until: std::sync::atomic::AtomicU64,
    /// The session is known to be gone.
    lost: std::sync::atomic::AtomicBool,
}

impl Lease {
    /// A lease for a lock taken at `taken`.
    pub fn new(taken: std::time::Instant, duration: std::time::Duration) -> Lease {
        let l = Lease {
            epoch: taken,
            duration,
            valid_from: Default::default(),
            valid_until: Default::default(),
            lost: Default::default(),
        };
        let d = duration.as_millis() as u64;
        l.valid_from.store(d, std::sync::atomic::Ordering::SeqCst);
        l.valid_until.store(d, std::sync::atomic::Ordering::SeqCst);
        l
    }

    fn ms(&self, t: std::time::Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// A round trip that started at `started` succeeded.
    pub fn renew(&self, started: std::time::Instant) {
        let until = self.ms(started) + self.duration.as_millis() as u64;
        self.valid_until
            .fetch_max(until, std::sync::atomic::Ordering::SeqCst);
    }

    /// The session is gone: never valid again.
    pub fn lose(&self) {
        self.lost.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn valid_at(&self, now: std::time::Instant) -> bool {
        let n = self.ms(now);
        !self.lost()
            && n >= self.valid_from.load(std::sync::atomic::Ordering::SeqCst)
            && n < self.valid_until.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn valid(&self) -> bool {
        self.valid_at(std::time::Instant::now())
    }

    pub fn duration(&self) -> std::time::Duration {
        self.duration
    }
}

pub trait Store: Send {
    /// Set for a store whose ownership can end unnoticed (see `Lease`); None: this
    /// server owns the store for as long as it has it open (SQLite: a file it locks).
    fn lease(&self) -> Option<std::sync::Arc<Lease>> {
        None
    }
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
