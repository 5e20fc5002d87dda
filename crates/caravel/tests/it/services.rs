//! Inference services end to end: a real server, a real agent, Python replicas on
//! loopback, and load from this process through the gateway.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{wait_for, Pool};

fn replica_py() -> String {
    format!("{}/tests/it/data/replica.py", env!("CARGO_MANIFEST_DIR"))
}

/// A spec for the test replica: small, quick to scale down (the delay is in the spec).
fn spec(name: &str, extra: Value) -> Value {
    let mut s = json!({
        "name": name,
        "command": "python3",
        "args": [replica_py()],
        "resources": {"cpu_milli": 100, "memory_bytes": 67108864},
        "readiness": {"path": "/healthz", "period_ms": 200},
        "max_replicas": 4,
        "target_concurrency": 2,
        "scale_down_delay_ms": 3000,
        "scale_to_zero_after_ms": 600000,
        "cold_start_timeout_ms": 30000,
        "kill_grace_ms": 2000
    });
    for (k, v) in extra.as_object().unwrap() {
        s[k] = v.clone();
    }
    s
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// GET through the gateway: (status, body).
fn call(c: &reqwest::blocking::Client, url: &str, token: Option<&str>) -> (u16, String) {
    let mut r = c.get(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    match r.send() {
        Ok(resp) => {
            let st = resp.status().as_u16();
            (st, resp.text().unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

fn show(p: &Pool, name: &str) -> Value {
    p.get(&p.admin, &format!("/v1/services/{name}")).unwrap()
}

fn ready(v: &Value) -> Vec<&Value> {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "ready")
        .collect()
}

/// Load from `n` threads until stopped; every failure is recorded with its status.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<(u16, String)>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(url: &str, token: &str, n: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads = (0..n)
            .map(|_| {
                let (stop, ok, errors) = (stop.clone(), ok.clone(), errors.clone());
                let (url, token) = (url.to_string(), token.to_string());
                std::thread::spawn(move || {
                    let c = client();
                    while !stop.load(Ordering::Relaxed) {
                        let (st, body) = call(&c, &url, Some(&token));
                        if st == 200 {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            errors.lock().unwrap().push((st, body));
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            errors,
            threads,
        }
    }

    fn finish(self) -> (u64, Vec<(u16, String)>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let e = self.errors.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), e)
    }
}

#[test]
fn scale_from_zero_up_down_and_roll_without_errors() {
    let p = Pool::new("svc-scale", &[("a", &[])]);
    let r = p
        .post(&p.admin, "/v1/services", &spec("echo", json!({})))
        .unwrap();
    assert_eq!(r["version"], 1);
    assert_eq!(r["path"], "/s/default/echo/");
    assert_eq!(show(&p, "echo")["replicas"].as_array().unwrap().len(), 0);

    // Scale from zero: the first request is held until a replica is ready.
    let c = client();
    let base = format!("{}/s/default/echo", p.url);
    let t0 = Instant::now();
    let (st, body) = call(&c, &format!("{base}/work?ms=1"), Some(&p.admin));
    assert_eq!(st, 200, "{body}");
    eprintln!("cold start: {:?}", t0.elapsed());
    assert_eq!(ready(&show(&p, "echo")).len(), 1);

    // Scale up under load: 6 clients of 300 ms requests want 3 replicas at 2 each.
    let load = Load::start(&format!("{base}/work?ms=300"), &p.admin, 6);
    wait_for("3 ready replicas", Duration::from_secs(30), || {
        (ready(&show(&p, "echo")).len() >= 3).then_some(())
    });
    // Least outstanding requests: every ready replica serves.
    std::thread::sleep(Duration::from_secs(2));
    let (ok, errors) = load.finish();
    assert!(errors.is_empty(), "errors under scale-up: {errors:?}");
    assert!(ok > 20, "only {ok} requests served");
    let v = show(&p, "echo");
    let busy: Vec<&Value> = v["replicas"].as_array().unwrap().iter().collect();
    assert!(busy.len() >= 3);

    // Scale down under light load (one client): drained replicas leave without one error.
    let load = Load::start(&format!("{base}/work?ms=50"), &p.admin, 1);
    wait_for("scale down to 1", Duration::from_secs(30), || {
        let v = show(&p, "echo");
        (v["replicas"].as_array().unwrap().len() == 1 && ready(&v).len() == 1).then_some(())
    });
    // Rolling update under the same load: version 2 is ready before version 1 drains.
    let r = p
        .post(
            &p.admin,
            "/v1/services",
            &spec("echo", json!({"env": {"VERSION": "2"}})),
        )
        .unwrap();
    assert_eq!(r["version"], 2);
    assert_eq!(r["changed"], true);
    wait_for("version 2 only", Duration::from_secs(30), || {
        let v = show(&p, "echo");
        let reps = v["replicas"].as_array().unwrap();
        (!reps.is_empty()
            && reps
                .iter()
                .all(|r| r["version"] == 2 && r["state"] == "ready"))
        .then_some(())
    });
    let (ok, errors) = load.finish();
    assert!(
        errors.is_empty(),
        "errors in scale-down or update: {errors:?}"
    );
    assert!(ok > 10);
    let (st, body) = call(&c, &format!("{base}/work"), Some(&p.admin));
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["version"],
        "2"
    );
    // Deploying the same spec again changes nothing.
    let r = p
        .post(
            &p.admin,
            "/v1/services",
            &spec("echo", json!({"env": {"VERSION": "2"}})),
        )
        .unwrap();
    assert_eq!(
        (r["version"].as_u64(), r["changed"].as_bool()),
        (Some(2), Some(false))
    );

    // Streaming passes through as it is produced, not buffered to the end.
    let t0 = Instant::now();
    let mut resp = c
        .get(format!("{base}/stream?n=5&ms=300"))
        .bearer_auth(&p.admin)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut first = [0u8; 8];
    use std::io::Read;
    resp.read_exact(&mut first).unwrap();
    let first_at = t0.elapsed();
    let mut rest = String::new();
    resp.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("data: 4"), "{rest}");
    assert!(
        first_at < Duration::from_millis(900) && t0.elapsed() >= Duration::from_millis(1200),
        "first bytes after {first_at:?}, all after {:?}",
        t0.elapsed()
    );

    // Request metrics per service.
    let m = p.text(&p.admin, "/metrics");
    assert!(
        m.contains("caravel_service_requests_total{service=\"default/echo\",code=\"200\"}"),
        "{m}"
    );
    assert!(
        m.lines()
            .any(|l| l.starts_with("caravel_service_request_seconds_bucket")
                && l.contains("service=\"default/echo\"")),
        "{m}"
    );
}

#[test]
fn crashed_replica_is_replaced_and_tenants_are_isolated() {
    let p = Pool::new("svc-crash", &[("a", &[])]);
    let t = p
        .post(&p.admin, "/v1/tenants", &json!({"name": "acme"}))
        .unwrap();
    let acme = t["token"].as_str().unwrap().to_string();
    let t = p
        .post(&p.admin, "/v1/tenants", &json!({"name": "other"}))
        .unwrap();
    let other = t["token"].as_str().unwrap().to_string();
    p.post(
        &acme,
        "/v1/services",
        &spec("private", json!({"min_replicas": 1})),
    )
    .unwrap();
    p.post(
        &acme,
        "/v1/services",
        &spec("open", json!({"public": true, "rate_limit_rps": 3})),
    )
    .unwrap();
    let c = client();
    let url = format!("{}/s/acme/private/work", p.url);
    let (st, body) = call(&c, &url, Some(&acme));
    assert_eq!(st, 200, "{body}");
    // Neither another tenant nor a caller without a token can tell the service exists:
    // the same answer as for one that does not.
    let (st, other_body) = call(&c, &url, Some(&other));
    assert_eq!(st, 404);
    let (st, anon_body) = call(&c, &url, None);
    assert_eq!(st, 404);
    let missing = format!("{}/s/acme/nosuch/work", p.url);
    let (st, missing_body) = call(&c, &missing, None);
    assert_eq!(st, 404);
    let msg = |b: &str| -> String {
        serde_json::from_str::<Value>(b).unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .replace("nosuch", "private")
    };
    assert_eq!(
        msg(&anon_body),
        msg(&missing_body),
        "{anon_body} {missing_body}"
    );
    assert_eq!(msg(&other_body), msg(&missing_body));
    // What strangers send does not become metric labels; scraping needs the admin token.
    for i in 0..20 {
        call(&c, &format!("{}/s/t{i}/s{i}/", p.url), None);
    }
    let m = p.text(&p.admin, "/metrics");
    assert!(!m.contains("service=\"t7/s7\""), "{m}");
    assert!(m.contains("service=\"(none)\""), "{m}");
    assert_eq!(call(&c, &format!("{}/metrics", p.url), None).0, 401);
    assert_eq!(call(&c, &format!("{}/metrics", p.url), Some(&acme)).0, 403);
    // Node listings show a tenant its own work only.
    let used = |token: &str| -> (u64, u64) {
        let n = &p.get(token, "/v1/nodes").unwrap()[0];
        (
            n["running_tasks"].as_u64().unwrap(),
            n["allocated_cpu_milli"].as_u64().unwrap(),
        )
    };
    assert_eq!(
        used(&other),
        (0, 0),
        "another tenant sees none of acme's work"
    );
    let mine = used(&acme);
    assert!(mine.0 >= 1 && mine.1 >= 100, "{mine:?}");
    assert!(used(&p.admin).0 >= mine.0);
    // A tenant's listing shows only its own services.
    let mine = p.get(&other, "/v1/services").unwrap();
    assert_eq!(mine.as_array().unwrap().len(), 0);
    assert_eq!(
        p.get(&acme, "/v1/services")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // A public service needs no token; past its rate limit the gateway answers 429.
    let open = format!("{}/s/acme/open/work", p.url);
    let codes: Vec<u16> = (0..12).map(|_| call(&c, &open, None).0).collect();
    assert!(codes.contains(&200), "{codes:?}");
    assert!(codes.contains(&429), "{codes:?}");
    assert!(codes.iter().all(|c| *c == 200 || *c == 429), "{codes:?}");

    // A replica that crashes leaves the rotation and is replaced.
    let before = show_as(&p, &acme, "private");
    let old_job = ready(&before)[0]["job"].clone();
    let (st, _) = call(&c, &format!("{}/s/acme/private/crash", p.url), Some(&acme));
    assert_ne!(st, 200, "the crashing request itself fails");
    let new_job = wait_for("a new ready replica", Duration::from_secs(30), || {
        let v = show_as(&p, &acme, "private");
        let r = ready(&v);
        (r.len() == 1 && r[0]["job"] != old_job).then(|| r[0]["job"].as_u64().unwrap())
    });
    assert_eq!(call(&c, &url, Some(&acme)).0, 200);

    // Delete: the service and its replicas go; its path answers 404.
    p.call(reqwest::Method::DELETE, &acme, "/v1/services/private", None)
        .unwrap();
    assert_eq!(call(&c, &url, Some(&acme)).0, 404);
    p.wait_state(new_job, &["cancelled"], Duration::from_secs(20));
}

fn show_as(p: &Pool, token: &str, name: &str) -> Value {
    p.get(token, &format!("/v1/services/{name}")).unwrap()
}

#[test]
fn bad_service_specs_are_rejected_with_the_field() {
    let p = Pool::server_only("svc-bad");
    let bad = |s: Value| p.post(&p.admin, "/v1/services", &s).unwrap_err();
    let (st, e) = bad(spec("x", json!({"min_replicas": 9})));
    assert_eq!(st, 400);
    assert_eq!(e["error"]["field"], "min_replicas", "{e}");
    let (st, e) = bad(spec("x", json!({"replicas": 3})));
    assert_eq!(st, 400);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("replicas"),
        "{e}"
    );
    let (_, e) = bad(spec("x", json!({"readiness": {"path": "healthz"}})));
    assert_eq!(e["error"]["field"], "readiness.path", "{e}");
    let (_, e) = bad(spec("Not A Name", json!({})));
    assert_eq!(e["error"]["field"], "name", "{e}");
    let (_, e) = bad(spec("x", json!({"env": {"PORT": "80"}})));
    assert_eq!(e["error"]["field"], "env.PORT", "{e}");
    // Nothing was created by any of them.
    assert_eq!(p.get(&p.admin, "/v1/services").unwrap(), json!([]));

    // The CLI names the file, line and field.
    let f = p.file("svc.toml");
    std::fs::write(&f, "name = \"a\"\ncommand = \"x\"\nreplica = 2\n").unwrap();
    let out = p.cli(&["service", "deploy", "-f", f.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("svc.toml:3: unknown field `replica`"), "{err}");
    std::fs::write(
        &f,
        "name = \"a\"\ncommand = \"x\"\nmin_replicas = 3\nmax_replicas = 1\n",
    )
    .unwrap();
    let out = p.cli(&["service", "deploy", "-f", f.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("min_replicas"), "{err}");
    // A good file deploys, and every command has a JSON form.
    std::fs::write(
        &f,
        format!(
            "name = \"good\"\ncommand = \"python3\"\nargs = [\"{}\"]\n[resources]\ncpu = \"100m\"\nmemory = \"64Mi\"\n",
            replica_py()
        ),
    )
    .unwrap();
    let out = p.cli(&["service", "deploy", "-f", f.to_str().unwrap(), "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], "good");
    let out = p.cli(&["services", "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    let out = p.cli(&["service", "show", "good", "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["spec"]["resources"]["cpu_milli"], 100);
    let out = p.cli(&["service", "delete", "good"]);
    assert!(out.status.success());
    let out = p.cli(&["service", "show", "good"]);
    assert!(!out.status.success());
}

#[test]
fn draining_a_node_moves_replicas_without_errors() {
    let p = Pool::new("svc-drain", &[("a", &[]), ("b", &[])]);
    p.post(
        &p.admin,
        "/v1/services",
        &spec("echo", json!({"min_replicas": 2, "max_replicas": 2})),
    )
    .unwrap();
    let on_nodes = |v: &Value| -> Vec<String> {
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["node"].as_str().unwrap_or("-").to_string())
            .collect()
    };
    let v = wait_for("2 ready replicas", Duration::from_secs(30), || {
        let v = show(&p, "echo");
        (ready(&v).len() == 2).then_some(v)
    });
    // Drain a node that holds a replica, under load.
    let victim = on_nodes(&v)[0].clone();
    let base = format!("{}/s/default/echo", p.url);
    let load = Load::start(&format!("{base}/work?ms=50"), &p.admin, 2);
    // Long streams in flight on both replicas (least outstanding spreads them) while the
    // drain happens: every one must reach its end.
    let streams: Vec<_> = (0..4)
        .map(|_| {
            let (url, token) = (format!("{base}/stream?n=20&ms=150"), p.admin.clone());
            std::thread::spawn(move || call(&client(), &url, Some(&token)))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let out = p.cli(&["node", "drain", &victim]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "replicas off the drained node",
        Duration::from_secs(40),
        || {
            let v = show(&p, "echo");
            let nodes = on_nodes(&v);
            (nodes.len() == 2 && ready(&v).len() == 2 && nodes.iter().all(|n| *n != victim))
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let (ok, errors) = load.finish();
    assert!(errors.is_empty(), "errors during the drain: {errors:?}");
    for s in streams {
        let (st, body) = s.join().unwrap();
        assert_eq!(st, 200);
        assert!(body.contains("data: 19"), "a stream was cut: {body}");
    }
    assert!(ok > 10);
    // Nothing new lands on a drained node; the node list says it is drained.
    let nodes = p.get(&p.admin, "/v1/nodes").unwrap();
    let drained: Vec<&Value> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["drained"] == true)
        .collect();
    assert_eq!(drained.len(), 1);
    assert_eq!(drained[0]["name"], victim.as_str());
    let id = p.submit(
        &p.admin,
        json!({"command": "true", "tasks": 3, "resources": {"cpu_milli": 10, "memory_bytes": 1048576}}),
    );
    let j = p.wait_state(id, &["succeeded"], Duration::from_secs(30));
    let runs = j["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    for r in runs {
        assert_ne!(r["node"].as_str().unwrap(), victim, "{r}");
    }
    let out = p.cli(&["node", "undrain", &victim]);
    assert!(out.status.success());
    let out = p.cli(&["node", "drain", "no-such-node"]);
    assert!(!out.status.success());
}

#[test]
fn replicas_spread_across_zones_and_callers_get_their_own_zone() {
    let p = Pool::new(
        "svc-zones",
        &[("a", &["--zone", "za"]), ("b", &["--zone", "zb"])],
    );
    p.post(
        &p.admin,
        "/v1/services",
        &spec(
            "echo",
            json!({"min_replicas": 2, "max_replicas": 2, "target_concurrency": 50}),
        ),
    )
    .unwrap();
    let v = wait_for("2 ready replicas", Duration::from_secs(30), || {
        let v = show(&p, "echo");
        (ready(&v).len() == 2).then_some(v)
    });
    let mut zones: Vec<&str> = ready(&v)
        .iter()
        .map(|r| r["zone"].as_str().unwrap())
        .collect();
    zones.sort();
    assert_eq!(zones, vec!["za", "zb"], "one replica per zone: {v}");
    let job_in = |z: &str| {
        ready(&v).iter().find(|r| r["zone"] == z).unwrap()["job"]
            .as_u64()
            .unwrap()
            .to_string()
    };
    // A caller naming its zone is served there while that replica has room.
    let c = client();
    for z in ["za", "zb"] {
        for _ in 0..5 {
            let r = c
                .get(format!("{}/s/default/echo/work", p.url))
                .bearer_auth(&p.admin)
                .header("x-caravel-zone", z)
                .send()
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            let body: Value = r.json().unwrap();
            assert_eq!(body["job"], job_in(z).as_str(), "zone {z}");
        }
    }
}

#[test]
fn an_idle_service_scales_to_zero_and_back_and_its_replicas_are_metered() {
    let p = Pool::new("svc-zero", &[("a", &[])]);
    p.post(
        &p.admin,
        "/v1/services",
        &spec("idle", json!({"scale_to_zero_after_ms": 1500})),
    )
    .unwrap();
    let c = client();
    let url = format!("{}/s/default/idle/work", p.url);
    assert_eq!(call(&c, &url, Some(&p.admin)).0, 200);
    let first = ready(&show(&p, "idle"))[0]["job"].as_u64().unwrap();
    // Idle: down to zero replicas, the replica's job cancelled.
    wait_for("scale to zero", Duration::from_secs(20), || {
        show(&p, "idle")["replicas"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    });
    p.wait_state(first, &["cancelled"], Duration::from_secs(20));
    // The next request starts a new replica and is answered.
    let (st, body) = call(&c, &url, Some(&p.admin));
    assert_eq!(st, 200, "{body}");
    let second: Value = serde_json::from_str(&body).unwrap();
    assert_ne!(second["job"], first.to_string().as_str());
    // The first replica's run was metered like any task: a usage record for its job with
    // its CPU held over its wall time.
    let u = p.get(&p.admin, &format!("/v1/usage?job={first}")).unwrap();
    let jobs = u["by_job"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{u}");
    assert_eq!(jobs[0]["runs"], 1);
    let wall = jobs[0]["wall_ms"].as_u64().unwrap();
    assert!(wall > 1000, "{u}");
    assert_eq!(
        jobs[0]["cpu_milli_ms"].as_u64().unwrap(),
        100 * wall,
        "100 millicores for the whole run: {u}"
    );
}

#[test]
fn a_wedged_replica_is_restarted_and_a_never_ready_one_times_out_clearly() {
    let p = Pool::new("svc-live", &[("a", &[])]);
    // Alive for 2 s, then its liveness path fails: restarted (a new replica job).
    p.post(
        &p.admin,
        "/v1/services",
        &spec(
            "wedge",
            json!({"min_replicas": 1, "env": {"LIVE_FOR_S": "2"},
                   "liveness": {"path": "/livez", "period_ms": 200, "failure_threshold": 2}}),
        ),
    )
    .unwrap();
    let first = wait_for("a ready replica", Duration::from_secs(30), || {
        ready(&show(&p, "wedge")).first().map(|r| r["job"].clone())
    });
    wait_for("a replacement", Duration::from_secs(30), || {
        let v = show(&p, "wedge");
        let r = ready(&v);
        (r.len() == 1 && r[0]["job"] != first).then_some(())
    });
    let j = p.job(&p.admin, first.as_u64().unwrap());
    assert_eq!(j["state"], "cancelled", "{j}");

    // A replica that never listens: the held request gets a clear 503 at the timeout.
    let mut s = spec("mute", json!({"cold_start_timeout_ms": 1500}));
    s["command"] = json!("sleep");
    s["args"] = json!(["600"]);
    p.post(&p.admin, "/v1/services", &s).unwrap();
    let t0 = Instant::now();
    let (st, body) = call(
        &client(),
        &format!("{}/s/default/mute/x", p.url),
        Some(&p.admin),
    );
    assert_eq!(st, 503, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["code"], "unavailable");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no ready replica after 1.5 s"),
        "{e}"
    );
    assert!(t0.elapsed() >= Duration::from_millis(1500) && t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_refused_connection_is_retried_on_another_replica() {
    let p = Pool::new("svc-retry", &[("a", &[])]);
    // A readiness threshold high enough that the gateway keeps the closed replica in its
    // table for the whole test: only the retry can save the requests sent to it.
    p.post(
        &p.admin,
        "/v1/services",
        &spec(
            "echo",
            json!({"min_replicas": 2, "max_replicas": 2,
                   "readiness": {"path": "/healthz", "period_ms": 200, "failure_threshold": 100}}),
        ),
    )
    .unwrap();
    let v = wait_for("2 ready replicas", Duration::from_secs(30), || {
        let v = show(&p, "echo");
        (ready(&v).len() == 2).then_some(v)
    });
    let c = client();
    let base = format!("{}/s/default/echo", p.url);
    // One replica stops listening but stays alive. Told directly, not through the gateway,
    // so the gateway holds no pooled connection to it: its next request is refused.
    let addr = ready(&v)[0]["addr"].as_str().unwrap().to_string();
    let (st, _) = call(&c, &format!("http://{addr}/close"), None);
    assert_eq!(st, 200);
    wait_for(
        "the closed replica to refuse connections",
        Duration::from_secs(10),
        || std::net::TcpStream::connect(&addr).is_err().then_some(()),
    );
    // The first request goes to the closed replica (the least busy, lowest job first):
    // a PUT with a body, which the gateway streams, not buffers. The refused connection
    // never took the body, so it goes whole to the other replica.
    let sent: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
    let r = c
        .put(format!("{base}/echo"))
        .bearer_auth(&p.admin)
        .body(sent.clone())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.bytes().unwrap()[..] == sent[..],
        "the retried body differs"
    );
    for _ in 0..10 {
        let (st, body) = call(&c, &format!("{base}/work"), Some(&p.admin));
        assert_eq!(st, 200, "{body}");
    }
    let m = p.text(&p.admin, "/metrics");
    let retries: u64 = m
        .lines()
        .find(|l| l.starts_with("caravel_service_retries_total{service=\"default/echo\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(retries >= 1, "no retry counted: {m}");
}

#[test]
fn a_replica_that_does_not_answer_in_time_gets_a_504_and_the_next_request_goes_through() {
    let p = Pool::new("svc-timeout", &[("a", &[])]);
    p.post(
        &p.admin,
        "/v1/services",
        &spec(
            "slow",
            json!({"min_replicas": 1, "max_replicas": 1, "response_timeout_ms": 1000}),
        ),
    )
    .unwrap();
    wait_for("a ready replica", Duration::from_secs(30), || {
        (ready(&show(&p, "slow")).len() == 1).then_some(())
    });
    let c = client();
    let base = format!("{}/s/default/slow", p.url);
    let t0 = Instant::now();
    let (st, body) = call(&c, &format!("{base}/work?ms=4000"), Some(&p.admin));
    let took = t0.elapsed();
    assert_eq!(st, 504, "{body}");
    assert!(
        body.contains("upstream_timeout") && body.contains("response_timeout"),
        "{body}"
    );
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(3500),
        "{took:?}"
    );
    // The timed-out request no longer counts, and the replica serves the next one.
    let (st, body) = call(&c, &format!("{base}/work?ms=200"), Some(&p.admin));
    assert_eq!(st, 200, "{body}");
    wait_for("nothing in flight", Duration::from_secs(10), || {
        (show(&p, "slow")["in_flight"] == 0).then_some(())
    });
}

#[test]
fn a_rollout_that_cannot_surge_says_it_is_stuck_and_on_stuck_replace_gets_it_through() {
    // One CPU, two replicas of half a CPU: no room for a surge replica.
    let p = Pool::new("svc-stuck", &[("a", &["--cpus", "1"])]);
    let full = |extra: Value| {
        let mut s = spec(
            "full",
            json!({"resources": {"cpu_milli": 500, "memory_bytes": 67108864},
                   "min_replicas": 2, "max_replicas": 2, "progress_deadline_ms": 2000}),
        );
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        s
    };
    p.post(&p.admin, "/v1/services", &full(json!({}))).unwrap();
    wait_for("2 ready replicas", Duration::from_secs(30), || {
        (ready(&show(&p, "full")).len() == 2).then_some(())
    });
    let r = p
        .post(&p.admin, "/v1/services", &full(json!({"env": {"V": "2"}})))
        .unwrap();
    assert_eq!(r["version"], 2);
    let v = wait_for("the rollout stuck", Duration::from_secs(30), || {
        let v = show(&p, "full");
        (v["rollout"]["state"] == "stuck").then_some(v)
    });
    let m = v["rollout"]["message"].as_str().unwrap();
    assert!(
        m.starts_with("rollout of v2 stuck: no progress for ")
            && m.contains("cannot be placed: [no_fit]")
            && m.contains("on_stuck = \"replace\""),
        "{m}"
    );
    // Availability is not traded away: both old replicas still serve.
    assert_eq!(ready(&v).len(), 2, "{v}");
    assert!(ready(&v).iter().all(|r| r["version"] == 1), "{v}");
    let out = p.cli(&["service", "show", "full"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("rollout   STUCK: rollout of v2 stuck"),
        "{text}"
    );
    assert!(text.contains("rollout of v2 started"), "{text}");

    // Told to replace in place, the next version goes through, one replica at a time.
    let r = p
        .post(
            &p.admin,
            "/v1/services",
            &full(json!({"env": {"V": "3"}, "on_stuck": "replace"})),
        )
        .unwrap();
    assert_eq!(r["version"], 3);
    let v = wait_for("v3 rolled out", Duration::from_secs(60), || {
        let v = show(&p, "full");
        let reps = v["replicas"].as_array()?;
        (v.get("rollout").is_none()
            && reps.len() == 2
            && reps
                .iter()
                .all(|r| r["version"] == 3 && r["state"] == "ready"))
        .then_some(v)
    });
    let events: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        events.iter().any(|e| e.starts_with("rollout of v3 stuck")),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("rollout of v3 complete in ")),
        "{events:?}"
    );
}
