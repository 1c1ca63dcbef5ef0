//! `/v1/models/{name}/residency` and `/v1/residency/...`: data residency
//! of models and tenants, and its history.

use axum::Json;
use axum::extract::State;
use http::StatusCode;

use super::AppState;
use super::api_error::ApiResult;
use super::extract::{Actor, ApiJson, PageQuery, PathParams};
use super::reply::Items;
use crate::error::ErrorBody;
use crate::model::*;

/// Get a model's residency
///
/// The regions the model's requests may be processed in (empty: no
/// model-level restriction).
#[utoipa::path(
    get,
    path = "/v1/models/{name}/residency",
    tag = "residency",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, description = "The model's residency", body = ModelResidency),
        (status = 404, description = "No such model", body = ErrorBody),
    )
)]
pub async fn get_model_residency(
    State(state): State<AppState>,
    params: PathParams,
) -> ApiResult<Json<ModelResidency>> {
    Ok(Json(
        state.registry.get_model_residency(params.name()).await?,
    ))
}

/// Set a model's residency
///
/// Replaces the regions the model's requests may be processed in; an
/// empty list lifts the model-level restriction. Routers apply it as soon
/// as the change reaches them (Watch).
#[utoipa::path(
    put,
    path = "/v1/models/{name}/residency",
    tag = "residency",
    params(("name" = String, Path, description = "Model name")),
    request_body = SetResidency,
    responses(
        (status = 200, description = "The model's residency", body = ModelResidency),
        (status = 400, description = "Invalid region (named in `error.field`, e.g. `allowed_regions[1]`)", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
    )
)]
pub async fn set_model_residency(
    State(state): State<AppState>,
    params: PathParams,
    Actor(actor): Actor,
    ApiJson(input): ApiJson<SetResidency>,
) -> ApiResult<Json<ModelResidency>> {
    Ok(Json(
        state
            .registry
            .set_model_residency(params.name(), input.allowed_regions, &actor)
            .await?,
    ))
}

/// List tenant policies
///
/// Every tenant's residency policy, by tenant.
#[utoipa::path(
    get,
    path = "/v1/residency/tenants",
    tag = "residency",
    responses((status = 200, description = "The tenant policies", body = Items<TenantPolicy>))
)]
pub async fn list_tenant_policies(
    State(state): State<AppState>,
) -> ApiResult<Json<Items<TenantPolicy>>> {
    Ok(Json(Items {
        items: state.registry.list_tenant_policies().await?,
    }))
}

/// Get a tenant policy
#[utoipa::path(
    get,
    path = "/v1/residency/tenants/{tenant}",
    tag = "residency",
    params(("tenant" = String, Path, pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description = "Tenant name")),
    responses(
        (status = 200, description = "The tenant's policy", body = TenantPolicy),
        (status = 400, description = "Invalid tenant name", body = ErrorBody),
        (status = 404, description = "The tenant has no policy", body = ErrorBody),
    )
)]
pub async fn get_tenant_policy(
    State(state): State<AppState>,
    params: PathParams,
) -> ApiResult<Json<TenantPolicy>> {
    Ok(Json(
        state
            .registry
            .get_tenant_policy(params.get("tenant"))
            .await?,
    ))
}

/// Set a tenant policy
///
/// Creates or replaces the regions a tenant's requests may be processed
/// in (at least one; delete the policy to lift it).
#[utoipa::path(
    put,
    path = "/v1/residency/tenants/{tenant}",
    tag = "residency",
    params(("tenant" = String, Path, pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description = "Tenant name")),
    request_body = SetResidency,
    responses(
        (status = 200, description = "The tenant's policy", body = TenantPolicy),
        (status = 400, description = "Invalid tenant or region (named in `error.field`)", body = ErrorBody),
    )
)]
pub async fn set_tenant_policy(
    State(state): State<AppState>,
    params: PathParams,
    Actor(actor): Actor,
    ApiJson(input): ApiJson<SetResidency>,
) -> ApiResult<Json<TenantPolicy>> {
    Ok(Json(
        state
            .registry
            .set_tenant_policy(params.get("tenant"), input.allowed_regions, &actor)
            .await?,
    ))
}

/// Delete a tenant policy
#[utoipa::path(
    delete,
    path = "/v1/residency/tenants/{tenant}",
    tag = "residency",
    params(("tenant" = String, Path, description = "Tenant name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid tenant name", body = ErrorBody),
        (status = 404, description = "The tenant has no policy", body = ErrorBody),
    )
)]
pub async fn delete_tenant_policy(
    State(state): State<AppState>,
    params: PathParams,
    Actor(actor): Actor,
) -> ApiResult<StatusCode> {
    state
        .registry
        .delete_tenant_policy(params.get("tenant"), &actor)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Residency history
///
/// Every change of a model's residency or a tenant policy, who made it
/// and when, oldest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/residency/history",
    tag = "residency",
    params(PageQuery),
    responses(
        (status = 200, description = "A page of residency changes", body = Page<ResidencyChange>),
        (status = 400, description = "Bad page_size or page_token", body = ErrorBody),
    )
)]
pub async fn residency_history(
    State(state): State<AppState>,
    query: PageQuery,
) -> ApiResult<Json<Page<ResidencyChange>>> {
    Ok(Json(
        state
            .registry
            .residency_history(query.page_size, query.page_token.as_deref())
            .await?,
    ))
}
