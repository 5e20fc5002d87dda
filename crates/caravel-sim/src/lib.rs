//! Trace-driven simulation of the Caravel scheduler.
//!
//! Reads public cluster traces and replays them through the production `caravel-sched`
//! crate, unchanged, under a virtual clock: no simulator-only scheduling code paths. This
//! crate must never touch the network, read a wall clock inside an experiment, or depend on
//! the server.

#![forbid(unsafe_code)]

pub mod artefact;
pub mod baselines;
pub mod fgd;
pub mod openb;
pub mod replay;
pub mod replay_report;
pub mod report;
pub mod rng;
pub mod svg;
pub mod synth;
pub mod traces;

/// A malformed trace row: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct TraceError {
    pub file: String,
    pub line: usize,
    pub reason: String,
}
