//! Validation before any claim: on `openb_pod_list_default`, our BestFit and FGD baselines,
//! run through the production scheduler, must reproduce the FGD artefact's published
//! allocation curves within ±0.5 percentage points at every arrived-load point (mean over
//! the same ten seeds, 42-51). Then the claim, from the same runs: Caravel's policy as the
//! server runs it (every pod that fits is placed) beats FGD at 100 % and 130 % arrived.
//! And, labelled as what it is: the simulator-only share-pacing experiment (`--pacing
//! 0.9`, which turns pods away) meets issue #4's targets (≤ 3.5 % unallocated at 100 %,
//! ≥ 96.5 % allocated at 130 %), which no policy that places every pod that fits can
//! (docs/simulator.md, the LP bound).

use std::path::{Path, PathBuf};

use caravel_sim::baselines::Policy;
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
    assert!(caravel100 > at(Policy::Fgd, 100) && caravel130 > at(Policy::Fgd, 130));
    assert!(
        caravel100 >= 96.0 && caravel130 >= 96.1,
        "the server's policy allocates {caravel100:.2} % at 100 % and {caravel130:.2} % at \
         130 % (measured 96.15 and 96.27 %)"
    );
    let paced = report::run_all(
        &nodes,
        &pods,
        &[Policy::Caravel],
        &seeds,
        fgd::Setup {
            pacing: Some(fgd::PACING_EXPERIMENT),
            ..fgd::Setup::default()
        },
        threads,
        &|_, _| {},
    );
    let paced_at = |k: usize| report::mean_curve(&paced[0].curves, false)[k];
    let (caravel100, caravel130) = (paced_at(100), paced_at(130));
    assert!(
        100.0 - caravel100 <= 3.5,
        "the pacing experiment leaves {:.2} % unallocated at 100 % arrived (target ≤ 3.5 %)",
        100.0 - caravel100
    );
    assert!(
        caravel130 >= 96.5,
        "the pacing experiment allocates {caravel130:.2} % at 130 % arrived (target ≥ 96.5 %)"
    );
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
