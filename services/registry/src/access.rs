//! Model access: a model limited to listed tenants or groups. Roles say
//! what a caller may do; this says which models a `inference` caller may
//! do it to. Routers enforce it (they receive it through Watch:
//! `ModelState.allowed_tenants` / `allowed_groups`); the registry stores
//! it, validates it and records who changed what in `access_history`.

use crate::error::{RegistryError, Result};
use crate::model::*;
use crate::registry::{
    Change, ModelRegistry, actor_or_anonymous, audit_json, audit_json_opt, validate_model_name,
};
use crate::store::*;
use sqlx::Row;

use shamal_registry_client::names;

/// Most tenants, and most groups, one model may list.
pub const MAX_ENTRIES: usize = 64;

/// Longest group name accepted (identity providers' group paths and ids).
pub const MAX_GROUP_CHARS: usize = 256;

fn validate_list(
    field: &str,
    entries: &[String],
    check: impl Fn(&str) -> Option<String>,
) -> Result<()> {
    if entries.len() > MAX_ENTRIES {
        return Err(RegistryError::invalid(
            field,
            format!("lists {} entries; at most {MAX_ENTRIES}", entries.len()),
        ));
    }
    for (index, entry) in entries.iter().enumerate() {
        let at = format!("{field}[{index}]");
        if let Some(problem) = check(entry) {
            return Err(RegistryError::invalid(&at, problem));
        }
        if entries[..index].contains(entry) {
            return Err(RegistryError::invalid(
                &at,
                format!("'{entry}' is listed twice"),
            ));
        }
    }
    Ok(())
}

/// Validates an access limit, naming the entry at fault
/// (`allowed_groups[1]`).
pub fn validate_access(input: &SetAccess) -> Result<()> {
    validate_list("allowed_tenants", &input.allowed_tenants, |tenant| {
        (!names::is_tenant_name(tenant)).then(|| format!("tenant names are {}", names::TENANT_RULE))
    })?;
    validate_list("allowed_groups", &input.allowed_groups, |group| {
        let length = group.chars().count();
        if length == 0 || length > MAX_GROUP_CHARS {
            Some(format!("group names are 1-{MAX_GROUP_CHARS} characters"))
        } else if group.chars().any(|c| c.is_whitespace() || c.is_control()) {
            Some("group names have no whitespace or control characters".to_owned())
        } else {
            None
        }
    })
}

fn list_from_text(text: &str, what: &str) -> Result<Vec<String>> {
    serde_json::from_str(text)
        .map_err(|error| RegistryError::Internal(format!("stored {what} is not valid: {error}")))
}

/// The stored lists of a `models` row (columns `allowed_tenants`,
/// `allowed_groups`).
pub fn access_lists(row: &sqlx::any::AnyRow) -> Result<(Vec<String>, Vec<String>)> {
    Ok((
        list_from_text(
            &row.try_get::<String, _>("allowed_tenants")?,
            "allowed_tenants",
        )?,
        list_from_text(
            &row.try_get::<String, _>("allowed_groups")?,
            "allowed_groups",
        )?,
    ))
}

impl ModelRegistry {
    pub async fn get_model_access(&self, model: &str) -> Result<ModelAccess> {
        let row = sqlx::query("SELECT allowed_tenants, allowed_groups, access_updated_by, access_updated_at FROM models WHERE name = $1")
            .bind(model)
            .fetch_optional(&self.store.pool)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("model '{model}' does not exist")))?;
        let (allowed_tenants, allowed_groups) = access_lists(&row)?;
        Ok(ModelAccess {
            model: model.to_owned(),
            allowed_tenants,
            allowed_groups,
            updated_by: row.try_get("access_updated_by")?,
            updated_at: row.try_get("access_updated_at")?,
        })
    }

    /// Limits a model to the listed tenants or groups; both lists empty
    /// lifts the limit. Routers hear of it through Watch (the model's
    /// state changes).
    pub async fn set_model_access(
        &self,
        model: &str,
        input: SetAccess,
        actor: &str,
    ) -> Result<ModelAccess> {
        validate_model_name(model)?;
        validate_access(&input)?;
        let requested_by = actor;
        let actor = actor_or_anonymous(actor);
        let now = now_millis();
        let tenants = json_text(&input.allowed_tenants)?;
        let groups = json_text(&input.allowed_groups)?;
        self.admit()?;
        let mut tx = self.store.begin_write().await?;
        let before = sqlx::query("SELECT allowed_tenants, allowed_groups, access_updated_by, access_updated_at FROM models WHERE name = $1")
            .bind(model)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| -> Result<ModelAccess> {
                let (allowed_tenants, allowed_groups) = access_lists(&row)?;
                Ok(ModelAccess {
                    model: model.to_owned(),
                    allowed_tenants,
                    allowed_groups,
                    updated_by: row.try_get("access_updated_by")?,
                    updated_at: row.try_get("access_updated_at")?,
                })
            })
            .transpose()?;
        let updated = sqlx::query("UPDATE models SET allowed_tenants = $1, allowed_groups = $2, access_updated_by = $3, access_updated_at = $4 WHERE name = $5")
            .bind(&tenants)
            .bind(&groups)
            .bind(&actor)
            .bind(now)
            .bind(model)
            .execute(&mut *tx)
            .await?;
        if updated.rows_affected() == 0 {
            return Err(RegistryError::NotFound(format!(
                "model '{model}' does not exist"
            )));
        }
        sqlx::query("INSERT INTO access_history (model, allowed_tenants, allowed_groups, actor, at) VALUES ($1, $2, $3, $4, $5)")
            .bind(model)
            .bind(&tenants)
            .bind(&groups)
            .bind(&actor)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let revision = record_change(&mut tx, model).await?;
        tx.commit().await?;
        self.notify(revision);
        tracing::info!(model, tenants = ?input.allowed_tenants, groups = ?input.allowed_groups, %actor, "model access set");
        let after = ModelAccess {
            model: model.to_owned(),
            allowed_tenants: input.allowed_tenants,
            allowed_groups: input.allowed_groups,
            updated_by: actor,
            updated_at: now,
        };
        self.audit(Change {
            action: "access.set",
            actor: requested_by,
            model,
            before: audit_json_opt(before.as_ref()),
            after: audit_json(&after),
            ..Change::default()
        });
        Ok(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(tenants: &[&str], groups: &[&str]) -> SetAccess {
        SetAccess {
            allowed_tenants: tenants.iter().map(|s| (*s).to_owned()).collect(),
            allowed_groups: groups.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn field_of(result: Result<()>) -> String {
        match result {
            Err(RegistryError::InvalidArgument { field, .. }) => field,
            other => panic!("expected an invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn names_the_entry_at_fault() {
        assert!(
            validate_access(&input(&["acme", "globex"], &["/risk/analysts", "0b1c-42"])).is_ok()
        );
        assert!(validate_access(&input(&[], &[])).is_ok());
        assert_eq!(
            field_of(validate_access(&input(&["acme", "bad tenant"], &[]))),
            "allowed_tenants[1]"
        );
        assert_eq!(
            field_of(validate_access(&input(&["acme", "acme"], &[]))),
            "allowed_tenants[1]"
        );
        assert_eq!(
            field_of(validate_access(&input(&[], &["ok", "has space"]))),
            "allowed_groups[1]"
        );
        assert_eq!(
            field_of(validate_access(&input(&[], &[""]))),
            "allowed_groups[0]"
        );
        let long = "g".repeat(MAX_GROUP_CHARS + 1);
        assert_eq!(
            field_of(validate_access(&input(&[], &[&long]))),
            "allowed_groups[0]"
        );
        let many: Vec<String> = (0..=MAX_ENTRIES).map(|i| format!("t{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            field_of(validate_access(&input(&many, &[]))),
            "allowed_tenants"
        );
    }
}
