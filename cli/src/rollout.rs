//! `shamal rollout start | shift | promote | rollback | pause | resume |
//! status | history`.
//!
//! Writes name the rollout revision they change: the current one, read
//! just before (or `--revision N`). When someone else changed the rollout
//! in between the registry refuses with a conflict (exit code 3).

use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{CliResult, Client, Output, RegistryOpts, segment};
use crate::output::{Table, print_fields, print_json, splits, text, time};

#[derive(Debug, clap::Subcommand)]
pub enum RolloutCommand {
    /// Start a canary: --weight percent of traffic to --version, the rest
    /// to the stable version (default: the production alias).
    Start(StartArgs),
    /// Change the candidate's share of traffic.
    Shift(ShiftArgs),
    /// Give the candidate all traffic and the production alias.
    Promote(WriteArgs),
    /// Send all traffic back to the stable version.
    Rollback(RollbackArgs),
    /// Send all traffic to the stable version for now, keeping the weights.
    Pause(WriteArgs),
    /// Return to the weights of a paused rollout.
    Resume(WriteArgs),
    /// Show the rollout and its live canary analysis.
    Status(ModelArg),
    /// Show every change of the rollout.
    History(ModelArg),
}

#[derive(Debug, clap::Args)]
pub struct ModelArg {
    /// Model name.
    model: String,
}

#[derive(Debug, clap::Args)]
pub struct WriteArgs {
    /// Model name.
    model: String,
    /// Rollout revision to change (default: the current one).
    #[arg(long)]
    revision: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// Model name.
    model: String,
    /// The candidate version.
    #[arg(long)]
    version: u64,
    /// Percent of traffic for the candidate.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=100))]
    weight: u32,
    /// The stable version (default: the production alias).
    #[arg(long)]
    stable: Option<u64>,
    /// A version to shadow: copies of requests, answers recorded only.
    #[arg(long, requires = "shadow_percent")]
    shadow: Option<u64>,
    /// Percent of requests copied to the shadow version, (0, 100].
    #[arg(long, requires = "shadow")]
    shadow_percent: Option<f64>,
    /// Request parameter whose value pins a caller to one version.
    #[arg(long)]
    sticky_key: Option<String>,
    /// Roll back automatically when the candidate's error rate exceeds
    /// this (0..1).
    #[arg(long)]
    max_error_rate: Option<f64>,
    /// Roll back automatically when the candidate's p99 exceeds this
    /// multiple of the stable p99.
    #[arg(long)]
    max_p99_ratio: Option<f64>,
    /// Requests the candidate must serve before it is judged.
    #[arg(long)]
    min_requests: Option<u64>,
    /// Rollout revision to replace (default: the current one).
    #[arg(long)]
    revision: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct ShiftArgs {
    /// Model name.
    model: String,
    /// New percent of traffic for the candidate.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=100))]
    weight: u32,
    /// Rollout revision to change (default: the current one).
    #[arg(long)]
    revision: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// Model name.
    model: String,
    /// Why, for the rollout history.
    #[arg(long)]
    reason: Option<String>,
    /// Rollout revision to change (default: the current one).
    #[arg(long)]
    revision: Option<u64>,
}

pub async fn run(command: RolloutCommand, opts: &RegistryOpts) -> CliResult<()> {
    let client = Client::new(opts)?;
    let output = opts.output;
    match command {
        RolloutCommand::Start(args) => {
            let revision = expected(&client, &args.model, args.revision).await?;
            let mut guard_rails = serde_json::Map::new();
            if let Some(rate) = args.max_error_rate {
                guard_rails.insert("max_error_rate".to_owned(), json!(rate));
            }
            if let Some(ratio) = args.max_p99_ratio {
                guard_rails.insert("max_p99_ratio".to_owned(), json!(ratio));
            }
            if let Some(requests) = args.min_requests {
                guard_rails.insert("min_requests".to_owned(), json!(requests));
            }
            let mut body = json!({
                "expected_revision": revision,
                "candidate": args.version,
                "weight": args.weight,
                "guard_rails": guard_rails,
            });
            if let Some(stable) = args.stable {
                body["stable"] = json!(stable);
            }
            if let (Some(version), Some(percent)) = (args.shadow, args.shadow_percent) {
                body["shadow"] = json!({"version": version, "percent": percent});
            }
            if let Some(key) = args.sticky_key {
                body["sticky_key"] = json!(key);
            }
            write(&client, &args.model, "", &body, output).await
        }
        RolloutCommand::Shift(args) => {
            let revision = expected(&client, &args.model, args.revision).await?;
            let body = json!({"expected_revision": revision, "weight": args.weight});
            write(&client, &args.model, "/shift", &body, output).await
        }
        RolloutCommand::Promote(args) => simple(&client, args, "/promote", output).await,
        RolloutCommand::Pause(args) => simple(&client, args, "/pause", output).await,
        RolloutCommand::Resume(args) => simple(&client, args, "/resume", output).await,
        RolloutCommand::Rollback(args) => {
            let revision = expected(&client, &args.model, args.revision).await?;
            let mut body = json!({"expected_revision": revision});
            if let Some(reason) = args.reason {
                body["reason"] = json!(reason);
            }
            write(&client, &args.model, "/rollback", &body, output).await
        }
        RolloutCommand::Status(args) => status(&client, &args.model, output).await,
        RolloutCommand::History(args) => history(&client, &args.model, output).await,
    }
}

async fn expected(client: &Client, model: &str, revision: Option<u64>) -> CliResult<u64> {
    match revision {
        Some(revision) => Ok(revision),
        None => client.rollout_revision(model).await,
    }
}

async fn simple(client: &Client, args: WriteArgs, action: &str, output: Output) -> CliResult<()> {
    let revision = expected(client, &args.model, args.revision).await?;
    write(
        client,
        &args.model,
        action,
        &json!({"expected_revision": revision}),
        output,
    )
    .await
}

async fn write(
    client: &Client,
    model: &str,
    action: &str,
    body: &Value,
    output: Output,
) -> CliResult<()> {
    let rollout = client
        .send(
            Method::POST,
            &format!("/v1/models/{}/rollout{action}", segment(model)),
            body,
        )
        .await?;
    if output == Output::Json {
        print_json(&rollout);
    } else {
        print_rollout(&rollout);
    }
    Ok(())
}

fn guard_rails(rails: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(rate) = rails["max_error_rate"].as_f64() {
        parts.push(format!("error rate <= {rate}"));
    }
    if let Some(ratio) = rails["max_p99_ratio"].as_f64() {
        parts.push(format!("p99 <= {ratio}x stable"));
    }
    if !parts.is_empty() {
        parts.push(format!(
            "after {} requests",
            rails["min_requests"].as_u64().unwrap_or(100)
        ));
    }
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    }
}

fn print_rollout(rollout: &Value) {
    let shadow = &rollout["shadow"];
    print_fields(&[
        ("model", text(&rollout["model"])),
        ("state", text(&rollout["state"])),
        ("revision", text(&rollout["revision"])),
        ("stable", format!("v{}", text(&rollout["stable_version"]))),
        ("splits", splits(&rollout["splits"])),
        (
            "shadow",
            if shadow.is_null() {
                "none".to_owned()
            } else {
                format!(
                    "v{} ({}% copied)",
                    text(&shadow["version"]),
                    text(&shadow["percent"])
                )
            },
        ),
        (
            "sticky key",
            rollout["sticky_key"].as_str().unwrap_or("none").to_owned(),
        ),
        ("guard rails", guard_rails(&rollout["guard_rails"])),
        (
            "updated",
            format!(
                "{} by {}",
                time(&rollout["updated_at"]),
                text(&rollout["updated_by"])
            ),
        ),
        ("reason", text(&rollout["reason"])),
    ]);
}

fn optional_ms(value: &Value) -> String {
    value
        .as_f64()
        .map(|ms| format!("{ms:.1}"))
        .unwrap_or_else(|| "-".to_owned())
}

async fn status(client: &Client, model: &str, output: Output) -> CliResult<()> {
    let status = client
        .get(&format!("/v1/models/{}/rollout", segment(model)))
        .await?;
    if output == Output::Json {
        print_json(&status);
        return Ok(());
    }
    print_rollout(&status["rollout"]);
    let analysis = status["analysis"].as_array().cloned().unwrap_or_default();
    println!();
    if analysis.is_empty() {
        println!(
            "no traffic reported since revision {}",
            text(&status["rollout"]["revision"])
        );
        return Ok(());
    }
    let mut table = Table::new(&[
        "version",
        "role",
        "requests",
        "errors",
        "error rate",
        "p50 ms",
        "p99 ms",
    ]);
    for entry in &analysis {
        table.row(vec![
            format!("v{}", text(&entry["version"])),
            text(&entry["role"]),
            text(&entry["requests"]),
            text(&entry["errors"]),
            entry["error_rate"]
                .as_f64()
                .map(|rate| format!("{:.2}%", rate * 100.0))
                .unwrap_or_default(),
            optional_ms(&entry["p50_ms"]),
            optional_ms(&entry["p99_ms"]),
        ]);
    }
    table.print();
    Ok(())
}

async fn history(client: &Client, model: &str, output: Output) -> CliResult<()> {
    let entries = client
        .get_all(&format!("/v1/models/{}/rollout/history", segment(model)))
        .await?;
    if output == Output::Json {
        print_json(&json!({ "items": entries }));
        return Ok(());
    }
    let mut table = Table::new(&[
        "revision", "action", "actor", "at", "state", "splits", "reason",
    ]);
    for entry in &entries {
        table.row(vec![
            text(&entry["revision"]),
            text(&entry["action"]),
            text(&entry["actor"]),
            time(&entry["at"]),
            text(&entry["rollout"]["state"]),
            splits(&entry["rollout"]["splits"]),
            text(&entry["reason"]),
        ]);
    }
    table.print();
    Ok(())
}
