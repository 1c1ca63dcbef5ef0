//! Protocol messages (metadata, config, statistics, the repository index)
//! as JSON, for the HTTP twin of the gRPC API.

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::Value;

/// Why a protocol message could not be rendered as JSON: a defect of the
/// router or its descriptor set, never of the caller's request.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("the inference descriptor set does not decode: {0}")]
    Descriptors(String),
    #[error("no descriptor for {0}")]
    UnknownMessage(String),
    #[error("cannot render {message}: {reason}")]
    Message { message: String, reason: String },
}

/// Renders a protocol message as JSON with Triton's conventions: proto field
/// names, enum names, 64-bit integers as numbers, defaults included.
pub fn message_json<M: Message>(message: &M, full_name: &str) -> Result<Value, RenderError> {
    static POOL: std::sync::OnceLock<Result<DescriptorPool, String>> = std::sync::OnceLock::new();
    let pool = POOL
        .get_or_init(|| {
            DescriptorPool::decode(shamal_proto::INFERENCE_DESCRIPTOR_SET)
                .map_err(|error| error.to_string())
        })
        .as_ref()
        .map_err(|error| RenderError::Descriptors(error.clone()))?;
    let descriptor = pool
        .get_message_by_name(full_name)
        .ok_or_else(|| RenderError::UnknownMessage(full_name.to_owned()))?;
    let failed = |reason: String| RenderError::Message {
        message: full_name.to_owned(),
        reason,
    };
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .map_err(|error| failed(error.to_string()))?;
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(false)
        .skip_default_fields(false);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|error| failed(error.to_string()))
}
