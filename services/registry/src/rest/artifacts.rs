//! `/v1/artifacts/{sha256}`: upload, download and check content-addressed
//! artifacts.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, header};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::api_error::{ApiError, ApiResult};
use super::extract::{Actor, PathParams};
use super::reply::created;
use crate::error::{ErrorBody, RegistryError};

/// A stored artifact.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ArtifactUploaded {
    pub sha256: String,
    pub size_bytes: u64,
}

/// Artifact bytes (any content; the sha256 of the bytes must match the
/// path).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct ArtifactBytes(#[allow(dead_code)] Vec<u8>);

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
    Actor(actor): Actor,
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
    let size = match state
        .registry
        .put_artifact_as(&sha256, stream, &actor)
        .await
    {
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
