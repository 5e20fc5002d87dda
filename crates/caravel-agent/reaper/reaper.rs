//! The process that stays PID 1 of a sandboxed task's PID namespace once the task runs:
//! it reaps whatever the task orphans, and when the task's own process ends it writes
//! `exit <wait status>` to descriptor 4 (the agent's status pipe) and exits, which ends
//! the namespace and kills anything the task left.
//!
//! `argv[1]` is the task's pid (as this namespace numbers it). It has no signal handler,
//! so as a namespace's init it ignores every signal but SIGKILL from outside: the agent's
//! SIGTERM reaches the task, not this.
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
    pub const WRITE: usize = 1;
    pub const WAIT4: usize = 61;
    pub const EXIT_GROUP: usize = 231;
}

#[cfg(target_arch = "aarch64")]
mod nr {
    pub const WRITE: usize = 64;
    pub const WAIT4: usize = 260;
    pub const EXIT_GROUP: usize = 94;
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
            let mut line = [0u8; 24];
            let mut n = 0;
            for &b in b"exit " {
                line[n] = b;
                n += 1;
            }
            let mut digits = [0u8; 12];
            let mut k = 0;
            let mut v = status as u32;
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
            syscall4(nr::WRITE, STATUS_FD, line.as_ptr() as usize, n, 0);
            let code = if status & 0x7f == 0 {
                (status >> 8) & 0xff
            } else {
                128 + (status & 0x7f)
            };
            exit(code as usize);
        }
        if r < 0 && r != -EINTR {
            exit(127);
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
