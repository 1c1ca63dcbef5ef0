//! Registry configuration: defaults < TOML file < SHAMAL_REGISTRY_* env < flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Effective configuration of a registry.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// REST API, OpenAPI document and web UI for release managers.
    pub http_listen: SocketAddr,
    /// Internal gRPC API for routers and workers.
    pub grpc_listen: SocketAddr,
    /// Prometheus `/metrics` and probes; `None` disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// `postgres://...` in production; `sqlite://path` for the embedded mode.
    pub database_url: String,
    /// Directory of the local artifact store.
    pub artifact_dir: PathBuf,
    /// Largest artifact accepted, in bytes.
    pub max_artifact_bytes: u64,
    /// How often workers must heartbeat (told to them at registration).
    pub heartbeat_interval_ms: u64,
    /// Time without a heartbeat after which a worker is marked `lost`;
    /// more than twice `heartbeat_interval_ms`.
    pub lease_ms: u64,
    /// Make-before-break of `weighted` placement: how long every new holder
    /// of a version must have had it ready before a worker that loses it
    /// lets it go. Must exceed the routers' `refresh_interval_ms`.
    pub placement_grace_ms: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8200)),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 8201)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8202))),
            database_url: "sqlite://.shamal/registry.db".to_owned(),
            artifact_dir: PathBuf::from(".shamal/artifacts"),
            max_artifact_bytes: 8 * 1024 * 1024 * 1024,
            heartbeat_interval_ms: 250,
            lease_ms: 1000,
            placement_grace_ms: 3000,
        }
    }
}

/// Command-line flags (each also readable from its environment variable).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct RegistryArgs {
    /// TOML configuration file.
    #[arg(long, env = "SHAMAL_REGISTRY_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "SHAMAL_REGISTRY_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    #[arg(long, env = "SHAMAL_REGISTRY_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    #[arg(long, env = "SHAMAL_REGISTRY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Database URL (postgres://... or sqlite://...).
    #[arg(long, env = "SHAMAL_REGISTRY_DATABASE_URL")]
    pub database_url: Option<String>,
    #[arg(long, env = "SHAMAL_REGISTRY_ARTIFACT_DIR")]
    pub artifact_dir: Option<PathBuf>,
    #[arg(long, env = "SHAMAL_REGISTRY_MAX_ARTIFACT_BYTES")]
    pub max_artifact_bytes: Option<u64>,
    /// How often workers heartbeat, in milliseconds (default 250).
    #[arg(long, env = "SHAMAL_REGISTRY_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Milliseconds without a heartbeat before a worker is marked lost
    /// (default 1000; more than twice the heartbeat interval).
    #[arg(long, env = "SHAMAL_REGISTRY_LEASE_MS")]
    pub lease_ms: Option<u64>,
    /// Milliseconds a version's new holders must have had it ready before
    /// a worker that loses it lets it go (default 3000; more than the
    /// routers' refresh interval).
    #[arg(long, env = "SHAMAL_REGISTRY_PLACEMENT_GRACE_MS")]
    pub placement_grace_ms: Option<u64>,
}

impl RegistryConfig {
    pub fn load(args: &RegistryArgs) -> Result<RegistryConfig, String> {
        let mut config = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
                toml::from_str(&text).map_err(|error| format!("{}: {error}", path.display()))?
            }
            None => RegistryConfig::default(),
        };
        if let Some(value) = args.http_listen {
            config.http_listen = value;
        }
        if let Some(value) = args.grpc_listen {
            config.grpc_listen = value;
        }
        if let Some(value) = args.metrics_listen {
            config.metrics_listen = Some(value);
        }
        if let Some(value) = &args.database_url {
            config.database_url = value.clone();
        }
        if let Some(value) = &args.artifact_dir {
            config.artifact_dir = value.clone();
        }
        if let Some(value) = args.max_artifact_bytes {
            config.max_artifact_bytes = value;
        }
        if let Some(value) = args.heartbeat_interval_ms {
            config.heartbeat_interval_ms = value;
        }
        if let Some(value) = args.lease_ms {
            config.lease_ms = value;
        }
        if let Some(value) = args.placement_grace_ms {
            config.placement_grace_ms = value;
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every value, naming the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        crate::store::Backend::from_url(&self.database_url).map_err(|error| error.to_string())?;
        if self.artifact_dir.as_os_str().is_empty() {
            return Err("artifact_dir must not be empty".to_owned());
        }
        if self.max_artifact_bytes == 0 {
            return Err("max_artifact_bytes must be at least 1".to_owned());
        }
        if !(10..=60_000).contains(&self.heartbeat_interval_ms) {
            return Err("heartbeat_interval_ms must be between 10 and 60000".to_owned());
        }
        if self.lease_ms <= 2 * self.heartbeat_interval_ms || self.lease_ms > 3_600_000 {
            return Err(format!(
                "lease_ms must be more than twice heartbeat_interval_ms ({} ms) and at most 3600000",
                self.heartbeat_interval_ms
            ));
        }
        if self.placement_grace_ms > 600_000 {
            return Err("placement_grace_ms must be at most 600000".to_owned());
        }
        Ok(())
    }

    /// The placement timings this configuration sets.
    pub fn placement(&self) -> crate::planner::PlacementSettings {
        crate::planner::PlacementSettings {
            grace: std::time::Duration::from_millis(self.placement_grace_ms),
        }
    }

    /// The membership timings this configuration sets.
    pub fn membership(&self) -> crate::registry::MembershipSettings {
        crate::registry::MembershipSettings {
            heartbeat_interval: std::time::Duration::from_millis(self.heartbeat_interval_ms),
            lease: std::time::Duration::from_millis(self.lease_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_defaults_and_bad_values_name_the_field() {
        let args = RegistryArgs {
            database_url: Some("postgres://localhost/test".to_owned()),
            ..RegistryArgs::default()
        };
        let config = RegistryConfig::load(&args).unwrap_or_default();
        assert_eq!(config.database_url, "postgres://localhost/test");
        let bad = RegistryArgs {
            database_url: Some("mysql://x".to_owned()),
            ..RegistryArgs::default()
        };
        let error = RegistryConfig::load(&bad).err().unwrap_or_default();
        assert!(error.contains("database_url"), "{error}");
    }

    #[test]
    fn membership_timings_default_and_are_validated() {
        let config = RegistryConfig::load(&RegistryArgs::default()).unwrap_or_default();
        assert_eq!((config.heartbeat_interval_ms, config.lease_ms), (250, 1000));
        let args = RegistryArgs {
            heartbeat_interval_ms: Some(100),
            lease_ms: Some(500),
            ..RegistryArgs::default()
        };
        let config = RegistryConfig::load(&args).unwrap_or_default();
        assert_eq!(config.membership().lease.as_millis(), 500);
        assert_eq!(config.membership().heartbeat_interval.as_millis(), 100);
        for (interval, lease, field) in [
            (250, 500, "lease_ms"),
            (250, 400, "lease_ms"),
            (5, 1000, "heartbeat_interval_ms"),
        ] {
            let args = RegistryArgs {
                heartbeat_interval_ms: Some(interval),
                lease_ms: Some(lease),
                ..RegistryArgs::default()
            };
            let error = RegistryConfig::load(&args).err().unwrap_or_default();
            assert!(error.contains(field), "{interval}/{lease}: {error}");
        }
        let text = toml::to_string(&RegistryConfig::default()).unwrap_or_default();
        assert!(text.contains("lease_ms = 1000"), "{text}");
    }

    #[test]
    fn placement_grace_defaults_and_is_validated() {
        let config = RegistryConfig::load(&RegistryArgs::default()).unwrap_or_default();
        assert_eq!(config.placement().grace.as_millis(), 3000);
        let args = RegistryArgs {
            placement_grace_ms: Some(250),
            ..RegistryArgs::default()
        };
        let config = RegistryConfig::load(&args).unwrap_or_default();
        assert_eq!(config.placement().grace.as_millis(), 250);
        let args = RegistryArgs {
            placement_grace_ms: Some(600_001),
            ..RegistryArgs::default()
        };
        let error = RegistryConfig::load(&args).err().unwrap_or_default();
        assert!(error.contains("placement_grace_ms"), "{error}");
    }
}
