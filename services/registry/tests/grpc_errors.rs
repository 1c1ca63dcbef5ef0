//! MetricsRegistry gRPC errors over real gRPC: a database failure reaches the
//! caller as INTERNAL with a generic message and an error id, never the
//! database's own text.
#![allow(clippy::unwrap_used)]

mod support;

use shamal_proto::shamal::registry::v1::GetModelRequest;
use sqlx::Connection;
use support::*;

/// A registry on loopback over the given database.
async fn start(db: &TestDb) -> shamal_registry::RunningRegistry {
    let config = shamal_registry::RegistryConfig {
        http_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        grpc_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: None,
        database_url: db.url.clone(),
        artifact_dir: db.dir.path().join("artifacts"),
        ..Default::default()
    };
    let listeners = shamal_registry::RegistryListeners::bind(&config)
        .await
        .unwrap();
    shamal_registry::RunningRegistry::start(
        config,
        listeners,
        shamal_telemetry::MetricsRegistry::new(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_errors_do_not_leak_to_grpc_callers() {
    let db = TestDb::sqlite().await;
    let running = start(&db).await;
    push(&running.registry, "fraud", b"v1").await;

    // Break the database under the running registry: its next read of the
    // models fails inside sqlx ("no such table: models").
    let mut connection = sqlx::sqlite::SqliteConnection::connect(&db.url)
        .await
        .unwrap();
    for statement in ["PRAGMA foreign_keys = OFF", "DROP TABLE models"] {
        sqlx::query(statement)
            .execute(&mut connection)
            .await
            .unwrap();
    }
    connection.close().await.unwrap();

    let channel = shamal_registry_client::channel(&running.grpc_address.to_string()).unwrap();
    let mut client = shamal_registry_client::client(channel);
    let status = client
        .get_model(GetModelRequest {
            name: "fraud".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    let message = status.message().to_lowercase();
    for leak in [
        "table", "models", "sqlite", "sqlx", "database", "select", "query",
    ] {
        assert!(!message.contains(leak), "{leak:?} leaked: {message}");
    }
    assert!(message.contains("error id "), "{message}");
}
