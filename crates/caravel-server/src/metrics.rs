//! Prometheus metrics on an explicit registry (no globals, so tests can run many servers
//! in one process).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of a metric family: (name, value) pairs.
type Labels = Vec<(String, String)>;
/// Histograms by label set, each made with the same buckets.
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub queue_depth: Gauge,
    pub running_tasks: Gauge,
    pub nodes: Family<Vec<(String, String)>, Gauge>,
    pub sched_latency: Histogram,
    pub placements: Counter,
    /// Scheduling passes by kind: `full` (the whole queue) or `incremental` (only work
    /// that arrived since the last pass).
    pub sched_passes: Family<Labels, Counter>,
    pub api_requests: Family<Vec<(String, String)>, Counter>,
    pub jobs_submitted: Counter,
    /// Gateway requests by service (`tenant/name`) and status code.
    pub service_requests: Family<Vec<(String, String)>, Counter>,
    /// Gateway request latency by service, to the end of the response body.
    pub service_latency: HistogramFamily,
    /// Requests retried on another replica after a refused connection.
    pub service_retries: Family<Labels, Counter>,
    /// Replicas by service and state (wanted, ready).
    pub service_replicas: Family<Vec<(String, String)>, Gauge>,
    /// What the store's writer thread does (see `committer`).
    pub commits: CommitStats,
    /// Checkpoint uploads by outcome: `saved`, `stale` (not the task's current run),
    /// `too_large`, `damaged` (hash, archive or a cut body), `invalid` (a bad header or
    /// task index), `failed` (the server's own error).
    pub checkpoint_saves: Family<Labels, Counter>,
    /// Bytes of the checkpoints kept.
    pub checkpoint_bytes_saved: Counter,
    /// Bytes of checkpoints served to agents and clients.
    pub checkpoint_bytes_served: Counter,
    /// Bytes of task output shipped by agents and kept (resent bytes count once).
    pub log_bytes_shipped: Counter,
    /// Bytes of task output the server holds now.
    pub log_bytes_stored: Gauge,
    /// Bytes of checkpoints and task output kept per tenant (what storage quotas cap).
    pub tenant_storage: Family<Labels, Gauge>,
    /// Open connections; those closed to make room for others, and newcomers refused
    /// (see `serve`).
    pub connections_open: Gauge,
    pub connections_evicted: Counter,
    pub connections_refused: Counter,
    /// API requests answered 429.
    pub api_rate_limited: Counter,
}

/// The writer thread's figures: how long each commit takes, how much it carries (group
/// commit at work shows as several mutations per commit under load), and failures.
#[derive(Clone)]
pub struct CommitStats {
    pub seconds: Histogram,
    pub mutations: Histogram,
    pub failures: Counter,
}

impl Default for CommitStats {
    fn default() -> Self {
        CommitStats {
            seconds: latency_histogram(),
            mutations: Histogram::new([
                1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
                10000.0,
            ]),
            failures: Counter::default(),
        }
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("caravel");
        let queue_depth = Gauge::default();
        let running_tasks = Gauge::default();
        let nodes = Family::<Vec<(String, String)>, Gauge>::default();
        let sched_latency = Histogram::new([
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]);
        let placements = Counter::default();
        let api_requests = Family::<Vec<(String, String)>, Counter>::default();
        let jobs_submitted = Counter::default();
        registry.register(
            "queue_depth",
            "Tasks waiting to be placed",
            queue_depth.clone(),
        );
        registry.register(
            "running_tasks",
            "Task runs assigned or running on nodes",
            running_tasks.clone(),
        );
        registry.register("nodes", "Nodes by state", nodes.clone());
        registry.register(
            "scheduling_cycle_seconds",
            "Wall time of one scheduling cycle; its commit is queued, not included",
            sched_latency.clone(),
        );
        registry.register(
            "placements",
            "Tasks placed by the scheduler",
            placements.clone(),
        );
        let sched_passes = Family::<Labels, Counter>::default();
        registry.register(
            "scheduling_passes",
            "Scheduling cycles by pass: full (the whole queue) or incremental (only work that arrived since)",
            sched_passes.clone(),
        );
        registry.register(
            "api_requests",
            "API requests by method and status code",
            api_requests.clone(),
        );
        registry.register("jobs_submitted", "Jobs accepted", jobs_submitted.clone());
        let service_requests = Family::<Vec<(String, String)>, Counter>::default();
        let service_latency =
            HistogramFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        let service_replicas = Family::<Vec<(String, String)>, Gauge>::default();
        let service_retries = Family::<Labels, Counter>::default();
        registry.register(
            "service_retries",
            "Gateway requests retried on another replica after a refused connection",
            service_retries.clone(),
        );
        registry.register(
            "service_requests",
            "Gateway requests by service and status code",
            service_requests.clone(),
        );
        registry.register(
            "service_request_seconds",
            "Gateway request latency by service, to the last byte of the response",
            service_latency.clone(),
        );
        registry.register(
            "service_replicas",
            "Service replicas by state",
            service_replicas.clone(),
        );
        let commits = CommitStats::default();
        registry.register(
            "store_commit_seconds",
            "Wall time of one store commit (one transaction of the writer thread)",
            commits.seconds.clone(),
        );
        registry.register(
            "store_commit_mutations",
            "Mutations per store commit: requests that queue during a commit share the next",
            commits.mutations.clone(),
        );
        registry.register(
            "store_commit_failures",
            "Store commits that failed (the server then reloads its state from the store)",
            commits.failures.clone(),
        );
        let checkpoint_saves = Family::<Labels, Counter>::default();
        let checkpoint_bytes_saved = Counter::default();
        let checkpoint_bytes_served = Counter::default();
        registry.register(
            "checkpoint_saves",
            "Checkpoint uploads by outcome: saved, stale, too_large, damaged, invalid, failed",
            checkpoint_saves.clone(),
        );
        registry.register(
            "checkpoint_saved_bytes",
            "Bytes of the checkpoints kept",
            checkpoint_bytes_saved.clone(),
        );
        registry.register(
            "checkpoint_served_bytes",
            "Bytes of checkpoints served for restores and downloads",
            checkpoint_bytes_served.clone(),
        );
        let log_bytes_shipped = Counter::default();
        let log_bytes_stored = Gauge::default();
        registry.register(
            "log_shipped_bytes",
            "Bytes of task output shipped by agents and kept (resent bytes count once)",
            log_bytes_shipped.clone(),
        );
        registry.register(
            "log_stored_bytes",
            "Bytes of task output the server holds",
            log_bytes_stored.clone(),
        );
        let connections_open = Gauge::default();
        let connections_evicted = Counter::default();
        let connections_refused = Counter::default();
        let api_rate_limited = Counter::default();
        registry.register(
            "connections_open",
            "Connections open",
            connections_open.clone(),
        );
        registry.register(
            "connections_evicted",
            "Connections closed to make room (the oldest without a valid token, of the address holding the most)",
            connections_evicted.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused at the cap (every open one had shown a valid token)",
            connections_refused.clone(),
        );
        registry.register(
            "api_rate_limited",
            "API requests answered 429 (past the per-token or per-address rate)",
            api_rate_limited.clone(),
        );
        let tenant_storage = Family::<Labels, Gauge>::default();
        registry.register(
            "tenant_storage_bytes",
            "Bytes of checkpoints and task output kept per tenant (counted every 2 s)",
            tenant_storage.clone(),
        );
        Metrics {
            tenant_storage,
            connections_open,
            connections_evicted,
            connections_refused,
            api_rate_limited,
            log_bytes_shipped,
            log_bytes_stored,
            checkpoint_saves,
            checkpoint_bytes_saved,
            checkpoint_bytes_served,
            commits,
            registry,
            queue_depth,
            running_tasks,
            nodes,
            sched_latency,
            placements,
            sched_passes,
            api_requests,
            jobs_submitted,
            service_requests,
            service_latency,
            service_replicas,
            service_retries,
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        encode(&mut s, &self.registry).expect("encoding to a String cannot fail");
        s
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
