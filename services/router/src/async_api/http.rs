//! The async API's HTTP front door: `POST
//! /v2/models/{m}[/versions/{v}]/infer/async` and `GET /v2/async/{id}`,
//! merged into the router's v2 HTTP routes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;
use tonic::Status;

use super::{AsyncApi, Fetched, not_configured};
use crate::http::common::{ModelPath, context, decode_infer_body, error_response, infer_response};
use crate::http::json::OutputEncoding;
use crate::routing::RoutingCore;

/// Response header naming the state of a fetched job.
pub const STATE_HEADER: &str = "x-shamal-async-state";
/// Response header naming the worker that ran a finished job.
pub const WORKER_HEADER: &str = "x-shamal-async-worker";
/// Response header with the deliveries a finished job took.
pub const ATTEMPTS_HEADER: &str = "x-shamal-async-attempts";

/// State of the async HTTP routes.
#[derive(Clone)]
pub struct AsyncHttp {
    pub core: Arc<RoutingCore>,
    pub api: Option<Arc<AsyncApi>>,
}

/// `POST /v2/models/{m}[/versions/{v}]/infer/async` and
/// `GET /v2/async/{id}`.
pub fn routes(state: AsyncHttp) -> Router {
    use axum::routing::{get, post};
    Router::new()
        .route("/v2/models/{model}/infer/async", post(submit_http))
        .route(
            "/v2/models/{model}/versions/{version}/infer/async",
            post(submit_http),
        )
        .route("/v2/async/{id}", get(fetch_http))
        .with_state(state)
}

async fn submit_http(
    State(state): State<AsyncHttp>,
    Path(ModelPath { model, version }): Path<ModelPath>,
    principal: Option<axum::Extension<shamal_auth::Principal>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let principal = principal
        .map(|axum::Extension(principal)| principal)
        .unwrap_or_default();
    let Some(api) = &state.api else {
        return error_response(&not_configured());
    };
    let (request, _encoding) = match decode_infer_body(&model, &version, &headers, body) {
        Ok(decoded) => decoded,
        Err(response) => return response,
    };
    let mut context = context(&state.core, &headers);
    // Residency and sticky-routing headers travel along.
    context.headers = headers;
    match api.submit(request, &context, &principal).await {
        Ok(id) => {
            let status_url = format!("/v2/async/{id}");
            let mut response = (
                StatusCode::ACCEPTED,
                Json(json!({ "id": id.as_str(), "status_url": status_url })),
            )
                .into_response();
            if let Ok(location) = HeaderValue::from_str(&status_url) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response
        }
        Err(status) => error_response(&status),
    }
}

fn query_flag(query: &HashMap<String, String>, name: &str) -> Result<bool, Status> {
    match query.get(name).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(other) => Err(Status::invalid_argument(format!(
            "query parameter '{name}' must be true or false, not '{other}'"
        ))),
    }
}

async fn fetch_http(
    State(state): State<AsyncHttp>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(api) = &state.api else {
        return error_response(&not_configured());
    };
    let wait = match query.get("wait_ms").map(|text| text.trim().parse::<u64>()) {
        None => Duration::ZERO,
        Some(Ok(ms)) => Duration::from_millis(ms),
        Some(Err(_)) => {
            return error_response(&Status::invalid_argument(
                "query parameter 'wait_ms' must be a number of milliseconds",
            ));
        }
    };
    let binary = match query_flag(&query, "binary_data_output") {
        Ok(binary) => binary,
        Err(status) => return error_response(&status),
    };
    let fetched = match api.fetch(&id, wait).await {
        Ok(fetched) => fetched,
        Err(status) => return error_response(&status),
    };
    let (mut response, state_label, worker, attempts) = match fetched {
        Fetched::Pending {
            running,
            worker,
            attempts,
        } => {
            let label = if running { "running" } else { "queued" };
            let response = (
                StatusCode::ACCEPTED,
                Json(json!({ "id": id, "status": label })),
            )
                .into_response();
            (response, label, worker, attempts)
        }
        Fetched::Done {
            outcome,
            worker,
            attempts,
        } => {
            let response = match outcome {
                Ok(inference) => infer_response(inference, &OutputEncoding::uniform(binary)),
                Err(status) => error_response(&status),
            };
            (response, "done", worker, attempts)
        }
    };
    let headers = response.headers_mut();
    headers.insert(STATE_HEADER, HeaderValue::from_static(state_label));
    if !worker.is_empty()
        && let Ok(value) = HeaderValue::from_str(&worker)
    {
        headers.insert(WORKER_HEADER, value);
    }
    if attempts > 0 {
        headers.insert(ATTEMPTS_HEADER, HeaderValue::from(attempts));
    }
    response
}
