//! The device limit of a run on cgroup v2: an eBPF program of type
//! `BPF_PROG_TYPE_CGROUP_DEVICE` attached to the run's cgroup, which the kernel asks on
//! every open and `mknod` of a device file by a process in it. It allows the run's rules
//! (character devices by major and minor, any access) and refuses everything else, as the
//! v1 `devices` controller's `devices.deny a` plus `devices.allow` lines do. This is what
//! runc, crun and systemd generate on v2; here it is a few instructions per rule, written
//! out by hand, so no compiler or library is needed.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::cgroups::DeviceRule;

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

// Opcodes (linux/bpf.h, linux/bpf_common.h).
const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const ALU64_MOV_K: u8 = 0xb7;
const ALU64_AND_K: u8 = 0x57;
const JMP_JNE_K: u8 = 0x55;
const JMP_EXIT: u8 = 0x95;

/// `bpf_cgroup_dev_ctx.access_type`'s low half for a character device.
const DEVCG_DEV_CHAR: i32 = 2;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

/// The program for `rules`: r2 = the device's type, r4 = major, r5 = minor (the kind of
/// access is not looked at: a rule allows read, write and mknod, as `rwm` does on v1);
/// each rule a run of tests that falls through to `return 1`, or skips to the next rule;
/// `return 0` at the end.
fn program(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0), // r2 = ctx->access_type
        insn(ALU64_AND_K, 2, 0, 0, 0xffff),
        insn(LDX_MEM_W, 4, 1, 4, 0), // r4 = ctx->major
        insn(LDX_MEM_W, 5, 1, 8, 0), // r5 = ctx->minor
    ];
    for r in rules {
        let tests: Vec<(u8, i32)> = [
            Some((2u8, DEVCG_DEV_CHAR)),
            Some((4u8, r.major as i32)),
            r.minor.map(|m| (5u8, m as i32)),
        ]
        .into_iter()
        .flatten()
        .collect();
        // After the tests: r0 = 1, exit (2 instructions).
        let n = tests.len();
        for (i, (reg, v)) in tests.into_iter().enumerate() {
            // Skip the remaining tests and the two of the allow.
            let skip = (n - i - 1) as i16 + 2;
            p.push(insn(JMP_JNE_K, reg, 0, skip, v));
        }
        p.push(insn(ALU64_MOV_K, 0, 0, 0, 1));
        p.push(insn(JMP_EXIT, 0, 0, 0, 0));
    }
    p.push(insn(ALU64_MOV_K, 0, 0, 0, 0));
    p.push(insn(JMP_EXIT, 0, 0, 0, 0));
    p
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<i64> {
    // SAFETY: bpf(2) with a zero-padded `union bpf_attr` of 128 bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr() as *mut libc::c_void,
            std::mem::size_of_val(attr),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// Loads the program for `rules`; the verifier's log is in the error.
pub fn load(rules: &[DeviceRule]) -> Result<OwnedFd, String> {
    let prog = program(rules);
    let license = c"Apache-2.0";
    let mut log = vec![0u8; 4096];
    let mut attr = [0u64; 16];
    // union bpf_attr for BPF_PROG_LOAD: prog_type u32, insn_cnt u32, insns u64,
    // license u64, log_level u32, log_size u32, log_buf u64.
    attr[0] = BPF_PROG_TYPE_CGROUP_DEVICE as u64 | ((prog.len() as u64) << 32);
    attr[1] = prog.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    attr[3] = 1 | ((log.len() as u64) << 32);
    attr[4] = log.as_mut_ptr() as u64;
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: a new descriptor we own.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let why = String::from_utf8_lossy(&log[..end]).trim().to_string();
            Err(if why.is_empty() {
                format!("loading the device filter: {e}")
            } else {
                format!("loading the device filter: {e}: {why}")
            })
        }
    }
}

/// Attaches a loaded filter to the cgroup folder `dir`.
pub fn attach(prog: &OwnedFd, dir: &Path) -> Result<(), String> {
    let d = std::fs::File::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut attr = [0u64; 16];
    // target_fd u32, attach_bpf_fd u32, attach_type u32, attach_flags u32.
    attr[0] = d.as_raw_fd() as u64 | ((prog.as_raw_fd() as u64) << 32);
    attr[1] = BPF_CGROUP_DEVICE as u64;
    bpf(BPF_PROG_ATTACH, &mut attr)
        .map(|_| ())
        .map_err(|e| format!("attaching the device filter to {}: {e}", dir.display()))
}

/// Limits the cgroup `dir` to `rules`.
pub fn limit(dir: &Path, rules: &[DeviceRule]) -> Result<(), String> {
    let p = load(rules)?;
    attach(&p, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_jumps_past_itself_when_a_test_fails() {
        let p = program(&[
            DeviceRule {
                major: 1,
                minor: Some(3),
            },
            DeviceRule {
                major: 136,
                minor: None,
            },
        ]);
        // 4 loads, rule 1: 3 tests + 2, rule 2: 2 tests + 2, the final 2.
        assert_eq!(p.len(), 4 + 5 + 4 + 2);
        assert_eq!(p[4], insn(JMP_JNE_K, 2, 0, 4, DEVCG_DEV_CHAR));
        assert_eq!(p[5], insn(JMP_JNE_K, 4, 0, 3, 1));
        assert_eq!(p[6], insn(JMP_JNE_K, 5, 0, 2, 3));
        assert_eq!(p[9], insn(JMP_JNE_K, 2, 0, 3, DEVCG_DEV_CHAR));
        assert_eq!(p[10], insn(JMP_JNE_K, 4, 0, 2, 136));
        assert_eq!(p[13], insn(ALU64_MOV_K, 0, 0, 0, 0));
    }

    /// A cgroup v2 folder to try the filter in: the unified hierarchy at the root (v2) or
    /// beside the v1 controllers (hybrid).
    fn cgroup2_root() -> Option<std::path::PathBuf> {
        ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.controllers").exists())
    }

    #[test]
    fn a_process_in_a_filtered_cgroup_opens_only_the_allowed_devices() {
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let Some(root) = cgroup2_root() else {
            eprintln!("skipped: no cgroup v2 hierarchy mounted");
            return;
        };
        let dir = root.join(format!("caravel-devfilter-test-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        struct Rm(std::path::PathBuf);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir(&self.0);
            }
        }
        let _rm = Rm(dir.clone());
        // /dev/null only.
        limit(
            &dir,
            &[DeviceRule {
                major: 1,
                minor: Some(3),
            }],
        )
        .unwrap();
        let procs = std::ffi::CString::new(dir.join("cgroup.procs").to_str().unwrap()).unwrap();
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args([
            "-c",
            "head -c1 /dev/zero >/dev/null 2>&1 || echo zero-refused; echo x > /dev/null && echo null-allowed",
        ]);
        use std::os::unix::process::CommandExt;
        // SAFETY: open/write/close are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::write(fd, b"0".as_ptr() as *const libc::c_void, 1);
                libc::close(fd);
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "zero-refused\nnull-allowed\n",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
