//! A small client of the registry's REST API (`/v1`), and the errors and
//! exit codes the registry commands share.
//!
//! Requests go over hyper with rustls on the ring provider (https, with the
//! system's roots; `SSL_CERT_FILE` names another bundle) or plain http.
//! Not reqwest: its rustls features would unify into every reqwest client
//! of the workspace (see libs/auth/Cargo.toml). A bearer token, when there
//! is one (`--token` / `SHAMAL_TOKEN`, else the stored `shamal login`), is
//! sent with every request.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt as _;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use http::{Method, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty, Full, StreamBody};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Flags every registry command takes (`--registry`, `--actor`, `--token`,
/// `--output`). Its `Debug` leaves the token out.
#[derive(Clone, clap::Args)]
pub struct RegistryOpts {
    /// Registry REST endpoint (model, rollout, workers, residency and placement commands).
    #[arg(
        long,
        global = true,
        help_heading = "Registry options",
        env = "SHAMAL_REGISTRY_URL",
        default_value = "http://127.0.0.1:8200",
        value_name = "URL"
    )]
    pub registry: String,
    /// Who the change is recorded as (default: $USER), on registries with
    /// auth off; with a token, the registry records its subject.
    #[arg(
        long,
        global = true,
        help_heading = "Registry options",
        env = "SHAMAL_ACTOR",
        value_name = "NAME"
    )]
    pub actor: Option<String>,
    /// Bearer token (an OIDC access token) for registries with auth on,
    /// for scripts and CI; default: the token `shamal login` stored. The
    /// token's subject is then the actor.
    #[arg(
        long,
        global = true,
        help_heading = "Registry options",
        env = "SHAMAL_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Output format of the registry commands.
    #[arg(
        long,
        global = true,
        help_heading = "Registry options",
        value_enum,
        default_value_t = Output::Table
    )]
    pub output: Output,
}

impl std::fmt::Debug for RegistryOpts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryOpts")
            .field("registry", &self.registry)
            .field("actor", &self.actor)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("output", &self.output)
            .finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned tables for people.
    Table,
    /// The registry's JSON, for scripts.
    Json,
}

/// Exit codes of the registry commands (0 is success).
pub mod exit {
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const CONFLICT: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
    /// No token, or the registry refused it (HTTP 401).
    pub const UNAUTHENTICATED: u8 = 5;
    /// The token lacks a permission (HTTP 403).
    pub const FORBIDDEN: u8 = 6;
}

/// What to do when the registry asks for credentials.
pub const LOGIN_HINT: &str =
    "not logged in or token expired: run `shamal login --issuer URL` or set SHAMAL_TOKEN";

/// What went wrong, and the exit code it maps to.
#[derive(Debug)]
pub enum CliError {
    /// The registry answered with an error body.
    Api {
        status: StatusCode,
        code: String,
        message: String,
        field: Option<String>,
        current_revision: Option<u64>,
    },
    /// Wrong flags or arguments that clap cannot check.
    Usage(String),
    /// No usable credentials (not logged in, a login that cannot be
    /// refreshed, an unreadable token).
    Unauthenticated(String),
    /// Anything else (unreachable registry, unreadable file, ...).
    Other(String),
}

impl CliError {
    pub fn other(message: impl Into<String>) -> CliError {
        CliError::Other(message.into())
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Api { status, .. } if *status == StatusCode::CONFLICT => exit::CONFLICT,
            CliError::Api { status, .. } if *status == StatusCode::NOT_FOUND => exit::NOT_FOUND,
            CliError::Api { status, .. } if *status == StatusCode::UNAUTHORIZED => {
                exit::UNAUTHENTICATED
            }
            CliError::Api { status, .. } if *status == StatusCode::FORBIDDEN => exit::FORBIDDEN,
            CliError::Unauthenticated(_) => exit::UNAUTHENTICATED,
            CliError::Api { .. } | CliError::Other(_) => exit::FAILURE,
            CliError::Usage(_) => exit::USAGE,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, CliError::Api { status, .. } if *status == StatusCode::NOT_FOUND)
    }

    /// Prints the error to stderr and gives the exit code.
    pub fn report(&self) -> ExitCode {
        match self {
            CliError::Api {
                status,
                code,
                message,
                field,
                current_revision,
            } => {
                if *status == StatusCode::UNAUTHORIZED {
                    eprintln!("shamal: {LOGIN_HINT} (the registry said: {message})");
                } else if *status == StatusCode::FORBIDDEN {
                    eprintln!("shamal: permission denied: {message}");
                } else if *status == StatusCode::CONFLICT && current_revision.is_some() {
                    eprintln!("shamal: conflict: {message}");
                    if let Some(revision) = current_revision {
                        eprintln!(
                            "shamal: the rollout is now at revision {revision}; check `shamal rollout status` and retry (or pass --revision {revision})"
                        );
                    }
                } else {
                    let field = field
                        .as_deref()
                        .map(|field| format!(" (field {field})"))
                        .unwrap_or_default();
                    eprintln!("shamal: {code}{field}: {message}");
                }
            }
            CliError::Usage(message) => eprintln!("shamal: {message}"),
            CliError::Unauthenticated(message) => eprintln!("shamal: {message}"),
            CliError::Other(message) => eprintln!("shamal: {message}"),
        }
        ExitCode::from(self.exit_code())
    }
}

pub type CliResult<T> = Result<T, CliError>;

/// Percent-encodes one path segment.
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

type RequestBody = BoxBody<Bytes, std::io::Error>;

pub struct Client {
    base: String,
    actor: String,
    /// `--token` / `SHAMAL_TOKEN`.
    explicit_token: Option<String>,
    /// The token sent (resolved, and refreshed, at the first request).
    token: tokio::sync::OnceCell<Option<String>>,
    http: HyperClient<HttpsConnector<HttpConnector>, RequestBody>,
}

impl Client {
    pub fn new(opts: &RegistryOpts) -> CliResult<Client> {
        let base = opts.registry.trim_end_matches('/').to_owned();
        let https = base.starts_with("https://");
        if !https && !base.starts_with("http://") {
            return Err(CliError::Usage(format!(
                "--registry must be an http:// or https:// URL, not '{base}'"
            )));
        }
        let actor = opts
            .actor
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .filter(|actor| !actor.trim().is_empty())
            .unwrap_or_else(|| "anonymous".to_owned());
        let explicit_token = opts
            .token
            .as_deref()
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .map(str::to_owned);
        Ok(Client {
            base,
            actor,
            explicit_token,
            token: tokio::sync::OnceCell::new(),
            http: http_client(https)?,
        })
    }

    /// The bearer token to send, if any: `--token` / `SHAMAL_TOKEN`, else
    /// the stored login (refreshed when it is about to expire).
    async fn bearer(&self) -> CliResult<Option<&str>> {
        let token = self
            .token
            .get_or_try_init(|| async {
                let token = match &self.explicit_token {
                    Some(token) => Some(token.clone()),
                    None => crate::login::stored_access_token().await?,
                };
                if token.is_some() && !is_secure_base(&self.base) {
                    eprintln!(
                        "shamal: warning: sending a bearer token to {} over plain http",
                        self.base
                    );
                }
                Ok::<_, CliError>(token)
            })
            .await?;
        Ok(token.as_deref())
    }

    /// Sends a request: with the bearer token when there is one (the
    /// registry takes the actor from it), else with `x-shamal-actor`.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Option<u64>, RequestBody)>,
    ) -> CliResult<http::Response<hyper::body::Incoming>> {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        match self.bearer().await? {
            Some(token) => {
                let mut value =
                    HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                        CliError::Unauthenticated(
                            "the token has characters a header cannot carry".to_owned(),
                        )
                    })?;
                value.set_sensitive(true);
                request = request.header(AUTHORIZATION, value);
            }
            None => {
                let actor = HeaderValue::from_str(&self.actor).map_err(|_| {
                    CliError::Usage(format!(
                        "--actor '{}' is not a valid header value",
                        self.actor
                    ))
                })?;
                request = request.header("x-shamal-actor", actor);
            }
        }
        let body = match body {
            Some((content_type, length, body)) => {
                request = request.header(CONTENT_TYPE, content_type);
                if let Some(length) = length {
                    request = request.header(CONTENT_LENGTH, length);
                }
                body
            }
            None => Empty::new().map_err(|never| match never {}).boxed(),
        };
        let request = request
            .body(body)
            .map_err(|error| CliError::Usage(format!("bad request path '{path}': {error}")))?;
        self.http.request(request).await.map_err(|error| {
            CliError::other(format!(
                "cannot reach the registry at {}: {}",
                self.base,
                error_chain(&error)
            ))
        })
    }

    async fn finish(&self, response: http::Response<hyper::body::Incoming>) -> CliResult<Value> {
        let status = response.status();
        let challenge = challenge_description(response.headers());
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|error| CliError::other(format!("reading the registry's answer: {error}")))?
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        let body: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            match serde_json::from_str(&text) {
                Ok(body) => body,
                Err(_) if !status.is_success() => Value::Null,
                Err(_) => {
                    return Err(CliError::other(format!(
                        "the registry answered {status} with a body that is not JSON: {}",
                        text.chars().take(200).collect::<String>()
                    )));
                }
            }
        };
        if status.is_success() {
            return Ok(body);
        }
        let error = &body["error"];
        Err(CliError::Api {
            status,
            code: error["code"]
                .as_str()
                .map_or_else(|| format!("http_{}", status.as_u16()), str::to_owned),
            message: error["message"]
                .as_str()
                .map(str::to_owned)
                .or(challenge)
                .unwrap_or_else(|| {
                    let text = text.trim();
                    if text.is_empty() {
                        status.to_string()
                    } else {
                        text.chars().take(200).collect()
                    }
                }),
            field: error["field"].as_str().map(str::to_owned),
            current_revision: error["current_revision"].as_u64(),
        })
    }

    pub async fn get(&self, path: &str) -> CliResult<Value> {
        let response = self.call(Method::GET, path, None).await?;
        self.finish(response).await
    }

    pub async fn send(&self, method: Method, path: &str, body: &Value) -> CliResult<Value> {
        let bytes = Bytes::from(
            serde_json::to_vec(body)
                .map_err(|error| CliError::other(format!("cannot encode the request: {error}")))?,
        );
        let length = bytes.len() as u64;
        let body = Full::new(bytes).map_err(|never| match never {}).boxed();
        let response = self
            .call(method, path, Some(("application/json", Some(length), body)))
            .await?;
        self.finish(response).await
    }

    /// Every item of a paged list.
    pub async fn get_all(&self, path: &str) -> CliResult<Vec<Value>> {
        let separator = if path.contains('?') { '&' } else { '?' };
        let mut items = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page_path = match &token {
                Some(token) => format!("{path}{separator}page_size=500&page_token={token}"),
                None => format!("{path}{separator}page_size=500"),
            };
            let page = self.get(&page_path).await?;
            if let Some(page_items) = page["items"].as_array() {
                items.extend(page_items.iter().cloned());
            }
            match page["next_page_token"].as_str() {
                Some(next) => token = Some(segment(next)),
                None => return Ok(items),
            }
        }
    }

    /// Whether an artifact is stored already.
    pub async fn has_artifact(&self, sha256: &str) -> CliResult<bool> {
        let response = self
            .call(Method::HEAD, &format!("/v1/artifacts/{sha256}"), None)
            .await?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            // A HEAD answer has no body: the refusal is told as a GET's.
            return self.finish(response).await.map(|_| false);
        }
        Ok(status.is_success())
    }

    /// Uploads a file as an artifact, streamed from disk.
    pub async fn put_artifact(&self, sha256: &str, path: &Path, size: u64) -> CliResult<Value> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|error| CliError::other(format!("cannot open {}: {error}", path.display())))?;
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 1024 * 1024)
            .map_ok(hyper::body::Frame::data);
        let body = StreamBody::new(stream).boxed();
        let response = self
            .call(
                Method::PUT,
                &format!("/v1/artifacts/{sha256}"),
                Some(("application/octet-stream", Some(size), body)),
            )
            .await?;
        self.finish(response).await
    }

    /// The current revision of a model's rollout (0 when it never had
    /// one).
    pub async fn rollout_revision(&self, model: &str) -> CliResult<u64> {
        match self
            .get(&format!("/v1/models/{}/rollout", segment(model)))
            .await
        {
            Ok(status) => Ok(status["rollout"]["revision"].as_u64().unwrap_or(0)),
            Err(error) if error.is_not_found() => Ok(0),
            Err(error) => Err(error),
        }
    }
}

/// The HTTP client: hyper over rustls (ring) for https with the system's
/// roots, plain http otherwise; a 10 s connect timeout.
fn http_client(https: bool) -> CliResult<HyperClient<HttpsConnector<HttpConnector>, RequestBody>> {
    let mut roots = rustls::RootCertStore::empty();
    if https {
        // Only read when needed: plain-http registries (shamal up) skip it.
        let native = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        if added == 0 {
            return Err(CliError::other(format!(
                "no CA certificates found to verify the registry's (set SSL_CERT_FILE): {:?}",
                native.errors
            )));
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| CliError::other(format!("TLS configuration: {error}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(HyperClient::builder(TokioExecutor::new()).build(connector))
}

/// Whether a token may travel to `base` without being sniffed: https, or
/// http to a loopback host.
fn is_secure_base(base: &str) -> bool {
    let Some(rest) = base.strip_prefix("http://") else {
        return true;
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The `error_description` of a `WWW-Authenticate: Bearer` challenge.
fn challenge_description(headers: &http::HeaderMap) -> Option<String> {
    let challenge = headers.get(WWW_AUTHENTICATE)?.to_str().ok()?;
    let start = challenge.find("error_description=\"")? + "error_description=\"".len();
    let rest = &challenge[start..];
    Some(rest[..rest.find('"')?].to_owned())
}

/// An error and its sources, `: `-separated (hyper's own message is terse).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_travel_in_the_clear_only_to_loopback() {
        assert!(is_secure_base("https://registry.example.com"));
        assert!(is_secure_base("http://127.0.0.1:8200"));
        assert!(is_secure_base("http://[::1]:8200/x"));
        assert!(is_secure_base("http://localhost:8200"));
        assert!(!is_secure_base("http://registry.example.com:8200"));
        assert!(!is_secure_base("http://10.0.0.1"));
    }

    #[test]
    fn reads_the_description_of_a_bearer_challenge() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(
                r#"Bearer realm="shamal", error="invalid_token", error_description="token expired""#,
            ),
        );
        assert_eq!(
            challenge_description(&headers).as_deref(),
            Some("token expired")
        );
        assert_eq!(challenge_description(&http::HeaderMap::new()), None);
    }
}
