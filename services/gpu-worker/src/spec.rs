//! The model spec: a small JSON document describing the architecture and
//! dimensions of a safetensors model.
//!
//! A version directory holds `model.json` (the spec) and the weights it names
//! (`model.safetensors` by default):
//!
//! ```json
//! {
//!   "architecture": "mlp",
//!   "input_name": "INPUT",
//!   "output_name": "OUTPUT",
//!   "input_dim": 16,
//!   "hidden": [32, 32],
//!   "output_dim": 4,
//!   "activation": "relu",
//!   "output": "softmax",
//!   "dtype": "float32",
//!   "device": "auto"
//! }
//! ```
//!
//! The weights of layer `i` (0 to `hidden.len()`) are `layers.{i}.weight`,
//! shaped `[out, in]` as in PyTorch's `nn.Linear`, and `layers.{i}.bias`,
//! shaped `[out]`, all F32. The activation follows every layer but the last;
//! `output` is applied to the last layer's result.
//!
//! A single `.safetensors` file (the registry's artifact format) carries the
//! same spec as a JSON string in its header metadata under
//! [`SPEC_METADATA_KEY`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Header metadata key of a `.safetensors` file that embeds its spec.
pub const SPEC_METADATA_KEY: &str = "shamal.model_spec";

/// Default weights file, next to `model.json`.
pub const DEFAULT_WEIGHTS: &str = "model.safetensors";

/// Largest layer width accepted (guards against absurd specs).
const MAX_DIM: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Mlp,
}

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Float32,
}

/// Where a model wants to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DevicePreference {
    /// The worker's device (CUDA when available, else CPU).
    #[default]
    Auto,
    Cpu,
    /// A CUDA GPU; loading fails where there is none.
    Cuda,
}

fn default_input_name() -> String {
    "INPUT".to_owned()
}

fn default_output_name() -> String {
    "OUTPUT".to_owned()
}

fn default_dtype() -> DType {
    DType::Float32
}

/// A parsed model spec (`model.json`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub architecture: Architecture,
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
    #[serde(default = "default_dtype")]
    pub dtype: DType,
    #[serde(default)]
    pub device: DevicePreference,
    /// Weights file relative to the spec; `model.safetensors` by default.
    /// Ignored for a spec embedded in a `.safetensors` file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
}

impl ModelSpec {
    /// Parses and validates a spec, naming the field at fault.
    pub fn parse(text: &str) -> Result<ModelSpec, String> {
        let spec: ModelSpec =
            serde_json::from_str(text).map_err(|error| format!("model spec: {error}"))?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), String> {
        for (field, name) in [
            ("input_name", &self.input_name),
            ("output_name", &self.output_name),
        ] {
            if name.trim().is_empty() {
                return Err(format!("model spec: {field} must not be empty"));
            }
        }
        if self.input_name == self.output_name {
            return Err("model spec: input_name and output_name must differ".to_owned());
        }
        let dims = std::iter::once(("input_dim", self.input_dim))
            .chain(self.hidden.iter().map(|&dim| ("hidden", dim)))
            .chain(std::iter::once(("output_dim", self.output_dim)));
        for (field, dim) in dims {
            if dim == 0 || dim > MAX_DIM {
                return Err(format!(
                    "model spec: {field} is {dim}; dimensions must be within 1..={MAX_DIM}"
                ));
            }
        }
        if let Some(weights) = &self.weights {
            let path = Path::new(weights);
            let plain = path.components().count() == 1
                && matches!(
                    path.components().next(),
                    Some(std::path::Component::Normal(_))
                );
            if !plain {
                return Err(format!(
                    "model spec: weights '{weights}' must be a file name in the version directory"
                ));
            }
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

/// A spec and the file holding its weights.
#[derive(Clone, Debug)]
pub struct LocatedSpec {
    pub spec: ModelSpec,
    pub weights: PathBuf,
}

/// Reads the spec of a model file: `model.json` (weights next to it) or a
/// `.safetensors` file embedding its spec in the header metadata.
pub fn read_spec(model_file: &Path) -> Result<LocatedSpec, String> {
    let is_safetensors = model_file
        .extension()
        .is_some_and(|extension| extension == "safetensors");
    if is_safetensors {
        let metadata = read_safetensors_metadata(model_file)?;
        let text = metadata.get(SPEC_METADATA_KEY).ok_or_else(|| {
            format!(
                "{} has no '{SPEC_METADATA_KEY}' entry in its header metadata",
                model_file.display()
            )
        })?;
        return Ok(LocatedSpec {
            spec: ModelSpec::parse(text)?,
            weights: model_file.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(model_file)
        .map_err(|error| format!("cannot read {}: {error}", model_file.display()))?;
    let spec = ModelSpec::parse(&text)?;
    let name = spec.weights.as_deref().unwrap_or(DEFAULT_WEIGHTS);
    let weights = model_file
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(name);
    if !weights.is_file() {
        return Err(format!("weights file {} does not exist", weights.display()));
    }
    Ok(LocatedSpec { spec, weights })
}

/// The string metadata (`__metadata__`) of a safetensors header.
fn read_safetensors_metadata(
    path: &Path,
) -> Result<std::collections::HashMap<String, String>, String> {
    use std::io::Read;
    const MAX_HEADER: u64 = 100 * 1024 * 1024;
    let mut file = std::fs::File::open(path)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let mut size = [0u8; 8];
    file.read_exact(&mut size)
        .map_err(|_| format!("{} is not a safetensors file", path.display()))?;
    let size = u64::from_le_bytes(size);
    if size > MAX_HEADER {
        return Err(format!(
            "{}: safetensors header of {size} bytes is too large",
            path.display()
        ));
    }
    let mut header = vec![0u8; size as usize];
    file.read_exact(&mut header)
        .map_err(|_| format!("{}: truncated safetensors header", path.display()))?;
    #[derive(Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: std::collections::HashMap<String, String>,
    }
    let header: Header = serde_json::from_slice(&header)
        .map_err(|error| format!("{}: invalid safetensors header: {error}", path.display()))?;
    Ok(header.metadata)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const VALID: &str = r#"{"architecture":"mlp","input_dim":4,"hidden":[8],"output_dim":2,
        "activation":"relu","output":"logits"}"#;

    #[test]
    fn a_minimal_spec_gets_defaults() {
        let spec = ModelSpec::parse(VALID).unwrap();
        assert_eq!(spec.input_name, "INPUT");
        assert_eq!(spec.output_name, "OUTPUT");
        assert_eq!(spec.device, DevicePreference::Auto);
        assert_eq!(spec.dtype, DType::Float32);
        assert_eq!(spec.layer_dims(), vec![(4, 8), (8, 2)]);
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let cases = [
            (
                VALID.replace("\"mlp\"", "\"bert\""),
                "unknown variant `bert`",
            ),
            (
                VALID.replace("\"input_dim\":4", "\"input_dim\":0"),
                "input_dim",
            ),
            (VALID.replace("[8]", "[8, 0]"), "hidden"),
            (VALID.replace("\"relu\"", "\"swish\""), "swish"),
            (VALID.replace("\"logits\"", "\"argmax\""), "argmax"),
            (
                VALID.replace("\"output\"", "\"dtype\":\"float16\",\"output\""),
                "float16",
            ),
            (
                VALID.replace("\"output\"", "\"extra\":1,\"output\""),
                "extra",
            ),
            (
                VALID.replace("\"output\"", "\"weights\":\"../x\",\"output\""),
                "weights",
            ),
            (VALID.replace(",\"output_dim\":2", ""), "output_dim"),
        ];
        for (text, expected) in cases {
            let error = ModelSpec::parse(&text).unwrap_err();
            assert!(error.contains(expected), "{expected}: {error}");
        }
    }
}
