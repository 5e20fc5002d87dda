//! Builds the sandbox's reaper (`reaper/reaper.rs`): a freestanding static executable the
//! agent embeds and runs as PID 1 of every sandboxed task (see that file for why it is
//! not part of this crate's code). Built with the same `rustc`, for the same target.
//! Where it cannot be built (an architecture it has no start code for), the agent gets
//! an empty file and reports that it cannot sandbox.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=reaper/reaper.rs");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("caravel-reaper");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target = std::env::var("TARGET").unwrap_or_default();
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let built = os == "linux"
        && (arch == "x86_64" || arch == "aarch64")
        && Command::new(&rustc)
            .args([
                "--edition=2021",
                "--crate-type=bin",
                "--crate-name=caravel_reaper",
                "--target",
                &target,
                "-C",
                "opt-level=s",
                "-C",
                "panic=abort",
                "-C",
                "relocation-model=static",
                "-C",
                "debuginfo=0",
                "-C",
                "strip=symbols",
                "-C",
                "link-arg=-nostartfiles",
                "-C",
                "link-arg=-nostdlib",
                "-C",
                "link-arg=-static",
                "-o",
            ])
            .arg(&out)
            .arg("reaper/reaper.rs")
            .status()
            .is_ok_and(|s| s.success());
    if !built {
        println!("cargo:warning=the sandbox reaper was not built for {target}: agents here cannot sandbox");
        std::fs::write(&out, b"").expect("writing an empty reaper");
    }
}
