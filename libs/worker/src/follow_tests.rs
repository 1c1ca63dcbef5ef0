//! Registry-follow tests: the desired-set diff, the artifact cache, and a
//! worker following a small in-test registry (a test peer implementing the
//! registry's gRPC API from fixed data) with a fake runtime.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use bytes::Bytes;
use shamal_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use shamal_proto::inference::{
    ModelInferRequest, ModelReadyRequest, RepositoryIndexRequest, ServerReadyRequest,
};
use shamal_registry_client::proto::registry_server::{Registry, RegistryServer};
use shamal_registry_client::proto::{
    ArtifactChunk, GetModelRequest, Placement, RegisterWorkerResponse, ReportPlacementResponse,
    ReportTrafficRequest, ReportTrafficResponse, VersionState as RegistryVersion, WatchRequest,
};
use shamal_tensor::{DataType, Tensor, TensorData, decode_outputs, encode_inputs};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::*;
use crate::backend::{Backend, BackendError, InstanceOptions};
use crate::server::{Worker, WorkerConfig, WorkerListeners};
use crate::service::WorkerService;

// ---------------------------------------------------------------- runtime

/// A model file says `width N`: FP32 input INPUT0 [-1, N], output OUTPUT0
/// the same values. Anything else does not load.
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
        &["fake"]
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

// ---------------------------------------------------------- registry peer

/// What the in-test registry serves and what it was told.
#[derive(Default)]
struct Peer {
    /// sha256 -> bytes served under it (not necessarily matching it).
    artifacts: Mutex<HashMap<String, Bytes>>,
    fetches: AtomicUsize,
    registrations: Mutex<Vec<RegisterWorkerRequest>>,
    reports: Mutex<Vec<ReportPlacementRequest>>,
    /// Each Watch call hands its stream's sender here.
    watchers: Mutex<Vec<mpsc::Sender<Result<WatchEvent, Status>>>>,
}

impl Peer {
    fn reports_for(&self, model: &str, version: u64) -> Vec<ReportPlacementRequest> {
        self.reports
            .lock()
            .unwrap()
            .iter()
            .filter(|report| report.model == model && report.version == version)
            .cloned()
            .collect()
    }

    fn states_for(&self, model: &str, version: u64) -> Vec<String> {
        self.reports_for(model, version)
            .into_iter()
            .map(|report| report.state)
            .collect()
    }

    fn watcher_count(&self) -> usize {
        self.watchers.lock().unwrap().len()
    }

    async fn send(&self, event: WatchEvent) {
        let sender = self.watchers.lock().unwrap().last().cloned().unwrap();
        sender.send(Ok(event)).await.unwrap();
    }
}

#[derive(Clone)]
struct TestRegistry(Arc<Peer>);

#[tonic::async_trait]
impl Registry for TestRegistry {
    type WatchStream = ReceiverStream<Result<WatchEvent, Status>>;
    type FetchArtifactStream = ReceiverStream<Result<ArtifactChunk, Status>>;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let (sender, receiver) = mpsc::channel(16);
        self.0.watchers.lock().unwrap().push(sender);
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn register_worker(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        self.0
            .registrations
            .lock()
            .unwrap()
            .push(request.into_inner());
        Ok(Response::new(RegisterWorkerResponse {}))
    }

    async fn report_placement(
        &self,
        request: Request<ReportPlacementRequest>,
    ) -> Result<Response<ReportPlacementResponse>, Status> {
        self.0.reports.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ReportPlacementResponse {}))
    }

    async fn fetch_artifact(
        &self,
        request: Request<FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        self.0.fetches.fetch_add(1, Ordering::SeqCst);
        let sha256 = request.into_inner().sha256;
        let Some(bytes) = self.0.artifacts.lock().unwrap().get(&sha256).cloned() else {
            return Err(Status::not_found(format!("no artifact {sha256}")));
        };
        let (sender, receiver) = mpsc::channel(4);
        tokio::spawn(async move {
            // Small chunks, so that a fetch spans several messages.
            for chunk in bytes.chunks(5) {
                let chunk = ArtifactChunk {
                    data: Bytes::copy_from_slice(chunk),
                };
                if sender.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn report_traffic(
        &self,
        _: Request<ReportTrafficRequest>,
    ) -> Result<Response<ReportTrafficResponse>, Status> {
        Err(Status::unimplemented("not in the test peer"))
    }

    async fn get_model(&self, _: Request<GetModelRequest>) -> Result<Response<ModelState>, Status> {
        Err(Status::unimplemented("not in the test peer"))
    }
}

async fn start_peer() -> (Arc<Peer>, String) {
    let peer = Arc::new(Peer::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let service = RegistryServer::new(TestRegistry(peer.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (peer, address)
}

fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// An artifact the peer serves correctly.
fn publish(peer: &Peer, bytes: &[u8], format: &str) -> Artifact {
    let sha256 = digest(bytes);
    peer.artifacts
        .lock()
        .unwrap()
        .insert(sha256.clone(), Bytes::copy_from_slice(bytes));
    Artifact {
        sha256,
        size_bytes: bytes.len() as u64,
        format: format.to_owned(),
    }
}

fn version(number: u64, lifecycle: &str, artifact: Option<Artifact>) -> RegistryVersion {
    RegistryVersion {
        version: number,
        lifecycle: lifecycle.to_owned(),
        reason: String::new(),
        artifact,
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
    });
    let desired = desired_versions(&catalog.models, &["onnx"]);
    let keys: Vec<Key> = desired.keys().cloned().collect();
    assert_eq!(
        keys,
        vec![("a".into(), 1), ("a".into(), 2), ("b".into(), 1)]
    );
    assert_eq!(desired[&("a".to_owned(), 2)].sha256, "b".repeat(64));
    assert_eq!(desired_versions(&catalog.models, &["safetensors"]).len(), 1);
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
    let (peer, address) = start_peer().await;
    let mut client =
        shamal_registry_client::client(shamal_registry_client::channel(&address).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let bytes = b"width 4 -- a model of more than one chunk";
    let artifact = publish(&peer, bytes, "onnx");

    // Good digest: fetched into <cache>/<sha256>.<format>.
    let path = ensure_artifact(&mut client, &cache, &artifact)
        .await
        .unwrap();
    assert_eq!(path, cache.join(format!("{}.onnx", artifact.sha256)));
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(peer.fetches.load(Ordering::SeqCst), 1);
    assert_eq!(cache_files(&cache), [format!("{}.onnx", artifact.sha256)]);

    // Cached: re-verified and reused without a fetch.
    let again = ensure_artifact(&mut client, &cache, &artifact)
        .await
        .unwrap();
    assert_eq!(again, path);
    assert_eq!(peer.fetches.load(Ordering::SeqCst), 1);

    // Corrupted in the cache: deleted and fetched again.
    std::fs::write(&path, b"width 4 -- tampered with").unwrap();
    ensure_artifact(&mut client, &cache, &artifact)
        .await
        .unwrap();
    assert_eq!(peer.fetches.load(Ordering::SeqCst), 2);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(cache_files(&cache).len(), 1, "no download left behind");
}

#[tokio::test]
async fn bad_artifacts_fail_with_a_clear_reason_and_leave_nothing() {
    let (peer, address) = start_peer().await;
    let mut client =
        shamal_registry_client::client(shamal_registry_client::channel(&address).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().to_path_buf();

    // The registry serves other bytes than the digest names.
    let claimed = publish(&peer, b"the real model", "onnx");
    peer.artifacts.lock().unwrap().insert(
        claimed.sha256.clone(),
        Bytes::from_static(b"other bytes!!!"),
    );
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
    let short = Artifact {
        size_bytes: claimed.size_bytes + 10,
        ..publish(&peer, b"the real model", "onnx")
    };
    let failure = ensure_artifact(&mut client, &cache, &short)
        .await
        .unwrap_err();
    assert!(failure.reason.contains("size mismatch"), "{failure:?}");
    let long = Artifact {
        size_bytes: 3,
        ..short.clone()
    };
    let failure = ensure_artifact(&mut client, &cache, &long)
        .await
        .unwrap_err();
    assert!(failure.reason.contains("larger than"), "{failure:?}");
    assert!(cache_files(&cache).is_empty(), "{:?}", cache_files(&cache));

    // Unknown to the registry.
    let unknown = onnx('0');
    let failure = ensure_artifact(&mut client, &cache, &unknown)
        .await
        .unwrap_err();
    assert!(
        failure.reason.contains("cannot fetch artifact"),
        "{failure:?}"
    );
    assert!(!failure.transient, "NOT_FOUND is final: {failure:?}");

    // A digest that is not one never reaches the file system.
    let hostile = Artifact {
        sha256: "../../etc/passwd".to_owned(),
        ..onnx('a')
    };
    let fetches = peer.fetches.load(Ordering::SeqCst);
    assert!(
        ensure_artifact(&mut client, &cache, &hostile)
            .await
            .is_err()
    );
    assert_eq!(peer.fetches.load(Ordering::SeqCst), fetches);
}

// ------------------------------------------------------------------ worker

struct Running {
    service: WorkerService,
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

    async fn infer(&self, model: &str, version: &str) -> Result<Vec<f32>, Status> {
        let values = [1.0f32, 2.0, 3.0, 4.0];
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|value| value.to_le_bytes())
            .collect();
        let input =
            Tensor::from_raw("INPUT0", DataType::Fp32, vec![1, 4], Bytes::from(bytes)).unwrap();
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
    registry: Option<RegistryFollow>,
    repository: Option<PathBuf>,
    runtime: FakeRuntime,
) -> Running {
    let config = WorkerConfig {
        server_name: "test-worker".to_owned(),
        model_repository: repository,
        registry,
        defaults: ModelDefaults::default(),
        max_message_bytes: 4 << 20,
    };
    let worker = Worker::new(config, Arc::new(runtime), prometheus::Registry::new());
    let service = worker.service();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
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
        stop: Some(stop),
        task,
    }
}

fn follow_settings(address: &str, cache: &Path) -> RegistryFollow {
    RegistryFollow {
        worker_id: "worker-a".to_owned(),
        advertise_address: Some("worker-a.example:8101".to_owned()),
        ..RegistryFollow::new(address, cache)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_loads_and_unloads_what_the_registry_assigns() {
    let (peer, address) = start_peer().await;
    let dir = tempfile::tempdir().unwrap();
    let worker = start_worker(
        Some(follow_settings(&address, dir.path())),
        None,
        FakeRuntime::new(),
    )
    .await;

    eventually("registration and watch", || peer.watcher_count() == 1).await;
    let registration = peer.registrations.lock().unwrap()[0].clone();
    assert_eq!(registration.worker_id, "worker-a");
    assert_eq!(registration.address, "worker-a.example:8101");
    assert_eq!(registration.region, "local");
    assert_eq!(registration.device, "cpu");
    assert_eq!(registration.formats, ["fake"]);
    assert!(!worker.ready().await, "not ready before the first snapshot");

    let good = publish(&peer, b"width 4", "fake");
    let mut bad = publish(&peer, b"width 4 ", "fake");
    bad.sha256 = digest(b"something else");
    bad.size_bytes = 8;
    peer.artifacts
        .lock()
        .unwrap()
        .insert(bad.sha256.clone(), Bytes::from_static(b"width 4 "));
    let other_format = Artifact {
        format: "onnx".to_owned(),
        ..good.clone()
    };
    let stale_placement = Placement {
        worker_id: "worker-a".to_owned(),
        version: 9,
        state: "ready".to_owned(),
        ..Default::default()
    };
    peer.send(WatchEvent {
        revision: 1,
        snapshot: true,
        models: vec![
            ModelState {
                placements: vec![stale_placement],
                ..model(
                    "m",
                    vec![
                        version(1, "ready", Some(good.clone())),
                        version(2, "registered", Some(bad.clone())),
                        version(3, "archived", Some(good.clone())),
                        version(4, "ready", Some(other_format)),
                    ],
                )
            },
            model("f", vec![version(1, "failed", Some(good.clone()))]),
        ],
        removed: vec![],
    })
    .await;

    eventually("m/1 ready and m/2 failed reported", || {
        peer.states_for("m", 1).last().map(String::as_str) == Some("ready")
            && peer.states_for("m", 2).last().map(String::as_str) == Some("failed")
    })
    .await;
    // A state still queued is replaced by a newer one, so `loading` may
    // have been superseded before it went out.
    assert!(
        peer.states_for("m", 1)
            .iter()
            .all(|state| state == "loading" || state == "ready")
    );
    let ready = peer.reports_for("m", 1).pop().unwrap();
    assert_eq!(ready.worker_id, "worker-a");
    let signature: serde_json::Value = serde_json::from_str(&ready.signature_json).unwrap();
    assert_eq!(signature["inputs"][0]["name"], "INPUT0");
    assert_eq!(signature["outputs"][0]["dims"], serde_json::json!([-1, 4]));
    let failed = peer.reports_for("m", 2).pop().unwrap();
    assert!(failed.reason.contains("digest mismatch"), "{failed:?}");
    assert!(peer.states_for("m", 3).is_empty());
    assert!(peer.states_for("m", 4).is_empty());
    assert!(peer.states_for("f", 1).is_empty());
    eventually("stale placement corrected", || {
        peer.states_for("m", 9) == ["unloaded"]
    })
    .await;

    for _ in 0..100 {
        if worker.ready().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        worker.ready().await,
        "ready once the snapshot was attempted"
    );
    assert_eq!(worker.infer("m", "1").await.unwrap(), [1.0, 2.0, 3.0, 4.0]);
    assert_eq!(worker.infer("m", "").await.unwrap(), [1.0, 2.0, 3.0, 4.0]);
    let index = worker.index().await;
    assert_eq!(index.len(), 2, "{index:?}");
    assert_eq!(index[0].2, "READY");
    assert_eq!(index[1].2, "UNAVAILABLE");
    assert!(index[1].3.contains("digest mismatch"));

    // Version 1 archived: unloaded and reported.
    peer.send(WatchEvent {
        revision: 2,
        snapshot: false,
        models: vec![model(
            "m",
            vec![
                version(1, "archived", Some(good.clone())),
                version(2, "registered", Some(bad.clone())),
            ],
        )],
        removed: vec![],
    })
    .await;
    eventually("m/1 unloaded", || {
        peer.states_for("m", 1).last().map(String::as_str) == Some("unloaded")
    })
    .await;
    let status = worker.infer("m", "1").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(worker.ready().await, "unloading does not affect readiness");

    // The model deleted: its failed version goes too.
    peer.send(WatchEvent {
        revision: 3,
        snapshot: false,
        models: vec![],
        removed: vec!["m".to_owned()],
    })
    .await;
    for _ in 0..100 {
        if worker.index().await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(worker.index().await.is_empty());

    // The stream breaks: the worker reconnects, and registers again after
    // the snapshot that follows.
    peer.watchers.lock().unwrap().clear();
    eventually("watch reconnected", || peer.watcher_count() == 1).await;
    let other = publish(&peer, b"width 2", "fake");
    peer.send(WatchEvent {
        revision: 4,
        snapshot: true,
        models: vec![model("n", vec![version(5, "registered", Some(other))])],
        removed: vec![],
    })
    .await;
    eventually("registered again", || {
        peer.registrations.lock().unwrap().len() == 2
    })
    .await;
    eventually("n/5 ready", || {
        peer.states_for("n", 5).last().map(String::as_str) == Some("ready")
    })
    .await;

    worker.stop().await;
}

#[tokio::test]
async fn a_worker_without_assigned_models_is_ready() {
    let (peer, address) = start_peer().await;
    let dir = tempfile::tempdir().unwrap();
    let worker = start_worker(
        Some(follow_settings(&address, dir.path())),
        None,
        FakeRuntime::new(),
    )
    .await;
    eventually("watch", || peer.watcher_count() == 1).await;
    assert!(!worker.ready().await);
    peer.send(WatchEvent {
        revision: 1,
        snapshot: true,
        models: vec![],
        removed: vec![],
    })
    .await;
    for _ in 0..200 {
        if worker.ready().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(worker.ready().await);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repository_wins_over_the_registry() {
    let (peer, address) = start_peer().await;
    let dir = tempfile::tempdir().unwrap();
    let repository = dir.path().join("repository");
    std::fs::create_dir_all(repository.join("m/1")).unwrap();
    std::fs::write(repository.join("m/1/model.fake"), "width 4").unwrap();
    let worker = start_worker(
        Some(follow_settings(&address, &dir.path().join("cache"))),
        Some(repository),
        FakeRuntime::new(),
    )
    .await;
    eventually("watch", || peer.watcher_count() == 1).await;
    let artifact = publish(&peer, b"width 2", "fake");
    peer.send(WatchEvent {
        revision: 1,
        snapshot: true,
        models: vec![model(
            "m",
            vec![
                version(1, "ready", Some(artifact.clone())),
                version(2, "ready", Some(artifact)),
            ],
        )],
        removed: vec![],
    })
    .await;
    eventually("both reported", || {
        peer.states_for("m", 1) == ["failed"]
            && peer.states_for("m", 2).last().map(String::as_str) == Some("ready")
    })
    .await;
    let failed = peer.reports_for("m", 1).pop().unwrap();
    assert!(failed.reason.contains("repository"), "{failed:?}");
    for _ in 0..200 {
        if worker.ready().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(worker.ready().await);
    let ready = worker
        .service
        .model_ready(Request::new(ModelReadyRequest {
            name: "m".to_owned(),
            version: "1".to_owned(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(ready.ready, "the repository's m/1 serves");
    assert_eq!(worker.index().await.len(), 2);
    worker.stop().await;
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
        stop: None,
        task: tokio::spawn(async { Ok(()) }),
    };
    let request = tokio::spawn(async move { running.infer("m", "1").await });
    eventually("request running", || started.load(Ordering::SeqCst) == 1).await;

    assert!(state.store.remove("m", 1).is_some());
    assert!(state.store.index().is_empty());
    assert_eq!(dropped.load(Ordering::SeqCst), 0, "instances still running");
    release.send(()).unwrap();
    assert_eq!(request.await.unwrap().unwrap(), [1.0, 2.0, 3.0, 4.0]);
    // The last handle went with the request: both instance threads exit.
    eventually("instances stopped", || dropped.load(Ordering::SeqCst) == 2).await;
}
