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
    let m = p.text("", "/metrics");
    for name in [
        "caravel_queue_depth",
        "caravel_running_tasks",
        "caravel_nodes{state=\"ready\"} 1",
        "caravel_scheduling_cycle_seconds_bucket",
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
    ] {
        assert!(doc["paths"][path].is_object(), "openapi lacks {path}");
    }
    // Limits: where this machine offers cgroup v1 (as root), the task ran inside its own
    // cpu and memory cgroups with the requested limits.
    let v1 = std::path::Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists()
        && std::path::Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
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
