use std::time::Duration;

use serde_json::json;

use crate::harness::*;

#[test]
fn metrics_openapi_and_agent_cgroup_limits() {
    let p = Pool::new("surface", &[("a", &["--cpus", "2"])]);
    let id = p.submit(
        &p.admin,
        json!({"command": "sh", "args": ["-c", "cat /proc/self/cgroup"], "resources": {"cpu_milli": 500, "memory_bytes": 67108864}}),
    );
    p.wait_state(id, &["succeeded"], Duration::from_secs(20));
    let m = p.text(&p.admin, "/metrics");
    for name in [
        "caravel_queue_depth",
        "caravel_running_tasks",
        "caravel_nodes{state=\"ready\"} 1",
        "caravel_scheduling_cycle_seconds_bucket",
        "caravel_scheduling_passes_total{pass=",
        "caravel_store_commit_seconds_bucket",
        "caravel_store_commit_failures_total 0",
        "caravel_log_stored_bytes ",
        "caravel_api_requests_total{method=\"POST\",code=\"201\"}",
    ] {
        assert!(m.contains(name), "metrics lack {name}:\n{m}");
    }
    let doc = p.get("", "/v1/openapi.json").unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/cancel",
        "/v1/jobs/{id}/logs",
        "/v1/nodes",
        "/v1/tenants",
        "/v1/usage",
        "/v1/agent/register",
        "/v1/agent/sync",
        "/v1/agent/events",
        "/v1/agent/shutdown",
        "/v1/agent/logs",
    ] {
        assert!(doc["paths"][path].is_object(), "openapi lacks {path}");
    }
    // Limits: where this machine offers cgroup v1 (as root), the task ran inside its own
    // cpu and memory cgroups with the requested limits.
    let v1 = std::path::Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists()
        && std::path::Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
        // SAFETY: geteuid has no preconditions.
        && unsafe { libc::geteuid() } == 0;
    let cg = p.logs(id, 0, "stdout");
    let agent_log = std::fs::read_to_string(p.file("agent-a.log")).unwrap();
    if v1 {
        let run = p.job(&p.admin, id)["runs"][0]["id"].as_u64().unwrap();
        let want = format!("/caravel/{}/run-{run}", p.node_name("a"));
        assert!(
            cg.lines()
                .any(|l| l.contains(":cpu:") || l.contains(":cpu,") && l.ends_with(&want)),
            "{cg}"
        );
        assert!(
            cg.lines()
                .any(|l| l.contains(":memory:") && l.ends_with(&want)),
            "{cg}"
        );
        assert!(
            agent_log.contains("resource limits through cgroup v1"),
            "{agent_log}"
        );
        // And they are enforced: a task that allocates past its memory limit dies.
        let hog = p.submit(
            &p.admin,
            json!({"command": "python3", "args": ["-c", "b = bytearray(200 * 1024 * 1024); print('survived')"],
                   "resources": {"memory_bytes": 50 * 1024 * 1024}}),
        );
        let j = p.wait_state(hog, &["failed", "succeeded"], Duration::from_secs(30));
        assert_eq!(j["state"], "failed", "{j}");
        assert_eq!(j["runs"][0]["signal"], 9, "killed by the OOM killer: {j}");
    } else {
        assert!(
            agent_log.contains("WITHOUT cpu and memory limits"),
            "{agent_log}"
        );
    }
}

#[test]
fn up_starts_a_pool_and_writes_a_client_config() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.path().join("config.toml");
    let mut child = std::process::Command::new(BIN)
        .args(["up", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path().join("data"))
        .env("CARAVEL_CONFIG", &cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env("CARAVEL_CONFIG", &cfg)
            .env_remove("CARAVEL_SERVER")
            .env_remove("CARAVEL_TOKEN")
            .output()
            .unwrap()
    };
    wait_for("config", Duration::from_secs(20), || {
        let out = run(&["nodes", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v.as_array()?.len() == 1).then_some(())
    });
    let out = run(&["submit", "--wait", "--", "echo", "hello from caravel"]);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from caravel\n");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        text.contains(&format!("server = \"http://127.0.0.1:{port}\""))
            && text.contains("token = \"cvadm_")
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let tok = std::fs::metadata(dir.path().join("data/admin.token")).unwrap();
    assert_eq!(tok.permissions().mode() & 0o777, 0o600);
}

/// Kills whatever server still holds these data directories when the test ends, passed
/// or not: a detached pool outlives the command that started it.
pub struct Holders(pub Vec<std::path::PathBuf>);

impl Drop for Holders {
    fn drop(&mut self) {
        for d in &self.0 {
            if let Ok(Some(Some(pid))) = caravel_server::datadir::holder(d) {
                // SAFETY: kill(2) on a process this test started or found as its own; no memory is touched.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
        }
    }
}

#[test]
fn up_detach_has_one_owner_per_data_dir_and_down_hands_running_work_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let other = dir.path().join("other");
    let _holders = Holders(vec![data.clone(), other.clone()]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let cfg = dir.path().join("config.toml");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(args)
            .env("CARAVEL_CONFIG", &cfg)
            .env_remove("CARAVEL_SERVER")
            .env_remove("CARAVEL_TOKEN")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let d = data.to_str().unwrap();
    // Where tasks leave marks for the test (their sandbox shows nothing else of the host).
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let mount = format!("{}:rw", shared.display());
    let up = [
        "up",
        "--detach",
        "--listen",
        &listen,
        "--data-dir",
        d,
        "--task-mount",
        &mount,
    ];
    let (code, text) = run(&up);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("caravel is up at"), "{text}");
    let pid = caravel_server::datadir::holder(&data)
        .unwrap()
        .flatten()
        .expect("the pool holds its data directory");

    // `up --detach` again is a success that starts nothing (the README's first command
    // may be run twice); a pool in the foreground on the same directory is refused,
    // naming the first. Neither touches the running pool's log.
    let (code, text) = run(&up);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!(
            "caravel is already up at http://{listen} (pid {pid})"
        )),
        "{text}"
    );
    let (code, text) = run(&["up", "--listen", "127.0.0.1:0", "--data-dir", d]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("already running") && text.contains(&format!("(pid {pid})")),
        "{text}"
    );
    let log = std::fs::read_to_string(data.join("up.log")).unwrap();
    assert!(log.contains("caravel is up at"), "{log}");
    assert_eq!(log.matches("==== caravel up --detach").count(), 1, "{log}");
    // So is a bare server: two owners of one store would run every task twice.
    let (code, text) = run(&["server", "--listen", "127.0.0.1:0", "--data-dir", d]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("in use by another Caravel server"), "{text}");
    // Another data directory on a taken address fails with the child's reason, said once,
    // instead of taking the pool that answers there for its own.
    let (code, text) = run(&[
        "up",
        "--detach",
        "--listen",
        &listen,
        "--data-dir",
        other.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(text.matches("Address already in use").count(), 1, "{text}");

    // Work running when the pool goes down is handed back and runs again after `up`.
    let marks = shared.join("marks");
    let script = format!("echo $CARAVEL_RUN_ID >> {}; sleep 600", marks.display());
    let (code, text) = run(&["submit", "--max-retries", "0", "--", "sh", "-c", &script]);
    assert_eq!(code, Some(0), "{text}");
    wait_for("the first run's mark", Duration::from_secs(20), || {
        std::fs::read_to_string(&marks)
            .ok()
            .filter(|m| !m.is_empty())
    });
    let (code, text) = run(&["down", "--data-dir", d]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("stopped the Caravel server on {d} (pid {pid})")),
        "{text}"
    );
    assert!(caravel_server::datadir::holder(&data).unwrap().is_none());
    assert!(!pid_alive(pid as i32), "the pool's process is gone");
    let (code, text) = run(&up);
    assert_eq!(code, Some(0), "{text}");
    let j = wait_for("the job running again", Duration::from_secs(20), || {
        let (_, text) = run(&["job", "show", "1", "-o", "json"]);
        let j: serde_json::Value = serde_json::from_str(&text).ok()?;
        (j["runs"].as_array()?.len() == 2 && j["task_list"][0]["state"] == "running").then_some(j)
    });
    assert_eq!(j["runs"][0]["state"], "preempted", "{j}");
    assert_eq!(j["task_list"][0]["retries_used"], 0, "{j}");
    assert_eq!(std::fs::read_to_string(&marks).unwrap().lines().count(), 2);

    // A task that ignores SIGTERM holds the pool's stop up for its kill grace; `down`
    // kills the pool once its own timeout has passed, and the task dies with it.
    let script = "trap '' TERM; echo $CARAVEL_RUN_ID > /dev/null; exec sleep 600";
    // Other tests' pools have a job 2 too: the stubborn task is the process that is new,
    // and in this pool's cgroups (named after its data directory, `local-...`).
    let before = pids_with(&["CARAVEL_JOB_ID=2".to_string()], Some("/caravel/local-"));
    let (code, text) = run(&["submit", "--kill-grace", "60s", "--", "sh", "-c", script]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(text.trim(), "2", "{text}");
    let task: i32 = wait_for("the stubborn task's pid", Duration::from_secs(20), || {
        let now = pids_with(&["CARAVEL_JOB_ID=2".to_string()], Some("/caravel/local-"));
        let new: Vec<i32> = now.into_iter().filter(|p| !before.contains(p)).collect();
        // `exec sleep` done: the trap is set.
        let pid = topmost(&new)?;
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .filter(|c| c.trim() == "sleep")
            .map(|_| pid)
    });
    let pid = caravel_server::datadir::holder(&data)
        .unwrap()
        .flatten()
        .unwrap();
    let (code, text) = run(&["down", "--data-dir", d, "--timeout", "1s"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("did not stop within 1s; killed it"), "{text}");
    assert!(!pid_alive(pid as i32));
    wait_for("the stubborn task gone", Duration::from_secs(5), || {
        (!pid_alive(task)).then_some(())
    });
    let (code, text) = run(&["down", "--data-dir", d]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("no Caravel server is running"), "{text}");
    let (code, text) = run(&["down", "--data-dir", d, "--timeout", "soon"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("--timeout"), "{text}");
}

#[test]
fn a_client_command_into_a_closed_pipe_stops_quietly() {
    let p = Pool::server_only("epipe");
    // `caravel nodes | head -0`: the reader is gone before anything is written.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = std::process::Command::new(BIN)
        .args(["nodes"])
        .env("CARAVEL_SERVER", &p.url)
        .env("CARAVEL_TOKEN", &p.admin)
        .env("CARAVEL_CONFIG", p.file("no-config.toml"))
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {stderr}",
        o.status
    );
}
