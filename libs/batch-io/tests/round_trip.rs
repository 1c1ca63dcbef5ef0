//! Each format end to end: open, check, plan, read, convert to a request,
//! answer it, convert the answer back, write parts and the manifest.

#[path = "../../../tests/support/services.rs"]
mod services;

mod common;
#[path = "common/s3.rs"]
mod s3;

use std::path::Path;

use arrow::array::{Array, AsArray, Float32Array};
use arrow::datatypes::{DataType as ArrowType, Float32Type, Int64Type};
use bytes::Bytes;
use futures::StreamExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use shamal_batch_io::{
    Dataset, Format, Manifest, ModelInput, Output, PartWriter, Shard, outputs_to_columns,
    read_shard, to_infer_request,
};
use shamal_proto::inference::ModelInferResponse;
use shamal_tensor::{DataType, Tensor, TensorData};

use common::Row;

fn inputs() -> Vec<ModelInput> {
    vec![
        ModelInput::new("x", "FP32", vec![-1, 4]),
        ModelInput::new("text", "BYTES", vec![-1, 1]),
    ]
}

/// What the "model" answers: `total` = sum of x, one per row (FP32
/// [rows, 1]); `doubled` = 2 x (FP32 [rows, 4]); `length` = the text's byte
/// length (INT64 [rows]).
fn answer(x: &[f32], texts: &[Bytes], rows: usize) -> ModelInferResponse {
    let total: Vec<f32> = x.chunks(4).map(|row| row.iter().sum()).collect();
    let doubled: Vec<f32> = x.iter().map(|value| value * 2.0).collect();
    let length: Vec<i64> = texts.iter().map(|text| text.len() as i64).collect();
    let fixed = |name: &str, datatype, shape: Vec<i64>, bytes: Vec<u8>| Tensor {
        name: name.to_owned(),
        datatype,
        shape,
        data: TensorData::Fixed(Bytes::from(bytes)),
    };
    let rows = rows as i64;
    let tensors = [
        fixed(
            "total",
            DataType::Fp32,
            vec![rows, 1],
            total.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        fixed(
            "doubled",
            DataType::Fp32,
            vec![rows, 4],
            doubled.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        fixed(
            "length",
            DataType::Int64,
            vec![rows],
            length.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
    ];
    let (outputs, raw) = shamal_tensor::encode_outputs(&tensors);
    ModelInferResponse {
        outputs,
        raw_output_contents: raw,
        ..Default::default()
    }
}

/// Scores every shard of `location` into `out` (local paths or S3 URLs)
/// and writes the manifest.
async fn score(location: &str, format: Option<Format>, target_rows: u64, out: &str) -> Manifest {
    let (manifest, _) = score_shards(location, format, target_rows, out).await;
    manifest
}

/// [`score`], also returning the shards.
async fn score_shards(
    location: &str,
    format: Option<Format>,
    target_rows: u64,
    out: &str,
) -> (Manifest, Vec<Shard>) {
    let output = Output::new(out).expect("output");
    let dataset = Dataset::open(location, format).await.expect("open");
    let keys = vec!["id".to_owned()];
    dataset.check(&inputs(), &keys).expect("check");
    let shards = dataset.plan_shards(target_rows);
    let columns: Vec<String> = ["id", "x", "text"].map(String::from).to_vec();
    let mut parts = Vec::new();
    for shard in &shards {
        // Shards travel as JSON.
        let shard: shamal_batch_io::Shard =
            serde_json::from_str(&serde_json::to_string(shard).expect("json")).expect("parse");
        let mut stream = read_shard(&shard, &columns, 7).await.expect("read");
        let mut writer = None;
        while let Some(batch) = stream.next().await {
            let batch = batch.expect("batch");
            assert!(batch.batch.num_rows() <= 7);
            let request =
                to_infer_request(&batch.batch, &inputs(), &batch.origin).expect("request");
            assert_eq!(
                request.inputs[0].shape,
                vec![batch.batch.num_rows() as i64, 4]
            );
            assert_eq!(
                request.inputs[1].shape,
                vec![batch.batch.num_rows() as i64, 1]
            );
            let tensors = shamal_tensor::decode_inputs(request.inputs, request.raw_input_contents)
                .expect("valid v2 tensors");
            let TensorData::Fixed(x) = &tensors[0].data else {
                panic!("x is fixed-size")
            };
            let x: Vec<f32> = x
                .chunks(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let TensorData::Strings(texts) = &tensors[1].data else {
                panic!("text is BYTES")
            };
            let rows = batch.batch.num_rows();
            let outputs = outputs_to_columns(answer(&x, texts, rows), rows).expect("outputs");
            let keys = batch.batch.project(&[0]).expect("keys");
            let out_batch = PartWriter::batch(&keys, outputs).expect("output batch");
            let writer = writer.get_or_insert_with(|| {
                PartWriter::create(&output, shard.index, out_batch.schema()).expect("create")
            });
            writer.write(&out_batch).expect("write");
        }
        if let Some(writer) = writer {
            parts.push(writer.finish().await.expect("finish"));
        }
    }
    let manifest = Manifest::new("job-1", "summer", "3", parts);
    manifest.write(out).await.expect("manifest");
    (manifest, shards)
}

fn text(path: &Path) -> &str {
    path.to_str().expect("utf-8")
}

/// Reads every part back and checks it against `rows`, in order.
async fn check_output(out: &str, manifest: &Manifest, rows: &[Row]) {
    assert_eq!(manifest.total_rows, rows.len() as u64);
    assert_eq!(Manifest::verify(out).await.expect("verify"), *manifest);
    let output = Output::new(out).expect("output");
    let mut seen = 0;
    for part in &manifest.parts {
        let file = output.read(&part.name).await.expect("part");
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .expect("parquet")
            .build()
            .expect("reader");
        for batch in reader {
            let batch = batch.expect("batch");
            let names: Vec<_> = batch
                .schema()
                .fields()
                .iter()
                .map(|field| field.name().clone())
                .collect();
            assert_eq!(names, ["id", "total", "doubled", "length"]);
            assert_eq!(batch.column(0).data_type(), &ArrowType::Int64);
            assert!(matches!(
                batch.column(2).data_type(),
                ArrowType::FixedSizeList(_, 4)
            ));
            let ids = batch.column(0).as_primitive::<Int64Type>();
            let total = batch.column(1).as_primitive::<Float32Type>();
            let doubled = batch.column(2).as_fixed_size_list();
            let length = batch.column(3).as_primitive::<Int64Type>();
            for i in 0..batch.num_rows() {
                let row = &rows[seen];
                assert_eq!(ids.value(i), row.id);
                assert_eq!(total.value(i), row.x.iter().sum::<f32>());
                let values = doubled.value(i);
                let values = values.as_any().downcast_ref::<Float32Array>().expect("f32");
                let expected: Vec<f32> = row.x.iter().map(|v| v * 2.0).collect();
                assert_eq!(values.values().to_vec(), expected);
                assert_eq!(length.value(i), row.text.len() as i64);
                seen += 1;
            }
        }
    }
    assert_eq!(seen, rows.len());
}

#[tokio::test]
async fn parquet_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = common::rows(53);
    let input = dir.path().join("in.parquet");
    common::write_parquet(&input, &common::batch(&rows), 10);
    let out = dir.path().join("out");
    let manifest = score(text(&input), None, 20, text(&out)).await;
    // Row groups of 10, shards of at least 20 rows: 20, 20, 13.
    let counts: Vec<u64> = manifest.parts.iter().map(|part| part.rows).collect();
    assert_eq!(counts, [20, 20, 13]);
    check_output(text(&out), &manifest, &rows).await;
}

#[tokio::test]
async fn json_lines_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = common::rows(41);
    let input = dir.path().join("in.jsonl");
    common::write_jsonl(&input, &rows);
    let out = dir.path().join("out");
    let manifest = score(text(&input), None, 9, text(&out)).await;
    assert!(manifest.parts.len() > 2, "{manifest:?}");
    check_output(text(&out), &manifest, &rows).await;
}

#[tokio::test]
async fn csv_round_trip_with_vectors_as_json_strings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = common::rows(37);
    let input = dir.path().join("in.csv");
    common::write_csv(&input, &rows);
    let out = dir.path().join("out");
    let manifest = score(text(&input), None, 5, text(&out)).await;
    assert!(manifest.parts.len() > 3, "{manifest:?}");
    check_output(text(&out), &manifest, &rows).await;
}

#[tokio::test]
async fn a_directory_is_one_dataset_of_its_files_in_name_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = common::rows(30);
    let input = dir.path().join("in");
    std::fs::create_dir(&input).expect("mkdir");
    // Written out of order; hidden files and subdirectories are ignored.
    common::write_jsonl(&input.join("b.jsonl"), &rows[12..]);
    common::write_jsonl(&input.join("a.jsonl"), &rows[..12]);
    std::fs::write(input.join("_SUCCESS"), "").expect("marker");
    std::fs::write(input.join(".a.jsonl.crc"), "junk").expect("hidden");
    std::fs::create_dir(input.join("sub")).expect("subdir");
    let out = dir.path().join("out");
    let manifest = score(text(&input), None, 4, text(&out)).await;
    check_output(text(&out), &manifest, &rows).await;

    // Without an explicit format, the extensions must agree.
    std::fs::write(input.join("c.csv"), "id\n1\n").expect("csv");
    let error = Dataset::open(input.to_str().expect("utf-8"), None)
        .await
        .expect_err("mixed formats");
    assert!(error.to_string().contains("mixes jsonl and csv"), "{error}");
}

#[tokio::test]
async fn explicit_format_overrides_the_extension() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = common::rows(5);
    let input = dir.path().join("data.txt");
    common::write_jsonl(&input, &rows);
    let location = input.to_str().expect("utf-8");
    let error = Dataset::open(location, None)
        .await
        .expect_err("unknown extension");
    assert!(error.to_string().contains("unknown extension"), "{error}");
    let out = dir.path().join("out");
    let manifest = score(text(&input), Some(Format::JsonLines), 100, text(&out)).await;
    check_output(text(&out), &manifest, &rows).await;
}

/// The S3 endpoint of the tests, configured; `None` when skipped.
fn s3_endpoint(test: &str) -> Option<String> {
    let endpoint = services::configured(s3::VARIABLE, test, s3::REMEDY)?;
    s3::configure(&endpoint);
    Some(endpoint)
}

/// Each format read from S3 (one object, and a prefix of objects with a
/// `_SUCCESS` marker to skip) plans the same shards as the same files on
/// disk, and scores to parts and a manifest written to S3 that read back
/// as the expected rows.
#[tokio::test]
async fn datasets_on_s3_plan_read_and_write_like_local_ones() {
    let Some(endpoint) = s3_endpoint("datasets_on_s3_plan_read_and_write_like_local_ones") else {
        return;
    };
    let bucket = s3::create_bucket(&endpoint);
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = common::rows(47);
    type Write = fn(&Path, &[Row]);
    let cases: [(&str, u64, Write); 3] = [
        ("parquet", 15, |path, rows| {
            common::write_parquet(path, &common::batch(rows), 8)
        }),
        ("jsonl", 6, common::write_jsonl),
        ("csv", 7, common::write_csv),
    ];
    for (extension, target, write) in cases {
        let local = dir.path().join(format!("in.{extension}"));
        write(&local, &rows);
        let url = format!("s3://{bucket}/one/in.{extension}");
        s3::upload(&local, &url).await;
        let local_out = dir.path().join(format!("out-{extension}"));
        let (local_manifest, local_shards) =
            score_shards(text(&local), None, target, text(&local_out)).await;
        let out = format!("s3://{bucket}/out-{extension}");
        let (manifest, shards) = score_shards(&url, None, target, &out).await;
        assert!(shards.len() > 2, "{extension}: {shards:?}");
        assert_eq!(shards.len(), local_shards.len(), "{extension}");
        for (remote, local) in shards.iter().zip(&local_shards) {
            assert_eq!(remote.file, url);
            assert_eq!(remote.span, local.span, "{extension}");
            assert_eq!(remote.rows, local.rows, "{extension}");
            assert_eq!(remote.first_row, local.first_row, "{extension}");
        }
        // The same bytes: Parquet output does not depend on where it goes.
        let sums = |manifest: &Manifest| -> Vec<(String, u64, String)> {
            manifest
                .parts
                .iter()
                .map(|part| (part.name.clone(), part.rows, part.sha256.clone()))
                .collect()
        };
        assert_eq!(sums(&manifest), sums(&local_manifest), "{extension}");
        check_output(&out, &manifest, &rows).await;
        let mut expected: Vec<String> = manifest.parts.iter().map(|p| p.name.clone()).collect();
        expected.extend(["_SUCCESS".to_owned(), "_manifest.json".to_owned()]);
        expected.sort();
        assert_eq!(s3::names(&out).await, expected, "{extension}");

        // A prefix of two objects (and a marker) is one dataset, in order.
        let prefix = format!("s3://{bucket}/many-{extension}");
        let first = dir.path().join(format!("a.{extension}"));
        let second = dir.path().join(format!("b.{extension}"));
        write(&first, &rows[..20]);
        write(&second, &rows[20..]);
        s3::upload(&second, &format!("{prefix}/b.{extension}")).await;
        s3::upload(&first, &format!("{prefix}/a.{extension}")).await;
        s3::put(&format!("{prefix}/_SUCCESS"), Vec::new()).await;
        let out = format!("s3://{bucket}/out-many-{extension}/");
        let manifest = score(&format!("{prefix}/"), None, target, &out).await;
        check_output(&out, &manifest, &rows).await;
    }
}

/// A bucket that does not exist and an object that does not: errors that
/// name the URL, from opening the dataset and from reading a shard.
#[tokio::test]
async fn missing_buckets_and_objects_are_named() {
    let Some(endpoint) = s3_endpoint("missing_buckets_and_objects_are_named") else {
        return;
    };
    let bucket = s3::create_bucket(&endpoint);
    let missing_bucket = format!(
        "s3://no-such-bucket-{}/data.parquet",
        uuid::Uuid::new_v4().simple()
    );
    let error = Dataset::open(&missing_bucket, None)
        .await
        .expect_err("no bucket");
    assert!(error.to_string().contains(&missing_bucket), "{error}");
    let missing = format!("s3://{bucket}/nothing/here.parquet");
    let error = Dataset::open(&missing, None).await.expect_err("no object");
    assert!(error.to_string().contains(&missing), "{error}");
    assert!(error.to_string().contains("no object"), "{error}");

    // A shard planned on an object deleted since.
    let dir = tempfile::tempdir().expect("tempdir");
    let local = dir.path().join("in.jsonl");
    common::write_jsonl(&local, &common::rows(5));
    let url = format!("s3://{bucket}/gone/in.jsonl");
    s3::upload(&local, &url).await;
    let dataset = Dataset::open(&url, None).await.expect("open");
    let shards = dataset.plan_shards(100);
    Output::new(&format!("s3://{bucket}/gone"))
        .expect("output")
        .delete("in.jsonl")
        .await
        .expect("delete");
    let error = match read_shard(&shards[0], &["id".to_owned()], 10).await {
        Ok(_) => panic!("read a deleted object"),
        Err(error) => error,
    };
    assert!(error.to_string().contains(&url), "{error}");
    assert!(
        matches!(error, shamal_batch_io::Error::Store { .. }),
        "{error:?}"
    );
    // The same for a Parquet shard: the store's error, on one line, not a
    // corrupt file.
    let local = dir.path().join("in.parquet");
    common::write_parquet(&local, &common::batch(&common::rows(5)), 10);
    let url = format!("s3://{bucket}/gone/in.parquet");
    s3::upload(&local, &url).await;
    let dataset = Dataset::open(&url, None).await.expect("open");
    let shards = dataset.plan_shards(100);
    Output::new(&format!("s3://{bucket}/gone"))
        .expect("output")
        .delete("in.parquet")
        .await
        .expect("delete");
    let error = match read_shard(&shards[0], &["id".to_owned()], 10).await {
        Ok(_) => panic!("read a deleted object"),
        Err(error) => error,
    };
    assert!(
        matches!(&error, shamal_batch_io::Error::Store { path, .. } if *path == url),
        "{error:?}"
    );
    assert!(!error.to_string().contains('\n'), "{error}");

    // An output that cannot be listed names its URL.
    let output = format!("s3://no-such-bucket-{}/out", uuid::Uuid::new_v4().simple());
    let error = Output::new(&output)
        .expect("output")
        .check_empty()
        .await
        .expect_err("no bucket");
    assert!(error.to_string().contains(&output), "{error}");
}
