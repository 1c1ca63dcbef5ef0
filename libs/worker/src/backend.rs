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

/// Where a backend instance computes, as the model configuration's
/// `instance_group` reports it (Triton's `KIND_CPU`, or `KIND_GPU` with the
/// device in `gpus`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InstanceDevice {
    #[default]
    Cpu,
    /// A GPU, by ordinal.
    Gpu(u32),
}

/// An input axis (never the batch axis 0) along which requests of different
/// sizes may share a batch; see [`Backend::ragged_axes`]. `input` indexes
/// the model's inputs in signature order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RaggedAxis {
    pub input: usize,
    pub axis: usize,
}

/// One instance of a loaded model. Each instance has a thread of its own
/// and is called by one thread at a time, so `infer` may block and needs no
/// interior synchronisation.
pub trait Backend: Send + 'static {
    /// Runs one model execution. Inputs arrive in signature order; with
    /// batching, their first dimension is the sum over the batched requests
    /// and every output must carry the same first dimension.
    fn infer(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, BackendError>;

    /// Checks one request's inputs before it joins a batch. The batcher
    /// calls it for every request it is about to run (batched or not); a
    /// request refused here is answered with this error on its own, and the
    /// rest of its batch runs without it. Default: every request is
    /// accepted, and `infer` alone judges (failing the whole batch).
    fn check(&self, _inputs: &[Tensor]) -> Result<(), BackendError> {
        Ok(())
    }

    /// Input axes whose size may differ between the requests of one batch
    /// (sequence lengths of token ids, say). The batcher puts such requests
    /// in one batch and zero-pads those inputs, at the end of the axis, to
    /// the largest size in the batch, so the model must read zeros there as
    /// absent (an attention mask that is 0 over the padding). Only inputs of
    /// fixed-size datatypes are padded. Outputs are split by rows as usual,
    /// so they must not depend on the padded size. Default: none, and
    /// requests of different shapes never share a batch.
    fn ragged_axes(&self) -> Vec<RaggedAxis> {
        Vec::new()
    }

    /// Where this instance computes; reported in the model configuration.
    /// Default: the CPU.
    fn device(&self) -> InstanceDevice {
        InstanceDevice::Cpu
    }

    /// Whether `infer` may be called from threads other than the instance's
    /// own (still one at a time): the batcher then runs an idle model's
    /// short requests on the caller's thread. Default: no, for engines bound
    /// to a thread (a GPU context, say).
    fn runs_on_any_thread(&self) -> bool {
        false
    }
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
    /// The device the runtime's instances compute on unless a model pins
    /// another (`cpu`, `cuda:0`); ServerMetadata reports it as build
    /// metadata of the server version (`0.1.0+cuda.0`). Default: none, and
    /// the version is reported bare.
    fn device_label(&self) -> Option<String> {
        None
    }
    /// Creates one instance of the model.
    fn instantiate(
        &self,
        model_file: &Path,
        options: &InstanceOptions,
    ) -> Result<Box<dyn Backend>, BackendError>;
}
