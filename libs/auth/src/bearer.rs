//! The `Authorization: Bearer <token>` header (RFC 6750 section 2.1) and
//! the compact serialization of a JWS (RFC 7515 section 7.1).
//!
//! Pure, allocation-free on success, and never panics: every function
//! here sees bytes straight from the network.

use crate::error::AuthError;

/// The longest token accepted (bytes). Access tokens of real providers are
/// 1-4 KiB; anything larger is refused before it is hashed or decoded.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The three parts of a compact JWS, each non-empty base64url without
/// padding. `signing_input` is `header.payload`, the bytes the signature
/// covers; `token` the whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JwtParts<'a> {
    pub token: &'a str,
    pub header: &'a str,
    pub payload: &'a str,
    pub signature: &'a str,
    pub signing_input: &'a str,
}

/// The bearer token of an `Authorization` header value: scheme `Bearer`
/// (any case), one or more spaces, then a `token68` (`b64token`) of at
/// most [`MAX_TOKEN_LEN`] bytes. `None` (no header) is
/// [`AuthError::missing`]; anything else that does not fit is
/// [`AuthError::malformed`], naming what is wrong (never echoing the
/// token).
pub fn bearer_token(authorization: Option<&str>) -> Result<&str, AuthError> {
    let Some(value) = authorization else {
        return Err(AuthError::missing("no Authorization header"));
    };
    if value.is_empty() {
        return Err(AuthError::malformed("the Authorization header is empty"));
    }
    let (scheme, rest) = match value.find(' ') {
        Some(space) => (&value[..space], &value[space..]),
        None => (value, ""),
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::malformed(
            if is_token_char_str(scheme) && scheme.len() <= 20 {
                format!("the Authorization scheme '{scheme}' is not Bearer")
            } else {
                "the Authorization header does not start with the Bearer scheme".to_owned()
            },
        ));
    }
    let token = rest.trim_start_matches(' ');
    if token.is_empty() {
        return Err(AuthError::malformed(
            "the Authorization header has the Bearer scheme but no token",
        ));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::malformed(format!(
            "the bearer token is {} bytes, more than the {MAX_TOKEN_LEN} allowed",
            token.len()
        )));
    }
    check_token68(token)?;
    Ok(token)
}

/// `token68 = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn check_token68(token: &str) -> Result<(), AuthError> {
    let bytes = token.as_bytes();
    let body_len = bytes.len() - bytes.iter().rev().take_while(|&&b| b == b'=').count();
    if body_len == 0 {
        return Err(AuthError::malformed("the bearer token is only padding"));
    }
    for (at, &byte) in bytes.iter().enumerate() {
        let ok = if at < body_len {
            byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        } else {
            byte == b'='
        };
        if !ok {
            return Err(AuthError::malformed(format!(
                "the bearer token has a character not allowed in a token68 at byte {at}{}",
                if byte == b' ' || byte == b'\t' {
                    " (whitespace)"
                } else {
                    ""
                }
            )));
        }
    }
    Ok(())
}

fn is_token_char_str(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The three parts of a JWT in compact serialization: exactly two dots,
/// each part non-empty base64url (`A-Z a-z 0-9 - _`, no padding).
pub fn jwt_parts(token: &str) -> Result<JwtParts<'_>, AuthError> {
    let Some((header, rest)) = token.split_once('.') else {
        return Err(AuthError::malformed(
            "the bearer token is not a JWT: it has 1 part, not 3 separated by '.'",
        ));
    };
    let Some((payload, signature)) = rest.split_once('.') else {
        return Err(AuthError::malformed(
            "the bearer token is not a JWT: it has 2 parts, not 3 separated by '.'",
        ));
    };
    if signature.contains('.') {
        let parts = 3 + signature.bytes().filter(|&b| b == b'.').count();
        return Err(AuthError::malformed(format!(
            "the bearer token is not a JWT: it has {parts} parts, not 3 separated by '.' \
             (encrypted tokens are not accepted)"
        )));
    }
    for (name, part) in [
        ("header", header),
        ("payload", payload),
        ("signature", signature),
    ] {
        if part.is_empty() {
            return Err(AuthError::malformed(format!(
                "the bearer token's JWT {name} is empty"
            )));
        }
        if let Some(at) = part
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return Err(AuthError::malformed(format!(
                "the bearer token's JWT {name} is not base64url (a character not allowed at byte {at} of it)"
            )));
        }
        // Lengths of 1 mod 4 decode to no whole byte: never canonical.
        if part.len() % 4 == 1 {
            return Err(AuthError::malformed(format!(
                "the bearer token's JWT {name} is not base64url (impossible length {})",
                part.len()
            )));
        }
    }
    let signing_input = &token[..header.len() + 1 + payload.len()];
    Ok(JwtParts {
        token,
        header,
        payload,
        signature,
        signing_input,
    })
}

/// [`bearer_token`] then [`jwt_parts`].
pub fn parse_authorization(authorization: Option<&str>) -> Result<JwtParts<'_>, AuthError> {
    jwt_parts(bearer_token(authorization)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln";

    fn reason(error: AuthError) -> (String, Option<&'static str>) {
        match error {
            AuthError::Unauthenticated {
                reason,
                bearer_error,
            } => (reason, bearer_error),
            other => panic!("not unauthenticated: {other:?}"),
        }
    }

    fn malformed(header: &str) -> String {
        let (reason, kind) = reason(parse_authorization(Some(header)).unwrap_err());
        assert_eq!(kind, Some("invalid_request"), "{header}: {reason}");
        reason
    }

    #[test]
    fn accepts_bearer_in_any_case_with_one_or_more_spaces() {
        for header in [
            format!("Bearer {JWT}"),
            format!("bearer {JWT}"),
            format!("BEARER   {JWT}"),
            format!("bEaReR {JWT}"),
        ] {
            let parts = parse_authorization(Some(&header)).unwrap();
            assert_eq!(parts.token, JWT);
            assert_eq!(parts.header, "eyJhbGciOiJSUzI1NiJ9");
            assert_eq!(parts.payload, "eyJzdWIiOiJhIn0");
            assert_eq!(parts.signature, "c2ln");
            assert_eq!(parts.signing_input, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0");
        }
    }

    #[test]
    fn no_header_is_missing_not_malformed() {
        let (reason, kind) = reason(bearer_token(None).unwrap_err());
        assert_eq!(kind, None);
        assert!(reason.contains("no Authorization header"));
    }

    #[test]
    fn refuses_other_schemes_and_bad_syntax_naming_the_problem() {
        assert!(malformed("").contains("empty"));
        assert!(malformed("Basic dXNlcjpwYXNz").contains("'Basic' is not Bearer"));
        assert!(malformed("Bearer").contains("no token"));
        assert!(malformed("Bearer    ").contains("no token"));
        assert!(malformed("Bearer\tabc").contains("not start with the Bearer"));
        assert!(malformed("BearerX abc").contains("'BearerX' is not Bearer"));
        assert!(malformed(&format!("Bearer {JWT} ")).contains("whitespace"));
        assert!(malformed(&format!("Bearer {JWT} extra")).contains("token68"));
        assert!(malformed("Bearer a=b.c.d").contains("token68"));
        assert!(malformed("Bearer ====").contains("padding"));
        assert!(malformed("Bearer abc\u{e9}.d.e").contains("token68"));
        // The scheme is echoed only when short and harmless.
        assert!(!malformed("\"<script> x").contains("script"));
    }

    #[test]
    fn refuses_tokens_over_8_kib() {
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
        assert!(malformed(&long).contains("8192"));
        let fits = format!("Bearer a.b.{}", "c".repeat(MAX_TOKEN_LEN - 4));
        assert_eq!(bearer_token(Some(&fits)).unwrap().len(), MAX_TOKEN_LEN);
    }

    #[test]
    fn token68_allows_its_whole_alphabet_but_a_jwt_needs_base64url() {
        assert_eq!(
            bearer_token(Some("Bearer a+b/c~d.e==")).unwrap(),
            "a+b/c~d.e=="
        );
        assert!(malformed("Bearer a+b.c.d").contains("header is not base64url"));
        assert!(malformed("Bearer ab.c/d.e").contains("payload is not base64url"));
        assert!(malformed("Bearer ab.cd.ef==").contains("signature is not base64url"));
    }

    #[test]
    fn a_jwt_has_exactly_three_non_empty_parts() {
        assert!(malformed("Bearer abc").contains("1 part"));
        assert!(malformed("Bearer ab.cd").contains("2 parts"));
        assert!(malformed("Bearer ab.cd.ef.gh.ij").contains("5 parts"));
        assert!(malformed("Bearer .cd.ef").contains("header is empty"));
        assert!(malformed("Bearer ab..ef").contains("payload is empty"));
        assert!(malformed("Bearer ab.cd.").contains("signature is empty"));
        assert!(malformed("Bearer abcde.cd.ef").contains("impossible length"));
    }

    #[test]
    fn never_panics_on_odd_input() {
        for header in [
            "Bearer .",
            "Bearer ..",
            "Bearer ...",
            "Bearer =",
            "Bearer a=",
            " Bearer x",
            "Bearer \u{0}",
            "\u{1F600} x",
            "Bearer \u{1F600}.\u{1F600}.\u{1F600}",
        ] {
            assert!(parse_authorization(Some(header)).is_err(), "{header}");
        }
    }
}
