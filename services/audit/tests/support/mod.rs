//! Audit logs for tests: SQLite in a temporary file, or a fresh database
//! on the PostgreSQL server at `SHAMAL_TEST_POSTGRES_URL`
//! (`scripts/ensure-postgres.sh` prints one), under the skip policy of
//! every test that needs a service (`services`, `docs/testing.md`): unset,
//! the PostgreSQL cases are skipped loudly, or fail under
//! `SHAMAL_REQUIRE_SERVICES=1` as in `scripts/test.sh`; set, the server
//! must answer.
#![allow(dead_code, clippy::unwrap_used)]

#[path = "../../../../tests/support/services.rs"]
pub mod services;

use std::sync::Arc;
use std::time::Duration;

use shamal_audit::export::{Line, write_line};
use shamal_audit::{Event, Report};
use shamal_audit_service::AuditLog;
use shamal_audit_service::log::CheckpointPolicy;
use shamal_audit_service::metrics::AuditMetrics;
use shamal_audit_service::store::Store;
use sqlx::Connection;

pub struct TestDb {
    pub url: String,
    pub dir: tempfile::TempDir,
    drop_database: Option<(String, String)>,
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("audit.db").display()
        );
        TestDb {
            url,
            dir,
            drop_database: None,
        }
    }

    /// A database of its own on the test PostgreSQL server; `None` (the
    /// test is skipped) when `SHAMAL_TEST_POSTGRES_URL` is unset and
    /// skipping is allowed.
    pub async fn postgres() -> Option<TestDb> {
        let admin = services::configured(
            "SHAMAL_TEST_POSTGRES_URL",
            "PostgreSQL audit store test",
            "scripts/ensure-postgres.sh prints a URL for it",
        )?;
        let mut connection = sqlx::postgres::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|error| services::unusable("SHAMAL_TEST_POSTGRES_URL", &admin, error));
        let name = format!("shamal_audit_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut connection)
            .await
            .unwrap();
        let base = admin.rsplit_once('/').map(|(base, _)| base).unwrap();
        Some(TestDb {
            url: format!("{base}/{name}"),
            dir: tempfile::tempdir().unwrap(),
            drop_database: Some((admin, name)),
        })
    }

    /// The signing key file of this database's logs.
    pub fn key_file(&self) -> std::path::PathBuf {
        self.dir.path().join("audit-signing-key.pem")
    }

    /// A log over this database (a "replica": its own pool, its own
    /// in-process lock), checkpointing every `every` records.
    pub async fn open_with(&self, every: u64) -> Arc<AuditLog> {
        let store = Store::connect(&self.url).await.unwrap();
        let signer = shamal_audit::Signer::load_or_create(&self.key_file()).unwrap();
        Arc::new(AuditLog::new(
            store,
            signer,
            AuditMetrics::unregistered(),
            CheckpointPolicy {
                every,
                interval: Duration::from_secs(3600),
            },
        ))
    }

    pub async fn open(&self) -> Arc<AuditLog> {
        self.open_with(1000).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.drop_database.take() {
            // Best effort, on a thread of its own: Drop cannot await.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    if let Ok(mut connection) = sqlx::postgres::PgConnection::connect(&admin).await
                    {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut connection)
                                .await;
                    }
                });
            })
            .join();
        }
    }
}

/// A valid event; `n` makes its id and request id unique.
pub fn event(n: u64) -> Event {
    Event {
        event_id: format!("evt-{n:06}"),
        occurred_at_ms: 1_700_000_000_000 + n as i64,
        service: "router".to_owned(),
        instance: "router-0".to_owned(),
        action: "inference".to_owned(),
        outcome: "ok".to_owned(),
        actor: "alice".to_owned(),
        client_id: "shamal-inference".to_owned(),
        tenant: "acme".to_owned(),
        model: "fraud".to_owned(),
        version: "1".to_owned(),
        region: "eu".to_owned(),
        worker: "worker-0".to_owned(),
        request_id: format!("req-{n}"),
        latency_us: 1200 + n,
        request_sha256: "ab".repeat(32),
        response_sha256: "cd".repeat(32),
        before_json: String::new(),
        after_json: String::new(),
        reason: String::new(),
    }
}

/// Events `from..to`.
pub fn events(range: std::ops::Range<u64>) -> Vec<Event> {
    range.map(event).collect()
}

/// Exports `[since, until)` into JSON Lines.
pub async fn export_lines(log: &AuditLog, since_ms: i64, until_ms: i64) -> Vec<Line> {
    let (sender, mut receiver) = tokio::sync::mpsc::channel(16);
    let exporting = async {
        log.export_into(since_ms, until_ms, &sender).await.unwrap();
        drop(sender);
    };
    let collecting = async {
        let mut lines = Vec::new();
        while let Some(line) = receiver.recv().await {
            lines.push(line.unwrap());
        }
        lines
    };
    let ((), lines) = tokio::join!(exporting, collecting);
    lines
}

/// The export file of `lines`.
pub fn file_of(lines: &[Line]) -> Vec<u8> {
    let mut file = Vec::new();
    for line in lines {
        write_line(&mut file, line).unwrap();
    }
    file
}

/// Verifies `lines` offline as an export file.
pub fn verify_offline(
    lines: &[Line],
    key: &shamal_audit::PublicKey,
) -> Result<Report, shamal_audit::Failure> {
    shamal_audit::verify_export(&file_of(lines)[..], key)
}
