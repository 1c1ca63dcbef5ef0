//! The web UI's login: OpenID Connect authorization code with PKCE
//! (openidconnect), and a server-side session the browser holds by an
//! opaque cookie. On only when OIDC is on (`oidc_issuer` set).
//!
//! - `GET /login` discovers the provider, makes a PKCE verifier (S256), a
//!   `state` and a `nonce`, keeps them in a short-lived pre-login record
//!   keyed by a random id in the `shamal_login` cookie (SameSite=Lax, so
//!   that the provider's cross-site redirect back carries it; Path
//!   `/oidc/callback`), and redirects to the provider.
//! - `GET /oidc/callback` checks `state` (and `iss` when sent), exchanges
//!   the code with the verifier (and the client secret, HTTP basic),
//!   verifies the ID token (signature, issuer, audience, expiry, nonce,
//!   `at_hash`), validates the access token with the registry's own
//!   [`Authenticator`] (so the session's roles come from the same claims as
//!   a bearer caller's), keeps a session under a random 256-bit id, sets the
//!   `shamal_session` cookie (HttpOnly, SameSite=Strict, Path=/, Secure when
//!   the registry serves TLS) and redirects to `/`. A Strict cookie is not
//!   sent on that cross-site redirect chain, but the page at `/` needs none
//!   (it is public): its own requests are same-site and carry it.
//! - `GET /session` answers who is logged in, their permissions (the page
//!   hides what they may not do) and the session's CSRF token; 401 when
//!   nobody is.
//! - `POST /logout` (with the CSRF token) ends the session.
//!
//! The REST layer takes the session cookie as credentials when a request
//! has no `Authorization` header ([`credentials`]); a mutation so
//! authenticated must carry the session's CSRF token in `x-csrf-token`
//! (synchronizer token), else 403. Bearer callers need none.
//!
//! Sessions live in this process's memory (capped, expiring): they do not
//! survive a restart and are per replica (several replicas need sticky
//! sessions at the load balancer). A session lasts at most
//! [`SESSION_MAX_AGE`]; its access token is refreshed with the refresh
//! token shortly before it expires, and the session ends when that fails.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Extension, MatchedPath, Query, Request};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use openidconnect::core::{
    CoreAuthPrompt, CoreAuthenticationFlow, CoreClient, CoreProviderMetadata, CoreTokenResponse,
};
use openidconnect::{
    AccessTokenHash, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointMaybeSet,
    EndpointNotSet, EndpointSet, IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, RefreshToken, Scope, TokenResponse,
};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shamal_auth::http::HttpClient;
use shamal_auth::{AuthError, Authenticator, Credentials, Permission, Principal};

use super::api_error::ApiError;

/// The session cookie.
pub const SESSION_COOKIE: &str = "shamal_session";
/// The pre-login cookie (between `/login` and the callback).
pub const LOGIN_COOKIE: &str = "shamal_login";
/// The header carrying the session's CSRF token on mutations.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Where the provider sends the browser back (`<public_url>/oidc/callback`
/// is the client's redirect URI).
pub const CALLBACK_PATH: &str = "/oidc/callback";
/// The scopes asked for by default (`openid` is always asked for).
pub const DEFAULT_SCOPES: &str = "openid profile offline_access shamal";
/// The longest a session lasts, refreshes included.
pub const SESSION_MAX_AGE: Duration = Duration::from_secs(12 * 3600);
/// How long a login may take at the provider.
const LOGIN_TTL: Duration = Duration::from_secs(600);
/// Access tokens are refreshed this long before they expire.
const REFRESH_MARGIN: Duration = Duration::from_secs(30);
/// How long the provider's discovery document is reused.
const DISCOVERY_TTL: Duration = Duration::from_secs(600);
const MAX_PENDING_LOGINS: usize = 1_000;
const MAX_SESSIONS: usize = 10_000;

/// The web client's secret (`oidc_web_client_secret`): never shown, by
/// `Debug` nor by `--print-config`, and zeroized on drop.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct WebClientSecret(pub zeroize::Zeroizing<String>);

impl WebClientSecret {
    pub fn new(secret: impl Into<String>) -> WebClientSecret {
        WebClientSecret(zeroize::Zeroizing::new(secret.into()))
    }
}

impl std::fmt::Debug for WebClientSecret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(shamal_telemetry::config::REDACTED)
    }
}

impl Serialize for WebClientSecret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(shamal_telemetry::config::REDACTED)
    }
}

/// The origin (`scheme://host[:port]`) of a `public_url` setting: http or
/// https, no path (the UI's links are absolute), query or credentials.
pub fn public_origin(url: &str) -> Result<String, String> {
    let bad = |why: &str| format!("public_url '{url}': {why}");
    let parsed = openidconnect::url::Url::parse(url).map_err(|error| bad(&error.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("must be an http or https URL"));
    }
    if parsed.host().is_none() {
        return Err(bad("names no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad("must not carry credentials"));
    }
    if parsed.path() != "/" || parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad(
            "must be an origin only (scheme, host, port): the UI is served at its root",
        ));
    }
    Ok(parsed.origin().ascii_serialization())
}

/// What the web login needs from the registry's configuration.
#[derive(Clone, Debug)]
pub struct WebSettings {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Option<WebClientSecret>,
    /// Scopes asked for, `openid` excepted (always asked for).
    pub scopes: Vec<String>,
    /// The registry's external origin; the redirect URI is this plus
    /// [`CALLBACK_PATH`].
    pub public_origin: String,
    /// Cookies get `Secure` (the registry serves TLS).
    pub secure_cookies: bool,
}

impl WebSettings {
    /// The settings of `config`, `None` when OIDC is off. `bound` is the
    /// HTTP listener's address, the public URL's default (a wildcard
    /// address becomes loopback).
    pub fn of(
        config: &crate::RegistryConfig,
        bound: SocketAddr,
    ) -> Result<Option<WebSettings>, String> {
        let Some(issuer) = config.security.oidc_issuer.clone() else {
            return Ok(None);
        };
        let secure_cookies = config.security.tls_on();
        let public_origin = match &config.public_url {
            Some(url) => public_origin(url)?,
            None => {
                let mut address = bound;
                if address.ip().is_unspecified() {
                    address.set_ip(match address {
                        SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                        SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                    });
                }
                let scheme = if secure_cookies { "https" } else { "http" };
                format!("{scheme}://{address}")
            }
        };
        if config.oidc_web_client_id.trim().is_empty() {
            return Err("oidc_web_client_id must not be empty".to_owned());
        }
        Ok(Some(WebSettings {
            issuer,
            client_id: config.oidc_web_client_id.clone(),
            client_secret: config.oidc_web_client_secret.clone(),
            scopes: config
                .oidc_web_scopes
                .split([' ', ','])
                .filter(|scope| !scope.is_empty() && *scope != "openid")
                .map(str::to_owned)
                .collect(),
            public_origin,
            secure_cookies,
        }))
    }

    pub fn redirect_uri(&self) -> String {
        format!("{}{CALLBACK_PATH}", self.public_origin)
    }
}

/// The web UI's login and its sessions (one per registry process).
pub struct WebLogin {
    settings: WebSettings,
    auth: Arc<Authenticator>,
    http: HttpClient,
    provider: tokio::sync::Mutex<Option<(Instant, CoreProviderMetadata)>>,
    /// Logins under way, by the SHA-256 of their cookie.
    pending: Mutex<HashMap<String, PendingLogin>>,
    /// Sessions, by the SHA-256 of their cookie.
    sessions: Mutex<HashMap<String, Arc<Session>>>,
}

struct PendingLogin {
    state: String,
    nonce: String,
    verifier: String,
    started: Instant,
}

struct Session {
    csrf_token: String,
    ends: Instant,
    /// Held while refreshing, so that concurrent requests refresh once
    /// (providers that rotate refresh tokens revoke a reused one).
    refreshing: tokio::sync::Mutex<()>,
    tokens: Mutex<Tokens>,
}

struct Tokens {
    access_token: zeroize::Zeroizing<String>,
    refresh_token: Option<zeroize::Zeroizing<String>>,
    /// The access token's `exp`.
    expires_at: SystemTime,
    principal: Principal,
}

/// The client `openidconnect` makes from discovered metadata.
type WebClient = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// A refusal of the login flow, as the API's JSON error.
fn refused(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let mut response = ApiError::new(status, code, message).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// 32 random bytes, base64url: a cookie value, a CSRF token.
fn random_token() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn digest(value: &str) -> String {
    hex::encode(Sha256::digest(value.as_bytes()))
}

/// Equality in time independent of where the values differ.
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim_matches('"'))
        .filter(|value| !value.is_empty())
}

/// Whether a request changes something (needs the CSRF token).
fn mutation(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
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

impl WebLogin {
    /// The web login of `config` (`None` when OIDC is off), validating
    /// access tokens with `auth`; `bound` is the HTTP listener's address.
    pub fn of(
        config: &crate::RegistryConfig,
        bound: SocketAddr,
        auth: Arc<Authenticator>,
    ) -> anyhow::Result<Option<Arc<WebLogin>>> {
        let Some(settings) = WebSettings::of(config, bound).map_err(anyhow::Error::msg)? else {
            return Ok(None);
        };
        tracing::info!(
            client_id = %settings.client_id,
            redirect_uri = %settings.redirect_uri(),
            confidential = settings.client_secret.is_some(),
            "web UI login with OIDC"
        );
        Ok(Some(Arc::new(WebLogin::new(settings, auth)?)))
    }

    pub fn new(settings: WebSettings, auth: Arc<Authenticator>) -> anyhow::Result<WebLogin> {
        Ok(WebLogin {
            settings,
            auth,
            http: HttpClient::new(Duration::from_secs(10))?,
            provider: tokio::sync::Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        })
    }

    pub fn settings(&self) -> &WebSettings {
        &self.settings
    }

    /// Sessions held now (expired ones included until swept).
    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// The provider's metadata, discovered at most every
    /// [`DISCOVERY_TTL`].
    async fn metadata(&self) -> Result<CoreProviderMetadata, String> {
        let mut cached = self.provider.lock().await;
        if let Some((fetched, metadata)) = cached.as_ref()
            && fetched.elapsed() < DISCOVERY_TTL
        {
            return Ok(metadata.clone());
        }
        let issuer = IssuerUrl::new(self.settings.issuer.clone())
            .map_err(|error| format!("the issuer is not a URL: {error}"))?;
        let metadata = CoreProviderMetadata::discover_async(issuer, &self.http)
            .await
            .map_err(|error| error_chain(&error))?;
        *cached = Some((Instant::now(), metadata.clone()));
        Ok(metadata)
    }

    async fn client(&self) -> Result<WebClient, Response> {
        let metadata = self.metadata().await.map_err(|reason| {
            tracing::warn!(issuer = %self.settings.issuer, %reason, "OIDC discovery failed");
            refused(
                StatusCode::BAD_GATEWAY,
                "unavailable",
                format!(
                    "the identity provider '{}' cannot be reached: {reason}",
                    self.settings.issuer
                ),
            )
        })?;
        let redirect = RedirectUrl::new(self.settings.redirect_uri()).map_err(|error| {
            refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("redirect URI: {error}"),
            )
        })?;
        Ok(CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(self.settings.client_id.clone()),
            self.settings
                .client_secret
                .as_ref()
                .map(|secret| ClientSecret::new(secret.0.to_string())),
        )
        .set_redirect_uri(redirect))
    }

    /// A `Set-Cookie` value.
    fn cookie(
        &self,
        name: &str,
        value: &str,
        path: &str,
        same_site: &str,
        max_age: Option<u64>,
    ) -> HeaderValue {
        let mut text = format!("{name}={value}; HttpOnly; SameSite={same_site}; Path={path}");
        if let Some(seconds) = max_age {
            text.push_str(&format!("; Max-Age={seconds}"));
        }
        if self.settings.secure_cookies {
            text.push_str("; Secure");
        }
        HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    fn clear_session_cookie(&self) -> HeaderValue {
        self.cookie(SESSION_COOKIE, "", "/", "Strict", Some(0))
    }

    /// `GET /login`.
    async fn login(&self) -> Response {
        let client = match self.client().await {
            Ok(client) => client,
            Err(response) => return response,
        };
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .add_scopes(self.settings.scopes.iter().cloned().map(Scope::new))
            .set_pkce_challenge(challenge);
        // OIDC Core 11: offline access (a refresh token) is asked for with
        // prompt=consent.
        if self
            .settings
            .scopes
            .iter()
            .any(|scope| scope == "offline_access")
        {
            request = request.add_prompt(CoreAuthPrompt::Consent);
        }
        let (url, state, nonce) = request.url();
        let id = random_token();
        {
            let mut pending = lock(&self.pending);
            pending.retain(|_, login| login.started.elapsed() < LOGIN_TTL);
            if pending.len() >= MAX_PENDING_LOGINS
                && let Some(oldest) = pending
                    .iter()
                    .min_by_key(|(_, login)| login.started)
                    .map(|(key, _)| key.clone())
            {
                pending.remove(&oldest);
            }
            pending.insert(
                digest(&id),
                PendingLogin {
                    state: state.secret().clone(),
                    nonce: nonce.secret().clone(),
                    verifier: verifier.secret().clone(),
                    started: Instant::now(),
                },
            );
        }
        let mut response = StatusCode::SEE_OTHER.into_response();
        let headers = response.headers_mut();
        if let Ok(location) = HeaderValue::try_from(url.as_str()) {
            headers.insert(header::LOCATION, location);
        }
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // Lax: sent on the provider's (cross-site) top-level redirect back.
        headers.insert(
            header::SET_COOKIE,
            self.cookie(
                LOGIN_COOKIE,
                &id,
                CALLBACK_PATH,
                "Lax",
                Some(LOGIN_TTL.as_secs()),
            ),
        );
        response
    }

    /// `GET /oidc/callback`.
    async fn callback(&self, params: CallbackParams, headers: &HeaderMap) -> Response {
        let login = cookie(headers, LOGIN_COOKIE)
            .and_then(|id| lock(&self.pending).remove(&digest(id)))
            .filter(|login| login.started.elapsed() < LOGIN_TTL);
        let Some(login) = login else {
            return self.login_failed(
                StatusCode::BAD_REQUEST,
                "no login is under way in this browser (or it took over 10 minutes): start again at /login",
            );
        };
        if let Some(error) = &params.error {
            let description = params.error_description.as_deref().unwrap_or_default();
            return self.login_failed(
                StatusCode::UNAUTHORIZED,
                &format!("the identity provider refused the login: {error} {description}"),
            );
        }
        if !params
            .state
            .as_deref()
            .is_some_and(|state| same_secret(state, &login.state))
        {
            return self.login_failed(
                StatusCode::BAD_REQUEST,
                "the login's state does not match this browser's: start again at /login",
            );
        }
        // RFC 9207: the answer is from the provider the login went to.
        if let Some(iss) = &params.iss
            && iss.trim_end_matches('/') != self.settings.issuer.trim_end_matches('/')
        {
            return self.login_failed(
                StatusCode::BAD_REQUEST,
                &format!(
                    "the answer names issuer '{iss}', not '{}'",
                    self.settings.issuer
                ),
            );
        }
        let Some(code) = params.code else {
            return self.login_failed(StatusCode::BAD_REQUEST, "the answer carries no code");
        };
        let client = match self.client().await {
            Ok(client) => client,
            Err(response) => return response,
        };
        let tokens = match client.exchange_code(AuthorizationCode::new(code)) {
            Ok(request) => {
                request
                    .set_pkce_verifier(PkceCodeVerifier::new(login.verifier))
                    .request_async(&self.http)
                    .await
            }
            Err(error) => {
                return self.login_failed(
                    StatusCode::BAD_GATEWAY,
                    &format!("the provider has no token endpoint: {error}"),
                );
            }
        };
        let tokens = match tokens {
            Ok(tokens) => tokens,
            Err(error) => {
                return self.login_failed(
                    StatusCode::BAD_GATEWAY,
                    &format!("exchanging the code failed: {}", error_chain(&error)),
                );
            }
        };
        let subject = match verify_id_token(&client, &tokens, &Nonce::new(login.nonce)) {
            Ok(subject) => subject,
            Err(reason) => {
                return self.login_failed(
                    StatusCode::UNAUTHORIZED,
                    &format!("the ID token is not valid: {reason}"),
                );
            }
        };
        let principal = match self.validate(tokens.access_token().secret()).await {
            Ok(principal) => principal,
            Err(error) => {
                return self.login_failed(
                    StatusCode::UNAUTHORIZED,
                    &format!("the access token is not valid here: {error}"),
                );
            }
        };
        let Principal::User(user) = &principal else {
            return self.login_failed(StatusCode::UNAUTHORIZED, "the access token names no user");
        };
        if user.subject != subject {
            return self.login_failed(
                StatusCode::UNAUTHORIZED,
                "the access token and the ID token name different subjects",
            );
        }
        let expires_at = user.expires_at;
        tracing::info!(
            subject = %user.subject,
            roles = ?user.roles,
            refreshable = tokens.refresh_token().is_some(),
            "web UI login"
        );
        let id = random_token();
        let session = Arc::new(Session {
            csrf_token: random_token(),
            ends: Instant::now() + SESSION_MAX_AGE,
            refreshing: tokio::sync::Mutex::new(()),
            tokens: Mutex::new(Tokens {
                access_token: zeroize::Zeroizing::new(tokens.access_token().secret().clone()),
                refresh_token: tokens
                    .refresh_token()
                    .map(|token| zeroize::Zeroizing::new(token.secret().clone())),
                expires_at,
                principal,
            }),
        });
        {
            let mut sessions = lock(&self.sessions);
            let now = Instant::now();
            sessions.retain(|_, session| session.ends > now);
            if sessions.len() >= MAX_SESSIONS
                && let Some(first) = sessions
                    .iter()
                    .min_by_key(|(_, session)| session.ends)
                    .map(|(key, _)| key.clone())
            {
                sessions.remove(&first);
            }
            sessions.insert(digest(&id), session);
        }
        let mut response = StatusCode::SEE_OTHER.into_response();
        let headers = response.headers_mut();
        headers.insert(header::LOCATION, HeaderValue::from_static("/"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.append(
            header::SET_COOKIE,
            self.cookie(SESSION_COOKIE, &id, "/", "Strict", None),
        );
        headers.append(
            header::SET_COOKIE,
            self.cookie(LOGIN_COOKIE, "", CALLBACK_PATH, "Lax", Some(0)),
        );
        response
    }

    fn login_failed(&self, status: StatusCode, message: &str) -> Response {
        tracing::warn!(reason = message, "web UI login failed");
        let mut response = refused(status, "login_failed", message);
        response.headers_mut().insert(
            header::SET_COOKIE,
            self.cookie(LOGIN_COOKIE, "", CALLBACK_PATH, "Lax", Some(0)),
        );
        response
    }

    /// The principal of an access token, by the registry's validator.
    async fn validate(&self, access_token: &str) -> Result<Principal, AuthError> {
        let header = format!("Bearer {access_token}");
        self.auth
            .authenticate(Credentials {
                peer: None,
                authorization: Some(&header),
            })
            .await
    }

    /// The session of a request's cookie and its principal, refreshing
    /// the access token when it is about to expire; an ended session is
    /// forgotten.
    async fn session(&self, headers: &HeaderMap) -> Result<(Arc<Session>, Principal), AuthError> {
        match cookie(headers, SESSION_COOKIE) {
            Some(id) => self.session_of(id).await,
            None => Err(AuthError::missing(
                "not logged in: log in at /login, or send 'Authorization: Bearer <access token>'",
            )),
        }
    }

    async fn session_of(&self, id: &str) -> Result<(Arc<Session>, Principal), AuthError> {
        let key = digest(id);
        let ended =
            || AuthError::missing("the web session has ended or expired: log in again at /login");
        let session = lock(&self.sessions).get(&key).cloned().ok_or_else(ended)?;
        if session.ends <= Instant::now() {
            lock(&self.sessions).remove(&key);
            return Err(ended());
        }
        if let Some(principal) = session.current() {
            return Ok((session, principal));
        }
        let held = session.clone();
        let _refreshing = held.refreshing.lock().await;
        if let Some(principal) = session.current() {
            return Ok((session, principal));
        }
        match self.refresh(&session).await {
            Ok(principal) => Ok((session, principal)),
            Err(reason) => {
                tracing::info!(%reason, "web session ended: its access token could not be refreshed");
                lock(&self.sessions).remove(&key);
                Err(ended())
            }
        }
    }

    /// Exchanges the session's refresh token for a new access token.
    async fn refresh(&self, session: &Session) -> Result<Principal, String> {
        let refresh_token = lock(&session.tokens)
            .refresh_token
            .clone()
            .ok_or("the provider gave no refresh token")?;
        let client = self
            .client()
            .await
            .map_err(|_| "the identity provider cannot be reached".to_owned())?;
        let refresh_token = RefreshToken::new(refresh_token.to_string());
        let tokens: CoreTokenResponse = client
            .exchange_refresh_token(&refresh_token)
            .map_err(|error| error.to_string())?
            .request_async(&self.http)
            .await
            .map_err(|error| error_chain(&error))?;
        let principal = self
            .validate(tokens.access_token().secret())
            .await
            .map_err(|error| error.to_string())?;
        let Principal::User(user) = &principal else {
            return Err("the access token names no user".to_owned());
        };
        let mut current = lock(&session.tokens);
        if let Principal::User(before) = &current.principal
            && before.subject != user.subject
        {
            return Err("the refreshed token names another subject".to_owned());
        }
        current.access_token = zeroize::Zeroizing::new(tokens.access_token().secret().clone());
        if let Some(token) = tokens.refresh_token() {
            current.refresh_token = Some(zeroize::Zeroizing::new(token.secret().clone()));
        }
        current.expires_at = user.expires_at;
        current.principal = principal.clone();
        Ok(principal)
    }

    /// The principal of a REST request authenticated by its session
    /// cookie (see [`credentials`]).
    async fn authenticate(&self, request: CookieRequest) -> Result<Principal, Response> {
        let CookieRequest {
            session_id,
            csrf_token,
            mutation,
            route,
        } = request;
        let (session, principal) = match self.session_of(&session_id).await {
            Ok(found) => found,
            Err(error) => {
                self.auth.refused(crate::auth::REST_API, &route, &error);
                let mut response = refused(
                    error.kind().http_status(),
                    error.kind().label(),
                    error.to_string(),
                );
                response
                    .headers_mut()
                    .append(header::SET_COOKIE, self.clear_session_cookie());
                return Err(response);
            }
        };
        if mutation
            && !csrf_token
                .as_deref()
                .is_some_and(|token| same_secret(token, &session.csrf_token))
        {
            tracing::warn!(
                api = crate::auth::REST_API,
                method = %route,
                who = %principal.describe(),
                reason = "csrf",
                "call refused"
            );
            return Err(csrf_refusal());
        }
        Ok(principal)
    }
}

fn csrf_refusal() -> Response {
    refused(
        StatusCode::FORBIDDEN,
        "permission_denied",
        format!(
            "CSRF check failed: a change made with the web session's cookie must carry the \
             session's CSRF token in the '{CSRF_HEADER}' header (GET /session returns it)"
        ),
    )
}

impl Session {
    /// The principal while the access token is good for a while yet.
    fn current(&self) -> Option<Principal> {
        let tokens = lock(&self.tokens);
        let deadline = SystemTime::now() + REFRESH_MARGIN;
        (tokens.expires_at > deadline && !tokens.access_token.is_empty())
            .then(|| tokens.principal.clone())
    }

    fn csrf_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get(CSRF_HEADER)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|token| same_secret(token, &self.csrf_token))
    }
}

/// Verifies the token response's ID token (signature by the provider's
/// keys, issuer, audience, expiry, nonce, and `at_hash` when present);
/// its subject.
fn verify_id_token(
    client: &WebClient,
    tokens: &CoreTokenResponse,
    nonce: &Nonce,
) -> Result<String, String> {
    let id_token = tokens
        .id_token()
        .ok_or("the provider returned no ID token")?;
    let verifier = client.id_token_verifier();
    let claims = id_token
        .claims(&verifier, nonce)
        .map_err(|error| error_chain(&error))?;
    if let Some(expected) = claims.access_token_hash() {
        let alg = id_token
            .signing_alg()
            .map_err(|error| error_chain(&error))?;
        let key = id_token
            .signing_key(&verifier)
            .map_err(|error| error_chain(&error))?;
        let actual = AccessTokenHash::from_token(tokens.access_token(), alg, key)
            .map_err(|error| error_chain(&error))?;
        if actual != *expected {
            return Err("its at_hash does not match the access token".to_owned());
        }
    }
    Ok(claims.subject().as_str().to_owned())
}

/// The query of the provider's redirect back.
#[derive(Debug, Default, Deserialize)]
pub struct CallbackParams {
    code: Option<String>,
    state: Option<String>,
    iss: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// What [`credentials`] takes from a request.
struct CookieRequest {
    session_id: String,
    csrf_token: Option<String>,
    mutation: bool,
    route: String,
}

/// The principal of a REST request that presents the web session's cookie
/// and no `Authorization` header: `None` when web login is off or the
/// request carries no session cookie (the bearer token or certificate
/// decides); else a future of the principal, or of the answer when the
/// session has ended (401) or a mutation lacks the session's CSRF token
/// (403). The future does not borrow the request.
pub fn credentials(
    request: &Request,
) -> Option<impl Future<Output = Result<Principal, Response>> + Send + 'static> {
    let web = request.extensions().get::<Arc<WebLogin>>()?.clone();
    let headers = request.headers();
    if headers.contains_key(header::AUTHORIZATION) {
        return None;
    }
    let cookie_request = CookieRequest {
        session_id: cookie(headers, SESSION_COOKIE)?.to_owned(),
        csrf_token: headers
            .get(CSRF_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned),
        mutation: mutation(request.method()),
        route: request
            .extensions()
            .get::<MatchedPath>()
            .map_or_else(|| request.uri().path(), MatchedPath::as_str)
            .to_owned(),
    };
    Some(async move { web.authenticate(cookie_request).await })
}

/// `router` with the web login's routes answering (they answer 404 when
/// `web` is `None`: OIDC off).
pub fn attach(router: Router, web: Option<Arc<WebLogin>>) -> Router {
    match web {
        Some(web) => router.layer(Extension(web)),
        None => router,
    }
}

fn off() -> Response {
    refused(
        StatusCode::NOT_FOUND,
        "not_found",
        "web login is off: the registry has no OIDC issuer configured",
    )
}

/// `GET /login`: starts a login at the identity provider.
pub async fn login(web: Option<Extension<Arc<WebLogin>>>) -> Response {
    match web {
        Some(Extension(web)) => web.login().await,
        None => off(),
    }
}

/// `GET /oidc/callback`: the provider's redirect back.
pub async fn callback(
    web: Option<Extension<Arc<WebLogin>>>,
    params: Result<Query<CallbackParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let Some(Extension(web)) = web else {
        return off();
    };
    let params = params.map(|Query(params)| params).unwrap_or_default();
    web.callback(params, &headers).await
}

/// What `GET /session` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionInfo {
    pub subject: String,
    pub roles: Vec<String>,
    pub tenant: Option<String>,
    pub groups: Vec<String>,
    /// The permissions the roles hold (`rollouts:manage`, ...).
    pub permissions: Vec<String>,
    /// Send it as `x-csrf-token` with every change.
    pub csrf_token: String,
}

/// `GET /session`: who is logged in (401 when nobody is).
pub async fn session(web: Option<Extension<Arc<WebLogin>>>, headers: HeaderMap) -> Response {
    let Some(Extension(web)) = web else {
        return off();
    };
    let (session, principal) = match web.session(&headers).await {
        Ok(found) => found,
        Err(error) => {
            let mut response = refused(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                error.to_string(),
            );
            if cookie(&headers, SESSION_COOKIE).is_some() {
                response
                    .headers_mut()
                    .append(header::SET_COOKIE, web.clear_session_cookie());
            }
            return response;
        }
    };
    let Principal::User(user) = &principal else {
        return refused(StatusCode::UNAUTHORIZED, "unauthenticated", "not a user");
    };
    let info = SessionInfo {
        subject: user.subject.clone(),
        roles: user
            .roles
            .iter()
            .map(|role| role.name().to_owned())
            .collect(),
        tenant: user.tenant.clone(),
        groups: user.groups.clone(),
        permissions: Permission::ALL
            .into_iter()
            .filter(|permission| principal.allows(*permission))
            .map(|permission| permission.name().to_owned())
            .collect(),
        csrf_token: session.csrf_token.clone(),
    };
    ([(header::CACHE_CONTROL, "no-store")], Json(info)).into_response()
}

/// `POST /logout` (with the CSRF token): ends the session.
pub async fn logout(web: Option<Extension<Arc<WebLogin>>>, headers: HeaderMap) -> Response {
    let Some(Extension(web)) = web else {
        return off();
    };
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        let key = digest(id);
        let session = lock(&web.sessions).get(&key).cloned();
        if let Some(session) = session {
            if !session.csrf_ok(&headers) {
                return csrf_refusal();
            }
            lock(&web.sessions).remove(&key);
            let who = lock(&session.tokens).principal.describe();
            tracing::info!(%who, "web UI logout");
        }
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, web.clear_session_cookie());
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_name_among_several_headers() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; shamal_session=abc"),
        );
        headers.append(header::COOKIE, HeaderValue::from_static("shamal_login=xyz"));
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&headers, LOGIN_COOKIE), Some("xyz"));
        assert_eq!(cookie(&headers, "shamal"), None);
        headers.insert(header::COOKIE, HeaderValue::from_static("shamal_session="));
        assert_eq!(cookie(&headers, SESSION_COOKIE), None);
    }

    #[test]
    fn public_urls_are_origins() {
        assert_eq!(
            public_origin("https://registry.example.com/").as_deref(),
            Ok("https://registry.example.com")
        );
        assert_eq!(
            public_origin("http://127.0.0.1:8200").as_deref(),
            Ok("http://127.0.0.1:8200")
        );
        for bad in [
            "ftp://x",
            "https://registry.example.com/ui",
            "https://u:p@registry.example.com",
            "not a url",
        ] {
            let error = public_origin(bad).unwrap_err();
            assert!(error.contains("public_url"), "{error}");
        }
    }

    #[test]
    fn secrets_compare_by_value_and_tokens_are_random() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", ""));
        let (a, b) = (random_token(), random_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(!mutation(&Method::GET) && mutation(&Method::POST) && mutation(&Method::DELETE));
    }

    #[test]
    fn settings_default_the_redirect_from_the_bound_address() {
        let config = crate::RegistryConfig {
            security: shamal_auth::security::SecurityConfig {
                oidc_issuer: Some("http://127.0.0.1:9411".into()),
                oidc_audience: Some("shamal".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let bound = SocketAddr::from(([0, 0, 0, 0], 18290));
        let settings = WebSettings::of(&config, bound).unwrap().unwrap();
        assert_eq!(
            settings.redirect_uri(),
            "http://127.0.0.1:18290/oidc/callback"
        );
        assert_eq!(settings.client_id, "shamal-web");
        assert!(!settings.scopes.contains(&"openid".to_owned()));
        assert!(!settings.secure_cookies);
        let off = crate::RegistryConfig::default();
        assert!(WebSettings::of(&off, bound).unwrap().is_none());
        // The secret is never shown, and its variable is read.
        let with_secret = crate::RegistryConfig {
            oidc_web_client_secret: Some(WebClientSecret::new("hunter2")),
            ..config
        };
        let printed = shamal_telemetry::config::printable(&with_secret).unwrap();
        assert!(
            printed.contains("oidc_web_client_secret = \"***\"") && !printed.contains("hunter2"),
            "{printed}"
        );
        assert!(!format!("{with_secret:?}").contains("hunter2"));
        let read = crate::config::SERVICE.variables_read::<crate::RegistryArgs>();
        for variable in [
            "SHAMAL_REGISTRY_OIDC_WEB_CLIENT_ID",
            "SHAMAL_REGISTRY_OIDC_WEB_CLIENT_SECRET",
            "SHAMAL_REGISTRY_OIDC_WEB_SCOPES",
            "SHAMAL_REGISTRY_PUBLIC_URL",
        ] {
            assert!(read.contains(&variable.to_owned()), "{variable}: {read:?}");
        }
    }
}
