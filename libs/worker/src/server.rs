//! Worker process lifecycle: serve first, load models, drain on shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use shamal_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use shamal_telemetry::{Readiness, Registry};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::backend::Runtime;
use crate::repository::{VersionState, load_version, scan_repository};
use crate::service::{WorkerService, WorkerState};
use crate::settings::ModelDefaults;
use crate::stats::WorkerMetrics;

/// What a worker serves and how.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Name reported by ServerMetadata.
    pub server_name: String,
    pub model_repository: PathBuf,
    pub defaults: ModelDefaults,
    /// gRPC message size limit, both directions.
    pub max_message_bytes: usize,
}

/// Pre-bound listeners: binding happens before models load, so a port
/// conflict fails the process at once and tests can use port 0.
pub struct WorkerListeners {
    pub grpc: TcpListener,
    /// Prometheus `/metrics` and probes; `None` when another service of the
    /// same process already serves the shared registry.
    pub metrics: Option<TcpListener>,
}

/// Runs a worker until `shutdown` completes, then drains: health flips to
/// NOT_SERVING, in-flight requests finish, models are unloaded.
pub async fn run(
    config: WorkerConfig,
    runtime: Arc<dyn Runtime>,
    listeners: WorkerListeners,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Worker::new(config, runtime, registry)
        .serve(listeners, shutdown)
        .await
}

/// A worker before it serves: gives in-process callers (the router of
/// `shamal up`) its service, so they skip the network hop but share the
/// same service code, batcher, statistics and metrics.
pub struct Worker {
    config: WorkerConfig,
    runtime: Arc<dyn Runtime>,
    registry: Registry,
    state: Arc<WorkerState>,
}

impl Worker {
    pub fn new(config: WorkerConfig, runtime: Arc<dyn Runtime>, registry: Registry) -> Worker {
        let state = Arc::new(WorkerState::new(&config.server_name));
        Worker {
            config,
            runtime,
            registry,
            state,
        }
    }

    /// The worker's gRPC service, callable in process.
    pub fn service(&self) -> WorkerService {
        WorkerService::new(self.state.clone())
    }

    /// Serves until `shutdown` completes, then drains: health flips to
    /// NOT_SERVING, in-flight requests finish, models are unloaded.
    pub async fn serve(
        self,
        listeners: WorkerListeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Worker {
            config,
            runtime,
            registry,
            state,
        } = self;
        serve(config, runtime, registry, state, listeners, shutdown).await
    }
}

async fn serve(
    config: WorkerConfig,
    runtime: Arc<dyn Runtime>,
    registry: Registry,
    state: Arc<WorkerState>,
    listeners: WorkerListeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = WorkerMetrics::new(&registry);
    let readiness = Readiness::default();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    shamal_rpc::set_health(&health_reporter, false).await;

    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let shutdown_signal = {
        let state = state.clone();
        let health = health_reporter.clone();
        let readiness = readiness.clone();
        async move {
            shutdown.await;
            tracing::info!("worker draining");
            state.draining.store(true, Ordering::SeqCst);
            readiness.set(false);
            shamal_rpc::set_health(&health, false).await;
            let _ = stop_sender.send(true);
        }
    };
    tokio::spawn(shutdown_signal);
    let wait_stop = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };

    let metrics_task = listeners.metrics.map(|listener| {
        tokio::spawn(shamal_telemetry::serve_metrics(
            listener,
            registry.clone(),
            readiness.clone(),
            wait_stop(stop.clone()),
        ))
    });

    // Load models in the background; the gRPC server answers meanwhile
    // (ServerReady false until every model is warm).
    let loader = {
        let state = state.clone();
        let config = config.clone();
        let runtime = runtime.clone();
        let health = health_reporter.clone();
        let readiness = readiness.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            load_repository(&state, &config, runtime.as_ref(), &metrics);
            state.loaded.store(true, Ordering::SeqCst);
            if state.ready() {
                readiness.set(true);
                handle.block_on(shamal_rpc::set_health(&health, true));
            }
        })
    };

    let service = GrpcInferenceServiceServer::new(WorkerService::new(state.clone()))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let served = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listeners.grpc).with_nodelay(Some(true)),
            wait_stop(stop.clone()),
        )
        .await;
    let _ = loader.await;
    state.store.clear();
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    tracing::info!("worker stopped");
    served.map_err(Into::into)
}

fn load_repository(
    state: &WorkerState,
    config: &WorkerConfig,
    runtime: &dyn Runtime,
    metrics: &WorkerMetrics,
) {
    let (found, problems) = match scan_repository(
        &config.model_repository,
        runtime.model_filename(),
    ) {
        Ok(listing) => listing,
        Err(error) => {
            tracing::error!(repository = %config.model_repository.display(), %error, "cannot read model repository");
            return;
        }
    };
    for problem in problems {
        tracing::error!(model = %problem.model, version = problem.version, reason = %problem.reason, "model version cannot be loaded");
        state.store.insert(
            &problem.model,
            problem.version,
            VersionState::Unavailable {
                reason: problem.reason,
            },
        );
    }
    for version in &found {
        state
            .store
            .insert(&version.model, version.version, VersionState::Loading);
    }
    for version in found {
        if state.draining.load(Ordering::SeqCst) {
            return;
        }
        match load_version(&version, runtime, &config.defaults, metrics) {
            Ok(model) => state.store.insert(
                &version.model,
                version.version,
                VersionState::Ready(Arc::new(model)),
            ),
            Err(reason) => {
                tracing::error!(model = %version.model, version = version.version, %reason, "model version failed to load");
                state.store.insert(
                    &version.model,
                    version.version,
                    VersionState::Unavailable { reason },
                );
            }
        }
    }
}
