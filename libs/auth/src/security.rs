//! The security settings every service shares (the `[security]` table of
//! its configuration file, one flag each in its arguments): the mTLS
//! files, the OIDC issuer, and the explicit `insecure` switch.
//!
//! A service binary refuses to start without TLS (and, for the public
//! router and registry, without OIDC) unless it is started `--insecure`,
//! and then says so in its log and in `shamal_security_insecure`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Default SPIFFE trust domain of service identities.
pub const DEFAULT_TRUST_DOMAIN: &str = "shamal.local";

/// Security settings (the `[security]` table of a service's file; flags
/// `--tls-cert` etc.; variables `SHAMAL_<SERVICE>_TLS_CERT` etc.).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Run without TLS or without auth. Development only: logged and
    /// exported as `shamal_security_insecure 1`.
    pub insecure: bool,
    /// Trust domain of the SPIFFE identities accepted from peers
    /// (`spiffe://<trust_domain>/<service>/<id>`).
    pub trust_domain: String,
    /// This service's certificate chain (PEM); with `tls_key` and `tls_ca`,
    /// turns TLS on for every listener and mTLS for internal calls.
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM) that peers' certificates must chain to.
    pub tls_ca: Option<PathBuf>,
    /// OIDC issuer URL (exact); with `oidc_audience`, turns bearer-token
    /// authentication on.
    pub oidc_issuer: Option<String>,
    /// The audience access tokens must carry.
    pub oidc_audience: Option<String>,
    /// Claim holding the caller's roles (a dotted path such as
    /// `realm_access.roles` reaches into objects).
    pub oidc_roles_claim: String,
    /// Claim holding the caller's tenant (residency policies key on it).
    pub oidc_tenant_claim: String,
    /// Claim holding the caller's groups.
    pub oidc_groups_claim: String,
    /// Clock leeway for `exp`, `nbf` and `iat`, in seconds.
    pub oidc_leeway_s: u64,
}

impl Default for SecurityConfig {
    fn default() -> SecurityConfig {
        SecurityConfig {
            insecure: false,
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            oidc_issuer: None,
            oidc_audience: None,
            oidc_roles_claim: "roles".to_owned(),
            oidc_tenant_claim: "tenant".to_owned(),
            oidc_groups_claim: "groups".to_owned(),
            oidc_leeway_s: 30,
        }
    }
}

/// Flags of [`SecurityConfig`]; serialized, only the values given appear.
#[derive(Clone, Debug, Default, clap::Args, Serialize)]
pub struct SecurityArgs {
    /// Start without TLS or auth (development only; logged and exported as
    /// a metric).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub insecure: Option<bool>,
    /// SPIFFE trust domain of accepted service identities.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    /// This service's TLS certificate chain (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// The CA bundle peers' certificates chain to (PEM).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// OIDC issuer URL: turns bearer-token authentication on.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc_issuer: Option<String>,
    /// Audience access tokens must carry.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc_audience: Option<String>,
    /// Claim holding roles (default `roles`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc_roles_claim: Option<String>,
    /// Claim holding the tenant (default `tenant`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc_tenant_claim: Option<String>,
    /// Claim holding groups (default `groups`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc_groups_claim: Option<String>,
    /// Clock leeway in seconds (default 30).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc_leeway_s: Option<u64>,
}

/// The check a service binary makes before it binds anything: TLS (and
/// OIDC, when public) or an explicit `insecure`. On refusal it prints why
/// and gives the exit code of an invalid configuration (64).
pub fn require(
    binary: &str,
    config: &SecurityConfig,
    exposure: Exposure,
) -> Result<(), std::process::ExitCode> {
    config.validate(exposure).map_err(|error| {
        eprintln!("{binary}: invalid configuration: {error}");
        std::process::ExitCode::from(64)
    })
}

/// What a service's callers are: a public API (router, registry) takes
/// people's tokens; an internal one (workers) only services.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposure {
    Public,
    Internal,
}

impl SecurityConfig {
    /// Whether TLS files are configured.
    pub fn tls_on(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// Whether bearer-token authentication is configured.
    pub fn oidc_on(&self) -> bool {
        self.oidc_issuer.is_some()
    }

    /// Checks the settings are consistent, and that a service exposed as
    /// `exposure` has TLS (and OIDC, when public) unless `insecure`. The
    /// message names the fields to set.
    pub fn validate(&self, exposure: Exposure) -> Result<(), String> {
        let tls_set = [&self.tls_cert, &self.tls_key, &self.tls_ca]
            .iter()
            .filter(|path| path.is_some())
            .count();
        if tls_set != 0 && tls_set != 3 {
            return Err(
                "tls_cert, tls_key and tls_ca must be set together (or none of them)".to_owned(),
            );
        }
        if self.oidc_issuer.is_some() != self.oidc_audience.is_some() {
            return Err("oidc_issuer and oidc_audience must be set together".to_owned());
        }
        if self.oidc_leeway_s > 300 {
            return Err(format!(
                "oidc_leeway_s: {} s is more than the 300 s a clock may drift",
                self.oidc_leeway_s
            ));
        }
        if shamal_tls::PeerIdentity::from_uri(&format!("spiffe://{}/x/y", self.trust_domain))
            .is_none()
        {
            return Err(format!(
                "trust_domain: '{}' is not a SPIFFE trust domain",
                self.trust_domain
            ));
        }
        if self.insecure {
            return Ok(());
        }
        let mut missing = Vec::new();
        if !self.tls_on() {
            missing.push("TLS (tls_cert, tls_key, tls_ca)");
        }
        if exposure == Exposure::Public && !self.oidc_on() {
            missing.push("OIDC (oidc_issuer, oidc_audience)");
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "refusing to start without {}: configure them, or start with --insecure \
                 (insecure = true) for development",
                missing.join(" and ")
            ))
        }
    }

    /// The TLS files, when TLS is on.
    pub fn tls_files(&self) -> Option<shamal_tls::TlsFiles> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(shamal_tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            }),
            _ => None,
        }
    }

    /// The token validation settings, when OIDC is on.
    pub fn oidc_settings(&self) -> Option<crate::settings::OidcSettings> {
        let (issuer, audience) = (self.oidc_issuer.as_ref()?, self.oidc_audience.as_ref()?);
        Some(crate::settings::OidcSettings {
            issuer: issuer.clone(),
            audience: audience.clone(),
            roles_claim: self.oidc_roles_claim.clone(),
            tenant_claim: self.oidc_tenant_claim.clone(),
            groups_claim: self.oidc_groups_claim.clone(),
            leeway_s: self.oidc_leeway_s,
            ..crate::settings::OidcSettings::default()
        })
    }

    /// The authenticator these settings ask for: off when neither TLS nor
    /// OIDC is on; otherwise service identities of `trust_domain` (TLS on)
    /// and tokens of the issuer (OIDC on, discovered now: an unreachable
    /// provider fails the start, naming it).
    pub async fn authenticator(
        &self,
        metrics: Option<crate::metrics::AuthMetrics>,
    ) -> Result<std::sync::Arc<crate::Authenticator>, String> {
        if !self.tls_on() && !self.oidc_on() {
            return Ok(crate::Authenticator::off());
        }
        let tokens = match self.oidc_settings() {
            Some(settings) => Some(
                crate::validator::TokenValidator::discover(settings)
                    .await
                    .map_err(|error| {
                        format!(
                            "OIDC issuer '{}': {error}",
                            self.oidc_issuer.as_deref().unwrap_or_default()
                        )
                    })?,
            ),
            None => None,
        };
        let trust_domain = self.tls_on().then(|| self.trust_domain.clone());
        if tokens.is_none() && self.insecure {
            // TLS without OIDC, started insecure: services are still
            // identified by their certificates, callers without any are
            // anonymous (auth off, as the start-up log says).
            return Ok(crate::Authenticator::admitting_anonymous(
                trust_domain,
                metrics,
            ));
        }
        Ok(crate::Authenticator::new(tokens, trust_domain, metrics))
    }

    /// The server side of a control-plane service (the registry, the audit
    /// service): announces the mode, builds the authenticator (refusals
    /// counted on `metrics` when TLS or OIDC is on) and, with TLS, the
    /// server configuration taking optional client certificates (services
    /// present theirs, people a bearer token), its handshakes counted.
    pub async fn serve_side(
        &self,
        service: &str,
        exposure: Exposure,
        metrics: &prometheus::Registry,
    ) -> Result<
        (
            std::sync::Arc<crate::Authenticator>,
            Option<shamal_tls::ServerTls>,
        ),
        String,
    > {
        self.announce(service, exposure, metrics);
        let auth_metrics = if self.tls_on() || self.oidc_on() {
            Some(crate::metrics::AuthMetrics::new(metrics).map_err(|error| error.to_string())?)
        } else {
            None
        };
        let auth = self.authenticator(auth_metrics).await?;
        let server_tls = match self.tls_files() {
            Some(files) => {
                let tls = shamal_tls::ServerTls::new(&files, shamal_tls::ClientAuth::Optional)
                    .map_err(|error| error.to_string())?;
                Some(match shamal_tls::TlsMetrics::new(metrics) {
                    Ok(tls_metrics) => tls.with_metrics(tls_metrics),
                    Err(_) => tls,
                })
            }
            None => None,
        };
        Ok((auth, server_tls))
    }

    /// Logs what is on and off (a warning when started insecure) and
    /// exports `shamal_security_insecure` on `metrics`: 1 when TLS is off,
    /// or OIDC is off on a public service.
    pub fn announce(&self, service: &str, exposure: Exposure, metrics: &prometheus::Registry) {
        let open = !self.tls_on() || (exposure == Exposure::Public && !self.oidc_on());
        if self.insecure && open {
            tracing::warn!(
                service,
                mode = %self.describe(),
                "started INSECURE: callers are not fully authenticated (development only)"
            );
        } else {
            tracing::info!(service, mode = %self.describe(), "security");
        }
        if let Ok(gauge) = prometheus::IntGauge::new(
            "shamal_security_insecure",
            "1 when this service runs without TLS or without authentication",
        ) {
            gauge.set(i64::from(open));
            let _ = metrics.register(Box::new(gauge));
        }
    }

    /// One line for the start-up log: what is on and off.
    pub fn describe(&self) -> String {
        format!(
            "tls={} auth={}{}",
            if self.tls_on() { "on" } else { "off" },
            if self.oidc_on() {
                "oidc"
            } else if self.tls_on() {
                "mtls"
            } else {
                "off"
            },
            if self.insecure {
                " (started insecure)"
            } else {
                ""
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_tls() -> SecurityConfig {
        SecurityConfig {
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            tls_ca: Some("ca.pem".into()),
            ..SecurityConfig::default()
        }
    }

    #[test]
    fn services_refuse_to_start_open_unless_insecure() {
        let open = SecurityConfig::default();
        let error = open.validate(Exposure::Internal).unwrap_err();
        assert!(
            error.contains("tls_cert") && error.contains("--insecure"),
            "{error}"
        );
        let error = with_tls().validate(Exposure::Public).unwrap_err();
        assert!(error.contains("oidc_issuer"), "{error}");
        assert!(with_tls().validate(Exposure::Internal).is_ok());
        let insecure = SecurityConfig {
            insecure: true,
            ..SecurityConfig::default()
        };
        assert!(insecure.validate(Exposure::Public).is_ok());
        let public = SecurityConfig {
            oidc_issuer: Some("https://idp".into()),
            oidc_audience: Some("shamal".into()),
            ..with_tls()
        };
        assert!(public.validate(Exposure::Public).is_ok());
    }

    #[test]
    fn half_settings_are_refused_by_name() {
        let half = SecurityConfig {
            tls_cert: Some("c.pem".into()),
            insecure: true,
            ..SecurityConfig::default()
        };
        assert!(
            half.validate(Exposure::Internal)
                .unwrap_err()
                .contains("tls_key")
        );
        let half = SecurityConfig {
            oidc_issuer: Some("https://idp".into()),
            insecure: true,
            ..SecurityConfig::default()
        };
        assert!(
            half.validate(Exposure::Public)
                .unwrap_err()
                .contains("oidc_audience")
        );
        let bad = SecurityConfig {
            trust_domain: "bad domain".into(),
            insecure: true,
            ..SecurityConfig::default()
        };
        assert!(
            bad.validate(Exposure::Public)
                .unwrap_err()
                .contains("trust_domain")
        );
    }
}
