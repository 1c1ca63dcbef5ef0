//! The database: one set of queries for Postgres and SQLite (sqlx's `Any`
//! driver), migrations per backend (`migrations/postgres`,
//! `migrations/sqlite`), and the append lock.

use sqlx::{Any, AnyPool, Transaction};

use crate::error::{AuditError, Result};

pub use shamal_sql::Backend;

static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// A connection pool with the schema migrated.
#[derive(Clone, Debug)]
pub struct Store {
    pub pool: AnyPool,
    pub backend: Backend,
}

impl Store {
    /// Connects (creating a SQLite file and its directory) and applies
    /// pending migrations (`shamal_sql::open`: SQLite on one connection,
    /// Postgres on up to 16).
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
            shamal_sql::OpenError::Url => AuditError::invalid("database_url", shamal_sql::URL_RULE),
            other => AuditError::Internal(other.to_string()),
        })?;
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
