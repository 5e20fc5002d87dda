//! One server per data directory.
//!
//! Two servers on one store would each believe they own it: both would start the same
//! waiting tasks and meter the same runs. A server therefore holds an exclusive `flock` on
//! `DATA_DIR/server.lock` for its whole life, with its pid written inside so that
//! `caravel down` and a second `caravel up` can name it. The kernel drops the lock when
//! the process dies, however it dies, so there is never a stale lock to clean up (a stale
//! pid in the file is harmless: it is read only while the lock is held).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "server.lock";

/// Why the data directory could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("data directory {} is in use by another Caravel server{}", path.display(), pid_text(*pid))]
    InUse { path: PathBuf, pid: Option<u32> },
    #[error("data directory {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn pid_text(pid: Option<u32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
}

/// Takes the data directory for this process. The lock lasts as long as the returned file
/// is open.
pub fn lock(dir: &Path) -> Result<File, LockError> {
    let io = |source| LockError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LOCK_FILE))
        .map_err(io)?;
    match f.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(LockError::InUse {
                path: dir.to_path_buf(),
                pid: read_pid(&mut f),
            })
        }
        Err(TryLockError::Error(e)) => return Err(io(e)),
    }
    f.set_len(0).map_err(io)?;
    f.rewind().map_err(io)?;
    writeln!(f, "{}", std::process::id()).map_err(io)?;
    f.sync_data().map_err(io)?;
    Ok(f)
}

/// Adds the address the server answers on to its lock file (second line), once it is
/// bound, so that `caravel up` can find a pool already running on the directory.
pub fn record_url(f: &mut File, url: &str) -> std::io::Result<()> {
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{}\n{url}", std::process::id())?;
    f.sync_data()
}

/// The address the server holding `dir` recorded (meaningful only while it holds it).
pub fn url(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(LOCK_FILE)).ok()?;
    let url = text.lines().nth(1)?.trim();
    (!url.is_empty()).then(|| url.to_string())
}

/// Whether a server holds `dir` now, and its pid when the lock file names one
/// (`Some(None)`: held, pid unreadable). Takes nothing: a free lock is let go at once.
pub fn holder(dir: &Path) -> Result<Option<Option<u32>>, LockError> {
    let mut f = match OpenOptions::new().read(true).open(dir.join(LOCK_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LockError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    match f.try_lock_shared() {
        Ok(()) => Ok(None),
        Err(TryLockError::WouldBlock) => Ok(Some(read_pid(&mut f))),
        Err(TryLockError::Error(source)) => Err(LockError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

fn read_pid(f: &mut File) -> Option<u32> {
    let mut s = String::new();
    f.rewind().ok()?;
    f.read_to_string(&mut s).ok()?;
    s.lines().next()?.trim().parse().ok()
}

/// The per-job folders under `root` (made if need be), by job id; other names are
/// skipped. Checkpoints and task output are both kept one folder per job.
pub fn job_dirs(root: &Path) -> std::io::Result<Vec<(caravel_core::JobId, PathBuf)>> {
    std::fs::create_dir_all(root)?;
    let mut out = Vec::new();
    for e in std::fs::read_dir(root)? {
        let e = e?;
        if let Some(id) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push((caravel_core::JobId(id), e.path()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        assert!(holder(dir.path()).unwrap().is_none(), "no lock file yet");
        let mut first = lock(dir.path()).unwrap();
        let me = std::process::id();
        assert_eq!(holder(dir.path()).unwrap(), Some(Some(me)));
        assert_eq!(url(dir.path()), None, "not bound yet");
        record_url(&mut first, "http://127.0.0.1:7080").unwrap();
        assert_eq!(
            holder(dir.path()).unwrap(),
            Some(Some(me)),
            "the pid stays first"
        );
        assert_eq!(url(dir.path()).as_deref(), Some("http://127.0.0.1:7080"));
        match lock(dir.path()) {
            Err(LockError::InUse { pid, .. }) => assert_eq!(pid, Some(me)),
            other => panic!("expected InUse, got {other:?}"),
        }
        let msg = lock(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("in use by another Caravel server") && msg.contains(&me.to_string()));
        drop(first);
        assert!(holder(dir.path()).unwrap().is_none());
        // The file stays behind with the old pid; it does not count without the lock.
        let again = lock(dir.path()).unwrap();
        drop(again);
    }

    #[test]
    fn a_missing_directory_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("nope");
        let e = lock(&gone).unwrap_err();
        assert!(matches!(e, LockError::Io { .. }));
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
