//! Task checkpoints kept by the control plane: a task resumes from its last checkpoint on
//! whatever node runs it next, with no filesystem shared between the nodes.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{wait_for, Pool};

/// A "trainer" in sh: resumes from `$CARAVEL_CHECKPOINT_DIR/step`, takes a step every
/// `pause` seconds and saves it by rename (the checkpoint contract), and says where it
/// started.
fn trainer(pause: &str, steps: u32) -> String {
    format!(
        r#"d="$CARAVEL_CHECKPOINT_DIR"; step=0
[ -f "$d/step" ] && step=$(cat "$d/step")
echo "attempt $CARAVEL_ATTEMPT starts at step $step (checkpoint version $CARAVEL_CHECKPOINT_VERSION)"
while [ $step -lt {steps} ]; do
  step=$((step+1)); echo $step > "$d/.step.tmp"; mv "$d/.step.tmp" "$d/step"; sleep {pause}
done
echo "finished at step $step""#
    )
}

fn checkpoints(p: &Pool, id: u64) -> Vec<Value> {
    p.get(&p.admin, &format!("/v1/jobs/{id}/checkpoints"))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_task_resumes_from_its_checkpoint_on_another_node_when_its_node_dies() {
    let mut p = Pool::new(
        "ckptnode",
        &[("a", &["--cpus", "1"]), ("b", &["--cpus", "1"])],
    );
    let id = p.submit(
        &p.admin,
        json!({"command": "sh", "args": ["-c", trainer("2.5", 10)], "max_retries": 1}),
    );
    let j = p.wait_task_running(id, 0);
    let first = j["task_list"][0]["node"].as_str().unwrap().to_string();
    // Steps are saved while the task runs, not only when it ends.
    let saved = wait_for("step 2 saved", Duration::from_secs(30), || {
        checkpoints(&p, id)
            .first()
            .filter(|c| c["version"].as_u64() >= Some(2))
            .cloned()
    });
    assert_eq!(saved["task"], 0);
    assert_eq!(saved["run"], j["runs"][0]["id"], "{saved} {j}");
    let victim = if first == p.node_name("a") { "a" } else { "b" };
    p.kill9_agent(victim);
    let j = p.job(&p.admin, id);
    assert_eq!(
        j["state"], "running",
        "the test needs the first run cut off midway, not finished: {j}"
    );
    let j = p.wait_state(id, &["succeeded", "failed"], Duration::from_secs(60));
    assert_eq!(j["state"], "succeeded", "{j}");
    let runs = j["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{j}");
    assert_eq!(runs[0]["state"], "lost");
    assert_ne!(
        runs[1]["node"],
        first.as_str(),
        "the second run is on the other node"
    );
    let out = p.logs(id, 0, "stdout");
    let start: u32 = out
        .lines()
        .find_map(|l| l.strip_prefix("attempt 2 starts at step "))
        .and_then(|l| l.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no start line from attempt 2: {out}"));
    assert!(
        start >= saved["version"].as_u64().unwrap() as u32,
        "attempt 2 resumed at step {start}, before the step saved ({saved}): {out}"
    );
    assert!(out.contains("finished at step 10"), "{out}");
    // What the second run saved is the task's newest checkpoint, and the CLI fetches it.
    let c = &checkpoints(&p, id)[0];
    assert_eq!(c["run"], runs[1]["id"], "{c}");
    let dir = p.file("fetched");
    let o = p.cli(&[
        "checkpoint",
        "get",
        &id.to_string(),
        "--extract",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        std::fs::read_to_string(dir.join("step")).unwrap().trim(),
        "10"
    );
    assert!(
        !dir.join(".step.tmp").exists(),
        "hidden names are never saved"
    );
    let o = p.cli(&["checkpoint", "ls", &id.to_string()]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.starts_with("TASK"), "{table}");
    assert!(
        table.lines().nth(1).unwrap().split_whitespace().nth(3) == Some(&runs[1]["id"].to_string()),
        "{table}"
    );
}

#[test]
fn what_a_task_writes_on_sigterm_is_saved_before_its_gang_restarts() {
    let p = Pool::new("ckptterm", &[("a", &["--cpus", "2"])]);
    // Task 0 checkpoints only when told to stop; task 1 fails its first attempt, which
    // stops task 0 and restarts the gang.
    let script = r#"d="$CARAVEL_CHECKPOINT_DIR"
if [ "$CARAVEL_TASK_INDEX" = 1 ]; then
  [ "$CARAVEL_ATTEMPT" = 1 ] && { sleep 2; exit 1; }
  exit 0
fi
if [ -f "$d/state" ]; then echo "found $(cat "$d/state")"; exit 0; fi
echo "attempt $CARAVEL_ATTEMPT waits"
trap 'echo "saved at SIGTERM" > "$d/.t"; mv "$d/.t" "$d/state"; exit 143' TERM
sleep 300 & wait"#;
    let id = p.submit(
        &p.admin,
        json!({"command": "sh", "args": ["-c", script], "tasks": 2, "gang": true,
               "max_retries": 1, "resources": {"cpu_milli": 100}}),
    );
    let j = p.wait_state(id, &["succeeded", "failed"], Duration::from_secs(60));
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(p.logs(id, 0, "stdout"), "found saved at SIGTERM\n");
    let c = checkpoints(&p, id);
    assert_eq!(
        c.len(),
        1,
        "task 1 wrote nothing, so it has no checkpoint: {c:?}"
    );
    assert_eq!(
        (c[0]["task"].as_u64(), c[0]["version"].as_u64()),
        (Some(0), Some(1))
    );
    let first_run = j["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["index"] == 0 && r["attempt"] == 1)
        .unwrap();
    assert_eq!(
        c[0]["run"], first_run["id"],
        "saved by the run that was stopped"
    );
    // Everything was on the server when each run ended: the node kept no copy. With the
    // checkpoint folder gone and the output shipped, the run's whole folder goes (a copy
    // left behind would keep it until the agent's --run-retention), and its output is
    // still there, from the server.
    let first = p
        .file("agent-a")
        .join("runs")
        .join(first_run["id"].to_string());
    wait_for(
        "the first run's folder removed",
        Duration::from_secs(20),
        || (!first.exists()).then_some(()),
    );
    let (status, _, out) = p.raw(&format!("/v1/jobs/{id}/logs?run={}", first_run["id"]));
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&out), "attempt 1 waits\n");
}

fn put(p: &Pool, token: &str, path: &str, sha: &str, body: Vec<u8>) -> (u16, Value) {
    let r = reqwest::blocking::Client::new()
        .put(format!("{}{path}", p.url))
        .bearer_auth(token)
        .header("x-caravel-sha256", sha)
        .body(body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn sha(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[test]
fn checkpoint_uploads_and_downloads_are_checked() {
    let p = Pool::with_server_args(
        "ckptapi",
        &["--checkpoint-max-size", "64Ki"],
        &[("a", &["--cpus", "1"])],
    );
    let id = p.submit(&p.admin, json!({"command": "sleep", "args": ["300"]}));
    let j = p.wait_task_running(id, 0);
    let run = j["runs"][0]["id"].as_u64().unwrap();
    let path = format!("/v1/jobs/{id}/tasks/0/checkpoint?run={run}");
    // A real archive, made as the agent makes it.
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir(t.path().join("d")).unwrap();
    std::fs::write(t.path().join("d/model"), b"weights").unwrap();
    let l = caravel_agent::checkpoint::list(&t.path().join("d")).unwrap();
    caravel_agent::checkpoint::pack(&t.path().join("d"), &l, &t.path().join("a.tar")).unwrap();
    let tar = std::fs::read(t.path().join("a.tar")).unwrap();

    let (s, e) = p
        .get(&p.admin, &format!("/v1/jobs/{id}/tasks/0/checkpoint"))
        .unwrap_err();
    assert_eq!(s, 404);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("has no checkpoint"),
        "{e}"
    );

    // Only agents (and the admin) save checkpoints.
    let tenant = p
        .post(&p.admin, "/v1/tenants", &json!({"name": "other"}))
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(put(&p, &tenant, &path, &sha(&tar), tar.clone()).0, 403);
    assert_eq!(put(&p, "", &path, &sha(&tar), tar.clone()).0, 401);
    let (s, e) = put(&p, &p.agent_token, &path, "abc", tar.clone());
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (400, Some("x-caravel-sha256")),
        "{e}"
    );
    // Damaged on the way.
    let (s, e) = put(&p, &p.agent_token, &path, &sha(b"other"), tar.clone());
    assert_eq!(s, 400, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("damaged"),
        "{e}"
    );
    // Not an archive, or one cut short.
    let (s, e) = put(&p, &p.agent_token, &path, &sha(b"hello"), b"hello".to_vec());
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (400, Some("body")),
        "{e}"
    );
    let cut = tar[..tar.len() - 512].to_vec();
    let (s, e) = put(&p, &p.agent_token, &path, &sha(&cut), cut);
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (400, Some("body")),
        "{e}"
    );
    // Past --checkpoint-max-size.
    let big = vec![0u8; 65 * 1024];
    let (s, e) = put(&p, &p.agent_token, &path, &sha(&big), big);
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (413, Some("too_large")),
        "{e}"
    );
    // A run that is not the task's current one.
    let stale = format!("/v1/jobs/{id}/tasks/0/checkpoint?run={}", run + 100);
    let (s, e) = put(&p, &p.agent_token, &stale, &sha(&tar), tar.clone());
    assert_eq!(s, 409, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not the current run"),
        "{e}"
    );
    let bad_task = format!("/v1/jobs/{id}/tasks/1/checkpoint?run={run}");
    let (s, e) = put(&p, &p.agent_token, &bad_task, &sha(&tar), tar.clone());
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (400, Some("index")),
        "{e}"
    );
    assert_eq!(
        checkpoints(&p, id),
        Vec::<Value>::new(),
        "nothing refused was kept"
    );
    assert!(
        std::fs::read_dir(
            p.data_dir()
                .join("checkpoints")
                .join(id.to_string())
                .join("0")
        )
        .unwrap()
        .next()
        .is_none(),
        "no upload left behind"
    );

    let (s, v) = put(&p, &p.agent_token, &path, &sha(&tar), tar.clone());
    assert_eq!((s, v["version"].as_u64()), (201, Some(1)), "{v}");
    let r = reqwest::blocking::Client::new()
        .get(format!("{}/v1/jobs/{id}/tasks/0/checkpoint", p.url))
        .bearer_auth(&p.admin)
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-caravel-checkpoint-version"], "1");
    assert_eq!(r.headers()["x-caravel-sha256"], sha(&tar).as_str());
    assert_eq!(r.bytes().unwrap().to_vec(), tar);
    // Another tenant does not see the job, nor its checkpoints.
    assert_eq!(
        p.get(&tenant, &format!("/v1/jobs/{id}/checkpoints"))
            .unwrap_err()
            .0,
        404
    );
    assert_eq!(
        p.get(&tenant, &format!("/v1/jobs/{id}/tasks/0/checkpoint"))
            .unwrap_err()
            .0,
        404
    );
    // Each outcome is counted.
    let m = p.text(&p.admin, "/metrics");
    for (outcome, n) in [
        ("saved", 1),
        ("stale", 1),
        ("too_large", 1),
        ("damaged", 3),
        ("invalid", 2),
    ] {
        let line = format!("caravel_checkpoint_saves_total{{outcome=\"{outcome}\"}} {n}");
        assert!(m.contains(&line), "no `{line}` in\n{m}");
    }
    assert!(
        m.contains(&format!(
            "caravel_checkpoint_saved_bytes_total {}",
            tar.len()
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "caravel_checkpoint_served_bytes_total {}",
            tar.len()
        )),
        "{m}"
    );
    // A destination the CLI cannot write is named.
    let o = p.cli(&[
        "checkpoint",
        "get",
        &id.to_string(),
        "--to",
        "/nonexistent/x.tar",
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("/nonexistent/x.tar"),
        "{o:?}"
    );
    // A bad flag value is refused with the flag's name.
    let o = std::process::Command::new(crate::harness::BIN)
        .args(["server", "--checkpoint-max-size", "0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--checkpoint-max-size"),
        "{o:?}"
    );
}

#[test]
fn preemption_stops_the_task_that_saved_its_work_last_not_the_newest() {
    let p = Pool::new("ckptvictim", &[("a", &["--cpus", "2"])]);
    let spot = |script: &str| {
        p.submit(
            &p.admin,
            json!({"command": "sh", "args": ["-c", script], "priority": "spot",
                   "resources": {"cpu_milli": 1000}}),
        )
    };
    // The older spot task saves a checkpoint after the newer one started; without
    // checkpoints the newer one (least work done) would be the victim.
    let older = spot(
        r#"sleep 2; echo 1 > "$CARAVEL_CHECKPOINT_DIR/.s"; mv "$CARAVEL_CHECKPOINT_DIR/.s" "$CARAVEL_CHECKPOINT_DIR/step"; sleep 300"#,
    );
    p.wait_task_running(older, 0);
    std::thread::sleep(Duration::from_millis(500));
    let newer = spot("sleep 300");
    p.wait_task_running(newer, 0);
    wait_for(
        "the older task's checkpoint",
        Duration::from_secs(20),
        || (!checkpoints(&p, older).is_empty()).then_some(()),
    );
    let batch = p.submit(
        &p.admin,
        json!({"command": "true", "resources": {"cpu_milli": 1000}}),
    );
    p.wait_state(batch, &["succeeded"], Duration::from_secs(60));
    let o = p.job(&p.admin, older);
    let n = p.job(&p.admin, newer);
    assert_eq!(o["runs"][0]["state"], "preempted", "{o}");
    assert_eq!(n["runs"][0]["state"], "running", "{n}");
}
