//! Shamal's worker framework: everything a worker does except running the
//! model. A runtime (ONNX Runtime in the cpu-worker, candle in the
//! gpu-worker) implements [`Runtime`] and [`Backend`]; this crate provides
//! the KServe v2 gRPC service, the dynamic batcher, the Triton-layout model
//! repository, warm-up, statistics and metrics.

pub mod agent;
pub mod async_consumer;
pub mod auth;
pub mod backend;
pub mod batch_role;
pub mod batcher;
pub mod node;
pub mod repository;
pub mod server;
pub mod service;
pub mod settings;
pub mod stats;

pub use agent::{RegistryAgentSettings, validate_agent_settings};
pub use async_consumer::{ASYNC_RUN, AsyncInference, QueueSource};
pub use backend::{Backend, BackendError, InstanceOptions, ModelSignature, Runtime, TensorSpec};
pub use batch_role::{BATCH_SHARD, BatchRole};
pub use batcher::{Batcher, BatcherConfig, InferError, InlineSlots};
pub use node::{AuditArgs, BatchArgs, BatchRoleConfig, NodeArgs, NodeConfig};
pub use server::{Worker, WorkerConfig, WorkerListeners, run};
pub use settings::ModelDefaults;
pub use shamal_registry_client::names;
