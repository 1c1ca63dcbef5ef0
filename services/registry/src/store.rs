//! The database: one set of queries for Postgres and SQLite (sqlx's `Any`
//! driver), migrations per backend, and row decoding.

use sqlx::any::AnyRow;
use sqlx::{Any, AnyPool, Row, Transaction};

use crate::error::{RegistryError, Result};
use crate::model::*;

pub use shamal_sql::Backend;

static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// A connection pool with the schema migrated.
#[derive(Clone)]
pub struct Store {
    pub pool: AnyPool,
    pub backend: Backend,
}

impl Store {
    /// Connects and applies pending migrations (`shamal_sql::open`: SQLite
    /// on one connection, Postgres on up to 16).
    pub async fn connect(url: &str) -> Result<Store> {
        let (pool, backend) = shamal_sql::open(
            url,
            shamal_sql::Migrations {
                postgres: &POSTGRES_MIGRATIONS,
                sqlite: &SQLITE_MIGRATIONS,
            },
        )
        .await
        .map_err(|error| match error {
            shamal_sql::OpenError::Url => {
                RegistryError::invalid("database_url", shamal_sql::URL_RULE)
            }
            other => RegistryError::Internal(other.to_string()),
        })?;
        Ok(Store { pool, backend })
    }

    /// Starts a write transaction. On Postgres every writer first takes one
    /// advisory lock, so that change revisions commit in the order they are
    /// numbered (a Watch reader never skips a revision committed late);
    /// SQLite has a single connection.
    pub async fn begin_write(&self) -> Result<Transaction<'static, Any>> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT 1 AS locked FROM (SELECT pg_advisory_xact_lock(7412001)) AS held")
                .fetch_one(&mut *tx)
                .await?;
        }
        Ok(tx)
    }
}

/// What a change-log record is about (`changes.kind`).
pub mod change_kind {
    /// A model's routed state; the record's subject is the model name.
    pub const MODEL: &str = "model";
    /// A worker's membership; the subject is the worker id.
    pub const WORKER: &str = "worker";
    /// The tenant residency policies; the subject is the tenant.
    pub const TENANTS: &str = "tenants";
    /// A model's placement policy (which also changes its routed state);
    /// the subject is the model name.
    pub const PLACEMENT: &str = "placement";
}

/// Records that `model`'s routed state changed; returns the new revision.
pub async fn record_change(tx: &mut Transaction<'static, Any>, model: &str) -> Result<u64> {
    record_change_of(tx, change_kind::MODEL, model).await
}

/// Appends a change of `kind` about `subject` to the change log; returns
/// the new revision.
pub async fn record_change_of(
    tx: &mut Transaction<'static, Any>,
    kind: &str,
    subject: &str,
) -> Result<u64> {
    let row =
        sqlx::query("INSERT INTO changes (model, kind, at) VALUES ($1, $2, $3) RETURNING revision")
            .bind(subject)
            .bind(kind)
            .bind(now_millis())
            .fetch_one(&mut **tx)
            .await?;
    Ok(row.try_get::<i64, _>("revision")? as u64)
}

pub fn json_text<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|error| RegistryError::Internal(error.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_json::from_str(text)
        .map_err(|error| RegistryError::Internal(format!("stored {what} is not valid: {error}")))
}

pub fn model_from_row(row: &AnyRow) -> Result<Model> {
    Ok(Model {
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
        latest_version: row.try_get::<i64, _>("latest_version")? as u64,
    })
}

pub const VERSION_COLUMNS: &str = "model, version, sha256, size_bytes, format, signature, metadata, lineage, lifecycle, reason, created_by, created_at";

pub fn version_from_row(row: &AnyRow) -> Result<Version> {
    let format: String = row.try_get("format")?;
    let lifecycle: String = row.try_get("lifecycle")?;
    let signature: Option<String> = row.try_get("signature")?;
    Ok(Version {
        model: row.try_get("model")?,
        version: row.try_get::<i64, _>("version")? as u64,
        artifact: Artifact {
            sha256: row.try_get("sha256")?,
            size_bytes: row.try_get::<i64, _>("size_bytes")? as u64,
            format: Format::parse(&format).ok_or_else(|| {
                RegistryError::Internal(format!("unknown stored format {format}"))
            })?,
        },
        signature: signature
            .as_deref()
            .map(|text| from_json(text, "signature"))
            .transpose()?,
        metadata: from_json(&row.try_get::<String, _>("metadata")?, "metadata")?,
        lineage: from_json(&row.try_get::<String, _>("lineage")?, "lineage")?,
        lifecycle: Lifecycle::parse(&lifecycle).ok_or_else(|| {
            RegistryError::Internal(format!("unknown stored lifecycle {lifecycle}"))
        })?,
        reason: row.try_get("reason")?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
    })
}

pub fn alias_from_row(row: &AnyRow) -> Result<Alias> {
    Ok(Alias {
        model: row.try_get("model")?,
        alias: row.try_get("alias")?,
        version: row.try_get::<i64, _>("version")? as u64,
        updated_by: row.try_get("updated_by")?,
        updated_at: row.try_get("updated_at")?,
    })
}

pub fn rollout_from_row(row: &AnyRow) -> Result<Rollout> {
    let mut rollout: Rollout = from_json(&row.try_get::<String, _>("policy")?, "rollout")?;
    rollout.revision = row.try_get::<i64, _>("revision")? as u64;
    Ok(rollout)
}

pub fn history_from_row(row: &AnyRow) -> Result<HistoryEntry> {
    let rollout: Rollout = from_json(&row.try_get::<String, _>("policy")?, "rollout")?;
    Ok(HistoryEntry {
        id: row.try_get::<i64, _>("id")? as u64,
        model: row.try_get("model")?,
        revision: row.try_get::<i64, _>("revision")? as u64,
        action: row.try_get("action")?,
        actor: row.try_get("actor")?,
        reason: row.try_get("reason")?,
        at: row.try_get("at")?,
        rollout,
    })
}

pub const WORKER_COLUMNS: &str = "id, address, region, formats, device, last_seen, capacity, state, state_reason, state_changed_at, registered_at";

/// A worker row (`WORKER_COLUMNS`); heartbeat figures are the registry's
/// to overlay.
pub fn worker_status_from_row(row: &AnyRow) -> Result<WorkerStatus> {
    let state: String = row.try_get("state")?;
    Ok(WorkerStatus {
        id: row.try_get("id")?,
        address: row.try_get("address")?,
        region: row.try_get("region")?,
        formats: from_json(&row.try_get::<String, _>("formats")?, "formats")?,
        device: row.try_get("device")?,
        capacity: u32::try_from(row.try_get::<i64, _>("capacity")?).unwrap_or(u32::MAX),
        state: MemberState::parse(&state).ok_or_else(|| {
            RegistryError::Internal(format!("unknown stored worker state {state}"))
        })?,
        state_reason: row.try_get("state_reason")?,
        state_changed_at: row.try_get("state_changed_at")?,
        last_heartbeat: row.try_get("last_seen")?,
        inflight: 0,
        queue_depth: 0,
        registered_at: row.try_get("registered_at")?,
    })
}

/// A JSON list of region names as stored.
pub fn regions_from_text(text: &str) -> Result<Vec<String>> {
    from_json(text, "allowed_regions")
}

pub fn placement_from_row(row: &AnyRow) -> Result<Placement> {
    Ok(Placement {
        worker_id: row.try_get("worker_id")?,
        model: row.try_get("model")?,
        version: row.try_get::<i64, _>("version")? as u64,
        state: row.try_get("state")?,
        reason: row.try_get("reason")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Whether a database error is a unique-key violation (a concurrent writer
/// inserted the same key first).
pub fn is_unique_violation(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(database) => {
            database.is_unique_violation()
                || database
                    .code()
                    .is_some_and(|code| code == "23505" || code == "2067" || code == "1555")
        }
        _ => false,
    }
}
