use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

fn usage_runs(p: &Pool) -> Vec<Value> {
    let u = p.get(&p.admin, "/v1/usage").unwrap();
    u["by_job"].as_array().unwrap().clone()
}

#[test]
fn server_kill9_mid_run_readopts_tasks_and_loses_nothing() {
    let mut p = Pool::new("kill9", &[("a", &["--cpus", "8"])]);
    let long = p.submit(
        &p.admin,
        json!({"command": "sh", "args": ["-c", "sleep 3; echo finished"],
               "resources": {"cpu_milli": 100}}),
    );
    p.wait_state(long, &["running"], Duration::from_secs(20));
    let pid: i32 = wait_for("pid", Duration::from_secs(10), || p.task_pid(long, 0));
    // This one exits while the server is down: its report waits in the agent's outbox.
    let short = p.submit(
        &p.admin,
        json!({"command": "sleep", "args": ["0.5"], "resources": {"cpu_milli": 100}}),
    );
    p.wait_task_running(short, 0);
    // A burst of accepted jobs right before the crash.
    let mut accepted = BTreeSet::new();
    for i in 0..40 {
        accepted.insert(p.submit(&p.admin, json!({"command": "sh", "args": ["-c", format!("echo {i}")], "resources": {"cpu_milli": 100}})));
    }
    p.kill9_server();
    assert!(
        pid_alive(pid),
        "the task keeps running while the server is down"
    );
    std::thread::sleep(Duration::from_millis(1500));
    p.start_server();
    let j = p.wait_state(long, &["succeeded", "failed"], Duration::from_secs(30));
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(
        j["runs"].as_array().unwrap().len(),
        1,
        "re-adopted, not restarted: {j}"
    );
    assert_eq!(p.logs(long, 0, "stdout"), "finished\n");
    let j = p.wait_state(short, &["succeeded", "failed"], Duration::from_secs(30));
    assert_eq!(
        j["state"], "succeeded",
        "exit reported after the restart: {j}"
    );
    assert_eq!(j["runs"].as_array().unwrap().len(), 1);
    accepted.insert(short);
    for id in &accepted {
        let j = p.wait_state(*id, &["succeeded", "failed"], Duration::from_secs(30));
        assert_eq!(
            j["state"], "succeeded",
            "accepted job {id} lost or failed: {j}"
        );
    }
    // Exactly one usage record per run, none duplicated, none missing.
    let by_job = usage_runs(&p);
    assert_eq!(by_job.len(), accepted.len() + 1);
    for row in &by_job {
        assert_eq!(row["runs"], 1, "{row}");
    }
    let all = p.get(&p.admin, "/v1/jobs").unwrap();
    assert_eq!(
        all.as_array().unwrap().len(),
        accepted.len() + 1,
        "no job duplicated"
    );
}

#[test]
fn a_killed_agents_tasks_are_rescheduled_on_healthy_nodes() {
    let mut p = Pool::new(
        "agentkill",
        &[("a", &["--cpus", "1"]), ("b", &["--cpus", "1"])],
    );
    let id = p.submit(
        &p.admin,
        json!({"command": "sleep", "args": ["300"], "max_retries": 2}),
    );
    let j = p.wait_task_running(id, 0);
    let first = j["task_list"][0]["node"].as_str().unwrap().to_string();
    let victim = if first == p.node_name("a") { "a" } else { "b" };
    p.kill9_agent(victim);
    let j = wait_for("rescheduled", Duration::from_secs(15), || {
        let j = p.job(&p.admin, id);
        (j["runs"].as_array().unwrap().len() == 2 && j["task_list"][0]["state"] == "running")
            .then_some(j)
    });
    assert_eq!(j["runs"][0]["state"], "lost");
    assert_ne!(j["runs"][1]["node"], first.as_str());
    assert_eq!(j["task_list"][0]["retries_used"], 1);
    let nodes = p.get(&p.admin, "/v1/nodes").unwrap();
    let lost = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == first.as_str())
        .unwrap();
    assert_eq!(lost["state"], "lost");
    // The lost run was metered once, up to the last time its node was heard from.
    let u = p.get(&p.admin, &format!("/v1/usage?job={id}")).unwrap();
    assert_eq!(u["by_job"][0]["runs"], 1, "{u} {j}");
    p.post(&p.admin, &format!("/v1/jobs/{id}/cancel"), &json!({}))
        .unwrap();
    p.wait_state(id, &["cancelled"], Duration::from_secs(15));
}

#[test]
fn an_agent_stopped_cleanly_hands_its_runs_back_and_they_run_again() {
    let mut p = Pool::new("agentterm", &[("a", &["--cpus", "2"])]);
    let marks = p.shared("marks");
    // No retries: a run lost with its agent would fail the job; one handed back must not.
    let script = format!(
        "echo $CARAVEL_RUN_ID >> {}; trap 'echo term >> {}; exit 143' TERM; sleep 600 & wait",
        marks.display(),
        marks.display()
    );
    let id = p.submit(
        &p.admin,
        json!({"command": "sh", "args": ["-c", script], "max_retries": 0,
               "resources": {"cpu_milli": 100}}),
    );
    p.wait_task_running(id, 0);
    wait_for("the task's first mark", Duration::from_secs(10), || {
        std::fs::read_to_string(&marks)
            .ok()
            .filter(|m| !m.is_empty())
    });
    let st = p.term_agent("a", Duration::from_secs(30));
    assert!(st.success(), "a clean stop exits 0: {st:?}");
    // The agent left only after the server had the run's end.
    let j = p.job(&p.admin, id);
    let runs = j["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{j}");
    assert_eq!(runs[0]["state"], "preempted", "{j}");
    assert!(
        runs[0]["message"].as_str().unwrap().contains("shut down"),
        "{j}"
    );
    assert_eq!(j["state"], "pending", "requeued, not failed: {j}");
    assert_eq!(j["task_list"][0]["retries_used"], 0, "{j}");
    assert_eq!(
        std::fs::read_to_string(&marks).unwrap().lines().nth(1),
        Some("term"),
        "SIGTERM came first, so the task could checkpoint"
    );
    let nodes = p.get(&p.admin, "/v1/nodes").unwrap();
    assert_eq!(nodes[0]["state"], "down", "{nodes}");
    // Not marked lost later: it left cleanly.
    std::thread::sleep(Duration::from_millis(2500));
    let nodes = p.get(&p.admin, "/v1/nodes").unwrap();
    assert_eq!(nodes[0]["state"], "down", "{nodes}");
    // Back: the same task runs again as a new run, and the first was metered once.
    p.start_agent("a", &["--cpus", "2"]);
    let j = wait_for("the task running again", Duration::from_secs(20), || {
        let j = p.job(&p.admin, id);
        (j["runs"].as_array().unwrap().len() == 2 && j["task_list"][0]["state"] == "running")
            .then_some(j)
    });
    assert_eq!(j["runs"][0]["state"], "preempted", "{j}");
    let u = p.get(&p.admin, &format!("/v1/usage?job={id}")).unwrap();
    assert_eq!(u["by_job"][0]["runs"], 1, "{u}");
    p.post(&p.admin, &format!("/v1/jobs/{id}/cancel"), &json!({}))
        .unwrap();
    p.wait_state(id, &["cancelled"], Duration::from_secs(15));
}

#[test]
fn a_second_sigterm_stops_an_agent_at_once_and_its_run_ends_once() {
    let mut p = Pool::new("agentterm2", &[("a", &["--cpus", "2"])]);
    let script = "trap '' TERM; exec sleep 600".to_string();
    let id = p.submit(
        &p.admin,
        json!({"command": "sh", "args": ["-c", script], "kill_grace_ms": 60_000,
               "resources": {"cpu_milli": 100}}),
    );
    let task: i32 = wait_for("the task's pid", Duration::from_secs(20), || {
        // `exec sleep` done: the shell's trap set, SIGTERM ignored from here on.
        let pid = p.task_pid(id, 0)?;
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .filter(|c| c.trim() == "sleep")
            .map(|_| pid)
    });
    let agent = p.agent_pid("a");
    // SAFETY: kill(2) on a process this test started or found as its own; no memory is touched.
    unsafe {
        libc::kill(agent, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        pid_alive(agent),
        "the first SIGTERM waits out the task's kill grace"
    );
    let st = p.term_agent("a", Duration::from_secs(10));
    assert!(st.success(), "{st:?}");
    wait_for(
        "the task dead with its agent",
        Duration::from_secs(5),
        || (!pid_alive(task)).then_some(()),
    );
    // Killed on the way out, the task's exit may still have been reported (the run is
    // then handed back like any other), or not (the node went silent with a run on it and
    // is lost, and so is the run). Either way it ends once and is metered once.
    let j = wait_for("the run ended", Duration::from_secs(20), || {
        let j = p.job(&p.admin, id);
        (j["runs"][0]["state"] != "running").then_some(j)
    });
    let nodes = p.get(&p.admin, "/v1/nodes").unwrap();
    match j["runs"][0]["state"].as_str().unwrap() {
        "preempted" => {
            assert_eq!(j["state"], "pending", "{j}");
            assert_eq!(nodes[0]["state"], "down", "{nodes}");
        }
        "lost" => {
            assert_eq!(j["state"], "failed", "no retries: {j}");
            assert_eq!(nodes[0]["state"], "lost", "{nodes}");
        }
        other => panic!("run ended {other}: {j}"),
    }
    let u = p.get(&p.admin, &format!("/v1/usage?job={id}")).unwrap();
    assert_eq!(u["by_job"][0]["runs"], 1, "{u}");
}

#[test]
fn a_partitioned_node_that_returns_has_its_stale_copy_killed() {
    let p = Pool::new("stale", &[("a", &["--cpus", "1"]), ("b", &["--cpus", "1"])]);
    let id = p.submit(
        &p.admin,
        json!({"command": "sleep", "args": ["300"], "max_retries": 1}),
    );
    let j = p.wait_state(id, &["running"], Duration::from_secs(20));
    let run1 = j["runs"][0]["id"].as_u64().unwrap();
    let first = j["task_list"][0]["node"].as_str().unwrap().to_string();
    let victim = if first == p.node_name("a") { "a" } else { "b" };
    let pid1: i32 = wait_for("pid", Duration::from_secs(10), || p.run_pid(run1));
    // Freeze the agent (a partition as the server sees it); its task keeps running.
    let apid = p.agent_pid(victim);
    // SAFETY: kill(2) on a process this test started or found as its own; no memory is touched.
    unsafe {
        libc::kill(apid, libc::SIGSTOP);
    }
    let j = wait_for("rescheduled", Duration::from_secs(15), || {
        let j = p.job(&p.admin, id);
        (j["runs"].as_array().unwrap().len() == 2 && j["task_list"][0]["state"] == "running")
            .then_some(j)
    });
    let run2 = j["runs"][1]["id"].as_u64().unwrap();
    let pid2: i32 = wait_for("pid2", Duration::from_secs(10), || p.run_pid(run2));
    assert!(
        pid_alive(pid1),
        "the stale copy is still running during the partition"
    );
    // SAFETY: kill(2) on a process this test started or found as its own; no memory is touched.
    unsafe {
        libc::kill(apid, libc::SIGCONT);
    }
    wait_for("stale copy killed", Duration::from_secs(15), || {
        (!pid_alive(pid1)).then_some(())
    });
    assert!(pid_alive(pid2), "the new copy keeps running");
    let nodes = p.get(&p.admin, "/v1/nodes").unwrap();
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] == "ready"),
        "{nodes}"
    );
    let j = p.job(&p.admin, id);
    assert_eq!(j["runs"][0]["state"], "lost");
    assert_eq!(
        j["runs"].as_array().unwrap().len(),
        2,
        "the returning node did not start a third copy"
    );
    let u = p.get(&p.admin, &format!("/v1/usage?job={id}")).unwrap();
    assert_eq!(
        u["by_job"][0]["runs"], 1,
        "the stale copy's late exit is not metered twice"
    );
}

/// The host pid of a run's process, once it runs.
fn wait_run_pid(p: &Pool, run: u64) -> i32 {
    wait_for(
        &format!("pid of run {run}"),
        Duration::from_secs(10),
        || p.run_pid(run),
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn a_fenced_job_never_runs_twice_across_a_real_partition() {
    // Agent `a` runs in a network namespace of its own, joined to the server's by a veth
    // pair the test takes down: both processes keep running and their connections stay
    // open, only the packets stop. (Declared first: dropped after the pool's processes.)
    let ns = NetNs::new();
    let mut p = Pool::server_only_on("fence", &ns.host_ip, &[]);
    p.agent_netns = Some((ns.name.clone(), ns.ns_ip.clone()));
    p.start_agent("a", &["--cpus", "2"]);
    p.agent_netns = None;
    p.wait_nodes_ready(1);
    let dir = p.shared("pids");
    std::fs::create_dir_all(&dir).unwrap();
    let task = json!([
        "-c",
        format!(
            "echo $$ > {}/$CARAVEL_RUN_ID; exec sleep 300",
            dir.display()
        )
    ]);
    let fenced = p.submit(
        &p.admin,
        json!({"command": "sh", "args": task, "max_retries": 1, "fence": true,
               "resources": {"cpu_milli": 1000}}),
    );
    let plain = p.submit(
        &p.admin,
        json!({"command": "sh", "args": task, "max_retries": 1, "resources": {"cpu_milli": 1000}}),
    );
    let mut first = vec![];
    for id in [fenced, plain] {
        let j = p.wait_state(id, &["running"], Duration::from_secs(20));
        assert_eq!(j["task_list"][0]["node"], p.node_name("a"));
        assert_eq!(
            j["spec"]["fence"].as_bool().unwrap_or(false),
            id == fenced,
            "{j}"
        );
        first.push(wait_run_pid(&p, j["runs"][0]["id"].as_u64().unwrap()));
    }
    let (fenced_pid, plain_pid) = (first[0], first[1]);
    // Somewhere for the work to go.
    p.start_agent("b", &["--cpus", "2"]);
    p.wait_nodes_ready(2);

    ns.cut();
    // Watch the fenced copy die, and the replacements start on `b`.
    let mut fenced_died_ms = None;
    let (f2, p2) = wait_for(
        "both jobs running again on b",
        Duration::from_secs(20),
        || {
            if fenced_died_ms.is_none() && !pid_alive(fenced_pid) {
                fenced_died_ms = Some(now_ms());
            }
            let jf = p.job(&p.admin, fenced);
            let jp = p.job(&p.admin, plain);
            let again = |j: &Value| {
                j["runs"].as_array().unwrap().len() == 2 && j["task_list"][0]["state"] == "running"
            };
            (again(&jf) && again(&jp)).then_some((jf, jp))
        },
    );
    assert_eq!(f2["task_list"][0]["node"], p.node_name("b"));
    let f2_pid = wait_run_pid(&p, f2["runs"][1]["id"].as_u64().unwrap());
    let p2_pid = wait_run_pid(&p, p2["runs"][1]["id"].as_u64().unwrap());
    // The fenced job's old copy was gone before the new one started; the unfenced job's
    // old copy still runs beside its replacement until the node comes back.
    let died = fenced_died_ms.expect("the fenced copy died during the partition");
    let started = f2["runs"][1]["started_ms"].as_i64().unwrap();
    assert!(
        died <= started,
        "old copy died at {died}, new one started at {started}"
    );
    assert!(
        pid_alive(plain_pid),
        "an unfenced task keeps running while cut off"
    );
    assert!(pid_alive(f2_pid) && pid_alive(p2_pid));
    let agent_log = std::fs::read_to_string(p.file("agent-a.log")).unwrap();
    assert!(agent_log.contains("fencing"), "{agent_log}");

    ns.heal();
    wait_for(
        "a's stale unfenced copy killed",
        Duration::from_secs(20),
        || (!pid_alive(plain_pid)).then_some(()),
    );
    wait_for("node a back", Duration::from_secs(20), || {
        let nodes = p.get(&p.admin, "/v1/nodes").unwrap();
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] == "ready")
            .then_some(())
    });
    let jf = p.job(&p.admin, fenced);
    assert_eq!(jf["runs"][0]["state"], "lost", "{jf}");
    assert_eq!(jf["runs"].as_array().unwrap().len(), 2, "{jf}");
    assert!(pid_alive(f2_pid), "the new copy keeps running");
    let u = p.get(&p.admin, &format!("/v1/usage?job={fenced}")).unwrap();
    assert_eq!(
        u["by_job"][0]["runs"], 1,
        "the fenced copy is metered once: {u}"
    );
}

/// Every heartbeat line of `file` (`RUN MILLIS`), grouped by run.
fn heartbeats(file: &std::path::Path) -> std::collections::BTreeMap<u64, Vec<i64>> {
    let mut by_run = std::collections::BTreeMap::<u64, Vec<i64>>::new();
    for line in std::fs::read_to_string(file).unwrap_or_default().lines() {
        let mut w = line.split_whitespace();
        if let (Some(r), Some(t)) = (w.next(), w.next()) {
            if let (Ok(r), Ok(t)) = (r.parse(), t.parse::<i64>()) {
                by_run.entry(r).or_default().push(t / 1_000_000);
            }
        }
    }
    by_run
}

#[test]
fn a_fenced_job_never_runs_twice_while_its_agent_is_frozen() {
    // The agent is SIGSTOPped for longer than the lost timeout: it can neither fence nor
    // report, and the server replaces its runs. The fenced task must be dead before its
    // replacement starts, which only the watchdog (another process) can see to.
    let mut p = Pool::new("fencestop", &[("a", &["--cpus", "2"])]);
    let beats = p.shared("beats");
    let task = json!([
        "-c",
        format!(
            "while true; do echo \"$CARAVEL_RUN_ID $(date +%s%N)\" >> {}; sleep 0.05; done",
            beats.display()
        )
    ]);
    let fenced = p.submit(
        &p.admin,
        json!({"command": "sh", "args": task, "max_retries": 1, "fence": true,
               "resources": {"cpu_milli": 1000}}),
    );
    let j = p.wait_state(fenced, &["running"], Duration::from_secs(20));
    let run0 = j["runs"][0]["id"].as_u64().unwrap();
    wait_for(
        "the first copy's heartbeats",
        Duration::from_secs(10),
        || (heartbeats(&beats).get(&run0).map_or(0, |b| b.len()) >= 3).then_some(()),
    );
    p.start_agent("b", &["--cpus", "2"]);
    p.wait_nodes_ready(2);
    let agent = p.agent_pid("a");
    // SAFETY: signalling the test's own child.
    unsafe {
        libc::kill(agent, libc::SIGSTOP);
    }
    let frozen_at = std::time::Instant::now();
    let j2 = wait_for(
        "the job running again on b",
        Duration::from_secs(20),
        || {
            let j = p.job(&p.admin, fenced);
            (j["runs"].as_array().unwrap().len() == 2 && j["task_list"][0]["state"] == "running")
                .then_some(j)
        },
    );
    assert_eq!(j2["task_list"][0]["node"], p.node_name("b"), "{j2}");
    let run1 = j2["runs"][1]["id"].as_u64().unwrap();
    wait_for(
        "the replacement's heartbeats",
        Duration::from_secs(10),
        || (heartbeats(&beats).get(&run1).map_or(0, |b| b.len()) >= 5).then_some(()),
    );
    // Frozen well past the lost timeout (2 s) before it may act again.
    std::thread::sleep(Duration::from_secs(6).saturating_sub(frozen_at.elapsed()));
    let b = heartbeats(&beats);
    let (old, new) = (&b[&run0], &b[&run1]);
    let old_last = *old.iter().max().unwrap();
    let new_first = *new.iter().min().unwrap();
    assert!(
        old_last < new_first,
        "two copies ran together: the old one beat at {old_last}, the new one from {new_first}"
    );
    // SAFETY: as above.
    unsafe {
        libc::kill(agent, libc::SIGCONT);
    }
    let log = std::fs::read_to_string(p.file("agent-a.log")).unwrap();
    assert!(
        log.contains(&format!("caravel fence watchdog: killed run {run0}")),
        "{log}"
    );
    // Thawed, the agent reports the end it finds, and the new copy goes on.
    wait_for("node a back", Duration::from_secs(20), || {
        let nodes = p.get(&p.admin, "/v1/nodes").unwrap();
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] == "ready")
            .then_some(())
    });
    let j = p.job(&p.admin, fenced);
    assert_eq!(j["runs"].as_array().unwrap().len(), 2, "{j}");
    assert_eq!(j["task_list"][0]["state"], "running", "{j}");
    let after = heartbeats(&beats);
    assert_eq!(
        after[&run0].len(),
        old.len(),
        "the old copy never beat again"
    );
}

#[test]
fn server_killed_repeatedly_during_a_stream_of_jobs_loses_and_duplicates_nothing() {
    // fsync per commit: a wider window between a change and its commit for a kill to hit.
    let mut p = Pool::with_server_args("kill9loop", &["--sync-full"], &[("a", &["--cpus", "16"])]);
    let (url, admin) = (p.url.clone(), p.admin.clone());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Four submitters at once: their accepts share commits (group commit), and none may
    // be answered before its commit, whenever the kill lands.
    let submitters: Vec<_> = (0..4).map(|_| {
        let (url, admin, stop2) = (url.clone(), admin.clone(), stop.clone());
        std::thread::spawn(move || {
        let mut accepted = vec![];
        let mut i = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) && accepted.len() < 100 {
            let spec = json!({"command": "sh", "args": ["-c", format!("sleep 0.{}", i % 4)], "resources": {"cpu_milli": 100}});
            if let Some(id) = Pool::try_submit(&url, &admin, &spec) {
                accepted.push(id);
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
            i += 1;
        }
        accepted
    })
    }).collect();
    for round in 0..3u64 {
        std::thread::sleep(Duration::from_millis(400 + 150 * round));
        p.kill9_server();
        std::thread::sleep(Duration::from_millis(300));
        p.start_server();
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let accepted: Vec<u64> = submitters
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(accepted.len() > 20, "only {} jobs accepted", accepted.len());
    let distinct: BTreeSet<u64> = accepted.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        accepted.len(),
        "one id answered twice: an answered job was lost in a kill and its id reused"
    );
    // Every job the server ever acknowledged finishes, with exactly one run and one usage record.
    for id in &accepted {
        let j = p.wait_state(
            *id,
            &["succeeded", "failed", "cancelled"],
            Duration::from_secs(60),
        );
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(
            j["runs"].as_array().unwrap().len(),
            1,
            "a run was restarted or duplicated: {j}"
        );
    }
    let all = p.get(&p.admin, "/v1/jobs?limit=100000").unwrap();
    let all = all.as_array().unwrap();
    let ids: BTreeSet<u64> = all.iter().map(|j| j["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), all.len(), "duplicate job ids");
    for id in &accepted {
        assert!(ids.contains(id), "accepted job {id} lost");
    }
    // A job committed just before a kill may never have had its 201 delivered; it must
    // still run to completion like any other.
    for j in all {
        let id = j["id"].as_u64().unwrap();
        p.wait_state(id, &["succeeded"], Duration::from_secs(60));
    }
    let by_job = usage_runs(&p);
    assert_eq!(by_job.len(), all.len(), "one usage row per job");
    assert!(
        by_job.iter().all(|r| r["runs"] == 1),
        "usage duplicated: {by_job:?}"
    );
}

/// `caravel submit` started while the server is down keeps trying (one idempotency key
/// for all its attempts) and succeeds once the server is back; repeating the command with
/// the same key names the same job. One job, one run.
#[test]
fn cli_submit_rides_out_a_server_restart_and_a_repeat_never_submits_twice() {
    let mut p = Pool::new("idem", &[("a", &["--cpus", "4"])]);
    p.kill9_server();
    let submit = |p: &Pool| {
        let mut c = std::process::Command::new(BIN);
        c.args(["submit", "--idempotency-key", "nightly-2026-11-28"])
            .args(["--", "sh", "-c", "echo once"])
            .env("CARAVEL_SERVER", &p.url)
            .env("CARAVEL_TOKEN", &p.admin)
            .env("CARAVEL_CONFIG", p.dir.path().join("no-config.toml"));
        c
    };
    let pending = submit(&p)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    p.start_server();
    let out = pending.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let again = submit(&p).output().unwrap();
    assert!(again.status.success());
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        id.to_string()
    );
    let j = p.wait_state(id, &["succeeded", "failed"], Duration::from_secs(30));
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["runs"].as_array().unwrap().len(), 1);
    let all = p.get(&p.admin, "/v1/jobs").unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    // The same key with another command is refused, naming the header and the job.
    let other = p.cli(&[
        "submit",
        "--idempotency-key",
        "nightly-2026-11-28",
        "--",
        "true",
    ]);
    assert!(!other.status.success());
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(
        err.contains("Idempotency-Key") && err.contains(&format!("job {id}")),
        "{err}"
    );
}

/// Waits for the server process to end by itself (a fault-injected SIGKILL).
fn server_dies(p: &mut Pool, what: &str) {
    let s = p.server.as_mut().unwrap();
    let t0 = std::time::Instant::now();
    loop {
        if let Some(st) = s.try_wait().unwrap() {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(st.signal(), Some(libc::SIGKILL), "{what}: {st:?}");
            p.server = None;
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what}: the server did not die at the commit boundary"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A POST whose answer may never come: the status, or None when the connection died.
fn post_maybe(p: &Pool, path: &str, key: Option<&str>, body: &Value) -> Option<(u16, Value)> {
    Pool::rt().block_on(async {
        let mut r = reqwest::Client::new()
            .post(format!("{}{path}", p.url))
            .bearer_auth(&p.admin)
            .json(body);
        if let Some(k) = key {
            r = r.header("idempotency-key", k);
        }
        let resp = r.send().await.ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.json().await.unwrap_or(Value::Null)))
    })
}

/// Item 8 of #30: the server killed between each kind of commit and anyone hearing of it
/// (`CARAVEL_FAULT_KILL`, see `caravel_server::fault`). Each case recovers with nothing
/// lost or doubled: one job per submission, one run per task, one usage record per run.
#[test]
fn a_kill_between_each_commit_and_its_answer_loses_and_doubles_nothing() {
    for point in ["submit", "schedule", "start", "exit", "cancel"] {
        let mut p = Pool::new(&format!("crash-{point}"), &[("a", &["--cpus", "4"])]);
        // The same server, armed: it kills itself after the first commit of `point`.
        p.kill9_server();
        p.server_env = vec![("CARAVEL_FAULT_KILL".into(), format!("{point}:1"))];
        p.start_server();
        p.wait_nodes_ready(1);
        let cmd = if point == "cancel" {
            "sleep 300"
        } else {
            "echo once"
        };
        let spec = json!({"command": "sh", "args": ["-c", cmd], "resources": {"cpu_milli": 100}});
        let key = format!("crash-{point}");
        let first = post_maybe(&p, "/v1/jobs", Some(&key), &spec);
        // The submit's answer may be lost too when a later boundary comes first (the
        // placement is committed and the server dies before the answer is out): the
        // client then repeats it with its key, as for `submit`.
        let id = first.as_ref().map(|(status, v)| {
            assert_eq!(*status, 201, "{v}");
            v["id"].as_u64().unwrap()
        });
        if point == "submit" {
            assert!(first.is_none(), "the submit was answered: {first:?}");
        }
        if point == "cancel" {
            let id = id.unwrap();
            // Started on the node (not only placed): its run is metered when it ends.
            wait_for("the run started", Duration::from_secs(20), || {
                let j = p.job(&p.admin, id);
                j["runs"][0]["started_ms"].as_i64().map(|_| ())
            });
            let r = post_maybe(&p, &format!("/v1/jobs/{id}/cancel"), None, &json!({}));
            assert!(r.is_none(), "the cancel was answered: {r:?}");
        }
        server_dies(&mut p, point);
        let log = std::fs::read_to_string(p.file("server.log")).unwrap();
        assert!(
            log.contains(&format!(
                "fault injection: killed after the commit of {point}"
            )),
            "{point}: {log}"
        );
        p.server_env.clear();
        p.start_server();
        // What the client does next: repeat what got no answer.
        let id = match (point, id) {
            ("submit", _) | (_, None) => {
                let (status, v) = post_maybe(&p, "/v1/jobs", Some(&key), &spec).unwrap();
                assert_eq!(status, 200, "the repeat replays the committed submit: {v}");
                v["id"].as_u64().unwrap()
            }
            ("cancel", Some(id)) => {
                let (status, v) =
                    post_maybe(&p, &format!("/v1/jobs/{id}/cancel"), None, &json!({})).unwrap();
                assert!(status == 200 || status == 409, "{status} {v}");
                id
            }
            (_, Some(id)) => id,
        };
        let want = if point == "cancel" {
            "cancelled"
        } else {
            "succeeded"
        };
        let j = p.wait_state(id, &[want], Duration::from_secs(30));
        let jobs = p.get(&p.admin, "/v1/jobs").unwrap();
        assert_eq!(
            jobs.as_array().unwrap().len(),
            1,
            "{point}: one job: {jobs}"
        );
        assert_eq!(
            j["runs"].as_array().unwrap().len(),
            1,
            "{point}: one run: {j}"
        );
        if point != "cancel" {
            assert_eq!(p.logs(id, 0, "stdout"), "once\n", "{point}");
        }
        let usage = wait_for("the run's usage", Duration::from_secs(20), || {
            let u = p.get(&p.admin, &format!("/v1/usage?job={id}")).unwrap();
            (u["by_job"].as_array().is_some_and(|b| !b.is_empty())).then_some(u)
        });
        assert_eq!(
            usage["by_job"][0]["runs"], 1,
            "{point}: metered once: {usage}"
        );
    }
}
