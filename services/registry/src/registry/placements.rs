//! Placements: what each worker reports holding of a model's versions, and
//! the version lifecycle those reports move.

use sqlx::Row;

use super::sql::fetch_version;
use super::{Change, ModelRegistry, audit_json};
use crate::error::{RegistryError, Result};
use crate::model::*;
use crate::store::*;

impl ModelRegistry {
    pub async fn list_placements(&self, model: &str) -> Result<Vec<Placement>> {
        let rows = sqlx::query("SELECT worker_id, model, version, state, reason, updated_at FROM placements WHERE model = $1 ORDER BY version, worker_id")
            .bind(model)
            .fetch_all(&self.store.pool)
            .await?;
        rows.iter().map(placement_from_row).collect()
    }

    /// A worker's report on a version it holds; moves the version's
    /// lifecycle (ready once any worker has it ready; failed when every
    /// worker that tried failed).
    pub async fn report_placement(
        &self,
        worker_id: &str,
        model: &str,
        version: u64,
        state: &str,
        reason: &str,
        signature_json: &str,
    ) -> Result<()> {
        if !matches!(state, "loading" | "ready" | "failed" | "unloaded") {
            return Err(RegistryError::invalid(
                "state",
                "must be loading, ready, failed or unloaded",
            ));
        }
        let signature = if signature_json.is_empty() {
            None
        } else {
            let value: serde_json::Value = serde_json::from_str(signature_json)
                .map_err(|error| RegistryError::invalid("signature_json", error.to_string()))?;
            Some(json_text(&value)?)
        };
        self.admit()?;
        let mut tx = self.store.begin_write().await?;
        let known = sqlx::query("SELECT state FROM workers WHERE id = $1")
            .bind(worker_id)
            .fetch_optional(&mut *tx)
            .await?;
        let known_state = known
            .map(|row| row.try_get::<String, _>("state"))
            .transpose()?;
        if known_state.is_none_or(|state| state == MemberState::Gone.as_str()) {
            return Err(RegistryError::FailedPrecondition(format!(
                "worker '{worker_id}' is not registered; call RegisterWorker first"
            )));
        }
        let current = fetch_version(&mut tx, model, version).await?;
        sqlx::query("INSERT INTO placements (worker_id, model, version, state, reason, updated_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (worker_id, model, version) DO UPDATE SET state = excluded.state, reason = excluded.reason, updated_at = excluded.updated_at")
            .bind(worker_id)
            .bind(model)
            .bind(version as i64)
            .bind(state)
            .bind(reason)
            .bind(now_millis())
            .execute(&mut *tx)
            .await?;
        if let Some(signature) = &signature
            && current.signature.is_none()
        {
            sqlx::query("UPDATE versions SET signature = $1 WHERE model = $2 AND version = $3")
                .bind(signature)
                .bind(model)
                .bind(version as i64)
                .execute(&mut *tx)
                .await?;
        }
        let mut moved = None;
        if current.lifecycle != Lifecycle::Archived {
            let rows = sqlx::query("SELECT state, reason FROM placements WHERE model = $1 AND version = $2 ORDER BY updated_at DESC")
                .bind(model)
                .bind(version as i64)
                .fetch_all(&mut *tx)
                .await?;
            let states: Vec<(String, String)> = rows
                .iter()
                .map(|row| Ok((row.try_get("state")?, row.try_get("reason")?)))
                .collect::<Result<_>>()?;
            let (lifecycle, why) = if states.iter().any(|(state, _)| state == "ready") {
                (Lifecycle::Ready, String::new())
            } else if !states.is_empty() && states.iter().all(|(state, _)| state == "failed") {
                (Lifecycle::Failed, states[0].1.clone())
            } else {
                (current.lifecycle, current.reason.clone())
            };
            if lifecycle != current.lifecycle || why != current.reason {
                sqlx::query("UPDATE versions SET lifecycle = $1, reason = $2 WHERE model = $3 AND version = $4")
                    .bind(lifecycle.as_str())
                    .bind(&why)
                    .bind(model)
                    .bind(version as i64)
                    .execute(&mut *tx)
                    .await?;
                tracing::info!(model, version, lifecycle = lifecycle.as_str(), reason = %why, "version lifecycle changed");
                if lifecycle != current.lifecycle {
                    moved = Some((lifecycle, why));
                }
            }
        }
        let revision = record_change(&mut tx, model).await?;
        tx.commit().await?;
        self.notify(revision);
        if let Some((lifecycle, why)) = moved {
            let mut after = current.clone();
            after.lifecycle = lifecycle;
            after.reason = why;
            if let Some(signature) = &signature
                && after.signature.is_none()
            {
                after.signature = serde_json::from_str(signature).ok();
            }
            self.audit(Change {
                action: "version.lifecycle",
                actor: worker_id,
                model,
                version: Some(version),
                worker: worker_id,
                before: audit_json(&current),
                after: audit_json(&after),
                reason: &after.reason,
                ..Change::default()
            });
        }
        Ok(())
    }
}
