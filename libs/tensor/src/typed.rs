//! Typed contents (`InferTensorContents`) to and from little-endian buffers.

use bytes::{BufMut, Bytes, BytesMut};
use shamal_proto::inference::InferTensorContents;

use crate::{DataType, Error, Tensor, TensorData};

/// Which repeated field of `InferTensorContents` is populated, by name.
fn populated_fields(contents: &InferTensorContents) -> Vec<&'static str> {
    let mut fields = Vec::new();
    let checks: [(&'static str, bool); 8] = [
        ("bool_contents", !contents.bool_contents.is_empty()),
        ("int_contents", !contents.int_contents.is_empty()),
        ("int64_contents", !contents.int64_contents.is_empty()),
        ("uint_contents", !contents.uint_contents.is_empty()),
        ("uint64_contents", !contents.uint64_contents.is_empty()),
        ("fp32_contents", !contents.fp32_contents.is_empty()),
        ("fp64_contents", !contents.fp64_contents.is_empty()),
        ("bytes_contents", !contents.bytes_contents.is_empty()),
    ];
    for (field, populated) in checks {
        if populated {
            fields.push(field);
        }
    }
    fields
}

pub(crate) fn has_any(contents: &InferTensorContents) -> bool {
    !populated_fields(contents).is_empty()
}

fn field_for(datatype: DataType) -> Option<&'static str> {
    Some(match datatype {
        DataType::Bool => "bool_contents",
        DataType::Int8 | DataType::Int16 | DataType::Int32 => "int_contents",
        DataType::Int64 => "int64_contents",
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => "uint_contents",
        DataType::Uint64 => "uint64_contents",
        DataType::Fp32 => "fp32_contents",
        DataType::Fp64 => "fp64_contents",
        DataType::Bytes => "bytes_contents",
        DataType::Fp16 | DataType::Bf16 => return None,
    })
}

pub(crate) fn decode(
    name: &str,
    datatype: DataType,
    count: usize,
    shape: &[i64],
    contents: &InferTensorContents,
) -> Result<TensorData, Error> {
    let Some(expected_field) = field_for(datatype) else {
        return Err(Error::NoTypedContents {
            name: name.to_owned(),
            datatype,
        });
    };
    if let Some(found) = populated_fields(contents)
        .into_iter()
        .find(|field| *field != expected_field)
    {
        return Err(Error::WrongContentsField {
            name: name.to_owned(),
            datatype,
            expected: expected_field,
            found,
        });
    }
    // Compare counts before allocating anything: the shape is the client's
    // claim, the contents are what it really sent.
    let actual = match datatype {
        DataType::Bool => contents.bool_contents.len(),
        DataType::Int8 | DataType::Int16 | DataType::Int32 => contents.int_contents.len(),
        DataType::Int64 => contents.int64_contents.len(),
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => contents.uint_contents.len(),
        DataType::Uint64 => contents.uint64_contents.len(),
        DataType::Fp32 => contents.fp32_contents.len(),
        DataType::Fp64 => contents.fp64_contents.len(),
        DataType::Bytes => contents.bytes_contents.len(),
        DataType::Fp16 | DataType::Bf16 => 0,
    };
    if actual != count {
        return Err(Error::ElementCountMismatch {
            name: name.to_owned(),
            shape: shape.to_vec(),
            expected: count,
            actual,
        });
    }
    let out_of_range = |value: i128| Error::ValueOutOfRange {
        name: name.to_owned(),
        datatype,
        value,
    };
    let element_size = datatype.element_size().unwrap_or(0);
    let mut out = BytesMut::with_capacity(actual * element_size);
    match datatype {
        DataType::Bool => {
            for &value in &contents.bool_contents {
                out.put_u8(u8::from(value));
            }
        }
        DataType::Int8 => {
            for &value in &contents.int_contents {
                let narrow = i8::try_from(value).map_err(|_| out_of_range(value.into()))?;
                out.put_i8(narrow);
            }
        }
        DataType::Int16 => {
            for &value in &contents.int_contents {
                let narrow = i16::try_from(value).map_err(|_| out_of_range(value.into()))?;
                out.put_i16_le(narrow);
            }
        }
        DataType::Int32 => {
            for &value in &contents.int_contents {
                out.put_i32_le(value);
            }
        }
        DataType::Int64 => {
            for &value in &contents.int64_contents {
                out.put_i64_le(value);
            }
        }
        DataType::Uint8 => {
            for &value in &contents.uint_contents {
                let narrow = u8::try_from(value).map_err(|_| out_of_range(value.into()))?;
                out.put_u8(narrow);
            }
        }
        DataType::Uint16 => {
            for &value in &contents.uint_contents {
                let narrow = u16::try_from(value).map_err(|_| out_of_range(value.into()))?;
                out.put_u16_le(narrow);
            }
        }
        DataType::Uint32 => {
            for &value in &contents.uint_contents {
                out.put_u32_le(value);
            }
        }
        DataType::Uint64 => {
            for &value in &contents.uint64_contents {
                out.put_u64_le(value);
            }
        }
        DataType::Fp32 => {
            for &value in &contents.fp32_contents {
                out.put_f32_le(value);
            }
        }
        DataType::Fp64 => {
            for &value in &contents.fp64_contents {
                out.put_f64_le(value);
            }
        }
        DataType::Bytes => {
            return Ok(TensorData::Strings(contents.bytes_contents.clone()));
        }
        DataType::Fp16 | DataType::Bf16 => {
            return Err(Error::NoTypedContents {
                name: name.to_owned(),
                datatype,
            });
        }
    }
    Ok(TensorData::Fixed(out.freeze()))
}

macro_rules! read_le {
    ($bytes:expr, $ty:ty) => {
        $bytes
            .chunks_exact(std::mem::size_of::<$ty>())
            .map(|chunk| {
                let mut buf = [0u8; std::mem::size_of::<$ty>()];
                buf.copy_from_slice(chunk);
                <$ty>::from_le_bytes(buf)
            })
    };
}

pub(crate) fn encode(tensor: &Tensor) -> Option<InferTensorContents> {
    let mut contents = InferTensorContents::default();
    let bytes: &Bytes = match &tensor.data {
        TensorData::Strings(items) => {
            contents.bytes_contents = items.clone();
            return Some(contents);
        }
        TensorData::Fixed(bytes) => bytes,
    };
    match tensor.datatype {
        DataType::Bool => contents.bool_contents = bytes.iter().map(|&b| b != 0).collect(),
        DataType::Int8 => contents.int_contents = read_le!(bytes, i8).map(i32::from).collect(),
        DataType::Int16 => contents.int_contents = read_le!(bytes, i16).map(i32::from).collect(),
        DataType::Int32 => contents.int_contents = read_le!(bytes, i32).collect(),
        DataType::Int64 => contents.int64_contents = read_le!(bytes, i64).collect(),
        DataType::Uint8 => contents.uint_contents = bytes.iter().map(|&b| u32::from(b)).collect(),
        DataType::Uint16 => contents.uint_contents = read_le!(bytes, u16).map(u32::from).collect(),
        DataType::Uint32 => contents.uint_contents = read_le!(bytes, u32).collect(),
        DataType::Uint64 => contents.uint64_contents = read_le!(bytes, u64).collect(),
        DataType::Fp32 => contents.fp32_contents = read_le!(bytes, f32).collect(),
        DataType::Fp64 => contents.fp64_contents = read_le!(bytes, f64).collect(),
        DataType::Fp16 | DataType::Bf16 | DataType::Bytes => return None,
    }
    Some(contents)
}

/// Builds FP16 / BF16 / FP32 / FP64 raw data from f64 values (JSON input);
/// `None` for other datatypes.
pub fn float_bytes_from_f64(datatype: DataType, values: &[f64]) -> Option<Bytes> {
    let size = datatype.element_size()?;
    let mut out = BytesMut::with_capacity(values.len() * size);
    for &value in values {
        match datatype {
            DataType::Fp16 => out.put_u16_le(half::f16::from_f64(value).to_bits()),
            DataType::Bf16 => out.put_u16_le(half::bf16::from_f64(value).to_bits()),
            DataType::Fp32 => out.put_f32_le(value as f32),
            DataType::Fp64 => out.put_f64_le(value),
            _ => return None,
        }
    }
    Some(out.freeze())
}

/// Reads a fixed-size tensor as f64 values (for JSON rendering); `None` for
/// BYTES.
pub fn to_f64_values(tensor: &Tensor) -> Option<Vec<f64>> {
    let TensorData::Fixed(bytes) = &tensor.data else {
        return None;
    };
    Some(match tensor.datatype {
        DataType::Bool => bytes.iter().map(|&b| f64::from(u8::from(b != 0))).collect(),
        DataType::Int8 => read_le!(bytes, i8).map(f64::from).collect(),
        DataType::Int16 => read_le!(bytes, i16).map(f64::from).collect(),
        DataType::Int32 => read_le!(bytes, i32).map(f64::from).collect(),
        // JSON numbers are doubles; values above 2^53 lose precision, as they
        // would in any JSON client.
        DataType::Int64 => read_le!(bytes, i64).map(|v| v as f64).collect(),
        DataType::Uint8 => bytes.iter().map(|&b| f64::from(b)).collect(),
        DataType::Uint16 => read_le!(bytes, u16).map(f64::from).collect(),
        DataType::Uint32 => read_le!(bytes, u32).map(f64::from).collect(),
        DataType::Uint64 => read_le!(bytes, u64).map(|v| v as f64).collect(),
        DataType::Fp16 => read_le!(bytes, u16)
            .map(|bits| f64::from(half::f16::from_bits(bits)))
            .collect(),
        DataType::Bf16 => read_le!(bytes, u16)
            .map(|bits| f64::from(half::bf16::from_bits(bits)))
            .collect(),
        DataType::Fp32 => read_le!(bytes, f32).map(f64::from).collect(),
        DataType::Fp64 => read_le!(bytes, f64).collect(),
        DataType::Bytes => return None,
    })
}
