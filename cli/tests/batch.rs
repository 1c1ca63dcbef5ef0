//! `shamal batch` end to end through a real `shamal up` process (free
//! ports, a temporary data directory, the bundled repository): a JSON
//! Lines and a CSV dataset for the `demo` model submitted with `--wait`,
//! their output Parquet parts checked row by row against the same rows
//! scored through up's router (v2 gRPC ModelInfer), key columns carried,
//! the manifest listing the parts; `status`, `list` and `cancel`; a missing
//! column, an unknown model and an unreadable path refused naming them,
//! with nothing written; a job whose rows do not fit failing (exit 8) and
//! a cancelled one (exit 9); an encrypted job (`--encrypt`, up's
//! `--batch-key-file`) whose parts are not stored as Parquet, read back by
//! `batch decrypt` into the plain job's rows, and refused without a key
//! ring, under a ring without its key id, under the wrong key, for a
//! tampered part and into a non-empty directory; the progress of a command
//! whose stdout is not a terminal in plain lines; the jobs in the embedded
//! audit log.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float32Type, Int64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;
use shamal_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use shamal_proto::inference::model_infer_request::InferInputTensor;
use shamal_proto::inference::{ModelInferRequest, ServerReadyRequest};

/// Rows of each dataset.
const ROWS: usize = 150;
/// The demo model: FP32 [-1, 16] in, FP32 [-1, 4] out.
const INPUTS: usize = 16;
const OUTPUTS: usize = 4;

/// A port free now (bound and released).
/// `count` distinct free ports: every listener is held until all are
/// chosen, so that the system cannot hand the same port out twice.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().unwrap().port())
        .collect()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A `shamal up` process, killed when dropped.
struct Up {
    child: Child,
    log: PathBuf,
    grpc: String,
    batch: String,
    audit: String,
    /// The embedded registry's REST API.
    registry: String,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Up {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The key the workers encrypt batch outputs under (id `k1`), and
/// another one (32 bytes each, base64).
const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const OTHER_KEY: &str = "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoM=";

/// A key file (TOML, mode 0600) holding `key` as `id`, active.
fn write_key_file(path: &Path, id: &str, key: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(
        path,
        format!("active = \"{id}\"\n[keys]\n{id} = \"{key}\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_path_buf()
}

/// Starts `shamal up` (no gpu-worker), its workers encrypting batch
/// outputs under [`KEY`] (`--batch-key-file`), on free ports with its data in
/// `data_dir`, and waits for its banner.
async fn start_up(data_dir: &Path) -> Up {
    let ports = free_ports(8);
    let key_file = write_key_file(&data_dir.join("batch-keys.toml"), "k1", KEY);
    let log = data_dir.join("up.log");
    let out = File::create(&log).unwrap();
    let err = out.try_clone().unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_shamal"))
        .current_dir(workspace())
        .args(["up", "--no-gpu-worker", "--model-repository"])
        .arg(workspace().join("models/repository"))
        .arg("--data-dir")
        .arg(data_dir.join("shamal"))
        .args(["--http-port", &ports[0].to_string()])
        .args(["--grpc-port", &ports[1].to_string()])
        .args(["--metrics-port", &ports[2].to_string()])
        .args(["--registry-http-port", &ports[3].to_string()])
        .args(["--registry-grpc-port", &ports[4].to_string()])
        .args(["--audit-grpc-port", &ports[5].to_string()])
        .args(["--batch-grpc-port", &ports[6].to_string()])
        .args(["--batch-http-port", &ports[7].to_string()])
        .arg("--batch-key-file")
        .arg(&key_file)
        .env("RUST_LOG", "warn")
        .env_remove("SHAMAL_OIDC_ISSUER")
        .env_remove("SHAMAL_MODEL_REPOSITORY")
        .env_remove("SHAMAL_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    let mut up = Up {
        child,
        log,
        grpc: format!("127.0.0.1:{}", ports[1]),
        batch: format!("http://127.0.0.1:{}", ports[6]),
        audit: format!("http://127.0.0.1:{}", ports[5]),
        registry: format!("http://127.0.0.1:{}", ports[3]),
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if up.log().contains("Press Ctrl-C to stop.") {
            break;
        }
        if let Some(status) = up.child.try_wait().unwrap() {
            panic!("shamal up exited ({status}):\n{}", up.log());
        }
        assert!(
            Instant::now() < deadline,
            "shamal up did not start:\n{}",
            up.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let banner = up.log();
    assert!(
        banner.contains(&format!(
            "Batch jobs:      http://127.0.0.1:{} (gRPC, `shamal batch`), REST http://127.0.0.1:{}/v1/jobs",
            ports[6], ports[7]
        )),
        "{banner}"
    );
    up
}

/// A `shamal` command in `dir`, with no token, login or endpoint from the
/// environment but `SHAMAL_BATCH_ENDPOINT`.
async fn shamal(dir: &Path, up: &Up, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_shamal"));
    command
        .current_dir(dir)
        .args(args)
        .env("XDG_CONFIG_HOME", dir)
        .env("HOME", dir)
        .env("RUST_LOG", "warn")
        .env("SHAMAL_ACTOR", "tester")
        .env("SHAMAL_BATCH_ENDPOINT", &up.batch)
        .env("SHAMAL_REGISTRY_URL", &up.registry)
        .env_remove("SHAMAL_TOKEN")
        .env_remove("SHAMAL_BATCH_CA")
        .env_remove("SHAMAL_BATCH_KEY_FILE")
        .env_remove("SHAMAL_AUDIT_URL")
        .stdin(Stdio::null());
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

/// Row `row`'s features: varied values in [-1, 1].
fn features(row: usize) -> Vec<f32> {
    (0..INPUTS)
        .map(|column| (((row * INPUTS + column) * 37 % 101) as f32) / 50.0 - 1.0)
        .collect()
}

fn json_array(values: &[f32]) -> String {
    let items: Vec<String> = values.iter().map(|value| format!("{value:?}")).collect();
    format!("[{}]", items.join(", "))
}

/// The demo model's outputs for `rows`, through up's router (v2 gRPC),
/// in requests of at most the model's max_batch_size (64) rows.
async fn expected_outputs(grpc: &str, rows: &[usize]) -> BTreeMap<usize, Vec<f32>> {
    let mut client = GrpcInferenceServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    assert!(
        client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let mut expected = BTreeMap::new();
    for chunk in rows.chunks(64) {
        let mut raw = Vec::with_capacity(chunk.len() * INPUTS * 4);
        for row in chunk {
            for value in features(*row) {
                raw.extend_from_slice(&value.to_le_bytes());
            }
        }
        let response = client
            .model_infer(ModelInferRequest {
                model_name: "demo".to_owned(),
                inputs: vec![InferInputTensor {
                    name: "INPUT0".to_owned(),
                    datatype: "FP32".to_owned(),
                    shape: vec![chunk.len() as i64, INPUTS as i64],
                    ..Default::default()
                }],
                raw_input_contents: vec![bytes::Bytes::from(raw)],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.outputs[0].name, "OUTPUT0");
        assert_eq!(
            response.outputs[0].shape,
            vec![chunk.len() as i64, OUTPUTS as i64]
        );
        let values: Vec<f32> = response.raw_output_contents[0]
            .chunks_exact(4)
            .map(|bytes| f32::from_le_bytes(bytes.try_into().unwrap()))
            .collect();
        for (index, row) in chunk.iter().enumerate() {
            expected.insert(
                *row,
                values[index * OUTPUTS..(index + 1) * OUTPUTS].to_vec(),
            );
        }
    }
    expected
}

/// What an output directory holds: per row id, its outputs and its other
/// key columns (as text); and the part files.
struct Scored {
    rows: BTreeMap<usize, (Vec<f32>, Vec<String>)>,
    parts: BTreeSet<String>,
}

fn read_output(dir: &Path, keys: &[&str]) -> Scored {
    let mut rows = BTreeMap::new();
    let mut parts = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if !name.starts_with("part-") {
            continue;
        }
        assert!(name.ends_with(".parquet"), "{name}");
        parts.insert(name.clone());
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(dir.join(&name)).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let names: Vec<String> = batch
                .schema()
                .fields()
                .iter()
                .map(|field| field.name().clone())
                .collect();
            let mut expected_names: Vec<String> = keys.iter().map(|key| key.to_string()).collect();
            expected_names.push("OUTPUT0".to_owned());
            assert_eq!(names, expected_names, "{name}: keys, then the outputs");
            let ids = batch.column(0).as_primitive::<Int64Type>();
            let outputs = batch.column(keys.len()).as_fixed_size_list();
            assert_eq!(outputs.value_length(), OUTPUTS as i32);
            for index in 0..batch.num_rows() {
                let id = usize::try_from(ids.value(index)).unwrap();
                let values = outputs.value(index);
                let values = values.as_primitive::<Float32Type>();
                let others: Vec<String> = (1..keys.len())
                    .map(|column| {
                        let array = batch.column(column);
                        assert!(!array.is_null(index));
                        array.as_string::<i32>().value(index).to_owned()
                    })
                    .collect();
                let previous = rows.insert(id, (values.values().to_vec(), others));
                assert!(previous.is_none(), "row {id} written twice");
            }
        }
    }
    Scored { rows, parts }
}

/// Every row scored once, as the router scores it, with its keys; the
/// manifest (then `_SUCCESS`) lists exactly the parts.
fn check_output(
    dir: &Path,
    keys: &[&str],
    expected: &BTreeMap<usize, Vec<f32>>,
    names: &dyn Fn(usize) -> Vec<String>,
) {
    let scored = read_output(dir, keys);
    assert_eq!(
        scored.rows.keys().copied().collect::<Vec<_>>(),
        (0..ROWS).collect::<Vec<_>>(),
        "every input row has exactly one output row"
    );
    for (row, (outputs, others)) in &scored.rows {
        let want = &expected[row];
        assert_eq!(outputs.len(), OUTPUTS);
        for (got, want) in outputs.iter().zip(want) {
            // The same model on ONNX Runtime; batches of other sizes may
            // differ in the last bits.
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "row {row}: {outputs:?} != {want:?}"
            );
        }
        assert_eq!(*others, names(*row), "row {row}: key columns carried");
    }
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("_manifest.json")).unwrap())
            .unwrap();
    assert!(dir.join("_SUCCESS").exists());
    assert_eq!(manifest["model"], "demo");
    assert_eq!(manifest["total_rows"], ROWS as u64);
    let listed: BTreeSet<String> = manifest["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|part| part["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, scored.parts, "the manifest lists exactly the parts");
    let listed_rows: u64 = manifest["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|part| part["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(listed_rows, ROWS as u64);
}

/// The job id a `submit` printed (`submitted job-...`).
fn submitted_id(text: &str) -> String {
    text.lines()
        .find_map(|line| line.strip_prefix("submitted "))
        .unwrap_or_else(|| panic!("no job id in: {text}"))
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_jobs_through_shamal_up() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let up = start_up(dir.path()).await;
    let rows: Vec<usize> = (0..ROWS).collect();
    let expected = expected_outputs(&up.grpc, &rows).await;

    // A JSON Lines dataset, paths relative to the command's directory.
    let mut jsonl = String::new();
    for row in 0..ROWS {
        jsonl.push_str(&format!(
            "{{\"id\": {row}, \"INPUT0\": {}}}\n",
            json_array(&features(row))
        ));
    }
    std::fs::write(work.join("in.jsonl"), jsonl).unwrap();
    let submitted = shamal(
        &work,
        &up,
        &[
            "batch",
            "submit",
            "--model",
            "demo",
            "--input",
            "in.jsonl",
            "--out",
            "out-jsonl",
            "--key",
            "id",
            "--rows-per-shard",
            "40",
            "--wait",
        ],
    )
    .await;
    assert_eq!(
        code(&submitted),
        0,
        "{}\n{}\n{}",
        stdout(&submitted),
        stderr(&submitted),
        up.log()
    );
    let text = stdout(&submitted);
    let jsonl_id = submitted_id(&text);
    // Not a terminal: plain lines, no redrawing, one per change.
    assert!(!text.contains('\r') && !text.contains('\x1b'), "{text:?}");
    let progress: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with(&format!("{jsonl_id} ")))
        .collect();
    assert!(
        progress.last().unwrap().contains(" SUCCEEDED ")
            && progress
                .last()
                .unwrap()
                .contains(&format!("{ROWS}/{ROWS} rows")),
        "{text}"
    );
    assert!(progress.windows(2).all(|pair| pair[0] != pair[1]), "{text}");
    assert!(text.contains("state:"), "the summary follows: {text}");
    check_output(&work.join("out-jsonl"), &["id"], &expected, &|_| Vec::new());

    // A CSV dataset: the input read from another column, a text key, JSON
    // output (the progress then goes to stderr).
    let mut csv = String::from("id,name,features\n");
    for row in 0..ROWS {
        csv.push_str(&format!(
            "{row},row-{row},\"{}\"\n",
            json_array(&features(row))
        ));
    }
    std::fs::write(work.join("in.csv"), csv).unwrap();
    let out_csv = work.join("out-csv");
    let submitted = shamal(
        &work,
        &up,
        &[
            "batch",
            "submit",
            "--model",
            "demo",
            "--version",
            "1",
            "--input",
            work.join("in.csv").to_str().unwrap(),
            "--out",
            out_csv.to_str().unwrap(),
            "--key",
            "id",
            "--key",
            "name",
            "--input-column",
            "INPUT0=features",
            "--wait",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(
        code(&submitted),
        0,
        "{}\n{}",
        stdout(&submitted),
        stderr(&submitted)
    );
    let job: Value = serde_json::from_str(&stdout(&submitted)).unwrap();
    assert_eq!(job["state"], "SUCCEEDED");
    assert_eq!(job["done_rows"], ROWS as u64);
    assert_eq!(job["total_rows"], ROWS as u64);
    assert_eq!(job["version"], 1);
    assert_eq!(job["spec"]["input_columns"]["INPUT0"], "features");
    assert_eq!(job["spec"]["output"], out_csv.to_str().unwrap());
    let csv_id = job["id"].as_str().unwrap().to_owned();
    assert!(stderr(&submitted).contains(&format!("submitted {csv_id}")));
    check_output(&out_csv, &["id", "name"], &expected, &|row| {
        vec![format!("row-{row}")]
    });

    // status: table and JSON; the relative paths were sent absolute.
    let status = shamal(&work, &up, &["batch", "status", &jsonl_id]).await;
    assert_eq!(code(&status), 0, "{}", stderr(&status));
    let text = stdout(&status);
    assert!(
        text.contains(&jsonl_id) && text.contains("SUCCEEDED"),
        "{text}"
    );
    assert!(
        text.contains(&format!("{ROWS} of {ROWS}")),
        "rows done: {text}"
    );
    let status = shamal(
        &work,
        &up,
        &["batch", "status", &jsonl_id, "--output", "json"],
    )
    .await;
    let job: Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(
        job["spec"]["input"],
        work.join("in.jsonl").to_str().unwrap()
    );
    assert_eq!(
        job["spec"]["output"],
        work.join("out-jsonl").to_str().unwrap()
    );
    assert!(job["shards_total"].as_u64().unwrap() > 1, "{job}");
    assert_eq!(job["actor"], "anonymous", "auth is off in shamal up");
    assert!(
        job["manifest"]
            .as_str()
            .unwrap()
            .ends_with("_manifest.json")
    );
    // Following a finished job ends at once, with its exit code.
    let followed = shamal(&work, &up, &["batch", "status", &csv_id, "--follow"]).await;
    assert_eq!(code(&followed), 0, "{}", stderr(&followed));
    assert!(stdout(&followed).contains(" SUCCEEDED "));

    // list: both, newest first; filtered by state.
    let listed = shamal(&work, &up, &["batch", "list"]).await;
    assert_eq!(code(&listed), 0, "{}", stderr(&listed));
    let text = stdout(&listed);
    assert!(text.starts_with("ID "), "{text}");
    let csv_at = text.find(&csv_id).unwrap();
    let jsonl_at = text.find(&jsonl_id).unwrap();
    assert!(csv_at < jsonl_at, "newest first: {text}");
    let listed = shamal(
        &work,
        &up,
        &["batch", "list", "--state", "succeeded", "--output", "json"],
    )
    .await;
    let jobs: Value = serde_json::from_str(&stdout(&listed)).unwrap();
    let ids: Vec<&str> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| job["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![csv_id.as_str(), jsonl_id.as_str()]);
    let listed = shamal(&work, &up, &["batch", "list", "--state", "running"]).await;
    assert_eq!(stdout(&listed).trim(), "no jobs");
    let bad_state = shamal(&work, &up, &["batch", "list", "--state", "done"]).await;
    assert_eq!(code(&bad_state), 2, "{}", stderr(&bad_state));

    // cancel of a finished job: refused, naming its state.
    let cancelled = shamal(&work, &up, &["batch", "cancel", &jsonl_id]).await;
    assert_eq!(code(&cancelled), 3, "{}", stdout(&cancelled));
    assert!(
        stderr(&cancelled).contains("SUCCEEDED already"),
        "{}",
        stderr(&cancelled)
    );
    let unknown = shamal(&work, &up, &["batch", "status", "job-nope"]).await;
    assert_eq!(code(&unknown), 4, "{}", stderr(&unknown));

    // A dataset without the model's input column: refused naming it,
    // nothing written, no job.
    std::fs::write(
        work.join("bad.jsonl"),
        "{\"id\": 1, \"x\": [1.0, 2.0]}\n{\"id\": 2, \"x\": [3.0, 4.0]}\n",
    )
    .unwrap();
    let refused = shamal(
        &work,
        &up,
        &[
            "batch",
            "submit",
            "--model",
            "demo",
            "--input",
            "bad.jsonl",
            "--out",
            "out-bad",
            "--wait",
        ],
    )
    .await;
    assert_eq!(code(&refused), 1, "{}", stdout(&refused));
    let message = stderr(&refused);
    assert!(
        message.contains("invalid_argument (field spec.input)") && message.contains("'INPUT0'"),
        "{message}"
    );
    assert!(!work.join("out-bad").exists());
    // Unknown model; unreadable input.
    let refused = shamal(
        &work,
        &up,
        &[
            "batch", "submit", "--model", "nope", "--input", "in.jsonl", "--out", "out-nope",
        ],
    )
    .await;
    assert_eq!(code(&refused), 4, "{}", stdout(&refused));
    assert!(stderr(&refused).contains("model 'nope' not found"));
    let refused = shamal(
        &work,
        &up,
        &[
            "batch",
            "submit",
            "--model",
            "demo",
            "--input",
            "missing.parquet",
            "--out",
            "out-missing",
        ],
    )
    .await;
    assert_eq!(code(&refused), 1, "{}", stdout(&refused));
    assert!(
        stderr(&refused).contains("spec.input")
            && stderr(&refused).contains(work.join("missing.parquet").to_str().unwrap()),
        "{}",
        stderr(&refused)
    );
    assert!(!work.join("out-nope").exists() && !work.join("out-missing").exists());
    let listed = shamal(&work, &up, &["batch", "list", "--output", "json"]).await;
    let jobs: Value = serde_json::from_str(&stdout(&listed)).unwrap();
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 2, "{jobs}");

    // An encrypted job: its stored parts are not Parquet; `decrypt` reads
    // them back (under the workers' key file) into the plain job's rows.
    let submitted = shamal(
        &work,
        &up,
        &[
            "batch",
            "submit",
            "--model",
            "demo",
            "--input",
            "in.jsonl",
            "--out",
            "out-encrypted",
            "--key",
            "id",
            "--rows-per-shard",
            "40",
            "--encrypt",
            "--wait",
        ],
    )
    .await;
    assert_eq!(
        code(&submitted),
        0,
        "{}\n{}\n{}",
        stdout(&submitted),
        stderr(&submitted),
        up.log()
    );
    let encrypted_id = submitted_id(&stdout(&submitted));
    let encrypted = work.join("out-encrypted");
    let mut stored = Vec::new();
    for entry in std::fs::read_dir(&encrypted).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.starts_with("part-") {
            assert!(name.ends_with(".parquet.enc"), "{name}");
            let bytes = std::fs::read(encrypted.join(&name)).unwrap();
            assert!(
                bytes.len() > 8 && !bytes.starts_with(b"PAR1") && !bytes.ends_with(b"PAR1"),
                "{name} is stored as Parquet"
            );
            stored.push(name);
        }
    }
    assert!(stored.len() > 1, "{stored:?}");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(encrypted.join("_manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["encryption"]["key_ids"], serde_json::json!(["k1"]));
    // No key ring: refused, naming the flag.
    let refused = shamal(
        &work,
        &up,
        &["batch", "decrypt", "out-encrypted", "--out", "dec-none"],
    )
    .await;
    assert_eq!(code(&refused), 2, "{}", stdout(&refused));
    assert!(
        stderr(&refused).contains("--key-file"),
        "{}",
        stderr(&refused)
    );
    assert!(!work.join("dec-none").exists());
    // A key ring without the parts' key id: refused naming it, nothing
    // written.
    let other_id = write_key_file(&work.join("other-id.toml"), "k9", OTHER_KEY);
    let refused = shamal(
        &work,
        &up,
        &[
            "batch",
            "decrypt",
            "out-encrypted",
            "--out",
            "dec-other-id",
            "--key-file",
            other_id.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code(&refused), 1, "{}", stdout(&refused));
    let message = stderr(&refused);
    assert!(
        message.contains("key id 'k1'") && message.contains("k9"),
        "{message}"
    );
    assert!(!work.join("dec-other-id").exists());
    // The same key id holding another key: the first part fails
    // authentication, named; no manifest.
    let wrong_key = write_key_file(&work.join("wrong-key.toml"), "k1", OTHER_KEY);
    let refused = shamal(
        &work,
        &up,
        &[
            "batch",
            "decrypt",
            "out-encrypted",
            "--out",
            "dec-wrong-key",
            "--key-file",
            wrong_key.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code(&refused), 1, "{}", stdout(&refused));
    let message = stderr(&refused);
    assert!(message.contains("part-"), "{message}");
    assert!(!work.join("dec-wrong-key/_manifest.json").exists());
    // A tampered part (a copy of the output with one byte changed).
    let tampered = work.join("out-tampered");
    std::fs::create_dir_all(&tampered).unwrap();
    for entry in std::fs::read_dir(&encrypted).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tampered.join(entry.file_name())).unwrap();
    }
    let victim = tampered.join(&stored[0]);
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();
    let key_file = dir.path().join("batch-keys.toml");
    let key_file = key_file.to_str().unwrap();
    let refused = shamal(
        &work,
        &up,
        &[
            "batch",
            "decrypt",
            "out-tampered",
            "--out",
            "dec-tampered",
            "--key-file",
            key_file,
        ],
    )
    .await;
    assert_eq!(code(&refused), 1, "{}", stdout(&refused));
    assert!(
        stderr(&refused).contains(&stored[0]),
        "names the part: {}",
        stderr(&refused)
    );
    assert!(!work.join("dec-tampered/_manifest.json").exists());
    // A destination that is not empty: refused.
    let refused = shamal(
        &work,
        &up,
        &[
            "batch",
            "decrypt",
            "out-encrypted",
            "--out",
            "out-jsonl",
            "--key-file",
            key_file,
        ],
    )
    .await;
    assert_eq!(code(&refused), 1, "{}", stdout(&refused));
    assert!(
        stderr(&refused).contains("out-jsonl"),
        "{}",
        stderr(&refused)
    );
    // The right key: the plain job's rows, a plain manifest.
    let decrypted = shamal(
        &work,
        &up,
        &[
            "batch",
            "decrypt",
            "out-encrypted",
            "--out",
            "dec",
            "--key-file",
            key_file,
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(
        code(&decrypted),
        0,
        "{}\n{}",
        stdout(&decrypted),
        stderr(&decrypted)
    );
    let report: Value = serde_json::from_str(&stdout(&decrypted)).unwrap();
    assert_eq!(report["job_id"], encrypted_id.as_str());
    assert_eq!(report["total_rows"], ROWS as u64);
    assert_eq!(report["destination"], work.join("dec").to_str().unwrap());
    assert_eq!(report["parts"].as_array().unwrap().len(), stored.len());
    check_output(&work.join("dec"), &["id"], &expected, &|_| Vec::new());
    assert_eq!(
        read_output(&work.join("dec"), &["id"]).rows,
        read_output(&work.join("out-jsonl"), &["id"]).rows,
        "the encrypted job's rows are the plain job's"
    );
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("dec/_manifest.json")).unwrap())
            .unwrap();
    assert!(manifest.get("encryption").is_none(), "{manifest}");
    // The key file from the environment; the table output.
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_shamal"));
    command
        .current_dir(&work)
        .args(["batch", "decrypt", "out-encrypted", "--out", "dec-env"])
        .env("XDG_CONFIG_HOME", &work)
        .env("HOME", &work)
        .env("SHAMAL_BATCH_KEY_FILE", key_file)
        .stdin(Stdio::null());
    let decrypted = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert_eq!(code(&decrypted), 0, "{}", stderr(&decrypted));
    assert!(
        stdout(&decrypted).contains(&format!(
            "decrypted {} parts, {ROWS} rows of job {encrypted_id}",
            stored.len()
        )),
        "{}",
        stdout(&decrypted)
    );
    check_output(&work.join("dec-env"), &["id"], &expected, &|_| Vec::new());

    // A row that does not fit the input fails its shard, every attempt:
    // the job fails, and --wait exits 8 with its message.
    let mut broken = String::new();
    for row in 0..10 {
        let mut values = features(row);
        if row == 7 {
            values.pop();
        }
        broken.push_str(&format!(
            "{{\"id\": {row}, \"INPUT0\": {}}}\n",
            json_array(&values)
        ));
    }
    std::fs::write(work.join("broken.jsonl"), broken).unwrap();
    let failed = shamal(
        &work,
        &up,
        &[
            "batch",
            "submit",
            "--model",
            "demo",
            "--input",
            "broken.jsonl",
            "--out",
            "out-broken",
            "--wait",
        ],
    )
    .await;
    assert_eq!(code(&failed), 8, "{}\n{}", stdout(&failed), stderr(&failed));
    let failed_id = submitted_id(&stdout(&failed));
    let message = stderr(&failed);
    assert!(
        message.contains(&format!("job {failed_id} FAILED: "))
            && message.contains("INPUT0")
            && message.contains("row 7"),
        "{message}"
    );
    assert!(!work.join("out-broken/_manifest.json").exists());
    let followed = shamal(&work, &up, &["batch", "status", &failed_id, "--follow"]).await;
    assert_eq!(code(&followed), 8, "{}", stderr(&followed));

    // A job no worker takes (no worker of its region) waits; cancelled,
    // following it exits 9.
    let waiting = shamal(
        &work,
        &up,
        &[
            "batch",
            "submit",
            "--model",
            "demo",
            "--input",
            "in.jsonl",
            "--out",
            "out-elsewhere",
            "--region",
            "elsewhere",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(code(&waiting), 0, "{}", stderr(&waiting));
    let job: Value = serde_json::from_str(&stdout(&waiting)).unwrap();
    assert_eq!(job["state"], "QUEUED");
    let waiting_id = job["id"].as_str().unwrap().to_owned();
    let listed = shamal(&work, &up, &["batch", "list", "--state", "queued"]).await;
    assert!(stdout(&listed).contains(&waiting_id), "{}", stdout(&listed));
    let cancelled = shamal(&work, &up, &["batch", "cancel", &waiting_id]).await;
    assert_eq!(code(&cancelled), 0, "{}", stderr(&cancelled));
    assert!(
        stdout(&cancelled).contains("CANCELLED"),
        "{}",
        stdout(&cancelled)
    );
    let followed = shamal(&work, &up, &["batch", "status", &waiting_id, "--follow"]).await;
    assert_eq!(code(&followed), 9, "{}", stderr(&followed));
    assert!(
        stderr(&followed).contains(&format!("job {waiting_id} was cancelled: cancelled by")),
        "{}",
        stderr(&followed)
    );

    // The submits and completions are in the embedded audit log.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let records = shamal(
            &work,
            &up,
            &[
                "audit", "query", "--audit", &up.audit, "--model", "demo", "--output", "json",
            ],
        )
        .await;
        assert_eq!(code(&records), 0, "{}", stderr(&records));
        let records: Value = serde_json::from_str(&stdout(&records)).unwrap();
        let actions: Vec<(String, String)> = records["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|record| {
                let event = &record["event"];
                let event = if event.is_null() { record } else { event };
                (
                    event["action"].as_str().unwrap_or_default().to_owned(),
                    event["request_id"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let has = |action: &str, id: &str| {
            actions
                .iter()
                .any(|(recorded, request)| recorded == action && request.starts_with(id))
        };
        if has("batch.submit", &jsonl_id)
            && has("batch.complete", &jsonl_id)
            // The failed job: the coordinator cuts its reason (naming the
            // shard, the file and the row) to the audit log's 256
            // characters, so the record is kept.
            && has("batch.fail", &failed_id)
            && has("batch.cancel", &waiting_id)
            && has("batch.submit", &csv_id)
            && has("batch.shard", &csv_id)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "batch records missing from the audit log: {actions:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A tenant's residency policy in the embedded registry narrows its
    // jobs: `acme` may only use uae-north, so a job of acme in `local` (the
    // workers' region) is refused naming the tenant, and one naming no
    // region is held for uae-north, where no worker runs.
    let set = shamal(
        &work,
        &up,
        &["residency", "set-tenant", "acme", "--regions", "uae-north"],
    )
    .await;
    assert_eq!(code(&set), 0, "{}", stderr(&set));
    let acme = |region: Option<&'static str>, out: &'static str| {
        let mut args = vec![
            "batch", "submit", "--model", "demo", "--input", "in.jsonl", "--out", out, "--key",
            "id", "--tenant", "acme",
        ];
        args.extend(
            region
                .map(|region| ["--region", region])
                .into_iter()
                .flatten(),
        );
        args
    };
    let refused = shamal(&work, &up, &acme(Some("local"), "out-acme-local")).await;
    assert_eq!(code(&refused), 3, "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("tenant 'acme' allows [uae-north]"),
        "{}",
        stderr(&refused)
    );
    assert!(!work.join("out-acme-local").exists());
    let held = shamal(&work, &up, &acme(None, "out-acme")).await;
    assert_eq!(code(&held), 0, "{}", stderr(&held));
    let held_id = submitted_id(&stdout(&held));
    let status = shamal(
        &work,
        &up,
        &["batch", "status", &held_id, "--output", "json"],
    )
    .await;
    assert_eq!(code(&status), 0, "{}", stderr(&status));
    let status: Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(
        status["regions"],
        serde_json::json!(["uae-north"]),
        "{status}"
    );
    assert_eq!(status["state"], "QUEUED", "{status}");
    let cancelled = shamal(&work, &up, &["batch", "cancel", &held_id]).await;
    assert_eq!(code(&cancelled), 0, "{}", stderr(&cancelled));
}
