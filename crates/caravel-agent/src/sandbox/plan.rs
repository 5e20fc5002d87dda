//! A sandbox as lists of system calls (`spawn::Op`), decided here, in the agent.
//!
//! Two lists. The **template** is what every task's root has in common (the node's system
//! folders read-only, `/sys`, the operator's mounts, the folders the task's own mounts go
//! on): built once when the agent starts, on a tmpfs in the agent's own mount namespace,
//! and then read-only. The **task** list runs in each task's first process, in the new
//! mount namespace it was cloned into, which already holds a copy of the template: it
//! adds the task's `/proc`, `/dev`, folders and cgroups onto the template's mount points
//! and moves in with `pivot_root`. A task start thus makes some twenty mounts instead of
//! rebuilding everything (each mount costs some 8 µs, each folder made a few).
//!
//! Everything that depends on the host (is a source a file or a folder, which `/proc`
//! entries exist) is looked at here, so the child only executes.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::{DevNode, MountSpec};
use crate::spawn::Op;

/// What of `/proc` a task must not read or write, as Docker masks it: kernel memory and
/// keys, timers and the scheduler's debug view (both list every process on the machine).
const PROC_MASKED: [&str; 8] = [
    "kcore",
    "keys",
    "timer_list",
    "sched_debug",
    "latency_stats",
    "timer_stats",
    "acpi",
    "scsi",
];
const PROC_READ_ONLY: [&str; 0] = [];

/// The standard character devices: (name, major, minor).
const STANDARD: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// The steps and, for each, what it does in words (for the error when one fails).
#[derive(Default)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub what: Vec<String>,
    /// Building the template, in the agent's own process: its umask (0077) is not
    /// touched (other threads create files meanwhile), so what is made gets its mode set.
    template: bool,
    /// Folders known to exist (the template's): no step makes them again.
    known: std::collections::HashSet<PathBuf>,
}

fn c(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| format!("{} contains a NUL byte", p.display()))
}

fn cs(s: &str) -> CString {
    CString::new(s).expect("a constant without NUL")
}

/// What a task's sandbox is made of besides its mounts.
pub struct Shape<'a> {
    /// The template's root.
    pub staging: &'a Path,
    /// The task's own mounts, onto the template.
    pub mounts: &'a [MountSpec],
    pub devices: &'a [DevNode],
    pub shm_bytes: u64,
    pub cwd: &'a str,
    pub file_size_limit: Option<u64>,
    /// Folders the template holds (inside paths).
    pub known: &'a std::collections::HashSet<PathBuf>,
}

impl Plan {
    fn push(&mut self, what: impl Into<String>, op: Op) {
        self.what.push(what.into());
        self.ops.push(op);
    }

    fn mount(
        &mut self,
        what: String,
        src: Option<&Path>,
        dst: &Path,
        fstype: Option<&str>,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) -> Result<(), String> {
        let op = Op::Mount {
            src: src.map(c).transpose()?,
            dst: c(dst)?,
            fstype: fstype.map(cs),
            flags,
            data: data.map(|d| CString::new(d).expect("no NUL in mount data")),
        };
        self.push(what, op);
        Ok(())
    }

    /// Read-only and `nosuid` (plus `extra`), keeping the mount where it is.
    fn read_only(&mut self, dst: &Path, shown: &Path, extra: libc::c_ulong) -> Result<(), String> {
        self.mount(
            format!("making {} read-only", shown.display()),
            None,
            dst,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | extra,
            None,
        )
    }

    /// `inside` (a path in the sandbox) under the staging root, with every folder above it
    /// made (those that exist are fine).
    fn parents(&mut self, root: &Path, inside: &Path) -> Result<PathBuf, String> {
        if !inside.is_absolute() {
            return Err(format!("{} is not a plain absolute path", inside.display()));
        }
        let mut at = root.to_path_buf();
        let comps: Vec<Component> = inside.components().collect();
        for (i, comp) in comps.iter().enumerate() {
            match comp {
                Component::RootDir => {}
                Component::Normal(n) => {
                    at.push(n);
                    if i + 1 < comps.len() {
                        let shown = Path::new("/").join(at.strip_prefix(root).unwrap_or(&at));
                        self.make_dir(&at, &shown)?;
                    }
                }
                _ => return Err(format!("{} is not a plain absolute path", inside.display())),
            }
        }
        Ok(at)
    }

    /// A folder (unless known to exist), with its mode set when building the template.
    fn make_dir(&mut self, at: &Path, shown: &Path) -> Result<(), String> {
        if self.known.contains(shown) {
            return Ok(());
        }
        self.push(
            format!("making {}", shown.display()),
            Op::Mkdir { path: c(at)? },
        );
        if self.template {
            self.push(
                format!("setting the mode of {}", shown.display()),
                Op::Chmod {
                    path: c(at)?,
                    mode: 0o755,
                },
            );
        }
        self.known.insert(shown.to_path_buf());
        Ok(())
    }

    fn mkdir(&mut self, root: &Path, inside: &Path) -> Result<PathBuf, String> {
        let at = self.parents(root, inside)?;
        self.make_dir(&at, inside)?;
        Ok(at)
    }

    fn bind(&mut self, root: &Path, src: &Path, dst: &Path, rw: bool) -> Result<(), String> {
        let meta = std::fs::metadata(src).map_err(|e| format!("{}: {e}", src.display()))?;
        let at = self.parents(root, dst)?;
        if meta.is_dir() {
            self.make_dir(&at, dst)?;
        } else {
            self.push(
                format!("making {}", dst.display()),
                Op::Touch { path: c(&at)? },
            );
            if self.template {
                self.push(
                    format!("setting the mode of {}", dst.display()),
                    Op::Chmod {
                        path: c(&at)?,
                        mode: 0o644,
                    },
                );
            }
        }
        // Not recursive: what is mounted below a system folder stays out unless named.
        self.mount(
            format!("binding {} on {}", src.display(), dst.display()),
            Some(src),
            &at,
            None,
            libc::MS_BIND,
            None,
        )?;
        let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
        if !rw {
            flags |= libc::MS_RDONLY;
        }
        self.mount(
            format!("setting the flags of {}", dst.display()),
            None,
            &at,
            None,
            flags,
            None,
        )
    }

    fn proc(&mut self, root: &Path) -> Result<(), String> {
        let p = self.mkdir(root, Path::new("/proc"))?;
        self.mount(
            "mounting /proc".into(),
            Some(Path::new("proc")),
            &p,
            Some("proc"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        )?;
        for name in PROC_MASKED {
            let host = Path::new("/proc").join(name);
            let t = p.join(name);
            let shown = Path::new("/proc").join(name);
            match std::fs::symlink_metadata(&host) {
                Ok(m) if m.is_dir() => self.mount(
                    format!("masking {}", shown.display()),
                    Some(Path::new("tmpfs")),
                    &t,
                    Some("tmpfs"),
                    libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    Some("size=0"),
                )?,
                Ok(_) => {
                    self.mount(
                        format!("masking {}", shown.display()),
                        Some(Path::new("/dev/null")),
                        &t,
                        None,
                        libc::MS_BIND,
                        None,
                    )?;
                    // Reads as empty, as Docker's masked files do.
                    self.read_only(&t, &shown, 0)?;
                }
                Err(_) => {}
            }
        }
        for name in PROC_READ_ONLY {
            if Path::new("/proc").join(name).exists() {
                let t = p.join(name);
                let shown = Path::new("/proc").join(name);
                self.mount(
                    format!("binding {}", shown.display()),
                    Some(&t),
                    &t,
                    None,
                    libc::MS_BIND | libc::MS_REC,
                    None,
                )?;
                self.read_only(&t, &shown, libc::MS_NODEV)?;
            }
        }
        Ok(())
    }

    /// `/dev`: a small tmpfs with the usual character devices, private pseudo-terminals,
    /// shared memory and message queues, and the devices this run was given, nothing else.
    fn dev(&mut self, root: &Path, devices: &[DevNode], shm_bytes: u64) -> Result<(), String> {
        let d = self.mkdir(root, Path::new("/dev"))?;
        self.mount(
            "mounting /dev".into(),
            Some(Path::new("tmpfs")),
            &d,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("mode=755,size=64k,nr_inodes=1024"),
        )?;
        let nodes = STANDARD
            .iter()
            .map(|(n, ma, mi)| DevNode {
                name: n.to_string(),
                major: *ma,
                minor: *mi,
            })
            .chain(devices.iter().cloned());
        for n in nodes {
            let inside = Path::new("/dev").join(&n.name);
            let at = self.parents(root, &inside)?;
            self.push(
                format!("making device {}", inside.display()),
                Op::Mknod {
                    path: c(&at)?,
                    dev: libc::makedev(n.major, n.minor),
                },
            );
        }
        let pts = self.mkdir(root, Path::new("/dev/pts"))?;
        self.mount(
            "mounting /dev/pts".into(),
            Some(Path::new("devpts")),
            &pts,
            Some("devpts"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        )?;
        let shm = self.mkdir(root, Path::new("/dev/shm"))?;
        self.mount(
            "mounting /dev/shm".into(),
            Some(Path::new("shm")),
            &shm,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some(&format!("mode=1777,size={}", shm_bytes.max(4096))),
        )?;
        let mq = self.mkdir(root, Path::new("/dev/mqueue"))?;
        self.mount(
            "mounting /dev/mqueue".into(),
            Some(Path::new("mqueue")),
            &mq,
            Some("mqueue"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        )?;
        for (link, target) in [
            ("ptmx", "pts/ptmx"),
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            self.push(
                format!("linking /dev/{link}"),
                Op::Symlink {
                    target: cs(target),
                    link: c(&d.join(link))?,
                },
            );
        }
        // Devices stay usable: no `nodev` here.
        self.read_only(&d, Path::new("/dev"), libc::MS_NOEXEC)
    }

    fn apply(
        &mut self,
        root: &Path,
        mounts: &[MountSpec],
        devices: &[DevNode],
        shm_bytes: u64,
    ) -> Result<(), String> {
        for m in mounts {
            match m {
                MountSpec::Bind { src, dst, rw } => self.bind(root, src, dst, *rw)?,
                MountSpec::Symlink { link, target } => {
                    let at = self.parents(root, link)?;
                    self.push(
                        format!("linking {}", link.display()),
                        Op::Symlink {
                            target: c(target)?,
                            link: c(&at)?,
                        },
                    );
                }
                MountSpec::Tmpfs { dst, bytes, rw } => {
                    let at = self.mkdir(root, dst)?;
                    let mut flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                    if !rw {
                        flags |= libc::MS_RDONLY;
                    }
                    self.mount(
                        format!("mounting a tmpfs on {}", dst.display()),
                        Some(Path::new("tmpfs")),
                        &at,
                        Some("tmpfs"),
                        flags,
                        Some(&format!("mode=755,size={}", (*bytes).max(4096))),
                    )?;
                }
                MountSpec::ReadOnly { dst } => {
                    let at = self.parents(root, dst)?;
                    self.read_only(&at, dst, libc::MS_NODEV)?;
                }
                MountSpec::Dir { dst } => {
                    self.mkdir(root, dst)?;
                }
                MountSpec::Proc => self.proc(root)?,
                MountSpec::Dev => self.dev(root, devices, shm_bytes)?,
            }
        }
        Ok(())
    }

    /// The template: a tmpfs on `root` with `mounts`, made read-only. Run in the agent.
    pub fn template(root: &Path, mounts: &[MountSpec]) -> Result<Plan, String> {
        let mut p = Plan {
            template: true,
            ..Default::default()
        };
        p.mount(
            format!("mounting the template's root on {}", root.display()),
            Some(Path::new("tmpfs")),
            root,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=755,size=1024k,nr_inodes=4096"),
        )?;
        // Host mounts and unmounts do not reach into it.
        p.mount(
            "making the template private".into(),
            None,
            root,
            None,
            libc::MS_PRIVATE,
            None,
        )?;
        p.apply(root, mounts, &[], 0)?;
        p.read_only(root, Path::new("the template's root"), libc::MS_NODEV)?;
        Ok(p)
    }

    /// The folders a template built from `mounts` holds, as the task sees them.
    pub fn template_dirs(
        mounts: &[MountSpec],
    ) -> Result<std::collections::HashSet<PathBuf>, String> {
        Ok(Plan::template(Path::new("/template"), mounts)?.known)
    }

    /// One task's steps, run by its first process in its new mount namespace.
    pub fn task(s: &Shape<'_>) -> Result<Plan, String> {
        let root = s.staging;
        let mut p = Plan {
            known: s.known.clone(),
            ..Default::default()
        };
        // Exact modes for what the sandbox makes; the task gets 022 back at the end.
        p.push("setting the umask", Op::Umask { mask: 0 });
        // Nothing done here may reach the agent's namespace, nor anything the agent
        // mounts later reach here.
        p.mount(
            "making / private".into(),
            None,
            Path::new("/"),
            None,
            libc::MS_REC | libc::MS_PRIVATE,
            None,
        )?;
        p.apply(root, s.mounts, s.devices, s.shm_bytes)?;
        p.push("moving into the new root", Op::Pivot { root: c(root)? });
        p.push(
            "setting the core size limit",
            Op::Rlimit {
                resource: libc::RLIMIT_CORE as libc::c_int,
                value: 0,
            },
        );
        if let Some(f) = s.file_size_limit {
            p.push(
                "setting the file size limit",
                Op::Rlimit {
                    resource: libc::RLIMIT_FSIZE as libc::c_int,
                    value: f,
                },
            );
        }
        p.push(
            format!("entering {}", s.cwd),
            Op::Chdir {
                path: c(Path::new(s.cwd))?,
            },
        );
        p.push("setting the umask", Op::Umask { mask: 0o022 });
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(p: &Plan) -> String {
        p.what.join("\n")
    }

    #[test]
    fn a_template_is_built_once_and_a_task_mounts_only_its_own_onto_it() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("usr");
        std::fs::create_dir(&src).unwrap();
        let file = d.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let template = vec![
            MountSpec::Bind {
                src: src.clone(),
                dst: "/usr".into(),
                rw: false,
            },
            MountSpec::Bind {
                src: file.clone(),
                dst: "/etc/f".into(),
                rw: false,
            },
            MountSpec::Dir {
                dst: "/caravel/work".into(),
            },
            MountSpec::Dir {
                dst: "/proc".into(),
            },
            MountSpec::Dir { dst: "/dev".into() },
        ];
        let t = Plan::template(Path::new("/stage"), &template).unwrap();
        let tt = text(&t);
        assert!(tt.contains("making /caravel/work"), "{tt}");
        assert!(tt.contains("setting the mode of /caravel"), "{tt}");
        // A file is mounted on a file, a folder on a folder.
        assert!(t
            .ops
            .iter()
            .any(|o| matches!(o, Op::Touch { path } if path.to_str().unwrap() == "/stage/etc/f")));
        let known = Plan::template_dirs(&template).unwrap();
        assert!(known.contains(Path::new("/caravel/work")));

        let work = d.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let task = vec![
            MountSpec::Proc,
            MountSpec::Dev,
            MountSpec::Bind {
                src: work.clone(),
                dst: "/caravel/work".into(),
                rw: true,
            },
        ];
        let dev = [DevNode {
            name: "nvidia0".into(),
            major: 195,
            minor: 0,
        }];
        let p = Plan::task(&Shape {
            staging: Path::new("/stage"),
            mounts: &task,
            devices: &dev,
            shm_bytes: 1 << 20,
            cwd: "/caravel/work",
            file_size_limit: Some(1 << 30),
            known: &known,
        })
        .unwrap();
        assert_eq!(p.ops.len(), p.what.len());
        let pt = text(&p);
        let at = |s: &str| pt.find(s).unwrap_or_else(|| panic!("no `{s}` in\n{pt}"));
        assert!(!pt.contains("making /caravel"), "the template has it: {pt}");
        assert!(!pt.contains("setting the mode"), "{pt}");
        assert!(at("making / private") < at("mounting /proc"));
        assert!(at("making device /dev/nvidia0") < at("making /dev read-only"));
        assert!(at("mounting /proc") < at("moving into the new root"));
        assert!(at("moving into the new root") < at("entering /caravel/work"));
        assert!(pt.contains("setting the file size limit"));
        // Writable where asked.
        let flags: Vec<libc::c_ulong> = p
            .ops
            .iter()
            .filter_map(|o| match o {
                Op::Mount { dst, flags, .. }
                    if dst.to_str().unwrap() == "/stage/caravel/work"
                        && flags & libc::MS_REMOUNT != 0 =>
                {
                    Some(*flags)
                }
                _ => None,
            })
            .collect();
        assert_eq!(flags.len(), 1);
        assert_eq!(flags[0] & libc::MS_RDONLY, 0);
        assert_ne!(flags[0] & libc::MS_NOSUID, 0);
    }

    #[test]
    fn a_missing_source_or_a_bad_path_is_an_error_before_anything_runs() {
        let e = Plan::template(
            Path::new("/stage"),
            &[MountSpec::Bind {
                src: "/no/such/source".into(),
                dst: "/x".into(),
                rw: false,
            }],
        )
        .err()
        .unwrap();
        assert!(e.contains("/no/such/source"), "{e}");
        let e = Plan::template(
            Path::new("/stage"),
            &[MountSpec::Tmpfs {
                dst: "relative".into(),
                bytes: 1,
                rw: true,
            }],
        )
        .err()
        .unwrap();
        assert!(e.contains("plain absolute"), "{e}");
    }
}
