use bytes::Bytes;
use shamal_proto::inference::InferTensorContents;
use shamal_proto::inference::model_infer_request::InferInputTensor;

use super::*;

fn input(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
    InferInputTensor {
        name: name.to_owned(),
        datatype: datatype.to_owned(),
        shape: shape.to_vec(),
        parameters: Default::default(),
        contents: None,
    }
}

fn with_contents(mut tensor: InferInputTensor, contents: InferTensorContents) -> InferInputTensor {
    tensor.contents = Some(contents);
    tensor
}

/// Typed contents holding `values` (as i128, converted per datatype) for
/// every datatype that has a typed field.
fn typed_contents(datatype: DataType, values: &[i128]) -> InferTensorContents {
    let mut contents = InferTensorContents::default();
    match datatype {
        DataType::Bool => contents.bool_contents = values.iter().map(|v| *v != 0).collect(),
        DataType::Int8 | DataType::Int16 | DataType::Int32 => {
            contents.int_contents = values.iter().map(|v| *v as i32).collect()
        }
        DataType::Int64 => contents.int64_contents = values.iter().map(|v| *v as i64).collect(),
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => {
            contents.uint_contents = values.iter().map(|v| *v as u32).collect()
        }
        DataType::Uint64 => contents.uint64_contents = values.iter().map(|v| *v as u64).collect(),
        DataType::Fp32 => contents.fp32_contents = values.iter().map(|v| *v as f32).collect(),
        DataType::Fp64 => contents.fp64_contents = values.iter().map(|v| *v as f64).collect(),
        DataType::Bytes => {
            contents.bytes_contents = values
                .iter()
                .map(|v| Bytes::from(v.to_string().into_bytes()))
                .collect()
        }
        DataType::Fp16 | DataType::Bf16 => {}
    }
    contents
}

/// The expected raw little-endian encoding of `values` for `datatype`.
fn raw_bytes(datatype: DataType, values: &[i128]) -> Vec<u8> {
    let mut out = Vec::new();
    for &v in values {
        match datatype {
            DataType::Bool => out.push(u8::from(v != 0)),
            DataType::Uint8 => out.push(v as u8),
            DataType::Int8 => out.push(v as i8 as u8),
            DataType::Uint16 => out.extend((v as u16).to_le_bytes()),
            DataType::Int16 => out.extend((v as i16).to_le_bytes()),
            DataType::Uint32 => out.extend((v as u32).to_le_bytes()),
            DataType::Int32 => out.extend((v as i32).to_le_bytes()),
            DataType::Uint64 => out.extend((v as u64).to_le_bytes()),
            DataType::Int64 => out.extend((v as i64).to_le_bytes()),
            DataType::Fp16 => out.extend(half::f16::from_f64(v as f64).to_bits().to_le_bytes()),
            DataType::Bf16 => out.extend(half::bf16::from_f64(v as f64).to_bits().to_le_bytes()),
            DataType::Fp32 => out.extend((v as f32).to_le_bytes()),
            DataType::Fp64 => out.extend((v as f64).to_le_bytes()),
            DataType::Bytes => {
                let text = v.to_string();
                out.extend((text.len() as u32).to_le_bytes());
                out.extend(text.as_bytes());
            }
        }
    }
    out
}

const VALUES: [i128; 6] = [0, 1, 2, 3, 4, 5];

#[test]
fn every_datatype_decodes_from_raw_contents() {
    for datatype in DataType::ALL {
        let raw = Bytes::from(raw_bytes(datatype, &VALUES));
        let tensors = decode_inputs(
            vec![input("x", datatype.as_str(), &[2, 3])],
            vec![raw.clone()],
        )
        .unwrap_or_else(|err| panic!("{datatype}: {err}"));
        assert_eq!(tensors.len(), 1);
        assert_eq!(tensors[0].datatype, datatype);
        assert_eq!(tensors[0].shape, vec![2, 3]);
        assert_eq!(tensors[0].element_count(), 6, "{datatype}");
        assert_eq!(tensors[0].to_raw(), raw, "{datatype} raw round trip");
    }
}

#[test]
fn every_typed_datatype_decodes_to_the_same_bytes_as_raw() {
    for datatype in DataType::ALL {
        let typed = decode_inputs(
            vec![with_contents(
                input("x", datatype.as_str(), &[6]),
                typed_contents(datatype, &VALUES),
            )],
            vec![],
        );
        if matches!(datatype, DataType::Fp16 | DataType::Bf16) {
            assert!(
                matches!(typed, Err(Error::NoTypedContents { .. })),
                "{datatype} has no typed field: {typed:?}"
            );
            continue;
        }
        let typed = typed.unwrap_or_else(|err| panic!("{datatype}: {err}"));
        assert_eq!(
            typed[0].to_raw().as_ref(),
            raw_bytes(datatype, &VALUES).as_slice(),
            "{datatype}"
        );
        // And back: typed encoding reproduces the contents.
        assert_eq!(
            typed[0].to_contents(),
            Some(typed_contents(datatype, &VALUES)),
            "{datatype}"
        );
    }
}

#[test]
fn negative_values_survive_signed_datatypes() {
    let values = [-128, -1, 0, 127];
    for datatype in [
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
    ] {
        let tensors = decode_inputs(
            vec![with_contents(
                input("x", datatype.as_str(), &[4]),
                typed_contents(datatype, &values),
            )],
            vec![],
        )
        .unwrap();
        assert_eq!(
            tensors[0].to_raw().as_ref(),
            raw_bytes(datatype, &values).as_slice()
        );
        assert_eq!(
            to_f64_values(&tensors[0]).unwrap(),
            vec![-128.0, -1.0, 0.0, 127.0]
        );
    }
}

#[test]
fn raw_byte_size_mismatch_names_the_input() {
    let err = decode_inputs(
        vec![input("INPUT0", "FP32", &[1, 16])],
        vec![Bytes::from(vec![0u8; 60])],
    )
    .unwrap_err();
    assert_eq!(
        err,
        Error::ByteSizeMismatch {
            name: "INPUT0".into(),
            datatype: DataType::Fp32,
            shape: vec![1, 16],
            expected: 64,
            actual: 60
        }
    );
    assert!(err.to_string().contains("INPUT0"));
}

#[test]
fn typed_element_count_mismatch_is_refused() {
    let err = decode_inputs(
        vec![with_contents(
            input("a", "INT32", &[2, 2]),
            typed_contents(DataType::Int32, &[1, 2, 3]),
        )],
        vec![],
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::ElementCountMismatch {
                expected: 4,
                actual: 3,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_huge_shape_with_few_typed_values_allocates_nothing() {
    // 25 bytes on the wire must not reserve terabytes (found by fuzzing).
    for shape in [vec![1i64 << 40], vec![1i64 << 61]] {
        let err = decode_inputs(
            vec![with_contents(
                input("a", "INT32", &shape),
                typed_contents(DataType::Int32, &[0]),
            )],
            vec![],
        )
        .unwrap_err();
        assert!(
            matches!(err, Error::ElementCountMismatch { actual: 1, .. }),
            "{err:?}"
        );
    }
}

#[test]
fn raw_bool_bytes_must_be_zero_or_one() {
    let err = decode_inputs(
        vec![input("b", "BOOL", &[3])],
        vec![Bytes::from_static(&[0, 1, 2])],
    )
    .unwrap_err();
    assert_eq!(
        err,
        Error::InvalidBool {
            name: "b".into(),
            index: 2,
            value: 2
        }
    );
}

#[test]
fn batch_dimensions_that_overflow_are_refused() {
    let huge = Tensor::from_raw("x", DataType::Fp32, vec![1 << 62, 0], Bytes::new()).unwrap();
    assert!(concat_batch(&[&huge, &huge]).is_err());
}

#[test]
fn typed_values_out_of_range_are_refused() {
    let cases = [
        (DataType::Int8, 128),
        (DataType::Int8, -129),
        (DataType::Int16, 40_000),
        (DataType::Uint8, 256),
        (DataType::Uint16, 70_000),
    ];
    for (datatype, value) in cases {
        let err = decode_inputs(
            vec![with_contents(
                input("v", datatype.as_str(), &[1]),
                typed_contents(datatype, &[value]),
            )],
            vec![],
        )
        .unwrap_err();
        assert!(
            matches!(err, Error::ValueOutOfRange { .. }),
            "{datatype} {value}: {err:?}"
        );
    }
}

#[test]
fn contents_in_the_wrong_field_are_refused() {
    let err = decode_inputs(
        vec![with_contents(
            input("x", "FP32", &[2]),
            typed_contents(DataType::Int32, &[1, 2]),
        )],
        vec![],
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::WrongContentsField {
                expected: "fp32_contents",
                found: "int_contents",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn malformed_bytes_elements_are_refused() {
    let cases: [(&[u8], &str); 4] = [
        (&[5, 0, 0, 0, b'a'], "exceeds"),
        (&[1, 0], "cannot hold"),
        (&[1, 0, 0, 0, b'a', 9], "left after"),
        (&[0xff, 0xff, 0xff, 0xff], "exceeds"),
    ];
    for (raw, reason) in cases {
        let err = decode_inputs(
            vec![input("s", "BYTES", &[1])],
            vec![Bytes::copy_from_slice(raw)],
        )
        .unwrap_err();
        assert!(err.to_string().contains(reason), "{raw:?}: {err}");
        assert!(matches!(err, Error::MalformedBytes { .. }));
    }
    // A huge declared element count cannot force a huge allocation.
    let err = decode_inputs(
        vec![input("s", "BYTES", &[1 << 40])],
        vec![Bytes::from_static(&[0; 8])],
    )
    .unwrap_err();
    assert!(matches!(err, Error::MalformedBytes { .. }), "{err:?}");
}

#[test]
fn invalid_shapes_and_datatypes_are_refused() {
    let err = decode_inputs(vec![input("x", "FP32", &[-1, 4])], vec![Bytes::new()]).unwrap_err();
    assert!(matches!(err, Error::NegativeDimension { .. }));
    let err = decode_inputs(
        vec![input("x", "FP32", &[i64::MAX, i64::MAX])],
        vec![Bytes::new()],
    )
    .unwrap_err();
    assert!(matches!(err, Error::ShapeTooLarge { .. }));
    let err = decode_inputs(vec![input("x", "FLOAT32", &[1])], vec![Bytes::new()]).unwrap_err();
    assert!(matches!(err, Error::UnknownDatatype { .. }));
    assert!(err.to_string().contains("FLOAT32"));
}

#[test]
fn raw_contents_must_cover_every_input_once() {
    let inputs = vec![input("a", "UINT8", &[1]), input("b", "UINT8", &[1])];
    let err = decode_inputs(inputs, vec![Bytes::from_static(&[1])]).unwrap_err();
    assert_eq!(err, Error::RawCountMismatch { raw: 1, tensors: 2 });

    let err = decode_inputs(vec![input("a", "UINT8", &[1])], vec![]).unwrap_err();
    assert_eq!(err, Error::MissingData { name: "a".into() });

    let both = with_contents(
        input("a", "UINT8", &[1]),
        typed_contents(DataType::Uint8, &[1]),
    );
    let err = decode_inputs(vec![both], vec![Bytes::from_static(&[1])]).unwrap_err();
    assert_eq!(err, Error::AmbiguousData { name: "a".into() });

    let twice = vec![input("a", "UINT8", &[1]), input("a", "UINT8", &[1])];
    let err = decode_inputs(
        twice,
        vec![Bytes::from_static(&[1]), Bytes::from_static(&[2])],
    )
    .unwrap_err();
    assert_eq!(err, Error::DuplicateTensor { name: "a".into() });
}

#[test]
fn empty_tensors_need_no_data() {
    let tensors = decode_inputs(vec![input("e", "FP32", &[0, 16])], vec![]).unwrap();
    assert_eq!(tensors[0].element_count(), 0);
}

#[test]
fn outputs_encode_as_raw_and_decode_back() {
    let tensors = vec![
        Tensor::from_raw(
            "f",
            DataType::Fp32,
            vec![2],
            Bytes::from(raw_bytes(DataType::Fp32, &[1, 2])),
        )
        .unwrap(),
        Tensor::from_raw(
            "s",
            DataType::Bytes,
            vec![2],
            Bytes::from(raw_bytes(DataType::Bytes, &[10, 200])),
        )
        .unwrap(),
    ];
    let (outputs, raw) = encode_outputs(&tensors);
    assert_eq!(outputs[1].datatype, "BYTES");
    assert_eq!(decode_outputs(outputs, raw).unwrap(), tensors);
}

#[test]
fn batches_concatenate_and_split_back_exactly() {
    for datatype in DataType::ALL {
        let a = Tensor::from_raw(
            "x",
            datatype,
            vec![1, 3],
            Bytes::from(raw_bytes(datatype, &[1, 2, 3])),
        )
        .unwrap();
        let b = Tensor::from_raw(
            "x",
            datatype,
            vec![2, 3],
            Bytes::from(raw_bytes(datatype, &[4, 5, 6, 7, 8, 9])),
        )
        .unwrap();
        let joined = concat_batch(&[&a, &b]).unwrap();
        assert_eq!(joined.shape, vec![3, 3]);
        assert_eq!(
            joined.to_raw().as_ref(),
            raw_bytes(datatype, &[1, 2, 3, 4, 5, 6, 7, 8, 9]).as_slice()
        );
        let pieces = split_batch(&joined, &[1, 2]).unwrap();
        assert_eq!(pieces, vec![a, b], "{datatype}");
    }
}

#[test]
fn batching_refuses_mismatched_tensors() {
    let a = Tensor::from_raw(
        "x",
        DataType::Uint8,
        vec![1, 2],
        Bytes::from_static(&[1, 2]),
    )
    .unwrap();
    let b = Tensor::from_raw(
        "x",
        DataType::Uint8,
        vec![1, 3],
        Bytes::from_static(&[1, 2, 3]),
    )
    .unwrap();
    assert!(concat_batch(&[&a, &b]).is_err());
    assert!(split_batch(&a, &[2]).is_err());
    let lying = Tensor {
        name: "y".into(),
        datatype: DataType::Fp32,
        shape: vec![2, 2],
        data: TensorData::Fixed(Bytes::from_static(&[0; 4])),
    };
    assert!(
        split_batch(&lying, &[1, 1]).is_err(),
        "short data is refused, not sliced"
    );
}

#[test]
fn float_helpers_round_trip() {
    for datatype in [
        DataType::Fp16,
        DataType::Bf16,
        DataType::Fp32,
        DataType::Fp64,
    ] {
        let raw = float_bytes_from_f64(datatype, &[0.5, -2.0, 3.0]).unwrap();
        let tensor = Tensor::from_raw("f", datatype, vec![3], raw).unwrap();
        assert_eq!(
            to_f64_values(&tensor).unwrap(),
            vec![0.5, -2.0, 3.0],
            "{datatype}"
        );
    }
    assert!(float_bytes_from_f64(DataType::Int32, &[1.0]).is_none());
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn decoding_arbitrary_raw_input_never_panics(
            dtype_index in 0usize..14,
            shape in proptest::collection::vec(-2i64..6, 0..4),
            raw in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let datatype = DataType::ALL[dtype_index];
            let result = decode_inputs(vec![input("x", datatype.as_str(), &shape)], vec![Bytes::from(raw.clone())]);
            if let Ok(tensors) = result {
                // Whatever decodes re-encodes to exactly the bytes received.
                let encoded = tensors[0].to_raw();
                prop_assert_eq!(encoded.as_ref(), raw.as_slice());
            }
        }

        #[test]
        fn split_inverts_concat(rows in proptest::collection::vec(0usize..4, 1..6), width in 1usize..4) {
            let parts: Vec<Tensor> = rows.iter().enumerate().map(|(i, &r)| {
                let data: Vec<u8> = (0..r * width * 4).map(|b| (b + i) as u8).collect();
                Tensor::from_raw("x", DataType::Fp32, vec![r as i64, width as i64], Bytes::from(data)).unwrap()
            }).collect();
            let refs: Vec<&Tensor> = parts.iter().collect();
            let joined = concat_batch(&refs).unwrap();
            prop_assert_eq!(split_batch(&joined, &rows).unwrap(), parts);
        }
    }
}

fn int64_values(tensor: &Tensor) -> Vec<i64> {
    let TensorData::Fixed(bytes) = &tensor.data else {
        unreachable!()
    };
    bytes
        .chunks_exact(8)
        .map(|chunk| i64::from_le_bytes(chunk.try_into().unwrap()))
        .collect()
}

fn int64_rows(name: &str, rows: &[&[i64]]) -> Tensor {
    let data: Vec<u8> = rows
        .iter()
        .flat_map(|row| row.iter())
        .flat_map(|v| v.to_le_bytes())
        .collect();
    Tensor::from_raw(
        name,
        DataType::Int64,
        vec![rows.len() as i64, rows[0].len() as i64],
        Bytes::from(data),
    )
    .unwrap()
}

#[test]
fn padding_keeps_every_element_at_its_index() {
    // [2, 2, 3] -> [2, 3, 4]
    let values: Vec<i64> = (1..=12).collect();
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let tensor = Tensor::from_raw("t", DataType::Int64, vec![2, 2, 3], Bytes::from(data)).unwrap();
    let padded = pad_zeros(&tensor, &[2, 3, 4]).unwrap();
    assert_eq!(padded.shape, vec![2, 3, 4]);
    #[rustfmt::skip]
    let expected = vec![
        1, 2, 3, 0,    4, 5, 6, 0,    0, 0, 0, 0,
        7, 8, 9, 0,    10, 11, 12, 0, 0, 0, 0, 0,
    ];
    assert_eq!(int64_values(&padded), expected);
    assert!(pad_zeros(&tensor, &[2, 1, 3]).is_err(), "never shrinks");
    let strings = Tensor {
        name: "s".into(),
        datatype: DataType::Bytes,
        shape: vec![1, 1],
        data: TensorData::Strings(vec![Bytes::new()]),
    };
    assert!(
        pad_zeros(&strings, &[1, 2]).is_err(),
        "BYTES are not padded"
    );
}

#[test]
fn padded_concatenation_pads_only_when_lengths_differ() {
    let short = int64_rows("x", &[&[1, 2]]);
    let long = int64_rows("x", &[&[3, 4, 5], &[6, 7, 8]]);
    let joined = concat_batch_padded(&[&short, &long]).unwrap();
    assert_eq!(joined.shape, vec![3, 3]);
    assert_eq!(int64_values(&joined), vec![1, 2, 0, 3, 4, 5, 6, 7, 8]);
    let same = concat_batch_padded(&[&long, &long]).unwrap();
    assert_eq!(same, concat_batch(&[&long, &long]).unwrap());
    let other_rank =
        Tensor::from_raw("x", DataType::Int64, vec![1], Bytes::from(vec![0u8; 8])).unwrap();
    assert!(matches!(
        pad_to_largest(&[&short, &other_rank]),
        Err(Error::Incompatible { .. })
    ));
}
