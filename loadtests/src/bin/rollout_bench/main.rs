//! `shamal-rollout-bench`: rollout propagation and router throughput under
//! a rollout, on a real registry, cpu-workers (one by default, `--workers
//! N`) and router started as separate processes on loopback (release
//! binaries, see `loadtests/rollout-bench.sh`).
//!
//! 1. Propagation: a canary rollout is flipped between weight 100 and 0 by
//!    REST writes to the registry (`POST .../rollout/shift`, or a whole
//!    `PUT .../rollout/policy`), each timed from just before the write is
//!    sent until the router answers every request with the new version: a
//!    client sends inference requests to the router over gRPC one after the
//!    other and reads `model_version` from each answer; the time recorded is
//!    when the first answer of the final run of new-version answers arrived.
//! 2. Throughput: closed loop at fixed concurrency (the load generator's
//!    library) against a model with one version and no rollout (production
//!    alias only), against a model whose rollout splits traffic over three
//!    versions (34/33/33), and, as a diagnostic, against a rollout over three
//!    versions that sends everything to one (100/0/0: the router's rollout
//!    path with the worker's load shaped as for one version); alternately,
//!    each several times. With `--placement weighted` these three models
//!    get the weighted placement policy first (each version on workers of
//!    its own, in proportion to its traffic), and the runs start once the
//!    registry's placement has settled.

mod rest;
mod stack;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use serde::Serialize;
use serde_json::{Value, json};
use shamal_loadtest::{Config, Mode, Report, parse_duration};
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::inference::{
    ModelInferRequest, ModelMetadataRequest, ModelReadyRequest, ModelStatisticsRequest,
};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use rest::Rest;
use stack::{Stack, StackOptions};

/// Rollout propagation latency and router throughput under a rollout.
#[derive(Debug, Parser)]
// A flag given twice takes its last value (the script's defaults come first).
#[command(name = "shamal-rollout-bench", version, args_override_self = true)]
struct Args {
    /// Registry database (postgres://... or sqlite://...); default: SQLite
    /// in a temporary directory. Use a dedicated database: the workers
    /// load every version registered in it.
    #[arg(long)]
    database_url: Option<String>,
    /// Directory holding shamal-registry, shamal-cpu-worker and
    /// shamal-router (default: this program's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// ONNX file registered as every version.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/repository/demo/1/model.onnx"))]
    model_file: PathBuf,
    /// Rollout changes timed (alternately weight 100 and 0 on the canary).
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// The REST write that changes the rollout.
    #[arg(long, value_enum, default_value_t = Write::Shift)]
    write: Write,
    /// Consecutive new-version answers that end one propagation measurement.
    #[arg(long, default_value_t = 20)]
    confirm: usize,
    /// Closed-loop concurrency of the throughput runs.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measurement time of each throughput run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Warm-up before each throughput run.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Throughput rounds: each runs every configuration once, in an order
    /// rotated from round to round. Runs on this kind of machine fall into
    /// a fast or a slow mode at random, so compare medians over several.
    #[arg(long, default_value_t = 4)]
    runs: usize,
    /// HTTP/2 connections of the load generator (default min(concurrency, 4)).
    #[arg(long)]
    connections: Option<usize>,
    /// max_batch_size the workers give registry models.
    #[arg(long, default_value_t = 64)]
    worker_max_batch_size: usize,
    /// cpu-worker processes behind the router.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,
    /// Placement policy of the throughput models, set before the runs:
    /// `all` (every worker holds every version) or `weighted`.
    #[arg(long, value_enum, default_value_t = Placement::All)]
    placement: Placement,
    /// Runtime threads of this program (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    skip_propagation: bool,
    #[arg(long)]
    skip_throughput: bool,
    /// Where the services' logs go (default: a temporary directory, removed
    /// at the end).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Write {
    /// `POST /v1/models/{name}/rollout/shift` with the canary's weight.
    Shift,
    /// `PUT /v1/models/{name}/rollout/policy` with the whole policy.
    Policy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Placement {
    /// Every worker holds every version (the registry's default).
    All,
    /// Each version on workers of its own, in proportion to its traffic.
    Weighted,
}

impl Placement {
    fn as_str(self) -> &'static str {
        match self {
            Placement::All => "all",
            Placement::Weighted => "weighted",
        }
    }
}

type Client = GrpcInferenceServiceClient<Channel>;

fn main() {
    let args = Args::parse();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |cores| cores.get()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(real_main(args)),
        Err(error) => Err(error.into()),
    };
    if let Err(error) = result {
        eprintln!("shamal-rollout-bench: {error:#}");
        std::process::exit(1);
    }
}

/// The benchmark's three models (names unique per run).
struct Models {
    /// One version, production alias, no rollout.
    single: String,
    /// Three versions, rollout 34/33/33.
    split: String,
    /// Three versions, rollout 100/0/0 (diagnostic: the router's rollout
    /// path with the worker's load on one version, as for `single`).
    pinned: String,
    /// Two versions, canary flipped between 0 and 100.
    canary: String,
}

impl Models {
    fn all(&self) -> [&String; 4] {
        [&self.single, &self.split, &self.pinned, &self.canary]
    }

    /// Each model with its number of versions.
    fn with_counts(&self) -> [(&String, u64); 4] {
        [
            (&self.single, 1),
            (&self.split, 3),
            (&self.pinned, 3),
            (&self.canary, 2),
        ]
    }
}

async fn real_main(args: Args) -> Result<()> {
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    println!("command: {command_line}");
    let work = tempfile::Builder::new()
        .prefix("shamal-rollout-bench.")
        .tempdir()
        .context("creating a work directory")?;
    let log_dir = match &args.log_dir {
        Some(dir) => dir.clone(),
        None => work.path().join("logs"),
    };
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let database_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}/registry.db", work.path().display()));
    let database = if database_url.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    };
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this program has no directory")?
            .to_path_buf(),
    };
    let model_bytes = std::fs::read(&args.model_file)
        .with_context(|| format!("reading {}", args.model_file.display()))?;

    let mut stack = Stack::start(&StackOptions {
        bin_dir,
        database_url: database_url.clone(),
        work_dir: work.path().to_path_buf(),
        log_dir: log_dir.clone(),
        worker_max_batch_size: args.worker_max_batch_size,
        workers: usize::from(args.workers),
    })
    .await?;
    println!(
        "database: {database} ({database_url}); registry REST at {}",
        stack.rest_url
    );
    println!(
        "registry (pid {}): {}",
        stack.registry.pid(),
        stack.registry.command_line
    );

    let suffix = format!(
        "{:06x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis() as u64)
            & 0xff_ffff
    );
    let models = Models {
        single: format!("rb-single-{suffix}"),
        split: format!("rb-split-{suffix}"),
        pinned: format!("rb-pinned-{suffix}"),
        canary: format!("rb-canary-{suffix}"),
    };
    let rest = stack.rest.clone();
    // Versions are registered before the workers start, so that they find
    // them all in their first snapshot. (A Watch that starts on an empty
    // registry misses the registry's first change: the watch loop in
    // services/registry/src/grpc.rs moves `since` to max(revision, 1).)
    let versions = register(&rest, &models, model_bytes).await?;
    stack.start_workers().await?;
    for worker in &stack.workers {
        println!("cpu-worker (pid {}): {}", worker.pid(), worker.command_line);
    }
    let canary_revision = configure(&rest, &models, &versions).await?;
    stack.start_router().await?;
    if let Some(router) = &stack.router {
        println!("router (pid {}): {}", router.pid(), router.command_line);
    }
    let router_url = stack.router_url.clone();
    for model in models.all() {
        wait_model_ready(&router_url, model).await?;
    }
    println!(
        "models: {} (1 version, no rollout), {} (3 versions, 34/33/33), {} (3 versions, 100/0/0), {} (canary 2 vs stable 1)",
        models.single, models.split, models.pinned, models.canary
    );

    let mut output = json!({
        "command": command_line,
        "database": database,
        "database_url": database_url,
        "model_file": args.model_file.display().to_string(),
        "workers": args.workers,
        "placement": args.placement,
        "processes": {
            "registry": stack.registry.command_line,
            "cpu_workers": stack.workers.iter().map(|worker| worker.command_line.clone()).collect::<Vec<_>>(),
            "router": stack.router.as_ref().map(|router| router.command_line.clone()),
        },
    });

    let result = async {
        if !args.skip_propagation {
            let propagation =
                propagation(&args, &rest, &router_url, &models.canary, canary_revision).await?;
            output["propagation"] = serde_json::to_value(&propagation)?;
            stack.check_alive()?;
        }
        if !args.skip_throughput {
            output["placements"] = place(&args, &rest, &models).await?;
            let worker_urls = stack.worker_urls();
            output["throughput"] =
                throughput(&args, &rest, &router_url, &worker_urls, &models).await?;
            stack.check_alive()?;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(error) = result {
        let _ = stack.check_alive().map_err(|dead| eprintln!("{dead:#}"));
        eprintln!("logs: {}", log_dir.display());
        return Err(error);
    }
    if args.database_url.is_some() {
        retire(&rest, &models).await;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&output)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("JSON written to {}", path.display());
    }
    drop(stack);
    Ok(())
}

/// Uploads the artifact and registers every version.
async fn register(
    rest: &Rest,
    models: &Models,
    model_bytes: Vec<u8>,
) -> Result<Vec<(String, u64)>> {
    let sha256 = rest.put_artifact(model_bytes).await?;
    let mut versions = Vec::new();
    for (model, count) in models.with_counts() {
        for _ in 0..count {
            let version = rest.register_version(model, &sha256).await?;
            versions.push((model.clone(), version));
        }
    }
    Ok(versions)
}

/// Waits until the worker has loaded every version, then sets the aliases
/// and rollouts; returns the canary's rollout revision.
async fn configure(rest: &Rest, models: &Models, versions: &[(String, u64)]) -> Result<u64> {
    // The registry marks a version ready once a worker has loaded it.
    let deadline = Instant::now() + Duration::from_secs(120);
    for (model, version) in versions {
        loop {
            let (lifecycle, reason) = rest.lifecycle(model, *version).await?;
            match lifecycle.as_str() {
                "ready" => break,
                "failed" => bail!("{model} version {version} failed to load: {reason}"),
                _ if Instant::now() > deadline => {
                    bail!("{model} version {version} not ready within 120 s ({lifecycle})")
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    for model in models.all() {
        rest.set_alias(model, "production", 1).await?;
    }
    rest.set_policy(&models.split, 0, 1, &[(1, 34), (2, 33), (3, 33)])
        .await?;
    rest.set_policy(&models.pinned, 0, 1, &[(1, 100), (2, 0), (3, 0)])
        .await?;
    rest.start_rollout(&models.canary, 2, 0).await
}

/// Sets the placement policy of the throughput models and waits until the
/// registry's placement has settled: every active version on its workers,
/// every one of them ready, none still releasing a version. Returns each
/// model's placement.
async fn place(args: &Args, rest: &Rest, models: &Models) -> Result<Value> {
    let throughput_models = [&models.single, &models.split, &models.pinned];
    if args.placement == Placement::All {
        return Ok(Value::Null);
    }
    println!();
    println!(
        "== placement: {} for {}",
        args.placement.as_str(),
        throughput_models
            .iter()
            .map(|model| model.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for model in throughput_models {
        rest.set_placement(model, args.placement.as_str()).await?;
    }
    let mut placements = serde_json::Map::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    for model in throughput_models {
        let placement = loop {
            let placement = rest.placement(model).await?;
            if settled(&placement) {
                break placement;
            }
            if Instant::now() > deadline {
                bail!("the placement of {model} did not settle within 120 s: {placement}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for version in placement["versions"].as_array().into_iter().flatten() {
            println!(
                "{model} v{}: {}% on {}",
                version["version"],
                version["weight"],
                version["workers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        placements.insert(model.clone(), placement);
    }
    // Routers learn what workers hold from their periodic look at them
    // (every second by default) as well as from the registry's changes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    Ok(Value::Object(placements))
}

/// Whether a model's placement has settled.
fn settled(placement: &Value) -> bool {
    placement["versions"].as_array().is_some_and(|versions| {
        versions.iter().all(|version| {
            let workers = &version["workers"];
            workers.as_array().is_some_and(|list| !list.is_empty())
                && version["releasing"]
                    .as_array()
                    .is_some_and(|releasing| releasing.is_empty())
                && version["ready"] == *workers
        })
    })
}

/// Archives what the run registered, so that workers of later runs on the
/// same database do not load it (best effort).
async fn retire(rest: &Rest, models: &Models) {
    for (model, count) in models.with_counts() {
        if let Ok(status) = rest.rollout_status(model).await
            && let Some(revision) = status["rollout"]["revision"].as_u64()
        {
            let _ = rest.rollback(model, revision).await;
        }
        let _ = rest.delete_alias(model, "production").await;
        for version in 1..=count {
            let _ = rest.archive(model, version).await;
        }
    }
}

async fn connect(url: &str) -> Result<Client> {
    let channel = Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(GrpcInferenceServiceClient::new(channel))
}

async fn wait_model_ready(url: &str, model: &str) -> Result<()> {
    let mut client = connect(url).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client
            .model_ready(ModelReadyRequest {
                name: model.to_owned(),
                version: String::new(),
            })
            .await
            .map(|response| response.into_inner().ready)
            .unwrap_or(false);
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the router did not report {model} ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request for `model` as its metadata describes it (batch 1).
async fn request_for(client: &mut Client, model: &str) -> Result<ModelInferRequest> {
    let metadata = client
        .model_metadata(ModelMetadataRequest {
            name: model.to_owned(),
            version: String::new(),
        })
        .await
        .with_context(|| format!("ModelMetadata of {model}"))?
        .into_inner();
    let mut request = shamal_loadtest::request::build_request(&metadata, "", 1, 1, 42)?;
    request.model_name = model.to_owned();
    Ok(request)
}

/// Sends one request; returns the version that answered it.
async fn answering_version(client: &mut Client, request: &ModelInferRequest) -> Result<u64> {
    let mut call = tonic::Request::new(request.clone());
    call.set_timeout(Duration::from_secs(5));
    let response = client
        .model_infer(call)
        .await
        .context("inference through the router")?
        .into_inner();
    response.model_version.parse().with_context(|| {
        format!(
            "the answer names version '{}', not a number",
            response.model_version
        )
    })
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    mean_ms: f64,
}

impl Percentiles {
    fn of(samples: &[f64]) -> Percentiles {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        // Nearest rank.
        let rank = |p: f64| {
            let index = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
            sorted
                .get(index.saturating_sub(1).min(sorted.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0.0)
        };
        Percentiles {
            p50_ms: rank(50.0),
            p90_ms: rank(90.0),
            p99_ms: rank(99.0),
            max_ms: sorted.last().copied().unwrap_or(0.0),
            mean_ms: sorted.iter().sum::<f64>() / sorted.len().max(1) as f64,
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms (mean {:.2} ms)",
            self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms, self.mean_ms
        )
    }
}

#[derive(Debug, Serialize)]
struct Propagation {
    model: String,
    write: Write,
    changes: usize,
    confirm: usize,
    /// Write sent to first answer of the final new-version run, per change.
    samples_ms: Vec<f64>,
    /// The same, to when that answer's request was sent (a lower bound).
    samples_sent_ms: Vec<f64>,
    /// Round trip of the REST write itself (commit included).
    write_ack_ms: Vec<f64>,
    propagation: Percentiles,
    propagation_sent: Percentiles,
    write_ack: Percentiles,
    /// Probes sent over all changes.
    probes: u64,
    /// Old-version answers seen after a new-version one (should be 0).
    regressions: u64,
}

/// One timed change, from just before its write was sent.
struct Change {
    received: Duration,
    sent: Duration,
    ack: Duration,
    probes: u64,
    regressions: u64,
    revision: u64,
}

async fn propagation(
    args: &Args,
    rest: &Rest,
    router_url: &str,
    model: &str,
    mut revision: u64,
) -> Result<Propagation> {
    println!();
    println!(
        "== propagation: {} changes of {model} by {:?}, {} consecutive answers confirm",
        args.changes, args.write, args.confirm
    );
    let mut client = connect(router_url).await?;
    let request = request_for(&mut client, model).await?;
    // The rollout starts at weight 0: wait until the router routes by it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut streak = 0;
    while streak < 100 {
        if answering_version(&mut client, &request).await? == 1 {
            streak += 1;
        } else {
            streak = 0;
        }
        if Instant::now() > deadline {
            bail!("{model}: the router never settled on version 1");
        }
    }
    let mut received = Vec::with_capacity(args.changes);
    let mut sent = Vec::with_capacity(args.changes);
    let mut acks = Vec::with_capacity(args.changes);
    let (mut probes, mut regressions) = (0, 0);
    for index in 0..args.changes {
        let weight = if index % 2 == 0 { 100 } else { 0 };
        let change = one_change(args, rest, &mut client, &request, model, revision, weight)
            .await
            .with_context(|| format!("change {} (weight {weight})", index + 1))?;
        revision = change.revision;
        received.push(change.received.as_secs_f64() * 1e3);
        sent.push(change.sent.as_secs_f64() * 1e3);
        acks.push(change.ack.as_secs_f64() * 1e3);
        probes += change.probes;
        regressions += change.regressions;
        // A random pause, so that changes do not fall in step with the
        // services' periodic work (pool refresh, traffic reports).
        let pause = rand::random_range(5..50);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let result = Propagation {
        model: model.to_owned(),
        write: args.write,
        changes: args.changes,
        confirm: args.confirm,
        propagation: Percentiles::of(&received),
        propagation_sent: Percentiles::of(&sent),
        write_ack: Percentiles::of(&acks),
        samples_ms: received,
        samples_sent_ms: sent,
        write_ack_ms: acks,
        probes,
        regressions,
    };
    println!(
        "propagation (write sent -> first answer of the new version, all after it new): {}",
        result.propagation
    );
    println!(
        "  same, to the send time of that request:                                  {}",
        result.propagation_sent
    );
    println!(
        "  REST write round trip (registry commit included):                         {}",
        result.write_ack
    );
    println!(
        "  {} probes, {} old answers after a new one; target p99 < 100 ms: {}",
        result.probes,
        result.regressions,
        if result.propagation.p99_ms < 100.0 {
            "met"
        } else {
            "missed"
        }
    );
    Ok(result)
}

async fn one_change(
    args: &Args,
    rest: &Rest,
    client: &mut Client,
    request: &ModelInferRequest,
    model: &str,
    revision: u64,
    weight: u32,
) -> Result<Change> {
    let want: u64 = if weight == 100 { 2 } else { 1 };
    let start = Instant::now();
    let write = {
        let (rest, model, kind) = (rest.clone(), model.to_owned(), args.write);
        tokio::spawn(async move {
            let result = match kind {
                Write::Shift => rest.shift(&model, revision, weight).await,
                Write::Policy => {
                    rest.set_policy(&model, revision, 1, &[(2, weight), (1, 100 - weight)])
                        .await
                }
            };
            (result, start.elapsed())
        })
    };
    let mut write = Some(write);
    let mut acked: Option<(u64, Duration)> = None;
    let mut first_new: Option<(Duration, Duration)> = None;
    let (mut streak, mut probes, mut regressions) = (0, 0, 0);
    loop {
        let sent = start.elapsed();
        let version = answering_version(client, request).await?;
        let received = start.elapsed();
        probes += 1;
        if version == want {
            first_new.get_or_insert((received, sent));
            streak += 1;
        } else {
            if first_new.take().is_some() {
                regressions += 1;
            }
            streak = 0;
        }
        if let Some(handle) = write.take_if(|handle| handle.is_finished()) {
            let (result, ack) = handle.await.context("write task")?;
            acked = Some((result?, ack));
        }
        if streak >= args.confirm
            && let (Some((revision, ack)), Some((received, sent))) = (acked, first_new)
        {
            return Ok(Change {
                received,
                sent,
                ack,
                probes,
                regressions,
                revision,
            });
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("the router did not answer with version {want} within 10 s");
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Inferences and executions (batches) per (model, version), summed over
/// the workers' statistics.
async fn batch_counts(workers: &mut [Client]) -> Result<BTreeMap<(String, String), (u64, u64)>> {
    let mut counts: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for worker in workers {
        let stats = worker
            .model_statistics(ModelStatisticsRequest {
                name: String::new(),
                version: String::new(),
            })
            .await
            .context("ModelStatistics of a worker")?
            .into_inner();
        for model in stats.model_stats {
            let entry = counts.entry((model.name, model.version)).or_default();
            entry.0 += model.inference_count;
            entry.1 += model.execution_count;
        }
    }
    Ok(counts)
}

/// Closed-loop runs, alternating single version, three-version rollout and
/// the pinned rollout.
async fn throughput(
    args: &Args,
    rest: &Rest,
    router_url: &str,
    worker_urls: &[String],
    models: &Models,
) -> Result<Value> {
    println!();
    println!(
        "== throughput: concurrency {}, {:?} after {:?} warm-up, {} runs per configuration, alternating (order rotated each round); {} worker(s), placement {}",
        args.concurrency,
        args.duration,
        args.warmup,
        args.runs,
        args.workers,
        args.placement.as_str()
    );
    println!("   single:   one version, production alias, no rollout");
    println!("   rollout3: rollout 34/33/33 over three versions");
    println!(
        "   pinned:   rollout 100/0/0 over three versions (diagnostic: rollout routing, one busy version)"
    );
    let configs = [
        ("single", models.single.as_str()),
        ("rollout3", models.split.as_str()),
        ("pinned", models.pinned.as_str()),
    ];
    let mode = Mode::Closed {
        concurrency: args.concurrency,
    };
    let mut workers = Vec::with_capacity(worker_urls.len());
    for url in worker_urls {
        workers.push(connect(url).await?);
    }
    let before = batch_counts(&mut workers).await?;
    let mut reports: Vec<(String, usize, Report)> = Vec::new();
    for run in 1..=args.runs {
        // Each round starts one configuration later, so that none always
        // runs first (or right after the same other one).
        let mut order = configs;
        order.rotate_left((run - 1) % configs.len());
        for (label, model) in order {
            let mut config = Config::new(router_url, model);
            config.connections = args
                .connections
                .unwrap_or_else(|| Config::default_connections(&mode));
            config.mode = mode.clone();
            config.duration = args.duration;
            config.warmup = args.warmup;
            config.label = format!("{label} run {run}");
            let report = shamal_loadtest::run(config).await?;
            println!(
                "{label:>9} run {run}: {:>7.0} inf/s, p50 {:>6} us, p99 {:>6} us, errors {}",
                report.ips, report.p50_us, report.p99_us, report.error_total
            );
            if report.error_total > 0 {
                println!(
                    "           first error: {}",
                    report.first_error.as_deref().unwrap_or("?")
                );
            }
            reports.push((label.to_owned(), run, report));
        }
    }
    let after = batch_counts(&mut workers).await?;
    let runs_of = |label: &str| -> Vec<&Report> {
        reports
            .iter()
            .filter(|(name, _, _)| name == label)
            .map(|(_, _, report)| report)
            .collect()
    };
    let mean = |label: &str, field: fn(&Report) -> f64| {
        let runs = runs_of(label);
        runs.iter().map(|report| field(report)).sum::<f64>() / runs.len().max(1) as f64
    };
    let mut summary = BTreeMap::new();
    for (label, _) in configs {
        let (ips, p50, p99) = (
            mean(label, |r| r.ips),
            mean(label, |r| r.p50_us as f64),
            mean(label, |r| r.p99_us as f64),
        );
        let median = median(runs_of(label).iter().map(|r| r.ips).collect());
        println!(
            "{label:>9}: mean {ips:>7.0} inf/s, median {median:>7.0} inf/s, mean p50 {p50:>6.0} us, mean p99 {p99:>6.0} us"
        );
        summary.insert(
            label,
            json!({
                "mean_ips": ips,
                "median_ips": median,
                "mean_p50_us": p50,
                "mean_p99_us": p99,
                "errors": runs_of(label).iter().map(|r| r.error_total).sum::<u64>(),
            }),
        );
    }
    let mut ratios = BTreeMap::new();
    for label in ["rollout3", "pinned"] {
        let of = |name: &str, statistic: &str| summary[name][statistic].as_f64().unwrap_or(0.0);
        let mean_ratio = of(label, "mean_ips") / of("single", "mean_ips").max(1.0);
        let median_ratio = of(label, "median_ips") / of("single", "median_ips").max(1.0);
        let pairs: Vec<f64> = (1..=args.runs)
            .map(|run| {
                let ips = |name: &str| {
                    reports
                        .iter()
                        .find(|(n, r, _)| n == name && *r == run)
                        .map_or(0.0, |(_, _, report)| report.ips)
                };
                ips(label) / ips("single").max(1.0)
            })
            .collect();
        let verdict = match label {
            "rollout3" if median_ratio >= 0.95 => "; target >= 0.95: met",
            "rollout3" => "; target >= 0.95: missed",
            _ => "",
        };
        println!(
            "{label} / single throughput: median {median_ratio:.3}, mean {mean_ratio:.3} (per round: {}){verdict}",
            pairs
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        ratios.insert(
            label,
            json!({ "median": median_ratio, "mean": mean_ratio, "per_round": pairs }),
        );
    }

    // How the workers batched each configuration (their statistics, summed,
    // counted over the throughput runs, warm-ups included).
    let mut batching = BTreeMap::new();
    for (label, model) in configs {
        let mut parts = Vec::new();
        let (mut inferences, mut executions) = (0, 0);
        for ((name, version), (inf_after, exec_after)) in &after {
            if name != model {
                continue;
            }
            let (inf_before, exec_before) = before
                .get(&(name.clone(), version.clone()))
                .copied()
                .unwrap_or((0, 0));
            let (inf, exec) = (inf_after - inf_before, exec_after - exec_before);
            inferences += inf;
            executions += exec;
            if inf > 0 {
                parts.push(format!("v{version} {:.1}", inf as f64 / exec.max(1) as f64));
            }
        }
        let average = inferences as f64 / executions.max(1) as f64;
        println!(
            "{label:>9}: workers ran {inferences} inferences in {executions} executions, average batch {average:.1} ({})",
            parts.join(", ")
        );
        batching.insert(
            label,
            json!({ "inferences": inferences, "executions": executions, "average_batch": average }),
        );
    }

    // The split as the registry saw it, from the router's traffic reports
    // (sent every second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = rest.rollout_status(&models.split).await?;
    let analysis = status["analysis"].as_array().cloned().unwrap_or_default();
    let primary = || analysis.iter().filter(|entry| entry["role"] == "primary");
    let total: u64 = primary()
        .filter_map(|entry| entry["requests"].as_u64())
        .sum();
    let shares: Vec<String> = primary()
        .map(|entry| {
            let requests = entry["requests"].as_u64().unwrap_or(0);
            format!(
                "v{} {} ({:.1} %)",
                entry["version"],
                requests,
                100.0 * requests as f64 / total.max(1) as f64
            )
        })
        .collect();
    println!(
        "rollout3 traffic per version, as reported to the registry: {}",
        shares.join(", ")
    );
    Ok(json!({
        "concurrency": args.concurrency,
        "duration_s": args.duration.as_secs_f64(),
        "warmup_s": args.warmup.as_secs_f64(),
        "runs": reports.iter().map(|(label, run, report)| json!({
            "config": label, "run": run, "report": report,
        })).collect::<Vec<_>>(),
        "summary": summary,
        "ratio_over_single": ratios,
        "worker_batching": batching,
        "rollout3_registry_analysis": analysis,
    }))
}
