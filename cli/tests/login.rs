//! People's authentication in the `shamal` binary, against the real
//! OpenID provider the test command starts (`scripts/ensure-oidc.sh`):
//! `whoami` with `SHAMAL_TOKEN`, `login --device` and `login --no-browser`
//! (authorization code + PKCE through the loopback redirect) with the
//! provider's pages driven by a scripted browser, the stored login's
//! refresh, and the registry commands against a registry with OIDC on
//! (401 and 403 exit codes and messages).
#![allow(clippy::unwrap_used)]

#[path = "../../tests/support/services.rs"]
mod services;

#[path = "../../tests/support/oidc.rs"]
mod oidc;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use shamal_auth::security::SecurityConfig;

/// A `shamal` command with its own config directory and no token, browser
/// or registry from the environment.
fn command(config: &Path, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_shamal"));
    command
        .args(args)
        .env("XDG_CONFIG_HOME", config)
        .env("HOME", config)
        .env("RUST_LOG", "warn")
        .env("SHAMAL_ACTOR", "tester")
        .env_remove("SHAMAL_TOKEN")
        .env_remove("SHAMAL_REGISTRY_URL")
        .env_remove("SHAMAL_OIDC_ISSUER")
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY");
    command
}

async fn shamal(config: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = command(config, args);
    for (name, value) in envs {
        command.env(name, value);
    }
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "not JSON ({error}): {} / {}",
            stdout(output),
            stderr(output)
        )
    })
}

fn credentials_file(config: &Path) -> PathBuf {
    config.join("shamal").join("credentials.json")
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Starts `shamal login ARGS` in the background; its stderr lines come
/// through the channel.
fn start_login(config: &Path, args: &[&str]) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = command(config, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    (child, receiver)
}

/// The first stderr line for which `pick` gives something (30 s at most).
fn wait_for_line(
    lines: &std::sync::mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    pick: impl Fn(&str) -> Option<String>,
) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let found = pick(&line);
                seen.push(line);
                if let Some(found) = found {
                    return found;
                }
            }
            Err(_) => panic!("the login printed nothing expected: {seen:#?}"),
        }
    }
}

/// Waits for the background login to exit (it polls the provider).
async fn finish_login(mut child: Child, seen: Vec<String>) -> Output {
    let output = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        code(&output),
        0,
        "login failed: {seen:#?} {}",
        stderr(&output)
    );
    output
}

/// A scripted browser: follows redirects by hand, keeps cookies (by name,
/// whatever their path: one provider on loopback), and submits the first
/// form of a page with its hidden fields plus the given ones.
struct Browser {
    http: reqwest::Client,
    cookies: BTreeMap<String, String>,
}

struct Page {
    url: reqwest::Url,
    status: u16,
    html: String,
}

impl Browser {
    fn new() -> Browser {
        Browser {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: BTreeMap::new(),
        }
    }

    async fn get(&mut self, url: &str) -> Page {
        self.go(reqwest::Url::parse(url).unwrap(), None).await
    }

    async fn go(&mut self, mut url: reqwest::Url, mut form: Option<Vec<(String, String)>>) -> Page {
        for _ in 0..20 {
            let mut request = match form.take() {
                Some(fields) => self.http.post(url.clone()).form_fields(&fields),
                None => self.http.get(url.clone()),
            };
            if !self.cookies.is_empty() {
                let cookie = self
                    .cookies
                    .iter()
                    .map(|(name, value)| format!("{name}={value}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                request = request.header("cookie", cookie);
            }
            let response = request.send().await.unwrap();
            for set in response.headers().get_all("set-cookie") {
                let set = set.to_str().unwrap();
                let pair = set.split(';').next().unwrap();
                let (name, value) = pair.split_once('=').unwrap();
                let cleared = value.is_empty() || set.contains("1970");
                if cleared {
                    self.cookies.remove(name.trim());
                } else {
                    self.cookies
                        .insert(name.trim().to_owned(), value.trim().to_owned());
                }
            }
            if response.status().is_redirection() {
                let location = response.headers()["location"].to_str().unwrap();
                url = url.join(location).unwrap();
                continue;
            }
            let status = response.status().as_u16();
            let html = response.text().await.unwrap();
            return Page { url, status, html };
        }
        panic!("too many redirects at {url}");
    }

    /// Submits the page's first form: its hidden inputs, then `fields`.
    async fn submit(&mut self, page: &Page, fields: &[(&str, &str)]) -> Page {
        let start = page
            .html
            .find("<form")
            .unwrap_or_else(|| panic!("no form at {}: {}", page.url, page.html));
        let form_tag = &page.html[start..start + page.html[start..].find('>').unwrap()];
        let action = attribute(form_tag, "action").unwrap_or_else(|| page.url.to_string());
        let end = page.html[start..]
            .find("</form>")
            .map_or(page.html.len(), |end| start + end);
        let mut values: Vec<(String, String)> = Vec::new();
        let mut rest = &page.html[start..end];
        while let Some(at) = rest.find("<input") {
            let tag_end = rest[at..].find('>').unwrap();
            let tag = &rest[at..at + tag_end];
            if attribute(tag, "type").as_deref() == Some("hidden")
                && let (Some(name), Some(value)) = (attribute(tag, "name"), attribute(tag, "value"))
            {
                values.push((name, value));
            }
            rest = &rest[at + tag_end..];
        }
        for (name, value) in fields {
            values.retain(|(existing, _)| existing != name);
            values.push(((*name).to_owned(), (*value).to_owned()));
        }
        let url = page.url.join(&action).unwrap();
        self.go(url, Some(values)).await
    }
}

trait FormFields {
    fn form_fields(self, fields: &[(String, String)]) -> Self;
}

impl FormFields for reqwest::RequestBuilder {
    fn form_fields(self, fields: &[(String, String)]) -> Self {
        let body = fields
            .iter()
            .map(|(name, value)| format!("{}={}", encode(name), encode(value)))
            .collect::<Vec<_>>()
            .join("&");
        self.header("content-type", "application/x-www-form-urlencoded")
            .body(body)
    }
}

fn encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// An attribute's value in a tag (`name="value"`).
fn attribute(tag: &str, name: &str) -> Option<String> {
    let needle = format!(" {name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let end = tag[start..].find('"')?;
    Some(tag[start..start + end].replace("&amp;", "&"))
}

/// Logs in as `account` on the provider's development pages (login, then
/// consent), from a page showing its login form.
async fn log_in_as(browser: &mut Browser, page: Page, account: &str) -> Page {
    assert!(
        page.html.contains("name=\"login\""),
        "not the login page ({}): {}",
        page.url,
        page.html
    );
    let page = browser
        .submit(&page, &[("login", account), ("password", "any")])
        .await;
    if page.html.contains("value=\"consent\"") {
        browser.submit(&page, &[]).await
    } else {
        page
    }
}

async fn start_registry(issuer: &str, dir: &Path) -> shamal_registry::RunningRegistry {
    let config = shamal_registry::RegistryConfig {
        security: SecurityConfig {
            oidc_issuer: Some(issuer.to_owned()),
            oidc_audience: Some(oidc::AUDIENCE.to_owned()),
            ..SecurityConfig::default()
        },
        http_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        grpc_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: None,
        database_url: format!("sqlite://{}?mode=rwc", dir.join("registry.db").display()),
        artifact_dir: dir.join("artifacts"),
        ..Default::default()
    };
    let listeners = shamal_registry::RegistryListeners::bind(&config)
        .await
        .unwrap();
    shamal_registry::RunningRegistry::start(config, listeners, Default::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoami_shows_the_subject_tenant_and_roles_of_shamal_token() {
    let Some(issuer) = oidc::issuer("shamal whoami with SHAMAL_TOKEN") else {
        return;
    };
    let config = tempfile::tempdir().unwrap();
    let token = oidc::token(&issuer, "shamal-data-scientist").await;
    let output = shamal(
        config.path(),
        &["whoami", "--output", "json"],
        &[("SHAMAL_TOKEN", &token)],
    )
    .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let me = json(&output);
    assert_eq!(me["subject"], "shamal-data-scientist", "{me}");
    assert_eq!(me["client_id"], "shamal-data-scientist");
    assert_eq!(me["tenant"], "acme");
    assert_eq!(me["roles"], serde_json::json!(["data-scientist"]));
    assert_eq!(me["groups"], serde_json::json!(["ml"]));
    assert_eq!(me["issuer"], issuer.as_str());
    assert_eq!(me["expired"], false);
    assert_eq!(me["source"], "--token / SHAMAL_TOKEN");

    // The table, via --token; the token itself is never printed.
    let output = shamal(config.path(), &["whoami", "--token", &token], &[]).await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    for expected in [
        "subject:",
        "shamal-data-scientist",
        "tenant:",
        "acme",
        "roles:",
        "data-scientist",
        "expires:",
    ] {
        assert!(text.contains(expected), "{expected}: {text}");
    }
    assert!(!text.contains(&token) && !stderr(&output).contains(&token));

    // Nobody: says how to log in.
    let output = shamal(config.path(), &["whoami"], &[]).await;
    assert_eq!(code(&output), 5, "{}", stdout(&output));
    assert!(
        stderr(&output).contains("shamal login"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_login_stores_a_private_token_that_is_refreshed_and_used() {
    let Some(issuer) = oidc::issuer("shamal login --device") else {
        return;
    };
    let config = tempfile::tempdir().unwrap();
    let (child, lines) = start_login(config.path(), &["login", "--device", "--issuer", &issuer]);
    let mut seen = Vec::new();
    let verification = wait_for_line(&lines, &mut seen, |line| {
        let line = line.trim();
        line.starts_with("http").then(|| line.to_owned())
    });
    let user_code = wait_for_line(&lines, &mut seen, |line| {
        line.split_once("enter the code: ")
            .map(|(_, code)| code.trim().to_owned())
    });

    // The provider's pages: the code, its confirmation, login, consent.
    let mut browser = Browser::new();
    let page = browser.get(&verification).await;
    let page = browser.submit(&page, &[("user_code", &user_code)]).await;
    assert!(page.html.contains(&user_code), "{}", page.html);
    let page = browser.submit(&page, &[("confirm", "yes")]).await;
    let page = log_in_as(&mut browser, page, "alice").await;
    assert!(
        page.html.contains("Sign-in Success"),
        "{}: {}",
        page.status,
        page.html
    );

    let output = finish_login(child, seen).await;
    assert!(
        stdout(&output).contains("logged in as alice"),
        "{}",
        stdout(&output)
    );
    let file = credentials_file(config.path());
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(file.parent().unwrap()), 0o700);
    let stored: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(stored["issuer"], issuer.as_str());
    assert_eq!(stored["client_id"], "shamal-cli");
    assert!(
        stored["refresh_token"].is_string(),
        "offline_access: {stored}"
    );
    assert!(stored["id_token"].is_string());

    let output = shamal(config.path(), &["whoami", "--output", "json"], &[]).await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let me = json(&output);
    assert_eq!(me["subject"], "alice", "{me}");
    assert_eq!(me["client_id"], "shamal-cli");
    assert_eq!(me["tenant"], "acme");
    assert_eq!(me["roles"], serde_json::json!(["release-manager"]));
    assert!(
        me["source"].as_str().unwrap().starts_with("shamal login"),
        "{me}"
    );

    // The registry commands send the stored token (release-manager may
    // read models).
    let dir = tempfile::tempdir().unwrap();
    let registry = start_registry(&issuer, dir.path()).await;
    let url = format!("http://{}", registry.http_address);
    let output = shamal(
        config.path(),
        &["model", "list", "--output", "json"],
        &[("SHAMAL_REGISTRY_URL", &url)],
    )
    .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));

    // An expired token is refreshed with the stored refresh token, and the
    // file rewritten (still private).
    let mut expired = stored.clone();
    expired["expires_at"] = serde_json::json!(1);
    std::fs::write(&file, serde_json::to_vec(&expired).unwrap()).unwrap();
    let output = shamal(
        config.path(),
        &["model", "list", "--output", "json"],
        &[("SHAMAL_REGISTRY_URL", &url)],
    )
    .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let refreshed: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_ne!(refreshed["access_token"], stored["access_token"]);
    assert!(refreshed["expires_at"].as_u64().unwrap() > 1_000_000_000);
    assert!(refreshed["refresh_token"].is_string());
    assert_eq!(mode(&file), 0o600);

    // Expired with a refresh token the provider does not know: a clear
    // refusal, not a request with a dead token.
    let mut dead = refreshed.clone();
    dead["expires_at"] = serde_json::json!(1);
    dead["refresh_token"] = serde_json::json!("not-a-refresh-token");
    std::fs::write(&file, serde_json::to_vec(&dead).unwrap()).unwrap();
    let output = shamal(config.path(), &["whoami"], &[]).await;
    assert_eq!(code(&output), 5, "{}", stdout(&output));
    assert!(
        stderr(&output).contains("shamal login"),
        "{}",
        stderr(&output)
    );

    let output = shamal(config.path(), &["logout"], &[]).await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(!file.exists());
    registry.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_login_takes_the_code_through_the_loopback_redirect() {
    let Some(issuer) = oidc::issuer("shamal login --no-browser") else {
        return;
    };
    let config = tempfile::tempdir().unwrap();
    let (child, lines) = start_login(
        config.path(),
        &["login", "--no-browser", "--issuer", &issuer],
    );
    let mut seen = Vec::new();
    let url = wait_for_line(&lines, &mut seen, |line| {
        let line = line.trim();
        (line.starts_with("http") && line.contains("code_challenge_method=S256"))
            .then(|| line.to_owned())
    });
    assert!(
        url.contains("redirect_uri=http%3A%2F%2F127.0.0.1%3A"),
        "{url}"
    );

    let mut browser = Browser::new();
    let page = browser.get(&url).await;
    let page = log_in_as(&mut browser, page, "bob").await;
    // The last redirect went to the CLI's loopback listener.
    assert_eq!(page.url.host_str(), Some("127.0.0.1"));
    assert_eq!(page.url.path(), "/callback");
    assert_eq!(page.status, 200, "{}", page.html);
    assert!(page.html.contains("Logged in"), "{}", page.html);

    let output = finish_login(child, seen).await;
    assert!(
        stdout(&output).contains("logged in as bob"),
        "{}",
        stdout(&output)
    );
    assert_eq!(mode(&credentials_file(config.path())), 0o600);
    let output = shamal(config.path(), &["whoami", "--output", "json"], &[]).await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let me = json(&output);
    assert_eq!(me["subject"], "bob", "{me}");
    assert_eq!(me["roles"], serde_json::json!(["viewer"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_commands_send_the_token_and_explain_401_and_403() {
    let Some(issuer) = oidc::issuer("shamal model commands with OIDC on") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let registry = start_registry(&issuer, dir.path()).await;
    let url = format!("http://{}", registry.http_address);
    let model = dir.path().join("fraud.onnx");
    std::fs::write(&model, b"model bytes ".repeat(10_000)).unwrap();
    let model = model.display().to_string();
    let viewer = oidc::token(&issuer, "shamal-viewer").await;
    let scientist = oidc::token(&issuer, "shamal-data-scientist").await;

    // No token: 401, and how to log in.
    let output = shamal(
        config.path(),
        &["model", "list"],
        &[("SHAMAL_REGISTRY_URL", &url)],
    )
    .await;
    assert_eq!(code(&output), 5, "{}", stdout(&output));
    let text = stderr(&output);
    assert!(
        text.contains("not logged in or token expired")
            && text.contains("shamal login --issuer URL")
            && text.contains("SHAMAL_TOKEN"),
        "{text}"
    );

    // A viewer reads.
    let output = shamal(
        config.path(),
        &["model", "list"],
        &[("SHAMAL_REGISTRY_URL", &url), ("SHAMAL_TOKEN", &viewer)],
    )
    .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));

    // ... but may not push: 403 naming the permission.
    let output = shamal(
        config.path(),
        &["model", "push", &model, "--name", "fraud"],
        &[("SHAMAL_REGISTRY_URL", &url), ("SHAMAL_TOKEN", &viewer)],
    )
    .await;
    assert_eq!(code(&output), 6, "{} {}", stdout(&output), stderr(&output));
    let text = stderr(&output);
    assert!(
        text.contains("permission denied") && text.contains("models:write"),
        "{text}"
    );
    assert!(!text.contains(&viewer));

    // A data scientist pushes (the artifact streamed with the token, and
    // no x-shamal-actor, which the registry refuses with auth on); the
    // change is the token subject's.
    let output = shamal(
        config.path(),
        &["model", "push", &model, "--name", "fraud"],
        &[("SHAMAL_REGISTRY_URL", &url), ("SHAMAL_TOKEN", &scientist)],
    )
    .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let output = shamal(
        config.path(),
        &["model", "show", "fraud", "--output", "json"],
        &[("SHAMAL_REGISTRY_URL", &url), ("SHAMAL_TOKEN", &viewer)],
    )
    .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(
        stdout(&output).contains("shamal-data-scientist"),
        "{}",
        stdout(&output)
    );

    // A token the registry cannot verify: 401 with its reason.
    let output = shamal(
        config.path(),
        &["model", "list", "--token", "e30.e30.c2ln"],
        &[("SHAMAL_REGISTRY_URL", &url)],
    )
    .await;
    assert_eq!(code(&output), 5, "{}", stdout(&output));
    assert!(
        stderr(&output).contains("the registry said"),
        "{}",
        stderr(&output)
    );
    registry.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_goes_to_an_https_registry_verified_with_ssl_cert_file() {
    let Some(issuer) = oidc::issuer("shamal model list over https") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let pki = shamal_tls::init_dev_pki(
        &dir.path().join("pki"),
        &shamal_tls::DevPkiOptions {
            services: vec![shamal_tls::DevService::new("registry")],
            ..Default::default()
        },
    )
    .unwrap();
    let files = pki.files("registry");
    let registry_config = shamal_registry::RegistryConfig {
        security: SecurityConfig {
            oidc_issuer: Some(issuer.clone()),
            oidc_audience: Some(oidc::AUDIENCE.to_owned()),
            tls_cert: Some(files.cert.clone()),
            tls_key: Some(files.key.clone()),
            tls_ca: Some(files.ca.clone()),
            ..SecurityConfig::default()
        },
        http_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        grpc_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_listen: None,
        database_url: format!("sqlite://{}?mode=rwc", dir.path().join("r.db").display()),
        artifact_dir: dir.path().join("artifacts"),
        ..Default::default()
    };
    let listeners = shamal_registry::RegistryListeners::bind(&registry_config)
        .await
        .unwrap();
    let registry =
        shamal_registry::RunningRegistry::start(registry_config, listeners, Default::default())
            .await
            .unwrap();
    let url = format!("https://{}", registry.http_address);
    let viewer = oidc::token(&issuer, "shamal-viewer").await;
    let ca = files.ca.display().to_string();
    let output = shamal(
        config.path(),
        &["model", "list", "--output", "json"],
        &[
            ("SHAMAL_REGISTRY_URL", &url),
            ("SHAMAL_TOKEN", &viewer),
            ("SSL_CERT_FILE", &ca),
        ],
    )
    .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(
        !stderr(&output).contains("plain http"),
        "{}",
        stderr(&output)
    );
    // Another CA does not vouch for the registry's certificate.
    let other = shamal_tls::init_dev_pki(&dir.path().join("other"), &Default::default()).unwrap();
    let other_ca = other.files("registry").ca.display().to_string();
    let output = shamal(
        config.path(),
        &["model", "list"],
        &[
            ("SHAMAL_REGISTRY_URL", &url),
            ("SHAMAL_TOKEN", &viewer),
            ("SSL_CERT_FILE", &other_ca),
        ],
    )
    .await;
    assert_eq!(code(&output), 1, "{}", stdout(&output));
    assert!(
        stderr(&output).contains("cannot reach the registry"),
        "{}",
        stderr(&output)
    );
    registry.stop().await.unwrap();
}
