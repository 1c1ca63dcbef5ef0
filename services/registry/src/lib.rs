//! The registry: system of record for models, versions (content-addressed
//! artifacts), aliases and rollouts, in Postgres (or SQLite for the
//! embedded mode) through one set of sqlx queries. Routers and workers use
//! its gRPC API, with a Watch stream of changes; release managers use its
//! REST API (OpenAPI document at `/openapi.json`) and web UI. It also keeps
//! worker membership (registration, heartbeats, leases, graceful drain), the
//! data-residency policies routers enforce, and each model's placement
//! policy: which workers hold which versions.

pub mod access;
pub mod artifacts;
pub mod auth;
pub mod config;
pub mod error;
pub mod grpc;
pub mod membership;
pub mod model;
mod paging;
pub mod placement;
pub mod planner;
pub mod registry;
pub mod residency;
pub mod rest;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use shamal_audit_client::Auditor;
use shamal_auth::layer::GrpcAuthLayer;
use shamal_auth::security::Exposure;
use shamal_proto::shamal::registry::v1::registry_server::RegistryServer;
use shamal_rpc::serving::{Serving, serving};
use shamal_telemetry::MetricsRegistry;
use shamal_tls::{ClientTls, HttpListener, Incoming, PeerInfo};
use tokio::net::TcpListener;

pub use config::{RegistryArgs, RegistryConfig};
pub use registry::ModelRegistry;

/// Pre-bound listeners (port 0 in tests).
pub struct RegistryListeners {
    pub http: TcpListener,
    pub grpc: TcpListener,
    pub metrics: Option<TcpListener>,
}

impl RegistryListeners {
    pub async fn bind(config: &RegistryConfig) -> std::io::Result<RegistryListeners> {
        Ok(RegistryListeners {
            http: TcpListener::bind(config.http_listen).await?,
            grpc: TcpListener::bind(config.grpc_listen).await?,
            metrics: match config.metrics_listen {
                Some(address) => Some(TcpListener::bind(address).await?),
                None => None,
            },
        })
    }
}

/// How long a stopping registry waits for the audit service to acknowledge
/// what is spooled (the rest is shipped by the next start).
pub const AUDIT_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts the auditor of `config.audit` (disabled without an endpoint),
/// over mTLS with the `[security]` certificate when TLS is configured (the
/// server must then be the audit service), its metrics in `metrics`.
pub fn start_auditor(
    config: &RegistryConfig,
    metrics: &MetricsRegistry,
) -> anyhow::Result<Auditor> {
    if !config.audit.enabled() {
        return Ok(Auditor::disabled());
    }
    let tls = match config.security.tls_files() {
        Some(files) => Some(ClientTls::new(&files)?.expect_service("audit")),
        None => None,
    };
    let instance = std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .unwrap_or_else(|| config.grpc_listen.to_string());
    Ok(Auditor::start(
        config.audit.clone(),
        tls.as_ref(),
        "registry",
        &instance,
        metrics,
    )?)
}

/// Drains (for at most [`AUDIT_DRAIN_TIMEOUT`]) and stops an auditor.
pub async fn stop_auditor(auditor: Auditor) {
    if let Err(error) = auditor.drain(AUDIT_DRAIN_TIMEOUT).await {
        tracing::warn!(%error, "audit events left in the spool for the next start");
    }
    auditor.shutdown().await;
}

/// Opens the database (migrating it) and the artifact store, which
/// encrypts new artifacts when a key ring is configured. Mutations are not
/// audited: see [`open_with_auditor`].
pub async fn open(config: &RegistryConfig) -> anyhow::Result<Arc<ModelRegistry>> {
    open_with_auditor(config, Auditor::disabled()).await
}

/// [`open`], reporting every mutation to `auditor`.
pub async fn open_with_auditor(
    config: &RegistryConfig,
    auditor: Auditor,
) -> anyhow::Result<Arc<ModelRegistry>> {
    let keys = config.artifact_key_ring()?;
    match &keys {
        Some(keys) => tracing::info!(
            active_key = keys.active_id(),
            keys = keys.key_ids().count(),
            "artifacts are encrypted at rest"
        ),
        None => tracing::info!("artifact encryption at rest is off"),
    }
    if let Some(path) = config.database_url.strip_prefix("sqlite://")
        && !path.starts_with(":memory:")
    {
        let path = path.split('?').next().unwrap_or(path);
        if let Some(parent) = std::path::Path::new(path).parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)?;
        }
    }
    let store = store::Store::connect(&config.database_url).await?;
    let artifacts = Arc::new(
        artifacts::LocalArtifactStore::new(&config.artifact_dir)?.with_keys(keys.map(Arc::new)),
    );
    Ok(Arc::new(
        ModelRegistry::new(store, artifacts, config.max_artifact_bytes)
            .await?
            .with_membership(config.membership())
            .with_placement(config.placement())
            .with_auditor(auditor),
    ))
}

/// Runs the registry until `shutdown` completes.
pub async fn run(
    config: RegistryConfig,
    listeners: RegistryListeners,
    metrics: MetricsRegistry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let auditor = start_auditor(&config, &metrics)?;
    let registry = open_with_auditor(&config, auditor.clone()).await?;
    let served = serve(registry, &config, listeners, metrics, shutdown).await;
    stop_auditor(auditor).await;
    served
}

/// Serves an opened registry until `shutdown` completes.
pub async fn serve(
    registry: Arc<ModelRegistry>,
    config: &RegistryConfig,
    listeners: RegistryListeners,
    metrics: MetricsRegistry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Optional client certificates: routers and workers present theirs,
    // people and scripts a bearer token.
    let (auth, server_tls) = config
        .security
        .serve_side("registry", Exposure::Public, &metrics)
        .await
        .map_err(anyhow::Error::msg)?;
    // Every refused call, gRPC or REST, is recorded as `auth.refused`.
    if registry.auditor().is_enabled() {
        auth.observe_refusals(shamal_audit_client::RefusalRecorder::new(
            registry.auditor().clone(),
        ));
    }
    let Serving {
        health_service,
        readiness,
        stop,
    } = serving::<RegistryServer<grpc::RegistryGrpc>>("registry", shutdown).await;
    let wait_stop = shamal_rpc::serving::stopped;
    // Workers whose lease expires are marked lost while the registry serves.
    let sweeper = registry.spawn_sweeper(stop.clone());
    // Versions of `weighted` models follow traffic, workers and rollouts.
    let planner = registry.spawn_planner(stop.clone());
    let metrics_task = listeners.metrics.map(|listener| {
        tokio::spawn(shamal_telemetry::serve_metrics(
            listener,
            metrics.clone(),
            readiness.clone(),
            wait_stop(stop.clone()),
        ))
    });
    let grpc = tonic::transport::Server::builder()
        // Every method is authorised by its policy (`auth::grpc_access`).
        .layer(GrpcAuthLayer::new(
            auth.clone(),
            auth::grpc_access,
            auth::GRPC_API,
        ))
        .add_service(health_service)
        .add_service(
            RegistryServer::new(grpc::RegistryGrpc::new(registry.clone(), stop.clone()))
                .max_decoding_message_size(64 * 1024 * 1024)
                .max_encoding_message_size(64 * 1024 * 1024),
        )
        .serve_with_incoming_shutdown(
            Incoming::new(listeners.grpc, server_tls.as_ref()),
            wait_stop(stop.clone()),
        );
    // The web UI's OIDC login, when OIDC is on.
    let web_login =
        rest::session::WebLogin::of(config, listeners.http.local_addr()?, auth.clone())?;
    let http = axum::serve(
        HttpListener::new(listeners.http, server_tls.as_ref()),
        rest::session::attach(
            rest::router_with_auth(registry.clone(), config.max_artifact_bytes, &metrics, auth)?,
            web_login,
        )
        .into_make_service_with_connect_info::<PeerInfo>(),
    )
    .with_graceful_shutdown(wait_stop(stop.clone()));
    let (grpc_result, http_result) = tokio::join!(grpc, http);
    let _ = sweeper.await;
    let _ = planner.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    tracing::info!("registry stopped");
    grpc_result?;
    http_result?;
    Ok(())
}

/// A registry running in the background (tests, `shamal up`).
pub struct RunningRegistry {
    pub registry: Arc<ModelRegistry>,
    pub http_address: SocketAddr,
    pub grpc_address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningRegistry {
    /// Opens the registry of `config` and serves it on the given
    /// listeners in a background task; its auditor (of `config.audit`) is
    /// drained and shut down when it stops.
    pub async fn start(
        config: RegistryConfig,
        listeners: RegistryListeners,
        metrics: MetricsRegistry,
    ) -> anyhow::Result<RunningRegistry> {
        let auditor = start_auditor(&config, &metrics)?;
        RunningRegistry::launch(config, listeners, metrics, auditor, true).await
    }

    /// [`RunningRegistry::start`] reporting mutations to `auditor` (the
    /// caller's: `config.audit` is not used, and stopping the registry
    /// leaves the auditor running).
    pub async fn start_with_auditor(
        config: RegistryConfig,
        listeners: RegistryListeners,
        metrics: MetricsRegistry,
        auditor: Auditor,
    ) -> anyhow::Result<RunningRegistry> {
        RunningRegistry::launch(config, listeners, metrics, auditor, false).await
    }

    async fn launch(
        config: RegistryConfig,
        listeners: RegistryListeners,
        metrics: MetricsRegistry,
        auditor: Auditor,
        owns_auditor: bool,
    ) -> anyhow::Result<RunningRegistry> {
        let registry = open_with_auditor(&config, auditor.clone()).await?;
        let http_address = listeners.http.local_addr()?;
        let grpc_address = listeners.grpc.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let serving = registry.clone();
        let task = tokio::spawn(async move {
            let served = serve(serving, &config, listeners, metrics, async move {
                let _ = stopped.await;
            })
            .await;
            if owns_auditor {
                stop_auditor(auditor).await;
            }
            served
        });
        Ok(RunningRegistry {
            registry,
            http_address,
            grpc_address,
            stop: Some(stop),
            task,
        })
    }

    /// Starts a registry on loopback port 0 with the given database and
    /// artifact directory (tests).
    pub async fn start_local(
        database_url: &str,
        artifact_dir: &std::path::Path,
    ) -> anyhow::Result<RunningRegistry> {
        RunningRegistry::start_local_with(database_url, artifact_dir, Auditor::disabled()).await
    }

    /// [`RunningRegistry::start_local`] reporting mutations to `auditor`
    /// (left running when the registry stops).
    pub async fn start_local_with(
        database_url: &str,
        artifact_dir: &std::path::Path,
        auditor: Auditor,
    ) -> anyhow::Result<RunningRegistry> {
        let config = RegistryConfig {
            http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: None,
            database_url: database_url.to_owned(),
            artifact_dir: artifact_dir.to_owned(),
            ..RegistryConfig::default()
        };
        let listeners = RegistryListeners::bind(&config).await?;
        RunningRegistry::start_with_auditor(config, listeners, MetricsRegistry::new(), auditor)
            .await
    }

    /// Stops serving and waits for the server to finish.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await?
    }
}
