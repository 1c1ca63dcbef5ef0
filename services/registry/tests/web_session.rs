//! The web UI's OIDC login against the real OpenID provider
//! (`scripts/ensure-oidc.sh`): a scripted login through the provider's dev
//! login page with a cookie-keeping HTTP client, the session cookie's
//! attributes, `/session`, the CSRF check on changes made with the cookie,
//! RBAC on a viewer's session, and logout.
//!
//! The registry listens on 127.0.0.1:18290: the provider's `shamal-web`
//! client must list `http://127.0.0.1:18290/oidc/callback` among its
//! redirect URIs (`SHAMAL_OIDC_WEB_REDIRECTS`, set by `scripts/test.sh`).
#![allow(clippy::unwrap_used)]

mod support;

#[path = "../../../tests/support/oidc.rs"]
mod oidc;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use reqwest::{StatusCode, Url};
use serde_json::{Value, json};
use shamal_auth::security::SecurityConfig;
use shamal_registry::model::StartRollout;
use shamal_registry::rest::session::WebClientSecret;
use support::services;

/// The registry's fixed address (the provider needs its redirect URI).
const ADDRESS: ([u8; 4], u16) = ([127, 0, 0, 1], 18290);

async fn start(issuer: &str, dir: &std::path::Path) -> shamal_registry::RunningRegistry {
    let config = shamal_registry::RegistryConfig {
        security: SecurityConfig {
            oidc_issuer: Some(issuer.to_owned()),
            oidc_audience: Some(oidc::AUDIENCE.to_owned()),
            ..SecurityConfig::default()
        },
        oidc_web_client_secret: Some(WebClientSecret::new("shamal-web-secret")),
        http_listen: SocketAddr::from(ADDRESS),
        grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: None,
        database_url: format!("sqlite://{}?mode=rwc", dir.join("registry.db").display()),
        artifact_dir: dir.join("artifacts"),
        ..Default::default()
    };
    let listeners = shamal_registry::RegistryListeners::bind(&config)
        .await
        .unwrap_or_else(|error| panic!("cannot listen on {:?}: {error}", ADDRESS));
    shamal_registry::RunningRegistry::start(config, listeners, Default::default())
        .await
        .unwrap()
}

/// Model `fraud` with versions 1 (production) and 2 ready, and a canary of
/// 2 at 10% (revision 1).
async fn canary(registry: &shamal_registry::ModelRegistry) {
    for index in 0..2 {
        let version = support::push(registry, "fraud", format!("weights {index}").as_bytes()).await;
        support::mark_ready(registry, "fraud", version).await;
    }
    registry
        .set_alias("fraud", "production", 1, "setup")
        .await
        .unwrap();
    registry
        .start_rollout(
            "fraud",
            StartRollout {
                expected_revision: 0,
                candidate: 2,
                weight: 10,
                ..Default::default()
            },
            "setup",
        )
        .await
        .unwrap();
}

/// A cookie-keeping HTTP client that follows no redirects itself.
struct Browser {
    http: reqwest::Client,
    /// Cookies by `host:port`, then name (paths and expiry ignored: the
    /// flow is short).
    jar: HashMap<String, BTreeMap<String, String>>,
}

fn origin(url: &Url) -> String {
    format!(
        "{}:{}",
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or(0)
    )
}

/// Undoes the HTML escaping of attribute values.
fn unescape(text: &str) -> String {
    text.replace("&amp;", "&")
        .replace("&#x2F;", "/")
        .replace("&#47;", "/")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
}

/// The value of attribute `name` in the tag text `tag`.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
    let end = tag[start..].find('"')? + start;
    Some(unescape(&tag[start..end]))
}

impl Browser {
    fn new() -> Browser {
        Browser {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            jar: HashMap::new(),
        }
    }

    fn cookie_header(&self, url: &Url) -> Option<String> {
        let cookies = self.jar.get(&origin(url))?;
        (!cookies.is_empty()).then(|| {
            cookies
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    fn keep_cookies(&mut self, url: &Url, response: &reqwest::Response) {
        for value in response.headers().get_all("set-cookie") {
            let text = value.to_str().unwrap();
            let pair = text.split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            let jar = self.jar.entry(origin(url)).or_default();
            let expired = value.is_empty() || text.to_ascii_lowercase().contains("max-age=0");
            if expired {
                jar.remove(name.trim());
            } else {
                jar.insert(name.trim().to_owned(), value.trim().to_owned());
            }
        }
    }

    async fn send(
        &mut self,
        method: reqwest::Method,
        url: &Url,
        form: Option<&[(String, String)]>,
    ) -> reqwest::Response {
        let mut request = self.http.request(method, url.clone());
        if let Some(cookies) = self.cookie_header(url) {
            request = request.header("cookie", cookies);
        }
        if let Some(form) = form {
            let body = form
                .iter()
                .map(|(name, value)| format!("{}={}", encode(name), encode(value)))
                .collect::<Vec<_>>()
                .join("&");
            request = request
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body);
        }
        let response = request.send().await.unwrap();
        self.keep_cookies(url, &response);
        response
    }

    /// Logs in as `account` from the registry's `/login` through the
    /// provider's dev login and consent pages; the registry's answer to
    /// the provider's redirect back (the callback).
    async fn login(&mut self, base: &Url, account: &str) -> reqwest::Response {
        let mut url = base.join("/login").unwrap();
        let mut form: Option<Vec<(String, String)>> = None;
        for _ in 0..20 {
            let method = if form.is_some() {
                reqwest::Method::POST
            } else {
                reqwest::Method::GET
            };
            let response = self.send(method, &url, form.take().as_deref()).await;
            if url.path() == "/oidc/callback" && origin(&url) == origin(base) {
                return response;
            }
            let status = response.status();
            if status.is_redirection() {
                let location = response.headers()["location"].to_str().unwrap();
                url = url.join(location).unwrap();
                continue;
            }
            let page = response.text().await.unwrap();
            assert_eq!(status, StatusCode::OK, "{url}: {page}");
            // The provider's dev login or consent form.
            let start = page
                .find("<form")
                .unwrap_or_else(|| panic!("no form at {url}: {page}"));
            let end = page[start..].find('>').unwrap() + start;
            let action = attribute(&page[start..end], "action").unwrap();
            let mut fields = Vec::new();
            for input in page[end..].split("<input").skip(1) {
                let tag = &input[..input.find('>').unwrap()];
                let name = attribute(tag, "name").unwrap_or_default();
                match name.as_str() {
                    "login" => fields.push((name, account.to_owned())),
                    "password" => fields.push((name, "any password".to_owned())),
                    "" => {}
                    _ => fields.push((name, attribute(tag, "value").unwrap_or_default())),
                }
            }
            url = url.join(&action).unwrap();
            form = Some(fields);
        }
        panic!("the login of {account} did not come back to the registry");
    }

    fn session_cookie(&self, base: &Url) -> Option<String> {
        self.jar.get(&origin(base))?.get("shamal_session").cloned()
    }
}

fn encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(byte));
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// A request to the registry with the browser's cookies and, when given,
/// a CSRF token.
async fn call(
    browser: &mut Browser,
    method: reqwest::Method,
    url: &Url,
    body: Option<Value>,
    csrf: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = browser.http.request(method, url.clone());
    if let Some(cookies) = browser.cookie_header(url) {
        request = request.header("cookie", cookies);
    }
    if let Some(token) = csrf {
        request = request.header("x-csrf-token", token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    browser.keep_cookies(url, &response);
    let status = response.status();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_web_ui_logs_in_with_oidc_and_guards_changes_with_csrf_tokens() {
    let Some(issuer) = oidc::issuer("web UI login") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let running = start(&issuer, dir.path()).await;
    canary(&running.registry).await;
    let base = Url::parse(&format!("http://{}", running.http_address)).unwrap();
    let shift = base.join("/v1/models/fraud/rollout/shift").unwrap();
    let session_url = base.join("/session").unwrap();

    // Nobody yet: /session is 401, and the page is public.
    let mut alice = Browser::new();
    let (status, body) = call(&mut alice, reqwest::Method::GET, &session_url, None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _) = call(&mut alice, reqwest::Method::GET, &base, None, None).await;
    assert_eq!(status, StatusCode::OK);

    // /login: a PKCE S256 authorization request with state and nonce, and
    // a Lax pre-login cookie scoped to the callback.
    let response = alice
        .send(reqwest::Method::GET, &base.join("/login").unwrap(), None)
        .await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let location = Url::parse(response.headers()["location"].to_str().unwrap()).unwrap();
    assert!(location.as_str().starts_with(&issuer), "{location}");
    let query: HashMap<String, String> = location.query_pairs().into_owned().collect();
    assert_eq!(query["code_challenge_method"], "S256");
    assert_eq!(query["client_id"], "shamal-web");
    assert_eq!(
        query["redirect_uri"],
        "http://127.0.0.1:18290/oidc/callback"
    );
    assert!(query["scope"].split(' ').any(|scope| scope == "openid"));
    assert!(query.contains_key("state") && query.contains_key("nonce"));
    // offline_access (a refresh token) is asked for with prompt=consent.
    assert_eq!(query["prompt"], "consent");
    let login_cookie = response.headers()["set-cookie"].to_str().unwrap();
    assert!(
        login_cookie.starts_with("shamal_login=")
            && login_cookie.contains("HttpOnly")
            && login_cookie.contains("SameSite=Lax")
            && login_cookie.contains("Path=/oidc/callback"),
        "{login_cookie}"
    );
    // A callback with another state is refused (and uses up the login).
    let forged = base
        .join(&format!("/oidc/callback?code=x&state=forged&iss={issuer}"))
        .unwrap();
    let (status, body) = call(&mut alice, reqwest::Method::GET, &forged, None, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("state"), "{body}");
    // Without a login under way.
    let (status, body) = call(&mut alice, reqwest::Method::GET, &forged, None, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("no login"), "{body}");

    // alice (release-manager) logs in through the provider's pages.
    let callback = alice.login(&base, "alice").await;
    assert_eq!(callback.status(), StatusCode::SEE_OTHER);
    assert_eq!(callback.headers()["location"], "/");
    let cookies: Vec<&str> = callback
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|value| value.to_str().unwrap())
        .collect();
    let session_cookie = cookies
        .iter()
        .find(|cookie| cookie.starts_with("shamal_session="))
        .unwrap_or_else(|| panic!("{cookies:?}"));
    let attributes: Vec<&str> = session_cookie.split("; ").skip(1).collect();
    assert!(attributes.contains(&"HttpOnly"), "{session_cookie}");
    assert!(attributes.contains(&"SameSite=Strict"), "{session_cookie}");
    assert!(attributes.contains(&"Path=/"), "{session_cookie}");
    assert!(
        !attributes.iter().any(|a| a.eq_ignore_ascii_case("Secure")),
        "no Secure without TLS: {session_cookie}"
    );
    let id = alice.session_cookie(&base).unwrap();
    assert!(id.len() >= 43, "a 256-bit id: {id}");

    let (status, me) = call(&mut alice, reqwest::Method::GET, &session_url, None, None).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["subject"], "alice");
    assert_eq!(me["roles"], json!(["release-manager"]));
    assert_eq!(me["tenant"], "acme");
    let permissions: Vec<&str> = me["permissions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for held in [
        "models:read",
        "rollouts:start",
        "rollouts:manage",
        "residency:write",
    ] {
        assert!(permissions.contains(&held), "{held}: {permissions:?}");
    }
    for lacked in ["models:write", "admin", "workers:read"] {
        assert!(!permissions.contains(&lacked), "{lacked}: {permissions:?}");
    }
    let csrf = me["csrf_token"].as_str().unwrap().to_owned();
    assert!(csrf.len() >= 43);

    // Reads need no CSRF token.
    let model = base.join("/v1/models/fraud/rollout").unwrap();
    let (status, rollout) = call(&mut alice, reqwest::Method::GET, &model, None, None).await;
    assert_eq!(status, StatusCode::OK, "{rollout}");
    // A change with the cookie but no (or a wrong) CSRF token: 403.
    let change = json!({"expected_revision": 1, "weight": 25});
    for token in [None, Some("not-the-token")] {
        let (status, body) = call(
            &mut alice,
            reqwest::Method::POST,
            &shift,
            Some(change.clone()),
            token,
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(body.to_string().contains("x-csrf-token"), "{body}");
    }
    // With it: done, attributed to alice.
    let (status, body) = call(
        &mut alice,
        reqwest::Method::POST,
        &shift,
        Some(change.clone()),
        Some(&csrf),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["revision"], 2);
    let history = running
        .registry
        .history("fraud", None, None)
        .await
        .unwrap()
        .items;
    let last = history.last().unwrap();
    assert_eq!(last.action, "shift");
    assert!(last.actor.starts_with("alice"), "{}", last.actor);

    // bob (viewer) reads but may not shift, CSRF token or not.
    let mut bob = Browser::new();
    let callback = bob.login(&base, "bob").await;
    assert_eq!(callback.status(), StatusCode::SEE_OTHER);
    let (status, bob_me) = call(&mut bob, reqwest::Method::GET, &session_url, None, None).await;
    assert_eq!(status, StatusCode::OK, "{bob_me}");
    assert_eq!(bob_me["roles"], json!(["viewer"]));
    assert!(
        !bob_me["permissions"]
            .as_array()
            .unwrap()
            .contains(&json!("rollouts:manage"))
    );
    let bob_csrf = bob_me["csrf_token"].as_str().unwrap().to_owned();
    assert_ne!(bob_csrf, csrf, "a token per session");
    let (status, _) = call(&mut bob, reqwest::Method::GET, &model, None, None).await;
    assert_eq!(status, StatusCode::OK);
    let change = json!({"expected_revision": 2, "weight": 50});
    let (status, body) = call(
        &mut bob,
        reqwest::Method::POST,
        &shift,
        Some(change.clone()),
        Some(&bob_csrf),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.to_string().contains("rollouts:manage"), "{body}");
    // alice's token in bob's session is no token.
    let (status, _) = call(
        &mut bob,
        reqwest::Method::POST,
        &shift,
        Some(change),
        Some(&csrf),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // A bearer token needs no CSRF token, even beside a session cookie.
    let admin = oidc::token(&issuer, "shamal-admin").await;
    let response = reqwest::Client::new()
        .post(shift.clone())
        .bearer_auth(&admin)
        .header("cookie", format!("shamal_session={id}"))
        .json(&json!({"expected_revision": 2, "weight": 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        running
            .registry
            .history("fraud", None, None)
            .await
            .unwrap()
            .items
            .last()
            .unwrap()
            .actor,
        "shamal-admin"
    );

    // Logout needs the CSRF token, then ends the session.
    let logout = base.join("/logout").unwrap();
    let (status, body) = call(&mut alice, reqwest::Method::POST, &logout, None, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = call(
        &mut alice,
        reqwest::Method::POST,
        &logout,
        None,
        Some(&csrf),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(
        alice.session_cookie(&base).is_none(),
        "the cookie is cleared"
    );
    // The old cookie is dead.
    alice
        .jar
        .entry(origin(&base))
        .or_default()
        .insert("shamal_session".to_owned(), id);
    let (status, body) = call(&mut alice, reqwest::Method::GET, &session_url, None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    alice
        .jar
        .entry(origin(&base))
        .or_default()
        .insert("shamal_session".to_owned(), "forged".to_owned());
    let (status, body) = call(
        &mut alice,
        reqwest::Method::POST,
        &shift,
        Some(json!({"expected_revision": 3, "weight": 40})),
        Some(&csrf),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.to_string().contains("log in again"), "{body}");
    // bob's session is untouched.
    let (status, _) = call(&mut bob, reqwest::Method::GET, &session_url, None, None).await;
    assert_eq!(status, StatusCode::OK);

    running.stop().await.unwrap();
}

#[tokio::test]
async fn without_oidc_there_is_no_login_and_the_page_is_served_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let running = shamal_registry::RunningRegistry::start_local(
        &format!("sqlite://{}?mode=rwc", dir.path().join("r.db").display()),
        &dir.path().join("artifacts"),
    )
    .await
    .unwrap();
    let base = format!("http://{}", running.http_address);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for path in ["/login", "/session", "/oidc/callback?code=x&state=y"] {
        let response = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let response = http.post(format!("{base}/logout")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let page = http.get(&base).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    // A cookie means nothing with auth off: changes go through as before.
    let response = http
        .post(format!("{base}/v1/models"))
        .header("cookie", "shamal_session=whatever")
        .json(&json!({"name": "plain"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    running.stop().await.unwrap();
}
