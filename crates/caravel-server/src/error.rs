//! API errors: one type, mapped to an HTTP status and a JSON body in one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use caravel_core::api::{ErrorBody, ErrorDetail};
use caravel_core::{ErrorCode, ValidationError};
use caravel_store::StoreError;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            field: None,
        }
    }
    pub fn field(
        code: ErrorCode,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            field: Some(field.into()),
        }
    }
    pub fn not_found(what: impl std::fmt::Display) -> ApiError {
        ApiError::new(ErrorCode::NotFound, format!("{what} not found"))
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::field(ErrorCode::InvalidArgument, e.field.clone(), e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store error");
        match e {
            StoreError::Unavailable(_) => ApiError::new(
                ErrorCode::Unavailable,
                // A connection lost during COMMIT leaves its outcome unknown: say so.
                format!("{e}; retry shortly (a change sent as the connection failed may have been saved: repeat a submission with the same Idempotency-Key, or check before repeating it)"),
            ),
            _ => ApiError::new(ErrorCode::Internal, format!("storage failed: {e}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        // Kept on the response for the gateway, which answers gRPC callers in gRPC.
        let ext = self.clone();
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                field: self.field,
            },
        };
        let mut resp = (status, axum::Json(body)).into_response();
        resp.extensions_mut().insert(ext);
        resp
    }
}

/// What `Core` refuses or fails at, in its own terms: the state machine knows nothing of
/// the API. Mapped to the API's error in one place (`From<CoreError> for ApiError`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CoreError {
    #[error("{0} not found")]
    NotFound(String),
    /// A request that breaks a rule of its own (a field out of range, two fields that
    /// contradict each other).
    #[error("{message}")]
    Invalid { field: String, message: String },
    /// Work no node of the pool could ever run.
    #[error("{message}")]
    Unschedulable { field: String, message: String },
    /// More than the tenant's quota allows, ever.
    #[error("{message}")]
    ExceedsQuota { field: String, message: String },
    /// The state does not allow it now (a name taken, a node of another instance).
    #[error("{message}")]
    Conflict {
        field: Option<String>,
        message: String,
    },
    #[error("{0}")]
    Internal(String),
    /// The store failed or refused a read or a commit (the committer, which the API's
    /// handlers share, says so in the API's words).
    #[error(transparent)]
    Store(ApiError),
}

impl CoreError {
    pub fn not_found(what: impl std::fmt::Display) -> CoreError {
        CoreError::NotFound(what.to_string())
    }
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> CoreError {
        CoreError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn unschedulable(field: impl Into<String>, message: impl Into<String>) -> CoreError {
        CoreError::Unschedulable {
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn exceeds_quota(field: impl Into<String>, message: impl Into<String>) -> CoreError {
        CoreError::ExceedsQuota {
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn conflict(message: impl Into<String>) -> CoreError {
        CoreError::Conflict {
            field: None,
            message: message.into(),
        }
    }
    pub fn conflict_on(field: impl Into<String>, message: impl Into<String>) -> CoreError {
        CoreError::Conflict {
            field: Some(field.into()),
            message: message.into(),
        }
    }
    pub fn internal(message: impl Into<String>) -> CoreError {
        CoreError::Internal(message.into())
    }

    /// The field of the request it is about, when it is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            CoreError::Invalid { field, .. }
            | CoreError::Unschedulable { field, .. }
            | CoreError::ExceedsQuota { field, .. } => Some(field),
            CoreError::Conflict { field, .. } => field.as_deref(),
            CoreError::Store(e) => e.field.as_deref(),
            CoreError::NotFound(_) | CoreError::Internal(_) => None,
        }
    }

    /// The API's code for it.
    pub fn code(&self) -> ErrorCode {
        match self {
            CoreError::NotFound(_) => ErrorCode::NotFound,
            CoreError::Invalid { .. } => ErrorCode::InvalidArgument,
            CoreError::Unschedulable { .. } => ErrorCode::Unschedulable,
            CoreError::ExceedsQuota { .. } => ErrorCode::ExceedsQuota,
            CoreError::Conflict { .. } => ErrorCode::Conflict,
            CoreError::Internal(_) => ErrorCode::Internal,
            CoreError::Store(e) => e.code,
        }
    }
}

impl From<ValidationError> for CoreError {
    fn from(e: ValidationError) -> Self {
        CoreError::invalid(e.field.clone(), e.to_string())
    }
}

impl From<StoreError> for CoreError {
    fn from(e: StoreError) -> Self {
        CoreError::Store(e.into())
    }
}

impl From<ApiError> for CoreError {
    fn from(e: ApiError) -> Self {
        CoreError::Store(e)
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let code = e.code();
        match e {
            CoreError::Store(e) => e,
            CoreError::NotFound(_) | CoreError::Internal(_) => ApiError::new(code, e.to_string()),
            CoreError::Invalid { field, message }
            | CoreError::Unschedulable { field, message }
            | CoreError::ExceedsQuota { field, message } => ApiError::field(code, field, message),
            CoreError::Conflict { field, message } => ApiError {
                code,
                message,
                field,
            },
        }
    }
}
