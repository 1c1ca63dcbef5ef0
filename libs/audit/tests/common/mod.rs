//! A fixed export used by several tests: records 1..=230 chained, a
//! checkpoint every 25 records, records 104..=118 removed (a tombstone,
//! with a checkpoint of record 103 before it and one of the tombstone's end
//! after it), exported by time range from record 11 to 230, then sealed.

#![allow(dead_code)]

use shamal_audit::export::{Line, write_line};
use shamal_audit::{Digest, Event, Record, Signer};

pub const FIRST: u64 = 11;
pub const LAST: u64 = 230;
pub const REMOVED: std::ops::RangeInclusive<u64> = 104..=118;

pub fn signer() -> Signer {
    Signer::from_seed(&[7; 32])
}

pub fn other_signer() -> Signer {
    Signer::from_seed(&[9; 32])
}

pub fn recorded_at(seq: u64) -> i64 {
    1_700_000_000_000 + (seq as i64) * 1000
}

pub fn event(seq: u64) -> Event {
    Event {
        event_id: format!("evt-{seq:06}"),
        occurred_at_ms: recorded_at(seq) - 5,
        service: if seq.is_multiple_of(3) {
            "registry"
        } else {
            "router"
        }
        .to_owned(),
        instance: "host-a".to_owned(),
        action: if seq.is_multiple_of(3) {
            "model.update"
        } else {
            "inference"
        }
        .to_owned(),
        outcome: "ok".to_owned(),
        actor: format!("user-{}", seq % 7),
        client_id: "cli".to_owned(),
        tenant: format!("tenant-{}", seq % 4),
        model: "resnet".to_owned(),
        version: "3".to_owned(),
        region: "eu-west".to_owned(),
        worker: "gpu-1".to_owned(),
        request_id: format!("req-{seq}"),
        latency_us: seq * 17,
        request_sha256: Digest::of(format!("req{seq}").as_bytes()).to_hex(),
        response_sha256: Digest::of(format!("resp{seq}").as_bytes()).to_hex(),
        before_json: if seq.is_multiple_of(3) {
            format!("{{\"weight\":{seq}}}")
        } else {
            String::new()
        },
        after_json: if seq.is_multiple_of(3) {
            format!("{{\"weight\":{}}}", seq + 1)
        } else {
            String::new()
        },
        reason: String::new(),
    }
}

/// The whole chain, records 1..=LAST (index i holds seq i + 1).
pub fn chain() -> Vec<Record> {
    let mut prev = Digest::ZERO;
    (1..=LAST)
        .map(|seq| {
            let record = Record::append(&prev, seq, recorded_at(seq), event(seq));
            prev = record.hash;
            record
        })
        .collect()
}

/// The export's lines.
pub fn export_lines() -> Vec<Line> {
    let signer = signer();
    let chain = chain();
    let mut lines = Vec::new();
    for record in &chain[(FIRST - 1) as usize..] {
        let seq = record.seq;
        if REMOVED.contains(&seq) {
            if seq == *REMOVED.start() {
                let last = &chain[(*REMOVED.end() - 1) as usize];
                lines.push(Line::Tombstone(signer.tombstone(
                    *REMOVED.start(),
                    *REMOVED.end(),
                    last.hash,
                    recorded_at(LAST) + 1,
                )));
                lines.push(Line::Checkpoint(signer.checkpoint(
                    last.seq,
                    last.hash,
                    recorded_at(LAST) + 2,
                )));
            }
            continue;
        }
        lines.push(Line::Record(record.clone()));
        if seq.is_multiple_of(25) || seq == REMOVED.start() - 1 {
            lines.push(Line::Checkpoint(signer.checkpoint(
                seq,
                record.hash,
                recorded_at(seq) + 1,
            )));
        }
    }
    let records = lines
        .iter()
        .filter(|line| matches!(line, Line::Record(_)))
        .count() as u64;
    lines.push(Line::Seal(signer.seal(
        recorded_at(FIRST),
        recorded_at(LAST) + 1,
        FIRST,
        LAST,
        chain[(FIRST - 2) as usize].hash,
        chain[(LAST - 1) as usize].hash,
        records,
        recorded_at(LAST) + 10,
    )));
    lines
}

pub fn to_text(lines: &[Line]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in lines {
        write_line(&mut out, line).expect("writing to a Vec");
    }
    out
}
