//! Generated code for Shamal's wire protocols.
//!
//! `inference` is the KServe v2 / Open Inference Protocol as Triton defines it;
//! `shamal::*` are the internal service protocols.
//! tonic and prost are re-exported so that every crate agrees on their versions.

pub use prost;
pub use tonic;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod inference {
    tonic::include_proto!("inference");
}

/// Shamal's own internal protocols.
pub mod shamal {
    /// The model registry (versions, aliases, rollouts, placements, Watch).
    pub mod registry {
        #[allow(clippy::all, clippy::pedantic, missing_docs)]
        pub mod v1 {
            tonic::include_proto!("shamal.registry.v1");
        }
    }

    /// The audit log (append, query, export, verify).
    pub mod audit {
        #[allow(clippy::all, clippy::pedantic, missing_docs)]
        pub mod v1 {
            tonic::include_proto!("shamal.audit.v1");
        }
    }

    /// Batch inference (jobs over datasets, and the shard tasks workers
    /// take from the batch queue).
    pub mod batch {
        #[allow(clippy::all, clippy::pedantic, missing_docs)]
        pub mod v1 {
            tonic::include_proto!("shamal.batch.v1");
        }
    }

    /// Asynchronous inference (submit now, fetch the answer by id later).
    pub mod r#async {
        #[allow(clippy::all, clippy::pedantic, missing_docs)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/async/shamal.r#async.v1.rs"));
        }
    }
}

/// Encoded `FileDescriptorSet` of the inference protocol, used to parse Triton
/// `config.pbtxt` files through reflection.
pub const INFERENCE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/inference_descriptor.bin"));

/// Encoded `FileDescriptorSet` of the registry's internal protocol: its
/// tests walk every method (each must have an access policy).
pub const REGISTRY_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/registry_descriptor.bin"));

/// Encoded `FileDescriptorSet` of the audit protocol: its tests walk every
/// method (each must have an access policy).
pub const AUDIT_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/audit_descriptor.bin"));

/// Encoded `FileDescriptorSet` of the asynchronous inference protocol.
pub const ASYNC_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/async_descriptor.bin"));

/// Encoded `FileDescriptorSet` of the batch protocol: its tests walk every
/// method (each must have an access policy).
pub const BATCH_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/batch_descriptor.bin"));
