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
    V2 { base: PathBuf },
    V1 { cpu: PathBuf, memory: PathBuf },
    None { why: String },
}

/// The cgroup folders of one run, and open `cgroup.procs` paths for the child to join.
#[derive(Debug, Clone, Default)]
pub struct RunCgroup {
    pub dirs: Vec<PathBuf>,
}

fn write(p: &Path, v: &str) -> std::io::Result<()> {
    std::fs::write(p, v)
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
                let r = (|| -> std::io::Result<()> {
                    std::fs::create_dir_all(&base)?;
                    let _ = write(&root.join("cgroup.subtree_control"), "+cpu +memory");
                    write(&top.join("cgroup.subtree_control"), "+cpu +memory")?;
                    write(&base.join("cgroup.subtree_control"), "+cpu +memory")?;
                    Ok(())
                })();
                return match r {
                    Ok(()) => Cgroups::V2 { base },
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
            return match std::fs::create_dir_all(&cpu)
                .and_then(|_| std::fs::create_dir_all(&memory))
            {
                Ok(()) => Cgroups::V1 { cpu, memory },
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
            Cgroups::V2 { base } => format!("cgroup v2 at {}", base.display()),
            Cgroups::V1 { cpu, memory } => {
                format!("cgroup v1 at {} and {}", cpu.display(), memory.display())
            }
            Cgroups::None { why } => format!("none ({why})"),
        }
    }

    fn bases(&self) -> Vec<PathBuf> {
        match self {
            Cgroups::V2 { base } => vec![base.clone()],
            Cgroups::V1 { cpu, memory } => vec![cpu.clone(), memory.clone()],
            Cgroups::None { .. } => vec![],
        }
    }

    /// Creates the run's cgroups with its limits.
    pub fn create(
        &self,
        run: u64,
        cpu_milli: u64,
        memory_bytes: u64,
    ) -> std::io::Result<RunCgroup> {
        let name = format!("run-{run}");
        let quota = (cpu_milli * 100).max(1000); // period 100 ms
        match self {
            Cgroups::V2 { base } => {
                let d = base.join(&name);
                std::fs::create_dir_all(&d)?;
                write(&d.join("cpu.max"), &format!("{quota} 100000"))?;
                write(&d.join("memory.max"), &memory_bytes.to_string())?;
                let _ = write(&d.join("memory.swap.max"), "0");
                Ok(RunCgroup { dirs: vec![d] })
            }
            Cgroups::V1 { cpu, memory } => {
                let c = cpu.join(&name);
                let m = memory.join(&name);
                std::fs::create_dir_all(&c)?;
                std::fs::create_dir_all(&m)?;
                write(&c.join("cpu.cfs_period_us"), "100000")?;
                write(&c.join("cpu.cfs_quota_us"), &quota.to_string())?;
                write(&m.join("memory.limit_in_bytes"), &memory_bytes.to_string())?;
                Ok(RunCgroup { dirs: vec![c, m] })
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
                // SAFETY: plain syscall on a pid read from our own cgroup.
                unsafe {
                    libc::kill(p, libc::SIGKILL);
                }
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
        let rc = cg.create(7, 1500, 1 << 20).unwrap();
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
    }
}
