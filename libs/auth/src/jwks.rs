//! The provider's signing keys (its JWKS, as openidconnect parses it) and
//! which of them may verify a token (RFC 8725 section 3.1: the key must be
//! meant for the token's algorithm).

use openidconnect::core::{CoreJsonWebKey, CoreJsonWebKeySet, CoreJsonWebKeyUse};
use openidconnect::{JsonWebKey, JsonWebKeyAlgorithm};

use crate::error::AuthError;
use crate::jwt::{Algorithm, printable};

/// One fetch of the JWKS. Replaced whole (never edited) when refetched.
#[derive(Debug)]
pub struct KeySet {
    pub keys: Vec<CoreJsonWebKey>,
    /// Counts fetches: 0 for the one made at discovery.
    pub generation: u64,
}

/// What a token's `kid` and `alg` find in a key set.
#[derive(Debug)]
pub enum Lookup<'a> {
    Found(&'a CoreJsonWebKey),
    /// No key has the token's `kid`: worth refetching the JWKS.
    UnknownKid,
    /// A token without `kid` and no key usable for its algorithm: worth
    /// refetching too.
    NoUsableKey,
    /// Refused whatever the JWKS: the reason.
    Refused(AuthError),
}

impl KeySet {
    pub fn new(jwks: CoreJsonWebKeySet, generation: u64) -> KeySet {
        KeySet {
            keys: jwks.keys().clone(),
            generation,
        }
    }

    /// The key that may verify a token with header `kid` and `alg`.
    pub fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Lookup<'_> {
        match kid {
            Some(kid) => {
                let mut named = self
                    .keys
                    .iter()
                    .filter(|key| key.key_id().is_some_and(|id| id.as_str() == kid))
                    .peekable();
                let Some(first) = named.peek().copied() else {
                    return Lookup::UnknownKid;
                };
                match named.find(|key| usable(key, alg).is_ok()) {
                    Some(key) => Lookup::Found(key),
                    None => Lookup::Refused(AuthError::invalid_token(format!(
                        "key '{}' cannot verify {alg}: {}",
                        printable(kid, 64),
                        usable(first, alg).err().unwrap_or_default()
                    ))),
                }
            }
            None => {
                let mut candidates = self.keys.iter().filter(|key| usable(key, alg).is_ok());
                match (candidates.next(), candidates.count()) {
                    (Some(key), 0) => Lookup::Found(key),
                    (None, _) => Lookup::NoUsableKey,
                    (Some(_), more) => Lookup::Refused(AuthError::invalid_token(format!(
                        "the token has no key id (kid) and the provider has {} keys for {alg}",
                        more + 1
                    ))),
                }
            }
        }
    }
}

/// Whether `key` may verify `alg`: its type is the algorithm's, its `use`
/// (if any) is `sig`, its `alg` (if any) is the token's.
fn usable(key: &CoreJsonWebKey, alg: Algorithm) -> Result<(), String> {
    if *key.key_type() != alg.key_type() {
        return Err(format!(
            "it is {} key, {alg} needs {} key",
            type_name(key.key_type()),
            type_name(&alg.key_type())
        ));
    }
    match key.key_use() {
        None | Some(CoreJsonWebKeyUse::Signature) => {}
        Some(_) => return Err("it is not a signing key (use is not 'sig')".to_owned()),
    }
    match key.signing_alg() {
        JsonWebKeyAlgorithm::Unspecified => Ok(()),
        JsonWebKeyAlgorithm::Algorithm(key_alg) if *key_alg == alg.jws() => Ok(()),
        JsonWebKeyAlgorithm::Algorithm(key_alg) => Err(format!(
            "it is meant for {}, not {alg}",
            serde_json::to_value(key_alg)
                .ok()
                .and_then(|value| value.as_str().map(str::to_owned))
                .unwrap_or_else(|| "another algorithm".to_owned())
        )),
        JsonWebKeyAlgorithm::Unsupported => Err("its alg is not a signature algorithm".to_owned()),
    }
}

fn type_name(key_type: &openidconnect::core::CoreJsonWebKeyType) -> &'static str {
    use openidconnect::core::CoreJsonWebKeyType as T;
    match key_type {
        T::RSA => "an RSA",
        T::EllipticCurve => "an EC",
        T::OctetKeyPair => "an OKP (EdDSA)",
        T::Symmetric => "a symmetric",
        _ => "an unknown type of",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_set(json: serde_json::Value) -> KeySet {
        KeySet::new(serde_json::from_value(json).unwrap(), 0)
    }

    fn rsa(kid: &str, alg: Option<&str>) -> serde_json::Value {
        let mut key = serde_json::json!({"kty": "RSA", "kid": kid, "n": "sXch", "e": "AQAB"});
        if let Some(alg) = alg {
            key["alg"] = alg.into();
        }
        key
    }

    fn ec(kid: &str) -> serde_json::Value {
        serde_json::json!({"kty": "EC", "kid": kid, "crv": "P-256", "use": "sig",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"})
    }

    fn refused(lookup: Lookup<'_>) -> String {
        match lookup {
            Lookup::Refused(AuthError::Unauthenticated { reason, .. }) => reason,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn finds_keys_by_kid_and_refuses_type_confusion() {
        let keys = key_set(serde_json::json!({"keys": [rsa("r1", Some("RS256")), ec("e1")]}));
        assert!(matches!(
            keys.lookup(Some("r1"), Algorithm::RS256),
            Lookup::Found(_)
        ));
        assert!(matches!(
            keys.lookup(Some("e1"), Algorithm::ES256),
            Lookup::Found(_)
        ));
        assert!(matches!(
            keys.lookup(Some("k9"), Algorithm::RS256),
            Lookup::UnknownKid
        ));
        let reason = refused(keys.lookup(Some("e1"), Algorithm::RS256));
        assert!(
            reason.contains("an EC key, RS256 needs an RSA key"),
            "{reason}"
        );
        let reason = refused(keys.lookup(Some("r1"), Algorithm::PS256));
        assert!(reason.contains("meant for RS256, not PS256"), "{reason}");
    }

    #[test]
    fn a_token_without_kid_needs_exactly_one_usable_key() {
        let one = key_set(serde_json::json!({"keys": [rsa("r1", None), ec("e1")]}));
        assert!(matches!(
            one.lookup(None, Algorithm::RS256),
            Lookup::Found(_)
        ));
        assert!(matches!(
            one.lookup(None, Algorithm::EdDSA),
            Lookup::NoUsableKey
        ));
        let two = key_set(serde_json::json!({"keys": [rsa("r1", None), rsa("r2", None)]}));
        let reason = refused(two.lookup(None, Algorithm::RS256));
        assert!(reason.contains("2 keys for RS256"), "{reason}");
    }

    #[test]
    fn encryption_keys_never_verify() {
        let mut key = rsa("r1", None);
        key["use"] = "enc".into();
        let keys = key_set(serde_json::json!({"keys": [key]}));
        let reason = refused(keys.lookup(Some("r1"), Algorithm::RS256));
        assert!(reason.contains("not a signing key"), "{reason}");
    }
}
