//! Test harness: a real cpu-worker and router on port-0 listeners, and a
//! deliberately slow fake worker for deadline and drain tests.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shamal_cpu_worker::{CpuWorkerArgs, CpuWorkerConfig};
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use shamal_proto::inference::repository_index_response::ModelIndex;
use shamal_proto::inference::*;
use shamal_router::{RouterConfig, RouterListeners};
use shamal_worker::WorkerListeners;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// The skip policy of every test that needs an outside service (Redis,
/// PostgreSQL, the `redis-server` binary): `docs/testing.md`.
#[path = "../../../../tests/support/services.rs"]
pub mod services;

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The ONNX Runtime library: ORT_DYLIB_PATH, or the copy scripts/setup-deps.sh
/// installs. Missing is a setup error, reported as such.
pub fn onnxruntime_library() -> PathBuf {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return PathBuf::from(path);
    }
    let found = shamal_cpu_worker::bundled_onnxruntime(&workspace_root());
    found.unwrap_or_else(|| {
        panic!("ONNX Runtime not found: run scripts/setup-deps.sh or set ORT_DYLIB_PATH")
    })
}

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// A running service and the handle that stops it.
pub struct Running {
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub fn new(
        address: SocketAddr,
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    ) -> Running {
        Running {
            address,
            stop: Some(stop),
            task,
        }
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap()
    }

    /// Triggers shutdown without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn start_worker(repository: PathBuf, tune: impl FnOnce(&mut CpuWorkerArgs)) -> Running {
    let mut args = CpuWorkerArgs {
        onnxruntime_library: Some(onnxruntime_library()),
        node: shamal_worker::NodeArgs {
            model_repository: Some(repository),
            ..Default::default()
        },
        ..Default::default()
    };
    tune(&mut args);
    let config = CpuWorkerConfig::load(&args).unwrap();
    let grpc = listener().await;
    let address = grpc.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(shamal_cpu_worker::run(
        config,
        WorkerListeners {
            grpc,
            metrics: None,
        },
        shamal_telemetry::MetricsRegistry::new(),
        async move {
            let _ = stopped.await;
        },
    ));
    Running {
        address,
        stop: Some(stop),
        task,
    }
}

pub struct Router {
    pub running: Running,
    pub http: SocketAddr,
    pub metrics: SocketAddr,
}

pub async fn start_router(workers: Vec<String>, tune: impl FnOnce(&mut RouterConfig)) -> Router {
    let mut config = RouterConfig {
        workers,
        refresh_interval_ms: 100,
        ..RouterConfig::default()
    };
    tune(&mut config);
    config.validate().unwrap();
    let (grpc, http, metrics) = (listener().await, listener().await, listener().await);
    let addresses = (
        grpc.local_addr().unwrap(),
        http.local_addr().unwrap(),
        metrics.local_addr().unwrap(),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(shamal_router::run(
        config,
        RouterListeners {
            grpc,
            http,
            metrics: Some(metrics),
        },
        shamal_telemetry::MetricsRegistry::new(),
        async move {
            let _ = stopped.await;
        },
    ));
    Router {
        running: Running {
            address: addresses.0,
            stop: Some(stop),
            task,
        },
        http: addresses.1,
        metrics: addresses.2,
    }
}

pub async fn client(address: SocketAddr) -> GrpcInferenceServiceClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect_lazy();
    GrpcInferenceServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// Polls until the service reports ready (and, for routers, has found a
/// model), or fails after 60 s.
pub async fn wait_ready(address: SocketAddr, model: &str) {
    let mut client = client(address).await;
    for _ in 0..600 {
        let ready = client
            .model_ready(ModelReadyRequest {
                name: model.to_owned(),
                version: String::new(),
            })
            .await
            .map(|response| response.into_inner().ready)
            .unwrap_or(false);
        if ready {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{address} did not get ready for model {model}");
}

/// The bundled model repository with both real models.
pub async fn stack() -> (Running, Router) {
    let worker = start_worker(workspace_root().join("models/repository"), |_| {}).await;
    let router = start_router(vec![worker.address.to_string()], |_| {}).await;
    wait_ready(router.running.address, "demo").await;
    wait_ready(router.running.address, "simple").await;
    (worker, router)
}

/// What the slow fake worker saw of each call.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub timeouts: Vec<Option<String>>,
    pub request_ids: Vec<Option<String>>,
    pub completed: usize,
}

/// A worker that answers every inference after `delay`, echoing its first
/// input as output. Not a product component: a peer for fault tests.
#[derive(Clone)]
pub struct SlowWorker {
    pub delay: Duration,
    pub seen: Arc<Mutex<Seen>>,
}

#[tonic::async_trait]
impl GrpcInferenceService for SlowWorker {
    async fn repository_index(
        &self,
        _: tonic::Request<RepositoryIndexRequest>,
    ) -> Result<tonic::Response<RepositoryIndexResponse>, tonic::Status> {
        Ok(tonic::Response::new(RepositoryIndexResponse {
            models: vec![ModelIndex {
                name: "slow".into(),
                version: "1".into(),
                state: "READY".into(),
                reason: String::new(),
            }],
        }))
    }

    async fn model_ready(
        &self,
        _: tonic::Request<ModelReadyRequest>,
    ) -> Result<tonic::Response<ModelReadyResponse>, tonic::Status> {
        Ok(tonic::Response::new(ModelReadyResponse { ready: true }))
    }

    async fn model_infer(
        &self,
        request: tonic::Request<ModelInferRequest>,
    ) -> Result<tonic::Response<ModelInferResponse>, tonic::Status> {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        {
            let mut seen = self.seen.lock().unwrap();
            seen.timeouts.push(header("grpc-timeout"));
            seen.request_ids.push(header("x-request-id"));
        }
        tokio::time::sleep(self.delay).await;
        let request = request.into_inner();
        self.seen.lock().unwrap().completed += 1;
        Ok(tonic::Response::new(ModelInferResponse {
            model_name: request.model_name,
            model_version: "1".into(),
            id: request.id,
            parameters: Default::default(),
            outputs: vec![],
            raw_output_contents: vec![],
        }))
    }
}

pub async fn start_slow_worker(delay: Duration) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let listener = listener().await;
    let address = listener.local_addr().unwrap();
    let worker = SlowWorker {
        delay,
        seen: Arc::default(),
    };
    let seen = worker.seen.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GrpcInferenceServiceServer::new(worker))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (address, seen)
}

// ----- the real registry, and a cpu-worker following it ------------------

/// A registry database for one test: SQLite in a temporary file, or a
/// fresh database, dropped afterwards, on the PostgreSQL server at
/// `SHAMAL_TEST_POSTGRES_URL` (`scripts/ensure-postgres.sh` prints one).
pub struct TestDb {
    pub url: String,
    /// Artifacts and worker caches live here too.
    pub dir: tempfile::TempDir,
    drop_database: Option<(String, String)>,
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        TestDb {
            url,
            dir,
            drop_database: None,
        }
    }

    /// `None` (the test is skipped, loudly) when `SHAMAL_TEST_POSTGRES_URL`
    /// is unset, unless `SHAMAL_REQUIRE_SERVICES=1`; a server that is set
    /// but does not answer fails the test ([`services`]).
    pub async fn postgres() -> Option<TestDb> {
        use sqlx::Connection;
        let admin = services::configured(
            "SHAMAL_TEST_POSTGRES_URL",
            "PostgreSQL registry test",
            "scripts/ensure-postgres.sh prints a URL for it",
        )?;
        let mut connection = sqlx::postgres::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|error| services::unusable("SHAMAL_TEST_POSTGRES_URL", &admin, error));
        let name = format!("shamal_router_test_{}", uuid::Uuid::new_v4().simple());
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
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.drop_database.take() {
            // Best effort, on a thread of its own: Drop cannot await.
            let _ = std::thread::spawn(move || {
                use sqlx::Connection;
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

/// The model the registry tests roll out: the bundled `simple`, pushed
/// into the registry as versions 1 and 2 (version 2 adds one to OUTPUT0).
pub const MODEL: &str = "simple";

/// A real registry with `simple` versions 1 and 2 loaded and reported ready
/// by a real cpu-worker that follows it (no model repository), and the
/// `production` alias on version 1.
pub struct RegistryStack {
    pub registry: shamal_registry::RunningRegistry,
    pub worker: Running,
    pub db: TestDb,
}

impl RegistryStack {
    pub async fn start(db: TestDb) -> RegistryStack {
        let registry = shamal_registry::RunningRegistry::start_local(
            &db.url,
            &db.dir.path().join("artifacts"),
        )
        .await
        .unwrap();
        for version in [1u64, 2] {
            let bytes = std::fs::read(
                workspace_root().join(format!("models/repository/simple/{version}/model.onnx")),
            )
            .unwrap();
            let registered = push_artifact(&registry.registry, MODEL, bytes, "onnx").await;
            assert_eq!(registered, version);
        }
        let worker = start_registry_worker(
            &registry.grpc_address.to_string(),
            &db.dir.path().join("cpu-worker-cache"),
            "cpu-worker-1",
        )
        .await;
        for version in [1, 2] {
            wait_version_ready(&registry.registry, MODEL, version).await;
        }
        registry
            .registry
            .set_alias(MODEL, "production", 1, "tester")
            .await
            .unwrap();
        RegistryStack {
            registry,
            worker,
            db,
        }
    }

    pub fn registry(&self) -> &Arc<shamal_registry::ModelRegistry> {
        &self.registry.registry
    }

    /// A router following this registry, in front of the cpu-worker and
    /// `extra_workers`.
    pub async fn router(
        &self,
        extra_workers: &[SocketAddr],
        tune: impl FnOnce(&mut RouterConfig),
    ) -> Router {
        let mut workers = vec![self.worker.address.to_string()];
        workers.extend(extra_workers.iter().map(ToString::to_string));
        let registry = self.registry.grpc_address.to_string();
        let router = start_router(workers, |config| {
            config.registry = Some(registry);
            config.router_id = "router-test".into();
            config.traffic_report_interval_ms = 100;
            tune(config);
        })
        .await;
        wait_ready(router.running.address, MODEL).await;
        router
    }

    pub async fn stop(self) {
        self.worker.stop().await.unwrap();
        self.registry.stop().await.unwrap();
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Uploads `bytes` and registers them as the next version of `model` (what
/// `shamal model push` does); returns the version number.
pub async fn push_artifact(
    registry: &shamal_registry::ModelRegistry,
    model: &str,
    bytes: Vec<u8>,
    format: &str,
) -> u64 {
    use futures::StreamExt;
    let digest = sha256_hex(&bytes);
    let body = futures::stream::iter([Ok(bytes::Bytes::from(bytes))]).boxed();
    registry.put_artifact(&digest, body).await.unwrap();
    registry
        .register_version(
            model,
            shamal_registry::model::NewVersion {
                sha256: digest,
                format: format.to_owned(),
                ..Default::default()
            },
            "tester",
        )
        .await
        .unwrap()
        .version
}

/// A cpu-worker with no model repository, loading what the registry at
/// `registry` assigns it.
pub async fn start_registry_worker(registry: &str, cache: &std::path::Path, id: &str) -> Running {
    let grpc = listener().await;
    let address = grpc.local_addr().unwrap();
    let args = CpuWorkerArgs {
        onnxruntime_library: Some(onnxruntime_library()),
        node: shamal_worker::NodeArgs {
            registry: Some(registry.to_owned()),
            worker_id: Some(id.to_owned()),
            artifact_cache: Some(cache.to_path_buf()),
            ..Default::default()
        },
        ..Default::default()
    };
    let config = CpuWorkerConfig::load(&args).unwrap();
    assert_eq!(config.node.model_repository, None);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(shamal_cpu_worker::run(
        config,
        WorkerListeners {
            grpc,
            metrics: None,
        },
        shamal_telemetry::MetricsRegistry::new(),
        async move {
            let _ = stopped.await;
        },
    ));
    Running {
        address,
        stop: Some(stop),
        task,
    }
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after
/// 30 s.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !condition().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until some worker has reported `version` ready to the registry.
pub async fn wait_version_ready(
    registry: &shamal_registry::ModelRegistry,
    model: &str,
    version: u64,
) {
    wait_until(&format!("{model} version {version} is ready"), || async {
        registry
            .get_version(model, version)
            .await
            .unwrap()
            .lifecycle
            == shamal_registry::model::Lifecycle::Ready
    })
    .await;
}

/// Registers a test peer as a worker holding `model` `version` ready: the
/// calls a worker makes when it has loaded a version.
pub async fn report_peer_ready(
    registry: &Arc<shamal_registry::ModelRegistry>,
    id: &str,
    address: SocketAddr,
    model: &str,
    version: u64,
) {
    registry
        .register_worker(shamal_registry::model::WorkerInfo {
            id: id.to_owned(),
            address: address.to_string(),
            region: "local".to_owned(),
            formats: vec!["safetensors".to_owned()],
            device: "cpu".to_owned(),
            last_seen: 0,
        })
        .await
        .unwrap();
    registry
        .report_placement(id, model, version, "ready", "", "")
        .await
        .unwrap();
    // Heartbeat as a worker does, or the registry marks the peer lost
    // after its lease (and routers stop sending it requests).
    let heartbeats = registry.clone();
    let peer = id.to_owned();
    tokio::spawn(async move {
        while heartbeats.heartbeat(&peer, 0, 0).await.unwrap_or(false) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    wait_version_ready(registry, model, version).await;
}

/// The router's Prometheus text.
pub async fn router_metrics(router: &Router) -> String {
    reqwest::get(format!("http://{}/metrics", router.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls the router's metrics until `line` shows up.
pub async fn wait_for_metric(router: &Router, line: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = router_metrics(router).await;
        if text.contains(line) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metric never showed {line}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the router routes `model` by rollout revision `revision`
/// (its `shamal_router_rollout_revision` gauge, set once the new routing
/// table is in place).
pub async fn wait_rollout_applied(router: &Router, model: &str, revision: u64) {
    wait_for_metric(
        router,
        &format!("shamal_router_rollout_revision{{model=\"{model}\"}} {revision}\n"),
    )
    .await;
}

/// A request to `simple`: INPUT0 = INPUT1 = 0..16, so that OUTPUT0 is
/// 2i with version 1 and 2i + 1 with version 2.
pub fn simple_infer_request(version: &str) -> ModelInferRequest {
    let tensor = |name: &str| {
        let raw: Vec<u8> = (0..16).flat_map(|i: i32| i.to_le_bytes()).collect();
        shamal_tensor::Tensor::from_raw(
            name,
            shamal_tensor::DataType::Int32,
            vec![1, 16],
            bytes::Bytes::from(raw),
        )
        .unwrap()
    };
    let (inputs, raw_input_contents) =
        shamal_tensor::encode_inputs(&[tensor("INPUT0"), tensor("INPUT1")]);
    ModelInferRequest {
        model_name: MODEL.into(),
        model_version: version.into(),
        inputs,
        raw_input_contents,
        ..Default::default()
    }
}

/// The version that answered a `simple_infer_request`, by the response's
/// `model_version`, checked against what it computed.
pub fn answered_version(response: &ModelInferResponse) -> u64 {
    let version: u64 = response.model_version.parse().unwrap();
    let outputs = shamal_tensor::decode_outputs(
        response.outputs.clone(),
        response.raw_output_contents.clone(),
    )
    .unwrap();
    let output0 = outputs
        .iter()
        .find(|output| output.name == "OUTPUT0")
        .unwrap();
    let shamal_tensor::TensorData::Fixed(bytes) = &output0.data else {
        panic!("OUTPUT0 is not a fixed-size tensor");
    };
    let values: Vec<i32> = bytes
        .chunks_exact(4)
        .map(|chunk| i32::from_le_bytes(chunk.try_into().unwrap()))
        .collect();
    let extra = match version {
        1 => 0,
        2 => 1,
        other => panic!("simple has no version {other} that computes: {response:?}"),
    };
    let expected: Vec<i32> = (0..16).map(|i| 2 * i + extra).collect();
    assert_eq!(
        values, expected,
        "version {version} computed the wrong answer"
    );
    version
}

// ----- a scripted worker: a peer for shadow and fault tests -------------

/// What a scripted worker does with each inference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Script {
    /// Holds every call until the test opens the gate, then answers.
    Gated,
    /// Answers every call with INTERNAL at once.
    Failing,
    /// Answers every call with NOT_FOUND while its repository index still
    /// lists the version READY: a worker that has just unloaded a version
    /// the router's last look at it still showed (the registry moved the
    /// version to other workers).
    Unloaded,
}

/// One inference a scripted worker received.
#[derive(Clone, Debug)]
pub struct Received {
    pub model: String,
    pub version: String,
    pub request_id: Option<String>,
    pub inputs: Vec<String>,
    pub raw_input_contents: Vec<bytes::Bytes>,
}

/// A worker serving one version of one model by script, recording what it
/// receives. Not a product component: a stand-in for a shadow or canary
/// version's worker whose timing or failures the test controls.
#[derive(Clone)]
pub struct ScriptedWorker {
    pub address: SocketAddr,
    model: String,
    version: u64,
    script: Script,
    received: Arc<Mutex<Vec<Received>>>,
    completed: Arc<std::sync::atomic::AtomicUsize>,
    gate: tokio::sync::watch::Sender<bool>,
}

impl ScriptedWorker {
    pub async fn start(model: &str, version: u64, script: Script) -> ScriptedWorker {
        let listener = listener().await;
        let worker = ScriptedWorker {
            address: listener.local_addr().unwrap(),
            model: model.to_owned(),
            version,
            script,
            received: Arc::default(),
            completed: Arc::default(),
            gate: tokio::sync::watch::channel(false).0,
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(GrpcInferenceServiceServer::new(worker.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        worker
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn received_count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Calls answered so far.
    pub fn completed(&self) -> usize {
        self.completed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Lets every held call (and every later one) answer.
    pub fn open_gate(&self) {
        self.gate.send_replace(true);
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for ScriptedWorker {
    async fn repository_index(
        &self,
        _: tonic::Request<RepositoryIndexRequest>,
    ) -> Result<tonic::Response<RepositoryIndexResponse>, tonic::Status> {
        Ok(tonic::Response::new(RepositoryIndexResponse {
            models: vec![ModelIndex {
                name: self.model.clone(),
                version: self.version.to_string(),
                state: "READY".into(),
                reason: String::new(),
            }],
        }))
    }

    async fn model_ready(
        &self,
        request: tonic::Request<ModelReadyRequest>,
    ) -> Result<tonic::Response<ModelReadyResponse>, tonic::Status> {
        let request = request.into_inner();
        let ready = request.name == self.model
            && (request.version.is_empty() || request.version == self.version.to_string());
        Ok(tonic::Response::new(ModelReadyResponse { ready }))
    }

    async fn model_infer(
        &self,
        request: tonic::Request<ModelInferRequest>,
    ) -> Result<tonic::Response<ModelInferResponse>, tonic::Status> {
        let request_id = request
            .metadata()
            .get("x-request-id")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let request = request.into_inner();
        self.received.lock().unwrap().push(Received {
            model: request.model_name.clone(),
            version: request.model_version.clone(),
            request_id,
            inputs: request
                .inputs
                .iter()
                .map(|input| input.name.clone())
                .collect(),
            raw_input_contents: request.raw_input_contents.clone(),
        });
        let outcome = match self.script {
            Script::Failing => Err(tonic::Status::internal(format!(
                "scripted failure of {} version {}",
                self.model, self.version
            ))),
            Script::Unloaded => Err(tonic::Status::not_found(format!(
                "unknown version '{}' of model '{}'",
                request.model_version, request.model_name
            ))),
            Script::Gated => {
                let mut gate = self.gate.subscribe();
                let _ = gate.wait_for(|open| *open).await;
                // An answer no real version gives: OUTPUT0 all -7.
                let raw: Vec<u8> = (0..16).flat_map(|_| (-7i32).to_le_bytes()).collect();
                let output = shamal_tensor::Tensor::from_raw(
                    "OUTPUT0",
                    shamal_tensor::DataType::Int32,
                    vec![1, 16],
                    bytes::Bytes::from(raw),
                )
                .unwrap();
                let (outputs, raw_output_contents) = shamal_tensor::encode_outputs(&[output]);
                Ok(tonic::Response::new(ModelInferResponse {
                    model_name: request.model_name,
                    model_version: self.version.to_string(),
                    id: request.id,
                    parameters: Default::default(),
                    outputs,
                    raw_output_contents,
                }))
            }
        };
        self.completed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        outcome
    }
}

// ----- Redis ----------------------------------------------------------------

/// The test Redis at `SHAMAL_TEST_REDIS_URL`, which must answer PING;
/// `None` (the test is skipped, loudly) when the variable is unset, unless
/// `SHAMAL_REQUIRE_SERVICES=1` ([`services`]).
pub async fn test_redis_url() -> Option<String> {
    let url = services::configured(
        "SHAMAL_TEST_REDIS_URL",
        "Redis async inference test",
        "scripts/ensure-redis.sh prints a URL for it",
    )?;
    if let Err(error) = redis_ping(&url).await {
        services::unusable("SHAMAL_TEST_REDIS_URL", &url, error);
    }
    Some(url)
}

// A private redis-server, for tests that crash it, is started with the
// binary that `services::redis_server` finds.

/// PINGs the Redis server at `url`; an error while it is down, and while it
/// is still loading its data after a restart.
pub async fn redis_ping(url: &str) -> Result<(), String> {
    let attempt = async {
        let client = redis::Client::open(url)?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    match tokio::time::timeout(Duration::from_secs(2), attempt).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

/// A redis-server of the test's own on a free loopback port, keeping its
/// data in a temporary directory in an append-only file fsynced before every
/// reply (`appendfsync always`): SIGKILL loses nothing it acknowledged, and
/// a restart on the same port and directory brings all of it back. Killed
/// when dropped.
pub struct RedisServer {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    process: Option<std::process::Child>,
}

impl RedisServer {
    pub async fn start(binary: &std::path::Path) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .unwrap()
            .port();
        let mut server = RedisServer {
            binary: binary.to_owned(),
            dir: tempfile::tempdir().unwrap(),
            port,
            process: None,
        };
        server.spawn().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: a crash, with no shutdown save and no goodbye to clients.
    pub fn kill9(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// Starts the server again on the same port and directory; returns once
    /// it answers PING, that is once it has replayed its append-only file.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    async fn spawn(&mut self) {
        let log = self.dir.path().join("redis.log");
        let process = std::process::Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .arg("--logfile")
            .arg(&log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", self.binary.display()));
        self.process = Some(process);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while let Err(error) = redis_ping(&self.url()).await {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server on port {} does not answer ({error}); its log:\n{}",
                self.port,
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ----- weighted placement: several registry workers ----------------------

/// A registry on loopback port 0 over `db`, with its configuration tuned
/// (e.g. a shorter placement grace period).
pub async fn start_registry_with(
    db: &TestDb,
    tune: impl FnOnce(&mut shamal_registry::RegistryConfig),
) -> shamal_registry::RunningRegistry {
    let mut config = shamal_registry::RegistryConfig {
        http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: None,
        database_url: db.url.clone(),
        artifact_dir: db.dir.path().join("artifacts"),
        ..shamal_registry::RegistryConfig::default()
    };
    tune(&mut config);
    config.validate().unwrap();
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

/// The versions of `model` a worker lists READY in its repository index.
pub async fn ready_versions(worker: SocketAddr, model: &str) -> Vec<String> {
    let mut client = client(worker).await;
    let index = client
        .repository_index(RepositoryIndexRequest {
            repository_name: String::new(),
            ready: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut versions: Vec<String> = index
        .models
        .into_iter()
        .filter(|entry| entry.name == model && entry.state == "READY")
        .map(|entry| entry.version)
        .collect();
    versions.sort();
    versions
}
