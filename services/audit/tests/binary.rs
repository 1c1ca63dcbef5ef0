//! The `shamal-audit` binary: configuration refusals exit 64 naming the
//! key, it refuses to start open unless `--insecure`, `--print-config`
//! redacts the database password, and started insecure it serves, logs its
//! key id and key file, and stops cleanly on SIGTERM.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BINARY: &str = env!("CARGO_BIN_EXE_shamal-audit");

fn run(args: &[&str], dir: &std::path::Path) -> (Option<i32>, String) {
    let output = Command::new(BINARY)
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

#[test]
fn bad_configuration_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.toml");
    std::fs::write(&file, "retention = 30\n").unwrap();
    let (code, text) = run(&["--config", file.to_str().unwrap()], dir.path());
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("unknown field `retention`"), "{text}");
    let (code, text) = run(&["--checkpoint-every", "0", "--insecure"], dir.path());
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("checkpoint_every"), "{text}");
    // Open without --insecure: refused, naming what to configure.
    let (code, text) = run(&[], dir.path());
    assert_eq!(code, Some(64), "{text}");
    assert!(
        text.contains("tls_cert") && text.contains("--insecure"),
        "{text}"
    );
    // Nothing was created by the refusals.
    assert!(!dir.path().join(".shamal").exists());
}

#[test]
fn print_config_shows_defaults_and_redacts_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let (code, text) = run(
        &[
            "--print-config",
            "--database-url",
            "postgres://audit:hunter2@db:5432/audit",
        ],
        dir.path(),
    );
    assert_eq!(code, Some(0), "{text}");
    for expected in [
        "grpc_listen = \"127.0.0.1:8301\"",
        "metrics_listen = \"127.0.0.1:8302\"",
        "database_url = \"postgres://audit:***@db:5432/audit\"",
        "signing_key_file = \".shamal/audit-signing-key.pem\"",
        "checkpoint_every = 1000",
        "checkpoint_interval_s = 10",
        "retention_days = 0",
        "[security]",
    ] {
        assert!(text.contains(expected), "{expected} missing: {text}");
    }
    assert!(!text.contains("hunter2"), "{text}");
}

#[test]
fn starts_insecure_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BINARY)
        .args([
            "--insecure",
            "--grpc-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut log = Vec::new();
    let seen = |log: &[String], text: &str| log.iter().any(|line| line.contains(text));
    while !["audit service listening", "key_id", "INSECURE"]
        .iter()
        .all(|text| seen(&log, text))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match receiver.recv_timeout(left) {
            Ok(line) => log.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("did not start: {log:#?}");
            }
        }
    }
    let text = log.join("\n");
    assert!(text.contains("audit-signing-key.pem"), "{text}");
    // The port it really bound, not the 0 it was given.
    assert!(!text.contains("127.0.0.1:0 "), "{text}");
    // Its default files, in the working directory's .shamal.
    assert!(dir.path().join(".shamal/audit.db").exists());
    let key = dir.path().join(".shamal/audit-signing-key.pem");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    // Let the runtime poll its signal handler in (registered as it starts).
    std::thread::sleep(Duration::from_millis(300));
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
