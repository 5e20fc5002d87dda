//! What every API request passes before its handler: the rate limit, the connection's
//! trust (see `serve`), and after it: one error shape whatever layer answered.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use caravel_core::ErrorCode;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::serve::{ConnMark, RateKey};
use crate::Shared;

/// Rate-limits API calls: per tenant token, or per address for callers without a valid
/// token (a wrong token counts against its address, so guessing is slowed). The admin
/// and agent tokens, and `/healthz`, are not limited. A connection that shows the admin or
/// an agent token is trusted (never evicted); a tenant's is not, or one tenant could hold
/// the whole connection cap with idle connections its token made unevictable.
pub async fn limit(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    // Health checks cost nothing (no lock, no store), and a load balancer told 429 would
    // count the server as down.
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    let principal = crate::api::authenticate(&s, req.headers()).ok();
    if matches!(principal, Some(Principal::Admin | Principal::Agent)) {
        if let Some(m) = req.extensions().get::<ConnMark>() {
            m.trust();
        }
    }
    let (key, rate, who) = match principal {
        Some(Principal::Admin | Principal::Agent) => return next.run(req).await,
        Some(Principal::Tenant(t)) => (RateKey::Tenant(t), s.cfg.tenant_rate, "this token"),
        None => {
            let Some(ip) = req
                .extensions()
                .get::<ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip())
            else {
                return next.run(req).await;
            };
            (
                RateKey::address(ip),
                s.cfg.anonymous_rate,
                "this address without a valid token",
            )
        }
    };
    match s.rate.take(key, rate, Instant::now()) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut resp = ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "too many requests from {who} (limit {}/s, {} at once); retry after {secs} s",
                    rate.per_s, rate.burst
                ),
            )
            .into_response();
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&secs.to_string()).expect("digits"),
            );
            resp
        }
    }
}

/// Turns any error answer that is not already Caravel's JSON error (axum's rejections of
/// paths, query strings and bodies, 405s, body limits) into one, with a stable code and
/// the field when the text names one.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, 16 << 10).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let (code, default) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            ErrorCode::MethodNotAllowed,
            format!("method {method} is not allowed on this path"),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            ErrorCode::TooLarge,
            "the request body is larger than this endpoint accepts".to_string(),
        ),
        StatusCode::NOT_FOUND => (ErrorCode::NotFound, "no such path".to_string()),
        StatusCode::UNAUTHORIZED => (ErrorCode::Unauthenticated, "unauthenticated".into()),
        StatusCode::FORBIDDEN => (ErrorCode::PermissionDenied, "permission denied".into()),
        StatusCode::TOO_MANY_REQUESTS => (ErrorCode::RateLimited, "too many requests".into()),
        StatusCode::SERVICE_UNAVAILABLE => (ErrorCode::Unavailable, "unavailable".into()),
        s if s.is_server_error() => (ErrorCode::Internal, "internal error".into()),
        _ => (ErrorCode::MalformedRequest, "malformed request".into()),
    };
    let message = if text.is_empty() { default } else { text };
    let field = field_named(&message);
    let mut e = ApiError::new(code, message);
    e.field = field;
    let mut out = e.into_response();
    // The status stays what the layer chose (a 415 stays a 415).
    *out.status_mut() = status;
    for (k, v) in parts.headers.iter() {
        if k == header::ALLOW || k == header::RETRY_AFTER {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

/// The field an axum or serde message names: `limit: invalid digit` (query strings),
/// ``Invalid UTF-8 in `id` `` (paths), ``missing field `command` `` (bodies).
pub fn field_named(msg: &str) -> Option<String> {
    let backticked = |after: &str| -> Option<String> {
        let i = msg.find(after)? + after.len();
        let rest = &msg[i..];
        let end = rest.find('`')?;
        let f = &rest[..end];
        (!f.is_empty()).then(|| f.to_string())
    };
    if let Some(f) = backticked("missing field `").or_else(|| backticked("unknown field `")) {
        return Some(f);
    }
    if let Some(f) = backticked(" in `") {
        return Some(f);
    }
    // "Failed to deserialize query string: FIELD: reason"
    let rest = msg
        .strip_prefix("Failed to deserialize query string: ")
        .or_else(|| {
            msg.strip_prefix("Failed to deserialize the JSON body into the target type: ")
        })?;
    let (f, _) = rest.split_once(": ")?;
    (!f.is_empty() && !f.contains(' ')).then(|| f.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_in_the_messages_of_every_layer() {
        assert_eq!(
            field_named("Failed to deserialize query string: limit: invalid digit found in string"),
            Some("limit".into())
        );
        assert_eq!(
            field_named("Invalid URL: Invalid UTF-8 in `id`"),
            Some("id".into())
        );
        assert_eq!(
            field_named("missing field `command` at line 1 column 2"),
            Some("command".into())
        );
        assert_eq!(
            field_named("unknown field `comand`, expected one of"),
            Some("comand".into())
        );
        assert_eq!(
            field_named("Failed to buffer the request body: length limit exceeded"),
            None
        );
        assert_eq!(field_named(""), None);
    }
}
