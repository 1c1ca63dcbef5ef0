//! Why a model's safetensors weights cannot be loaded, shared by every
//! architecture ([`crate::mlp`], [`crate::bert`]): both check each tensor's
//! presence, dtype and shape against the spec, and refuse leftovers.

use std::collections::BTreeSet;
use std::path::PathBuf;

use candle_core::DType;

/// Weights that do not fit their spec, or cannot be placed on the device.
/// The message names the tensor or the file; the worker reports it as the
/// model version's load failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file is not a readable safetensors file.
    #[error("cannot read weights {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: candle_core::Error,
    },
    /// A tensor the spec needs is absent.
    #[error("weights lack tensor '{name}' (shape {shape:?})")]
    Missing { name: String, shape: Vec<usize> },
    /// An MLP tensor is not F32 (the MLP serves F32 weights only).
    #[error("tensor '{name}' is {dtype:?}; only F32 weights are served")]
    NotF32 { name: String, dtype: DType },
    /// An encoder tensor is not a float dtype it converts from.
    #[error("tensor '{name}' is {dtype:?}; weights must be F32, F16 or BF16")]
    NotFloat { name: String, dtype: DType },
    /// A tensor's shape differs from what the spec's dimensions imply.
    #[error("tensor '{name}' has shape {shape:?}, the spec needs {expected:?}")]
    Shape {
        name: String,
        shape: Vec<usize>,
        expected: Vec<usize>,
    },
    /// Converting a tensor or moving it to the device failed (out of
    /// device memory, most likely).
    #[error("cannot place {name}: {source}")]
    Place {
        name: String,
        source: candle_core::Error,
    },
    /// Concatenating an encoder layer's query, key and value failed.
    #[error("cannot fuse {name}: {source}")]
    Fuse {
        name: String,
        source: candle_core::Error,
    },
    /// Taking the encoder's single token-type row failed.
    #[error("token_type_embeddings: {0}")]
    TokenTypeEmbeddings(#[source] candle_core::Error),
    /// The file holds tensors the spec does not use (a spec that does not
    /// match its weights).
    #[error("weights {} hold tensors the spec does not use: {names:?}", path.display())]
    Unused {
        path: PathBuf,
        names: BTreeSet<String>,
    },
}
