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

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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

fn check_dim(field: &str, dim: usize, max: usize) -> Result<(), String> {
    if dim == 0 || dim > max {
        return Err(format!(
            "model spec: {field} is {dim}; it must be within 1..={max}"
        ));
    }
    Ok(())
}

fn check_file_name(field: &str, name: &str) -> Result<(), String> {
    let path = Path::new(name);
    let plain = path.components().count() == 1
        && matches!(
            path.components().next(),
            Some(std::path::Component::Normal(_))
        );
    if !plain {
        return Err(format!(
            "model spec: {field} '{name}' must be a file name in the version directory"
        ));
    }
    Ok(())
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

impl MlpSpec {
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

impl BertSpec {
    pub fn validate(&self) -> Result<(), String> {
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
            return Err(format!(
                "model spec: hidden ({}) must be a multiple of heads ({})",
                self.hidden, self.heads
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(format!(
                "model spec: layer_norm_eps is {}; it must be a positive number",
                self.layer_norm_eps
            ));
        }
        if let Some(max_seq_len) = self.max_seq_len {
            check_dim("max_seq_len", max_seq_len, self.max_position)
                .map_err(|error| format!("{error} (max_seq_len may not exceed max_position)"))?;
        }
        match self.inputs {
            EncoderInputs::Text => {
                // [CLS] and [SEP] alone take two positions.
                if self.max_seq_len() < 2 {
                    return Err(
                        "model spec: a text encoder needs max_seq_len of at least 2".to_owned()
                    );
                }
                if let Some(tokenizer) = &self.tokenizer {
                    check_file_name("tokenizer", tokenizer)?;
                }
            }
            EncoderInputs::TokenIds => {
                if self.tokenizer.is_some() {
                    return Err(
                        "model spec: tokenizer is only used with \"inputs\": \"text\"".to_owned(),
                    );
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

/// Where a text encoder's tokenizer comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerSource {
    /// A `tokenizer.json` file.
    File(PathBuf),
    /// The content of a `tokenizer.json` embedded in safetensors metadata.
    Embedded(String),
}

/// A spec, the file holding its weights and, for a text encoder, its
/// tokenizer.
#[derive(Clone, Debug)]
pub struct LocatedSpec {
    pub spec: ModelSpec,
    pub weights: PathBuf,
    pub tokenizer: Option<TokenizerSource>,
}

fn is_text_encoder(spec: &ModelSpec) -> Option<&BertSpec> {
    match spec {
        ModelSpec::BertEncoder(bert) if bert.inputs == EncoderInputs::Text => Some(bert),
        _ => None,
    }
}

/// Reads the spec of a model file: `model.json` (weights and tokenizer next
/// to it) or a `.safetensors` file embedding its spec (and tokenizer) in the
/// header metadata.
pub fn read_spec(model_file: &Path) -> Result<LocatedSpec, String> {
    let is_safetensors = model_file
        .extension()
        .is_some_and(|extension| extension == "safetensors");
    if is_safetensors {
        let mut metadata = read_safetensors_metadata(model_file)?;
        let text = metadata.get(SPEC_METADATA_KEY).ok_or_else(|| {
            format!(
                "{} has no '{SPEC_METADATA_KEY}' entry in its header metadata",
                model_file.display()
            )
        })?;
        let spec = ModelSpec::parse(text)?;
        let tokenizer = match is_text_encoder(&spec) {
            None => None,
            Some(_) => Some(TokenizerSource::Embedded(
                metadata.remove(TOKENIZER_METADATA_KEY).ok_or_else(|| {
                    format!(
                        "{} is a text encoder without its tokenizer: no \
                         '{TOKENIZER_METADATA_KEY}' entry in its header metadata",
                        model_file.display()
                    )
                })?,
            )),
        };
        return Ok(LocatedSpec {
            spec,
            weights: model_file.to_path_buf(),
            tokenizer,
        });
    }
    let text = std::fs::read_to_string(model_file)
        .map_err(|error| format!("cannot read {}: {error}", model_file.display()))?;
    let spec = ModelSpec::parse(&text)?;
    let directory = model_file.parent().unwrap_or_else(|| Path::new("."));
    let weights = directory.join(spec.weights().unwrap_or(DEFAULT_WEIGHTS));
    if !weights.is_file() {
        return Err(format!("weights file {} does not exist", weights.display()));
    }
    let tokenizer = match is_text_encoder(&spec) {
        None => None,
        Some(bert) => {
            let path = directory.join(bert.tokenizer.as_deref().unwrap_or(DEFAULT_TOKENIZER));
            if !path.is_file() {
                return Err(format!(
                    "tokenizer file {} does not exist (a text encoder needs one)",
                    path.display()
                ));
            }
            Some(TokenizerSource::File(path))
        }
    };
    Ok(LocatedSpec {
        spec,
        weights,
        tokenizer,
    })
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

    const BERT: &str = r#"{"architecture":"bert_encoder","vocab_size":100,"hidden":32,
        "layers":2,"heads":4,"intermediate":64,"max_position":40}"#;

    #[test]
    fn a_minimal_spec_gets_defaults() {
        let ModelSpec::Mlp(spec) = ModelSpec::parse(VALID).unwrap() else {
            panic!("not an MLP")
        };
        assert_eq!(spec.input_name, "INPUT");
        assert_eq!(spec.output_name, "OUTPUT");
        assert_eq!(spec.device, DevicePreference::Auto);
        assert_eq!(spec.dtype, DType::Float32);
        assert_eq!(spec.layer_dims(), vec![(4, 8), (8, 2)]);
    }

    #[test]
    fn a_minimal_encoder_spec_gets_defaults() {
        let spec = ModelSpec::parse(BERT).unwrap();
        assert_eq!(spec.architecture(), "bert_encoder");
        let ModelSpec::BertEncoder(spec) = spec else {
            panic!("not an encoder")
        };
        assert_eq!(spec.type_vocab_size, 2);
        assert_eq!(spec.layer_norm_eps, 1e-12);
        assert_eq!(spec.pooling, Pooling::Mean);
        assert!(spec.normalize);
        assert_eq!(spec.max_seq_len(), 40);
        assert_eq!(spec.head_dim(), 8);
        assert_eq!(spec.inputs, EncoderInputs::TokenIds);
        assert_eq!(spec.dtype, DType::Float32);
        // The spec round-trips through its JSON form (as embedded in
        // safetensors metadata).
        let text = serde_json::to_string(&ModelSpec::BertEncoder(spec.clone())).unwrap();
        assert!(text.contains("\"architecture\":\"bert_encoder\""), "{text}");
        assert_eq!(
            ModelSpec::parse(&text).unwrap(),
            ModelSpec::BertEncoder(spec)
        );
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
                VALID.replace("\"output\"", "\"dtype\":\"float8\",\"output\""),
                "float8",
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
            (
                BERT.replace("\"heads\":4", "\"heads\":5"),
                "multiple of heads",
            ),
            (BERT.replace("\"layers\":2", "\"layers\":0"), "layers"),
            (BERT.replace("\"vocab_size\":100,", ""), "vocab_size"),
            (
                BERT.replace(
                    "\"max_position\":40",
                    "\"max_position\":40,\"max_seq_len\":41",
                ),
                "max_seq_len",
            ),
            (
                BERT.replace(
                    "\"max_position\":40",
                    "\"max_position\":40,\"pooling\":\"cls\"",
                ),
                "cls",
            ),
            (
                BERT.replace(
                    "\"max_position\":40",
                    "\"max_position\":40,\"layer_norm_eps\":0",
                ),
                "layer_norm_eps",
            ),
            (
                BERT.replace(
                    "\"max_position\":40",
                    "\"max_position\":40,\"tokenizer\":\"t.json\"",
                ),
                "only used with",
            ),
            (
                BERT.replace(
                    "\"max_position\":40",
                    "\"max_position\":40,\"inputs\":\"text\",\"tokenizer\":\"/etc/t.json\"",
                ),
                "tokenizer",
            ),
            (
                BERT.replace("\"max_position\":40", "\"max_position\":40,\"input_dim\":3"),
                "input_dim",
            ),
        ];
        for (text, expected) in cases {
            let error = ModelSpec::parse(&text).unwrap_err();
            assert!(error.contains(expected), "{expected}: {error}");
        }
    }
}
