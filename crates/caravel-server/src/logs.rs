//! Task output kept by the control plane, so that `caravel logs` still answers after the
//! node that ran the task is gone, and agents can free their disks.
//!
//! Agents ship each run's stdout and stderr as they grow, a few seconds behind, and once
//! more when the run ends (marking the stream done). An append names the offset it starts
//! at, so a resent or overlapping append is taken once and a gap is refused with the
//! length the server has, from which the agent resends. A stream is kept in chunk files
//! named by their first byte's offset; beyond the per-stream limit the oldest chunks are
//! dropped, so what is kept is the end of the output, where a failure shows.
//!
//! Layout: `ROOT/<job>/<run>.<stream>.<first offset, 20 digits>.log`; the last chunk of a
//! stream the agent finished ends in `.end` instead (an empty one for an empty stream).

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use caravel_core::{JobId, RunId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn parse(s: &str) -> Option<Stream> {
        match s {
            "stdout" => Some(Stream::Stdout),
            "stderr" => Some(Stream::Stderr),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log folder {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the append starts at byte {offset}, but the server has only {end}")]
    Gap { offset: u64, end: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One stream of one run as kept.
#[derive(Debug, Clone, Default)]
struct Kept {
    /// First offsets of the chunk files, ascending.
    chunks: Vec<u64>,
    /// One past the last byte held.
    end: u64,
    done: bool,
}

impl Kept {
    fn first(&self) -> u64 {
        self.chunks.first().copied().unwrap_or(self.end)
    }
}

/// Where a stream stands after an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// One past the last byte held: where the next append starts.
    pub end: u64,
    /// The first byte still held (later than 0 once the limit dropped the start).
    pub first: u64,
    pub done: bool,
    /// Bytes of this append that were new (not already held).
    pub taken: u64,
}

/// A read from a kept stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRead {
    pub data: Vec<u8>,
    /// The offset the data starts at: later than asked when those bytes were dropped.
    pub from: u64,
    pub end: u64,
    pub done: bool,
}

pub struct Logs {
    root: PathBuf,
    /// The most bytes kept per stream of a run.
    pub max_bytes: u64,
    chunk_bytes: u64,
    index: Mutex<BTreeMap<(JobId, RunId, Stream), Kept>>,
    /// Written to since the last `sync`.
    dirty: std::sync::atomic::AtomicBool,
}

/// A chunk's file: `<run>.<stream>.<first offset>.log`, or `.end` for the last chunk of a
/// stream the agent finished (one file per stream says both; a short run's output is two
/// files, so a pool running hundreds of runs a second creates few inodes).
fn chunk_name(run: RunId, stream: Stream, first: u64, end: bool) -> String {
    format!(
        "{}.{}.{first:020}.{}",
        run.0,
        stream.as_str(),
        if end { "end" } else { "log" }
    )
}

impl Kept {
    fn chunk_file(&self, run: RunId, stream: Stream, c: u64) -> String {
        chunk_name(run, stream, c, self.done && self.chunks.last() == Some(&c))
    }
}

impl Logs {
    /// Opens (making it if need be) the log root and indexes what is there. A chunk's
    /// length on disk is the truth: an append a crash cut short is resent by the agent.
    pub fn open(root: PathBuf, max_bytes: u64) -> Result<Logs, LogError> {
        let mut index = BTreeMap::new();
        for (job_id, jdir) in crate::datadir::job_dirs(&root).map_err(io(&root))? {
            // (run, stream) -> first offset -> (length, is an `.end`)
            type Found = BTreeMap<(u64, Stream), BTreeMap<u64, (u64, bool)>>;
            let mut found: Found = BTreeMap::new();
            for f in std::fs::read_dir(&jdir).map_err(io(&jdir))? {
                let f = f.map_err(io(&jdir))?;
                let fname = f.file_name().to_string_lossy().into_owned();
                let mut it = fname.split('.');
                let (Some(run), Some(stream), Some(first), Some(ext), None) =
                    (it.next(), it.next(), it.next(), it.next(), it.next())
                else {
                    continue;
                };
                let (Ok(run), Some(stream), Ok(first), true) = (
                    run.parse::<u64>(),
                    Stream::parse(stream),
                    first.parse::<u64>(),
                    ext == "log" || ext == "end",
                ) else {
                    continue;
                };
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                found
                    .entry((run, stream))
                    .or_default()
                    .insert(first, (len, ext == "end"));
            }
            for ((run, stream), chunks) in found {
                // Chunks follow each other; a shorter chunk before a later one (a crash
                // between the two) leaves a hole, and what follows it goes.
                let run = RunId(run);
                let mut kept = Kept::default();
                let mut end = None;
                for (first, (len, fin)) in chunks {
                    match end {
                        Some(e) if e != first => {
                            let _ = std::fs::remove_file(
                                jdir.join(chunk_name(run, stream, first, fin)),
                            );
                        }
                        _ => {
                            kept.chunks.push(first);
                            kept.done = fin;
                            end = Some(first + len);
                        }
                    }
                }
                kept.end = end.unwrap_or(0);
                index.insert((job_id, run, stream), kept);
            }
        }
        Ok(Logs {
            root,
            max_bytes,
            chunk_bytes: (max_bytes / 4).max(64 << 10),
            index: Mutex::new(index),
            dirty: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn job_dir(&self, job: JobId) -> PathBuf {
        self.root.join(job.0.to_string())
    }

    /// Appends `data`, which starts at byte `offset` of the stream. Bytes already held are
    /// skipped; an offset past the end is a gap, refused unless `skip` says the sender
    /// means to leave the bytes between out (it is behind by more than the limit). `done`
    /// marks the stream complete once this append is in. A complete stream that is sent
    /// new bytes is reopened: its agent found that this server lost the end of it (a
    /// machine crash before the data reached the disk) and sends it again.
    pub fn append(
        &self,
        (job, run, stream): (JobId, RunId, Stream),
        offset: u64,
        data: &[u8],
        skip: bool,
        done: bool,
    ) -> Result<Appended, LogError> {
        let mut ix = self.index.lock().expect("lock");
        let key = (job, run, stream);
        let mut kept = ix.get(&key).cloned().unwrap_or_default();
        let dir = self.job_dir(job);
        let state = |kept: &Kept, taken| Appended {
            end: kept.end,
            first: kept.first(),
            done: kept.done,
            taken,
        };
        if kept.chunks.is_empty() {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        if offset > kept.end {
            if !skip {
                return Err(LogError::Gap {
                    offset,
                    end: kept.end,
                });
            }
            for c in kept.chunks.clone() {
                let _ = std::fs::remove_file(dir.join(kept.chunk_file(run, stream, c)));
            }
            kept.chunks.clear();
            kept.done = false;
            kept.end = offset;
        }
        let fresh = &data[(kept.end - offset).min(data.len() as u64) as usize..];
        if kept.done {
            if fresh.is_empty() {
                return Ok(state(&kept, 0));
            }
            if let Some(&c) = kept.chunks.last() {
                let from = dir.join(chunk_name(run, stream, c, true));
                let to = dir.join(chunk_name(run, stream, c, false));
                std::fs::rename(&from, &to).map_err(io(&from))?;
            }
            kept.done = false;
        }
        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut rest = fresh;
        // Whether the newest chunk's file is already named `.end`.
        let mut ended = false;
        while !rest.is_empty() {
            let (last, new) = match kept.chunks.last() {
                Some(&c) if kept.end - c < self.chunk_bytes => (c, false),
                _ => {
                    kept.chunks.push(kept.end);
                    (kept.end, true)
                }
            };
            let room = (self.chunk_bytes - (kept.end - last)) as usize;
            let (now, later) = rest.split_at(room.min(rest.len()));
            // The final piece of a finished stream in a chunk of its own is written under
            // its final name at once.
            ended = done && new && later.is_empty();
            let path = dir.join(chunk_name(run, stream, last, ended));
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io(&path))?;
            f.write_all(now).map_err(io(&path))?;
            kept.end += now.len() as u64;
            rest = later;
        }
        // The limit drops whole chunks from the start; the newest chunk always stays.
        while kept.chunks.len() > 1 && kept.end - kept.chunks[0] > self.max_bytes {
            let c = kept.chunks.remove(0);
            let _ = std::fs::remove_file(dir.join(chunk_name(run, stream, c, false)));
        }
        if done && !ended {
            match kept.chunks.last() {
                Some(&c) => {
                    let from = dir.join(chunk_name(run, stream, c, false));
                    let to = dir.join(chunk_name(run, stream, c, true));
                    std::fs::rename(&from, &to).map_err(io(&from))?;
                }
                None => {
                    kept.chunks.push(kept.end);
                    let path = dir.join(chunk_name(run, stream, kept.end, true));
                    std::fs::File::create(&path).map_err(io(&path))?;
                }
            }
        }
        kept.done = done;
        let out = state(&kept, fresh.len() as u64);
        ix.insert(key, kept);
        Ok(out)
    }

    /// Up to `max` bytes of the stream from `offset` (or from the first byte held, when
    /// that is later). `None` when nothing of the stream was ever shipped.
    pub fn read(
        &self,
        job: JobId,
        run: RunId,
        stream: Stream,
        offset: u64,
        max: u64,
    ) -> Result<Option<LogRead>, LogError> {
        let dir = self.job_dir(job);
        // Chunk files may be dropped by an append once the lock is let go: retry the few
        // times that can race.
        for _ in 0..3 {
            let Some(kept) = self
                .index
                .lock()
                .expect("lock")
                .get(&(job, run, stream))
                .cloned()
            else {
                return Ok(None);
            };
            let from = offset.max(kept.first()).min(kept.end);
            let want = (kept.end - from).min(max);
            let mut data = Vec::with_capacity(want as usize);
            let mut pos = from;
            let mut raced = false;
            while (data.len() as u64) < want {
                let Some(&c) = kept.chunks.iter().rev().find(|&&c| c <= pos) else {
                    break;
                };
                let path = dir.join(kept.chunk_file(run, stream, c));
                let mut f = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        raced = true;
                        break;
                    }
                    Err(e) => return Err(io(&path)(e)),
                };
                f.seek(SeekFrom::Start(pos - c)).map_err(io(&path))?;
                let before = data.len();
                f.take(want - data.len() as u64)
                    .read_to_end(&mut data)
                    .map_err(io(&path))?;
                if data.len() == before {
                    break;
                }
                pos += (data.len() - before) as u64;
            }
            if raced {
                continue;
            }
            return Ok(Some(LogRead {
                data,
                from,
                end: kept.end,
                done: kept.done,
            }));
        }
        Ok(None)
    }

    /// Makes what was appended durable: one `syncfs` of the log folder's file system every
    /// few seconds instead of an fsync per append (hundreds a second on a busy pool).
    /// Agents keep a run's folder until they have seen the server still hold all of it
    /// after a sync had to happen, so a machine crash in between loses nothing.
    pub fn sync(&self) -> Result<(), LogError> {
        if !self.dirty.swap(false, std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let f = std::fs::File::open(&self.root).map_err(io(&self.root))?;
        if let Err(e) = rustix::fs::syncfs(&f) {
            self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(io(&self.root)(e.into()));
        }
        Ok(())
    }

    /// Whether some output of the run is kept under that job.
    pub fn knows(&self, job: JobId, run: RunId) -> bool {
        let ix = self.index.lock().expect("lock");
        [Stream::Stdout, Stream::Stderr]
            .iter()
            .any(|s| ix.contains_key(&(job, run, *s)))
    }

    /// Jobs with output kept.
    pub fn jobs(&self) -> Vec<JobId> {
        let mut v: Vec<JobId> = self
            .index
            .lock()
            .expect("lock")
            .keys()
            .map(|(j, _, _)| *j)
            .collect();
        v.dedup();
        v
    }

    /// Bytes held per job.
    pub fn bytes_by_job(&self) -> std::collections::HashMap<JobId, u64> {
        let mut out = std::collections::HashMap::new();
        for ((j, _, _), k) in self.index.lock().expect("lock").iter() {
            *out.entry(*j).or_default() += k.end - k.first();
        }
        out
    }

    /// Bytes held over all streams.
    pub fn stored_bytes(&self) -> u64 {
        self.index
            .lock()
            .expect("lock")
            .values()
            .map(|k| k.end - k.first())
            .sum()
    }

    pub fn remove_job(&self, job: JobId) {
        let mut ix = self.index.lock().expect("lock");
        ix.retain(|(j, _, _), _| *j != job);
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

    const J: JobId = JobId(7);
    const R: RunId = RunId(3);

    fn all(l: &Logs, s: Stream) -> LogRead {
        l.read(J, R, s, 0, u64::MAX).unwrap().unwrap()
    }

    #[test]
    fn appends_are_taken_once_and_a_gap_is_refused_with_the_length_held() {
        let d = tempfile::tempdir().unwrap();
        let l = Logs::open(d.path().to_path_buf(), 1 << 20).unwrap();
        assert_eq!(l.read(J, R, Stream::Stdout, 0, 10).unwrap(), None);
        let a = l
            .append((J, R, Stream::Stdout), 0, b"hello ", false, false)
            .unwrap();
        assert_eq!((a.end, a.taken, a.done), (6, 6, false));
        // A resend that overlaps what is held adds only the new part.
        let a = l
            .append((J, R, Stream::Stdout), 3, b"lo world", false, false)
            .unwrap();
        assert_eq!((a.end, a.taken), (11, 5));
        let a = l
            .append((J, R, Stream::Stdout), 0, b"hello", false, false)
            .unwrap();
        assert_eq!((a.end, a.taken), (11, 0));
        match l.append((J, R, Stream::Stdout), 20, b"x", false, false) {
            Err(LogError::Gap {
                offset: 20,
                end: 11,
            }) => {}
            other => panic!("{other:?}"),
        }
        let r = all(&l, Stream::Stdout);
        assert_eq!(r.data, b"hello world");
        assert_eq!((r.from, r.end, r.done), (0, 11, false));
        // Reads from an offset; stderr is its own stream.
        let r = l.read(J, R, Stream::Stdout, 6, 3).unwrap().unwrap();
        assert_eq!((r.data.as_slice(), r.from), (&b"wor"[..], 6));
        assert_eq!(l.read(J, R, Stream::Stderr, 0, 10).unwrap(), None);
        let a = l
            .append((J, R, Stream::Stdout), 11, b"", false, true)
            .unwrap();
        assert!(a.done);
        assert!(all(&l, Stream::Stdout).done);
        // A finished stream sent what it holds stays finished; a gap is still a gap.
        let a = l
            .append((J, R, Stream::Stdout), 6, b"world", false, false)
            .unwrap();
        assert_eq!((a.end, a.taken, a.done), (11, 0, true));
        assert!(matches!(
            l.append((J, R, Stream::Stdout), 12, b"x", false, true),
            Err(LogError::Gap { end: 11, .. })
        ));
        // A short run's output is one file per stream, named final at once; an empty
        // finished stream is an empty `.end`.
        let r2 = RunId(9);
        l.append((J, r2, Stream::Stdout), 0, b"all of it", false, true)
            .unwrap();
        l.append((J, r2, Stream::Stderr), 0, b"", false, true)
            .unwrap();
        let mut files: Vec<String> = std::fs::read_dir(d.path().join("7"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("9."))
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "9.stderr.00000000000000000000.end",
                "9.stdout.00000000000000000000.end"
            ]
        );
        let l = Logs::open(d.path().to_path_buf(), 1 << 20).unwrap();
        let r = l.read(J, r2, Stream::Stderr, 0, 10).unwrap().unwrap();
        assert_eq!((r.data.len(), r.done), (0, true));
        assert_eq!(all(&l, Stream::Stdout).data, b"hello world");
        assert!(all(&l, Stream::Stdout).done);
        l.sync().unwrap();
        // A machine crash lost the end of a finished stream: the agent sends it again,
        // and the stream reopens, takes it, and is finished again.
        let f = d
            .path()
            .join("7")
            .join(chunk_name(r2, Stream::Stdout, 0, true));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(3)
            .unwrap();
        let l = Logs::open(d.path().to_path_buf(), 1 << 20).unwrap();
        let r = l.read(J, r2, Stream::Stdout, 0, 99).unwrap().unwrap();
        assert_eq!((r.data.as_slice(), r.done), (&b"all"[..], true));
        let a = l
            .append((J, r2, Stream::Stdout), 3, b" of it", false, false)
            .unwrap();
        assert_eq!((a.end, a.taken, a.done), (9, 6, false));
        l.append((J, r2, Stream::Stdout), 9, b"", false, true)
            .unwrap();
        let r = l.read(J, r2, Stream::Stdout, 0, 99).unwrap().unwrap();
        assert_eq!((r.data.as_slice(), r.done), (&b"all of it"[..], true));
        let l = Logs::open(d.path().to_path_buf(), 1 << 20).unwrap();
        let r = l.read(J, r2, Stream::Stdout, 0, 99).unwrap().unwrap();
        assert_eq!((r.data.as_slice(), r.done), (&b"all of it"[..], true));
    }

    #[test]
    fn beyond_the_limit_the_start_is_dropped_and_the_end_kept() {
        let d = tempfile::tempdir().unwrap();
        // 256 KiB limit: 64 KiB chunks.
        let l = Logs::open(d.path().to_path_buf(), 256 << 10).unwrap();
        let line = |i: u64| format!("{i:09}\n").into_bytes();
        let mut full = Vec::new();
        for i in 0..100_000u64 {
            let b = line(i);
            l.append((J, R, Stream::Stderr), full.len() as u64, &b, false, false)
                .unwrap();
            full.extend_from_slice(&b);
        }
        let off = full.len() as u64;
        let r = all(&l, Stream::Stderr);
        assert_eq!(r.end, off);
        assert!(r.from > 0 && r.data.len() as u64 <= 256 << 10, "{}", r.from);
        assert!(r.data.len() as u64 >= 192 << 10, "{}", r.data.len());
        // What is held is the stream's end, byte for byte.
        assert_eq!(r.data, &full[r.from as usize..]);
        // An offset inside what was dropped reads from the first byte held.
        let r2 = l.read(J, R, Stream::Stderr, 5, 100).unwrap().unwrap();
        assert_eq!((r2.from, r2.data.as_slice()), (r.from, &r.data[..100]));
        assert_eq!(l.stored_bytes(), r.data.len() as u64);
        // A skip leaves the held bytes behind and starts over at the offset given.
        let a = l
            .append((J, R, Stream::Stderr), off + 1000, b"tail\n", true, true)
            .unwrap();
        assert_eq!((a.first, a.end, a.done), (off + 1000, off + 1005, true));
        let r = all(&l, Stream::Stderr);
        assert_eq!((r.data.as_slice(), r.from), (&b"tail\n"[..], off + 1000));
    }

    #[test]
    fn a_reopen_finds_what_was_kept_and_removing_a_job_drops_it() {
        let d = tempfile::tempdir().unwrap();
        {
            let l = Logs::open(d.path().to_path_buf(), 256 << 10).unwrap();
            l.append(
                (J, R, Stream::Stdout),
                0,
                &vec![b'a'; 100 << 10],
                false,
                true,
            )
            .unwrap();
            l.append((JobId(8), RunId(4), Stream::Stderr), 0, b"x", false, false)
                .unwrap();
        }
        // A crash between two chunks leaves a short first chunk: what follows the hole
        // goes, and the agent resends from the end.
        let s = d.path().join("8");
        let hole = chunk_name(RunId(4), Stream::Stderr, 5, false);
        std::fs::write(s.join(&hole), b"after a hole").unwrap();
        std::fs::write(s.join("4.stderr.x.log"), b"not a chunk").unwrap();
        std::fs::write(d.path().join("not-a-job"), b"").unwrap();
        let l = Logs::open(d.path().to_path_buf(), 256 << 10).unwrap();
        let r = all(&l, Stream::Stdout);
        assert_eq!((r.data.len(), r.end, r.done), (100 << 10, 100 << 10, true));
        let r = l
            .read(JobId(8), RunId(4), Stream::Stderr, 0, 99)
            .unwrap()
            .unwrap();
        assert_eq!((r.data.as_slice(), r.end, r.done), (&b"x"[..], 1, false));
        assert!(!s.join(&hole).exists());
        assert_eq!(l.jobs(), vec![J, JobId(8)]);
        l.remove_job(J);
        assert_eq!(l.jobs(), vec![JobId(8)]);
        assert_eq!(l.read(J, R, Stream::Stdout, 0, 99).unwrap(), None);
        assert!(!d.path().join("7").exists());
        let l = Logs::open(d.path().to_path_buf(), 256 << 10).unwrap();
        assert_eq!(l.jobs(), vec![JobId(8)]);
    }
}
