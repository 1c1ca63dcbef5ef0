//! cpu-worker configuration: defaults < TOML file < SHAMAL_CPU_WORKER_* env
//! < command-line flags, validated before anything starts. The settings
//! every worker shares are [`NodeConfig`]'s; ONNX Runtime's are here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shamal_telemetry::config::ConfigError;
use shamal_telemetry::process::Service;
use shamal_worker::{AsyncInference, ModelDefaults, NodeArgs, NodeConfig, WorkerConfig};

use crate::onnx::{Optimization, SessionOptions};

/// Repository served when neither a repository nor a registry is set.
pub const DEFAULT_MODEL_REPOSITORY: &str = "models/repository";

/// The ONNX Runtime library that `scripts/setup-deps.sh` installs under
/// `<root>/.deps/` (the PyPI wheel's `libonnxruntime.so.*`), if present.
pub fn bundled_onnxruntime(root: &Path) -> Option<PathBuf> {
    let lib = root.join(".deps/venv/lib");
    std::fs::read_dir(lib)
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("python3"))
        .find_map(|python| {
            let capi = python.path().join("site-packages/onnxruntime/capi");
            std::fs::read_dir(capi)
                .ok()?
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .find(|path| {
                    path.file_name()
                        .is_some_and(|name| name.to_string_lossy().starts_with("libonnxruntime.so"))
                })
        })
}

/// Effective configuration of a cpu-worker: the settings every worker
/// shares ([`NodeConfig`]) and ONNX Runtime's.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CpuWorkerConfig {
    #[serde(flatten)]
    pub node: NodeConfig,
    /// libonnxruntime.so; `None` uses ORT_DYLIB_PATH.
    pub onnxruntime_library: Option<PathBuf>,
    /// ONNX Runtime intra-op threads per model instance.
    pub intra_threads: usize,
    pub optimization: Optimization,
    /// Instances per model version without `instance_group`.
    pub instances: usize,
    /// A model with nothing else in flight whose last single request ran
    /// within this many microseconds runs the next one on the RPC thread,
    /// without the two hand-offs to and from its instance thread; 0 always
    /// queues.
    pub inline_max_us: u64,
    /// Keep the host's CPUs awake (spinning at the lowest priority) while
    /// requests run and for this many microseconds after the last one, so
    /// that the next request does not wait for a halted CPU; 0 (the
    /// default) lets them sleep. Costs CPU time; see operations.md.
    pub idle_poll_us: u64,
}

impl Default for CpuWorkerConfig {
    fn default() -> Self {
        let defaults = ModelDefaults::default();
        CpuWorkerConfig {
            node: NodeConfig::with_ports(8101, 8102),
            onnxruntime_library: None,
            intra_threads: 1,
            optimization: Optimization::All,
            instances: defaults.instances,
            inline_max_us: u64::try_from(defaults.inline_max.as_micros()).unwrap_or(0),
            idle_poll_us: 0,
        }
    }
}

/// Command-line flags, each also read from `SHAMAL_CPU_WORKER_<FIELD>`
/// (see [`SERVICE`]) except `--onnxruntime-library`, read from
/// `ORT_DYLIB_PATH`. Serialized, only the values given appear: the top
/// layer of the configuration.
#[derive(Clone, Debug, Default, clap::Args, Serialize)]
pub struct CpuWorkerArgs {
    /// TOML configuration file.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub node: NodeArgs,
    #[arg(long, env = "ORT_DYLIB_PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub onnxruntime_library: Option<PathBuf>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intra_threads: Option<usize>,
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimization: Option<Optimization>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<usize>,
    /// Run an idle model's requests on the RPC thread when its single
    /// requests take at most this many microseconds (0: always queue;
    /// default 2000).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inline_max_us: Option<u64>,
    /// Keep the CPUs awake for this many microseconds after the last
    /// request (0: off, the default; costs CPU time).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_poll_us: Option<u64>,
}

/// The cpu-worker binary: its name and the prefix of its variables.
pub const SERVICE: Service = Service {
    name: "shamal-cpu-worker",
    about: "Shamal CPU worker (ONNX Runtime)",
    env_prefix: "SHAMAL_CPU_WORKER_",
    version: env!("CARGO_PKG_VERSION"),
};

impl CpuWorkerConfig {
    /// Builds the effective configuration: defaults < TOML file <
    /// environment < flags, then validates it.
    pub fn load(args: &CpuWorkerArgs) -> Result<CpuWorkerConfig, ConfigError> {
        let config = NodeConfig::load(
            &CpuWorkerConfig::default(),
            args.config.as_deref(),
            args,
            |config: &mut CpuWorkerConfig| &mut config.node,
            DEFAULT_MODEL_REPOSITORY,
        )?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value, naming the field at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.node.validate()?;
        if self.intra_threads == 0 {
            return Err(ConfigError::invalid("intra_threads must be at least 1"));
        }
        if self.instances == 0 {
            return Err(ConfigError::invalid("instances must be at least 1"));
        }
        match &self.onnxruntime_library {
            None => Err(ConfigError::invalid(
                "onnxruntime_library is not set (flag --onnxruntime-library or ORT_DYLIB_PATH); \
                 scripts/setup-deps.sh installs one under .deps/",
            )),
            Some(path) if !path.is_file() => Err(ConfigError::invalid(format!(
                "onnxruntime_library {} does not exist",
                path.display()
            ))),
            Some(_) => Ok(()),
        }
    }

    pub fn worker_config(&self) -> WorkerConfig {
        let mut config = self
            .node
            .worker_config("shamal-cpu-worker", "cpu", self.instances);
        // ONNX Runtime sessions may run on any thread: short requests of
        // idle models run inline, and the host's CPUs may be kept awake.
        config.defaults.inline_max = Duration::from_micros(self.inline_max_us);
        config.idle_poll = Duration::from_micros(self.idle_poll_us);
        config
    }

    /// The async inference settings, when `async_queue` is set (see
    /// [`NodeConfig::async_inference`]).
    pub fn async_inference(&self) -> Option<AsyncInference> {
        self.node.async_inference()
    }

    pub fn session_options(&self) -> SessionOptions {
        SessionOptions {
            intra_threads: self.intra_threads,
            optimization: self.optimization,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shamal_worker::QueueSource;

    fn args_with_repository(dir: &std::path::Path, library: &std::path::Path) -> CpuWorkerArgs {
        CpuWorkerArgs {
            node: NodeArgs {
                model_repository: Some(dir.to_path_buf()),
                ..Default::default()
            },
            onnxruntime_library: Some(library.to_path_buf()),
            ..Default::default()
        }
    }

    fn load_error(args: &CpuWorkerArgs) -> String {
        CpuWorkerConfig::load(args).unwrap_err().to_string()
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let library = dir.path().join("libonnxruntime.so");
        std::fs::write(&library, b"").unwrap();
        let file = dir.path().join("worker.toml");
        std::fs::write(
            &file,
            "intra_threads = 3\ninstances = 2\nmax_queue_delay_us = 100\ninline_max_us = 0\n\
             idle_poll_us = 300\nregion = \"file\"\n",
        )
        .unwrap();
        let mut args = args_with_repository(dir.path(), &library);
        args.config = Some(file);
        args.instances = Some(4);
        args.node.region = Some("flag".to_owned());
        let config = CpuWorkerConfig::load(&args).unwrap();
        assert_eq!(config.intra_threads, 3, "from the file");
        assert_eq!(config.instances, 4, "flag wins over the file");
        assert_eq!(config.node.region, "flag", "shared: flag wins too");
        assert_eq!(config.node.max_queue_delay_us, 100);
        assert_eq!(config.inline_max_us, 0, "from the file");
        assert!(config.worker_config().defaults.inline_max.is_zero());
        assert_eq!(
            config.worker_config().idle_poll,
            Duration::from_micros(300),
            "from the file"
        );
        assert_eq!(
            CpuWorkerConfig::default().idle_poll_us,
            0,
            "idle polling costs CPU time and is off by default"
        );
        assert_eq!(
            CpuWorkerConfig::default().inline_max_us,
            2_000,
            "short requests of idle models run inline by default"
        );
        assert_eq!(
            config.node.max_queue_size,
            CpuWorkerConfig::default().node.max_queue_size,
            "default kept"
        );
        assert_eq!(config.node.grpc_listen.port(), 8101);
        assert_eq!(config.node.metrics_listen.unwrap().port(), 8102);
    }

    #[test]
    fn invalid_configuration_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let library = dir.path().join("libonnxruntime.so");
        std::fs::write(&library, b"").unwrap();
        let mut args = args_with_repository(dir.path(), &library);
        args.intra_threads = Some(0);
        assert!(load_error(&args).contains("intra_threads"));

        let mut args = args_with_repository(&dir.path().join("missing"), &library);
        args.intra_threads = None;
        assert!(load_error(&args).contains("model_repository"));

        // Unknown keys are refused, the worker's own and the shared alike
        // (both sit side by side in one file).
        for (text, key) in [
            ("intra_thread = 3\n", "intra_thread"),
            ("regoin = \"eu\"\n", "regoin"),
            ("[node]\nregion = \"eu\"\n", "node"),
        ] {
            let file = dir.path().join("bad.toml");
            std::fs::write(&file, text).unwrap();
            let mut args = args_with_repository(dir.path(), &library);
            args.config = Some(file);
            let error = load_error(&args);
            assert!(
                error.contains(&format!("unknown field `{key}`")) && error.contains("bad.toml"),
                "unknown keys are refused: {error}"
            );
        }
        // A value of the wrong type names its key, shared or not.
        for (text, key) in [
            ("capacity = \"six\"\n", "capacity"),
            ("intra_threads = -1\n", "intra_threads"),
        ] {
            let file = dir.path().join("bad.toml");
            std::fs::write(&file, text).unwrap();
            let mut args = args_with_repository(dir.path(), &library);
            args.config = Some(file);
            let error = load_error(&args);
            assert!(error.contains(key), "{text}: {error}");
        }

        let args = args_with_repository(dir.path(), &dir.path().join("nope.so"));
        assert!(load_error(&args).contains("onnxruntime_library"));
    }

    #[test]
    fn a_registry_can_replace_the_repository() {
        let dir = tempfile::tempdir().unwrap();
        let library = dir.path().join("libonnxruntime.so");
        std::fs::write(&library, b"").unwrap();
        let args = CpuWorkerArgs {
            onnxruntime_library: Some(library.clone()),
            node: NodeArgs {
                registry: Some("registry.internal:9300".to_owned()),
                artifact_cache: Some(dir.path().join("cache")),
                ..Default::default()
            },
            ..Default::default()
        };
        let config = CpuWorkerConfig::load(&args).unwrap();
        assert_eq!(config.node.model_repository, None, "no default repository");
        let worker = config.worker_config();
        assert_eq!(worker.model_repository, None);
        let follow = worker.registry.unwrap();
        assert_eq!(follow.address, "registry.internal:9300");
        assert_eq!(follow.worker_id, "", "derived at start-up");
        assert_eq!(follow.advertise_address, None);
        assert_eq!(follow.region, "local");
        assert_eq!(follow.device, "cpu");
        assert_eq!(follow.artifact_cache, dir.path().join("cache"));
        assert_eq!(follow.capacity, 0, "derived from the model defaults");
        assert_eq!(follow.effective_capacity(&worker.defaults), 32);
        assert_eq!(follow.drain_grace, Duration::from_millis(1000));
        let printed = toml::to_string_pretty(&config).unwrap();
        assert!(
            printed.contains("registry = \"registry.internal:9300\""),
            "{printed}"
        );
        assert!(printed.contains("artifact_cache"), "{printed}");

        // Both: served side by side; identity from flags.
        let args = CpuWorkerArgs {
            node: NodeArgs {
                model_repository: Some(dir.path().to_path_buf()),
                worker_id: Some("cpu-7".to_owned()),
                advertise_address: Some("10.0.0.7:8101".to_owned()),
                region: Some("eu-west".to_owned()),
                capacity: Some(12),
                drain_grace_ms: Some(250),
                ..args.node
            },
            ..args
        };
        let worker = CpuWorkerConfig::load(&args).unwrap().worker_config();
        assert_eq!(worker.model_repository.as_deref(), Some(dir.path()));
        let follow = worker.registry.unwrap();
        assert_eq!(follow.worker_id, "cpu-7");
        assert_eq!(follow.capacity, 12);
        assert_eq!(follow.drain_grace, Duration::from_millis(250));
        assert_eq!(follow.advertise_address.as_deref(), Some("10.0.0.7:8101"));
        assert_eq!(follow.region, "eu-west");

        // Neither: the default repository (absent here) is required.
        let args = CpuWorkerArgs {
            onnxruntime_library: Some(library),
            ..Default::default()
        };
        let error = load_error(&args);
        assert!(error.contains("models/repository"), "{error}");
    }

    #[test]
    fn registry_settings_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let library = dir.path().join("libonnxruntime.so");
        std::fs::write(&library, b"").unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let base = CpuWorkerArgs {
            onnxruntime_library: Some(library),
            node: NodeArgs {
                registry: Some("127.0.0.1:9300".to_owned()),
                artifact_cache: Some(dir.path().join("cache")),
                ..Default::default()
            },
            ..Default::default()
        };
        type Tune = fn(&mut NodeArgs);
        let cases: [(&str, Tune); 9] = [
            ("capacity", |args| args.capacity = Some(0)),
            ("drain_grace_ms", |args| {
                args.drain_grace_ms = Some(3_600_000)
            }),
            ("registry", |args| {
                args.registry = Some("http://".to_owned())
            }),
            ("registry", |args| args.registry = Some(" ".to_owned())),
            ("worker_id", |args| args.worker_id = Some("a b".to_owned())),
            ("advertise_address", |args| {
                args.advertise_address = Some("no-port".to_owned())
            }),
            ("region", |args| args.region = Some(String::new())),
            ("region", |args| args.region = Some("uae north".to_owned())),
            ("artifact_cache", |_| {}),
        ];
        for (field, tune) in cases {
            let mut args = base.clone();
            tune(&mut args.node);
            if field == "artifact_cache" {
                args.node.artifact_cache = Some(file.clone());
            }
            let error = load_error(&args);
            assert!(error.contains(field), "{field}: {error}");
        }
        assert!(CpuWorkerConfig::load(&base).is_ok());
        let mut url = base.clone();
        url.node.registry = Some("http://registry:9300".to_owned());
        assert!(CpuWorkerConfig::load(&url).is_ok());
    }

    #[test]
    fn async_queue_settings_layer_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let library = dir.path().join("libonnxruntime.so");
        std::fs::write(&library, b"").unwrap();
        let base = args_with_repository(dir.path(), &library);
        let config = CpuWorkerConfig::load(&base).unwrap();
        assert_eq!(config.node.async_queue, None);
        assert!(config.async_inference().is_none(), "off by default");

        let file = dir.path().join("worker.toml");
        std::fs::write(
            &file,
            "async_queue = \"redis://redis:6379/1\"\nasync_key_prefix = \"team-a\"\nregion = \"eu-west\"\ncapacity = 6\n",
        )
        .unwrap();
        let mut args = CpuWorkerArgs {
            config: Some(file.clone()),
            ..base.clone()
        };
        args.node.async_result_ttl_ms = Some(120_000);
        let config = CpuWorkerConfig::load(&args).unwrap();
        let settings = config.async_inference().unwrap();
        assert_eq!(settings.region.as_deref(), Some("eu-west"));
        assert_eq!(settings.concurrency, 6, "capacity by default");
        let QueueSource::Redis {
            options,
            config: queue,
        } = &settings.queue
        else {
            panic!("a Redis queue: {settings:?}");
        };
        assert_eq!(options.url, "redis://redis:6379/1");
        assert_eq!(options.key_prefix, "team-a");
        assert_eq!(queue.result_ttl, Duration::from_millis(120_000), "flag");
        args.node.async_concurrency = Some(3);
        let settings = CpuWorkerConfig::load(&args)
            .unwrap()
            .async_inference()
            .unwrap();
        assert_eq!(settings.concurrency, 3);

        type Tune = fn(&mut NodeArgs);
        let cases: [(&str, Tune); 4] = [
            ("async_queue", |args| {
                args.async_queue = Some("memory".to_owned())
            }),
            ("async_key_prefix", |args| {
                args.async_key_prefix = Some("a b".to_owned())
            }),
            ("async_result_ttl_ms", |args| {
                args.async_result_ttl_ms = Some(5)
            }),
            ("async_concurrency", |args| args.async_concurrency = Some(0)),
        ];
        for (field, tune) in cases {
            let mut args = base.clone();
            tune(&mut args.node);
            let error = load_error(&args);
            assert!(error.contains(field), "{field}: {error}");
        }
    }

    #[test]
    fn every_documented_variable_is_read() {
        let read = SERVICE.variables_read::<CpuWorkerArgs>();
        let documented = shamal_telemetry::process::documented_variables(
            SERVICE.env_prefix,
            &[
                include_str!("../../../docs/operations.md"),
                include_str!("../../../docs/async-inference.md"),
                include_str!("../../../README.md"),
            ],
        );
        assert!(documented.len() >= 20, "{documented:?}");
        for name in documented.iter().chain([&"ORT_DYLIB_PATH".to_owned()]) {
            assert!(read.contains(name), "{name} is documented but not read");
        }
    }
}
