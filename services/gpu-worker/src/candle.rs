//! The candle runtime: safetensors models (see [`crate::spec`]) on a candle
//! device behind the shared [`Runtime`]/[`Backend`] traits.

use std::path::Path;

use bytes::Bytes;
use candle_core::Device;
use shamal_tensor::{DataType, Tensor, TensorData};
use shamal_worker::backend::InstanceDevice;
use shamal_worker::{Backend, BackendError, InstanceOptions, ModelSignature, Runtime, TensorSpec};

use crate::bert::BertEncoder;
use crate::device;
use crate::encoder::{EncoderBackend, load_tokenizer};
use crate::mlp::Mlp;
use crate::spec::{EncoderInputs, LocatedSpec, ModelSpec, encoder_io, read_spec};

#[cfg(target_endian = "big")]
compile_error!(
    "the candle backend moves tensor bytes as little-endian and needs a little-endian target"
);

/// The candle model runtime. Every model of the worker shares its device,
/// unless its spec pins `"device": "cpu"`.
pub struct CandleRuntime {
    device: Device,
}

impl CandleRuntime {
    pub fn new(device: Device) -> CandleRuntime {
        CandleRuntime { device }
    }

    /// The worker's device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The spec of a model file, the device it runs on and its compute
    /// dtype; refuses a model that asks for a device or dtype this worker
    /// cannot give it.
    fn located(
        &self,
        model_file: &Path,
    ) -> Result<(LocatedSpec, Device, candle_core::DType), BackendError> {
        let located = read_spec(model_file).map_err(invalid)?;
        let device = device::for_model(&self.device, located.spec.device()).map_err(invalid)?;
        let dtype = device::compute_dtype(located.spec.dtype(), &device).map_err(invalid)?;
        Ok((located, device, dtype))
    }
}

/// A model that cannot be loaded as its files and spec stand: the backend's
/// `InvalidInput`, with the typed error's message (as before the errors were
/// typed, so the load failure a client reads is unchanged).
fn invalid(error: impl std::fmt::Display) -> BackendError {
    BackendError::InvalidInput(error.to_string())
}

fn dim(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn tensor_spec(name: &str, datatype: DataType, dims: Vec<i64>) -> TensorSpec {
    TensorSpec {
        name: name.to_owned(),
        datatype,
        dims,
    }
}

impl Runtime for CandleRuntime {
    fn platform(&self) -> &'static str {
        "candle"
    }

    fn backend(&self) -> &'static str {
        "candle"
    }

    fn model_filename(&self) -> &'static str {
        "model.json"
    }

    fn formats(&self) -> &'static [&'static str] {
        &["safetensors"]
    }

    /// `cpu` or `cuda:<ordinal>`: ServerMetadata's version then ends in
    /// `+cpu` or `+cuda.<ordinal>`.
    fn device_label(&self) -> Option<String> {
        Some(device::label(&self.device))
    }

    fn signature(&self, model_file: &Path) -> Result<ModelSignature, BackendError> {
        let (located, _, _) = self.located(model_file)?;
        Ok(match &located.spec {
            ModelSpec::Mlp(spec) => ModelSignature {
                inputs: vec![tensor_spec(
                    &spec.input_name,
                    DataType::Fp32,
                    vec![-1, dim(spec.input_dim)],
                )],
                outputs: vec![tensor_spec(
                    &spec.output_name,
                    DataType::Fp32,
                    vec![-1, dim(spec.output_dim)],
                )],
            },
            ModelSpec::BertEncoder(spec) => ModelSignature {
                inputs: match spec.inputs {
                    EncoderInputs::TokenIds => vec![
                        tensor_spec(encoder_io::INPUT_IDS, DataType::Int64, vec![-1, -1]),
                        tensor_spec(encoder_io::ATTENTION_MASK, DataType::Int64, vec![-1, -1]),
                    ],
                    EncoderInputs::Text => {
                        vec![tensor_spec(encoder_io::TEXT, DataType::Bytes, vec![-1])]
                    }
                },
                outputs: vec![tensor_spec(
                    encoder_io::EMBEDDING,
                    DataType::Fp32,
                    vec![-1, dim(spec.hidden)],
                )],
            },
        })
    }

    fn instantiate(
        &self,
        model_file: &Path,
        _options: &InstanceOptions,
    ) -> Result<Box<dyn Backend>, BackendError> {
        let (located, device, dtype) = self.located(model_file)?;
        let architecture = located.spec.architecture();
        let backend: Box<dyn Backend> = match located.spec {
            ModelSpec::Mlp(spec) => {
                let model = Mlp::load(&spec, &located.weights, &device, dtype).map_err(invalid)?;
                Box::new(MlpBackend {
                    model,
                    input_name: spec.input_name,
                    input_dim: spec.input_dim,
                    output_name: spec.output_name,
                    output_dim: spec.output_dim,
                })
            }
            ModelSpec::BertEncoder(spec) => {
                let tokenizer = load_tokenizer(&spec, located.tokenizer.as_ref(), model_file)
                    .map_err(invalid)?;
                let model =
                    BertEncoder::load(&spec, &located.weights, &device, dtype).map_err(invalid)?;
                Box::new(EncoderBackend::new(model, &spec, tokenizer).map_err(invalid)?)
            }
        };
        tracing::info!(
            model_file = %model_file.display(),
            architecture,
            device = %device::label(&device),
            dtype = ?dtype,
            "candle model instance created"
        );
        Ok(backend)
    }
}

/// One instance of an MLP.
pub struct MlpBackend {
    model: Mlp,
    input_name: String,
    input_dim: usize,
    output_name: String,
    output_dim: usize,
}

impl MlpBackend {
    /// The device this instance computes on.
    pub fn candle_device(&self) -> &Device {
        self.model.device()
    }
}

impl Backend for MlpBackend {
    fn device(&self) -> InstanceDevice {
        device::instance_device(self.model.device())
    }

    fn infer(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, BackendError> {
        let [input] = <[Tensor; 1]>::try_from(inputs).map_err(|inputs| {
            BackendError::InvalidInput(format!(
                "the model takes 1 input ('{}'), got {}",
                self.input_name,
                inputs.len()
            ))
        })?;
        if input.datatype != DataType::Fp32 {
            return Err(BackendError::InvalidInput(format!(
                "input '{}' must be FP32, got {}",
                input.name,
                input.datatype.as_str()
            )));
        }
        let rows = match input.shape.as_slice() {
            [rows, width] if usize::try_from(*width).ok() == Some(self.input_dim) => {
                usize::try_from(*rows).unwrap_or(0)
            }
            shape => {
                return Err(BackendError::InvalidInput(format!(
                    "input '{}' must have shape [-1, {}], got {shape:?}",
                    input.name, self.input_dim
                )));
            }
        };
        let TensorData::Fixed(bytes) = &input.data else {
            return Err(BackendError::InvalidInput(format!(
                "input '{}' carries no FP32 data",
                input.name
            )));
        };
        let values: Vec<f32> = if rows == 0 {
            Vec::new()
        } else {
            let values: Vec<f32> = bytemuck::pod_collect_to_vec(bytes);
            self.model
                .forward(values, rows)
                .map_err(|error| BackendError::Internal(error.to_string()))?
        };
        let rows = i64::try_from(rows).unwrap_or(i64::MAX);
        let width = i64::try_from(self.output_dim).unwrap_or(i64::MAX);
        Ok(vec![Tensor {
            name: self.output_name.clone(),
            datatype: DataType::Fp32,
            shape: vec![rows, width],
            data: TensorData::Fixed(Bytes::copy_from_slice(bytemuck::cast_slice(&values))),
        }])
    }
}
