//! REST + JSON API for release managers, its OpenAPI document
//! (`/openapi.json`) and a small web UI (`/`).
//!
//! Every error, including malformed requests that axum would otherwise
//! answer in plain text, is a JSON [`ErrorBody`](crate::error::ErrorBody)
//! naming the offending field where there is one. With auth on, every route
//! is checked against its policy (`crate::auth`) and writes are attributed
//! to the token's subject; with auth off, to the `x-shamal-actor` header.
//!
//! Each resource's handlers, with their OpenAPI annotations and request
//! bodies, live in a file of their own (`models`, `versions`, `artifacts`,
//! `aliases`, `rollouts`, `workers`, `placement`, `residency`, and `meta`
//! for the UI, the document and the fallbacks); `extract` holds the request
//! extractors they share and `reply` the pieces of their answers;
//! `session` is the UI's OIDC login and its cookie sessions.

mod access;
mod admin;
mod aliases;
mod api_error;
mod artifacts;
mod extract;
mod meta;
mod metrics;
mod models;
mod openapi;
mod placement;
mod reply;
mod residency;
mod rollouts;
pub mod session;
mod versions;
mod workers;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};

pub use aliases::SetAliasRequest;
pub use api_error::ApiError;
pub use artifacts::ArtifactUploaded;
pub use extract::ACTOR_HEADER;
pub use models::{CreateModel, ModelDetail};
pub use openapi::openapi;
pub use reply::Items;
pub use rollouts::{RevisionRequest, RollbackRequest, ShiftRequest};

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
/// registered on `metrics`, auth off. Fails only when those metrics are
/// registered there already (one REST API per metrics registry).
pub fn router(
    registry: Arc<ModelRegistry>,
    max_artifact_bytes: u64,
    metrics: &shamal_telemetry::MetricsRegistry,
) -> prometheus::Result<Router> {
    router_with_auth(
        registry,
        max_artifact_bytes,
        metrics,
        shamal_auth::Authenticator::off(),
    )
}

/// Like [`router`], every route checked by `auth` against its policy
/// (`crate::auth::rest_access`).
pub fn router_with_auth(
    registry: Arc<ModelRegistry>,
    max_artifact_bytes: u64,
    metrics: &shamal_telemetry::MetricsRegistry,
    auth: Arc<shamal_auth::Authenticator>,
) -> prometheus::Result<Router> {
    let openapi_json = openapi().to_pretty_json().unwrap_or_else(|error| {
        tracing::error!(%error, "cannot serialise the OpenAPI document");
        "{}".to_owned()
    });
    let state = AppState {
        registry,
        max_artifact_bytes,
        openapi_json: bytes::Bytes::from(openapi_json),
    };
    let http_metrics = metrics::HttpMetrics::new(metrics)?;
    let app = Router::new()
        .route("/", get(meta::ui))
        .route("/openapi.json", get(meta::openapi_document))
        // The web UI's OIDC login (`session`; 404 with OIDC off).
        .route("/login", get(session::login))
        .route(session::CALLBACK_PATH, get(session::callback))
        .route("/session", get(session::session))
        .route("/logout", post(session::logout))
        .route(
            "/v1/models",
            get(models::list_models).post(models::create_model),
        )
        .route("/v1/models/{name}", get(models::get_model))
        .route(
            "/v1/models/{name}/versions",
            get(versions::list_versions).post(versions::register_version),
        )
        .route(
            "/v1/models/{name}/versions/{version}",
            get(versions::get_version),
        )
        .route(
            "/v1/models/{name}/versions/{version}/archive",
            post(versions::archive_version),
        )
        .route(
            "/v1/models/{name}/versions/{version}/retry",
            post(versions::retry_version),
        )
        .route(
            "/v1/artifacts/{sha256}",
            put(artifacts::put_artifact)
                .get(artifacts::get_artifact)
                .head(artifacts::head_artifact)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/models/{name}/aliases", get(aliases::list_aliases))
        .route(
            "/v1/models/{name}/aliases/{alias}",
            put(aliases::set_alias).delete(aliases::delete_alias),
        )
        .route(
            "/v1/models/{name}/rollout",
            get(rollouts::rollout_status).post(rollouts::start_rollout),
        )
        .route(
            "/v1/models/{name}/rollout/policy",
            put(rollouts::set_policy),
        )
        .route("/v1/models/{name}/rollout/shift", post(rollouts::shift))
        .route("/v1/models/{name}/rollout/promote", post(rollouts::promote))
        .route(
            "/v1/models/{name}/rollout/rollback",
            post(rollouts::rollback),
        )
        .route("/v1/models/{name}/rollout/pause", post(rollouts::pause))
        .route("/v1/models/{name}/rollout/resume", post(rollouts::resume))
        .route("/v1/models/{name}/rollout/history", get(rollouts::history))
        .route(
            "/v1/models/{name}/placements",
            get(workers::list_placements),
        )
        .route(
            "/v1/models/{name}/placement",
            get(placement::get_placement).put(placement::set_placement),
        )
        .route("/v1/workers", get(workers::list_workers))
        .route(
            "/v1/models/{name}/access",
            get(access::get_model_access).put(access::set_model_access),
        )
        .route(
            "/v1/models/{name}/residency",
            get(residency::get_model_residency).put(residency::set_model_residency),
        )
        .route(
            "/v1/residency/tenants",
            get(residency::list_tenant_policies),
        )
        .route(
            "/v1/residency/tenants/{tenant}",
            get(residency::get_tenant_policy)
                .put(residency::set_tenant_policy)
                .delete(residency::delete_tenant_policy),
        )
        .route("/v1/residency/history", get(residency::residency_history))
        .route("/v1/admin/rekey", post(admin::rekey))
        // After routing (a route layer), so that the matched route names
        // its policy; unknown routes and methods fall through to the JSON
        // 404 and 405 below.
        .route_layer(axum::middleware::from_fn_with_state(
            auth,
            crate::auth::rest_layer,
        ))
        .fallback(meta::no_route)
        .method_not_allowed_fallback(meta::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_JSON_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            http_metrics,
            metrics::track,
        ))
        .with_state(state);
    Ok(app)
}
