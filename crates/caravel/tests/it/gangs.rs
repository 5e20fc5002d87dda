//! Training that survives, unmodified: a gang restarted after a node died, after it was
//! preempted, or after one rank's process was killed resumes every rank from the same
//! checkpoint (one consistent cut across the gang), for the three ways training scripts
//! checkpoint (`data/gang_trainer.py`).

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{wait_for, Pool};

const TRAINER: &str = include_str!("data/gang_trainer.py");
const STEPS: u32 = 240;

/// What an uninterrupted run of the trainer ends with.
fn expected(pattern: &str, world: u32) -> String {
    expected_at(pattern, world, STEPS)
}

/// `expected` after `steps` steps.
fn expected_at(pattern: &str, world: u32, steps: u32) -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", TRAINER])
        .env("EXPECT", "1")
        .env("PATTERN", pattern)
        .env("WORLD_SIZE", world.to_string())
        .env("STEPS", steps.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn token(p: &Pool, args: &[&str]) -> String {
    let out = p.cli(args);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .unwrap()
        .to_string()
}

#[derive(Clone, Copy, Debug)]
enum Failure {
    /// A guarantee owner takes the capacity back.
    Preempted,
    /// One rank's process is killed with SIGKILL.
    RankKilled,
    /// The node of rank 1 dies: its agent and its processes, SIGKILL.
    NodeDied,
}

struct Tenants {
    owner: String,
    borrower: String,
}

/// Runs a gang of `world` ranks of the trainer, does `how` to it once a checkpoint cut
/// holds a few steps, and checks that it finishes with every rank resumed from the same
/// step and the result of an uninterrupted run.
fn survives(p: &mut Pool, t: &Tenants, pattern: &str, world: u32, how: Failure) {
    let want = expected(pattern, world);
    let id = p.submit(
        &t.borrower,
        json!({"command": "python3", "args": ["-c", TRAINER], "tasks": world, "gang": true,
               "max_retries": 4, "kill_grace_ms": 3000,
               "resources": {"cpu_milli": 1000},
               "env": {"PATTERN": pattern, "STEPS": STEPS.to_string(), "EVERY": "40",
                       "PAUSE": "0.05"}}),
    );
    for r in 0..world as usize {
        p.wait_task_running(id, r);
    }
    // A cut holding a save of rank 0 (step 40 or later): the restart must go back to it,
    // not to step 0. (On the code before gang cuts this test waited instead for rank 0's
    // own second save, and failed as reported in issue 29.)
    let cut = wait_for("a checkpoint cut", Duration::from_secs(60), || {
        let c = p
            .get(&t.borrower, &format!("/v1/jobs/{id}/checkpoint-cut"))
            .ok()?;
        c["parts"]
            .as_array()?
            .iter()
            .any(|x| x["task"] == 0)
            .then_some(c)
    });
    let j = p.job(&p.admin, id);
    assert_eq!(j["state"], "running", "{j}");
    match how {
        Failure::Preempted => {
            let o = p.submit(
                &t.owner,
                json!({"command": "sleep", "args": ["1"], "tasks": 5,
                       "resources": {"cpu_milli": 1000}}),
            );
            let jo = p.wait_state(o, &["succeeded", "failed"], Duration::from_secs(30));
            assert_eq!(jo["state"], "succeeded", "{jo}");
        }
        Failure::RankKilled => {
            let pid = p.task_pid(id, 1).expect("rank 1's process");
            // SAFETY: kill(2) on a process this test started or found as its own; no memory is touched.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        Failure::NodeDied => {
            let node = j["task_list"][1]["node"].as_str().unwrap().to_string();
            let name = ["a", "b", "c", "d"]
                .into_iter()
                .find(|n| p.node_name(n) == node)
                .unwrap();
            let pids = p.task_pids(id, 1);
            p.kill9_agent(name);
            for pid in pids {
                // SAFETY: kill(2) on a process this test started or found as its own; no memory is touched.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            // Its replacement joins, as a repaired node would.
            p.start_agent("d", &["--cpus", "2"]);
        }
    }
    let j = p.wait_state(id, &["succeeded", "failed"], Duration::from_secs(150));
    let out: Vec<String> = (0..world).map(|r| p.logs(id, r, "stdout")).collect();
    let err: Vec<String> = (0..world).map(|r| p.logs(id, r, "stderr")).collect();
    assert_eq!(
        j["state"], "succeeded",
        "{pattern} after {how:?}: {j}\ncut before: {cut}\nstdout: {out:?}\nstderr: {err:?}"
    );
    let runs = j["runs"].as_array().unwrap();
    assert!(
        runs.len() > world as usize,
        "{how:?}: the gang ran again: {j}"
    );
    let start = |o: &str| -> u32 {
        o.lines()
            .filter_map(|l| l.strip_prefix("START "))
            .next_back()
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("step=")))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no START line: {o}"))
    };
    // Every attempt is visible: the run each rank's last attempt started from is the same
    // cut, `job show` says which, and the first attempt's output is still there.
    let last: Vec<&Value> = (0..world)
        .map(|r| {
            runs.iter()
                .filter(|x| x["index"] == r)
                .max_by_key(|x| x["attempt"].as_u64())
                .unwrap()
        })
        .collect();
    let from = last[0]["checkpoint"].as_u64().unwrap_or(0);
    assert!(from > 0, "{how:?}: the last attempt restored no cut: {j}");
    assert!(last.iter().all(|x| x["checkpoint"] == from), "{j}");
    let first = runs
        .iter()
        .find(|x| x["index"] == 0 && x["attempt"] == 1)
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    let idt = id.to_string();
    let cli = |args: &[&str]| {
        let o = p.cli_as(&t.borrower, args);
        assert!(o.status.success(), "{args:?}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let all = cli(&["logs", &idt, "--task", "0", "--all-runs"]);
    assert!(
        all.contains(&format!("[run {first} attempt 1] START rank=0 step=0 ")),
        "{all}"
    );
    assert!(
        all.contains(&format!(
            "[run {} attempt {}] FINAL rank=0",
            last[0]["id"], last[0]["attempt"]
        )),
        "{all}"
    );
    let one = cli(&["logs", &idt, "--task", "0", "--run", &first.to_string()]);
    assert!(one.starts_with("START rank=0 step=0 "), "{one}");
    assert!(!one.contains("FINAL"), "run {first} was cut off: {one}");
    let show = cli(&["job", "show", &idt]);
    assert!(show.contains(&format!("ckpt {from}")), "{show}");
    let s0 = start(&out[0]);
    assert!(
        s0 >= 40,
        "{pattern} after {how:?}: the last attempt resumed from step {s0}, not from the cut ({cut}): {out:?}"
    );
    for (r, o) in out.iter().enumerate() {
        assert_eq!(
            start(o),
            s0,
            "{pattern} after {how:?}: rank {r} resumed elsewhere: {out:?}"
        );
        assert!(
            o.contains(&format!("FINAL rank={r} step={STEPS} value={want} ")),
            "{pattern} after {how:?}: rank {r} ends with another result than an uninterrupted run ({want}): {o}"
        );
    }
}

fn pool(tag: &str) -> (Pool, Tenants) {
    let p = Pool::new(
        tag,
        &[
            ("a", &["--cpus", "2"]),
            ("b", &["--cpus", "2"]),
            ("c", &["--cpus", "2"]),
        ],
    );
    let t = Tenants {
        owner: token(&p, &["tenant", "create", "owner", "--guarantee", "cpu=5"]),
        borrower: token(&p, &["tenant", "create", "trainer"]),
    };
    (p, t)
}

fn every_failure(tag: &str, pattern: &str, world: u32) {
    let (mut p, t) = pool(tag);
    for how in [Failure::Preempted, Failure::RankKilled, Failure::NodeDied] {
        survives(&mut p, &t, pattern, world, how);
    }
}

#[test]
fn a_gang_whose_rank_0_saves_one_file_resumes_every_rank_from_it() {
    every_failure("gangckpta", "a", 2);
}

#[test]
fn a_gang_saving_sharded_checkpoints_resumes_from_one_consistent_step() {
    every_failure("gangckptb", "b", 3);
}

#[test]
fn a_gang_writing_trainer_checkpoint_folders_resumes_from_the_newest_complete_one() {
    every_failure("gangckptc", "c", 2);
}

#[test]
fn the_cut_of_a_job_that_is_not_a_gang_is_refused() {
    let p = Pool::server_only("gangcutnot");
    let id = p.submit(&p.admin, json!({"command": "true", "tasks": 2}));
    let (code, e): (u16, Value) = p
        .get(&p.admin, &format!("/v1/jobs/{id}/checkpoint-cut"))
        .unwrap_err();
    assert_eq!(code, 404);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a gang"),
        "{e}"
    );
}

#[test]
fn a_gang_no_topology_domain_could_hold_is_refused_at_submit() {
    let p = Pool::new(
        "gangtopo",
        &[
            ("a", &["--cpus", "2", "--zone", "z1", "--rack", "r1"]),
            ("b", &["--cpus", "2", "--zone", "z1", "--rack", "r2"]),
        ],
    );
    let gang = |tasks: u32, topology: &str| {
        json!({"command": "true", "tasks": tasks, "gang": true, "topology": topology,
               "resources": {"cpu_milli": 1000}})
    };
    // Each rack holds two such tasks, the zone four.
    for (tasks, level) in [(3, "rack"), (3, "node"), (5, "zone")] {
        let (code, e) = p
            .post(&p.admin, "/v1/jobs", &gang(tasks, level))
            .unwrap_err();
        assert_eq!(code, 422, "{tasks} in one {level}: {e}");
        assert_eq!(e["error"]["field"], "topology", "{e}");
        let m = e["error"]["message"].as_str().unwrap();
        assert!(
            m.contains(&format!("no {level} could ever hold this gang"))
                && m.contains(&format!("all {tasks} tasks")),
            "{m}"
        );
    }
    let ok = p.submit(&p.admin, gang(4, "zone"));
    let j = p.wait_state(ok, &["succeeded", "failed"], Duration::from_secs(30));
    assert_eq!(j["state"], "succeeded", "{j}");
    let ok = p.submit(&p.admin, gang(2, "rack"));
    let j = p.wait_state(ok, &["succeeded", "failed"], Duration::from_secs(30));
    assert_eq!(j["state"], "succeeded", "{j}");
}

/// A gang with `hang_timeout` whose rank 1 hangs (`sigstop`: frozen by SIGSTOP; else asleep
/// for good at step 100) is stopped within the timeout, says why, and resumes.
fn hung_rank_is_caught(tag: &str, sigstop: bool) {
    let p = Pool::new(tag, &[("a", &["--cpus", "2"]), ("b", &["--cpus", "2"])]);
    let want = expected("a", 2);
    let mut env = json!({"PATTERN": "a", "STEPS": STEPS.to_string(), "EVERY": "40",
                         "PAUSE": "0.05"});
    if !sigstop {
        env["HANG_AT"] = json!("100");
    }
    let id = p.submit(
        &p.admin,
        json!({"command": "python3", "args": ["-c", TRAINER], "tasks": 2, "gang": true,
               "max_retries": 2, "kill_grace_ms": 2000, "hang_timeout_ms": 3000,
               "resources": {"cpu_milli": 1000}, "env": env}),
    );
    p.wait_task_running(id, 1);
    wait_for("two saves of rank 0", Duration::from_secs(60), || {
        let l = p
            .get(&p.admin, &format!("/v1/jobs/{id}/checkpoints"))
            .ok()?;
        let v0 = l.as_array()?.iter().find(|x| x["task"] == 0)?["version"].as_u64()?;
        (v0 >= 2).then_some(())
    });
    let t0 = std::time::Instant::now();
    if sigstop {
        for pid in p.task_pids(id, 1) {
            // SAFETY: kill(2) on a process this test started or found as its own; no memory is touched.
            unsafe {
                libc::kill(pid, libc::SIGSTOP);
            }
        }
    }
    // The gang's second attempt starts within the timeout (3 s), a look (0.6 s), the kill
    // grace (2 s) and the restart.
    wait_for("the gang restarted", Duration::from_secs(40), || {
        let j = p.job(&p.admin, id);
        j["runs"]
            .as_array()?
            .iter()
            .any(|r| r["attempt"] == 2)
            .then_some(())
    });
    if sigstop {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "caught after {:?}",
            t0.elapsed()
        );
    }
    let j = p.wait_state(id, &["succeeded", "failed"], Duration::from_secs(90));
    assert_eq!(j["state"], "succeeded", "{j}");
    let runs = j["runs"].as_array().unwrap();
    let hung: Vec<&Value> = runs
        .iter()
        .filter(|r| {
            r["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("hung: no progress for 3 s")
        })
        .collect();
    assert!(!hung.is_empty(), "no run says it hung: {j}");
    // Frozen, rank 1 is the one caught (its peer only waits for it, and gets a little
    // longer); asleep, either may be (both just wait), and the other is stopped with the
    // gang.
    if sigstop {
        let rank1 = runs
            .iter()
            .find(|r| r["index"] == 1 && r["attempt"] == 1)
            .unwrap();
        assert_eq!(rank1["state"], "failed", "{j}");
        let m = rank1["message"].as_str().unwrap();
        assert!(
            m.starts_with("hung:") && m.contains("stopped (SIGSTOP)"),
            "{rank1}"
        );
    }
    assert!(
        hung.iter()
            .all(|r| r["state"] == "failed" && r["attempt"] == 1),
        "{j}"
    );
    let out = p.logs(id, 0, "stdout");
    assert!(out.contains(&format!("value={want} ")), "{out}");
    assert!(
        !out.contains("step=0 attempt=2"),
        "resumed from its cut: {out}"
    );
}

#[test]
fn a_rank_frozen_by_sigstop_is_caught_and_the_gang_resumes() {
    hung_rank_is_caught("ganghangstop", true);
}

#[test]
fn a_rank_asleep_for_good_is_caught_and_the_gang_resumes() {
    hung_rank_is_caught("ganghangsleep", false);
}

#[test]
fn an_elastic_gang_starts_small_grows_when_nodes_join_shrinks_when_one_dies_and_finishes() {
    let mut p = Pool::with_server_args(
        "gangelastic",
        &["--elastic-grow-after", "2s"],
        &[("a", &["--cpus", "2"])],
    );
    let want = expected_at("a", 2, 600);
    let id = p.submit(
        &p.admin,
        json!({"command": "python3", "args": ["-c", TRAINER], "tasks": 4, "min_tasks": 2,
               "gang": true, "max_retries": 3, "kill_grace_ms": 2000,
               "resources": {"cpu_milli": 1000},
               "env": {"PATTERN": "a", "STEPS": "600", "EVERY": "40", "PAUSE": "0.05"}}),
    );
    // Two ranks fit on the one node: it starts with two, the others sit out.
    p.wait_task_running(id, 1);
    let j = p.job(&p.admin, id);
    assert_eq!(j["task_list"][2]["state"], "skipped", "{j}");
    assert_eq!(j["task_list"][3]["state"], "skipped", "{j}");
    wait_for(
        "rank 0 started with world 2",
        Duration::from_secs(30),
        || p.logs(id, 0, "stdout").contains("world=2").then_some(()),
    );
    let cut_part0 = |p: &Pool| -> u64 {
        p.get(&p.admin, &format!("/v1/jobs/{id}/checkpoint-cut"))
            .ok()
            .and_then(|c| {
                c["parts"].as_array()?.iter().find(|x| x["task"] == 0)?["version"].as_u64()
            })
            .unwrap_or(0)
    };
    wait_for("a first cut", Duration::from_secs(30), || {
        (cut_part0(&p) >= 1).then_some(())
    });
    // A node joins: the gang restarts with four ranks, from its checkpoint.
    p.start_agent("b", &["--cpus", "2"]);
    let j = wait_for("four ranks running", Duration::from_secs(60), || {
        let j = p.job(&p.admin, id);
        let running = j["task_list"]
            .as_array()?
            .iter()
            .filter(|t| t["state"] == "running")
            .count();
        (running == 4).then_some(j)
    });
    let grew = j["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "preempted")
        .count();
    assert_eq!(
        grew, 2,
        "the two ranks were stopped to grow, no retry used: {j}"
    );
    assert!(
        j["task_list"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["retries_used"] == 0),
        "{j}"
    );
    wait_for(
        "rank 3 started with world 4",
        Duration::from_secs(30),
        || p.logs(id, 3, "stdout").contains("world=4").then_some(()),
    );
    let before = cut_part0(&p);
    wait_for("a cut of the four ranks", Duration::from_secs(30), || {
        (cut_part0(&p) > before).then_some(())
    });
    // The new node dies: the gang shrinks back to what fits instead of waiting.
    let on_b: Vec<u32> = (0..4)
        .filter(|t| j["task_list"][*t as usize]["node"] == p.node_name("b").as_str())
        .collect();
    assert!(!on_b.is_empty(), "{j}");
    let pids: Vec<i32> = on_b.iter().flat_map(|t| p.task_pids(id, *t)).collect();
    p.kill9_agent("b");
    for pid in pids {
        // SAFETY: kill(2) on a process this test started or found as its own; no memory is touched.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    let j = p.wait_state(id, &["succeeded", "failed"], Duration::from_secs(120));
    assert_eq!(j["state"], "succeeded", "{j}");
    let out = p.logs(id, 0, "stdout");
    assert!(out.contains("world=2"), "{out}");
    assert!(
        out.contains(&format!("FINAL rank=0 step=600 value={want} ")),
        "{out}"
    );
    let resumed: u32 = out
        .lines()
        .find_map(|l| l.strip_prefix("START rank=0 step="))
        .and_then(|l| l.split(' ').next()?.parse().ok())
        .unwrap();
    assert!(
        resumed > 0,
        "the last attempt resumed from its checkpoint: {out}"
    );
    let tasks = j["task_list"].as_array().unwrap();
    assert_eq!(tasks[0]["state"], "succeeded");
    assert_eq!(tasks[1]["state"], "succeeded");
    assert_eq!(tasks[2]["state"], "skipped", "{j}");
    assert_eq!(tasks[3]["state"], "skipped", "{j}");
}

#[test]
fn an_elastic_gang_on_borrowed_capacity_shrinks_when_its_owner_reclaims_it() {
    let p = Pool::with_server_args(
        "gangreclaim",
        &["--elastic-grow-after", "2s"],
        &[("a", &["--cpus", "2"]), ("b", &["--cpus", "2"])],
    );
    let owner = token(&p, &["tenant", "create", "owner", "--guarantee", "cpu=2"]);
    let trainer = token(&p, &["tenant", "create", "trainer"]);
    let want = expected_at("a", 2, 500);
    let id = p.submit(
        &trainer,
        json!({"command": "python3", "args": ["-c", TRAINER], "tasks": 4, "min_tasks": 2,
               "gang": true, "max_retries": 3, "kill_grace_ms": 2000,
               "resources": {"cpu_milli": 1000},
               "env": {"PATTERN": "a", "STEPS": "500", "EVERY": "40", "PAUSE": "0.05"}}),
    );
    // It takes the whole idle pool, all borrowed.
    for r in 0..4 {
        p.wait_task_running(id, r);
    }
    wait_for("a first cut", Duration::from_secs(30), || {
        let c = p
            .get(&trainer, &format!("/v1/jobs/{id}/checkpoint-cut"))
            .ok()?;
        (!c["parts"].as_array()?.is_empty()).then_some(())
    });
    // The owner takes its two CPUs back: the gang goes on with two ranks meanwhile.
    let o = p.submit(
        &owner,
        json!({"command": "sleep", "args": ["6"], "tasks": 2, "resources": {"cpu_milli": 1000}}),
    );
    p.wait_task_running(o, 1);
    let j = wait_for(
        "the gang running with two ranks",
        Duration::from_secs(30),
        || {
            let j = p.job(&p.admin, id);
            let running = j["task_list"]
                .as_array()?
                .iter()
                .filter(|t| t["state"] == "running")
                .count();
            (running == 2 && j["task_list"][3]["state"] == "skipped").then_some(j)
        },
    );
    assert_eq!(p.job(&owner, o)["state"], "running", "{j}");
    let preempted = j["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "preempted")
        .count();
    // The victims are preempted, their mates stopped with the gang.
    assert!(
        preempted >= 1,
        "reclaimed by preemption, no retry used: {j}"
    );
    assert!(j["task_list"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["retries_used"] == 0));
    let jo = p.wait_state(o, &["succeeded", "failed"], Duration::from_secs(30));
    assert_eq!(jo["state"], "succeeded", "{jo}");
    let j = p.wait_state(id, &["succeeded", "failed"], Duration::from_secs(120));
    assert_eq!(j["state"], "succeeded", "{j}");
    let out = p.logs(id, 0, "stdout");
    assert!(
        out.contains(&format!("FINAL rank=0 step=500 value={want} ")),
        "{out}"
    );
}
