//! gpu-worker configuration: defaults < TOML file < SHAMAL_GPU_WORKER_* env
//! < command-line flags, validated before anything starts. The settings
//! every worker shares (async queue included) are [`NodeConfig`]'s;
//! candle's are here.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use shamal_telemetry::config::ConfigError;
use shamal_telemetry::process::Service;
use shamal_worker::{NodeArgs, NodeConfig, WorkerConfig};

use crate::spec::DevicePreference;

/// Repository served when neither a repository nor a registry is set.
pub const DEFAULT_MODEL_REPOSITORY: &str = "models/gpu/repository";

/// Effective configuration of a gpu-worker: the settings every worker
/// shares ([`NodeConfig`]) and candle's.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuWorkerConfig {
    #[serde(flatten)]
    pub node: NodeConfig,
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
    /// Instances per model version without `instance_group`. Unset: on the
    /// CPU, one per `cpu_threads` cores (one per core by default); on CUDA, 1.
    pub instances: Option<usize>,
}

impl Default for GpuWorkerConfig {
    fn default() -> Self {
        GpuWorkerConfig {
            node: NodeConfig::with_ports(8301, 8302),
            device: DevicePreference::Auto,
            cuda_device: 0,
            cpu_threads: None,
            instances: None,
        }
    }
}

/// Command-line flags, each also read from `SHAMAL_GPU_WORKER_<FIELD>`
/// (see [`SERVICE`]). Serialized, only the values given appear: the top
/// layer of the configuration.
#[derive(Clone, Debug, Default, clap::Args, Serialize)]
pub struct GpuWorkerArgs {
    /// TOML configuration file.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub node: NodeArgs,
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<DevicePreference>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cuda_device: Option<usize>,
    /// candle's CPU compute threads for the process (default: 1 on a CPU
    /// worker, candle's own on a CUDA worker).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_threads: Option<usize>,
    /// Instances per model version without `instance_group` (default: on
    /// the CPU, cores / CPU threads, so one per core; on CUDA, 1).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<usize>,
}

/// The gpu-worker binary: its name and the prefix of its variables.
pub const SERVICE: Service = Service {
    name: "shamal-gpu-worker",
    about: "Shamal GPU worker (candle; CUDA or CPU)",
    env_prefix: "SHAMAL_GPU_WORKER_",
    version: env!("CARGO_PKG_VERSION"),
};

impl GpuWorkerConfig {
    /// Builds the effective configuration: defaults < TOML file <
    /// environment < flags, then validates it.
    pub fn load(args: &GpuWorkerArgs) -> Result<GpuWorkerConfig, ConfigError> {
        let config = NodeConfig::load(
            &GpuWorkerConfig::default(),
            args.config.as_deref(),
            args,
            |config: &mut GpuWorkerConfig| &mut config.node,
            DEFAULT_MODEL_REPOSITORY,
        )?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value, naming the field at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.node.validate()?;
        if self.instances == Some(0) {
            return Err(ConfigError::invalid(
                "instances must be at least 1 (or unset: one per core on the CPU)",
            ));
        }
        if self.cpu_threads == Some(0) {
            return Err(ConfigError::invalid("cpu_threads must be at least 1"));
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
    /// chosen at start-up, reported to the registry. Candle's backends
    /// stay on their instance threads (a CUDA context is bound to its
    /// thread), so nothing runs inline and no CPU is kept awake.
    pub fn worker_config(&self, device: &str) -> WorkerConfig {
        self.node
            .worker_config("shamal-gpu-worker", device, self.instances_on(device))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;
    use shamal_worker::QueueSource;

    fn args_with_repository(dir: &std::path::Path) -> GpuWorkerArgs {
        GpuWorkerArgs {
            node: NodeArgs {
                model_repository: Some(dir.to_path_buf()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn load_error(args: &GpuWorkerArgs) -> String {
        GpuWorkerConfig::load(args).unwrap_err().to_string()
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("worker.toml");
        std::fs::write(
            &file,
            "device = \"cpu\"\ninstances = 2\nmax_queue_delay_us = 100\nmax_queue_size = 9\n",
        )
        .unwrap();
        let mut args = args_with_repository(dir.path());
        args.config = Some(file);
        args.instances = Some(4);
        args.node.max_queue_size = Some(10);
        let config = GpuWorkerConfig::load(&args).unwrap();
        assert_eq!(config.device, DevicePreference::Cpu, "from the file");
        assert_eq!(config.instances, Some(4), "flag wins over the file");
        assert_eq!(config.node.max_queue_size, 10, "shared: flag wins too");
        assert_eq!(config.node.max_queue_delay_us, 100);
        assert_eq!(config.node.grpc_listen.port(), 8301);
        assert_eq!(config.node.metrics_listen.unwrap().port(), 8302);
        let printed = toml::to_string_pretty(&config).unwrap();
        assert!(printed.contains("device = \"cpu\""), "{printed}");
    }

    #[test]
    fn invalid_configuration_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let mut args = args_with_repository(dir.path());
        args.instances = Some(0);
        assert!(load_error(&args).contains("instances"));

        let args = args_with_repository(&dir.path().join("missing"));
        assert!(load_error(&args).contains("model_repository"));

        for (text, named) in [
            ("device = \"tpu\"\n", "tpu"),
            ("devices = \"cpu\"\n", "unknown field `devices`"),
            (
                "async_queues = \"redis://r\"\n",
                "unknown field `async_queues`",
            ),
            ("max_batch_size = \"x\"\n", "max_batch_size"),
        ] {
            let file = dir.path().join("bad.toml");
            std::fs::write(&file, text).unwrap();
            let mut args = args_with_repository(dir.path());
            args.config = Some(file);
            let error = load_error(&args);
            assert!(error.contains(named), "{text}: {error}");
        }
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
        let worker = config.worker_config("cpu");
        assert!(worker.defaults.inline_max.is_zero(), "never inline");
        assert!(worker.idle_poll.is_zero());

        args.cpu_threads = Some(0);
        let error = load_error(&args);
        assert!(error.contains("cpu_threads"), "{error}");
    }

    #[test]
    fn the_device_is_reported_to_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let args = GpuWorkerArgs {
            node: NodeArgs {
                registry: Some("registry.internal:9300".to_owned()),
                artifact_cache: Some(dir.path().join("cache")),
                ..Default::default()
            },
            ..Default::default()
        };
        let config = GpuWorkerConfig::load(&args).unwrap();
        assert_eq!(config.node.model_repository, None, "no default repository");
        let worker = config.worker_config("cuda:0");
        let follow = worker.registry.unwrap();
        assert_eq!(follow.device, "cuda:0");
        assert_eq!(follow.capacity, 0, "derived from the model defaults");
        assert_eq!(follow.effective_capacity(&worker.defaults), 32);
        assert_eq!(follow.drain_grace, Duration::from_millis(1000));

        let mut args = args;
        args.node.capacity = Some(12);
        args.node.drain_grace_ms = Some(0);
        let follow = GpuWorkerConfig::load(&args)
            .unwrap()
            .worker_config("cpu")
            .registry
            .unwrap();
        assert_eq!(follow.capacity, 12);
        assert_eq!(follow.drain_grace, Duration::ZERO);

        type Tune = fn(&mut NodeArgs);
        let cases: [(&str, Tune); 2] = [
            ("capacity", |args| args.capacity = Some(0)),
            ("drain_grace_ms", |args| {
                args.drain_grace_ms = Some(3_600_000)
            }),
        ];
        for (field, tune) in cases {
            let mut args = args.clone();
            tune(&mut args.node);
            let error = load_error(&args);
            assert!(error.contains(field), "{field}: {error}");
        }
    }

    #[test]
    fn async_queue_settings_are_the_cpu_workers() {
        let dir = tempfile::tempdir().unwrap();
        let config = GpuWorkerConfig::load(&args_with_repository(dir.path())).unwrap();
        assert!(config.node.async_inference().is_none(), "off by default");

        let file = dir.path().join("worker.toml");
        std::fs::write(
            &file,
            "async_queue = \"redis://redis:6379/1\"\nasync_key_prefix = \"team-a\"\n\
             region = \"eu-west\"\nasync_concurrency = 2\n",
        )
        .unwrap();
        let mut args = args_with_repository(dir.path());
        args.config = Some(file);
        args.node.async_result_ttl_ms = Some(120_000);
        let settings = GpuWorkerConfig::load(&args)
            .unwrap()
            .node
            .async_inference()
            .unwrap();
        assert_eq!(settings.region.as_deref(), Some("eu-west"));
        assert_eq!(settings.concurrency, 2);
        let QueueSource::Redis { options, config } = &settings.queue else {
            panic!("a Redis queue: {settings:?}");
        };
        assert_eq!(options.url, "redis://redis:6379/1");
        assert_eq!(options.key_prefix, "team-a");
        assert_eq!(config.result_ttl, Duration::from_millis(120_000), "flag");

        args.node.async_queue = Some("memory".to_owned());
        assert!(load_error(&args).contains("async_queue"));
    }

    #[test]
    fn every_documented_variable_is_read() {
        let read = SERVICE.variables_read::<GpuWorkerArgs>();
        let documented = shamal_telemetry::process::documented_variables(
            SERVICE.env_prefix,
            &[
                include_str!("../../../docs/operations.md"),
                include_str!("../../../docs/async-inference.md"),
                include_str!("../../../README.md"),
            ],
        );
        assert!(documented.len() >= 18, "{documented:?}");
        for name in &documented {
            assert!(read.contains(name), "{name} is documented but not read");
        }
        for name in [
            "SHAMAL_GPU_WORKER_ASYNC_QUEUE",
            "SHAMAL_GPU_WORKER_ASYNC_KEY_PREFIX",
            "SHAMAL_GPU_WORKER_ASYNC_RESULT_TTL_MS",
            "SHAMAL_GPU_WORKER_ASYNC_CONCURRENCY",
        ] {
            assert!(read.iter().any(|read| read == name), "{name}");
        }
    }
}
