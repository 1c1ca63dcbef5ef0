//! `shamal access set | clear | show`: a model limited to listed tenants or
//! groups (who may call it, beyond the roles).

use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{CliError, CliResult, Client, Output, RegistryOpts, segment};
use crate::output::{print_fields, print_json, text, time};
use crate::residency::parse_regions as parse_list;

#[derive(Debug, clap::Subcommand)]
pub enum AccessCommand {
    /// Limit a model to callers of the listed tenants or groups (replaces
    /// the model's limit).
    Set(SetArgs),
    /// Lift a model's limit: every caller with the inference role may call
    /// it.
    Clear(ModelArg),
    /// Show a model's limit.
    Show(ModelArg),
}

#[derive(Debug, clap::Args)]
pub struct SetArgs {
    /// Model name.
    model: String,
    /// Tenants whose callers may call it, comma-separated (the token's
    /// tenant claim).
    #[arg(long, value_name = "TENANT,...", default_value = "")]
    tenants: String,
    /// Groups whose members may call it, comma-separated (the token's
    /// groups claim).
    #[arg(long, value_name = "GROUP,...", default_value = "")]
    groups: String,
}

#[derive(Debug, clap::Args)]
pub struct ModelArg {
    /// Model name.
    model: String,
}

pub async fn run(command: AccessCommand, opts: &RegistryOpts) -> CliResult<()> {
    let client = Client::new(opts)?;
    let (model, body) = match command {
        AccessCommand::Show(args) => {
            let access = client
                .get(&format!("/v1/models/{}/access", segment(&args.model)))
                .await?;
            print_access(&access, opts.output);
            return Ok(());
        }
        AccessCommand::Set(args) => {
            let tenants = parse_list(&args.tenants);
            let groups = parse_list(&args.groups);
            if tenants.is_empty() && groups.is_empty() {
                return Err(CliError::Usage(
                    "name at least one of --tenants and --groups (`shamal access clear` lifts a limit)"
                        .to_owned(),
                ));
            }
            (
                args.model,
                json!({ "allowed_tenants": tenants, "allowed_groups": groups }),
            )
        }
        AccessCommand::Clear(args) => (
            args.model,
            json!({ "allowed_tenants": [], "allowed_groups": [] }),
        ),
    };
    let access = client
        .send(
            Method::PUT,
            &format!("/v1/models/{}/access", segment(&model)),
            &body,
        )
        .await?;
    print_access(&access, opts.output);
    Ok(())
}

fn list_text(value: &Value) -> String {
    let entries: Vec<String> = value
        .as_array()
        .map(|entries| entries.iter().map(text).collect())
        .unwrap_or_default();
    if entries.is_empty() {
        "-".to_owned()
    } else {
        entries.join(",")
    }
}

fn print_access(access: &Value, output: Output) {
    if output == Output::Json {
        print_json(access);
        return;
    }
    let limited = [&access["allowed_tenants"], &access["allowed_groups"]]
        .iter()
        .any(|list| list.as_array().is_some_and(|list| !list.is_empty()));
    let updated = if access["updated_by"].as_str().unwrap_or_default().is_empty() {
        "-".to_owned()
    } else {
        format!(
            "{} by {}",
            time(&access["updated_at"]),
            text(&access["updated_by"])
        )
    };
    print_fields(&[
        ("model", text(&access["model"])),
        (
            "limited",
            if limited {
                "yes: only the tenants and groups below (and admins)".to_owned()
            } else {
                "no: any caller with the inference role".to_owned()
            },
        ),
        ("tenants", list_text(&access["allowed_tenants"])),
        ("groups", list_text(&access["allowed_groups"])),
        ("updated", updated),
    ]);
}
