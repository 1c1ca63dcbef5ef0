//! The reconcile loop: a worker following the real registry.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_loads_and_unloads_what_the_registry_assigns() {
    let dir = tempfile::tempdir().unwrap();
    // The registry's port is bound, but it does not answer until started
    // below: the worker's first calls wait in the listen queue.
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = grpc.local_addr().unwrap();
    let config = registry_config(dir.path(), "registry.db", address);

    let prepared = shamal_registry::open(&config).await.unwrap();
    // m/1: a good artifact.
    assert_eq!(push(&prepared, "m", b"width 4", "onnx").await, 1);
    // m/2: the stored bytes no longer match the digest (same size).
    assert_eq!(push(&prepared, "m", b"width 4 ", "onnx").await, 2);
    tamper(&config, &digest(b"width 4 "), b"width 8 ");
    // m/3: archived.
    assert_eq!(push(&prepared, "m", b"width 4", "onnx").await, 3);
    prepared.archive_version("m", 3, "tester").await.unwrap();
    // m/4: a format the runtime does not load.
    assert_eq!(push(&prepared, "m", b"width 4", "safetensors").await, 4);
    // m/5: archived, but the registry believes worker-a (registered
    // before, with other details) still holds it.
    assert_eq!(push(&prepared, "m", b"width 4", "onnx").await, 5);
    prepared
        .register_worker(worker_info("worker-a", "stale.example:1"))
        .await
        .unwrap();
    prepared
        .report_placement("worker-a", "m", 5, "ready", "", "")
        .await
        .unwrap();
    prepared.archive_version("m", 5, "tester").await.unwrap();
    // m/6: the stored bytes are shorter than registered.
    assert_eq!(push(&prepared, "m", b"width 4   ", "onnx").await, 6);
    tamper(&config, &digest(b"width 4   "), b"width 4");
    // m/7: another good artifact.
    assert_eq!(push(&prepared, "m", b"width 4    ", "onnx").await, 7);
    // f/1: failed on another worker.
    assert_eq!(push(&prepared, "f", b"width 4", "onnx").await, 1);
    prepared
        .register_worker(worker_info("worker-b", "worker-b.example:1"))
        .await
        .unwrap();
    prepared
        .report_placement("worker-b", "f", 1, "failed", "out of memory", "")
        .await
        .unwrap();
    drop(prepared);

    let worker = start_worker(
        Some(follow_settings(address, &dir.path().join("cache"))),
        None,
        FakeRuntime::new(),
    )
    .await;
    assert!(
        !worker.ready().await,
        "not ready before the registry answered"
    );
    let running = serve_registry(config.clone(), grpc).await;
    let registry = running.registry.clone();

    // Registered with its own details.
    wait_until("registration", async || {
        registry
            .list_workers()
            .await
            .unwrap()
            .iter()
            .any(|worker| worker.id == "worker-a" && worker.address == "worker-a.example:8101")
    })
    .await;
    let workers = registry.list_workers().await.unwrap();
    let me = workers
        .iter()
        .find(|worker| worker.id == "worker-a")
        .unwrap();
    assert_eq!(me.region, "local");
    assert_eq!(me.device, "cpu");
    assert_eq!(me.formats, ["onnx"]);

    wait_until(
        "m/1 and m/7 ready, m/2 and m/6 failed, m/5 unloaded",
        async || {
            placement_state(&registry, "worker-a", "m", 1)
                .await
                .as_deref()
                == Some("ready")
                && placement_state(&registry, "worker-a", "m", 7)
                    .await
                    .as_deref()
                    == Some("ready")
                && placement_state(&registry, "worker-a", "m", 2)
                    .await
                    .as_deref()
                    == Some("failed")
                && placement_state(&registry, "worker-a", "m", 6)
                    .await
                    .as_deref()
                    == Some("failed")
                && placement_state(&registry, "worker-a", "m", 5)
                    .await
                    .as_deref()
                    == Some("unloaded")
        },
    )
    .await;
    let one = registry.get_version("m", 1).await.unwrap();
    assert_eq!(one.lifecycle, Lifecycle::Ready);
    let signature = one.signature.unwrap();
    assert_eq!(signature["inputs"][0]["name"], "INPUT0");
    assert_eq!(signature["outputs"][0]["dims"], serde_json::json!([-1, 4]));
    let (_, reason) = placement_of(&registry, "worker-a", "m", 2).await.unwrap();
    assert!(reason.contains("digest mismatch"), "{reason}");
    let two = registry.get_version("m", 2).await.unwrap();
    assert_eq!(two.lifecycle, Lifecycle::Failed);
    assert!(
        two.reason.contains("digest mismatch") && two.reason.contains(&digest(b"width 4 ")),
        "{}",
        two.reason
    );
    assert!(two.signature.is_none());
    let six = registry.get_version("m", 6).await.unwrap();
    assert_eq!(six.lifecycle, Lifecycle::Failed);
    assert!(six.reason.contains("size mismatch"), "{}", six.reason);
    // Not assigned: archived, another format, failed everywhere.
    assert_eq!(placement_state(&registry, "worker-a", "m", 3).await, None);
    assert_eq!(placement_state(&registry, "worker-a", "m", 4).await, None);
    assert_eq!(placement_state(&registry, "worker-a", "f", 1).await, None);
    assert_eq!(
        registry.get_version("m", 4).await.unwrap().lifecycle,
        Lifecycle::Registered
    );
    let failed = registry.get_version("f", 1).await.unwrap();
    assert_eq!(
        (failed.lifecycle, failed.reason.as_str()),
        (Lifecycle::Failed, "out of memory")
    );

    wait_until("ready once the snapshot was attempted", async || {
        worker.ready().await
    })
    .await;
    assert_eq!(
        worker.infer("m", "1", 4).await.unwrap(),
        [1.0, 2.0, 3.0, 4.0]
    );
    assert_eq!(
        worker.infer("m", "", 4).await.unwrap(),
        [1.0, 2.0, 3.0, 4.0]
    );
    // The registry marked m/2 and m/6 failed (every worker that tried
    // failed): no longer assigned, they leave the worker too.
    wait_until("failed versions dropped", async || {
        worker.index().await.len() == 2
    })
    .await;
    let index = worker.index().await;
    assert_eq!(
        index,
        [
            ("m".into(), "1".into(), "READY".into(), String::new()),
            ("m".into(), "7".into(), "READY".into(), String::new()),
        ]
    );

    // m/2 repaired (the stored bytes are the uploaded ones again) and
    // retried: back to registered, the worker loads it this time.
    tamper(&config, &digest(b"width 4 "), b"width 4 ");
    let retried = registry.retry_version("m", 2, "tester").await.unwrap();
    assert_eq!(retried.lifecycle, Lifecycle::Registered);
    wait_until("m/2 ready after the retry", async || {
        placement_state(&registry, "worker-a", "m", 2)
            .await
            .as_deref()
            == Some("ready")
    })
    .await;
    assert_eq!(
        registry.get_version("m", 2).await.unwrap().lifecycle,
        Lifecycle::Ready
    );
    assert_eq!(
        worker.infer("m", "2", 4).await.unwrap(),
        [1.0, 2.0, 3.0, 4.0]
    );

    // Version 1 archived (its `production` alias moved first): unloaded
    // and reported.
    registry
        .set_alias("m", "production", 7, "tester")
        .await
        .unwrap();
    registry.archive_version("m", 1, "tester").await.unwrap();
    wait_until("m/1 unloaded", async || {
        placement_state(&registry, "worker-a", "m", 1)
            .await
            .as_deref()
            == Some("unloaded")
    })
    .await;
    let status = worker.infer("m", "1", 4).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(!worker.model_ready("m", "1").await);
    assert!(worker.ready().await, "unloading does not affect readiness");
    assert_eq!(
        registry.get_version("m", 1).await.unwrap().lifecycle,
        Lifecycle::Archived
    );

    // The registry comes back on the same address with a database it
    // restored (an older revision, without model m nor this worker): the
    // worker gets a snapshot, registers again, unloads m/7 (a version the
    // registry does not know: its reports are refused, and must not hold
    // up the others) and loads what the restored registry holds.
    running.stop().await.unwrap();
    let restored_config = registry_config(dir.path(), "restored.db", address);
    let restored = shamal_registry::open(&restored_config).await.unwrap();
    assert_eq!(push(&restored, "n", b"width 2", "onnx").await, 1);
    drop(restored);
    let running = serve_registry(restored_config, rebind(address).await).await;
    let registry = running.registry.clone();
    wait_until("registered again", async || {
        registry
            .list_workers()
            .await
            .unwrap()
            .iter()
            .any(|worker| worker.id == "worker-a")
    })
    .await;
    wait_until("n/1 ready", async || {
        placement_state(&registry, "worker-a", "n", 1)
            .await
            .as_deref()
            == Some("ready")
    })
    .await;
    assert_eq!(
        registry.get_version("n", 1).await.unwrap().lifecycle,
        Lifecycle::Ready
    );
    wait_until("model m dropped", async || {
        worker.index().await.iter().all(|(name, ..)| name == "n")
    })
    .await;
    let status = worker.infer("m", "7", 4).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert_eq!(worker.infer("n", "1", 2).await.unwrap(), [1.0, 2.0]);
    assert!(worker.ready().await);

    worker.stop().await;
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_worker_without_assigned_models_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = grpc.local_addr().unwrap();
    let worker = start_worker(
        Some(follow_settings(address, &dir.path().join("cache"))),
        None,
        FakeRuntime::new(),
    )
    .await;
    assert!(
        !worker.ready().await,
        "not ready before the registry answered"
    );
    let running = serve_registry(registry_config(dir.path(), "registry.db", address), grpc).await;
    wait_until("ready with nothing to load", async || worker.ready().await).await;
    assert!(worker.index().await.is_empty());
    worker.stop().await;
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repository_wins_over_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let (running, _) = start_registry(dir.path()).await;
    let registry = running.registry.clone();
    assert_eq!(push(&registry, "m", b"width 2", "onnx").await, 1);
    assert_eq!(push(&registry, "m", b"width 2", "onnx").await, 2);
    let repository = dir.path().join("repository");
    std::fs::create_dir_all(repository.join("m/1")).unwrap();
    std::fs::write(repository.join("m/1/model.fake"), "width 4").unwrap();
    let worker = start_worker(
        Some(follow_settings(
            running.grpc_address,
            &dir.path().join("cache"),
        )),
        Some(repository),
        FakeRuntime::new(),
    )
    .await;
    wait_until("both reported", async || {
        placement_state(&registry, "worker-a", "m", 1)
            .await
            .as_deref()
            == Some("failed")
            && placement_state(&registry, "worker-a", "m", 2)
                .await
                .as_deref()
                == Some("ready")
    })
    .await;
    let (_, reason) = placement_of(&registry, "worker-a", "m", 1).await.unwrap();
    assert!(reason.contains("repository wins"), "{reason}");
    let shadowed = registry.get_version("m", 1).await.unwrap();
    assert_eq!(shadowed.lifecycle, Lifecycle::Failed);
    assert!(
        shadowed.reason.contains("repository"),
        "{}",
        shadowed.reason
    );
    wait_until("ready", async || worker.ready().await).await;
    assert!(
        worker.model_ready("m", "1").await,
        "the repository's m/1 serves"
    );
    assert_eq!(
        worker.infer("m", "1", 4).await.unwrap(),
        [1.0, 2.0, 3.0, 4.0],
        "the repository's m/1 (width 4), not the registry's (width 2)"
    );
    assert_eq!(worker.infer("m", "2", 2).await.unwrap(), [1.0, 2.0]);
    assert_eq!(worker.index().await.len(), 2);
    worker.stop().await;
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_version_lets_requests_in_flight_finish() {
    let (release, gate) = crossbeam_channel::unbounded();
    let runtime = FakeRuntime {
        gate: Some(gate),
        ..FakeRuntime::new()
    };
    let (started, dropped) = (runtime.started.clone(), runtime.dropped.clone());
    let dir = tempfile::tempdir().unwrap();
    let model_file = dir.path().join("model.fake");
    std::fs::write(&model_file, "width 4").unwrap();
    let found = FoundVersion {
        model: "m".to_owned(),
        version: 1,
        model_file,
        config: None,
    };
    let defaults = ModelDefaults {
        instances: 2,
        ..ModelDefaults::default()
    };
    let metrics = WorkerMetrics::new(&shamal_telemetry::MetricsRegistry::new(), "test");
    let loaded = load_version(&found, &runtime, &defaults, &metrics).unwrap();
    let state = Arc::new(WorkerState::new("test"));
    state
        .store
        .insert("m", 1, VersionState::Ready(Arc::new(loaded)));

    let service = WorkerService::new(state.clone());
    let running = Running {
        service,
        address: SocketAddr::from(([127, 0, 0, 1], 0)),
        stop: None,
        task: tokio::spawn(async { Ok(()) }),
    };
    let request = tokio::spawn(async move { running.infer("m", "1", 4).await });
    eventually("request running", || started.load(Ordering::SeqCst) == 1).await;

    assert!(state.store.remove("m", 1).is_some());
    assert!(state.store.index().is_empty());
    assert_eq!(dropped.load(Ordering::SeqCst), 0, "instances still running");
    release.send(()).unwrap();
    assert_eq!(request.await.unwrap().unwrap(), [1.0, 2.0, 3.0, 4.0]);
    // The last handle went with the request: both instance threads exit.
    eventually("instances stopped", || dropped.load(Ordering::SeqCst) == 2).await;
}
