//! The reconcile loop: follows the registry's watch, loads the versions
//! placement assigns to this worker one at a time, unloads those no longer
//! assigned, and reports the state of each.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use shamal_registry_client::proto::registry_client::RegistryClient;
use shamal_registry_client::proto::{Artifact, ReportPlacementRequest, WatchEvent};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::cache::{clean_partials, ensure_artifact};
use super::membership::Membership;
use super::placement::{self, Catalog, desired_versions, plan};
use super::reporter::Reporter;
use super::settings::RegistryAgentSettings;
use super::{Key, LoadFailure, blocking, stopped};
use crate::backend::{ModelSignature, Runtime, TensorSpec};
use crate::repository::{FoundVersion, ModelVersion, VersionState, load_version};
use crate::service::WorkerState;
use crate::settings::ModelDefaults;
use crate::stats::WorkerMetrics;

/// The signature as the registry stores it:
/// `{"inputs":[{"name","datatype","dims"}],"outputs":[...]}`.
pub fn signature_json(signature: &ModelSignature) -> String {
    let specs = |specs: &[TensorSpec]| {
        specs
            .iter()
            .map(|spec| {
                serde_json::json!({
                    "name": spec.name,
                    "datatype": spec.datatype.as_str(),
                    "dims": spec.dims,
                })
            })
            .collect::<Vec<_>>()
    };
    serde_json::json!({
        "inputs": specs(&signature.inputs),
        "outputs": specs(&signature.outputs),
    })
    .to_string()
}

/// What the agent knows of a version it was assigned.
#[derive(Clone, Debug)]
enum Held {
    Loading,
    Ready { signature_json: String },
    Failed { reason: String, transient: bool },
}

impl Held {
    fn placement(&self) -> &'static str {
        match self {
            Held::Loading => placement::LOADING,
            Held::Ready { .. } => placement::READY,
            Held::Failed { .. } => placement::FAILED,
        }
    }
}

/// Everything the agent needs from the worker.
pub(crate) struct Agent {
    pub settings: RegistryAgentSettings,
    /// Resolved worker id.
    pub worker_id: String,
    pub state: Arc<WorkerState>,
    pub runtime: Arc<dyn Runtime>,
    pub defaults: ModelDefaults,
    pub metrics: WorkerMetrics,
    /// Set once the registry's first snapshot has been acted on.
    pub synced: watch::Sender<bool>,
    /// Registration and heartbeats (shared with the drain on shutdown).
    pub membership: Arc<Membership>,
}

struct Loaded {
    model: ModelVersion,
    signature_json: String,
}

type Job = (Key, JoinHandle<Result<Loaded, LoadFailure>>);

/// The reconcile loop's working state.
struct Reconciler {
    agent: Agent,
    client: RegistryClient<Channel>,
    reporter: Reporter,
    catalog: Catalog,
    desired: BTreeMap<Key, Artifact>,
    held: BTreeMap<Key, Held>,
    /// Versions of the first snapshot not attempted yet; `None` before it.
    initial: Option<BTreeSet<Key>>,
    snapshots: u64,
    job: Option<Job>,
}

/// Follows the registry until `stop` flips. Never fails: problems are
/// logged, reported as placements and retried.
pub(crate) async fn run(agent: Agent, mut stop: watch::Receiver<bool>) {
    let membership = agent.membership.clone();
    let channel = membership.channel.clone();
    let cache = agent.settings.artifact_cache.clone();
    let _ = blocking(move || {
        std::fs::create_dir_all(&cache)?;
        clean_partials(&cache);
        Ok(())
    })
    .await
    .inspect_err(|error| tracing::error!(%error, "cannot create the artifact cache"));

    let client = shamal_registry_client::client(channel.clone());
    if !membership.register(&mut stop).await {
        return;
    }
    let mut events =
        shamal_registry_client::watch(channel.clone(), &format!("worker {}", agent.worker_id));
    let (reporter, reporter_task) = Reporter::spawn(client.clone(), stop.clone());
    let mut reconciler = Reconciler {
        agent,
        client,
        reporter,
        catalog: Catalog::default(),
        desired: BTreeMap::new(),
        held: BTreeMap::new(),
        initial: None,
        snapshots: 0,
        job: None,
    };
    loop {
        reconciler.start_next();
        tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            result = async {
                match reconciler.job.as_mut() {
                    Some((_, handle)) => handle.await,
                    None => std::future::pending().await,
                }
            }, if reconciler.job.is_some() => {
                if let Some((key, _)) = reconciler.job.take() {
                    let result = result.unwrap_or_else(|error| {
                        Err(LoadFailure::transient(format!("loading stopped: {error}")))
                    });
                    reconciler.finish(key, result);
                }
            }
            event = events.recv() => match event {
                Some(event) => {
                    if event.snapshot && reconciler.snapshots > 0 {
                        // A snapshot follows a reconnect: the registry may
                        // have restarted and forgotten this worker. (A
                        // draining worker does not come back: it stops
                        // following.)
                        if !membership.register(&mut stop).await {
                            break;
                        }
                    }
                    reconciler.on_event(&event);
                }
                None => break,
            },
        }
    }
    // Draining: report nothing new. A load in progress is abandoned (its
    // blocking part finishes on its own and is dropped).
    if let Some((_, handle)) = reconciler.job.take() {
        handle.abort();
    }
    drop(reconciler);
    let _ = reporter_task.await;
    tracing::info!("stopped following the registry");
}

impl Reconciler {
    fn report(&self, key: &Key, state: &str, reason: &str, signature_json: &str) {
        self.reporter.send(ReportPlacementRequest {
            worker_id: self.agent.worker_id.clone(),
            model: key.0.clone(),
            version: key.1,
            state: state.to_owned(),
            reason: reason.to_owned(),
            signature_json: signature_json.to_owned(),
        });
    }

    fn report_held(&self, key: &Key, held: &Held) {
        match held {
            Held::Loading => self.report(key, placement::LOADING, "", ""),
            Held::Ready { signature_json } => {
                self.report(key, placement::READY, "", signature_json)
            }
            Held::Failed { reason, .. } => self.report(key, placement::FAILED, reason, ""),
        }
    }

    fn on_event(&mut self, event: &WatchEvent) {
        self.catalog.apply(event);
        if event.snapshot {
            self.snapshots += 1;
            if self.snapshots > 1 {
                // Give versions that failed for a passing reason another
                // chance after a reconnect.
                self.held.retain(|key, held| {
                    let retry = matches!(held, Held::Failed { transient: true, .. });
                    if retry {
                        tracing::info!(model = %key.0, version = key.1, "retrying version after reconnect");
                    }
                    !retry
                });
            }
            self.reconcile_placements();
        }
        self.desired = desired_versions(
            &self.catalog.models,
            self.agent.runtime.formats(),
            &self.agent.worker_id,
        );
        let plan = plan(&self.desired, &self.held);
        for key in plan.unload {
            self.unload(&key);
        }
        if event.snapshot && self.initial.is_none() {
            self.initial = Some(self.desired.keys().cloned().collect());
        }
        self.check_synced();
    }

    /// After a snapshot: re-sends the state of every version whose
    /// placement the registry has wrong (a lost report, a registry that
    /// restarted), and reports as unloaded what it believes this worker
    /// holds but it does not.
    fn reconcile_placements(&self) {
        let mut theirs: BTreeMap<Key, &str> = BTreeMap::new();
        for model in self.catalog.models.values() {
            for placement in &model.placements {
                if placement.worker_id == self.agent.worker_id {
                    theirs.insert(
                        (model.name.clone(), placement.version),
                        placement.state.as_str(),
                    );
                }
            }
        }
        for (key, held) in &self.held {
            if theirs.get(key) != Some(&held.placement()) {
                self.report_held(key, held);
            }
        }
        for (key, state) in theirs {
            if !self.held.contains_key(&key)
                && matches!(state, placement::LOADING | placement::READY)
            {
                self.report(&key, placement::UNLOADED, "", "");
            }
        }
    }

    fn unload(&mut self, key: &Key) {
        let Some(held) = self.held.remove(key) else {
            return;
        };
        let in_repository = self.agent.state.in_repository(&key.0, key.1);
        if !in_repository {
            // Requests holding the version finish; its batcher stops after.
            self.agent.state.store.remove(&key.0, key.1);
        }
        match held {
            Held::Loading => {
                if let Some((_, handle)) = self.job.take_if(|(job, _)| job == key) {
                    handle.abort();
                }
                tracing::info!(model = %key.0, version = key.1, "version no longer assigned; load abandoned");
                self.report(key, placement::UNLOADED, "", "");
            }
            Held::Ready { .. } => {
                tracing::info!(model = %key.0, version = key.1, "version no longer assigned; unloaded");
                self.report(key, placement::UNLOADED, "", "");
            }
            // Never loaded: nothing to report.
            Held::Failed { .. } => {}
        }
    }

    /// Starts loading the next desired version when nothing is loading.
    fn start_next(&mut self) {
        if self.job.is_some() {
            return;
        }
        let plan = plan(&self.desired, &self.held);
        for key in plan.load {
            let Some(artifact) = self.desired.get(&key).cloned() else {
                continue;
            };
            if self.agent.state.in_repository(&key.0, key.1) {
                let reason = format!(
                    "the worker's model repository already serves '{}' version {}; the repository wins",
                    key.0, key.1
                );
                tracing::warn!(model = %key.0, version = key.1, "registry version shadowed by the model repository");
                let held = Held::Failed {
                    reason,
                    transient: false,
                };
                self.report_held(&key, &held);
                self.held.insert(key, held);
                continue;
            }
            tracing::info!(model = %key.0, version = key.1, sha256 = %artifact.sha256, "loading version assigned by the registry");
            self.agent
                .state
                .store
                .insert(&key.0, key.1, VersionState::Loading);
            self.report(&key, placement::LOADING, "", "");
            self.held.insert(key.clone(), Held::Loading);
            let handle = tokio::spawn(load_job(
                self.client.clone(),
                self.agent.settings.artifact_cache.clone(),
                self.agent.runtime.clone(),
                self.agent.defaults.clone(),
                self.agent.metrics.clone(),
                key.clone(),
                artifact,
            ));
            self.job = Some((key, handle));
            break;
        }
        self.check_synced();
    }

    fn finish(&mut self, key: Key, result: Result<Loaded, LoadFailure>) {
        if !matches!(self.held.get(&key), Some(Held::Loading)) {
            // Unassigned while loading: already reported and removed.
            return;
        }
        let held = match result {
            Ok(loaded) => {
                self.agent.state.store.insert(
                    &key.0,
                    key.1,
                    VersionState::Ready(Arc::new(loaded.model)),
                );
                Held::Ready {
                    signature_json: loaded.signature_json,
                }
            }
            Err(failure) => {
                tracing::error!(model = %key.0, version = key.1, reason = %failure.reason, "registry version failed to load");
                self.agent.state.store.insert(
                    &key.0,
                    key.1,
                    VersionState::Unavailable {
                        reason: failure.reason.clone(),
                    },
                );
                Held::Failed {
                    reason: failure.reason,
                    transient: failure.transient,
                }
            }
        };
        self.report_held(&key, &held);
        self.held.insert(key, held);
        self.check_synced();
    }

    /// Marks the worker synced once every version of the first snapshot
    /// has been attempted (or is no longer assigned).
    fn check_synced(&mut self) {
        let Some(initial) = self.initial.as_mut() else {
            return;
        };
        let (desired, held) = (&self.desired, &self.held);
        initial.retain(|key| {
            desired.contains_key(key)
                && !matches!(
                    held.get(key),
                    Some(Held::Ready { .. } | Held::Failed { .. })
                )
        });
        if initial.is_empty() {
            self.mark_synced();
        }
    }

    fn mark_synced(&self) {
        if self.agent.state.registry_synced.load(Ordering::SeqCst) {
            return;
        }
        if !self
            .agent
            .state
            .registry_synced
            .swap(true, Ordering::SeqCst)
        {
            tracing::info!(
                versions = self.held.len(),
                "registry's first snapshot acted on"
            );
        }
        self.agent.synced.send_replace(true);
    }
}

async fn load_job(
    mut client: RegistryClient<Channel>,
    cache: PathBuf,
    runtime: Arc<dyn Runtime>,
    defaults: ModelDefaults,
    metrics: WorkerMetrics,
    key: Key,
    artifact: Artifact,
) -> Result<Loaded, LoadFailure> {
    let model_file = ensure_artifact(&mut client, &cache, &artifact).await?;
    let found = FoundVersion {
        model: key.0,
        version: key.1,
        model_file,
        config: None,
    };
    tokio::task::spawn_blocking(move || {
        let model = load_version(&found, runtime.as_ref(), &defaults, &metrics)
            .map_err(|error| LoadFailure::permanent(error.to_string()))?;
        let signature_json = signature_json(&model.signature);
        Ok(Loaded {
            model,
            signature_json,
        })
    })
    .await
    .unwrap_or_else(|error| Err(LoadFailure::permanent(format!("loading failed: {error}"))))
}
