//! Refusals: UNAUTHENTICATED (HTTP 401 with `WWW-Authenticate`) when the
//! caller could not be identified, PERMISSION_DENIED (403) naming the
//! permission when it could but may not.

use shamal_error::ErrorKind;

use crate::rbac::Permission;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials, or credentials that do not prove anything: a missing
    /// or malformed `Authorization` header, a token that fails validation,
    /// a certificate naming no Shamal service.
    #[error("unauthenticated: {reason}")]
    Unauthenticated {
        reason: String,
        /// The RFC 6750 `error` attribute: `invalid_request` for a malformed
        /// header, `invalid_token` for a token that failed validation;
        /// `None` when no credentials were sent at all.
        bearer_error: Option<&'static str>,
    },
    /// Identified, but without the permission the call needs.
    #[error("permission denied: {who} lacks permission '{permission}'")]
    Forbidden {
        permission: Permission,
        /// The caller, as the message describes it (`subject 'alice'`).
        who: String,
        /// The caller as audit records name it ([`crate::Principal::actor`]:
        /// the subject, with its client when that differs; the service's
        /// SPIFFE URI; `anonymous`); empty when the refusal came before the
        /// caller was identified (a route without a policy).
        actor: String,
    },
}

impl AuthError {
    /// No credentials at all.
    pub fn missing(reason: impl Into<String>) -> AuthError {
        AuthError::Unauthenticated {
            reason: reason.into(),
            bearer_error: None,
        }
    }

    /// A malformed `Authorization` header.
    pub fn malformed(reason: impl Into<String>) -> AuthError {
        AuthError::Unauthenticated {
            reason: reason.into(),
            bearer_error: Some("invalid_request"),
        }
    }

    /// A token that failed validation.
    pub fn invalid_token(reason: impl Into<String>) -> AuthError {
        AuthError::Unauthenticated {
            reason: reason.into(),
            bearer_error: Some("invalid_token"),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            AuthError::Unauthenticated { .. } => ErrorKind::Unauthenticated,
            AuthError::Forbidden { .. } => ErrorKind::PermissionDenied,
        }
    }

    /// The metric label of the refusal (`unauthenticated`,
    /// `permission_denied`).
    pub fn label(&self) -> &'static str {
        self.kind().label()
    }

    /// The gRPC status of the refusal; an UNAUTHENTICATED one carries its
    /// `WWW-Authenticate` challenge in the metadata, for an HTTP front end
    /// to pass on.
    pub fn to_status(&self) -> tonic::Status {
        let mut status = self.kind().status(self.to_string());
        if let Some(challenge) = self.www_authenticate("shamal")
            && let Ok(value) = challenge.parse()
        {
            status.metadata_mut().insert("www-authenticate", value);
        }
        status
    }

    /// The `WWW-Authenticate` header of a 401 (realm `shamal`), ready to
    /// insert; `None` for a 403.
    pub fn challenge(&self) -> Option<http::HeaderValue> {
        self.www_authenticate("shamal")
            .and_then(|value| http::HeaderValue::try_from(value).ok())
    }

    /// The `WWW-Authenticate` value of a 401 (RFC 6750 section 3); `None`
    /// for a 403.
    pub fn www_authenticate(&self, realm: &str) -> Option<String> {
        match self {
            AuthError::Unauthenticated {
                reason,
                bearer_error,
            } => Some(match bearer_error {
                None => format!("Bearer realm=\"{realm}\""),
                Some(error) => format!(
                    "Bearer realm=\"{realm}\", error=\"{error}\", error_description=\"{}\"",
                    quote_safe(reason)
                ),
            }),
            AuthError::Forbidden { .. } => None,
        }
    }
}

/// A reason fit for a quoted-string: printable ASCII without `"` or `\`.
fn quote_safe(reason: &str) -> String {
    reason
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_401_and_403() {
        let missing = AuthError::missing("no Authorization header");
        assert_eq!(missing.kind().http_status().as_u16(), 401);
        assert_eq!(missing.to_status().code(), tonic::Code::Unauthenticated);
        assert_eq!(
            missing.www_authenticate("shamal").unwrap(),
            "Bearer realm=\"shamal\""
        );
        let invalid = AuthError::invalid_token("token expired \"now\"");
        assert_eq!(
            invalid.www_authenticate("shamal").unwrap(),
            "Bearer realm=\"shamal\", error=\"invalid_token\", error_description=\"token expired ?now?\""
        );
        let forbidden = AuthError::Forbidden {
            permission: Permission::ModelsWrite,
            who: "subject 'bob'".into(),
            actor: "bob".into(),
        };
        assert_eq!(forbidden.kind().http_status().as_u16(), 403);
        assert_eq!(forbidden.to_status().code(), tonic::Code::PermissionDenied);
        assert!(forbidden.www_authenticate("shamal").is_none());
        assert!(forbidden.to_string().contains("models:write"));
    }
}
