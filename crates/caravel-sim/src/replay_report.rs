//! Results folder of a time-driven replay: summary.json, summary.txt, per-policy jobs and
//! timeline CSVs, utilisation over time and the queueing-delay CDF as SVG.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

use crate::replay::{Outcome, Summary};
use crate::svg::{line_chart, Series};
use crate::traces::Published;

/// One policy's outcomes, one per workload file (one for most sources).
pub struct PolicyRun {
    pub policy: String,
    /// (workload name, outcome).
    pub runs: Vec<(String, Outcome)>,
}

/// Means of every numeric field of the summaries (counts summed), as JSON.
pub fn aggregate(summaries: &[Summary]) -> Value {
    let vals: Vec<Value> = summaries
        .iter()
        .map(|s| serde_json::to_value(s).expect("plain struct"))
        .collect();
    let mut out = serde_json::Map::new();
    let Some(first) = vals.first().and_then(|v| v.as_object()) else {
        return Value::Object(out);
    };
    for k in first.keys() {
        let xs: Vec<f64> = vals.iter().filter_map(|v| v[k].as_f64()).collect();
        let summed = matches!(
            k.as_str(),
            "jobs"
                | "jobs_finished"
                | "jobs_never_started"
                | "preemptions"
                | "cycles"
                | "placements"
        ) || k.ends_with("gpu_hours");
        let v = if xs.is_empty() {
            Value::Null
        } else if summed {
            json!(xs.iter().sum::<f64>())
        } else {
            let finite: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
            if finite.is_empty() {
                Value::Null
            } else {
                json!(finite.iter().sum::<f64>() / finite.len() as f64)
            }
        };
        out.insert(k.clone(), v);
    }
    Value::Object(out)
}

/// Writes the results folder. `published`: the Pollux artefact's results to set ours against.
pub fn write(
    dir: &Path,
    workload: &str,
    cluster: &str,
    runs: &[PolicyRun],
    published: &[Published],
    wall_s: f64,
) -> std::io::Result<Value> {
    std::fs::create_dir_all(dir)?;
    let mut policies = serde_json::Map::new();
    for p in runs {
        let sums: Vec<Summary> = p.runs.iter().map(|(_, o)| o.summary()).collect();
        let mut v = aggregate(&sums);
        if p.runs.len() > 1 {
            v["per_workload"] = json!(p
                .runs
                .iter()
                .zip(&sums)
                .map(|((n, _), s)| (n.clone(), serde_json::to_value(s).expect("plain")))
                .collect::<serde_json::Map<_, _>>());
        }
        let services: Vec<Value> = p
            .runs
            .iter()
            .flat_map(|(_, o)| o.services.iter())
            .map(|s| {
                json!({
                    "name": s.name,
                    "slo_attainment": s.slo_attainment(),
                    "replica_hours": s.replica_seconds / 3600.0,
                    "scale_ups": s.scale_ups,
                    "scale_downs": s.scale_downs,
                    "max_replicas": s.max_replicas_seen,
                })
            })
            .collect();
        if !services.is_empty() {
            v["services"] = json!(services);
        }
        let att: Vec<f64> = p
            .runs
            .iter()
            .flat_map(|(_, o)| o.share_attainment.iter().copied())
            .collect();
        v["share_attainment_per_tenant"] = json!(att);
        policies.insert(p.policy.clone(), v);
    }
    let publ: serde_json::Map<String, Value> = published
        .iter()
        .map(|p| {
            (
                p.policy.clone(),
                json!({ "avg_jct_s": p.mean_jct_s, "per_workload": p.avgs }),
            )
        })
        .collect();
    let summary = json!({
        "workload": workload,
        "cluster": cluster,
        "policies": policies,
        "published": publ,
        "wall_s": wall_s,
    });
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&summary).expect("json") + "\n",
    )?;

    for p in runs {
        let mut jobs = String::from(
            "workload,job,tenant,submit_s,start_s,end_s,queue_s,jct_s,preemptions,gpus\n",
        );
        let mut tl = String::from(
            "workload,t_s,gpu_alloc_pct,gpu_busy_pct,cpu_alloc_pct,running_tasks,pending_tasks\n",
        );
        for (name, o) in &p.runs {
            let opt = |x: Option<i64>| {
                x.map(|v| format!("{:.3}", v as f64 / 1000.0))
                    .unwrap_or_default()
            };
            for j in &o.jobs {
                let _ = writeln!(
                    jobs,
                    "{name},{},{},{:.3},{},{},{},{},{},{:.3}",
                    j.name,
                    j.tenant,
                    j.submit_ms as f64 / 1000.0,
                    opt(j.start_ms),
                    opt(j.end_ms),
                    opt(j.queue_ms()),
                    opt(j.jct_ms()),
                    j.preemptions,
                    j.gpu_milli as f64 / 1000.0
                );
            }
            for s in &o.samples {
                let _ = writeln!(
                    tl,
                    "{name},{:.3},{:.3},{:.3},{:.3},{},{}",
                    s.t_ms as f64 / 1000.0,
                    s.gpu_alloc * 100.0,
                    s.gpu_busy * 100.0,
                    s.cpu_alloc * 100.0,
                    s.running_tasks,
                    s.pending_tasks
                );
            }
        }
        std::fs::write(dir.join(format!("jobs-{}.csv", p.policy)), jobs)?;
        std::fs::write(dir.join(format!("timeline-{}.csv", p.policy)), tl)?;
    }

    // Utilisation over time: the first workload of each policy (hours from its start); GPUs
    // held, and dashed, GPUs held by work past its start-up (replicas still starting left out).
    let mut util: Vec<Series> = Vec::new();
    for (p, o) in runs
        .iter()
        .filter_map(|p| p.runs.first().map(|(_, o)| (p, o)))
    {
        let t0 = o.samples.first().map(|s| s.t_ms).unwrap_or(0);
        let hours = |s: &crate::replay::Sample| (s.t_ms - t0) as f64 / 3.6e6;
        util.push(Series {
            name: format!("{} allocated", p.policy),
            points: o
                .samples
                .iter()
                .map(|s| (hours(s), s.gpu_alloc * 100.0))
                .collect(),
            dashed: false,
        });
        if o.samples.iter().any(|s| s.gpu_busy != s.gpu_alloc) {
            util.push(Series {
                name: format!("{} busy", p.policy),
                points: o
                    .samples
                    .iter()
                    .map(|s| (hours(s), s.gpu_busy * 100.0))
                    .collect(),
                dashed: true,
            });
        }
    }
    std::fs::write(
        dir.join("utilisation.svg"),
        line_chart(
            &format!("GPU allocation over time: {workload}"),
            "hours",
            "GPUs allocated (%)",
            &util,
            Some(0.0),
        ),
    )?;
    // Queueing-delay CDF over every job of every workload file.
    let cdf: Vec<Series> = runs
        .iter()
        .map(|p| {
            let mut q: Vec<f64> = p
                .runs
                .iter()
                .flat_map(|(_, o)| o.jobs.iter().filter_map(|j| j.queue_ms()))
                .map(|x| (x as f64 / 1000.0).max(1.0).log10())
                .collect();
            q.sort_by(|a, b| a.total_cmp(b));
            let n = q.len().max(1) as f64;
            let step = (q.len() / 400).max(1);
            let mut points: Vec<(f64, f64)> = q
                .iter()
                .enumerate()
                .filter(|(i, _)| i % step == 0 || *i + 1 == q.len())
                .map(|(i, x)| (*x, (i + 1) as f64 / n * 100.0))
                .collect();
            points.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
            Series {
                name: p.policy.clone(),
                points,
                dashed: false,
            }
        })
        .collect();
    std::fs::write(
        dir.join("queueing_cdf.svg"),
        line_chart(
            &format!("Queueing delay CDF: {workload}"),
            "log10(queueing delay, s) (delays under 1 s shown at 0)",
            "jobs (%)",
            &cdf,
            Some(0.0),
        ),
    )?;

    let mut t = String::new();
    let _ = writeln!(t, "workload: {workload}\ncluster:  {cluster}\n");
    let _ = writeln!(
        t,
        "{:<11} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>7} {:>6} {:>6}",
        "policy",
        "avg JCT s",
        "p99 JCT s",
        "queue p50",
        "queue p99",
        "finished",
        "GPU %",
        "preempt",
        "lostGPUh",
        "share",
        "SLO"
    );
    for p in runs {
        let v = &summary["policies"][&p.policy];
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            t,
            "{:<11} {:>10.0} {:>10.0} {:>10.1} {:>10.1} {:>10} {:>8.1} {:>8} {:>7.1} {:>6.3} {:>6.3}",
            p.policy,
            f("avg_jct_s"),
            f("p99_jct_s"),
            f("p50_queue_s"),
            f("p99_queue_s"),
            format!("{}/{}", f("jobs_finished"), f("jobs")),
            f("gpu_alloc_arrivals_pct"),
            f("preemptions"),
            f("lost_gpu_hours"),
            f("share_attainment_mean"),
            f("slo_attainment_mean"),
        );
    }
    for p in published {
        let _ = writeln!(
            t,
            "{:<11} {:>10.0}   (published, Pollux artefact)",
            p.policy, p.mean_jct_s
        );
    }
    let _ = writeln!(
        t,
        "\nwall time {:.1} s; JCT and queueing over jobs that finished / started",
        wall_s
    );
    std::fs::write(dir.join("summary.txt"), &t)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::{run, Options};

    #[test]
    fn a_results_folder_has_every_file_and_means_over_workloads() {
        let spec = crate::synth::Spec::parse("nodes=20,tasks=300,seed=2,services=1").unwrap();
        let (nodes, w) = crate::synth::generate(&spec);
        let o = run(nodes.clone(), &w, &Options::default(), &mut |_, _| {});
        let o2 = run(
            nodes,
            &crate::synth::generate(&crate::synth::Spec { seed: 3, ..spec }).1,
            &Options::default(),
            &mut |_, _| {},
        );
        let (s1, s2) = (o.summary(), o2.summary());
        let dir =
            std::env::temp_dir().join(format!("caravel-replay-report-{}", std::process::id()));
        let runs = vec![PolicyRun {
            policy: "caravel".into(),
            runs: vec![("a".into(), o), ("b".into(), o2)],
        }];
        let v = write(&dir, "w", "c", &runs, &[], 0.5).unwrap();
        for f in [
            "summary.json",
            "summary.txt",
            "jobs-caravel.csv",
            "timeline-caravel.csv",
            "utilisation.svg",
            "queueing_cdf.svg",
        ] {
            assert!(dir.join(f).exists(), "{f}");
        }
        let avg = v["policies"]["caravel"]["avg_jct_s"].as_f64().unwrap();
        assert!((avg - (s1.avg_jct_s + s2.avg_jct_s) / 2.0).abs() < 1e-6);
        let jobs = v["policies"]["caravel"]["jobs"].as_f64().unwrap();
        assert_eq!(jobs as usize, s1.jobs + s2.jobs);
        let csv = std::fs::read_to_string(dir.join("jobs-caravel.csv")).unwrap();
        assert_eq!(csv.lines().count(), 1 + s1.jobs + s2.jobs);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
