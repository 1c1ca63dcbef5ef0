//! Versions: registration, lookup, archiving and retrying of a model's
//! immutable versions.

use sqlx::Row;

use super::sql::{fetch_alias, fetch_rollout, fetch_version, insert_model, upsert_alias};
use super::{Change, ModelRegistry, actor_or_anonymous, audit_json, validate_model_name};
use crate::artifacts::validate_sha256;
use crate::error::{RegistryError, Result};
use crate::model::*;
use crate::paging::PageRequest;
use crate::store::*;

impl ModelRegistry {
    /// Registers a new version of `model` (created on the way unless
    /// `create_model` is false) for an artifact uploaded before.
    pub async fn register_version(
        &self,
        model: &str,
        new: NewVersion,
        actor: &str,
    ) -> Result<Version> {
        validate_model_name(model)?;
        validate_sha256("sha256", &new.sha256)?;
        let format = Format::parse(&new.format)
            .ok_or_else(|| RegistryError::invalid("format", "must be onnx or safetensors"))?;
        for key in new.metadata.keys() {
            if key.is_empty() || key.len() > 128 {
                return Err(RegistryError::invalid(
                    "metadata",
                    "keys are 1-128 characters",
                ));
            }
        }
        let requested_by = actor;
        let actor = actor_or_anonymous(actor);
        self.admit()?;
        let Some(size) = self.artifacts.size(&new.sha256).await? else {
            return Err(RegistryError::FailedPrecondition(format!(
                "artifact sha256:{} has not been uploaded (PUT /v1/artifacts/{})",
                new.sha256, new.sha256
            )));
        };
        let mut tx = self.store.begin_write().await?;
        sqlx::query("INSERT INTO artifacts (sha256, size_bytes, created_at) VALUES ($1, $2, $3) ON CONFLICT (sha256) DO NOTHING")
            .bind(&new.sha256)
            .bind(size as i64)
            .bind(now_millis())
            .execute(&mut *tx)
            .await?;
        let existing = sqlx::query("SELECT latest_version FROM models WHERE name = $1")
            .bind(model)
            .fetch_optional(&mut *tx)
            .await?;
        let latest = match existing {
            Some(row) => row.try_get::<i64, _>("latest_version")?,
            None if new.create_model.unwrap_or(true) => {
                insert_model(
                    &mut tx,
                    &Model {
                        name: model.to_owned(),
                        description: String::new(),
                        created_by: actor.clone(),
                        created_at: now_millis(),
                        latest_version: 0,
                    },
                )
                .await?;
                0
            }
            None => {
                return Err(RegistryError::NotFound(format!(
                    "model '{model}' does not exist"
                )));
            }
        };
        let version = Version {
            model: model.to_owned(),
            version: latest as u64 + 1,
            artifact: Artifact {
                sha256: new.sha256.clone(),
                size_bytes: size,
                format,
            },
            signature: None,
            metadata: new.metadata,
            lineage: new.lineage,
            lifecycle: Lifecycle::Registered,
            reason: String::new(),
            created_by: actor,
            created_at: now_millis(),
        };
        sqlx::query(&format!(
            "INSERT INTO versions ({VERSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, NULL, $6, $7, $8, '', $9, $10)"
        ))
        .bind(&version.model)
        .bind(version.version as i64)
        .bind(&version.artifact.sha256)
        .bind(size as i64)
        .bind(format.as_str())
        .bind(json_text(&version.metadata)?)
        .bind(json_text(&version.lineage)?)
        .bind(version.lifecycle.as_str())
        .bind(&version.created_by)
        .bind(version.created_at)
        .execute(&mut *tx)
        .await
        .map_err(|error| {
            if is_unique_violation(&error) {
                RegistryError::Conflict {
                    message: format!("another version of '{model}' was registered at the same time; retry"),
                    current_revision: latest as u64,
                }
            } else {
                error.into()
            }
        })?;
        let updated = sqlx::query(
            "UPDATE models SET latest_version = $1 WHERE name = $2 AND latest_version = $3",
        )
        .bind(version.version as i64)
        .bind(model)
        .bind(latest)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(RegistryError::Conflict {
                message: format!(
                    "another version of '{model}' was registered at the same time; retry"
                ),
                current_revision: latest as u64,
            });
        }
        // A model's first version becomes `production`: later versions take
        // traffic only through a rollout or an explicit alias move.
        if fetch_alias(&mut tx, model, "production").await?.is_none() {
            upsert_alias(
                &mut tx,
                &Alias {
                    model: model.to_owned(),
                    alias: "production".to_owned(),
                    version: version.version,
                    updated_by: version.created_by.clone(),
                    updated_at: version.created_at,
                },
            )
            .await?;
        }
        // A `weighted` model's new version gets its workers in the same
        // change: published without them, every worker would load it.
        self.plan_in(&mut tx, model).await?;
        let revision = record_change(&mut tx, model).await?;
        tx.commit().await?;
        self.notify(revision);
        tracing::info!(model, version = version.version, sha256 = %version.artifact.sha256, "version registered");
        self.audit(Change {
            action: "version.register",
            actor: requested_by,
            model,
            version: Some(version.version),
            after: audit_json(&version),
            ..Change::default()
        });
        Ok(version)
    }

    pub async fn get_version(&self, model: &str, version: u64) -> Result<Version> {
        let row = sqlx::query(&format!(
            "SELECT {VERSION_COLUMNS} FROM versions WHERE model = $1 AND version = $2"
        ))
        .bind(model)
        .bind(version as i64)
        .fetch_optional(&self.store.pool)
        .await?;
        match row {
            Some(row) => version_from_row(&row),
            None => {
                self.get_model(model).await?;
                Err(RegistryError::NotFound(format!(
                    "model '{model}' has no version {version}"
                )))
            }
        }
    }

    pub async fn list_versions(
        &self,
        model: &str,
        page_size_requested: Option<u32>,
        token: Option<&str>,
    ) -> Result<Page<Version>> {
        let page = PageRequest::<i64>::new(page_size_requested, token)?;
        self.get_model(model).await?;
        let rows = sqlx::query(&format!("SELECT {VERSION_COLUMNS} FROM versions WHERE model = $1 AND version > $2 ORDER BY version LIMIT $3"))
            .bind(model)
            .bind(page.after)
            .bind(page.fetch_limit())
            .fetch_all(&self.store.pool)
            .await?;
        let items = rows
            .iter()
            .map(version_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(page.page(items, |version| version.version.to_string()))
    }

    /// Retires a version: workers unload it. Refused while a rollout in
    /// progress or an alias uses it.
    pub async fn archive_version(&self, model: &str, version: u64, actor: &str) -> Result<Version> {
        self.admit()?;
        let mut tx = self.store.begin_write().await?;
        let current = fetch_version(&mut tx, model, version).await?;
        if current.lifecycle == Lifecycle::Archived {
            tx.rollback().await?;
            return Ok(current);
        }
        let alias = sqlx::query("SELECT alias FROM aliases WHERE model = $1 AND version = $2")
            .bind(model)
            .bind(version as i64)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(alias) = alias {
            let alias: String = alias.try_get("alias")?;
            return Err(RegistryError::FailedPrecondition(format!(
                "alias '{alias}' points to version {version}; move it first"
            )));
        }
        if let Some(rollout) = fetch_rollout(&mut tx, model).await? {
            let used = rollout.stable_version == version
                || rollout
                    .splits
                    .iter()
                    .any(|split| split.version == version && split.weight > 0)
                || rollout
                    .shadow
                    .is_some_and(|shadow| shadow.version == version);
            if rollout.state.in_progress() && used || rollout.stable_version == version {
                return Err(RegistryError::FailedPrecondition(format!(
                    "the rollout of '{model}' (revision {}) routes traffic to version {version}",
                    rollout.revision
                )));
            }
        }
        sqlx::query("UPDATE versions SET lifecycle = 'archived', reason = $1 WHERE model = $2 AND version = $3")
            .bind(format!("archived by {}", actor_or_anonymous(actor)))
            .bind(model)
            .bind(version as i64)
            .execute(&mut *tx)
            .await?;
        let revision = record_change(&mut tx, model).await?;
        let archived = fetch_version(&mut tx, model, version).await?;
        tx.commit().await?;
        self.notify(revision);
        self.audit(Change {
            action: "version.archive",
            actor,
            model,
            version: Some(version),
            before: audit_json(&current),
            after: audit_json(&archived),
            ..Change::default()
        });
        Ok(archived)
    }

    /// Gives a failed version another chance: its failed placements are
    /// forgotten and it goes back to `registered`, so workers load it again
    /// (after the cause — a worker short of memory, a registry outage during
    /// a fetch — is fixed).
    pub async fn retry_version(&self, model: &str, version: u64, actor: &str) -> Result<Version> {
        self.admit()?;
        let mut tx = self.store.begin_write().await?;
        let current = fetch_version(&mut tx, model, version).await?;
        if current.lifecycle != Lifecycle::Failed {
            return Err(RegistryError::FailedPrecondition(format!(
                "version {version} of '{model}' is {}, not failed",
                current.lifecycle.as_str()
            )));
        }
        sqlx::query(
            "DELETE FROM placements WHERE model = $1 AND version = $2 AND state = 'failed'",
        )
        .bind(model)
        .bind(version as i64)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE versions SET lifecycle = 'registered', reason = '' WHERE model = $1 AND version = $2")
            .bind(model)
            .bind(version as i64)
            .execute(&mut *tx)
            .await?;
        self.plan_in(&mut tx, model).await?;
        let revision = record_change(&mut tx, model).await?;
        let retried = fetch_version(&mut tx, model, version).await?;
        tx.commit().await?;
        self.notify(revision);
        tracing::info!(model, version, actor = %actor_or_anonymous(actor), previous_reason = %current.reason, "failed version retried");
        self.audit(Change {
            action: "version.retry",
            actor,
            model,
            version: Some(version),
            before: audit_json(&current),
            after: audit_json(&retried),
            ..Change::default()
        });
        Ok(retried)
    }
}
