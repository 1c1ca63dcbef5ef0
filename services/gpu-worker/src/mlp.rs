//! The MLP classifier/regressor: linear layers with an activation between
//! them, then logits, softmax or identity.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor};

use crate::spec::{Activation, MlpSpec, OutputKind};
use crate::weights::Error;

/// One linear layer, its weight kept transposed (`[in, out]`) so that the
/// forward pass is a plain `x @ w`.
struct Linear {
    weight_t: Tensor,
    bias: Tensor,
}

/// A loaded MLP on its device.
pub struct Mlp {
    layers: Vec<Linear>,
    activation: Activation,
    output: OutputKind,
    input_dim: usize,
    dtype: DType,
    device: Device,
}

fn layer_weight(index: usize) -> String {
    format!("layers.{index}.weight")
}

fn layer_bias(index: usize) -> String {
    format!("layers.{index}.bias")
}

impl Mlp {
    /// Loads the weights of `spec` from a safetensors file onto `device` in
    /// `dtype`, checking every tensor's presence, dtype and shape.
    pub fn load(
        spec: &MlpSpec,
        weights: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Mlp, Error> {
        // Read on the CPU first: validation needs no device memory, and a
        // malformed file is reported before anything reaches the GPU.
        let mut tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load(weights, &Device::Cpu).map_err(|source| {
                Error::Read {
                    path: weights.to_owned(),
                    source,
                }
            })?;
        let mut layers = Vec::new();
        for (index, (input, output)) in spec.layer_dims().into_iter().enumerate() {
            let weight = take(&mut tensors, &layer_weight(index), &[output, input])?;
            let bias = take(&mut tensors, &layer_bias(index), &[output])?;
            let weight_t = weight
                .t()
                .and_then(|weight| weight.contiguous())
                .and_then(|weight| weight.to_dtype(dtype))
                .and_then(|weight| weight.to_device(device))
                .map_err(|source| Error::Place {
                    name: layer_weight(index),
                    source,
                })?;
            let bias = bias
                .to_dtype(dtype)
                .and_then(|bias| bias.to_device(device))
                .map_err(|source| Error::Place {
                    name: layer_bias(index),
                    source,
                })?;
            layers.push(Linear { weight_t, bias });
        }
        if !tensors.is_empty() {
            return Err(Error::Unused {
                path: weights.to_owned(),
                names: tensors.into_keys().collect(),
            });
        }
        Ok(Mlp {
            layers,
            activation: spec.activation,
            output: spec.output,
            input_dim: spec.input_dim,
            dtype,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the model on `rows` rows of `input_dim` values, returning
    /// `rows * output_dim` values.
    pub fn forward(&self, values: Vec<f32>, rows: usize) -> candle_core::Result<Vec<f32>> {
        let mut x =
            Tensor::from_vec(values, (rows, self.input_dim), &self.device)?.to_dtype(self.dtype)?;
        let last = self.layers.len() - 1;
        for (index, layer) in self.layers.iter().enumerate() {
            x = x.matmul(&layer.weight_t)?.broadcast_add(&layer.bias)?;
            if index < last {
                x = match self.activation {
                    Activation::Relu => x.relu()?,
                    Activation::Gelu => x.gelu_erf()?,
                    Activation::Tanh => x.tanh()?,
                };
            }
        }
        let mut x = x.to_dtype(DType::F32)?;
        if self.output == OutputKind::Softmax {
            let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?;
            let exp = shifted.exp()?;
            x = exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?;
        }
        x.flatten_all()?.to_vec1::<f32>()
    }
}

fn take(
    tensors: &mut HashMap<String, Tensor>,
    name: &str,
    shape: &[usize],
) -> Result<Tensor, Error> {
    let tensor = tensors.remove(name).ok_or_else(|| Error::Missing {
        name: name.to_owned(),
        shape: shape.to_vec(),
    })?;
    if tensor.dtype() != DType::F32 {
        return Err(Error::NotF32 {
            name: name.to_owned(),
            dtype: tensor.dtype(),
        });
    }
    if tensor.dims() != shape {
        return Err(Error::Shape {
            name: name.to_owned(),
            shape: tensor.dims().to_vec(),
            expected: shape.to_vec(),
        });
    }
    Ok(tensor)
}
