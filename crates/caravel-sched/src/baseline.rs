//! The extension point for research placement policies (`Config::baseline`): the
//! simulator puts published baselines (Random, DotProd, GpuClustering, GpuPacking,
//! BestFit, FGD as the FGD artefact scores them; `caravel_sim::baselines`) beside
//! Caravel's own policy through it. The production crate holds only the trait and what
//! a score may look at; no baseline ships in it, and the server never sets one.

use caravel_core::TaskResources;

use crate::fgd::WorkloadType;
use crate::NodeSnap;

/// A placement policy that scores every feasible node (as a Kubernetes score plugin
/// does); the scheduler keeps the best, the first in node order among equals unless
/// `uniform`.
pub trait Baseline: Send + Sync + std::fmt::Debug {
    /// The score of placing `q` on `n` (higher is better), and the devices it would use;
    /// `whole` are the lowest-numbered free devices that fit.
    fn score(
        &self,
        n: &NodeSnap,
        v: &View,
        q: &Req,
        types: &[WorkloadType],
        whole: &[u32],
    ) -> (i64, Vec<u32>);

    /// Every feasible node alike: a uniform pick among them (drawn from the scheduler's
    /// seeded generator, so runs repeat).
    fn uniform(&self) -> bool {
        false
    }

    /// Which GPU a share (one device, less than all of it) takes on the node chosen;
    /// `draw(n)` is a uniform draw in `0..n` from the scheduler's generator.
    fn share_device(&self, v: &View, q: &Req, draw: &mut dyn FnMut(u64) -> u64) -> ShareDevice;
}

/// `Baseline::share_device`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareDevice {
    /// The devices the score chose.
    Scored,
    Pick(u32),
    /// None fits (the placement fails).
    NoRoom,
}

/// What the artefact's scores look at: free CPU, per-GPU free thousandths, the model.
pub struct View {
    pub cpu_left: i64,
    pub gpu_left: Vec<(u32, i64)>,
}

impl View {
    pub fn of(n: &NodeSnap) -> View {
        View {
            cpu_left: n.capacity.cpu_milli.saturating_sub(n.used_cpu_milli) as i64,
            gpu_left: n
                .capacity
                .devices
                .iter()
                .map(|d| {
                    let f = if n.used_devices.contains(&d.index) {
                        0
                    } else {
                        1000 - n.shared.get(&d.index).copied().unwrap_or(0) as i64
                    };
                    (d.index, f)
                })
                .collect(),
        }
    }

    pub fn gpu_left_total(&self) -> i64 {
        self.gpu_left.iter().map(|g| g.1).sum()
    }
}

/// A task's request as the artefact counts it: CPU, GPUs, thousandths per GPU.
pub struct Req {
    pub cpu: i64,
    pub count: i64,
    pub milli: i64,
}

impl Req {
    pub fn of(r: &TaskResources) -> Req {
        match &r.gpu {
            None => Req {
                cpu: r.cpu_milli as i64,
                count: 0,
                milli: 0,
            },
            Some(g) => match g.milli {
                Some(m) => Req {
                    cpu: r.cpu_milli as i64,
                    count: 1,
                    milli: m as i64,
                },
                None => Req {
                    cpu: r.cpu_milli as i64,
                    count: g.count as i64,
                    milli: 1000,
                },
            },
        }
    }

    pub fn total_gpu(&self) -> i64 {
        self.count * self.milli
    }

    /// The artefact's affinity tag: none, share, or the number of whole GPUs.
    pub fn shape(&self) -> Option<u32> {
        match (self.count, self.milli) {
            (0, _) => None,
            (_, m) if m < 1000 => Some(0),
            (c, _) => Some(c as u32),
        }
    }
}

/// The shape key `NodeSnap::gpu_shapes` counts a task under (see `Req::shape`).
pub(crate) fn shape_of(r: &TaskResources) -> Option<u32> {
    Req::of(r).shape()
}
