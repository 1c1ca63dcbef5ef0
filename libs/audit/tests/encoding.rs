//! The canonical encoding: stable across serde round trips (whatever the
//! JSON member order), unambiguous, and pinned by known answers.

use proptest::prelude::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde_json::Value;
use shamal_audit::export::{Line, parse_line};
use shamal_audit::{Digest, Event, Record, Signer, canonical_bytes, record_hash};

/// The fixed record of the known-answer tests (also in docs/audit-format.md).
fn known_record() -> Record {
    let event = Event {
        event_id: "3f2a9c1e-0b7d-4e8a-9c61-2d5f7e8a9b10".to_owned(),
        occurred_at_ms: 1_700_000_000_000,
        service: "router".to_owned(),
        instance: "router-0".to_owned(),
        action: "inference".to_owned(),
        outcome: "ok".to_owned(),
        actor: "alice".to_owned(),
        client_id: "shamal-cli".to_owned(),
        tenant: "acme".to_owned(),
        model: "resnet50".to_owned(),
        version: "7".to_owned(),
        region: "eu-west-1".to_owned(),
        worker: "gpu-worker-3".to_owned(),
        request_id: "req-42".to_owned(),
        latency_us: 1234,
        request_sha256: Digest::of(b"request").to_hex(),
        response_sha256: Digest::of(b"response").to_hex(),
        before_json: String::new(),
        after_json: "{\"weight\":5}".to_owned(),
        reason: "naïve ✓".to_owned(),
    };
    Record::append(&Digest::of(b"previous"), 42, 1_700_000_000_123, event)
}

#[test]
fn known_answer_record_hash() {
    let record = known_record();
    assert_eq!(
        record.hash.to_hex(),
        "2d3e6b6848d085012504c45fd69f64d85beb2b1d0d2f44e3a4d1c5a9b55a4fc5",
        "the canonical encoding changed: every stored chain would stop verifying"
    );
}

#[test]
fn known_answer_canonical_bytes_of_a_small_event() {
    let event = Event {
        event_id: "e1".to_owned(),
        occurred_at_ms: 2,
        service: "s".to_owned(),
        action: "a".to_owned(),
        latency_us: 3,
        ..Event::default()
    };
    let bytes = canonical_bytes(1, -1, &event);
    assert_eq!(
        hex::encode(&bytes),
        "00000000000000167368616d616c2d61756469742d7265636f72642d76310000000000000001ffffffffffffffff0000000000000002653100000000000000020000000000000001730000000000000000000000000000000161000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000300000000000000000000000000000000000000000000000000000000000000000000000000000000"
    );
    assert_eq!(
        record_hash(&Digest::ZERO, 1, -1, &event).to_hex(),
        "e7bb875be3a4fbb5c0e9c85957adb6ff23076546a5ae3b957f875e88d00dba96"
    );
}

#[test]
fn known_answer_signatures() {
    let signer = Signer::from_seed(&[7; 32]);
    let key = signer.public_key();
    assert_eq!(
        hex::encode(key.to_bytes()),
        "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c"
    );
    assert_eq!(key.key_id(), "fe812c12f3ab4ce6");
    let checkpoint = signer.checkpoint(42, known_record().hash, 1_700_000_001_000);
    assert_eq!(
        hex::encode(&checkpoint.signature),
        "0d18a7eb03c4bf559fc674b95fbf8845276b19916f1d8404dae654134d6cdaac1e8c47a0fb9496568f2f659f666a1b52db0c879a851efe878713cbdf1b24bf0a"
    );
    key.verify_checkpoint(&checkpoint).expect("verifies");
}

#[test]
fn the_encoding_starts_with_its_domain_tag() {
    let bytes = canonical_bytes(1, 1, &Event::default());
    assert_eq!(&bytes[..8], &22u64.to_be_bytes());
    assert_eq!(&bytes[8..30], b"shamal-audit-record-v1");
    assert_eq!(&bytes[30..38], &1u64.to_be_bytes());
}

#[test]
fn a_character_moved_between_adjacent_fields_changes_the_hash() {
    let mut a = known_record().event;
    let mut b = a.clone();
    a.tenant = "acme".to_owned();
    a.model = "x".to_owned();
    b.tenant = "acm".to_owned();
    b.model = "ex".to_owned();
    assert_ne!(canonical_bytes(1, 1, &a), canonical_bytes(1, 1, &b));
    assert_ne!(
        record_hash(&Digest::ZERO, 1, 1, &a),
        record_hash(&Digest::ZERO, 1, 1, &b)
    );
}

/// `value` as JSON text with every object's members in a random order.
fn shuffled_json(value: &Value, rng: &mut rand::rngs::StdRng) -> String {
    match value {
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.shuffle(rng);
            let inner: Vec<String> = members
                .into_iter()
                .map(|(name, value)| {
                    format!(
                        "{}: {}",
                        serde_json::to_string(name).expect("a string"),
                        shuffled_json(value, rng)
                    )
                })
                .collect();
            format!("{{ {} }}", inner.join(" , "))
        }
        other => serde_json::to_string(other).expect("a value"),
    }
}

fn arbitrary_event() -> impl Strategy<Value = Event> {
    (
        prop::collection::vec(any::<String>(), 17),
        any::<i64>(),
        any::<u64>(),
    )
        .prop_map(|(texts, occurred_at_ms, latency_us)| {
            let mut texts = texts.into_iter();
            let mut next = || texts.next().unwrap_or_default();
            Event {
                event_id: next(),
                occurred_at_ms,
                service: next(),
                instance: next(),
                action: next(),
                outcome: next(),
                actor: next(),
                client_id: next(),
                tenant: next(),
                model: next(),
                version: next(),
                region: next(),
                worker: next(),
                request_id: next(),
                latency_us,
                request_sha256: next(),
                response_sha256: next(),
                before_json: next(),
                after_json: next(),
                reason: String::new(),
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_hash_survives_serde_round_trips_in_any_member_order(
        event in arbitrary_event(),
        seq in 1u64..,
        recorded_at_ms in any::<i64>(),
        prev in any::<[u8; 32]>(),
        order in any::<u64>(),
    ) {
        let record = Record::append(&Digest(prev), seq, recorded_at_ms, event);
        let hash = record.hash;
        let bytes = canonical_bytes(record.seq, record.recorded_at_ms, &record.event);

        let mut rng = rand::rngs::StdRng::seed_from_u64(order);
        let value = serde_json::to_value(Line::Record(record.clone())).expect("serialises");
        let text = shuffled_json(&value, &mut rng);
        let Line::Record(back) = parse_line(&text).expect("parses") else {
            panic!("not a record: {text}");
        };
        prop_assert_eq!(&back, &record);
        prop_assert!(back.is_intact());
        prop_assert_eq!(record_hash(&back.prev_hash, back.seq, back.recorded_at_ms, &back.event), hash);
        prop_assert_eq!(canonical_bytes(back.seq, back.recorded_at_ms, &back.event), bytes);

        // Through serde_json::Value and a plain Record too.
        let again: Record = serde_json::from_str(&serde_json::to_string(&back).expect("serialises")).expect("parses");
        prop_assert_eq!(again.hash, hash);
        prop_assert!(again.is_intact());
    }

    #[test]
    fn digests_round_trip_as_lower_case_hex(bytes in any::<[u8; 32]>()) {
        let digest = Digest(bytes);
        let text = digest.to_string();
        prop_assert_eq!(text.len(), 64);
        prop_assert_eq!(text.parse::<Digest>().expect("parses"), digest);
        prop_assert_eq!(serde_json::to_string(&digest).expect("json"), format!("\"{text}\""));
        if text.chars().any(|c| c.is_ascii_alphabetic()) {
            prop_assert!(text.to_uppercase().parse::<Digest>().is_err());
        }
    }
}

#[test]
fn an_omitted_event_member_reads_as_empty_and_hashes_the_same() {
    let mut record = known_record();
    record.event.before_json.clear();
    let record = Record::append(
        &record.prev_hash,
        record.seq,
        record.recorded_at_ms,
        record.event,
    );
    let text = serde_json::to_string(&record).expect("json");
    let without = text.replace("\"before_json\":\"\",", "");
    assert_ne!(text, without);
    let back: Record = serde_json::from_str(&without).expect("parses");
    assert!(back.is_intact());
}

#[test]
fn bad_digests_are_refused() {
    for bad in [
        "",
        "00",
        &"g".repeat(64),
        &"A".repeat(64),
        &"0".repeat(63),
        &"0".repeat(65),
    ] {
        assert!(bad.parse::<Digest>().is_err(), "{bad:?}");
    }
    assert_eq!(Digest::ZERO.to_string(), "0".repeat(64));
    assert_eq!(
        format!("{:?}", Digest::ZERO),
        format!("Digest({})", "0".repeat(64))
    );
}
