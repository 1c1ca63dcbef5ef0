//! Registry errors, with the stable codes the REST API returns and their
//! gRPC equivalents.

use serde::Serialize;
use shamal_error::ErrorKind;
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
    /// The audit backlog is full (`[audit] on_full = "fail_closed"`): the
    /// change is refused before it is made.
    #[error("{0}; change refused, retry later")]
    AuditBacklog(#[from] shamal_audit_client::Backlog),
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

    /// The kind in Shamal's one error table (`shamal_error`), which decides
    /// the gRPC code and the HTTP status.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RegistryError::InvalidArgument { .. } | RegistryError::DigestMismatch(_) => {
                ErrorKind::InvalidArgument
            }
            RegistryError::NotFound(_) => ErrorKind::NotFound,
            RegistryError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            // A stale revision: a concurrent write won (gRPC's ABORTED).
            RegistryError::Conflict { .. } => ErrorKind::Aborted,
            RegistryError::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            RegistryError::PayloadTooLarge(_) => ErrorKind::PayloadTooLarge,
            RegistryError::AuditBacklog(_) => ErrorKind::ResourceExhausted,
            RegistryError::Internal(_) => ErrorKind::Internal,
        }
    }

    /// Stable machine-readable code (REST `error.code`): the kind's label,
    /// except where the REST API names the refinement (`digest_mismatch`)
    /// or keeps its older name (`conflict` for ABORTED).
    pub fn code(&self) -> &'static str {
        match self {
            RegistryError::Conflict { .. } => "conflict",
            RegistryError::DigestMismatch(_) => "digest_mismatch",
            _ => self.kind().label(),
        }
    }

    pub fn http_status(&self) -> http::StatusCode {
        self.kind().http_status()
    }

    /// The message a caller may see. An internal error's detail (database
    /// or file-system text) never leaves the registry: it is logged here
    /// with a fresh error id, and the caller gets a generic message naming
    /// that id, so an operator can find the real error from a report.
    pub fn public_message(&self) -> String {
        match self {
            RegistryError::Internal(detail) => {
                let error_id = uuid::Uuid::new_v4().simple().to_string();
                tracing::error!(%error_id, error = %detail, "registry request failed");
                format!("internal error (error id {error_id}); the registry log has the details")
            }
            _ => self.to_string(),
        }
    }

    /// The JSON body of a REST error (internal details redacted, see
    /// [`RegistryError::public_message`]).
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.public_message(),
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

/// The gRPC answer: the table's code, internal details redacted as on the
/// REST API.
impl From<RegistryError> for tonic::Status {
    fn from(error: RegistryError) -> tonic::Status {
        error.kind().status(error.public_message())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_precondition_is_400_as_on_the_router() {
        let error = RegistryError::FailedPrecondition("archived".to_owned());
        assert_eq!(error.http_status(), http::StatusCode::BAD_REQUEST);
        assert_eq!(
            error.http_status(),
            shamal_error::http_status(tonic::Code::FailedPrecondition)
        );
        assert_eq!(
            tonic::Status::from(error).code(),
            tonic::Code::FailedPrecondition
        );
    }

    #[test]
    fn rest_and_grpc_agree_on_every_error() {
        let errors = [
            RegistryError::invalid("name", "bad"),
            RegistryError::NotFound("m".to_owned()),
            RegistryError::AlreadyExists("m".to_owned()),
            RegistryError::Conflict {
                message: "stale".to_owned(),
                current_revision: 3,
            },
            RegistryError::FailedPrecondition("p".to_owned()),
            RegistryError::DigestMismatch("d".to_owned()),
            RegistryError::PayloadTooLarge("big".to_owned()),
            RegistryError::AuditBacklog(shamal_audit_client::Backlog::Queue { queued: 1 }),
            RegistryError::Internal("x".to_owned()),
        ];
        let expected = [400, 404, 409, 409, 400, 400, 413, 429, 500];
        for (error, http) in errors.into_iter().zip(expected) {
            assert_eq!(error.http_status().as_u16(), http, "{error:?}");
            let kind = error.kind();
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), kind.code());
        }
    }

    #[test]
    fn internal_details_reach_neither_rest_nor_grpc_callers() {
        let detail = "database: error returned from database: no such table: models";
        let status = tonic::Status::from(RegistryError::Internal(detail.to_owned()));
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(!status.message().contains("no such table"), "{status:?}");
        assert!(status.message().contains("error id "), "{status:?}");
        let body = RegistryError::Internal(detail.to_owned()).body();
        assert_eq!(body.error.code, "internal");
        assert!(!body.error.message.contains("no such table"));
        assert!(body.error.message.contains("error id "));
    }
}
