//! The router: Shamal's public KServe v2 front door (gRPC
//! `inference.GRPCInferenceService` and its HTTP/JSON twin). It forwards each
//! request to a worker serving the model, with deadlines, retries on another
//! worker, load shedding and metrics.

pub mod admission;
pub mod async_api;
pub mod audit;
pub mod auth;
pub mod autoscale;
pub mod config;
pub mod forward;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod outlier;
pub mod pipeline;
pub mod pool;
pub mod registry_link;
pub mod residency;
pub mod rng;
pub mod rollout;
pub mod routing;
pub mod shadow;
pub mod traffic;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use shamal_async_queue::JobQueue;
use shamal_audit_client::Auditor;
use shamal_auth::layer::GrpcAuthLayer;
use shamal_auth::metrics::AuthMetrics;
use shamal_auth::security::Exposure;
use shamal_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use shamal_proto::shamal::r#async::v1::async_inference_server::AsyncInferenceServer;
use shamal_telemetry::{MetricsRegistry, Readiness};
use shamal_tls::{ClientAuth, ClientTls, HttpListener, Incoming, PeerInfo, ServerTls, TlsMetrics};
use tokio::net::TcpListener;

pub use config::{RouterArgs, RouterConfig};
use grpc::RouterService;
use metrics::RouterMetrics;
pub use pool::LocalService;
use pool::WorkerPool;
use registry_link::RegistryRouting;
use routing::{CoreParts, RoutingCore};
use shadow::Shadow;

/// Pre-bound listeners (port 0 in tests).
pub struct RouterListeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
    pub metrics: Option<TcpListener>,
}

/// What a program embedding the router (`shamal up`) shares with it.
#[derive(Default)]
pub struct RouterExtras {
    /// Workers living in this process, by name: routed to like remote ones,
    /// but called without a network hop.
    pub local_workers: Vec<(String, LocalService)>,
    /// The async inference queue, shared with in-process workers (e.g. one
    /// `MemoryQueue`); takes precedence over `async_queue`.
    pub async_queue: Option<Arc<dyn JobQueue>>,
    /// Refusal counters shared with the other services of this process
    /// (they live in one metrics registry in `shamal up`).
    pub auth_metrics: Option<AuthMetrics>,
}

/// Runs the router until `shutdown` completes, then stops intake, lets
/// in-flight requests finish and returns.
pub async fn run(
    config: RouterConfig,
    listeners: RouterListeners,
    metrics_registry: MetricsRegistry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with(
        config,
        listeners,
        metrics_registry,
        shutdown,
        RouterExtras::default(),
    )
    .await
}

/// Like [`run`], with workers that live in this process (`shamal up`): they
/// are routed to like remote ones, but called without a network hop.
pub async fn run_with_local_workers(
    config: RouterConfig,
    listeners: RouterListeners,
    metrics_registry: MetricsRegistry,
    shutdown: impl Future<Output = ()> + Send + 'static,
    local_workers: Vec<(String, LocalService)>,
) -> anyhow::Result<()> {
    let extras = RouterExtras {
        local_workers,
        ..RouterExtras::default()
    };
    run_with(config, listeners, metrics_registry, shutdown, extras).await
}

/// Like [`run`], with what an embedding program shares (see
/// [`RouterExtras`]).
pub async fn run_with(
    config: RouterConfig,
    listeners: RouterListeners,
    metrics_registry: MetricsRegistry,
    shutdown: impl Future<Output = ()> + Send + 'static,
    extras: RouterExtras,
) -> anyhow::Result<()> {
    let RouterExtras {
        local_workers,
        async_queue,
        auth_metrics,
    } = extras;
    // Security first: a bad certificate or an unreachable OIDC provider
    // fails the start before anything listens.
    let security = &config.security;
    security.announce("router", Exposure::Public, &metrics_registry);
    let auth_metrics = match auth_metrics {
        Some(metrics) => Some(metrics),
        None if security.tls_on() || security.oidc_on() => {
            Some(AuthMetrics::new(&metrics_registry)?)
        }
        None => None,
    };
    let auth = security
        .authenticator(auth_metrics)
        .await
        .map_err(anyhow::Error::msg)?;
    let (server_tls, client_tls) = match security.tls_files() {
        Some(files) => {
            let metrics = TlsMetrics::new(&metrics_registry).ok();
            let mut server = ServerTls::new(&files, ClientAuth::Optional)?;
            let mut client = ClientTls::new(&files)?;
            if let Some(metrics) = metrics {
                server = server.with_metrics(metrics.clone());
                client = client.with_metrics(metrics);
            }
            (Some(server), Some(client))
        }
        None => (None, None),
    };
    if config.workers.is_empty() && local_workers.is_empty() && config.registry.is_none() {
        anyhow::bail!(
            "workers must list at least one worker address (or set registry to learn them from it)"
        );
    }
    let mut pool_settings = config.pool_settings();
    pool_settings.tls = client_tls.clone().map(|tls| tls.expect_service("worker"));
    let pool = Arc::new(
        WorkerPool::new(&config.workers, local_workers, pool_settings)
            .map_err(anyhow::Error::msg)?,
    );
    let refresher = pool.spawn_refresh(Duration::from_millis(config.refresh_interval_ms));
    let outlier_detection = pool.spawn_outlier_detection();
    // Only a router that turned idle polling on counts its requests: in
    // `shamal up` the in-process worker counts them already.
    let keep_awake =
        shamal_idle_poll::KeepAwake::start_for_process(Duration::from_micros(config.idle_poll_us));
    // With a registry, rollouts drive the version choice and name shadow
    // versions; readiness still follows the workers alone.
    let metrics = RouterMetrics::new(&metrics_registry);
    let routing = match &config.registry {
        Some(_) => {
            let routing = RegistryRouting::new(&metrics_registry);
            let shadow = Shadow::new(
                &metrics_registry,
                config.max_shadow_inflight,
                pool.clone(),
                metrics.clone(),
                routing.clone(),
            )?;
            Some((routing, shadow))
        }
        None => None,
    };
    let registry_link = match (&config.registry, &routing) {
        (Some(address), Some((routing, _))) => Some(
            registry_link::spawn(
                address,
                client_tls.as_ref(),
                &config.router_id,
                Duration::from_millis(config.traffic_report_interval_ms),
                pool.clone(),
                routing.clone(),
            )
            .map_err(anyhow::Error::msg)?,
        ),
        _ => None,
    };
    // The audit trail: every inference call's record goes through a
    // durable local spool to the audit service (over mTLS when TLS is on).
    let audit_tls = client_tls.clone().map(|tls| tls.expect_service("audit"));
    let auditor = Auditor::start(
        config.audit.clone(),
        audit_tls.as_ref(),
        "router",
        &config.router_id,
        &metrics_registry,
    )?;
    // Refusals outside ModelInfer (metadata, async, HTTP routes) are
    // recorded as `auth.refused`; a refused ModelInfer is its own record.
    if auditor.is_enabled() {
        auth.observe_refusals(shamal_audit_client::RefusalRecorder::new(auditor.clone()));
    }
    let core = Arc::new(RoutingCore::new(CoreParts {
        pool: pool.clone(),
        metrics,
        limits: config.limits(),
        registry: routing,
        keep_awake,
        auth: auth.clone(),
        auditor: auditor.clone(),
    }));
    let autoscale_signals = autoscale::spawn(
        &metrics_registry,
        pool,
        core.model_inflight(),
        config.autoscale_target_inflight,
    );

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    shamal_rpc::set_health(&health_reporter, false).await;
    let readiness = Readiness::default();
    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let wait_stop = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };
    let (async_api, async_tasks) = match async_api::AsyncApi::start(
        &config,
        core.clone(),
        &metrics_registry,
        async_queue,
        stop.clone(),
    )? {
        Some((api, tasks)) => (Some(api), Some(tasks)),
        None => (None, None),
    };

    // Readiness follows the worker pool until shutdown starts.
    let readiness_task = {
        let core = core.clone();
        let readiness = readiness.clone();
        let health = health_reporter.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut was_ready = false;
            loop {
                let ready = core.ready() && !*stop.borrow();
                readiness.set(ready);
                if ready != was_ready {
                    if ready {
                        shamal_rpc::set_health(&health, true).await;
                    } else {
                        shamal_rpc::set_health(&health, false).await;
                    }
                    was_ready = ready;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop.changed() => {}
                }
            }
        })
    };
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("router draining");
        let _ = stop_sender.send(true);
    });

    let metrics_task = listeners.metrics.map(|listener| {
        tokio::spawn(shamal_telemetry::serve_metrics(
            listener,
            metrics_registry.clone(),
            readiness.clone(),
            wait_stop(stop.clone()),
        ))
    });

    let grpc_service = GrpcInferenceServiceServer::new(RouterService::new(core.clone()))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let async_service = AsyncInferenceServer::new(async_api::AsyncService::new(
        core.clone(),
        async_api.clone(),
    ))
    .max_decoding_message_size(config.max_message_bytes)
    .max_encoding_message_size(config.max_message_bytes);
    // Every method but ModelInfer is authorised here, by its policy in
    // `auth::grpc_access`; ModelInfer by the inference pipeline's own step.
    let grpc = tonic::transport::Server::builder()
        .layer(GrpcAuthLayer::new(
            auth.clone(),
            auth::grpc_access,
            auth::API,
        ))
        .add_service(health_service)
        .add_service(grpc_service)
        .add_service(async_service)
        .serve_with_incoming_shutdown(
            Incoming::new(listeners.grpc, server_tls.as_ref()),
            wait_stop(stop.clone()),
        );
    // TCP_NODELAY is set on every connection: Nagle's algorithm would hold
    // small responses back for delayed ACKs.
    let http = axum::serve(
        HttpListener::new(listeners.http, server_tls.as_ref()),
        http::router_with_async(core.clone(), async_api, config.max_message_bytes)
            .into_make_service_with_connect_info::<PeerInfo>(),
    )
    .with_graceful_shutdown(wait_stop(stop.clone()));
    let (grpc_result, http_result) = tokio::join!(grpc, http);
    readiness_task.abort();
    refresher.abort();
    outlier_detection.abort();
    autoscale_signals.abort();
    if let Some(tasks) = async_tasks {
        tasks.abort();
    }
    if let Some(link) = registry_link {
        link.stop().await;
    }
    // Every answered call's record is spooled; give the shipper a moment
    // to hand them over (what is left is shipped by the next start).
    if auditor.is_enabled() {
        if let Err(timeout) = auditor.drain(audit::DRAIN_AT_SHUTDOWN).await {
            tracing::warn!(%timeout, "audit records left in the spool at shutdown");
        }
        auditor.shutdown().await;
    }
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    tracing::info!("router stopped");
    grpc_result?;
    http_result?;
    Ok(())
}
