//! The conformance suite every `Store` backend must pass. A backend's tests invoke
//! `store_conformance_tests!(factory)`, where the factory makes a fresh, empty database
//! that `StoreFactory::open` can open again (to check durability across reopen).

use std::collections::BTreeMap;

use caravel_core::*;

use crate::{Mutation, Store, StoreError, UsageFilter};

pub trait StoreFactory {
    /// Opens (or re-opens) the same database.
    fn open(&self) -> Box<dyn Store>;
}

pub fn tenant(id: u64, name: &str) -> Tenant {
    Tenant {
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
        id: NodeId(id),
        name: name.into(),
        address: "127.0.0.1".into(),
        agent_url: "http://127.0.0.1:1".into(),
        agent_secret: "s".into(),
        topology: Topology::default(),
        labels: BTreeMap::new(),
        capacity: Capacity {
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

#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:expr) => {
        $crate::store_conformance_tests!(@t $factory;
            empty_store_loads_empty, round_trips_every_record, puts_are_upserts,
            usage_is_written_once, usage_filters, batches_are_atomic, many_jobs_round_trip,
            services_upsert_and_delete, ended_victims_are_found_by_the_job_they_were_stopped_for);
    };
    (@t $factory:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                let f = ($factory)();
                $crate::conformance::$name(&f);
            }
        )*
    };
}
