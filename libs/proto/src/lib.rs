//! Generated code for Shamal's wire protocols.
//!
//! `inference` is the KServe v2 / Open Inference Protocol as Triton defines it.
//! tonic and prost are re-exported so that every crate agrees on their versions.

pub use prost;
pub use tonic;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod inference {
    tonic::include_proto!("inference");
}

/// Encoded `FileDescriptorSet` of the inference protocol, used to parse Triton
/// `config.pbtxt` files through reflection.
pub const INFERENCE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/inference_descriptor.bin"));
