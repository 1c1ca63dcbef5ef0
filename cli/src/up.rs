//! `shamal up`: registry, router, cpu-worker and gpu-worker in one process,
//! on loopback. The registry keeps its state (SQLite) and artifacts under
//! the data directory; each worker serves its model repository (ONNX for the
//! cpu-worker, safetensors on candle for the gpu-worker) and every version
//! of its format the registry assigns it; the router follows the registry's
//! rollouts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use shamal_async_queue::{JobQueue, MemoryQueue, QueueConfig};
use shamal_cpu_worker::{CpuWorkerArgs, CpuWorkerConfig, bundled_onnxruntime};
use shamal_gpu_worker::{GpuWorkerArgs, GpuWorkerConfig};
use shamal_proto::inference::RepositoryIndexRequest;
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_registry::model::NewVersion;
use shamal_registry::{ModelRegistry, RegistryConfig, RegistryListeners, RunningRegistry};
use shamal_router::{RouterConfig, RouterExtras, RouterListeners};
use shamal_worker::{AsyncInference, NodeArgs, QueueSource, WorkerListeners};
use tokio::net::TcpListener;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Triton-layout model repository to serve.
    #[arg(
        long,
        env = "SHAMAL_MODEL_REPOSITORY",
        default_value = "models/repository"
    )]
    model_repository: PathBuf,
    /// Address the public endpoints bind to.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    host: IpAddr,
    /// KServe v2 HTTP/JSON port (Triton's default).
    #[arg(long, default_value_t = 8000)]
    http_port: u16,
    /// KServe v2 gRPC port (Triton's default).
    #[arg(long, default_value_t = 8001)]
    grpc_port: u16,
    /// Prometheus metrics port (Triton's default).
    #[arg(long, default_value_t = 8002)]
    metrics_port: u16,
    /// libonnxruntime.so (default: ORT_DYLIB_PATH, then the copy that
    /// scripts/setup-deps.sh installs under .deps/).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    onnxruntime_library: Option<PathBuf>,
    /// Model instances per version (each runs on its own thread).
    #[arg(long)]
    instances: Option<usize>,
    /// ONNX Runtime intra-op threads per instance.
    #[arg(long)]
    intra_threads: Option<usize>,
    /// Where the embedded registry keeps its database (SQLite) and
    /// artifacts, and the worker its artifact cache.
    #[arg(long, env = "SHAMAL_DATA_DIR", default_value = ".shamal")]
    data_dir: PathBuf,
    /// MetricsRegistry REST API, OpenAPI document and web UI port.
    #[arg(long, default_value_t = 8200)]
    registry_http_port: u16,
    /// MetricsRegistry internal gRPC port (routers and workers), on loopback.
    #[arg(long, default_value_t = 8201)]
    registry_grpc_port: u16,
    /// Largest dynamic batch for models without a configuration file.
    #[arg(long)]
    max_batch_size: Option<usize>,
    /// Queue delay (µs) the batcher may wait to fill a batch, for models
    /// without a configuration file.
    #[arg(long)]
    max_queue_delay_us: Option<u64>,
    /// Run an idle model's requests on the RPC thread, skipping its queue,
    /// when its single requests take at most this many µs (0: always
    /// queue). Default 2000.
    #[arg(long)]
    inline_max_us: Option<u64>,
    /// Keep the CPUs awake for this many µs after the last request, so the
    /// next one does not wait for a halted CPU (0: off, the default; costs
    /// CPU time, see operations.md, "Idle polling").
    #[arg(long)]
    idle_poll_us: Option<u64>,
    /// Safetensors model repository of the gpu-worker (candle; CUDA when
    /// built with the `cuda` feature and a GPU answers, else the CPU).
    /// Default: `models/gpu/repository` when it exists, else none (the
    /// gpu-worker then serves only what the registry assigns it).
    #[arg(long, env = "SHAMAL_GPU_MODEL_REPOSITORY")]
    gpu_model_repository: Option<PathBuf>,
    /// Start without the gpu-worker.
    #[arg(long)]
    pub(crate) no_gpu_worker: bool,
}

/// The gpu-worker's default repository (the bundled demo models).
const DEFAULT_GPU_REPOSITORY: &str = "models/gpu/repository";

/// MetricsRegistry identities of the in-process workers. The router's local
/// workers carry the same names, so the registry's view of them (region,
/// capacity, drain) applies to the in-process ones instead of adding a
/// second, networked copy of each.
const CPU_WORKER_ID: &str = "local-cpu-worker";
const GPU_WORKER_ID: &str = "local-gpu-worker";

/// The settings both in-process workers take from `shamal up`'s flags:
/// following the embedded registry as `worker_id`, and the batching
/// defaults.
fn shared_worker_args(args: &UpArgs, registry_grpc: SocketAddr, worker_id: &str) -> NodeArgs {
    NodeArgs {
        registry: Some(registry_grpc.to_string()),
        worker_id: Some(worker_id.to_owned()),
        artifact_cache: Some(args.data_dir.join("cache")),
        max_batch_size: args.max_batch_size,
        max_queue_delay_us: args.max_queue_delay_us,
        ..NodeArgs::default()
    }
}

/// The gpu-worker's configuration, `None` with `--no-gpu-worker`.
fn gpu_worker_config(
    args: &UpArgs,
    registry_grpc: SocketAddr,
) -> Result<Option<GpuWorkerConfig>, String> {
    if args.no_gpu_worker {
        return Ok(None);
    }
    let model_repository = args.gpu_model_repository.clone().or_else(|| {
        let default = PathBuf::from(DEFAULT_GPU_REPOSITORY);
        default.is_dir().then_some(default)
    });
    GpuWorkerConfig::load(&GpuWorkerArgs {
        node: NodeArgs {
            model_repository,
            // As for the cpu-worker: no router is left to route around it.
            drain_grace_ms: Some(0),
            ..shared_worker_args(args, registry_grpc, GPU_WORKER_ID)
        },
        instances: args.instances,
        ..Default::default()
    })
    .map(Some)
    .map_err(|error| format!("gpu-worker: {error}"))
}

async fn bind(host: IpAddr, port: u16, what: &str) -> Result<TcpListener, String> {
    TcpListener::bind(SocketAddr::new(host, port))
        .await
        .map_err(|error| format!("cannot bind the {what} port {host}:{port}: {error}"))
}

pub async fn run(args: UpArgs) -> ExitCode {
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let registry_grpc = SocketAddr::new(loopback, args.registry_grpc_port);
    let worker_args = CpuWorkerArgs {
        node: NodeArgs {
            model_repository: Some(args.model_repository.clone()),
            // The in-process router stops before the worker drains: no
            // router is left to route around it, so no grace.
            drain_grace_ms: Some(0),
            ..shared_worker_args(&args, registry_grpc, CPU_WORKER_ID)
        },
        onnxruntime_library: args
            .onnxruntime_library
            .clone()
            .or_else(|| bundled_onnxruntime(Path::new("."))),
        instances: args.instances,
        intra_threads: args.intra_threads,
        inline_max_us: args.inline_max_us,
        idle_poll_us: args.idle_poll_us,
        ..Default::default()
    };
    let worker_config = match CpuWorkerConfig::load(&worker_args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("shamal up: invalid configuration: {error}");
            return ExitCode::from(64);
        }
    };
    let gpu_worker_config = match gpu_worker_config(&args, registry_grpc) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("shamal up: invalid configuration: {error}");
            return ExitCode::from(64);
        }
    };

    // Bind everything before loading models: a taken port fails at once.
    let listeners = async {
        let worker = bind(loopback, 0, "worker").await?;
        let grpc = bind(args.host, args.grpc_port, "gRPC").await?;
        let http = bind(args.host, args.http_port, "HTTP").await?;
        let metrics = bind(args.host, args.metrics_port, "metrics").await?;
        let registry_http = bind(args.host, args.registry_http_port, "registry HTTP").await?;
        let registry_grpc = bind(loopback, args.registry_grpc_port, "registry gRPC").await?;
        Ok::<_, String>((worker, grpc, http, metrics, registry_http, registry_grpc))
    }
    .await;
    let (worker_listener, grpc, http, metrics, registry_http, registry_grpc_listener) =
        match listeners {
            Ok(listeners) => listeners,
            Err(error) => {
                eprintln!("shamal up: {error}");
                return ExitCode::from(71);
            }
        };
    let gpu_worker_listener = match &gpu_worker_config {
        Some(_) => match bind(loopback, 0, "gpu-worker").await {
            Ok(listener) => Some(listener),
            Err(error) => {
                eprintln!("shamal up: {error}");
                return ExitCode::from(71);
            }
        },
        None => None,
    };
    let address = |listener: &TcpListener| {
        listener
            .local_addr()
            .map(|address| address.to_string())
            .unwrap_or_default()
    };
    let worker_address = address(&worker_listener);
    let (grpc_address, http_address, metrics_address) =
        (address(&grpc), address(&http), address(&metrics));
    let registry_http_address = address(&registry_http);
    let metrics_registry = shamal_telemetry::MetricsRegistry::new();

    // The registry first: worker and router follow it.
    let registry_config = RegistryConfig {
        http_listen: SocketAddr::new(args.host, args.registry_http_port),
        grpc_listen: registry_grpc,
        metrics_listen: None,
        database_url: format!("sqlite://{}", args.data_dir.join("registry.db").display()),
        artifact_dir: args.data_dir.join("artifacts"),
        ..RegistryConfig::default()
    };
    let model_registry = match RunningRegistry::start(
        registry_config,
        RegistryListeners {
            http: registry_http,
            grpc: registry_grpc_listener,
            metrics: None,
        },
        metrics_registry.clone(),
    )
    .await
    {
        Ok(running) => running,
        Err(error) => {
            eprintln!("shamal up: cannot start the registry: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(error) = seed_demo(&model_registry.registry, &args.model_repository).await {
        eprintln!("shamal up: cannot register the demo model: {error}");
        return ExitCode::FAILURE;
    }

    // The router calls the worker in process: same service code, no hop.
    // The worker still listens on loopback for tools that want it directly.
    let router_config = RouterConfig {
        workers: Vec::new(),
        refresh_interval_ms: 500,
        registry: Some(registry_grpc.to_string()),
        router_id: "local-router".to_owned(),
        // Async inference on one in-process queue shared with the worker:
        // no Redis needed (jobs do not survive a restart).
        async_queue: Some(shamal_router::config::MEMORY_QUEUE.to_owned()),
        ..RouterConfig::default()
    };
    let async_queue: Arc<dyn JobQueue> = match MemoryQueue::new(QueueConfig {
        result_ttl: Duration::from_millis(router_config.async_result_ttl_ms),
        ..QueueConfig::default()
    }) {
        Ok(queue) => Arc::new(queue),
        Err(error) => {
            eprintln!("shamal up: cannot create the async queue: {error}");
            return ExitCode::FAILURE;
        }
    };
    let worker = match shamal_cpu_worker::build(&worker_config, metrics_registry.clone()) {
        Ok(worker) => worker.with_async_inference(AsyncInference::new(QueueSource::Shared(
            async_queue.clone(),
        ))),
        Err(error) => {
            eprintln!("shamal up: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let local_service: shamal_router::LocalService = Arc::new(worker.service());
    let gpu_worker = match gpu_worker_config.zip(gpu_worker_listener) {
        Some((config, listener)) => {
            match shamal_gpu_worker::build_with_device(&config, metrics_registry.clone()) {
                Ok((worker, device)) => Some((
                    worker.with_async_inference(AsyncInference::new(QueueSource::Shared(
                        async_queue.clone(),
                    ))),
                    listener,
                    device,
                )),
                Err(error) => {
                    eprintln!("shamal up: gpu-worker: {error:#}");
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };

    // Shutdown order: the router stops intake and finishes its requests,
    // then the worker drains and unloads.
    let (router_done, router_done_signal) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(worker.serve(
        WorkerListeners {
            grpc: worker_listener,
            metrics: None,
        },
        async move {
            let _ = router_done_signal.await;
        },
    ));
    let mut local_workers = vec![(CPU_WORKER_ID.to_owned(), local_service)];
    let (gpu_router_done, gpu_router_done_signal) = tokio::sync::oneshot::channel::<()>();
    let mut gpu_announce = None;
    let gpu_worker = gpu_worker.map(|(gpu_worker, listener, device)| {
        gpu_announce = Some((address(&listener), device));
        let service: shamal_router::LocalService = Arc::new(gpu_worker.service());
        local_workers.push((GPU_WORKER_ID.to_owned(), service));
        tokio::spawn(gpu_worker.serve(
            WorkerListeners {
                grpc: listener,
                metrics: None,
            },
            async move {
                let _ = gpu_router_done_signal.await;
            },
        ))
    });
    let router = tokio::spawn(async move {
        let result = shamal_router::run_with(
            router_config,
            RouterListeners {
                grpc,
                http,
                metrics: Some(metrics),
            },
            metrics_registry,
            shamal_telemetry::shutdown_signal(),
            RouterExtras {
                local_workers,
                async_queue: Some(async_queue),
            },
        )
        .await;
        let _ = router_done.send(());
        let _ = gpu_router_done.send(());
        result
    });

    tokio::spawn(announce(
        worker_address,
        gpu_announce,
        grpc_address,
        http_address,
        metrics_address,
        registry_http_address,
    ));

    let router_result = router.await;
    let worker_result = worker.await;
    let gpu_worker_result = match gpu_worker {
        Some(task) => task.await,
        None => Ok(Ok(())),
    };
    if let Ok(Err(error)) = &gpu_worker_result {
        eprintln!("shamal up: gpu-worker failed: {error}");
    }
    if let Err(error) = model_registry.stop().await {
        eprintln!("shamal up: registry failed: {error:#}");
    }
    match (router_result, worker_result) {
        (Ok(Ok(())), Ok(Ok(()))) if matches!(gpu_worker_result, Ok(Ok(()))) => ExitCode::SUCCESS,
        (router_result, worker_result) => {
            if let Ok(Err(error)) = router_result {
                eprintln!("shamal up: router failed: {error}");
            }
            if let Ok(Err(error)) = worker_result {
                eprintln!("shamal up: worker failed: {error}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Prints the endpoints and the served models once the workers have loaded.
/// `gpu_worker`: the gpu-worker's address and device label.
async fn announce(
    worker: String,
    gpu_worker: Option<(String, String)>,
    grpc: String,
    http: String,
    metrics: String,
    registry: String,
) {
    let Some(models) = loaded_models(&worker).await else {
        return;
    };
    let gpu_models = match &gpu_worker {
        Some((address, device)) => loaded_models(address)
            .await
            .map(|models| (models, device.clone())),
        None => None,
    };
    println!("Shamal is up.");
    println!("  KServe v2 HTTP:  http://{http}/v2");
    println!("  KServe v2 gRPC:  {grpc}");
    println!(
        "  Async inference: POST http://{http}/v2/models/<model>/infer/async, GET http://{http}/v2/async/<id>"
    );
    println!("  Metrics:         http://{metrics}/metrics");
    println!(
        "  Registry:        http://{registry}/ (REST API under /v1, OpenAPI at /openapi.json)"
    );
    println!("  Models:          {} (ONNX Runtime)", models.join(", "));
    if let Some((models, device)) = gpu_models {
        println!(
            "  GPU worker:      {} (candle on {device})",
            if models.is_empty() {
                "no models yet".to_owned()
            } else {
                models.join(", ")
            }
        );
    }
    println!("Press Ctrl-C to stop.");
}

/// Waits until `worker` has finished loading (at most a minute) and lists
/// its versions, with the reason of those not ready.
async fn loaded_models(worker: &str) -> Option<Vec<String>> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{worker}")).ok()?;
    let channel = endpoint.connect_lazy();
    let mut client = GrpcInferenceServiceClient::new(channel);
    for _ in 0..600 {
        let ready = client
            .server_ready(shamal_proto::inference::ServerReadyRequest {})
            .await
            .map(|response| response.into_inner().ready)
            .unwrap_or(false);
        let index = client
            .repository_index(RepositoryIndexRequest::default())
            .await
            .map(|response| response.into_inner().models)
            .unwrap_or_default();
        let loading_done =
            ready || (!index.is_empty() && index.iter().all(|entry| entry.state != "LOADING"));
        if loading_done {
            let models: Vec<String> = index
                .iter()
                .map(|entry| {
                    if entry.state == "READY" {
                        format!("{}:{}", entry.name, entry.version)
                    } else {
                        format!(
                            "{}:{} ({}: {})",
                            entry.name, entry.version, entry.state, entry.reason
                        )
                    }
                })
                .collect();
            return Some(models);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Name under which the bundled demo classifier is registered.
pub const DEMO_MODEL: &str = "classifier";

/// Registers the bundled demo classifier (`<repository>/demo/1/model.onnx`)
/// as model `classifier` the first time the registry starts, so there is a
/// registry-managed model to roll out against.
async fn seed_demo(registry: &ModelRegistry, repository: &Path) -> Result<(), String> {
    if registry.get_model(DEMO_MODEL).await.is_ok() {
        return Ok(());
    }
    let path = repository.join("demo/1/model.onnx");
    let Ok(bytes) = std::fs::read(&path) else {
        // A custom repository without the demo: nothing to seed.
        return Ok(());
    };
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(&bytes));
    let body = futures::stream::once(async move { Ok(bytes::Bytes::from(bytes)) });
    registry
        .put_artifact(&digest, Box::pin(body))
        .await
        .map_err(|error| error.to_string())?;
    registry
        .register_version(
            DEMO_MODEL,
            NewVersion {
                sha256: digest,
                format: "onnx".to_owned(),
                metadata: [("source".to_owned(), "bundled demo".to_owned())].into(),
                ..NewVersion::default()
            },
            "shamal-up",
        )
        .await
        .map_err(|error| error.to_string())?;
    Ok(())
}
