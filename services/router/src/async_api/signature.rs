//! The check of a submission's tensors against its model's signature,
//! before it is queued, so that a malformed request is refused at once
//! rather than failing later in the queue. The check is the worker's own
//! ([`shamal_worker::service::prepare_inputs`]), on the signature the
//! model's metadata reports, so both answer the same request the same way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shamal_proto::inference::model_infer_request::InferRequestedOutputTensor;
use shamal_proto::inference::model_metadata_response::TensorMetadata;
use shamal_proto::inference::{ModelInferRequest, ModelMetadataResponse};
use shamal_tensor::{DataType, Tensor};
use shamal_worker::{ModelSignature, TensorSpec};
use tonic::{Code, Status};

use super::AsyncApi;
use crate::forward::CallContext;

/// How long a model's signature, read from a worker, is trusted for
/// checking submissions.
const SIGNATURE_TTL: Duration = Duration::from_secs(5);

/// Above this many entries, expired ones are dropped before inserting.
const SIGNATURE_CACHE_SWEEP: usize = 1024;

/// A model (version)'s signature and when it was read.
type CachedSignature = (Instant, Arc<ModelSignature>);

/// Signatures by (model, version).
#[derive(Default)]
pub(super) struct SignatureCache(Mutex<HashMap<(String, String), CachedSignature>>);

impl SignatureCache {
    /// The signature cached for `key`, unless older than [`SIGNATURE_TTL`].
    fn fresh(&self, key: &(String, String)) -> Option<Arc<ModelSignature>> {
        let cache = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        cache
            .get(key)
            .filter(|(read, _)| read.elapsed() < SIGNATURE_TTL)
            .map(|(_, signature)| signature.clone())
    }

    fn insert(&self, key: (String, String), signature: Arc<ModelSignature>) {
        let mut cache = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Bounded by the models and versions workers serve; stale entries
        // are dropped as they are replaced or when the cache grows.
        if cache.len() > SIGNATURE_CACHE_SWEEP {
            cache.retain(|_, (read, _)| read.elapsed() < SIGNATURE_TTL);
        }
        cache.insert(key, (Instant::now(), signature));
    }
}

impl AsyncApi {
    /// Decodes the request's tensors and checks them against the model's
    /// signature (see [`check_signature`]). A signature that cannot be read
    /// skips the second check (the worker still makes it); an unknown model
    /// or version is refused.
    pub(super) async fn check_tensors(
        &self,
        request: &ModelInferRequest,
        context: &CallContext,
    ) -> Result<(), Status> {
        let tensors = shamal_tensor::decode_inputs(
            request.inputs.clone(),
            request.raw_input_contents.clone(),
        )
        .map_err(|error| shamal_rpc::codec_status(&error))?;
        let signature = match self
            .signature(&request.model_name, &request.model_version, context)
            .await
        {
            Ok(signature) => signature,
            Err(status) if status.code() == Code::NotFound => return Err(status),
            Err(status) => {
                tracing::debug!(model = %request.model_name, %status, "signature unavailable; tensors checked by the worker");
                return Ok(());
            }
        };
        check_signature(&signature, &request.model_name, tensors, &request.outputs)
    }

    /// The signature of `model` (`version`), from the cache or read from a
    /// worker serving it.
    async fn signature(
        &self,
        model: &str,
        version: &str,
        context: &CallContext,
    ) -> Result<Arc<ModelSignature>, Status> {
        let key = (model.to_owned(), version.to_owned());
        if let Some(signature) = self.signatures.fresh(&key) {
            return Ok(signature);
        }
        let metadata = self.core.model_metadata(model, version, context).await?;
        let signature = Arc::new(signature_of(&metadata).ok_or_else(|| {
            Status::unavailable(format!(
                "the metadata of model '{model}' names a datatype this router does not know"
            ))
        })?);
        self.signatures.insert(key, signature.clone());
        Ok(signature)
    }
}

/// The signature a model's metadata reports, as the worker holds it (the
/// worker reports its signature unchanged: a batching model's first
/// dimension is -1). `None` when a datatype is not one this router knows.
pub(super) fn signature_of(metadata: &ModelMetadataResponse) -> Option<ModelSignature> {
    let specs = |tensors: &[TensorMetadata]| -> Option<Vec<TensorSpec>> {
        tensors
            .iter()
            .map(|tensor| {
                Some(TensorSpec {
                    name: tensor.name.clone(),
                    datatype: DataType::parse(&tensor.datatype)?,
                    dims: tensor.shape.clone(),
                })
            })
            .collect()
    };
    Some(ModelSignature {
        inputs: specs(&metadata.inputs)?,
        outputs: specs(&metadata.outputs)?,
    })
}

/// Checks a request's requested outputs and decoded inputs against the
/// signature of `model`, as the worker does and in its order (outputs
/// first), with its messages: INVALID_ARGUMENT naming the tensor.
///
/// Inputs go through the worker's own validation with `max_batch_size` 0:
/// the metadata does not say whether the model batches, and the first
/// dimension of a batching model is -1 (any size), so the check is never
/// stricter than the worker's; the batch size limits are left to it.
pub(super) fn check_signature(
    signature: &ModelSignature,
    model: &str,
    inputs: Vec<Tensor>,
    outputs: &[InferRequestedOutputTensor],
) -> Result<(), Status> {
    // The worker's `requested_outputs`, which works on a loaded model
    // rather than a signature; same test, same message.
    if let Some(extra) = outputs.iter().find(|output| {
        !signature
            .outputs
            .iter()
            .any(|spec| spec.name == output.name)
    }) {
        return Err(Status::invalid_argument(format!(
            "unknown output '{}' for model '{model}'",
            extra.name
        )));
    }
    shamal_worker::service::prepare_inputs(model, signature, 0, inputs).map(|_| ())
}

#[cfg(test)]
mod tests {
    use shamal_tensor::TensorData;

    use super::*;

    fn metadata(tensor: impl Fn(&str, &str, &[i64]) -> TensorMetadata) -> ModelMetadataResponse {
        ModelMetadataResponse {
            name: "simple".into(),
            versions: vec!["1".into()],
            platform: "onnxruntime_onnx".into(),
            inputs: vec![
                tensor("INPUT0", "INT32", &[1, 16]),
                tensor("INPUT1", "INT32", &[-1, 16]),
            ],
            outputs: vec![tensor("OUTPUT0", "INT32", &[-1, 16])],
        }
    }

    fn tensor_metadata(name: &str, datatype: &str, shape: &[i64]) -> TensorMetadata {
        TensorMetadata {
            name: name.to_owned(),
            datatype: datatype.to_owned(),
            shape: shape.to_vec(),
        }
    }

    /// A zero-filled tensor of 4-byte elements.
    fn tensor(name: &str, datatype: DataType, shape: &[i64]) -> Tensor {
        let elements: i64 = shape.iter().product();
        Tensor {
            name: name.to_owned(),
            datatype,
            shape: shape.to_vec(),
            data: TensorData::Fixed(vec![0; usize::try_from(elements).unwrap() * 4].into()),
        }
    }

    fn output(name: &str) -> InferRequestedOutputTensor {
        InferRequestedOutputTensor {
            name: name.to_owned(),
            parameters: Default::default(),
        }
    }

    #[test]
    fn signature_check_is_the_workers_and_names_the_tensor() {
        let signature = signature_of(&metadata(tensor_metadata)).unwrap();
        let input0 = || tensor("INPUT0", DataType::Int32, &[1, 16]);
        let input1 = || tensor("INPUT1", DataType::Int32, &[4, 16]);
        // A -1 dimension takes any size.
        check_signature(
            &signature,
            "simple",
            vec![input1(), input0()],
            &[output("OUTPUT0")],
        )
        .unwrap();
        let cases: [(Vec<Tensor>, Vec<InferRequestedOutputTensor>, &str); 6] = [
            (vec![input0()], vec![], "missing input 'INPUT1'"),
            (
                vec![tensor("INPUT0", DataType::Fp32, &[1, 16]), input1()],
                vec![],
                "input 'INPUT0': datatype FP32",
            ),
            (
                vec![tensor("INPUT0", DataType::Int32, &[1, 8]), input1()],
                vec![],
                "input 'INPUT0': shape [1, 8]",
            ),
            // A fixed first dimension is checked like any other: the
            // worker refuses it too.
            (
                vec![tensor("INPUT0", DataType::Int32, &[4, 16]), input1()],
                vec![],
                "input 'INPUT0': shape [4, 16]",
            ),
            (
                vec![input0(), input1(), tensor("EXTRA", DataType::Int32, &[1])],
                vec![],
                "unknown input 'EXTRA'",
            ),
            // Outputs are checked first, as the worker does.
            (
                vec![input0()],
                vec![output("NOPE")],
                "unknown output 'NOPE'",
            ),
        ];
        for (inputs, outputs, expected) in cases {
            let status = check_signature(&signature, "simple", inputs, &outputs).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(status.message().contains(expected), "{status}");
        }
    }

    #[test]
    fn metadata_gives_the_workers_signature() {
        let signature = signature_of(&metadata(tensor_metadata)).unwrap();
        assert_eq!(signature.inputs[1].datatype, DataType::Int32);
        assert_eq!(signature.inputs[1].dims, [-1, 16]);
        assert_eq!(signature.outputs[0].name, "OUTPUT0");
        // A datatype this router does not know: no signature, so the worker
        // alone checks.
        let unknown = metadata(|name, _, shape| tensor_metadata(name, "FP8", shape));
        assert!(signature_of(&unknown).is_none());
    }
}
