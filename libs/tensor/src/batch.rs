//! Concatenation and splitting along the batch (first) dimension, used by the
//! dynamic batcher: requests are merged into one model execution and the
//! outputs are split back, exactly, in the same order.

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
