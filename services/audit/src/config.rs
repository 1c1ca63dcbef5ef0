//! Audit service configuration: defaults < TOML file < SHAMAL_AUDIT_* env <
//! flags (layered by `shamal_telemetry::config`), validated before anything
//! starts. Unknown keys are refused (exit 64). `--print-config` shows
//! `database_url` with its password redacted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shamal_auth::security::{Exposure, SecurityArgs, SecurityConfig};
use shamal_telemetry::config::{self, ConfigError, redact_urls};
use shamal_telemetry::process::Service;

/// Where the service keeps its files by default (the SQLite database and
/// the signing key), relative to the working directory like the
/// registry's `.shamal/registry.db`.
pub const DEFAULT_DATA_DIR: &str = ".shamal";

/// The most `checkpoint_every` may be.
pub const MAX_CHECKPOINT_EVERY: u64 = 10_000_000;

/// Effective configuration of an audit service.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// TLS, mTLS and OIDC: the `[security]` table (`tls_cert`,
    /// `oidc_issuer`, ..., `insecure`).
    pub security: SecurityConfig,
    /// gRPC API (`shamal.audit.v1.AuditService`).
    pub grpc_listen: SocketAddr,
    /// Prometheus `/metrics` and probes; `None` disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// `postgres://...` in production; `sqlite://path?mode=rwc` for the
    /// embedded mode.
    pub database_url: String,
    /// The Ed25519 key checkpoints, tombstones and export seals are signed
    /// with (PKCS#8 PEM, created mode 0600 when absent).
    pub signing_key_file: PathBuf,
    /// Sign a checkpoint after this many records (at least 1).
    pub checkpoint_every: u64,
    /// ... or after this many seconds, whichever comes first (only when
    /// the head moved; at least 1).
    pub checkpoint_interval_s: u64,
    /// Remove records older than this many days, a whole checkpointed
    /// range at a time, leaving a signed tombstone; 0 keeps them forever.
    pub retention_days: u64,
    /// How often retention looks for a range to remove, in seconds.
    pub retention_interval_s: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            security: SecurityConfig::default(),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 8301)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8302))),
            database_url: format!("sqlite://{DEFAULT_DATA_DIR}/audit.db?mode=rwc"),
            signing_key_file: PathBuf::from(DEFAULT_DATA_DIR).join("audit-signing-key.pem"),
            checkpoint_every: 1000,
            checkpoint_interval_s: 10,
            retention_days: 0,
            retention_interval_s: 3600,
        }
    }
}

/// Command-line flags, each also read from `SHAMAL_AUDIT_<FIELD>` (see
/// [`SERVICE`]). Serialized, only the values given appear: the top layer
/// of the configuration.
#[derive(Clone, Debug, Default, clap::Args, Serialize)]
pub struct AuditArgs {
    /// TOML configuration file.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The `[security]` table's flags (`--tls-cert`, `--insecure`, ...).
    #[command(flatten)]
    pub security: SecurityArgs,
    /// gRPC address (default 127.0.0.1:8301).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_listen: Option<SocketAddr>,
    /// Metrics and probes address (default 127.0.0.1:8302).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Database URL (postgres://... or sqlite://...).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Ed25519 signing key (PKCS#8 PEM; created when absent).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_key_file: Option<PathBuf>,
    /// Sign a checkpoint every this many records (default 1000).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<u64>,
    /// ... or every this many seconds when the head moved (default 10).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_interval_s: Option<u64>,
    /// Days records are kept (default 0: forever).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u64>,
    /// Seconds between retention passes (default 3600).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_interval_s: Option<u64>,
}

/// The audit binary: its name and the prefix of its variables.
pub const SERVICE: Service = Service {
    name: "shamal-audit",
    about: "Shamal audit log (append-only, hash-chained, signed checkpoints)",
    env_prefix: "SHAMAL_AUDIT_",
    version: env!("CARGO_PKG_VERSION"),
};

/// The security exposure of the audit service: an internal API. Producers
/// are services with certificates (mTLS is required unless insecure);
/// reading needs `audit:read`, which only admins' tokens carry, so reads
/// also need OIDC (without it every read is refused).
pub const EXPOSURE: Exposure = Exposure::Internal;

impl AuditConfig {
    /// Builds the effective configuration: defaults < TOML file <
    /// environment < flags, then validates it.
    pub fn load(args: &AuditArgs) -> Result<AuditConfig, ConfigError> {
        let config: AuditConfig = config::load(args.config.as_deref(), args)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value, naming the field at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Consistency only: whether running open is acceptable is the
        // binary's check (`main.rs`); a library caller decides for itself.
        let consistency = SecurityConfig {
            insecure: true,
            ..self.security.clone()
        };
        consistency
            .validate(EXPOSURE)
            .map_err(ConfigError::invalid)?;
        crate::store::Backend::from_url(&self.database_url)
            .map_err(|error| ConfigError::invalid(redact_urls(&error.to_string())))?;
        if self.signing_key_file.as_os_str().is_empty() {
            return Err(ConfigError::invalid("signing_key_file must not be empty"));
        }
        if !(1..=MAX_CHECKPOINT_EVERY).contains(&self.checkpoint_every) {
            return Err(ConfigError::invalid(format!(
                "checkpoint_every must be between 1 and {MAX_CHECKPOINT_EVERY}"
            )));
        }
        if !(1..=86_400).contains(&self.checkpoint_interval_s) {
            return Err(ConfigError::invalid(
                "checkpoint_interval_s must be between 1 and 86400",
            ));
        }
        // 1000 years: beyond it the cutoff arithmetic means nothing.
        if self.retention_days > 365_000 {
            return Err(ConfigError::invalid(
                "retention_days must be at most 365000 (0 keeps records forever)",
            ));
        }
        if !(1..=86_400).contains(&self.retention_interval_s) {
            return Err(ConfigError::invalid(
                "retention_interval_s must be between 1 and 86400",
            ));
        }
        Ok(())
    }

    /// The checkpoint interval.
    pub fn checkpoint_interval(&self) -> Duration {
        Duration::from_secs(self.checkpoint_interval_s)
    }

    /// How long records are kept; `None` keeps them forever.
    pub fn retention(&self) -> Option<Duration> {
        (self.retention_days > 0).then(|| Duration::from_secs(self.retention_days * 86_400))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(args: &AuditArgs) -> String {
        AuditConfig::load(args)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config =
            AuditConfig::load(&AuditArgs::default()).unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(config.grpc_listen.to_string(), "127.0.0.1:8301");
        assert_eq!(
            config.metrics_listen.map(|address| address.to_string()),
            Some("127.0.0.1:8302".to_owned())
        );
        assert_eq!(config.database_url, "sqlite://.shamal/audit.db?mode=rwc");
        assert_eq!(
            config.signing_key_file,
            PathBuf::from(".shamal/audit-signing-key.pem")
        );
        assert_eq!(config.checkpoint_every, 1000);
        assert_eq!(config.checkpoint_interval_s, 10);
        assert_eq!(config.retention_days, 0);
        assert_eq!(config.retention(), None);
    }

    #[test]
    fn flags_override_defaults_and_bad_values_name_the_field() {
        let args = AuditArgs {
            database_url: Some("postgres://localhost/audit".to_owned()),
            retention_days: Some(30),
            checkpoint_every: Some(5),
            ..AuditArgs::default()
        };
        let config = AuditConfig::load(&args).unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(config.database_url, "postgres://localhost/audit");
        assert_eq!(config.retention(), Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(config.checkpoint_every, 5);
        for (args, field) in [
            (
                AuditArgs {
                    database_url: Some("mysql://x".to_owned()),
                    ..AuditArgs::default()
                },
                "database_url",
            ),
            (
                AuditArgs {
                    checkpoint_every: Some(0),
                    ..AuditArgs::default()
                },
                "checkpoint_every",
            ),
            (
                AuditArgs {
                    checkpoint_interval_s: Some(0),
                    ..AuditArgs::default()
                },
                "checkpoint_interval_s",
            ),
            (
                AuditArgs {
                    retention_days: Some(1_000_000),
                    ..AuditArgs::default()
                },
                "retention_days",
            ),
            (
                AuditArgs {
                    signing_key_file: Some(PathBuf::new()),
                    ..AuditArgs::default()
                },
                "signing_key_file",
            ),
        ] {
            let error = error_of(&args);
            assert!(error.contains(field), "{field}: {error}");
        }
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
        let file = dir.path().join("audit.toml");
        for (text, named) in [
            ("retention = 3\n", "unknown field `retention`"),
            ("[security]\ntls = true\n", "unknown field `tls`"),
            ("checkpoint_every = \"often\"\n", "checkpoint_every"),
        ] {
            std::fs::write(&file, text).unwrap_or_else(|error| panic!("{error}"));
            let args = AuditArgs {
                config: Some(file.clone()),
                ..AuditArgs::default()
            };
            let error = error_of(&args);
            assert!(
                error.contains(named) && error.contains("audit.toml"),
                "{text}: {error}"
            );
        }
        std::fs::write(
            &file,
            "checkpoint_every = 7\nretention_days = 90\n[security]\ninsecure = true\n",
        )
        .unwrap_or_else(|error| panic!("{error}"));
        let args = AuditArgs {
            config: Some(file.clone()),
            ..AuditArgs::default()
        };
        let config = AuditConfig::load(&args).unwrap_or_else(|error| panic!("{error}"));
        assert_eq!((config.checkpoint_every, config.retention_days), (7, 90));
        assert!(config.security.insecure);
    }

    #[test]
    fn printed_configuration_hides_the_database_password() {
        let args = AuditArgs {
            database_url: Some("postgres://shamal:hunter2@db.internal:5432/audit".to_owned()),
            ..AuditArgs::default()
        };
        let config = AuditConfig::load(&args).unwrap_or_else(|error| panic!("{error}"));
        let printed = shamal_telemetry::config::printable(&config).unwrap_or_default();
        assert!(
            printed.contains("database_url = \"postgres://shamal:***@db.internal:5432/audit\""),
            "{printed}"
        );
        assert!(!printed.contains("hunter2"), "{printed}");
        let bad = AuditArgs {
            database_url: Some("mysql://shamal:hunter2@db/audit".to_owned()),
            ..AuditArgs::default()
        };
        let error = error_of(&bad);
        assert!(
            error.contains("database_url") && !error.contains("hunter2"),
            "{error}"
        );
    }

    #[test]
    fn every_setting_has_its_variable() {
        let read = SERVICE.variables_read::<AuditArgs>();
        for name in [
            "SHAMAL_AUDIT_GRPC_LISTEN",
            "SHAMAL_AUDIT_METRICS_LISTEN",
            "SHAMAL_AUDIT_DATABASE_URL",
            "SHAMAL_AUDIT_SIGNING_KEY_FILE",
            "SHAMAL_AUDIT_CHECKPOINT_EVERY",
            "SHAMAL_AUDIT_CHECKPOINT_INTERVAL_S",
            "SHAMAL_AUDIT_RETENTION_DAYS",
            "SHAMAL_AUDIT_RETENTION_INTERVAL_S",
            "SHAMAL_AUDIT_TLS_CERT",
        ] {
            assert!(read.contains(&name.to_owned()), "{name} not read: {read:?}");
        }
    }
}
