//! Registry, cpu-workers and router as separate OS processes on loopback,
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
    name: String,
    child: Child,
    log: PathBuf,
    pub command_line: String,
}

impl Process {
    fn spawn(name: String, binary: &Path, args: &[String], log_dir: &Path) -> Result<Process> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        // A benchmark on loopback, without certificates or a provider: each
        // service would refuse to start open.
        let child = Command::new(binary)
            .arg("--insecure")
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
    /// cpu-worker processes, each with its own port and artifact cache.
    pub workers: usize,
}

pub struct Stack {
    pub rest: Rest,
    pub rest_url: String,
    reg_grpc: SocketAddr,
    worker_grpc: Vec<SocketAddr>,
    log_dir: PathBuf,
    work_dir: PathBuf,
    worker_max_batch_size: usize,
    worker_bin: PathBuf,
    router_bin: PathBuf,
    /// The router's KServe v2 gRPC front door, as a URL (once started).
    pub router_url: String,
    // Dropped (killed) in reverse order of start: router, workers, registry.
    pub router: Option<Process>,
    pub workers: Vec<Process>,
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

        let (reg_http, reg_grpc, reg_metrics) = (free_address()?, free_address()?, free_address()?);
        let mut registry = Process::spawn(
            "registry".to_owned(),
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
            worker_grpc: (0..options.workers.max(1))
                .map(|_| free_address())
                .collect::<Result<_>>()?,
            log_dir: options.log_dir.clone(),
            work_dir: options.work_dir.clone(),
            worker_max_batch_size: options.worker_max_batch_size,
            worker_bin,
            router_bin,
            router_url: String::new(),
            router: None,
            workers: Vec::new(),
            registry,
        })
    }

    /// Starts the cpu-workers following the registry and waits until each
    /// serves (they load the registry's versions from then on).
    pub async fn start_workers(&mut self) -> Result<()> {
        for (index, grpc) in self.worker_grpc.clone().into_iter().enumerate() {
            let number = index + 1;
            let cache = self.work_dir.join(format!("worker-cache-{number}"));
            std::fs::create_dir_all(&cache)?;
            let worker_metrics = free_address()?;
            let mut worker = Process::spawn(
                format!("cpu-worker-{number}"),
                &self.worker_bin,
                &[
                    format!("--grpc-listen={grpc}"),
                    format!("--metrics-listen={worker_metrics}"),
                    format!("--registry={}", self.reg_grpc),
                    format!("--worker-id=rollout-bench-worker-{number}"),
                    format!("--artifact-cache={}", cache.display()),
                    format!("--max-batch-size={}", self.worker_max_batch_size),
                ],
                &self.log_dir,
            )?;
            wait_grpc_ready(&mut worker, &format!("http://{grpc}")).await?;
            self.workers.push(worker);
        }
        Ok(())
    }

    /// Starts the router following the registry, in front of the workers,
    /// and waits until it is ready (it is once a worker serves a model).
    pub async fn start_router(&mut self) -> Result<()> {
        let (router_grpc, router_http, router_metrics) =
            (free_address()?, free_address()?, free_address()?);
        let mut args = vec![
            format!("--grpc-listen={router_grpc}"),
            format!("--http-listen={router_http}"),
            format!("--metrics-listen={router_metrics}"),
            format!("--registry={}", self.reg_grpc),
            "--router-id=rollout-bench-router".to_owned(),
        ];
        args.extend(
            self.worker_grpc
                .iter()
                .map(|address| format!("--worker={address}")),
        );
        let mut router =
            Process::spawn("router".to_owned(), &self.router_bin, &args, &self.log_dir)?;
        self.router_url = format!("http://{router_grpc}");
        wait_grpc_ready(&mut router, &self.router_url).await?;
        self.router = Some(router);
        Ok(())
    }

    /// The workers' KServe v2 gRPC services, as URLs.
    pub fn worker_urls(&self) -> Vec<String> {
        self.worker_grpc
            .iter()
            .map(|address| format!("http://{address}"))
            .collect()
    }

    /// An error when one of the processes has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        self.registry.check_alive()?;
        for worker in &mut self.workers {
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
