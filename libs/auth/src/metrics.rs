//! Counting refusals: every UNAUTHENTICATED and PERMISSION_DENIED answer is
//! logged and counted by API and reason.

use prometheus::{IntCounterVec, Opts, Registry};

use crate::error::AuthError;

#[derive(Clone)]
pub struct AuthMetrics {
    refusals: IntCounterVec,
}

impl AuthMetrics {
    /// Registers `shamal_auth_refusals_total{api, reason}` (reason
    /// `unauthenticated` or `permission_denied`). The counter is one per
    /// process, told apart by `api`: services sharing a metrics registry
    /// (`shamal up`) share it, and registering it twice is not an error.
    pub fn new(registry: &Registry) -> prometheus::Result<AuthMetrics> {
        static REFUSALS: std::sync::OnceLock<prometheus::Result<IntCounterVec>> =
            std::sync::OnceLock::new();
        let refusals = REFUSALS
            .get_or_init(|| {
                IntCounterVec::new(
                    Opts::new(
                        "shamal_auth_refusals_total",
                        "Calls refused by authentication or authorisation, by API and reason",
                    ),
                    &["api", "reason"],
                )
            })
            .as_ref()
            .map_err(|error| prometheus::Error::Msg(error.to_string()))?
            .clone();
        match registry.register(Box::new(refusals.clone())) {
            Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
            Err(error) => return Err(error),
        }
        Ok(AuthMetrics { refusals })
    }

    /// Counts and logs one refusal of a call to `api`'s `method`.
    pub fn refused(&self, api: &str, method: &str, error: &AuthError) {
        self.refusals.with_label_values(&[api, error.label()]).inc();
        log_refusal(api, method, error);
    }

    pub fn refusals(&self, api: &str, reason: &str) -> u64 {
        self.refusals.with_label_values(&[api, reason]).get()
    }
}

/// Logs a refusal (also when no metrics are kept).
pub fn log_refusal(api: &str, method: &str, error: &AuthError) {
    tracing::warn!(api, method, reason = error.label(), error = %error, "call refused");
}
