use std::time::Duration;

use serde_json::json;

use crate::harness::*;

#[test]
fn jobs_run_and_their_output_and_exit_codes_come_back() {
    let p = Pool::new("run", &[("a", &["--cpus", "2"])]);
    let ok = p.submit(&p.admin, json!({"command": "sh", "args": ["-c", "echo hello; echo oops >&2; echo job=$CARAVEL_JOB_ID idx=$CARAVEL_TASK_INDEX n=$CARAVEL_TASK_COUNT"]}));
    let bad = p.submit(&p.admin, json!({"command": "sh", "args": ["-c", "exit 7"]}));
    let missing = p.submit(&p.admin, json!({"command": "/no/such/binary"}));
    let j = p.wait_state(ok, &["succeeded", "failed"], Duration::from_secs(20));
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(
        p.logs(ok, 0, "stdout"),
        format!("hello\njob={ok} idx=0 n=1\n")
    );
    assert_eq!(p.logs(ok, 0, "stderr"), "oops\n");
    let j = p.wait_state(bad, &["succeeded", "failed"], Duration::from_secs(20));
    assert_eq!(j["state"], "failed");
    assert_eq!(j["task_list"][0]["exit_code"], 7);
    assert_eq!(j["runs"][0]["message"], "exit code 7");
    let j = p.wait_state(missing, &["succeeded", "failed"], Duration::from_secs(20));
    assert_eq!(j["state"], "failed");
    assert!(
        j["runs"][0]["message"]
            .as_str()
            .unwrap()
            .contains("cannot start `/no/such/binary`"),
        "{j}"
    );

    // The CLI: --wait prints the output and exits with the job's status.
    let out = p.cli(&["submit", "--wait", "--", "echo", "from", "cli"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from cli\n");
    let out = p.cli(&["submit", "--wait", "--", "sh", "-c", "exit 5"]);
    assert_eq!(out.status.code(), Some(5));
    // A job file.
    std::fs::write(
        p.file("job.toml"),
        "name = \"filejob\"\ntasks = 2\ncommand = \"sh\"\nargs = [\"-c\", \"echo task $CARAVEL_TASK_INDEX of $CARAVEL_TASK_COUNT $GREETING\"]\n[env]\nGREETING = \"hi\"\n[resources]\ncpu = \"500m\"\nmemory = \"64Mi\"\n",
    )
    .unwrap();
    let out = p.cli(&["submit", "-f", p.file("job.toml").to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let id: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    p.wait_state(id, &["succeeded"], Duration::from_secs(20));
    assert_eq!(p.logs(id, 1, "stdout"), "task 1 of 2 hi\n");
    let out = p.cli(&["logs", &id.to_string(), "--task", "0"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "task 0 of 2 hi\n");
    // Listings, also as JSON.
    let out = p.cli(&["jobs", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.as_array().unwrap().iter().any(|j| j["name"] == "filejob"));
    let out = p.cli(&["jobs"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.starts_with("ID ") && s.contains("filejob") && s.contains("succeeded"),
        "{s}"
    );
    let out = p.cli(&["job", "show", &id.to_string()]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("State:      succeeded") && s.contains("Runs:"),
        "{s}"
    );
    let out = p.cli(&["nodes", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["capacity"]["cpu_milli"], 2000);
}

#[test]
fn logs_follow_streams_until_the_task_ends() {
    let p = Pool::new("follow", &[("a", &["--cpus", "2"])]);
    let id = p.submit(&p.admin, json!({"command": "sh", "args": ["-c", "for i in 1 2 3; do echo line $i; sleep 0.3; done"]}));
    let out = p.cli(&["logs", &id.to_string(), "--follow"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "line 1\nline 2\nline 3\n"
    );
}

/// A torch.distributed-style rendezvous in plain Python: rank 0 listens on
/// MASTER_ADDR:MASTER_PORT, every other rank connects and sends its rank, rank 0 answers
/// everyone with the sum (an all-reduce of one number, over TCP).
const RENDEZVOUS: &str = r#"
import os, socket, time
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
if rank == 0:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(world)
    peers = [s.accept()[0] for _ in range(world - 1)]
    total = rank + sum(int(c.recv(16)) for c in peers)
    for c in peers: c.sendall(str(total).encode()); c.close()
else:
    for _ in range(300):
        try: c = socket.create_connection((addr, port)); break
        except OSError: time.sleep(0.1)
    c.sendall(str(rank).encode()); total = int(c.recv(16))
print(f"rank {rank} of {world} uid {os.getuid()} sum {total}")
"#;

#[test]
fn a_sandboxed_gang_meets_at_its_master_over_tcp() {
    let p = Pool::new(
        "rendezvous",
        &[("a", &["--cpus", "2"]), ("b", &["--cpus", "2"])],
    );
    let id = p.submit(
        &p.admin,
        json!({"command": "python3", "args": ["-c", RENDEZVOUS], "tasks": 3, "gang": true,
               "isolation": "restricted", "resources": {"cpu_milli": 1000}}),
    );
    let j = p.wait_state(id, &["succeeded", "failed"], Duration::from_secs(60));
    assert_eq!(j["state"], "succeeded", "{j} {}", p.logs(id, 0, "stderr"));
    let nodes: std::collections::BTreeSet<&str> = (0..3)
        .map(|t| j["task_list"][t]["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes.len(), 2, "the gang spans both nodes: {j}");
    for t in 0..3u32 {
        let out = p.logs(id, t, "stdout");
        // Each rank ran as the tenant's uid (the admin's tenant is tenant 1), and all
        // got 0 + 1 + 2.
        assert_eq!(out, format!("rank {t} of 3 uid 200001 sum 3\n"), "{out}");
    }
}

#[test]
fn gang_is_placed_all_or_nothing_with_a_consistent_torchrun_contract() {
    let p = Pool::new(
        "gang",
        &[
            (
                "a",
                &[
                    "--cpus", "2", "--gpus", "H100:2", "--zone", "z1", "--rack", "r1",
                ],
            ),
            (
                "b",
                &[
                    "--cpus", "2", "--gpus", "H100:2", "--zone", "z1", "--rack", "r2",
                ],
            ),
        ],
    );
    let script = "echo RANK=$RANK LOCAL_RANK=$LOCAL_RANK WORLD_SIZE=$WORLD_SIZE MASTER=$MASTER_ADDR:$MASTER_PORT CUDA=$CUDA_VISIBLE_DEVICES";
    let id = p.submit(
        &p.admin,
        json!({"command": "sh", "args": ["-c", script], "tasks": 4, "gang": true,
               "resources": {"cpu_milli": 1000, "gpu": {"model": "H100", "count": 1}}}),
    );
    let j = p.wait_state(id, &["succeeded", "failed"], Duration::from_secs(30));
    assert_eq!(j["state"], "succeeded", "{j}");
    let mut ranks = vec![];
    let mut masters = std::collections::BTreeSet::new();
    let mut per_node: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for t in 0..4u32 {
        let line = p.logs(id, t, "stdout");
        let kv: std::collections::BTreeMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .collect();
        assert_eq!(kv["RANK"], t.to_string());
        assert_eq!(kv["WORLD_SIZE"], "4");
        masters.insert(kv["MASTER"].to_string());
        ranks.push(kv["RANK"].to_string());
        let node = j["task_list"][t as usize]["node"]
            .as_str()
            .unwrap()
            .to_string();
        per_node
            .entry(node)
            .or_default()
            .push(format!("{}:{}", kv["LOCAL_RANK"], kv["CUDA"]));
    }
    assert_eq!(
        masters.len(),
        1,
        "every member agrees on the master: {masters:?}"
    );
    assert!(masters.iter().next().unwrap().starts_with("127.0.0.1:"));
    for (node, v) in &per_node {
        let mut locals: Vec<&str> = v.iter().map(|s| s.split(':').next().unwrap()).collect();
        locals.sort();
        assert_eq!(
            locals,
            (0..v.len())
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>(),
            "{node}"
        );
        let mut devs: Vec<&str> = v.iter().map(|s| s.split(':').nth(1).unwrap()).collect();
        devs.sort();
        devs.dedup();
        assert_eq!(devs.len(), v.len(), "distinct GPUs per member on {node}");
    }
    // topology = rack: both members share a rack (here: a node), via the CLI.
    let out = p.cli(&[
        "submit",
        "--gang",
        "-n",
        "2",
        "--gpus",
        "H100:1",
        "--cpus",
        "1",
        "--topology",
        "rack",
        "--",
        "true",
    ]);
    assert!(out.status.success(), "{out:?}");
    let tid: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let j = p.wait_state(tid, &["succeeded", "failed"], Duration::from_secs(30));
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["task_list"][0]["node"], j["task_list"][1]["node"], "{j}");
    assert_eq!(j["spec"]["topology"], "rack");
    let nodes = p.get(&p.admin, "/v1/nodes").unwrap();
    assert!(nodes
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["topology"]["rack"] == "r2" && n["topology"]["zone"] == "z1"));
    // A gang bigger than the pool never starts partially.
    let big = p.submit(
        &p.admin,
        json!({"command": "sleep", "args": ["60"], "tasks": 5, "gang": true,
               "resources": {"cpu_milli": 1000, "gpu": {"model": "H100", "count": 1}}}),
    );
    let j = wait_for("gang reason", Duration::from_secs(10), || {
        let j = p.job(&p.admin, big);
        (!j["pending_reasons"].as_array().unwrap().is_empty()).then_some(j)
    });
    assert_eq!(j["state"], "pending");
    assert_eq!(j["pending_reasons"][0]["code"], "gang");
    assert!(
        j["pending_reasons"][0]["message"]
            .as_str()
            .unwrap()
            .contains("only 4 of 5"),
        "{j}"
    );
    assert!(
        j["runs"].as_array().unwrap().is_empty(),
        "no member ever started"
    );
    let out = p.cli(&["job", "show", &big.to_string()]);
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("[gang] gang: only 4 of 5 tasks fit together"));
}

#[test]
fn cancel_terminates_the_process_group() {
    let p = Pool::new("cancel", &[("a", &["--cpus", "2"])]);
    let script = "trap 'echo got TERM; exit 143' TERM; sleep 300 & wait".to_string();
    let id = p.submit(
        &p.admin,
        json!({"command": "sh", "args": ["-c", script], "kill_grace_ms": 5000}),
    );
    p.wait_state(id, &["running"], Duration::from_secs(20));
    let pid: i32 = wait_for("the task's pid", Duration::from_secs(10), || {
        p.task_pid(id, 0)
    });
    // The shell has set its trap once its `sleep` runs.
    wait_for("the task's sleep", Duration::from_secs(10), || {
        (p.task_pids(id, 0).len() >= 2).then_some(())
    });
    let out = p.cli(&["cancel", &id.to_string()]);
    assert!(out.status.success(), "{out:?}");
    let j = p.wait_state(id, &["cancelled"], Duration::from_secs(10));
    assert_eq!(j["runs"][0]["state"], "killed");
    assert_eq!(
        p.logs(id, 0, "stdout"),
        "got TERM\n",
        "SIGTERM first, so the task can checkpoint"
    );
    wait_for("process gone", Duration::from_secs(5), || {
        (!pid_alive(pid)).then_some(())
    });
    // Cancelling a pending job works too, and a finished job is a conflict.
    let out = p.cli(&["cancel", &id.to_string()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already cancelled"));
}

#[test]
fn max_runtime_is_enforced() {
    let p = Pool::new("maxrt", &[("a", &["--cpus", "2"])]);
    let t0 = std::time::Instant::now();
    let id = p.submit(
        &p.admin,
        json!({"command": "sleep", "args": ["300"], "max_runtime_ms": 1000, "kill_grace_ms": 500, "max_retries": 3}),
    );
    let j = p.wait_state(id, &["failed", "succeeded"], Duration::from_secs(20));
    assert_eq!(j["state"], "failed");
    assert_eq!(j["runs"][0]["state"], "timed_out");
    assert_eq!(
        j["runs"].as_array().unwrap().len(),
        1,
        "a timeout is not retried"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    let d =
        j["runs"][0]["ended_ms"].as_i64().unwrap() - j["runs"][0]["started_ms"].as_i64().unwrap();
    assert!((1000..3000).contains(&d), "ran {d} ms");
}

#[test]
fn quota_caps_hold_jobs_with_a_reason_and_usage_is_reported() {
    let p = Pool::new("quota", &[("a", &["--cpus", "4", "--gpus", "T4:2"])]);
    let t: serde_json::Value = p
        .post(
            &p.admin,
            "/v1/tenants",
            &json!({"name": "team", "quota": {"gpus": {"T4": 1}}}),
        )
        .unwrap();
    let tok = t["token"].as_str().unwrap().to_string();
    let spec = json!({"command": "sleep", "args": ["2"], "resources": {"cpu_milli": 500, "gpu": {"model": "T4", "count": 1}}});
    let a = p.submit(&tok, spec.clone());
    let b = p.submit(&tok, spec);
    p.wait_state(a, &["running"], Duration::from_secs(10));
    let j = wait_for("quota reason", Duration::from_secs(10), || {
        let j = p.job(&tok, b);
        (j["pending_reasons"][0]["code"] == "quota").then_some(j)
    });
    assert_eq!(
        j["pending_reasons"][0]["message"],
        "quota: gpu/T4 1 of 1 in use, 1 more asked"
    );
    p.wait_state(b, &["succeeded"], Duration::from_secs(20));
    let u = p.get(&tok, "/v1/usage").unwrap();
    let row = &u["by_tenant"][0];
    assert_eq!(row["tenant"], "team");
    assert_eq!(row["runs"], 2);
    let gpu_ms = row["gpu_ms"]["T4"].as_u64().unwrap();
    let wall = row["wall_ms"].as_u64().unwrap();
    assert_eq!(
        gpu_ms, wall,
        "one T4 held for the whole wall time of each run"
    );
    assert!(wall >= 4000, "{wall}");
    assert_eq!(row["cpu_milli_ms"].as_u64().unwrap(), 500 * wall);
    assert_eq!(
        row["wall_ms_by_priority"]["batch"].as_u64(),
        Some(wall),
        "{row}"
    );
    let out = p.cli(&["usage"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("By tenant:") && s.contains("team") && s.contains("T4:"),
        "{s}"
    );
}

#[test]
fn an_owner_reclaims_its_guarantee_from_a_borrower_by_preemption() {
    let p = Pool::new("reclaim", &[("a", &["--cpus", "2"])]);
    let mk = |args: &[&str]| {
        let out = p.cli(args);
        assert!(out.status.success(), "{out:?}");
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        s.lines()
            .find_map(|l| l.strip_prefix("token: "))
            .unwrap()
            .to_string()
    };
    let owner = mk(&["tenant", "create", "owner", "--guarantee", "cpu=2"]);
    let borrower = mk(&["tenant", "create", "borrower"]);
    let out = p.cli(&["tenants"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cpu=2"),
        "{out:?}"
    );
    // The borrower takes the whole idle node; its tasks checkpoint on SIGTERM.
    let script = "trap 'echo checkpoint attempt $CARAVEL_ATTEMPT; exit 0' TERM; sleep 300 & wait";
    let b = p.submit(
        &borrower,
        json!({"command": "sh", "args": ["-c", script], "tasks": 2, "kill_grace_ms": 5000}),
    );
    p.wait_task_running(b, 0);
    p.wait_task_running(b, 1);
    let t0 = std::time::Instant::now();
    let a = p.submit(
        &owner,
        json!({"command": "echo", "args": ["owner runs"], "tasks": 2}),
    );
    let j = p.wait_state(a, &["succeeded", "failed"], Duration::from_secs(20));
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "reclaimed within grace + a cycle"
    );
    let jb = p.job(&p.admin, b);
    let runs = jb["runs"].as_array().unwrap();
    assert!(
        runs.iter().filter(|r| r["state"] == "preempted").count() == 2,
        "{jb}"
    );
    assert!(jb["task_list"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["retries_used"] == 0));
    let out = p.text(
        &p.admin,
        &format!("/v1/jobs/{b}/logs?task=0&run={}", runs[0]["id"]),
    );
    assert_eq!(
        out, "checkpoint attempt 1\n",
        "SIGTERM came first, so the task could checkpoint"
    );
    // With the owner done, the borrower's tasks run again on the idle capacity.
    wait_for("borrower back", Duration::from_secs(20), || {
        let j = p.job(&p.admin, b);
        (j["task_list"][0]["state"] == "running" && j["task_list"][1]["state"] == "running")
            .then_some(())
    });
    p.post(&p.admin, &format!("/v1/jobs/{b}/cancel"), &json!({}))
        .unwrap();
}

#[test]
fn fractional_gpus_share_a_device_and_jobs_may_accept_several_models() {
    let p = Pool::new("frac", &[("a", &["--cpus", "4", "--gpus", "T4:2"])]);
    let out = p.cli(&[
        "submit",
        "-n",
        "4",
        "--cpus",
        "500m",
        "--gpus",
        "T4:0.25",
        "--",
        "sh",
        "-c",
        "echo dev=$CUDA_VISIBLE_DEVICES milli=$CARAVEL_GPU_MILLI; sleep 1",
    ]);
    assert!(out.status.success(), "{out:?}");
    let id: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    // All four quarters run at once, packed onto one device.
    let j = wait_for("four quarters running", Duration::from_secs(20), || {
        let j = p.job(&p.admin, id);
        (j["tasks_running"] == 4).then_some(j)
    });
    let nodes = p.get(&p.admin, "/v1/nodes").unwrap();
    let shared = &nodes[0]["shared_devices"];
    assert_eq!(shared.as_object().unwrap().len(), 1, "{nodes}");
    assert!(
        nodes[0]["allocated_devices"].as_array().unwrap().is_empty(),
        "the other T4 stays whole"
    );
    let j2 = p.wait_state(id, &["succeeded", "failed"], Duration::from_secs(20));
    assert_eq!(j2["state"], "succeeded", "{j} {j2}");
    let dev = p.logs(id, 0, "stdout");
    for t in 1..4 {
        assert_eq!(p.logs(id, t, "stdout"), dev, "same device, same share");
    }
    assert!(dev.ends_with("milli=250\n"), "{dev}");
    // Metering counts a quarter of a device.
    let u = p.get(&p.admin, &format!("/v1/usage?job={id}")).unwrap();
    let row = &u["by_job"][0];
    let wall = row["wall_ms"].as_u64().unwrap();
    let gpu = row["gpu_ms"]["T4"].as_u64().unwrap();
    // Each run's share is rounded down to the millisecond on its own.
    assert!((wall / 4).abs_diff(gpu) <= 4, "{row}");
    assert!(wall >= 4000, "{row}");
    // A job that prefers H100 but accepts T4 runs on the T4 this pool has.
    let out = p.cli(&[
        "submit",
        "--wait",
        "--gpus",
        "H100|T4:1",
        "--",
        "sh",
        "-c",
        "echo on $CUDA_VISIBLE_DEVICES",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = p.cli(&["submit", "--gpus", "T4:1.5", "--", "true"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a fraction must be less than one device"),
        "{out:?}"
    );
}
