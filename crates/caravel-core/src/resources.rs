//! Resources: CPU in millicores, memory in bytes, accelerators by model with per-device
//! indices. A task asks for a `TaskResources`; a node offers a `Capacity`; sums of held
//! resources (for quotas and metering) are `ResourceSum`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::quantity::{MAX_CPU_MILLI, MAX_GPUS, MAX_MEMORY_BYTES};
use crate::ValidationError;

/// One accelerator on a node: its index as the driver numbers it, and its model name
/// normalised to a short form ("H100", "A100", "T4").
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub index: u32,
    pub model: String,
}

/// What a node offers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    #[serde(default)]
    pub devices: Vec<Device>,
    /// How isolated the node keeps its tasks (what its agent found it can do).
    #[serde(default)]
    pub isolation: crate::IsolationLevel,
    /// The node runs tasks in OCI images (its agent has an OCI runtime).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub images: bool,
}

impl Capacity {
    pub fn gpu_count(&self, model: &str) -> u32 {
        self.devices.iter().filter(|d| d.model == model).count() as u32
    }

    pub fn gpu_models(&self) -> BTreeMap<String, u32> {
        let mut m = BTreeMap::new();
        for d in &self.devices {
            *m.entry(d.model.clone()).or_insert(0) += 1;
        }
        m
    }
}

/// A request for accelerators: `count` whole devices, or a fraction (`milli`, 250 = a
/// quarter) of one device, of `model` or any of `any_of`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuRequest {
    pub model: String,
    /// Other models the task accepts, in order of preference after `model`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub any_of: Vec<String>,
    #[serde(default = "one_gpu")]
    pub count: u32,
    /// A fraction of one device in thousandths (1..=999); `count` must then be 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub milli: Option<u32>,
}

fn one_gpu() -> u32 {
    1
}

impl GpuRequest {
    pub fn whole(model: &str, count: u32) -> GpuRequest {
        GpuRequest {
            model: model.to_string(),
            any_of: vec![],
            count,
            milli: None,
        }
    }

    /// Every acceptable model, preferred first, without repeats.
    pub fn models(&self) -> Vec<&str> {
        self.models_iter().collect()
    }

    /// `models` without collecting them: schedulers ask this for every queued job in
    /// every cycle, so it must not allocate.
    pub fn models_iter(&self) -> impl Iterator<Item = &str> + Clone + '_ {
        std::iter::once(self.model.as_str()).chain(
            self.any_of
                .iter()
                .enumerate()
                .filter(|(i, m)| **m != self.model && !self.any_of[..*i].contains(m))
                .map(|(_, m)| m.as_str()),
        )
    }

    /// Thousandths of a device one task holds: 250 for a quarter, 2000 for two devices.
    pub fn milli_total(&self) -> u64 {
        self.milli
            .map(u64::from)
            .unwrap_or(self.count as u64 * 1000)
    }
}

/// Parses `H100:2`, `H100:0.25` (or `H100:250m`), `H100|A100:1` into a request.
pub fn parse_gpu_request(s: &str) -> Result<GpuRequest, String> {
    let (models, amount) = s
        .trim()
        .rsplit_once(':')
        .ok_or_else(|| format!("`{s}` is not MODEL:COUNT (e.g. H100:2, H100:0.25, H100|A100:1)"))?;
    let models: Vec<String> = models.split('|').map(|m| m.trim().to_string()).collect();
    for m in &models {
        validate_model(m)?;
    }
    let amount = amount.trim();
    let bad = || format!("`{amount}` is not an amount of GPU (2, 0.25, 250m)");
    let milli: u64 = if let Some(m) = amount.strip_suffix('m') {
        m.parse().map_err(|_| bad())?
    } else if amount.contains('.') {
        let v: f64 = amount.parse().map_err(|_| bad())?;
        if !(v.is_finite() && v > 0.0 && v <= 4096.0) {
            return Err(bad());
        }
        (v * 1000.0).round() as u64
    } else {
        amount.parse::<u64>().map_err(|_| bad())? * 1000
    };
    let (count, frac) = match milli {
        0 => return Err("a GPU request needs at least one device or a fraction of one".into()),
        m if m % 1000 == 0 => ((m / 1000) as u32, None),
        m if m < 1000 => (1, Some(m as u32)),
        _ => {
            return Err(format!(
                "`{amount}`: a fraction must be less than one device"
            ))
        }
    };
    let mut it = models.into_iter();
    Ok(GpuRequest {
        model: it.next().unwrap_or_default(),
        any_of: it.collect(),
        count,
        milli: frac,
    })
}

/// What one task of a job asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskResources {
    #[serde(default = "default_cpu")]
    pub cpu_milli: u64,
    #[serde(default = "default_memory")]
    pub memory_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuRequest>,
    /// What the task needs of its node besides room: set by the server from the job's
    /// spec (`JobSpec::needs`), never written by users, so the scheduler's fit check and
    /// its memos by request shape see it.
    #[serde(skip)]
    pub needs: crate::NodeNeeds,
}

fn default_cpu() -> u64 {
    1000
}
fn default_memory() -> u64 {
    512 << 20
}

impl Default for TaskResources {
    fn default() -> Self {
        TaskResources {
            cpu_milli: default_cpu(),
            memory_bytes: default_memory(),
            gpu: None,
            needs: crate::NodeNeeds::default(),
        }
    }
}

impl TaskResources {
    pub fn validate(&self, prefix: &str) -> Result<(), ValidationError> {
        if self.cpu_milli == 0 {
            return Err(ValidationError::new(
                format!("{prefix}.cpu_milli"),
                "must be at least 1 (millicore)",
            ));
        }
        if self.cpu_milli > MAX_CPU_MILLI {
            return Err(ValidationError::new(
                format!("{prefix}.cpu_milli"),
                format!("{} is more than any machine has", self.cpu_milli),
            ));
        }
        if self.memory_bytes == 0 {
            return Err(ValidationError::new(
                format!("{prefix}.memory_bytes"),
                "must be at least 1 byte",
            ));
        }
        if self.memory_bytes > MAX_MEMORY_BYTES {
            return Err(ValidationError::new(
                format!("{prefix}.memory_bytes"),
                format!("{} is more memory than any machine has", self.memory_bytes),
            ));
        }
        if let Some(g) = &self.gpu {
            validate_model(&g.model)
                .map_err(|r| ValidationError::new(format!("{prefix}.gpu.model"), r))?;
            for m in &g.any_of {
                validate_model(m)
                    .map_err(|r| ValidationError::new(format!("{prefix}.gpu.any_of"), r))?;
            }
            if g.any_of.len() > 8 {
                return Err(ValidationError::new(
                    format!("{prefix}.gpu.any_of"),
                    "at most 8 models",
                ));
            }
            if let Some(m) = g.milli {
                if !(1..=999).contains(&m) {
                    return Err(ValidationError::new(
                        format!("{prefix}.gpu.milli"),
                        "must be 1 to 999 thousandths of one device (use count for whole devices)",
                    ));
                }
                if g.count != 1 {
                    return Err(ValidationError::new(
                        format!("{prefix}.gpu.count"),
                        "must be 1 with milli: a fractional request takes part of one device",
                    ));
                }
            }
            if g.count == 0 {
                return Err(ValidationError::new(
                    format!("{prefix}.gpu.count"),
                    "must be at least 1 (omit gpu for CPU-only tasks)",
                ));
            }
            if g.count > MAX_GPUS {
                return Err(ValidationError::new(
                    format!("{prefix}.gpu.count"),
                    format!("{} is more accelerators than any machine has", g.count),
                ));
            }
        }
        Ok(())
    }

    pub fn gpu_model(&self) -> Option<&str> {
        self.gpu.as_ref().map(|g| g.model.as_str())
    }

    pub fn gpu_count(&self) -> u32 {
        self.gpu.as_ref().map(|g| g.count).unwrap_or(0)
    }

    /// Thousandths of a device one task holds (0 without a GPU).
    pub fn gpu_milli(&self) -> u64 {
        self.gpu.as_ref().map(|g| g.milli_total()).unwrap_or(0)
    }
}

pub fn validate_model(m: &str) -> Result<(), String> {
    if m.is_empty() || m.len() > 32 {
        return Err("must be 1 to 32 characters".into());
    }
    if !m
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(format!(
            "`{m}` may only contain letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// A sum of held resources, used for quota accounting and totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResourceSum {
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    /// Thousandths of a device, per model (a quarter GPU is 250).
    #[serde(default)]
    pub gpu_milli: BTreeMap<String, u64>,
}

impl ResourceSum {
    /// Adds `times` tasks of `r`, GPUs counted against its preferred model.
    pub fn add_task(&mut self, r: &TaskResources, times: u64) {
        let m = r.gpu.as_ref().map(|g| g.model.clone());
        self.add_task_on(r, m.as_deref(), times);
    }

    /// Adds `times` tasks of `r` whose GPUs are of `model` (the one placement chose).
    pub fn add_task_on(&mut self, r: &TaskResources, model: Option<&str>, times: u64) {
        self.cpu_milli += r.cpu_milli * times;
        self.memory_bytes += r.memory_bytes * times;
        if let (Some(g), Some(m)) = (&r.gpu, model) {
            *self.gpu_milli.entry(m.to_string()).or_insert(0) += g.milli_total() * times;
        }
    }

    pub fn sub_task(&mut self, r: &TaskResources, times: u64) {
        let m = r.gpu.as_ref().map(|g| g.model.clone());
        self.sub_task_on(r, m.as_deref(), times);
    }

    pub fn sub_task_on(&mut self, r: &TaskResources, model: Option<&str>, times: u64) {
        self.cpu_milli = self.cpu_milli.saturating_sub(r.cpu_milli * times);
        self.memory_bytes = self.memory_bytes.saturating_sub(r.memory_bytes * times);
        if let (Some(g), Some(m)) = (&r.gpu, model) {
            if let Some(v) = self.gpu_milli.get_mut(m) {
                *v = v.saturating_sub(g.milli_total() * times);
                if *v == 0 {
                    self.gpu_milli.remove(m);
                }
            }
        }
    }
}

/// Parses "H100:8,A100:2" into (model, count) pairs.
pub fn parse_gpu_list(s: &str) -> Result<Vec<(String, u32)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (m, c) = part
            .split_once(':')
            .ok_or_else(|| format!("`{part}` is not MODEL:COUNT (e.g. H100:8)"))?;
        validate_model(m.trim())?;
        let c: u32 = c
            .trim()
            .parse()
            .map_err(|_| format!("`{c}` in `{part}` is not a whole number of devices"))?;
        if c == 0 || c > MAX_GPUS {
            return Err(format!("`{part}`: count must be 1 to {MAX_GPUS}"));
        }
        out.push((m.trim().to_string(), c));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_requests_parse_whole_fractional_and_any_of() {
        assert_eq!(
            parse_gpu_request("H100:2").unwrap(),
            GpuRequest::whole("H100", 2)
        );
        let q = parse_gpu_request("H100:0.25").unwrap();
        assert_eq!((q.count, q.milli, q.milli_total()), (1, Some(250), 250));
        assert_eq!(parse_gpu_request("T4:500m").unwrap().milli, Some(500));
        let a = parse_gpu_request("H100|A100:1").unwrap();
        assert_eq!(a.models(), vec!["H100", "A100"]);
        let repeats = GpuRequest {
            any_of: vec!["A100".into(), "H100".into(), "A100".into(), "L4".into()],
            ..GpuRequest::whole("H100", 1)
        };
        assert_eq!(repeats.models(), vec!["H100", "A100", "L4"]);
        assert!(parse_gpu_request("H100:1.5").is_err());
        assert!(parse_gpu_request("H100:0").is_err());
        assert!(parse_gpu_request("H100").is_err());
        let mut r = TaskResources {
            gpu: Some(GpuRequest {
                milli: Some(1000),
                ..GpuRequest::whole("H100", 1)
            }),
            ..Default::default()
        };
        assert_eq!(
            r.validate("resources").unwrap_err().field,
            "resources.gpu.milli"
        );
        r.gpu = Some(GpuRequest {
            milli: Some(500),
            ..GpuRequest::whole("H100", 2)
        });
        assert_eq!(
            r.validate("resources").unwrap_err().field,
            "resources.gpu.count"
        );
    }

    #[test]
    fn gpu_list() {
        assert_eq!(
            parse_gpu_list("H100:8, A100:2").unwrap(),
            vec![("H100".to_string(), 8), ("A100".to_string(), 2)]
        );
        assert!(parse_gpu_list("H100").is_err());
        assert!(parse_gpu_list("H100:x").is_err());
        assert!(parse_gpu_list("H100:0").is_err());
        assert!(parse_gpu_list("H 100:1").is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let r = TaskResources {
            cpu_milli: 0,
            ..Default::default()
        };
        assert_eq!(
            r.validate("resources").unwrap_err().field,
            "resources.cpu_milli"
        );
        let r = TaskResources {
            gpu: Some(GpuRequest::whole("H100", 0)),
            ..Default::default()
        };
        assert_eq!(
            r.validate("resources").unwrap_err().field,
            "resources.gpu.count"
        );
    }

    #[test]
    fn sums() {
        let r = TaskResources {
            cpu_milli: 500,
            memory_bytes: 10,
            gpu: Some(GpuRequest::whole("T4", 2)),
            needs: Default::default(),
        };
        let mut s = ResourceSum::default();
        s.add_task(&r, 3);
        assert_eq!(s.cpu_milli, 1500);
        assert_eq!(s.gpu_milli["T4"], 6000);
        s.sub_task(&r, 3);
        assert_eq!(s, ResourceSum::default());
    }
}
