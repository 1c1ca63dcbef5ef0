//! ChainVerifier: the incremental check the audit service's Verify uses.

mod common;

use common::{chain, signer};
use shamal_audit::{ChainVerifier, Digest, FailureKind, Record};

#[test]
fn a_whole_chain_verifies_from_zero() {
    let key = signer().public_key();
    let mut verifier = ChainVerifier::new(Digest::ZERO, 1);
    for record in chain() {
        verifier.push(&record).expect("in order");
        if record.seq.is_multiple_of(25) {
            verifier
                .check_checkpoint(&signer().checkpoint(record.seq, record.hash, 1), &key)
                .expect("checkpoint");
        }
    }
    assert_eq!(verifier.records(), 230);
    assert_eq!(verifier.checkpoints(), 9);
    assert_eq!(verifier.last_seq(), Some(230));
    assert_eq!(verifier.next_seq(), 231);
    assert_eq!(verifier.head(), chain()[229].hash);
}

#[test]
fn a_tombstone_bridges_a_removed_range() {
    let signer = signer();
    let key = signer.public_key();
    let chain = chain();
    let mut verifier = ChainVerifier::new(Digest::ZERO, 1);
    // Records 1..=40 removed by retention.
    verifier
        .push_tombstone(&signer.tombstone(1, 40, chain[39].hash, 5), &key)
        .expect("tombstone");
    verifier
        .check_checkpoint(&signer.checkpoint(40, chain[39].hash, 6), &key)
        .expect("a checkpoint of the tombstone's end");
    for record in &chain[40..60] {
        verifier.push(record).expect("in order");
    }
    assert_eq!(
        (
            verifier.records(),
            verifier.tombstones(),
            verifier.removed()
        ),
        (20, 1, 40)
    );

    // A tombstone that claims another last hash breaks the next link.
    let mut verifier = ChainVerifier::new(Digest::ZERO, 1);
    verifier
        .push_tombstone(&signer.tombstone(1, 40, Digest::of(b"other"), 5), &key)
        .expect("signed");
    let failure = verifier.push(&chain[40]).expect_err("broken link");
    assert_eq!(
        (failure.kind, failure.seq, failure.line),
        (FailureKind::Edited, Some(41), 0)
    );
    assert!(
        failure.to_string().starts_with("record 41: edited"),
        "{failure}"
    );

    // A tombstone signed by someone else.
    let mut verifier = ChainVerifier::new(Digest::ZERO, 1);
    let forged = common::other_signer().tombstone(1, 40, chain[39].hash, 5);
    let failure = verifier
        .push_tombstone(&forged, &key)
        .expect_err("other key");
    assert_eq!(failure.kind, FailureKind::WrongKey);
}

#[test]
fn each_break_is_named() {
    let chain = chain();
    let key = signer().public_key();
    let start = |n: usize| {
        let mut verifier = ChainVerifier::new(Digest::ZERO, 1);
        for record in &chain[..n] {
            verifier.push(record).expect("in order");
        }
        verifier
    };

    let mut edited = chain[5].clone();
    edited.event.tenant = "other".to_owned();
    let failure = start(5).push(&edited).expect_err("edited");
    assert_eq!((failure.kind, failure.seq), (FailureKind::Edited, Some(6)));

    let failure = start(5).push(&chain[7]).expect_err("gap");
    assert_eq!((failure.kind, failure.seq), (FailureKind::Removed, Some(6)));

    let failure = start(5).push(&chain[2]).expect_err("old");
    assert_eq!(failure.kind, FailureKind::Reordered);

    let rehashed = Record::append(&Digest::of(b"elsewhere"), 6, 1, chain[5].event.clone());
    let failure = start(5).push(&rehashed).expect_err("unlinked");
    assert_eq!((failure.kind, failure.seq), (FailureKind::Edited, Some(6)));

    let failure = start(5)
        .check_checkpoint(&signer().checkpoint(5, chain[3].hash, 1), &key)
        .expect_err("head");
    assert_eq!((failure.kind, failure.seq), (FailureKind::Edited, Some(5)));

    let mut bad = signer().checkpoint(5, chain[4].hash, 1);
    bad.signed_at_ms = 2;
    let failure = start(5)
        .check_checkpoint(&bad, &key)
        .expect_err("signature");
    assert_eq!(failure.kind, FailureKind::BadCheckpoint);

    let failure = ChainVerifier::new(Digest::ZERO, 1)
        .check_checkpoint(&signer().checkpoint(5, chain[4].hash, 1), &key)
        .expect_err("nothing yet");
    assert_eq!(failure.kind, FailureKind::Reordered);
}

#[test]
fn an_unanchored_chain_starts_at_its_first_record() {
    let chain = chain();
    let mut verifier = ChainVerifier::unanchored();
    assert_eq!(verifier.first_prev_hash(), None);
    verifier.push(&chain[99]).expect("any start");
    verifier.push(&chain[100]).expect("then in order");
    assert_eq!(verifier.first_seq(), 100);
    assert_eq!(verifier.first_prev_hash(), Some(chain[98].hash));
    assert!(verifier.push(&chain[100]).is_err());
}
