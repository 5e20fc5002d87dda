//! The server's edges tried as an attacker would: stalled and flooding connections, rate
//! limits, and the error shape of every layer.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;

/// How many descriptors the server process holds open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// True once the server has closed `s` (a read gives EOF or an error).
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // An answer (the body timeout's 400) before the close is fine; read on.
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn stalled_connections_close_and_a_flood_starves_neither_agents_nor_honest_clients() {
    let p = Pool::with_server_args(
        "edges",
        &[
            "--header-timeout",
            "2s",
            "--body-timeout",
            "2s",
            "--max-connections",
            "300",
            "--max-connections-per-client",
            "200",
        ],
        &[("a", &["--cpus", "4"])],
    );
    let addr = format!("127.0.0.1:{}", p.port);
    // Idle, half a header, and headers with half a body: each closed by its timeout.
    let t0 = Instant::now();
    let mut idle = TcpStream::connect(&addr).unwrap();
    let mut half_head = TcpStream::connect(&addr).unwrap();
    half_head
        .write_all(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    let mut half_body = TcpStream::connect(&addr).unwrap();
    half_body
        .write_all(
            format!(
                "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"comm",
                p.admin
            )
            .as_bytes(),
        )
        .unwrap();
    for (what, s) in [
        ("idle", &mut idle),
        ("half a header", &mut half_head),
        ("half a body", &mut half_body),
    ] {
        assert!(
            closed_within(s, Duration::from_secs(8)),
            "a connection with {what} is still open after {:?}",
            t0.elapsed()
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(8));

    // A flood: 50 slowloris connections that trickle a header byte every second, and
    // 2,000 half-header connections from the same address, far past the cap.
    let server_pid = p.server.as_ref().unwrap().id();
    let fds_before = open_fds(server_pid);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let (addr, stop) = (addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            let mut opened = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if opened < 2_000 {
                    if let Ok(mut s) = TcpStream::connect(&addr) {
                        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n");
                        held.push(s);
                        opened += 1;
                    }
                } else {
                    for s in held.iter_mut().take(50) {
                        let _ = s.write_all(b"X");
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            opened
        })
    };
    // Meanwhile: an honest client submits every 0.5 s, and the agent must keep syncing
    // (the jobs run), for 10 s.
    let mut latencies = vec![];
    let mut max_fds = 0;
    let mut jobs = vec![];
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let t = Instant::now();
        let id = p.submit(
            &p.admin,
            json!({"command": "true", "resources": {"cpu_milli": 100}}),
        );
        latencies.push(t.elapsed());
        jobs.push(id);
        max_fds = max_fds.max(open_fds(server_pid));
        std::thread::sleep(Duration::from_millis(500));
    }
    for id in &jobs {
        p.wait_state(*id, &["succeeded"], Duration::from_secs(30));
    }
    let nodes = p.get(&p.admin, "/v1/nodes").unwrap();
    assert_eq!(nodes[0]["state"], "ready", "{nodes}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let opened = flood.join().unwrap();
    assert!(
        opened >= 1_000,
        "the flood opened only {opened} connections"
    );
    latencies.sort();
    let worst = *latencies.last().unwrap();
    assert!(
        worst < Duration::from_secs(2),
        "an honest submit took {worst:?} during the flood"
    );
    // The cap holds the server's descriptors, whatever the flood opened (with a slack
    // of 26 for evicted connections on their way out).
    assert!(
        max_fds <= fds_before + 300 + 26 + 10,
        "the server held {max_fds} descriptors (before the flood {fds_before}, cap 300)"
    );
    let metrics = p.text(&p.admin, "/metrics");
    let evicted = metrics
        .lines()
        .find(|l| l.starts_with("caravel_connections_evicted_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    // Past the cap the flood's own connections made room (how many depends on how many
    // its header timeout closed first).
    assert!(
        evicted >= 1.0,
        "nothing evicted: {}",
        metrics
            .lines()
            .filter(|l| l.starts_with("caravel_connections"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let log = std::fs::read_to_string(p.file("agent-a.log")).unwrap();
    assert!(
        !log.contains("server unreachable"),
        "the agent lost the server during the flood: {log}"
    );
}

#[test]
fn rate_limits_answer_429_with_retry_after_and_leave_the_control_loop_alone() {
    let p = Pool::with_server_args(
        "ratelimit",
        &["--rate-limit", "10:20", "--rate-limit-anonymous", "5:10"],
        &[("a", &["--cpus", "4"])],
    );
    let raw = |token: &str, path: &str| {
        Pool::rt().block_on(async {
            let r = reqwest::Client::new()
                .get(format!("{}{path}", p.url))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let body: Value = r.json().await.unwrap();
            (status, retry, body)
        })
    };
    // A stranger guessing tokens: its first ten are told 401, then it waits.
    let mut statuses = vec![];
    for _ in 0..50 {
        statuses.push(raw("not-a-token", "/v1/jobs"));
    }
    let unauth = statuses.iter().filter(|s| s.0 == 401).count();
    let limited: Vec<_> = statuses.iter().filter(|s| s.0 == 429).collect();
    assert!((10..=12).contains(&unauth), "{unauth} answered 401");
    assert!(limited.len() >= 38, "{} answered 429", limited.len());
    assert_eq!(
        limited[0].2["error"]["code"], "rate_limited",
        "{}",
        limited[0].2
    );
    assert!(limited[0]
        .1
        .as_deref()
        .is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
    // A tenant: its own budget (20 at once), unaffected by the stranger's.
    let t = p
        .post(&p.admin, "/v1/tenants", &json!({"name": "busy"}))
        .unwrap();
    let token = t["token"].as_str().unwrap().to_string();
    let answers: Vec<u16> = (0..40).map(|_| raw(&token, "/v1/jobs").0).collect();
    let ok = answers.iter().filter(|s| **s == 200).count();
    assert!((20..=23).contains(&ok), "{answers:?}");
    assert!(answers.iter().all(|s| *s == 200 || *s == 429));
    // The CLI waits as told and gets through.
    let out = p.cli_as(&token, &["jobs"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The admin is not limited, and the agent kept working throughout.
    for _ in 0..100 {
        assert_eq!(raw(&p.admin, "/v1/jobs").0, 200);
    }
    let id = p.submit(&p.admin, json!({"command": "true"}));
    p.wait_state(id, &["succeeded"], Duration::from_secs(20));
    let metrics = p.text(&p.admin, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("caravel_api_rate_limited_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

/// Every error is `{"error": {"code", "message", "field"?}}` with a known code.
fn assert_error_shape(status: u16, ct: &str, body: &[u8], what: &str) -> Value {
    assert!(
        ct.starts_with("application/json"),
        "{what}: {status} with content-type {ct:?}: {}",
        String::from_utf8_lossy(body)
    );
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", String::from_utf8_lossy(body)));
    let code = v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: {v}"));
    assert!(
        [
            "invalid_argument",
            "malformed_request",
            "unauthenticated",
            "permission_denied",
            "not_found",
            "conflict",
            "unschedulable",
            "exceeds_quota",
            "unavailable",
            "rate_limited",
            "too_large",
            "method_not_allowed",
        ]
        .contains(&code),
        "{what}: unexpected code {code}: {v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    v
}

#[test]
fn every_layer_answers_errors_in_one_shape_whatever_bytes_it_is_sent() {
    let p = Pool::with_server_args(
        "errshape",
        &["--rate-limit", "off", "--rate-limit-anonymous", "off"],
        &[],
    );
    let send = |method: &str, path: &str, token: Option<&str>, body: Vec<u8>| {
        Pool::rt().block_on(async {
            let mut r = reqwest::Client::new().request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{path}", p.url),
            );
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            let r = r.body(body).send().await.unwrap();
            let status = r.status().as_u16();
            let ct = r
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap_or("").to_string())
                .unwrap_or_default();
            (status, ct, r.bytes().await.unwrap().to_vec())
        })
    };
    let admin = Some(p.admin.as_str());
    // The cases the fuzzer found, one by one.
    let (s, ct, b) = send("DELETE", "/v1/jobs", admin, vec![]);
    assert_eq!(s, 405);
    let v = assert_error_shape(s, &ct, &b, "405");
    assert_eq!(v["error"]["code"], "method_not_allowed");
    let (s, ct, b) = send("GET", "/v1/jobs?limit=abc", admin, vec![]);
    assert_eq!(s, 400);
    let v = assert_error_shape(s, &ct, &b, "bad query");
    assert_eq!(v["error"]["field"], "limit", "{v}");
    let (s, ct, b) = send("GET", "/v1/jobs/%FF%FE", admin, vec![]);
    assert!(s == 400 || s == 404, "{s}");
    let v = assert_error_shape(s, &ct, &b, "bad path");
    if s == 400 {
        assert_eq!(v["error"]["field"], "id", "{v}");
    }
    let (s, ct, b) = send(
        "POST",
        "/v1/agent/logs",
        Some(&p.agent_token),
        vec![b'x'; 9 << 20],
    );
    assert_eq!(s, 413);
    let v = assert_error_shape(s, &ct, &b, "413");
    assert_eq!(v["error"]["code"], "too_large");
    let (s, ct, b) = send("POST", "/v1/jobs", admin, br#"{"args": ["x"]}"#.to_vec());
    assert_eq!(s, 400);
    let v = assert_error_shape(s, &ct, &b, "missing field");
    assert_eq!(v["error"]["field"], "command", "{v}");

    // Then any bytes to any route: success, or the shape.
    let routes = [
        "/v1/whoami",
        "/v1/jobs",
        "/v1/jobs/1",
        "/v1/jobs/1/cancel",
        "/v1/jobs/1/logs",
        "/v1/jobs/1/checkpoints",
        "/v1/jobs/1/checkpoint-cut",
        "/v1/jobs/1/workdir",
        "/v1/jobs/1/tasks/0/checkpoint",
        "/v1/registries",
        "/v1/registries/r.example",
        "/v1/workdirs/abc",
        "/v1/nodes",
        "/v1/nodes/n/drain",
        "/v1/nodes/n/undrain",
        "/v1/tenants",
        "/v1/usage",
        "/v1/agent/register",
        "/v1/agent/sync",
        "/v1/agent/events",
        "/v1/agent/shutdown",
        "/v1/agent/logs",
        "/v1/services",
        "/v1/services/s",
        "/healthz",
        "/metrics",
        "/v1/openapi.json",
        "/nope",
    ];
    let methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"];
    let tokens = [None, Some("bad"), admin, Some(p.agent_token.as_str())];
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let queries = [
        "",
        "?limit=x",
        "?limit=5",
        "?state=%FF",
        "?tenant=&x=1",
        "?version=-1",
    ];
    for i in 0..400 {
        let route = routes[next() as usize % routes.len()];
        let method = methods[next() as usize % methods.len()];
        let token = tokens[next() as usize % tokens.len()];
        let q = queries[next() as usize % queries.len()];
        let len = (next() % 200) as usize;
        let mut body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 3 == 0 {
            // Nearly JSON: the deserialisers' errors.
            body = format!(r#"{{"command": {}, "x": [1,"#, next() % 7).into_bytes();
        }
        // Writing routes with a random body could create things; that is allowed, but the
        // workdir upload takes a digest check, so any answer is fine as long as it has
        // the shape.
        let (s, ct, b) = send(method, &format!("{route}{q}"), token, body);
        assert!(
            s != 500,
            "{method} {route}{q}: 500 {}",
            String::from_utf8_lossy(&b)
        );
        if s >= 400 && method != "HEAD" {
            assert_error_shape(s, &ct, &b, &format!("{method} {route}{q}"));
        }
    }
}
