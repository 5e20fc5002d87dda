//! HTTPS: a pool whose server made its own CA (API, gateway, agents, CLI and the agents'
//! log endpoints all over TLS), a server on an operator's certificate files renewed in
//! place, and what a client with the wrong CA or scheme is told.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{free_port, wait_for, Pool, BIN};

fn client_trusting(ca: &Path) -> reqwest::blocking::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::blocking::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_self_signed_pool_runs_jobs_logs_and_services_over_tls() {
    let p = Pool::with_server_args("tls-pool", &["--tls-self-signed"], &[("a", &[])]);
    assert!(p.url.starts_with("https://"));
    let ca = p.ca.clone().unwrap();

    // The CLI, trusting the pool CA (CARAVEL_CA), submits and reads logs. The logs come
    // from the agent's own endpoint, which serves https with a certificate it made and
    // registered: the server accepts that one only.
    let o = p.cli(&["submit", "--wait", "--", "sh", "-c", "echo over tls"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = p.cli(&["logs", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "over tls\n");

    // Checkpoints travel over TLS too: the first attempt saves one as it fails, and the
    // retry finds it.
    let script = r#"d="$CARAVEL_CHECKPOINT_DIR"
if [ -f "$d/mark" ]; then cat "$d/mark"; exit 0; fi
echo "saved by attempt $CARAVEL_ATTEMPT" > "$d/.m"; mv "$d/.m" "$d/mark"; exit 1"#;
    let o = p.cli(&[
        "submit",
        "--wait",
        "--max-retries",
        "1",
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = p.cli(&["logs", "2"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "saved by attempt 1\n");

    // ALPN offers HTTP/2: a client that can speak it does.
    let c = client_trusting(&ca);
    let r = c
        .get(format!("{}/v1/nodes", p.url))
        .bearer_auth(&p.admin)
        .send()
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let nodes: Value = r.json().unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 1);

    // A service behind the gateway is reached over https too.
    p.post(
        &p.admin,
        "/v1/services",
        &crate::protocols::backend("web", json!({})),
    )
    .unwrap();
    let body = wait_for("the service over https", Duration::from_secs(30), || {
        let r = c
            .get(format!("{}/s/default/web/version", p.url))
            .bearer_auth(&p.admin)
            .send()
            .ok()?;
        (r.status() == 200).then(|| r.text().unwrap())
    });
    assert_eq!(
        body, "HTTP/1.1",
        "the replica itself is spoken to in plain HTTP/1.1"
    );

    // Plain HTTP on the TLS port: told to use https, in the API's error shape.
    let port = p.port;
    let r = reqwest::blocking::get(format!("http://127.0.0.1:{port}/v1/nodes")).unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "invalid_argument");
    assert!(v["error"]["message"].as_str().unwrap().contains("https://"));

    // A CLI that does not trust the pool CA fails at once (no 30 s of submit retries) and
    // says what to pass.
    let job_ids = || -> Vec<Value> {
        let v = p.get(&p.admin, "/v1/jobs").unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].clone())
            .collect()
    };
    let jobs_before = job_ids();
    let t0 = Instant::now();
    let o = Command::new(BIN)
        .args(["submit", "--", "true"])
        .env("CARAVEL_SERVER", &p.url)
        .env("CARAVEL_TOKEN", &p.admin)
        .env("CARAVEL_CONFIG", p.file("no-config.toml"))
        .env_remove("CARAVEL_CA")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("--ca") && e.contains("tls/ca.pem"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    // Nothing was submitted by it.
    assert_eq!(job_ids(), jobs_before);

    // An agent that does not trust the pool CA never registers.
    let mut bad = Command::new(BIN)
        .args(["agent", "--server", &p.url, "--token", &p.agent_token])
        .args([
            "--name",
            &p.node_name("untrusting"),
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--work-dir")
        .arg(p.file("agent-untrusting"))
        .env_remove("CARAVEL_CA")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let nodes = p.get(&p.admin, "/v1/nodes").unwrap();
    let _ = bad.kill();
    let _ = bad.wait();
    assert_eq!(nodes.as_array().unwrap().len(), 1, "{nodes}");
}

/// A CA and a server certificate for 127.0.0.1, in `dir`.
fn issue(dir: &Path) -> caravel_tls::Issued {
    caravel_tls::self_signed(dir, &["127.0.0.1".into(), "localhost".into()]).unwrap()
}

#[test]
fn a_renewed_certificate_is_served_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let a = issue(&tmp.path().join("a"));
    let b = issue(&tmp.path().join("b"));
    let cert = tmp.path().join("live.pem");
    let key = tmp.path().join("live-key.pem");
    std::fs::copy(&a.cert, &cert).unwrap();
    std::fs::copy(&a.key, &key).unwrap();
    let p = Pool::server_only_with(
        "tls-files",
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let url = format!("https://127.0.0.1:{}/v1/nodes", p.port);
    let works = |ca: &Path| {
        client_trusting(ca)
            .get(&url)
            .bearer_auth(&p.admin)
            .send()
            .is_ok_and(|r| r.status() == 200)
    };
    assert!(works(&a.ca));
    assert!(!works(&b.ca));
    // An operator's certificate: there is no pool CA to hand out.
    let r = client_trusting(&a.ca)
        .get(format!("https://127.0.0.1:{}/v1/tls/ca.pem", p.port))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    // Renewed in place, the way certbot or cert-manager do it: key, then certificate.
    std::fs::copy(&b.key, &key).unwrap();
    std::fs::copy(&b.cert, &cert).unwrap();
    wait_for("the renewed certificate", Duration::from_secs(10), || {
        works(&b.ca).then_some(())
    });
    assert!(!works(&a.ca));
    // A broken renewal (the certificate only) keeps the last good pair in service.
    std::fs::copy(&a.cert, &cert).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(works(&b.ca));
    assert!(p.server.is_some());
}

#[test]
fn bad_tls_flags_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let a = issue(&tmp.path().join("a"));
    let b = issue(&tmp.path().join("b"));
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let server = |args: &[&str]| {
        let o = Command::new(BIN)
            .args(["server", "--listen", &listen, "--data-dir"])
            .arg(tmp.path().join("data"))
            .args(args)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} started");
        stderr(&o)
    };
    let e = server(&["--tls-cert", a.cert.to_str().unwrap()]);
    assert!(e.contains("--tls-key"), "{e}");
    let e = server(&[
        "--tls-cert",
        "/nonexistent.pem",
        "--tls-key",
        a.key.to_str().unwrap(),
    ]);
    assert!(
        e.contains("reading certificate /nonexistent.pem") && e.contains("No such file"),
        "{e}"
    );
    let e = server(&[
        "--tls-cert",
        a.cert.to_str().unwrap(),
        "--tls-key",
        b.key.to_str().unwrap(),
    ]);
    assert!(e.contains("does not go with the certificate"), "{e}");
    let e = server(&[
        "--tls-cert",
        a.ca.to_str().unwrap(),
        "--tls-key",
        a.cert.to_str().unwrap(),
    ]);
    assert!(e.contains("holds no private key"), "{e}");
    let e = server(&["--tls-self-signed", "--tls-san", "db.example,bad name"]);
    assert!(e.contains("--tls-san") && e.contains("\"bad name\""), "{e}");
    let e = server(&["--tls-san", "db.example"]);
    assert!(e.contains("--tls-self-signed"), "{e}");
    let e = server(&[
        "--tls-self-signed",
        "--tls-cert",
        a.cert.to_str().unwrap(),
        "--tls-key",
        a.key.to_str().unwrap(),
    ]);
    assert!(e.contains("cannot be used with"), "{e}");

    let o = Command::new(BIN)
        .args([
            "agent",
            "--server",
            &format!("https://{listen}"),
            "--token",
            "t",
        ])
        .args(["--ca", "/nonexistent-ca.pem", "--work-dir"])
        .arg(tmp.path().join("agent"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("--ca: reading CA certificate /nonexistent-ca.pem"),
        "{e}"
    );

    let o = Command::new(BIN)
        .args([
            "jobs",
            "--server",
            &format!("https://{listen}"),
            "--token",
            "t",
        ])
        .args(["--ca", a.key.to_str().unwrap()])
        .env("CARAVEL_CONFIG", tmp.path().join("no-config.toml"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("--ca") && e.contains("holds no certificate"),
        "{e}"
    );

    // An agent's pinned certificate must be a SHA-256.
    let p = Pool::server_only("tls-register");
    let reg = |pin: Value| {
        p.post(
            &p.agent_token,
            "/v1/agent/register",
            &json!({
                "name": "n1", "address": "127.0.0.1", "agent_url": "https://127.0.0.1:1",
                "agent_secret": "s", "instance": "i", "agent_cert_sha256": pin,
                "capacity": {"cpu_milli": 1000, "memory_bytes": 1073741824, "devices": []}
            }),
        )
    };
    let (status, v) = reg(json!("abc")).unwrap_err();
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["field"], "agent_cert_sha256", "{v}");
    reg(json!("AB".repeat(32))).unwrap();
}

#[test]
fn up_tls_detached_points_the_client_config_at_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _holders = crate::surface::Holders(vec![data.clone()]);
    let listen = format!("127.0.0.1:{}", free_port());
    let cfg = dir.path().join("config.toml");
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .env("CARAVEL_CONFIG", &cfg)
            .env_remove("CARAVEL_SERVER")
            .env_remove("CARAVEL_TOKEN")
            .env_remove("CARAVEL_CA")
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
    let up = [
        "up",
        "--tls",
        "--detach",
        "--listen",
        &listen,
        "--data-dir",
        d,
    ];
    let (code, text) = run(&up);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("caravel is up at https://{listen}")),
        "{text}"
    );
    let (code, text) = run(&["submit", "--wait", "--", "echo", "hello"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("hello\n"), "{text}");
    let conf = std::fs::read_to_string(&cfg).unwrap();
    let ca = data.join("tls").join("ca.pem");
    assert!(
        conf.contains(&format!("server = \"https://{listen}\""))
            && conf.contains(&format!("ca = \"{}\"", ca.display())),
        "{conf}"
    );
    // Run again: already up, over https, with the config pointed at the same CA.
    std::fs::remove_file(&cfg).unwrap();
    let (code, text) = run(&up);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("caravel is already up at https://{listen}")),
        "{text}"
    );
    let (code, text) = run(&["nodes"]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = run(&["down", "--data-dir", d]);
    assert_eq!(code, Some(0), "{text}");
}

#[test]
fn services_are_reached_by_host_name_under_a_gateway_domain() {
    let p = Pool::with_server_args(
        "tls-host",
        &["--tls-self-signed", "--gateway-domain", "apps.test"],
        &[("a", &[])],
    );
    let t1 = p
        .post(&p.admin, "/v1/tenants", &json!({"name": "t1"}))
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let svc = |name: &str| crate::protocols::backend(name, json!({}));
    p.post(&p.admin, "/v1/services", &svc("web")).unwrap();
    p.post(&t1, "/v1/services", &svc("web")).unwrap();
    p.post(&p.admin, "/v1/services", &svc("under_score"))
        .unwrap();
    // The view says where each service is reached, when its names fit a DNS label.
    let host = |token: &str, name: &str| {
        p.get(token, &format!("/v1/services/{name}")).unwrap()["host"].clone()
    };
    assert_eq!(host(&p.admin, "web"), "web.apps.test");
    assert_eq!(host(&t1, "web"), "web--t1.apps.test");
    assert_eq!(host(&p.admin, "under_score"), Value::Null);

    // Every service host resolves to the server, as a wildcard DNS record would; the
    // self-signed certificate covers *.apps.test.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", p.port).parse().unwrap();
    let pem = std::fs::read(p.ca.as_ref().unwrap()).unwrap();
    let c = reqwest::blocking::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .resolve("web.apps.test", addr)
        .resolve("web--t1.apps.test", addr)
        .resolve("nope.apps.test", addr)
        .resolve("apps.test", addr)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let port = p.port;
    let get = |host: &str, path: &str, token: &str| {
        let r = c
            .get(format!("https://{host}:{port}{path}"))
            .bearer_auth(token)
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    // The whole path goes to the replica, as sent; the replica answers in HTTP/1.1.
    let (status, body) = wait_for("web by host", Duration::from_secs(30), || {
        let r = get("web.apps.test", "/echo-path/a%2Fb", &p.admin);
        (r.0 == 200).then_some(r)
    });
    assert_eq!((status, body.as_str()), (200, "/echo-path/a%2Fb"));
    let r = wait_for("t1's web by host", Duration::from_secs(30), || {
        let r = get("web--t1.apps.test", "/version", &t1);
        (r.0 == 200).then_some(r)
    });
    assert_eq!(r.1, "HTTP/1.1");
    // The same rules as by path: another tenant's private service does not exist for t1.
    let (status, body) = get("web.apps.test", "/version", &t1);
    assert_eq!(status, 404, "{body}");
    // The replica learns what the caller asked for: scheme, host and address.
    let r = c
        .get(format!("https://web.apps.test:{port}/headers"))
        .bearer_auth(&p.admin)
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "gopher")
        .send()
        .unwrap();
    let seen = r.text().unwrap();
    for line in [
        "x-forwarded-proto: https\n".to_string(),
        format!("x-forwarded-host: web.apps.test:{port}\n"),
        "x-forwarded-for: 203.0.113.7, 127.0.0.1\n".to_string(),
    ] {
        assert!(seen.contains(&line), "{line:?} not in:\n{seen}");
    }
    assert!(
        !seen.contains("gopher") && !seen.contains("authorization"),
        "{seen}"
    );
    let (status, body) = get("nope.apps.test", "/version", &p.admin);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not_found"), "{body}");
    // The domain itself is not a service: the API answers there.
    let (status, body) = get("apps.test", "/v1/nodes", &p.admin);
    assert_eq!(status, 200, "{body}");

    // Bad domains are refused, naming the flag.
    let o = Command::new(BIN)
        .args(["server", "--gateway-domain", "*.apps.test"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("--gateway-domain") && e.contains("no `*.`"),
        "{e}"
    );
    let o = Command::new(BIN)
        .args(["server", "--gateway-domain", "bad_domain"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--gateway-domain"), "{}", stderr(&o));
}

#[test]
fn an_agent_joins_by_the_pool_ca_fingerprint() {
    let p = Pool::server_only_with("tls-join", &["--tls-self-signed"]);
    let fp = wait_for(
        "the CA fingerprint in the server's log",
        Duration::from_secs(10),
        || {
            let log = std::fs::read_to_string(p.file("server.log")).ok()?;
            let fp = log
                .split("--ca-sha256 ")
                .nth(1)?
                .split_whitespace()
                .next()?;
            Some(fp.to_string())
        },
    );
    let pem = std::fs::read(p.ca.as_ref().unwrap()).unwrap();
    assert_eq!(caravel_tls::pem_fingerprint(&pem).unwrap(), fp);
    let agent = |name: &str, pin: &str| {
        let mut c = Command::new(BIN);
        c.args(["agent", "--server", &p.url, "--token", &p.agent_token])
            .args(["--name", &p.node_name(name), "--listen", "127.0.0.1:0"])
            .args(["--ca-sha256", pin, "--work-dir"])
            .arg(p.file(&format!("agent-{name}")))
            .env_remove("CARAVEL_CA")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    // The right fingerprint: the agent fetches the CA, checks it, joins and runs work.
    let mut good = agent("pinned", &fp).spawn().unwrap();
    p.wait_nodes_ready(1);
    let o = p.cli(&["submit", "--wait", "--", "echo", "joined"]);
    let _ = good.kill();
    let _ = good.wait();
    assert!(o.status.success(), "{}", stderr(&o));
    // Another pool's CA, or no SHA-256 at all: refused at once, naming the flag.
    for (pin, want) in [
        ("0".repeat(64), "refusing it"),
        ("abc".to_string(), "must be a SHA-256"),
    ] {
        let o = agent("wrong", &pin).output().unwrap();
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains("--ca-sha256") && e.contains(want), "{e}");
    }
}
