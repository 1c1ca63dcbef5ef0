//! Bad inputs give the error that names what to fix, and never a panic.

mod common;

use std::path::Path;

use futures::StreamExt;
use shamal_batch_io::{Dataset, Error, ModelInput, read_shard, to_infer_request};

fn vector_input() -> Vec<ModelInput> {
    vec![ModelInput::new("x", "FP32", vec![-1, 4])]
}

async fn open(path: &Path) -> Result<Dataset, Error> {
    Dataset::open(path.to_str().expect("utf-8"), None).await
}

/// Reads every shard of `path` and converts it for `inputs`: the first error.
async fn score(path: &Path, inputs: &[ModelInput]) -> Result<u64, Error> {
    let dataset = open(path).await?;
    dataset.check(inputs, &[])?;
    let columns: Vec<String> = inputs.iter().map(|input| input.name.clone()).collect();
    let mut rows = 0;
    for shard in dataset.plan_shards(3) {
        let mut stream = read_shard(&shard, &columns, 2).await?;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            to_infer_request(&batch.batch, inputs, &batch.origin)?;
            rows += batch.batch.num_rows() as u64;
        }
    }
    Ok(rows)
}

#[tokio::test]
async fn a_missing_column_is_named_with_the_columns_there_are() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("in.parquet");
    common::write_parquet(&path, &common::batch(&common::rows(5)), 2);
    let dataset = open(&path).await.expect("open");
    let inputs = vec![ModelInput::new("features", "FP32", vec![-1, 4])];
    let error = dataset.check(&inputs, &[]).expect_err("missing input");
    assert!(matches!(&error, Error::MissingColumn { column, .. } if column == "features"));
    let message = error.to_string();
    assert!(
        message.contains("column 'features' (needed for input 'features') not found"),
        "{message}"
    );
    assert!(
        message.ends_with("its columns are: id, x, text"),
        "{message}"
    );

    let error = dataset
        .check(&vector_input(), &["customer".to_owned()])
        .expect_err("missing key");
    assert!(
        error
            .to_string()
            .starts_with("column 'customer' (needed for key column) not found"),
        "{error}"
    );
}

#[tokio::test]
async fn a_wrong_type_says_what_was_expected_and_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("in.jsonl");
    std::fs::write(&path, "{\"x\": \"1,2,3,4\", \"n\": 1.5, \"s\": 3}\n").expect("write");
    let dataset = open(&path).await.expect("open");
    let error = dataset
        .check(&vector_input(), &[])
        .expect_err("string for a vector");
    assert_eq!(
        error.to_string(),
        "column 'x': expected a list of FP32 of length 4 for input 'x', found Utf8"
    );
    let error = dataset
        .check(&[ModelInput::new("n", "INT64", vec![-1])], &[])
        .expect_err("float for an integer");
    assert_eq!(
        error.to_string(),
        "column 'n': expected an integer column for INT64 input 'n', found Float64"
    );
    let error = dataset
        .check(&[ModelInput::new("s", "BYTES", vec![-1])], &[])
        .expect_err("number for text");
    assert_eq!(
        error.to_string(),
        "column 's': expected a string column for BYTES input 's', found Int64"
    );
    // A FixedSizeList of the wrong length is refused before any work.
    let path = dir.path().join("fixed.parquet");
    let values = arrow::array::Float32Array::from(vec![1.0f32; 6]);
    let item = std::sync::Arc::new(arrow::datatypes::Field::new(
        "item",
        arrow::datatypes::DataType::Float32,
        true,
    ));
    let fixed =
        arrow::array::FixedSizeListArray::try_new(item, 3, std::sync::Arc::new(values), None)
            .expect("fixed");
    let batch = arrow::record_batch::RecordBatch::try_from_iter([(
        "x",
        std::sync::Arc::new(fixed) as arrow::array::ArrayRef,
    )])
    .expect("batch");
    common::write_parquet(&path, &batch, 10);
    let error = open(&path)
        .await
        .expect("open")
        .check(&vector_input(), &[])
        .expect_err("length 3 for 4");
    assert!(matches!(error, Error::WrongType { .. }), "{error}");
}

#[tokio::test]
async fn a_ragged_vector_names_its_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    // JSON Lines: the shard's rows, numbered from the start of the shard.
    let path = dir.path().join("in.jsonl");
    std::fs::write(&path, "{\"x\": [1, 2, 3, 4]}\n{\"x\": [1, 2, 3]}\n").expect("write");
    let error = score(&path, &vector_input()).await.expect_err("ragged");
    assert!(
        matches!(&error, Error::BadRow { column, row: 1, .. } if column == "x"),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("expected 4 values, found 3"),
        "{error}"
    );

    // Parquet: rows numbered from the start of the file, across batches,
    // row groups and shards.
    let mut rows = common::rows(11);
    rows[9].x.push(7.0);
    let path = dir.path().join("in.parquet");
    common::write_parquet(&path, &common::batch(&rows), 2);
    let error = score(&path, &vector_input()).await.expect_err("ragged");
    assert!(matches!(error, Error::BadRow { row: 9, .. }), "{error:?}");
    assert!(
        error.to_string().starts_with(&format!(
            "column 'x', row 9 of file '{}': expected 4 values, found 5",
            path.canonicalize().expect("path").display()
        )),
        "{error}"
    );
}

#[tokio::test]
async fn nulls_and_values_out_of_range_are_bad_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("in.jsonl");
    std::fs::write(&path, "{\"n\": 1, \"m\": 1}\n{\"n\": 300, \"m\": null}\n").expect("write");
    let error = score(&path, &[ModelInput::new("n", "INT8", vec![-1])])
        .await
        .expect_err("300 in INT8");
    assert!(matches!(error, Error::BadRow { row: 1, .. }), "{error:?}");
    assert!(
        error.to_string().contains("does not fit in INT8"),
        "{error}"
    );
    let error = score(&path, &[ModelInput::new("m", "FP32", vec![-1, 1])])
        .await
        .expect_err("null");
    assert!(error.to_string().contains("null value"), "{error}");
    let rows = score(&path, &[ModelInput::new("n", "INT16", vec![-1])])
        .await
        .expect("fits INT16");
    assert_eq!(rows, 2);
}

#[tokio::test]
async fn a_csv_vector_cell_that_is_not_a_json_array_is_a_bad_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("in.csv");
    std::fs::write(&path, "x\n\"[1,2,3,4]\"\n\"[1,2,x,4]\"\n").expect("write");
    let error = score(&path, &vector_input()).await.expect_err("not JSON");
    assert!(matches!(error, Error::BadRow { row: 1, .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .contains("expected a JSON array of numbers"),
        "{error}"
    );
}

#[tokio::test]
async fn corrupt_and_truncated_parquet_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.parquet");
    std::fs::write(&garbage, b"this is not parquet at all").expect("write");
    let error = open(&garbage).await.expect_err("garbage");
    assert!(
        matches!(&error, Error::CorruptFile { file, .. } if file.ends_with("garbage.parquet")),
        "{error:?}"
    );

    let good = dir.path().join("good.parquet");
    common::write_parquet(&good, &common::batch(&common::rows(50)), 10);
    let bytes = std::fs::read(&good).expect("read");
    for cut in [bytes.len() / 2, bytes.len() - 3, 4, 0] {
        let truncated = dir.path().join("truncated.parquet");
        std::fs::write(&truncated, &bytes[..cut]).expect("write");
        let error = open(&truncated).await.expect_err("truncated");
        assert!(
            matches!(&error, Error::CorruptFile { file, .. } if file.ends_with("truncated.parquet")),
            "cut at {cut}: {error:?}"
        );
    }
    // Footer intact, data pages damaged: the read fails, naming the file.
    let mut damaged = bytes.clone();
    for byte in &mut damaged[4..bytes.len() / 2] {
        *byte = 0xAB;
    }
    let path = dir.path().join("damaged.parquet");
    std::fs::write(&path, &damaged).expect("write");
    let error = score(&path, &vector_input()).await.expect_err("damaged");
    assert!(
        matches!(&error, Error::CorruptFile { file, .. } if file.ends_with("damaged.parquet")),
        "{error:?}"
    );
}

#[tokio::test]
async fn invalid_utf8_and_malformed_lines_are_corrupt_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let jsonl = dir.path().join("in.jsonl");
    let mut text = b"{\"s\": \"ok\"}\n{\"s\": \"".to_vec();
    text.extend_from_slice(&[0xff, 0xfe]);
    text.extend_from_slice(b"\"}\n");
    std::fs::write(&jsonl, &text).expect("write");
    let input = [ModelInput::new("s", "BYTES", vec![-1])];
    let error = score(&jsonl, &input).await.expect_err("invalid UTF-8");
    assert!(matches!(error, Error::CorruptFile { .. }), "{error:?}");

    let csv = dir.path().join("in.csv");
    let mut text = b"s\nok\n".to_vec();
    text.extend_from_slice(&[0xff, 0xfe, b'\n']);
    std::fs::write(&csv, &text).expect("write");
    let error = score(&csv, &input).await.expect_err("invalid UTF-8");
    assert!(matches!(error, Error::CorruptFile { .. }), "{error:?}");

    let jsonl = dir.path().join("broken.jsonl");
    std::fs::write(&jsonl, "{\"s\": \"ok\"}\n{\"s\": \n").expect("write");
    let error = score(&jsonl, &input).await.expect_err("truncated JSON");
    assert!(matches!(error, Error::CorruptFile { .. }), "{error:?}");

    let csv = dir.path().join("ragged.csv");
    std::fs::write(&csv, "s,t\na,b\nc\n").expect("write");
    let error = score(&csv, &input).await.expect_err("short record");
    assert!(matches!(error, Error::CorruptFile { .. }), "{error:?}");
}

#[tokio::test]
async fn a_missing_path_names_the_path_and_the_os_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nowhere.parquet");
    let error = open(&path).await.expect_err("missing");
    assert!(matches!(error, Error::UnreadablePath { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("nowhere.parquet"), "{message}");
    assert!(message.contains("No such file or directory"), "{message}");

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let error = open(&empty).await.expect_err("empty directory");
    assert!(error.to_string().contains("no data file"), "{error}");

    let error = Dataset::open("gs://bucket/prefix", None)
        .await
        .expect_err("no Google Cloud Storage");
    assert!(matches!(error, Error::Format { .. }), "{error:?}");
    assert!(error.to_string().contains("gs://bucket/prefix"), "{error}");
}

#[tokio::test]
async fn a_file_changed_or_removed_after_planning_fails_its_shard_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("moving.parquet");
    // 50 rows in row groups of 10: shards of 2, 2 and 1 row groups.
    common::write_parquet(&path, &common::batch(&common::rows(50)), 10);
    let dataset = open(&path).await.expect("dataset");
    let shards = dataset.plan_shards(20);
    assert_eq!(shards.len(), 3);
    let columns = vec!["x".to_owned()];

    // Rewritten with 2 row groups: the shard of groups 2..4 is gone.
    common::write_parquet(&path, &common::batch(&common::rows(20)), 10);
    let error = match read_shard(&shards[1], &columns, 4).await {
        Ok(mut stream) => stream.next().await.expect("an item").expect_err("changed"),
        Err(error) => error,
    };
    assert!(
        matches!(&error, Error::CorruptFile { file, .. } if file.ends_with("moving.parquet")),
        "{error:?}"
    );
    assert!(error.to_string().contains("changed since"), "{error}");

    // Removed: the path and the OS error.
    std::fs::remove_file(&path).expect("remove");
    let error = read_shard(&shards[0], &columns, 4)
        .await
        .err()
        .expect("a removed file cannot be read");
    assert!(matches!(&error, Error::Store { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("moving.parquet"), "{message}");
    assert!(message.contains("No such file or directory"), "{message}");
}
