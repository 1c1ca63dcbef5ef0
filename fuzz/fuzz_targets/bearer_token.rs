//! Untrusted `Authorization` header values -> `shamal_auth::parse_authorization`
//! and `decode_unverified`: they never panic, and what they accept has the
//! shape they promise (a Bearer token68 of at most 8 KiB; three base64url
//! parts whose signing input is `header.payload`; a header with an `alg`).
//!
//! Two modes, by the first byte: the rest as the header value itself, or
//! (to get past base64 into the JSON decoders) three 0xFF-separated chunks
//! that are base64url-encoded into `Bearer <header>.<payload>.<signature>`.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;
use shamal_auth::{Algorithm, MAX_TOKEN_LEN, bearer_token, decode_unverified, parse_authorization};

fn is_base64url(part: &str) -> bool {
    !part.is_empty()
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn check(value: &str) {
    if let Ok(token) = bearer_token(Some(value)) {
        assert!(!token.is_empty() && token.len() <= MAX_TOKEN_LEN);
        assert!(value.ends_with(token));
        assert!(value[..6].eq_ignore_ascii_case("bearer"));
    }
    match parse_authorization(Some(value)) {
        Ok(parts) => {
            assert!(value.ends_with(parts.token));
            assert_eq!(
                format!("{}.{}.{}", parts.header, parts.payload, parts.signature),
                parts.token
            );
            assert_eq!(
                parts.signing_input,
                format!("{}.{}", parts.header, parts.payload)
            );
            assert!(is_base64url(parts.header));
            assert!(is_base64url(parts.payload));
            assert!(is_base64url(parts.signature));
            if let Ok((header, claims)) = decode_unverified(parts.token) {
                let _ = Algorithm::from_name(&header.alg);
                for name in ["iss", "sub", "aud", "client_id", "tenant", "realm_access.roles"] {
                    let _ = claims.get(name);
                    let _ = claims.string(name);
                }
                for name in ["exp", "nbf", "iat"] {
                    if let Ok(Some(date)) = claims.numeric_date(name) {
                        assert!(date.is_finite());
                    }
                }
            }
        }
        Err(error) => {
            // Refusals are 401s whose reason fits a quoted-string.
            assert!(error.www_authenticate("shamal").is_some());
        }
    }
    let _ = decode_unverified(value);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(value) = std::str::from_utf8(rest) {
            check(value);
        }
    } else {
        let mut chunks = rest.splitn(3, |&b| b == 0xFF);
        let header = URL_SAFE_NO_PAD.encode(chunks.next().unwrap_or_default());
        let payload = URL_SAFE_NO_PAD.encode(chunks.next().unwrap_or_default());
        let signature = URL_SAFE_NO_PAD.encode(chunks.next().unwrap_or_default());
        check(&format!("Bearer {header}.{payload}.{signature}"));
    }
});
