//! The registry web UI in headless Chromium (Debian's `chromium`), driven
//! over the Chrome DevTools protocol: log in through the real OpenID
//! provider's login page as alice (release-manager), shift a canary's
//! weight with the UI's button, and check the rollout and its history
//! (actor alice) through the API; bob (viewer) sees the rollout but no
//! buttons to change it; logging out through the UI ends the session.
//!
//! The registry is reached as `http://localhost:18291` while the provider
//! is on `127.0.0.1`: another site, so the provider's redirect back is a
//! cross-site navigation, as with a real identity provider (the Lax
//! pre-login cookie must travel on it; the Strict session cookie is set by
//! it and used by the page's own requests). The provider's `shamal-web`
//! client must list `http://localhost:18291/oidc/callback`
//! (`SHAMAL_OIDC_WEB_REDIRECTS`, set by `scripts/test.sh`).
//!
//! Needs `SHAMAL_TEST_CHROMIUM` (the browser binary, `/usr/bin/chromium`)
//! and `SHAMAL_TEST_OIDC_ISSUER`; skipped without them unless
//! `SHAMAL_REQUIRE_SERVICES=1`.
#![allow(clippy::unwrap_used)]

mod support;

#[path = "../../../tests/support/oidc.rs"]
mod oidc;

use std::io::BufRead;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use shamal_auth::security::SecurityConfig;
use shamal_registry::model::StartRollout;
use shamal_registry::rest::session::WebClientSecret;
use support::services;
use tokio_tungstenite::tungstenite::Message;

/// The variable naming the Chromium binary.
const CHROMIUM: &str = "SHAMAL_TEST_CHROMIUM";
const PORT: u16 = 18291;
const PATIENCE: Duration = Duration::from_secs(30);

/// Chromium, killed on drop.
struct Chromium {
    child: std::process::Child,
    _profile: tempfile::TempDir,
    websocket: String,
}

impl Chromium {
    fn launch(binary: &str) -> Chromium {
        let profile = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
                "about:blank",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| {
                services::unusable(CHROMIUM, binary, format!("cannot start it: {error}"))
            });
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let stderr = child.stderr.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut said = Vec::new();
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = sender.send(Ok(url.trim().to_owned()));
                } else if said.len() < 40 {
                    said.push(line);
                }
            }
            let _ = sender.send(Err(said.join("\n")));
        });
        let websocket = match receiver.recv_timeout(PATIENCE) {
            Ok(Ok(url)) => url,
            Ok(Err(said)) => services::unusable(CHROMIUM, binary, format!("it exited: {said}")),
            Err(_) => services::unusable(CHROMIUM, binary, "no DevTools endpoint within 30 s"),
        };
        Chromium {
            child,
            _profile: profile,
            websocket,
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A DevTools protocol connection to the browser (flattened sessions: one
/// socket, a `sessionId` per page).
struct Devtools {
    socket: Socket,
    next_id: u64,
}

impl Devtools {
    async fn connect(url: &str) -> Devtools {
        let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Devtools { socket, next_id: 0 }
    }

    /// Calls `method`; its result, or the protocol's error message.
    async fn call(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.socket
            .send(Message::Text(message.to_string().into()))
            .await
            .unwrap();
        let answer = tokio::time::timeout(PATIENCE, async {
            while let Some(message) = self.socket.next().await {
                let Message::Text(text) = message.unwrap() else {
                    continue;
                };
                let value: Value = serde_json::from_str(text.as_str()).unwrap();
                if value["id"] == json!(id) {
                    return value;
                }
            }
            panic!("the browser closed the DevTools connection");
        })
        .await
        .unwrap_or_else(|_| panic!("{method}: no answer within 30 s"));
        match answer.get("error") {
            Some(error) => Err(error.to_string()),
            None => Ok(answer["result"].clone()),
        }
    }

    /// A new tab in a browser context of its own (its own cookies): the
    /// session id that addresses it.
    async fn new_page(&mut self) -> String {
        let context = self
            .call(None, "Target.createBrowserContext", json!({}))
            .await
            .unwrap();
        let target = self
            .call(
                None,
                "Target.createTarget",
                json!({"url": "about:blank", "browserContextId": context["browserContextId"]}),
            )
            .await
            .unwrap();
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await
            .unwrap();
        attached["sessionId"].as_str().unwrap().to_owned()
    }
}

/// One tab.
struct Page<'a> {
    devtools: &'a mut Devtools,
    session: String,
}

impl Page<'_> {
    async fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.devtools
            .call(Some(&self.session), method, params)
            .await
    }

    async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}))
            .await
            .unwrap();
    }

    /// The value of a JavaScript expression (awaited); `Err` while the
    /// page is navigating or when it throws.
    async fn eval(&mut self, expression: &str) -> Result<Value, String> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await?;
        if let Some(exception) = result.get("exceptionDetails") {
            return Err(exception.to_string());
        }
        Ok(result["result"]["value"].clone())
    }

    /// Waits until `expression` is true; fails naming `what` and the page.
    async fn wait_for(&mut self, what: &str, expression: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if self.eval(expression).await == Ok(json!(true)) {
                return;
            }
            if Instant::now() > deadline {
                let page = self
                    .eval("location.href + '\\n' + document.body.innerText")
                    .await;
                panic!("{what}: not within 30 s; the page: {page:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the element `selector` names, as a person would: a mouse
    /// press and release at its centre.
    async fn click(&mut self, selector: &str) {
        let quoted = json!(selector);
        let centre = self
            .eval(&format!(
                "(() => {{ const node = document.querySelector({quoted}); \
                 if (!node) return null; node.scrollIntoView({{block: 'center'}}); \
                 const box = node.getBoundingClientRect(); \
                 return [box.x + box.width / 2, box.y + box.height / 2]; }})()"
            ))
            .await
            .unwrap();
        let (x, y) = match centre.as_array() {
            Some(point) => (point[0].clone(), point[1].clone()),
            None => panic!("no element {selector} to click"),
        };
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            )
            .await
            .unwrap();
        }
    }

    /// Types `text` into the element `selector` names, replacing its value.
    async fn type_into(&mut self, selector: &str, text: &str) {
        let quoted = json!(selector);
        let focused = self
            .eval(&format!(
                "(() => {{ const node = document.querySelector({quoted}); \
                 if (!node) return false; node.focus(); node.select(); return true; }})()"
            ))
            .await;
        assert_eq!(focused, Ok(json!(true)), "no field {selector}");
        self.call("Input.insertText", json!({"text": text}))
            .await
            .unwrap();
    }

    /// From the UI's "Log in" link through the provider's login (and
    /// consent) pages back to the UI, logged in as `account`.
    async fn log_in(&mut self, base: &str, issuer: &str, account: &str) {
        self.navigate(base).await;
        self.wait_for(
            "the UI offers to log in",
            "!!document.getElementById('login') && !document.getElementById('login').hidden",
        )
        .await;
        self.click("#login").await;
        let provider = json!(issuer.trim_end_matches('/'));
        self.wait_for(
            "the provider's login page",
            &format!(
                "location.origin === {provider} && !!document.querySelector('input[name=login]')"
            ),
        )
        .await;
        self.click("input[name=login]").await;
        self.type_into("input[name=login]", account).await;
        self.click("input[name=password]").await;
        self.type_into("input[name=password]", "any password").await;
        self.click("button[type=submit]").await;
        // The consent page (first login of the account to shamal-web),
        // then back to the UI.
        let deadline = Instant::now() + PATIENCE;
        let base_origin = json!(base.trim_end_matches('/'));
        loop {
            let at = self
                .eval(&format!(
                    "location.origin === {base_origin} \
                       ? (document.getElementById('who') && document.getElementById('who').textContent ? 'ui' : 'loading') \
                       : (location.origin === {provider} && !document.querySelector('input[name=login]') \
                          && !!document.querySelector('button[type=submit]') ? 'consent' : 'elsewhere')"
                ))
                .await;
            match at.as_ref().ok().and_then(Value::as_str) {
                Some("ui") => return,
                Some("consent") => {
                    self.click("button[type=submit]").await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
            if Instant::now() > deadline {
                let page = self
                    .eval("location.href + '\\n' + document.body.innerText")
                    .await;
                panic!("{account} did not come back to the UI logged in; the page: {page:?}");
            }
        }
    }
}

async fn start(issuer: &str, dir: &std::path::Path) -> shamal_registry::RunningRegistry {
    let config = shamal_registry::RegistryConfig {
        security: SecurityConfig {
            oidc_issuer: Some(issuer.to_owned()),
            oidc_audience: Some(oidc::AUDIENCE.to_owned()),
            ..SecurityConfig::default()
        },
        oidc_web_client_secret: Some(WebClientSecret::new("shamal-web-secret")),
        public_url: Some(format!("http://localhost:{PORT}")),
        http_listen: SocketAddr::from(([127, 0, 0, 1], PORT)),
        grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: None,
        database_url: format!("sqlite://{}?mode=rwc", dir.join("registry.db").display()),
        artifact_dir: dir.join("artifacts"),
        ..Default::default()
    };
    let listeners = shamal_registry::RegistryListeners::bind(&config)
        .await
        .unwrap_or_else(|error| panic!("cannot listen on port {PORT}: {error}"));
    shamal_registry::RunningRegistry::start(config, listeners, Default::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn alice_logs_in_through_the_provider_and_shifts_a_canary_in_chromium() {
    let Some(issuer) = oidc::issuer("web UI in Chromium") else {
        return;
    };
    let Some(chromium) = services::configured(
        CHROMIUM,
        "web UI in Chromium",
        "apt-get install chromium and set SHAMAL_TEST_CHROMIUM=/usr/bin/chromium",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let running = start(&issuer, dir.path()).await;
    let registry = running.registry.clone();
    for index in 0..2 {
        let version =
            support::push(&registry, "fraud", format!("weights {index}").as_bytes()).await;
        support::mark_ready(&registry, "fraud", version).await;
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
    let base = format!("http://localhost:{PORT}/");

    let browser = Chromium::launch(&chromium);
    let mut devtools = Devtools::connect(&browser.websocket).await;

    // alice: log in, open the model, shift the canary to 35%.
    let session = devtools.new_page().await;
    let mut alice = Page {
        devtools: &mut devtools,
        session,
    };
    alice.log_in(&base, &issuer, "alice").await;
    assert_eq!(
        alice
            .eval("document.getElementById('who').textContent")
            .await,
        Ok(json!("alice (release-manager)"))
    );
    assert_eq!(
        alice
            .eval("document.getElementById('acting').hidden && !document.getElementById('logout').hidden")
            .await,
        Ok(json!(true)),
        "the 'acting as' field gives way to the session"
    );
    // The session cookie is HttpOnly: the page's script cannot read it.
    assert_eq!(
        alice
            .eval("document.cookie.includes('shamal_session')")
            .await,
        Ok(json!(false))
    );
    alice
        .wait_for(
            "the model list",
            "!!document.querySelector('nav a[data-name=fraud]')",
        )
        .await;
    alice.click("nav a[data-name=fraud]").await;
    alice
        .wait_for(
            "the rollout's controls",
            "!!document.querySelector('button[data-action=shift]')",
        )
        .await;
    for action in ["promote", "pause", "rollback"] {
        assert_eq!(
            alice
                .eval(&format!(
                    "!!document.querySelector('button[data-action={action}]')"
                ))
                .await,
            Ok(json!(true)),
            "{action}"
        );
    }
    alice.type_into("#shift-weight", "35").await;
    alice.click("button[data-action=shift]").await;
    alice
        .wait_for(
            "the shift's confirmation",
            "document.getElementById('banner').textContent.includes('shift done')",
        )
        .await;

    // The registry's state, through the API with an admin's token.
    let admin = oidc::token(&issuer, "shamal-admin").await;
    let http = reqwest::Client::new();
    let api = format!("http://127.0.0.1:{PORT}");
    let rollout: Value = http
        .get(format!("{api}/v1/models/fraud/rollout"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rollout = &rollout["rollout"];
    assert_eq!(rollout["revision"], 2, "{rollout}");
    assert_eq!(rollout["state"], "active", "{rollout}");
    assert!(
        rollout["splits"]
            .as_array()
            .unwrap()
            .contains(&json!({"version": 2, "weight": 35})),
        "{rollout}"
    );
    let history: Value = http
        .get(format!("{api}/v1/models/fraud/rollout/history"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let last = history["items"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["action"], "shift", "{last}");
    assert!(
        last["actor"].as_str().unwrap().starts_with("alice"),
        "{last}"
    );

    // Log out through the UI: the page offers to log in again.
    alice.click("#logout").await;
    alice
        .wait_for(
            "the page after logout",
            "!!document.getElementById('login') && !document.getElementById('login').hidden",
        )
        .await;

    // bob (viewer), in a browser context of his own: sees the rollout,
    // not the buttons.
    let session = devtools.new_page().await;
    let mut bob = Page {
        devtools: &mut devtools,
        session,
    };
    bob.log_in(&base, &issuer, "bob").await;
    bob.navigate(&format!("{base}#/models/fraud")).await;
    bob.wait_for(
        "the rollout for a viewer",
        "document.getElementById('view').textContent.includes('may not change this rollout')",
    )
    .await;
    assert_eq!(
        bob.eval("document.querySelectorAll('#view button').length")
            .await,
        Ok(json!(0)),
        "a viewer sees no buttons"
    );

    drop(browser);
    running.stop().await.unwrap();
}
