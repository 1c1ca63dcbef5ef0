//! Membership: capacity, registration, heartbeats and drain.

use super::*;

// -------------------------------------------------------------- membership

/// The registry's view of a worker.
async fn member(
    registry: &ModelRegistry,
    id: &str,
) -> Option<shamal_registry::model::WorkerStatus> {
    registry.get_worker(id).await.unwrap()
}

async fn member_state(registry: &ModelRegistry, id: &str) -> Option<MemberState> {
    member(registry, id).await.map(|worker| worker.state)
}

#[test]
fn capacity_defaults_to_instances_times_max_batch_size() {
    let follow = RegistryAgentSettings::new("127.0.0.1:1", "/tmp/cache");
    assert_eq!(follow.capacity, 0);
    assert_eq!(follow.drain_grace, DEFAULT_DRAIN_GRACE);
    assert_eq!(follow.effective_capacity(&ModelDefaults::default()), 32);
    let defaults = ModelDefaults {
        instances: 3,
        max_batch_size: 8,
        ..ModelDefaults::default()
    };
    assert_eq!(follow.effective_capacity(&defaults), 24);
    let fixed = RegistryAgentSettings {
        capacity: 5,
        ..follow
    };
    assert_eq!(fixed.effective_capacity(&defaults), 5);
}

/// Registration carries the capacity; heartbeats keep the worker serving
/// past its lease and carry its load; a worker the registry marked lost
/// registers again; on shutdown it is draining while it still answers for
/// its grace, finishes the request it holds, and only then is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_heartbeats_then_drains_before_it_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let (running, _config) = start_registry(dir.path()).await;
    let registry = running.registry.clone();
    assert_eq!(push(&registry, "m", b"width 4", "onnx").await, 1);
    let lease = registry.membership().lease;

    let (release, gate) = crossbeam_channel::unbounded();
    let runtime = FakeRuntime {
        gate: Some(gate),
        ..FakeRuntime::new()
    };
    let started = runtime.started.clone();
    let grace = Duration::from_millis(1500);
    let follow = RegistryAgentSettings {
        capacity: 7,
        drain_grace: grace,
        ..follow_settings(running.grpc_address, &dir.path().join("cache"))
    };
    let worker = start_worker(Some(follow), None, runtime).await;
    wait_until("registered and m/1 ready", async || {
        member_state(&registry, "worker-a").await == Some(MemberState::Serving)
            && placement_state(&registry, "worker-a", "m", 1)
                .await
                .as_deref()
                == Some("ready")
    })
    .await;
    let joined = member(&registry, "worker-a").await.unwrap();
    assert_eq!(joined.capacity, 7);
    assert_eq!(joined.address, "worker-a.example:8101");

    // Heartbeats keep it serving well past its lease.
    tokio::time::sleep(lease + lease / 2).await;
    let alive = member(&registry, "worker-a").await.unwrap();
    assert_eq!(alive.state, MemberState::Serving, "{alive:?}");
    assert!(
        now_millis() - alive.last_heartbeat < lease.as_millis() as i64,
        "recent heartbeat: {alive:?}"
    );

    // A request held in flight shows in the load the heartbeats report.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", worker.address))
        .unwrap()
        .connect_lazy();
    let mut client =
        shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient::new(
            channel,
        );
    let (inputs, raw_input_contents) = encode_inputs(&[Tensor::from_raw(
        "INPUT0",
        DataType::Fp32,
        vec![1, 4],
        Bytes::from(vec![0u8; 16]),
    )
    .unwrap()]);
    let request = ModelInferRequest {
        model_name: "m".to_owned(),
        model_version: "1".to_owned(),
        inputs,
        raw_input_contents,
        ..Default::default()
    };
    let held = {
        let mut client = client.clone();
        let request = request.clone();
        tokio::spawn(async move { client.model_infer(request).await })
    };
    eventually("request running", || started.load(Ordering::SeqCst) == 1).await;
    wait_until("in-flight request reported", async || {
        member(&registry, "worker-a").await.unwrap().inflight == 1
    })
    .await;

    // Marked lost (as if its heartbeats had stopped): told so by its next
    // heartbeat, it registers again.
    let lost = registry
        .sweep_at(std::time::Instant::now() + lease * 10)
        .await
        .unwrap();
    assert_eq!(lost, ["worker-a"]);
    assert_eq!(
        member_state(&registry, "worker-a").await,
        Some(MemberState::Lost)
    );
    wait_until("serving again", async || {
        member_state(&registry, "worker-a").await == Some(MemberState::Serving)
    })
    .await;

    // Shutdown: draining at once, still answering during the grace.
    let mut worker = worker;
    let stop = worker.stop.take().unwrap();
    let shutdown_at = std::time::Instant::now();
    stop.send(()).unwrap();
    wait_until("draining", async || {
        member_state(&registry, "worker-a").await == Some(MemberState::Draining)
    })
    .await;
    assert!(
        shutdown_at.elapsed() < Duration::from_secs(1),
        "the registry hears of the drain at once"
    );
    let live = client
        .server_live(shamal_proto::inference::ServerLiveRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(live.live, "still serving during the grace");
    assert!(shutdown_at.elapsed() < grace);

    // After the grace intake stops, but the request in flight holds the
    // worker back from leaving.
    tokio::time::sleep(grace + Duration::from_millis(500)).await;
    assert_eq!(
        member_state(&registry, "worker-a").await,
        Some(MemberState::Draining),
        "not gone while a request is in flight"
    );
    assert!(!worker.task.is_finished());
    release.send(()).unwrap();
    let answer = held.await.unwrap().unwrap().into_inner();
    assert_eq!(answer.model_name, "m", "the request in flight finished");
    wait_until("gone", async || {
        member_state(&registry, "worker-a").await == Some(MemberState::Gone)
    })
    .await;
    worker.task.await.unwrap().unwrap();
    assert!(shutdown_at.elapsed() >= grace);
    assert!(
        placement_state(&registry, "worker-a", "m", 1)
            .await
            .is_none(),
        "a gone worker's placements are removed"
    );
    assert!(
        registry.list_workers().await.unwrap().is_empty(),
        "gone workers are not listed"
    );
    running.stop().await.unwrap();
}

/// Without a registry that answers, shutdown is not held up by the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_an_unreachable_registry() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens here.
    let address = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let follow = RegistryAgentSettings {
        drain_grace: Duration::from_secs(30),
        ..follow_settings(address, &dir.path().join("cache"))
    };
    let worker = start_worker(Some(follow), None, FakeRuntime::new()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    worker.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no grace without a registry that accepted the drain: {:?}",
        started.elapsed()
    );
}
