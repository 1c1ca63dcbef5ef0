//! The database: one set of queries for Postgres and SQLite (sqlx's `Any`
//! driver), migrations per backend (`migrations/postgres`,
//! `migrations/sqlite`), and the append lock.

use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{Any, AnyPool, Transaction};

use crate::error::{AuditError, Result};

/// The database engine behind a connection URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn from_url(url: &str) -> Result<Backend> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            Err(AuditError::invalid(
                "database_url",
                "must start with postgres://, postgresql:// or sqlite:",
            ))
        }
    }
}

static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// A connection pool with the schema migrated.
#[derive(Clone, Debug)]
pub struct Store {
    pub pool: AnyPool,
    pub backend: Backend,
}

impl Store {
    /// Connects (creating a SQLite file's directory) and applies pending
    /// migrations. SQLite runs on a single connection: its writers are
    /// serialised anyway, and a single writer never meets `SQLITE_BUSY`.
    pub async fn connect(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        let url = match backend {
            Backend::Sqlite => {
                create_sqlite_dir(url)?;
                if !url.contains("mode=") && !url.contains(":memory:") {
                    let separator = if url.contains('?') { '&' } else { '?' };
                    format!("{url}{separator}mode=rwc")
                } else {
                    url.to_owned()
                }
            }
            Backend::Postgres => url.to_owned(),
        };
        let options = AnyPoolOptions::new()
            .acquire_timeout(Duration::from_secs(10))
            .max_connections(match backend {
                Backend::Postgres => 16,
                Backend::Sqlite => 1,
            });
        // An in-memory SQLite database lives as long as its connection.
        let options = if url.contains(":memory:") {
            options
                .idle_timeout(None)
                .max_lifetime(None)
                .min_connections(1)
        } else {
            options
        };
        let pool = options.connect(&url).await.map_err(|error| {
            AuditError::Internal(format!(
                "cannot open {backend:?} database: {}",
                shamal_telemetry::config::redact_urls(&error.to_string())
            ))
        })?;
        let migrator = match backend {
            Backend::Postgres => &POSTGRES_MIGRATIONS,
            Backend::Sqlite => &SQLITE_MIGRATIONS,
        };
        migrator
            .run(&pool)
            .await
            .map_err(|error| AuditError::Internal(format!("migrations failed: {error}")))?;
        Ok(Store { pool, backend })
    }

    /// Starts the transaction of a change to the chain (an append, a
    /// retention pass), serialised at the database against every other
    /// writer, in this process or another: on Postgres it locks the one
    /// row of `audit_append_lock` (`SELECT ... FOR UPDATE`, held to commit
    /// or rollback); on SQLite it takes the database's write lock at once
    /// with a write that changes nothing, so that a second process waits
    /// (busy timeout) instead of failing when it upgrades from reading.
    pub async fn begin_append(&self) -> Result<Transaction<'static, Any>> {
        let mut tx = self.pool.begin().await?;
        match self.backend {
            Backend::Postgres => {
                sqlx::query("SELECT id FROM audit_append_lock WHERE id = 1 FOR UPDATE")
                    .fetch_one(&mut *tx)
                    .await?;
            }
            Backend::Sqlite => {
                sqlx::query("DELETE FROM audit_append_lock WHERE id = 0")
                    .execute(&mut *tx)
                    .await?;
            }
        }
        Ok(tx)
    }
}

/// Creates the directory of a `sqlite://path` database file.
fn create_sqlite_dir(url: &str) -> Result<()> {
    let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        return Ok(());
    };
    let path = path.split('?').next().unwrap_or(path);
    if path.is_empty() || path.starts_with(":memory:") {
        return Ok(());
    }
    if let Some(parent) = std::path::Path::new(path).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|error| {
            AuditError::Internal(format!("cannot create {}: {error}", parent.display()))
        })?;
    }
    Ok(())
}
