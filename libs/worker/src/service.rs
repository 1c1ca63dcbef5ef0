//! The worker's `inference.GRPCInferenceService`: what the router talks to.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use shamal_error::ErrorKind;
use shamal_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use shamal_proto::inference::model_metadata_response::TensorMetadata;
use shamal_proto::inference::repository_index_response::ModelIndex;
use shamal_proto::inference::*;
use shamal_rpc::{codec_status, request_timeout};
use shamal_tensor::{Tensor, decode_inputs, encode_outputs};
use tonic::{Request, Response, Status};

use crate::backend::{ModelSignature, TensorSpec};
use crate::batcher::InferError;
use crate::repository::{Lookup, ModelStore, ModelVersion, VersionState};

/// Protocol extensions the worker really implements.
/// (`model_repository` is not listed: the index is served, load and unload
/// are not.)
const EXTENSIONS: &[&str] = &["statistics"];

/// Shared state behind the worker's gRPC service.
pub struct WorkerState {
    pub server_name: String,
    /// Version reported by ServerMetadata: the crate version, with the
    /// runtime's device as SemVer build metadata when it reports one.
    server_version: String,
    pub store: ModelStore,
    /// Set once every model of the repository has been loaded (at once
    /// when the worker has no repository).
    pub loaded: AtomicBool,
    /// Set once the registry's first snapshot has been acted on: each
    /// version it assigned has been attempted (at once without a registry).
    pub registry_synced: AtomicBool,
    /// Set when the worker starts draining: it stops reporting ready.
    pub draining: AtomicBool,
    /// True when the worker follows a registry.
    follows_registry: AtomicBool,
    /// (model, version) of every entry the repository holds, problems
    /// included; the registry never loads over them.
    repository_versions: RwLock<BTreeSet<(String, u64)>>,
}

impl WorkerState {
    pub fn new(server_name: &str) -> WorkerState {
        WorkerState {
            server_name: server_name.to_owned(),
            server_version: server_version(None),
            store: ModelStore::default(),
            loaded: AtomicBool::new(false),
            registry_synced: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            follows_registry: AtomicBool::new(false),
            repository_versions: RwLock::new(BTreeSet::new()),
        }
    }

    /// Reports `device` (the runtime's [`Runtime::device_label`]) in
    /// ServerMetadata's version, e.g. `0.1.0+cuda.0`.
    ///
    /// [`Runtime::device_label`]: crate::backend::Runtime::device_label
    pub fn with_device(mut self, device: Option<&str>) -> WorkerState {
        self.server_version = server_version(device);
        self
    }

    /// Marks the worker as following a registry: it is not ready before the
    /// registry's first snapshot has been acted on, and it is ready without
    /// any model.
    pub fn follow_registry(&self) {
        self.follows_registry.store(true, Ordering::SeqCst);
        self.registry_synced.store(false, Ordering::SeqCst);
    }

    /// Records the (model, version) entries that come from the repository.
    pub fn set_repository_versions(&self, versions: BTreeSet<(String, u64)>) {
        *self
            .repository_versions
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = versions;
    }

    /// True when the repository holds that model version (loaded or not).
    pub fn in_repository(&self, model: &str, version: u64) -> bool {
        self.repository_versions
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(&(model.to_owned(), version))
    }

    /// Ready to take traffic: not draining, every repository version loaded
    /// (at least one of them when there is no registry), and, with a
    /// registry, every version of its first snapshot attempted. Versions the
    /// registry assigns later, and registry versions that failed, do not
    /// affect readiness: routers read per-version state from the index.
    pub fn ready(&self) -> bool {
        if !self.loaded.load(Ordering::SeqCst)
            || !self.registry_synced.load(Ordering::SeqCst)
            || self.draining.load(Ordering::SeqCst)
        {
            return false;
        }
        let repository = self
            .repository_versions
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if repository.is_empty() && !self.follows_registry.load(Ordering::SeqCst) {
            return false;
        }
        repository
            .iter()
            .all(|(model, version)| self.store.is_ready(model, *version))
    }
}

/// The crate version, with `device` as SemVer build metadata: `0.1.0+cpu`,
/// `0.1.0+cuda.0`. Build metadata does not change the version's precedence,
/// so clients that compare or parse Triton server versions read the same
/// version; the device label's other characters (`:`) separate identifiers,
/// which may hold only ASCII letters, digits and hyphens.
fn server_version(device: Option<&str>) -> String {
    let version = env!("CARGO_PKG_VERSION");
    let identifiers: Vec<&str> = device
        .unwrap_or_default()
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|identifier| !identifier.is_empty())
        .collect();
    if identifiers.is_empty() {
        return version.to_owned();
    }
    let separator = if version.contains('+') { '.' } else { '+' };
    format!("{version}{separator}{}", identifiers.join("."))
}

#[derive(Clone)]
pub struct WorkerService {
    state: Arc<WorkerState>,
}

impl WorkerService {
    pub fn new(state: Arc<WorkerState>) -> WorkerService {
        WorkerService { state }
    }

    fn lookup(&self, name: &str, version: &str) -> Result<Arc<ModelVersion>, Status> {
        if name.is_empty() {
            return Err(Status::invalid_argument("model name must not be empty"));
        }
        self.state
            .store
            .get(name, version)
            .map_err(|lookup| match lookup {
                Lookup::UnknownModel => Status::not_found(format!("unknown model '{name}'")),
                Lookup::UnknownVersion => {
                    Status::not_found(format!("unknown version '{version}' of model '{name}'"))
                }
                Lookup::NotReady(reason) => Status::unavailable(reason),
            })
    }
}

fn tensor_metadata(spec: &TensorSpec) -> TensorMetadata {
    TensorMetadata {
        name: spec.name.clone(),
        datatype: spec.datatype.as_str().to_owned(),
        shape: spec.dims.clone(),
    }
}

/// The batcher's errors as gRPC statuses, by their kind in the one error
/// table.
fn infer_status(error: InferError) -> Status {
    let kind = match &error {
        InferError::QueueFull(_) => ErrorKind::ResourceExhausted,
        InferError::DeadlineExceeded => ErrorKind::DeadlineExceeded,
        InferError::Unavailable(_) => ErrorKind::Unavailable,
        InferError::InvalidInput(_) => ErrorKind::InvalidArgument,
        InferError::Internal(_) => ErrorKind::Internal,
    };
    kind.status(error.to_string())
}

/// The worker's input validation: matches a request's decoded `tensors` to
/// the `signature` of `model` (its name, for messages) and returns them in
/// the signature's input order, with the batch size (rows; 1 when the model
/// does not batch).
///
/// Every signature input must be present, once, with the signature's
/// datatype and as many dimensions; a dimension the signature gives as -1
/// takes any size, the others must match. With `max_batch_size` > 0 (the
/// model batches) the first dimension is the batch instead: each input's
/// must be within 1..=`max_batch_size` and all inputs must agree on it.
/// With 0 the first dimension is checked like the others. A tensor the
/// signature does not name is refused. Errors are INVALID_ARGUMENT, name
/// the input, and are what ModelInfer answers.
///
/// The router checks async submissions with it before queueing them, with
/// `max_batch_size` 0: a model's metadata does not say whether it batches,
/// and a batching model's first dimension is always -1, so that check is
/// never stricter than the worker's.
pub fn prepare_inputs(
    model: &str,
    signature: &ModelSignature,
    max_batch_size: usize,
    mut tensors: Vec<Tensor>,
) -> Result<(Vec<Tensor>, usize), Status> {
    let batching = max_batch_size > 0;
    let mut ordered = Vec::with_capacity(signature.inputs.len());
    let mut rows: Option<usize> = None;
    for spec in &signature.inputs {
        let Some(position) = tensors.iter().position(|tensor| tensor.name == spec.name) else {
            return Err(Status::invalid_argument(format!(
                "missing input '{}' for model '{}'",
                spec.name, model
            )));
        };
        let tensor = tensors.swap_remove(position);
        if tensor.datatype != spec.datatype {
            return Err(Status::invalid_argument(format!(
                "input '{}': datatype {} does not match the model's {}",
                spec.name, tensor.datatype, spec.datatype
            )));
        }
        let shape_ok = tensor.shape.len() == spec.dims.len()
            && tensor
                .shape
                .iter()
                .zip(&spec.dims)
                .enumerate()
                .all(|(axis, (&got, &want))| want < 0 || got == want || (batching && axis == 0));
        if !shape_ok {
            return Err(Status::invalid_argument(format!(
                "input '{}': shape {:?} does not match the model's {:?}",
                spec.name, tensor.shape, spec.dims
            )));
        }
        if batching {
            let batch = tensor.shape.first().copied().unwrap_or(0);
            let batch = usize::try_from(batch).unwrap_or(0);
            if batch == 0 {
                return Err(Status::invalid_argument(format!(
                    "input '{}': batch dimension must be at least 1",
                    spec.name
                )));
            }
            if batch > max_batch_size {
                return Err(Status::invalid_argument(format!(
                    "input '{}': batch size {batch} exceeds the model's max_batch_size {}",
                    spec.name, max_batch_size
                )));
            }
            match rows {
                Some(rows) if rows != batch => {
                    return Err(Status::invalid_argument(format!(
                        "input '{}': batch size {batch} differs from the other inputs' {rows}",
                        spec.name
                    )));
                }
                _ => rows = Some(batch),
            }
        }
        ordered.push(tensor);
    }
    if let Some(extra) = tensors.first() {
        let expected: Vec<&str> = signature
            .inputs
            .iter()
            .map(|spec| spec.name.as_str())
            .collect();
        return Err(Status::invalid_argument(format!(
            "unknown input '{}' for model '{}' (inputs: {})",
            extra.name,
            model,
            expected.join(", ")
        )));
    }
    Ok((ordered, rows.unwrap_or(1)))
}

/// Names of the requested outputs, checked against the model; empty means
/// every output.
fn requested_outputs(
    model: &ModelVersion,
    request: &ModelInferRequest,
) -> Result<Vec<String>, Status> {
    let mut names = Vec::with_capacity(request.outputs.len());
    for output in &request.outputs {
        if !model
            .signature
            .outputs
            .iter()
            .any(|spec| spec.name == output.name)
        {
            return Err(Status::invalid_argument(format!(
                "unknown output '{}' for model '{}'",
                output.name, model.name
            )));
        }
        names.push(output.name.clone());
    }
    Ok(names)
}

/// The `outcome` label of a failed request: the one error table's label of
/// its code (NOT_FOUND is `not_found`, not `internal`).
fn outcome_label(status: &Status) -> &'static str {
    shamal_error::code_label(status.code())
}

#[tonic::async_trait]
impl GrpcInferenceService for WorkerService {
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
            ready: self.state.ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        let ready = match self.lookup(&request.name, &request.version) {
            Ok(_) => !self.state.draining.load(Ordering::SeqCst),
            Err(status) if status.code() == tonic::Code::Unavailable => false,
            Err(status) => return Err(status),
        };
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: self.state.server_name.clone(),
            version: self.state.server_version.clone(),
            extensions: EXTENSIONS
                .iter()
                .map(|extension| (*extension).to_owned())
                .collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let model = self.lookup(&request.name, &request.version)?;
        let versions = if request.version.is_empty() {
            self.state
                .store
                .ready_versions(&model.name)
                .iter()
                .map(|version| version.version_label())
                .collect()
        } else {
            vec![model.version_label()]
        };
        Ok(Response::new(ModelMetadataResponse {
            name: model.name.clone(),
            versions,
            platform: model.platform.to_owned(),
            inputs: model.signature.inputs.iter().map(tensor_metadata).collect(),
            outputs: model
                .signature
                .outputs
                .iter()
                .map(tensor_metadata)
                .collect(),
        }))
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let request = request.into_inner();
        let model = self.lookup(&request.name, &request.version)?;
        let mut config = model.config.clone();
        crate::settings::report_device(&mut config, model.batcher.device());
        Ok(Response::new(ModelConfigResponse {
            config: Some(config),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let received = Instant::now();
        let deadline = request_timeout(request.metadata()).map(|timeout| received + timeout);
        let request_id = request
            .metadata()
            .get(shamal_rpc::REQUEST_ID_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let mut request = request.into_inner();
        let model = self.lookup(&request.model_name, &request.model_version)?;
        let result = async {
            let requested = requested_outputs(&model, &request)?;
            let inputs = std::mem::take(&mut request.inputs);
            let raw = std::mem::take(&mut request.raw_input_contents);
            let tensors = decode_inputs(inputs, raw).map_err(|error| codec_status(&error))?;
            let (tensors, rows) = prepare_inputs(
                &model.name,
                &model.signature,
                model.settings.max_batch_size,
                tensors,
            )?;
            let queued = model.batcher.infer(tensors, rows, deadline);
            model.stats.set_queue_depth(model.batcher.queue_depth() + 1);
            let outputs = queued.await;
            model.stats.set_queue_depth(model.batcher.queue_depth());
            let mut outputs = outputs.map_err(infer_status)?;
            if !requested.is_empty() {
                let mut selected = Vec::with_capacity(requested.len());
                for name in &requested {
                    if let Some(position) = outputs.iter().position(|tensor| &tensor.name == name) {
                        selected.push(outputs.swap_remove(position));
                    }
                }
                outputs = selected;
            }
            Ok::<_, Status>(outputs)
        }
        .await;
        let elapsed = received.elapsed();
        match result {
            Ok(outputs) => {
                model.stats.record_request(elapsed, "ok");
                let (outputs, raw_output_contents) = encode_outputs(&outputs);
                Ok(Response::new(ModelInferResponse {
                    model_name: model.name.clone(),
                    model_version: model.version_label(),
                    id: request.id,
                    parameters: Default::default(),
                    outputs,
                    raw_output_contents,
                }))
            }
            Err(status) => {
                model.stats.record_request(elapsed, outcome_label(&status));
                let request_id = request_id.as_deref().unwrap_or("-");
                if status.code() == tonic::Code::Internal {
                    tracing::error!(request_id, model = %model.name, version = model.version, message = status.message(), "inference failed");
                } else {
                    tracing::debug!(request_id, model = %model.name, version = model.version, code = ?status.code(), message = status.message(), "inference refused");
                }
                Err(status)
            }
        }
    }

    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let request = request.into_inner();
        let model_stats = if request.name.is_empty() {
            self.state
                .store
                .index()
                .into_iter()
                .filter_map(|(_, _, state)| match state {
                    VersionState::Ready(model) => Some(model.stats.snapshot()),
                    _ => None,
                })
                .collect()
        } else if request.version.is_empty() {
            self.lookup(&request.name, "")?;
            self.state
                .store
                .ready_versions(&request.name)
                .iter()
                .map(|model| model.stats.snapshot())
                .collect()
        } else {
            vec![
                self.lookup(&request.name, &request.version)?
                    .stats
                    .snapshot(),
            ]
        };
        Ok(Response::new(ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let ready_only = request.into_inner().ready;
        // A draining worker lists its models as unavailable, so routers stop
        // sending it work before it goes.
        let draining = self.state.draining.load(Ordering::SeqCst);
        let models = self
            .state
            .store
            .index()
            .into_iter()
            .filter_map(|(name, version, state)| {
                let (state, reason) = if draining {
                    ("UNAVAILABLE", "worker is draining".to_owned())
                } else {
                    state.describe()
                };
                if ready_only && state != "READY" {
                    return None;
                }
                Some(ModelIndex {
                    name,
                    version: version.to_string(),
                    state: state.to_owned(),
                    reason,
                })
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_is_build_metadata_of_the_server_version() {
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(server_version(None), version);
        assert_eq!(server_version(Some("")), version);
        assert_eq!(server_version(Some("cpu")), format!("{version}+cpu"));
        assert_eq!(server_version(Some("cuda:0")), format!("{version}+cuda.0"));
        assert_eq!(
            server_version(Some("cuda:1 (H200)")),
            format!("{version}+cuda.1.H200")
        );
        let state = WorkerState::new("worker").with_device(Some("cuda:0"));
        assert_eq!(state.server_version, format!("{version}+cuda.0"));
    }

    /// The worker once labelled every code it did not list (NOT_FOUND
    /// among them) `internal` in its request metrics.
    #[test]
    fn outcome_labels_name_the_code() {
        assert_eq!(outcome_label(&Status::not_found("gone")), "not_found");
        assert_eq!(
            outcome_label(&Status::failed_precondition("p")),
            "failed_precondition"
        );
        assert_eq!(outcome_label(&Status::internal("bug")), "internal");
    }

    #[test]
    fn batcher_errors_keep_their_codes_and_messages() {
        let cases = [
            (
                InferError::QueueFull("m".to_owned()),
                tonic::Code::ResourceExhausted,
            ),
            (InferError::DeadlineExceeded, tonic::Code::DeadlineExceeded),
            (
                InferError::Unavailable("m".to_owned()),
                tonic::Code::Unavailable,
            ),
            (
                InferError::InvalidInput("bad".to_owned()),
                tonic::Code::InvalidArgument,
            ),
            (
                InferError::Internal("bug".to_owned()),
                tonic::Code::Internal,
            ),
        ];
        for (error, code) in cases {
            let message = error.to_string();
            let status = infer_status(error);
            assert_eq!((status.code(), status.message()), (code, message.as_str()));
        }
    }
}
