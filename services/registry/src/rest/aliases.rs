//! `/v1/models/{name}/aliases`: list, set and delete aliases.

use axum::Json;
use axum::extract::State;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::api_error::ApiResult;
use super::extract::{Actor, ApiJson, PathParams};
use super::reply::Items;
use crate::error::ErrorBody;
use crate::model::*;

/// Input of an alias move.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetAliasRequest {
    /// The version the alias points to from now on.
    pub version: u64,
}

/// List aliases
#[utoipa::path(
    get,
    path = "/v1/models/{name}/aliases",
    tag = "aliases",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "The model's aliases, by name", body = Items<Alias>),
        (status = 404, description = "No such model", body = ErrorBody),
    )
)]
pub async fn list_aliases(
    State(state): State<AppState>,
    params: PathParams,
) -> ApiResult<Json<Items<Alias>>> {
    Ok(Json(Items {
        items: state.registry.list_aliases(params.name()).await?,
    }))
}

/// Set an alias
///
/// Points an alias (e.g. `production`) at a version, creating it if need
/// be. The version must not be archived or failed.
#[utoipa::path(
    put,
    path = "/v1/models/{name}/aliases/{alias}",
    tag = "aliases",
    params(
        ("name" = String, Path, description = "Model name"),
        ("alias" = String, Path, pattern = "^[a-z0-9_-]{1,63}$", description = "Alias: a-z, 0-9, `_`, `-`, not only digits"),
    ),
    request_body = SetAliasRequest,
    responses(
        (status = 200, description = "The alias", body = Alias),
        (status = 400, description = "Invalid alias or body; or the version is archived or failed (`failed_precondition`)", body = ErrorBody),
        (status = 404, description = "No such model or version", body = ErrorBody),
    )
)]
pub async fn set_alias(
    State(state): State<AppState>,
    params: PathParams,
    Actor(actor): Actor,
    ApiJson(input): ApiJson<SetAliasRequest>,
) -> ApiResult<Json<Alias>> {
    Ok(Json(
        state
            .registry
            .set_alias(params.name(), params.get("alias"), input.version, &actor)
            .await?,
    ))
}

/// Delete an alias
#[utoipa::path(
    delete,
    path = "/v1/models/{name}/aliases/{alias}",
    tag = "aliases",
    params(
        ("name" = String, Path, description = "Model name"),
        ("alias" = String, Path, description = "Alias"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such alias", body = ErrorBody),
    )
)]
pub async fn delete_alias(
    State(state): State<AppState>,
    params: PathParams,
    Actor(actor): Actor,
) -> ApiResult<StatusCode> {
    state
        .registry
        .delete_alias(params.name(), params.get("alias"), &actor)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
