//! The control plane on PostgreSQL (`caravel server --datastore postgres://...`): the same
//! guarantees as on the embedded store, plus one owner per database and recovery from a
//! lost database session. Each test uses a schema of its own on the server
//! `scripts/with-test-postgres` starts (skipped without one, except under CI).

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use caravel_store::conformance::{test_pg, PgSchema};
use serde_json::{json, Value};

use crate::harness::*;

fn job_spec(cmd: &str) -> Value {
    json!({"command": "sh", "args": ["-c", cmd], "resources": {"cpu_milli": 100}})
}

/// Waits for `child` to exit; kills it and fails with `what` if it has not within `limit`.
fn exit_within(
    child: &mut std::process::Child,
    limit: Duration,
    what: &str,
) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn usage_runs(p: &Pool) -> Vec<Value> {
    p.get(&p.admin, "/v1/usage").unwrap()["by_job"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_pool_on_postgres_loses_nothing_across_a_kill9_and_has_one_owner() {
    let Some(base) = test_pg() else { return };
    let schema = PgSchema::create(&base);
    let url = schema.url();
    let mut p = Pool::with_server_args(
        "pgkill9",
        &["--datastore", &url],
        &[("a", &["--cpus", "8"])],
    );
    let long = p.submit(&p.admin, job_spec("sleep 2; echo finished"));
    p.wait_state(long, &["running"], Duration::from_secs(20));
    let mut accepted: BTreeSet<u64> = (0..20)
        .map(|i| p.submit(&p.admin, job_spec(&format!("echo {i}"))))
        .collect();
    p.kill9_server();
    p.start_server();
    let j = p.wait_state(long, &["succeeded", "failed"], Duration::from_secs(30));
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["runs"].as_array().unwrap().len(), 1, "re-adopted: {j}");
    assert_eq!(p.logs(long, 0, "stdout"), "finished\n");
    accepted.insert(long);
    for id in &accepted {
        let j = p.wait_state(*id, &["succeeded", "failed"], Duration::from_secs(30));
        assert_eq!(j["state"], "succeeded", "job {id}: {j}");
        assert_eq!(j["runs"].as_array().unwrap().len(), 1, "{j}");
    }
    let all = p.get(&p.admin, "/v1/jobs?limit=1000").unwrap();
    assert_eq!(all.as_array().unwrap().len(), accepted.len(), "{all}");
    let by_job = usage_runs(&p);
    assert_eq!(by_job.len(), accepted.len(), "one usage row per job");
    assert!(by_job.iter().all(|r| r["runs"] == 1), "{by_job:?}");
    // The state is in the database, not the data directory.
    assert!(!p.data_dir().join("caravel.db").exists());
    assert_eq!(
        schema.query(&format!("SELECT count(*) FROM {}.jobs", schema.name())),
        vec![Some(accepted.len().to_string())]
    );

    // A second server on the same database, with its own data directory and port, is
    // refused and names the holder; the first one is unharmed.
    let other = tempfile::tempdir().unwrap();
    let mut second = Command::new(BIN)
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(other.path())
        .args(["--datastore", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = exit_within(
        &mut second,
        Duration::from_secs(30),
        "a second server on the same database kept running",
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    let holder = p.server.as_ref().unwrap().id();
    assert!(
        err.contains(&format!(
            "another caravel server holds this store (pid {holder} on "
        )),
        "{err}"
    );
    assert!(err.contains(&p.data_dir().display().to_string()), "{err}");
    let again = p.submit(&p.admin, job_spec("echo still here"));
    let j = p.wait_state(again, &["succeeded", "failed"], Duration::from_secs(30));
    assert_eq!(j["state"], "succeeded", "{j}");
}

#[test]
fn a_server_whose_database_session_is_killed_reconnects_and_keeps_its_work() {
    let Some(base) = test_pg() else { return };
    let schema = PgSchema::create(&base);
    let p = Pool::with_server_args(
        "pgsession",
        &["--datastore", &schema.url()],
        &[("a", &["--cpus", "8"])],
    );
    let session = |s: &PgSchema| {
        s.query(&format!("SELECT session FROM {}.caravel_owner", s.name()))[0]
            .clone()
            .unwrap()
    };
    let first = p.submit(&p.admin, job_spec("echo before"));
    p.wait_state(first, &["succeeded"], Duration::from_secs(30));
    let before = session(&schema);
    // What a database restart or a failover does to the server's connection.
    schema.admin(&format!(
        "SELECT pg_terminate_backend(session) FROM {}.caravel_owner",
        schema.name()
    ));
    // Submissions are refused (503, `unavailable`) until the server has reconnected and
    // reloaded; then they are accepted again. None that was refused may exist.
    let mut accepted = BTreeSet::from([first]);
    let mut refused = 0;
    let t0 = Instant::now();
    while accepted.len() < 11 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{} accepted, {refused} refused",
            accepted.len()
        );
        match p.post(&p.admin, "/v1/jobs", &job_spec("echo after")) {
            Ok(v) => {
                accepted.insert(v["id"].as_u64().unwrap());
            }
            Err((status, body)) => {
                assert_eq!(status, 503, "{body}");
                assert_eq!(body["error"]["code"], "unavailable", "{body}");
                refused += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    assert_ne!(session(&schema), before, "the server did not reconnect");

    // A commit the database refuses with the session alive: memory is rebuilt from the
    // store (the old session is closed first, or the new one could not take the lock).
    let before = session(&schema);
    let max = accepted.iter().max().unwrap();
    schema.admin(&format!(
        "ALTER TABLE {}.jobs ADD CONSTRAINT refuse_new CHECK (id <= {max})",
        schema.name()
    ));
    let (status, body) = p
        .post(&p.admin, "/v1/jobs", &job_spec("echo refused"))
        .unwrap_err();
    assert_eq!(status, 500, "{body}");
    schema.admin(&format!(
        "ALTER TABLE {}.jobs DROP CONSTRAINT refuse_new",
        schema.name()
    ));
    wait_for(
        "the server to reopen its store",
        Duration::from_secs(30),
        || (session(&schema) != before).then_some(()),
    );
    let id = wait_for(
        "a submission to be accepted",
        Duration::from_secs(30),
        || {
            p.post(&p.admin, "/v1/jobs", &job_spec("echo after reload"))
                .ok()
                .and_then(|v| v["id"].as_u64())
        },
    );
    accepted.insert(id);
    for id in &accepted {
        let j = p.wait_state(*id, &["succeeded", "failed"], Duration::from_secs(30));
        assert_eq!(j["state"], "succeeded", "job {id}: {j}");
    }
    let all = p.get(&p.admin, "/v1/jobs?limit=1000").unwrap();
    let ids: BTreeSet<u64> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, accepted, "a refused submission left a job behind");
    assert_eq!(usage_runs(&p).len(), accepted.len());
}

/// Group commit: concurrent requests are answered only once their changes are durable,
/// and changes that queue while a commit runs are written together. The jobs table is
/// locked from another session, so the first commit waits on the lock while the rest
/// queue behind it.
#[test]
fn an_answer_waits_for_its_commit_and_changes_queued_meanwhile_commit_together() {
    let Some(base) = test_pg() else { return };
    let schema = PgSchema::create(&base);
    let p = Pool::server_only_with("pggroup", &["--datastore", &schema.url()]);
    let first = p.submit(&p.admin, job_spec("true"));
    let held = schema.hold(&format!(
        "LOCK TABLE {}.jobs IN EXCLUSIVE MODE",
        schema.name()
    ));
    let ids: Vec<u64> = std::thread::scope(|sc| {
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..8 {
            let (tx, p) = (tx.clone(), &p);
            sc.spawn(move || {
                let r = p.post(&p.admin, "/v1/jobs", &job_spec(&format!("echo {i}")));
                tx.send(r).unwrap();
            });
        }
        // Nothing can be written while the lock is held: no submission may be answered.
        assert!(
            rx.recv_timeout(Duration::from_millis(1500)).is_err(),
            "a submission was answered before its job was written"
        );
        // What shows no stored state still answers.
        let health = p.call(reqwest::Method::GET, "", "/healthz", None);
        assert!(health.is_ok(), "{health:?}");
        drop(held);
        (0..8)
            .map(|_| {
                let r = rx.recv_timeout(Duration::from_secs(30)).expect("an answer");
                r.unwrap()["id"].as_u64().unwrap()
            })
            .collect()
    });
    let distinct: BTreeSet<u64> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), 8, "{ids:?}");
    assert!(!distinct.contains(&first));
    let list = ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    // Rows written by one transaction share its id (xmin). The commit that waited on the
    // lock held one job, or a few; everything queued behind it went in one more.
    let stored = schema.query(&format!(
        "SELECT count(*) FROM {}.jobs WHERE id IN ({list})",
        schema.name()
    ));
    assert_eq!(stored, vec![Some("8".to_string())]);
    let txs = schema.query(&format!(
        "SELECT count(DISTINCT xmin::text) FROM {}.jobs WHERE id IN ({list})",
        schema.name()
    ));
    let txs: u64 = txs[0].as_deref().unwrap().parse().unwrap();
    assert!(txs <= 2, "8 concurrent submissions took {txs} commits");
}

/// `caravel server --standby` on the same database waits without serving while the owner
/// lives; when the owner is killed it takes over, re-adopts what runs, and the agent,
/// given both servers, follows it. Nothing accepted is lost or run twice.
#[test]
fn a_standby_takes_over_when_the_server_dies_and_agents_follow() {
    let Some(base) = test_pg() else { return };
    let schema = PgSchema::create(&base);
    let url = schema.url();
    let mut p = Pool::server_only_with("pgstandby", &["--datastore", &url]);
    // The standby's own data directory, empty: it accepts the pool's tokens through
    // their hashes in the database.
    let sdir = p.dir.path().join("standby");
    let sport = free_port();
    let surl = format!("http://127.0.0.1:{sport}");
    // Killed if the test fails before the pool owns it.
    let mut standby = KillOnDrop(Some(
        Command::new(BIN)
            .args(["server", "--listen", &format!("127.0.0.1:{sport}")])
            .args(["--lost-after", "2s", "--heartbeat", "500ms", "--standby"])
            .args(["--datastore", &url, "--data-dir"])
            .arg(&sdir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(p.dir.path().join("standby.log")).unwrap())
            .spawn()
            .unwrap(),
    ));
    p.agent_server = Some(format!("{},{surl}", p.url));
    p.start_agent("a", &["--cpus", "8"]);
    p.wait_nodes_ready(1);
    let long = p.submit(&p.admin, job_spec("sleep 3; echo finished"));
    p.wait_state(long, &["running"], Duration::from_secs(20));
    let waiting = p.submit(&p.admin, job_spec("echo queued before the failover"));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", sport)).is_err(),
        "the standby serves while the owner lives"
    );

    let both = format!("{},{surl}", p.url);
    p.kill9_server();
    let t0 = Instant::now();
    // From here on the pool is the standby.
    p.server = standby.0.take();
    p.url = surl;
    p.port = sport;
    p.wait_healthy(Duration::from_secs(30));
    eprintln!("the standby served {:?} after the kill", t0.elapsed());
    let j = p.wait_state(long, &["succeeded", "failed"], Duration::from_secs(40));
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["runs"].as_array().unwrap().len(), 1, "re-adopted: {j}");
    assert_eq!(p.logs(long, 0, "stdout"), "finished\n");
    let next = p.submit(&p.admin, job_spec("echo placed by the standby"));
    // The CLI, given both servers, finds the one that answers.
    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .env("CARAVEL_SERVER", &both)
            .env("CARAVEL_TOKEN", &p.admin)
            .env("CARAVEL_CONFIG", p.dir.path().join("no-config.toml"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let from_cli: u64 = cli(&["submit", "--", "echo", "via the CLI"])
        .trim()
        .parse()
        .unwrap();
    let shown = cli(&["job", "show", &long.to_string()]);
    assert!(shown.contains("succeeded"), "{shown}");
    for id in [waiting, next, from_cli] {
        let j = p.wait_state(id, &["succeeded", "failed"], Duration::from_secs(30));
        assert_eq!(j["state"], "succeeded", "job {id}: {j}");
        assert_eq!(j["runs"].as_array().unwrap().len(), 1, "{j}");
    }
    let by_job = usage_runs(&p);
    assert_eq!(by_job.len(), 4, "{by_job:?}");
    assert!(by_job.iter().all(|r| r["runs"] == 1), "{by_job:?}");
    assert!(
        !sdir.join("admin.token").exists(),
        "the standby made a token of its own"
    );
    let owner = schema.query(&format!("SELECT host FROM {}.caravel_owner", schema.name()));
    assert!(
        owner[0]
            .as_deref()
            .unwrap_or("")
            .contains(&sdir.display().to_string()),
        "{owner:?}"
    );
}

/// A server cut off from its database while a standby takes the store over stops instead
/// of serving state it can no longer write (and the standby serves).
#[test]
fn a_server_that_lost_its_store_to_a_standby_stops() {
    let Some(base) = test_pg() else { return };
    let schema = PgSchema::create(&base);
    let url = schema.url();
    let mut p = Pool::server_only_with("pgfence", &["--datastore", &url]);
    let sdir = p.dir.path().join("standby");
    let sport = free_port();
    // Killed if the test fails before the pool owns it.
    let mut standby = KillOnDrop(Some(
        Command::new(BIN)
            .args([
                "server",
                "--listen",
                &format!("127.0.0.1:{sport}"),
                "--standby",
            ])
            .args(["--datastore", &url, "--data-dir"])
            .arg(&sdir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(p.dir.path().join("standby.log")).unwrap())
            .spawn()
            .unwrap(),
    ));
    // The owner's session ends under it (what a network cut does once the database gives
    // up on the connection); the standby, polling for the lock, gets it.
    schema.admin(&format!(
        "SELECT pg_terminate_backend(session) FROM {}.caravel_owner",
        schema.name()
    ));
    wait_for("the standby to serve", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", sport)).ok()
    });
    // The old owner finds out at its next write, cannot take the lock back, and stops.
    let (status, body) = p
        .post(&p.admin, "/v1/jobs", &job_spec("echo to the old owner"))
        .unwrap_err();
    assert_eq!(status, 503, "{body}");
    let mut old = p.server.replace(standby.0.take().unwrap()).unwrap();
    let st = exit_within(
        &mut old,
        Duration::from_secs(30),
        "the old owner kept running after losing its store",
    );
    assert!(!st.success());
    let log = std::fs::read_to_string(p.dir.path().join("server.log")).unwrap();
    assert!(
        log.contains("cut off from the store while a standby took it over"),
        "{log}"
    );
    // The standby owns the store and takes work.
    p.url = format!("http://127.0.0.1:{sport}");
    p.port = sport;
    p.wait_healthy(Duration::from_secs(30));
    // The pool's admin token works on the new owner.
    let id = p.submit(&p.admin, job_spec("echo to the new owner"));
    assert_eq!(p.job(&p.admin, id)["state"], "pending");

    // A data directory whose token is not the pool's is refused, saying which file.
    let mut new_owner = p.server.take().unwrap();
    let _ = new_owner.kill();
    let _ = new_owner.wait();
    let stray = p.dir.path().join("stray");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("admin.token"), "cvadm_not_this_pool\n").unwrap();
    let out = Command::new(BIN)
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--datastore",
            &url,
            "--data-dir",
        ])
        .arg(&stray)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{} does not hold this pool's token",
            stray.join("admin.token").display()
        )),
        "{err}"
    );
    assert!(
        !stray.join("agent.token").exists(),
        "a refused start left a token file behind"
    );
}

/// A child process killed when dropped (a test that fails must not leave it running).
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The owner's database session is ended while it writes nothing (item 10 of #30): it
/// must stop answering before the standby starts to, the agent must follow the standby,
/// and the running task must survive the handover.
#[test]
fn an_owner_whose_idle_session_is_ended_stops_answering_before_the_standby_starts() {
    let Some(base) = test_pg() else { return };
    let schema = PgSchema::create(&base);
    let url = schema.url();
    let mut p = Pool::server_only_with("pgidle", &["--datastore", &url]);
    let sdir = p.dir.path().join("standby");
    let sport = free_port();
    let surl = format!("http://127.0.0.1:{sport}");
    let standby = Command::new(BIN)
        .args(["server", "--listen", &format!("127.0.0.1:{sport}")])
        .args(["--lost-after", "2s", "--heartbeat", "500ms", "--standby"])
        .args(["--datastore", &url, "--data-dir"])
        .arg(&sdir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(p.dir.path().join("standby.log")).unwrap())
        .spawn()
        .unwrap();
    p.agent_server = Some(format!("{},{surl}", p.url));
    p.start_agent("a", &["--cpus", "8"]);
    p.wait_nodes_ready(1);
    let job = p.submit(&p.admin, job_spec("sleep 40; echo survived"));
    p.wait_state(job, &["running"], Duration::from_secs(20));
    let old_url = p.url.clone();
    let health = |u: &str| {
        Pool::rt().block_on(async {
            match reqwest::Client::new()
                .get(format!("{u}/healthz"))
                .timeout(Duration::from_millis(500))
                .send()
                .await
            {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            }
        })
    };
    assert_eq!(health(&old_url), 200);
    // Nothing is written now (the job sleeps): the owner learns of it only by itself. It
    // may take its lock back before the standby polls for it (also correct: one owner);
    // then its session is ended again, until the standby wins a round.
    // Killed if the test fails before the pool takes it over.
    let mut standby = KillOnDrop(Some(standby));
    let mut took_over = false;
    for round in 0..6 {
        schema.admin(&format!(
            "SELECT pg_terminate_backend(session) FROM {}.caravel_owner",
            schema.name()
        ));
        let t0 = Instant::now();
        let (mut old_stopped_ms, mut new_started_ms, mut old_back_ms) = (None, None, None);
        while t0.elapsed() < Duration::from_secs(5) {
            let (a, b) = (health(&old_url), health(&surl));
            assert!(
                !(a == 200 && b == 200),
                "round {round}: both servers answered as owner {:?} after the session ended",
                t0.elapsed()
            );
            let ms = t0.elapsed().as_millis();
            match (old_stopped_ms, a == 200) {
                (None, false) => old_stopped_ms = Some(ms),
                (Some(_), true) if old_back_ms.is_none() => old_back_ms = Some(ms),
                _ => {}
            }
            if b == 200 && new_started_ms.is_none() {
                new_started_ms = Some(ms);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let stopped = old_stopped_ms.expect("the old owner never stopped answering");
        if let Some(started) = new_started_ms {
            eprintln!("round {round}: the old owner stopped answering after {stopped} ms, the standby answered after {started} ms");
            assert!(stopped < started && old_back_ms.is_none());
            took_over = true;
            break;
        }
        eprintln!("round {round}: the old owner stopped answering after {stopped} ms and answered again after {old_back_ms:?} ms with its store taken back");
        assert!(old_back_ms.is_some(), "neither server answers");
    }
    assert!(took_over, "the standby never took over in six rounds");
    let mut old = p.server.replace(standby.0.take().unwrap()).unwrap();
    exit_within(
        &mut old,
        Duration::from_secs(30),
        "the old owner kept running after losing its store",
    );
    p.url = surl;
    p.port = sport;
    // The task was never stopped: one run, to the end, on the node that had it.
    let j = p.wait_state(job, &["succeeded", "failed"], Duration::from_secs(40));
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["runs"].as_array().unwrap().len(), 1, "{j}");
    assert_eq!(p.logs(job, 0, "stdout"), "survived\n");
    let nodes = p.get(&p.admin, "/v1/nodes").unwrap();
    assert_eq!(nodes[0]["state"], "ready", "{nodes}");
}

/// Flags that only make sense on one store are refused before anything is created.
#[test]
fn store_flags_that_do_not_fit_the_store_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .env_remove("CARAVEL_DATASTORE")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let d = data.to_str().unwrap();
    let server = ["server", "--listen", "127.0.0.1:0", "--data-dir", d];
    let (code, err) = run(&[&server[..], &["--standby"]].concat());
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--standby: only with a PostgreSQL datastore"),
        "{err}"
    );
    let (code, err) = run(&[
        &server[..],
        &["--sync-full", "--datastore", "postgres://db/c"],
    ]
    .concat());
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--sync-full: only for the embedded SQLite store"),
        "{err}"
    );
    let (code, err) = run(&[&server[..], &["--datastore", "mysql://db/c"]].concat());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--datastore"), "{err}");
    assert!(
        err.contains("expected `sqlite` or a PostgreSQL URL"),
        "{err}"
    );
    assert!(
        !data.exists(),
        "a refused server created its data directory"
    );
    let (code, err) = run(&[
        "agent",
        "--server",
        "http://127.0.0.1:1,ftp://x",
        "--token",
        "t",
        "--work-dir",
        d,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("bad server URL `ftp://x`"), "{err}");
}
