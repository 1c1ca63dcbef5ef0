//! Why a model spec is refused, and the checks shared by every
//! architecture.

use std::path::{Path, PathBuf};

use super::{SPEC_METADATA_KEY, TOKENIZER_METADATA_KEY};

/// A model spec that cannot be read or served. Every message names the
/// field or the file at fault; the worker reports it as the model
/// version's load failure (INVALID_ARGUMENT to a client that asks).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `model.json` (or the embedded spec) is not valid JSON, names an
    /// unknown architecture or field, or lacks a required field.
    #[error("model spec: {0}")]
    Json(#[source] serde_json::Error),
    /// A dimension is 0 or above its limit.
    #[error("model spec: {field} is {value}; it must be within 1..={max}")]
    Dim {
        field: &'static str,
        value: usize,
        max: usize,
    },
    /// `max_seq_len` is 0 or above `max_position`.
    #[error(
        "model spec: max_seq_len is {value}; it must be within 1..={max_position} \
         (max_seq_len may not exceed max_position)"
    )]
    MaxSeqLen { value: usize, max_position: usize },
    /// A file the spec names is not a plain file name (a path, `..`).
    #[error("model spec: {field} '{name}' must be a file name in the version directory")]
    FileName { field: &'static str, name: String },
    /// An MLP's input or output name is blank.
    #[error("model spec: {field} must not be empty")]
    EmptyName { field: &'static str },
    /// An MLP's input and output share a name.
    #[error("model spec: input_name and output_name must differ")]
    SameNames,
    /// An encoder's `hidden` does not split into `heads` equal heads.
    #[error("model spec: hidden ({hidden}) must be a multiple of heads ({heads})")]
    Heads { hidden: usize, heads: usize },
    /// An encoder's `layer_norm_eps` is not a positive number.
    #[error("model spec: layer_norm_eps is {0}; it must be a positive number")]
    LayerNormEps(f64),
    /// A text encoder's `max_seq_len` leaves no room for [CLS] and [SEP].
    #[error("model spec: a text encoder needs max_seq_len of at least 2")]
    TextMaxSeqLen,
    /// A token-id encoder names a tokenizer.
    #[error("model spec: tokenizer is only used with \"inputs\": \"text\"")]
    TokenizerWithoutText,
    /// A model file, or the file its spec names, cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The weights file the spec names is missing.
    #[error("weights file {} does not exist", .0.display())]
    MissingWeights(PathBuf),
    /// A text encoder's tokenizer file is missing.
    #[error("tokenizer file {} does not exist (a text encoder needs one)", .0.display())]
    MissingTokenizer(PathBuf),
    /// A `.safetensors` model file embeds no spec.
    #[error("{} has no '{}' entry in its header metadata", .0.display(), SPEC_METADATA_KEY)]
    NoEmbeddedSpec(PathBuf),
    /// A `.safetensors` text encoder embeds no tokenizer.
    #[error(
        "{} is a text encoder without its tokenizer: no '{}' entry in its header metadata",
        .0.display(),
        TOKENIZER_METADATA_KEY
    )]
    NoEmbeddedTokenizer(PathBuf),
    /// The file is too short to hold a safetensors header size.
    #[error("{} is not a safetensors file", .0.display())]
    NotSafetensors(PathBuf),
    /// The safetensors header claims more than the limit (100 MiB).
    #[error("{}: safetensors header of {size} bytes is too large", path.display())]
    HeaderTooLarge { path: PathBuf, size: u64 },
    /// The file ends inside its safetensors header.
    #[error("{}: truncated safetensors header", .0.display())]
    TruncatedHeader(PathBuf),
    /// The safetensors header is not the JSON it should be.
    #[error("{}: invalid safetensors header: {source}", path.display())]
    InvalidHeader {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Checks that a dimension is within `1..=max`.
pub(super) fn check_dim(field: &'static str, value: usize, max: usize) -> Result<(), Error> {
    if value == 0 || value > max {
        return Err(Error::Dim { field, value, max });
    }
    Ok(())
}

/// Checks that `name` is a plain file name (so a spec cannot reach outside
/// its version directory).
pub(super) fn check_file_name(field: &'static str, name: &str) -> Result<(), Error> {
    let path = Path::new(name);
    let plain = path.components().count() == 1
        && matches!(
            path.components().next(),
            Some(std::path::Component::Normal(_))
        );
    if !plain {
        return Err(Error::FileName {
            field,
            name: name.to_owned(),
        });
    }
    Ok(())
}
