//! Following the model registry: the worker registers itself, watches the
//! registry and loads every version assigned to it, fetching artifacts into
//! a content-addressed cache; it unloads versions that are no longer
//! assigned and reports the state of each one back (placements).
//!
//! Membership: the worker registers with its capacity, then heartbeats at
//! the interval the registry answers (with its in-flight requests and queue
//! depth), registering again when the registry no longer knows it. On
//! shutdown it drains: it tells the registry it is `draining`, keeps serving
//! for `drain_grace` so routers route around it, stops taking requests,
//! finishes those it holds, then deregisters for good (`gone`).
//!
//! Placement rule: a worker holds every version whose lifecycle is
//! `registered` or `ready`, whose artifact format its runtime loads and
//! that the registry assigns to it (`assigned_workers` lists it, or is
//! empty: every capable worker). Versions load one at a time, in one task,
//! so loads do not fight for the CPU; the watch keeps being consumed
//! meanwhile, and a version that stops being assigned while it loads is
//! abandoned. A version that stops being assigned once loaded is unloaded;
//! requests already holding it finish first.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use shamal_registry_client::proto::registry_client::RegistryClient;
use shamal_registry_client::proto::{
    Artifact, DeregisterWorkerRequest, FetchArtifactRequest, HeartbeatRequest, ModelState,
    RegisterWorkerRequest, ReportPlacementRequest, WatchEvent,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::backend::{ModelSignature, Runtime, TensorSpec};
use crate::repository::{FoundVersion, ModelVersion, VersionState, load_version};
use crate::service::WorkerState;
use crate::settings::ModelDefaults;
use crate::stats::WorkerMetrics;

/// How a worker follows the registry.
#[derive(Clone, Debug)]
pub struct RegistryAgentSettings {
    /// The registry's internal gRPC address (`host:port` or a URL).
    pub address: String,
    /// This worker's identity in the registry; empty: `<hostname>-<port of
    /// the bound gRPC listener>`.
    pub worker_id: String,
    /// `host:port` at which routers reach this worker's inference gRPC;
    /// `None`: the bound gRPC listener's address (the host name in place of
    /// an unspecified IP such as 0.0.0.0).
    pub advertise_address: Option<String>,
    /// Region (data residency) the worker runs in.
    pub region: String,
    /// `cpu` or `cuda`.
    pub device: String,
    /// Directory of fetched artifacts, `<sha256>.<format>`.
    pub artifact_cache: PathBuf,
    /// Requests the worker is sized to run concurrently, reported to the
    /// registry (routers weight their choice by it); 0: derived from the
    /// model defaults, `instances × max_batch_size` (32 by default).
    pub capacity: u32,
    /// How long a worker that starts draining keeps taking requests after
    /// the registry accepted its drain notice, so that routers hear of it
    /// and route around it first.
    pub drain_grace: Duration,
}

/// Default of [`RegistryAgentSettings::drain_grace`].
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_millis(1000);

impl RegistryAgentSettings {
    /// Follows the registry at `address` with the defaults: derived id and
    /// address, region `local`, device `cpu`.
    pub fn new(
        address: impl Into<String>,
        artifact_cache: impl Into<PathBuf>,
    ) -> RegistryAgentSettings {
        RegistryAgentSettings {
            address: address.into(),
            worker_id: String::new(),
            advertise_address: None,
            region: "local".to_owned(),
            device: "cpu".to_owned(),
            artifact_cache: artifact_cache.into(),
            capacity: 0,
            drain_grace: DEFAULT_DRAIN_GRACE,
        }
    }

    /// The capacity reported to the registry: `capacity`, or
    /// `instances × max_batch_size` of the model defaults when it is 0.
    pub fn effective_capacity(&self, defaults: &ModelDefaults) -> u32 {
        if self.capacity > 0 {
            return self.capacity;
        }
        let derived = defaults
            .instances
            .max(1)
            .saturating_mul(defaults.max_batch_size.max(1));
        u32::try_from(derived).unwrap_or(u32::MAX)
    }

    /// The worker id and advertised address, given the bound gRPC address.
    pub fn identity(&self, bound: SocketAddr) -> (String, String) {
        let worker_id = if self.worker_id.is_empty() {
            format!("{}-{}", hostname(), bound.port())
        } else {
            self.worker_id.clone()
        };
        let address = match &self.advertise_address {
            Some(address) => address.clone(),
            None if bound.ip().is_unspecified() => format!("{}:{}", hostname(), bound.port()),
            None => bound.to_string(),
        };
        (worker_id, address)
    }
}

/// Checks a worker's registry settings as configured (before the worker
/// binds its port), naming the field at fault. Shared by every worker
/// binary.
pub fn validate_agent_settings(
    registry: &str,
    worker_id: Option<&str>,
    advertise_address: Option<&str>,
    region: &str,
    artifact_cache: &Path,
) -> Result<(), String> {
    let url = if registry.starts_with("http://") || registry.starts_with("https://") {
        registry.to_owned()
    } else {
        format!("http://{registry}")
    };
    let valid = !registry.trim().is_empty()
        && url
            .parse::<tonic::transport::Uri>()
            .is_ok_and(|uri| uri.host().is_some_and(|host| !host.is_empty()));
    if !valid {
        return Err(format!(
            "registry '{registry}' is not a host:port or http(s) URL"
        ));
    }
    if let Some(id) = worker_id
        && (id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_graphic()))
    {
        return Err(format!(
            "worker_id '{id}' must be 1 to 128 printable ASCII characters without spaces"
        ));
    }
    if let Some(address) = advertise_address {
        let port = address
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty())
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .filter(|port| *port > 0);
        if port.is_none() {
            return Err(format!("advertise_address '{address}' must be host:port"));
        }
    }
    shamal_registry_client::names::check_region(region)
        .map_err(|message| format!("region {message}"))?;
    if artifact_cache.as_os_str().is_empty() {
        return Err("artifact_cache must not be empty".to_owned());
    }
    if artifact_cache.exists() && !artifact_cache.is_dir() {
        return Err(format!(
            "artifact_cache {} is not a directory",
            artifact_cache.display()
        ));
    }
    Ok(())
}

/// The machine's host name (`/proc/sys/kernel/hostname`, then `HOSTNAME`),
/// `localhost` when neither is known.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// (model, version).
pub type Key = (String, u64);

/// Placement states, as the registry spells them.
pub mod placement {
    pub const LOADING: &str = "loading";
    pub const READY: &str = "ready";
    pub const FAILED: &str = "failed";
    pub const UNLOADED: &str = "unloaded";
}

/// The versions worker `worker_id` must hold: lifecycle `registered` or
/// `ready`, with an artifact in one of `formats`, assigned to it (see
/// [`shamal_registry_client::assigned_to`]).
pub fn desired_versions(
    models: &BTreeMap<String, ModelState>,
    formats: &[&str],
    worker_id: &str,
) -> BTreeMap<Key, Artifact> {
    models
        .values()
        .flat_map(|model| {
            model.versions.iter().filter_map(|version| {
                let artifact = version.artifact.as_ref()?;
                let wanted = matches!(version.lifecycle.as_str(), "registered" | "ready")
                    && formats.contains(&artifact.format.as_str())
                    && shamal_registry_client::assigned_to(version, worker_id);
                wanted.then(|| ((model.name.clone(), version.version), artifact.clone()))
            })
        })
        .collect()
}

/// What to do to go from the versions held to the desired ones.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Desired versions not held yet, in (model, version) order.
    pub load: Vec<Key>,
    /// Versions held that are no longer desired.
    pub unload: Vec<Key>,
}

/// Diffs the desired set against the versions held (attempted, whatever
/// the outcome).
pub fn plan<'a, V>(
    desired: &BTreeMap<Key, Artifact>,
    held: impl IntoIterator<Item = (&'a Key, V)>,
) -> Plan {
    let held: BTreeSet<&Key> = held.into_iter().map(|(key, _)| key).collect();
    Plan {
        load: desired
            .keys()
            .filter(|key| !held.contains(key))
            .cloned()
            .collect(),
        unload: held
            .into_iter()
            .filter(|key| !desired.contains_key(*key))
            .cloned()
            .collect(),
    }
}

/// The registry's state of every model, as Watch events bring it.
#[derive(Default)]
pub struct Catalog {
    pub models: BTreeMap<String, ModelState>,
}

impl Catalog {
    pub fn apply(&mut self, event: &WatchEvent) {
        if event.snapshot {
            self.models.clear();
        }
        for model in &event.models {
            self.models.insert(model.name.clone(), model.clone());
        }
        for name in &event.removed {
            self.models.remove(name);
        }
    }
}

/// Why a version could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadFailure {
    pub reason: String,
    /// Worth another attempt later (registry unreachable, I/O error), as
    /// opposed to a bad artifact or model.
    pub transient: bool,
}

impl LoadFailure {
    fn permanent(reason: impl Into<String>) -> LoadFailure {
        LoadFailure {
            reason: reason.into(),
            transient: false,
        }
    }

    fn transient(reason: impl Into<String>) -> LoadFailure {
        LoadFailure {
            reason: reason.into(),
            transient: true,
        }
    }
}

fn valid_digest(sha256: &str) -> bool {
    sha256.len() == 64
        && sha256
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
}

fn valid_format(format: &str) -> bool {
    !format.is_empty() && format.bytes().all(|byte| byte.is_ascii_alphanumeric())
}

/// Hashes a file: (lowercase hex sha256, size). Blocking.
pub fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// A download in progress; removed when dropped before `keep`.
struct PartialFile {
    path: PathBuf,
    kept: bool,
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Idle time allowed between two chunks of an artifact.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);
/// Time allowed for a unary call to the registry.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Downloads older than this are leftovers of a process that died.
const STALE_PARTIAL: Duration = Duration::from_secs(3600);

/// Removes leftover downloads (`*.partial`) not written to for an hour.
pub fn clean_partials(cache: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let stale = entry
            .metadata()
            .and_then(|metadata| metadata.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age > STALE_PARTIAL);
        if stale
            && path
                .extension()
                .is_some_and(|extension| extension == "partial")
        {
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn status_failure(what: &str, status: &tonic::Status) -> LoadFailure {
    let reason = format!("{what}: {} ({:?})", status.message(), status.code());
    match status.code() {
        tonic::Code::NotFound
        | tonic::Code::InvalidArgument
        | tonic::Code::PermissionDenied
        | tonic::Code::Unimplemented => LoadFailure::permanent(reason),
        _ => LoadFailure::transient(reason),
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|error| Err(std::io::Error::other(error.to_string())))
}

/// Makes the artifact available in the cache and returns its path:
/// `<cache>/<sha256>.<format>` when present and intact (a cached file whose
/// content does not match is deleted and fetched again), otherwise fetched
/// with FetchArtifact into a `.partial` file, hashed while written, checked
/// against the artifact's size and digest, synced and renamed into place.
pub async fn ensure_artifact(
    client: &mut RegistryClient<Channel>,
    cache: &Path,
    artifact: &Artifact,
) -> Result<PathBuf, LoadFailure> {
    let sha256 = artifact.sha256.clone();
    if !valid_digest(&sha256) {
        return Err(LoadFailure::permanent(format!(
            "artifact digest '{sha256}' is not a lowercase hex sha256"
        )));
    }
    if !valid_format(&artifact.format) {
        return Err(LoadFailure::permanent(format!(
            "artifact format '{}' is not valid",
            artifact.format
        )));
    }
    let expected_size = artifact.size_bytes;
    let target = cache.join(format!("{sha256}.{}", artifact.format));

    let cached = target.clone();
    match blocking(move || match hash_file(&cached) {
        Ok(found) => Ok(Some(found)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    })
    .await
    {
        Ok(Some((digest, size))) if digest == sha256 && size == expected_size => {
            tracing::debug!(path = %target.display(), "artifact found in the cache");
            return Ok(target);
        }
        Ok(Some((digest, size))) => {
            tracing::warn!(path = %target.display(), expected = %sha256, %digest, size, "cached artifact is corrupt; fetching it again");
            let _ = std::fs::remove_file(&target);
        }
        Ok(None) => {}
        Err(error) => {
            tracing::warn!(path = %target.display(), %error, "cannot read cached artifact; fetching it again");
            let _ = std::fs::remove_file(&target);
        }
    }

    let directory = cache.to_path_buf();
    blocking(move || std::fs::create_dir_all(&directory))
        .await
        .map_err(|error| {
            LoadFailure::transient(format!(
                "cannot create artifact cache {}: {error}",
                cache.display()
            ))
        })?;
    // One download file per fetch, so that workers sharing a cache never
    // write into each other's file.
    static FETCHES: AtomicU64 = AtomicU64::new(0);
    let partial_path = cache.join(format!(
        "{sha256}.{}.{}-{}.partial",
        artifact.format,
        std::process::id(),
        FETCHES.fetch_add(1, Ordering::Relaxed)
    ));
    let mut partial = PartialFile {
        path: partial_path.clone(),
        kept: false,
    };
    let io_failure = |error: std::io::Error| {
        LoadFailure::transient(format!(
            "cannot write artifact to {}: {error}",
            partial_path.display()
        ))
    };
    let path = partial.path.clone();
    let file = blocking(move || std::fs::File::create(&path))
        .await
        .map_err(io_failure)?;

    let request = FetchArtifactRequest {
        sha256: sha256.clone(),
    };
    let what = format!("cannot fetch artifact {sha256}");
    let mut stream = match tokio::time::timeout(CALL_TIMEOUT, client.fetch_artifact(request)).await
    {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return Err(status_failure(&what, &status)),
        Err(_) => {
            return Err(LoadFailure::transient(format!(
                "{what}: the registry did not answer"
            )));
        }
    };
    let mut sink = Some((file, Sha256::new()));
    let mut received = 0u64;
    loop {
        let chunk = match tokio::time::timeout(CHUNK_TIMEOUT, stream.message()).await {
            Ok(Ok(Some(chunk))) => chunk,
            Ok(Ok(None)) => break,
            Ok(Err(status)) => return Err(status_failure(&what, &status)),
            Err(_) => {
                return Err(LoadFailure::transient(format!(
                    "{what}: no data for {} s",
                    CHUNK_TIMEOUT.as_secs()
                )));
            }
        };
        received += chunk.data.len() as u64;
        if received > expected_size {
            return Err(LoadFailure::permanent(format!(
                "artifact {sha256} is larger than its registered size of {expected_size} bytes"
            )));
        }
        let Some((mut file, mut hasher)) = sink.take() else {
            break;
        };
        let data = chunk.data;
        sink = Some(
            blocking(move || {
                file.write_all(&data)?;
                hasher.update(&data);
                Ok((file, hasher))
            })
            .await
            .map_err(io_failure)?,
        );
    }
    let Some((file, hasher)) = sink else {
        return Err(LoadFailure::transient(format!(
            "{what}: download interrupted"
        )));
    };
    let digest = hex::encode(hasher.finalize());
    if received != expected_size {
        return Err(LoadFailure::permanent(format!(
            "artifact size mismatch: expected {expected_size} bytes, received {received}"
        )));
    }
    if digest != sha256 {
        return Err(LoadFailure::permanent(format!(
            "artifact digest mismatch: expected sha256 {sha256}, received content with sha256 {digest}"
        )));
    }
    let (from, to) = (partial.path.clone(), target.clone());
    blocking(move || {
        file.sync_all()?;
        drop(file);
        std::fs::rename(&from, &to)?;
        if let Some(parent) = to.parent()
            && let Ok(directory) = std::fs::File::open(parent)
        {
            let _ = directory.sync_all();
        }
        Ok(())
    })
    .await
    .map_err(io_failure)?;
    partial.kept = true;
    tracing::info!(sha256 = %sha256, bytes = received, path = %target.display(), "artifact fetched");
    Ok(target)
}

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

/// What the follower knows of a version it was assigned.
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

/// Sends placement reports in the background, latest state per version,
/// retrying those that fail until they go through or the worker stops.
#[derive(Clone)]
struct Reporter {
    sender: mpsc::UnboundedSender<ReportPlacementRequest>,
}

impl Reporter {
    fn spawn(
        client: RegistryClient<Channel>,
        stop: watch::Receiver<bool>,
    ) -> (Reporter, JoinHandle<()>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let task = tokio::spawn(report_loop(client, receiver, stop));
        (Reporter { sender }, task)
    }

    fn send(&self, request: ReportPlacementRequest) {
        let _ = self.sender.send(request);
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn report_loop(
    mut client: RegistryClient<Channel>,
    mut receiver: mpsc::UnboundedReceiver<ReportPlacementRequest>,
    mut stop: watch::Receiver<bool>,
) {
    let mut pending: BTreeMap<Key, ReportPlacementRequest> = BTreeMap::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        while let Ok(request) = receiver.try_recv() {
            pending.insert((request.model.clone(), request.version), request);
        }
        while let Some((key, request)) = pending.pop_first() {
            if *stop.borrow() {
                return;
            }
            let sent =
                tokio::time::timeout(CALL_TIMEOUT, client.report_placement(request.clone())).await;
            match sent {
                Ok(Ok(_)) => {
                    tracing::debug!(model = %request.model, version = request.version, state = %request.state, "placement reported");
                    backoff = Duration::from_millis(100);
                }
                Ok(Err(status))
                    if matches!(
                        status.code(),
                        tonic::Code::NotFound | tonic::Code::InvalidArgument
                    ) =>
                {
                    // The version is gone (e.g. the registry restored an
                    // older database) or the report is refused for good:
                    // retrying would hold up every report queued after it.
                    tracing::warn!(model = %request.model, version = request.version, state = %request.state, %status, "placement report refused; dropped");
                }
                Ok(Err(status)) => {
                    tracing::warn!(model = %request.model, version = request.version, state = %request.state, %status, "cannot report placement; will retry");
                    pending.entry(key).or_insert(request);
                    break;
                }
                Err(_) => {
                    tracing::warn!(model = %request.model, version = request.version, state = %request.state, "placement report timed out; will retry");
                    pending.entry(key).or_insert(request);
                    break;
                }
            }
            // Newer states replace queued ones before they are sent.
            while let Ok(request) = receiver.try_recv() {
                pending.insert((request.model.clone(), request.version), request);
            }
        }
        let retry = !pending.is_empty();
        tokio::select! {
            _ = stopped(&mut stop) => return,
            request = receiver.recv() => match request {
                Some(request) => {
                    pending.insert((request.model.clone(), request.version), request);
                }
                None => return,
            },
            _ = tokio::time::sleep(backoff), if retry => {
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Everything the follower needs from the worker.
pub(crate) struct Follower {
    pub follow: RegistryAgentSettings,
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

/// The follower's working state.
struct Follow {
    follower: Follower,
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
pub(crate) async fn follow(follower: Follower, mut stop: watch::Receiver<bool>) {
    let membership = follower.membership.clone();
    let channel = membership.channel.clone();
    let cache = follower.follow.artifact_cache.clone();
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
        shamal_registry_client::watch(channel.clone(), &format!("worker {}", follower.worker_id));
    let (reporter, reporter_task) = Reporter::spawn(client.clone(), stop.clone());
    let mut follow = Follow {
        follower,
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
        follow.start_next();
        tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            result = async {
                match follow.job.as_mut() {
                    Some((_, handle)) => handle.await,
                    None => std::future::pending().await,
                }
            }, if follow.job.is_some() => {
                if let Some((key, _)) = follow.job.take() {
                    let result = result.unwrap_or_else(|error| {
                        Err(LoadFailure::transient(format!("loading stopped: {error}")))
                    });
                    follow.finish(key, result);
                }
            }
            event = events.recv() => match event {
                Some(event) => {
                    if event.snapshot && follow.snapshots > 0 {
                        // A snapshot follows a reconnect: the registry may
                        // have restarted and forgotten this worker. (A
                        // draining worker does not come back: it stops
                        // following.)
                        if !membership.register(&mut stop).await {
                            break;
                        }
                    }
                    follow.on_event(&event);
                }
                None => break,
            },
        }
    }
    // Draining: report nothing new. A load in progress is abandoned (its
    // blocking part finishes on its own and is dropped).
    if let Some((_, handle)) = follow.job.take() {
        handle.abort();
    }
    drop(follow);
    let _ = reporter_task.await;
    tracing::info!("stopped following the registry");
}

impl Follow {
    fn report(&self, key: &Key, state: &str, reason: &str, signature_json: &str) {
        self.reporter.send(ReportPlacementRequest {
            worker_id: self.follower.worker_id.clone(),
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
            self.follower.runtime.formats(),
            &self.follower.worker_id,
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
                if placement.worker_id == self.follower.worker_id {
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
        let in_repository = self.follower.state.in_repository(&key.0, key.1);
        if !in_repository {
            // Requests holding the version finish; its batcher stops after.
            self.follower.state.store.remove(&key.0, key.1);
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
            if self.follower.state.in_repository(&key.0, key.1) {
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
            self.follower
                .state
                .store
                .insert(&key.0, key.1, VersionState::Loading);
            self.report(&key, placement::LOADING, "", "");
            self.held.insert(key.clone(), Held::Loading);
            let handle = tokio::spawn(load_job(
                self.client.clone(),
                self.follower.follow.artifact_cache.clone(),
                self.follower.runtime.clone(),
                self.follower.defaults.clone(),
                self.follower.metrics.clone(),
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
                self.follower.state.store.insert(
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
                self.follower.state.store.insert(
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
        if self.follower.state.registry_synced.load(Ordering::SeqCst) {
            return;
        }
        if !self
            .follower
            .state
            .registry_synced
            .swap(true, Ordering::SeqCst)
        {
            tracing::info!(
                versions = self.held.len(),
                "registry's first snapshot acted on"
            );
        }
        self.follower.synced.send_replace(true);
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
            .map_err(LoadFailure::permanent)?;
        let signature_json = signature_json(&model.signature);
        Ok(Loaded {
            model,
            signature_json,
        })
    })
    .await
    .unwrap_or_else(|error| Err(LoadFailure::permanent(format!("loading failed: {error}"))))
}

/// Time allowed for a drain notice (DeregisterWorker): shutdown does not
/// wait longer on an unreachable registry.
const DRAIN_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Repeated heartbeat failures are logged at most this often.
const HEARTBEAT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Heartbeat timings the registry answered at registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    pub heartbeat_interval: Duration,
    pub lease: Duration,
}

/// A worker's membership in the registry: registration, heartbeats and the
/// two drain notices. Shared by the follower (which registers), the
/// heartbeat task and the server's shutdown path.
pub(crate) struct Membership {
    pub channel: Channel,
    registration: RegisterWorkerRequest,
    /// Timings of the last successful registration; `None` before one.
    timings: watch::Sender<Option<Timings>>,
    /// Set when the worker starts draining: it no longer registers.
    draining: AtomicBool,
    state: Arc<WorkerState>,
    /// Requests the worker's gRPC service is handling now.
    inflight: Arc<AtomicUsize>,
}

impl Membership {
    pub fn new(
        follow: &RegistryAgentSettings,
        worker_id: String,
        address: String,
        formats: &[&str],
        capacity: u32,
        state: Arc<WorkerState>,
        inflight: Arc<AtomicUsize>,
    ) -> Result<Arc<Membership>, String> {
        let channel =
            shamal_registry_client::channel(&follow.address).map_err(|error| error.to_string())?;
        Ok(Arc::new(Membership {
            channel,
            registration: RegisterWorkerRequest {
                worker_id,
                address,
                region: follow.region.clone(),
                formats: formats.iter().map(|format| (*format).to_owned()).collect(),
                device: follow.device.clone(),
                capacity,
            },
            timings: watch::Sender::new(None),
            draining: AtomicBool::new(false),
            state,
            inflight,
        }))
    }

    fn client(&self) -> RegistryClient<Channel> {
        shamal_registry_client::client(self.channel.clone())
    }

    /// Whether the registry has accepted a registration of this worker.
    pub fn registered(&self) -> bool {
        self.timings.borrow().is_some()
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// One RegisterWorker call; keeps the timings the registry answers.
    async fn register_once(&self) -> Result<(), String> {
        let mut client = self.client();
        match tokio::time::timeout(
            CALL_TIMEOUT,
            client.register_worker(self.registration.clone()),
        )
        .await
        {
            Ok(Ok(response)) => {
                let response = response.into_inner();
                // A registry that predates leases answers zeros: heartbeat
                // every second then.
                let heartbeat_interval = match response.heartbeat_interval_ms {
                    0 => Duration::from_secs(1),
                    ms => Duration::from_millis(ms),
                };
                let lease = Duration::from_millis(response.lease_ms)
                    .max(heartbeat_interval.saturating_mul(2));
                self.timings.send_replace(Some(Timings {
                    heartbeat_interval,
                    lease,
                }));
                let request = &self.registration;
                tracing::info!(worker_id = %request.worker_id, address = %request.address, region = %request.region, capacity = request.capacity, formats = ?request.formats, heartbeat_interval_ms = heartbeat_interval.as_millis() as u64, lease_ms = lease.as_millis() as u64, "registered with the registry");
                Ok(())
            }
            Ok(Err(status)) => Err(status.to_string()),
            Err(_) => Err("the registry did not answer RegisterWorker".to_owned()),
        }
    }

    /// Registers until it succeeds; false when stopped or draining first.
    pub async fn register(&self, stop: &mut watch::Receiver<bool>) -> bool {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0u32;
        loop {
            if *stop.borrow() || self.draining() {
                return false;
            }
            attempt += 1;
            match self.register_once().await {
                Ok(()) => return true,
                Err(error) if attempt == 1 || attempt.is_multiple_of(10) => {
                    tracing::warn!(%error, attempt, "cannot register with the registry yet; retrying");
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = stopped(stop) => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// The load reported with each heartbeat: requests in the worker's gRPC
    /// service now, and requests waiting in its batch queues.
    pub fn load(&self) -> (u32, u32) {
        let inflight = self.inflight.load(Ordering::Relaxed);
        let queued: usize = self
            .state
            .store
            .index()
            .iter()
            .map(|(_, _, state)| match state {
                VersionState::Ready(model) => model.batcher.queue_depth(),
                _ => 0,
            })
            .sum();
        (
            u32::try_from(inflight).unwrap_or(u32::MAX),
            u32::try_from(queued).unwrap_or(u32::MAX),
        )
    }

    /// Heartbeats at the registry's interval until `stop` flips (after the
    /// final deregistration). A registry that no longer knows the worker
    /// gets a new registration (unless the worker is draining). Failures are
    /// logged, at most every 10 s, and never stop the worker.
    pub async fn heartbeat_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut timings = self.timings.subscribe();
        let mut failures = 0u64;
        let mut last_warning: Option<Instant> = None;
        loop {
            let current = *timings.borrow_and_update();
            let Some(current) = current else {
                tokio::select! {
                    _ = stopped(&mut stop) => return,
                    changed = timings.changed() => if changed.is_err() { return },
                }
                continue;
            };
            tokio::select! {
                _ = stopped(&mut stop) => return,
                _ = tokio::time::sleep(current.heartbeat_interval) => {}
            }
            let (inflight, queue_depth) = self.load();
            let request = HeartbeatRequest {
                worker_id: self.registration.worker_id.clone(),
                inflight,
                queue_depth,
            };
            let mut client = self.client();
            let sent =
                tokio::time::timeout(current.lease.min(CALL_TIMEOUT), client.heartbeat(request))
                    .await;
            let failure = match sent {
                Ok(Ok(response)) => {
                    if failures > 0 {
                        tracing::info!(failures, "heartbeats reach the registry again");
                    }
                    failures = 0;
                    last_warning = None;
                    if !response.into_inner().registered {
                        if self.draining() {
                            tracing::debug!("the registry no longer knows this draining worker");
                        } else {
                            tracing::info!(
                                "the registry does not know this worker (lost or restarted); registering again"
                            );
                            if let Err(error) = self.register_once().await {
                                tracing::warn!(%error, "cannot register again; retrying at the next heartbeat");
                            }
                        }
                    }
                    continue;
                }
                Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                    tracing::warn!(%status, "the registry does not take heartbeats; not sending any");
                    return;
                }
                Ok(Err(status)) => status.to_string(),
                Err(_) => format!(
                    "no answer within {} ms",
                    current.lease.min(CALL_TIMEOUT).as_millis()
                ),
            };
            failures += 1;
            if last_warning.is_none_or(|at| at.elapsed() >= HEARTBEAT_LOG_EVERY) {
                last_warning = Some(Instant::now());
                tracing::warn!(error = %failure, failures, "heartbeat to the registry failed; still serving");
            }
        }
    }

    /// First drain notice: the registry marks the worker `draining`, so
    /// routers stop sending it new requests. True when the registry
    /// accepted it (the worker then waits its drain grace); the worker
    /// stops registering either way.
    pub async fn drain_notice(&self, reason: &str) -> bool {
        self.draining.store(true, Ordering::SeqCst);
        if !self.registered() {
            return false;
        }
        self.deregister(false, reason).await
    }

    /// Last drain notice: the worker has finished and leaves (`gone`).
    pub async fn leave(&self, reason: &str) -> bool {
        self.draining.store(true, Ordering::SeqCst);
        if !self.registered() {
            return false;
        }
        self.deregister(true, reason).await
    }

    async fn deregister(&self, done: bool, reason: &str) -> bool {
        let mut client = self.client();
        let request = DeregisterWorkerRequest {
            worker_id: self.registration.worker_id.clone(),
            done,
            reason: reason.to_owned(),
        };
        match tokio::time::timeout(DRAIN_CALL_TIMEOUT, client.deregister_worker(request)).await {
            Ok(Ok(_)) => {
                tracing::info!(
                    state = if done { "gone" } else { "draining" },
                    "drain notice accepted by the registry"
                );
                true
            }
            Ok(Err(status)) => {
                tracing::warn!(%status, done, "the registry refused the drain notice");
                false
            }
            Err(_) => {
                tracing::warn!(done, "the registry did not answer the drain notice in time");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests;
