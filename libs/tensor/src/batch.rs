//! Concatenation and splitting along the batch (first) dimension, used by the
//! dynamic batcher: requests are merged into one model execution and the
//! outputs are split back, exactly, in the same order. Requests whose
//! sequence lengths differ are zero-padded to the longest before they are
//! merged.

use bytes::{Bytes, BytesMut};

use crate::{DataType, Error, Tensor, TensorData};

fn incompatible(reason: String) -> Error {
    Error::Incompatible { reason }
}

/// Concatenates tensors that share name, datatype and non-batch dimensions
/// along their first dimension.
pub fn concat_batch(parts: &[&Tensor]) -> Result<Tensor, Error> {
    let Some(first) = parts.first() else {
        return Err(incompatible("no tensors to concatenate".to_owned()));
    };
    if first.shape.is_empty() {
        return Err(incompatible(format!(
            "tensor '{}' has no batch dimension",
            first.name
        )));
    }
    let mut batch: i64 = 0;
    for part in parts {
        if part.datatype != first.datatype
            || part.name != first.name
            || part.shape.len() != first.shape.len()
            || part.shape[1..] != first.shape[1..]
        {
            return Err(incompatible(format!(
                "tensor '{}' {} {:?} cannot join '{}' {} {:?}",
                part.name, part.datatype, part.shape, first.name, first.datatype, first.shape
            )));
        }
        batch = batch
            .checked_add(part.shape[0])
            .ok_or_else(|| incompatible("batch dimensions overflow".to_owned()))?;
    }
    let mut shape = first.shape.clone();
    shape[0] = batch;
    let data = if parts.len() == 1 {
        first.data.clone()
    } else {
        match first.datatype {
            DataType::Bytes => {
                let mut items = Vec::new();
                for part in parts {
                    if let TensorData::Strings(part_items) = &part.data {
                        items.extend(part_items.iter().cloned());
                    }
                }
                TensorData::Strings(items)
            }
            _ => {
                let total: usize = parts.iter().map(|part| raw_len(part)).sum();
                let mut out = BytesMut::with_capacity(total);
                for part in parts {
                    if let TensorData::Fixed(bytes) = &part.data {
                        out.extend_from_slice(bytes);
                    }
                }
                TensorData::Fixed(out.freeze())
            }
        }
    };
    Ok(Tensor {
        name: first.name.clone(),
        datatype: first.datatype,
        shape,
        data,
    })
}

fn raw_len(tensor: &Tensor) -> usize {
    match &tensor.data {
        TensorData::Fixed(bytes) => bytes.len(),
        TensorData::Strings(items) => items.len(),
    }
}

/// Splits a tensor along its first dimension into pieces of `sizes` rows.
/// The sizes must add up to the batch dimension. Fixed-size data is sliced,
/// not copied.
pub fn split_batch(tensor: &Tensor, sizes: &[usize]) -> Result<Vec<Tensor>, Error> {
    let Some(&batch) = tensor.shape.first() else {
        return Err(incompatible(format!(
            "tensor '{}' has no batch dimension",
            tensor.name
        )));
    };
    let total: usize = sizes.iter().sum();
    if usize::try_from(batch).ok() != Some(total) {
        return Err(incompatible(format!(
            "tensor '{}' has batch dimension {batch}, requests need {total}",
            tensor.name
        )));
    }
    let row_elements = crate::element_count(&tensor.name, &tensor.shape[1..])?;
    // A tensor made by a backend is not validated by the decoder: check that
    // its data really holds `batch` rows before slicing.
    let element_size = tensor.datatype.element_size().unwrap_or(1);
    if raw_len(tensor) != total * row_elements * element_size {
        return Err(incompatible(format!(
            "tensor '{}' data does not match its shape {:?}",
            tensor.name, tensor.shape
        )));
    }
    let mut pieces = Vec::with_capacity(sizes.len());
    let mut offset = 0usize;
    for &rows in sizes {
        let mut shape = tensor.shape.clone();
        shape[0] = rows as i64;
        let elements = rows * row_elements;
        let data = match &tensor.data {
            TensorData::Fixed(bytes) => {
                let size = element_size;
                let slice: Bytes = bytes.slice(offset * size..(offset + elements) * size);
                TensorData::Fixed(slice)
            }
            TensorData::Strings(items) => {
                TensorData::Strings(items[offset..offset + elements].to_vec())
            }
        };
        offset += elements;
        pieces.push(Tensor {
            name: tensor.name.clone(),
            datatype: tensor.datatype,
            shape,
            data,
        });
    }
    Ok(pieces)
}

/// Concatenates tensors like [`concat_batch`], first zero-padding them to
/// the largest size along every axis after the first where their sizes
/// differ (see [`pad_to_largest`]): the batcher's merge of requests whose
/// ragged inputs have different lengths. Fixed-size datatypes only, when
/// padding is needed.
pub fn concat_batch_padded(parts: &[&Tensor]) -> Result<Tensor, Error> {
    let Some(first) = parts.first() else {
        return Err(incompatible("no tensors to concatenate".to_owned()));
    };
    if parts.iter().all(|part| part.shape == first.shape) {
        return concat_batch(parts);
    }
    let padded = pad_to_largest(parts)?;
    concat_batch(&padded.iter().collect::<Vec<_>>())
}

/// Zero-pads every part, at the end of each axis after the first, to the
/// largest size among the parts (the batch axis keeps each part's rows).
pub fn pad_to_largest(parts: &[&Tensor]) -> Result<Vec<Tensor>, Error> {
    let rank = parts[0].shape.len();
    let mut target = parts[0].shape.clone();
    for part in parts {
        if part.shape.len() != rank {
            return Err(incompatible(format!(
                "cannot pad '{}': ranks differ within the batch",
                part.name
            )));
        }
        for (size, &dim) in target.iter_mut().zip(&part.shape).skip(1) {
            *size = (*size).max(dim);
        }
    }
    parts
        .iter()
        .map(|part| {
            let mut shape = target.clone();
            shape[0] = part.shape[0];
            pad_zeros(part, &shape)
        })
        .collect()
}

/// Copies `tensor` into a zero-filled tensor of shape `target` (same rank,
/// no dimension smaller), keeping every element at its index.
pub fn pad_zeros(tensor: &Tensor, target: &[i64]) -> Result<Tensor, Error> {
    if tensor.shape == target {
        return Ok(tensor.clone());
    }
    let refuse = |why: &str| incompatible(format!("cannot pad '{}': {why}", tensor.name));
    let (TensorData::Fixed(bytes), Some(size)) = (&tensor.data, tensor.datatype.element_size())
    else {
        return Err(refuse("only fixed-size datatypes are padded"));
    };
    let dims = |shape: &[i64]| -> Option<Vec<usize>> {
        shape.iter().map(|&dim| usize::try_from(dim).ok()).collect()
    };
    let (Some(from), Some(to)) = (dims(&tensor.shape), dims(target)) else {
        return Err(refuse("negative dimension"));
    };
    if from.len() != to.len() || from.is_empty() || from.iter().zip(&to).any(|(f, t)| f > t) {
        return Err(refuse("target shape is smaller"));
    }
    let last = from.len() - 1;
    let row_in = from[last] * size;
    let row_out = to[last] * size;
    let total: usize = to.iter().product::<usize>() * size;
    let mut out = vec![0u8; total];
    let rows: usize = from[..last].iter().product();
    for row in 0..rows {
        // The row's index in the source, re-linearised in the target.
        let mut rest = row;
        let mut target_row = 0;
        let mut stride = 1;
        for axis in (0..last).rev() {
            target_row += (rest % from[axis]) * stride;
            rest /= from[axis];
            stride *= to[axis];
        }
        let start = target_row * row_out;
        out[start..start + row_in].copy_from_slice(&bytes[row * row_in..(row + 1) * row_in]);
    }
    Ok(Tensor {
        name: tensor.name.clone(),
        datatype: tensor.datatype,
        shape: target.to_vec(),
        data: TensorData::Fixed(Bytes::from(out)),
    })
}
