//! KServe v2 tensor codec.
//!
//! This crate is the one place that parses untrusted tensor bytes. Everything
//! that enters the data plane goes through [`decode_inputs`]; everything that
//! leaves it through [`encode_outputs`]. Fixed-size datatypes are kept as their
//! little-endian, row-major bytes (shared with the request buffer, never
//! copied); BYTES tensors as one buffer per element.

mod batch;
mod dtype;
mod typed;

use bytes::{BufMut, Bytes, BytesMut};
use shamal_proto::inference::InferTensorContents;
use shamal_proto::inference::model_infer_request::InferInputTensor;
use shamal_proto::inference::model_infer_response::InferOutputTensor;

pub use batch::{concat_batch, concat_batch_padded, pad_to_largest, pad_zeros, split_batch};
pub use dtype::DataType;
pub use typed::{float_bytes_from_f64, to_f64_values};

/// A codec failure. Every variant names the tensor at fault, so that a client
/// learns which input to fix; the router and workers map all of them to
/// INVALID_ARGUMENT (HTTP 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("tensor '{name}': unknown datatype '{datatype}'")]
    UnknownDatatype { name: String, datatype: String },
    #[error("tensor '{name}': invalid shape {shape:?}: dimensions must be >= 0")]
    NegativeDimension { name: String, shape: Vec<i64> },
    #[error("tensor '{name}': shape {shape:?} is too large")]
    ShapeTooLarge { name: String, shape: Vec<i64> },
    #[error(
        "tensor '{name}': shape {shape:?} of {datatype} needs {expected} bytes, raw content has {actual}"
    )]
    ByteSizeMismatch {
        name: String,
        datatype: DataType,
        shape: Vec<i64>,
        expected: usize,
        actual: usize,
    },
    #[error("tensor '{name}': shape {shape:?} needs {expected} elements, contents have {actual}")]
    ElementCountMismatch {
        name: String,
        shape: Vec<i64>,
        expected: usize,
        actual: usize,
    },
    #[error("tensor '{name}': malformed BYTES content: {reason}")]
    MalformedBytes { name: String, reason: String },
    #[error("tensor '{name}': no data (neither contents nor raw contents)")]
    MissingData { name: String },
    #[error("tensor '{name}': data given both as contents and as raw contents")]
    AmbiguousData { name: String },
    #[error("raw contents has {raw} entries for {tensors} tensors")]
    RawCountMismatch { raw: usize, tensors: usize },
    #[error("tensor '{name}': {datatype} has no typed contents field; send it as raw contents")]
    NoTypedContents { name: String, datatype: DataType },
    #[error("tensor '{name}': contents for {datatype} belong in {expected}, found {found}")]
    WrongContentsField {
        name: String,
        datatype: DataType,
        expected: &'static str,
        found: &'static str,
    },
    #[error("tensor '{name}': value {value} does not fit in {datatype}")]
    ValueOutOfRange {
        name: String,
        datatype: DataType,
        value: i128,
    },
    #[error("tensor '{name}': BOOL element {index} is {value}; only 0 and 1 are valid")]
    InvalidBool {
        name: String,
        index: usize,
        value: u8,
    },
    #[error("tensor '{name}' is given more than once")]
    DuplicateTensor { name: String },
    #[error("cannot batch tensors: {reason}")]
    Incompatible { reason: String },
}

/// Tensor elements.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// Fixed-size elements: little-endian, row-major, no padding.
    Fixed(Bytes),
    /// BYTES elements, one buffer each, row-major.
    Strings(Vec<Bytes>),
}

/// A validated tensor: its data always agrees with its datatype and shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub data: TensorData,
}

/// Number of elements of `shape`, rejecting negative dimensions and overflow.
pub fn element_count(name: &str, shape: &[i64]) -> Result<usize, Error> {
    let mut count: usize = 1;
    for &dim in shape {
        let dim = usize::try_from(dim).map_err(|_| Error::NegativeDimension {
            name: name.to_owned(),
            shape: shape.to_vec(),
        })?;
        count = count.checked_mul(dim).ok_or_else(|| Error::ShapeTooLarge {
            name: name.to_owned(),
            shape: shape.to_vec(),
        })?;
    }
    Ok(count)
}

impl Tensor {
    /// Builds a tensor from raw contents, checking the byte size against the
    /// shape (and, for BYTES, the length prefixes of every element).
    pub fn from_raw(
        name: impl Into<String>,
        datatype: DataType,
        shape: Vec<i64>,
        raw: Bytes,
    ) -> Result<Tensor, Error> {
        let name = name.into();
        let count = element_count(&name, &shape)?;
        let data = match datatype.element_size() {
            Some(size) => {
                let expected = count
                    .checked_mul(size)
                    .ok_or_else(|| Error::ShapeTooLarge {
                        name: name.clone(),
                        shape: shape.clone(),
                    })?;
                if raw.len() != expected {
                    return Err(Error::ByteSizeMismatch {
                        name,
                        datatype,
                        shape,
                        expected,
                        actual: raw.len(),
                    });
                }
                // A C++ bool behind the backend must hold 0 or 1 exactly.
                if datatype == DataType::Bool
                    && let Some(index) = raw.iter().position(|&byte| byte > 1)
                {
                    return Err(Error::InvalidBool {
                        name,
                        index,
                        value: raw[index],
                    });
                }
                TensorData::Fixed(raw)
            }
            None => TensorData::Strings(parse_length_prefixed(&name, count, raw)?),
        };
        Ok(Tensor {
            name,
            datatype,
            shape,
            data,
        })
    }

    /// Builds a tensor from typed contents (`fp32_contents`, ...).
    pub fn from_contents(
        name: impl Into<String>,
        datatype: DataType,
        shape: Vec<i64>,
        contents: &InferTensorContents,
    ) -> Result<Tensor, Error> {
        let name = name.into();
        let count = element_count(&name, &shape)?;
        let data = typed::decode(&name, datatype, count, &shape, contents)?;
        Ok(Tensor {
            name,
            datatype,
            shape,
            data,
        })
    }

    /// Number of elements.
    pub fn element_count(&self) -> usize {
        match &self.data {
            TensorData::Fixed(bytes) => bytes.len() / self.datatype.element_size().unwrap_or(1),
            TensorData::Strings(items) => items.len(),
        }
    }

    /// The raw-contents encoding of this tensor (shared, not copied, for
    /// fixed-size datatypes).
    pub fn to_raw(&self) -> Bytes {
        match &self.data {
            TensorData::Fixed(bytes) => bytes.clone(),
            TensorData::Strings(items) => {
                let total: usize = items.iter().map(|item| item.len() + 4).sum();
                let mut out = BytesMut::with_capacity(total);
                for item in items {
                    // Elements longer than u32::MAX cannot be produced by the
                    // decoder or by a model within the message size limit.
                    out.put_u32_le(u32::try_from(item.len()).unwrap_or(u32::MAX));
                    out.put_slice(item);
                }
                out.freeze()
            }
        }
    }

    /// The typed-contents encoding of this tensor; `None` for FP16 and BF16,
    /// which the protocol only carries as raw contents.
    pub fn to_contents(&self) -> Option<InferTensorContents> {
        typed::encode(self)
    }
}

fn parse_length_prefixed(name: &str, count: usize, mut raw: Bytes) -> Result<Vec<Bytes>, Error> {
    let malformed = |reason: String| Error::MalformedBytes {
        name: name.to_owned(),
        reason,
    };
    // Every element needs at least its 4-byte prefix: bounds the allocation.
    if count > raw.len() / 4 {
        return Err(malformed(format!(
            "{} bytes cannot hold {count} elements",
            raw.len()
        )));
    }
    let mut items = Vec::with_capacity(count);
    for index in 0..count {
        if raw.len() < 4 {
            return Err(malformed(format!(
                "element {index}: truncated length prefix"
            )));
        }
        let length = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
        let _ = raw.split_to(4);
        if raw.len() < length {
            return Err(malformed(format!(
                "element {index}: length {length} exceeds the {} bytes left",
                raw.len()
            )));
        }
        items.push(raw.split_to(length));
    }
    if !raw.is_empty() {
        return Err(malformed(format!(
            "{} bytes left after {count} elements",
            raw.len()
        )));
    }
    Ok(items)
}

/// Decodes the input tensors of a `ModelInferRequest` (its `inputs` and
/// `raw_input_contents`, taken by value so raw buffers are shared).
pub fn decode_inputs(inputs: Vec<InferInputTensor>, raw: Vec<Bytes>) -> Result<Vec<Tensor>, Error> {
    let parts = inputs
        .into_iter()
        .map(|input| (input.name, input.datatype, input.shape, input.contents));
    decode_parts(parts, raw)
}

/// Decodes the output tensors of a `ModelInferResponse`.
pub fn decode_outputs(
    outputs: Vec<InferOutputTensor>,
    raw: Vec<Bytes>,
) -> Result<Vec<Tensor>, Error> {
    let parts = outputs
        .into_iter()
        .map(|output| (output.name, output.datatype, output.shape, output.contents));
    decode_parts(parts, raw)
}

type Part = (String, String, Vec<i64>, Option<InferTensorContents>);

fn decode_parts(
    parts: impl ExactSizeIterator<Item = Part>,
    raw: Vec<Bytes>,
) -> Result<Vec<Tensor>, Error> {
    let tensor_count = parts.len();
    if !raw.is_empty() && raw.len() != tensor_count {
        return Err(Error::RawCountMismatch {
            raw: raw.len(),
            tensors: tensor_count,
        });
    }
    let mut raw = raw.into_iter();
    let mut tensors: Vec<Tensor> = Vec::with_capacity(tensor_count);
    for (name, datatype_text, shape, contents) in parts {
        if tensors.iter().any(|tensor| tensor.name == name) {
            return Err(Error::DuplicateTensor { name });
        }
        let Some(datatype) = DataType::parse(&datatype_text) else {
            return Err(Error::UnknownDatatype {
                name,
                datatype: datatype_text,
            });
        };
        let has_contents = contents.as_ref().is_some_and(typed::has_any);
        let tensor = match (raw.next(), contents) {
            (Some(_), Some(_)) if has_contents => return Err(Error::AmbiguousData { name }),
            (Some(bytes), _) => Tensor::from_raw(name, datatype, shape, bytes)?,
            (None, Some(contents)) => Tensor::from_contents(name, datatype, shape, &contents)?,
            (None, None) => {
                // An empty tensor legitimately has no data at all.
                if element_count(&name, &shape)? == 0 {
                    Tensor::from_raw(name, datatype, shape, Bytes::new())?
                } else {
                    return Err(Error::MissingData { name });
                }
            }
        };
        tensors.push(tensor);
    }
    Ok(tensors)
}

/// Encodes output tensors as response metadata plus `raw_output_contents`.
pub fn encode_outputs(tensors: &[Tensor]) -> (Vec<InferOutputTensor>, Vec<Bytes>) {
    let mut outputs = Vec::with_capacity(tensors.len());
    let mut raw = Vec::with_capacity(tensors.len());
    for tensor in tensors {
        outputs.push(InferOutputTensor {
            name: tensor.name.clone(),
            datatype: tensor.datatype.as_str().to_owned(),
            shape: tensor.shape.clone(),
            parameters: Default::default(),
            contents: None,
        });
        raw.push(tensor.to_raw());
    }
    (outputs, raw)
}

/// Encodes input tensors as request metadata plus `raw_input_contents`
/// (used by clients: the load generator, tests, the router's HTTP twin).
pub fn encode_inputs(tensors: &[Tensor]) -> (Vec<InferInputTensor>, Vec<Bytes>) {
    let mut inputs = Vec::with_capacity(tensors.len());
    let mut raw = Vec::with_capacity(tensors.len());
    for tensor in tensors {
        inputs.push(InferInputTensor {
            name: tensor.name.clone(),
            datatype: tensor.datatype.as_str().to_owned(),
            shape: tensor.shape.clone(),
            parameters: Default::default(),
            contents: None,
        });
        raw.push(tensor.to_raw());
    }
    (inputs, raw)
}

#[cfg(test)]
mod tests;
