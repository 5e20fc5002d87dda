//! Fault injection at commit boundaries, for the crash-window tests: with
//! `CARAVEL_FAULT_KILL=POINT:N` in its environment the server SIGKILLs itself right after
//! the N-th commit of `POINT` is durable and before anyone hears of it (the reply to the
//! request, or, for `schedule`, the agents' next sync). Points: `submit`, `schedule`,
//! `start` (an agent's report of a run started), `exit` (of a run ended), `cancel`.
//!
//! Read once; unset (always, outside tests) it costs one relaxed load per boundary.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The commit boundaries a response crossed (a response extension, read after the settle).
#[derive(Debug, Clone, Default)]
pub struct Points(pub Vec<&'static str>);

struct Plan {
    point: String,
    nth: u64,
    seen: AtomicU64,
}

fn plan() -> Option<&'static Plan> {
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let v = std::env::var("CARAVEL_FAULT_KILL").ok()?;
        let (point, n) = v.split_once(':').unwrap_or((&v, "1"));
        Some(Plan {
            point: point.to_string(),
            nth: n.parse().unwrap_or(1).max(1),
            seen: AtomicU64::new(0),
        })
    })
    .as_ref()
}

/// Whether any point is armed (to skip work done only for the hook).
pub fn armed() -> bool {
    plan().is_some()
}

/// A commit of `point` is durable and unanswered: die here if this is the planned one.
pub fn after_commit(point: &str) {
    let Some(p) = plan() else { return };
    if p.point != point {
        return;
    }
    if p.seen.fetch_add(1, Ordering::SeqCst) + 1 == p.nth {
        eprintln!(
            "fault injection: killed after the commit of {point} #{}",
            p.nth
        );
        // SIGKILL, as an operator's kill -9.
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}
