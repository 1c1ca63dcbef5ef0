//! Decoding a JWT's header and claims, before anything is verified: the
//! JOSE header (RFC 7515 section 4) and the claims set (RFC 7519), as
//! untrusted JSON. Pure; never panics.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use openidconnect::core::{CoreJsonWebKeyType, CoreJwsSigningAlgorithm};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::bearer::{JwtParts, jwt_parts};
use crate::error::AuthError;

/// The JWS algorithms Shamal can accept (asymmetric only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl Algorithm {
    pub const ALL: [Algorithm; 9] = [
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ];

    /// The `alg` value.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RS256 => "RS256",
            Algorithm::RS384 => "RS384",
            Algorithm::RS512 => "RS512",
            Algorithm::PS256 => "PS256",
            Algorithm::PS384 => "PS384",
            Algorithm::PS512 => "PS512",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::EdDSA => "EdDSA",
        }
    }

    /// The algorithm an `alg` value names (exact, case-sensitive as RFC
    /// 7515 says), or why it can never be accepted.
    pub fn from_name(name: &str) -> Result<Algorithm, String> {
        if let Some(alg) = Algorithm::ALL.into_iter().find(|alg| alg.name() == name) {
            return Ok(alg);
        }
        let shown = printable(name, 20);
        Err(if name.eq_ignore_ascii_case("none") {
            format!("algorithm '{shown}' is not allowed (unsigned tokens are never accepted)")
        } else if name
            .as_bytes()
            .get(..2)
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case(b"HS"))
        {
            format!("algorithm '{shown}' is not allowed (HMAC: a shared secret is never accepted)")
        } else {
            format!("algorithm '{shown}' is not supported")
        })
    }

    /// Like [`Algorithm::from_name`] for a configured name.
    pub fn from_setting(name: &str) -> Result<Algorithm, String> {
        Algorithm::from_name(name).map_err(|reason| {
            format!(
                "{reason}; supported: RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"
            )
        })
    }

    /// The key type a key needs to verify this algorithm.
    pub fn key_type(self) -> CoreJsonWebKeyType {
        match self {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => CoreJsonWebKeyType::RSA,
            Algorithm::ES256 | Algorithm::ES384 => CoreJsonWebKeyType::EllipticCurve,
            Algorithm::EdDSA => CoreJsonWebKeyType::OctetKeyPair,
        }
    }

    /// openidconnect's name for it.
    pub fn jws(self) -> CoreJwsSigningAlgorithm {
        use CoreJwsSigningAlgorithm as J;
        match self {
            Algorithm::RS256 => J::RsaSsaPkcs1V15Sha256,
            Algorithm::RS384 => J::RsaSsaPkcs1V15Sha384,
            Algorithm::RS512 => J::RsaSsaPkcs1V15Sha512,
            Algorithm::PS256 => J::RsaSsaPssSha256,
            Algorithm::PS384 => J::RsaSsaPssSha384,
            Algorithm::PS512 => J::RsaSsaPssSha512,
            Algorithm::ES256 => J::EcdsaP256Sha256,
            Algorithm::ES384 => J::EcdsaP384Sha384,
            Algorithm::EdDSA => J::EdDsa,
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The JOSE header fields validation looks at. Others (`jku`, `x5u`,
/// `jwk`, ...) are ignored: keys come from the provider's JWKS only.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Header {
    pub alg: String,
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub typ: Option<String>,
    /// Extensions the token says must be understood (RFC 7515 section
    /// 4.1.11). Shamal understands none, so any is a refusal.
    #[serde(default)]
    pub crit: Option<Vec<String>>,
}

/// A JWT's claims set: a JSON object, not yet trusted.
#[derive(Clone, Debug, PartialEq)]
pub struct Claims(pub Map<String, Value>);

impl Claims {
    /// A claim by name, or by dotted path into nested objects
    /// (`realm_access.roles`). A claim whose own name is the whole path
    /// (`https://example.com/roles`) wins.
    pub fn get(&self, path: &str) -> Option<&Value> {
        if let Some(value) = self.0.get(path) {
            return Some(value);
        }
        let mut parts = path.split('.');
        let mut value = self.0.get(parts.next()?)?;
        for part in parts {
            value = value.as_object()?.get(part)?;
        }
        Some(value)
    }

    /// A string claim: `Ok(None)` when absent, an error naming it when not
    /// a string.
    pub fn string(&self, name: &str) -> Result<Option<&str>, AuthError> {
        match self.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(value)) => Ok(Some(value)),
            Some(_) => Err(AuthError::invalid_token(format!(
                "claim '{name}' is not a string"
            ))),
        }
    }

    /// A NumericDate claim (seconds since the epoch, possibly fractional):
    /// `Ok(None)` when absent.
    pub fn numeric_date(&self, name: &str) -> Result<Option<f64>, AuthError> {
        match self.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(number)) => match number.as_f64() {
                Some(value) if value.is_finite() => Ok(Some(value)),
                _ => Err(AuthError::invalid_token(format!(
                    "claim '{name}' is not a NumericDate"
                ))),
            },
            Some(_) => Err(AuthError::invalid_token(format!(
                "claim '{name}' is not a NumericDate (a number of seconds)"
            ))),
        }
    }
}

/// A header or claims part, decoded: base64url, then a JSON object.
fn decode_part<T: serde::de::DeserializeOwned>(part: &str, what: &str) -> Result<T, AuthError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| {
        AuthError::invalid_token(format!("the token's {what} is not valid base64url"))
    })?;
    serde_json::from_slice(&bytes).map_err(|error| {
        AuthError::invalid_token(format!(
            "the token's {what} is not a JSON object of the right shape ({})",
            printable(&error.to_string(), 120)
        ))
    })
}

/// The header and claims of a JWT whose parts are already split.
pub fn decode_parts(parts: &JwtParts<'_>) -> Result<(Header, Claims), AuthError> {
    let header: Header = decode_part(parts.header, "header")?;
    let claims: Map<String, Value> = decode_part(parts.payload, "payload")?;
    Ok((header, Claims(claims)))
}

/// The header and claims of a compact JWT, with nothing verified: for
/// validation (which verifies next), diagnostics and fuzzing.
pub fn decode_unverified(token: &str) -> Result<(Header, Claims), AuthError> {
    decode_parts(&jwt_parts(token)?)
}

/// The signature bytes of a JWT.
pub fn decode_signature(parts: &JwtParts<'_>) -> Result<Vec<u8>, AuthError> {
    URL_SAFE_NO_PAD
        .decode(parts.signature)
        .map_err(|_| AuthError::invalid_token("the token's signature is not valid base64url"))
}

/// At most `max` characters of `value`, non-printable ones as `?`: for
/// echoing untrusted values in refusals and logs.
pub(crate) fn printable(value: &str, max: usize) -> String {
    let mut out: String = value
        .chars()
        .take(max)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if value.chars().nth(max).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    fn token(header: &str, payload: &str) -> String {
        format!("{}.{}.c2ln", b64(header), b64(payload))
    }

    #[test]
    fn decodes_header_and_claims() {
        let (header, claims) = decode_unverified(&token(
            r#"{"alg":"RS256","kid":"k1","typ":"at+jwt","x5u":"ignored"}"#,
            r#"{"sub":"a","exp":1.5,"realm_access":{"roles":["admin"]},"https://x.io/roles":"viewer"}"#,
        ))
        .unwrap();
        assert_eq!(header.alg, "RS256");
        assert_eq!(header.kid.as_deref(), Some("k1"));
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        assert_eq!(header.crit, None);
        assert_eq!(claims.string("sub").unwrap(), Some("a"));
        assert_eq!(claims.numeric_date("exp").unwrap(), Some(1.5));
        assert_eq!(claims.numeric_date("nbf").unwrap(), None);
        assert_eq!(
            claims.get("realm_access.roles"),
            Some(&serde_json::json!(["admin"]))
        );
        assert_eq!(
            claims.get("https://x.io/roles"),
            Some(&serde_json::json!("viewer"))
        );
        assert_eq!(claims.get("realm_access.roles.x"), None);
        assert!(claims.string("exp").is_err());
        assert!(claims.numeric_date("sub").is_err());
    }

    #[test]
    fn refuses_bad_base64_and_non_json_as_invalid_tokens() {
        for (token, says) in [
            (token("not json", "{}"), "header is not a JSON"),
            (token("[1,2]", "{}"), "header is not a JSON"),
            (token(r#"{"kid":"k"}"#, "{}"), "header is not a JSON"),
            (token(r#"{"alg":1}"#, "{}"), "header is not a JSON"),
            (
                token(r#"{"alg":"RS256","kid":7}"#, "{}"),
                "header is not a JSON",
            ),
            (token(r#"{"alg":"RS256"}"#, "[]"), "payload is not a JSON"),
            (
                token(r#"{"alg":"RS256"}"#, "\u{0}"),
                "payload is not a JSON",
            ),
            (
                format!("{}.AB.c2ln", b64("{\"alg\":\"RS256\"}")),
                "payload is not valid base64url",
            ),
        ] {
            match decode_unverified(&token).unwrap_err() {
                AuthError::Unauthenticated {
                    reason,
                    bearer_error,
                } => {
                    assert_eq!(bearer_error, Some("invalid_token"));
                    assert!(reason.contains(says), "{token}: {reason}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn algorithm_names_are_exact_and_never_none_or_hmac() {
        for alg in Algorithm::ALL {
            assert_eq!(Algorithm::from_name(alg.name()), Ok(alg));
        }
        assert!(
            Algorithm::from_name("none")
                .unwrap_err()
                .contains("unsigned")
        );
        assert!(
            Algorithm::from_name("NONE")
                .unwrap_err()
                .contains("unsigned")
        );
        assert!(Algorithm::from_name("HS256").unwrap_err().contains("HMAC"));
        assert!(
            Algorithm::from_name("rs256")
                .unwrap_err()
                .contains("not supported")
        );
        assert!(
            Algorithm::from_name("H")
                .unwrap_err()
                .contains("not supported")
        );
        assert!(
            Algorithm::from_name("\u{e9}\u{e9}")
                .unwrap_err()
                .contains("not supported")
        );
        assert!(
            Algorithm::from_name("a\u{e9}")
                .unwrap_err()
                .contains("not supported")
        );
    }

    #[test]
    fn printable_truncates_and_masks() {
        assert_eq!(printable("abc", 5), "abc");
        assert_eq!(printable("abcdef", 3), "abc...");
        assert_eq!(printable("a\nb\u{e9}", 5), "a?b?");
    }
}
