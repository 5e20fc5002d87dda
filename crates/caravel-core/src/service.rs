//! Inference services: a command run as a set of replicas behind the gateway, scaled by
//! the number of requests in flight.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Millis, TaskResources, TenantId, ValidationError};

pub const MAX_REPLICAS: u32 = 1000;

/// How the gateway talks to a service's replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (WebSocket and other upgrades pass through).
    #[default]
    Http,
    /// HTTP/2 without TLS, prior knowledge (RFC 9113 §3.3): the replica speaks only HTTP/2.
    H2c,
    /// gRPC: HTTP/2 as `h2c`, and readiness is a gRPC health check unless a path is given.
    Grpc,
}

impl Protocol {
    pub fn is_http2(self) -> bool {
        !matches!(self, Protocol::Http)
    }
}

/// A probe of one replica: GET `path` on its port (any 2xx passes), or with `grpc` set, a
/// `grpc.health.v1.Health/Check` of that service name (`""`: the whole server), which
/// passes when it answers SERVING — what Kubernetes' `grpc` probe does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    #[serde(default = "root")]
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<String>,
    /// Time between probes of a replica that passes.
    #[serde(default = "second")]
    pub period_ms: u64,
    #[serde(default = "second")]
    pub timeout_ms: u64,
    /// Consecutive failures before the replica is out (readiness) or restarted (liveness).
    #[serde(default = "three")]
    pub failure_threshold: u32,
}

fn root() -> String {
    "/".into()
}
fn second() -> u64 {
    1000
}
fn three() -> u32 {
    3
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            path: root(),
            grpc: None,
            period_ms: second(),
            timeout_ms: second(),
            failure_threshold: three(),
        }
    }
}

impl Probe {
    /// The gRPC service name to health-check, if this probe is a gRPC one: set
    /// explicitly, or a `grpc` service's probe left at its default path.
    pub fn grpc_check(&self, protocol: Protocol) -> Option<&str> {
        match &self.grpc {
            Some(g) => Some(g),
            None if protocol == Protocol::Grpc && self.path == "/" => Some(""),
            None => None,
        }
    }

    fn validate(&self, field: &str, protocol: Protocol) -> Result<(), ValidationError> {
        if !self.path.starts_with('/') || self.path.chars().any(|c| c.is_whitespace()) {
            return Err(ValidationError::new(
                format!("{field}.path"),
                "must be an absolute URL path such as /healthz",
            ));
        }
        if let Some(g) = &self.grpc {
            if protocol != Protocol::Grpc {
                return Err(ValidationError::new(
                    format!("{field}.grpc"),
                    "a gRPC health check needs protocol = \"grpc\"",
                ));
            }
            if self.path != "/" {
                return Err(ValidationError::new(
                    format!("{field}.path"),
                    "a probe is an HTTP path or a gRPC health check (grpc), not both",
                ));
            }
            if g.len() > 256 || g.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ValidationError::new(
                    format!("{field}.grpc"),
                    "must be a gRPC service name such as my.pkg.Service (or \"\" for the whole server), at most 256 characters",
                ));
            }
        }
        for (name, v) in [
            ("period_ms", self.period_ms),
            ("timeout_ms", self.timeout_ms),
        ] {
            if !(10..=600_000).contains(&v) {
                return Err(ValidationError::new(
                    format!("{field}.{name}"),
                    "must be 10 ms to 10 minutes",
                ));
            }
        }
        if !(1..=100).contains(&self.failure_threshold) {
            return Err(ValidationError::new(
                format!("{field}.failure_threshold"),
                "must be 1 to 100",
            ));
        }
        Ok(())
    }
}

/// What a user deploys. Durations are milliseconds in the JSON API; the service file
/// (`caravel service deploy -f`) takes "30s", "5m".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    /// With an `image`, may be left out: the image's entrypoint and command run.
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: TaskResources,
    /// `http` (HTTP/1.1), `h2c` or `grpc` (both HTTP/2 to the replica).
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub readiness: Probe,
    /// Without one, a replica is restarted only when its process exits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Probe>,
    #[serde(default)]
    pub min_replicas: u32,
    #[serde(default = "ten")]
    pub max_replicas: u32,
    /// Requests in flight one replica is sized for; the autoscaler keeps the average at or
    /// below it.
    #[serde(default = "ten")]
    pub target_concurrency: u32,
    /// With `min_replicas = 0`, no request for this long scales the service to zero.
    #[serde(default = "five_minutes")]
    pub scale_to_zero_after_ms: u64,
    /// Scale-down looks at the most replicas wanted over this window, and changes the
    /// count at most once per window.
    #[serde(default = "ten_minutes")]
    pub scale_down_delay_ms: u64,
    /// How long the gateway holds a request while no replica is ready (scale from zero).
    #[serde(default = "minute")]
    pub cold_start_timeout_ms: u64,
    /// Anyone may call it; otherwise only the owning tenant's token (or the admin's).
    #[serde(default)]
    pub public: bool,
    /// Requests per second the gateway admits (HTTP 429 past it); none: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_rps: Option<u32>,
    /// Rolling update: replicas above the wanted count while the new version starts.
    #[serde(default = "one")]
    pub max_surge: u32,
    /// Rolling update: ready replicas the update may take below the wanted count.
    #[serde(default)]
    pub max_unavailable: u32,
    /// A rolling update that makes no progress (no new replica ready, no old one gone)
    /// for this long is `stuck`: `service show` says why, and `on_stuck` applies.
    #[serde(default = "ten_minutes")]
    pub progress_deadline_ms: u64,
    /// What a stuck rolling update does.
    #[serde(default)]
    pub on_stuck: OnStuck,
    /// SIGTERM to SIGKILL when a drained replica stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_grace_ms: Option<u64>,
    /// How long a replica taken out of rotation may keep serving what it has in flight
    /// (long-lived streams, WebSocket tunnels) before it is stopped anyway.
    #[serde(default = "five_minutes")]
    pub drain_timeout_ms: u64,
    /// How long the gateway waits for a replica's response head (HTTP 504 past it, not
    /// retried); a response that has started may stream for as long as it likes.
    #[serde(default = "five_minutes")]
    pub response_timeout_ms: u64,
    /// As for jobs (`JobSpec::image`, `workdir`, `secret_env`, `isolation`,
    /// `disk_bytes`): each replica runs so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<crate::IsolationLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
}

fn ten() -> u32 {
    10
}
fn one() -> u32 {
    1
}
/// What a rolling update past its `progress_deadline_ms` does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnStuck {
    /// Keep waiting (and saying why): availability is never traded for progress.
    #[default]
    Wait,
    /// Replace in place: take one old replica more out of service than `max_unavailable`
    /// allows, so that its room holds a new one, then carry on.
    Replace,
}

fn five_minutes() -> u64 {
    300_000
}
fn ten_minutes() -> u64 {
    600_000
}
fn minute() -> u64 {
    60_000
}

impl ServiceSpec {
    pub fn simple(name: &str, command: &str, args: &[&str]) -> ServiceSpec {
        ServiceSpec {
            image: None,
            workdir: None,
            secret_env: Default::default(),
            isolation: None,
            disk_bytes: None,
            name: name.into(),
            command: command.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            resources: TaskResources::default(),
            protocol: Protocol::Http,
            readiness: Probe::default(),
            liveness: None,
            min_replicas: 0,
            max_replicas: ten(),
            target_concurrency: ten(),
            scale_to_zero_after_ms: five_minutes(),
            scale_down_delay_ms: ten_minutes(),
            cold_start_timeout_ms: minute(),
            public: false,
            rate_limit_rps: None,
            max_surge: one(),
            max_unavailable: 0,
            progress_deadline_ms: ten_minutes(),
            on_stuck: OnStuck::Wait,
            kill_grace_ms: None,
            drain_timeout_ms: five_minutes(),
            response_timeout_ms: five_minutes(),
        }
    }

    /// The job one replica runs (its port comes from the agent).
    pub fn replica_job(&self) -> crate::JobSpec {
        crate::JobSpec {
            name: Some(self.name.clone()),
            tasks: 1,
            min_tasks: None,
            command: self.command.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
            resources: self.resources.clone(),
            priority: crate::Priority::Online,
            max_runtime_ms: None,
            // Replicas have health checks for that.
            hang_timeout_ms: None,
            max_retries: 0,
            gang: false,
            topology: None,
            kill_grace_ms: self.kill_grace_ms,
            min_runtime_ms: None,
            // A replica cut off from the server keeps serving: the gateway decides where
            // requests go, so two copies do no harm.
            fence: false,
            image: self.image.clone(),
            workdir: self.workdir.clone(),
            secret_env: self.secret_env.clone(),
            isolation: self.isolation,
            disk_bytes: self.disk_bytes,
        }
    }

    /// The spec as views show it: secret values replaced.
    pub fn redacted(&self) -> ServiceSpec {
        let mut s = self.clone();
        for v in s.secret_env.values_mut() {
            *v = crate::REDACTED.to_string();
        }
        s
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        crate::tenant::validate_name("name", &self.name)?;
        self.replica_job().validate()?;
        if self.env.contains_key("PORT") || self.secret_env.contains_key("PORT") {
            return Err(ValidationError::new(
                "env.PORT",
                "PORT is set by Caravel to the port the replica must listen on",
            ));
        }
        self.readiness.validate("readiness", self.protocol)?;
        if let Some(l) = &self.liveness {
            l.validate("liveness", self.protocol)?;
        }
        if self.max_replicas == 0 || self.max_replicas > MAX_REPLICAS {
            return Err(ValidationError::new(
                "max_replicas",
                format!("must be 1 to {MAX_REPLICAS}"),
            ));
        }
        if self.min_replicas > self.max_replicas {
            return Err(ValidationError::new(
                "min_replicas",
                format!(
                    "must not exceed max_replicas ({} > {})",
                    self.min_replicas, self.max_replicas
                ),
            ));
        }
        if self.target_concurrency == 0 || self.target_concurrency > 100_000 {
            return Err(ValidationError::new(
                "target_concurrency",
                "must be 1 to 100000",
            ));
        }
        let day = 86_400_000;
        for (name, v, lo) in [
            ("scale_to_zero_after_ms", self.scale_to_zero_after_ms, 1_000),
            ("scale_down_delay_ms", self.scale_down_delay_ms, 0),
            ("cold_start_timeout_ms", self.cold_start_timeout_ms, 100),
            ("drain_timeout_ms", self.drain_timeout_ms, 1_000),
            ("response_timeout_ms", self.response_timeout_ms, 100),
            ("progress_deadline_ms", self.progress_deadline_ms, 1_000),
        ] {
            if v < lo || v > day {
                return Err(ValidationError::new(
                    name,
                    format!("must be {lo} ms to 1 day"),
                ));
            }
        }
        if self.rate_limit_rps == Some(0) {
            return Err(ValidationError::new(
                "rate_limit_rps",
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        if self.max_surge == 0 && self.max_unavailable == 0 {
            return Err(ValidationError::new(
                "max_surge",
                "max_surge and max_unavailable cannot both be 0: an update could never make progress",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServiceRecord {
    pub tenant: TenantId,
    pub spec: ServiceSpec,
    /// Bumped by every deploy that changes the spec; replicas of older versions are
    /// replaced by a rolling update.
    pub version: u64,
    pub created_ms: Millis,
    pub updated_ms: Millis,
}

/// A replica job's link to its service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaOf {
    pub service: String,
    pub version: u64,
    /// The zone the controller asked for, to spread the service's replicas; placement
    /// falls back to any zone when none there fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation_name_the_field() {
        let s: ServiceSpec =
            serde_json::from_str(r#"{"name":"echo","command":"python3"}"#).unwrap();
        assert_eq!(s.max_replicas, 10);
        assert_eq!(s.readiness.path, "/");
        assert_eq!(s.scale_to_zero_after_ms, 300_000);
        s.validate().unwrap();
        let bad = |f: &dyn Fn(&mut ServiceSpec)| {
            let mut x = s.clone();
            f(&mut x);
            x.validate().unwrap_err().field
        };
        assert_eq!(bad(&|x| x.name = "Bad Name".into()), "name");
        assert_eq!(bad(&|x| x.command = " ".into()), "command");
        assert_eq!(bad(&|x| x.min_replicas = 11), "min_replicas");
        assert_eq!(bad(&|x| x.max_replicas = 0), "max_replicas");
        assert_eq!(bad(&|x| x.target_concurrency = 0), "target_concurrency");
        assert_eq!(
            bad(&|x| x.readiness.path = "healthz".into()),
            "readiness.path"
        );
        assert_eq!(bad(&|x| x.rate_limit_rps = Some(0)), "rate_limit_rps");
        assert_eq!(s.drain_timeout_ms, 300_000);
        assert_eq!(bad(&|x| x.drain_timeout_ms = 10), "drain_timeout_ms");
        assert_eq!(bad(&|x| x.response_timeout_ms = 0), "response_timeout_ms");
        assert_eq!(
            bad(&|x| {
                x.env.insert("PORT".into(), "80".into());
            }),
            "env.PORT"
        );
        assert_eq!(
            bad(&|x| {
                x.max_surge = 0;
                x.max_unavailable = 0
            }),
            "max_surge"
        );
        assert!(
            serde_json::from_str::<ServiceSpec>(r#"{"name":"e","command":"x","replicas":3}"#)
                .is_err()
        );
        // gRPC health checks: only for gRPC services, and not with a path as well.
        assert_eq!(
            bad(&|x| x.readiness.grpc = Some(String::new())),
            "readiness.grpc"
        );
        let mut g = s.clone();
        g.protocol = Protocol::Grpc;
        g.validate().unwrap();
        g.readiness.grpc = Some("my.pkg.Svc".into());
        g.validate().unwrap();
        let gbad = |f: &dyn Fn(&mut ServiceSpec)| {
            let mut x = g.clone();
            f(&mut x);
            x.validate().unwrap_err().field
        };
        assert_eq!(gbad(&|x| x.readiness.path = "/h".into()), "readiness.path");
        assert_eq!(
            gbad(&|x| x.readiness.grpc = Some("a b".into())),
            "readiness.grpc"
        );
        assert!(serde_json::from_str::<ServiceSpec>(
            r#"{"name":"e","command":"x","protocol":"http3"}"#
        )
        .is_err());
    }

    #[test]
    fn a_grpc_service_probes_by_grpc_health_unless_given_a_path() {
        let mut p = Probe::default();
        assert_eq!(p.grpc_check(Protocol::Http), None);
        assert_eq!(p.grpc_check(Protocol::H2c), None);
        assert_eq!(p.grpc_check(Protocol::Grpc), Some(""));
        p.path = "/healthz".into();
        assert_eq!(p.grpc_check(Protocol::Grpc), None);
        p.path = "/".into();
        p.grpc = Some("a.B".into());
        assert_eq!(p.grpc_check(Protocol::Grpc), Some("a.B"));
        let s: ServiceSpec =
            serde_json::from_str(r#"{"name":"e","command":"x","protocol":"grpc"}"#).unwrap();
        assert_eq!(s.protocol, Protocol::Grpc);
        assert!(s.protocol.is_http2() && Protocol::H2c.is_http2() && !Protocol::Http.is_http2());
    }
}
