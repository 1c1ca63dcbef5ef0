//! `shamal placement show | set`: which workers hold which versions of a
//! model, and the policy that decides it.

use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{CliResult, Client, Output, RegistryOpts, segment};
use crate::output::{Table, print_fields, print_json, text, time};

#[derive(Debug, clap::Subcommand)]
pub enum PlacementCommand {
    /// Show a model's placement policy and, per version, its share of
    /// traffic and the workers that hold it.
    Show(ShowArgs),
    /// Set a model's placement policy.
    Set(SetArgs),
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// Model name.
    model: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Every capable worker holds every active version.
    All,
    /// Each version on workers of its own, in proportion to its traffic.
    Weighted,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::All => "all",
            Mode::Weighted => "weighted",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct SetArgs {
    /// Model name.
    model: String,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Fewest workers per region that hold each active version (1-64).
    #[arg(long, default_value_t = 1)]
    min_replicas: u32,
}

pub async fn run(command: PlacementCommand, opts: &RegistryOpts) -> CliResult<()> {
    let client = Client::new(opts)?;
    let placement = match command {
        PlacementCommand::Show(args) => {
            client
                .get(&format!("/v1/models/{}/placement", segment(&args.model)))
                .await?
        }
        PlacementCommand::Set(args) => {
            client
                .send(
                    Method::PUT,
                    &format!("/v1/models/{}/placement", segment(&args.model)),
                    &json!({ "mode": args.mode.as_str(), "min_replicas": args.min_replicas }),
                )
                .await?
        }
    };
    print(&placement, opts.output);
    Ok(())
}

/// `34%`, `0.5%`.
fn percent(value: &Value) -> String {
    let weight = value.as_f64().unwrap_or(0.0);
    if weight.fract() == 0.0 {
        format!("{weight:.0}%")
    } else {
        format!("{weight}%")
    }
}

/// `w1, w2 (loading)`: the workers, marking those that do not report the
/// version ready yet.
fn workers(list: &Value, ready: &Value) -> String {
    let ready: Vec<String> = ready
        .as_array()
        .map(|ready| ready.iter().map(text).collect())
        .unwrap_or_default();
    let names: Vec<String> = list
        .as_array()
        .map(|list| {
            list.iter()
                .map(|worker| {
                    let name = text(worker);
                    if ready.contains(&name) {
                        name
                    } else {
                        format!("{name} (loading)")
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        "-".to_owned()
    } else {
        names.join(", ")
    }
}

fn print(placement: &Value, output: Output) {
    if output == Output::Json {
        print_json(placement);
        return;
    }
    let policy = &placement["policy"];
    let updated = if text(&policy["updated_by"]).is_empty() {
        "-".to_owned()
    } else {
        format!(
            "{} by {}",
            time(&policy["updated_at"]),
            text(&policy["updated_by"])
        )
    };
    print_fields(&[
        ("model", text(&placement["model"])),
        ("mode", text(&policy["mode"])),
        ("min replicas", text(&policy["min_replicas"])),
        ("updated", updated),
    ]);
    println!();
    let versions = placement["versions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        println!("no active version");
        return;
    }
    let mut table = Table::new(&["version", "lifecycle", "weight", "workers", "releasing"]);
    for version in &versions {
        let releasing = workers(&version["releasing"], &version["ready"]);
        table.row(vec![
            text(&version["version"]),
            text(&version["lifecycle"]),
            percent(&version["weight"]),
            workers(&version["workers"], &version["ready"]),
            releasing,
        ]);
    }
    table.print();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_and_workers_read_well() {
        assert_eq!(percent(&json!(34.0)), "34%");
        assert_eq!(percent(&json!(12.5)), "12.5%");
        assert_eq!(
            workers(&json!(["w1", "w2"]), &json!(["w1"])),
            "w1, w2 (loading)"
        );
        assert_eq!(workers(&json!([]), &json!([])), "-");
    }
}
