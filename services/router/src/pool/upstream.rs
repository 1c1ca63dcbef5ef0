//! One worker as the router sees it: how to reach it (a gRPC client over a
//! few connections, or its service in the router's own process), what it
//! serves and whether it is healthy, as its last health check found.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use shamal_proto::inference::*;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::PoolSettings;
use crate::outlier::OutlierState;

/// Why a worker cannot be added to the pool.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The worker's address (configured, or reported by the registry) is
    /// neither `host:port` nor a URL tonic can connect to.
    #[error("invalid worker address '{address}': {source}")]
    InvalidAddress {
        address: String,
        source: tonic::transport::Error,
    },
}

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
    server_ready(ServerReadyRequest) -> ServerReadyResponse;
    model_infer(ModelInferRequest) -> ModelInferResponse;
    model_metadata(ModelMetadataRequest) -> ModelMetadataResponse;
    model_config(ModelConfigRequest) -> ModelConfigResponse;
    model_ready(ModelReadyRequest) -> ModelReadyResponse;
    model_statistics(ModelStatisticsRequest) -> ModelStatisticsResponse;
    repository_index(RepositoryIndexRequest) -> RepositoryIndexResponse;
}

/// How [`Upstream::client`] reaches the worker.
#[derive(Clone)]
pub(super) enum Transport {
    Remote {
        channels: Vec<Channel>,
        max_message_bytes: usize,
    },
    Local(LocalService),
}

/// Where a worker came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Listed in the router's configuration.
    Static,
    /// Living in the router's process (`shamal up`).
    Local,
    /// Learnt from the registry's Watch stream.
    Registry,
}

/// What the router knows about a worker besides how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerMeta {
    /// Registry worker id (the address or name for configured workers).
    pub id: String,
    pub address: String,
    /// Region it processes data in.
    pub region: String,
    /// cpu | cuda
    pub device: String,
    /// Requests it is sized to run at once (load-balancing weight, ≥ 1).
    pub capacity: u32,
    pub source: Source,
}

/// One worker process.
pub struct Upstream {
    pub meta: WorkerMeta,
    transport: Transport,
    next_channel: AtomicUsize,
    /// Requests currently forwarded to this worker.
    pub inflight: AtomicUsize,
    pub(super) healthy: AtomicBool,
    /// Set when the registry says a configured worker is draining or lost:
    /// no new requests until it serves again.
    pub(super) withdrawn: AtomicBool,
    /// Ready models and their ready versions, from the last refresh.
    pub(super) models: RwLock<BTreeMap<String, BTreeSet<String>>>,
    /// The worker's own readiness (ServerReady) at the last refresh that
    /// asked for it: only a starting pool asks (see [`super::WorkerPool::ready`]).
    pub(super) reported_ready: AtomicBool,
    /// Failure and latency record for outlier ejection.
    pub(crate) outlier: OutlierState,
}

/// Lazily connecting channels to a worker at `address` (`host:port` or a
/// URL), over mTLS when `settings.tls` is set; fails only on an address
/// that cannot be parsed.
pub(super) fn remote_transport(address: &str, settings: &PoolSettings) -> Result<Transport, Error> {
    let (connections, max_message_bytes) = (settings.connections, settings.max_message_bytes);
    let url = if address.starts_with("http://") || address.starts_with("https://") {
        address.to_owned()
    } else if settings.tls.is_some() {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    };
    let endpoint = Endpoint::from_shared(url)
        .map_err(|source| Error::InvalidAddress {
            address: address.to_owned(),
            source,
        })?
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
        .map(|_| match &settings.tls {
            Some(tls) => tls.connect_lazy(endpoint.clone()),
            None => endpoint.connect_lazy(),
        })
        .collect();
    Ok(Transport::Remote {
        channels,
        max_message_bytes,
    })
}

impl Upstream {
    pub(super) fn new(meta: WorkerMeta, transport: Transport) -> Upstream {
        Upstream {
            meta,
            transport,
            next_channel: AtomicUsize::new(0),
            inflight: AtomicUsize::new(0),
            healthy: AtomicBool::new(false),
            withdrawn: AtomicBool::new(false),
            models: RwLock::new(BTreeMap::new()),
            reported_ready: AtomicBool::new(false),
            outlier: OutlierState::default(),
        }
    }

    /// The same worker with new facts from the registry: same connections,
    /// health and models.
    pub(super) fn with_meta(&self, meta: WorkerMeta) -> Upstream {
        let upstream = Upstream::new(meta, self.transport.clone());
        upstream
            .healthy
            .store(self.healthy.load(Ordering::Relaxed), Ordering::Relaxed);
        upstream.reported_ready.store(
            self.reported_ready.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        *upstream
            .models
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = self
            .models
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        upstream
    }

    /// A client for this worker (for remote ones, on one of its connections).
    pub fn client(&self) -> UpstreamClient {
        match &self.transport {
            Transport::Remote {
                channels,
                max_message_bytes,
            } => {
                let index = self.next_channel.fetch_add(1, Ordering::Relaxed) % channels.len();
                UpstreamClient::Remote(
                    GrpcInferenceServiceClient::new(channels[index].clone())
                        .max_decoding_message_size(*max_message_bytes)
                        .max_encoding_message_size(*max_message_bytes),
                )
            }
            Transport::Local(service) => UpstreamClient::Local(service.clone()),
        }
    }

    /// Answered its last health check and is not withdrawn.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.withdrawn.load(Ordering::Relaxed)
    }

    /// Takes the worker out of rotation after a transport failure.
    pub fn mark_unhealthy(&self) {
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(worker = %self.meta.address, "worker marked unhealthy");
        }
    }

    pub(super) fn serves(&self, model: &str, version: &str) -> bool {
        let models = self
            .models
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        models
            .get(model)
            .is_some_and(|versions| version.is_empty() || versions.contains(version))
    }

    /// Takes `model` (`version`, or the whole model when empty) out of what
    /// this worker serves until its next refresh: it answered that it does
    /// not hold it.
    pub(crate) fn forget(&self, model: &str, version: &str) {
        let mut models = self
            .models
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let emptied = match models.get_mut(model) {
            Some(versions) if !version.is_empty() => {
                versions.remove(version);
                versions.is_empty()
            }
            Some(_) => true,
            None => false,
        };
        if emptied {
            models.remove(model);
        }
    }

    pub(super) fn knows(&self, model: &str) -> bool {
        self.models
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains_key(model)
    }

    pub(super) fn has_models(&self) -> bool {
        !self
            .models
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_empty()
    }

    /// Load relative to capacity, lower is better: in-flight requests per
    /// unit of capacity, raised while the worker is warming up again after
    /// an ejection.
    pub(super) fn load_score(&self, now_ms: u64, slow_start: Duration) -> f64 {
        let inflight = self.inflight.load(Ordering::Relaxed) as f64 + 1.0;
        let weight = f64::from(self.meta.capacity.max(1)) * self.outlier.ramp(now_ms, slow_start);
        inflight / weight
    }

    /// Asks what the worker serves and, with `ask_ready`, whether it
    /// reports itself ready.
    pub(super) async fn refresh(&self, ask_ready: bool) {
        let mut request = Request::new(RepositoryIndexRequest {
            repository_name: String::new(),
            ready: true,
        });
        // A hung worker must not stall the refresh of the others.
        request.set_timeout(REFRESH_TIMEOUT);
        let index = async {
            tokio::time::timeout(REFRESH_TIMEOUT, self.client().repository_index(request))
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("repository index timed out")))
        };
        let ready = async {
            if !ask_ready {
                return false;
            }
            let mut request = Request::new(ServerReadyRequest {});
            request.set_timeout(REFRESH_TIMEOUT);
            match tokio::time::timeout(REFRESH_TIMEOUT, self.client().server_ready(request)).await {
                Ok(Ok(response)) => response.into_inner().ready,
                // A peer that cannot say is taken as ready once it serves
                // models (its index is the only readiness it has).
                Ok(Err(status)) => status.code() == tonic::Code::Unimplemented,
                Err(_) => false,
            }
        };
        let (index, ready) = tokio::join!(index, ready);
        if ask_ready {
            self.reported_ready.store(ready, Ordering::Relaxed);
        }
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
                    tracing::info!(worker = %self.meta.address, region = %self.meta.region, "worker in rotation");
                }
            }
            Err(status) => {
                tracing::debug!(worker = %self.meta.address, %status, "worker refresh failed");
                self.mark_unhealthy();
            }
        }
    }
}

/// Longest a health check waits for a worker's answer.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

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
