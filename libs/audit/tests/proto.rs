//! Conversions to and from the protobuf types (feature `proto`).
#![cfg(feature = "proto")]

use shamal_audit::export::Line;
use shamal_audit::{Checkpoint, Digest, Event, Record, Seal, Signer, Tombstone};
use shamal_proto::shamal::audit::v1 as pb;

fn record() -> Record {
    let event = Event {
        event_id: "e-1".to_owned(),
        occurred_at_ms: 5,
        service: "router".to_owned(),
        action: "inference".to_owned(),
        latency_us: 9,
        reason: "r".to_owned(),
        ..Event::default()
    };
    Record::append(&Digest::of(b"p"), 7, 8, event)
}

#[test]
fn every_type_round_trips() {
    let signer = Signer::from_seed(&[2; 32]);
    let record = record();
    let proto: pb::AuditRecord = record.clone().into();
    assert_eq!(proto.hash, record.hash.to_hex());
    assert_eq!(proto.event.as_ref().map(|e| e.latency_us), Some(9));
    assert_eq!(Record::try_from(proto).expect("converts"), record);

    let checkpoint = signer.checkpoint(7, record.hash, 10);
    assert_eq!(
        Checkpoint::try_from(pb::Checkpoint::from(checkpoint.clone())).expect("converts"),
        checkpoint
    );
    let tombstone = signer.tombstone(1, 6, record.prev_hash, 11);
    assert_eq!(
        Tombstone::try_from(pb::Tombstone::from(tombstone.clone())).expect("converts"),
        tombstone
    );
    let seal = signer.seal(1, 2, 7, 7, record.prev_hash, record.hash, 1, 12);
    assert_eq!(
        Seal::try_from(pb::ExportSeal::from(seal.clone())).expect("converts"),
        seal
    );

    for line in [
        Line::Record(record),
        Line::Checkpoint(checkpoint),
        Line::Tombstone(tombstone),
        Line::Seal(seal),
    ] {
        assert_eq!(
            Line::try_from(pb::ExportItem::from(line.clone())).expect("converts"),
            line
        );
    }
}

#[test]
fn a_bad_digest_names_its_field() {
    let mut proto: pb::AuditRecord = record().into();
    proto.prev_hash = "XYZ".to_owned();
    assert_eq!(Record::try_from(proto).expect_err("bad").field, "prev_hash");

    let mut proto: pb::AuditRecord = record().into();
    proto.hash = proto.hash.to_uppercase();
    assert_eq!(Record::try_from(proto).expect_err("bad").field, "hash");

    let mut proto: pb::AuditRecord = record().into();
    proto.event = None;
    assert_eq!(Record::try_from(proto).expect_err("bad").field, "event");

    let signer = Signer::from_seed(&[2; 32]);
    let mut proto: pb::Checkpoint = signer.checkpoint(1, Digest::ZERO, 1).into();
    proto.head_hash.clear();
    let error = Checkpoint::try_from(proto).expect_err("bad");
    assert_eq!(error.field, "head_hash");
    assert!(error.to_string().starts_with("head_hash: "), "{error}");

    let mut proto: pb::Tombstone = signer.tombstone(1, 1, Digest::ZERO, 1).into();
    proto.last_hash = "0".repeat(63);
    assert_eq!(
        Tombstone::try_from(proto).expect_err("bad").field,
        "last_hash"
    );

    let mut proto: pb::ExportSeal = signer
        .seal(0, 0, 0, 0, Digest::ZERO, Digest::ZERO, 0, 1)
        .into();
    proto.first_prev_hash = "g".repeat(64);
    assert_eq!(
        Seal::try_from(proto).expect_err("bad").field,
        "first_prev_hash"
    );

    assert_eq!(
        Line::try_from(pb::ExportItem { item: None })
            .expect_err("bad")
            .field,
        "item"
    );
}
