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

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use caravel_core::{JobId, Millis, RunId};
use serde::Serialize;

/// A task's saved checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

pub struct Checkpoints {
    root: PathBuf,
    pub max_bytes: u64,
    index: Mutex<BTreeMap<(JobId, u32), Saved>>,
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
        for (job_id, jdir) in crate::datadir::job_dirs(&root).map_err(io(&root))? {
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
                if let Some((newest, _)) = found.pop() {
                    for (_, old) in found {
                        let _ = std::fs::remove_file(old);
                    }
                    index.insert((job_id, ix), newest);
                }
            }
        }
        Ok(Checkpoints {
            root,
            max_bytes,
            index: Mutex::new(index),
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

    /// Bytes of the newest checkpoints per job.
    pub fn bytes_by_job(&self) -> std::collections::HashMap<JobId, u64> {
        let mut out = std::collections::HashMap::new();
        for ((j, _), s) in self.index.lock().expect("lock").iter() {
            *out.entry(*j).or_default() += s.bytes;
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
            let _ = std::fs::remove_file(dir.join(file_name(&p)));
        }
        ix.insert((job, index), saved.clone());
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
