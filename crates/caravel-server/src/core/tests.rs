//! State-machine tests over a real SQLite store, with an explicit clock.

use super::*;
use caravel_store::{SqliteStore, Sync, UsageFilter};

struct Fixture {
    dir: tempfile::TempDir,
    core: Core,
}

fn open(dir: &std::path::Path, now: Millis) -> Core {
    let s = SqliteStore::open(&dir.join("c.db"), Sync::Normal).unwrap();
    let mut c = Core::load(Box::new(s), now).unwrap();
    c.ensure_default_tenant(now).unwrap();
    c
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let core = open(dir.path(), 0);
    Fixture { dir, core }
}

fn reg(name: &str, cpus: u64, gpus: u32) -> RegisterRequest {
    RegisterRequest {
        isolation_missing: vec![],
        name: name.into(),
        address: "127.0.0.1".into(),
        agent_url: "http://127.0.0.1:1".into(),
        agent_secret: "s".into(),
        agent_cert_sha256: None,
        instance: format!("{name}-1"),
        topology: Topology::default(),
        labels: Default::default(),
        capacity: Capacity {
            isolation: Default::default(),
            images: false,
            cpu_milli: cpus * 1000,
            memory_bytes: 64 << 30,
            devices: (0..gpus)
                .map(|i| Device {
                    index: i,
                    model: "H100".into(),
                })
                .collect(),
        },
        running: vec![],
    }
}

fn default_tenant(c: &Core) -> TenantId {
    c.tenant_id(DEFAULT_TENANT).unwrap()
}

fn started(c: &mut Core, node: NodeId, run: RunId, at: Millis) {
    c.apply_event(
        node,
        RunEvent::Started {
            run,
            pid: 1,
            at_ms: at,
            port: None,
            checkpoint: None,
        },
        at,
    )
    .unwrap();
}

fn exited(c: &mut Core, node: NodeId, run: RunId, start: Millis, at: Millis, code: i32) {
    c.apply_event(
        node,
        RunEvent::Exited {
            run,
            started_ms: Some(start),
            at_ms: at,
            exit_code: Some(code),
            signal: None,
            reason: ExitReason::Exited,
            message: String::new(),
            checkpoint: None,
        },
        at,
    )
    .unwrap();
}

fn runs_on(c: &Core, node: NodeId) -> Vec<RunId> {
    c.desired(node, &BTreeSet::new()).1
}

#[test]
fn a_job_runs_and_is_metered_once() {
    let mut f = fixture();
    let c = &mut f.core;
    let n = c.register(reg("a", 4, 0), 0).unwrap();
    let t = default_tenant(c);
    let j = c.submit(t, JobSpec::simple("echo", &["hi"]), 10).unwrap();
    assert_eq!(c.schedule(20).unwrap().placed, 1);
    let (_, _, desired) = c.desired(n, &BTreeSet::new());
    assert_eq!(desired.len(), 1);
    let a = &desired[0];
    assert_eq!(a.env["CARAVEL_JOB_ID"], j.to_string());
    assert_eq!(a.env["CARAVEL_TASK_INDEX"], "0");
    assert_eq!(a.env["CARAVEL_TASK_COUNT"], "1");
    assert_eq!(a.env["CUDA_VISIBLE_DEVICES"], "");
    let run = a.run;
    started(c, n, run, 30);
    assert_eq!(c.jobs[&j].rec.state, JobState::Running);
    exited(c, n, run, 30, 1030, 0);
    // The same report again (agent retry) must change nothing.
    exited(c, n, run, 30, 1030, 0);
    assert_eq!(c.jobs[&j].rec.state, JobState::Succeeded);
    let u = c.read(|s| s.usage(&UsageFilter::default())).unwrap();
    assert_eq!(u.len(), 1);
    assert_eq!(u[0].duration_ms(), 1000);
    assert_eq!(u[0].cpu_milli_ms(), 1000 * 1000);
    assert!(c.nodes[&n].alloc.runs.is_empty());
    assert_eq!(c.nodes[&n].alloc.cpu_milli, 0);
}

#[test]
fn failures_retry_within_budget_then_fail() {
    let mut f = fixture();
    let c = &mut f.core;
    let n = c.register(reg("a", 4, 0), 0).unwrap();
    let mut spec = JobSpec::simple("false", &[]);
    spec.max_retries = 1;
    let j = c.submit(default_tenant(c), spec, 0).unwrap();
    for attempt in 1..=2 {
        c.schedule(attempt * 100).unwrap();
        let run = runs_on(c, n)[0];
        started(c, n, run, attempt * 100);
        exited(c, n, run, attempt * 100, attempt * 100 + 5, 3);
        assert_eq!(c.jobs[&j].tasks[0].attempts, attempt as u32);
    }
    let job = &c.jobs[&j];
    assert_eq!(job.rec.state, JobState::Failed);
    assert_eq!(job.tasks[0].exit_code, Some(3));
    assert_eq!(
        c.read(|s| s.usage(&UsageFilter::default())).unwrap().len(),
        2
    );
}

#[test]
fn gang_member_failure_restarts_the_whole_gang() {
    let mut f = fixture();
    let c = &mut f.core;
    let n1 = c.register(reg("a", 2, 0), 0).unwrap();
    let n2 = c.register(reg("b", 2, 0), 0).unwrap();
    let mut spec = JobSpec::simple("train", &[]);
    spec.tasks = 4;
    spec.gang = true;
    spec.max_retries = 1;
    let j = c.submit(default_tenant(c), spec, 0).unwrap();
    assert_eq!(c.schedule(1).unwrap().placed, 4);
    let mut all: Vec<(NodeId, Assignment)> = vec![];
    for n in [n1, n2] {
        all.extend(c.desired(n, &BTreeSet::new()).2.into_iter().map(|a| (n, a)));
    }
    assert_eq!(all.len(), 4);
    let mut ranks: Vec<String> = all.iter().map(|(_, a)| a.env["RANK"].clone()).collect();
    ranks.sort();
    assert_eq!(ranks, vec!["0", "1", "2", "3"]);
    assert!(all.iter().all(|(_, a)| a.env["WORLD_SIZE"] == "4"));
    let ports: BTreeSet<String> = all
        .iter()
        .map(|(_, a)| a.env["MASTER_PORT"].clone())
        .collect();
    assert_eq!(ports.len(), 1);
    for (n, a) in &all {
        started(c, *n, a.run, 2);
    }
    // Rank 2 fails: everyone else is asked to stop.
    let (fn_, fa) = all
        .iter()
        .find(|(_, a)| a.env["RANK"] == "2")
        .unwrap()
        .clone();
    exited(c, fn_, fa.run, 2, 50, 1);
    let still: usize = [n1, n2].iter().map(|n| runs_on(c, *n).len()).sum();
    assert_eq!(still, 0, "surviving members must be told to stop");
    assert_eq!(
        c.schedule(60).unwrap().placed,
        0,
        "no partial restart while members run"
    );
    for (n, a) in all.iter().filter(|(_, a)| a.run != fa.run) {
        c.apply_event(
            *n,
            RunEvent::Exited {
                run: a.run,
                started_ms: Some(2),
                at_ms: 70,
                exit_code: None,
                signal: Some(15),
                reason: ExitReason::Killed,
                message: String::new(),
                checkpoint: None,
            },
            70,
        )
        .unwrap();
    }
    assert_eq!(c.jobs[&j].rec.state, JobState::Pending);
    assert_eq!(c.schedule(80).unwrap().placed, 4, "whole gang placed again");
    assert!(c.jobs[&j]
        .tasks
        .iter()
        .all(|t| t.attempts == 2 && t.retries_used == 1));
}

#[test]
fn cancel_stops_running_and_pending_tasks() {
    let mut f = fixture();
    let c = &mut f.core;
    let n = c.register(reg("a", 1, 0), 0).unwrap();
    let mut spec = JobSpec::simple("sleep", &["100"]);
    spec.tasks = 2;
    let j = c.submit(default_tenant(c), spec, 0).unwrap();
    c.schedule(1).unwrap();
    let run = runs_on(c, n)[0];
    started(c, n, run, 2);
    c.cancel(j, 3).unwrap();
    assert!(
        runs_on(c, n).is_empty(),
        "the agent is told to stop the run"
    );
    assert_eq!(
        c.jobs[&j].rec.state,
        JobState::Running,
        "until the process is gone"
    );
    c.apply_event(
        n,
        RunEvent::Exited {
            run,
            started_ms: Some(2),
            at_ms: 9,
            exit_code: None,
            signal: Some(15),
            reason: ExitReason::Killed,
            message: String::new(),
            checkpoint: None,
        },
        9,
    )
    .unwrap();
    assert_eq!(c.jobs[&j].rec.state, JobState::Cancelled);
    assert!(
        c.cancel(j, 10).is_err(),
        "cancelling a finished job is a conflict"
    );
}

#[test]
fn lost_node_reschedules_and_stale_copy_is_dropped() {
    let mut f = fixture();
    let c = &mut f.core;
    let a = c.register(reg("a", 1, 0), 0).unwrap();
    let b = c.register(reg("b", 1, 0), 0).unwrap();
    let mut spec = JobSpec::simple("sleep", &["100"]);
    spec.max_retries = 1;
    let j = c.submit(default_tenant(c), spec, 0).unwrap();
    c.schedule(1).unwrap();
    let (first_node, other) = if runs_on(c, a).is_empty() {
        (b, a)
    } else {
        (a, b)
    };
    let run1 = runs_on(c, first_node)[0];
    started(c, first_node, run1, 5);
    c.heartbeat(
        other,
        &format!("{}-1", if other == a { "a" } else { "b" }),
        9_000,
    )
    .unwrap();
    let lost = c.check_liveness(12_000, 10_000).unwrap();
    assert_eq!(lost.len(), 1);
    c.schedule(12_001).unwrap();
    let run2 = runs_on(c, other)[0];
    assert_ne!(run1, run2);
    assert_eq!(c.jobs[&j].tasks[0].attempts, 2);
    // The lost node comes back: its desired state no longer holds the old run.
    let inst = if first_node == a { "a-1" } else { "b-1" };
    c.heartbeat(first_node, inst, 13_000).unwrap();
    assert_eq!(c.nodes[&first_node].node.state, NodeState::Ready);
    assert!(runs_on(c, first_node).is_empty());
    // Its late exit report does not meter the run a second time.
    exited(c, first_node, run1, 5, 13_500, 137);
    let u = c
        .read(move |s| {
            s.usage(&UsageFilter {
                tenant: None,
                job: Some(j),
            })
        })
        .unwrap();
    assert_eq!(u.len(), 1);
    assert_eq!(u[0].run, run1);
    assert_eq!(
        u[0].end_ms, 5,
        "metered to the node's last sign of life (its start report)"
    );
}

#[test]
fn restart_reloads_everything_and_readopts_runs() {
    let mut f = fixture();
    let n = f.core.register(reg("a", 4, 2), 0).unwrap();
    let t = default_tenant(&f.core);
    let mut spec = JobSpec::simple("sleep", &["100"]);
    spec.resources.gpu = Some(GpuRequest::whole("H100", 2));
    let j = f.core.submit(t, spec, 0).unwrap();
    let j2 = f.core.submit(t, JobSpec::simple("x", &[]), 0).unwrap();
    f.core.schedule(1).unwrap();
    let before = runs_on(&f.core, n);
    let run = f.core.jobs[&j].tasks[0].current_run.unwrap();
    started(&mut f.core, n, run, 2);
    drop(f.core);
    // "kill -9": reopen from disk only.
    let mut c = open(f.dir.path(), 50_000);
    assert_eq!(c.jobs.len(), 2);
    assert_eq!(c.jobs[&j].rec.state, JobState::Running);
    assert_eq!(
        c.nodes[&n].alloc.devices.len(),
        2,
        "allocation rebuilt from active runs"
    );
    assert_eq!(
        runs_on(&c, n),
        before,
        "runs are still wanted: re-adopted, not restarted"
    );
    assert_eq!(
        c.check_liveness(55_000, 10_000).unwrap().len(),
        0,
        "agents get a grace period"
    );
    // The other job was placed before the crash too, or is still pending: never lost.
    assert!(c.jobs.contains_key(&j2));
    let j3 = c.submit(t, JobSpec::simple("y", &[]), 50_001).unwrap();
    assert!(j3 > j2, "ids continue after restart");
    exited(&mut c, n, run, 2, 60_000, 0);
    assert_eq!(c.jobs[&j].rec.state, JobState::Succeeded);
    assert_eq!(
        c.read(|s| s.usage(&UsageFilter::default())).unwrap().len(),
        1
    );
}

#[test]
fn submit_rejects_what_can_never_run() {
    let mut f = fixture();
    let c = &mut f.core;
    c.register(reg("a", 4, 0), 0).unwrap();
    let t = default_tenant(c);
    let mut spec = JobSpec::simple("x", &[]);
    spec.resources.gpu = Some(GpuRequest::whole("Z9", 1));
    let e = c.submit(t, spec, 0).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unschedulable);
    assert_eq!(e.field(), Some("resources.gpu.model"));
    let mut spec = JobSpec::simple("x", &[]);
    spec.resources.cpu_milli = 64_000;
    assert_eq!(
        c.submit(t, spec, 0).unwrap_err().code(),
        ErrorCode::Unschedulable
    );
    let (q, _) = c
        .create_tenant(
            "small",
            1.0,
            Quota::parse("cpu=2").unwrap(),
            Quota::default(),
            0,
        )
        .unwrap();
    let mut spec = JobSpec::simple("x", &[]);
    spec.tasks = 3;
    spec.gang = true;
    assert_eq!(
        c.submit(q.id, spec, 0).unwrap_err().code(),
        ErrorCode::ExceedsQuota
    );
    assert_eq!(c.jobs.len(), 0, "nothing half-created");
}

#[test]
fn quota_holds_jobs_pending_with_reason() {
    let mut f = fixture();
    let c = &mut f.core;
    c.register(reg("a", 8, 0), 0).unwrap();
    let (t, _) = c
        .create_tenant(
            "q",
            1.0,
            Quota::parse("cpu=2").unwrap(),
            Quota::default(),
            0,
        )
        .unwrap();
    let mut spec = JobSpec::simple("sleep", &["9"]);
    spec.tasks = 3;
    let j = c.submit(t.id, spec, 0).unwrap();
    assert_eq!(c.schedule(1).unwrap().placed, 2);
    let r = &c.jobs[&j].reasons[0];
    assert_eq!(r.code, "quota");
    assert!(
        r.message.starts_with("quota: cpu 2 of 2 in use"),
        "{}",
        r.message
    );
}

#[test]
fn agent_restart_loses_runs_it_does_not_report() {
    let mut f = fixture();
    let c = &mut f.core;
    let n = c.register(reg("a", 4, 0), 0).unwrap();
    let j = c
        .submit(default_tenant(c), JobSpec::simple("sleep", &["9"]), 0)
        .unwrap();
    c.schedule(1).unwrap();
    let run = runs_on(c, n)[0];
    started(c, n, run, 2);
    let mut again = reg("a", 4, 0);
    again.instance = "a-2".into();
    c.register(again, 100).unwrap();
    assert_eq!(c.jobs[&j].rec.state, JobState::Failed, "no retries left");
    assert!(
        c.heartbeat(n, "a-1", 101).is_err(),
        "the old instance must re-register"
    );
}

#[test]
fn load_repairs_a_job_left_inconsistent_by_a_crash_between_commits() {
    let dir = tempfile::tempdir().unwrap();
    {
        // What disk looks like if the server died after ending the last run but before
        // writing the job's own state: every task done, the job still "running".
        let mut s = SqliteStore::open(&dir.path().join("c.db"), Sync::Normal).unwrap();
        let mut j = caravel_store::conformance::job(1, 1);
        j.state = JobState::Running;
        let mut t = caravel_store::conformance::task(1, 0);
        t.state = TaskState::Succeeded;
        let mut r = caravel_store::conformance::run(1, 1, RunState::Assigned);
        r.stop = Some(StopReason::Cancel);
        r.started_ms = None;
        let mut j2 = caravel_store::conformance::job(2, 1);
        j2.state = JobState::Running;
        j2.cancel_requested = true;
        let mut t2 = caravel_store::conformance::task(2, 0);
        t2.state = TaskState::Assigned;
        t2.current_run = Some(RunId(1));
        r.job = JobId(2);
        s.apply(&[
            caravel_store::Mutation::PutJob(j),
            caravel_store::Mutation::PutTask(t),
            caravel_store::Mutation::PutJob(j2),
            caravel_store::Mutation::PutTask(t2),
            caravel_store::Mutation::PutRun(r),
        ])
        .unwrap();
    }
    let c = open(dir.path(), 100);
    assert_eq!(c.jobs[&JobId(1)].rec.state, JobState::Succeeded);
    assert_eq!(
        c.jobs[&JobId(2)].rec.state,
        JobState::Cancelled,
        "a stop that never reached the agent is finished"
    );
    assert!(c.runs.is_empty());
}

#[test]
fn fair_share_splits_a_contended_node_between_tenants() {
    let mut f = fixture();
    let c = &mut f.core;
    c.register(reg("a", 4, 0), 0).unwrap();
    let (t1, _) = c
        .create_tenant("one", 1.0, Quota::default(), Quota::default(), 0)
        .unwrap();
    let (t2, _) = c
        .create_tenant("two", 1.0, Quota::default(), Quota::default(), 0)
        .unwrap();
    let mut spec = JobSpec::simple("sleep", &["9"]);
    spec.tasks = 4;
    let j1 = c.submit(t1.id, spec.clone(), 0).unwrap();
    let j2 = c.submit(t2.id, spec, 1).unwrap();
    assert_eq!(c.schedule(2).unwrap().placed, 4);
    let running = |c: &Core, j: JobId| {
        c.jobs[&j]
            .tasks
            .iter()
            .filter(|t| t.state == TaskState::Assigned)
            .count()
    };
    assert_eq!(
        (running(c, j1), running(c, j2)),
        (2, 2),
        "FIFO would have given job 1 all four"
    );
}

#[test]
fn borrowed_capacity_is_reclaimed_by_preemption_without_using_retries() {
    let mut f = fixture();
    let c = &mut f.core;
    let n = c.register(reg("a", 4, 0), 0).unwrap();
    let (a, _) = c
        .create_tenant(
            "owner",
            1.0,
            Quota::default(),
            Quota::parse("cpu=4").unwrap(),
            0,
        )
        .unwrap();
    let (b, _) = c
        .create_tenant("borrower", 1.0, Quota::default(), Quota::default(), 0)
        .unwrap();
    // B borrows all four CPUs while A is idle.
    let mut spec = JobSpec::simple("train", &[]);
    spec.tasks = 4;
    let jb = c.submit(b.id, spec, 0).unwrap();
    c.schedule(1).unwrap();
    for (i, r) in runs_on(c, n).into_iter().enumerate() {
        started(c, n, r, 10 + i as i64);
    }
    assert!(
        c.runs.values().all(|r| r.borrowed),
        "placed beyond B's (empty) guarantee"
    );
    // A asks for two CPUs of its guarantee.
    let mut spec = JobSpec::simple("serve", &[]);
    spec.tasks = 2;
    let ja = c.submit(a.id, spec, 100).unwrap();
    c.schedule(101).unwrap();
    assert_eq!(c.jobs[&ja].reasons[0].code, "preempting");
    let victims: Vec<RunId> = stopping_for_preemption(c).iter().map(|v| v.0).collect();
    assert_eq!(victims.len(), 2);
    assert_eq!(
        runs_on(c, n).len(),
        2,
        "the agent is told to stop the victims"
    );
    // Nothing more is preempted while the victims checkpoint.
    c.schedule(102).unwrap();
    assert_eq!(c.runs.values().filter(|r| r.stop.is_some()).count(), 2);
    for (k, v) in victims.iter().enumerate() {
        c.apply_event(
            n,
            RunEvent::Exited {
                run: *v,
                started_ms: Some(10),
                at_ms: 200,
                exit_code: Some(143),
                signal: None,
                reason: ExitReason::Killed,
                message: String::new(),
                checkpoint: None,
            },
            200,
        )
        .unwrap();
        // Between the two exits the borrower's requeued task must not slip into the room
        // the first victim freed: it is reserved for the owner, who gets both at the end.
        let placed = c.schedule(201).unwrap().placed;
        assert_eq!(placed, if k == 0 { 0 } else { 2 });
    }
    let j = &c.jobs[&jb];
    assert_eq!(
        j.tasks
            .iter()
            .filter(|t| t.state == TaskState::Pending)
            .count(),
        2
    );
    assert!(
        j.tasks.iter().all(|t| t.retries_used == 0),
        "preemption uses no retry"
    );
    assert!(
        c.jobs[&ja]
            .tasks
            .iter()
            .all(|t| t.state == TaskState::Assigned),
        "placed as soon as the room was free"
    );
    assert!(c.jobs[&ja]
        .tasks
        .iter()
        .all(|t| t.state == TaskState::Assigned));
    let runs = c.read(move |s| s.runs_of_job(jb)).unwrap();
    assert_eq!(
        runs.iter()
            .filter(|r| r.state == RunState::Preempted)
            .count(),
        2
    );
    assert_eq!(
        c.read(move |s| s.usage(&UsageFilter {
            tenant: None,
            job: Some(jb)
        }))
        .unwrap()
        .len(),
        2,
        "preempted runs are metered"
    );
}

/// The runs told to stop for a preemptor (as run, node).
fn stopping_for_preemption(c: &Core) -> Vec<(RunId, NodeId)> {
    c.runs
        .values()
        .filter(|r| r.stop == Some(StopReason::Preempt))
        .map(|r| (r.id, r.node))
        .collect()
}

/// Two 4-CPU nodes: tenant X's 4-CPU job holds one, four started spot tasks fill the
/// other. Returns X, a tenant Y holding nothing, and the 4-CPU job spec.
fn x_holds_a_node_and_spot_work_fills_the_other(c: &mut Core) -> (TenantId, TenantId, JobSpec) {
    let na = c.register(reg("a", 4, 0), 0).unwrap();
    let nb = c.register(reg("b", 4, 0), 0).unwrap();
    let mk = |c: &mut Core, name: &str| {
        c.create_tenant(name, 1.0, Quota::default(), Quota::default(), 0)
            .unwrap()
            .0
            .id
    };
    let (x, y, s) = (mk(c, "x"), mk(c, "y"), mk(c, "spot"));
    let mut four = JobSpec::simple("train", &[]);
    four.resources.cpu_milli = 4000;
    c.submit(x, four.clone(), 0).unwrap();
    c.schedule(1).unwrap();
    let mut spot = JobSpec::simple("sweep", &[]);
    spot.tasks = 4;
    spot.priority = Priority::Spot;
    c.submit(s, spot, 2).unwrap();
    c.schedule(3).unwrap();
    for n in [na, nb] {
        for r in runs_on(c, n) {
            started(c, n, r, 5);
        }
    }
    (x, y, four)
}

#[test]
fn room_freed_by_preemption_is_held_for_the_preemptor_when_the_victims_exit() {
    let mut f = fixture();
    let c = &mut f.core;
    let (x, y, four) = x_holds_a_node_and_spot_work_fills_the_other(c);
    // X's second job preempts the spot tasks; while they checkpoint Y (holding nothing, so
    // first in fair-share order) asks for the same room and cannot preempt them again.
    let jx = c.submit(x, four.clone(), 10).unwrap();
    c.schedule(11).unwrap();
    assert_eq!(c.jobs[&jx].reasons[0].code, "preempting");
    let jy = c.submit(y, four, 12).unwrap();
    c.schedule(13).unwrap();
    let victims = stopping_for_preemption(c);
    assert_eq!(victims.len(), 4);
    for (v, n) in victims {
        exited(c, n, v, 5, 20, 143);
    }
    c.schedule(21).unwrap();
    assert_eq!(
        c.jobs[&jx].tasks[0].state,
        TaskState::Assigned,
        "the room went to the job that preempted for it"
    );
    assert_eq!(c.jobs[&jy].tasks[0].state, TaskState::Pending);
    assert!(
        c.runs.values().all(|r| r.stop.is_none()),
        "nothing preempted twice"
    );
}

#[test]
fn a_gang_held_to_a_rack_preempts_spot_work_inside_one_rack_and_starts_there() {
    let mut f = fixture();
    let c = &mut f.core;
    let mut rack_of = HashMap::new();
    for (name, rack) in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")] {
        let mut r = reg(name, 2, 0);
        r.topology.rack = rack.into();
        let n = c.register(r, 0).unwrap();
        rack_of.insert(n, rack);
    }
    let t = default_tenant(c);
    let mut spot = JobSpec::simple("sweep", &[]);
    spot.tasks = 4;
    spot.resources.cpu_milli = 2000;
    spot.priority = Priority::Spot;
    c.submit(t, spot, 0).unwrap();
    c.schedule(1).unwrap();
    for n in rack_of.keys().copied().collect::<Vec<_>>() {
        for r in runs_on(c, n) {
            started(c, n, r, 2);
        }
    }
    let mut gang = JobSpec::simple("train", &[]);
    gang.tasks = 2;
    gang.gang = true;
    gang.resources.cpu_milli = 2000;
    gang.topology = Some(TopologyLevel::Rack);
    let g = c.submit(t, gang, 10).unwrap();
    c.schedule(11).unwrap();
    assert_eq!(
        c.jobs[&g].reasons[0].code, "preempting",
        "{:?}",
        c.jobs[&g].reasons
    );
    let victims = stopping_for_preemption(c);
    let racks: BTreeSet<&str> = victims.iter().map(|(_, n)| rack_of[n]).collect();
    assert_eq!(
        (victims.len(), racks.len()),
        (2, 1),
        "two victims, one rack"
    );
    for (v, n) in victims {
        exited(c, n, v, 2, 20, 143);
    }
    c.schedule(21).unwrap();
    let placed: BTreeSet<&str> = c
        .runs
        .values()
        .filter(|r| r.job == g)
        .map(|r| rack_of[&r.node])
        .collect();
    assert_eq!(placed.len(), 1);
    assert_eq!(
        c.jobs[&g]
            .tasks
            .iter()
            .filter(|t| t.state == TaskState::Assigned)
            .count(),
        2
    );
}

#[test]
fn the_head_job_holds_a_reservation_and_only_short_jobs_backfill() {
    let mut f = fixture();
    let c = &mut f.core;
    let n = c.register(reg("a", 8, 0), 0).unwrap();
    let t = default_tenant(c);
    let mut busy = JobSpec::simple("sleep", &["60"]);
    busy.tasks = 4;
    busy.max_runtime_ms = Some(60_000);
    c.submit(t, busy, 0).unwrap();
    c.schedule(1).unwrap();
    for r in runs_on(c, n) {
        started(c, n, r, 1_000);
    }
    let mut big = JobSpec::simple("train", &[]);
    big.resources.cpu_milli = 8000;
    let head = c.submit(t, big, 2_000).unwrap();
    let mut long = JobSpec::simple("sleep", &["600"]);
    long.max_runtime_ms = Some(600_000);
    let long = c.submit(t, long, 2_001).unwrap();
    let mut short = JobSpec::simple("true", &[]);
    short.max_runtime_ms = Some(10_000);
    let short = c.submit(t, short, 2_002).unwrap();
    c.schedule(3_000).unwrap();
    let r = c.jobs[&head]
        .reasons
        .iter()
        .find(|r| r.code == "reserved")
        .expect("reservation");
    assert_eq!(
        r.counts["starts_in_ms"], 58_000,
        "when the busy tasks reach their max runtime"
    );
    assert_eq!(
        c.jobs[&long]
            .reasons
            .iter()
            .find(|r| r.code == "backfill")
            .unwrap()
            .counts["reserved_for_job"],
        head.0
    );
    assert_eq!(
        c.jobs[&short].tasks[0].state,
        TaskState::Assigned,
        "ends before the reservation: backfilled"
    );
}

#[test]
fn with_two_reservations_the_second_waiting_job_keeps_its_start_too() {
    for reservations in [1, 2] {
        let mut f = fixture();
        let c = &mut f.core;
        c.sched_cfg.reservations = reservations;
        let t = default_tenant(c);
        // Node a full until t=61 s, half of node b busy until t=121 s (b joins once a is
        // full, so b's busy tasks cannot land on a).
        for (name, tasks, ms) in [("a", 8, 60_000), ("b", 4, 120_000)] {
            let node = c.register(reg(name, 8, 0), 0).unwrap();
            let mut busy = JobSpec::simple("sleep", &["60"]);
            busy.tasks = tasks;
            busy.max_runtime_ms = Some(ms);
            c.submit(t, busy, 0).unwrap();
            c.schedule(1).unwrap();
            let runs = runs_on(c, node);
            assert_eq!(runs.len(), tasks as usize, "node {name}");
            for r in runs {
                started(c, node, r, 1_000);
            }
        }
        let whole = |c: &mut Core, at| {
            let mut s = JobSpec::simple("train", &[]);
            s.resources.cpu_milli = 8000;
            c.submit(t, s, at).unwrap()
        };
        let first = whole(c, 2_000);
        let second = whole(c, 2_001);
        let mut long = JobSpec::simple("sleep", &["600"]);
        long.max_runtime_ms = Some(600_000);
        let long = c.submit(t, long, 2_002).unwrap();
        c.schedule(3_000).unwrap();
        let reserved = |c: &Core, j| c.jobs[&j].reasons.iter().any(|r| r.code == "reserved");
        assert!(reserved(c, first));
        assert_eq!(reserved(c, second), reservations == 2);
        // EASY protects only the first job's start: the long job takes node b and delays
        // the second by ten minutes. With two, it waits for room no reservation holds.
        let long_placed = c.jobs[&long].tasks[0].state == TaskState::Assigned;
        assert_eq!(
            long_placed,
            reservations == 1,
            "reservations {reservations}"
        );
        if reservations == 2 {
            let r = c.jobs[&long]
                .reasons
                .iter()
                .find(|r| r.code == "backfill")
                .expect("held");
            assert_eq!(r.counts["reserved_for_job"], second.0);
        }
    }
}

#[test]
fn least_attained_service_preempts_a_long_job_for_a_new_one_and_remembers_service() {
    let mut f = fixture();
    let c = &mut f.core;
    // One GPU-minute is the boundary between the two queues.
    let las = caravel_sched::Las {
        thresholds_gpu_s: vec![60],
        min_slice_ms: 0,
    };
    c.sched_cfg.las = Some(las.clone());
    let n = c.register(reg("g", 4, 1), 0).unwrap();
    let t = default_tenant(c);
    let gpu_job = || {
        let mut s = JobSpec::simple("train", &[]);
        s.resources = TaskResources {
            needs: Default::default(),
            cpu_milli: 1000,
            memory_bytes: 1 << 30,
            gpu: Some(caravel_core::GpuRequest::whole("H100", 1)),
        };
        s
    };
    let ja = c.submit(t, gpu_job(), 0).unwrap();
    c.schedule(1).unwrap();
    let ra = runs_on(c, n)[0];
    started(c, n, ra, 10);
    let jb = c.submit(t, gpu_job(), 30_000).unwrap();
    // 30 GPU-seconds in: both jobs are in the first queue, so B waits.
    c.schedule(30_001).unwrap();
    assert!(c.runs.values().all(|r| r.stop.is_none()));
    assert_ne!(c.jobs[&jb].reasons[0].code, "preempting");
    // 100 GPU-seconds in: A has passed into the second queue and B preempts it.
    c.schedule(100_000).unwrap();
    assert_eq!(c.jobs[&jb].reasons[0].code, "preempting");
    assert_eq!(c.runs[&ra].stop, Some(StopReason::Preempt));
    c.apply_event(
        n,
        RunEvent::Exited {
            run: ra,
            started_ms: Some(10),
            at_ms: 100_500,
            exit_code: Some(143),
            signal: None,
            reason: ExitReason::Killed,
            message: String::new(),
            checkpoint: None,
        },
        100_500,
    )
    .unwrap();
    assert_eq!(c.schedule(100_501).unwrap().placed, 1);
    let rb = runs_on(c, n)[0];
    assert_eq!(c.runs[&rb].job, jb);
    started(c, n, rb, 101_000);
    // A, requeued with 100 GPU-seconds, never preempts B: not while B is in the first
    // queue, nor once both are in the second.
    for now in [130_000, 500_000] {
        c.schedule(now).unwrap();
        assert!(c.runs.values().all(|r| r.stop.is_none()), "at {now}");
        assert_eq!(c.jobs[&ja].tasks[0].state, TaskState::Pending);
    }
    assert_eq!(c.attained[&ja], 100_490);

    // After a restart the service A received is read back from its usage records. (Dropping
    // the core waits for its queued commits, as the API waits before it answers.)
    drop(f.core);
    let mut c2 = open(f.dir.path(), 600_000);
    c2.sched_cfg.las = Some(las);
    c2.schedule(600_001).unwrap();
    assert_eq!(c2.attained[&ja], 100_490);
}

#[test]
fn a_gang_that_waited_past_the_starvation_limit_has_nodes_drained_and_starts() {
    let mut f = fixture();
    let c = &mut f.core;
    let na = c.register(reg("a", 4, 0), 0).unwrap();
    let nb = c.register(reg("b", 4, 0), 0).unwrap();
    let t = default_tenant(c);
    let mut small = JobSpec::simple("work", &[]);
    small.resources.cpu_milli = 2000;
    for _ in 0..4 {
        c.submit(t, small.clone(), 0).unwrap();
    }
    c.schedule(1).unwrap();
    for n in [na, nb] {
        for r in runs_on(c, n) {
            started(c, n, r, 2);
        }
    }
    // A gang needing both nodes whole, behind which small jobs keep arriving.
    let mut gang = JobSpec::simple("train", &[]);
    gang.tasks = 2;
    gang.gang = true;
    gang.resources.cpu_milli = 4000;
    let g = c.submit(t, gang, 10).unwrap();
    let queued: Vec<JobId> = (0..4)
        .map(|k| c.submit(t, small.clone(), 11 + k).unwrap())
        .collect();
    c.starvation_ms = 1_000;
    c.schedule(20).unwrap();
    let assigned = |c: &Core, j: JobId| c.jobs[&j].tasks[0].state == TaskState::Assigned;

    // Before the limit, a freed half goes to the next small job, as it always would.
    let r = runs_on(c, na)[0];
    exited(c, na, r, 2, 500, 0);
    c.schedule(501).unwrap();
    assert!(assigned(c, queued[0]), "{:?}", c.jobs[&queued[0]].reasons);
    for r in runs_on(c, na) {
        if c.runs[&r].started_ms.is_none() {
            started(c, na, r, 502);
        }
    }

    // Past it, freed room stays empty for the gang, and the small jobs say why.
    let r = runs_on(c, nb)[0];
    exited(c, nb, r, 2, 1_500, 0);
    c.schedule(1_501).unwrap();
    assert!(
        !assigned(c, queued[1]),
        "no small job starts on a drained node"
    );
    assert_eq!(c.jobs[&g].reasons[0].code, "gang");
    assert!(
        c.jobs[&g].reasons.iter().any(|r| r.code == "draining"),
        "{:?}",
        c.jobs[&g].reasons
    );
    assert!(
        c.jobs[&queued[1]]
            .reasons
            .iter()
            .any(|r| r.code == "backfill" && r.counts["reserved_for_job"] == g.0),
        "{:?}",
        c.jobs[&queued[1]].reasons
    );

    // Once the nodes are empty the gang starts.
    for n in [na, nb] {
        for r in runs_on(c, n) {
            exited(c, n, r, 2, 2_000, 0);
        }
    }
    c.schedule(2_001).unwrap();
    assert!(
        c.jobs[&g]
            .tasks
            .iter()
            .all(|t| t.state == TaskState::Assigned),
        "{:?}",
        c.jobs[&g].reasons
    );
    assert!(!assigned(c, queued[1]));
}

#[test]
fn room_freed_just_before_a_server_restart_is_still_held_for_the_preemptor() {
    let mut f = fixture();
    let c = &mut f.core;
    let (x, y, four) = x_holds_a_node_and_spot_work_fills_the_other(c);
    let jx = c.submit(x, four.clone(), 10).unwrap();
    c.schedule(11).unwrap();
    let victims = stopping_for_preemption(c);
    assert_eq!(victims.len(), 4);
    // The victims exit, and the server dies before the cycle that would hold their room
    // for X's job: the reloaded server holds it all the same.
    for (v, n) in &victims {
        exited(c, *n, *v, 5, 20, 143);
    }
    drop(f.core);
    let mut c = open(f.dir.path(), 21);
    // Y holds nothing, so it is first in fair-share order.
    let jy = c.submit(y, four, 21).unwrap();
    c.schedule(22).unwrap();
    assert_eq!(
        c.jobs[&jx].tasks[0].state,
        TaskState::Assigned,
        "the room went to the job that preempted for it"
    );
    assert_eq!(c.jobs[&jy].tasks[0].state, TaskState::Pending);
}

#[test]
fn a_preemptor_keeps_waiting_for_its_victims_across_a_server_restart() {
    let mut f = fixture();
    let c = &mut f.core;
    let (x, y, four) = x_holds_a_node_and_spot_work_fills_the_other(c);
    let jx = c.submit(x, four.clone(), 10).unwrap();
    c.schedule(11).unwrap();
    assert_eq!(c.jobs[&jx].reasons[0].code, "preempting");
    let victims = stopping_for_preemption(c);
    assert_eq!(victims.len(), 4);
    drop(f.core);

    // "kill -9" while the victims checkpoint: the reloaded server knows X's job waits for
    // them, so Y's job (first in fair-share order) cannot preempt them again, and X's job
    // asks for nothing more.
    let mut c = open(f.dir.path(), 12);
    for (v, _) in &victims {
        assert_eq!(c.runs[v].preempted_for, Some(jx), "the claim is stored");
    }
    let jy = c.submit(y, four, 12).unwrap();
    c.schedule(13).unwrap();
    let stopping = stopping_for_preemption(&c).len();
    assert_eq!(stopping, 4, "nothing preempted twice");
    for (v, n) in victims {
        exited(&mut c, n, v, 5, 20, 143);
    }
    c.schedule(21).unwrap();
    assert_eq!(
        c.jobs[&jx].tasks[0].state,
        TaskState::Assigned,
        "the room went to the job that preempted for it"
    );
    assert_eq!(c.jobs[&jy].tasks[0].state, TaskState::Pending);
}

#[test]
fn a_node_shut_down_cleanly_hands_its_runs_back_without_using_retries() {
    let mut f = fixture();
    let c = &mut f.core;
    let a = c.register(reg("a", 2, 0), 0).unwrap();
    let t = default_tenant(c);
    let j1 = c.submit(t, JobSpec::simple("sleep", &["100"]), 0).unwrap();
    let j2 = c.submit(t, JobSpec::simple("sleep", &["100"]), 0).unwrap();
    assert_eq!(c.schedule(1).unwrap().placed, 2);
    let runs = runs_on(c, a);
    let (r1, r2) = if c.runs[&runs[0]].job == j1 {
        (runs[0], runs[1])
    } else {
        (runs[1], runs[0])
    };
    started(c, a, r1, 5);
    // r2 was assigned but its start not reported yet.
    assert_eq!(c.shutdown_node(a, "a-1", 10).unwrap(), 1);
    assert_eq!(c.nodes[&a].node.state, NodeState::Down);
    assert!(
        runs_on(c, a).is_empty(),
        "the agent is told to stop everything"
    );
    assert_eq!(
        c.jobs[&j2].tasks[0].state,
        TaskState::Pending,
        "requeued at once"
    );
    assert_eq!(
        c.read(move |s| s.run(r2)).unwrap().unwrap().state,
        RunState::Preempted
    );
    assert_eq!(
        c.schedule(11).unwrap().placed,
        0,
        "nothing goes to a down node"
    );
    // The started one ends when the agent reports its exit (it honoured SIGTERM).
    c.apply_event(
        a,
        RunEvent::Exited {
            run: r1,
            started_ms: Some(5),
            at_ms: 2_000,
            exit_code: None,
            signal: Some(15),
            reason: ExitReason::Killed,
            message: String::new(),
            checkpoint: None,
        },
        2_000,
    )
    .unwrap();
    let rec = c.read(move |s| s.run(r1)).unwrap().unwrap();
    assert_eq!(rec.state, RunState::Preempted);
    assert!(rec.message.contains("node a shut down"), "{}", rec.message);
    for j in [j1, j2] {
        assert_eq!(c.jobs[&j].rec.state, JobState::Pending);
        assert_eq!(c.jobs[&j].tasks[0].retries_used, 0);
    }
    let u = c.read(|s| s.usage(&UsageFilter::default())).unwrap();
    assert_eq!(u.len(), 1, "the started run is metered once, to its exit");
    assert_eq!(u[0].end_ms, 2_000);
    assert!(
        c.check_liveness(100_000, 10_000).unwrap().is_empty(),
        "a node that left cleanly is not lost"
    );
    // The agent comes back: the node is ready and the work runs again.
    let mut again = reg("a", 2, 0);
    again.instance = "a-2".into();
    c.register(again, 100_001).unwrap();
    assert_eq!(c.nodes[&a].node.state, NodeState::Ready);
    assert_eq!(c.schedule(100_002).unwrap().placed, 2);
}

#[test]
fn a_node_whose_agent_vanishes_mid_shutdown_is_lost_with_what_it_still_held() {
    let mut f = fixture();
    let c = &mut f.core;
    let a = c.register(reg("a", 2, 0), 0).unwrap();
    let j = c
        .submit(default_tenant(c), JobSpec::simple("sleep", &["100"]), 0)
        .unwrap();
    c.schedule(1).unwrap();
    let r = runs_on(c, a)[0];
    started(c, a, r, 5);
    assert_eq!(c.shutdown_node(a, "a-1", 10).unwrap(), 1);
    assert!(c.check_liveness(5_000, 10_000).unwrap().is_empty());
    assert_eq!(
        c.check_liveness(20_000, 10_000).unwrap(),
        vec!["a".to_string()]
    );
    assert_eq!(c.nodes[&a].node.state, NodeState::Lost);
    assert_eq!(
        c.read(move |s| s.run(r)).unwrap().unwrap().state,
        RunState::Lost
    );
    assert_eq!(c.jobs[&j].rec.state, JobState::Failed, "no retries left");
}

#[test]
fn only_the_agent_instance_that_runs_the_node_may_shut_it_down() {
    let mut f = fixture();
    let c = &mut f.core;
    let a = c.register(reg("a", 2, 0), 0).unwrap();
    let e = c.shutdown_node(a, "someone-else", 1).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Conflict);
    assert_eq!(c.nodes[&a].node.state, NodeState::Ready);
    assert!(c.shutdown_node(NodeId(99), "a-1", 1).is_err());
}

#[test]
fn a_task_no_node_can_hold_is_refused_naming_what_is_short() {
    let cap = |cpus: u64, mem_gib: u64, gpus: u32| Capacity {
        isolation: Default::default(),
        images: false,
        cpu_milli: cpus * 1000,
        memory_bytes: mem_gib << 30,
        devices: (0..gpus)
            .map(|i| Device {
                index: i,
                model: "H100".into(),
            })
            .collect(),
    };
    // A big CPU node, and a small one with the GPUs.
    let caps = [cap(64, 512, 0), cap(8, 64, 2)];
    let ask = |cpu: u64, mem_gib: u64, gpu: Option<GpuRequest>| TaskResources {
        needs: Default::default(),
        cpu_milli: cpu,
        memory_bytes: mem_gib << 30,
        gpu,
    };
    let check = |r: TaskResources, field: &str, text: &str| {
        assert!(!caravel_sched::fits_when_empty(&caps, &r));
        let e = too_large(&caps, &r);
        assert_eq!(e.code(), ErrorCode::Unschedulable);
        assert_eq!(e.field(), Some(field), "{}", e);
        assert!(e.to_string().contains(text), "{}", e);
    };
    check(
        ask(65_000, 1, None),
        "resources.cpu_milli",
        "asks for 65 CPUs; the largest node has 64",
    );
    check(
        ask(1000, 600, None),
        "resources.memory_bytes",
        "asks for 600Gi of memory; the largest node has 512Gi",
    );
    check(
        ask(1000, 1, Some(GpuRequest::whole("H100", 4))),
        "resources.gpu.count",
        "asks for 4 `H100` GPUs; the most on one node is 2",
    );
    // Each alone fits somewhere, but not together.
    check(
        ask(16_000, 1, Some(GpuRequest::whole("H100", 1))),
        "resources",
        "no node has 16 CPUs, 1Gi of memory and 1 `H100` GPUs together",
    );
}

#[test]
fn a_gang_with_a_member_on_a_node_shut_down_cleanly_restarts_whole_without_using_retries() {
    let mut f = fixture();
    let c = &mut f.core;
    let a = c.register(reg("a", 1, 0), 0).unwrap();
    let b = c.register(reg("b", 1, 0), 0).unwrap();
    let mut spec = JobSpec::simple("train", &[]);
    spec.tasks = 2;
    spec.gang = true;
    let j = c.submit(default_tenant(c), spec, 0).unwrap();
    assert_eq!(c.schedule(1).unwrap().placed, 2);
    let (ra, rb) = (runs_on(c, a)[0], runs_on(c, b)[0]);
    started(c, a, ra, 2);
    started(c, b, rb, 2);
    assert_eq!(c.shutdown_node(a, "a-1", 10).unwrap(), 1);
    let killed = |c: &mut Core, n: NodeId, r: RunId, at: Millis| {
        c.apply_event(
            n,
            RunEvent::Exited {
                run: r,
                started_ms: Some(2),
                at_ms: at,
                exit_code: None,
                signal: Some(15),
                reason: ExitReason::Killed,
                message: String::new(),
                checkpoint: None,
            },
            at,
        )
        .unwrap();
    };
    killed(c, a, ra, 20);
    assert!(runs_on(c, b).is_empty(), "the mate on b is told to stop");
    killed(c, b, rb, 30);
    assert_eq!(c.jobs[&j].rec.state, JobState::Pending);
    assert!(c.jobs[&j].tasks.iter().all(|t| t.retries_used == 0));
    assert_eq!(c.schedule(40).unwrap().placed, 0, "one node cannot hold it");
    let mut back = reg("a", 1, 0);
    back.instance = "a-2".into();
    c.register(back, 50).unwrap();
    assert_eq!(c.schedule(60).unwrap().placed, 2, "whole gang placed again");
}

#[test]
fn pending_reasons_say_why_nodes_are_not_ready() {
    let mut f = fixture();
    let c = &mut f.core;
    let a = c.register(reg("a", 1, 0), 0).unwrap();
    let b = c.register(reg("b", 1, 0), 0).unwrap();
    c.register(reg("c", 1, 0), 0).unwrap();
    c.set_drained("a", true).unwrap();
    c.shutdown_node(b, "b-1", 1).unwrap();
    c.heartbeat(a, "a-1", 15_000).unwrap();
    assert_eq!(
        c.check_liveness(20_000, 10_000).unwrap(),
        vec!["c".to_string()]
    );
    let j = c
        .submit(default_tenant(c), JobSpec::simple("x", &[]), 20_001)
        .unwrap();
    assert_eq!(c.schedule(20_002).unwrap().placed, 0);
    let r = &c.jobs[&j].reasons[0];
    assert_eq!(
        r.message,
        "no node fits: 1 node down, 1 node drained, 1 node lost"
    );
    assert_eq!(r.counts["drained"], 1);
}

#[test]
fn a_submission_repeated_with_its_idempotency_key_makes_one_job() {
    let mut f = fixture();
    let t = f.core.tenant_id(DEFAULT_TENANT).unwrap();
    let (other, _) = f
        .core
        .create_tenant("other", 1.0, Quota::default(), Quota::default(), 0)
        .unwrap();
    let spec = JobSpec::simple("echo", &["hi"]);
    let key = || Some("retry-me".to_string());
    let (id, created) = f.core.submit_idempotent(t, spec.clone(), key(), 1).unwrap();
    assert!(created);
    assert_eq!(
        f.core.submit_idempotent(t, spec.clone(), key(), 2).unwrap(),
        (id, false),
        "a repeat names the first job"
    );
    let e = f
        .core
        .submit_idempotent(t, JobSpec::simple("echo", &["bye"]), key(), 3)
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Conflict);
    assert_eq!(e.field(), Some("Idempotency-Key"));
    assert!(e.to_string().contains(&format!("job {id}")), "{}", e);
    // Keys are per tenant; no key always makes a new job.
    let (theirs, created) = f
        .core
        .submit_idempotent(other.id, spec.clone(), key(), 4)
        .unwrap();
    assert!(created && theirs != id);
    let (plain, created) = f.core.submit_idempotent(t, spec.clone(), None, 5).unwrap();
    assert!(created && plain != id);
    for bad in ["", "has space", &"k".repeat(256)] {
        let e = f
            .core
            .submit_idempotent(t, spec.clone(), Some(bad.to_string()), 6)
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidArgument, "{bad:?}");
        assert_eq!(e.field(), Some("Idempotency-Key"));
    }
    // Durable: a restarted server still knows the key.
    let jobs = f.core.jobs.len();
    drop(f.core);
    let mut core = open(f.dir.path(), 10);
    assert_eq!(
        core.submit_idempotent(t, spec, key(), 11).unwrap(),
        (id, false)
    );
    assert_eq!(core.jobs.len(), jobs);
}

fn one_cpu(cpus: u64) -> JobSpec {
    let mut s = JobSpec::simple("sleep", &["9"]);
    s.resources.cpu_milli = cpus * 1000;
    s
}

/// The run of each assigned task, oldest job first.
fn assigned_runs(c: &Core) -> Vec<(RunId, NodeId)> {
    c.runs
        .values()
        .filter(|r| r.state == RunState::Assigned)
        .map(|r| (r.id, r.node))
        .collect()
}

#[test]
fn a_long_queue_of_one_shape_is_offered_only_as_deep_as_the_pool_could_hold() {
    let mut f = fixture();
    let c = &mut f.core;
    let n = c.register(reg("a", 4, 0), 0).unwrap();
    let t = default_tenant(c);
    for i in 0..4 {
        c.submit(t, one_cpu(1), i).unwrap();
    }
    let first = c.schedule(10).unwrap();
    assert!(first.full);
    assert_eq!(first.placed, 4);
    for (run, node) in assigned_runs(c) {
        started(c, node, run, 20);
    }
    let queued: Vec<JobId> = (0..100)
        .map(|i| c.submit(t, one_cpu(1), 30 + i).unwrap())
        .collect();
    // The tasks' start makes them possible victims: a full pass, over only as many jobs
    // of the shape as the pool could hold (4 tasks; and more than the one reservation).
    let pass = c.schedule(200).unwrap();
    assert!(pass.full);
    assert_eq!((pass.considered_jobs, pass.placed), (4, 0));
    // Nothing freed, nothing new: the next pass offers nothing.
    let idle = c.schedule(300).unwrap();
    assert_eq!((idle.considered_jobs, idle.full), (0, false));
    // A job that arrives meanwhile is offered on its own.
    let late = c.submit(t, one_cpu(2), 310).unwrap();
    let inc = c.schedule(320).unwrap();
    assert_eq!((inc.considered_jobs, inc.full), (1, false));
    assert_eq!(c.reasons_of(&c.jobs[&late])[0].code, "no_fit");
    // The jobs left out say what the last one offered says.
    let last = *queued.last().unwrap();
    let shown = c.reasons_of(&c.jobs[&last]);
    assert_eq!(shown[0].code, "no_fit", "{shown:?}");
    assert_eq!(shown, c.reasons_of(&c.jobs[&queued[4]]));
    // Room freed: the oldest waiting job takes it.
    let (run, _) = c.runs.iter().next().map(|(r, x)| (*r, x.node)).unwrap();
    exited(c, n, run, 20, 400, 0);
    let after = c.schedule(410).unwrap();
    assert!(after.full);
    assert_eq!(after.placed, 1);
    assert_eq!(
        c.jobs[&queued[0]].tasks[0].state,
        TaskState::Assigned,
        "FIFO within the class"
    );
    // However quiet, the whole queue is looked at again after FULL_PASS_EVERY_MS.
    assert!(!c.schedule(420).unwrap().full);
    assert!(c.schedule(410 + FULL_PASS_EVERY_MS).unwrap().full);
}

#[test]
fn a_new_node_gets_waiting_work_and_a_gap_spaces_full_passes() {
    let mut f = fixture();
    let c = &mut f.core;
    c.register(reg("a", 2, 0), 0).unwrap();
    let t = default_tenant(c);
    let jobs: Vec<JobId> = (0..6)
        .map(|i| c.submit(t, one_cpu(1), i).unwrap())
        .collect();
    assert_eq!(c.schedule(10).unwrap().placed, 2);
    c.set_full_pass_gap(1_000);
    c.register(reg("b", 2, 0), 20).unwrap();
    // Wanted, but not before the gap has passed since the last full pass.
    assert_eq!(c.full_pass_due(), Some(1_010));
    let early = c.schedule(30).unwrap();
    assert_eq!((early.full, early.placed), (false, 0));
    let due = c.schedule(1_010).unwrap();
    assert_eq!((due.full, due.placed), (true, 2));
    assert_eq!(c.full_pass_due(), None);
    for j in &jobs[..4] {
        assert_eq!(c.jobs[j].tasks[0].state, TaskState::Assigned);
    }
}

#[test]
fn a_reservation_keeps_every_pass_full_so_new_work_cannot_take_its_room() {
    let mut f = fixture();
    let c = &mut f.core;
    let n = c.register(reg("a", 4, 0), 0).unwrap();
    let t = default_tenant(c);
    // Two long tasks with declared runtimes hold 2 of 4 CPUs; a 4-CPU job waits with a
    // reservation at their end.
    for i in 0..2 {
        let mut s = one_cpu(1);
        s.max_runtime_ms = Some(60_000);
        c.submit(t, s, i).unwrap();
    }
    c.schedule(10).unwrap();
    for (run, node) in assigned_runs(c) {
        started(c, node, run, 20);
    }
    let big = c.submit(t, one_cpu(4), 30).unwrap();
    c.schedule(40).unwrap();
    assert!(
        c.reasons_of(&c.jobs[&big])
            .iter()
            .any(|r| r.code == "reserved"),
        "{:?}",
        c.jobs[&big].reasons
    );
    // A long job that would run past the reservation may not take the free 2 CPUs.
    let mut long = one_cpu(2);
    long.max_runtime_ms = Some(3_600_000);
    let l = c.submit(t, long, 50).unwrap();
    let pass = c.schedule(60).unwrap();
    assert!(
        pass.full,
        "a held reservation is planned against the whole queue"
    );
    assert_eq!(c.jobs[&l].tasks[0].state, TaskState::Pending);
    let _ = n;
}

/// A small seeded generator (no dependency): the same seed, the same sequence.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn passes_over_new_work_and_capped_classes_place_exactly_what_full_passes_would() {
    for seed in 0..12u64 {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut fast = open(da.path(), 0);
        let mut full = open(db.path(), 0);
        full.exhaustive = true;
        let mut rng = Lcg(seed);
        let mut tenants = vec![];
        for (i, c) in [&mut fast, &mut full].into_iter().enumerate() {
            let n1 = c.register(reg("a", 4, 0), 0).unwrap();
            let n2 = c.register(reg("b", 6, 0), 0).unwrap();
            let (x, _) = c
                .create_tenant(
                    "x",
                    1.0,
                    Quota::parse("cpu=6").unwrap(),
                    Quota::default(),
                    0,
                )
                .unwrap();
            let (y, _) = c
                .create_tenant(
                    "y",
                    2.0,
                    Quota::default(),
                    Quota::parse("cpu=4").unwrap(),
                    0,
                )
                .unwrap();
            if i == 0 {
                tenants = vec![(x.id, n1), (y.id, n2)];
            }
        }
        let mut now = 1;
        for step in 0..250 {
            now += 1 + rng.next(30) as i64;
            match rng.next(10) {
                // Submit: a few shapes and priorities, sometimes several tasks.
                0..=4 => {
                    let mut s = one_cpu(1 + rng.next(3));
                    s.tasks = if rng.next(5) == 0 { 2 } else { 1 };
                    s.priority = match rng.next(4) {
                        0 => Priority::Spot,
                        1 => Priority::Online,
                        _ => Priority::Batch,
                    };
                    if rng.next(3) == 0 {
                        s.max_runtime_ms = Some(1_000 * (1 + rng.next(4)));
                    }
                    let t = tenants[rng.next(2) as usize].0;
                    // Sometimes a burst of one class, deeper than the pool.
                    let copies = if rng.next(4) == 0 { 12 } else { 1 };
                    for _ in 0..copies {
                        let a = fast.submit(t, s.clone(), now).map_err(|e| e.to_string());
                        let b = full.submit(t, s.clone(), now).map_err(|e| e.to_string());
                        assert_eq!(a, b, "seed {seed} step {step}");
                    }
                }
                // Every task that started ends at once (a burst of freed room).
                5 if rng.next(3) == 0 => {
                    let runs: Vec<(RunId, NodeId, Option<Millis>)> = fast
                        .runs
                        .values()
                        .filter(|r| r.state == RunState::Running)
                        .map(|r| (r.id, r.node, r.started_ms))
                        .collect();
                    for (run, node, at) in runs {
                        for c in [&mut fast, &mut full] {
                            exited(c, node, run, at.unwrap_or(now), now, 0);
                        }
                    }
                }
                // A running or assigned task ends (or starts).
                5..=6 => {
                    let runs: Vec<(RunId, NodeId, RunState, Option<Millis>)> = fast
                        .runs
                        .values()
                        .map(|r| (r.id, r.node, r.state, r.started_ms))
                        .collect();
                    if runs.is_empty() {
                        continue;
                    }
                    let (run, node, state, at) = runs[rng.next(runs.len() as u64) as usize];
                    for c in [&mut fast, &mut full] {
                        if state == RunState::Assigned {
                            started(c, node, run, now);
                        } else {
                            exited(c, node, run, at.unwrap_or(now), now, 0);
                        }
                    }
                }
                7 => {
                    let pending: Vec<JobId> = fast.pending.iter().copied().collect();
                    if let Some(j) = pending.get(rng.next(pending.len().max(1) as u64) as usize) {
                        let a = fast.cancel(*j, now).map_err(|e| e.to_string());
                        let b = full.cancel(*j, now).map_err(|e| e.to_string());
                        assert_eq!(a, b);
                    }
                }
                _ => {
                    let a = fast.schedule(now).unwrap();
                    let b = full.schedule(now).unwrap();
                    assert_eq!(a.placed, b.placed, "seed {seed} step {step}");
                }
            }
            let view = |c: &Core| {
                c.runs
                    .values()
                    .map(|r| (r.id, r.job, r.index, r.node, r.state, r.stop.is_some()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(view(&fast), view(&full), "seed {seed} step {step}");
            // The class index partitions the queue and counts its tasks.
            let mut indexed: BTreeSet<JobId> = fast.job_class.keys().copied().collect();
            assert!(fast.unclassed.iter().all(|j| indexed.insert(*j)));
            assert_eq!(indexed, fast.pending, "seed {seed} step {step}");
            let waiting: usize = fast
                .pending
                .iter()
                .map(|j| {
                    fast.jobs[j]
                        .tasks
                        .iter()
                        .filter(|t| t.state == TaskState::Pending)
                        .count()
                })
                .sum();
            assert_eq!(fast.pending_tasks(), waiting, "seed {seed} step {step}");
        }
        assert!(fast.runs.len() + fast.pending.len() > 0);
    }
}

#[test]
fn room_held_for_a_preemptor_stays_its_own_in_a_pass_over_new_work() {
    let mut f = fixture();
    let c = &mut f.core;
    let (x, y, four) = x_holds_a_node_and_spot_work_fills_the_other(c);
    let jx = c.submit(x, four.clone(), 10).unwrap();
    c.schedule(11).unwrap();
    assert_eq!(c.jobs[&jx].reasons[0].code, "preempting");
    // Full passes spaced far apart: the pass after the victims exit is over new work.
    c.set_full_pass_gap(60_000);
    for (v, n) in stopping_for_preemption(c) {
        exited(c, n, v, 5, 20, 143);
    }
    // Y holds nothing, so it would go first in fair-share order.
    let jy = c.submit(y, four, 20).unwrap();
    let pass = c.schedule(21).unwrap();
    assert!(!pass.full);
    assert_eq!(
        c.jobs[&jx].tasks[0].state,
        TaskState::Assigned,
        "the room went to the job that preempted for it"
    );
    assert_eq!(c.jobs[&jy].tasks[0].state, TaskState::Pending);
}
