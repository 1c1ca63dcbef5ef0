//! Event::validate names the first bad field.

use shamal_audit::{Event, MAX_JSON_BYTES};

fn valid() -> Event {
    Event {
        event_id: "0f3c-11aa:b.c_d".to_owned(),
        occurred_at_ms: 1_700_000_000_000,
        service: "registry".to_owned(),
        action: "model.create".to_owned(),
        outcome: "ok".to_owned(),
        actor: "alice".to_owned(),
        request_sha256: "a".repeat(64),
        before_json: "{\"a\":[1,2]}".to_owned(),
        after_json: "null".to_owned(),
        ..Event::default()
    }
}

fn rejects(field: &str, change: impl FnOnce(&mut Event)) {
    let mut event = valid();
    change(&mut event);
    let error = event.validate().expect_err(field);
    assert_eq!(error.field, field, "{error}");
    assert!(
        error.to_string().starts_with(&format!("{field}: ")),
        "{error}"
    );
}

#[test]
fn a_valid_event_passes() {
    valid().validate().expect("valid");
    let mut event = valid();
    event.request_sha256.clear();
    event.before_json.clear();
    event.event_id = "x".repeat(128);
    event.service = "s".repeat(64);
    event.reason = "é".repeat(256);
    event.after_json = format!("\"{}\"", "a".repeat(MAX_JSON_BYTES - 2));
    event.validate().expect("limits are inclusive");
}

#[test]
fn each_bad_field_is_named() {
    rejects("event_id", |e| e.event_id.clear());
    rejects("event_id", |e| e.event_id = "x".repeat(129));
    rejects("event_id", |e| e.event_id = "has space".to_owned());
    rejects("event_id", |e| e.event_id = "slash/".to_owned());
    rejects("occurred_at_ms", |e| e.occurred_at_ms = 0);
    rejects("occurred_at_ms", |e| e.occurred_at_ms = -5);
    rejects("service", |e| e.service.clear());
    rejects("service", |e| e.service = "s".repeat(65));
    rejects("action", |e| e.action.clear());
    rejects("action", |e| e.action = "a".repeat(65));
    rejects("instance", |e| e.instance = "i".repeat(257));
    rejects("outcome", |e| e.outcome = "o".repeat(257));
    rejects("actor", |e| e.actor = "a".repeat(257));
    rejects("client_id", |e| e.client_id = "c".repeat(257));
    rejects("tenant", |e| e.tenant = "t".repeat(257));
    rejects("model", |e| e.model = "m".repeat(257));
    rejects("version", |e| e.version = "v".repeat(257));
    rejects("region", |e| e.region = "r".repeat(257));
    rejects("worker", |e| e.worker = "w".repeat(257));
    rejects("request_id", |e| e.request_id = "q".repeat(257));
    rejects("reason", |e| e.reason = "é".repeat(257));
    rejects("request_sha256", |e| e.request_sha256 = "A".repeat(64));
    rejects("request_sha256", |e| e.request_sha256 = "a".repeat(63));
    rejects("response_sha256", |e| {
        e.response_sha256 = "not hex".to_owned()
    });
    rejects("before_json", |e| e.before_json = "{".to_owned());
    rejects("before_json", |e| {
        e.before_json = format!("\"{}\"", "a".repeat(MAX_JSON_BYTES))
    });
    rejects("after_json", |e| e.after_json = "{} {}".to_owned());
    rejects("after_json", |e| e.after_json = "nope".to_owned());
}
