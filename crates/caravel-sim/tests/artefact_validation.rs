//! Validation before any claim: on `openb_pod_list_default`, our BestFit and FGD baselines,
//! run through the production scheduler, must reproduce the FGD artefact's published
//! allocation curves within ±0.5 percentage points at every arrived-load point (mean over
//! the same ten seeds, 42-51). Then the claim, from the same runs: Caravel's policy meets
//! the targets (≤ 3.5 % unallocated at 100 % arrived, ≥ 96.5 % allocated at 130 %)
//! and beats FGD at both points.

use std::path::{Path, PathBuf};

use caravel_sched::Policy;
use caravel_sim::{artefact, fgd, openb, report};

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
    let policies = [Policy::BestFit, Policy::Fgd, Policy::Caravel];
    let results = report::run_all(
        &nodes,
        &pods,
        &policies,
        &seeds,
        fgd::Setup::default(),
        threads,
        &|_, _| {},
    );
    let at = |p: Policy, k: usize| {
        let r = results.iter().find(|r| r.policy == p).unwrap();
        report::mean_curve(&r.curves, false)[k]
    };
    let (caravel100, caravel130) = (at(Policy::Caravel, 100), at(Policy::Caravel, 130));
    assert!(
        100.0 - caravel100 <= 3.5,
        "Caravel leaves {:.2} % unallocated at 100 % arrived (target ≤ 3.5 %)",
        100.0 - caravel100
    );
    assert!(
        caravel130 >= 96.5,
        "Caravel allocates {caravel130:.2} % at 130 % arrived (target ≥ 96.5 %)"
    );
    assert!(caravel100 > at(Policy::Fgd, 100) && caravel130 > at(Policy::Fgd, 130));
    for r in results.iter().filter(|r| r.policy != Policy::Caravel) {
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
