//! `/v1/models`: list, create and read models.

use axum::Json;
use axum::extract::State;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::api_error::ApiResult;
use super::extract::{Actor, ApiJson, PageQuery, PathParams};
use super::reply::{created, segment};
use crate::error::ErrorBody;
use crate::model::*;

/// Input of model creation.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateModel {
    /// 1-128 characters of letters, digits, `_`, `-` and `.`, not starting
    /// with `.`.
    #[schema(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")]
    pub name: String,
    #[serde(default)]
    pub description: String,
}

/// A model with its aliases and its rollout (null when it never had one).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelDetail {
    pub model: Model,
    pub aliases: Vec<Alias>,
    pub rollout: Option<Rollout>,
}

/// List models
///
/// Models in name order, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "models",
    params(PageQuery),
    responses(
        (status = 200, description = "A page of models", body = Page<Model>),
        (status = 400, description = "Bad page_size or page_token", body = ErrorBody),
    )
)]
pub async fn list_models(
    State(state): State<AppState>,
    query: PageQuery,
) -> ApiResult<Json<Page<Model>>> {
    Ok(Json(
        state
            .registry
            .list_models(query.page_size, query.page_token.as_deref())
            .await?,
    ))
}

/// Create a model
///
/// Registering a version creates its model on the way, so this is only
/// needed to give a model a description before its first version.
#[utoipa::path(
    post,
    path = "/v1/models",
    tag = "models",
    request_body = CreateModel,
    responses(
        (status = 201, description = "Created", body = Model,
            headers(("location" = String, description = "URL of the model"))),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 409, description = "A model of that name exists (`already_exists`)", body = ErrorBody),
    )
)]
pub async fn create_model(
    State(state): State<AppState>,
    Actor(actor): Actor,
    ApiJson(input): ApiJson<CreateModel>,
) -> ApiResult<Response> {
    let model = state
        .registry
        .create_model(&input.name, &input.description, &actor)
        .await?;
    Ok(created(
        format!("/v1/models/{}", segment(&model.name)),
        model,
    ))
}

/// Get a model
///
/// The model with its aliases and rollout.
#[utoipa::path(
    get,
    path = "/v1/models/{name}",
    tag = "models",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "The model", body = ModelDetail),
        (status = 404, description = "No such model", body = ErrorBody),
    )
)]
pub async fn get_model(
    State(state): State<AppState>,
    params: PathParams,
) -> ApiResult<Json<ModelDetail>> {
    let name = params.name();
    let model = state.registry.get_model(name).await?;
    let aliases = state.registry.list_aliases(name).await?;
    let rollout = state.registry.get_rollout(name).await?;
    Ok(Json(ModelDetail {
        model,
        aliases,
        rollout,
    }))
}
