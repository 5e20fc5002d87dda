//! Task output shipped to the control plane: `caravel logs` answers after the node that
//! ran the task is gone, and agents remove the folders of runs the server holds.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{wait_for, Pool};

fn run_dir(p: &Pool, agent: &str, run: &Value) -> PathBuf {
    p.dir
        .path()
        .join(format!("agent-{agent}"))
        .join("runs")
        .join(run.as_u64().unwrap().to_string())
}

fn header(h: &reqwest::header::HeaderMap, k: &str) -> String {
    h.get(k)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn output_outlives_the_run_folder_and_the_node() {
    let mut p = Pool::new("logship", &[("a", &["--log-ship-every", "300ms"])]);
    let id = p.submit(
        &p.admin,
        json!({"command": "sh", "args": ["-c", "echo one; echo two; echo err >&2; printf 'no newline'"]}),
    );
    let j = p.wait_state(id, &["succeeded", "failed"], Duration::from_secs(30));
    assert_eq!(j["state"], "succeeded", "{j}");
    let dir = run_dir(&p, "a", &j["runs"][0]["id"]);
    // Once the server holds all of a run's output, the node's copy goes.
    wait_for("the run folder removed", Duration::from_secs(45), || {
        (!dir.exists()).then_some(())
    });
    let (status, h, body) = p.raw(&format!("/v1/jobs/{id}/logs"));
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&body), "one\ntwo\nno newline");
    assert_eq!(header(&h, "x-caravel-log-source"), "server");
    assert_eq!(header(&h, "x-caravel-done"), "1");
    assert_eq!(header(&h, "x-caravel-next-offset"), "18");
    // Reads from an offset, as `--follow` does.
    let (_, h, body) = p.raw(&format!("/v1/jobs/{id}/logs?offset=8"));
    assert_eq!(String::from_utf8_lossy(&body), "no newline");
    assert_eq!(header(&h, "x-caravel-log-from"), "8");
    assert_eq!(p.logs(id, 0, "stderr"), "err\n");
    assert_eq!(header(&h, "x-caravel-log-end"), "18");
    let tail = |n: &str| {
        let out = p.cli(&["logs", &id.to_string(), "--tail", n]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(tail("2"), "two\nno newline");
    assert_eq!(tail("1"), "no newline");
    assert_eq!(tail("0"), "");
    assert_eq!(tail("9"), "one\ntwo\nno newline");
    // With cgroups killing every process of a run, the folder is kept emptied as a spare
    // for the next run (no inodes freed and made again); the next run's output is its
    // own.
    let agent_log = std::fs::read_to_string(p.file("agent-a.log")).unwrap();
    let mut bytes = 18 + 4;
    if agent_log.contains("resource limits through") {
        bytes += 2;
        let spare = p.file("agent-a").join("runs").join(".spare");
        let spares: Vec<PathBuf> = std::fs::read_dir(&spare)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(spares.len(), 1, "{spares:?}");
        assert_eq!(
            std::fs::metadata(spares[0].join("stdout.log"))
                .unwrap()
                .len(),
            0
        );
        let id2 = p.submit(&p.admin, json!({"command": "sh", "args": ["-c", "echo 2"]}));
        let j2 = p.wait_state(id2, &["succeeded"], Duration::from_secs(30));
        assert!(!spares[0].exists(), "the spare was taken");
        let dir2 = run_dir(&p, "a", &j2["runs"][0]["id"]);
        wait_for(
            "the second run folder removed",
            Duration::from_secs(45),
            || (!dir2.exists()).then_some(()),
        );
        assert_eq!(p.logs(id2, 0, "stdout"), "2\n");
        assert_eq!(p.logs(id2, 0, "stderr"), "");
    }
    p.kill9_agent("a");
    let out = p.cli(&["logs", &id.to_string()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\ntwo\nno newline");
    let metrics = p.text(&p.admin, "/metrics");
    let shipped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("caravel_log_shipped_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no shipped-bytes counter: {metrics}"));
    assert_eq!(shipped, bytes, "each byte counted once");
}

#[test]
fn what_a_dead_node_shipped_is_readable_and_its_restarted_agent_ships_the_rest() {
    let mut p = Pool::new("logdead", &[("a", &["--log-ship-every", "300ms"])]);
    let id = p.submit(
        &p.admin,
        json!({"command": "sh", "args": ["-c", "i=0; while true; do i=$((i+1)); echo line $i; sleep 0.05; done"]}),
    );
    let j = p.wait_task_running(id, 0);
    let run = j["runs"][0]["id"].clone();
    let kept = p.data_dir().join("logs").join(id.to_string());
    let prefix = format!("{run}.stdout.");
    // Shipped while it runs, not only at the end.
    wait_for("line 20 shipped", Duration::from_secs(30), || {
        let f = std::fs::read_dir(&kept)
            .ok()?
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))?;
        let text = std::fs::read_to_string(f.path()).ok()?;
        text.contains("line 20\n").then_some(())
    });
    // The last lines of a running task, read back from the end of the node's file: two
    // lines in a row, the second at least line 20, and nothing after them.
    let out = p.cli(&["logs", &id.to_string(), "--tail", "2"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let nums: Vec<u32> = text
        .lines()
        .map(|l| l.strip_prefix("line ").unwrap().parse().unwrap())
        .collect();
    assert!(
        nums.len() == 2 && nums[1] == nums[0] + 1 && nums[1] >= 20 && text.ends_with('\n'),
        "{text:?}"
    );
    p.kill9_agent("a");
    let j = p.wait_state(id, &["failed", "lost", "pending"], Duration::from_secs(30));
    let (status, h, body) = p.raw(&format!("/v1/jobs/{id}/logs?run={run}"));
    assert_eq!(status, 200, "{j}");
    let text = String::from_utf8_lossy(&body).to_string();
    assert!(
        text.starts_with("line 1\nline 2\n") && text.contains("line 20\n"),
        "{text}"
    );
    assert_eq!(header(&h, "x-caravel-log-source"), "server");
    assert_eq!(header(&h, "x-caravel-done"), "1", "the run is over");
    // The node's file has what the process wrote up to its death; a restarted agent ships
    // the rest of it and then removes the folder.
    let dir = run_dir(&p, "a", &run);
    let full = std::fs::read_to_string(dir.join("stdout.log")).unwrap();
    assert!(full.len() >= text.len());
    p.start_agent("a", &["--log-ship-every", "300ms"]);
    wait_for(
        "the old run folder removed",
        Duration::from_secs(45),
        || (!dir.exists()).then_some(()),
    );
    let (_, h, body) = p.raw(&format!("/v1/jobs/{id}/logs?run={run}"));
    assert_eq!(String::from_utf8_lossy(&body), full);
    assert_eq!(header(&h, "x-caravel-log-source"), "server");
}

#[test]
fn a_stream_beyond_the_server_limit_keeps_its_end() {
    let p = Pool::with_server_args(
        "loglimit",
        &["--log-max-size", "256Ki"],
        &[("a", &["--log-ship-every", "300ms"])],
    );
    let id = p.submit(
        &p.admin,
        json!({"command": "sh", "args": ["-c", "seq 1 300000"]}),
    );
    let j = p.wait_state(id, &["succeeded", "failed"], Duration::from_secs(30));
    assert_eq!(j["state"], "succeeded", "{j}");
    let dir = run_dir(&p, "a", &j["runs"][0]["id"]);
    wait_for("the run folder removed", Duration::from_secs(45), || {
        (!dir.exists()).then_some(())
    });
    let out = p.cli(&["logs", &id.to_string()]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.ends_with("299999\n300000\n"));
    assert!(
        stdout.len() <= 256 << 10 && stdout.len() >= 128 << 10,
        "{}",
        stdout.len()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no longer kept"), "{stderr}");
    // The last lines are read back from the end, without the dropped start.
    let out = p.cli(&["logs", &id.to_string(), "-n", "3"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "299998\n299999\n300000\n"
    );
    assert!(out.stderr.is_empty(), "{out:?}");
    // The whole output was 2,088,895 bytes: what the CLI printed is its end.
    let all: String = (1..=300_000).map(|i| format!("{i}\n")).collect();
    assert!(all.ends_with(stdout.as_ref()));
}

#[test]
fn bad_shipments_are_refused_whole_and_unknown_runs_and_gaps_are_answered() {
    let p = Pool::new("logbad", &[("a", &[])]);
    // Fails its first attempt: the run shipped to below is no longer the task's newest,
    // so the server finds it in the store.
    let id = p.submit(
        &p.admin,
        json!({"command": "sh", "args": ["-c", "[ $CARAVEL_ATTEMPT = 1 ] && exit 1; exit 0"], "max_retries": 1}),
    );
    let j = p.wait_state(id, &["succeeded"], Duration::from_secs(30));
    assert_eq!(j["runs"].as_array().unwrap().len(), 2, "{j}");
    let run = j["runs"][0]["id"].as_u64().unwrap();
    // `run + 1000` is no run of this pool.
    let entry = |stream: &str, offset: u64, data: &str| json!({"job": id, "index": 0, "run": run + 1000, "stream": stream, "offset": offset, "data": data});
    let agent = p.agent_token.clone();
    let post = |token: &str, entries: Value| {
        p.post(token, "/v1/agent/logs", &json!({ "entries": entries }))
    };
    assert!(post(&p.admin, json!([])).is_ok(), "the admin may ship");
    let tenant = p
        .post(&p.admin, "/v1/tenants", &json!({"name": "logbad-t"}))
        .unwrap();
    let (code, _) = post(tenant["token"].as_str().unwrap(), json!([])).unwrap_err();
    assert_eq!(code, 403, "a tenant may not");
    let own = |stream: &str, offset: u64, data: &str| json!({"job": id, "index": 0, "run": run, "stream": stream, "offset": offset, "data": data});
    for (entries, field) in [
        (
            json!([own("stdout", 0, "aGk="), entry("stdin", 0, "")]),
            "entries[1].stream",
        ),
        (
            json!([entry("stdout", 0, "not base64!")]),
            "entries[0].data",
        ),
        (
            json!([{"job": id, "index": 0, "run": run, "stream": "stdout", "offset": u64::MAX, "data": "aGk="}]),
            "entries[0].offset",
        ),
        (
            json!([{"job": id, "index": 0, "run": run, "stream": "stdout", "offset": 0, "colour": 1}]),
            "entries[0]",
        ),
    ] {
        let (code, e) = post(&agent, entries).unwrap_err();
        assert_eq!(code, 400, "{e}");
        assert!(
            e["error"]["field"]
                .as_str()
                .unwrap_or("")
                .starts_with(field),
            "{field}: {e}"
        );
    }
    // Nothing of a refused batch was kept: its first entry was good, and the run printed
    // nothing.
    let r = post(&agent, json!([own("stdout", 0, "")])).unwrap();
    assert_eq!(
        r["results"][0],
        json!({"state": "ok", "end": 0, "done": r["results"][0]["done"]})
    );
    let r = post(&agent, json!([own("stderr", 0, "")])).unwrap();
    assert_eq!(r["results"][0]["state"], "ok");
    let held = r["results"][0]["end"].as_u64().unwrap();
    // A gap is answered with the length held; a run of another job is unknown.
    let r = post(
        &agent,
        json!([
            own("stderr", held + 5, "aGk="),
            entry("stdout", 0, "aGk="),
            {"job": id + 1, "index": 0, "run": run, "stream": "stdout", "offset": 0, "data": ""},
        ]),
    )
    .unwrap();
    assert_eq!(
        r["results"][0],
        json!({"state": "gap", "end": held, "done": r["results"][0]["done"]})
    );
    assert_eq!(r["results"][1]["state"], "unknown");
    assert_eq!(r["results"][2]["state"], "unknown");
    assert!(r["limit"].as_u64().unwrap() > 0);
    assert!(!p
        .data_dir()
        .join("logs")
        .join(id.to_string())
        .join((run + 1000).to_string())
        .exists());
    assert!(!p
        .data_dir()
        .join("logs")
        .join((id + 1).to_string())
        .exists());
    // A resend of bytes held adds nothing.
    let r1 = post(&agent, json!([own("stderr", held, "aGk=")])).unwrap();
    let r2 = post(&agent, json!([own("stderr", held, "aGk=")])).unwrap();
    assert_eq!(r1["results"][0]["end"], held + 2);
    assert_eq!(r2["results"][0]["end"], held + 2);
}

#[test]
fn a_tenant_storage_quota_caps_its_checkpoints_and_output() {
    let p = Pool::new("logquota", &[("a", &["--log-ship-every", "300ms"])]);
    let (code, e) = p
        .post(
            &p.admin,
            "/v1/tenants",
            &json!({"name": "greedy", "guarantee": {"storage_bytes": 1000}}),
        )
        .unwrap_err();
    assert_eq!(code, 400);
    assert_eq!(e["error"]["field"], "guarantee.storage_bytes", "{e}");
    let t = p
        .post(
            &p.admin,
            "/v1/tenants",
            &json!({"name": "small", "quota": {"storage_bytes": 100 << 10}}),
        )
        .unwrap();
    let tok = t["token"].as_str().unwrap().to_string();
    assert_eq!(t["storage_used_bytes"], 0);
    // 60 KiB of checkpoint: kept, and counted.
    let save = r#"head -c 61440 /dev/urandom > "$CARAVEL_CHECKPOINT_DIR/.w"; mv "$CARAVEL_CHECKPOINT_DIR/.w" "$CARAVEL_CHECKPOINT_DIR/w"; sleep 2"#;
    let a = p.submit(&tok, json!({"command": "sh", "args": ["-c", save]}));
    p.wait_state(a, &["succeeded"], Duration::from_secs(30));
    let ck = p.get(&tok, &format!("/v1/jobs/{a}/checkpoints")).unwrap();
    assert_eq!(ck.as_array().unwrap().len(), 1, "{ck}");
    let used = |p: &Pool| {
        p.get(&tok, "/v1/tenants").unwrap()[0]["storage_used_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(used(&p) >= 60 << 10, "{}", used(&p));
    // Another 60 KiB would pass the quota: refused, and the job has none.
    let b = p.submit(&tok, json!({"command": "sh", "args": ["-c", save]}));
    p.wait_state(b, &["succeeded"], Duration::from_secs(30));
    let ck = p.get(&tok, &format!("/v1/jobs/{b}/checkpoints")).unwrap();
    assert_eq!(ck.as_array().unwrap().len(), 0, "{ck}");
    let metrics = p.text(&p.admin, "/metrics");
    assert!(
        metrics.contains("caravel_checkpoint_saves_total{outcome=\"over_quota\"} 1"),
        "{metrics}"
    );
    // 60 KiB of output does not fit either: it stays on the node, and is read from there.
    let c = p.submit(
        &tok,
        json!({"command": "sh", "args": ["-c", "head -c 61440 /dev/zero | tr '\\0' x"]}),
    );
    let j = p.wait_state(c, &["succeeded"], Duration::from_secs(30));
    let dir = run_dir(&p, "a", &j["runs"][0]["id"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(dir.exists(), "the output the server would not take stays");
    let (status, h, body) = p.raw(&format!("/v1/jobs/{c}/logs"));
    assert_eq!(status, 200);
    assert_eq!(body.len(), 61440);
    assert_eq!(header(&h, "x-caravel-log-source"), "node");
    assert!(used(&p) <= 100 << 10, "{}", used(&p));
    // Other tenants are not held to it.
    let d = p.submit(
        &p.admin,
        json!({"command": "sh", "args": ["-c", "head -c 61440 /dev/zero | tr '\\0' y"]}),
    );
    let j = p.wait_state(d, &["succeeded"], Duration::from_secs(30));
    let dir = run_dir(&p, "a", &j["runs"][0]["id"]);
    wait_for(
        "the other tenant's run folder removed",
        Duration::from_secs(45),
        || (!dir.exists()).then_some(()),
    );
    let metrics = p.text(&p.admin, "/metrics");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("caravel_tenant_storage_bytes{tenant=\"small\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let held: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((60 << 10..=100 << 10).contains(&held), "{line}");
    let out = p.cli(&["tenants"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(|l| l.starts_with("small")
            && l.contains("storage=100Ki")
            && l.contains(" of 100Ki")),
        "{text}"
    );
}

#[test]
fn output_shipped_across_a_server_crash_that_lost_appends_is_whole_and_not_doubled() {
    let mut p = Pool::new("logcrash", &[("a", &["--log-ship-every", "200ms"])]);
    let id = p.submit(
        &p.admin,
        json!({"command": "sh", "args": ["-c", "i=0; while [ $i -lt 100 ]; do i=$((i+1)); echo line $i; sleep 0.05; done"]}),
    );
    let j = p.wait_task_running(id, 0);
    let run = j["runs"][0]["id"].clone();
    let chunk = p
        .data_dir()
        .join("logs")
        .join(id.to_string())
        .join(format!("{run}.stdout.00000000000000000000.log"));
    wait_for("line 10 shipped", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&chunk).ok()?;
        text.contains("line 10\n").then_some(())
    });
    p.kill9_server();
    // As if the machine had died before the last appends reached the disk: the server
    // comes back with less than the agent was told it holds, cut mid-line.
    let len = std::fs::metadata(&chunk).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&chunk)
        .unwrap()
        .set_len(len / 2 + 3)
        .unwrap();
    p.start_server();
    let j = p.wait_state(id, &["succeeded", "failed"], Duration::from_secs(60));
    assert_eq!(j["state"], "succeeded", "{j}");
    // Once more after the run ended and the server acknowledged all of its output: the
    // agent keeps its copy until it has seen the server still hold all of it 10 s later.
    let end = chunk.with_extension("end");
    wait_for(
        "the output acknowledged done",
        Duration::from_secs(30),
        || end.exists().then_some(()),
    );
    let dir = run_dir(&p, "a", &run);
    assert!(dir.exists(), "the node's copy stays until it is checked");
    p.kill9_server();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&end)
        .unwrap()
        .set_len(100)
        .unwrap();
    p.start_server();
    wait_for("the run folder removed", Duration::from_secs(45), || {
        (!dir.exists()).then_some(())
    });
    let expected: String = (1..=100).map(|i| format!("line {i}\n")).collect();
    let (_, h, body) = p.raw(&format!("/v1/jobs/{id}/logs"));
    assert_eq!(header(&h, "x-caravel-log-source"), "server");
    assert_eq!(String::from_utf8_lossy(&body), expected);
}
