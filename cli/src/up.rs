//! `shamal up`: registry, router, cpu-worker, gpu-worker and the audit
//! service in one process, on loopback. The registry keeps its state
//! (SQLite) and artifacts under the data directory; each worker serves its
//! model repository (ONNX for the cpu-worker, safetensors on candle for the
//! gpu-worker) and every version of its format the registry assigns it; the
//! router follows the registry's rollouts. The router and the registry
//! report every inference and every change to the audit log (SQLite in the
//! data directory, through spools there), the workers every async job they
//! run. The batch coordinator runs embedded too (SQLite in the data
//! directory, an in-process batch queue that the workers' batch role
//! consumes), so `shamal batch submit` scores datasets on the local
//! workers.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use shamal_async_queue::{JobQueue, MemoryQueue, QueueConfig};
use shamal_audit_client::AuditClientConfig;
use shamal_audit_service::{AuditConfig, AuditListeners, RunningAudit};
use shamal_auth::security::{SecurityArgs, SecurityConfig};
use shamal_batch_coordinator::catalog::Signature;
use shamal_batch_coordinator::error::BatchError;
use shamal_batch_coordinator::{
    BatchConfig, BatchListeners, Dependencies, MetadataSource, ModelCatalog, RunningBatch,
};
use shamal_cpu_worker::{CpuWorkerArgs, CpuWorkerConfig, bundled_onnxruntime};
use shamal_gpu_worker::{GpuWorkerArgs, GpuWorkerConfig};
use shamal_proto::inference::RepositoryIndexRequest;
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::shamal::registry::v1::{ModelState, VersionState};
use shamal_registry::model::NewVersion;
use shamal_registry::{ModelRegistry, RegistryConfig, RegistryListeners, RunningRegistry};
use shamal_router::{RouterConfig, RouterExtras, RouterListeners};
use shamal_tls::ClientTls;
use shamal_worker::node::MEMORY_QUEUE;
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
    /// Audit service gRPC port (append, query, export, verify), on
    /// loopback.
    #[arg(long, default_value_t = 8301)]
    audit_grpc_port: u16,
    /// Start without the audit service: nothing is recorded (for
    /// comparisons; a regulated deployment keeps it on).
    #[arg(long)]
    no_audit: bool,
    /// Report to this audit service instead of starting one (a shared
    /// service, `https://audit.example:8301`; or, for measuring what the
    /// producers' side costs, one that is elsewhere or down: records wait
    /// in the spools).
    #[arg(long, value_name = "URL", conflicts_with = "no_audit")]
    audit_endpoint: Option<String>,
    /// Batch coordinator gRPC port (`shamal batch`, BatchService).
    #[arg(long, default_value_t = 8401)]
    batch_grpc_port: u16,
    /// Batch coordinator REST port (`/v1/jobs`, OpenAPI at
    /// /openapi.json).
    #[arg(long, default_value_t = 8402)]
    batch_http_port: u16,
    /// Start without the batch coordinator (and without the workers'
    /// batch role).
    #[arg(long)]
    no_batch: bool,
    /// Key file the workers encrypt batch outputs under (`submit
    /// --encrypt`; their `[batch] key_file`: TOML or JSON, mode 0600);
    /// without it, encrypted jobs are refused by the workers.
    #[arg(long, value_name = "FILE", conflicts_with = "no_batch")]
    batch_key_file: Option<PathBuf>,
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
    /// Turn OIDC + RBAC on for the router and the registry: access tokens
    /// of this issuer (exact URL) are required on every API.
    #[arg(long, env = "SHAMAL_OIDC_ISSUER")]
    oidc_issuer: Option<String>,
    /// The audience access tokens must carry (with --oidc-issuer).
    #[arg(long, env = "SHAMAL_OIDC_AUDIENCE")]
    oidc_audience: Option<String>,
    /// The token claim holding roles.
    #[arg(long, default_value = "roles")]
    oidc_roles_claim: String,
    /// Listen on a non-loopback --host without auth (development only).
    #[arg(long)]
    insecure: bool,
    /// Serve TLS on the public ports and mTLS inside (workers to the
    /// registry, router to the registry), with development certificates
    /// kept in <data-dir>/certs (made by the first start; clients trust
    /// <data-dir>/certs/ca.pem).
    #[arg(long)]
    tls: bool,
}

/// Where `shamal up --tls` keeps its development CA and certificates.
fn certs_dir(args: &UpArgs) -> PathBuf {
    args.data_dir.join("certs")
}

/// The development certificates of `shamal up --tls`: made on the first
/// start (one per service, for localhost, 127.0.0.1 and a non-loopback
/// --host), kept afterwards, so that clients keep trusting the same CA.
fn dev_certificates(args: &UpArgs) -> Result<(), String> {
    let dir = certs_dir(args);
    if dir.join("ca.pem").exists() {
        return Ok(());
    }
    let mut options = shamal_tls::DevPkiOptions::default();
    if !args.host.is_loopback() && !args.host.is_unspecified() {
        options.hosts.push(args.host.to_string());
    }
    shamal_tls::init_dev_pki(&dir, &options)
        .map(|_| ())
        .map_err(|error| {
            format!(
                "cannot make development certificates in {}: {error}",
                dir.display()
            )
        })
}

/// `security` with `service`'s development certificate, under --tls.
fn with_tls(security: &SecurityConfig, args: &UpArgs, service: &str) -> SecurityConfig {
    if !args.tls {
        return security.clone();
    }
    let files = shamal_tls::dev::service_files(&certs_dir(args), service);
    SecurityConfig {
        tls_cert: Some(files.cert),
        tls_key: Some(files.key),
        tls_ca: Some(files.ca),
        ..security.clone()
    }
}

/// The security of `shamal up`'s public APIs (router and registry): auth
/// off on loopback (the default), OIDC with --oidc-issuer; listening
/// beyond loopback without auth needs --insecure.
fn public_security(args: &UpArgs) -> Result<SecurityConfig, String> {
    if args.oidc_issuer.is_some() != args.oidc_audience.is_some() {
        return Err("--oidc-issuer and --oidc-audience go together".to_owned());
    }
    let oidc = args.oidc_issuer.is_some();
    if !oidc && !args.host.is_loopback() && !args.insecure {
        return Err(format!(
            "refusing to listen on {} without authentication: give --oidc-issuer and \
             --oidc-audience, or --insecure to accept anyone who can reach it",
            args.host
        ));
    }
    Ok(SecurityConfig {
        insecure: !oidc,
        oidc_issuer: args.oidc_issuer.clone(),
        oidc_audience: args.oidc_audience.clone(),
        oidc_roles_claim: args.oidc_roles_claim.clone(),
        ..SecurityConfig::default()
    })
}

/// The gpu-worker's default repository (the bundled demo models).
const DEFAULT_GPU_REPOSITORY: &str = "models/gpu/repository";

/// MetricsRegistry identities of the in-process workers. The router's local
/// workers carry the same names, so the registry's view of them (region,
/// capacity, drain) applies to the in-process ones instead of adding a
/// second, networked copy of each.
const CPU_WORKER_ID: &str = "local-cpu-worker";
const GPU_WORKER_ID: &str = "local-gpu-worker";

/// The in-process workers' security flags: their development certificate
/// under --tls, else insecure on loopback.
fn worker_security(args: &UpArgs) -> SecurityArgs {
    if !args.tls {
        return SecurityArgs {
            insecure: Some(true),
            ..SecurityArgs::default()
        };
    }
    let files = shamal_tls::dev::service_files(&certs_dir(args), "worker");
    SecurityArgs {
        tls_cert: Some(files.cert),
        tls_key: Some(files.key),
        tls_ca: Some(files.ca),
        ..SecurityArgs::default()
    }
}

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
        // In process with the router, which calls them without a hop;
        // their own gRPC listens on loopback only. Under --tls they take
        // mTLS callers only and reach the registry with their certificate.
        security: worker_security(args),
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

/// The embedded audit service: SQLite and its checkpoint signing key in the
/// data directory, on loopback. Under --tls it takes mTLS (and tokens of
/// the --oidc-issuer); otherwise it is open to this machine, like the
/// other internal ports.
async fn start_audit(
    args: &UpArgs,
    security: &SecurityConfig,
    listener: TcpListener,
    metrics: &shamal_telemetry::MetricsRegistry,
) -> anyhow::Result<RunningAudit> {
    let security = if args.tls {
        with_tls(security, args, "audit")
    } else {
        SecurityConfig {
            insecure: true,
            ..SecurityConfig::default()
        }
    };
    let config = AuditConfig {
        security,
        grpc_listen: listener.local_addr()?,
        metrics_listen: None,
        database_url: format!(
            "sqlite://{}?mode=rwc",
            args.data_dir.join("audit.db").display()
        ),
        signing_key_file: args.data_dir.join("audit-signing-key.pem"),
        ..AuditConfig::default()
    };
    RunningAudit::start(
        config,
        AuditListeners {
            grpc: listener,
            metrics: None,
        },
        metrics.clone(),
    )
    .await
}

/// The `[audit]` settings of an embedded producer: the embedded audit
/// service, a spool of its own in the data directory, fail closed; off
/// with --no-audit.
fn audit_client(args: &UpArgs, audit: Option<&str>, service: &str) -> AuditClientConfig {
    match audit {
        Some(audit) => AuditClientConfig {
            endpoint: Some(audit.to_owned()),
            spool_dir: args.data_dir.join("audit-spool").join(service),
            ..AuditClientConfig::default()
        },
        None => AuditClientConfig::default(),
    }
}

async fn bind(host: IpAddr, port: u16, what: &str) -> Result<TcpListener, String> {
    TcpListener::bind(SocketAddr::new(host, port))
        .await
        .map_err(|error| format!("cannot bind the {what} port {host}:{port}: {error}"))
}

pub async fn run(args: UpArgs) -> ExitCode {
    let security = match public_security(&args) {
        Ok(security) => security,
        Err(error) => {
            eprintln!("shamal up: {error}");
            return ExitCode::from(64);
        }
    };
    if args.tls
        && let Err(error) = dev_certificates(&args)
    {
        eprintln!("shamal up: {error}");
        return ExitCode::FAILURE;
    }
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
        let audit_grpc = if args.no_audit || args.audit_endpoint.is_some() {
            None
        } else {
            Some(bind(loopback, args.audit_grpc_port, "audit gRPC").await?)
        };
        let batch = if args.no_batch {
            None
        } else {
            Some(BatchListeners {
                grpc: bind(args.host, args.batch_grpc_port, "batch gRPC").await?,
                http: bind(args.host, args.batch_http_port, "batch REST").await?,
                metrics: None,
            })
        };
        Ok::<_, String>((
            worker,
            grpc,
            http,
            metrics,
            registry_http,
            registry_grpc,
            audit_grpc,
            batch,
        ))
    }
    .await;
    let (
        worker_listener,
        grpc,
        http,
        metrics,
        registry_http,
        registry_grpc_listener,
        audit_grpc_listener,
        batch_listeners,
    ) = match listeners {
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

    // The audit service before everything that reports to it, stopped
    // after them so that their spools drain into it.
    let audit_address = match &args.audit_endpoint {
        Some(endpoint) => Some(endpoint.clone()),
        None => audit_grpc_listener.as_ref().map(address),
    };
    let audit = match audit_grpc_listener {
        Some(listener) => match start_audit(&args, &security, listener, &metrics_registry).await {
            Ok(audit) => Some(audit),
            Err(error) => {
                eprintln!("shamal up: cannot start the audit service: {error:#}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };

    // The registry first: worker and router follow it.
    let registry_config = RegistryConfig {
        security: with_tls(&security, &args, "registry"),
        http_listen: SocketAddr::new(args.host, args.registry_http_port),
        grpc_listen: registry_grpc,
        metrics_listen: None,
        database_url: format!("sqlite://{}", args.data_dir.join("registry.db").display()),
        artifact_dir: args.data_dir.join("artifacts"),
        audit: audit_client(&args, audit_address.as_deref(), "registry"),
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
        security: with_tls(&security, &args, "router"),
        workers: Vec::new(),
        refresh_interval_ms: 500,
        registry: Some(registry_grpc.to_string()),
        router_id: "local-router".to_owned(),
        audit: audit_client(&args, audit_address.as_deref(), "router"),
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
    // The batch queue: in process, shared by the coordinator and the
    // workers' batch role (jobs of an earlier run are queued again by the
    // coordinator when it resumes them).
    let batch_queue: Option<Arc<dyn JobQueue>> = if batch_listeners.is_some() {
        match MemoryQueue::new(BatchConfig::default().queue_config()) {
            Ok(queue) => Some(Arc::new(queue)),
            Err(error) => {
                eprintln!("shamal up: cannot create the batch queue: {error}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    // The workers record the async jobs and batch shards they run in the
    // embedded audit log (each with a spool of its own; none with
    // --no-audit).
    let mut worker_config = worker_config;
    worker_config.node.audit = audit_client(&args, audit_address.as_deref(), "cpu-worker");
    if batch_queue.is_some() {
        worker_config.node.batch.queue = Some(MEMORY_QUEUE.to_owned());
        if let Some(key_file) = &args.batch_key_file {
            worker_config.node.batch.key_file = Some(key_file.clone());
        }
    }
    let worker = match shamal_cpu_worker::build_with_batch_queue(
        &worker_config,
        metrics_registry.clone(),
        batch_queue.clone(),
    ) {
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
        Some((mut config, listener)) => {
            config.node.audit = audit_client(&args, audit_address.as_deref(), "gpu-worker");
            if batch_queue.is_some() {
                config.node.batch.queue = Some(MEMORY_QUEUE.to_owned());
                if let Some(key_file) = &args.batch_key_file {
                    config.node.batch.key_file = Some(key_file.clone());
                }
            }
            let built = shamal_gpu_worker::device::select(config.device, config.cuda_device)
                .map_err(anyhow::Error::msg)
                .and_then(|device| {
                    let label = shamal_gpu_worker::device::label(&device);
                    shamal_gpu_worker::build_on_with_batch_queue(
                        &config,
                        device,
                        metrics_registry.clone(),
                        batch_queue.clone(),
                    )
                    .map(|worker| (worker, label))
                });
            match built {
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

    // The batch coordinator: its jobs' shards go on the in-process batch
    // queue, which the workers' batch role consumes.
    let batch = match (batch_listeners, batch_queue) {
        (Some(listeners), Some(queue)) => {
            let mut services: Vec<shamal_router::LocalService> = vec![local_service.clone()];
            if let Some((gpu_worker, _, _)) = &gpu_worker {
                services.push(Arc::new(gpu_worker.service()));
            }
            match start_batch(
                &args,
                &security,
                BatchEmbedding {
                    listeners,
                    queue,
                    registry: model_registry.registry.clone(),
                    services,
                    registry_grpc,
                    inference: grpc_address.clone(),
                    audit: audit_address.as_deref(),
                },
                &metrics_registry,
            )
            .await
            {
                Ok(batch) => Some(batch),
                Err(error) => {
                    eprintln!("shamal up: cannot start the batch coordinator: {error:#}");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => None,
    };
    let batch_announce = batch.as_ref().map(|(batch, _)| {
        (
            batch.grpc_address.to_string(),
            batch.http_address.to_string(),
        )
    });

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
                auth_metrics: None,
            },
        )
        .await;
        let _ = router_done.send(());
        let _ = gpu_router_done.send(());
        result
    });

    let tls = if args.tls {
        format!(
            "TLS on (development CA {}; mTLS inside)",
            certs_dir(&args).join("ca.pem").display()
        )
    } else {
        "TLS off".to_owned()
    };
    let auth = match &security.oidc_issuer {
        Some(issuer) => format!("OIDC + RBAC (issuer {issuer}); {tls}"),
        None if args.host.is_loopback() => format!(
            "OFF: anyone on this machine may call every API (loopback only; see \
             docs/security.md); {tls}"
        ),
        None => format!(
            "OFF on {} (--insecure): anyone who can reach it may call every API; {tls}",
            args.host
        ),
    };
    // Under --tls the workers take mTLS callers only: ask them as the
    // router.
    let probe_tls = if args.tls {
        match ClientTls::new(&shamal_tls::dev::service_files(&certs_dir(&args), "router")) {
            Ok(tls) => Some(tls),
            Err(error) => {
                eprintln!("shamal up: {error}");
                None
            }
        }
    } else {
        None
    };
    tokio::spawn(announce(Banner {
        auth,
        tls: probe_tls,
        worker: worker_address,
        gpu_worker: gpu_announce,
        grpc: grpc_address,
        http: http_address,
        metrics: metrics_address,
        registry: registry_http_address,
        audit: audit_address,
        batch: batch_announce,
        data_dir: args.data_dir.clone(),
    }));

    let router_result = router.await;
    // The coordinator stops with the router, before the workers drain;
    // its audit events go to the audit service before that stops.
    if let Some((batch, auditor)) = batch {
        if let Err(error) = batch.stop().await {
            eprintln!("shamal up: batch coordinator failed: {error:#}");
        }
        if let Err(error) = auditor.drain(Duration::from_secs(5)).await {
            eprintln!(
                "shamal up: batch audit events left in the spool for the next start: {error}"
            );
        }
        auditor.shutdown().await;
    }
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
    if let Some(audit) = audit
        && let Err(error) = audit.stop().await
    {
        eprintln!("shamal up: audit service failed: {error:#}");
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

/// What the start-up banner shows.
struct Banner {
    /// The auth and TLS mode, in words.
    auth: String,
    /// The router's certificate under --tls (the workers take mTLS only).
    tls: Option<ClientTls>,
    worker: String,
    /// The gpu-worker's address and device label.
    gpu_worker: Option<(String, String)>,
    grpc: String,
    http: String,
    metrics: String,
    registry: String,
    audit: Option<String>,
    /// The batch coordinator's gRPC and REST addresses.
    batch: Option<(String, String)>,
    data_dir: PathBuf,
}

/// Prints the endpoints and the served models once the workers have loaded.
async fn announce(banner: Banner) {
    let Banner {
        auth,
        tls,
        worker,
        gpu_worker,
        grpc,
        http,
        metrics,
        registry,
        audit,
        batch,
        data_dir,
    } = banner;
    let Some(models) = loaded_models(&worker, tls.as_ref()).await else {
        return;
    };
    let gpu_models = match &gpu_worker {
        Some((address, device)) => loaded_models(address, tls.as_ref())
            .await
            .map(|models| (models, device.clone())),
        None => None,
    };
    let web = if tls.is_some() { "https" } else { "http" };
    println!("Shamal is up.");
    println!("  KServe v2 HTTP:  {web}://{http}/v2");
    println!(
        "  KServe v2 gRPC:  {grpc}{}",
        if tls.is_some() { " (TLS)" } else { "" }
    );
    println!(
        "  Async inference: POST {web}://{http}/v2/models/<model>/infer/async, GET {web}://{http}/v2/async/<id>"
    );
    println!("  Metrics:         http://{metrics}/metrics");
    println!("  Auth:            {auth}");
    println!(
        "  Registry:        {web}://{registry}/ (REST API under /v1, OpenAPI at /openapi.json)"
    );
    match audit {
        Some(audit) if audit.contains("://") => println!(
            "  Audit log:       {audit} (--audit-endpoint: records spooled in {} until it takes them)",
            data_dir.join("audit-spool").display()
        ),
        Some(audit) => println!(
            "  Audit log:       {}://{audit} (every inference and change; `shamal audit query`, records in {})",
            if tls.is_some() { "https" } else { "http" },
            data_dir.join("audit.db").display()
        ),
        None => println!("  Audit log:       OFF (--no-audit): nothing is recorded"),
    }
    match batch {
        Some((grpc, http)) => println!(
            "  Batch jobs:      {web}://{grpc} (gRPC, `shamal batch`), REST {web}://{http}/v1/jobs (jobs in {})",
            data_dir.join("batch.db").display()
        ),
        None => println!("  Batch jobs:      OFF (--no-batch)"),
    }
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
async fn loaded_models(worker: &str, tls: Option<&ClientTls>) -> Option<Vec<String>> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{worker}")).ok()?;
    let channel = match tls {
        Some(tls) => tls.connect_lazy(endpoint),
        None => endpoint.connect_lazy(),
    };
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

/// What the embedded batch coordinator is given.
struct BatchEmbedding<'a> {
    listeners: BatchListeners,
    /// The in-process batch queue the workers' batch role consumes.
    queue: Arc<dyn JobQueue>,
    registry: Arc<ModelRegistry>,
    /// The in-process workers' inference services.
    services: Vec<shamal_router::LocalService>,
    registry_grpc: SocketAddr,
    inference: String,
    audit: Option<&'a str>,
}

/// The embedded batch coordinator: SQLite in the data directory, the
/// in-process batch queue, the embedded registry as model catalog (with
/// the served repository's models for those it does not know), the
/// in-process workers' metadata for model signatures, and the embedded
/// audit log (a spool of its own). Its APIs are public like the router's
/// and the registry's: auth as theirs, and its development certificate
/// under --tls.
async fn start_batch(
    args: &UpArgs,
    security: &SecurityConfig,
    embedding: BatchEmbedding<'_>,
    metrics: &shamal_telemetry::MetricsRegistry,
) -> anyhow::Result<(RunningBatch, shamal_audit_client::Auditor)> {
    let BatchEmbedding {
        listeners,
        queue,
        registry,
        services,
        registry_grpc,
        inference,
        audit,
    } = embedding;
    let config = BatchConfig {
        security: with_tls(security, args, "batch"),
        grpc_listen: listeners.grpc.local_addr()?,
        http_listen: listeners.http.local_addr()?,
        metrics_listen: None,
        database_url: format!(
            "sqlite://{}?mode=rwc",
            args.data_dir.join("batch.db").display()
        ),
        registry_endpoint: registry_grpc.to_string(),
        inference_endpoint: inference,
        audit: audit_client(args, audit, "batch"),
        ..BatchConfig::default()
    };
    config.validate()?;
    let auditor = if config.audit.enabled() {
        let tls = if args.tls {
            Some(
                ClientTls::new(&shamal_tls::dev::service_files(&certs_dir(args), "batch"))
                    .map_err(|error| anyhow::anyhow!("{error}"))?,
            )
        } else {
            None
        };
        shamal_audit_client::Auditor::start(
            config.audit.clone(),
            tls.as_ref().map(|tls| tls.expect_service("audit")).as_ref(),
            "batch",
            "local-batch",
            metrics,
        )
        .map_err(|error| anyhow::anyhow!("the batch coordinator's audit client: {error}"))?
    } else {
        shamal_audit_client::Auditor::disabled()
    };
    let served = Arc::new(ServedModels { services });
    let dependencies = Dependencies {
        queue: shamal_batch_coordinator::QueueSource::Shared(queue),
        catalog: Arc::new(UpCatalog {
            registry,
            served: served.clone(),
        }),
        metadata: served,
        auditor: auditor.clone(),
    };
    let running = RunningBatch::start(config, dependencies, listeners, metrics.clone()).await?;
    Ok((running, auditor))
}

/// The in-process workers, asked for what they serve and for models'
/// signatures (their v2 ModelMetadata, called in process: no network
/// hop, no auth between the coordinator and its own workers).
struct ServedModels {
    services: Vec<shamal_router::LocalService>,
}

impl ServedModels {
    /// The versions of `name` some worker has READY.
    async fn ready_versions(&self, name: &str) -> Vec<u64> {
        let mut versions = Vec::new();
        for service in &self.services {
            let Ok(index) = service
                .repository_index(tonic::Request::new(RepositoryIndexRequest {
                    ready: true,
                    ..RepositoryIndexRequest::default()
                }))
                .await
            else {
                continue;
            };
            versions.extend(
                index
                    .into_inner()
                    .models
                    .iter()
                    .filter(|entry| entry.name == name && entry.state == "READY")
                    .filter_map(|entry| entry.version.parse::<u64>().ok()),
            );
        }
        versions.sort_unstable();
        versions.dedup();
        versions
    }
}

impl MetadataSource for ServedModels {
    fn signature<'a>(
        &'a self,
        model: &'a str,
        version: u64,
    ) -> futures::future::BoxFuture<'a, shamal_batch_coordinator::error::Result<Signature>> {
        Box::pin(async move {
            let mut answers = Vec::new();
            for service in &self.services {
                match service
                    .model_metadata(tonic::Request::new(
                        shamal_proto::inference::ModelMetadataRequest {
                            name: model.to_owned(),
                            version: version.to_string(),
                        },
                    ))
                    .await
                {
                    Ok(response) => {
                        let response = response.into_inner();
                        return Ok(Signature {
                            inputs: response
                                .inputs
                                .into_iter()
                                .map(|input| {
                                    shamal_batch_io::ModelInput::new(
                                        input.name,
                                        input.datatype,
                                        input.shape,
                                    )
                                })
                                .collect(),
                            outputs: response
                                .outputs
                                .into_iter()
                                .map(|output| output.name)
                                .collect(),
                        });
                    }
                    Err(status) => answers.push(status.message().to_owned()),
                }
            }
            Err(BatchError::FailedPrecondition(format!(
                "model '{model}' version {version} is not served by the workers of shamal up \
                 ({}); its inputs cannot be checked",
                answers.join("; ")
            )))
        })
    }
}

/// The embedded registry's models; a model it does not know but a worker
/// serves from its repository (the bundled `demo`) is taken as the
/// versions the workers have ready, with no limits.
struct UpCatalog {
    registry: Arc<ModelRegistry>,
    served: Arc<ServedModels>,
}

impl ModelCatalog for UpCatalog {
    fn model<'a>(
        &'a self,
        name: &'a str,
    ) -> futures::future::BoxFuture<'a, shamal_batch_coordinator::error::Result<Option<ModelState>>>
    {
        Box::pin(async move {
            let known =
                self.registry.model_state(name).await.map_err(|error| {
                    BatchError::Internal(format!("the embedded registry: {error}"))
                })?;
            if known.is_some() {
                return Ok(known);
            }
            let versions = self.served.ready_versions(name).await;
            if versions.is_empty() {
                return Ok(None);
            }
            Ok(Some(ModelState {
                name: name.to_owned(),
                versions: versions
                    .into_iter()
                    .map(|version| VersionState {
                        version,
                        lifecycle: "ready".to_owned(),
                        ..VersionState::default()
                    })
                    .collect(),
                ..ModelState::default()
            }))
        })
    }

    fn tenant_regions<'a>(
        &'a self,
        tenant: &'a str,
    ) -> futures::future::BoxFuture<'a, shamal_batch_coordinator::error::Result<Option<Vec<String>>>>
    {
        Box::pin(async move {
            match self.registry.get_tenant_policy(tenant).await {
                Ok(policy) => Ok(Some(policy.allowed_regions)),
                Err(shamal_registry::error::RegistryError::NotFound(_)) => Ok(None),
                Err(error) => Err(BatchError::Internal(format!(
                    "the embedded registry: {error}"
                ))),
            }
        })
    }
}
