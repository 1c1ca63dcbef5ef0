//! The coordinator's errors, as gRPC statuses and REST answers.

use axum::http::StatusCode;
use tonic::Status;

pub type Result<T, E = BatchError> = std::result::Result<T, E>;

/// A failed call. Every variant's message names what is at fault (the
/// field, the column, the model, the regions).
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// A request field is wrong; `field` names it (`spec.key_columns[1]`).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// An unknown job, model, version or alias (the message names it).
    #[error("{0}")]
    NotFound(String),
    /// The request is valid but the world is not as it needs: a version
    /// that is not ready, regions that do not meet, a finished job.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller may not do this (another tenant, a limited model).
    #[error("{0}")]
    PermissionDenied(String),
    /// A service it depends on (registry, inference endpoint, queue,
    /// database) cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl BatchError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> BatchError {
        BatchError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The HTTP status of the REST API's answer.
    pub fn http_status(&self) -> StatusCode {
        match self {
            BatchError::Invalid { .. } => StatusCode::BAD_REQUEST,
            BatchError::NotFound(_) => StatusCode::NOT_FOUND,
            BatchError::FailedPrecondition(_) => StatusCode::CONFLICT,
            BatchError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            BatchError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            BatchError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<sqlx::Error> for BatchError {
    fn from(error: sqlx::Error) -> BatchError {
        match &error {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                BatchError::Unavailable(format!("database unavailable: {error}"))
            }
            _ => BatchError::Internal(format!("database error: {error}")),
        }
    }
}

impl From<shamal_async_queue::QueueError> for BatchError {
    fn from(error: shamal_async_queue::QueueError) -> BatchError {
        if error.is_unavailable() {
            BatchError::Unavailable(format!("batch queue unavailable: {error}"))
        } else {
            BatchError::Internal(format!("batch queue: {error}"))
        }
    }
}

impl From<BatchError> for Status {
    fn from(error: BatchError) -> Status {
        let message = error.to_string();
        match error {
            BatchError::Invalid { .. } => Status::invalid_argument(message),
            BatchError::NotFound(_) => Status::not_found(message),
            BatchError::FailedPrecondition(_) => Status::failed_precondition(message),
            BatchError::PermissionDenied(_) => Status::permission_denied(message),
            BatchError::Unavailable(_) => Status::unavailable(message),
            BatchError::Internal(_) => Status::internal(message),
        }
    }
}
