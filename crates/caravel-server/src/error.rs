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
