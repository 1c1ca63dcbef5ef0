//! Bearer tokens validated against an OpenID provider, as RFC 8725 asks:
//! keys from the provider's JWKS only (found by OpenID discovery through
//! openidconnect), the algorithm from an allow-list of asymmetric ones and
//! matching the key's type, the signature checked before any claim, then
//! exact issuer, audience, expiry, not-before and issued-at with a small
//! leeway. Validated tokens are cached by their SHA-256 until they expire.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use openidconnect::core::{CoreJsonWebKeySet, CoreProviderMetadata};
use openidconnect::{IssuerUrl, JsonWebKey, JsonWebKeySetUrl};
use serde_json::Value;

use crate::bearer::{JwtParts, parse_authorization};
use crate::cache::{TokenCache, token_hash};
use crate::error::AuthError;
use crate::http::HttpClient;
use crate::jwks::{KeySet, Lookup};
use crate::jwt::{self, Algorithm, Claims, Header, printable};
use crate::principal::User;
use crate::rbac::Role;
use crate::settings::{OidcSettings, SettingsError};

/// Why a [`TokenValidator`] could not be made.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("OpenID discovery of '{issuer}' failed: {reason}")]
    Discovery { issuer: String, reason: String },
    #[error(
        "the discovery document of '{expected}' names issuer '{found}' (they must be identical)"
    )]
    IssuerMismatch { expected: String, found: String },
}

/// Validates the bearer tokens of one OpenID provider. Cheap to clone
/// (shared state); share one per service.
#[derive(Clone)]
pub struct TokenValidator {
    inner: Arc<Inner>,
}

struct Inner {
    settings: OidcSettings,
    algorithms: Vec<Algorithm>,
    http: HttpClient,
    jwks_uri: JsonWebKeySetUrl,
    keys: ArcSwap<KeySet>,
    /// When the JWKS was last fetched; held while refetching, so that
    /// concurrent callers wait for one fetch instead of making their own.
    last_fetch: tokio::sync::Mutex<Instant>,
    refetches: AtomicU64,
    cache: TokenCache,
}

impl std::fmt::Debug for TokenValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenValidator")
            .field("issuer", &self.inner.settings.issuer)
            .field("audience", &self.inner.settings.audience)
            .field("jwks_uri", &self.inner.jwks_uri.as_str())
            .field("keys", &self.inner.keys.load().keys.len())
            .finish_non_exhaustive()
    }
}

/// An error and its sources, `: `-separated.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

impl TokenValidator {
    /// Validates `settings`, then fetches the provider's discovery
    /// document (`<issuer>/.well-known/openid-configuration`) and its JWKS
    /// through openidconnect. The document must name exactly the
    /// configured issuer.
    pub async fn discover(settings: OidcSettings) -> Result<TokenValidator, OidcError> {
        settings.validate()?;
        let algorithms = settings
            .algorithms
            .iter()
            .map(|name| Algorithm::from_setting(name))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|reason| SettingsError {
                field: "algorithms",
                reason,
            })?;
        let discovery_failed = |reason: String| OidcError::Discovery {
            issuer: settings.issuer.clone(),
            reason,
        };
        let http = HttpClient::new(Duration::from_millis(settings.http_timeout_ms))
            .map_err(|error| discovery_failed(error.to_string()))?;
        let issuer_url = IssuerUrl::new(settings.issuer.clone())
            .map_err(|error| discovery_failed(format!("the issuer is not a URL: {error}")))?;
        let metadata = CoreProviderMetadata::discover_async(issuer_url, &http)
            .await
            .map_err(|error| match error {
                openidconnect::DiscoveryError::Validation(reason)
                    if reason.contains("unexpected issuer") =>
                {
                    discovery_failed(reason)
                }
                error => discovery_failed(error_chain(&error)),
            })?;
        if metadata.issuer().as_str() != settings.issuer {
            return Err(OidcError::IssuerMismatch {
                expected: settings.issuer.clone(),
                found: metadata.issuer().as_str().to_owned(),
            });
        }
        let keys = KeySet::new(metadata.jwks().clone(), 0);
        tracing::info!(
            issuer = %settings.issuer,
            jwks_uri = %metadata.jwks_uri().as_str(),
            keys = keys.keys.len(),
            "OIDC provider discovered"
        );
        Ok(TokenValidator {
            inner: Arc::new(Inner {
                cache: TokenCache::new(settings.cache_capacity),
                algorithms,
                http,
                jwks_uri: metadata.jwks_uri().clone(),
                keys: ArcSwap::from_pointee(keys),
                last_fetch: tokio::sync::Mutex::new(Instant::now()),
                refetches: AtomicU64::new(0),
                settings,
            }),
        })
    }

    pub fn settings(&self) -> &OidcSettings {
        &self.inner.settings
    }

    /// The user an `Authorization` header value's bearer token names, or
    /// the refusal (UNAUTHENTICATED) naming what failed. A token validated
    /// before costs a hash and a cache lookup.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<User>, AuthError> {
        let parts = parse_authorization(authorization)?;
        let hash = token_hash(parts.token);
        if let Some(user) = self.inner.cache.get(&hash, SystemTime::now()) {
            return Ok(user);
        }
        let user = Arc::new(self.validate(&parts).await?);
        self.inner
            .cache
            .insert(hash, user.clone(), SystemTime::now());
        Ok(user)
    }

    /// The user of `token` (the token itself, not the header) if it was
    /// validated before and has not expired.
    pub fn cached(&self, token: &str) -> Option<Arc<User>> {
        self.inner.cache.get(&token_hash(token), SystemTime::now())
    }

    /// Tokens in the cache (expired ones included until swept).
    pub fn cached_tokens(&self) -> usize {
        self.inner.cache.len()
    }

    /// How many times the JWKS was fetched again since discovery (for an
    /// unknown key id).
    pub fn jwks_refetches(&self) -> u64 {
        self.inner.refetches.load(Ordering::Relaxed)
    }

    /// The ids of the provider's keys as last fetched.
    pub fn key_ids(&self) -> Vec<String> {
        self.inner
            .keys
            .load()
            .keys
            .iter()
            .filter_map(|key| key.key_id().map(|id| id.as_str().to_owned()))
            .collect()
    }

    async fn validate(&self, parts: &JwtParts<'_>) -> Result<User, AuthError> {
        let (header, claims) = jwt::decode_parts(parts)?;
        let alg = self.check_header(&header)?;
        let signature = jwt::decode_signature(parts)?;

        let keys = self.inner.keys.load_full();
        if !verify(&keys, &header, alg, parts, &signature)? {
            self.refetch(keys.generation).await;
            let keys = self.inner.keys.load_full();
            if !verify(&keys, &header, alg, parts, &signature)? {
                return Err(AuthError::invalid_token(match &header.kid {
                    Some(kid) => format!("unknown key id '{}'", printable(kid, 64)),
                    None => format!(
                        "the token has no key id (kid) and no key of the provider can verify {alg}"
                    ),
                }));
            }
        }
        self.check_claims(&claims)
    }

    /// The header's algorithm, if allowed; refuses `crit` and odd `typ`s.
    fn check_header(&self, header: &Header) -> Result<Algorithm, AuthError> {
        let alg = Algorithm::from_name(&header.alg).map_err(AuthError::invalid_token)?;
        if !self.inner.algorithms.contains(&alg) {
            return Err(AuthError::invalid_token(format!(
                "algorithm '{alg}' is not allowed (allowed: {})",
                self.inner.settings.algorithms.join(", ")
            )));
        }
        if let Some(crit) = &header.crit {
            let names: Vec<String> = crit
                .iter()
                .take(5)
                .map(|name| printable(name, 32))
                .collect();
            return Err(AuthError::invalid_token(format!(
                "the token requires header extensions that are not understood (crit: {})",
                names.join(", ")
            )));
        }
        if let Some(typ) = &header.typ {
            let media = typ.strip_prefix("application/").unwrap_or(typ);
            if !(media.eq_ignore_ascii_case("jwt") || media.eq_ignore_ascii_case("at+jwt")) {
                return Err(AuthError::invalid_token(format!(
                    "token type '{}' is not JWT or at+jwt",
                    printable(typ, 32)
                )));
            }
        }
        Ok(alg)
    }

    /// Fetches the JWKS again, unless it was fetched less than
    /// `jwks_min_refetch_s` ago; callers arriving meanwhile share the
    /// fetch. `seen` is the generation the caller looked in.
    async fn refetch(&self, seen: u64) {
        let mut last_fetch = self.inner.last_fetch.lock().await;
        if self.inner.keys.load().generation != seen {
            return; // fetched while this caller waited
        }
        let min = Duration::from_secs(self.inner.settings.jwks_min_refetch_s);
        if last_fetch.elapsed() < min {
            return;
        }
        *last_fetch = Instant::now();
        self.inner.refetches.fetch_add(1, Ordering::Relaxed);
        match CoreJsonWebKeySet::fetch_async(&self.inner.jwks_uri, &self.inner.http).await {
            Ok(jwks) => {
                let keys = KeySet::new(jwks, seen + 1);
                tracing::info!(
                    keys = keys.keys.len(),
                    generation = seen + 1,
                    "OIDC JWKS refetched"
                );
                self.inner.keys.store(Arc::new(keys));
            }
            Err(error) => tracing::warn!(
                jwks_uri = %self.inner.jwks_uri.as_str(),
                error = %error_chain(&error),
                "OIDC JWKS refetch failed; keeping the keys fetched before"
            ),
        }
    }

    fn check_claims(&self, claims: &Claims) -> Result<User, AuthError> {
        let settings = &self.inner.settings;
        fn invalid(reason: impl Into<String>) -> AuthError {
            AuthError::invalid_token(reason)
        }
        match claims.string("iss")? {
            None => return Err(invalid("the token has no issuer (iss)")),
            Some(iss) if iss != settings.issuer => {
                return Err(invalid(format!(
                    "issuer '{}' is not '{}'",
                    printable(iss, 100),
                    settings.issuer
                )));
            }
            Some(_) => {}
        }
        check_audience(claims, &settings.audience)?;

        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        // Whole seconds: the configured leeway is.
        let leeway = settings.leeway_s as f64;
        let Some(exp) = claims.numeric_date("exp")? else {
            return Err(invalid("the token has no expiry (exp)"));
        };
        if now >= exp + leeway {
            return Err(invalid(format!(
                "token expired ({} s ago)",
                seconds(now - exp)
            )));
        }
        if let Some(nbf) = claims.numeric_date("nbf")?
            && nbf > now + leeway
        {
            return Err(invalid(format!(
                "token is not valid yet (nbf is {} s from now)",
                seconds(nbf - now)
            )));
        }
        if let Some(iat) = claims.numeric_date("iat")?
            && iat > now + leeway
        {
            return Err(invalid(format!(
                "token is issued in the future (iat is {} s from now)",
                seconds(iat - now)
            )));
        }
        let Some(subject) = claims.string("sub")? else {
            return Err(invalid("the token has no subject (sub)"));
        };
        let client_id = match claims.string("client_id")? {
            Some(client) => Some(client),
            None => claims.string("azp")?,
        };
        Ok(User {
            subject: subject.to_owned(),
            client_id: client_id.map(str::to_owned),
            tenant: claims.string(&settings.tenant_claim)?.map(str::to_owned),
            roles: roles(claims.get(&settings.roles_claim)),
            groups: groups(claims.get(&settings.groups_claim)),
            expires_at: expires_at(exp),
        })
    }
}

/// Checks the signature with the key the header names; `Ok(false)` when
/// the key set has no such key (worth a refetch).
fn verify(
    keys: &KeySet,
    header: &Header,
    alg: Algorithm,
    parts: &JwtParts<'_>,
    signature: &[u8],
) -> Result<bool, AuthError> {
    match keys.lookup(header.kid.as_deref(), alg) {
        Lookup::Found(key) => key
            .verify_signature(&alg.jws(), parts.signing_input.as_bytes(), signature)
            .map(|()| true)
            .map_err(|error| {
                AuthError::invalid_token(format!(
                    "signature is invalid ({})",
                    printable(&error.to_string(), 100)
                ))
            }),
        Lookup::UnknownKid | Lookup::NoUsableKey => Ok(false),
        Lookup::Refused(error) => Err(error),
    }
}

/// `aud`: the audience, or an array containing it.
fn check_audience(claims: &Claims, audience: &str) -> Result<(), AuthError> {
    let found = match claims.get("aud") {
        None | Some(Value::Null) => {
            return Err(AuthError::invalid_token("the token has no audience (aud)"));
        }
        Some(Value::String(aud)) => aud == audience,
        Some(Value::Array(auds)) => auds.iter().any(|aud| aud.as_str() == Some(audience)),
        Some(_) => {
            return Err(AuthError::invalid_token(
                "the token's audience (aud) is not a string or an array of strings",
            ));
        }
    };
    if found {
        Ok(())
    } else {
        let shown = match claims.get("aud") {
            Some(Value::String(aud)) => printable(aud, 100),
            Some(other) => printable(&other.to_string(), 100),
            None => String::new(),
        };
        Err(AuthError::invalid_token(format!(
            "audience '{shown}' does not include '{audience}'"
        )))
    }
}

/// The built-in roles among a roles claim's values: an array of strings or
/// a space-separated string; others ignored (deny by default).
fn roles(value: Option<&Value>) -> Vec<Role> {
    let mut roles = Vec::new();
    let mut add = |name: &str| {
        if let Some(role) = Role::from_name(name)
            && !roles.contains(&role)
        {
            roles.push(role);
        }
    };
    match value {
        Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).for_each(&mut add),
        Some(Value::String(names)) => names.split_whitespace().for_each(&mut add),
        _ => {}
    }
    roles
}

/// A groups claim: an array of strings (others ignored), or one string.
fn groups(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(names)) => names
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Some(Value::String(name)) => vec![name.clone()],
        _ => Vec::new(),
    }
}

/// `exp` as a time; absurdly far ones are capped at a year from now (only
/// the cache uses it, to forget the token).
fn expires_at(exp: f64) -> SystemTime {
    Duration::try_from_secs_f64(exp.max(0.0))
        .ok()
        .and_then(|since_epoch| UNIX_EPOCH.checked_add(since_epoch))
        .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(365 * 24 * 3600))
}

/// Whole seconds of a positive difference, for refusals.
fn seconds(difference: f64) -> i64 {
    difference.clamp(0.0, 1e15) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles only if the validator can be shared across tasks and its
    /// future moved between threads (tower layers and spawned tasks need it).
    #[allow(dead_code)]
    fn validator_and_authenticate_are_send_and_sync(validator: &TokenValidator) {
        fn send<T: Send>(_: &T) {}
        fn sync<T: Send + Sync + 'static>() {}
        sync::<TokenValidator>();
        send(&validator.authenticate(None));
    }

    #[test]
    fn roles_come_from_arrays_or_space_separated_strings() {
        let value = serde_json::json!(["viewer", "admin", 7, "root", "viewer"]);
        assert_eq!(roles(Some(&value)), [Role::Viewer, Role::Admin]);
        let value = serde_json::json!("data-scientist  release-manager unknown");
        assert_eq!(
            roles(Some(&value)),
            [Role::DataScientist, Role::ReleaseManager]
        );
        assert!(roles(None).is_empty());
        assert!(roles(Some(&serde_json::json!({"admin": true}))).is_empty());
    }

    #[test]
    fn groups_come_from_arrays_or_one_string() {
        let value = serde_json::json!(["risk", 1, "ops"]);
        assert_eq!(groups(Some(&value)), ["risk", "ops"]);
        assert_eq!(
            groups(Some(&serde_json::json!("Data Science"))),
            ["Data Science"]
        );
        assert!(groups(Some(&serde_json::json!(null))).is_empty());
    }

    #[test]
    fn audiences_are_a_string_or_an_array_containing_it() {
        let claims = |aud: Value| {
            Claims(
                serde_json::json!({ "aud": aud })
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            )
        };
        check_audience(&claims("shamal".into()), "shamal").unwrap();
        check_audience(&claims(serde_json::json!(["x", "shamal"])), "shamal").unwrap();
        for (aud, says) in [
            (
                Value::from("other"),
                "audience 'other' does not include 'shamal'",
            ),
            (serde_json::json!(["x"]), "does not include"),
            (serde_json::json!(5), "not a string"),
            (Value::Null, "no audience"),
        ] {
            let error = check_audience(&claims(aud), "shamal").unwrap_err();
            assert!(error.to_string().contains(says), "{error}");
        }
    }

    #[test]
    fn expiry_times_never_panic() {
        assert_eq!(expires_at(10.0), UNIX_EPOCH + Duration::from_secs(10));
        assert_eq!(expires_at(-5.0), UNIX_EPOCH);
        assert!(expires_at(1e300) > SystemTime::now());
        assert_eq!(seconds(f64::MAX), 1_000_000_000_000_000);
    }
}
