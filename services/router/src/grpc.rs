//! The router's gRPC front door: `inference.GRPCInferenceService`.

use std::sync::Arc;
use std::time::Instant;

use shamal_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use shamal_proto::inference::*;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::forward::CallContext;
use crate::routing::RoutingCore;

#[derive(Clone)]
pub struct RouterService {
    core: Arc<RoutingCore>,
}

impl RouterService {
    pub fn new(core: Arc<RoutingCore>) -> RouterService {
        RouterService { core }
    }

    fn context<T>(&self, request: &Request<T>) -> CallContext {
        let metadata = request.metadata();
        CallContext {
            request_id: shamal_rpc::request_id(metadata),
            deadline: self
                .core
                .deadline(Instant::now(), shamal_rpc::request_timeout(metadata)),
            protocol: "grpc",
            headers: http::HeaderMap::new(),
            peer: None,
        }
    }
}

/// Answers with the request id in the response metadata.
fn respond<T>(message: T, context: &CallContext) -> Response<T> {
    respond_with_id(message, &context.request_id)
}

fn respond_with_id<T>(message: T, request_id: &str) -> Response<T> {
    let mut response = Response::new(message);
    shamal_rpc::set_request_id(response.metadata_mut(), request_id);
    response
}

#[tonic::async_trait]
impl GrpcInferenceService for RouterService {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.core.ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let context = self.context(&request);
        let request = request.into_inner();
        let ready = self
            .core
            .model_ready(&request.name, &request.version, &context)
            .await?;
        Ok(respond(ModelReadyResponse { ready }, &context))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(self.core.server_metadata()))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let context = self.context(&request);
        let request = request.into_inner();
        let metadata = self
            .core
            .model_metadata(&request.name, &request.version, &context)
            .await?;
        Ok(respond(metadata, &context))
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let context = self.context(&request);
        let request = request.into_inner();
        let config = self
            .core
            .model_config(&request.name, &request.version, &context)
            .await?;
        Ok(respond(config, &context))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let mut context = self.context(&request);
        let span = tracing::debug_span!("infer", request_id = %context.request_id);
        // The metadata travels along: a rollout's sticky key and the
        // request's data-residency policy may be there.
        let (metadata, extensions, message) = request.into_parts();
        context.headers = metadata.into_headers();
        context.peer = shamal_tls::peer_identity(&extensions);
        let request_id = context.request_id.clone();
        let response = self.core.infer(message, context).instrument(span).await?;
        Ok(respond_with_id(response, &request_id))
    }

    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let context = self.context(&request);
        let request = request.into_inner();
        let statistics = self
            .core
            .statistics(&request.name, &request.version, &context)
            .await?;
        Ok(respond(statistics, &context))
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let context = self.context(&request);
        let ready_only = request.get_ref().ready;
        let index = self.core.repository_index(ready_only, &context).await?;
        Ok(respond(index, &context))
    }
}
