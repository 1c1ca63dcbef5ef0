//! The `"bert_encoder"` architecture's spec: a sentence-embedding encoder.

use serde::{Deserialize, Serialize};

use super::error::{Error, check_dim, check_file_name};
use super::{DType, DevicePreference, MAX_DIM, MAX_LAYERS};

/// The encoder's feed-forward activation (HuggingFace's `hidden_act`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HiddenAct {
    /// Exact GELU (erf), BERT's `"gelu"`.
    #[default]
    Gelu,
}

/// How token states become one sentence embedding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean of the token states where the attention mask is 1.
    #[default]
    Mean,
}

/// What an encoder takes (and advertises) as input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EncoderInputs {
    /// `input_ids` and `attention_mask`, INT64 `[-1, -1]`.
    #[default]
    TokenIds,
    /// `text`, BYTES `[-1]`, tokenised with the model's `tokenizer.json`.
    Text,
}

fn default_type_vocab_size() -> usize {
    2
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

fn default_true() -> bool {
    true
}

/// A BERT-style sentence-embedding encoder.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BertSpec {
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub max_position: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub hidden_act: HiddenAct,
    #[serde(default)]
    pub pooling: Pooling,
    #[serde(default = "default_true")]
    pub normalize: bool,
    /// Longest token sequence accepted (text is truncated to it); at most
    /// `max_position`, which it defaults to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seq_len: Option<usize>,
    #[serde(default)]
    pub inputs: EncoderInputs,
    /// Tokenizer file relative to the spec (`inputs: "text"` only);
    /// `tokenizer.json` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    #[serde(default)]
    pub dtype: DType,
    #[serde(default)]
    pub device: DevicePreference,
    /// Weights file relative to the spec; `model.safetensors` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
}

/// Input and output names of an encoder.
pub mod encoder_io {
    pub const INPUT_IDS: &str = "input_ids";
    pub const ATTENTION_MASK: &str = "attention_mask";
    pub const TEXT: &str = "text";
    pub const EMBEDDING: &str = "embedding";
}

impl BertSpec {
    /// Checks the spec's fields, naming the one at fault.
    pub fn validate(&self) -> Result<(), Error> {
        for (field, dim) in [
            ("vocab_size", self.vocab_size),
            ("hidden", self.hidden),
            ("heads", self.heads),
            ("intermediate", self.intermediate),
            ("max_position", self.max_position),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            check_dim(field, dim, MAX_DIM)?;
        }
        check_dim("layers", self.layers, MAX_LAYERS)?;
        if !self.hidden.is_multiple_of(self.heads) {
            return Err(Error::Heads {
                hidden: self.hidden,
                heads: self.heads,
            });
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(Error::LayerNormEps(self.layer_norm_eps));
        }
        // Checked here rather than with `check_dim`: the limit is the
        // spec's own max_position, and the message says so.
        if let Some(max_seq_len) = self.max_seq_len
            && (max_seq_len == 0 || max_seq_len > self.max_position)
        {
            return Err(Error::MaxSeqLen {
                value: max_seq_len,
                max_position: self.max_position,
            });
        }
        match self.inputs {
            EncoderInputs::Text => {
                // [CLS] and [SEP] alone take two positions.
                if self.max_seq_len() < 2 {
                    return Err(Error::TextMaxSeqLen);
                }
                if let Some(tokenizer) = &self.tokenizer {
                    check_file_name("tokenizer", tokenizer)?;
                }
            }
            EncoderInputs::TokenIds => {
                if self.tokenizer.is_some() {
                    return Err(Error::TokenizerWithoutText);
                }
            }
        }
        if let Some(weights) = &self.weights {
            check_file_name("weights", weights)?;
        }
        Ok(())
    }

    /// Longest token sequence the model takes.
    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len.unwrap_or(self.max_position)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}
