//! A real pool for tests: `caravel server` and `caravel agent` as separate processes on
//! loopback, in a temporary directory, killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_caravel");

pub struct Pool {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub url: String,
    pub admin: String,
    pub agent_token: String,
    pub server: Option<Child>,
    pub agents: Vec<(String, Child)>,
    pub tag: String,
    /// Extra arguments for every `caravel server` this pool starts (`--datastore ...`).
    pub server_args: Vec<String>,
    /// What agents get as `--server` (default: `url`).
    pub agent_server: Option<String>,
    /// The address the server listens on (loopback unless a test gave it the host end of
    /// a `NetNs`).
    pub host: String,
    /// Agents start inside this network namespace (its name and the address they listen
    /// on) until it is set back to `None`.
    pub agent_netns: Option<(String, String)>,
    /// Environment for every `caravel server` this pool starts (fault injection).
    pub server_env: Vec<(String, String)>,
    agent_names: Vec<String>,
    http: reqwest::Client,
    /// The pool CA, for a server started with `--tls-self-signed`: the harness's client,
    /// the agents and the CLI trust it.
    pub ca: Option<PathBuf>,
    /// Agents start without the harness's task mounts (`shared/`, the test data and the
    /// binary's folder): the isolation tests' nodes give tasks nothing of the host.
    pub bare_agents: bool,
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (_, a) in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
        // Agents killed with SIGKILL leave their cgroups behind; remove every one this
        // test's agents could have made (names carry the test's tag).
        for name in self.agent_names.clone() {
            if let caravel_agent::cgroups::Cgroups::V1 { .. }
            | caravel_agent::cgroups::Cgroups::V2 { .. } =
                caravel_agent::cgroups::Cgroups::detect(&name)
            {
                caravel_agent::cgroups::Cgroups::detect(&name).destroy();
            }
        }
        if let Some(s) = &mut self.server {
            let _ = s.kill();
            let _ = s.wait();
        }
        if std::thread::panicking() {
            // Keep the logs and the database of a failed test for a post-mortem.
            let keep = self.dir.path().to_path_buf();
            let _ = std::fs::rename(
                &keep,
                std::env::temp_dir().join(format!("caravel-failed-{}", self.tag)),
            );
            eprintln!(
                "kept test data in {}",
                std::env::temp_dir()
                    .join(format!("caravel-failed-{}", self.tag))
                    .display()
            );
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Pool {
    /// A server with fast liveness settings (lost after 2 s) and no agents.
    pub fn server_only(tag: &str) -> Pool {
        Pool::server_only_with(tag, &[])
    }

    /// `server_only` with extra server arguments.
    pub fn server_only_with(tag: &str, server_args: &[&str]) -> Pool {
        Pool::server_only_on(tag, "127.0.0.1", server_args)
    }

    /// `server_only_with` listening on `host` (an address of this machine).
    pub fn server_only_on(tag: &str, host: &str, server_args: &[&str]) -> Pool {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let tls = server_args.contains(&"--tls-self-signed");
        let mut p = Pool {
            url: format!("{}://{host}:{port}", if tls { "https" } else { "http" }),
            host: host.to_string(),
            agent_netns: None,
            ca: tls.then(|| dir.path().join("server").join("tls").join("ca.pem")),
            port,
            admin: String::new(),
            agent_token: String::new(),
            server: None,
            agents: vec![],
            tag: format!("{tag}-{}", std::process::id()),
            server_args: server_args.iter().map(|a| a.to_string()).collect(),
            agent_server: None,
            server_env: vec![],
            agent_names: vec![],
            http: reqwest::Client::new(),
            bare_agents: false,
            dir,
        };
        let shared = p.dir.path().join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        use std::os::unix::fs::PermissionsExt;
        // Tasks run as their tenant's uid: they write marks here.
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        p.start_server();
        p
    }

    pub fn new(tag: &str, agents: &[(&str, &[&str])]) -> Pool {
        Pool::with_server_args(tag, &[], agents)
    }

    pub fn with_server_args(tag: &str, server_args: &[&str], agents: &[(&str, &[&str])]) -> Pool {
        let mut p = Pool::server_only_with(tag, server_args);
        for (name, args) in agents {
            p.start_agent(name, args);
        }
        p.wait_nodes_ready(agents.len());
        p
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("server")
    }

    pub fn start_server(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args([
                "server",
                "--listen",
                &format!("{}:{}", self.host, self.port),
            ])
            .args(["--lost-after", "2s", "--heartbeat", "500ms", "--data-dir"])
            .arg(self.data_dir())
            .args(&self.server_args)
            .envs(self.server_env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.server = Some(child);
        let dd = self.data_dir();
        let (admin, agent) = wait_for("server tokens", Duration::from_secs(20), || {
            let a = std::fs::read_to_string(dd.join("admin.token")).ok()?;
            let b = std::fs::read_to_string(dd.join("agent.token")).ok()?;
            Some((a.trim().to_string(), b.trim().to_string()))
        });
        self.admin = admin;
        self.agent_token = agent;
        let addr = format!("{}:{}", self.host, self.port);
        wait_for("server to answer", Duration::from_secs(20), || {
            std::net::TcpStream::connect(&addr).ok()
        });
        // The CA exists once the server listens.
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca).unwrap();
            self.http = reqwest::Client::builder()
                .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
                .build()
                .unwrap();
        }
        // Listening is not yet serving: a server on PostgreSQL answers only once its
        // store lease is valid (a lease after it took the lock). (A server with an
        // operator's certificate is not one the harness's client trusts.)
        if !self.server_args.iter().any(|a| a == "--tls-cert") {
            self.wait_healthy(Duration::from_secs(20));
        }
    }

    /// Waits until `/healthz` answers 200.
    pub fn wait_healthy(&self, limit: Duration) {
        let url = format!("{}/healthz", self.url);
        let http = self.http.clone();
        wait_for("the server to serve (/healthz 200)", limit, || {
            Self::rt().block_on(async {
                let r = http.get(&url).send().await.ok()?;
                (r.status().as_u16() == 200).then_some(())
            })
        });
    }

    pub fn kill9_server(&mut self) {
        let mut s = self.server.take().expect("server running");
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(s.id() as i32, libc::SIGKILL);
        }
        let _ = s.wait();
    }

    pub fn node_name(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    pub fn start_agent(&mut self, name: &str, extra: &[&str]) {
        let full = self.node_name(name);
        self.agent_names.push(full.clone());
        let log = std::fs::File::create(self.dir.path().join(format!("agent-{name}.log"))).unwrap();
        let (program, prefix, listen) = match &self.agent_netns {
            // nsenter, not `ip netns exec`: that also mounts a fresh /sys, which hides
            // the cgroup hierarchies from the agent.
            Some((ns, ip)) => (
                "nsenter",
                vec![format!("--net=/run/netns/{ns}"), BIN.into()],
                format!("{ip}:0"),
            ),
            None => (BIN, vec![], "127.0.0.1:0".to_string()),
        };
        let child = Command::new(program)
            .args(prefix)
            .args([
                "agent",
                "--server",
                self.agent_server.as_deref().unwrap_or(&self.url),
                "--token",
                &self.agent_token,
                "--name",
                &full,
            ])
            .args(["--listen", &listen, "--work-dir"])
            .arg(self.dir.path().join(format!("agent-{name}")))
            .args(
                self.ca
                    .iter()
                    .flat_map(|ca| [std::ffi::OsStr::new("--ca"), ca.as_os_str()]),
            )
            .args(self.task_mounts())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.push((name.to_string(), child));
    }

    /// What the harness's agents give every task, unless `bare_agents`: the test's
    /// `shared/` folder (read-write: tests and tasks leave marks there), the test data
    /// (replica scripts) and the folder of the `caravel` binary (replicas run it), each at
    /// its own path.
    pub fn task_mounts(&self) -> Vec<String> {
        if self.bare_agents {
            return vec![];
        }
        let bin_dir = std::path::Path::new(BIN).parent().unwrap();
        let data = format!("{}/tests/it/data", env!("CARGO_MANIFEST_DIR"));
        vec![
            "--task-mount".into(),
            format!("{}:rw", self.dir.path().join("shared").display()),
            "--task-mount".into(),
            data,
            "--task-mount".into(),
            bin_dir.display().to_string(),
        ]
    }

    pub fn agent_pid(&self, name: &str) -> i32 {
        self.agents.iter().find(|(n, _)| n == name).unwrap().1.id() as i32
    }

    pub fn kill9_agent(&mut self, name: &str) {
        let i = self.agents.iter().position(|(n, _)| n == name).unwrap();
        let (_, mut c) = self.agents.remove(i);
        // SAFETY: kill(2) on a process this test started or found as its own; no memory is touched.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGKILL);
        }
        let _ = c.wait();
    }

    /// SIGTERM (a clean stop, as `systemctl stop` sends) and waits for the agent to exit.
    pub fn term_agent(&mut self, name: &str, timeout: Duration) -> std::process::ExitStatus {
        let i = self.agents.iter().position(|(n, _)| n == name).unwrap();
        let (_, mut c) = self.agents.remove(i);
        // SAFETY: kill(2) on a process this test started or found as its own; no memory is touched.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let t0 = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if t0.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                panic!("agent {name} did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_nodes_ready(&self, n: usize) {
        wait_for("nodes ready", Duration::from_secs(20), || {
            let nodes = self.get(&self.admin, "/v1/nodes").ok()?;
            let ready = nodes
                .as_array()?
                .iter()
                .filter(|x| x["state"] == "ready")
                .count();
            (ready >= n).then_some(())
        });
    }

    pub fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// GET with a token: Ok(json) on 2xx, Err((status, json)) otherwise.
    pub fn get(&self, token: &str, path: &str) -> Result<Value, (u16, Value)> {
        self.call(reqwest::Method::GET, token, path, None)
    }

    pub fn post(&self, token: &str, path: &str, body: &Value) -> Result<Value, (u16, Value)> {
        self.call(reqwest::Method::POST, token, path, Some(body.to_string()))
    }

    pub fn post_raw(&self, token: &str, path: &str, body: &str) -> Result<Value, (u16, Value)> {
        self.call(reqwest::Method::POST, token, path, Some(body.to_string()))
    }

    pub fn call(
        &self,
        m: reqwest::Method,
        token: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<Value, (u16, Value)> {
        Self::rt().block_on(async {
            let mut r = self.http.request(m, format!("{}{path}", self.url));
            if !token.is_empty() {
                r = r.bearer_auth(token);
            }
            if let Some(b) = body {
                r = r.header("content-type", "application/json").body(b);
            }
            let resp = r
                .send()
                .await
                .map_err(|e| (0, Value::String(e.to_string())))?;
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
            if (200..300).contains(&status) {
                Ok(v)
            } else {
                Err((status, v))
            }
        })
    }

    pub fn text(&self, token: &str, path: &str) -> String {
        Self::rt().block_on(async {
            self.http
                .get(format!("{}{path}", self.url))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        })
    }

    /// GET with the admin token: status, headers and body as they came.
    pub fn raw(&self, path: &str) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
        Self::rt().block_on(async {
            let resp = self
                .http
                .get(format!("{}{path}", self.url))
                .bearer_auth(&self.admin)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            (status, headers, resp.bytes().await.unwrap().to_vec())
        })
    }

    /// A submit that does not need the pool (for other threads); None if not accepted.
    pub fn try_submit(url: &str, token: &str, spec: &Value) -> Option<u64> {
        let rt = Self::rt();
        rt.block_on(async {
            let r = reqwest::Client::new()
                .post(format!("{url}/v1/jobs"))
                .bearer_auth(token)
                .json(spec)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()?;
            if r.status().as_u16() != 201 {
                return None;
            }
            let v: Value = r.json().await.ok()?;
            v["id"].as_u64()
        })
    }

    pub fn submit(&self, token: &str, spec: Value) -> u64 {
        let r = self
            .post(token, "/v1/jobs", &spec)
            .unwrap_or_else(|e| panic!("submit failed: {e:?}"));
        r["id"].as_u64().unwrap()
    }

    pub fn job(&self, token: &str, id: u64) -> Value {
        self.get(token, &format!("/v1/jobs/{id}")).unwrap()
    }

    pub fn wait_state(&self, id: u64, states: &[&str], timeout: Duration) -> Value {
        wait_for(&format!("job {id} in {states:?}"), timeout, || {
            let j = self.job(&self.admin, id);
            states.contains(&j["state"].as_str().unwrap()).then_some(j)
        })
    }

    /// Waits until task `t` reports its process started.
    pub fn wait_task_running(&self, id: u64, t: usize) -> Value {
        wait_for(
            &format!("job {id} task {t} running"),
            Duration::from_secs(20),
            || {
                let j = self.job(&self.admin, id);
                (j["task_list"][t]["state"] == "running").then_some(j)
            },
        )
    }

    pub fn logs(&self, id: u64, task: u32, stream: &str) -> String {
        self.text(
            &self.admin,
            &format!("/v1/jobs/{id}/logs?task={task}&stream={stream}"),
        )
    }

    /// Runs the CLI with this pool's server and admin token.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_as(&self.admin, args)
    }

    pub fn cli_as(&self, token: &str, args: &[&str]) -> std::process::Output {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("CARAVEL_SERVER", &self.url)
            .env("CARAVEL_TOKEN", token)
            .env("CARAVEL_CONFIG", self.dir.path().join("no-config.toml"));
        if let Some(ca) = &self.ca {
            c.env("CARAVEL_CA", ca);
        }
        c.output().unwrap()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A path in the test's `shared/` folder, which tasks see at the same path (and may
    /// write to).
    pub fn shared(&self, name: &str) -> PathBuf {
        self.dir.path().join("shared").join(name)
    }
}

/// The host pids of processes whose environment has every one of `vars` and, with
/// `cgroup`, whose cgroup path contains it (tests run many pools at once, each with its own
/// job 1: a pool's agents name their cgroups after the pool's tag).
pub fn pids_with(vars: &[String], cgroup: Option<&str>) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let have: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        if !vars.iter().all(|v| have.contains(&v.as_bytes())) {
            continue;
        }
        if let Some(c) = cgroup {
            let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            if !cg.contains(c) {
                continue;
            }
        }
        out.push(pid);
    }
    out.sort_unstable();
    out
}

/// Of a task's processes, the first (the one its sandbox started): the one whose parent
/// is not one of them.
pub fn topmost(pids: &[i32]) -> Option<i32> {
    pids.iter().copied().find(|p| {
        let ppid = std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit(')')
                    .next()?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<i32>()
                    .ok()
            });
        ppid.is_some_and(|pp| !pids.contains(&pp))
    })
}

impl Pool {
    /// The host pids of a job's task on this pool's agents (a sandboxed task's own pids
    /// are those of its PID namespace).
    pub fn task_pids(&self, job: u64, index: u32) -> Vec<i32> {
        pids_with(
            &[
                format!("CARAVEL_JOB_ID={job}"),
                format!("CARAVEL_TASK_INDEX={index}"),
            ],
            Some(&self.tag),
        )
    }

    /// The host pid of a task's first process.
    pub fn task_pid(&self, job: u64, index: u32) -> Option<i32> {
        topmost(&self.task_pids(job, index))
    }

    /// The host pid of a run's first process.
    pub fn run_pid(&self, run: u64) -> Option<i32> {
        topmost(&pids_with(
            &[format!("CARAVEL_RUN_ID={run}")],
            Some(&self.tag),
        ))
    }
}
pub fn pid_alive(pid: i32) -> bool {
    // Zombies count as dead: read the state from /proc.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// A network namespace joined to this one by a veth pair, for partitions with real
/// packets: the host end holds `host_ip`, the namespace's end `ns_ip` (a /30 of
/// 10.231.0.0/16 picked from the test's pid). `cut` takes the link down, so every packet
/// either way is lost while the processes on both sides keep running and their
/// connections stay open, as when a switch port or cable fails. Needs root.
pub struct NetNs {
    pub name: String,
    host_dev: String,
    pub host_ip: String,
    pub ns_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip(8)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    pub fn new() -> NetNs {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names hold at most 15 bytes.
        let id = format!("{}{n}", pid % 1_000_000);
        let subnet = (pid * 4 + n) % 16_384;
        let (hi, lo) = (subnet / 64, (subnet % 64) * 4);
        let ns = NetNs {
            name: format!("caravel-test-{id}"),
            host_dev: format!("cvh{id}"),
            host_ip: format!("10.231.{hi}.{}", lo + 1),
            ns_ip: format!("10.231.{hi}.{}", lo + 2),
        };
        let peer = format!("cvp{id}");
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link",
            "add",
            &ns.host_dev,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_dev,
        ]);
        ip(&["link", "set", &ns.host_dev, "up"]);
        let inside = |args: &[&str]| {
            let mut a = vec!["netns", "exec", &ns.name, "ip"];
            a.extend_from_slice(args);
            ip(&a);
        };
        inside(&["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &peer]);
        inside(&["link", "set", &peer, "up"]);
        inside(&["link", "set", "lo", "up"]);
        ns
    }

    /// Takes the link down: nothing passes either way until `heal`.
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_dev, "down"]);
    }

    pub fn heal(&self) {
        ip(&["link", "set", &self.host_dev, "up"]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_dev])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
