//! cpu-worker configuration: defaults < TOML file < SHAMAL_CPU_WORKER_* env
//! < command-line flags, validated before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shamal_async_queue::{QueueConfig, RedisOptions};
use shamal_worker::{
    AsyncInference, ModelDefaults, QueueSource, RegistryAgentSettings, WorkerConfig,
};

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

/// Effective configuration of a cpu-worker.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CpuWorkerConfig {
    /// Address of the v2 gRPC service the router calls.
    pub grpc_listen: SocketAddr,
    /// Address of `/metrics` and probes; `None` (only when embedding the
    /// service as a library) disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// Triton-layout model repository. Unset: `models/repository` when no
    /// registry is configured, none otherwise. With both, repository and
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
    /// libonnxruntime.so; `None` uses ORT_DYLIB_PATH.
    pub onnxruntime_library: Option<PathBuf>,
    /// ONNX Runtime intra-op threads per model instance.
    pub intra_threads: usize,
    pub optimization: Optimization,
    /// Defaults for models whose configuration leaves them out.
    pub max_batch_size: usize,
    pub max_queue_delay_us: u64,
    pub instances: usize,
    pub max_queue_size: usize,
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
    pub max_message_bytes: usize,
    /// Redis URL of the async inference queue (`redis://host:port[/db]`);
    /// set, the worker also runs the async jobs of its `region` for the
    /// models it serves. Unset: no async jobs.
    pub async_queue: Option<String>,
    /// Prefix of the queue's Redis keys (the routers' `async_key_prefix`).
    pub async_key_prefix: String,
    /// How long the results this worker writes are kept, in ms (the
    /// routers' `async_result_ttl_ms`).
    pub async_result_ttl_ms: u64,
    /// Async jobs run at once; unset: `capacity` (`instances ×
    /// max_batch_size` when that is unset too).
    pub async_concurrency: Option<usize>,
}

impl Default for CpuWorkerConfig {
    fn default() -> Self {
        let defaults = ModelDefaults::default();
        CpuWorkerConfig {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 8101)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8102))),
            model_repository: None,
            registry: None,
            worker_id: None,
            advertise_address: None,
            region: "local".to_owned(),
            artifact_cache: std::env::temp_dir().join("shamal-artifacts"),
            capacity: None,
            drain_grace_ms: u64::try_from(shamal_worker::agent::DEFAULT_DRAIN_GRACE.as_millis())
                .unwrap_or(1000),
            onnxruntime_library: None,
            intra_threads: 1,
            optimization: Optimization::All,
            max_batch_size: defaults.max_batch_size,
            max_queue_delay_us: u64::try_from(defaults.max_queue_delay.as_micros()).unwrap_or(0),
            instances: defaults.instances,
            max_queue_size: defaults.max_queue_size,
            inline_max_us: u64::try_from(defaults.inline_max.as_micros()).unwrap_or(0),
            idle_poll_us: 0,
            max_message_bytes: shamal_rpc::DEFAULT_MAX_MESSAGE_BYTES,
            async_queue: None,
            async_key_prefix: "shamal:async".to_owned(),
            async_result_ttl_ms: 3_600_000,
            async_concurrency: None,
        }
    }
}

/// Command-line flags (each also readable from its environment variable).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct CpuWorkerArgs {
    /// TOML configuration file.
    #[arg(long, env = "SHAMAL_CPU_WORKER_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "SHAMAL_CPU_WORKER_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    #[arg(long, env = "SHAMAL_CPU_WORKER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    #[arg(long, env = "SHAMAL_CPU_WORKER_MODEL_REPOSITORY")]
    pub model_repository: Option<PathBuf>,
    /// Registry gRPC address to follow (host:port or URL).
    #[arg(long, env = "SHAMAL_CPU_WORKER_REGISTRY")]
    pub registry: Option<String>,
    #[arg(long, env = "SHAMAL_CPU_WORKER_WORKER_ID")]
    pub worker_id: Option<String>,
    #[arg(long, env = "SHAMAL_CPU_WORKER_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,
    #[arg(long, env = "SHAMAL_CPU_WORKER_REGION")]
    pub region: Option<String>,
    #[arg(long, env = "SHAMAL_CPU_WORKER_ARTIFACT_CACHE")]
    pub artifact_cache: Option<PathBuf>,
    /// Requests the worker is sized to run concurrently (default: instances
    /// × max batch size).
    #[arg(long, env = "SHAMAL_CPU_WORKER_CAPACITY")]
    pub capacity: Option<u32>,
    /// Milliseconds the worker keeps serving after the registry marked it
    /// draining, before it stops taking requests (default 1000).
    #[arg(long, env = "SHAMAL_CPU_WORKER_DRAIN_GRACE_MS")]
    pub drain_grace_ms: Option<u64>,
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub onnxruntime_library: Option<PathBuf>,
    #[arg(long, env = "SHAMAL_CPU_WORKER_INTRA_THREADS")]
    pub intra_threads: Option<usize>,
    #[arg(long, env = "SHAMAL_CPU_WORKER_OPTIMIZATION", value_enum)]
    pub optimization: Option<Optimization>,
    #[arg(long, env = "SHAMAL_CPU_WORKER_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,
    #[arg(long, env = "SHAMAL_CPU_WORKER_MAX_QUEUE_DELAY_US")]
    pub max_queue_delay_us: Option<u64>,
    #[arg(long, env = "SHAMAL_CPU_WORKER_INSTANCES")]
    pub instances: Option<usize>,
    #[arg(long, env = "SHAMAL_CPU_WORKER_MAX_QUEUE_SIZE")]
    pub max_queue_size: Option<usize>,
    /// Run an idle model's requests on the RPC thread when its single
    /// requests take at most this many microseconds (0: always queue;
    /// default 2000).
    #[arg(long, env = "SHAMAL_CPU_WORKER_INLINE_MAX_US")]
    pub inline_max_us: Option<u64>,
    /// Keep the CPUs awake for this many microseconds after the last
    /// request (0: off, the default; costs CPU time).
    #[arg(long, env = "SHAMAL_CPU_WORKER_IDLE_POLL_US")]
    pub idle_poll_us: Option<u64>,
    #[arg(long, env = "SHAMAL_CPU_WORKER_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Redis URL of the async inference queue.
    #[arg(long, env = "SHAMAL_CPU_WORKER_ASYNC_QUEUE")]
    pub async_queue: Option<String>,
    #[arg(long, env = "SHAMAL_CPU_WORKER_ASYNC_KEY_PREFIX")]
    pub async_key_prefix: Option<String>,
    #[arg(long, env = "SHAMAL_CPU_WORKER_ASYNC_RESULT_TTL_MS")]
    pub async_result_ttl_ms: Option<u64>,
    #[arg(long, env = "SHAMAL_CPU_WORKER_ASYNC_CONCURRENCY")]
    pub async_concurrency: Option<usize>,
}

macro_rules! overlay {
    ($config:ident, $args:ident, $($field:ident),+) => {
        $(if let Some(value) = $args.$field.clone() { $config.$field = value; })+
    };
}

impl CpuWorkerConfig {
    /// Builds the effective configuration from flags, environment and file.
    pub fn load(args: &CpuWorkerArgs) -> Result<CpuWorkerConfig, String> {
        let mut config = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
                toml::from_str(&text).map_err(|error| format!("{}: {error}", path.display()))?
            }
            None => CpuWorkerConfig::default(),
        };
        overlay!(
            config,
            args,
            grpc_listen,
            intra_threads,
            optimization,
            max_batch_size,
            max_queue_delay_us,
            instances,
            max_queue_size,
            inline_max_us,
            idle_poll_us,
            max_message_bytes,
            region,
            artifact_cache,
            drain_grace_ms
        );
        if let Some(capacity) = args.capacity {
            config.capacity = Some(capacity);
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
        if let Some(path) = &args.onnxruntime_library {
            config.onnxruntime_library = Some(path.clone());
        }
        overlay!(config, args, async_key_prefix, async_result_ttl_ms);
        if let Some(url) = &args.async_queue {
            config.async_queue = Some(url.clone());
        }
        if let Some(concurrency) = args.async_concurrency {
            config.async_concurrency = Some(concurrency);
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every value, naming the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.intra_threads == 0 {
            return Err("intra_threads must be at least 1".to_owned());
        }
        if self.instances == 0 {
            return Err("instances must be at least 1".to_owned());
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
        if let Some(url) = &self.async_queue
            && !(url.starts_with("redis://") || url.starts_with("redis+unix://"))
        {
            return Err(format!("async_queue '{url}' must be a redis:// URL"));
        }
        if self.async_key_prefix.is_empty()
            || self.async_key_prefix.len() > 128
            || self.async_key_prefix.chars().any(|c| !c.is_ascii_graphic())
        {
            return Err(
                "async_key_prefix must be 1 to 128 printable characters without spaces".to_owned(),
            );
        }
        if self.async_result_ttl_ms < 1_000 {
            return Err("async_result_ttl_ms must be at least 1000".to_owned());
        }
        if self.async_concurrency == Some(0) {
            return Err("async_concurrency must be at least 1 (or unset: capacity)".to_owned());
        }
        shamal_worker::names::check_region(&self.region)
            .map_err(|message| format!("region {message}"))?;
        match &self.onnxruntime_library {
            None => Err(
                "onnxruntime_library is not set (flag --onnxruntime-library or ORT_DYLIB_PATH); \
                 scripts/setup-deps.sh installs one under .deps/"
                    .to_owned(),
            ),
            Some(path) if !path.is_file() => Err(format!(
                "onnxruntime_library {} does not exist",
                path.display()
            )),
            Some(_) => Ok(()),
        }
    }

    pub fn worker_config(&self) -> WorkerConfig {
        WorkerConfig {
            server_name: "shamal-cpu-worker".to_owned(),
            model_repository: self.model_repository.clone(),
            registry: self.registry.as_ref().map(|address| RegistryAgentSettings {
                address: address.clone(),
                worker_id: self.worker_id.clone().unwrap_or_default(),
                advertise_address: self.advertise_address.clone(),
                region: self.region.clone(),
                device: "cpu".to_owned(),
                artifact_cache: self.artifact_cache.clone(),
                capacity: self.capacity.unwrap_or(0),
                drain_grace: Duration::from_millis(self.drain_grace_ms),
            }),
            defaults: ModelDefaults {
                max_batch_size: self.max_batch_size,
                max_queue_delay: Duration::from_micros(self.max_queue_delay_us),
                instances: self.instances,
                max_queue_size: self.max_queue_size,
                inline_max: Duration::from_micros(self.inline_max_us),
            },
            max_message_bytes: self.max_message_bytes,
            idle_poll: Duration::from_micros(self.idle_poll_us),
        }
    }

    /// The async inference settings, when `async_queue` is set: the
    /// streams of `region`, connected to Redis by the worker.
    pub fn async_inference(&self) -> Option<AsyncInference> {
        let url = self.async_queue.as_ref()?;
        let options = RedisOptions::new(url.clone()).with_key_prefix(self.async_key_prefix.clone());
        let config = QueueConfig {
            result_ttl: Duration::from_millis(self.async_result_ttl_ms),
            ..QueueConfig::default()
        };
        let mut settings = AsyncInference::new(QueueSource::Redis { options, config });
        settings.region = Some(self.region.clone());
        settings.concurrency = self
            .async_concurrency
            .or(self.capacity.map(|capacity| capacity as usize))
            .unwrap_or(0);
        Some(settings)
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

    fn args_with_repository(dir: &std::path::Path, library: &std::path::Path) -> CpuWorkerArgs {
        CpuWorkerArgs {
            model_repository: Some(dir.to_path_buf()),
            onnxruntime_library: Some(library.to_path_buf()),
            ..Default::default()
        }
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
             idle_poll_us = 300\n",
        )
        .unwrap();
        let mut args = args_with_repository(dir.path(), &library);
        args.config = Some(file);
        args.instances = Some(4);
        let config = CpuWorkerConfig::load(&args).unwrap();
        assert_eq!(config.intra_threads, 3, "from the file");
        assert_eq!(config.instances, 4, "flag wins over the file");
        assert_eq!(config.max_queue_delay_us, 100);
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
            config.max_queue_size,
            CpuWorkerConfig::default().max_queue_size,
            "default kept"
        );
    }

    #[test]
    fn invalid_configuration_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let library = dir.path().join("libonnxruntime.so");
        std::fs::write(&library, b"").unwrap();
        let mut args = args_with_repository(dir.path(), &library);
        args.intra_threads = Some(0);
        assert!(
            CpuWorkerConfig::load(&args)
                .unwrap_err()
                .contains("intra_threads")
        );

        let mut args = args_with_repository(&dir.path().join("missing"), &library);
        args.intra_threads = None;
        assert!(
            CpuWorkerConfig::load(&args)
                .unwrap_err()
                .contains("model_repository")
        );

        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "intra_thread = 3\n").unwrap();
        let mut args = args_with_repository(dir.path(), &library);
        args.config = Some(file);
        let error = CpuWorkerConfig::load(&args).unwrap_err();
        assert!(
            error.contains("intra_thread"),
            "unknown keys are refused: {error}"
        );

        let args = args_with_repository(dir.path(), &dir.path().join("nope.so"));
        assert!(
            CpuWorkerConfig::load(&args)
                .unwrap_err()
                .contains("onnxruntime_library")
        );
    }

    #[test]
    fn a_registry_can_replace_the_repository() {
        let dir = tempfile::tempdir().unwrap();
        let library = dir.path().join("libonnxruntime.so");
        std::fs::write(&library, b"").unwrap();
        let args = CpuWorkerArgs {
            onnxruntime_library: Some(library.clone()),
            registry: Some("registry.internal:9300".to_owned()),
            artifact_cache: Some(dir.path().join("cache")),
            ..Default::default()
        };
        let config = CpuWorkerConfig::load(&args).unwrap();
        assert_eq!(config.model_repository, None, "no default repository");
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
            model_repository: Some(dir.path().to_path_buf()),
            worker_id: Some("cpu-7".to_owned()),
            advertise_address: Some("10.0.0.7:8101".to_owned()),
            region: Some("eu-west".to_owned()),
            capacity: Some(12),
            drain_grace_ms: Some(250),
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
        let error = CpuWorkerConfig::load(&args).unwrap_err();
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
            registry: Some("127.0.0.1:9300".to_owned()),
            artifact_cache: Some(dir.path().join("cache")),
            ..Default::default()
        };
        type Tune = fn(&mut CpuWorkerArgs);
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
            tune(&mut args);
            if field == "artifact_cache" {
                args.artifact_cache = Some(file.clone());
            }
            let error = CpuWorkerConfig::load(&args).unwrap_err();
            assert!(error.contains(field), "{field}: {error}");
        }
        assert!(CpuWorkerConfig::load(&base).is_ok());
        let mut url = base.clone();
        url.registry = Some("http://registry:9300".to_owned());
        assert!(CpuWorkerConfig::load(&url).is_ok());
    }

    #[test]
    fn async_queue_settings_layer_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let library = dir.path().join("libonnxruntime.so");
        std::fs::write(&library, b"").unwrap();
        let base = args_with_repository(dir.path(), &library);
        let config = CpuWorkerConfig::load(&base).unwrap();
        assert_eq!(config.async_queue, None);
        assert!(config.async_inference().is_none(), "off by default");

        let file = dir.path().join("worker.toml");
        std::fs::write(
            &file,
            "async_queue = \"redis://redis:6379/1\"\nasync_key_prefix = \"team-a\"\nregion = \"eu-west\"\ncapacity = 6\n",
        )
        .unwrap();
        let args = CpuWorkerArgs {
            config: Some(file.clone()),
            async_result_ttl_ms: Some(120_000),
            ..base.clone()
        };
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
        let args = CpuWorkerArgs {
            async_concurrency: Some(3),
            ..args
        };
        let settings = CpuWorkerConfig::load(&args)
            .unwrap()
            .async_inference()
            .unwrap();
        assert_eq!(settings.concurrency, 3);

        type Tune = fn(&mut CpuWorkerArgs);
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
            tune(&mut args);
            let error = CpuWorkerConfig::load(&args).unwrap_err();
            assert!(error.contains(field), "{field}: {error}");
        }
    }
}
