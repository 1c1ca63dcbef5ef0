//! The `"mlp"` architecture's spec: a classifier or regressor.

use serde::{Deserialize, Serialize};

use super::error::{Error, check_dim, check_file_name};
use super::{DType, DevicePreference, MAX_DIM};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    /// Exact GELU, `x * (1 + erf(x / sqrt 2)) / 2`.
    Gelu,
    Tanh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// Raw scores of a classifier.
    Logits,
    /// Probabilities of a classifier (softmax over the last dimension).
    Softmax,
    /// Values of a regressor.
    Identity,
}

fn default_input_name() -> String {
    "INPUT".to_owned()
}

fn default_output_name() -> String {
    "OUTPUT".to_owned()
}

/// An MLP classifier or regressor.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MlpSpec {
    #[serde(default = "default_input_name")]
    pub input_name: String,
    #[serde(default = "default_output_name")]
    pub output_name: String,
    pub input_dim: usize,
    #[serde(default)]
    pub hidden: Vec<usize>,
    pub output_dim: usize,
    pub activation: Activation,
    pub output: OutputKind,
    #[serde(default)]
    pub dtype: DType,
    #[serde(default)]
    pub device: DevicePreference,
    /// Weights file relative to the spec; `model.safetensors` by default.
    /// Ignored for a spec embedded in a `.safetensors` file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
}

impl MlpSpec {
    /// Checks the spec's fields, naming the one at fault.
    pub fn validate(&self) -> Result<(), Error> {
        for (field, name) in [
            ("input_name", &self.input_name),
            ("output_name", &self.output_name),
        ] {
            if name.trim().is_empty() {
                return Err(Error::EmptyName { field });
            }
        }
        if self.input_name == self.output_name {
            return Err(Error::SameNames);
        }
        let dims = std::iter::once(("input_dim", self.input_dim))
            .chain(self.hidden.iter().map(|&dim| ("hidden", dim)))
            .chain(std::iter::once(("output_dim", self.output_dim)));
        for (field, dim) in dims {
            check_dim(field, dim, MAX_DIM)?;
        }
        if let Some(weights) = &self.weights {
            check_file_name("weights", weights)?;
        }
        Ok(())
    }

    /// `(in, out)` of every linear layer, first to last.
    pub fn layer_dims(&self) -> Vec<(usize, usize)> {
        let widths: Vec<usize> = std::iter::once(self.input_dim)
            .chain(self.hidden.iter().copied())
            .chain(std::iter::once(self.output_dim))
            .collect();
        widths.windows(2).map(|pair| (pair[0], pair[1])).collect()
    }
}
