use serde_json::{json, Value};

use crate::harness::*;

fn err(r: Result<Value, (u16, Value)>) -> (u16, String, Option<String>, String) {
    let (status, body) = r.expect_err("expected an error");
    let e = &body["error"];
    (
        status,
        e["code"].as_str().unwrap_or("").to_string(),
        e["field"].as_str().map(str::to_string),
        e["message"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn every_bad_input_gets_a_clear_error_and_creates_nothing() {
    let p = Pool::new("bad", &[("a", &["--cpus", "2", "--gpus", "A100:1"])]);
    let ta = p
        .post(&p.admin, "/v1/tenants", &json!({"name": "alpha"}))
        .unwrap();
    let tb = p
        .post(&p.admin, "/v1/tenants", &json!({"name": "beta"}))
        .unwrap();
    let (ta, tb) = (
        ta["token"].as_str().unwrap().to_string(),
        tb["token"].as_str().unwrap().to_string(),
    );
    let cases: Vec<(Value, u16, &str, Option<&str>)> = vec![
        (
            json!({"command": "x", "gpus": 2}),
            400,
            "malformed_request",
            None,
        ),
        (
            json!({"command": "x", "resources": {"cpu_milli": -1}}),
            400,
            "malformed_request",
            Some("resources.cpu_milli"),
        ),
        (
            json!({"command": "x", "resources": {"cpu_milli": 0}}),
            400,
            "invalid_argument",
            Some("resources.cpu_milli"),
        ),
        (
            json!({"command": "x", "resources": {"cpu_milli": 9_000_000_000_000u64}}),
            400,
            "invalid_argument",
            Some("resources.cpu_milli"),
        ),
        (
            json!({"command": "x", "resources": {"memory_bytes": 9_000_000_000_000_000_000u64}}),
            400,
            "invalid_argument",
            Some("resources.memory_bytes"),
        ),
        (
            json!({"command": "x", "resources": {"gpu": {"model": "H100", "count": 1}}}),
            422,
            "unschedulable",
            Some("resources.gpu.model"),
        ),
        (
            json!({"command": "x", "resources": {"gpu": {"model": "A100", "count": 0}}}),
            400,
            "invalid_argument",
            Some("resources.gpu.count"),
        ),
        (
            json!({"command": "x", "resources": {"cpu_milli": 64000}}),
            422,
            "unschedulable",
            Some("resources.cpu_milli"),
        ),
        (
            json!({"command": ""}),
            400,
            "invalid_argument",
            Some("command"),
        ),
        (
            json!({"command": "x", "tasks": 0}),
            400,
            "invalid_argument",
            Some("tasks"),
        ),
        (
            json!({"command": "x", "priority": "urgent"}),
            400,
            "malformed_request",
            Some("priority"),
        ),
        (
            json!({"command": "x", "env": {"BAD-NAME": "1"}}),
            400,
            "invalid_argument",
            Some("env.BAD-NAME"),
        ),
        (
            json!({"command": "x", "max_runtime_ms": 0}),
            400,
            "invalid_argument",
            Some("max_runtime_ms"),
        ),
        (
            json!({"command": "x", "tasks": 2, "topology": "rack"}),
            400,
            "invalid_argument",
            Some("topology"),
        ),
        (
            json!({"command": "x", "gang": true, "topology": "datacenter"}),
            400,
            "malformed_request",
            Some("topology"),
        ),
        // A command may be left out only with an image (whose own then runs).
        (
            json!({"args": ["no command"]}),
            400,
            "invalid_argument",
            Some("command"),
        ),
    ];
    for (body, status, code, field) in &cases {
        let (s, c, f, m) = err(p.post(&ta, "/v1/jobs", body));
        assert_eq!((s, c.as_str()), (*status, *code), "{body}: {m}");
        if let Some(fl) = field {
            assert_eq!(f.as_deref(), Some(*fl), "{body}: {m}");
        }
        assert!(!m.is_empty());
    }
    let (s, c, _, m) = err(p.post_raw(&ta, "/v1/jobs", "{not json"));
    assert_eq!((s, c.as_str()), (400, "malformed_request"), "{m}");
    // Tokens.
    let (s, c, _, _) = err(p.post("cvt_bogus", "/v1/jobs", &json!({"command": "x"})));
    assert_eq!((s, c.as_str()), (401, "unauthenticated"));
    let (s, c, _, _) = err(p.post("", "/v1/jobs", &json!({"command": "x"})));
    assert_eq!((s, c.as_str()), (401, "unauthenticated"));
    let (s, c, _, _) = err(p.post(&p.agent_token, "/v1/jobs", &json!({"command": "x"})));
    assert_eq!((s, c.as_str()), (403, "permission_denied"));
    let (s, c, _, _) = err(p.post(&ta, "/v1/tenants", &json!({"name": "evil"})));
    assert_eq!((s, c.as_str()), (403, "permission_denied"));
    let (s, c, f, _) = err(p.post(&p.admin, "/v1/tenants", &json!({"name": "alpha"})));
    assert_eq!(
        (s, c.as_str(), f.as_deref()),
        (409, "conflict", Some("name"))
    );
    let (s, _, f, _) = err(p.post(&p.admin, "/v1/tenants", &json!({"name": "x y"})));
    assert_eq!((s, f.as_deref()), (400, Some("name")));
    let (s, _, f, _) = err(p.post(&p.admin, "/v1/tenants", &json!({"name": "w", "weight": -1})));
    assert_eq!((s, f.as_deref()), (400, Some("weight")));
    let (s, c, f, _) = err(p.post(&p.admin, "/v1/jobs?tenant=nobody", &json!({"command": "x"})));
    assert_eq!(
        (s, c.as_str(), f.as_deref()),
        (404, "not_found", Some("tenant"))
    );
    let (s, _, f, _) = err(p.get(&ta, "/v1/jobs?state=sleeping"));
    assert_eq!((s, f.as_deref()), (400, Some("state")));
    let (s, _, f, _) = err(p.get(&ta, "/v1/jobs/abc"));
    assert_eq!((s, f.as_deref()), (400, Some("id")));
    let (s, c, _, _) = err(p.get(&ta, "/v1/nothing-here"));
    assert_eq!((s, c.as_str()), (404, "not_found"));
    // Nothing was half-created by any of the above.
    assert_eq!(
        p.get(&p.admin, "/v1/jobs")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        p.get(&p.admin, "/v1/tenants")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // Tenant isolation: B can neither see nor cancel A's job.
    let id = p.submit(
        &ta,
        json!({"command": "sleep", "args": ["30"], "resources": {"cpu_milli": 100}}),
    );
    assert!(p
        .get(&tb, "/v1/jobs")
        .unwrap()
        .as_array()
        .unwrap()
        .is_empty());
    let (s, c, _, _) = err(p.get(&tb, &format!("/v1/jobs/{id}")));
    assert_eq!((s, c.as_str()), (404, "not_found"));
    let (s, _, _, _) = err(p.post(&tb, &format!("/v1/jobs/{id}/cancel"), &json!({})));
    assert_eq!(s, 404);
    let (s, _, _, _) = err(p.get(&tb, &format!("/v1/jobs/{id}/logs")));
    assert_eq!(s, 404);
    let (s, _, _, _) = err(p.get(&tb, &format!("/v1/usage?job={id}")));
    assert_eq!(s, 404);
    let (s, _, f, _) = err(p.post(&tb, "/v1/jobs?tenant=alpha", &json!({"command": "x"})));
    assert_eq!((s, f.as_deref()), (403, Some("tenant")));
    assert_eq!(p.get(&ta, "/v1/jobs").unwrap().as_array().unwrap().len(), 1);
    assert_eq!(p.job(&ta, id)["tenant"], "alpha");
    let ts = p.get(&tb, "/v1/tenants").unwrap();
    assert_eq!(ts.as_array().unwrap().len(), 1, "a tenant sees only itself");
    p.post(&ta, &format!("/v1/jobs/{id}/cancel"), &json!({}))
        .unwrap();

    // The CLI: one line, non-zero exit.
    for args in [
        vec!["submit", "--cpus", "lots", "--", "x"],
        vec!["submit", "--gpus", "H100", "--", "x"],
        vec!["submit", "--", ""],
        vec!["submit"],
        vec!["job", "show", "999"],
        vec!["job", "show", "notanumber"],
        vec!["tenant", "create", "gamma", "--quota", "disk=5"],
    ] {
        let out = p.cli_as(&ta, &args);
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(e.trim_end().lines().count(), 1, "{args:?}: {e}");
        assert!(e.starts_with("error: "), "{args:?}: {e}");
    }
    let out = p.cli_as(&ta, &["submit", "--gpus", "Z9:1", "--", "x"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("no node offers gpu model `Z9`") && e.contains("unschedulable"),
        "{e}"
    );
    let out = p.cli_as("cvt_wrong", &["jobs"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("(unauthenticated)"));
    std::fs::write(p.file("bad.toml"), "command = \"x\"\nnodes = 3\n").unwrap();
    let out = p.cli_as(&ta, &["submit", "-f", p.file("bad.toml").to_str().unwrap()]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("unknown field `nodes`"),
        "{e}"
    );
    assert_eq!(
        p.get(&p.admin, "/v1/jobs")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
