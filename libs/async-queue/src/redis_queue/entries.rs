//! Reading what the queue stored: stream entries back into jobs, and the
//! `{model}:{region}` members of the streams set.

use bytes::Bytes;
use redis::streams::StreamId;

use crate::codec::{escape, unescape};
use crate::{Job, JobId, StreamKey, from_ms};

fn field_bytes(entry: &StreamId, name: &str) -> Option<Vec<u8>> {
    entry
        .map
        .get(name)
        .and_then(|v| redis::from_redis_value_ref::<Vec<u8>>(v).ok())
}

fn field_u64(entry: &StreamId, name: &str) -> Option<u64> {
    field_bytes(entry, name)
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
}

/// A stream entry that could not be turned into a job.
pub(super) struct BadEntry {
    pub entry_id: String,
    pub id: Option<JobId>,
    pub reason: String,
}

pub(super) fn parse_entry(
    stream: &StreamKey,
    entry: &StreamId,
) -> std::result::Result<Job, BadEntry> {
    let id = field_bytes(entry, "id")
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| JobId::parse(&s).ok());
    let bad = |reason: &str| BadEntry {
        entry_id: entry.id.clone(),
        id: id.clone(),
        reason: reason.to_owned(),
    };
    let Some(job_id) = id.clone() else {
        return Err(bad("missing or invalid id"));
    };
    let Some(submitted) = field_u64(entry, "submitted") else {
        return Err(bad("missing submission time"));
    };
    let Some(payload) = field_bytes(entry, "payload") else {
        return Err(bad("missing payload"));
    };
    let deadline = match entry.map.get("deadline") {
        None => None,
        Some(_) => Some(field_u64(entry, "deadline").ok_or_else(|| bad("invalid deadline"))?),
    };
    let priority = match entry.map.get("priority") {
        None => None,
        Some(_) => Some(
            field_u64(entry, "priority")
                .and_then(|p| u8::try_from(p).ok())
                .ok_or_else(|| bad("invalid priority"))?,
        ),
    };
    Ok(Job {
        id: job_id,
        stream: stream.clone(),
        payload: Bytes::from(payload),
        submitted_at: from_ms(submitted),
        deadline: deadline.map(from_ms),
        priority,
    })
}

pub(super) fn member(stream: &StreamKey) -> String {
    format!("{}:{}", escape(stream.model()), escape(stream.region()))
}

pub(super) fn parse_member(m: &str) -> Option<StreamKey> {
    let (model, region) = m.split_once(':')?;
    StreamKey::new(unescape(model)?, unescape(region)?).ok()
}
