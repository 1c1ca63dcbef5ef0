//! The `shamal` binary's registry commands against a registry running in
//! this process: push, list, show, rollouts, exit codes.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use shamal_registry::RunningRegistry;
use shamal_registry::model::WorkerInfo;

struct Fixture {
    running: RunningRegistry,
    url: String,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let running =
            RunningRegistry::start_local("sqlite::memory:", &dir.path().join("artifacts"))
                .await
                .unwrap();
        let url = format!("http://{}", running.http_address);
        Fixture { running, url, dir }
    }

    /// Runs `shamal <args>` against the registry.
    fn shamal(&self, args: &[&str]) -> impl std::future::Future<Output = Output> + 'static {
        let url = self.url.clone();
        let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
        let run = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_shamal"))
                .args(&args)
                .env("SHAMAL_REGISTRY_URL", url)
                .env("SHAMAL_ACTOR", "tester")
                .env("RUST_LOG", "warn")
                .output()
                .unwrap()
        });
        async move { run.await.unwrap() }
    }

    fn file(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path.display().to_string()
    }

    async fn mark(&self, model: &str, version: u64, state: &str) {
        let registry = &self.running.registry;
        registry
            .register_worker(WorkerInfo {
                id: "worker-1".to_owned(),
                address: "127.0.0.1:9".to_owned(),
                region: "local".to_owned(),
                formats: vec!["onnx".to_owned()],
                device: "cpu".to_owned(),
                last_seen: 0,
            })
            .await
            .unwrap();
        registry
            .report_placement(
                "worker-1",
                model,
                version,
                state,
                "cannot load: bad graph",
                "",
            )
            .await
            .unwrap();
    }
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
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("not JSON ({error}): {}", stdout(output)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_list_and_show() {
    let fixture = Fixture::start().await;
    let file = fixture.file("fraud.onnx", &b"model bytes ".repeat(100_000));
    let output = fixture
        .shamal(&["model", "push", &file, "--name", "fraud"])
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(
        stdout(&output).contains("registered fraud version 1"),
        "{}",
        stdout(&output)
    );

    // Same bytes again: not uploaded twice, still a new version.
    let output = fixture
        .shamal(&[
            "model",
            "push",
            &file,
            "--name",
            "fraud",
            "--metadata",
            "team=risk",
            "--metadata",
            "ticket=ML-42",
            "--training-run-id",
            "run-7",
            "--output",
            "json",
        ])
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let version = json(&output);
    assert_eq!(version["version"], 2);
    assert_eq!(version["metadata"]["team"], "risk");
    assert_eq!(version["metadata"]["ticket"], "ML-42");
    assert_eq!(version["lineage"]["training_run_id"], "run-7");
    assert_eq!(version["created_by"], "tester");
    assert_eq!(version["artifact"]["size_bytes"], 1_200_000);
    let stored = fixture
        .running
        .registry
        .get_version("fraud", 1)
        .await
        .unwrap();
    assert_eq!(stored.artifact.sha256, version["artifact"]["sha256"]);

    let output = fixture.shamal(&["model", "list"]).await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.starts_with("NAME"), "{text}");
    assert!(
        text.lines()
            .any(|line| line.starts_with("fraud ") && line.contains(" 2 ")),
        "{text}"
    );
    let output = fixture.shamal(&["model", "list", "--output", "json"]).await;
    assert_eq!(json(&output)["items"][0]["name"], "fraud");

    let output = fixture.shamal(&["model", "show", "fraud"]).await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("rollout:"), "{text}");
    assert!(text.contains("VERSION"), "{text}");
    assert!(text.contains("registered"), "{text}");
    let output = fixture
        .shamal(&["model", "show", "fraud", "--version", "2"])
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("training_run_id:"), "{text}");
    assert!(text.contains("ML-42"), "{text}");

    // Exit codes: not found 4, usage 2, other 1.
    let output = fixture.shamal(&["model", "show", "nope"]).await;
    assert_eq!(code(&output), 4, "{}", stderr(&output));
    assert!(stderr(&output).contains("not_found"), "{}", stderr(&output));
    let output = fixture
        .shamal(&["model", "show", "fraud", "--version", "9"])
        .await;
    assert_eq!(code(&output), 4);
    let weird = fixture.file("model.bin", b"x");
    let output = fixture
        .shamal(&["model", "push", &weird, "--name", "x"])
        .await;
    assert_eq!(code(&output), 2, "{}", stderr(&output));
    assert!(stderr(&output).contains("--format"), "{}", stderr(&output));
    let output = fixture.shamal(&["model", "push", "--name", "x"]).await;
    assert_eq!(code(&output), 2);
    let output = fixture
        .shamal(&[
            "model",
            "push",
            &weird,
            "--name",
            "bad name!",
            "--format",
            "onnx",
        ])
        .await;
    assert_eq!(code(&output), 1);
    assert!(
        stderr(&output).contains("field name"),
        "{}",
        stderr(&output)
    );
    let missing = fixture.dir.path().join("missing.onnx");
    let output = fixture
        .shamal(&[
            "model",
            "push",
            &missing.display().to_string(),
            "--name",
            "x",
        ])
        .await;
    assert_eq!(code(&output), 1);
    let output = fixture
        .shamal(&["model", "list", "--registry", "http://127.0.0.1:9"])
        .await;
    assert_eq!(code(&output), 1);
    assert!(
        stderr(&output).contains("cannot reach"),
        "{}",
        stderr(&output)
    );

    fixture.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_waits_for_a_worker() {
    let fixture = Fixture::start().await;
    let file = fixture.file("m.onnx", b"weights");
    let bad = fixture.file("bad.onnx", b"broken weights");
    let registry = fixture.running.registry.clone();
    let push = fixture.shamal(&[
        "model",
        "push",
        &file,
        "--name",
        "m",
        "--wait",
        "--wait-timeout",
        "30",
    ]);
    let worker = async {
        for _ in 0..200 {
            if registry.get_version("m", 1).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(300)).await;
                fixture.mark("m", 1, "ready").await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the version never appeared");
    };
    let (output, ()) = tokio::join!(push, worker);
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(
        stdout(&output).contains("m version 1 is ready"),
        "{}",
        stdout(&output)
    );

    let push = fixture.shamal(&["model", "push", &bad, "--name", "m", "--wait"]);
    let worker = async {
        for _ in 0..200 {
            if registry.get_version("m", 2).await.is_ok() {
                fixture.mark("m", 2, "failed").await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the version never appeared");
    };
    let (output, ()) = tokio::join!(push, worker);
    assert_eq!(code(&output), 1, "{}", stderr(&output));
    assert!(stderr(&output).contains("failed"), "{}", stderr(&output));
    fixture.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_and_conflicts() {
    let fixture = Fixture::start().await;
    for (index, bytes) in [b"one".as_slice(), b"two".as_slice()].iter().enumerate() {
        let file = fixture.file(&format!("v{index}.onnx"), bytes);
        let output = fixture
            .shamal(&["model", "push", &file, "--name", "fraud"])
            .await;
        assert_eq!(code(&output), 0, "{}", stderr(&output));
        fixture.mark("fraud", index as u64 + 1, "ready").await;
    }
    let output = fixture.shamal(&["rollout", "status", "fraud"]).await;
    assert_eq!(code(&output), 4);

    let output = fixture
        .shamal(&[
            "rollout",
            "start",
            "fraud",
            "--version",
            "2",
            "--weight",
            "10",
            "--stable",
            "1",
            "--max-error-rate",
            "0.05",
        ])
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("revision:"), "{text}");
    assert!(text.contains("v2:10%"), "{text}");

    let output = fixture
        .shamal(&["rollout", "shift", "fraud", "--weight", "50"])
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    // A writer that saw revision 1: conflict, exit 3.
    let output = fixture
        .shamal(&[
            "rollout",
            "shift",
            "fraud",
            "--weight",
            "80",
            "--revision",
            "1",
        ])
        .await;
    assert_eq!(code(&output), 3, "{}", stderr(&output));
    assert!(stderr(&output).contains("conflict"), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("revision 2"),
        "{}",
        stderr(&output)
    );

    let output = fixture
        .shamal(&["rollout", "status", "fraud", "--output", "json"])
        .await;
    assert_eq!(code(&output), 0);
    let status = json(&output);
    assert_eq!(status["rollout"]["revision"], 2);
    assert_eq!(status["rollout"]["guard_rails"]["max_error_rate"], 0.05);

    for command in ["pause", "resume"] {
        let output = fixture.shamal(&["rollout", command, "fraud"]).await;
        assert_eq!(code(&output), 0, "{command}: {}", stderr(&output));
    }
    let output = fixture.shamal(&["rollout", "resume", "fraud"]).await;
    assert_eq!(code(&output), 1, "resuming an active rollout is refused");
    let output = fixture.shamal(&["rollout", "promote", "fraud"]).await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(stdout(&output).contains("promoted"), "{}", stdout(&output));
    let output = fixture
        .shamal(&["rollout", "rollback", "fraud", "--reason", "too late"])
        .await;
    assert_eq!(code(&output), 1, "nothing in progress to roll back");

    let output = fixture.shamal(&["rollout", "history", "fraud"]).await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    let actions: Vec<&str> = text
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(1))
        .collect();
    assert_eq!(
        actions,
        ["start", "shift", "pause", "resume", "promote"],
        "{text}"
    );
    let output = fixture.shamal(&["model", "show", "fraud"]).await;
    assert!(
        stdout(&output).contains("production=v2"),
        "{}",
        stdout(&output)
    );

    let output = fixture
        .shamal(&["rollout", "shift", "nope", "--weight", "5"])
        .await;
    assert_eq!(code(&output), 4, "{}", stderr(&output));
    let output = fixture
        .shamal(&["rollout", "shift", "fraud", "--weight", "101"])
        .await;
    assert_eq!(code(&output), 2);
    fixture.running.stop().await.unwrap();
}

#[test]
fn help_lists_the_registry_commands() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_shamal"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("model") && text.contains("rollout"), "{text}");
    assert!(
        text.contains("workers") && text.contains("residency") && text.contains("placement"),
        "{text}"
    );
    assert!(Path::new(env!("CARGO_BIN_EXE_shamal")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_residency_commands() {
    let fixture = Fixture::start().await;
    let registry = fixture.running.registry.clone();

    // Workers.
    let output = fixture.shamal(&["workers", "list"]).await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(stdout(&output).contains("no workers registered"));
    for (id, device) in [("cpu-1", "cpu"), ("gpu-1", "cuda")] {
        registry
            .register_member(
                WorkerInfo {
                    id: id.to_owned(),
                    address: format!("{id}.internal:8101"),
                    region: "eu-west".to_owned(),
                    formats: vec!["onnx".to_owned()],
                    device: device.to_owned(),
                    last_seen: 0,
                },
                32,
            )
            .await
            .unwrap();
    }
    registry
        .deregister_worker("gpu-1", false, "SIGTERM")
        .await
        .unwrap();
    let output = fixture.shamal(&["workers", "list"]).await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.starts_with("ID"), "{text}");
    assert!(text.contains("LAST HEARTBEAT"), "{text}");
    let cpu = text.lines().find(|line| line.starts_with("cpu-1")).unwrap();
    assert!(
        cpu.contains("cpu-1.internal:8101") && cpu.contains("eu-west") && cpu.contains(" 32 "),
        "{cpu}"
    );
    assert!(cpu.contains("serving"), "{cpu}");
    let gpu = text.lines().find(|line| line.starts_with("gpu-1")).unwrap();
    assert!(gpu.contains("draining") && gpu.contains("SIGTERM"), "{gpu}");
    registry.deregister_worker("gpu-1", true, "").await.unwrap();
    let output = fixture
        .shamal(&["workers", "list", "--output", "json"])
        .await;
    let listed = json(&output);
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert_eq!(listed["items"][0]["id"], "cpu-1");
    assert_eq!(listed["items"][0]["capacity"], 32);
    let output = fixture
        .shamal(&["workers", "list", "--all", "--output", "json"])
        .await;
    let everyone = json(&output);
    assert_eq!(everyone["items"][1]["id"], "gpu-1");
    assert_eq!(everyone["items"][1]["state"], "gone");

    // Residency.
    let file = fixture.file("fraud.onnx", b"weights");
    let output = fixture
        .shamal(&["model", "push", &file, "--name", "fraud"])
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let output = fixture
        .shamal(&[
            "residency",
            "set-model",
            "fraud",
            "--regions",
            "eu-west, eu-central",
        ])
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(
        stdout(&output).contains("eu-west,eu-central"),
        "{}",
        stdout(&output)
    );
    assert_eq!(
        registry
            .get_model_residency("fraud")
            .await
            .unwrap()
            .updated_by,
        "tester"
    );
    let output = fixture
        .shamal(&["residency", "set-tenant", "acme", "--regions", "uae-north"])
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let output = fixture.shamal(&["residency", "show"]).await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.lines()
            .any(|line| line.starts_with("acme") && line.contains("uae-north")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|line| line.starts_with("fraud") && line.contains("eu-west,eu-central")),
        "{text}"
    );
    let output = fixture
        .shamal(&["residency", "show", "--output", "json"])
        .await;
    let shown = json(&output);
    assert_eq!(shown["tenants"][0]["allowed_regions"][0], "uae-north");
    assert_eq!(shown["models"][0]["model"], "fraud");
    let output = fixture
        .shamal(&["residency", "show", "--model", "fraud", "--output", "json"])
        .await;
    assert_eq!(
        json(&output)["allowed_regions"],
        serde_json::json!(["eu-west", "eu-central"])
    );

    // Errors: a bad region names the field (exit 1), an unknown model is
    // 4, no region at all for a tenant is a usage error (2).
    let output = fixture
        .shamal(&["residency", "set-model", "fraud", "--regions", "eu west"])
        .await;
    assert_eq!(code(&output), 1);
    assert!(
        stderr(&output).contains("allowed_regions[0]"),
        "{}",
        stderr(&output)
    );
    let output = fixture
        .shamal(&["residency", "set-model", "nope", "--regions", "eu-west"])
        .await;
    assert_eq!(code(&output), 4, "{}", stderr(&output));
    let output = fixture
        .shamal(&["residency", "set-tenant", "acme", "--regions", ""])
        .await;
    assert_eq!(code(&output), 2, "{}", stderr(&output));
    let output = fixture
        .shamal(&["residency", "delete-tenant", "acme"])
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let output = fixture
        .shamal(&["residency", "delete-tenant", "acme"])
        .await;
    assert_eq!(code(&output), 4);
    // An empty list lifts the model's restriction.
    let output = fixture
        .shamal(&["residency", "set-model", "fraud", "--regions", ""])
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(stdout(&output).contains("any"), "{}", stdout(&output));
    fixture.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_commands() {
    let fixture = Fixture::start().await;
    let file = fixture.file("fraud.onnx", b"weights");
    let output = fixture
        .shamal(&["model", "push", &file, "--name", "fraud"])
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));

    let output = fixture.shamal(&["access", "show", "fraud"]).await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(
        stdout(&output).contains("no: any caller"),
        "{}",
        stdout(&output)
    );
    let output = fixture
        .shamal(&[
            "access",
            "set",
            "fraud",
            "--tenants",
            "acme,globex",
            "--groups",
            "/risk/analysts",
        ])
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert!(
        stdout(&output).contains("acme,globex"),
        "{}",
        stdout(&output)
    );
    let access = fixture
        .running
        .registry
        .get_model_access("fraud")
        .await
        .unwrap();
    assert_eq!(access.allowed_tenants, ["acme", "globex"]);
    assert_eq!(access.allowed_groups, ["/risk/analysts"]);
    let output = fixture
        .shamal(&["access", "show", "fraud", "--output", "json"])
        .await;
    assert_eq!(json(&output)["allowed_groups"][0], "/risk/analysts");

    // Errors: nothing named is a usage error (2), a bad group names the
    // field (1), an unknown model is 4.
    let output = fixture.shamal(&["access", "set", "fraud"]).await;
    assert_eq!(code(&output), 2, "{}", stderr(&output));
    let output = fixture
        .shamal(&["access", "set", "fraud", "--groups", "ops,ops"])
        .await;
    assert_eq!(code(&output), 1);
    assert!(
        stderr(&output).contains("allowed_groups[1]"),
        "{}",
        stderr(&output)
    );
    let output = fixture
        .shamal(&["access", "set", "nope", "--tenants", "acme"])
        .await;
    assert_eq!(code(&output), 4, "{}", stderr(&output));
    // Clear lifts it.
    let output = fixture.shamal(&["access", "clear", "fraud"]).await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let access = fixture
        .running
        .registry
        .get_model_access("fraud")
        .await
        .unwrap();
    assert!(access.allowed_tenants.is_empty() && access.allowed_groups.is_empty());
    fixture.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_commands() {
    let fixture = Fixture::start().await;
    let registry = fixture.running.registry.clone();
    for id in ["cpu-1", "cpu-2"] {
        registry
            .register_member(
                WorkerInfo {
                    id: id.to_owned(),
                    address: format!("{id}.internal:8101"),
                    region: "eu-west".to_owned(),
                    formats: vec!["onnx".to_owned()],
                    device: "cpu".to_owned(),
                    last_seen: 0,
                },
                8,
            )
            .await
            .unwrap();
    }
    for name in ["one.onnx", "two.onnx"] {
        let file = fixture.file(name, name.as_bytes());
        let output = fixture
            .shamal(&["model", "push", &file, "--name", "fraud"])
            .await;
        assert_eq!(code(&output), 0, "{}", stderr(&output));
    }

    let output = fixture.shamal(&["placement", "show", "fraud"]).await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("mode:") && text.contains("all"), "{text}");
    assert!(
        text.contains("VERSION") && text.contains("WEIGHT"),
        "{text}"
    );
    let first = text.lines().find(|line| line.starts_with("1 ")).unwrap();
    assert!(
        first.contains("100%") && first.contains("cpu-1 (loading), cpu-2 (loading)"),
        "{first}"
    );

    // Weighted: version 1 takes all traffic and both workers, version 2
    // none and one worker.
    let output = fixture
        .shamal(&["placement", "set", "fraud", "--mode", "weighted"])
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("weighted"), "{text}");
    let second = text.lines().find(|line| line.starts_with("2 ")).unwrap();
    assert!(second.contains("0%"), "{second}");
    assert_eq!(second.matches("cpu-").count(), 1, "{second}");
    let policy = registry.get_placement_policy("fraud").await.unwrap();
    assert_eq!(policy.updated_by, "tester");
    assert_eq!(policy.min_replicas, 1);
    let output = fixture
        .shamal(&[
            "placement",
            "set",
            "fraud",
            "--mode",
            "weighted",
            "--min-replicas",
            "2",
            "--output",
            "json",
        ])
        .await;
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    let shown = json(&output);
    assert_eq!(shown["policy"]["min_replicas"], 2);
    assert_eq!(
        shown["versions"][1]["workers"],
        serde_json::json!(["cpu-1", "cpu-2"])
    );
    let output = fixture
        .shamal(&["placement", "show", "fraud", "--output", "json"])
        .await;
    assert_eq!(json(&output), shown);

    // Errors: a bad minimum names the field (1), an unknown model is 4, an
    // unknown mode is a usage error (2).
    let output = fixture
        .shamal(&[
            "placement",
            "set",
            "fraud",
            "--mode",
            "weighted",
            "--min-replicas",
            "0",
        ])
        .await;
    assert_eq!(code(&output), 1);
    assert!(
        stderr(&output).contains("min_replicas"),
        "{}",
        stderr(&output)
    );
    let output = fixture.shamal(&["placement", "show", "nope"]).await;
    assert_eq!(code(&output), 4, "{}", stderr(&output));
    let output = fixture
        .shamal(&["placement", "set", "fraud", "--mode", "spread"])
        .await;
    assert_eq!(code(&output), 2, "{}", stderr(&output));
    fixture.running.stop().await.unwrap();
}
