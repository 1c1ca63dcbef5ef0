//! What the coordinator asks of other services before accepting a job: the
//! model's versions, aliases and limits (the registry, [`ModelCatalog`]),
//! and its inputs and outputs (the v2 `ModelMetadata` of an inference
//! endpoint, [`MetadataSource`]). Traits, so that tests can stand in for
//! either where no real service serves the model they need.

use std::sync::Arc;

use futures::future::BoxFuture;
use shamal_batch_io::ModelInput;
use shamal_proto::inference::ModelMetadataRequest;
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::shamal::registry::v1::{GetModelRequest, ModelState, WatchRequest};
use tonic::Code;
use tonic::transport::Channel;

use crate::error::{BatchError, Result};

/// The registry's view of models and tenants.
pub trait ModelCatalog: Send + Sync + 'static {
    /// The model's state; `None` when the registry does not know it.
    fn model<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<ModelState>>>;

    /// The regions `tenant`'s residency policy allows; `None` when the
    /// tenant has no policy.
    fn tenant_regions<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, Result<Option<Vec<String>>>>;
}

/// How long the registry has to send its snapshot of tenant policies.
const SNAPSHOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A model version's signature, from its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub inputs: Vec<ModelInput>,
    /// Output names, in the metadata's order.
    pub outputs: Vec<String>,
}

/// Where model signatures come from.
pub trait MetadataSource: Send + Sync + 'static {
    /// The inputs and outputs of `model` version `version`; NOT_FOUND when
    /// no worker serves that version.
    fn signature<'a>(&'a self, model: &'a str, version: u64) -> BoxFuture<'a, Result<Signature>>;
}

/// The registry's gRPC `GetModel`.
#[derive(Clone)]
pub struct RegistryCatalog {
    channel: Channel,
}

impl RegistryCatalog {
    pub fn new(channel: Channel) -> RegistryCatalog {
        RegistryCatalog { channel }
    }
}

impl ModelCatalog for RegistryCatalog {
    fn model<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<ModelState>>> {
        Box::pin(async move {
            let mut client = shamal_registry_client::client(self.channel.clone());
            match client
                .get_model(GetModelRequest {
                    name: name.to_owned(),
                })
                .await
            {
                Ok(response) => Ok(Some(response.into_inner())),
                Err(status) if status.code() == Code::NotFound => Ok(None),
                Err(status) => Err(remote_error("the registry", status)),
            }
        })
    }

    /// From the first event of the registry's Watch stream: a snapshot
    /// that carries every tenant policy (read at each submit, so a policy
    /// changed a moment ago applies).
    fn tenant_regions<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, Result<Option<Vec<String>>>> {
        Box::pin(async move {
            let mut client = shamal_registry_client::client(self.channel.clone());
            let first = tokio::time::timeout(SNAPSHOT_TIMEOUT, async {
                let mut events = client
                    .watch(WatchRequest {
                        since_revision: 0,
                        subscriber: "batch-coordinator".to_owned(),
                    })
                    .await?
                    .into_inner();
                events.message().await
            })
            .await
            .map_err(|_| {
                BatchError::Unavailable(format!(
                    "the registry sent no snapshot of tenant policies within {} s",
                    SNAPSHOT_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|status| remote_error("the registry", status))?
            .ok_or_else(|| {
                BatchError::Unavailable(
                    "the registry's Watch stream ended before its snapshot".to_owned(),
                )
            })?;
            Ok(first.tenant_policies.and_then(|policies| {
                policies
                    .policies
                    .into_iter()
                    .find(|policy| policy.tenant == tenant)
                    .map(|policy| policy.allowed_regions)
            }))
        })
    }
}

/// The v2 `ModelMetadata` of an inference endpoint (the router in
/// production; any v2 server that serves the model).
#[derive(Clone)]
pub struct InferenceMetadata {
    channel: Channel,
}

impl InferenceMetadata {
    pub fn new(channel: Channel) -> InferenceMetadata {
        InferenceMetadata { channel }
    }
}

impl MetadataSource for InferenceMetadata {
    fn signature<'a>(&'a self, model: &'a str, version: u64) -> BoxFuture<'a, Result<Signature>> {
        Box::pin(async move {
            let mut client = GrpcInferenceServiceClient::new(self.channel.clone());
            let response = client
                .model_metadata(ModelMetadataRequest {
                    name: model.to_owned(),
                    version: version.to_string(),
                })
                .await
                .map_err(|status| {
                    if status.code() == Code::NotFound {
                        BatchError::FailedPrecondition(format!(
                            "model '{model}' version {version} is not served by the inference \
                             endpoint ({}); its inputs cannot be checked",
                            status.message()
                        ))
                    } else {
                        remote_error("the inference endpoint", status)
                    }
                })?
                .into_inner();
            Ok(Signature {
                inputs: response
                    .inputs
                    .into_iter()
                    .map(|input| ModelInput::new(input.name, input.datatype, input.shape))
                    .collect(),
                outputs: response
                    .outputs
                    .into_iter()
                    .map(|output| output.name)
                    .collect(),
            })
        })
    }
}

/// A fixed signature per model (tests, and models no endpoint serves).
#[derive(Clone, Default)]
pub struct StaticMetadata {
    signatures: Arc<std::collections::HashMap<String, Signature>>,
}

impl StaticMetadata {
    pub fn new(signatures: impl IntoIterator<Item = (String, Signature)>) -> StaticMetadata {
        StaticMetadata {
            signatures: Arc::new(signatures.into_iter().collect()),
        }
    }
}

impl MetadataSource for StaticMetadata {
    fn signature<'a>(&'a self, model: &'a str, version: u64) -> BoxFuture<'a, Result<Signature>> {
        Box::pin(async move {
            self.signatures.get(model).cloned().ok_or_else(|| {
                BatchError::FailedPrecondition(format!(
                    "model '{model}' version {version} has no known signature"
                ))
            })
        })
    }
}

/// Models held in memory (tests, and `shamal up` before a registry answers).
#[derive(Clone, Default)]
pub struct StaticCatalog {
    models: Arc<std::collections::HashMap<String, ModelState>>,
    tenants: Arc<std::collections::HashMap<String, Vec<String>>>,
}

impl StaticCatalog {
    pub fn new(models: impl IntoIterator<Item = ModelState>) -> StaticCatalog {
        StaticCatalog {
            models: Arc::new(
                models
                    .into_iter()
                    .map(|model| (model.name.clone(), model))
                    .collect(),
            ),
            tenants: Arc::default(),
        }
    }

    /// With `tenant`'s residency policy allowing `regions`.
    pub fn with_tenant_policy(mut self, tenant: &str, regions: &[&str]) -> StaticCatalog {
        Arc::make_mut(&mut self.tenants).insert(
            tenant.to_owned(),
            regions.iter().map(|region| (*region).to_owned()).collect(),
        );
        self
    }
}

impl ModelCatalog for StaticCatalog {
    fn model<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<ModelState>>> {
        Box::pin(async move { Ok(self.models.get(name).cloned()) })
    }

    fn tenant_regions<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, Result<Option<Vec<String>>>> {
        Box::pin(async move { Ok(self.tenants.get(tenant).cloned()) })
    }
}

fn remote_error(service: &str, status: tonic::Status) -> BatchError {
    let message = format!(
        "{service} answered {:?}: {}",
        status.code(),
        status.message()
    );
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown => {
            BatchError::Unavailable(message)
        }
        Code::PermissionDenied | Code::Unauthenticated => BatchError::Internal(format!(
            "{message} (the batch coordinator's identity needs models:read and registry:watch \
             at the registry, and metadata:read at the inference endpoint)"
        )),
        _ => BatchError::Internal(message),
    }
}
