//! Image layers as folders an overlay mount stacks: unpacking a layer archive (gzip or
//! plain tar) with its whiteouts turned into overlayfs's own (a `.wh.NAME` entry becomes a
//! `0:0` character device `NAME`, `.wh..wh..opq` the `trusted.overlay.opaque` mark on its
//! folder), and building layers (for tests and benchmarks that make their own images).
//!
//! The archive comes from a registry a tenant chose, and the agent unpacks it as root: no
//! entry may land outside the layer's folder or be written through a link (`tar`'s
//! `unpack_in` refuses both), device files other than whiteouts are left out (a task's
//! root is mounted `nodev` anyway), and set-id bits stay (the task runs with
//! `no_new_privs` and the mount is `nosuid`, so they grant nothing).

use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// The compression of a layer, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

impl Compression {
    pub fn of_media_type(m: &str) -> Result<Compression, String> {
        match m {
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
            "" => Ok(Compression::Gzip),
            other => Err(format!(
                "layers of type `{other}` are not supported (gzip and plain tar are)"
            )),
        }
    }
}

/// What unpacking a layer made.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unpacked {
    /// Bytes of file data plus a block per entry: what the layer costs the disk.
    pub bytes: u64,
    pub entries: u64,
}

fn bad(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// The entry's path inside the layer, without `./` or a leading `/`; `..` is refused.
fn clean(p: &Path) -> std::io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            _ => return Err(bad(format!("`{}` leaves the layer", p.display()))),
        }
    }
    Ok(out)
}

/// Makes `dir` and its parents below `root`, mode 0755 whatever the agent's umask (a
/// layer need not list the folders its files are in, and the image's users must get
/// through them, as Docker makes them).
fn make_parents(root: &Path, rel: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let mut at = root.to_path_buf();
    for c in rel.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(bad(format!("`{}` is not a folder", rel.display()))),
            Err(_) => {
                std::fs::create_dir(&at)?;
                std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o755))?;
            }
        }
    }
    Ok(at)
}

/// Unpacks the layer archive `src` into the empty folder `dst`.
pub fn unpack(src: &Path, compression: Compression, dst: &Path) -> std::io::Result<Unpacked> {
    let f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(src)?);
    let reader: Box<dyn Read> = match compression {
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(f)),
        Compression::None => Box::new(f),
    };
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    let mut done = Unpacked::default();
    for e in ar.entries()? {
        let mut e = e?;
        let path = clean(&e.path()?)?;
        let Some(name) = path.file_name().map(|n| n.as_bytes().to_vec()) else {
            continue; // the root itself
        };
        done.entries += 1;
        done.bytes += 4096;
        let parent = path.parent().unwrap_or(Path::new(""));
        if name == OPAQUE.as_bytes() {
            let dir = make_parents(dst, parent)?;
            set_opaque(&dir)?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT.as_bytes()) {
            let dir = make_parents(dst, parent)?;
            let target = dir.join(std::ffi::OsStr::from_bytes(hidden));
            let _ = std::fs::remove_file(&target);
            let c = std::ffi::CString::new(target.as_os_str().as_bytes())
                .map_err(|_| bad("a NUL in a path".into()))?;
            // SAFETY: mknod with a NUL-terminated path.
            if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            continue;
        }
        let kind = e.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() {
            continue;
        }
        if kind.is_file() {
            done.bytes += e.header().size().unwrap_or(0);
        }
        make_parents(dst, parent)?;
        if !e.unpack_in(dst)? {
            return Err(bad(format!("`{}` leaves the layer", path.display())));
        }
    }
    Ok(done)
}

fn set_opaque(dir: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| bad("a NUL in a path".into()))?;
    // SAFETY: lsetxattr with NUL-terminated strings and a 1-byte value.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr() as *const libc::c_void,
            1,
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// An entry of a layer being built.
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// Hides `path` of the layers below.
    Whiteout {
        path: String,
    },
    /// Hides everything the layers below have in the folder `path`.
    Opaque {
        path: String,
    },
}

/// A gzip-compressed layer (deterministic: fixed times and owners).
pub fn build(entries: &[Entry]) -> std::io::Result<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        h
    };
    for e in entries {
        match e {
            Entry::Dir { path, mode } => {
                let mut h = header(tar::EntryType::Directory, *mode, 0);
                b.append_data(&mut h, path, std::io::empty())?;
            }
            Entry::File { path, mode, data } => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::Symlink { path, target } => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, path, target)?;
            }
            Entry::Whiteout { path } => {
                let p = Path::new(path);
                let name = format!(
                    "{WHITEOUT}{}",
                    p.file_name()
                        .map(|n| n.to_string_lossy())
                        .unwrap_or_default()
                );
                let w = p.parent().unwrap_or(Path::new("")).join(name);
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                b.append_data(&mut h, w, std::io::empty())?;
            }
            Entry::Opaque { path } => {
                let w = Path::new(path).join(OPAQUE);
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                b.append_data(&mut h, w, std::io::empty())?;
            }
        }
    }
    b.into_inner()?.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn a_built_layer_unpacks_with_overlay_whiteouts() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: whiteouts need root (mknod, trusted xattrs)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let data = build(&[
            Entry::Dir {
                path: "bin".into(),
                mode: 0o755,
            },
            Entry::File {
                path: "bin/hello".into(),
                mode: 0o755,
                data: b"#!/bin/sh\n".to_vec(),
            },
            Entry::Symlink {
                path: "bin/hi".into(),
                target: "hello".into(),
            },
            Entry::Whiteout {
                path: "etc/old.conf".into(),
            },
            Entry::Opaque {
                path: "var/cache".into(),
            },
        ])
        .unwrap();
        let src = t.path().join("layer.tgz");
        std::fs::write(&src, data).unwrap();
        let dst = t.path().join("fs");
        std::fs::create_dir(&dst).unwrap();
        let u = unpack(&src, Compression::Gzip, &dst).unwrap();
        assert_eq!(u.entries, 5);
        assert_eq!(
            std::fs::read(dst.join("bin/hello")).unwrap(),
            b"#!/bin/sh\n"
        );
        assert_eq!(
            std::fs::read_link(dst.join("bin/hi")).unwrap(),
            Path::new("hello")
        );
        let w = std::fs::symlink_metadata(dst.join("etc/old.conf")).unwrap();
        assert!(
            w.file_type().is_char_device(),
            "a whiteout is a 0:0 character device"
        );
        assert!(!dst.join("etc/.wh.old.conf").exists());
        let mut v = [0u8; 4];
        let c = std::ffi::CString::new(dst.join("var/cache").as_os_str().as_bytes()).unwrap();
        // SAFETY: lgetxattr into a buffer of its size.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                v.as_mut_ptr() as *mut libc::c_void,
                4,
            )
        };
        assert_eq!(n, 1);
        assert_eq!(v[0], b'y');
    }

    #[test]
    fn an_entry_leaving_the_layer_is_refused() {
        let t = tempfile::tempdir().unwrap();
        // tar's builder refuses `..` itself, so the header is written by hand.
        let mut raw = Vec::new();
        {
            let mut b = tar::Builder::new(&mut raw);
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(1);
            h.set_mode(0o644);
            let name = b"../escape";
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            b.append(&h, &b"x"[..]).unwrap();
            b.finish().unwrap();
        }
        let src = t.path().join("layer.tar");
        std::fs::write(&src, raw).unwrap();
        let dst = t.path().join("fs");
        std::fs::create_dir(&dst).unwrap();
        let e = unpack(&src, Compression::None, &dst).unwrap_err();
        assert!(e.to_string().contains("leaves the layer"), "{e}");
        assert!(!t.path().join("escape").exists());
    }

    #[test]
    fn media_types_are_read_and_zstd_is_refused_clearly() {
        assert_eq!(
            Compression::of_media_type("application/vnd.oci.image.layer.v1.tar+gzip"),
            Ok(Compression::Gzip)
        );
        assert_eq!(
            Compression::of_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Ok(Compression::Gzip)
        );
        assert_eq!(
            Compression::of_media_type("application/vnd.oci.image.layer.v1.tar"),
            Ok(Compression::None)
        );
        let e =
            Compression::of_media_type("application/vnd.oci.image.layer.v1.tar+zstd").unwrap_err();
        assert!(e.contains("zstd") && e.contains("not supported"), "{e}");
    }
}
