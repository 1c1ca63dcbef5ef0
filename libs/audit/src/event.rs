//! [`Event`]: what a producer reports, and its validation rules.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest `event_id`, in characters.
pub const MAX_EVENT_ID_CHARS: usize = 128;
/// Longest `service` and `action`, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Longest other text field, in characters.
pub const MAX_TEXT_CHARS: usize = 256;
/// Longest `before_json` / `after_json`, in bytes (UTF-8).
pub const MAX_JSON_BYTES: usize = 64 * 1024;

/// One audited event, as a producer reports it (`shamal.audit.v1.AuditEvent`).
/// Empty strings (and 0) mean "not applicable".
///
/// In JSON every field may be omitted (it then reads as `""` / `0`, which
/// hashes the same as writing it); unknown fields are refused.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Event {
    /// Unique per event (a UUID): the idempotency key of Append.
    pub event_id: String,
    /// When the event happened at the producer, Unix milliseconds.
    pub occurred_at_ms: i64,
    /// The producing service: "registry", "router", ...
    pub service: String,
    /// The producer's instance (host name or SPIFFE id).
    pub instance: String,
    /// What happened: "inference", "model.create", ...
    pub action: String,
    /// "ok", or the refusal / failure code.
    pub outcome: String,
    /// Who: the token subject, the service identity or "anonymous".
    pub actor: String,
    /// The OAuth client id of the token, when there is one.
    pub client_id: String,
    /// The tenant.
    pub tenant: String,
    /// The model.
    pub model: String,
    /// The model version.
    pub version: String,
    /// Where the request was processed.
    pub region: String,
    /// The worker that processed it.
    pub worker: String,
    /// The request id.
    pub request_id: String,
    /// Wall time the producer spent, in microseconds.
    pub latency_us: u64,
    /// Lower-case hex SHA-256 of the request payload bytes, or "".
    pub request_sha256: String,
    /// Lower-case hex SHA-256 of the response payload bytes, or "".
    pub response_sha256: String,
    /// Mutations: the object before, as JSON text ("" when absent).
    pub before_json: String,
    /// Mutations: the object after, as JSON text ("" when absent).
    pub after_json: String,
    /// Free text: the reason of a refusal or an automatic rollback.
    pub reason: String,
}

/// An [`Event`] field that breaks the rules of [`Event::validate`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct FieldError {
    /// The field's name, as in the proto and the JSON (`event_id`, ...).
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn field_error(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

fn check_chars(field: &'static str, value: &str, max: usize) -> Result<(), FieldError> {
    let chars = value.chars().count();
    if chars > max {
        return Err(field_error(
            field,
            format!("{chars} characters, at most {max} allowed"),
        ));
    }
    Ok(())
}

fn check_name(field: &'static str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(field_error(field, "must not be empty"));
    }
    check_chars(field, value, MAX_NAME_CHARS)
}

fn check_sha256(field: &'static str, value: &str) -> Result<(), FieldError> {
    if value.is_empty()
        || (value.len() == 64
            && value
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    {
        Ok(())
    } else {
        Err(field_error(
            field,
            "must be empty or 64 lower-case hex characters (a SHA-256)",
        ))
    }
}

fn check_json(field: &'static str, value: &str) -> Result<(), FieldError> {
    if value.len() > MAX_JSON_BYTES {
        return Err(field_error(
            field,
            format!("{} bytes, at most {MAX_JSON_BYTES} allowed", value.len()),
        ));
    }
    if !value.is_empty() {
        serde_json::from_str::<serde::de::IgnoredAny>(value)
            .map_err(|error| field_error(field, format!("not valid JSON: {error}")))?;
    }
    Ok(())
}

impl Event {
    /// Checks the rules every appended event must follow; the first broken
    /// rule names its field:
    ///
    /// - `event_id`: 1 to 128 characters, each one of `A-Z a-z 0-9 . _ : -`;
    /// - `occurred_at_ms`: greater than 0;
    /// - `service`, `action`: not empty, at most 64 characters;
    /// - `request_sha256`, `response_sha256`: empty or 64 lower-case hex;
    /// - `before_json`, `after_json`: at most 64 KiB (65,536 bytes) and, when
    ///   not empty, valid JSON;
    /// - every other text field (`instance`, `outcome`, `actor`, `client_id`,
    ///   `tenant`, `model`, `version`, `region`, `worker`, `request_id`,
    ///   `reason`): at most 256 characters.
    ///
    /// The hash chain does not depend on validation: any event, valid or
    /// not, has a canonical encoding.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.event_id.is_empty() {
            return Err(field_error("event_id", "must not be empty"));
        }
        check_chars("event_id", &self.event_id, MAX_EVENT_ID_CHARS)?;
        if let Some(bad) = self
            .event_id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
        {
            return Err(field_error(
                "event_id",
                format!("{bad:?} is not allowed (only A-Z a-z 0-9 . _ : -)"),
            ));
        }
        if self.occurred_at_ms <= 0 {
            return Err(field_error(
                "occurred_at_ms",
                format!(
                    "must be a positive Unix time in milliseconds, not {}",
                    self.occurred_at_ms
                ),
            ));
        }
        check_name("service", &self.service)?;
        check_chars("instance", &self.instance, MAX_TEXT_CHARS)?;
        check_name("action", &self.action)?;
        for (field, value) in [
            ("outcome", &self.outcome),
            ("actor", &self.actor),
            ("client_id", &self.client_id),
            ("tenant", &self.tenant),
            ("model", &self.model),
            ("version", &self.version),
            ("region", &self.region),
            ("worker", &self.worker),
            ("request_id", &self.request_id),
        ] {
            check_chars(field, value, MAX_TEXT_CHARS)?;
        }
        check_sha256("request_sha256", &self.request_sha256)?;
        check_sha256("response_sha256", &self.response_sha256)?;
        check_json("before_json", &self.before_json)?;
        check_json("after_json", &self.after_json)?;
        check_chars("reason", &self.reason, MAX_TEXT_CHARS)?;
        Ok(())
    }
}
