//! The service file that `caravel service deploy -f svc.toml` reads: the JSON API's
//! `ServiceSpec` with human quantities ("500m", "4Gi", "30s").

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use caravel_core::quantity::parse_duration_ms;
use caravel_core::{Probe, ServiceSpec};
use serde::Deserialize;

use crate::jobfile::{FileResources, JobFile};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileProbe {
    pub path: Option<String>,
    pub grpc: Option<String>,
    pub period: Option<String>,
    pub timeout: Option<String>,
    pub failure_threshold: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    pub name: Option<String>,
    pub command: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: FileResources,
    #[serde(default)]
    pub protocol: caravel_core::Protocol,
    pub readiness: Option<FileProbe>,
    pub liveness: Option<FileProbe>,
    pub min_replicas: Option<u32>,
    pub max_replicas: Option<u32>,
    pub target_concurrency: Option<u32>,
    pub scale_to_zero_after: Option<String>,
    pub scale_down_delay: Option<String>,
    pub cold_start_timeout: Option<String>,
    #[serde(default)]
    pub public: bool,
    pub rate_limit_rps: Option<u32>,
    pub max_surge: Option<u32>,
    pub max_unavailable: Option<u32>,
    pub progress_deadline: Option<String>,
    pub on_stuck: Option<caravel_core::OnStuck>,
    pub kill_grace: Option<String>,
    pub drain_timeout: Option<String>,
    pub response_timeout: Option<String>,
    /// As in job files: an OCI image, a folder to ship (relative to the file), values
    /// no view shows, the least isolation, ephemeral disk per replica.
    pub image: Option<String>,
    pub workdir: Option<String>,
    #[serde(default)]
    pub secret_env: BTreeMap<String, String>,
    pub isolation: Option<caravel_core::IsolationLevel>,
    pub disk: Option<crate::jobfile::NumOrStr>,
}

fn dur(v: &Option<String>, field: &str) -> Result<Option<u64>> {
    v.as_ref()
        .map(|d| parse_duration_ms(d).map_err(|e| anyhow!("{field}: {e}")))
        .transpose()
}

fn probe(p: Option<FileProbe>, field: &str) -> Result<Option<Probe>> {
    let Some(p) = p else { return Ok(None) };
    let d = Probe::default();
    Ok(Some(Probe {
        path: p.path.unwrap_or(d.path),
        grpc: p.grpc,
        period_ms: dur(&p.period, &format!("{field}.period"))?.unwrap_or(d.period_ms),
        timeout_ms: dur(&p.timeout, &format!("{field}.timeout"))?.unwrap_or(d.timeout_ms),
        failure_threshold: p.failure_threshold.unwrap_or(d.failure_threshold),
    }))
}

impl ServiceFile {
    pub fn parse(text: &str, origin: &str) -> Result<ServiceFile> {
        crate::jobfile::parse_toml(text, origin)
    }

    /// The spec, with `command` and `args` that start with `./` or `../` made absolute
    /// against `base` (the service file's directory): replicas run in their own working
    /// directories, so a path relative to the file would not resolve there.
    pub fn into_spec_at(self, base: Option<&std::path::Path>) -> Result<ServiceSpec> {
        let rel = |s: String| -> String {
            match base {
                Some(b) if s.starts_with("./") || s.starts_with("../") => {
                    let p = b.join(&s);
                    std::fs::canonicalize(&p)
                        .unwrap_or(p)
                        .to_string_lossy()
                        .into_owned()
                }
                _ => s,
            }
        };
        let mut me = self;
        // With a shipped working directory, paths are the folder's own.
        if me.workdir.is_none() {
            me.command = me.command.map(rel);
            me.args = me.args.into_iter().map(rel).collect();
        }
        me.into_spec()
    }

    pub fn into_spec(self) -> Result<ServiceSpec> {
        let name = self.name.ok_or_else(|| anyhow!("name: missing"))?;
        let command = match (self.command, &self.image) {
            (Some(c), _) => c,
            (None, Some(_)) => String::new(),
            (None, None) => bail!("command: missing (it may be left out only with an image)"),
        };
        // Resources read exactly as a job file reads them.
        let resources = JobFile::resources_of(&self.resources)?;
        let mut s = ServiceSpec::simple(&name, &command, &[]);
        s.args = self.args;
        s.env = self.env;
        s.resources = resources;
        s.protocol = self.protocol;
        if let Some(p) = probe(self.readiness, "readiness")? {
            s.readiness = p;
        }
        s.liveness = probe(self.liveness, "liveness")?;
        s.min_replicas = self.min_replicas.unwrap_or(s.min_replicas);
        s.max_replicas = self.max_replicas.unwrap_or(s.max_replicas);
        s.target_concurrency = self.target_concurrency.unwrap_or(s.target_concurrency);
        s.scale_to_zero_after_ms = dur(&self.scale_to_zero_after, "scale_to_zero_after")?
            .unwrap_or(s.scale_to_zero_after_ms);
        s.scale_down_delay_ms =
            dur(&self.scale_down_delay, "scale_down_delay")?.unwrap_or(s.scale_down_delay_ms);
        s.cold_start_timeout_ms =
            dur(&self.cold_start_timeout, "cold_start_timeout")?.unwrap_or(s.cold_start_timeout_ms);
        s.public = self.public;
        s.rate_limit_rps = self.rate_limit_rps;
        s.max_surge = self.max_surge.unwrap_or(s.max_surge);
        s.max_unavailable = self.max_unavailable.unwrap_or(s.max_unavailable);
        s.progress_deadline_ms =
            dur(&self.progress_deadline, "progress_deadline")?.unwrap_or(s.progress_deadline_ms);
        s.on_stuck = self.on_stuck.unwrap_or(s.on_stuck);
        s.kill_grace_ms = dur(&self.kill_grace, "kill_grace")?;
        s.drain_timeout_ms =
            dur(&self.drain_timeout, "drain_timeout")?.unwrap_or(s.drain_timeout_ms);
        s.response_timeout_ms =
            dur(&self.response_timeout, "response_timeout")?.unwrap_or(s.response_timeout_ms);
        s.image = self.image;
        s.secret_env = self.secret_env;
        s.isolation = self.isolation;
        s.disk_bytes = self
            .disk
            .map(|d| {
                caravel_core::quantity::parse_bytes(&d.text()).map_err(|e| anyhow!("disk: {e}"))
            })
            .transpose()?;
        // The server validates again; checking here names the field before any round trip.
        s.validate().map_err(|e| anyhow!("{e}"))?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file() {
        let f = ServiceFile::parse(
            r#"
name = "embed"
command = "python3"
args = ["serve.py"]
min_replicas = 0
max_replicas = 4
target_concurrency = 8
scale_to_zero_after = "2m"
scale_down_delay = "30s"
public = true
rate_limit_rps = 100
[resources]
cpu = "500m"
memory = "512Mi"
[readiness]
path = "/healthz"
period = "500ms"
[liveness]
path = "/livez"
failure_threshold = 5
"#,
            "svc.toml",
        )
        .unwrap();
        let s = f.into_spec().unwrap();
        assert_eq!(s.max_replicas, 4);
        assert_eq!(s.scale_to_zero_after_ms, 120_000);
        assert_eq!(s.scale_down_delay_ms, 30_000);
        assert_eq!(s.readiness.path, "/healthz");
        assert_eq!(s.readiness.period_ms, 500);
        assert_eq!(s.liveness.as_ref().unwrap().failure_threshold, 5);
        assert_eq!(s.resources.cpu_milli, 500);
        assert_eq!(s.rate_limit_rps, Some(100));
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("serve.py"), "").unwrap();
        let f = ServiceFile::parse(
            "name = \"a\"\ncommand = \"python3\"\nargs = [\"./serve.py\", \"--x\", \"/abs\"]\n",
            "s",
        )
        .unwrap();
        let s = f.into_spec_at(Some(d.path())).unwrap();
        let want = std::fs::canonicalize(d.path().join("serve.py")).unwrap();
        assert_eq!(
            s.args,
            vec![
                want.to_string_lossy().into_owned(),
                "--x".into(),
                "/abs".into()
            ]
        );
        assert_eq!(s.command, "python3");
    }

    #[test]
    fn errors_name_the_field_and_line() {
        let e = ServiceFile::parse("name = \"a\"\ncommand = \"x\"\nreplicas = 3\n", "svc.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("svc.toml:3: unknown field `replicas`"), "{e}");
        let bad = |t: &str| {
            ServiceFile::parse(t, "s")
                .unwrap()
                .into_spec()
                .unwrap_err()
                .to_string()
        };
        assert_eq!(bad("command = \"x\"\n"), "name: missing");
        assert!(
            bad("name = \"a\"\ncommand = \"x\"\nscale_down_delay = \"soon\"\n")
                .starts_with("scale_down_delay:")
        );
        assert!(
            bad("name = \"a\"\ncommand = \"x\"\nmin_replicas = 5\nmax_replicas = 2\n")
                .starts_with("min_replicas:")
        );
        assert!(
            bad("name = \"a\"\ncommand = \"x\"\n[readiness]\npath = \"healthz\"\n")
                .starts_with("readiness.path:")
        );
        // A gRPC health check on an HTTP service, and a protocol that does not exist.
        assert!(
            bad("name = \"a\"\ncommand = \"x\"\n[readiness]\ngrpc = \"\"\n")
                .starts_with("readiness.grpc:")
        );
        let e = ServiceFile::parse("name = \"a\"\ncommand = \"x\"\nprotocol = \"h3\"\n", "s")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("s:3:") && e.contains("unknown variant `h3`"),
            "{e}"
        );
    }

    #[test]
    fn a_grpc_service_file() {
        let s = ServiceFile::parse(
            "name = \"g\"\ncommand = \"x\"\nprotocol = \"grpc\"\nresponse_timeout = \"30s\"\n[readiness]\ngrpc = \"my.Svc\"\nperiod = \"2s\"\n",
            "s",
        )
        .unwrap()
        .into_spec()
        .unwrap();
        assert_eq!(s.protocol, caravel_core::Protocol::Grpc);
        assert_eq!(s.readiness.grpc.as_deref(), Some("my.Svc"));
        assert_eq!(s.drain_timeout_ms, 300_000);
        assert_eq!(s.response_timeout_ms, 30_000);
        assert_eq!(s.readiness.period_ms, 2000);
    }
}
