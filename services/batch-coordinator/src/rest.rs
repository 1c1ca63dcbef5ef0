//! The REST + JSON API (for pipelines and release managers) and its
//! OpenAPI document (`/openapi.json`, kept in `docs/batch-openapi.json`).
//!
//! Every error is `{"error": "..."}`, naming the field at fault. With auth
//! on, every route is checked against its policy (`crate::auth`).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shamal_auth::{Authenticator, Principal};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::coordinator::{Coordinator, Submit};
use crate::error::BatchError;
use crate::model::{Job, JobSpec, JobState};

/// Largest JSON request body.
pub const MAX_JSON_BYTES: usize = 1024 * 1024;

/// An error answer.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, naming the field at fault.
    pub error: String,
}

impl IntoResponse for BatchError {
    fn into_response(self) -> Response {
        (
            self.http_status(),
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

/// The body of a submit.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitJobBody {
    pub spec: JobSpec,
    /// Optional idempotency key: a second submit with the same key returns
    /// the first job.
    #[serde(default)]
    pub request_id: String,
}

/// A page of jobs, newest first.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    /// Empty on the last page.
    pub next_page_token: String,
}

/// Filters and paging of the job list.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// 1 to 1000; default 100.
    pub page_size: Option<u32>,
    /// The previous page's `next_page_token`.
    pub page_token: Option<String>,
    /// Only jobs in this state (`QUEUED`, `RUNNING`, `SUCCEEDED`, `FAILED`,
    /// `CANCELLED`).
    pub state: Option<String>,
    /// Only jobs of this model.
    pub model: Option<String>,
}

#[derive(Clone)]
struct AppState {
    coordinator: Arc<Coordinator>,
    openapi_json: Bytes,
}

fn principal(extension: Option<Extension<Principal>>) -> Principal {
    extension
        .map(|Extension(principal)| principal)
        .unwrap_or_default()
}

#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    request_body = SubmitJobBody,
    responses(
        (status = 201, description = "Accepted: planned and queued (or the earlier job of the same request_id)", body = Job),
        (status = 400, description = "A field, the dataset or one of its columns is wrong (named)", body = ErrorBody),
        (status = 403, description = "Another tenant, or a model limited to others", body = ErrorBody),
        (status = 404, description = "Unknown model, version or alias", body = ErrorBody),
        (status = 409, description = "Version not ready, or no region allowed by both the job and the model", body = ErrorBody),
    )
)]
async fn submit_job(
    State(state): State<AppState>,
    caller: Option<Extension<Principal>>,
    body: Bytes,
) -> Result<(StatusCode, Json<Job>), BatchError> {
    let body: SubmitJobBody = serde_json::from_slice(&body)
        .map_err(|error| BatchError::invalid("body", error.to_string()))?;
    let job = state
        .coordinator
        .submit(
            Submit {
                spec: body.spec,
                request_id: body.request_id,
            },
            &principal(caller),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(job)))
}

#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of jobs, newest first", body = JobPage),
        (status = 400, description = "Bad page_size, page_token or state", body = ErrorBody),
    )
)]
async fn list_jobs(
    State(state): State<AppState>,
    caller: Option<Extension<Principal>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobPage>, BatchError> {
    let Query(query) = query.map_err(|error| BatchError::invalid("query", error.body_text()))?;
    let filter = match query.state.as_deref() {
        None | Some("") => None,
        Some(name) => Some(JobState::parse(name).ok_or_else(|| {
            BatchError::invalid(
                "state",
                format!("'{name}' is not QUEUED, RUNNING, SUCCEEDED, FAILED or CANCELLED"),
            )
        })?),
    };
    let caller = principal(caller);
    let (jobs, next_page_token) = state
        .coordinator
        .list(
            query.page_size.unwrap_or(0),
            query.page_token.as_deref().unwrap_or(""),
            filter,
            query.model.as_deref().filter(|model| !model.is_empty()),
        )
        .await?;
    Ok(Json(JobPage {
        jobs: jobs
            .into_iter()
            .filter(|job| state.coordinator.check_tenant(job, &caller).is_ok())
            .collect(),
        next_page_token,
    }))
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job and its progress", body = Job),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
async fn get_job(
    State(state): State<AppState>,
    caller: Option<Extension<Principal>>,
    Path(id): Path<String>,
) -> Result<Json<Job>, BatchError> {
    let job = state.coordinator.get(&id).await?;
    state.coordinator.check_tenant(&job, &principal(caller))?;
    Ok(Json(job))
}

#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled", body = Job),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job has ended already", body = ErrorBody),
    )
)]
async fn cancel_job(
    State(state): State<AppState>,
    caller: Option<Extension<Principal>>,
    Path(id): Path<String>,
) -> Result<Json<Job>, BatchError> {
    Ok(Json(
        state.coordinator.cancel(&id, &principal(caller)).await?,
    ))
}

async fn openapi_document(State(state): State<AppState>) -> Response {
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        state.openapi_json.clone(),
    )
        .into_response()
}

async fn no_route() -> BatchError {
    BatchError::NotFound("no route: see /openapi.json".to_owned())
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Shamal batch API",
        version = "1",
        description = "Batch inference jobs: submit, list, get, cancel. The same service as gRPC \
`shamal.batch.v1.BatchService`. Every error is `{\"error\": \"...\"}` naming the field, column, \
model or regions at fault."
    ),
    paths(submit_job, list_jobs, get_job, cancel_job),
    components(schemas(Job, JobSpec, JobState, SubmitJobBody, JobPage, ErrorBody)),
    tags((name = "jobs", description = "Batch jobs"))
)]
struct ApiDoc;

/// The OpenAPI document of the REST API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The REST API, every route checked by `auth`.
pub fn router(coordinator: Arc<Coordinator>, auth: Arc<Authenticator>) -> Router {
    let openapi_json = Bytes::from(openapi().to_pretty_json().unwrap_or_default());
    let state = AppState {
        coordinator,
        openapi_json,
    };
    Router::new()
        .route("/v1/jobs", post(submit_job).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/openapi.json", get(openapi_document))
        .route_layer(axum::middleware::from_fn_with_state(
            auth,
            crate::auth::rest_layer,
        ))
        .fallback(no_route)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON_BYTES))
        .with_state(state)
}
