//! The settings every worker process shares, whatever its runtime: where it
//! listens, what it serves (repository, registry), how it is known to the
//! registry, its batching defaults and message limit, and the async
//! inference queue it consumes.
//!
//! A worker service's configuration flattens [`NodeConfig`] in
//! (`#[serde(flatten)]`) and its flags flatten [`NodeArgs`]
//! (`#[command(flatten)]`), keeping only its runtime's own settings; its
//! `load` goes through [`NodeConfig::load`], which layers defaults < TOML
//! file < environment < flags (see `shamal_telemetry::config`) and runs the
//! shared checks. A shared setting is thereby one field here plus one in
//! [`NodeArgs`], for every worker.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use shamal_async_queue::{QueueConfig, RedisOptions};
use shamal_audit_client::AuditClientConfig;
use shamal_auth::security::{Exposure, SecurityArgs, SecurityConfig};
use shamal_telemetry::config::{ConfigError, Layers, Redacted};

use std::collections::HashMap;
use std::sync::Arc;

use shamal_async_queue::JobQueue;

use crate::batch_role::{BatchRole, DEFAULT_IDLE_UNLOAD, DEFAULT_KEY_PREFIX};
use crate::{
    AsyncInference, ModelDefaults, QueueSource, RegistryAgentSettings, Worker, WorkerConfig,
    WorkerListeners,
};

/// Settings shared by the cpu-worker and the gpu-worker (one TOML key,
/// environment variable and flag each; see docs/operations.md).
///
/// No `Default`: the listen ports differ by worker, so each worker builds
/// its defaults with [`NodeConfig::with_ports`], and loading always starts
/// from them (every field is present in the bottom layer).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct NodeConfig {
    /// mTLS: the `[security]` table (`tls_cert`, `tls_key`, `tls_ca`,
    /// `trust_domain`) or `insecure`; workers take no bearer tokens (only
    /// services call them).
    pub security: SecurityConfig,
    /// Address of the v2 gRPC service the router calls.
    pub grpc_listen: SocketAddr,
    /// Address of `/metrics` and probes; `None` (only when embedding the
    /// service as a library) disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// Triton-layout model repository. Unset: the worker's default
    /// repository when no registry is configured, none otherwise. With
    /// both, repository and registry models are served side by side.
    pub model_repository: Option<PathBuf>,
    /// The model registry's internal gRPC address (`host:port` or URL);
    /// set, the worker loads the versions the registry assigns it.
    pub registry: Option<String>,
    /// Identity in the registry; unset: `<hostname>-<gRPC port>`.
    pub worker_id: Option<String>,
    /// `host:port` routers reach this worker's gRPC at; unset: the bound
    /// gRPC address (the host name in place of 0.0.0.0).
    pub advertise_address: Option<String>,
    /// Region (data residency) reported to the registry, and whose async
    /// jobs the worker runs.
    pub region: String,
    /// Where artifacts fetched from the registry are kept (by sha256).
    pub artifact_cache: PathBuf,
    /// Requests this worker is sized to run concurrently, reported to the
    /// registry (routers weight their choice by it); unset: `instances ×
    /// max_batch_size`.
    pub capacity: Option<u32>,
    /// On shutdown with a registry: how long the worker keeps serving after
    /// the registry marked it draining, so routers route around it before
    /// it stops taking requests (milliseconds).
    pub drain_grace_ms: u64,
    /// Defaults for models whose configuration leaves them out.
    pub max_batch_size: usize,
    pub max_queue_delay_us: u64,
    pub max_queue_size: usize,
    pub max_message_bytes: usize,
    /// Redis URL of the async inference queue (`redis://host:port[/db]`);
    /// set, the worker also runs the async jobs of its `region` for the
    /// models it serves. Unset: no async jobs.
    pub async_queue: Option<String>,
    /// Prefix of the queue's Redis keys (the routers' `async_key_prefix`).
    pub async_key_prefix: String,
    /// How long the results this worker writes are kept, in ms (the
    /// routers' `async_result_ttl_ms`).
    pub async_result_ttl_ms: u64,
    /// Async jobs run at once; unset: `capacity` (`instances ×
    /// max_batch_size` when that is unset too).
    pub async_concurrency: Option<usize>,
    /// The audit trail of the async jobs this worker runs (one
    /// `inference.async_run` record each): the `[audit]` table
    /// (`endpoint`, `spool_dir`, `max_spool_bytes`, `on_full`, ...), as the
    /// router's; off without an `endpoint`.
    pub audit: AuditClientConfig,
    /// The batch role (shards of batch inference jobs): the `[batch]`
    /// table; off without a `queue`.
    pub batch: BatchRoleConfig,
}

/// The `[batch]` table: the worker's batch role (see `batch_role` and
/// docs/batch.md, "Workers: the batch role").
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchRoleConfig {
    /// The batch queue: a `redis://` URL, or `memory` for the in-process
    /// queue of an embedding program (`shamal up`). Unset: no batch role.
    pub queue: Option<String>,
    /// Prefix of the batch queue's Redis keys (the coordinator's
    /// `queue_key_prefix`).
    pub key_prefix: String,
    /// How long the shard results this worker writes are kept, seconds
    /// (the coordinator's `queue_result_ttl_s`).
    pub result_ttl_s: u64,
    /// A shard entry left untouched this long (its worker died) is taken
    /// over by another worker, milliseconds. Live workers touch the
    /// entries they hold every third of it.
    pub reclaim_idle_ms: u64,
    /// Shards scored at once, each on a batch instance of its own.
    pub concurrency: usize,
    /// Compute threads of a batch instance (the cpu-worker's ONNX Runtime
    /// intra-op threads; the gpu-worker's candle threads are per process).
    pub threads: usize,
    /// A batch instance unused this long is dropped, milliseconds.
    pub idle_unload_ms: u64,
    /// Endpoint of an S3-compatible server for `s3://` inputs and outputs
    /// (unset: `AWS_ENDPOINT_URL`, else AWS). Credentials come from the
    /// environment (`AWS_ACCESS_KEY_ID`, ...), never from this file.
    pub s3_endpoint: Option<String>,
    /// The S3 region (unset: `AWS_REGION`, else `us-east-1`).
    pub s3_region: Option<String>,
    /// Allow an `http://` S3 endpoint (unset: `AWS_ALLOW_HTTP`).
    pub s3_allow_http: Option<bool>,
    /// Key file of the batch outputs' encryption at rest (the format of
    /// the registry's `artifact_key_file`: TOML or JSON, mode 0600); parts
    /// of jobs with `encrypt` are encrypted under its active key. Unset:
    /// such shards are refused `FAILED_PRECONDITION`.
    pub key_file: Option<PathBuf>,
}

impl Default for BatchRoleConfig {
    fn default() -> Self {
        BatchRoleConfig {
            queue: None,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            result_ttl_s: 7 * 86_400,
            reclaim_idle_ms: 60_000,
            concurrency: 1,
            threads: 1,
            idle_unload_ms: u64::try_from(DEFAULT_IDLE_UNLOAD.as_millis()).unwrap_or(60_000),
            s3_endpoint: None,
            s3_region: None,
            s3_allow_http: None,
            key_file: None,
        }
    }
}

/// The value of `batch.queue` that names the embedding program's queue.
pub const MEMORY_QUEUE: &str = "memory";

impl BatchRoleConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(queue) = &self.queue
            && queue != MEMORY_QUEUE
            && !shamal_async_queue::is_redis_url(queue)
        {
            return Err(ConfigError::invalid(format!(
                "batch.queue '{}' must be a redis:// URL or 'memory' (embedded)",
                Redacted(queue)
            )));
        }
        shamal_async_queue::check_shared_settings(
            &self.key_prefix,
            self.result_ttl_s.saturating_mul(1000),
        )
        .map_err(|error| {
            ConfigError::invalid(match error {
                shamal_async_queue::SettingError::KeyPrefix => {
                    "batch.key_prefix must be 1 to 128 printable characters without spaces"
                        .to_owned()
                }
                shamal_async_queue::SettingError::ResultTtl => {
                    "batch.result_ttl_s must be at least 1".to_owned()
                }
            })
        })?;
        if self.reclaim_idle_ms < 1_000 {
            return Err(ConfigError::invalid(
                "batch.reclaim_idle_ms must be at least 1000",
            ));
        }
        if self.concurrency == 0 {
            return Err(ConfigError::invalid("batch.concurrency must be at least 1"));
        }
        if self.threads == 0 {
            return Err(ConfigError::invalid("batch.threads must be at least 1"));
        }
        if self.idle_unload_ms < 1_000 {
            return Err(ConfigError::invalid(
                "batch.idle_unload_ms must be at least 1000",
            ));
        }
        if let Some(endpoint) = &self.s3_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(ConfigError::invalid(
                "batch.s3_endpoint must be an http:// or https:// URL",
            ));
        }
        if let Some(region) = &self.s3_region
            && (region.trim().is_empty() || region.len() > 64)
        {
            return Err(ConfigError::invalid(
                "batch.s3_region must be 1 to 64 characters",
            ));
        }
        Ok(())
    }

    /// The `batch.s3_*` settings, `None` when none is set.
    fn s3_options(&self) -> Option<shamal_batch_io::S3Options> {
        if self.s3_endpoint.is_none() && self.s3_region.is_none() && self.s3_allow_http.is_none() {
            return None;
        }
        Some(shamal_batch_io::S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            allow_http: self.s3_allow_http,
            ..shamal_batch_io::S3Options::default()
        })
    }
}

/// Flags of the `[batch]` table (`--batch-queue`, ...), each also read from
/// the worker's environment variable (`SHAMAL_CPU_WORKER_BATCH_QUEUE`, …).
#[derive(Clone, Debug, Default, clap::Args, Serialize)]
pub struct BatchArgs {
    /// The batch queue: a redis:// URL (or `memory` when embedded); turns
    /// the batch role on.
    #[arg(long)]
    #[serde(rename = "queue", skip_serializing_if = "Option::is_none")]
    pub batch_queue: Option<String>,
    /// Prefix of the batch queue's Redis keys (default shamal:batch).
    #[arg(long)]
    #[serde(rename = "key_prefix", skip_serializing_if = "Option::is_none")]
    pub batch_key_prefix: Option<String>,
    /// Shards scored at once (default 1).
    #[arg(long)]
    #[serde(rename = "concurrency", skip_serializing_if = "Option::is_none")]
    pub batch_concurrency: Option<usize>,
    /// Compute threads of a batch instance (default 1).
    #[arg(long)]
    #[serde(rename = "threads", skip_serializing_if = "Option::is_none")]
    pub batch_threads: Option<usize>,
    /// Key file of the batch outputs' encryption at rest.
    #[arg(long)]
    #[serde(rename = "key_file", skip_serializing_if = "Option::is_none")]
    pub batch_key_file: Option<PathBuf>,
}

impl BatchArgs {
    fn is_empty(&self) -> bool {
        self.batch_queue.is_none()
            && self.batch_key_prefix.is_none()
            && self.batch_concurrency.is_none()
            && self.batch_threads.is_none()
            && self.batch_key_file.is_none()
    }
}

/// Flags of the [`NodeConfig`] settings, each also read from the worker's
/// environment variable (`SHAMAL_CPU_WORKER_GRPC_LISTEN`, …: see
/// `shamal_telemetry::process::Service::env_prefix`). Serialized, only the
/// values given appear: it is the top layer of the configuration.
#[derive(Clone, Debug, Default, clap::Args, Serialize)]
pub struct NodeArgs {
    /// The `[security]` table's flags (`--tls-cert`, `--insecure`, ...).
    #[command(flatten)]
    pub security: SecurityArgs,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_listen: Option<SocketAddr>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_repository: Option<PathBuf>,
    /// Registry gRPC address to follow (host:port or URL).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_address: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_cache: Option<PathBuf>,
    /// Requests the worker is sized to run concurrently (default: instances
    /// × max batch size).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
    /// Milliseconds the worker keeps serving after the registry marked it
    /// draining, before it stops taking requests (default 1000).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_grace_ms: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_size: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queue_delay_us: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queue_size: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<usize>,
    /// Redis URL of the async inference queue.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_queue: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_key_prefix: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_result_ttl_ms: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_concurrency: Option<usize>,
    /// The `[audit]` table's flags (`--audit-endpoint`,
    /// `--audit-spool-dir`).
    #[command(flatten)]
    #[serde(skip_serializing_if = "AuditArgs::is_empty")]
    pub audit: AuditArgs,
    /// The `[batch]` table's flags (`--batch-queue`, ...).
    #[command(flatten)]
    #[serde(skip_serializing_if = "BatchArgs::is_empty")]
    pub batch: BatchArgs,
}

/// Flags of the `[audit]` table (as the registry's); its other keys are
/// set in the file.
#[derive(Clone, Debug, Default, clap::Args, Serialize)]
pub struct AuditArgs {
    /// The audit service's gRPC address (`https://audit:8301`): turns the
    /// audit trail of async jobs on (needs a spool directory).
    #[arg(long)]
    #[serde(rename = "endpoint", skip_serializing_if = "Option::is_none")]
    pub audit_endpoint: Option<String>,
    /// Directory of the audit spool (events not yet acknowledged).
    #[arg(long)]
    #[serde(rename = "spool_dir", skip_serializing_if = "Option::is_none")]
    pub audit_spool_dir: Option<PathBuf>,
}

impl AuditArgs {
    fn is_empty(&self) -> bool {
        self.audit_endpoint.is_none() && self.audit_spool_dir.is_none()
    }
}

impl NodeConfig {
    /// The defaults, listening on loopback at `grpc_port` and
    /// `metrics_port`.
    pub fn with_ports(grpc_port: u16, metrics_port: u16) -> NodeConfig {
        let defaults = ModelDefaults::default();
        NodeConfig {
            security: SecurityConfig::default(),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], grpc_port)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], metrics_port))),
            model_repository: None,
            registry: None,
            worker_id: None,
            advertise_address: None,
            region: "local".to_owned(),
            artifact_cache: std::env::temp_dir().join("shamal-artifacts"),
            capacity: None,
            drain_grace_ms: u64::try_from(crate::agent::DEFAULT_DRAIN_GRACE.as_millis())
                .unwrap_or(1000),
            max_batch_size: defaults.max_batch_size,
            max_queue_delay_us: u64::try_from(defaults.max_queue_delay.as_micros()).unwrap_or(0),
            max_queue_size: defaults.max_queue_size,
            max_message_bytes: shamal_rpc::DEFAULT_MAX_MESSAGE_BYTES,
            async_queue: None,
            async_key_prefix: "shamal:async".to_owned(),
            async_result_ttl_ms: 3_600_000,
            async_concurrency: None,
            audit: AuditClientConfig::default(),
            batch: BatchRoleConfig::default(),
        }
    }

    /// Loads a worker's configuration `C` (which flattens a `NodeConfig`,
    /// reached through `node`): `defaults` < the TOML `file` < `args`
    /// (flags, else their environment variables). A worker with neither a
    /// repository nor a registry serves `default_repository`. The shared
    /// settings are validated here; the worker's own are the caller's.
    pub fn load<C, A>(
        defaults: &C,
        file: Option<&Path>,
        args: &A,
        node: impl Fn(&mut C) -> &mut NodeConfig,
        default_repository: &str,
    ) -> Result<C, ConfigError>
    where
        C: Serialize + DeserializeOwned,
        A: Serialize,
    {
        let layers = Layers::new(defaults, file, args)?;
        // Extracted on its own first: through `flatten`, a bad shared value
        // would be reported without its key.
        layers.extract::<NodeConfig>()?;
        let mut config: C = layers.extract()?;
        let shared = node(&mut config);
        if shared.model_repository.is_none() && shared.registry.is_none() {
            shared.model_repository = Some(PathBuf::from(default_repository));
        }
        shared.validate()?;
        Ok(config)
    }

    /// Checks every shared value, naming the field at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Consistency only: whether running open is acceptable is the
        // binary's check (`main.rs`, `SecurityConfig::validate`); a
        // library caller decides for itself.
        let consistency = SecurityConfig {
            insecure: true,
            ..self.security.clone()
        };
        consistency
            .validate(Exposure::Internal)
            .map_err(ConfigError::invalid)?;
        if self.max_queue_size == 0 {
            return Err(ConfigError::invalid("max_queue_size must be at least 1"));
        }
        if self.max_batch_size == 0 {
            return Err(ConfigError::invalid("max_batch_size must be at least 1"));
        }
        if self.max_message_bytes < 1024 {
            return Err(ConfigError::invalid(
                "max_message_bytes must be at least 1024",
            ));
        }
        match &self.model_repository {
            Some(repository) if !repository.is_dir() => {
                return Err(ConfigError::invalid(format!(
                    "model_repository {} is not a directory",
                    repository.display()
                )));
            }
            Some(_) => {}
            None if self.registry.is_none() => {
                return Err(ConfigError::invalid(
                    "set model_repository, registry or both",
                ));
            }
            None => {}
        }
        if self.capacity == Some(0) {
            return Err(ConfigError::invalid(
                "capacity must be at least 1 (or unset: instances × max_batch_size)",
            ));
        }
        if self.drain_grace_ms > 600_000 {
            return Err(ConfigError::invalid(
                "drain_grace_ms must be at most 600000 (10 minutes)",
            ));
        }
        if let Some(registry) = &self.registry {
            crate::validate_agent_settings(
                registry,
                self.worker_id.as_deref(),
                self.advertise_address.as_deref(),
                &self.region,
                &self.artifact_cache,
            )
            .map_err(|error| ConfigError::invalid(error.to_string()))?;
        }
        // Checked with or without a registry: the async consumer reads the
        // streams of this region.
        crate::names::check_region(&self.region)
            .map_err(|message| ConfigError::invalid(format!("region {message}")))?;
        if let Some(url) = &self.async_queue
            && !shamal_async_queue::is_redis_url(url)
        {
            return Err(ConfigError::invalid(format!(
                "async_queue '{}' must be a redis:// URL",
                Redacted(url)
            )));
        }
        shamal_async_queue::check_shared_settings(&self.async_key_prefix, self.async_result_ttl_ms)
            .map_err(|error| ConfigError::invalid(error.to_string()))?;
        if self.async_concurrency == Some(0) {
            return Err(ConfigError::invalid(
                "async_concurrency must be at least 1 (or unset: capacity)",
            ));
        }
        self.audit.validate().map_err(|error| {
            ConfigError::invalid(format!("audit.{}: {}", error.field, error.reason))
        })?;
        self.batch.validate()?;
        Ok(())
    }

    /// The framework configuration of a worker named `server_name` whose
    /// models default to `instances` instances; `device` (`cpu`,
    /// `cuda:0`) is reported to the registry. Nothing runs inline and no
    /// CPU is kept awake: a worker whose runtime allows those sets
    /// `defaults.inline_max` and `idle_poll` itself.
    pub fn worker_config(&self, server_name: &str, device: &str, instances: usize) -> WorkerConfig {
        WorkerConfig {
            security: self.security.clone(),
            server_name: server_name.to_owned(),
            model_repository: self.model_repository.clone(),
            registry: self.registry.as_ref().map(|address| RegistryAgentSettings {
                address: address.clone(),
                worker_id: self.worker_id.clone().unwrap_or_default(),
                advertise_address: self.advertise_address.clone(),
                region: self.region.clone(),
                device: device.to_owned(),
                artifact_cache: self.artifact_cache.clone(),
                capacity: self.capacity.unwrap_or(0),
                drain_grace: Duration::from_millis(self.drain_grace_ms),
                tls: None,
            }),
            defaults: ModelDefaults {
                max_batch_size: self.max_batch_size,
                max_queue_delay: Duration::from_micros(self.max_queue_delay_us),
                instances,
                max_queue_size: self.max_queue_size,
                inline_max: Duration::ZERO,
            },
            max_message_bytes: self.max_message_bytes,
            idle_poll: Duration::ZERO,
            audit: self.audit.clone(),
        }
    }

    /// The async inference settings, when `async_queue` is set: the
    /// streams of `region`, connected to Redis by the worker.
    pub fn async_inference(&self) -> Option<AsyncInference> {
        let url = self.async_queue.as_ref()?;
        let options = RedisOptions::new(url.clone()).with_key_prefix(self.async_key_prefix.clone());
        let config = QueueConfig {
            result_ttl: Duration::from_millis(self.async_result_ttl_ms),
            ..QueueConfig::default()
        };
        let mut settings = AsyncInference::new(QueueSource::Redis { options, config });
        settings.region = Some(self.region.clone());
        settings.concurrency = self
            .async_concurrency
            .or(self.capacity.map(|capacity| capacity as usize))
            .unwrap_or(0);
        Some(settings)
    }

    /// `worker`, consuming the async queue when `async_queue` is set.
    pub fn with_async_inference(&self, worker: Worker) -> Worker {
        match self.async_inference() {
            Some(settings) => worker.with_async_inference(settings),
            None => worker,
        }
    }

    /// The batch role's settings, when `batch.queue` is set: Redis,
    /// connected by the worker, or for `memory` the embedding program's
    /// `shared` queue (an error without one). `instance_parameters` go to
    /// the batch instances (the cpu-worker's thread count).
    pub fn batch_role(
        &self,
        shared: Option<Arc<dyn JobQueue>>,
        instance_parameters: HashMap<String, String>,
    ) -> Result<Option<BatchRole>, ConfigError> {
        let Some(url) = &self.batch.queue else {
            return Ok(None);
        };
        let queue = if url == MEMORY_QUEUE {
            match shared {
                Some(queue) => QueueSource::Shared(queue),
                None => {
                    return Err(ConfigError::invalid(
                        "batch.queue 'memory' names the in-process queue of an embedding \
                         program (shamal up); a worker of its own needs a redis:// URL",
                    ));
                }
            }
        } else {
            QueueSource::Redis {
                options: RedisOptions::new(url.clone())
                    .with_key_prefix(self.batch.key_prefix.clone()),
                config: QueueConfig {
                    result_ttl: Duration::from_secs(self.batch.result_ttl_s),
                    min_idle: Duration::from_millis(self.batch.reclaim_idle_ms),
                    ..QueueConfig::default()
                },
            }
        };
        let mut settings = BatchRole::new(queue);
        settings.region = Some(self.region.clone());
        settings.concurrency = self.batch.concurrency;
        settings.instance_parameters = instance_parameters;
        settings.idle_unload = Duration::from_millis(self.batch.idle_unload_ms);
        settings.s3 = self.batch.s3_options();
        settings.keys = match &self.batch.key_file {
            Some(path) => Some(Arc::new(
                shamal_batch_io::KeyRing::from_file(path)
                    .map_err(|error| ConfigError::invalid(format!("batch.key_file: {error}")))?,
            )),
            None => None,
        };
        Ok(Some(settings))
    }

    /// `worker`, with the batch role when `batch.queue` is set (see
    /// [`NodeConfig::batch_role`]).
    pub fn with_batch_role(
        &self,
        worker: Worker,
        shared: Option<Arc<dyn JobQueue>>,
        instance_parameters: HashMap<String, String>,
    ) -> Result<Worker, ConfigError> {
        Ok(match self.batch_role(shared, instance_parameters)? {
            Some(settings) => worker.with_batch_role(settings),
            None => worker,
        })
    }

    /// Binds the gRPC and (when set) metrics listeners.
    pub async fn bind(&self) -> std::io::Result<WorkerListeners> {
        let grpc = tokio::net::TcpListener::bind(self.grpc_listen).await?;
        let metrics = match self.metrics_listen {
            Some(address) => Some(tokio::net::TcpListener::bind(address).await?),
            None => None,
        };
        Ok(WorkerListeners { grpc, metrics })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A worker configuration as a service declares one.
    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields, default)]
    struct ExampleConfig {
        #[serde(flatten)]
        node: NodeConfig,
        threads: usize,
    }

    impl Default for ExampleConfig {
        fn default() -> Self {
            ExampleConfig {
                node: NodeConfig::with_ports(9101, 9102),
                threads: 1,
            }
        }
    }

    #[derive(Debug, Default, Serialize)]
    struct ExampleArgs {
        #[serde(flatten)]
        node: NodeArgs,
        #[serde(skip_serializing_if = "Option::is_none")]
        threads: Option<usize>,
    }

    fn load(file: Option<&Path>, args: &ExampleArgs) -> Result<ExampleConfig, ConfigError> {
        NodeConfig::load(
            &ExampleConfig::default(),
            file,
            args,
            |config: &mut ExampleConfig| &mut config.node,
            "no/such/repository",
        )
    }

    #[test]
    fn the_batch_table_layers_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("worker.toml");
        let repository = format!(
            "model_repository = {:?}\nregion = \"eu-west\"\n",
            dir.path()
        );
        std::fs::write(&file, &repository).unwrap();
        let config = load(Some(&file), &ExampleArgs::default()).unwrap();
        assert_eq!(config.node.batch.queue, None);
        assert!(
            config
                .node
                .batch_role(None, HashMap::new())
                .unwrap()
                .is_none(),
            "off by default"
        );
        assert_eq!(config.node.batch.key_prefix, "shamal:batch");
        assert_eq!(config.node.batch.concurrency, 1);
        assert_eq!(config.node.batch.threads, 1);

        std::fs::write(
            &file,
            format!(
                "{repository}[batch]\nqueue = \"redis://redis:6379/2\"\nconcurrency = 3\n\
                 threads = 2\nreclaim_idle_ms = 5000\nidle_unload_ms = 2000\n"
            ),
        )
        .unwrap();
        let args = ExampleArgs {
            node: NodeArgs {
                batch: BatchArgs {
                    batch_key_prefix: Some("team-b".to_owned()),
                    batch_concurrency: Some(2),
                    ..BatchArgs::default()
                },
                ..NodeArgs::default()
            },
            ..ExampleArgs::default()
        };
        let config = load(Some(&file), &args).unwrap();
        assert_eq!(config.node.batch.threads, 2, "from the file");
        assert_eq!(config.node.batch.concurrency, 2, "flag beats file");
        let parameters = HashMap::from([("k".to_owned(), "v".to_owned())]);
        let role = config
            .node
            .batch_role(None, parameters.clone())
            .unwrap()
            .unwrap();
        assert_eq!(role.concurrency, 2);
        assert_eq!(role.region.as_deref(), Some("eu-west"));
        assert_eq!(role.idle_unload, Duration::from_secs(2));
        assert_eq!(role.instance_parameters, parameters);
        let QueueSource::Redis {
            options,
            config: queue,
        } = &role.queue
        else {
            panic!("a Redis queue: {role:?}");
        };
        assert_eq!(options.url, "redis://redis:6379/2");
        assert_eq!(options.key_prefix, "team-b");
        assert_eq!(queue.min_idle, Duration::from_secs(5));

        // `memory` needs the embedding program's queue.
        let args = ExampleArgs {
            node: NodeArgs {
                batch: BatchArgs {
                    batch_queue: Some("memory".to_owned()),
                    ..BatchArgs::default()
                },
                ..NodeArgs::default()
            },
            ..ExampleArgs::default()
        };
        let config = load(Some(&file), &args).unwrap();
        let error = config
            .node
            .batch_role(None, HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(error.contains("batch.queue"), "{error}");
        let shared: Arc<dyn JobQueue> =
            Arc::new(shamal_async_queue::MemoryQueue::new(QueueConfig::default()).unwrap());
        let role = config
            .node
            .batch_role(Some(shared), HashMap::new())
            .unwrap()
            .unwrap();
        assert!(matches!(role.queue, QueueSource::Shared(_)));

        for (table, named) in [
            ("queue = \"http://x\"", "batch.queue"),
            ("concurrency = 0", "batch.concurrency"),
            ("threads = 0", "batch.threads"),
            ("key_prefix = \"a b\"", "batch.key_prefix"),
            ("reclaim_idle_ms = 10", "batch.reclaim_idle_ms"),
            ("idle_unload_ms = 10", "batch.idle_unload_ms"),
            ("concurency = 2", "concurency"),
        ] {
            std::fs::write(&file, format!("{repository}[batch]\n{table}\n")).unwrap();
            let error = load(Some(&file), &ExampleArgs::default())
                .unwrap_err()
                .to_string();
            assert!(error.contains(named), "{table}: {error}");
        }
    }

    #[test]
    fn shared_settings_layer_flatten_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("worker.toml");
        std::fs::write(
            &file,
            format!(
                "model_repository = {:?}\nregion = \"eu-west\"\ncapacity = 6\nthreads = 3\n\
                 max_batch_size = 4\nasync_queue = \"redis://:pw@redis:6379/1\"\n",
                dir.path()
            ),
        )
        .unwrap();
        let args = ExampleArgs {
            node: NodeArgs {
                max_batch_size: Some(8),
                ..NodeArgs::default()
            },
            ..ExampleArgs::default()
        };
        let config = load(Some(&file), &args).unwrap();
        assert_eq!(config.node.region, "eu-west", "from the file");
        assert_eq!(config.node.max_batch_size, 8, "flag beats file");
        assert_eq!(config.threads, 3, "the worker's own, from the file");
        assert_eq!(config.node.grpc_listen.port(), 9101, "the worker's default");
        let settings = config.node.async_inference().unwrap();
        assert_eq!(settings.concurrency, 6, "capacity by default");
        assert_eq!(settings.region.as_deref(), Some("eu-west"));

        // Unknown keys are refused, naming the key; so are bad shared
        // values, naming theirs.
        for (text, named) in [
            ("regoin = \"x\"\n", "regoin"),
            ("capacity = -1\n", "capacity"),
            ("grpc_listen = \"nowhere\"\n", "grpc_listen"),
            ("threads = \"x\"\n", "threads"),
        ] {
            std::fs::write(&file, text).unwrap();
            let error = load(Some(&file), &ExampleArgs::default())
                .unwrap_err()
                .to_string();
            assert!(error.contains(named), "{text}: {error}");
        }

        // Neither repository nor registry: the worker's default one.
        let error = load(None, &ExampleArgs::default()).unwrap_err().to_string();
        assert!(error.contains("no/such/repository"), "{error}");

        // The queue's password does not show in errors.
        let args = ExampleArgs {
            node: NodeArgs {
                model_repository: Some(dir.path().to_owned()),
                async_queue: Some("http://:hunter2@redis".to_owned()),
                ..NodeArgs::default()
            },
            ..ExampleArgs::default()
        };
        let error = load(None, &args).unwrap_err().to_string();
        assert!(error.contains("async_queue"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }
}
