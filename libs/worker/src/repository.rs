//! Model repository (Triton layout) and the set of loaded model versions.
//!
//! `<repository>/<model>/<version>/<model file>` with an optional
//! `<repository>/<model>/config.pbtxt`. Version directories are positive
//! integers; every version is served unless the configuration's
//! `version_policy` says otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::Bytes;
use shamal_proto::inference::model_version_policy::PolicyChoice;
use shamal_proto::inference::{ModelConfig, ModelVersionPolicy};
use shamal_tensor::{Tensor, TensorData};

use crate::backend::{Backend, BackendError, InstanceOptions, ModelSignature, Runtime};
use crate::batcher::{Batcher, BatcherConfig, DEFAULT_CONCURRENCY_MEMORY, InlineSlots};
use crate::settings::{ModelDefaults, ModelSettings, SettingsError, parse_config_pbtxt, resolve};
use crate::stats::{ModelStats, WorkerMetrics};

/// A loaded, warmed-up model version, ready to serve.
pub struct ModelVersion {
    pub name: String,
    pub version: u64,
    pub signature: ModelSignature,
    pub settings: ModelSettings,
    /// Effective configuration reported by the ModelConfig RPC.
    pub config: ModelConfig,
    pub platform: &'static str,
    pub batcher: Batcher,
    pub stats: Arc<ModelStats>,
    /// The model file the instances were created from (the batch role
    /// creates instances of its own from it).
    pub model_file: PathBuf,
}

impl ModelVersion {
    pub fn version_label(&self) -> String {
        self.version.to_string()
    }
}

/// State of a model version as listed by RepositoryIndex.
#[derive(Clone)]
pub enum VersionState {
    Loading,
    Ready(Arc<ModelVersion>),
    Unavailable { reason: String },
}

impl VersionState {
    /// The RepositoryIndex state name and reason.
    pub fn describe(&self) -> (&'static str, String) {
        match self {
            VersionState::Loading => ("LOADING", String::new()),
            VersionState::Ready(_) => ("READY", String::new()),
            VersionState::Unavailable { reason } => ("UNAVAILABLE", reason.clone()),
        }
    }
}

/// Every model version this worker knows of.
#[derive(Default)]
pub struct ModelStore {
    models: RwLock<BTreeMap<String, BTreeMap<u64, VersionState>>>,
}

/// Why a lookup failed.
pub enum Lookup {
    UnknownModel,
    UnknownVersion,
    NotReady(String),
}

impl ModelStore {
    fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, BTreeMap<u64, VersionState>>> {
        self.models
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn insert(&self, name: &str, version: u64, state: VersionState) {
        self.models
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(name.to_owned())
            .or_default()
            .insert(version, state);
    }

    /// The version to serve: the requested one, or the highest ready one
    /// when `version` is empty.
    pub fn get(&self, name: &str, version: &str) -> Result<Arc<ModelVersion>, Lookup> {
        let models = self.read();
        let versions = models.get(name).ok_or(Lookup::UnknownModel)?;
        if version.is_empty() {
            return versions
                .values()
                .rev()
                .find_map(|state| match state {
                    VersionState::Ready(model) => Some(model.clone()),
                    _ => None,
                })
                .ok_or_else(|| Lookup::NotReady(format!("model '{name}' has no ready version")));
        }
        let number: u64 = version.parse().map_err(|_| Lookup::UnknownVersion)?;
        match versions.get(&number) {
            Some(VersionState::Ready(model)) => Ok(model.clone()),
            Some(VersionState::Unavailable { reason }) => Err(Lookup::NotReady(format!(
                "model '{name}' version {number} is not ready: {reason}"
            ))),
            Some(VersionState::Loading) => Err(Lookup::NotReady(format!(
                "model '{name}' version {number} is loading"
            ))),
            None => Err(Lookup::UnknownVersion),
        }
    }

    /// Ready versions of a model, ascending.
    pub fn ready_versions(&self, name: &str) -> Vec<Arc<ModelVersion>> {
        self.read()
            .get(name)
            .map(|versions| {
                versions
                    .values()
                    .filter_map(|state| match state {
                        VersionState::Ready(model) => Some(model.clone()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// (model, version, state) for every version, sorted.
    pub fn index(&self) -> Vec<(String, u64, VersionState)> {
        self.read()
            .iter()
            .flat_map(|(name, versions)| {
                versions
                    .iter()
                    .map(move |(version, state)| (name.clone(), *version, state.clone()))
            })
            .collect()
    }

    /// Removes one version (and the model when it was its last version),
    /// returning its state. Requests already holding the version's
    /// `Arc<ModelVersion>` still complete: its batcher keeps serving queued
    /// work until the last handle is dropped, then its instance threads exit.
    pub fn remove(&self, name: &str, version: u64) -> Option<VersionState> {
        let mut models = self
            .models
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let versions = models.get_mut(name)?;
        let removed = versions.remove(&version);
        if versions.is_empty() {
            models.remove(name);
        }
        removed
    }

    /// True when that version is loaded and ready.
    pub fn is_ready(&self, name: &str, version: u64) -> bool {
        matches!(
            self.read()
                .get(name)
                .and_then(|versions| versions.get(&version)),
            Some(VersionState::Ready(_))
        )
    }

    /// True when at least one version is loaded and none failed.
    pub fn all_ready(&self) -> bool {
        let index = self.index();
        !index.is_empty()
            && index
                .iter()
                .all(|(_, _, state)| matches!(state, VersionState::Ready(_)))
    }

    /// Drops every model version: batchers finish queued work and instance
    /// threads exit.
    pub fn clear(&self) {
        self.models
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }
}

/// A version directory found in the repository.
pub struct FoundVersion {
    pub model: String,
    pub version: u64,
    pub model_file: PathBuf,
    pub config: Option<ModelConfig>,
}

/// A repository entry that cannot be loaded, with the reason.
pub struct RepositoryProblem {
    pub model: String,
    pub version: u64,
    pub reason: String,
}

/// Lists the model versions of a Triton-layout repository.
pub fn scan_repository(
    root: &Path,
    model_filename: &str,
) -> std::io::Result<(Vec<FoundVersion>, Vec<RepositoryProblem>)> {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    let mut model_dirs: Vec<_> = std::fs::read_dir(root)?
        .filter_map(Result::ok)
        .filter(|entry| entry.path().is_dir())
        .collect();
    model_dirs.sort_by_key(|entry| entry.file_name());
    for model_dir in model_dirs {
        let Some(model) = model_dir.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if model.starts_with('.') {
            continue;
        }
        let config_path = model_dir.path().join("config.pbtxt");
        let config = if config_path.is_file() {
            match std::fs::read_to_string(&config_path)
                .map_err(|error| error.to_string())
                .and_then(|text| parse_config_pbtxt(&text).map_err(|error| error.0))
            {
                Ok(config) => Some(config),
                Err(reason) => {
                    problems.push(RepositoryProblem {
                        model,
                        version: 0,
                        reason,
                    });
                    continue;
                }
            }
        } else {
            None
        };
        let filename = config
            .as_ref()
            .map(|config| config.default_model_filename.clone())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| model_filename.to_owned());
        let mut versions: Vec<u64> = std::fs::read_dir(model_dir.path())?
            .filter_map(Result::ok)
            .filter(|entry| entry.path().is_dir())
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u64>().ok())
            .filter(|version| *version > 0)
            .collect();
        versions.sort_unstable();
        let policy = config
            .as_ref()
            .and_then(|config| config.version_policy.clone());
        for version in select_versions(&versions, policy.as_ref()) {
            let model_file = model_dir.path().join(version.to_string()).join(&filename);
            if model_file.is_file() {
                found.push(FoundVersion {
                    model: model.clone(),
                    version,
                    model_file,
                    config: config.clone(),
                });
            } else {
                problems.push(RepositoryProblem {
                    model: model.clone(),
                    version,
                    reason: format!("no {filename} in version directory {version}"),
                });
            }
        }
    }
    Ok((found, problems))
}

fn select_versions(available: &[u64], policy: Option<&ModelVersionPolicy>) -> Vec<u64> {
    match policy.and_then(|policy| policy.policy_choice.as_ref()) {
        Some(PolicyChoice::Latest(latest)) => {
            let keep = (latest.num_versions.max(1) as usize).min(available.len());
            available[available.len() - keep..].to_vec()
        }
        Some(PolicyChoice::Specific(specific)) => available
            .iter()
            .copied()
            .filter(|version| {
                specific
                    .versions
                    .iter()
                    .any(|wanted| u64::try_from(*wanted).ok() == Some(*version))
            })
            .collect(),
        Some(PolicyChoice::All(_)) | None => available.to_vec(),
    }
}

/// Why a model version could not be loaded. The message becomes the
/// version's `Unavailable` reason, which clients read in the model's status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The runtime cannot read the model file's signature.
    #[error("cannot read model: {0}")]
    Signature(#[source] BackendError),
    /// The configuration cannot be served with this signature.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The runtime cannot create an instance.
    #[error("cannot create instance: {0}")]
    Instance(#[source] BackendError),
    /// An instance failed its warm-up execution.
    #[error("warm-up failed: {0}")]
    WarmUp(#[source] WarmUpError),
}

/// Why an instance's warm-up execution failed.
#[derive(Debug, thiserror::Error)]
pub enum WarmUpError {
    /// The backend failed to run on zero-filled inputs.
    #[error(transparent)]
    Infer(#[from] BackendError),
    /// The backend returned a different number of outputs than declared.
    #[error("model produced {produced} outputs, its signature declares {declared}")]
    OutputCount { produced: usize, declared: usize },
}

/// Loads one model version: reads its signature, resolves its settings,
/// creates its instances, warms each one up and starts its batcher. Blocking;
/// call it off the async runtime's worker threads.
pub fn load_version(
    found: &FoundVersion,
    runtime: &dyn Runtime,
    defaults: &ModelDefaults,
    metrics: &WorkerMetrics,
) -> Result<ModelVersion, Error> {
    let started = Instant::now();
    let signature = runtime
        .signature(&found.model_file)
        .map_err(Error::Signature)?;
    let (settings, config) = resolve(
        &found.model,
        found.config.clone(),
        &signature,
        defaults,
        runtime.platform(),
        runtime.backend(),
    )?;
    let options = InstanceOptions {
        parameters: settings.parameters.clone(),
    };
    let mut instances: Vec<Box<dyn Backend>> = Vec::with_capacity(settings.instances);
    for _ in 0..settings.instances {
        let mut instance = runtime
            .instantiate(&found.model_file, &options)
            .map_err(Error::Instance)?;
        warm_up(instance.as_mut(), &signature).map_err(Error::WarmUp)?;
        instances.push(instance);
    }
    let version_label = found.version.to_string();
    let stats = Arc::new(ModelStats::new(
        &found.model,
        &version_label,
        metrics.clone(),
    ));
    let batcher_config = BatcherConfig {
        max_batch_size: if settings.dynamic_batching.is_some() {
            settings.max_batch_size
        } else {
            0
        },
        max_queue_delay: settings
            .dynamic_batching
            .as_ref()
            .map(|batching| batching.max_queue_delay)
            .unwrap_or_default(),
        preferred_batch_sizes: settings
            .dynamic_batching
            .as_ref()
            .map(|batching| batching.preferred_batch_sizes.clone())
            .unwrap_or_default(),
        max_queue_size: settings.max_queue_size,
        inline_max: defaults.inline_max,
        inline_slots: InlineSlots::shared(),
        concurrency_memory: DEFAULT_CONCURRENCY_MEMORY,
    };
    let batcher = Batcher::start(&found.model, batcher_config, instances, stats.clone());
    tracing::info!(
        model = %found.model,
        version = found.version,
        instances = settings.instances,
        max_batch_size = settings.max_batch_size,
        dynamic_batching = settings.dynamic_batching.is_some(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model version ready"
    );
    Ok(ModelVersion {
        name: found.model.clone(),
        version: found.version,
        signature,
        settings,
        config,
        platform: runtime.platform(),
        batcher,
        stats,
        model_file: found.model_file.clone(),
    })
}

/// Runs one execution on zero-filled inputs (batch 1, variable dimensions 1)
/// so that the first real request does not pay for lazy initialisation.
fn warm_up(backend: &mut dyn Backend, signature: &ModelSignature) -> Result<(), WarmUpError> {
    let inputs = signature
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<i64> = spec
                .dims
                .iter()
                .map(|&dim| if dim < 0 { 1 } else { dim })
                .collect();
            let count: usize = shape.iter().map(|&dim| dim as usize).product();
            let data = match spec.datatype.element_size() {
                Some(size) => TensorData::Fixed(Bytes::from(vec![0u8; count * size])),
                None => TensorData::Strings(vec![Bytes::new(); count]),
            };
            Tensor {
                name: spec.name.clone(),
                datatype: spec.datatype,
                shape,
                data,
            }
        })
        .collect();
    let outputs = backend.infer(inputs)?;
    if outputs.len() != signature.outputs.len() {
        return Err(WarmUpError::OutputCount {
            produced: outputs.len(),
            declared: signature.outputs.len(),
        });
    }
    Ok(())
}
