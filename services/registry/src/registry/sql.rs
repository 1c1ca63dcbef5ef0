//! SQL helpers the operations share inside their write transactions.

use sqlx::{Any, Row, Transaction};

use crate::error::{RegistryError, Result};
use crate::model::*;
use crate::store::*;

pub(super) async fn insert_model(tx: &mut Transaction<'static, Any>, model: &Model) -> Result<()> {
    sqlx::query("INSERT INTO models (name, description, created_by, created_at, latest_version) VALUES ($1, $2, $3, $4, 0)")
        .bind(&model.name)
        .bind(&model.description)
        .bind(&model.created_by)
        .bind(model.created_at)
        .execute(&mut **tx)
        .await
        .map_err(|error| {
            if is_unique_violation(&error) {
                RegistryError::AlreadyExists(format!("model '{}' already exists", model.name))
            } else {
                error.into()
            }
        })?;
    Ok(())
}

pub(super) async fn upsert_alias(tx: &mut Transaction<'static, Any>, alias: &Alias) -> Result<()> {
    sqlx::query("INSERT INTO aliases (model, alias, version, updated_by, updated_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (model, alias) DO UPDATE SET version = excluded.version, updated_by = excluded.updated_by, updated_at = excluded.updated_at")
        .bind(&alias.model)
        .bind(&alias.alias)
        .bind(alias.version as i64)
        .bind(&alias.updated_by)
        .bind(alias.updated_at)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub(super) async fn fetch_alias(
    tx: &mut Transaction<'static, Any>,
    model: &str,
    alias: &str,
) -> Result<Option<u64>> {
    let row = sqlx::query("SELECT version FROM aliases WHERE model = $1 AND alias = $2")
        .bind(model)
        .bind(alias)
        .fetch_optional(&mut **tx)
        .await?;
    row.map(|row| Ok(row.try_get::<i64, _>("version")? as u64))
        .transpose()
}

pub(super) async fn fetch_version(
    tx: &mut Transaction<'static, Any>,
    model: &str,
    version: u64,
) -> Result<Version> {
    let row = sqlx::query(&format!(
        "SELECT {VERSION_COLUMNS} FROM versions WHERE model = $1 AND version = $2"
    ))
    .bind(model)
    .bind(version as i64)
    .fetch_optional(&mut **tx)
    .await?;
    match row {
        Some(row) => version_from_row(&row),
        None => Err(RegistryError::NotFound(format!(
            "model '{model}' has no version {version}"
        ))),
    }
}

pub(super) async fn fetch_rollout(
    tx: &mut Transaction<'static, Any>,
    model: &str,
) -> Result<Option<Rollout>> {
    let row = sqlx::query("SELECT revision, policy FROM rollouts WHERE model = $1")
        .bind(model)
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(rollout_from_row).transpose()
}

/// A version may take traffic once a worker has it ready.
pub(super) async fn ensure_routable(
    tx: &mut Transaction<'static, Any>,
    model: &str,
    version: u64,
    field: &str,
) -> Result<()> {
    let found = match fetch_version(tx, model, version).await {
        Ok(found) => found,
        Err(RegistryError::NotFound(message)) => {
            return Err(RegistryError::invalid(field, message));
        }
        Err(error) => return Err(error),
    };
    match found.lifecycle {
        Lifecycle::Ready => Ok(()),
        Lifecycle::Registered => Err(RegistryError::FailedPrecondition(format!(
            "version {version} of '{model}' is registered but no worker has loaded it yet"
        ))),
        other => Err(RegistryError::FailedPrecondition(format!(
            "version {version} of '{model}' is {}: {}",
            other.as_str(),
            found.reason
        ))),
    }
}
