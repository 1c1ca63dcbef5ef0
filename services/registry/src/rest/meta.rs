//! The web UI, the OpenAPI document, and the JSON answers for unknown
//! routes and methods.

use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use http::{Method, StatusCode, Uri, header};

use super::AppState;
use super::api_error::ApiError;

/// The web UI for release managers.
pub async fn ui() -> Response {
    (
        [
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                 frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Html(include_str!("../ui/index.html")),
    )
        .into_response()
}

/// The OpenAPI document
///
/// This API's OpenAPI 3.1 document, which this reference is generated from.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    operation_id = "get_openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json", body = Object))
)]
pub async fn openapi_document(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi_json.clone(),
    )
        .into_response()
}

pub async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {method} {}", uri.path()),
    )
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not support {method}", uri.path()),
    )
}
