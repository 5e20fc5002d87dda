//! The system-call filter every sandboxed task runs under: Docker's default seccomp profile
//! (the reference the restricted Pod Security Standard means by "the runtime's default"),
//! for a task that holds no capabilities, as a classic-BPF program built once per agent.
//!
//! An allowlist: anything not named fails with `EPERM`. Beyond the plain list, as in
//! Docker's profile: `clone` only without namespace flags (a task cannot make user or
//! mount namespaces, the kernel's largest attack surface for an unprivileged process),
//! `clone3` answers `ENOSYS` (its flags sit in memory a filter cannot read, and libcs fall
//! back to `clone`), `socket` for every family but `AF_VSOCK`, `personality` only for the
//! values programs use. One deliberate difference: the `io_uring_*` calls are refused, as
//! Docker has done since version 25 (they bypass the filter for the work they queue).
//! Calls from another architecture's ABI (x32, i386) are refused.
//!
//! The same rules go to OCI runtimes as a `linux.seccomp` section (`oci_profile`), so a
//! task in an image is filtered the same way.

/// Errno for refused calls.
const EPERM: u32 = libc::EPERM as u32;
const ENOSYS: u32 = libc::ENOSYS as u32;

/// `clone` flags that make namespaces: `CLONE_NEWNS`, `NEWCGROUP`, `NEWUTS`, `NEWIPC`,
/// `NEWUSER`, `NEWPID`, `NEWNET` (Docker's mask, 0x7E020000).
pub const NAMESPACE_FLAGS: u32 = 0x7E02_0000;

/// `AF_VSOCK`: a socket to the hypervisor, refused.
const AF_VSOCK: u32 = 40;

/// Values of `personality` allowed: 0 (`PER_LINUX`), 8 (`PER_LINUX32`), 0x20000
/// (`UNAME26`), 0x20008 (both) and 0xffffffff (a query that changes nothing).
const PERSONALITIES: [u32; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

#[cfg(target_arch = "x86_64")]
macro_rules! syscalls {
    ($($name:ident)*) => {
        &[$((stringify!($name), libc::$name as u32)),*]
    };
}

/// Docker's default allowlist for a process without capabilities, x86_64 numbering.
#[cfg(target_arch = "x86_64")]
#[rustfmt::skip]
const ALLOWED: &[(&str, u32)] = syscalls!(
    SYS_accept SYS_accept4 SYS_access SYS_adjtimex SYS_alarm SYS_bind SYS_brk SYS_capget
    SYS_capset SYS_chdir SYS_chmod SYS_chown SYS_clock_adjtime SYS_clock_getres
    SYS_clock_gettime SYS_clock_nanosleep SYS_close SYS_close_range SYS_connect
    SYS_copy_file_range SYS_creat SYS_dup SYS_dup2 SYS_dup3 SYS_epoll_create
    SYS_epoll_create1 SYS_epoll_ctl SYS_epoll_ctl_old SYS_epoll_pwait SYS_epoll_pwait2
    SYS_epoll_wait SYS_epoll_wait_old SYS_eventfd SYS_eventfd2 SYS_execve SYS_execveat
    SYS_exit SYS_exit_group SYS_faccessat SYS_faccessat2 SYS_fadvise64 SYS_fallocate
    SYS_fanotify_mark SYS_fchdir SYS_fchmod SYS_fchmodat SYS_fchown SYS_fchownat SYS_fcntl
    SYS_fdatasync SYS_fgetxattr SYS_flistxattr SYS_flock SYS_fork SYS_fremovexattr
    SYS_fsetxattr SYS_fstat SYS_fstatfs SYS_fsync SYS_ftruncate SYS_futex SYS_futex_waitv
    SYS_futimesat SYS_getcpu SYS_getcwd SYS_getdents SYS_getdents64 SYS_getegid SYS_geteuid
    SYS_getgid SYS_getgroups SYS_getitimer SYS_getpeername SYS_getpgid SYS_getpgrp
    SYS_getpid SYS_getppid SYS_getpriority SYS_getrandom SYS_getresgid SYS_getresuid
    SYS_getrlimit SYS_get_robust_list SYS_getrusage SYS_getsid SYS_getsockname
    SYS_getsockopt SYS_get_thread_area SYS_gettid SYS_gettimeofday SYS_getuid SYS_getxattr
    SYS_inotify_add_watch SYS_inotify_init SYS_inotify_init1 SYS_inotify_rm_watch
    SYS_io_cancel SYS_ioctl SYS_io_destroy SYS_io_getevents SYS_ioprio_get SYS_ioprio_set
    SYS_io_setup SYS_io_submit SYS_kill SYS_landlock_add_rule SYS_landlock_create_ruleset
    SYS_landlock_restrict_self SYS_lchown SYS_lgetxattr SYS_link SYS_linkat SYS_listen
    SYS_listxattr SYS_llistxattr SYS_lremovexattr SYS_lseek SYS_lsetxattr SYS_lstat
    SYS_madvise SYS_membarrier SYS_memfd_create SYS_memfd_secret SYS_mincore SYS_mkdir
    SYS_mkdirat SYS_mknod SYS_mknodat SYS_mlock SYS_mlock2 SYS_mlockall SYS_mmap
    SYS_mprotect SYS_mq_getsetattr SYS_mq_notify SYS_mq_open SYS_mq_timedreceive
    SYS_mq_timedsend SYS_mq_unlink SYS_mremap SYS_msgctl SYS_msgget SYS_msgrcv SYS_msgsnd
    SYS_msync SYS_munlock SYS_munlockall SYS_munmap SYS_name_to_handle_at SYS_nanosleep
    SYS_newfstatat SYS_open SYS_openat SYS_openat2 SYS_pause SYS_pidfd_open
    SYS_pidfd_send_signal SYS_pipe SYS_pipe2 SYS_pkey_alloc SYS_pkey_free SYS_pkey_mprotect
    SYS_poll SYS_ppoll SYS_prctl SYS_pread64 SYS_preadv SYS_preadv2 SYS_prlimit64
    SYS_process_mrelease SYS_pselect6 SYS_pwrite64 SYS_pwritev SYS_pwritev2 SYS_read
    SYS_readahead SYS_readlink SYS_readlinkat SYS_readv SYS_recvfrom SYS_recvmmsg
    SYS_recvmsg SYS_remap_file_pages SYS_removexattr SYS_rename SYS_renameat SYS_renameat2
    SYS_restart_syscall SYS_rmdir SYS_rseq SYS_rt_sigaction SYS_rt_sigpending
    SYS_rt_sigprocmask SYS_rt_sigqueueinfo SYS_rt_sigreturn SYS_rt_sigsuspend
    SYS_rt_sigtimedwait SYS_rt_tgsigqueueinfo SYS_sched_getaffinity SYS_sched_getattr
    SYS_sched_getparam SYS_sched_get_priority_max SYS_sched_get_priority_min
    SYS_sched_getscheduler SYS_sched_rr_get_interval SYS_sched_setaffinity
    SYS_sched_setattr SYS_sched_setparam SYS_sched_setscheduler SYS_sched_yield SYS_seccomp
    SYS_select SYS_semctl SYS_semget SYS_semop SYS_semtimedop SYS_sendfile SYS_sendmmsg
    SYS_sendmsg SYS_sendto SYS_setfsgid SYS_setfsuid SYS_setgid SYS_setgroups SYS_setitimer
    SYS_setpgid SYS_setpriority SYS_setregid SYS_setresgid SYS_setresuid SYS_setreuid
    SYS_setrlimit SYS_set_robust_list SYS_setsid SYS_setsockopt SYS_set_thread_area
    SYS_set_tid_address SYS_setuid SYS_setxattr SYS_shmat SYS_shmctl SYS_shmdt SYS_shmget
    SYS_shutdown SYS_sigaltstack SYS_signalfd SYS_signalfd4 SYS_socketpair SYS_splice
    SYS_stat SYS_statfs SYS_statx SYS_symlink SYS_symlinkat SYS_sync SYS_sync_file_range
    SYS_syncfs SYS_sysinfo SYS_tee SYS_tgkill SYS_time SYS_timer_create SYS_timer_delete
    SYS_timer_getoverrun SYS_timer_gettime SYS_timer_settime SYS_timerfd_create
    SYS_timerfd_gettime SYS_timerfd_settime SYS_times SYS_tkill SYS_truncate SYS_umask
    SYS_uname SYS_unlink SYS_unlinkat SYS_utime SYS_utimensat SYS_utimes SYS_vfork
    SYS_vmsplice SYS_wait4 SYS_waitid SYS_write SYS_writev SYS_process_vm_readv
    SYS_process_vm_writev SYS_ptrace SYS_arch_prctl SYS_modify_ldt
);

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "x86_64")]
const OCI_ARCH: &str = "SCMP_ARCH_X86_64";
/// x32 ABI calls carry this bit in their number.
#[cfg(target_arch = "x86_64")]
const X32_BIT: u32 = 0x4000_0000;

/// Whether this build has a filter for the machine's architecture.
pub fn supported() -> bool {
    cfg!(target_arch = "x86_64")
}

// Classic BPF opcodes (linux/bpf_common.h): class | size | mode, or class | op | source.
const BPF_LD: u16 = 0x00;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_K: u16 = 0x00;
const LD_W_ABS: u16 = BPF_LD | BPF_W | BPF_ABS;
const JMP_JEQ_K: u16 = BPF_JMP | 0x10 | BPF_K;
const JMP_JGE_K: u16 = BPF_JMP | 0x30 | BPF_K;
const JMP_JSET_K: u16 = BPF_JMP | 0x40 | BPF_K;
const RET_K: u16 = BPF_RET | BPF_K;

// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// The low 32 bits of the first argument (little-endian).
const OFF_ARG0_LO: u32 = 16;

const RET_ALLOW: u32 = 0x7fff_0000; // SECCOMP_RET_ALLOW
fn ret_errno(e: u32) -> u32 {
    0x0005_0000 | (e & 0xffff) // SECCOMP_RET_ERRNO
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// What the filter does with one system call number.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Rule {
    Allow,
    /// `clone`: allowed without namespace flags.
    Clone,
    /// `clone3`: ENOSYS.
    Clone3,
    /// `socket`: every family but `AF_VSOCK`.
    Socket,
    /// `personality`: the listed values.
    Personality,
}

/// The code for one rule, the syscall number already matched; every path returns.
fn rule_code(r: Rule) -> Vec<libc::sock_filter> {
    match r {
        Rule::Allow => vec![stmt(RET_K, RET_ALLOW)],
        Rule::Clone3 => vec![stmt(RET_K, ret_errno(ENOSYS))],
        Rule::Clone => vec![
            stmt(LD_W_ABS, OFF_ARG0_LO),
            jump(JMP_JSET_K, NAMESPACE_FLAGS, 0, 1),
            stmt(RET_K, ret_errno(EPERM)),
            stmt(RET_K, RET_ALLOW),
        ],
        Rule::Socket => vec![
            stmt(LD_W_ABS, OFF_ARG0_LO),
            jump(JMP_JEQ_K, AF_VSOCK, 0, 1),
            stmt(RET_K, ret_errno(EPERM)),
            stmt(RET_K, RET_ALLOW),
        ],
        Rule::Personality => {
            let mut v = vec![stmt(LD_W_ABS, OFF_ARG0_LO)];
            for p in PERSONALITIES {
                v.push(jump(JMP_JEQ_K, p, 0, 1));
                v.push(stmt(RET_K, RET_ALLOW));
            }
            v.push(stmt(RET_K, ret_errno(EPERM)));
            v
        }
    }
}

/// A run of numbers that get the same rule (`Allow` runs are merged; the others are one
/// number each).
#[derive(Clone, Copy, Debug)]
struct Segment {
    lo: u32,
    hi: u32,
    rule: Rule,
}

/// Sorted numbers with their rules, as segments.
fn segments(mut rules: Vec<(u32, Rule)>) -> Vec<Segment> {
    rules.sort_unstable_by_key(|r| r.0);
    rules.dedup_by_key(|r| r.0);
    let mut out: Vec<Segment> = Vec::new();
    for (nr, rule) in rules {
        match out.last_mut() {
            Some(last) if rule == Rule::Allow && last.rule == Rule::Allow && last.hi + 1 == nr => {
                last.hi = nr
            }
            _ => out.push(Segment {
                lo: nr,
                hi: nr,
                rule,
            }),
        }
    }
    out
}

/// A decision tree over the sorted segments: a call's number is found in about log2(n)
/// comparisons, not n. It matters twice: at every call the kernel's cache does not answer,
/// and when the filter is installed, since the kernel then runs the filter once for every
/// system call number to fill that cache — with a linear list of some 300 numbers that was
/// the largest single cost of starting a sandboxed task.
///
/// Layout: a node is `jge k` then a long jump (`ja`, no 255-instruction limit) over the
/// left subtree to the right one; leaves test their few segments in turn, and every
/// outcome returns where it is decided.
fn tree(segs: &[Segment]) -> Vec<libc::sock_filter> {
    const JMP_JA: u16 = BPF_JMP; // BPF_JA = 0x00
    const JMP_JGT_K: u16 = BPF_JMP | 0x20 | BPF_K;
    if segs.len() <= 3 {
        let mut v = Vec::new();
        for s in segs {
            let code = rule_code(s.rule);
            let n = code.len() as u8;
            if s.lo == s.hi {
                v.push(jump(JMP_JEQ_K, s.lo, 0, n));
            } else {
                v.push(jump(JMP_JGE_K, s.lo, 0, n + 1));
                v.push(jump(JMP_JGT_K, s.hi, n, 0));
            }
            v.extend(code);
        }
        v.push(stmt(RET_K, ret_errno(EPERM)));
        return v;
    }
    let mid = segs.len() / 2;
    let left = tree(&segs[..mid]);
    let right = tree(&segs[mid..]);
    let mut v = vec![
        jump(JMP_JGE_K, segs[mid].lo, 0, 1),
        stmt(JMP_JA, left.len() as u32),
    ];
    v.extend(left);
    v.extend(right);
    v
}

/// The filter program: the architecture checked, other ABIs refused, then the tree.
#[cfg(target_arch = "x86_64")]
pub fn program() -> Vec<libc::sock_filter> {
    let mut rules: Vec<(u32, Rule)> = ALLOWED.iter().map(|(_, nr)| (*nr, Rule::Allow)).collect();
    rules.extend([
        (libc::SYS_clone as u32, Rule::Clone),
        (libc::SYS_clone3 as u32, Rule::Clone3),
        (libc::SYS_socket as u32, Rule::Socket),
        (libc::SYS_personality as u32, Rule::Personality),
    ]);
    let mut p = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        jump(JMP_JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(RET_K, ret_errno(EPERM)),
        stmt(LD_W_ABS, OFF_NR),
        jump(JMP_JGE_K, X32_BIT, 0, 1),
        stmt(RET_K, ret_errno(EPERM)),
    ];
    p.extend(tree(&segments(rules)));
    p
}

#[cfg(not(target_arch = "x86_64"))]
pub fn program() -> Vec<libc::sock_filter> {
    Vec::new()
}

/// Installs `prog` on the calling thread (and what it execs). Needs `no_new_privs` or
/// `CAP_SYS_ADMIN`.
pub fn install(prog: &[libc::sock_filter]) -> std::io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` points at `prog`, alive for the call; the kernel copies it.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &fprog as *const libc::sock_fprog as libc::c_ulong,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The same rules as an OCI runtime config's `linux.seccomp` section.
#[cfg(target_arch = "x86_64")]
pub fn oci_profile() -> serde_json::Value {
    let names: Vec<&str> = ALLOWED
        .iter()
        .map(|(n, _)| n.strip_prefix("SYS_").unwrap_or(n))
        .collect();
    let personality: Vec<serde_json::Value> = PERSONALITIES
        .iter()
        .map(|v| {
            serde_json::json!({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": v, "op": "SCMP_CMP_EQ"}]})
        })
        .collect();
    let mut syscalls = vec![
        serde_json::json!({"names": names, "action": "SCMP_ACT_ALLOW"}),
        serde_json::json!({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}),
        serde_json::json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}),
        serde_json::json!({"names": ["socket"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_NE"}]}),
    ];
    syscalls.extend(personality);
    serde_json::json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": [OCI_ARCH],
        "syscalls": syscalls,
    })
}

#[cfg(not(target_arch = "x86_64"))]
pub fn oci_profile() -> serde_json::Value {
    serde_json::Value::Null
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Runs the program over one call the way the kernel would (classic BPF, the subset
    /// the builder emits), so the rules can be checked without installing them.
    fn run(p: &[libc::sock_filter], nr: u32, arch: u32, arg0: u64) -> u32 {
        let data = |off: u32| -> u32 {
            match off {
                OFF_NR => nr,
                OFF_ARCH => arch,
                OFF_ARG0_LO => arg0 as u32,
                20 => (arg0 >> 32) as u32,
                _ => panic!("load at {off}"),
            }
        };
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = p[pc];
            pc += 1;
            match i.code {
                LD_W_ABS => acc = data(i.k),
                RET_K => return i.k,
                BPF_JMP => pc += i.k as usize,
                JMP_JEQ_K | JMP_JGE_K | JMP_JSET_K | 0x25 => {
                    let t = match i.code {
                        JMP_JEQ_K => acc == i.k,
                        JMP_JGE_K => acc >= i.k,
                        0x25 => acc > i.k,
                        _ => acc & i.k != 0,
                    };
                    pc += if t { i.jt } else { i.jf } as usize;
                }
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn the_filter_allows_the_list_and_refuses_the_rest() {
        let p = program();
        assert!(p.len() < 4096, "the kernel's limit");
        let allow = |nr: i64, a: u64| run(&p, nr as u32, AUDIT_ARCH, a) == RET_ALLOW;
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_futex,
            libc::SYS_execve,
        ] {
            assert!(allow(nr, 0), "{nr}");
        }
        for nr in [
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_bpf,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_pivot_root,
            libc::SYS_chroot,
            libc::SYS_reboot,
            libc::SYS_io_uring_setup,
            libc::SYS_perf_event_open,
            libc::SYS_kexec_load,
        ] {
            assert_eq!(run(&p, nr as u32, AUDIT_ARCH, 0), ret_errno(EPERM), "{nr}");
        }
        // clone: threads and forks yes, namespaces no.
        let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
        assert!(allow(libc::SYS_clone, thread));
        assert!(!allow(libc::SYS_clone, libc::CLONE_NEWUSER as u64));
        assert!(!allow(
            libc::SYS_clone,
            (libc::CLONE_NEWNS | libc::SIGCHLD) as u64
        ));
        assert_eq!(
            run(&p, libc::SYS_clone3 as u32, AUDIT_ARCH, 0),
            ret_errno(ENOSYS)
        );
        assert!(allow(libc::SYS_socket, libc::AF_INET as u64));
        assert!(!allow(libc::SYS_socket, AF_VSOCK as u64));
        assert!(allow(libc::SYS_personality, 0xffff_ffff));
        assert!(!allow(libc::SYS_personality, 0x0040_0000)); // READ_IMPLIES_EXEC
                                                             // Other ABIs.
        assert!(!allow((X32_BIT | libc::SYS_read as u32) as i64, 0));
        assert_eq!(run(&p, 3, 0x4000_0003, 0), ret_errno(EPERM), "i386");
    }

    #[test]
    fn the_tree_answers_every_number_as_the_list_says_in_few_steps() {
        let p = program();
        let allowed: std::collections::HashSet<u32> = ALLOWED.iter().map(|(_, n)| *n).collect();
        for nr in 0..600u32 {
            let want = if allowed.contains(&nr)
                || nr == libc::SYS_clone as u32
                || nr == libc::SYS_socket as u32
            {
                RET_ALLOW
            } else if nr == libc::SYS_clone3 as u32 {
                ret_errno(ENOSYS)
            } else if nr == libc::SYS_personality as u32 {
                RET_ALLOW // argument 0 is PER_LINUX
            } else {
                ret_errno(EPERM)
            };
            assert_eq!(run(&p, nr, AUDIT_ARCH, 0), want, "syscall {nr}");
        }
        // The kernel interprets it once per number at install: keep that short.
        let longest = (0..600u32).map(|nr| steps(&p, nr)).max().unwrap();
        assert!(longest < 40, "{longest} instructions for one call");
        assert!(p.len() < 400, "{} instructions", p.len());
    }

    /// Instructions executed for one call (argument 0 zero).
    fn steps(p: &[libc::sock_filter], nr: u32) -> usize {
        let (mut pc, mut acc, mut n) = (0usize, 0u32, 0);
        loop {
            let i = p[pc];
            pc += 1;
            n += 1;
            match i.code {
                LD_W_ABS => {
                    acc = if i.k == OFF_NR {
                        nr
                    } else if i.k == OFF_ARCH {
                        AUDIT_ARCH
                    } else {
                        0
                    }
                }
                RET_K => return n,
                BPF_JMP => pc += i.k as usize,
                JMP_JEQ_K => pc += if acc == i.k { i.jt } else { i.jf } as usize,
                JMP_JGE_K => pc += if acc >= i.k { i.jt } else { i.jf } as usize,
                0x25 => pc += if acc > i.k { i.jt } else { i.jf } as usize,
                JMP_JSET_K => pc += if acc & i.k != 0 { i.jt } else { i.jf } as usize,
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn the_oci_profile_names_the_same_calls() {
        let v = oci_profile();
        let names = v["syscalls"][0]["names"].as_array().unwrap();
        assert_eq!(names.len(), ALLOWED.len());
        assert!(names.iter().any(|n| n == "read"));
        assert!(!names.iter().any(|n| n == "mount" || n == "io_uring_setup"));
        assert_eq!(v["syscalls"][1]["args"][0]["value"], NAMESPACE_FLAGS);
    }
}
