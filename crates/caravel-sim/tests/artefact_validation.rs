//! Validation before any claim: on `openb_pod_list_default`, our BestFit and FGD baselines,
//! run through the production scheduler, must reproduce the FGD artefact's published
//! allocation curves within ±0.5 percentage points at every arrived-load point (mean over
//! the same ten seeds, 42-51).

use std::path::{Path, PathBuf};

use caravel_sched::Policy;
use caravel_sim::{artefact, openb, report};

fn traces() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/traces")
}

#[test]
fn bestfit_and_fgd_reproduce_the_published_curves_within_half_a_point() {
    let t = traces();
    let nodes =
        openb::read_nodes(&t.join("alibaba-gpu-v2023-openb/openb_node_list_gpu_node.csv")).unwrap();
    let pods =
        openb::read_pods(&t.join("alibaba-gpu-v2023-openb/openb_pod_list_default.csv")).unwrap();
    let published =
        artefact::read(&t.join("fgd-atc23-expected-results/analysis_allo_discrete.csv")).unwrap();
    let seeds: Vec<u64> = (42..=51).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let policies = [Policy::BestFit, Policy::Fgd];
    let results = report::run_all(&nodes, &pods, &policies, &seeds, 1.3, threads, &|_, _| {});
    for r in &results {
        let ours = report::mean_curve(&r.curves, false);
        let theirs =
            artefact::mean_curve(&published, "openb_pod_list_default", r.policy.name()).unwrap();
        let mut compared = 0;
        for k in 0..=130 {
            let (a, b) = (ours[k], theirs[k]);
            assert!(
                a.is_finite(),
                "{}: no value of ours at {k} %",
                r.policy.name()
            );
            if !b.is_finite() {
                continue;
            }
            compared += 1;
            assert!(
                (a - b).abs() <= 0.5,
                "{} at {k} % arrived: ours {a:.2} %, artefact {b:.2} %",
                r.policy.name()
            );
        }
        assert!(
            compared >= 130,
            "{}: only {compared} points compared",
            r.policy.name()
        );
    }
}
