//! REST + JSON API for release managers (placeholder until the full API
//! lands).

use std::sync::Arc;

use crate::registry::ModelRegistry;

pub fn router(
    _registry: Arc<ModelRegistry>,
    _max_artifact_bytes: u64,
    _metrics: &shamal_telemetry::Registry,
) -> axum::Router {
    axum::Router::new()
}
