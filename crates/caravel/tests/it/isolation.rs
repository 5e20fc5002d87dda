//! Tenants are strangers sharing a node: a hostile tenant's task tries everything it can
//! against another tenant's running job, the node's agent and the control plane, and is
//! refused each time, while the other job runs to its end untouched.
//!
//! The attacks are made by a small static C program (`data/hostile.c`) that reports
//! each attempt, so the test reads exactly which system call was refused and why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

/// The hostile program, built once per test run.
fn hostile() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("caravel-hostile-{}", std::process::id()));
        let src = format!("{}/tests/it/data/hostile.c", env!("CARGO_MANIFEST_DIR"));
        let o = std::process::Command::new("cc")
            .args(["-static", "-O1", "-o"])
            .arg(&out)
            .arg(&src)
            .output()
            .expect("a C compiler (cc) for the hostile test program");
        assert!(
            o.status.success(),
            "building {src}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    })
}

/// Character device stand-ins for two GPUs: no driver behind them, so opening one that
/// the device rules let through fails with ENXIO, one they refuse with EPERM, and one
/// that is not there at all with ENOENT.
fn gpu_standins(dir: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    (0..2)
        .map(|i| {
            let p = dir.join(format!("gpu{i}"));
            let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
            // SAFETY: mknod with a NUL-terminated path (the tests run as root).
            let r =
                unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(240, i)) };
            assert_eq!(r, 0, "mknod {}", p.display());
            p
        })
        .collect()
}

/// `NAME RESULT detail` lines of the hostile program, by name.
fn results(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(' ')?;
            Some((name.to_string(), rest.to_string()))
        })
        .collect()
}

fn tenant(p: &Pool, name: &str) -> (u64, String) {
    let t = p
        .post(&p.admin, "/v1/tenants", &json!({"name": name}))
        .unwrap();
    (
        t["id"].as_u64().unwrap(),
        t["token"].as_str().unwrap().to_string(),
    )
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn owner(p: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().uid()
}

/// A pool of one restricted node with two stand-in GPUs and the hostile program at
/// `/probe` in every task (read-only), nothing else of the host.
pub fn hostile_pool(tag: &str) -> Pool {
    let mut p = Pool::server_only(tag);
    p.bare_agents = true;
    let probe = p.file("probe");
    std::fs::create_dir_all(&probe).unwrap();
    std::fs::copy(hostile(), probe.join("hostile")).unwrap();
    // A setuid-root copy: running it must not make anyone root.
    std::fs::copy(hostile(), probe.join("hostile-suid")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        probe.join("hostile"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(
        probe.join("hostile-suid"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    let gpus = gpu_standins(&p.file("dev"));
    let devices = format!("{},{}", gpus[0].display(), gpus[1].display());
    let mount = format!("{}:/probe:ro", probe.display());
    p.start_agent(
        "a",
        &[
            "--cpus",
            "8",
            "--gpus",
            "T4:2",
            "--gpu-devices",
            &devices,
            "--task-pids",
            "128",
            "--task-mount",
            &mount,
        ],
    );
    p.wait_nodes_ready(1);
    p
}

#[test]
fn a_hostile_tenant_is_refused_everything_and_the_other_tenants_job_finishes_untouched() {
    let p = hostile_pool("hostile");
    hostile_suite(&p, None);
}

/// Tenant B attacks tenant A's running job, the agent and the server, from a task of its
/// own (in `image` when given), and is refused everything; A's job ends untouched.
pub fn hostile_suite(p: &Pool, image: Option<&str>) {
    // Every job of the suite, in the image when there is one.
    let spec = |mut v: Value| {
        if let Some(i) = image {
            v["image"] = json!(i);
        }
        v
    };
    let node = &p.get(&p.admin, "/v1/nodes").unwrap()[0];
    assert_eq!(node["capacity"]["isolation"], "restricted", "{node}");
    if image.is_some() {
        assert_eq!(node["capacity"]["images"], true, "{node}");
    }
    let (a_id, a_tok) = tenant(p, "tenanta");
    let (b_id, b_tok) = tenant(p, "tenantb");
    assert_ne!(a_id, b_id);

    // Tenant A: a secret in its environment, files in every folder it has, then a wait
    // long enough for B to try everything, then a check that nothing was touched.
    let a_script = r#"echo a-output-marker
echo a-checkpoint > "$CARAVEL_CHECKPOINT_DIR/state"
echo a-work > w
echo a-tmp > /tmp/t
i=0; while [ $i -lt 150 ] && [ ! -e /caravel/work/stop ]; do sleep 0.1; i=$((i+1)); done
cat "$CARAVEL_CHECKPOINT_DIR/state" w /tmp/t
[ -e /dev/gpu$CUDA_VISIBLE_DEVICES ] && echo a-has-its-gpu
echo "a uid $(id -u)""#;
    let a_job = p.submit(
        &a_tok,
        spec(json!({"command": "sh", "args": ["-c", a_script], "secret_env": {"A_API_KEY": "a-secret-7f3c"},
               "resources": {"cpu_milli": 200, "memory_bytes": 64 << 20, "gpu": {"model": "T4", "count": 1}}})),
    );
    let j = p.wait_task_running(a_job, 0);
    let a_run = j["runs"][0]["id"].as_u64().unwrap();
    let a_gpu = j["runs"][0]["devices"][0].as_u64().unwrap();
    let b_gpu = 1 - a_gpu;
    let a_pid = wait_for("A's process", Duration::from_secs(10), || {
        p.task_pid(a_job, 0)
    });
    let work = p.file("agent-a");
    let a_dir = work.join("runs").join(a_run.to_string());
    wait_for("A's files", Duration::from_secs(10), || {
        a_dir.join("tmp/t").exists().then_some(())
    });
    // On the host, A's folders are A's uid's alone; the control plane's files are root's.
    let a_uid = 200_000 + a_id as u32;
    for d in ["work", "checkpoint", "tmp"] {
        assert_eq!(owner(&a_dir.join(d)), a_uid, "{d}");
        assert_eq!(mode(&a_dir.join(d)), 0o700, "{d}");
    }
    assert_eq!(owner(&a_dir.join("stdout.log")), a_uid);
    assert_eq!(mode(&a_dir.join("stdout.log")), 0o600);
    let data = p.data_dir();
    assert_eq!(mode(&data), 0o700);
    for f in ["caravel.db", "admin.token", "agent.token"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&work), 0o700);

    // Tenant B tries everything against A, the agent and the server.
    let h = "/probe/hostile";
    let mut attacks: Vec<String> = vec![
        format!("read:{}/stdout.log", a_dir.display()),
        format!("list:{}", a_dir.display()),
        format!("read:{}/checkpoint/state", a_dir.display()),
        format!("write:{}/work/planted", a_dir.display()),
        format!("list:{}/runs", work.display()),
        format!("read:{}/admin.token", data.display()),
        format!("read:{}/agent.token", data.display()),
        format!("read:{}/caravel.db", data.display()),
        format!("list:{}", p.dir.path().display()),
        "environ:a-secret-7f3c".into(),
        format!("read:/proc/{a_pid}/environ"),
        format!("signal:{a_pid}"),
        format!("ptrace:{a_pid}"),
        "ptrace:1".into(),
        "mount".into(),
        "unshare".into(),
        "setuid".into(),
        "raw".into(),
        "module".into(),
        "euid".into(),
        "write:/etc/caravel-planted".into(),
        "write:/usr/bin/caravel-planted".into(),
        format!("dev:/dev/gpu{a_gpu}"),
        format!("dev:/dev/gpu{b_gpu}"),
        "list:/sys/fs/cgroup/memory/caravel".into(),
    ];
    let script = format!("{h} {} ; /probe/hostile-suid euid", attacks.join(" "));
    attacks.push("euid".into());
    let b_job = p.submit(
        &b_tok,
        spec(json!({"command": "sh", "args": ["-c", script],
               "resources": {"cpu_milli": 200, "memory_bytes": 64 << 20, "gpu": {"model": "T4", "count": 1}}})),
    );
    let j = p.wait_state(b_job, &["succeeded", "failed"], Duration::from_secs(30));
    let out = p.logs(b_job, 0, "stdout");
    assert_eq!(j["state"], "succeeded", "{j} {out}");
    let r = results(&out);
    let own_gpu = format!("dev:/dev/gpu{b_gpu}");
    for a in &attacks {
        let got = r
            .get(a)
            .unwrap_or_else(|| panic!("no result for {a}: {out}"));
        assert!(got.starts_with("REFUSED"), "{a} was allowed: {got}\n{out}");
        if a == &own_gpu {
            // Its own GPU is there and its device rule lets it through (no driver).
            assert!(got.contains("No such device or address"), "{a}: {got}");
        } else if a.starts_with("read:/")
            || a.starts_with("list:/")
            || a.starts_with("dev:")
            || a.starts_with("write:/tmp")
        {
            assert!(
                got.contains("No such file or directory"),
                "{a}: not even visible, yet: {got}"
            );
        }
    }
    assert!(
        r["euid"].contains(&format!("euid {}", 200_000 + b_id)),
        "{out}"
    );
    // The node's system folders are read-only; an image's are root's (the task may
    // write only where its uid may, and its writes stay in its own layer).
    let system = if image.is_some() {
        "Permission denied"
    } else {
        "Read-only file system"
    };
    for (a, errno) in [
        ("mount", "Operation not permitted"),
        ("unshare", "Operation not permitted"),
        ("setuid", "Operation not permitted"),
        ("raw", "Operation not permitted"),
        ("module", "Operation not permitted"),
        ("write:/etc/caravel-planted", system),
        ("write:/usr/bin/caravel-planted", system),
        ("ptrace:1", "Operation not permitted"),
    ] {
        assert!(r[a].contains(errno), "{a}: {}", r[a]);
    }
    for a in [format!("signal:{a_pid}"), format!("ptrace:{a_pid}")] {
        assert!(r[&a].contains("No such process"), "{a}: {}", r[&a]);
    }
    assert!(r["environ:a-secret-7f3c"].contains("not found"), "{out}");

    // A fork bomb stops at the task's process limit, inside its own cgroup.
    let bomb = p.submit(
        &b_tok,
        spec(json!({"command": h, "args": ["forkbomb:100000"], "resources": {"cpu_milli": 200, "memory_bytes": 256 << 20}})),
    );
    p.wait_state(bomb, &["succeeded", "failed"], Duration::from_secs(60));
    let out = p.logs(bomb, 0, "stdout");
    let made: u32 = out
        .split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(out.starts_with("forkbomb:100000 REFUSED after"), "{out}");
    assert!(made < 128, "{out}");

    // Filling the disk past its cap stops the task with a clear reason.
    let fill = p.submit(
        &b_tok,
        spec(
            json!({"command": h, "args": ["fill:64"], "disk_bytes": 8 << 20,
               "resources": {"cpu_milli": 200, "memory_bytes": 64 << 20}}),
        ),
    );
    let j = p.wait_state(fill, &["succeeded", "failed"], Duration::from_secs(30));
    assert_eq!(j["state"], "failed", "{j}");
    let msg = j["runs"][0]["message"].as_str().unwrap();
    assert!(msg.contains("past its cap of 8.0 MiB"), "{j}");

    // A finishes, with everything it left where it left it; nothing of B's reached it.
    std::fs::write(a_dir.join("work/stop"), "").unwrap();
    let j = p.wait_state(a_job, &["succeeded", "failed"], Duration::from_secs(30));
    assert_eq!(j["state"], "succeeded", "{j}");
    let out = p.logs(a_job, 0, "stdout");
    assert_eq!(
        out,
        format!("a-output-marker\na-checkpoint\na-work\na-tmp\na-has-its-gpu\na uid {a_uid}\n"),
    );
    assert!(!a_dir.join("work/planted").exists());
    // A's secret: never shown back, in no log of the server or the agent.
    let shown = p.job(&p.admin, a_job);
    assert_eq!(
        shown["spec"]["secret_env"]["A_API_KEY"], "(secret)",
        "{shown}"
    );
    for log in ["server.log", "agent-a.log"] {
        let text = std::fs::read_to_string(p.file(log)).unwrap();
        assert!(!text.contains("a-secret-7f3c"), "{log} shows the secret");
    }
}

#[test]
fn a_node_that_cannot_sandbox_says_why_and_jobs_that_need_isolation_wait() {
    let mut p = Pool::server_only("nosandbox");
    p.bare_agents = true;
    // An agent that is not root: it runs tasks, unsandboxed, and says so.
    let work = p.file("agent-nobody");
    std::fs::create_dir_all(&work).unwrap();
    std::os::unix::fs::chown(&work, Some(65534), Some(65534)).unwrap();
    let log = std::fs::File::create(p.file("agent-nobody.log")).unwrap();
    let mut agent = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            BIN,
            "agent",
            "--server",
            &p.url,
            "--token",
            &p.agent_token,
            "--name",
            &p.node_name("nobody"),
            "--listen",
            "127.0.0.1:0",
            "--no-cgroups",
            "--work-dir",
        ])
        .arg(&work)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut agent);
    p.wait_nodes_ready(1);
    let node: Value = p.get(&p.admin, "/v1/nodes").unwrap()[0].clone();
    assert_eq!(node["capacity"]["isolation"], "none", "{node}");
    let missing = node["isolation_missing"].to_string();
    assert!(missing.contains("not root"), "{node}");
    let log = std::fs::read_to_string(p.file("agent-nobody.log")).unwrap();
    assert!(
        log.contains("isolation `none`") && log.contains("not root"),
        "{log}"
    );
    let out = p.cli(&["nodes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ISOLATION") && text.contains("none"),
        "{text}"
    );

    // A job that asks for isolation waits, saying why; one that does not runs.
    let strict = p.submit(
        &p.admin,
        json!({"command": "true", "isolation": "restricted", "resources": {"cpu_milli": 100}}),
    );
    let plain = p.submit(
        &p.admin,
        json!({"command": "sh", "args": ["-c", "id -u"], "resources": {"cpu_milli": 100}}),
    );
    let j = p.wait_state(plain, &["succeeded", "failed"], Duration::from_secs(20));
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(p.logs(plain, 0, "stdout"), "65534\n");
    let j = wait_for("the reason", Duration::from_secs(10), || {
        let j = p.job(&p.admin, strict);
        (!j["pending_reasons"].as_array()?.is_empty()).then_some(j)
    });
    assert_eq!(j["state"], "pending");
    let reason = j["pending_reasons"][0]["message"].as_str().unwrap();
    assert!(
        reason.contains("1 node lacks isolation restricted"),
        "{reason}"
    );
    let out = p.cli(&["jobs"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("lacks isolation restricted"),
        "{out:?}"
    );
}

#[test]
fn isolation_and_image_fields_are_checked_at_submit() {
    let p = Pool::server_only("isobad");
    for (spec, field) in [
        (json!({"command": "x", "isolation": "strict"}), None),
        (json!({"command": "x", "image": "Not/Valid"}), Some("image")),
        (json!({"command": "x", "workdir": "abc"}), Some("workdir")),
        (
            json!({"command": "x", "disk_bytes": 10}),
            Some("disk_bytes"),
        ),
        (
            json!({"command": "x", "env": {"K": "1"}, "secret_env": {"K": "2"}}),
            Some("secret_env.K"),
        ),
        (
            json!({"command": "x", "secret_env": {"CARAVEL_X": "2"}}),
            Some("secret_env.CARAVEL_X"),
        ),
    ] {
        let (code, e) = p.post(&p.admin, "/v1/jobs", &spec).unwrap_err();
        assert_eq!(code, 400, "{spec} {e}");
        if let Some(f) = field {
            assert_eq!(e["error"]["field"], f, "{spec} {e}");
        } else {
            assert!(e.to_string().contains("unknown variant `strict`"), "{e}");
        }
    }
    let out = p.cli(&["submit", "--isolation", "max", "--", "true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("none, sandboxed, restricted"));
    let out = p.cli(&[
        "submit",
        "--secret-env",
        "no-equals-sign-here",
        "--",
        "true",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not KEY=VALUE"),
        "{err}"
    );
    assert!(
        !err.contains("no-equals-sign-here"),
        "a secret is never echoed: {err}"
    );
}

#[test]
fn a_pool_started_by_a_user_who_is_not_root_works_at_the_level_it_can_give() {
    // Everything as `nobody`, in a folder of its own.
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    let port = free_port();
    let data = dir.path().join("data");
    let as_nobody = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                BIN,
            ])
            .args(args)
            .env("HOME", dir.path())
            .env_remove("CARAVEL_SERVER")
            .env_remove("CARAVEL_TOKEN")
            .env_remove("CARAVEL_CONFIG")
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let listen = format!("127.0.0.1:{port}");
    let data_arg = data.to_str().unwrap();
    let out = as_nobody(&[
        "up",
        "--detach",
        "--data-dir",
        data_arg,
        "--listen",
        &listen,
    ]);
    struct Down<'a>(&'a dyn Fn(&[&str]) -> std::process::Output, String);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            (self.0)(&["down", "--data-dir", &self.1]);
        }
    }
    let _down = Down(&as_nobody, data_arg.to_string());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_nobody(&["submit", "--wait", "--", "id", "-u"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.lines().any(|l| l == "65534"), "{text}");
    let out = as_nobody(&["nodes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(" none") && text.contains("the agent is not root"),
        "{text}"
    );
}
