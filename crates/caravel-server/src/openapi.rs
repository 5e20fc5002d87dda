//! The OpenAPI 3.1 description of `/v1`, served at `/v1/openapi.json`. A test checks that
//! every route the router serves is described here.

use serde_json::{json, Value};

fn err_responses() -> Value {
    json!({
        "400": {"$ref": "#/components/responses/Error"},
        "401": {"$ref": "#/components/responses/Error"},
        "403": {"$ref": "#/components/responses/Error"},
        "404": {"$ref": "#/components/responses/Error"},
        "409": {"$ref": "#/components/responses/Error"},
        "422": {"$ref": "#/components/responses/Error"}
    })
}

fn ok(schema: Value, code: &str) -> Value {
    let mut r = err_responses();
    r[code] =
        json!({"description": "success", "content": {"application/json": {"schema": schema}}});
    r
}

fn sref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn arr(name: &str) -> Value {
    json!({"type": "array", "items": sref(name)})
}

fn body(name: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": sref(name)}}})
}

fn id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "schema": {"type": "integer", "minimum": 1}})
}

fn q(name: &str, ty: &str, desc: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "schema": {"type": ty}, "description": desc})
}

pub fn document() -> Value {
    let u64s = json!({"type": "integer", "minimum": 0});
    // Apart: one json! holding everything passes the macro's recursion limit.
    let log_ship_request = json!({"type": "object", "required": ["entries"], "properties": {"entries": {"type": "array", "items": {"type": "object", "required": ["job", "index", "run", "stream", "offset"], "properties": {"job": {"type": "integer"}, "index": {"type": "integer"}, "run": {"type": "integer"}, "stream": {"type": "string", "enum": ["stdout", "stderr"]}, "offset": {"type": "integer"}, "data": {"type": "string", "format": "byte"}, "skip": {"type": "boolean"}, "done": {"type": "boolean"}}}}}});
    let log_ship_response = json!({"type": "object", "required": ["limit", "results"], "properties": {"limit": {"type": "integer"}, "results": {"type": "array", "items": {"type": "object", "properties": {"state": {"type": "string", "enum": ["ok", "gap", "unknown", "full"]}, "end": {"type": "integer"}, "done": {"type": "boolean"}}}}}});
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {"title": "Caravel API", "version": "1", "description":
            "The Caravel control plane. Every endpoint under /v1 takes `Authorization: Bearer TOKEN`. Errors are JSON `{error: {code, message, field}}` with a stable `code`."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Error": {"description": "error", "content": {"application/json": {"schema": sref("Error")}}}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
                    "code": {"type": "string", "enum": ["invalid_argument", "malformed_request", "unauthenticated", "permission_denied", "not_found", "conflict", "unschedulable", "exceeds_quota", "unavailable", "rate_limited", "upstream_failed", "upstream_timeout", "too_large", "method_not_allowed", "internal"]},
                    "message": {"type": "string"}, "field": {"type": "string"}}}}},
                "GpuRequest": {"type": "object", "additionalProperties": false, "required": ["model"], "properties": {"model": {"type": "string"}, "any_of": {"type": "array", "items": {"type": "string"}, "description": "other acceptable models, in order"}, "count": {"type": "integer", "minimum": 1, "default": 1}, "milli": {"type": "integer", "minimum": 1, "maximum": 999, "description": "a share of one device in thousandths; count must be 1"}}},
                "TaskResources": {"type": "object", "additionalProperties": false, "properties": {
                    "cpu_milli": {"type": "integer", "minimum": 1, "default": 1000},
                    "memory_bytes": {"type": "integer", "minimum": 1, "default": 536870912},
                    "gpu": sref("GpuRequest")}},
                "JobSpec": {"type": "object", "additionalProperties": false, "required": ["command"], "properties": {
                    "name": {"type": "string"}, "tasks": {"type": "integer", "minimum": 1, "default": 1},
                    "command": {"type": "string", "minLength": 1}, "args": {"type": "array", "items": {"type": "string"}},
                    "env": {"type": "object", "additionalProperties": {"type": "string"}},
                    "resources": sref("TaskResources"),
                    "priority": {"type": "string", "enum": ["online", "batch", "spot"], "default": "batch"},
                    "max_runtime_ms": {"type": "integer", "minimum": 1}, "max_retries": {"type": "integer", "minimum": 0, "default": 0},
                    "gang": {"type": "boolean", "default": false}, "topology": {"type": "string", "enum": ["node", "rack", "zone"], "description": "gangs only"}, "min_runtime_ms": {"type": "integer", "minimum": 0}, "kill_grace_ms": {"type": "integer", "minimum": 0}, "fence": {"type": "boolean", "default": false, "description": "at most one copy runs, even across a network partition"}}},
                "SubmitResponse": {"type": "object", "properties": {"id": u64s}},
                "CheckpointView": {"type": "object", "properties": {"task": u64s, "version": u64s, "run": u64s, "bytes": u64s, "saved_ms": u64s, "sha256": {"type": "string"}}},
                "PendingReason": {"type": "object", "properties": {"code": {"type": "string", "enum": ["quota", "no_fit", "gang", "topology", "reserved", "backfill", "fair_share", "preempting", "no_preemption", "no_nodes"]}, "message": {"type": "string"}, "counts": {"type": "object", "additionalProperties": {"type": "integer"}}}},
                "JobSummary": {"type": "object", "properties": {
                    "id": u64s, "tenant": {"type": "string"}, "name": {"type": ["string", "null"]},
                    "state": {"type": "string", "enum": ["pending", "running", "succeeded", "failed", "cancelled"]},
                    "priority": {"type": "string"}, "tasks": u64s, "tasks_running": u64s, "tasks_done": u64s, "gang": {"type": "boolean"},
                    "submitted_ms": u64s, "started_ms": {"type": ["integer", "null"]}, "finished_ms": {"type": ["integer", "null"]},
                    "message": {"type": "string"}, "pending_reasons": arr("PendingReason")}},
                "JobDetail": {"allOf": [sref("JobSummary"), {"type": "object", "properties": {"spec": sref("JobSpec"), "task_list": {"type": "array", "items": {"type": "object"}}, "runs": {"type": "array", "items": {"type": "object"}}}}]},
                "NodeView": {"type": "object", "properties": {"id": u64s, "name": {"type": "string"}, "state": {"type": "string", "enum": ["ready", "lost", "down"]}, "address": {"type": "string"}, "topology": {"type": "object"}, "labels": {"type": "object"}, "capacity": {"type": "object"}, "allocated_cpu_milli": u64s, "allocated_memory_bytes": u64s, "allocated_devices": {"type": "array", "items": u64s}, "running_tasks": u64s, "last_seen_ms": u64s}},
                "Quota": {"type": "object", "additionalProperties": false, "properties": {"cpu_milli": u64s, "memory_bytes": u64s, "gpus": {"type": "object", "additionalProperties": {"type": "integer"}}, "storage_bytes": u64s}},
                "CreateTenantRequest": {"type": "object", "additionalProperties": false, "required": ["name"], "properties": {"name": {"type": "string"}, "weight": {"type": "number", "exclusiveMinimum": 0}, "quota": sref("Quota"), "guarantee": sref("Quota")}},
                "TenantView": {"type": "object", "properties": {"id": u64s, "name": {"type": "string"}, "weight": {"type": "number"}, "quota": sref("Quota"), "guarantee": sref("Quota"), "created_ms": u64s, "storage_used_bytes": u64s}},
                "CreateTenantResponse": {"allOf": [sref("TenantView"), {"type": "object", "properties": {"token": {"type": "string", "description": "shown once"}}}]},
                "UsageTotals": {"type": "object", "properties": {"tenant": {"type": "string"}, "job": u64s, "runs": u64s, "wall_ms": u64s, "cpu_milli_ms": u64s, "memory_byte_ms": u64s, "gpu_ms": {"type": "object", "additionalProperties": {"type": "integer"}}}},
                "UsageResponse": {"type": "object", "properties": {"by_tenant": arr("UsageTotals"), "by_job": arr("UsageTotals")}},
                "RegisterRequest": {"type": "object", "required": ["name", "address", "agent_url", "agent_secret", "instance", "capacity"]},
                "RegisterResponse": {"type": "object", "properties": {"node_id": u64s, "heartbeat_ms": u64s}},
                "SyncRequest": {"type": "object", "required": ["node_id", "instance", "running", "known_version", "wait_ms"]},
                "SyncResponse": {"type": "object", "properties": {"version": u64s, "desired": {"type": "array", "items": {"type": "object"}}}},
                "EventsRequest": {"type": "object", "required": ["node_id", "events"]},
                "LogShipRequest": log_ship_request,
                "LogShipResponse": log_ship_response,
                "ShutdownRequest": {"type": "object", "additionalProperties": false, "required": ["node_id", "instance"], "properties": {"node_id": u64s, "instance": {"type": "string"}}},
                "ShutdownResponse": {"type": "object", "properties": {"stopping": u64s}}
            }
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {"summary": "liveness of the server", "security": [], "responses": {"200": {"description": "ok"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (admin token)", "responses": {"200": {"description": "OpenMetrics text"}, "401": {"$ref": "#/components/responses/Error"}, "403": {"$ref": "#/components/responses/Error"}}}},
            "/v1/tls/ca.pem": {"get": {"summary": "the pool CA of a server started with --tls-self-signed (agents joining with --ca-sha256 check it by its SHA-256); 404 otherwise", "security": [], "responses": {"200": {"description": "PEM"}, "404": {"description": "no pool CA"}}}},
            "/v1/openapi.json": {"get": {"summary": "this document", "security": [], "responses": {"200": {"description": "OpenAPI"}}}},
            "/v1/whoami": {"get": {"summary": "the caller's role", "responses": ok(json!({"type": "object"}), "200")}},
            "/v1/jobs": {
                "post": {"summary": "submit a job (201); with an Idempotency-Key already used by this tenant for the same spec, the job it made (200, `Idempotent-Replayed: true`)", "parameters": [q("tenant", "string", "admin only: submit for this tenant (default `default`)"), {"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "maxLength": 255}, "description": "1-255 visible ASCII characters; makes the request safe to repeat"}], "requestBody": body("JobSpec"), "responses": ok(sref("SubmitResponse"), "201")},
                "get": {"summary": "list jobs (a tenant sees its own)", "parameters": [q("state", "string", "comma list of states, or `active`"), q("tenant", "string", "admin only"), q("limit", "integer", "newest N, default 1000")], "responses": ok(arr("JobSummary"), "200")}
            },
            "/v1/jobs/{id}": {"get": {"summary": "a job with tasks, runs and pending reasons", "parameters": [id_param()], "responses": ok(sref("JobDetail"), "200")}},
            "/v1/jobs/{id}/cancel": {"post": {"summary": "cancel: SIGTERM, then SIGKILL after the grace period", "parameters": [id_param()], "responses": ok(sref("JobSummary"), "200")}},
            "/v1/jobs/{id}/logs": {"get": {"summary": "a task's stdout or stderr from byte `offset`", "parameters": [id_param(), q("task", "integer", "task index, default 0"), q("stream", "string", "stdout (default) or stderr"), q("offset", "integer", "byte offset"), q("run", "integer", "a specific run (attempt)")],
                "responses": {"200": {"description": "bytes; headers x-caravel-next-offset and x-caravel-done", "content": {"application/octet-stream": {}}}, "404": {"$ref": "#/components/responses/Error"}, "503": {"$ref": "#/components/responses/Error"}}}},
            "/v1/jobs/{id}/checkpoints": {"get": {"summary": "each task's newest checkpoint", "parameters": [id_param()], "responses": ok(arr("CheckpointView"), "200")}},
            "/v1/jobs/{id}/tasks/{index}/checkpoint": {
                "get": {"summary": "a task's newest checkpoint: a tar archive of its CARAVEL_CHECKPOINT_DIR", "parameters": [id_param(), {"name": "index", "in": "path", "required": true, "schema": {"type": "integer"}}],
                    "responses": {"200": {"description": "tar archive; headers x-caravel-checkpoint-version, x-caravel-checkpoint-run, x-caravel-sha256", "content": {"application/x-tar": {}}}, "404": {"$ref": "#/components/responses/Error"}}},
                "put": {"summary": "agent: save a task's checkpoint (tar body, header x-caravel-sha256); kept only from the task's current run", "parameters": [id_param(), {"name": "index", "in": "path", "required": true, "schema": {"type": "integer"}}, {"name": "run", "in": "query", "required": true, "schema": {"type": "integer"}}],
                    "requestBody": {"required": true, "content": {"application/x-tar": {}}},
                    "responses": {"201": {"description": "saved", "content": {"application/json": {"schema": sref("CheckpointView")}}}, "400": {"$ref": "#/components/responses/Error"}, "409": {"$ref": "#/components/responses/Error"}, "413": {"$ref": "#/components/responses/Error"}}}
            },
            "/v1/nodes": {"get": {"summary": "nodes with capacity and allocation", "responses": ok(arr("NodeView"), "200")}},
            "/v1/tenants": {
                "post": {"summary": "create a tenant (admin); its token is returned once", "requestBody": body("CreateTenantRequest"), "responses": ok(sref("CreateTenantResponse"), "201")},
                "get": {"summary": "list tenants", "responses": ok(arr("TenantView"), "200")}
            },
            "/v1/usage": {"get": {"summary": "metered usage totals per tenant and per job", "parameters": [q("tenant", "string", "admin only"), q("job", "integer", "one job")], "responses": ok(sref("UsageResponse"), "200")}},
            "/v1/agent/register": {"post": {"summary": "agent: register a node (agent or admin token)", "requestBody": body("RegisterRequest"), "responses": ok(sref("RegisterResponse"), "200")}},
            "/v1/agent/sync": {"post": {"summary": "agent: heartbeat and long-poll for the node's desired runs", "requestBody": body("SyncRequest"), "responses": ok(sref("SyncResponse"), "200")}},
            "/v1/agent/logs": {"post": {"summary": "agent: ship runs' stdout and stderr by offset (a resend is taken once)", "requestBody": body("LogShipRequest"), "responses": ok(sref("LogShipResponse"), "200")}},
            "/v1/agent/events": {"post": {"summary": "agent: report runs started and exited (idempotent)", "requestBody": body("EventsRequest"), "responses": {"204": {"description": "applied"}}}},
            "/v1/agent/shutdown": {"post": {"summary": "agent: leaving cleanly; stop and requeue the node's runs (the node is down until it registers again)", "requestBody": body("ShutdownRequest"), "responses": ok(sref("ShutdownResponse"), "200")}}
        }
    });
    more_paths(&mut doc);
    doc
}

fn path_param(name: &str, ty: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": ty}})
}

/// The routes added after the first document (apart: one `json!` holding everything
/// passes the macro's recursion limit).
fn more_paths(doc: &mut Value) {
    let obj = json!({"type": "object"});
    let paths = &mut doc["paths"];
    paths["/v1/jobs/{id}/checkpoint-cut"] = json!({"get": {"summary": "a gang's committed checkpoint cut: the version of each rank's part", "parameters": [id_param()], "responses": ok(obj.clone(), "200")}});
    paths["/v1/jobs/{id}/workdir"] = json!({"get": {"summary": "the working directory archive the job was submitted with (tar.gz)", "parameters": [id_param()], "responses": {"200": {"description": "tar.gz", "content": {"application/gzip": {}}}, "404": {"$ref": "#/components/responses/Error"}}}});
    paths["/v1/registries"] = json!({"get": {"summary": "the caller's image registry credentials (names only, never secrets)", "parameters": [q("tenant", "string", "admin only")], "responses": ok(json!({"type": "array", "items": obj.clone()}), "200")}});
    paths["/v1/registries/{registry}"] = json!({
        "put": {"summary": "set the caller's credentials for a registry", "parameters": [path_param("registry", "string"), q("tenant", "string", "admin only")], "requestBody": {"required": true, "content": {"application/json": {"schema": obj.clone()}}}, "responses": ok(obj.clone(), "200")},
        "delete": {"summary": "remove the caller's credentials for a registry", "parameters": [path_param("registry", "string"), q("tenant", "string", "admin only")], "responses": {"204": {"description": "removed"}, "404": {"$ref": "#/components/responses/Error"}}}
    });
    paths["/v1/workdirs/{digest}"] = json!({
        "head": {"summary": "whether the caller has uploaded this working directory archive (by SHA-256)", "parameters": [path_param("digest", "string"), q("tenant", "string", "admin only")], "responses": {"200": {"description": "held"}, "404": {"description": "not held"}}},
        "put": {"summary": "upload a working directory archive (tar.gz, checked against its SHA-256 and --workdir-max-size)", "parameters": [path_param("digest", "string"), q("tenant", "string", "admin only")], "requestBody": {"required": true, "content": {"application/gzip": {}}}, "responses": ok(obj.clone(), "201")}
    });
    paths["/v1/nodes/{name}/drain"] = json!({"post": {"summary": "admin: start nothing new on the node; running work finishes", "parameters": [path_param("name", "string")], "responses": ok(sref("NodeView"), "200")}});
    paths["/v1/nodes/{name}/undrain"] = json!({"post": {"summary": "admin: the node takes work again", "parameters": [path_param("name", "string")], "responses": ok(sref("NodeView"), "200")}});
    paths["/v1/services"] = json!({
        "post": {"summary": "deploy or update a service (docs/services.md)", "parameters": [q("tenant", "string", "admin only")], "requestBody": {"required": true, "content": {"application/json": {"schema": obj.clone()}}}, "responses": ok(obj.clone(), "200")},
        "get": {"summary": "list services (a tenant sees its own)", "responses": ok(json!({"type": "array", "items": obj.clone()}), "200")}
    });
    paths["/v1/services/{name}"] = json!({
        "get": {"summary": "a service with its replicas, rollout and events", "parameters": [path_param("name", "string"), q("tenant", "string", "admin only")], "responses": ok(obj.clone(), "200")},
        "delete": {"summary": "delete a service and stop its replicas", "parameters": [path_param("name", "string"), q("tenant", "string", "admin only")], "responses": ok(obj.clone(), "200")}
    });
    let gateway = |what: &str| json!({"get": {"summary": format!("the gateway ({what}): any method, proxied to a ready replica of the service; a private service answers only its tenant's token, and answers exactly as a missing one otherwise"), "security": [], "parameters": [path_param("tenant", "string"), path_param("service", "string")], "responses": {"200": {"description": "the replica's answer"}, "404": {"$ref": "#/components/responses/Error"}, "429": {"$ref": "#/components/responses/Error"}, "502": {"$ref": "#/components/responses/Error"}, "503": {"$ref": "#/components/responses/Error"}, "504": {"$ref": "#/components/responses/Error"}}}});
    paths["/s/{tenant}/{service}"] = gateway("root");
    paths["/s/{tenant}/{service}/"] = gateway("root");
    paths["/s/{tenant}/{service}/{rest}"] = gateway("a path under the service");
}
