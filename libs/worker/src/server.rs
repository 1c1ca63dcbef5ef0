//! Worker process lifecycle: serve first, load models, drain on shutdown.
//!
//! Drain, on shutdown: the worker reports not ready (health NOT_SERVING,
//! its models UNAVAILABLE in RepositoryIndex); with a registry, it tells the
//! registry it is draining and, once the registry accepted that, keeps
//! serving for the agent settings' `drain_grace` so that routers route
//! around it; then it stops taking requests, finishes those in flight, tells
//! the registry it is gone, and exits.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use shamal_audit_client::Auditor;
use shamal_auth::layer::GrpcAuthLayer;
use shamal_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use shamal_telemetry::{MetricsRegistry, Readiness};
use shamal_tls::Incoming;
use tokio::net::TcpListener;
use tonic::codegen::http;

use crate::agent::{self, Agent, Membership, RegistryAgentSettings};
use crate::async_consumer::{AsyncInference, JobAudit};
use crate::auth::WorkerSecurity;
use crate::backend::Runtime;
use crate::batch_role::BatchRole;
use crate::repository::{
    FoundVersion, RepositoryProblem, VersionState, load_version, scan_repository,
};
use crate::service::{WorkerService, WorkerState};
use crate::settings::ModelDefaults;
use crate::stats::WorkerMetrics;
use shamal_idle_poll::KeepAwake;

/// What a worker serves and how.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// mTLS or insecure (workers take no bearer tokens).
    pub security: shamal_auth::security::SecurityConfig,
    /// Name reported by ServerMetadata.
    pub server_name: String,
    /// Triton-layout repository read at start-up; `None` serves only what
    /// the registry assigns. With both, repository and registry models are
    /// served side by side (the repository wins on a shared version).
    pub model_repository: Option<PathBuf>,
    /// The model registry to follow, if any.
    pub registry: Option<RegistryAgentSettings>,
    pub defaults: ModelDefaults,
    /// gRPC message size limit, both directions.
    pub max_message_bytes: usize,
    /// Keep the CPUs awake this long after the last request (zero: off;
    /// see `keep_awake`).
    pub idle_poll: Duration,
    /// The audit trail of the async jobs the worker runs (off without an
    /// endpoint). The worker reports as service `server_name` without its
    /// `shamal-` prefix (`cpu-worker`, `gpu-worker`), instance its async
    /// consumer id.
    pub audit: shamal_audit_client::AuditClientConfig,
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
    metrics_registry: MetricsRegistry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Worker::new(config, runtime, metrics_registry)
        .serve(listeners, shutdown)
        .await
}

/// A worker before it serves: gives in-process callers (the router of
/// `shamal up`) its service, so they skip the network hop but share the
/// same service code, batcher, statistics and metrics.
pub struct Worker {
    config: WorkerConfig,
    runtime: Arc<dyn Runtime>,
    metrics_registry: MetricsRegistry,
    state: Arc<WorkerState>,
    async_inference: Option<AsyncInference>,
    batch_role: Option<BatchRole>,
}

impl Worker {
    pub fn new(
        config: WorkerConfig,
        runtime: Arc<dyn Runtime>,
        metrics_registry: MetricsRegistry,
    ) -> Worker {
        let state = Arc::new(
            WorkerState::new(&config.server_name).with_device(runtime.device_label().as_deref()),
        );
        if config.registry.is_some() {
            state.follow_registry();
        }
        let _ = KeepAwake::start_for_process(config.idle_poll);
        Worker {
            config,
            runtime,
            metrics_registry,
            state,
            async_inference: None,
            batch_role: None,
        }
    }

    /// Also scores batch shards of this worker's region from the batch
    /// queue, on instances of their own (see `batch_role`).
    pub fn with_batch_role(mut self, settings: BatchRole) -> Worker {
        self.batch_role = Some(settings);
        self
    }

    /// Also runs async inference jobs of this worker's region from `queue`
    /// (see `async_consumer`).
    pub fn with_async_inference(mut self, settings: AsyncInference) -> Worker {
        self.async_inference = Some(settings);
        self
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
            metrics_registry,
            state,
            async_inference,
            batch_role,
        } = self;
        serve(
            config,
            runtime,
            metrics_registry,
            state,
            listeners,
            shutdown,
            Roles {
                async_inference,
                batch_role,
            },
        )
        .await
    }
}

/// The queue consumers a worker runs besides its gRPC service.
struct Roles {
    async_inference: Option<AsyncInference>,
    batch_role: Option<BatchRole>,
}

async fn serve(
    mut config: WorkerConfig,
    runtime: Arc<dyn Runtime>,
    metrics_registry: MetricsRegistry,
    state: Arc<WorkerState>,
    listeners: WorkerListeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    roles: Roles,
) -> anyhow::Result<()> {
    let Roles {
        async_inference,
        batch_role,
    } = roles;
    let grpc_address = listeners.grpc.local_addr()?;
    // A bad certificate fails the start before anything listens.
    let security = WorkerSecurity::start(&config.security, &metrics_registry)?;
    if let Some(registry) = config.registry.as_mut() {
        registry.tls = security.client.clone();
    }
    let metrics = WorkerMetrics::new(&metrics_registry, runtime.backend());
    let readiness = Readiness::default();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    shamal_rpc::set_health(&health_reporter, false).await;

    // Requests the gRPC inference service is handling (heartbeat load).
    let inflight = Arc::new(AtomicUsize::new(0));
    let membership = config.registry.as_ref().and_then(|settings| {
        let (worker_id, address) = settings.identity(grpc_address);
        Membership::new(
            settings,
            worker_id,
            address,
            runtime.formats(),
            settings.effective_capacity(&config.defaults),
            state.clone(),
            inflight.clone(),
        )
        .inspect_err(|error| tracing::error!(%error, "cannot follow the registry"))
        .ok()
    });
    let drain_grace = config
        .registry
        .as_ref()
        .map_or(Duration::ZERO, |settings| settings.drain_grace);
    let (heartbeats_stop, heartbeats_stopped) = tokio::sync::watch::channel(false);
    let heartbeats = membership
        .clone()
        .map(|membership| tokio::spawn(membership.heartbeat_loop(heartbeats_stopped)));

    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let shutdown_signal = {
        let state = state.clone();
        let health = health_reporter.clone();
        let readiness = readiness.clone();
        let membership = membership.clone();
        async move {
            shutdown.await;
            tracing::info!("worker draining");
            state.draining.store(true, Ordering::SeqCst);
            readiness.set(false);
            shamal_rpc::set_health(&health, false).await;
            if let Some(membership) = membership
                && membership.drain_notice("worker shutting down").await
                && !drain_grace.is_zero()
            {
                // Still serving: routers hear of the drain through the
                // registry and route around this worker meanwhile.
                tracing::info!(
                    grace_ms = drain_grace.as_millis() as u64,
                    "draining: serving until routers have routed around this worker"
                );
                tokio::time::sleep(drain_grace).await;
            }
            tracing::info!("worker stops taking requests; finishing those in flight");
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
            metrics_registry.clone(),
            readiness.clone(),
            wait_stop(stop.clone()),
        ))
    });

    // Repository models load in the background, registry models in the
    // registry agent; the gRPC server answers meanwhile (ServerReady false until
    // the repository is loaded and the registry's first snapshot acted on).
    let listing = match config.model_repository.clone() {
        Some(repository) => {
            let model_filename = runtime.model_filename();
            tokio::task::spawn_blocking(move || scan(&repository, model_filename))
                .await
                .ok()
                .flatten()
        }
        None => None,
    };
    if let Some((found, problems)) = &listing {
        state.set_repository_versions(
            found
                .iter()
                .map(|version| (version.model.clone(), version.version))
                .chain(
                    problems
                        .iter()
                        .map(|problem| (problem.model.clone(), problem.version)),
                )
                .collect(),
        );
    }
    let loader = {
        let state = state.clone();
        let config = config.clone();
        let runtime = runtime.clone();
        let metrics = metrics.clone();
        tokio::task::spawn_blocking(move || {
            if let Some((found, problems)) = listing {
                load_repository(&state, found, problems, &config, runtime.as_ref(), &metrics);
            }
            state.loaded.store(true, Ordering::SeqCst);
        })
    };

    let (synced_sender, mut synced) = tokio::sync::watch::channel(config.registry.is_none());
    let agent_task = match (&config.registry, &membership) {
        (Some(settings), Some(membership)) => {
            let (worker_id, _) = settings.identity(grpc_address);
            let agent = Agent {
                settings: settings.clone(),
                worker_id,
                state: state.clone(),
                runtime: runtime.clone(),
                defaults: config.defaults.clone(),
                metrics: metrics.clone(),
                synced: synced_sender,
                membership: membership.clone(),
            };
            Some(tokio::spawn(agent::run(agent, stop.clone())))
        }
        _ => None,
    };

    let became_ready = {
        let state = state.clone();
        let health = health_reporter.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let _ = loader.await;
            let _ = synced.wait_for(|synced| *synced).await;
            if state.ready() {
                tracing::info!("worker ready");
                readiness.set(true);
                shamal_rpc::set_health(&health, true).await;
            }
        })
    };

    // The audit trail of the async jobs (one record per job run), over
    // mTLS with the worker's certificate when TLS is on; drained once the
    // consumer has finished its jobs.
    let audit_service = audit_service_name(&config.server_name);
    let auditor = if async_inference.is_some() || batch_role.is_some() || config.audit.enabled() {
        let instance = consumer_id(&config, async_inference.as_ref(), grpc_address);
        let audit_tls = security
            .client
            .as_ref()
            .map(|tls| tls.expect_service("audit"));
        Auditor::start(
            config.audit.clone(),
            audit_tls.as_ref(),
            audit_service,
            &instance,
            &metrics_registry,
        )?
    } else {
        Auditor::disabled()
    };
    let audit = JobAudit {
        auditor: auditor.clone(),
        actor: audit_actor(&config, audit_service),
    };

    // Batch shards of this worker's region, on instances of their own;
    // stops taking them when the worker drains, and finishes the ones it
    // holds before models unload.
    let batch_consumer = batch_role
        .map(|settings| {
            let identity = batch_identity(&config, &settings, grpc_address);
            crate::batch_role::spawn(
                crate::batch_role::Consumer {
                    settings,
                    identity,
                    state: state.clone(),
                    runtime: runtime.clone(),
                    inflight: inflight.clone(),
                    audit: audit.clone(),
                },
                &metrics_registry,
                runtime.backend(),
                stop.clone(),
            )
        })
        .transpose()?;

    // Async jobs of this worker's region; stops taking them when the
    // worker drains, and finishes the ones it holds before models unload.
    let async_consumer = async_inference
        .map(|settings| {
            let identity = async_identity(&config, &settings, grpc_address);
            crate::async_consumer::spawn(
                crate::async_consumer::Consumer {
                    settings,
                    identity,
                    state: state.clone(),
                    inflight: inflight.clone(),
                    audit,
                },
                &metrics_registry,
                runtime.backend(),
                stop.clone(),
            )
        })
        .transpose()?;
    let service = CountInFlight {
        inner: GrpcInferenceServiceServer::new(WorkerService::new(state.clone()))
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes),
        count: inflight,
    };
    // Returns once intake has stopped and the requests in flight are done.
    // Only services call a worker: with TLS on, a client certificate is
    // required and its role checked per method (`auth::grpc_access`).
    let served = tonic::transport::Server::builder()
        .layer(GrpcAuthLayer::new(
            security.auth.clone(),
            crate::auth::grpc_access,
            crate::auth::API,
        ))
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(
            Incoming::new(listeners.grpc, security.server.as_ref()),
            wait_stop(stop.clone()),
        )
        .await;
    if let Some(consumer) = async_consumer {
        let _ = consumer.await;
    }
    if let Some(consumer) = batch_consumer {
        let _ = consumer.await;
    }
    // Every job run is recorded in the spool; give the shipper a moment to
    // hand the records over (what is left is shipped by the next start).
    if auditor.is_enabled() {
        if let Err(timeout) = auditor.drain(AUDIT_DRAIN_AT_SHUTDOWN).await {
            tracing::warn!(%timeout, "audit records left in the spool at shutdown");
        }
        auditor.shutdown().await;
    }
    if let Some(agent_task) = agent_task {
        let _ = agent_task.await;
    }
    let _ = became_ready.await;
    if let Some(membership) = &membership {
        membership.leave("worker drained and stopped").await;
    }
    let _ = heartbeats_stop.send(true);
    if let Some(heartbeats) = heartbeats {
        let _ = heartbeats.await;
    }
    state.store.clear();
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    tracing::info!("worker stopped");
    served.map_err(Into::into)
}

/// How long a worker waits at shutdown for its spooled audit records to
/// reach the audit service (as the router).
pub const AUDIT_DRAIN_AT_SHUTDOWN: Duration = Duration::from_secs(5);

/// The audit `service` of a worker: its server name without the `shamal-`
/// prefix (`shamal-cpu-worker` reports as `cpu-worker`).
pub fn audit_service_name(server_name: &str) -> &str {
    server_name.strip_prefix("shamal-").unwrap_or(server_name)
}

/// Who runs a worker's async jobs, for their audit records: the SPIFFE URI
/// of the worker's certificate when TLS is on, else `service:<service>`.
fn audit_actor(config: &WorkerConfig, service: &str) -> String {
    let identity = config.security.tls_files().and_then(|files| {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let pem = std::fs::read(&files.cert).ok()?;
        let der = CertificateDer::from_pem_slice(&pem).ok()?;
        shamal_tls::certificate_identity(&der)
    });
    match identity {
        Some(identity) => identity.uri(),
        None => {
            if config.security.tls_on() {
                tracing::warn!(
                    "the worker's certificate carries no SPIFFE identity; audit records name it service:{service}"
                );
            }
            format!("service:{service}")
        }
    }
}

/// The async consumer's name (see [`AsyncInference::consumer_id`] for the
/// default), also the worker's audit instance.
fn consumer_id(
    config: &WorkerConfig,
    settings: Option<&AsyncInference>,
    grpc_address: std::net::SocketAddr,
) -> String {
    settings
        .and_then(|settings| settings.consumer_id.clone())
        .unwrap_or_else(|| match config.registry.as_ref() {
            Some(registry) => registry.identity(grpc_address).0,
            None => format!(
                "{}-{}-{}",
                config.server_name,
                agent::hostname(),
                grpc_address.port()
            ),
        })
}

/// The async consumer's region, name and concurrency (see
/// [`AsyncInference`] for the defaults).
fn async_identity(
    config: &WorkerConfig,
    settings: &AsyncInference,
    grpc_address: std::net::SocketAddr,
) -> crate::async_consumer::Identity {
    let registry = config.registry.as_ref();
    let region = settings
        .region
        .clone()
        .or_else(|| registry.map(|registry| registry.region.clone()))
        .unwrap_or_else(|| "local".to_owned());
    let consumer_id = consumer_id(config, Some(settings), grpc_address);
    let concurrency = if settings.concurrency > 0 {
        settings.concurrency
    } else {
        config
            .defaults
            .instances
            .max(1)
            .saturating_mul(config.defaults.max_batch_size.max(1))
    };
    crate::async_consumer::Identity {
        region,
        consumer_id,
        concurrency,
    }
}

/// The batch consumer's region and name (see [`BatchRole`] for the
/// defaults).
fn batch_identity(
    config: &WorkerConfig,
    settings: &BatchRole,
    grpc_address: std::net::SocketAddr,
) -> crate::batch_role::Identity {
    let region = settings
        .region
        .clone()
        .or_else(|| {
            config
                .registry
                .as_ref()
                .map(|registry| registry.region.clone())
        })
        .unwrap_or_else(|| "local".to_owned());
    let consumer_id = settings
        .consumer_id
        .clone()
        .unwrap_or_else(|| consumer_id(config, None, grpc_address));
    crate::batch_role::Identity {
        region,
        consumer_id,
    }
}

/// Lists the repository; `None` (logged) when it cannot be read.
fn scan(
    repository: &Path,
    model_filename: &str,
) -> Option<(Vec<FoundVersion>, Vec<RepositoryProblem>)> {
    match scan_repository(repository, model_filename) {
        Ok(listing) => Some(listing),
        Err(error) => {
            tracing::error!(repository = %repository.display(), %error, "cannot read model repository");
            None
        }
    }
}

fn load_repository(
    state: &WorkerState,
    found: Vec<FoundVersion>,
    problems: Vec<RepositoryProblem>,
    config: &WorkerConfig,
    runtime: &dyn Runtime,
    metrics: &WorkerMetrics,
) {
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
            Err(error) => {
                tracing::error!(model = %version.model, version = version.version, reason = %error, "model version failed to load");
                state.store.insert(
                    &version.model,
                    version.version,
                    VersionState::Unavailable {
                        reason: error.to_string(),
                    },
                );
            }
        }
    }
}

/// Counts the requests the wrapped gRPC service is handling (the load a
/// worker reports with its heartbeats).
#[derive(Clone)]
struct CountInFlight<S> {
    inner: S,
    count: Arc<AtomicUsize>,
}

/// Decrements the count when the request finishes, however it ends.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn start(count: Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for CountInFlight<S>
where
    S: tonic::codegen::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tonic::codegen::BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let guard = InFlight::start(self.count.clone());
        let future = self.inner.call(request);
        Box::pin(async move {
            let _guard = guard;
            future.await
        })
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for CountInFlight<S> {
    const NAME: &'static str = S::NAME;
}
