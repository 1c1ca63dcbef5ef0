//! What the synchronous and the asynchronous HTTP APIs share: the model
//! path, the call context a request's headers give, the inference body in
//! and out, and the v2 error body.

use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use shamal_proto::inference::{ModelInferRequest, ModelInferResponse};
use tonic::Status;

use super::json::{HEADER_LENGTH, OutputEncoding, parse_infer_request, render_infer_response};
use crate::forward::CallContext;
use crate::routing::RoutingCore;

/// `/v2/models/{model}[/versions/{version}]/...`: one handler serves both
/// forms; no version means the server's choice (the highest ready one).
#[derive(serde::Deserialize)]
pub(crate) struct ModelPath {
    pub model: String,
    #[serde(default)]
    pub version: String,
}

/// The JSON error body of the v2 protocol, with the HTTP status that the
/// one error table (`shamal_error`) gives the gRPC code (a status that
/// claims OK is malformed: 500).
/// A refusal's `WWW-Authenticate` challenge (carried in the status's
/// metadata) becomes the response's header.
pub(crate) fn error_response(status: &Status) -> Response {
    let http_status = shamal_error::ErrorKind::from_code(status.code()).http_status();
    let mut response = (http_status, Json(json!({ "error": status.message() }))).into_response();
    if let Some(challenge) = status.metadata().get("www-authenticate")
        && let Ok(value) = axum::http::HeaderValue::from_bytes(challenge.as_bytes())
    {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

/// The call context of an HTTP request: its id (the caller's
/// `x-request-id` when sane, a fresh one otherwise) and the router's
/// default deadline (HTTP callers cannot send one). Headers are left empty:
/// the handlers that forward them (inference) set them.
pub(crate) fn context(core: &RoutingCore, headers: &HeaderMap) -> CallContext {
    let request_id = shamal_rpc::checked_request_id(
        headers
            .get(shamal_rpc::REQUEST_ID_HEADER)
            .and_then(|value| value.to_str().ok()),
    );
    CallContext {
        request_id,
        deadline: core.deadline(Instant::now(), None),
        protocol: "http",
        headers: HeaderMap::new(),
        peer: None,
    }
}

/// Decodes an inference body (JSON, or JSON header plus binary tensors);
/// the error response when it is malformed.
#[allow(clippy::result_large_err)]
pub(crate) fn decode_infer_body(
    model: &str,
    version: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(ModelInferRequest, OutputEncoding), Response> {
    if let Some(encoding) = headers.get(header::CONTENT_ENCODING)
        && encoding.as_bytes() != b"identity"
    {
        let response = (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Json(json!({"error": "compressed request bodies are not supported; send them uncompressed"})),
        )
            .into_response();
        return Err(response);
    }
    let header_length = match headers.get(HEADER_LENGTH) {
        None => None,
        Some(value) => match value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<usize>().ok())
        {
            Some(length) => Some(length),
            None => {
                let status = Status::invalid_argument(
                    "Inference-Header-Content-Length must be a byte count",
                );
                return Err(error_response(&status));
            }
        },
    };
    parse_infer_request(model, version, body, header_length)
        .map_err(|bad| error_response(&Status::invalid_argument(bad.0)))
}

/// An inference response as the v2 HTTP endpoints answer it: JSON, or a
/// JSON header plus binary outputs (with its length in
/// `Inference-Header-Content-Length`) when `encoding` asks for binary data.
/// A response that cannot be rendered is the worker's fault: 500.
pub(crate) fn infer_response(response: ModelInferResponse, encoding: &OutputEncoding) -> Response {
    match render_infer_response(response, encoding) {
        Ok((body, None)) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Ok((body, Some(length))) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                (
                    header::HeaderName::from_static(HEADER_LENGTH),
                    length.to_string(),
                ),
            ],
            body,
        )
            .into_response(),
        Err(message) => error_response(&Status::internal(format!(
            "malformed worker response: {message}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    /// The router and the registry once disagreed on FAILED_PRECONDITION
    /// (400 here, 422 there); both now take the one table's 400, which is
    /// what Triton answers for a request the server refuses.
    #[test]
    fn http_statuses_follow_the_error_table() {
        let cases = [
            (Code::FailedPrecondition, 400),
            (Code::InvalidArgument, 400),
            (Code::NotFound, 404),
            (Code::ResourceExhausted, 429),
            (Code::Cancelled, 499),
            (Code::Internal, 500),
            (Code::Unimplemented, 501),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
            // An error that claims OK is malformed.
            (Code::Ok, 500),
        ];
        for (code, http) in cases {
            let response = error_response(&Status::new(code, "m"));
            assert_eq!(response.status().as_u16(), http, "{code:?}");
        }
    }
}
