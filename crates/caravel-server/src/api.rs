//! HTTP handlers. Each parses and authenticates the request into typed values first, then
//! calls one `Core` operation under the lock, then shapes the answer.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use caravel_core::api::*;
use caravel_core::*;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::auth::{ct_eq, hash_token, Principal};
use crate::core::{Core, JobEntry, DEFAULT_TENANT};
use crate::error::ApiError;
use crate::{now_ms, Shared};

type Res<T> = Result<T, ApiError>;

/// Parses a JSON body, naming the offending field on error.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Res<T> {
    if body.is_empty() {
        return Err(ApiError::new(
            ErrorCode::MalformedRequest,
            "request body is empty; expected JSON",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path == "." {
            // A missing or unknown field at the top is named only in the message.
            crate::edge::field_named(&inner.to_string())
        } else {
            Some(path.clone())
        };
        let msg = match &field {
            Some(f) if path != "." => format!("{f}: {inner}"),
            _ => inner.to_string(),
        };
        ApiError {
            code: ErrorCode::MalformedRequest,
            message: msg,
            field,
        }
    })
}

pub fn authenticate(s: &Shared, headers: &HeaderMap) -> Res<Principal> {
    let h = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthenticated,
                "missing `Authorization: Bearer TOKEN` header",
            )
        })?;
    let token = h.strip_prefix("Bearer ").map(str::trim).ok_or_else(|| {
        ApiError::new(
            ErrorCode::Unauthenticated,
            "authorization must be `Bearer TOKEN`",
        )
    })?;
    let hash = hash_token(token);
    if ct_eq(&hash, &s.admin_hash) {
        return Ok(Principal::Admin);
    }
    if ct_eq(&hash, &s.agent_hash) {
        return Ok(Principal::Agent);
    }
    let core = s.core.lock().expect("core lock");
    core.tenant_by_token_hash(&hash)
        .map(Principal::Tenant)
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthenticated, "unknown or revoked token"))
}

fn require_admin(p: Principal) -> Res<()> {
    match p {
        Principal::Admin => Ok(()),
        _ => Err(ApiError::new(
            ErrorCode::PermissionDenied,
            "this needs the admin token",
        )),
    }
}

fn require_agent(p: Principal) -> Res<()> {
    match p {
        Principal::Admin | Principal::Agent => Ok(()),
        _ => Err(ApiError::new(
            ErrorCode::PermissionDenied,
            "this needs an agent or admin token",
        )),
    }
}

fn user_only(p: Principal) -> Res<Principal> {
    match p {
        Principal::Agent => Err(ApiError::new(
            ErrorCode::PermissionDenied,
            "agent tokens may only call /v1/agent",
        )),
        p => Ok(p),
    }
}

/// Looks up a job the caller may see. Another tenant's job is reported as not found, so
/// ids do not leak what exists.
fn visible(core: &Core, p: Principal, id: JobId) -> Res<&JobEntry> {
    let j = core
        .jobs
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("job {id}")))?;
    match p {
        Principal::Tenant(t) if j.rec.tenant != t => Err(ApiError::not_found(format!("job {id}"))),
        _ => Ok(j),
    }
}

/// Which tenant a listing covers: a tenant sees only itself; the admin may name one.
fn tenant_scope(core: &Core, p: Principal, named: Option<&str>) -> Res<Option<TenantId>> {
    match (p, named) {
        (Principal::Tenant(t), _) => Ok(Some(t)),
        (_, Some(n)) => core.tenant_id(n).map(Some).ok_or_else(|| {
            ApiError::field(
                ErrorCode::NotFound,
                "tenant",
                format!("tenant `{n}` not found"),
            )
        }),
        _ => Ok(None),
    }
}

fn parse_job_id(s: &str) -> Res<JobId> {
    s.parse::<u64>().map(JobId).map_err(|_| {
        ApiError::field(
            ErrorCode::InvalidArgument,
            "id",
            format!("`{s}` is not a job id"),
        )
    })
}

pub fn summary(core: &Core, j: &JobEntry) -> JobSummary {
    JobSummary {
        id: j.rec.id,
        tenant: core.tenant_name(j.rec.tenant),
        name: j.rec.spec.name.clone(),
        state: j.rec.state,
        priority: j.rec.spec.priority,
        tasks: j.rec.spec.tasks,
        tasks_running: j
            .tasks
            .iter()
            .filter(|t| t.state == TaskState::Running)
            .count() as u32,
        tasks_done: j.tasks.iter().filter(|t| t.state.is_terminal()).count() as u32,
        gang: j.rec.spec.gang,
        submitted_ms: j.rec.submitted_ms,
        started_ms: j.rec.started_ms,
        finished_ms: j.rec.finished_ms,
        message: j.rec.message.clone(),
        pending_reasons: core.reasons_of(j).to_vec(),
    }
}

fn node_name(core: &Core, id: NodeId) -> String {
    core.nodes
        .get(&id)
        .map(|n| n.node.name.clone())
        .unwrap_or_else(|| id.to_string())
}

/// Raw bytes (an archive, a log) as the OpenAPI document describes a body of them.
pub struct Binary;

impl utoipa::PartialSchema for Binary {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::{schema::Type, KnownFormat, ObjectBuilder, SchemaFormat};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .into()
    }
}

impl utoipa::ToSchema for Binary {}

// ---- jobs ----

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SubmitQuery {
    /// admin only: submit for this tenant (default `default`)
    tenant: Option<String>,
}

#[utoipa::path(post, path = "/v1/jobs", summary = "submit a job", params(SubmitQuery, ("Idempotency-Key" = Option<String>, Header, description = "1-255 visible ASCII characters; makes the request safe to repeat: a key this tenant used before for the same spec answers the job it made (200, `Idempotent-Replayed: true`)")), request_body = JobSpec, responses((status = 201, description = "accepted", body = SubmitResponse), (status = 200, description = "a replay of an earlier submission with the same Idempotency-Key", body = SubmitResponse)))]
pub async fn submit(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<SubmitQuery>,
    body: Bytes,
) -> Res<Response> {
    let p = user_only(authenticate(&s, &headers)?)?;
    let spec: JobSpec = parse_json(&body)?;
    let mut core = s.core.lock().expect("core lock");
    let tenant = match p {
        Principal::Tenant(t) => {
            if q.tenant
                .as_deref()
                .is_some_and(|n| core.tenant_id(n) != Some(t))
            {
                return Err(ApiError::field(
                    ErrorCode::PermissionDenied,
                    "tenant",
                    "a tenant token may only submit as its own tenant",
                ));
            }
            t
        }
        _ => {
            let name = q.tenant.as_deref().unwrap_or(DEFAULT_TENANT);
            core.tenant_id(name).ok_or_else(|| {
                ApiError::field(
                    ErrorCode::NotFound,
                    "tenant",
                    format!("tenant `{name}` not found"),
                )
            })?
        }
    };
    let key = match headers.get("idempotency-key") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::field(
                        ErrorCode::InvalidArgument,
                        "Idempotency-Key",
                        "must be 1 to 255 visible ASCII characters",
                    )
                })?
                .to_string(),
        ),
        None => None,
    };
    uploaded_workdir(&s, tenant, spec.workdir.as_deref())?;
    let (id, created) = core.submit_idempotent(tenant, spec, key, now_ms())?;
    drop(core);
    if !created {
        // A repeat: the job exists (and may have run); answer as the first time did.
        return Ok((
            StatusCode::OK,
            [("idempotent-replayed", "true")],
            Json(SubmitResponse { id }),
        )
            .into_response());
    }
    s.metrics.jobs_submitted.inc();
    s.sched_wake.notify_one();
    let mut r = (StatusCode::CREATED, Json(SubmitResponse { id })).into_response();
    r.extensions_mut()
        .insert(crate::fault::Points(vec!["submit"]));
    Ok(r)
}

/// The tenant a write acts as: a tenant token acts as itself (naming another is refused);
/// the admin names one, or gets the default tenant.
/// A job or service names a working directory its tenant uploaded: checked (a digest of
/// another tenant's, or one never sent, is refused) and marked used.
fn uploaded_workdir(s: &Shared, tenant: TenantId, workdir: Option<&str>) -> Res<()> {
    let Some(w) = workdir else { return Ok(()) };
    // A malformed one is refused by the spec's own checks, naming the field.
    if crate::workdirs::hex_of(w).is_none() {
        return Ok(());
    }
    if s.workdirs.has(tenant, w).is_none() {
        return Err(ApiError::field(
            ErrorCode::InvalidArgument,
            "workdir",
            format!("`{w}` was not uploaded by this tenant (`caravel submit --workdir DIR` uploads it; PUT /v1/workdirs/{w})"),
        ));
    }
    s.workdirs.touch(tenant, w, now_ms());
    Ok(())
}

fn acting_tenant(core: &Core, p: Principal, named: Option<&str>) -> Res<TenantId> {
    match p {
        Principal::Tenant(t) => {
            if named.is_some_and(|n| core.tenant_id(n) != Some(t)) {
                return Err(ApiError::field(
                    ErrorCode::PermissionDenied,
                    "tenant",
                    "a tenant token may only act as its own tenant",
                ));
            }
            Ok(t)
        }
        _ => {
            let name = named.unwrap_or(DEFAULT_TENANT);
            core.tenant_id(name).ok_or_else(|| {
                ApiError::field(
                    ErrorCode::NotFound,
                    "tenant",
                    format!("tenant `{name}` not found"),
                )
            })
        }
    }
}

// ---- services ----

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TenantQuery {
    /// admin only: act for this tenant
    tenant: Option<String>,
}

fn service_view(
    s: &Shared,
    core: &mut Core,
    key: &(TenantId, String),
    changed: bool,
) -> ServiceView {
    let rec = core.services[key].clone();
    let reps = core.replicas(key.0, &key.1);
    let tenant = core.tenant_name(key.0);
    let gw = s.gateway.services.lock().expect("gateway lock");
    let svc = gw.get(key);
    let mut replicas = Vec::with_capacity(reps.len());
    for r in &reps {
        let live = svc.and_then(|v| v.replicas.get(&r.job));
        let state = match live {
            _ if r.stopping => "draining",
            Some(l) if l.draining => "draining",
            Some(l) if l.ready => "ready",
            _ if r.addr.is_some() => "starting",
            _ => "pending",
        };
        replicas.push(ReplicaView {
            job: r.job,
            version: r.version,
            state: state.to_string(),
            node: r
                .run
                .and_then(|id| core.runs.get(&id))
                .map(|run| node_name(core, run.node)),
            addr: r.addr.clone(),
            zone: r.zone.clone(),
            in_flight: live.map_or(0, |l| {
                l.in_flight.load(std::sync::atomic::Ordering::Relaxed)
            }),
        });
    }
    ServiceView {
        path: format!("/s/{tenant}/{}/", key.1),
        host: s
            .cfg
            .gateway_domains
            .first()
            .and_then(|d| crate::gateway::host_for_service(&tenant, &key.1, d)),
        tenant,
        name: key.1.clone(),
        version: rec.version,
        public: rec.spec.public,
        wanted: svc.map_or(0, |v| v.scaler.replicas),
        ready: replicas.iter().filter(|r| r.state == "ready").count() as u32,
        in_flight: replicas.iter().map(|r| r.in_flight).sum::<u64>()
            + svc.map_or(0, |v| v.held.load(std::sync::atomic::Ordering::Relaxed)),
        replicas,
        spec: rec.spec,
        created_ms: rec.created_ms,
        updated_ms: rec.updated_ms,
        changed,
        rollout: svc.and_then(|v| v.rollout.as_ref()).map(|r| RolloutView {
            version: r.version,
            state: if r.stuck.is_some() {
                "stuck"
            } else {
                "progressing"
            }
            .into(),
            started_ms: r.started_ms,
            progress_ms: r.progress_ms,
            message: r.stuck.clone().unwrap_or_default(),
        }),
        events: svc.map_or_else(Vec::new, |v| {
            v.events
                .iter()
                .map(|(at, m)| ServiceEvent {
                    at_ms: *at,
                    message: m.clone(),
                })
                .collect()
        }),
    }
}

#[utoipa::path(post, path = "/v1/services", summary = "deploy or update a service (docs/services.md)", params(TenantQuery), request_body = ServiceSpec, responses((status = 201, description = "created", body = ServiceView), (status = 200, description = "updated (or unchanged)", body = ServiceView)))]
pub async fn deploy_service(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<TenantQuery>,
    body: Bytes,
) -> Res<Response> {
    let p = user_only(authenticate(&s, &headers)?)?;
    let spec: ServiceSpec = parse_json(&body)?;
    let mut core = s.core.lock().expect("core lock");
    let tenant = acting_tenant(&core, p, q.tenant.as_deref())?;
    let existed = core.services.contains_key(&(tenant, spec.name.clone()));
    uploaded_workdir(&s, tenant, spec.workdir.as_deref())?;
    let (rec, changed) = core.deploy_service(tenant, spec, now_ms())?;
    let view = service_view(&s, &mut core, &(tenant, rec.spec.name.clone()), changed);
    let code = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((code, Json(view)).into_response())
}

#[utoipa::path(get, path = "/v1/services", summary = "services (a tenant sees its own)", params(TenantQuery), responses((status = 200, description = "services", body = Vec<ServiceView>)))]
pub async fn list_services(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<TenantQuery>,
) -> Res<Json<Vec<ServiceView>>> {
    let p = user_only(authenticate(&s, &headers)?)?;
    let mut core = s.core.lock().expect("core lock");
    let scope = tenant_scope(&core, p, q.tenant.as_deref())?;
    let keys: Vec<(TenantId, String)> = core
        .services
        .keys()
        .filter(|k| scope.is_none_or(|t| k.0 == t))
        .cloned()
        .collect();
    Ok(Json(
        keys.iter()
            .map(|k| service_view(&s, &mut core, k, false))
            .collect(),
    ))
}

fn service_key(
    core: &Core,
    p: Principal,
    tenant: Option<&str>,
    name: &str,
) -> Res<(TenantId, String)> {
    let t = acting_tenant(core, p, tenant)?;
    let key = (t, name.to_string());
    if !core.services.contains_key(&key) {
        return Err(ApiError::not_found(format!("service {name}")));
    }
    Ok(key)
}

#[utoipa::path(get, path = "/v1/services/{name}", summary = "a service with its replicas, rollout and events", params(("name" = String, Path, description = "the service"), TenantQuery), responses((status = 200, description = "the service", body = ServiceView)))]
pub async fn get_service(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Res<Json<ServiceView>> {
    let p = user_only(authenticate(&s, &headers)?)?;
    let mut core = s.core.lock().expect("core lock");
    let key = service_key(&core, p, q.tenant.as_deref(), &name)?;
    Ok(Json(service_view(&s, &mut core, &key, false)))
}

#[utoipa::path(delete, path = "/v1/services/{name}", summary = "delete a service and stop its replicas", params(("name" = String, Path, description = "the service"), TenantQuery), responses((status = 204, description = "deleted")))]
pub async fn delete_service(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Res<StatusCode> {
    let p = user_only(authenticate(&s, &headers)?)?;
    let mut core = s.core.lock().expect("core lock");
    let key = service_key(&core, p, q.tenant.as_deref(), &name)?;
    core.delete_service(key.0, &key.1, now_ms())?;
    let tenant = core.tenant_name(key.0);
    drop(core);
    s.gateway.forget(&tenant, &key);
    s.sched_wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// comma list of states (pending, running, succeeded, failed, cancelled), or `active`
    state: Option<String>,
    /// admin only: this tenant's jobs
    tenant: Option<String>,
    /// newest N (default 1000)
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/jobs", summary = "list jobs, newest first (a tenant sees its own)", params(ListQuery), responses((status = 200, description = "jobs", body = Vec<JobSummary>)))]
pub async fn list_jobs(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Res<Json<Vec<JobSummary>>> {
    let p = user_only(authenticate(&s, &headers)?)?;
    let states: Option<BTreeSet<String>> = match &q.state {
        None => None,
        Some(v) => {
            let set: BTreeSet<String> = v.split(',').map(|x| x.trim().to_string()).collect();
            for st in &set {
                if ![
                    "pending",
                    "running",
                    "succeeded",
                    "failed",
                    "cancelled",
                    "active",
                ]
                .contains(&st.as_str())
                {
                    return Err(ApiError::field(
                        ErrorCode::InvalidArgument,
                        "state",
                        format!("`{st}` is not a job state (pending, running, succeeded, failed, cancelled, active)"),
                    ));
                }
            }
            Some(set)
        }
    };
    let limit = q.limit.unwrap_or(1000);
    if limit == 0 || limit > 100_000 {
        return Err(ApiError::field(
            ErrorCode::InvalidArgument,
            "limit",
            "must be 1 to 100000",
        ));
    }
    let core = s.core.lock().expect("core lock");
    let tenant_filter = tenant_scope(&core, p, q.tenant.as_deref())?;
    let mut out: Vec<JobSummary> = core
        .jobs
        .values()
        .rev()
        .filter(|j| tenant_filter.is_none_or(|t| j.rec.tenant == t))
        .filter(|j| {
            states.as_ref().is_none_or(|set| {
                set.contains(j.rec.state.as_str())
                    || (set.contains("active") && !j.rec.state.is_terminal())
            })
        })
        .take(limit)
        .map(|j| summary(&core, j))
        .collect();
    out.reverse();
    Ok(Json(out))
}

/// A job's runs (ended ones live only in the store), consistent with memory, and the core
/// lock they are consistent under. The store is read without the lock, since the read
/// waits for queued commits. A run that ended after the read is then missing from memory
/// while the store's copy still has it running: read again. After a few tries (a job
/// whose runs keep ending), read under the lock.
async fn job_runs(
    s: &Shared,
    p: Principal,
    id: JobId,
) -> Res<(std::sync::MutexGuard<'_, Core>, Vec<RunRecord>)> {
    for _ in 0..3 {
        let reader = {
            let core = s.core.lock().expect("core lock");
            visible(&core, p, id)?;
            core.reader()
        };
        let runs = reader.read(move |st| st.runs_of_job(id)).await?;
        let core = s.core.lock().expect("core lock");
        visible(&core, p, id)?;
        if runs
            .iter()
            .all(|r| r.state.is_terminal() || core.runs.contains_key(&r.id))
        {
            let runs = merge_runs(&core, id, runs);
            return Ok((core, runs));
        }
    }
    let core = s.core.lock().expect("core lock");
    visible(&core, p, id)?;
    let runs = core.read(move |st| st.runs_of_job(id))?;
    let runs = merge_runs(&core, id, runs);
    Ok((core, runs))
}

/// The store's runs of `job` with memory's fresher copy of those still active, plus any
/// placed since the read, by id.
fn merge_runs(core: &Core, job: JobId, runs: Vec<RunRecord>) -> Vec<RunRecord> {
    let mut out: Vec<RunRecord> = runs
        .into_iter()
        .map(|r| core.runs.get(&r.id).cloned().unwrap_or(r))
        .collect();
    let known: std::collections::HashSet<RunId> = out.iter().map(|r| r.id).collect();
    out.extend(
        core.runs
            .values()
            .filter(|r| r.job == job && !known.contains(&r.id))
            .cloned(),
    );
    out.sort_by_key(|r| r.id);
    out
}

#[utoipa::path(get, path = "/v1/jobs/{id}", summary = "a job with its tasks, runs and pending reasons", params(("id" = u64, Path, description = "the job")), responses((status = 200, description = "the job", body = JobDetail)))]
pub async fn get_job(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Res<Json<JobDetail>> {
    let p = user_only(authenticate(&s, &headers)?)?;
    let id = parse_job_id(&id)?;
    let (core, runs) = job_runs(&s, p, id).await?;
    let j = visible(&core, p, id)?;
    let runs: Vec<RunView> = runs
        .into_iter()
        .map(|r| RunView {
            id: r.id,
            index: r.index,
            attempt: r.attempt,
            node: node_name(&core, r.node),
            devices: r.devices,
            state: r.state,
            assigned_ms: r.assigned_ms,
            started_ms: r.started_ms,
            ended_ms: r.ended_ms,
            exit_code: r.exit_code,
            signal: r.signal,
            message: r.message,
            checkpoint: r.checkpoint,
        })
        .collect();
    let task_list = j
        .tasks
        .iter()
        .map(|t| TaskView {
            index: t.index,
            state: t.state,
            attempts: t.attempts,
            retries_used: t.retries_used,
            exit_code: t.exit_code,
            run: t.current_run,
            node: t
                .current_run
                .and_then(|r| runs.iter().find(|x| x.id == r))
                .map(|r| r.node.clone()),
        })
        .collect();
    Ok(Json(JobDetail {
        summary: summary(&core, j),
        spec: j.rec.spec.redacted(),
        task_list,
        runs,
    }))
}

#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", summary = "cancel a job: SIGTERM, then SIGKILL after its grace period", params(("id" = u64, Path, description = "the job")), responses((status = 200, description = "the job as cancelled", body = JobSummary)))]
pub async fn cancel_job(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Res<Response> {
    let p = user_only(authenticate(&s, &headers)?)?;
    let id = parse_job_id(&id)?;
    let mut core = s.core.lock().expect("core lock");
    visible(&core, p, id)?;
    core.cancel(id, now_ms())?;
    let j = visible(&core, p, id)?;
    let out = summary(&core, j);
    drop(core);
    s.sched_wake.notify_one();
    let mut r = Json(out).into_response();
    r.extensions_mut()
        .insert(crate::fault::Points(vec!["cancel"]));
    Ok(r)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// task index (default 0)
    task: Option<u32>,
    /// `stdout` (default) or `stderr`
    stream: Option<String>,
    /// byte offset to start from (default 0)
    offset: Option<u64>,
    /// one run (attempt) of the task (default: the newest)
    run: Option<u64>,
}

#[utoipa::path(get, path = "/v1/jobs/{id}/logs", summary = "a task's stdout or stderr from byte `offset`", params(("id" = u64, Path, description = "the job"), LogQuery), responses((status = 200, description = "the bytes; headers x-caravel-next-offset and x-caravel-done", body = Binary, content_type = "application/octet-stream")))]
pub async fn job_logs(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Res<Response> {
    let p = user_only(authenticate(&s, &headers)?)?;
    let id = parse_job_id(&id)?;
    let stream = q.stream.unwrap_or_else(|| "stdout".into());
    if stream != "stdout" && stream != "stderr" {
        return Err(ApiError::field(
            ErrorCode::InvalidArgument,
            "stream",
            "must be stdout or stderr",
        ));
    }
    let task = q.task.unwrap_or(0);
    let (agent, run, done, terminal) = {
        let (core, runs) = job_runs(&s, p, id).await?;
        let j = visible(&core, p, id)?;
        let ntasks = j.rec.spec.tasks;
        if task >= ntasks {
            return Err(ApiError::field(
                ErrorCode::InvalidArgument,
                "task",
                format!("job {id} has tasks 0 to {}", j.rec.spec.tasks - 1),
            ));
        }
        let current = j.tasks[task as usize].current_run;
        let run = match q.run {
            Some(r) => runs
                .iter()
                .find(|x| x.id.0 == r && x.index == task)
                .cloned()
                .ok_or_else(|| {
                    ApiError::field(
                        ErrorCode::NotFound,
                        "run",
                        format!("run {r} of task {task} not found"),
                    )
                })?,
            None => match current.and_then(|c| runs.iter().find(|x| x.id == c)) {
                Some(r) => r.clone(),
                None => match runs.iter().rev().find(|x| x.index == task) {
                    Some(r) => r.clone(),
                    None => {
                        // Not started yet: empty log, not an error, so `--follow` can wait.
                        let mut resp = Response::new(axum::body::Body::empty());
                        resp.headers_mut()
                            .insert("x-caravel-next-offset", HeaderValue::from(0u64));
                        resp.headers_mut().insert(
                            "x-caravel-done",
                            HeaderValue::from_static(if j.rec.state.is_terminal() {
                                "1"
                            } else {
                                "0"
                            }),
                        );
                        return Ok(resp);
                    }
                },
            },
        };
        let run = core.runs.get(&run.id).cloned().unwrap_or(run);
        let agent = core.nodes.get(&run.node).map(|node| {
            (
                node.node.agent_url.clone(),
                node.node.agent_secret.clone(),
                node.node.agent_cert_sha256.clone(),
            )
        });
        let done = run.state.is_terminal() && j.tasks[task as usize].state != TaskState::Pending
            || j.rec.state.is_terminal();
        (agent, run.id, done, run.state.is_terminal())
    };
    let stream = crate::logs::Stream::parse(&stream).expect("checked above");
    let offset = q.offset.unwrap_or(0);
    let kept = {
        let s = s.clone();
        tokio::task::spawn_blocking(move || s.logs.read(id, run, stream, offset, LOG_CHUNK))
            .await
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?
    };
    // Output the agent finished shipping is served from here: its node may be gone, and
    // the node's copy is removed once shipped.
    if let Some(k) = kept.as_ref().filter(|k| k.done) {
        return Ok(log_answer(
            k.data.clone(),
            k.from,
            Some(k.end),
            run,
            done,
            "server",
        ));
    }
    let from_node = match agent {
        Some((url, secret, pin)) => {
            node_log(&s, &url, &secret, pin, run, stream.as_str(), offset).await
        }
        None => Err(ApiError::new(
            ErrorCode::Unavailable,
            "the task's node is gone",
        )),
    };
    match (from_node, kept) {
        (Ok(Some((body, next, end))), _) => {
            // The agent clamps an offset past the end of its file to the end.
            let from = next.map_or(offset, |n| n.saturating_sub(body.len() as u64));
            Ok(log_answer(body.to_vec(), from, end, run, done, "node"))
        }
        // What was shipped before the node went out of reach or removed its copy.
        (_, Some(k)) => Ok(log_answer(
            k.data,
            k.from,
            Some(k.end),
            run,
            done || terminal,
            "server",
        )),
        // The node has no folder for a run that has not started yet.
        (Ok(None), None) if !terminal => Ok(log_answer(
            Vec::new(),
            0,
            Some(0),
            run,
            done,
            "node",
        )),
        (Ok(None), None) => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("the output of run {run} is no longer kept: its node removed it and none was shipped to the server (shipped output is kept for the server's --log-retention after the job ends)"),
        )),
        (Err(e), None) => Err(e),
    }
}

/// The most bytes one log answer carries (agents read the same amount).
const LOG_CHUNK: u64 = 1 << 20;

/// A log answer: `data` starts at byte `from`; `end` is the stream's length where known.
fn log_answer(
    data: Vec<u8>,
    from: u64,
    end: Option<u64>,
    run: RunId,
    done: bool,
    source: &'static str,
) -> Response {
    let next = from + data.len() as u64;
    let mut out = Response::new(axum::body::Body::from(data));
    let h = out.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert("x-caravel-next-offset", HeaderValue::from(next));
    // Later than the offset asked for when the start of the output was dropped.
    h.insert("x-caravel-log-from", HeaderValue::from(from));
    h.insert("x-caravel-log-source", HeaderValue::from_static(source));
    if let Some(e) = end {
        // Where the stream ends now (`caravel logs --tail` reads back from it).
        h.insert("x-caravel-log-end", HeaderValue::from(e));
    }
    h.insert("x-caravel-run", HeaderValue::from(run.0));
    h.insert(
        "x-caravel-done",
        HeaderValue::from_static(if done { "1" } else { "0" }),
    );
    out
}

/// A chunk of a run's output from its node's agent: `None` when the agent has no folder
/// for the run (not started yet, or removed).
async fn node_log(
    s: &Shared,
    url: &str,
    secret: &str,
    pin: Option<String>,
    run: RunId,
    stream: &str,
    offset: u64,
) -> Res<Option<(Bytes, Option<u64>, Option<u64>)>> {
    // An https agent is called with its registered certificate pinned; a client per call
    // (log reads are rare and interactive) keeps one agent's pin off the others.
    let http = match pin {
        Some(pin) => {
            let tls = caravel_tls::pinned_client_config(&pin).map_err(|e| {
                ApiError::new(ErrorCode::Internal, format!("agent TLS settings: {e}"))
            })?;
            reqwest::Client::builder()
                .tls_backend_preconfigured(tls)
                .connect_timeout(Duration::from_secs(3))
                .build()
                .map_err(|e| ApiError::new(ErrorCode::Internal, format!("agent client: {e}")))?
        }
        None => s.http.clone(),
    };
    let resp = http
        .get(format!("{url}/runs/{run}/{stream}?offset={offset}"))
        .bearer_auth(secret)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| {
            ApiError::new(
                ErrorCode::Unavailable,
                format!("cannot reach the node's agent: {e}"),
            )
        })?;
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !resp.status().is_success() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            format!("the node's agent answered {} for run {run}", resp.status()),
        ));
    }
    let num = |k: &str| {
        resp.headers()
            .get(k)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    };
    let (next, end) = (num("x-caravel-next-offset"), num("x-caravel-log-end"));
    let body = resp
        .bytes()
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unavailable, format!("reading logs: {e}")))?;
    Ok(Some((body, next, end)))
}

// ---- nodes, tenants, usage ----

#[utoipa::path(get, path = "/v1/nodes", summary = "nodes with their capacity (a tenant sees what it can use, not what others run)", responses((status = 200, description = "nodes", body = Vec<NodeView>)))]
pub async fn list_nodes(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Res<Json<Vec<NodeView>>> {
    let p = user_only(authenticate(&s, &headers)?)?;
    let core = s.core.lock().expect("core lock");
    // A tenant sees what it runs on each node, never what other tenants run there.
    let own = |e: &crate::core::NodeEntry, t: TenantId| {
        let mut a = crate::core::NodeAlloc::default();
        for r in e.alloc.runs.iter().filter_map(|r| core.runs.get(r)) {
            if r.tenant != t {
                continue;
            }
            let res = &core.jobs[&r.job].rec.spec.resources;
            a.cpu_milli += res.cpu_milli;
            a.memory_bytes += res.memory_bytes;
            match res.gpu.as_ref().and_then(|g| g.milli) {
                Some(m) => {
                    for d in &r.devices {
                        *a.shared.entry(*d).or_default() += m;
                    }
                }
                None => a.devices.extend(r.devices.iter().copied()),
            }
            a.runs.insert(r.id);
        }
        a
    };
    Ok(Json(
        core.nodes
            .values()
            .map(|e| {
                (
                    e,
                    if let Principal::Tenant(t) = p {
                        own(e, t)
                    } else {
                        e.alloc.clone()
                    },
                )
            })
            .map(|(e, alloc)| NodeView {
                id: e.node.id,
                name: e.node.name.clone(),
                state: e.node.state,
                address: e.node.address.clone(),
                topology: e.node.topology.clone(),
                labels: e.node.labels.clone(),
                capacity: e.node.capacity.clone(),
                allocated_cpu_milli: alloc.cpu_milli,
                allocated_memory_bytes: alloc.memory_bytes,
                allocated_devices: alloc.devices.iter().copied().collect(),
                shared_devices: alloc.shared.clone(),
                running_tasks: alloc.runs.len() as u32,
                last_seen_ms: e.node.last_seen_ms,
                drained: e.node.drained,
                isolation_missing: e.node.isolation_missing.clone(),
            })
            .collect(),
    ))
}

#[utoipa::path(post, path = "/v1/nodes/{name}/drain", summary = "admin: start nothing new on the node; running work finishes", params(("name" = String, Path, description = "the node")), responses((status = 204, description = "drained")))]
/// `POST /v1/nodes/{name}/drain` and `/undrain` (admin): stop or resume placing work on a
/// node. Running batch tasks finish where they are (Slurm's DRAIN); service replicas are
/// replaced elsewhere, each leaving only once its replacement is ready.
pub async fn drain_node(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Res<StatusCode> {
    require_admin(authenticate(&s, &headers)?)?;
    s.core.lock().expect("core lock").set_drained(&name, true)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/nodes/{name}/undrain", summary = "admin: the node takes work again", params(("name" = String, Path, description = "the node")), responses((status = 204, description = "undrained")))]
pub async fn undrain_node(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Res<StatusCode> {
    require_admin(authenticate(&s, &headers)?)?;
    s.core
        .lock()
        .expect("core lock")
        .set_drained(&name, false)?;
    s.sched_wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

fn tenant_view(s: &Shared, t: &Tenant) -> TenantView {
    TenantView {
        storage_used_bytes: s
            .storage_used
            .lock()
            .expect("lock")
            .get(&t.id)
            .copied()
            .unwrap_or(0),
        id: t.id,
        name: t.name.clone(),
        weight: t.weight,
        quota: t.quota.clone(),
        guarantee: t.guarantee.clone(),
        created_ms: t.created_ms,
    }
}

#[utoipa::path(post, path = "/v1/tenants", summary = "admin: create a tenant; its token is returned once", request_body = CreateTenantRequest, responses((status = 201, description = "created", body = CreateTenantResponse)))]
pub async fn create_tenant(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Res<Response> {
    require_admin(authenticate(&s, &headers)?)?;
    let req: CreateTenantRequest = parse_json(&body)?;
    let mut core = s.core.lock().expect("core lock");
    let (t, token) =
        core.create_tenant(&req.name, req.weight, req.quota, req.guarantee, now_ms())?;
    Ok((
        StatusCode::CREATED,
        Json(CreateTenantResponse {
            tenant: tenant_view(&s, &t),
            token,
        }),
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/tenants", summary = "tenants (a tenant sees itself)", responses((status = 200, description = "tenants", body = Vec<TenantView>)))]
pub async fn list_tenants(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Res<Json<Vec<TenantView>>> {
    let p = user_only(authenticate(&s, &headers)?)?;
    let core = s.core.lock().expect("core lock");
    Ok(Json(
        core.tenants
            .values()
            .filter(|t| match p {
                Principal::Tenant(me) => t.id == me,
                _ => true,
            })
            .map(|t| tenant_view(&s, t))
            .collect(),
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// admin only: this tenant
    tenant: Option<String>,
    /// one job
    job: Option<u64>,
}

#[utoipa::path(get, path = "/v1/usage", summary = "metered usage totals per tenant and per job", params(UsageQuery), responses((status = 200, description = "totals", body = UsageResponse)))]
pub async fn usage(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<UsageQuery>,
) -> Res<Json<UsageResponse>> {
    let p = user_only(authenticate(&s, &headers)?)?;
    let (tenant, reader) = {
        let core = s.core.lock().expect("core lock");
        let tenant = tenant_scope(&core, p, q.tenant.as_deref())?;
        if let Some(j) = q.job {
            visible(&core, p, JobId(j))?;
        }
        (tenant, core.reader())
    };
    let filter = caravel_store::UsageFilter {
        tenant,
        job: q.job.map(JobId),
    };
    // Read without the core lock: usage may be long, and the read waits for queued commits.
    let recs = reader.read(move |st| st.usage(&filter)).await?;
    let core = s.core.lock().expect("core lock");
    let mut by_tenant: std::collections::BTreeMap<TenantId, UsageTotals> = Default::default();
    let mut by_job: std::collections::BTreeMap<JobId, UsageTotals> = Default::default();
    for u in &recs {
        for t in [
            by_tenant.entry(u.tenant).or_insert_with(|| UsageTotals {
                tenant: core.tenant_name(u.tenant),
                ..Default::default()
            }),
            by_job.entry(u.job).or_insert_with(|| UsageTotals {
                tenant: core.tenant_name(u.tenant),
                job: Some(u.job),
                ..Default::default()
            }),
        ] {
            t.runs += 1;
            t.wall_ms += u.duration_ms();
            *t.wall_ms_by_priority
                .entry(u.priority.as_str().to_string())
                .or_insert(0) += u.duration_ms();
            t.cpu_milli_ms += u.cpu_milli_ms();
            t.memory_byte_ms += u.memory_byte_ms();
            if let Some(m) = &u.gpu_model {
                *t.gpu_ms.entry(m.clone()).or_insert(0) += u.gpu_ms();
            }
        }
    }
    Ok(Json(UsageResponse {
        by_tenant: by_tenant.into_values().collect(),
        by_job: by_job.into_values().collect(),
    }))
}

#[utoipa::path(get, path = "/v1/whoami", summary = "the caller's role (`admin`, `agent`, or `tenant` with its name)", responses((status = 200, description = "the role", body = WhoAmI)))]
pub async fn whoami(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Res<Json<WhoAmI>> {
    let p = authenticate(&s, &headers)?;
    let core = s.core.lock().expect("core lock");
    let (role, tenant) = match p {
        Principal::Admin => (Role::Admin, None),
        Principal::Agent => (Role::Agent, None),
        Principal::Tenant(t) => (Role::Tenant, Some(core.tenant_name(t))),
    };
    Ok(Json(WhoAmI { role, tenant }))
}

// ---- agent protocol ----

#[utoipa::path(post, path = "/v1/agent/register", summary = "agent: register a node", request_body = RegisterRequest, responses((status = 200, description = "registered", body = RegisterResponse)))]
pub async fn agent_register(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Res<Json<RegisterResponse>> {
    require_agent(authenticate(&s, &headers)?)?;
    let req: RegisterRequest = parse_json(&body)?;
    let name = req.name.clone();
    let id = s.core.lock().expect("core lock").register(req, now_ms())?;
    tracing::info!(node = %name, id = %id, "node registered");
    s.sched_wake.notify_one();
    Ok(Json(RegisterResponse {
        node_id: id,
        heartbeat_ms: s.cfg.heartbeat_ms,
        lost_after_ms: s.cfg.lost_after_ms,
    }))
}

#[utoipa::path(post, path = "/v1/agent/sync", summary = "agent: heartbeat and long poll for the node's desired runs", request_body = SyncRequest, responses((status = 200, description = "the desired state", body = SyncResponse)))]
pub async fn agent_sync(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Res<Json<SyncResponse>> {
    require_agent(authenticate(&s, &headers)?)?;
    let req: SyncRequest = parse_json(&body)?;
    let known: BTreeSet<RunId> = req.running.iter().copied().collect();
    let mut rx = {
        let mut core = s.core.lock().expect("core lock");
        core.heartbeat(req.node_id, &req.instance, now_ms())?;
        core.set_free_ports(req.node_id, req.free_ports.clone());
        gang_answers(&s, &core, req.node_id, &req.still);
        let (version, desired, assignments) = core.desired(req.node_id, &known);
        let confirm = gang_questions(&s, &core, &known);
        if version != req.known_version || req.wait_ms == 0 {
            drop(core);
            return Ok(Json(SyncResponse {
                version,
                desired,
                assignments: with_checkpoints(&s, assignments),
                confirm,
            }));
        }
        core.nodes[&req.node_id].version.subscribe()
    };
    // Hold the request until this node's desired runs change, or the wait runs out (which
    // also paces heartbeats).
    let wait = Duration::from_millis(req.wait_ms.min(s.cfg.heartbeat_ms.max(100)));
    let _ = tokio::time::timeout(wait, rx.changed()).await;
    let mut core = s.core.lock().expect("core lock");
    core.heartbeat(req.node_id, &req.instance, now_ms())?;
    let (version, desired, assignments) = core.desired(req.node_id, &known);
    let confirm = gang_questions(&s, &core, &known);
    drop(core);
    Ok(Json(SyncResponse {
        version,
        desired,
        assignments: with_checkpoints(&s, assignments),
        confirm,
    }))
}

/// Records an agent's answers to the gang checkpoint protocol's questions, and commits
/// the cuts they complete.
fn gang_answers(s: &Shared, core: &Core, node: NodeId, still: &[CheckpointStill]) {
    let mut jobs = BTreeSet::new();
    for a in still {
        let Some(r) = core.runs.get(&a.run).filter(|r| r.node == node) else {
            continue;
        };
        if is_current_run(core, r.job, r.index, a.run)
            && s.checkpoints
                .answer(r.job, r.index, a.run, a.round, a.version)
        {
            jobs.insert(r.job);
        }
    }
    for job in jobs {
        try_cut(s, core, job);
    }
}

/// Commits a new cut of the gang's checkpoint if what the server knows allows one.
fn try_cut(s: &Shared, core: &Core, job: JobId) {
    let Some(ranks) = core.gang_ranks(job) else {
        return;
    };
    match s.checkpoints.try_cut(job, &ranks) {
        Ok(Some(c)) => {
            tracing::info!(job = %job, cut = c.id, parts = ?c.parts.iter().map(|(i, p)| (*i, p.version)).collect::<Vec<_>>(), "gang checkpoint cut committed")
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(job = %job, "cannot commit the gang's checkpoint cut: {e}"),
    }
}

/// The open rounds of the gang checkpoint protocol that runs on this node have not
/// answered.
fn gang_questions(s: &Shared, core: &Core, running: &BTreeSet<RunId>) -> Vec<CheckpointConfirm> {
    let mut out = Vec::new();
    for run in running {
        // Most runs are not in a gang: they cost no checkpoint lock.
        let Some(r) = core.runs.get(run).filter(|r| core.is_gang_of_many(r.job)) else {
            continue;
        };
        if let Some(round) = s.checkpoints.question(r.job, r.index, *run) {
            out.push(CheckpointConfirm { run: *run, round });
        }
    }
    out
}

/// Tells the agent which runs have a checkpoint to fetch before they start.
fn with_checkpoints(s: &Shared, mut assignments: Vec<Assignment>) -> Vec<Assignment> {
    for a in &mut assignments {
        if a.gang_cut.is_some() {
            let cut = s.checkpoints.gang_cut(a.job);
            a.checkpoint = (cut.cut > 0).then_some(cut.cut);
            a.gang_cut = Some(cut);
        } else {
            a.checkpoint = s.checkpoints.latest(a.job, a.index).map(|c| c.version);
        }
    }
    assignments
}

#[utoipa::path(post, path = "/v1/agent/shutdown", summary = "agent: leaving cleanly; stop and requeue the node's runs", request_body = ShutdownRequest, responses((status = 200, description = "stopping", body = ShutdownResponse)))]
/// `POST /v1/agent/shutdown` (agent token): the agent is leaving cleanly.
pub async fn agent_shutdown(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Res<Json<ShutdownResponse>> {
    require_agent(authenticate(&s, &headers)?)?;
    let req: ShutdownRequest = parse_json(&body)?;
    let stopping =
        s.core
            .lock()
            .expect("core lock")
            .shutdown_node(req.node_id, &req.instance, now_ms())?;
    // Its requeued work may fit elsewhere now.
    s.sched_wake.notify_one();
    Ok(Json(ShutdownResponse { stopping }))
}

#[utoipa::path(post, path = "/v1/agent/events", summary = "agent: report runs started and exited (idempotent)", request_body = EventsRequest, responses((status = 204, description = "applied")))]
pub async fn agent_events(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Res<Response> {
    require_agent(authenticate(&s, &headers)?)?;
    let req: EventsRequest = parse_json(&body)?;
    let mut points = crate::fault::Points::default();
    if req
        .events
        .iter()
        .any(|e| matches!(e, RunEvent::Started { .. }))
    {
        points.0.push("start");
    }
    if req
        .events
        .iter()
        .any(|e| matches!(e, RunEvent::Exited { .. }))
    {
        points.0.push("exit");
    }
    {
        let mut core = s.core.lock().expect("core lock");
        if !core.nodes.contains_key(&req.node_id) {
            return Err(ApiError::not_found(format!("node {}", req.node_id)));
        }
        core.begin_group();
        let mut res = Ok(());
        for ev in req.events {
            // A gang rank's end is known to the checkpoint protocol before the gang can
            // restart (settled by `apply_event`), so the restart restores the newest cut.
            if let RunEvent::Exited {
                run, checkpoint, ..
            } = &ev
            {
                if let Some(r) = core.runs.get(run).filter(|r| {
                    r.node == req.node_id && is_current_run(&core, r.job, r.index, *run)
                }) {
                    if core.is_gang_of_many(r.job) {
                        s.checkpoints
                            .record_end(r.job, r.index, *run, r.attempt, *checkpoint);
                        let job = r.job;
                        try_cut(&s, &core, job);
                    }
                }
            }
            res = core.apply_event(req.node_id, ev, now_ms());
            if res.is_err() {
                break;
            }
        }
        let flushed = core.end_group();
        res?;
        flushed?;
    }
    s.sched_wake.notify_one();
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.extensions_mut().insert(points);
    Ok(r)
}

#[utoipa::path(post, path = "/v1/agent/logs", summary = "agent: ship runs' stdout and stderr by offset (a resend is taken once)", request_body = LogShipRequest, responses((status = 200, description = "per entry: taken, a gap, unknown or over quota", body = LogShipResponse)))]
/// Output shipped by an agent: appended to what the server keeps of each run's stream.
/// Entries are answered one by one (a gap or an unknown run does not fail the batch); a
/// malformed entry fails the whole batch, naming it, and nothing of it is kept.
pub async fn agent_logs(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Res<Json<LogShipResponse>> {
    use base64::Engine;
    require_agent(authenticate(&s, &headers)?)?;
    let req: LogShipRequest = parse_json(&body)?;
    let mut entries = Vec::with_capacity(req.entries.len());
    for (i, e) in req.entries.into_iter().enumerate() {
        let stream = crate::logs::Stream::parse(&e.stream).ok_or_else(|| {
            ApiError::field(
                ErrorCode::InvalidArgument,
                format!("entries[{i}].stream"),
                "must be stdout or stderr",
            )
        })?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(e.data.as_bytes())
            .map_err(|err| {
                ApiError::field(
                    ErrorCode::InvalidArgument,
                    format!("entries[{i}].data"),
                    format!("not base64: {err}"),
                )
            })?;
        if e.offset.checked_add(data.len() as u64).is_none() {
            return Err(ApiError::field(
                ErrorCode::InvalidArgument,
                format!("entries[{i}].offset"),
                "offset plus length overflows",
            ));
        }
        entries.push((e, stream, data));
    }
    // Which (job, run) pairs are real: runs held in memory, streams already kept (checked
    // when first shipped), and the store for the rest (runs that ended).
    let (mut known, reader, ask, (capped, mut room)) = {
        let core = s.core.lock().expect("core lock");
        let mut known = std::collections::HashMap::new();
        let mut ask = BTreeSet::new();
        // The tenant of each job whose tenant has a storage cap, and what it may still
        // store.
        let mut capped = std::collections::HashMap::new();
        let mut room = std::collections::HashMap::new();
        for (e, _, _) in &entries {
            if let Some(j) = core.jobs.get(&e.job) {
                if let Some((used, limit)) = crate::storage_left(&s, &core, j.rec.tenant) {
                    capped.insert(e.job, j.rec.tenant);
                    room.insert(j.rec.tenant, limit.saturating_sub(used));
                }
            }
            let newest = core
                .jobs
                .get(&e.job)
                .and_then(|j| j.tasks.get(e.index as usize))
                .is_some_and(|t| t.current_run == Some(e.run));
            if let Some(r) = core.runs.get(&e.run) {
                known.insert(e.run, r.job);
            } else if newest || s.logs.knows(e.job, e.run) {
                known.insert(e.run, e.job);
            } else {
                ask.insert(e.run);
            }
        }
        (known, core.reader(), ask, (capped, room))
    };
    if !ask.is_empty() {
        let found = reader
            .read(move |st| {
                let mut v = Vec::new();
                for r in ask {
                    if let Some(rec) = st.run(r)? {
                        v.push((r, rec.job));
                    }
                }
                Ok(v)
            })
            .await?;
        known.extend(found);
    }
    let s2 = s.clone();
    let results = tokio::task::spawn_blocking(move || -> Result<Vec<LogShipResult>, String> {
        let mut out = Vec::with_capacity(entries.len());
        for (e, stream, data) in entries {
            if known.get(&e.run) != Some(&e.job) {
                out.push(LogShipResult {
                    state: "unknown".into(),
                    end: 0,
                    done: false,
                });
                continue;
            }
            // A tenant at its storage quota keeps what it has; new output stays on the
            // node. A finishing mark with no new bytes still goes in.
            let tenant = capped.get(&e.job).copied();
            let left = tenant.and_then(|t| room.get(&t).copied());
            if left.is_some_and(|left| left < data.len() as u64 || (left == 0 && !e.done)) {
                out.push(LogShipResult {
                    state: "full".into(),
                    end: 0,
                    done: false,
                });
                continue;
            }
            match s2
                .logs
                .append((e.job, e.run, stream), e.offset, &data, e.skip, e.done)
            {
                Ok(a) => {
                    s2.metrics.log_bytes_shipped.inc_by(a.taken);
                    if let Some(t) = tenant {
                        if let Some(left) = room.get_mut(&t) {
                            *left = left.saturating_sub(a.taken);
                        }
                        *s2.storage_used.lock().expect("lock").entry(t).or_default() += a.taken;
                    }
                    out.push(LogShipResult {
                        state: "ok".into(),
                        end: a.end,
                        done: a.done,
                    });
                }
                Err(crate::logs::LogError::Gap { end, .. }) => out.push(LogShipResult {
                    state: "gap".into(),
                    end,
                    done: false,
                }),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?
    .map_err(|e| ApiError::new(ErrorCode::Internal, e))?;
    Ok(Json(LogShipResponse {
        limit: s.logs.max_bytes,
        results,
    }))
}

#[utoipa::path(get, path = "/metrics", summary = "Prometheus metrics (admin token)", responses((status = 200, description = "OpenMetrics text", body = String, content_type = "application/openmetrics-text")))]
/// `GET /metrics` (admin token): tenants' and services' names are in the labels, so
/// scraping needs the admin token, as the Kubernetes API server's and Nomad's need theirs.
pub async fn metrics(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(e) = authenticate(&s, &headers).and_then(require_admin) {
        return e.into_response();
    }
    crate::refresh_gauges(&s);
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/v1/openapi.json", summary = "this document", security(()), responses((status = 200, description = "OpenAPI 3.1", body = Object)))]
pub async fn openapi() -> Json<serde_json::Value> {
    // Built once: it is the route table's, which does not change while the server runs.
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    Json(DOC.get_or_init(crate::openapi::document).clone())
}

#[utoipa::path(get, path = "/healthz", summary = "whether this server serves now (503 while it may not own its store)", security(()), responses((status = 200, description = "serving", body = String, content_type = "text/plain")))]
pub async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(get, path = "/v1/tls/ca.pem", summary = "the pool CA of a server started with --tls-self-signed (agents joining with --ca-sha256 check it by its SHA-256)", security(()), responses((status = 200, description = "PEM", body = String, content_type = "application/x-pem-file")))]
/// The pool CA, to anyone: it is public, and a joining agent checks it against the
/// fingerprint it was given before trusting it.
pub async fn ca_pem(State(s): State<Arc<Shared>>) -> Res<Response> {
    match &s.ca_pem {
        Some(pem) => {
            let mut r = Response::new(axum::body::Body::from(pem.clone()));
            r.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("application/x-pem-file"),
            );
            Ok(r)
        }
        None => Err(ApiError::new(
            ErrorCode::NotFound,
            "this server has no pool CA: it serves an operator's certificate (--tls-cert) or plain HTTP",
        )),
    }
}

pub async fn fallback() -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        "no such endpoint; see /v1/openapi.json",
    )
}

// ---- checkpoints ----

fn parse_task_index(j: &JobEntry, s: &str) -> Res<u32> {
    let n = j.rec.spec.tasks;
    match s.parse::<u32>() {
        Ok(i) if i < n => Ok(i),
        _ => Err(ApiError::field(
            ErrorCode::InvalidArgument,
            "index",
            format!(
                "`{s}` is not a task of job {}: it has tasks 0 to {}",
                j.rec.id,
                n - 1
            ),
        )),
    }
}

fn checkpoint_view(task: u32, s: &crate::checkpoints::Saved) -> CheckpointView {
    CheckpointView {
        task,
        version: s.version,
        run: s.run,
        bytes: s.bytes,
        saved_ms: s.saved_ms,
        sha256: s.sha256.clone(),
    }
}

/// Whether `run` is the run the server counts as the task's own: only it may save the
/// task's checkpoint, so a copy the server gave up on (its node was lost, it was replaced)
/// never overwrites what its successor saved or restored.
fn is_current_run(core: &Core, job: JobId, index: u32, run: RunId) -> bool {
    core.jobs
        .get(&job)
        .and_then(|j| j.tasks.get(index as usize))
        .is_some_and(|t| t.current_run == Some(run))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CheckpointPut {
    /// the run saving it: kept only from the task's current run
    run: u64,
}

#[utoipa::path(put, path = "/v1/jobs/{id}/tasks/{index}/checkpoint", summary = "agent: save a task's checkpoint (header x-caravel-sha256); kept only from the task's current run", params(("id" = u64, Path, description = "the job"), ("index" = u32, Path, description = "the task index"), CheckpointPut), request_body(content = Binary, content_type = "application/x-tar"), responses((status = 201, description = "saved", body = CheckpointView)))]
/// `PUT /v1/jobs/{id}/tasks/{index}/checkpoint?run=R` (agent token): the body is a tar
/// archive of the task's checkpoint folder, header `x-caravel-sha256` its SHA-256. Kept
/// as the task's newest checkpoint when it arrives whole and `R` is still the task's
/// current run.
pub async fn put_checkpoint(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path((id, index)): Path<(String, String)>,
    q: Result<Query<CheckpointPut>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Body,
) -> Res<(StatusCode, Json<CheckpointView>)> {
    let r = save_checkpoint(s.clone(), headers, id, index, q, body).await;
    let outcome = match &r {
        Ok((_, v)) => {
            s.metrics.checkpoint_bytes_saved.inc_by(v.bytes);
            "saved"
        }
        Err(Refusal { damaged: true, .. }) => "damaged",
        Err(Refusal { err, .. }) => match err.code {
            ErrorCode::Conflict => "stale",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::ExceedsQuota => "over_quota",
            ErrorCode::MalformedRequest => "damaged",
            ErrorCode::InvalidArgument => "invalid",
            // Refused before any upload: not counted as a save.
            ErrorCode::Unauthenticated | ErrorCode::PermissionDenied | ErrorCode::NotFound => {
                return r.map_err(|r| r.err);
            }
            _ => "failed",
        },
    };
    s.metrics
        .checkpoint_saves
        .get_or_create(&vec![("outcome".to_string(), outcome.to_string())])
        .inc();
    r.map_err(|r| r.err)
}

/// Why an upload was refused, with what the metric needs to tell apart: an archive that
/// arrived damaged (its digest or its contents) from any other bad request.
struct Refusal {
    err: ApiError,
    damaged: bool,
}

impl From<ApiError> for Refusal {
    fn from(err: ApiError) -> Refusal {
        Refusal {
            err,
            damaged: false,
        }
    }
}

fn damaged(err: ApiError) -> Refusal {
    Refusal { err, damaged: true }
}

async fn save_checkpoint(
    s: Arc<Shared>,
    headers: HeaderMap,
    id: String,
    index: String,
    q: Result<Query<CheckpointPut>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<CheckpointView>), Refusal> {
    use http_body_util::BodyExt;
    use sha2::Digest;
    use tokio::io::AsyncWriteExt;
    require_agent(authenticate(&s, &headers)?)?;
    // Checked after the caller: a stranger learns nothing about what a valid request is.
    let Query(q) = q.map_err(|e| {
        let text = e.body_text();
        ApiError {
            code: ErrorCode::MalformedRequest,
            field: crate::edge::field_named(&text),
            message: text,
        }
    })?;
    let id = parse_job_id(&id)?;
    let run = RunId(q.run);
    let expected = headers
        .get("x-caravel-sha256")
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            ApiError::field(
                ErrorCode::InvalidArgument,
                "x-caravel-sha256",
                "header required: the archive's SHA-256 as 64 hex digits",
            )
        })?;
    let not_current = || {
        ApiError::field(
            ErrorCode::Conflict,
            "run",
            format!("run {run} is not the current run of job {id} task {index}: it was stopped, lost or replaced, and its checkpoint is not kept"),
        )
    };
    let (index, tenant, storage) = {
        let core = s.core.lock().expect("core lock");
        let j = visible(&core, Principal::Admin, id)?;
        let index = parse_task_index(j, &index)?;
        if !is_current_run(&core, id, index, run) {
            return Err(not_current().into());
        }
        let tenant = j.rec.tenant;
        (index, tenant, crate::storage_left(&s, &core, tenant))
    };
    // A new version replaces the old one: only the difference counts against the quota.
    let old = s.checkpoints.latest(id, index).map_or(0, |c| c.bytes);
    let over_quota = |bytes: u64| {
        storage.and_then(|(used, limit)| {
            (used.saturating_sub(old).saturating_add(bytes) > limit).then(|| {
                ApiError::new(
                    ErrorCode::ExceedsQuota,
                    format!("storage quota: {used} of {limit} bytes in use (checkpoints and task output), {bytes} asked for this checkpoint, which would replace {old}; the task keeps the checkpoint it has"),
                )
            })
        })
    };
    let limit = s.checkpoints.max_bytes;
    let too_large = || {
        ApiError::new(
            ErrorCode::TooLarge,
            format!("the checkpoint is larger than this server's limit of {limit} bytes (caravel server --checkpoint-max-size)"),
        )
    };
    if headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n > limit)
    {
        return Err(too_large().into());
    }
    if let Some(e) = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .and_then(over_quota)
    {
        return Err(e.into());
    }
    let internal = |e: String| ApiError::new(ErrorCode::Internal, e);
    let path = s
        .checkpoints
        .upload_path(id, index, run)
        .map_err(|e| internal(e.to_string()))?;
    // Removes the upload on every way out but the commit (which renames it away).
    struct Upload(std::path::PathBuf);
    impl Drop for Upload {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let upload = Upload(path.clone());
    // Buffered: each write to a tokio file is a trip to the blocking pool, and the body
    // arrives in frames of a few KiB.
    let mut file = tokio::io::BufWriter::with_capacity(
        1 << 20,
        tokio::fs::File::create(&path)
            .await
            .map_err(|e| internal(format!("{}: {e}", path.display())))?,
    );
    let mut hash = sha2::Sha256::new();
    let mut bytes = 0u64;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::new(
                ErrorCode::MalformedRequest,
                format!("the upload was cut off: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        bytes += data.len() as u64;
        if bytes > limit {
            return Err(too_large().into());
        }
        hash.update(&data);
        file.write_all(&data)
            .await
            .map_err(|e| internal(format!("{}: {e}", path.display())))?;
    }
    file.flush()
        .await
        .map_err(|e| internal(format!("{}: {e}", path.display())))?;
    file.into_inner()
        .sync_all()
        .await
        .map_err(|e| internal(format!("{}: {e}", path.display())))?;
    if let Some(e) = over_quota(bytes) {
        return Err(e.into());
    }
    let actual = hex::encode(hash.finalize());
    if actual != expected {
        return Err(damaged(ApiError::field(
            ErrorCode::InvalidArgument,
            "x-caravel-sha256",
            format!("the body's SHA-256 is {actual}, not {expected}: it was damaged on the way"),
        )));
    }
    let s2 = s.clone();
    let saved = tokio::task::spawn_blocking(move || {
        crate::checkpoints::validate_archive(&upload.0).map_err(|e| {
            damaged(ApiError::field(
                ErrorCode::InvalidArgument,
                "body",
                e.to_string(),
            ))
        })?;
        let saved = s2
            .checkpoints
            .commit(
                id,
                index,
                &upload.0,
                crate::checkpoints::Saved {
                    version: 0,
                    run,
                    bytes: 0,
                    saved_ms: now_ms(),
                    sha256: actual,
                },
                || is_current_run(&s2.core.lock().expect("core lock"), id, index, run),
            )
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        Ok::<_, Refusal>(saved)
    })
    .await
    .map_err(|e| internal(e.to_string()))??;
    let saved = saved.ok_or_else(not_current)?;
    {
        // A gang's save is part of its checkpoint only once a cut holds it: ask the
        // other ranks' agents to confirm what their folders hold (module checkpoints).
        let mut core = s.core.lock().expect("core lock");
        if core.is_gang_of_many(id) {
            s.checkpoints.open_round(id);
            try_cut(&s, &core, id);
            core.wake_job_nodes(id);
        }
    }
    // Counted now, not only at the next count: saves in quick succession see each other.
    *s.storage_used
        .lock()
        .expect("lock")
        .entry(tenant)
        .or_default() += saved.bytes.saturating_sub(old);
    tracing::debug!(job = %id, task = index, run = %run, version = saved.version, bytes = saved.bytes, "checkpoint saved");
    Ok((StatusCode::CREATED, Json(checkpoint_view(index, &saved))))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CheckpointGet {
    /// an older version (default: the newest)
    version: Option<u64>,
}

#[utoipa::path(get, path = "/v1/jobs/{id}/tasks/{index}/checkpoint", summary = "a task's newest checkpoint (or `version`): a tar archive of its CARAVEL_CHECKPOINT_DIR", params(("id" = u64, Path, description = "the job"), ("index" = u32, Path, description = "the task index"), CheckpointGet), responses((status = 200, description = "tar archive; headers x-caravel-checkpoint-version, x-caravel-checkpoint-run, x-caravel-sha256", body = Binary, content_type = "application/x-tar")))]
/// `GET /v1/jobs/{id}/tasks/{index}/checkpoint[?version=V]`: the task's newest checkpoint,
/// or the version named (one a gang's cut holds), a tar archive (headers
/// `x-caravel-checkpoint-version`, `-run` and `x-caravel-sha256`).
pub async fn get_checkpoint(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path((id, index)): Path<(String, String)>,
    Query(q): Query<CheckpointGet>,
) -> Res<Response> {
    let p = authenticate(&s, &headers)?;
    let id = parse_job_id(&id)?;
    let index = {
        let core = s.core.lock().expect("core lock");
        parse_task_index(visible(&core, p, id)?, &index)?
    };
    let found = match q.version {
        None => s.checkpoints.open_latest(id, index),
        Some(v) => s.checkpoints.open_version(id, index, v),
    };
    let (saved, file) = found.ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            match q.version {
                None => format!("job {id} task {index} has no checkpoint"),
                Some(v) => format!("job {id} task {index} keeps no checkpoint version {v} (only its newest and the one its gang's cut holds)"),
            },
        )
    })?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        tokio::fs::File::from_std(file),
        1 << 20,
    ));
    s.metrics.checkpoint_bytes_served.inc_by(saved.bytes);
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    h.insert(
        axum::http::header::CONTENT_LENGTH,
        HeaderValue::from(saved.bytes),
    );
    h.insert(
        "x-caravel-checkpoint-version",
        HeaderValue::from(saved.version),
    );
    h.insert("x-caravel-checkpoint-run", HeaderValue::from(saved.run.0));
    if let Ok(v) = HeaderValue::from_str(&saved.sha256) {
        h.insert("x-caravel-sha256", v);
    }
    Ok(resp)
}

// ---- registry credentials ----

fn registry_host(r: &str) -> Res<&str> {
    let ok = !r.is_empty()
        && r.len() <= 255
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    if ok {
        Ok(r)
    } else {
        Err(ApiError::field(
            ErrorCode::InvalidArgument,
            "registry",
            format!("`{r}` is not a registry host (HOST[:PORT], as in an image reference)"),
        ))
    }
}

#[utoipa::path(put, path = "/v1/registries/{registry}", summary = "set the caller's credentials for a registry", params(("registry" = String, Path, description = "registry host, e.g. ghcr.io"), TenantQuery), request_body = RegistryLogin, responses((status = 201, description = "set"), (status = 200, description = "replaced")))]
/// `PUT /v1/registries/{registry}`: stores the caller's tenant's credentials for an OCI
/// registry; its jobs' images there are pulled with them. Never shown back.
pub async fn put_registry(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<TenantQuery>,
    Path(registry): Path<String>,
    body: Bytes,
) -> Res<StatusCode> {
    let p = user_only(authenticate(&s, &headers)?)?;
    let registry = registry_host(&registry)?.to_string();
    let login: RegistryLogin = parse_json(&body)?;
    for (field, v) in [("username", &login.username), ("password", &login.password)] {
        if v.is_empty() || v.len() > 4096 || v.contains('\0') {
            return Err(ApiError::field(
                ErrorCode::InvalidArgument,
                field,
                "must be 1 to 4096 bytes, without NUL",
            ));
        }
    }
    let mut core = s.core.lock().expect("core lock");
    let tenant = acting_tenant(&core, p, q.tenant.as_deref())?;
    let created = core.set_registry_credential(
        tenant,
        &registry,
        Some(RegistryCredential {
            username: login.username,
            password: login.password,
        }),
    )?;
    Ok(if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    })
}

#[utoipa::path(delete, path = "/v1/registries/{registry}", summary = "remove the caller's credentials for a registry", params(("registry" = String, Path, description = "registry host, e.g. ghcr.io"), TenantQuery), responses((status = 204, description = "removed")))]
/// `DELETE /v1/registries/{registry}`: forgets the caller's tenant's credentials.
pub async fn delete_registry(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<TenantQuery>,
    Path(registry): Path<String>,
) -> Res<StatusCode> {
    let p = user_only(authenticate(&s, &headers)?)?;
    let registry = registry_host(&registry)?.to_string();
    let mut core = s.core.lock().expect("core lock");
    let tenant = acting_tenant(&core, p, q.tenant.as_deref())?;
    if !core.set_registry_credential(tenant, &registry, None)? {
        return Err(ApiError::not_found(format!("credentials for {registry}")));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/registries", summary = "the caller's image registry credentials (names only, never secrets)", params(TenantQuery), responses((status = 200, description = "registries", body = Vec<RegistryView>)))]
/// `GET /v1/registries`: the registries the caller's tenant has credentials for, with
/// the user names (never the passwords).
pub async fn list_registries(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<TenantQuery>,
) -> Res<Json<Vec<RegistryView>>> {
    let p = user_only(authenticate(&s, &headers)?)?;
    let core = s.core.lock().expect("core lock");
    let tenant = acting_tenant(&core, p, q.tenant.as_deref())?;
    let t = core
        .tenants
        .get(&tenant)
        .ok_or_else(|| ApiError::not_found("tenant"))?;
    Ok(Json(
        t.registries
            .iter()
            .map(|(r, c)| RegistryView {
                registry: r.clone(),
                username: c.username.clone(),
            })
            .collect(),
    ))
}

// ---- working directories ----

fn workdir_digest(d: &str) -> Res<&str> {
    crate::workdirs::hex_of(d).map(|_| d).ok_or_else(|| {
        ApiError::field(
            ErrorCode::InvalidArgument,
            "digest",
            format!("`{d}` is not sha256:<64 lowercase hex>"),
        )
    })
}

#[utoipa::path(head, path = "/v1/workdirs/{digest}", summary = "whether the caller has uploaded this working directory archive", params(("digest" = String, Path, description = "SHA-256 of the archive, 64 hex digits"), TenantQuery), responses((status = 200, description = "held; Content-Length is its size")))]
/// `HEAD /v1/workdirs/{digest}`: 200 when the caller's tenant has uploaded this archive
/// (its size in `content-length`), 404 otherwise. It says nothing of other tenants'.
pub async fn has_workdir(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<TenantQuery>,
    Path(digest): Path<String>,
) -> Res<Response> {
    let p = user_only(authenticate(&s, &headers)?)?;
    let tenant = acting_tenant(&s.core.lock().expect("core lock"), p, q.tenant.as_deref())?;
    let digest = workdir_digest(&digest)?;
    match s.workdirs.has(tenant, digest) {
        Some(n) => Ok((
            StatusCode::OK,
            [(axum::http::header::CONTENT_LENGTH, n.to_string())],
        )
            .into_response()),
        None => Err(ApiError::not_found(format!("working directory {digest}"))),
    }
}

#[utoipa::path(put, path = "/v1/workdirs/{digest}", summary = "upload a working directory archive (checked against its SHA-256 and --workdir-max-size)", params(("digest" = String, Path, description = "SHA-256 of the archive, 64 hex digits"), TenantQuery), request_body(content = Binary, content_type = "application/gzip"), responses((status = 201, description = "stored", body = WorkdirView)))]
/// `PUT /v1/workdirs/{digest}`: uploads a working directory (a tar archive whose SHA-256
/// is `digest`) for the caller's tenant. 201 when stored, 200 when it was already there.
pub async fn put_workdir(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<TenantQuery>,
    Path(digest): Path<String>,
    body: axum::body::Body,
) -> Res<(StatusCode, Json<WorkdirView>)> {
    use http_body_util::BodyExt;
    use sha2::Digest;
    use tokio::io::AsyncWriteExt;
    let p = user_only(authenticate(&s, &headers)?)?;
    let (tenant, storage) = {
        let core = s.core.lock().expect("core lock");
        let t = acting_tenant(&core, p, q.tenant.as_deref())?;
        (t, crate::storage_left(&s, &core, t))
    };
    let digest = workdir_digest(&digest)?.to_string();
    if let Some(bytes) = s.workdirs.has(tenant, &digest) {
        s.workdirs.touch(tenant, &digest, now_ms());
        return Ok((StatusCode::OK, Json(WorkdirView { digest, bytes })));
    }
    let limit = s.workdirs.max_bytes;
    let too_large = || {
        ApiError::new(
            ErrorCode::TooLarge,
            format!("the working directory is larger than this server's limit of {limit} bytes (caravel server --workdir-max-size); leave out what the tasks do not need with .caravelignore"),
        )
    };
    let over_quota = |bytes: u64| {
        storage.and_then(|(used, cap)| {
            (used.saturating_add(bytes) > cap).then(|| {
                ApiError::new(
                    ErrorCode::ExceedsQuota,
                    format!("storage quota: {used} of {cap} bytes in use (checkpoints, task output and working directories), {bytes} more asked"),
                )
            })
        })
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    if let Some(e) = declared.and_then(over_quota) {
        return Err(e);
    }
    let internal = |e: String| ApiError::new(ErrorCode::Internal, e);
    let path = s
        .workdirs
        .upload_path(tenant)
        .map_err(|e| internal(e.to_string()))?;
    struct Upload(std::path::PathBuf);
    impl Drop for Upload {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let upload = Upload(path.clone());
    let mut file = tokio::io::BufWriter::with_capacity(
        1 << 20,
        tokio::fs::File::create(&path)
            .await
            .map_err(|e| internal(format!("{}: {e}", path.display())))?,
    );
    let mut hash = sha2::Sha256::new();
    let mut bytes = 0u64;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::new(
                ErrorCode::MalformedRequest,
                format!("the upload was cut off: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        bytes += data.len() as u64;
        if bytes > limit {
            return Err(too_large());
        }
        hash.update(&data);
        file.write_all(&data)
            .await
            .map_err(|e| internal(format!("{}: {e}", path.display())))?;
    }
    file.flush()
        .await
        .map_err(|e| internal(format!("{}: {e}", path.display())))?;
    file.into_inner()
        .sync_all()
        .await
        .map_err(|e| internal(format!("{}: {e}", path.display())))?;
    if let Some(e) = over_quota(bytes) {
        return Err(e);
    }
    let actual = format!("sha256:{}", hex::encode(hash.finalize()));
    if actual != digest {
        return Err(ApiError::field(
            ErrorCode::InvalidArgument,
            "digest",
            format!("the body's SHA-256 is {actual}, not {digest}: it was damaged on the way, or the name is wrong"),
        ));
    }
    let s2 = s.clone();
    let d2 = digest.clone();
    let bytes = tokio::task::spawn_blocking(move || {
        s2.workdirs
            .commit(tenant, &d2, &upload.0, now_ms())
            .map_err(|e| match e {
                crate::workdirs::WorkdirError::Archive(m) => {
                    ApiError::field(ErrorCode::InvalidArgument, "body", m)
                }
                e => ApiError::new(ErrorCode::Internal, e.to_string()),
            })
    })
    .await
    .map_err(|e| internal(e.to_string()))??;
    *s.storage_used
        .lock()
        .expect("lock")
        .entry(tenant)
        .or_default() += bytes;
    Ok((StatusCode::CREATED, Json(WorkdirView { digest, bytes })))
}

#[utoipa::path(get, path = "/v1/jobs/{id}/workdir", summary = "the working directory archive the job was submitted with", params(("id" = u64, Path, description = "the job")), responses((status = 200, description = "tar.gz", body = Binary, content_type = "application/gzip")))]
/// `GET /v1/jobs/{id}/workdir`: the working directory the job names (agents fetch it for
/// each task they start; its owner may too).
pub async fn get_job_workdir(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Res<Response> {
    let p = authenticate(&s, &headers)?;
    let id = parse_job_id(&id)?;
    let (tenant, digest) =
        {
            let core = s.core.lock().expect("core lock");
            let j = visible(&core, p, id)?;
            let d =
                j.rec.spec.workdir.clone().ok_or_else(|| {
                    ApiError::not_found(format!("job {id} has no working directory"))
                })?;
            (j.rec.tenant, d)
        };
    let (file, bytes) = s.workdirs.open_archive(tenant, &digest).ok_or_else(|| {
        ApiError::not_found(format!(
            "working directory {digest} of job {id} (removed past its retention?)"
        ))
    })?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        tokio::fs::File::from_std(file),
        1 << 20,
    ));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    h.insert(axum::http::header::CONTENT_LENGTH, HeaderValue::from(bytes));
    if let Ok(v) = HeaderValue::from_str(&digest) {
        h.insert("x-caravel-digest", v);
    }
    Ok(resp)
}

#[utoipa::path(get, path = "/v1/jobs/{id}/checkpoints", summary = "each task's newest checkpoint", params(("id" = u64, Path, description = "the job")), responses((status = 200, description = "checkpoints", body = Vec<CheckpointView>)))]
/// `GET /v1/jobs/{id}/checkpoints`: each task's newest checkpoint.
pub async fn list_checkpoints(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Res<Json<Vec<CheckpointView>>> {
    let p = authenticate(&s, &headers)?;
    let id = parse_job_id(&id)?;
    visible(&s.core.lock().expect("core lock"), p, id)?;
    Ok(Json(
        s.checkpoints
            .of_job(id)
            .iter()
            .map(|(i, c)| checkpoint_view(*i, c))
            .collect(),
    ))
}

#[utoipa::path(get, path = "/v1/jobs/{id}/checkpoint-cut", summary = "a gang's committed checkpoint cut: the version of each rank's part", params(("id" = u64, Path, description = "the job")), responses((status = 200, description = "the cut", body = GangCut)))]
/// `GET /v1/jobs/{id}/checkpoint-cut`: the gang's committed checkpoint cut, the parts every
/// rank of its next attempt restores (`cut` 0 and no parts before the first).
pub async fn checkpoint_cut(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Res<Json<GangCut>> {
    let p = authenticate(&s, &headers)?;
    let id = parse_job_id(&id)?;
    let core = s.core.lock().expect("core lock");
    visible(&core, p, id)?;
    if !core.is_gang_of_many(id) {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("job {id} is not a gang of more than one task: each of its tasks has its own checkpoint (GET /v1/jobs/{id}/checkpoints)"),
        ));
    }
    drop(core);
    Ok(Json(s.checkpoints.gang_cut(id)))
}
