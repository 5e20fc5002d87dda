//! `caravel up` and `caravel down`: a whole pool on one machine, started and stopped.
//!
//! The server's lock on its data directory (`caravel_server::datadir`) is what both ends
//! go by: `up` refuses a directory a server already holds (naming its pid) instead of
//! starting a second owner of the same store, and `down` signals the holder and waits for
//! the lock to be let go, which happens only once that process is gone.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use caravel_core::api::NodeView;
use caravel_core::quantity::parse_duration_ms;
use caravel_server::datadir;
use tokio::signal::unix::Signal;

use crate::client::{self, Client, ClientConfig};
use crate::{DownArgs, UpArgs};

/// `up`'s and `down`'s default `--data-dir`.
pub const DEFAULT_DATA_DIR: &str = "./caravel-data";

/// Fails when a server already holds `dir`, saying how to stop it.
fn ensure_free(dir: &Path) -> Result<()> {
    if let Some(pid) = datadir::holder(dir)? {
        bail!(
            "a Caravel server is already running on {}{}; `{}` stops it",
            dir.display(),
            pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
            down_command(dir)
        );
    }
    Ok(())
}

pub async fn up(a: UpArgs) -> Result<i32> {
    if a.detach && a.data_dir.exists() {
        if let Some(code) = already_up(&a).await? {
            return Ok(code);
        }
    }
    if a.data_dir.exists() {
        ensure_free(&a.data_dir)?;
    }
    if a.detach {
        return detach(a).await;
    }
    let data_dir = std::path::absolute(&a.data_dir)?;
    let mut cfg = caravel_server::ServerConfig::new(data_dir.clone(), a.listen);
    if a.tls {
        cfg.tls = Some(caravel_server::Tls::SelfSigned { names: vec![] });
    }
    let s = caravel_server::start(cfg).await?;
    let url = s.url();
    let p = client::write_config(&ClientConfig {
        server: Some(url.clone()),
        token: s.admin_token.clone(),
        ca: s.ca.clone(),
    })?;
    let mut agent = caravel_agent::AgentConfig::new(
        url.clone(),
        s.agent_token.clone().unwrap_or_default(),
        "local".into(),
        data_dir.join("agent"),
    );
    agent.gpus = a.gpus.map(|g| g.0).unwrap_or_default();
    agent.listen = "127.0.0.1:0".parse().expect("addr");
    agent.advertise = Some("127.0.0.1".into());
    // Every pool's agent is called `local`; its cgroups are named after the data
    // directory, so two pools on one machine do not kill each other's tasks.
    agent.cgroup_name = Some(local_cgroup_name(&data_dir));
    agent.ca = s.ca.clone();
    a.tasks.apply(&mut agent);
    agent.watchdog_exe = std::env::current_exe().ok();
    let agent = caravel_agent::start(agent).await?;
    tokio::spawn(agent.clone().main_loop());
    println!("caravel is up at {url}");
    println!(
        "client config written to {} (admin token inside)",
        p.display()
    );
    println!("try: caravel submit --wait -- echo hello from caravel");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = s.wait() => r?,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // Runs are stopped and requeued (each ends `preempted`, using no retry) and start
    // again when the pool is next up; whatever is left dies with the process.
    stop_agent(&agent, &mut term).await;
    tracing::info!("caravel pool stopped");
    Ok(0)
}

/// A clean stop of `agent` after the first SIGTERM or Ctrl-C: its runs are handed back
/// (each task gets its kill grace). A second signal stops waiting, as `docker compose`
/// does: what still runs then dies with the process.
pub async fn stop_agent(agent: &Arc<caravel_agent::Agent>, term: &mut Signal) {
    eprintln!("stopping: handing running tasks back (Ctrl-C again to stop at once)");
    tokio::select! {
        _ = agent.shut_down() => {}
        _ = tokio::signal::ctrl_c() => eprintln!("stopping at once"),
        _ = term.recv() => eprintln!("stopping at once"),
    }
    agent.cgroups().destroy();
}

/// `up --detach` on a directory whose pool is already up and answering is a success, as
/// `docker compose up -d` is on a running project: it says where, points the client
/// config at it again, and starts nothing. `None`: no pool answers for this directory.
async fn already_up(a: &UpArgs) -> Result<Option<i32>> {
    let Some(pid) = datadir::holder(&a.data_dir)? else {
        return Ok(None);
    };
    let (Some(url), Ok(tok)) = (
        datadir::url(&a.data_dir),
        std::fs::read_to_string(a.data_dir.join("admin.token")),
    ) else {
        return Ok(None);
    };
    let ca = pool_ca(&a.data_dir, &url)?;
    let c = Client::with_ca(&url, tok.trim(), ca.as_deref())?;
    match c.get::<Vec<NodeView>>("/v1/nodes").await {
        Ok(nodes) if !nodes.is_empty() => {}
        _ => return Ok(None),
    }
    client::write_config(&ClientConfig {
        server: Some(url.clone()),
        token: Some(tok.trim().to_string()),
        ca,
    })?;
    println!(
        "caravel is already up at {url}{}; `{}` stops it",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        down_command(&a.data_dir)
    );
    Ok(Some(0))
}

/// The CA of the pool in `dir` when its server speaks https: the one it made itself.
fn pool_ca(dir: &Path, url: &str) -> Result<Option<std::path::PathBuf>> {
    Ok(url
        .starts_with("https://")
        .then(|| std::path::absolute(dir.join("tls").join("ca.pem")))
        .transpose()?)
}

fn down_command(dir: &Path) -> String {
    if dir == Path::new(DEFAULT_DATA_DIR) {
        "caravel down".to_string()
    } else {
        format!("caravel down --data-dir {}", dir.display())
    }
}

/// `up --detach`: starts `caravel up` in its own process group and returns once the pool
/// answers with its node, or fails with what the child said if it exits first.
async fn detach(a: UpArgs) -> Result<i32> {
    let exe = std::env::current_exe()?;
    std::fs::create_dir_all(&a.data_dir)?;
    let log_path = a.data_dir.join("up.log");
    // Appended to, never truncated: an earlier run's log may be all there is to read.
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let mark = format!(
        "==== caravel up --detach (unix time {})",
        caravel_server::now_ms() / 1000
    );
    writeln!(log, "{mark}")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("up")
        .arg("--data-dir")
        .arg(&a.data_dir)
        .arg("--listen")
        .arg(a.listen.to_string());
    if let Some(g) = &a.gpus {
        let s: Vec<String> = g.0.iter().map(|(m, c)| format!("{m}:{c}")).collect();
        cmd.arg("--gpus").arg(s.join(","));
    }
    if a.tls {
        cmd.arg("--tls");
    }
    cmd.args(a.tasks.to_args());
    use std::os::unix::process::CommandExt;
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let mut child = cmd.spawn()?;
    let url = format!("{}://{}", if a.tls { "https" } else { "http" }, a.listen);
    let ca = pool_ca(&a.data_dir, &url)?;
    let admin = a.data_dir.join("admin.token");
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(status) = child.try_wait()? {
            let said = last_error(&log_path, &mark).unwrap_or_else(|| status.to_string());
            bail!(
                "the pool stopped while starting: {said} (log: {})",
                log_path.display()
            );
        }
        // The token is this data directory's: only the server that holds it accepts it,
        // so another pool answering on the same address does not count.
        // The CA is written before the server listens: a client made before it exists
        // would fail, so wait for it too.
        let ca_ready = ca.as_ref().is_none_or(|p| p.exists());
        if let (Ok(tok), true) = (std::fs::read_to_string(&admin), ca_ready) {
            let c = Client::with_ca(&url, tok.trim(), ca.as_deref())?;
            if let Ok(nodes) = c.get::<Vec<NodeView>>("/v1/nodes").await {
                if !nodes.is_empty() {
                    println!(
                        "caravel is up at {url} (pid {}, log {}); `{}` stops it",
                        child.id(),
                        log_path.display(),
                        down_command(&a.data_dir)
                    );
                    return Ok(0);
                }
            }
        }
    }
    // Nothing half-started is left behind.
    let _ = child.kill();
    let _ = child.wait();
    bail!(
        "the pool did not come up within 20 s and was stopped; see {}",
        log_path.display()
    );
}

/// The child's `error: ...` line from this start's part of the log.
fn last_error(log: &Path, mark: &str) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let ours = &text[text.rfind(mark)?..];
    ours.lines()
        .rev()
        .find_map(|l| l.strip_prefix("error: "))
        .map(str::to_string)
}

pub async fn down(a: DownArgs) -> Result<i32> {
    let timeout = Duration::from_millis(
        parse_duration_ms(&a.timeout).map_err(|e| anyhow!("--timeout: {e}"))?,
    );
    let dir = &a.data_dir;
    let pid = match datadir::holder(dir)? {
        None => {
            println!("no Caravel server is running on {}", dir.display());
            return Ok(0);
        }
        Some(None) => bail!(
            "a server holds {} but {} names no pid; stop it by hand",
            dir.display(),
            dir.join(datadir::LOCK_FILE).display()
        ),
        Some(Some(pid)) => pid,
    };
    signal(pid, rustix::process::Signal::TERM)?;
    if wait_free(dir, pid, timeout).await? {
        println!(
            "stopped the Caravel server on {} (pid {pid})",
            dir.display()
        );
        return Ok(0);
    }
    signal(pid, rustix::process::Signal::KILL)?;
    if wait_free(dir, pid, Duration::from_secs(10)).await? {
        println!(
            "the Caravel server on {} (pid {pid}) did not stop within {}; killed it",
            dir.display(),
            a.timeout
        );
        return Ok(0);
    }
    bail!(
        "the Caravel server on {} (pid {pid}) is still running after SIGKILL",
        dir.display()
    );
}

fn signal(pid: u32, sig: rustix::process::Signal) -> Result<()> {
    let p = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| anyhow!("pid {pid} out of range"))?;
    match rustix::process::kill_process(p, sig) {
        // Gone between the lock check and the signal: what we wanted anyway.
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => bail!("signalling pid {pid}: {e}"),
    }
}

/// Has process `pid` exited? A zombie has (only its parent's wait is missing).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// Waits until nobody holds `dir` (true) or `limit` passes (false); then, briefly, for
/// process `pid` to be gone too: the lock goes with the server's last handle on it, a
/// moment before the process has exited. (Only briefly, and never signalled again: once
/// the lock is free the pid is no longer known to be the server's.)
async fn wait_free(dir: &Path, pid: u32, limit: Duration) -> Result<bool> {
    let t0 = Instant::now();
    while datadir::holder(dir)?.is_some() {
        if t0.elapsed() >= limit {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t1 = Instant::now();
    while !exited(pid) && t1.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(true)
}

/// `local-` and a hash of the data directory's absolute path.
fn local_cgroup_name(data_dir: &std::path::Path) -> String {
    let abs = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    // FNV-1a: stable across builds and runs (std's hasher is seeded per process).
    let h = abs
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ *b as u64).wrapping_mul(0x100000001b3)
        });
    format!("local-{:016x}", h)
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_data_directory_gets_its_own_cgroup_folder() {
        let a = super::local_cgroup_name(std::path::Path::new("/srv/a"));
        assert_eq!(a, super::local_cgroup_name(std::path::Path::new("/srv/a")));
        assert_ne!(a, super::local_cgroup_name(std::path::Path::new("/srv/b")));
        assert!(a.starts_with("local-"), "{a}");
    }

    use super::*;

    #[test]
    fn the_childs_error_is_read_from_its_own_part_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("up.log");
        std::fs::write(
            &log,
            "==== caravel up --detach (unix time 1)\nerror: old failure\n\
             ==== caravel up --detach (unix time 2)\nINFO starting\n\
             error: listening on 127.0.0.1:7080: Address already in use (os error 98)\n",
        )
        .unwrap();
        assert_eq!(
            last_error(&log, "==== caravel up --detach (unix time 2)").as_deref(),
            Some("listening on 127.0.0.1:7080: Address already in use (os error 98)")
        );
        // A start that printed no error line yet says nothing, not the old run's error.
        std::fs::write(
            &log,
            "==== caravel up --detach (unix time 1)\nerror: old failure\n\
             ==== caravel up --detach (unix time 2)\nINFO starting\n",
        )
        .unwrap();
        assert_eq!(
            last_error(&log, "==== caravel up --detach (unix time 2)"),
            None
        );
    }
}
