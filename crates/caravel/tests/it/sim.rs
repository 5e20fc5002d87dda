//! `caravel sim replay` as a user runs it: a results folder from real traces, and bad
//! flags refused with the flag named.

use std::path::PathBuf;
use std::process::Command;

use crate::harness::BIN;

fn traces() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/traces")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("caravel-it-sim-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn sim(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(BIN)
        .arg("sim")
        .arg("replay")
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[test]
fn replay_writes_a_results_folder_and_sets_published_results_beside_ours() {
    let t = traces();
    let out = tmp("pollux");
    let jobs = format!(
        "pollux:{}",
        t.join("philly-pollux/workloads/workload-1.csv").display()
    );
    let publ = t.join("philly-pollux/results-jobload");
    let (rc, stdout, stderr) = sim(&[
        "--jobs",
        &jobs,
        "--cluster",
        "pool:16x4:T4",
        "--gpus-per-node",
        "4",
        "--policy",
        "caravel,bestfit",
        "--published",
        publ.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "{stderr}");
    assert!(
        stdout.contains("tiresias") && stdout.contains("caravel"),
        "{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(
        v["policies"]["caravel"]["jobs_finished"].as_f64(),
        Some(160.0)
    );
    assert!(v["policies"]["caravel"]["avg_jct_s"].as_f64().unwrap() > 0.0);
    assert_eq!(
        v["published"]["tiresias"]["avg_jct_s"].as_f64(),
        Some(4038.18203125)
    );
    for f in [
        "jobs-caravel.csv",
        "timeline-bestfit.csv",
        "utilisation.svg",
        "queueing_cdf.svg",
        "summary.txt",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    std::fs::remove_dir_all(&out).unwrap();

    // The same workload under least-attained-service order (Tiresias' 16 GPU-hour
    // boundary): long gangs are preempted for short jobs, which no longer wait behind them.
    let fifo = v["policies"]["caravel"].clone();
    assert_eq!(fifo["preemptions"].as_f64(), Some(0.0));
    let (rc, _, stderr) = sim(&[
        "--jobs",
        &jobs,
        "--cluster",
        "pool:16x4:T4",
        "--gpus-per-node",
        "4",
        "--published",
        publ.to_str().unwrap(),
        "--las",
        "16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let las = &v["policies"]["caravel"];
    assert_eq!(las["jobs_finished"].as_f64(), Some(160.0));
    assert!(las["preemptions"].as_f64().unwrap() > 0.0, "{las}");
    let (a, b) = (
        las["avg_jct_s"].as_f64().unwrap(),
        fifo["avg_jct_s"].as_f64().unwrap(),
    );
    assert!(a < b, "LAS avg JCT {a} s, FIFO {b} s");
    std::fs::remove_dir_all(&out).unwrap();

    // Services from a real request trace on a synthetic pool.
    let out = tmp("synthetic");
    let svc = format!(
        "genai:{}",
        t.join("alibaba-genai-v2026/lora_request_trace.csv")
            .display()
    );
    let (rc, _, stderr) = sim(&[
        "--jobs",
        "synthetic:nodes=20,tasks=200,seed=4,services=0",
        "--service",
        &svc,
        "--model",
        "A100",
        "--days",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let s = &v["policies"]["caravel"]["services"][0];
    assert_eq!(s["name"], "genai:lora_request_trace");
    assert!(s["slo_attainment"].as_f64().unwrap() > 0.0, "{s}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bad_replay_flags_name_the_flag_and_write_nothing() {
    let out = tmp("bad");
    let o = out.to_str().unwrap();
    for (args, want) in [
        (vec!["--jobs", "slurm:x"], "--jobs"),
        (
            vec![
                "--jobs",
                "philly:/nonexistent.csv",
                "--cluster",
                "pool:2x8:A100",
            ],
            "does not exist",
        ),
        (
            vec!["--jobs", "synthetic:nodes=3"],
            "nodes must be at least 10",
        ),
        (
            vec!["--jobs", "synthetic:nodes=20", "--policy", "fastest"],
            "--policy",
        ),
        (
            vec!["--jobs", "synthetic:nodes=20", "--cluster", "pool:2x"],
            "--cluster",
        ),
        (
            vec!["--jobs", "synthetic:nodes=20", "--cycle-ms", "0"],
            "--cycle-ms",
        ),
        (
            vec!["--jobs", "synthetic:nodes=20", "--days", "0"],
            "--days",
        ),
        (vec!["--jobs", "none"], "--service"),
        (
            vec!["--jobs", "synthetic:nodes=20", "--las", "lots"],
            "--las: \"lots\" is not a number",
        ),
        (
            vec!["--jobs", "synthetic:nodes=20", "--las", "16,4"],
            "--las: boundaries must be ascending",
        ),
        (
            vec!["--jobs", "synthetic:nodes=20", "--las", "0"],
            "--las: \"0\": a boundary must be a positive",
        ),
        (
            vec!["--jobs", "synthetic:nodes=20", "--las-slice-s", "60"],
            "--las-slice-s: only with --las",
        ),
        (
            vec!["--jobs", "synthetic:nodes=20", "--reservations", "0"],
            "--reservations <RESERVATIONS>': must be at least 1",
        ),
    ] {
        let mut a = args.clone();
        a.extend(["--out", o]);
        let (rc, _, stderr) = sim(&a);
        assert_ne!(rc, 0, "{args:?}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!out.exists(), "{args:?} wrote results");
    }
    // A malformed trace row: file, line and reason.
    let bad =
        std::env::temp_dir().join(format!("caravel-it-bad-philly-{}.csv", std::process::id()));
    std::fs::write(
        &bad,
        "timestamp,duration,num_gpus,gpu_time,cluster\n2017-10-09 07:01:55,66.0,zero,66.0,a\n",
    )
    .unwrap();
    let jobs = format!("philly:{}", bad.display());
    let (rc, _, stderr) = sim(&["--jobs", &jobs, "--cluster", "pool:2x8:A100", "--out", o]);
    assert_ne!(rc, 0);
    assert!(stderr.contains(":2: num_gpus"), "{stderr}");
    std::fs::remove_file(&bad).unwrap();

    // The server takes the same LAS flag and refuses it the same way, before it starts.
    let data = tmp("server-las");
    for (args, want) in [
        (vec!["--las", "16,4"], "--las: boundaries must be ascending"),
        (vec!["--las-slice", "10s"], "--las-slice: only with --las"),
        (vec!["--starvation", "soon"], "--starvation"),
        (
            vec!["--reservations", "two"],
            "\"two\" is not a whole number",
        ),
        (vec!["--reservations", "5000"], "5000 is more than 1024"),
        (
            vec!["--lost-after", "5s", "--heartbeat", "2s"],
            "--lost-after 5000 ms: must be at least 3 × --heartbeat (2000 ms)",
        ),
        (
            vec!["--heartbeat", "0s"],
            "--heartbeat: must be more than 0",
        ),
    ] {
        let o = Command::new(BIN)
            .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_ne!(o.status.code(), Some(0), "{args:?}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!data.exists(), "{args:?} created the data directory");
    }
}
