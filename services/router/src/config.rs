//! Router configuration: defaults < TOML file < SHAMAL_ROUTER_* env < flags
//! (layered by `shamal_telemetry::config`), validated before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shamal_audit_client::AuditClientConfig;
use shamal_auth::security::{Exposure, SecurityArgs, SecurityConfig};
use shamal_registry_client::names;
use shamal_telemetry::config::{self, ConfigError, Redacted};
use shamal_telemetry::process::Service;

/// Effective configuration of a router.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// TLS, mTLS and OIDC: the `[security]` table (`tls_cert`,
    /// `oidc_issuer`, ..., `insecure`).
    pub security: SecurityConfig,
    /// The audit trail: the `[audit]` table (`endpoint`, `spool_dir`,
    /// `max_spool_bytes`, `on_full`, ...); off without an `endpoint`.
    pub audit: AuditClientConfig,
    /// KServe v2 gRPC front door (Triton's default port is 8001).
    pub grpc_listen: SocketAddr,
    /// KServe v2 HTTP/JSON front door (Triton's 8000).
    pub http_listen: SocketAddr,
    /// Prometheus `/metrics` and probes (Triton's 8002); `None` (only when embedding the
    /// service as a library) disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// Worker gRPC addresses (`host:port` or URLs).
    pub workers: Vec<String>,
    /// HTTP/2 connections per worker.
    pub connections_per_worker: usize,
    /// Message size limit for gRPC (both directions) and HTTP bodies.
    pub max_message_bytes: usize,
    /// Deadline for requests that carry none, in milliseconds.
    pub default_timeout_ms: u64,
    /// How often workers are asked what they serve, in milliseconds.
    pub refresh_interval_ms: u64,
    /// Requests in flight beyond which new ones are refused at once.
    pub max_inflight: usize,
    /// gRPC address of the model registry (`host:port` or a URL). When set,
    /// the router follows its rollouts (canary weights, sticky A-B, shadow
    /// copies, aliases) and reports per-version traffic to it; when absent,
    /// requests go to whatever version they name (or the workers' latest).
    pub registry: Option<String>,
    /// This router's name in registry logs and traffic reports.
    pub router_id: String,
    /// How often per-version traffic is reported to the registry, in
    /// milliseconds.
    pub traffic_report_interval_ms: u64,
    /// Shadow copies in flight beyond which further copies are skipped
    /// (and counted); 0 disables shadow traffic.
    pub max_shadow_inflight: usize,
    /// Region of the workers listed in `workers` (data residency), unless
    /// the registry knows them and says otherwise.
    pub static_worker_region: String,
    /// Percent of `max_inflight` kept for high-priority requests
    /// (`priority` parameter 1).
    pub priority_reserve_percent: u8,
    /// Percent of `max_inflight` that low-priority requests (`priority` 3
    /// or more) may use.
    pub low_priority_percent: u8,
    /// Retries allowed per request, as a share of requests (0.2: retries
    /// add at most 20% load).
    pub retry_budget_ratio: f64,
    /// Retries allowed per second even with little traffic.
    pub retry_budget_min_per_second: u32,
    /// Outlier detection: how often worker latencies are compared, in ms.
    pub outlier_interval_ms: u64,
    /// Failed calls in a row that eject a worker.
    pub outlier_consecutive_failures: u32,
    /// A worker this many times slower than the fastest other one serving
    /// the same model is ejected.
    pub outlier_slow_factor: f64,
    /// First ejection length in ms (multiplied by recent ejections).
    pub outlier_base_ejection_ms: u64,
    /// Time over which a returning worker's weight ramps back to full, ms.
    pub outlier_slow_start_ms: u64,
    /// Most workers ejected at once, percent of the pool.
    pub outlier_max_ejection_percent: u8,
    /// Concurrency one replica should carry: the target of the
    /// `shamal_router_desired_replicas` autoscaling signal.
    pub autoscale_target_inflight: u32,
    /// Queue of asynchronous inference jobs: a `redis://` URL, or `memory`
    /// (only when the router is embedded with its workers in one process,
    /// which then hands it the shared queue). Unset: the async endpoints
    /// answer UNIMPLEMENTED / 501.
    pub async_queue: Option<String>,
    /// Prefix of the queue's Redis keys; routers and workers of one
    /// deployment must agree on it.
    pub async_key_prefix: String,
    /// How long results (and records of finished jobs) are kept, in ms.
    pub async_result_ttl_ms: u64,
    /// Deadline of a job from its submission, in ms: a job no worker has
    /// taken by then is answered DEADLINE_EXCEEDED without running.
    pub async_job_timeout_ms: u64,
    /// Region of the stream a job goes to when no data-residency policy
    /// applies: `auto` (the region whose healthy workers serving the model
    /// have the most capacity) or a region name.
    pub async_region: String,
    /// Jobs waiting or running per stream (model, region) beyond which
    /// submissions are refused with RESOURCE_EXHAUSTED / 429.
    pub max_async_backlog: u64,
    /// Longest long-poll (`wait_ms`) of a result fetch, in ms; longer
    /// waits are shortened to it.
    pub async_max_wait_ms: u64,
    /// Keep the host's CPUs awake (spinning at the lowest priority) while
    /// inference requests are in flight and for this many microseconds
    /// after the last one; 0 (the default) lets them sleep. Costs CPU
    /// time; see operations.md, "Idle polling".
    pub idle_poll_us: u64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            security: SecurityConfig::default(),
            audit: AuditClientConfig::default(),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 8001)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8002))),
            workers: Vec::new(),
            connections_per_worker: 2,
            max_message_bytes: shamal_rpc::DEFAULT_MAX_MESSAGE_BYTES,
            default_timeout_ms: 30_000,
            refresh_interval_ms: 1_000,
            max_inflight: 4_096,
            registry: None,
            router_id: default_router_id(),
            traffic_report_interval_ms: 1_000,
            max_shadow_inflight: 256,
            static_worker_region: "local".to_owned(),
            priority_reserve_percent: 10,
            low_priority_percent: 70,
            retry_budget_ratio: 0.2,
            retry_budget_min_per_second: 10,
            outlier_interval_ms: 500,
            outlier_consecutive_failures: 5,
            outlier_slow_factor: 3.0,
            outlier_base_ejection_ms: 2_000,
            outlier_slow_start_ms: 3_000,
            outlier_max_ejection_percent: 50,
            autoscale_target_inflight: 8,
            async_queue: None,
            async_key_prefix: "shamal:async".to_owned(),
            async_result_ttl_ms: 3_600_000,
            async_job_timeout_ms: 3_600_000,
            async_region: AUTO_REGION.to_owned(),
            max_async_backlog: 10_000,
            async_max_wait_ms: 60_000,
            idle_poll_us: 0,
        }
    }
}

/// `async_region` value: choose the region by capacity.
pub const AUTO_REGION: &str = "auto";

/// `async_queue` value for a queue handed over by the embedding program.
pub const MEMORY_QUEUE: &str = "memory";

/// The host name when the system tells it (`HOSTNAME`, then the kernel's),
/// `router` otherwise.
fn default_router_id() -> String {
    let from_env = std::env::var("HOSTNAME").ok();
    let from_kernel = || {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|name| name.trim().to_owned())
    };
    from_env
        .filter(|name| valid_router_id(name))
        .or_else(|| from_kernel().filter(|name| valid_router_id(name)))
        .unwrap_or_else(|| "router".to_owned())
}

fn valid_router_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|byte| byte.is_ascii_graphic() && byte != b'"' && byte != b'\\')
}

/// Command-line flags, each also read from `SHAMAL_ROUTER_<FIELD>` (see
/// [`SERVICE`]; `--router-id` from `SHAMAL_ROUTER_ID`). Serialized, only the
/// values given appear: the top layer of the configuration.
#[derive(Clone, Debug, Default, clap::Args, Serialize)]
pub struct RouterArgs {
    /// TOML configuration file.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The `[security]` table's flags (`--tls-cert`, `--insecure`, ...).
    #[command(flatten)]
    pub security: SecurityArgs,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_listen: Option<SocketAddr>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<SocketAddr>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Worker address; repeat the flag (or separate by commas) for several.
    #[arg(long = "worker", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections_per_worker: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_timeout_ms: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_interval_ms: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_inflight: Option<usize>,
    /// Registry gRPC address; the router then follows its rollouts.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    /// Name of this router in traffic reports (default: the host name).
    #[arg(long, env = "SHAMAL_ROUTER_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_id: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_report_interval_ms: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_shadow_inflight: Option<usize>,
    /// Region of the workers given with --worker.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub static_worker_region: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority_reserve_percent: Option<u8>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub low_priority_percent: Option<u8>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_budget_ratio: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_slow_factor: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autoscale_target_inflight: Option<u32>,
    /// Queue of async inference jobs (`redis://host:port[/db]`).
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
    pub async_job_timeout_ms: Option<u64>,
    /// Region of async jobs without a residency policy (`auto` or a name).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_region: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_async_backlog: Option<u64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_max_wait_ms: Option<u64>,
    /// Keep the CPUs awake for this many microseconds after the last
    /// request (0: off, the default; costs CPU time).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_poll_us: Option<u64>,
}

/// The router binary: its name and the prefix of its variables.
pub const SERVICE: Service = Service {
    name: "shamal-router",
    about: "Shamal router (KServe v2 gRPC and HTTP front door)",
    env_prefix: "SHAMAL_ROUTER_",
    version: env!("CARGO_PKG_VERSION"),
};

impl RouterConfig {
    /// Builds the effective configuration: defaults < TOML file <
    /// environment < flags, then validates it as a standalone router's.
    pub fn load(args: &RouterArgs) -> Result<RouterConfig, ConfigError> {
        let config: RouterConfig = config::load(args.config.as_deref(), args)?;
        // A standalone router has no in-process workers to share a memory
        // queue with: nobody would ever run its jobs.
        if config.async_queue.as_deref() == Some(MEMORY_QUEUE) {
            return Err(ConfigError::invalid(
                "async_queue = \"memory\" only works when the router is embedded with its workers (shamal up); set a redis:// URL",
            ));
        }
        // A standalone router needs workers: listed, or learnt from the
        // registry. `shamal up` adds in-process ones through the library.
        if config.workers.is_empty() && config.registry.is_none() {
            return Err(ConfigError::invalid(
                "workers must list at least one worker address (or set registry to learn them from it)",
            ));
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every value, naming the field at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Consistency only: whether running open is acceptable is the
        // binary's check (`main.rs`, `SecurityConfig::validate`); a
        // library caller (`shamal up`, tests) decides for itself.
        let consistency = SecurityConfig {
            insecure: true,
            ..self.security.clone()
        };
        consistency
            .validate(Exposure::Public)
            .map_err(ConfigError::invalid)?;
        self.audit
            .validate()
            .map_err(|error| ConfigError::invalid(error.to_string()))?;
        if self.workers.iter().any(|worker| worker.trim().is_empty()) {
            return Err(ConfigError::invalid(
                "workers must not contain empty addresses",
            ));
        }
        if self.connections_per_worker == 0 {
            return Err(ConfigError::invalid(
                "connections_per_worker must be at least 1",
            ));
        }
        if self.max_message_bytes < 1024 {
            return Err(ConfigError::invalid(
                "max_message_bytes must be at least 1024",
            ));
        }
        if self.default_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "default_timeout_ms must be at least 1",
            ));
        }
        if self.refresh_interval_ms < 10 {
            return Err(ConfigError::invalid(
                "refresh_interval_ms must be at least 10",
            ));
        }
        if self.max_inflight == 0 {
            return Err(ConfigError::invalid("max_inflight must be at least 1"));
        }
        if let Some(registry) = &self.registry {
            if registry.trim().is_empty() {
                return Err(ConfigError::invalid(
                    "registry must not be empty (leave it out to run without one)",
                ));
            }
            let url = if registry.starts_with("http://") || registry.starts_with("https://") {
                registry.clone()
            } else {
                format!("http://{registry}")
            };
            tonic::transport::Endpoint::from_shared(url).map_err(|error| {
                ConfigError::invalid(format!("registry: invalid address '{registry}': {error}"))
            })?;
        }
        if !valid_router_id(&self.router_id) {
            return Err(ConfigError::invalid(
                "router_id must be 1 to 128 printable characters without spaces, quotes or backslashes",
            ));
        }
        if self.traffic_report_interval_ms < 10 {
            return Err(ConfigError::invalid(
                "traffic_report_interval_ms must be at least 10",
            ));
        }
        names::check_region(&self.static_worker_region)
            .map_err(|message| ConfigError::invalid(format!("static_worker_region {message}")))?;
        if self.priority_reserve_percent > 90 {
            return Err(ConfigError::invalid(
                "priority_reserve_percent must be at most 90",
            ));
        }
        if !(1..=100).contains(&self.low_priority_percent) {
            return Err(ConfigError::invalid(
                "low_priority_percent must be between 1 and 100",
            ));
        }
        if !(0.0..=1.0).contains(&self.retry_budget_ratio) {
            return Err(ConfigError::invalid(
                "retry_budget_ratio must be between 0 and 1",
            ));
        }
        if self.outlier_interval_ms < 10 {
            return Err(ConfigError::invalid(
                "outlier_interval_ms must be at least 10",
            ));
        }
        if self.outlier_consecutive_failures == 0 {
            return Err(ConfigError::invalid(
                "outlier_consecutive_failures must be at least 1",
            ));
        }
        if !(self.outlier_slow_factor > 1.0 && self.outlier_slow_factor.is_finite()) {
            return Err(ConfigError::invalid(
                "outlier_slow_factor must be a number above 1",
            ));
        }
        if self.outlier_base_ejection_ms == 0 {
            return Err(ConfigError::invalid(
                "outlier_base_ejection_ms must be at least 1",
            ));
        }
        if self.outlier_max_ejection_percent > 100 {
            return Err(ConfigError::invalid(
                "outlier_max_ejection_percent must be at most 100",
            ));
        }
        if self.autoscale_target_inflight == 0 {
            return Err(ConfigError::invalid(
                "autoscale_target_inflight must be at least 1",
            ));
        }
        if let Some(queue) = &self.async_queue
            && queue != MEMORY_QUEUE
            && !shamal_async_queue::is_redis_url(queue)
        {
            return Err(ConfigError::invalid(format!(
                "async_queue '{}' must be a redis:// URL (or \"memory\" when embedded)",
                Redacted(queue)
            )));
        }
        shamal_async_queue::check_shared_settings(&self.async_key_prefix, self.async_result_ttl_ms)
            .map_err(|error| ConfigError::invalid(error.to_string()))?;
        if self.async_job_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "async_job_timeout_ms must be at least 1",
            ));
        }
        if self.async_region != AUTO_REGION {
            names::check_region(&self.async_region).map_err(|message| {
                ConfigError::invalid(format!(
                    "async_region must be \"auto\" or a region name: {message}"
                ))
            })?;
        }
        if self.max_async_backlog == 0 {
            return Err(ConfigError::invalid("max_async_backlog must be at least 1"));
        }
        if self.async_max_wait_ms > 600_000 {
            return Err(ConfigError::invalid(
                "async_max_wait_ms must be at most 600000 (10 minutes)",
            ));
        }
        Ok(())
    }

    /// Overload and retry limits.
    pub fn limits(&self) -> crate::routing::Limits {
        crate::routing::Limits {
            max_inflight: self.max_inflight,
            priority_reserve_percent: self.priority_reserve_percent,
            low_priority_percent: self.low_priority_percent,
            retry_budget_ratio: self.retry_budget_ratio,
            retry_budget_min_per_second: self.retry_budget_min_per_second,
            default_timeout: self.default_timeout(),
        }
    }

    /// Worker pool settings.
    pub fn pool_settings(&self) -> crate::pool::PoolSettings {
        crate::pool::PoolSettings {
            tls: None,
            connections: self.connections_per_worker,
            max_message_bytes: self.max_message_bytes,
            static_region: self.static_worker_region.clone(),
            outlier: crate::outlier::OutlierSettings {
                interval: Duration::from_millis(self.outlier_interval_ms),
                consecutive_failures: self.outlier_consecutive_failures,
                slow_factor: self.outlier_slow_factor,
                base_ejection: Duration::from_millis(self.outlier_base_ejection_ms),
                slow_start: Duration::from_millis(self.outlier_slow_start_ms),
                max_ejection_percent: self.outlier_max_ejection_percent,
                ..Default::default()
            },
        }
    }

    pub fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.default_timeout_ms)
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
