//! Load generator for the KServe v2 / Triton gRPC inference API.
//!
//! Closed loop: `concurrency` workers each keep one request in flight.
//! Open loop: requests arrive at a fixed rate; latency is measured from the
//! intended send time (no coordinated omission) and at most `max_outstanding`
//! are in flight, further arrivals being counted as `dropped_by_client`.
//! Refusals (RESOURCE_EXHAUSTED) are also timed from the actual send, which
//! leaves out the generator's own lateness: its timer fires at most once a
//! millisecond, and on a busy machine its thread waits for a core too.

pub mod duration;
pub mod report;
pub mod request;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::inference::{ModelInferRequest, ModelMetadataRequest};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

pub use duration::parse_duration;
pub use report::{Report, Stats};

type Client = GrpcInferenceServiceClient<Channel>;

/// How requests are issued.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Each of `concurrency` workers sends its next request when the previous one ends.
    Closed { concurrency: usize },
    /// `rate` arrivals per second, with at most `max_outstanding` in flight.
    Open { rate: f64, max_outstanding: usize },
}

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub url: String,
    pub model: String,
    /// Empty for the server's default version.
    pub model_version: String,
    pub batch: usize,
    /// Size given to variable dimensions other than the leading batch one.
    pub dim: usize,
    pub mode: Mode,
    pub duration: Duration,
    pub warmup: Duration,
    /// HTTP/2 connections; requests are spread over them round-robin.
    pub connections: usize,
    /// gRPC deadline of each request.
    pub timeout: Duration,
    pub label: String,
    /// Inputs sent with every element set to one value instead of random
    /// contents (e.g. an attention mask of 1s), by input name.
    pub fill: Vec<(String, f64)>,
    /// Bearer access token sent with every request (a router with auth on).
    pub token: Option<String>,
    /// TLS to the router, presenting this certificate (a service identity,
    /// e.g. the batch coordinator's); the URL's host must be in the
    /// router's certificate (`https://localhost:8001`).
    pub tls: Option<shamal_tls::TlsFiles>,
}

impl Config {
    /// A closed-loop configuration with the documented defaults.
    pub fn new(url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            model: model.into(),
            model_version: String::new(),
            batch: 1,
            dim: 1,
            mode: Mode::Closed { concurrency: 1 },
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            connections: 1,
            timeout: Duration::from_secs(5),
            label: String::new(),
            fill: Vec::new(),
            token: None,
            tls: None,
        }
    }

    /// The `authorization` metadata of every request, when a token is set.
    fn authorization(&self) -> Result<Option<Authorization>> {
        self.token
            .as_ref()
            .map(|token| {
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| anyhow::anyhow!("the token is not a valid header value"))
            })
            .transpose()
    }

    /// The default number of connections for a mode: min(concurrency, 4), or 4.
    pub fn default_connections(mode: &Mode) -> usize {
        match mode {
            Mode::Closed { concurrency } => (*concurrency).clamp(1, 4),
            Mode::Open { .. } => 4,
        }
    }
}

/// Extra time the client waits past the deadline before giving up by itself.
const CLIENT_GRACE: Duration = Duration::from_secs(1);

/// Runs the load described by `config` and returns its report.
/// The `authorization` metadata value (`Bearer <token>`).
type Authorization = tonic::metadata::MetadataValue<tonic::metadata::Ascii>;

pub async fn run(config: Config) -> Result<Report> {
    if config.batch == 0 || config.dim == 0 || config.connections == 0 {
        bail!("batch, dim and connections must be at least 1");
    }
    match config.mode {
        Mode::Closed { concurrency: 0 } => bail!("concurrency must be at least 1"),
        Mode::Open {
            rate,
            max_outstanding,
        } if !rate.is_finite() || rate <= 0.0 || max_outstanding == 0 => {
            bail!("rate and max outstanding must be positive")
        }
        _ => {}
    }
    let clients = connect(&config).await?;
    let mut first = clients[0].clone();
    let mut meta_req = tonic::Request::new(ModelMetadataRequest {
        name: config.model.clone(),
        version: config.model_version.clone(),
    });
    if let Some(value) = config.authorization()? {
        meta_req.metadata_mut().insert("authorization", value);
    }
    // Metadata is set-up, not load: it gets a generous deadline of its own.
    meta_req.set_timeout(config.timeout.max(Duration::from_secs(10)));
    let metadata = first
        .model_metadata(meta_req)
        .await
        .with_context(|| format!("ModelMetadata of {}", config.model))?
        .into_inner();
    if config.batch > 1 && !request::has_batch_dim(&metadata) {
        eprintln!(
            "warning: {} has no variable batch dimension; --batch {} only scales inferences/s",
            config.model, config.batch
        );
    }
    let mut infer_request = request::build_request(
        &metadata,
        &config.model_version,
        config.batch,
        config.dim,
        42,
    )?;
    for (input, value) in &config.fill {
        request::fill_input(&mut infer_request, input, *value)?;
    }
    // Address the model by the name we were given, whatever metadata echoes.
    infer_request.model_name = config.model.clone();

    let start = Instant::now();
    let measure_from = start + config.warmup;
    let end = measure_from + config.duration;
    let (stats, dropped) = match config.mode {
        Mode::Closed { concurrency } => {
            let stats = closed_loop(
                &config,
                &clients,
                &infer_request,
                concurrency,
                measure_from,
                end,
            )
            .await?;
            (stats, 0)
        }
        Mode::Open {
            rate,
            max_outstanding,
        } => {
            open_loop(
                &config,
                &clients,
                &infer_request,
                rate,
                max_outstanding,
                start,
                measure_from,
                end,
            )
            .await?
        }
    };

    let (concurrency, rate, max_outstanding, mode) = match config.mode {
        Mode::Closed { concurrency } => (Some(concurrency), None, None, "closed"),
        Mode::Open {
            rate,
            max_outstanding,
        } => (None, Some(rate), Some(max_outstanding), "open"),
    };
    let mut report = Report {
        label: if config.label.is_empty() {
            format!("{} b{}", config.model, config.batch)
        } else {
            config.label.clone()
        },
        url: config.url.clone(),
        model: config.model.clone(),
        model_version: config.model_version.clone(),
        mode: mode.to_string(),
        concurrency,
        rate,
        max_outstanding,
        connections: config.connections,
        batch: config.batch,
        duration_s: config.duration.as_secs_f64(),
        warmup_s: config.warmup.as_secs_f64(),
        timeout_ms: config.timeout.as_millis() as u64,
        sent: 0,
        ok: 0,
        errors: Default::default(),
        error_total: 0,
        dropped_by_client: 0,
        first_error: None,
        rps: 0.0,
        ips: 0.0,
        p50_us: 0,
        p90_us: 0,
        p99_us: 0,
        p999_us: 0,
        max_us: 0,
        min_us: 0,
        mean_us: 0.0,
        rejected_p50_us: 0,
        rejected_p99_us: 0,
        rejected_max_us: 0,
        rejected_from_send_p50_us: 0,
        rejected_from_send_p99_us: 0,
        rejected_from_send_max_us: 0,
    };
    report.fill(&stats, dropped);
    Ok(report)
}

async fn connect(config: &Config) -> Result<Vec<Client>> {
    let endpoint = Endpoint::from_shared(config.url.clone())
        .with_context(|| format!("bad url {}", config.url))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_adaptive_window(true);
    let tls = match &config.tls {
        Some(files) => Some(shamal_tls::ClientTls::new(files)?),
        None => None,
    };
    let mut clients = Vec::with_capacity(config.connections);
    for _ in 0..config.connections {
        // One Channel per connection: each `connect` opens its own HTTP/2 connection.
        let channel = match &tls {
            Some(tls) => tls.connect(endpoint.clone()).await,
            None => endpoint.connect().await,
        }
        .with_context(|| format!("connecting to {}", config.url))?;
        clients.push(
            GrpcInferenceServiceClient::new(channel)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        );
    }
    Ok(clients)
}

/// Sends one request; `Err` carries the gRPC code and message of a failure.
async fn infer(
    client: &mut Client,
    request: ModelInferRequest,
    timeout: Duration,
    auth: Option<&Authorization>,
) -> Result<(), (Code, String)> {
    let mut request = tonic::Request::new(request);
    request.set_timeout(timeout);
    if let Some(value) = auth {
        request
            .metadata_mut()
            .insert("authorization", value.clone());
    }
    match tokio::time::timeout(timeout + CLIENT_GRACE, client.model_infer(request)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err((error_code(&status), status.message().to_string())),
        Err(_) => Err((Code::DeadlineExceeded, "client-side timeout".to_string())),
    }
}

/// The gRPC code of a failure; tonic reports its own client-side enforcement
/// of the deadline as CANCELLED, which is counted here as DEADLINE_EXCEEDED.
fn error_code(status: &tonic::Status) -> Code {
    let client_timeout = std::error::Error::source(status)
        .is_some_and(|e| e.downcast_ref::<tonic::TimeoutExpired>().is_some());
    if status.code() == Code::Cancelled
        && (client_timeout || status.message() == tonic::TimeoutExpired(()).to_string())
    {
        Code::DeadlineExceeded
    } else {
        status.code()
    }
}

async fn closed_loop(
    config: &Config,
    clients: &[Client],
    request: &ModelInferRequest,
    concurrency: usize,
    measure_from: Instant,
    end: Instant,
) -> Result<Stats> {
    let max_latency = config.timeout + CLIENT_GRACE;
    let mut workers = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let mut client = clients[i % clients.len()].clone();
        let request = request.clone();
        let timeout = config.timeout;
        let auth = config.authorization()?;
        workers.push(tokio::spawn(async move {
            let mut stats = Stats::new(max_latency);
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let result = infer(&mut client, request.clone(), timeout, auth.as_ref()).await;
                if sent < measure_from {
                    continue;
                }
                match result {
                    Ok(()) => stats.record_ok(sent.elapsed()),
                    Err((code, message)) => {
                        let latency = sent.elapsed();
                        stats.record_error(code, &message, latency, latency);
                    }
                }
            }
            stats
        }));
    }
    let mut total = Stats::new(max_latency);
    for worker in workers {
        total.merge(worker.await.context("closed-loop worker panicked")?);
    }
    Ok(total)
}

#[allow(clippy::too_many_arguments)]
async fn open_loop(
    config: &Config,
    clients: &[Client],
    request: &ModelInferRequest,
    rate: f64,
    max_outstanding: usize,
    start: Instant,
    measure_from: Instant,
    end: Instant,
) -> Result<(Stats, u64)> {
    let max_latency = config.timeout + CLIENT_GRACE;
    let stats = Arc::new(Mutex::new(Stats::new(max_latency)));
    let auth = config.authorization()?;
    let permits = Arc::new(Semaphore::new(max_outstanding));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut dropped = 0u64;
    for i in 0u64.. {
        // Intended send time of arrival i, computed from the start to avoid drift.
        let intended = start + interval.mul_f64(i as f64);
        if intended >= end {
            break;
        }
        if intended > Instant::now() {
            tokio::time::sleep_until(intended).await;
        }
        let measured = intended >= measure_from;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if measured {
                dropped += 1;
            }
            continue;
        };
        let mut client = clients[(i % clients.len() as u64) as usize].clone();
        let request = request.clone();
        let stats = stats.clone();
        let timeout = config.timeout;
        let auth = auth.clone();
        tokio::spawn(async move {
            let sent = Instant::now();
            let result = infer(&mut client, request, timeout, auth.as_ref()).await;
            // Latency from the intended send time: queueing in the client counts.
            let latency = intended.elapsed();
            let since_send = sent.elapsed();
            if measured {
                let mut stats = stats.lock().unwrap_or_else(|e| e.into_inner());
                match result {
                    Ok(()) => stats.record_ok(latency),
                    Err((code, message)) => stats.record_error(code, &message, latency, since_send),
                }
            }
            // Released only after recording, so the final drain sees every result.
            drop(permit);
        });
    }
    // Wait for the requests still in flight.
    let _all = permits
        .acquire_many(max_outstanding as u32)
        .await
        .context("semaphore closed")?;
    let mut total = Stats::new(max_latency);
    let mut shared = stats.lock().unwrap_or_else(|e| e.into_inner());
    total.merge(std::mem::replace(&mut *shared, Stats::new(max_latency)));
    Ok((total, dropped))
}
