//! Resources: CPU in millicores, memory in bytes, accelerators by model with per-device
//! indices. A task asks for a `TaskResources`; a node offers a `Capacity`; sums of held
//! resources (for quotas and metering) are `ResourceSum`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::quantity::{MAX_CPU_MILLI, MAX_GPUS, MAX_MEMORY_BYTES};
use crate::ValidationError;

/// One accelerator on a node: its index as the driver numbers it, and its model name
/// normalised to a short form ("H100", "A100", "T4").
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub index: u32,
    pub model: String,
}

/// What a node offers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    #[serde(default)]
    pub devices: Vec<Device>,
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

/// A request for whole accelerators of one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuRequest {
    pub model: String,
    pub count: u32,
}

/// What one task of a job asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskResources {
    #[serde(default = "default_cpu")]
    pub cpu_milli: u64,
    #[serde(default = "default_memory")]
    pub memory_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuRequest>,
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceSum {
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    #[serde(default)]
    pub gpus: BTreeMap<String, u32>,
}

impl ResourceSum {
    pub fn add_task(&mut self, r: &TaskResources, times: u64) {
        self.cpu_milli += r.cpu_milli * times;
        self.memory_bytes += r.memory_bytes * times;
        if let Some(g) = &r.gpu {
            *self.gpus.entry(g.model.clone()).or_insert(0) += g.count * times as u32;
        }
    }

    pub fn sub_task(&mut self, r: &TaskResources, times: u64) {
        self.cpu_milli = self.cpu_milli.saturating_sub(r.cpu_milli * times);
        self.memory_bytes = self.memory_bytes.saturating_sub(r.memory_bytes * times);
        if let Some(g) = &r.gpu {
            if let Some(v) = self.gpus.get_mut(&g.model) {
                *v = v.saturating_sub(g.count * times as u32);
                if *v == 0 {
                    self.gpus.remove(&g.model);
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
            gpu: Some(GpuRequest {
                model: "H100".into(),
                count: 0,
            }),
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
            gpu: Some(GpuRequest {
                model: "T4".into(),
                count: 2,
            }),
        };
        let mut s = ResourceSum::default();
        s.add_task(&r, 3);
        assert_eq!(s.cpu_milli, 1500);
        assert_eq!(s.gpus["T4"], 6);
        s.sub_task(&r, 3);
        assert_eq!(s, ResourceSum::default());
    }
}
