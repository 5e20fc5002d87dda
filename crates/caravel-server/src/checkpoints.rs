//! Task checkpoints kept by the control plane, so that a task resumes from its last
//! checkpoint on whatever node it runs next, with no shared filesystem between nodes.
//!
//! An agent saves a task's `CARAVEL_CHECKPOINT_DIR` as a tar archive; the archive is
//! written to a hidden file, checked (complete, its SHA-256 as the agent computed it, only
//! plain files and folders under relative paths), made durable, and then renamed to its
//! final name, which carries the version, the run that saved it, the time and the hash.
//! The file name is the whole record: a crash leaves either the previous checkpoint or the
//! new one, never a half-written one that counts. Only the newest version is kept.
//!
//! Layout: `ROOT/<job>/<task index>/v<version>.r<run>.t<saved ms>.<sha256>.tar`.
//!
//! A gang's checkpoint is the job's, not each task's: every rank restores every rank's
//! part, and the parts restored together must form a consistent cut (no rank's part may
//! reflect a step another rank's part does not). Each rank still saves its own part as
//! above; a *cut* names one version per rank and is committed only when the server knows
//! of one instant at which every rank's folder held exactly that version:
//!
//! - a rank whose run has ended with everything saved (`RunEvent::Exited::checkpoint`)
//!   holds its final version from then on;
//! - for a running rank the server opens a *round* after each save of the gang, and asks
//!   each running rank's agent whether its folder still holds what it last saved or
//!   restored. An agent answers only after the question arrived, and a rank's version
//!   counts only if it was saved before the round opened. Every folder then held its
//!   version from its save (before the round opened) to its answer (after), so all held
//!   them together at the moment the round opened.
//!
//! The committed cut is `ROOT/<job>/cut.json`, replaced atomically; the versions it names
//! are kept on disk beside each task's newest.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use caravel_core::{JobId, Millis, RunId};
use serde::Serialize;

/// A task's saved checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Saved {
    pub version: u64,
    pub run: RunId,
    pub bytes: u64,
    pub saved_ms: Millis,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint folder {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the checkpoint is larger than the server's limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error(
        "the archive's SHA-256 is {actual}, not {expected} as sent: it was damaged on the way"
    )]
    Digest { expected: String, actual: String },
    #[error("not a usable checkpoint archive: {0}")]
    Archive(String),
}

/// A gang's committed cut: the part of each rank that every rank restores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Cut {
    pub id: u64,
    pub parts: BTreeMap<u32, Saved>,
}

/// What the server knows of one rank of a gang right now (from the job's tasks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rank {
    /// The task's newest attempt number.
    pub attempts: u32,
    pub current: Option<RunId>,
    /// An elastic gang's rank the current attempt does not use: its part of the last cut
    /// is kept as it is, and nothing is asked of it.
    pub sits_out: bool,
}

struct Round {
    id: u64,
    /// The newest version of each rank when the round opened: a newer one was saved
    /// after the instant the round vouches for.
    limit: BTreeMap<u32, u64>,
    answers: BTreeMap<u32, (RunId, u64)>,
}

/// A rank whose run ended with its folder all saved: it holds `version` for good.
struct Final {
    run: RunId,
    attempt: u32,
    version: u64,
}

#[derive(Default)]
struct Gangs {
    /// A copy of `Checkpoints::index`, so that the gang protocol, which runs under the
    /// core lock, never takes the index lock (a save takes the core lock under it).
    latest: BTreeMap<(JobId, u32), Saved>,
    cuts: BTreeMap<JobId, Cut>,
    rounds: std::collections::HashMap<JobId, Round>,
    finals: std::collections::HashMap<(JobId, u32), Final>,
    next_round: u64,
}

pub struct Checkpoints {
    root: PathBuf,
    pub max_bytes: u64,
    index: Mutex<BTreeMap<(JobId, u32), Saved>>,
    /// Locked after `index` where both are.
    gangs: Mutex<Gangs>,
    /// Bumped by every change to the index: the scheduler's copy of when each run last
    /// saved is refreshed only when this moved.
    generation: std::sync::atomic::AtomicU64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn file_name(s: &Saved) -> String {
    format!(
        "v{}.r{}.t{}.{}.tar",
        s.version, s.run.0, s.saved_ms, s.sha256
    )
}

fn parse_name(name: &str, bytes: u64) -> Option<Saved> {
    let rest = name.strip_prefix('v')?.strip_suffix(".tar")?;
    let mut it = rest.splitn(4, '.');
    let version = it.next()?.parse().ok()?;
    let run = RunId(it.next()?.strip_prefix('r')?.parse().ok()?);
    let saved_ms = it.next()?.strip_prefix('t')?.parse().ok()?;
    let sha256 = it.next()?.to_string();
    (sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit())).then_some(Saved {
        version,
        run,
        bytes,
        saved_ms,
        sha256,
    })
}

fn fsync_dir(dir: &Path) -> Result<(), CheckpointError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))
}

/// Checks that an archive is whole and holds only plain files and folders under relative
/// paths without `..`: what the agent unpacks into a task's folder can then never land
/// outside it or plant a link.
pub fn validate_archive(path: &Path) -> Result<(), CheckpointError> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    // An archive ends in two zero blocks (and may be padded with more): without them it was
    // cut short, even where the entries before the cut read fine.
    let len = f.metadata().map_err(io(path))?.len();
    let mut end = [0u8; 1024];
    if len % 512 != 0
        || len < 1024
        || f.seek(SeekFrom::Start(len - 1024))
            .and_then(|_| f.read_exact(&mut end))
            .is_err()
        || end.iter().any(|b| *b != 0)
    {
        return Err(CheckpointError::Archive(
            "it does not end with a tar end-of-archive marker: cut short".into(),
        ));
    }
    f.seek(SeekFrom::Start(0)).map_err(io(path))?;
    let mut ar = tar::Archive::new(std::io::BufReader::new(f));
    let entries = ar
        .entries()
        .map_err(|e| CheckpointError::Archive(e.to_string()))?;
    for e in entries {
        let mut e = e.map_err(|e| CheckpointError::Archive(e.to_string()))?;
        let p = e
            .path()
            .map_err(|e| CheckpointError::Archive(e.to_string()))?
            .into_owned();
        let kind = e.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            return Err(CheckpointError::Archive(format!(
                "`{}` is neither a file nor a folder",
                p.display()
            )));
        }
        if p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(CheckpointError::Archive(format!(
                "`{}` is not a plain relative path",
                p.display()
            )));
        }
        // Reading the contents finds an archive cut short.
        std::io::copy(&mut e, &mut std::io::sink())
            .map_err(|e| CheckpointError::Archive(format!("`{}`: {e}", p.display())))?;
    }
    Ok(())
}

impl Checkpoints {
    /// Opens (making it if need be) the checkpoint root, drops uploads a crash cut short
    /// and versions a crash left behind their successor, and indexes what is there.
    pub fn open(root: PathBuf, max_bytes: u64) -> Result<Checkpoints, CheckpointError> {
        let mut index = BTreeMap::new();
        let mut gangs = Gangs::default();
        for (job_id, jdir) in crate::datadir::job_dirs(&root).map_err(io(&root))? {
            let cut_file = jdir.join("cut.json");
            let cut: Option<Cut> = match std::fs::read(&cut_file) {
                Ok(b) => Some(serde_json::from_slice(&b).map_err(|e| {
                    CheckpointError::Archive(format!("{}: {e}", cut_file.display()))
                })?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(io(&cut_file)(e)),
            };
            for task in std::fs::read_dir(&jdir).map_err(io(&jdir))? {
                let task = task.map_err(io(&jdir))?;
                let Some(ix) = task
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let tdir = task.path();
                let mut found: Vec<(Saved, PathBuf)> = Vec::new();
                for f in std::fs::read_dir(&tdir).map_err(io(&tdir))? {
                    let f = f.map_err(io(&tdir))?;
                    let name = f.file_name().to_string_lossy().into_owned();
                    if name.starts_with(".upload-") {
                        let _ = std::fs::remove_file(f.path());
                        continue;
                    }
                    let bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
                    if let Some(s) = parse_name(&name, bytes) {
                        found.push((s, f.path()));
                    }
                }
                found.sort_by_key(|(s, _)| s.version);
                let in_cut = cut
                    .as_ref()
                    .and_then(|c| c.parts.get(&ix))
                    .map(|s| s.version);
                if let Some((newest, _)) = found.pop() {
                    for (s, old) in found {
                        if Some(s.version) != in_cut {
                            let _ = std::fs::remove_file(old);
                        }
                    }
                    index.insert((job_id, ix), newest);
                }
            }
            if let Some(c) = cut {
                gangs.cuts.insert(job_id, c);
            }
        }
        gangs.latest = index.clone();
        Ok(Checkpoints {
            root,
            max_bytes,
            index: Mutex::new(index),
            gangs: Mutex::new(gangs),
            generation: std::sync::atomic::AtomicU64::new(1),
        })
    }

    fn task_dir(&self, job: JobId, index: u32) -> PathBuf {
        self.root.join(job.0.to_string()).join(index.to_string())
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// When each run that saved the newest checkpoint of its task saved it, as of the
    /// generation returned.
    pub fn saved_by_run(&self) -> (u64, std::collections::HashMap<RunId, Millis>) {
        let ix = self.index.lock().expect("lock");
        let g = self.generation();
        (g, ix.values().map(|s| (s.run, s.saved_ms)).collect())
    }

    pub fn latest(&self, job: JobId, index: u32) -> Option<Saved> {
        self.index.lock().expect("lock").get(&(job, index)).cloned()
    }

    /// The newest checkpoint of each of the job's tasks that has one.
    pub fn of_job(&self, job: JobId) -> Vec<(u32, Saved)> {
        self.index
            .lock()
            .expect("lock")
            .range((job, 0)..=(job, u32::MAX))
            .map(|((_, i), s)| (*i, s.clone()))
            .collect()
    }

    /// Bytes of the checkpoints kept per job (the newest of each task, and the parts of a
    /// gang's cut that are older).
    pub fn bytes_by_job(&self) -> std::collections::HashMap<JobId, u64> {
        let mut out = std::collections::HashMap::new();
        let ix = self.index.lock().expect("lock");
        for ((j, _), s) in ix.iter() {
            *out.entry(*j).or_default() += s.bytes;
        }
        for (j, c) in self.gangs.lock().expect("lock").cuts.iter() {
            for (i, s) in &c.parts {
                if ix.get(&(*j, *i)).map(|l| l.version) != Some(s.version) {
                    *out.entry(*j).or_default() += s.bytes;
                }
            }
        }
        out
    }

    pub fn jobs(&self) -> Vec<JobId> {
        let mut v: Vec<JobId> = self
            .index
            .lock()
            .expect("lock")
            .keys()
            .map(|(j, _)| *j)
            .collect();
        v.dedup();
        v
    }

    /// The newest checkpoint's file, opened: stays readable even if a newer version
    /// replaces it while it is being sent.
    pub fn open_latest(&self, job: JobId, index: u32) -> Option<(Saved, std::fs::File)> {
        // A save between the lookup and the open may remove the file looked up: look again.
        for _ in 0..3 {
            let s = self.latest(job, index)?;
            if let Ok(f) = std::fs::File::open(self.task_dir(job, index).join(file_name(&s))) {
                return Some((s, f));
            }
        }
        None
    }

    /// A kept version of the task's checkpoint (the newest, or the one its gang's cut
    /// names), opened.
    pub fn open_version(
        &self,
        job: JobId,
        index: u32,
        version: u64,
    ) -> Option<(Saved, std::fs::File)> {
        let s = self
            .latest(job, index)
            .filter(|s| s.version == version)
            .or_else(|| {
                self.cut(job)
                    .and_then(|c| c.parts.get(&index).cloned())
                    .filter(|s| s.version == version)
            })?;
        let f = std::fs::File::open(self.task_dir(job, index).join(file_name(&s))).ok()?;
        Some((s, f))
    }

    fn in_cut(&self, job: JobId, index: u32, version: u64) -> bool {
        self.gangs
            .lock()
            .expect("lock")
            .cuts
            .get(&job)
            .and_then(|c| c.parts.get(&index))
            .is_some_and(|s| s.version == version)
    }

    /// The gang's committed cut.
    pub fn cut(&self, job: JobId) -> Option<Cut> {
        self.gangs.lock().expect("lock").cuts.get(&job).cloned()
    }

    /// The cut a starting run of the gang restores.
    pub fn gang_cut(&self, job: JobId) -> caravel_core::api::GangCut {
        match self.cut(job) {
            None => caravel_core::api::GangCut::default(),
            Some(c) => caravel_core::api::GangCut {
                cut: c.id,
                parts: c
                    .parts
                    .iter()
                    .map(|(i, s)| caravel_core::api::CutPart {
                        task: *i,
                        version: s.version,
                        bytes: s.bytes,
                        sha256: s.sha256.clone(),
                    })
                    .collect(),
            },
        }
    }

    /// Opens a round of confirmations for the gang (after one of its ranks saved), in
    /// place of any round open: returns its id.
    pub fn open_round(&self, job: JobId) -> u64 {
        let mut g = self.gangs.lock().expect("lock");
        let limit = g
            .latest
            .range((job, 0)..=(job, u32::MAX))
            .map(|((_, i), s)| (*i, s.version))
            .collect();
        g.next_round += 1;
        let id = g.next_round;
        g.rounds.insert(
            job,
            Round {
                id,
                limit,
                answers: BTreeMap::new(),
            },
        );
        id
    }

    /// The open round that task `index` (now run `run`) has not answered yet.
    pub fn question(&self, job: JobId, index: u32, run: RunId) -> Option<u64> {
        let g = self.gangs.lock().expect("lock");
        let r = g.rounds.get(&job)?;
        (r.answers.get(&index).map(|a| a.0) != Some(run)).then_some(r.id)
    }

    /// Records an agent's answer; false when it is not one for the open round or names a
    /// version saved after the round opened.
    pub fn answer(&self, job: JobId, index: u32, run: RunId, round: u64, version: u64) -> bool {
        let mut g = self.gangs.lock().expect("lock");
        let Some(r) = g.rounds.get_mut(&job) else {
            return false;
        };
        if r.id != round || version > r.limit.get(&index).copied().unwrap_or(0) {
            return false;
        }
        r.answers.insert(index, (run, version));
        true
    }

    /// Records how a gang rank's run ended: with its folder all saved at `version`, or
    /// (`None`) not.
    pub fn record_end(
        &self,
        job: JobId,
        index: u32,
        run: RunId,
        attempt: u32,
        version: Option<u64>,
    ) {
        let mut g = self.gangs.lock().expect("lock");
        match version {
            Some(version) => {
                g.finals.insert(
                    (job, index),
                    Final {
                        run,
                        attempt,
                        version,
                    },
                );
            }
            None => {
                g.finals.remove(&(job, index));
            }
        }
    }

    /// Commits a new cut of the gang when every rank's version is known for one instant
    /// (see the module's comment), and returns it; `None` when not (yet) or when it
    /// would be the cut already committed.
    pub fn try_cut(&self, job: JobId, ranks: &[Rank]) -> Result<Option<Cut>, CheckpointError> {
        let mut g = self.gangs.lock().expect("lock");
        let mut versions = BTreeMap::new();
        let old = g.cuts.get(&job).cloned();
        let mut kept = BTreeMap::new();
        for (r, now) in ranks.iter().enumerate() {
            let r = r as u32;
            if now.sits_out {
                if let Some(s) = old.as_ref().and_then(|c| c.parts.get(&r)) {
                    kept.insert(r, s.clone());
                }
                continue;
            }
            let fin = g.finals.get(&(job, r)).filter(|f| {
                now.current == Some(f.run) || (now.current.is_none() && f.attempt == now.attempts)
            });
            let v = match (fin, g.rounds.get(&job).and_then(|x| x.answers.get(&r))) {
                (Some(f), _) => f.version,
                (None, Some((run, v))) if now.current == Some(*run) => *v,
                _ => return Ok(None),
            };
            versions.insert(r, v);
        }
        let mut parts = kept;
        for (r, v) in versions {
            if v == 0 {
                continue;
            }
            let s = match g.latest.get(&(job, r)) {
                Some(s) if s.version == v => s.clone(),
                _ => match old.as_ref().and_then(|c| c.parts.get(&r)) {
                    Some(s) if s.version == v => s.clone(),
                    // Not kept (a version no round vouched for): no cut from these.
                    _ => return Ok(None),
                },
            };
            parts.insert(r, s);
        }
        // Ranks beyond the gang's size now (a smaller restart) keep their parts.
        if let Some(o) = &old {
            for (r, s) in &o.parts {
                if *r as usize >= ranks.len() {
                    parts.insert(*r, s.clone());
                }
            }
        }
        g.rounds.remove(&job);
        if old.as_ref().map(|c| &c.parts) == Some(&parts) || (old.is_none() && parts.is_empty()) {
            return Ok(None);
        }
        let cut = Cut {
            id: old.as_ref().map_or(1, |c| c.id + 1),
            parts,
        };
        let jdir = self.root.join(job.0.to_string());
        std::fs::create_dir_all(&jdir).map_err(io(&jdir))?;
        let tmp = jdir.join(".cut.json.tmp");
        let dest = jdir.join("cut.json");
        let body = serde_json::to_vec(&cut).expect("serializable");
        std::fs::File::create(&tmp)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, &body)?;
                f.sync_all()
            })
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        fsync_dir(&jdir)?;
        // Parts of the old cut that neither the new one nor a task's newest names.
        if let Some(o) = old {
            for (r, s) in o.parts {
                let kept = cut.parts.get(&r).map(|n| n.version) == Some(s.version)
                    || g.latest.get(&(job, r)).map(|n| n.version) == Some(s.version);
                if !kept {
                    let _ = std::fs::remove_file(self.task_dir(job, r).join(file_name(&s)));
                }
            }
        }
        g.cuts.insert(job, cut.clone());
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(Some(cut))
    }

    /// A fresh hidden file for an upload of the task's checkpoint.
    pub fn upload_path(
        &self,
        job: JobId,
        index: u32,
        run: RunId,
    ) -> Result<PathBuf, CheckpointError> {
        let dir = self.task_dir(job, index);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut r = [0u8; 6];
        getrandom::fill(&mut r).expect("OS randomness");
        Ok(dir.join(format!(".upload-{}-{}", run.0, hex::encode(r))))
    }

    /// Makes an upload (already complete, checked and synced by the caller) the task's
    /// newest checkpoint, and removes the one before. `still_current` is asked under the
    /// index lock, so no other save of the task interleaves with the check. `new` gives
    /// the run, hash and time; the version and size are filled in here.
    pub fn commit(
        &self,
        job: JobId,
        index: u32,
        upload: &Path,
        new: Saved,
        still_current: impl FnOnce() -> bool,
    ) -> Result<Option<Saved>, CheckpointError> {
        let bytes = std::fs::metadata(upload).map_err(io(upload))?.len();
        let mut ix = self.index.lock().expect("lock");
        if !still_current() {
            let _ = std::fs::remove_file(upload);
            return Ok(None);
        }
        let prev = ix.get(&(job, index)).cloned();
        let saved = Saved {
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            bytes,
            ..new
        };
        let dir = self.task_dir(job, index);
        let dest = dir.join(file_name(&saved));
        std::fs::rename(upload, &dest).map_err(io(&dest))?;
        fsync_dir(&dir)?;
        if let Some(p) = prev {
            if !self.in_cut(job, index, p.version) {
                let _ = std::fs::remove_file(dir.join(file_name(&p)));
            }
        }
        ix.insert((job, index), saved.clone());
        self.gangs
            .lock()
            .expect("lock")
            .latest
            .insert((job, index), saved.clone());
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(Some(saved))
    }

    /// Forgets every checkpoint of a job, on disk too.
    pub fn remove_job(&self, job: JobId) {
        let mut ix = self.index.lock().expect("lock");
        let keys: Vec<_> = ix
            .range((job, 0)..=(job, u32::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            ix.remove(&k);
        }
        {
            let mut g = self.gangs.lock().expect("lock");
            g.cuts.remove(&job);
            g.latest.retain(|(j, _), _| *j != job);
            g.rounds.remove(&job);
            g.finals.retain(|(j, _), _| *j != job);
        }
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let dir = self.root.join(job.0.to_string());
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SHA-256 of a file, hex.
    fn sha256_file(path: &Path) -> Result<String, CheckpointError> {
        use sha2::Digest;
        let mut f = std::fs::File::open(path).map_err(io(path))?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf).map_err(io(path))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(hex::encode(h.finalize()))
    }

    fn archive(dir: &Path, entries: &[(&str, &[u8])]) -> PathBuf {
        let p = dir.join("a.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&p).unwrap());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.finish().unwrap();
        p
    }

    fn made(run: u64, sha256: String) -> Saved {
        Saved {
            version: 0,
            run: RunId(run),
            bytes: 0,
            saved_ms: 1000 + run as i64,
            sha256,
        }
    }

    fn commit(c: &Checkpoints, dir: &Path, run: u64, data: &[u8]) -> Option<Saved> {
        let a = archive(dir, &[("ckpt", data)]);
        let up = c.upload_path(JobId(7), 0, RunId(run)).unwrap();
        std::fs::rename(&a, &up).unwrap();
        let sha = sha256_file(&up).unwrap();
        c.commit(JobId(7), 0, &up, made(run, sha), || true).unwrap()
    }

    #[test]
    fn a_newer_checkpoint_replaces_the_older_and_survives_a_reopen() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("ck");
        let c = Checkpoints::open(root.clone(), 1 << 20).unwrap();
        assert_eq!(c.latest(JobId(7), 0), None);
        let s1 = commit(&c, t.path(), 3, b"one").unwrap();
        assert_eq!(s1.version, 1);
        let s2 = commit(&c, t.path(), 3, b"two").unwrap();
        assert_eq!((s2.version, s2.run), (2, RunId(3)));
        let files: Vec<_> = std::fs::read_dir(root.join("7/0")).unwrap().collect();
        assert_eq!(files.len(), 1, "only the newest version is kept");
        // A crash left an upload and an old version behind.
        std::fs::write(root.join("7/0/.upload-3-abc"), b"partial").unwrap();
        std::fs::write(root.join("7/0").join(file_name(&s1)), b"old").unwrap();
        let c = Checkpoints::open(root.clone(), 1 << 20).unwrap();
        assert_eq!(c.latest(JobId(7), 0), Some(s2.clone()));
        assert_eq!(std::fs::read_dir(root.join("7/0")).unwrap().count(), 1);
        let (s, mut f) = c.open_latest(JobId(7), 0).unwrap();
        assert_eq!(s, s2);
        let mut ar = tar::Archive::new(&mut f);
        let mut e = ar.entries().unwrap().next().unwrap().unwrap();
        let mut body = String::new();
        e.read_to_string(&mut body).unwrap();
        assert_eq!(body, "two");
        c.remove_job(JobId(7));
        assert_eq!(c.of_job(JobId(7)), vec![]);
        assert!(!root.join("7").exists());
    }

    #[test]
    fn a_save_by_a_run_that_is_no_longer_current_is_dropped() {
        let t = tempfile::tempdir().unwrap();
        let c = Checkpoints::open(t.path().join("ck"), 1 << 20).unwrap();
        commit(&c, t.path(), 3, b"one").unwrap();
        let a = archive(t.path(), &[("ckpt", b"stale")]);
        let up = c.upload_path(JobId(7), 0, RunId(2)).unwrap();
        std::fs::rename(&a, &up).unwrap();
        let sha = sha256_file(&up).unwrap();
        let r = c.commit(JobId(7), 0, &up, made(2, sha), || false).unwrap();
        assert_eq!(r, None);
        assert!(!up.exists(), "the refused upload is removed");
        assert_eq!(c.latest(JobId(7), 0).unwrap().run, RunId(3));
    }

    fn save(c: &Checkpoints, dir: &Path, task: u32, run: u64, data: &[u8]) -> Saved {
        let a = archive(dir, &[("ckpt", data)]);
        let up = c.upload_path(JobId(9), task, RunId(run)).unwrap();
        std::fs::rename(&a, &up).unwrap();
        let sha = sha256_file(&up).unwrap();
        c.commit(JobId(9), task, &up, made(run, sha), || true)
            .unwrap()
            .unwrap()
    }

    fn ranks(runs: &[Option<u64>]) -> Vec<Rank> {
        runs.iter()
            .map(|r| Rank {
                attempts: 1,
                current: r.map(RunId),
                sits_out: false,
            })
            .collect()
    }

    fn parts(c: &Cut) -> Vec<(u32, u64)> {
        c.parts.iter().map(|(i, s)| (*i, s.version)).collect()
    }

    #[test]
    fn a_gang_cut_needs_every_rank_to_confirm_after_the_round_opened_and_survives_a_reopen() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("ck");
        let c = Checkpoints::open(root.clone(), 1 << 20).unwrap();
        let now = ranks(&[Some(10), Some(11)]);
        save(&c, t.path(), 0, 10, b"step 40");
        let round = c.open_round(JobId(9));
        assert_eq!(c.question(JobId(9), 1, RunId(11)), Some(round));
        assert!(c.answer(JobId(9), 0, RunId(10), round, 1));
        assert_eq!(
            c.try_cut(JobId(9), &now).unwrap(),
            None,
            "rank 1 has not answered"
        );
        // An answer to another round, or from a run that is not rank 1's, counts for nothing.
        assert!(!c.answer(JobId(9), 1, RunId(11), round + 1, 0));
        assert!(c.answer(JobId(9), 1, RunId(99), round, 0));
        assert_eq!(
            c.try_cut(JobId(9), &now).unwrap(),
            None,
            "run 99 is not rank 1's"
        );
        assert!(c.answer(JobId(9), 1, RunId(11), round, 0));
        assert_eq!(c.question(JobId(9), 1, RunId(11)), None, "answered");
        let cut = c.try_cut(JobId(9), &now).unwrap().expect("a cut");
        assert_eq!((cut.id, parts(&cut)), (1, vec![(0, 1)]));
        assert_eq!(c.gang_cut(JobId(9)).cut, 1);
        let c = Checkpoints::open(root, 1 << 20).unwrap();
        assert_eq!(c.cut(JobId(9)), Some(cut));
    }

    #[test]
    fn a_version_saved_after_the_round_opened_is_not_vouched_for() {
        let t = tempfile::tempdir().unwrap();
        let c = Checkpoints::open(t.path().join("ck"), 1 << 20).unwrap();
        save(&c, t.path(), 0, 10, b"step 40");
        save(&c, t.path(), 1, 11, b"shard 40");
        let round = c.open_round(JobId(9));
        // Rank 1 saved again after the round opened: its folder may reflect a step rank 0's
        // answer does not.
        save(&c, t.path(), 1, 11, b"shard 80");
        assert!(c.answer(JobId(9), 0, RunId(10), round, 1));
        assert!(!c.answer(JobId(9), 1, RunId(11), round, 2));
        assert!(c.answer(JobId(9), 1, RunId(11), round, 1));
        // Version 1 of rank 1 is gone (it was neither its newest nor in a cut).
        assert_eq!(
            c.try_cut(JobId(9), &ranks(&[Some(10), Some(11)])).unwrap(),
            None
        );
        let round = c.open_round(JobId(9));
        assert!(c.answer(JobId(9), 0, RunId(10), round, 1));
        assert!(c.answer(JobId(9), 1, RunId(11), round, 2));
        let cut = c
            .try_cut(JobId(9), &ranks(&[Some(10), Some(11)]))
            .unwrap()
            .unwrap();
        assert_eq!(parts(&cut), vec![(0, 1), (1, 2)]);
    }

    #[test]
    fn ranks_that_ended_all_saved_make_a_cut_and_a_lost_rank_keeps_the_last_one() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("ck");
        let c = Checkpoints::open(root.clone(), 1 << 20).unwrap();
        let s1 = save(&c, t.path(), 0, 10, b"step 40");
        c.record_end(JobId(9), 0, RunId(10), 1, Some(1));
        c.record_end(JobId(9), 1, RunId(11), 1, Some(0));
        // The gang has stopped (no current runs); both ended with everything saved.
        let cut = c.try_cut(JobId(9), &ranks(&[None, None])).unwrap().unwrap();
        assert_eq!(parts(&cut), vec![(0, 1)]);
        // Attempt 2: rank 0 saves twice, then rank 1's node is lost (no end recorded
        // for run 21) while rank 0 ends all saved.
        let now = vec![
            Rank {
                attempts: 2,
                current: Some(RunId(20)),
                sits_out: false,
            },
            Rank {
                attempts: 2,
                current: Some(RunId(21)),
                sits_out: false,
            },
        ];
        save(&c, t.path(), 0, 20, b"step 80");
        save(&c, t.path(), 0, 20, b"step 120");
        c.record_end(JobId(9), 0, RunId(20), 2, Some(3));
        assert_eq!(c.try_cut(JobId(9), &now).unwrap(), None);
        let stopped = vec![
            Rank {
                attempts: 2,
                current: None,
                sits_out: false,
            };
            2
        ];
        assert_eq!(
            c.try_cut(JobId(9), &stopped).unwrap(),
            None,
            "rank 1's end from attempt 1 does not speak for attempt 2"
        );
        assert_eq!(c.cut(JobId(9)).unwrap().parts[&0], s1);
        // The cut's version is kept on disk beside the newest, and after a reopen too.
        let (got, _) = c.open_version(JobId(9), 0, 1).expect("version 1 kept");
        assert_eq!(got, s1);
        assert!(
            c.open_version(JobId(9), 0, 2).is_none(),
            "version 2 is gone"
        );
        let c = Checkpoints::open(root.clone(), 1 << 20).unwrap();
        assert!(c.open_version(JobId(9), 0, 1).is_some());
        assert_eq!(c.latest(JobId(9), 0).unwrap().version, 3);
        // A later cut that moves on frees version 1.
        c.record_end(JobId(9), 0, RunId(30), 3, Some(3));
        c.record_end(JobId(9), 1, RunId(31), 3, Some(0));
        let cut = c
            .try_cut(
                JobId(9),
                &[Rank {
                    attempts: 3,
                    current: None,
                    sits_out: false,
                }; 2],
            )
            .unwrap()
            .unwrap();
        assert_eq!((cut.id, parts(&cut)), (2, vec![(0, 3)]));
        assert!(c.open_version(JobId(9), 0, 1).is_none());
        assert_eq!(std::fs::read_dir(root.join("9/0")).unwrap().count(), 1);
    }

    #[test]
    fn archives_with_links_escapes_or_a_cut_end_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let ok = archive(t.path(), &[("a/b.pt", b"x"), ("c", b"yy")]);
        validate_archive(&ok).unwrap();

        let p = t.path().join("link.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&p).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "ln", "/etc/passwd").unwrap();
        b.finish().unwrap();
        drop(b);
        let e = validate_archive(&p).unwrap_err().to_string();
        assert!(e.contains("neither a file nor a folder"), "{e}");

        // tar::Builder refuses `..` itself: write the header by hand.
        let p = t.path().join("dotdot.tar");
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut raw = h.as_bytes().to_vec();
        raw.extend_from_slice(&[b'x'; 512]);
        raw.extend_from_slice(&[0; 1024]);
        std::fs::write(&p, raw).unwrap();
        let e = validate_archive(&p).unwrap_err().to_string();
        assert!(e.contains("not a plain relative path"), "{e}");

        let whole = std::fs::read(&ok).unwrap();
        let cut = t.path().join("cut.tar");
        std::fs::write(&cut, &whole[..600]).unwrap();
        assert!(validate_archive(&cut).is_err(), "a cut archive is refused");
    }
}
