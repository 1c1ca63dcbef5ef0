//! gRPC plumbing shared by the router and the workers: the `grpc-timeout`
//! deadline header, request ids, message size limits and the mapping of codec
//! errors to statuses; and the serving state (health, readiness, stop) of
//! the control-plane services.

pub mod serving;

use std::time::Duration;

use tonic::Status;
use tonic::metadata::{MetadataMap, MetadataValue};

/// Default gRPC message size limit in both directions. tonic's own 4 MiB
/// default breaks real clients sending images or large batches.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Metadata key that carries the request id across services and into logs.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Parses a `grpc-timeout` header value (`<digits><unit>`, at most 8 digits,
/// unit one of H M S m u n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Formats a duration as a `grpc-timeout` header value, rounding up so the
/// receiver never sees a longer deadline than the sender had.
pub fn format_grpc_timeout(timeout: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let micros = timeout.as_micros() + u128::from(!timeout.subsec_nanos().is_multiple_of(1000));
    if micros <= MAX {
        return format!("{micros}u");
    }
    let millis = micros.div_ceil(1000);
    if millis <= MAX {
        return format!("{millis}m");
    }
    format!("{}S", timeout.as_secs().min(MAX as u64))
}

/// The deadline a caller set on a request, if any.
pub fn request_timeout(metadata: &MetadataMap) -> Option<Duration> {
    metadata
        .get("grpc-timeout")
        .and_then(|value| value.to_str().ok())
        .and_then(parse_grpc_timeout)
}

/// The caller's request id, or a fresh one. Ids are limited to 128 printable
/// ASCII characters so they can be logged safely.
pub fn request_id(metadata: &MetadataMap) -> String {
    checked_request_id(
        metadata
            .get(REQUEST_ID_HEADER)
            .and_then(|value| value.to_str().ok()),
    )
}

/// The given request id when it is sane, or a fresh one.
pub fn checked_request_id(given: Option<&str>) -> String {
    given
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Sets the request id on outgoing (or response) metadata.
pub fn set_request_id(metadata: &mut MetadataMap, id: &str) {
    if let Ok(value) = MetadataValue::try_from(id) {
        metadata.insert(REQUEST_ID_HEADER, value);
    }
}

/// Name of the v2 inference service in grpc.health.v1.
pub const INFERENCE_SERVICE: &str = "inference.GRPCInferenceService";

/// Sets the grpc.health.v1 status of the inference service and of the
/// server as a whole (the empty service name), which load balancers probe.
pub async fn set_health(reporter: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter.set_service_status(INFERENCE_SERVICE, status).await;
}

/// Codec errors are the client's fault: INVALID_ARGUMENT naming the tensor.
pub fn codec_status(error: &shamal_tensor::Error) -> Status {
    Status::invalid_argument(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("40m"), Some(Duration::from_millis(40)));
        assert_eq!(parse_grpc_timeout("500u"), Some(Duration::from_micros(500)));
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "10", "10x", "-1S", "123456789S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn formatted_timeouts_parse_back_without_growing() {
        for timeout in [
            Duration::from_nanos(1),
            Duration::from_micros(250),
            Duration::from_millis(1500),
            Duration::from_secs(200),
            Duration::from_secs(500_000),
        ] {
            let parsed = parse_grpc_timeout(&format_grpc_timeout(timeout)).unwrap();
            assert!(parsed >= timeout, "{timeout:?} -> {parsed:?}");
            assert!(parsed - timeout < Duration::from_secs(1) || timeout.as_secs() > 99_999);
        }
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_generated_otherwise() {
        let mut metadata = MetadataMap::new();
        set_request_id(&mut metadata, "abc-123");
        assert_eq!(request_id(&metadata), "abc-123");
        let mut metadata = MetadataMap::new();
        metadata.insert(REQUEST_ID_HEADER, MetadataValue::from_static("has space"));
        let generated = request_id(&metadata);
        assert_ne!(generated, "has space");
        assert_eq!(generated.len(), 36);
    }
}
