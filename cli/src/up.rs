//! `shamal up`: registry, router and cpu-worker in one process, on
//! loopback. The registry keeps its state (SQLite) and artifacts under the
//! data directory; the worker serves the model repository and every version
//! the registry assigns it; the router follows the registry's rollouts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use shamal_cpu_worker::{CpuWorkerArgs, CpuWorkerConfig, bundled_onnxruntime};
use shamal_proto::inference::RepositoryIndexRequest;
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_registry::model::NewVersion;
use shamal_registry::{ModelRegistry, RegistryConfig, RegistryListeners, RunningRegistry};
use shamal_router::{RouterConfig, RouterListeners};
use shamal_worker::WorkerListeners;
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
    /// Registry REST API, OpenAPI document and web UI port.
    #[arg(long, default_value_t = 8200)]
    registry_http_port: u16,
    /// Registry internal gRPC port (routers and workers), on loopback.
    #[arg(long, default_value_t = 8201)]
    registry_grpc_port: u16,
    /// Largest dynamic batch for models without a configuration file.
    #[arg(long)]
    max_batch_size: Option<usize>,
    /// Queue delay (µs) the batcher may wait to fill a batch, for models
    /// without a configuration file.
    #[arg(long)]
    max_queue_delay_us: Option<u64>,
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
        model_repository: Some(args.model_repository.clone()),
        registry: Some(registry_grpc.to_string()),
        worker_id: Some("local-cpu-worker".to_owned()),
        artifact_cache: Some(args.data_dir.join("cache")),
        onnxruntime_library: args
            .onnxruntime_library
            .clone()
            .or_else(|| bundled_onnxruntime(Path::new("."))),
        instances: args.instances,
        intra_threads: args.intra_threads,
        max_batch_size: args.max_batch_size,
        max_queue_delay_us: args.max_queue_delay_us,
        ..Default::default()
    };
    let worker_config = match CpuWorkerConfig::load(&worker_args) {
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
    let registry = shamal_telemetry::Registry::new();

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
        registry.clone(),
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
        ..RouterConfig::default()
    };
    let worker = match shamal_cpu_worker::build(&worker_config, registry.clone()) {
        Ok(worker) => worker,
        Err(error) => {
            eprintln!("shamal up: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let local_service: shamal_router::LocalService = Arc::new(worker.service());

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
    let local_workers = vec![(
        format!("local cpu-worker ({worker_address})"),
        local_service,
    )];
    let router = tokio::spawn(async move {
        let result = shamal_router::run_with_local_workers(
            router_config,
            RouterListeners {
                grpc,
                http,
                metrics: Some(metrics),
            },
            registry,
            shamal_telemetry::shutdown_signal(),
            local_workers,
        )
        .await;
        let _ = router_done.send(());
        result
    });

    tokio::spawn(announce(
        worker_address,
        grpc_address,
        http_address,
        metrics_address,
        registry_http_address,
    ));

    let router_result = router.await;
    let worker_result = worker.await;
    if let Err(error) = model_registry.stop().await {
        eprintln!("shamal up: registry failed: {error:#}");
    }
    match (router_result, worker_result) {
        (Ok(Ok(())), Ok(Ok(()))) => ExitCode::SUCCESS,
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

/// Prints the endpoints and the served models once the worker has loaded.
async fn announce(worker: String, grpc: String, http: String, metrics: String, registry: String) {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{worker}")) else {
        return;
    };
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
            println!("Shamal is up.");
            println!("  KServe v2 HTTP:  http://{http}/v2");
            println!("  KServe v2 gRPC:  {grpc}");
            println!("  Metrics:         http://{metrics}/metrics");
            println!(
                "  Registry:        http://{registry}/ (REST API under /v1, OpenAPI at /openapi.json)"
            );
            println!("  Models:          {}", models.join(", "));
            println!("Press Ctrl-C to stop.");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
