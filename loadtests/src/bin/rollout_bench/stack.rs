//! Registry, cpu-worker and router as separate OS processes on loopback,
//! started from their release binaries with their command-line flags, as
//! they are deployed.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use shamal_proto::inference::ServerReadyRequest;
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tokio::time::Instant;

use crate::rest::Rest;

/// One child process, killed when dropped.
pub struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
    pub command_line: String,
}

impl Process {
    fn spawn(
        name: &'static str,
        binary: &Path,
        args: &[String],
        log_dir: &Path,
    ) -> Result<Process> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let command_line = std::iter::once(binary.display().to_string())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        Ok(Process {
            name,
            child,
            log,
            command_line,
        })
    }

    /// An error, with the end of the log, when the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); end of {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            );
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A loopback address on a port free right now.
fn free_address() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

/// What the stack is started with.
pub struct StackOptions {
    pub bin_dir: PathBuf,
    pub database_url: String,
    pub work_dir: PathBuf,
    pub log_dir: PathBuf,
    pub worker_max_batch_size: usize,
}

pub struct Stack {
    pub rest: Rest,
    pub rest_url: String,
    reg_grpc: SocketAddr,
    worker_grpc: SocketAddr,
    log_dir: PathBuf,
    cache: PathBuf,
    worker_max_batch_size: usize,
    worker_bin: PathBuf,
    router_bin: PathBuf,
    /// The router's KServe v2 gRPC front door, as a URL (once started).
    pub router_url: String,
    // Dropped (killed) in reverse order of start: router, worker, registry.
    pub router: Option<Process>,
    pub worker: Option<Process>,
    pub registry: Process,
}

impl Stack {
    pub async fn start(options: &StackOptions) -> Result<Stack> {
        let binary = |name: &str| -> Result<PathBuf> {
            let path = options.bin_dir.join(name);
            if !path.is_file() {
                bail!(
                    "{} not found: build it with `cargo build --release -p {name}` or pass --bin-dir",
                    path.display()
                );
            }
            Ok(path)
        };
        let (registry_bin, worker_bin, router_bin) = (
            binary("shamal-registry")?,
            binary("shamal-cpu-worker")?,
            binary("shamal-router")?,
        );
        let artifacts = options.work_dir.join("artifacts");
        let cache = options.work_dir.join("worker-cache");
        std::fs::create_dir_all(&cache)?;

        let (reg_http, reg_grpc, reg_metrics) = (free_address()?, free_address()?, free_address()?);
        let mut registry = Process::spawn(
            "registry",
            &registry_bin,
            &[
                format!("--http-listen={reg_http}"),
                format!("--grpc-listen={reg_grpc}"),
                format!("--metrics-listen={reg_metrics}"),
                format!("--database-url={}", options.database_url),
                format!("--artifact-dir={}", artifacts.display()),
            ],
            &options.log_dir,
        )?;
        let rest_url = format!("http://{reg_http}");
        let rest = Rest::new(&rest_url)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !rest.up().await {
            registry.check_alive()?;
            if Instant::now() > deadline {
                bail!("the registry's REST API did not answer within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        Ok(Stack {
            rest,
            rest_url,
            reg_grpc,
            worker_grpc: free_address()?,
            log_dir: options.log_dir.clone(),
            cache,
            worker_max_batch_size: options.worker_max_batch_size,
            worker_bin,
            router_bin,
            router_url: String::new(),
            router: None,
            worker: None,
            registry,
        })
    }

    /// Starts the cpu-worker following the registry and waits until it
    /// serves (it loads the registry's versions from then on).
    pub async fn start_worker(&mut self) -> Result<()> {
        let worker_metrics = free_address()?;
        let mut worker = Process::spawn(
            "cpu-worker",
            &self.worker_bin,
            &[
                format!("--grpc-listen={}", self.worker_grpc),
                format!("--metrics-listen={worker_metrics}"),
                format!("--registry={}", self.reg_grpc),
                "--worker-id=rollout-bench-worker".to_owned(),
                format!("--artifact-cache={}", self.cache.display()),
                format!("--max-batch-size={}", self.worker_max_batch_size),
            ],
            &self.log_dir,
        )?;
        wait_grpc_ready(&mut worker, &format!("http://{}", self.worker_grpc)).await?;
        self.worker = Some(worker);
        Ok(())
    }

    /// Starts the router following the registry, in front of the worker,
    /// and waits until it is ready (it is once the worker serves a model).
    pub async fn start_router(&mut self) -> Result<()> {
        let (router_grpc, router_http, router_metrics) =
            (free_address()?, free_address()?, free_address()?);
        let mut router = Process::spawn(
            "router",
            &self.router_bin,
            &[
                format!("--grpc-listen={router_grpc}"),
                format!("--http-listen={router_http}"),
                format!("--metrics-listen={router_metrics}"),
                format!("--worker={}", self.worker_grpc),
                format!("--registry={}", self.reg_grpc),
                "--router-id=rollout-bench-router".to_owned(),
            ],
            &self.log_dir,
        )?;
        self.router_url = format!("http://{router_grpc}");
        wait_grpc_ready(&mut router, &self.router_url).await?;
        self.router = Some(router);
        Ok(())
    }

    /// The worker's KServe v2 gRPC service, as a URL.
    pub fn worker_url(&self) -> String {
        format!("http://{}", self.worker_grpc)
    }

    /// An error when one of the processes has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        self.registry.check_alive()?;
        if let Some(worker) = &mut self.worker {
            worker.check_alive()?;
        }
        if let Some(router) = &mut self.router {
            router.check_alive()?;
        }
        Ok(())
    }
}

/// Polls ServerReady until it answers true (60 s at most).
async fn wait_grpc_ready(process: &mut Process, url: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        process.check_alive()?;
        if let Ok(mut client) = GrpcInferenceServiceClient::connect(url.to_owned()).await
            && let Ok(response) = client.server_ready(ServerReadyRequest {}).await
            && response.into_inner().ready
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} at {url} not ready within 60 s", process.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
