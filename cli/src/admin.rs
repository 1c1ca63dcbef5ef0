//! `shamal admin rekey`: operations on the registry itself.

use reqwest::Method;
use serde_json::json;

use crate::client::{CliResult, Client, Output, RegistryOpts};
use crate::output::print_json;

#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
    /// Re-encrypt every artifact that is not under the active key of the
    /// registry's artifact key ring (plaintext ones included). Run it after
    /// making a new key active; then the old key can be removed.
    Rekey,
}

pub async fn run(command: AdminCommand, opts: &RegistryOpts) -> CliResult<()> {
    let client = Client::new(opts)?;
    match command {
        AdminCommand::Rekey => rekey(&client, opts.output).await,
    }
}

async fn rekey(client: &Client, output: Output) -> CliResult<()> {
    let report = client
        .send(Method::POST, "/v1/admin/rekey", &json!({}))
        .await?;
    if output == Output::Json {
        print_json(&report);
        return Ok(());
    }
    let count = |field: &str| report[field].as_u64().unwrap_or(0);
    println!(
        "re-keyed {} artifacts; {} were already under the active key '{}'",
        count("rekeyed"),
        count("already_current"),
        report["active_key"].as_str().unwrap_or("?")
    );
    Ok(())
}
