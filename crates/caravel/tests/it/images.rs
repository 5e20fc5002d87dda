//! Tasks in OCI images: a real registry (Debian's `docker-registry`) on loopback, images
//! the tests build themselves from the machine's static busybox, pulled by the agent and
//! run through the node's OCI runtime with the sandbox's identity and limits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use caravel_agent::oci::{self, layer::Entry, ImageConfig};
use caravel_core::RegistryCredential;
use serde_json::json;

use crate::harness::*;

/// A `docker-registry` on a free loopback port, killed on drop.
pub struct Registry {
    child: Child,
    pub host: String,
    pub log: PathBuf,
    pub cred: Option<RegistryCredential>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn registry_binary() -> &'static str {
    for p in ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"] {
        if Path::new(p).exists() {
            return p;
        }
    }
    panic!("these tests need Debian's docker-registry package (apt-get install docker-registry); .ci/run installs it")
}

impl Registry {
    /// Starts one storing under `dir`; with `auth`, it asks for those credentials
    /// (htpasswd, bcrypt) on every request.
    pub fn start(dir: &Path, auth: Option<(&str, &str)>) -> Registry {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {host}\n  secret: caravel-test\n",
            dir.join("data").display()
        );
        let cred = auth.map(|(u, pw)| {
            let hash = bcrypt::hash(pw, 4).unwrap();
            std::fs::write(dir.join("htpasswd"), format!("{u}:{hash}\n")).unwrap();
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: caravel-test\n    path: {}\n",
                dir.join("htpasswd").display()
            ));
            RegistryCredential {
                username: u.into(),
                password: pw.into(),
            }
        });
        std::fs::write(dir.join("config.yml"), cfg).unwrap();
        let log = dir.join("registry.log");
        let child = Command::new(registry_binary())
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .unwrap();
        let r = Registry {
            child,
            host,
            log,
            cred,
        };
        let url = format!("http://{}/v2/", r.host);
        wait_for("the registry", Duration::from_secs(20), || {
            let code = reqwest::blocking::get(&url).ok()?.status().as_u16();
            (code == 200 || code == 401).then_some(())
        });
        r
    }

    /// Pushes an image of `layers` and `config` as `repo:tag`; returns its reference.
    pub fn push(
        &self,
        repo: &str,
        tag: &str,
        layers: Vec<Vec<u8>>,
        config: &ImageConfig,
    ) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = oci::registry::Client::new(vec![]).unwrap();
        rt.block_on(oci::push(
            &client,
            &self.host,
            repo,
            tag,
            self.cred.as_ref(),
            layers,
            config,
        ))
        .unwrap();
        format!("{}/{repo}:{tag}", self.host)
    }

    /// How many times a blob was fetched (`GET`, answered 200 or a redirect).
    pub fn blob_gets(&self, digest: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest} ")))
            .filter(|l| l.contains("\" 200 ") || l.contains("\" 307 "))
            .count()
    }
}

pub fn busybox_layer() -> Vec<u8> {
    oci::testimage::busybox_layer(Path::new("/bin/busybox"))
        .expect("a static busybox at /bin/busybox (Debian's busybox-static)")
}

fn strings(v: &[&str]) -> Option<Vec<String>> {
    Some(v.iter().map(|s| s.to_string()).collect())
}

fn layer_hex(layer: &[u8]) -> String {
    oci::registry::digest_of(layer)
        .trim_start_matches("sha256:")
        .to_string()
}

fn agent_layers(p: &Pool, agent: &str) -> Vec<String> {
    std::fs::read_dir(p.file(&format!("agent-{agent}")).join("images/layers"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".size"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_task_runs_in_its_image_with_the_images_entrypoint_environment_and_layers() {
    in_image_with("image", "auto");
}

/// The same through runc (crun is what `auto` finds first).
#[test]
fn runc_runs_tasks_in_images_the_same_way() {
    in_image_with("imagerunc", "runc");
}

fn in_image_with(tag: &str, runtime: &str) {
    let mut p = Pool::server_only(tag);
    p.bare_agents = true;
    p.start_agent("a", &["--cpus", "4", "--oci-runtime", runtime]);
    p.wait_nodes_ready(1);
    let node = &p.get(&p.admin, "/v1/nodes").unwrap()[0];
    assert_eq!(node["capacity"]["images"], true, "{node}");
    let reg = Registry::start(&p.file("registry"), None);
    let app = oci::layer::build(&[
        Entry::Dir {
            path: "app".into(),
            mode: 0o755,
        },
        Entry::File {
            path: "app/hello.sh".into(),
            mode: 0o755,
            data: br#"echo "hello $1 $IMG_VAR uid=$(id -u) cwd=$(pwd) path=$PATH"
[ -e /etc/removed ] && echo removed-visible || echo removed-hidden
cat /etc/kept
ls /
echo in-image > /caravel/work/out
echo saved > "$CARAVEL_CHECKPOINT_DIR/state"
"#
            .to_vec(),
        },
        Entry::File {
            path: "etc/removed".into(),
            mode: 0o644,
            data: b"old\n".to_vec(),
        },
        Entry::File {
            path: "etc/kept".into(),
            mode: 0o644,
            data: b"kept\n".to_vec(),
        },
    ])
    .unwrap();
    // A layer on top that deletes a file of the one below (a whiteout).
    let top = oci::layer::build(&[Entry::Whiteout {
        path: "etc/removed".into(),
    }])
    .unwrap();
    let config = ImageConfig {
        env: strings(&["IMG_VAR=from-image", "PATH=/bin:/usr/bin"]),
        entrypoint: strings(&["/bin/sh", "/app/hello.sh"]),
        cmd: strings(&["default-arg"]),
        working_dir: Some("/app".into()),
    };
    let image = reg.push(
        "caravel/hello",
        "v1",
        vec![busybox_layer(), app, top],
        &config,
    );

    // The image's own entrypoint and command, environment and working directory.
    let j1 = p.submit(
        &p.admin,
        json!({"image": image, "resources": {"cpu_milli": 100}}),
    );
    let j = p.wait_state(j1, &["succeeded", "failed"], Duration::from_secs(60));
    let out = p.logs(j1, 0, "stdout");
    assert_eq!(
        j["state"],
        "succeeded",
        "{j} {out} {}",
        p.logs(j1, 0, "stderr")
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "hello default-arg from-image uid=200001 cwd=/app path=/bin:/usr/bin",
        "{out}"
    );
    assert_eq!(lines[1], "removed-hidden", "{out}");
    assert_eq!(lines[2], "kept", "{out}");
    // The image's root and Caravel's folders; nothing of the host's.
    let root: Vec<&str> = lines[3..].to_vec();
    for d in ["app", "bin", "caravel", "dev", "etc", "proc", "sys", "tmp"] {
        assert!(root.contains(&d), "/{d} missing from {root:?}");
    }
    for d in ["home", "root", "var", "work", "boot"] {
        assert!(!root.contains(&d), "/{d} of the host is visible: {root:?}");
    }
    // Its checkpoint went to the server as any task's does.
    let c = wait_for("the checkpoint", Duration::from_secs(20), || {
        let c = p
            .get(&p.admin, &format!("/v1/jobs/{j1}/checkpoints"))
            .ok()?;
        (c.as_array()?.len() == 1).then_some(c)
    });
    assert!(c[0]["version"].as_u64().unwrap() >= 1, "{c}");

    // `args` replace the image's command, the job's environment its own.
    let j2 = p.submit(
        &p.admin,
        json!({"image": image, "args": ["given-arg"], "env": {"IMG_VAR": "from-job"},
               "resources": {"cpu_milli": 100}}),
    );
    // A command replaces the entrypoint too, found on the image's PATH.
    let j3 = p.submit(
        &p.admin,
        json!({"image": image, "command": "sh", "args": ["-c", "echo $0 $IMG_VAR; cat /proc/1/cmdline | tr '\\0' ' '"],
               "resources": {"cpu_milli": 100}}),
    );
    // Not in the image: a clear error, not a crash.
    let j4 = p.submit(
        &p.admin,
        json!({"image": image, "command": "python3", "resources": {"cpu_milli": 100}}),
    );
    let missing = format!("{}/caravel/nothing:v1", reg.host);
    let j5 = p.submit(
        &p.admin,
        json!({"image": missing, "command": "true", "resources": {"cpu_milli": 100}}),
    );
    // The run's cgroups hold the task (the runtime worked outside them): its memory
    // limit is the job's.
    let j6 = p.submit(
        &p.admin,
        json!({"image": image, "command": "sh", "args": ["-c",
               "grep -c /run- /proc/self/cgroup; cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max"],
               "resources": {"cpu_milli": 100, "memory_bytes": 64 << 20}}),
    );
    for j in [j2, j3, j4, j5, j6] {
        p.wait_state(j, &["succeeded", "failed"], Duration::from_secs(60));
    }
    assert!(p
        .logs(j2, 0, "stdout")
        .starts_with("hello given-arg from-job uid=200001"));
    assert_eq!(
        p.logs(j3, 0, "stdout"),
        "/bin/sh from-image\n/.caravel/init -- /bin/sh -c echo $0 $IMG_VAR; cat /proc/1/cmdline | tr '\\0' ' ' "
    );
    let out = p.logs(j6, 0, "stdout");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].parse::<u32>().unwrap() >= 1,
        "in no run cgroup: {out}"
    );
    assert_eq!(lines[1], (64u64 << 20).to_string(), "{out}");
    let j = p.job(&p.admin, j4);
    assert_eq!(j["state"], "failed");
    let msg = j["runs"][0]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("`python3` is not in the image"), "{j}");
    let j = p.job(&p.admin, j5);
    assert_eq!(j["state"], "failed");
    let msg = j["runs"][0]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("no such image"), "{j}");

    // Through the CLI: `--image` and no command.
    let out = p.cli(&["submit", "--wait", "--image", &image, "--cpus", "0.1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_hostile_suite_holds_in_an_image() {
    let p = crate::isolation::hostile_pool("hostileimg");
    let reg = Registry::start(&p.file("registry"), None);
    let image = reg.push(
        "caravel/busybox",
        "1",
        vec![busybox_layer()],
        &ImageConfig::default(),
    );
    crate::isolation::hostile_suite(&p, Some(&image));
}

#[test]
fn a_hundred_tasks_pull_each_layer_once_with_the_tenants_credentials_and_the_cache_is_bounded() {
    let mut p = Pool::server_only("pullonce");
    p.bare_agents = true;
    // Room for one image's layers, not two.
    p.start_agent(
        "a",
        &["--cpus", "16", "--memory", "8Gi", "--image-cache", "3Mi"],
    );
    p.wait_nodes_ready(1);
    let reg = Registry::start(&p.file("registry"), Some(("puller", "s3cret-pw")));
    let base = busybox_layer();
    let marker = oci::layer::build(&[Entry::File {
        path: "etc/which".into(),
        mode: 0o644,
        data: b"first\n".to_vec(),
    }])
    .unwrap();
    let image = reg.push(
        "team/app",
        "v1",
        vec![base.clone(), marker.clone()],
        &ImageConfig::default(),
    );

    // Tenant A stores its credentials; the CLI never shows the password back.
    let a = p
        .post(&p.admin, "/v1/tenants", &json!({"name": "teama"}))
        .unwrap();
    let a_tok = a["token"].as_str().unwrap().to_string();
    let b = p
        .post(&p.admin, "/v1/tenants", &json!({"name": "teamb"}))
        .unwrap();
    let b_tok = b["token"].as_str().unwrap().to_string();
    let mut login = Command::new(BIN)
        .args([
            "registry",
            "login",
            &reg.host,
            "--username",
            "puller",
            "--password-stdin",
        ])
        .env("CARAVEL_SERVER", &p.url)
        .env("CARAVEL_TOKEN", &a_tok)
        .env("CARAVEL_CONFIG", p.file("no-config.toml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    login
        .stdin
        .take()
        .unwrap()
        .write_all(b"s3cret-pw\n")
        .unwrap();
    let out = login.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = p.cli_as(&a_tok, &["registry", "ls"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&reg.host) && text.contains("puller"),
        "{text}"
    );
    assert!(!text.contains("s3cret-pw"), "{text}");
    let listed = p.get(&a_tok, "/v1/registries").unwrap();
    assert_eq!(
        listed,
        json!([{"registry": reg.host, "username": "puller"}])
    );
    assert!(!p
        .get(&p.admin, "/v1/tenants")
        .unwrap()
        .to_string()
        .contains("s3cret-pw"));

    // A hundred tasks of the uncached image start together: each layer comes once.
    let job = p.submit(
        &a_tok,
        json!({"image": image, "command": "cat", "args": ["/etc/which"], "tasks": 100,
               "resources": {"cpu_milli": 100, "memory_bytes": 32 << 20}}),
    );
    let j = p.wait_state(job, &["succeeded", "failed"], Duration::from_secs(180));
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(p.logs(job, 99, "stdout"), "first\n");
    for l in [&base, &marker] {
        let d = oci::registry::digest_of(l);
        assert_eq!(reg.blob_gets(&d), 1, "{d} fetched more than once");
    }
    assert!(!p.job(&a_tok, job).to_string().contains("s3cret-pw"));

    // Tenant B has no credentials: the registry refuses it, whatever the node holds.
    let jb = p.submit(
        &b_tok,
        json!({"image": image, "command": "true", "resources": {"cpu_milli": 100}}),
    );
    let j = p.wait_state(jb, &["succeeded", "failed"], Duration::from_secs(60));
    assert_eq!(j["state"], "failed", "{j}");
    let msg = j["runs"][0]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("needs credentials"), "{j}");

    // A second image with other layers: the first's go (nothing runs on them).
    let other = busybox_layer_with(b"second\n");
    let image2 = reg.push(
        "team/app",
        "v2",
        vec![other.clone()],
        &ImageConfig::default(),
    );
    let j2 = p.submit(
        &a_tok,
        json!({"image": image2, "command": "cat", "args": ["/etc/which"], "resources": {"cpu_milli": 100}}),
    );
    let j = p.wait_state(j2, &["succeeded", "failed"], Duration::from_secs(60));
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(p.logs(j2, 0, "stdout"), "second\n");
    let cached = agent_layers(&p, "a");
    assert!(cached.contains(&layer_hex(&other)), "{cached:?}");
    // Both busybox layers do not fit in 3 MiB: the older one went (the small marker
    // layer may stay, the cache fits with it).
    assert!(
        !cached.contains(&layer_hex(&base)),
        "not evicted: {cached:?}"
    );
    assert!(cached.len() <= 2, "{cached:?}");
    // Forgetting the credentials: A is refused too.
    let out = p.cli_as(&a_tok, &["registry", "logout", &reg.host]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(p.get(&a_tok, "/v1/registries").unwrap(), json!([]));
}

/// The busybox layer with `/etc/which` holding `which` (a layer of its own digest).
fn busybox_layer_with(which: &[u8]) -> Vec<u8> {
    let mut e = vec![
        Entry::Dir {
            path: "bin".into(),
            mode: 0o755,
        },
        Entry::Dir {
            path: "etc".into(),
            mode: 0o755,
        },
        Entry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            data: std::fs::read("/bin/busybox").unwrap(),
        },
        Entry::File {
            path: "etc/which".into(),
            mode: 0o644,
            data: which.to_vec(),
        },
    ];
    for a in ["sh", "cat"] {
        e.push(Entry::Symlink {
            path: format!("bin/{a}"),
            target: "busybox".into(),
        });
    }
    oci::layer::build(&e).unwrap()
}
