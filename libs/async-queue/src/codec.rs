//! Ids, names in keys, and the binary encoding of stored results.

use bytes::Bytes;

use crate::{JobId, JobResult, Outcome, QueueError, Result, from_ms, to_ms};

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// ULID layout: 48-bit millisecond timestamp then 80 random bits, as 26
/// Crockford base32 characters.
pub(crate) fn new_ulid(ms: u64, random: u128) -> String {
    let value: u128 = (u128::from(ms & 0xFFFF_FFFF_FFFF) << 80) | (random & ((1u128 << 80) - 1));
    (0..26)
        .map(|i| {
            let shift = 5 * (25 - i);
            char::from(CROCKFORD[((value >> shift) & 31) as usize])
        })
        .collect()
}

pub(crate) const MAX_NAME_LEN: usize = 256;

pub(crate) fn validate_name(what: &'static str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(QueueError::invalid(what, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(QueueError::invalid(
            what,
            format!("longer than {MAX_NAME_LEN} bytes"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(QueueError::invalid(what, "contains control characters"));
    }
    Ok(())
}

fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-'
}

/// Percent-escapes every byte outside `[A-Za-z0-9._-]` (so `:` never
/// appears in an escaped name and keys cannot collide).
pub(crate) fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for &b in name.as_bytes() {
        if plain(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 15)]));
        }
    }
    out
}

pub(crate) fn unescape(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if plain(b) {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

const RESULT_VERSION: u8 = 1;

/// `[version][kind][code i32][attempts u32][finished_ms u64]`
/// `[worker len u16][worker][message len u32][message][payload...]`, big endian.
pub(crate) fn encode_result(r: &JobResult) -> Vec<u8> {
    let (kind, code, message, payload): (u8, i32, &str, &[u8]) = match &r.outcome {
        Outcome::Ok(bytes) => (0, 0, "", bytes),
        Outcome::Err { code, message } => (1, *code, message, &[]),
    };
    let worker = truncate(&r.worker_id, usize::from(u16::MAX));
    let message = truncate(message, 1 << 20);
    let mut out = Vec::with_capacity(24 + worker.len() + message.len() + payload.len());
    out.push(RESULT_VERSION);
    out.push(kind);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&r.attempts.to_be_bytes());
    out.extend_from_slice(&to_ms(r.finished_at).to_be_bytes());
    out.extend_from_slice(&(worker.len() as u16).to_be_bytes());
    out.extend_from_slice(worker.as_bytes());
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out.extend_from_slice(payload);
    out
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
}

pub(crate) fn decode_result(id: &JobId, data: &[u8]) -> Result<JobResult> {
    decode_result_inner(id, data)
        .ok_or_else(|| QueueError::Corrupt(format!("result of job {id} cannot be decoded")))
}

fn decode_result_inner(id: &JobId, data: &[u8]) -> Option<JobResult> {
    let mut r = Reader { buf: data };
    let [version, kind] = r.array::<2>()?;
    if version != RESULT_VERSION {
        return None;
    }
    let code = i32::from_be_bytes(r.array()?);
    let attempts = u32::from_be_bytes(r.array()?);
    let finished_ms = u64::from_be_bytes(r.array()?);
    let worker_len = usize::from(u16::from_be_bytes(r.array()?));
    let worker = std::str::from_utf8(r.take(worker_len)?).ok()?.to_owned();
    let message_len = usize::try_from(u32::from_be_bytes(r.array()?)).ok()?;
    let message = std::str::from_utf8(r.take(message_len)?).ok()?.to_owned();
    let outcome = match kind {
        0 => Outcome::Ok(Bytes::copy_from_slice(r.buf)),
        1 if r.buf.is_empty() => Outcome::Err { code, message },
        _ => return None,
    };
    Some(JobResult {
        id: id.clone(),
        outcome,
        worker_id: worker,
        finished_at: from_ms(finished_ms),
        attempts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulid_is_26_crockford_chars_and_sorts_by_time() {
        let a = new_ulid(1_000, u128::MAX);
        let b = new_ulid(1_001, 0);
        assert_eq!(a.len(), 26);
        assert!(a.bytes().all(|c| CROCKFORD.contains(&c)));
        assert!(a < b);
        assert_ne!(new_ulid(5, 1), new_ulid(5, 2));
        assert!(JobId::parse(&a).is_ok());
        let generated: std::collections::HashSet<_> =
            (0..1000).map(|_| JobId::generate()).collect();
        assert_eq!(generated.len(), 1000);
    }

    #[test]
    fn job_ids_from_outside_are_validated() {
        assert!(JobId::parse("").is_err());
        assert!(JobId::parse("a:b").is_err());
        assert!(JobId::parse("a/b").is_err());
        assert!(JobId::parse(&"x".repeat(65)).is_err());
        assert!(JobId::parse("01HZ-abc_9").is_ok());
    }

    #[test]
    fn escaping_round_trips_and_removes_separators() {
        for name in ["resnet50", "a:b", "Ω model/1", "%41", "x y*z"] {
            let e = escape(name);
            assert!(!e.contains(':') && !e.contains(' ') && !e.contains('*'));
            assert_eq!(unescape(&e).as_deref(), Some(name));
        }
        assert_ne!(escape("a:b"), escape("a%3Ab"));
        assert_eq!(unescape("bad%"), None);
        assert_eq!(unescape("bad:"), None);
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("model name", "").is_err());
        assert!(validate_name("model name", &"m".repeat(257)).is_err());
        assert!(validate_name("model name", "a\nb").is_err());
        assert!(validate_name("model name", "bert-base.v2").is_ok());
    }

    #[test]
    fn results_round_trip() {
        let id = JobId::generate();
        for outcome in [
            Outcome::Ok(Bytes::from_static(b"\x00\x01binary")),
            Outcome::Ok(Bytes::new()),
            Outcome::error(4, "deadline exceeded"),
        ] {
            let r = JobResult {
                id: id.clone(),
                outcome,
                worker_id: "worker-7".into(),
                finished_at: from_ms(1_700_000_000_123),
                attempts: 2,
            };
            let data = encode_result(&r);
            assert_eq!(decode_result(&id, &data).ok(), Some(r));
            assert!(decode_result(&id, &data[..data.len().min(10)]).is_err());
        }
        assert!(decode_result(&id, b"").is_err());
        assert!(decode_result(&id, b"\x09\x00").is_err());
    }
}
