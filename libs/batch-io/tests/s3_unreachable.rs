//! An S3 endpoint that does not answer: opening a dataset, checking an
//! output and writing a part fail in bounded time with errors naming the
//! URL. A test binary of its own: the S3 settings are per process.

use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Int64Array};
use arrow::record_batch::RecordBatch;
use shamal_batch_io::{Dataset, Output, PartWriter, S3Options, configure_s3};

#[tokio::test]
async fn an_unreachable_endpoint_is_named_in_bounded_time() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port();
    configure_s3(S3Options {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: Some("us-east-1".to_owned()),
        allow_http: Some(true),
        access_key_id: Some("shamal-test".to_owned()),
        secret_access_key: Some("shamal-test-secret".to_owned()),
    });
    let started = Instant::now();
    let input = "s3://lake/features/day=1/";
    let error = Dataset::open(input, None).await.expect_err("unreachable");
    assert!(error.to_string().contains(input), "{error}");

    let out = "s3://lake/scores/day=1";
    let output = Output::new(out).expect("output");
    let error = output.check_empty().await.expect_err("unreachable");
    assert!(error.to_string().contains(out), "{error}");

    let ids: ArrayRef = std::sync::Arc::new(Int64Array::from(vec![1, 2]));
    let batch = RecordBatch::try_from_iter([("id", ids)]).expect("batch");
    let mut writer = PartWriter::create(&output, 3, batch.schema()).expect("create");
    writer.write(&batch).expect("write");
    let error = writer.finish().await.expect_err("unreachable");
    assert!(
        error
            .to_string()
            .contains(&format!("{out}/part-000003.parquet")),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(100),
        "took {:?}",
        started.elapsed()
    );
}
