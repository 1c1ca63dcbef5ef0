//! The one error table of Shamal.
//!
//! Every service answers errors in three vocabularies (a gRPC code, an HTTP
//! status, a metric label) and makes two decisions about them (may it be
//! retried, whose fault is it). They used to be decided by a handful of
//! local `match`es that disagreed; now [`ErrorKind::row`] is the only place
//! that decides, and every service maps its own errors to an [`ErrorKind`]
//! and asks the table.
//!
//! | kind | gRPC code | HTTP | label | retry | fault |
//! |---|---|---|---|---|---|
//! | `Cancelled` | CANCELLED | 499 | `cancelled` | never | caller |
//! | `Unknown` | UNKNOWN | 500 | `unknown` | never | server |
//! | `InvalidArgument` | INVALID_ARGUMENT | 400 | `invalid_argument` | never | caller |
//! | `DeadlineExceeded` | DEADLINE_EXCEEDED | 504 | `deadline_exceeded` | never | capacity |
//! | `NotFound` | NOT_FOUND | 404 | `not_found` | never | caller |
//! | `AlreadyExists` | ALREADY_EXISTS | 409 | `already_exists` | never | caller |
//! | `PermissionDenied` | PERMISSION_DENIED | 403 | `permission_denied` | never | caller |
//! | `ResourceExhausted` | RESOURCE_EXHAUSTED | 429 | `resource_exhausted` | later | capacity |
//! | `PayloadTooLarge` | RESOURCE_EXHAUSTED | 413 | `payload_too_large` | never | caller |
//! | `FailedPrecondition` | FAILED_PRECONDITION | 400 | `failed_precondition` | never | caller |
//! | `Aborted` | ABORTED | 409 | `aborted` | never | caller |
//! | `OutOfRange` | OUT_OF_RANGE | 400 | `out_of_range` | never | caller |
//! | `Unimplemented` | UNIMPLEMENTED | 501 | `unimplemented` | never | server |
//! | `Internal` | INTERNAL | 500 | `internal` | never | server |
//! | `Unavailable` | UNAVAILABLE | 503 | `unavailable` | elsewhere | server |
//! | `DataLoss` | DATA_LOSS | 500 | `data_loss` | never | server |
//! | `Unauthenticated` | UNAUTHENTICATED | 401 | `unauthenticated` | never | caller |
//!
//! (`OK` is not an error; [`code_label`] names it `ok`.)
//!
//! **HTTP statuses.** They follow the canonical mapping of `google.rpc.Code`
//! (the one grpc-gateway and Google's HTTP APIs use), which agrees with
//! Triton's HTTP frontend wherever Triton has the code (invalid argument
//! 400, not found 404, unavailable 503, unsupported 501, internal 500).
//! Where the two differ, Google's is the more specific and is the one taken:
//!
//! - FAILED_PRECONDITION is **400**, not 412 or 422. The request is well
//!   formed but the system's state refuses it (a residency policy leaves no
//!   region, a rollout onto an archived version). 412 is about HTTP
//!   conditional headers (`If-Match`), which these requests do not use, and
//!   422 is WebDAV's "syntactically fine, semantically wrong" for the body
//!   itself; Triton and KServe answer every such refusal with 400, so a v2
//!   client already handles it. The router and the registry both answer 400.
//! - ALREADY_EXISTS and ABORTED are 409 (Triton says 400 for
//!   ALREADY_EXISTS, but the registry's REST clients branch on 409 to
//!   re-read and retry a write).
//! - CANCELLED is 499 (nginx's "client closed request"): the caller went
//!   away, so the status is mostly for logs; Triton's 400 would blame the
//!   request.
//! - `PayloadTooLarge` is RESOURCE_EXHAUSTED in gRPC (as tonic reports an
//!   over-size message) but 413 in HTTP: it is about the request's own size,
//!   not the server's load, so it is neither retried nor 429.
//!
//! **Retry** ([`Retry`]) must match what the services really do: the router
//! retries on another replica only [`Retry::Elsewhere`] (UNAVAILABLE, and
//! transport failures, which are not a kind); the async consumer re-runs a
//! job after a pause on anything but [`Retry::Never`].
//!
//! **Fault** ([`Fault`]) decides what counts against a model version:
//! canary analysis counts every non-[`Fault::Caller`] code as a server-side
//! error; outlier detection ejects a replica only for [`Fault::Server`].

use http::StatusCode;
use tonic::Code;

/// What went wrong, in the terms every service shares.
///
/// One variant per gRPC code except OK, plus refinements (today only
/// [`ErrorKind::PayloadTooLarge`]) where HTTP or the retry decision needs
/// a distinction gRPC does not make. Adding a variant fails to compile until
/// [`ErrorKind::row`] has its row and [`ErrorKind::ALL`] lists it (the
/// crate's tests check the latter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The caller cancelled the call (or went away).
    Cancelled,
    /// An error with no better code (also what a malformed status becomes).
    Unknown,
    /// The request itself is malformed (bad tensor, bad field, bad name).
    InvalidArgument,
    /// The deadline passed before the work was done.
    DeadlineExceeded,
    /// The named model, version, alias or resource does not exist.
    NotFound,
    /// A create named something that already exists.
    AlreadyExists,
    /// The caller is known but not allowed.
    PermissionDenied,
    /// The server is out of room right now (admission limit, full queue).
    ResourceExhausted,
    /// The request's own payload is over a size limit.
    PayloadTooLarge,
    /// Well formed, but the system's state refuses it (residency leaves no
    /// region, a rollout onto an archived version).
    FailedPrecondition,
    /// A concurrent write won (a stale revision): re-read and try again.
    Aborted,
    /// A value past a valid range (a message over the size limit in gRPC).
    OutOfRange,
    /// The method or feature is not implemented by this server.
    Unimplemented,
    /// A bug or a failure of a dependency; details stay in the server log.
    Internal,
    /// The server (or the model version) cannot serve now; another replica,
    /// or the same one later, may.
    Unavailable,
    /// Data was lost or corrupted.
    DataLoss,
    /// The caller did not (validly) say who it is.
    Unauthenticated,
}

/// Whether an error may be retried, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Sending the same request again cannot help (the request is at fault,
    /// the outcome is final, or its time is spent).
    Never,
    /// The server is overloaded: the same request may succeed after a
    /// pause, but retrying at once only adds to the load (the router does
    /// not retry it; the async consumer re-runs the job after a backoff).
    Later,
    /// This replica cannot serve it; another may right now, and this one
    /// later (the router retries it on another replica within its retry
    /// budget).
    Elsewhere,
}

/// Whose fault an error is, for judging a model version or a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The request or the caller: says nothing about the server.
    Caller,
    /// The server ran out of room or time: a server-side error for canary
    /// analysis (a version that is slower or overloaded is worse), but not a
    /// broken replica (ejecting it would only move the load).
    Capacity,
    /// The server failed: counts against the version and the replica.
    Server,
}

/// One row of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub code: Code,
    pub http: StatusCode,
    /// Metric label: stable, lowercase snake_case, unique per kind.
    pub label: &'static str,
    pub retry: Retry,
    pub fault: Fault,
}

/// 499 Client Closed Request (nginx), which `http` has no constant for.
const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => panic!("499 is a valid status code"),
};

impl ErrorKind {
    /// Every kind, in gRPC code order (refinements after their code).
    pub const ALL: [ErrorKind; 17] = [
        ErrorKind::Cancelled,
        ErrorKind::Unknown,
        ErrorKind::InvalidArgument,
        ErrorKind::DeadlineExceeded,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::PermissionDenied,
        ErrorKind::ResourceExhausted,
        ErrorKind::PayloadTooLarge,
        ErrorKind::FailedPrecondition,
        ErrorKind::Aborted,
        ErrorKind::OutOfRange,
        ErrorKind::Unimplemented,
        ErrorKind::Internal,
        ErrorKind::Unavailable,
        ErrorKind::DataLoss,
        ErrorKind::Unauthenticated,
    ];

    /// The table. The module documentation explains the choices.
    #[rustfmt::skip]
    pub const fn row(self) -> Row {
        use ErrorKind as K;
        use Fault::{Caller, Capacity, Server};
        use Retry::{Elsewhere, Later, Never};
        use StatusCode as H;
        const fn row(code: Code, http: StatusCode, label: &'static str, retry: Retry, fault: Fault) -> Row {
            Row { code, http, label, retry, fault }
        }
        match self {
            K::Cancelled =>          row(Code::Cancelled,          CLIENT_CLOSED_REQUEST,    "cancelled",           Never,     Caller),
            K::Unknown =>            row(Code::Unknown,            H::INTERNAL_SERVER_ERROR, "unknown",             Never,     Server),
            K::InvalidArgument =>    row(Code::InvalidArgument,    H::BAD_REQUEST,           "invalid_argument",    Never,     Caller),
            K::DeadlineExceeded =>   row(Code::DeadlineExceeded,   H::GATEWAY_TIMEOUT,       "deadline_exceeded",   Never,     Capacity),
            K::NotFound =>           row(Code::NotFound,           H::NOT_FOUND,             "not_found",           Never,     Caller),
            K::AlreadyExists =>      row(Code::AlreadyExists,      H::CONFLICT,              "already_exists",      Never,     Caller),
            K::PermissionDenied =>   row(Code::PermissionDenied,   H::FORBIDDEN,             "permission_denied",   Never,     Caller),
            K::ResourceExhausted =>  row(Code::ResourceExhausted,  H::TOO_MANY_REQUESTS,     "resource_exhausted",  Later,     Capacity),
            K::PayloadTooLarge =>    row(Code::ResourceExhausted,  H::PAYLOAD_TOO_LARGE,     "payload_too_large",   Never,     Caller),
            K::FailedPrecondition => row(Code::FailedPrecondition, H::BAD_REQUEST,           "failed_precondition", Never,     Caller),
            K::Aborted =>            row(Code::Aborted,            H::CONFLICT,              "aborted",             Never,     Caller),
            K::OutOfRange =>         row(Code::OutOfRange,         H::BAD_REQUEST,           "out_of_range",        Never,     Caller),
            K::Unimplemented =>      row(Code::Unimplemented,      H::NOT_IMPLEMENTED,       "unimplemented",       Never,     Server),
            K::Internal =>           row(Code::Internal,           H::INTERNAL_SERVER_ERROR, "internal",            Never,     Server),
            K::Unavailable =>        row(Code::Unavailable,        H::SERVICE_UNAVAILABLE,   "unavailable",         Elsewhere, Server),
            K::DataLoss =>           row(Code::DataLoss,           H::INTERNAL_SERVER_ERROR, "data_loss",           Never,     Server),
            K::Unauthenticated =>    row(Code::Unauthenticated,    H::UNAUTHORIZED,          "unauthenticated",     Never,     Caller),
        }
    }

    /// The kind a gRPC code stands for. Refinements are never returned
    /// (RESOURCE_EXHAUSTED is [`ErrorKind::ResourceExhausted`]); OK is not an
    /// error, and a failed call carrying it is malformed, so it is
    /// [`ErrorKind::Unknown`].
    pub const fn from_code(code: Code) -> ErrorKind {
        match code {
            Code::Ok | Code::Unknown => ErrorKind::Unknown,
            Code::Cancelled => ErrorKind::Cancelled,
            Code::InvalidArgument => ErrorKind::InvalidArgument,
            Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists => ErrorKind::AlreadyExists,
            Code::PermissionDenied => ErrorKind::PermissionDenied,
            Code::ResourceExhausted => ErrorKind::ResourceExhausted,
            Code::FailedPrecondition => ErrorKind::FailedPrecondition,
            Code::Aborted => ErrorKind::Aborted,
            Code::OutOfRange => ErrorKind::OutOfRange,
            Code::Unimplemented => ErrorKind::Unimplemented,
            Code::Internal => ErrorKind::Internal,
            Code::Unavailable => ErrorKind::Unavailable,
            Code::DataLoss => ErrorKind::DataLoss,
            Code::Unauthenticated => ErrorKind::Unauthenticated,
        }
    }

    pub const fn code(self) -> Code {
        self.row().code
    }

    pub const fn http_status(self) -> StatusCode {
        self.row().http
    }

    /// Metric label (lowercase snake_case, unique per kind).
    pub const fn label(self) -> &'static str {
        self.row().label
    }

    pub const fn retry(self) -> Retry {
        self.row().retry
    }

    pub const fn fault(self) -> Fault {
        self.row().fault
    }

    /// A gRPC status of this kind.
    pub fn status(self, message: impl Into<String>) -> tonic::Status {
        tonic::Status::new(self.code(), message)
    }
}

/// Metric label of a final gRPC code, OK included (`ok`).
pub const fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        code => ErrorKind::from_code(code).label(),
    }
}

/// Whether a final code counts as a server-side error of the version that
/// answered (canary analysis): anything but OK and [`Fault::Caller`].
pub const fn is_server_error(code: Code) -> bool {
    !matches!(code, Code::Ok) && !matches!(ErrorKind::from_code(code).fault(), Fault::Caller)
}

/// Whether a replica's answer says the replica, not the request or the
/// load, failed (outlier detection): [`Fault::Server`] only.
pub const fn is_replica_failure(code: Code) -> bool {
    !matches!(code, Code::Ok) && matches!(ErrorKind::from_code(code).fault(), Fault::Server)
}

/// HTTP status for a gRPC status's code (a proxy that only has the code).
pub const fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        code => ErrorKind::from_code(code).http_status(),
    }
}

#[cfg(test)]
mod tests;
