//! `shamal residency set-model | set-tenant | delete-tenant | show`: the
//! regions a model's or a tenant's requests may be processed in.

use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{CliError, CliResult, Client, Output, RegistryOpts, segment};
use crate::output::{Table, print_fields, print_json, text, time};

#[derive(Debug, clap::Subcommand)]
pub enum ResidencyCommand {
    /// Set the regions a model's requests may be processed in (an empty
    /// --regions "" lifts the model's restriction).
    SetModel(SetModelArgs),
    /// Set the regions a tenant's requests may be processed in.
    SetTenant(SetTenantArgs),
    /// Remove a tenant's policy.
    DeleteTenant(TenantArg),
    /// Show the tenant policies and the models that restrict regions (or
    /// one model's residency with --model).
    Show(ShowArgs),
}

#[derive(Debug, clap::Args)]
pub struct SetModelArgs {
    /// Model name.
    model: String,
    /// Allowed regions, comma-separated (e.g. eu-west,eu-central).
    #[arg(long, value_name = "REGION,...", allow_hyphen_values = true)]
    regions: String,
}

#[derive(Debug, clap::Args)]
pub struct SetTenantArgs {
    /// Tenant name.
    tenant: String,
    /// Allowed regions, comma-separated (at least one).
    #[arg(long, value_name = "REGION,...")]
    regions: String,
}

#[derive(Debug, clap::Args)]
pub struct TenantArg {
    /// Tenant name.
    tenant: String,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// Show this model's residency only.
    #[arg(long)]
    model: Option<String>,
}

/// `a, b,c` -> ["a", "b", "c"]; empty entries are dropped (the registry
/// validates the names).
pub fn parse_regions(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|region| !region.is_empty())
        .map(str::to_owned)
        .collect()
}

pub async fn run(command: ResidencyCommand, opts: &RegistryOpts) -> CliResult<()> {
    let client = Client::new(opts)?;
    let output = opts.output;
    match command {
        ResidencyCommand::SetModel(args) => {
            let residency = client
                .send(
                    Method::PUT,
                    &format!("/v1/models/{}/residency", segment(&args.model)),
                    &json!({ "allowed_regions": parse_regions(&args.regions) }),
                )
                .await?;
            print_model(&residency, output);
            Ok(())
        }
        ResidencyCommand::SetTenant(args) => {
            let regions = parse_regions(&args.regions);
            if regions.is_empty() {
                return Err(CliError::Usage(
                    "--regions must name at least one region (delete-tenant lifts a policy)"
                        .to_owned(),
                ));
            }
            let policy = client
                .send(
                    Method::PUT,
                    &format!("/v1/residency/tenants/{}", segment(&args.tenant)),
                    &json!({ "allowed_regions": regions }),
                )
                .await?;
            if output == Output::Json {
                print_json(&policy);
            } else {
                print_fields(&[
                    ("tenant", text(&policy["tenant"])),
                    ("allowed regions", regions_text(&policy["allowed_regions"])),
                    (
                        "updated",
                        format!(
                            "{} by {}",
                            time(&policy["updated_at"]),
                            text(&policy["updated_by"])
                        ),
                    ),
                ]);
            }
            Ok(())
        }
        ResidencyCommand::DeleteTenant(args) => {
            client
                .send(
                    Method::DELETE,
                    &format!("/v1/residency/tenants/{}", segment(&args.tenant)),
                    &json!({}),
                )
                .await?;
            if output == Output::Json {
                print_json(&json!({ "deleted": args.tenant }));
            } else {
                println!("deleted the residency policy of tenant {}", args.tenant);
            }
            Ok(())
        }
        ResidencyCommand::Show(args) => match args.model {
            Some(model) => {
                let residency = client
                    .get(&format!("/v1/models/{}/residency", segment(&model)))
                    .await?;
                print_model(&residency, output);
                Ok(())
            }
            None => show_all(&client, output).await,
        },
    }
}

fn regions_text(value: &Value) -> String {
    let regions: Vec<String> = value
        .as_array()
        .map(|regions| regions.iter().map(text).collect())
        .unwrap_or_default();
    if regions.is_empty() {
        "any".to_owned()
    } else {
        regions.join(",")
    }
}

fn updated(value: &Value) -> String {
    if value["updated_by"].as_str().unwrap_or_default().is_empty() {
        "-".to_owned()
    } else {
        format!(
            "{} by {}",
            time(&value["updated_at"]),
            text(&value["updated_by"])
        )
    }
}

fn print_model(residency: &Value, output: Output) {
    if output == Output::Json {
        print_json(residency);
        return;
    }
    print_fields(&[
        ("model", text(&residency["model"])),
        (
            "allowed regions",
            regions_text(&residency["allowed_regions"]),
        ),
        ("updated", updated(residency)),
    ]);
}

/// Tenant policies, then every model that restricts regions.
async fn show_all(client: &Client, output: Output) -> CliResult<()> {
    let tenants = client.get("/v1/residency/tenants").await?;
    let tenants = tenants["items"].as_array().cloned().unwrap_or_default();
    let mut models = Vec::new();
    for model in client.get_all("/v1/models").await? {
        let name = text(&model["name"]);
        let residency = client
            .get(&format!("/v1/models/{}/residency", segment(&name)))
            .await?;
        if residency["allowed_regions"]
            .as_array()
            .is_some_and(|regions| !regions.is_empty())
        {
            models.push(residency);
        }
    }
    if output == Output::Json {
        print_json(&json!({ "tenants": tenants, "models": models }));
        return Ok(());
    }
    if tenants.is_empty() {
        println!("no tenant policies");
    } else {
        let mut table = Table::new(&["tenant", "allowed regions", "updated"]);
        for policy in &tenants {
            table.row(vec![
                text(&policy["tenant"]),
                regions_text(&policy["allowed_regions"]),
                updated(policy),
            ]);
        }
        table.print();
    }
    println!();
    if models.is_empty() {
        println!("no model restricts regions");
    } else {
        let mut table = Table::new(&["model", "allowed regions", "updated"]);
        for residency in &models {
            table.row(vec![
                text(&residency["model"]),
                regions_text(&residency["allowed_regions"]),
                updated(residency),
            ]);
        }
        table.print();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_split_on_commas() {
        assert_eq!(
            parse_regions("eu-west, eu-central,"),
            ["eu-west", "eu-central"]
        );
        assert!(parse_regions("").is_empty());
        assert_eq!(regions_text(&json!([])), "any");
        assert_eq!(regions_text(&json!(["a", "b"])), "a,b");
    }
}
