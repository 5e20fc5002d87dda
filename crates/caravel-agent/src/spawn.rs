//! Starting a task's process without copying the agent.
//!
//! `std::process::Command` with a `pre_exec` hook (which the agent needs: the child joins
//! its cgroups and asks to die with the agent *before* it runs any of the task's code)
//! falls back to `fork`. Fork copies the page tables of the whole agent — tens of MB with
//! tokio's threads and the HTTP client — and the copy is thrown away by the `execve` that
//! follows; under a burst of short jobs that copy, its teardown and the TLB shootdowns of
//! the copy-on-write faults were the largest item of the agent's CPU time.
//!
//! This does what glibc's `posix_spawn` does, plus the two steps it cannot express: the
//! child is created with `clone(CLONE_VM | CLONE_VFORK)` on a stack of its own, shares the
//! agent's memory while the agent's calling thread is suspended, makes only
//! async-signal-safe system calls on data prepared before the clone, and either execs
//! (which resumes the agent) or stores `errno` where the agent reads it and exits.
//! Completion is awaited on a pidfd, so no thread sits in `waitpid`.
//!
//! A sandboxed task (`Spec::sandbox`) is built the same way, without an exec in between:
//! the child, made in new namespaces, runs the sandbox's prepared steps (mounts,
//! `pivot_root`, limits), joins the run's cgroups, drops every privilege and installs the
//! seccomp filter, then starts the task with a second `CLONE_VM | CLONE_VFORK` clone (the
//! task is PID 2 of the namespace), and finally execs the reaper, a freestanding program
//! of a few kilobytes, which stays PID 1. Every identity change is a raw system call:
//! glibc's `setresuid` would signal the agent's threads to change theirs too, since the
//! child shares their memory.

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};

use tokio::io::unix::AsyncFd;

/// What to start. The environment is complete (nothing is inherited implicitly).
pub struct Spec<'a> {
    pub program: &'a str,
    pub args: &'a [String],
    pub env: BTreeMap<OsString, OsString>,
    pub cwd: &'a Path,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// `cgroup.procs` files the child writes itself into before it execs.
    pub cgroup_procs: &'a [CString],
    /// Lead a new process group (so the whole tree can be signalled).
    pub new_process_group: bool,
    /// Signal the child gets when the agent thread that started it exits.
    pub parent_death_signal: Option<libc::c_int>,
    /// Namespaces the child is made in (`CLONE_NEWNS | CLONE_NEWPID ...`; 0: the agent's).
    pub namespaces: libc::c_int,
    /// Descriptors the child gets at fixed numbers above stdio: (descriptor, number).
    /// Each descriptor must be numbered above every target (`sandbox::high`).
    pub extra_fds: &'a [(RawFd, RawFd)],
    /// Execute this open file (`execveat(fd, "", AT_EMPTY_PATH)`) instead of looking
    /// `program` up on the `PATH`; `program` is then only `argv[0]`.
    pub exec_fd: Option<RawFd>,
    /// Mounts the child detaches in its own mount namespace before it execs (needs
    /// `CLONE_NEWNS` in `namespaces`).
    pub detach: &'a [CString],
    /// The child's umask (`None`: the agent's, 0077 where it runs as root).
    pub umask: Option<libc::mode_t>,
    /// Build a sandbox and run `program` in it (see the module's documentation). `cwd`
    /// and `cgroup_procs` are then ignored: the sandbox's steps say where it starts and
    /// which cgroups it joins.
    pub sandbox: Option<Sandbox<'a>>,
}

/// One step of building a sandbox, run by the child before anything of the task runs.
/// Prepared strings only: the child makes system calls and nothing else.
pub enum Op {
    Mount {
        src: Option<CString>,
        dst: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// A folder, mode 0755; one that exists is fine.
    Mkdir {
        path: CString,
    },
    /// An empty file to mount a file on; one that exists is fine.
    Touch {
        path: CString,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    /// A character device, mode 0666.
    Mknod {
        path: CString,
        dev: libc::dev_t,
    },
    /// Sets a mode (a folder inside a read-only mount is left as it is).
    Chmod {
        path: CString,
        mode: libc::mode_t,
    },
    /// Makes `root` the root (`pivot_root(".", ".")`, the old root detached).
    Pivot {
        root: CString,
    },
    Chdir {
        path: CString,
    },
    Rlimit {
        resource: libc::c_int,
        value: u64,
    },
    Umask {
        mask: libc::mode_t,
    },
}

/// What a sandboxed start needs beyond the process itself.
pub struct Sandbox<'a> {
    pub ops: &'a [Op],
    /// What each op does, in words, for the error when one fails.
    pub what: &'a [String],
    /// `cgroup.procs` files joined before anything else (the host's paths are gone once
    /// the sandbox's root is in place). Building the sandbox costs the task's cgroups
    /// next to nothing: the child shares the agent's memory.
    pub join: &'a [CString],
    pub uid: u32,
    pub gid: u32,
    /// The highest capability number the kernel knows (`/proc/sys/kernel/cap_last_cap`).
    pub last_cap: u32,
    /// The seccomp program (empty: none).
    pub filter: &'a [libc::sock_filter],
    /// The reaper's executable, open.
    pub reaper: RawFd,
    /// Where the reaper writes `exit <status>` (the child gets it as descriptor 4).
    pub status: RawFd,
}

/// The steps the child can fail at, for the error message.
const STEPS: [&str; 15] = [
    "exec",
    "setpgid",
    "prctl(PR_SET_PDEATHSIG)",
    "redirecting stdio",
    "changing to the working directory",
    "the agent exited",
    "passing descriptors",
    "detaching a mount",
    "sandbox: ",
    "sandbox: joining the run's cgroups",
    "sandbox: dropping privileges",
    "sandbox: installing the seccomp filter",
    "sandbox: starting the task",
    "sandbox: passing the status pipe",
    "sandbox: starting its reaper",
];
const STEP_OP: i32 = 8;
const STEP_JOIN: i32 = 9;
const STEP_PRIV: i32 = 10;
const STEP_SECCOMP: i32 = 11;
const STEP_TASK: i32 = 12;
const STEP_STATUS: i32 = 13;
const STEP_REAPER: i32 = 14;

/// The sandbox part of `Prepared`.
struct SandboxPrepared {
    ops: *const Op,
    n_ops: usize,
    join: Vec<*const libc::c_char>,
    uid: u32,
    gid: u32,
    last_cap: u32,
    fprog: libc::sock_fprog,
    reaper: RawFd,
    status: RawFd,
    reaper_argv: [*const libc::c_char; 3],
    /// Where the task's pid is written, as text, for the reaper's `argv[1]`.
    pid_text: *mut u8,
    /// The task's stack (the second clone's).
    stack_top: *mut libc::c_void,
}

/// Everything the child touches: prepared before the clone, read-only to it except `err`.
struct Prepared {
    candidates: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: CString,
    fds: [RawFd; 3],
    procs: Vec<*const libc::c_char>,
    new_process_group: bool,
    death_signal: libc::c_int,
    parent: libc::pid_t,
    /// In a new PID namespace the parent is out of sight (`getppid` is 0).
    new_pid_ns: bool,
    extra: Vec<(RawFd, RawFd)>,
    exec_fd: RawFd,
    detach: Vec<*const libc::c_char>,
    /// `u32::MAX`: keep the agent's.
    umask: u32,
    sandbox: Option<SandboxPrepared>,
    err: AtomicI32,
    step: AtomicI32,
    /// With `STEP_OP`: which op failed.
    op: AtomicI32,
    /// The task's exec error (0: it exec'd), written by the second clone.
    task_err: AtomicI32,
}

fn cstring(what: &str, s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// Where `execvp` would look for `program`, in order: the program itself when it names a
/// path, otherwise each `PATH` entry of the child's environment (relative entries are
/// resolved in the working directory, as `execvp` after `chdir` does).
fn candidates(program: &str, env: &BTreeMap<OsString, OsString>) -> io::Result<Vec<CString>> {
    if program.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    if program.contains('/') {
        return Ok(vec![cstring("the command", program.as_bytes())?]);
    }
    let path = env
        .get(&OsString::from("PATH"))
        .map(|p| p.as_bytes().to_vec())
        .unwrap_or_else(|| b"/usr/local/bin:/usr/bin:/bin".to_vec());
    path.split(|&b| b == b':')
        .map(|dir| {
            let mut full = if dir.is_empty() {
                b".".to_vec()
            } else {
                dir.to_vec()
            };
            full.push(b'/');
            full.extend_from_slice(program.as_bytes());
            cstring("a PATH entry", &full)
        })
        .collect()
}

/// Runs in the child, on its own stack, sharing the agent's memory. Only async-signal-safe
/// calls; no allocation, no locks, no unwinding.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points at the `Prepared` the parent keeps alive (and does not touch)
    // until this child has exec'd or exited; every pointer in it is NUL-terminated.
    unsafe {
        let p = &*(arg as *const Prepared);
        let fail = |step: i32| -> libc::c_int {
            p.err.store(*libc::__errno_location(), Ordering::Relaxed);
            p.step.store(step, Ordering::Relaxed);
            libc::_exit(127)
        };
        // Handlers are the agent's code; a signal that arrived now would run them on this
        // stack against shared memory. Reset them (keeping ignores, as exec does), and
        // SIGPIPE to its default, which Rust's runtime ignores for itself.
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in 1..65 {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction != libc::SIG_IGN
                && old.sa_sigaction != libc::SIG_DFL
            {
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        libc::sigaction(libc::SIGPIPE, &dfl, std::ptr::null_mut());
        if p.new_process_group && libc::setpgid(0, 0) != 0 {
            return fail(1);
        }
        if p.death_signal != 0 {
            if libc::prctl(libc::PR_SET_PDEATHSIG, p.death_signal) != 0 {
                return fail(2);
            }
            // The agent may have gone before the request above took effect.
            if !p.new_pid_ns && libc::getppid() != p.parent {
                *libc::__errno_location() = libc::ESRCH;
                return fail(5);
            }
        }
        for &procs in &p.procs {
            // A cgroup that cannot be joined leaves the task unlimited rather than unstarted,
            // as before; the agent logged the cgroup's creation already.
            let fd = libc::open(procs, libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::write(fd, b"0".as_ptr() as *const libc::c_void, 1);
                libc::close(fd);
            }
        }
        for (target, &fd) in p.fds.iter().enumerate() {
            let target = target as RawFd;
            let ok = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, target) == target
            };
            if !ok {
                return fail(3);
            }
        }
        for &(fd, target) in &p.extra {
            if libc::dup2(fd, target) != target {
                return fail(6);
            }
        }
        for &m in &p.detach {
            if libc::umount2(m, libc::MNT_DETACH) != 0 {
                return fail(7);
            }
        }
        if p.umask != u32::MAX {
            libc::umask(p.umask as libc::mode_t);
        }
        if let Some(sb) = &p.sandbox {
            return sandboxed(p, sb);
        }
        if libc::chdir(p.cwd.as_ptr()) != 0 {
            return fail(4);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        if p.exec_fd >= 0 {
            libc::syscall(
                libc::SYS_execveat,
                p.exec_fd,
                c"".as_ptr(),
                p.argv.as_ptr(),
                p.envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
            return fail(0);
        }
        // execvp's search: a directory that lacks it or cannot be searched is skipped,
        // EACCES is reported if nothing else worked, any other error stops the search.
        let mut eacces = false;
        for c in &p.candidates {
            libc::execve(c.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
            match *libc::__errno_location() {
                libc::EACCES => eacces = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => return fail(0),
            }
        }
        if eacces {
            *libc::__errno_location() = libc::EACCES;
        }
        fail(0)
    }
}

/// Records the errno of a failed step and exits the child.
///
/// # Safety
/// In the child only.
unsafe fn fail_at(p: &Prepared, step: i32) -> libc::c_int {
    // SAFETY: see the function's contract.
    unsafe {
        p.err.store(*libc::__errno_location(), Ordering::Relaxed);
        p.step.store(step, Ordering::Relaxed);
        libc::_exit(127)
    }
}

/// One op; false with `errno` set when it failed.
///
/// # Safety
/// Every string is NUL-terminated. Async-signal-safe: system calls only.
pub(crate) unsafe fn run_op(op: &Op) -> bool {
    // SAFETY: see the function's contract.
    unsafe {
        let opt = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        match op {
            Op::Mount {
                src,
                dst,
                fstype,
                flags,
                data,
            } => {
                libc::syscall(
                    libc::SYS_mount,
                    opt(src),
                    dst.as_ptr(),
                    opt(fstype),
                    *flags,
                    opt(data),
                ) == 0
            }
            Op::Mkdir { path } => {
                libc::syscall(libc::SYS_mkdirat, libc::AT_FDCWD, path.as_ptr(), 0o755) == 0
                    || *libc::__errno_location() == libc::EEXIST
            }
            Op::Touch { path } => {
                let fd = libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    libc::O_RDONLY | libc::O_CREAT | libc::O_CLOEXEC,
                    0o644,
                );
                if fd < 0 {
                    return false;
                }
                libc::syscall(libc::SYS_close, fd);
                true
            }
            Op::Symlink { target, link } => {
                libc::syscall(
                    libc::SYS_symlinkat,
                    target.as_ptr(),
                    libc::AT_FDCWD,
                    link.as_ptr(),
                ) == 0
            }
            Op::Mknod { path, dev } => {
                libc::syscall(
                    libc::SYS_mknodat,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    libc::S_IFCHR | 0o666,
                    *dev,
                ) == 0
            }
            Op::Pivot { root } => {
                let dot = c".".as_ptr();
                libc::syscall(libc::SYS_chdir, root.as_ptr()) == 0
                    && libc::syscall(libc::SYS_pivot_root, dot, dot) == 0
                    && libc::syscall(libc::SYS_umount2, dot, libc::MNT_DETACH) == 0
                    && libc::syscall(libc::SYS_chdir, c"/".as_ptr()) == 0
            }
            Op::Chdir { path } => libc::syscall(libc::SYS_chdir, path.as_ptr()) == 0,
            // A folder in a read-only mount was not made here: its mode is the host's.
            Op::Chmod { path, mode } => {
                libc::syscall(libc::SYS_fchmodat, libc::AT_FDCWD, path.as_ptr(), *mode) == 0
                    || *libc::__errno_location() == libc::EROFS
            }
            Op::Rlimit { resource, value } => {
                let l = libc::rlimit64 {
                    rlim_cur: *value,
                    rlim_max: *value,
                };
                libc::syscall(
                    libc::SYS_prlimit64,
                    0,
                    *resource,
                    &l as *const libc::rlimit64,
                    std::ptr::null_mut::<libc::rlimit64>(),
                ) == 0
            }
            Op::Umask { mask } => {
                libc::syscall(libc::SYS_umask, *mask);
                true
            }
        }
    }
}

/// The sandboxed rest of `child_main`: build, join, drop, filter, start the task, become
/// the reaper. Never returns on success (the reaper's exec resumes the agent).
///
/// # Safety
/// In the child only, on data prepared before the clone.
unsafe fn sandboxed(p: &Prepared, sb: &SandboxPrepared) -> libc::c_int {
    // SAFETY: see the function's contract.
    unsafe {
        // The status pipe at 4, close-on-exec for now: the task must not inherit it (a line
        // it wrote would be believed); the reaper gets it below.
        if libc::syscall(libc::SYS_dup3, sb.status, 4, libc::O_CLOEXEC) != 4 {
            return fail_at(p, STEP_STATUS);
        }
        for &procs in &sb.join {
            let fd = libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                procs,
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd < 0 || libc::syscall(libc::SYS_write, fd, b"0".as_ptr(), 1) != 1 {
                return fail_at(p, STEP_JOIN);
            }
            libc::syscall(libc::SYS_close, fd);
        }
        for i in 0..sb.n_ops {
            if !run_op(&*sb.ops.add(i)) {
                p.op.store(i as i32, Ordering::Relaxed);
                return fail_at(p, STEP_OP);
            }
        }
        // Every capability out of the bounding and ambient sets, the tenant's ids (raw calls:
        // see the module's documentation), every set emptied, no_new_privs.
        for cap in 0..=sb.last_cap {
            if libc::syscall(
                libc::SYS_prctl,
                libc::PR_CAPBSET_DROP,
                cap as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return fail_at(p, STEP_PRIV);
            }
        }
        if libc::syscall(
            libc::SYS_prctl,
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
            || libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
            || libc::syscall(libc::SYS_setresgid, sb.gid, sb.gid, sb.gid) != 0
            || libc::syscall(libc::SYS_setresuid, sb.uid, sb.uid, sb.uid) != 0
        {
            return fail_at(p, STEP_PRIV);
        }
        #[repr(C)]
        struct CapHeader {
            version: u32,
            pid: i32,
        }
        let mut h = CapHeader {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let none = [0u32; 6];
        if libc::syscall(libc::SYS_capset, &mut h as *mut CapHeader, none.as_ptr()) != 0
            || libc::syscall(libc::SYS_prctl, libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            // Changing uid cleared the parent-death signal: the sandbox must still die with
            // the agent, so that no copy of the task outlives what would report it.
            || libc::syscall(libc::SYS_prctl, libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_getuid) == 0
        {
            return fail_at(p, STEP_PRIV);
        }
        if sb.fprog.len > 0
            && libc::syscall(
                libc::SYS_prctl,
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &sb.fprog as *const libc::sock_fprog,
                0,
                0,
            ) != 0
        {
            return fail_at(p, STEP_SECCOMP);
        }
        // The task: PID 2 of the namespace, a child of this process.
        let pid = libc::clone(
            task_main,
            sb.stack_top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            p as *const Prepared as *mut libc::c_void,
        );
        if pid < 0 {
            return fail_at(p, STEP_TASK);
        }
        let e = p.task_err.load(Ordering::Relaxed);
        if e != 0 {
            *libc::__errno_location() = e;
            return fail_at(p, 0);
        }
        // The reaper's argv[1]: the task's pid, in decimal.
        let mut digits = [0u8; 12];
        let (mut k, mut v) = (0, pid as u32);
        loop {
            digits[k] = b'0' + (v % 10) as u8;
            k += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for i in 0..k {
            *sb.pid_text.add(i) = digits[k - 1 - i];
        }
        *sb.pid_text.add(k) = 0;
        if libc::syscall(libc::SYS_fcntl, 4, libc::F_SETFD, 0) != 0 {
            return fail_at(p, STEP_STATUS);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        let envp: [*const libc::c_char; 1] = [std::ptr::null()];
        libc::syscall(
            libc::SYS_execveat,
            sb.reaper,
            c"".as_ptr(),
            sb.reaper_argv.as_ptr(),
            envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
        fail_at(p, STEP_REAPER)
    }
}

/// The task's own process: runs in the sandbox the first clone built, on its own stack,
/// sharing memory with it (and the agent) until it execs.
extern "C" fn task_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Prepared` of `child_main`, alive and untouched until this
    // process has exec'd or exited.
    unsafe {
        let p = &*(arg as *const Prepared);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        let mut eacces = false;
        for c in &p.candidates {
            libc::syscall(
                libc::SYS_execve,
                c.as_ptr(),
                p.argv.as_ptr(),
                p.envp.as_ptr(),
            );
            match *libc::__errno_location() {
                libc::EACCES => eacces = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                e => {
                    p.task_err.store(e, Ordering::Relaxed);
                    libc::_exit(127);
                }
            }
        }
        p.task_err.store(
            if eacces { libc::EACCES } else { libc::ENOENT },
            Ordering::Relaxed,
        );
        libc::_exit(127)
    }
}

/// Size of the child's stack: it runs a handful of system calls in one frame.
const STACK_BYTES: usize = 64 * 1024;

pub fn spawn(spec: Spec<'_>) -> io::Result<Child> {
    start(spec).map(Child::new)
}

/// Threads that start processes, so that the agent's async workers never block in a
/// `clone`: a sandboxed start holds its calling thread for the better part of a
/// millisecond (the child builds the sandbox while sharing that thread's memory), and a
/// burst of hundreds of starts on the runtime's workers stalled everything else the agent
/// does (exits waited half a second to be reported). They live as long as the agent: a
/// started process is sent SIGKILL when the thread that started it ends.
pub struct Spawner {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<Job>>,
}

type Job = Box<dyn FnOnce() + Send>;

impl Spawner {
    pub fn new(threads: usize) -> Spawner {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("caravel-spawn-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().expect("lock").recv();
                    match job {
                        Ok(job) => job(),
                        // The agent is gone; so are the processes this thread started.
                        Err(_) => return,
                    }
                })
                .expect("starting a spawner thread");
        }
        Spawner {
            tx: std::sync::Mutex::new(tx),
        }
    }

    /// Starts a process with `make`'s spec on a spawner thread, and waits for it without
    /// blocking the caller's thread.
    pub async fn spawn<F>(&self, make: F) -> io::Result<Child>
    where
        F: FnOnce() -> io::Result<libc::pid_t> + Send + 'static,
    {
        let (done, wait) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(make());
        });
        self.tx
            .lock()
            .expect("lock")
            .send(job)
            .map_err(|_| io::Error::other("the spawner threads are gone"))?;
        let pid = wait
            .await
            .map_err(|_| io::Error::other("a spawner thread ended"))??;
        Ok(Child::new(pid))
    }
}

/// `spawn` without the waiting part: starts the process and returns its pid, which
/// `Child::new` (in an async context) then waits for.
pub fn start(spec: Spec<'_>) -> io::Result<libc::pid_t> {
    let candidates = if spec.exec_fd.is_some() {
        Vec::new()
    } else {
        candidates(spec.program, &spec.env)?
    };
    if spec
        .extra_fds
        .iter()
        .any(|&(fd, _)| fd <= 2 || spec.extra_fds.iter().any(|&(_, target)| fd <= target))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a descriptor passed to the child is numbered below a target",
        ));
    }
    let mut arg_store = Vec::with_capacity(spec.args.len() + 1);
    arg_store.push(cstring("the command", spec.program.as_bytes())?);
    for a in spec.args {
        arg_store.push(cstring("an argument", a.as_bytes())?);
    }
    let mut env_store = Vec::with_capacity(spec.env.len());
    for (k, v) in &spec.env {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        env_store.push(cstring("an environment variable", &kv)?);
    }
    let ptrs = |v: &[CString]| {
        v.iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect::<Vec<_>>()
    };
    let mut task_stack: Vec<u128> = Vec::new();
    let mut pid_text = [0u8; 16];
    let reaper_name = c"caravel-reaper";
    let sandbox = match &spec.sandbox {
        None => None,
        Some(sb) => {
            if sb.what.len() != sb.ops.len()
                || sb.status <= 4
                || sb.filter.len() > u16::MAX as usize
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a sandbox's steps and descriptions differ, or its status pipe is numbered 4 or below",
                ));
            }
            task_stack.reserve_exact(STACK_BYTES / 16);
            Some(SandboxPrepared {
                ops: sb.ops.as_ptr(),
                n_ops: sb.ops.len(),
                join: sb.join.iter().map(|c| c.as_ptr()).collect(),
                uid: sb.uid,
                gid: sb.gid,
                last_cap: sb.last_cap,
                fprog: libc::sock_fprog {
                    len: sb.filter.len() as u16,
                    filter: sb.filter.as_ptr() as *mut libc::sock_filter,
                },
                reaper: sb.reaper,
                status: sb.status,
                reaper_argv: [
                    reaper_name.as_ptr(),
                    pid_text.as_mut_ptr() as *const libc::c_char,
                    std::ptr::null(),
                ],
                pid_text: pid_text.as_mut_ptr(),
                // SAFETY: the end of the reserved buffer, which outlives the clone.
                stack_top: unsafe {
                    task_stack.as_mut_ptr().add(task_stack.capacity()) as *mut libc::c_void
                },
            })
        }
    };
    let prepared = Prepared {
        candidates,
        argv: ptrs(&arg_store),
        envp: ptrs(&env_store),
        cwd: cstring("the working directory", spec.cwd.as_os_str().as_bytes())?,
        fds: [
            spec.stdin.as_raw_fd(),
            spec.stdout.as_raw_fd(),
            spec.stderr.as_raw_fd(),
        ],
        procs: spec.cgroup_procs.iter().map(|c| c.as_ptr()).collect(),
        new_process_group: spec.new_process_group,
        death_signal: spec.parent_death_signal.unwrap_or(0),
        // SAFETY: no preconditions.
        parent: unsafe { libc::getpid() },
        new_pid_ns: spec.namespaces & libc::CLONE_NEWPID != 0,
        extra: spec.extra_fds.to_vec(),
        exec_fd: spec.exec_fd.unwrap_or(-1),
        detach: spec.detach.iter().map(|c| c.as_ptr()).collect(),
        umask: spec.umask.unwrap_or(u32::MAX),
        sandbox,
        err: AtomicI32::new(0),
        step: AtomicI32::new(0),
        op: AtomicI32::new(0),
        task_err: AtomicI32::new(0),
    };
    let mut stack: Vec<u128> = Vec::with_capacity(STACK_BYTES / 16);
    // SAFETY: the child runs `child_main` on `stack` (16-byte aligned, growing down from its
    // end) with `prepared`, both alive until `clone` returns, which with CLONE_VFORK is
    // after the child has exec'd or exited. All signals are blocked across the clone so
    // none is delivered to the child before it has reset the agent's handlers.
    let (pid, clone_err) = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let top = stack.as_mut_ptr().add(stack.capacity()) as *mut libc::c_void;
        let pid = libc::clone(
            child_main,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD | spec.namespaces,
            &prepared as *const Prepared as *mut libc::c_void,
        );
        let clone_err = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        (pid, clone_err)
    };
    drop(stack);
    drop(task_stack);
    if pid < 0 {
        return Err(clone_err);
    }
    let err = prepared.err.load(Ordering::Relaxed);
    if err != 0 {
        reap(pid)?;
        let n = prepared.step.load(Ordering::Relaxed);
        let step = STEPS[n as usize];
        let e = io::Error::from_raw_os_error(err);
        return Err(match (n, &spec.sandbox) {
            (0, _) => e,
            (STEP_OP, Some(sb)) => {
                let what = &sb.what[prepared.op.load(Ordering::Relaxed) as usize];
                io::Error::new(e.kind(), format!("{step}{what}: {e}"))
            }
            _ => io::Error::new(e.kind(), format!("{step}: {e}")),
        });
    }
    drop(arg_store);
    drop(env_store);
    Ok(pid)
}

/// Waits for a child that is known to have exited or to be about to.
fn reap(pid: libc::pid_t) -> io::Result<ExitStatus> {
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Ok(ExitStatus::from_raw(status));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

enum Waiter {
    /// Readable once the process has exited (Linux ≥ 5.3).
    Pidfd(AsyncFd<OwnedFd>),
    /// Older kernels: a blocking thread in `waitpid`.
    Thread(tokio::task::JoinHandle<io::Result<ExitStatus>>),
}

/// A started task process; reaped by `wait`.
pub struct Child {
    pid: libc::pid_t,
    status: Option<ExitStatus>,
    waiter: Option<Waiter>,
}

impl Child {
    pub fn new(pid: libc::pid_t) -> Child {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
        let waiter = if fd >= 0 {
            // SAFETY: `fd` was just returned to us and is owned by nothing else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: an OwnedFd keeps its descriptor open and unchanged until dropped.
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
                .ok()
                .map(Waiter::Pidfd)
        } else {
            None
        };
        let waiter = waiter
            .unwrap_or_else(|| Waiter::Thread(tokio::task::spawn_blocking(move || reap(pid))));
        Child {
            pid,
            status: None,
            waiter: Some(waiter),
        }
    }

    pub fn id(&self) -> libc::pid_t {
        self.pid
    }

    /// Waits for the process to exit and reaps it. Cancel-safe: dropping the future and
    /// calling again picks up where it left.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let status = match self.waiter.as_mut().expect("a waiter until reaped") {
            Waiter::Pidfd(fd) => loop {
                let mut ready = fd.readable().await?;
                let mut status = 0;
                // SAFETY: non-blocking wait for our own child.
                let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
                if r == self.pid {
                    break ExitStatus::from_raw(status);
                }
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EINTR) {
                        return Err(e);
                    }
                } else {
                    ready.clear_ready();
                }
            },
            Waiter::Thread(h) => h.await.map_err(io::Error::other)??,
        };
        self.status = Some(status);
        self.waiter = None;
        Ok(status)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_none() {
            if let Some(Waiter::Pidfd(_)) = self.waiter {
                // Reap it if it is already gone, so a dropped child is not left a zombie.
                let mut status = 0;
                // SAFETY: non-blocking wait for our own child.
                unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    fn base_env() -> BTreeMap<OsString, OsString> {
        std::env::vars_os().collect()
    }

    struct Run {
        dir: tempfile::TempDir,
    }

    impl Run {
        fn new() -> Run {
            Run {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn spawn(
            &self,
            program: &str,
            args: &[&str],
            env: BTreeMap<OsString, OsString>,
        ) -> io::Result<Child> {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            spawn(Spec {
                program,
                args: &args,
                env,
                cwd: self.dir.path(),
                stdin: File::open("/dev/null").unwrap().into(),
                stdout: File::create(self.dir.path().join("out")).unwrap().into(),
                stderr: File::create(self.dir.path().join("err")).unwrap().into(),
                cgroup_procs: &[],
                new_process_group: true,
                parent_death_signal: Some(libc::SIGKILL),
                namespaces: 0,
                extra_fds: &[],
                exec_fd: None,
                detach: &[],
                umask: None,
                sandbox: None,
            })
        }
        fn out(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("out")).unwrap()
        }
        fn err(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("err")).unwrap()
        }
    }

    #[tokio::test]
    async fn a_child_gets_its_arguments_environment_directory_and_files() {
        let r = Run::new();
        let mut env = base_env();
        env.insert("CARAVEL_X".into(), "a b".into());
        let mut c = r
            .spawn(
                "sh",
                &[
                    "-c",
                    "echo \"$1|$CARAVEL_X|$(pwd)|$(cat)\"; echo oops >&2; exit 3",
                    "sh",
                    "first arg",
                ],
                env,
            )
            .unwrap();
        let s = c.wait().await.unwrap();
        assert_eq!(s.code(), Some(3));
        let want = format!(
            "first arg|a b|{}|\n",
            r.dir.path().canonicalize().unwrap().display()
        );
        assert_eq!(r.out(), want);
        assert_eq!(r.err(), "oops\n");
        // A second wait answers the same without waiting again.
        assert_eq!(c.wait().await.unwrap().code(), Some(3));
    }

    #[tokio::test]
    async fn a_child_leads_its_own_process_group_with_default_signals_and_no_agent_fds() {
        let r = Run::new();
        // An open descriptor of the agent (close-on-exec, as std opens everything).
        let held = File::open("/dev/null").unwrap();
        let fd = held.as_raw_fd();
        // `yes` dies of SIGPIPE when SIGPIPE is at its default; with it ignored (Rust's
        // setting for itself) it would print "Broken pipe" and exit 1.
        let script = format!(
            "cut -d' ' -f5 /proc/$$/stat; echo $$; yes | head -c 1 >/dev/null; \
             echo \"${{PIPESTATUS[0]}}\"; [ -e /proc/$$/fd/{fd} ] && echo leaked || echo closed; \
             grep SigBlk /proc/$$/status"
        );
        let mut c = r.spawn("bash", &["-c", &script], base_env()).unwrap();
        let pid = c.id();
        assert!(c.wait().await.unwrap().success());
        let out = r.out();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], lines[1], "pgid = pid: {out}");
        assert_eq!(lines[1], pid.to_string());
        assert_eq!(lines[2], "141", "yes killed by SIGPIPE: {out}");
        assert_eq!(lines[3], "closed", "{out}");
        assert_eq!(lines[4], "SigBlk:\t0000000000000000", "{out}");
        assert_eq!(r.err(), "", "yes must die of SIGPIPE quietly");
        drop(held);
    }

    #[tokio::test]
    async fn a_program_is_found_on_the_childs_path_and_a_missing_one_is_an_error() {
        let r = Run::new();
        let bin = r.dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let tool = bin.join("caravel-test-tool");
        std::fs::write(&tool, "#!/bin/sh\necho found\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut env = base_env();
        let path = format!("/nonexistent:{}:/usr/bin:/bin", bin.display());
        env.insert("PATH".into(), path.into());
        let mut c = r.spawn("caravel-test-tool", &[], env.clone()).unwrap();
        assert!(c.wait().await.unwrap().success());
        assert_eq!(r.out(), "found\n");

        let e = r
            .spawn("no-such-caravel-tool", &[], env.clone())
            .err()
            .unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        let e = r.spawn("/no/such/binary", &[], env.clone()).err().unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = r.spawn("caravel-test-tool", &[], env).err().unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        let e = r.spawn("sh", &["bad\0arg"], base_env()).err().unwrap();
        assert!(e.to_string().contains("NUL"), "{e}");
    }

    #[tokio::test]
    async fn a_bad_working_directory_names_the_step() {
        let args: Vec<String> = vec![];
        let e = spawn(Spec {
            program: "true",
            args: &args,
            env: base_env(),
            cwd: Path::new("/no/such/dir"),
            stdin: File::open("/dev/null").unwrap().into(),
            stdout: File::open("/dev/null").unwrap().into(),
            stderr: File::open("/dev/null").unwrap().into(),
            cgroup_procs: &[],
            new_process_group: false,
            parent_death_signal: None,
            namespaces: 0,
            extra_fds: &[],
            exec_fd: None,
            detach: &[],
            umask: None,
            sandbox: None,
        })
        .err()
        .unwrap();
        assert!(
            e.to_string()
                .starts_with("changing to the working directory: No such file"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_wait_dropped_midway_can_be_taken_up_again_and_a_signal_is_reported() {
        let r = Run::new();
        let mut c = r.spawn("sleep", &["30"], base_env()).unwrap();
        let early = tokio::time::timeout(std::time::Duration::from_millis(100), c.wait()).await;
        assert!(early.is_err(), "still running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id(), libc::SIGTERM) };
        let s = c.wait().await.unwrap();
        assert_eq!(s.signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn a_child_dies_with_the_thread_that_started_it() {
        let starter = std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let r = Run::new();
                let c = r.spawn("sleep", &["30"], base_env()).unwrap();
                let pid = c.id();
                // Not reaped here: the child must outlive this handle and die with the thread.
                std::mem::forget(c);
                pid
            })
        });
        let pid = starter.join().unwrap();
        let status = reap(pid).unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
