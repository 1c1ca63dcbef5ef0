//! The gRPC API (`shamal.batch.v1.BatchService`).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use shamal_auth::layer::principal_of;
use shamal_proto::shamal::batch::v1 as proto;
use shamal_proto::shamal::batch::v1::batch_service_server::BatchService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::coordinator::{Coordinator, Submit};
use crate::error::BatchError;
use crate::model::JobState;

pub struct BatchGrpc {
    coordinator: Arc<Coordinator>,
}

impl BatchGrpc {
    pub fn new(coordinator: Arc<Coordinator>) -> BatchGrpc {
        BatchGrpc { coordinator }
    }
}

type JobStream = Pin<Box<dyn Stream<Item = Result<proto::Job, Status>> + Send>>;

fn state_filter(state: i32) -> Result<Option<JobState>, BatchError> {
    let state = proto::JobState::try_from(state)
        .map_err(|_| BatchError::invalid("state", format!("{state} is not a job state")))?;
    Ok(JobState::from_proto(state))
}

#[tonic::async_trait]
impl BatchService for BatchGrpc {
    async fn submit_job(
        &self,
        request: Request<proto::SubmitJobRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        let principal = principal_of(request.extensions());
        let request = request.into_inner();
        let spec = request
            .spec
            .ok_or_else(|| BatchError::invalid("spec", "is required"))?;
        let job = self
            .coordinator
            .submit(
                Submit {
                    spec: spec.into(),
                    request_id: request.request_id,
                },
                &principal,
            )
            .await?;
        Ok(Response::new(job.into()))
    }

    async fn get_job(
        &self,
        request: Request<proto::GetJobRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        let principal = principal_of(request.extensions());
        let job = self.coordinator.get(&request.into_inner().id).await?;
        self.coordinator.check_tenant(&job, &principal)?;
        Ok(Response::new(job.into()))
    }

    async fn list_jobs(
        &self,
        request: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        let principal = principal_of(request.extensions());
        let request = request.into_inner();
        let state = state_filter(request.state)?;
        let model = (!request.model.is_empty()).then_some(request.model.as_str());
        let (jobs, next_page_token) = self
            .coordinator
            .list(request.page_size, &request.page_token, state, model)
            .await?;
        Ok(Response::new(proto::ListJobsResponse {
            jobs: jobs
                .into_iter()
                .filter(|job| self.coordinator.check_tenant(job, &principal).is_ok())
                .map(Into::into)
                .collect(),
            next_page_token,
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<proto::CancelJobRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        let principal = principal_of(request.extensions());
        let job = self
            .coordinator
            .cancel(&request.into_inner().id, &principal)
            .await?;
        Ok(Response::new(job.into()))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(
        &self,
        request: Request<proto::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let principal = principal_of(request.extensions());
        let id = request.into_inner().id;
        let mut changes = self.coordinator.subscribe();
        let first = self.coordinator.get(&id).await?;
        self.coordinator.check_tenant(&first, &principal)?;
        let (sender, receiver) = mpsc::channel(16);
        let coordinator = self.coordinator.clone();
        tokio::spawn(async move {
            let mut last = first;
            if sender.send(Ok(last.clone().into())).await.is_err() {
                return;
            }
            while !last.state.is_final() {
                // Every change, and at least every second (rows/s moves).
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), changes.changed())
                    .await;
                let job = match coordinator.get(&id).await {
                    Ok(job) => job,
                    Err(error) => {
                        let _ = sender.send(Err(error.into())).await;
                        return;
                    }
                };
                if job != last {
                    last = job;
                    if sender.send(Ok(last.clone().into())).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}
