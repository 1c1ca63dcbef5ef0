//! Batch coordinator configuration: defaults < TOML file < SHAMAL_BATCH_*
//! env < flags (layered by `shamal_telemetry::config`), validated before
//! anything starts. Unknown keys are refused (exit 64).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shamal_audit_client::AuditClientConfig;
use shamal_auth::security::{Exposure, SecurityArgs, SecurityConfig};
use shamal_telemetry::config::{self, ConfigError, redact_urls};
use shamal_telemetry::process::Service;

use crate::coordinator::Settings;

/// Where the service keeps its SQLite database by default.
pub const DEFAULT_DATA_DIR: &str = ".shamal";

/// Effective configuration of a batch coordinator.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// TLS, mTLS and OIDC: the `[security]` table.
    pub security: SecurityConfig,
    /// gRPC API (`shamal.batch.v1.BatchService`).
    pub grpc_listen: SocketAddr,
    /// REST API and its OpenAPI document.
    pub http_listen: SocketAddr,
    /// Prometheus `/metrics` and probes; `None` disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// `postgres://...` in production; `sqlite://path?mode=rwc` embedded.
    pub database_url: String,
    /// The registry's gRPC address (models, versions, limits).
    pub registry_endpoint: String,
    /// A v2 inference gRPC endpoint (the router) asked for the models'
    /// metadata (inputs and outputs).
    pub inference_endpoint: String,
    /// The batch queue's Redis (`redis://...`). Required by the binary;
    /// only an embedding program shares an in-process queue instead.
    pub queue_url: Option<String>,
    /// Prefix of the batch queue's Redis keys (workers use the same).
    pub queue_key_prefix: String,
    /// How long the queue keeps shard entries and their results, seconds
    /// (longer than a job may wait for a worker).
    pub queue_result_ttl_s: u64,
    /// Rows per shard when a job does not say.
    pub rows_per_shard: u64,
    /// Attempts of a shard before its job fails.
    pub max_shard_attempts: u32,
    /// How often each active job's shards are checked, milliseconds.
    pub poll_interval_ms: u64,
    /// Entries of a stream `(model, regions)` that wait for a worker at
    /// most; the other shards are queued, higher priority first, as workers
    /// take entries.
    pub queue_window: u64,
    /// Rows per model execution, told to the workers.
    pub batch_size: u32,
    /// Seconds without any shard taken after which a queued job's message
    /// says that no worker of its regions takes its shards.
    pub wait_warning_s: u64,
    /// Where the shards of jobs that any region may score go (workers of
    /// this region take them); `local` is the workers' region without a
    /// registry.
    pub default_region: String,
    /// S3-compatible object storage (`s3://` inputs and outputs): the
    /// endpoint of a server other than AWS's (`http://minio:9000`); unset:
    /// `AWS_ENDPOINT_URL`, else AWS. Credentials come from the environment
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, web identity, instance
    /// role), never from this file.
    pub s3_endpoint: Option<String>,
    /// The S3 region (unset: `AWS_REGION`, else `us-east-1`).
    pub s3_region: Option<String>,
    /// Allow an `http://` S3 endpoint (unset: `AWS_ALLOW_HTTP`).
    pub s3_allow_http: Option<bool>,
    /// Policy: encrypt every job's output at rest, whatever the job's
    /// `encrypt` says (the workers need a key ring, `[batch] key_file`).
    pub encrypt_outputs: bool,
    /// The audit trail: the `[audit]` table.
    pub audit: AuditClientConfig,
}

impl Default for BatchConfig {
    fn default() -> Self {
        let settings = Settings::default();
        BatchConfig {
            security: SecurityConfig::default(),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 8401)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8402)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8403))),
            database_url: format!("sqlite://{DEFAULT_DATA_DIR}/batch.db?mode=rwc"),
            registry_endpoint: "127.0.0.1:8201".to_owned(),
            inference_endpoint: "127.0.0.1:8001".to_owned(),
            queue_url: None,
            queue_key_prefix: "shamal:batch".to_owned(),
            queue_result_ttl_s: 7 * 86_400,
            rows_per_shard: settings.default_rows_per_shard,
            max_shard_attempts: settings.max_shard_attempts,
            poll_interval_ms: 500,
            queue_window: settings.queue_window,
            batch_size: settings.batch_size,
            wait_warning_s: 30,
            default_region: "local".to_owned(),
            s3_endpoint: None,
            s3_region: None,
            s3_allow_http: None,
            encrypt_outputs: settings.encrypt_outputs,
            audit: AuditClientConfig::default(),
        }
    }
}

/// Command-line flags, each also read from `SHAMAL_BATCH_<FIELD>`.
#[derive(Clone, Debug, Default, clap::Args, Serialize)]
pub struct BatchArgs {
    /// TOML configuration file.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub security: SecurityArgs,
    /// gRPC address (default 127.0.0.1:8401).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_listen: Option<SocketAddr>,
    /// REST address (default 127.0.0.1:8402).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<SocketAddr>,
    /// Metrics and probes address (default 127.0.0.1:8403).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Database URL (postgres://... or sqlite://...).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Registry gRPC address.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_endpoint: Option<String>,
    /// Inference gRPC address (the router) for model metadata.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inference_endpoint: Option<String>,
    /// Redis URL of the batch queue.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_url: Option<String>,
    /// Prefix of the batch queue's keys (default shamal:batch).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_key_prefix: Option<String>,
    /// Seconds the queue keeps entries and results (default 604800).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_result_ttl_s: Option<u64>,
    /// Rows per shard by default (100000).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_per_shard: Option<u64>,
    /// Attempts of a shard before its job fails (3).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_shard_attempts: Option<u32>,
    /// Milliseconds between checks of a job's shards (500).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_interval_ms: Option<u64>,
    /// Entries of a stream waiting for a worker at most (16).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_window: Option<u64>,
    /// Rows per model execution (1024).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// Seconds before a job nobody takes says so (30).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_warning_s: Option<u64>,
    /// Region of the shards of jobs any region may score (local).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_region: Option<String>,
    /// Endpoint of an S3-compatible server (default: AWS_ENDPOINT_URL, else AWS).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION, else us-east-1).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_region: Option<String>,
    /// Allow an http:// S3 endpoint (default: AWS_ALLOW_HTTP).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_allow_http: Option<bool>,
    /// Encrypt every job's output at rest (a policy over the jobs' `encrypt`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt_outputs: Option<bool>,
    /// The `[audit]` table's flags.
    #[command(flatten)]
    #[serde(skip_serializing_if = "AuditArgs::is_empty")]
    pub audit: AuditArgs,
}

/// Flags of the `[audit]` table; its other keys are set in the file.
#[derive(Clone, Debug, Default, clap::Args, Serialize)]
pub struct AuditArgs {
    /// The audit service's gRPC address: turns the audit trail on.
    #[arg(long)]
    #[serde(rename = "endpoint", skip_serializing_if = "Option::is_none")]
    pub audit_endpoint: Option<String>,
    /// Directory of the audit spool.
    #[arg(long)]
    #[serde(rename = "spool_dir", skip_serializing_if = "Option::is_none")]
    pub audit_spool_dir: Option<PathBuf>,
}

impl AuditArgs {
    fn is_empty(&self) -> bool {
        self.audit_endpoint.is_none() && self.audit_spool_dir.is_none()
    }
}

/// The batch binary: its name and the prefix of its variables.
pub const SERVICE: Service = Service {
    name: "shamal-batch",
    about: "Shamal batch coordinator (sharded, resumable batch inference jobs)",
    env_prefix: "SHAMAL_BATCH_",
    version: env!("CARGO_PKG_VERSION"),
};

/// A public API: people and pipelines submit jobs with their tokens.
pub const EXPOSURE: Exposure = Exposure::Public;

impl BatchConfig {
    pub fn load(args: &BatchArgs) -> Result<BatchConfig, ConfigError> {
        let config: BatchConfig = config::load(args.config.as_deref(), args)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value, naming the field at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let consistency = SecurityConfig {
            insecure: true,
            ..self.security.clone()
        };
        consistency
            .validate(EXPOSURE)
            .map_err(ConfigError::invalid)?;
        shamal_sql::Backend::from_url(&self.database_url).map_err(|_| {
            ConfigError::invalid(redact_urls(&format!(
                "database_url {}",
                shamal_sql::URL_RULE
            )))
        })?;
        if self.registry_endpoint.trim().is_empty() {
            return Err(ConfigError::invalid("registry_endpoint must not be empty"));
        }
        if self.inference_endpoint.trim().is_empty() {
            return Err(ConfigError::invalid("inference_endpoint must not be empty"));
        }
        if let Some(url) = &self.queue_url
            && !shamal_async_queue::is_redis_url(url)
        {
            return Err(ConfigError::invalid(
                "queue_url must be a redis:// or redis+unix:// URL",
            ));
        }
        shamal_async_queue::check_shared_settings(
            &self.queue_key_prefix,
            self.queue_result_ttl_s.saturating_mul(1000),
        )
        .map_err(|_| {
            ConfigError::invalid(
                "queue_key_prefix must be 1 to 128 printable characters and queue_result_ttl_s at least 1",
            )
        })?;
        if self.rows_per_shard == 0 {
            return Err(ConfigError::invalid("rows_per_shard must be at least 1"));
        }
        if !(1..=100).contains(&self.max_shard_attempts) {
            return Err(ConfigError::invalid(
                "max_shard_attempts must be between 1 and 100",
            ));
        }
        if !(10..=60_000).contains(&self.poll_interval_ms) {
            return Err(ConfigError::invalid(
                "poll_interval_ms must be between 10 and 60000",
            ));
        }
        if !(1..=100_000).contains(&self.queue_window) {
            return Err(ConfigError::invalid(
                "queue_window must be between 1 and 100000",
            ));
        }
        if !(1..=1_000_000).contains(&self.batch_size) {
            return Err(ConfigError::invalid(
                "batch_size must be between 1 and 1000000",
            ));
        }
        if self.default_region.trim().is_empty() || self.default_region.len() > 256 {
            return Err(ConfigError::invalid(
                "default_region must be 1 to 256 characters",
            ));
        }
        if let Some(endpoint) = &self.s3_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(ConfigError::invalid(
                "s3_endpoint must be an http:// or https:// URL",
            ));
        }
        if let Some(region) = &self.s3_region
            && (region.trim().is_empty() || region.len() > 64)
        {
            return Err(ConfigError::invalid("s3_region must be 1 to 64 characters"));
        }
        self.audit
            .validate()
            .map_err(|error| ConfigError::invalid(format!("audit: {error}")))?;
        Ok(())
    }

    /// The S3 settings of this file over the environment's, `None` when it
    /// sets none (the environment's, or an embedding program's, apply).
    pub fn s3_options(&self) -> Option<shamal_batch_io::S3Options> {
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

    /// The coordinator's settings.
    pub fn settings(&self) -> Settings {
        Settings {
            default_rows_per_shard: self.rows_per_shard,
            max_shard_attempts: self.max_shard_attempts,
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            batch_size: self.batch_size,
            wait_warning_after: Duration::from_secs(self.wait_warning_s),
            default_region: self.default_region.clone(),
            encrypt_outputs: self.encrypt_outputs,
            queue_window: self.queue_window,
        }
    }

    /// The queue's behaviour (kept results long enough for jobs that wait).
    pub fn queue_config(&self) -> shamal_async_queue::QueueConfig {
        shamal_async_queue::QueueConfig {
            result_ttl: Duration::from_secs(self.queue_result_ttl_s),
            max_attempts: self.max_shard_attempts.max(1),
            ..shamal_async_queue::QueueConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(args: &BatchArgs) -> String {
        BatchConfig::load(args)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config =
            BatchConfig::load(&BatchArgs::default()).unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(config.grpc_listen.to_string(), "127.0.0.1:8401");
        assert_eq!(config.http_listen.to_string(), "127.0.0.1:8402");
        assert_eq!(
            config.metrics_listen.map(|address| address.to_string()),
            Some("127.0.0.1:8403".to_owned())
        );
        assert_eq!(config.queue_key_prefix, "shamal:batch");
        assert_eq!(config.rows_per_shard, 100_000);
        assert_eq!(config.max_shard_attempts, 3);
        assert_eq!(config.database_url, "sqlite://.shamal/batch.db?mode=rwc");
    }

    #[test]
    fn bad_values_name_the_field() {
        for (args, field) in [
            (
                BatchArgs {
                    database_url: Some("mysql://x".to_owned()),
                    ..BatchArgs::default()
                },
                "database_url",
            ),
            (
                BatchArgs {
                    queue_url: Some("http://x".to_owned()),
                    ..BatchArgs::default()
                },
                "queue_url",
            ),
            (
                BatchArgs {
                    max_shard_attempts: Some(0),
                    ..BatchArgs::default()
                },
                "max_shard_attempts",
            ),
            (
                BatchArgs {
                    rows_per_shard: Some(0),
                    ..BatchArgs::default()
                },
                "rows_per_shard",
            ),
            (
                BatchArgs {
                    poll_interval_ms: Some(1),
                    ..BatchArgs::default()
                },
                "poll_interval_ms",
            ),
            (
                BatchArgs {
                    s3_endpoint: Some("minio:9000".to_owned()),
                    ..BatchArgs::default()
                },
                "s3_endpoint",
            ),
        ] {
            let error = error_of(&args);
            assert!(error.contains(field), "{field}: {error}");
        }
    }

    #[test]
    fn every_setting_has_its_variable() {
        let read = SERVICE.variables_read::<BatchArgs>();
        for name in [
            "SHAMAL_BATCH_GRPC_LISTEN",
            "SHAMAL_BATCH_HTTP_LISTEN",
            "SHAMAL_BATCH_DATABASE_URL",
            "SHAMAL_BATCH_QUEUE_URL",
            "SHAMAL_BATCH_INFERENCE_ENDPOINT",
            "SHAMAL_BATCH_REGISTRY_ENDPOINT",
            "SHAMAL_BATCH_MAX_SHARD_ATTEMPTS",
            "SHAMAL_BATCH_S3_ENDPOINT",
            "SHAMAL_BATCH_S3_REGION",
            "SHAMAL_BATCH_S3_ALLOW_HTTP",
            "SHAMAL_BATCH_ENCRYPT_OUTPUTS",
        ] {
            assert!(read.contains(&name.to_owned()), "{name} not read: {read:?}");
        }
    }
}
