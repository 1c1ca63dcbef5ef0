//! REST + JSON API for release managers, its OpenAPI document
//! (`/openapi.json`) and a small web UI (`/`).
//!
//! Every error, including malformed requests that axum would otherwise
//! answer in plain text, is a JSON [`ErrorBody`](crate::error::ErrorBody)
//! naming the offending field where there is one. Writes are attributed to
//! the `x-shamal-actor` header (until OIDC lands).

mod api_error;
mod extract;
mod handlers;
mod metrics;
mod openapi;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};

pub use api_error::ApiError;
pub use extract::ACTOR_HEADER;
pub use handlers::{
    ArtifactUploaded, CreateModel, Items, ModelDetail, RevisionRequest, RollbackRequest,
    SetAliasRequest, ShiftRequest,
};
pub use openapi::openapi;

use crate::registry::ModelRegistry;

/// Largest JSON request body (artifacts have their own limit).
pub const MAX_JSON_BYTES: usize = 1024 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct AppState {
    pub registry: Arc<ModelRegistry>,
    pub max_artifact_bytes: u64,
    pub openapi_json: bytes::Bytes,
}

/// The REST API, OpenAPI document and web UI, with request metrics
/// registered on `metrics`.
pub fn router(
    registry: Arc<ModelRegistry>,
    max_artifact_bytes: u64,
    metrics: &shamal_telemetry::Registry,
) -> Router {
    let openapi_json = openapi().to_pretty_json().unwrap_or_else(|error| {
        tracing::error!(%error, "cannot serialise the OpenAPI document");
        "{}".to_owned()
    });
    let state = AppState {
        registry,
        max_artifact_bytes,
        openapi_json: bytes::Bytes::from(openapi_json),
    };
    let http_metrics = metrics::HttpMetrics::new(metrics);
    use handlers as h;
    Router::new()
        .route("/", get(h::ui))
        .route("/openapi.json", get(h::openapi_document))
        .route("/v1/models", get(h::list_models).post(h::create_model))
        .route("/v1/models/{name}", get(h::get_model))
        .route(
            "/v1/models/{name}/versions",
            get(h::list_versions).post(h::register_version),
        )
        .route("/v1/models/{name}/versions/{version}", get(h::get_version))
        .route(
            "/v1/models/{name}/versions/{version}/archive",
            post(h::archive_version),
        )
        .route(
            "/v1/models/{name}/versions/{version}/retry",
            post(h::retry_version),
        )
        .route(
            "/v1/artifacts/{sha256}",
            put(h::put_artifact)
                .get(h::get_artifact)
                .head(h::head_artifact)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/models/{name}/aliases", get(h::list_aliases))
        .route(
            "/v1/models/{name}/aliases/{alias}",
            put(h::set_alias).delete(h::delete_alias),
        )
        .route(
            "/v1/models/{name}/rollout",
            get(h::rollout_status).post(h::start_rollout),
        )
        .route("/v1/models/{name}/rollout/policy", put(h::set_policy))
        .route("/v1/models/{name}/rollout/shift", post(h::shift))
        .route("/v1/models/{name}/rollout/promote", post(h::promote))
        .route("/v1/models/{name}/rollout/rollback", post(h::rollback))
        .route("/v1/models/{name}/rollout/pause", post(h::pause))
        .route("/v1/models/{name}/rollout/resume", post(h::resume))
        .route("/v1/models/{name}/rollout/history", get(h::history))
        .route("/v1/models/{name}/placements", get(h::list_placements))
        .route(
            "/v1/models/{name}/placement",
            get(h::get_placement).put(h::set_placement),
        )
        .route("/v1/workers", get(h::list_workers))
        .route(
            "/v1/models/{name}/residency",
            get(h::get_model_residency).put(h::set_model_residency),
        )
        .route("/v1/residency/tenants", get(h::list_tenant_policies))
        .route(
            "/v1/residency/tenants/{tenant}",
            get(h::get_tenant_policy)
                .put(h::set_tenant_policy)
                .delete(h::delete_tenant_policy),
        )
        .route("/v1/residency/history", get(h::residency_history))
        .fallback(h::no_route)
        .method_not_allowed_fallback(h::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_JSON_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            http_metrics,
            metrics::track,
        ))
        .with_state(state)
}
