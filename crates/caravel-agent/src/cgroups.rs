//! CPU and memory limits through cgroups, v2 or v1, detected at run time. Where neither is
//! usable the agent runs tasks without limits and says so once at start.
//!
//! Layout: `<root>/caravel/<agent name>/run-<id>` (v1: under both the `cpu` and `memory`
//! hierarchies). Naming the agent's folder by node name lets a restarted agent find and
//! kill copies left behind by its previous life.

use std::ffi::CString;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub enum Cgroups {
    V2 {
        base: PathBuf,
        /// The `pids` controller is enabled below `base`.
        pids: bool,
    },
    V1 {
        cpu: PathBuf,
        memory: PathBuf,
        /// The agent's folders in the `pids` and `devices` hierarchies, where mounted.
        pids: Option<PathBuf>,
        devices: Option<PathBuf>,
    },
    None {
        why: String,
    },
}

/// A character device a run may open (`minor` `None`: every minor of `major`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRule {
    pub major: u32,
    pub minor: Option<u32>,
}

/// What a sandboxed run's cgroups hold it to beyond CPU and memory.
#[derive(Debug, Clone, Default)]
pub struct RunLimits {
    /// Most processes and threads at once (a fork bomb stops there).
    pub pids_max: Option<u64>,
    /// The only devices it may open; `None`: no device rules.
    pub devices: Option<Vec<DeviceRule>>,
}

/// The devices every sandboxed task may use: null, zero, full, random, urandom, tty,
/// the pseudo-terminal multiplexer and its terminals.
pub const STANDARD_DEVICES: [DeviceRule; 8] = [
    DeviceRule {
        major: 1,
        minor: Some(3),
    },
    DeviceRule {
        major: 1,
        minor: Some(5),
    },
    DeviceRule {
        major: 1,
        minor: Some(7),
    },
    DeviceRule {
        major: 1,
        minor: Some(8),
    },
    DeviceRule {
        major: 1,
        minor: Some(9),
    },
    DeviceRule {
        major: 5,
        minor: Some(0),
    },
    DeviceRule {
        major: 5,
        minor: Some(2),
    },
    DeviceRule {
        major: 136,
        minor: None,
    },
];

/// The cgroup folders of one run, and open `cgroup.procs` paths for the child to join.
#[derive(Debug, Clone, Default)]
pub struct RunCgroup {
    pub dirs: Vec<PathBuf>,
    /// The controller each of `dirs` belongs to (see `controller_dirs`).
    pub names: Vec<String>,
}

fn write(p: &Path, v: &str) -> std::io::Result<()> {
    std::fs::write(p, v)
}

/// Makes a run's cgroup folder, readable by all (the agent's umask would make it root's
/// alone): a sandboxed task sees its own folder and reads its limits there, and no other
/// run's, since the agent's folder above stays private.
fn make_run_dir(d: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(d)?;
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
}

fn is_cgroup2(p: &Path) -> bool {
    p.join("cgroup.controllers").exists()
}

impl Cgroups {
    pub fn detect(agent: &str) -> Cgroups {
        Self::detect_at(Path::new("/sys/fs/cgroup"), agent)
    }

    pub fn detect_at(root: &Path, agent: &str) -> Cgroups {
        // v2: the unified hierarchy at the root, with the cpu and memory controllers.
        if is_cgroup2(root) {
            let ctrl = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            if ctrl.split_whitespace().any(|c| c == "cpu")
                && ctrl.split_whitespace().any(|c| c == "memory")
            {
                let top = root.join("caravel");
                let base = top.join(agent);
                let want_pids = ctrl.split_whitespace().any(|c| c == "pids");
                let r = (|| -> std::io::Result<bool> {
                    std::fs::create_dir_all(&base)?;
                    let _ = write(&root.join("cgroup.subtree_control"), "+cpu +memory");
                    write(&top.join("cgroup.subtree_control"), "+cpu +memory")?;
                    write(&base.join("cgroup.subtree_control"), "+cpu +memory")?;
                    // Best effort: without it, runs have no process limit (and the node
                    // says so).
                    let pids = want_pids
                        && write(&root.join("cgroup.subtree_control"), "+pids").is_ok()
                        && write(&top.join("cgroup.subtree_control"), "+pids").is_ok()
                        && write(&base.join("cgroup.subtree_control"), "+pids").is_ok();
                    Ok(pids)
                })();
                return match r {
                    Ok(pids) => Cgroups::V2 { base, pids },
                    Err(e) => Cgroups::None {
                        why: format!("cgroup v2 at {} is not writable: {e}", root.display()),
                    },
                };
            }
            return Cgroups::None {
                why: format!(
                    "cgroup v2 at {} lacks the cpu or memory controller",
                    root.display()
                ),
            };
        }
        let (cpu, mem) = (root.join("cpu"), root.join("memory"));
        if cpu.join("cpu.cfs_quota_us").exists() && mem.join("memory.limit_in_bytes").exists() {
            let cpu = cpu.join("caravel").join(agent);
            let memory = mem.join("caravel").join(agent);
            let optional = |ctrl: &str, file: &str| {
                let h = root.join(ctrl);
                if !h.join(file).exists() {
                    return None;
                }
                let d = h.join("caravel").join(agent);
                std::fs::create_dir_all(&d).ok().map(|_| d)
            };
            let pids = optional("pids", "cgroup.procs");
            let devices = optional("devices", "devices.allow");
            return match std::fs::create_dir_all(&cpu)
                .and_then(|_| std::fs::create_dir_all(&memory))
            {
                Ok(()) => Cgroups::V1 {
                    cpu,
                    memory,
                    pids,
                    devices,
                },
                Err(e) => Cgroups::None {
                    why: format!("cgroup v1 at {} is not writable: {e}", root.display()),
                },
            };
        }
        Cgroups::None {
            why: format!(
                "no cgroup v1 cpu+memory or v2 hierarchy under {}",
                root.display()
            ),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Cgroups::V2 { base, .. } => format!("cgroup v2 at {}", base.display()),
            Cgroups::V1 { cpu, memory, .. } => {
                format!("cgroup v1 at {} and {}", cpu.display(), memory.display())
            }
            Cgroups::None { why } => format!("none ({why})"),
        }
    }

    /// The names a run's cgroup folders have (`RunCgroup::controller_dirs`), for the
    /// sandbox's mount points: every controller a sandboxed run may get.
    pub fn controller_names(&self) -> Vec<String> {
        match self {
            Cgroups::V2 { .. } => vec![".".into()],
            Cgroups::V1 { pids, devices, .. } => {
                let mut v = vec!["cpu".to_string(), "memory".to_string()];
                if pids.is_some() {
                    v.push("pids".into());
                }
                if devices.is_some() {
                    v.push("devices".into());
                }
                v
            }
            Cgroups::None { .. } => vec![],
        }
    }

    /// The resource controls runs get here, and those they do not, in words.
    pub fn missing(&self) -> Vec<String> {
        match self {
            Cgroups::None { why } => {
                vec![format!("cpu, memory, process and device limits ({why})")]
            }
            Cgroups::V2 { pids, .. } => {
                let mut m = Vec::new();
                if let Err(e) = crate::devfilter::load(&STANDARD_DEVICES) {
                    m.push(format!("device limits (the cgroup v2 device filter: {e})"));
                }
                if !pids {
                    m.push(
                        "process limits (the cgroup v2 pids controller is not available)".into(),
                    );
                }
                m
            }
            Cgroups::V1 { pids, devices, .. } => {
                let mut m = Vec::new();
                if pids.is_none() {
                    m.push("process limits (no cgroup v1 pids hierarchy)".to_string());
                }
                if devices.is_none() {
                    m.push("device limits (no cgroup v1 devices hierarchy)".to_string());
                }
                m
            }
        }
    }

    fn bases(&self) -> Vec<PathBuf> {
        match self {
            Cgroups::V2 { base, .. } => vec![base.clone()],
            Cgroups::V1 {
                cpu,
                memory,
                pids,
                devices,
            } => {
                let mut v = vec![cpu.clone(), memory.clone()];
                v.extend(pids.iter().cloned());
                v.extend(devices.iter().cloned());
                v
            }
            Cgroups::None { .. } => vec![],
        }
    }

    /// Creates the run's cgroups with its limits.
    pub fn create(
        &self,
        run: u64,
        cpu_milli: u64,
        memory_bytes: u64,
        limits: &RunLimits,
    ) -> std::io::Result<RunCgroup> {
        let name = format!("run-{run}");
        let quota = (cpu_milli * 100).max(1000); // period 100 ms
        match self {
            Cgroups::V2 { base, pids } => {
                let d = base.join(&name);
                make_run_dir(&d)?;
                let rc = RunCgroup {
                    dirs: vec![d.clone()],
                    names: vec![".".into()],
                };
                let set = || -> std::io::Result<()> {
                    write(&d.join("cpu.max"), &format!("{quota} 100000"))?;
                    write(&d.join("memory.max"), &memory_bytes.to_string())?;
                    let _ = write(&d.join("memory.swap.max"), "0");
                    if let (true, Some(n)) = (pids, limits.pids_max) {
                        write(&d.join("pids.max"), &n.to_string())?;
                    }
                    if let Some(rules) = &limits.devices {
                        // Before any of the run's processes joins.
                        crate::devfilter::limit(&d, rules).map_err(std::io::Error::other)?;
                    }
                    Ok(())
                };
                set().inspect_err(|_| rc.remove())?;
                Ok(rc)
            }
            Cgroups::V1 {
                cpu,
                memory,
                pids,
                devices,
            } => {
                let c = cpu.join(&name);
                let m = memory.join(&name);
                let mut rc = RunCgroup {
                    dirs: vec![c.clone(), m.clone()],
                    names: vec!["cpu".into(), "memory".into()],
                };
                let p = pids.as_ref().map(|p| p.join(&name));
                let dv = match (devices, &limits.devices) {
                    (Some(d), Some(_)) => Some(d.join(&name)),
                    _ => None,
                };
                for (dir, n) in [(&p, "pids"), (&dv, "devices")] {
                    if let Some(dir) = dir {
                        rc.dirs.push(dir.clone());
                        rc.names.push(n.into());
                    }
                }
                let set = || -> std::io::Result<()> {
                    for d in &rc.dirs {
                        make_run_dir(d)?;
                    }
                    write(&c.join("cpu.cfs_period_us"), "100000")?;
                    write(&c.join("cpu.cfs_quota_us"), &quota.to_string())?;
                    write(&m.join("memory.limit_in_bytes"), &memory_bytes.to_string())?;
                    if let (Some(p), Some(n)) = (&p, limits.pids_max) {
                        write(&p.join("pids.max"), &n.to_string())?;
                    }
                    if let (Some(d), Some(rules)) = (&dv, &limits.devices) {
                        // Everything off, then what the run may use, before any of its
                        // processes joins.
                        write(&d.join("devices.deny"), "a")?;
                        for r in rules {
                            let minor = r.minor.map_or("*".to_string(), |m| m.to_string());
                            write(
                                &d.join("devices.allow"),
                                &format!("c {}:{minor} rwm", r.major),
                            )?;
                        }
                    }
                    Ok(())
                };
                set().inspect_err(|_| rc.remove())?;
                Ok(rc)
            }
            Cgroups::None { .. } => Ok(RunCgroup::default()),
        }
    }

    /// Kills everything in this agent's cgroups and removes them, its own folder included:
    /// for an agent that shuts down, and for tests that clean up after themselves.
    pub fn destroy(&self) {
        self.reap_leftovers();
        for b in self.bases() {
            let _ = std::fs::remove_dir(&b);
        }
    }

    /// Kills every process in run cgroups left by an earlier agent of this name, and
    /// removes them. Returns how many processes were killed.
    pub fn reap_leftovers(&self) -> usize {
        let mut killed = 0;
        for base in self.bases() {
            let Ok(rd) = std::fs::read_dir(&base) else {
                continue;
            };
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("run-") {
                    let rc = RunCgroup {
                        dirs: vec![e.path()],
                        names: vec![],
                    };
                    killed += rc.kill_all();
                    rc.remove();
                }
            }
        }
        killed
    }
}

impl RunCgroup {
    /// Each folder with the name a sandboxed task sees it under in `/sys/fs/cgroup`: the
    /// controller's on v1 (`cpu`, `memory`...), the unified tree's root on v2 (`.`).
    pub fn controller_dirs(&self) -> Vec<(String, PathBuf)> {
        self.names
            .iter()
            .cloned()
            .zip(self.dirs.iter().cloned())
            .collect()
    }

    /// Paths of `cgroup.procs` as C strings, prepared before fork so the child only makes
    /// async-signal-safe calls.
    pub fn procs_paths(&self) -> Vec<CString> {
        self.dirs
            .iter()
            .filter_map(|d| CString::new(d.join("cgroup.procs").to_string_lossy().as_bytes()).ok())
            .collect()
    }

    pub fn pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for d in &self.dirs {
            if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// SIGKILLs everything still in the cgroup (children that left the process group).
    pub fn kill_all(&self) -> usize {
        let mut n = 0;
        for _ in 0..20 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                crate::signal_process(p, rustix::process::Signal::KILL);
                n += 1;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        n
    }

    pub fn remove(&self) {
        for d in &self.dirs {
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// CPU time the run's processes used so far, in ns (`cpuacct.usage` on v1, `cpu.stat`
    /// on v2), when a controller here counts it.
    pub fn cpu_ns(&self) -> Option<u64> {
        for d in &self.dirs {
            if let Ok(s) = std::fs::read_to_string(d.join("cpuacct.usage")) {
                if let Ok(n) = s.trim().parse() {
                    return Some(n);
                }
            }
            if let Ok(s) = std::fs::read_to_string(d.join("cpu.stat")) {
                if let Some(us) = s
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                {
                    return Some(us * 1000);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_when_nothing_is_there() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            Cgroups::detect_at(d.path(), "a"),
            Cgroups::None { .. }
        ));
    }

    #[test]
    fn v1_layout_on_a_fake_tree() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("cpu")).unwrap();
        std::fs::create_dir_all(d.path().join("memory")).unwrap();
        std::fs::write(d.path().join("cpu/cpu.cfs_quota_us"), "-1").unwrap();
        std::fs::write(d.path().join("memory/memory.limit_in_bytes"), "0").unwrap();
        let cg = Cgroups::detect_at(d.path(), "node-a");
        assert!(matches!(cg, Cgroups::V1 { .. }), "{cg:?}");
        let rc = cg.create(7, 1500, 1 << 20, &RunLimits::default()).unwrap();
        let q = std::fs::read_to_string(d.path().join("cpu/caravel/node-a/run-7/cpu.cfs_quota_us"))
            .unwrap();
        assert_eq!(q, "150000");
        let m = std::fs::read_to_string(
            d.path()
                .join("memory/caravel/node-a/run-7/memory.limit_in_bytes"),
        )
        .unwrap();
        assert_eq!(m, "1048576");
        assert_eq!(rc.dirs.len(), 2);
        let names: Vec<String> = rc.controller_dirs().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["cpu", "memory"]);
        assert_eq!(
            cg.missing(),
            [
                "process limits (no cgroup v1 pids hierarchy)",
                "device limits (no cgroup v1 devices hierarchy)"
            ]
        );
    }

    #[test]
    fn v1_pids_and_devices_on_a_fake_tree() {
        let d = tempfile::tempdir().unwrap();
        for (c, f) in [
            ("cpu", "cpu.cfs_quota_us"),
            ("memory", "memory.limit_in_bytes"),
            ("pids", "cgroup.procs"),
            ("devices", "devices.allow"),
        ] {
            std::fs::create_dir_all(d.path().join(c)).unwrap();
            std::fs::write(d.path().join(c).join(f), "").unwrap();
        }
        let cg = Cgroups::detect_at(d.path(), "n");
        assert!(cg.missing().is_empty(), "{:?}", cg.missing());
        let limits = RunLimits {
            pids_max: Some(64),
            devices: Some(vec![DeviceRule {
                major: 195,
                minor: Some(0),
            }]),
        };
        let rc = cg.create(3, 1000, 1 << 20, &limits).unwrap();
        let read = |p: &str| std::fs::read_to_string(d.path().join(p)).unwrap();
        assert_eq!(read("pids/caravel/n/run-3/pids.max"), "64");
        // A fake tree keeps the last write: the allow rule came after the deny.
        assert_eq!(read("devices/caravel/n/run-3/devices.deny"), "a");
        assert_eq!(read("devices/caravel/n/run-3/devices.allow"), "c 195:0 rwm");
        let names: Vec<String> = rc.controller_dirs().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["cpu", "memory", "pids", "devices"]);
    }
}
