//! Results of an FGD-protocol experiment: per-policy summaries (mean ± sd over seeds),
//! the comparison with the artefact's published curves, and the files of a results folder
//! (JSON, CSV, SVG plots, a one-screen text table).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::baselines::Policy;
use serde_json::{json, Value};

use crate::artefact;
use crate::fgd::{self, Curve};
use crate::openb::{OpenbNode, OpenbPod};
use crate::svg::{line_chart, Series};

/// The curves of one policy, one per seed (in seed order).
pub struct PolicyResult {
    pub policy: Policy,
    /// The share pacing it ran with (Caravel's policy only; see `fgd::run`).
    pub pacing: Option<f64>,
    pub curves: Vec<Curve>,
}

/// Runs every (policy, seed) pair on `threads` threads; `progress(done, total)` is called
/// after each run. Results do not depend on the thread count.
pub fn run_all(
    nodes: &[OpenbNode],
    pods: &[OpenbPod],
    policies: &[Policy],
    seeds: &[u64],
    setup: fgd::Setup,
    threads: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Vec<PolicyResult> {
    let jobs: Vec<(usize, usize)> = (0..policies.len())
        .flat_map(|p| (0..seeds.len()).map(move |s| (p, s)))
        .collect();
    let out: Mutex<Vec<Option<Curve>>> = Mutex::new(vec![None; jobs.len()]);
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..threads.max(1).min(jobs.len().max(1)) {
            sc.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                let Some(&(p, s)) = jobs.get(k) else { break };
                let c = fgd::run(nodes, pods, seeds[s], policies[p], setup);
                out.lock().expect("no panics while held")[k] = Some(c);
                progress(done.fetch_add(1, Ordering::SeqCst) + 1, jobs.len());
            });
        }
    });
    let mut curves = out.into_inner().expect("threads joined").into_iter();
    policies
        .iter()
        .map(|&policy| PolicyResult {
            policy,
            pacing: setup.pacing.filter(|_| policy == Policy::Caravel),
            curves: (0..seeds.len())
                .map(|_| curves.next().flatten().expect("every run finished"))
                .collect(),
        })
        .collect()
}

/// Mean and sample standard deviation, ignoring NaN; NaN when nothing is left.
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

fn at(curves: &[Curve], k: usize, frag: bool) -> Vec<f64> {
    curves
        .iter()
        .map(|c| {
            let v = if frag { &c.frag_pct } else { &c.alloc_pct };
            v.get(k).copied().unwrap_or(f64::NAN)
        })
        .collect()
}

fn paced_at(curves: &[Curve], k: usize) -> Vec<f64> {
    curves
        .iter()
        .map(|c| c.paced_pct.get(k).copied().unwrap_or(f64::NAN))
        .collect()
}

/// The mean curve over seeds.
pub fn mean_curve(curves: &[Curve], frag: bool) -> Vec<f64> {
    let len = curves.iter().map(|c| c.alloc_pct.len()).max().unwrap_or(0);
    (0..len).map(|k| mean_sd(&at(curves, k, frag)).0).collect()
}

fn num(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 10_000.0).round() / 10_000.0)
    } else {
        Value::Null
    }
}

/// The machine-readable summary of one policy. `published` is the artefact's runs of the
/// same workload (allocation, fragmentation), when known.
pub fn summary(
    r: &PolicyResult,
    workload: &str,
    seeds: &[u64],
    tune: f64,
    published: Option<(&[artefact::Run], &[artefact::Run])>,
) -> Value {
    let last = (tune * 100.0).round() as usize;
    let (a100, a100sd) = mean_sd(&at(&r.curves, 100, false));
    let (a130, a130sd) = mean_sd(&at(&r.curves, last, false));
    let (f80, f80sd) = mean_sd(&at(&r.curves, 80, true));
    let (p100, p100sd) = mean_sd(&paced_at(&r.curves, 100));
    let (p130, p130sd) = mean_sd(&paced_at(&r.curves, last));
    let mut s = json!({
        "policy": r.policy.name(),
        // What the figures are: the server's policy, or an experiment only the simulator
        // runs (share pacing turns away pods that would fit; the server never does).
        "experiment": r.pacing.map(|f| format!(
            "share pacing {f}: simulator only; it turns away pods that would fit, which the server never does"
        )),
        "workload": workload,
        "seeds": seeds,
        "tune": tune,
        "pacing": r.pacing,
        "paced_pct_at_100_mean": num(p100), "paced_pct_at_100_sd": num(p100sd),
        "paced_pct_at_130_mean": num(p130), "paced_pct_at_130_sd": num(p130sd),
        "allocated_pct_at_100_mean": num(a100), "allocated_pct_at_100_sd": num(a100sd),
        "unallocated_pct_at_100_mean": num(100.0 - a100), "unallocated_pct_at_100_sd": num(a100sd),
        "allocated_pct_at_130_mean": num(a130), "allocated_pct_at_130_sd": num(a130sd),
        "frag_pct_at_80_mean": num(f80), "frag_pct_at_80_sd": num(f80sd),
    });
    if let Some((alloc, frag)) = published {
        let ours = mean_curve(&r.curves, false);
        if let Some(theirs) = artefact::mean_curve(alloc, workload, r.policy.name()) {
            let (d, k) = artefact::max_abs_diff(&ours, &theirs).unwrap_or((f64::NAN, 0));
            s["artefact"] = json!({
                "allocated_pct_at_100_mean": num(theirs.get(100).copied().unwrap_or(f64::NAN)),
                "allocated_pct_at_130_mean": num(theirs.get(130).copied().unwrap_or(f64::NAN)),
                "frag_pct_at_80_mean": num(
                    artefact::mean_curve(frag, workload, r.policy.name())
                        .and_then(|f| f.get(80).copied())
                        .unwrap_or(f64::NAN)
                ),
                "allocation_max_abs_diff_pp": num(d),
                "allocation_max_abs_diff_at": k,
                "within_half_pp": d <= 0.5,
            });
        }
    }
    s
}

/// Writes the results folder: `summary.json` (one policy: its summary; several: all of
/// them under `policies`), per-policy `curves.csv`, `allocation.svg`, `fragmentation.svg`
/// and `summary.txt`. Returns the text table.
pub fn write(
    dir: &Path,
    workload: &str,
    seeds: &[u64],
    tune: f64,
    results: &[PolicyResult],
    published: Option<(&[artefact::Run], &[artefact::Run])>,
) -> std::io::Result<String> {
    std::fs::create_dir_all(dir)?;
    let sums: Vec<Value> = results
        .iter()
        .map(|r| summary(r, workload, seeds, tune, published))
        .collect();
    let mut top = if sums.len() == 1 {
        sums[0].clone()
    } else {
        json!({ "workload": workload, "seeds": seeds, "tune": tune, "policies": sums })
    };
    top["validated_against_artefact"] = validated(&sums);
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&top)? + "\n",
    )?;
    let mut csv = String::from("policy,seed,arrived_pct,allocated_pct,frag_pct,paced_pct\n");
    for r in results {
        for (seed, c) in seeds.iter().zip(&r.curves) {
            for (k, ((a, f), p)) in c
                .alloc_pct
                .iter()
                .zip(&c.frag_pct)
                .zip(&c.paced_pct)
                .enumerate()
            {
                csv.push_str(&format!(
                    "{},{seed},{k},{a:.4},{f:.4},{p:.4}\n",
                    r.policy.name()
                ));
            }
        }
    }
    std::fs::write(dir.join("curves.csv"), csv)?;
    let mut alloc = Vec::new();
    let mut frag = Vec::new();
    for r in results {
        let pts = |v: Vec<f64>| {
            v.into_iter()
                .enumerate()
                .map(|(k, y)| (k as f64, y))
                .collect()
        };
        alloc.push(Series {
            name: label(r.policy.name(), r.pacing),
            points: pts(mean_curve(&r.curves, false)),
            dashed: false,
        });
        frag.push(Series {
            name: label(r.policy.name(), r.pacing),
            points: pts(mean_curve(&r.curves, true)),
            dashed: false,
        });
        if let Some((a, f)) = published {
            let name = format!("{} (artefact)", r.policy.name());
            if let Some(t) = artefact::mean_curve(a, workload, r.policy.name()) {
                alloc.push(Series {
                    name: name.clone(),
                    points: pts(t),
                    dashed: true,
                });
            }
            if let Some(t) = artefact::mean_curve(f, workload, r.policy.name()) {
                frag.push(Series {
                    name,
                    points: pts(t),
                    dashed: true,
                });
            }
        }
    }
    let title = format!("{workload}: mean of {} seeds", seeds.len());
    std::fs::write(
        dir.join("allocation.svg"),
        line_chart(
            &format!("GPU allocation, {title}"),
            "arrived GPU request (% of capacity)",
            "allocated GPU (% of capacity)",
            &alloc,
            None,
        ),
    )?;
    std::fs::write(
        dir.join("fragmentation.svg"),
        line_chart(
            &format!("GPU fragmentation, {title}"),
            "arrived GPU request (% of capacity)",
            "fragmented GPU (% of capacity)",
            &frag,
            Some(0.0),
        ),
    )?;
    let table = text_table(workload, seeds, &sums);
    std::fs::write(dir.join("summary.txt"), &table)?;
    Ok(table)
}

/// What this run checked against the artefact's published curves: each policy compared
/// (the baselines the artefact ran), its largest gap over the allocation curve, and
/// whether every one is within ±0.5 pp; `null` when nothing was compared (no `--expected`,
/// or only Caravel's policy, which the artefact does not have).
fn validated(sums: &[Value]) -> Value {
    let compared: Vec<Value> = sums
        .iter()
        .filter(|s| s["artefact"].is_object())
        .map(|s| {
            json!({
                "policy": s["policy"],
                "allocation_max_abs_diff_pp": s["artefact"]["allocation_max_abs_diff_pp"],
                "within_half_pp": s["artefact"]["within_half_pp"],
            })
        })
        .collect();
    if compared.is_empty() {
        return Value::Null;
    }
    let all = compared.iter().all(|c| c["within_half_pp"] == true);
    json!({ "policies": compared, "all_within_half_pp": all })
}

/// How a policy's row and curves are named: an experiment carries a mark.
fn label(policy: &str, pacing: Option<f64>) -> String {
    match pacing {
        Some(f) => format!("{policy}+pacing{f}*"),
        None => policy.to_string(),
    }
}

fn text_table(workload: &str, seeds: &[u64], sums: &[Value]) -> String {
    let f = |v: &Value, k: &str| v[k].as_f64().map_or("-".into(), |x| format!("{x:.2}"));
    let mut t = format!(
        "{workload}, seeds {}..{} ({} runs each), mean ± sd\n",
        seeds.first().unwrap_or(&0),
        seeds.last().unwrap_or(&0),
        seeds.len()
    );
    t.push_str(
        "policy              alloc@100%      unalloc@100%  alloc@130%      frag@80%       paced@100%  artefact alloc@100  max|diff| pp\n",
    );
    for s in sums {
        let pm = |k: &str| {
            format!(
                "{} ± {}",
                f(s, &format!("{k}_mean")),
                f(s, &format!("{k}_sd"))
            )
        };
        let name = label(s["policy"].as_str().unwrap_or(""), s["pacing"].as_f64());
        t.push_str(&format!(
            "{:<19} {:<15} {:<13} {:<15} {:<14} {:<11} {:<19} {}\n",
            name,
            pm("allocated_pct_at_100"),
            f(s, "unallocated_pct_at_100_mean"),
            pm("allocated_pct_at_130"),
            pm("frag_pct_at_80"),
            if s["pacing"].is_null() {
                "-".to_string()
            } else {
                f(s, "paced_pct_at_100_mean")
            },
            f(&s["artefact"], "allocated_pct_at_100_mean"),
            f(&s["artefact"], "allocation_max_abs_diff_pp"),
        ));
    }
    if sums.iter().any(|s| !s["experiment"].is_null()) {
        t.push_str(
            "* simulator-only experiment: share pacing turns away pods that would fit; the \
             server never paces, and its figures are the rows without a mark\n",
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_experiment_is_labelled_and_the_summary_says_what_was_validated() {
        let nodes: Vec<OpenbNode> = (0..4)
            .map(|i| OpenbNode {
                sn: format!("n{i}"),
                cpu_milli: 64_000,
                memory_mib: 262_144,
                gpus: 4,
                model: "T4".into(),
            })
            .collect();
        let pods: Vec<OpenbPod> = [(1, 1000), (1, 500), (2, 1000), (1, 250)]
            .iter()
            .map(|&(num_gpu, gpu_milli)| OpenbPod {
                name: "p".into(),
                cpu_milli: 1000,
                memory_mib: 1024,
                num_gpu,
                gpu_milli,
                gpu_spec: vec![],
            })
            .collect();
        let seeds = [1, 2];
        let run = |pacing| {
            run_all(
                &nodes,
                &pods,
                &[Policy::Fgd, Policy::Caravel],
                &seeds,
                fgd::Setup { tune: 1.3, pacing },
                1,
                &|_, _| {},
            )
        };
        let published: Vec<artefact::Run> = seeds
            .iter()
            .map(|&seed| artefact::Run {
                workload: "w".into(),
                policy: "06-FGD".into(),
                seed,
                values: (0..=130).map(|k| (k as f64).min(100.0)).collect(),
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("caravel-report-{}", std::process::id()));
        // The server's policy: no mark, no experiment.
        let table = write(
            &dir,
            "w",
            &seeds,
            1.3,
            &run(None),
            Some((&published, &published)),
        )
        .unwrap();
        let sum: Value =
            serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
        assert!(sum["policies"][1]["experiment"].is_null(), "{sum}");
        assert!(!table.contains('*'), "{table}");
        let v = &sum["validated_against_artefact"];
        assert_eq!(v["policies"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(v["policies"][0]["policy"], "fgd");
        assert!(v["all_within_half_pp"].is_boolean(), "{v}");
        // The experiment: marked in the table, the summary and the plots.
        let table = write(&dir, "w", &seeds, 1.3, &run(Some(0.9)), None).unwrap();
        let sum: Value =
            serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
        assert!(sum["policies"][0]["experiment"].is_null(), "{sum}");
        let e = sum["policies"][1]["experiment"].as_str().unwrap();
        assert!(e.contains("simulator only"), "{e}");
        assert!(sum["validated_against_artefact"].is_null(), "{sum}");
        assert!(table.contains("caravel+pacing0.9*"), "{table}");
        assert!(table.contains("simulator-only experiment"), "{table}");
        let svg = std::fs::read_to_string(dir.join("allocation.svg")).unwrap();
        assert!(svg.contains("caravel+pacing0.9*"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
