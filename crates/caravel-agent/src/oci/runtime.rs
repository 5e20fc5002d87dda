//! Running a task in an image through an OCI runtime: its root is an overlay of the
//! image's cached layers with a writable layer of its own in the run's folder (counted in
//! its disk cap), and its `config.json` gives it what a sandboxed task without an image
//! gets (`sandbox`): the tenant's uid and gid, no capability, `no_new_privs`, the same
//! seccomp rules, new mount, PID, IPC and UTS namespaces on the node's network, a `/proc`
//! with Docker's masked and read-only paths, a `/dev` with the standard devices and the
//! run's GPUs only, its own folders at `/caravel/work`, `/caravel/checkpoint` and `/tmp`,
//! the operator's `--task-mount`s, and the run's cgroup folders read-only.
//!
//! The runtime works outside the run's cgroups (parsing the config and compiling the
//! seccomp filter take tens of milliseconds of CPU, which a task limited to a tenth of a
//! CPU would wait seconds for), and crun is told to leave cgroups alone
//! (`--cgroup-manager=disabled`): the container's init says `ready`, the agent moves it
//! into the run's cgroups (the limits the agent set, devices included) and says go, and
//! only then does the init start the task. runc has no such switch; it is pointed at the
//! run's own cgroup (`cgroupsPath`), where it finds the limits in place. PID 1 of the container is the
//! agent's reaper (`reaper/reaper.rs`, bound in read-only and execute-only, so the task
//! cannot trace it): it forwards the stop signal to the task and reports its exact end.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::sandbox::{self, DevNode, RunDirs, TaskMount};

/// Inside the container: where the reaper is bound.
pub const INIT_PATH: &str = "/.caravel/init";

/// Docker's masked paths: nothing of these is readable.
const MASKED: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Docker's read-only paths.
const READ_ONLY: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Crun,
    Runc,
    Youki,
}

/// The OCI runtime of this node.
#[derive(Debug)]
pub struct OciRuntime {
    pub binary: PathBuf,
    pub kind: Kind,
    /// The runtime's state folder (`--root`), the agent's own.
    state_root: PathBuf,
    /// The reaper, as a root-owned execute-only file to bind into containers.
    init: PathBuf,
    /// Mounts the runtime's process must not see: crun refuses a cgroup v1 host that also
    /// mounts the unified hierarchy ("hybrid"), which it has no need of when it leaves
    /// cgroups alone.
    detach: Vec<CString>,
}

/// Where to look for a runtime by name.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| sandbox::DEFAULT_PATH.into());
    std::env::split_paths(&path)
        .chain([
            "/usr/bin".into(),
            "/usr/sbin".into(),
            "/usr/local/bin".into(),
        ])
        .map(|d| d.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn kind_of(p: &Path) -> Kind {
    let n = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if n.contains("runc") {
        Kind::Runc
    } else if n.contains("youki") {
        Kind::Youki
    } else {
        Kind::Crun
    }
}

impl OciRuntime {
    /// The runtime `choice` names (`auto`: crun, runc or youki, the first found; a name
    /// or a path), set up under `work_dir`. `Ok(None)`: `auto` found none.
    pub fn find(
        choice: &str,
        work_dir: &Path,
        reaper: &[u8],
    ) -> Result<Option<OciRuntime>, String> {
        let binary = match choice {
            "auto" => match ["crun", "runc", "youki"]
                .iter()
                .find_map(|n| find_on_path(n))
            {
                Some(p) => p,
                None => return Ok(None),
            },
            c if c.contains('/') => {
                let p = PathBuf::from(c);
                if !p.is_file() {
                    return Err(format!("--oci-runtime {c}: no such file"));
                }
                p
            }
            c => find_on_path(c)
                .ok_or_else(|| format!("--oci-runtime {c}: not found on the PATH"))?,
        };
        let kind = kind_of(&binary);
        let state_root = work_dir.join("oci-state");
        // Containers of an earlier life died with it (their cgroups are reaped at start).
        let _ = std::fs::remove_dir_all(&state_root);
        std::fs::create_dir_all(&state_root)
            .map_err(|e| format!("{}: {e}", state_root.display()))?;
        let bin = work_dir.join("bin");
        std::fs::create_dir_all(&bin).map_err(|e| format!("{}: {e}", bin.display()))?;
        let init = bin.join("caravel-init");
        let _ = std::fs::remove_file(&init);
        std::fs::write(&init, reaper).map_err(|e| format!("{}: {e}", init.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o111))
            .map_err(|e| format!("{}: {e}", init.display()))?;
        let mut detach = Vec::new();
        let unified = Path::new("/sys/fs/cgroup/unified");
        if kind == Kind::Crun && is_mount_point(unified) {
            detach.push(c"/sys/fs/cgroup/unified".to_owned());
        }
        Ok(Some(OciRuntime {
            binary,
            kind,
            state_root,
            init,
            detach,
        }))
    }

    /// The runtime's name and version, for the log.
    pub fn describe(&self) -> String {
        let v = std::process::Command::new(&self.binary)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_string))
            .unwrap_or_default();
        format!("{} ({v})", self.binary.display())
    }

    /// Namespaces and mounts the runtime's own process needs (see `detach`).
    pub fn detach(&self) -> &[CString] {
        &self.detach
    }

    /// The command line that runs the bundle `bundle` as container `id` (its init's pid
    /// written to `bundle/pid`).
    pub fn run_args(&self, bundle: &Path, id: &str) -> Vec<String> {
        let mut a = vec![
            "--root".to_string(),
            self.state_root.to_string_lossy().into_owned(),
        ];
        if self.kind == Kind::Crun {
            a.push("--cgroup-manager=disabled".into());
        }
        a.extend(
            [
                "run",
                "--bundle",
                &bundle.to_string_lossy(),
                "--pid-file",
                &bundle.join("pid").to_string_lossy(),
                "--preserve-fds",
                "2",
                "--no-new-keyring",
                id,
            ]
            .map(String::from),
        );
        a
    }

    /// Forgets container `id` (after a runtime that was killed could not).
    pub fn delete(&self, id: &str) {
        if self.state_root.join(id).exists() {
            let _ = std::process::Command::new(&self.binary)
                .arg("--root")
                .arg(&self.state_root)
                .args(["delete", "--force", id])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(self.state_root.join(id));
        }
    }

    pub fn init_path(&self) -> &Path {
        &self.init
    }
}

fn is_mount_point(p: &Path) -> bool {
    let s = p.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*s))
}

/// What one task in an image is run with.
pub struct TaskConfig<'a> {
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub cwd: &'a str,
    pub uid: u32,
    pub dirs: &'a RunDirs,
    pub cgroup_dirs: &'a [(String, PathBuf)],
    /// runc's `cgroupsPath` (the run's own cgroup, relative to the hierarchies' roots).
    pub cgroups_path: Option<String>,
    pub devices: &'a [DevNode],
    pub shm_bytes: u64,
    pub disk_bytes: Option<u64>,
    pub mounts: &'a [TaskMount],
    pub init: &'a Path,
    pub hostname: &'a str,
}

fn bind(src: &Path, dst: &str, rw: bool) -> serde_json::Value {
    let mut opts = vec!["rbind", "nosuid", "nodev"];
    opts.push(if rw { "rw" } else { "ro" });
    json!({"destination": dst, "type": "bind", "source": src, "options": opts})
}

/// The bundle's `config.json` (OCI runtime spec 1.0).
pub fn config(t: &TaskConfig<'_>) -> serde_json::Value {
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777",
                           format!("size={}", t.shm_bytes.max(1 << 20))]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        // The node's /sys, read-only and without what is mounted below it; its cgroup
        // tree replaced by the run's own folders.
        json!({"destination": "/sys", "type": "bind", "source": "/sys",
               "options": ["bind", "ro", "nosuid", "nodev", "noexec"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "noexec", "mode=755", "size=4k"]}),
    ];
    for (name, dir) in t.cgroup_dirs {
        let dst = if name == "." {
            "/sys/fs/cgroup".to_string()
        } else {
            format!("/sys/fs/cgroup/{name}")
        };
        mounts.push(json!({"destination": dst, "type": "bind", "source": dir,
                           "options": ["bind", "ro", "nosuid", "nodev", "noexec"]}));
    }
    mounts.push(bind(&t.dirs.work, sandbox::TASK_WORKDIR, true));
    mounts.push(bind(&t.dirs.checkpoint, sandbox::TASK_CHECKPOINT_DIR, true));
    mounts.push(bind(&t.dirs.tmp, "/tmp", true));
    // The node's name service files: the task is on the node's network.
    for f in ["/etc/resolv.conf", "/etc/hosts"] {
        if Path::new(f).is_file() {
            mounts.push(bind(Path::new(f), f, false));
        }
    }
    for m in t.mounts {
        mounts.push(bind(&m.host, &m.task.to_string_lossy(), m.rw));
    }
    mounts.push(
        json!({"destination": INIT_PATH, "type": "bind", "source": t.init,
                       "options": ["bind", "ro", "nosuid", "nodev"]}),
    );
    let devices: Vec<serde_json::Value> = t
        .devices
        .iter()
        .map(|d| {
            json!({"path": format!("/dev/{}", d.name), "type": "c", "major": d.major,
                   "minor": d.minor, "fileMode": 0o666, "uid": 0, "gid": 0})
        })
        .collect();
    let mut args = vec![INIT_PATH.to_string(), "--".to_string()];
    args.extend(t.argv.iter().cloned());
    let mut rlimits = vec![];
    if let Some(b) = t.disk_bytes {
        rlimits.push(json!({"type": "RLIMIT_FSIZE", "hard": b, "soft": b}));
    }
    let mut linux = json!({
        "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
        "devices": devices,
        "maskedPaths": MASKED,
        "readonlyPaths": READ_ONLY,
        "rootfsPropagation": "private",
    });
    let profile = sandbox::seccomp::oci_profile();
    if !profile.is_null() {
        linux["seccomp"] = profile;
    }
    if let Some(p) = &t.cgroups_path {
        linux["cgroupsPath"] = json!(p);
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": t.uid, "gid": t.uid, "additionalGids": []},
            "args": args,
            "env": t.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "cwd": t.cwd,
            "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []},
            "rlimits": rlimits,
            "noNewPrivileges": true,
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": t.hostname,
        "mounts": mounts,
        "linux": linux,
    })
}

/// A task's root: the image's layers under a writable layer of its own.
pub struct Rootfs {
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// The writable layer (the task's writes to its root, counted in its disk cap).
    pub upper: PathBuf,
    mounted: bool,
}

impl Rootfs {
    /// Mounts the overlay at `<run>/bundle/rootfs` (in the agent's own mount namespace,
    /// which vanishes with the agent: no mount outlives it).
    pub fn mount(run_dir: &Path, lower: &[PathBuf]) -> Result<Rootfs, String> {
        let bundle = run_dir.join("bundle");
        let rootfs = bundle.join("rootfs");
        let upper = run_dir.join("image-upper");
        let work = run_dir.join("image-work");
        for d in [&rootfs, &upper, &work] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        use std::os::unix::fs::PermissionsExt;
        // The image's root folder's mode is its own; the writable layer's folder starts
        // like any root.
        let _ = std::fs::set_permissions(&upper, std::fs::Permissions::from_mode(0o755));
        let empty;
        let lower: Vec<&Path> = if lower.is_empty() {
            empty = run_dir.join("image-empty");
            std::fs::create_dir_all(&empty).map_err(|e| format!("{}: {e}", empty.display()))?;
            vec![empty.as_path()]
        } else {
            lower.iter().map(|p| p.as_path()).collect()
        };
        let lowerdir = lower
            .iter()
            .map(|p| p.to_string_lossy().replace(':', "\\:").replace(',', "\\,"))
            .collect::<Vec<_>>()
            .join(":");
        let data = format!(
            "lowerdir={lowerdir},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        // A mount's options fit in one page.
        if data.len() >= 4000 {
            return Err(format!(
                "the image has too many layers ({}) for one overlay mount here",
                lower.len()
            ));
        }
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_bytes()).map_err(|_| "a NUL in a path".to_string())
        };
        let (dst, d) = (
            c(&rootfs)?,
            CString::new(data).map_err(|_| "a NUL in a path".to_string())?,
        );
        // SAFETY: mount with NUL-terminated strings.
        let r = unsafe {
            libc::mount(
                c"overlay".as_ptr(),
                dst.as_ptr(),
                c"overlay".as_ptr(),
                libc::MS_NODEV | libc::MS_NOSUID,
                d.as_ptr() as *const libc::c_void,
            )
        };
        if r != 0 {
            return Err(format!(
                "mounting the image's layers: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Rootfs {
            bundle,
            rootfs,
            upper,
            mounted: true,
        })
    }

    pub fn unmount(&mut self) {
        if self.mounted {
            if let Ok(c) = CString::new(self.rootfs.as_os_str().as_bytes()) {
                // SAFETY: umount2 with a NUL-terminated path.
                unsafe {
                    libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                }
            }
            self.mounted = false;
        }
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Finds `prog` on `path` (the task's `PATH`) inside `rootfs`, resolving links as the
/// container will (never leaving its root): the absolute path the init executes, or why
/// not. A name with a `/` is the task's to get right.
pub fn resolve_program(rootfs: &Path, prog: &str, path: &str) -> Result<String, String> {
    if prog.contains('/') {
        return Ok(prog.to_string());
    }
    let root = std::fs::File::open(rootfs).map_err(|e| format!("{}: {e}", rootfs.display()))?;
    use std::os::fd::{AsRawFd, FromRawFd};
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        let candidate = format!("{}/{prog}", dir.trim_end_matches('/'));
        let Ok(c) = CString::new(candidate.trim_start_matches('/')) else {
            continue;
        };
        #[repr(C)]
        struct OpenHow {
            flags: u64,
            mode: u64,
            resolve: u64,
        }
        const RESOLVE_IN_ROOT: u64 = 0x10;
        let how = OpenHow {
            flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
            mode: 0,
            resolve: RESOLVE_IN_ROOT,
        };
        // SAFETY: openat2 with a NUL-terminated path and an open_how of its size.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                c.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        } as i32;
        if fd < 0 {
            continue;
        }
        // SAFETY: a new descriptor we own.
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        use std::os::unix::fs::PermissionsExt;
        if f.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        {
            return Ok(candidate);
        }
    }
    Err(format!(
        "`{prog}` is not in the image (looked on its PATH, {path})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_holds_the_restricted_controls() {
        let dirs = RunDirs {
            work: "/w".into(),
            checkpoint: "/c".into(),
            tmp: "/t".into(),
        };
        let argv = vec!["/bin/sh".to_string(), "-c".into(), "true".into()];
        let env = vec![("PATH".to_string(), "/bin".to_string())];
        let gpu = [DevNode {
            name: "nvidia0".into(),
            major: 195,
            minor: 0,
        }];
        let c = config(&TaskConfig {
            argv: &argv,
            env: &env,
            cwd: "/caravel/work",
            uid: 200_001,
            dirs: &dirs,
            cgroup_dirs: &[(
                "memory".into(),
                "/sys/fs/cgroup/memory/caravel/a/run-1".into(),
            )],
            cgroups_path: None,
            devices: &gpu,
            shm_bytes: 1 << 30,
            disk_bytes: Some(1 << 20),
            mounts: &[],
            init: Path::new("/var/lib/caravel/bin/caravel-init"),
            hostname: "n1",
        });
        let p = &c["process"];
        assert_eq!(p["user"]["uid"], 200_001);
        assert_eq!(p["user"]["gid"], 200_001);
        assert_eq!(p["noNewPrivileges"], true);
        for set in [
            "bounding",
            "effective",
            "inheritable",
            "permitted",
            "ambient",
        ] {
            assert_eq!(p["capabilities"][set], json!([]), "{set}");
        }
        assert_eq!(p["args"], json!([INIT_PATH, "--", "/bin/sh", "-c", "true"]));
        assert_eq!(p["rlimits"][0]["type"], "RLIMIT_FSIZE");
        let ns: Vec<&str> = c["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            ns,
            ["pid", "ipc", "uts", "mount"],
            "the node's network, nothing else shared"
        );
        assert_eq!(c["linux"]["devices"][0]["path"], "/dev/nvidia0");
        assert!(c["linux"]["maskedPaths"]
            .as_array()
            .unwrap()
            .contains(&json!("/proc/kcore")));
        if cfg!(target_arch = "x86_64") {
            assert_eq!(c["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        }
        let dsts: Vec<&str> = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        for d in [
            "/proc",
            "/dev",
            "/caravel/work",
            "/caravel/checkpoint",
            "/tmp",
            INIT_PATH,
            "/sys/fs/cgroup/memory",
        ] {
            assert!(dsts.contains(&d), "{d} in {dsts:?}");
        }
    }

    #[test]
    fn a_program_is_found_inside_the_root_never_outside() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::create_dir_all(root.join("bin")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let tool = root.join("usr/bin/tool");
        std::fs::write(&tool, "x").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(root.join("usr/bin/plain"), "x").unwrap();
        // A link that points at the host's /bin/sh resolves inside the root: not there.
        std::os::unix::fs::symlink("/bin/sh", root.join("bin/sh")).unwrap();
        assert_eq!(
            resolve_program(&root, "tool", "/bin:/usr/bin").unwrap(),
            "/usr/bin/tool"
        );
        assert!(
            resolve_program(&root, "plain", "/usr/bin").is_err(),
            "not executable"
        );
        let e = resolve_program(&root, "sh", "/bin").unwrap_err();
        assert!(e.contains("not in the image"), "{e}");
        assert_eq!(
            resolve_program(&root, "./run.sh", "/bin").unwrap(),
            "./run.sh"
        );
    }
}
