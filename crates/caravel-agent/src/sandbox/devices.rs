//! Which device files a run's GPUs are, so that a sandboxed task sees and may open those
//! and no others: `CUDA_VISIBLE_DEVICES` is a hint to the CUDA runtime, this is the
//! boundary (the device nodes in its `/dev`, and its cgroup's device rules).
//!
//! NVIDIA GPUs are `/dev/nvidia<minor>` (character major 195), and every task with any
//! GPU also needs the driver's control devices (`nvidiactl`, `nvidia-uvm`,
//! `nvidia-uvm-tools`, `nvidia-modeset`). GPUs declared with `--gpus` have no driver; an
//! operator may name a device file for each (`--gpu-devices`), which tests use as
//! stand-ins.

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::DevNode;
use crate::cgroups::DeviceRule;

/// The driver's shared device files, where they exist.
const NVIDIA_CONTROL: [&str; 4] = [
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
];

#[derive(Debug, Clone, Default)]
pub struct GpuDevices {
    /// Per GPU index, its own device files.
    per_gpu: BTreeMap<u32, Vec<DevNode>>,
    /// Files every task with a GPU gets.
    shared: Vec<DevNode>,
}

/// The node a character device file is, named as it is under `/dev` (its file name for
/// files elsewhere).
pub fn char_device(path: &Path) -> Result<DevNode, String> {
    let m = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !m.file_type().is_char_device() {
        return Err(format!("{} is not a character device", path.display()));
    }
    let rdev = m.rdev();
    let name = path
        .strip_prefix("/dev")
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
        .or_else(|| path.file_name().map(|n| n.to_string_lossy().into_owned()))
        .ok_or_else(|| format!("{} has no file name", path.display()))?;
    Ok(DevNode {
        name,
        major: libc::major(rdev),
        minor: libc::minor(rdev),
    })
}

impl GpuDevices {
    /// `nvidia`: (GPU index, device minor) of the GPUs NVML found; `declared`: (GPU
    /// index, device file) of declared GPUs given one.
    pub fn discover(
        nvidia: &[(u32, u32)],
        declared: &[(u32, PathBuf)],
    ) -> Result<GpuDevices, String> {
        let mut d = GpuDevices::default();
        for (index, minor) in nvidia {
            let p = PathBuf::from(format!("/dev/nvidia{minor}"));
            d.per_gpu.insert(*index, vec![char_device(&p)?]);
        }
        if !nvidia.is_empty() {
            for c in NVIDIA_CONTROL {
                if let Ok(n) = char_device(Path::new(c)) {
                    d.shared.push(n);
                }
            }
        }
        for (index, path) in declared {
            d.per_gpu.insert(*index, vec![char_device(path)?]);
        }
        Ok(d)
    }

    /// The device files of a run holding `gpus`, and the rules that let it open them.
    pub fn for_run(&self, gpus: &[u32]) -> Vec<DevNode> {
        let mut out = Vec::new();
        for g in gpus {
            if let Some(v) = self.per_gpu.get(g) {
                out.extend(v.iter().cloned());
            }
        }
        if !gpus.is_empty() {
            out.extend(self.shared.iter().cloned());
        }
        out
    }
}

/// The cgroup rules for a sandboxed run: the standard devices and `nodes`.
pub fn rules(nodes: &[DevNode]) -> Vec<DeviceRule> {
    let mut r = crate::cgroups::STANDARD_DEVICES.to_vec();
    r.extend(nodes.iter().map(|n| DeviceRule {
        major: n.major,
        minor: Some(n.minor),
    }));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_gets_its_own_gpus_files_only() {
        // /dev/null and /dev/zero stand in for two declared GPUs.
        let d =
            GpuDevices::discover(&[], &[(0, "/dev/null".into()), (1, "/dev/zero".into())]).unwrap();
        let one = d.for_run(&[1]);
        assert_eq!(
            one,
            vec![DevNode {
                name: "zero".into(),
                major: 1,
                minor: 5
            }]
        );
        assert!(d.for_run(&[]).is_empty());
        let r = rules(&one);
        assert!(r.contains(&DeviceRule {
            major: 1,
            minor: Some(5)
        }));
        assert_eq!(r.len(), crate::cgroups::STANDARD_DEVICES.len() + 1);
        let e = GpuDevices::discover(&[], &[(0, "/etc/hostname".into())]).unwrap_err();
        assert!(e.contains("not a character device"), "{e}");
    }
}
