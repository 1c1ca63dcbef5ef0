//! Opening a service's SQL store: one set of queries for Postgres and
//! SQLite (sqlx's `Any` driver), the engine chosen by the URL, migrations
//! per engine. The registry and the audit service open theirs here; each
//! keeps its own queries, migrations and write locks.

use std::time::Duration;

use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;

/// The database engine behind a connection URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// What `database_url` must look like.
pub const URL_RULE: &str = "must start with postgres://, postgresql:// or sqlite:";

impl Backend {
    /// The engine of `url`; [`OpenError::Url`] for anything else.
    pub fn from_url(url: &str) -> Result<Backend, OpenError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            Err(OpenError::Url)
        }
    }
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// `database_url` names no supported engine.
    #[error("database_url {URL_RULE}")]
    Url,
    /// The database could not be reached or created (credentials in URLs
    /// redacted).
    #[error("cannot open {backend:?} database: {message}")]
    Open { backend: Backend, message: String },
    #[error("migrations failed: {0}")]
    Migrate(String),
}

/// A service's migrations, one set per engine (`sqlx::migrate!`).
#[derive(Clone, Copy)]
pub struct Migrations {
    pub postgres: &'static Migrator,
    pub sqlite: &'static Migrator,
}

/// Connects to `url` and applies the pending migrations of its engine.
///
/// - SQLite: the file's directory is created, and the file too
///   (`mode=rwc`) unless the URL says otherwise; one connection (SQLite
///   serialises writers anyway, and a single writer never meets
///   `SQLITE_BUSY`); an in-memory database is kept open for the pool's
///   life. A file database runs in write-ahead-log mode with full
///   synchronisation: a commit is one append and one `fsync` of the log,
///   instead of the rollback journal's create, two `fsync`s and delete
///   (`perf` of the audit service on SQLite: the journal was a quarter of
///   its CPU), and a commit is still durable when it returns.
/// - Postgres: up to 16 connections.
///
/// Connections wait at most 10 s for a free one.
pub async fn open(url: &str, migrations: Migrations) -> Result<(AnyPool, Backend), OpenError> {
    sqlx::any::install_default_drivers();
    let backend = Backend::from_url(url)?;
    let url = match backend {
        Backend::Sqlite => {
            create_sqlite_dir(url, backend)?;
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
    let options = if url.contains(":memory:") {
        options
            .idle_timeout(None)
            .max_lifetime(None)
            .min_connections(1)
    } else if backend == Backend::Sqlite {
        options.after_connect(|connection, _| {
            Box::pin(async move {
                sqlx::query("PRAGMA journal_mode = WAL")
                    .execute(&mut *connection)
                    .await?;
                sqlx::query("PRAGMA synchronous = FULL")
                    .execute(&mut *connection)
                    .await?;
                // Statement journals (a multi-row INSERT's undo) in memory,
                // not in a temporary file written for every statement.
                sqlx::query("PRAGMA temp_store = MEMORY")
                    .execute(&mut *connection)
                    .await?;
                Ok(())
            })
        })
    } else {
        options
    };
    let pool = options
        .connect(&url)
        .await
        .map_err(|error| OpenError::Open {
            backend,
            message: shamal_telemetry::config::redact_urls(&error.to_string()).into_owned(),
        })?;
    let migrator = match backend {
        Backend::Postgres => migrations.postgres,
        Backend::Sqlite => migrations.sqlite,
    };
    migrator
        .run(&pool)
        .await
        .map_err(|error| OpenError::Migrate(error.to_string()))?;
    Ok((pool, backend))
}

/// Creates the directory of a `sqlite://path` database file.
fn create_sqlite_dir(url: &str, backend: Backend) -> Result<(), OpenError> {
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
        std::fs::create_dir_all(parent).map_err(|error| OpenError::Open {
            backend,
            message: format!("cannot create {}: {error}", parent.display()),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    static NONE: Migrator = Migrator::DEFAULT;

    #[test]
    fn the_url_names_the_engine() {
        assert_eq!(
            Backend::from_url("postgres://h/db").unwrap(),
            Backend::Postgres
        );
        assert_eq!(
            Backend::from_url("postgresql://h/db").unwrap(),
            Backend::Postgres
        );
        assert_eq!(Backend::from_url("sqlite://x.db").unwrap(), Backend::Sqlite);
        assert_eq!(
            Backend::from_url("sqlite::memory:").unwrap(),
            Backend::Sqlite
        );
        let error = Backend::from_url("mysql://h/db").unwrap_err();
        assert_eq!(
            error.to_string(),
            "database_url must start with postgres://, postgresql:// or sqlite:"
        );
    }

    #[tokio::test]
    async fn a_sqlite_file_and_its_directory_are_created() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nested/deeper/store.db");
        let migrations = Migrations {
            postgres: &NONE,
            sqlite: &NONE,
        };
        let (pool, backend) = open(&format!("sqlite://{}", file.display()), migrations)
            .await
            .unwrap();
        assert_eq!(backend, Backend::Sqlite);
        sqlx::query("CREATE TABLE t (x BIGINT)")
            .execute(&pool)
            .await
            .unwrap();
        assert!(file.exists());
    }

    #[tokio::test]
    async fn a_sqlite_file_runs_in_write_ahead_log_mode_with_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("store.db");
        let migrations = Migrations {
            postgres: &NONE,
            sqlite: &NONE,
        };
        let (pool, _) = open(&format!("sqlite://{}", file.display()), migrations)
            .await
            .unwrap();
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        // 2 = FULL: a commit is durable when it returns.
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(sync, 2);
        sqlx::query("CREATE TABLE t (x BIGINT)")
            .execute(&pool)
            .await
            .unwrap();
        assert!(dir.path().join("store.db-wal").exists());
    }

    #[tokio::test]
    async fn an_unreachable_postgres_is_an_open_error_without_the_password() {
        let migrations = Migrations {
            postgres: &NONE,
            sqlite: &NONE,
        };
        let error = open("postgres://user:secret@127.0.0.1:1/db", migrations)
            .await
            .unwrap_err();
        assert!(matches!(error, OpenError::Open { .. }), "{error}");
        assert!(!error.to_string().contains("secret"), "{error}");
    }
}
