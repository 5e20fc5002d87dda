//! Ships each run's stdout and stderr to the control plane as they grow, and removes a
//! finished run's folder once the server holds all of it.
//!
//! Every few seconds (and soon after a run ends) one batch goes to `POST /v1/agent/logs`
//! with what each stream gained since the server last acknowledged it. Each entry says
//! where its bytes start, so a batch that is resent (its answer lost) is taken once, and
//! the server answers a gap with the length it holds, from which the agent resends. A
//! stream behind by more than the server keeps jumps ahead to the part that would be kept.
//! Once a run has ended, its streams are sent to the end and marked done; then its
//! folder goes, unless its checkpoint folder still holds what could not be saved. A
//! folder is removed after the retention in any case, so a node's disk does not fill up
//! with the output of runs the server cannot take.
//!
//! A run folder carries `run.json` (its job), so that an agent that restarts after a crash
//! ships what the runs of its previous life wrote, and then removes their folders.
//!
//! Where every process of a run is killed through its cgroup, so that nothing can still
//! write to its files, a finished folder is emptied and kept as a spare for a later run
//! rather than removed: on ext4, creating an inode skips every inode freed in the last
//! ~30 s, one by one, so removing the folders of hundreds of short runs a second made
//! each new run's files slow to create (the `recently_deleted` scan took 40 % of
//! `bench e2e`'s CPU). A spare folder keeps its inodes: its log files are truncated and
//! its checkpoint folder emptied, and everything else the task left in it is removed.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use caravel_core::api::{LogShip, LogShipRequest, LogShipResponse};
use caravel_core::{JobId, RunId};

use crate::Agent;

/// Spare run folders kept at most (each holds five empty inodes; enough for the runs
/// that end between two shipping rounds on a busy node).
const SPARES: usize = 1024;
/// What a spare folder keeps (emptied); anything else in a run folder is removed.
const KEPT: [&str; 3] = ["stdout.log", "stderr.log", "run.json"];

/// How long after the server acknowledged a run's output done the agent asks again, before
/// it removes the node's copy. The server syncs its log disk every 2 s: an append it
/// acknowledged and then lost in a machine crash shows as missing, and is sent again.
const VERIFY_AFTER: Duration = Duration::from_secs(10);

/// The most entries in one batch.
const MAX_ENTRIES: usize = 2000;
/// The most bytes of output in one batch (the server takes up to 8 MiB of base64).
const BATCH_BYTES: u64 = 4 << 20;
const STREAMS: [&str; 2] = ["stdout", "stderr"];

/// What a run folder says about its run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunMeta {
    pub job: JobId,
    pub index: u32,
}

/// A run whose output is being shipped.
#[derive(Debug, Clone)]
pub struct Shipping {
    /// `None`: a folder without `run.json` (from an agent before shipping): only removed
    /// after the retention.
    job: Option<(JobId, u32)>,
    dir: PathBuf,
    /// Bytes of each stream the server holds; `None` until asked (after a restart).
    sent: [Option<u64>; 2],
    done: [bool; 2],
    /// When the run ended; `None` while it runs.
    ended: Option<SystemTime>,
    /// The server does not know the run: nothing more is sent.
    refused: bool,
    /// When the server last acknowledged both streams done.
    done_at: Option<Instant>,
    /// Each stream seen whole on the server again once a sync of its disk had to happen.
    verified: [bool; 2],
}

impl Shipping {
    fn complete(&self) -> bool {
        self.done[0] && self.done[1]
    }

    /// Done, and long enough ago that the server must have synced it: time to check that
    /// it still holds all of it before the node's copy goes.
    fn due_for_check(&self, now: Instant) -> bool {
        self.complete()
            && !(self.verified[0] && self.verified[1])
            && self
                .done_at
                .is_some_and(|t| now.duration_since(t) >= VERIFY_AFTER)
    }
}

pub fn write_meta(dir: &Path, meta: &RunMeta) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("run.json"),
        serde_json::to_vec(meta).expect("plain struct"),
    )
}

/// True when the folder is absent or holds nothing.
fn empty_or_absent(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut it) => it.next().is_none(),
        Err(_) => true,
    }
}

/// Up to `n` bytes of `path` from `offset`.
fn read_at(path: &Path, offset: u64, n: u64) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity(n as usize);
    f.take(n).read_to_end(&mut buf)?;
    Ok(buf)
}

fn len_of(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Emptied run folders ready for new runs, in `runs/.spare`.
pub struct Spares {
    root: PathBuf,
    free: Vec<PathBuf>,
    next: u64,
}

impl Spares {
    /// Finds the spares an earlier life of the agent left.
    pub fn open(runs_dir: &Path) -> Spares {
        let root = runs_dir.join(".spare");
        let _ = std::fs::create_dir_all(&root);
        let mut free = Vec::new();
        let mut next = 0;
        if let Ok(rd) = std::fs::read_dir(&root) {
            for e in rd.flatten() {
                if let Some(n) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) {
                    next = next.max(n + 1);
                    free.push(e.path());
                }
            }
        }
        Spares { root, free, next }
    }
}

/// Folders a spare keeps, emptied (a sandboxed task's own folders).
const KEPT_DIRS: [&str; 3] = ["checkpoint", "work", "tmp"];

/// Empties a finished run's folder down to what a spare keeps: empty log files and
/// `run.json`, empty `checkpoint`, `work` and `tmp` folders. (Their owner and mode are set
/// again for the next run's tenant.)
fn empty_for_reuse(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        let kind = e.file_type()?;
        if kind.is_file() && KEPT.contains(&name.as_ref()) {
            std::fs::OpenOptions::new()
                .write(true)
                .open(e.path())?
                .set_len(0)?;
        } else if kind.is_dir() && KEPT_DIRS.contains(&name.as_ref()) {
            crate::checkpoint::clear(&e.path())?;
        } else if kind.is_dir() {
            std::fs::remove_dir_all(e.path())?;
        } else {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

impl Agent {
    /// Moves a spare folder to `dir` for a new run; false when there is none (or reuse
    /// is off), and the run makes its own.
    pub(crate) fn take_spare(&self, dir: &Path) -> bool {
        if !self.reuse_run_dirs {
            return false;
        }
        let mut sp = self.spares.lock().expect("lock");
        while let Some(s) = sp.free.pop() {
            if std::fs::rename(&s, dir).is_ok() {
                return true;
            }
        }
        false
    }

    /// Keeps a finished run's folder as a spare, emptied, or removes it when there are
    /// enough spares (or reuse is off).
    fn retire(&self, dir: &Path) -> std::io::Result<()> {
        if self.reuse_run_dirs {
            let slot = {
                let mut sp = self.spares.lock().expect("lock");
                (sp.free.len() < SPARES).then(|| {
                    sp.next += 1;
                    sp.root.join((sp.next - 1).to_string())
                })
            };
            if let Some(slot) = slot {
                if empty_for_reuse(dir).is_ok() && std::fs::rename(dir, &slot).is_ok() {
                    self.spares.lock().expect("lock").free.push(slot);
                    return Ok(());
                }
            }
        }
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// A run starts shipping: its folder is `dir`.
    pub(crate) fn ship_start(&self, run: RunId, job: JobId, index: u32, dir: PathBuf) {
        self.ship.lock().expect("lock").insert(
            run,
            Shipping {
                job: Some((job, index)),
                dir,
                sent: [Some(0), Some(0)],
                done: [false, false],
                ended: None,
                refused: false,
                done_at: None,
                verified: [false, false],
            },
        );
    }

    /// The run's process is gone: its output is final.
    pub(crate) fn ship_end(&self, run: RunId) {
        if let Some(s) = self.ship.lock().expect("lock").get_mut(&run) {
            s.ended = Some(SystemTime::now());
        }
        self.ship_wake.notify_one();
    }

    /// Folders that an earlier life of this agent left: their runs are over (their
    /// processes died with that agent), so they are shipped to the end and removed.
    pub(crate) fn ship_recover(&self, runs_dir: &Path) {
        let Ok(rd) = std::fs::read_dir(runs_dir) else {
            return;
        };
        let mut ship = self.ship.lock().expect("lock");
        for e in rd.flatten() {
            let Some(run) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let dir = e.path();
            let meta: Option<RunMeta> = std::fs::read(dir.join("run.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let ended = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or_else(|_| SystemTime::now());
            ship.insert(
                RunId(run),
                Shipping {
                    job: meta.map(|m| (m.job, m.index)),
                    dir,
                    sent: [None, None],
                    done: [false, false],
                    ended: Some(ended),
                    refused: false,
                    done_at: None,
                    verified: [false, false],
                },
            );
        }
        if !ship.is_empty() {
            tracing::info!(
                runs = ship.len(),
                "run folders from before this start: shipping their output, then removing them"
            );
        }
    }

    /// Runs whose output is not all on the server yet (for a clean stop to wait on).
    pub(crate) fn ship_pending(&self) -> usize {
        self.ship
            .lock()
            .expect("lock")
            .values()
            .filter(|s| s.job.is_some() && !s.refused && !s.complete())
            .count()
    }

    pub(crate) async fn ship_loop(self: Arc<Self>) {
        loop {
            let more = match self.ship_once().await {
                Ok(more) => more,
                Err(e) => {
                    tracing::warn!("cannot ship task output yet: {e}");
                    false
                }
            };
            self.ship_gc().await;
            if more {
                continue;
            }
            if tokio::time::timeout(self.cfg.log_ship_every, self.ship_wake.notified())
                .await
                .is_ok()
            {
                // Woken by a run's end: let others that end about now join the batch.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Sends one batch; true when there was more than a batch could carry.
    async fn ship_once(self: &Arc<Self>) -> Result<bool, String> {
        let now = Instant::now();
        let snapshot: Vec<(RunId, Shipping)> = self
            .ship
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, s)| {
                s.job.is_some() && !s.refused && (!s.complete() || s.due_for_check(now))
            })
            .map(|(r, s)| (*r, s.clone()))
            .collect();
        if snapshot.is_empty() {
            return Ok(false);
        }
        let limit = self.log_limit.load(Ordering::Relaxed);
        let (entries, keys, more) = tokio::task::spawn_blocking(move || {
            let mut budget = BATCH_BYTES;
            let mut entries = Vec::new();
            let mut keys = Vec::new();
            let mut more = false;
            for (run, s) in snapshot {
                // Entries cost about 200 bytes of JSON each, bytes or not: thousands of
                // runs that ended while the server was away go in several batches.
                if entries.len() >= MAX_ENTRIES {
                    return (entries, keys, true);
                }
                let (job, index) = s.job.expect("filtered");
                let check = s.due_for_check(now);
                for (i, name) in STREAMS.iter().enumerate() {
                    let path = s.dir.join(format!("{name}.log"));
                    let len = len_of(&path);
                    // An empty entry from 0 asks what the server holds.
                    let probe = LogShip {
                        job,
                        index,
                        run,
                        stream: name.to_string(),
                        offset: 0,
                        data: String::new(),
                        skip: false,
                        done: false,
                    };
                    if s.done[i] {
                        if check && !s.verified[i] {
                            // Does the server still hold it all, and done?
                            entries.push(probe);
                            keys.push((run, i, Some(len)));
                        }
                        continue;
                    }
                    let Some(sent) = s.sent[i] else {
                        entries.push(probe);
                        keys.push((run, i, None));
                        continue;
                    };
                    let ended = s.ended.is_some();
                    if sent >= len && !ended {
                        continue;
                    }
                    // Behind by more than the server keeps: only the part it would keep.
                    let (start, skip) = if len.saturating_sub(sent) > limit {
                        (len - limit, true)
                    } else {
                        (sent.min(len), false)
                    };
                    let n = (len - start).min(budget);
                    if n < len - start {
                        more = true;
                    }
                    let data = match read_at(&path, start, n) {
                        Ok(d) => d,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                        Err(e) => {
                            tracing::warn!("reading {}: {e}", path.display());
                            continue;
                        }
                    };
                    let done = ended && start + data.len() as u64 >= len;
                    if data.is_empty() && !done {
                        continue;
                    }
                    budget -= data.len() as u64;
                    entries.push(LogShip {
                        offset: start,
                        data: base64::engine::general_purpose::STANDARD.encode(&data),
                        skip,
                        done,
                        ..probe
                    });
                    keys.push((run, i, None));
                    if budget == 0 {
                        return (entries, keys, true);
                    }
                }
            }
            (entries, keys, more)
        })
        .await
        .map_err(|e| e.to_string())?;
        if entries.is_empty() {
            return Ok(false);
        }
        let resp: LogShipResponse = self
            .post("/v1/agent/logs", &LogShipRequest { entries })
            .await
            .map_err(|(code, e)| format!("{code:?} {e}"))?;
        self.log_limit.store(resp.limit.max(1), Ordering::Relaxed);
        let mut ship = self.ship.lock().expect("lock");
        let mut touched = Vec::new();
        for ((run, i, check), r) in keys.into_iter().zip(resp.results) {
            let Some(s) = ship.get_mut(&run) else {
                continue;
            };
            touched.push(run);
            match (r.state.as_str(), check) {
                // Holding more than the node has is holding all of it (the node's file was cut).
                ("ok" | "gap", Some(len)) if r.done && r.end >= len => s.verified[i] = true,
                ("ok" | "gap", Some(len)) => {
                    tracing::warn!(run = %run, stream = STREAMS[i], held = r.end, len, "the server lost the end of this output (a crash before it reached its disk): sending it again");
                    s.sent[i] = Some(r.end);
                    s.done[i] = false;
                    s.done_at = None;
                    s.verified = [false, false];
                }
                ("ok" | "gap", None) => {
                    s.sent[i] = Some(r.end);
                    s.done[i] = r.done;
                }
                ("full", _) => {
                    if !s.refused {
                        tracing::warn!(run = %run, "the tenant's storage quota is full: this run's output stays on this node until the retention");
                    }
                    s.refused = true;
                }
                _ => {
                    if !s.refused {
                        tracing::warn!(run = %run, "the server does not take this run's output: it stays on this node until the retention");
                    }
                    s.refused = true;
                }
            }
        }
        for run in touched {
            if let Some(s) = ship.get_mut(&run) {
                if s.complete() && s.done_at.is_none() {
                    s.done_at = Some(Instant::now());
                }
            }
        }
        Ok(more)
    }

    /// Removes the folders of ended runs that the server holds all of (and whose
    /// checkpoint folder is empty), and of every run ended longer ago than the retention.
    async fn ship_gc(self: &Arc<Self>) {
        let now = SystemTime::now();
        let retention = self.cfg.run_retention;
        let doomed: Vec<(RunId, PathBuf)> = {
            let ship = self.ship.lock().expect("lock");
            ship.iter()
                .filter(|(_, s)| {
                    s.ended.is_some_and(|t| {
                        now.duration_since(t).unwrap_or_default() >= retention
                            || (s.complete()
                                && s.verified == [true, true]
                                && empty_or_absent(&s.dir.join("checkpoint")))
                    })
                })
                .map(|(r, s)| (*r, s.dir.clone()))
                .collect()
        };
        if doomed.is_empty() {
            return;
        }
        let me = self.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for (run, dir) in doomed {
                match me.retire(&dir) {
                    Ok(()) => out.push(run),
                    Err(e) => tracing::warn!("removing {}: {e}", dir.display()),
                }
            }
            out
        })
        .await
        .unwrap_or_default();
        let mut ship = self.ship.lock().expect("lock");
        for r in removed {
            ship.remove(&r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_emptied_for_reuse_keeps_its_files_empty_and_loses_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("5");
        write_meta(
            &r,
            &RunMeta {
                job: JobId(1),
                index: 0,
            },
        )
        .unwrap();
        std::fs::write(r.join("stdout.log"), b"out").unwrap();
        std::fs::write(r.join("stderr.log"), b"err").unwrap();
        std::fs::write(r.join("model.bin"), b"left by the task").unwrap();
        std::fs::create_dir_all(r.join("checkpoint/sub")).unwrap();
        std::fs::write(r.join("checkpoint/sub/x"), b"x").unwrap();
        std::fs::create_dir_all(r.join("cache/deep")).unwrap();
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let before = ino(&r.join("stdout.log"));
        empty_for_reuse(&r).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&r)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["checkpoint", "run.json", "stderr.log", "stdout.log"]
        );
        assert!(empty_or_absent(&r.join("checkpoint")));
        assert_eq!(len_of(&r.join("stdout.log")), 0);
        assert_eq!(len_of(&r.join("run.json")), 0);
        assert_eq!(
            ino(&r.join("stdout.log")),
            before,
            "the same inode, emptied"
        );
        // Spares left by an earlier life are found, and new ones numbered after them.
        std::fs::create_dir_all(d.path().join(".spare/7")).unwrap();
        std::fs::create_dir_all(d.path().join(".spare/not-a-spare")).unwrap();
        let sp = Spares::open(d.path());
        assert_eq!((sp.free.len(), sp.next), (1, 8));
    }

    #[test]
    fn read_at_reads_from_the_offset_and_stops_at_the_end() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        assert_eq!(read_at(&p, 3, 4).unwrap(), b"3456");
        assert_eq!(read_at(&p, 8, 10).unwrap(), b"89");
        assert_eq!(read_at(&p, 12, 10).unwrap(), b"");
        assert_eq!(len_of(&p), 10);
        assert_eq!(len_of(&d.path().join("none")), 0);
        assert!(empty_or_absent(&d.path().join("none")));
        assert!(!empty_or_absent(d.path()));
        write_meta(
            &d.path().join("r"),
            &RunMeta {
                job: JobId(4),
                index: 1,
            },
        )
        .unwrap();
        let m: RunMeta =
            serde_json::from_slice(&std::fs::read(d.path().join("r/run.json")).unwrap()).unwrap();
        assert_eq!((m.job, m.index), (JobId(4), 1));
    }
}
