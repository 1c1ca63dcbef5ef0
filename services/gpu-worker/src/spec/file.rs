//! Finding a model file's spec, weights and tokenizer: `model.json` with
//! files beside it, or one `.safetensors` file that embeds the rest in its
//! header metadata.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::error::Error;
use super::{
    BertSpec, DEFAULT_TOKENIZER, DEFAULT_WEIGHTS, EncoderInputs, ModelSpec, SPEC_METADATA_KEY,
    TOKENIZER_METADATA_KEY,
};

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
pub fn read_spec(model_file: &Path) -> Result<LocatedSpec, Error> {
    let is_safetensors = model_file
        .extension()
        .is_some_and(|extension| extension == "safetensors");
    if is_safetensors {
        let mut metadata = read_safetensors_metadata(model_file)?;
        let text = metadata
            .get(SPEC_METADATA_KEY)
            .ok_or_else(|| Error::NoEmbeddedSpec(model_file.to_owned()))?;
        let spec = ModelSpec::parse(text)?;
        let tokenizer = match is_text_encoder(&spec) {
            None => None,
            Some(_) => Some(TokenizerSource::Embedded(
                metadata
                    .remove(TOKENIZER_METADATA_KEY)
                    .ok_or_else(|| Error::NoEmbeddedTokenizer(model_file.to_owned()))?,
            )),
        };
        return Ok(LocatedSpec {
            spec,
            weights: model_file.to_path_buf(),
            tokenizer,
        });
    }
    let text = std::fs::read_to_string(model_file).map_err(|source| Error::Read {
        path: model_file.to_owned(),
        source,
    })?;
    let spec = ModelSpec::parse(&text)?;
    let directory = model_file.parent().unwrap_or_else(|| Path::new("."));
    let weights = directory.join(spec.weights().unwrap_or(DEFAULT_WEIGHTS));
    if !weights.is_file() {
        return Err(Error::MissingWeights(weights));
    }
    let tokenizer = match is_text_encoder(&spec) {
        None => None,
        Some(bert) => {
            let path = directory.join(bert.tokenizer.as_deref().unwrap_or(DEFAULT_TOKENIZER));
            if !path.is_file() {
                return Err(Error::MissingTokenizer(path));
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
) -> Result<std::collections::HashMap<String, String>, Error> {
    use std::io::Read;
    const MAX_HEADER: u64 = 100 * 1024 * 1024;
    let mut file = std::fs::File::open(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut size = [0u8; 8];
    file.read_exact(&mut size)
        .map_err(|_| Error::NotSafetensors(path.to_owned()))?;
    let size = u64::from_le_bytes(size);
    if size > MAX_HEADER {
        return Err(Error::HeaderTooLarge {
            path: path.to_owned(),
            size,
        });
    }
    let mut header = vec![0u8; size as usize];
    file.read_exact(&mut header)
        .map_err(|_| Error::TruncatedHeader(path.to_owned()))?;
    #[derive(Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: std::collections::HashMap<String, String>,
    }
    let header: Header =
        serde_json::from_slice(&header).map_err(|source| Error::InvalidHeader {
            path: path.to_owned(),
            source,
        })?;
    Ok(header.metadata)
}
