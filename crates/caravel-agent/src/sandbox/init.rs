//! The first process of a sandboxed task: PID 1 of the task's PID namespace, started by
//! the agent inside new mount, PID, IPC and UTS namespaces and the run's cgroups (the
//! agent's `clone` made those), as root, running this same binary (`caravel
//! __sandbox-init`).
//!
//! It builds the task's filesystem on a fresh tmpfs (the node's system directories
//! read-only, the task's own folders, a private `/proc`, `/dev` with only the devices the
//! run may use, a private `/tmp`), moves into it with `pivot_root` so nothing else of the
//! machine is reachable, drops every privilege (uid and gid of the tenant, no supplementary
//! groups, every capability out of every set and the bounding set, `no_new_privs`), installs
//! the seccomp filter, and starts the task. It then stays as the namespace's reaper and
//! reports to the agent over the status descriptor:
//!
//! - `ok`: the task's program was executed;
//! - `error <what failed>`: setting up or starting failed (nothing of the task ran);
//! - `exit <wait status>`: the task's process ended so (init then exits, and with it the
//!   namespace: the kernel kills whatever the task left).
//!
//! Only the agent can write those lines: the status descriptor is close-on-exec, and init,
//! once it has changed its uid, may not be inspected by the task (it is not dumpable).
//!
//! Signals: the agent signals the whole process group. A PID namespace's init ignores
//! every signal it has no handler for, except SIGKILL from outside, so SIGTERM reaches the
//! task and not init, and SIGKILL after the grace ends everything at once.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{InitConfig, MountSpec, CONFIG_FD, STATUS_FD};

/// A failed step, for the `error` line.
struct Failed(String);

fn os(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Failed {
    move |e| Failed(format!("{what}: {e}"))
}

fn last(what: impl std::fmt::Display) -> Failed {
    os(what)(std::io::Error::last_os_error())
}

fn cstr(p: &Path) -> Result<CString, Failed> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Failed(format!("{} contains a NUL byte", p.display())))
}

fn mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), Failed> {
    let src_c = src.map(cstr).transpose()?;
    let dst_c = cstr(dst)?;
    let fs_c = fstype.map(|f| CString::new(f).expect("no NUL"));
    let data_c = data.map(|d| CString::new(d).expect("no NUL"));
    // SAFETY: every pointer is a NUL-terminated string alive for the call, or null.
    let r = unsafe {
        libc::mount(
            src_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            dst_c.as_ptr(),
            fs_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            flags,
            data_c
                .as_ref()
                .map_or(std::ptr::null(), |c| c.as_ptr() as *const libc::c_void),
        )
    };
    if r != 0 {
        return Err(last(format!(
            "mounting {}{} on {}",
            fstype.unwrap_or(""),
            src.map(|s| format!(" {}", s.display())).unwrap_or_default(),
            dst.display()
        )));
    }
    Ok(())
}

/// Makes `dst` (a directory, or an empty file when `file`) and the folders above it.
fn mountpoint(dst: &Path, file: bool) -> Result<(), Failed> {
    if file {
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(os(format!("making {}", parent.display())))?;
        }
        if !dst.exists() {
            std::fs::File::create(dst).map_err(os(format!("making {}", dst.display())))?;
        }
        Ok(())
    } else {
        std::fs::create_dir_all(dst).map_err(os(format!("making {}", dst.display())))
    }
}

/// Binds `src` on `dst` (not its submounts: what is below a system directory stays out
/// unless named), then applies the flags, read-only unless `rw`.
fn bind(src: &Path, dst: &Path, rw: bool) -> Result<(), Failed> {
    let meta = std::fs::metadata(src).map_err(os(format!("{}", src.display())))?;
    mountpoint(dst, !meta.is_dir())?;
    mount(Some(src), dst, None, libc::MS_BIND, None)?;
    let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
    if !rw {
        flags |= libc::MS_RDONLY;
    }
    mount(None, dst, None, flags, None)
}

fn read_only(dst: &Path) -> Result<(), Failed> {
    read_only_with(dst, libc::MS_NODEV)
}

/// Remounts `dst` read-only and `nosuid`, plus `extra` flags (`/dev` must keep its
/// devices usable).
fn read_only_with(dst: &Path, extra: libc::c_ulong) -> Result<(), Failed> {
    mount(
        None,
        dst,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | extra,
        None,
    )
}

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
const PROC_READ_ONLY: [&str; 5] = ["sys", "sysrq-trigger", "irq", "bus", "fs"];

fn proc(root: &Path) -> Result<(), Failed> {
    let p = root.join("proc");
    mountpoint(&p, false)?;
    mount(
        Some(Path::new("proc")),
        &p,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    for name in PROC_MASKED {
        let t = p.join(name);
        match std::fs::symlink_metadata(&t) {
            Ok(m) if m.is_dir() => mount(
                Some(Path::new("tmpfs")),
                &t,
                Some("tmpfs"),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some("size=0"),
            )?,
            Ok(_) => {
                mount(Some(Path::new("/dev/null")), &t, None, libc::MS_BIND, None)?;
                // Reads as empty, as Docker's masked files do.
                read_only_with(&t, 0)?;
            }
            Err(_) => {}
        }
    }
    for name in PROC_READ_ONLY {
        let t = p.join(name);
        if t.exists() {
            mount(Some(&t), &t, None, libc::MS_BIND | libc::MS_REC, None)?;
            read_only(&t)?;
        }
    }
    Ok(())
}

fn mknod(path: &Path, major: u32, minor: u32, mode: u32) -> Result<(), Failed> {
    let c = cstr(path)?;
    // SAFETY: a plain system call on a NUL-terminated path.
    let r = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | mode,
            libc::makedev(major, minor),
        )
    };
    if r != 0 {
        return Err(last(format!("making device {}", path.display())));
    }
    // The umask cut the mode; devices are meant to be used by whoever the task is.
    // SAFETY: as above.
    unsafe { libc::chmod(c.as_ptr(), mode) };
    Ok(())
}

/// `/dev`: a small tmpfs with the usual character devices, private pseudo-terminals,
/// shared memory and message queues, and the devices this run was given, nothing else.
fn dev(root: &Path, cfg: &InitConfig) -> Result<(), Failed> {
    let d = root.join("dev");
    mountpoint(&d, false)?;
    mount(
        Some(Path::new("tmpfs")),
        &d,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=755,size=65536k,nr_inodes=1024"),
    )?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        mknod(&d.join(name), major, minor, 0o666)?;
    }
    for dev in &cfg.devices {
        let p = d.join(&dev.name);
        if let Some(parent) = p.parent() {
            mountpoint(parent, false)?;
        }
        mknod(&p, dev.major, dev.minor, 0o666)?;
    }
    let pts = d.join("pts");
    mountpoint(&pts, false)?;
    mount(
        Some(Path::new("devpts")),
        &pts,
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    let shm = d.join("shm");
    mountpoint(&shm, false)?;
    mount(
        Some(Path::new("shm")),
        &shm,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(&format!("mode=1777,size={}", cfg.shm_bytes.max(4096))),
    )?;
    let mq = d.join("mqueue");
    mountpoint(&mq, false)?;
    mount(
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
        std::os::unix::fs::symlink(target, d.join(link))
            .map_err(os(format!("linking /dev/{link}")))?;
    }
    read_only_with(&d, libc::MS_NOEXEC)
}

/// Builds the new root on `cfg.staging` (still reached through the old root).
fn build_root(cfg: &InitConfig) -> Result<(), Failed> {
    let root = &cfg.staging;
    // Nothing done here may reach the agent's namespace, and nothing the agent mounts
    // later needs to reach here.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=755,size=1024k,nr_inodes=4096"),
    )?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    for m in &cfg.mounts {
        match m {
            MountSpec::Bind { src, dst, rw } => bind(src, &inside(dst), *rw)?,
            MountSpec::Symlink { link, target } => {
                let l = inside(link);
                if let Some(parent) = l.parent() {
                    mountpoint(parent, false)?;
                }
                std::os::unix::fs::symlink(target, &l)
                    .map_err(os(format!("linking {}", link.display())))?;
            }
            MountSpec::Tmpfs { dst, bytes, rw } => {
                let d = inside(dst);
                mountpoint(&d, false)?;
                let mut flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                if !rw {
                    flags |= libc::MS_RDONLY;
                }
                mount(
                    Some(Path::new("tmpfs")),
                    &d,
                    Some("tmpfs"),
                    flags,
                    Some(&format!("mode=755,size={}", bytes.max(&4096))),
                )?;
            }
            MountSpec::Proc => proc(root)?,
            MountSpec::Dev => dev(root, cfg)?,
            MountSpec::ReadOnly { dst } => read_only(&inside(dst))?,
        }
    }
    Ok(())
}

fn pivot(root: &Path) -> Result<(), Failed> {
    std::env::set_current_dir(root).map_err(os(format!("entering {}", root.display())))?;
    let dot = c".";
    // SAFETY: pivot_root and umount2 with NUL-terminated paths. pivot_root(".", ".")
    // stacks the old root on top of the new one; detaching it leaves only the new.
    unsafe {
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0 {
            return Err(last("pivot_root"));
        }
        if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(last("detaching the old root"));
        }
    }
    std::env::set_current_dir("/").map_err(os("entering /"))?;
    read_only(Path::new("/"))
}

fn set_rlimit(resource: libc::__rlimit_resource_t, v: u64, what: &str) -> Result<(), Failed> {
    let l = libc::rlimit {
        rlim_cur: v,
        rlim_max: v,
    };
    // SAFETY: plain system call with a valid pointer.
    if unsafe { libc::setrlimit(resource, &l) } != 0 {
        return Err(last(format!("setting {what}")));
    }
    Ok(())
}

/// Every capability out of every set, the tenant's ids, `no_new_privs`.
fn drop_privileges(uid: u32, gid: u32, last_cap: u32) -> Result<(), Failed> {
    // SAFETY: prctl/setgroups/setresgid/setresuid/capset with valid arguments; this
    // process is single-threaded, so the ids change for all of it.
    unsafe {
        for cap in 0..=last_cap {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(last(format!(
                    "dropping capability {cap} from the bounding set"
                )));
            }
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return Err(last("clearing ambient capabilities"));
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(last("clearing supplementary groups"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(last(format!("changing to gid {gid}")));
        }
        // From uid 0 to another, with SECBIT_KEEP_CAPS unset: the permitted and effective
        // sets empty themselves; the inheritable set is emptied below.
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(last(format!("changing to uid {uid}")));
        }
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let mut h = Header {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let d = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) != 0 {
            return Err(last("clearing capabilities"));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(last("setting no_new_privs"));
        }
        if libc::getuid() == 0 || libc::geteuid() == 0 {
            return Err(Failed("still root after changing uid".into()));
        }
    }
    Ok(())
}

/// Where `execvp` would look for `program` on `path`.
fn candidates(program: &str, path: &str) -> Vec<CString> {
    if program.contains('/') {
        return CString::new(program).into_iter().collect();
    }
    path.split(':')
        .filter_map(|d| {
            let d = if d.is_empty() { "." } else { d };
            CString::new(format!("{d}/{program}")).ok()
        })
        .collect()
}

struct Exec {
    candidates: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

impl Exec {
    fn new(cfg: &InitConfig) -> Result<Exec, Failed> {
        let nul = |what: &str| Failed(format!("{what} contains a NUL byte"));
        let path = cfg
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or(super::DEFAULT_PATH);
        let mut argv = vec![CString::new(cfg.program.as_str()).map_err(|_| nul("the command"))?];
        for a in &cfg.args {
            argv.push(CString::new(a.as_str()).map_err(|_| nul("an argument"))?);
        }
        let envp = cfg
            .env
            .iter()
            .map(|(k, v)| CString::new(format!("{k}={v}")).map_err(|_| nul("the environment")))
            .collect::<Result<_, _>>()?;
        Ok(Exec {
            candidates: candidates(&cfg.program, path),
            argv,
            envp,
        })
    }

    /// In the forked child: exec, or the errno of the failure.
    fn run(&self) -> i32 {
        let argv: Vec<*const libc::c_char> = self
            .argv
            .iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp: Vec<*const libc::c_char> = self
            .envp
            .iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let mut eacces = false;
        for c in &self.candidates {
            // SAFETY: NUL-terminated strings and null-terminated arrays of them.
            unsafe { libc::execve(c.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            match e {
                libc::EACCES => eacces = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => return e,
            }
        }
        if eacces {
            libc::EACCES
        } else {
            libc::ENOENT
        }
    }
}

/// Sets up the sandbox and starts the task; returns the task's pid.
fn start(cfg: &InitConfig, status: &mut std::fs::File) -> Result<libc::pid_t, Failed> {
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    // Opened now, written once the sandbox is built (the paths are the host's).
    let procs: Vec<std::fs::File> = cfg
        .cgroup_procs
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .map_err(os(format!("opening {}", p.display())))
        })
        .collect::<Result<_, _>>()?;
    // The agent's umask (0077) would make the folders above each mount point private to
    // root; the task must be able to walk to its own.
    // SAFETY: plain system call.
    unsafe { libc::umask(0o022) };
    build_root(cfg)?;
    pivot(&cfg.staging)?;
    set_rlimit(libc::RLIMIT_CORE, 0, "the core size limit")?;
    if let Some(f) = cfg.file_size_limit {
        set_rlimit(libc::RLIMIT_FSIZE, f, "the file size limit")?;
    }
    for mut f in procs {
        f.write_all(b"0").map_err(os("joining the run's cgroup"))?;
    }
    drop_privileges(cfg.uid, cfg.gid, last_cap)?;
    // Changing uid cleared the parent-death signal the agent asked for: ask again, so
    // that the sandbox (and with its init, every process in it) dies with the agent and no
    // copy of the task outlives what would report it.
    // SAFETY: prctl with constant arguments.
    if unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(last("setting the parent-death signal"));
    }
    std::env::set_current_dir(&cfg.cwd).map_err(os(format!("entering {}", cfg.cwd)))?;
    if cfg.seccomp {
        super::seccomp::install(&super::seccomp::program())
            .map_err(os("installing the seccomp filter"))?;
    }
    let exec = Exec::new(cfg)?;
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(last("making a pipe"));
    }
    // SAFETY: this process has one thread, so the child may do anything before exec.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last("fork"));
    }
    if pid == 0 {
        // SAFETY: in the child: restore the dispositions Rust's runtime changed, exec,
        // or report why not through the pipe.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::close(fds[0]);
            let e = exec.run();
            libc::write(fds[1], &e as *const i32 as *const libc::c_void, 4);
            libc::_exit(127);
        }
    }
    // SAFETY: our copy of the write end.
    unsafe { libc::close(fds[1]) };
    // SAFETY: the read end is ours alone.
    let mut r = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    let mut buf = [0u8; 4];
    let n = r.read(&mut buf).unwrap_or(0);
    if n == 4 {
        let e = std::io::Error::from_raw_os_error(i32::from_ne_bytes(buf));
        let mut st = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        return Err(Failed(format!("cannot start `{}`: {e}", cfg.program)));
    }
    let _ = status.write_all(b"ok\n");
    Ok(pid)
}

fn read_config() -> Result<InitConfig, Failed> {
    // SAFETY: the agent put the configuration at this number; nothing else owns it.
    let mut f = unsafe { std::fs::File::from_raw_fd(CONFIG_FD) };
    let mut s = Vec::new();
    f.read_to_end(&mut s)
        .map_err(os("reading the sandbox configuration"))?;
    serde_json::from_slice(&s).map_err(|e| Failed(format!("the sandbox configuration: {e}")))
}

/// `caravel __sandbox-init`: never returns.
pub fn main() -> ! {
    // The task must not inherit either descriptor: a status line it could write would be
    // believed.
    // SAFETY: fcntl on two descriptor numbers, whatever they hold.
    unsafe {
        libc::fcntl(STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(CONFIG_FD, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    // SAFETY: the agent put the status pipe at this number.
    let mut status = unsafe { std::fs::File::from_raw_fd(STATUS_FD) };
    let started = read_config().and_then(|cfg| start(&cfg, &mut status));
    let child = match started {
        Ok(pid) => pid,
        Err(Failed(msg)) => {
            let _ = writeln!(status, "error {msg}");
            let _ = writeln!(std::io::stderr(), "caravel: {msg}");
            std::process::exit(127);
        }
    };
    loop {
        let mut st = 0;
        // SAFETY: reaping children of this process (the task and whatever it orphaned).
        let pid = unsafe { libc::waitpid(-1, &mut st, 0) };
        if pid == child {
            let _ = writeln!(status, "exit {st}");
            let code = if libc::WIFEXITED(st) {
                libc::WEXITSTATUS(st)
            } else {
                128 + libc::WTERMSIG(st)
            };
            std::process::exit(code);
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            let _ = writeln!(status, "error lost the task's process");
            std::process::exit(127);
        }
    }
}

/// Reads a status line from the agent's side of the pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Started,
    Failed(String),
    Exited(i32),
}

impl Status {
    pub fn parse(line: &str) -> Option<Status> {
        let line = line.trim_end();
        if line == "ok" {
            return Some(Status::Started);
        }
        if let Some(m) = line.strip_prefix("error ") {
            return Some(Status::Failed(m.to_string()));
        }
        line.strip_prefix("exit ")
            .and_then(|s| s.parse().ok())
            .map(Status::Exited)
    }
}

/// Whether a staging path is one init can build on: an empty directory.
pub fn staging_ok(p: &PathBuf) -> bool {
    std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse() {
        assert_eq!(Status::parse("ok\n"), Some(Status::Started));
        assert_eq!(Status::parse("exit 256"), Some(Status::Exited(256)));
        assert_eq!(
            Status::parse("error mounting proc: EPERM"),
            Some(Status::Failed("mounting proc: EPERM".into()))
        );
        assert_eq!(Status::parse("exit x"), None);
        assert_eq!(Status::parse("hello"), None);
    }

    #[test]
    fn the_search_path_is_the_tasks() {
        let c = candidates("python3", "/usr/local/bin::/usr/bin");
        let c: Vec<&str> = c.iter().map(|c| c.to_str().unwrap()).collect();
        assert_eq!(
            c,
            ["/usr/local/bin/python3", "./python3", "/usr/bin/python3"]
        );
        assert_eq!(candidates("/bin/sh", "/x").len(), 1);
    }
}
