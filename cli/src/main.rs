//! `shamal`: the one command to try the platform and to operate it.

mod up;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "shamal", version, about = "Shamal model-serving platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the platform in one process on loopback (router + cpu-worker),
    /// serving a model repository (the bundled demo models by default).
    Up(up::UpArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shamal_telemetry::init_tracing();
    let cli = Cli::parse();
    match cli.command {
        Command::Up(args) => up::run(args).await,
    }
}
