//! The compute contract every runtime (ONNX Runtime, candle, ...) implements.

use std::collections::HashMap;
use std::path::Path;

use shamal_tensor::{DataType, Tensor};

/// One input or output of a model. `dims` includes the batch dimension when
/// the model batches; -1 marks a variable dimension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub dims: Vec<i64>,
}

/// What a model file declares about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSignature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

impl ModelSignature {
    /// True when every input and output has a variable first dimension, so
    /// requests can be stacked along it.
    pub fn supports_batching(&self) -> bool {
        self.inputs
            .iter()
            .chain(&self.outputs)
            .all(|spec| spec.dims.first() == Some(&-1))
    }
}

/// A failure inside a backend. The message is returned to the client, so it
/// must not leak internals beyond what helps fix the request.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request was acceptable to the codec but the model refused it.
    #[error("{0}")]
    InvalidInput(String),
    /// The runtime failed.
    #[error("{0}")]
    Internal(String),
}

/// One instance of a loaded model. Each instance lives on its own thread, so
/// `infer` may block and needs no interior synchronisation.
pub trait Backend: Send + 'static {
    /// Runs one model execution. Inputs arrive in signature order; with
    /// batching, their first dimension is the sum over the batched requests
    /// and every output must carry the same first dimension.
    fn infer(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, BackendError>;
}

/// Per-model settings a runtime may use (from the model's configuration).
#[derive(Clone, Debug, Default)]
pub struct InstanceOptions {
    /// Free-form `parameters` of the model configuration.
    pub parameters: HashMap<String, String>,
}

/// A model runtime: reads model files and creates backend instances.
pub trait Runtime: Send + Sync + 'static {
    /// Triton platform string reported in metadata, e.g. `onnxruntime_onnx`.
    fn platform(&self) -> &'static str;
    /// Triton backend name reported in the model configuration.
    fn backend(&self) -> &'static str;
    /// File name looked for in a version directory, e.g. `model.onnx`.
    fn model_filename(&self) -> &'static str;
    /// Registry artifact formats this runtime loads (`onnx`, `safetensors`).
    fn formats(&self) -> &'static [&'static str];
    /// Reads the model's signature from its file.
    fn signature(&self, model_file: &Path) -> Result<ModelSignature, BackendError>;
    /// Creates one instance of the model.
    fn instantiate(
        &self,
        model_file: &Path,
        options: &InstanceOptions,
    ) -> Result<Box<dyn Backend>, BackendError>;
}
