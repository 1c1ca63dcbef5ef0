//! Signing keys on disk, PEM and raw encodings, signature checks.

use std::os::unix::fs::PermissionsExt;

use shamal_audit::{Digest, KeyError, PublicKey, Signer, VerifyError, load_public_key};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn load_or_create_creates_a_private_key_file_and_reloads_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nested/keys/audit.pem");
    let created = Signer::load_or_create(&path).expect("created");
    assert_eq!(mode(&path), 0o600);
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{text}");
    let loaded = Signer::load_or_create(&path).expect("reloaded");
    assert_eq!(loaded.key_id(), created.key_id());
    assert_eq!(loaded.public_key(), created.public_key());
    // What one signs the other's public key verifies.
    let checkpoint = loaded.checkpoint(3, Digest::of(b"x"), 9);
    created
        .public_key()
        .verify_checkpoint(&checkpoint)
        .expect("same key");
}

#[test]
fn a_group_or_world_readable_key_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.pem");
    Signer::load_or_create(&path).expect("created");
    for bad in [0o644, 0o640, 0o604, 0o660] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(bad)).expect("chmod");
        let error = Signer::load_or_create(&path).expect_err("refused");
        let message = error.to_string();
        assert!(matches!(error, KeyError::File { .. }), "{message}");
        assert!(
            message.contains("group or others") && message.contains("chmod 600"),
            "{message}"
        );
        assert!(message.contains(&format!("{bad:04o}")), "{message}");
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).expect("chmod");
    Signer::load_or_create(&path).expect("0400 is private");
}

#[test]
fn a_key_file_that_is_not_a_key_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.pem");
    std::fs::write(&path, "not a key").expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let error = Signer::load_or_create(&path).expect_err("not a key");
    assert!(error.to_string().contains("PKCS#8"), "{error}");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "not a key");
}

#[test]
fn pem_round_trips() {
    let signer = Signer::generate();
    let pem = signer.to_pem().expect("pem");
    let again = Signer::from_pem(&pem).expect("parses");
    assert_eq!(again.key_id(), signer.key_id());

    let key = signer.public_key();
    let pem = key.to_pem();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");
    assert_eq!(PublicKey::from_pem(&pem).expect("parses"), key);
    assert_eq!(PublicKey::from_bytes(&key.to_bytes()).expect("raw"), key);
    assert!(PublicKey::from_bytes(&[1; 31]).is_err());
    assert!(
        PublicKey::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
            .is_err()
    );
    assert!(
        Signer::from_pem(&pem).is_err(),
        "a public key is not a private key"
    );
    assert_ne!(Signer::generate().key_id(), signer.key_id());
}

#[test]
fn key_id_is_the_first_16_hex_of_the_sha256_of_the_raw_key() {
    let key = Signer::from_seed(&[1; 32]).public_key();
    let id = key.key_id();
    assert_eq!(id.len(), 16);
    assert!(Digest::of(&key.to_bytes()).to_hex().starts_with(&id));
}

#[test]
fn load_public_key_accepts_pem_and_hex() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = Signer::generate().public_key();
    let pem = dir.path().join("key.pem");
    std::fs::write(&pem, key.to_pem()).expect("write");
    assert_eq!(load_public_key(&pem).expect("pem"), key);
    let hex_file = dir.path().join("key.hex");
    std::fs::write(&hex_file, format!("{}\n", hex::encode(key.to_bytes()))).expect("write");
    assert_eq!(load_public_key(&hex_file).expect("hex"), key);
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "zz").expect("write");
    let error = load_public_key(&bad).expect_err("bad");
    assert!(error.to_string().contains("64 hex"), "{error}");
    assert!(load_public_key(&dir.path().join("missing")).is_err());
}

#[test]
fn signatures_name_a_wrong_key_and_catch_any_change() {
    let signer = Signer::from_seed(&[3; 32]);
    let other = Signer::from_seed(&[4; 32]);
    let key = signer.public_key();

    let checkpoint = signer.checkpoint(10, Digest::of(b"head"), 100);
    key.verify_checkpoint(&checkpoint).expect("verifies");
    let error = other
        .public_key()
        .verify_checkpoint(&checkpoint)
        .expect_err("other key");
    assert!(matches!(error, VerifyError::WrongKey { .. }), "{error}");
    for change in 0..4 {
        let mut altered = checkpoint.clone();
        match change {
            0 => altered.seq += 1,
            1 => altered.head_hash = Digest::ZERO,
            2 => altered.signed_at_ms += 1,
            _ => altered.signature.truncate(63),
        }
        let error = key.verify_checkpoint(&altered).expect_err("altered");
        assert!(
            matches!(
                error,
                VerifyError::BadSignature {
                    what: "checkpoint",
                    ..
                }
            ),
            "{error}"
        );
    }

    let tombstone = signer.tombstone(1, 5, Digest::of(b"5"), 7);
    key.verify_tombstone(&tombstone).expect("verifies");
    let mut altered = tombstone.clone();
    altered.first_seq = 2;
    assert!(key.verify_tombstone(&altered).is_err());

    let seal = signer.seal(1, 2, 3, 4, Digest::of(b"a"), Digest::of(b"b"), 2, 5);
    key.verify_seal(&seal).expect("verifies");
    let mut altered = seal.clone();
    altered.until_ms = 3;
    assert!(key.verify_seal(&altered).is_err());

    // A checkpoint's signature is not a tombstone's with the same numbers,
    // nor a seal's.
    let checkpoint = signer.checkpoint(5, Digest::of(b"5"), 7);
    let mut replayed = tombstone.clone();
    replayed.signature = checkpoint.signature.clone();
    assert!(key.verify_tombstone(&replayed).is_err());
    let mut replayed = seal.clone();
    replayed.signature = checkpoint.signature;
    assert!(key.verify_seal(&replayed).is_err());
}

#[test]
fn debug_never_shows_the_secret() {
    let signer = Signer::from_seed(&[5; 32]);
    let debug = format!("{signer:?}");
    assert!(debug.contains(&signer.key_id()), "{debug}");
    assert!(!debug.contains(&hex::encode([5u8; 32])), "{debug}");
}
