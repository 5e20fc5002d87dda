//! Shipped working directories on the node: the job's archive (`Assignment::workdir`)
//! fetched from the server once per node into a cache named by its digest, then unpacked
//! into each task's own fresh working directory. A hundred tasks of one job starting
//! together fetch it once: one fetch per digest at a time, the others wait for it.
//!
//! The cache is bounded (`CACHE_BYTES`): past it, the archives used longest ago go.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use caravel_core::api::Assignment;
use sha2::Digest;

/// How much of the node's disk the cache of archives may hold.
const CACHE_BYTES: u64 = 2 << 30;

#[derive(Default)]
pub(crate) struct Cache {
    /// One lock per digest being fetched.
    fetching: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Unpacks `archive` into the empty folder `dst` (as the agent; its caller hands the
/// result to the task's uid): files, folders and links only, nothing outside `dst`,
/// nothing written through a link, modes without set-id bits.
pub fn unpack(archive: &Path, dst: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(archive)?;
    let mut ar = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, f));
    ar.set_preserve_permissions(false);
    ar.set_preserve_mtime(false);
    ar.set_unpack_xattrs(false);
    for e in ar.entries()? {
        let mut e = e?;
        let kind = e.header().entry_type();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "`{}` in the working directory is not a file, folder or link",
                    e.path()?.display()
                ),
            ));
        }
        // unpack_in refuses paths that leave `dst`, and writing through a link.
        e.unpack_in(dst)?;
    }
    Ok(())
}

fn sha256_file(p: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(p)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Removes the archives used longest ago until the cache holds at most `cap` bytes,
/// never `keep`.
fn trim(dir: &Path, cap: u64, keep: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    files.sort();
    for (_, len, p) in files {
        if total <= cap {
            break;
        }
        if p != keep && std::fs::remove_file(&p).is_ok() {
            total -= len;
        }
    }
}

impl crate::Agent {
    fn workdir_cache(&self) -> PathBuf {
        self.cfg.work_dir.join("cache").join("workdirs")
    }

    /// The job's archive in this node's cache, fetched if need be.
    async fn workdir_archive(&self, a: &Assignment, digest: &str) -> Result<PathBuf, String> {
        let hex = digest
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("`{digest}` is not sha256:<hex>"))?;
        let dir = self.workdir_cache();
        let path = dir.join(format!("{hex}.tar"));
        let lock = self
            .workdirs
            .fetching
            .lock()
            .expect("lock")
            .entry(digest.to_string())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        if path.exists() {
            // Used now: the cache trims what was used longest ago.
            let _ = std::fs::File::options()
                .append(true)
                .open(&path)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            return Ok(path);
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let tmp = dir.join(format!(".{hex}.{}", a.run.0));
        let mut delays = crate::retry_delays(200, 5_000);
        let mut last = String::new();
        for _ in 0..8 {
            match self.fetch_workdir(a, &tmp).await {
                Ok(()) => {
                    let got = tokio::task::spawn_blocking({
                        let t = tmp.clone();
                        move || sha256_file(&t)
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                    if got != digest {
                        let _ = std::fs::remove_file(&tmp);
                        last = format!("it arrived as {got}, not {digest}");
                    } else {
                        std::fs::rename(&tmp, &path)
                            .map_err(|e| format!("{}: {e}", path.display()))?;
                        let (d, p) = (dir.clone(), path.clone());
                        let _ =
                            tokio::task::spawn_blocking(move || trim(&d, CACHE_BYTES, &p)).await;
                        return Ok(path);
                    }
                }
                Err((true, e)) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                Err((false, e)) => {
                    let _ = std::fs::remove_file(&tmp);
                    last = e;
                }
            }
            tokio::time::sleep(delays.next().expect("endless")).await;
        }
        Err(format!("fetching it failed: {last}"))
    }

    /// One download into `tmp`; the error says whether it is final (`true`).
    async fn fetch_workdir(&self, a: &Assignment, tmp: &Path) -> Result<(), (bool, String)> {
        use tokio::io::AsyncWriteExt;
        let (i, server) = self.server();
        let mut resp = match self
            .bulk
            .get(format!("{server}/v1/jobs/{}/workdir", a.job.0))
            .bearer_auth(&self.cfg.token)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.next_server(i);
                return Err((false, e.to_string()));
            }
        };
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err((status.as_u16() == 404, format!("{status}: {text}")));
        }
        let mut f = tokio::io::BufWriter::with_capacity(
            1 << 20,
            tokio::fs::File::create(tmp)
                .await
                .map_err(|e| (true, format!("{}: {e}", tmp.display())))?,
        );
        while let Some(chunk) = resp.chunk().await.map_err(|e| (false, e.to_string()))? {
            f.write_all(&chunk)
                .await
                .map_err(|e| (true, format!("{}: {e}", tmp.display())))?;
        }
        f.flush()
            .await
            .map_err(|e| (true, format!("{}: {e}", tmp.display())))?;
        Ok(())
    }

    /// Fills the task's (empty) working directory with the job's shipped one, handed to
    /// `uid` when the task runs as one.
    pub(crate) async fn prepare_workdir(
        &self,
        a: &Assignment,
        work: &Path,
        uid: Option<u32>,
    ) -> Result<(), String> {
        let Some(digest) = &a.workdir else {
            return Ok(());
        };
        let archive = self
            .workdir_archive(a, digest)
            .await
            .map_err(|e| format!("the working directory {digest}: {e}"))?;
        let w = work.to_path_buf();
        tokio::task::spawn_blocking(move || {
            unpack(&archive, &w)?;
            match uid {
                Some(u) => crate::sandbox::chown_tree(&w, u, u),
                None => Ok(()),
            }
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("unpacking the working directory {digest}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_unpacks_without_set_id_bits_or_escapes() {
        let d = tempfile::tempdir().unwrap();
        let ar = d.path().join("a.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&ar).unwrap());
        for (name, mode) in [("run.sh", 0o4755u32), ("data.txt", 0o644)] {
            let mut h = tar::Header::new_gnu();
            h.set_size(2);
            h.set_mode(mode);
            h.set_cksum();
            b.append_data(&mut h, name, &b"hi"[..]).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "etc", "/etc").unwrap();
        b.finish().unwrap();
        let dst = d.path().join("work");
        std::fs::create_dir(&dst).unwrap();
        unpack(&ar, &dst).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dst.join("run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7000, 0, "no set-id bit: {mode:o}");
        assert_eq!(mode & 0o111, 0o111, "executable still: {mode:o}");
        assert!(std::fs::symlink_metadata(dst.join("etc"))
            .unwrap()
            .file_type()
            .is_symlink());

        // A file written through the link would land outside: refused.
        let bad = d.path().join("bad.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&bad).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "out", d.path()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "out/escaped", &b"no"[..]).unwrap();
        b.finish().unwrap();
        let dst2 = d.path().join("work2");
        std::fs::create_dir(&dst2).unwrap();
        assert!(unpack(&bad, &dst2).is_err());
        assert!(!d.path().join("escaped").exists());
    }

    #[test]
    fn the_cache_keeps_what_was_used_last() {
        let d = tempfile::tempdir().unwrap();
        let t = std::time::SystemTime::now();
        for (i, age) in [(0, 30u64), (1, 20), (2, 10)] {
            let p = d.path().join(format!("{i}.tar"));
            std::fs::write(&p, vec![0u8; 100]).unwrap();
            std::fs::File::options()
                .append(true)
                .open(&p)
                .unwrap()
                .set_modified(t - std::time::Duration::from_secs(age))
                .unwrap();
        }
        trim(d.path(), 250, &d.path().join("0.tar"));
        assert!(
            d.path().join("0.tar").exists(),
            "kept: it is the one in use"
        );
        assert!(
            !d.path().join("1.tar").exists(),
            "the oldest of the rest went"
        );
        assert!(d.path().join("2.tar").exists());
    }
}
