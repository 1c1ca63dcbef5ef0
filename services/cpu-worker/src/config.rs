//! cpu-worker configuration: defaults < TOML file < SHAMAL_CPU_WORKER_* env
//! < command-line flags, validated before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shamal_worker::{ModelDefaults, WorkerConfig};

use crate::onnx::{Optimization, SessionOptions};

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
    /// Triton-layout model repository.
    pub model_repository: PathBuf,
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
    pub max_message_bytes: usize,
}

impl Default for CpuWorkerConfig {
    fn default() -> Self {
        let defaults = ModelDefaults::default();
        CpuWorkerConfig {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 8101)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8102))),
            model_repository: PathBuf::from("models/repository"),
            onnxruntime_library: None,
            intra_threads: 1,
            optimization: Optimization::All,
            max_batch_size: defaults.max_batch_size,
            max_queue_delay_us: u64::try_from(defaults.max_queue_delay.as_micros()).unwrap_or(0),
            instances: defaults.instances,
            max_queue_size: defaults.max_queue_size,
            max_message_bytes: shamal_rpc::DEFAULT_MAX_MESSAGE_BYTES,
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
    #[arg(long, env = "SHAMAL_CPU_WORKER_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
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
            model_repository,
            intra_threads,
            optimization,
            max_batch_size,
            max_queue_delay_us,
            instances,
            max_queue_size,
            max_message_bytes
        );
        if let Some(address) = args.metrics_listen {
            config.metrics_listen = Some(address);
        }
        if let Some(path) = &args.onnxruntime_library {
            config.onnxruntime_library = Some(path.clone());
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
        if !self.model_repository.is_dir() {
            return Err(format!(
                "model_repository {} is not a directory",
                self.model_repository.display()
            ));
        }
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
            defaults: ModelDefaults {
                max_batch_size: self.max_batch_size,
                max_queue_delay: Duration::from_micros(self.max_queue_delay_us),
                instances: self.instances,
                max_queue_size: self.max_queue_size,
            },
            max_message_bytes: self.max_message_bytes,
        }
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
            "intra_threads = 3\ninstances = 2\nmax_queue_delay_us = 100\n",
        )
        .unwrap();
        let mut args = args_with_repository(dir.path(), &library);
        args.config = Some(file);
        args.instances = Some(4);
        let config = CpuWorkerConfig::load(&args).unwrap();
        assert_eq!(config.intra_threads, 3, "from the file");
        assert_eq!(config.instances, 4, "flag wins over the file");
        assert_eq!(config.max_queue_delay_us, 100);
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
}
