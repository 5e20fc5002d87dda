//! `caravel sim`: experiments that replay public traces through the production scheduler.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use caravel_sim::{fgd, openb};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum SimCmd {
    /// The FGD (USENIX ATC'23) protocol on an openb pod list.
    Fgd {
        /// openb pod list (CSV).
        #[arg(long)]
        trace: PathBuf,
        /// openb node list (CSV); the FGD experiments use openb_node_list_gpu_node.csv.
        #[arg(long)]
        nodes: PathBuf,
        /// Placement policy: `caravel` (the server's indexed best fit) or `fgd`.
        #[arg(long, default_value = "caravel")]
        policy: String,
        /// Seeds, e.g. 42-51 or 42,43.
        #[arg(long, default_value = "42-51")]
        seeds: String,
        /// Arrived load to reach, as a multiple of cluster GPU capacity.
        #[arg(long, default_value_t = 1.3)]
        tune: f64,
        #[arg(long)]
        out: PathBuf,
    },
}

fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.parse()?, b.parse()?);
                if a > b || b - a > 10_000 {
                    bail!("--seeds: `{part}` is not a small ascending range");
                }
                out.extend(a..=b);
            }
            None => out.push(
                part.parse()
                    .map_err(|_| anyhow!("--seeds: `{part}` is not a number"))?,
            ),
        }
    }
    if out.is_empty() {
        bail!("--seeds: give at least one seed");
    }
    Ok(out)
}

pub fn run(cmd: SimCmd) -> Result<i32> {
    match cmd {
        SimCmd::Fgd {
            trace,
            nodes,
            policy,
            seeds,
            tune,
            out,
        } => {
            if !fgd::POLICIES.contains(&policy.as_str()) {
                bail!(
                    "--policy: `{policy}` is not implemented yet (have: {}; random, dotprod, clustering, packing and bestfit are still to come)",
                    fgd::POLICIES.join(", ")
                );
            }
            if !(1.0..=3.0).contains(&tune) {
                bail!("--tune: must be 1.0 to 3.0");
            }
            let seeds = parse_seeds(&seeds)?;
            let n = openb::read_nodes(&nodes)?;
            let p = openb::read_pods(&trace)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let mut curves = Vec::new();
            for (k, seed) in seeds.iter().enumerate() {
                let t0 = std::time::Instant::now();
                let c = fgd::run(&n, &p, *seed, tune, &policy);
                eprintln!(
                    "[{}/{}] seed {seed}: allocated {:.2}% at 100% arrived, {:.2}% at {:.0}% ({:.1}s)",
                    k + 1,
                    seeds.len(),
                    c.alloc_pct[100],
                    c.alloc_pct.last().copied().unwrap_or(0.0),
                    tune * 100.0,
                    t0.elapsed().as_secs_f64()
                );
                curves.push(c);
            }
            let at = |i: usize, f: fn(&fgd::Curve) -> &Vec<f64>| -> Vec<f64> {
                curves
                    .iter()
                    .map(|c| f(c).get(i).copied().unwrap_or(f64::NAN))
                    .collect()
            };
            let last = (tune * 100.0).round() as usize;
            let (a100, a100sd) = fgd::mean_sd(&at(100, |c| &c.alloc_pct));
            let (a130, a130sd) = fgd::mean_sd(&at(last, |c| &c.alloc_pct));
            let (f80, f80sd) = fgd::mean_sd(&at(80, |c| &c.frag_pct));
            let workload = trace
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            let summary = serde_json::json!({
                "policy": policy,
                "workload": workload,
                "seeds": seeds,
                "tune": tune,
                "allocated_pct_at_100_mean": a100, "allocated_pct_at_100_sd": a100sd,
                "unallocated_pct_at_100_mean": 100.0 - a100, "unallocated_pct_at_100_sd": a100sd,
                "allocated_pct_at_130_mean": a130, "allocated_pct_at_130_sd": a130sd,
                "frag_pct_at_80_mean": f80, "frag_pct_at_80_sd": f80sd,
                "validated_against_artefact": false,
            });
            std::fs::write(
                out.join("summary.json"),
                serde_json::to_string_pretty(&summary)? + "\n",
            )?;
            let mut csv = String::from("seed,arrived_pct,allocated_pct,frag_pct\n");
            for (seed, c) in seeds.iter().zip(&curves) {
                for (i, (a, f)) in c.alloc_pct.iter().zip(&c.frag_pct).enumerate() {
                    csv.push_str(&format!("{seed},{i},{a:.4},{f:.4}\n"));
                }
            }
            std::fs::write(out.join("curves.csv"), csv)?;
            println!("{summary}");
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds() {
        assert_eq!(super::parse_seeds("42-44").unwrap(), vec![42, 43, 44]);
        assert_eq!(super::parse_seeds("1,5").unwrap(), vec![1, 5]);
        assert!(super::parse_seeds("5-1").is_err());
        assert!(super::parse_seeds("x").is_err());
    }
}
