//! Artifacts encrypted at rest, on SQLite and PostgreSQL: what is on disk
//! is not the plaintext, what is loaded (store, REST, gRPC FetchArtifact)
//! is; tampered or moved blobs are refused; plaintext blobs from before
//! encryption stay readable; after a key rotation `rekey` moves every blob
//! to the new key, after which the old key can go.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use futures::StreamExt;
use shamal_registry::config::ArtifactKeys;
use shamal_registry::{ModelRegistry, RegistryConfig, RegistryListeners, RunningRegistry};
use support::{TestDb, body, push, sha256_hex};

const MARKER: &[u8] = b"SHAMAL-PLAINTEXT-MARKER-7f3a";

fn key(byte: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

/// `k1:<key 1>`, `k2:<key 2>,k1:<key 1>` ...: the first is active.
fn keys(ids: &[&str]) -> String {
    ids.iter()
        .map(|id| {
            let byte = id.trim_start_matches('k').parse::<u8>().unwrap();
            format!("{id}:{}", key(byte))
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn config(db: &TestDb, keys: Option<String>) -> RegistryConfig {
    RegistryConfig {
        database_url: db.url.clone(),
        artifact_dir: db.dir.path().join("artifacts"),
        artifact_keys: keys.map(ArtifactKeys::new),
        ..RegistryConfig::default()
    }
}

async fn open(db: &TestDb, keys: Option<String>) -> Arc<ModelRegistry> {
    shamal_registry::open(&config(db, keys)).await.unwrap()
}

fn blob_path(db: &TestDb, sha256: &str) -> PathBuf {
    db.dir
        .path()
        .join("artifacts/sha256")
        .join(&sha256[..2])
        .join(sha256)
}

/// The key id a stored blob is under, `None` for plaintext.
fn stored_key(db: &TestDb, sha256: &str) -> Option<String> {
    let bytes = std::fs::read(blob_path(db, sha256)).unwrap();
    shamal_keys::BlobHeader::parse(&bytes)
        .unwrap()
        .map(|header| header.key_id().to_owned())
}

fn plaintext_on_disk(db: &TestDb, sha256: &str) -> bool {
    let bytes = std::fs::read(blob_path(db, sha256)).unwrap();
    bytes.windows(MARKER.len()).any(|window| window == MARKER)
}

/// An artifact of `len` bytes that holds the marker, different per `seed`.
fn artifact(seed: u8, len: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..len)
        .map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    for start in (0..len.saturating_sub(MARKER.len())).step_by(50_000) {
        bytes[start..start + MARKER.len()].copy_from_slice(MARKER);
    }
    bytes
}

async fn load(registry: &ModelRegistry, sha256: &str) -> shamal_registry::error::Result<Vec<u8>> {
    let (size, mut stream) = registry.open_artifact(sha256).await?;
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend_from_slice(
            &chunk.map_err(|error| {
                shamal_registry::error::RegistryError::Internal(error.to_string())
            })?,
        );
    }
    assert_eq!(
        size,
        bytes.len() as u64,
        "the size served is the plaintext's"
    );
    Ok(bytes)
}

/// Serves a registry with `keys` on loopback, fetches `sha256` over REST
/// and gRPC, and re-keys over REST.
async fn fetch_served(
    db: &TestDb,
    keys: &str,
    sha256: &str,
) -> (Vec<u8>, Vec<u8>, serde_json::Value) {
    let mut config = config(db, Some(keys.to_owned()));
    config.http_listen = ([127, 0, 0, 1], 0).into();
    config.grpc_listen = ([127, 0, 0, 1], 0).into();
    config.metrics_listen = None;
    let listeners = RegistryListeners::bind(&config).await.unwrap();
    let running =
        RunningRegistry::start(config, listeners, shamal_telemetry::MetricsRegistry::new())
            .await
            .unwrap();
    let response = reqwest::get(format!(
        "http://{}/v1/artifacts/{sha256}",
        running.http_address
    ))
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let rest = response.bytes().await.unwrap().to_vec();
    use shamal_proto::shamal::registry::v1 as proto;
    let mut client =
        proto::registry_client::RegistryClient::connect(format!("http://{}", running.grpc_address))
            .await
            .unwrap()
            .max_decoding_message_size(64 * 1024 * 1024);
    let mut chunks = client
        .fetch_artifact(proto::FetchArtifactRequest {
            sha256: sha256.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut grpc = Vec::new();
    while let Some(chunk) = chunks.message().await.unwrap() {
        grpc.extend_from_slice(&chunk.data);
    }
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/admin/rekey", running.http_address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let report: serde_json::Value = response.json().await.unwrap();
    running.stop().await.unwrap();
    (rest, grpc, report)
}

async fn encryption_rotation_and_rekey(db: TestDb) {
    // Before encryption: a plaintext blob.
    let old = artifact(1, 200_000);
    let old_sha = sha256_hex(&old);
    {
        let registry = open(&db, None).await;
        push(&registry, "legacy", &old).await;
        assert!(plaintext_on_disk(&db, &old_sha));
        assert_eq!(stored_key(&db, &old_sha), None);
        let error = registry.rekey_artifacts().await.unwrap_err();
        assert_eq!(error.code(), "failed_precondition", "{error}");
        assert!(
            error.to_string().contains("encryption at rest is off"),
            "{error}"
        );
    }

    // Encryption on under k1: new blobs are encrypted, old ones readable.
    let small = artifact(2, 70_000);
    let small_sha = sha256_hex(&small);
    let large = artifact(3, 3 * 1024 * 1024 + 5);
    let large_sha = sha256_hex(&large);
    {
        let registry = open(&db, Some(keys(&["k1"]))).await;
        push(&registry, "model", &small).await;
        push(&registry, "model", &large).await;
        // Pushing the same bytes again is still idempotent.
        registry
            .put_artifact(&small_sha, body(small.clone()))
            .await
            .unwrap();
        for sha in [&small_sha, &large_sha] {
            assert!(
                !plaintext_on_disk(&db, sha),
                "{sha} is in plaintext on disk"
            );
            assert_eq!(stored_key(&db, sha).as_deref(), Some("k1"));
        }
        assert_eq!(load(&registry, &small_sha).await.unwrap(), small);
        assert_eq!(load(&registry, &large_sha).await.unwrap(), large);
        assert_eq!(load(&registry, &old_sha).await.unwrap(), old);
        let version = registry.get_version("model", 2).await.unwrap();
        assert_eq!(
            version.artifact.size_bytes,
            large.len() as u64,
            "the plaintext size"
        );
    }
    // Rotation: k2 active, k1 still held. Old blobs load; new ones are
    // under k2.
    let newer = artifact(4, 10);
    let newer_sha = sha256_hex(&newer);
    {
        let registry = open(&db, Some(keys(&["k2", "k1"]))).await;
        push(&registry, "model", &newer).await;
        assert_eq!(stored_key(&db, &newer_sha).as_deref(), Some("k2"));
        for (sha, bytes) in [(&old_sha, &old), (&small_sha, &small), (&large_sha, &large)] {
            assert_eq!(&load(&registry, sha).await.unwrap(), bytes);
        }
        // Re-keying while a download of a blob it replaces is under way.
        let (_, mut in_flight) = registry.open_artifact(&large_sha).await.unwrap();
        let first = in_flight.next().await.unwrap().unwrap();
        let report = registry.rekey_artifacts().await.unwrap();
        assert_eq!(
            (
                report.rekeyed,
                report.already_current,
                report.active_key.as_str()
            ),
            (3, 1, "k2")
        );
        let mut downloaded = first.to_vec();
        while let Some(chunk) = in_flight.next().await {
            downloaded.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(downloaded, large, "a reader keeps the blob it opened");
        for sha in [&old_sha, &small_sha, &large_sha, &newer_sha] {
            assert_eq!(stored_key(&db, sha).as_deref(), Some("k2"), "{sha}");
            assert!(!plaintext_on_disk(&db, sha), "{sha}");
        }
        // Idempotent.
        let again = registry.rekey_artifacts().await.unwrap();
        assert_eq!((again.rekeyed, again.already_current), (0, 4));
        let leftovers = std::fs::read_dir(db.dir.path().join("artifacts/incoming"))
            .unwrap()
            .count();
        assert_eq!(leftovers, 0, "no temporary file stays behind");
    }

    // The old key removed: everything still loads.
    {
        let registry = open(&db, Some(keys(&["k2"]))).await;
        for (sha, bytes) in [
            (&old_sha, &old),
            (&small_sha, &small),
            (&large_sha, &large),
            (&newer_sha, &newer),
        ] {
            assert_eq!(&load(&registry, sha).await.unwrap(), bytes);
        }
    }
    // REST and gRPC serve the plaintext, and the admin endpoint answers
    // with the counts.
    let (rest, grpc, report) = fetch_served(&db, &keys(&["k2"]), &large_sha).await;
    assert!(rest == large && grpc == large);
    assert_eq!(
        report,
        serde_json::json!({"rekeyed": 0, "already_current": 4, "active_key": "k2"})
    );
}

#[tokio::test]
async fn sqlite_encrypts_rotates_and_rekeys() {
    encryption_rotation_and_rekey(TestDb::sqlite().await).await;
}

#[tokio::test]
async fn postgres_encrypts_rotates_and_rekeys() {
    if let Some(db) = TestDb::postgres().await {
        encryption_rotation_and_rekey(db).await;
    }
}

async fn tampered_and_unreadable_blobs_are_refused(db: TestDb) {
    let registry = open(&db, Some(keys(&["k1"]))).await;
    let small = artifact(5, 1000);
    let small_sha = sha256_hex(&small);
    let large = artifact(6, 300_000);
    let large_sha = sha256_hex(&large);
    push(&registry, "model", &small).await;
    push(&registry, "model", &large).await;
    let pristine_small = std::fs::read(blob_path(&db, &small_sha)).unwrap();
    let pristine_large = std::fs::read(blob_path(&db, &large_sha)).unwrap();

    // A byte changed in the first segment: refused when opened.
    let mut tampered = pristine_small.clone();
    let last = tampered.len() - 20;
    tampered[last] ^= 0x40;
    std::fs::write(blob_path(&db, &small_sha), &tampered).unwrap();
    let error = registry.open_artifact(&small_sha).await.err().unwrap();
    assert_eq!(error.code(), "internal", "{error}");
    assert!(
        error.to_string().contains(&small_sha) && error.to_string().contains("authentication"),
        "{error}"
    );
    // ... and re-keying leaves it as it is, naming it.
    let rotated = open(&db, Some(keys(&["k2", "k1"]))).await;
    let error = rotated.rekey_artifacts().await.unwrap_err();
    assert!(error.to_string().contains(&small_sha), "{error}");
    assert_eq!(std::fs::read(blob_path(&db, &small_sha)).unwrap(), tampered);
    std::fs::write(blob_path(&db, &small_sha), &pristine_small).unwrap();
    std::fs::write(blob_path(&db, &large_sha), &pristine_large).unwrap();

    // A byte changed in a later segment: the download fails there, never
    // yielding garbage.
    let mut tampered = pristine_large.clone();
    let late = tampered.len() - 100;
    tampered[late] ^= 0x01;
    std::fs::write(blob_path(&db, &large_sha), &tampered).unwrap();
    let (_, mut stream) = registry.open_artifact(&large_sha).await.unwrap();
    let mut received = Vec::new();
    let mut failure = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => received.extend_from_slice(&chunk),
            Err(error) => {
                failure = Some(error);
                break;
            }
        }
    }
    let failure = failure.expect("a tampered segment is an error");
    assert!(failure.to_string().contains(&large_sha), "{failure}");
    assert!(received.len() < large.len() && large.starts_with(&received));

    // Truncated: refused.
    std::fs::write(
        blob_path(&db, &large_sha),
        &pristine_large[..pristine_large.len() - 16],
    )
    .unwrap();
    assert!(load(&registry, &large_sha).await.is_err());

    // One artifact's blob moved to another's path: refused, though it
    // authenticates under the same key where it belongs.
    std::fs::write(blob_path(&db, &large_sha), &pristine_small).unwrap();
    let error = load(&registry, &large_sha).await.unwrap_err();
    assert!(error.to_string().contains("authentication"), "{error}");
    std::fs::write(blob_path(&db, &large_sha), &pristine_large).unwrap();
    assert_eq!(load(&registry, &large_sha).await.unwrap(), large);

    // The key a blob names is gone: a clear precondition, naming it.
    let without = open(&db, Some(keys(&["k3"]))).await;
    let error = without.open_artifact(&small_sha).await.err().unwrap();
    assert_eq!(error.code(), "failed_precondition", "{error}");
    assert!(error.to_string().contains("'k1'"), "{error}");
    // Encryption off altogether: the same.
    let off = open(&db, None).await;
    let error = off.open_artifact(&small_sha).await.err().unwrap();
    assert_eq!(error.code(), "failed_precondition", "{error}");
    assert!(
        error.to_string().contains("no artifact key ring"),
        "{error}"
    );
}

#[tokio::test]
async fn sqlite_refuses_tampered_blobs() {
    tampered_and_unreadable_blobs_are_refused(TestDb::sqlite().await).await;
}

#[tokio::test]
async fn postgres_refuses_tampered_blobs() {
    if let Some(db) = TestDb::postgres().await {
        tampered_and_unreadable_blobs_are_refused(db).await;
    }
}

#[tokio::test]
async fn rekey_over_rest_without_keys_is_a_failed_precondition() {
    let dir = tempfile::tempdir().unwrap();
    let running = RunningRegistry::start_local("sqlite::memory:", dir.path())
        .await
        .unwrap();
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/admin/rekey", running.http_address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "failed_precondition", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("encryption at rest is off"),
        "{body}"
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn key_files_configure_the_store_and_bad_ones_name_the_file() {
    let db = TestDb::sqlite().await;
    let file = db.dir.path().join("artifact-keys.toml");
    let id = shamal_keys::generate_key_file(&file).unwrap();
    let mut config = config(&db, None);
    config.artifact_key_file = Some(file.clone());
    let registry = shamal_registry::open(&config).await.unwrap();
    let bytes = artifact(7, 5000);
    push(&registry, "model", &bytes).await;
    assert_eq!(stored_key(&db, &sha256_hex(&bytes)), Some(id));
    assert_eq!(load(&registry, &sha256_hex(&bytes)).await.unwrap(), bytes);

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = shamal_registry::open(&config)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("artifact_key_file") && error.contains("artifact-keys.toml"),
            "{error}"
        );
    }
}
