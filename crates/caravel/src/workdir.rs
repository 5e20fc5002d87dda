//! `caravel submit --workdir DIR`: the folder packed into a tar archive, named by its
//! SHA-256, and uploaded unless the server already holds it for this tenant; every task
//! of the job then starts in a fresh copy of it, on whatever node runs it (Ray's
//! `--working-dir`).
//!
//! What is packed: the folder's files, folders and links, leaving out what `.gitignore`,
//! `.ignore` and `.caravelignore` files name (git's rules, also outside a git checkout)
//! and the `.git` folder. The archive is deterministic (sorted names, no owners, no
//! times, modes 0755 or 0644), so an unchanged folder has the same name and is not sent
//! again.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use caravel_core::api::WorkdirView;
use sha2::Digest;

use crate::client::Client;

/// The most the CLI packs: far above any server's default, only a guard against pointing
/// `--workdir` at a home folder.
const MAX_BYTES: u64 = 8 << 30;

/// A packed folder.
pub struct Packed {
    pub file: tempfile::NamedTempFile,
    pub digest: String,
    pub bytes: u64,
    pub entries: usize,
    /// Things that are neither files, folders nor links, left out.
    pub skipped: Vec<PathBuf>,
}

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
        if self.n > MAX_BYTES {
            return Err(std::io::Error::other(format!(
                "more than {} GiB: is this the folder you meant? (.caravelignore leaves things out)",
                MAX_BYTES >> 30
            )));
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// The folder's entries to pack, relative, in byte order.
fn entries(dir: &Path) -> Result<Vec<(PathBuf, std::fs::Metadata)>> {
    let walk = ignore::WalkBuilder::new(dir)
        .hidden(false)
        .git_ignore(true)
        .git_exclude(true)
        .git_global(false)
        .ignore(true)
        .parents(false)
        .require_git(false)
        .follow_links(false)
        .add_custom_ignore_filename(".caravelignore")
        .filter_entry(|e| e.file_name() != ".git")
        .build();
    let mut out = Vec::new();
    for e in walk {
        let e = e.map_err(|e| anyhow!("{e}"))?;
        let rel = e
            .path()
            .strip_prefix(dir)
            .map_err(|_| anyhow!("{} is outside {}", e.path().display(), dir.display()))?
            .to_path_buf();
        if rel.as_os_str().is_empty() {
            continue;
        }
        let m = std::fs::symlink_metadata(e.path())
            .with_context(|| format!("{}", e.path().display()))?;
        out.push((rel, m));
    }
    out.sort_by(|a, b| a.0.as_os_str().cmp(b.0.as_os_str()));
    Ok(out)
}

/// Packs `dir` (see the module's documentation).
pub fn pack(dir: &Path) -> Result<Packed> {
    let meta = std::fs::metadata(dir).with_context(|| format!("--workdir {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("--workdir {}: not a folder", dir.display());
    }
    let file = tempfile::NamedTempFile::new().context("a temporary file for the archive")?;
    let mut b = tar::Builder::new(Hashing {
        w: std::io::BufWriter::with_capacity(1 << 20, file.reopen()?),
        h: sha2::Sha256::new(),
        n: 0,
    });
    b.follow_symlinks(false);
    let mut skipped = Vec::new();
    let mut count = 0;
    for (rel, m) in entries(dir)? {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        let ft = m.file_type();
        let full = dir.join(&rel);
        let r = if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            b.append_data(&mut h, &rel, std::io::empty())
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&full)?;
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_mode(0o777);
            h.set_size(0);
            b.append_link(&mut h, &rel, &target)
        } else if ft.is_file() {
            use std::os::unix::fs::PermissionsExt;
            let exec = m.permissions().mode() & 0o111 != 0;
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(if exec { 0o755 } else { 0o644 });
            h.set_size(m.len());
            let f = std::fs::File::open(&full).with_context(|| format!("{}", full.display()))?;
            b.append_data(&mut h, &rel, f)
        } else {
            skipped.push(rel);
            continue;
        };
        r.with_context(|| format!("packing {}", full.display()))?;
        count += 1;
    }
    let mut w = b.into_inner()?;
    w.flush()?;
    let digest = format!("sha256:{}", hex::encode(w.h.finalize()));
    Ok(Packed {
        file,
        digest,
        bytes: w.n,
        entries: count,
        skipped,
    })
}

/// Packs `dir` and uploads it unless the server has it for this tenant; returns its
/// digest for the job's `workdir`.
pub async fn ship(c: &Client, dir: &Path, tenant: Option<&str>) -> Result<String> {
    let packed = tokio::task::spawn_blocking({
        let dir = dir.to_path_buf();
        move || pack(&dir)
    })
    .await??;
    for s in &packed.skipped {
        eprintln!(
            "warning: --workdir: left out {} (not a file, folder or link)",
            s.display()
        );
    }
    let q = tenant.map(|t| format!("?tenant={t}")).unwrap_or_default();
    let path = format!("/v1/workdirs/{}{q}", packed.digest);
    let short = &packed.digest[..("sha256:".len() + 12)];
    match c.head_status(&path).await? {
        200 => eprintln!(
            "working directory {short}: {} entries, {} bytes, already on the server",
            packed.entries, packed.bytes
        ),
        404 => {
            let _: WorkdirView = c
                .put_file(&path, packed.file.path(), "application/x-tar")
                .await
                .with_context(|| {
                    format!(
                        "uploading the working directory ({} entries, {} bytes)",
                        packed.entries, packed.bytes
                    )
                })?;
            eprintln!(
                "working directory {short}: {} entries, {} bytes, uploaded",
                packed.entries, packed.bytes
            );
        }
        other => bail!("checking for the working directory: the server answered {other}"),
    }
    Ok(packed.digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(p: &Packed) -> Vec<String> {
        let mut ar = tar::Archive::new(std::fs::File::open(p.file.path()).unwrap());
        ar.entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn a_folder_packs_the_same_twice_and_leaves_out_what_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("src/pkg")).unwrap();
        std::fs::create_dir_all(p.join(".git/objects")).unwrap();
        std::fs::create_dir_all(p.join("data")).unwrap();
        std::fs::write(p.join("train.py"), "print('hi')\n").unwrap();
        std::fs::write(p.join("src/pkg/m.py"), "x = 1\n").unwrap();
        std::fs::write(p.join(".git/objects/o"), "blob").unwrap();
        std::fs::write(p.join("data/big.bin"), vec![0u8; 4096]).unwrap();
        std::fs::write(p.join("notes.log"), "log").unwrap();
        std::fs::write(p.join(".env"), "A=1").unwrap();
        std::fs::write(p.join(".gitignore"), "*.log\n").unwrap();
        std::fs::write(p.join(".caravelignore"), "data/\n").unwrap();
        std::os::unix::fs::symlink("train.py", p.join("main.py")).unwrap();
        let a = pack(p).unwrap();
        let got = names(&a);
        assert_eq!(
            got,
            [
                ".caravelignore",
                ".env",
                ".gitignore",
                "main.py",
                "src",
                "src/pkg",
                "src/pkg/m.py",
                "train.py"
            ]
        );
        // Deterministic: times do not count.
        std::fs::write(p.join("train.py"), "print('hi')\n").unwrap();
        let b = pack(p).unwrap();
        assert_eq!(a.digest, b.digest);
        std::fs::write(p.join("train.py"), "print('changed')\n").unwrap();
        assert_ne!(pack(p).unwrap().digest, a.digest);
        assert!(pack(&p.join("train.py")).is_err());
        assert!(pack(&p.join("missing")).is_err());
    }
}
