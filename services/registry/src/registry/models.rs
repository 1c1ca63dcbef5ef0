//! Models: the named things that versions, aliases and rollouts belong to.

use super::sql::insert_model;
use super::{Change, ModelRegistry, actor_or_anonymous, audit_json, validate_model_name};
use crate::error::{RegistryError, Result};
use crate::model::*;
use crate::paging::PageRequest;
use crate::store::*;

impl ModelRegistry {
    pub async fn create_model(&self, name: &str, description: &str, actor: &str) -> Result<Model> {
        validate_model_name(name)?;
        self.admit()?;
        let mut tx = self.store.begin_write().await?;
        let model = Model {
            name: name.to_owned(),
            description: description.to_owned(),
            created_by: actor_or_anonymous(actor),
            created_at: now_millis(),
            latest_version: 0,
        };
        insert_model(&mut tx, &model).await?;
        let revision = record_change(&mut tx, name).await?;
        tx.commit().await?;
        self.notify(revision);
        self.audit(Change {
            action: "model.create",
            actor,
            model: name,
            after: audit_json(&model),
            ..Change::default()
        });
        Ok(model)
    }

    pub async fn get_model(&self, name: &str) -> Result<Model> {
        let row = sqlx::query("SELECT name, description, created_by, created_at, latest_version FROM models WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.store.pool)
            .await?;
        match row {
            Some(row) => model_from_row(&row),
            None => Err(RegistryError::NotFound(format!(
                "model '{name}' does not exist"
            ))),
        }
    }

    pub async fn list_models(
        &self,
        page_size_requested: Option<u32>,
        token: Option<&str>,
    ) -> Result<Page<Model>> {
        let page = PageRequest::<String>::new(page_size_requested, token)?;
        let rows = sqlx::query("SELECT name, description, created_by, created_at, latest_version FROM models WHERE name > $1 ORDER BY name LIMIT $2")
            .bind(&page.after)
            .bind(page.fetch_limit())
            .fetch_all(&self.store.pool)
            .await?;
        let items = rows
            .iter()
            .map(model_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(page.page(items, |model| model.name.clone()))
    }
}
