//! Weighted dominant-resource fairness (Ghodsi et al., NSDI'11) with usage decay.
//!
//! A tenant's share is its dominant share — the largest fraction of any one pool resource
//! (CPU, memory, each accelerator model) that it holds — over its weight. Recent history
//! counts too: an exponential moving average of what the tenant held, with a configurable
//! half-life, is added to what it holds now, so a tenant that used less recently goes first.
//! Time only enters as an explicit `dt_ms` argument: no clock here.

use std::collections::BTreeMap;

use caravel_core::ResourceSum;

/// Pool totals the shares are fractions of (GPUs in thousandths of a device).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolTotals {
    pub cpu_milli: f64,
    pub memory_bytes: f64,
    pub gpus: BTreeMap<String, f64>,
}

/// Exponentially decayed average of what a tenant held (GPUs in thousandths).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageEma {
    pub cpu_milli: f64,
    pub memory_bytes: f64,
    pub gpus: BTreeMap<String, f64>,
}

impl UsageEma {
    /// Moves the average toward `held` over `dt_ms` of holding it.
    pub fn advance(&mut self, held: &ResourceSum, dt_ms: u64, half_life_ms: u64) {
        if dt_ms == 0 {
            return;
        }
        let keep = if half_life_ms == 0 {
            0.0
        } else {
            0.5f64.powf(dt_ms as f64 / half_life_ms as f64)
        };
        let mix = |old: f64, now: f64| old * keep + now * (1.0 - keep);
        self.cpu_milli = mix(self.cpu_milli, held.cpu_milli as f64);
        self.memory_bytes = mix(self.memory_bytes, held.memory_bytes as f64);
        let models: Vec<String> = self
            .gpus
            .keys()
            .chain(held.gpu_milli.keys())
            .cloned()
            .collect();
        for m in models {
            let now = held.gpu_milli.get(&m).copied().unwrap_or(0) as f64;
            let old = self.gpus.get(&m).copied().unwrap_or(0.0);
            let v = mix(old, now);
            if v < 1e-9 {
                self.gpus.remove(&m);
            } else {
                self.gpus.insert(m, v);
            }
        }
    }
}

fn frac(x: f64, total: f64) -> f64 {
    if total <= 0.0 {
        0.0
    } else {
        x / total
    }
}

/// Weighted dominant share of (what is held now + recent history).
pub fn dominant_share(
    held: &ResourceSum,
    history: &UsageEma,
    pool: &PoolTotals,
    weight: f64,
) -> f64 {
    let mut s = frac(held.cpu_milli as f64 + history.cpu_milli, pool.cpu_milli).max(frac(
        held.memory_bytes as f64 + history.memory_bytes,
        pool.memory_bytes,
    ));
    for (m, total) in &pool.gpus {
        let h = held.gpu_milli.get(m).copied().unwrap_or(0) as f64
            + history.gpus.get(m).copied().unwrap_or(0.0);
        s = s.max(frac(h, *total));
    }
    s / if weight > 0.0 { weight } else { 1.0 }
}

/// A share as an integer sort key (parts per billion), identical on every platform.
pub fn share_key(share: f64) -> u64 {
    (share * 1e9).round().clamp(0.0, u64::MAX as f64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_halves_per_half_life() {
        let mut e = UsageEma {
            cpu_milli: 1000.0,
            ..Default::default()
        };
        e.advance(&ResourceSum::default(), 60_000, 60_000);
        assert!((e.cpu_milli - 500.0).abs() < 1e-6);
        let held = ResourceSum {
            cpu_milli: 2000,
            ..Default::default()
        };
        for _ in 0..100 {
            e.advance(&held, 60_000, 60_000);
        }
        assert!(
            (e.cpu_milli - 2000.0).abs() < 1e-3,
            "converges to what is held"
        );
    }

    #[test]
    fn dominant_resource_and_weight() {
        let pool = PoolTotals {
            cpu_milli: 9000.0,
            memory_bytes: 18.0,
            gpus: BTreeMap::new(),
        };
        let held = ResourceSum {
            cpu_milli: 3000,
            memory_bytes: 12,
            gpu_milli: BTreeMap::new(),
        };
        let s = dominant_share(&held, &UsageEma::default(), &pool, 1.0);
        assert!((s - 12.0 / 18.0).abs() < 1e-9, "memory dominates");
        let s2 = dominant_share(&held, &UsageEma::default(), &pool, 2.0);
        assert!((s2 - s / 2.0).abs() < 1e-9);
    }
}
