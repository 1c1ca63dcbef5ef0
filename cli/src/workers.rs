//! `shamal workers list`: the workers the registry knows, their membership
//! state, capacity and last heartbeat.

use serde_json::{Value, json};

use crate::client::{CliResult, Client, Output, RegistryOpts};
use crate::output::{Table, print_json, text, time};

#[derive(Debug, clap::Subcommand)]
pub enum WorkersCommand {
    /// List workers: id, address, region, device, capacity, state and last
    /// heartbeat.
    List(ListArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Also list workers that left (state `gone`).
    #[arg(long)]
    all: bool,
}

pub async fn run(command: WorkersCommand, opts: &RegistryOpts) -> CliResult<()> {
    let client = Client::new(opts)?;
    match command {
        WorkersCommand::List(args) => list(&client, args.all, opts.output).await,
    }
}

async fn list(client: &Client, all: bool, output: Output) -> CliResult<()> {
    let path = if all {
        "/v1/workers?include_gone=true"
    } else {
        "/v1/workers"
    };
    let answer = client.get(path).await?;
    let workers = answer["items"].as_array().cloned().unwrap_or_default();
    if output == Output::Json {
        print_json(&json!({ "items": workers }));
        return Ok(());
    }
    if workers.is_empty() {
        println!("no workers registered");
        return Ok(());
    }
    let mut table = Table::new(&[
        "id",
        "address",
        "region",
        "device",
        "capacity",
        "state",
        "inflight",
        "last heartbeat",
        "reason",
    ]);
    for worker in &workers {
        table.row(row(worker));
    }
    table.print();
    Ok(())
}

fn row(worker: &Value) -> Vec<String> {
    vec![
        text(&worker["id"]),
        text(&worker["address"]),
        text(&worker["region"]),
        text(&worker["device"]),
        text(&worker["capacity"]),
        text(&worker["state"]),
        text(&worker["inflight"]),
        time(&worker["last_heartbeat"]),
        text(&worker["state_reason"]),
    ]
}
