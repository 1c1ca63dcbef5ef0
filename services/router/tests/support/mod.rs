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
        model_repository: Some(repository),
        onnxruntime_library: Some(onnxruntime_library()),
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
        shamal_telemetry::Registry::new(),
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
        shamal_telemetry::Registry::new(),
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
