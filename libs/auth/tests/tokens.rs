//! Bearer tokens against the real development OpenID provider
//! (infra/oidc-dev, started by scripts/ensure-oidc.sh): tokens it issues to
//! each client validate with the client's roles, tenant and groups; tokens
//! forged with its own private keys (SHAMAL_TEST_OIDC_JWKS) show each
//! validation rule refusing exactly what it should.
//!
//! Needs SHAMAL_TEST_OIDC_ISSUER (and SHAMAL_TEST_OIDC_JWKS for the forged
//! tokens); skipped without them unless SHAMAL_REQUIRE_SERVICES=1
//! (tests/support/services.rs).
#![allow(clippy::unwrap_used)]

#[path = "../../../tests/support/services.rs"]
mod services;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use openidconnect::AsyncHttpClient;
use serde_json::{Value, json};
use sha2::Digest as _;

use shamal_auth::http::HttpClient;
use shamal_auth::{
    AuthError, OidcError, OidcSettings, Permission, Principal, Role, TokenValidator, User,
};

const AUDIENCE: &str = "shamal";
const REMEDY: &str = "run scripts/ensure-oidc.sh and export SHAMAL_TEST_OIDC_ISSUER=\"$(scripts/ensure-oidc.sh | tail -1)\" \
     SHAMAL_TEST_OIDC_JWKS=\"$PWD/.deps/oidc/jwks.json\"";

// ---------------------------------------------------------------- setup

fn issuer(test: &str) -> Option<String> {
    services::configured("SHAMAL_TEST_OIDC_ISSUER", test, REMEDY)
}

/// The provider's signing keys with their private halves.
struct Keys {
    rsa: rsa::RsaPrivateKey,
    rsa_kid: String,
    ec: p256::ecdsa::SigningKey,
    ec_kid: String,
    ed: ed25519_dalek::SigningKey,
    ed_kid: String,
    /// The RSA public key as the provider publishes it (the HS256
    /// confusion attack's "secret").
    rsa_public_jwk: String,
}

fn b64(value: &Value, field: &str) -> Vec<u8> {
    let text = value[field]
        .as_str()
        .unwrap_or_else(|| panic!("JWK field {field} missing"));
    URL_SAFE_NO_PAD
        .decode(text)
        .unwrap_or_else(|error| panic!("JWK field {field}: {error}"))
}

fn keys(test: &str) -> Option<Keys> {
    let path = services::configured("SHAMAL_TEST_OIDC_JWKS", test, REMEDY)?;
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| services::unusable("SHAMAL_TEST_OIDC_JWKS", &path, error));
    let jwks: Value = serde_json::from_str(&text)
        .unwrap_or_else(|error| services::unusable("SHAMAL_TEST_OIDC_JWKS", &path, error));
    let find = |alg: &str| -> Value {
        jwks["keys"]
            .as_array()
            .and_then(|keys| keys.iter().find(|key| key["alg"] == alg).cloned())
            .unwrap_or_else(|| {
                services::unusable("SHAMAL_TEST_OIDC_JWKS", &path, format!("no {alg} key"))
            })
    };
    let big = |key: &Value, field: &str| rsa::BigUint::from_bytes_be(&b64(key, field));
    let rsa_jwk = find("RS256");
    let rsa = rsa::RsaPrivateKey::from_components(
        big(&rsa_jwk, "n"),
        big(&rsa_jwk, "e"),
        big(&rsa_jwk, "d"),
        vec![big(&rsa_jwk, "p"), big(&rsa_jwk, "q")],
    )
    .unwrap_or_else(|error| services::unusable("SHAMAL_TEST_OIDC_JWKS", &path, error));
    let ec_jwk = find("ES256");
    let ec = p256::ecdsa::SigningKey::from_slice(&b64(&ec_jwk, "d"))
        .unwrap_or_else(|error| services::unusable("SHAMAL_TEST_OIDC_JWKS", &path, error));
    let ed_jwk = find("EdDSA");
    let ed_secret: [u8; 32] = b64(&ed_jwk, "d")
        .try_into()
        .unwrap_or_else(|_| services::unusable("SHAMAL_TEST_OIDC_JWKS", &path, "Ed25519 d"));
    let kid = |key: &Value| key["kid"].as_str().unwrap_or_default().to_owned();
    Some(Keys {
        rsa_public_jwk: json!({"kty": "RSA", "n": rsa_jwk["n"], "e": rsa_jwk["e"]}).to_string(),
        rsa,
        rsa_kid: kid(&rsa_jwk),
        ec,
        ec_kid: kid(&ec_jwk),
        ed: ed25519_dalek::SigningKey::from_bytes(&ed_secret),
        ed_kid: kid(&ed_jwk),
    })
}

async fn validator(issuer: &str, edit: impl FnOnce(&mut OidcSettings)) -> TokenValidator {
    let mut settings = OidcSettings::new(issuer, AUDIENCE);
    edit(&mut settings);
    TokenValidator::discover(settings)
        .await
        .unwrap_or_else(|error| services::unusable("SHAMAL_TEST_OIDC_ISSUER", issuer, error))
}

/// An access token from the provider's token endpoint (client
/// credentials, secret `<client>-secret`).
async fn client_token(issuer: &str, client: &str) -> String {
    let http = HttpClient::new(Duration::from_secs(5)).unwrap();
    let get = http::Request::get(format!("{issuer}/.well-known/openid-configuration"))
        .body(Vec::new())
        .unwrap();
    let discovery: Value = serde_json::from_slice(http.call(get).await.unwrap().body()).unwrap();
    let endpoint = discovery["token_endpoint"].as_str().unwrap().to_owned();
    let basic = STANDARD.encode(format!("{client}:{client}-secret"));
    let post = http::Request::post(&endpoint)
        .header("authorization", format!("Basic {basic}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(b"grant_type=client_credentials".to_vec())
        .unwrap();
    let response = http.call(post).await.unwrap();
    let body: Value = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(response.status(), 200, "{client}: {body}");
    body["access_token"].as_str().unwrap().to_owned()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ---------------------------------------------------------------- forging

enum Signer<'a> {
    Rs256(&'a rsa::RsaPrivateKey),
    Rs384(&'a rsa::RsaPrivateKey),
    Ps256(&'a rsa::RsaPrivateKey),
    Es256(&'a p256::ecdsa::SigningKey),
    EdDsa(&'a ed25519_dalek::SigningKey),
    Hs256(&'a [u8]),
    /// These bytes as the signature.
    Raw(&'a [u8]),
}

fn forge(header: &Value, claims: &Value, signer: Signer<'_>) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = sign(input.as_bytes(), signer);
    if signature.is_empty() {
        format!("{input}.")
    } else {
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

fn sign(message: &[u8], signer: Signer<'_>) -> Vec<u8> {
    use hmac::Mac as _;
    use rsa::{Pkcs1v15Sign, Pss};
    match signer {
        Signer::Rs256(key) => key
            .sign(
                Pkcs1v15Sign::new::<sha2::Sha256>(),
                &sha2::Sha256::digest(message),
            )
            .unwrap(),
        Signer::Rs384(key) => key
            .sign(
                Pkcs1v15Sign::new::<sha2::Sha384>(),
                &sha2::Sha384::digest(message),
            )
            .unwrap(),
        Signer::Ps256(key) => key
            .sign_with_rng(
                &mut rsa::rand_core::OsRng,
                Pss::new::<sha2::Sha256>(),
                &sha2::Sha256::digest(message),
            )
            .unwrap(),
        Signer::Es256(key) => {
            use p256::ecdsa::signature::Signer as _;
            let signature: p256::ecdsa::Signature = key.sign(message);
            signature.to_bytes().to_vec()
        }
        Signer::EdDsa(key) => {
            use ed25519_dalek::Signer as _;
            key.sign(message).to_bytes().to_vec()
        }
        Signer::Hs256(secret) => {
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
            mac.update(message);
            mac.finalize().into_bytes().to_vec()
        }
        Signer::Raw(bytes) => bytes.to_vec(),
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .try_into()
        .unwrap()
}

/// Claims like the provider's, for a forged admin.
fn claims(issuer: &str) -> Value {
    let now = now();
    json!({
        "iss": issuer,
        "aud": AUDIENCE,
        "sub": "forged-subject",
        "client_id": "shamal-forged",
        "iat": now,
        "exp": now + 600,
        "roles": ["admin"],
        "tenant": "acme",
        "groups": ["ops"],
    })
}

fn rs256_header(keys: &Keys) -> Value {
    json!({"alg": "RS256", "typ": "at+jwt", "kid": keys.rsa_kid})
}

/// The refusal's RFC 6750 error and reason.
fn refusal(result: Result<Arc<User>, AuthError>) -> (Option<&'static str>, String) {
    match result {
        Err(AuthError::Unauthenticated {
            reason,
            bearer_error,
        }) => (bearer_error, reason),
        other => panic!("expected UNAUTHENTICATED, got {other:?}"),
    }
}

async fn assert_invalid(validator: &TokenValidator, token: &str, says: &str) {
    let result = validator.authenticate(Some(&bearer(token))).await;
    let (kind, reason) = refusal(result);
    assert_eq!(kind, Some("invalid_token"), "{says}: {reason}");
    assert!(reason.contains(says), "expected '{says}' in '{reason}'");
    assert!(
        validator.cached(token).is_none(),
        "a refused token must not be cached"
    );
}

async fn assert_malformed(validator: &TokenValidator, header: &str, says: &str) {
    let (kind, reason) = refusal(validator.authenticate(Some(header)).await);
    assert_eq!(kind, Some("invalid_request"), "{says}: {reason}");
    assert!(reason.contains(says), "expected '{says}' in '{reason}'");
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_tokens_validate_with_each_clients_roles_tenant_and_groups() {
    let Some(issuer) = issuer("provider tokens validate") else {
        return;
    };
    let validator = validator(&issuer, |_| {}).await;
    assert_eq!(validator.settings().issuer, issuer);
    assert!(validator.key_ids().len() >= 3, "{:?}", validator.key_ids());
    for (client, roles, tenant, groups) in [
        (
            "shamal-viewer",
            vec![Role::Viewer],
            "acme",
            vec!["analysts"],
        ),
        (
            "shamal-inference",
            vec![Role::Inference],
            "acme",
            vec!["apps"],
        ),
        (
            "shamal-inference-globex",
            vec![Role::Inference],
            "globex",
            vec!["apps"],
        ),
        (
            "shamal-data-scientist",
            vec![Role::DataScientist],
            "acme",
            vec!["ml"],
        ),
        (
            "shamal-release-manager",
            vec![Role::ReleaseManager],
            "acme",
            vec!["release"],
        ),
        ("shamal-admin", vec![Role::Admin], "acme", vec!["ops"]),
        ("shamal-noroles", vec![], "acme", vec![]),
    ] {
        let token = client_token(&issuer, client).await;
        assert!(validator.cached(&token).is_none(), "{client}: not seen yet");
        let user = validator
            .authenticate(Some(&bearer(&token)))
            .await
            .unwrap_or_else(|error| panic!("{client}: {error}"));
        assert_eq!(user.subject, client);
        assert_eq!(user.client_id.as_deref(), Some(client));
        assert_eq!(user.roles, roles, "{client}");
        assert_eq!(user.tenant.as_deref(), Some(tenant), "{client}");
        assert_eq!(user.groups, groups, "{client}");
        let remaining = user.expires_at.duration_since(SystemTime::now()).unwrap();
        assert!(
            remaining > Duration::from_secs(60),
            "{client}: {remaining:?}"
        );

        // Seen again: the same user from the cache, no second validation.
        let cached = validator.cached(&token).expect("cached after validation");
        assert!(Arc::ptr_eq(&cached, &user));
        let again = validator
            .authenticate(Some(&format!("bearer   {token}")))
            .await
            .unwrap();
        assert!(
            Arc::ptr_eq(&again, &user),
            "{client}: second call is a cache hit"
        );

        // RBAC on top: each role gets its permissions, no roles none.
        let principal = Principal::User(user);
        let expected = roles.iter().any(|role| role.allows(Permission::ModelsRead));
        assert_eq!(
            principal.require(Permission::ModelsRead).is_ok(),
            expected,
            "{client}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_roles_authenticates_but_every_call_is_permission_denied() {
    let Some(issuer) = issuer("no roles claim") else {
        return;
    };
    let validator = validator(&issuer, |_| {}).await;
    let token = client_token(&issuer, "shamal-noroles").await;
    let (_, payload) = shamal_auth::decode_unverified(&token).unwrap();
    assert!(
        payload.get("roles").is_none(),
        "the provider sent no roles claim"
    );
    let user = validator.authenticate(Some(&bearer(&token))).await.unwrap();
    assert!(user.roles.is_empty());
    let principal = Principal::User(user);
    for permission in Permission::ALL {
        let error = principal.require(permission).unwrap_err();
        assert_eq!(error.to_status().code(), tonic::Code::PermissionDenied);
        assert!(matches!(error, AuthError::Forbidden { .. }));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_forged_with_the_providers_own_keys_validate_for_every_allowed_algorithm() {
    let (Some(issuer), Some(keys)) = (
        issuer("forged tokens validate"),
        keys("forged tokens validate"),
    ) else {
        return;
    };
    let validator = validator(&issuer, |_| {}).await;
    let claims = claims(&issuer);
    for (name, header, signer) in [
        ("RS256", rs256_header(&keys), Signer::Rs256(&keys.rsa)),
        (
            "ES256",
            json!({"alg": "ES256", "kid": keys.ec_kid.clone(), "typ": "JWT"}),
            Signer::Es256(&keys.ec),
        ),
        (
            "EdDSA",
            json!({"alg": "EdDSA", "kid": keys.ed_kid.clone()}),
            Signer::EdDsa(&keys.ed),
        ),
        // Without kid: the JWKS has exactly one key for the algorithm.
        (
            "RS256 without kid",
            json!({"alg": "RS256"}),
            Signer::Rs256(&keys.rsa),
        ),
        (
            "ES256 without kid",
            json!({"alg": "ES256"}),
            Signer::Es256(&keys.ec),
        ),
    ] {
        let token = forge(&header, &claims, signer);
        let user = validator
            .authenticate(Some(&bearer(&token)))
            .await
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!(user.subject, "forged-subject", "{name}");
        assert_eq!(user.client_id.as_deref(), Some("shamal-forged"));
        assert_eq!(user.roles, [Role::Admin]);
    }

    // The leeway: expired 10 s ago, not yet valid for 10 s, issued 10 s
    // ahead are all within the default 30 s.
    let mut edge = claims.clone();
    edge["exp"] = json!(now() - 10);
    edge["nbf"] = json!(now() + 10);
    edge["iat"] = json!(now() + 10);
    let token = forge(&rs256_header(&keys), &edge, Signer::Rs256(&keys.rsa));
    validator.authenticate(Some(&bearer(&token))).await.unwrap();
    assert!(
        validator.cached(&token).is_none(),
        "a token past its exp is not cached"
    );

    // aud as an array containing the audience; azp when no client_id;
    // roles as a space-separated string; a Keycloak-style nested claim.
    let mut other = claims.clone();
    other["aud"] = json!(["account", AUDIENCE]);
    other.as_object_mut().unwrap().remove("client_id");
    other["azp"] = json!("shamal-cli");
    other["roles"] = json!("viewer data-scientist unknown-role");
    let token = forge(&rs256_header(&keys), &other, Signer::Rs256(&keys.rsa));
    let user = validator.authenticate(Some(&bearer(&token))).await.unwrap();
    assert_eq!(user.client_id.as_deref(), Some("shamal-cli"));
    assert_eq!(user.roles, [Role::Viewer, Role::DataScientist]);

    let keycloak = validator_with_claims(&issuer).await;
    let mut nested = claims.clone();
    nested.as_object_mut().unwrap().remove("roles");
    nested["realm_access"] = json!({"roles": ["release-manager", "offline_access"]});
    nested["org"] = json!({"tenant": "globex"});
    let token = forge(&rs256_header(&keys), &nested, Signer::Rs256(&keys.rsa));
    let user = keycloak.authenticate(Some(&bearer(&token))).await.unwrap();
    assert_eq!(user.roles, [Role::ReleaseManager]);
    assert_eq!(user.tenant.as_deref(), Some("globex"));
}

async fn validator_with_claims(issuer: &str) -> TokenValidator {
    validator(issuer, |settings| {
        settings.roles_claim = "realm_access.roles".into();
        settings.tenant_claim = "org.tenant".into();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_broken_tokens_are_refused_naming_what_failed() {
    let (Some(issuer), Some(keys)) = (issuer("negative tokens"), keys("negative tokens")) else {
        return;
    };
    let validator = validator(&issuer, |_| {}).await;
    let claims = claims(&issuer);
    let header = rs256_header(&keys);
    let with = |field: &str, value: Value| {
        let mut claims = claims.clone();
        claims[field] = value;
        forge(&header, &claims, Signer::Rs256(&keys.rsa))
    };
    let without = |field: &str| {
        let mut claims = claims.clone();
        claims.as_object_mut().unwrap().remove(field);
        forge(&header, &claims, Signer::Rs256(&keys.rsa))
    };

    // The control: the same forgery, unaltered, is accepted.
    let control = forge(&header, &claims, Signer::Rs256(&keys.rsa));
    validator
        .authenticate(Some(&bearer(&control)))
        .await
        .unwrap();

    // 1. alg none, with some signature bytes and with none at all.
    let none = json!({"alg": "none", "typ": "JWT"});
    let token = forge(&none, &claims, Signer::Raw(b"x"));
    assert_invalid(&validator, &token, "algorithm 'none' is not allowed").await;
    let token = forge(&none, &claims, Signer::Raw(b""));
    assert_malformed(&validator, &bearer(&token), "signature is empty").await;
    // 2. HS256 "signed" with the provider's RSA public key (alg confusion).
    let hs = json!({"alg": "HS256", "kid": keys.rsa_kid});
    let public_der = {
        use rsa::pkcs8::EncodePublicKey as _;
        keys.rsa
            .to_public_key()
            .to_public_key_der()
            .unwrap()
            .into_vec()
    };
    for secret in [keys.rsa_public_jwk.as_bytes(), &public_der] {
        let token = forge(&hs, &claims, Signer::Hs256(secret));
        assert_invalid(&validator, &token, "algorithm 'HS256' is not allowed (HMAC").await;
    }
    // 3. wrong issuer.
    let token = with("iss", json!("https://evil.example.com"));
    assert_invalid(
        &validator,
        &token,
        "issuer 'https://evil.example.com' is not",
    )
    .await;
    assert_invalid(&validator, &without("iss"), "no issuer (iss)").await;
    // 4. wrong audience.
    assert_invalid(
        &validator,
        &with("aud", json!("other")),
        "audience 'other' does not include 'shamal'",
    )
    .await;
    assert_invalid(
        &validator,
        &with("aud", json!(["a", "b"])),
        "does not include 'shamal'",
    )
    .await;
    assert_invalid(&validator, &without("aud"), "no audience (aud)").await;
    // 5. expired (beyond the 30 s leeway).
    assert_invalid(
        &validator,
        &with("exp", json!(now() - 120)),
        "token expired",
    )
    .await;
    // 6. not yet valid.
    assert_invalid(
        &validator,
        &with("nbf", json!(now() + 120)),
        "not valid yet (nbf",
    )
    .await;
    // 7. issued in the future.
    assert_invalid(
        &validator,
        &with("iat", json!(now() + 120)),
        "issued in the future (iat",
    )
    .await;
    // 8. missing or mistyped exp; missing sub.
    assert_invalid(&validator, &without("exp"), "no expiry (exp)").await;
    assert_invalid(
        &validator,
        &with("exp", json!("tomorrow")),
        "'exp' is not a NumericDate",
    )
    .await;
    assert_invalid(&validator, &without("sub"), "no subject (sub)").await;
    // 9. unknown kid (refused after the rate-limited refetch: see below).
    let token = forge(
        &json!({"alg": "RS256", "kid": "k9"}),
        &claims,
        Signer::Rs256(&keys.rsa),
    );
    assert_invalid(&validator, &token, "unknown key id 'k9'").await;
    // 10. tampered payload: a real token's payload made admin.
    let real = client_token(&issuer, "shamal-viewer").await;
    let parts: Vec<&str> = real.split('.').collect();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    payload["roles"] = json!(["admin"]);
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        parts[2]
    );
    assert_invalid(&validator, &tampered, "signature is invalid").await;
    // 11. tampered signature: one bit of the real token's signature.
    let mut signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    signature[10] ^= 0x01;
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        URL_SAFE_NO_PAD.encode(&signature)
    );
    assert_invalid(&validator, &tampered, "signature is invalid").await;
    validator.authenticate(Some(&bearer(&real))).await.unwrap();
    // 12. signed by a foreign RSA key under the provider's kid.
    let foreign = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let token = forge(&header, &claims, Signer::Rs256(&foreign));
    assert_invalid(&validator, &token, "signature is invalid").await;
    // 13. RS256 naming the ES256 key (key type confusion), and the other
    // way round; ES256 naming the EdDSA key.
    let token = forge(
        &json!({"alg": "RS256", "kid": keys.ec_kid}),
        &claims,
        Signer::Rs256(&keys.rsa),
    );
    assert_invalid(&validator, &token, "cannot verify RS256: it is an EC key").await;
    let token = forge(
        &json!({"alg": "ES256", "kid": keys.rsa_kid}),
        &claims,
        Signer::Es256(&keys.ec),
    );
    assert_invalid(&validator, &token, "cannot verify ES256: it is an RSA key").await;
    // PS256 with the RS256-only key.
    let token = forge(
        &json!({"alg": "PS256", "kid": keys.rsa_kid}),
        &claims,
        Signer::Ps256(&keys.rsa),
    );
    assert_invalid(&validator, &token, "meant for RS256, not PS256").await;
    // 14. a crit header it does not understand.
    let token = forge(
        &json!({"alg": "RS256", "kid": keys.rsa_kid, "crit": ["exp"], "exp": 1}),
        &claims,
        Signer::Rs256(&keys.rsa),
    );
    assert_invalid(&validator, &token, "not understood (crit: exp)").await;
    // 15. an alg not in the allow-list (valid signature, RS384).
    let rs384 = forge(
        &json!({"alg": "RS384", "kid": "no-alg-key"}),
        &claims,
        Signer::Rs384(&keys.rsa),
    );
    assert_invalid(
        &validator,
        &rs384,
        "algorithm 'RS384' is not allowed (allowed: RS256, PS256, ES256, EdDSA)",
    )
    .await;
    // 16. typ other than JWT / at+jwt.
    let token = forge(
        &json!({"alg": "RS256", "kid": keys.rsa_kid, "typ": "dpop+jwt"}),
        &claims,
        Signer::Rs256(&keys.rsa),
    );
    assert_invalid(
        &validator,
        &token,
        "token type 'dpop+jwt' is not JWT or at+jwt",
    )
    .await;
    // 17. malformed: parts, base64, JSON.
    assert_malformed(&validator, "Bearer abc.def", "2 parts, not 3").await;
    assert_malformed(&validator, &bearer(&format!("{control}.x")), "4 parts").await;
    assert_malformed(
        &validator,
        "Bearer ab!c.def.ghi",
        "not allowed in a token68",
    )
    .await;
    assert_malformed(&validator, "Bearer ab+c.def.ghi", "header is not base64url").await;
    assert_malformed(&validator, "Basic YTpi", "'Basic' is not Bearer").await;
    let (kind, reason) = refusal(validator.authenticate(None).await);
    assert_eq!((kind, reason.as_str()), (None, "no Authorization header"));
    let body = control.split_once('.').unwrap().1;
    assert_invalid(
        &validator,
        &format!("AB.{body}"),
        "header is not valid base64url",
    )
    .await;
    let not_json = URL_SAFE_NO_PAD.encode("{alg: RS256}");
    assert_invalid(
        &validator,
        &format!("{not_json}.{body}"),
        "header is not a JSON object",
    )
    .await;
    let array = URL_SAFE_NO_PAD.encode("[]");
    let head = control.split('.').next().unwrap();
    let sig = control.rsplit('.').next().unwrap();
    assert_invalid(
        &validator,
        &format!("{head}.{array}.{sig}"),
        "payload is not a JSON object",
    )
    .await;

    // Refusals are UNAUTHENTICATED with an RFC 6750 challenge.
    let error = validator
        .authenticate(Some(&bearer(&with("exp", json!(now() - 120)))))
        .await
        .unwrap_err();
    assert_eq!(error.to_status().code(), tonic::Code::Unauthenticated);
    let challenge = error.www_authenticate("shamal").unwrap();
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_list_decides_which_algorithms_pass() {
    let (Some(issuer), Some(keys)) = (issuer("allow-list"), keys("allow-list")) else {
        return;
    };
    let claims = claims(&issuer);
    let rs384 = forge(&json!({"alg": "RS384"}), &claims, Signer::Rs384(&keys.rsa));
    let rs256 = forge(&rs256_header(&keys), &claims, Signer::Rs256(&keys.rsa));
    let es256 = forge(
        &json!({"alg": "ES256", "kid": keys.ec_kid}),
        &claims,
        Signer::Es256(&keys.ec),
    );
    // The provider's RSA key says alg RS256: RS384 is refused even when
    // allowed, naming why.
    let wide = validator(&issuer, |s| {
        s.algorithms = vec!["RS256".into(), "RS384".into()]
    })
    .await;
    assert_invalid(&wide, &rs384, "no key of the provider can verify RS384").await;
    wide.authenticate(Some(&bearer(&rs256))).await.unwrap();
    assert_invalid(
        &wide,
        &es256,
        "algorithm 'ES256' is not allowed (allowed: RS256, RS384)",
    )
    .await;
    let only_es = validator(&issuer, |s| s.algorithms = vec!["ES256".into()]).await;
    only_es.authenticate(Some(&bearer(&es256))).await.unwrap();
    assert_invalid(&only_es, &rs256, "algorithm 'RS256' is not allowed").await;

    // HMAC and none cannot even be configured.
    for alg in ["HS256", "none"] {
        let mut settings = OidcSettings::new(&issuer, AUDIENCE);
        settings.algorithms = vec!["RS256".into(), alg.into()];
        let error = TokenValidator::discover(settings).await.unwrap_err();
        assert!(
            matches!(&error, OidcError::Settings(e) if e.field == "algorithms"),
            "{error}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_key_ids_refetch_the_jwks_at_most_once_per_interval() {
    let (Some(issuer), Some(keys)) = (issuer("JWKS refetch"), keys("JWKS refetch")) else {
        return;
    };
    let claims = claims(&issuer);
    let unknown = |kid: &str| {
        forge(
            &json!({"alg": "RS256", "kid": kid}),
            &claims,
            Signer::Rs256(&keys.rsa),
        )
    };

    // Default interval (30 s): just after discovery, no refetch at all.
    let validator_30 = validator(&issuer, |_| {}).await;
    assert_invalid(&validator_30, &unknown("k9"), "unknown key id 'k9'").await;
    assert_eq!(validator_30.jwks_refetches(), 0);

    let validator = validator(&issuer, |s| s.jwks_min_refetch_s = 2).await;
    let before = validator.key_ids();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // Concurrent callers with unknown kids share one refetch.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let validator = validator.clone();
            let token = unknown(&format!("rotated-{i}"));
            tokio::spawn(async move { validator.authenticate(Some(&bearer(&token))).await })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let (_, reason) = refusal(task.await.unwrap());
        assert!(
            reason.contains(&format!("unknown key id 'rotated-{i}'")),
            "{reason}"
        );
    }
    assert_eq!(validator.jwks_refetches(), 1, "one refetch for 8 callers");
    assert_eq!(
        validator.key_ids(),
        before,
        "the same provider keys after the refetch"
    );
    // Within the interval: refused without fetching.
    assert_invalid(&validator, &unknown("k10"), "unknown key id 'k10'").await;
    assert_eq!(validator.jwks_refetches(), 1);
    // Known keys keep working meanwhile.
    let good = forge(&rs256_header(&keys), &claims, Signer::Rs256(&keys.rsa));
    validator.authenticate(Some(&bearer(&good))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_needs_the_exact_issuer_and_a_provider_that_answers() {
    let Some(issuer) = issuer("discovery") else {
        return;
    };
    let with_slash = format!("{issuer}/");
    let error = TokenValidator::discover(OidcSettings::new(&with_slash, AUDIENCE))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("issuer"), "{error}");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let error = TokenValidator::discover(OidcSettings::new(
        format!("http://127.0.0.1:{port}"),
        AUDIENCE,
    ))
    .await
    .unwrap_err();
    assert!(matches!(error, OidcError::Discovery { .. }), "{error}");

    let error = TokenValidator::discover(OidcSettings::new("http://id.example.com", AUDIENCE))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, OidcError::Settings(e) if e.field == "issuer"),
        "{error}"
    );
}

/// The cost of a cache hit (the whole `authenticate` of a token seen
/// before). Printed; the bound is loose because debug builds are slow and
/// the machine is shared, the number that matters is the release one
/// (docs/oidc.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_hit_costs_a_hash_and_a_lookup() {
    let Some(issuer) = issuer("cache hit cost") else {
        return;
    };
    let validator = validator(&issuer, |_| {}).await;
    let header = bearer(&client_token(&issuer, "shamal-inference").await);
    let first = validator.authenticate(Some(&header)).await.unwrap();
    let mut samples = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let start = Instant::now();
        let user = validator.authenticate(Some(&header)).await.unwrap();
        samples.push(start.elapsed());
        assert!(Arc::ptr_eq(&user, &first));
    }
    samples.sort();
    let p50 = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "cache hit ({} byte token): p50 {p50:?}, p99 {p99:?}\n",
            header.len()
        )
        .as_bytes(),
    );
    assert!(p50 < Duration::from_micros(500), "p50 {p50:?}");
}
