//! `caravel bench image`: what running a task in an OCI image costs, and that a burst of
//! tasks of one uncached image downloads each layer once.
//!
//! A server and a sandboxed local agent (as `bench e2e` starts them), Debian's
//! `docker-registry` on loopback and an image built from the machine's static busybox.
//! One job at a time, `true` runs without an image and then in the (cached) image; the
//! figures are the time from submission to the task's end and from the agent's start of
//! the process to its end, whose difference between the two is what the image adds
//! (mounting the overlay, the runtime, its teardown). Then a fresh image (a layer nobody
//! pulled yet) is started by one job of `--tasks` tasks, and the registry's access log
//! says how often each layer was fetched.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use caravel_agent::oci;
use caravel_core::api::{JobDetail, SubmitResponse};
use caravel_core::JobSpec;

use crate::bench::{pct, start_pool_with};
use crate::client::Client;

struct Registry(Child);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_registry(dir: &Path, port: u16) -> Result<Registry> {
    let bin = ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("this bench needs Debian's docker-registry (apt-get install docker-registry)")?;
    std::fs::create_dir_all(dir.join("data"))?;
    std::fs::write(
        dir.join("config.yml"),
        format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: bench\n",
            dir.join("data").display()
        ),
    )?;
    let log = std::fs::File::create(dir.join("registry.log"))?;
    let child = Command::new(bin)
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("the registry did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Registry(child))
}

/// Runs `spec` to its end; (submission to end, process start to end) in ms.
async fn one(c: &Client, spec: &JobSpec) -> Result<(f64, f64)> {
    let r: SubmitResponse = c.post("/v1/jobs", spec).await?;
    loop {
        let j: JobDetail = c.get(&format!("/v1/jobs/{}", r.id)).await?;
        if j.summary.state.is_terminal() {
            if j.summary.state != caravel_core::JobState::Succeeded {
                bail!("job {} ended {:?}: {:?}", r.id, j.summary.state, j.runs);
            }
            let run = j.runs.last().context("a run")?;
            let (s, e) = (
                run.started_ms.context("started")?,
                run.ended_ms.context("ended")?,
            );
            return Ok(((e - j.summary.submitted_ms) as f64, (e - s) as f64));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub async fn bench(jobs: usize, tasks: u32, parent: Option<std::path::PathBuf>) -> Result<i32> {
    let dir = match parent {
        Some(p) => tempfile::tempdir_in(p)?,
        None => tempfile::tempdir()?,
    };
    let busybox = std::fs::read("/bin/busybox")
        .context("this bench needs a static busybox at /bin/busybox (Debian's busybox-static)")?;
    let pool = start_pool_with(dir.path(), false, &[], &[]).await?;
    let c = Client::new(&pool.url, &pool.admin);
    let nodes: Vec<caravel_core::api::NodeView> = c.get("/v1/nodes").await?;
    if !nodes[0].capacity.images {
        bail!(
            "the agent cannot run tasks in images here: {}",
            nodes[0].isolation_missing.join("; ")
        );
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let _reg = start_registry(&dir.path().join("registry"), port)?;
    let host = format!("127.0.0.1:{port}");
    let client = oci::registry::Client::new(vec![]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let base = {
        let t = dir.path().join("busybox");
        std::fs::write(&t, &busybox)?;
        oci::testimage::busybox_layer(&t)?
    };
    oci::push(
        &client,
        &host,
        "bench/busybox",
        "1",
        None,
        vec![base.clone()],
        &Default::default(),
    )
    .await
    .map_err(anyhow::Error::msg)?;

    let mut plain = JobSpec::simple("true", &[]);
    plain.resources.cpu_milli = 100;
    plain.resources.memory_bytes = 32 << 20;
    let mut in_image = plain.clone();
    in_image.image = Some(format!("{host}/bench/busybox:1"));
    // The first start pulls the image; a start in a cached image is what is timed.
    one(&c, &in_image).await?;
    let mut figures = Vec::new();
    for (what, spec) in [("no image", &plain), ("cached image", &in_image)] {
        let (mut total, mut run) = (Vec::new(), Vec::new());
        for _ in 0..jobs {
            let (t, r) = one(&c, spec).await?;
            total.push(t);
            run.push(r);
        }
        let f = (
            pct(&mut total, 50.0),
            pct(&mut total, 95.0),
            pct(&mut run, 50.0),
            pct(&mut run, 95.0),
        );
        println!(
            "{what:<13} submit->end p50 {:>5.0} ms  p95 {:>5.0} ms   process start->end p50 {:>5.0} ms  p95 {:>5.0} ms  ({jobs} jobs, one at a time)",
            f.0, f.1, f.2, f.3
        );
        figures.push(f);
    }
    println!(
        "an image adds          p50 {:>5.0} ms                        p50 {:>5.0} ms",
        figures[1].0 - figures[0].0,
        figures[1].2 - figures[0].2
    );

    // A burst of tasks of an image no node has: a layer of its own on top.
    let fresh = oci::layer::build(&[oci::layer::Entry::File {
        path: "etc/fresh".into(),
        mode: 0o644,
        data: format!("{:?}", Instant::now()).into_bytes(),
    }])?;
    let big = {
        // A second base layer nobody pulled: the busybox one with a file of its own.
        let t = dir.path().join("busybox2");
        std::fs::write(&t, &busybox)?;
        let mut e = vec![oci::layer::Entry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            data: busybox.clone(),
        }];
        for a in ["sh", "true", "cat"] {
            e.push(oci::layer::Entry::Symlink {
                path: format!("bin/{a}"),
                target: "busybox".into(),
            });
        }
        e.push(oci::layer::Entry::File {
            path: "etc/marker".into(),
            mode: 0o644,
            data: b"burst\n".to_vec(),
        });
        oci::layer::build(&e)?
    };
    oci::push(
        &client,
        &host,
        "bench/burst",
        "1",
        None,
        vec![big.clone(), fresh.clone()],
        &Default::default(),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let mut burst = plain.clone();
    burst.image = Some(format!("{host}/bench/burst:1"));
    burst.tasks = tasks;
    burst.resources.cpu_milli = 10;
    let t0 = Instant::now();
    let r: SubmitResponse = c.post("/v1/jobs", &burst).await?;
    loop {
        let j: JobDetail = c.get(&format!("/v1/jobs/{}", r.id)).await?;
        if j.summary.state.is_terminal() {
            if j.summary.state != caravel_core::JobState::Succeeded {
                bail!("the burst ended {:?}", j.summary.state);
            }
            break;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("the burst did not end in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t0.elapsed();
    let log = std::fs::read_to_string(dir.path().join("registry/registry.log"))?;
    let gets = |layer: &[u8]| {
        let d = oci::registry::digest_of(layer);
        log.lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{d} ")))
            .filter(|l| l.contains("\" 200 "))
            .count()
    };
    let (g1, g2) = (gets(&big), gets(&fresh));
    println!(
        "burst: {tasks} tasks of an uncached image ({:.1} MB in 2 layers) all done in {:.2} s; layer downloads: {g1} and {g2}",
        (big.len() + fresh.len()) as f64 / 1e6,
        took.as_secs_f64()
    );
    Ok(if g1 == 1 && g2 == 1 { 0 } else { 1 })
}
