//! `caravel bench gateway`: what the gateway adds over calling a replica directly, side by
//! side with nginx as a reverse proxy in front of the same backend.
//!
//! The backend is `caravel bench backend` (a minimal HTTP server answering 2 bytes),
//! deployed as a public service replica so the gateway routes to it. The same in-process
//! load generator (keep-alive connections, `--concurrency` clients) measures each target
//! in turn for `--seconds`: the replica directly, the gateway, and nginx (started from a
//! generated config with keep-alive to the upstream) when `nginx` is on the PATH. Latency
//! is also measured with one client, where queueing does not hide the added hop.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use caravel_core::api::ServiceView;
use caravel_core::ServiceSpec;

use crate::bench::{pct, start_pool_with};
use crate::client::Client;

struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

/// Runs `call` in a loop from `clients` tasks for `secs`: throughput and latency of the
/// calls that succeeded, and how many failed.
async fn drive<F, Fut>(clients: usize, secs: f64, call: F) -> Result<Figures>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (call, stop, errors, lat) =
                (call.clone(), stop.clone(), errors.clone(), lat.clone());
            tokio::spawn(async move {
                let mut mine = Vec::with_capacity(100_000);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if call().await {
                        mine.push(t.elapsed().as_secs_f64() * 1000.0);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                lat.lock().expect("lock").extend(mine);
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let mut l = std::mem::take(&mut *lat.lock().expect("lock"));
    Ok(Figures {
        rps: l.len() as f64 / elapsed,
        p50_ms: pct(&mut l, 50.0),
        p99_ms: pct(&mut l, 99.0),
        errors: errors.load(Ordering::Relaxed),
    })
}

/// HTTP/1.1 GETs on keep-alive connections, one per client; an https URL is checked
/// against `ca`.
async fn measure(
    url: &str,
    clients: usize,
    secs: f64,
    ca: Option<&std::path::Path>,
) -> Result<Figures> {
    let http = crate::client::http_builder(ca)?
        .pool_max_idle_per_host(clients)
        .http1_only()
        .build()?;
    // Warm the connections first.
    for _ in 0..clients.min(8) {
        let _ = http.get(url).send().await?.bytes().await;
    }
    let url = url.to_string();
    drive(clients, secs, move || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            match http.get(&url).send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            }
        }
    })
    .await
}

/// Unary gRPC calls (`caravel.bench.Echo/Unary`, 2 bytes each way) from `clients` tasks
/// multiplexed on one HTTP/2 connection, as a gRPC client does; `service` adds the
/// gateway's routing header.
async fn measure_grpc(
    url: &str,
    service: Option<&str>,
    clients: usize,
    secs: f64,
) -> Result<Figures> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect()
        .await?;
    let route = service
        .map(|s| s.parse::<tonic::metadata::MetadataValue<_>>())
        .transpose()?;
    let call = move || {
        let (mut grpc, route) = (tonic::client::Grpc::new(channel.clone()), route.clone());
        async move {
            let mut req = tonic::Request::new(bytes::Bytes::from_static(b"ok"));
            if let Some(r) = route {
                req.metadata_mut().insert("x-caravel-service", r);
            }
            grpc.ready().await.is_ok()
                && grpc
                    .unary(
                        req,
                        http::uri::PathAndQuery::from_static("/caravel.bench.Echo/Unary"),
                        crate::raw_codec::Raw,
                    )
                    .await
                    .is_ok()
        }
    };
    if !call().await {
        bail!("a first gRPC call to {url} failed");
    }
    drive(clients, secs, call).await
}

struct Nginx(std::process::Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: nginx's master stops its workers; SIGKILL would leave them running.
        caravel_agent::signal_process(self.0.id() as i32, rustix::process::Signal::TERM);
        for _ in 0..100 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tls`: the certificate and key nginx serves HTTPS with.
fn start_nginx(
    dir: &std::path::Path,
    port: u16,
    upstream: &str,
    grpc: bool,
    tls: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<Option<Nginx>> {
    let Some(bin) = ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        return Ok(None);
    };
    let d = dir.join("nginx");
    std::fs::create_dir_all(d.join("logs"))?;
    // gRPC: h2c in front (`listen … http2`), grpc_pass behind, upstream keep-alive.
    let server = if grpc {
        format!(
            r#"server {{
    listen 127.0.0.1:{port} http2;
    location / {{ grpc_pass grpc://backend; }}
  }}"#
        )
    } else {
        let (ssl, certs) = match tls {
            Some((cert, key)) => (
                " ssl",
                format!(
                    "ssl_certificate {};\n    ssl_certificate_key {};",
                    cert.display(),
                    key.display()
                ),
            ),
            None => ("", String::new()),
        };
        format!(
            r#"server {{
    listen 127.0.0.1:{port}{ssl};
    {certs}
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}"#
        )
    };
    // One worker per core, upstream keep-alive, no access log: nginx as a tuned reverse
    // proxy, the fair comparison.
    let conf = format!(
        r#"worker_processes auto;
daemon off;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream backend {{ server {upstream}; keepalive 256; }}
  {server}
}}
"#,
        d = d.display()
    );
    std::fs::write(d.join("nginx.conf"), conf)?;
    let child = std::process::Command::new(bin)
        .arg("-c")
        .arg(d.join("nginx.conf"))
        .arg("-p")
        .arg(&d)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .context("starting nginx")?;
    let n = Nginx(child);
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("nginx did not start listening");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some(n))
}

pub async fn run(
    clients: usize,
    secs: f64,
    grpc: bool,
    tls: bool,
    dir: Option<std::path::PathBuf>,
) -> Result<i32> {
    let dir = match dir {
        Some(p) => tempfile::tempdir_in(p)?,
        None => tempfile::tempdir()?,
    };
    let server_args = if tls {
        vec!["--tls-self-signed".to_string()]
    } else {
        vec![]
    };
    // The backend replica is this binary, which a sandboxed task cannot see (its root
    // holds only what the node mounts for tasks): the gateway is measured, not the sandbox.
    let agent_args = ["--sandbox".to_string(), "off".to_string()];
    let pool = start_pool_with(dir.path(), false, &server_args, &agent_args).await?;
    let c = Client::with_ca(&pool.url, &pool.admin, pool.ca.as_deref())?;
    let exe = std::env::current_exe()?;
    let args: &[&str] = if grpc {
        &["bench", "backend", "--grpc"]
    } else {
        &["bench", "backend"]
    };
    let mut spec = ServiceSpec::simple("backend", &exe.to_string_lossy(), args);
    if grpc {
        spec.protocol = caravel_core::Protocol::Grpc;
    }
    spec.public = true;
    spec.min_replicas = 1;
    spec.max_replicas = 1;
    spec.target_concurrency = 100_000;
    spec.resources.cpu_milli = 1000;
    spec.resources.memory_bytes = 128 << 20;
    let _: ServiceView = c.post("/v1/services", &spec).await?;
    let t0 = Instant::now();
    let addr = loop {
        let v: ServiceView = c.get("/v1/services/backend").await?;
        if let Some(r) = v.replicas.iter().find(|r| r.state == "ready") {
            break r.addr.clone().context("a ready replica has an address")?;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("the backend replica did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (direct, gateway) = if grpc {
        (format!("http://{addr}"), pool.url.clone())
    } else {
        (
            format!("http://{addr}/x"),
            format!("{}/s/default/backend/x", pool.url),
        )
    };
    let nginx_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let tls_dir = dir.path().join("server/tls");
    let (cert, key) = (tls_dir.join("server.pem"), tls_dir.join("server-key.pem"));
    let nginx = start_nginx(
        dir.path(),
        nginx_port,
        &addr,
        grpc,
        tls.then_some((cert.as_path(), key.as_path())),
    )?;
    let via_nginx = if grpc {
        format!("http://127.0.0.1:{nginx_port}")
    } else if tls {
        format!("https://127.0.0.1:{nginx_port}/x")
    } else {
        format!("http://127.0.0.1:{nginx_port}/x")
    };

    let mut out = serde_json::Map::new();
    let mut targets = vec![("direct", direct.as_str()), ("gateway", gateway.as_str())];
    if nginx.is_some() {
        targets.push(("nginx", via_nginx.as_str()));
    } else {
        eprintln!("nginx not found: install it (apt-get install -y nginx) for the comparison");
    }
    for (name, url) in &targets {
        let (one, many) = if grpc {
            let header = (*name == "gateway").then_some("default/backend");
            (
                measure_grpc(url, header, 1, secs.min(5.0)).await?,
                measure_grpc(url, header, clients, secs).await?,
            )
        } else {
            let ca = pool.ca.as_deref();
            (
                measure(url, 1, secs.min(5.0), ca).await?,
                measure(url, clients, secs, ca).await?,
            )
        };
        eprintln!(
            "{name:8} 1 client: p50 {:.3} ms p99 {:.3} ms | {clients} clients: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
            one.p50_ms, one.p99_ms, many.rps, many.p50_ms, many.p99_ms, many.errors
        );
        out.insert(format!("{name}_p50_ms"), one.p50_ms.into());
        out.insert(format!("{name}_p99_ms"), one.p99_ms.into());
        out.insert(format!("{name}_rps"), many.rps.into());
        out.insert(format!("{name}_loaded_p50_ms"), many.p50_ms.into());
        out.insert(format!("{name}_loaded_p99_ms"), many.p99_ms.into());
        out.insert(format!("{name}_errors"), (one.errors + many.errors).into());
    }
    let f = |k: &str| out.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
    let added50 = f("gateway_p50_ms") - f("direct_p50_ms");
    let added99 = f("gateway_p99_ms") - f("direct_p99_ms");
    eprintln!("gateway adds p50 {added50:.3} ms, p99 {added99:.3} ms at one client");
    out.insert(
        "bench".into(),
        match (grpc, tls) {
            (true, _) => "gateway-grpc",
            (false, true) => "gateway-tls",
            (false, false) => "gateway",
        }
        .into(),
    );
    out.insert("clients".into(), clients.into());
    out.insert("added_p50_ms".into(), added50.into());
    out.insert("added_p99_ms".into(), added99.into());
    drop(nginx);
    println!("{}", serde_json::Value::Object(out));
    Ok(0)
}
