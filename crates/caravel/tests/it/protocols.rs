//! What passes through the gateway besides plain requests: gRPC (HTTP/2, streams both
//! ways, trailers, health checks), request bodies of any size, HTTP/1.1 upgrades, and
//! `h2c` replicas. The replica is `caravel bench backend` (tonic's reference health
//! service for gRPC); the gRPC client is tonic.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::harness::{wait_for, Pool, BIN};

pub fn backend(name: &str, extra: Value) -> Value {
    let mut s = json!({
        "name": name,
        "command": BIN,
        "args": ["bench", "backend"],
        "resources": {"cpu_milli": 100, "memory_bytes": 134217728},
        "readiness": {"period_ms": 200},
        "min_replicas": 1,
        "max_replicas": 1,
        "cold_start_timeout_ms": 30000,
        "kill_grace_ms": 1000
    });
    for (k, v) in extra.as_object().unwrap() {
        s[k] = v.clone();
    }
    s
}

fn ready_replicas(p: &Pool, name: &str) -> usize {
    let v = p.get(&p.admin, &format!("/v1/services/{name}")).unwrap();
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "ready")
        .count()
}

/// Messages as raw bytes, as the backend's echo takes them.
#[path = "../../src/raw_codec.rs"]
mod raw_codec;
use raw_codec::Raw;

/// Adds the routing header and the token to every call.
#[derive(Clone)]
struct Route {
    service: &'static str,
    token: String,
}

impl tonic::service::Interceptor for Route {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let m = req.metadata_mut();
        m.insert("x-caravel-service", self.service.parse().unwrap());
        m.insert(
            "authorization",
            format!("Bearer {}", self.token).parse().unwrap(),
        );
        Ok(req)
    }
}

type Routed = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Route>;

async fn chat(grpc: &mut tonic::client::Grpc<Routed>) {
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let out = tokio_stream::wrappers::ReceiverStream::new(rx);
    let path = http::uri::PathAndQuery::from_static("/caravel.bench.Echo/Chat");
    // The first message must be on its way before the call returns its response head.
    tx.send(Bytes::from_static(b"m0")).await.unwrap();
    let mut replies = tokio::time::timeout(
        Duration::from_secs(10),
        grpc.streaming(tonic::Request::new(out), path, Raw),
    )
    .await
    .expect("the response head within 10 s: the request body must not be held back")
    .unwrap()
    .into_inner();
    // Ping-pong: each message is sent only after the previous answer came back, which a
    // gateway that read the request body whole before forwarding it could never do.
    for i in 0..20 {
        if i > 0 {
            tx.send(Bytes::from(format!("m{i}"))).await.unwrap();
        }
        let got = tokio::time::timeout(Duration::from_secs(10), replies.message())
            .await
            .expect("an answer within 10 s")
            .unwrap()
            .unwrap();
        assert_eq!(&got[..], format!("m{i}").as_bytes());
    }
    // An error status after messages arrives in the trailers.
    tx.send(Bytes::from_static(b"fail")).await.unwrap();
    let e = replies.message().await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert_eq!(e.message(), "asked to fail");
}

#[test]
fn grpc_calls_stream_both_ways_through_the_gateway_and_replicas_are_health_checked() {
    let p = Pool::new("svc-grpc", &[("a", &[])]);
    p.post(
        &p.admin,
        "/v1/services",
        &backend(
            "g",
            json!({"protocol": "grpc", "args": ["bench", "backend", "--grpc"]}),
        ),
    )
    .unwrap();
    // A probe of a service the replica does not serve never passes.
    p.post(
        &p.admin,
        "/v1/services",
        &backend(
            "never",
            json!({"protocol": "grpc", "args": ["bench", "backend", "--grpc"],
                   "readiness": {"grpc": "no.such.Service", "period_ms": 200},
                   "cold_start_timeout_ms": 3000}),
        ),
    )
    .unwrap();
    wait_for("the gRPC replica ready", Duration::from_secs(30), || {
        (ready_replicas(&p, "g") == 1).then_some(())
    });

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (url, admin) = (p.url.clone(), p.admin.clone());
    rt.block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let route = |service| Route {
            service,
            token: admin.clone(),
        };
        let mut health = HealthClient::with_interceptor(channel.clone(), route("default/g"));
        let ok = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.status(), ServingStatus::Serving);
        // A status without messages (trailers-only) comes back as the replica sent it.
        let e = health
            .check(HealthCheckRequest {
                service: "nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        // Server streaming: the first status arrives while the call stays open.
        let mut watch = health
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(first.status(), ServingStatus::Serving);
        drop(watch);

        let mut grpc =
            tonic::client::Grpc::new(tonic::service::interceptor::InterceptedService::new(
                channel.clone(),
                route("default/g"),
            ));
        chat(&mut grpc).await;
        // A unary call with a 3 MiB message.
        let big = Bytes::from((0..3 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        grpc.ready().await.unwrap();
        let back = grpc
            .unary(
                tonic::Request::new(big.clone()),
                http::uri::PathAndQuery::from_static("/caravel.bench.Echo/Unary"),
                Raw,
            )
            .await
            .unwrap()
            .into_inner();
        assert!(back == big, "the echo differs");

        // The gateway's own refusals are gRPC statuses, not JSON a gRPC client cannot read.
        let mut nope = HealthClient::with_interceptor(channel.clone(), route("default/nope"));
        let e = nope.check(HealthCheckRequest::default()).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert_eq!(
            e.message(),
            "service default/nope not found (a private service answers only its own tenant's token)"
        );
        assert_eq!(e.metadata().get("caravel-error-code").unwrap(), "not_found");
        let mut stranger = HealthClient::with_interceptor(
            channel.clone(),
            Route {
                service: "default/g",
                token: "cvt_wrong".into(),
            },
        );
        let e = stranger
            .check(HealthCheckRequest::default())
            .await
            .unwrap_err();
        // A bad token learns nothing about whether the service exists.
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(
            e.message().starts_with("service default/g not found"),
            "{e:?}"
        );

        // The service whose health check never passes: held, then UNAVAILABLE (503).
        let mut never = HealthClient::with_interceptor(channel.clone(), route("default/never"));
        let t0 = Instant::now();
        let e = never
            .check(HealthCheckRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(
            t0.elapsed() >= Duration::from_millis(2500),
            "{:?}",
            t0.elapsed()
        );
    });
    // The request counter carries each call's gRPC status (the HTTP status is 200 for all):
    // from the trailers (the aborted chat), from a trailers-only answer (the replica's
    // NOT_FOUND), or the gateway's own refusal (NOT_FOUND for a bad token, as if the service
    // did not exist).
    let m = p.text(&p.admin, "/metrics");
    let calls = |status: &str| -> f64 {
        m.lines()
            .filter(|l| {
                l.starts_with("caravel_service_requests_total{")
                    && l.contains("service=\"default/g\"")
                    && l.contains(&format!("grpc_status=\"{status}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(calls("10"), 1.0, "{m}");
    assert_eq!(calls("5"), 2.0, "{m}");
    assert_eq!(calls("16"), 0.0, "{m}");
    assert!(calls("0") >= 2.0, "{m}");
    assert_eq!(ready_replicas(&p, "never"), 0);
    // The replica of `never` runs: only its health check fails.
    let v = p.get(&p.admin, "/v1/services/never").unwrap();
    assert!(
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["addr"].is_string()),
        "{v}"
    );

    // A header that names no service is refused with the header's name.
    let c = reqwest::blocking::Client::new();
    let r = c
        .get(format!("{}/grpc.health.v1.Health/Check", p.url))
        .header("x-caravel-service", "g")
        .bearer_auth(&p.admin)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body = r.text().unwrap();
    assert!(
        body.contains("x-caravel-service") && body.contains("TENANT/SERVICE"),
        "{body}"
    );
}

#[test]
fn large_bodies_upgrades_and_h2c_replicas_pass_through_the_gateway() {
    let p = Pool::new("svc-proto", &[("a", &[])]);
    p.post(&p.admin, "/v1/services", &backend("h", json!({})))
        .unwrap();
    p.post(
        &p.admin,
        "/v1/services",
        &backend("h2", json!({"protocol": "h2c"})),
    )
    .unwrap();
    wait_for("both replicas ready", Duration::from_secs(30), || {
        (ready_replicas(&p, "h") == 1 && ready_replicas(&p, "h2") == 1).then_some(())
    });
    let c = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let get = |url: String| {
        let r = c.get(url).bearer_auth(&p.admin).send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    // The replica of `h2` is spoken to in HTTP/2, the caller's request being HTTP/1.1.
    assert_eq!(
        get(format!("{}/s/default/h2/version", p.url)),
        (200, "HTTP/2.0".to_string())
    );
    assert_eq!(
        get(format!("{}/s/default/h/version", p.url)),
        (200, "HTTP/1.1".to_string())
    );
    // Routing by header works for plain HTTP too, path untouched.
    let r = c
        .get(format!("{}/version", p.url))
        .header("x-caravel-service", "default/h2")
        .bearer_auth(&p.admin)
        .send()
        .unwrap();
    assert_eq!(r.text().unwrap(), "HTTP/2.0");
    // Plain HTTP: the replica is told the scheme, host, caller and prefix.
    let (status, seen) = get(format!("{}/s/default/h/headers", p.url));
    assert_eq!(status, 200);
    for line in [
        "x-forwarded-proto: http\n".to_string(),
        format!("x-forwarded-host: 127.0.0.1:{}\n", p.port),
        "x-forwarded-for: 127.0.0.1\n".to_string(),
        "x-forwarded-prefix: /s/default/h\n".to_string(),
    ] {
        assert!(seen.contains(&line), "{line:?} not in:\n{seen}");
    }
    // The path reaches the replica as the caller encoded it.
    assert_eq!(
        get(format!("{}/s/default/h/echo-path/a%2Fb%20c", p.url)),
        (200, "/echo-path/a%2Fb%20c".to_string())
    );

    // A caller speaking HTTP/2 (prior knowledge) to the gateway reaches an HTTP/1.1
    // replica, its upload streamed across.
    let h2 = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let r = h2
        .get(format!("{}/s/default/h/version", p.url))
        .bearer_auth(&p.admin)
        .send()
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.text().unwrap(), "HTTP/1.1");
    let r = h2
        .post(format!("{}/s/default/h/count", p.url))
        .bearer_auth(&p.admin)
        .body(vec![1u8; 8 << 20])
        .send()
        .unwrap();
    assert_eq!(r.text().unwrap(), (8usize << 20).to_string());

    // 96 MiB, over what the gateway used to buffer (64 MiB), to both kinds of replica.
    for svc in ["h", "h2"] {
        let n = 96usize << 20;
        let r = c
            .post(format!("{}/s/default/{svc}/count", p.url))
            .bearer_auth(&p.admin)
            .body(vec![7u8; n])
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{svc}");
        assert_eq!(r.text().unwrap(), n.to_string(), "{svc}");
    }

    // An HTTP/1.1 upgrade (what WebSocket does): 101, then bytes both ways.
    let open_tunnel = || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "GET /s/default/h/upgrade HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Connection: upgrade\r\nUpgrade: echo\r\n\r\n",
            p.admin
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("upgrade: echo"),
            "{head}"
        );
        for msg in ["hello", "over the tunnel"] {
            s.write_all(msg.as_bytes()).unwrap();
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).unwrap();
            assert_eq!(back, msg.as_bytes());
        }
        s
    };
    // The open tunnel counts as a request in flight on the replica until it closes.
    let in_flight = || {
        let v = p.get(&p.admin, "/v1/services/h").unwrap();
        v["replicas"][0]["in_flight"].as_u64().unwrap()
    };
    let s = open_tunnel();
    assert_eq!(in_flight(), 1);
    drop(s);
    wait_for("the tunnel to close", Duration::from_secs(10), || {
        (in_flight() == 0).then_some(())
    });

    // A tunnel left open does not keep a replica draining for ever: a new version takes
    // over, and the old replica is stopped once the drain timeout is up.
    let mut s = open_tunnel();
    p.post(
        &p.admin,
        "/v1/services",
        &backend("h", json!({"env": {"V": "2"}, "drain_timeout_ms": 2000})),
    )
    .unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the tunnel should have been closed: {other:?}"),
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "closed after {took:?}, before the drain timeout"
    );
    wait_for("the new version alone", Duration::from_secs(20), || {
        let v = p.get(&p.admin, "/v1/services/h").unwrap();
        let r = v["replicas"].as_array().unwrap().clone();
        (r.len() == 1 && r[0]["version"] == 2 && r[0]["state"] == "ready").then_some(())
    });
}
