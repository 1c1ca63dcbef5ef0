//! Registry errors, with the stable codes the REST API returns and their
//! gRPC equivalents.

use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A request field is missing or wrong; `field` names it.
    #[error("invalid {field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// A write named a revision that is no longer current.
    #[error("{message} (current revision {current_revision})")]
    Conflict {
        message: String,
        current_revision: u64,
    },
    /// The request is valid but the state does not allow it (e.g. a rollout
    /// onto an archived version).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Uploaded bytes do not hash to the declared digest.
    #[error("{0}")]
    DigestMismatch(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, RegistryError>;

impl RegistryError {
    pub fn invalid(field: &str, message: impl Into<String>) -> RegistryError {
        RegistryError::InvalidArgument {
            field: field.to_owned(),
            message: message.into(),
        }
    }

    /// Stable machine-readable code (REST `error.code`).
    pub fn code(&self) -> &'static str {
        match self {
            RegistryError::InvalidArgument { .. } => "invalid_argument",
            RegistryError::NotFound(_) => "not_found",
            RegistryError::AlreadyExists(_) => "already_exists",
            RegistryError::Conflict { .. } => "conflict",
            RegistryError::FailedPrecondition(_) => "failed_precondition",
            RegistryError::DigestMismatch(_) => "digest_mismatch",
            RegistryError::PayloadTooLarge(_) => "payload_too_large",
            RegistryError::Internal(_) => "internal",
        }
    }

    pub fn http_status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            RegistryError::InvalidArgument { .. } | RegistryError::DigestMismatch(_) => {
                StatusCode::BAD_REQUEST
            }
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::AlreadyExists(_) | RegistryError::Conflict { .. } => {
                StatusCode::CONFLICT
            }
            RegistryError::FailedPrecondition(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RegistryError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RegistryError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body of a REST error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.to_string(),
                field: match self {
                    RegistryError::InvalidArgument { field, .. } => Some(field.clone()),
                    _ => None,
                },
                current_revision: match self {
                    RegistryError::Conflict {
                        current_revision, ..
                    } => Some(*current_revision),
                    _ => None,
                },
            },
        }
    }
}

impl From<RegistryError> for tonic::Status {
    fn from(error: RegistryError) -> tonic::Status {
        let message = error.to_string();
        match error {
            RegistryError::InvalidArgument { .. } | RegistryError::DigestMismatch(_) => {
                tonic::Status::invalid_argument(message)
            }
            RegistryError::NotFound(_) => tonic::Status::not_found(message),
            RegistryError::AlreadyExists(_) => tonic::Status::already_exists(message),
            RegistryError::Conflict { .. } => tonic::Status::aborted(message),
            RegistryError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            RegistryError::PayloadTooLarge(_) => tonic::Status::resource_exhausted(message),
            RegistryError::Internal(_) => tonic::Status::internal(message),
        }
    }
}

impl From<sqlx::Error> for RegistryError {
    fn from(error: sqlx::Error) -> RegistryError {
        RegistryError::Internal(format!("database: {error}"))
    }
}

impl From<std::io::Error> for RegistryError {
    fn from(error: std::io::Error) -> RegistryError {
        RegistryError::Internal(format!("i/o: {error}"))
    }
}

/// REST error body: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code: invalid_argument, not_found, already_exists, conflict,
    /// failed_precondition, digest_mismatch, payload_too_large, internal.
    pub code: String,
    pub message: String,
    /// The offending request field (invalid_argument only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The rollout's current revision (conflict only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<u64>,
}
