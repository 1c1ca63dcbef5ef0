//! Aliases: movable names (e.g. `production`) for a model's versions.

use super::sql::{fetch_alias, fetch_version, upsert_alias};
use super::{Change, ModelRegistry, actor_or_anonymous, audit_json, validate_alias};
use crate::error::{RegistryError, Result};
use crate::model::*;
use crate::store::*;

impl ModelRegistry {
    pub async fn set_alias(
        &self,
        model: &str,
        alias: &str,
        version: u64,
        actor: &str,
    ) -> Result<Alias> {
        validate_alias(alias)?;
        self.admit()?;
        let mut tx = self.store.begin_write().await?;
        let target = fetch_version(&mut tx, model, version).await?;
        let before = fetch_alias(&mut tx, model, alias).await?;
        if matches!(target.lifecycle, Lifecycle::Archived | Lifecycle::Failed) {
            return Err(RegistryError::FailedPrecondition(format!(
                "version {version} of '{model}' is {}",
                target.lifecycle.as_str()
            )));
        }
        let entry = Alias {
            model: model.to_owned(),
            alias: alias.to_owned(),
            version,
            updated_by: actor_or_anonymous(actor),
            updated_at: now_millis(),
        };
        upsert_alias(&mut tx, &entry).await?;
        let revision = record_change(&mut tx, model).await?;
        tx.commit().await?;
        self.notify(revision);
        self.audit(Change {
            action: "alias.set",
            actor,
            model,
            version: Some(version),
            before: before
                .map(|version| {
                    audit_json(&serde_json::json!({ "alias": alias, "version": version }))
                })
                .unwrap_or_default(),
            after: audit_json(&serde_json::json!({ "alias": alias, "version": version })),
            ..Change::default()
        });
        Ok(entry)
    }

    pub async fn delete_alias(&self, model: &str, alias: &str, actor: &str) -> Result<()> {
        self.admit()?;
        let mut tx = self.store.begin_write().await?;
        let before = fetch_alias(&mut tx, model, alias).await?;
        let deleted = sqlx::query("DELETE FROM aliases WHERE model = $1 AND alias = $2")
            .bind(model)
            .bind(alias)
            .execute(&mut *tx)
            .await?;
        if deleted.rows_affected() == 0 {
            return Err(RegistryError::NotFound(format!(
                "model '{model}' has no alias '{alias}'"
            )));
        }
        let revision = record_change(&mut tx, model).await?;
        tx.commit().await?;
        self.notify(revision);
        self.audit(Change {
            action: "alias.delete",
            actor,
            model,
            version: before,
            before: before
                .map(|version| {
                    audit_json(&serde_json::json!({ "alias": alias, "version": version }))
                })
                .unwrap_or_default(),
            ..Change::default()
        });
        Ok(())
    }

    pub async fn list_aliases(&self, model: &str) -> Result<Vec<Alias>> {
        self.get_model(model).await?;
        let rows = sqlx::query("SELECT model, alias, version, updated_by, updated_at FROM aliases WHERE model = $1 ORDER BY alias")
            .bind(model)
            .fetch_all(&self.store.pool)
            .await?;
        rows.iter().map(alias_from_row).collect()
    }
}
