//! `shamal model push | list | show`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::client::{CliError, CliResult, Client, Output, RegistryOpts, segment};
use crate::output::{Table, bytes, print_fields, print_json, short_digest, splits, text, time};

#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Upload a model file and register it as the next version of a model
    /// (created on the way).
    Push(PushArgs),
    /// List models.
    List,
    /// Show a model (aliases, rollout, versions) or one of its versions.
    Show(ShowArgs),
    /// Load a failed version again (after fixing what made it fail).
    Retry(VersionArgs),
    /// Retire a version: workers unload it.
    Archive(VersionArgs),
}

#[derive(Debug, clap::Args)]
pub struct VersionArgs {
    /// Model name.
    name: String,
    /// Version number.
    #[arg(long)]
    version: u64,
}

#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The model file (ONNX or safetensors).
    file: PathBuf,
    /// Model name.
    #[arg(long)]
    name: String,
    /// Artifact format (default: from the file extension).
    #[arg(long, value_parser = ["onnx", "safetensors"])]
    format: Option<String>,
    /// Metadata entry KEY=VALUE (repeatable).
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    metadata: Vec<(String, String)>,
    /// Lineage: the training run that produced the model.
    #[arg(long)]
    training_run_id: Option<String>,
    /// Lineage: digest of the training data set.
    #[arg(long)]
    dataset_digest: Option<String>,
    /// Lineage: commit of the training code.
    #[arg(long)]
    source_commit: Option<String>,
    /// Wait until a worker has loaded the version (exit 1 if it fails).
    #[arg(long)]
    wait: bool,
    /// Longest wait with --wait, in seconds.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    wait_timeout: u64,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// Model name.
    name: String,
    /// Show this version in detail.
    #[arg(long)]
    version: Option<u64>,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, not '{text}'")),
    }
}

pub async fn run(command: ModelCommand, opts: &RegistryOpts) -> CliResult<()> {
    let client = Client::new(opts)?;
    match command {
        ModelCommand::Push(args) => push(&client, args, opts.output).await,
        ModelCommand::List => list(&client, opts.output).await,
        ModelCommand::Show(args) => show(&client, args, opts.output).await,
        ModelCommand::Retry(args) => version_action(&client, args, "retry", opts.output).await,
        ModelCommand::Archive(args) => version_action(&client, args, "archive", opts.output).await,
    }
}

/// `POST /v1/models/{name}/versions/{version}/{action}`, then the version.
async fn version_action(
    client: &Client,
    args: VersionArgs,
    action: &str,
    output: Output,
) -> CliResult<()> {
    let name = segment(&args.name);
    let version = client
        .send(
            Method::POST,
            &format!("/v1/models/{name}/versions/{}/{action}", args.version),
            &json!({}),
        )
        .await?;
    if output == Output::Json {
        print_json(&version);
    } else {
        print_fields(&[
            ("model", text(&version["model"])),
            ("version", text(&version["version"])),
            ("lifecycle", text(&version["lifecycle"])),
            ("reason", text(&version["reason"])),
        ]);
    }
    Ok(())
}

fn format_of(path: &Path) -> Option<&'static str> {
    match path
        .extension()
        .and_then(|extension| extension.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("onnx") => Some("onnx"),
        Some("safetensors") => Some("safetensors"),
        _ => None,
    }
}

/// sha256 and size of a file, read in 1 MiB chunks.
async fn digest_file(path: &Path) -> CliResult<(String, u64)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || -> CliResult<(String, u64)> {
        let fail = |error: std::io::Error| {
            CliError::other(format!("cannot read {}: {error}", path.display()))
        };
        let mut file = std::fs::File::open(&path).map_err(fail)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0_u8; 1024 * 1024];
        let mut size: u64 = 0;
        loop {
            let read = file.read(&mut buffer).map_err(fail)?;
            if read == 0 {
                break;
            }
            size += read as u64;
            hasher.update(&buffer[..read]);
        }
        Ok((hex::encode(hasher.finalize()), size))
    })
    .await
    .map_err(|error| CliError::other(format!("hashing failed: {error}")))?
}

async fn push(client: &Client, args: PushArgs, output: Output) -> CliResult<()> {
    let format = match args.format.as_deref() {
        Some(format) => format.to_owned(),
        None => format_of(&args.file)
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "cannot tell the format of {} from its extension; pass --format onnx or --format safetensors",
                    args.file.display()
                ))
            })?
            .to_owned(),
    };
    if !args.file.is_file() {
        return Err(CliError::other(format!(
            "{} is not a readable file",
            args.file.display()
        )));
    }
    let (sha256, size) = digest_file(&args.file).await?;
    let quiet = output == Output::Json;
    if client.has_artifact(&sha256).await? {
        if !quiet {
            eprintln!("artifact sha256:{sha256} is already stored");
        }
    } else {
        if !quiet {
            eprintln!(
                "uploading {} ({}, sha256:{sha256})",
                args.file.display(),
                bytes(&json!(size))
            );
        }
        client.put_artifact(&sha256, &args.file, size).await?;
    }
    let metadata: BTreeMap<String, String> = args.metadata.into_iter().collect();
    let mut lineage = serde_json::Map::new();
    for (key, value) in [
        ("training_run_id", args.training_run_id),
        ("dataset_digest", args.dataset_digest),
        ("source_commit", args.source_commit),
    ] {
        if let Some(value) = value {
            lineage.insert(key.to_owned(), Value::String(value));
        }
    }
    let mut version = client
        .send(
            Method::POST,
            &format!("/v1/models/{}/versions", segment(&args.name)),
            &json!({
                "sha256": sha256,
                "format": format,
                "metadata": metadata,
                "lineage": lineage,
            }),
        )
        .await?;
    let number = version["version"].as_u64().unwrap_or(0);
    if !quiet {
        println!(
            "registered {} version {number} (sha256:{}, {})",
            args.name,
            short_digest(&version["artifact"]["sha256"]),
            bytes(&version["artifact"]["size_bytes"])
        );
    }
    if args.wait {
        let deadline = Instant::now() + Duration::from_secs(args.wait_timeout);
        let path = format!("/v1/models/{}/versions/{number}", segment(&args.name));
        if !quiet {
            eprintln!("waiting for a worker to load it...");
        }
        loop {
            match version["lifecycle"].as_str() {
                Some("ready") => break,
                Some(state @ ("failed" | "archived")) => {
                    if quiet {
                        print_json(&version);
                    }
                    return Err(CliError::other(format!(
                        "{} version {number} is {state}: {}",
                        args.name,
                        text(&version["reason"])
                    )));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                if quiet {
                    print_json(&version);
                }
                return Err(CliError::other(format!(
                    "{} version {number} is still {} after {} s",
                    args.name,
                    text(&version["lifecycle"]),
                    args.wait_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            version = client.get(&path).await?;
        }
        if !quiet {
            println!("{} version {number} is ready", args.name);
        }
    }
    if quiet {
        print_json(&version);
    }
    Ok(())
}

async fn list(client: &Client, output: Output) -> CliResult<()> {
    let models = client.get_all("/v1/models").await?;
    if output == Output::Json {
        print_json(&json!({ "items": models }));
        return Ok(());
    }
    let mut table = Table::new(&["name", "latest", "created by", "created", "description"]);
    for model in &models {
        table.row(vec![
            text(&model["name"]),
            text(&model["latest_version"]),
            text(&model["created_by"]),
            time(&model["created_at"]),
            text(&model["description"]),
        ]);
    }
    table.print();
    Ok(())
}

async fn show(client: &Client, args: ShowArgs, output: Output) -> CliResult<()> {
    let name = segment(&args.name);
    if let Some(number) = args.version {
        let version = client
            .get(&format!("/v1/models/{name}/versions/{number}"))
            .await?;
        let placements = client.get(&format!("/v1/models/{name}/placements")).await?;
        let placements: Vec<Value> = placements["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter(|placement| placement["version"].as_u64() == Some(number))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if output == Output::Json {
            print_json(&json!({ "version": version, "placements": placements }));
            return Ok(());
        }
        let mut fields = vec![
            ("model", text(&version["model"])),
            ("version", text(&version["version"])),
            ("lifecycle", text(&version["lifecycle"])),
            ("reason", text(&version["reason"])),
            ("format", text(&version["artifact"]["format"])),
            ("size", bytes(&version["artifact"]["size_bytes"])),
            ("sha256", text(&version["artifact"]["sha256"])),
            ("created by", text(&version["created_by"])),
            ("created", time(&version["created_at"])),
        ];
        if let Some(lineage) = version["lineage"].as_object() {
            for (key, value) in lineage {
                fields.push((key.as_str(), text(value)));
            }
        }
        print_fields(&fields);
        if let Some(metadata) = version["metadata"].as_object().filter(|m| !m.is_empty()) {
            println!("\nmetadata:");
            let mut table = Table::new(&["key", "value"]);
            for (key, value) in metadata {
                table.row(vec![key.clone(), text(value)]);
            }
            table.print();
        }
        if !version["signature"].is_null() {
            println!(
                "\nsignature: {}",
                serde_json::to_string(&version["signature"]).unwrap_or_default()
            );
        }
        if !placements.is_empty() {
            println!("\nplacements:");
            let mut table = Table::new(&["worker", "state", "updated", "reason"]);
            for placement in &placements {
                table.row(vec![
                    text(&placement["worker_id"]),
                    text(&placement["state"]),
                    time(&placement["updated_at"]),
                    text(&placement["reason"]),
                ]);
            }
            table.print();
        }
        return Ok(());
    }
    let detail = client.get(&format!("/v1/models/{name}")).await?;
    let versions = client
        .get_all(&format!("/v1/models/{name}/versions"))
        .await?;
    if output == Output::Json {
        let mut detail = detail;
        detail["versions"] = Value::Array(versions);
        print_json(&detail);
        return Ok(());
    }
    let model = &detail["model"];
    let aliases = detail["aliases"]
        .as_array()
        .map(|aliases| {
            aliases
                .iter()
                .map(|alias| format!("{}=v{}", text(&alias["alias"]), text(&alias["version"])))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let rollout = &detail["rollout"];
    let rollout_summary = if rollout.is_null() {
        "none".to_owned()
    } else {
        format!(
            "{} (revision {}, stable v{}, splits {})",
            text(&rollout["state"]),
            text(&rollout["revision"]),
            text(&rollout["stable_version"]),
            splits(&rollout["splits"])
        )
    };
    print_fields(&[
        ("model", text(&model["name"])),
        ("description", text(&model["description"])),
        ("created by", text(&model["created_by"])),
        ("created", time(&model["created_at"])),
        (
            "aliases",
            if aliases.is_empty() {
                "none".to_owned()
            } else {
                aliases
            },
        ),
        ("rollout", rollout_summary),
    ]);
    println!();
    let mut table = Table::new(&[
        "version",
        "lifecycle",
        "format",
        "size",
        "sha256",
        "created by",
        "created",
    ]);
    for version in &versions {
        table.row(vec![
            text(&version["version"]),
            text(&version["lifecycle"]),
            text(&version["artifact"]["format"]),
            bytes(&version["artifact"]["size_bytes"]),
            short_digest(&version["artifact"]["sha256"]),
            text(&version["created_by"]),
            time(&version["created_at"]),
        ]);
    }
    table.print();
    Ok(())
}
