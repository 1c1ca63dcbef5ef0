//! Registries for tests: SQLite in a temporary file, or a fresh database
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

use sha2::{Digest, Sha256};
use shamal_registry::ModelRegistry;
use shamal_registry::model::{NewVersion, WorkerInfo};
use sqlx::Connection;

/// The make-before-break grace of the registries these tests open.
pub const PLACEMENT_GRACE_MS: u64 = 200;

pub struct TestDb {
    pub url: String,
    pub dir: tempfile::TempDir,
    drop_database: Option<(String, String)>,
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("registry.db").display());
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
            "PostgreSQL store test",
            "scripts/ensure-postgres.sh prints a URL for it",
        )?;
        let mut connection = sqlx::postgres::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|error| services::unusable("SHAMAL_TEST_POSTGRES_URL", &admin, error));
        let name = format!("shamal_test_{}", uuid::Uuid::new_v4().simple());
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

    pub async fn open(&self) -> Arc<ModelRegistry> {
        let config = shamal_registry::RegistryConfig {
            database_url: self.url.clone(),
            artifact_dir: self.dir.path().join("artifacts"),
            // Placement moves complete within a test's patience.
            placement_grace_ms: PLACEMENT_GRACE_MS,
            ..Default::default()
        };
        shamal_registry::open(&config).await.unwrap()
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

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn body(bytes: Vec<u8>) -> futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>> {
    use futures::StreamExt;
    futures::stream::iter(
        bytes
            .chunks(7)
            .map(|chunk| Ok(bytes::Bytes::copy_from_slice(chunk)))
            .collect::<Vec<_>>(),
    )
    .boxed()
}

/// Uploads `bytes` and registers them as a new ONNX version of `model`.
pub async fn push(registry: &ModelRegistry, model: &str, bytes: &[u8]) -> u64 {
    let digest = sha256_hex(bytes);
    registry
        .put_artifact(&digest, body(bytes.to_vec()))
        .await
        .unwrap();
    registry
        .register_version(
            model,
            NewVersion {
                sha256: digest,
                format: "onnx".to_owned(),
                ..Default::default()
            },
            "tester",
        )
        .await
        .unwrap()
        .version
}

/// Reports `version` ready on a test worker (what a worker does over gRPC).
pub async fn mark_ready(registry: &ModelRegistry, model: &str, version: u64) {
    registry
        .register_worker(WorkerInfo {
            id: "worker-test".to_owned(),
            address: "127.0.0.1:1".to_owned(),
            region: "local".to_owned(),
            formats: vec!["onnx".to_owned()],
            device: "cpu".to_owned(),
            last_seen: 0,
        })
        .await
        .unwrap();
    registry
        .report_placement("worker-test", model, version, "ready", "", "")
        .await
        .unwrap();
}
