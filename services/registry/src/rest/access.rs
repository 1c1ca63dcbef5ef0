//! `/v1/models/{name}/access`: a model limited to listed tenants or
//! groups.

use axum::Json;
use axum::extract::State;

use super::AppState;
use super::api_error::ApiResult;
use super::extract::{Actor, ApiJson, PathParams};
use crate::error::ErrorBody;
use crate::model::*;

/// Get a model's access limit
///
/// The tenants and groups whose callers may call the model (both empty:
/// no limit beyond the roles).
#[utoipa::path(
    get,
    path = "/v1/models/{name}/access",
    tag = "access",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "The model's access limit", body = ModelAccess),
        (status = 404, description = "No such model", body = ErrorBody),
    )
)]
pub async fn get_model_access(
    State(state): State<AppState>,
    params: PathParams,
) -> ApiResult<Json<ModelAccess>> {
    Ok(Json(state.registry.get_model_access(params.name()).await?))
}

/// Set a model's access limit
///
/// Replaces the tenants and groups whose callers may call the model; a
/// caller passes when its token's tenant claim names a listed tenant or
/// its groups claim a listed group. Both lists empty lift the limit.
/// Admins and service identities are never limited. Routers apply it as
/// soon as the change reaches them (Watch).
#[utoipa::path(
    put,
    path = "/v1/models/{name}/access",
    tag = "access",
    params(("name" = String, Path, description = "Model name")),
    request_body = SetAccess,
    responses(
        (status = 200, description = "The model's access limit", body = ModelAccess),
        (status = 400, description = "Invalid tenant or group (named in `error.field`, e.g. `allowed_groups[1]`)", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
    )
)]
pub async fn set_model_access(
    State(state): State<AppState>,
    params: PathParams,
    Actor(actor): Actor,
    ApiJson(input): ApiJson<SetAccess>,
) -> ApiResult<Json<ModelAccess>> {
    Ok(Json(
        state
            .registry
            .set_model_access(params.name(), input, &actor)
            .await?,
    ))
}
