//! The candle runtime: safetensors models (see [`crate::spec`]) on a candle
//! device behind the shared [`Runtime`]/[`Backend`] traits.

use std::path::Path;

use bytes::Bytes;
use candle_core::Device;
use shamal_tensor::{DataType, Tensor, TensorData};
use shamal_worker::{Backend, BackendError, InstanceOptions, ModelSignature, Runtime, TensorSpec};

use crate::device;
use crate::mlp::Mlp;
use crate::spec::{Architecture, LocatedSpec, read_spec};

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

    /// `cpu` or `cuda:<ordinal>`.
    pub fn device_label(&self) -> String {
        device::label(&self.device)
    }

    fn located(&self, model_file: &Path) -> Result<(LocatedSpec, Device), BackendError> {
        let located = read_spec(model_file).map_err(BackendError::InvalidInput)?;
        let device = device::for_model(&self.device, located.spec.device)
            .map_err(BackendError::InvalidInput)?;
        Ok((located, device))
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

    fn signature(&self, model_file: &Path) -> Result<ModelSignature, BackendError> {
        let (located, _) = self.located(model_file)?;
        let spec = &located.spec;
        let dim = |value: usize| i64::try_from(value).unwrap_or(i64::MAX);
        Ok(ModelSignature {
            inputs: vec![TensorSpec {
                name: spec.input_name.clone(),
                datatype: DataType::Fp32,
                dims: vec![-1, dim(spec.input_dim)],
            }],
            outputs: vec![TensorSpec {
                name: spec.output_name.clone(),
                datatype: DataType::Fp32,
                dims: vec![-1, dim(spec.output_dim)],
            }],
        })
    }

    fn instantiate(
        &self,
        model_file: &Path,
        _options: &InstanceOptions,
    ) -> Result<Box<dyn Backend>, BackendError> {
        let (located, device) = self.located(model_file)?;
        let spec = located.spec;
        match spec.architecture {
            Architecture::Mlp => {
                let model = Mlp::load(&spec, &located.weights, &device)
                    .map_err(BackendError::InvalidInput)?;
                tracing::info!(
                    model_file = %model_file.display(),
                    device = %device::label(&device),
                    "candle model instance created"
                );
                Ok(Box::new(MlpBackend {
                    model,
                    input_name: spec.input_name,
                    input_dim: spec.input_dim,
                    output_name: spec.output_name,
                    output_dim: spec.output_dim,
                }))
            }
        }
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
    pub fn device(&self) -> &Device {
        self.model.device()
    }
}

impl Backend for MlpBackend {
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
