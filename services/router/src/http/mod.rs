//! The router's HTTP/JSON front door (KServe v2 REST), served by axum over
//! the same routing core as gRPC: the synchronous API here, the async
//! inference routes merged in from `async_api`, and what both share
//! (`common`: errors, call context, inference bodies; `json`: the v2 JSON
//! and binary tensor encoding).

pub(crate) mod common;
pub mod json;
pub mod proto_json;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tonic::Status;

use self::common::{ModelPath, context, decode_infer_body, error_response, infer_response};
use self::proto_json::message_json;
use crate::async_api::{AsyncApi, AsyncHttp};
use crate::routing::RoutingCore;

type AppState = Arc<RoutingCore>;

/// Builds the v2 HTTP routes.
pub fn router(core: Arc<RoutingCore>, max_body_bytes: usize) -> Router {
    router_with_async(core, None, max_body_bytes)
}

/// The v2 HTTP routes plus the async inference ones (answering 501 when
/// `async_api` is `None`).
pub fn router_with_async(
    core: Arc<RoutingCore>,
    async_api: Option<Arc<AsyncApi>>,
    max_body_bytes: usize,
) -> Router {
    let async_routes = crate::async_api::routes(AsyncHttp {
        core: core.clone(),
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
        .with_state(core.clone())
        .merge(async_routes)
        // After routing (a route layer), so that the matched route names
        // the policy (`auth::http_access`).
        .route_layer(middleware::from_fn_with_state(
            core.auth().clone(),
            crate::auth::http_layer,
        ))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn(request_id_layer))
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

fn json_or_error(result: Result<Value, proto_json::RenderError>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(error) => error_response(&Status::internal(error.to_string())),
    }
}

async fn server_ready(State(core): State<AppState>) -> StatusCode {
    if core.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn server_metadata(State(core): State<AppState>) -> Response {
    let metadata = core.server_metadata();
    Json(json!({
        "name": metadata.name,
        "version": metadata.version,
        "extensions": metadata.extensions,
    }))
    .into_response()
}

async fn model_metadata(
    State(core): State<AppState>,
    Path(ModelPath { model, version }): Path<ModelPath>,
    headers: HeaderMap,
) -> Response {
    let context = context(&core, &headers);
    match core.model_metadata(&model, &version, &context).await {
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
    State(core): State<AppState>,
    Path(ModelPath { model, version }): Path<ModelPath>,
    headers: HeaderMap,
) -> Response {
    let context = context(&core, &headers);
    match core.model_ready(&model, &version, &context).await {
        Ok(true) => StatusCode::OK.into_response(),
        Ok(false) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Err(status) => error_response(&status),
    }
}

async fn model_config(
    State(core): State<AppState>,
    Path(ModelPath { model, version }): Path<ModelPath>,
    headers: HeaderMap,
) -> Response {
    let context = context(&core, &headers);
    match core.model_config(&model, &version, &context).await {
        Ok(response) => json_or_error(message_json(
            &response.config.unwrap_or_default(),
            "inference.ModelConfig",
        )),
        Err(status) => error_response(&status),
    }
}

async fn statistics_response(
    core: &RoutingCore,
    model: &str,
    version: &str,
    headers: &HeaderMap,
) -> Response {
    let context = context(core, headers);
    match core.statistics(model, version, &context).await {
        Ok(response) => json_or_error(message_json(&response, "inference.ModelStatisticsResponse")),
        Err(status) => error_response(&status),
    }
}

async fn all_statistics(State(core): State<AppState>, headers: HeaderMap) -> Response {
    statistics_response(&core, "", "", &headers).await
}

async fn model_statistics(
    State(core): State<AppState>,
    Path(ModelPath { model, version }): Path<ModelPath>,
    headers: HeaderMap,
) -> Response {
    statistics_response(&core, &model, &version, &headers).await
}

async fn repository_index(
    State(core): State<AppState>,
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
    let context = context(&core, &headers);
    match core.repository_index(ready_only, &context).await {
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

async fn infer(
    State(core): State<AppState>,
    Path(ModelPath { model, version }): Path<ModelPath>,
    peer: Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut context = context(&core, &headers);
    context.peer = peer.0;
    let (request, encoding) = match decode_infer_body(&model, &version, &headers, body) {
        Ok(decoded) => decoded,
        Err(response) => return response,
    };
    // The headers travel along: a rollout's sticky key and the request's
    // data-residency policy may be there.
    context.headers = headers;
    match core.infer(request, context).await {
        Ok(response) => infer_response(response, &encoding),
        Err(status) => error_response(&status),
    }
}

/// The identity in the caller's client certificate, when it sent one over
/// mTLS (for the inference pipeline's authentication step).
struct Peer(Option<shamal_tls::PeerIdentity>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _: &S,
    ) -> Result<Peer, Self::Rejection> {
        Ok(Peer(shamal_tls::peer_identity(&parts.extensions)))
    }
}
