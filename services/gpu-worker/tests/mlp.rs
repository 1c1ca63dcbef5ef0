#![allow(clippy::unwrap_used)]
//! The candle MLP against the numpy reference of `models/generate_gpu.py`,
//! batched against unbatched, and the load errors of broken models.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use candle_core::Device;
use shamal_gpu_worker::CandleRuntime;
use shamal_tensor::{DataType, Tensor, TensorData};
use shamal_worker::{BackendError, InstanceOptions, Runtime};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn version_dir(model: &str) -> PathBuf {
    workspace_root().join(format!("models/gpu/repository/{model}/1"))
}

struct Reference {
    input_name: String,
    input: Vec<Vec<f32>>,
    output: Vec<Vec<f64>>,
    abs: f64,
    rel: f64,
}

fn reference(model: &str) -> Reference {
    let path = workspace_root().join(format!("models/gpu/reference/{model}.json"));
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let rows = |key: &str| -> Vec<Vec<f64>> {
        value[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    Reference {
        input_name: value["input_name"].as_str().unwrap().to_owned(),
        input: rows("input")
            .into_iter()
            .map(|row| row.into_iter().map(|v| v as f32).collect())
            .collect(),
        output: rows("output"),
        abs: value["tolerance"]["abs"].as_f64().unwrap(),
        rel: value["tolerance"]["rel"].as_f64().unwrap(),
    }
}

fn fp32(name: &str, rows: &[Vec<f32>]) -> Tensor {
    let width = rows.first().map_or(0, Vec::len);
    let values: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor {
        name: name.to_owned(),
        datatype: DataType::Fp32,
        shape: vec![rows.len() as i64, width as i64],
        data: TensorData::Fixed(Bytes::copy_from_slice(bytemuck::cast_slice(&values))),
    }
}

fn values(tensor: &Tensor) -> Vec<f32> {
    let TensorData::Fixed(bytes) = &tensor.data else {
        panic!("not fixed-size data")
    };
    bytemuck::pod_collect_to_vec(bytes)
}

fn runtime() -> CandleRuntime {
    CandleRuntime::new(Device::Cpu)
}

fn infer(model_file: &Path, input: Tensor) -> Result<Vec<Tensor>, BackendError> {
    let mut backend = runtime().instantiate(model_file, &InstanceOptions::default())?;
    backend.infer(vec![input])
}

fn assert_close(actual: &[f32], expected: &[f64], abs: f64, rel: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (index, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let error = (f64::from(a) - e).abs();
        assert!(
            error <= abs + rel * e.abs(),
            "{what}[{index}]: {a} vs reference {e} (error {error:e})"
        );
    }
}

#[test]
fn outputs_match_the_numpy_reference_batched_and_unbatched() {
    for model in ["mlp_demo", "mlp_regressor"] {
        let reference = reference(model);
        let model_file = version_dir(model).join("model.json");
        let signature = runtime().signature(&model_file).unwrap();
        assert!(signature.supports_batching());
        assert_eq!(signature.inputs[0].name, reference.input_name);
        assert_eq!(
            signature.inputs[0].dims,
            vec![-1, reference.input[0].len() as i64]
        );
        assert_eq!(
            signature.outputs[0].dims,
            vec![-1, reference.output[0].len() as i64]
        );

        let mut backend = runtime()
            .instantiate(&model_file, &InstanceOptions::default())
            .unwrap();
        let batched = backend
            .infer(vec![fp32(&reference.input_name, &reference.input)])
            .unwrap();
        assert_eq!(batched.len(), 1);
        assert_eq!(batched[0].name, signature.outputs[0].name);
        assert_eq!(
            batched[0].shape,
            vec![
                reference.input.len() as i64,
                reference.output[0].len() as i64
            ]
        );
        let batched = values(&batched[0]);
        let expected: Vec<f64> = reference.output.iter().flatten().copied().collect();
        assert_close(
            &batched,
            &expected,
            reference.abs,
            reference.rel,
            &format!("{model} batched"),
        );

        let width = reference.output[0].len();
        for (row, input) in reference.input.iter().enumerate() {
            let single = backend
                .infer(vec![fp32(
                    &reference.input_name,
                    std::slice::from_ref(input),
                )])
                .unwrap();
            let single = values(&single[0]);
            assert_close(
                &single,
                &reference.output[row],
                reference.abs,
                reference.rel,
                &format!("{model} row {row}"),
            );
            // Batched and unbatched agree far tighter than the reference.
            let in_batch: Vec<f64> = batched[row * width..(row + 1) * width]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            assert_close(
                &single,
                &in_batch,
                1e-6,
                1e-6,
                &format!("{model} row {row} vs batch"),
            );
        }
    }
}

#[test]
fn softmax_rows_sum_to_one_and_empty_batches_work() {
    let reference = reference("mlp_demo");
    let model_file = version_dir("mlp_demo").join("model.json");
    let outputs = infer(&model_file, fp32(&reference.input_name, &reference.input)).unwrap();
    for row in values(&outputs[0]).chunks(4) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    let mut empty = fp32(&reference.input_name, &[]);
    empty.shape = vec![0, 16];
    let outputs = infer(&model_file, empty).unwrap();
    assert_eq!(outputs[0].shape, vec![0, 4]);
}

#[test]
fn a_single_safetensors_file_embeds_its_spec() {
    // The registry's artifact: one `.safetensors` file with the spec in its
    // header metadata.
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("0123abcd.safetensors");
    std::fs::copy(version_dir("mlp_demo").join("model.safetensors"), &artifact).unwrap();
    let runtime = runtime();
    assert_eq!(runtime.formats(), ["safetensors"]);
    assert_eq!(
        runtime.signature(&artifact).unwrap(),
        runtime
            .signature(&version_dir("mlp_demo").join("model.json"))
            .unwrap()
    );
    let reference = reference("mlp_demo");
    let outputs = infer(&artifact, fp32(&reference.input_name, &reference.input)).unwrap();
    let expected: Vec<f64> = reference.output.iter().flatten().copied().collect();
    assert_close(
        &values(&outputs[0]),
        &expected,
        reference.abs,
        reference.rel,
        "artifact",
    );
}

#[test]
fn wrong_requests_are_invalid_input() {
    let model_file = version_dir("mlp_demo").join("model.json");
    let error = infer(&model_file, fp32("INPUT0", &[vec![0.0; 15]])).unwrap_err();
    assert!(
        matches!(&error, BackendError::InvalidInput(message) if message.contains("[-1, 16]")),
        "{error}"
    );
    let mut int = fp32("INPUT0", &[vec![0.0; 16]]);
    int.datatype = DataType::Int32;
    let error = infer(&model_file, int).unwrap_err();
    assert!(matches!(error, BackendError::InvalidInput(_)), "{error}");
}

/// A copy of `mlp_demo` version 1 in a temporary directory, with its spec
/// edited by `spec` and its weights by `weights`.
fn broken_model(
    dir: &Path,
    spec: impl FnOnce(&mut serde_json::Value),
    weights: impl FnOnce(&mut HashMap<String, candle_core::Tensor>),
) -> PathBuf {
    let source = version_dir("mlp_demo");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("model.json")).unwrap()).unwrap();
    spec(&mut value);
    let model_file = dir.join("model.json");
    std::fs::write(&model_file, value.to_string()).unwrap();
    let mut tensors =
        candle_core::safetensors::load(source.join("model.safetensors"), &Device::Cpu).unwrap();
    weights(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    model_file
}

fn load_error(model_file: &Path) -> String {
    let runtime = runtime();
    match runtime.signature(model_file) {
        Err(error) => error.to_string(),
        Ok(_) => match runtime.instantiate(model_file, &InstanceOptions::default()) {
            Err(error) => error.to_string(),
            Ok(_) => panic!("{} loaded", model_file.display()),
        },
    }
}

#[test]
fn broken_models_fail_to_load_naming_the_fault() {
    type Spec = fn(&mut serde_json::Value);
    type Weights = fn(&mut HashMap<String, candle_core::Tensor>);
    let cases: [(&str, Spec, Weights); 7] = [
        (
            "unknown variant `swish`",
            |spec| spec["activation"] = "swish".into(),
            |_| {},
        ),
        (
            "hidden",
            |spec| spec["hidden"] = serde_json::json!([32, 0]),
            |_| {},
        ),
        (
            "'layers.1.bias'",
            |_| {},
            |weights| {
                weights.remove("layers.1.bias");
            },
        ),
        (
            "tensor 'layers.0.weight' has shape [16, 32], the spec needs [32, 16]",
            |_| {},
            |weights| {
                let transposed = weights["layers.0.weight"]
                    .t()
                    .unwrap()
                    .contiguous()
                    .unwrap();
                weights.insert("layers.0.weight".to_owned(), transposed);
            },
        ),
        (
            "F64",
            |_| {},
            |weights| {
                let wide = weights["layers.2.bias"]
                    .to_dtype(candle_core::DType::F64)
                    .unwrap();
                weights.insert("layers.2.bias".to_owned(), wide);
            },
        ),
        (
            "layers.3.weight",
            |_| {},
            |weights| {
                let extra = weights["layers.2.bias"].clone();
                weights.insert("layers.3.weight".to_owned(), extra);
            },
        ),
        (
            // One hidden layer fewer than the weights hold.
            "tensor 'layers.1.weight' has shape [32, 32], the spec needs [4, 32]",
            |spec| spec["hidden"] = serde_json::json!([32]),
            |_| {},
        ),
    ];
    for (expected, spec, weights) in cases {
        let dir = tempfile::tempdir().unwrap();
        let model_file = broken_model(dir.path(), spec, weights);
        let error = load_error(&model_file);
        assert!(error.contains(expected), "{expected}: {error}");
    }

    let dir = tempfile::tempdir().unwrap();
    let model_file = broken_model(dir.path(), |_| {}, |_| {});
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let error = load_error(&model_file);
    assert!(
        error.contains("model.safetensors does not exist"),
        "{error}"
    );

    let dir = tempfile::tempdir().unwrap();
    let model_file = broken_model(dir.path(), |_| {}, |_| {});
    std::fs::write(dir.path().join("model.safetensors"), b"not safetensors").unwrap();
    let error = load_error(&model_file);
    assert!(error.contains("cannot read weights"), "{error}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn a_model_that_requires_cuda_fails_clearly_on_a_cpu_build() {
    let dir = tempfile::tempdir().unwrap();
    let model_file = broken_model(dir.path(), |spec| spec["device"] = "cuda".into(), |_| {});
    let error = load_error(&model_file);
    assert!(error.contains("requires device \"cuda\""), "{error}");
    assert!(error.contains("runs on cpu"), "{error}");
    // "cpu" and "auto" run on the CPU.
    let model_file = broken_model(dir.path(), |spec| spec["device"] = "cpu".into(), |_| {});
    assert!(
        runtime()
            .instantiate(&model_file, &InstanceOptions::default())
            .is_ok()
    );
}
