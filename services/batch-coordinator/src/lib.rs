//! The batch coordinator: batch inference jobs over datasets, split into
//! shards that workers score in a batch role of their own, tracked in
//! PostgreSQL (SQLite embedded), resumable after any crash, with exactly
//! one output row per input row (`docs/batch.md`).
//!
//! - [`Coordinator`](coordinator::Coordinator) checks a job before any
//!   work (model and version through the registry, the model's signature
//!   through an inference endpoint's `ModelMetadata`, the dataset's
//!   columns, the regions), plans its shards, stores them and queues one
//!   `ShardTask` per shard on the batch queue, then follows each to its
//!   result, retries failed shards a bounded number of times and writes
//!   the manifest last.
//! - It serves `shamal.batch.v1.BatchService` over gRPC ([`grpc`]) and as
//!   REST with an OpenAPI document ([`rest`]), each method and route
//!   checked by its policy ([`auth`]).
//!
//! # The workers' contract
//!
//! A batch worker of region `R` takes entries of the batch queue (Redis
//! key prefix `shamal:batch` by default, consumer group `workers`) from the
//! streams of its models whose region is `R` or a region set holding `R`
//! ([`model::region_may_take`]); the coordinator puts each shard on the
//! stream of its job's region set ([`model::stream_region`]: `eu+uae`), or
//! of `default_region` for a job any region may score, at most
//! `queue_window` entries waiting per stream, higher priority first.
//! The payload is a protobuf `ShardTask`;
//! the worker reads the shard (`shamal_batch_io::read_shard`), scores it
//! with the task's model version, writes `part-<index>.parquet` in the
//! task's output with `PartWriter` and completes the entry with
//! `Outcome::Ok(ShardResult)` (protobuf) or `Outcome::Err` with the
//! reason. It touches the entries it holds (`JobQueue::touch`, as
//! `run_consumer` does) so that they are not reclaimed while it works.

pub mod auth;
pub mod catalog;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod model;
pub mod rest;
pub mod store;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use shamal_async_queue::{JobQueue, MemoryQueue, QueueConfig, RedisOptions, RedisQueue};
use shamal_audit_client::Auditor;
use shamal_auth::layer::GrpcAuthLayer;
use shamal_proto::shamal::batch::v1::batch_service_server::BatchServiceServer;
use shamal_rpc::serving::{Serving, serving};
use shamal_telemetry::MetricsRegistry;
use shamal_tls::{ClientTls, HttpListener, Incoming, PeerInfo};
use tokio::net::TcpListener;

pub use catalog::{MetadataSource, ModelCatalog};
pub use config::{BatchArgs, BatchConfig};
pub use coordinator::Coordinator;

/// Largest gRPC message.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// How long a stopping coordinator waits for its audit events.
const AUDIT_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Pre-bound listeners (port 0 in tests).
pub struct BatchListeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
    pub metrics: Option<TcpListener>,
}

impl BatchListeners {
    pub async fn bind(config: &BatchConfig) -> std::io::Result<BatchListeners> {
        Ok(BatchListeners {
            grpc: TcpListener::bind(config.grpc_listen).await?,
            http: TcpListener::bind(config.http_listen).await?,
            metrics: match config.metrics_listen {
                Some(address) => Some(TcpListener::bind(address).await?),
                None => None,
            },
        })
    }
}

/// Where the batch queue comes from.
#[derive(Clone)]
pub enum QueueSource {
    /// A queue shared in process (the `MemoryQueue` of `shamal up`, tests).
    Shared(Arc<dyn JobQueue>),
    /// Redis, connected by the coordinator.
    Redis {
        options: RedisOptions,
        config: QueueConfig,
    },
}

impl fmt::Debug for QueueSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueSource::Shared(_) => f.write_str("Shared(..)"),
            QueueSource::Redis { options, config } => f
                .debug_struct("Redis")
                .field("key_prefix", &options.key_prefix)
                .field("config", config)
                .finish_non_exhaustive(),
        }
    }
}

impl QueueSource {
    /// The queue of `config`: Redis at `queue_url`, or a new in-process
    /// queue (no worker outside this process can take its shards).
    pub fn of(config: &BatchConfig) -> anyhow::Result<QueueSource> {
        Ok(match &config.queue_url {
            Some(url) => QueueSource::Redis {
                options: RedisOptions::new(url.clone()).with_key_prefix(&config.queue_key_prefix),
                config: config.queue_config(),
            },
            None => {
                tracing::warn!(
                    "no queue_url: the batch queue is in process; only workers in this process can take shards"
                );
                QueueSource::Shared(Arc::new(MemoryQueue::new(config.queue_config())?))
            }
        })
    }

    pub async fn connect(self) -> anyhow::Result<Arc<dyn JobQueue>> {
        Ok(match self {
            QueueSource::Shared(queue) => queue,
            QueueSource::Redis { options, config } => {
                Arc::new(RedisQueue::connect(options, config).await?)
            }
        })
    }
}

/// What the coordinator depends on besides its store.
#[derive(Clone)]
pub struct Dependencies {
    pub queue: QueueSource,
    pub catalog: Arc<dyn ModelCatalog>,
    pub metadata: Arc<dyn MetadataSource>,
    pub auditor: Auditor,
}

impl Dependencies {
    /// Production: the registry and the inference endpoint over gRPC (mTLS
    /// with this service's certificate under `[security]` TLS), the queue
    /// of `queue_url`, the auditor of `[audit]`.
    pub fn connect(
        config: &BatchConfig,
        metrics: &MetricsRegistry,
    ) -> anyhow::Result<Dependencies> {
        let tls = match config.security.tls_files() {
            Some(files) => Some(ClientTls::new(&files)?),
            None => None,
        };
        let registry = shamal_registry_client::channel_with(
            &config.registry_endpoint,
            tls.as_ref()
                .map(|tls| tls.expect_service("registry"))
                .as_ref(),
        )?;
        let inference = shamal_registry_client::channel_with(
            &config.inference_endpoint,
            tls.as_ref()
                .map(|tls| tls.expect_service("router"))
                .as_ref(),
        )?;
        let auditor = if config.audit.enabled() {
            let audit_tls = tls.as_ref().map(|tls| tls.expect_service("audit"));
            let instance = std::env::var("HOSTNAME")
                .ok()
                .filter(|name| !name.trim().is_empty())
                .unwrap_or_else(|| config.grpc_listen.to_string());
            Auditor::start(
                config.audit.clone(),
                audit_tls.as_ref(),
                "batch",
                &instance,
                metrics,
            )?
        } else {
            Auditor::disabled()
        };
        Ok(Dependencies {
            queue: QueueSource::of(config)?,
            catalog: Arc::new(catalog::RegistryCatalog::new(registry)),
            metadata: Arc::new(catalog::InferenceMetadata::new(inference)),
            auditor,
        })
    }
}

/// Runs the coordinator until `shutdown` completes (the binary).
pub async fn run(
    config: BatchConfig,
    listeners: BatchListeners,
    metrics: MetricsRegistry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let dependencies = Dependencies::connect(&config, &metrics)?;
    let auditor = dependencies.auditor.clone();
    let served = serve(config, dependencies, listeners, metrics, shutdown, |_| {}).await;
    if let Err(error) = auditor.drain(AUDIT_DRAIN_TIMEOUT).await {
        tracing::warn!(%error, "audit events left in the spool for the next start");
    }
    auditor.shutdown().await;
    served
}

/// Serves until `shutdown` completes: opens the store, resumes the jobs
/// it holds, serves gRPC, REST and metrics. `started` sees the coordinator
/// once it is open.
pub async fn serve(
    config: BatchConfig,
    dependencies: Dependencies,
    listeners: BatchListeners,
    metrics: MetricsRegistry,
    shutdown: impl Future<Output = ()> + Send + 'static,
    started: impl FnOnce(&Arc<Coordinator>),
) -> anyhow::Result<()> {
    let Serving {
        health_service,
        readiness,
        stop,
    } = serving::<BatchServiceServer<grpc::BatchGrpc>>("batch coordinator", shutdown).await;
    let wait_stop = shamal_rpc::serving::stopped;
    let (auth, server_tls) = config
        .security
        .serve_side("batch", config::EXPOSURE, &metrics)
        .await
        .map_err(anyhow::Error::msg)?;
    if dependencies.auditor.is_enabled() {
        auth.observe_refusals(shamal_audit_client::RefusalRecorder::new(
            dependencies.auditor.clone(),
        ));
    }
    if let Some(options) = config.s3_options() {
        shamal_batch_io::configure_s3(options);
    }
    let store = store::Store::connect(&config.database_url).await?;
    let queue = dependencies.queue.connect().await?;
    let coordinator = Coordinator::new(
        store,
        queue,
        dependencies.catalog,
        dependencies.metadata,
        dependencies.auditor,
        config.settings(),
        metrics::BatchMetrics::new(&metrics)?,
        stop.clone(),
    );
    let resumed = coordinator.resume().await?;
    tracing::info!(resumed, "batch coordinator open");
    started(&coordinator);
    let metrics_task = listeners.metrics.map(|listener| {
        tokio::spawn(shamal_telemetry::serve_metrics(
            listener,
            metrics.clone(),
            readiness.clone(),
            wait_stop(stop.clone()),
        ))
    });
    let grpc = tonic::transport::Server::builder()
        .layer(GrpcAuthLayer::new(
            auth.clone(),
            auth::grpc_access,
            auth::GRPC_API,
        ))
        .add_service(health_service)
        .add_service(
            BatchServiceServer::new(grpc::BatchGrpc::new(coordinator.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            Incoming::new(listeners.grpc, server_tls.as_ref()),
            wait_stop(stop.clone()),
        );
    let http = axum::serve(
        HttpListener::new(listeners.http, server_tls.as_ref()),
        rest::router(coordinator.clone(), auth).into_make_service_with_connect_info::<PeerInfo>(),
    )
    .with_graceful_shutdown(wait_stop(stop.clone()));
    let (grpc_result, http_result) = tokio::join!(grpc, http);
    coordinator.join().await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    tracing::info!("batch coordinator stopped");
    grpc_result?;
    http_result?;
    Ok(())
}

/// A coordinator running in the background (tests, `shamal up`).
pub struct RunningBatch {
    pub coordinator: Arc<Coordinator>,
    pub grpc_address: SocketAddr,
    pub http_address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningBatch {
    /// Serves `config` with `dependencies` on the given listeners in a
    /// background task, once its store is open and its jobs resumed.
    pub async fn start(
        config: BatchConfig,
        dependencies: Dependencies,
        listeners: BatchListeners,
        metrics: MetricsRegistry,
    ) -> anyhow::Result<RunningBatch> {
        let grpc_address = listeners.grpc.local_addr()?;
        let http_address = listeners.http.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (opened, open) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            serve(
                config,
                dependencies,
                listeners,
                metrics,
                async move {
                    let _ = stopped.await;
                },
                move |coordinator| {
                    let _ = opened.send(coordinator.clone());
                },
            )
            .await
        });
        let coordinator = match open.await {
            Ok(coordinator) => coordinator,
            Err(_) => {
                return Err(task
                    .await?
                    .err()
                    .unwrap_or_else(|| anyhow::anyhow!("the batch coordinator did not start")));
            }
        };
        Ok(RunningBatch {
            coordinator,
            grpc_address,
            http_address,
            stop: Some(stop),
            task,
        })
    }

    /// Starts a coordinator on loopback port 0 with the given database,
    /// auth off (tests, embedding).
    pub async fn start_local(
        database_url: &str,
        dependencies: Dependencies,
        tune: impl FnOnce(&mut BatchConfig),
    ) -> anyhow::Result<RunningBatch> {
        let mut config = BatchConfig {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: None,
            database_url: database_url.to_owned(),
            ..BatchConfig::default()
        };
        config.security.insecure = true;
        tune(&mut config);
        config.validate()?;
        let listeners = BatchListeners::bind(&config).await?;
        RunningBatch::start(config, dependencies, listeners, MetricsRegistry::new()).await
    }

    /// Stops serving and waits for the server to finish.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await?
    }
}
