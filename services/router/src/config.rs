//! Router configuration: defaults < TOML file < SHAMAL_ROUTER_* env < flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Effective configuration of a router.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
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
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 8001)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8002))),
            workers: Vec::new(),
            connections_per_worker: 2,
            max_message_bytes: shamal_rpc::DEFAULT_MAX_MESSAGE_BYTES,
            default_timeout_ms: 30_000,
            refresh_interval_ms: 1_000,
            max_inflight: 4_096,
        }
    }
}

/// Command-line flags (each also readable from its environment variable).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct RouterArgs {
    /// TOML configuration file.
    #[arg(long, env = "SHAMAL_ROUTER_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "SHAMAL_ROUTER_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    #[arg(long, env = "SHAMAL_ROUTER_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    #[arg(long, env = "SHAMAL_ROUTER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Worker address; repeat the flag (or separate by commas) for several.
    #[arg(long = "worker", env = "SHAMAL_ROUTER_WORKERS", value_delimiter = ',')]
    pub workers: Vec<String>,
    #[arg(long, env = "SHAMAL_ROUTER_CONNECTIONS_PER_WORKER")]
    pub connections_per_worker: Option<usize>,
    #[arg(long, env = "SHAMAL_ROUTER_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    #[arg(long, env = "SHAMAL_ROUTER_DEFAULT_TIMEOUT_MS")]
    pub default_timeout_ms: Option<u64>,
    #[arg(long, env = "SHAMAL_ROUTER_REFRESH_INTERVAL_MS")]
    pub refresh_interval_ms: Option<u64>,
    #[arg(long, env = "SHAMAL_ROUTER_MAX_INFLIGHT")]
    pub max_inflight: Option<usize>,
}

impl RouterConfig {
    pub fn load(args: &RouterArgs) -> Result<RouterConfig, String> {
        let mut config = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
                toml::from_str(&text).map_err(|error| format!("{}: {error}", path.display()))?
            }
            None => RouterConfig::default(),
        };
        if let Some(value) = args.grpc_listen {
            config.grpc_listen = value;
        }
        if let Some(value) = args.http_listen {
            config.http_listen = value;
        }
        if let Some(value) = args.metrics_listen {
            config.metrics_listen = Some(value);
        }
        if !args.workers.is_empty() {
            config.workers = args.workers.clone();
        }
        if let Some(value) = args.connections_per_worker {
            config.connections_per_worker = value;
        }
        if let Some(value) = args.max_message_bytes {
            config.max_message_bytes = value;
        }
        if let Some(value) = args.default_timeout_ms {
            config.default_timeout_ms = value;
        }
        if let Some(value) = args.refresh_interval_ms {
            config.refresh_interval_ms = value;
        }
        if let Some(value) = args.max_inflight {
            config.max_inflight = value;
        }
        // A standalone router needs workers; `shamal up` adds in-process
        // ones through the library instead.
        if config.workers.is_empty() {
            return Err("workers must list at least one worker address".to_owned());
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every value, naming the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.workers.iter().any(|worker| worker.trim().is_empty()) {
            return Err("workers must not contain empty addresses".to_owned());
        }
        if self.connections_per_worker == 0 {
            return Err("connections_per_worker must be at least 1".to_owned());
        }
        if self.max_message_bytes < 1024 {
            return Err("max_message_bytes must be at least 1024".to_owned());
        }
        if self.default_timeout_ms == 0 {
            return Err("default_timeout_ms must be at least 1".to_owned());
        }
        if self.refresh_interval_ms < 10 {
            return Err("refresh_interval_ms must be at least 10".to_owned());
        }
        if self.max_inflight == 0 {
            return Err("max_inflight must be at least 1".to_owned());
        }
        Ok(())
    }

    pub fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.default_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order_and_values_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("router.toml");
        std::fs::write(
            &file,
            "workers = [\"127.0.0.1:9\"]\nmax_inflight = 7\ndefault_timeout_ms = 50\n",
        )
        .unwrap();
        let args = RouterArgs {
            config: Some(file.clone()),
            default_timeout_ms: Some(99),
            ..Default::default()
        };
        let config = RouterConfig::load(&args).unwrap();
        assert_eq!(config.workers, vec!["127.0.0.1:9"]);
        assert_eq!(config.max_inflight, 7);
        assert_eq!(config.default_timeout_ms, 99, "flag beats file");
        assert_eq!(config.refresh_interval_ms, 1_000, "default kept");

        let error = RouterConfig::load(&RouterArgs::default()).unwrap_err();
        assert!(error.contains("workers"), "{error}");

        std::fs::write(&file, "workers = [\"a:1\"]\nmax_inflight = 0\n").unwrap();
        let error = RouterConfig::load(&RouterArgs {
            config: Some(file.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(error.contains("max_inflight"), "{error}");

        std::fs::write(&file, "worker = [\"a:1\"]\n").unwrap();
        let error = RouterConfig::load(&RouterArgs {
            config: Some(file),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            error.contains("worker"),
            "unknown keys are refused: {error}"
        );
    }
}
