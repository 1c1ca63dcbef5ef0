//! Fault tests with real processes on loopback: two cpu-worker processes
//! behind one router, under steady load, while one of them is killed with
//! SIGKILL or becomes ten times slower.
//!
//! The test binary is its own worker: started with `SHAMAL_FAULT_CHILD` set,
//! it runs a real cpu-worker (ONNX Runtime, the bundled `demo` model) and
//! serves it through a thin wrapper that, after SIGUSR1, makes each answer
//! at least ten times slower than the router sees it (the "10x slower"
//! worker). That wrapper
//! is a test fixture, not a product component.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shamal_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use shamal_proto::inference::model_infer_request::InferInputTensor;
use shamal_proto::inference::*;
use shamal_worker::WorkerListeners;
use support::*;
use tonic::{Code, Request, Response, Status};

const CHILD: &str = "SHAMAL_FAULT_CHILD";

fn main() {
    if std::env::var_os(CHILD).is_some() {
        child_worker();
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let filter = std::env::args().nth(1).filter(|arg| !arg.starts_with('-'));
    let tests: [(&str, fn() -> _); 3] = [
        ("kill_9_one_of_two_workers_under_load", || {
            Box::pin(kill_9_one_of_two_workers_under_load())
                as std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>
        }),
        ("a_ten_times_slower_worker_loses_its_traffic", || {
            Box::pin(a_ten_times_slower_worker_loses_its_traffic())
        }),
        (
            "overload_is_refused_fast_and_the_router_keeps_serving",
            || Box::pin(overload_is_refused_fast_and_the_router_keeps_serving()),
        ),
    ];
    for (name, test) in tests {
        if filter
            .as_deref()
            .is_some_and(|filter| !name.contains(filter))
        {
            continue;
        }
        println!("test {name} ...");
        runtime.block_on(test());
        println!("test {name} ... ok");
    }
}

// ----- the child: a real cpu-worker behind a switchable slowdown --------

struct Slowable {
    inner: shamal_worker::service::WorkerService,
    slow: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl GrpcInferenceService for Slowable {
    async fn server_live(
        &self,
        request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        self.inner.server_live(request).await
    }

    async fn server_ready(
        &self,
        request: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        self.inner.server_ready(request).await
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        self.inner.model_ready(request).await
    }

    async fn server_metadata(
        &self,
        request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        self.inner.server_metadata(request).await
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        self.inner.model_metadata(request).await
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        self.inner.model_config(request).await
    }

    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        self.inner.model_statistics(request).await
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        self.inner.repository_index(request).await
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let started = Instant::now();
        let answer = self.inner.model_infer(request).await;
        if self.slow.load(Ordering::Relaxed) {
            // Ten times the service time, and at least 20 ms more: the
            // demo model computes in microseconds, and the router sees
            // 1-3 ms per request under this test's load (debug build, two
            // vCPUs), so this is ten times what the router sees.
            let extra = (started.elapsed() * 9).max(Duration::from_millis(20));
            tokio::time::sleep(extra).await;
        }
        answer
    }
}

fn child_worker() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let args = shamal_cpu_worker::CpuWorkerArgs {
            onnxruntime_library: Some(onnxruntime_library()),
            instances: Some(1),
            intra_threads: Some(1),
            node: shamal_worker::NodeArgs {
                model_repository: Some(workspace_root().join("models/repository")),
                ..Default::default()
            },
            ..Default::default()
        };
        let config = shamal_cpu_worker::CpuWorkerConfig::load(&args).unwrap();
        let worker =
            shamal_cpu_worker::build(&config, shamal_telemetry::MetricsRegistry::new()).unwrap();
        let slow = Arc::new(AtomicBool::new(false));
        let service = Slowable {
            inner: worker.service(),
            slow: slow.clone(),
        };
        // The worker's own server loads the models; the public port serves
        // them through the wrapper.
        let internal = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        tokio::spawn(worker.serve(
            WorkerListeners {
                grpc: internal,
                metrics: None,
            },
            std::future::pending(),
        ));
        let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("listening {}", public.local_addr().unwrap());
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).unwrap();
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                slow.store(true, Ordering::Relaxed);
            }
        });
        tonic::transport::Server::builder()
            .add_service(GrpcInferenceServiceServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(public))
            .await
            .unwrap();
    });
}

/// A worker process; killed when dropped.
struct WorkerProcess {
    child: Child,
    address: SocketAddr,
}

impl WorkerProcess {
    fn start() -> WorkerProcess {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(CHILD, "worker")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let address = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected child output: {line:?}"))
            .parse()
            .unwrap();
        WorkerProcess { child, address }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} failed");
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn demo_request() -> ModelInferRequest {
    let values: Vec<f32> = (0..16).map(|index| index as f32 * 0.25).collect();
    ModelInferRequest {
        model_name: "demo".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "FP32".into(),
            shape: vec![1, 16],
            ..Default::default()
        }],
        raw_input_contents: vec![
            values
                .iter()
                .flat_map(|value| value.to_le_bytes())
                .collect(),
        ],
        ..Default::default()
    }
}

/// Outcomes of a closed-loop load run, by time.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    deadline: AtomicU64,
    other: Mutex<Vec<(Code, String)>>,
    latencies_us: Mutex<Vec<(Instant, u64)>>,
}

/// Closed-loop load at `concurrency` until `stop` is set; every request
/// carries a 2 s deadline.
fn load(
    address: SocketAddr,
    concurrency: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..concurrency)
        .map(|_| {
            let stop = stop.clone();
            let tally = tally.clone();
            tokio::spawn(async move {
                let mut client = client(address).await;
                while !stop.load(Ordering::Relaxed) {
                    let mut request = Request::new(demo_request());
                    request.set_timeout(Duration::from_secs(2));
                    let sent = Instant::now();
                    match client.model_infer(request).await {
                        Ok(_) => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                            tally
                                .latencies_us
                                .lock()
                                .unwrap()
                                .push((sent, sent.elapsed().as_micros() as u64));
                        }
                        Err(status) if status.code() == Code::DeadlineExceeded => {
                            tally.deadline.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(status) => tally
                            .other
                            .lock()
                            .unwrap()
                            .push((status.code(), status.message().to_owned())),
                    }
                }
            })
        })
        .collect()
}

/// Inferences a worker has run, from its own statistics.
async fn inference_count(address: SocketAddr) -> u64 {
    let mut client = client(address).await;
    client
        .model_statistics(ModelStatisticsRequest {
            name: "demo".into(),
            version: String::new(),
        })
        .await
        .map(|response| {
            response
                .into_inner()
                .model_stats
                .iter()
                .map(|stats| stats.inference_count)
                .sum()
        })
        .unwrap_or(0)
}

fn percentile(mut values: Vec<u64>, quantile: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    values[((values.len() - 1) as f64 * quantile).round() as usize]
}

async fn kill_9_one_of_two_workers_under_load() {
    let (first, second) = (WorkerProcess::start(), WorkerProcess::start());
    let router = start_router(
        vec![first.address.to_string(), second.address.to_string()],
        |_| {},
    )
    .await;
    wait_ready(router.running.address, "demo").await;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let tasks = load(router.running.address, 8, stop.clone(), tally.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kill = tally.ok.load(Ordering::Relaxed);
    let survivor_before = inference_count(second.address).await;
    first.signal("-KILL");
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let after_kill = tally.ok.load(Ordering::Relaxed) - before_kill;
    let survivor_after = inference_count(second.address).await - survivor_before;
    let errors = tally.other.lock().unwrap().clone();
    let latencies = tally.latencies_us.lock().unwrap().clone();
    let around_kill: Vec<u64> = latencies
        .iter()
        .filter(|(sent, _)| {
            *sent + Duration::from_millis(500) > killed_at
                && *sent < killed_at + Duration::from_millis(500)
        })
        .map(|(_, micros)| *micros)
        .collect();
    println!(
        "  kill -9: {before_kill} ok before, {after_kill} ok after, {} deadline exceeded, {} other errors; p99 within 0.5 s of the kill {} µs",
        tally.deadline.load(Ordering::Relaxed),
        errors.len(),
        percentile(around_kill, 0.99)
    );
    assert!(
        errors.is_empty(),
        "clients saw errors other than missed deadlines: {errors:?}"
    );
    assert!(after_kill > 100, "traffic continued after the kill");
    // Counters are read a few milliseconds before the kill: allow for the
    // requests the doomed worker answered in between.
    assert!(
        survivor_after as f64 >= after_kill as f64 * 0.9,
        "the survivor served the traffic after the kill ({survivor_after} of {after_kill})"
    );
    router.running.stop().await.unwrap();
}

async fn a_ten_times_slower_worker_loses_its_traffic() {
    let (slowed, steady) = (WorkerProcess::start(), WorkerProcess::start());
    let router = start_router(
        vec![slowed.address.to_string(), steady.address.to_string()],
        |_| {},
    )
    .await;
    wait_ready(router.running.address, "demo").await;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let tasks = load(router.running.address, 8, stop.clone(), tally.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let share = |slowed_count: u64, steady_count: u64| {
        slowed_count as f64 / (slowed_count + steady_count).max(1) as f64
    };
    let (a0, b0) = (
        inference_count(slowed.address).await,
        inference_count(steady.address).await,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (a1, b1) = (
        inference_count(slowed.address).await,
        inference_count(steady.address).await,
    );
    let share_before = share(a1 - a0, b1 - b0);
    slowed.signal("-USR1");
    let slowed_at = Instant::now();
    // Give detection a few seconds, then measure the share again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (a2, b2) = (
        inference_count(slowed.address).await,
        inference_count(steady.address).await,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (a3, b3) = (
        inference_count(slowed.address).await,
        inference_count(steady.address).await,
    );
    let share_after = share(a3 - a2, b3 - b2);
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let latencies = tally.latencies_us.lock().unwrap().clone();
    let window = |from: Duration, to: Duration| -> Vec<u64> {
        latencies
            .iter()
            .filter(|(sent, _)| *sent >= slowed_at + from && *sent < slowed_at + to)
            .map(|(_, micros)| *micros)
            .collect()
    };
    println!(
        "  10x slower: slowed worker's share {:.1}% before, {:.1}% 3-5 s after; p99 0-1 s after {} µs, 3-5 s after {} µs",
        share_before * 100.0,
        share_after * 100.0,
        percentile(window(Duration::ZERO, Duration::from_secs(1)), 0.99),
        percentile(window(Duration::from_secs(3), Duration::from_secs(5)), 0.99),
    );
    let errors = tally.other.lock().unwrap().clone();
    assert!(errors.is_empty(), "errors: {errors:?}");
    assert!(
        share_before > 0.2,
        "both workers shared the load at first ({share_before})"
    );
    assert!(
        share_after < 0.1,
        "traffic moved away from the slow worker (share {share_after})"
    );
    router.running.stop().await.unwrap();
}

/// Four times more callers than the router admits: the excess is refused
/// with RESOURCE_EXHAUSTED (never another error), admitted requests
/// succeed, and the router serves normally afterwards.
async fn overload_is_refused_fast_and_the_router_keeps_serving() {
    let (first, second) = (WorkerProcess::start(), WorkerProcess::start());
    let router = start_router(
        vec![first.address.to_string(), second.address.to_string()],
        |config| config.max_inflight = 8,
    )
    .await;
    wait_ready(router.running.address, "demo").await;
    let rejected = Arc::new(Mutex::new(Vec::<u64>::new()));
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (stop, tally, rejected) = (stop.clone(), tally.clone(), rejected.clone());
            let address = router.running.address;
            tokio::spawn(async move {
                let mut client = client(address).await;
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    match client.model_infer(demo_request()).await {
                        Ok(_) => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(status) if status.code() == Code::ResourceExhausted => {
                            rejected
                                .lock()
                                .unwrap()
                                .push(sent.elapsed().as_micros() as u64);
                        }
                        Err(status) => tally
                            .other
                            .lock()
                            .unwrap()
                            .push((status.code(), status.message().to_owned())),
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let rejected = rejected.lock().unwrap().clone();
    let errors = tally.other.lock().unwrap().clone();
    println!(
        "  overload (32 callers, 8 admitted): {} ok, {} rejected (p50 {} µs, p99 {} µs), {} other errors",
        tally.ok.load(Ordering::Relaxed),
        rejected.len(),
        percentile(rejected.clone(), 0.5),
        percentile(rejected.clone(), 0.99),
        errors.len()
    );
    assert!(errors.is_empty(), "only refusals, no failures: {errors:?}");
    assert!(!rejected.is_empty(), "the excess was refused");
    assert!(
        tally.ok.load(Ordering::Relaxed) > 100,
        "admitted requests ran"
    );
    // After the storm the router serves as before.
    let mut client = client(router.running.address).await;
    for _ in 0..20 {
        client.model_infer(demo_request()).await.unwrap();
    }
    router.running.stop().await.unwrap();
}
