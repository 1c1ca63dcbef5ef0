//! Watch over real gRPC: snapshot first, then changes; resume from a
//! revision; a snapshot again when the revision is unknown.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use shamal_proto::shamal::registry::v1::{
    DeregisterWorkerRequest, HeartbeatRequest, RegisterWorkerRequest, WatchEvent, WatchRequest,
};
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

/// A registry on loopback with the given lease (heartbeat interval 250 ms).
async fn start_with_lease(db: &TestDb, lease_ms: u64) -> RunningRegistry {
    let config = shamal_registry::RegistryConfig {
        http_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        grpc_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: None,
        database_url: db.url.clone(),
        artifact_dir: db.dir.path().join("artifacts"),
        lease_ms,
        ..Default::default()
    };
    let listeners = shamal_registry::RegistryListeners::bind(&config)
        .await
        .unwrap();
    RunningRegistry::start(config, listeners, shamal_telemetry::MetricsRegistry::new())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_snapshot_then_changes_and_resumes() {
    let db = TestDb::sqlite().await;
    // The test worker never heartbeats: a long lease keeps it serving, so
    // that only the changes this test makes show up.
    let running = start_with_lease(&db, 600_000).await;
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
        lease_ms: 600_000,
        ..Default::default()
    };
    let listeners = loop {
        match shamal_registry::RegistryListeners::bind(&config).await {
            Ok(listeners) => break listeners,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let restarted =
        RunningRegistry::start(config, listeners, shamal_telemetry::MetricsRegistry::new())
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

fn registration(id: &str, capacity: u32) -> RegisterWorkerRequest {
    RegisterWorkerRequest {
        worker_id: id.to_owned(),
        address: format!("{id}.example:8101"),
        region: "eu-west".to_owned(),
        formats: vec!["onnx".to_owned()],
        device: "cuda".to_owned(),
        capacity,
    }
}

fn heartbeat(id: &str) -> HeartbeatRequest {
    HeartbeatRequest {
        worker_id: id.to_owned(),
        inflight: 2,
        queue_depth: 1,
    }
}

/// The next event that lists workers (events about models alone are
/// skipped), within `within`.
async fn next_workers(stream: &mut tonic::Streaming<WatchEvent>, within: Duration) -> WatchEvent {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let event = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("no worker event within {within:?}"))
            .unwrap()
            .unwrap();
        if !event.workers.is_empty() {
            return event;
        }
    }
}

/// Watch over gRPC: a worker joining is heard of within a second; one whose
/// heartbeats stop is `lost` within its lease plus a sweep; a draining
/// worker is `draining`, then `gone` (and left out of later snapshots); a
/// subscriber resuming from a revision gets the workers changed since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_worker_join_loss_and_drain() {
    let db = TestDb::sqlite().await;
    let running = RunningRegistry::start_local(&db.url, &db.dir.path().join("artifacts"))
        .await
        .unwrap();
    let registry = running.registry.clone();
    let lease = registry.membership().lease;
    let channel = shamal_registry_client::channel(&running.grpc_address.to_string()).unwrap();
    let mut client = shamal_registry_client::client(channel);
    let mut stream = client
        .watch(WatchRequest {
            since_revision: 0,
            subscriber: "test-workers".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let snapshot = next(&mut stream).await;
    assert!(snapshot.snapshot && snapshot.workers.is_empty());
    assert_eq!(
        snapshot.tenant_policies,
        Some(Default::default()),
        "a snapshot always carries the tenant policies"
    );

    // Join.
    let joined_at = std::time::Instant::now();
    let answer = client
        .register_worker(registration("w1", 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((answer.heartbeat_interval_ms, answer.lease_ms), (250, 1000));
    let joined = next_workers(&mut stream, Duration::from_secs(1)).await;
    assert!(joined_at.elapsed() < Duration::from_secs(1));
    assert!(!joined.snapshot);
    assert!(
        joined.tenant_policies.is_none(),
        "tenant policies did not change"
    );
    let w1 = &joined.workers[0];
    assert_eq!(
        (
            w1.worker_id.as_str(),
            w1.state.as_str(),
            w1.capacity,
            w1.region.as_str(),
            w1.device.as_str(),
            w1.address.as_str()
        ),
        ("w1", "serving", 4, "eu-west", "cuda", "w1.example:8101")
    );
    assert_eq!(w1.formats, ["onnx"]);
    assert!(w1.last_heartbeat_ms > 0);

    // Heartbeats keep it serving past its lease; then they stop.
    let beating_until = std::time::Instant::now() + lease + lease / 2;
    while std::time::Instant::now() < beating_until {
        let answer = client
            .heartbeat(heartbeat("w1"))
            .await
            .unwrap()
            .into_inner();
        assert!(answer.registered);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(1), stream.message())
            .await
            .is_err(),
        "no event while it heartbeats"
    );
    client.heartbeat(heartbeat("w1")).await.unwrap();
    let last_beat = std::time::Instant::now();
    let lost = next_workers(&mut stream, lease + Duration::from_secs(2)).await;
    let silent = last_beat.elapsed();
    assert_eq!(lost.workers[0].state, "lost");
    assert!(silent >= lease, "not before the lease: {silent:?}");
    assert!(
        silent < lease + Duration::from_millis(1000),
        "within the lease and a sweep: {silent:?}"
    );
    let lost_revision = lost.revision;
    let answer = client
        .heartbeat(heartbeat("w1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.registered, "a lost worker must register again");
    let status = tonic::Code::InvalidArgument;
    assert_eq!(
        client
            .register_worker(registration("", 1))
            .await
            .unwrap_err()
            .code(),
        status
    );

    // Back, then draining, then gone.
    client.register_worker(registration("w1", 4)).await.unwrap();
    assert_eq!(
        next_workers(&mut stream, Duration::from_secs(1))
            .await
            .workers[0]
            .state,
        "serving"
    );
    client
        .deregister_worker(DeregisterWorkerRequest {
            worker_id: "w1".to_owned(),
            done: false,
            reason: "SIGTERM".to_owned(),
        })
        .await
        .unwrap();
    let draining = next_workers(&mut stream, Duration::from_secs(1)).await;
    assert_eq!(draining.workers[0].state, "draining");
    client.heartbeat(heartbeat("w1")).await.unwrap();
    client
        .deregister_worker(DeregisterWorkerRequest {
            worker_id: "w1".to_owned(),
            done: true,
            reason: String::new(),
        })
        .await
        .unwrap();
    let gone = next_workers(&mut stream, Duration::from_secs(1)).await;
    assert_eq!(gone.workers[0].state, "gone");
    assert_eq!(
        client
            .deregister_worker(DeregisterWorkerRequest {
                worker_id: "nobody".to_owned(),
                done: true,
                reason: String::new(),
            })
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );

    // Resuming from the loss: one event, each changed worker once, in its
    // current state.
    let mut resumed = client
        .watch(WatchRequest {
            since_revision: lost_revision,
            subscriber: "test-resume".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let replay = next(&mut resumed).await;
    assert!(!replay.snapshot);
    assert_eq!(replay.revision, gone.revision);
    assert_eq!(replay.workers.len(), 1);
    assert_eq!(replay.workers[0].state, "gone");
    // A fresh snapshot has forgotten it.
    let mut fresh = client
        .watch(WatchRequest {
            since_revision: 0,
            subscriber: "test-fresh".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let fresh = next(&mut fresh).await;
    assert!(fresh.snapshot && fresh.workers.is_empty());
    running.stop().await.unwrap();
}

/// Residency reaches subscribers: model regions in the model's state,
/// tenant policies as the complete set whenever one changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_carries_residency_policies() {
    let db = TestDb::sqlite().await;
    let running = start_with_lease(&db, 600_000).await;
    let registry = running.registry.clone();
    push(&registry, "fraud", b"weights").await;
    registry
        .set_tenant_policy("acme", vec!["uae-north".to_owned()], "alice")
        .await
        .unwrap();
    let channel = shamal_registry_client::channel(&running.grpc_address.to_string()).unwrap();
    let mut client = shamal_registry_client::client(channel);
    let mut stream = client
        .watch(WatchRequest {
            since_revision: 0,
            subscriber: "test-residency".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let snapshot = next(&mut stream).await;
    let policies = snapshot.tenant_policies.unwrap().policies;
    assert_eq!(policies.len(), 1);
    assert_eq!(policies[0].tenant, "acme");
    assert_eq!(policies[0].allowed_regions, ["uae-north"]);
    assert!(snapshot.models[0].allowed_regions.is_empty());

    registry
        .set_model_residency("fraud", vec!["eu-west".to_owned()], "alice")
        .await
        .unwrap();
    let change = next(&mut stream).await;
    assert_eq!(change.models[0].allowed_regions, ["eu-west"]);
    assert!(change.tenant_policies.is_none());

    registry
        .set_tenant_policy("globex", vec!["us-east".to_owned()], "alice")
        .await
        .unwrap();
    let change = next(&mut stream).await;
    assert!(change.models.is_empty());
    let tenants: Vec<String> = change
        .tenant_policies
        .unwrap()
        .policies
        .into_iter()
        .map(|policy| policy.tenant)
        .collect();
    assert_eq!(tenants, ["acme", "globex"], "always the complete set");
    registry
        .delete_tenant_policy("acme", "alice")
        .await
        .unwrap();
    registry
        .delete_tenant_policy("globex", "alice")
        .await
        .unwrap();
    let mut emptied = next(&mut stream).await;
    while emptied
        .tenant_policies
        .as_ref()
        .is_some_and(|policies| !policies.policies.is_empty())
    {
        emptied = next(&mut stream).await;
    }
    assert_eq!(
        emptied.tenant_policies,
        Some(Default::default()),
        "an empty set is sent, not left out"
    );
    running.stop().await.unwrap();
}
