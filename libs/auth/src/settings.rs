//! What a service needs to know to accept a provider's access tokens.

use serde::{Deserialize, Serialize};

/// The signature algorithms accepted when the settings name none: the
/// asymmetric ones providers use. HMAC and `none` are never accepted.
pub const DEFAULT_ALGORITHMS: [&str; 4] = ["RS256", "PS256", "ES256", "EdDSA"];

/// The largest clock leeway accepted (seconds).
pub const MAX_LEEWAY_S: u64 = 300;

/// Where bearer tokens come from and how their claims map to a
/// [`User`](crate::User). Embedded in the services' figment-layered
/// settings (e.g. `[auth.oidc]`); every field but `issuer` and `audience`
/// has a default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OidcSettings {
    /// The issuer URL, exactly as the provider's discovery document and
    /// tokens' `iss` spell it (trailing slash included or not). `https`,
    /// or `http` on a loopback host only.
    pub issuer: String,
    /// The audience tokens must be issued for (`aud`, a string or an array
    /// containing it).
    pub audience: String,
    /// The claim holding the roles: an array of strings or a
    /// space-separated string. A dotted path (`realm_access.roles`) reaches
    /// into objects; a claim whose name contains dots is found first.
    pub roles_claim: String,
    /// The claim holding the tenant (a string); dotted paths as above.
    pub tenant_claim: String,
    /// The claim holding the groups (an array of strings, or one string);
    /// dotted paths as above.
    pub groups_claim: String,
    /// Clock skew allowed on `exp`, `nbf` and `iat` (seconds, at most 300).
    pub leeway_s: u64,
    /// The JWS algorithms accepted: of RS256, RS384, RS512, PS256, PS384,
    /// PS512, ES256, ES384, EdDSA. `none` and HS* are refused.
    pub algorithms: Vec<String>,
    /// A token naming an unknown key makes the JWKS be fetched again, at
    /// most once per this many seconds.
    pub jwks_min_refetch_s: u64,
    /// Validated tokens remembered (until their `exp`); 0 turns the cache
    /// off.
    pub cache_capacity: usize,
    /// Timeout of each request to the provider (discovery, JWKS).
    pub http_timeout_ms: u64,
}

impl Default for OidcSettings {
    fn default() -> Self {
        OidcSettings {
            issuer: String::new(),
            audience: String::new(),
            roles_claim: "roles".to_owned(),
            tenant_claim: "tenant".to_owned(),
            groups_claim: "groups".to_owned(),
            leeway_s: 30,
            algorithms: DEFAULT_ALGORITHMS.iter().map(|a| (*a).to_owned()).collect(),
            jwks_min_refetch_s: 30,
            cache_capacity: 100_000,
            http_timeout_ms: 5_000,
        }
    }
}

/// A setting that cannot work, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid OIDC setting '{field}': {reason}")]
pub struct SettingsError {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> SettingsError {
    SettingsError {
        field,
        reason: reason.into(),
    }
}

impl OidcSettings {
    /// Settings for `issuer` and `audience`, the rest defaulted.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> OidcSettings {
        OidcSettings {
            issuer: issuer.into(),
            audience: audience.into(),
            ..OidcSettings::default()
        }
    }

    /// Checks every field; the first problem names its field.
    pub fn validate(&self) -> Result<(), SettingsError> {
        check_issuer(&self.issuer)?;
        if self.audience.trim().is_empty() {
            return Err(invalid("audience", "must not be empty"));
        }
        for (field, claim) in [
            ("roles_claim", &self.roles_claim),
            ("tenant_claim", &self.tenant_claim),
            ("groups_claim", &self.groups_claim),
        ] {
            if claim.is_empty() || claim.split('.').any(str::is_empty) {
                return Err(invalid(
                    field,
                    format!("'{claim}' is not a claim name or a dotted path of them"),
                ));
            }
        }
        if self.leeway_s > MAX_LEEWAY_S {
            return Err(invalid(
                "leeway_s",
                format!(
                    "{} s is more than the {MAX_LEEWAY_S} s allowed",
                    self.leeway_s
                ),
            ));
        }
        if self.algorithms.is_empty() {
            return Err(invalid("algorithms", "must name at least one algorithm"));
        }
        for name in &self.algorithms {
            crate::jwt::Algorithm::from_setting(name)
                .map_err(|reason| invalid("algorithms", reason))?;
        }
        if !(1..=86_400).contains(&self.jwks_min_refetch_s) {
            return Err(invalid(
                "jwks_min_refetch_s",
                format!("{} is not between 1 and 86400", self.jwks_min_refetch_s),
            ));
        }
        if self.cache_capacity > 10_000_000 {
            return Err(invalid(
                "cache_capacity",
                format!("{} is more than 10000000", self.cache_capacity),
            ));
        }
        if !(100..=60_000).contains(&self.http_timeout_ms) {
            return Err(invalid(
                "http_timeout_ms",
                format!("{} is not between 100 and 60000", self.http_timeout_ms),
            ));
        }
        Ok(())
    }
}

/// `https://…`, or `http://` on 127.0.0.1, [::1] or localhost (development
/// providers); no query or fragment.
fn check_issuer(issuer: &str) -> Result<(), SettingsError> {
    if issuer.is_empty() {
        return Err(invalid("issuer", "must not be empty"));
    }
    let rest = if let Some(rest) = issuer.strip_prefix("https://") {
        rest
    } else if let Some(rest) = issuer.strip_prefix("http://") {
        if !is_loopback_authority(rest) {
            return Err(invalid(
                "issuer",
                format!("'{issuer}' uses http on a host other than loopback; use https"),
            ));
        }
        rest
    } else {
        return Err(invalid("issuer", format!("'{issuer}' is not an https URL")));
    };
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || rest.contains(['?', '#']) || rest.contains(char::is_whitespace) {
        return Err(invalid(
            "issuer",
            format!("'{issuer}' is not a URL with a host and no query or fragment"),
        ));
    }
    Ok(())
}

/// Whether the authority (and path) after `http://` names a loopback host.
pub(crate) fn is_loopback_authority(rest: &str) -> bool {
    let authority = rest.split('/').next().unwrap_or_default();
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> OidcSettings {
        OidcSettings::new("https://id.example.com/realms/shamal", "shamal")
    }

    fn field_of(settings: OidcSettings) -> &'static str {
        settings.validate().unwrap_err().field
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let settings: OidcSettings =
            serde_json::from_str(r#"{"issuer": "https://id.example.com", "audience": "shamal"}"#)
                .unwrap();
        assert_eq!(settings.roles_claim, "roles");
        assert_eq!(settings.tenant_claim, "tenant");
        assert_eq!(settings.groups_claim, "groups");
        assert_eq!(settings.leeway_s, 30);
        assert_eq!(settings.algorithms, ["RS256", "PS256", "ES256", "EdDSA"]);
        assert_eq!(settings.jwks_min_refetch_s, 30);
        assert_eq!(settings.cache_capacity, 100_000);
        assert_eq!(settings.http_timeout_ms, 5_000);
        settings.validate().unwrap();
        let round_trip: OidcSettings =
            serde_json::from_value(serde_json::to_value(&settings).unwrap()).unwrap();
        assert_eq!(round_trip, settings);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let error = serde_json::from_str::<OidcSettings>(r#"{"isuser": "x"}"#).unwrap_err();
        assert!(error.to_string().contains("isuser"), "{error}");
    }

    #[test]
    fn issuers_must_be_https_or_loopback_http() {
        for ok in [
            "https://id.example.com",
            "https://id.example.com/",
            "https://login.microsoftonline.com/tid/v2.0",
            "http://127.0.0.1:9411",
            "http://[::1]:9411/",
            "http://localhost:8080/realms/dev",
        ] {
            OidcSettings::new(ok, "a").validate().unwrap();
        }
        for bad in [
            "",
            "id.example.com",
            "http://id.example.com",
            "http://127.0.0.1.evil.com",
            "ftp://127.0.0.1",
            "https://",
            "https://id.example.com/?x=1",
            "https://id.example.com/#f",
        ] {
            assert_eq!(field_of(OidcSettings::new(bad, "a")), "issuer", "{bad}");
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut s = valid();
        s.audience = " ".into();
        assert_eq!(field_of(s), "audience");
        let mut s = valid();
        s.roles_claim = "realm_access..roles".into();
        assert_eq!(field_of(s), "roles_claim");
        let mut s = valid();
        s.groups_claim = String::new();
        assert_eq!(field_of(s), "groups_claim");
        let mut s = valid();
        s.leeway_s = 301;
        let error = s.validate().unwrap_err();
        assert_eq!(error.field, "leeway_s");
        assert!(error.to_string().contains("300"), "{error}");
        let mut s = valid();
        s.leeway_s = 300;
        s.validate().unwrap();
        let mut s = valid();
        s.algorithms = vec![];
        assert_eq!(field_of(s), "algorithms");
        let mut s = valid();
        s.jwks_min_refetch_s = 0;
        assert_eq!(field_of(s), "jwks_min_refetch_s");
        let mut s = valid();
        s.http_timeout_ms = 0;
        assert_eq!(field_of(s), "http_timeout_ms");
        let mut s = valid();
        s.cache_capacity = 0;
        s.validate().unwrap();
    }

    #[test]
    fn none_and_hmac_are_refused_whatever_the_list_says() {
        for (alg, says) in [
            ("none", "'none'"),
            ("None", "'None'"),
            ("HS256", "HMAC"),
            ("hs512", "HMAC"),
            ("RS1", "not supported"),
            ("ES512", "not supported"),
        ] {
            let mut s = valid();
            s.algorithms = vec!["RS256".into(), alg.into()];
            let error = s.validate().unwrap_err();
            assert_eq!(error.field, "algorithms");
            assert!(error.reason.contains(says), "{alg}: {error}");
        }
        let mut s = valid();
        s.algorithms = [
            "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
        ]
        .map(str::to_owned)
        .to_vec();
        s.validate().unwrap();
    }
}
