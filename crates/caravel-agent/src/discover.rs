//! What the machine has: CPUs and memory from the kernel, NVIDIA GPUs through NVML when
//! the driver library is present. No NVML is not an error: the agent then offers the GPUs
//! declared with `--gpus`, if any.

use caravel_core::Device;

pub fn cpus_milli() -> u64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1)
        * 1000
}

pub fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(1 << 30)
}

/// Short model name from NVML's device name: "NVIDIA H100 80GB HBM3" -> "H100",
/// "NVIDIA A100-SXM4-80GB" -> "A100", "Tesla T4" -> "T4", "NVIDIA GeForce RTX 4090" -> "RTX4090".
pub fn short_model(name: &str) -> String {
    let words: Vec<&str> = name
        .split_whitespace()
        .filter(|w| !matches!(*w, "NVIDIA" | "Tesla" | "GeForce" | "Quadro"))
        .collect();
    let Some(first) = words.first() else {
        return "GPU".into();
    };
    let first = first.split('-').next().unwrap_or(first);
    let model = if matches!(first, "RTX" | "GTX") && words.len() > 1 {
        format!("{first}{}", words[1])
    } else {
        first.to_string()
    };
    let clean: String = model
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || *c == '.')
        .take(32)
        .collect();
    if clean.is_empty() {
        "GPU".into()
    } else {
        clean
    }
}

/// Lists NVIDIA GPUs through NVML (`nvml-wrapper`, which loads `libnvidia-ml.so.1` at run
/// time, so a node without the driver runs and says why), each with the minor number of
/// its device file (`/dev/nvidia<minor>`) when NVML tells it. `Err` says why there are none.
pub fn nvml_devices() -> Result<Vec<(Device, Option<u32>)>, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML not available: {e}"))?;
    let n = nvml
        .device_count()
        .map_err(|e| format!("nvmlDeviceGetCount failed: {e}"))?;
    let mut out = Vec::new();
    for i in 0..n {
        let Ok(d) = nvml.device_by_index(i) else {
            continue;
        };
        let Ok(name) = d.name() else {
            continue;
        };
        out.push((
            Device {
                index: i,
                model: short_model(&name),
            },
            d.minor_number().ok(),
        ));
    }
    // Dropping `nvml` shuts NVML down.
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names() {
        assert_eq!(short_model("NVIDIA H100 80GB HBM3"), "H100");
        assert_eq!(short_model("NVIDIA A100-SXM4-80GB"), "A100");
        assert_eq!(short_model("Tesla T4"), "T4");
        assert_eq!(short_model("NVIDIA GeForce RTX 4090"), "RTX4090");
        assert_eq!(short_model("NVIDIA H200"), "H200");
        assert_eq!(short_model(""), "GPU");
    }

    #[test]
    fn machine_has_cpus_and_memory() {
        assert!(cpus_milli() >= 1000);
        assert!(memory_bytes() > 1 << 20);
    }

    #[test]
    fn no_nvml_is_not_a_panic() {
        // On machines without the driver this is an error that says what is missing;
        // with it, a list of devices that each have a model and memory.
        match nvml_devices() {
            Err(e) => assert!(!e.trim().is_empty()),
            Ok(devs) => assert!(devs.iter().all(|(d, _)| !d.model.is_empty())),
        }
    }
}
