//! A task's checkpoint folder (`CARAVEL_CHECKPOINT_DIR`): what is in it, packing it into
//! a tar archive only when nothing changed while it was read, and unpacking a saved one.
//!
//! The contract with the task: a checkpoint is saved once the folder has been still for
//! a scan; names starting with `.` are never saved (write `.ckpt.tmp`, then rename it to
//! `ckpt.pt`); only plain files and folders are saved (links are skipped).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use caravel_core::api::Assignment;
use caravel_core::{JobId, RunId};

/// What the folder holds: each saved path with its kind, size, change time and inode. Two
/// equal listings taken around a read mean the read saw one state of the folder.
pub type Listing = BTreeMap<PathBuf, (bool, u64, i64, i64, u64)>;

fn hidden(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

/// Lists the folder (recursively), leaving out hidden names and links.
/// Removes everything in `dir`, keeping the folder.
pub fn clear(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            std::fs::remove_dir_all(e.path())?;
        } else {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

/// What of `listing` is the task's own: everything but the files restored from other ranks'
/// parts of a gang's checkpoint (`foreign`) that are still as they were unpacked.
pub fn own(listing: Listing, foreign: &Listing) -> Listing {
    if foreign.is_empty() {
        return listing;
    }
    listing
        .into_iter()
        .filter(|(p, fp)| foreign.get(p) != Some(fp))
        .collect()
}

/// `list`, less what is not the task's own (`own`).
pub fn list_own(dir: &Path, foreign: &Listing) -> std::io::Result<Listing> {
    Ok(own(list(dir)?, foreign))
}

/// A run's checkpoint folder as the agent last saved or restored it.
#[derive(Debug, Default, Clone)]
pub struct Part {
    pub dir: PathBuf,
    /// The version of the task's own part that the server holds and that the folder held
    /// when last saved or restored (0: nothing of its own yet).
    pub version: u64,
    /// The task's own files then.
    pub saved: Listing,
    /// Files unpacked from other ranks' parts of a gang's cut, as unpacked.
    pub foreign: Listing,
}

pub fn list(dir: &Path) -> std::io::Result<Listing> {
    let mut out = Listing::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let rd = match std::fs::read_dir(dir.join(&rel)) {
            Ok(rd) => rd,
            // A subfolder renamed away between listing and reading: seen next scan.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !rel.as_os_str().is_empty() => {
                continue
            }
            Err(e) => return Err(e),
        };
        for e in rd {
            let e = e?;
            if hidden(&e.file_name()) {
                continue;
            }
            let m = match e.path().symlink_metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let r = rel.join(e.file_name());
            if m.is_dir() {
                out.insert(r.clone(), (true, 0, m.mtime(), m.mtime_nsec(), m.ino()));
                stack.push(r);
            } else if m.is_file() {
                out.insert(r, (false, m.len(), m.mtime(), m.mtime_nsec(), m.ino()));
            }
        }
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("the checkpoint folder changed while it was read")]
    Changed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Packs what `listing` names into a tar archive at `out` and returns its SHA-256, or
/// `Changed` when the folder no longer matches `listing` after the read (a write went on
/// meanwhile: the archive could mix two checkpoints).
pub fn pack(dir: &Path, listing: &Listing, out: &Path) -> Result<(String, u64), PackError> {
    pack_into(dir, listing, &Listing::new(), std::fs::File::create(out)?)
}

/// `pack` into an open file; `listing` is of the task's own files (`list_own` with
/// `foreign`).
pub fn pack_into(
    dir: &Path,
    listing: &Listing,
    foreign: &Listing,
    f: std::fs::File,
) -> Result<(String, u64), PackError> {
    use sha2::Digest;
    struct Hashing<W> {
        w: W,
        h: sha2::Sha256,
        n: u64,
    }
    impl<W: Write> Write for Hashing<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.w.write(buf)?;
            self.h.update(&buf[..n]);
            self.n += n as u64;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.w.flush()
        }
    }
    let mut b = tar::Builder::new(Hashing {
        w: std::io::BufWriter::with_capacity(1 << 16, f),
        h: sha2::Sha256::new(),
        n: 0,
    });
    b.mode(tar::HeaderMode::Deterministic);
    // The folder is the task's, which may swap anything in it for a link while it is
    // read: every file is opened below the folder with no link followed
    // (`sandbox::open_beneath`), and a refusal means the folder changed.
    let root = std::fs::File::open(dir)?;
    for (rel, (is_dir, ..)) in listing {
        let r = if *is_dir {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_mtime(0);
            b.append_data(&mut h, rel, std::io::empty())
        } else {
            match crate::sandbox::open_beneath(&root, rel) {
                Ok(mut f) => {
                    if !f.metadata()?.is_file() {
                        return Err(PackError::Changed);
                    }
                    b.append_file(rel, &mut f)
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        || matches!(
                            e.raw_os_error(),
                            Some(libc::ELOOP) | Some(libc::EXDEV) | Some(libc::ENOTDIR)
                        ) =>
                {
                    return Err(PackError::Changed)
                }
                Err(e) => Err(e),
            }
        };
        match r {
            Ok(()) => {}
            // A file that shrank while it was copied.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(PackError::Changed)
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut w = b.into_inner()?;
    w.flush()?;
    // Not synced: the archive is read back at once to be sent, and only the server's copy
    // has to survive a crash.
    w.w.into_inner().map_err(|e| e.into_error())?;
    if &list_own(dir, foreign)? != listing {
        return Err(PackError::Changed);
    }
    Ok((hex::encode(w.h.finalize()), w.n))
}

/// Unpacks a saved archive into `dir` (made if need be) and returns the paths it held.
/// Only plain files and folders under relative paths are taken.
pub fn unpack(archive: &Path, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    unpack_from(std::io::BufReader::new(std::fs::File::open(archive)?), dir)
}

/// `unpack` from any reader (a download as it arrives).
pub fn unpack_from(r: impl Read, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut paths = Vec::new();
    let mut ar = tar::Archive::new(r);
    ar.set_preserve_permissions(false);
    for e in ar.entries()? {
        let mut e = e?;
        let kind = e.header().entry_type();
        let rel = e.path()?.into_owned();
        if !(kind.is_file() || kind.is_dir())
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "`{}` in the checkpoint is not a plain file or folder",
                    rel.display()
                ),
            ));
        }
        // unpack_in also refuses to write through a link or outside `dir`.
        e.unpack_in(dir)?;
        paths.push(rel);
    }
    Ok(paths)
}

/// Moves the parts of a gang's cut, each unpacked into its own staging folder (rank,
/// folder, the paths it held), into `dir`: the highest rank first, so that where two
/// parts hold the same path the lower rank's wins. Returns what of the folder came from
/// other ranks than `own` (the files the task did not write itself).
pub fn merge_cut(
    staged: &[(u32, PathBuf, Vec<PathBuf>)],
    own: u32,
    dir: &Path,
) -> std::io::Result<Listing> {
    std::fs::create_dir_all(dir)?;
    let mut from: BTreeMap<PathBuf, u32> = BTreeMap::new();
    let mut order: Vec<&(u32, PathBuf, Vec<PathBuf>)> = staged.iter().collect();
    order.sort_by_key(|(r, ..)| std::cmp::Reverse(*r));
    for (rank, stage, paths) in order {
        for p in paths {
            let (src, dst) = (stage.join(p), dir.join(p));
            if src.is_dir() {
                std::fs::create_dir_all(&dst)?;
            } else {
                if let Some(parent) = dst.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                // A rename replaces what a higher rank put there: a new inode.
                std::fs::rename(&src, &dst)?;
            }
            from.insert(p.clone(), *rank);
        }
    }
    let mut foreign = list(dir)?;
    foreign.retain(|p, _| from.get(p) != Some(&own));
    Ok(foreign)
}

/// `merge_cut` of archives (rank, archive) unpacked beside `dir` first.
#[cfg(test)]
pub fn unpack_cut(parts: &[(u32, PathBuf)], own: u32, dir: &Path) -> std::io::Result<Listing> {
    let mut staged = Vec::new();
    for (rank, archive) in parts {
        let stage = dir.with_extension(format!("part-{rank}"));
        let paths = unpack(archive, &stage)?;
        staged.push((*rank, stage, paths));
    }
    let r = merge_cut(&staged, own, dir);
    for (_, stage, _) in staged {
        let _ = std::fs::remove_dir_all(stage);
    }
    r
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    r: R,
    h: sha2::Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        sha2::Digest::update(&mut self.h, &buf[..n]);
        Ok(n)
    }
}

/// How fetching a run's checkpoint before its start ended.
pub(crate) enum Restore {
    /// In place; the version.
    Done(u64),
    /// Cannot be had (the archive is bad, the disk refused it): the run fails to start.
    Failed(String),
    /// The server stopped the run meanwhile.
    Stopped,
}

/// Why a fetch failed: on this node (for good), or on the way (worth another try).
enum Fetch {
    Local(String),
    Retry(String),
}

enum Save {
    Saved(u64),
    /// The folder changed while it was read: try again at the next scan.
    Changed,
    /// The server keeps checkpoints of the task's current run only, and this is not it.
    NotCurrent,
    /// The server refused this content (too large, say): not sent again unchanged.
    Refused(String),
    /// Not sent (server unreachable, disk trouble): try again at the next scan.
    Failed(String),
}

/// How often a running task's checkpoint folder is looked at.
const SCAN: std::time::Duration = std::time::Duration::from_secs(1);

impl crate::Agent {
    fn checkpoint_url(&self, server: &str, job: JobId, index: u32) -> String {
        format!("{server}/v1/jobs/{}/tasks/{index}/checkpoint", job.0)
    }

    /// Fetches the task's newest checkpoint into `ckpt`, retrying while the server cannot
    /// be reached: starting without it would silently throw away the work it holds.
    pub(crate) async fn restore_checkpoint(
        &self,
        a: &Assignment,
        dir: &Path,
        ckpt: &Path,
        ident: Option<(u32, u32)>,
        stop: &mut tokio::sync::oneshot::Receiver<crate::Stop>,
    ) -> Restore {
        let tmp = dir.join(".checkpoint-restore.tar");
        if let Err(e) = std::fs::create_dir_all(dir) {
            return Restore::Failed(format!("creating {}: {e}", dir.display()));
        }
        let mut delays = crate::retry_delays(200, 5_000);
        loop {
            match self.fetch_checkpoint(a, &tmp).await {
                Ok(Some(version)) => {
                    let (t, c) = (tmp.clone(), ckpt.to_path_buf());
                    // Into a folder the task cannot touch yet (it has not started), then
                    // handed to the task's uid.
                    let r = tokio::task::spawn_blocking(move || {
                        unpack(&t, &c)?;
                        match ident {
                            Some((u, g)) => crate::sandbox::chown_tree(&c, u, g),
                            None => Ok(()),
                        }
                    })
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                    let _ = std::fs::remove_file(&tmp);
                    return match r {
                        Ok(()) => {
                            tracing::info!(run = %a.run, version, "checkpoint restored");
                            Restore::Done(version)
                        }
                        Err(e) => Restore::Failed(format!(
                            "cannot unpack checkpoint version {version} into {}: {e}",
                            ckpt.display()
                        )),
                    };
                }
                // Removed since the assignment was made (the job's retention ran out).
                Ok(None) => {
                    return match std::fs::create_dir_all(ckpt) {
                        Ok(()) => Restore::Done(0),
                        Err(e) => Restore::Failed(format!("creating {}: {e}", ckpt.display())),
                    }
                }
                Err(Fetch::Local(e)) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Restore::Failed(format!("fetching the task's checkpoint: {e}"));
                }
                Err(Fetch::Retry(e)) => {
                    let _ = std::fs::remove_file(&tmp);
                    tracing::warn!(run = %a.run, "cannot fetch the task's checkpoint yet: {e}");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delays.next().expect("endless")) => {}
                _ = &mut *stop => return Restore::Stopped,
            }
        }
    }

    /// Fetches every part of the gang's cut and unpacks them all into `ckpt` (the lower
    /// rank's file wins where two parts hold the same path), retrying while the server
    /// cannot be reached. Returns the folder as restored, and what of it is the task's own.
    pub(crate) async fn restore_cut(
        &self,
        a: &Assignment,
        cut: &caravel_core::api::GangCut,
        dir: &Path,
        ckpt: &Path,
        ident: Option<(u32, u32)>,
        stop: &mut tokio::sync::oneshot::Receiver<crate::Stop>,
    ) -> Result<Part, Restore> {
        if let Err(e) = std::fs::create_dir_all(dir) {
            return Err(Restore::Failed(format!("creating {}: {e}", dir.display())));
        }
        let mut delays = crate::retry_delays(200, 5_000);
        // Each part is unpacked as it arrives (no archive on disk first) into a staging
        // folder of its own, all parts at once, then moved into place in rank order.
        let stages: Vec<PathBuf> = cut
            .parts
            .iter()
            .map(|p| dir.join(format!(".checkpoint-part-{}", p.task)))
            .collect();
        let clean = || {
            for st in &stages {
                let _ = std::fs::remove_dir_all(st);
            }
        };
        let mut tries = 0;
        let staged = loop {
            clean();
            let got = futures_util::future::join_all(
                cut.parts
                    .iter()
                    .zip(&stages)
                    .map(|(p, st)| self.stream_part(a.job, p, st)),
            )
            .await;
            let mut retry = None;
            let mut staged = Vec::new();
            for (r, (p, st)) in got.into_iter().zip(cut.parts.iter().zip(&stages)) {
                match r {
                    Ok(paths) => staged.push((p.task, st.clone(), paths)),
                    // The server no longer keeps it: a newer cut replaced it meanwhile,
                    // which this run was not given. Fail the start; the retry gets the new one.
                    Err(Fetch::Local(e)) => {
                        clean();
                        return Err(Restore::Failed(format!(
                            "fetching task {}'s part (version {}) of checkpoint cut {}: {e}",
                            p.task, p.version, cut.cut
                        )));
                    }
                    Err(Fetch::Retry(e)) => retry = Some(e),
                }
            }
            let Some(e) = retry else { break staged };
            tries += 1;
            if tries >= 8 {
                clean();
                return Err(Restore::Failed(format!(
                    "fetching the gang's checkpoint cut {} failed {tries} times: {e}",
                    cut.cut
                )));
            }
            tracing::warn!(run = %a.run, "cannot fetch the gang's checkpoint yet: {e}");
            tokio::select! {
                _ = tokio::time::sleep(delays.next().expect("endless")) => {}
                _ = &mut *stop => {
                    clean();
                    return Err(Restore::Stopped);
                }
            }
        };
        let (c, own) = (ckpt.to_path_buf(), a.index);
        let r = tokio::task::spawn_blocking(move || {
            let foreign = merge_cut(&staged, own, &c)?;
            if let Some((u, g)) = ident {
                crate::sandbox::chown_tree(&c, u, g)?;
            }
            // Listed after the chown, which changes no time or inode.
            let foreign = {
                let now = list(&c)?;
                foreign
                    .into_keys()
                    .filter_map(|p| now.get(&p).map(|f| (p, *f)))
                    .collect::<Listing>()
            };
            let saved = list_own(&c, &foreign)?;
            Ok::<_, std::io::Error>((foreign, saved))
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        clean();
        match r {
            Ok((foreign, saved)) => {
                let version = cut
                    .parts
                    .iter()
                    .find(|p| p.task == a.index)
                    .map_or(0, |p| p.version);
                tracing::info!(run = %a.run, cut = cut.cut, parts = cut.parts.len(), "gang checkpoint restored");
                Ok(Part {
                    dir: ckpt.to_path_buf(),
                    version,
                    saved,
                    foreign,
                })
            }
            Err(e) => Err(Restore::Failed(format!(
                "cannot unpack checkpoint cut {} into {}: {e}",
                cut.cut,
                ckpt.display()
            ))),
        }
    }

    /// One try at one part of a gang's cut: downloaded and unpacked into `stage` as it
    /// arrives, its SHA-256 checked at the end (a damaged one is thrown away and fetched
    /// again). Returns the paths it held.
    async fn stream_part(
        &self,
        job: JobId,
        part: &caravel_core::api::CutPart,
        stage: &Path,
    ) -> Result<Vec<PathBuf>, Fetch> {
        use futures_util::TryStreamExt;
        use Fetch::{Local, Retry};
        let (i, server) = self.server();
        let url = format!(
            "{}?version={}",
            self.checkpoint_url(server, job, part.task),
            part.version
        );
        let resp = match self.bulk.get(url).bearer_auth(&self.cfg.token).send().await {
            Ok(r) => r,
            Err(e) => {
                self.next_server(i);
                return Err(Retry(e.to_string()));
            }
        };
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(Local("the server no longer keeps it".into()));
        }
        if !status.is_success() {
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
                self.next_server(i);
            }
            return Err(Retry(format!(
                "{status}: {}",
                resp.text().await.unwrap_or_default()
            )));
        }
        let body =
            tokio_util::io::StreamReader::new(resp.bytes_stream().map_err(std::io::Error::other));
        let (stage, want) = (stage.to_path_buf(), part.sha256.clone());
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let _guard = handle.enter();
            let mut r = Hashing {
                r: std::io::BufReader::with_capacity(
                    1 << 20,
                    tokio_util::io::SyncIoBridge::new(body),
                ),
                h: <sha2::Sha256 as sha2::Digest>::new(),
            };
            // An error here may be the network's or the disk's: either way, another try.
            let paths = unpack_from(&mut r, &stage).map_err(|e| Retry(e.to_string()))?;
            // The end-of-archive blocks and padding count in the hash too.
            std::io::copy(&mut r, &mut std::io::sink()).map_err(|e| Retry(e.to_string()))?;
            let got = hex::encode(sha2::Digest::finalize(r.h));
            if got != want {
                return Err(Retry(format!(
                    "the checkpoint arrived damaged (SHA-256 {got}, not {want})"
                )));
            }
            Ok(paths)
        })
        .await
        .unwrap_or_else(|e| Err(Retry(e.to_string())))
    }

    /// One try: `Ok(None)` when the server has no checkpoint for the task.
    async fn fetch_checkpoint(&self, a: &Assignment, tmp: &Path) -> Result<Option<u64>, Fetch> {
        self.fetch_part(a.job, a.index, None, tmp).await
    }

    /// One try at a task's newest checkpoint, or at the version named.
    async fn fetch_part(
        &self,
        job: JobId,
        index: u32,
        version: Option<u64>,
        tmp: &Path,
    ) -> Result<Option<u64>, Fetch> {
        use tokio::io::AsyncWriteExt;
        use Fetch::{Local, Retry};
        let (i, server) = self.server();
        let mut url = self.checkpoint_url(server, job, index);
        if let Some(v) = version {
            url = format!("{url}?version={v}");
        }
        let mut resp = match self.bulk.get(url).bearer_auth(&self.cfg.token).send().await {
            Ok(r) => r,
            Err(e) => {
                self.next_server(i);
                return Err(Retry(e.to_string()));
            }
        };
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
                self.next_server(i);
            }
            return Err(Retry(format!(
                "{status}: {}",
                resp.text().await.unwrap_or_default()
            )));
        }
        let header = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let version: u64 = header("x-caravel-checkpoint-version")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Retry("the answer has no x-caravel-checkpoint-version".into()))?;
        let sha = header("x-caravel-sha256")
            .ok_or_else(|| Retry("the answer has no x-caravel-sha256".into()))?;
        let mut f = tokio::io::BufWriter::with_capacity(
            1 << 20,
            tokio::fs::File::create(tmp)
                .await
                .map_err(|e| Local(format!("{}: {e}", tmp.display())))?,
        );
        let mut hash = <sha2::Sha256 as sha2::Digest>::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| Retry(e.to_string()))? {
            sha2::Digest::update(&mut hash, &chunk);
            f.write_all(&chunk)
                .await
                .map_err(|e| Local(format!("{}: {e}", tmp.display())))?;
        }
        f.flush()
            .await
            .map_err(|e| Local(format!("{}: {e}", tmp.display())))?;
        drop(f);
        let got = hex::encode(sha2::Digest::finalize(hash));
        if got != sha {
            return Err(Retry(format!(
                "the checkpoint arrived damaged (SHA-256 {got}, not {sha})"
            )));
        }
        Ok(Some(version))
    }

    /// Saves the checkpoint folder whenever it changed and then stayed still for a scan,
    /// until `done` turns; then, if `done` says so, once more for what the task wrote last
    /// (on SIGTERM, say). Returns the version the server then holds of everything the
    /// folder holds of the task's own (so the node's copy may go), or `None`.
    pub(crate) async fn watch_checkpoint(
        self: std::sync::Arc<Self>,
        job: JobId,
        index: u32,
        run: RunId,
        dir: PathBuf,
        part: std::sync::Arc<std::sync::Mutex<Part>>,
        mut done: tokio::sync::watch::Receiver<bool>,
    ) -> Option<u64> {
        let (ckpt, foreign, mut saved) = {
            let p = part.lock().expect("lock");
            (p.dir.clone(), p.foreign.clone(), p.saved.clone())
        };
        let mut prev: Option<Listing> = None;
        let mut refused: Option<Listing> = None;
        let keep = |v: u64, l: &Listing| {
            let mut p = part.lock().expect("lock");
            p.version = v;
            p.saved = l.clone();
            drop(p);
            // A gang's save: the server has opened a round for it; answer it now.
            if self.parts.lock().expect("lock").contains_key(&run) {
                self.sync_wake.notify_one();
            }
        };
        let final_save = loop {
            tokio::select! {
                _ = tokio::time::sleep(SCAN) => {}
                r = done.changed() => break r.is_ok() && *done.borrow(),
            }
            let Ok(now) = list_own(&ckpt, &foreign) else {
                continue;
            };
            let still = prev.as_ref() == Some(&now);
            prev = Some(now.clone());
            if !still || now == saved || refused.as_ref() == Some(&now) {
                continue;
            }
            match self
                .save_checkpoint(job, index, run, &dir, &ckpt, &foreign, &now)
                .await
            {
                Save::Saved(v) => {
                    keep(v, &now);
                    saved = now;
                }
                Save::NotCurrent => return None,
                Save::Refused(_) => refused = Some(now),
                Save::Changed | Save::Failed(_) => {}
            }
        };
        if !final_save {
            return None;
        }
        // Bounded: a node cut off from the server must still report the exit when it can.
        for _ in 0..3 {
            let Ok(now) = list_own(&ckpt, &foreign) else {
                return None;
            };
            if now == saved {
                return Some(part.lock().expect("lock").version);
            }
            if refused.as_ref() == Some(&now) {
                return None;
            }
            match self
                .save_checkpoint(job, index, run, &dir, &ckpt, &foreign, &now)
                .await
            {
                Save::Saved(v) => {
                    keep(v, &now);
                    return Some(v);
                }
                Save::NotCurrent | Save::Refused(_) => return None,
                Save::Changed | Save::Failed(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await
                }
            }
        }
        None
    }

    #[allow(clippy::too_many_arguments)]
    async fn save_checkpoint(
        &self,
        job: JobId,
        index: u32,
        run: RunId,
        dir: &Path,
        ckpt: &Path,
        foreign: &Listing,
        listing: &Listing,
    ) -> Save {
        let tmp = dir.join(".checkpoint-upload.tar");
        let (c, l, t, f) = (
            ckpt.to_path_buf(),
            listing.clone(),
            tmp.clone(),
            foreign.clone(),
        );
        let packed = tokio::task::spawn_blocking(move || {
            let out = std::fs::File::create(&t)?;
            pack_into(&c, &l, &f, out)
        })
        .await
        .unwrap_or_else(|e| Err(PackError::Io(std::io::Error::other(e.to_string()))));
        let (sha, bytes) = match packed {
            Ok(x) => x,
            Err(PackError::Changed) => {
                let _ = std::fs::remove_file(&tmp);
                return Save::Changed;
            }
            Err(PackError::Io(e)) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(run = %run, "cannot pack the checkpoint folder: {e}");
                return Save::Failed(e.to_string());
            }
        };
        let out = self
            .put_checkpoint(job, index, run, &tmp, &sha, bytes)
            .await;
        let _ = std::fs::remove_file(&tmp);
        match &out {
            Save::Saved(v) => tracing::info!(run = %run, version = v, bytes, "checkpoint saved"),
            Save::NotCurrent => {
                tracing::info!(run = %run, "the server keeps no more checkpoints of this run")
            }
            Save::Refused(e) => tracing::warn!(run = %run, "checkpoint refused: {e}"),
            Save::Failed(e) => tracing::warn!(run = %run, "checkpoint not saved yet: {e}"),
            Save::Changed => {}
        }
        out
    }

    async fn put_checkpoint(
        &self,
        job: JobId,
        index: u32,
        run: RunId,
        tar: &Path,
        sha: &str,
        bytes: u64,
    ) -> Save {
        let file = match tokio::fs::File::open(tar).await {
            Ok(f) => f,
            Err(e) => return Save::Failed(format!("{}: {e}", tar.display())),
        };
        let (i, server) = self.server();
        let resp = match self
            .bulk
            .put(format!(
                "{}?run={}",
                self.checkpoint_url(server, job, index),
                run.0
            ))
            .bearer_auth(&self.cfg.token)
            .header("x-caravel-sha256", sha)
            .header(reqwest::header::CONTENT_LENGTH, bytes)
            .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
            .body(reqwest::Body::wrap_stream(
                tokio_util::io::ReaderStream::with_capacity(file, 1 << 20),
            ))
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.next_server(i);
                return Save::Failed(e.to_string());
            }
        };
        let status = resp.status();
        if status.is_success() {
            return match resp.json::<caravel_core::api::CheckpointView>().await {
                Ok(v) => Save::Saved(v.version),
                Err(e) => Save::Failed(e.to_string()),
            };
        }
        let text = resp.text().await.unwrap_or_default();
        match status.as_u16() {
            409 => Save::NotCurrent,
            // Bad, too large, or past the tenant's storage quota: the same content would be
            // refused again.
            400 | 413 | 422 => Save::Refused(format!("{status}: {text}")),
            503 => {
                self.next_server(i);
                Save::Failed(format!("{status}: {text}"))
            }
            _ => Save::Failed(format!("{status}: {text}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_packs_and_unpacks_to_the_same_files_without_hidden_names_or_links() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join("shard")).unwrap();
        std::fs::write(src.join("step"), b"42").unwrap();
        std::fs::write(src.join("shard/0.bin"), vec![7u8; 100_000]).unwrap();
        std::fs::write(src.join(".ckpt.tmp"), b"half written").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("link")).unwrap();
        let l = list(&src).unwrap();
        let names: Vec<_> = l.keys().map(|p| p.to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec!["shard", "shard/0.bin", "step"]);
        let out = t.path().join("a.tar");
        let (sha, n) = pack(&src, &l, &out).unwrap();
        assert_eq!(sha, sha256_file(&out).unwrap());
        assert_eq!(n, std::fs::metadata(&out).unwrap().len());
        let dst = t.path().join("dst");
        unpack(&out, &dst).unwrap();
        assert_eq!(std::fs::read(dst.join("step")).unwrap(), b"42");
        assert_eq!(
            std::fs::read(dst.join("shard/0.bin")).unwrap(),
            vec![7u8; 100_000]
        );
        assert!(!dst.join(".ckpt.tmp").exists() && !dst.join("link").exists());
    }

    fn part(t: &Path, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
        let src = t.join(format!("src-{name}"));
        for (f, data) in files {
            let p = src.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        let out = t.join(format!("{name}.tar"));
        pack(&src, &list(&src).unwrap(), &out).unwrap();
        out
    }

    #[test]
    fn a_cut_unpacks_every_ranks_part_with_the_lower_rank_winning_and_only_own_files_saved() {
        let t = tempfile::tempdir().unwrap();
        let r0 = part(
            t.path(),
            "r0",
            &[
                ("ckpt.json", b"rank 0 model"),
                ("step-80/metadata.json", b"80"),
                ("step-80/shard-0", b"s0"),
                ("same", b"from 0"),
            ],
        );
        let r1 = part(
            t.path(),
            "r1",
            &[("step-80/shard-1", b"s1"), ("same", b"from 1")],
        );
        let dir = t.path().join("ckpt");
        let foreign = unpack_cut(&[(0, r0), (1, r1)], 1, &dir).unwrap();
        assert_eq!(
            std::fs::read(dir.join("ckpt.json")).unwrap(),
            b"rank 0 model"
        );
        assert_eq!(std::fs::read(dir.join("same")).unwrap(), b"from 0");
        assert_eq!(std::fs::read(dir.join("step-80/shard-1")).unwrap(), b"s1");
        let own_files = |l: &Listing| -> Vec<String> {
            l.iter()
                .filter(|(_, v)| !v.0)
                .map(|(p, _)| p.to_string_lossy().into_owned())
                .collect()
        };
        // Rank 1's own part is what it wrote; what came from rank 0 is not saved again by
        // rank 1 (it would bring rank 0's old copy back over rank 0's newer one).
        let own_now = list_own(&dir, &foreign).unwrap();
        assert_eq!(own_files(&own_now), vec!["step-80/shard-1"]);
        // Until rank 1 writes over it: then it is rank 1's.
        std::fs::write(dir.join(".tmp"), b"rank 1 wrote this").unwrap();
        std::fs::rename(dir.join(".tmp"), dir.join("ckpt.json")).unwrap();
        let own_now = list_own(&dir, &foreign).unwrap();
        assert_eq!(own_files(&own_now), vec!["ckpt.json", "step-80/shard-1"]);
        // And a pack with the foreign files left out checks against the same listing.
        let out = t.path().join("own.tar");
        pack_into(
            &dir,
            &own_now,
            &foreign,
            std::fs::File::create(&out).unwrap(),
        )
        .unwrap();
        let back = t.path().join("back");
        let names: Vec<String> = unpack(&out, &back)
            .unwrap()
            .into_iter()
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|p| !back.join(p).is_dir())
            .collect();
        assert_eq!(names, vec!["ckpt.json", "step-80/shard-1"]);
    }

    #[test]
    fn a_folder_that_changes_during_the_read_is_not_packed() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("model"), b"step 1").unwrap();
        let l = list(&src).unwrap();
        // The task writes its next checkpoint after the listing was taken.
        std::fs::write(src.join("optimizer"), b"step 2").unwrap();
        assert!(matches!(
            pack(&src, &l, &t.path().join("a.tar")),
            Err(PackError::Changed)
        ));
        // A file replaced by rename is a new inode, even with the same size and time.
        let l = list(&src).unwrap();
        std::fs::write(src.join(".next"), b"step 3").unwrap();
        std::fs::rename(src.join(".next"), src.join("model")).unwrap();
        assert!(matches!(
            pack(&src, &l, &t.path().join("b.tar")),
            Err(PackError::Changed)
        ));
    }
}
