//! The router's HTTP/JSON front door (KServe v2 REST), served by axum over
//! the same routing core as gRPC.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tonic::Status;

use crate::async_api::{AsyncApi, AsyncHttp};
use crate::frontend::{CallContext, Frontend};
use crate::http_json::{OutputEncoding, message_json, parse_infer_request, render_infer_response};
use shamal_proto::inference::ModelInferRequest;

pub(crate) const HEADER_LENGTH: &str = "inference-header-content-length";

type AppState = Arc<Frontend>;

/// `/v2/models/{model}[/versions/{version}]/...`: one handler serves both
/// forms; no version means the server's choice (the highest ready one).
#[derive(serde::Deserialize)]
pub(crate) struct ModelPath {
    pub model: String,
    #[serde(default)]
    pub version: String,
}

/// Builds the v2 HTTP routes.
pub fn router(frontend: Arc<Frontend>, max_body_bytes: usize) -> Router {
    router_with_async(frontend, None, max_body_bytes)
}

/// The v2 HTTP routes plus the async inference ones (answering 501 when
/// `async_api` is `None`).
pub fn router_with_async(
    frontend: Arc<Frontend>,
    async_api: Option<Arc<AsyncApi>>,
    max_body_bytes: usize,
) -> Router {
    let async_routes = crate::async_api::routes(AsyncHttp {
        frontend: frontend.clone(),
        api: async_api,
    });
    Router::new()
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/stats", get(all_statistics))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{model}/config", get(model_config))
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(model_config),
        )
        .route("/v2/models/{model}/stats", get(model_statistics))
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(model_statistics),
        )
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer))
        .with_state(frontend)
        .merge(async_routes)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn(request_id_layer))
}

/// The JSON error body of the v2 protocol, with the HTTP status that the
/// one error table (`shamal_error`) gives the gRPC code (a status that
/// claims OK is malformed: 500).
pub(crate) fn error_response(status: &Status) -> Response {
    let http_status = shamal_error::ErrorKind::from_code(status.code()).http_status();
    (http_status, Json(json!({ "error": status.message() }))).into_response()
}

/// Gives every request an id (the caller's `x-request-id` when sane, a
/// fresh one otherwise) and echoes it on every response.
async fn request_id_layer(mut request: Request, next: Next) -> Response {
    let id = shamal_rpc::checked_request_id(
        request
            .headers()
            .get(shamal_rpc::REQUEST_ID_HEADER)
            .and_then(|value| value.to_str().ok()),
    );
    let value = HeaderValue::from_str(&id).ok();
    if let Some(value) = &value {
        request
            .headers_mut()
            .insert(shamal_rpc::REQUEST_ID_HEADER, value.clone());
    }
    let mut response = next.run(request).await;
    if let Some(value) = value {
        response
            .headers_mut()
            .insert(shamal_rpc::REQUEST_ID_HEADER, value);
    }
    response
}

pub(crate) fn context(frontend: &Frontend, headers: &HeaderMap) -> CallContext {
    let request_id = shamal_rpc::checked_request_id(
        headers
            .get(shamal_rpc::REQUEST_ID_HEADER)
            .and_then(|value| value.to_str().ok()),
    );
    CallContext {
        request_id,
        deadline: frontend.deadline(Instant::now(), None),
        protocol: "http",
        headers: HeaderMap::new(),
    }
}

fn json_or_error(result: Result<Value, String>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(message) => error_response(&Status::internal(message)),
    }
}

async fn server_ready(State(frontend): State<AppState>) -> StatusCode {
    if frontend.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn server_metadata(State(frontend): State<AppState>) -> Response {
    let metadata = frontend.server_metadata();
    Json(json!({
        "name": metadata.name,
        "version": metadata.version,
        "extensions": metadata.extensions,
    }))
    .into_response()
}

async fn model_metadata(
    State(frontend): State<AppState>,
    Path(ModelPath { model, version }): Path<ModelPath>,
    headers: HeaderMap,
) -> Response {
    let context = context(&frontend, &headers);
    match frontend.model_metadata(&model, &version, &context).await {
        Ok(metadata) => {
            let tensors =
                |tensors: &[shamal_proto::inference::model_metadata_response::TensorMetadata]| {
                    tensors
                    .iter()
                    .map(|tensor| json!({"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}))
                    .collect::<Vec<_>>()
                };
            Json(json!({
                "name": metadata.name,
                "versions": metadata.versions,
                "platform": metadata.platform,
                "inputs": tensors(&metadata.inputs),
                "outputs": tensors(&metadata.outputs),
            }))
            .into_response()
        }
        Err(status) => error_response(&status),
    }
}

async fn model_ready(
    State(frontend): State<AppState>,
    Path(ModelPath { model, version }): Path<ModelPath>,
    headers: HeaderMap,
) -> Response {
    let context = context(&frontend, &headers);
    match frontend.model_ready(&model, &version, &context).await {
        Ok(true) => StatusCode::OK.into_response(),
        Ok(false) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Err(status) => error_response(&status),
    }
}

async fn model_config(
    State(frontend): State<AppState>,
    Path(ModelPath { model, version }): Path<ModelPath>,
    headers: HeaderMap,
) -> Response {
    let context = context(&frontend, &headers);
    match frontend.model_config(&model, &version, &context).await {
        Ok(response) => json_or_error(message_json(
            &response.config.unwrap_or_default(),
            "inference.ModelConfig",
        )),
        Err(status) => error_response(&status),
    }
}

async fn statistics_response(
    frontend: &Frontend,
    model: &str,
    version: &str,
    headers: &HeaderMap,
) -> Response {
    let context = context(frontend, headers);
    match frontend.statistics(model, version, &context).await {
        Ok(response) => json_or_error(message_json(&response, "inference.ModelStatisticsResponse")),
        Err(status) => error_response(&status),
    }
}

async fn all_statistics(State(frontend): State<AppState>, headers: HeaderMap) -> Response {
    statistics_response(&frontend, "", "", &headers).await
}

async fn model_statistics(
    State(frontend): State<AppState>,
    Path(ModelPath { model, version }): Path<ModelPath>,
    headers: HeaderMap,
) -> Response {
    statistics_response(&frontend, &model, &version, &headers).await
}

async fn repository_index(
    State(frontend): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ready_only = if body.is_empty() {
        false
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(value) => value.get("ready").and_then(Value::as_bool).unwrap_or(false),
            Err(error) => {
                return error_response(&Status::invalid_argument(format!(
                    "invalid repository index request: {error}"
                )));
            }
        }
    };
    let context = context(&frontend, &headers);
    match frontend.repository_index(ready_only, &context).await {
        Ok(index) => Json(
            index
                .models
                .iter()
                .map(|entry| {
                    let mut value =
                        json!({"name": entry.name, "version": entry.version, "state": entry.state});
                    if !entry.reason.is_empty() {
                        value["reason"] = Value::String(entry.reason.clone());
                    }
                    value
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(status) => error_response(&status),
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

async fn infer(
    State(frontend): State<AppState>,
    Path(ModelPath { model, version }): Path<ModelPath>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut context = context(&frontend, &headers);
    let (request, encoding) = match decode_infer_body(&model, &version, &headers, body) {
        Ok(decoded) => decoded,
        Err(response) => return response,
    };
    // The headers travel along: a rollout's sticky key and the request's
    // data-residency policy may be there.
    context.headers = headers;
    match frontend.infer(request, &context).await {
        Ok(response) => match render_infer_response(response, &encoding) {
            Ok((body, None)) => {
                ([(header::CONTENT_TYPE, "application/json")], body).into_response()
            }
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
        },
        Err(status) => error_response(&status),
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
