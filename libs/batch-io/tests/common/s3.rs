//! The S3-compatible server of the tests (moto, `scripts/ensure-s3.sh`):
//! settings, a fresh bucket per test, uploads. Shared by the batch-io and
//! batch-coordinator tests (`#[path]`-included); the caller gets the
//! endpoint from `SHAMAL_TEST_S3_ENDPOINT` through its services module, so
//! that a missing server fails under `SHAMAL_REQUIRE_SERVICES=1`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::Path;

use shamal_batch_io::{S3Options, configure_s3};

/// The variable naming the endpoint (`http://127.0.0.1:63900`).
pub const VARIABLE: &str = "SHAMAL_TEST_S3_ENDPOINT";
/// What the tests skip or fail with when it is unset.
pub const REMEDY: &str = "scripts/ensure-s3.sh starts moto and prints its endpoint";

/// Points this process's S3 locations at `endpoint` (moto takes any
/// credentials).
pub fn configure(endpoint: &str) {
    configure_s3(S3Options {
        endpoint: Some(endpoint.to_owned()),
        region: Some("us-east-1".to_owned()),
        allow_http: Some(true),
        access_key_id: Some("shamal-test".to_owned()),
        secret_access_key: Some("shamal-test-secret".to_owned()),
    });
}

/// Creates a bucket of a fresh name on `endpoint` and returns its name.
/// (A plain CreateBucket PUT: moto does not check signatures, and
/// `object_store` does not create buckets.)
pub fn create_bucket(endpoint: &str) -> String {
    let bucket = format!("shamal-test-{}", uuid::Uuid::new_v4().simple());
    let host = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut stream = std::net::TcpStream::connect(&host)
        .unwrap_or_else(|error| panic!("{VARIABLE}={endpoint} is unusable ({error})"));
    write!(
        stream,
        "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "creating bucket {bucket} on {endpoint}: {response}"
    );
    bucket
}

/// The output (prefix) holding `url` and the object's name in it.
fn split(url: &str) -> (shamal_batch_io::Output, String) {
    let (prefix, name) = url.rsplit_once('/').unwrap();
    (
        shamal_batch_io::Output::new(prefix).unwrap(),
        name.to_owned(),
    )
}

/// Uploads local file `file` to `url` (`s3://bucket/key`).
pub async fn upload(file: &Path, url: &str) {
    put(url, std::fs::read(file).unwrap()).await;
}

/// Writes `data` at `url`.
pub async fn put(url: &str, data: Vec<u8>) {
    let (output, name) = split(url);
    output.put(&name, data.into()).await.unwrap();
}

/// The bytes at `url`.
pub async fn get(url: &str) -> Vec<u8> {
    let (output, name) = split(url);
    output.read(&name).await.unwrap().to_vec()
}

/// The object names directly under `url` (a prefix), sorted.
pub async fn names(url: &str) -> Vec<String> {
    shamal_batch_io::Output::new(url)
        .unwrap()
        .list()
        .await
        .unwrap()
}
