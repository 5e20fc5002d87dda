//! Readers for the Alibaba GPU v2023 "openb" trace (the FGD, USENIX ATC'23 trace): node
//! lists `sn,cpu_milli,memory_mib,gpu,model` and pod lists
//! `name,cpu_milli,memory_mib,num_gpu,gpu_milli[,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time]`
//! (the `multigpu` variants have only the first five columns). Every malformed row is
//! rejected with `file:line` and the reason.

use std::path::Path;

use caravel_core::{Capacity, Device, GpuRequest, NodeId, TaskResources};
use caravel_sched::NodeSnap;

use crate::TraceError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenbNode {
    pub sn: String,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub gpus: u32,
    /// Empty for CPU-only nodes.
    pub model: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenbPod {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub num_gpu: u32,
    /// Per-GPU share in thousandths; below 1000 only with one GPU.
    pub gpu_milli: u32,
    /// Allowed models; empty means any.
    pub gpu_spec: Vec<String>,
}

impl OpenbPod {
    /// Total GPU request in thousandths of a device.
    pub fn gpu_total_milli(&self) -> u64 {
        self.num_gpu as u64 * self.gpu_milli as u64
    }
}

/// One record of a trace file, as the `csv` crate read it (quoted fields unquoted).
pub(crate) struct Row(csv::StringRecord);

impl Row {
    pub(crate) fn fields(&self) -> Vec<&str> {
        self.0.iter().collect()
    }

    /// The fields joined by commas: how a header is compared and shown.
    pub(crate) fn text(&self) -> String {
        self.fields().join(",")
    }

    pub(crate) fn is_blank(&self) -> bool {
        self.0.iter().all(|f| f.trim().is_empty())
    }
}

/// The records of a CSV file with the line each starts on (1-based), header included.
/// Records may have any number of fields: each reader checks its own.
pub(crate) fn rows(path: &Path) -> Result<(String, Vec<(usize, Row)>), TraceError> {
    let file = path.display().to_string();
    let err = |line: usize, reason: String| TraceError {
        file: file.clone(),
        line,
        reason,
    };
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_path(path)
        .map_err(|e| err(0, e.to_string()))?;
    let mut out = Vec::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line() as usize);
            err(line, e.to_string())
        })?;
        let line = rec.position().map_or(0, |p| p.line() as usize);
        out.push((line, Row(rec)));
    }
    Ok((file, out))
}

pub(crate) fn num<T: std::str::FromStr>(
    file: &str,
    line: usize,
    col: &str,
    v: &str,
) -> Result<T, TraceError> {
    v.trim().parse().map_err(|_| TraceError {
        file: file.to_string(),
        line,
        reason: format!("{col}: `{v}` is not a non-negative integer"),
    })
}

pub fn read_nodes(path: &Path) -> Result<Vec<OpenbNode>, TraceError> {
    let (file, lines) = rows(path)?;
    let err = |line: usize, reason: String| TraceError {
        file: file.clone(),
        line,
        reason,
    };
    let mut it = lines.into_iter();
    match it.next().map(|(l, h)| (l, h.text())) {
        Some((_, h)) if h == "sn,cpu_milli,memory_mib,gpu,model" => {}
        Some((l, h)) => {
            return Err(err(
                l,
                format!("header `{h}` is not `sn,cpu_milli,memory_mib,gpu,model`"),
            ))
        }
        None => return Err(err(0, "empty file".into())),
    }
    let mut out = Vec::new();
    for (l, row) in it {
        if row.is_blank() {
            continue;
        }
        let c = row.fields();
        if c.len() != 5 {
            return Err(err(l, format!("{} columns, expected 5", c.len())));
        }
        let gpus: u32 = num(&file, l, "gpu", c[3])?;
        let model = c[4].trim().to_string();
        if gpus > 0 && model.is_empty() {
            return Err(err(l, "model: a node with GPUs needs a model".into()));
        }
        if gpus == 0 && !model.is_empty() {
            return Err(err(
                l,
                format!("model: `{model}` given for a node without GPUs"),
            ));
        }
        let n = OpenbNode {
            sn: c[0].trim().to_string(),
            cpu_milli: num(&file, l, "cpu_milli", c[1])?,
            memory_mib: num(&file, l, "memory_mib", c[2])?,
            gpus,
            model,
        };
        if n.sn.is_empty() {
            return Err(err(l, "sn: empty node name".into()));
        }
        out.push(n);
    }
    Ok(out)
}

pub fn read_pods(path: &Path) -> Result<Vec<OpenbPod>, TraceError> {
    let (file, lines) = rows(path)?;
    let err = |line: usize, reason: String| TraceError {
        file: file.clone(),
        line,
        reason,
    };
    let mut it = lines.into_iter();
    let cols = match it.next().map(|(l, h)| (l, h.text())) {
        Some((_, h)) if h == "name,cpu_milli,memory_mib,num_gpu,gpu_milli" => 5,
        Some((_, h))
            if h == "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time" =>
        {
            11
        }
        Some((l, h)) => return Err(err(l, format!("header `{h}` is not an openb pod list header"))),
        None => return Err(err(0, "empty file".into())),
    };
    let mut out = Vec::new();
    for (l, row) in it {
        if row.is_blank() {
            continue;
        }
        let c = row.fields();
        if c.len() != cols {
            return Err(err(l, format!("{} columns, expected {cols}", c.len())));
        }
        let p = OpenbPod {
            name: c[0].trim().to_string(),
            cpu_milli: num(&file, l, "cpu_milli", c[1])?,
            memory_mib: num(&file, l, "memory_mib", c[2])?,
            num_gpu: num(&file, l, "num_gpu", c[3])?,
            gpu_milli: num(&file, l, "gpu_milli", c[4])?,
            gpu_spec: if cols == 11 && !c[5].trim().is_empty() {
                c[5].split('|').map(|m| m.trim().to_string()).collect()
            } else {
                vec![]
            },
        };
        if p.num_gpu > 0 && !(1..=1000).contains(&p.gpu_milli) {
            return Err(err(
                l,
                format!("gpu_milli: {} is not 1..1000 for a GPU task", p.gpu_milli),
            ));
        }
        if p.num_gpu > 1 && p.gpu_milli != 1000 {
            return Err(err(
                l,
                format!(
                    "gpu_milli: {} with {} GPUs; fractions are for one GPU",
                    p.gpu_milli, p.num_gpu
                ),
            ));
        }
        out.push(p);
    }
    Ok(out)
}

/// The scheduler's view of the trace's nodes (the openb node lists carry no topology).
pub fn to_nodes(nodes: &[OpenbNode]) -> Vec<NodeSnap> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            NodeSnap::new(
                NodeId(i as u64),
                Capacity {
                    isolation: Default::default(),
                    images: false,
                    cpu_milli: n.cpu_milli,
                    memory_bytes: n.memory_mib << 20,
                    devices: (0..n.gpus)
                        .map(|k| Device {
                            index: k,
                            model: n.model.clone(),
                        })
                        .collect(),
                },
            )
        })
        .collect()
}

/// A pod as a task request. A pod with a GPU spec accepts exactly those models; a pod
/// without one accepts every model in `all_models`.
pub fn to_request(p: &OpenbPod, all_models: &[String]) -> TaskResources {
    let gpu = (p.num_gpu > 0).then(|| {
        let models: Vec<String> = if p.gpu_spec.is_empty() {
            all_models.to_vec()
        } else {
            p.gpu_spec.clone()
        };
        GpuRequest {
            model: models[0].clone(),
            any_of: models[1..].to_vec(),
            count: p.num_gpu,
            milli: (p.gpu_milli < 1000).then_some(p.gpu_milli),
        }
    });
    TaskResources {
        needs: Default::default(),
        // Pods of zero CPU exist in the trace; the scheduler counts at least one millicore.
        cpu_milli: p.cpu_milli.max(1),
        memory_bytes: (p.memory_mib << 20).max(1),
        gpu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traces() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/traces/alibaba-gpu-v2023-openb")
    }

    #[test]
    fn reads_the_real_trace_with_the_documented_counts() {
        let nodes = read_nodes(&traces().join("openb_node_list_gpu_node.csv")).unwrap();
        assert_eq!(nodes.len(), 1213);
        assert_eq!(nodes.iter().map(|n| n.gpus).sum::<u32>(), 6212);
        let all = read_nodes(&traces().join("openb_node_list_all_node.csv")).unwrap();
        assert_eq!(all.iter().filter(|n| n.gpus == 0).count(), 310);
        let pods = read_pods(&traces().join("openb_pod_list_default.csv")).unwrap();
        assert_eq!(pods.len(), 8152);
        assert_eq!(pods.iter().filter(|p| p.num_gpu == 0).count(), 1088);
        assert_eq!(
            pods.iter()
                .filter(|p| p.num_gpu == 1 && p.gpu_milli < 1000)
                .count(),
            3078
        );
        assert_eq!(pods.iter().filter(|p| p.num_gpu > 1).count(), 75);
        let multi = read_pods(&traces().join("openb_pod_list_multigpu20.csv")).unwrap();
        assert!(multi.len() > 8152);
        let spec = read_pods(&traces().join("openb_pod_list_gpuspec10.csv")).unwrap();
        assert!(spec.iter().any(|p| !p.gpu_spec.is_empty()));
    }

    #[test]
    fn every_variant_in_the_folder_reads() {
        for e in std::fs::read_dir(traces()).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("openb_pod_list_") {
                let pods = read_pods(&e.path()).unwrap();
                assert!(pods.len() > 7000, "{name}: {}", pods.len());
            }
        }
    }

    #[test]
    fn malformed_rows_are_rejected_with_file_and_line() {
        let d = std::env::temp_dir().join(format!("caravel-openb-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("pods.csv");
        std::fs::write(
            &f,
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np0,1000,512,1,500\np1,lots,512,0,0\n",
        )
        .unwrap();
        let e = read_pods(&f).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(
            e.to_string()
                .ends_with("pods.csv:3: cpu_milli: `lots` is not a non-negative integer"),
            "{e}"
        );
        std::fs::write(
            &f,
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np0,1000,512,2,500\n",
        )
        .unwrap();
        assert!(read_pods(&f)
            .unwrap_err()
            .reason
            .contains("fractions are for one GPU"));
        std::fs::write(
            &f,
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np0,1000,512\n",
        )
        .unwrap();
        assert_eq!(read_pods(&f).unwrap_err().reason, "3 columns, expected 5");
        // Quoted fields are read as CSV has them (a comma inside a name is not a column),
        // and CRLF line ends are fine; a quote left open is an error with its line.
        std::fs::write(
            &f,
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli\r\n\"p,0\",1000,512,1,500\r\n",
        )
        .unwrap();
        assert_eq!(read_pods(&f).unwrap()[0].name, "p,0");
        std::fs::write(
            &f,
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np0,1000,512,1,500\np1,1000,\"512,1,500\n",
        )
        .unwrap();
        let e = read_pods(&f).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let n = d.join("nodes.csv");
        std::fs::write(&n, "sn,cpu_milli,memory_mib,gpu,model\nn0,64000,1024,2,\n").unwrap();
        assert_eq!(
            read_nodes(&n).unwrap_err().to_string(),
            format!("{}:2: model: a node with GPUs needs a model", n.display())
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn requests_map_fractions_counts_and_specs() {
        let all = vec!["T4".to_string(), "P100".to_string()];
        let p = OpenbPod {
            name: "p".into(),
            cpu_milli: 0,
            memory_mib: 0,
            num_gpu: 1,
            gpu_milli: 460,
            gpu_spec: vec![],
        };
        let r = to_request(&p, &all);
        let g = r.gpu.unwrap();
        assert_eq!((g.milli, g.models()), (Some(460), vec!["T4", "P100"]));
        let p2 = OpenbPod {
            num_gpu: 4,
            gpu_milli: 1000,
            gpu_spec: vec!["V100M32".into()],
            ..p
        };
        let g2 = to_request(&p2, &all).gpu.unwrap();
        assert_eq!(
            (g2.count, g2.milli, g2.models()),
            (4, None, vec!["V100M32"])
        );
    }
}
