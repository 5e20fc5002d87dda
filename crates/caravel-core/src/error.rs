//! The closed set of stable error codes, mapped to HTTP statuses in one place.

use serde::{Deserialize, Serialize};

/// Stable, machine-readable error codes. Clients switch on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A field has a value that is malformed or out of range.
    InvalidArgument,
    /// The request body is not JSON of the expected shape (unknown field, wrong type).
    MalformedRequest,
    /// No or bad bearer token.
    Unauthenticated,
    /// The token is valid but may not do this.
    PermissionDenied,
    /// The object does not exist, or belongs to another tenant.
    NotFound,
    /// The object already exists or is in a state that forbids the action.
    Conflict,
    /// The job can never run on this pool (no node offers what it asks for).
    Unschedulable,
    /// The job asks for more than its tenant's quota allows in total.
    ExceedsQuota,
    /// A node that holds the requested data, or the control plane's database, could not
    /// be reached.
    Unavailable,
    /// Past the service's request rate limit.
    RateLimited,
    /// The replica a request went to failed before answering.
    UpstreamFailed,
    /// The replica a request went to sent no response within the service's
    /// `response_timeout`.
    UpstreamTimeout,
    /// The request body is larger than the server accepts (a checkpoint past
    /// `--checkpoint-max-size`).
    TooLarge,
    /// The path exists but not with this method.
    MethodNotAllowed,
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument | ErrorCode::MalformedRequest => 400,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::Unschedulable | ErrorCode::ExceedsQuota => 422,
            ErrorCode::Unavailable => 503,
            ErrorCode::RateLimited => 429,
            ErrorCode::UpstreamFailed => 502,
            ErrorCode::UpstreamTimeout => 504,
            ErrorCode::TooLarge => 413,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Internal => 500,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::MalformedRequest => "malformed_request",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unschedulable => "unschedulable",
            ErrorCode::ExceedsQuota => "exceeds_quota",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::UpstreamFailed => "upstream_failed",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A rejected field: which one and why. Becomes an `invalid_argument` API error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    pub field: String,
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
