//! 1,000 random tamperings of a sealed export (200+ records, a checkpoint
//! every 25, a tombstone): every one is detected, and for edits, deletions,
//! reorderings, insertions and rewrites the failure names the first bad
//! line and record.

mod common;

use common::*;
use ed25519_dalek::Signer as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shamal_audit::export::Line;
use shamal_audit::{
    Checkpoint, Digest, Failure, FailureKind, Record, checkpoint_bytes, seal_bytes,
    tombstone_bytes, verify_export,
};

fn verify(lines: &[Line]) -> Result<shamal_audit::Report, Failure> {
    verify_export(&to_text(lines)[..], &signer().public_key())
}

/// The other signer's raw key, to forge signatures that claim our key id.
fn forger() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[9; 32])
}

fn forge_checkpoint(checkpoint: &Checkpoint) -> Vec<u8> {
    forger()
        .sign(&checkpoint_bytes(
            checkpoint.seq,
            &checkpoint.head_hash,
            checkpoint.signed_at_ms,
            &checkpoint.key_id,
        ))
        .to_bytes()
        .to_vec()
}

#[derive(Debug)]
struct Expect {
    /// 1-based line, when well defined.
    line: Option<usize>,
    /// Lines the failure may name, when only bounded.
    lines: Option<(usize, usize)>,
    seq: Option<Option<u64>>,
    kinds: Vec<FailureKind>,
}

impl Expect {
    fn exact(line: usize, seq: u64, kind: FailureKind) -> Expect {
        Expect {
            line: Some(line),
            lines: None,
            seq: Some(Some(seq)),
            kinds: vec![kind],
        }
    }

    fn kinds(kinds: &[FailureKind]) -> Expect {
        Expect {
            line: None,
            lines: None,
            seq: None,
            kinds: kinds.to_vec(),
        }
    }

    fn at(mut self, line: usize) -> Expect {
        self.line = Some(line);
        self
    }
}

fn flip(digest: &mut Digest) {
    digest.0[0] ^= 1;
}

/// Changes field `field` (0..24) of a record; returns its name.
fn edit_record(record: &mut Record, field: usize) -> &'static str {
    let event = &mut record.event;
    match field {
        0 => {
            record.seq += 1;
            "seq"
        }
        1 => {
            record.recorded_at_ms += 1;
            "recorded_at_ms"
        }
        2 => {
            flip(&mut record.prev_hash);
            "prev_hash"
        }
        3 => {
            flip(&mut record.hash);
            "hash"
        }
        4 => {
            event.event_id.push('x');
            "event_id"
        }
        5 => {
            event.occurred_at_ms -= 1;
            "occurred_at_ms"
        }
        6 => {
            event.service.push('x');
            "service"
        }
        7 => {
            event.instance.push('x');
            "instance"
        }
        8 => {
            event.action.push('x');
            "action"
        }
        9 => {
            event.outcome = "permission_denied".to_owned();
            "outcome"
        }
        10 => {
            event.actor.push('x');
            "actor"
        }
        11 => {
            event.client_id.clear();
            "client_id"
        }
        12 => {
            event.tenant.push('x');
            "tenant"
        }
        13 => {
            event.model.push('x');
            "model"
        }
        14 => {
            event.version.push('x');
            "version"
        }
        15 => {
            event.region.push('x');
            "region"
        }
        16 => {
            event.worker.push('x');
            "worker"
        }
        17 => {
            event.request_id.push('x');
            "request_id"
        }
        18 => {
            event.latency_us += 1;
            "latency_us"
        }
        19 => {
            event.request_sha256 = Digest::of(b"other").to_hex();
            "request_sha256"
        }
        20 => {
            event.response_sha256.clear();
            "response_sha256"
        }
        21 => {
            event.before_json = "{\"weight\":0}".to_owned();
            "before_json"
        }
        22 => {
            event.after_json.push(' ');
            "after_json"
        }
        _ => {
            event.reason.push('x');
            "reason"
        }
    }
}

fn record_indices(lines: &[Line]) -> Vec<usize> {
    (0..lines.len())
        .filter(|&i| matches!(lines[i], Line::Record(_)))
        .collect()
}

fn seq_at(lines: &[Line], index: usize) -> u64 {
    match &lines[index] {
        Line::Record(record) => record.seq,
        _ => unreachable!("not a record"),
    }
}

/// One tampering: a description, the tampered file, what must be reported.
fn tamper(rng: &mut StdRng, round: usize, original: &[Line]) -> (String, Vec<u8>, Expect) {
    let mut lines = original.to_vec();
    let records = record_indices(&lines);
    let first_record = records[0];
    match round % 8 {
        // Edit one field of one record (or of a signed line).
        0 | 1 => {
            if round % 16 == 1 {
                let index = rng.random_range(0..lines.len());
                let what;
                let kind = match &mut lines[index] {
                    Line::Record(record) => {
                        flip(&mut record.hash);
                        what = "record hash";
                        FailureKind::Edited
                    }
                    Line::Checkpoint(c) => {
                        what = ["checkpoint seq", "head_hash", "signed_at_ms", "signature"]
                            [rng.random_range(0..4)];
                        match what {
                            "checkpoint seq" => c.seq += 1,
                            "head_hash" => flip(&mut c.head_hash),
                            "signed_at_ms" => c.signed_at_ms += 1,
                            _ => c.signature[10] ^= 4,
                        }
                        FailureKind::BadCheckpoint
                    }
                    Line::Tombstone(t) => {
                        what = "tombstone last_seq";
                        t.last_seq -= 1;
                        FailureKind::BadTombstone
                    }
                    Line::Seal(s) => {
                        what = [
                            "records",
                            "since_ms",
                            "last_hash",
                            "first_prev_hash",
                            "key_id",
                        ][rng.random_range(0..5)];
                        match what {
                            "records" => s.records -= 1,
                            "since_ms" => s.since_ms -= 1,
                            "last_hash" => flip(&mut s.last_hash),
                            "first_prev_hash" => flip(&mut s.first_prev_hash),
                            _ => s.key_id.push('0'),
                        }
                        if what == "key_id" {
                            FailureKind::WrongKey
                        } else {
                            FailureKind::BadSeal
                        }
                    }
                };
                let expect = Expect::kinds(&[kind]).at(index + 1);
                return (
                    format!("edit {what} at line {}", index + 1),
                    to_text(&lines),
                    expect,
                );
            }
            let index = records[rng.random_range(0..records.len())];
            let field = rng.random_range(0..24);
            let Line::Record(record) = &mut lines[index] else {
                unreachable!()
            };
            let seq = record.seq;
            let name = edit_record(record, field);
            // The first record's place is not known before it: its own
            // (edited) seq is named.
            let named = if index == first_record {
                record.seq
            } else {
                seq
            };
            (
                format!("edit {name} of record {seq} (line {})", index + 1),
                to_text(&lines),
                Expect::exact(index + 1, named, FailureKind::Edited),
            )
        }
        // Delete a line that carries information: a record, the tombstone,
        // the checkpoint a tombstone requires, the seal.
        2 => {
            let candidates: Vec<usize> = (0..lines.len())
                .filter(|&i| match &lines[i] {
                    Line::Checkpoint(c) => c.seq == REMOVED.start() - 1,
                    _ => true,
                })
                .collect();
            let index = candidates[rng.random_range(0..candidates.len())];
            let removed = lines.remove(index);
            let expect = match &removed {
                Line::Record(record) => Expect::exact(index + 1, record.seq, FailureKind::Removed),
                Line::Tombstone(t) => Expect::exact(index + 1, t.first_seq, FailureKind::Removed),
                Line::Checkpoint(c) => Expect::exact(index + 1, c.seq, FailureKind::Removed),
                Line::Seal(_) => Expect::kinds(&[FailureKind::Truncated]),
            };
            (
                format!("delete line {} ({removed:?})", index + 1),
                to_text(&lines),
                expect,
            )
        }
        // Swap two lines.
        3 => {
            let (mut p, mut q) = (0, 0);
            while p == q {
                if rng.random_bool(0.6) {
                    p = records[rng.random_range(0..records.len())];
                    q = records[rng.random_range(0..records.len())];
                } else {
                    p = rng.random_range(0..lines.len());
                    q = rng.random_range(0..lines.len());
                }
            }
            let (p, q) = (p.min(q), p.max(q));
            let both_records =
                matches!(lines[p], Line::Record(_)) && matches!(lines[q], Line::Record(_));
            let seq_p = both_records.then(|| seq_at(&lines, p));
            lines.swap(p, q);
            let expect = match seq_p {
                Some(seq) => Expect::exact(p + 1, seq, FailureKind::Reordered),
                None => Expect {
                    line: None,
                    lines: Some((p + 1, q + 1)),
                    seq: None,
                    kinds: vec![],
                },
            };
            (
                format!("swap lines {} and {}", p + 1, q + 1),
                to_text(&lines),
                expect,
            )
        }
        // Insert a forged record with a correctly computed hash.
        4 => {
            let variant = rng.random_range(0..8);
            if variant == 0 {
                // Appended after the last record, chained to it.
                let last = records[records.len() - 1];
                let Line::Record(last_record) = &lines[last] else {
                    unreachable!()
                };
                let forged = Record::append(
                    &last_record.hash,
                    LAST + 1,
                    recorded_at(LAST + 1),
                    event(LAST + 1),
                );
                let at = lines.len() - 1;
                lines.insert(at, Line::Record(forged));
                return (
                    format!("append a forged record {} at line {}", LAST + 1, at + 1),
                    to_text(&lines),
                    Expect::exact(at + 1, LAST + 1, FailureKind::Inserted),
                );
            }
            if variant == 1 {
                // A copy of a record, anywhere.
                let from = records[rng.random_range(0..records.len())];
                let at = rng.random_range(0..lines.len());
                let copy = lines[from].clone();
                lines.insert(at, copy);
                return (
                    format!("copy line {} to line {}", from + 1, at + 1),
                    to_text(&lines),
                    Expect::kinds(&[]),
                );
            }
            // A forged record for the place of a genuine one, right before
            // or right after it.
            let index = records[rng.random_range(0..records.len())];
            let Line::Record(genuine) = &lines[index] else {
                unreachable!()
            };
            let mut changed = genuine.event.clone();
            changed.actor = "mallory".to_owned();
            let forged = Record::append(
                &genuine.prev_hash,
                genuine.seq,
                genuine.recorded_at_ms,
                changed,
            );
            let seq = genuine.seq;
            let at = if rng.random_bool(0.5) {
                index
            } else {
                index + 1
            };
            lines.insert(at, Line::Record(forged));
            (
                format!(
                    "insert a forged record {seq} at line {} (genuine at line {})",
                    at + 1,
                    index + 1
                ),
                to_text(&lines),
                Expect::exact(at + 1, seq, FailureKind::Inserted),
            )
        }
        // Truncate.
        5 => {
            let keep = rng.random_range(0..lines.len());
            let mut text = to_text(&lines[..keep]);
            if rng.random_bool(0.3) {
                let next = to_text(&lines[keep..=keep]);
                let cut = rng.random_range(1..next.len() - 1);
                text.extend_from_slice(&next[..cut]);
                return (
                    format!("truncate inside line {}", keep + 1),
                    text,
                    Expect::kinds(&[FailureKind::Malformed, FailureKind::Truncated]),
                );
            }
            (
                format!("keep the first {keep} lines"),
                text,
                Expect::kinds(&[FailureKind::Truncated]),
            )
        }
        // Forge a checkpoint, tombstone or seal.
        6 => {
            let signed: Vec<usize> = (0..lines.len())
                .filter(|&i| !matches!(lines[i], Line::Record(_)))
                .collect();
            let index = signed[rng.random_range(0..signed.len())];
            let variant = rng.random_range(0..4);
            let other = other_signer();
            let (what, bad) = match &mut lines[index] {
                Line::Checkpoint(c) => {
                    match variant {
                        // Re-signed by another key, our key id kept.
                        0 => c.signature = forge_checkpoint(c),
                        // Re-signed by another key, honestly.
                        1 => *c = other.checkpoint(c.seq, c.head_hash, c.signed_at_ms),
                        // Another head, signature kept.
                        2 => flip(&mut c.head_hash),
                        // Another head, forged signature.
                        _ => {
                            flip(&mut c.head_hash);
                            c.signature = forge_checkpoint(c);
                        }
                    }
                    ("checkpoint", FailureKind::BadCheckpoint)
                }
                Line::Tombstone(t) => {
                    if variant % 2 == 0 {
                        t.last_hash = Digest::of(b"forged");
                        t.signature = forger()
                            .sign(&tombstone_bytes(
                                t.first_seq,
                                t.last_seq,
                                &t.last_hash,
                                t.removed_at_ms,
                                &t.key_id,
                            ))
                            .to_bytes()
                            .to_vec();
                    } else {
                        *t = other.tombstone(t.first_seq, t.last_seq, t.last_hash, t.removed_at_ms);
                    }
                    ("tombstone", FailureKind::BadTombstone)
                }
                Line::Seal(s) => {
                    if variant % 2 == 0 {
                        s.records += 1;
                        s.signature = forger()
                            .sign(&seal_bytes(
                                s.since_ms,
                                s.until_ms,
                                s.first_seq,
                                s.last_seq,
                                &s.first_prev_hash,
                                &s.last_hash,
                                s.records,
                                s.signed_at_ms,
                                &s.key_id,
                            ))
                            .to_bytes()
                            .to_vec();
                    } else {
                        *s = other.seal(
                            s.since_ms,
                            s.until_ms,
                            s.first_seq,
                            s.last_seq,
                            s.first_prev_hash,
                            s.last_hash,
                            s.records,
                            s.signed_at_ms,
                        );
                    }
                    ("seal", FailureKind::BadSeal)
                }
                Line::Record(_) => unreachable!(),
            };
            (
                format!("forge the {what} at line {} (variant {variant})", index + 1),
                to_text(&lines),
                Expect::kinds(&[bad, FailureKind::WrongKey]).at(index + 1),
            )
        }
        // Edit a record and recompute its hash (or rewrite its prev_hash).
        _ => {
            let index = records[rng.random_range(0..records.len())];
            let rewrite_prev = rng.random_bool(0.25);
            let Line::Record(record) = &mut lines[index] else {
                unreachable!()
            };
            let seq = record.seq;
            let mut event = record.event.clone();
            let mut prev = record.prev_hash;
            if rewrite_prev {
                flip(&mut prev);
            } else {
                event.outcome = "ok-rewritten".to_owned();
            }
            *record = Record::append(&prev, seq, record.recorded_at_ms, event);
            (
                format!(
                    "rewrite record {seq} (line {}) with a recomputed hash{}",
                    index + 1,
                    if rewrite_prev {
                        ", prev_hash changed"
                    } else {
                        ""
                    }
                ),
                to_text(&lines),
                Expect::exact(index + 1, seq, FailureKind::Edited),
            )
        }
    }
}

#[test]
fn the_untouched_export_verifies() {
    let lines = export_lines();
    let report = verify(&lines).expect("the export verifies");
    assert_eq!(
        report.records,
        (LAST - FIRST + 1) - (REMOVED.end() - REMOVED.start() + 1)
    );
    assert!(report.records >= 200);
    assert_eq!(report.checkpoints, 11);
    assert_eq!(report.tombstones, 1);
    assert_eq!(report.removed, 15);
    assert_eq!((report.first_seq, report.last_seq), (FIRST, LAST));
    assert_eq!(report.first_prev_hash, chain()[(FIRST - 2) as usize].hash);
    assert_eq!(report.last_hash, chain()[(LAST - 1) as usize].hash);
    assert_eq!(report.lines, lines.len());
    assert_eq!(report.key_id, signer().key_id());
}

#[test]
fn a_thousand_tamperings_are_all_detected_at_the_first_bad_line() {
    let original = export_lines();
    let key = signer().public_key();
    let mut rng = StdRng::seed_from_u64(0x5eed_a0d1);
    let mut exact = 0;
    for round in 0..1000 {
        let (what, text, expect) = tamper(&mut rng, round, &original);
        let failure = match verify_export(&text[..], &key) {
            Ok(report) => panic!("round {round}: {what}: not detected ({report:?})"),
            Err(failure) => failure,
        };
        let context =
            format!("round {round}: {what}: got {failure} ({failure:?}), expected {expect:?}");
        if !expect.kinds.is_empty() {
            assert!(expect.kinds.contains(&failure.kind), "{context}");
        }
        if let Some(line) = expect.line {
            assert_eq!(failure.line, line, "{context}");
        }
        if let Some((low, high)) = expect.lines {
            assert!((low..=high).contains(&failure.line), "{context}");
        }
        if let Some(seq) = expect.seq {
            assert_eq!(failure.seq, seq, "{context}");
            exact += 1;
        }
        assert!(
            failure
                .to_string()
                .starts_with(&format!("line {}", failure.line)),
            "{context}"
        );
    }
    // Most rounds pin down the exact line and record.
    assert!(exact > 500, "only {exact} exact rounds");
}

#[test]
fn another_key_is_named_a_key_mismatch_at_the_first_signed_line() {
    let lines = export_lines();
    let text = to_text(&lines);
    let failure = verify_export(&text[..], &other_signer().public_key()).expect_err("wrong key");
    assert_eq!(failure.kind, FailureKind::WrongKey);
    let first_signed = lines
        .iter()
        .position(|line| !matches!(line, Line::Record(_)))
        .expect("a checkpoint");
    assert_eq!(failure.line, first_signed + 1);
    assert!(failure.message.contains(&signer().key_id()), "{failure}");
}

#[test]
fn a_checkpoint_signed_for_one_kind_cannot_be_replayed_as_another() {
    // A tombstone whose signature is a checkpoint's over the same numbers.
    let signer = signer();
    let mut lines = export_lines();
    let index = lines
        .iter()
        .position(|line| matches!(line, Line::Tombstone(_)))
        .expect("tombstone");
    let Line::Tombstone(t) = &mut lines[index] else {
        unreachable!()
    };
    t.signature = signer
        .checkpoint(t.last_seq, t.last_hash, t.removed_at_ms)
        .signature;
    let failure = verify(&lines).expect_err("replayed signature");
    assert_eq!(
        (failure.kind, failure.line),
        (FailureKind::BadTombstone, index + 1)
    );
}

#[test]
fn the_display_names_line_record_and_kind() {
    let mut lines = export_lines();
    let Line::Record(record) = &mut lines[46] else {
        panic!("line 47 is a record")
    };
    record.event.actor = "someone-else".to_owned();
    let seq = record.seq;
    let failure = verify(&lines).expect_err("edited");
    assert_eq!(
        failure.to_string(),
        format!("line 47, record {seq}: edited (hash does not match its contents)")
    );
}

#[test]
fn removing_a_plain_checkpoint_loses_no_audited_information() {
    // Documented: the seal signs the records, not the checkpoints, so a
    // checkpoint line (other than the one a tombstone requires) can be
    // dropped; the export still verifies, with one checkpoint fewer.
    let mut lines = export_lines();
    let index = lines
        .iter()
        .position(|line| matches!(line, Line::Checkpoint(c) if c.seq == 50))
        .expect("checkpoint 50");
    lines.remove(index);
    let report = verify(&lines).expect("still verifies");
    assert_eq!(report.checkpoints, 10);
}

#[test]
fn lines_after_the_seal_and_blank_lines_are_refused() {
    let lines = export_lines();
    let mut text = to_text(&lines);
    text.extend_from_slice(b"\n");
    let failure = verify_export(&text[..], &signer().public_key()).expect_err("blank line");
    assert_eq!(
        (failure.kind, failure.line),
        (FailureKind::Malformed, lines.len() + 1)
    );

    let mut text = to_text(&lines[..3]);
    text.extend_from_slice(b"{\"type\":\"record\"}\n");
    let failure = verify_export(&text[..], &signer().public_key()).expect_err("malformed");
    assert_eq!((failure.kind, failure.line), (FailureKind::Malformed, 4));

    let failure = verify_export(&b""[..], &signer().public_key()).expect_err("empty");
    assert_eq!((failure.kind, failure.line), (FailureKind::Truncated, 1));
}

#[test]
fn an_unknown_member_is_refused() {
    let lines = export_lines();
    let text = String::from_utf8(to_text(&lines)).expect("utf-8");
    let tampered = text.replacen("\"actor\":", "\"note\":\"x\",\"actor\":", 1);
    let failure =
        verify_export(tampered.as_bytes(), &signer().public_key()).expect_err("unknown member");
    assert_eq!((failure.kind, failure.line), (FailureKind::Malformed, 1));
}

#[test]
fn an_empty_export_verifies_only_with_an_empty_seal() {
    let signer = signer();
    let seal = signer.seal(5, 6, 0, 0, Digest::ZERO, Digest::ZERO, 0, 7);
    let report = verify(&[Line::Seal(seal)]).expect("empty export");
    assert_eq!(
        (report.records, report.first_seq, report.last_seq),
        (0, 0, 0)
    );
    let seal = signer.seal(5, 6, 3, 4, Digest::ZERO, Digest::ZERO, 2, 7);
    let failure = verify(&[Line::Seal(seal)]).expect_err("records missing");
    assert_eq!(failure.kind, FailureKind::Truncated);
}

#[test]
fn an_export_from_the_start_with_a_leading_tombstone_verifies() {
    // As the audit service exports after retention: tombstone 1..=25, the
    // checkpoint of its end, records 26.., sealed from seq 1 with zeros.
    let signer = signer();
    let chain = chain();
    let mut lines = vec![
        Line::Tombstone(signer.tombstone(1, 25, chain[24].hash, 1)),
        Line::Checkpoint(signer.checkpoint(25, chain[24].hash, 2)),
    ];
    lines.extend(chain[25..40].iter().cloned().map(Line::Record));
    lines.push(Line::Seal(signer.seal(
        0,
        0,
        1,
        40,
        Digest::ZERO,
        chain[39].hash,
        15,
        3,
    )));
    let report = verify(&lines).expect("verifies");
    assert_eq!(
        (report.records, report.removed, report.tombstones),
        (15, 25, 1)
    );
    // Without the tombstone, records 1..=25 are missing.
    let failure = verify(&lines[1..]).expect_err("tombstone removed");
    assert_eq!(failure.kind, FailureKind::Removed);
}
