use super::*;
use caravel_core::{Device, GpuRequest, Topology, TopologyLevel};
use proptest::prelude::*;

fn cpu_node(id: u64, cpus: u64, gib: u64) -> NodeSnap {
    NodeSnap::new(
        NodeId(id),
        Capacity {
            isolation: Default::default(),
            images: false,
            cpu_milli: cpus * 1000,
            memory_bytes: gib << 30,
            devices: vec![],
        },
    )
}

fn gpu_node(id: u64, model: &str, n: u32) -> NodeSnap {
    NodeSnap::new(
        NodeId(id),
        Capacity {
            isolation: Default::default(),
            images: false,
            cpu_milli: 64_000,
            memory_bytes: 512 << 30,
            devices: (0..n)
                .map(|i| Device {
                    index: i,
                    model: model.into(),
                })
                .collect(),
        },
    )
}

fn job(id: u64, tasks: u32, cpu: u64, gpu: Option<(&str, u32)>, gang: bool) -> JobReq {
    JobReq {
        id: JobId(id),
        tenant: TenantId(1),
        priority: Priority::Batch,
        seq: id,
        resources: TaskResources {
            needs: Default::default(),
            cpu_milli: cpu,
            memory_bytes: 1 << 30,
            gpu: gpu.map(|(m, c)| GpuRequest::whole(m, c)),
        },
        gang,
        min_tasks: None,
        pending: (0..tasks).collect(),
        topology: None,
        max_runtime_ms: None,
        attained_gpu_ms: 0,
    }
}

#[test]
fn best_fit_prefers_the_tighter_node() {
    let mut nodes = vec![cpu_node(1, 16, 64), cpu_node(2, 4, 16)];
    let mut t = HashMap::new();
    let plan = schedule(
        &Config::default(),
        &mut nodes,
        &mut t,
        &[job(1, 1, 2000, None, false)],
    );
    assert_eq!(plan.placements[0].node, NodeId(2));
}

#[test]
fn cpu_tasks_avoid_gpu_nodes() {
    let mut nodes = vec![gpu_node(1, "H100", 8), cpu_node(2, 64, 512)];
    let mut t = HashMap::new();
    let plan = schedule(
        &Config::default(),
        &mut nodes,
        &mut t,
        &[job(1, 1, 1000, None, false)],
    );
    assert_eq!(plan.placements[0].node, NodeId(2));
}

#[test]
fn devices_are_assigned_by_index_and_model() {
    let mut nodes = vec![gpu_node(1, "A100", 4), gpu_node(2, "H100", 8)];
    let mut t = HashMap::new();
    let plan = schedule(
        &Config::default(),
        &mut nodes,
        &mut t,
        &[job(1, 2, 1000, Some(("H100", 3)), false)],
    );
    assert_eq!(plan.placements.len(), 2);
    assert_eq!(plan.placements[0].devices, vec![0, 1, 2]);
    assert_eq!(plan.placements[1].devices, vec![3, 4, 5]);
    assert!(plan.placements.iter().all(|p| p.node == NodeId(2)));
}

#[test]
fn gang_is_all_or_nothing_with_reason() {
    let mut nodes = vec![gpu_node(1, "H100", 8), gpu_node(2, "H100", 8)];
    let mut t = HashMap::new();
    let plan = schedule(
        &Config::default(),
        &mut nodes,
        &mut t,
        &[job(1, 3, 1000, Some(("H100", 8)), true)],
    );
    assert!(plan.placements.is_empty());
    let r = &plan.pending[&JobId(1)][0];
    assert_eq!(r.code, "gang");
    assert!(r.message.contains("only 2 of 3"), "{}", r.message);
    assert!(nodes
        .iter()
        .all(|n| n.used_devices.is_empty() && n.used_cpu_milli == 0));
}

#[test]
fn two_gangs_that_together_exceed_the_pool_do_not_deadlock() {
    let mut nodes: Vec<NodeSnap> = (0..100).map(|i| cpu_node(i, 1, 4)).collect();
    let mut t = HashMap::new();
    let plan = schedule(
        &Config::default(),
        &mut nodes,
        &mut t,
        &[job(1, 100, 1000, None, true), job(2, 100, 1000, None, true)],
    );
    assert_eq!(plan.placements.len(), 100);
    assert!(plan.placements.iter().all(|p| p.job == JobId(1)));
    assert!(plan.pending.contains_key(&JobId(2)));
}

#[test]
fn quota_cap_with_reason() {
    let mut nodes = vec![gpu_node(1, "H100", 8), gpu_node(2, "H100", 8)];
    let mut t = HashMap::new();
    t.insert(
        TenantId(1),
        TenantSnap {
            quota: Quota::parse("gpu/H100=8").unwrap(),
            ..Default::default()
        },
    );
    let plan = schedule(
        &Config::default(),
        &mut nodes,
        &mut t,
        &[
            job(1, 1, 1000, Some(("H100", 8)), false),
            job(2, 1, 1000, Some(("H100", 1)), false),
        ],
    );
    assert_eq!(plan.placements.len(), 1);
    assert_eq!(
        plan.pending[&JobId(2)][0].message,
        "quota: gpu/H100 8 of 8 in use, 1 more asked"
    );
}

#[test]
fn no_fit_reason_counts_nodes() {
    let mut nodes = vec![cpu_node(1, 4, 8), cpu_node(2, 4, 8), gpu_node(3, "T4", 1)];
    nodes[1].ready = false;
    let mut t = HashMap::new();
    let plan = schedule(
        &Config::default(),
        &mut nodes,
        &mut t,
        &[job(1, 1, 1000, Some(("H100", 1)), false)],
    );
    let r = &plan.pending[&JobId(1)][0];
    assert_eq!(r.code, "no_fit");
    assert_eq!(
        r.message,
        "no node fits: 1 node not ready, 2 nodes lack gpu/H100"
    );
    assert_eq!(r.counts["lack gpu/H100"], 2);
    let plan = schedule(
        &Config::default(),
        &mut [cpu_node(1, 4, 8)],
        &mut t,
        &[job(1, 1, 1000, Some(("H100", 1)), false)],
    );
    let r = &plan.pending[&JobId(1)][0];
    assert_eq!(r.message, "no node fits: 1 node lacks gpu/H100");
    assert_eq!(r.counts["lack gpu/H100"], 1, "the key does not change");
}

#[test]
fn priority_then_fifo() {
    let mut nodes = vec![cpu_node(1, 1, 8)];
    let mut t = HashMap::new();
    let mut spot = job(1, 1, 1000, None, false);
    spot.priority = Priority::Spot;
    let batch = job(2, 1, 1000, None, false);
    let mut online = job(3, 1, 1000, None, false);
    online.priority = Priority::Online;
    let plan = schedule(
        &Config::default(),
        &mut nodes,
        &mut t,
        &[spot, batch, online],
    );
    assert_eq!(plan.placements.len(), 1);
    assert_eq!(plan.placements[0].job, JobId(3));
}

// ---- properties ----

#[derive(Debug, Clone)]
struct World {
    nodes: Vec<NodeSnap>,
    tenants: HashMap<TenantId, TenantSnap>,
    jobs: Vec<JobReq>,
}

fn arb_world() -> impl Strategy<Value = World> {
    let models = ["H100", "A100", "T4"];
    let node = (1u64..16, 1u64..64, 0usize..4, 0u32..9)
        .prop_map(move |(c, m, mi, g)| (c, m, if mi == 3 { None } else { Some((models[mi], g)) }));
    let jobr = (
        1u32..6,
        1u64..8000,
        1u64..16,
        0usize..6,
        1u32..5,
        any::<bool>(),
        0u64..3,
        0u8..3,
    );
    (
        prop::collection::vec(node, 0..12),
        prop::collection::vec(jobr, 0..30),
        prop::collection::vec(prop::option::of(0u64..40_000), 3),
    )
        .prop_map(move |(ns, js, quotas)| {
            let nodes = ns
                .into_iter()
                .enumerate()
                .map(|(i, (c, m, g))| {
                    NodeSnap::new(
                        NodeId(i as u64),
                        Capacity {
                            isolation: Default::default(),
                            images: false,
                            cpu_milli: c * 1000,
                            memory_bytes: m << 30,
                            devices: match g {
                                Some((model, n)) => (0..n)
                                    .map(|k| Device {
                                        index: k,
                                        model: model.to_string(),
                                    })
                                    .collect(),
                                None => vec![],
                            },
                        },
                    )
                })
                .collect();
            let tenants = quotas
                .into_iter()
                .enumerate()
                .map(|(i, q)| {
                    (
                        TenantId(i as u64),
                        TenantSnap {
                            quota: Quota {
                                cpu_milli: q,
                                ..Default::default()
                            },
                            ..Default::default()
                        },
                    )
                })
                .collect();
            let jobs = js
                .into_iter()
                .enumerate()
                .map(|(i, (tasks, cpu, mem, gm, gc, gang, tenant, pr))| JobReq {
                    id: JobId(i as u64),
                    tenant: TenantId(tenant),
                    priority: [Priority::Online, Priority::Batch, Priority::Spot][pr as usize],
                    seq: i as u64,
                    resources: TaskResources {
                        needs: Default::default(),
                        cpu_milli: cpu,
                        memory_bytes: mem << 30,
                        // Whole devices, a fraction of one, or any of two models.
                        gpu: match gm {
                            0..=2 => Some(GpuRequest::whole(models[gm], gc)),
                            3 => Some(GpuRequest {
                                milli: Some([250, 300, 500, 750][gc as usize % 4]),
                                ..GpuRequest::whole(models[(i + gc as usize) % 3], 1)
                            }),
                            4 => Some(GpuRequest {
                                any_of: vec![models[(i + 1) % 3].to_string()],
                                ..GpuRequest::whole(models[i % 3], gc)
                            }),
                            _ => None,
                        },
                    },
                    gang,
                    min_tasks: None,
                    pending: (0..tasks).collect(),
                    topology: None,
                    max_runtime_ms: None,
                    attained_gpu_ms: 0,
                })
                .collect();
            World {
                nodes,
                tenants,
                jobs,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn invariants_hold(w in arb_world()) {
        let mut nodes = w.nodes.clone();
        let mut tenants = w.tenants.clone();
        let plan = schedule(&Config::default(), &mut nodes, &mut tenants, &w.jobs);

        // Recompute allocation from the plan alone and check no node is over-committed.
        let jobs: HashMap<JobId, &JobReq> = w.jobs.iter().map(|j| (j.id, j)).collect();
        let mut fresh = w.nodes.clone();
        let mut per_tenant: HashMap<TenantId, ResourceSum> = HashMap::new();
        let mut per_job: HashMap<JobId, usize> = HashMap::new();
        for p in &plan.placements {
            let j = jobs[&p.job];
            let n = fresh.iter_mut().find(|n| n.id == p.node).unwrap();
            let g = j.resources.gpu.clone();
            for d in &p.devices {
                let dev = n.capacity.devices.iter().find(|x| x.index == *d).unwrap();
                let g = g.as_ref().unwrap();
                prop_assert!(g.models().contains(&dev.model.as_str()), "wrong model");
                match g.milli {
                    None => {
                        prop_assert!(!n.shared.contains_key(d), "whole device also shared");
                        prop_assert!(n.used_devices.insert(*d), "device double-booked");
                    }
                    Some(m) => {
                        prop_assert!(!n.used_devices.contains(d), "shared device also held whole");
                        let u = n.shared.entry(*d).or_insert(0);
                        *u += m;
                        prop_assert!(*u <= 1000, "device over-shared: {}", u);
                    }
                }
            }
            if let Some(g) = &g {
                let models: BTreeSet<&str> = p.devices.iter().map(|d| n.model_of(*d).unwrap()).collect();
                prop_assert_eq!(models.len(), 1, "one task's devices are of one model");
                prop_assert_eq!(p.devices.len() as u32, if g.milli.is_some() { 1 } else { g.count });
            } else {
                prop_assert!(p.devices.is_empty());
            }
            n.used_cpu_milli += j.resources.cpu_milli;
            n.used_memory_bytes += j.resources.memory_bytes;
            prop_assert!(n.used_cpu_milli <= n.capacity.cpu_milli, "cpu over-committed");
            prop_assert!(n.used_memory_bytes <= n.capacity.memory_bytes, "memory over-committed");
            let model = p.devices.first().and_then(|d| n.model_of(*d)).map(str::to_string);
            per_tenant.entry(j.tenant).or_default().add_task_on(&j.resources, model.as_deref(), 1);
            *per_job.entry(p.job).or_default() += 1;
        }
        // Gangs all-or-nothing; every job either fully placed or explained.
        for j in &w.jobs {
            let placed = per_job.get(&j.id).copied().unwrap_or(0);
            if j.gang {
                prop_assert!(placed == 0 || placed == j.pending.len(), "partial gang");
            }
            if placed < j.pending.len() {
                prop_assert!(plan.pending.contains_key(&j.id), "pending job without reason");
            } else {
                prop_assert!(!plan.pending.contains_key(&j.id));
            }
        }
        // Quota caps honoured.
        for (t, used) in &per_tenant {
            if let Some(lim) = w.tenants[t].quota.cpu_milli {
                prop_assert!(used.cpu_milli <= lim, "quota exceeded");
            }
        }
        // Determinism.
        let mut nodes2 = w.nodes.clone();
        let mut tenants2 = w.tenants.clone();
        let plan2 = schedule(&Config::default(), &mut nodes2, &mut tenants2, &w.jobs);
        prop_assert_eq!(plan, plan2);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The index never misses: whenever a full scan finds a node for a request, the
    /// indexed search finds one too (and it really fits).
    #[test]
    fn index_finds_a_node_whenever_one_fits(w in arb_world()) {
        let mut s = Scheduler::new(Config::default(), w.nodes.clone());
        // Load the nodes a little first so free capacities differ.
        let mut tenants = HashMap::new();
        let half: Vec<JobReq> = w.jobs.iter().take(w.jobs.len() / 2).cloned().collect();
        s.schedule(&mut tenants, &half);
        for j in &w.jobs {
            let full = select(&s.cfg, s.nodes(), &j.resources).is_ok();
            let indexed = s.place(&j.resources);
            prop_assert_eq!(full, indexed.is_some(), "index and scan disagree for {:?}", j.resources);
            if let Some((i, _)) = indexed {
                prop_assert!(fit(&s.cfg, &s.nodes()[i], &j.resources).is_ok());
            }
        }
    }

    /// What counting a gang's room rests on: a node's room for a request is how many
    /// times placement's fit succeeds on it, each task's devices taken before the next.
    #[test]
    fn a_nodes_room_is_how_many_tasks_fit_one_after_another(w in arb_world()) {
        let mut s = Scheduler::new(Config::default(), w.nodes.clone());
        let half: Vec<JobReq> = w.jobs.iter().take(w.jobs.len() / 2).cloned().collect();
        s.schedule(&mut HashMap::new(), &half);
        for n in s.nodes() {
            for j in &w.jobs {
                let r = &j.resources;
                let mut copy = n.clone();
                let mut fitted = 0u64;
                while let Ok((_, devs)) = fit(&s.cfg, &copy, r) {
                    copy.allocate(r, &devs);
                    fitted += 1;
                    prop_assert!(fitted <= 1000, "no end to {:?} on {:?}", r, n.id);
                }
                prop_assert_eq!(n.room_for(r), fitted, "{:?} on {:?}", r, n.id);
            }
        }
    }
}

fn racked(id: u64, zone: &str, rack: &str, gpus: u32) -> NodeSnap {
    let mut n = gpu_node(id, "H100", gpus);
    n.topology = Topology {
        region: "r".into(),
        zone: zone.into(),
        rack: rack.into(),
    };
    n
}

fn topo_gang(id: u64, tasks: u32, gpus: u32, level: TopologyLevel) -> JobReq {
    let mut j = job(id, tasks, 1000, Some(("H100", gpus)), true);
    j.topology = Some(level);
    j
}

fn rack_of(nodes: &[NodeSnap], id: NodeId) -> String {
    nodes
        .iter()
        .find(|n| n.id == id)
        .unwrap()
        .topology
        .rack
        .clone()
}

#[test]
fn topology_rack_packs_a_gang_into_the_smallest_rack_that_fits() {
    // Rack "big": 4 nodes x 8 GPUs; rack "small": 2 nodes x 8 GPUs.
    let nodes: Vec<NodeSnap> = (0..4)
        .map(|i| racked(i, "z1", "big", 8))
        .chain((4..6).map(|i| racked(i, "z1", "small", 8)))
        .collect();
    let mut s = Scheduler::new(Config::default(), nodes.clone());
    let mut t = HashMap::new();
    let plan = s.schedule(&mut t, &[topo_gang(1, 16, 1, TopologyLevel::Rack)]);
    assert_eq!(plan.placements.len(), 16);
    assert!(
        plan.placements
            .iter()
            .all(|p| rack_of(&nodes, p.node) == "small"),
        "{plan:?}"
    );
    let plan = s.schedule(&mut t, &[topo_gang(2, 24, 1, TopologyLevel::Rack)]);
    assert_eq!(plan.placements.len(), 24);
    assert!(plan
        .placements
        .iter()
        .all(|p| rack_of(&nodes, p.node) == "big"));
}

#[test]
fn topology_gang_waits_with_a_reason_when_no_domain_fits() {
    let nodes = vec![racked(0, "z1", "a", 8), racked(1, "z1", "b", 8)];
    let mut s = Scheduler::new(Config::default(), nodes);
    let mut t = HashMap::new();
    let plan = s.schedule(&mut t, &[topo_gang(1, 12, 1, TopologyLevel::Rack)]);
    assert!(plan.placements.is_empty());
    let r = &plan.pending[&JobId(1)][0];
    assert_eq!(r.code, "topology");
    assert_eq!(
        r.message,
        "gang: no rack has room for all 12 tasks together (the roomiest rack fits 8)"
    );
    assert!(
        s.nodes().iter().all(|n| n.used_devices.is_empty()),
        "nothing held"
    );
    // Without the topology constraint the same gang spans both racks.
    let plan = s.schedule(&mut t, &[job(2, 12, 1000, Some(("H100", 1)), true)]);
    assert_eq!(plan.placements.len(), 12);
    // Zone level: both racks are in z1, so 4 more fit in the zone.
    let plan = s.schedule(&mut t, &[topo_gang(3, 4, 1, TopologyLevel::Zone)]);
    assert_eq!(plan.placements.len(), 4);
}

#[test]
fn topology_node_keeps_a_gang_on_one_node() {
    let nodes = vec![racked(0, "z", "a", 8), racked(1, "z", "a", 8)];
    let mut s = Scheduler::new(Config::default(), nodes);
    let mut t = HashMap::new();
    let plan = s.schedule(&mut t, &[topo_gang(1, 4, 2, TopologyLevel::Node)]);
    let used: BTreeSet<NodeId> = plan.placements.iter().map(|p| p.node).collect();
    assert_eq!(plan.placements.len(), 4);
    assert_eq!(used.len(), 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn topology_gangs_land_in_one_domain(
        racks in prop::collection::vec((0u8..2, 0u8..3, 1u32..9), 1..12),
        gangs in prop::collection::vec((1u32..12, 1u32..3, 0u8..3), 1..8),
    ) {
        let nodes: Vec<NodeSnap> = racks
            .iter()
            .enumerate()
            .map(|(i, (z, r, g))| racked(i as u64, &format!("z{z}"), &format!("z{z}-r{r}"), *g))
            .collect();
        let levels = [TopologyLevel::Node, TopologyLevel::Rack, TopologyLevel::Zone];
        let jobs: Vec<JobReq> = gangs
            .iter()
            .enumerate()
            .map(|(i, (n, g, l))| topo_gang(i as u64, *n, *g, levels[*l as usize]))
            .collect();
        let mut s = Scheduler::new(Config::default(), nodes.clone());
        let plan = s.schedule(&mut HashMap::new(), &jobs);
        for j in &jobs {
            let mine: Vec<&Placement> = plan.placements.iter().filter(|p| p.job == j.id).collect();
            prop_assert!(mine.is_empty() || mine.len() == j.pending.len(), "partial gang");
            let key = |id: NodeId| {
                let t = &nodes.iter().find(|n| n.id == id).unwrap().topology;
                match j.topology.unwrap() {
                    TopologyLevel::Node => format!("{id}"),
                    TopologyLevel::Rack => t.rack.clone(),
                    TopologyLevel::Zone => t.zone.clone(),
                }
            };
            let domains: BTreeSet<String> = mine.iter().map(|p| key(p.node)).collect();
            prop_assert!(domains.len() <= 1, "gang {} spans {:?}", j.id, domains);
            if mine.is_empty() {
                prop_assert!(plan.pending.contains_key(&j.id));
            }
        }
    }
}

fn tjob(id: u64, tenant: u64, tasks: u32, cpu: u64, mem_gib: u64) -> JobReq {
    let mut j = job(id, tasks, cpu, None, false);
    j.tenant = TenantId(tenant);
    j.resources.memory_bytes = mem_gib << 30;
    j
}

fn held_by(plan: &Plan, jobs: &[JobReq], t: u64) -> usize {
    plan.placements
        .iter()
        .filter(|p| jobs.iter().find(|j| j.id == p.job).unwrap().tenant == TenantId(t))
        .count()
}

#[test]
fn drf_splits_a_contended_pool_equally_between_equal_tenants() {
    let mut s = Scheduler::new(Config::default(), vec![cpu_node(1, 10, 100)]);
    // Tenant 1 submitted first and asks for everything; FIFO alone would give it all.
    let jobs = vec![tjob(1, 1, 10, 1000, 1), tjob(2, 2, 10, 1000, 1)];
    let plan = s.schedule(&mut HashMap::new(), &jobs);
    assert_eq!((held_by(&plan, &jobs, 1), held_by(&plan, &jobs, 2)), (5, 5));
}

#[test]
fn drf_honours_weights() {
    let mut s = Scheduler::new(Config::default(), vec![cpu_node(1, 9, 100)]);
    let mut t = HashMap::new();
    t.insert(
        TenantId(1),
        TenantSnap {
            weight: 2.0,
            ..Default::default()
        },
    );
    let jobs = vec![tjob(1, 1, 9, 1000, 1), tjob(2, 2, 9, 1000, 1)];
    let plan = s.schedule(&mut t, &jobs);
    assert_eq!((held_by(&plan, &jobs, 1), held_by(&plan, &jobs, 2)), (6, 3));
}

#[test]
fn drf_reproduces_the_papers_example() {
    // Ghodsi et al. §4: 9 CPUs, 18 GB; A's tasks <1 CPU, 4 GB>, B's <3 CPU, 1 GB>.
    // DRF gives A three tasks and B two (both end with a 2/3 dominant share).
    let mut s = Scheduler::new(Config::default(), vec![cpu_node(1, 9, 18)]);
    let jobs = vec![tjob(1, 1, 10, 1000, 4), tjob(2, 2, 10, 3000, 1)];
    let plan = s.schedule(&mut HashMap::new(), &jobs);
    assert_eq!((held_by(&plan, &jobs, 1), held_by(&plan, &jobs, 2)), (3, 2));
}

#[test]
fn drf_lets_the_tenant_that_used_less_recently_go_first() {
    let mut s = Scheduler::new(Config::default(), vec![cpu_node(1, 4, 100)]);
    let mut t = HashMap::new();
    t.insert(
        TenantId(1),
        TenantSnap {
            history: fair::UsageEma {
                cpu_milli: 4000.0,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let jobs = vec![tjob(1, 1, 4, 1000, 1), tjob(2, 2, 4, 1000, 1)];
    let plan = s.schedule(&mut t, &jobs);
    assert_eq!(held_by(&plan, &jobs, 2), 4, "{plan:?}");
}

#[test]
fn spot_only_gets_what_nobody_else_wants() {
    let mut s = Scheduler::new(Config::default(), vec![cpu_node(1, 1, 100)]);
    let mut spot = tjob(1, 1, 1, 1000, 1);
    spot.priority = Priority::Spot;
    let jobs = vec![spot, tjob(2, 2, 1, 1000, 1)];
    let plan = s.schedule(&mut HashMap::new(), &jobs);
    assert_eq!(plan.placements.len(), 1);
    assert_eq!(plan.placements[0].job, JobId(2));
}

// ---- preemption ----

fn running(
    run: u64,
    tenant: u64,
    node: u64,
    prio: Priority,
    started: i64,
    borrowed: bool,
) -> RunningTask {
    RunningTask {
        run: caravel_core::RunId(run),
        job: JobId(1000 + run),
        tenant: TenantId(tenant),
        node: NodeId(node),
        priority: prio,
        resources: TaskResources {
            needs: Default::default(),
            cpu_milli: 1000,
            memory_bytes: 1 << 30,
            gpu: None,
        },
        devices: vec![],
        started_ms: started,
        min_runtime_ms: 0,
        borrowed,
        expected_end_ms: None,
        gang_size: 1,
        attained_gpu_ms: 0,
        saved_ms: None,
        save_every_ms: 0,
    }
}

/// A 4-CPU node fully held by `tasks`, as the server would hand it to the scheduler.
fn busy_node(tasks: &[RunningTask]) -> NodeSnap {
    let mut n = cpu_node(1, 4, 64);
    n.used_cpu_milli = tasks.iter().map(|t| t.resources.cpu_milli).sum();
    n.used_memory_bytes = tasks.iter().map(|t| t.resources.memory_bytes).sum();
    n
}

fn guaranteed(cpus: u64) -> TenantSnap {
    TenantSnap {
        guarantee: Quota::parse(&format!("cpu={cpus}")).unwrap(),
        ..Default::default()
    }
}

#[test]
fn the_plan_says_which_placements_borrow() {
    // Tenant 1 is guaranteed 2 CPUs and already holds 1; tenant 2 has no guarantee.
    let mut s = Scheduler::new(Config::default(), vec![cpu_node(1, 16, 100)]);
    let mut t = HashMap::new();
    let mut a = guaranteed(2);
    a.used.add_task(&tjob(9, 1, 1, 1000, 1).resources, 1);
    t.insert(TenantId(1), a);
    let jobs = vec![tjob(1, 1, 3, 1000, 1), tjob(2, 2, 2, 1000, 1)];
    let plan = s.schedule(&mut t, &jobs);
    let borrowed = |job: u64| -> Vec<bool> {
        plan.placements
            .iter()
            .filter(|p| p.job == JobId(job))
            .map(|p| p.borrowed)
            .collect()
    };
    // One more CPU is within the guarantee; the two after it borrow.
    assert_eq!(borrowed(1), [false, true, true]);
    // Without a guarantee, everything is borrowed.
    assert_eq!(borrowed(2), [true, true]);
}

fn victims(plan: &Plan) -> Vec<u64> {
    plan.preemptions.iter().map(|p| p.run.0).collect()
}

#[test]
fn tenant_a_idle_guarantee_borrowed_by_b_is_reclaimed() {
    // B (no guarantee) borrowed all 4 CPUs that A is guaranteed while A was idle.
    let run: Vec<RunningTask> = (0..4)
        .map(|i| running(i, 2, 1, Priority::Batch, 100 * i as i64, true))
        .collect();
    let mut s = Scheduler::new(Config::default(), vec![busy_node(&run)]);
    let mut t = HashMap::new();
    t.insert(TenantId(1), guaranteed(4));
    let mut a = tjob(1, 1, 2, 1000, 1);
    a.resources.memory_bytes = 1 << 30;
    let plan = s.schedule_with(10_000, &run, &mut t, &[a]);
    assert!(plan.placements.is_empty());
    assert_eq!(
        victims(&plan),
        vec![3, 2],
        "the most recently started borrowed tasks go first"
    );
    assert_eq!(plan.pending[&JobId(1)][0].code, "preempting");
    assert_eq!(
        plan.pending[&JobId(1)][0].message,
        "preempting 2 running tasks to make room"
    );
}

#[test]
fn the_victim_that_would_lose_the_least_work_since_its_checkpoint_goes_first() {
    let pick = |run: &[RunningTask]| {
        let mut s = Scheduler::new(Config::default(), vec![busy_node(run)]);
        let mut t = HashMap::new();
        t.insert(TenantId(1), guaranteed(4));
        victims(&s.schedule_with(10_000, run, &mut t, &[tjob(1, 1, 1, 1000, 1)]))
    };
    // Borrowed tasks started at 0, 1, 2 and 3 s; at 10 s, without checkpoints, the newest
    // loses least.
    let mut run: Vec<RunningTask> = (0..4)
        .map(|i| running(i, 2, 1, Priority::Batch, 1000 * i as i64, true))
        .collect();
    assert_eq!(pick(&run), vec![3]);
    // The oldest saved a checkpoint at 9.5 s: preempting it loses half a second.
    run[0].saved_ms = Some(9_500);
    assert_eq!(pick(&run), vec![0]);
    // A checkpoint from before the run started (an earlier run's) saves none of its work.
    run[0].started_ms = 9_600;
    run[0].saved_ms = Some(9_500);
    assert_eq!(run[0].unsaved_ms(10_000), 400);
    run[0].started_ms = 0;
    run[0].saved_ms = Some(-1);
    assert_eq!(pick(&run), vec![3]);
    // Tasks known to save every 4 s: task 2 (started at 2 s) saved at 10 s, task 1 at 9 s.
    for r in &mut run {
        r.saved_ms = None;
        r.save_every_ms = 4_000;
    }
    assert_eq!(run[2].unsaved_ms(10_000), 0);
    assert_eq!(run[1].unsaved_ms(10_000), 1_000);
    assert_eq!(pick(&run), vec![2]);
}

#[test]
fn spot_goes_before_borrowed_work_and_anyone_may_preempt_spot() {
    let run = vec![
        running(1, 2, 1, Priority::Batch, 0, true),
        running(2, 3, 1, Priority::Spot, 0, false),
        running(3, 2, 1, Priority::Batch, 0, true),
        running(4, 2, 1, Priority::Batch, 0, true),
    ];
    let mut s = Scheduler::new(Config::default(), vec![busy_node(&run)]);
    let mut t = HashMap::new();
    t.insert(TenantId(1), guaranteed(4));
    let plan = s.schedule_with(10_000, &run, &mut t, &[tjob(1, 1, 1, 1000, 1)]);
    assert_eq!(victims(&plan), vec![2]);
    // A tenant without a guarantee may still take a spot task's place, but not borrowed work.
    let mut s = Scheduler::new(Config::default(), vec![busy_node(&run)]);
    let plan = s.schedule_with(10_000, &run, &mut HashMap::new(), &[tjob(1, 5, 2, 1000, 1)]);
    assert_eq!(
        victims(&plan),
        vec![2],
        "only the spot task; the second task waits"
    );
}

#[test]
fn min_runtime_is_respected_under_preemption() {
    let mut run: Vec<RunningTask> = (0..4)
        .map(|i| running(i, 2, 1, Priority::Batch, 0, true))
        .collect();
    for r in &mut run {
        r.min_runtime_ms = 60_000;
    }
    let mut t = HashMap::new();
    t.insert(TenantId(1), guaranteed(4));
    let mut s = Scheduler::new(Config::default(), vec![busy_node(&run)]);
    let plan = s.schedule_with(30_000, &run, &mut t, &[tjob(1, 1, 1, 1000, 1)]);
    assert!(
        plan.preemptions.is_empty(),
        "victims younger than their minimum runtime are safe"
    );
    let r = plan.pending[&JobId(1)]
        .iter()
        .find(|r| r.code == "no_preemption")
        .unwrap();
    assert!(
        r.message.contains("inside their minimum runtime"),
        "{}",
        r.message
    );
    let mut s = Scheduler::new(Config::default(), vec![busy_node(&run)]);
    let plan = s.schedule_with(60_000, &run, &mut t, &[tjob(1, 1, 1, 1000, 1)]);
    assert_eq!(plan.preemptions.len(), 1);
}

#[test]
fn online_work_is_not_preempted_by_batch_and_guaranteed_work_is_never_a_victim() {
    let run = vec![
        running(1, 2, 1, Priority::Online, 0, true),
        running(2, 2, 1, Priority::Batch, 0, false),
        running(3, 2, 1, Priority::Batch, 0, false),
        running(4, 2, 1, Priority::Online, 0, true),
    ];
    let mut t = HashMap::new();
    t.insert(TenantId(1), guaranteed(4));
    let mut s = Scheduler::new(Config::default(), vec![busy_node(&run)]);
    let plan = s.schedule_with(10_000, &run, &mut t, &[tjob(1, 1, 1, 1000, 1)]);
    assert!(plan.preemptions.is_empty(), "{plan:?}");
    let mut online = tjob(2, 1, 1, 1000, 1);
    online.priority = Priority::Online;
    let mut s = Scheduler::new(Config::default(), vec![busy_node(&run)]);
    let plan = s.schedule_with(10_000, &run, &mut t, &[online]);
    assert_eq!(
        plan.preemptions.len(),
        1,
        "online may reclaim from borrowed online work"
    );
}

#[test]
fn two_reclaiming_jobs_never_share_a_victim_and_gangs_get_all_or_none() {
    let run: Vec<RunningTask> = (0..4)
        .map(|i| running(i, 2, 1, Priority::Spot, i as i64, false))
        .collect();
    let mut t = HashMap::new();
    t.insert(TenantId(1), guaranteed(8));
    let mut s = Scheduler::new(Config::default(), vec![busy_node(&run)]);
    let mut gang = tjob(2, 1, 3, 1000, 1);
    gang.gang = true;
    let plan = s.schedule_with(10, &run, &mut t, &[tjob(1, 1, 2, 1000, 1), gang]);
    let v = victims(&plan);
    let distinct: BTreeSet<u64> = v.iter().copied().collect();
    assert_eq!(distinct.len(), v.len(), "a victim counted twice: {v:?}");
    // Job 1 takes two victims; the 3-member gang cannot get three of the remaining two.
    assert_eq!(
        plan.preemptions
            .iter()
            .filter(|p| p.for_job == JobId(1))
            .count(),
        2
    );
    assert_eq!(
        plan.preemptions
            .iter()
            .filter(|p| p.for_job == JobId(2))
            .count(),
        0
    );
}

#[test]
fn reasons_are_complete_when_preemption_finds_nothing() {
    // A GPU job on a CPU pool with running (unpreemptible) work: the no-fit reason must
    // still carry its per-node counts after the preemption pass.
    let run = vec![running(1, 2, 1, Priority::Batch, 0, false)];
    let mut s = Scheduler::new(Config::default(), vec![busy_node(&run), cpu_node(2, 4, 64)]);
    let plan = s.schedule_with(
        10,
        &run,
        &mut HashMap::new(),
        &[job(1, 1, 1000, Some(("H100", 1)), false)],
    );
    let r = &plan.pending[&JobId(1)][0];
    assert_eq!(r.message, "no node fits: 2 nodes lack gpu/H100");
    assert_eq!(r.counts["lack gpu/H100"], 2);
    let mut g = job(2, 3, 1000, None, true);
    g.resources.cpu_milli = 4000;
    let plan = s.schedule_with(10, &run, &mut HashMap::new(), &[g]);
    let r = &plan.pending[&JobId(2)][0];
    assert!(
        r.message
            .starts_with("gang: only 1 of 3 tasks fit together; no node fits: 2 nodes lack cpu"),
        "{}",
        r.message
    );
}

// ---- backfill ----

fn ending(run: u64, node: u64, end: i64) -> RunningTask {
    let mut t = running(run, 9, node, Priority::Batch, 0, false);
    t.expected_end_ms = Some(end);
    t
}

fn with_runtime(mut j: JobReq, ms: Option<u64>) -> JobReq {
    j.max_runtime_ms = ms;
    j
}

/// Node 1: 8 CPUs, 4 held by four tasks that end at t=100 s.
fn half_held_until_100s() -> (Vec<RunningTask>, NodeSnap) {
    let run: Vec<RunningTask> = (0..4).map(|i| ending(i, 1, 100_000)).collect();
    let mut n1 = cpu_node(1, 8, 64);
    n1.used_cpu_milli = 4000;
    n1.used_memory_bytes = 4 << 30;
    (run, n1)
}

#[test]
fn backfill_that_would_delay_the_head_job_is_refused() {
    // Node 1 has 8 CPUs, 4 held by tasks that end at t=100 s. The head job needs all 8.
    let (run, n1) = half_held_until_100s();
    let mut s = Scheduler::new(Config::default(), vec![n1]);
    let head = tjob(1, 1, 1, 8000, 1);
    let too_long = with_runtime(tjob(2, 2, 1, 1000, 1), Some(200_000));
    let unbounded = with_runtime(tjob(3, 3, 1, 1000, 1), None);
    let short = with_runtime(tjob(4, 4, 1, 1000, 1), Some(50_000));
    let plan = s.schedule_with(
        0,
        &run,
        &mut HashMap::new(),
        &[head, too_long, unbounded, short],
    );
    let (rj, at, nodes) = plan
        .reservations
        .first()
        .cloned()
        .expect("the head job holds a reservation");
    assert_eq!((rj, at, nodes), (JobId(1), 100_000, vec![NodeId(1)]));
    let placed: Vec<JobId> = plan.placements.iter().map(|p| p.job).collect();
    assert_eq!(
        placed,
        vec![JobId(4)],
        "only the job that ends before t=100 s backfills"
    );
    assert_eq!(
        plan.pending[&JobId(1)]
            .iter()
            .find(|r| r.code == "reserved")
            .unwrap()
            .counts["starts_in_ms"],
        100_000
    );
    for j in [2, 3] {
        let r = plan.pending[&JobId(j)]
            .iter()
            .find(|r| r.code == "backfill")
            .unwrap();
        assert!(
            r.message.starts_with("held for the reservation of job 1"),
            "{}",
            r.message
        );
    }
}

#[test]
fn a_gang_kept_out_only_by_the_reservation_does_not_stop_a_shorter_gang_of_its_shape() {
    // As above: the head job reserves node 1 until t=100 s. Two gangs of the same shape;
    // the first would run past t=100 s, the second ends before it and backfills.
    let (run, n1) = half_held_until_100s();
    for explain in [true, false] {
        let cfg = Config {
            explain_pending: explain,
            ..Config::default()
        };
        let mut s = Scheduler::new(cfg, vec![n1.clone()]);
        let gang = |id, ms| {
            let mut j = with_runtime(tjob(id, id, 2, 1000, 1), Some(ms));
            j.gang = true;
            j
        };
        let plan = s.schedule_with(
            0,
            &run,
            &mut HashMap::new(),
            &[tjob(1, 1, 1, 8000, 1), gang(2, 200_000), gang(3, 50_000)],
        );
        assert_eq!(plan.reservations.first().map(|r| r.0), Some(JobId(1)));
        let placed: Vec<JobId> = plan.placements.iter().map(|p| p.job).collect();
        assert_eq!(placed, vec![JobId(3), JobId(3)], "explain {explain}");
        assert!(plan.pending[&JobId(2)].iter().any(|r| r.code == "backfill"));
    }
}

/// An 8-CPU node held whole by eight one-CPU tasks that end at `end` (0: an empty node).
fn full_until(node: u64, end: i64, run: &mut Vec<RunningTask>) -> NodeSnap {
    let mut n = cpu_node(node, 8, 64);
    if end > 0 {
        for k in 0..8 {
            run.push(ending(node * 10 + k, node, end));
        }
        n.used_cpu_milli = 8000;
        n.used_memory_bytes = 8 << 30;
    }
    n
}

#[test]
fn later_reservations_follow_earlier_ones_on_the_same_nodes() {
    // Three 8-CPU nodes: 1 full until t=50 s, 2 until 100 s, 3 until 900 s. Gang 1 (two
    // whole nodes, max runtime 200 s) can start at 100 s on nodes 1 and 2 and is gone by
    // 300 s; gang 2 (max 1,000 s) fits nowhere sooner than on the same two nodes at 300 s.
    // Job 3 (one node, max 30 s) can run on node 1 from 50 s and be gone before gang 1's
    // window opens. Conservative backfill stacks the three in time on nodes 1 and 2.
    let mut run = Vec::new();
    let mut nodes = Vec::new();
    for (node, end) in [(1u64, 50_000i64), (2, 100_000), (3, 900_000)] {
        nodes.push(full_until(node, end, &mut run));
    }
    let gang = |id, ms| {
        let mut j = with_runtime(tjob(id, 1, 2, 8000, 1), Some(ms));
        j.gang = true;
        j
    };
    let jobs = [
        gang(1, 200_000),
        gang(2, 1_000_000),
        with_runtime(tjob(3, 1, 1, 8000, 1), Some(30_000)),
    ];
    let cfg = Config {
        reservations: 3,
        ..Config::default()
    };
    let plan = Scheduler::new(cfg, nodes).schedule_with(0, &run, &mut HashMap::new(), &jobs);
    assert!(plan.placements.is_empty());
    assert_eq!(
        plan.reservations,
        vec![
            (JobId(1), 100_000, vec![NodeId(1), NodeId(2)]),
            (JobId(2), 300_000, vec![NodeId(1), NodeId(2)]),
            (JobId(3), 50_000, vec![NodeId(1)]),
        ]
    );
    for j in [1, 2, 3] {
        assert!(
            plan.pending[&JobId(j)].iter().any(|r| r.code == "reserved"),
            "job {j}: {:?}",
            plan.pending[&JobId(j)]
        );
    }
}

#[test]
fn a_max_runtime_past_the_end_of_time_holds_its_reserved_nodes_for_good() {
    let mut run = Vec::new();
    let nodes = vec![full_until(1, 100_000, &mut run)];
    let mut s = Scheduler::new(Config::default(), nodes);
    s.set_running(run);
    let forever = with_runtime(tjob(1, 1, 1, 8000, 1), Some(u64::MAX));
    let res = s.reserve(&forever, 0).expect("fits once node 1 empties");
    assert_eq!((res.at, res.until), (100_000, None));
    let hour = with_runtime(tjob(2, 1, 1, 8000, 1), Some(3_600_000));
    let res = s.reserve(&hour, 0).expect("fits once node 1 empties");
    assert_eq!(res.until, Some(3_700_000));
}

#[test]
fn with_two_reservations_backfill_may_not_delay_the_second_waiting_gang() {
    // Four 8-CPU nodes: 1 and 2 full until t=100 s, 3 full until t=300 s, 4 empty. Two
    // gangs of two whole nodes wait; gang 1 can start at 100 s on nodes 1 and 2, gang 2 at
    // 300 s on nodes 3 and 4. A job that would hold node 4 until t=500 s delays gang 2.
    let mut run = Vec::new();
    let mut nodes = Vec::new();
    for (node, end) in [(1u64, 100_000i64), (2, 100_000), (3, 300_000), (4, 0)] {
        nodes.push(full_until(node, end, &mut run));
    }
    let gang = |id| {
        let mut j = with_runtime(tjob(id, 1, 2, 8000, 1), Some(1_000_000));
        j.gang = true;
        j
    };
    let jobs = [
        gang(1),
        gang(2),
        with_runtime(tjob(3, 1, 1, 8000, 1), Some(500_000)),
        with_runtime(tjob(4, 1, 1, 8000, 1), Some(200_000)),
    ];
    let plan_with = |reservations| {
        let cfg = Config {
            reservations,
            ..Config::default()
        };
        Scheduler::new(cfg, nodes.clone()).schedule_with(0, &run, &mut HashMap::new(), &jobs)
    };
    let placed = |plan: &Plan| -> Vec<JobId> { plan.placements.iter().map(|p| p.job).collect() };

    // EASY: only gang 1's start is protected; job 3 takes node 4 and gang 2 waits to 500 s.
    let easy = plan_with(1);
    assert_eq!(easy.reservations.len(), 1);
    assert_eq!(easy.reservations[0].0, JobId(1));
    assert_eq!(placed(&easy), vec![JobId(3)]);

    // Two: gang 2 holds nodes 3 and 4 from 300 s; job 3 would run past that and waits,
    // job 4 ends by then and backfills.
    let two = plan_with(2);
    let held: Vec<(JobId, i64, Vec<NodeId>)> = two.reservations.clone();
    assert_eq!(
        held,
        vec![
            (JobId(1), 100_000, vec![NodeId(1), NodeId(2)]),
            (JobId(2), 300_000, vec![NodeId(3), NodeId(4)]),
        ]
    );
    assert_eq!(placed(&two), vec![JobId(4)]);
    let r = two.pending[&JobId(3)]
        .iter()
        .find(|r| r.code == "backfill")
        .expect("job 3 says what holds it");
    assert!(
        r.message.starts_with("held for the reservation of job 2")
            && r.message.contains("2 jobs hold reservations"),
        "{}",
        r.message
    );
    assert!(two.pending[&JobId(2)].iter().any(|r| r.code == "reserved"));
}

#[test]
fn jobs_away_from_the_reservation_are_not_held() {
    let (run, n1) = half_held_until_100s();
    let mut s = Scheduler::new(Config::default(), vec![n1, cpu_node(2, 2, 64)]);
    let plan = s.schedule_with(
        0,
        &run,
        &mut HashMap::new(),
        &[
            tjob(1, 1, 1, 8000, 1),
            with_runtime(tjob(2, 2, 1, 1000, 1), None),
        ],
    );
    assert_eq!(plan.placements.len(), 1);
    assert_eq!(
        plan.placements[0].node,
        NodeId(2),
        "the unbounded job runs on the unreserved node"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Backfill never delays a reserved job: after the cycle, once every running task and
    /// every job placed this cycle that ends by a reservation's time has ended, its job fits
    /// on the nodes reserved for it. With several reservations, no node is in two whose
    /// windows overlap.
    #[test]
    fn backfill_never_delays_the_reservation(
        nodes_n in 1u64..6,
        runs in prop::collection::vec((0u64..6, 1u64..200), 0..20),
        jobs in prop::collection::vec((1u64..9, prop::option::of(1u64..300), 0u64..4), 1..12),
        reservations in 1usize..4,
    ) {
        let cfg = Config { reservations, ..Config::default() };
        let mut nodes: Vec<NodeSnap> = (0..nodes_n).map(|i| cpu_node(i, 8, 64)).collect();
        let mut running_tasks = Vec::new();
        for (k, (n, end_s)) in runs.iter().enumerate() {
            let n = (*n % nodes_n) as usize;
            if nodes[n].used_cpu_milli + 1000 > nodes[n].capacity.cpu_milli {
                continue;
            }
            nodes[n].used_cpu_milli += 1000;
            nodes[n].used_memory_bytes += 1 << 30;
            running_tasks.push(ending(k as u64, n as u64, *end_s as i64 * 1000));
        }
        let reqs: Vec<JobReq> = jobs
            .iter()
            .enumerate()
            .map(|(i, (cpus, rt, t))| with_runtime(tjob(i as u64, *t, 1, cpus * 1000, 1), rt.map(|s| s * 1000)))
            .collect();
        let mut s = Scheduler::new(cfg.clone(), nodes.clone());
        let plan = s.schedule_with(0, &running_tasks, &mut HashMap::new(), &reqs);
        // Determinism, with reservations and preemption in play.
        let mut again = Scheduler::new(cfg, nodes);
        prop_assert_eq!(&again.schedule_with(0, &running_tasks, &mut HashMap::new(), &reqs), &plan);
        prop_assert!(plan.reservations.len() <= reservations);
        // A node in two reservations: one job's max runtime ends before the other starts.
        let window = |j: &JobId, at: i64| {
            let len = reqs.iter().find(|r| r.id == *j).unwrap().max_runtime_ms;
            (at, len.map_or(i64::MAX, |l| at + l as i64))
        };
        for (a, (ja, at_a, na)) in plan.reservations.iter().enumerate() {
            for (jb, at_b, nb) in &plan.reservations[a + 1..] {
                let (sa, ea) = window(ja, *at_a);
                let (sb, eb) = window(jb, *at_b);
                if na.iter().any(|n| nb.contains(n)) {
                    prop_assert!(ea <= sb || eb <= sa, "jobs {} and {} overlap on a node", ja, jb);
                }
            }
        }
        for (rj, at, rnodes) in &plan.reservations {
            prop_assert!(!plan.placements.iter().any(|p| p.job == *rj));
            let mut after: Vec<NodeSnap> = s.nodes().to_vec();
            for t in &running_tasks {
                if t.expected_end_ms.is_some_and(|e| e <= *at) {
                    let n = after.iter_mut().find(|n| n.id == t.node).unwrap();
                    n.release(&t.resources, &t.devices);
                }
            }
            for p in &plan.placements {
                let j = reqs.iter().find(|j| j.id == p.job).unwrap();
                if j.max_runtime_ms.is_some_and(|m| m as i64 <= *at) {
                    let n = after.iter_mut().find(|n| n.id == p.node).unwrap();
                    n.release(&j.resources, &p.devices);
                }
            }
            let head = reqs.iter().find(|j| j.id == *rj).unwrap();
            let mut left = head.pending.len();
            for n in after.iter_mut().filter(|n| rnodes.contains(&n.id)) {
                while left > 0 && fit(&Config::default(), n, &head.resources).is_ok() {
                    let r = head.resources.clone();
                    n.allocate(&r, &[]);
                    left -= 1;
                }
            }
            prop_assert_eq!(left, 0, "job {} no longer fits at its reservation time", rj);
        }
    }
}

/// The reservation search as first written: a greedy fit over every node the job may use
/// at every stop. `Scheduler::reserve` keeps a running count instead; the two must agree.
fn reserve_reference(
    s: &Scheduler,
    job: &JobReq,
    now: caravel_core::Millis,
) -> Option<Reservation> {
    let need = job.pending.len() as u64;
    walk_ends(s, job, now, |t, scratch, ok| {
        // Greedy fit over the nodes that changed plus every other node as it is now.
        let order = scratch
            .keys()
            .copied()
            .chain((0..s.nodes.len()).filter(|i| !scratch.contains_key(i)))
            .filter(|&i| ok(i));
        let base = |i: usize| scratch.get(&i).unwrap_or(&s.nodes[i]);
        fit_greedily(&s.cfg, order, base, &job.resources, need).map(|chosen| Reservation {
            job: job.id,
            at: t,
            until: job.max_runtime_ms.map(|m| t + m as i64),
            nodes: chosen,
            drained: false,
        })
    })
}

/// Releases running tasks in end order on scratch copies of their nodes and asks `at`, at
/// each stop, whether the job fits then (the references' shared walk). The stops: every end
/// time, and every time from `now` on when a node another reservation holds may turn
/// usable for `job` (that window closes) or unusable (the job would no longer be gone
/// before it opens). `at` gets whether the job may use a node at the stop.
fn walk_ends<T>(
    s: &Scheduler,
    job: &JobReq,
    now: caravel_core::Millis,
    mut at: impl FnMut(
        caravel_core::Millis,
        &BTreeMap<usize, NodeSnap>,
        &dyn Fn(usize) -> bool,
    ) -> Option<T>,
) -> Option<T> {
    let len = job.max_runtime_ms.map(|m| m as i64);
    let ends: Vec<(caravel_core::Millis, usize, &RunningTask)> = s.ends_from(now).collect();
    let mut stops: BTreeSet<caravel_core::Millis> = ends.iter().map(|e| e.0).collect();
    for r in &s.reservations {
        stops.extend(r.until.filter(|&u| u >= now));
        stops.extend(len.map(|l| r.at - l + 1).filter(|&x| x >= now));
    }
    // Ordered: the greedy fit walks it, and must walk it the same way every run.
    let mut scratch: BTreeMap<usize, NodeSnap> = BTreeMap::new();
    let mut k = 0;
    for t in stops {
        while k < ends.len() && ends[k].0 <= t {
            let (_, i, task) = ends[k];
            scratch
                .entry(i)
                .or_insert_with(|| s.nodes[i].clone())
                .release(&task.resources, &task.devices);
            k += 1;
        }
        let ok = |i: usize| {
            s.reservations
                .iter()
                .filter(|r| r.nodes.contains(&i))
                .all(|r| len.is_some_and(|l| t + l <= r.at) || r.until.is_some_and(|u| t >= u))
        };
        if let Some(found) = at(t, &scratch, &ok) {
            return Some(found);
        }
    }
    None
}

/// Reservations made before the one searched for (each on some of up to ten nodes, from
/// `at`, until its job's max runtime runs out or not known), and the searched job's max
/// runtime.
fn arb_others() -> impl Strategy<Value = (Vec<Reservation>, Option<u64>)> {
    (
        prop::collection::vec((1u32..1024, 0i64..60, prop::option::of(1i64..60)), 0..3),
        prop::option::of(1u64..60),
    )
        .prop_map(|(rs, len)| {
            let others = rs
                .into_iter()
                .enumerate()
                .map(|(k, (mask, at_s, len_s))| Reservation {
                    job: JobId(100 + k as u64),
                    at: at_s * 1000,
                    until: len_s.map(|l| (at_s + l) * 1000),
                    nodes: (0..10).filter(|i| mask & (1 << i) != 0).collect(),
                    drained: false,
                })
                .collect();
            (others, len.map(|l| l * 1000))
        })
}

fn arb_reserve_world() -> impl Strategy<Value = (Vec<NodeSnap>, Vec<RunningTask>, JobReq)> {
    let models = ["H100", "A100"];
    (
        prop::collection::vec((1u64..5, 0u32..5, 0usize..2), 1..10),
        prop::collection::vec((0usize..10, 0usize..4, 0i64..50, 1u64..4), 0..30),
        (1u32..6, 0usize..4, 1u32..4, any::<bool>(), 1u64..4),
    )
        .prop_map(move |(ns, rs, (tasks, kind, gc, gang, cpus))| {
            let mut nodes: Vec<NodeSnap> = ns
                .iter()
                .enumerate()
                .map(|(i, (c, g, m))| {
                    let mut n = gpu_node(i as u64, models[*m], *g);
                    std::sync::Arc::make_mut(&mut n.capacity).cpu_milli = c * 4000;
                    n
                })
                .collect();
            // What each task asks: whole GPUs of a model, a share of one, or CPU only.
            let shape = |kind: usize, gc: u32, cpus: u64, salt: usize| TaskResources {
                needs: Default::default(),
                cpu_milli: cpus * 1000,
                memory_bytes: 1 << 30,
                gpu: match kind {
                    0 => Some(GpuRequest::whole(models[salt % 2], gc)),
                    1 => Some(GpuRequest {
                        milli: Some([250, 500, 700][gc as usize % 3]),
                        ..GpuRequest::whole(models[salt % 2], 1)
                    }),
                    2 => Some(GpuRequest {
                        any_of: vec![models[(salt + 1) % 2].to_string()],
                        ..GpuRequest::whole(models[salt % 2], gc)
                    }),
                    _ => None,
                },
            };
            let cfg = Config::default();
            let mut running = Vec::new();
            for (k, (n, kind, end_s, cpus)) in rs.into_iter().enumerate() {
                let i = n % nodes.len();
                let res = shape(kind, 1 + k as u32 % 2, cpus, k);
                if let Ok((_, devs)) = fit(&cfg, &nodes[i], &res) {
                    nodes[i].allocate(&res, &devs);
                    let mut t = ending(k as u64, i as u64, end_s * 1000);
                    t.resources = res;
                    t.devices = devs;
                    running.push(t);
                }
            }
            let mut j = tjob(1, 1, tasks, cpus * 1000, 1);
            j.resources = shape(kind, gc, cpus, tasks as usize);
            j.gang = gang;
            (nodes, running, j)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn reservation_search_agrees_with_a_scan_of_every_node(
        (nodes, running, job) in arb_reserve_world(),
        (others, len) in arb_others(),
        now in 0i64..30_000,
    ) {
        let mut s = Scheduler::new(Config::default(), nodes);
        s.set_running(running);
        let others = others.into_iter().map(|mut r| {
            r.nodes.retain(|&i| i < s.nodes.len());
            r
        });
        s.set_reservations(others.collect());
        let job = with_runtime(job, len);
        let fast = s.reserve(&job, now).map(|r| (r.at, r.nodes));
        let slow = reserve_reference(&s, &job, now).map(|r| (r.at, r.nodes));
        prop_assert_eq!(&fast, &slow);
    }
}

/// `reserve_reference` for a gang held to a domain: at every end time, every domain's room
/// counted over all its nodes, the fitting ones tried least room first, then in key order.
fn reserve_in_domain_reference(
    s: &Scheduler,
    job: &JobReq,
    level: TopologyLevel,
    now: caravel_core::Millis,
) -> Option<(caravel_core::Millis, BTreeSet<usize>)> {
    let need = job.pending.len() as u64;
    let r = &job.resources;
    let key = |i: usize| {
        let (a, b, c, d) = domain_of(&s.nodes[i], level);
        (a.to_string(), b.to_string(), c.to_string(), d)
    };
    let mut domains: BTreeMap<_, Vec<usize>> = BTreeMap::new();
    for i in 0..s.nodes.len() {
        domains.entry(key(i)).or_default().push(i);
    }
    walk_ends(s, job, now, |t, scratch, ok| {
        let base = |i: usize| scratch.get(&i).unwrap_or(&s.nodes[i]);
        let room = |i: usize| if ok(i) { base(i).room_for(r) } else { 0 };
        let mut fitting: Vec<(u64, _)> = domains
            .iter()
            .map(|(d, members)| (members.iter().map(|i| room(*i)).sum(), d))
            .filter(|(total, _)| *total >= need)
            .collect();
        fitting.sort();
        fitting.into_iter().find_map(|(_, d)| {
            let members = &domains[d];
            let order = scratch
                .keys()
                .copied()
                .filter(|i| members.contains(i))
                .chain(members.iter().copied().filter(|i| !scratch.contains_key(i)))
                .filter(|&i| ok(i));
            fit_greedily(&s.cfg, order, base, r, need).map(|chosen| (t, chosen))
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// The same for gangs held to a rack, a zone or a node: nodes spread over two zones of
    /// two racks.
    #[test]
    fn domain_reservation_search_agrees_with_a_scan_of_every_domain(
        (nodes, running, job) in arb_reserve_world(),
        now in 0i64..30_000,
        level in prop::sample::select(vec![TopologyLevel::Node, TopologyLevel::Rack, TopologyLevel::Zone]),
        (others, len) in arb_others(),
    ) {
        let nodes: Vec<NodeSnap> = nodes
            .into_iter()
            .enumerate()
            .map(|(i, mut n)| {
                n.topology = Topology {
                    region: "r".into(),
                    zone: format!("z{}", i % 2),
                    rack: format!("rack{}", i % 4),
                };
                n
            })
            .collect();
        let mut job = with_runtime(job, len);
        job.topology = Some(level);
        let mut s = Scheduler::new(Config::default(), nodes);
        s.set_running(running);
        let others = others.into_iter().map(|mut r| {
            r.nodes.retain(|&i| i < s.nodes.len());
            r
        });
        s.set_reservations(others.collect());
        let fast = s.reserve(&job, now).map(|r| (r.at, r.nodes));
        let slow = reserve_in_domain_reference(&s, &job, level, now);
        prop_assert_eq!(&fast, &slow);
    }
}

#[test]
fn a_gang_held_to_a_rack_reserves_one_rack_and_backfill_works_around_it() {
    // Rack a: nodes 1, 3, 5; rack b: nodes 2, 4. All 8-CPU nodes; node 5 is free, the
    // others full until 50 s (1), 100 s (2), 300 s (3) and 400 s (4). A three-member gang
    // held to a rack can start at 300 s in rack a (across racks it could at 100 s).
    let mut run = Vec::new();
    let mut nodes = Vec::new();
    for (node, rack, end) in [
        (1u64, "a", 50_000i64),
        (2, "b", 100_000),
        (3, "a", 300_000),
        (4, "b", 400_000),
        (5, "a", 0),
    ] {
        let mut n = full_until(node, end, &mut run);
        n.topology = Topology {
            region: "r".into(),
            zone: "z".into(),
            rack: rack.into(),
        };
        nodes.push(n);
    }
    let mut gang = with_runtime(tjob(1, 1, 3, 8000, 1), Some(1_000_000));
    gang.gang = true;
    gang.topology = Some(TopologyLevel::Rack);
    let jobs = [
        gang,
        with_runtime(tjob(2, 1, 1, 8000, 1), Some(600_000)),
        with_runtime(tjob(3, 1, 1, 8000, 1), Some(200_000)),
    ];
    let mut s = Scheduler::new(Config::default(), nodes);
    let plan = s.schedule_with(0, &run, &mut HashMap::new(), &jobs);
    assert_eq!(
        plan.reservations,
        vec![(JobId(1), 300_000, vec![NodeId(1), NodeId(3), NodeId(5)])]
    );
    let placed: Vec<JobId> = plan.placements.iter().map(|p| p.job).collect();
    assert_eq!(
        placed,
        vec![JobId(3)],
        "only the job ending by 300 s takes node 5"
    );
    assert_eq!(plan.placements[0].node, NodeId(5));
    assert!(plan.pending[&JobId(1)].iter().any(|r| r.code == "reserved"));
    assert!(plan.pending[&JobId(2)].iter().any(|r| r.code == "backfill"));
}

// ---- over time: a tiny discrete-time driver of the real scheduler ----

/// Jobs run for `dur` steps (at most their max runtime); victims of preemption stop one
/// step after they are named (the grace period). Returns the step each job first placed
/// all its tasks, or None for jobs that never did within `max_steps`.
fn drive(
    caps: &[(u64, u64)],
    tenants: &HashMap<TenantId, TenantSnap>,
    jobs: &[(JobReq, i64)],
    arrivals: &[i64],
    max_steps: i64,
) -> Vec<Option<i64>> {
    const STEP: i64 = 1000;
    let mut nodes: Vec<NodeSnap> = caps
        .iter()
        .enumerate()
        .map(|(i, (c, m))| cpu_node(i as u64, *c, *m))
        .collect();
    let mut running: Vec<(RunningTask, i64)> = Vec::new(); // task, end step
    let mut pending: Vec<JobReq> = Vec::new();
    let mut started: Vec<Option<i64>> = vec![None; jobs.len()];
    let mut placed_count: HashMap<JobId, usize> = HashMap::new();
    let mut stopping: BTreeSet<caravel_core::RunId> = BTreeSet::new();
    let mut next_run = 0u64;
    let mut used: HashMap<TenantId, ResourceSum> = HashMap::new();
    for step in 0..max_steps {
        let now = step * STEP;
        // Tasks that end (or were preempted last step) free their room; preempted ones requeue.
        let (done, keep): (Vec<_>, Vec<_>) = running
            .into_iter()
            .partition(|(t, end)| *end <= step || stopping.contains(&t.run));
        running = keep;
        for (t, end) in done {
            let n = nodes.iter_mut().find(|n| n.id == t.node).unwrap();
            n.release(&t.resources, &t.devices);
            used.get_mut(&t.tenant).unwrap().sub_task(&t.resources, 1);
            if stopping.remove(&t.run) && end > step {
                let j = jobs.iter().find(|(j, _)| j.id == t.job).unwrap().0.clone();
                match pending.iter_mut().find(|p| p.id == j.id) {
                    Some(p) => p.pending.push(0),
                    None => pending.push(JobReq {
                        pending: vec![0],
                        ..j
                    }),
                }
            }
        }
        for (i, (j, _)) in jobs.iter().enumerate() {
            if arrivals[i] == step {
                pending.push(j.clone());
            }
        }
        if pending.is_empty() && running.is_empty() && arrivals.iter().all(|a| *a < step) {
            break;
        }
        let mut ts: HashMap<TenantId, TenantSnap> = tenants.clone();
        for (t, u) in &used {
            ts.entry(*t).or_default().used = u.clone();
        }
        let live: Vec<RunningTask> = running
            .iter()
            .filter(|(t, _)| !stopping.contains(&t.run))
            .map(|(t, _)| t.clone())
            .collect();
        let mut s = Scheduler::new(Config::default(), nodes.clone());
        let plan = s.schedule_with(now, &live, &mut ts, &pending);
        for p in &plan.preemptions {
            stopping.insert(p.run);
        }
        for p in &plan.placements {
            let (j, dur) = jobs.iter().find(|(j, _)| j.id == p.job).unwrap();
            let n = nodes.iter_mut().find(|n| n.id == p.node).unwrap();
            n.allocate(&j.resources, &p.devices);
            used.entry(j.tenant).or_default().add_task(&j.resources, 1);
            running.push((
                RunningTask {
                    run: caravel_core::RunId(next_run),
                    job: j.id,
                    tenant: j.tenant,
                    node: p.node,
                    priority: j.priority,
                    resources: j.resources.clone(),
                    devices: p.devices.clone(),
                    started_ms: now,
                    min_runtime_ms: 0,
                    borrowed: !preempt::within_guarantee(
                        &tenants
                            .get(&j.tenant)
                            .cloned()
                            .unwrap_or_default()
                            .guarantee,
                        &ResourceSum::default(),
                        &j.resources,
                        1,
                    ),
                    expected_end_ms: j.max_runtime_ms.map(|m| now + m as i64),
                    gang_size: if j.gang { j.pending.len() as u32 } else { 1 },
                    attained_gpu_ms: 0,
                    saved_ms: None,
                    save_every_ms: 0,
                },
                step + dur,
            ));
            next_run += 1;
            let c = placed_count.entry(j.id).or_default();
            *c += 1;
            let idx = jobs.iter().position(|(x, _)| x.id == j.id).unwrap();
            if *c >= j.pending.len() && started[idx].is_none() {
                started[idx] = Some(step);
            }
            let pj = pending.iter_mut().find(|x| x.id == j.id).unwrap();
            pj.pending.pop();
        }
        pending.retain(|j| !j.pending.is_empty());
    }
    started
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(60))]

    /// No starvation: with finite work that fits the pool, every job eventually runs —
    /// big gangs included, whatever the stream of small jobs around them.
    #[test]
    fn with_finite_work_every_job_eventually_runs(
        caps in prop::collection::vec((2u64..9, 8u64..33), 1..4),
        specs in prop::collection::vec((1u32..5, 1u64..4, 1i64..6, 0u64..3, any::<bool>(), 0i64..10), 1..25),
    ) {
        let max_cpu = caps.iter().map(|c| c.0).max().unwrap();
        let mut jobs = Vec::new();
        let mut arrivals = Vec::new();
        for (i, (tasks, cpus, dur, tenant, gang, at)) in specs.into_iter().enumerate() {
            let cpus = cpus.min(max_cpu);
            // A gang must fit the empty pool, or it is not finite work.
            let room: u64 = caps.iter().map(|(c, m)| (c / cpus).min(*m)).sum();
            let tasks = if gang { tasks.min(room as u32).max(1) } else { tasks };
            let mut j = tjob(i as u64, tenant, tasks, cpus * 1000, 1);
            j.gang = gang;
            j.max_runtime_ms = Some(dur as u64 * 1000);
            jobs.push((j, dur));
            arrivals.push(at);
        }
        let started = drive(&caps, &HashMap::new(), &jobs, &arrivals, 2_000);
        for (k, s) in started.iter().enumerate() {
            prop_assert!(s.is_some(), "job {} (tasks {}, gang {}) never ran", k, jobs[k].0.pending.len(), jobs[k].0.gang);
        }
    }

    /// A guarantee is honoured: an owner's work within its guarantee starts within the
    /// grace period plus one cycle, however much of the pool others borrowed.
    #[test]
    fn an_owners_guaranteed_work_starts_within_grace_plus_one_cycle(
        borrowers in prop::collection::vec((1u64..4, 1u32..9), 1..6),
        owner_tasks in 1u32..5,
        at in 1i64..5,
    ) {
        let mut tenants = HashMap::new();
        tenants.insert(TenantId(0), guaranteed(4));
        let mut jobs = Vec::new();
        let mut arrivals = Vec::new();
        for (i, (t, n)) in borrowers.iter().enumerate() {
            let mut j = tjob(100 + i as u64, *t, *n, 1000, 1);
            j.max_runtime_ms = Some(1_000_000);
            jobs.push((j, 1_000));
            arrivals.push(0);
        }
        let mut owner = tjob(1, 0, owner_tasks, 1000, 1);
        owner.max_runtime_ms = Some(5_000);
        jobs.push((owner, 5));
        arrivals.push(at);
        let started = drive(&[(4, 64), (2, 64)], &tenants, &jobs, &arrivals, 50);
        let s = started.last().unwrap().expect("the owner's job ran");
        // Victims named in the arrival step, gone in the next (grace), placed in that cycle.
        prop_assert!(s <= at + 1, "owner arrived at step {} but started at step {}", at, s);
    }
}

// ---- fractional GPUs and several models ----

fn frac(id: u64, model: &str, milli: u32) -> JobReq {
    let mut j = job(id, 1, 100, None, false);
    j.resources.gpu = Some(GpuRequest {
        milli: Some(milli),
        ..GpuRequest::whole(model, 1)
    });
    j
}

#[test]
fn fractions_pack_onto_shared_gpus_and_keep_whole_gpus_free() {
    let mut s = Scheduler::new(
        Config::default(),
        vec![gpu_node(1, "T4", 2), gpu_node(2, "T4", 2)],
    );
    let mut t = HashMap::new();
    let quarters: Vec<JobReq> = (0..4).map(|i| frac(i, "T4", 250)).collect();
    let plan = s.schedule(&mut t, &quarters);
    assert_eq!(plan.placements.len(), 4);
    let used: BTreeSet<(NodeId, u32)> = plan
        .placements
        .iter()
        .map(|p| (p.node, p.devices[0]))
        .collect();
    assert_eq!(used.len(), 1, "four quarters share one GPU: {used:?}");
    // Three whole GPUs stay free: a 2-GPU task fits on the untouched node and a 1-GPU
    // task beside the shared one.
    let plan = s.schedule(
        &mut t,
        &[
            job(10, 1, 100, Some(("T4", 2)), false),
            job(11, 1, 100, Some(("T4", 1)), false),
        ],
    );
    assert_eq!(plan.placements.len(), 2, "{plan:?}");
    // A fifth quarter finds no shared room left and no whole device: it waits.
    let plan = s.schedule(&mut t, &[frac(12, "T4", 250)]);
    assert!(plan.placements.is_empty());
}

#[test]
fn a_job_that_accepts_several_models_takes_the_next_when_the_first_is_full_or_over_quota() {
    let mut s = Scheduler::new(
        Config::default(),
        vec![gpu_node(1, "H100", 1), gpu_node(2, "A100", 2)],
    );
    let mut any = job(1, 2, 100, Some(("H100", 1)), false);
    any.resources.gpu.as_mut().unwrap().any_of = vec!["A100".into()];
    let plan = s.schedule(&mut HashMap::new(), &[any.clone()]);
    let models: Vec<&str> = plan
        .placements
        .iter()
        .map(|p| {
            s.nodes()
                .iter()
                .find(|n| n.id == p.node)
                .unwrap()
                .model_of(p.devices[0])
                .unwrap()
        })
        .collect();
    assert_eq!(
        models,
        vec!["H100", "A100"],
        "preferred model first, then the next"
    );
    // With no H100 quota the same request goes to A100 only.
    let mut s = Scheduler::new(
        Config::default(),
        vec![gpu_node(1, "H100", 1), gpu_node(2, "A100", 2)],
    );
    let mut t = HashMap::new();
    t.insert(
        TenantId(1),
        TenantSnap {
            quota: Quota::parse("gpu/H100=0").unwrap(),
            ..Default::default()
        },
    );
    let plan = s.schedule(&mut t, &[any]);
    assert_eq!(plan.placements.len(), 2);
    assert!(plan.placements.iter().all(|p| p.node == NodeId(2)));
    assert_eq!(
        t[&TenantId(1)].used.gpu_milli["A100"],
        2000,
        "accounted to the model it got"
    );
}

#[test]
fn within_a_tenant_at_its_cap_higher_priority_displaces_lower() {
    // Tenant 1 holds its whole 4-CPU cap with batch work; its online job needs 2 CPUs.
    let mut run: Vec<RunningTask> = (0..4)
        .map(|i| running(i, 1, 1, Priority::Batch, 100 * i as i64, false))
        .collect();
    run[0].priority = Priority::Spot;
    let mut s = Scheduler::new(Config::default(), vec![busy_node(&run), cpu_node(2, 8, 64)]);
    let mut t = HashMap::new();
    let mut used = ResourceSum::default();
    for r in &run {
        used.add_task(&r.resources, 1);
    }
    t.insert(
        TenantId(1),
        TenantSnap {
            quota: Quota::parse("cpu=4").unwrap(),
            used,
            ..Default::default()
        },
    );
    let mut online = tjob(9, 1, 2, 1000, 1);
    online.priority = Priority::Online;
    let plan = s.schedule_with(10_000, &run, &mut t, std::slice::from_ref(&online));
    assert_eq!(
        victims(&plan),
        vec![0, 3],
        "its spot task first, then its most recent batch task"
    );
    // Batch work of the same priority is never displaced by batch.
    let batch = tjob(10, 1, 1, 1000, 1);
    let plan = s.schedule_with(10_000, &run, &mut t, &[batch]);
    assert!(
        plan.preemptions.iter().all(|p| p.run.0 == 0),
        "only the spot task may go: {plan:?}"
    );
}

#[test]
fn a_job_squeezed_out_by_fair_share_says_where_its_tenant_stands() {
    let mut s = Scheduler::new(Config::default(), vec![cpu_node(1, 4, 100)]);
    let jobs = vec![tjob(1, 1, 4, 1000, 1), tjob(2, 2, 4, 1000, 1)];
    let plan = s.schedule(&mut HashMap::new(), &jobs);
    let r = plan.pending[&JobId(1)]
        .iter()
        .find(|r| r.code == "fair_share")
        .expect("a fair-share reason");
    assert_eq!(r.counts["tenants"], 2);
    assert!(
        r.message
            .starts_with("fair share: this tenant's weighted dominant share is 0.500"),
        "{}",
        r.message
    );
    assert_eq!(ordinal(1), "1st");
    assert_eq!(ordinal(12), "12th");
    assert_eq!(ordinal(23), "23rd");
}

// ---- FGD policy ----

/// One FGD workload type per job of the world, equally weighted.
fn world_types(w: &World) -> Vec<fgd::WorkloadType> {
    w.jobs
        .iter()
        .map(|j| fgd::WorkloadType {
            cpu_milli: j.resources.cpu_milli,
            memory_bytes: j.resources.memory_bytes,
            num_gpu: j.resources.gpu.as_ref().map(|g| g.count).unwrap_or(0),
            gpu_milli: j
                .resources
                .gpu
                .as_ref()
                .map(|g| g.milli.unwrap_or(1000))
                .unwrap_or(0),
            models: vec![],
            weight: 1.0 / w.jobs.len().max(1) as f64,
        })
        .collect()
}

/// What a plan placed, as running tasks: half of it spot (even job ids), so a second wave
/// has victims to find; `end(k)` is the k-th placement's expected end.
fn placed_as_running(
    w: &World,
    plan: &Plan,
    end: impl Fn(usize) -> Option<i64>,
) -> Vec<RunningTask> {
    plan.placements
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let j = w.jobs.iter().find(|j| j.id == p.job).unwrap();
            RunningTask {
                run: caravel_core::RunId(k as u64 + 1),
                job: p.job,
                tenant: j.tenant,
                node: p.node,
                priority: if p.job.0 % 2 == 0 {
                    Priority::Spot
                } else {
                    Priority::Batch
                },
                resources: j.resources.clone(),
                devices: p.devices.clone(),
                started_ms: 0,
                min_runtime_ms: 0,
                borrowed: true,
                expected_end_ms: end(k),
                gang_size: 1,
                attained_gpu_ms: 0,
                saved_ms: None,
                save_every_ms: 0,
            }
        })
        .collect()
}

fn fgd_cfg(types: Vec<fgd::WorkloadType>) -> Config {
    Config {
        fgd: Some(std::sync::Arc::new(types)),
        ..Config::default()
    }
}

fn wt(num_gpu: u32, gpu_milli: u32, weight: f64) -> fgd::WorkloadType {
    fgd::WorkloadType {
        cpu_milli: 100,
        memory_bytes: 1 << 20,
        num_gpu,
        gpu_milli,
        models: vec![],
        weight,
    }
}

#[test]
fn cpu_only_work_avoids_starving_a_gpu_dense_node() {
    // Expected GPU work asks 10 cores per GPU. Node 1: 8 GPUs and 90 cores (GPU-dense);
    // node 2: 2 GPUs and 90 cores (CPU-rich). A 30-core CPU-only task costs node 1 the
    // CPU of three GPUs' worth of future work, node 2 nothing: it goes to node 2, although
    // plain FGD sees no fragment on either yet.
    let mut w = wt(1, 1000, 1.0);
    w.cpu_milli = 10_000;
    let mut n1 = gpu_node(1, "T4", 8);
    std::sync::Arc::make_mut(&mut n1.capacity).cpu_milli = 90_000;
    let mut n2 = gpu_node(2, "T4", 2);
    std::sync::Arc::make_mut(&mut n2.capacity).cpu_milli = 90_000;
    let cpu_job = || job(1, 1, 30_000, None, false);
    let mut s = Scheduler::new(fgd_cfg(vec![w.clone()]), vec![n1.clone(), n2.clone()]);
    let plan = s.schedule(&mut HashMap::new(), &[cpu_job()]);
    assert_eq!(plan.placements[0].node, NodeId(2));
    // With the stranding term off (plain FGD), both nodes score alike and the first wins.
    let plain = Config {
        fgd_cpu_weight: 0.0,
        ..fgd_cfg(vec![w])
    };
    let mut s = Scheduler::new(plain, vec![n1, n2]);
    let plan = s.schedule(&mut HashMap::new(), &[cpu_job()]);
    assert_eq!(plan.placements[0].node, NodeId(1));
}

#[test]
fn fgd_puts_a_share_where_it_leaves_no_unusable_remainder() {
    // Workload: half 500-milli shares, half whole GPUs. Node 1 has a GPU with 500 used;
    // node 2 is empty. A 500 share on node 1's half-used GPU completes it (no fragment);
    // on node 2 it would split a whole GPU.
    let mut n1 = gpu_node(1, "T4", 2);
    n1.shared.insert(0, 500);
    let n2 = gpu_node(2, "T4", 2);
    let mut s = Scheduler::new(
        fgd_cfg(vec![wt(1, 500, 0.5), wt(1, 1000, 0.5)]),
        vec![n1, n2],
    );
    let mut j = job(1, 1, 100, Some(("T4", 1)), false);
    j.resources.gpu.as_mut().unwrap().milli = Some(500);
    let plan = s.schedule(&mut HashMap::new(), &[j]);
    assert_eq!(
        (plan.placements[0].node, plan.placements[0].devices.clone()),
        (NodeId(1), vec![0])
    );
}

/// A stand-in research policy for the extension point's own tests (the published
/// baselines live in `caravel_sim::baselines`, which has its own): the node with the
/// least CPU left after placing, a share on the tightest GPU; `uniform` picks at random.
#[derive(Debug)]
struct TestBaseline {
    uniform: bool,
}

impl baseline::Baseline for TestBaseline {
    fn score(
        &self,
        _: &NodeSnap,
        v: &baseline::View,
        q: &baseline::Req,
        _: &[fgd::WorkloadType],
        whole: &[u32],
    ) -> (i64, Vec<u32>) {
        (-(v.cpu_left - q.cpu), whole.to_vec())
    }

    fn uniform(&self) -> bool {
        self.uniform
    }

    fn share_device(
        &self,
        v: &baseline::View,
        q: &baseline::Req,
        draw: &mut dyn FnMut(u64) -> u64,
    ) -> baseline::ShareDevice {
        let mut fits: Vec<(i64, u32)> = v
            .gpu_left
            .iter()
            .filter(|g| g.1 >= q.milli)
            .map(|g| (g.1, g.0))
            .collect();
        fits.sort();
        match fits.len() {
            0 => baseline::ShareDevice::NoRoom,
            n if self.uniform => baseline::ShareDevice::Pick(fits[draw(n as u64) as usize].1),
            _ => baseline::ShareDevice::Pick(fits[0].1),
        }
    }
}

/// Policies 0..=5 of the property tests: a research policy through the extension point
/// (0 uniform); 6: Caravel's own.
fn test_baseline(policy: usize) -> Option<std::sync::Arc<dyn baseline::Baseline>> {
    (policy < 6).then(|| {
        std::sync::Arc::new(TestBaseline {
            uniform: policy == 0,
        }) as std::sync::Arc<dyn baseline::Baseline>
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    #[test]
    fn fgd_never_over_commits(w in arb_world(), policy in 0usize..7, seed in 0u64..4) {
        let types = world_types(&w);
        // Every placement policy, Caravel's and the baselines, through the same checks.
        let cfg = Config { baseline: test_baseline(policy), seed, ..fgd_cfg(types) };
        let mut s = Scheduler::new(cfg.clone(), w.nodes.clone());
        let mut tenants = w.tenants.clone();
        let plan = s.schedule(&mut tenants, &w.jobs);
        let mut again = Scheduler::new(cfg, w.nodes.clone());
        prop_assert_eq!(&plan, &again.schedule(&mut w.tenants.clone(), &w.jobs), "same seed, same plan");
        for n in s.nodes() {
            prop_assert!(n.used_cpu_milli <= n.capacity.cpu_milli);
            prop_assert!(n.used_memory_bytes <= n.capacity.memory_bytes);
            prop_assert!(n.shared.values().all(|u| *u <= 1000));
            prop_assert!(n.shared.keys().all(|d| !n.used_devices.contains(d)));
        }
        for j in w.jobs.iter().filter(|j| j.gang) {
            let placed = plan.placements.iter().filter(|p| p.job == j.id).count();
            prop_assert!(placed == 0 || placed == j.pending.len());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The one-pass score the placement loop uses equals FGD's delta plus the weighted
    /// stranding delta computed the long way.
    #[test]
    fn fgd_one_pass_score_equals_the_long_way(
        gpus in 1u32..10,
        used in proptest::collection::vec(0u32..=1000, 10),
        cpu_used in 0u64..64_000,
        req_milli in prop_oneof![Just(None), (1u32..1000).prop_map(Some)],
        req_count in 1u32..4,
        req_cpu in 0u64..16_000,
        shapes in proptest::collection::vec((0u32..4, 1u32..=1000, 0u64..32_000, 0.0f64..1.0), 1..8),
        weight in 0.0f64..5.0,
        other_model in any::<bool>(),
    ) {
        let mut n = gpu_node(1, "A100", gpus);
        n.used_cpu_milli = cpu_used;
        for d in 0..gpus {
            match used[d as usize] {
                0 => {}
                1000 => { n.used_devices.insert(d); }
                u => { n.shared.insert(d, u); }
            }
        }
        let count = if req_milli.is_some() { 1 } else { req_count };
        let r = TaskResources { needs: Default::default(),
            cpu_milli: req_cpu,
            memory_bytes: 1 << 20,
            gpu: Some(GpuRequest { milli: req_milli, ..GpuRequest::whole("A100", count) }),
        };
        let types: Vec<fgd::WorkloadType> = shapes
            .iter()
            .map(|(num, milli, cpu, w)| fgd::WorkloadType {
                cpu_milli: *cpu,
                memory_bytes: 1 << 20,
                num_gpu: *num,
                gpu_milli: if *num == 1 { *milli } else { 1000 },
                models: if other_model { vec!["H100".into()] } else { vec![] },
                weight: *w,
            })
            .collect();
        let cpg = fgd::cpu_per_gpu(&types, 1.0);
        for devs in fgd::device_choices(&n, &r) {
            let long = fgd::delta(&n, &r, &devs, &types) + weight * fgd::stranded_delta(&n, &r, &devs, cpg);
            let model = n.primary_model();
            let ok = fgd::models_ok(&types, model);
            let fast = fgd::score(&n, &r, &devs, &types, &ok, cpg, weight);
            prop_assert!((long - fast).abs() < 1e-6, "{long} vs {fast}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// Explanations are for people: with them off the plan places, preempts and leaves
    /// pending exactly the same work.
    #[test]
    fn explanations_never_change_a_plan(w in arb_world()) {
        let run = |explain: bool| {
            let cfg = Config { explain_pending: explain, ..Config::default() };
            let mut s = Scheduler::new(cfg, w.nodes.clone());
            let mut tenants = w.tenants.clone();
            let first = s.schedule(&mut tenants, &w.jobs);
            // What the first plan placed runs now; half of it as spot, so the second wave
            // (the same jobs again, as batch) has victims to find.
            let running = placed_as_running(&w, &first, |_| None);
            let again: Vec<JobReq> = w
                .jobs
                .iter()
                .map(|j| JobReq { id: JobId(j.id.0 + 1000), seq: j.seq + 1000, priority: Priority::Batch, ..j.clone() })
                .collect();
            let second = s.schedule_with(1_000, &running, &mut tenants, &again);
            (first, second)
        };
        let (a1, a2) = run(true);
        let (b1, b2) = run(false);
        prop_assert_eq!(&a1.placements, &b1.placements);
        prop_assert_eq!(&a2.placements, &b2.placements);
        prop_assert_eq!(&a2.preemptions, &b2.preemptions);
        let keys = |p: &Plan| p.pending.keys().copied().collect::<Vec<_>>();
        prop_assert_eq!(keys(&a1), keys(&b1));
        prop_assert_eq!(keys(&a2), keys(&b2));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Counting a gang's room before placing it changes nothing but the work done: the
    /// same plans, reasons and their counts included, as placing every member tentatively.
    #[test]
    fn counting_a_gangs_room_first_plans_as_placing_its_members(w in arb_world(), policy in 0usize..7, explain in any::<bool>()) {
        let types = world_types(&w);
        let run = |tentatively: bool| {
            let cfg = Config {
                explain_pending: explain,
                baseline: test_baseline(policy),
                // Caravel's policy both with FGD scoring and with the index's first fit.
                ..if policy == 6 && w.jobs.len() % 2 == 0 { Config::default() } else { fgd_cfg(types.clone()) }
            };
            let mut s = Scheduler::new(cfg, w.nodes.clone());
            s.place_gangs_tentatively = tentatively;
            let mut tenants = w.tenants.clone();
            let first = s.schedule(&mut tenants, &w.jobs);
            let running = placed_as_running(&w, &first, |k| Some(5_000 + 1_000 * (k as i64 % 4)));
            // The second wave declares max runtimes, so reservations hold nodes back too.
            let again: Vec<JobReq> = w
                .jobs
                .iter()
                .map(|j| JobReq {
                    id: JobId(j.id.0 + 1000),
                    seq: j.seq + 1000,
                    priority: Priority::Batch,
                    max_runtime_ms: Some(500 + 3_000 * (j.id.0 % 3)),
                    ..j.clone()
                })
                .collect();
            let second = s.schedule_with(1_000, &running, &mut tenants, &again);
            (first, second)
        };
        let gangs = w.jobs.iter().filter(|j| j.gang && j.pending.len() > 1).count();
        prop_assume!(gangs > 0);
        prop_assert_eq!(run(true), run(false));
    }
}

#[test]
fn work_that_accepts_any_model_leaves_a_scarce_model_to_its_pinned_work() {
    // One P100 node and ten T4 nodes. 20 % of the expected GPU demand accepts only P100
    // (a lot for one node), 30 % only T4 (little for ten), the rest any model. Plain FGD
    // sends a task that accepts both to the P100 node (there the T4-pinned 30 % could not
    // use the GPU it takes anyway); Caravel's pinned-pressure term keeps the scarce P100
    // for the work that can run nowhere else.
    let mut p100 = wt(1, 1000, 0.2);
    p100.models = vec!["P100".into()];
    let mut t4 = wt(1, 1000, 0.3);
    t4.models = vec!["T4".into()];
    let any = wt(1, 1000, 0.5);
    let types = vec![p100, t4, any];
    let mut nodes = vec![gpu_node(1, "P100", 4)];
    nodes.extend((2..12).map(|i| gpu_node(i, "T4", 4)));
    let p = fgd::pinned_pressure(&types, &nodes);
    assert!(p["P100"] > 2.0 && p["T4"] < 0.4, "{p:?}");
    let mut flexible = job(1, 1, 100, Some(("P100", 1)), false);
    flexible.resources.gpu.as_mut().unwrap().any_of = vec!["T4".into()];
    let mut s = Scheduler::new(fgd_cfg(types.clone()), nodes.clone());
    let plan = s.schedule(&mut HashMap::new(), std::slice::from_ref(&flexible));
    assert_ne!(plan.placements[0].node, NodeId(1));
    let off = Config {
        fgd_pin_weight: 0.0,
        ..fgd_cfg(types)
    };
    let mut s = Scheduler::new(off, nodes);
    let plan = s.schedule(&mut HashMap::new(), &[flexible]);
    assert_eq!(plan.placements[0].node, NodeId(1));
}

#[test]
fn a_zone_preference_is_kept_when_it_fits_and_dropped_when_it_does_not() {
    let mut a = cpu_node(1, 16, 64);
    a.topology.zone = "a".into();
    let mut b = cpu_node(2, 4, 16);
    b.topology.zone = "b".into();
    // Best fit alone would take the tighter node in zone b.
    let mut s = Scheduler::new(Config::default(), vec![a.clone(), b.clone()]);
    let plan = s.schedule(&mut HashMap::new(), &[job(1, 1, 2000, None, false)]);
    assert_eq!(plan.placements[0].node, NodeId(2));
    let mut s = Scheduler::new(Config::default(), vec![a.clone(), b.clone()]);
    s.set_zone_preferences([(JobId(1), "a".to_string())].into());
    let plan = s.schedule(&mut HashMap::new(), &[job(1, 1, 2000, None, false)]);
    assert_eq!(plan.placements[0].node, NodeId(1));
    // Zone b cannot hold 8 CPUs: the task goes where it fits.
    let mut s = Scheduler::new(Config::default(), vec![a, b]);
    s.set_zone_preferences([(JobId(1), "b".to_string())].into());
    let plan = s.schedule(&mut HashMap::new(), &[job(1, 1, 8000, None, false)]);
    assert_eq!(plan.placements[0].node, NodeId(1));
}

#[test]
fn a_victim_that_stops_alone_is_preferred_to_a_gang_member() {
    // Two full nodes, each running one borrowed 4-CPU task of tenant 2: on node 1 a member
    // of a 4-task gang (preempting it stops all four), on node 2 a task alone. Tenant 1
    // reclaims its guarantee from node 2's task, although node 1 comes first.
    let mut member = running(1, 2, 1, Priority::Batch, 0, true);
    member.resources.cpu_milli = 4000;
    member.gang_size = 4;
    let mut alone = running(2, 2, 2, Priority::Batch, 0, true);
    alone.resources.cpu_milli = 4000;
    let mut n1 = busy_node(std::slice::from_ref(&member));
    n1.id = NodeId(1);
    let mut n2 = busy_node(std::slice::from_ref(&alone));
    n2.id = NodeId(2);
    let mut t = HashMap::new();
    t.insert(TenantId(1), guaranteed(4));
    let mut s = Scheduler::new(Config::default(), vec![n1.clone(), n2.clone()]);
    let plan = s.schedule_with(
        10_000,
        &[member.clone(), alone.clone()],
        &mut t,
        &[tjob(1, 1, 1, 1000, 1)],
    );
    assert_eq!(victims(&plan), vec![2]);
    // Counted as one task, the gang member would have gone (node 1 is first).
    member.gang_size = 1;
    let mut s = Scheduler::new(Config::default(), vec![n1, n2]);
    let plan = s.schedule_with(10_000, &[member, alone], &mut t, &[tjob(1, 1, 1, 1000, 1)]);
    assert_eq!(victims(&plan), vec![1]);
}

#[test]
fn a_covered_job_goes_before_its_tenants_older_borrowing_work_and_keeps_what_it_reclaimed() {
    // Tenant 2 (no guarantee) borrowed the node tenant 1 is guaranteed. Tenant 1 waits with
    // an old job its guarantee does not cover (8 CPUs of a 4-CPU guarantee) and a younger
    // one it does (4 CPUs).
    let run: Vec<RunningTask> = (0..4)
        .map(|i| running(i, 2, 1, Priority::Batch, 0, true))
        .collect();
    let old = tjob(1, 1, 1, 8000, 1);
    let covered = tjob(5, 1, 1, 4000, 1);
    let mut s = Scheduler::new(Config::default(), vec![busy_node(&run)]);
    let mut t = HashMap::new();
    t.insert(TenantId(1), guaranteed(4));
    let mut b = TenantSnap::default();
    b.used.cpu_milli = 4000;
    b.used.memory_bytes = 4 << 30;
    t.insert(TenantId(2), b);
    let plan = s.schedule_with(10_000, &run, &mut t, &[old.clone(), covered.clone()]);
    let mut v = victims(&plan);
    v.sort();
    assert_eq!(v, vec![0, 1, 2, 3]);
    assert!(plan.preemptions.iter().all(|p| p.for_job == JobId(5)));

    // Next cycle: the victims have exited and wait again (as tenant 2's older job, holding
    // nothing now). The room goes to the job that reclaimed it, not back to the victims,
    // which would have it preempt them again every cycle.
    let requeued = tjob(0, 2, 4, 1000, 1);
    let mut s = Scheduler::new(Config::default(), vec![cpu_node(1, 4, 64)]);
    let mut t = HashMap::new();
    t.insert(TenantId(1), guaranteed(4));
    t.insert(TenantId(2), TenantSnap::default());
    let plan = s.schedule_with(11_000, &[], &mut t, &[requeued, old, covered]);
    let placed: Vec<u64> = plan.placements.iter().map(|p| p.job.0).collect();
    assert_eq!(placed, vec![5]);
    assert!(plan.preemptions.is_empty());
}

// ---- least attained service ----

fn las16() -> Config {
    Config {
        las: Some(Las {
            thresholds_gpu_s: vec![16 * 3600],
            min_slice_ms: 0,
        }),
        ..Config::default()
    }
}

const HOUR: i64 = 3_600_000;

/// A 4-GPU task of a two-member gang (job 100) on node `node`, started at 0.
fn gang_member(run: u64, node: u64, tenant: u64) -> RunningTask {
    RunningTask {
        run: caravel_core::RunId(run),
        job: JobId(100),
        tenant: TenantId(tenant),
        node: NodeId(node),
        priority: Priority::Batch,
        resources: TaskResources {
            needs: Default::default(),
            cpu_milli: 1000,
            memory_bytes: 1 << 30,
            gpu: Some(GpuRequest::whole("T4", 4)),
        },
        devices: vec![0, 1, 2, 3],
        started_ms: 0,
        min_runtime_ms: 0,
        borrowed: false,
        expected_end_ms: None,
        gang_size: 2,
        attained_gpu_ms: 0,
        saved_ms: None,
        save_every_ms: 0,
    }
}

fn full_pool(run: &[RunningTask]) -> Vec<NodeSnap> {
    (1..=2)
        .map(|id| {
            let mut n = gpu_node(id, "T4", 4);
            for t in run.iter().filter(|t| t.node == NodeId(id)) {
                n.allocate(&t.resources, &t.devices);
            }
            n
        })
        .collect()
}

#[test]
fn las_places_the_least_served_batch_job_first() {
    let mut old = job(1, 1, 1000, Some(("T4", 4)), false);
    old.attained_gpu_ms = 20 * 3_600_000; // 20 GPU-hours: the second queue
    let young = job(2, 1, 1000, Some(("T4", 4)), false);
    for (cfg, first) in [(Config::default(), 1), (las16(), 2)] {
        let mut s = Scheduler::new(cfg, vec![gpu_node(1, "T4", 4)]);
        let plan = s.schedule(&mut HashMap::new(), &[old.clone(), young.clone()]);
        let placed: Vec<u64> = plan.placements.iter().map(|p| p.job.0).collect();
        assert_eq!(placed, vec![first]);
    }
}

#[test]
fn las_preempts_the_tenants_most_served_gang_once_and_counts_its_members_freed() {
    // The gang has held 8 GPUs for 3 hours (24 GPU-hours, past the 16 GPU-hour boundary).
    let run = vec![gang_member(1, 1, 1), gang_member(2, 2, 1)];
    let newcomer = job(7, 2, 1000, Some(("T4", 4)), true);
    let mut s = Scheduler::new(las16(), full_pool(&run));
    let plan = s.schedule_with(
        3 * HOUR,
        &run,
        &mut HashMap::new(),
        std::slice::from_ref(&newcomer),
    );
    // One member is named; the other stops with it, so the second task needs no victim.
    assert_eq!(plan.preemptions.len(), 1, "{:?}", plan.preemptions);
    assert_eq!(plan.preemptions[0].for_job, JobId(7));
    assert_eq!(plan.pending[&JobId(7)][0].code, "preempting");

    // Not before the gang has passed the boundary (1 hour: 8 GPU-hours) ...
    let mut s = Scheduler::new(las16(), full_pool(&run));
    let plan = s.schedule_with(
        HOUR,
        &run,
        &mut HashMap::new(),
        std::slice::from_ref(&newcomer),
    );
    assert!(plan.preemptions.is_empty());
    // ... nor without LAS ...
    let mut s = Scheduler::new(Config::default(), full_pool(&run));
    let plan = s.schedule_with(
        3 * HOUR,
        &run,
        &mut HashMap::new(),
        std::slice::from_ref(&newcomer),
    );
    assert!(plan.preemptions.is_empty());
    // ... nor another tenant's work ...
    let theirs = vec![gang_member(1, 1, 2), gang_member(2, 2, 2)];
    let mut s = Scheduler::new(las16(), full_pool(&theirs));
    let plan = s.schedule_with(
        3 * HOUR,
        &theirs,
        &mut HashMap::new(),
        std::slice::from_ref(&newcomer),
    );
    assert!(plan.preemptions.is_empty());
    // ... nor inside the minimum slice.
    let mut cfg = las16();
    cfg.las.as_mut().unwrap().min_slice_ms = (4 * HOUR) as u64;
    let mut s = Scheduler::new(cfg, full_pool(&run));
    let plan = s.schedule_with(3 * HOUR, &run, &mut HashMap::new(), &[newcomer]);
    assert!(plan.preemptions.is_empty());
    assert!(plan.pending[&JobId(7)]
        .iter()
        .any(|r| r.message.contains("minimum runtime")));
}

#[test]
fn las_queue_boundaries_count_attained_gpu_time() {
    let l = Las {
        thresholds_gpu_s: vec![3600, 16 * 3600],
        min_slice_ms: 0,
    };
    assert_eq!(l.level(0), 0);
    assert_eq!(l.level(3_600_000 - 1), 0);
    assert_eq!(l.level(3_600_000), 1);
    assert_eq!(l.level(16 * 3_600_000), 2);
    // A quarter GPU for 4 hours since it started is one GPU-hour.
    let mut t = gang_member(1, 1, 1);
    t.gang_size = 1;
    t.resources.gpu = Some(GpuRequest {
        milli: Some(250),
        ..GpuRequest::whole("T4", 1)
    });
    assert_eq!(t.attained_at(4 * HOUR), 3_600_000);
    t.attained_gpu_ms = 5;
    assert_eq!(t.attained_at(0), 5);
}

#[test]
fn cpu_kept_per_gpu_counts_cpu_only_work_in_the_share_of_cpu_on_gpu_nodes() {
    let t = |cpu: u64, num_gpu: u32, weight: f64| fgd::WorkloadType {
        cpu_milli: cpu,
        memory_bytes: 1 << 30,
        num_gpu,
        gpu_milli: 1000,
        models: vec![],
        weight,
    };
    // Three 8-CPU one-GPU tasks and one 16-CPU CPU-only task: 24 CPUs for 3 GPUs, plus 16.
    let types = vec![t(8000, 1, 3.0), t(16_000, 0, 1.0)];
    assert!((fgd::cpu_per_gpu(&types, 0.0) - 8.0).abs() < 1e-9);
    assert!((fgd::cpu_per_gpu(&types, 1.0) - 40.0 / 3.0).abs() < 1e-9);
    assert!((fgd::cpu_per_gpu(&types, 0.5) - 32.0 / 3.0).abs() < 1e-9);
    // A pool of a 64-CPU GPU node and a 192-CPU CPU node keeps a quarter of its CPU on GPU
    // nodes; a pool of GPU nodes only, all of it.
    let gpu = gpu_node(1, "A100", 8);
    assert_eq!(
        fgd::gpu_node_cpu_share(&[gpu.clone(), cpu_node(2, 192, 64)]),
        0.25
    );
    assert_eq!(fgd::gpu_node_cpu_share(std::slice::from_ref(&gpu)), 1.0);
    assert_eq!(fgd::gpu_node_cpu_share(&[]), 0.0);

    // The stranding term counts CPU-only work only where CPU binds. The 64-CPU, 8-GPU node
    // has 8 CPUs per GPU; the first two workloads ask more per GPU in all (40/3, 28/3), so
    // their CPU-only work counts; the third asks 16/3 and keeps GPU work's 4 alone.
    let pool = [gpu];
    assert!((fgd::kept_cpu_per_gpu(&types, &pool) - 40.0 / 3.0).abs() < 1e-9);
    let light = vec![t(4000, 1, 3.0), t(16_000, 0, 1.0)]; // 4 + 16/3 = 9.33 > 8: binds
    assert!((fgd::kept_cpu_per_gpu(&light, &pool) - 28.0 / 3.0).abs() < 1e-9);
    let lighter = vec![t(4000, 1, 3.0), t(4000, 0, 1.0)]; // 4 + 4/3 = 5.33 < 8
    assert!((fgd::kept_cpu_per_gpu(&lighter, &pool) - 4.0).abs() < 1e-9);
}

// ---- room held for the preemptor ----

fn hold_for(j: &JobReq, node: u64) -> Hold {
    Hold {
        job: j.id,
        priority: j.priority,
        node: NodeId(node),
        resources: j.resources.clone(),
        devices: vec![],
    }
}

#[test]
fn room_a_preemption_freed_goes_to_the_job_it_was_freed_for() {
    // Tenant 1's job preempted spot work on node 1 for 4 CPUs; the victim has exited. Tenant
    // 2 holds less, so its job of the same size takes the first turn.
    let nominee = tjob(1, 1, 1, 4000, 1);
    let rival = tjob(2, 2, 1, 4000, 1);
    let tenants = || {
        let mut t = HashMap::new();
        let mut a = TenantSnap::default();
        a.used.cpu_milli = 2000;
        t.insert(TenantId(1), a);
        t.insert(TenantId(2), TenantSnap::default());
        t
    };
    let jobs = [nominee.clone(), rival.clone()];
    let placed = |s: &mut Scheduler| -> Vec<u64> {
        let plan = s.schedule_with(10_000, &[], &mut tenants(), &jobs);
        plan.placements.iter().map(|p| p.job.0).collect()
    };
    let mut s = Scheduler::new(Config::default(), vec![cpu_node(1, 4, 64)]);
    assert_eq!(
        placed(&mut s),
        vec![2],
        "without a hold the rival goes first"
    );

    let mut s = Scheduler::new(Config::default(), vec![cpu_node(1, 4, 64)]);
    s.hold([hold_for(&nominee, 1)]);
    assert_eq!(placed(&mut s), vec![1]);
    // A hold lasts one cycle: nothing is left counted as used.
    assert_eq!(s.nodes()[0].used_cpu_milli, 4000);

    // Work of a higher priority class may take held room.
    let mut online = rival.clone();
    online.priority = Priority::Online;
    let mut s = Scheduler::new(Config::default(), vec![cpu_node(1, 4, 64)]);
    s.hold([hold_for(&nominee, 1)]);
    let plan = s.schedule_with(10_000, &[], &mut tenants(), &[nominee.clone(), online]);
    let got: Vec<u64> = plan.placements.iter().map(|p| p.job.0).collect();
    assert_eq!(got, vec![2]);

    // Room held for a job no longer waiting (cancelled) is free for anyone.
    let mut s = Scheduler::new(Config::default(), vec![cpu_node(1, 4, 64)]);
    s.hold([hold_for(&nominee, 1)]);
    let plan = s.schedule_with(10_000, &[], &mut tenants(), std::slice::from_ref(&rival));
    assert_eq!(plan.placements.len(), 1);

    // A hold on room that is not free (someone else's task is there now) is dropped.
    let mut busy = cpu_node(1, 4, 64);
    busy.used_cpu_milli = 2000;
    let mut s = Scheduler::new(Config::default(), vec![busy]);
    s.hold([hold_for(&nominee, 1)]);
    assert_eq!(s.nodes()[0].used_cpu_milli, 2000);
}

#[test]
fn a_held_gpu_share_goes_to_its_job_even_after_its_shape_was_found_not_to_fit() {
    // One GPU; 600 thousandths were freed for job 1 (tenant 1). Job 2 (tenant 2, the same
    // shape) comes first and finds no room, which the cycle remembers per shape; job 1 must
    // not be refused from that stale answer once its hold is released.
    let share = |id: u64, tenant: u64| {
        let mut j = tjob(id, tenant, 1, 1000, 1);
        j.resources.gpu = Some(GpuRequest {
            milli: Some(600),
            ..GpuRequest::whole("T4", 1)
        });
        j
    };
    let (j1, j2) = (share(1, 1), share(2, 2));
    let mut s = Scheduler::new(Config::default(), vec![gpu_node(1, "T4", 1)]);
    let mut h = hold_for(&j1, 1);
    h.devices = vec![0];
    s.hold([h]);
    let mut t = HashMap::new();
    let mut a = TenantSnap::default();
    a.used.cpu_milli = 32_000;
    t.insert(TenantId(1), a);
    let plan = s.schedule_with(10_000, &[], &mut t, &[j1, j2]);
    let got: Vec<(u64, u32)> = plan
        .placements
        .iter()
        .map(|p| (p.job.0, p.devices[0]))
        .collect();
    assert_eq!(got, vec![(1, 0)]);
    assert!(plan.pending.contains_key(&JobId(2)));
    assert_eq!(s.nodes()[0].shared.get(&0), Some(&600));
}

// ---- preemption for gangs held to a topology domain ----

#[test]
fn a_gang_held_to_a_rack_preempts_inside_the_rack_that_needs_the_fewest_victims() {
    // Rack a: two nodes full of spot work (16 victims). Rack b: an idle node and one full
    // of spot work (8). Rack c: one node of spot work and one of work nobody may preempt.
    let mut nodes = vec![
        racked(1, "z1", "a", 8),
        racked(2, "z1", "a", 8),
        racked(3, "z1", "b", 8),
        racked(4, "z1", "b", 8),
        racked(5, "z1", "c", 8),
        racked(6, "z1", "c", 8),
    ];
    let mut run = Vec::new();
    for (node, prio) in [
        (1, Priority::Spot),
        (2, Priority::Spot),
        (4, Priority::Spot),
        (5, Priority::Spot),
        (6, Priority::Batch),
    ] {
        for d in 0..8u32 {
            let mut t = running(run.len() as u64, 9, node, prio, 0, false);
            t.resources.gpu = Some(GpuRequest::whole("H100", 1));
            t.devices = vec![d];
            let n = nodes.iter_mut().find(|n| n.id == NodeId(node)).unwrap();
            n.allocate(&t.resources, &t.devices);
            run.push(t);
        }
    }
    let gang = topo_gang(1, 2, 8, TopologyLevel::Rack);
    let mut s = Scheduler::new(Config::default(), nodes.clone());
    let plan = s.schedule_with(
        10_000,
        &run,
        &mut HashMap::new(),
        std::slice::from_ref(&gang),
    );
    assert!(plan.placements.is_empty());
    let on: BTreeSet<u64> = plan
        .preemptions
        .iter()
        .map(|p| run[p.run.0 as usize].node.0)
        .collect();
    assert_eq!(on, BTreeSet::from([4]), "{:?}", plan.pending);
    assert_eq!(plan.preemptions.len(), 8);
    assert_eq!(plan.pending[&JobId(1)][0].code, "preempting");

    // Once the victims have gone the gang fits in rack b, with the room held for it.
    let mut after = nodes.clone();
    for t in run.iter().filter(|t| t.node == NodeId(4)) {
        after[3].release(&t.resources, &t.devices);
    }
    let rest: Vec<RunningTask> = run
        .iter()
        .filter(|t| t.node != NodeId(4))
        .cloned()
        .collect();
    let mut s = Scheduler::new(Config::default(), after.clone());
    let plan = s.schedule_with(
        20_000,
        &rest,
        &mut HashMap::new(),
        std::slice::from_ref(&gang),
    );
    let racks: BTreeSet<String> = plan
        .placements
        .iter()
        .map(|p| rack_of(&after, p.node))
        .collect();
    assert_eq!(
        (plan.placements.len(), racks),
        (2, BTreeSet::from(["b".to_string()]))
    );
    assert!(plan.preemptions.is_empty());

    // Held to one node, the gang of one 8-GPU task takes a single node's spot work.
    let one = topo_gang(2, 1, 8, TopologyLevel::Node);
    let mut s = Scheduler::new(Config::default(), after);
    let plan = s.schedule_with(20_000, &rest, &mut HashMap::new(), &[one]);
    assert!(
        plan.placements.len() == 1 && plan.preemptions.is_empty(),
        "node 3 is idle"
    );

    // Nothing preemptible in any rack: the reason says so.
    let mut s = Scheduler::new(Config::default(), nodes);
    let all_batch: Vec<RunningTask> = run
        .iter()
        .cloned()
        .map(|mut t| {
            t.priority = Priority::Batch;
            t
        })
        .collect();
    let plan = s.schedule_with(10_000, &all_batch, &mut HashMap::new(), &[gang]);
    assert!(plan.preemptions.is_empty());
    let why = plan.pending[&JobId(1)]
        .iter()
        .find(|r| r.code == "no_preemption")
        .expect("a reason");
    assert!(
        why.message.starts_with("cannot preempt:"),
        "{}",
        why.message
    );
}

// ---- draining nodes for a job that has waited too long ----

/// Two 4-GPU H100 nodes, each with devices 0 and 1 held by another tenant's batch task
/// (ending at `end`, if given).
fn two_half_held_nodes(end: Option<i64>) -> (Vec<NodeSnap>, Vec<RunningTask>) {
    let mut nodes = vec![gpu_node(1, "H100", 4), gpu_node(2, "H100", 4)];
    let mut run = Vec::new();
    for (k, n) in nodes.iter_mut().enumerate() {
        let mut t = running(k as u64, 9, n.id.0, Priority::Batch, 0, false);
        t.expected_end_ms = end;
        t.resources.gpu = Some(GpuRequest::whole("H100", 2));
        t.devices = vec![0, 1];
        n.allocate(&t.resources, &t.devices);
        run.push(t);
    }
    (nodes, run)
}

#[test]
fn a_protected_gang_has_nodes_drained_for_it_and_then_starts() {
    // Two 4-GPU nodes, each half held by a task of unknown end. The gang needs both whole.
    let (nodes, run) = two_half_held_nodes(None);
    let gang = job(1, 2, 1000, Some(("H100", 4)), true);
    let small = job(2, 1, 1000, Some(("H100", 2)), false);
    let jobs = [gang.clone(), small.clone()];
    let placed = |plan: &Plan| -> Vec<u64> { plan.placements.iter().map(|p| p.job.0).collect() };

    let mut s = Scheduler::new(Config::default(), nodes.clone());
    let plan = s.schedule_with(10_000, &run, &mut HashMap::new(), &jobs);
    assert_eq!(
        placed(&plan),
        vec![2],
        "unprotected, the small job takes a freed half"
    );

    let mut s = Scheduler::new(Config::default(), nodes.clone());
    s.protect(vec![gang.id]);
    let plan = s.schedule_with(10_000, &run, &mut HashMap::new(), &jobs);
    assert!(plan.placements.is_empty());
    let (rj, _, rn) = plan
        .reservations
        .first()
        .cloned()
        .expect("nodes drained for the gang");
    assert_eq!((rj, rn), (JobId(1), vec![NodeId(1), NodeId(2)]));
    let backfill = plan.pending[&JobId(2)]
        .iter()
        .find(|r| r.code == "backfill")
        .expect("the small job says why it waits");
    assert!(
        backfill.message.contains("drained for job"),
        "{}",
        backfill.message
    );
    let draining = plan.pending[&JobId(1)]
        .iter()
        .find(|r| r.code == "draining")
        .expect("the gang says nodes are drained for it");
    assert_eq!(draining.counts["nodes"], 2);
    assert!(
        plan.pending[&JobId(1)].iter().all(|r| r.code != "reserved"),
        "{:?}",
        plan.pending[&JobId(1)]
    );

    // The running tasks end: the gang starts on the drained nodes, and the reservation is
    // gone, so the small job is refused only for want of room.
    let empty = vec![gpu_node(1, "H100", 4), gpu_node(2, "H100", 4)];
    let mut s = Scheduler::new(Config::default(), empty);
    s.protect(vec![gang.id]);
    let plan = s.schedule_with(20_000, &[], &mut HashMap::new(), &jobs);
    assert_eq!(placed(&plan), vec![1, 1]);
    assert!(plan.reservations.is_empty());
    assert!(plan.pending[&JobId(2)].iter().all(|r| r.code != "backfill"));

    // Protected work that fits starts at once; the rest keep what is left.
    let mut s = Scheduler::new(Config::default(), nodes);
    s.protect(vec![small.id]);
    let plan = s.schedule_with(10_000, &run, &mut HashMap::new(), &[small]);
    assert_eq!(placed(&plan), vec![2]);
}

#[test]
fn a_protected_job_gets_the_reservation_and_short_work_still_backfills_when_ends_are_known() {
    // Two 4-GPU nodes, each half held by a task that will have ended by t=60 s.
    let (nodes, run) = two_half_held_nodes(Some(60_000));
    // Job 1 (a whole node) is ahead of the gang (both nodes) in FIFO order; job 3 would be
    // done in 30 s, job 4 in 10 minutes.
    let whole = job(1, 1, 1000, Some(("H100", 4)), false);
    let gang = job(2, 2, 1000, Some(("H100", 4)), true);
    let short = with_runtime(job(3, 1, 1000, Some(("H100", 2)), false), Some(30_000));
    let long = with_runtime(job(4, 1, 1000, Some(("H100", 2)), false), Some(600_000));
    let jobs = [whole, gang.clone(), short, long];
    let code = |plan: &Plan, j: u64, c: &str| plan.pending[&JobId(j)].iter().any(|r| r.code == c);

    // Unprotected, the head-of-line job 1 holds the reservation.
    let mut s = Scheduler::new(Config::default(), nodes.clone());
    let plan = s.schedule_with(10_000, &run, &mut HashMap::new(), &jobs);
    assert_eq!(plan.reservations.first().map(|r| r.0), Some(JobId(1)));

    // Protected, the gang holds it: from t=60 s on both nodes, not drained.
    let mut s = Scheduler::new(Config::default(), nodes);
    s.protect(vec![gang.id]);
    let plan = s.schedule_with(10_000, &run, &mut HashMap::new(), &jobs);
    assert_eq!(
        plan.reservations,
        vec![(JobId(2), 60_000, vec![NodeId(1), NodeId(2)])]
    );
    assert!(code(&plan, 2, "reserved"), "{:?}", plan.pending[&JobId(2)]);
    assert!(!code(&plan, 2, "draining"));
    assert!(code(&plan, 1, "backfill"), "{:?}", plan.pending[&JobId(1)]);
    // Work that ends before the gang could start backfills; longer work waits.
    let placed: Vec<u64> = plan.placements.iter().map(|p| p.job.0).collect();
    assert_eq!(placed, vec![3]);
    assert!(code(&plan, 4, "backfill"), "{:?}", plan.pending[&JobId(4)]);
}

#[test]
fn spot_work_is_never_protected() {
    let mut nodes = vec![gpu_node(1, "H100", 4)];
    let mut t = running(0, 9, 1, Priority::Batch, 0, false);
    t.resources.gpu = Some(GpuRequest::whole("H100", 2));
    t.devices = vec![0, 1];
    nodes[0].allocate(&t.resources, &t.devices);
    let mut spot = job(1, 1, 1000, Some(("H100", 4)), false);
    spot.priority = Priority::Spot;
    let small = job(2, 1, 1000, Some(("H100", 2)), false);
    let mut s = Scheduler::new(Config::default(), nodes);
    s.protect(vec![spot.id]);
    let plan = s.schedule_with(10_000, &[t], &mut HashMap::new(), &[spot, small]);
    assert!(plan.reservations.is_empty());
    assert_eq!(
        plan.placements.len(),
        1,
        "the batch job takes the free half"
    );
}

// ---- the victim search's node index ----

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The index `Index::with_room` returns holds every ready node with room for a task.
    #[test]
    fn nodes_with_room_are_all_named_by_the_index(w in arb_world()) {
        let mut s = Scheduler::new(Config::default(), w.nodes.clone());
        let half: Vec<JobReq> = w.jobs.iter().take(w.jobs.len() / 2).cloned().collect();
        s.schedule(&mut HashMap::new(), &half);
        for j in &w.jobs {
            let named: BTreeSet<usize> = s.index.with_room(&j.resources).into_iter().collect();
            for (i, n) in s.nodes().iter().enumerate() {
                if n.room_for(&j.resources) > 0 {
                    prop_assert!(named.contains(&i), "node {} has room for {:?} but is not named", i, j.resources);
                }
            }
        }
    }

    /// Visiting only the nodes that hold a possible victim or have room finds exactly what
    /// a scan of every busy node finds: the same victims, placements and reasons.
    #[test]
    fn the_indexed_victim_search_agrees_with_a_scan_of_every_busy_node(
        w in arb_world(),
        attrs in prop::collection::vec((0u8..3, any::<bool>(), 0i64..20_000, 0u64..3, 0u64..30), 40),
        guarantees in prop::collection::vec(prop::option::of(0u64..20_000), 3),
        las in any::<bool>(),
        cursor in 0usize..12,
        racks in any::<bool>(),
    ) {
        // With `racks`, the nodes stand in three racks and every waiting gang is held to
        // one (the indexed search skips racks that cannot hold it; the scan does not).
        let mut w = w;
        if racks {
            for (i, n) in w.nodes.iter_mut().enumerate() {
                n.topology.zone = "z".into();
                n.topology.rack = format!("r{}", i % 3);
            }
        }
        // Fill the pool with the world's jobs, then let each placed task be spot, batch or
        // online, borrowed or not, of any tenant, started at various times.
        let mut s = Scheduler::new(Config::default(), w.nodes.clone());
        let plan = s.schedule(&mut HashMap::new(), &w.jobs);
        let busy = s.into_nodes();
        let by_id: HashMap<JobId, &JobReq> = w.jobs.iter().map(|j| (j.id, j)).collect();
        let running: Vec<RunningTask> = plan
            .placements
            .iter()
            .enumerate()
            .map(|(k, p)| {
                let (pr, borrowed, started, tenant, min_run) = attrs[k % attrs.len()];
                let j = by_id[&p.job];
                RunningTask {
                    run: caravel_core::RunId(k as u64),
                    job: if j.gang { j.id } else { JobId(10_000 + k as u64) },
                    tenant: TenantId(tenant),
                    node: p.node,
                    priority: [Priority::Spot, Priority::Batch, Priority::Online][pr as usize],
                    resources: j.resources.clone(),
                    devices: p.devices.clone(),
                    started_ms: started,
                    min_runtime_ms: min_run * 1000,
                    borrowed,
                    expected_end_ms: None,
                    gang_size: if j.gang { j.pending.len() as u32 } else { 1 },
                    attained_gpu_ms: started as u64 * 4000,
                    saved_ms: None,
                    save_every_ms: 0,
                }
            })
            .collect();
        let mut tenants: HashMap<TenantId, TenantSnap> = w.tenants.clone();
        for (i, g) in guarantees.iter().enumerate() {
            let t = tenants.entry(TenantId(i as u64)).or_default();
            t.guarantee = Quota { cpu_milli: *g, ..Default::default() };
        }
        let pending: Vec<JobReq> = w
            .jobs
            .iter()
            .map(|j| JobReq {
                id: JobId(j.id.0 + 1000),
                seq: j.seq + 1000,
                topology: (racks && j.gang).then_some(TopologyLevel::Rack),
                ..j.clone()
            })
            .collect();
        let cfg = if las { las16() } else { Config::default() };
        let run = |all: bool| {
            let mut s = Scheduler::new(cfg.clone(), busy.clone());
            s.scan_all_for_victims = all;
            s.preempt_cursor = cursor.min(busy.len());
            let mut t = tenants.clone();
            s.schedule_with(20_000, &running, &mut t, &pending)
        };
        let (indexed, scanned) = (run(false), run(true));
        prop_assert_eq!(indexed, scanned);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    /// A scheduler kept alive with `add_running` / `remove_running` (as the simulator keeps
    /// one) plans exactly as a fresh one told the same running set: the per-node victim
    /// counts and spot potentials it keeps incrementally are what `set_running` builds.
    #[test]
    fn incremental_running_updates_plan_as_a_fresh_set_running(
        w in arb_world(),
        // Mostly spot: the potentials kept per node matter for spot-only searches.
        attrs in prop::collection::vec((0u8..6, any::<bool>(), 0i64..20_000, 0u64..2), 40),
        split in 0usize..40,
        gone in prop::collection::vec(any::<bool>(), 40),
    ) {
        let mut s = Scheduler::new(Config::default(), w.nodes.clone());
        let plan = s.schedule(&mut HashMap::new(), &w.jobs);
        let busy = s.into_nodes();
        let by_id: HashMap<JobId, &JobReq> = w.jobs.iter().map(|j| (j.id, j)).collect();
        let running: Vec<RunningTask> = plan
            .placements
            .iter()
            .enumerate()
            .map(|(k, p)| {
                let (pr, borrowed, started, min_run) = attrs[k % attrs.len()];
                let j = by_id[&p.job];
                RunningTask {
                    run: caravel_core::RunId(k as u64),
                    job: JobId(10_000 + k as u64),
                    tenant: j.tenant,
                    node: p.node,
                    priority: match pr { 0 => Priority::Batch, 1 => Priority::Online, _ => Priority::Spot },
                    resources: j.resources.clone(),
                    devices: p.devices.clone(),
                    started_ms: started,
                    min_runtime_ms: min_run * 30_000,
                    borrowed,
                    expected_end_ms: None,
                    gang_size: 1,
                    attained_gpu_ms: 0,
                    saved_ms: None,
                    save_every_ms: 0,
                }
            })
            .collect();
        let h = split.min(running.len());
        let mut a = Scheduler::new(Config::default(), busy);
        a.set_running(running[..h].to_vec());
        for t in &running[h..] {
            a.add_running(t.clone());
        }
        let mut kept = Vec::new();
        for (k, t) in running.iter().enumerate() {
            if gone[k % gone.len()] {
                prop_assert!(a.remove_running(t.run).is_some());
            } else {
                kept.push(t.clone());
            }
        }
        let mut b = Scheduler::new(Config::default(), a.nodes().to_vec());
        b.set_running(kept);
        let pending: Vec<JobReq> = w
            .jobs
            .iter()
            .map(|j| JobReq { id: JobId(j.id.0 + 1000), seq: j.seq + 1000, ..j.clone() })
            .collect();
        let pa = a.schedule_preempting(20_000, &mut w.tenants.clone(), &pending);
        let pb = b.schedule_preempting(20_000, &mut w.tenants.clone(), &pending);
        prop_assert_eq!(pa, pb);
    }
}

#[test]
fn merging_sorted_node_lists_keeps_order_and_drops_repeats() {
    let a: Vec<usize> = vec![1, 4, 9];
    let b: Vec<usize> = vec![0, 4, 5, 9, 12];
    let merged: Vec<usize> = preempt::merge_sorted(vec![
        Box::new(a.into_iter()),
        Box::new(b.into_iter()),
        Box::new(std::iter::empty()),
    ])
    .collect();
    assert_eq!(merged, vec![0, 1, 4, 5, 9, 12]);
}

#[test]
fn a_topology_gang_at_its_quota_cap_preempts_its_own_spot_work_when_one_rack_then_holds_it() {
    // Tenant 1 may hold 16 H100s and runs 16 of them as spot work, one full node in each
    // rack. Its 2 x 8-GPU gang held to a rack must stop all 16 to come within the cap, and
    // then fits in rack a (the freed node and the idle one); rack b's other node is another
    // tenant's batch work.
    let build = |busy_2: bool| {
        let mut nodes = vec![
            racked(1, "z1", "a", 8),
            racked(2, "z1", "a", 8),
            racked(3, "z1", "b", 8),
            racked(4, "z1", "b", 8),
        ];
        let mut run = Vec::new();
        let mut used = ResourceSum::default();
        let mut busy = vec![
            (1, 1, Priority::Spot),
            (3, 1, Priority::Spot),
            (4, 9, Priority::Batch),
        ];
        if busy_2 {
            busy.push((2, 9, Priority::Batch));
        }
        for (node, tenant, prio) in busy {
            for d in 0..8u32 {
                let mut t = running(run.len() as u64, tenant, node, prio, 0, false);
                t.resources.gpu = Some(GpuRequest::whole("H100", 1));
                t.devices = vec![d];
                let n = nodes.iter_mut().find(|n| n.id == NodeId(node)).unwrap();
                n.allocate(&t.resources, &t.devices);
                if tenant == 1 {
                    used.add_task(&t.resources, 1);
                }
                run.push(t);
            }
        }
        let mut tenants = HashMap::new();
        tenants.insert(
            TenantId(1),
            TenantSnap {
                quota: Quota::parse("gpu/H100=16").unwrap(),
                used,
                ..Default::default()
            },
        );
        (nodes, run, tenants)
    };
    let gang = topo_gang(1, 2, 8, TopologyLevel::Rack);

    let (nodes, run, mut tenants) = build(false);
    let mut s = Scheduler::new(Config::default(), nodes);
    let plan = s.schedule_with(10_000, &run, &mut tenants, std::slice::from_ref(&gang));
    assert!(plan.placements.is_empty());
    let mut v = victims(&plan);
    v.sort_unstable();
    assert_eq!(v, (0..16).collect::<Vec<_>>(), "{:?}", plan.pending);
    assert_eq!(plan.pending[&JobId(1)][0].code, "preempting");

    // With rack a's other node busy no rack holds the gang: nothing is stopped, and the
    // reason says why.
    let (nodes, run, mut tenants) = build(true);
    let mut s = Scheduler::new(Config::default(), nodes);
    let plan = s.schedule_with(10_000, &run, &mut tenants, std::slice::from_ref(&gang));
    assert!(plan.preemptions.is_empty());
    let r = plan.pending[&JobId(1)]
        .iter()
        .find(|r| r.code == "no_preemption")
        .expect("a no_preemption reason");
    assert!(r.message.contains("in any one domain"), "{}", r.message);
}

// ---- the share plan ----

fn share_job(id: u64, milli: u32, cpu: u64) -> JobReq {
    let mut j = job(id, 1, cpu, Some(("T4", 1)), false);
    j.resources.gpu.as_mut().unwrap().milli = Some(milli);
    j
}

#[test]
fn a_share_goes_where_the_plan_completes_a_gpu_not_where_it_fits_tightest() {
    // The workload pairs 700s with 300s and stacks 200s five to a GPU. GPU 0 holds a 700,
    // GPU 1 a 200. A 200 fits GPU 0 most tightly (900, best fit's pick), but 900 is no
    // fill of the plan's and leaves 100 nothing asks for; on GPU 1 it makes 400, on the
    // way to five 200s.
    let types = vec![wt(1, 700, 0.25), wt(1, 300, 0.25), wt(1, 200, 0.5)];
    let plan = plan::SharePlan::new(&types).unwrap();
    assert!(
        plan.on_plan(400) && plan.on_plan(700) && !plan.on_plan(900),
        "{plan:?}"
    );
    let mut n = gpu_node(1, "T4", 4);
    n.shared.insert(0, 700);
    n.shared.insert(1, 200);
    let mut s = Scheduler::new(fgd_cfg(types.clone()), vec![n.clone()]);
    let placed = s.schedule(&mut HashMap::new(), &[share_job(1, 200, 100)]);
    assert_eq!(placed.placements[0].devices, vec![1], "{placed:?}");
    // Best fit, which knows no plan, takes GPU 0.
    let cfg = Config {
        baseline: Some(std::sync::Arc::new(TestBaseline { uniform: false })),
        ..fgd_cfg(types)
    };
    let mut s = Scheduler::new(cfg, vec![n]);
    let placed = s.schedule(&mut HashMap::new(), &[share_job(1, 200, 100)]);
    assert_eq!(placed.placements[0].devices, vec![0]);
}

fn paced_cfg(types: Vec<fgd::WorkloadType>, factor: f64) -> Config {
    Config {
        share_pacing: Some(factor),
        ..fgd_cfg(types)
    }
}

fn paced(plan: &Plan) -> Vec<JobId> {
    plan.pending
        .iter()
        .filter(|(_, r)| r.iter().any(|r| r.code == "paced"))
        .map(|(j, _)| *j)
        .collect()
}

#[test]
fn pacing_turns_away_the_share_of_lone_shares_the_pool_cannot_afford() {
    // A fifth of the work is 810-thousandth shares, each alone on a GPU. Planned for
    // demand equal to capacity, the pool can afford 81 % of them (19 % turned away).
    let types = vec![wt(1, 810, 0.2), wt(1, 1000, 0.8)];
    let nodes: Vec<NodeSnap> = (0..40).map(|i| gpu_node(i, "T4", 4)).collect();
    let jobs: Vec<JobReq> = (0..100).map(|i| share_job(i, 810, 100)).collect();
    let mut s = Scheduler::new(paced_cfg(types.clone(), 1.0), nodes.clone());
    let plan = s.schedule(&mut HashMap::new(), &jobs);
    let turned = paced(&plan);
    // The first share finds the pool unused (GPUs not yet scarcer than CPU) and goes in;
    // from then on one in about five is turned away, spread over the arrivals.
    assert!(
        (18..=19).contains(&turned.len()),
        "{} turned away",
        turned.len()
    );
    assert_eq!(plan.placements.len() + turned.len(), 100);
    assert!(turned.iter().any(|j| j.0 < 20) && turned.iter().any(|j| j.0 >= 80));
    let r = &plan.pending[&turned[0]][0];
    assert!(
        r.message.contains("810") && r.message.contains("19.0%"),
        "{}",
        r.message
    );
    assert_eq!(r.counts["share_milli"], 810);
    // Half the rate: half as many.
    let mut s = Scheduler::new(paced_cfg(types.clone(), 0.5), nodes.clone());
    let n = paced(&s.schedule(&mut HashMap::new(), &jobs)).len();
    assert!((9..=10).contains(&n), "{n}");
    // Without pacing every share that fits is placed.
    let mut s = Scheduler::new(fgd_cfg(types), nodes);
    assert_eq!(s.schedule(&mut HashMap::new(), &jobs).placements.len(), 100);
}

#[test]
fn pacing_never_turns_away_a_share_that_joins_a_used_gpu() {
    // 810s pair with the rare 100s; GPU 0 already holds a 100. The first 810 joins it and
    // is placed although a turn-away is owed; the second would open a fresh GPU: paced.
    let types = vec![wt(1, 810, 0.2), wt(1, 100, 0.01), wt(1, 1000, 0.79)];
    let mut n = gpu_node(1, "T4", 4);
    n.shared.insert(0, 100);
    let mut s = Scheduler::new(paced_cfg(types, 1.0), vec![n, gpu_node(2, "T4", 4)]);
    let first = s.schedule(&mut HashMap::new(), &[share_job(1, 810, 100)]);
    assert_eq!(
        (
            first.placements[0].node,
            first.placements[0].devices.clone()
        ),
        (NodeId(1), vec![0])
    );
    let second = s.schedule(&mut HashMap::new(), &[share_job(2, 810, 100)]);
    assert_eq!(paced(&second), vec![JobId(2)], "{second:?}");
}

#[test]
fn pacing_stays_off_where_its_budget_does_not_hold() {
    let nodes: Vec<NodeSnap> = (0..40).map(|i| gpu_node(i, "T4", 4)).collect();
    let jobs: Vec<JobReq> = (0..100).map(|i| share_job(i, 810, 100)).collect();
    // Work pinned to one model: a GPU freed on another model may find no taker.
    let mut pinned = wt(1, 1000, 0.8);
    pinned.models = vec!["H100".into()];
    let mut with_h100 = nodes.clone();
    with_h100.push(gpu_node(99, "H100", 8));
    let mut s = Scheduler::new(paced_cfg(vec![wt(1, 810, 0.2), pinned], 1.0), with_h100);
    assert!(paced(&s.schedule(&mut HashMap::new(), &jobs)).is_empty());
    // The pool's CPU is scarcer than its GPUs: a freed GPU would wait for CPU.
    let hungry: Vec<JobReq> = (0..100).map(|i| share_job(i, 810, 40_000)).collect();
    let mut s = Scheduler::new(
        paced_cfg(vec![wt(1, 810, 0.2), wt(1, 1000, 0.8)], 1.0),
        nodes,
    );
    let plan = s.schedule(&mut HashMap::new(), &hungry);
    assert!(paced(&plan).is_empty(), "{plan:?}");
    assert_eq!(plan.placements.len(), 40, "one per node, CPU bound");
    // CPU a little less used than GPUs (12.5 of 16 cores per GPU an 810 fills, 96 % of
    // its GPU share): too close for a GPU budget to hold.
    let close: Vec<JobReq> = (0..100).map(|i| share_job(i, 810, 12_500)).collect();
    let mut s = Scheduler::new(
        paced_cfg(vec![wt(1, 810, 0.2), wt(1, 1000, 0.8)], 1.0),
        (0..40).map(|i| gpu_node(i, "T4", 4)).collect(),
    );
    let plan = s.schedule(&mut HashMap::new(), &close);
    assert!(paced(&plan).is_empty(), "{plan:?}");
    assert_eq!(plan.placements.len(), 100);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// With pacing on, plans stay within capacity and repeat; only single shares of sizes
    /// the plan cannot afford are turned away, and never more than the plan's rate owes.
    #[test]
    fn pacing_turns_away_only_planned_shares_and_no_more_than_owed(
        w in arb_world(),
        factor in 0.05f64..=1.0,
    ) {
        let types = world_types(&w);
        let cfg = paced_cfg(types.clone(), factor);
        let mut s = Scheduler::new(cfg.clone(), w.nodes.clone());
        let plan = s.schedule(&mut w.tenants.clone(), &w.jobs);
        let mut again = Scheduler::new(cfg, w.nodes.clone());
        prop_assert_eq!(&plan, &again.schedule(&mut w.tenants.clone(), &w.jobs));
        for n in s.nodes() {
            prop_assert!(n.used_cpu_milli <= n.capacity.cpu_milli);
            prop_assert!(n.shared.values().all(|u| *u <= 1000));
            prop_assert!(n.shared.keys().all(|d| !n.used_devices.contains(d)));
        }
        let share_plan = plan::SharePlan::new(&types);
        let mut by_size: BTreeMap<u32, u64> = BTreeMap::new();
        for id in paced(&plan) {
            let j = w.jobs.iter().find(|j| j.id == id).unwrap();
            prop_assert!(!j.gang);
            let milli = j.resources.gpu.as_ref().and_then(|g| g.milli);
            prop_assert!(milli.is_some(), "only shares are paced");
            let rate = share_plan.as_ref().and_then(|p| p.turn_away.get(&milli.unwrap()).copied());
            prop_assert!(rate.is_some(), "only sizes the plan cannot afford");
            *by_size.entry(milli.unwrap()).or_insert(0) += 1;
        }
        for (milli, n) in by_size {
            let tasks: usize = w
                .jobs
                .iter()
                .filter(|j| !j.gang && j.resources.gpu.as_ref().and_then(|g| g.milli) == Some(milli))
                .map(|j| j.pending.len())
                .sum();
            let owed = factor * share_plan.as_ref().unwrap().turn_away[&milli] * tasks as f64;
            prop_assert!(n as f64 <= owed.ceil(), "{n} turned away, {owed} owed");
        }
    }
}

fn isolated(mut n: NodeSnap, level: caravel_core::IsolationLevel, images: bool) -> NodeSnap {
    let mut c = (*n.capacity).clone();
    c.isolation = level;
    c.images = images;
    n.capacity = std::sync::Arc::new(c);
    n
}

#[test]
fn a_task_runs_only_where_the_node_gives_the_isolation_and_runtime_it_needs() {
    use caravel_core::IsolationLevel as L;
    // The tightest node gives no isolation: best fit alone would pick it.
    let mut nodes = vec![
        isolated(cpu_node(1, 2, 8), L::None, false),
        isolated(cpu_node(2, 8, 32), L::Sandboxed, false),
        isolated(cpu_node(3, 16, 64), L::Restricted, true),
    ];
    let mut t = HashMap::new();
    let mut plain = job(1, 1, 1000, None, false);
    let mut sandboxed = job(2, 1, 1000, None, false);
    sandboxed.resources.needs.isolation = L::Sandboxed;
    let mut restricted = job(3, 1, 1000, None, false);
    restricted.resources.needs.isolation = L::Restricted;
    let mut image = job(4, 1, 1000, None, false);
    image.resources.needs.image = true;
    plain.seq = 1;
    let plan = schedule(
        &Config::default(),
        &mut nodes,
        &mut t,
        &[plain, sandboxed, restricted, image],
    );
    let on = |j: u64| {
        plan.placements
            .iter()
            .find(|p| p.job == JobId(j))
            .map(|p| p.node)
    };
    assert_eq!(on(1), Some(NodeId(1)));
    assert_eq!(on(2), Some(NodeId(2)), "sandboxed is enough, and tighter");
    assert_eq!(on(3), Some(NodeId(3)));
    assert_eq!(on(4), Some(NodeId(3)), "only node 3 has an OCI runtime");
}

#[test]
fn a_task_no_node_isolates_enough_waits_with_the_reason_counted() {
    use caravel_core::IsolationLevel as L;
    let mut nodes = vec![
        isolated(cpu_node(1, 8, 32), L::None, false),
        isolated(cpu_node(2, 8, 32), L::Sandboxed, false),
        isolated(cpu_node(3, 1, 1), L::Restricted, false),
    ];
    let mut t = HashMap::new();
    let mut j = job(1, 1, 2000, None, false);
    j.resources.needs.isolation = L::Restricted;
    let mut img = job(2, 2, 1000, None, true);
    img.resources.needs.image = true;
    let plan = schedule(&Config::default(), &mut nodes, &mut t, &[j, img]);
    assert!(plan.placements.is_empty(), "{:?}", plan.placements);
    let r = &plan.pending[&JobId(1)][0];
    assert_eq!(r.code, "no_fit");
    assert_eq!(r.counts["lack isolation restricted"], 2, "{r:?}");
    assert_eq!(r.counts["lack cpu"], 1, "{r:?}");
    assert!(
        r.message.contains("2 nodes lack isolation restricted"),
        "{}",
        r.message
    );
    // A gang of image tasks: no node has a runtime, and the reason says so.
    let r = &plan.pending[&JobId(2)][0];
    assert!(
        r.message.contains("OCI runtime") || r.code == "gang",
        "{r:?}"
    );
    for n in &nodes {
        assert_eq!(n.room_for(&img_res()), 0);
    }
}

fn img_res() -> TaskResources {
    let mut r = job(9, 1, 1000, None, false).resources;
    r.needs.image = true;
    r
}

proptest! {
    /// Whatever the mix, no task lands on a node that gives less than it needs.
    #[test]
    fn placements_always_meet_the_needs(
        levels in proptest::collection::vec((0u8..3, any::<bool>()), 1..8),
        asks in proptest::collection::vec((0u8..3, any::<bool>(), 1u64..4, any::<bool>()), 1..12),
    ) {
        use caravel_core::IsolationLevel as L;
        let lv = |x: u8| [L::None, L::Sandboxed, L::Restricted][x as usize];
        let mut nodes: Vec<NodeSnap> = levels
            .iter()
            .enumerate()
            .map(|(i, (l, img))| isolated(cpu_node(i as u64 + 1, 4, 16), lv(*l), *img))
            .collect();
        let jobs: Vec<JobReq> = asks
            .iter()
            .enumerate()
            .map(|(i, (l, img, n, gang))| {
                let mut j = job(i as u64 + 1, *n as u32, 1000, None, *gang);
                j.resources.needs.isolation = lv(*l);
                j.resources.needs.image = *img;
                j
            })
            .collect();
        let mut t = HashMap::new();
        let plan = schedule(&Config::default(), &mut nodes, &mut t, &jobs);
        for p in &plan.placements {
            let j = &jobs[p.job.0 as usize - 1];
            let n = nodes.iter().find(|n| n.id == p.node).unwrap();
            prop_assert!(n.meets(j.resources.needs), "{p:?} on {:?}", n.capacity);
        }
    }
}

#[test]
fn gang_room_when_empty_counts_whole_tasks_per_domain() {
    use caravel_core::{Capacity, NodeId, Topology, TopologyLevel};
    let node = |id: u64, rack: &str, cpus: u64, gpus: u32| {
        let mut c = Capacity {
            cpu_milli: cpus * 1000,
            memory_bytes: 64 << 30,
            ..Default::default()
        };
        for i in 0..gpus {
            c.devices.push(caravel_core::Device {
                index: i,
                model: "H100".into(),
            });
        }
        (
            c,
            Topology {
                region: "r".into(),
                zone: "z".into(),
                rack: rack.into(),
            },
            NodeId(id),
        )
    };
    let nodes = vec![node(1, "a", 4, 2), node(2, "a", 3, 0), node(3, "b", 8, 8)];
    let cpu = TaskResources {
        cpu_milli: 1500,
        memory_bytes: 1 << 30,
        gpu: None,
        ..Default::default()
    };
    // 4/1.5 = 2 and 3/1.5 = 2 in rack a, 8/1.5 = 5 in rack b.
    assert_eq!(
        gang_room_when_empty(&nodes, &cpu, Some(TopologyLevel::Node)),
        5
    );
    assert_eq!(
        gang_room_when_empty(&nodes, &cpu, Some(TopologyLevel::Rack)),
        5
    );
    assert_eq!(
        gang_room_when_empty(&nodes, &cpu, Some(TopologyLevel::Zone)),
        9
    );
    assert_eq!(gang_room_when_empty(&nodes, &cpu, None), 9);
    let gpu = TaskResources {
        cpu_milli: 500,
        memory_bytes: 1 << 30,
        gpu: Some(caravel_core::GpuRequest {
            model: "H100".into(),
            any_of: vec![],
            count: 2,
            milli: None,
        }),
        ..Default::default()
    };
    assert_eq!(
        gang_room_when_empty(&nodes, &gpu, Some(TopologyLevel::Rack)),
        4
    );
    assert_eq!(
        gang_room_when_empty(&nodes[..2], &gpu, Some(TopologyLevel::Rack)),
        1
    );
    assert_eq!(gang_room_when_empty(&[], &cpu, None), 0);
}

#[test]
fn an_elastic_gang_takes_as_many_ranks_as_fit_but_never_fewer_than_its_minimum() {
    let nodes = vec![cpu_node(1, 2, 64), cpu_node(2, 1, 64)];
    let mut t = HashMap::new();
    // Room for 3 of 1 CPU: an elastic 2:4 gang gets 3 (its first three tasks).
    let mut g = job(1, 4, 1000, None, true);
    g.min_tasks = Some(2);
    let mut s = Scheduler::new(Config::default(), nodes.clone());
    let plan = s.schedule(&mut t, std::slice::from_ref(&g));
    let mut placed: Vec<u32> = plan.placements.iter().map(|p| p.index).collect();
    placed.sort();
    assert_eq!(placed, vec![0, 1, 2], "{plan:?}");
    // The same gang all or nothing waits.
    let mut fixed = g.clone();
    fixed.min_tasks = None;
    let mut s = Scheduler::new(Config::default(), nodes.clone());
    let plan = s.schedule(&mut t, &[fixed]);
    assert!(plan.placements.is_empty(), "{plan:?}");
    assert_eq!(plan.pending[&JobId(1)][0].code, "gang");
    // Below its minimum (4 of 4 needed, 3 fit) it waits too.
    let mut big = g.clone();
    big.min_tasks = Some(4);
    let mut s = Scheduler::new(Config::default(), nodes.clone());
    assert!(s.schedule(&mut t, &[big]).placements.is_empty());
    // Inside a topology domain: the roomiest domain that holds the minimum.
    let racked_nodes: Vec<NodeSnap> = vec![racked(1, "z1", "a", 2), racked(2, "z1", "b", 8)];
    let mut tg = topo_gang(3, 12, 1, TopologyLevel::Rack);
    tg.min_tasks = Some(4);
    let mut s = Scheduler::new(Config::default(), racked_nodes.clone());
    let plan = s.schedule(&mut t, &[tg]);
    assert_eq!(plan.placements.len(), 8, "{plan:?}");
    assert!(plan
        .placements
        .iter()
        .all(|p| rack_of(&racked_nodes, p.node) == "b"));
}
