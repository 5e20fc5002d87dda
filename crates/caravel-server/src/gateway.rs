//! The gateway and the service controller.
//!
//! The gateway routes `/s/{tenant}/{service}/…` (or any path with an
//! `X-Caravel-Service: {tenant}/{service}` header, which is how gRPC clients reach it) to
//! ready replicas, least outstanding requests first, preferring the caller's zone. It is
//! the only way into a replica, so it knows each replica's requests in flight exactly:
//! that is what the autoscaler reads and what draining waits on. Bodies stream both ways;
//! HTTP/1.1 upgrades (WebSocket) are tunnelled; `h2c` and `grpc` services get HTTP/2.
//!
//! The controller runs every `TICK_MS`: it asks the autoscaler how many replicas each
//! service should run, starts replicas of the current version, and drains the rest (out
//! of rotation first, stopped only once its last request — streams included — has
//! finished). A new version rolls out within `max_surge` / `max_unavailable`: old replicas
//! drain only as new ones become ready. A prober task per replica marks it ready when its
//! readiness path answers 2xx and restarts it when its liveness path keeps failing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use caravel_core::{ErrorCode, JobId, Millis, Probe, Protocol, ServiceSpec, TenantId};
use tokio::sync::Notify;

use crate::api::authenticate;
use crate::auth::Principal;
use crate::autoscale::{Autoscaler, TICK_MS};
use crate::core::ReplicaInfo;
use crate::error::ApiError;
use crate::{now_ms, Shared};

pub type Key = (TenantId, String);

/// The header that routes a request to a service whatever its path: gRPC clients call
/// `/{package.Service}/{Method}` at the root and cannot add a path prefix.
pub const SERVICE_HEADER: &str = "x-caravel-service";

/// What the hot path needs to know of a service.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub tenant: TenantId,
    pub public: bool,
    /// How long to hold a request while no replica is ready.
    pub cold_ms: u64,
    pub protocol: Protocol,
    /// How long to wait for a replica's response head.
    pub response_ms: u64,
}

impl Route {
    fn of(tenant: TenantId, spec: &ServiceSpec) -> Route {
        Route {
            tenant,
            public: spec.public,
            cold_ms: spec.cold_start_timeout_ms,
            protocol: spec.protocol,
            response_ms: spec.response_timeout_ms,
        }
    }
}

#[derive(Debug)]
pub struct Replica {
    pub job: JobId,
    pub version: u64,
    pub addr: Option<String>,
    pub zone: String,
    pub region: String,
    pub ready: bool,
    /// Out of rotation, waiting for its requests to finish before it is stopped.
    pub draining: bool,
    /// Stop already asked of the control plane.
    pub stopped: bool,
    /// On a drained node: replaced like an old version, then drained.
    pub evict: bool,
    pub in_flight: Arc<AtomicU64>,
    /// When it was first seen with an address, and when it first passed readiness.
    pub started_at: Option<Instant>,
    pub ready_at: Option<Instant>,
    /// When the controller first saw it draining: the drain timeout counts from there.
    pub draining_since: Option<Instant>,
}

impl Replica {
    /// Whether a draining replica is done: nothing in flight, or it has drained for the
    /// whole timeout (a WebSocket or a gRPC stream may stay open for hours).
    fn drained(&self, timeout: Duration, now: Instant) -> bool {
        self.draining
            && (self.in_flight.load(Ordering::Relaxed) == 0
                || self
                    .draining_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= timeout))
    }
}

#[derive(Debug)]
pub struct Svc {
    pub spec: ServiceSpec,
    pub version: u64,
    pub replicas: HashMap<JobId, Replica>,
    /// Requests waiting for a ready replica.
    pub held: Arc<AtomicU64>,
    /// Requests that arrived since the last tick.
    pub arrived: Arc<AtomicU64>,
    pub ready_changed: Arc<Notify>,
    pub scaler: Autoscaler,
    /// Token bucket for the rate limit: (tokens, last refill).
    bucket: (f64, Instant),
    /// Replicas that ended without being asked to, since one last became ready; starts
    /// back off exponentially with it (a crash loop must not churn the pool).
    pub failures: u32,
    start_after: Option<Instant>,
    /// The rolling update in progress, if any.
    pub rollout: Option<Rollout>,
    /// What happened to the service lately, oldest first (`service show`).
    pub events: std::collections::VecDeque<(Millis, String)>,
}

/// A rolling update's progress, kept by the controller.
#[derive(Debug, Clone)]
pub struct Rollout {
    pub version: u64,
    pub started_ms: Millis,
    /// When it last moved: a new replica became ready or an old one left.
    pub progress_ms: Millis,
    /// (new replicas ready, old replicas left) when it last moved.
    progress: (usize, usize),
    /// Why it has not moved for its progress deadline.
    pub stuck: Option<String>,
    /// It was stuck with `on_stuck = "replace"`: it goes on replacing in place, one old
    /// replica at a time, until it completes.
    pub replacing: bool,
}

/// How many events a service keeps.
const EVENTS: usize = 32;

impl Svc {
    fn event(&mut self, now: Millis, msg: String) {
        if self.events.len() == EVENTS {
            self.events.pop_front();
        }
        self.events.push_back((now, msg));
    }

    /// Follows the rolling update (if one is in progress) and says when it is stuck and
    /// why. `pending` has why each replica not placed yet waits.
    fn track_rollout(&mut self, now: Millis, pending: &HashMap<JobId, String>) {
        let v = self.version;
        let new_ready = self
            .replicas
            .values()
            .filter(|r| r.version == v && r.ready && !r.draining)
            .count();
        let old_left = self
            .replicas
            .values()
            .filter(|r| (r.version != v || r.evict) && !r.stopped)
            .count();
        if old_left == 0 {
            if let Some(r) = self.rollout.take() {
                if r.version == v {
                    let secs = (now - r.started_ms) as f64 / 1000.0;
                    self.event(now, format!("rollout of v{v} complete in {secs:.1} s"));
                }
            }
            return;
        }
        if self.rollout.as_ref().is_none_or(|r| r.version != v) {
            self.event(
                now,
                format!("rollout of v{v} started: {old_left} old replicas to replace"),
            );
            self.rollout = Some(Rollout {
                version: v,
                started_ms: now,
                progress_ms: now,
                progress: (new_ready, old_left),
                stuck: None,
                replacing: false,
            });
        }
        let deadline = self.spec.progress_deadline_ms as i64;
        let why = self.stuck_because(pending);
        let on_stuck = self.spec.on_stuck;
        let r = self.rollout.as_mut().expect("set above");
        if new_ready > r.progress.0 || old_left < r.progress.1 {
            r.progress_ms = now;
        }
        r.progress = (new_ready, old_left);
        let mut say = None;
        if now - r.progress_ms >= deadline {
            let msg = format!(
                "rollout of v{v} stuck: no progress for {} s: {why}{}",
                (now - r.progress_ms) / 1000,
                match on_stuck {
                    caravel_core::OnStuck::Wait => "; waiting (on_stuck = \"wait\"; set on_stuck = \"replace\" to replace old replicas in place, raise max_unavailable, or free room)",
                    caravel_core::OnStuck::Replace => "; replacing an old replica in place (on_stuck = \"replace\")",
                }
            );
            if r.stuck.is_none() {
                say = Some(msg.clone());
            }
            r.stuck = Some(msg);
            r.replacing |= on_stuck == caravel_core::OnStuck::Replace;
        } else if r.stuck.take().is_some() {
            say = Some(format!("rollout of v{v} moving again"));
        }
        if let Some(m) = say {
            tracing::warn!(service = %self.spec.name, "{m}");
            self.event(now, m);
        }
    }

    fn stuck_because(&self, pending: &HashMap<JobId, String>) -> String {
        let v = self.version;
        let new: Vec<&Replica> = self
            .replicas
            .values()
            .filter(|r| r.version == v && !r.draining)
            .collect();
        if let Some(r) = new.iter().find(|r| r.addr.is_none()) {
            return format!(
                "new replica {} cannot be placed: {}",
                r.job,
                pending
                    .get(&r.job)
                    .map_or("not scheduled yet", |s| s.as_str())
            );
        }
        if let Some(r) = new.iter().find(|r| !r.ready) {
            return format!(
                "new replica {} is not ready: its readiness check ({}) does not pass",
                r.job, self.spec.readiness.path
            );
        }
        if self.failures > 0 {
            return format!(
                "new replicas keep ending on their own ({} in a row)",
                self.failures
            );
        }
        if new.is_empty() && self.spec.max_surge == 0 && self.spec.max_unavailable == 0 {
            return "max_surge and max_unavailable are both 0".into();
        }
        "no room for a new replica within max_surge and max_unavailable".into()
    }
}

/// Wait before starting a replica after `failures` crashes in a row: 0.5 s doubling to
/// 60 s, like Kubernetes' CrashLoopBackOff (10 s doubling to 5 min) but quicker to retry,
/// since a replica that fails once under load is more often unlucky than broken.
pub fn crash_backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(500u64.saturating_mul(1 << (failures - 1).min(7)))
        .min(Duration::from_secs(60))
}

impl Svc {
    fn in_flight(&self) -> u64 {
        self.replicas
            .values()
            .map(|r| r.in_flight.load(Ordering::Relaxed))
            .sum::<u64>()
            + self.held.load(Ordering::Relaxed)
    }

    fn admit(&mut self) -> bool {
        let Some(rps) = self.spec.rate_limit_rps else {
            return true;
        };
        let now = Instant::now();
        let rps = rps as f64;
        let (tokens, at) = self.bucket;
        let tokens = (tokens + now.duration_since(at).as_secs_f64() * rps).min(rps);
        if tokens >= 1.0 {
            self.bucket = (tokens - 1.0, now);
            true
        } else {
            self.bucket = (tokens, now);
            false
        }
    }

    /// The replica a request goes to: ready, in rotation, least requests in flight;
    /// in the caller's zone (then region) while one there is below its target
    /// concurrency, else anywhere.
    fn pick(&self, zone: &str, region: &str, avoid: Option<JobId>) -> Option<&Replica> {
        let target = self.spec.target_concurrency as u64;
        let load = |r: &Replica| r.in_flight.load(Ordering::Relaxed);
        let best = |near: &dyn Fn(&Replica) -> bool| {
            self.replicas
                .values()
                .filter(|r| r.ready && !r.draining && r.addr.is_some() && Some(r.job) != avoid)
                .filter(|r| near(r))
                .min_by_key(|r| (load(r), r.job))
        };
        let unsaturated = |r: &Replica| load(r) < target;
        (!zone.is_empty())
            .then(|| best(&|r| r.zone == zone && unsaturated(r)))
            .flatten()
            .or_else(|| {
                (!region.is_empty())
                    .then(|| best(&|r| r.region == region && unsaturated(r)))
                    .flatten()
            })
            .or_else(|| best(&|_| true))
    }
}

pub struct Gateway {
    pub upstream: Upstream,
    /// HTTP/2 with prior knowledge, for `h2c` and `grpc` services: one connection per
    /// replica carries every request as a stream.
    pub upstream_h2: Upstream,
    pub services: Mutex<HashMap<Key, Svc>>,
    /// Replica jobs with a prober running.
    probing: Mutex<HashSet<JobId>>,
    /// (tenant name, service name) -> (tenant, public, cold start timeout), refreshed by
    /// the controller.
    pub routes: Mutex<HashMap<(String, String), Route>>,
    /// The gateway's own zone and region: the default preference for callers that name
    /// none.
    pub zone: String,
    pub region: String,
}

impl Gateway {
    /// Forgets a deleted service at once (the controller would on its next tick).
    pub fn forget(&self, tenant_name: &str, key: &Key) {
        self.routes
            .lock()
            .expect("gateway lock")
            .remove(&(tenant_name.to_string(), key.1.clone()));
        if let Some(svc) = self.services.lock().expect("gateway lock").get_mut(key) {
            for r in svc.replicas.values_mut() {
                r.draining = true;
                r.stopped = true;
            }
        }
    }

    pub fn new(zone: &str, region: &str) -> Gateway {
        Gateway {
            upstream: upstream_client(false),
            upstream_h2: upstream_client(true),
            services: Default::default(),
            probing: Default::default(),
            routes: Default::default(),
            zone: zone.to_string(),
            region: region.to_string(),
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) are not forwarded; nor is `host` (the upstream
/// URI sets it).
fn hop_by_hop(h: &HeaderName) -> bool {
    matches!(
        h.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
    )
}

/// The `X-Forwarded-*` headers the gateway sets itself; a caller's own are not passed on
/// as they are (`X-Forwarded-For` is extended, the others replaced).
fn forwarded(h: &HeaderName) -> bool {
    matches!(
        h.as_str(),
        "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host"
    )
}

/// What a replica behind the gateway needs to know about the original request, as nginx's
/// `proxy_add_x_forwarded_for` and Envoy set it: the caller's address appended to any
/// `X-Forwarded-For` it sent, the scheme it used (`https` when the server terminates TLS)
/// and the host it asked for (for absolute links and redirects).
fn forwarded_headers(
    parts: &axum::http::request::Parts,
    scheme: &'static str,
) -> Vec<(&'static str, axum::http::HeaderValue)> {
    let mut out = vec![(
        "x-forwarded-proto",
        axum::http::HeaderValue::from_static(scheme),
    )];
    let peer = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let earlier: Vec<&str> = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let chain = earlier
        .into_iter()
        .map(str::to_string)
        .chain(peer)
        .collect::<Vec<_>>()
        .join(", ");
    if let Ok(v) = axum::http::HeaderValue::from_str(&chain) {
        if !chain.is_empty() {
            out.push(("x-forwarded-for", v));
        }
    }
    let host = parts
        .headers
        .get(axum::http::header::HOST)
        .cloned()
        .or_else(|| {
            let a = parts.uri.authority()?;
            axum::http::HeaderValue::from_str(a.as_str()).ok()
        });
    if let Some(h) = host {
        out.push(("x-forwarded-host", h));
    }
    out
}

trait RetainEndToEnd {
    fn retain_hop_by_hop(&mut self);
}

impl RetainEndToEnd for HeaderMap {
    /// Drops the hop-by-hop headers of an upstream response.
    fn retain_hop_by_hop(&mut self) {
        let drop: Vec<HeaderName> = self.keys().filter(|k| hop_by_hop(k)).cloned().collect();
        for k in drop {
            self.remove(&k);
        }
    }
}

/// The gateway's client to replicas: hyper's pooled client, no overall timeout
/// (responses may stream as long as they like), a short connect timeout so a dead replica
/// is retried elsewhere quickly.
pub type Upstream =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Lent>;

fn upstream_client(http2: bool) -> Upstream {
    let mut c = hyper_util::client::legacy::connect::HttpConnector::new();
    c.set_connect_timeout(Some(Duration::from_secs(2)));
    c.set_nodelay(true);
    let mut b = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
    b.pool_idle_timeout(Duration::from_secs(30));
    if http2 {
        // Pings find a replica that vanished without closing its connection, which
        // otherwise holds every stream multiplexed on it until the OS gives up.
        b.http2_only(true)
            .timer(hyper_util::rt::TokioTimer::new())
            .http2_keep_alive_interval(Duration::from_secs(10))
            .http2_keep_alive_timeout(Duration::from_secs(5))
            .http2_keep_alive_while_idle(false);
    }
    b.build(c)
}

/// A request body lent to the upstream client: taken out of `slot` on its first poll.
/// When a replica refuses the connection, the client never polled it, so the gateway
/// takes it back and sends it to another replica: retries need no buffering, and bodies
/// of any size (and gRPC client streams) go straight through.
pub struct Lent {
    slot: Arc<Mutex<Option<Body>>>,
    taken: Option<Body>,
    /// The body's own answers, kept so that hyper can ask them before it is taken.
    end: bool,
    hint: http_body::SizeHint,
}

impl Lent {
    fn new(body: Body) -> (Lent, Arc<Mutex<Option<Body>>>) {
        let end = http_body::Body::is_end_stream(&body);
        let hint = http_body::Body::size_hint(&body);
        let slot = Arc::new(Mutex::new(Some(body)));
        (
            Lent {
                slot: slot.clone(),
                taken: None,
                end,
                hint,
            },
            slot,
        )
    }
}

impl http_body::Body for Lent {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let me = self.get_mut();
        if me.taken.is_none() {
            match me.slot.lock().expect("body slot").take() {
                Some(b) => me.taken = Some(b),
                None => return std::task::Poll::Ready(None),
            }
        }
        let body = me.taken.as_mut().expect("taken above");
        std::pin::Pin::new(body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        match &self.taken {
            Some(b) => b.is_end_stream(),
            None => self.end,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.taken {
            Some(b) => b.size_hint(),
            None => self.hint,
        }
    }
}

/// A replica's response body, holding the replica's in-flight count until it is dropped.
/// For a gRPC service it also notes the `grpc-status` of the trailers, the only place a
/// gRPC call's outcome shows (the HTTP status is 200 whatever happened).
struct Guarded {
    inner: hyper::body::Incoming,
    guard: InFlight,
    grpc: bool,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let me = self.get_mut();
        let polled = std::pin::Pin::new(&mut me.inner).poll_frame(cx);
        if me.grpc {
            if let std::task::Poll::Ready(Some(Ok(f))) = &polled {
                if let Some(v) = f.trailers_ref().and_then(|t| t.get("grpc-status")) {
                    me.guard.grpc_status = v.to_str().ok().map(str::to_string);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn err(code: ErrorCode, msg: impl Into<String>) -> Response {
    ApiError::new(code, msg).into_response()
}

/// Decrements a replica's (or the held) count when the response — body included — is done.
struct InFlight {
    n: Arc<AtomicU64>,
    /// Called with the gRPC status seen, if any.
    done: Option<Box<dyn FnOnce(Option<String>) + Send>>,
    grpc_status: Option<String>,
}

impl InFlight {
    fn new(n: Arc<AtomicU64>) -> InFlight {
        InFlight {
            n,
            done: None,
            grpc_status: None,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.n.fetch_sub(1, Ordering::Relaxed);
        if let Some(f) = self.done.take() {
            f(self.grpc_status.take());
        }
    }
}

#[utoipa::path(method(get, post, put, delete, patch, head, options), path = "/s/{tenant}/{service}", summary = "the gateway: any method, proxied to a ready replica of the service; a private service answers only its tenant's token, and exactly as a missing one to anyone else", security(()), params(("tenant" = String, Path), ("service" = String, Path)), responses((status = 200, description = "the replica's answer, whatever its status")))]
pub async fn route_root(
    State(s): State<Arc<Shared>>,
    Path((tenant, service)): Path<(String, String)>,
    req: Request,
) -> Response {
    proxy(s, tenant, service, String::new(), true, req).await
}

#[utoipa::path(method(get, post, put, delete, patch, head, options), path = "/s/{tenant}/{service}/", summary = "the gateway: the service's root (as `/s/{tenant}/{service}`)", security(()), params(("tenant" = String, Path), ("service" = String, Path)), responses((status = 200, description = "the replica's answer, whatever its status")))]
pub async fn route_root_slash(
    state: State<Arc<Shared>>,
    path: Path<(String, String)>,
    req: Request,
) -> Response {
    route_root(state, path, req).await
}

#[utoipa::path(method(get, post, put, delete, patch, head, options), path = "/s/{tenant}/{service}/{*rest}", summary = "the gateway, a path under the service (as `/s/{tenant}/{service}`)", security(()), params(("tenant" = String, Path), ("service" = String, Path), ("rest" = String, Path, description = "the path the replica sees")), responses((status = 200, description = "the replica's answer, whatever its status")))]
pub async fn route(
    State(s): State<Arc<Shared>>,
    Path((tenant, service, _)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    // The rest of the path as the caller wrote it: the extracted one is percent-decoded,
    // and `%2F` or `%20` must reach the replica as sent.
    let rest = req
        .uri()
        .path()
        .splitn(5, '/')
        .nth(4)
        .unwrap_or_default()
        .to_string();
    proxy(s, tenant, service, rest, true, req).await
}

/// The service a `Host` names under one of the gateway's domains: `SERVICE.DOMAIN` (tenant
/// `default`) or `SERVICE--TENANT.DOMAIN`, one DNS label either way, so that one wildcard
/// certificate (`*.DOMAIN`) covers every service. The port and a trailing dot are
/// ignored; DNS names are caseless, so the host is read in lower case.
pub fn service_for_host(host: &str, domains: &[String]) -> Option<(String, String)> {
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    for d in domains {
        let Some(label) = host
            .strip_suffix(d.as_str())
            .and_then(|h| h.strip_suffix('.'))
        else {
            continue;
        };
        if label.is_empty() || label.contains('.') {
            continue;
        }
        return Some(match label.rsplit_once("--") {
            Some((svc, tenant)) if !svc.is_empty() && !tenant.is_empty() => {
                (tenant.to_string(), svc.to_string())
            }
            _ => ("default".to_string(), label.to_string()),
        });
    }
    None
}

/// The host name a service is reached at under `domain`, when its names fit one DNS label
/// that [`service_for_host`] reads back as the same service (lower-case letters, digits
/// and inner `-`; no `.` or `_`).
pub fn host_for_service(tenant: &str, service: &str, domain: &str) -> Option<String> {
    let label = if tenant == "default" && !service.contains("--") {
        service.to_string()
    } else {
        format!("{service}--{tenant}")
    };
    let fits = !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-');
    let host = format!("{label}.{domain}");
    let back = service_for_host(&host, &[domain.to_string()]);
    (fits && back == Some((tenant.to_string(), service.to_string()))).then_some(host)
}

/// Routes a request that names its service in `X-Caravel-Service: {tenant}/{service}`,
/// or by its host name under a gateway domain (`--gateway-domain`), path and all, ahead of
/// the API's own routes.
pub async fn route_by_header(
    State(s): State<Arc<Shared>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(v) = req.headers().get(SERVICE_HEADER) else {
        let host = req
            .uri()
            .host()
            .or_else(|| req.headers().get(axum::http::header::HOST)?.to_str().ok());
        if let Some((tenant, service)) =
            host.and_then(|h| service_for_host(h, &s.cfg.gateway_domains))
        {
            let rest = req.uri().path().trim_start_matches('/').to_string();
            return proxy(s, tenant, service, rest, false, req).await;
        }
        return next.run(req).await;
    };
    let named = v
        .to_str()
        .ok()
        .and_then(|v| v.split_once('/'))
        .filter(|(t, n)| !t.is_empty() && !n.is_empty() && !n.contains('/'))
        .map(|(t, n)| (t.to_string(), n.to_string()));
    let Some((tenant, service)) = named else {
        let e = err(
            ErrorCode::InvalidArgument,
            format!("header {SERVICE_HEADER}: must be TENANT/SERVICE, such as default/tinylm"),
        );
        return if is_grpc(req.headers()) {
            as_grpc(e)
        } else {
            e
        };
    };
    let rest = req.uri().path().trim_start_matches('/').to_string();
    proxy(s, tenant, service, rest, false, req).await
}

async fn proxy(
    s: Arc<Shared>,
    tenant: String,
    service: String,
    rest: String,
    via_path: bool,
    req: Request,
) -> Response {
    let t0 = Instant::now();
    // Only services that exist get a label of their own: what strangers send must not grow
    // the metrics' cardinality.
    let label = if s
        .gateway
        .routes
        .lock()
        .expect("gateway lock")
        .contains_key(&(tenant.clone(), service.clone()))
    {
        format!("{tenant}/{service}")
    } else {
        "(none)".to_string()
    };
    let grpc = is_grpc(req.headers());
    let resp = proxy_inner(&s, &tenant, &service, &rest, via_path, req, t0, &label).await;
    if resp.extensions().get::<Proxied>().is_none() {
        // Refused before a replica was involved: counted here; proxied responses are
        // counted when their body ends.
        let seen = resp
            .extensions()
            .get::<ApiError>()
            .filter(|_| grpc)
            .map(|e| grpc_code(e.code).to_string());
        record(&s, &label, resp.status(), seen.as_deref(), t0);
        if grpc {
            return as_grpc(resp);
        }
    }
    resp
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The gRPC status for a gateway error: what a gRPC client can act on (it reads HTTP
/// statuses only as a fallback, and then only a few).
fn grpc_code(c: ErrorCode) -> u16 {
    match c {
        ErrorCode::InvalidArgument | ErrorCode::MalformedRequest => 3,
        ErrorCode::NotFound => 5,
        ErrorCode::PermissionDenied => 7,
        ErrorCode::RateLimited
        | ErrorCode::ExceedsQuota
        | ErrorCode::Unschedulable
        | ErrorCode::TooLarge => 8,
        ErrorCode::Conflict => 9,
        ErrorCode::Internal => 13,
        ErrorCode::MethodNotAllowed => 12,
        ErrorCode::Unavailable | ErrorCode::UpstreamFailed => 14,
        ErrorCode::UpstreamTimeout => 4,
        ErrorCode::Unauthenticated => 16,
    }
}

/// A gateway error as a gRPC "trailers-only" answer: HTTP 200, `grpc-status` and a
/// percent-encoded `grpc-message`, and the stable Caravel code in `caravel-error-code`.
fn as_grpc(resp: Response) -> Response {
    let Some(e) = resp.extensions().get::<ApiError>().cloned() else {
        return resp;
    };
    let mut msg = String::with_capacity(e.message.len());
    for b in e.message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            msg.push(b as char);
        } else {
            msg.push_str(&format!("%{b:02X}"));
        }
    }
    let code = e.code.as_str();
    let mut out = Response::new(Body::empty());
    let h = out.headers_mut();
    h.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", grpc_code(e.code).into());
    if let Ok(v) = axum::http::HeaderValue::from_str(&msg) {
        h.insert("grpc-message", v);
    }
    h.insert(
        "caravel-error-code",
        axum::http::HeaderValue::from_static(code),
    );
    out
}

/// The one answer for a service that does not exist and for a private one the caller may
/// not use.
fn not_found(tenant: &str, service: &str) -> String {
    format!("service {tenant}/{service} not found (a private service answers only its own tenant's token)")
}

#[derive(Clone)]
struct Proxied;

fn record(s: &Shared, label: &str, status: StatusCode, grpc: Option<&str>, t0: Instant) {
    let mut labels = vec![
        ("service".to_string(), label.to_string()),
        ("code".to_string(), status.as_u16().to_string()),
    ];
    if let Some(g) = grpc {
        labels.push(("grpc_status".to_string(), g.to_string()));
    }
    s.metrics.service_requests.get_or_create(&labels).inc();
    s.metrics
        .service_latency
        .get_or_create(&vec![("service".to_string(), label.to_string())])
        .observe(t0.elapsed().as_secs_f64());
}

/// Whether a request asks to switch protocols (`Connection: upgrade` and an `Upgrade`
/// header, HTTP/1.1 only): WebSocket and the like, tunnelled once the replica agrees.
fn wants_upgrade(parts: &axum::http::request::Parts) -> bool {
    parts.version == axum::http::Version::HTTP_11
        && parts.headers.contains_key(axum::http::header::UPGRADE)
        && parts
            .headers
            .get_all(axum::http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

#[allow(clippy::too_many_arguments)]
async fn proxy_inner(
    s: &Arc<Shared>,
    tenant: &str,
    service: &str,
    rest: &str,
    via_path: bool,
    req: Request,
    t0: Instant,
    label: &str,
) -> Response {
    let (mut parts, body) = req.into_parts();
    // The routing table the controller refreshes every tick, so the hot path never waits
    // on the control plane's lock; a service deployed since the last tick is looked up
    // there.
    let cached = s
        .gateway
        .routes
        .lock()
        .expect("gateway lock")
        .get(&(tenant.to_string(), service.to_string()))
        .cloned();
    let route = if let Some(r) = cached {
        r
    } else {
        let core = s.core.lock().expect("core lock");
        let Some(tid) = core.tenant_id(tenant) else {
            return err(ErrorCode::NotFound, not_found(tenant, service));
        };
        match core.services.get(&(tid, service.to_string())) {
            Some(r) => Route::of(tid, &r.spec),
            None => return err(ErrorCode::NotFound, not_found(tenant, service)),
        }
    };
    let (tid, cold_ms, protocol) = (route.tenant, route.cold_ms, route.protocol);
    if !route.public {
        match authenticate(s, &parts.headers) {
            Ok(Principal::Admin) => {}
            Ok(Principal::Tenant(t)) if t == tid => {}
            // Another tenant, or a caller without a (valid) token, learns nothing about
            // what exists: the same answer as for a service that does not.
            Ok(_) | Err(_) => return err(ErrorCode::NotFound, not_found(tenant, service)),
        }
    }
    let key = (tid, service.to_string());
    // Tunnelled only to HTTP/1.1 replicas: an HTTP/2 one would need extended CONNECT.
    let upgrade = (wants_upgrade(&parts) && !protocol.is_http2())
        .then(|| parts.extensions.remove::<hyper::upgrade::OnUpgrade>())
        .flatten();
    let mut body = Some(body);
    let header = |n: &str| {
        parts
            .headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let zone = header("x-caravel-zone").unwrap_or_else(|| s.gateway.zone.clone());
    let region = header("x-caravel-region").unwrap_or_else(|| s.gateway.region.clone());
    let mut avoid = None;
    let mut tries = 0;
    loop {
        tries += 1;
        // Pick a replica, holding the request while none is ready (scale from zero).
        let mut held_guard: Option<InFlight> = None;
        let (addr, job, n) = loop {
            let step = pick_step(
                s,
                &key,
                &zone,
                &region,
                avoid,
                tries == 1 && held_guard.is_none(),
                &mut held_guard,
            );
            match step {
                Step::Go(addr, job, n) => break (addr, job, n),
                Step::Refuse(code, msg) => return err(code, msg),
                Step::Wait(notify) => {
                    if notify.is_none()
                        && !s
                            .core
                            .lock()
                            .expect("core lock")
                            .services
                            .contains_key(&key)
                    {
                        return err(ErrorCode::NotFound, not_found(tenant, service));
                    }
                    let left = (t0 + Duration::from_millis(cold_ms))
                        .saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return err(
                            ErrorCode::Unavailable,
                            format!(
                                "service {tenant}/{service} has no ready replica after {:.1} s",
                                cold_ms as f64 / 1000.0
                            ),
                        );
                    }
                    // Bounded wait, then look again (a notification may race the lock).
                    let nap = left.min(Duration::from_millis(50));
                    match notify {
                        Some(n) => {
                            let _ = tokio::time::timeout(nap, n.notified()).await;
                        }
                        None => tokio::time::sleep(nap.min(Duration::from_millis(20))).await,
                    }
                }
            }
        };
        drop(held_guard);
        let guard = InFlight::new(n);
        let query = parts
            .uri
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let uri = format!("http://{addr}/{rest}{query}");
        let mut rb = hyper::Request::builder()
            .method(parts.method.clone())
            .uri(uri);
        for (k, v) in parts.headers.iter() {
            if !hop_by_hop(k) && k != "authorization" && k != SERVICE_HEADER && !forwarded(k) {
                rb = rb.header(k, v);
            }
        }
        for (k, v) in forwarded_headers(&parts, s.cfg.scheme()) {
            rb = rb.header(k, v);
        }
        if via_path {
            rb = rb.header("x-forwarded-prefix", format!("/s/{tenant}/{service}"));
        }
        if upgrade.is_some() {
            if let Some(u) = parts.headers.get(axum::http::header::UPGRADE) {
                rb = rb.header("connection", "upgrade").header("upgrade", u);
            }
        }
        // gRPC needs `te: trailers` end to end (the one TE value HTTP/2 allows).
        if protocol.is_http2()
            && parts
                .headers
                .get("te")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.split(',').any(|t| t.trim() == "trailers"))
        {
            rb = rb.header("te", "trailers");
        }
        let (lent, slot) = Lent::new(body.take().unwrap_or_default());
        let up_req = match rb.body(lent) {
            Ok(r) => r,
            Err(e) => {
                drop(guard);
                return err(ErrorCode::InvalidArgument, format!("cannot forward: {e}"));
            }
        };
        let client = if protocol.is_http2() {
            &s.gateway.upstream_h2
        } else {
            &s.gateway.upstream
        };
        let wait = Duration::from_millis(route.response_ms);
        let Ok(sent) = tokio::time::timeout(wait, client.request(up_req)).await else {
            // The replica has the request: not retried. Dropping the call closes the
            // connection, which is how the replica learns to stop.
            drop(guard);
            return err(
                ErrorCode::UpstreamTimeout,
                format!(
                    "replica of {tenant}/{service} sent no response within {:.1} s (response_timeout)",
                    wait.as_secs_f64()
                ),
            );
        };
        match sent {
            Ok(mut up) => {
                let up_upgrade = (up.status() == StatusCode::SWITCHING_PROTOCOLS)
                    .then(|| hyper::upgrade::on(&mut up));
                let (head, incoming) = up.into_parts();
                let status = head.status;
                let mut headers = head.headers;
                let s2 = s.clone();
                let label = label.to_string();
                let mut guard = guard;
                let grpc = protocol == Protocol::Grpc;
                // A trailers-only answer (an error, or an empty stream) has its status in
                // the headers; otherwise the trailers bring it.
                if grpc {
                    guard.grpc_status = headers
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                }
                guard.done = Some(Box::new(move |g: Option<String>| {
                    record(&s2, &label, status, g.as_deref(), t0)
                }));
                if let (Some(theirs), Some(ours)) = (up_upgrade, upgrade) {
                    // Both sides switch: copy bytes both ways until either closes; the
                    // tunnel counts as a request in flight until then.
                    tokio::spawn(async move {
                        let _guard = guard;
                        if let (Ok(a), Ok(b)) = (ours.await, theirs.await) {
                            let mut a = hyper_util::rt::TokioIo::new(a);
                            let mut b = hyper_util::rt::TokioIo::new(b);
                            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                        }
                    });
                    let mut resp = Response::new(Body::empty());
                    *resp.status_mut() = status;
                    headers.remove(axum::http::header::TRANSFER_ENCODING);
                    *resp.headers_mut() = headers;
                    resp.extensions_mut().insert(Proxied);
                    return resp;
                }
                headers.retain_hop_by_hop();
                // Streams straight through; the replica's request counts until the body
                // has been sent or the client went away (the guard drops with the body).
                let mut resp = Response::new(Body::new(Guarded {
                    inner: incoming,
                    guard,
                    grpc,
                }));
                *resp.status_mut() = status;
                *resp.headers_mut() = headers;
                resp.extensions_mut().insert(Proxied);
                return resp;
            }
            Err(e) => {
                drop(guard);
                // The body comes back only if the client never started sending it.
                body = slot.lock().expect("body slot").take();
                // Refused: nothing reached the replica, so an idempotent request is retried
                // once on another one. A connection that failed after the request was sent
                // is not retried: the request may be what killed the replica, and a retry
                // would take the next one down too (a test saw exactly that). A pooled
                // connection found closed before sending is retried inside hyper's client.
                let idempotent = matches!(
                    parts.method,
                    Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
                );
                if e.is_connect() {
                    mark_unready(s, &key, job);
                }
                if e.is_connect() && idempotent && tries < 2 && body.is_some() {
                    s.metrics
                        .service_retries
                        .get_or_create(&vec![("service".to_string(), label.to_string())])
                        .inc();
                    avoid = Some(job);
                    continue;
                }
                return err(
                    ErrorCode::UpstreamFailed,
                    format!("replica of {tenant}/{service} failed: {e}"),
                );
            }
        }
    }
}

enum Step {
    Go(String, JobId, Arc<AtomicU64>),
    Refuse(ErrorCode, String),
    /// No ready replica (or no routing state yet, `None`): wait and look again.
    Wait(Option<Arc<Notify>>),
}

/// One look for a replica, under the gateway lock (never held across an await).
fn pick_step(
    s: &Shared,
    key: &Key,
    zone: &str,
    region: &str,
    avoid: Option<JobId>,
    first: bool,
    held: &mut Option<InFlight>,
) -> Step {
    let mut svcs = s.gateway.services.lock().expect("gateway lock");
    // Deployed a moment ago: the controller's next tick (100 ms) sets up its routing state.
    let Some(svc) = svcs.get_mut(key) else {
        return Step::Wait(None);
    };
    if first {
        svc.arrived.fetch_add(1, Ordering::Relaxed);
        if !svc.admit() {
            return Step::Refuse(
                ErrorCode::RateLimited,
                format!(
                    "service {}/{} admits {} requests per second",
                    key.0,
                    key.1,
                    svc.spec.rate_limit_rps.unwrap_or(0)
                ),
            );
        }
    }
    if let Some(r) = svc.pick(zone, region, avoid) {
        r.in_flight.fetch_add(1, Ordering::Relaxed);
        return Step::Go(
            r.addr.clone().expect("picked replicas have an address"),
            r.job,
            r.in_flight.clone(),
        );
    }
    if held.is_none() {
        svc.held.fetch_add(1, Ordering::Relaxed);
        *held = Some(InFlight::new(svc.held.clone()));
    }
    Step::Wait(Some(svc.ready_changed.clone()))
}

fn mark_unready(s: &Shared, key: &Key, job: JobId) {
    if let Some(svc) = s
        .gateway
        .services
        .lock()
        .expect("gateway lock")
        .get_mut(key)
    {
        if let Some(r) = svc.replicas.get_mut(&job) {
            r.ready = false;
        }
    }
}

/// One probe of a replica within the probe's timeout: an HTTP GET on its path (any 2xx
/// passes), over HTTP/2 for `h2c` and `grpc` services, or a gRPC health check.
async fn probe(s: &Shared, addr: &str, p: &Probe, protocol: Protocol) -> bool {
    let check = async {
        if let Some(name) = p.grpc_check(protocol) {
            return grpc_health(&s.gateway.upstream_h2, addr, name).await;
        }
        let url = format!("http://{addr}{}", p.path);
        if protocol.is_http2() {
            let Ok(req) = hyper::Request::get(url).body(Lent::new(Body::empty()).0) else {
                return false;
            };
            return match s.gateway.upstream_h2.request(req).await {
                Ok(r) => r.status().is_success(),
                Err(_) => false,
            };
        }
        matches!(s.proxy.get(&url).send().await, Ok(r) if r.status().is_success())
    };
    tokio::time::timeout(Duration::from_millis(p.timeout_ms), check)
        .await
        .unwrap_or(false)
}

/// `grpc.health.v1.Health/Check` (the gRPC health checking protocol): passes when the
/// replica answers OK with status SERVING. Four bytes of protobuf each way do not need a
/// code generator.
async fn grpc_health(c: &Upstream, addr: &str, service: &str) -> bool {
    use http_body_util::BodyExt;
    let req = hyper::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Lent::new(Body::from(grpc_health_request(service))).0);
    let Ok(req) = req else { return false };
    let Ok(resp) = c.request(req).await else {
        return false;
    };
    if resp.status() != StatusCode::OK {
        return false;
    }
    // A trailers-only answer (an error) carries grpc-status in the headers.
    let in_head = resp.headers().get("grpc-status").cloned();
    let Ok(got) = resp.into_body().collect().await else {
        return false;
    };
    let status = got
        .trailers()
        .and_then(|t| t.get("grpc-status").cloned())
        .or(in_head);
    status.is_some_and(|v| v == "0") && grpc_health_serving(&got.to_bytes())
}

/// A length-prefixed `HealthCheckRequest { service }`.
fn grpc_health_request(service: &str) -> Vec<u8> {
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a); // field 1, length-delimited
        let mut n = service.len();
        while n >= 0x80 {
            msg.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8]; // not compressed
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    frame
}

/// Whether a length-prefixed `HealthCheckResponse` says SERVING (field 1 = 1).
fn grpc_health_serving(frame: &[u8]) -> bool {
    fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*i)?;
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }
    if frame.len() < 5 || frame[0] != 0 {
        return false; // compressed answers are not asked for
    }
    let len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
    let Some(msg) = frame.get(5..5 + len) else {
        return false;
    };
    let (mut i, mut status) = (0, 0);
    while i < msg.len() {
        let Some(key) = varint(msg, &mut i) else {
            return false;
        };
        match key & 7 {
            0 => {
                let Some(v) = varint(msg, &mut i) else {
                    return false;
                };
                if key >> 3 == 1 {
                    status = v;
                }
            }
            2 => {
                let Some(n) = varint(msg, &mut i) else {
                    return false;
                };
                i = i.saturating_add(n as usize);
            }
            _ => return false,
        }
    }
    i == msg.len() && status == 1
}

/// Probes one replica until it is gone: fast (every 50 ms) until it first passes, then at
/// the readiness period.
async fn prober(s: Arc<Shared>, key: Key, job: JobId) {
    let mut fails = 0u32;
    let mut live_fails = 0u32;
    let mut ever_ready = false;
    let mut last_live = Instant::now();
    loop {
        let (addr, spec, ready) = {
            let svcs = s.gateway.services.lock().expect("gateway lock");
            let Some(r) = svcs
                .get(&key)
                .and_then(|v| v.replicas.get(&job).map(|r| (r, v)))
            else {
                break;
            };
            let (r, v) = r;
            if r.stopped {
                break;
            }
            (r.addr.clone(), v.spec.clone(), r.ready)
        };
        let Some(addr) = addr else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let ok = probe(&s, &addr, &spec.readiness, spec.protocol).await;
        fails = if ok { 0 } else { fails + 1 };
        let mut restart = false;
        // Liveness counts only once the replica has been ready: a process still starting
        // (not yet listening) is not dead (what a Kubernetes startup probe is for).
        let was_ready = ready || ok || ever_ready;
        ever_ready = was_ready;
        if let (Some(l), true) = (&spec.liveness, was_ready) {
            if last_live.elapsed() >= Duration::from_millis(l.period_ms) {
                last_live = Instant::now();
                let alive = probe(&s, &addr, l, spec.protocol).await;
                live_fails = if alive { 0 } else { live_fails + 1 };
                restart = live_fails >= l.failure_threshold;
            }
        }
        {
            let mut svcs = s.gateway.services.lock().expect("gateway lock");
            let Some(svc) = svcs.get_mut(&key) else { break };
            let notify = svc.ready_changed.clone();
            let Some(r) = svc.replicas.get_mut(&job) else {
                break;
            };
            if ok && !r.ready {
                r.ready = true;
                if r.ready_at.is_none() {
                    r.ready_at = Some(Instant::now());
                }
                notify.notify_waiters();
                svc.failures = 0;
                svc.start_after = None;
            } else if !ok && r.ready && fails >= spec.readiness.failure_threshold {
                r.ready = false;
            }
            if restart {
                // Out of rotation now; the controller stops it and starts another, backing
                // off as for a crash if it keeps happening.
                r.ready = false;
                r.draining = true;
                svc.failures += 1;
                svc.start_after = Some(Instant::now() + crash_backoff(svc.failures));
                tracing::warn!(job = %job, "replica failed its liveness probe; restarting it");
            }
        }
        let period = if ready || ok {
            spec.readiness.period_ms
        } else {
            50
        };
        tokio::time::sleep(Duration::from_millis(period)).await;
    }
    s.gateway.probing.lock().expect("gateway lock").remove(&job);
}

/// One controller pass over every service.
pub fn reconcile(s: &Arc<Shared>, now: Millis) {
    let mut to_stop: Vec<JobId> = Vec::new();
    let mut to_start: Vec<(Key, u32)> = Vec::new();
    let mut probes: Vec<(Key, JobId)> = Vec::new();
    let snapshot: Vec<(Key, caravel_core::ServiceRecord, Vec<ReplicaInfo>)> = {
        let mut core = s.core.lock().expect("core lock");
        let keys: Vec<Key> = core.services.keys().cloned().collect();
        let routes = keys
            .iter()
            .map(|k| {
                let spec = &core.services[k].spec;
                ((core.tenant_name(k.0), k.1.clone()), Route::of(k.0, spec))
            })
            .collect();
        *s.gateway.routes.lock().expect("gateway lock") = routes;
        keys.into_iter()
            .map(|k| {
                let rec = core.services[&k].clone();
                let reps = core.replicas(k.0, &k.1);
                (k, rec, reps)
            })
            .collect()
    };
    {
        let mut svcs = s.gateway.services.lock().expect("gateway lock");
        let live: HashSet<&Key> = snapshot.iter().map(|x| &x.0).collect();
        svcs.retain(|k, _| live.contains(k));
        for (key, rec, reps) in &snapshot {
            let svc = svcs.entry(key.clone()).or_insert_with(|| Svc {
                spec: rec.spec.redacted(),
                version: rec.version,
                replicas: HashMap::new(),
                held: Arc::new(AtomicU64::new(0)),
                arrived: Arc::new(AtomicU64::new(0)),
                ready_changed: Arc::new(Notify::new()),
                scaler: Autoscaler::new(reps.iter().filter(|r| !r.stopping).count() as u32, now),
                bucket: (rec.spec.rate_limit_rps.unwrap_or(0) as f64, Instant::now()),
                failures: 0,
                start_after: None,
                rollout: None,
                events: Default::default(),
            });
            svc.spec = rec.spec.clone();
            svc.version = rec.version;
            // Sync the replica set with the control plane's.
            let ids: HashSet<JobId> = reps.iter().map(|r| r.job).collect();
            let crashed = svc
                .replicas
                .values()
                .filter(|r| !ids.contains(&r.job) && !r.stopped)
                .count() as u32;
            if crashed > 0 {
                svc.failures += crashed;
                svc.start_after = Some(Instant::now() + crash_backoff(svc.failures));
                tracing::warn!(service = %key.1, failures = svc.failures, "a replica ended on its own");
            }
            svc.replicas.retain(|j, _| ids.contains(j));
            for r in reps {
                let e = svc.replicas.entry(r.job).or_insert_with(|| Replica {
                    job: r.job,
                    version: r.version,
                    addr: None,
                    zone: String::new(),
                    region: String::new(),
                    ready: false,
                    draining: false,
                    stopped: false,
                    evict: false,
                    in_flight: Arc::new(AtomicU64::new(0)),
                    started_at: None,
                    ready_at: None,
                    draining_since: None,
                });
                if e.addr != r.addr {
                    e.addr = r.addr.clone();
                    e.ready = false;
                    if e.addr.is_some() {
                        e.started_at = Some(Instant::now());
                    }
                }
                e.zone = r.zone.clone();
                e.region = r.region.clone();
                e.evict = r.evict;
                if r.stopping {
                    e.draining = true;
                    e.stopped = true;
                    e.ready = false;
                }
                if e.addr.is_some() && !e.stopped {
                    probes.push((key.clone(), r.job));
                }
            }
            // Autoscale.
            let arrived = svc.arrived.swap(0, Ordering::Relaxed) > 0;
            let load = svc.in_flight();
            let before = svc.scaler.replicas;
            let wanted = svc.scaler.tick(&rec.spec, now, load, arrived);
            if wanted > before {
                tracing::info!(service = %key.1, from = before, to = wanted, in_flight = load, "scaling up");
            } else if wanted < before {
                tracing::info!(service = %key.1, from = before, to = wanted, "scaling down");
            }
            let label = format!("{}/{}", key.0, key.1);
            let gauge = |state: &str, v: i64| {
                s.metrics
                    .service_replicas
                    .get_or_create(&vec![
                        ("service".to_string(), label.clone()),
                        ("state".to_string(), state.to_string()),
                    ])
                    .set(v)
            };
            gauge("wanted", wanted as i64);
            gauge(
                "ready",
                svc.replicas
                    .values()
                    .filter(|r| r.ready && !r.draining)
                    .count() as i64,
            );
            let pending: HashMap<JobId, String> = reps
                .iter()
                .filter_map(|r| Some((r.job, r.pending.clone()?)))
                .collect();
            svc.track_rollout(now, &pending);
            if wanted != before {
                svc.event(now, format!("scaled from {before} to {wanted} replicas"));
            }
            if crashed > 0 {
                svc.event(
                    now,
                    format!(
                        "{crashed} replica(s) ended on their own ({} in a row)",
                        svc.failures
                    ),
                );
            }
            let (start, stop) = plan(svc, wanted);
            for j in stop {
                if let Some(r) = svc.replicas.get_mut(&j) {
                    r.draining = true;
                }
            }
            if start > 0 && svc.start_after.is_none_or(|t| Instant::now() >= t) {
                to_start.push((key.clone(), start));
            }
            // Drained replicas stop now: nothing in flight, or out of time.
            let (timeout, at) = (
                Duration::from_millis(svc.spec.drain_timeout_ms),
                Instant::now(),
            );
            for r in svc.replicas.values_mut() {
                if r.draining && r.draining_since.is_none() {
                    r.draining_since = Some(at);
                }
                if !r.stopped && r.drained(timeout, at) {
                    let left = r.in_flight.load(Ordering::Relaxed);
                    if left > 0 {
                        tracing::warn!(job = %r.job, in_flight = left, "replica drained for its whole drain timeout; stopping it with requests in flight");
                    }
                    r.stopped = true;
                    to_stop.push(r.job);
                }
            }
        }
    }
    if !to_start.is_empty() || !to_stop.is_empty() {
        let mut core = s.core.lock().expect("core lock");
        for (key, n) in to_start {
            for _ in 0..n {
                if let Err(e) = core.add_replica(key.0, &key.1, now) {
                    tracing::warn!(service = %key.1, error = %e, "cannot start a replica");
                    break;
                }
            }
        }
        for j in to_stop {
            if let Err(e) = core.cancel(j, now) {
                tracing::debug!(job = %j, error = %e, "stopping a drained replica");
            }
        }
        drop(core);
        s.sched_wake.notify_one();
    }
    let mut probing = s.gateway.probing.lock().expect("gateway lock");
    for (key, job) in probes {
        if probing.insert(job) {
            tokio::spawn(prober(s.clone(), key, job));
        }
    }
}

/// How many replicas of the current version to start, and which replicas to drain, to
/// move toward `wanted` of the current version.
fn plan(svc: &Svc, wanted: u32) -> (u32, Vec<JobId>) {
    let active: Vec<&Replica> = svc.replicas.values().filter(|r| !r.draining).collect();
    // Replicas on drained nodes count as old: replaced first, drained after.
    let (cur, old): (Vec<&Replica>, Vec<&Replica>) = active
        .iter()
        .partition(|r| r.version == svc.version && !r.evict);
    let wanted_n = wanted as usize;
    let mut stop = Vec::new();
    let mut start = 0usize;
    if old.is_empty() {
        if cur.len() < wanted_n {
            start = wanted_n - cur.len();
        } else if cur.len() > wanted_n {
            // Not-ready first, then the least busy.
            let mut c = cur.clone();
            c.sort_by_key(|r| {
                (
                    r.ready,
                    r.in_flight.load(Ordering::Relaxed),
                    std::cmp::Reverse(r.job),
                )
            });
            stop.extend(c.iter().take(cur.len() - wanted_n).map(|r| r.job));
        }
        return (start as u32, stop);
    }
    // Rolling update: start new replicas up to wanted + surge in total, drain old ones
    // while enough ready replicas remain.
    let surge = svc.spec.max_surge as usize;
    let unavailable = svc.spec.max_unavailable as usize;
    let total = cur.len() + old.len();
    if cur.len() < wanted_n {
        let room = (wanted_n + surge).saturating_sub(total);
        start = room.min(wanted_n - cur.len());
    }
    if cur.len() > wanted_n {
        let mut c = cur.clone();
        c.sort_by_key(|r| (r.ready, std::cmp::Reverse(r.job)));
        stop.extend(c.iter().take(cur.len() - wanted_n).map(|r| r.job));
    }
    let ready_cur = cur.iter().filter(|r| r.ready).count();
    let mut ready_old = old.iter().filter(|r| r.ready).count();
    let mut floor = wanted_n.saturating_sub(unavailable);
    // Stuck, and told to replace in place: one old replica more may go, so that its room
    // holds a new one (once that is ready the floor holds again).
    if svc.spec.on_stuck == caravel_core::OnStuck::Replace
        && svc.rollout.as_ref().is_some_and(|r| r.replacing)
        && ready_cur < wanted_n
    {
        floor = floor.saturating_sub(1);
    }
    let mut o = old.clone();
    o.sort_by_key(|r| (r.ready, r.in_flight.load(Ordering::Relaxed)));
    for r in o {
        if !r.ready {
            stop.push(r.job);
        } else if ready_cur + ready_old > floor {
            stop.push(r.job);
            ready_old -= 1;
        }
    }
    (start as u32, stop)
}

pub async fn controller_loop(s: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_millis(TICK_MS)).await;
        reconcile(&s, now_ms());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_name_services_under_the_gateway_domains() {
        let d = vec!["apps.example.com".to_string(), "svc.internal".to_string()];
        let f = |h: &str| service_for_host(h, &d);
        let named = |t: &str, s: &str| Some((t.to_string(), s.to_string()));
        assert_eq!(f("tinylm.apps.example.com"), named("default", "tinylm"));
        assert_eq!(
            f("TinyLM.Apps.Example.com:8443"),
            named("default", "tinylm")
        );
        assert_eq!(f("tinylm.apps.example.com."), named("default", "tinylm"));
        assert_eq!(
            f("embed--research.svc.internal"),
            named("research", "embed")
        );
        assert_eq!(f("a--b--research.svc.internal"), named("research", "a--b"));
        // Not one label under a domain: not a service host (the API answers).
        assert_eq!(f("apps.example.com"), None);
        assert_eq!(f("a.b.apps.example.com"), None);
        assert_eq!(f("tinylm.apps.example.org"), None);
        assert_eq!(f("xapps.example.com"), None);
        assert_eq!(f("127.0.0.1:7080"), None);
        assert_eq!(service_for_host("tinylm.apps.example.com", &[]), None);
    }

    #[test]
    fn a_service_host_reads_back_as_the_same_service() {
        let d = "apps.example.com";
        let h = |t: &str, s: &str| host_for_service(t, s, d);
        assert_eq!(
            h("default", "tinylm").as_deref(),
            Some("tinylm.apps.example.com")
        );
        assert_eq!(
            h("research", "embed").as_deref(),
            Some("embed--research.apps.example.com")
        );
        assert_eq!(
            h("default", "a--b").as_deref(),
            Some("a--b--default.apps.example.com")
        );
        // Names a DNS label cannot carry, or that would read back as another service.
        for (t, s) in [
            ("default", "TinyLM"),
            ("default", "tiny_lm"),
            ("default", "tiny.lm"),
            ("default", "x-"),
            ("-t", "svc"),
            ("a--b", "svc"),
            ("default", &"x".repeat(64)),
        ] {
            assert_eq!(h(t, s), None, "{t}/{s}");
        }
        for (t, s) in [
            ("default", "tinylm"),
            ("research", "embed"),
            ("t1", "a-b"),
            ("default", "a--b"),
        ] {
            let host = h(t, s).unwrap();
            assert_eq!(
                service_for_host(&host, &[d.to_string()]),
                Some((t.to_string(), s.to_string()))
            );
        }
    }

    fn svc(version: u64, reps: &[(u64, u64, bool)]) -> Svc {
        let mut spec = ServiceSpec::simple("s", "x", &[]);
        spec.max_surge = 1;
        spec.max_unavailable = 0;
        Svc {
            spec,
            version,
            replicas: reps
                .iter()
                .map(|&(job, v, ready)| {
                    (
                        JobId(job),
                        Replica {
                            job: JobId(job),
                            version: v,
                            addr: Some(format!("127.0.0.1:{}", 9000 + job)),
                            zone: if job % 2 == 0 { "a" } else { "b" }.into(),
                            region: "r".into(),
                            ready,
                            draining: false,
                            stopped: false,
                            evict: false,
                            in_flight: Arc::new(AtomicU64::new(job)),
                            started_at: None,
                            ready_at: None,
                            draining_since: None,
                        },
                    )
                })
                .collect(),
            held: Arc::new(AtomicU64::new(0)),
            arrived: Arc::new(AtomicU64::new(0)),
            ready_changed: Arc::new(Notify::new()),
            scaler: Autoscaler::default(),
            bucket: (0.0, Instant::now()),
            failures: 0,
            start_after: None,
            rollout: None,
            events: Default::default(),
        }
    }

    #[test]
    fn a_stuck_rollout_told_to_replace_takes_one_old_replica_more_out() {
        // Two old ready replicas, wanted 2, no room for the surge one (it never appears).
        let mut s = svc(2, &[(1, 1, true), (2, 1, true)]);
        assert_eq!(plan(&s, 2), (1, vec![]), "waits for the surge replica");
        s.spec.on_stuck = caravel_core::OnStuck::Replace;
        assert_eq!(plan(&s, 2), (1, vec![]), "not stuck yet");
        let mut pending = HashMap::new();
        pending.insert(JobId(9), "[no_fit] 1 node lacks cpu".to_string());
        s.spec.progress_deadline_ms = 1000;
        s.track_rollout(10_000, &pending);
        assert!(s.rollout.as_ref().unwrap().stuck.is_none());
        s.track_rollout(11_000, &pending);
        let msg = s.rollout.as_ref().unwrap().stuck.clone().unwrap();
        assert!(
            msg.starts_with("rollout of v2 stuck: no progress for 1 s"),
            "{msg}"
        );
        let (start, stop) = plan(&s, 2);
        assert_eq!(
            (start, stop.len()),
            (1, 1),
            "one old replica goes to make room"
        );
        // With a new replica not ready yet, no second old one goes.
        s.replicas.get_mut(&stop[0]).unwrap().draining = true;
        let fresh = svc(2, &[(3, 2, false)]).replicas.remove(&JobId(3)).unwrap();
        s.replicas.insert(JobId(3), fresh);
        let (_, stop2) = plan(&s, 2);
        assert!(stop2.is_empty(), "{stop2:?}");
        let kinds: Vec<&str> = s.events.iter().map(|e| e.1.as_str()).collect();
        assert!(kinds[0].starts_with("rollout of v2 started"), "{kinds:?}");
        assert!(kinds[1].starts_with("rollout of v2 stuck"), "{kinds:?}");
    }

    #[test]
    fn rolling_update_surges_then_drains_old_only_as_new_is_ready() {
        // Two old replicas, want 2: start one new (surge 1), drain nothing yet.
        assert_eq!(plan(&svc(2, &[(1, 1, true), (2, 1, true)]), 2), (1, vec![]));
        // The new one is starting: nothing more (surge used), nothing drained.
        assert_eq!(
            plan(&svc(2, &[(1, 1, true), (2, 1, true), (3, 2, false)]), 2),
            (0, vec![])
        );
        // The new one is ready: one old one drains (ready stays at 2), which frees the
        // surge for the next new one on the next pass.
        let (start, stop) = plan(&svc(2, &[(1, 1, true), (2, 1, true), (3, 2, true)]), 2);
        assert_eq!((start, stop.len()), (0, 1));
        // An old replica that is not ready can always go.
        assert_eq!(
            plan(&svc(2, &[(1, 1, false), (2, 2, true), (3, 2, true)]), 2),
            (0, vec![JobId(1)])
        );
    }

    #[test]
    fn scale_down_drains_unready_then_least_busy() {
        let s = svc(
            1,
            &[(1, 1, true), (2, 1, true), (3, 1, false), (4, 1, true)],
        );
        let (start, mut stop) = plan(&s, 2);
        stop.sort();
        assert_eq!(start, 0);
        // Job 3 is not ready; of the ready ones job 1 has the fewest in flight.
        assert_eq!(stop, vec![JobId(1), JobId(3)]);
        assert_eq!(plan(&s, 5), (1, vec![]));
    }

    #[test]
    fn picks_least_outstanding_in_the_callers_zone_until_saturated() {
        let mut s = svc(1, &[(1, 1, true), (2, 1, true), (3, 1, true), (4, 1, true)]);
        s.spec.target_concurrency = 10;
        // Zone a holds jobs 2 and 4 (2 and 4 in flight): job 2.
        assert_eq!(s.pick("a", "", None).unwrap().job, JobId(2));
        // Zone b: job 1, the least busy there.
        assert_eq!(s.pick("b", "", None).unwrap().job, JobId(1));
        // No zone named: the least busy anywhere.
        assert_eq!(s.pick("", "", None).unwrap().job, JobId(1));
        // Zone a saturated: fall back to the least busy anywhere.
        s.spec.target_concurrency = 2;
        assert_eq!(s.pick("a", "", None).unwrap().job, JobId(1));
        // Avoid the replica a retry must not go back to; draining ones get nothing.
        assert_eq!(s.pick("", "", Some(JobId(1))).unwrap().job, JobId(2));
        for r in s.replicas.values_mut() {
            r.draining = true;
        }
        assert!(s.pick("", "", None).is_none());
    }

    #[test]
    fn grpc_health_messages_encode_and_decode_as_protobuf() {
        assert_eq!(grpc_health_request(""), [0, 0, 0, 0, 0]);
        assert_eq!(
            grpc_health_request("a.B"),
            [0, 0, 0, 0, 5, 0x0a, 3, b'a', b'.', b'B']
        );
        let long = "x".repeat(200);
        let f = grpc_health_request(&long);
        assert_eq!(&f[..8], &[0, 0, 0, 0, 203, 0x0a, 0xc8, 0x01]);
        // SERVING = 1; UNKNOWN (0, the field left out), NOT_SERVING = 2, SERVICE_UNKNOWN = 3.
        assert!(grpc_health_serving(&[0, 0, 0, 0, 2, 0x08, 1]));
        assert!(!grpc_health_serving(&[0, 0, 0, 0, 0]));
        assert!(!grpc_health_serving(&[0, 0, 0, 0, 2, 0x08, 2]));
        assert!(!grpc_health_serving(&[0, 0, 0, 0, 2, 0x08, 3]));
        // An unknown length-delimited field is skipped; truncated or compressed is not.
        assert!(grpc_health_serving(&[
            0, 0, 0, 0, 5, 0x12, 1, b'z', 0x08, 1
        ]));
        assert!(!grpc_health_serving(&[0, 0, 0, 0, 3, 0x08, 1]));
        assert!(!grpc_health_serving(&[1, 0, 0, 0, 2, 0x08, 1]));
        assert!(!grpc_health_serving(&[0, 0, 0, 0, 2, 0x08]));
    }

    #[test]
    fn a_draining_replica_stops_when_idle_or_when_its_drain_timeout_is_up() {
        let mut s = svc(1, &[(1, 1, true), (2, 1, true)]);
        let t0 = Instant::now();
        let timeout = Duration::from_secs(60);
        let r = s.replicas.get_mut(&JobId(1)).unwrap();
        // In rotation: never "drained", whatever it holds.
        assert!(!r.drained(timeout, t0));
        r.draining = true;
        r.draining_since = Some(t0);
        // One request in flight (a stream): held until the timeout, not a moment less.
        assert!(!r.drained(timeout, t0 + Duration::from_secs(59)));
        assert!(r.drained(timeout, t0 + Duration::from_secs(60)));
        // Idle: at once.
        r.in_flight.store(0, Ordering::Relaxed);
        assert!(r.drained(timeout, t0));
    }

    #[test]
    fn crash_backoff_doubles_to_a_minute() {
        assert_eq!(crash_backoff(0), Duration::ZERO);
        assert_eq!(crash_backoff(1), Duration::from_millis(500));
        assert_eq!(crash_backoff(3), Duration::from_secs(2));
        assert_eq!(crash_backoff(8), Duration::from_secs(60));
        assert_eq!(crash_backoff(50), Duration::from_secs(60));
    }

    #[test]
    fn rate_limit_admits_the_rate_then_refuses() {
        let mut s = svc(1, &[]);
        s.spec.rate_limit_rps = Some(5);
        s.bucket = (5.0, Instant::now());
        let admitted = (0..20).filter(|_| s.admit()).count();
        assert_eq!(admitted, 5);
        s.spec.rate_limit_rps = None;
        assert!(s.admit());
    }
}
