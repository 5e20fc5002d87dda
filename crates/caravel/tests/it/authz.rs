//! The authorisation matrix, generated from the server's own route table
//! (`caravel_server::route_rules`): every route and method, with every kind of caller. A
//! route added without a rule cannot be added (the table is how routes are added); a
//! method the table does not list must answer 405; and the OpenAPI document must list
//! exactly the table's operations.

use std::collections::BTreeSet;

use caravel_server::{route_rules, Access};
use serde_json::{json, Value};

use crate::harness::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Caller {
    NoToken,
    BadToken,
    OtherTenant,
    Owner,
    Agent,
    Admin,
}

const CALLERS: [Caller; 6] = [
    Caller::NoToken,
    Caller::BadToken,
    Caller::OtherTenant,
    Caller::Owner,
    Caller::Agent,
    Caller::Admin,
];

/// What `caller` may get from a route with `access`: Ok(()) if the answer is right.
fn judge(access: Access, caller: Caller, owned: bool, status: u16) -> Result<(), String> {
    let denied = status == 401 || status == 403;
    let expect = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(format!("{what}, got {status}"))
        }
    };
    match (access, caller) {
        (Access::Public, _) => expect(!denied, "public: never 401/403"),
        (_, Caller::NoToken | Caller::BadToken) => expect(status == 401, "expected 401"),
        (Access::Admin, Caller::Admin) => expect(!denied, "the admin is allowed"),
        (Access::Admin, _) => expect(status == 403, "admin only: expected 403"),
        (Access::Agent, Caller::Agent | Caller::Admin) => expect(!denied, "allowed"),
        (Access::Agent, _) => expect(status == 403, "agents only: expected 403"),
        (Access::User, Caller::Agent) => expect(status == 403, "no agent tokens: expected 403"),
        // Another tenant's object is not found, never forbidden (ids do not leak).
        (Access::User | Access::Any, Caller::OtherTenant) if owned => {
            expect(status == 404, "another tenant's object: expected 404")
        }
        (Access::User | Access::Any, _) => expect(!denied, "allowed"),
        (Access::Gateway, _) => Ok(()),
    }
}

#[test]
fn every_route_holds_its_rule_for_every_kind_of_caller() {
    let p = Pool::with_server_args(
        "authz",
        &["--rate-limit", "off", "--rate-limit-anonymous", "off"],
        &[("a", &["--cpus", "4"])],
    );
    let mk = |name: &str| {
        p.post(&p.admin, "/v1/tenants", &json!({"name": name}))
            .unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let owner = mk("owner");
    let other = mk("other");
    let job = p.submit(
        &owner,
        json!({"command": "sleep", "args": ["300"], "resources": {"cpu_milli": 100}}),
    );
    p.wait_state(job, &["running"], std::time::Duration::from_secs(20));
    p.post(
        &owner,
        "/v1/services",
        &json!({"name": "svc", "command": "sleep", "args": ["300"], "min_replicas": 0, "max_replicas": 1}),
    )
    .unwrap();
    let node = p.node_name("a");
    let token = |c: Caller| -> Option<&str> {
        match c {
            Caller::NoToken => None,
            Caller::BadToken => Some("cvt_not_a_token"),
            Caller::OtherTenant => Some(&other),
            Caller::Owner => Some(&owner),
            Caller::Agent => Some(&p.agent_token),
            Caller::Admin => Some(&p.admin),
        }
    };
    let send = |method: &str, path: &str, tok: Option<&str>| -> u16 {
        Pool::rt().block_on(async {
            let mut r = reqwest::Client::new().request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{path}", p.url),
            );
            if let Some(t) = tok {
                r = r.bearer_auth(t);
            }
            if method != "GET" && method != "HEAD" {
                r = r.header("content-type", "application/json").body("{}");
            }
            r.send().await.unwrap().status().as_u16()
        })
    };
    let rules = route_rules();
    let mut failures = vec![];
    let mut checked = 0;
    // Callers that change things go last (the owner's and the admin's cancel, the
    // admin's drain), so each rule is judged against the same objects.
    let order = [
        Caller::NoToken,
        Caller::BadToken,
        Caller::OtherTenant,
        Caller::Agent,
        Caller::Owner,
        Caller::Admin,
    ];
    assert_eq!(order.len(), CALLERS.len());
    for caller in order {
        for r in &rules {
            if r.access == Access::Gateway {
                continue;
            }
            let owned = r.path.contains("{id}") || r.path.starts_with("/v1/services/");
            let path = r
                .path
                .replace("{id}", &job.to_string())
                .replace("{index}", "0")
                .replace("{name}/", &format!("{node}/"))
                .replace("{name}", "svc")
                .replace("{registry}", "registry.example")
                .replace("{digest}", &"ab".repeat(32));
            // Draining the node would stop the test's own job; undrain is harmless.
            if caller == Caller::Admin && r.path.ends_with("/drain") {
                continue;
            }
            let status = send(r.method, &path, token(caller));
            checked += 1;
            if let Err(e) = judge(r.access, caller, owned, status) {
                failures.push(format!("{} {} as {caller:?}: {e}", r.method, r.path));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked}:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // A method the table does not list is not there.
    let paths: BTreeSet<&str> = rules
        .iter()
        .filter(|r| r.access != Access::Gateway)
        .map(|r| r.path.as_str())
        .collect();
    for path in &paths {
        let listed: BTreeSet<&str> = rules
            .iter()
            .filter(|r| r.path == *path)
            .map(|r| r.method)
            .collect();
        let concrete = path
            .replace("{id}", &job.to_string())
            .replace("{index}", "0")
            .replace("{name}/", &format!("{node}/"))
            .replace("{name}", "svc")
            .replace("{registry}", "registry.example")
            .replace("{digest}", &"ab".repeat(32));
        for m in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            if listed.contains(m) {
                continue;
            }
            let s = send(m, &concrete, Some(&p.admin));
            assert_eq!(
                s, 405,
                "{m} {path}: the table does not list it, the router answered {s}"
            );
        }
    }
    // The OpenAPI document lists exactly the table's operations.
    let doc = p.get("", "/v1/openapi.json").unwrap();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .filter(|k| *k != "parameters")
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    // The gateway's catch-all is documented method by method.
    let any = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];
    let routed: BTreeSet<(String, String)> = rules
        .iter()
        .flat_map(|r| {
            let methods = if r.method == "ANY" {
                any.to_vec()
            } else {
                vec![r.method]
            };
            let path = r.path.replace("{*rest}", "{rest}");
            methods
                .into_iter()
                .map(move |m| (m.to_string(), path.clone()))
        })
        .collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "routed but not in the OpenAPI document: {undocumented:?}\ndocumented but not routed: {unrouted:?}"
    );
    let _: Value = doc;
}
