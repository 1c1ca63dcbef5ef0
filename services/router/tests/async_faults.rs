//! Async inference under faults, with real processes on loopback: two
//! cpu-worker processes consume a router's async queue on a redis-server of
//! the test's own (append-only file, fsync always). Under a few hundred
//! submitted jobs, one worker first stalls (SIGSTOP) past the reclaim idle
//! time while it holds unacknowledged entries, and finishes them late once
//! resumed; then it is killed (SIGKILL) holding others, and Redis is killed
//! (SIGKILL) and restarted on the same port and data directory. The other
//! worker reclaims and finishes everything: every submitted job has exactly
//! one result, the right one, written once.
//!
//! The test binary is its own worker: started with `SHAMAL_ASYNC_FAULT_CHILD`
//! set to a consumer name, it runs a real cpu-worker (ONNX Runtime, the
//! bundled `simple` model, the async consumer of `libs/worker` configured
//! from the cpu-worker's own settings) with two test fixtures around it,
//! which are not product components: every model execution takes
//! `INFERENCE_TIME` longer, so that jobs stay in the worker long enough to be
//! caught there unacknowledged; and its queue reports on stdout each job it
//! delivers to the worker and what became of each result the worker wrote,
//! so the test can account for every write (the worker's own counters die
//! with it).
//!
//! Needs the `redis-server` binary. Skipped, with a loud message, when it is
//! missing; under SHAMAL_REQUIRE_SERVICES=1 (scripts/test.sh, hence CI) it
//! fails instead (docs/testing.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use redis::streams::{StreamPendingCountReply, StreamPendingReply, StreamRangeReply};
use serde_json::{Value, json};
use shamal_async_queue::{
    Backlog, Delivery, Job, JobId, JobQueue, JobStatus, NewJob, Outcome, QueueConfig, RedisQueue,
    StreamKey,
};
use shamal_cpu_worker::{CpuWorkerArgs, CpuWorkerConfig, OnnxRuntime};
use shamal_tensor::Tensor;
use shamal_worker::backend::{InstanceDevice, RaggedAxis};
use shamal_worker::{
    Backend, BackendError, InstanceOptions, ModelSignature, QueueSource, Runtime, Worker,
    WorkerListeners,
};
use support::*;

const NAME: &str = "a_killed_worker_and_a_restarted_redis_lose_no_job_and_write_each_result_once";

/// Set in a child process to the consumer name it runs under.
const CHILD: &str = "SHAMAL_ASYNC_FAULT_CHILD";
/// The child's Redis URL.
const CHILD_REDIS: &str = "SHAMAL_ASYNC_FAULT_REDIS";
/// The child's model repository.
const CHILD_REPOSITORY: &str = "SHAMAL_ASYNC_FAULT_REPOSITORY";

const DOOMED: &str = "worker-doomed";
const SURVIVOR: &str = "worker-survivor";

const MODEL: &str = "simple";
/// Key prefix of the queue (router's and workers' `async_key_prefix`).
const PREFIX: &str = "shamal-async-faults";
/// Consumer group of the workers (the queue's default).
const GROUP: &str = "workers";
/// Lifetime of results (router's and workers' `async_result_ttl_ms`).
const RESULT_TTL_MS: u64 = 600_000;

/// Jobs submitted before the stall, and again before the crash.
const WAVE: usize = 150;
/// Results of a wave the doomed worker writes before its fault strikes, so
/// that both workers have been writing results when it does.
const SHARE: usize = 15;
/// Async jobs a worker runs at once (`async_concurrency`).
const CONCURRENCY: usize = 8;
/// Added to every model execution in the workers.
const INFERENCE_TIME: Duration = Duration::from_millis(50);
/// Idle time after which another worker may reclaim an entry: seconds here
/// rather than the production minute, so that reclaim happens in the test.
const MIN_IDLE: Duration = Duration::from_millis(1500);
/// Bound of the whole test.
const TEST_LIMIT: Duration = Duration::from_secs(60);

fn main() {
    if let Ok(consumer) = std::env::var(CHILD) {
        child_worker(&consumer);
        return;
    }
    let filter = std::env::args().nth(1).filter(|arg| !arg.starts_with('-'));
    if filter.is_some_and(|filter| !NAME.contains(&filter)) {
        return;
    }
    let Some(redis_server) = services::redis_server(NAME) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("test {NAME} ...");
    runtime.block_on(async {
        tokio::time::timeout(TEST_LIMIT, scenario(&redis_server))
            .await
            .unwrap_or_else(|_| panic!("{NAME} did not finish within {TEST_LIMIT:?}"));
    });
    println!("test {NAME} ... ok");
}

// ----- the child: a real cpu-worker, slowed, its queue reporting --------

fn child_worker(consumer: &str) {
    // The parent holds the other end of stdin: when it goes, however it
    // goes, stdin ends and this worker with it.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let setting = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} unset"));
        let args = CpuWorkerArgs {
            onnxruntime_library: Some(onnxruntime_library()),
            instances: Some(1),
            intra_threads: Some(1),
            node: shamal_worker::NodeArgs {
                model_repository: Some(PathBuf::from(setting(CHILD_REPOSITORY))),
                async_queue: Some(setting(CHILD_REDIS)),
                async_key_prefix: Some(PREFIX.to_owned()),
                async_result_ttl_ms: Some(RESULT_TTL_MS),
                async_concurrency: Some(CONCURRENCY),
                ..Default::default()
            },
            ..Default::default()
        };
        let config = CpuWorkerConfig::load(&args).unwrap();
        // The cpu-worker's own async settings, with two changes: a short
        // reclaim idle time, and the queue connected here to report.
        let mut settings = config.async_inference().expect("async_queue is set");
        let QueueSource::Redis {
            options,
            config: mut queue_config,
        } = settings.queue
        else {
            panic!("the cpu-worker's async queue is Redis");
        };
        queue_config.min_idle = MIN_IDLE;
        let queue = RedisQueue::connect(options, queue_config).await.unwrap();
        settings.queue = QueueSource::Shared(Arc::new(Reporting {
            queue,
            reading: std::sync::Once::new(),
        }));
        settings.consumer_id = Some(consumer.to_owned());
        let onnx = OnnxRuntime::new(&onnxruntime_library(), config.session_options()).unwrap();
        let worker = Worker::new(
            config.worker_config(),
            Arc::new(Slowed(onnx)),
            shamal_telemetry::MetricsRegistry::new(),
        )
        .with_async_inference(settings);
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("listening {}", grpc.local_addr().unwrap());
        worker
            .serve(
                WorkerListeners {
                    grpc,
                    metrics: None,
                },
                std::future::pending(),
            )
            .await
            .unwrap();
    });
}

/// ONNX Runtime with every model execution held `INFERENCE_TIME` longer.
struct Slowed(OnnxRuntime);

impl Runtime for Slowed {
    fn platform(&self) -> &'static str {
        self.0.platform()
    }

    fn backend(&self) -> &'static str {
        self.0.backend()
    }

    fn model_filename(&self) -> &'static str {
        self.0.model_filename()
    }

    fn formats(&self) -> &'static [&'static str] {
        self.0.formats()
    }

    fn signature(&self, model_file: &Path) -> Result<ModelSignature, BackendError> {
        self.0.signature(model_file)
    }

    fn instantiate(
        &self,
        model_file: &Path,
        options: &InstanceOptions,
    ) -> Result<Box<dyn Backend>, BackendError> {
        Ok(Box::new(SlowBackend(
            self.0.instantiate(model_file, options)?,
        )))
    }
}

struct SlowBackend(Box<dyn Backend>);

impl Backend for SlowBackend {
    fn infer(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, BackendError> {
        // Each instance runs on a thread of its own: blocking it is what a
        // slow model does.
        std::thread::sleep(INFERENCE_TIME);
        self.0.infer(inputs)
    }

    fn check(&self, inputs: &[Tensor]) -> Result<(), BackendError> {
        self.0.check(inputs)
    }

    fn ragged_axes(&self) -> Vec<RaggedAxis> {
        self.0.ragged_axes()
    }

    fn device(&self) -> InstanceDevice {
        self.0.device()
    }
}

type QueueResult<T> = shamal_async_queue::Result<T>;

/// The worker's Redis queue, printing `reading` when the worker's consumer
/// first reads, one line per job it delivers to the consumer (`delivered` or
/// `reclaimed`, id, attempts) and one per result the worker writes
/// (`written` if it was the first for its job, `refused` if the job already
/// had one, `write-error`).
struct Reporting {
    queue: RedisQueue,
    reading: std::sync::Once,
}

fn report_deliveries(how: &str, deliveries: &[Delivery]) {
    for delivery in deliveries {
        println!("{how} {} {}", delivery.job.id, delivery.attempts);
    }
}

impl JobQueue for Reporting {
    fn config(&self) -> &QueueConfig {
        self.queue.config()
    }

    fn submit(&self, job: NewJob) -> BoxFuture<'_, QueueResult<Job>> {
        self.queue.submit(job)
    }

    fn status<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, QueueResult<JobStatus>> {
        self.queue.status(id)
    }

    fn wait<'a>(
        &'a self,
        id: &'a JobId,
        timeout: Duration,
    ) -> BoxFuture<'a, QueueResult<JobStatus>> {
        self.queue.wait(id, timeout)
    }

    fn take<'a>(
        &'a self,
        streams: &'a [StreamKey],
        consumer: &'a str,
        max: usize,
        block: Duration,
    ) -> BoxFuture<'a, QueueResult<Vec<Delivery>>> {
        self.reading.call_once(|| println!("reading"));
        async move {
            let taken = self.queue.take(streams, consumer, max, block).await?;
            report_deliveries("delivered", &taken);
            Ok(taken)
        }
        .boxed()
    }

    fn reclaim<'a>(
        &'a self,
        streams: &'a [StreamKey],
        consumer: &'a str,
        max: usize,
    ) -> BoxFuture<'a, QueueResult<Vec<Delivery>>> {
        async move {
            let reclaimed = self.queue.reclaim(streams, consumer, max).await?;
            report_deliveries("reclaimed", &reclaimed);
            Ok(reclaimed)
        }
        .boxed()
    }

    fn touch<'a>(&'a self, deliveries: &'a [Delivery]) -> BoxFuture<'a, QueueResult<()>> {
        self.queue.touch(deliveries)
    }

    fn complete<'a>(
        &'a self,
        delivery: &'a Delivery,
        outcome: Outcome,
    ) -> BoxFuture<'a, QueueResult<bool>> {
        async move {
            let written = self.queue.complete(delivery, outcome).await;
            let what = match &written {
                Ok(true) => "written",
                Ok(false) => "refused",
                Err(_) => "write-error",
            };
            println!("{what} {}", delivery.job.id);
            written
        }
        .boxed()
    }

    fn cancel<'a>(
        &'a self,
        stream: &'a StreamKey,
        id: &'a JobId,
        outcome: Outcome,
    ) -> BoxFuture<'a, QueueResult<bool>> {
        self.queue.cancel(stream, id, outcome)
    }

    fn backlog<'a>(&'a self, stream: &'a StreamKey) -> BoxFuture<'a, QueueResult<Backlog>> {
        self.queue.backlog(stream)
    }

    fn streams(&self) -> BoxFuture<'_, QueueResult<Vec<StreamKey>>> {
        self.queue.streams()
    }
}

// ----- the parent's view of a worker process ----------------------------

/// What a worker's queue reported (see [`Reporting`]).
#[derive(Default)]
struct Ledger {
    /// Job id, attempts (this one included) and whether it was reclaimed
    /// from another consumer, of every delivery to the worker.
    delivered: Vec<(String, u32, bool)>,
    /// Results the worker wrote, the first of their job.
    written: Vec<String>,
    /// Results refused because their job already had one.
    refused: Vec<String>,
    /// Writes that failed (Redis unreachable); the consumer retries them.
    write_errors: usize,
    /// Whether the worker's consumer reads the stream.
    reading: bool,
}

impl Ledger {
    fn record(&mut self, line: &str) {
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            [how @ ("delivered" | "reclaimed"), id, attempts] => self.delivered.push((
                (*id).to_owned(),
                attempts.parse().unwrap_or(0),
                *how == "reclaimed",
            )),
            ["written", id] => self.written.push((*id).to_owned()),
            ["refused", id] => self.refused.push((*id).to_owned()),
            ["write-error", _] => self.write_errors += 1,
            ["reading"] => self.reading = true,
            _ => {}
        }
    }

    /// Jobs delivered to the worker that it has not answered yet (neither
    /// written nor refused a result for).
    fn holding(&self) -> HashSet<String> {
        let mut open: HashMap<&str, i64> = HashMap::new();
        for (id, ..) in &self.delivered {
            *open.entry(id).or_default() += 1;
        }
        for id in self.written.iter().chain(&self.refused) {
            *open.entry(id).or_default() -= 1;
        }
        open.into_iter()
            .filter(|(_, open)| *open > 0)
            .map(|(id, _)| id.to_owned())
            .collect()
    }

    fn reclaimed(&self) -> usize {
        self.delivered
            .iter()
            .filter(|(_, _, reclaimed)| *reclaimed)
            .count()
    }
}

/// A worker process (this binary as a child); killed when dropped.
struct WorkerProcess {
    name: &'static str,
    process: Child,
    address: SocketAddr,
    ledger: Arc<Mutex<Ledger>>,
}

impl WorkerProcess {
    fn start(name: &'static str, redis: &str, repository: &Path) -> WorkerProcess {
        let mut process = Command::new(std::env::current_exe().unwrap())
            .env(CHILD, name)
            .env(CHILD_REDIS, redis)
            .env(CHILD_REPOSITORY, repository)
            // Left open: its end tells the child that this process is gone.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = process.stdout.take().unwrap();
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let (first_line, listening) = std::sync::mpsc::channel();
        std::thread::spawn({
            let ledger = ledger.clone();
            move || {
                let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
                let _ = first_line.send(lines.next().unwrap_or_default());
                for line in lines {
                    ledger.lock().unwrap().record(&line);
                }
            }
        });
        let line = listening
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("worker {name} did not start within 30 s"));
        let address = line
            .strip_prefix("listening ")
            .and_then(|address| address.parse().ok())
            .unwrap_or_else(|| panic!("worker {name} did not start: {line:?}"));
        WorkerProcess {
            name,
            process,
            address,
            ledger,
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.process.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {} failed", self.name);
    }

    fn kill9(&mut self) {
        self.process.kill().unwrap();
        self.process.wait().unwrap();
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Waits until `worker` has written `written` results in all and runs
/// jobs, stops it (SIGSTOP) and returns the jobs Redis has delivered to it
/// and not had acknowledged (XPENDING), and among them those it was running
/// (its queue had handed them to its consumer): at least one. A stopped
/// process sends nothing more, so once what it sent last has been processed
/// its pending entries stay as they are. Caught between two jobs, it is
/// resumed and caught again.
async fn stop_while_holding(
    worker: &WorkerProcess,
    written: usize,
    redis: &str,
) -> (HashSet<String>, HashSet<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            Instant::now() < deadline,
            "{} never held unacknowledged jobs after writing {written} results",
            worker.name
        );
        let ready = {
            let ledger = worker.ledger();
            ledger.written.len() >= written && !ledger.holding().is_empty()
        };
        if !ready {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        worker.signal("-STOP");
        // Time for Redis to process what it sent just before, and for its
        // last lines to reach the ledger.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let pending = pending_jobs(redis, worker.name).await;
        let holding = worker.ledger().holding();
        let running: HashSet<String> = pending.intersection(&holding).cloned().collect();
        if !running.is_empty() {
            return (pending, running);
        }
        worker.signal("-CONT");
    }
}

// ----- Redis, as the test inspects it -----------------------------------

/// One command on a connection of its own (the server restarts under the
/// test), bounded in time.
async fn redis_query<T: redis::FromRedisValue>(
    url: &str,
    command: &redis::Cmd,
) -> Result<T, String> {
    let attempt = async {
        let client = redis::Client::open(url)?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        command.query_async::<T>(&mut connection).await
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(result) => result.map_err(|error| error.to_string()),
        Err(_) => Err(format!("{command:?} timed out")),
    }
}

fn stream_key() -> String {
    format!("{PREFIX}:stream:{MODEL}:local")
}

fn result_key(id: &str) -> String {
    format!("{PREFIX}:result:{id}")
}

fn job_key(id: &str) -> String {
    format!("{PREFIX}:job:{id}")
}

/// Jobs whose stream entries Redis has delivered to `consumer` and not had
/// acknowledged: XPENDING, then each entry's job id.
async fn pending_jobs(url: &str, consumer: &str) -> HashSet<String> {
    let mut command = redis::cmd("XPENDING");
    command
        .arg(stream_key())
        .arg(GROUP)
        .arg("-")
        .arg("+")
        .arg(10_000)
        .arg(consumer);
    let pending: StreamPendingCountReply = redis_query(url, &command).await.unwrap();
    let mut jobs = HashSet::new();
    for entry in pending.ids {
        let mut command = redis::cmd("XRANGE");
        command.arg(stream_key()).arg(&entry.id).arg(&entry.id);
        let entries: StreamRangeReply = redis_query(url, &command).await.unwrap();
        jobs.extend(entries.ids.iter().filter_map(|entry| entry.get("id")));
    }
    jobs
}

/// How many of `keys` exist.
async fn existing(url: &str, keys: impl IntoIterator<Item = String>) -> Result<usize, String> {
    let mut command = redis::cmd("EXISTS");
    for key in keys {
        command.arg(key);
    }
    redis_query(url, &command).await
}

/// How many of `ids` have a result.
async fn with_result(url: &str, ids: &[String]) -> Result<usize, String> {
    existing(url, ids.iter().map(|id| result_key(id))).await
}

/// The stored (encoded) results of `ids`.
async fn stored_results(url: &str, ids: &[String]) -> Vec<Option<Vec<u8>>> {
    let mut command = redis::cmd("MGET");
    for id in ids {
        command.arg(result_key(id));
    }
    redis_query(url, &command).await.unwrap()
}

// ----- requests and answers ----------------------------------------------

/// Request `index`'s inputs: rows of its own, so that an answer shows which
/// request it answers.
fn inputs(index: usize) -> (Vec<i32>, Vec<i32>) {
    let index = i32::try_from(index).unwrap();
    (
        (0..16).map(|k| index * 16 + k).collect(),
        (0..16).map(|k| 3 * k - index).collect(),
    )
}

fn request_body(index: usize) -> Value {
    let (input0, input1) = inputs(index);
    json!({
        "id": format!("request-{index}"),
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": input0},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": input1},
        ],
    })
}

/// Checks the answer to request `index`: `simple` version 1 computes
/// INPUT0 + INPUT1 and INPUT0 - INPUT1.
fn check_answer(index: usize, answer: &Value) {
    assert_eq!(answer["id"], format!("request-{index}"), "{answer}");
    assert_eq!(answer["model_version"], "1", "{answer}");
    let output = |name: &str| -> Vec<i64> {
        answer["outputs"]
            .as_array()
            .and_then(|outputs| outputs.iter().find(|output| output["name"] == name))
            .and_then(|output| output["data"].as_array())
            .unwrap_or_else(|| panic!("no {name} in the answer to request {index}: {answer}"))
            .iter()
            .map(|value| value.as_i64().unwrap())
            .collect()
    };
    let (input0, input1) = inputs(index);
    let pairs = || input0.iter().zip(&input1);
    let sums: Vec<i64> = pairs().map(|(a, b)| i64::from(a + b)).collect();
    let differences: Vec<i64> = pairs().map(|(a, b)| i64::from(a - b)).collect();
    assert_eq!(output("OUTPUT0"), sums, "OUTPUT0 of request {index}");
    assert_eq!(output("OUTPUT1"), differences, "OUTPUT1 of request {index}");
}

/// Submits requests `indexes` over HTTP, eight at a time; every submission
/// must be accepted. Returns each request's index and job id.
async fn submit(http: SocketAddr, indexes: Range<usize>) -> Vec<(usize, String)> {
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(indexes.start));
    let submitters: Vec<_> = (0..8)
        .map(|_| {
            let (client, next, end) = (client.clone(), next.clone(), indexes.end);
            tokio::spawn(async move {
                let mut submitted = Vec::new();
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= end {
                        return submitted;
                    }
                    let response = client
                        .post(format!(
                            "http://{http}/v2/models/{MODEL}/versions/1/infer/async"
                        ))
                        .json(&request_body(index))
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await
                        .unwrap();
                    let status = response.status().as_u16();
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    assert_eq!(status, 202, "submission of request {index} refused: {body}");
                    submitted.push((index, body["id"].as_str().unwrap().to_owned()));
                }
            })
        })
        .collect();
    let mut submitted = Vec::new();
    for submitter in submitters {
        submitted.extend(submitter.await.unwrap());
    }
    submitted
}

/// The finished job `id` through the router (`GET /v2/async/{id}`, long
/// polling): HTTP status, the worker and attempts headers, and the body.
/// Retried while the job is pending or the queue unreachable.
async fn fetch(client: &reqwest::Client, http: SocketAddr, id: &str) -> (u16, String, u32, Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = client
            .get(format!("http://{http}/v2/async/{id}?wait_ms=5000"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let (state, worker, attempts) = (
            header("x-shamal-async-state"),
            header("x-shamal-async-worker"),
            header("x-shamal-async-attempts").parse().unwrap_or(0),
        );
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if state == "done" || !matches!(status, 202 | 503) {
            return (status, worker, attempts, body);
        }
        assert!(
            Instant::now() < deadline,
            "job {id} still not done: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `condition` every 20 ms until it holds; fails naming `what` after
/// `limit`.
async fn within<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A model repository holding only `simple` (both versions).
fn simple_repository() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        workspace_root().join("models/repository/simple"),
        dir.path().join(MODEL),
    )
    .unwrap();
    dir
}

// ----- the scenario ---------------------------------------------------------

async fn scenario(redis_server: &Path) {
    let started = Instant::now();
    let mut redis = RedisServer::start(redis_server).await;
    let url = redis.url();
    let repository = simple_repository();
    let mut doomed = WorkerProcess::start(DOOMED, &url, repository.path());
    let survivor = WorkerProcess::start(SURVIVOR, &url, repository.path());
    let router = start_router(
        vec![doomed.address.to_string(), survivor.address.to_string()],
        |config| {
            config.async_queue = Some(url.clone());
            config.async_key_prefix = PREFIX.to_owned();
            config.async_result_ttl_ms = RESULT_TTL_MS;
            // A submission may read the model's signature from the stopped
            // worker before the router finds it unhealthy: it then goes
            // ahead unchecked after this long, rather than after 30 s.
            config.default_timeout_ms = 2_000;
        },
    )
    .await;
    wait_ready(router.running.address, MODEL).await;
    let client = reqwest::Client::new();
    // The router connects to Redis in the background: it has when an
    // unknown id is answered 404 rather than 503.
    let unknown = format!("http://{}/v2/async/{}", router.http, "0".repeat(26));
    within(
        Duration::from_secs(10),
        "the router's async queue is connected",
        || async {
            client
                .get(&unknown)
                .send()
                .await
                .is_ok_and(|response| response.status() == 404)
        },
    )
    .await;
    // Both consumers read the stream before anything is submitted, or the
    // first could take the whole first wave.
    within(
        Duration::from_secs(20),
        "both workers read the stream",
        || async { doomed.ledger().reading && survivor.ledger().reading },
    )
    .await;

    // ----- a stall: the doomed worker stops (a long pause) holding jobs,
    // longer than the reclaim idle time, and finishes them when resumed.
    let wave = tokio::spawn(submit(router.http, 0..WAVE));
    let (stalled, stalled_running) = stop_while_holding(&doomed, SHARE, &url).await;
    let stalled_at = Instant::now();
    let first_wave = wave.await.unwrap();
    let first_ids: Vec<String> = first_wave.iter().map(|(_, id)| id.clone()).collect();
    within(
        Duration::from_secs(20),
        "the survivor finished the first wave, the stalled worker's jobs included",
        || async { with_result(&url, &first_ids).await == Ok(first_ids.len()) },
    )
    .await;
    let stall_recovered = stalled_at.elapsed();
    {
        let survivor = survivor.ledger();
        for id in &stalled {
            assert!(
                survivor
                    .delivered
                    .iter()
                    .any(|(job, _, reclaimed)| job == id && *reclaimed),
                "the survivor reclaimed {id}, pending for the stalled worker"
            );
            assert!(
                survivor.written.contains(id),
                "the survivor wrote the result of {id}"
            );
        }
    }
    let first_results = stored_results(&url, &first_ids).await;
    doomed.signal("-CONT");
    within(
        Duration::from_secs(10),
        "the resumed worker answered every job it held",
        || async { doomed.ledger().holding().is_empty() },
    )
    .await;
    {
        let doomed = doomed.ledger();
        for id in &stalled_running {
            assert!(
                doomed.refused.contains(id) && !doomed.written.contains(id),
                "the stalled worker's late result of {id} was refused: the first write wins"
            );
        }
    }
    assert!(
        stored_results(&url, &first_ids).await == first_results,
        "no result changed when the stalled worker finished its jobs late"
    );

    // ----- a crash: the doomed worker dies holding jobs, then Redis dies.
    let written = doomed.ledger().written.len();
    let wave = tokio::spawn(submit(router.http, WAVE..2 * WAVE));
    stop_while_holding(&doomed, written + SHARE, &url).await;
    doomed.kill9();
    let killed_at = Instant::now();
    let abandoned = pending_jobs(&url, DOOMED).await;
    assert!(
        !abandoned.is_empty(),
        "the killed worker left unacknowledged entries"
    );
    let submitted: Vec<(usize, String)> =
        first_wave.into_iter().chain(wave.await.unwrap()).collect();
    let ids: Vec<String> = submitted.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        2 * WAVE,
        "every submission got an id of its own"
    );
    let written_before_crash: Vec<String> = ids
        .iter()
        .zip(stored_results(&url, &ids).await)
        .filter_map(|(id, result)| result.map(|_| id.clone()))
        .collect();
    redis.kill9();
    let crashed_at = Instant::now();
    redis.restart().await;
    let redis_down = crashed_at.elapsed();
    // Not asserted (the survivor may reclaim them first): the dead worker's
    // entries still pending for it, from the append-only file.
    let still_pending = pending_jobs(&url, DOOMED)
        .await
        .intersection(&abandoned)
        .count();
    // Nothing Redis acknowledged is lost: every job is still known, and
    // every result written before the crash is still there.
    assert_eq!(
        existing(&url, ids.iter().map(|id| job_key(id))).await,
        Ok(ids.len()),
        "every submitted job's record survived the crash"
    );
    assert_eq!(
        with_result(&url, &written_before_crash).await,
        Ok(written_before_crash.len()),
        "every result written before the crash survived it"
    );
    within(
        Duration::from_secs(30),
        "every job has a result after the crashes",
        || async { with_result(&url, &ids).await == Ok(ids.len()) },
    )
    .await;
    let finished_after_kill = killed_at.elapsed();
    let finished_after_restart = crashed_at.elapsed() - redis_down;

    // ----- every job has one result, the right one, written once.
    let mut answers = HashMap::new();
    let mut workers: HashMap<String, String> = HashMap::new();
    let mut attempts: BTreeMap<u32, usize> = BTreeMap::new();
    for (index, id) in &submitted {
        let (status, worker, tries, answer) = fetch(&client, router.http, id).await;
        assert_eq!(status, 200, "job {id} (request {index}) failed: {answer}");
        check_answer(*index, &answer);
        *attempts.entry(tries).or_default() += 1;
        workers.insert(id.clone(), worker);
        answers.insert(*index, answer);
    }
    for id in stalled.iter().chain(&abandoned) {
        assert_eq!(
            workers[id], SURVIVOR,
            "{id}, left by the doomed worker, answered by the survivor"
        );
    }
    // The answers are the synchronous endpoint's, for a job of each kind.
    let index_of: HashMap<&String, usize> =
        submitted.iter().map(|(index, id)| (id, *index)).collect();
    let samples = [
        0,
        index_of[stalled.iter().next().unwrap()],
        index_of[abandoned.iter().next().unwrap()],
    ];
    for index in samples {
        let response = client
            .post(format!(
                "http://{}/v2/models/{MODEL}/versions/1/infer",
                router.http
            ))
            .json(&request_body(index))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(
            answer, answers[&index],
            "request {index}: async and sync answers"
        );
    }
    // No job's result was written twice, by what each worker's queue saw.
    let writers = {
        let (doomed, survivor) = (doomed.ledger(), survivor.ledger());
        let mut writes: HashMap<&str, usize> = HashMap::new();
        for id in doomed.written.iter().chain(&survivor.written) {
            *writes.entry(id).or_default() += 1;
        }
        let rewritten: Vec<_> = writes.iter().filter(|(_, writes)| **writes > 1).collect();
        assert!(
            rewritten.is_empty(),
            "results written more than once: {rewritten:?}"
        );
        format!(
            "the doomed worker wrote {} results and had {} refused; the survivor wrote {}, had {} \
             refused, reclaimed {} entries and saw {} writes fail while Redis was down",
            doomed.written.len(),
            doomed.refused.len(),
            survivor.written.len(),
            survivor.refused.len(),
            survivor.reclaimed(),
            survivor.write_errors,
        )
    };
    assert!(
        stored_results(&url, &first_ids).await == first_results,
        "no result of the first wave changed through the crashes"
    );
    // Every entry was acknowledged (and deleted with its acknowledgement),
    // and the results are exactly the submitted jobs'.
    let length: usize = redis_query(&url, redis::cmd("XLEN").arg(stream_key()))
        .await
        .unwrap();
    assert_eq!(length, 0, "entries left in the stream");
    let pending: StreamPendingReply =
        redis_query(&url, redis::cmd("XPENDING").arg(stream_key()).arg(GROUP))
            .await
            .unwrap();
    assert_eq!(pending.count(), 0, "entries left unacknowledged");
    let result_keys: Vec<String> =
        redis_query(&url, redis::cmd("KEYS").arg(format!("{PREFIX}:result:*")))
            .await
            .unwrap();
    assert_eq!(
        result_keys.into_iter().collect::<HashSet<_>>(),
        ids.iter().map(|id| result_key(id)).collect::<HashSet<_>>(),
        "one result per submitted job, no other"
    );

    println!(
        "  stall: the doomed worker stopped holding {} unacknowledged entries ({} of them running); \
         the survivor reclaimed them and finished the first wave {:.1} s later; the {} late \
         results were refused",
        stalled.len(),
        stalled_running.len(),
        stall_recovered.as_secs_f64(),
        stalled_running.len(),
    );
    println!(
        "  crash: the doomed worker killed holding {} unacknowledged entries; Redis killed and \
         back in {} ms with every job and result ({} of those entries still pending for the dead \
         worker); every result {:.1} s after the kill, {:.1} s after Redis came back",
        abandoned.len(),
        redis_down.as_millis(),
        still_pending,
        finished_after_kill.as_secs_f64(),
        finished_after_restart.as_secs_f64(),
    );
    println!(
        "  {} jobs, each answered right once (attempts: jobs {attempts:?}); {writers}; {:.1} s in all",
        ids.len(),
        started.elapsed().as_secs_f64(),
    );
    router.running.stop().await.unwrap();
}
