//! `caravel sim`: experiments that replay public traces through the production scheduler.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use caravel_sched::Policy;
use caravel_sim::{artefact, fgd, openb, report};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum SimCmd {
    /// The FGD (USENIX ATC'23) protocol on an openb pod list: allocation and
    /// fragmentation against arrived load, per policy, mean ± sd over seeds.
    Fgd {
        /// openb pod list (CSV).
        #[arg(long)]
        trace: PathBuf,
        /// openb node list (CSV); the FGD experiments use openb_node_list_gpu_node.csv.
        #[arg(long)]
        nodes: PathBuf,
        /// Placement policy, several separated by commas, or `all`: random, dotprod,
        /// clustering, packing, bestfit, fgd, caravel.
        #[arg(long, default_value = "caravel")]
        policy: String,
        /// Seeds, e.g. 42-51 or 42,43.
        #[arg(long, default_value = "42-51")]
        seeds: String,
        /// Arrived load to reach, as a multiple of cluster GPU capacity.
        #[arg(long, default_value_t = 1.3)]
        tune: f64,
        /// The artefact's expected results folder (fgd-atc23-expected-results): compare
        /// every baseline with its published curve.
        #[arg(long)]
        expected: Option<PathBuf>,
        /// Worker threads (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Results folder: summary.json, summary.txt, curves.csv, allocation.svg,
        /// fragmentation.svg.
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

fn parse_policies(s: &str) -> Result<Vec<Policy>> {
    if s.trim() == "all" {
        return Ok(Policy::ALL.to_vec());
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p = Policy::parse(part).ok_or_else(|| {
            anyhow!(
                "--policy: `{part}` is not a policy (one of: {}, or all)",
                fgd::POLICIES.join(", ")
            )
        })?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        bail!("--policy: give at least one policy");
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
            expected,
            threads,
            out,
        } => {
            let policies = parse_policies(&policy)?;
            if !(1.0..=3.0).contains(&tune) {
                bail!("--tune: must be 1.0 to 3.0");
            }
            if threads == Some(0) {
                bail!("--threads: must be at least 1");
            }
            let seeds = parse_seeds(&seeds)?;
            let n = openb::read_nodes(&nodes)?;
            let p = openb::read_pods(&trace)?;
            if n.iter().all(|n| n.gpus == 0) {
                bail!("--nodes: {} has no GPU node", nodes.display());
            }
            let published = match &expected {
                Some(dir) => Some((
                    artefact::read(&dir.join("analysis_allo_discrete.csv"))?,
                    artefact::read(&dir.join("analysis_frag_discrete.csv"))?,
                )),
                None => None,
            };
            let workload = trace
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            let threads = threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            let t0 = std::time::Instant::now();
            let progress = |done: usize, total: usize| {
                let el = t0.elapsed().as_secs_f64();
                let eta = el / done as f64 * (total - done) as f64;
                let width = 30;
                let filled = done * width / total;
                eprint!(
                    "\r[{}{}] {done}/{total} runs, {el:.0}s elapsed, ~{eta:.0}s left ",
                    "#".repeat(filled),
                    ".".repeat(width - filled)
                );
                if done == total {
                    eprintln!();
                }
            };
            let results = report::run_all(&n, &p, &policies, &seeds, tune, threads, &progress);
            let table = report::write(
                &out,
                &workload,
                &seeds,
                tune,
                &results,
                published
                    .as_ref()
                    .map(|(a, f)| (a.as_slice(), f.as_slice())),
            )
            .with_context(|| format!("writing results to {}", out.display()))?;
            print!("{table}");
            eprintln!("results in {}", out.display());
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
        assert_eq!(super::parse_policies("all").unwrap().len(), 7);
        assert_eq!(super::parse_policies("fgd, bestfit,fgd").unwrap().len(), 2);
        let e = super::parse_policies("best").unwrap_err().to_string();
        assert!(e.contains("--policy") && e.contains("bestfit"), "{e}");
    }
}
