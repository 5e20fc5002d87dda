//! The conformance suite every `Store` backend must pass. A backend's tests invoke
//! `store_conformance_tests!(factory)`, where the factory makes a fresh, empty database
//! that `StoreFactory::open` can open again (to check durability across reopen), or `None`
//! where the backend's server is not there to test against (see `test_pg`).

use std::collections::BTreeMap;

use caravel_core::*;

use crate::{Mutation, Store, StoreError, UsageFilter};

pub trait StoreFactory {
    /// Opens (or re-opens) the same database.
    fn open(&self) -> Box<dyn Store>;
}

pub fn tenant(id: u64, name: &str) -> Tenant {
    Tenant {
        registries: Default::default(),
        id: TenantId(id),
        name: name.into(),
        weight: 1.0,
        quota: Quota::parse("cpu=8,gpu/H100=4").unwrap(),
        guarantee: Quota::parse("gpu/H100=2").unwrap(),
        created_ms: 1,
    }
}

pub fn node(id: u64, name: &str) -> Node {
    Node {
        isolation_missing: vec![],
        id: NodeId(id),
        name: name.into(),
        address: "127.0.0.1".into(),
        agent_url: "http://127.0.0.1:1".into(),
        agent_secret: "s".into(),
        agent_cert_sha256: None,
        topology: Topology::default(),
        labels: BTreeMap::new(),
        capacity: Capacity {
            isolation: Default::default(),
            images: false,
            cpu_milli: 4000,
            memory_bytes: 1 << 30,
            devices: vec![Device {
                index: 0,
                model: "T4".into(),
            }],
        },
        state: NodeState::Ready,
        last_seen_ms: 5,
        registered_ms: 1,
        instance: "i".into(),
        drained: false,
    }
}

pub fn job(id: u64, tenant: u64) -> JobRecord {
    JobRecord {
        id: JobId(id),
        tenant: TenantId(tenant),
        spec: JobSpec::simple("echo", &["hi"]),
        state: JobState::Pending,
        seq: id,
        submitted_ms: 10,
        started_ms: None,
        finished_ms: None,
        message: String::new(),
        gang_abort: None,
        gang_abort_free: false,
        cancel_requested: false,
        service: None,
        idempotency_key: None,
    }
}

pub fn task(job: u64, index: u32) -> TaskRecord {
    TaskRecord {
        job: JobId(job),
        index,
        state: TaskState::Pending,
        attempts: 0,
        retries_used: 0,
        current_run: None,
        exit_code: None,
    }
}

pub fn run(id: u64, job: u64, state: RunState) -> RunRecord {
    RunRecord {
        id: RunId(id),
        job: JobId(job),
        tenant: TenantId(1),
        index: 0,
        attempt: 1,
        node: NodeId(1),
        devices: vec![0],
        gpu_model: Some("T4".into()),
        local_rank: 0,
        local_world_size: 1,
        master_addr: None,
        master_port: None,
        port: None,
        borrowed: true,
        state,
        stop: None,
        preempted_for: None,
        assigned_ms: 11,
        started_ms: Some(12),
        ended_ms: None,
        exit_code: None,
        signal: None,
        message: String::new(),
        checkpoint: None,
        world_size: None,
    }
}

pub fn usage(run: u64, job: u64) -> UsageRecord {
    UsageRecord {
        run: RunId(run),
        tenant: TenantId(1),
        job: JobId(job),
        index: 0,
        node: NodeId(1),
        start_ms: 1000,
        end_ms: 3500,
        cpu_milli: 500,
        memory_bytes: 1 << 20,
        gpu_model: None,
        gpu_count: 0,
        gpu_milli: 0,
        priority: Priority::Batch,
    }
}

pub fn empty_store_loads_empty(f: &dyn StoreFactory) {
    let mut s = f.open();
    let snap = s.load().unwrap();
    assert!(snap.tenants.is_empty() && snap.nodes.is_empty() && snap.jobs.is_empty());
    assert_eq!(snap.max_run_id, 0);
}

pub fn round_trips_every_record(f: &dyn StoreFactory) {
    let mut s = f.open();
    s.apply(&[
        Mutation::PutTenant {
            tenant: tenant(1, "a"),
            token_hash: "h1".into(),
        },
        Mutation::PutNode(node(1, "n1")),
        Mutation::PutJob(job(7, 1)),
        Mutation::PutTask(task(7, 0)),
        Mutation::PutRun(run(3, 7, RunState::Running)),
        Mutation::InsertUsage(usage(2, 7)),
    ])
    .unwrap();
    drop(s);
    let mut s = f.open();
    let snap = s.load().unwrap();
    assert_eq!(snap.tenants, vec![(tenant(1, "a"), "h1".to_string())]);
    assert_eq!(snap.nodes, vec![node(1, "n1")]);
    assert_eq!(snap.jobs, vec![job(7, 1)]);
    assert_eq!(snap.tasks, vec![task(7, 0)]);
    assert_eq!(snap.active_runs, vec![run(3, 7, RunState::Running)]);
    assert_eq!(snap.max_run_id, 3);
    assert_eq!(s.run(RunId(3)).unwrap(), Some(run(3, 7, RunState::Running)));
    assert_eq!(s.run(RunId(99)).unwrap(), None);
    assert_eq!(s.usage(&UsageFilter::default()).unwrap(), vec![usage(2, 7)]);
}

pub fn puts_are_upserts(f: &dyn StoreFactory) {
    let mut s = f.open();
    let mut j = job(1, 1);
    s.apply(&[
        Mutation::PutJob(j.clone()),
        Mutation::PutRun(run(1, 1, RunState::Running)),
    ])
    .unwrap();
    j.state = JobState::Succeeded;
    j.message = "done".into();
    s.apply(&[
        Mutation::PutJob(j.clone()),
        Mutation::PutRun(run(1, 1, RunState::Succeeded)),
    ])
    .unwrap();
    let snap = s.load().unwrap();
    assert_eq!(snap.jobs, vec![j]);
    assert!(snap.active_runs.is_empty(), "terminal runs are not active");
    assert_eq!(
        s.runs_of_job(JobId(1)).unwrap(),
        vec![run(1, 1, RunState::Succeeded)]
    );
    assert_eq!(s.load().unwrap().max_run_id, 1);
}

pub fn ended_victims_are_found_by_the_job_they_were_stopped_for(f: &dyn StoreFactory) {
    let mut s = f.open();
    let victim = |id, state, for_job: Option<u64>| {
        let mut r = run(id, 1, state);
        r.stop = Some(caravel_core::StopReason::Preempt);
        r.preempted_for = for_job.map(JobId);
        r
    };
    s.apply(&[
        Mutation::PutJob(job(1, 1)),
        Mutation::PutRun(victim(4, RunState::Killed, Some(9))),
        // Still stopping: the server finds it among the active runs.
        Mutation::PutRun(victim(5, RunState::Running, Some(9))),
        Mutation::PutRun(victim(6, RunState::Killed, Some(8))),
        Mutation::PutRun(victim(2, RunState::Killed, Some(9))),
        Mutation::PutRun(run(3, 1, RunState::Killed)),
    ])
    .unwrap();
    let ids = |s: &mut Box<dyn Store>, j| -> Vec<u64> {
        s.ended_runs_preempted_for(JobId(j))
            .unwrap()
            .iter()
            .map(|r| r.id.0)
            .collect()
    };
    assert_eq!(ids(&mut s, 9), vec![2, 4]);
    assert_eq!(ids(&mut s, 8), vec![6]);
    assert!(ids(&mut s, 1).is_empty());
    // A run that ends later (an upsert) is found then, with its final body.
    s.apply(&[Mutation::PutRun(victim(5, RunState::Killed, Some(9)))])
        .unwrap();
    drop(s);
    let mut s = f.open();
    assert_eq!(ids(&mut s, 9), vec![2, 4, 5]);
    assert_eq!(
        s.ended_runs_preempted_for(JobId(9)).unwrap()[2],
        victim(5, RunState::Killed, Some(9))
    );
}

pub fn usage_is_written_once(f: &dyn StoreFactory) {
    let mut s = f.open();
    let first = usage(5, 1);
    let mut second = usage(5, 1);
    second.end_ms = 99_999;
    s.apply(&[Mutation::InsertUsage(first.clone())]).unwrap();
    s.apply(&[Mutation::InsertUsage(second)]).unwrap();
    assert_eq!(s.usage(&UsageFilter::default()).unwrap(), vec![first]);
    assert!(s.has_usage(RunId(5)).unwrap());
    assert!(!s.has_usage(RunId(6)).unwrap());
}

pub fn usage_filters(f: &dyn StoreFactory) {
    let mut s = f.open();
    let mut other = usage(2, 2);
    other.tenant = TenantId(2);
    s.apply(&[
        Mutation::InsertUsage(usage(1, 1)),
        Mutation::InsertUsage(other.clone()),
    ])
    .unwrap();
    let by_t = s
        .usage(&UsageFilter {
            tenant: Some(TenantId(2)),
            job: None,
        })
        .unwrap();
    assert_eq!(by_t, vec![other]);
    let by_j = s
        .usage(&UsageFilter {
            tenant: None,
            job: Some(JobId(1)),
        })
        .unwrap();
    assert_eq!(by_j, vec![usage(1, 1)]);
}

pub fn batches_are_atomic(f: &dyn StoreFactory) {
    let mut s = f.open();
    s.apply(&[Mutation::PutTenant {
        tenant: tenant(1, "a"),
        token_hash: "h1".into(),
    }])
    .unwrap();
    // The second tenant reuses the name "a": the whole batch, job included, must fail.
    let err = s
        .apply(&[
            Mutation::PutJob(job(1, 1)),
            Mutation::PutTenant {
                tenant: tenant(2, "a"),
                token_hash: "h2".into(),
            },
        ])
        .unwrap_err();
    assert!(matches!(err, StoreError::Constraint(_)), "{err:?}");
    let snap = s.load().unwrap();
    assert!(snap.jobs.is_empty(), "half a batch landed");
    assert_eq!(snap.tenants.len(), 1);
}

pub fn many_jobs_round_trip(f: &dyn StoreFactory) {
    let mut s = f.open();
    let batch: Vec<Mutation> = (1..=500)
        .flat_map(|i| [Mutation::PutJob(job(i, 1)), Mutation::PutTask(task(i, 0))])
        .collect();
    s.apply(&batch).unwrap();
    let snap = s.load().unwrap();
    assert_eq!(snap.jobs.len(), 500);
    assert_eq!(snap.tasks.len(), 500);
    assert!(
        snap.jobs.windows(2).all(|w| w[0].id < w[1].id),
        "load orders by id"
    );
}

pub fn services_upsert_and_delete(f: &dyn StoreFactory) {
    let rec = |tenant: u64, name: &str, version: u64| ServiceRecord {
        tenant: TenantId(tenant),
        spec: ServiceSpec::simple(name, "python3", &["serve.py"]),
        version,
        created_ms: 1,
        updated_ms: version as i64,
    };
    {
        let mut s = f.open();
        s.apply(&[
            Mutation::PutService(rec(1, "chat", 1)),
            Mutation::PutService(rec(2, "chat", 1)),
            Mutation::PutService(rec(1, "embed", 1)),
        ])
        .unwrap();
        s.apply(&[Mutation::PutService(rec(1, "chat", 2))]).unwrap();
        s.apply(&[Mutation::DeleteService {
            tenant: TenantId(1),
            name: "embed".into(),
        }])
        .unwrap();
    }
    // Reopened: what was committed is there, once.
    let snap = f.open().load().unwrap();
    let got: Vec<(u64, String, u64)> = snap
        .services
        .iter()
        .map(|r| (r.tenant.0, r.spec.name.clone(), r.version))
        .collect();
    assert_eq!(
        got,
        vec![(1, "chat".to_string(), 2), (2, "chat".to_string(), 1)]
    );
    assert_eq!(snap.services[0], rec(1, "chat", 2));
}

/// Several changes to one record in one batch: the result is what applying them one by
/// one leaves (a backend may fold a batch before it writes it).
pub fn a_batch_lands_as_if_applied_in_order(f: &dyn StoreFactory) {
    let svc = |name: &str, version: u64| ServiceRecord {
        tenant: TenantId(1),
        spec: ServiceSpec::simple(name, "python3", &["serve.py"]),
        version,
        created_ms: 1,
        updated_ms: version as i64,
    };
    let mut s = f.open();
    s.apply(&[Mutation::PutService(svc("old", 1))]).unwrap();
    let mut done = job(1, 1);
    done.state = JobState::Succeeded;
    let mut task_done = task(1, 0);
    task_done.state = TaskState::Succeeded;
    let mut later_usage = usage(4, 1);
    later_usage.end_ms = 99_999;
    s.apply(&[
        Mutation::PutJob(job(1, 1)),
        Mutation::PutTask(task(1, 0)),
        Mutation::PutRun(run(4, 1, RunState::Running)),
        Mutation::InsertUsage(usage(4, 1)),
        Mutation::PutService(svc("new", 1)),
        Mutation::DeleteService {
            tenant: TenantId(1),
            name: "old".into(),
        },
        Mutation::DeleteService {
            tenant: TenantId(1),
            name: "new".into(),
        },
        Mutation::PutService(svc("new", 2)),
        Mutation::PutService(svc("gone", 1)),
        Mutation::DeleteService {
            tenant: TenantId(1),
            name: "gone".into(),
        },
        Mutation::PutRun(run(4, 1, RunState::Succeeded)),
        Mutation::InsertUsage(later_usage),
        Mutation::PutTask(task_done.clone()),
        Mutation::PutJob(done.clone()),
    ])
    .unwrap();
    drop(s);
    let mut s = f.open();
    let snap = s.load().unwrap();
    assert_eq!(snap.jobs, vec![done]);
    assert_eq!(snap.tasks, vec![task_done]);
    assert!(
        snap.active_runs.is_empty(),
        "the run's last state is terminal"
    );
    assert_eq!(
        s.run(RunId(4)).unwrap(),
        Some(run(4, 1, RunState::Succeeded))
    );
    assert_eq!(
        s.usage(&UsageFilter::default()).unwrap(),
        vec![usage(4, 1)],
        "the first usage record of a run stands"
    );
    assert_eq!(snap.services, vec![svc("new", 2)]);
}

#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:expr) => {
        $crate::store_conformance_tests!(@t $factory;
            empty_store_loads_empty, round_trips_every_record, puts_are_upserts,
            usage_is_written_once, usage_filters, batches_are_atomic, many_jobs_round_trip,
            services_upsert_and_delete, ended_victims_are_found_by_the_job_they_were_stopped_for,
            a_batch_lands_as_if_applied_in_order);
    };
    (@t $factory:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                if let Some(f) = ($factory)() {
                    $crate::conformance::$name(&f);
                }
            }
        )*
    };
}

/// The PostgreSQL server the tests use: `CARAVEL_TEST_PG`, a libpq key-value connection
/// string (`scripts/with-test-postgres` starts a throwaway cluster and sets it). Unset, a
/// test that needs it is skipped with a line saying so — except under CI (`CI` set), where
/// that is a failure: CI runs the tests through the script.
pub fn test_pg() -> Option<String> {
    match std::env::var("CARAVEL_TEST_PG") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("CARAVEL_TEST_PG is not set: run the tests through scripts/with-test-postgres")
        }
        _ => {
            eprintln!("skipped: CARAVEL_TEST_PG is not set (see scripts/with-test-postgres)");
            None
        }
    }
}

/// A schema of its own on the test server for one test, dropped with everything in it when
/// this goes out of scope. `url()` connects with it as the search path, so each test has
/// an empty store (and a lock of its own).
pub struct PgSchema {
    base: String,
    name: String,
}

impl PgSchema {
    pub fn create(base: &str) -> PgSchema {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        );
        let s = PgSchema {
            base: base.to_string(),
            name,
        };
        s.admin(&format!("CREATE SCHEMA {}", s.name));
        s
    }

    pub fn url(&self) -> String {
        format!("{} options='-c search_path={}'", self.base, self.name)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs SQL on the test server outside any store (on a thread: the blocking client
    /// must not run inside an async test's runtime).
    pub fn admin(&self, sql: &str) {
        let (base, sql) = (self.base.clone(), sql.to_string());
        std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&base, postgres::NoTls)
                .unwrap_or_else(|e| panic!("connecting to {base}: {e}"));
            c.batch_execute(&sql)
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        })
        .join()
        .expect("admin SQL failed");
    }
}

/// A transaction another session keeps open (see `PgSchema::hold`); dropping it commits.
pub struct Held {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl PgSchema {
    /// Runs `sql` (a `LOCK TABLE`, say) in a transaction of its own and keeps that
    /// transaction open, holding what it took, until the returned guard is dropped.
    pub fn hold(&self, sql: &str) -> Held {
        let (base, sql) = (self.base.clone(), sql.to_string());
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&base, postgres::NoTls)
                .unwrap_or_else(|e| panic!("connecting to {base}: {e}"));
            c.batch_execute(&format!("BEGIN; {sql}"))
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            ready_tx.send(()).unwrap();
            let _ = wait.recv();
            c.batch_execute("COMMIT").expect("COMMIT");
        });
        ready.recv().expect("the holding session failed");
        Held {
            done: Some(done),
            thread: Some(thread),
        }
    }

    /// The first column of each row `sql` returns, as text (NULL: None).
    pub fn query(&self, sql: &str) -> Vec<Option<String>> {
        let (base, sql) = (self.base.clone(), sql.to_string());
        std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&base, postgres::NoTls)
                .unwrap_or_else(|e| panic!("connecting to {base}: {e}"));
            c.simple_query(&sql)
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .into_iter()
                .filter_map(|m| match m {
                    postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(String::from)),
                    _ => None,
                })
                .collect()
        })
        .join()
        .expect("admin SQL failed")
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.admin(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
        }
    }
}
