//! Access tokens from the real OpenID provider the test command starts
//! (`scripts/ensure-oidc.sh`, npm `oidc-provider`): client-credentials
//! tokens of the static clients `shamal-<role>` (secret `<id>-secret`),
//! whose roles, tenant and groups `infra/oidc-dev/provider.mjs` sets.
//!
//! Include beside `services.rs` (`#[path = ".../tests/support/oidc.rs"]
//! mod oidc;`); needs `reqwest` and `serde_json` in the crate's test
//! dependencies.
#![allow(dead_code)]

/// The variable naming the provider's issuer URL.
pub const ISSUER: &str = "SHAMAL_TEST_OIDC_ISSUER";

/// The audience of the provider's access tokens.
pub const AUDIENCE: &str = "shamal";

/// The issuer when the provider is configured; `None` (after saying so)
/// when the test is to be skipped (see `services.rs`).
pub fn issuer(test: &str) -> Option<String> {
    super::services::configured(
        ISSUER,
        test,
        "run scripts/ensure-oidc.sh and export its last line as SHAMAL_TEST_OIDC_ISSUER",
    )
}

/// A client-credentials access token of `client` (e.g. `shamal-viewer`).
pub async fn token(issuer: &str, client: &str) -> String {
    let http = reqwest::Client::new();
    let discovery: serde_json::Value = http
        .get(format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        ))
        .send()
        .await
        .expect("discovery answers")
        .json()
        .await
        .expect("discovery is JSON");
    let endpoint = discovery["token_endpoint"]
        .as_str()
        .expect("token_endpoint")
        .to_owned();
    let response = http
        .post(endpoint)
        .basic_auth(client, Some(format!("{client}-secret")))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .expect("token endpoint answers");
    let status = response.status();
    let body: serde_json::Value = response.json().await.expect("token response is JSON");
    assert!(status.is_success(), "token for {client}: {status} {body}");
    body["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}
