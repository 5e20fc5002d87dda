//! Shipped working directories: a folder on the submitter's machine becomes every task's
//! working directory on whatever node runs it, with no shared filesystem.

use serde_json::json;

use crate::harness::*;

/// A small project: a script that imports a module of its own, data it reads, and files
/// ignore rules leave out.
fn project(dir: &std::path::Path) {
    std::fs::create_dir_all(dir.join("pkg")).unwrap();
    std::fs::create_dir_all(dir.join("cache")).unwrap();
    std::fs::write(dir.join("pkg/__init__.py"), "").unwrap();
    std::fs::write(dir.join("pkg/model.py"), "NAME = 'tiny-model'\n").unwrap();
    std::fs::write(dir.join("params.txt"), "lr=0.1\n").unwrap();
    std::fs::write(dir.join("cache/blob.bin"), vec![7u8; 4096]).unwrap();
    std::fs::write(dir.join("debug.log"), "noise\n").unwrap();
    std::fs::write(dir.join(".gitignore"), "*.log\n").unwrap();
    std::fs::write(dir.join(".caravelignore"), "cache/\n").unwrap();
    std::fs::write(
        dir.join("train.py"),
        r#"import os, sys
from pkg.model import NAME
params = open("params.txt").read().strip()
seen = sorted(os.listdir("."))
# Each task has its own copy: what another task wrote is not here.
others = [f for f in seen if f.startswith("written-by-")]
open(f"written-by-{os.environ['CARAVEL_TASK_INDEX']}", "w").write("x")
print(f"task {os.environ['CARAVEL_TASK_INDEX']} cwd={os.getcwd()} model={NAME} {params} others={others} files={seen}")
"#,
    )
    .unwrap();
}

#[test]
fn a_folder_becomes_every_tasks_working_directory_on_any_node() {
    let mut p = Pool::server_only("workdir");
    p.bare_agents = true;
    p.start_agent("a", &["--cpus", "1"]);
    p.start_agent("b", &["--cpus", "1"]);
    p.wait_nodes_ready(2);
    let proj = p.file("project");
    project(&proj);
    let dir = proj.to_str().unwrap();
    let out = p.cli(&[
        "submit",
        "--wait",
        "-n",
        "2",
        "--cpus",
        "1",
        "--workdir",
        dir,
        "--",
        "python3",
        "train.py",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("uploaded"), "{err}");
    let j = p.job(&p.admin, 1);
    let nodes: std::collections::BTreeSet<&str> = j["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes.len(), 2, "one task on each node: {j}");
    for t in 0..2 {
        let log = p.logs(1, t, "stdout");
        assert!(
            log.starts_with(&format!(
                "task {t} cwd=/caravel/work model=tiny-model lr=0.1 others=[]"
            )),
            "{log}"
        );
        // What the ignore rules name stayed home.
        assert!(
            log.contains("'params.txt'") && log.contains("'pkg'"),
            "{log}"
        );
        assert!(
            !log.contains("debug.log") && !log.contains("'cache'"),
            "{log}"
        );
    }
    // Unchanged: not uploaded again.
    let out = p.cli(&[
        "submit",
        "--wait",
        "--workdir",
        dir,
        "--",
        "python3",
        "train.py",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("already on the server"),
        "{err}"
    );
    // A job file names it relative to itself.
    std::fs::write(
        p.file("job.toml"),
        "command = \"python3\"\nargs = [\"train.py\"]\nworkdir = \"project\"\n",
    )
    .unwrap();
    let out = p.cli(&[
        "submit",
        "--wait",
        "-f",
        p.file("job.toml").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spec = &p.job(&p.admin, 3)["spec"];
    assert_eq!(spec["workdir"], p.job(&p.admin, 1)["spec"]["workdir"]);
}

#[test]
fn a_tenant_uses_only_its_own_working_directories_within_its_limits() {
    let p = Pool::with_server_args("workdir-lim", &["--workdir-max-size", "64Ki"], &[]);
    let mk = |name: &str, quota: serde_json::Value| {
        let t = p
            .post(
                &p.admin,
                "/v1/tenants",
                &json!({"name": name, "quota": quota}),
            )
            .unwrap();
        t["token"].as_str().unwrap().to_string()
    };
    let a = mk("ta", json!({}));
    let b = mk("tb", json!({}));
    let small = mk("small", json!({"storage_bytes": 20 << 10}));
    let proj = p.file("p");
    std::fs::create_dir_all(&proj).unwrap();
    std::fs::write(proj.join("run.sh"), "echo hi\n").unwrap();
    let out = p.cli_as(
        &a,
        &[
            "submit",
            "--workdir",
            proj.to_str().unwrap(),
            "--",
            "sh",
            "run.sh",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = p.job(&p.admin, 1)["spec"]["workdir"]
        .as_str()
        .unwrap()
        .to_string();
    // B may not use A's, nor learn that it exists.
    let (code, e) = p
        .post(
            &b,
            "/v1/jobs",
            &json!({"command": "sh", "args": ["run.sh"], "workdir": digest}),
        )
        .unwrap_err();
    assert_eq!(
        (code, e["error"]["field"].as_str()),
        (400, Some("workdir")),
        "{e}"
    );
    let head = |tok: &str| {
        let c = reqwest::blocking::Client::new();
        c.head(format!("{}/v1/workdirs/{digest}", p.url))
            .bearer_auth(tok)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(head(&a), 200);
    assert_eq!(head(&b), 404);
    // Past the server's size limit, and past a tenant's storage quota: clear refusals.
    std::fs::write(proj.join("big.bin"), vec![1u8; 100 << 10]).unwrap();
    let out = p.cli_as(
        &a,
        &["submit", "--workdir", proj.to_str().unwrap(), "--", "true"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--workdir-max-size"),
        "{err}"
    );
    std::fs::write(proj.join("big.bin"), vec![1u8; 30 << 10]).unwrap();
    let out = p.cli_as(
        &small,
        &["submit", "--workdir", proj.to_str().unwrap(), "--", "true"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("storage quota"),
        "{err}"
    );
    // Bad uploads: a body that is not what its name says, an archive with a device.
    let put = |tok: &str, name: &str, body: Vec<u8>| {
        let c = reqwest::blocking::Client::new();
        let r = c
            .put(format!("{}/v1/workdirs/{name}", p.url))
            .bearer_auth(tok)
            .body(body)
            .send()
            .unwrap();
        (
            r.status().as_u16(),
            r.json::<serde_json::Value>().unwrap_or_default(),
        )
    };
    let (code, e) = put(
        &a,
        &format!("sha256:{}", "0".repeat(64)),
        b"not it".to_vec(),
    );
    assert_eq!(
        (code, e["error"]["field"].as_str()),
        (400, Some("digest")),
        "{e}"
    );
    let (code, e) = put(&a, "sha256:XYZ", vec![]);
    assert_eq!(
        (code, e["error"]["field"].as_str()),
        (400, Some("digest")),
        "{e}"
    );
    let mut ar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Char);
    h.set_size(0);
    h.set_cksum();
    ar.append_data(&mut h, "null", std::io::empty()).unwrap();
    let body = ar.into_inner().unwrap();
    use sha2::Digest;
    let name = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body)));
    let (code, e) = put(&a, &name, body);
    assert_eq!(
        (code, e["error"]["field"].as_str()),
        (400, Some("body")),
        "{e}"
    );
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not a file, folder or link"));
}
