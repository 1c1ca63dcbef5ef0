//! The audit service's errors and their gRPC statuses.

use tonic::Status;

pub type Result<T, E = AuditError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A request field is wrong; `field` names it (`events[3].request_sha256`).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The database (or a background task) failed.
    #[error("{0}")]
    Internal(String),
    /// The database refused a change: the append-only triggers.
    #[error("{0}")]
    Refused(String),
    /// Stored data does not decode (a hash that is not hex, ...).
    #[error("stored audit data is corrupt at seq {seq}: {message}")]
    Corrupt { seq: u64, message: String },
    /// The service is stopping.
    #[error("the audit service is stopping")]
    Stopping,
}

impl AuditError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> AuditError {
        AuditError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<sqlx::Error> for AuditError {
    fn from(error: sqlx::Error) -> AuditError {
        match &error {
            sqlx::Error::Database(database) if is_append_only_refusal(database.message()) => {
                AuditError::Refused(database.message().to_owned())
            }
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                AuditError::Internal(format!("database unavailable: {error}"))
            }
            _ => AuditError::Internal(format!("database error: {error}")),
        }
    }
}

/// Whether a database error message is one of the append-only triggers'.
pub fn is_append_only_refusal(message: &str) -> bool {
    message.contains("audit log is append-only")
}

impl From<AuditError> for Status {
    fn from(error: AuditError) -> Status {
        match &error {
            AuditError::Invalid { .. } => Status::invalid_argument(error.to_string()),
            AuditError::Refused(_) => Status::failed_precondition(error.to_string()),
            AuditError::Internal(message) if message.starts_with("database unavailable") => {
                Status::unavailable(error.to_string())
            }
            AuditError::Internal(_) => Status::internal(error.to_string()),
            AuditError::Corrupt { .. } => Status::data_loss(error.to_string()),
            AuditError::Stopping => Status::unavailable(error.to_string()),
        }
    }
}
