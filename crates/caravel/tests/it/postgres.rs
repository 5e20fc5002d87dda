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
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = second.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second server on the same database kept running");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
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
