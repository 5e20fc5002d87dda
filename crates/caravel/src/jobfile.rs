//! The job file that `caravel submit -f job.toml` reads: the JSON API's `JobSpec` with
//! human quantities ("500m", "4Gi", "2h", "H100:1").

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use caravel_core::quantity::{parse_bytes, parse_cpu_milli, parse_duration_ms};
use caravel_core::{GpuRequest, JobSpec, Priority, TaskResources};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum NumOrStr {
    Num(f64),
    Str(String),
}

impl NumOrStr {
    pub fn text(&self) -> String {
        match self {
            NumOrStr::Num(n) => n.to_string(),
            NumOrStr::Str(s) => s.clone(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileResources {
    pub cpu: Option<NumOrStr>,
    pub memory: Option<NumOrStr>,
    /// "H100:1"
    pub gpu: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub name: Option<String>,
    /// N, or "MIN:MAX" for an elastic gang.
    pub tasks: Option<NumOrStr>,
    pub command: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: FileResources,
    pub priority: Option<Priority>,
    pub max_runtime: Option<String>,
    pub hang_timeout: Option<String>,
    pub max_retries: Option<u32>,
    #[serde(default)]
    pub gang: bool,
    pub topology: Option<caravel_core::TopologyLevel>,
    pub kill_grace: Option<String>,
    pub min_runtime: Option<String>,
    #[serde(default)]
    pub fence: bool,
    /// An OCI image to run in.
    pub image: Option<String>,
    /// A folder shipped as every task's working directory, relative to the file.
    pub workdir: Option<String>,
    /// Environment values no view shows.
    #[serde(default)]
    pub secret_env: BTreeMap<String, String>,
    /// The least isolation the tasks accept: none, sandboxed, restricted.
    pub isolation: Option<caravel_core::IsolationLevel>,
    /// Ephemeral disk per task: 20Gi.
    pub disk: Option<NumOrStr>,
}

/// `H100:2`, `H100:0.25`, `H100|A100:1`.
pub fn gpu_request(s: &str, field: &str) -> Result<GpuRequest> {
    caravel_core::parse_gpu_request(s).map_err(|e| anyhow!("{field}: {e}"))
}

/// Reads a TOML file's text; an error is one line, `file:line: reason`, as compilers
/// print it.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        match line {
            Some(l) => anyhow!("{origin}:{l}: {}", e.message().trim()),
            None => anyhow!("{origin}: {}", e.message().trim()),
        }
    })
}

impl JobFile {
    pub fn parse(text: &str, origin: &str) -> Result<JobFile> {
        parse_toml(text, origin)
    }

    pub fn resources_of(f: &FileResources) -> Result<TaskResources> {
        let mut r = TaskResources::default();
        if let Some(c) = &f.cpu {
            r.cpu_milli = parse_cpu_milli(&c.text()).map_err(|e| anyhow!("resources.cpu: {e}"))?;
        }
        if let Some(m) = &f.memory {
            r.memory_bytes =
                parse_bytes(&m.text()).map_err(|e| anyhow!("resources.memory: {e}"))?;
        }
        if let Some(g) = &f.gpu {
            r.gpu = Some(gpu_request(g, "resources.gpu")?);
        }
        Ok(r)
    }

    pub fn into_spec(self) -> Result<JobSpec> {
        let r = Self::resources_of(&self.resources)?;
        // With an image, no command runs the image's own.
        let command = match (self.command, &self.image) {
            (Some(c), _) => c,
            (None, Some(_)) => String::new(),
            (None, None) => bail!("command: missing (it may be left out only with an image)"),
        };
        let tasks = match &self.tasks {
            None => (None, 1),
            Some(NumOrStr::Num(n)) if n.fract() == 0.0 && *n >= 0.0 && *n <= u32::MAX as f64 => {
                (None, *n as u32)
            }
            Some(t) => crate::task_count(&t.text()).map_err(|e| anyhow!("tasks: {e}"))?,
        };
        Ok(JobSpec {
            image: self.image,
            workdir: None,
            secret_env: self.secret_env,
            isolation: self.isolation,
            disk_bytes: self
                .disk
                .map(|d| parse_bytes(&d.text()).map_err(|e| anyhow!("disk: {e}")))
                .transpose()?,
            name: self.name,
            tasks: tasks.1,
            min_tasks: tasks.0,
            command,
            args: self.args,
            env: self.env,
            resources: r,
            priority: self.priority.unwrap_or_default(),
            max_runtime_ms: self
                .max_runtime
                .map(|d| parse_duration_ms(&d).map_err(|e| anyhow!("max_runtime: {e}")))
                .transpose()?,
            hang_timeout_ms: self
                .hang_timeout
                .map(|d| parse_duration_ms(&d).map_err(|e| anyhow!("hang_timeout: {e}")))
                .transpose()?,
            max_retries: self.max_retries.unwrap_or(0),
            gang: self.gang,
            topology: self.topology,
            min_runtime_ms: self
                .min_runtime
                .map(|d| parse_duration_ms(&d).map_err(|e| anyhow!("min_runtime: {e}")))
                .transpose()?,
            kill_grace_ms: self
                .kill_grace
                .map(|d| parse_duration_ms(&d).map_err(|e| anyhow!("kill_grace: {e}")))
                .transpose()?,
            fence: self.fence,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file() {
        let f = JobFile::parse(
            r#"
name = "train"
tasks = 4
command = "python"
args = ["train.py"]
gang = true
fence = true
priority = "online"
max_runtime = "2h"
max_retries = 2
[env]
LR = "0.1"
[resources]
cpu = "500m"
memory = "4Gi"
gpu = "H100:1"
"#,
            "job.toml",
        )
        .unwrap();
        let s = f.into_spec().unwrap();
        assert_eq!(s.tasks, 4);
        assert_eq!(s.resources.cpu_milli, 500);
        assert_eq!(s.resources.memory_bytes, 4 << 30);
        assert_eq!(s.resources.gpu.unwrap().model, "H100");
        assert_eq!(s.max_runtime_ms, Some(7_200_000));
        assert_eq!(s.priority, Priority::Online);
        assert!(s.fence && s.gang);
    }

    #[test]
    fn tasks_may_be_a_range_for_an_elastic_gang() {
        let spec = |t: &str| {
            JobFile::parse(&format!("command = \"x\"\ngang = true\ntasks = {t}\n"), "j")
                .unwrap()
                .into_spec()
        };
        let s = spec("\"2:4\"").unwrap();
        assert_eq!((s.min_tasks, s.tasks), (Some(2), 4));
        let s = spec("3").unwrap();
        assert_eq!((s.min_tasks, s.tasks), (None, 3));
        for bad in ["\"4:2\"", "\"0:2\"", "\"a:b\"", "2.5"] {
            let e = spec(bad).unwrap_err().to_string();
            assert!(e.starts_with("tasks: "), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_name_the_field_and_line() {
        let e = JobFile::parse("command = \"x\"\ngpus = 3\n", "job.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("job.toml:2: unknown field `gpus`"), "{e}");
        let e = JobFile::parse("command = \"x\"\n[resources]\ncpu = \"lots\"\n", "j")
            .unwrap()
            .into_spec()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("resources.cpu:"), "{e}");
        let e = JobFile::parse("tasks = 2\n", "j")
            .unwrap()
            .into_spec()
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "command: missing (it may be left out only with an image)"
        );
        let s = JobFile::parse("image = \"busybox\"\nargs = [\"-x\"]\n", "j")
            .unwrap()
            .into_spec()
            .unwrap();
        assert_eq!((s.command.as_str(), s.args.len()), ("", 1));
    }
}
