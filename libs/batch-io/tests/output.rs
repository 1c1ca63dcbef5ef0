//! Output parts and the manifest: atomic replacement, verification, and a
//! directory that pyarrow reads as one dataset.

#[path = "../../../tests/support/services.rs"]
mod services;

#[path = "common/s3.rs"]
mod s3;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Array, Int64Array, StringArray};
use arrow::record_batch::RecordBatch;
use shamal_batch_io::{
    CommitFence, Error, MANIFEST_FILE, Manifest, Output, PartInfo, PartWriter, SUCCESS_FILE,
    is_temporary_part_name, remove_temporary_parts,
};

fn batch(first_id: i64, rows: usize, score: f32) -> RecordBatch {
    let keys = RecordBatch::try_from_iter([
        (
            "id",
            Arc::new(Int64Array::from_iter_values(
                first_id..first_id + rows as i64,
            )) as ArrayRef,
        ),
        (
            "name",
            Arc::new(StringArray::from_iter_values(
                (0..rows).map(|row| format!("n{}", first_id + row as i64)),
            )) as ArrayRef,
        ),
    ])
    .expect("keys");
    let scores: ArrayRef = Arc::new(Float32Array::from(vec![score; rows]));
    PartWriter::batch(&keys, vec![("score".to_owned(), scores)]).expect("batch")
}

fn output(dir: &Path) -> Output {
    Output::new(dir.to_str().expect("utf-8")).expect("output")
}

async fn write_part(dir: &Path, shard: usize, batch: &RecordBatch) -> PartInfo {
    let mut writer = PartWriter::create(&output(dir), shard, batch.schema()).expect("create");
    writer.write(batch).expect("write");
    writer.finish().await.expect("finish")
}

fn text(dir: &Path) -> &str {
    dir.to_str().expect("utf-8")
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
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
    names
}

#[tokio::test]
async fn a_rewritten_shard_replaces_its_part() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = write_part(dir.path(), 1, &batch(0, 10, 0.5)).await;
    let second = write_part(dir.path(), 1, &batch(0, 7, 0.25)).await;
    assert_eq!(first.name, "part-000001.parquet");
    assert_eq!(second.name, first.name);
    assert_eq!(names(dir.path()), ["part-000001.parquet"]);
    assert_eq!(second.rows, 7);
    assert_ne!(first.sha256, second.sha256);
    let bytes = std::fs::read(dir.path().join(&second.name)).expect("read");
    assert_eq!(bytes.len() as u64, second.bytes);
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), second.sha256);

    // Abandoned midway: no temporary file left, the earlier part intact.
    let mut writer =
        PartWriter::create(&output(dir.path()), 1, batch(0, 1, 0.0).schema()).expect("create");
    writer.write(&batch(0, 3, 9.0)).expect("write");
    assert_eq!(
        names(dir.path()).len(),
        2,
        "the temporary file is there while writing"
    );
    assert!(names(dir.path())[0].starts_with(".part-000001.parquet.tmp-"));
    drop(writer);
    assert_eq!(names(dir.path()), ["part-000001.parquet"]);
    // Closed but not committed: the same.
    let mut writer =
        PartWriter::create(&output(dir.path()), 1, batch(0, 1, 0.0).schema()).expect("create");
    writer.write(&batch(0, 3, 9.0)).expect("write");
    let staged = writer.close().expect("close");
    assert_eq!(staged.rows(), 3);
    drop(staged);
    assert_eq!(names(dir.path()), ["part-000001.parquet"]);
    assert_eq!(
        std::fs::read(dir.path().join(&second.name)).expect("read"),
        bytes
    );
}

async fn finished_output(dir: &Path) -> Manifest {
    let parts = vec![
        write_part(dir, 2, &batch(20, 5, 2.0)).await,
        write_part(dir, 0, &batch(0, 10, 0.0)).await,
        write_part(dir, 1, &batch(10, 10, 1.0)).await,
    ];
    let manifest = Manifest::new("job-7", "classifier", "4", parts);
    manifest.write(text(dir)).await.expect("manifest");
    manifest
}

#[tokio::test]
async fn the_manifest_lists_the_parts_and_verify_recomputes_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = finished_output(dir.path()).await;
    assert_eq!(
        names(dir.path()),
        [
            SUCCESS_FILE,
            MANIFEST_FILE,
            "part-000000.parquet",
            "part-000001.parquet",
            "part-000002.parquet"
        ]
    );
    assert_eq!(manifest.total_rows, 25);
    let part_names: Vec<&str> = manifest
        .parts
        .iter()
        .map(|part| part.name.as_str())
        .collect();
    assert_eq!(
        part_names,
        [
            "part-000000.parquet",
            "part-000001.parquet",
            "part-000002.parquet"
        ]
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(MANIFEST_FILE)).expect("read"))
            .expect("json");
    assert_eq!(json["format_version"], 1);
    assert_eq!(json["job_id"], "job-7");
    assert_eq!(json["model_version"], "4");
    assert_eq!(json["parts"][1]["rows"], 10);
    assert!(json["created_at"].as_str().expect("time").ends_with('Z'));
    assert_eq!(
        Manifest::verify(text(dir.path())).await.expect("verify"),
        manifest
    );

    // One byte of a part changed, same size.
    let part = dir.path().join("part-000001.parquet");
    let original = std::fs::read(&part).expect("read");
    let mut modified = original.clone();
    modified[10] ^= 0x01;
    std::fs::write(&part, &modified).expect("write");
    let error = Manifest::verify(text(dir.path()))
        .await
        .expect_err("modified part");
    assert!(matches!(error, Error::Verify { .. }), "{error:?}");
    assert!(error.to_string().contains("part-000001.parquet"), "{error}");
    assert!(error.to_string().contains("SHA-256"), "{error}");

    // A part left over from another run.
    std::fs::write(&part, &original).expect("restore");
    Manifest::verify(text(dir.path())).await.expect("verify");
    std::fs::copy(&part, dir.path().join("part-000003.parquet")).expect("copy");
    let error = Manifest::verify(text(dir.path()))
        .await
        .expect_err("extra part");
    assert!(error.to_string().contains("part-000003.parquet"), "{error}");
    std::fs::remove_file(dir.path().join("part-000003.parquet")).expect("remove");

    // A missing part, and a missing _SUCCESS.
    std::fs::rename(&part, dir.path().join("moved")).expect("move");
    let error = Manifest::verify(text(dir.path()))
        .await
        .expect_err("missing part");
    assert!(matches!(error, Error::UnreadablePath { .. }), "{error:?}");
    std::fs::rename(dir.path().join("moved"), &part).expect("move back");
    std::fs::remove_file(dir.path().join(SUCCESS_FILE)).expect("remove");
    let error = Manifest::verify(text(dir.path()))
        .await
        .expect_err("no _SUCCESS");
    assert!(error.to_string().contains("_SUCCESS"), "{error}");
}

/// The project venv's Python (scripts/setup-deps.sh installs pyarrow in it).
fn venv_python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.deps/venv/bin/python")
}

#[tokio::test]
async fn pyarrow_reads_the_output_directory_as_one_dataset() {
    let python = venv_python();
    let has_pyarrow = python.is_file()
        && std::process::Command::new(&python)
            .args(["-c", "import pyarrow.dataset"])
            .status()
            .is_ok_and(|status| status.success());
    if !has_pyarrow {
        services::absent(
            "pyarrow_reads_the_output_directory_as_one_dataset",
            "the project venv has no pyarrow",
            "run scripts/setup-deps.sh",
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    finished_output(dir.path()).await;
    // A temporary part of an unfinished rewrite: readers must skip it.
    let mut writer =
        PartWriter::create(&output(dir.path()), 0, batch(0, 1, 0.0).schema()).expect("create");
    writer.write(&batch(0, 4, 9.0)).expect("write");
    let script = r#"
import sys
import pyarrow.dataset as ds
table = ds.dataset(sys.argv[1], format="parquet").to_table()
table = table.sort_by("id")
print(table.num_rows, table.column_names, table["id"][20].as_py(),
      table["name"][20].as_py(), table["score"][20].as_py(), table["score"][9].as_py())
"#;
    let output = std::process::Command::new(&python)
        .args(["-c", script])
        .arg(dir.path())
        .output()
        .expect("python");
    drop(writer);
    assert!(
        output.status.success(),
        "pyarrow failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "25 ['id', 'name', 'score'] 20 n20 2.0 0.0"
    );
}

/// On S3: a re-written part replaces its object (never a second one, no
/// temporary object left), the manifest and `_SUCCESS` come last, verify
/// recomputes the stored bytes, and a non-empty output is refused.
#[tokio::test]
async fn parts_and_the_manifest_on_s3() {
    let Some(endpoint) =
        services::configured(s3::VARIABLE, "parts_and_the_manifest_on_s3", s3::REMEDY)
    else {
        return;
    };
    s3::configure(&endpoint);
    let bucket = s3::create_bucket(&endpoint);
    let out = format!("s3://{bucket}/scores/run-1");
    let output = Output::new(&out).expect("output");
    output
        .check_empty()
        .await
        .expect("an absent prefix is empty");

    let write = |shard: usize, batch: RecordBatch| {
        let output = output.clone();
        async move {
            let mut writer = PartWriter::create(&output, shard, batch.schema()).expect("create");
            writer.write(&batch).expect("write");
            writer.finish().await.expect("finish")
        }
    };
    let first = write(1, batch(0, 10, 0.5)).await;
    let second = write(1, batch(0, 7, 0.25)).await;
    assert_eq!(second.name, "part-000001.parquet");
    assert_ne!(first.sha256, second.sha256);
    assert_eq!(s3::names(&out).await, ["part-000001.parquet"]);
    let stored = s3::get(&format!("{out}/part-000001.parquet")).await;
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(&stored)), second.sha256);
    assert_eq!(stored.len() as u64, second.bytes);

    // Abandoned after closing: nothing uploaded, the part as it was.
    let mut writer = PartWriter::create(&output, 1, batch(0, 1, 0.0).schema()).expect("create");
    writer.write(&batch(0, 3, 9.0)).expect("write");
    drop(writer.close().expect("close"));
    assert_eq!(s3::get(&format!("{out}/part-000001.parquet")).await, stored);

    let parts = vec![second, write(0, batch(10, 4, 1.0)).await];
    let manifest = Manifest::new("job-s3", "classifier", "2", parts);
    manifest.write(&out).await.expect("manifest");
    assert_eq!(
        s3::names(&out).await,
        [
            SUCCESS_FILE,
            MANIFEST_FILE,
            "part-000000.parquet",
            "part-000001.parquet"
        ]
    );
    assert_eq!(Manifest::verify(&out).await.expect("verify"), manifest);
    assert_eq!(Manifest::read(&out).await.expect("read"), manifest);
    let error = output.check_empty().await.expect_err("not empty");
    assert!(error.to_string().contains(&out), "{error}");

    // One byte changed, then a part the manifest does not list.
    let part = format!("{out}/part-000000.parquet");
    let original = s3::get(&part).await;
    let mut modified = original.clone();
    modified[12] ^= 0x01;
    s3::put(&part, modified).await;
    let error = Manifest::verify(&out).await.expect_err("modified part");
    assert!(matches!(error, Error::Verify { .. }), "{error:?}");
    assert!(error.to_string().contains(&part), "{error}");
    assert!(error.to_string().contains("SHA-256"), "{error}");
    s3::put(&part, original.clone()).await;
    Manifest::verify(&out).await.expect("restored");
    s3::put(&format!("{out}/part-000002.parquet"), original).await;
    let error = Manifest::verify(&out).await.expect_err("extra part");
    assert!(error.to_string().contains("part-000002.parquet"), "{error}");
    output.delete("part-000002.parquet").await.expect("delete");
    output.delete(SUCCESS_FILE).await.expect("delete");
    let error = Manifest::verify(&out).await.expect_err("no _SUCCESS");
    assert!(error.to_string().contains("_SUCCESS"), "{error}");
}

/// A staged part of shard `shard` holding `batch`, not yet committed.
fn staged(dir: &Path, shard: usize, batch: &RecordBatch) -> shamal_batch_io::StagedPart {
    let mut writer = PartWriter::create(&output(dir), shard, batch.schema()).expect("create");
    writer.write(batch).expect("write");
    writer.close().expect("close")
}

#[tokio::test]
async fn a_duplicate_run_never_replaces_a_part_of_a_finished_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Before the manifest, a run commits (replacing the part).
    let part = staged(dir.path(), 3, &batch(0, 2, 5.0))
        .commit_unless_finished()
        .await
        .expect("commit");
    assert_eq!(part.expect("committed").name, "part-000003.parquet");
    std::fs::remove_file(dir.path().join("part-000003.parquet")).expect("remove");

    finished_output(dir.path()).await;
    let listed = std::fs::read(dir.path().join("part-000001.parquet")).expect("read");
    // A duplicate of shard 1 (other rows: other bytes) finishing after the
    // manifest: not committed, its temporary file removed.
    let late = staged(dir.path(), 1, &batch(10, 3, 9.0))
        .commit_unless_finished()
        .await
        .expect("commit");
    assert!(late.is_none());
    assert_eq!(
        std::fs::read(dir.path().join("part-000001.parquet")).expect("read"),
        listed
    );
    Manifest::verify(text(dir.path())).await.expect("verify");
    assert_eq!(
        names(dir.path()),
        [
            SUCCESS_FILE,
            MANIFEST_FILE,
            "part-000000.parquet",
            "part-000001.parquet",
            "part-000002.parquet"
        ]
    );
}

#[tokio::test]
async fn a_commit_waits_for_the_fence_and_then_finds_the_output_finished() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = write_part(dir.path(), 0, &batch(0, 4, 1.0)).await;
    let listed = std::fs::read(dir.path().join("part-000000.parquet")).expect("read");
    let fence = CommitFence::take(&output(dir.path())).await.expect("fence");
    // The duplicate tries to commit while the coordinator holds the fence
    // (checking the parts, writing the manifest): it waits, then sees
    // `_SUCCESS`.
    let duplicate = staged(dir.path(), 0, &batch(0, 4, 7.0));
    let commit = tokio::spawn(duplicate.commit_unless_finished());
    Manifest::new("job-9", "classifier", "1", vec![first])
        .write(text(dir.path()))
        .await
        .expect("manifest");
    assert!(!commit.is_finished());
    drop(fence);
    assert!(commit.await.expect("join").expect("commit").is_none());
    assert_eq!(
        std::fs::read(dir.path().join("part-000000.parquet")).expect("read"),
        listed
    );
    Manifest::verify(text(dir.path())).await.expect("verify");
}

#[tokio::test]
async fn temporary_parts_of_dead_writers_are_recognised_and_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    finished_output(dir.path()).await;
    // A writer that never ends (its process killed mid-shard): its file
    // stays. `forget` skips the drop that would remove it.
    let mut writer =
        PartWriter::create(&output(dir.path()), 4, batch(0, 1, 0.0).schema()).expect("create");
    writer.write(&batch(0, 5, 1.0)).expect("write");
    std::mem::forget(writer);
    let left: Vec<String> = names(dir.path())
        .into_iter()
        .filter(|name| name.starts_with('.'))
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].starts_with(".part-000004.parquet.tmp-"), "{left:?}");
    assert!(is_temporary_part_name(&left[0]));
    let random = "0123456789abcdef0123456789abcdef";
    let sealed = format!(".part-000002.parquet.enc.tmp-{random}.sealed");
    assert!(is_temporary_part_name(&sealed));
    std::fs::write(dir.path().join(&sealed), b"x").expect("write");
    // Not a part's temporary file: kept.
    let others = [
        format!(".{MANIFEST_FILE}.tmp-{random}"),
        ".part-000001.parquet.tmp-short".to_owned(),
        format!(".other.parquet.tmp-{random}"),
        format!("part-000009.parquet.tmp-{random}"),
        ".hidden".to_owned(),
    ];
    for name in &others {
        assert!(!is_temporary_part_name(name), "{name}");
        std::fs::write(dir.path().join(name), b"x").expect("write");
    }
    assert!(!is_temporary_part_name("part-000001.parquet"));

    let mut removed = remove_temporary_parts(&output(dir.path()))
        .await
        .expect("remove");
    removed.sort();
    let mut expected = vec![left[0].clone(), sealed];
    expected.sort();
    assert_eq!(removed, expected);
    let mut kept = names(dir.path());
    kept.retain(|name| others.contains(name));
    assert_eq!(kept.len(), others.len());
    assert!(
        names(dir.path())
            .iter()
            .all(|name| !is_temporary_part_name(name))
    );
    Manifest::verify(text(dir.path())).await.expect("verify");
    // A missing local directory has nothing to remove.
    assert!(
        remove_temporary_parts(&output(&dir.path().join("absent")))
            .await
            .expect("absent")
            .is_empty()
    );
}
