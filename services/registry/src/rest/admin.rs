//! `/v1/admin/...`: operations on the registry itself.

use axum::Json;
use axum::extract::State;

use super::AppState;
use super::api_error::ApiResult;
use super::extract::Actor;
use crate::artifacts::RekeyReport;
use crate::error::ErrorBody;

/// Re-key artifacts
///
/// Re-encrypts, one by one, every stored artifact that is not under the
/// active key of the registry's artifact key ring, plaintext artifacts
/// stored before encryption was turned on included. Each blob's plaintext
/// is checked against its sha256 before the blob is replaced in one
/// rename, so downloads in flight are unaffected. Idempotent: run it after
/// making a new key active, then remove the old key from the ring.
#[utoipa::path(
    post,
    path = "/v1/admin/rekey",
    tag = "admin",
    responses(
        (status = 200, description = "Every artifact is under the active key", body = RekeyReport),
        (status = 400, description = "Artifact encryption at rest is off (`failed_precondition`)", body = ErrorBody),
        (status = 500, description = "Some artifacts could not be re-keyed (the registry log names them)", body = ErrorBody),
    )
)]
pub async fn rekey(
    State(state): State<AppState>,
    Actor(actor): Actor,
) -> ApiResult<Json<RekeyReport>> {
    Ok(Json(state.registry.rekey_artifacts_as(&actor).await?))
}
