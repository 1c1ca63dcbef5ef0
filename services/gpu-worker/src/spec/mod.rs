//! The model spec: a small JSON document describing the architecture and
//! dimensions of a safetensors model.
//!
//! A version directory holds `model.json` (the spec) and the weights it names
//! (`model.safetensors` by default). `architecture` selects the model kind.
//!
//! # `"mlp"`: classifier / regressor
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
//! # `"bert_encoder"`: sentence-embedding encoder
//!
//! The architecture of all-MiniLM-L6-v2 and other BERT sentence encoders:
//! word + position + token-type embeddings and LayerNorm, `layers` post-LN
//! encoder layers (multi-head self-attention, then a GELU feed-forward
//! block), mean pooling over the attention mask, L2 normalisation.
//!
//! ```json
//! {
//!   "architecture": "bert_encoder",
//!   "vocab_size": 30522,
//!   "hidden": 384,
//!   "layers": 6,
//!   "heads": 12,
//!   "intermediate": 1536,
//!   "max_position": 512,
//!   "type_vocab_size": 2,
//!   "layer_norm_eps": 1e-12,
//!   "hidden_act": "gelu",
//!   "pooling": "mean",
//!   "normalize": true,
//!   "max_seq_len": 256,
//!   "inputs": "text",
//!   "tokenizer": "tokenizer.json",
//!   "dtype": "float32",
//!   "device": "auto"
//! }
//! ```
//!
//! Defaults: `type_vocab_size` 2, `layer_norm_eps` 1e-12, `hidden_act`
//! `"gelu"` (exact, erf), `pooling` `"mean"` (the only one), `normalize`
//! true, `max_seq_len` = `max_position`, `inputs` `"token_ids"`,
//! `tokenizer` `"tokenizer.json"`.
//!
//! `inputs` decides what the model advertises (one form per model, since
//! every advertised input is required):
//!
//! - `"token_ids"`: `input_ids` and `attention_mask`, INT64 `[-1, -1]`
//!   (batch, tokens). Token type ids are all 0 (single-sentence encoders).
//!   Rows longer than `max_seq_len` are refused.
//! - `"text"`: `text`, BYTES `[-1]`, one UTF-8 sentence per element,
//!   tokenised with the HuggingFace `tokenizer.json` next to the spec and
//!   truncated to `max_seq_len` tokens ([CLS] and [SEP] included); the
//!   tokenizer file's own truncation and padding settings are replaced.
//!
//! Either way the output is `embedding`, FP32 `[-1, hidden]`.
//!
//! Weights carry HuggingFace's `BertModel` names, so a real checkpoint's
//! `model.safetensors` loads as is (an optional `bert.` prefix is accepted;
//! `pooler.*` and `embeddings.position_ids` are ignored):
//! `embeddings.{word,position,token_type}_embeddings.weight`,
//! `embeddings.LayerNorm.{weight,bias}`, and for layer `i`
//! `encoder.layer.{i}.attention.self.{query,key,value}.{weight,bias}`,
//! `encoder.layer.{i}.attention.output.dense.{weight,bias}`,
//! `encoder.layer.{i}.attention.output.LayerNorm.{weight,bias}`,
//! `encoder.layer.{i}.intermediate.dense.{weight,bias}`,
//! `encoder.layer.{i}.output.dense.{weight,bias}`,
//! `encoder.layer.{i}.output.LayerNorm.{weight,bias}`. F32, F16 or BF16
//! weights are accepted and converted to the compute dtype.
//!
//! # Common fields
//!
//! `dtype`: `"float32"` (default), `"float16"` or `"bfloat16"`, the compute
//! dtype; inputs and outputs stay FP32 on the wire. Half precision needs a
//! CUDA device: on the CPU such a model fails to load (it is never silently
//! computed in F32). `device`: `"auto"` (the worker's device), `"cpu"`, or
//! `"cuda"` (fails to load on a worker without a GPU). `weights`: the
//! weights file relative to the spec.
//!
//! A single `.safetensors` file (the registry's artifact format) carries the
//! same spec as a JSON string in its header metadata under
//! [`SPEC_METADATA_KEY`], and, for a text encoder, the content of its
//! `tokenizer.json` under [`TOKENIZER_METADATA_KEY`].

mod bert;
mod error;
mod file;
mod mlp;

use serde::{Deserialize, Serialize};

pub use bert::{BertSpec, EncoderInputs, HiddenAct, Pooling, encoder_io};
pub use error::Error;
pub use file::{LocatedSpec, TokenizerSource, read_spec};
pub use mlp::{Activation, MlpSpec, OutputKind};

/// Header metadata key of a `.safetensors` file that embeds its spec.
pub const SPEC_METADATA_KEY: &str = "shamal.model_spec";

/// Header metadata key of a `.safetensors` file that embeds the content of
/// its `tokenizer.json` (text encoders).
pub const TOKENIZER_METADATA_KEY: &str = "shamal.tokenizer";

/// Default weights file, next to `model.json`.
pub const DEFAULT_WEIGHTS: &str = "model.safetensors";

/// Default tokenizer file of a text encoder, next to `model.json`.
pub const DEFAULT_TOKENIZER: &str = "tokenizer.json";

/// Largest layer width accepted (guards against absurd specs).
const MAX_DIM: usize = 1 << 20;

/// Most encoder layers accepted.
const MAX_LAYERS: usize = 1024;

/// A parsed model spec (`model.json`), by architecture.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(tag = "architecture", rename_all = "snake_case")]
pub enum ModelSpec {
    Mlp(MlpSpec),
    BertEncoder(BertSpec),
}

/// The compute dtype.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    #[default]
    Float32,
    /// CUDA only.
    Float16,
    /// CUDA only.
    Bfloat16,
}

impl DType {
    pub fn as_str(self) -> &'static str {
        match self {
            DType::Float32 => "float32",
            DType::Float16 => "float16",
            DType::Bfloat16 => "bfloat16",
        }
    }
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

impl ModelSpec {
    /// Parses and validates a spec, naming the field at fault.
    pub fn parse(text: &str) -> Result<ModelSpec, Error> {
        let spec: ModelSpec = serde_json::from_str(text).map_err(Error::Json)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks the fields of the architecture's spec, naming the one at
    /// fault.
    pub fn validate(&self) -> Result<(), Error> {
        match self {
            ModelSpec::Mlp(spec) => spec.validate(),
            ModelSpec::BertEncoder(spec) => spec.validate(),
        }
    }

    /// The `architecture` value.
    pub fn architecture(&self) -> &'static str {
        match self {
            ModelSpec::Mlp(_) => "mlp",
            ModelSpec::BertEncoder(_) => "bert_encoder",
        }
    }

    pub fn device(&self) -> DevicePreference {
        match self {
            ModelSpec::Mlp(spec) => spec.device,
            ModelSpec::BertEncoder(spec) => spec.device,
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            ModelSpec::Mlp(spec) => spec.dtype,
            ModelSpec::BertEncoder(spec) => spec.dtype,
        }
    }

    /// The weights file named by the spec, if any.
    pub fn weights(&self) -> Option<&str> {
        match self {
            ModelSpec::Mlp(spec) => spec.weights.as_deref(),
            ModelSpec::BertEncoder(spec) => spec.weights.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests;
