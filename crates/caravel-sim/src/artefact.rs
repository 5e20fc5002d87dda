//! The FGD artefact's published curves (`fgd-atc23-expected-results`), to validate our
//! baselines against before any result of ours is claimed.

use std::collections::BTreeMap;
use std::path::Path;

use crate::TraceError;

/// The artefact's policy folder name for one of our policy names.
pub fn artefact_name(policy: &str) -> Option<&'static str> {
    Some(match policy {
        "random" => "01-Random",
        "dotprod" => "02-DotProd",
        "clustering" => "03-GpuClustering",
        "packing" => "04-GpuPacking",
        "bestfit" => "05-BestFit",
        "fgd" => "06-FGD",
        _ => return None,
    })
}

/// One published run: its values at arrived load 0..=130 % (NaN where absent).
#[derive(Debug, Clone)]
pub struct Run {
    pub workload: String,
    pub policy: String,
    pub seed: u64,
    pub values: Vec<f64>,
}

/// Reads `analysis_allo_discrete.csv` or `analysis_frag_discrete.csv`.
pub fn read(path: &Path) -> Result<Vec<Run>, TraceError> {
    let file = path.display().to_string();
    let err = |line: usize, reason: String| TraceError {
        file: file.clone(),
        line,
        reason,
    };
    let (_, records) = crate::openb::rows(path)?;
    let mut lines = records.iter();
    let (_, header) = lines.next().ok_or_else(|| err(1, "empty file".into()))?;
    let cols: Vec<&str> = header.fields();
    let find = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .ok_or_else(|| err(1, format!("missing column `{name}`")))
    };
    let (wi, pi, si) = (find("workload")?, find("sc_policy")?, find("seed")?);
    let points: Vec<(usize, usize)> = cols
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.parse::<usize>().ok().map(|k| (i, k)))
        .filter(|(_, k)| *k <= 1000)
        .collect();
    let max = points.iter().map(|p| p.1).max().unwrap_or(0);
    let mut out = Vec::new();
    for (line, row) in lines {
        let n = line - 1;
        if row.is_blank() {
            continue;
        }
        let f: Vec<&str> = row.fields();
        if f.len() != cols.len() {
            return Err(err(
                n + 1,
                format!("{} fields, header has {}", f.len(), cols.len()),
            ));
        }
        let seed = f[si]
            .parse()
            .map_err(|_| err(n + 1, format!("seed `{}` is not a number", f[si])))?;
        let mut values = vec![f64::NAN; max + 1];
        for &(i, k) in &points {
            if f[i].is_empty() {
                continue;
            }
            values[k] = f[i].parse().map_err(|_| {
                err(
                    n + 1,
                    format!("column `{}`: `{}` is not a number", cols[i], f[i]),
                )
            })?;
        }
        out.push(Run {
            workload: f[wi].to_string(),
            policy: f[pi].to_string(),
            seed,
            values,
        });
    }
    Ok(out)
}

/// The mean over seeds at every point, for one workload and one of our policy names;
/// `None` when the artefact has no run of them.
pub fn mean_curve(runs: &[Run], workload: &str, policy: &str) -> Option<Vec<f64>> {
    let name = artefact_name(policy)?;
    let mine: Vec<&Run> = runs
        .iter()
        .filter(|r| r.workload == workload && r.policy == name)
        .collect();
    let len = mine.iter().map(|r| r.values.len()).max()?;
    let mut sums: BTreeMap<usize, (f64, u32)> = BTreeMap::new();
    for r in &mine {
        for (k, v) in r.values.iter().enumerate() {
            if v.is_finite() {
                let e = sums.entry(k).or_insert((0.0, 0));
                e.0 += v;
                e.1 += 1;
            }
        }
    }
    Some(
        (0..len)
            .map(|k| sums.get(&k).map_or(f64::NAN, |(s, n)| s / *n as f64))
            .collect(),
    )
}

/// The largest |ours - theirs| over the points both have, and where.
pub fn max_abs_diff(ours: &[f64], theirs: &[f64]) -> Option<(f64, usize)> {
    ours.iter()
        .zip(theirs)
        .enumerate()
        .filter(|(_, (a, b))| a.is_finite() && b.is_finite())
        .map(|(k, (a, b))| ((a - b).abs(), k))
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_means_and_rejects_bad_rows() {
        let dir = std::env::temp_dir().join(format!("caravel-artefact-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.csv");
        std::fs::write(
            &p,
            "workload,sc_policy,tune,seed,0,1\nw,05-BestFit,1.3,42,1.0,2.0\nw,05-BestFit,1.3,43,3.0,\n",
        )
        .unwrap();
        let runs = read(&p).unwrap();
        let m = mean_curve(&runs, "w", "bestfit").unwrap();
        assert_eq!(m, vec![2.0, 2.0]);
        assert!(mean_curve(&runs, "w", "fgd").is_none());
        assert_eq!(max_abs_diff(&[2.5, f64::NAN], &m), Some((0.5, 0)));
        std::fs::write(&p, "workload,sc_policy,tune,seed,0\nw,05-BestFit,1.3,x,1\n").unwrap();
        let e = read(&p).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("seed"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
