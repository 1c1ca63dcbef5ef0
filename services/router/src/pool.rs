//! The workers behind the router and what each of them serves.
//!
//! Workers are configured statically, live in the router's process
//! (`shamal up`), or join and leave through the registry's Watch stream. A
//! background task health-checks each one (asks for its repository index)
//! every refresh interval; a worker that fails a call is taken out of
//! rotation until its next successful check. Outlier detection
//! (`outlier`) passes over workers that fail or slow down.

mod upstream;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use shamal_registry_client::proto::WorkerState;

use crate::outlier::{OutlierSettings, now_ms};
use crate::residency::RegionPolicy;

pub use upstream::{
    Error, InflightGuard, LocalService, Source, Upstream, UpstreamClient, WorkerMeta,
};
use upstream::{Transport, remote_transport};

/// The workers serving a model in one region (see
/// [`WorkerPool::regions_serving`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionServing {
    pub workers: usize,
    pub healthy_workers: usize,
    pub healthy_capacity: u64,
}

/// Why no worker can take a request.
#[derive(Debug, PartialEq, Eq)]
pub enum PickError {
    /// No worker serves this model (or version) at all.
    UnknownModel,
    /// Workers serve it in an allowed region but none is healthy now.
    NoneHealthy,
    /// Workers serve it, but none in a region the request allows.
    NoneInRegion,
}

/// How the pool is built and balances.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub connections: usize,
    pub max_message_bytes: usize,
    /// Region of configured and in-process workers (the registry's word
    /// wins when it knows them).
    pub static_region: String,
    pub outlier: OutlierSettings,
    /// mTLS to workers (this router's certificate, the CA they chain to);
    /// `None`: plaintext.
    pub tls: Option<shamal_tls::ClientTls>,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            connections: 2,
            max_message_bytes: shamal_rpc::DEFAULT_MAX_MESSAGE_BYTES,
            static_region: "local".to_owned(),
            outlier: OutlierSettings::default(),
            tls: None,
        }
    }
}

/// A worker the registry reported that changed the pool.
#[derive(Debug, PartialEq, Eq)]
pub enum Membership {
    Joined(String),
    Updated(String),
    Left { id: String, state: String },
}

/// All workers of the router. The member list is replaced whole when
/// workers join or leave; a request holds the worker it was sent to, so a
/// worker leaving never fails requests already sent to it.
pub struct WorkerPool {
    members: RwLock<Arc<Vec<Arc<Upstream>>>>,
    settings: PoolSettings,
    refreshed_once: AtomicBool,
    /// Set once every reachable worker has reported itself ready (see
    /// [`WorkerPool::ready`]); never cleared.
    started: AtomicBool,
}

impl WorkerPool {
    /// Remote workers by address, plus workers living in this process
    /// (named by their worker id).
    pub fn new(
        addresses: &[String],
        local: Vec<(String, LocalService)>,
        settings: PoolSettings,
    ) -> Result<WorkerPool, Error> {
        let mut upstreams: Vec<Arc<Upstream>> = Vec::new();
        for address in addresses {
            let transport = remote_transport(address, &settings)?;
            upstreams.push(Arc::new(Upstream::new(
                WorkerMeta {
                    id: address.clone(),
                    address: address.clone(),
                    region: settings.static_region.clone(),
                    device: "cpu".to_owned(),
                    capacity: 1,
                    source: Source::Static,
                },
                transport,
            )));
        }
        for (name, service) in local {
            upstreams.push(Arc::new(Upstream::new(
                WorkerMeta {
                    id: name.clone(),
                    address: name,
                    region: settings.static_region.clone(),
                    device: "cpu".to_owned(),
                    capacity: 1,
                    source: Source::Local,
                },
                Transport::Local(service),
            )));
        }
        Ok(WorkerPool {
            members: RwLock::new(Arc::new(upstreams)),
            settings,
            refreshed_once: AtomicBool::new(false),
            started: AtomicBool::new(false),
        })
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    /// The workers now (a cheap `Arc` clone).
    pub fn upstreams(&self) -> Arc<Vec<Arc<Upstream>>> {
        self.members
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Applies the workers of a registry Watch event: serving workers join
    /// (or are updated), draining, lost and gone ones leave at once. In a
    /// snapshot, registry workers not listed leave too. Configured and
    /// in-process workers the registry knows (same id or address) take its
    /// region and capacity, and are withdrawn while it says they are not
    /// serving. Returns what changed; new workers are health-checked by
    /// the caller's refresh.
    pub fn apply_workers(&self, workers: &[WorkerState], snapshot: bool) -> Vec<Membership> {
        let mut guard = self
            .members
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut members: Vec<Arc<Upstream>> = guard.as_ref().clone();
        let mut changes = Vec::new();
        let mut listed: BTreeSet<&str> = BTreeSet::new();
        for worker in workers {
            listed.insert(worker.worker_id.as_str());
            let serving = worker.state == "serving";
            let position = members.iter().position(|upstream| {
                upstream.meta.id == worker.worker_id
                    || (upstream.meta.source != Source::Registry
                        && upstream.meta.address == worker.address)
            });
            match position {
                Some(index) if members[index].meta.source != Source::Registry => {
                    // A configured worker the registry also knows.
                    let current = &members[index];
                    let meta = WorkerMeta {
                        region: worker.region.clone(),
                        device: worker.device.clone(),
                        capacity: worker.capacity.max(1),
                        ..current.meta.clone()
                    };
                    if meta != current.meta {
                        members[index] = Arc::new(current.with_meta(meta));
                        changes.push(Membership::Updated(worker.worker_id.clone()));
                    }
                    let was = members[index].withdrawn.swap(!serving, Ordering::Relaxed);
                    if was == serving {
                        changes.push(if serving {
                            Membership::Updated(worker.worker_id.clone())
                        } else {
                            Membership::Left {
                                id: worker.worker_id.clone(),
                                state: worker.state.clone(),
                            }
                        });
                    }
                }
                Some(index) if !serving => {
                    members.remove(index);
                    changes.push(Membership::Left {
                        id: worker.worker_id.clone(),
                        state: worker.state.clone(),
                    });
                }
                Some(index) => {
                    let current = &members[index];
                    let meta = registry_meta(worker);
                    if meta.address != current.meta.address {
                        match self.remote(meta) {
                            Ok(upstream) => members[index] = Arc::new(upstream),
                            Err(error) => {
                                tracing::warn!(worker = %worker.worker_id, %error, "worker address refused");
                                members.remove(index);
                            }
                        }
                        changes.push(Membership::Updated(worker.worker_id.clone()));
                    } else if meta != current.meta {
                        members[index] = Arc::new(current.with_meta(meta));
                        changes.push(Membership::Updated(worker.worker_id.clone()));
                    }
                }
                None if serving => match self.remote(registry_meta(worker)) {
                    Ok(upstream) => {
                        members.push(Arc::new(upstream));
                        changes.push(Membership::Joined(worker.worker_id.clone()));
                    }
                    Err(error) => {
                        tracing::warn!(worker = %worker.worker_id, %error, "worker address refused");
                    }
                },
                None => {}
            }
        }
        if snapshot {
            members.retain(|upstream| {
                let keep = upstream.meta.source != Source::Registry
                    || listed.contains(upstream.meta.id.as_str());
                if !keep {
                    changes.push(Membership::Left {
                        id: upstream.meta.id.clone(),
                        state: "gone".to_owned(),
                    });
                }
                keep
            });
        }
        for change in &changes {
            match change {
                Membership::Joined(id) => tracing::info!(worker = %id, "worker joined"),
                Membership::Updated(id) => tracing::info!(worker = %id, "worker updated"),
                Membership::Left { id, state } => {
                    tracing::info!(worker = %id, state = %state, "worker left the pool")
                }
            }
        }
        *guard = Arc::new(members);
        changes
    }

    fn remote(&self, meta: WorkerMeta) -> Result<Upstream, Error> {
        let transport = remote_transport(&meta.address, &self.settings)?;
        Ok(Upstream::new(meta, transport))
    }

    /// Health-checks every worker concurrently (asks what it serves; while
    /// the pool is starting, also whether each worker is ready).
    pub async fn refresh(&self) {
        let members = self.upstreams();
        let starting = !self.started.load(Ordering::SeqCst);
        futures::future::join_all(members.iter().map(|upstream| upstream.refresh(starting))).await;
        self.refreshed_once.store(true, Ordering::SeqCst);
        if starting && serves_models(&members) && all_reachable_ready(&members) {
            tracing::info!(workers = members.len(), "every reachable worker is ready");
            self.started.store(true, Ordering::SeqCst);
        }
    }

    /// Keeps refreshing until the returned task is aborted.
    pub fn spawn_refresh(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                pool.refresh().await;
                // Until some worker serves a ready model, look again sooner.
                let wait = if pool.ready() {
                    interval
                } else {
                    interval.min(Duration::from_millis(100))
                };
                tokio::time::sleep(wait).await;
            }
        })
    }

    /// Strict readiness, as Triton's: not before every worker the router
    /// reaches has reported itself ready (a worker is ready only once all
    /// the models of its repository are loaded), so a router starting
    /// beside its workers is not ready while their models still load. Once
    /// started, ready while some worker serves a ready model: a worker
    /// that later drains, restarts or fails is routed around, and must not
    /// take every router out of service with it.
    pub fn ready(&self) -> bool {
        self.refreshed_once.load(Ordering::SeqCst)
            && self.started.load(Ordering::SeqCst)
            && serves_models(&self.upstreams())
    }

    /// Whether any worker, healthy or not, has reported this model.
    pub fn knows_model(&self, model: &str) -> bool {
        self.upstreams()
            .iter()
            .any(|upstream| upstream.knows(model))
    }

    /// Chooses the worker for a request among the healthy workers serving
    /// the model (and version) in an allowed region, skipping `exclude`:
    /// the less loaded of two picked at random (power of two choices, load
    /// relative to capacity). Ejected outliers are passed over while any
    /// other candidate remains.
    pub fn pick(
        &self,
        model: &str,
        version: &str,
        exclude: &[Arc<Upstream>],
        regions: Option<&RegionPolicy>,
    ) -> Result<Arc<Upstream>, PickError> {
        let members = self.upstreams();
        let now_ms = now_ms();
        let mut serving = false;
        let mut in_region = false;
        let mut candidates: Vec<&Arc<Upstream>> = Vec::new();
        let mut ejected: Vec<&Arc<Upstream>> = Vec::new();
        for upstream in members.iter() {
            if !upstream.serves(model, version) {
                continue;
            }
            serving = true;
            if regions.is_some_and(|policy| !policy.allows(&upstream.meta.region)) {
                continue;
            }
            in_region = true;
            if !upstream.healthy()
                || exclude
                    .iter()
                    .any(|excluded| Arc::ptr_eq(excluded, upstream))
            {
                continue;
            }
            if upstream.outlier.ejected(now_ms) {
                ejected.push(upstream);
            } else {
                candidates.push(upstream);
            }
        }
        // Every candidate ejected: better a suspect worker than none.
        if candidates.is_empty() {
            candidates = ejected;
        }
        let slow_start = self.settings.outlier.slow_start;
        let chosen = match candidates.len() {
            0 if in_region => return Err(PickError::NoneHealthy),
            0 if serving => return Err(PickError::NoneInRegion),
            0 => return Err(PickError::UnknownModel),
            1 => candidates[0],
            count => {
                // Two distinct candidates at random.
                let first_slot = crate::rng::random_index(count);
                let second_slot = (first_slot + 1 + crate::rng::random_index(count - 1)) % count;
                let (first, second) = (candidates[first_slot], candidates[second_slot]);
                if second.load_score(now_ms, slow_start) < first.load_score(now_ms, slow_start) {
                    second
                } else {
                    first
                }
            }
        };
        Ok(chosen.clone())
    }

    /// Per region, the workers that serve `model` (and `version`, unless
    /// empty) and are not withdrawn: how many, and the capacity of the
    /// healthy ones. Regions where no such worker is are absent.
    pub fn regions_serving(&self, model: &str, version: &str) -> BTreeMap<String, RegionServing> {
        let mut regions: BTreeMap<String, RegionServing> = BTreeMap::new();
        for upstream in self.upstreams().iter() {
            if upstream.withdrawn.load(Ordering::Relaxed) || !upstream.serves(model, version) {
                continue;
            }
            let entry = regions.entry(upstream.meta.region.clone()).or_default();
            entry.workers += 1;
            if upstream.healthy() {
                entry.healthy_workers += 1;
                entry.healthy_capacity += u64::from(upstream.meta.capacity.max(1));
            }
        }
        regions
    }

    /// Healthy workers serving `model` (all healthy workers when empty).
    pub fn serving(&self, model: &str) -> Vec<Arc<Upstream>> {
        self.upstreams()
            .iter()
            .filter(|upstream| upstream.healthy() && (model.is_empty() || upstream.knows(model)))
            .cloned()
            .collect()
    }

    /// Runs outlier detection every `interval` until the task is aborted.
    pub fn spawn_outlier_detection(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let pool = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(pool.settings.outlier.interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let members = pool.upstreams();
                crate::outlier::detect(&members, &pool.settings.outlier, now_ms());
            }
        })
    }
}

fn registry_meta(worker: &WorkerState) -> WorkerMeta {
    WorkerMeta {
        id: worker.worker_id.clone(),
        address: worker.address.clone(),
        region: worker.region.clone(),
        device: worker.device.clone(),
        capacity: worker.capacity.max(1),
        source: Source::Registry,
    }
}

/// Whether some healthy worker serves a ready model.
fn serves_models(members: &[Arc<Upstream>]) -> bool {
    members
        .iter()
        .any(|upstream| upstream.healthy() && upstream.has_models())
}

/// Whether every worker that answered its last refresh reported itself
/// ready. Unreachable workers do not hold a router back: it routes around
/// them.
fn all_reachable_ready(members: &[Arc<Upstream>]) -> bool {
    members
        .iter()
        .all(|upstream| !upstream.healthy() || upstream.reported_ready.load(Ordering::Relaxed))
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
