//! `/v1/models/{name}/versions`: register, list, read, archive and retry
//! versions.

use axum::Json;
use axum::extract::State;
use axum::response::Response;

use super::AppState;
use super::api_error::ApiResult;
use super::extract::{Actor, ApiJson, PageQuery, PathParams};
use super::reply::{created, segment};
use crate::error::ErrorBody;
use crate::model::*;

/// List versions
///
/// A model's versions in version order, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/models/{name}/versions",
    tag = "versions",
    params(
        ("name" = String, Path, description = "Model name"),
        PageQuery,
    ),
    responses(
        (status = 200, description = "A page of versions", body = Page<Version>),
        (status = 400, description = "Bad page_size or page_token", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
    )
)]
pub async fn list_versions(
    State(state): State<AppState>,
    params: PathParams,
    query: PageQuery,
) -> ApiResult<Json<Page<Version>>> {
    Ok(Json(
        state
            .registry
            .list_versions(params.name(), query.page_size, query.page_token.as_deref())
            .await?,
    ))
}

/// Register a version
///
/// Records the next version of a model for an artifact uploaded before
/// with `PUT /v1/artifacts/{sha256}`; the model is created when it does
/// not exist (unless `create_model` is false). The version starts
/// `registered` and becomes `ready` once a worker has loaded it.
#[utoipa::path(
    post,
    path = "/v1/models/{name}/versions",
    tag = "versions",
    params(("name" = String, Path, description = "Model name")),
    request_body = NewVersion,
    responses(
        (status = 201, description = "Registered", body = Version,
            headers(("location" = String, description = "URL of the version"))),
        (status = 400, description = "Invalid name, digest, format or metadata; or the artifact has not been uploaded (`failed_precondition`)", body = ErrorBody),
        (status = 404, description = "No such model and `create_model` is false", body = ErrorBody),
        (status = 409, description = "Another version was registered at the same time; retry", body = ErrorBody),
    )
)]
pub async fn register_version(
    State(state): State<AppState>,
    params: PathParams,
    Actor(actor): Actor,
    ApiJson(input): ApiJson<NewVersion>,
) -> ApiResult<Response> {
    let version = state
        .registry
        .register_version(params.name(), input, &actor)
        .await?;
    Ok(created(
        format!(
            "/v1/models/{}/versions/{}",
            segment(&version.model),
            version.version
        ),
        version,
    ))
}

/// Get a version
#[utoipa::path(
    get,
    path = "/v1/models/{name}/versions/{version}",
    tag = "versions",
    params(
        ("name" = String, Path, description = "Model name"),
        ("version" = u64, Path, description = "Version number"),
    ),
    responses(
        (status = 200, description = "The version", body = Version),
        (status = 400, description = "The version is not a number", body = ErrorBody),
        (status = 404, description = "No such model or version", body = ErrorBody),
    )
)]
pub async fn get_version(
    State(state): State<AppState>,
    params: PathParams,
) -> ApiResult<Json<Version>> {
    let version = params.version()?;
    Ok(Json(
        state.registry.get_version(params.name(), version).await?,
    ))
}

/// Archive a version
///
/// Retires a version: workers unload it and no rollout may use it.
/// Refused while an alias or a rollout in progress uses it. Archiving an
/// archived version changes nothing.
#[utoipa::path(
    post,
    path = "/v1/models/{name}/versions/{version}/archive",
    tag = "versions",
    params(
        ("name" = String, Path, description = "Model name"),
        ("version" = u64, Path, description = "Version number"),
    ),
    responses(
        (status = 200, description = "The archived version", body = Version),
        (status = 400, description = "The version is not a number; or an alias or the rollout uses the version (`failed_precondition`)", body = ErrorBody),
        (status = 404, description = "No such model or version", body = ErrorBody),
    )
)]
pub async fn archive_version(
    State(state): State<AppState>,
    params: PathParams,
    Actor(actor): Actor,
) -> ApiResult<Json<Version>> {
    let version = params.version()?;
    Ok(Json(
        state
            .registry
            .archive_version(params.name(), version, &actor)
            .await?,
    ))
}

/// Retry a failed version
///
/// Forgets the version's failed placements and sets it back to
/// `registered`, so workers load it again. Only failed versions can be
/// retried.
#[utoipa::path(
    post,
    path = "/v1/models/{name}/versions/{version}/retry",
    tag = "versions",
    params(
        ("name" = String, Path, description = "Model name"),
        ("version" = u64, Path, description = "Version number"),
    ),
    responses(
        (status = 200, description = "The version, registered again", body = Version),
        (status = 400, description = "The version is not a number; or the version is not failed (`failed_precondition`)", body = ErrorBody),
        (status = 404, description = "No such model or version", body = ErrorBody),
    )
)]
pub async fn retry_version(
    State(state): State<AppState>,
    params: PathParams,
    Actor(actor): Actor,
) -> ApiResult<Json<Version>> {
    let version = params.version()?;
    Ok(Json(
        state
            .registry
            .retry_version(params.name(), version, &actor)
            .await?,
    ))
}
