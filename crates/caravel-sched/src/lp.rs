//! A small dense simplex for the share plan (`plan.rs`): maximise `c·x` subject to
//! `A x ≤ b`, `x ≥ 0`, with `b ≥ 0`, so the all-slack basis is feasible and no first phase
//! is needed. The plan's programs have tens of rows and at most a few hundred columns;
//! a dense tableau is fast enough and keeps the scheduler free of native dependencies.
//!
//! Bland's rule (lowest index enters, ties in the ratio test go to the lowest basic
//! variable) cannot cycle on the plan's degenerate programs, and, like everything in this
//! crate, the answer depends on nothing but the input.

/// An optimal vertex: the variables, one dual price per row (what one more unit of the
/// row's bound is worth) and the objective.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Solution {
    pub x: Vec<f64>,
    pub duals: Vec<f64>,
    pub value: f64,
}

const EPS: f64 = 1e-10;

/// `rows[i]` is row i of `A` (each as long as `c`). `None` when the program is unbounded
/// or the pivot budget runs out; both mean the plan is dropped, never a wrong answer.
pub(crate) fn maximize(c: &[f64], rows: &[Vec<f64>], b: &[f64]) -> Option<Solution> {
    let (m, n) = (rows.len(), c.len());
    debug_assert!(
        b.iter().all(|v| *v >= 0.0),
        "the slack basis must be feasible"
    );
    let width = n + m + 1;
    // Rows 0..m: constraints with their slacks; row m: the objective's reduced costs.
    let mut t = vec![0.0; (m + 1) * width];
    for (i, row) in rows.iter().enumerate() {
        debug_assert_eq!(row.len(), n);
        t[i * width..i * width + n].copy_from_slice(row);
        t[i * width + n + i] = 1.0;
        t[i * width + width - 1] = b[i].max(0.0);
    }
    for (j, cj) in c.iter().enumerate() {
        t[m * width + j] = -cj;
    }
    let mut basis: Vec<usize> = (n..n + m).collect();
    // Bland's rule needs at most exponentially many pivots in theory and a few hundred
    // here; the budget only guards against numerical trouble.
    for _ in 0..200_000 {
        let Some(e) = (0..n + m).find(|&j| t[m * width + j] < -EPS) else {
            let mut x = vec![0.0; n];
            for (i, &v) in basis.iter().enumerate() {
                if v < n {
                    x[v] = t[i * width + width - 1];
                }
            }
            let duals = (0..m).map(|i| t[m * width + n + i]).collect();
            return Some(Solution {
                x,
                duals,
                value: t[m * width + width - 1],
            });
        };
        let mut leave: Option<(f64, usize, usize)> = None;
        for i in 0..m {
            let a = t[i * width + e];
            if a > EPS {
                let ratio = t[i * width + width - 1] / a;
                let better = match leave {
                    None => true,
                    Some((r, _, bv)) => ratio < r - EPS || (ratio <= r + EPS && basis[i] < bv),
                };
                if better {
                    leave = Some((ratio, i, basis[i]));
                }
            }
        }
        let (_, r, _) = leave?;
        let p = t[r * width + e];
        for k in 0..width {
            t[r * width + k] /= p;
        }
        for i in 0..=m {
            if i == r {
                continue;
            }
            let f = t[i * width + e];
            if f.abs() > 0.0 {
                for k in 0..width {
                    t[i * width + k] -= f * t[r * width + k];
                }
            }
        }
        basis[r] = e;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn a_textbook_program_and_its_duals() {
        // max 3x + 5y: x ≤ 4, 2y ≤ 12, 3x + 2y ≤ 18 → x = 2, y = 6, value 36;
        // duals (0, 3/2, 1).
        let s = maximize(
            &[3.0, 5.0],
            &[vec![1.0, 0.0], vec![0.0, 2.0], vec![3.0, 2.0]],
            &[4.0, 12.0, 18.0],
        )
        .unwrap();
        assert!(close(s.x[0], 2.0) && close(s.x[1], 6.0), "{s:?}");
        assert!(close(s.value, 36.0));
        assert!(close(s.duals[0], 0.0) && close(s.duals[1], 1.5) && close(s.duals[2], 1.0));
        // Strong duality: b·y equals the optimum.
        assert!(close(
            4.0 * s.duals[0] + 12.0 * s.duals[1] + 18.0 * s.duals[2],
            36.0
        ));
    }

    #[test]
    fn degenerate_programs_terminate_and_unbounded_ones_say_so() {
        // Beale's cycling example, which cycles under the largest-coefficient rule.
        let s = maximize(
            &[0.75, -150.0, 0.02, -6.0],
            &[
                vec![0.25, -60.0, -0.04, 9.0],
                vec![0.5, -90.0, -0.02, 3.0],
                vec![0.0, 0.0, 1.0, 0.0],
            ],
            &[0.0, 0.0, 1.0],
        )
        .unwrap();
        assert!(close(s.value, 0.05), "{s:?}");
        assert!(maximize(&[1.0, 1.0], &[vec![1.0, -1.0]], &[1.0]).is_none());
        // Nothing to gain: the origin.
        let s = maximize(&[-1.0], &[vec![1.0]], &[3.0]).unwrap();
        assert_eq!(s.x, vec![0.0]);
    }
}
