//! Verification: [`ChainVerifier`] (incremental, for any source of records)
//! and [`verify_export`] (an export file, offline).

use std::collections::VecDeque;
use std::fmt;
use std::io::BufRead;

use crate::export::Line;
use crate::{Checkpoint, Digest, PublicKey, Record, Seal, Tombstone, VerifyError};

/// What is wrong, in a [`Failure`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// A line that is not one JSON object of the export format (or cannot
    /// be read, or is out of place in a way no other kind describes).
    Malformed,
    /// A record's contents were changed: its hash does not match them, or
    /// a hash-consistent rewrite disagrees with what follows it or with a
    /// signed checkpoint or seal.
    Edited,
    /// Records are missing and no tombstone covers them.
    Removed,
    /// Lines are out of order.
    Reordered,
    /// A record that is not part of the chain (a forged or duplicated record,
    /// or records outside the sealed range).
    Inserted,
    /// A checkpoint whose signature does not verify.
    BadCheckpoint,
    /// A tombstone whose signature does not verify, or that is inconsistent.
    BadTombstone,
    /// A seal whose signature does not verify, or that is inconsistent.
    BadSeal,
    /// The file ends early: no seal, or fewer records than the seal says.
    Truncated,
    /// A checkpoint, tombstone or seal signed by another key than the one
    /// verified against (its `key_id` is not that key's).
    WrongKey,
}

impl FailureKind {
    /// The lower-case name used in messages ("edited", "bad checkpoint", ...).
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Malformed => "malformed",
            FailureKind::Edited => "edited",
            FailureKind::Removed => "removed",
            FailureKind::Reordered => "reordered",
            FailureKind::Inserted => "inserted",
            FailureKind::BadCheckpoint => "bad checkpoint",
            FailureKind::BadTombstone => "bad tombstone",
            FailureKind::BadSeal => "bad seal",
            FailureKind::Truncated => "truncated",
            FailureKind::WrongKey => "wrong key",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first thing found wrong. `Display`: `line 12, record 57: edited
/// (hash does not match its contents)`; the `line` part is left out when
/// `line` is 0 (not verifying a file), the `record` part when `seq` is
/// `None`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Failure {
    /// 1-based line of the export file at fault; 0 outside a file.
    pub line: usize,
    /// The sequence number at fault, when there is one: the edited record;
    /// the first missing one (removed); the one whose place is taken
    /// (reordered); the one the inserted record claims; a checkpoint's `seq`
    /// or a tombstone's `first_seq`.
    pub seq: Option<u64>,
    /// What is wrong.
    pub kind: FailureKind,
    /// Details, for people.
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.seq) {
            (0, None) => {}
            (0, Some(seq)) => write!(f, "record {seq}: ")?,
            (line, None) => write!(f, "line {line}: ")?,
            (line, Some(seq)) => write!(f, "line {line}, record {seq}: ")?,
        }
        write!(f, "{} ({})", self.kind, self.message)
    }
}

fn failure(
    line: usize,
    seq: Option<u64>,
    kind: FailureKind,
    message: impl Into<String>,
) -> Failure {
    Failure {
        line,
        seq,
        kind,
        message: message.into(),
    }
}

fn signature_failure(
    line: usize,
    seq: Option<u64>,
    bad: FailureKind,
    error: VerifyError,
) -> Failure {
    let kind = match error {
        VerifyError::WrongKey { .. } => FailureKind::WrongKey,
        VerifyError::BadSignature { .. } => bad,
    };
    failure(line, seq, kind, error.to_string())
}

/// What a successful [`verify_export`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Record lines.
    pub records: u64,
    /// Checkpoint lines (each verified).
    pub checkpoints: u64,
    /// Tombstone lines (each verified).
    pub tombstones: u64,
    /// Sequence numbers covered by tombstones.
    pub removed: u64,
    /// The first sequence number covered (0 when empty).
    pub first_seq: u64,
    /// The last sequence number covered (0 when empty).
    pub last_seq: u64,
    /// The hash the export's chain starts from (the seal's).
    pub first_prev_hash: Digest,
    /// The hash of record `last_seq`.
    pub last_hash: Digest,
    /// The seal's time bounds.
    pub since_ms: i64,
    /// The seal's time bounds.
    pub until_ms: i64,
    /// The seal's `signed_at_ms`.
    pub sealed_at_ms: i64,
    /// The signing key's id.
    pub key_id: String,
    /// Lines read.
    pub lines: usize,
}

/// Verifies a chain incrementally: records (and verified tombstones) in
/// sequence order, and the checkpoints of the chain so far. Used by the
/// audit service's Verify (from its store) and by [`verify_export`].
///
/// Failures it returns have `line` 0.
#[derive(Clone, Debug)]
pub struct ChainVerifier {
    /// Whether the next item must link to `prev` / `next_seq`.
    anchored: bool,
    /// Whether any record or tombstone was accepted.
    started: bool,
    next_seq: u64,
    prev: Digest,
    first_seq: u64,
    first_prev: Option<Digest>,
    last_was_record: bool,
    records: u64,
    tombstones: u64,
    removed: u64,
    checkpoints: u64,
}

impl ChainVerifier {
    /// A chain whose next record is `expected_seq` with `prev_hash`
    /// `expected_prev` (`new(Digest::ZERO, 1)` for a whole log).
    pub fn new(expected_prev: Digest, expected_seq: u64) -> ChainVerifier {
        ChainVerifier {
            anchored: true,
            started: false,
            next_seq: expected_seq,
            prev: expected_prev,
            first_seq: expected_seq,
            first_prev: Some(expected_prev),
            last_was_record: false,
            records: 0,
            tombstones: 0,
            removed: 0,
            checkpoints: 0,
        }
    }

    /// A chain that starts wherever its first record (or tombstone) says:
    /// an export by time range. Its start must be confirmed by other means
    /// (the seal's `first_seq` and `first_prev_hash`: [`Self::first_seq`],
    /// [`Self::first_prev_hash`]).
    pub fn unanchored() -> ChainVerifier {
        ChainVerifier {
            anchored: false,
            ..ChainVerifier::new(Digest::ZERO, 0)
        }
    }

    /// Whether the next item is constrained (anchored, or something was
    /// accepted).
    fn constrained(&self) -> bool {
        self.anchored || self.started
    }

    /// Accepts the next record: it must be intact, numbered
    /// [`Self::next_seq`] and link to [`Self::head`].
    pub fn push(&mut self, record: &Record) -> Result<(), Failure> {
        if !record.is_intact() {
            let seq = if self.constrained() {
                self.next_seq
            } else {
                record.seq
            };
            return Err(failure(
                0,
                Some(seq),
                FailureKind::Edited,
                "hash does not match its contents",
            ));
        }
        if self.constrained() {
            if record.seq > self.next_seq {
                return Err(failure(
                    0,
                    Some(self.next_seq),
                    FailureKind::Removed,
                    format!(
                        "found record {} where record {} belongs; records {}..={} are missing and no tombstone covers them",
                        record.seq,
                        self.next_seq,
                        self.next_seq,
                        record.seq - 1
                    ),
                ));
            }
            if record.seq < self.next_seq {
                return Err(failure(
                    0,
                    Some(record.seq),
                    FailureKind::Reordered,
                    format!(
                        "found record {} where record {} belongs",
                        record.seq, self.next_seq
                    ),
                ));
            }
            if record.prev_hash != self.prev {
                return Err(failure(
                    0,
                    Some(record.seq),
                    FailureKind::Edited,
                    format!(
                        "prev_hash {} is not {}, the hash of what precedes it (this record or the one before was rewritten)",
                        record.prev_hash, self.prev
                    ),
                ));
            }
        }
        if !self.started {
            self.started = true;
            self.first_seq = record.seq;
            self.first_prev = Some(record.prev_hash);
        }
        self.next_seq = record.seq.saturating_add(1);
        self.prev = record.hash;
        self.last_was_record = true;
        self.records += 1;
        Ok(())
    }

    /// Accepts a tombstone for the next records (a removed range): its
    /// signature must verify, it must start at [`Self::next_seq`], and its
    /// `last_hash` becomes the `prev_hash` the next record must have.
    pub fn push_tombstone(
        &mut self,
        tombstone: &Tombstone,
        key: &PublicKey,
    ) -> Result<(), Failure> {
        let seq = Some(tombstone.first_seq);
        key.verify_tombstone(tombstone)
            .map_err(|error| signature_failure(0, seq, FailureKind::BadTombstone, error))?;
        if tombstone.last_seq < tombstone.first_seq {
            return Err(failure(
                0,
                seq,
                FailureKind::BadTombstone,
                format!(
                    "removes {}..={}, an empty range",
                    tombstone.first_seq, tombstone.last_seq
                ),
            ));
        }
        if self.constrained() && tombstone.first_seq != self.next_seq {
            let kind = if tombstone.first_seq > self.next_seq {
                FailureKind::Removed
            } else {
                FailureKind::Reordered
            };
            return Err(failure(
                0,
                Some(self.next_seq),
                kind,
                format!(
                    "found the tombstone of records {}..={} where record {} belongs",
                    tombstone.first_seq, tombstone.last_seq, self.next_seq
                ),
            ));
        }
        if !self.started {
            self.started = true;
            self.first_seq = tombstone.first_seq;
            if !self.anchored {
                self.first_prev = None;
            }
        }
        self.next_seq = tombstone.last_seq.saturating_add(1);
        self.prev = tombstone.last_hash;
        self.last_was_record = false;
        self.tombstones += 1;
        self.removed = self
            .removed
            .saturating_add((tombstone.last_seq - tombstone.first_seq).saturating_add(1));
        Ok(())
    }

    /// Checks a checkpoint of the chain so far: its signature must verify,
    /// its `seq` must be the last one accepted and its `head_hash` that
    /// record's hash (or that tombstone's `last_hash`).
    pub fn check_checkpoint(
        &mut self,
        checkpoint: &Checkpoint,
        key: &PublicKey,
    ) -> Result<(), Failure> {
        let seq = Some(checkpoint.seq);
        key.verify_checkpoint(checkpoint)
            .map_err(|error| signature_failure(0, seq, FailureKind::BadCheckpoint, error))?;
        match self.last_seq() {
            Some(last) if last == checkpoint.seq => {}
            Some(last) => {
                return Err(failure(
                    0,
                    seq,
                    if checkpoint.seq > last {
                        FailureKind::Removed
                    } else {
                        FailureKind::Reordered
                    },
                    format!(
                        "checkpoint of record {} comes after record {last}",
                        checkpoint.seq
                    ),
                ));
            }
            None => {
                return Err(failure(
                    0,
                    seq,
                    FailureKind::Reordered,
                    format!(
                        "checkpoint of record {} precedes every record",
                        checkpoint.seq
                    ),
                ));
            }
        }
        if checkpoint.head_hash != self.prev {
            return Err(failure(
                0,
                seq,
                FailureKind::Edited,
                format!(
                    "the chain's hash at record {} is {}, its signed checkpoint says {} (records up to it were rewritten)",
                    checkpoint.seq, self.prev, checkpoint.head_hash
                ),
            ));
        }
        self.checkpoints += 1;
        Ok(())
    }

    /// The sequence number the next record must have.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The hash the next record's `prev_hash` must be: the last record's
    /// hash or the last tombstone's `last_hash`.
    pub fn head(&self) -> Digest {
        self.prev
    }

    /// The last sequence number accepted (a record's or a tombstone's end).
    pub fn last_seq(&self) -> Option<u64> {
        self.started.then(|| self.next_seq.saturating_sub(1))
    }

    /// The first sequence number accepted (or expected, before any).
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// The hash the chain starts from: the expected prev of an anchored
    /// chain, the first record's `prev_hash` of an unanchored one; `None`
    /// when an unanchored chain starts with a tombstone (or nothing yet).
    pub fn first_prev_hash(&self) -> Option<Digest> {
        if self.started || self.anchored {
            self.first_prev
        } else {
            None
        }
    }

    /// Whether any record or tombstone was accepted.
    pub fn is_started(&self) -> bool {
        self.started
    }

    /// Whether the last item accepted was a record (not a tombstone).
    pub fn last_was_record(&self) -> bool {
        self.last_was_record
    }

    /// Records accepted.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Tombstones accepted.
    pub fn tombstones(&self) -> u64 {
        self.tombstones
    }

    /// Sequence numbers covered by the tombstones accepted.
    pub fn removed(&self) -> u64 {
        self.removed
    }

    /// Checkpoints checked.
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints
    }
}

/// Verifies an export file (JSON Lines, docs/audit-format.md) against the
/// audit service's public key, and names the first line at fault.
pub fn verify_export(reader: impl BufRead, key: &PublicKey) -> Result<Report, Failure> {
    ExportVerifier::new(key).run(LineReader::new(reader))
}

/// Longest line read, in bytes (an event is at most ~128 KiB of text, which
/// JSON escaping may grow at most six-fold).
const MAX_LINE_BYTES: usize = 4 << 20;
/// Records remembered for naming an earlier line at fault.
const HISTORY: usize = 4096;
/// Lines after a failure read to tell its kind (reordered or removed, which
/// of two records is inserted).
const LOOKAHEAD: usize = 1 << 20;

struct LineReader<R> {
    reader: R,
    line: usize,
    buffer: Vec<u8>,
}

enum Next {
    Line(String),
    Bad(String),
    End,
}

impl<R: BufRead> LineReader<R> {
    fn new(reader: R) -> LineReader<R> {
        LineReader {
            reader,
            line: 0,
            buffer: Vec::new(),
        }
    }

    fn next(&mut self) -> Next {
        self.buffer.clear();
        let limit = (MAX_LINE_BYTES + 2) as u64;
        match std::io::Read::take(&mut self.reader, limit).read_until(b'\n', &mut self.buffer) {
            Ok(0) => return Next::End,
            Ok(_) => {}
            Err(error) => {
                self.line += 1;
                return Next::Bad(format!("cannot read it: {error}"));
            }
        }
        self.line += 1;
        if self.buffer.last() == Some(&b'\n') {
            self.buffer.pop();
            if self.buffer.last() == Some(&b'\r') {
                self.buffer.pop();
            }
        } else if self.buffer.len() > MAX_LINE_BYTES {
            return Next::Bad(format!("longer than {MAX_LINE_BYTES} bytes"));
        }
        match String::from_utf8(std::mem::take(&mut self.buffer)) {
            Ok(text) => Next::Line(text),
            Err(_) => Next::Bad("not UTF-8".to_owned()),
        }
    }
}

fn parse(text: &str) -> Result<Line, String> {
    if text.trim().is_empty() {
        return Err("empty line".to_owned());
    }
    crate::export::parse_line(text).map_err(|error| format!("not an export line: {error}"))
}

/// A record accepted into the chain, remembered to name it later.
#[derive(Clone, Copy)]
struct Seen {
    line: usize,
    seq: u64,
    prev: Digest,
    hash: Digest,
}

/// A line after a failure, summed up.
enum Ahead {
    Record {
        seq: u64,
        prev: Digest,
    },
    Checkpoint {
        seq: u64,
        head: Digest,
        authentic: bool,
    },
    Tombstone {
        first_seq: u64,
    },
    Seal {
        seal: Box<Seal>,
        authentic: bool,
    },
    Bad,
}

struct ExportVerifier<'k> {
    key: &'k PublicKey,
    chain: ChainVerifier,
    history: VecDeque<Seen>,
    start_line: usize,
    /// The line of the last record or tombstone accepted.
    last_line: usize,
    /// A verified checkpoint of the last record was seen since it.
    last_checkpointed: bool,
    checkpoints: u64,
    /// Lines after the failure, read once.
    ahead: Option<Vec<Ahead>>,
}

impl<'k> ExportVerifier<'k> {
    fn new(key: &'k PublicKey) -> ExportVerifier<'k> {
        ExportVerifier {
            key,
            chain: ChainVerifier::unanchored(),
            history: VecDeque::new(),
            start_line: 0,
            last_line: 0,
            last_checkpointed: false,
            checkpoints: 0,
            ahead: None,
        }
    }

    fn run<R: BufRead>(mut self, mut lines: LineReader<R>) -> Result<Report, Failure> {
        loop {
            let text = match lines.next() {
                Next::End => {
                    let seq = self.chain.is_started().then(|| self.chain.next_seq());
                    return Err(failure(
                        lines.line + 1,
                        seq,
                        FailureKind::Truncated,
                        if lines.line == 0 {
                            "the file is empty: an export ends with its seal".to_owned()
                        } else {
                            format!("no seal: the file ends after line {}", lines.line)
                        },
                    ));
                }
                Next::Bad(message) => {
                    return Err(failure(lines.line, None, FailureKind::Malformed, message));
                }
                Next::Line(text) => text,
            };
            let n = lines.line;
            let line = parse(&text)
                .map_err(|message| failure(n, None, FailureKind::Malformed, message))?;
            match line {
                Line::Record(record) => self.record(n, &record, &mut lines)?,
                Line::Checkpoint(checkpoint) => self.checkpoint(n, &checkpoint, &mut lines)?,
                Line::Tombstone(tombstone) => self.tombstone(n, &tombstone, &mut lines)?,
                Line::Seal(seal) => return self.seal(n, &seal, &mut lines),
            }
        }
    }

    /// The lines after the current one, summed up (read once).
    fn ahead<R: BufRead>(&mut self, lines: &mut LineReader<R>) -> &[Ahead] {
        let key = self.key;
        self.ahead.get_or_insert_with(|| {
            let mut ahead = Vec::new();
            while ahead.len() < LOOKAHEAD {
                let item = match lines.next() {
                    Next::End => break,
                    Next::Bad(_) => Ahead::Bad,
                    Next::Line(text) => match parse(&text) {
                        Err(_) => Ahead::Bad,
                        Ok(Line::Record(record)) => Ahead::Record {
                            seq: record.seq,
                            prev: record.prev_hash,
                        },
                        Ok(Line::Checkpoint(checkpoint)) => Ahead::Checkpoint {
                            seq: checkpoint.seq,
                            head: checkpoint.head_hash,
                            authentic: key.verify_checkpoint(&checkpoint).is_ok(),
                        },
                        Ok(Line::Tombstone(tombstone)) => Ahead::Tombstone {
                            first_seq: tombstone.first_seq,
                        },
                        Ok(Line::Seal(seal)) => {
                            let authentic = key.verify_seal(&seal).is_ok();
                            Ahead::Seal {
                                seal: Box::new(seal),
                                authentic,
                            }
                        }
                    },
                };
                ahead.push(item);
            }
            ahead
        })
    }

    /// Whether a later line holds a record numbered in `range`, or a
    /// tombstone starting in it.
    fn later_in<R: BufRead>(
        &mut self,
        lines: &mut LineReader<R>,
        range: std::ops::Range<u64>,
    ) -> bool {
        self.ahead(lines).iter().any(|item| match item {
            Ahead::Record { seq, .. } => range.contains(seq),
            Ahead::Tombstone { first_seq, .. } => range.contains(first_seq),
            _ => false,
        })
    }

    /// The sealed first sequence number, when the last line is an authentic seal.
    fn sealed_first_seq<R: BufRead>(&mut self, lines: &mut LineReader<R>) -> Option<u64> {
        match self.ahead(lines).last() {
            Some(Ahead::Seal {
                seal,
                authentic: true,
            }) => Some(seal.first_seq),
            _ => None,
        }
    }

    /// Whether what follows the current line vouches for a record with
    /// this seq and hash: the next record links to it, or the next line is
    /// an authentic checkpoint or seal of it.
    fn vouched<R: BufRead>(&mut self, lines: &mut LineReader<R>, seq: u64, hash: Digest) -> bool {
        match self.ahead(lines).first() {
            Some(Ahead::Record {
                seq: next, prev, ..
            }) => *next == seq.wrapping_add(1) && *prev == hash,
            Some(Ahead::Checkpoint {
                seq: at,
                head,
                authentic,
            }) => *authentic && *at == seq && *head == hash,
            Some(Ahead::Seal { seal, authentic }) => {
                *authentic && seal.last_seq == seq && seal.last_hash == hash
            }
            _ => false,
        }
    }

    fn seen(&self, seq: u64) -> Option<Seen> {
        // Sequence numbers in the history increase: binary search.
        let index = self.history.partition_point(|seen| seen.seq < seq);
        self.history
            .get(index)
            .filter(|seen| seen.seq == seq)
            .copied()
    }

    /// A line that names a sequence number before the export's first one:
    /// the first line was moved.
    fn before_start<R: BufRead>(
        &mut self,
        lines: &mut LineReader<R>,
        n: usize,
        seq: u64,
    ) -> Failure {
        let sealed = self.sealed_first_seq(lines);
        match sealed {
            Some(first) if first == self.chain.first_seq() => failure(
                n,
                Some(seq),
                FailureKind::Inserted,
                format!("names record {seq}, before the export's first record {first}",),
            ),
            _ => failure(
                self.start_line,
                sealed.or(Some(seq)),
                FailureKind::Reordered,
                format!(
                    "the export starts at record {} but line {n} names the earlier record {seq}",
                    self.chain.first_seq()
                ),
            ),
        }
    }

    /// A gap at line `n`: records from `expected` to `found - 1` are
    /// missing here; reordered when one of them comes later.
    fn gap<R: BufRead>(
        &mut self,
        lines: &mut LineReader<R>,
        n: usize,
        expected: u64,
        found: u64,
        what: &str,
    ) -> Failure {
        if self.later_in(lines, expected..found) {
            failure(
                n,
                Some(expected),
                FailureKind::Reordered,
                format!("found {what} where record {expected} belongs, which comes later"),
            )
        } else {
            failure(
                n,
                Some(expected),
                FailureKind::Removed,
                format!(
                    "found {what} where record {expected} belongs: records {expected}..={} are missing and no tombstone covers them",
                    found - 1
                ),
            )
        }
    }

    fn record<R: BufRead>(
        &mut self,
        n: usize,
        record: &Record,
        lines: &mut LineReader<R>,
    ) -> Result<(), Failure> {
        let started = self.chain.is_started();
        let expected = self.chain.next_seq();
        if let Err(mut error) = self.chain.push(record) {
            error.line = n;
            if error.kind == FailureKind::Edited && !record.is_intact() {
                return Err(error);
            }
            return Err(self.misplaced_record(n, record, expected, lines));
        }
        if !started {
            self.start_line = n;
        }
        self.last_line = n;
        self.last_checkpointed = false;
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(Seen {
            line: n,
            seq: record.seq,
            prev: record.prev_hash,
            hash: record.hash,
        });
        Ok(())
    }

    /// An intact record at line `n` that does not follow the chain.
    fn misplaced_record<R: BufRead>(
        &mut self,
        n: usize,
        record: &Record,
        expected: u64,
        lines: &mut LineReader<R>,
    ) -> Failure {
        let seq = record.seq;
        if seq > expected {
            return self.gap(lines, n, expected, seq, &format!("record {seq}"));
        }
        if seq == expected {
            // The link to what precedes is broken. If what follows links to
            // this record, the one before it was rewritten; otherwise this one.
            let before = self
                .seen(seq.wrapping_sub(1))
                .filter(|seen| seen.line == self.last_line);
            if let Some(before) = before
                && self.vouched(lines, seq, record.hash)
            {
                return failure(
                    before.line,
                    Some(before.seq),
                    FailureKind::Edited,
                    format!(
                        "its hash is not the prev_hash of record {seq} (line {n}), which the rest of the chain agrees with: rewritten and rehashed"
                    ),
                );
            }
            return failure(
                n,
                Some(seq),
                FailureKind::Edited,
                format!(
                    "prev_hash {} is not {}, the hash of what precedes it: rewritten and rehashed",
                    record.prev_hash,
                    self.chain.head()
                ),
            );
        }
        // seq < expected: a second record numbered seq.
        if seq < self.chain.first_seq() {
            return self.before_start(lines, n, seq);
        }
        let Some(earlier) = self.seen(seq) else {
            return failure(
                n,
                Some(seq),
                FailureKind::Inserted,
                format!(
                    "record {seq} comes after record {}, where record {expected} belongs",
                    expected - 1
                ),
            );
        };
        if earlier.hash == record.hash {
            return failure(
                n,
                Some(seq),
                FailureKind::Inserted,
                format!("a copy of record {seq} (line {})", earlier.line),
            );
        }
        if earlier.prev == record.prev_hash && self.vouched(lines, seq, record.hash) {
            return failure(
                earlier.line,
                Some(seq),
                FailureKind::Inserted,
                format!(
                    "not part of the chain: record {seq} at line {n} is, which what follows links to"
                ),
            );
        }
        failure(
            n,
            Some(seq),
            FailureKind::Inserted,
            format!(
                "a second record {seq} (the first at line {}), not part of the chain",
                earlier.line
            ),
        )
    }

    fn checkpoint<R: BufRead>(
        &mut self,
        n: usize,
        checkpoint: &Checkpoint,
        lines: &mut LineReader<R>,
    ) -> Result<(), Failure> {
        let seq = checkpoint.seq;
        self.key
            .verify_checkpoint(checkpoint)
            .map_err(|error| signature_failure(n, Some(seq), FailureKind::BadCheckpoint, error))?;
        let Some(last) = self.chain.last_seq() else {
            return Err(if self.later_in(lines, seq..seq.saturating_add(1)) {
                failure(
                    n,
                    Some(seq),
                    FailureKind::Reordered,
                    format!("checkpoint of record {seq} comes before it"),
                )
            } else {
                failure(
                    n,
                    Some(seq),
                    FailureKind::Removed,
                    format!("checkpoint of record {seq}, which is missing"),
                )
            });
        };
        if seq > last {
            return Err(self.gap(
                lines,
                n,
                last + 1,
                seq.saturating_add(1),
                &format!("the checkpoint of record {seq}"),
            ));
        }
        if seq < last {
            if seq < self.chain.first_seq() {
                return Err(self.before_start(lines, n, seq));
            }
            if let Some(covered) = self.seen(seq)
                && covered.hash == checkpoint.head_hash
                && let Some(after) = self.seen(seq + 1)
                && self.ahead(lines).iter().find_map(|item| match item {
                    Ahead::Record { seq, .. } => Some(*seq),
                    _ => None,
                }) == Some(after.seq)
            {
                return Err(failure(
                    after.line,
                    Some(after.seq),
                    FailureKind::Inserted,
                    format!(
                        "not part of the chain: the checkpoint of record {seq} (line {n}) comes after it, and another record {} follows",
                        after.seq
                    ),
                ));
            }
            return Err(failure(
                n,
                Some(seq),
                FailureKind::Reordered,
                format!("checkpoint of record {seq} comes after record {last}"),
            ));
        }
        if let Err(mut error) = self.chain.check_checkpoint(checkpoint, self.key) {
            error.line = if self.chain.last_was_record() {
                self.last_line
            } else {
                n
            };
            return Err(error);
        }
        self.checkpoints += 1;
        self.last_checkpointed = true;
        Ok(())
    }

    fn tombstone<R: BufRead>(
        &mut self,
        n: usize,
        tombstone: &Tombstone,
        lines: &mut LineReader<R>,
    ) -> Result<(), Failure> {
        let first = tombstone.first_seq;
        self.key
            .verify_tombstone(tombstone)
            .map_err(|error| signature_failure(n, Some(first), FailureKind::BadTombstone, error))?;
        if self.chain.is_started() {
            let expected = self.chain.next_seq();
            if first > expected {
                return Err(self.gap(
                    lines,
                    n,
                    expected,
                    first,
                    &format!("the tombstone of records {first}..={}", tombstone.last_seq),
                ));
            }
            if first < expected {
                if first < self.chain.first_seq() {
                    return Err(self.before_start(lines, n, first));
                }
                return Err(failure(
                    n,
                    Some(expected),
                    FailureKind::Reordered,
                    format!(
                        "the tombstone of records {first}..={} comes where record {expected} belongs",
                        tombstone.last_seq
                    ),
                ));
            }
            if self.chain.last_was_record() && !self.last_checkpointed {
                return Err(failure(
                    n,
                    Some(expected - 1),
                    FailureKind::Removed,
                    format!(
                        "a tombstone must follow a checkpoint of the record before it (record {}, line {}), and none does",
                        expected - 1,
                        self.last_line
                    ),
                ));
            }
        }
        let started = self.chain.is_started();
        self.chain
            .push_tombstone(tombstone, self.key)
            .map_err(|mut error| {
                error.line = n;
                error
            })?;
        if !started {
            self.start_line = n;
        }
        self.last_line = n;
        self.last_checkpointed = false;
        Ok(())
    }

    fn seal<R: BufRead>(
        mut self,
        n: usize,
        seal: &Seal,
        lines: &mut LineReader<R>,
    ) -> Result<Report, Failure> {
        self.key
            .verify_seal(seal)
            .map_err(|error| signature_failure(n, None, FailureKind::BadSeal, error))?;
        let consistent = self.seal_matches(n, seal);
        let more = !self.ahead(lines).is_empty();
        if more {
            return Err(match consistent {
                Err(_) => failure(
                    n,
                    self.chain.is_started().then(|| self.chain.next_seq()),
                    FailureKind::Reordered,
                    "the seal is not the last line, and does not match the lines before it",
                ),
                Ok(()) => {
                    let after = n + 1;
                    match self.ahead(lines).first() {
                        Some(Ahead::Record { seq, .. }) => failure(
                            after,
                            Some(*seq),
                            FailureKind::Inserted,
                            "a record after the seal",
                        ),
                        Some(Ahead::Bad) | None => failure(
                            after,
                            None,
                            FailureKind::Malformed,
                            "a line after the seal, which must be the last",
                        ),
                        Some(_) => failure(
                            after,
                            None,
                            FailureKind::Reordered,
                            "a line after the seal, which must be the last",
                        ),
                    }
                }
            });
        }
        consistent?;
        Ok(Report {
            records: self.chain.records(),
            checkpoints: self.checkpoints,
            tombstones: self.chain.tombstones(),
            removed: self.chain.removed(),
            first_seq: seal.first_seq,
            last_seq: seal.last_seq,
            first_prev_hash: seal.first_prev_hash,
            last_hash: seal.last_hash,
            since_ms: seal.since_ms,
            until_ms: seal.until_ms,
            sealed_at_ms: seal.signed_at_ms,
            key_id: seal.key_id.clone(),
            lines: n,
        })
    }

    /// Whether the (authentic) seal at line `n` matches the lines before it.
    fn seal_matches(&self, n: usize, seal: &Seal) -> Result<(), Failure> {
        let chain = &self.chain;
        let Some(last) = chain.last_seq() else {
            if seal.records != 0 || seal.first_seq != 0 || seal.last_seq != 0 {
                return Err(failure(
                    n,
                    None,
                    FailureKind::Truncated,
                    format!(
                        "the seal covers records {}..={} ({} records); the export holds none",
                        seal.first_seq, seal.last_seq, seal.records
                    ),
                ));
            }
            if seal.first_prev_hash != Digest::ZERO || seal.last_hash != Digest::ZERO {
                return Err(failure(
                    n,
                    None,
                    FailureKind::BadSeal,
                    "the seal of an empty export must have zero hashes",
                ));
            }
            return Ok(());
        };
        let first = chain.first_seq();
        if seal.first_seq < first {
            return Err(failure(
                self.start_line,
                Some(seal.first_seq),
                FailureKind::Removed,
                format!(
                    "the seal says the export starts at record {}; it starts at {first}",
                    seal.first_seq
                ),
            ));
        }
        if seal.first_seq > first {
            return Err(failure(
                self.start_line,
                Some(first),
                FailureKind::Inserted,
                format!(
                    "the seal says the export starts at record {}, not {first}",
                    seal.first_seq
                ),
            ));
        }
        if let Some(first_prev) = chain.first_prev_hash()
            && first_prev != seal.first_prev_hash
        {
            return Err(failure(
                self.start_line,
                Some(first),
                FailureKind::Edited,
                format!(
                    "prev_hash {first_prev} is not the sealed first_prev_hash {}: rewritten and rehashed",
                    seal.first_prev_hash
                ),
            ));
        }
        if seal.last_seq > last {
            return Err(failure(
                n,
                Some(last + 1),
                FailureKind::Removed,
                format!(
                    "the seal says the export ends at record {}; it ends at {last}",
                    seal.last_seq
                ),
            ));
        }
        if seal.last_seq < last {
            let extra = self.seen(seal.last_seq + 1);
            return Err(failure(
                extra.map_or(n, |seen| seen.line),
                Some(seal.last_seq + 1),
                FailureKind::Inserted,
                format!(
                    "the seal says the export ends at record {}; it goes on to {last}",
                    seal.last_seq
                ),
            ));
        }
        if seal.last_hash != chain.head() {
            return Err(failure(
                if chain.last_was_record() {
                    self.last_line
                } else {
                    n
                },
                Some(last),
                FailureKind::Edited,
                format!(
                    "the chain ends in {}, the seal says {}: records were rewritten and rehashed",
                    chain.head(),
                    seal.last_hash
                ),
            ));
        }
        if seal.records != chain.records() {
            return Err(failure(
                n,
                None,
                if seal.records > chain.records() {
                    FailureKind::Truncated
                } else {
                    FailureKind::Inserted
                },
                format!(
                    "the seal counts {} records, the export holds {}",
                    seal.records,
                    chain.records()
                ),
            ));
        }
        Ok(())
    }
}
