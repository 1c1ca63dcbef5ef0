//! A small client of the registry's REST API (`/v1`), and the errors and
//! exit codes the registry commands share.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Flags every registry command takes (`--registry`, `--actor`, `--output`).
#[derive(Clone, Debug, clap::Args)]
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
    /// Who the change is recorded as (default: $USER).
    #[arg(
        long,
        global = true,
        help_heading = "Registry options",
        env = "SHAMAL_ACTOR",
        value_name = "NAME"
    )]
    pub actor: Option<String>,
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
}

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
                if *status == StatusCode::CONFLICT && current_revision.is_some() {
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

pub struct Client {
    base: String,
    actor: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(opts: &RegistryOpts) -> CliResult<Client> {
        let base = opts.registry.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") {
            return Err(CliError::Usage(format!(
                "--registry must be an http:// URL, not '{base}'"
            )));
        }
        let actor = opts
            .actor
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .filter(|actor| !actor.trim().is_empty())
            .unwrap_or_else(|| "anonymous".to_owned());
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|error| CliError::other(format!("cannot build the HTTP client: {error}")))?;
        Ok(Client { base, actor, http })
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header("x-shamal-actor", &self.actor)
    }

    async fn finish(&self, request: reqwest::RequestBuilder) -> CliResult<Value> {
        let response = request.send().await.map_err(|error| {
            CliError::other(format!(
                "cannot reach the registry at {}: {error}",
                self.base
            ))
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|error| CliError::other(format!("reading the registry's answer: {error}")))?;
        let body: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).map_err(|_| {
                CliError::other(format!(
                    "the registry answered {status} with a body that is not JSON: {}",
                    text.chars().take(200).collect::<String>()
                ))
            })?
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
                .map_or_else(|| status.to_string(), str::to_owned),
            field: error["field"].as_str().map(str::to_owned),
            current_revision: error["current_revision"].as_u64(),
        })
    }

    pub async fn get(&self, path: &str) -> CliResult<Value> {
        self.finish(self.request(Method::GET, path)).await
    }

    pub async fn send(&self, method: Method, path: &str, body: &Value) -> CliResult<Value> {
        self.finish(self.request(method, path).json(body)).await
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
            .request(Method::HEAD, &format!("/v1/artifacts/{sha256}"))
            .send()
            .await
            .map_err(|error| {
                CliError::other(format!(
                    "cannot reach the registry at {}: {error}",
                    self.base
                ))
            })?;
        Ok(response.status().is_success())
    }

    /// Uploads a file as an artifact, streamed from disk.
    pub async fn put_artifact(&self, sha256: &str, path: &Path, size: u64) -> CliResult<Value> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|error| CliError::other(format!("cannot open {}: {error}", path.display())))?;
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 1024 * 1024);
        let request = self
            .request(Method::PUT, &format!("/v1/artifacts/{sha256}"))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(reqwest::Body::wrap_stream(stream));
        self.finish(request).await
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
