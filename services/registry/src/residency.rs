//! Data residency policies: the regions a model's requests may be processed
//! in, and per-tenant defaults. Routers enforce them (they receive them
//! through Watch: `ModelState.allowed_regions` and
//! `WatchEvent.tenant_policies`); the registry stores them, validates them
//! and records who changed what in `residency_history`.

use shamal_proto::shamal::registry::v1 as proto;
use sqlx::Row;

use crate::error::{RegistryError, Result};
use crate::model::*;
use crate::paging::PageRequest;
use crate::registry::{
    Change, ModelRegistry, actor_or_anonymous, audit_json, audit_json_opt, validate_model_name,
};
use crate::store::*;

use shamal_registry_client::names;

/// Most regions a policy may list.
pub const MAX_REGIONS: usize = 64;

/// Validates a region name (`shamal_registry_client::names`: the rule the
/// routers and workers apply too), naming `field`.
pub fn validate_region(field: &str, region: &str) -> Result<()> {
    names::check_region(region).map_err(|error| RegistryError::invalid(field, error.to_string()))
}

/// Validates a list of regions (at most 64, no duplicates), naming the
/// element at fault (`allowed_regions[2]`).
pub fn validate_regions(regions: &[String]) -> Result<()> {
    if regions.len() > MAX_REGIONS {
        return Err(RegistryError::invalid(
            "allowed_regions",
            format!("lists {} regions; at most {MAX_REGIONS}", regions.len()),
        ));
    }
    for (index, region) in regions.iter().enumerate() {
        let field = format!("allowed_regions[{index}]");
        validate_region(&field, region)?;
        if regions[..index].contains(region) {
            return Err(RegistryError::invalid(
                &field,
                format!("'{region}' is listed twice"),
            ));
        }
    }
    Ok(())
}

/// Validates a tenant name (`shamal_registry_client::names`).
pub fn validate_tenant(tenant: &str) -> Result<()> {
    if names::is_tenant_name(tenant) {
        Ok(())
    } else {
        Err(RegistryError::invalid(
            "tenant",
            format!("tenant names are {}", names::TENANT_RULE),
        ))
    }
}

fn tenant_from_row(row: &sqlx::any::AnyRow) -> Result<TenantPolicy> {
    Ok(TenantPolicy {
        tenant: row.try_get("tenant")?,
        allowed_regions: regions_from_text(&row.try_get::<String, _>("allowed_regions")?)?,
        updated_by: row.try_get("updated_by")?,
        updated_at: row.try_get("updated_at")?,
    })
}

async fn fetch_tenant_policy(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    tenant: &str,
) -> Result<Option<TenantPolicy>> {
    sqlx::query("SELECT tenant, allowed_regions, updated_by, updated_at FROM tenant_policies WHERE tenant = $1")
        .bind(tenant)
        .fetch_optional(&mut **tx)
        .await?
        .as_ref()
        .map(tenant_from_row)
        .transpose()
}

async fn record_history(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    scope: &str,
    subject: &str,
    regions: Option<&[String]>,
    actor: &str,
    at: Millis,
) -> Result<()> {
    sqlx::query("INSERT INTO residency_history (scope, subject, allowed_regions, actor, at) VALUES ($1, $2, $3, $4, $5)")
        .bind(scope)
        .bind(subject)
        .bind(regions.map(|regions| json_text(&regions)).transpose()?)
        .bind(actor)
        .bind(at)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

impl ModelRegistry {
    pub async fn get_model_residency(&self, model: &str) -> Result<ModelResidency> {
        let row = sqlx::query("SELECT allowed_regions, residency_updated_by, residency_updated_at FROM models WHERE name = $1")
            .bind(model)
            .fetch_optional(&self.store.pool)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("model '{model}' does not exist")))?;
        Ok(ModelResidency {
            model: model.to_owned(),
            allowed_regions: regions_from_text(&row.try_get::<String, _>("allowed_regions")?)?,
            updated_by: row.try_get("residency_updated_by")?,
            updated_at: row.try_get("residency_updated_at")?,
        })
    }

    /// Sets the regions a model's requests may be processed in; an empty
    /// list lifts the model-level restriction. Routers hear of it through
    /// Watch (the model's state changes).
    pub async fn set_model_residency(
        &self,
        model: &str,
        regions: Vec<String>,
        actor: &str,
    ) -> Result<ModelResidency> {
        validate_model_name(model)?;
        validate_regions(&regions)?;
        let requested_by = actor;
        let actor = actor_or_anonymous(actor);
        let now = now_millis();
        self.admit()?;
        let mut tx = self.store.begin_write().await?;
        let before = sqlx::query("SELECT allowed_regions, residency_updated_by, residency_updated_at FROM models WHERE name = $1")
            .bind(model)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| -> Result<ModelResidency> {
                Ok(ModelResidency {
                    model: model.to_owned(),
                    allowed_regions: regions_from_text(&row.try_get::<String, _>("allowed_regions")?)?,
                    updated_by: row.try_get("residency_updated_by")?,
                    updated_at: row.try_get("residency_updated_at")?,
                })
            })
            .transpose()?;
        let updated = sqlx::query("UPDATE models SET allowed_regions = $1, residency_updated_by = $2, residency_updated_at = $3 WHERE name = $4")
            .bind(json_text(&regions)?)
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
        record_history(&mut tx, "model", model, Some(&regions), &actor, now).await?;
        let revision = record_change(&mut tx, model).await?;
        tx.commit().await?;
        self.notify(revision);
        tracing::info!(model, regions = ?regions, %actor, "model residency set");
        let after = ModelResidency {
            model: model.to_owned(),
            allowed_regions: regions,
            updated_by: actor,
            updated_at: now,
        };
        self.audit(Change {
            action: "residency.model",
            actor: requested_by,
            model,
            before: audit_json_opt(before.as_ref()),
            after: audit_json(&after),
            ..Change::default()
        });
        Ok(after)
    }

    /// Every tenant policy, by tenant.
    pub async fn list_tenant_policies(&self) -> Result<Vec<TenantPolicy>> {
        sqlx::query("SELECT tenant, allowed_regions, updated_by, updated_at FROM tenant_policies ORDER BY tenant")
            .fetch_all(&self.store.pool)
            .await?
            .iter()
            .map(tenant_from_row)
            .collect()
    }

    pub async fn get_tenant_policy(&self, tenant: &str) -> Result<TenantPolicy> {
        validate_tenant(tenant)?;
        let row = sqlx::query("SELECT tenant, allowed_regions, updated_by, updated_at FROM tenant_policies WHERE tenant = $1")
            .bind(tenant)
            .fetch_optional(&self.store.pool)
            .await?
            .ok_or_else(|| {
                RegistryError::NotFound(format!("tenant '{tenant}' has no residency policy"))
            })?;
        tenant_from_row(&row)
    }

    /// Creates or replaces a tenant's policy (at least one region).
    pub async fn set_tenant_policy(
        &self,
        tenant: &str,
        regions: Vec<String>,
        actor: &str,
    ) -> Result<TenantPolicy> {
        validate_tenant(tenant)?;
        if regions.is_empty() {
            return Err(RegistryError::invalid(
                "allowed_regions",
                "must list at least one region (DELETE the policy to lift it)",
            ));
        }
        validate_regions(&regions)?;
        let policy = TenantPolicy {
            tenant: tenant.to_owned(),
            allowed_regions: regions,
            updated_by: actor_or_anonymous(actor),
            updated_at: now_millis(),
        };
        self.admit()?;
        let mut tx = self.store.begin_write().await?;
        let before = fetch_tenant_policy(&mut tx, tenant).await?;
        sqlx::query("INSERT INTO tenant_policies (tenant, allowed_regions, updated_by, updated_at) VALUES ($1, $2, $3, $4) ON CONFLICT (tenant) DO UPDATE SET allowed_regions = excluded.allowed_regions, updated_by = excluded.updated_by, updated_at = excluded.updated_at")
            .bind(&policy.tenant)
            .bind(json_text(&policy.allowed_regions)?)
            .bind(&policy.updated_by)
            .bind(policy.updated_at)
            .execute(&mut *tx)
            .await?;
        record_history(
            &mut tx,
            "tenant",
            tenant,
            Some(&policy.allowed_regions),
            &policy.updated_by,
            policy.updated_at,
        )
        .await?;
        let revision = record_change_of(&mut tx, change_kind::TENANTS, tenant).await?;
        tx.commit().await?;
        self.notify(revision);
        tracing::info!(tenant, regions = ?policy.allowed_regions, actor = %policy.updated_by, "tenant residency policy set");
        self.audit(Change {
            action: "residency.tenant.set",
            actor,
            tenant,
            before: audit_json_opt(before.as_ref()),
            after: audit_json(&policy),
            ..Change::default()
        });
        Ok(policy)
    }

    /// Removes a tenant's policy.
    pub async fn delete_tenant_policy(&self, tenant: &str, actor: &str) -> Result<()> {
        validate_tenant(tenant)?;
        let requested_by = actor;
        let actor = actor_or_anonymous(actor);
        self.admit()?;
        let mut tx = self.store.begin_write().await?;
        let before = fetch_tenant_policy(&mut tx, tenant).await?;
        let deleted = sqlx::query("DELETE FROM tenant_policies WHERE tenant = $1")
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        if deleted.rows_affected() == 0 {
            return Err(RegistryError::NotFound(format!(
                "tenant '{tenant}' has no residency policy"
            )));
        }
        record_history(&mut tx, "tenant", tenant, None, &actor, now_millis()).await?;
        let revision = record_change_of(&mut tx, change_kind::TENANTS, tenant).await?;
        tx.commit().await?;
        self.notify(revision);
        tracing::info!(tenant, %actor, "tenant residency policy deleted");
        self.audit(Change {
            action: "residency.tenant.delete",
            actor: requested_by,
            tenant,
            before: audit_json_opt(before.as_ref()),
            ..Change::default()
        });
        Ok(())
    }

    /// Every residency change, oldest first, a page at a time.
    pub async fn residency_history(
        &self,
        page_size_requested: Option<u32>,
        token: Option<&str>,
    ) -> Result<Page<ResidencyChange>> {
        let page = PageRequest::<i64>::new(page_size_requested, token)?;
        let rows = sqlx::query("SELECT id, scope, subject, allowed_regions, actor, at FROM residency_history WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(page.after)
            .bind(page.fetch_limit())
            .fetch_all(&self.store.pool)
            .await?;
        let items = rows
            .iter()
            .map(|row| {
                let regions: Option<String> = row.try_get("allowed_regions")?;
                Ok(ResidencyChange {
                    id: row.try_get::<i64, _>("id")? as u64,
                    scope: row.try_get("scope")?,
                    subject: row.try_get("subject")?,
                    allowed_regions: regions.as_deref().map(regions_from_text).transpose()?,
                    actor: row.try_get("actor")?,
                    at: row.try_get("at")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(page.page(items, |change| change.id.to_string()))
    }

    /// The complete set of tenant policies, as Watch carries it.
    pub async fn tenant_policies_proto(&self) -> Result<proto::TenantPolicies> {
        Ok(proto::TenantPolicies {
            policies: self
                .list_tenant_policies()
                .await?
                .into_iter()
                .map(|policy| proto::TenantPolicy {
                    tenant: policy.tenant,
                    allowed_regions: policy.allowed_regions,
                })
                .collect(),
        })
    }
}
