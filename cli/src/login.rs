//! `shamal login` and `shamal logout`: a person's OIDC access token for the
//! registry commands, kept in the user's config directory and refreshed.
//!
//! - Authorization code with PKCE (S256) and a loopback redirect
//!   (`http://127.0.0.1:<port>/callback`, RFC 8252): the browser opens
//!   the provider's login page, and a one-shot listener takes the code.
//! - Device code (RFC 8628) with `--device`, or when no browser can be
//!   opened and the provider offers it: the user enters a code shown here
//!   on any device.
//!
//! The tokens are stored as JSON in `$XDG_CONFIG_HOME/shamal/credentials.json`
//! (default `~/.config/shamal/`), mode 0600 in a 0700 directory, written
//! atomically. The provider is reached through shamal-auth's HTTP client
//! (https, or http on loopback; no redirects).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openidconnect::core::{
    CoreAuthDisplay, CoreAuthPrompt, CoreAuthenticationFlow, CoreClaimName, CoreClaimType,
    CoreClient, CoreClientAuthMethod, CoreDeviceAuthorizationResponse, CoreGrantType,
    CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm,
    CoreResponseMode, CoreResponseType, CoreSubjectIdentifierType, CoreTokenResponse,
};
use openidconnect::url::Url;
use openidconnect::{
    AdditionalProviderMetadata, AuthorizationCode, ClientId, CsrfToken, DeviceAuthorizationUrl,
    IssuerUrl, JsonWebKeySet, Nonce, OAuth2TokenResponse as _, PkceCodeChallenge, ProviderMetadata,
    RedirectUrl, RefreshToken, Scope, TokenResponse as _, TokenUrl,
};
use serde::{Deserialize, Serialize};
use shamal_auth::http::HttpClient;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::client::{CliError, CliResult};

/// How long a login may take (the browser's round trip, or the device
/// code's polling).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(300);
/// A stored token expiring within this is refreshed before use.
const REFRESH_MARGIN_S: u64 = 60;
/// Each request to the provider.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// The OpenID provider's issuer URL (discovery at
    /// `<issuer>/.well-known/openid-configuration`).
    #[arg(long, env = "SHAMAL_OIDC_ISSUER", value_name = "URL")]
    issuer: String,
    /// The OAuth client of the CLI at the provider (a public client).
    #[arg(long, default_value = "shamal-cli", value_name = "ID")]
    client_id: String,
    /// The audience the Shamal APIs expect: requested as a scope when the
    /// provider lists it, and checked in the token received.
    #[arg(long, default_value = "shamal", value_name = "AUD")]
    audience: String,
    /// Use the device code flow (enter a code on any device) instead of a
    /// browser on this machine.
    #[arg(long)]
    device: bool,
    /// Do not open a browser: print the login URL to open by hand (on this
    /// machine: the answer comes back to a loopback port).
    #[arg(long)]
    no_browser: bool,
    /// Extra scopes to request (repeatable, or space-separated); `openid`
    /// always, `offline_access` when the provider supports it.
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
}

/// What `shamal login` stores. Never printed: it holds secrets.
#[derive(Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub issuer: String,
    pub client_id: String,
    /// Where refreshes go (saves a discovery per refresh).
    pub token_endpoint: String,
    pub access_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// Seconds since the epoch; `None` when the provider said nothing and
    /// the token is not a JWT with `exp`.
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// Kept for the record (and a future logout at the provider); never
    /// trusted for anything here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
}

/// The discovery document, with the device authorization endpoint when
/// the provider has one.
#[derive(Clone, Debug, Deserialize, Serialize)]
struct DeviceMetadata {
    #[serde(default)]
    device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
}
impl AdditionalProviderMetadata for DeviceMetadata {}
type Metadata = ProviderMetadata<
    DeviceMetadata,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

fn provider_client() -> CliResult<HttpClient> {
    HttpClient::new(PROVIDER_TIMEOUT)
        .map_err(|error| CliError::other(format!("cannot build the HTTP client: {error}")))
}

/// An error and its sources, `: `-separated.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

pub async fn login(args: LoginArgs) -> CliResult<()> {
    let http = provider_client()?;
    let issuer = IssuerUrl::new(args.issuer.trim_end_matches('/').to_owned())
        .map_err(|error| CliError::Usage(format!("--issuer '{}': {error}", args.issuer)))?;
    let metadata = Metadata::discover_async(issuer.clone(), &http)
        .await
        .map_err(|error| {
            CliError::other(format!(
                "OpenID discovery of {} failed: {}",
                issuer.as_str(),
                chain(&error)
            ))
        })?;
    let token_endpoint = metadata
        .token_endpoint()
        .map(|url| url.as_str().to_owned())
        .ok_or_else(|| {
            CliError::other("the provider's discovery document has no token_endpoint")
        })?;
    let supported = metadata.scopes_supported().cloned().unwrap_or_default();
    let supports = |scope: &str| {
        supported
            .iter()
            .any(|supported| supported.as_str() == scope)
    };
    let mut scopes: Vec<String> = Vec::new();
    let mut add = |scope: &str| {
        if !scope.is_empty() && scope != "openid" && !scopes.iter().any(|s| s == scope) {
            scopes.push(scope.to_owned());
        }
    };
    // A refresh token needs `offline_access` at most providers.
    let offline = supports("offline_access");
    if offline {
        add("offline_access");
    }
    // Providers that model the API as a scope (the development provider's
    // `shamal`) list it; others take the audience from the client's config.
    if supports(&args.audience) {
        add(&args.audience);
    }
    for scope in args
        .scopes
        .iter()
        .flat_map(|scopes| scopes.split_whitespace())
    {
        add(scope);
    }
    let device_endpoint = metadata
        .additional_metadata()
        .device_authorization_endpoint
        .clone();
    let browser = !args.device && !args.no_browser && browser_available();
    let use_device = args.device || (!browser && !args.no_browser && device_endpoint.is_some());
    let client =
        CoreClient::from_provider_metadata(metadata, ClientId::new(args.client_id.clone()), None);
    let response = if use_device {
        let Some(endpoint) = device_endpoint else {
            return Err(CliError::other(format!(
                "{} offers no device code flow (no device_authorization_endpoint); log in with a browser (drop --device)",
                issuer.as_str()
            )));
        };
        device_flow(
            client.set_device_authorization_url(endpoint),
            &http,
            &scopes,
        )
        .await?
    } else {
        code_flow(client, &http, &scopes, browser, offline, &issuer).await?
    };
    let credentials = credentials_from(
        &response,
        issuer.as_str(),
        &args.client_id,
        &token_endpoint,
        None,
    )?;
    if let Ok((_, claims)) = shamal_auth::decode_unverified(&credentials.access_token) {
        let audience_ok = match claims.get("aud") {
            Some(serde_json::Value::String(aud)) => *aud == args.audience,
            Some(serde_json::Value::Array(auds)) => auds
                .iter()
                .any(|aud| aud.as_str() == Some(args.audience.as_str())),
            _ => false,
        };
        if !audience_ok {
            eprintln!(
                "shamal: warning: the access token's audience does not include '{}': Shamal's services will refuse it; configure the provider (or pass --audience/--scope)",
                args.audience
            );
        }
    } else {
        eprintln!(
            "shamal: warning: the access token is not a JWT: Shamal's services need JWT access tokens"
        );
    }
    let path = store(&credentials)?;
    let subject = shamal_auth::decode_unverified(&credentials.access_token)
        .ok()
        .and_then(|(_, claims)| claims.string("sub").ok().flatten().map(str::to_owned));
    match subject {
        Some(subject) => println!(
            "logged in as {subject} at {}; credentials in {}",
            credentials.issuer,
            path.display()
        ),
        None => println!(
            "logged in at {}; credentials in {}",
            credentials.issuer,
            path.display()
        ),
    }
    if credentials.refresh_token.is_none() {
        eprintln!(
            "shamal: note: the provider gave no refresh token: log in again when the token expires"
        );
    }
    Ok(())
}

/// Whether a browser can be opened here: macOS, or a graphical session
/// with `xdg-open`.
fn browser_available() -> bool {
    if cfg!(target_os = "macos") {
        return true;
    }
    let graphical = ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()));
    graphical && on_path("xdg-open")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn open_browser(url: &str) -> bool {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .is_ok()
}

type DeviceClient = CoreClient<
    openidconnect::EndpointSet,
    openidconnect::EndpointSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointMaybeSet,
    openidconnect::EndpointMaybeSet,
>;

type DiscoveredClient = CoreClient<
    openidconnect::EndpointSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointMaybeSet,
    openidconnect::EndpointMaybeSet,
>;

async fn device_flow(
    client: DeviceClient,
    http: &HttpClient,
    scopes: &[String],
) -> CliResult<CoreTokenResponse> {
    let mut request = client.exchange_device_code();
    for scope in scopes {
        request = request.add_scope(Scope::new(scope.clone()));
    }
    let details: CoreDeviceAuthorizationResponse =
        request.request_async(http).await.map_err(|error| {
            CliError::other(format!(
                "the device authorization request failed: {}",
                chain(&error)
            ))
        })?;
    eprintln!("shamal: to log in, open this address in a browser (on any device):");
    eprintln!("    {}", details.verification_uri().as_str());
    eprintln!("  and enter the code: {}", details.user_code().secret());
    if let Some(complete) = details.verification_uri_complete() {
        eprintln!("  (or open {} directly)", complete.secret());
    }
    eprintln!(
        "shamal: waiting for the login (the code expires in {} s) ...",
        details.expires_in().as_secs()
    );
    client
        .exchange_device_access_token(&details)
        .map_err(|error| CliError::other(format!("the provider has no token endpoint: {error}")))?
        .request_async(http, tokio::time::sleep, Some(LOGIN_TIMEOUT))
        .await
        .map_err(|error| CliError::other(format!("the device login failed: {}", chain(&error))))
}

async fn code_flow(
    client: DiscoveredClient,
    http: &HttpClient,
    scopes: &[String],
    browser: bool,
    offline: bool,
    issuer: &IssuerUrl,
) -> CliResult<CoreTokenResponse> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|error| CliError::other(format!("cannot listen on loopback: {error}")))?;
    let port = listener
        .local_addr()
        .map_err(|error| CliError::other(format!("cannot listen on loopback: {error}")))?
        .port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    let client = client.set_redirect_uri(
        RedirectUrl::new(redirect.clone())
            .map_err(|error| CliError::other(format!("redirect URL: {error}")))?,
    );
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut request = client
        .authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        )
        .set_pkce_challenge(challenge);
    for scope in scopes {
        request = request.add_scope(Scope::new(scope.clone()));
    }
    if offline {
        // OpenID Connect Core 11: offline_access is ignored without it.
        request = request.add_prompt(CoreAuthPrompt::Consent);
    }
    let (url, state, _nonce) = request.url();
    if browser && open_browser(url.as_str()) {
        eprintln!("shamal: opened a browser to log in; if it did not open, visit:");
    } else {
        eprintln!("shamal: open this address in a browser on this machine to log in:");
    }
    eprintln!("    {url}");
    eprintln!(
        "shamal: waiting for the login (at most {} s) ...",
        LOGIN_TIMEOUT.as_secs()
    );
    let code = tokio::time::timeout(LOGIN_TIMEOUT, callback(&listener, &state, issuer))
        .await
        .map_err(|_| {
            CliError::other(format!(
                "no login within {} s; run `shamal login` again",
                LOGIN_TIMEOUT.as_secs()
            ))
        })??;
    client
        .exchange_code(code)
        .map_err(|error| CliError::other(format!("the provider has no token endpoint: {error}")))?
        .set_pkce_verifier(verifier)
        .request_async(http)
        .await
        .map_err(|error| {
            CliError::other(format!(
                "exchanging the authorization code failed: {}",
                chain(&error)
            ))
        })
}

/// Serves the loopback redirect until the browser brings the code back:
/// other paths are answered 404; an answer with the wrong `state` (or
/// issuer, RFC 9207) or with an error ends the login.
async fn callback(
    listener: &tokio::net::TcpListener,
    state: &CsrfToken,
    issuer: &IssuerUrl,
) -> CliResult<AuthorizationCode> {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let Some(target) = read_request_target(&mut stream).await else {
            continue;
        };
        let Ok(url) = Url::parse(&format!("http://127.0.0.1{target}")) else {
            respond(&mut stream, 400, "Bad request").await;
            continue;
        };
        if url.path() != "/callback" {
            respond(&mut stream, 404, "Not found").await;
            continue;
        }
        let query: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        let param = |name: &str| {
            query
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
        };
        if param("state") != Some(state.secret().as_str()) {
            respond(&mut stream, 400, "Login failed: the answer does not match this login (state). Run shamal login again.").await;
            return Err(CliError::other(
                "the provider's answer does not carry this login's state: refused (run `shamal login` again)",
            ));
        }
        if let Some(iss) = param("iss")
            && iss.trim_end_matches('/') != issuer.as_str().trim_end_matches('/')
        {
            respond(
                &mut stream,
                400,
                "Login failed: the answer comes from another issuer.",
            )
            .await;
            return Err(CliError::other(format!(
                "the answer names issuer '{iss}', not {}: refused",
                issuer.as_str()
            )));
        }
        if let Some(error) = param("error") {
            let description = param("error_description").unwrap_or_default();
            respond(&mut stream, 400, "Login failed. You can close this page.").await;
            return Err(CliError::other(format!(
                "the provider refused the login: {error} {description}"
            )));
        }
        let Some(code) = param("code") else {
            respond(
                &mut stream,
                400,
                "Login failed: no code. Run shamal login again.",
            )
            .await;
            return Err(CliError::other("the provider's answer has no code"));
        };
        respond(
            &mut stream,
            200,
            "Logged in to Shamal. You can close this page and return to the terminal.",
        )
        .await;
        return Ok(AuthorizationCode::new(code.to_owned()));
    }
}

/// The request target of an HTTP/1 request line (`GET <target> HTTP/1.1`),
/// read with a cap and a timeout.
async fn read_request_target(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buffer = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0_u8; 1024];
        while !buffer.windows(4).any(|window| window == b"\r\n\r\n") && buffer.len() < 16 * 1024 {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buffer.extend_from_slice(&chunk[..n]);
        }
        Some(())
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .ok()??;
    let head = String::from_utf8_lossy(&buffer);
    let mut parts = head.lines().next()?.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    (method == "GET" && target.starts_with('/')).then(|| target.to_owned())
}

async fn respond(stream: &mut tokio::net::TcpStream, status: u16, message: &str) {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Bad Request",
    };
    let body = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Shamal login</title></head>\
         <body style=\"font-family:sans-serif;margin:3em\"><p>{message}</p></body></html>"
    );
    let answer = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n\
         Content-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The credentials a token response gives; `previous_refresh` is kept when
/// a refresh answer carries no new refresh token.
fn credentials_from(
    response: &CoreTokenResponse,
    issuer: &str,
    client_id: &str,
    token_endpoint: &str,
    previous_refresh: Option<&str>,
) -> CliResult<Credentials> {
    let access_token = response.access_token().secret().clone();
    let expires_at = match response.expires_in() {
        Some(lifetime) => Some(now_s() + lifetime.as_secs()),
        None => shamal_auth::decode_unverified(&access_token)
            .ok()
            .and_then(|(_, claims)| claims.numeric_date("exp").ok().flatten())
            .map(|exp| exp as u64),
    };
    Ok(Credentials {
        issuer: issuer.to_owned(),
        client_id: client_id.to_owned(),
        token_endpoint: token_endpoint.to_owned(),
        access_token,
        refresh_token: response
            .refresh_token()
            .map(|token| token.secret().clone())
            .or_else(|| previous_refresh.map(str::to_owned)),
        expires_at,
        id_token: response.id_token().map(ToString::to_string),
    })
}

/// `$XDG_CONFIG_HOME/shamal/credentials.json`, or
/// `~/.config/shamal/credentials.json`.
pub fn credentials_path() -> CliResult<PathBuf> {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|home| !home.is_empty())
                .map(|home| PathBuf::from(home).join(".config"))
        })
        .ok_or_else(|| {
            CliError::other("neither XDG_CONFIG_HOME nor HOME is set: nowhere to keep the login")
        })?;
    Ok(config.join("shamal").join("credentials.json"))
}

/// The stored login, if any.
pub fn load() -> CliResult<Option<(PathBuf, Credentials)>> {
    let path = credentials_path()?;
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(CliError::other(format!(
                "cannot read {}: {error}",
                path.display()
            )));
        }
    };
    let credentials: Credentials = serde_json::from_str(&text).map_err(|error| {
        CliError::Unauthenticated(format!(
            "{} is not a stored login ({error}); run `shamal login --issuer URL` again",
            path.display()
        ))
    })?;
    Ok(Some((path, credentials)))
}

/// Writes the login: the directory 0700, the file 0600 from its creation
/// (a temporary file renamed over the old one, so a reader never sees half
/// a file).
pub fn store(credentials: &Credentials) -> CliResult<PathBuf> {
    let path = credentials_path()?;
    write_private(&path, credentials)?;
    Ok(path)
}

fn write_private(path: &Path, credentials: &Credentials) -> CliResult<()> {
    let failed =
        |what: &str, error: std::io::Error| CliError::other(format!("cannot {what}: {error}"));
    let dir = path
        .parent()
        .ok_or_else(|| CliError::other("the credentials path has no directory"))?;
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
        builder.mode(0o700);
        builder
            .create(dir)
            .map_err(|error| failed(&format!("create {}", dir.display()), error))?;
        // The directory may predate us with laxer permissions.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|error| failed(&format!("restrict {}", dir.display()), error))?;
    }
    #[cfg(not(unix))]
    builder
        .create(dir)
        .map_err(|error| failed(&format!("create {}", dir.display()), error))?;
    let json = serde_json::to_vec_pretty(credentials)
        .map_err(|error| CliError::other(format!("cannot encode the credentials: {error}")))?;
    let temporary = dir.join(format!(".credentials.json.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let written = options
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(&json)?;
            file.write_all(b"\n")?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(failed(&format!("write {}", path.display()), error));
    }
    Ok(())
}

pub fn logout() -> CliResult<()> {
    let path = credentials_path()?;
    match std::fs::remove_file(&path) {
        Ok(()) => {
            println!("logged out: removed {}", path.display());
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            println!("not logged in (no {})", path.display());
            Ok(())
        }
        Err(error) => Err(CliError::other(format!(
            "cannot remove {}: {error}",
            path.display()
        ))),
    }
}

/// The stored login's access token, refreshed first when it expires
/// within a minute and a refresh token is stored; `None` when not logged
/// in.
pub async fn stored_access_token() -> CliResult<Option<String>> {
    let Some((path, credentials)) = load()? else {
        return Ok(None);
    };
    let now = now_s();
    let fresh = credentials
        .expires_at
        .is_none_or(|expires_at| expires_at > now + REFRESH_MARGIN_S);
    if fresh {
        return Ok(Some(credentials.access_token));
    }
    let expired = credentials
        .expires_at
        .is_some_and(|expires_at| expires_at <= now);
    let Some(refresh_token) = credentials.refresh_token.clone() else {
        if expired {
            return Err(CliError::Unauthenticated(format!(
                "the login stored in {} has expired: run `shamal login --issuer {}` again",
                path.display(),
                credentials.issuer
            )));
        }
        return Ok(Some(credentials.access_token));
    };
    match refresh(&credentials, &refresh_token).await {
        Ok(refreshed) => {
            write_private(&path, &refreshed)?;
            Ok(Some(refreshed.access_token))
        }
        Err(reason) if !expired => {
            eprintln!("shamal: warning: could not refresh the stored login ({reason})");
            Ok(Some(credentials.access_token))
        }
        Err(reason) => Err(CliError::Unauthenticated(format!(
            "the login stored in {} has expired and could not be refreshed ({reason}): run `shamal login --issuer {}` again",
            path.display(),
            credentials.issuer
        ))),
    }
}

async fn refresh(credentials: &Credentials, refresh_token: &str) -> Result<Credentials, String> {
    let http = HttpClient::new(PROVIDER_TIMEOUT).map_err(|error| error.to_string())?;
    let issuer = IssuerUrl::new(credentials.issuer.clone()).map_err(|error| error.to_string())?;
    let token_url =
        TokenUrl::new(credentials.token_endpoint.clone()).map_err(|error| error.to_string())?;
    let client = CoreClient::new(
        ClientId::new(credentials.client_id.clone()),
        issuer,
        JsonWebKeySet::default(),
    )
    .set_token_uri(token_url);
    let refresh_token = RefreshToken::new(refresh_token.to_owned());
    let response = client
        .exchange_refresh_token(&refresh_token)
        .request_async(&http)
        .await
        .map_err(|error| chain(&error))?;
    credentials_from(
        &response,
        &credentials.issuer,
        &credentials.client_id,
        &credentials.token_endpoint,
        Some(refresh_token.secret()),
    )
    .map_err(|_| "unusable token response".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_credentials_file_is_private_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shamal").join("credentials.json");
        let credentials = Credentials {
            issuer: "http://127.0.0.1:9".into(),
            client_id: "shamal-cli".into(),
            token_endpoint: "http://127.0.0.1:9/token".into(),
            access_token: "a.b.c".into(),
            refresh_token: Some("r".into()),
            expires_at: Some(1),
            id_token: None,
        };
        write_private(&path, &credentials).unwrap();
        write_private(&path, &credentials).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let mode = std::fs::metadata(path.parent().unwrap())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        let read: Credentials =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(read.refresh_token.as_deref(), Some("r"));
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }
}
