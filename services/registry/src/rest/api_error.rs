//! The one error type of the REST API: always a JSON `ErrorBody`.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;

use crate::error::{ErrorBody, ErrorDetail, RegistryError};

/// An HTTP status with its JSON error body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    /// An error that has no [`RegistryError`] equivalent (routing, media
    /// type).
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    code: code.to_owned(),
                    message: message.into(),
                    field: None,
                    current_revision: None,
                },
            },
        }
    }

    /// 400 `invalid_argument` naming `field`.
    pub fn invalid(field: &str, message: impl Into<String>) -> ApiError {
        RegistryError::invalid(field, message).into()
    }

    pub fn with_field(mut self, field: &str) -> ApiError {
        self.body.error.field = Some(field.to_owned());
        self
    }
}

impl From<RegistryError> for ApiError {
    /// The table's status; an internal error's detail is logged, not sent
    /// (see [`RegistryError::public_message`]).
    fn from(error: RegistryError) -> ApiError {
        ApiError {
            status: error.http_status(),
            body: error.body(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
