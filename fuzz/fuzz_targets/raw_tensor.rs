//! Structured input -> `Tensor::from_raw`: it never panics, and success means
//! the raw bytes were taken as they are (`to_raw()` gives them back).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use shamal_tensor::{DataType, Tensor};

#[derive(Debug, Arbitrary)]
enum Dim {
    /// Small dimensions (including negative ones) make byte sizes that match.
    Small(i8),
    /// Anything, to reach the overflow and negative-dimension paths.
    Any(i64),
}

#[derive(Debug, Arbitrary)]
struct Input {
    datatype: u8,
    shape: Vec<Dim>,
    raw: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let datatype = DataType::ALL[usize::from(input.datatype) % DataType::ALL.len()];
    let shape: Vec<i64> = input
        .shape
        .iter()
        .take(8)
        .map(|dim| match *dim {
            Dim::Small(value) => i64::from(value),
            Dim::Any(value) => value,
        })
        .collect();
    let raw = Bytes::from(input.raw);
    if let Ok(tensor) = Tensor::from_raw("t", datatype, shape.clone(), raw.clone()) {
        assert_eq!(tensor.datatype, datatype);
        assert_eq!(tensor.shape, shape);
        assert_eq!(
            tensor.to_raw(),
            raw,
            "to_raw must give back the accepted raw bytes"
        );
        let count = shamal_tensor::element_count("t", &shape).expect("accepted shape is valid");
        assert_eq!(tensor.element_count(), count);
    }
});
