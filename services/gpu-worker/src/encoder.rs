//! The sentence-encoder backend: request validation, tokenisation of text
//! with the model's `tokenizer.json`, padding, and the [`BertEncoder`].
//!
//! Requests are judged twice. [`Backend::check`] runs per request before it
//! joins a batch (so a bad request is refused alone): everything `infer`
//! checks, plus two rules that only make sense for a client's request, an
//! empty `text` element and an `attention_mask` row without any token being
//! refused. `infer` itself accepts those (an empty text is embedded as
//! `[CLS] [SEP]`, a row without tokens as a zero vector), because the
//! framework warms a model up with empty and zero-filled inputs.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use shamal_tensor::{DataType, Tensor, TensorData};
use shamal_worker::backend::{InstanceDevice, RaggedAxis};
use shamal_worker::{Backend, BackendError};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::bert::{BertEncoder, TokenBatch};
use crate::spec::{BertSpec, EncoderInputs, TokenizerSource, encoder_io};

/// Why a text encoder's tokenizer cannot be loaded or used, or an encoder
/// instance cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `tokenizer.json` file cannot be read or parsed.
    #[error("cannot read tokenizer {}: {source}", path.display())]
    ReadTokenizer {
        path: PathBuf,
        source: tokenizers::Error,
    },
    /// The tokenizer embedded in safetensors metadata cannot be parsed.
    #[error("cannot read the embedded tokenizer: {0}")]
    EmbeddedTokenizer(#[source] tokenizers::Error),
    /// The tokenizer refuses the model's truncation settings.
    #[error("tokenizer truncation: {0}")]
    Truncation(#[source] tokenizers::Error),
    /// The tokenizer can produce an id the model has no embedding for.
    #[error("tokenizer token '{token}' has id {id}, outside the model's vocab_size {vocab_size}")]
    TokenOutsideVocab {
        token: String,
        id: u32,
        vocab_size: usize,
    },
    /// Tokenising one text failed.
    #[error("{0}")]
    Encode(#[source] tokenizers::Error),
    /// A text encoder came without a tokenizer, or a token-id encoder with
    /// one.
    #[error("a text encoder needs a tokenizer, a token-id encoder none")]
    TokenizerMismatch,
    /// The model file of a text encoder located no tokenizer.
    #[error("{}: a text encoder needs its tokenizer", .0.display())]
    NoTokenizer(PathBuf),
}

/// A HuggingFace tokenizer set up for the encoder: special tokens added,
/// truncated to the model's `max_seq_len`, no padding (the backend pads).
pub struct TextTokenizer {
    tokenizer: Tokenizer,
}

impl TextTokenizer {
    /// Loads a `tokenizer.json` (file or embedded text) and checks that every
    /// token id it can produce is within `vocab_size`.
    pub fn load(
        source: &TokenizerSource,
        vocab_size: usize,
        max_seq_len: usize,
    ) -> Result<TextTokenizer, Error> {
        let mut tokenizer = match source {
            TokenizerSource::File(path) => {
                Tokenizer::from_file(path).map_err(|source| Error::ReadTokenizer {
                    path: path.clone(),
                    source,
                })?
            }
            TokenizerSource::Embedded(text) => text
                .parse::<Tokenizer>()
                .map_err(Error::EmbeddedTokenizer)?,
        };
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_seq_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(Error::Truncation)?;
        if let Some((token, &id)) = tokenizer.get_vocab(true).iter().max_by_key(|(_, id)| **id)
            && usize::try_from(id).map_or(true, |id| id >= vocab_size)
        {
            return Err(Error::TokenOutsideVocab {
                token: token.clone(),
                id,
                vocab_size,
            });
        }
        Ok(TextTokenizer { tokenizer })
    }

    /// Token ids of one text: special tokens added, truncated.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, Error> {
        self.tokenizer
            .encode_fast(text, true)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(Error::Encode)
    }
}

/// One instance of a sentence encoder.
pub struct EncoderBackend {
    model: BertEncoder,
    inputs: EncoderInputs,
    tokenizer: Option<TextTokenizer>,
    vocab_size: usize,
    max_seq_len: usize,
}

fn invalid(message: String) -> BackendError {
    BackendError::InvalidInput(message)
}

/// How strictly a request is judged: `Request` adds the rules for clients'
/// requests (see the module documentation).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rules {
    Request,
    Compute,
}

impl EncoderBackend {
    pub fn new(
        model: BertEncoder,
        spec: &BertSpec,
        tokenizer: Option<TextTokenizer>,
    ) -> Result<EncoderBackend, Error> {
        if (spec.inputs == EncoderInputs::Text) != tokenizer.is_some() {
            return Err(Error::TokenizerMismatch);
        }
        Ok(EncoderBackend {
            model,
            inputs: spec.inputs,
            tokenizer,
            vocab_size: spec.vocab_size,
            max_seq_len: spec.max_seq_len(),
        })
    }

    /// The device this instance computes on.
    pub fn candle_device(&self) -> &candle_core::Device {
        self.model.device()
    }

    /// Token ids of `text` as this model's tokenizer produces them (`None`
    /// for a token-id encoder).
    pub fn tokenize(&self, text: &str) -> Option<Result<Vec<u32>, Error>> {
        self.tokenizer
            .as_ref()
            .map(|tokenizer| tokenizer.encode(text))
    }

    fn batch(&self, inputs: &[Tensor], rules: Rules) -> Result<TokenBatch, BackendError> {
        match self.inputs {
            EncoderInputs::TokenIds => self.id_batch(inputs, rules),
            EncoderInputs::Text => self.text_batch(inputs, rules),
        }
    }

    fn id_batch(&self, inputs: &[Tensor], rules: Rules) -> Result<TokenBatch, BackendError> {
        let ids = find(inputs, encoder_io::INPUT_IDS)?;
        let mask = find(inputs, encoder_io::ATTENTION_MASK)?;
        if inputs.len() != 2 {
            return Err(invalid(format!(
                "the model takes 2 inputs ('{}', '{}'), got {}",
                encoder_io::INPUT_IDS,
                encoder_io::ATTENTION_MASK,
                inputs.len()
            )));
        }
        let id_values = int64_matrix(ids)?;
        let mask_values = int64_matrix(mask)?;
        if mask.shape != ids.shape {
            return Err(invalid(format!(
                "input '{}' has shape {:?} but '{}' has {:?}; they must be equal",
                mask.name, mask.shape, ids.name, ids.shape
            )));
        }
        let (rows, len) = (dim(ids.shape[0]), dim(ids.shape[1]));
        self.check_len(&ids.name, rows, len)?;
        let mut token_ids = Vec::with_capacity(id_values.len());
        for (index, &id) in id_values.iter().enumerate() {
            match u32::try_from(id) {
                Ok(id) if (id as usize) < self.vocab_size => token_ids.push(id),
                _ => {
                    return Err(invalid(format!(
                        "input '{}': token id {id} at [{}, {}] is outside the vocabulary \
                         (0..{})",
                        ids.name,
                        index / len,
                        index % len,
                        self.vocab_size
                    )));
                }
            }
        }
        let mut attention = Vec::with_capacity(mask_values.len());
        for (index, &value) in mask_values.iter().enumerate() {
            match value {
                0 => attention.push(0.0),
                1 => attention.push(1.0),
                _ => {
                    return Err(invalid(format!(
                        "input '{}': value {value} at [{}, {}]; it must be 0 or 1",
                        mask.name,
                        index / len,
                        index % len
                    )));
                }
            }
        }
        if rules == Rules::Request
            && let Some(row) = (0..rows).find(|row| {
                attention[row * len..(row + 1) * len]
                    .iter()
                    .all(|&value| value == 0.0)
            })
        {
            return Err(invalid(format!(
                "input '{}': row {row} has no tokens (all zeros)",
                mask.name
            )));
        }
        Ok(TokenBatch {
            ids: token_ids,
            mask: attention,
            rows,
            len,
        })
    }

    fn check_len(&self, name: &str, rows: usize, len: usize) -> Result<(), BackendError> {
        if len > self.max_seq_len {
            return Err(invalid(format!(
                "input '{name}' has {len} tokens per row; this model takes at most {} \
                 (max_seq_len)",
                self.max_seq_len
            )));
        }
        if len == 0 && rows > 0 {
            return Err(invalid(format!("input '{name}' has no tokens")));
        }
        Ok(())
    }

    fn text_batch(&self, inputs: &[Tensor], rules: Rules) -> Result<TokenBatch, BackendError> {
        let text = find(inputs, encoder_io::TEXT)?;
        if inputs.len() != 1 {
            return Err(invalid(format!(
                "the model takes 1 input ('{}'), got {}",
                encoder_io::TEXT,
                inputs.len()
            )));
        }
        let (DataType::Bytes, TensorData::Strings(items), [rows]) =
            (text.datatype, &text.data, text.shape.as_slice())
        else {
            return Err(invalid(format!(
                "input '{}' must be BYTES of shape [-1] (one sentence per element), got {} {:?}",
                text.name,
                text.datatype.as_str(),
                text.shape
            )));
        };
        let Some(tokenizer) = &self.tokenizer else {
            return Err(BackendError::Internal(
                "text encoder without tokenizer".to_owned(),
            ));
        };
        let mut sequences = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let sentence = std::str::from_utf8(item).map_err(|_| {
                invalid(format!(
                    "input '{}': element {index} is not valid UTF-8",
                    text.name
                ))
            })?;
            if rules == Rules::Request && sentence.trim().is_empty() {
                return Err(invalid(format!(
                    "input '{}': element {index} is empty",
                    text.name
                )));
            }
            if rules == Rules::Compute {
                let ids = tokenizer.encode(sentence).map_err(|error| {
                    invalid(format!(
                        "input '{}': element {index} cannot be tokenised: {error}",
                        text.name
                    ))
                })?;
                sequences.push(ids);
            }
        }
        let rows = dim(*rows);
        if rules == Rules::Request {
            // Tokenising is left to `infer`: it always yields a valid
            // sequence (ids checked at load, truncated to max_seq_len).
            return Ok(TokenBatch {
                ids: Vec::new(),
                mask: Vec::new(),
                rows,
                len: 0,
            });
        }
        // At least one position, so that a tokenizer that adds no special
        // tokens cannot produce an empty batch (its rows embed as zeros).
        let len = sequences.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; rows * len];
        let mut mask = vec![0f32; rows * len];
        for (row, sequence) in sequences.iter().enumerate() {
            ids[row * len..row * len + sequence.len()].copy_from_slice(sequence);
            mask[row * len..row * len + sequence.len()].fill(1.0);
        }
        self.check_len(&text.name, rows, len)?;
        Ok(TokenBatch {
            ids,
            mask,
            rows,
            len,
        })
    }
}

fn dim(value: i64) -> usize {
    usize::try_from(value).unwrap_or(0)
}

fn find<'a>(inputs: &'a [Tensor], name: &str) -> Result<&'a Tensor, BackendError> {
    inputs
        .iter()
        .find(|tensor| tensor.name == name)
        .ok_or_else(|| invalid(format!("missing input '{name}'")))
}

/// The values of an INT64 `[rows, len]` input.
fn int64_matrix(tensor: &Tensor) -> Result<Vec<i64>, BackendError> {
    match (&tensor.data, tensor.datatype, tensor.shape.len()) {
        (TensorData::Fixed(bytes), DataType::Int64, 2) => Ok(bytes
            .chunks_exact(8)
            .map(|chunk| {
                let mut value = [0u8; 8];
                value.copy_from_slice(chunk);
                i64::from_le_bytes(value)
            })
            .collect()),
        (_, DataType::Int64, _) => Err(invalid(format!(
            "input '{}' must have shape [batch, tokens], got {:?}",
            tensor.name, tensor.shape
        ))),
        _ => Err(invalid(format!(
            "input '{}' must be INT64, got {}",
            tensor.name,
            tensor.datatype.as_str()
        ))),
    }
}

impl Backend for EncoderBackend {
    fn infer(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, BackendError> {
        let batch = self.batch(&inputs, Rules::Compute)?;
        let values = if batch.rows == 0 {
            Vec::new()
        } else {
            self.model
                .forward(&batch)
                .map_err(|error| BackendError::Internal(error.to_string()))?
        };
        let rows = i64::try_from(batch.rows).unwrap_or(i64::MAX);
        let width = i64::try_from(self.model.hidden()).unwrap_or(i64::MAX);
        Ok(vec![Tensor {
            name: encoder_io::EMBEDDING.to_owned(),
            datatype: DataType::Fp32,
            shape: vec![rows, width],
            data: TensorData::Fixed(Bytes::copy_from_slice(bytemuck::cast_slice(&values))),
        }])
    }

    fn check(&self, inputs: &[Tensor]) -> Result<(), BackendError> {
        self.batch(inputs, Rules::Request).map(|_| ())
    }

    /// Token ids and mask of different lengths share a batch, zero-padded:
    /// the zero mask hides the padding from attention and pooling. Text
    /// needs no hook: every text request is `[n]`, padded after
    /// tokenisation.
    fn ragged_axes(&self) -> Vec<RaggedAxis> {
        match self.inputs {
            EncoderInputs::TokenIds => vec![
                RaggedAxis { input: 0, axis: 1 },
                RaggedAxis { input: 1, axis: 1 },
            ],
            EncoderInputs::Text => Vec::new(),
        }
    }

    fn device(&self) -> InstanceDevice {
        crate::device::instance_device(self.model.device())
    }
}

/// Loads an encoder's tokenizer, if it takes text.
pub fn load_tokenizer(
    spec: &BertSpec,
    source: Option<&TokenizerSource>,
    model_file: &Path,
) -> Result<Option<TextTokenizer>, Error> {
    match (spec.inputs, source) {
        (EncoderInputs::TokenIds, _) => Ok(None),
        (EncoderInputs::Text, Some(source)) => {
            TextTokenizer::load(source, spec.vocab_size, spec.max_seq_len()).map(Some)
        }
        (EncoderInputs::Text, None) => Err(Error::NoTokenizer(model_file.to_owned())),
    }
}
