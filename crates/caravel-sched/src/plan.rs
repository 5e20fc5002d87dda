//! The share plan: how the expected workload's GPU shares should fill whole GPUs, from the
//! linear-programming relaxation of packing them (Gilmore–Gomory cutting stock, solved by
//! column generation), and which shares the pool cannot afford once it is full.
//!
//! Online, one task at a time and in random order, best fit and FGD combine shares into
//! whatever fits: two 470-thousandth shares on a GPU, then a 320 and a 160 beside them
//! elsewhere, leaving holes no later share can use. The plan instead knows which
//! combinations an optimal packing of the workload uses (470 + 470, 650 + 320, 810 + 160,
//! 550 + 230 + 220 on the openb traces) and therefore which fill levels of a GPU lie on the
//! way to one (470 does, 790 does not). Placement prefers GPUs whose fill stays on the
//! plan, then a fresh GPU, and only then anything that fits (`Scheduler::place_for`); what
//! that gains on the openb traces is in docs/simulator.md.
//!
//! The plan has a second use, off unless `Config::share_pacing` asks for it. When the
//! expected demand meets the pool's capacity, a share that must sit alone on a GPU (an
//! 810) costs the pool 190 thousandths that whole-GPU work would have used; the LP with the
//! shares' part of the GPUs as a budget says what fraction of each size the pool can afford
//! (`turn_away`).

use std::collections::BTreeMap;

use crate::fgd::WorkloadType;
use crate::lp;

/// One way of filling a GPU with shares, and how many GPUs per task of the workload the
/// LP fills that way.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    /// Share sizes in thousandths, largest first.
    pub shares: Vec<u32>,
    pub gpus: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SharePlan {
    /// `levels[u]`: a GPU `u` thousandths full is on the way to one of the plan's patterns.
    levels: Vec<bool>,
    /// The patterns of the packing that places every share in the fewest GPUs.
    pub patterns: Vec<Pattern>,
    /// Per share size, the fraction the pool cannot afford when the expected demand equals
    /// its capacity (only sizes with a positive fraction).
    pub turn_away: BTreeMap<u32, f64>,
}

/// At most this many share sizes are planned (the most frequent); others place by
/// fragmentation alone.
const MAX_SIZES: usize = 64;
/// Column generation stops after this many patterns whatever the prices say.
const MAX_PATTERNS: usize = 400;

impl SharePlan {
    /// The plan for `types` (weights: tasks per task of the workload). `None` when the
    /// workload has no shares or the program could not be solved.
    pub fn new(types: &[WorkloadType]) -> Option<SharePlan> {
        let mut by_size: BTreeMap<u32, f64> = BTreeMap::new();
        for t in types {
            if t.num_gpu == 1 && t.gpu_milli > 0 && t.gpu_milli < 1000 && t.weight > 0.0 {
                *by_size.entry(t.gpu_milli).or_insert(0.0) += t.weight;
            }
        }
        if by_size.is_empty() {
            return None;
        }
        let mut sizes: Vec<(u32, f64)> = by_size.into_iter().collect();
        if sizes.len() > MAX_SIZES {
            sizes.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            sizes.truncate(MAX_SIZES);
            sizes.sort_by_key(|s| s.0);
        }
        // Every share placed, in as few GPUs as possible (a small price per GPU under a
        // gain per share that always outweighs it).
        let all = solve(&sizes, None, 1e-2)?;
        let mut levels = vec![false; 1001];
        for p in &all.patterns {
            let mut reach = vec![false; 1001];
            reach[0] = true;
            for &s in &p.shares {
                for u in (s as usize..=1000).rev() {
                    reach[u] |= reach[u - s as usize];
                }
            }
            for (u, r) in reach.into_iter().enumerate().skip(1) {
                levels[u] |= r;
            }
        }
        // The shares' part of the GPU demand as their budget of GPUs: the whole-GPU work
        // takes its own part when demand equals capacity.
        let budget: f64 = sizes.iter().map(|(s, d)| *s as f64 / 1000.0 * d).sum();
        let afford = solve(&sizes, Some(budget), 1e-4)?;
        let turn_away = sizes
            .iter()
            .zip(&afford.placed)
            .filter_map(|((s, d), x)| {
                let f = 1.0 - x / d;
                (f > 1e-6).then_some((*s, f.min(1.0)))
            })
            .collect();
        Some(SharePlan {
            levels,
            patterns: all.patterns,
            turn_away,
        })
    }

    /// Is a GPU filled to `used` thousandths (0: fresh) on the plan?
    pub fn on_plan(&self, used: u32) -> bool {
        self.levels.get(used as usize).copied().unwrap_or(false)
    }

    /// The fill levels on the plan, ascending.
    pub fn levels(&self) -> impl Iterator<Item = u32> + '_ {
        self.levels
            .iter()
            .enumerate()
            .filter(|(_, l)| **l)
            .map(|(u, _)| u as u32)
    }
}

struct Solved {
    patterns: Vec<Pattern>,
    /// Shares placed per size, in the order of `sizes`.
    placed: Vec<f64>,
}

/// max Σ (s/1000)·x_s − price·Σ y_p subject to, per size s, x_s ≤ Σ_p a_ps·y_p and
/// x_s ≤ d_s, and with a budget Σ y_p ≤ budget; column generation prices new patterns by
/// a knapsack over the sizes' duals.
fn solve(sizes: &[(u32, f64)], budget: Option<f64>, price: f64) -> Option<Solved> {
    let n = sizes.len();
    let mut patterns: Vec<Vec<u32>> = sizes
        .iter()
        .enumerate()
        .map(|(i, (s, _))| {
            let mut a = vec![0u32; n];
            a[i] = 1000 / s;
            a
        })
        .collect();
    let rows = 2 * n + usize::from(budget.is_some());
    loop {
        let k = patterns.len();
        let mut c: Vec<f64> = sizes.iter().map(|(s, _)| *s as f64 / 1000.0).collect();
        c.extend(std::iter::repeat_n(-price, k));
        let mut a = vec![vec![0.0; n + k]; rows];
        let mut b = vec![0.0; rows];
        for i in 0..n {
            a[i][i] = 1.0;
            for (j, p) in patterns.iter().enumerate() {
                a[i][n + j] = -(p[i] as f64);
            }
            a[n + i][i] = 1.0;
            b[n + i] = sizes[i].1;
        }
        if let Some(g) = budget {
            for j in 0..k {
                a[2 * n][n + j] = 1.0;
            }
            b[2 * n] = g;
        }
        let sol = lp::maximize(&c, &a, &b)?;
        let duals = &sol.duals[..n];
        let mu = budget.map(|_| sol.duals[2 * n]).unwrap_or(0.0);
        let (value, best) = knapsack(sizes, duals);
        let fresh = value > price + mu + 1e-9 && !patterns.contains(&best);
        if !fresh || patterns.len() >= MAX_PATTERNS {
            let mut out: Vec<Pattern> = patterns
                .iter()
                .zip(&sol.x[n..])
                .filter(|(_, y)| **y > 1e-9)
                .map(|(p, y)| {
                    let mut shares: Vec<u32> = p
                        .iter()
                        .enumerate()
                        .flat_map(|(i, c)| std::iter::repeat_n(sizes[i].0, *c as usize))
                        .collect();
                    shares.reverse();
                    Pattern { shares, gpus: *y }
                })
                .collect();
            out.sort_by(|a, b| b.gpus.total_cmp(&a.gpus).then(a.shares.cmp(&b.shares)));
            return Some(Solved {
                patterns: out,
                placed: sol.x[..n].to_vec(),
            });
        }
        patterns.push(best);
    }
}

/// The pattern of greatest dual value that fits one GPU (unbounded counts), and its value.
fn knapsack(sizes: &[(u32, f64)], duals: &[f64]) -> (f64, Vec<u32>) {
    let mut val = vec![0.0f64; 1001];
    let mut take: Vec<Option<usize>> = vec![None; 1001];
    for cap in 1..=1000usize {
        val[cap] = val[cap - 1];
        take[cap] = None;
        for (i, (s, _)) in sizes.iter().enumerate() {
            let s = *s as usize;
            if s <= cap && val[cap - s] + duals[i] > val[cap] + 1e-12 {
                val[cap] = val[cap - s] + duals[i];
                take[cap] = Some(i);
            }
        }
    }
    let mut counts = vec![0u32; sizes.len()];
    let mut cap = 1000usize;
    while cap > 0 {
        match take[cap] {
            Some(i) => {
                counts[i] += 1;
                cap -= sizes[i].0 as usize;
            }
            None => cap -= 1,
        }
    }
    (val[1000], counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(milli: u32, weight: f64) -> WorkloadType {
        WorkloadType {
            cpu_milli: 1000,
            memory_bytes: 0,
            num_gpu: 1,
            gpu_milli: milli,
            models: vec![],
            weight,
        }
    }

    fn whole(weight: f64) -> WorkloadType {
        WorkloadType {
            gpu_milli: 1000,
            ..share(1000, weight)
        }
    }

    #[test]
    fn complements_pair_up_and_nothing_is_turned_away() {
        let plan = SharePlan::new(&[share(600, 0.25), share(400, 0.25), whole(0.5)]).unwrap();
        assert_eq!(plan.patterns.len(), 1, "{plan:?}");
        assert_eq!(plan.patterns[0].shares, vec![600, 400]);
        assert!((plan.patterns[0].gpus - 0.25).abs() < 1e-9);
        assert_eq!(plan.levels().collect::<Vec<_>>(), vec![400, 600, 1000]);
        assert!(plan.on_plan(600) && !plan.on_plan(800) && !plan.on_plan(0));
        // The pairs fill their GPUs exactly: the budget holds every share.
        assert!(plan.turn_away.is_empty(), "{plan:?}");
    }

    #[test]
    fn a_share_that_sits_alone_is_what_the_budget_cannot_afford() {
        // 810s fit one per GPU. With whole-GPU work taking its own part of the GPUs, the
        // 810s' budget is 0.81 GPUs per 810: 19 % cannot be placed.
        let plan = SharePlan::new(&[share(810, 0.2), whole(0.8)]).unwrap();
        assert_eq!(plan.patterns[0].shares, vec![810]);
        assert!((plan.turn_away[&810] - 0.19).abs() < 1e-6, "{plan:?}");
        // A 160 fills an 810's hole: the plan pairs them and turns fewer away.
        let plan = SharePlan::new(&[share(810, 0.2), share(160, 0.1), whole(0.7)]).unwrap();
        assert!(plan.on_plan(970) && plan.on_plan(160) && plan.on_plan(810));
        assert!(plan.turn_away[&810] < 0.19 && !plan.turn_away.contains_key(&160));
    }

    #[test]
    fn no_shares_no_plan() {
        assert!(SharePlan::new(&[whole(1.0)]).is_none());
        assert!(SharePlan::new(&[]).is_none());
        let plan = SharePlan::new(&[share(500, 0.5), whole(0.5)]).unwrap();
        assert_eq!(plan.patterns[0].shares, vec![500, 500]);
        assert_eq!(plan.levels().collect::<Vec<_>>(), vec![500, 1000]);
    }
}
