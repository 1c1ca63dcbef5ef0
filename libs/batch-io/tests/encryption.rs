//! Encryption at rest: encrypted parts are not Parquet as stored, the
//! manifest records the key ids and the checksums of the stored bytes,
//! `decrypt_dataset` gives back exactly the rows, and the wrong key, a
//! changed byte, a moved part are refused naming what is wrong. Local and,
//! where configured, on S3 (moto).

#[path = "../../../tests/support/services.rs"]
mod services;

#[path = "common/s3.rs"]
mod s3;

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Float32Array, Int64Array};
use arrow::datatypes::{Float32Type, Int64Type};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use shamal_batch_io::{
    Error, KeyRing, Manifest, Output, PartEncryption, PartInfo, PartWriter, decrypt_dataset,
};

fn ring(active: &str, byte: u8) -> Arc<KeyRing> {
    Arc::new(
        KeyRing::new(
            active,
            [
                ("k1", [byte; 32].as_slice()),
                ("k2", [byte.wrapping_add(1); 32].as_slice()),
            ],
        )
        .expect("ring"),
    )
}

fn batch(first: i64, rows: usize) -> RecordBatch {
    let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(first..first + rows as i64));
    let keys = RecordBatch::try_from_iter([("id", ids)]).expect("keys");
    let scores: ArrayRef = Arc::new(Float32Array::from_iter_values(
        (0..rows).map(|row| (first + row as i64) as f32 * 0.5),
    ));
    PartWriter::batch(&keys, vec![("score".to_owned(), scores)]).expect("batch")
}

/// Writes an encrypted output of 3 parts (rows 0..25) under `ring`'s
/// active key, and its manifest.
async fn encrypted_output(out: &str, ring: &Arc<KeyRing>, job: &str) -> Manifest {
    let output = Output::new(out).expect("output");
    let mut parts: Vec<PartInfo> = Vec::new();
    for (shard, first, rows) in [(0, 0, 10), (1, 10, 10), (2, 20, 5)] {
        let data = batch(first, rows);
        let mut writer = PartWriter::create_with(
            &output,
            shard,
            data.schema(),
            Some(PartEncryption {
                ring: ring.clone(),
                key_id: None,
                job_id: job.to_owned(),
            }),
        )
        .expect("create");
        // Two batches per part, to cover several writes.
        writer.write(&data.slice(0, rows / 2)).expect("write");
        writer
            .write(&data.slice(rows / 2, rows - rows / 2))
            .expect("write");
        parts.push(writer.finish().await.expect("finish"));
    }
    let manifest = Manifest::new(job, "scorer", "1", parts);
    manifest.write(out).await.expect("manifest");
    manifest
}

/// The (id, score) rows of a plain output, checked against its manifest.
async fn plain_rows(out: &str) -> Vec<(i64, f32)> {
    let manifest = Manifest::verify(out).await.expect("verify plain output");
    assert!(manifest.encryption.is_none());
    let output = Output::new(out).expect("output");
    let mut rows = Vec::new();
    for part in &manifest.parts {
        assert!(
            part.name.ends_with(".parquet") && part.key_id.is_none(),
            "{part:?}"
        );
        let bytes = output.read(&part.name).await.expect("read");
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .expect("plain parquet")
            .build()
            .expect("reader");
        for batch in reader {
            let batch = batch.expect("batch");
            let ids = batch.column(0).as_primitive::<Int64Type>();
            let scores = batch.column(1).as_primitive::<Float32Type>();
            for row in 0..batch.num_rows() {
                rows.push((ids.value(row), scores.value(row)));
            }
        }
    }
    rows.sort_by_key(|(id, _)| *id);
    rows
}

fn expected_rows() -> Vec<(i64, f32)> {
    (0..25).map(|id| (id, id as f32 * 0.5)).collect()
}

/// The whole story on one location kind: `base` is a local directory or an
/// S3 prefix.
async fn encrypted_outputs_round_trip(base: &str) {
    let keys = ring("k1", 7);
    let out = format!("{base}/encrypted");
    let manifest = encrypted_output(&out, &keys, "job-enc").await;
    let output = Output::new(&out).expect("output");

    // As stored: named .enc, not Parquet (no PAR1 at either end), the
    // blob format under key k1; the manifest says so.
    let names: Vec<&str> = manifest.parts.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "part-000000.parquet.enc",
            "part-000001.parquet.enc",
            "part-000002.parquet.enc"
        ]
    );
    for part in &manifest.parts {
        let stored = output.read(&part.name).await.expect("read");
        assert!(!stored.starts_with(b"PAR1"), "{}", part.name);
        assert!(!stored.ends_with(b"PAR1"), "{}", part.name);
        assert!(
            stored.starts_with(&shamal_keys::blob::MAGIC),
            "{}",
            part.name
        );
        assert!(ParquetRecordBatchReaderBuilder::try_new(stored.clone()).is_err());
        assert_eq!(part.key_id.as_deref(), Some("k1"));
        assert_eq!(
            output.blob_key_id(&part.name).await.expect("header"),
            Some("k1".to_owned())
        );
    }
    let encryption = manifest.encryption.clone().expect("encryption recorded");
    assert_eq!(encryption.key_ids, ["k1"]);
    assert_eq!(encryption.cipher, "AES-256-GCM");
    let json: serde_json::Value =
        serde_json::from_slice(&output.read("_manifest.json").await.expect("manifest"))
            .expect("json");
    assert_eq!(json["encryption"]["key_ids"][0], "k1");
    assert_eq!(json["parts"][0]["key_id"], "k1");
    // Checksums are of the stored bytes: verify works without keys.
    assert_eq!(Manifest::verify(&out).await.expect("verify"), manifest);

    // Decrypted: plain Parquet parts and a plain manifest, exactly the rows.
    let plain = format!("{base}/plain");
    let decrypted = decrypt_dataset(&out, &plain, &keys).await.expect("decrypt");
    assert_eq!(decrypted.total_rows, 25);
    assert_eq!(decrypted.job_id, "job-enc");
    assert_eq!(plain_rows(&plain).await, expected_rows());
    // Into a destination that is not empty: refused.
    let error = decrypt_dataset(&out, &plain, &keys)
        .await
        .expect_err("not empty");
    assert!(error.to_string().contains("not empty"), "{error}");
    // A key ring that rotated since (k2 active, k1 still held) reads it.
    let rotated = ring("k2", 7);
    decrypt_dataset(&out, &format!("{base}/plain-rotated"), &rotated)
        .await
        .expect("an older key still held");

    // The wrong key: a ring without k1, and a ring whose k1 is another key.
    let other = Arc::new(KeyRing::new("k9", [("k9", [9u8; 32].as_slice())]).expect("ring"));
    let error = decrypt_dataset(&out, &format!("{base}/wrong-1"), &other)
        .await
        .expect_err("no such key");
    assert!(matches!(error, Error::Encryption { .. }), "{error:?}");
    assert!(
        error.to_string().contains("'k1'") && error.to_string().contains("k9"),
        "{error}"
    );
    let impostor = ring("k1", 8);
    let error = decrypt_dataset(&out, &format!("{base}/wrong-2"), &impostor)
        .await
        .expect_err("wrong key material");
    assert!(matches!(error, Error::Encryption { .. }), "{error:?}");
    assert!(
        error.to_string().contains("part-000000.parquet.enc")
            && error.to_string().contains("authentication"),
        "{error}"
    );
    assert!(
        !Output::new(&format!("{base}/wrong-2"))
            .expect("output")
            .exists("_manifest.json")
            .await
            .expect("exists"),
        "no manifest after a failed decryption"
    );

    // A flipped byte: refused by the checksum before any decryption...
    let part = &manifest.parts[1].name;
    let original = output.read(part).await.expect("read").to_vec();
    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    output.put(part, flipped.clone().into()).await.expect("put");
    let error = decrypt_dataset(&out, &format!("{base}/flipped-1"), &keys)
        .await
        .expect_err("flipped byte");
    assert!(matches!(error, Error::Verify { .. }), "{error:?}");
    assert!(
        error.to_string().contains(part) && error.to_string().contains("SHA-256"),
        "{error}"
    );
    // ...and by authentication when the manifest is doctored to match.
    let mut doctored = manifest.clone();
    use sha2::Digest;
    doctored.parts[1].sha256 = hex::encode(sha2::Sha256::digest(&flipped));
    doctored.write(&out).await.expect("doctored manifest");
    let error = decrypt_dataset(&out, &format!("{base}/flipped-2"), &keys)
        .await
        .expect_err("flipped byte, consistent manifest");
    assert!(matches!(error, Error::Encryption { .. }), "{error:?}");
    assert!(
        error.to_string().contains(part) && error.to_string().contains("authentication"),
        "{error}"
    );
    output.put(part, original.into()).await.expect("restore");
    manifest.write(&out).await.expect("manifest restored");

    // Parts swapped between names (checksums adjusted): each is bound to
    // its own name, so neither decrypts.
    let first = output.read(&manifest.parts[0].name).await.expect("read");
    let second = output.read(&manifest.parts[1].name).await.expect("read");
    output
        .put(&manifest.parts[0].name, second)
        .await
        .expect("swap");
    output
        .put(&manifest.parts[1].name, first)
        .await
        .expect("swap");
    let mut swapped = manifest.clone();
    let (a, b) = (manifest.parts[0].clone(), manifest.parts[1].clone());
    swapped.parts[0].sha256 = b.sha256;
    swapped.parts[0].bytes = b.bytes;
    swapped.parts[1].sha256 = a.sha256;
    swapped.parts[1].bytes = a.bytes;
    swapped.write(&out).await.expect("swapped manifest");
    let error = decrypt_dataset(&out, &format!("{base}/swapped"), &keys)
        .await
        .expect_err("swapped parts");
    assert!(error.to_string().contains("authentication"), "{error}");

    // A plain output is not decrypted.
    let error = decrypt_dataset(&plain, &format!("{base}/again"), &keys)
        .await
        .expect_err("plain");
    assert!(error.to_string().contains("is not encrypted"), "{error}");

    // A ring without the key refuses to write rather than write plaintext.
    let error = match PartWriter::create_with(
        &Output::new(&format!("{base}/refused")).expect("output"),
        0,
        batch(0, 1).schema(),
        Some(PartEncryption {
            ring: keys.clone(),
            key_id: Some("k7".to_owned()),
            job_id: "job-x".to_owned(),
        }),
    ) {
        Ok(_) => panic!("a key the ring does not hold"),
        Err(error) => error,
    };
    assert!(error.to_string().contains("'k7'"), "{error}");
}

#[tokio::test]
async fn encrypted_outputs_round_trip_locally() {
    let dir = tempfile::tempdir().expect("tempdir");
    encrypted_outputs_round_trip(dir.path().to_str().expect("utf-8")).await;
    // No plaintext or temporary file left next to the parts.
    let mut names: Vec<String> = std::fs::read_dir(dir.path().join("encrypted"))
        .expect("list")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "_SUCCESS",
            "_manifest.json",
            "part-000000.parquet.enc",
            "part-000001.parquet.enc",
            "part-000002.parquet.enc"
        ]
    );
}

#[tokio::test]
async fn encrypted_outputs_round_trip_on_s3() {
    let Some(endpoint) = services::configured(
        s3::VARIABLE,
        "encrypted_outputs_round_trip_on_s3",
        s3::REMEDY,
    ) else {
        return;
    };
    s3::configure(&endpoint);
    let bucket = s3::create_bucket(&endpoint);
    encrypted_outputs_round_trip(&format!("s3://{bucket}/job")).await;
}
