//! `shamal batch`: batch inference jobs on the batch coordinator
//! (docs/batch.md). `submit` checks and queues a job (and with `--wait`
//! follows it to its end), `status` shows one (`--follow`: until it ends),
//! `list` the newest, `cancel` stops one. `decrypt` reads an encrypted
//! job output back into plain Parquet (locally, under a key ring; no
//! coordinator involved).
//!
//! gRPC to the coordinator (`--batch-endpoint`, `SHAMAL_BATCH_ENDPOINT`,
//! default `shamal up`'s): plain http, or https over rustls on ring,
//! trusting `--batch-ca` or the system's roots. The bearer token is the
//! other commands' (`--token` / `SHAMAL_TOKEN`, else the stored `shamal
//! login`).
//!
//! Progress (`submit --wait`, `status --follow`) comes from the WatchJob
//! stream, or from polling GetJob once a second when the stream is not
//! available: on a terminal one line redrawn in place (a bar, rows done
//! of the total, rows/s, ETA); otherwise plain lines, one per change and
//! at most about one a second. It goes to stdout, or to stderr with
//! `--output json` (stdout then holds only the final JSON).

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{Value, json};
use shamal_proto::shamal::batch::v1 as pb;
use shamal_proto::shamal::batch::v1::batch_service_client::BatchServiceClient;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::audit::{bearer, connector, error_chain};
use crate::client::{CliError, CliResult, LOGIN_HINT, Output, RegistryOpts};
use crate::output::{Table, print_fields, print_json, time};

/// Exit code of `submit --wait` and `status --follow` when the job
/// failed (its message on stderr).
pub const EXIT_JOB_FAILED: u8 = 8;
/// Exit code of `submit --wait` and `status --follow` when the job was
/// cancelled.
pub const EXIT_JOB_CANCELLED: u8 = 9;

/// Largest gRPC message accepted.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Jobs `list` prints by default.
const DEFAULT_LIMIT: u64 = 100;

/// How often GetJob is asked when the Watch stream is not available, and
/// the least time between two plain progress lines.
const TICK: Duration = Duration::from_secs(1);

/// How long polling goes on while the coordinator is unreachable.
const UNREACHABLE_FOR: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct BatchArgs {
    #[command(flatten)]
    connection: BatchOpts,
    #[command(subcommand)]
    command: BatchCommand,
}

/// Where the batch coordinator is.
#[derive(Clone, Debug, clap::Args)]
struct BatchOpts {
    /// The batch coordinator's gRPC endpoint (http:// or https://; a bare
    /// HOST:PORT is http).
    #[arg(
        long = "batch-endpoint",
        global = true,
        help_heading = "Batch options",
        env = "SHAMAL_BATCH_ENDPOINT",
        default_value = "http://127.0.0.1:8401",
        value_name = "URL"
    )]
    endpoint: String,
    /// CA certificates (PEM) to verify an https coordinator with (for
    /// `shamal up --tls`: <data-dir>/certs/ca.pem); default: the system's
    /// roots (`SSL_CERT_FILE` names another bundle).
    #[arg(
        long = "batch-ca",
        global = true,
        help_heading = "Batch options",
        env = "SHAMAL_BATCH_CA",
        value_name = "FILE"
    )]
    ca: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum BatchCommand {
    /// Check a job (model, dataset columns, regions) and queue it; with
    /// --wait, follow it to its end (exit 0 when it succeeded, 8 failed,
    /// 9 cancelled).
    Submit(Box<SubmitArgs>),
    /// A job's state and progress; with --follow, until it ends.
    Status(StatusArgs),
    /// Jobs, newest first.
    List(ListArgs),
    /// Cancel a queued or running job (a finished one is refused).
    Cancel(CancelArgs),
    /// Decrypt an encrypted job output (`submit --encrypt`) into plain
    /// Parquet parts and a plain manifest, under the batch key ring.
    Decrypt(DecryptArgs),
}

#[derive(Debug, clap::Args)]
struct SubmitArgs {
    /// The model, as the registry names it (with `shamal up`, also a model
    /// of the served repository such as `demo`).
    #[arg(long)]
    model: String,
    /// The version to score with; default: the newest ready one.
    #[arg(long, conflicts_with = "alias")]
    version: Option<u64>,
    /// An alias of the model (`prod`), resolved at submit.
    #[arg(long)]
    alias: Option<String>,
    /// The dataset: a file or a directory of files of one format
    /// (Parquet, JSON Lines, CSV), or an object-store URL (s3://...).
    /// Local paths are made absolute before they are sent.
    #[arg(long, value_name = "PATH")]
    input: String,
    /// The input's format when the file names do not say it.
    #[arg(long, value_name = "FORMAT", value_parser = ["parquet", "jsonl", "csv"])]
    input_format: Option<String>,
    /// Where the output Parquet parts and the manifest go: an empty or
    /// absent directory, or an object-store URL. (`--out`, since
    /// `--output` chooses table or JSON for every command.)
    #[arg(long = "out", visible_alias = "output-dir", value_name = "DIR")]
    out: String,
    /// A column copied to the output before the model's outputs (repeat
    /// for several, in order).
    #[arg(long = "key", value_name = "COL")]
    keys: Vec<String>,
    /// A region the job's data may be processed in (repeat for several);
    /// default: the model's, else any.
    #[arg(long = "region", value_name = "R")]
    regions: Vec<String>,
    /// 0 (lowest) to 9 (highest).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=9))]
    priority: u32,
    /// Encrypt the output parts at rest.
    #[arg(long)]
    encrypt: bool,
    /// Rows per shard, approximately (default: the coordinator's).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    rows_per_shard: Option<u64>,
    /// Read a model input from a column named otherwise (repeat for
    /// several inputs).
    #[arg(long = "input-column", value_name = "INPUT=COL", value_parser = parse_mapping)]
    input_columns: Vec<(String, String)>,
    /// The tenant (with auth on, the token's; naming another is refused).
    #[arg(long)]
    tenant: Option<String>,
    /// Idempotency key: submitting again with the same one returns the
    /// first job instead of starting another.
    #[arg(long, value_name = "ID")]
    request_id: Option<String>,
    /// Follow the job until it ends, showing its progress; exit 0 only
    /// when it succeeded.
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// The job's id (`job-...`).
    id: String,
    /// Follow the job until it ends, showing its progress; exit 0 only
    /// when it succeeded.
    #[arg(long)]
    follow: bool,
}

#[derive(Debug, clap::Args)]
struct ListArgs {
    /// Only jobs in this state.
    #[arg(long, value_name = "STATE", value_parser = parse_state)]
    state: Option<pb::JobState>,
    /// Only jobs of this model.
    #[arg(long)]
    model: Option<String>,
    /// Print at most N jobs (0: all).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LIMIT)]
    limit: u64,
}

#[derive(Debug, clap::Args)]
struct CancelArgs {
    /// The job's id (`job-...`).
    id: String,
}

#[derive(Debug, clap::Args)]
struct DecryptArgs {
    /// The job's output: its directory or object-store URL (what `submit
    /// --out` named), with its `_manifest.json`.
    #[arg(value_name = "JOB_OUTPUT")]
    source: String,
    /// Where the plain parts and manifest go: an empty or absent
    /// directory, or an object-store URL.
    #[arg(long = "out", value_name = "DIR")]
    out: String,
    /// The key file of the batch outputs (the workers' `[batch] key_file`:
    /// TOML or JSON, mode 0600).
    #[arg(long, value_name = "FILE", env = KEY_FILE_ENV)]
    key_file: Option<PathBuf>,
}

/// The environment variable `decrypt` reads the key file's path from.
const KEY_FILE_ENV: &str = "SHAMAL_BATCH_KEY_FILE";

/// `INPUT=COL`.
fn parse_mapping(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((input, column)) if !input.trim().is_empty() && !column.trim().is_empty() => {
            Ok((input.trim().to_owned(), column.trim().to_owned()))
        }
        _ => Err(format!(
            "'{text}' is not INPUT=COLUMN (the model input, then the dataset column it is read from)"
        )),
    }
}

/// A state's name, any case.
fn parse_state(text: &str) -> Result<pb::JobState, String> {
    let upper = text.trim().to_ascii_uppercase();
    pb::JobState::from_str_name(&format!("JOB_STATE_{upper}"))
        .filter(|state| *state != pb::JobState::Unspecified)
        .ok_or_else(|| {
            format!("'{text}' is not a state: queued, running, succeeded, failed or cancelled")
        })
}

pub async fn run(args: BatchArgs, opts: &RegistryOpts) -> ExitCode {
    let result = async {
        let connect = || BatchClient::connect(&args.connection, opts);
        match args.command {
            BatchCommand::Submit(submit_args) => {
                submit(&mut connect().await?, opts, *submit_args).await
            }
            BatchCommand::Status(status_args) => {
                status(&mut connect().await?, opts, &status_args).await
            }
            BatchCommand::List(list_args) => list(&mut connect().await?, opts, &list_args).await,
            BatchCommand::Cancel(cancel_args) => {
                cancel(&mut connect().await?, opts, &cancel_args).await
            }
            // Decrypting reads and writes the outputs only: no coordinator.
            BatchCommand::Decrypt(decrypt_args) => decrypt(opts, &decrypt_args).await,
        }
    }
    .await;
    match result {
        Ok(code) => code,
        Err(error) => error.report(),
    }
}

// ---------------------------------------------------------------- commands

async fn submit(
    client: &mut BatchClient,
    opts: &RegistryOpts,
    args: SubmitArgs,
) -> CliResult<ExitCode> {
    let spec = pb::JobSpec {
        model: args.model,
        version: args.version.unwrap_or(0),
        alias: args.alias.unwrap_or_default(),
        input: absolute(&args.input, "--input")?,
        input_format: args.input_format.unwrap_or_default(),
        output: absolute(&args.out, "--out")?,
        key_columns: args.keys,
        regions: args.regions,
        priority: args.priority,
        tenant: args.tenant.unwrap_or_default(),
        encrypt: args.encrypt,
        rows_per_shard: args.rows_per_shard.unwrap_or(0),
        input_columns: args.input_columns.into_iter().collect(),
    };
    let request = pb::SubmitJobRequest {
        spec: Some(spec),
        request_id: args.request_id.unwrap_or_default(),
    };
    let job = client
        .inner
        .submit_job(client.request(request)?)
        .await
        .map_err(|status| client.status_error(status))?
        .into_inner();
    if !args.wait {
        if opts.output == Output::Json {
            print_json(&job_json(&job));
        } else {
            println!("submitted {}", job.id);
            print_job(&job);
            println!("follow it with `shamal batch status {} --follow`", job.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let json = opts.output == Output::Json;
    if json {
        eprintln!("submitted {}", job.id);
    } else {
        println!("submitted {}", job.id);
    }
    let job = follow(client, job, json).await?;
    Ok(finish(&job, json))
}

async fn status(
    client: &mut BatchClient,
    opts: &RegistryOpts,
    args: &StatusArgs,
) -> CliResult<ExitCode> {
    let job = client.get(&args.id).await?;
    let json = opts.output == Output::Json;
    if !args.follow {
        if json {
            print_json(&job_json(&job));
        } else {
            print_job(&job);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let job = follow(client, job, json).await?;
    Ok(finish(&job, json))
}

async fn list(
    client: &mut BatchClient,
    opts: &RegistryOpts,
    args: &ListArgs,
) -> CliResult<ExitCode> {
    let (jobs, more) = crate::audit::collect_pages(args.limit, async |page_size, page_token| {
        let request = pb::ListJobsRequest {
            page_size,
            page_token,
            state: args.state.unwrap_or(pb::JobState::Unspecified) as i32,
            model: args.model.clone().unwrap_or_default(),
        };
        let page = client
            .inner
            .list_jobs(client.request(request)?)
            .await
            .map_err(|status| client.status_error(status))?
            .into_inner();
        Ok((page.jobs, page.next_page_token))
    })
    .await?;
    if opts.output == Output::Json {
        print_json(&json!({
            "jobs": jobs.iter().map(job_json).collect::<Vec<_>>(),
            "more": more,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    if jobs.is_empty() {
        println!("no jobs");
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&[
        "id",
        "state",
        "model",
        "version",
        "rows",
        "shards",
        "created (utc)",
        "actor",
    ]);
    for job in &jobs {
        let spec = job.spec.clone().unwrap_or_default();
        table.row(vec![
            job.id.clone(),
            state_name(job.state).to_owned(),
            spec.model,
            job.version.to_string(),
            format!("{}/{}", thousands(job.done_rows), rows_total(job)),
            format!("{}/{}", job.shards_done, job.shards_total),
            time(&Value::from(job.created_at_ms)),
            job.actor.clone(),
        ]);
    }
    table.print();
    if more {
        eprintln!(
            "shamal: more jobs match: showing the newest {} (--limit N, 0 for all)",
            jobs.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn cancel(
    client: &mut BatchClient,
    opts: &RegistryOpts,
    args: &CancelArgs,
) -> CliResult<ExitCode> {
    let job = client
        .inner
        .cancel_job(client.request(pb::CancelJobRequest {
            id: args.id.clone(),
        })?)
        .await
        .map_err(|status| client.status_error(status))?
        .into_inner();
    if opts.output == Output::Json {
        print_json(&job_json(&job));
    } else {
        println!("cancelled {}", job.id);
        print_job(&job);
    }
    Ok(ExitCode::SUCCESS)
}

async fn decrypt(opts: &RegistryOpts, args: &DecryptArgs) -> CliResult<ExitCode> {
    let Some(key_file) = &args.key_file else {
        return Err(CliError::Usage(format!(
            "no key ring to decrypt with: pass --key-file FILE (the batch outputs' key file, the \
             workers' [batch] key_file) or set {KEY_FILE_ENV}"
        )));
    };
    let ring = shamal_batch_io::KeyRing::from_file(key_file)
        .map_err(|error| CliError::other(format!("--key-file: {error}")))?;
    let source = absolute(&args.source, "JOB_OUTPUT")?;
    let destination = absolute(&args.out, "--out")?;
    let manifest = shamal_batch_io::decrypt_dataset(&source, &destination, &ring)
        .await
        .map_err(|error| {
            CliError::other(format!(
                "cannot decrypt {source} into {destination}: {error}"
            ))
        })?;
    if opts.output == Output::Json {
        print_json(&json!({
            "source": source,
            "destination": destination,
            "job_id": manifest.job_id,
            "model": manifest.model,
            "model_version": manifest.model_version,
            "total_rows": manifest.total_rows,
            "parts": manifest
                .parts
                .iter()
                .map(|part| json!({
                    "name": part.name,
                    "rows": part.rows,
                    "bytes": part.bytes,
                    "sha256": part.sha256,
                }))
                .collect::<Vec<_>>(),
        }));
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&["part", "rows", "bytes"]);
    for part in &manifest.parts {
        table.row(vec![
            part.name.clone(),
            thousands(part.rows),
            thousands(part.bytes),
        ]);
    }
    table.print();
    println!(
        "decrypted {} parts, {} rows of job {} into {destination} (with {} and {})",
        manifest.parts.len(),
        thousands(manifest.total_rows),
        manifest.job_id,
        shamal_batch_io::MANIFEST_FILE,
        shamal_batch_io::SUCCESS_FILE,
    );
    Ok(ExitCode::SUCCESS)
}

/// A local path made absolute (the coordinator may run elsewhere, in
/// another directory); URLs (`s3://...`, `file://...`) as given.
fn absolute(path: &str, flag: &str) -> CliResult<String> {
    if path.trim().is_empty() {
        return Err(CliError::Usage(format!("{flag} must not be empty")));
    }
    if path.contains("://") {
        return Ok(path.to_owned());
    }
    let absolute = std::path::absolute(Path::new(path))
        .map_err(|error| CliError::Usage(format!("{flag} {path}: {error}")))?;
    absolute
        .into_os_string()
        .into_string()
        .map_err(|_| CliError::Usage(format!("{flag} {path}: the path is not valid UTF-8")))
}

/// The exit code of a followed job's end; prints the summary (and the
/// job's message on stderr when it did not succeed).
fn finish(job: &pb::Job, json: bool) -> ExitCode {
    if json {
        print_json(&job_json(job));
    } else {
        print_job(job);
    }
    match pb::JobState::try_from(job.state) {
        Ok(pb::JobState::Succeeded) => ExitCode::SUCCESS,
        Ok(pb::JobState::Cancelled) => {
            eprintln!("shamal: job {} was cancelled: {}", job.id, job.message);
            ExitCode::from(EXIT_JOB_CANCELLED)
        }
        _ => {
            eprintln!(
                "shamal: job {} {}: {}",
                job.id,
                state_name(job.state),
                job.message
            );
            ExitCode::from(EXIT_JOB_FAILED)
        }
    }
}

// -------------------------------------------------------------- following

/// Follows `job` until it ends, showing its progress: the Watch stream,
/// else GetJob once a second. Ctrl-C stops following (the job goes on).
async fn follow(client: &mut BatchClient, job: pb::Job, json: bool) -> CliResult<pb::Job> {
    let mut progress = if json {
        Progress::new(Sink::Stderr, std::io::stderr().is_terminal())
    } else {
        Progress::new(Sink::Stdout, std::io::stdout().is_terminal())
    };
    let id = job.id.clone();
    progress.update(&job);
    if is_final(&job) {
        progress.end();
        return Ok(job);
    }
    enum Ended {
        Followed(Box<CliResult<pb::Job>>),
        Interrupted(std::io::Result<()>),
    }
    let ended = tokio::select! {
        followed = follow_updates(client, job, &mut progress) => Ended::Followed(Box::new(followed)),
        interrupted = tokio::signal::ctrl_c() => Ended::Interrupted(interrupted),
    };
    progress.end();
    match ended {
        Ended::Followed(followed) => *followed,
        Ended::Interrupted(Ok(())) => Err(CliError::other(format!(
            "interrupted: job {id} goes on; follow it again with `shamal batch status {id} --follow`"
        ))),
        Ended::Interrupted(Err(error)) => {
            Err(CliError::other(format!("cannot watch for Ctrl-C: {error}")))
        }
    }
}

async fn follow_updates(
    client: &mut BatchClient,
    mut last: pb::Job,
    progress: &mut Progress,
) -> CliResult<pb::Job> {
    let id = last.id.clone();
    match client
        .inner
        .watch_job(client.request(pb::GetJobRequest { id: id.clone() })?)
        .await
    {
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(job)) => {
                        progress.update(&job);
                        if is_final(&job) {
                            return Ok(job);
                        }
                        last = job;
                    }
                    // Ended early (a coordinator stopping): poll instead.
                    Ok(None) => break,
                    Err(status) if refusal(&status) => return Err(client.status_error(status)),
                    Err(status) => {
                        tracing::debug!(%status, "the watch stream broke; polling instead");
                        break;
                    }
                }
            }
        }
        Err(status) if refusal(&status) => return Err(client.status_error(status)),
        Err(status) => {
            tracing::debug!(%status, "no watch stream; polling instead");
        }
    }
    // Polling.
    let mut unreachable_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(TICK).await;
        match client
            .inner
            .get_job(client.request(pb::GetJobRequest { id: id.clone() })?)
            .await
        {
            Ok(response) => {
                unreachable_since = None;
                let job = response.into_inner();
                progress.update(&job);
                if is_final(&job) {
                    return Ok(job);
                }
                last = job;
            }
            Err(status) if refusal(&status) => return Err(client.status_error(status)),
            Err(status) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= UNREACHABLE_FOR {
                    return Err(CliError::other(format!(
                        "lost the batch coordinator at {} for {} s while following {id} (last seen {}): {}",
                        client.url,
                        UNREACHABLE_FOR.as_secs(),
                        state_name(last.state),
                        status.message()
                    )));
                }
            }
        }
    }
}

/// An answer that following again would not change.
fn refusal(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::NotFound
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::InvalidArgument
            | Code::FailedPrecondition
    )
}

fn is_final(job: &pb::Job) -> bool {
    matches!(
        pb::JobState::try_from(job.state),
        Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
    )
}

#[derive(Clone, Copy)]
enum Sink {
    Stdout,
    Stderr,
}

/// The progress display: one line redrawn in place on a terminal, plain
/// lines (one per change, at most about one a second) otherwise.
struct Progress {
    sink: Sink,
    tty: bool,
    /// The terminal's columns (a redrawn line must not wrap).
    width: usize,
    /// A line is drawn on the terminal and not ended yet.
    drawn: bool,
    /// What the last plain line said (state, rows, shards, failures,
    /// message) and when it was printed.
    printed: Option<(ProgressKey, Instant)>,
}

#[derive(Clone, PartialEq, Eq)]
struct ProgressKey {
    state: i32,
    done_rows: u64,
    shards_done: u32,
    shard_failures: u32,
    message: String,
}

impl ProgressKey {
    fn of(job: &pb::Job) -> ProgressKey {
        ProgressKey {
            state: job.state,
            done_rows: job.done_rows,
            shards_done: job.shards_done,
            shard_failures: job.shard_failures,
            message: job.message.clone(),
        }
    }
}

impl Progress {
    fn new(sink: Sink, tty: bool) -> Progress {
        Progress {
            sink,
            tty,
            width: if tty { terminal_width() } else { 0 },
            drawn: false,
            printed: None,
        }
    }

    fn write(&self, text: &str) {
        // A closed pipe must not end the job's following with a panic.
        let _ = match self.sink {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(text.as_bytes()).and_then(|()| out.flush())
            }
            Sink::Stderr => {
                let mut out = std::io::stderr().lock();
                out.write_all(text.as_bytes()).and_then(|()| out.flush())
            }
        };
    }

    fn update(&mut self, job: &pb::Job) {
        if self.tty {
            self.write(&format!("\r\x1b[2K{}", bar_line(job, self.width)));
            self.drawn = true;
            return;
        }
        let key = ProgressKey::of(job);
        if self.printed.as_ref().is_some_and(|(last, _)| *last == key) {
            return;
        }
        let state_changed = self
            .printed
            .as_ref()
            .is_none_or(|(last, _)| last.state != key.state);
        let due = self
            .printed
            .as_ref()
            .is_none_or(|(_, at)| at.elapsed() >= TICK);
        // A change too soon after the previous line is skipped: the next
        // line (at the latest the final one) shows where the job is.
        if state_changed || due {
            self.write(&format!("{}\n", plain_line(job)));
            self.printed = Some((key, Instant::now()));
        }
    }

    /// Ends the redrawn line.
    fn end(&mut self) {
        if self.drawn {
            self.write("\n");
            self.drawn = false;
        }
    }
}

/// Width of the bar, in characters.
const BAR_WIDTH: usize = 20;

/// `RUNNING [#######-------------]  37%  3,700/~10,000 rows  1,234 rows/s  ETA 5s  2/5 shards`,
/// cut to `width` characters (a longer line would wrap, and the next
/// redraw would not replace it).
fn bar_line(job: &pb::Job, width: usize) -> String {
    let total = job.total_rows;
    let fraction = if is_final(job) && job.state == pb::JobState::Succeeded as i32 {
        1.0
    } else if total == 0 {
        0.0
    } else {
        (job.done_rows as f64 / total as f64).min(1.0)
    };
    let filled = ((fraction * BAR_WIDTH as f64).round() as usize).min(BAR_WIDTH);
    let bar = format!("{}{}", "#".repeat(filled), "-".repeat(BAR_WIDTH - filled));
    let mut line = format!(
        "{:<9} [{bar}] {:>3.0}%  {}/{} rows  {}  ETA {}  {}/{} shards",
        state_name(job.state),
        fraction * 100.0,
        thousands(job.done_rows),
        rows_total(job),
        rate(job),
        eta(job),
        job.shards_done,
        job.shards_total,
    );
    if job.shard_failures > 0 {
        line.push_str(&format!(", {} failed attempts", job.shard_failures));
    }
    if pb::JobState::try_from(job.state) == Ok(pb::JobState::Queued) && !job.message.is_empty() {
        line.push_str("  ");
        line.push_str(&job.message);
    }
    line.chars().take(width.saturating_sub(1).max(20)).collect()
}

/// The terminal's width in columns: `stty size` on the controlling
/// terminal, else `COLUMNS`, else 80.
fn terminal_width() -> usize {
    let from_stty = std::fs::File::open("/dev/tty").ok().and_then(|tty| {
        let output = std::process::Command::new("stty")
            .arg("size")
            .stdin(tty)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8(output.stdout).ok()?;
        text.split_whitespace().nth(1)?.parse::<usize>().ok()
    });
    from_stty
        .or_else(|| std::env::var("COLUMNS").ok()?.trim().parse().ok())
        .filter(|width| *width > 0)
        .unwrap_or(80)
}

/// `job-... RUNNING 3,700/~10,000 rows (37%), 2/5 shards, 1,234 rows/s, ETA 5s`
fn plain_line(job: &pb::Job) -> String {
    let percent = if job.total_rows == 0 {
        String::new()
    } else {
        format!(
            " ({:.0}%)",
            (job.done_rows as f64 / job.total_rows as f64 * 100.0).min(100.0)
        )
    };
    let mut line = format!(
        "{} {} {}/{} rows{percent}, {}/{} shards, {}, ETA {}",
        job.id,
        state_name(job.state),
        thousands(job.done_rows),
        rows_total(job),
        job.shards_done,
        job.shards_total,
        rate(job),
        eta(job),
    );
    if job.shard_failures > 0 {
        line.push_str(&format!(", {} failed attempts", job.shard_failures));
    }
    if !job.message.is_empty() {
        line.push_str(": ");
        line.push_str(&job.message);
    }
    line
}

/// The total rows, `~` marking an estimate (a JSON Lines or CSV input
/// before every shard is done).
fn rows_total(job: &pb::Job) -> String {
    let total = thousands(job.total_rows);
    if is_final(job) || !estimated(job) {
        total
    } else {
        format!("~{total}")
    }
}

fn estimated(job: &pb::Job) -> bool {
    let Some(spec) = &job.spec else {
        return false;
    };
    match spec.input_format.as_str() {
        "parquet" => false,
        "jsonl" | "csv" => true,
        _ => {
            let input = spec.input.to_ascii_lowercase();
            !(input.ends_with(".parquet") || Path::new(&input).extension().is_none())
        }
    }
}

/// The coordinator's rows/s over the last minute; for a finished job,
/// its average over the run.
fn rate(job: &pb::Job) -> String {
    let rate = if is_final(job) {
        let ran_ms = job.finished_at_ms - job.started_at_ms;
        if job.started_at_ms <= 0 || ran_ms <= 0 {
            return "- rows/s".to_owned();
        }
        job.done_rows as f64 * 1000.0 / ran_ms as f64
    } else {
        job.rows_per_second
    };
    if rate >= 100.0 {
        format!("{} rows/s", thousands(rate.round() as u64))
    } else {
        format!("{rate:.1} rows/s")
    }
}

fn eta(job: &pb::Job) -> String {
    if is_final(job) {
        return "-".to_owned();
    }
    let left = job.total_rows.saturating_sub(job.done_rows);
    if job.rows_per_second <= 0.0 || left == 0 {
        return "--".to_owned();
    }
    duration((left as f64 / job.rows_per_second).ceil() as u64)
}

/// `45s`, `3m05s`, `1h02m`.
fn duration(seconds: u64) -> String {
    match seconds {
        0..=59 => format!("{seconds}s"),
        60..=3599 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}

/// `1234567` as `1,234,567`.
fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

// ------------------------------------------------------------------ output

/// `SUCCEEDED`, ...
fn state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Queued) => "QUEUED",
        Ok(pb::JobState::Running) => "RUNNING",
        Ok(pb::JobState::Succeeded) => "SUCCEEDED",
        Ok(pb::JobState::Failed) => "FAILED",
        Ok(pb::JobState::Cancelled) => "CANCELLED",
        Ok(pb::JobState::Unspecified) | Err(_) => "UNKNOWN",
    }
}

fn print_job(job: &pb::Job) {
    let spec = job.spec.clone().unwrap_or_default();
    let mut fields = vec![
        ("id", job.id.clone()),
        ("state", state_name(job.state).to_owned()),
        ("model", format!("{} version {}", spec.model, job.version)),
        ("input", spec.input.clone()),
        ("output", spec.output.clone()),
        (
            "rows",
            format!("{} of {}", thousands(job.done_rows), rows_total(job)),
        ),
        (
            "shards",
            format!(
                "{} of {} done, {} failed attempts",
                job.shards_done, job.shards_total, job.shard_failures
            ),
        ),
    ];
    if !spec.key_columns.is_empty() {
        fields.push(("keys", spec.key_columns.join(", ")));
    }
    // Where it runs: the job's regions narrowed by the model's and the
    // tenant's policies.
    fields.push((
        "regions",
        if job.regions.is_empty() {
            "any".to_owned()
        } else {
            job.regions.join(", ")
        },
    ));
    if !spec.tenant.is_empty() {
        fields.push(("tenant", spec.tenant.clone()));
    }
    if !is_final(job) {
        fields.push(("rate", format!("{}, ETA {}", rate(job), eta(job))));
    }
    if !job.message.is_empty() {
        fields.push(("message", job.message.clone()));
    }
    if !job.manifest.is_empty() {
        fields.push(("manifest", job.manifest.clone()));
    }
    fields.push(("submitted", submitted(job)));
    if job.started_at_ms > 0 {
        fields.push((
            "started",
            format!("{} UTC", time(&Value::from(job.started_at_ms))),
        ));
    }
    if job.finished_at_ms > 0 {
        let took = if job.started_at_ms > 0 {
            format!(
                " (ran {})",
                duration(
                    u64::try_from((job.finished_at_ms - job.started_at_ms).max(0) / 1000)
                        .unwrap_or(0)
                )
            )
        } else {
            String::new()
        };
        fields.push((
            "finished",
            format!("{} UTC{took}", time(&Value::from(job.finished_at_ms))),
        ));
    }
    print_fields(&fields);
}

fn submitted(job: &pb::Job) -> String {
    let at = time(&Value::from(job.created_at_ms));
    if job.actor.is_empty() {
        format!("{at} UTC")
    } else {
        format!("{at} UTC by {}", job.actor)
    }
}

/// The job as the REST API writes it (`GET /v1/jobs/{id}`).
fn job_json(job: &pb::Job) -> Value {
    let spec = job.spec.clone().unwrap_or_default();
    let input_columns: serde_json::Map<String, Value> = spec
        .input_columns
        .iter()
        .map(|(input, column)| (input.clone(), Value::from(column.clone())))
        .collect();
    json!({
        "id": job.id,
        "spec": {
            "model": spec.model,
            "version": spec.version,
            "alias": spec.alias,
            "input": spec.input,
            "input_format": spec.input_format,
            "output": spec.output,
            "key_columns": spec.key_columns,
            "regions": spec.regions,
            "priority": spec.priority,
            "tenant": spec.tenant,
            "encrypt": spec.encrypt,
            "rows_per_shard": spec.rows_per_shard,
            "input_columns": input_columns,
        },
        "state": state_name(job.state),
        "version": job.version,
        "total_rows": job.total_rows,
        "done_rows": job.done_rows,
        "shards_total": job.shards_total,
        "shards_done": job.shards_done,
        "shard_failures": job.shard_failures,
        "message": job.message,
        "created_at_ms": job.created_at_ms,
        "started_at_ms": job.started_at_ms,
        "finished_at_ms": job.finished_at_ms,
        "actor": job.actor,
        "rows_per_second": job.rows_per_second,
        "manifest": job.manifest,
        "regions": job.regions,
    })
}

// ------------------------------------------------------------------ client

struct BatchClient {
    inner: BatchServiceClient<Channel>,
    url: String,
    token: Option<String>,
}

impl BatchClient {
    /// Connects now (a clear error when unreachable), with the bearer
    /// token the other commands would send.
    async fn connect(connection: &BatchOpts, opts: &RegistryOpts) -> CliResult<BatchClient> {
        let mut url = connection.endpoint.trim().trim_end_matches('/').to_owned();
        if !url.contains("://") {
            url = format!("http://{url}");
        }
        let https = url.starts_with("https://");
        if !https && !url.starts_with("http://") {
            return Err(CliError::Usage(format!(
                "--batch-endpoint must be an http:// or https:// URL (or HOST:PORT), not '{url}'"
            )));
        }
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|error| CliError::Usage(format!("--batch-endpoint '{url}': {error}")))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true);
        let connected = if https {
            let tls = crate::audit::tls_config(
                connection.ca.as_deref(),
                "--batch-ca",
                "batch coordinator",
            )?;
            endpoint.connect_with_connector(connector(tls)).await
        } else {
            endpoint.connect().await
        };
        let channel = connected.map_err(|error| {
            let chain = error_chain(&error);
            let hint = if chain.contains("certificate") {
                " (for a private CA, such as `shamal up --tls`'s <data-dir>/certs/ca.pem, pass \
                 --batch-ca)"
            } else {
                " (is `shamal up` running, or is --batch-endpoint / SHAMAL_BATCH_ENDPOINT set?)"
            };
            CliError::other(format!(
                "cannot reach the batch coordinator at {url}: {chain}{hint}"
            ))
        })?;
        let token = bearer(opts, &url).await?;
        Ok(BatchClient {
            inner: BatchServiceClient::new(channel)
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

    async fn get(&mut self, id: &str) -> CliResult<pb::Job> {
        let request = self.request(pb::GetJobRequest { id: id.to_owned() })?;
        match self.inner.get_job(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.status_error(status)),
        }
    }

    /// A refusal or failure, with the exit code of the registry commands'
    /// equivalent; an invalid field is named as such.
    fn status_error(&self, status: tonic::Status) -> CliError {
        let message = status.message().to_owned();
        let api = |http: StatusCode, code: &str, message: String| {
            let (field, message) = split_field(&message);
            CliError::Api {
                status: http,
                code: code.to_owned(),
                message,
                field,
                current_revision: None,
            }
        };
        match status.code() {
            Code::Unauthenticated => CliError::Unauthenticated(format!(
                "{LOGIN_HINT} (the batch coordinator said: {message})"
            )),
            Code::PermissionDenied => api(
                StatusCode::FORBIDDEN,
                "permission_denied",
                format!(
                    "{message} (submitting and cancelling need batch:submit, reading batch:read)"
                ),
            ),
            Code::NotFound => api(StatusCode::NOT_FOUND, "not_found", message),
            Code::InvalidArgument => api(StatusCode::BAD_REQUEST, "invalid_argument", message),
            Code::FailedPrecondition => api(StatusCode::CONFLICT, "failed_precondition", message),
            Code::Unavailable => CliError::other(format!(
                "the batch coordinator at {} is unavailable: {message}",
                self.url
            )),
            code => {
                // A plain-http client of a TLS server sees its calls cut.
                let hint = if self.url.starts_with("http://")
                    && matches!(code, Code::Cancelled | Code::Unknown | Code::Internal)
                {
                    " (if it serves TLS, as `shamal up --tls` does, use an https:// endpoint \
                     and --batch-ca)"
                } else {
                    ""
                };
                CliError::other(format!(
                    "the batch coordinator at {} answered {code:?}: {message}{hint}",
                    self.url
                ))
            }
        }
    }
}

/// `spec.input: column 'x' ...` as the field and the rest.
fn split_field(message: &str) -> (Option<String>, String) {
    if let Some((field, rest)) = message.split_once(": ")
        && (field.starts_with("spec.") || field == "request_id" || field == "id")
        && !field.contains(' ')
    {
        return (Some(field.to_owned()), rest.to_owned());
    }
    (None, message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: pb::JobState, done: u64, total: u64, rate: f64, input: &str) -> pb::Job {
        pb::Job {
            id: "job-1".to_owned(),
            spec: Some(pb::JobSpec {
                model: "demo".to_owned(),
                input: input.to_owned(),
                ..pb::JobSpec::default()
            }),
            state: state as i32,
            total_rows: total,
            done_rows: done,
            shards_total: 4,
            shards_done: 1,
            rows_per_second: rate,
            ..pb::Job::default()
        }
    }

    #[test]
    fn progress_lines_show_rows_rate_and_eta() {
        let running = job(
            pb::JobState::Running,
            2_500,
            10_000,
            500.0,
            "/data/in.parquet",
        );
        assert_eq!(
            bar_line(&running, 120),
            "RUNNING   [#####---------------]  25%  2,500/10,000 rows  500 rows/s  ETA 15s  1/4 shards"
        );
        // Never wider than the terminal.
        assert_eq!(
            bar_line(&running, 40),
            "RUNNING   [#####---------------]  25%  "
        );
        let mut queued = job(pb::JobState::Queued, 0, 10_000, 0.0, "/data/in.parquet");
        queued.message = "queued: waiting for a batch worker of its regions".to_owned();
        assert!(
            bar_line(&queued, 200)
                .ends_with("1/4 shards  queued: waiting for a batch worker of its regions")
        );
        assert_eq!(
            plain_line(&running),
            "job-1 RUNNING 2,500/10,000 rows (25%), 1/4 shards, 500 rows/s, ETA 15s"
        );
        // JSON Lines and CSV totals are estimates until the job ends.
        let estimated = job(pb::JobState::Running, 10, 20, 0.0, "/data/in.jsonl");
        assert!(plain_line(&estimated).contains("10/~20 rows (50%)"));
        assert!(plain_line(&estimated).contains("ETA --"));
        let mut done = job(pb::JobState::Succeeded, 21, 21, 0.0, "/data/in.csv");
        assert_eq!(
            bar_line(&done, 80),
            "SUCCEEDED [####################] 100%  21/21 rows  - rows/s  ETA -  1/4 shards"
        );
        // Finished: the average over the run.
        done.started_at_ms = 1_000;
        done.finished_at_ms = 11_000;
        assert!(plain_line(&done).contains("21/21 rows (100%), 1/4 shards, 2.1 rows/s, ETA -"));
    }

    #[test]
    fn numbers_and_durations_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(duration(45), "45s");
        assert_eq!(duration(185), "3m05s");
        assert_eq!(duration(3_720), "1h02m");
    }

    #[test]
    fn mappings_states_and_fields_parse() {
        assert_eq!(
            parse_mapping("INPUT0=features"),
            Ok(("INPUT0".to_owned(), "features".to_owned()))
        );
        assert!(parse_mapping("INPUT0").is_err());
        assert!(parse_mapping("=x").is_err());
        assert_eq!(parse_state("running"), Ok(pb::JobState::Running));
        assert_eq!(parse_state("SUCCEEDED"), Ok(pb::JobState::Succeeded));
        assert!(parse_state("unspecified").is_err());
        assert!(parse_state("done").is_err());
        assert_eq!(
            split_field("spec.input: column 'x' not found"),
            (
                Some("spec.input".to_owned()),
                "column 'x' not found".to_owned()
            )
        );
        assert_eq!(
            split_field("model 'x' not found: gone"),
            (None, "model 'x' not found: gone".to_owned())
        );
    }

    #[test]
    fn local_paths_become_absolute_and_urls_pass() {
        assert_eq!(
            absolute("s3://bucket/in/", "--input").unwrap(),
            "s3://bucket/in/"
        );
        let made = absolute("data/in.jsonl", "--input").unwrap();
        assert!(Path::new(&made).is_absolute(), "{made}");
        assert!(made.ends_with("data/in.jsonl"), "{made}");
        assert!(absolute(" ", "--out").is_err());
    }
}
