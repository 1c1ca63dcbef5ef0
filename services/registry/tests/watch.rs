//! Watch over real gRPC: snapshot first, then changes; resume from a
//! revision; a snapshot again when the revision is unknown.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use shamal_proto::shamal::registry::v1::WatchRequest;
use shamal_registry::RunningRegistry;
use shamal_registry::model::StartRollout;
use support::*;

async fn next(
    stream: &mut tonic::Streaming<shamal_proto::shamal::registry::v1::WatchEvent>,
) -> shamal_proto::shamal::registry::v1::WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("no watch event within 5 s")
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_snapshot_then_changes_and_resumes() {
    let db = TestDb::sqlite().await;
    let running = RunningRegistry::start_local(&db.url, &db.dir.path().join("artifacts"))
        .await
        .unwrap();
    let registry = running.registry.clone();
    let version = push(&registry, "fraud", b"v1").await;
    mark_ready(&registry, "fraud", version).await;
    let second = push(&registry, "fraud", b"v2").await;
    mark_ready(&registry, "fraud", second).await;
    registry
        .set_alias("fraud", "production", 1, "alice")
        .await
        .unwrap();

    let channel = shamal_registry_client::channel(&running.grpc_address.to_string()).unwrap();
    let mut client = shamal_registry_client::client(channel.clone());
    let mut stream = client
        .watch(WatchRequest {
            since_revision: 0,
            subscriber: "test".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let snapshot = next(&mut stream).await;
    assert!(snapshot.snapshot);
    assert_eq!(snapshot.models.len(), 1);
    assert_eq!(snapshot.models[0].aliases.get("production"), Some(&1));
    assert!(snapshot.models[0].rollout.is_none());

    registry
        .start_rollout(
            "fraud",
            StartRollout {
                expected_revision: 0,
                candidate: 2,
                weight: 30,
                ..Default::default()
            },
            "alice",
        )
        .await
        .unwrap();
    let change = next(&mut stream).await;
    assert!(!change.snapshot);
    assert_eq!(change.revision, snapshot.revision + 1);
    let rollout = change.models[0].rollout.clone().unwrap();
    assert_eq!(rollout.splits[0].version, 2);
    assert_eq!(rollout.splits[0].weight, 30);

    // A subscriber resuming from the snapshot's revision gets just the change.
    let mut resumed = client
        .watch(WatchRequest {
            since_revision: snapshot.revision,
            subscriber: "test-resume".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let replay = next(&mut resumed).await;
    assert!(!replay.snapshot);
    assert_eq!(replay.revision, change.revision);
    assert_eq!(replay.models[0].rollout, change.models[0].rollout);

    // A revision from the future (e.g. the database was restored) gets a
    // snapshot.
    let mut future = client
        .watch(WatchRequest {
            since_revision: change.revision + 1_000,
            subscriber: "test-future".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let fresh = next(&mut future).await;
    assert!(fresh.snapshot);
    assert_eq!(fresh.revision, change.revision);

    // The client helper reconnects across a registry restart and resumes.
    let mut events = shamal_registry_client::watch(channel, "test-helper");
    let first = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(first.snapshot);
    let address = running.grpc_address;
    let http = running.http_address;
    running.stop().await.unwrap();
    let config = shamal_registry::RegistryConfig {
        grpc_listen: address,
        http_listen: http,
        metrics_listen: None,
        database_url: db.url.clone(),
        artifact_dir: db.dir.path().join("artifacts"),
        ..Default::default()
    };
    let listeners = loop {
        match shamal_registry::RegistryListeners::bind(&config).await {
            Ok(listeners) => break listeners,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let restarted = RunningRegistry::start(config, listeners, shamal_telemetry::Registry::new())
        .await
        .unwrap();
    restarted
        .registry
        .shift("fraud", 1, 60, "alice")
        .await
        .unwrap();
    let after_restart = loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap()
            .unwrap();
        if event.revision > first.revision {
            break event;
        }
    };
    assert!(
        !after_restart.snapshot,
        "resumed, not restarted from scratch"
    );
    assert_eq!(
        after_restart.models[0].rollout.as_ref().unwrap().splits[0].weight,
        60
    );
    restarted.stop().await.unwrap();
}

/// A subscriber that starts on an empty registry (revision 0) gets the
/// empty snapshot, then the very first change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_an_empty_registry_sees_the_first_change() {
    let db = TestDb::sqlite().await;
    let running = RunningRegistry::start_local(&db.url, &db.dir.path().join("artifacts"))
        .await
        .unwrap();
    let channel = shamal_registry_client::channel(&running.grpc_address.to_string()).unwrap();
    let mut stream = shamal_registry_client::client(channel)
        .watch(WatchRequest {
            since_revision: 0,
            subscriber: "test-empty".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let snapshot = next(&mut stream).await;
    assert!(snapshot.snapshot);
    assert_eq!(snapshot.revision, 0);
    assert!(snapshot.models.is_empty());
    push(&running.registry, "first", b"weights").await;
    let change = next(&mut stream).await;
    assert!(!change.snapshot, "a change, not another snapshot");
    assert_eq!(change.revision, 1);
    assert_eq!(change.models[0].name, "first");
    running.stop().await.unwrap();
}
