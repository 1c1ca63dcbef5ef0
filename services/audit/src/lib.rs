//! The audit service: an append-only, hash-chained log of every change and
//! every inference (`shamal.audit.v1.AuditService`), in Postgres (or SQLite
//! for the embedded mode) through one set of sqlx queries.
//!
//! - **Append** validates each event, skips event ids already recorded,
//!   numbers and chains the rest (`shamal_audit::Record::append`) and
//!   writes them in one transaction, serialised in this process (a mutex)
//!   and at the database (a row lock on Postgres, the write lock on
//!   SQLite), so that replicas never fork the chain.
//! - A background task signs a **checkpoint** of the head every
//!   `checkpoint_every` records or `checkpoint_interval_s`.
//! - **Query** filters records (indexed), a page at a time; **Export**
//!   streams records, checkpoints and tombstones of a time range and ends
//!   with a signed seal that `shamal_audit::verify_export` checks offline;
//!   **Verify** recomputes the stored chain and checks every signature.
//! - **Retention** removes only whole checkpointed ranges, leaving a
//!   signed tombstone; the database's triggers refuse every other UPDATE
//!   or DELETE.

pub mod auth;
pub mod config;
pub mod error;
pub mod grpc;
pub mod log;
pub mod metrics;
pub mod rows;
pub mod store;
pub mod walk;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use shamal_auth::layer::GrpcAuthLayer;
use shamal_proto::shamal::audit::v1::audit_service_server::AuditServiceServer;
use shamal_rpc::serving::{Serving, serving};
use shamal_telemetry::MetricsRegistry;
use shamal_tls::Incoming;
use tokio::net::TcpListener;

pub use config::{AuditArgs, AuditConfig};
pub use log::AuditLog;

/// Largest gRPC message (an Append of up to 10,000 events).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Pre-bound listeners (port 0 in tests).
pub struct AuditListeners {
    pub grpc: TcpListener,
    pub metrics: Option<TcpListener>,
}

impl AuditListeners {
    pub async fn bind(config: &AuditConfig) -> std::io::Result<AuditListeners> {
        Ok(AuditListeners {
            grpc: TcpListener::bind(config.grpc_listen).await?,
            metrics: match config.metrics_listen {
                Some(address) => Some(TcpListener::bind(address).await?),
                None => None,
            },
        })
    }
}

/// Opens the database (migrating it) and the signing key (created when
/// absent), with the service's metrics on `metrics`.
pub async fn open(
    config: &AuditConfig,
    metrics: &MetricsRegistry,
) -> anyhow::Result<Arc<AuditLog>> {
    let store = store::Store::connect(&config.database_url).await?;
    let signer = shamal_audit::Signer::load_or_create(&config.signing_key_file)?;
    tracing::info!(
        key_id = %signer.key_id(),
        signing_key_file = %config.signing_key_file.display(),
        backend = ?store.backend,
        "audit log open; checkpoints are signed with this key (PublicKey serves it)"
    );
    let log = Arc::new(AuditLog::new(
        store,
        signer,
        metrics::AuditMetrics::new(metrics)?,
        log::CheckpointPolicy {
            every: config.checkpoint_every,
            interval: config.checkpoint_interval(),
        },
    ));
    let head = log.head().await?;
    log.metrics
        .head_seq
        .set(i64::try_from(head.seq).unwrap_or(i64::MAX));
    tracing::info!(head_seq = head.seq, head = %head.hash, "audit chain head");
    Ok(log)
}

/// Runs the audit service until `shutdown` completes.
pub async fn run(
    config: AuditConfig,
    listeners: AuditListeners,
    metrics: MetricsRegistry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let log = open(&config, &metrics).await?;
    serve(log, &config, listeners, metrics, shutdown).await
}

/// Serves an opened log until `shutdown` completes: the gRPC API, the
/// checkpointer, retention (when `retention_days` is set) and the metrics
/// listener.
pub async fn serve(
    log: Arc<AuditLog>,
    config: &AuditConfig,
    listeners: AuditListeners,
    metrics: MetricsRegistry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Listen for the stop first (SIGTERM during the start-up stops it too).
    let Serving {
        health_service,
        readiness,
        stop,
    } = serving::<AuditServiceServer<grpc::AuditGrpc>>("audit service", shutdown).await;
    let wait_stop = shamal_rpc::serving::stopped;
    // Optional client certificates: producers present theirs, admins a
    // bearer token.
    let (auth, server_tls) = config
        .security
        .serve_side("audit", config::EXPOSURE, &metrics)
        .await
        .map_err(anyhow::Error::msg)?;
    // Refused calls to this service are recorded in its own log (the
    // instance: the address it serves on).
    let instance = listeners.grpc.local_addr()?.to_string();
    let (own_refusals, refusals_task) = auth::OwnRefusals::start(log.clone(), instance);
    auth.observe_refusals(own_refusals);
    let checkpointer = log.spawn_checkpointer(stop.clone());
    let retention = config.retention().map(|retention| {
        tracing::info!(
            retention_days = config.retention_days,
            "retention on: whole checkpointed ranges older than this are removed, leaving signed tombstones"
        );
        log.spawn_retention(
            retention,
            std::time::Duration::from_secs(config.retention_interval_s),
            stop.clone(),
        )
    });
    let metrics_task = listeners.metrics.map(|listener| {
        tokio::spawn(shamal_telemetry::serve_metrics(
            listener,
            metrics.clone(),
            readiness.clone(),
            wait_stop(stop.clone()),
        ))
    });
    let result = tonic::transport::Server::builder()
        // Every method is authorised by its policy (`auth::grpc_access`).
        .layer(GrpcAuthLayer::new(auth, auth::grpc_access, auth::GRPC_API))
        .add_service(health_service)
        .add_service(
            AuditServiceServer::new(grpc::AuditGrpc::new(log.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            Incoming::new(listeners.grpc, server_tls.as_ref()),
            wait_stop(stop.clone()),
        )
        .await;
    // The server (and with it the authenticator holding the observer) is
    // gone: the task appends what is queued and ends.
    let _ = refusals_task.await;
    let _ = checkpointer.await;
    if let Some(task) = retention {
        let _ = task.await;
    }
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    tracing::info!("audit service stopped");
    result?;
    Ok(())
}

/// An audit service running in the background (tests, `shamal up`).
pub struct RunningAudit {
    pub log: Arc<AuditLog>,
    pub grpc_address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningAudit {
    /// Opens the log of `config` and serves it on the given listeners in a
    /// background task.
    pub async fn start(
        config: AuditConfig,
        listeners: AuditListeners,
        metrics: MetricsRegistry,
    ) -> anyhow::Result<RunningAudit> {
        let log = open(&config, &metrics).await?;
        let grpc_address = listeners.grpc.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let serving = log.clone();
        let task = tokio::spawn(async move {
            serve(serving, &config, listeners, metrics, async move {
                let _ = stopped.await;
            })
            .await
        });
        Ok(RunningAudit {
            log,
            grpc_address,
            stop: Some(stop),
            task,
        })
    }

    /// Starts an audit service on loopback port 0 with the given database,
    /// its signing key in `dir` (tests).
    pub async fn start_local(
        database_url: &str,
        dir: &std::path::Path,
    ) -> anyhow::Result<RunningAudit> {
        let config = AuditConfig {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: None,
            database_url: database_url.to_owned(),
            signing_key_file: dir.join("audit-signing-key.pem"),
            ..AuditConfig::default()
        };
        let listeners = AuditListeners::bind(&config).await?;
        RunningAudit::start(config, listeners, MetricsRegistry::new()).await
    }

    /// Stops serving and waits for the server to finish.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await?
    }
}
