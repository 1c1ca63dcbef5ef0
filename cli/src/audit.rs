//! `shamal audit`: the audit log (docs/audit.md). `export` streams a time
//! range into a JSON Lines file, `verify` checks such a file offline with
//! the checkpoint signing key that `public-key` fetches, `query` filters
//! records, `verify-log` asks the service to re-check its whole store.
//!
//! gRPC to the audit service (`--audit`, `SHAMAL_AUDIT_URL`): plain http,
//! or https over rustls on ring, trusting `--audit-ca` or the system's
//! roots. The bearer token is the registry commands' (`--token` /
//! `SHAMAL_TOKEN`, else the stored `shamal login`), sent as
//! `authorization: Bearer ...` metadata.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use http::{StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use shamal_audit::export::{Line, write_line};
use shamal_proto::shamal::audit::v1 as pb;
use shamal_proto::shamal::audit::v1::audit_service_client::AuditServiceClient;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::client::{CliError, CliResult, LOGIN_HINT, Output, RegistryOpts};
use crate::output::{Table, print_fields, print_json, time};

/// Exit code of `verify` and `verify-log` when the log or the file does
/// not verify (tampered, truncated, wrong key, ...). Failing to run the
/// check at all (an unreadable file or key, an unreachable service) exits
/// 1 like every other command.
pub const EXIT_NOT_VERIFIED: u8 = 7;

/// Largest gRPC message accepted (a Query page of records with large
/// before/after JSON).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Records a `query` prints by default.
const DEFAULT_LIMIT: u64 = 100;

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    #[command(flatten)]
    connection: AuditOpts,
    #[command(subcommand)]
    command: AuditCommand,
}

/// Where the audit service is.
#[derive(Clone, Debug, clap::Args)]
struct AuditOpts {
    /// The audit service's gRPC endpoint (http:// or https://).
    #[arg(
        long = "audit",
        global = true,
        help_heading = "Audit options",
        env = "SHAMAL_AUDIT_URL",
        default_value = "http://127.0.0.1:8301",
        value_name = "URL"
    )]
    url: String,
    /// CA certificates (PEM) to verify an https audit service with;
    /// default: the system's roots (`SSL_CERT_FILE` names another bundle).
    #[arg(
        long = "audit-ca",
        global = true,
        help_heading = "Audit options",
        env = "SHAMAL_AUDIT_CA",
        value_name = "FILE"
    )]
    ca: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum AuditCommand {
    /// Stream records, checkpoints and tombstones of a time range, with
    /// the signed seal, into a JSON Lines file (for `shamal audit verify`).
    Export(ExportArgs),
    /// Print (or write) the PEM of the key checkpoints and seals are
    /// signed with; its key id goes to stderr.
    PublicKey(PublicKeyArgs),
    /// Verify an exported file offline (no network): hash chain,
    /// checkpoint, tombstone and seal signatures. Exit 0 when it verifies,
    /// 7 naming the line and the first bad record when it does not.
    Verify(VerifyArgs),
    /// Records matching every given filter, oldest first (table or
    /// `--output json`).
    Query(QueryArgs),
    /// Ask the audit service to recompute its whole stored chain and check
    /// every checkpoint signature: prints ok, or exits 7 with the first
    /// bad sequence number.
    VerifyLog,
}

#[derive(Debug, clap::Args)]
struct ExportArgs {
    /// Records recorded at or after T: an RFC 3339 time
    /// (2026-01-31T12:00:00Z) or a duration ago (30m, 1h, 7d); default:
    /// the beginning.
    #[arg(long, value_name = "T", value_parser = parse_time_arg)]
    since: Option<i64>,
    /// Records recorded before T (same forms as --since); default: now.
    #[arg(long, value_name = "T", value_parser = parse_time_arg)]
    until: Option<i64>,
    /// The file to write (through a temporary file, renamed when complete).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Debug, clap::Args)]
struct PublicKeyArgs {
    /// Write the PEM to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct VerifyArgs {
    /// The exported file (`shamal audit export --out FILE`).
    file: PathBuf,
    /// The audit service's public key: PEM (`shamal audit public-key`) or
    /// 64 hex characters.
    #[arg(long, value_name = "KEYFILE")]
    public_key: PathBuf,
}

#[derive(Debug, clap::Args)]
struct QueryArgs {
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    version: Option<String>,
    /// Who: a token subject, a service identity, "anonymous".
    #[arg(long)]
    actor: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
    /// "inference", "model.create", "rollout.shift", ...
    #[arg(long)]
    action: Option<String>,
    /// "ok", "permission_denied", "unavailable", ...
    #[arg(long)]
    outcome: Option<String>,
    /// Where the request was processed.
    #[arg(long)]
    region: Option<String>,
    /// Events that happened at or after T: RFC 3339 or a duration ago
    /// (30m, 1h, 7d).
    #[arg(long, value_name = "T", value_parser = parse_time_arg)]
    since: Option<i64>,
    /// Events that happened before T (same forms as --since).
    #[arg(long, value_name = "T", value_parser = parse_time_arg)]
    until: Option<i64>,
    /// Print at most N records (0: all).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LIMIT)]
    limit: u64,
}

pub async fn run(args: AuditArgs, opts: &RegistryOpts) -> ExitCode {
    let result = match args.command {
        AuditCommand::Verify(verify_args) => return verify(&verify_args),
        AuditCommand::VerifyLog => verify_log(&args.connection, opts).await,
        AuditCommand::Export(export_args) => export(&args.connection, opts, &export_args).await,
        AuditCommand::PublicKey(key_args) => public_key(&args.connection, &key_args).await,
        AuditCommand::Query(query_args) => query(&args.connection, opts, &query_args).await,
    };
    match result {
        Ok(code) => code,
        Err(error) => error.report(),
    }
}

// ---------------------------------------------------------------- commands

async fn export(
    connection: &AuditOpts,
    opts: &RegistryOpts,
    args: &ExportArgs,
) -> CliResult<ExitCode> {
    let mut client = AuditClient::connect(connection, Some(opts)).await?;
    let request = pb::ExportRequest {
        since_ms: args.since.unwrap_or(0),
        until_ms: args.until.unwrap_or(0),
    };
    let mut stream = client
        .inner
        .export(client.request(request)?)
        .await
        .map_err(|status| client.status_error(status))?
        .into_inner();
    let temp = temp_path(&args.out);
    let file = File::create(&temp)
        .map_err(|error| CliError::other(format!("cannot create {}: {error}", temp.display())))?;
    let mut writer = BufWriter::new(file);
    let mut counts = Counts::default();
    let written: CliResult<()> = async {
        while let Some(item) = stream
            .message()
            .await
            .map_err(|status| client.status_error(status))?
        {
            let line = Line::try_from(item).map_err(|error| {
                CliError::other(format!("the audit service sent a malformed item: {error}"))
            })?;
            counts.add(&line);
            write_line(&mut writer, &line).map_err(|error| {
                CliError::other(format!("cannot write {}: {error}", temp.display()))
            })?;
        }
        if counts.seal.is_none() {
            return Err(CliError::other(
                "the export ended without its seal (cut short); nothing written",
            ));
        }
        writer
            .flush()
            .and_then(|()| writer.get_ref().sync_all())
            .map_err(|error| CliError::other(format!("cannot write {}: {error}", temp.display())))
    }
    .await;
    drop(writer);
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(error);
    }
    std::fs::rename(&temp, &args.out).map_err(|error| {
        let _ = std::fs::remove_file(&temp);
        CliError::other(format!(
            "cannot rename {} to {}: {error}",
            temp.display(),
            args.out.display()
        ))
    })?;
    let seq_range = match (counts.first_seq, counts.last_seq) {
        (Some(first), Some(last)) => format!(" (seq {first}..={last})"),
        _ => String::new(),
    };
    println!(
        "exported {} records{seq_range}, {} checkpoints, {} tombstones to {}",
        counts.records,
        counts.checkpoints,
        counts.tombstones,
        args.out.display()
    );
    if let Some(key_id) = &counts.seal {
        println!(
            "sealed with key {key_id}; check it with `shamal audit verify {} --public-key KEYFILE`",
            args.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Default)]
struct Counts {
    records: u64,
    checkpoints: u64,
    tombstones: u64,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
    /// The seal's key id, once seen.
    seal: Option<String>,
}

impl Counts {
    fn add(&mut self, line: &Line) {
        match line {
            Line::Record(record) => {
                self.records += 1;
                self.first_seq.get_or_insert(record.seq);
                self.last_seq = Some(record.seq);
            }
            Line::Checkpoint(_) => self.checkpoints += 1,
            Line::Tombstone(_) => self.tombstones += 1,
            Line::Seal(seal) => self.seal = Some(seal.key_id.clone()),
        }
    }
}

/// `.<name>.partial` beside `out`.
fn temp_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "audit-export".to_owned());
    out.with_file_name(format!(".{name}.partial"))
}

async fn public_key(connection: &AuditOpts, args: &PublicKeyArgs) -> CliResult<ExitCode> {
    // Public: no token (an expired stored login must not get in the way).
    let mut client = AuditClient::connect(connection, None).await?;
    let answer = client
        .inner
        .public_key(client.request(pb::PublicKeyRequest {})?)
        .await
        .map_err(|status| client.status_error(status))?
        .into_inner();
    if answer.pem.trim().is_empty() {
        return Err(CliError::other("the audit service sent no public key PEM"));
    }
    match &args.out {
        Some(path) => {
            std::fs::write(path, answer.pem.as_bytes()).map_err(|error| {
                CliError::other(format!("cannot write {}: {error}", path.display()))
            })?;
            eprintln!("key id {} written to {}", answer.key_id, path.display());
        }
        None => {
            print!("{}", answer.pem);
            eprintln!("key id {}", answer.key_id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Offline: reads the file and the key, nothing else.
fn verify(args: &VerifyArgs) -> ExitCode {
    let key = match shamal_audit::load_public_key(&args.public_key) {
        Ok(key) => key,
        Err(error) => return CliError::other(error.to_string()).report(),
    };
    let file = match File::open(&args.file) {
        Ok(file) => file,
        Err(error) => {
            return CliError::other(format!("cannot open {}: {error}", args.file.display()))
                .report();
        }
    };
    match shamal_audit::verify_export(BufReader::new(file), &key) {
        Ok(report) => {
            let bound = |ms: i64, open: &str| {
                if ms == 0 {
                    open.to_owned()
                } else {
                    format!("{} UTC", time(&json!(ms)))
                }
            };
            let seq_range = if report.last_seq == 0 {
                "none".to_owned()
            } else {
                format!("{}..={}", report.first_seq, report.last_seq)
            };
            println!("{}: verified", args.file.display());
            print_fields(&[
                ("records", report.records.to_string()),
                ("checkpoints", report.checkpoints.to_string()),
                (
                    "tombstones",
                    format!("{} ({} records removed)", report.tombstones, report.removed),
                ),
                ("seq range", seq_range),
                (
                    "time range",
                    format!(
                        "{} to {} (recorded_at, as sealed)",
                        bound(report.since_ms, "beginning"),
                        bound(report.until_ms, "export time")
                    ),
                ),
                ("sealed at", bound(report.sealed_at_ms, "-")),
                ("last hash", report.last_hash.to_hex()),
                ("key id", report.key_id),
            ]);
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("shamal: {} does NOT verify: {failure}", args.file.display());
            if let Some(seq) = failure.seq {
                eprintln!("shamal: first bad record: seq {seq}");
            }
            ExitCode::from(EXIT_NOT_VERIFIED)
        }
    }
}

async fn verify_log(connection: &AuditOpts, opts: &RegistryOpts) -> CliResult<ExitCode> {
    let mut client = AuditClient::connect(connection, Some(opts)).await?;
    let answer = client
        .inner
        .verify(client.request(pb::VerifyRequest {})?)
        .await
        .map_err(|status| client.status_error(status))?
        .into_inner();
    if answer.ok {
        println!(
            "ok: {} records and {} checkpoints verified",
            answer.records_checked, answer.checkpoints_checked
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "shamal: the audit log does NOT verify: first bad seq {}: {} ({} records and {} checkpoints checked)",
            answer.first_bad_seq, answer.reason, answer.records_checked, answer.checkpoints_checked
        );
        Ok(ExitCode::from(EXIT_NOT_VERIFIED))
    }
}

async fn query(
    connection: &AuditOpts,
    opts: &RegistryOpts,
    args: &QueryArgs,
) -> CliResult<ExitCode> {
    let mut client = AuditClient::connect(connection, Some(opts)).await?;
    let filter = |value: &Option<String>| value.clone().unwrap_or_default();
    let (records, more) = collect_pages(args.limit, async |page_size, page_token| {
        let request = pb::QueryRequest {
            actor: actor_filter(&args.actor),
            tenant: filter(&args.tenant),
            model: filter(&args.model),
            version: filter(&args.version),
            action: filter(&args.action),
            outcome: filter(&args.outcome),
            region: filter(&args.region),
            since_ms: args.since.unwrap_or(0),
            until_ms: args.until.unwrap_or(0),
            page_size,
            page_token,
        };
        let page = client
            .inner
            .query(client.request(request)?)
            .await
            .map_err(|status| client.status_error(status))?
            .into_inner();
        Ok((page.records, page.next_page_token))
    })
    .await?;
    if opts.output == Output::Json {
        let mut items = Vec::with_capacity(records.len());
        for record in records {
            let record = shamal_audit::Record::try_from(record).map_err(|error| {
                CliError::other(format!(
                    "the audit service sent a malformed record: {error}"
                ))
            })?;
            items
                .push(serde_json::to_value(&record).map_err(|error| {
                    CliError::other(format!("cannot encode a record: {error}"))
                })?);
        }
        print_json(&json!({ "records": items, "more": more }));
        return Ok(ExitCode::SUCCESS);
    }
    if records.is_empty() {
        println!("no matching records");
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&[
        "seq",
        "time (utc)",
        "service",
        "action",
        "outcome",
        "actor",
        "tenant",
        "model",
        "version",
        "region",
        "latency",
    ]);
    for record in &records {
        table.row(row(record));
    }
    table.print();
    if more {
        eprintln!(
            "shamal: more records match: showing the first {} (--limit N, 0 for all)",
            records.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The `--actor` filter. That flag is also the registry commands' global
/// `--actor`, which `SHAMAL_ACTOR` sets: clap merges the two by name, so
/// the value counts as a filter only when `--actor` is on the command line.
fn actor_filter(value: &Option<String>) -> String {
    let given = std::env::args_os().any(|arg| {
        let arg = arg.to_string_lossy();
        arg == "--actor" || arg.starts_with("--actor=")
    });
    value.clone().filter(|_| given).unwrap_or_default()
}

fn row(record: &pb::AuditRecord) -> Vec<String> {
    let event = record.event.clone().unwrap_or_default();
    vec![
        record.seq.to_string(),
        time(&Value::from(event.occurred_at_ms)),
        event.service,
        event.action,
        event.outcome,
        event.actor,
        event.tenant,
        event.model,
        event.version,
        event.region,
        latency(event.latency_us),
    ]
}

/// `850us`, `12.3ms`, `1.52s`; empty when 0 (mutations).
fn latency(us: u64) -> String {
    match us {
        0 => String::new(),
        1..=999 => format!("{us}us"),
        1_000..=999_999 => format!("{:.1}ms", us as f64 / 1_000.0),
        _ => format!("{:.2}s", us as f64 / 1_000_000.0),
    }
}

// ------------------------------------------------------------------ client

struct AuditClient {
    inner: AuditServiceClient<Channel>,
    url: String,
    token: Option<String>,
}

impl AuditClient {
    /// Connects now (a clear error when unreachable); with `opts`, sends
    /// the bearer token the registry commands would.
    async fn connect(
        connection: &AuditOpts,
        opts: Option<&RegistryOpts>,
    ) -> CliResult<AuditClient> {
        let url = connection.url.trim().trim_end_matches('/').to_owned();
        let https = url.starts_with("https://");
        if !https && !url.starts_with("http://") {
            return Err(CliError::Usage(format!(
                "--audit must be an http:// or https:// URL, not '{url}'"
            )));
        }
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|error| CliError::Usage(format!("--audit '{url}': {error}")))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true);
        let connected = if https {
            let tls = tls_config(connection.ca.as_deref(), "--audit-ca", "audit service")?;
            endpoint.connect_with_connector(connector(tls)).await
        } else {
            endpoint.connect().await
        };
        let channel = connected.map_err(|error| {
            CliError::other(format!(
                "cannot reach the audit service at {url}: {}",
                error_chain(&error)
            ))
        })?;
        let token = match opts {
            Some(opts) => bearer(opts, &url).await?,
            None => None,
        };
        Ok(AuditClient {
            inner: AuditServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            url,
            token,
        })
    }

    /// `message` with the bearer token, when there is one.
    fn request<T>(&self, message: T) -> CliResult<tonic::Request<T>> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            let mut value: MetadataValue<_> = format!("Bearer {token}").parse().map_err(|_| {
                CliError::Unauthenticated(
                    "the token has characters a header cannot carry".to_owned(),
                )
            })?;
            value.set_sensitive(true);
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }

    /// A refusal or failure, with the exit code of the registry commands'
    /// equivalent.
    fn status_error(&self, status: tonic::Status) -> CliError {
        let message = status.message().to_owned();
        let api = |http: StatusCode, code: &str, message: String| CliError::Api {
            status: http,
            code: code.to_owned(),
            message,
            field: None,
            current_revision: None,
        };
        match status.code() {
            Code::Unauthenticated => CliError::Unauthenticated(format!(
                "{LOGIN_HINT} (the audit service said: {message})"
            )),
            Code::PermissionDenied => api(
                StatusCode::FORBIDDEN,
                "permission_denied",
                format!("{message} (reading the audit log needs audit:read: the admin role)"),
            ),
            Code::NotFound => api(StatusCode::NOT_FOUND, "not_found", message),
            Code::InvalidArgument => api(StatusCode::BAD_REQUEST, "invalid_argument", message),
            Code::Unavailable => CliError::other(format!(
                "the audit service at {} is unavailable: {message}",
                self.url
            )),
            code => CliError::other(format!(
                "the audit service at {} answered {code:?}: {message}",
                self.url
            )),
        }
    }
}

/// `--token` / `SHAMAL_TOKEN`, else the stored login (refreshed), like the
/// registry commands; warns when it would travel over plain http to
/// another host than loopback.
pub(crate) async fn bearer(opts: &RegistryOpts, url: &str) -> CliResult<Option<String>> {
    let explicit = opts
        .token
        .as_deref()
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .map(str::to_owned);
    let token = match explicit {
        Some(token) => Some(token),
        None => crate::login::stored_access_token().await?,
    };
    if token.is_some() && !is_secure(url) {
        eprintln!("shamal: warning: sending a bearer token to {url} over plain http");
    }
    Ok(token)
}

/// https, or http to a loopback host.
fn is_secure(url: &str) -> bool {
    let Ok(uri) = url.parse::<Uri>() else {
        return false;
    };
    if uri.scheme_str() == Some("https") {
        return true;
    }
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Pages through a listing RPC: `fetch(page_size, page_token)` returns a
/// page and the next token (empty at the end). At most `limit` items (0:
/// all), and whether more were left.
pub(crate) async fn collect_pages<T>(
    limit: u64,
    mut fetch: impl AsyncFnMut(u32, String) -> CliResult<(Vec<T>, String)>,
) -> CliResult<(Vec<T>, bool)> {
    let mut items = Vec::new();
    let mut page_token = String::new();
    let mut more = false;
    loop {
        let wanted = if limit == 0 {
            1000
        } else {
            (limit - items.len() as u64).min(1000)
        };
        let (page, next) = fetch(u32::try_from(wanted).unwrap_or(1000), page_token).await?;
        items.extend(page);
        if next.is_empty() {
            break;
        }
        if limit != 0 && items.len() as u64 >= limit {
            more = true;
            break;
        }
        page_token = next;
    }
    if limit != 0 && items.len() as u64 > limit {
        items.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        more = true;
    }
    Ok((items, more))
}

/// rustls on ring, ALPN h2, trusting `ca` or the system's roots: the TLS
/// of a gRPC service's client (`ca_flag` names the flag that gave `ca`,
/// `service` the server, in errors). The batch commands share it.
pub(crate) fn tls_config(
    ca: Option<&Path>,
    ca_flag: &str,
    service: &str,
) -> CliResult<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|error| {
                    CliError::other(format!("{ca_flag} {}: {error}", path.display()))
                })?;
            let (added, _ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(CliError::other(format!(
                    "{ca_flag} {}: no CA certificate in it",
                    path.display()
                )));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(CliError::other(format!(
                    "no CA certificates found to verify the {service}'s (pass {ca_flag} or set SSL_CERT_FILE): {:?}",
                    native.errors
                )));
            }
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| CliError::other(format!("TLS configuration: {error}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// TCP, then the TLS handshake with the URI's host as the server name.
pub(crate) fn connector(
    tls: Arc<rustls::ClientConfig>,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Send
+ 'static {
    let connector = tokio_rustls::TlsConnector::from(tls);
    tower::service_fn(move |uri: Uri| {
        let connector = connector.clone();
        async move {
            let invalid =
                |message: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, message);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("{uri} has no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let name = ServerName::try_from(host.clone())
                .map_err(|error| invalid(format!("{host} is not a server name: {error}")))?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(connector.connect(name, tcp).await?))
        }
    })
}

/// An error and its sources, `: `-separated (tonic's own message is terse).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

// -------------------------------------------------------------------- time

/// clap's parser of `--since` / `--until`: Unix milliseconds.
fn parse_time_arg(text: &str) -> Result<i64, String> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    parse_time(text, now_ms).map_err(|why| {
        format!(
            "{why}; expected an RFC 3339 time (2026-01-31T12:00:00Z, 2026-01-31T13:00:00+01:00), a date (2026-01-31, midnight UTC) or a duration ago (90s, 30m, 1h, 7d, 2w)"
        )
    })
}

/// RFC 3339, a bare date (midnight UTC) or `<n><s|m|h|d|w>` before `now_ms`.
fn parse_time(text: &str, now_ms: i64) -> Result<i64, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty".to_owned());
    }
    if let Some(unit) = text.chars().last().filter(char::is_ascii_alphabetic)
        && text[..text.len() - 1].chars().all(|c| c.is_ascii_digit())
        && text.len() > 1
    {
        let amount: i64 = text[..text.len() - 1]
            .parse()
            .map_err(|_| format!("'{text}' is too large"))?;
        let unit_ms: i64 = match unit {
            's' => 1_000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            'w' => 7 * 86_400_000,
            other => return Err(format!("'{other}' is not a unit (s, m, h, d, w)")),
        };
        let ago = amount
            .checked_mul(unit_ms)
            .ok_or_else(|| format!("'{text}' is too large"))?;
        return Ok(now_ms.saturating_sub(ago).max(1));
    }
    parse_rfc3339(text).ok_or_else(|| format!("'{text}' is not a time"))
}

fn parse_rfc3339(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = text.get(range)?;
        digits
            .chars()
            .all(|c| c.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    if bytes.len() < 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    if bytes.len() == 10 {
        return Some(days * 86_400_000);
    }
    if bytes.len() < 20 || !matches!(bytes[10], b'T' | b't' | b' ') {
        return None;
    }
    if bytes[13] != b':' || bytes[16] != b':' {
        return None;
    }
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<3}", &fraction[..digits.min(3)]);
        millis = padded.parse::<i64>().ok()?;
        rest = &fraction[digits..];
    }
    let offset_s = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let offset = rest.get(1..)?;
            if offset.len() != 5 || offset.as_bytes()[2] != b':' {
                return None;
            }
            let hours: i64 = offset.get(0..2)?.parse().ok()?;
            let minutes: i64 = offset.get(3..5)?.parse().ok()?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            sign * (hours * 3600 + minutes * 60)
        }
    };
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset_s;
    Some(seconds * 1000 + millis)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 (Howard Hinnant's days_from_civil).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn times_are_rfc3339_dates_or_durations_ago() {
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z", NOW),
            Ok(1_700_000_000_000)
        );
        assert_eq!(
            parse_time("2023-11-14T22:13:20.123Z", NOW),
            Ok(1_700_000_000_123)
        );
        assert_eq!(
            parse_time("2023-11-14T23:13:20.5+01:00", NOW),
            Ok(1_700_000_000_500)
        );
        assert_eq!(
            parse_time("2023-11-14t21:13:20-01:00", NOW),
            Ok(1_700_000_000_000)
        );
        assert_eq!(parse_time("2000-02-29", NOW), Ok(951_782_400_000));
        assert_eq!(parse_time("1970-01-01T00:00:00Z", NOW), Ok(0));
        assert_eq!(parse_time("30m", NOW), Ok(NOW - 1_800_000));
        assert_eq!(parse_time("1h", NOW), Ok(NOW - 3_600_000));
        assert_eq!(parse_time("7d", NOW), Ok(NOW - 7 * 86_400_000));
        assert_eq!(parse_time("90s", NOW), Ok(NOW - 90_000));
        for bad in [
            "",
            "yesterday",
            "1y",
            "h",
            "2023-02-29",
            "2023-13-01",
            "2023-11-14T25:00:00Z",
            "2023-11-14T22:13:20",
            "2023-11-14T22:13:20+0100",
            "99999999999999999999d",
        ] {
            assert!(parse_time(bad, NOW).is_err(), "{bad}");
        }
    }

    #[test]
    fn latencies_read_well() {
        assert_eq!(latency(0), "");
        assert_eq!(latency(850), "850us");
        assert_eq!(latency(12_345), "12.3ms");
        assert_eq!(latency(1_520_000), "1.52s");
    }

    #[test]
    fn tokens_travel_in_the_clear_only_to_loopback() {
        assert!(is_secure("https://audit.example.com"));
        assert!(is_secure("http://127.0.0.1:8301"));
        assert!(is_secure("http://[::1]:8301"));
        assert!(is_secure("http://localhost:8301"));
        assert!(!is_secure("http://audit.example.com:8301"));
    }
}
