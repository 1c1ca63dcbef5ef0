//! Builds one random `ModelInferRequest` from a model's metadata.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shamal_proto::inference::model_infer_request::InferInputTensor;
use shamal_proto::inference::{ModelInferRequest, ModelMetadataResponse};

/// Length of each random BYTES element (before its 4-byte length prefix).
pub const BYTES_ELEMENT_LEN: usize = 16;

/// Size in bytes of one element of a fixed-size datatype; `None` for BYTES or
/// an unknown datatype.
pub fn element_size(datatype: &str) -> Option<usize> {
    Some(match datatype {
        "BOOL" | "INT8" | "UINT8" => 1,
        "INT16" | "UINT16" | "FP16" | "BF16" => 2,
        "INT32" | "UINT32" | "FP32" => 4,
        "INT64" | "UINT64" | "FP64" => 8,
        _ => return None,
    })
}

/// Resolves a metadata shape: a leading -1 becomes `batch`, other -1 become `dim`.
pub fn resolve_shape(shape: &[i64], batch: usize, dim: usize) -> Vec<i64> {
    shape
        .iter()
        .enumerate()
        .map(|(i, &d)| match (i, d) {
            (0, -1) => batch as i64,
            (_, -1) => dim as i64,
            _ => d,
        })
        .collect()
}

/// Whether the model's inputs all have a variable leading (batch) dimension.
pub fn has_batch_dim(metadata: &ModelMetadataResponse) -> bool {
    !metadata.inputs.is_empty() && metadata.inputs.iter().all(|t| t.shape.first() == Some(&-1))
}

/// Random little-endian, row-major contents for `count` elements of `datatype`.
pub fn random_contents(datatype: &str, count: usize, rng: &mut impl Rng) -> Result<Bytes> {
    let mut out = Vec::new();
    match datatype {
        "BYTES" => {
            out.reserve(count * (4 + BYTES_ELEMENT_LEN));
            for _ in 0..count {
                out.extend_from_slice(&(BYTES_ELEMENT_LEN as u32).to_le_bytes());
                out.extend((0..BYTES_ELEMENT_LEN).map(|_| rng.random_range(b'a'..=b'z')));
            }
        }
        "BOOL" => out.extend((0..count).map(|_| u8::from(rng.random::<bool>()))),
        "FP32" => {
            for _ in 0..count {
                out.extend_from_slice(&rng.random::<f32>().to_le_bytes());
            }
        }
        "FP64" => {
            for _ in 0..count {
                out.extend_from_slice(&rng.random::<f64>().to_le_bytes());
            }
        }
        "FP16" => {
            for _ in 0..count {
                // Positive normal half floats below 2: exponent 1..=15, any mantissa.
                let exp: u16 = rng.random_range(1..=15);
                let bits = (exp << 10) | rng.random_range(0..1024u16);
                out.extend_from_slice(&bits.to_le_bytes());
            }
        }
        "BF16" => {
            for _ in 0..count {
                let bits = (rng.random::<f32>().to_bits() >> 16) as u16;
                out.extend_from_slice(&bits.to_le_bytes());
            }
        }
        other => {
            // Integers: small non-negative values, valid as indices or ids.
            let size = element_size(other).with_context(|| format!("unknown datatype {other}"))?;
            for _ in 0..count {
                let value: u64 = rng.random_range(0..100);
                out.extend_from_slice(&value.to_le_bytes()[..size]);
            }
        }
    }
    Ok(Bytes::from(out))
}

/// `count` elements of `datatype`, each `value` (converted to the type:
/// truncated towards zero for integers, non-zero is true for BOOL).
pub fn constant_contents(datatype: &str, count: usize, value: f64) -> Result<Bytes> {
    let element: Vec<u8> = match datatype {
        "BOOL" => vec![u8::from(value != 0.0)],
        "INT8" => (value as i8).to_le_bytes().to_vec(),
        "UINT8" => (value as u8).to_le_bytes().to_vec(),
        "INT16" => (value as i16).to_le_bytes().to_vec(),
        "UINT16" => (value as u16).to_le_bytes().to_vec(),
        "INT32" => (value as i32).to_le_bytes().to_vec(),
        "UINT32" => (value as u32).to_le_bytes().to_vec(),
        "INT64" => (value as i64).to_le_bytes().to_vec(),
        "UINT64" => (value as u64).to_le_bytes().to_vec(),
        "FP32" => (value as f32).to_le_bytes().to_vec(),
        "FP64" => value.to_le_bytes().to_vec(),
        other => bail!("cannot fill a {other} input with a number"),
    };
    Ok(Bytes::from(element.repeat(count)))
}

/// Replaces the contents of `input` in `request` with `value` everywhere.
pub fn fill_input(request: &mut ModelInferRequest, input: &str, value: f64) -> Result<()> {
    let index = request
        .inputs
        .iter()
        .position(|tensor| tensor.name == input)
        .with_context(|| format!("the model has no input {input} to fill"))?;
    let tensor = &request.inputs[index];
    let count = tensor.shape.iter().product::<i64>() as usize;
    request.raw_input_contents[index] = constant_contents(&tensor.datatype, count, value)
        .with_context(|| format!("input {input}"))?;
    Ok(())
}

/// Builds one request with random `raw_input_contents` for every input of the model.
pub fn build_request(
    metadata: &ModelMetadataResponse,
    model_version: &str,
    batch: usize,
    dim: usize,
    seed: u64,
) -> Result<ModelInferRequest> {
    if metadata.inputs.is_empty() {
        bail!("model {} reports no inputs", metadata.name);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut inputs = Vec::with_capacity(metadata.inputs.len());
    let mut raw = Vec::with_capacity(metadata.inputs.len());
    for tensor in &metadata.inputs {
        let shape = resolve_shape(&tensor.shape, batch, dim);
        if let Some(bad) = shape.iter().find(|&&d| d < 0) {
            bail!("input {}: unsupported dimension {bad}", tensor.name);
        }
        let count = shape.iter().product::<i64>() as usize;
        let contents = random_contents(&tensor.datatype, count, &mut rng)
            .with_context(|| format!("input {}", tensor.name))?;
        inputs.push(InferInputTensor {
            name: tensor.name.clone(),
            datatype: tensor.datatype.clone(),
            shape,
            ..Default::default()
        });
        raw.push(contents);
    }
    Ok(ModelInferRequest {
        model_name: metadata.name.clone(),
        model_version: model_version.to_string(),
        inputs,
        raw_input_contents: raw,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shamal_proto::inference::model_metadata_response::TensorMetadata;

    fn tensor(name: &str, datatype: &str, shape: &[i64]) -> TensorMetadata {
        TensorMetadata {
            name: name.to_string(),
            datatype: datatype.to_string(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn byte_sizes_per_dtype() {
        let cases = [
            ("BOOL", 1),
            ("INT8", 1),
            ("UINT8", 1),
            ("INT16", 2),
            ("UINT16", 2),
            ("FP16", 2),
            ("BF16", 2),
            ("INT32", 4),
            ("UINT32", 4),
            ("FP32", 4),
            ("INT64", 8),
            ("UINT64", 8),
            ("FP64", 8),
            ("BYTES", 4 + BYTES_ELEMENT_LEN),
        ];
        let metadata = ModelMetadataResponse {
            name: "m".to_string(),
            inputs: cases
                .iter()
                .map(|(dt, _)| tensor(&format!("in_{dt}"), dt, &[-1, 3, -1]))
                .collect(),
            ..Default::default()
        };
        let request = build_request(&metadata, "2", 4, 5, 7).expect("request");
        assert_eq!(request.model_name, "m");
        assert_eq!(request.model_version, "2");
        assert_eq!(request.inputs.len(), cases.len());
        for ((dt, size), (input, raw)) in cases
            .iter()
            .zip(request.inputs.iter().zip(&request.raw_input_contents))
        {
            assert_eq!(input.datatype, *dt);
            assert_eq!(input.shape, vec![4, 3, 5]);
            assert_eq!(raw.len(), 4 * 3 * 5 * size, "{dt}");
        }
    }

    #[test]
    fn contents_are_well_formed() {
        let mut rng = StdRng::seed_from_u64(1);
        let fp32 = random_contents("FP32", 100, &mut rng).expect("fp32");
        for chunk in fp32.chunks_exact(4) {
            let v = f32::from_le_bytes(chunk.try_into().expect("4 bytes"));
            assert!((0.0..1.0).contains(&v));
        }
        let bools = random_contents("BOOL", 100, &mut rng).expect("bool");
        assert!(bools.iter().all(|&b| b <= 1));
        let strings = random_contents("BYTES", 3, &mut rng).expect("bytes");
        for element in strings.chunks_exact(4 + BYTES_ELEMENT_LEN) {
            let len = u32::from_le_bytes(element[..4].try_into().expect("4 bytes"));
            assert_eq!(len as usize, BYTES_ELEMENT_LEN);
        }
        assert!(random_contents("COMPLEX", 1, &mut rng).is_err());
    }

    #[test]
    fn filled_inputs_hold_one_value() {
        let metadata = ModelMetadataResponse {
            name: "encoder".to_string(),
            inputs: vec![
                tensor("input_ids", "INT64", &[-1, -1]),
                tensor("attention_mask", "INT64", &[-1, -1]),
            ],
            ..Default::default()
        };
        let mut request = build_request(&metadata, "", 2, 16, 3).expect("request");
        fill_input(&mut request, "attention_mask", 1.0).expect("fill");
        assert_eq!(request.inputs[1].shape, vec![2, 16]);
        let mask = &request.raw_input_contents[1];
        assert_eq!(mask.len(), 2 * 16 * 8);
        for chunk in mask.chunks_exact(8) {
            assert_eq!(i64::from_le_bytes(chunk.try_into().expect("8 bytes")), 1);
        }
        // The other input keeps its random ids.
        assert_eq!(request.raw_input_contents[0].len(), 2 * 16 * 8);
        assert!(fill_input(&mut request, "missing", 1.0).is_err());
        assert_eq!(
            constant_contents("FP32", 2, 0.5).expect("fp32").as_ref(),
            [0.5f32.to_le_bytes(), 0.5f32.to_le_bytes()].concat()
        );
        assert!(constant_contents("BYTES", 1, 1.0).is_err());
    }

    #[test]
    fn fixed_shapes_and_scalars() {
        assert_eq!(resolve_shape(&[-1, 16], 32, 1), vec![32, 16]);
        assert_eq!(resolve_shape(&[2, -1], 32, 7), vec![2, 7]);
        let metadata = ModelMetadataResponse {
            name: "s".to_string(),
            inputs: vec![tensor("x", "FP32", &[])],
            ..Default::default()
        };
        assert!(!has_batch_dim(&metadata));
        let request = build_request(&metadata, "", 8, 1, 0).expect("request");
        assert_eq!(request.raw_input_contents[0].len(), 4);
    }
}
