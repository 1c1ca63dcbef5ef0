//! Arbitrary bytes -> `ModelInferRequest` -> `decode_inputs`, then the codec's
//! round-trip invariants on every decoded tensor. Any panic (or an allocation
//! over libFuzzer's -malloc_limit_mb) is a bug in shamal-tensor.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use shamal_proto::inference::ModelInferRequest;
use shamal_tensor::{
    Tensor, concat_batch, decode_inputs, decode_outputs, encode_inputs, encode_outputs,
    split_batch, to_f64_values,
};

/// Batches up to this size are split into single rows; larger ones (possible
/// when a later dimension is 0) into [1, n - 1], to keep the harness linear in
/// the input size.
const MAX_ROW_SPLIT: usize = 256;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = ModelInferRequest::decode(data) else {
        return;
    };
    let Ok(tensors) = decode_inputs(request.inputs, request.raw_input_contents) else {
        return;
    };
    for tensor in &tensors {
        check_tensor(tensor);
    }

    // Whole-request round trips, as a client and as a worker would do them.
    let (inputs, raw) = encode_inputs(&tensors);
    assert_eq!(
        decode_inputs(inputs, raw).as_ref(),
        Ok(&tensors),
        "encode_inputs round trip"
    );
    let (outputs, raw) = encode_outputs(&tensors);
    assert_eq!(
        decode_outputs(outputs, raw).as_ref(),
        Ok(&tensors),
        "encode_outputs round trip"
    );
});

fn check_tensor(tensor: &Tensor) {
    let expected_count = shamal_tensor::element_count(&tensor.name, &tensor.shape)
        .expect("a decoded tensor has a valid shape");
    assert_eq!(
        tensor.element_count(),
        expected_count,
        "element count of {tensor:?}"
    );

    // Raw contents round trip.
    let raw = tensor.to_raw();
    let again = Tensor::from_raw(&tensor.name, tensor.datatype, tensor.shape.clone(), raw)
        .expect("to_raw output must decode with from_raw");
    assert_eq!(&again, tensor, "to_raw/from_raw round trip");

    // Typed contents round trip (None only for FP16/BF16).
    if let Some(contents) = tensor.to_contents() {
        let again = Tensor::from_contents(
            &tensor.name,
            tensor.datatype,
            tensor.shape.clone(),
            &contents,
        )
        .expect("to_contents output must decode with from_contents");
        assert_eq!(&again, tensor, "to_contents/from_contents round trip");
    }

    // JSON rendering path: one f64 per element for fixed-size types.
    if let Some(values) = to_f64_values(tensor) {
        assert_eq!(values.len(), expected_count, "to_f64_values length");
    }

    // Batch split then concat gives the tensor back.
    if let Some(&batch) = tensor.shape.first() {
        if batch > 0 {
            let n = usize::try_from(batch).expect("dims are >= 0");
            let sizes = if n <= MAX_ROW_SPLIT {
                vec![1; n]
            } else {
                vec![1, n - 1]
            };
            let pieces = split_batch(tensor, &sizes).expect("split_batch of a decoded tensor");
            assert_eq!(pieces.len(), sizes.len());
            let refs: Vec<&Tensor> = pieces.iter().collect();
            let joined = concat_batch(&refs).expect("concat_batch of split pieces");
            assert_eq!(&joined, tensor, "split_batch/concat_batch round trip");
        }
    }
}
