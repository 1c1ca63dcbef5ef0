//! Registry configuration: defaults < TOML file < SHAMAL_REGISTRY_* env <
//! flags (layered by `shamal_telemetry::config`), validated before anything
//! starts. `--print-config` shows `database_url` with its password redacted.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use shamal_audit_client::AuditClientConfig;
use shamal_auth::security::{Exposure, SecurityArgs, SecurityConfig};
use shamal_telemetry::config::{self, ConfigError, redact_urls};
use shamal_telemetry::process::Service;

/// Effective configuration of a registry.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// TLS, mTLS and OIDC: the `[security]` table (`tls_cert`,
    /// `oidc_issuer`, ..., `insecure`).
    pub security: SecurityConfig,
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
    /// Key file of the artifact store's encryption at rest (TOML or JSON,
    /// mode 0600: `active = "k2"` and `[keys]` of `id = "<base64>"`); see
    /// docs/registry.md. Unset, with `artifact_keys` unset too, new
    /// artifacts are stored in plaintext.
    pub artifact_key_file: Option<PathBuf>,
    /// The same keys as `id:base64` entries, the active one first
    /// (`SHAMAL_REGISTRY_ARTIFACT_KEYS`); printed redacted.
    pub artifact_keys: Option<ArtifactKeys>,
    /// How often workers must heartbeat (told to them at registration).
    pub heartbeat_interval_ms: u64,
    /// Time without a heartbeat after which a worker is marked `lost`;
    /// more than twice `heartbeat_interval_ms`.
    pub lease_ms: u64,
    /// Make-before-break of `weighted` placement: how long every new holder
    /// of a version must have had it ready before a worker that loses it
    /// lets it go. Must exceed the routers' `refresh_interval_ms`.
    pub placement_grace_ms: u64,
    /// The web UI's OIDC client (authorization code + PKCE; OIDC on only).
    pub oidc_web_client_id: String,
    /// Its secret (a confidential client, HTTP basic at the token
    /// endpoint); unset, a public client (PKCE alone). Printed redacted.
    pub oidc_web_client_secret: Option<crate::rest::session::WebClientSecret>,
    /// Scopes the web UI asks for (`openid` always).
    pub oidc_web_scopes: String,
    /// The registry's external origin (`https://registry.example.com`):
    /// the web login's redirect URI is `<public_url>/oidc/callback`.
    /// Default: the HTTP listener's address (loopback for a wildcard).
    pub public_url: Option<String>,
    /// The audit trail: the `[audit]` table (`endpoint`, `spool_dir`,
    /// `max_spool_bytes`, `on_full`, ...). No `endpoint` (the default):
    /// mutations are not reported.
    pub audit: AuditClientConfig,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            security: SecurityConfig::default(),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8200)),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 8201)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8202))),
            database_url: "sqlite://.shamal/registry.db".to_owned(),
            artifact_dir: PathBuf::from(".shamal/artifacts"),
            max_artifact_bytes: 8 * 1024 * 1024 * 1024,
            artifact_key_file: None,
            artifact_keys: None,
            heartbeat_interval_ms: 250,
            lease_ms: 1000,
            placement_grace_ms: 3000,
            oidc_web_client_id: "shamal-web".to_owned(),
            oidc_web_client_secret: None,
            oidc_web_scopes: crate::rest::session::DEFAULT_SCOPES.to_owned(),
            public_url: None,
            audit: AuditClientConfig::default(),
        }
    }
}

/// Artifact keys as `id:base64` entries (the value of `artifact_keys`):
/// never shown, neither by `Debug` nor by `--print-config` (it serializes
/// as `***`), and zeroized on drop.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct ArtifactKeys(pub zeroize::Zeroizing<String>);

impl ArtifactKeys {
    pub fn new(entries: impl Into<String>) -> ArtifactKeys {
        ArtifactKeys(zeroize::Zeroizing::new(entries.into()))
    }
}

impl std::fmt::Debug for ArtifactKeys {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(config::REDACTED)
    }
}

impl Serialize for ArtifactKeys {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(config::REDACTED)
    }
}

/// Command-line flags, each also read from `SHAMAL_REGISTRY_<FIELD>` (see
/// [`SERVICE`]). Serialized, only the values given appear: the top layer
/// of the configuration.
#[derive(Clone, Debug, Default, clap::Args, Serialize)]
pub struct RegistryArgs {
    /// TOML configuration file.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The `[security]` table's flags (`--tls-cert`, `--insecure`, ...).
    #[command(flatten)]
    pub security: SecurityArgs,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<SocketAddr>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_listen: Option<SocketAddr>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Database URL (postgres://... or sqlite://...).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_dir: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_artifact_bytes: Option<u64>,
    /// Key file for encrypting artifacts at rest (TOML or JSON, mode 0600).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_key_file: Option<PathBuf>,
    /// Artifact keys as `id:base64,...`, the active one first. Prefer the
    /// environment variable: a flag's value shows in the process list.
    #[arg(long, hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_keys: Option<String>,
    /// How often workers heartbeat, in milliseconds (default 250).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Milliseconds without a heartbeat before a worker is marked lost
    /// (default 1000; more than twice the heartbeat interval).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// Milliseconds a version's new holders must have had it ready before
    /// a worker that loses it lets it go (default 3000; more than the
    /// routers' refresh interval).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement_grace_ms: Option<u64>,
    /// The web UI's OIDC client id (default shamal-web).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc_web_client_id: Option<String>,
    /// Its client secret. Prefer the environment variable: a flag's value
    /// shows in the process list.
    #[arg(long, hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc_web_client_secret: Option<String>,
    /// Scopes the web UI asks for (default "openid profile offline_access shamal").
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc_web_scopes: Option<String>,
    /// The registry's external origin, for the web login's redirect URI
    /// (default: the HTTP listener's address).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// The `[audit]` table's flags (`--audit-endpoint`,
    /// `--audit-spool-dir`).
    #[command(flatten)]
    #[serde(skip_serializing_if = "AuditArgs::is_empty")]
    pub audit: AuditArgs,
}

/// Flags of the `[audit]` table; its other keys are set in the file.
#[derive(Clone, Debug, Default, clap::Args, Serialize)]
pub struct AuditArgs {
    /// The audit service's gRPC address (`https://audit:8301`): turns the
    /// audit trail on (needs a spool directory).
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

/// The registry binary: its name and the prefix of its variables.
pub const SERVICE: Service = Service {
    name: "shamal-registry",
    about: "Shamal registry (models, versions, artifacts, rollouts)",
    env_prefix: "SHAMAL_REGISTRY_",
    version: env!("CARGO_PKG_VERSION"),
};

impl RegistryConfig {
    /// Builds the effective configuration: defaults < TOML file <
    /// environment < flags, then validates it.
    pub fn load(args: &RegistryArgs) -> Result<RegistryConfig, ConfigError> {
        let config: RegistryConfig = config::load(args.config.as_deref(), args)?;
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
        crate::store::Backend::from_url(&self.database_url)
            .map_err(|error| ConfigError::invalid(redact_urls(&error.to_string())))?;
        if self.artifact_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("artifact_dir must not be empty"));
        }
        self.artifact_key_ring()?;
        if self.max_artifact_bytes == 0 {
            return Err(ConfigError::invalid(
                "max_artifact_bytes must be at least 1",
            ));
        }
        if !(10..=60_000).contains(&self.heartbeat_interval_ms) {
            return Err(ConfigError::invalid(
                "heartbeat_interval_ms must be between 10 and 60000",
            ));
        }
        if self.lease_ms <= 2 * self.heartbeat_interval_ms || self.lease_ms > 3_600_000 {
            return Err(ConfigError::invalid(format!(
                "lease_ms must be more than twice heartbeat_interval_ms ({} ms) and at most 3600000",
                self.heartbeat_interval_ms
            )));
        }
        if let Some(url) = &self.public_url {
            crate::rest::session::public_origin(url).map_err(ConfigError::invalid)?;
        }
        if self.placement_grace_ms > 600_000 {
            return Err(ConfigError::invalid(
                "placement_grace_ms must be at most 600000",
            ));
        }
        self.audit.validate().map_err(|error| {
            ConfigError::invalid(format!("audit.{}: {}", error.field, error.reason))
        })?;
        Ok(())
    }

    /// The key ring of the artifact store's encryption at rest, `None`
    /// when it is off. Reads the key file (errors name it and the key id).
    pub fn artifact_key_ring(&self) -> Result<Option<shamal_keys::KeyRing>, ConfigError> {
        match (&self.artifact_key_file, &self.artifact_keys) {
            (Some(_), Some(_)) => Err(ConfigError::invalid(
                "artifact_key_file and artifact_keys (SHAMAL_REGISTRY_ARTIFACT_KEYS) are both set; set one",
            )),
            (Some(path), None) => shamal_keys::KeyRing::from_file(path)
                .map(Some)
                .map_err(|error| ConfigError::invalid(format!("artifact_key_file: {error}"))),
            (None, Some(keys)) => shamal_keys::KeyRing::from_entries(
                "artifact_keys (SHAMAL_REGISTRY_ARTIFACT_KEYS)",
                &keys.0,
            )
            .map(Some)
            .map_err(|error| ConfigError::invalid(error.to_string())),
            (None, None) => Ok(None),
        }
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
        let error = RegistryConfig::load(&bad)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
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
            let error = RegistryConfig::load(&args)
                .err()
                .map(|error| error.to_string())
                .unwrap_or_default();
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
        let error = RegistryConfig::load(&args)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        assert!(error.contains("placement_grace_ms"), "{error}");
    }

    #[test]
    fn printed_configuration_hides_the_database_password() {
        let args = RegistryArgs {
            database_url: Some("postgres://shamal:hunter2@db.internal:5432/registry".to_owned()),
            ..RegistryArgs::default()
        };
        let config = RegistryConfig::load(&args).unwrap_or_default();
        assert_eq!(
            config.database_url, "postgres://shamal:hunter2@db.internal:5432/registry",
            "the registry itself gets the password"
        );
        let printed = shamal_telemetry::config::printable(&config).unwrap_or_default();
        assert!(
            printed.contains("database_url = \"postgres://shamal:***@db.internal:5432/registry\""),
            "{printed}"
        );
        assert!(!printed.contains("hunter2"), "{printed}");
        // Nor in the message of a URL the registry refuses.
        let bad = RegistryArgs {
            database_url: Some("mysql://shamal:hunter2@db/registry".to_owned()),
            ..RegistryArgs::default()
        };
        let error = RegistryConfig::load(&bad)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        assert!(
            error.contains("database_url") && !error.contains("hunter2"),
            "{error}"
        );
    }

    #[test]
    fn artifact_keys_are_read_redacted_and_checked() {
        let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let args = RegistryArgs {
            artifact_keys: Some(format!("k2:{key}")),
            ..RegistryArgs::default()
        };
        // The layers and this crate's checks (not the security policy of
        // `load`, which is the security settings' to test).
        let load = |args: &RegistryArgs| {
            config::load::<RegistryConfig>(None, args).and_then(|config| {
                config.validate()?;
                Ok(config)
            })
        };
        let config = load(&args).unwrap_or_default();
        let ring = config.artifact_key_ring().ok().flatten();
        assert_eq!(ring.as_ref().map(|ring| ring.active_id()), Some("k2"));
        let printed = shamal_telemetry::config::printable(&config).unwrap_or_default();
        assert!(printed.contains("artifact_keys = \"***\""), "{printed}");
        assert!(!printed.contains(key), "{printed}");
        assert!(!format!("{config:?}").contains(key));
        assert!(
            SERVICE
                .variables_read::<RegistryArgs>()
                .contains(&"SHAMAL_REGISTRY_ARTIFACT_KEYS".to_owned())
        );
        for (args, named) in [
            (
                RegistryArgs {
                    artifact_keys: Some(format!("k1:{}", &key[..20])),
                    ..RegistryArgs::default()
                },
                "key 'k1'",
            ),
            (
                RegistryArgs {
                    artifact_keys: Some(format!("k1:{key}")),
                    artifact_key_file: Some(PathBuf::from("/nonexistent/keys.toml")),
                    ..RegistryArgs::default()
                },
                "both set",
            ),
            (
                RegistryArgs {
                    artifact_key_file: Some(PathBuf::from("/nonexistent/keys.toml")),
                    ..RegistryArgs::default()
                },
                "artifact_key_file: key file /nonexistent/keys.toml",
            ),
        ] {
            let error = load(&args)
                .err()
                .map(|error| error.to_string())
                .unwrap_or_default();
            assert!(error.contains(named) && !error.contains(key), "{error}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_in_the_file_name_the_key() {
        let dir = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
        let file = dir.path().join("registry.toml");
        for (text, named) in [
            ("database = \"sqlite://x\"\n", "unknown field `database`"),
            ("lease_ms = \"long\"\n", "lease_ms"),
        ] {
            std::fs::write(&file, text).unwrap_or_else(|error| panic!("{error}"));
            let args = RegistryArgs {
                config: Some(file.clone()),
                ..RegistryArgs::default()
            };
            let error = RegistryConfig::load(&args)
                .err()
                .map(|error| error.to_string())
                .unwrap_or_default();
            assert!(
                error.contains(named) && error.contains("registry.toml"),
                "{text}: {error}"
            );
        }
    }

    #[test]
    fn the_audit_table_is_read_checked_and_off_by_default() {
        let config = RegistryConfig::load(&RegistryArgs::default()).unwrap_or_default();
        assert!(!config.audit.enabled());
        let dir = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
        let file = dir.path().join("registry.toml");
        std::fs::write(
            &file,
            "[audit]\nendpoint = \"https://audit:8301\"\nspool_dir = \"/var/lib/shamal/registry/audit-spool\"\nmax_spool_bytes = 1048576\non_full = \"fail_open\"\n",
        )
        .unwrap_or_else(|error| panic!("{error}"));
        let args = RegistryArgs {
            config: Some(file.clone()),
            ..RegistryArgs::default()
        };
        let config = RegistryConfig::load(&args).unwrap_or_default();
        assert_eq!(config.audit.endpoint.as_deref(), Some("https://audit:8301"));
        assert_eq!(config.audit.max_spool_bytes, 1_048_576);
        assert_eq!(config.audit.on_full, shamal_audit_client::OnFull::FailOpen);
        // The flag wins over the file.
        let args = RegistryArgs {
            config: Some(file.clone()),
            audit: AuditArgs {
                audit_endpoint: Some("audit.internal:8301".to_owned()),
                audit_spool_dir: None,
            },
            ..RegistryArgs::default()
        };
        let config = RegistryConfig::load(&args).unwrap_or_default();
        assert_eq!(
            config.audit.endpoint.as_deref(),
            Some("audit.internal:8301")
        );
        assert!(
            SERVICE
                .variables_read::<RegistryArgs>()
                .contains(&"SHAMAL_REGISTRY_AUDIT_ENDPOINT".to_owned())
        );
        for (text, named) in [
            ("[audit]\nendpont = \"x:1\"\n", "unknown field `endpont`"),
            ("[audit]\nendpoint = \"audit:8301\"\n", "audit.spool_dir"),
            ("[audit]\non_full = \"drop\"\n", "on_full"),
        ] {
            std::fs::write(&file, text).unwrap_or_else(|error| panic!("{error}"));
            let args = RegistryArgs {
                config: Some(file.clone()),
                ..RegistryArgs::default()
            };
            let error = RegistryConfig::load(&args)
                .err()
                .map(|error| error.to_string())
                .unwrap_or_default();
            assert!(error.contains(named), "{text}: {error}");
        }
    }

    #[test]
    fn every_documented_variable_is_read() {
        let read = SERVICE.variables_read::<RegistryArgs>();
        let documented = shamal_telemetry::process::documented_variables(
            SERVICE.env_prefix,
            &[
                include_str!("../../../docs/operations.md"),
                include_str!("../../../README.md"),
            ],
        );
        assert!(documented.len() >= 10, "{documented:?}");
        // SHAMAL_REGISTRY_URL is the `shamal` command's (where the registry
        // is), not a setting of the registry.
        for name in documented
            .iter()
            .filter(|name| *name != "SHAMAL_REGISTRY_URL")
        {
            assert!(read.contains(name), "{name} is documented but not read");
        }
    }
}
