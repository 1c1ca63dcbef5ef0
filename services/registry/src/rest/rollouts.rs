//! `/v1/models/{name}/rollout`: the rollout, its analysis, its changes and
//! its history.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::api_error::ApiResult;
use super::extract::{Actor, ApiJson, PageQuery, PathParams};
use crate::error::ErrorBody;
use crate::model::*;

/// Input of a weight shift.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShiftRequest {
    /// The rollout revision the writer last saw.
    pub expected_revision: u64,
    /// The candidate's new share of traffic, in percent.
    #[schema(maximum = 100)]
    pub weight: u32,
}

/// Input of promote, pause and resume.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevisionRequest {
    /// The rollout revision the writer last saw.
    pub expected_revision: u64,
}

/// Input of a rollback.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The rollout revision the writer last saw.
    pub expected_revision: u64,
    /// Why, for the rollout history.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Get the rollout
///
/// The model's rollout with the live canary analysis: per-version request,
/// error and latency figures since the rollout's current revision.
#[utoipa::path(
    get,
    path = "/v1/models/{name}/rollout",
    tag = "rollouts",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "The rollout and its analysis", body = RolloutStatus),
        (status = 404, description = "No such model, or it never had a rollout", body = ErrorBody),
    )
)]
pub async fn rollout_status(
    State(state): State<AppState>,
    params: PathParams,
) -> ApiResult<Json<RolloutStatus>> {
    Ok(Json(state.registry.rollout_status(params.name()).await?))
}

/// Start a rollout
///
/// Canaries `candidate` with `weight`% of traffic, the rest on the stable
/// version (default: the `production` alias). Both must be `ready`.
/// `expected_revision` is the current rollout revision (0 when the model
/// never had a rollout).
#[utoipa::path(
    post,
    path = "/v1/models/{name}/rollout",
    tag = "rollouts",
    params(("name" = String, Path, description = "Model name")),
    request_body = StartRollout,
    responses(
        (status = 200, description = "The new rollout", body = Rollout),
        (status = 400, description = "Invalid field (named in `error.field`); or a rollout is in progress, or a version is not ready (`failed_precondition`)", body = ErrorBody),
        (status = 404, description = "No such model or version", body = ErrorBody),
        (status = 409, description = "`expected_revision` is stale (`conflict`, with `current_revision`)", body = ErrorBody),
    )
)]
pub async fn start_rollout(
    State(state): State<AppState>,
    params: PathParams,
    Actor(actor): Actor,
    ApiJson(input): ApiJson<StartRollout>,
) -> ApiResult<Json<Rollout>> {
    Ok(Json(
        state
            .registry
            .start_rollout(params.name(), input, &actor)
            .await?,
    ))
}

/// Set the traffic policy
///
/// Writes a complete policy: any number of weighted versions (summing to
/// 100), shadow, sticky key and guard rails. The rollout becomes active.
#[utoipa::path(
    put,
    path = "/v1/models/{name}/rollout/policy",
    tag = "rollouts",
    params(("name" = String, Path, description = "Model name")),
    request_body = SetPolicy,
    responses(
        (status = 200, description = "The new rollout", body = Rollout),
        (status = 400, description = "Invalid field (named in `error.field`); or a version is not ready (`failed_precondition`)", body = ErrorBody),
        (status = 404, description = "No such model or version", body = ErrorBody),
        (status = 409, description = "`expected_revision` is stale (`conflict`, with `current_revision`)", body = ErrorBody),
    )
)]
pub async fn set_policy(
    State(state): State<AppState>,
    params: PathParams,
    Actor(actor): Actor,
    ApiJson(input): ApiJson<SetPolicy>,
) -> ApiResult<Json<Rollout>> {
    Ok(Json(
        state
            .registry
            .set_policy(params.name(), input, &actor)
            .await?,
    ))
}

/// Shift traffic
///
/// Changes the candidate's share of traffic.
#[utoipa::path(
    post,
    path = "/v1/models/{name}/rollout/shift",
    tag = "rollouts",
    params(("name" = String, Path, description = "Model name")),
    request_body = ShiftRequest,
    responses(
        (status = 200, description = "The new rollout", body = Rollout),
        (status = 400, description = "Invalid field (named in `error.field`); or no rollout in progress, or it has no single candidate (`failed_precondition`)", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 409, description = "`expected_revision` is stale (`conflict`, with `current_revision`)", body = ErrorBody),
    )
)]
pub async fn shift(
    State(state): State<AppState>,
    params: PathParams,
    Actor(actor): Actor,
    ApiJson(input): ApiJson<ShiftRequest>,
) -> ApiResult<Json<Rollout>> {
    Ok(Json(
        state
            .registry
            .shift(params.name(), input.expected_revision, input.weight, &actor)
            .await?,
    ))
}

/// Promote the candidate
///
/// The candidate takes all traffic and the `production` alias.
#[utoipa::path(
    post,
    path = "/v1/models/{name}/rollout/promote",
    tag = "rollouts",
    params(("name" = String, Path, description = "Model name")),
    request_body = RevisionRequest,
    responses(
        (status = 200, description = "The promoted rollout", body = Rollout),
        (status = 400, description = "Invalid body; or no rollout in progress (`failed_precondition`)", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 409, description = "`expected_revision` is stale (`conflict`, with `current_revision`)", body = ErrorBody),
    )
)]
pub async fn promote(
    State(state): State<AppState>,
    params: PathParams,
    Actor(actor): Actor,
    ApiJson(input): ApiJson<RevisionRequest>,
) -> ApiResult<Json<Rollout>> {
    Ok(Json(
        state
            .registry
            .promote(params.name(), input.expected_revision, &actor)
            .await?,
    ))
}

/// Roll back
///
/// All traffic returns to the stable version.
#[utoipa::path(
    post,
    path = "/v1/models/{name}/rollout/rollback",
    tag = "rollouts",
    params(("name" = String, Path, description = "Model name")),
    request_body = RollbackRequest,
    responses(
        (status = 200, description = "The rolled-back rollout", body = Rollout),
        (status = 400, description = "Invalid body; or no rollout in progress (`failed_precondition`)", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 409, description = "`expected_revision` is stale (`conflict`, with `current_revision`)", body = ErrorBody),
    )
)]
pub async fn rollback(
    State(state): State<AppState>,
    params: PathParams,
    Actor(actor): Actor,
    ApiJson(input): ApiJson<RollbackRequest>,
) -> ApiResult<Json<Rollout>> {
    Ok(Json(
        state
            .registry
            .rollback(
                params.name(),
                input.expected_revision,
                input.reason.as_deref().unwrap_or_default(),
                &actor,
            )
            .await?,
    ))
}

/// Pause
///
/// All traffic to the stable version for now; the weights are kept for
/// resume.
#[utoipa::path(
    post,
    path = "/v1/models/{name}/rollout/pause",
    tag = "rollouts",
    params(("name" = String, Path, description = "Model name")),
    request_body = RevisionRequest,
    responses(
        (status = 200, description = "The paused rollout", body = Rollout),
        (status = 400, description = "Invalid body; or no rollout in progress, or already paused (`failed_precondition`)", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 409, description = "`expected_revision` is stale (`conflict`, with `current_revision`)", body = ErrorBody),
    )
)]
pub async fn pause(
    State(state): State<AppState>,
    params: PathParams,
    Actor(actor): Actor,
    ApiJson(input): ApiJson<RevisionRequest>,
) -> ApiResult<Json<Rollout>> {
    Ok(Json(
        state
            .registry
            .pause(params.name(), input.expected_revision, &actor)
            .await?,
    ))
}

/// Resume
///
/// Back to the weights of a paused rollout.
#[utoipa::path(
    post,
    path = "/v1/models/{name}/rollout/resume",
    tag = "rollouts",
    params(("name" = String, Path, description = "Model name")),
    request_body = RevisionRequest,
    responses(
        (status = 200, description = "The resumed rollout", body = Rollout),
        (status = 400, description = "Invalid body; or no rollout in progress, or not paused (`failed_precondition`)", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 409, description = "`expected_revision` is stale (`conflict`, with `current_revision`)", body = ErrorBody),
    )
)]
pub async fn resume(
    State(state): State<AppState>,
    params: PathParams,
    Actor(actor): Actor,
    ApiJson(input): ApiJson<RevisionRequest>,
) -> ApiResult<Json<Rollout>> {
    Ok(Json(
        state
            .registry
            .resume(params.name(), input.expected_revision, &actor)
            .await?,
    ))
}

/// Rollout history
///
/// Every change of the model's rollout, oldest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/models/{name}/rollout/history",
    tag = "rollouts",
    params(
        ("name" = String, Path, description = "Model name"),
        PageQuery,
    ),
    responses(
        (status = 200, description = "A page of history entries", body = Page<HistoryEntry>),
        (status = 400, description = "Bad page_size or page_token", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
    )
)]
pub async fn history(
    State(state): State<AppState>,
    params: PathParams,
    query: PageQuery,
) -> ApiResult<Json<Page<HistoryEntry>>> {
    Ok(Json(
        state
            .registry
            .history(params.name(), query.page_size, query.page_token.as_deref())
            .await?,
    ))
}
