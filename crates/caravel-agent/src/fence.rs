//! The fence's deadline, enforced by a process other than the agent.
//!
//! A fenced run (`Assignment::fence`) must be dead before the server may start it
//! elsewhere: a lost timeout after the server last heard from the node. The agent's own
//! fence loop kills such runs in time while the agent runs; but a frozen agent
//! (SIGSTOPped, stuck in the kernel, swapped out, starved) cannot, while its tasks go on.
//! So the deadline also lives outside it:
//!
//! - The agent writes a **lease** (`DIR/lease`): the instant, on `CLOCK_BOOTTIME`, by
//!   which fenced runs must be dead unless the agent hears from the server again. Each
//!   answered request moves it on; nothing else does.
//! - Each fenced run has a **target** file (`DIR/runs/<run>`), written before the task's
//!   first instruction runs, naming its cgroups (and, once known, its process group).
//! - A **watchdog**, a separate small process started with the agent in a process group
//!   of its own, reads the lease every 100 ms and, once it is past, SIGKILLs every
//!   process of every target and renames the target `<run>.fenced` (the agent reports
//!   the run as `fenced` when it looks). It needs nothing from the agent to act: a frozen
//!   agent's runs die on time.
//!
//! The watchdog leaves when the agent does (its parent changes): the agent's tasks die
//! with it anyway (`PR_SET_PDEATHSIG`). It is not hardened against a task of the same
//! uid killing it; tasks run as their tenants' uids, never the agent's.

use std::io::{self, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// `CLOCK_BOOTTIME` in nanoseconds: counts suspended time, as the server's clock does.
pub fn boottime_ns() -> i64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// A lease record: the deadline and its complement, so a torn read is recognised.
fn encode(deadline: i64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&deadline.to_le_bytes());
    b[8..].copy_from_slice(&(!deadline).to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<i64> {
    if b.len() != 16 {
        return None;
    }
    let d = i64::from_le_bytes(b[..8].try_into().ok()?);
    let c = i64::from_le_bytes(b[8..].try_into().ok()?);
    (c == !d).then_some(d)
}

/// The agent's side: the lease and the targets.
pub struct Fence {
    dir: PathBuf,
    lease: Mutex<(std::fs::File, i64)>,
}

impl Fence {
    /// Makes `dir` afresh (targets of an earlier agent's runs are void: those runs died
    /// with it) with no deadline yet.
    pub fn open(dir: &Path) -> io::Result<Fence> {
        let runs = dir.join("runs");
        let _ = std::fs::remove_dir_all(&runs);
        std::fs::create_dir_all(&runs)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(dir.join("lease"))?;
        f.write_all(&encode(0))?;
        f.rewind()?;
        Ok(Fence {
            dir: dir.to_path_buf(),
            lease: Mutex::new((f, 0)),
        })
    }

    /// Moves the deadline to `deadline` (boot-time ns) if that is later than the one
    /// written. Written in place (the watchdog reads the same file), 16 bytes at offset 0.
    pub fn renew(&self, deadline: i64) {
        let mut l = self.lease.lock().expect("lock");
        // Small steps are not worth a write; the deadline only ever moves on.
        if deadline <= l.1 + 20_000_000 {
            return;
        }
        if let Err(e) = l.0.write_all_at(&encode(deadline), 0) {
            tracing::warn!("fence: cannot renew the lease: {e}");
            return;
        }
        l.1 = deadline;
    }

    fn target(&self, run: u64) -> PathBuf {
        self.dir.join("runs").join(run.to_string())
    }

    /// Puts a run under the watchdog. Called before the task starts (with its cgroups)
    /// and again once its process group is known.
    pub fn guard(&self, run: u64, pgid: Option<i32>, cgroups: &[PathBuf]) -> io::Result<()> {
        let mut text = String::new();
        if let Some(p) = pgid {
            text.push_str(&format!("pgid {p}\n"));
        }
        for c in cgroups {
            text.push_str(&format!("cgroup {}\n", c.display()));
        }
        let path = self.target(run);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)
    }

    /// Takes a run from the watchdog: true if the watchdog killed it.
    pub fn release(&self, run: u64) -> bool {
        let path = self.target(run);
        let _ = std::fs::remove_file(&path);
        let fenced = path.with_extension("fenced");
        std::fs::remove_file(fenced).is_ok()
    }

    /// Starts the watchdog: `exe __fence-watchdog DIR AGENT_PID`, in a process group of its own (a
    /// signal to the agent's group does not reach it).
    pub fn start_watchdog(&self, exe: &Path) -> io::Result<std::process::Child> {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(exe)
            .arg(WATCHDOG_ARG)
            .arg(&self.dir)
            .arg(std::process::id().to_string())
            .stdin(std::process::Stdio::null())
            .process_group(0)
            .spawn()
    }
}

/// Reaps the watchdog and starts it again if it ends while the agent runs (killed by
/// someone, or crashed): a fenced run is never left without one for more than a second.
pub fn supervise(fence: std::sync::Arc<Fence>, exe: PathBuf, mut child: std::process::Child) {
    std::thread::Builder::new()
        .name("fence-watchdog".into())
        .spawn(move || loop {
            let st = child.wait();
            tracing::warn!("fence: the watchdog ended ({st:?}); starting it again");
            std::thread::sleep(Duration::from_secs(1));
            match fence.start_watchdog(&exe) {
                Ok(c) => child = c,
                Err(e) => {
                    tracing::error!("fence: cannot start the watchdog again: {e}; fenced runs depend on the agent alone");
                    return;
                }
            }
        })
        .expect("spawning a thread");
}

/// The hidden first argument that makes the `caravel` binary a watchdog.
pub const WATCHDOG_ARG: &str = "__fence-watchdog";

fn read_lease(f: &std::fs::File) -> Option<i64> {
    let mut b = [0u8; 16];
    let n = f.read_at(&mut b, 0).ok()?;
    decode(&b[..n])
}

/// One target file: its process group and cgroup folders.
fn parse_target(text: &str) -> (Option<i32>, Vec<PathBuf>) {
    let mut pgid = None;
    let mut cgroups = Vec::new();
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("pgid ") {
            pgid = p.trim().parse().ok().filter(|p: &i32| *p > 1);
        } else if let Some(c) = line.strip_prefix("cgroup ") {
            cgroups.push(PathBuf::from(c));
        }
    }
    (pgid, cgroups)
}

/// SIGKILLs every process of a target: each of its cgroups until they are empty (a
/// process forking meanwhile is caught on the next pass), and its process group.
fn kill_target(pgid: Option<i32>, cgroups: &[PathBuf]) -> usize {
    let mut killed = 0;
    if let Some(p) = pgid {
        if crate::signal_group(p, rustix::process::Signal::KILL) {
            killed += 1;
        }
    }
    for _ in 0..50 {
        let mut any = false;
        for c in cgroups {
            let Ok(procs) = std::fs::read_to_string(c.join("cgroup.procs")) else {
                continue;
            };
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                any = true;
                if crate::signal_process(pid, rustix::process::Signal::KILL) {
                    killed += 1;
                }
            }
        }
        if !any {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    killed
}

/// Kills every target of `dir` now. Returns the runs fenced.
fn fence_all(dir: &Path) -> Vec<String> {
    let mut fenced = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir.join("runs")) else {
        return fenced;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some() {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let (pgid, cgroups) = parse_target(&text);
        kill_target(pgid, &cgroups);
        let _ = std::fs::rename(&path, path.with_extension("fenced"));
        fenced.push(e.file_name().to_string_lossy().into_owned());
    }
    fenced
}

/// One look at the lease: past it, every target is killed. Returns the runs fenced and
/// how far past the deadline it was (ns).
fn turn(dir: &Path, lease: &std::fs::File) -> (Vec<String>, i64) {
    let Some(deadline) = read_lease(lease) else {
        return (vec![], 0);
    };
    let now = boottime_ns();
    if deadline == 0 || now < deadline {
        return (vec![], 0);
    }
    (fence_all(dir), now - deadline)
}

/// The watchdog's main loop (`caravel __fence-watchdog DIR AGENT_PID`). Returns when the
/// agent that started it is gone (this process is no longer its child) or `DIR` is.
pub fn watchdog_main(dir: &Path, agent: i32) -> io::Result<()> {
    let lease = std::fs::File::open(dir.join("lease"))?;
    loop {
        if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(agent)
            || !dir.exists()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
        let (fenced, late) = turn(dir, &lease);
        for run in &fenced {
            eprintln!(
                "caravel fence watchdog: killed run {run}: its agent has not heard from the server for the lost timeout less the margin ({:.1} s past the lease)",
                late as f64 / 1e9
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_round_trips_and_a_torn_one_is_refused() {
        assert_eq!(decode(&encode(123_456_789)), Some(123_456_789));
        let mut b = encode(5);
        b[3] ^= 1;
        assert_eq!(decode(&b), None);
        assert_eq!(decode(&b[..8]), None);
    }

    #[test]
    fn a_target_names_its_group_and_cgroups() {
        let (p, c) = parse_target("pgid 42\ncgroup /sys/fs/cgroup/cpu/x\ncgroup /y\n");
        assert_eq!(p, Some(42));
        assert_eq!(
            c,
            vec![PathBuf::from("/sys/fs/cgroup/cpu/x"), PathBuf::from("/y")]
        );
        // Never a group that would be every process (0, 1 or negative).
        assert_eq!(parse_target("pgid 1\n").0, None);
        assert_eq!(parse_target("pgid -5\n").0, None);
    }

    #[test]
    fn past_the_lease_every_target_is_killed_and_marked() {
        let tmp = tempfile::tempdir().unwrap();
        let f = Fence::open(tmp.path()).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        f.guard(7, Some(child.id() as i32), &[]).unwrap();
        f.guard(8, None, &[]).unwrap();
        // A fresh lease: nothing happens.
        f.renew(boottime_ns() + 60_000_000_000);
        let written = f.lease.lock().unwrap().1;
        assert_eq!(read_lease(&f.lease.lock().unwrap().0), Some(written));
        let mut fenced = fence_all_if_due(tmp.path());
        assert!(fenced.is_empty());
        assert!(child.try_wait().unwrap().is_none());
        // Past it: both are marked, the live one is dead.
        let l = f.lease.lock().unwrap();
        l.0.write_all_at(&encode(boottime_ns() - 1), 0).unwrap();
        drop(l);
        fenced = fence_all_if_due(tmp.path());
        fenced.sort();
        assert_eq!(fenced, vec!["7".to_string(), "8".to_string()]);
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        assert!(f.release(7), "the agent learns the watchdog killed it");
        assert!(!f.release(7), "and only once");
        assert!(!tmp.path().join("runs/7").exists());
    }

    use std::os::unix::process::CommandExt;

    /// One turn of the watchdog's loop, without its sleep and parent check.
    fn fence_all_if_due(dir: &Path) -> Vec<String> {
        turn(dir, &std::fs::File::open(dir.join("lease")).unwrap()).0
    }
}
