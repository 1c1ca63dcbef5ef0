//! The async API's gRPC front door: `shamal.async.v1.AsyncInference`
//! (Submit, Get).

use std::sync::Arc;
use std::time::{Duration, Instant};

use shamal_proto::inference::ModelInferRequest;
use shamal_proto::shamal::r#async::v1::async_inference_server::AsyncInference;
use shamal_proto::shamal::r#async::v1::{AsyncResult, GetRequest, JobState, SubmitResponse};
use tonic::Status;

use super::{AsyncApi, Fetched, not_configured};
use crate::forward::CallContext;
use crate::routing::RoutingCore;

/// `shamal.async.v1.AsyncInference`, served next to the inference service.
#[derive(Clone)]
pub struct AsyncService {
    core: Arc<RoutingCore>,
    api: Option<Arc<AsyncApi>>,
}

impl AsyncService {
    pub fn new(core: Arc<RoutingCore>, api: Option<Arc<AsyncApi>>) -> AsyncService {
        AsyncService { core, api }
    }

    fn api(&self) -> Result<&Arc<AsyncApi>, Status> {
        self.api.as_ref().ok_or_else(not_configured)
    }
}

#[tonic::async_trait]
impl AsyncInference for AsyncService {
    async fn submit(
        &self,
        request: tonic::Request<ModelInferRequest>,
    ) -> Result<tonic::Response<SubmitResponse>, Status> {
        let api = self.api()?;
        let (metadata, extensions, message) = request.into_parts();
        let principal = shamal_auth::layer::principal_of(&extensions);
        let context = CallContext {
            request_id: shamal_rpc::request_id(&metadata),
            deadline: self
                .core
                .deadline(Instant::now(), shamal_rpc::request_timeout(&metadata)),
            protocol: "grpc",
            headers: metadata.into_headers(),
            peer: shamal_tls::peer_identity(&extensions),
        };
        let id = api.submit(message, &context, &principal).await?;
        let mut response = tonic::Response::new(SubmitResponse { id: id.to_string() });
        shamal_rpc::set_request_id(response.metadata_mut(), &context.request_id);
        Ok(response)
    }

    async fn get(
        &self,
        request: tonic::Request<GetRequest>,
    ) -> Result<tonic::Response<AsyncResult>, Status> {
        let api = self.api()?;
        // Answer before the caller's own deadline passes.
        let caller_timeout = shamal_rpc::request_timeout(request.metadata());
        let request = request.into_inner();
        let mut wait = Duration::from_millis(u64::from(request.wait_ms));
        if let Some(timeout) = caller_timeout {
            wait = wait.min(timeout.saturating_sub(Duration::from_millis(50)));
        }
        let mut result = AsyncResult {
            id: request.id.clone(),
            ..AsyncResult::default()
        };
        match api.fetch(&request.id, wait).await? {
            Fetched::Pending {
                running,
                worker,
                attempts,
            } => {
                result.set_state(if running {
                    JobState::Running
                } else {
                    JobState::Queued
                });
                result.worker = worker;
                result.attempts = attempts;
            }
            Fetched::Done {
                outcome,
                worker,
                attempts,
            } => {
                result.set_state(JobState::Done);
                result.worker = worker;
                result.attempts = attempts;
                match outcome {
                    Ok(response) => result.response = Some(response),
                    Err(status) => {
                        result.code = status.code() as i32;
                        result.message = status.message().to_owned();
                    }
                }
            }
        }
        Ok(tonic::Response::new(result))
    }
}
