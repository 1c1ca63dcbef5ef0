//! Async inference end to end: routers and real cpu-workers on loopback,
//! sharing a job queue, on both backends: the in-process `MemoryQueue`
//! (what `shamal up` uses) and Redis at SHAMAL_TEST_REDIS_URL
//! (`scripts/ensure-redis.sh` provides one; unset, the Redis cases are
//! skipped loudly, or fail under SHAMAL_REQUIRE_SERVICES=1: docs/testing.md),
//! each test under a key prefix of its own, deleted afterwards.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use shamal_async_queue::{
    JobId, JobQueue, MemoryQueue, QueueConfig, RedisOptions, RedisQueue, StreamKey,
};
use shamal_cpu_worker::{CpuWorkerArgs, CpuWorkerConfig};
use shamal_proto::inference::model_infer_request::InferRequestedOutputTensor;
use shamal_proto::inference::*;
use shamal_proto::shamal::r#async::v1::async_inference_client::AsyncInferenceClient;
use shamal_proto::shamal::r#async::v1::{AsyncResult, GetRequest, JobState};
use shamal_router::{RouterConfig, RouterExtras, RouterListeners};
use shamal_tensor::{DataType, Tensor};
use shamal_worker::{AsyncInference, QueueSource, WorkerListeners};
use support::{onnxruntime_library, wait_ready, workspace_root};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::Channel;

const MODEL: &str = "simple";

// ----- harness -----------------------------------------------------------

/// Which queue the stack shares.
enum Backend {
    Memory(Arc<MemoryQueue>),
    Redis { url: String, prefix: String },
}

impl Backend {
    fn memory() -> Backend {
        Backend::Memory(Arc::new(
            MemoryQueue::new(QueueConfig::default()).expect("valid queue config"),
        ))
    }

    /// Redis at SHAMAL_TEST_REDIS_URL with a fresh key prefix; `None` (the
    /// test is skipped, loudly) when the variable is unset and skipping is
    /// allowed; fails the test when Redis does not answer
    /// (`support::test_redis_url`, docs/testing.md).
    async fn redis() -> Option<Backend> {
        let url = support::test_redis_url().await?;
        let prefix = format!("shamal-router-test:{}", JobId::generate());
        Some(Backend::Redis { url, prefix })
    }

    async fn connect(&self) -> Result<Arc<dyn JobQueue>, String> {
        match self {
            Backend::Memory(queue) => Ok(queue.clone()),
            Backend::Redis { url, prefix } => {
                let options = RedisOptions::new(url.clone()).with_key_prefix(prefix.clone());
                let connect = RedisQueue::connect(options, QueueConfig::default());
                match tokio::time::timeout(Duration::from_secs(5), connect).await {
                    Ok(Ok(queue)) => Ok(Arc::new(queue)),
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err("timed out".to_owned()),
                }
            }
        }
    }

    /// Deletes the test's Redis keys.
    async fn cleanup(&self) {
        let Backend::Redis { url, prefix } = self else {
            return;
        };
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut connection)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut connection)
                .await
                .unwrap();
        }
    }
}

/// A running router or worker and the handle that stops it.
struct Service {
    grpc: SocketAddr,
    http: SocketAddr,
    metrics: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Service {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap().unwrap();
    }
}

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// A model repository holding only `simple` (both versions).
fn simple_repository() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        workspace_root().join("models/repository/simple"),
        dir.path().join("simple"),
    )
    .unwrap();
    dir
}

/// A cpu-worker serving `repository`, running the async jobs of `region`.
/// Returns the service and its consumer id.
async fn start_worker(backend: &Backend, repository: PathBuf, region: &str) -> (Service, String) {
    start_worker_with(backend, repository, region, |_| {}).await
}

/// [`start_worker`] with its flags tuned by `tune`.
async fn start_worker_with(
    backend: &Backend,
    repository: PathBuf,
    region: &str,
    tune: impl FnOnce(&mut CpuWorkerArgs),
) -> (Service, String) {
    let mut args = CpuWorkerArgs {
        onnxruntime_library: Some(onnxruntime_library()),
        node: shamal_worker::NodeArgs {
            model_repository: Some(repository),
            region: Some(region.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    };
    if let Backend::Redis { url, prefix } = backend {
        // The cpu-worker's own settings build its Redis queue.
        args.node.async_queue = Some(url.clone());
        args.node.async_key_prefix = Some(prefix.clone());
    }
    tune(&mut args);
    let config = CpuWorkerConfig::load(&args).unwrap();
    let grpc = listener().await;
    let address = grpc.local_addr().unwrap();
    let mut worker =
        shamal_cpu_worker::build(&config, shamal_telemetry::MetricsRegistry::new()).unwrap();
    let consumer_id = match backend {
        Backend::Memory(queue) => {
            let id = format!("test-worker-{region}-{}", address.port());
            let mut settings = AsyncInference::new(QueueSource::Shared(queue.clone()));
            settings.region = Some(region.to_owned());
            settings.consumer_id = Some(id.clone());
            settings.concurrency = 4;
            worker = worker.with_async_inference(settings);
            id
        }
        // The default consumer id of a worker without a registry.
        Backend::Redis { .. } => format!(
            "shamal-cpu-worker-{}-{}",
            shamal_worker::agent::hostname(),
            address.port()
        ),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(worker.serve(
        WorkerListeners {
            grpc,
            metrics: None,
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let service = Service {
        grpc: address,
        http: address,
        metrics: address,
        stop: Some(stop),
        task,
    };
    (service, consumer_id)
}

/// A router in front of `workers` (in region `region`), with the queue of
/// `backend` unless `with_queue` is false.
async fn start_router(
    backend: &Backend,
    workers: &[&Service],
    region: &str,
    with_queue: bool,
    tune: impl FnOnce(&mut RouterConfig),
) -> Service {
    let mut config = RouterConfig {
        workers: workers.iter().map(|w| w.grpc.to_string()).collect(),
        refresh_interval_ms: 100,
        static_worker_region: region.to_owned(),
        ..RouterConfig::default()
    };
    let mut extras = RouterExtras::default();
    if with_queue {
        match backend {
            Backend::Memory(queue) => {
                config.async_queue = Some(shamal_router::config::MEMORY_QUEUE.to_owned());
                extras.async_queue = Some(queue.clone());
            }
            Backend::Redis { url, prefix } => {
                config.async_queue = Some(url.clone());
                config.async_key_prefix = prefix.clone();
            }
        }
    }
    tune(&mut config);
    config.validate().unwrap();
    let (grpc, http, metrics) = (listener().await, listener().await, listener().await);
    let addresses = (
        grpc.local_addr().unwrap(),
        http.local_addr().unwrap(),
        metrics.local_addr().unwrap(),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(shamal_router::run_with(
        config,
        RouterListeners {
            grpc,
            http,
            metrics: Some(metrics),
        },
        shamal_telemetry::MetricsRegistry::new(),
        async move {
            let _ = stopped.await;
        },
        extras,
    ));
    wait_ready(addresses.0, MODEL).await;
    Service {
        grpc: addresses.0,
        http: addresses.1,
        metrics: addresses.2,
        stop: Some(stop),
        task,
    }
}

fn async_client(router: &Service) -> AsyncInferenceClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", router.grpc))
        .unwrap()
        .connect_lazy();
    AsyncInferenceClient::new(channel)
}

/// `simple` with INPUT0 = 0..16 per row and INPUT1 = 2: OUTPUT0 = i + 2.
fn infer_request(rows: usize) -> ModelInferRequest {
    let tensor = |name: &str, value: fn(usize) -> i32| {
        let raw: Vec<u8> = (0..rows * 16)
            .flat_map(|i| value(i).to_le_bytes())
            .collect();
        Tensor::from_raw(
            name,
            DataType::Int32,
            vec![rows as i64, 16],
            Bytes::from(raw),
        )
        .unwrap()
    };
    let (inputs, raw_input_contents) =
        shamal_tensor::encode_inputs(&[tensor("INPUT0", |i| i as i32), tensor("INPUT1", |_| 2)]);
    ModelInferRequest {
        model_name: MODEL.into(),
        id: "async-1".into(),
        inputs,
        raw_input_contents,
        ..Default::default()
    }
}

fn json_body(id: &str) -> Value {
    json!({
        "id": id,
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": (0..16).collect::<Vec<i32>>()},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": vec![2; 16]},
        ],
    })
}

fn with_regions(mut body: Value, regions: &str) -> Value {
    body["parameters"] = json!({ "shamal-allowed-regions": regions });
    body
}

async fn post(
    router: &Service,
    path: &str,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{}{path}", router.http))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

async fn get(router: &Service, path: &str) -> (u16, reqwest::header::HeaderMap, Bytes) {
    let response = reqwest::get(format!("http://{}{path}", router.http))
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.bytes().await.unwrap())
}

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
}

/// Submits over HTTP and checks the immediate 202; returns the id.
async fn submit_http(router: &Service, body: &Value) -> String {
    let started = Instant::now();
    let (status, headers, answer) =
        post(router, &format!("/v2/models/{MODEL}/infer/async"), body).await;
    assert_eq!(status, 202, "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the id comes back at once"
    );
    let id = answer["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 26, "{answer}");
    assert_eq!(answer["status_url"], format!("/v2/async/{id}"));
    assert_eq!(header(&headers, "location"), format!("/v2/async/{id}"));
    id
}

async fn router_metrics(router: &Service) -> String {
    reqwest::get(format!("http://{}/metrics", router.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn wait_for_metric(router: &Service, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = router_metrics(router).await;
        if text.contains(line) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "metric never showed {line}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn grpc_get(router: &Service, id: &str, wait_ms: u32) -> Result<AsyncResult, tonic::Status> {
    async_client(router)
        .get(GetRequest {
            id: id.to_owned(),
            wait_ms,
        })
        .await
        .map(tonic::Response::into_inner)
}

// ----- scenarios ----------------------------------------------------------

/// Submit over HTTP and gRPC, long-poll, compare with the synchronous
/// answer; errors at submission and in the worker; unknown and malformed
/// ids; metrics.
async fn submit_wait_and_fetch(backend: Backend) {
    let repository = simple_repository();
    let (worker, consumer) = start_worker(&backend, repository.path().to_path_buf(), "local").await;
    let router = start_router(&backend, &[&worker], "local", true, |_| {}).await;

    // HTTP: the same answer as the synchronous endpoint.
    let (status, _, sync_body) = post(
        &router,
        &format!("/v2/models/{MODEL}/infer"),
        &json_body("h-1"),
    )
    .await;
    assert_eq!(status, 200, "{sync_body}");
    let id = submit_http(&router, &json_body("h-1")).await;
    let (status, headers, body) = get(&router, &format!("/v2/async/{id}?wait_ms=20000")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&headers, "x-shamal-async-state"), "done");
    assert_eq!(header(&headers, "x-shamal-async-worker"), consumer);
    assert_eq!(header(&headers, "x-shamal-async-attempts"), "1");
    let async_body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(async_body, sync_body);
    assert_eq!(async_body["outputs"][0]["name"], "OUTPUT0");
    // Fetched again: the same result; with binary outputs on request.
    let (status, _, again) = get(&router, &format!("/v2/async/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_slice::<Value>(&again).unwrap(), sync_body);
    let (status, headers, binary) =
        get(&router, &format!("/v2/async/{id}?binary_data_output=true")).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), "application/octet-stream");
    let json_length: usize = header(&headers, "inference-header-content-length")
        .parse()
        .unwrap();
    let outputs = async_body["outputs"].as_array().unwrap().len();
    assert_eq!(
        binary.len(),
        json_length + outputs * 16 * 4,
        "raw INT32 outputs"
    );

    // gRPC: the same response as ModelInfer.
    let mut inference = support::client(router.grpc).await;
    let sync_response = inference
        .model_infer(infer_request(2))
        .await
        .unwrap()
        .into_inner();
    let mut client = async_client(&router);
    let id = client
        .submit(infer_request(2))
        .await
        .unwrap()
        .into_inner()
        .id;
    let result = grpc_get(&router, &id, 20_000).await.unwrap();
    assert_eq!(result.id, id);
    assert_eq!(result.state(), JobState::Done, "{result:?}");
    assert_eq!(result.code, 0, "{result:?}");
    assert_eq!(result.worker, consumer);
    assert_eq!(result.response.unwrap(), sync_response);
    // The HTTP view of a gRPC-submitted job.
    let (status, _, body) = get(&router, &format!("/v2/async/{id}")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    // A job the worker refuses: its error is the result.
    let id = client
        .submit(infer_request(40))
        .await
        .unwrap()
        .into_inner()
        .id;
    let result = grpc_get(&router, &id, 20_000).await.unwrap();
    assert_eq!(result.state(), JobState::Done);
    assert_eq!(result.code, Code::InvalidArgument as i32, "{result:?}");
    assert!(result.message.contains("max_batch_size"), "{result:?}");
    assert!(result.response.is_none());
    let (status, headers, body) = get(&router, &format!("/v2/async/{id}")).await;
    assert_eq!(status, 400);
    assert_eq!(header(&headers, "x-shamal-async-state"), "done");
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        error["error"].as_str().unwrap().contains("max_batch_size"),
        "{error}"
    );

    // Unknown and malformed ids.
    let unknown = JobId::generate();
    let (status, _, body) = get(&router, &format!("/v2/async/{unknown}?wait_ms=100")).await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        grpc_get(&router, unknown.as_str(), 0)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let (status, _, body) = get(&router, "/v2/async/not!an!id").await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("job id"));
    let status = grpc_get(&router, "bad id", 0).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let (status, _, _) = get(&router, &format!("/v2/async/{unknown}?wait_ms=soon")).await;
    assert_eq!(status, 400);

    // Refused at submission, as /infer refuses them, and nothing queued.
    let path = format!("/v2/models/{MODEL}/infer/async");
    let mut bad_data = json_body("bad");
    bad_data["inputs"][0]["data"] = json!(vec!["x"; 16]);
    let mut bad_shape = json_body("bad");
    bad_shape["inputs"][1]["shape"] = json!([1, 8]);
    bad_shape["inputs"][1]["data"] = json!(vec![2; 8]);
    let mut unknown_output = json_body("bad");
    unknown_output["outputs"] = json!([{"name": "OUTPUT9"}]);
    let mut missing_input = json_body("bad");
    missing_input["inputs"] = json!([missing_input["inputs"][0].clone()]);
    for (body, field) in [
        (&bad_data, "INPUT0"),
        (&bad_shape, "INPUT1"),
        (&unknown_output, "OUTPUT9"),
        (&missing_input, "INPUT1"),
        (&json!({"id": "no inputs"}), "inputs"),
    ] {
        let (status, _, answer) = post(&router, &path, body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let message = answer["error"].as_str().unwrap();
        assert!(message.contains(field), "{field}: {message}");
    }
    let (status, _, answer) = post(&router, "/v2/models/nope/infer/async", &json_body("x")).await;
    assert_eq!(status, 404, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("nope"));
    let (status, _, answer) = post(
        &router,
        &format!("/v2/models/{MODEL}/versions/9/infer/async"),
        &json_body("x"),
    )
    .await;
    assert_eq!(status, 404, "{answer}");
    let mut wrong_size = infer_request(1);
    wrong_size.raw_input_contents[0] = Bytes::from_static(&[0; 12]);
    let status = client.submit(wrong_size).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("INPUT0"), "{status}");
    let mut unknown_output = infer_request(1);
    unknown_output.outputs = vec![InferRequestedOutputTensor {
        name: "OUTPUT9".into(),
        parameters: Default::default(),
    }];
    let status = client.submit(unknown_output).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut unknown_model = infer_request(1);
    unknown_model.model_name = "nope".into();
    assert_eq!(
        client.submit(unknown_model).await.unwrap_err().code(),
        Code::NotFound
    );
    // A specific version is honoured.
    let id = submit_http(&router, &json_body("v1")).await;
    let (status, _, body) = get(&router, &format!("/v2/async/{id}?wait_ms=20000")).await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        answer["model_version"], "2",
        "the highest version by default"
    );
    let (status, _, submitted) = post(
        &router,
        &format!("/v2/models/{MODEL}/versions/1/infer/async"),
        &json_body("v1"),
    )
    .await;
    assert_eq!(status, 202);
    let (status, _, body) = get(
        &router,
        &format!(
            "/v2/async/{}?wait_ms=20000",
            submitted["id"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["model_version"], "1");

    // Autoscaling and usage signals.
    wait_for_metric(
        &router,
        "shamal_router_async_submitted_total{model=\"simple\"} 5\n",
    )
    .await;
    wait_for_metric(
        &router,
        "shamal_router_async_backlog{model=\"simple\",region=\"local\"} 0\n",
    )
    .await;
    let text = router_metrics(&router).await;
    assert!(
        text.contains("shamal_router_async_results_fetched_total{code=\"ok\"}"),
        "{text}"
    );
    assert!(
        text.contains("shamal_router_async_results_fetched_total{code=\"invalid_argument\"}"),
        "{text}"
    );
    assert!(
        !text.contains("model=\"nope\""),
        "unknown models add no labels:\n{text}"
    );

    router.stop().await;
    worker.stop().await;
    backend.cleanup().await;
}

/// Jobs go to a stream of a region the request allows, where a worker
/// serves the model, and only that region's workers run them; the backlog
/// per stream is bounded; routers without a queue say so.
async fn residency_backlog_and_unconfigured(backend: Backend) {
    let repository = simple_repository();
    let (worker_a, consumer_a) =
        start_worker(&backend, repository.path().to_path_buf(), "r-a").await;
    // Consumes region r-b only; no router sends it requests.
    let (worker_b, consumer_b) =
        start_worker(&backend, repository.path().to_path_buf(), "r-b").await;
    let router = start_router(&backend, &[&worker_a], "r-a", true, |_| {}).await;
    let queue = backend.connect().await.unwrap();

    // Only a region without a worker: refused at submission, naming it.
    let (status, _, answer) = post(
        &router,
        &format!("/v2/models/{MODEL}/infer/async"),
        &with_regions(json_body("eu"), "r-b"),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"].as_str().unwrap();
    assert!(message.contains("data residency"), "{message}");
    assert!(message.contains("request allows [r-b]"), "{message}");
    let mut request = tonic::Request::new(infer_request(1));
    request
        .metadata_mut()
        .insert("x-shamal-allowed-regions", "r-b".parse().unwrap());
    let status = async_client(&router).submit(request).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status}");
    // The header is read over HTTP too.
    let response = reqwest::Client::new()
        .post(format!(
            "http://{}/v2/models/{MODEL}/infer/async",
            router.http
        ))
        .header("x-shamal-allowed-regions", "r-b")
        .json(&json_body("eu"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);

    // Allowed regions with a worker in one of them: every job lands on that
    // region's stream and is run there, though a worker of r-b consumes.
    let mut ids = Vec::new();
    for index in 0..6 {
        let regions = if index % 2 == 0 { "r-a,r-b" } else { "r-a" };
        ids.push(submit_http(&router, &with_regions(json_body("eu"), regions)).await);
    }
    let mut request = tonic::Request::new(infer_request(1));
    request
        .metadata_mut()
        .insert("x-shamal-allowed-regions", "r-b, r-a".parse().unwrap());
    ids.push(
        async_client(&router)
            .submit(request)
            .await
            .unwrap()
            .into_inner()
            .id,
    );
    for id in &ids {
        let result = grpc_get(&router, id, 20_000).await.unwrap();
        assert_eq!(result.state(), JobState::Done, "{result:?}");
        assert_eq!(result.code, 0, "{result:?}");
        assert_eq!(
            result.worker, consumer_a,
            "run in r-a, never by {consumer_b}"
        );
    }
    let streams = queue.streams().await.unwrap();
    let stream_a = StreamKey::new(MODEL, "r-a").unwrap();
    assert!(streams.contains(&stream_a), "{streams:?}");
    assert!(
        !streams.contains(&StreamKey::new(MODEL, "r-b").unwrap()),
        "nothing was queued for r-b: {streams:?}"
    );

    // A router whose workers are in a region nobody consumes (misplaced
    // on purpose): jobs wait, and the backlog is bounded.
    let idle = start_router(&backend, &[&worker_a], "r-idle", true, |config| {
        config.max_async_backlog = 2;
        config.async_max_wait_ms = 400;
    })
    .await;
    let first = submit_http(&idle, &json_body("q-1")).await;
    let second = async_client(&idle)
        .submit(infer_request(1))
        .await
        .unwrap()
        .into_inner()
        .id;
    let started = Instant::now();
    let (status, headers, body) = get(&idle, &format!("/v2/async/{first}?wait_ms=60000")).await;
    let waited = started.elapsed();
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&headers, "x-shamal-async-state"), "queued");
    let pending: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(pending, json!({"id": first, "status": "queued"}));
    assert!(
        waited >= Duration::from_millis(350) && waited < Duration::from_secs(10),
        "long poll capped by async_max_wait_ms: {waited:?}"
    );
    let result = grpc_get(&idle, &second, 0).await.unwrap();
    assert_eq!(result.state(), JobState::Queued);
    let (status, _, answer) = post(
        &idle,
        &format!("/v2/models/{MODEL}/infer/async"),
        &json_body("q-3"),
    )
    .await;
    assert_eq!(status, 429, "{answer}");
    let message = answer["error"].as_str().unwrap();
    assert!(message.contains("max_async_backlog"), "{message}");
    assert!(message.contains("r-idle"), "{message}");
    let status = async_client(&idle)
        .submit(infer_request(1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let backlog = queue
        .backlog(&StreamKey::new(MODEL, "r-idle").unwrap())
        .await
        .unwrap();
    assert_eq!((backlog.lag, backlog.pending), (2, 0));
    wait_for_metric(
        &idle,
        "shamal_router_async_backlog{model=\"simple\",region=\"r-idle\"} 2\n",
    )
    .await;
    wait_for_metric(
        &idle,
        "shamal_router_async_backlog_full_total{model=\"simple\"} 2\n",
    )
    .await;

    // Without a queue: a clear 501 / UNIMPLEMENTED.
    let plain = start_router(&backend, &[&worker_a], "r-a", false, |_| {}).await;
    let (status, _, answer) = post(
        &plain,
        &format!("/v2/models/{MODEL}/infer/async"),
        &json_body("x"),
    )
    .await;
    assert_eq!(status, 501, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("async_queue"),
        "{answer}"
    );
    let (status, _, _) = get(&plain, &format!("/v2/async/{first}")).await;
    assert_eq!(status, 501);
    let status = async_client(&plain)
        .submit(infer_request(1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    // ... and the synchronous path is unaffected.
    let (status, _, _) = post(
        &plain,
        &format!("/v2/models/{MODEL}/infer"),
        &json_body("x"),
    )
    .await;
    assert_eq!(status, 200);

    plain.stop().await;
    idle.stop().await;
    router.stop().await;
    worker_a.stop().await;
    worker_b.stop().await;
    backend.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_queue_submit_wait_and_fetch() {
    submit_wait_and_fetch(Backend::memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_queue_submit_wait_and_fetch() {
    let Some(backend) = Backend::redis().await else {
        return;
    };
    submit_wait_and_fetch(backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_queue_residency_and_backlog() {
    residency_backlog_and_unconfigured(Backend::memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_queue_residency_and_backlog() {
    let Some(backend) = Backend::redis().await else {
        return;
    };
    residency_backlog_and_unconfigured(backend).await;
}

/// Both halves of an async job reach the audit log under the job id: the
/// router's `inference.async_submit` (who, which tenant) and the worker's
/// `inference.async_run` (where, how), with the same payload digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_halves_of_an_async_job_are_audited_under_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let audit = shamal_audit_service::RunningAudit::start_local(
        &format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("audit.db").display()
        ),
        dir.path(),
    )
    .await
    .unwrap();
    let endpoint = format!("http://{}", audit.grpc_address);
    let backend = Backend::memory();
    let repository = simple_repository();
    let worker_spool = dir.path().join("worker-spool");
    let (worker, consumer) =
        start_worker_with(&backend, repository.path().to_path_buf(), "local", |args| {
            args.node.audit.audit_endpoint = Some(endpoint.clone());
            args.node.audit.audit_spool_dir = Some(worker_spool.clone());
        })
        .await;
    let router_spool = dir.path().join("router-spool");
    let router = start_router(&backend, &[&worker], "local", true, |config| {
        config.audit.endpoint = Some(endpoint.clone());
        config.audit.spool_dir = router_spool.clone();
    })
    .await;
    let id = submit_http(&router, &json_body("audited-1")).await;
    let (status, _, body) = get(&router, &format!("/v2/async/{id}?wait_ms=20000")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    // The router and the worker drain their spools as they stop.
    router.stop().await;
    worker.stop().await;
    let records = audit
        .log
        .query(&shamal_audit_service::log::Query {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .records;
    let of_job: Vec<_> = records
        .iter()
        .map(|record| &record.event)
        .filter(|event| event.request_id == id)
        .collect();
    assert_eq!(of_job.len(), 2, "{records:#?}");
    let (submit, run) = (of_job[0], of_job[1]);
    assert_eq!(
        (submit.action.as_str(), submit.service.as_str()),
        ("inference.async_submit", "router")
    );
    assert_eq!(
        (run.action.as_str(), run.service.as_str()),
        ("inference.async_run", "cpu-worker")
    );
    assert_eq!(
        (submit.outcome.as_str(), run.outcome.as_str()),
        ("ok", "ok")
    );
    assert_eq!(submit.request_sha256, run.request_sha256);
    assert_eq!(submit.request_sha256.len(), 64);
    assert_eq!(run.worker, consumer);
    assert_eq!(
        (submit.region.as_str(), run.region.as_str()),
        ("local", "local")
    );
    assert!(
        submit.reason.starts_with("x-request-id "),
        "{}",
        submit.reason
    );
    audit.stop().await.unwrap();
}
