//! When a test may be skipped: the one policy of every Rust test that needs
//! something Cargo does not provide (a Redis, PostgreSQL or S3-compatible
//! server, the `redis-server` binary, the real all-MiniLM-L6-v2 weights).
//!
//! - The variable that names it (`SHAMAL_TEST_REDIS_URL`,
//!   `SHAMAL_TEST_POSTGRES_URL`, `SHAMAL_TEST_S3_ENDPOINT` from
//!   `scripts/ensure-s3.sh`, `SHAMAL_MINILM_DIR`) is set: the test uses
//!   it, and fails when it is unusable (a server that does not answer, a
//!   directory without the files).
//! - The variable is unset: the test is skipped, with a message on the
//!   terminal's stderr that the test harness does not capture, unless
//!   `SHAMAL_REQUIRE_SERVICES=1`, which makes it fail instead.
//!
//! `scripts/test.sh` (hence CI) sets every variable and
//! `SHAMAL_REQUIRE_SERVICES=1`, so there a missing service fails the run.
//! A bare `cargo test` on a machine without them passes, saying loudly
//! what it skipped. `docs/testing.md` describes it for people.
//!
//! Standard library only: each test harness includes this file with
//! `#[path = ".../tests/support/services.rs"] mod services;`, since the
//! crates' test dependencies differ and no crate is shared by all of them.
#![allow(dead_code)]

use std::fmt::Display;
use std::io::Write;
use std::path::PathBuf;

/// Set to `1` (or `true`), every test that needs an outside service fails
/// when it is not configured, instead of being skipped.
pub const REQUIRE: &str = "SHAMAL_REQUIRE_SERVICES";

/// Whether [`REQUIRE`] is set to `1` or `true`.
pub fn required() -> bool {
    std::env::var(REQUIRE).is_ok_and(|value| value == "1" || value == "true")
}

/// The value of `variable` when it is set (and not empty). Otherwise fails
/// the test under [`REQUIRE`], or returns `None` after saying, uncaptured,
/// that `test` is skipped; `remedy` says how to provide the service.
pub fn configured(variable: &str, test: &str, remedy: &str) -> Option<String> {
    match std::env::var(variable) {
        Ok(value) if !value.is_empty() => Some(value),
        _ => {
            absent(test, &format!("{variable} is not set"), remedy);
            None
        }
    }
}

/// Something `test` needs is absent (`why`): fails the test under
/// [`REQUIRE`], else says, uncaptured, that it is skipped.
pub fn absent(test: &str, why: &str, remedy: &str) {
    assert!(
        !required(),
        "{test}: {why}, and {REQUIRE}=1 forbids skipping it; {remedy}"
    );
    // Straight to the process's stderr: libtest captures `eprintln!` and
    // shows it only for failed tests, which would hide the skip.
    // libtest names each test's thread after the test.
    let name = std::thread::current().name().unwrap_or("?").to_owned();
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!!! SKIPPED {name} ({test}): {why}; {remedy} !!!!!!\n"
    );
}

/// Fails the test: the service that `variable` names (`value`) is
/// unusable. A configured service is never skipped.
pub fn unusable(variable: &str, value: &str, error: impl Display) -> ! {
    panic!(
        "{variable}={value} is unusable ({error}); fix it or unset {variable} \
         (see tests/support/services.rs)"
    )
}

/// The `redis-server` binary (on PATH, or Debian's /usr/bin/redis-server)
/// for the tests that start, kill and restart a private server. When it is
/// missing: fails under [`REQUIRE`], else skips `test` (returns `None`).
pub fn redis_server(test: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("redis-server"))
            .find(|path| path.is_file())
    });
    let found = on_path.or_else(|| {
        let debian = PathBuf::from("/usr/bin/redis-server");
        debian.is_file().then_some(debian)
    });
    if found.is_none() {
        absent(
            test,
            "redis-server is not on PATH or at /usr/bin/redis-server",
            "scripts/ensure-redis.sh installs it",
        );
    }
    found
}
