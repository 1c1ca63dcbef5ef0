#![allow(clippy::unwrap_used)]
//! The `shamal-cpu-worker` binary's settings layers, as an operator meets
//! them: defaults < TOML file < `SHAMAL_CPU_WORKER_*` variables < flags,
//! for a setting every worker shares (`region`) and one of its own
//! (`intra_threads`); unknown keys and bad values exit 64 naming the key;
//! `--print-config` hides the Redis password. The variables are given to a
//! child process only, so the tests' own environment is left alone.

use std::path::Path;
use std::process::{Command, Output};

fn worker(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let library = dir.join("libonnxruntime.so");
    std::fs::write(&library, b"").unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_shamal-cpu-worker"));
    // Only the variables of the case at hand.
    for (name, _) in std::env::vars() {
        if name.starts_with("SHAMAL_CPU_WORKER_") {
            command.env_remove(name);
        }
    }
    command
        .env("ORT_DYLIB_PATH", &library)
        .env("SHAMAL_CPU_WORKER_MODEL_REPOSITORY", dir)
        // No certificates here: the worker would refuse to start open.
        .env("SHAMAL_CPU_WORKER_INSECURE", "true")
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap()
}

fn printed(output: &Output) -> toml::Table {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    toml::from_str(&String::from_utf8_lossy(&output.stdout)).unwrap()
}

#[test]
fn file_then_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("worker.toml");
    std::fs::write(&file, "region = \"file\"\nintra_threads = 2\n").unwrap();
    let file = file.to_str().unwrap();
    let print = ["--print-config"];
    let with_file = ["--config", file, "--print-config"];

    let config = printed(&worker(dir.path(), &print, &[]));
    assert_eq!(config["region"].as_str(), Some("local"), "default");
    assert_eq!(config["intra_threads"].as_integer(), Some(1), "default");

    let config = printed(&worker(dir.path(), &with_file, &[]));
    assert_eq!(config["region"].as_str(), Some("file"));
    assert_eq!(config["intra_threads"].as_integer(), Some(2));

    // The file may come from the environment too.
    let config = printed(&worker(
        dir.path(),
        &print,
        &[("SHAMAL_CPU_WORKER_CONFIG", file)],
    ));
    assert_eq!(config["region"].as_str(), Some("file"));

    let env = [
        ("SHAMAL_CPU_WORKER_REGION", "env"),
        ("SHAMAL_CPU_WORKER_INTRA_THREADS", "3"),
    ];
    let config = printed(&worker(dir.path(), &with_file, &env));
    assert_eq!(config["region"].as_str(), Some("env"), "env beats file");
    assert_eq!(config["intra_threads"].as_integer(), Some(3));

    let flags = [
        "--config",
        file,
        "--region",
        "flag",
        "--intra-threads",
        "4",
        "--print-config",
    ];
    let config = printed(&worker(dir.path(), &flags, &env));
    assert_eq!(config["region"].as_str(), Some("flag"), "flag beats env");
    assert_eq!(config["intra_threads"].as_integer(), Some(4));
}

#[test]
fn bad_configurations_exit_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("worker.toml");
    for (text, named) in [
        ("regoin = \"eu\"\n", "unknown field `regoin`"),
        ("intra_thread = 2\n", "unknown field `intra_thread`"),
        ("capacity = \"six\"\n", "capacity"),
        ("intra_threads = 0\n", "intra_threads"),
    ] {
        std::fs::write(&file, text).unwrap();
        let output = worker(
            dir.path(),
            &["--config", file.to_str().unwrap(), "--print-config"],
            &[],
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{text}: {stderr}");
        assert!(
            stderr.contains("shamal-cpu-worker: invalid configuration") && stderr.contains(named),
            "{text}: {stderr}"
        );
    }
}

#[test]
fn printed_configuration_hides_the_queue_password() {
    let dir = tempfile::tempdir().unwrap();
    let output = worker(
        dir.path(),
        &["--print-config"],
        &[(
            "SHAMAL_CPU_WORKER_ASYNC_QUEUE",
            "redis://default:hunter2@redis:6379/0",
        )],
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(!stdout.contains("hunter2"), "{stdout}");
    let config = printed(&output);
    assert_eq!(
        config["async_queue"].as_str(),
        Some("redis://default:***@redis:6379/0")
    );
}
