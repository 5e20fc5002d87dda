//! The process that stays PID 1 of a sandboxed task's PID namespace once the task runs:
//! it reaps whatever the task orphans, and when the task's own process ends it writes
//! `exit <wait status>` to descriptor 4 (the agent's status pipe) and exits, which ends
//! the namespace and kills anything the task left.
//!
//! `argv[1]` is the task's pid (as this namespace numbers it). It has no signal handler,
//! so as a namespace's init it ignores every signal but SIGKILL from outside: the agent's
//! SIGTERM reaches the task, not this.
//!
//! In an OCI container (`argv[1]` is `--`) it is the container's init and starts the task
//! itself: it says `ready` on its status descriptor (3), waits for a byte on descriptor 4
//! (the agent moves it into the run's cgroups meanwhile: the runtime's own work is not
//! the task's to pay for), then forks, and the child execs `argv[2..]` (an absolute path,
//! resolved by the agent) with the signal mask cleared and descriptor 3 closed. The
//! runtime passes both with `--preserve-fds 2`. It forwards the signals a
//! runtime relays (`HUP`, `INT`, `QUIT`, `USR1`, `USR2`, `TERM`) to every other process
//! of the container, read from a signalfd: a namespace's init that ignored them would
//! leave the task to be killed at the end of its grace period. `--` alone exits 0 (the
//! agent's probe of the runtime).
//!
//! Freestanding (no C library, no Rust standard library): built by the agent crate's
//! `build.rs` into a static executable of a few kilobytes, so that starting it costs
//! almost nothing. A sandbox is started for every task; a program linked against libc
//! would pay the dynamic loader and libc's start-up (its CPU probing traps in a virtual
//! machine) for every one.

#![no_std]
#![no_main]

use core::arch::{asm, global_asm};

#[cfg(target_arch = "x86_64")]
global_asm!(
    ".globl _start",
    "_start:",
    "xor rbp, rbp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call reaper_main",
    "ud2",
);

#[cfg(target_arch = "aarch64")]
global_asm!(
    ".globl _start",
    "_start:",
    "mov x29, #0",
    "mov x30, #0",
    "mov x0, sp",
    "and sp, x0, #-16",
    "bl reaper_main",
    "brk #0",
);

#[cfg(target_arch = "x86_64")]
mod nr {
    pub const READ: usize = 0;
    pub const WRITE: usize = 1;
    pub const CLOSE: usize = 3;
    pub const RT_SIGPROCMASK: usize = 14;
    pub const CLONE: usize = 56;
    pub const EXECVE: usize = 59;
    pub const WAIT4: usize = 61;
    pub const KILL: usize = 62;
    pub const GETPID: usize = 39;
    pub const EXIT_GROUP: usize = 231;
    pub const SIGNALFD4: usize = 289;
}

#[cfg(target_arch = "aarch64")]
mod nr {
    pub const READ: usize = 63;
    pub const WRITE: usize = 64;
    pub const CLOSE: usize = 57;
    pub const RT_SIGPROCMASK: usize = 135;
    pub const CLONE: usize = 220;
    pub const EXECVE: usize = 221;
    pub const WAIT4: usize = 260;
    pub const KILL: usize = 129;
    pub const GETPID: usize = 172;
    pub const EXIT_GROUP: usize = 94;
    pub const SIGNALFD4: usize = 74;
}

#[cfg(target_arch = "x86_64")]
unsafe fn syscall4(n: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
    let r: isize;
    asm!("syscall", inlateout("rax") n as isize => r, in("rdi") a, in("rsi") b, in("rdx") c,
         in("r10") d, lateout("rcx") _, lateout("r11") _, options(nostack));
    r
}

#[cfg(target_arch = "aarch64")]
unsafe fn syscall4(n: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
    let r: isize;
    asm!("svc 0", in("x8") n, inlateout("x0") a as isize => r, in("x1") b, in("x2") c,
         in("x3") d, options(nostack));
    r
}

const EINTR: isize = 4;
const STATUS_FD: usize = 4;
/// The status descriptor in a container.
const OCI_STATUS_FD: usize = 3;
/// Where a container's init waits for the agent's go (one byte) before it starts the task.
const OCI_GO_FD: usize = 4;
const SIGCHLD: usize = 17;
const WNOHANG: usize = 1;
/// Signals forwarded in a container, as a mask (bit `n - 1` for signal `n`).
const FORWARDED: u64 = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 9) | (1 << 11) | (1 << 14);

fn exit(code: usize) -> ! {
    // SAFETY: exit_group ends the process.
    unsafe {
        syscall4(nr::EXIT_GROUP, code, 0, 0, 0);
    }
    loop {}
}

/// # Safety
/// Called once, from `_start`, with the initial stack pointer.
#[no_mangle]
unsafe extern "C" fn reaper_main(sp: *const usize) -> ! {
    let argc = *sp;
    let argv = sp.add(1) as *const *const u8;
    if argc > 1 && cstr_eq(*argv.add(1), b"--") {
        if argc == 2 {
            exit(0);
        }
        // Forwarding a signal to "every other process" is safe only as a namespace's init.
        if syscall4(nr::GETPID, 0, 0, 0, 0) != 1 {
            write_line(2, b"caravel: the container init must be PID 1, not ", syscall4(nr::GETPID, 0, 0, 0, 0) as u32);
            exit(127);
        }
        container_init(argc, argv);
    }
    let mut task: isize = -1;
    if argc > 1 {
        task = 0;
        let mut p = *argv.add(1);
        while *p != 0 {
            if !(*p).is_ascii_digit() {
                exit(127);
            }
            task = task * 10 + (*p - b'0') as isize;
            p = p.add(1);
        }
    }
    loop {
        let mut status: i32 = 0;
        let r = syscall4(nr::WAIT4, usize::MAX, &mut status as *mut i32 as usize, 0, 0);
        if r == task {
            report(STATUS_FD, status);
        }
        if r < 0 && r != -EINTR {
            exit(127);
        }
    }
}

/// Writes `<prefix><number>` and a newline to `fd`: the number and newline in one write
/// (a status line is `exit ` and that, short enough that the pipe takes it whole).
unsafe fn write_line(fd: usize, prefix: &[u8], v: u32) {
    let mut line = [0u8; 24];
    let mut n = 0;
    if prefix == b"exit " {
        for &b in prefix {
            line[n] = b;
            n += 1;
        }
    } else {
        syscall4(nr::WRITE, fd, prefix.as_ptr() as usize, prefix.len(), 0);
    }
    let mut digits = [0u8; 12];
    let mut k = 0;
    let mut v = v;
    loop {
        digits[k] = b'0' + (v % 10) as u8;
        k += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while k > 0 {
        k -= 1;
        line[n] = digits[k];
        n += 1;
    }
    line[n] = b'\n';
    n += 1;
    syscall4(nr::WRITE, fd, line.as_ptr() as usize, n, 0);
}

/// Tells the agent how the task ended and ends the same way (as far as an exit code can).
unsafe fn report(fd: usize, status: i32) -> ! {
    write_line(fd, b"exit ", status as u32);
    let code = if status & 0x7f == 0 {
        (status >> 8) & 0xff
    } else {
        128 + (status & 0x7f)
    };
    exit(code as usize)
}

unsafe fn cstr_eq(p: *const u8, s: &[u8]) -> bool {
    for (i, &b) in s.iter().enumerate() {
        if *p.add(i) != b {
            return false;
        }
    }
    *p.add(s.len()) == 0
}

/// A container's init: starts `argv[2..]` and stays, forwarding signals and reaping.
unsafe fn container_init(argc: usize, argv: *const *const u8) -> ! {
    let envp = argv.add(argc + 1);
    // The runtime did its work outside the run's cgroups; the agent now moves this
    // process into them and says go. Nothing of the task runs before.
    syscall4(nr::WRITE, OCI_STATUS_FD, b"ready\n".as_ptr() as usize, 6, 0);
    let mut go = 0u8;
    loop {
        let n = syscall4(nr::READ, OCI_GO_FD, &mut go as *mut u8 as usize, 1, 0);
        if n == -EINTR {
            continue;
        }
        if n != 1 {
            exit(127);
        }
        break;
    }
    syscall4(nr::CLOSE, OCI_GO_FD, 0, 0, 0);
    let mask: u64 = FORWARDED | (1 << (SIGCHLD - 1));
    // Blocked before the fork: a child that ends at once still leaves its SIGCHLD
    // pending, for the signalfd made after.
    syscall4(nr::RT_SIGPROCMASK, 0, &mask as *const u64 as usize, 0, 8);
    let pid = syscall4(nr::CLONE, SIGCHLD, 0, 0, 0);
    if pid == 0 {
        let none: u64 = 0;
        syscall4(nr::RT_SIGPROCMASK, 2, &none as *const u64 as usize, 0, 8);
        syscall4(nr::CLOSE, OCI_STATUS_FD, 0, 0, 0);
        let prog = *argv.add(2);
        let r = syscall4(nr::EXECVE, prog as usize, argv.add(2) as usize, envp as usize, 0);
        write_line(2, b"caravel: the task's program could not be executed: errno ", (-r) as u32);
        exit(127);
    }
    if pid < 0 {
        write_line(2, b"caravel: the task could not be started: errno ", (-pid) as u32);
        exit(127);
    }
    let sfd = syscall4(nr::SIGNALFD4, usize::MAX, &mask as *const u64 as usize, 8, 0);
    if sfd < 0 {
        exit(127);
    }
    loop {
        // struct signalfd_siginfo: 128 bytes, the signal number first.
        // Left uninitialised: zeroing it would need `memset`, which this program lacks.
        let mut info = core::mem::MaybeUninit::<[u32; 32]>::uninit();
        let n = syscall4(nr::READ, sfd as usize, info.as_mut_ptr() as usize, 128, 0);
        if n < 0 {
            if n == -EINTR {
                continue;
            }
            exit(127);
        }
        // SAFETY: the kernel wrote the whole struct (a signalfd read is all or nothing).
        let sig = (*info.as_ptr())[0] as usize;
        if sig != SIGCHLD {
            // -1: every process of the namespace but this one.
            syscall4(nr::KILL, usize::MAX, sig, 0, 0);
            continue;
        }
        loop {
            let mut status: i32 = 0;
            let r = syscall4(nr::WAIT4, usize::MAX, &mut status as *mut i32 as usize, WNOHANG, 0);
            if r == pid {
                report(OCI_STATUS_FD, status);
            }
            if r <= 0 {
                break;
            }
        }
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    exit(127)
}

/// The precompiled `core` refers to it for unwinding, which never happens here (panics
/// abort).
#[no_mangle]
extern "C" fn rust_eh_personality() {}
