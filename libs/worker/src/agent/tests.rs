//! Registry-follow tests: the desired-set diff, the artifact cache, and a
//! worker following the real registry (`shamal-registry`, SQLite in a
//! temporary directory, on loopback) with a fake runtime.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use shamal_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use shamal_proto::inference::{
    ModelInferRequest, ModelReadyRequest, RepositoryIndexRequest, ServerReadyRequest,
};
use shamal_registry::model::{Lifecycle, MemberState, NewVersion, WorkerInfo, now_millis};
use shamal_registry::{ModelRegistry, RegistryConfig, RegistryListeners, RunningRegistry};
use shamal_registry_client::proto::VersionState as RegistryVersion;
use shamal_tensor::{DataType, Tensor, TensorData, decode_outputs, encode_inputs};
use tokio::net::TcpListener;
use tonic::{Request, Status};

use super::*;
use crate::backend::{Backend, BackendError, InstanceOptions};
use crate::server::{Worker, WorkerConfig, WorkerListeners};
use crate::service::WorkerService;

// ---------------------------------------------------------------- runtime

/// A model file says `width N`: FP32 input INPUT0 [-1, N], output OUTPUT0
/// the same values. Anything else does not load. Its artifacts are
/// registered as `onnx`, a format the registry knows.
struct FakeRuntime {
    /// Executions after warm-up wait for a message here, when set.
    gate: Option<crossbeam_channel::Receiver<()>>,
    started: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

impl FakeRuntime {
    fn new() -> FakeRuntime {
        FakeRuntime {
            gate: None,
            started: Arc::default(),
            dropped: Arc::default(),
        }
    }
}

fn width_of(model_file: &Path) -> Result<i64, BackendError> {
    let text = std::fs::read_to_string(model_file)
        .map_err(|error| BackendError::Internal(error.to_string()))?;
    text.trim()
        .strip_prefix("width ")
        .and_then(|width| width.parse().ok())
        .ok_or_else(|| BackendError::Internal("not a fake model".to_owned()))
}

impl Runtime for FakeRuntime {
    fn platform(&self) -> &'static str {
        "fake"
    }
    fn backend(&self) -> &'static str {
        "fake"
    }
    fn model_filename(&self) -> &'static str {
        "model.fake"
    }
    fn formats(&self) -> &'static [&'static str] {
        &["onnx"]
    }
    fn signature(&self, model_file: &Path) -> Result<ModelSignature, BackendError> {
        let width = width_of(model_file)?;
        let spec = |name: &str| TensorSpec {
            name: name.to_owned(),
            datatype: DataType::Fp32,
            dims: vec![-1, width],
        };
        Ok(ModelSignature {
            inputs: vec![spec("INPUT0")],
            outputs: vec![spec("OUTPUT0")],
        })
    }
    fn instantiate(
        &self,
        model_file: &Path,
        _: &InstanceOptions,
    ) -> Result<Box<dyn Backend>, BackendError> {
        width_of(model_file)?;
        Ok(Box::new(FakeBackend {
            gate: self.gate.clone(),
            calls: 0,
            started: self.started.clone(),
            dropped: self.dropped.clone(),
        }))
    }
}

struct FakeBackend {
    gate: Option<crossbeam_channel::Receiver<()>>,
    calls: usize,
    started: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

impl Backend for FakeBackend {
    fn infer(&mut self, mut inputs: Vec<Tensor>) -> Result<Vec<Tensor>, BackendError> {
        self.calls += 1;
        if self.calls > 1 {
            self.started.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                let _ = gate.recv();
            }
        }
        let mut output = inputs.remove(0);
        output.name = "OUTPUT0".to_owned();
        Ok(vec![output])
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

// --------------------------------------------------------------- registry

/// The registry's configuration for a database file in `dir`, its
/// artifacts in `<dir>/artifacts`, gRPC on `grpc`.
fn registry_config(dir: &Path, database: &str, grpc: SocketAddr) -> RegistryConfig {
    RegistryConfig {
        http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        grpc_listen: grpc,
        metrics_listen: None,
        database_url: format!("sqlite://{}", dir.join(database).display()),
        artifact_dir: dir.join("artifacts"),
        ..RegistryConfig::default()
    }
}

/// Serves the registry of `config` on the pre-bound gRPC listener.
async fn serve_registry(config: RegistryConfig, grpc: TcpListener) -> RunningRegistry {
    let listeners = RegistryListeners {
        http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        grpc,
        metrics: None,
    };
    RunningRegistry::start(config, listeners, shamal_telemetry::Registry::new())
        .await
        .unwrap()
}

/// Binds `address` again once a stopped registry has released it.
async fn rebind(address: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(address).await {
            Ok(listener) => return listener,
            Err(error) => assert!(Instant::now() < deadline, "cannot bind {address}: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A registry serving SQLite in a temporary directory on a loopback port.
async fn start_registry(dir: &Path) -> (RunningRegistry, RegistryConfig) {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = registry_config(dir, "registry.db", grpc.local_addr().unwrap());
    (serve_registry(config.clone(), grpc).await, config)
}

fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Uploads `bytes` to the registry's artifact store.
async fn upload(registry: &ModelRegistry, bytes: &[u8], format: &str) -> Artifact {
    let sha256 = digest(bytes);
    let body = futures::stream::iter(vec![Ok(Bytes::copy_from_slice(bytes))]).boxed();
    let size_bytes = registry.put_artifact(&sha256, body).await.unwrap();
    Artifact {
        sha256,
        size_bytes,
        format: format.to_owned(),
    }
}

/// Uploads `bytes` and registers them as the next version of `model`.
async fn push(registry: &ModelRegistry, model: &str, bytes: &[u8], format: &str) -> u64 {
    let artifact = upload(registry, bytes, format).await;
    registry
        .register_version(
            model,
            NewVersion {
                sha256: artifact.sha256,
                format: format.to_owned(),
                ..NewVersion::default()
            },
            "tester",
        )
        .await
        .unwrap()
        .version
}

/// Where the registry keeps an artifact's bytes.
fn stored_artifact(config: &RegistryConfig, sha256: &str) -> PathBuf {
    config
        .artifact_dir
        .join("sha256")
        .join(&sha256[..2])
        .join(sha256)
}

/// Replaces the bytes the registry stores under `sha256` (a corrupted
/// artifact store).
fn tamper(config: &RegistryConfig, sha256: &str, bytes: &[u8]) {
    std::fs::write(stored_artifact(config, sha256), bytes).unwrap();
}

/// The (state, reason) of `worker`'s placement of a version.
async fn placement_of(
    registry: &ModelRegistry,
    worker: &str,
    model: &str,
    version: u64,
) -> Option<(String, String)> {
    registry
        .list_placements(model)
        .await
        .unwrap()
        .into_iter()
        .find(|placement| placement.worker_id == worker && placement.version == version)
        .map(|placement| (placement.state, placement.reason))
}

async fn placement_state(
    registry: &ModelRegistry,
    worker: &str,
    model: &str,
    version: u64,
) -> Option<String> {
    placement_of(registry, worker, model, version)
        .await
        .map(|(state, _)| state)
}

fn version(number: u64, lifecycle: &str, artifact: Option<Artifact>) -> RegistryVersion {
    RegistryVersion {
        version: number,
        lifecycle: lifecycle.to_owned(),
        reason: String::new(),
        artifact,
        assigned_workers: Vec::new(),
    }
}

fn model(name: &str, versions: Vec<RegistryVersion>) -> ModelState {
    ModelState {
        name: name.to_owned(),
        versions,
        ..Default::default()
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Polls an async condition until it holds, for at most 15 s.
async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------- pure logic

fn onnx(sha: char) -> Artifact {
    Artifact {
        sha256: sha.to_string().repeat(64),
        size_bytes: 1,
        format: "onnx".to_owned(),
    }
}

#[test]
fn desired_set_is_registered_and_ready_versions_in_served_formats() {
    let safetensors = Artifact {
        format: "safetensors".to_owned(),
        ..onnx('e')
    };
    let mut catalog = Catalog::default();
    catalog.apply(&WatchEvent {
        revision: 1,
        snapshot: true,
        models: vec![
            model(
                "a",
                vec![
                    version(1, "registered", Some(onnx('a'))),
                    version(2, "ready", Some(onnx('b'))),
                    version(3, "failed", Some(onnx('c'))),
                    version(4, "archived", Some(onnx('d'))),
                    version(5, "ready", Some(safetensors)),
                    version(6, "ready", None),
                ],
            ),
            model("b", vec![version(1, "ready", Some(onnx('f')))]),
        ],
        removed: vec![],
        ..WatchEvent::default()
    });
    let desired = desired_versions(&catalog.models, &["onnx"], "worker-a");
    let keys: Vec<Key> = desired.keys().cloned().collect();
    assert_eq!(
        keys,
        vec![("a".into(), 1), ("a".into(), 2), ("b".into(), 1)]
    );
    assert_eq!(desired[&("a".to_owned(), 2)].sha256, "b".repeat(64));
    assert_eq!(
        desired_versions(&catalog.models, &["safetensors"], "worker-a").len(),
        1
    );
}

#[test]
fn desired_set_keeps_only_versions_assigned_to_this_worker() {
    let assigned = |number: u64, sha: char, workers: &[&str]| RegistryVersion {
        assigned_workers: workers.iter().map(|worker| (*worker).to_owned()).collect(),
        ..version(number, "ready", Some(onnx(sha)))
    };
    let mut catalog = Catalog::default();
    catalog.apply(&WatchEvent {
        revision: 1,
        snapshot: true,
        models: vec![model(
            "a",
            vec![
                // Placement mode `all`: every capable worker.
                assigned(1, 'a', &[]),
                assigned(2, 'b', &["worker-a", "worker-b"]),
                // Assigned elsewhere only: left to the other workers.
                assigned(3, 'c', &["worker-b"]),
                // Assigned here but archived: never held.
                RegistryVersion {
                    assigned_workers: vec!["worker-a".to_owned()],
                    ..version(4, "archived", Some(onnx('d')))
                },
            ],
        )],
        ..WatchEvent::default()
    });
    let keys = |worker: &str| -> Vec<u64> {
        desired_versions(&catalog.models, &["onnx"], worker)
            .into_keys()
            .map(|(_, version)| version)
            .collect()
    };
    assert_eq!(keys("worker-a"), [1, 2]);
    assert_eq!(keys("worker-b"), [1, 2, 3]);
    assert_eq!(keys("worker-c"), [1]);
    // What the worker held of a version moved away is unloaded.
    let held: BTreeMap<Key, ()> = [(("a".to_owned(), 2), ()), (("a".to_owned(), 3), ())]
        .into_iter()
        .collect();
    let desired = desired_versions(&catalog.models, &["onnx"], "worker-a");
    assert_eq!(
        plan(&desired, &held),
        Plan {
            load: vec![("a".into(), 1)],
            unload: vec![("a".into(), 3)],
        }
    );
}

#[test]
fn plan_loads_what_is_new_and_unloads_what_is_gone() {
    let desired: BTreeMap<Key, Artifact> = [
        (("a".to_owned(), 1), onnx('a')),
        (("a".to_owned(), 2), onnx('b')),
        (("b".to_owned(), 1), onnx('c')),
    ]
    .into_iter()
    .collect();
    let held: BTreeMap<Key, ()> = [(("a".to_owned(), 1), ()), (("c".to_owned(), 7), ())]
        .into_iter()
        .collect();
    assert_eq!(
        plan(&desired, &held),
        Plan {
            load: vec![("a".into(), 2), ("b".into(), 1)],
            unload: vec![("c".into(), 7)],
        }
    );
    let none: BTreeMap<Key, ()> = BTreeMap::new();
    assert_eq!(plan(&desired, &none).load.len(), 3);
    assert_eq!(plan(&BTreeMap::new(), &held).unload.len(), 2);
}

#[test]
fn catalog_follows_snapshots_changes_and_removals() {
    let mut catalog = Catalog::default();
    let event = |revision, snapshot, models, removed: Vec<&str>| WatchEvent {
        revision,
        snapshot,
        models,
        removed: removed.into_iter().map(str::to_owned).collect(),
        ..WatchEvent::default()
    };
    catalog.apply(&event(
        1,
        true,
        vec![model("a", vec![]), model("b", vec![])],
        vec![],
    ));
    catalog.apply(&event(
        2,
        false,
        vec![model("c", vec![version(1, "ready", Some(onnx('a')))])],
        vec!["a"],
    ));
    let names: Vec<&String> = catalog.models.keys().collect();
    assert_eq!(names, ["b", "c"]);
    catalog.apply(&event(3, true, vec![model("d", vec![])], vec![]));
    let names: Vec<&String> = catalog.models.keys().collect();
    assert_eq!(names, ["d"], "a snapshot replaces everything");
}

#[test]
fn signature_json_lists_inputs_and_outputs() {
    let signature = ModelSignature {
        inputs: vec![TensorSpec {
            name: "x".into(),
            datatype: DataType::Int32,
            dims: vec![-1, 16],
        }],
        outputs: vec![],
    };
    let value: serde_json::Value = serde_json::from_str(&signature_json(&signature)).unwrap();
    assert_eq!(
        value,
        serde_json::json!({
            "inputs": [{"name": "x", "datatype": "INT32", "dims": [-1, 16]}],
            "outputs": [],
        })
    );
}

// ---------------------------------------------------------- artifact cache

fn cache_files(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn artifacts_are_fetched_verified_and_cached() {
    let dir = tempfile::tempdir().unwrap();
    let (running, config) = start_registry(dir.path()).await;
    let registry = running.registry.clone();
    let mut client = shamal_registry_client::client(
        shamal_registry_client::channel(&running.grpc_address.to_string()).unwrap(),
    );
    let cache = dir.path().join("cache");
    // Large enough for the registry to stream it in several chunks.
    let bytes: Vec<u8> = (0..700_000u32).map(|index| (index % 251) as u8).collect();
    let artifact = upload(&registry, &bytes, "onnx").await;

    // Good digest: fetched into <cache>/<sha256>.<format>.
    let path = ensure_artifact(&mut client, &cache, &artifact)
        .await
        .unwrap();
    assert_eq!(path, cache.join(format!("{}.onnx", artifact.sha256)));
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(cache_files(&cache), [format!("{}.onnx", artifact.sha256)]);

    // Cached: re-verified and reused without a fetch. The registry no
    // longer has the bytes, so a fetch could not succeed.
    std::fs::remove_file(stored_artifact(&config, &artifact.sha256)).unwrap();
    let again = ensure_artifact(&mut client, &cache, &artifact)
        .await
        .unwrap();
    assert_eq!(again, path);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);

    // Corrupted in the cache: not served; deleted and fetched again.
    std::fs::write(&path, b"tampered with").unwrap();
    let failure = ensure_artifact(&mut client, &cache, &artifact)
        .await
        .unwrap_err();
    assert!(
        failure.reason.contains("cannot fetch artifact"),
        "a corrupt cached copy is never used: {failure:?}"
    );
    assert!(cache_files(&cache).is_empty(), "{:?}", cache_files(&cache));
    upload(&registry, &bytes, "onnx").await;
    std::fs::write(&path, b"tampered with").unwrap();
    ensure_artifact(&mut client, &cache, &artifact)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "fetched again");
    assert_eq!(cache_files(&cache).len(), 1, "no download left behind");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn bad_artifacts_fail_with_a_clear_reason_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (running, config) = start_registry(dir.path()).await;
    let registry = running.registry.clone();
    let mut client = shamal_registry_client::client(
        shamal_registry_client::channel(&running.grpc_address.to_string()).unwrap(),
    );
    let cache = dir.path().join("cache");

    // The registry serves other bytes than the digest names (its store
    // was corrupted after the upload).
    let claimed = upload(&registry, b"the real model", "onnx").await;
    tamper(&config, &claimed.sha256, b"other bytes!!!");
    let failure = ensure_artifact(&mut client, &cache, &claimed)
        .await
        .unwrap_err();
    assert!(
        failure.reason.contains("digest mismatch") && failure.reason.contains(&claimed.sha256),
        "{failure:?}"
    );
    assert!(!failure.transient);
    assert!(cache_files(&cache).is_empty(), "{:?}", cache_files(&cache));

    // Fewer or more bytes than registered.
    let short = upload(&registry, b"a model cut short", "onnx").await;
    tamper(&config, &short.sha256, b"a model");
    let failure = ensure_artifact(&mut client, &cache, &short)
        .await
        .unwrap_err();
    assert!(failure.reason.contains("size mismatch"), "{failure:?}");
    assert!(!failure.transient);
    let long = upload(&registry, b"a model", "onnx").await;
    tamper(
        &config,
        &long.sha256,
        b"a model with more bytes than registered",
    );
    let failure = ensure_artifact(&mut client, &cache, &long)
        .await
        .unwrap_err();
    assert!(failure.reason.contains("larger than"), "{failure:?}");
    assert!(!failure.transient);
    assert!(cache_files(&cache).is_empty(), "{:?}", cache_files(&cache));

    // Unknown to the registry.
    let unknown = Artifact {
        sha256: digest(b"never uploaded"),
        size_bytes: 14,
        format: "onnx".to_owned(),
    };
    let failure = ensure_artifact(&mut client, &cache, &unknown)
        .await
        .unwrap_err();
    assert!(
        failure.reason.contains("cannot fetch artifact") && failure.reason.contains("NotFound"),
        "{failure:?}"
    );
    assert!(!failure.transient, "NOT_FOUND is final: {failure:?}");

    // A digest or format that is not one never reaches the registry or
    // the file system: the worker's own check answers.
    let hostile = Artifact {
        sha256: "../../etc/passwd".to_owned(),
        ..unknown.clone()
    };
    let failure = ensure_artifact(&mut client, &cache, &hostile)
        .await
        .unwrap_err();
    assert!(
        failure.reason.contains("is not a lowercase hex sha256"),
        "{failure:?}"
    );
    let hostile = Artifact {
        format: "../onnx".to_owned(),
        ..claimed.clone()
    };
    let failure = ensure_artifact(&mut client, &cache, &hostile)
        .await
        .unwrap_err();
    assert!(failure.reason.contains("format"), "{failure:?}");
    assert!(cache_files(&cache).is_empty(), "{:?}", cache_files(&cache));
    running.stop().await.unwrap();
}

// ------------------------------------------------------------------ worker

struct Running {
    service: WorkerService,
    /// The worker's gRPC listener.
    address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap().unwrap();
    }

    async fn ready(&self) -> bool {
        self.service
            .server_ready(Request::new(ServerReadyRequest {}))
            .await
            .unwrap()
            .into_inner()
            .ready
    }

    async fn model_ready(&self, model: &str, version: &str) -> bool {
        self.service
            .model_ready(Request::new(ModelReadyRequest {
                name: model.to_owned(),
                version: version.to_owned(),
            }))
            .await
            .is_ok_and(|response| response.into_inner().ready)
    }

    async fn index(&self) -> Vec<(String, String, String, String)> {
        self.service
            .repository_index(Request::new(RepositoryIndexRequest {
                repository_name: String::new(),
                ready: false,
            }))
            .await
            .unwrap()
            .into_inner()
            .models
            .into_iter()
            .map(|model| (model.name, model.version, model.state, model.reason))
            .collect()
    }

    async fn infer(&self, model: &str, version: &str, width: usize) -> Result<Vec<f32>, Status> {
        let values: Vec<f32> = (1..=width).map(|value| value as f32).collect();
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|value| value.to_le_bytes())
            .collect();
        let input = Tensor::from_raw(
            "INPUT0",
            DataType::Fp32,
            vec![1, width as i64],
            Bytes::from(bytes),
        )
        .unwrap();
        let (inputs, raw_input_contents) = encode_inputs(&[input]);
        let response = self
            .service
            .model_infer(Request::new(ModelInferRequest {
                model_name: model.to_owned(),
                model_version: version.to_owned(),
                inputs,
                raw_input_contents,
                ..Default::default()
            }))
            .await?
            .into_inner();
        let outputs = decode_outputs(response.outputs, response.raw_output_contents).unwrap();
        let TensorData::Fixed(bytes) = &outputs[0].data else {
            unreachable!()
        };
        Ok(bytes
            .chunks_exact(4)
            .map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap()))
            .collect())
    }
}

async fn start_worker(
    registry: Option<RegistryAgentSettings>,
    repository: Option<PathBuf>,
    runtime: FakeRuntime,
) -> Running {
    let config = WorkerConfig {
        server_name: "test-worker".to_owned(),
        model_repository: repository,
        registry,
        defaults: ModelDefaults::default(),
        max_message_bytes: 4 << 20,
        idle_poll: Duration::ZERO,
    };
    let worker = Worker::new(config, Arc::new(runtime), prometheus::Registry::new());
    let service = worker.service();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = grpc.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(worker.serve(
        WorkerListeners {
            grpc,
            metrics: None,
        },
        async move {
            let _ = stopped.await;
        },
    ));
    Running {
        service,
        address,
        stop: Some(stop),
        task,
    }
}

fn follow_settings(address: SocketAddr, cache: &Path) -> RegistryAgentSettings {
    RegistryAgentSettings {
        worker_id: "worker-a".to_owned(),
        advertise_address: Some("worker-a.example:8101".to_owned()),
        // Short: these tests stop their workers often.
        drain_grace: Duration::from_millis(50),
        ..RegistryAgentSettings::new(address.to_string(), cache)
    }
}

fn worker_info(id: &str, address: &str) -> WorkerInfo {
    WorkerInfo {
        id: id.to_owned(),
        address: address.to_owned(),
        region: "elsewhere".to_owned(),
        formats: vec!["onnx".to_owned()],
        device: "cuda".to_owned(),
        last_seen: 0,
    }
}

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
    let metrics = WorkerMetrics::new(&prometheus::Registry::new());
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
