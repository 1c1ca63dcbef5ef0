//! The internal gRPC API (`shamal.registry.v1.Registry`) for routers and
//! workers.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use shamal_proto::shamal::registry::v1 as proto;
use shamal_proto::shamal::registry::v1::registry_server::Registry;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::RegistryError;
use crate::model::{WorkerInfo, now_millis};
use crate::registry::ModelRegistry;

/// How often a Watch looks at the change log even without a local
/// notification (changes written by another registry replica).
const WATCH_POLL: Duration = Duration::from_millis(500);

pub struct RegistryGrpc {
    registry: Arc<ModelRegistry>,
    /// Flips to true when the server stops: Watch streams end then, so
    /// that graceful shutdown does not wait for them forever.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl RegistryGrpc {
    pub fn new(
        registry: Arc<ModelRegistry>,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> RegistryGrpc {
        RegistryGrpc { registry, stopping }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::WatchEvent, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<proto::ArtifactChunk, Status>> + Send>>;

/// Builds the next event for a subscriber at `since`: a snapshot when
/// `snapshot` is asked for or `since` is from a future the registry does not
/// know; `None` when nothing changed.
///
/// A snapshot carries every model, every worker that is not `gone` and the
/// tenant policies. A change carries the models, the workers (in their
/// current state, `gone` included) changed since `since`, and the complete
/// tenant policies when any of them changed.
async fn next_event(
    registry: &ModelRegistry,
    since: u64,
    snapshot: bool,
) -> Result<Option<proto::WatchEvent>, Status> {
    let current = registry.current_revision().await?;
    if snapshot || since > current {
        // Read the revision first: a change landing meanwhile is sent again
        // in the next event, never lost.
        let mut models = Vec::new();
        for name in registry.model_names().await? {
            if let Some(state) = registry.model_state(&name).await? {
                models.push(state);
            }
        }
        return Ok(Some(proto::WatchEvent {
            revision: current,
            snapshot: true,
            models,
            removed: Vec::new(),
            workers: registry.worker_states(None).await?,
            tenant_policies: Some(registry.tenant_policies_proto().await?),
        }));
    }
    let changes = registry.change_set_since(since).await?;
    if changes.latest == since {
        return Ok(None);
    }
    let mut models = Vec::new();
    let mut removed = Vec::new();
    for name in changes.models {
        match registry.model_state(&name).await? {
            Some(state) => models.push(state),
            None => removed.push(name),
        }
    }
    let workers = if changes.workers.is_empty() {
        Vec::new()
    } else {
        registry.worker_states(Some(&changes.workers)).await?
    };
    let tenant_policies = if changes.tenant_policies {
        Some(registry.tenant_policies_proto().await?)
    } else {
        None
    };
    Ok(Some(proto::WatchEvent {
        revision: changes.latest,
        snapshot: false,
        models,
        removed,
        workers,
        tenant_policies,
    }))
}

#[tonic::async_trait]
impl Registry for RegistryGrpc {
    type WatchStream = EventStream;
    type FetchArtifactStream = ChunkStream;

    async fn watch(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let request = request.into_inner();
        let registry = self.registry.clone();
        let mut notified = registry.subscribe();
        let mut stopping = self.stopping.clone();
        let (sender, receiver) = mpsc::channel(16);
        tracing::info!(subscriber = %request.subscriber, since = request.since_revision, "watch started");
        tokio::spawn(async move {
            let mut since = request.since_revision;
            // Revision 0 means "from the start": a snapshot, even of an
            // empty registry (whose revision is 0 too), then every change.
            let mut snapshot = since == 0;
            loop {
                // Mark the current notification seen before reading, so a
                // change committed during the read wakes the next round.
                notified.borrow_and_update();
                match next_event(&registry, since, snapshot).await {
                    Ok(Some(event)) => {
                        snapshot = false;
                        since = event.revision;
                        if sender.send(Ok(event)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(status) => {
                        tracing::warn!(%status, "watch could not read the registry");
                        let _ = sender.send(Err(status)).await;
                        break;
                    }
                }
                tokio::select! {
                    changed = notified.changed() => if changed.is_err() { break },
                    _ = tokio::time::sleep(WATCH_POLL) => {}
                    _ = sender.closed() => break,
                    _ = stopping.wait_for(|stopped| *stopped) => break,
                }
            }
            tracing::info!(subscriber = %request.subscriber, "watch ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn register_worker(
        &self,
        request: Request<proto::RegisterWorkerRequest>,
    ) -> Result<Response<proto::RegisterWorkerResponse>, Status> {
        let actor = caller(&request);
        let request = request.into_inner();
        self.registry
            .register_member_as(
                WorkerInfo {
                    id: request.worker_id,
                    address: request.address,
                    region: request.region,
                    formats: request.formats,
                    device: request.device,
                    last_seen: now_millis(),
                },
                request.capacity,
                &actor,
            )
            .await?;
        let membership = self.registry.membership();
        Ok(Response::new(proto::RegisterWorkerResponse {
            heartbeat_interval_ms: membership.heartbeat_interval.as_millis() as u64,
            lease_ms: membership.lease.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        let request = request.into_inner();
        let registered = self
            .registry
            .heartbeat(&request.worker_id, request.inflight, request.queue_depth)
            .await?;
        Ok(Response::new(proto::HeartbeatResponse { registered }))
    }

    async fn deregister_worker(
        &self,
        request: Request<proto::DeregisterWorkerRequest>,
    ) -> Result<Response<proto::DeregisterWorkerResponse>, Status> {
        let actor = caller(&request);
        let request = request.into_inner();
        self.registry
            .deregister_worker_as(&request.worker_id, request.done, &request.reason, &actor)
            .await?;
        Ok(Response::new(proto::DeregisterWorkerResponse {}))
    }

    async fn report_placement(
        &self,
        request: Request<proto::ReportPlacementRequest>,
    ) -> Result<Response<proto::ReportPlacementResponse>, Status> {
        let request = request.into_inner();
        self.registry
            .report_placement(
                &request.worker_id,
                &request.model,
                request.version,
                &request.state,
                &request.reason,
                &request.signature_json,
            )
            .await?;
        Ok(Response::new(proto::ReportPlacementResponse {}))
    }

    async fn fetch_artifact(
        &self,
        request: Request<proto::FetchArtifactRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let (_, stream) = self
            .registry
            .open_artifact(&request.into_inner().sha256)
            .await?;
        let chunks = stream.map(|chunk| {
            chunk
                .map(|data| proto::ArtifactChunk { data })
                // File-system detail stays in the log, as for every
                // internal error.
                .map_err(|error| Status::from(RegistryError::from(error)))
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn report_traffic(
        &self,
        request: Request<proto::ReportTrafficRequest>,
    ) -> Result<Response<proto::ReportTrafficResponse>, Status> {
        self.registry.report_traffic(&request.into_inner()).await?;
        Ok(Response::new(proto::ReportTrafficResponse {}))
    }

    async fn get_model(
        &self,
        request: Request<proto::GetModelRequest>,
    ) -> Result<Response<proto::ModelState>, Status> {
        let name = request.into_inner().name;
        match self.registry.model_state(&name).await? {
            Some(state) => Ok(Response::new(state)),
            None => Err(Status::not_found(format!("model '{name}' does not exist"))),
        }
    }
}

/// Who makes a gRPC call, as the audit trail records it: the service URI
/// of its certificate, the token's subject, or empty (anonymous).
fn caller<T>(request: &Request<T>) -> String {
    match request.extensions().get::<shamal_auth::Principal>() {
        Some(principal) if *principal != shamal_auth::Principal::Anonymous => principal.actor(),
        _ => String::new(),
    }
}
