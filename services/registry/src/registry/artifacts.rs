//! Artifacts: content-addressed bytes that versions point to.

use std::io;

use bytes::Bytes;
use futures::stream::BoxStream;

use super::{Change, ModelRegistry, audit_json};
use crate::artifacts::{ByteStream, RekeyReport, validate_sha256};
use crate::error::{RegistryError, Result};
use crate::model::*;

impl ModelRegistry {
    /// Streams an upload into the artifact store, verified against the
    /// declared digest; idempotent for the same bytes.
    pub async fn put_artifact(
        &self,
        sha256: &str,
        body: BoxStream<'_, io::Result<Bytes>>,
    ) -> Result<u64> {
        self.put_artifact_as(sha256, body, "").await
    }

    /// [`ModelRegistry::put_artifact`] on behalf of `actor` (the audit
    /// trail's `artifact.put`).
    pub async fn put_artifact_as(
        &self,
        sha256: &str,
        body: BoxStream<'_, io::Result<Bytes>>,
        actor: &str,
    ) -> Result<u64> {
        validate_sha256("sha256", sha256)?;
        self.admit()?;
        let size = self
            .artifacts
            .put(sha256, body, self.max_artifact_bytes)
            .await?;
        let mut tx = self.store.begin_write().await?;
        sqlx::query("INSERT INTO artifacts (sha256, size_bytes, created_at) VALUES ($1, $2, $3) ON CONFLICT (sha256) DO NOTHING")
            .bind(sha256)
            .bind(size as i64)
            .bind(now_millis())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.audit(Change {
            action: "artifact.put",
            actor,
            after: audit_json(&serde_json::json!({ "sha256": sha256, "size_bytes": size })),
            ..Change::default()
        });
        Ok(size)
    }

    /// Re-encrypts, blob by blob, every stored artifact that is not under
    /// the active key of the artifact key ring (plaintext ones included);
    /// `FailedPrecondition` when encryption at rest is off. Safe while
    /// serving: each blob is replaced by one rename after its plaintext
    /// was checked against its digest.
    pub async fn rekey_artifacts(&self) -> Result<RekeyReport> {
        self.rekey_artifacts_as("").await
    }

    /// [`ModelRegistry::rekey_artifacts`] on behalf of `actor` (the audit
    /// trail's `artifacts.rekey`, with the report as `after_json`).
    pub async fn rekey_artifacts_as(&self, actor: &str) -> Result<RekeyReport> {
        self.admit()?;
        let report = self.artifacts.rekey().await?;
        self.audit(Change {
            action: "artifacts.rekey",
            actor,
            after: audit_json(&report),
            ..Change::default()
        });
        Ok(report)
    }

    /// The bytes of an artifact (decrypted), with their size.
    pub async fn open_artifact(&self, sha256: &str) -> Result<(u64, ByteStream)> {
        validate_sha256("sha256", sha256)?;
        self.artifacts.open(sha256).await?.ok_or_else(|| {
            RegistryError::NotFound(format!("artifact sha256:{sha256} does not exist"))
        })
    }
}
