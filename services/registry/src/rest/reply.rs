//! What the resources' handlers share in their answers: the body of a
//! complete list, and 201 Created with its `Location`.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A complete (unpaged) list.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Items<T> {
    pub items: Vec<T>,
}

/// 201 Created with `body`, and `location` in the `Location` header (left
/// out when it is not a valid header value).
pub(super) fn created<T: Serialize>(location: String, body: T) -> Response {
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, value);
    }
    (StatusCode::CREATED, headers, Json(body)).into_response()
}

/// Percent-encodes a path segment for a Location header.
pub(super) fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
