//! Reservation searches: when could a job that cannot start now start, and on which
//! nodes, going by the max runtimes of what runs?
//!
//! With one reservation (EASY backfill, the default) the search sees the pool as the running
//! tasks will leave it. With several (`Config::reservations`), each later one is made
//! around the windows of those before it, as Slurm's conservative backfill plans every job
//! it tests: a node reserved for another job from `at` is still usable by a job that will
//! be gone by then (its max runtime known), and again once that job's own max runtime has
//! run out (`Reservation::until`). A node is never in two windows that overlap.

use std::collections::{BTreeMap, BTreeSet};

use caravel_core::{Millis, TaskResources, TopologyLevel};

use crate::{fit_greedily, JobReq, NodeSnap, Reservation, RunningTask, Scheduler};

/// The windows other reservations hold on their nodes, as the search for one job (of max
/// runtime `len`) sees them.
pub(crate) struct Windows {
    by_node: BTreeMap<usize, Vec<(Millis, Option<Millis>)>>,
    len: Option<Millis>,
    /// Times from `now` on at which a reserved node's usability may change, ascending.
    toggles: Vec<Millis>,
}

/// A max runtime as a time span (one too long for `Millis` is forever in practice).
pub(crate) fn span(max_runtime_ms: u64) -> Millis {
    Millis::try_from(max_runtime_ms).unwrap_or(Millis::MAX)
}

impl Windows {
    pub(crate) fn of(reservations: &[Reservation], len: Option<u64>, now: Millis) -> Windows {
        let len = len.map(span);
        let mut by_node: BTreeMap<usize, Vec<(Millis, Option<Millis>)>> = BTreeMap::new();
        let mut toggles = BTreeSet::new();
        for r in reservations {
            for &i in &r.nodes {
                by_node.entry(i).or_default().push((r.at, r.until));
            }
            // The first start from which the job would still run when the window opens,
            // and the window's close.
            if let Some(l) = len {
                toggles.insert(r.at.saturating_sub(l).saturating_add(1));
            }
            toggles.extend(r.until);
        }
        Windows {
            by_node,
            len,
            toggles: toggles.into_iter().filter(|&t| t >= now).collect(),
        }
    }

    /// Does another reservation hold node `i` at some time?
    pub(crate) fn blocked(&self, i: usize) -> bool {
        self.by_node.contains_key(&i)
    }

    /// May the job start on node `i` at `t`: gone before every window on it opens, or
    /// after it has closed?
    pub(crate) fn usable(&self, i: usize, t: Millis) -> bool {
        self.by_node.get(&i).is_none_or(|ws| {
            ws.iter().all(|&(at, until)| {
                self.len.is_some_and(|l| t.saturating_add(l) <= at) || until.is_some_and(|u| t >= u)
            })
        })
    }
}

/// The walk the reservation searches share: releases running tasks in end order on
/// scratch copies of their nodes and tracks which reserved nodes the job may use, stopping
/// at every end time and every time a reserved node's usability may change.
pub(crate) struct RoomWalk<'a> {
    s: &'a Scheduler,
    r: &'a TaskResources,
    w: Windows,
    /// The nodes a task has ended on so far, as the walk has them now.
    pub(crate) scratch: BTreeMap<usize, NodeSnap>,
    /// Reserved nodes the job may use at the current step.
    pub(crate) usable: BTreeSet<usize>,
    ends: std::iter::Peekable<Box<dyn Iterator<Item = (Millis, usize, &'a RunningTask)> + 'a>>,
    next_toggle: usize,
    first: bool,
}

impl<'a> RoomWalk<'a> {
    pub(crate) fn new(s: &'a Scheduler, job: &'a JobReq, now: Millis) -> RoomWalk<'a> {
        let ends: Box<dyn Iterator<Item = (Millis, usize, &'a RunningTask)> + 'a> =
            Box::new(s.ends_from(now));
        RoomWalk {
            s,
            r: &job.resources,
            w: Windows::of(&s.reservations, job.max_runtime_ms, now),
            scratch: BTreeMap::new(),
            usable: BTreeSet::new(),
            ends: ends.peekable(),
            next_toggle: 0,
            first: true,
        }
    }

    /// Nodes no other reservation holds: their room counts from the start.
    pub(crate) fn free(&self, i: usize) -> bool {
        !self.w.blocked(i)
    }

    /// May the job use node `i` at the current step?
    pub(crate) fn counted(&self, i: usize) -> bool {
        !self.w.blocked(i) || self.usable.contains(&i)
    }

    fn base(&self, i: usize) -> &NodeSnap {
        self.scratch.get(&i).unwrap_or(&self.s.nodes[i])
    }

    /// Moves to the next stop and returns its time; `delta(i, before, after)` reports each
    /// change to the room for the job's tasks on a node it may use (a reserved node's room
    /// counts while it is usable). `None` once nothing is left to change.
    pub(crate) fn step(&mut self, mut delta: impl FnMut(usize, u64, u64)) -> Option<Millis> {
        let next_end = self.ends.peek().map(|e| e.0);
        let next_toggle = self.w.toggles.get(self.next_toggle).copied();
        let t = match (next_end, next_toggle) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        while let Some((_, i, task)) = self.ends.next_if(|e| e.0 == t) {
            let counted = self.counted(i);
            let n = self
                .scratch
                .entry(i)
                .or_insert_with(|| self.s.nodes[i].clone());
            let before = n.room_for(self.r);
            n.release(&task.resources, &task.devices);
            if counted {
                delta(i, before, n.room_for(self.r));
            }
        }
        let mut recheck = std::mem::take(&mut self.first);
        while self
            .w
            .toggles
            .get(self.next_toggle)
            .is_some_and(|&x| x <= t)
        {
            self.next_toggle += 1;
            recheck = true;
        }
        if recheck {
            let flips: Vec<(usize, bool)> = self
                .w
                .by_node
                .keys()
                .map(|&i| (i, self.w.usable(i, t)))
                .filter(|&(i, ok)| ok != self.usable.contains(&i))
                .collect();
            for (i, ok) in flips {
                let room = self.base(i).room_for(self.r);
                if ok {
                    self.usable.insert(i);
                    delta(i, 0, room);
                } else {
                    self.usable.remove(&i);
                    delta(i, room, 0);
                }
            }
        }
        Some(t)
    }
}

impl Scheduler {
    /// When could all of `job`'s pending tasks start, going by the max runtimes of what
    /// runs now (and the windows of the reservations made before), and on which nodes?
    pub(crate) fn reserve(&self, job: &JobReq, now: Millis) -> Option<Reservation> {
        if let Some(level) = job.topology {
            return self.reserve_in_domain(job, level, now);
        }
        let need = job.pending.len() as u64;
        let r = &job.resources;
        let mut walk = RoomWalk::new(self, job, now);
        // How many tasks of `r` fit in total at each stop, kept as a running sum: nodes no
        // ending task touches count as they are now (only the index's candidates can hold
        // any), a node is re-counted as tasks end on it or its usability changes. The
        // greedy walk that picks the nodes runs only once the sum says it can succeed, so
        // a reservation costs O(candidates + stops walked) rather than a scan of every
        // node per end time (the replay of 100,000 nodes).
        let mut roomy: BTreeSet<usize> = BTreeSet::new();
        let mut total = 0u64;
        for i in self.index.candidates(r).filter(|&i| walk.free(i)) {
            if !roomy.contains(&i) {
                let k = self.nodes[i].room_for(r);
                if k > 0 {
                    roomy.insert(i);
                    total += k;
                }
            }
        }
        while let Some(t) = walk.step(|_, before, after| total = total - before.min(total) + after)
        {
            if total < need {
                continue;
            }
            // Greedy fit over the nodes that changed plus the rest as they are now.
            let order = walk
                .scratch
                .keys()
                .copied()
                .filter(|&i| walk.counted(i))
                .chain(
                    roomy
                        .union(&walk.usable)
                        .copied()
                        .filter(|i| !walk.scratch.contains_key(i)),
                );
            if let Some(res) = self.reserve_on(job, t, order, &walk.scratch) {
                return Some(res);
            }
        }
        None
    }

    /// `reserve` for a gang held to one topology domain: the earliest stop at which some
    /// domain holds every pending task, and that domain's nodes. The same running sum per
    /// domain; where several domains could hold it at once, the one with the least room
    /// first (placement's best fit at the domain level), then in domain order.
    fn reserve_in_domain(
        &self,
        job: &JobReq,
        level: TopologyLevel,
        now: Millis,
    ) -> Option<Reservation> {
        type Key = u32;
        let need = job.pending.len() as u64;
        let r = &job.resources;
        let of = &self.domain_table(level).of;
        let key = |i: usize| of[i];
        let mut walk = RoomWalk::new(self, job, now);
        let mut totals: BTreeMap<Key, u64> = BTreeMap::new();
        let mut roomy: BTreeMap<Key, BTreeSet<usize>> = BTreeMap::new();
        for i in self
            .index
            .with_room(r)
            .into_iter()
            .filter(|&i| walk.free(i))
        {
            let k = self.nodes[i].room_for(r);
            if k > 0 {
                *totals.entry(key(i)).or_default() += k;
                roomy.entry(key(i)).or_default().insert(i);
            }
        }
        // At the first stop every domain is a candidate; after it, only the domains a
        // change touched (the room of the others, and so their greedy fit, is the same).
        let mut first = true;
        loop {
            let mut changed: BTreeSet<Key> = BTreeSet::new();
            let t = walk.step(|i, before, after| {
                let total = totals.entry(key(i)).or_default();
                *total = *total - before.min(*total) + after;
                changed.insert(key(i));
            })?;
            let mut fitting: Vec<(u64, Key)> = if std::mem::take(&mut first) {
                totals.iter().map(|(k, v)| (*v, *k)).collect()
            } else {
                changed.iter().map(|k| (totals[k], *k)).collect()
            };
            fitting.retain(|(total, _)| *total >= need);
            fitting.sort();
            for (_, d) in fitting {
                let none = BTreeSet::new();
                let now_roomy = roomy.get(&d).unwrap_or(&none);
                let usable_here: BTreeSet<usize> = walk
                    .usable
                    .iter()
                    .copied()
                    .filter(|&i| key(i) == d)
                    .collect();
                let order = walk
                    .scratch
                    .keys()
                    .copied()
                    .filter(|&i| key(i) == d && walk.counted(i))
                    .chain(
                        now_roomy
                            .union(&usable_here)
                            .copied()
                            .filter(|i| !walk.scratch.contains_key(i)),
                    );
                if let Some(res) = self.reserve_on(job, t, order, &walk.scratch) {
                    return Some(res);
                }
            }
        }
    }

    /// Running tasks with a known end, in end order, as (end but not before `now`, node,
    /// task): what the reservation searches walk.
    pub(crate) fn ends_from(
        &self,
        now: Millis,
    ) -> impl Iterator<Item = (Millis, usize, &RunningTask)> {
        self.ends.iter().filter_map(move |&(e, i, run)| {
            let t = self.running.get(&i)?.iter().find(|t| t.run == run)?;
            Some((e.max(now), i, t))
        })
    }

    /// A reservation for all of `job`'s pending tasks from `at`, on the nodes of `order`
    /// (as `scratch` has them then, the rest as they are now), if they hold it.
    pub(crate) fn reserve_on(
        &self,
        job: &JobReq,
        at: Millis,
        order: impl Iterator<Item = usize>,
        scratch: &BTreeMap<usize, NodeSnap>,
    ) -> Option<Reservation> {
        let base = |i: usize| scratch.get(&i).unwrap_or(&self.nodes[i]);
        let need = job.pending.len() as u64;
        fit_greedily(&self.cfg, order, base, &job.resources, need).map(|nodes| Reservation {
            job: job.id,
            at,
            // A job whose max runtime runs past the end of time holds its nodes for good.
            until: job.max_runtime_ms.and_then(|m| at.checked_add(span(m))),
            nodes,
            drained: false,
        })
    }
}
