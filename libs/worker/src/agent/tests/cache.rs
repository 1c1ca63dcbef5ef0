//! The artifact cache, against the real registry.

use super::*;

// ---------------------------------------------------------- artifact cache

fn cache_files(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn artifacts_are_fetched_verified_and_cached() {
    let dir = tempfile::tempdir().unwrap();
    let (running, config) = start_registry(dir.path()).await;
    let registry = running.registry.clone();
    let mut client = shamal_registry_client::client(
        shamal_registry_client::channel(&running.grpc_address.to_string()).unwrap(),
    );
    let cache = dir.path().join("cache");
    // Large enough for the registry to stream it in several chunks.
    let bytes: Vec<u8> = (0..700_000u32).map(|index| (index % 251) as u8).collect();
    let artifact = upload(&registry, &bytes, "onnx").await;

    // Good digest: fetched into <cache>/<sha256>.<format>.
    let path = ensure_artifact(&mut client, &cache, &artifact)
        .await
        .unwrap();
    assert_eq!(path, cache.join(format!("{}.onnx", artifact.sha256)));
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(cache_files(&cache), [format!("{}.onnx", artifact.sha256)]);

    // Cached: re-verified and reused without a fetch. The registry no
    // longer has the bytes, so a fetch could not succeed.
    std::fs::remove_file(stored_artifact(&config, &artifact.sha256)).unwrap();
    let again = ensure_artifact(&mut client, &cache, &artifact)
        .await
        .unwrap();
    assert_eq!(again, path);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);

    // Corrupted in the cache: not served; deleted and fetched again.
    std::fs::write(&path, b"tampered with").unwrap();
    let failure = ensure_artifact(&mut client, &cache, &artifact)
        .await
        .unwrap_err();
    assert!(
        failure.reason.contains("cannot fetch artifact"),
        "a corrupt cached copy is never used: {failure:?}"
    );
    assert!(cache_files(&cache).is_empty(), "{:?}", cache_files(&cache));
    upload(&registry, &bytes, "onnx").await;
    std::fs::write(&path, b"tampered with").unwrap();
    ensure_artifact(&mut client, &cache, &artifact)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "fetched again");
    assert_eq!(cache_files(&cache).len(), 1, "no download left behind");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn bad_artifacts_fail_with_a_clear_reason_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (running, config) = start_registry(dir.path()).await;
    let registry = running.registry.clone();
    let mut client = shamal_registry_client::client(
        shamal_registry_client::channel(&running.grpc_address.to_string()).unwrap(),
    );
    let cache = dir.path().join("cache");

    // The registry serves other bytes than the digest names (its store
    // was corrupted after the upload).
    let claimed = upload(&registry, b"the real model", "onnx").await;
    tamper(&config, &claimed.sha256, b"other bytes!!!");
    let failure = ensure_artifact(&mut client, &cache, &claimed)
        .await
        .unwrap_err();
    assert!(
        failure.reason.contains("digest mismatch") && failure.reason.contains(&claimed.sha256),
        "{failure:?}"
    );
    assert!(!failure.transient);
    assert!(cache_files(&cache).is_empty(), "{:?}", cache_files(&cache));

    // Fewer or more bytes than registered.
    let short = upload(&registry, b"a model cut short", "onnx").await;
    tamper(&config, &short.sha256, b"a model");
    let failure = ensure_artifact(&mut client, &cache, &short)
        .await
        .unwrap_err();
    assert!(failure.reason.contains("size mismatch"), "{failure:?}");
    assert!(!failure.transient);
    let long = upload(&registry, b"a model", "onnx").await;
    tamper(
        &config,
        &long.sha256,
        b"a model with more bytes than registered",
    );
    let failure = ensure_artifact(&mut client, &cache, &long)
        .await
        .unwrap_err();
    assert!(failure.reason.contains("larger than"), "{failure:?}");
    assert!(!failure.transient);
    assert!(cache_files(&cache).is_empty(), "{:?}", cache_files(&cache));

    // Unknown to the registry.
    let unknown = Artifact {
        sha256: digest(b"never uploaded"),
        size_bytes: 14,
        format: "onnx".to_owned(),
    };
    let failure = ensure_artifact(&mut client, &cache, &unknown)
        .await
        .unwrap_err();
    assert!(
        failure.reason.contains("cannot fetch artifact") && failure.reason.contains("NotFound"),
        "{failure:?}"
    );
    assert!(!failure.transient, "NOT_FOUND is final: {failure:?}");

    // A digest or format that is not one never reaches the registry or
    // the file system: the worker's own check answers.
    let hostile = Artifact {
        sha256: "../../etc/passwd".to_owned(),
        ..unknown.clone()
    };
    let failure = ensure_artifact(&mut client, &cache, &hostile)
        .await
        .unwrap_err();
    assert!(
        failure.reason.contains("is not a lowercase hex sha256"),
        "{failure:?}"
    );
    let hostile = Artifact {
        format: "../onnx".to_owned(),
        ..claimed.clone()
    };
    let failure = ensure_artifact(&mut client, &cache, &hostile)
        .await
        .unwrap_err();
    assert!(failure.reason.contains("format"), "{failure:?}");
    assert!(cache_files(&cache).is_empty(), "{:?}", cache_files(&cache));
    running.stop().await.unwrap();
}
