//! Strict readiness: a router starting beside its workers is not ready
//! while a worker still loads its repository (Triton's strict readiness, on
//! which a Kubernetes readiness probe relies), and, once started, a worker
//! that drains or restarts does not take the router out of service.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use shamal_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use shamal_proto::inference::repository_index_response::ModelIndex;
use shamal_proto::inference::*;
use support::{client, start_router};
use tokio::net::TcpListener;

/// A worker whose first model is loaded and whose second is still loading:
/// its index lists the first as READY, and it reports itself not ready
/// until `ready` is set. Not a product component: it holds a worker in the
/// middle of its start for as long as the test needs.
#[derive(Clone)]
struct LoadingWorker {
    ready: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl GrpcInferenceService for LoadingWorker {
    async fn server_ready(
        &self,
        _: tonic::Request<ServerReadyRequest>,
    ) -> Result<tonic::Response<ServerReadyResponse>, tonic::Status> {
        Ok(tonic::Response::new(ServerReadyResponse {
            ready: self.ready.load(Ordering::SeqCst),
        }))
    }

    async fn repository_index(
        &self,
        _: tonic::Request<RepositoryIndexRequest>,
    ) -> Result<tonic::Response<RepositoryIndexResponse>, tonic::Status> {
        let loaded = ModelIndex {
            name: "small".into(),
            version: "1".into(),
            state: "READY".into(),
            reason: String::new(),
        };
        let mut models = vec![loaded];
        if !self.ready.load(Ordering::SeqCst) {
            models.push(ModelIndex {
                name: "large".into(),
                version: "1".into(),
                state: "LOADING".into(),
                reason: String::new(),
            });
        }
        Ok(tonic::Response::new(RepositoryIndexResponse { models }))
    }
}

async fn start_loading_worker() -> (SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let ready = Arc::new(AtomicBool::new(false));
    let worker = LoadingWorker {
        ready: ready.clone(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GrpcInferenceServiceServer::new(worker))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (address, ready)
}

async fn server_ready(router: SocketAddr) -> bool {
    client(router)
        .await
        .server_ready(ServerReadyRequest {})
        .await
        .map(|response| response.into_inner().ready)
        .unwrap_or(false)
}

async fn http_ready(http: SocketAddr) -> u16 {
    reqwest::get(format!("http://{http}/v2/health/ready"))
        .await
        .map(|response| response.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test]
async fn router_is_not_ready_while_a_worker_still_loads_its_models() {
    let (worker, ready) = start_loading_worker().await;
    let router = start_router(vec![worker.to_string()], |_| {}).await;

    // Ten refresh intervals: the router has seen the worker and its loaded
    // model many times over, and must still wait for the one loading.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(
        !server_ready(router.running.address).await,
        "ServerReady while a worker's repository is still loading"
    );
    assert_eq!(
        http_ready(router.http).await,
        503,
        "/v2/health/ready while a worker's repository is still loading"
    );

    ready.store(true, Ordering::SeqCst);
    support::wait_until("the router is ready once its worker is", || async {
        server_ready(router.running.address).await
    })
    .await;
    assert_eq!(http_ready(router.http).await, 200);

    // Started: a worker that stops being ready (draining, restarting) is
    // routed around, not a reason for the router to leave service.
    ready.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        server_ready(router.running.address).await,
        "a started router stays ready while some worker serves a model"
    );
    router.running.stop().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_worker_does_not_hold_a_router_back() {
    let (worker, ready) = start_loading_worker().await;
    ready.store(true, Ordering::SeqCst);
    // Nothing listens there: the router routes around it.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_address = dead.local_addr().unwrap();
    drop(dead);
    let router = start_router(vec![worker.to_string(), dead_address.to_string()], |_| {}).await;
    support::wait_until(
        "the router is ready beside an unreachable worker",
        || async { server_ready(router.running.address).await },
    )
    .await;
    router.running.stop().await.unwrap();
}
