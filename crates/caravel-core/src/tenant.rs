//! Tenants and their quotas. In this version a quota is a hard cap on what a tenant's
//! running tasks may hold at once; an absent limit means unlimited.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::quantity::{parse_bytes, parse_cpu_milli};
use crate::resources::{validate_model, ResourceSum, TaskResources};
use crate::{Millis, TenantId};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_milli: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Per accelerator model. A model not listed is unlimited.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gpus: BTreeMap<String, u32>,
    /// Bytes of checkpoints and task output the control plane keeps for the tenant. A cap
    /// only: nothing is guaranteed storage, and the scheduler does not look at it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_bytes: Option<u64>,
}

/// Why a quota refuses: the resource, what is in use, the limit and what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaExceeded {
    pub resource: String,
    pub in_use: u64,
    pub limit: u64,
    pub asked: u64,
}

impl Quota {
    /// Parses "cpu=8,memory=32Gi,gpu/H100=8,storage=100Gi".
    pub fn parse(s: &str) -> Result<Quota, String> {
        let mut q = Quota::default();
        let mut seen = std::collections::BTreeSet::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                format!("`{part}` is not KEY=VALUE (cpu=8, memory=32Gi, gpu/H100=8)")
            })?;
            let (k, v) = (k.trim(), v.trim());
            // `cpu=1,cpu=2` is a typo, not "the last one wins".
            let key = if k == "mem" { "memory" } else { k };
            if !seen.insert(key.to_string()) {
                return Err(format!("{key} is given twice"));
            }
            match k {
                "cpu" => q.cpu_milli = Some(parse_cpu_milli(v)?),
                "memory" | "mem" => q.memory_bytes = Some(parse_bytes(v)?),
                "storage" => q.storage_bytes = Some(parse_bytes(v)?),
                _ => {
                    let model = k.strip_prefix("gpu/").ok_or_else(|| {
                        format!("unknown quota key `{k}` (use cpu, memory, storage or gpu/MODEL)")
                    })?;
                    validate_model(model)?;
                    let n: u32 = v
                        .parse()
                        .map_err(|_| format!("`{v}` for {k} is not a whole number of devices"))?;
                    q.gpus.insert(model.to_string(), n);
                }
            }
        }
        Ok(q)
    }

    /// Checks whether `used` plus `times` tasks of `req` stays within the quota.
    pub fn check(
        &self,
        used: &ResourceSum,
        req: &TaskResources,
        times: u64,
    ) -> Result<(), QuotaExceeded> {
        self.check_cpu_memory(used, req, times)?;
        if let Some(g) = &req.gpu {
            return self.check_gpu(used, &g.model, g.milli_total() * times);
        }
        Ok(())
    }

    fn check_cpu_memory(
        &self,
        used: &ResourceSum,
        req: &TaskResources,
        times: u64,
    ) -> Result<(), QuotaExceeded> {
        if let Some(lim) = self.cpu_milli {
            let asked = req.cpu_milli * times;
            if used.cpu_milli + asked > lim {
                return Err(QuotaExceeded {
                    resource: "cpu".into(),
                    in_use: used.cpu_milli,
                    limit: lim,
                    asked,
                });
            }
        }
        if let Some(lim) = self.memory_bytes {
            let asked = req.memory_bytes * times;
            if used.memory_bytes + asked > lim {
                return Err(QuotaExceeded {
                    resource: "memory".into(),
                    in_use: used.memory_bytes,
                    limit: lim,
                    asked,
                });
            }
        }
        Ok(())
    }
}

impl Quota {
    /// Checks `asked` thousandths of `model` devices against the per-model limit.
    pub fn check_gpu(
        &self,
        used: &ResourceSum,
        model: &str,
        asked: u64,
    ) -> Result<(), QuotaExceeded> {
        if let Some(&lim) = self.gpus.get(model) {
            let in_use = used.gpu_milli.get(model).copied().unwrap_or(0);
            if in_use + asked > lim as u64 * 1000 {
                return Err(QuotaExceeded {
                    resource: format!("gpu/{model}"),
                    in_use,
                    limit: lim as u64 * 1000,
                    asked,
                });
            }
        }
        Ok(())
    }

    /// Like `check`, with the tasks' GPUs on `model` (one of the models they accept).
    pub fn check_on(
        &self,
        used: &ResourceSum,
        req: &TaskResources,
        model: Option<&str>,
        times: u64,
    ) -> Result<(), QuotaExceeded> {
        self.check_cpu_memory(used, req, times)?;
        match (&req.gpu, model) {
            (Some(g), Some(m)) => self.check_gpu(used, m, g.milli_total() * times),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: u64| match self.resource.as_str() {
            "cpu" => crate::quantity::format_cpu(v),
            "memory" => crate::quantity::format_bytes(v),
            // GPUs are counted in thousandths of a device.
            _ if v.is_multiple_of(1000) => (v / 1000).to_string(),
            _ => format!("{}", v as f64 / 1000.0),
        };
        write!(
            f,
            "quota: {} {} of {} in use, {} more asked",
            self.resource,
            show(self.in_use),
            show(self.limit),
            show(self.asked)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub weight: f64,
    /// The most the tenant may hold at once, borrowing included.
    pub quota: Quota,
    /// What the tenant is guaranteed: work within it is admitted first and reclaims
    /// capacity other tenants borrowed.
    #[serde(default)]
    pub guarantee: Quota,
    pub created_ms: Millis,
    /// Credentials for OCI registries, by registry host (`caravel registry login`): given
    /// to agents with the assignments of the tenant's jobs whose images are there, never
    /// shown by any view.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub registries: BTreeMap<String, RegistryCredential>,
}

/// A user name and password (or token) for one OCI registry.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegistryCredential {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RegistryCredential({}, <password>)", self.username)
    }
}

pub fn validate_name(field: &str, s: &str) -> Result<(), crate::ValidationError> {
    if s.is_empty() || s.len() > 63 {
        return Err(crate::ValidationError::new(
            field,
            "must be 1 to 63 characters",
        ));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(crate::ValidationError::new(
            field,
            format!("`{s}` may only contain letters, digits, '-', '_' and '.'"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GpuRequest;

    #[test]
    fn parse_and_check() {
        let q = Quota::parse("cpu=4,memory=8Gi,gpu/H100=8").unwrap();
        assert_eq!(q.cpu_milli, Some(4000));
        assert_eq!(q.gpus["H100"], 8);
        let req = TaskResources {
            needs: Default::default(),
            cpu_milli: 1000,
            memory_bytes: 1 << 30,
            gpu: Some(GpuRequest::whole("H100", 8)),
        };
        let used = ResourceSum::default();
        assert!(q.check(&used, &req, 1).is_ok());
        let mut used2 = ResourceSum::default();
        used2.add_task(&req, 1);
        let e = q.check(&used2, &req, 1).unwrap_err();
        assert_eq!(e.resource, "gpu/H100");
        assert_eq!(e.to_string(), "quota: gpu/H100 8 of 8 in use, 8 more asked");
        assert!(Quota::parse("disk=4").is_err());
        let s = Quota::parse("storage=100Gi,cpu=2").unwrap();
        assert_eq!(
            (s.storage_bytes, s.cpu_milli),
            (Some(100 << 30), Some(2000))
        );
        assert!(Quota::parse("storage=lots").is_err());
        assert!(Quota::parse("storage=1Gi,storage=2Gi").is_err());
        assert!(Quota::parse("cpu").is_err());
        for twice in [
            "cpu=1,cpu=2",
            "memory=1Gi,mem=2Gi",
            "gpu/H100=1, gpu/H100=2",
        ] {
            let e = Quota::parse(twice).unwrap_err();
            assert!(e.contains("given twice"), "{twice}: {e}");
        }
        assert!(Quota::parse("gpu/H100=1,gpu/A100=2").is_ok());
    }
}
