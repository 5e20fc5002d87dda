//! The server's connection handling: what `axum::serve` does, plus the limits a server
//! facing strangers needs.
//!
//! - **Header timeout** (`--header-timeout`, 15 s): a connection that has not sent a whole
//!   request head within it, counted from the connection's start or the end of its
//!   previous response, is closed. This is also the idle keep-alive timeout.
//! - **Body timeout** (`--body-timeout`, 30 s): a request body that sends nothing for this
//!   long while its handler waits for it fails (the handler answers 400 in the usual
//!   error shape, and the connection closes).
//! - **Connection cap** (`--max-connections`, 4,096) with per-client fairness: at most
//!   `--max-connections-per-client` (256) untrusted connections of one address. A
//!   connection *earns trust* when a request on it shows the admin or an agent token
//!   (`ConnMark::trust`); trusted connections (agents' long polls) are never closed to
//!   make room. Tenants' connections are not trusted (a tenant could otherwise hold the
//!   cap), but one that has sent a whole request goes after every stalled one. When a newcomer finds the cap full, the oldest untrusted
//!   connection of the address holding the most untrusted ones is closed; a flood from
//!   one address evicts its own connections, not its neighbours'. With nothing untrusted
//!   left to close, the newcomer is refused.
//!
//! Agents' traffic stays alive under a flood because their connections are trusted and
//! an agent's new connection (its reconnect) is the youngest, evicted last.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::metrics::counter::Counter;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::oneshot;

/// Connection limits (see the module's text).
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_timeout: Duration::from_secs(15),
            body_timeout: Duration::from_secs(30),
            max_connections: 4096,
            max_connections_per_client: 256,
        }
    }
}

/// What a connection has shown (a request extension): a valid token (`trusted`), and a
/// whole request head (`started`).
#[derive(Clone, Default)]
pub struct ConnMark(Arc<(AtomicBool, AtomicBool)>);

impl ConnMark {
    pub fn trust(&self) {
        self.0 .0.store(true, Ordering::Relaxed);
    }
    pub fn trusted(&self) -> bool {
        self.0 .0.load(Ordering::Relaxed)
    }
    fn start(&self) {
        self.0 .1.store(true, Ordering::Relaxed);
    }
    fn started(&self) -> bool {
        self.0 .1.load(Ordering::Relaxed)
    }
}

struct Entry {
    id: u64,
    mark: ConnMark,
    kill: Option<oneshot::Sender<()>>,
}

/// Every open connection by client address, oldest first.
#[derive(Default)]
pub struct Registry {
    by_ip: HashMap<IpAddr, Vec<Entry>>,
    total: usize,
    /// Of `total`, those told to close whose tasks have not ended yet.
    closing: usize,
    next: u64,
    /// Connections closed to make room, and newcomers refused (for `/metrics`).
    pub evicted: Counter,
    pub refused: Counter,
}

impl Registry {
    pub fn new(evicted: Counter, refused: Counter) -> Registry {
        Registry {
            evicted,
            refused,
            ..Default::default()
        }
    }

    fn untrusted(v: &[Entry]) -> usize {
        v.iter().filter(|e| !e.mark.trusted()).count()
    }

    /// Closes the oldest untrusted connection of `ip`. True if there was one.
    fn evict_from(&mut self, ip: IpAddr) -> bool {
        let Some(v) = self.by_ip.get_mut(&ip) else {
            return false;
        };
        // A connection that never sent a whole request head goes first (a slowloris, or
        // a flood's), oldest first; one that did (an honest client mid-request) only
        // when there is no other.
        let evictable = |e: &Entry| !e.mark.trusted() && e.kill.is_some();
        let i = v
            .iter()
            .position(|e| evictable(e) && !e.mark.started())
            .or_else(|| v.iter().position(evictable));
        let Some(e) = i.map(|i| &mut v[i]) else {
            return false;
        };
        // The connection's task removes its entry when it ends.
        let _ = e.kill.take().map(|k| k.send(()));
        self.closing += 1;
        self.evicted.inc();
        true
    }

    /// Admits a newcomer from `ip`, closing others to make room as the policy says.
    /// None: refused.
    fn admit(
        &mut self,
        ip: IpAddr,
        limits: &ConnLimits,
    ) -> Option<(u64, ConnMark, oneshot::Receiver<()>)> {
        let mine = self.by_ip.get(&ip).map_or(0, |v| Self::untrusted(v));
        if mine >= limits.max_connections_per_client {
            self.evict_from(ip);
        } else if self.total - self.closing >= limits.max_connections {
            // The address holding the most untrusted connections gives one up.
            let worst = self
                .by_ip
                .iter()
                .map(|(ip, v)| (Self::untrusted(v), *ip))
                .filter(|(n, _)| *n > 0)
                .max();
            let freed = worst.is_some_and(|(_, w)| self.evict_from(w));
            if !freed {
                self.refused.inc();
                return None;
            }
        }
        let id = self.next;
        self.next += 1;
        let mark = ConnMark::default();
        let (tx, rx) = oneshot::channel();
        self.by_ip.entry(ip).or_default().push(Entry {
            id,
            mark: mark.clone(),
            kill: Some(tx),
        });
        self.total += 1;
        Some((id, mark, rx))
    }

    fn remove(&mut self, ip: IpAddr, id: u64) {
        if let Some(v) = self.by_ip.get_mut(&ip) {
            if let Some(i) = v.iter().position(|e| e.id == id) {
                if v.remove(i).kill.is_none() {
                    self.closing -= 1;
                }
                self.total -= 1;
            }
            if v.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
    }

    pub fn open(&self) -> usize {
        self.total
    }

    /// Past the cap by more than the connections on their way out: the accept loop
    /// waits for those to go (the kernel's backlog holds newcomers meanwhile), so the
    /// descriptors held stay within `max_connections` plus this slack.
    fn over_ceiling(&self, limits: &ConnLimits) -> bool {
        self.total >= limits.max_connections + slack(limits.max_connections)
    }
}

/// Connections past the cap allowed while evicted ones close.
pub fn slack(max: usize) -> usize {
    max / 16 + 8
}

/// Removes a connection from the registry when its task ends, however it ends.
struct Leave {
    reg: Arc<Mutex<Registry>>,
    ip: IpAddr,
    id: u64,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.reg
            .lock()
            .expect("registry lock")
            .remove(self.ip, self.id);
    }
}

/// Accepts connections forever and serves `app` on each within `limits`.
pub async fn serve<L>(mut listener: L, app: Router, limits: ConnLimits, reg: Arc<Mutex<Registry>>)
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        // A peer that stops answering pings is gone: its streams are freed.
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256);
    let builder = Arc::new(builder);
    loop {
        while reg.lock().expect("registry lock").over_ceiling(&limits) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (io, peer) = listener.accept().await;
        let ip = peer.ip();
        let Some((id, mark, kill)) = reg.lock().expect("registry lock").admit(ip, &limits) else {
            drop(io);
            continue;
        };
        let leave = Leave {
            reg: reg.clone(),
            ip,
            id,
        };
        let app = app.clone();
        let builder = builder.clone();
        let (body_timeout, header_timeout) = (limits.body_timeout, limits.header_timeout);
        tokio::spawn(async move {
            let _leave = leave;
            // Until its first request, a connection is in the protocol detection of
            // hyper's auto builder, which has no timeout of its own.
            let first_mark = mark.clone();
            let svc = hyper::service::service_fn(
                move |req: axum::http::Request<hyper::body::Incoming>| {
                    mark.start();
                    let (mut parts, body) = req.into_parts();
                    parts.extensions.insert(ConnectInfo(peer));
                    parts.extensions.insert(mark.clone());
                    let body = Body::new(IdleTimeoutBody::new(body, body_timeout));
                    let req = axum::http::Request::from_parts(parts, body);
                    let mut app = app.clone();
                    async move { tower::Service::call(&mut app, req).await }
                },
            );
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
            let first_request = async {
                tokio::time::sleep(header_timeout).await;
                if first_mark.started() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = conn => {}
                _ = kill => {}
                _ = first_request => {}
            }
        });
    }
}

/// The error a stalled request body ends with.
#[derive(Debug, thiserror::Error)]
#[error("the request body sent nothing for {0:?}")]
pub struct BodyTimeout(Duration);

/// A request body that fails once its reader has waited `timeout` for the next frame
/// (only time spent waiting counts: a handler busy elsewhere is not the client's fault).
pub struct IdleTimeoutBody<B> {
    inner: B,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> IdleTimeoutBody<B> {
    pub fn new(inner: B, timeout: Duration) -> Self {
        IdleTimeoutBody {
            inner,
            timeout,
            sleep: None,
        }
    }
}

impl<B> http_body::Body for IdleTimeoutBody<B>
where
    B: http_body::Body + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = B::Data;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(f) => {
                this.sleep = None;
                Poll::Ready(f.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(timeout))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future;

/// Counts requests per key in token buckets (per token, or per address for callers
/// without a valid one). Bounded memory: full buckets are forgotten.
pub struct RateLimiter {
    buckets: Mutex<HashMap<RateKey, (f64, Instant)>>,
    pub limited: Counter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// A tenant (one token each).
    Tenant(caravel_core::TenantId),
    /// A caller without a valid token, by address (IPv6 by /64).
    Address(IpAddr),
}

/// A rate: `per_s` requests a second, `burst` at once. `per_s == 0`: unlimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_s: f64,
    pub burst: f64,
}

impl Rate {
    pub const UNLIMITED: Rate = Rate {
        per_s: 0.0,
        burst: 0.0,
    };

    /// `RPS` or `RPS:BURST` (burst defaults to twice the rate); `0` or `off`: unlimited.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let s = s.trim();
        if s == "off" || s == "0" {
            return Ok(Rate::UNLIMITED);
        }
        let (r, b) = match s.split_once(':') {
            Some((r, b)) => (r, Some(b)),
            None => (s, None),
        };
        let per_s: f64 = r
            .parse()
            .map_err(|_| format!("`{s}`: expected RPS or RPS:BURST (numbers), or off"))?;
        if !(per_s.is_finite() && per_s > 0.0) {
            return Err(format!("`{s}`: the rate must be above 0 (or `off`)"));
        }
        let burst: f64 = match b {
            Some(b) => b
                .parse()
                .map_err(|_| format!("`{s}`: the burst `{b}` is not a number"))?,
            None => (per_s * 2.0).max(1.0),
        };
        if !(burst.is_finite() && burst >= 1.0) {
            return Err(format!("`{s}`: the burst must be at least 1"));
        }
        Ok(Rate { per_s, burst })
    }
}

impl RateKey {
    pub fn address(ip: IpAddr) -> RateKey {
        match ip {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
                let mut o = v6.octets();
                o[8..].fill(0);
                RateKey::Address(IpAddr::V6(o.into()))
            }
            IpAddr::V6(v6) => RateKey::Address(IpAddr::V4(v6.to_ipv4_mapped().expect("mapped"))),
            v4 => RateKey::Address(v4),
        }
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter {
            buckets: Mutex::new(HashMap::new()),
            limited: Counter::default(),
        }
    }
}

/// Buckets kept before full ones are swept.
const MAX_BUCKETS: usize = 65_536;

impl RateLimiter {
    pub fn new(limited: Counter) -> RateLimiter {
        RateLimiter {
            buckets: Mutex::new(HashMap::new()),
            limited,
        }
    }

    /// Takes one request from `key`'s bucket at `now`. Err: how long until one is there.
    pub fn take(&self, key: RateKey, rate: Rate, now: Instant) -> Result<(), Duration> {
        if rate.per_s <= 0.0 {
            return Ok(());
        }
        let mut b = self.buckets.lock().expect("rate lock");
        if b.len() >= MAX_BUCKETS && !b.contains_key(&key) {
            // Forget callers whose buckets have refilled: they are as if new.
            b.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate.per_s < rate.burst
            });
            if b.len() >= MAX_BUCKETS {
                self.limited.inc();
                return Err(Duration::from_secs(1));
            }
        }
        let (tokens, at) = b.entry(key).or_insert((rate.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate.per_s).min(rate.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            self.limited.inc();
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate.per_s))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per: usize) -> ConnLimits {
        ConnLimits {
            max_connections: max,
            max_connections_per_client: per,
            ..ConnLimits::default()
        }
    }

    #[test]
    fn a_flooding_address_evicts_its_own_connections_first() {
        let l = limits(4, 3);
        let mut r = Registry::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mut a_kills = vec![];
        for _ in 0..3 {
            a_kills.push(r.admit(a, &l).unwrap().2);
        }
        // Its per-client cap: the fourth closes its own oldest.
        a_kills.push(r.admit(a, &l).unwrap().2);
        assert!(a_kills[0].try_recv().is_ok());
        r.remove(a, 0);
        // Room for one more: b's first takes it without closing anything.
        let (_, b1m, mut b1k) = r.admit(b, &l).unwrap();
        assert!(a_kills[1].try_recv().is_err());
        b1m.trust();
        // Full: b's next closes a's oldest, never b's own.
        let (_, _, mut b2k) = r.admit(b, &l).unwrap();
        assert!(a_kills[1].try_recv().is_ok());
        r.remove(a, 1);
        let (_, _, mut b3k) = r.admit(b, &l).unwrap();
        assert!(a_kills[2].try_recv().is_ok());
        r.remove(a, 2);
        assert!(b1k.try_recv().is_err() && b2k.try_recv().is_err() && b3k.try_recv().is_err());
        assert_eq!(r.evicted.get(), 3);
        assert_eq!(r.open(), 4);
    }

    #[test]
    fn a_connection_that_sent_a_request_outlives_newer_stalled_ones() {
        let l = limits(100, 3);
        let mut r = Registry::default();
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let (_, honest, mut hk) = r.admit(ip, &l).unwrap();
        honest.start();
        let (_, _, mut s1) = r.admit(ip, &l).unwrap();
        let (_, _, mut s2) = r.admit(ip, &l).unwrap();
        // At its cap: the stalled ones go, oldest first, before the honest one.
        r.admit(ip, &l).unwrap();
        assert!(s1.try_recv().is_ok());
        r.admit(ip, &l).unwrap();
        assert!(s2.try_recv().is_ok());
        assert!(hk.try_recv().is_err());
    }

    #[test]
    fn trusted_connections_are_never_evicted_and_a_full_trusted_pool_refuses() {
        let l = limits(2, 2);
        let mut r = Registry::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let (_, m1, mut k1) = r.admit(ip, &l).unwrap();
        let (_, m2, mut k2) = r.admit(ip, &l).unwrap();
        m1.trust();
        m2.trust();
        assert!(r.admit(ip, &l).is_none());
        assert_eq!(r.refused.get(), 1);
        assert!(k1.try_recv().is_err() && k2.try_recv().is_err());
        r.remove(ip, 0);
        assert!(r.admit(ip, &l).is_some());
        assert_eq!(r.open(), 2);
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let rl = RateLimiter::default();
        let rate = Rate {
            per_s: 10.0,
            burst: 5.0,
        };
        let key = RateKey::address("10.1.1.1".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(rl.take(key, rate, t0).is_ok());
        }
        let wait = rl.take(key, rate, t0).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100));
        // Another caller has its own bucket.
        let other = RateKey::address("10.1.1.2".parse().unwrap());
        assert!(rl.take(other, rate, t0).is_ok());
        // 100 ms later, one more.
        let t1 = t0 + Duration::from_millis(100);
        assert!(rl.take(key, rate, t1).is_ok());
        assert!(rl.take(key, rate, t1).is_err());
        assert!(rl.take(key, Rate::UNLIMITED, t1).is_ok());
        assert_eq!(rl.limited.get(), 2);
    }

    #[test]
    fn rates_parse_with_clear_errors() {
        assert_eq!(
            Rate::parse("50").unwrap(),
            Rate {
                per_s: 50.0,
                burst: 100.0
            }
        );
        assert_eq!(Rate::parse("5:20").unwrap().burst, 20.0);
        assert_eq!(Rate::parse("off").unwrap(), Rate::UNLIMITED);
        assert!(Rate::parse("-1").unwrap_err().contains("above 0"));
        assert!(Rate::parse("x").unwrap_err().contains("RPS"));
        assert!(Rate::parse("5:0.5").unwrap_err().contains("burst"));
    }

    #[test]
    fn ipv6_callers_share_a_bucket_per_64() {
        let a = RateKey::address("2001:db8::1".parse().unwrap());
        let b = RateKey::address("2001:db8::ffff:1".parse().unwrap());
        let c = RateKey::address("2001:db8:0:1::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            RateKey::address("::ffff:10.0.0.1".parse().unwrap()),
            RateKey::address("10.0.0.1".parse().unwrap())
        );
    }
}
