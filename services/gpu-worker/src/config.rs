//! gpu-worker configuration: defaults < TOML file < SHAMAL_GPU_WORKER_* env
//! < command-line flags, validated before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shamal_worker::{ModelDefaults, RegistryAgentSettings, WorkerConfig};

use crate::spec::DevicePreference;

/// Repository served when neither a repository nor a registry is set.
pub const DEFAULT_MODEL_REPOSITORY: &str = "models/gpu/repository";

/// Effective configuration of a gpu-worker.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuWorkerConfig {
    /// Address of the v2 gRPC service the router calls.
    pub grpc_listen: SocketAddr,
    /// Address of `/metrics` and probes; `None` (only when embedding the
    /// service as a library) disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// Triton-layout model repository. Unset: `models/gpu/repository` when
    /// no registry is configured, none otherwise. With both, repository and
    /// registry models are served side by side.
    pub model_repository: Option<PathBuf>,
    /// The model registry's internal gRPC address (`host:port` or URL);
    /// set, the worker loads the versions the registry assigns it.
    pub registry: Option<String>,
    /// Identity in the registry; unset: `<hostname>-<gRPC port>`.
    pub worker_id: Option<String>,
    /// `host:port` routers reach this worker's gRPC at; unset: the bound
    /// gRPC address (the host name in place of 0.0.0.0).
    pub advertise_address: Option<String>,
    /// Region (data residency) reported to the registry.
    pub region: String,
    /// Where artifacts fetched from the registry are kept (by sha256).
    pub artifact_cache: PathBuf,
    /// Requests this worker is sized to run concurrently, reported to the
    /// registry (routers weight their choice by it); unset: `instances ×
    /// max_batch_size`.
    pub capacity: Option<u32>,
    /// On shutdown with a registry: how long the worker keeps serving after
    /// the registry marked it draining, so routers route around it before
    /// it stops taking requests (milliseconds).
    pub drain_grace_ms: u64,
    /// Compute device: `auto` (CUDA when built with the `cuda` feature and
    /// a GPU answers, else CPU), `cpu`, or `cuda` (fail without a GPU).
    pub device: DevicePreference,
    /// CUDA device ordinal used for `auto` and `cuda`.
    pub cuda_device: usize,
    /// candle's CPU compute threads, one count for the whole process (see
    /// [`crate::cpu_threads`]). Unset: `RAYON_NUM_THREADS` when the
    /// environment sets it, else 1 on a CPU worker and candle's own default
    /// (every physical core) on a CUDA worker.
    pub cpu_threads: Option<usize>,
    /// Defaults for models whose configuration leaves them out.
    pub max_batch_size: usize,
    pub max_queue_delay_us: u64,
    /// Instances per model version without `instance_group`. Unset: on the
    /// CPU, one per `cpu_threads` cores (one per core by default); on CUDA, 1.
    pub instances: Option<usize>,
    pub max_queue_size: usize,
    pub max_message_bytes: usize,
}

impl Default for GpuWorkerConfig {
    fn default() -> Self {
        let defaults = ModelDefaults::default();
        GpuWorkerConfig {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 8301)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8302))),
            model_repository: None,
            registry: None,
            worker_id: None,
            advertise_address: None,
            region: "local".to_owned(),
            artifact_cache: std::env::temp_dir().join("shamal-artifacts"),
            capacity: None,
            drain_grace_ms: u64::try_from(shamal_worker::agent::DEFAULT_DRAIN_GRACE.as_millis())
                .unwrap_or(1000),
            device: DevicePreference::Auto,
            cuda_device: 0,
            cpu_threads: None,
            max_batch_size: defaults.max_batch_size,
            max_queue_delay_us: u64::try_from(defaults.max_queue_delay.as_micros()).unwrap_or(0),
            instances: None,
            max_queue_size: defaults.max_queue_size,
            max_message_bytes: shamal_rpc::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// Command-line flags (each also readable from its environment variable).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct GpuWorkerArgs {
    /// TOML configuration file.
    #[arg(long, env = "SHAMAL_GPU_WORKER_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "SHAMAL_GPU_WORKER_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    #[arg(long, env = "SHAMAL_GPU_WORKER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    #[arg(long, env = "SHAMAL_GPU_WORKER_MODEL_REPOSITORY")]
    pub model_repository: Option<PathBuf>,
    /// Registry gRPC address to follow (host:port or URL).
    #[arg(long, env = "SHAMAL_GPU_WORKER_REGISTRY")]
    pub registry: Option<String>,
    #[arg(long, env = "SHAMAL_GPU_WORKER_WORKER_ID")]
    pub worker_id: Option<String>,
    #[arg(long, env = "SHAMAL_GPU_WORKER_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,
    #[arg(long, env = "SHAMAL_GPU_WORKER_REGION")]
    pub region: Option<String>,
    #[arg(long, env = "SHAMAL_GPU_WORKER_ARTIFACT_CACHE")]
    pub artifact_cache: Option<PathBuf>,
    /// Requests the worker is sized to run concurrently (default: instances
    /// × max batch size).
    #[arg(long, env = "SHAMAL_GPU_WORKER_CAPACITY")]
    pub capacity: Option<u32>,
    /// Milliseconds the worker keeps serving after the registry marked it
    /// draining, before it stops taking requests (default 1000).
    #[arg(long, env = "SHAMAL_GPU_WORKER_DRAIN_GRACE_MS")]
    pub drain_grace_ms: Option<u64>,
    #[arg(long, env = "SHAMAL_GPU_WORKER_DEVICE", value_enum)]
    pub device: Option<DevicePreference>,
    #[arg(long, env = "SHAMAL_GPU_WORKER_CUDA_DEVICE")]
    pub cuda_device: Option<usize>,
    /// candle's CPU compute threads for the process (default: 1 on a CPU
    /// worker, candle's own on a CUDA worker).
    #[arg(long, env = "SHAMAL_GPU_WORKER_CPU_THREADS")]
    pub cpu_threads: Option<usize>,
    #[arg(long, env = "SHAMAL_GPU_WORKER_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,
    #[arg(long, env = "SHAMAL_GPU_WORKER_MAX_QUEUE_DELAY_US")]
    pub max_queue_delay_us: Option<u64>,
    /// Instances per model version without `instance_group` (default: on
    /// the CPU, cores / CPU threads, so one per core; on CUDA, 1).
    #[arg(long, env = "SHAMAL_GPU_WORKER_INSTANCES")]
    pub instances: Option<usize>,
    #[arg(long, env = "SHAMAL_GPU_WORKER_MAX_QUEUE_SIZE")]
    pub max_queue_size: Option<usize>,
    #[arg(long, env = "SHAMAL_GPU_WORKER_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
}

macro_rules! overlay {
    ($config:ident, $args:ident, $($field:ident),+) => {
        $(if let Some(value) = $args.$field.clone() { $config.$field = value; })+
    };
}

impl GpuWorkerConfig {
    /// Builds the effective configuration from flags, environment and file.
    pub fn load(args: &GpuWorkerArgs) -> Result<GpuWorkerConfig, String> {
        let mut config = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
                toml::from_str(&text).map_err(|error| format!("{}: {error}", path.display()))?
            }
            None => GpuWorkerConfig::default(),
        };
        overlay!(
            config,
            args,
            grpc_listen,
            device,
            cuda_device,
            max_batch_size,
            max_queue_delay_us,
            max_queue_size,
            max_message_bytes,
            region,
            artifact_cache,
            drain_grace_ms
        );
        if let Some(capacity) = args.capacity {
            config.capacity = Some(capacity);
        }
        if let Some(instances) = args.instances {
            config.instances = Some(instances);
        }
        if let Some(threads) = args.cpu_threads {
            config.cpu_threads = Some(threads);
        }
        if let Some(path) = &args.model_repository {
            config.model_repository = Some(path.clone());
        }
        if let Some(address) = &args.registry {
            config.registry = Some(address.clone());
        }
        if let Some(id) = &args.worker_id {
            config.worker_id = Some(id.clone());
        }
        if let Some(address) = &args.advertise_address {
            config.advertise_address = Some(address.clone());
        }
        if config.model_repository.is_none() && config.registry.is_none() {
            config.model_repository = Some(PathBuf::from(DEFAULT_MODEL_REPOSITORY));
        }
        if let Some(address) = args.metrics_listen {
            config.metrics_listen = Some(address);
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every value, naming the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.instances == Some(0) {
            return Err(
                "instances must be at least 1 (or unset: one per core on the CPU)".to_owned(),
            );
        }
        if self.cpu_threads == Some(0) {
            return Err("cpu_threads must be at least 1".to_owned());
        }
        if self.max_queue_size == 0 {
            return Err("max_queue_size must be at least 1".to_owned());
        }
        if self.max_batch_size == 0 {
            return Err("max_batch_size must be at least 1".to_owned());
        }
        if self.max_message_bytes < 1024 {
            return Err("max_message_bytes must be at least 1024".to_owned());
        }
        match &self.model_repository {
            Some(repository) if !repository.is_dir() => {
                return Err(format!(
                    "model_repository {} is not a directory",
                    repository.display()
                ));
            }
            Some(_) => {}
            None if self.registry.is_none() => {
                return Err("set model_repository, registry or both".to_owned());
            }
            None => {}
        }
        if self.capacity == Some(0) {
            return Err(
                "capacity must be at least 1 (or unset: instances × max_batch_size)".to_owned(),
            );
        }
        if self.drain_grace_ms > 600_000 {
            return Err("drain_grace_ms must be at most 600000 (10 minutes)".to_owned());
        }
        if let Some(registry) = &self.registry {
            shamal_worker::validate_agent_settings(
                registry,
                self.worker_id.as_deref(),
                self.advertise_address.as_deref(),
                &self.region,
                &self.artifact_cache,
            )?;
        }
        Ok(())
    }

    /// Instances per model version without `instance_group` on `device`
    /// (the label of the device chosen at start-up).
    pub fn instances_on(&self, device: &str) -> usize {
        self.instances.unwrap_or_else(|| {
            if device == "cpu" {
                crate::cpu_threads::default_instances()
            } else {
                1
            }
        })
    }

    /// The framework configuration; `device` is the label of the device
    /// chosen at start-up, reported to the registry.
    pub fn worker_config(&self, device: &str) -> WorkerConfig {
        WorkerConfig {
            server_name: "shamal-gpu-worker".to_owned(),
            model_repository: self.model_repository.clone(),
            registry: self.registry.as_ref().map(|address| RegistryAgentSettings {
                address: address.clone(),
                worker_id: self.worker_id.clone().unwrap_or_default(),
                advertise_address: self.advertise_address.clone(),
                region: self.region.clone(),
                device: device.to_owned(),
                artifact_cache: self.artifact_cache.clone(),
                capacity: self.capacity.unwrap_or(0),
                drain_grace: Duration::from_millis(self.drain_grace_ms),
            }),
            defaults: ModelDefaults {
                max_batch_size: self.max_batch_size,
                max_queue_delay: Duration::from_micros(self.max_queue_delay_us),
                instances: self.instances_on(device),
                max_queue_size: self.max_queue_size,
                // Candle's backends stay on their instance threads (a CUDA
                // context is bound to its thread), so nothing runs inline.
                inline_max: Duration::ZERO,
            },
            max_message_bytes: self.max_message_bytes,
            idle_poll: Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args_with_repository(dir: &std::path::Path) -> GpuWorkerArgs {
        GpuWorkerArgs {
            model_repository: Some(dir.to_path_buf()),
            ..Default::default()
        }
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("worker.toml");
        std::fs::write(
            &file,
            "device = \"cpu\"\ninstances = 2\nmax_queue_delay_us = 100\n",
        )
        .unwrap();
        let mut args = args_with_repository(dir.path());
        args.config = Some(file);
        args.instances = Some(4);
        let config = GpuWorkerConfig::load(&args).unwrap();
        assert_eq!(config.device, DevicePreference::Cpu, "from the file");
        assert_eq!(config.instances, Some(4), "flag wins over the file");
        assert_eq!(config.max_queue_delay_us, 100);
        assert_eq!(config.grpc_listen.port(), 8301);
        assert_eq!(config.metrics_listen.unwrap().port(), 8302);
        let printed = toml::to_string_pretty(&config).unwrap();
        assert!(printed.contains("device = \"cpu\""), "{printed}");
    }

    #[test]
    fn invalid_configuration_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let mut args = args_with_repository(dir.path());
        args.instances = Some(0);
        assert!(
            GpuWorkerConfig::load(&args)
                .unwrap_err()
                .contains("instances")
        );

        let args = args_with_repository(&dir.path().join("missing"));
        assert!(
            GpuWorkerConfig::load(&args)
                .unwrap_err()
                .contains("model_repository")
        );

        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "device = \"tpu\"\n").unwrap();
        let mut args = args_with_repository(dir.path());
        args.config = Some(file);
        let error = GpuWorkerConfig::load(&args).unwrap_err();
        assert!(error.contains("tpu"), "{error}");
    }

    #[test]
    fn instances_default_to_one_per_core_on_the_cpu_and_one_on_cuda() {
        let dir = tempfile::tempdir().unwrap();
        let config = GpuWorkerConfig::load(&args_with_repository(dir.path())).unwrap();
        assert_eq!((config.instances, config.cpu_threads), (None, None));
        assert_eq!(
            config.instances_on("cpu"),
            crate::cpu_threads::default_instances()
        );
        assert_eq!(config.instances_on("cuda:0"), 1);
        assert_eq!(
            config.worker_config("cuda:0").defaults.instances,
            1,
            "the framework gets the resolved count"
        );
        let printed = toml::to_string_pretty(&config).unwrap();
        assert!(
            !printed.contains("instances"),
            "unset stays unset: {printed}"
        );

        let file = dir.path().join("worker.toml");
        std::fs::write(&file, "instances = 3\ncpu_threads = 2\n").unwrap();
        let mut args = args_with_repository(dir.path());
        args.config = Some(file);
        let config = GpuWorkerConfig::load(&args).unwrap();
        assert_eq!((config.instances, config.cpu_threads), (Some(3), Some(2)));
        assert_eq!(config.instances_on("cpu"), 3);
        assert_eq!(config.instances_on("cuda:0"), 3);

        args.cpu_threads = Some(0);
        let error = GpuWorkerConfig::load(&args).unwrap_err();
        assert!(error.contains("cpu_threads"), "{error}");
    }

    #[test]
    fn the_device_is_reported_to_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let args = GpuWorkerArgs {
            registry: Some("registry.internal:9300".to_owned()),
            artifact_cache: Some(dir.path().join("cache")),
            ..Default::default()
        };
        let config = GpuWorkerConfig::load(&args).unwrap();
        assert_eq!(config.model_repository, None, "no default repository");
        let worker = config.worker_config("cuda:0");
        let follow = worker.registry.unwrap();
        assert_eq!(follow.device, "cuda:0");
        assert_eq!(follow.capacity, 0, "derived from the model defaults");
        assert_eq!(follow.effective_capacity(&worker.defaults), 32);
        assert_eq!(follow.drain_grace, Duration::from_millis(1000));

        let args = GpuWorkerArgs {
            registry: Some("registry.internal:9300".to_owned()),
            artifact_cache: Some(dir.path().join("cache")),
            capacity: Some(12),
            drain_grace_ms: Some(0),
            ..Default::default()
        };
        let follow = GpuWorkerConfig::load(&args)
            .unwrap()
            .worker_config("cpu")
            .registry
            .unwrap();
        assert_eq!(follow.capacity, 12);
        assert_eq!(follow.drain_grace, Duration::ZERO);

        for (field, args) in [
            (
                "capacity",
                GpuWorkerArgs {
                    capacity: Some(0),
                    ..args.clone()
                },
            ),
            (
                "drain_grace_ms",
                GpuWorkerArgs {
                    drain_grace_ms: Some(3_600_000),
                    ..args.clone()
                },
            ),
        ] {
            let error = GpuWorkerConfig::load(&args).unwrap_err();
            assert!(error.contains(field), "{field}: {error}");
        }
    }
}
