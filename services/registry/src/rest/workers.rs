//! `/v1/workers` and `/v1/models/{name}/placements`: the workers and what
//! they hold.

use axum::Json;
use axum::extract::State;

use super::AppState;
use super::api_error::ApiResult;
use super::extract::{PathParams, WorkersQuery};
use super::reply::Items;
use crate::error::ErrorBody;
use crate::model::*;

/// List workers
///
/// The workers that registered with the registry, with their membership
/// state (`serving`, `draining`, `lost`; `gone` only with
/// `include_gone=true`), capacity and last heartbeat.
#[utoipa::path(
    get,
    path = "/v1/workers",
    tag = "workers",
    params(
        ("include_gone" = Option<bool>, Query, description = "Also list workers that left (default false)"),
    ),
    responses(
        (status = 200, description = "The workers, by id", body = Items<WorkerStatus>),
        (status = 400, description = "Bad query parameter", body = ErrorBody),
    )
)]
pub async fn list_workers(
    State(state): State<AppState>,
    query: WorkersQuery,
) -> ApiResult<Json<Items<WorkerStatus>>> {
    Ok(Json(Items {
        items: state.registry.list_workers_in(query.include_gone).await?,
    }))
}

/// List placements
///
/// What each worker holds of the model's versions.
#[utoipa::path(
    get,
    path = "/v1/models/{name}/placements",
    tag = "workers",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "Placements by version and worker", body = Items<Placement>),
        (status = 404, description = "No such model", body = ErrorBody),
    )
)]
pub async fn list_placements(
    State(state): State<AppState>,
    params: PathParams,
) -> ApiResult<Json<Items<Placement>>> {
    state.registry.get_model(params.name()).await?;
    Ok(Json(Items {
        items: state.registry.list_placements(params.name()).await?,
    }))
}
