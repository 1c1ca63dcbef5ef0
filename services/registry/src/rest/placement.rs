//! `/v1/models/{name}/placement`: a model's placement policy and
//! assignment.

use axum::Json;
use axum::extract::State;

use super::AppState;
use super::api_error::ApiResult;
use super::extract::{Actor, ApiJson, PathParams};
use crate::error::ErrorBody;
use crate::model::*;

/// Get a model's placement
///
/// The model's placement policy and, for each active version, its share
/// of traffic, the workers that should hold it, the workers that keep it
/// until its new holders have it ready (make-before-break), and which of
/// them report it ready. In mode `all`, every serving worker that loads a
/// version's format holds it.
#[utoipa::path(
    get,
    path = "/v1/models/{name}/placement",
    tag = "placement",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "The model's placement", body = ModelPlacement),
        (status = 404, description = "No such model", body = ErrorBody),
    )
)]
pub async fn get_placement(
    State(state): State<AppState>,
    params: PathParams,
) -> ApiResult<Json<ModelPlacement>> {
    Ok(Json(state.registry.placement(params.name()).await?))
}

/// Set a model's placement policy
///
/// `all` (the default): every capable worker holds every active version.
/// `weighted`: each active version on workers of its own in every region,
/// in proportion to its share of traffic and at least `min_replicas`
/// (default 1); moves are make-before-break. The assignment is computed at
/// once and follows rollouts, versions and workers from then on.
#[utoipa::path(
    put,
    path = "/v1/models/{name}/placement",
    tag = "placement",
    params(("name" = String, Path, description = "Model name")),
    request_body = SetPlacement,
    responses(
        (status = 200, description = "The model's placement", body = ModelPlacement),
        (status = 400, description = "Invalid mode or min_replicas (named in `error.field`)", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
    )
)]
pub async fn set_placement(
    State(state): State<AppState>,
    params: PathParams,
    Actor(actor): Actor,
    ApiJson(input): ApiJson<SetPlacement>,
) -> ApiResult<Json<ModelPlacement>> {
    Ok(Json(
        state
            .registry
            .set_placement_policy(params.name(), input, &actor)
            .await?,
    ))
}
