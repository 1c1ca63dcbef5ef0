#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]
//! The candle models on a CUDA GPU against the numpy references the CPU
//! tests use (`models/generate_gpu.py`): FP32 within the references'
//! tolerance, FP16 and BF16 within half precision's, GPU against CPU, and
//! the worker served over gRPC reporting its GPU in ServerMetadata,
//! ModelConfig and metrics.
//!
//! Built with `--features cuda` only. Without a usable GPU each test says
//! why and passes, unless `SHAMAL_REQUIRE_CUDA=1` (set by
//! `scripts/gpu-device-check.sh`), when it fails. The models and references
//! are read from the workspace this binary was built in, or from
//! `SHAMAL_WORKSPACE_ROOT` when the binary runs elsewhere (a GPU host with
//! a copy of the repository but no Rust toolchain).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use candle_core::Device;
use shamal_gpu_worker::{CandleRuntime, DevicePreference, GpuWorkerArgs, GpuWorkerConfig, device};
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::inference::model_instance_group::Kind;
use shamal_proto::inference::{
    ModelConfigRequest, ModelInferRequest, ServerMetadataRequest, ServerReadyRequest,
};
use shamal_tensor::{DataType, Tensor, TensorData, decode_outputs, encode_inputs};
use shamal_worker::backend::InstanceDevice;
use shamal_worker::{Backend, InstanceOptions, Runtime, WorkerListeners};

fn workspace_root() -> PathBuf {
    std::env::var_os("SHAMAL_WORKSPACE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

fn version_dir(model: &str) -> PathBuf {
    workspace_root().join(format!("models/gpu/repository/{model}/1"))
}

fn reference(model: &str) -> serde_json::Value {
    let path = workspace_root().join(format!("models/gpu/reference/{model}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn matrix<T: serde::de::DeserializeOwned>(value: &serde_json::Value) -> Vec<Vec<T>> {
    serde_json::from_value(value.clone()).unwrap()
}

/// CUDA device 0, or `None` (the test then passes) when there is none and
/// `SHAMAL_REQUIRE_CUDA` is not `1`.
fn cuda() -> Option<Device> {
    match device::open_cuda(0) {
        Ok(device) => Some(device),
        Err(reason) if std::env::var("SHAMAL_REQUIRE_CUDA").as_deref() == Ok("1") => {
            panic!("SHAMAL_REQUIRE_CUDA=1 but {reason}")
        }
        Err(reason) => {
            eprintln!("skipping: {reason}");
            None
        }
    }
}

/// The precision a model computes in, with the error the comparison allows.
#[derive(Clone, Copy, Debug)]
enum Precision {
    /// The reference file's own tolerance.
    Float32,
    Float16,
    Bfloat16,
}

impl Precision {
    fn spec_dtype(self) -> &'static str {
        match self {
            Precision::Float32 => "float32",
            Precision::Float16 => "float16",
            Precision::Bfloat16 => "bfloat16",
        }
    }

    /// `(abs, rel)` per element. Half precision rounds weights and
    /// activations to 11 (FP16) or 8 (BF16) significant bits: relative
    /// steps of 4.9e-4 and 3.9e-3, a few of which add up through the
    /// layers; the outputs are probabilities, unit-norm embeddings or
    /// values of order 1, so the bound is mostly absolute.
    fn tolerance(self, reference: &serde_json::Value) -> (f64, f64) {
        match self {
            Precision::Float32 => (
                reference["tolerance"]["abs"].as_f64().unwrap(),
                reference["tolerance"]["rel"].as_f64().unwrap(),
            ),
            Precision::Float16 => (1e-2, 1e-2),
            Precision::Bfloat16 => (5e-2, 5e-2),
        }
    }
}

fn assert_close(actual: &[f32], expected: &[f64], (abs, rel): (f64, f64), what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (index, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let error = (f64::from(a) - e).abs();
        assert!(
            error <= abs + rel * e.abs(),
            "{what}[{index}]: {a} vs reference {e} (error {error:e})"
        );
    }
}

/// A copy of `model`'s version directory in `dir`, computing in `precision`.
fn model_in(model: &str, precision: Precision, dir: &Path) -> PathBuf {
    for entry in std::fs::read_dir(version_dir(model)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let model_file = dir.join("model.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&model_file).unwrap()).unwrap();
    spec["dtype"] = precision.spec_dtype().into();
    std::fs::write(&model_file, spec.to_string()).unwrap();
    model_file
}

fn instance(device: &Device, model_file: &Path) -> Box<dyn Backend> {
    CandleRuntime::new(device.clone())
        .instantiate(model_file, &InstanceOptions::default())
        .unwrap()
}

fn fp32(name: &str, rows: &[Vec<f32>]) -> Tensor {
    let values: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor {
        name: name.to_owned(),
        datatype: DataType::Fp32,
        shape: vec![rows.len() as i64, rows[0].len() as i64],
        data: TensorData::Fixed(Bytes::copy_from_slice(bytemuck::cast_slice(&values))),
    }
}

fn int64(name: &str, rows: &[Vec<i64>]) -> Tensor {
    let data: Vec<u8> = rows
        .iter()
        .flatten()
        .flat_map(|value| value.to_le_bytes())
        .collect();
    Tensor {
        name: name.to_owned(),
        datatype: DataType::Int64,
        shape: vec![rows.len() as i64, rows[0].len() as i64],
        data: TensorData::Fixed(Bytes::from(data)),
    }
}

fn text(items: &[String]) -> Tensor {
    Tensor {
        name: "text".to_owned(),
        datatype: DataType::Bytes,
        shape: vec![items.len() as i64],
        data: TensorData::Strings(
            items
                .iter()
                .map(|item| Bytes::copy_from_slice(item.as_bytes()))
                .collect(),
        ),
    }
}

fn values(outputs: &[Tensor]) -> Vec<f32> {
    let TensorData::Fixed(bytes) = &outputs[0].data else {
        panic!("not fixed-size data")
    };
    bytemuck::pod_collect_to_vec(bytes)
}

/// Pads rows with zeros to the longest.
fn padded(rows: &[Vec<i64>]) -> Vec<Vec<i64>> {
    let len = rows.iter().map(Vec::len).max().unwrap();
    rows.iter()
        .map(|row| {
            let mut row = row.clone();
            row.resize(len, 0);
            row
        })
        .collect()
}

/// Both MLPs in `precision`: the whole batch, then each row alone.
fn check_mlps(device: &Device, precision: Precision) {
    for model in ["mlp_demo", "mlp_regressor"] {
        let reference = reference(model);
        let tolerance = precision.tolerance(&reference);
        let input_name = reference["input_name"].as_str().unwrap();
        let input: Vec<Vec<f32>> = matrix(&reference["input"]);
        let output: Vec<Vec<f64>> = matrix(&reference["output"]);
        let dir = tempfile::tempdir().unwrap();
        let mut backend = instance(device, &model_in(model, precision, dir.path()));
        assert_eq!(backend.device(), InstanceDevice::Gpu(0), "{model}");

        let batched = values(&backend.infer(vec![fp32(input_name, &input)]).unwrap());
        let expected: Vec<f64> = output.iter().flatten().copied().collect();
        let what = format!("{model} {precision:?} batched");
        assert_close(&batched, &expected, tolerance, &what);
        for (row, expected) in input.iter().zip(&output) {
            let single = values(
                &backend
                    .infer(vec![fp32(input_name, std::slice::from_ref(row))])
                    .unwrap(),
            );
            assert_close(
                &single,
                expected,
                tolerance,
                &format!("{model} {precision:?} row"),
            );
        }
    }
}

/// Both sentence encoders in `precision`: token ids alone and in a padded
/// batch, and text in one batch.
fn check_encoders(device: &Device, precision: Precision) {
    let reference_ids = reference("minilm_tiny");
    let tolerance = precision.tolerance(&reference_ids);
    let ids: Vec<Vec<i64>> = matrix(&reference_ids["input_ids"]);
    let mask: Vec<Vec<i64>> = matrix(&reference_ids["attention_mask"]);
    let expected: Vec<Vec<f64>> = matrix(&reference_ids["embedding"]);
    let dir = tempfile::tempdir().unwrap();
    let mut backend = instance(device, &model_in("minilm_tiny", precision, dir.path()));
    assert_eq!(backend.device(), InstanceDevice::Gpu(0));
    for (row, expected) in expected.iter().enumerate() {
        let alone = values(
            &backend
                .infer(vec![
                    int64("input_ids", &ids[row..=row]),
                    int64("attention_mask", &mask[row..=row]),
                ])
                .unwrap(),
        );
        let what = format!("minilm_tiny {precision:?} row {row} alone");
        assert_close(&alone, expected, tolerance, &what);
    }
    let batched = values(
        &backend
            .infer(vec![
                int64("input_ids", &padded(&ids)),
                int64("attention_mask", &padded(&mask)),
            ])
            .unwrap(),
    );
    let flat: Vec<f64> = expected.iter().flatten().copied().collect();
    let what = format!("minilm_tiny {precision:?} padded batch");
    assert_close(&batched, &flat, tolerance, &what);

    let reference_text = reference("minilm_tiny_text");
    let tolerance = precision.tolerance(&reference_text);
    let sentences: Vec<String> = serde_json::from_value(reference_text["text"].clone()).unwrap();
    let expected: Vec<f64> = matrix::<f64>(&reference_text["embedding"])
        .into_iter()
        .flatten()
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let mut backend = instance(device, &model_in("minilm_tiny_text", precision, dir.path()));
    let embedded = values(&backend.infer(vec![text(&sentences)]).unwrap());
    let what = format!("minilm_tiny_text {precision:?}");
    assert_close(&embedded, &expected, tolerance, &what);
}

#[test]
fn float32_matches_the_numpy_reference_on_the_gpu() {
    let Some(device) = cuda() else { return };
    check_mlps(&device, Precision::Float32);
    check_encoders(&device, Precision::Float32);
}

#[test]
fn float16_matches_the_numpy_reference_on_the_gpu() {
    let Some(device) = cuda() else { return };
    check_mlps(&device, Precision::Float16);
    check_encoders(&device, Precision::Float16);
}

#[test]
fn bfloat16_matches_the_numpy_reference_on_the_gpu() {
    let Some(device) = cuda() else { return };
    check_mlps(&device, Precision::Bfloat16);
    check_encoders(&device, Precision::Bfloat16);
}

#[test]
fn gpu_and_cpu_agree_and_a_model_may_pin_the_cpu() {
    let Some(device) = cuda() else { return };
    let reference = reference("minilm_tiny");
    let ids: Vec<Vec<i64>> = matrix(&reference["input_ids"]);
    let mask: Vec<Vec<i64>> = matrix(&reference["attention_mask"]);
    let inputs = vec![
        int64("input_ids", &padded(&ids)),
        int64("attention_mask", &padded(&mask)),
    ];
    let model_file = version_dir("minilm_tiny").join("model.json");
    let on_gpu = values(
        &instance(&device, &model_file)
            .infer(inputs.clone())
            .unwrap(),
    );
    let on_cpu = values(&instance(&Device::Cpu, &model_file).infer(inputs).unwrap());
    let on_cpu: Vec<f64> = on_cpu.iter().map(|&value| f64::from(value)).collect();
    assert_close(&on_gpu, &on_cpu, (1e-5, 1e-4), "GPU vs CPU");

    // `"device": "cpu"` keeps a model on the CPU of a GPU worker.
    let dir = tempfile::tempdir().unwrap();
    let pinned = model_in("mlp_demo", Precision::Float32, dir.path());
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&pinned).unwrap()).unwrap();
    spec["device"] = "cpu".into();
    std::fs::write(&pinned, spec.to_string()).unwrap();
    assert_eq!(instance(&device, &pinned).device(), InstanceDevice::Cpu);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reports_and_serves_from_its_gpu() {
    if cuda().is_none() {
        return;
    }
    let config = GpuWorkerConfig::load(&GpuWorkerArgs {
        device: Some(DevicePreference::Cuda),
        node: shamal_worker::NodeArgs {
            model_repository: Some(workspace_root().join("models/gpu/repository")),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = grpc.local_addr().unwrap();
    let metrics = shamal_telemetry::MetricsRegistry::new();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(shamal_gpu_worker::run(
        config,
        WorkerListeners {
            grpc,
            metrics: None,
        },
        metrics.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let mut ready = false;
    for _ in 0..600 {
        ready = client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready;
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "worker never became ready");

    let metadata = client
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        metadata.version,
        format!("{}+cuda.0", env!("CARGO_PKG_VERSION"))
    );
    let config = client
        .model_config(ModelConfigRequest {
            name: "minilm_tiny".to_owned(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.instance_group[0].kind, Kind::Gpu as i32);
    assert_eq!(config.instance_group[0].gpus, vec![0]);
    let mut text = Vec::new();
    shamal_telemetry::Encoder::encode(
        &shamal_telemetry::TextEncoder::new(),
        &metrics.gather(),
        &mut text,
    )
    .unwrap();
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains("shamal_gpu_worker_device_info{device=\"cuda:0\"} 1"),
        "{text}"
    );

    let reference = reference("mlp_demo");
    let input: Vec<Vec<f32>> = matrix(&reference["input"]);
    let expected: Vec<f64> = matrix::<f64>(&reference["output"])
        .into_iter()
        .flatten()
        .collect();
    let (inputs, raw_input_contents) = encode_inputs(&[fp32("INPUT0", &input)]);
    let response = client
        .model_infer(ModelInferRequest {
            model_name: "mlp_demo".to_owned(),
            inputs,
            raw_input_contents,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let outputs = decode_outputs(response.outputs, response.raw_output_contents).unwrap();
    let tolerance = Precision::Float32.tolerance(&reference);
    assert_close(
        &values(&outputs),
        &expected,
        tolerance,
        "mlp_demo over gRPC",
    );

    stop.send(()).unwrap();
    worker.await.unwrap().unwrap();
}
