//! Model settings: Triton's `config.pbtxt` when the repository has one,
//! defaults derived from the model graph otherwise.

use std::collections::HashMap;
use std::time::Duration;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};
use shamal_proto::inference::model_config::SchedulingChoice;
use shamal_proto::inference::model_instance_group::Kind;
use shamal_proto::inference::{
    ModelConfig, ModelDynamicBatching, ModelInput, ModelInstanceGroup, ModelOutput, ModelParameter,
};
use shamal_tensor::DataType;

use crate::backend::{InstanceDevice, ModelSignature, TensorSpec};

/// Worker-wide defaults for models without a configuration file (or with one
/// that leaves a setting out).
#[derive(Clone, Debug)]
pub struct ModelDefaults {
    /// Largest batch formed for a model that can batch.
    pub max_batch_size: usize,
    /// How long the batcher may hold a request to fill a batch.
    pub max_queue_delay: Duration,
    /// Instances (sessions, each on its own thread) per model version.
    pub instances: usize,
    /// Requests that may wait in a model's queue before new ones are refused.
    pub max_queue_size: usize,
    /// An idle model whose single requests run within this time runs the
    /// next one on the calling thread, skipping the queue (zero: never; see
    /// `batcher`).
    pub inline_max: Duration,
}

impl Default for ModelDefaults {
    fn default() -> Self {
        ModelDefaults {
            max_batch_size: 32,
            max_queue_delay: Duration::ZERO,
            instances: 1,
            max_queue_size: 1024,
            inline_max: Duration::from_micros(2_000),
        }
    }
}

/// Dynamic batching parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct DynamicBatching {
    pub max_queue_delay: Duration,
    pub preferred_batch_sizes: Vec<usize>,
}

/// Effective settings of one model.
#[derive(Clone, Debug)]
pub struct ModelSettings {
    /// 0 when the model does not batch.
    pub max_batch_size: usize,
    /// `None`: requests run one by one.
    pub dynamic_batching: Option<DynamicBatching>,
    pub instances: usize,
    pub max_queue_size: usize,
    pub parameters: HashMap<String, String>,
}

/// A configuration that cannot be served.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(pub String);

/// Parses Triton's protobuf text format `config.pbtxt`.
pub fn parse_config_pbtxt(text: &str) -> Result<ModelConfig, SettingsError> {
    let pool = DescriptorPool::decode(shamal_proto::INFERENCE_DESCRIPTOR_SET)
        .map_err(|error| SettingsError(format!("protocol descriptors: {error}")))?;
    let descriptor = pool
        .get_message_by_name("inference.ModelConfig")
        .ok_or_else(|| SettingsError("ModelConfig descriptor missing".to_owned()))?;
    let message = DynamicMessage::parse_text_format(descriptor, &normalize_list_syntax(text))
        .map_err(|error| SettingsError(format!("config.pbtxt: {error}")))?;
    ModelConfig::decode(message.encode_to_vec().as_slice())
        .map_err(|error| SettingsError(format!("config.pbtxt: {error}")))
}

/// Triton configurations write repeated message fields as `input [ {..} ]`,
/// without the colon that the text-format parser wants before a list.
/// Inserts it, leaving strings and comments untouched.
fn normalize_list_syntax(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string: Option<char> = None;
    let mut in_comment = false;
    let mut escaped = false;
    for character in text.chars() {
        if in_comment {
            in_comment = character != '\n';
        } else if let Some(quote) = in_string {
            if escaped {
                escaped = false;
            } else if character == '\\' {
                escaped = true;
            } else if character == quote {
                in_string = None;
            }
        } else if character == '"' || character == '\'' {
            in_string = Some(character);
        } else if character == '#' {
            in_comment = true;
        } else if character == '[' {
            let previous = out.trim_end().chars().last();
            if previous.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                out.push(':');
            }
        }
        out.push(character);
    }
    out
}

/// Combines a model's optional configuration with its graph signature and the
/// worker defaults. Returns the settings and the effective configuration
/// reported by the ModelConfig RPC.
pub fn resolve(
    name: &str,
    config: Option<ModelConfig>,
    signature: &ModelSignature,
    defaults: &ModelDefaults,
    platform: &str,
    backend: &str,
) -> Result<(ModelSettings, ModelConfig), SettingsError> {
    let config = config.unwrap_or_default();
    if !config.name.is_empty() && config.name != name {
        return Err(SettingsError(format!(
            "config.pbtxt names model '{}' but its directory is '{name}'",
            config.name
        )));
    }
    match &config.scheduling_choice {
        Some(SchedulingChoice::SequenceBatching(_)) => {
            return Err(SettingsError(
                "sequence batching is not supported".to_owned(),
            ));
        }
        Some(SchedulingChoice::EnsembleScheduling(_)) => {
            return Err(SettingsError(
                "ensemble models are not supported".to_owned(),
            ));
        }
        _ => {}
    }
    check_declared_tensors(
        "input",
        config
            .input
            .iter()
            .map(|input| (&input.name, input.data_type)),
        &signature.inputs,
    )?;
    check_declared_tensors(
        "output",
        config
            .output
            .iter()
            .map(|output| (&output.name, output.data_type)),
        &signature.outputs,
    )?;

    let batchable = signature.supports_batching();
    let max_batch_size = match usize::try_from(config.max_batch_size) {
        Ok(0) if config.max_batch_size == 0 && has_explicit_shapes(&config) => 0,
        Ok(0) => {
            if batchable {
                defaults.max_batch_size
            } else {
                0
            }
        }
        Ok(size) if batchable => size,
        Ok(size) => {
            return Err(SettingsError(format!(
                "max_batch_size is {size} but the model has a fixed first dimension"
            )));
        }
        Err(_) => {
            return Err(SettingsError(format!(
                "max_batch_size must be >= 0, got {}",
                config.max_batch_size
            )));
        }
    };

    let configured_batching = match &config.scheduling_choice {
        Some(SchedulingChoice::DynamicBatching(batching)) => Some(batching.clone()),
        _ => None,
    };
    let max_queue_size = configured_batching
        .as_ref()
        .and_then(|batching| batching.default_queue_policy.as_ref())
        .map(|policy| policy.max_queue_size as usize)
        .filter(|size| *size > 0)
        .unwrap_or(defaults.max_queue_size);
    // Without a configuration file, a batchable model gets dynamic batching
    // with the worker's default delay: the sensible default for serving.
    let dynamic_batching = if max_batch_size == 0 {
        None
    } else if let Some(batching) = &configured_batching {
        let mut preferred = Vec::new();
        for &size in &batching.preferred_batch_size {
            match usize::try_from(size) {
                Ok(size) if size >= 1 && size <= max_batch_size => preferred.push(size),
                _ => {
                    return Err(SettingsError(format!(
                        "preferred_batch_size {size} must be within 1..={max_batch_size}"
                    )));
                }
            }
        }
        Some(DynamicBatching {
            max_queue_delay: Duration::from_micros(batching.max_queue_delay_microseconds),
            preferred_batch_sizes: preferred,
        })
    } else if config.max_batch_size == 0 {
        Some(DynamicBatching {
            max_queue_delay: defaults.max_queue_delay,
            preferred_batch_sizes: Vec::new(),
        })
    } else {
        None
    };

    let mut instances = 0usize;
    for group in &config.instance_group {
        if group.kind == Kind::Gpu as i32 {
            return Err(SettingsError(
                "instance_group asks for KIND_GPU; this worker runs on CPU".to_owned(),
            ));
        }
        instances += usize::try_from(group.count.max(1)).unwrap_or(1);
    }
    if instances == 0 {
        instances = defaults.instances;
    }

    let parameters: HashMap<String, String> = config
        .parameters
        .iter()
        .map(|(key, value)| (key.clone(), value.string_value.clone()))
        .collect();

    let settings = ModelSettings {
        max_batch_size,
        dynamic_batching,
        instances,
        max_queue_size,
        parameters,
    };
    let effective = effective_config(name, &config, signature, &settings, platform, backend);
    Ok((settings, effective))
}

/// Reports where the model's instances compute in its effective
/// configuration: every instance group becomes `KIND_CPU`, or `KIND_GPU`
/// with `gpus` set to the device's ordinal. (The configuration is resolved
/// before any instance exists, so it starts as `KIND_CPU`; the worker's
/// service applies the device its instances report.)
pub fn report_device(config: &mut ModelConfig, device: InstanceDevice) {
    for group in &mut config.instance_group {
        match device {
            InstanceDevice::Cpu => {
                group.kind = Kind::Cpu as i32;
                group.gpus.clear();
            }
            InstanceDevice::Gpu(ordinal) => {
                group.kind = Kind::Gpu as i32;
                group.gpus = vec![i32::try_from(ordinal).unwrap_or(i32::MAX)];
            }
        }
    }
}

fn has_explicit_shapes(config: &ModelConfig) -> bool {
    // A config that lists tensors but leaves max_batch_size at 0 means "does
    // not batch", as in Triton.
    !config.input.is_empty()
}

fn check_declared_tensors<'a>(
    kind: &str,
    declared: impl Iterator<Item = (&'a String, i32)>,
    graph: &[TensorSpec],
) -> Result<(), SettingsError> {
    for (name, data_type) in declared {
        let Some(spec) = graph.iter().find(|spec| &spec.name == name) else {
            return Err(SettingsError(format!(
                "config.pbtxt declares {kind} '{name}', which the model does not have"
            )));
        };
        if data_type != 0 && DataType::from_config(data_type) != Some(spec.datatype) {
            return Err(SettingsError(format!(
                "config.pbtxt declares {kind} '{name}' with another datatype than the model's {}",
                spec.datatype
            )));
        }
    }
    Ok(())
}

fn config_dims(spec: &TensorSpec, batching: bool) -> Vec<i64> {
    if batching {
        spec.dims.iter().skip(1).copied().collect()
    } else {
        spec.dims.clone()
    }
}

fn effective_config(
    name: &str,
    declared: &ModelConfig,
    signature: &ModelSignature,
    settings: &ModelSettings,
    platform: &str,
    backend: &str,
) -> ModelConfig {
    let batching = settings.max_batch_size > 0;
    ModelConfig {
        name: name.to_owned(),
        platform: platform.to_owned(),
        backend: backend.to_owned(),
        max_batch_size: i32::try_from(settings.max_batch_size).unwrap_or(i32::MAX),
        input: signature
            .inputs
            .iter()
            .map(|spec| ModelInput {
                name: spec.name.clone(),
                data_type: spec.datatype.to_config() as i32,
                dims: config_dims(spec, batching),
                ..Default::default()
            })
            .collect(),
        output: signature
            .outputs
            .iter()
            .map(|spec| ModelOutput {
                name: spec.name.clone(),
                data_type: spec.datatype.to_config() as i32,
                dims: config_dims(spec, batching),
                ..Default::default()
            })
            .collect(),
        scheduling_choice: settings.dynamic_batching.as_ref().map(|batching| {
            SchedulingChoice::DynamicBatching(ModelDynamicBatching {
                preferred_batch_size: batching
                    .preferred_batch_sizes
                    .iter()
                    .map(|&size| i32::try_from(size).unwrap_or(i32::MAX))
                    .collect(),
                max_queue_delay_microseconds: u64::try_from(batching.max_queue_delay.as_micros())
                    .unwrap_or(u64::MAX),
                ..Default::default()
            })
        }),
        instance_group: vec![ModelInstanceGroup {
            name: format!("{name}_0"),
            kind: Kind::Cpu as i32,
            count: i32::try_from(settings.instances).unwrap_or(i32::MAX),
            ..Default::default()
        }],
        parameters: declared
            .parameters
            .iter()
            .map(|(key, value)| {
                (
                    key.clone(),
                    ModelParameter {
                        string_value: value.string_value.clone(),
                    },
                )
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signature(first_dim: i64) -> ModelSignature {
        ModelSignature {
            inputs: vec![TensorSpec {
                name: "INPUT0".into(),
                datatype: DataType::Fp32,
                dims: vec![first_dim, 16],
            }],
            outputs: vec![TensorSpec {
                name: "OUTPUT0".into(),
                datatype: DataType::Fp32,
                dims: vec![first_dim, 4],
            }],
        }
    }

    fn resolve_text(
        text: &str,
        first_dim: i64,
    ) -> Result<(ModelSettings, ModelConfig), SettingsError> {
        let config = parse_config_pbtxt(text)?;
        resolve(
            "demo",
            Some(config),
            &signature(first_dim),
            &ModelDefaults::default(),
            "p",
            "b",
        )
    }

    #[test]
    fn triton_config_pbtxt_is_read() {
        let (settings, effective) = resolve_text(
            r#"
            name: "demo"
            platform: "onnxruntime_onnx"
            max_batch_size: 64
            input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
            dynamic_batching {
              preferred_batch_size: [ 8, 16 ]
              max_queue_delay_microseconds: 250
              default_queue_policy { max_queue_size: 7 }
            }
            instance_group [ { count: 2 kind: KIND_CPU } ]
            parameters { key: "intra_op_thread_count" value: { string_value: "2" } }
            "#,
            -1,
        )
        .unwrap();
        assert_eq!(settings.max_batch_size, 64);
        assert_eq!(
            settings.dynamic_batching,
            Some(DynamicBatching {
                max_queue_delay: Duration::from_micros(250),
                preferred_batch_sizes: vec![8, 16]
            })
        );
        assert_eq!(settings.instances, 2);
        assert_eq!(settings.max_queue_size, 7);
        assert_eq!(settings.parameters["intra_op_thread_count"], "2");
        assert_eq!(effective.input[0].dims, vec![16]);
        assert_eq!(effective.max_batch_size, 64);
    }

    #[test]
    fn defaults_derive_from_the_graph() {
        let defaults = ModelDefaults::default();
        let (settings, effective) =
            resolve("demo", None, &signature(-1), &defaults, "p", "b").unwrap();
        assert_eq!(settings.max_batch_size, defaults.max_batch_size);
        assert!(settings.dynamic_batching.is_some());
        assert!(matches!(
            effective.scheduling_choice,
            Some(SchedulingChoice::DynamicBatching(_))
        ));

        let (settings, effective) =
            resolve("demo", None, &signature(1), &defaults, "p", "b").unwrap();
        assert_eq!(settings.max_batch_size, 0);
        assert!(settings.dynamic_batching.is_none());
        assert!(
            effective.scheduling_choice.is_none(),
            "no dynamic_batching when it is off"
        );
        assert_eq!(effective.input[0].dims, vec![1, 16]);
    }

    #[test]
    fn the_instances_device_is_reported() {
        let (_, mut effective) = resolve(
            "demo",
            None,
            &signature(-1),
            &ModelDefaults::default(),
            "p",
            "b",
        )
        .unwrap();
        assert_eq!(effective.instance_group[0].kind, Kind::Cpu as i32);
        report_device(&mut effective, InstanceDevice::Gpu(1));
        assert_eq!(effective.instance_group[0].kind, Kind::Gpu as i32);
        assert_eq!(effective.instance_group[0].gpus, vec![1]);
        report_device(&mut effective, InstanceDevice::Cpu);
        assert_eq!(effective.instance_group[0].kind, Kind::Cpu as i32);
        assert!(effective.instance_group[0].gpus.is_empty());
    }

    #[test]
    fn configurations_that_cannot_be_served_are_refused_clearly() {
        let cases = [
            ("max_batch_size: 8", 1, "fixed first dimension"),
            ("name: \"other\"", -1, "directory is 'demo'"),
            (
                "input [ { name: \"NOPE\" data_type: TYPE_FP32 } ]",
                -1,
                "'NOPE'",
            ),
            (
                "input [ { name: \"INPUT0\" data_type: TYPE_INT8 } ]",
                -1,
                "datatype",
            ),
            ("sequence_batching { }", -1, "sequence batching"),
            ("instance_group [ { kind: KIND_GPU } ]", -1, "KIND_GPU"),
            (
                "max_batch_size: 4 dynamic_batching { preferred_batch_size: [ 9 ] }",
                -1,
                "preferred_batch_size",
            ),
            ("max_batch_size: oops", -1, "config.pbtxt"),
            ("unknown_field: 1", -1, "config.pbtxt"),
        ];
        for (text, first_dim, expected) in cases {
            let error = resolve_text(text, first_dim).unwrap_err();
            assert!(error.0.contains(expected), "{text}: {error}");
        }
    }
}
