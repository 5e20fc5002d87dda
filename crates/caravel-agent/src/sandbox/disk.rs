//! The ephemeral disk a run uses: what its folders hold on the node (working directory,
//! temp space, checkpoint folder, output, an image's changed files), counted the way
//! Kubernetes' kubelet counts a pod's ephemeral storage, by walking it.
//!
//! The cap is enforced in two ways: the kernel refuses to grow any one file past it
//! (`RLIMIT_FSIZE`, set by the sandbox's init), and the agent walks the run's folders
//! every few seconds and stops a run that holds more. Between two walks a run can go over
//! by what it writes in that time, which the node's free space must absorb.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What a walk found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Allocated bytes (blocks), so sparse files count what they hold, not their length.
    pub bytes: u64,
    pub inodes: u64,
    /// Folders nested deeper than the walk goes (`MAX_DEPTH`): their contents are not
    /// counted, so a run that makes them is stopped as if over its cap.
    pub too_deep: bool,
}

/// How deep a walk goes. Every level holds a descriptor while below it; nothing real
/// nests this deep, and a run that does is hiding something.
pub const MAX_DEPTH: usize = 256;

/// Walks `roots` without following any link (each folder is opened relative to its parent
/// with `O_NOFOLLOW`: a run that swaps a folder for a link to `/` mid-walk cannot send the
/// agent through the machine), counting each inode once (hard links to one file are one
/// file). What vanishes during the walk is skipped.
pub fn usage(roots: &[&Path]) -> Usage {
    let mut u = Usage::default();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    for root in roots {
        let Ok(m) = std::fs::symlink_metadata(root) else {
            continue;
        };
        count(
            &mut u,
            &mut seen,
            m.dev(),
            m.ino(),
            m.nlink(),
            m.blocks(),
            m.is_dir(),
        );
        if m.is_dir() {
            use std::os::unix::ffi::OsStrExt;
            let Ok(c) = std::ffi::CString::new(root.as_os_str().as_bytes()) else {
                continue;
            };
            // SAFETY: open with a NUL-terminated path; we own the result.
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            };
            if fd >= 0 {
                walk(fd, 1, &mut u, &mut seen);
            }
        }
    }
    u
}

fn count(
    u: &mut Usage,
    seen: &mut HashSet<(u64, u64)>,
    dev: u64,
    ino: u64,
    nlink: u64,
    blocks: u64,
    dir: bool,
) {
    if nlink > 1 && !dir && !seen.insert((dev, ino)) {
        return;
    }
    u.bytes += blocks * 512;
    u.inodes += 1;
}

/// Counts what is below the open folder `fd` (which it closes).
fn walk(fd: libc::c_int, depth: usize, u: &mut Usage, seen: &mut HashSet<(u64, u64)>) {
    // SAFETY: fdopendir takes ownership of `fd` (closedir closes it); every entry is
    // read while the stream is open, and names are NUL-terminated by the kernel.
    unsafe {
        let dir = libc::fdopendir(fd);
        if dir.is_null() {
            libc::close(fd);
            return;
        }
        loop {
            let e = libc::readdir64(dir);
            if e.is_null() {
                break;
            }
            let name = (*e).d_name.as_ptr();
            let bytes = std::ffi::CStr::from_ptr(name).to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            let mut st: libc::stat64 = std::mem::zeroed();
            if libc::fstatat64(fd, name, &mut st, libc::AT_SYMLINK_NOFOLLOW) != 0 {
                continue;
            }
            let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            count(
                u,
                seen,
                st.st_dev,
                st.st_ino,
                st.st_nlink,
                st.st_blocks as u64,
                is_dir,
            );
            if is_dir {
                if depth >= MAX_DEPTH {
                    u.too_deep = true;
                    continue;
                }
                let child = libc::openat(
                    fd,
                    name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                );
                if child >= 0 {
                    walk(child, depth + 1, u, seen);
                }
            }
        }
        libc::closedir(dir);
    }
}

/// `1.5 GiB`, for messages.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_counts_blocks_once_per_inode_and_skips_links() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        std::fs::create_dir(&a).unwrap();
        std::fs::write(a.join("f"), vec![7u8; 1 << 20]).unwrap();
        std::fs::hard_link(a.join("f"), a.join("g")).unwrap();
        std::os::unix::fs::symlink("/usr", a.join("link")).unwrap();
        // Sparse: 1 GiB long, nothing written.
        let sparse = std::fs::File::create(a.join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        let u = usage(&[d.path()]);
        assert!(u.bytes >= 1 << 20 && u.bytes < 2 << 20, "{u:?}");
        assert_eq!(u.inodes, 5, "root, a, f (once), link, sparse: {u:?}");
        assert_eq!(usage(&[&d.path().join("gone")]), Usage::default());
        assert!(!u.too_deep);
    }

    #[test]
    fn a_tree_deeper_than_the_walk_goes_is_flagged() {
        let d = tempfile::tempdir().unwrap();
        // Made relative to each parent: the whole path may pass PATH_MAX.
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let mut fd: OwnedFd = std::fs::File::open(d.path()).unwrap().into();
        for _ in 0..(MAX_DEPTH + 2) {
            // SAFETY: mkdirat/openat with NUL-terminated names; we own the result.
            unsafe {
                assert_eq!(libc::mkdirat(fd.as_raw_fd(), c"d".as_ptr(), 0o755), 0);
                let n = libc::openat(
                    fd.as_raw_fd(),
                    c"d".as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY,
                );
                assert!(n >= 0);
                fd = OwnedFd::from_raw_fd(n);
            }
        }
        assert!(usage(&[d.path()]).too_deep);
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }
}
