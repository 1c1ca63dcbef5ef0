use std::collections::HashSet;

use super::*;

/// Every gRPC code tonic knows, OK included.
const CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

/// The kind a refinement refines; `None` for a kind that is its code's
/// own. Exhaustive on purpose: a new kind must say which it is.
fn refines(kind: ErrorKind) -> Option<ErrorKind> {
    match kind {
        ErrorKind::PayloadTooLarge => Some(ErrorKind::ResourceExhausted),
        ErrorKind::Cancelled
        | ErrorKind::Unknown
        | ErrorKind::InvalidArgument
        | ErrorKind::DeadlineExceeded
        | ErrorKind::NotFound
        | ErrorKind::AlreadyExists
        | ErrorKind::PermissionDenied
        | ErrorKind::ResourceExhausted
        | ErrorKind::FailedPrecondition
        | ErrorKind::Aborted
        | ErrorKind::OutOfRange
        | ErrorKind::Unimplemented
        | ErrorKind::Internal
        | ErrorKind::Unavailable
        | ErrorKind::DataLoss
        | ErrorKind::Unauthenticated => None,
    }
}

#[test]
fn all_lists_every_kind_once() {
    let unique: HashSet<_> = ErrorKind::ALL.iter().collect();
    assert_eq!(unique.len(), ErrorKind::ALL.len());
    // Every code but OK has exactly one kind of its own, and ALL holds them
    // and the refinements; `refines` is exhaustive, so a kind missing from
    // ALL is a kind missing from this count.
    let own = ErrorKind::ALL
        .iter()
        .filter(|kind| refines(**kind).is_none())
        .count();
    assert_eq!(own, CODES.len() - 1);
}

#[test]
fn kinds_round_trip_through_their_code() {
    for kind in ErrorKind::ALL {
        let back = ErrorKind::from_code(kind.code());
        match refines(kind) {
            None => assert_eq!(back, kind, "{kind:?}"),
            Some(general) => {
                assert_eq!(back, general, "{kind:?}");
                assert_eq!(general.code(), kind.code(), "{kind:?}");
            }
        }
    }
}

#[test]
fn codes_round_trip_through_their_kind() {
    for code in CODES {
        if code == Code::Ok {
            assert_eq!(ErrorKind::from_code(code), ErrorKind::Unknown);
            continue;
        }
        assert_eq!(ErrorKind::from_code(code).code(), code, "{code:?}");
    }
}

#[test]
fn labels_are_unique_lowercase_snake_case() {
    let mut seen = HashSet::new();
    for label in ErrorKind::ALL.iter().map(|kind| kind.label()).chain(["ok"]) {
        assert!(seen.insert(label), "label {label} is used twice");
        assert!(!label.is_empty() && !label.starts_with('_') && !label.ends_with('_'));
        assert!(!label.contains("__"), "{label}");
        assert!(
            label.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{label}"
        );
    }
    // The label of a code's own kind is its gRPC name, lowercased: what
    // dashboards and alerts built on the gRPC names expect.
    for kind in ErrorKind::ALL {
        if refines(kind).is_none() {
            let expected = format!("{:?}", kind.code())
                .chars()
                .flat_map(|c| {
                    let lower = c.to_ascii_lowercase();
                    (c.is_ascii_uppercase().then_some('_').into_iter()).chain([lower])
                })
                .skip(1)
                .collect::<String>();
            assert_eq!(kind.label(), expected, "{kind:?}");
        }
    }
    assert_eq!(code_label(Code::Ok), "ok");
}

#[test]
fn http_statuses_are_errors_of_the_right_class() {
    for kind in ErrorKind::ALL {
        let status = kind.http_status();
        match kind.fault() {
            // A caller's error is a 4xx.
            Fault::Caller => assert!(status.is_client_error(), "{kind:?} -> {status}"),
            // Out of room is 429 (the caller should slow down); out of time
            // and failures are 5xx.
            Fault::Capacity if kind == ErrorKind::ResourceExhausted => {
                assert_eq!(status, StatusCode::TOO_MANY_REQUESTS)
            }
            Fault::Capacity | Fault::Server => {
                assert!(status.is_server_error(), "{kind:?} -> {status}")
            }
        }
    }
    assert_eq!(http_status(Code::Ok), StatusCode::OK);
}

#[test]
fn the_agreed_mappings() {
    use ErrorKind as K;
    let expected = [
        (K::InvalidArgument, 400),
        (K::FailedPrecondition, 400),
        (K::OutOfRange, 400),
        (K::Unauthenticated, 401),
        (K::PermissionDenied, 403),
        (K::NotFound, 404),
        (K::AlreadyExists, 409),
        (K::Aborted, 409),
        (K::PayloadTooLarge, 413),
        (K::ResourceExhausted, 429),
        (K::Cancelled, 499),
        (K::Internal, 500),
        (K::Unknown, 500),
        (K::DataLoss, 500),
        (K::Unimplemented, 501),
        (K::Unavailable, 503),
        (K::DeadlineExceeded, 504),
    ];
    assert_eq!(expected.len(), ErrorKind::ALL.len());
    for (kind, status) in expected {
        assert_eq!(kind.http_status().as_u16(), status, "{kind:?}");
    }
}

#[test]
fn retry_matches_what_the_services_do() {
    for kind in ErrorKind::ALL {
        let expected = match kind {
            // The router retries these on another replica.
            ErrorKind::Unavailable => Retry::Elsewhere,
            // The async consumer re-runs these after a pause; the router
            // does not retry them.
            ErrorKind::ResourceExhausted => Retry::Later,
            _ => Retry::Never,
        };
        assert_eq!(kind.retry(), expected, "{kind:?}");
    }
}

#[test]
fn faults_decide_canary_errors_and_ejections() {
    // Canary analysis: caller mistakes and callers going away do not count
    // against a version.
    for code in [
        Code::Ok,
        Code::InvalidArgument,
        Code::NotFound,
        Code::FailedPrecondition,
        Code::OutOfRange,
        Code::Unauthenticated,
        Code::PermissionDenied,
        Code::Cancelled,
        Code::AlreadyExists,
        Code::Aborted,
    ] {
        assert!(!is_server_error(code), "{code:?}");
    }
    for code in [
        Code::Internal,
        Code::Unknown,
        Code::DataLoss,
        Code::Unavailable,
        Code::Unimplemented,
        Code::DeadlineExceeded,
        Code::ResourceExhausted,
    ] {
        assert!(is_server_error(code), "{code:?}");
    }
    // Outlier detection: only a failing replica, not load or slowness.
    for code in CODES {
        let expected = matches!(
            code,
            Code::Unavailable
                | Code::Internal
                | Code::Unknown
                | Code::DataLoss
                | Code::Unimplemented
        );
        assert_eq!(is_replica_failure(code), expected, "{code:?}");
    }
}

#[test]
fn statuses_carry_the_kinds_code() {
    let status = ErrorKind::PayloadTooLarge.status("too big");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(status.message(), "too big");
}
