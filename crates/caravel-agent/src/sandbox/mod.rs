//! Tasks kept apart from each other and from the node: an identity per tenant, a sandbox
//! per task, and the isolation level the node reports.
//!
//! What a sandboxed task gets (see `docs/security.md` for the threat model):
//! - **its tenant's uid and gid** (`--task-uids`, never 0, one per tenant, the same on
//!   every node), no supplementary groups, no capability in any set, `no_new_privs`, the
//!   default seccomp filter (`seccomp`);
//! - **its own mount, PID, IPC and UTS namespaces**: the root is a fresh tmpfs with the
//!   node's system directories read-only (`/usr`, `/etc`, the `/bin` and `/lib` links),
//!   a `/proc` that shows only its own processes, a `/dev` with the standard devices and
//!   the GPUs of its run only, its working directory at `/caravel/work`, its checkpoint
//!   folder at `/caravel/checkpoint` and a private `/tmp`, each its own and mode 0700.
//!   Nothing else of the machine is there: not the agent's or server's folders, not
//!   another run's, not other tenants' processes;
//! - **limits**: the run's cgroups (CPU, memory, process count, devices) and a cap on the
//!   disk it writes (`disk`);
//! - the node's **network**, as gangs need for `torch.distributed`.
//!
//! Where the agent is not root, or the kernel lacks something, the node says what it can
//! give (`IsolationLevel`) and what is missing, and jobs that ask for more wait.

pub mod devices;
pub mod disk;
pub mod plan;
pub mod seccomp;

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use caravel_core::{IsolationLevel, TenantId};
use serde::{Deserialize, Serialize};

/// The reaper: PID 1 of every sandboxed task once the task runs (`reaper/reaper.rs`,
/// built by `build.rs`).
static REAPER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/caravel-reaper"));

/// The reaper's executable (empty where this build has none).
pub fn reaper_bytes() -> &'static [u8] {
    REAPER
}

/// The search path a sandboxed task starts with.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Inside the sandbox: the task's working directory and checkpoint folder.
pub const TASK_WORKDIR: &str = "/caravel/work";
pub const TASK_CHECKPOINT_DIR: &str = "/caravel/checkpoint";

/// The uids tasks run as, one per tenant: `base + tenant id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    pub const DEFAULT: UidRange = UidRange {
        first: 200_000,
        last: 299_999,
    };

    /// Parses `FIRST-LAST`.
    pub fn parse(s: &str) -> Result<UidRange, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("`{s}` is not FIRST-LAST (e.g. 200000-299999)"))?;
        let num = |x: &str| {
            x.trim()
                .parse::<u32>()
                .map_err(|_| format!("`{x}` is not a uid"))
        };
        let r = UidRange {
            first: num(a)?,
            last: num(b)?,
        };
        if r.first == 0 {
            return Err("the range must not include uid 0 (root)".into());
        }
        if r.last < r.first {
            return Err(format!("{} is below {}", r.last, r.first));
        }
        // 65534 is `nobody` everywhere, and uids past 2^31 trip up too many tools.
        if r.first <= 65534 && r.last >= 65534 {
            return Err("the range must not include 65534 (nobody)".into());
        }
        if r.last >= 1 << 31 {
            return Err("uids must stay below 2147483648".into());
        }
        Ok(r)
    }

    /// The uid (and gid) of a tenant's tasks. Tenant ids start at 1 and are never reused,
    /// so the first uid of the range goes unused and no two tenants share one.
    pub fn of(&self, tenant: TenantId) -> Result<u32, String> {
        let span = (self.last - self.first) as u64;
        if tenant.0 == 0 {
            return Err("the server did not say which tenant the task belongs to (a server older than this agent?)".into());
        }
        if tenant.0 > span {
            return Err(format!(
                "tenant {} has no uid in --task-uids {}-{} (room for {} tenants)",
                tenant.0, self.first, self.last, span
            ));
        }
        Ok(self.first + tenant.0 as u32)
    }

    /// Host accounts whose uid or gid falls in the range (from `passwd` and `group`
    /// files): a task would share its identity with them.
    pub fn clashes(&self, passwd: &str, group: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (kind, text) in [("user", passwd), ("group", group)] {
            for line in text.lines() {
                let f: Vec<&str> = line.split(':').collect();
                if let (Some(name), Some(id)) = (f.first(), f.get(2).and_then(|i| i.parse().ok())) {
                    if (self.first..=self.last).contains(&id) {
                        out.push(format!("{kind} {name} ({id})"));
                    }
                }
            }
        }
        out
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// A host path an operator gives every task (`--task-mount HOST[:TASK][:ro|rw]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMount {
    pub host: PathBuf,
    pub task: PathBuf,
    pub rw: bool,
}

impl TaskMount {
    pub fn parse(s: &str) -> Result<TaskMount, String> {
        let mut parts: Vec<&str> = s.split(':').collect();
        let rw = match parts.last() {
            Some(&"rw") => {
                parts.pop();
                true
            }
            Some(&"ro") => {
                parts.pop();
                false
            }
            _ => false,
        };
        let (host, task) = match parts.as_slice() {
            [h] => (h.to_string(), h.to_string()),
            [h, t] => (h.to_string(), t.to_string()),
            _ => return Err(format!("`{s}` is not HOST[:TASK][:ro|rw]")),
        };
        for (what, p) in [("host", &host), ("task", &task)] {
            if !p.starts_with('/') {
                return Err(format!("the {what} path `{p}` must be absolute"));
            }
            if p.split('/').any(|c| c == "..") {
                return Err(format!("the {what} path `{p}` must not contain `..`"));
            }
        }
        // The sandbox's own places; below `/tmp` (the task's own temp space) is allowed,
        // the mount then sits inside it.
        let exact = ["/", "/tmp"];
        let below = ["/proc", "/dev", "/sys", "/caravel"];
        let task_trim = task.trim_end_matches('/');
        if exact.contains(&task.as_str())
            || exact.contains(&task_trim)
            || below
                .iter()
                .any(|r| task_trim == *r || task.starts_with(&format!("{r}/")))
        {
            return Err(format!("`{task}` is where the sandbox puts its own files"));
        }
        Ok(TaskMount {
            host: host.into(),
            task: task.into(),
            rw,
        })
    }
}

/// One step of building a task's root, in order, paths inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MountSpec {
    Bind {
        src: PathBuf,
        dst: PathBuf,
        rw: bool,
    },
    Symlink {
        link: PathBuf,
        target: PathBuf,
    },
    Tmpfs {
        dst: PathBuf,
        bytes: u64,
        rw: bool,
    },
    ReadOnly {
        dst: PathBuf,
    },
    /// A folder for a later mount to go on.
    Dir {
        dst: PathBuf,
    },
    Proc,
    Dev,
}

/// A character device the task may use, made at `/dev/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevNode {
    pub name: String,
    pub major: u32,
    pub minor: u32,
}

/// The node's system directories, as a task sees them: each top-level entry that is a
/// link (`/bin -> usr/bin` on merged-/usr systems) is the same link, each directory a
/// read-only bind. Files `/etc` commonly mounts on its own (in containers) are bound again
/// so the task sees the node's, not what lies beneath.
pub fn system_layout(host_root: &Path) -> Vec<MountSpec> {
    let mut out = Vec::new();
    for name in [
        "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "opt",
    ] {
        let p = host_root.join(name);
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let inside = Path::new("/").join(name);
        if m.file_type().is_symlink() {
            if let Ok(t) = std::fs::read_link(&p) {
                out.push(MountSpec::Symlink {
                    link: inside,
                    target: t,
                });
            }
        } else if m.is_dir() {
            out.push(MountSpec::Bind {
                src: p,
                dst: inside,
                rw: false,
            });
        }
    }
    // Only those that are mount points (each bind is three steps of every task's start).
    let mounted = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for f in ["etc/resolv.conf", "etc/hosts", "etc/hostname"] {
        let p = host_root.join(f);
        let is_mount = mounted.lines().any(|l| l.split(' ').nth(4) == p.to_str());
        if is_mount && std::fs::metadata(&p).is_ok_and(|m| m.is_file()) {
            out.push(MountSpec::Bind {
                src: p,
                dst: Path::new("/").join(f),
                rw: false,
            });
        }
    }
    out
}

/// Folders of one run on the host, which the sandbox shows at fixed places.
pub struct RunDirs {
    pub work: PathBuf,
    pub checkpoint: PathBuf,
    pub tmp: PathBuf,
}

/// What every task's root shares, built once (`plan::Plan::template`): the system
/// folders, `/sys` read-only with an empty cgroup tree (folders for the run's own cgroups
/// to go on, by controller name) and no firmware tables, the operator's mounts (those not
/// below `/tmp`, which is each task's own), and the folders each task's mounts go on.
pub fn template_layout(
    system: &[MountSpec],
    cgroup_names: &[String],
    extra: &[TaskMount],
) -> Vec<MountSpec> {
    let mut m: Vec<MountSpec> = system.to_vec();
    m.push(MountSpec::Bind {
        src: "/sys".into(),
        dst: "/sys".into(),
        rw: false,
    });
    // The cgroup tree would show every other run's usage and names: hide it; each task
    // then shows its own folders on these.
    m.push(MountSpec::Tmpfs {
        dst: "/sys/fs/cgroup".into(),
        bytes: 4096,
        rw: true,
    });
    for name in cgroup_names.iter().filter(|n| *n != ".") {
        m.push(MountSpec::Dir {
            dst: Path::new("/sys/fs/cgroup").join(name),
        });
    }
    m.push(MountSpec::ReadOnly {
        dst: "/sys/fs/cgroup".into(),
    });
    if Path::new("/sys/firmware").is_dir() {
        m.push(MountSpec::Tmpfs {
            dst: "/sys/firmware".into(),
            bytes: 4096,
            rw: false,
        });
    }
    for d in ["/proc", "/dev", "/tmp", TASK_WORKDIR, TASK_CHECKPOINT_DIR] {
        m.push(MountSpec::Dir { dst: d.into() });
    }
    for e in extra.iter().filter(|e| !e.task.starts_with("/tmp")) {
        m.push(MountSpec::Bind {
            src: e.host.clone(),
            dst: e.task.clone(),
            rw: e.rw,
        });
    }
    m
}

/// What one task mounts onto the template: its `/proc` and `/dev`, its own folders, its
/// cgroup folders (read-only, so a runtime can read its limits), and the operator's
/// mounts below `/tmp`.
pub fn task_layout(
    dirs: &RunDirs,
    cgroup_dirs: &[(String, PathBuf)],
    extra: &[TaskMount],
) -> Vec<MountSpec> {
    let mut m = vec![
        MountSpec::Proc,
        MountSpec::Dev,
        MountSpec::Bind {
            src: dirs.work.clone(),
            dst: TASK_WORKDIR.into(),
            rw: true,
        },
        MountSpec::Bind {
            src: dirs.checkpoint.clone(),
            dst: TASK_CHECKPOINT_DIR.into(),
            rw: true,
        },
        MountSpec::Bind {
            src: dirs.tmp.clone(),
            dst: "/tmp".into(),
            rw: true,
        },
    ];
    for (name, dir) in cgroup_dirs {
        let dst = if name == "." {
            PathBuf::from("/sys/fs/cgroup")
        } else {
            Path::new("/sys/fs/cgroup").join(name)
        };
        m.push(MountSpec::Bind {
            src: dir.clone(),
            dst,
            rw: false,
        });
    }
    for e in extra.iter().filter(|e| e.task.starts_with("/tmp")) {
        m.push(MountSpec::Bind {
            src: e.host.clone(),
            dst: e.task.clone(),
            rw: e.rw,
        });
    }
    m
}

/// Moves this whole process into a mount namespace of its own, whose mounts the host's
/// changes reach but whose own never reach the host: the agent's sandbox template lives
/// there and vanishes with the process, however it ends. Must be called before the process
/// has threads (a namespace change applies to the calling thread only). Returns why not,
/// where it cannot (not root): the agent then cannot sandbox anyway.
pub fn private_mount_namespace() -> Result<(), String> {
    // SAFETY: unshare and mount with constant arguments.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(format!(
                "a mount namespace of its own: {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ) != 0
        {
            return Err(format!(
                "making its mounts its own: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Detaches whatever is mounted on `p` (a template an earlier life of the agent left, in
/// a namespace it shared with the host).
fn unmount_all(p: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: umount2 with a NUL-terminated path; stops at the first failure (nothing
    // mounted there any more).
    unsafe { while libc::umount2(c.as_ptr(), libc::MNT_DETACH) == 0 {} }
}

/// The environment a sandboxed task starts from, before the job's own and Caravel's:
/// nothing of the agent's (which may hold its token).
pub fn base_env() -> Vec<(OsString, OsString)> {
    vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), "/tmp".into()),
        ("TMPDIR".into(), "/tmp".into()),
        ("LANG".into(), "C.UTF-8".into()),
    ]
}

/// The environment an unsandboxed task starts from: the agent's search path, home and
/// locale, so its programs are found as the agent's user would find them, and nothing
/// else (not `CARAVEL_TOKEN`, not whatever else the agent was started with).
pub fn unsandboxed_env() -> Vec<(OsString, OsString)> {
    const KEPT: [&str; 8] = [
        "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR",
    ];
    std::env::vars_os()
        .filter(|(k, _)| KEPT.iter().any(|n| k == n))
        .collect()
}

/// A sealed memfd holding `data`, executable (the reaper runs from it, so no file on disk
/// is needed, and nothing can change it).
fn exec_memfd(data: &[u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: memfd_create with a NUL-terminated name; we own the returned descriptor.
    let fd = unsafe {
        libc::memfd_create(
            c"caravel-reaper".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nothing else.
    let f = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(f);
    std::io::Write::write_all(&mut file, data)?;
    // Executable, not readable: the kernel makes a process that execs a file it may not
    // read undumpable, so the task (which runs as the same uid) cannot ptrace its
    // sandbox's reaper, not even in the moment between the reaper's exec and its first
    // instruction. (A reaper it could stop would never report the task's end.)
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o111))?;
    // SAFETY: fcntl on our descriptor.
    unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
        );
    }
    high(file.into())
}

/// The same descriptor at a number of at least 10 (close-on-exec), so that moving it to
/// `CONFIG_FD` or `STATUS_FD` in the child can never overwrite another one being moved.
pub fn high(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    if fd.as_raw_fd() >= 10 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// A pipe for the reaper's status lines: (read end, non-blocking, for the agent; write end).
pub fn status_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array with two new descriptors we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on our descriptor.
    unsafe {
        let fl = libc::fcntl(r.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(r.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    Ok((r, high(w)?))
}

/// Opens `rel` below the folder `dir` for reading, following no link on the way and
/// never leaving `dir`: the agent reads a running task's files as root, and the task may
/// swap any of them for a link at any moment (to `/etc/shadow`, to another tenant's file)
/// hoping the agent follows it. `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`
/// (Linux 5.6) refuses the whole lookup then; older kernels get `O_NOFOLLOW`, which
/// covers the last component.
pub fn open_beneath(dir: &std::fs::File, rel: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
    const RESOLVE_NO_SYMLINKS: u64 = 0x04;
    const RESOLVE_BENEATH: u64 = 0x08;
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64,
        mode: 0,
        resolve: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 with a NUL-terminated path and a `struct open_how` of its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    } as RawFd;
    let fd = if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        // SAFETY: openat with a NUL-terminated path.
        unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            )
        }
    } else {
        fd
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Makes `dir` (its parent must exist) and hands it to `uid`:`gid` with mode 0700. An
/// existing folder (a reused, emptied one) is handed over as well, with what is in it.
pub fn own_dir(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => std::os::unix::fs::lchown(dir, Some(uid), Some(gid)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            chown_tree(dir, uid, gid)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        }
        Err(e) => Err(e),
    }
}

/// Hands a tree to `uid`:`gid` without following links.
pub fn chown_tree(p: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(p)?.is_dir() {
        for e in std::fs::read_dir(p)? {
            chown_tree(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// What this node's agent can do for isolation, found at start.
#[derive(Debug, Clone)]
pub struct Capability {
    pub level: IsolationLevel,
    /// What keeps the level from `restricted`, in words, for the log and `caravel nodes`.
    pub missing: Vec<String>,
}

/// Whether the running process can sandbox at all: root, with namespaces to make.
pub fn can_sandbox() -> Result<(), String> {
    // SAFETY: plain system call.
    if unsafe { libc::geteuid() } != 0 {
        return Err("the agent is not root: tasks cannot get a uid of their own, namespaces or device limits (start the agent as root for sandboxed tasks)".into());
    }
    for ns in ["mnt", "pid", "ipc", "uts"] {
        if !Path::new(&format!("/proc/self/ns/{ns}")).exists() {
            return Err(format!("the kernel has no {ns} namespaces"));
        }
    }
    Ok(())
}

/// A node's means to sandbox tasks, set up once at agent start.
pub struct Runtime {
    pub uids: UidRange,
    /// The reaper, in a sealed memfd.
    reaper: OwnedFd,
    /// The template every task's root is built on (read-only, mounted in the agent's
    /// mount namespace, copied into each task's).
    staging: PathBuf,
    /// The folders the template holds.
    template_dirs: std::collections::HashSet<PathBuf>,
    mounts: Vec<TaskMount>,
    pub gpus: devices::GpuDevices,
    /// The seccomp program (empty where this build has none for the architecture).
    pub filter: Vec<libc::sock_filter>,
    pub last_cap: u32,
}

// SAFETY: `sock_filter` is plain data; the program is read-only after start.
unsafe impl Send for Runtime {}
// SAFETY: as above.
unsafe impl Sync for Runtime {}

/// What one sandboxed start needs besides the process spec.
pub struct Prepared {
    pub plan: plan::Plan,
    pub join: Vec<std::ffi::CString>,
    pub env: Vec<(String, String)>,
    pub status_read: OwnedFd,
    pub status_write: OwnedFd,
}

/// What a sandboxed task is started with.
pub struct TaskSpec<'a> {
    pub dirs: &'a RunDirs,
    pub cgroup_dirs: Vec<(String, PathBuf)>,
    pub devices: Vec<DevNode>,
    pub shm_bytes: u64,
    pub env: Vec<(String, String)>,
    pub disk_bytes: Option<u64>,
    pub cgroup_procs: Vec<PathBuf>,
}

impl Runtime {
    /// Checks that this process can sandbox and prepares what every start shares.
    pub fn new(
        work_dir: &Path,
        uids: UidRange,
        mounts: Vec<TaskMount>,
        gpus: devices::GpuDevices,
        cgroup_names: &[String],
    ) -> Result<Runtime, String> {
        can_sandbox()?;
        if REAPER.is_empty() {
            return Err("this build has no sandbox reaper for this architecture".into());
        }
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
        let clash = uids.clashes(&passwd, &group);
        if !clash.is_empty() {
            return Err(format!(
                "--task-uids {uids} holds accounts of this machine ({}): tasks would share their identity; pick a free range",
                clash.join(", ")
            ));
        }
        for m in &mounts {
            if !m.host.exists() {
                return Err(format!("--task-mount: {} does not exist", m.host.display()));
            }
        }
        let staging = work_dir.join("sandbox-root");
        unmount_all(&staging);
        std::fs::create_dir_all(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
        if !std::fs::read_dir(&staging).is_ok_and(|mut d| d.next().is_none()) {
            return Err(format!("{} must be an empty folder", staging.display()));
        }
        let layout = template_layout(&system_layout(Path::new("/")), cgroup_names, &mounts);
        let template = plan::Plan::template(&staging, &layout)?;
        for (op, what) in template.ops.iter().zip(&template.what) {
            // SAFETY: prepared strings; the steps mount only on the template's folder.
            if !unsafe { crate::spawn::run_op(op) } {
                let e = std::io::Error::last_os_error();
                unmount_all(&staging);
                return Err(format!("building the sandbox template: {what}: {e}"));
            }
        }
        let template_dirs = plan::Plan::template_dirs(&layout)?;
        let reaper = exec_memfd(REAPER).map_err(|e| format!("loading the reaper: {e}"))?;
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40);
        Ok(Runtime {
            uids,
            reaper,
            staging,
            template_dirs,
            mounts,
            gpus,
            filter: seccomp::program(),
            last_cap,
        })
    }

    pub fn reaper_fd(&self) -> RawFd {
        self.reaper.as_raw_fd()
    }

    pub fn seccomp(&self) -> bool {
        !self.filter.is_empty()
    }

    /// One task's sandbox: its steps, the cgroups it joins, its environment and its
    /// status pipe.
    pub fn prepare(&self, t: TaskSpec<'_>) -> Result<Prepared, String> {
        let mut env = t.env;
        // The task reads its own folders at fixed places, wherever the node keeps them.
        env.retain(|(k, _)| k != "CARAVEL_CHECKPOINT_DIR");
        env.push(("CARAVEL_CHECKPOINT_DIR".into(), TASK_CHECKPOINT_DIR.into()));
        let mounts = task_layout(t.dirs, &t.cgroup_dirs, &self.mounts);
        let plan = plan::Plan::task(&plan::Shape {
            staging: &self.staging,
            mounts: &mounts,
            devices: &t.devices,
            shm_bytes: t.shm_bytes,
            cwd: TASK_WORKDIR,
            file_size_limit: t.disk_bytes,
            known: &self.template_dirs,
        })?;
        use std::os::unix::ffi::OsStrExt;
        let join = t
            .cgroup_procs
            .iter()
            .map(|p| std::ffi::CString::new(p.as_os_str().as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|_| "a cgroup path contains a NUL byte".to_string())?;
        let (status_read, status_write) = status_pipe().map_err(|e| format!("a pipe: {e}"))?;
        Ok(Prepared {
            plan,
            join,
            env,
            status_read,
            status_write,
        })
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        unmount_all(&self.staging);
    }
}

/// A line of the reaper's, read by the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The task's process ended with this wait status.
    Exited(i32),
    /// A container's init waits for the agent's go.
    Ready,
}

impl Status {
    pub fn parse(line: &str) -> Option<Status> {
        let line = line.trim_end();
        if line == "ready" {
            return Some(Status::Ready);
        }
        line.strip_prefix("exit ")
            .and_then(|s| s.parse().ok())
            .map(Status::Exited)
    }
}

/// Reads the reaper's status lines as they come.
pub struct StatusReader {
    rx: tokio::net::unix::pipe::Receiver,
    buf: Vec<u8>,
}

impl StatusReader {
    pub fn new(fd: OwnedFd) -> std::io::Result<StatusReader> {
        Ok(StatusReader {
            rx: tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?,
            buf: Vec::new(),
        })
    }

    /// The next line; `None` once the reaper has closed its end.
    pub async fn next(&mut self) -> Option<Status> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                if let Some(s) = Status::parse(&String::from_utf8_lossy(&line)) {
                    return Some(s);
                }
                continue;
            }
            let mut chunk = [0u8; 512];
            match self.rx.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse() {
        assert_eq!(Status::parse("exit 256\n"), Some(Status::Exited(256)));
        assert_eq!(Status::parse("exit x"), None);
        assert_eq!(Status::parse("hello"), None);
    }

    #[test]
    fn uid_ranges_are_checked_and_map_one_uid_per_tenant() {
        let r = UidRange::parse("200000-299999").unwrap();
        assert_eq!(r, UidRange::DEFAULT);
        assert_eq!(r.of(TenantId(1)), Ok(200_001));
        assert_eq!(r.of(TenantId(99_999)), Ok(299_999));
        assert!(r.of(TenantId(100_000)).unwrap_err().contains("no uid"));
        assert!(r.of(TenantId(0)).unwrap_err().contains("which tenant"));
        for (bad, why) in [
            ("0-10", "uid 0"),
            ("10", "FIRST-LAST"),
            ("20-10", "below"),
            ("60000-70000", "nobody"),
            ("x-10", "not a uid"),
            ("3000000000-3000000010", "2147483648"),
        ] {
            let e = UidRange::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn host_accounts_inside_the_range_are_found() {
        let r = UidRange::parse("1000-1999").unwrap();
        let c = r.clashes(
            "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
            "root:x:0:\nstaff:x:1500:\n",
        );
        assert_eq!(c, ["user alice (1000)", "group staff (1500)"]);
    }

    #[test]
    fn task_mounts_parse_and_refuse_the_sandboxes_own_places() {
        assert_eq!(
            TaskMount::parse("/data").unwrap(),
            TaskMount {
                host: "/data".into(),
                task: "/data".into(),
                rw: false
            }
        );
        assert!(TaskMount::parse("/tmp/t/shared:rw").is_ok());
        let m = TaskMount::parse("/srv/ds:/datasets:rw").unwrap();
        assert_eq!((m.task.to_str().unwrap(), m.rw), ("/datasets", true));
        for (bad, why) in [
            ("data", "absolute"),
            ("/a/../b", ".."),
            ("/x:/proc/x", "its own files"),
            ("/x:/tmp", "its own files"),
            ("/x:/tmp/", "its own files"),
            ("/x:/dev/x", "its own files"),
            ("/x:/caravel/work", "its own files"),
            ("/a:/b:/c:/d", "HOST[:TASK]"),
        ] {
            let e = TaskMount::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_system_layout_copies_links_and_binds_folders() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("usr/bin")).unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::write(d.path().join("etc/resolv.conf"), "nameserver 10.0.0.1\n").unwrap();
        std::os::unix::fs::symlink("usr/bin", d.path().join("bin")).unwrap();
        std::fs::create_dir_all(d.path().join("home/secret")).unwrap();
        let l = system_layout(d.path());
        assert!(l.contains(&MountSpec::Symlink {
            link: "/bin".into(),
            target: "usr/bin".into()
        }));
        assert!(l.contains(&MountSpec::Bind {
            src: d.path().join("usr"),
            dst: "/usr".into(),
            rw: false
        }));
        // Not a mount point here: it comes with /etc, and is not bound again.
        assert!(!l.iter().any(
            |m| matches!(m, MountSpec::Bind { dst, .. } if dst == Path::new("/etc/resolv.conf"))
        ));
        assert!(
            !l.iter().any(|m| format!("{m:?}").contains("home")),
            "only system directories: {l:?}"
        );
    }

    #[test]
    fn the_unsandboxed_environment_keeps_no_token() {
        // SAFETY: tests in this module do not read the environment concurrently.
        unsafe { std::env::set_var("CARAVEL_TOKEN", "cvt_secret") };
        let env = unsandboxed_env();
        assert!(env.iter().all(|(k, _)| k != "CARAVEL_TOKEN"));
        assert!(env.iter().any(|(k, _)| k == "PATH"));
    }

    #[test]
    fn a_link_below_a_folder_is_never_followed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/f"), "mine").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", d.path().join("link")).unwrap();
        std::os::unix::fs::symlink("sub", d.path().join("dirlink")).unwrap();
        let dir = std::fs::File::open(d.path()).unwrap();
        let mut s = String::new();
        use std::io::Read;
        open_beneath(&dir, Path::new("sub/f"))
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "mine");
        for bad in ["link", "dirlink/f", "../x", "/etc/hostname", "sub/../../x"] {
            assert!(open_beneath(&dir, Path::new(bad)).is_err(), "{bad}");
        }
    }
}
