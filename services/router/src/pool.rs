//! The workers behind the router and what each of them serves.
//!
//! Workers are configured statically for now. A background task asks each
//! one for its repository index every refresh interval; a worker that fails a
//! call is taken out of rotation until its next successful refresh.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use shamal_proto::inference::*;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// A worker's service living in the router's own process (`shamal up`).
pub type LocalService = Arc<dyn GrpcInferenceService>;

/// How the router reaches one worker: over gRPC, or by calling its service
/// in process (same service code, batcher and metrics; no network hop).
#[derive(Clone)]
pub enum UpstreamClient {
    Remote(GrpcInferenceServiceClient<Channel>),
    Local(LocalService),
}

macro_rules! forward_rpc {
    ($($method:ident($request:ty) -> $response:ty;)+) => {
        impl UpstreamClient {
            $(pub async fn $method(&mut self, request: Request<$request>) -> Result<Response<$response>, Status> {
                match self {
                    UpstreamClient::Remote(client) => client.$method(request).await,
                    UpstreamClient::Local(service) => service.$method(request).await,
                }
            })+
        }
    };
}

forward_rpc! {
    model_infer(ModelInferRequest) -> ModelInferResponse;
    model_metadata(ModelMetadataRequest) -> ModelMetadataResponse;
    model_config(ModelConfigRequest) -> ModelConfigResponse;
    model_ready(ModelReadyRequest) -> ModelReadyResponse;
    model_statistics(ModelStatisticsRequest) -> ModelStatisticsResponse;
    repository_index(RepositoryIndexRequest) -> RepositoryIndexResponse;
}

enum Transport {
    Remote {
        channels: Vec<Channel>,
        next_channel: AtomicUsize,
        max_message_bytes: usize,
    },
    Local(LocalService),
}

/// One worker process.
pub struct Upstream {
    pub address: String,
    transport: Transport,
    /// Requests currently forwarded to this worker.
    pub inflight: AtomicUsize,
    healthy: AtomicBool,
    /// Ready models and their ready versions, from the last refresh.
    models: RwLock<BTreeMap<String, BTreeSet<String>>>,
}

impl Upstream {
    fn new(
        address: &str,
        connections: usize,
        max_message_bytes: usize,
    ) -> Result<Upstream, String> {
        let url = if address.starts_with("http://") || address.starts_with("https://") {
            address.to_owned()
        } else {
            format!("http://{address}")
        };
        let endpoint = Endpoint::from_shared(url)
            .map_err(|error| format!("invalid worker address '{address}': {error}"))?
            .tcp_nodelay(true)
            .http2_adaptive_window(true)
            .connect_timeout(Duration::from_secs(2))
            // Find dead peers on idle connections, not at the next request.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        // Several HTTP/2 connections spread the load of many concurrent
        // streams over more than one socket and I/O task.
        let channels = (0..connections.max(1))
            .map(|_| endpoint.connect_lazy())
            .collect();
        Ok(Upstream::with_transport(
            address,
            Transport::Remote {
                channels,
                next_channel: AtomicUsize::new(0),
                max_message_bytes,
            },
        ))
    }

    fn with_transport(address: &str, transport: Transport) -> Upstream {
        Upstream {
            address: address.to_owned(),
            transport,
            inflight: AtomicUsize::new(0),
            healthy: AtomicBool::new(false),
            models: RwLock::new(BTreeMap::new()),
        }
    }

    /// A client for this worker (for remote ones, on one of its connections).
    pub fn client(&self) -> UpstreamClient {
        match &self.transport {
            Transport::Remote {
                channels,
                next_channel,
                max_message_bytes,
            } => {
                let index = next_channel.fetch_add(1, Ordering::Relaxed) % channels.len();
                UpstreamClient::Remote(
                    GrpcInferenceServiceClient::new(channels[index].clone())
                        .max_decoding_message_size(*max_message_bytes)
                        .max_encoding_message_size(*max_message_bytes),
                )
            }
            Transport::Local(service) => UpstreamClient::Local(service.clone()),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Takes the worker out of rotation after a transport failure.
    pub fn mark_unhealthy(&self) {
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(worker = %self.address, "worker marked unhealthy");
        }
    }

    fn serves(&self, model: &str, version: &str) -> bool {
        let models = self
            .models
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        models
            .get(model)
            .is_some_and(|versions| version.is_empty() || versions.contains(version))
    }

    fn knows(&self, model: &str) -> bool {
        self.models
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains_key(model)
    }

    async fn refresh(&self) {
        let mut request = Request::new(RepositoryIndexRequest {
            repository_name: String::new(),
            ready: true,
        });
        // A hung worker must not stall the refresh of the others.
        request.set_timeout(REFRESH_TIMEOUT);
        let index = tokio::time::timeout(REFRESH_TIMEOUT, self.client().repository_index(request))
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("repository index timed out")));
        match index {
            Ok(response) => {
                let mut models: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
                for entry in response.into_inner().models {
                    if entry.state == "READY" {
                        models.entry(entry.name).or_default().insert(entry.version);
                    }
                }
                *self
                    .models
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = models;
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!(worker = %self.address, "worker in rotation");
                }
            }
            Err(status) => {
                tracing::debug!(worker = %self.address, %status, "worker refresh failed");
                self.mark_unhealthy();
            }
        }
    }
}

const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

/// Why no worker can take a request.
pub enum PickError {
    /// No worker serves this model (or version) at all.
    UnknownModel,
    /// Workers serve it but none is healthy right now.
    NoneHealthy,
}

/// All workers of the router.
pub struct WorkerPool {
    upstreams: Vec<Arc<Upstream>>,
    refreshed_once: AtomicBool,
}

impl WorkerPool {
    /// Remote workers by address, plus workers living in this process.
    pub fn new(
        addresses: &[String],
        local: Vec<(String, LocalService)>,
        connections: usize,
        max_message_bytes: usize,
    ) -> Result<WorkerPool, String> {
        let mut upstreams: Vec<Arc<Upstream>> = addresses
            .iter()
            .map(|address| Upstream::new(address, connections, max_message_bytes).map(Arc::new))
            .collect::<Result<_, _>>()?;
        upstreams.extend(local.into_iter().map(|(name, service)| {
            Arc::new(Upstream::with_transport(&name, Transport::Local(service)))
        }));
        Ok(WorkerPool {
            upstreams,
            refreshed_once: AtomicBool::new(false),
        })
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// Refreshes every worker concurrently.
    pub async fn refresh(&self) {
        futures::future::join_all(self.upstreams.iter().map(|upstream| upstream.refresh())).await;
        self.refreshed_once.store(true, Ordering::SeqCst);
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

    /// True once the workers have been asked at least once and one of them
    /// serves a ready model.
    pub fn ready(&self) -> bool {
        self.refreshed_once.load(Ordering::SeqCst)
            && self.upstreams.iter().any(|upstream| {
                upstream.healthy()
                    && !upstream
                        .models
                        .read()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .is_empty()
            })
    }

    /// Whether any worker, healthy or not, has reported this model.
    pub fn knows_model(&self, model: &str) -> bool {
        self.upstreams.iter().any(|upstream| upstream.knows(model))
    }

    /// Chooses the worker for a request: among the healthy workers serving
    /// the model (and version), the less loaded of two picked at random
    /// (power of two choices), skipping `exclude`.
    pub fn pick(
        &self,
        model: &str,
        version: &str,
        exclude: &[usize],
    ) -> Result<(usize, Arc<Upstream>), PickError> {
        let mut serving = false;
        let mut candidates: Vec<usize> = Vec::new();
        for (index, upstream) in self.upstreams.iter().enumerate() {
            if !upstream.serves(model, version) {
                continue;
            }
            serving = true;
            if upstream.healthy() && !exclude.contains(&index) {
                candidates.push(index);
            }
        }
        let chosen = match candidates.len() {
            0 if serving => return Err(PickError::NoneHealthy),
            0 => return Err(PickError::UnknownModel),
            1 => candidates[0],
            count => {
                // Two distinct candidates at random.
                let first_slot = fastrand_index(count);
                let second_slot = (first_slot + 1 + fastrand_index(count - 1)) % count;
                let (first, second) = (candidates[first_slot], candidates[second_slot]);
                let load = |index: usize| self.upstreams[index].inflight.load(Ordering::Relaxed);
                if load(second) < load(first) {
                    second
                } else {
                    first
                }
            }
        };
        Ok((chosen, self.upstreams[chosen].clone()))
    }

    /// Healthy workers serving `model` (all healthy workers when empty).
    pub fn serving(&self, model: &str) -> Vec<Arc<Upstream>> {
        self.upstreams
            .iter()
            .filter(|upstream| upstream.healthy() && (model.is_empty() || upstream.knows(model)))
            .cloned()
            .collect()
    }
}

/// A cheap, thread-local xorshift: load balancing and traffic splits need
/// spread, not cryptographic randomness.
pub(crate) fn random_u64() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    })
}

/// A distinct, non-zero seed per thread: the clock mixed with a counter.
fn seed() -> u64 {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    let mut seed = nanos
        ^ (COUNTER.fetch_add(1, Ordering::Relaxed) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64 finaliser: neighbouring seeds give unrelated streams.
    seed = (seed ^ (seed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    seed = (seed ^ (seed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (seed ^ (seed >> 31)) | 1
}

fn fastrand_index(bound: usize) -> usize {
    (random_u64() % bound as u64) as usize
}

/// Tracks one forwarded request in its worker's in-flight count.
pub struct InflightGuard(Arc<Upstream>);

impl InflightGuard {
    pub fn new(upstream: Arc<Upstream>) -> InflightGuard {
        upstream.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard(upstream)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}
