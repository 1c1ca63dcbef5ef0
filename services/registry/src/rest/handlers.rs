//! Route handlers, each documented for the OpenAPI document.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::api_error::{ApiError, ApiResult};
use super::extract::{Actor, ApiJson, PageQuery, PathParams, WorkersQuery};
use crate::error::{ErrorBody, RegistryError};
use crate::model::*;

// ----- request and response bodies ---------------------------------------

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

/// A complete (unpaged) list.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Items<T> {
    pub items: Vec<T>,
}

/// A stored artifact.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ArtifactUploaded {
    pub sha256: String,
    pub size_bytes: u64,
}

/// Input of an alias move.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetAliasRequest {
    /// The version the alias points to from now on.
    pub version: u64,
}

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

/// Artifact bytes (any content; the sha256 of the bytes must match the
/// path).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct ArtifactBytes(#[allow(dead_code)] Vec<u8>);

// ----- helpers -------------------------------------------------------------

fn created<T: Serialize>(location: String, body: T) -> Response {
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, value);
    }
    (StatusCode::CREATED, headers, Json(body)).into_response()
}

/// Percent-encodes a path segment for a Location header.
fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

// ----- meta ---------------------------------------------------------------

/// The web UI for release managers.
pub async fn ui() -> Response {
    (
        [
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                 frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Html(include_str!("../ui/index.html")),
    )
        .into_response()
}

/// The OpenAPI document
///
/// This API's OpenAPI 3.1 document, which this reference is generated from.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    operation_id = "get_openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json", body = Object))
)]
pub async fn openapi_document(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi_json.clone(),
    )
        .into_response()
}

pub async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {method} {}", uri.path()),
    )
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not support {method}", uri.path()),
    )
}

// ----- models -------------------------------------------------------------

/// List models
///
/// Models in name order, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "models",
    params(
        ("page_size" = Option<u32>, Query, minimum = 1, maximum = 500, description = "Items per page (default 50)"),
        ("page_token" = Option<String>, Query, description = "`next_page_token` of the previous page"),
    ),
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

// ----- versions -----------------------------------------------------------

/// List versions
///
/// A model's versions in version order, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/models/{name}/versions",
    tag = "versions",
    params(
        ("name" = String, Path, description = "Model name"),
        ("page_size" = Option<u32>, Query, minimum = 1, maximum = 500, description = "Items per page (default 50)"),
        ("page_token" = Option<String>, Query, description = "`next_page_token` of the previous page"),
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
        (status = 400, description = "Invalid name, digest, format or metadata", body = ErrorBody),
        (status = 404, description = "No such model and `create_model` is false", body = ErrorBody),
        (status = 409, description = "Another version was registered at the same time; retry", body = ErrorBody),
        (status = 422, description = "The artifact has not been uploaded (`failed_precondition`)", body = ErrorBody),
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
        (status = 400, description = "The version is not a number", body = ErrorBody),
        (status = 404, description = "No such model or version", body = ErrorBody),
        (status = 422, description = "An alias or the rollout uses the version (`failed_precondition`)", body = ErrorBody),
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
        (status = 400, description = "The version is not a number", body = ErrorBody),
        (status = 404, description = "No such model or version", body = ErrorBody),
        (status = 422, description = "The version is not failed (`failed_precondition`)", body = ErrorBody),
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

// ----- artifacts ------------------------------------------------------------

/// Upload an artifact
///
/// Streams the request body into the content-addressed store. The bytes
/// must hash to the sha256 of the path; a mismatch stores nothing.
/// Uploading an artifact that is already stored succeeds.
#[utoipa::path(
    put,
    path = "/v1/artifacts/{sha256}",
    tag = "artifacts",
    params(("sha256" = String, Path, pattern = "^[0-9a-f]{64}$", description = "Lowercase hex sha256 of the bytes")),
    request_body(content = ArtifactBytes, content_type = "application/octet-stream", description = "The artifact bytes"),
    responses(
        (status = 201, description = "Stored", body = ArtifactUploaded,
            headers(("location" = String, description = "URL of the artifact"))),
        (status = 400, description = "Not a sha256 digest (`invalid_argument`), or the bytes hash to another digest (`digest_mismatch`)", body = ErrorBody),
        (status = 413, description = "Larger than the registry's artifact limit", body = ErrorBody),
    )
)]
pub async fn put_artifact(
    State(state): State<AppState>,
    params: PathParams,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let sha256 = params.get("sha256").to_owned();
    crate::artifacts::validate_sha256("sha256", &sha256)?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let limit = state.max_artifact_bytes;
    let too_large = || {
        ApiError::from(RegistryError::PayloadTooLarge(format!(
            "artifact exceeds the limit of {limit} bytes"
        )))
    };
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large());
    }
    // The registry has a limit of its own; this one is the router's, and
    // also holds for uploads without a Content-Length.
    let exceeded = Arc::new(AtomicBool::new(false));
    let flag = exceeded.clone();
    let mut received: u64 = 0;
    let stream = body
        .into_data_stream()
        .map(move |chunk| {
            let chunk = chunk.map_err(io::Error::other)?;
            received += chunk.len() as u64;
            if received > limit {
                flag.store(true, Ordering::Relaxed);
                return Err(io::Error::other("artifact exceeds the limit"));
            }
            Ok(chunk)
        })
        .boxed();
    let size = match state.registry.put_artifact(&sha256, stream).await {
        Ok(size) => size,
        Err(_) if exceeded.load(Ordering::Relaxed) => return Err(too_large()),
        Err(error) => return Err(error.into()),
    };
    Ok(created(
        format!("/v1/artifacts/{sha256}"),
        ArtifactUploaded {
            sha256,
            size_bytes: size,
        },
    ))
}

fn artifact_headers(sha256: &str, size: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    if let Ok(etag) = HeaderValue::from_str(&format!("\"sha256:{sha256}\"")) {
        headers.insert(header::ETAG, etag);
    }
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    headers
}

/// Download an artifact
///
/// Streams the bytes of a stored artifact.
#[utoipa::path(
    get,
    path = "/v1/artifacts/{sha256}",
    tag = "artifacts",
    params(("sha256" = String, Path, pattern = "^[0-9a-f]{64}$", description = "Lowercase hex sha256 of the bytes")),
    responses(
        (status = 200, description = "The bytes", content_type = "application/octet-stream", body = ArtifactBytes,
            headers(
                ("content-length" = u64, description = "Size in bytes"),
                ("etag" = String, description = "`\"sha256:<digest>\"`"),
            )),
        (status = 400, description = "Not a sha256 digest", body = ErrorBody),
        (status = 404, description = "No such artifact", body = ErrorBody),
    )
)]
pub async fn get_artifact(
    State(state): State<AppState>,
    params: PathParams,
) -> ApiResult<Response> {
    let sha256 = params.get("sha256");
    let (size, stream) = state.registry.open_artifact(sha256).await?;
    Ok((artifact_headers(sha256, size), Body::from_stream(stream)).into_response())
}

/// Check an artifact
///
/// The headers of a download, without the bytes.
#[utoipa::path(
    head,
    path = "/v1/artifacts/{sha256}",
    tag = "artifacts",
    params(("sha256" = String, Path, pattern = "^[0-9a-f]{64}$", description = "Lowercase hex sha256 of the bytes")),
    responses(
        (status = 200, description = "Stored",
            headers(
                ("content-length" = u64, description = "Size in bytes"),
                ("etag" = String, description = "`\"sha256:<digest>\"`"),
            )),
        (status = 400, description = "Not a sha256 digest"),
        (status = 404, description = "No such artifact"),
    )
)]
pub async fn head_artifact(
    State(state): State<AppState>,
    params: PathParams,
) -> ApiResult<Response> {
    let sha256 = params.get("sha256");
    let (size, stream) = state.registry.open_artifact(sha256).await?;
    drop(stream);
    Ok((artifact_headers(sha256, size), Body::empty()).into_response())
}

// ----- aliases --------------------------------------------------------------

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
        (status = 400, description = "Invalid alias or body", body = ErrorBody),
        (status = 404, description = "No such model or version", body = ErrorBody),
        (status = 422, description = "The version is archived or failed (`failed_precondition`)", body = ErrorBody),
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
) -> ApiResult<StatusCode> {
    state
        .registry
        .delete_alias(params.name(), params.get("alias"))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ----- rollouts -------------------------------------------------------------

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
        (status = 400, description = "Invalid field (named in `error.field`)", body = ErrorBody),
        (status = 404, description = "No such model or version", body = ErrorBody),
        (status = 409, description = "`expected_revision` is stale (`conflict`, with `current_revision`)", body = ErrorBody),
        (status = 422, description = "A rollout is in progress, or a version is not ready (`failed_precondition`)", body = ErrorBody),
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
        (status = 400, description = "Invalid field (named in `error.field`)", body = ErrorBody),
        (status = 404, description = "No such model or version", body = ErrorBody),
        (status = 409, description = "`expected_revision` is stale (`conflict`, with `current_revision`)", body = ErrorBody),
        (status = 422, description = "A version is not ready (`failed_precondition`)", body = ErrorBody),
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
        (status = 400, description = "Invalid field (named in `error.field`)", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 409, description = "`expected_revision` is stale (`conflict`, with `current_revision`)", body = ErrorBody),
        (status = 422, description = "No rollout in progress, or it has no single candidate (`failed_precondition`)", body = ErrorBody),
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
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 409, description = "`expected_revision` is stale (`conflict`, with `current_revision`)", body = ErrorBody),
        (status = 422, description = "No rollout in progress (`failed_precondition`)", body = ErrorBody),
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
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 409, description = "`expected_revision` is stale (`conflict`, with `current_revision`)", body = ErrorBody),
        (status = 422, description = "No rollout in progress (`failed_precondition`)", body = ErrorBody),
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
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 409, description = "`expected_revision` is stale (`conflict`, with `current_revision`)", body = ErrorBody),
        (status = 422, description = "No rollout in progress, or already paused (`failed_precondition`)", body = ErrorBody),
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
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 409, description = "`expected_revision` is stale (`conflict`, with `current_revision`)", body = ErrorBody),
        (status = 422, description = "No rollout in progress, or not paused (`failed_precondition`)", body = ErrorBody),
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
        ("page_size" = Option<u32>, Query, minimum = 1, maximum = 500, description = "Items per page (default 50)"),
        ("page_token" = Option<String>, Query, description = "`next_page_token` of the previous page"),
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

// ----- workers ----------------------------------------------------------------

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

// ----- placement ----------------------------------------------------------------

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

// ----- data residency ---------------------------------------------------------

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
    params(
        ("page_size" = Option<u32>, Query, minimum = 1, maximum = 500, description = "Items per page (default 50)"),
        ("page_token" = Option<String>, Query, description = "`next_page_token` of the previous page"),
    ),
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
