//! MetricsRegistry agent tests, one file per concern: placement (the desired-set
//! diff), the artifact cache, the reconcile loop and membership, the last
//! two with a worker following the real registry (`shamal-registry`, SQLite in a
//! temporary directory, on loopback) with a fake runtime.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use shamal_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use shamal_proto::inference::{
    ModelInferRequest, ModelReadyRequest, RepositoryIndexRequest, ServerReadyRequest,
};
use shamal_registry::model::{Lifecycle, MemberState, NewVersion, WorkerInfo, now_millis};
use shamal_registry::{ModelRegistry, RegistryConfig, RegistryListeners, RunningRegistry};
use shamal_registry_client::proto::{
    Artifact, ModelState, VersionState as RegistryVersion, WatchEvent,
};
use shamal_tensor::{DataType, Tensor, TensorData, decode_outputs, encode_inputs};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::{Request, Status};

use super::*;
use crate::backend::{Backend, BackendError, InstanceOptions, ModelSignature, Runtime, TensorSpec};
use crate::repository::{FoundVersion, VersionState, load_version};
use crate::server::{Worker, WorkerConfig, WorkerListeners};
use crate::service::WorkerService;
use crate::service::WorkerState;
use crate::settings::ModelDefaults;
use crate::stats::WorkerMetrics;

mod cache;
mod membership;
mod placement;
mod reconcile;

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
    RunningRegistry::start(config, listeners, shamal_telemetry::MetricsRegistry::new())
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
        security: Default::default(),
        server_name: "test-worker".to_owned(),
        model_repository: repository,
        registry,
        defaults: ModelDefaults::default(),
        max_message_bytes: 4 << 20,
        idle_poll: Duration::ZERO,
        audit: Default::default(),
    };
    let worker = Worker::new(
        config,
        Arc::new(runtime),
        shamal_telemetry::MetricsRegistry::new(),
    );
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
