//! `shamal`: the one command to try the platform and to operate it.

mod access;
mod admin;
mod audit;
mod batch;
mod certs;
mod client;
mod login;
mod model;
mod output;
mod placement;
mod residency;
mod rollout;
mod up;
mod whoami;
mod workers;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "shamal", version, about = "Shamal model-serving platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    registry: client::RegistryOpts,
}

#[derive(Subcommand)]
enum Command {
    /// Run the platform in one process on loopback (router, workers,
    /// registry, audit log, batch coordinator),
    /// serving a model repository (the bundled demo models by default).
    Up(up::UpArgs),
    /// Model versions in the registry: push, list, show.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Traffic rollouts: canary, shift, promote, rollback, pause, resume.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// Workers known to the registry: state, capacity, last heartbeat.
    #[command(subcommand)]
    Workers(workers::WorkersCommand),
    /// Data residency: regions a model's or a tenant's requests may be
    /// processed in.
    #[command(subcommand)]
    Residency(residency::ResidencyCommand),
    /// Model access: limit a model to callers of listed tenants or groups.
    #[command(subcommand)]
    Access(access::AccessCommand),
    /// Placement: which workers hold which versions of a model.
    #[command(subcommand)]
    Placement(placement::PlacementCommand),
    /// Development certificates for mutual TLS between services.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Registry administration: re-key artifacts encrypted at rest.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Log in at an OpenID provider: the registry commands then send your
    /// access token (kept in ~/.config/shamal/credentials.json, refreshed).
    Login(login::LoginArgs),
    /// Forget the stored login.
    Logout,
    /// Who the registry commands act as: subject, tenant, roles, expiry.
    Whoami(whoami::WhoamiArgs),
    /// The audit log: export it, verify an export offline with the
    /// signing key, query records (docs/audit.md).
    Audit(audit::AuditArgs),
    /// Batch inference jobs: submit a dataset to score (and follow it),
    /// status, list, cancel (docs/batch.md).
    Batch(batch::BatchArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Command::Up(args) = &cli.command
        && !args.no_gpu_worker
    {
        // The embedded gpu-worker computes on the CPU unless built with
        // CUDA: candle then runs one thread per instance (see
        // `shamal_gpu_worker::cpu_threads`), which it reads from the
        // environment, so it is set before any thread exists.
        #[allow(unsafe_code)]
        // SAFETY: the async runtime is built below; no other thread exists.
        unsafe {
            shamal_gpu_worker::cpu_threads::set_cpu_default(
                shamal_gpu_worker::spec::DevicePreference::Auto,
            );
        }
    }
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(error) => {
            eprintln!("shamal: cannot start the async runtime: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> std::process::ExitCode {
    shamal_telemetry::init_tracing();
    let result = match cli.command {
        Command::Up(args) => return up::run(args).await,
        Command::Model(command) => model::run(command, &cli.registry).await,
        Command::Rollout(command) => rollout::run(command, &cli.registry).await,
        Command::Workers(command) => workers::run(command, &cli.registry).await,
        Command::Residency(command) => residency::run(command, &cli.registry).await,
        Command::Access(command) => access::run(command, &cli.registry).await,
        Command::Placement(command) => placement::run(command, &cli.registry).await,
        Command::Certs(command) => certs::run(command),
        Command::Admin(command) => admin::run(command, &cli.registry).await,
        Command::Login(args) => login::login(args).await,
        Command::Logout => login::logout(),
        Command::Whoami(args) => whoami::run(args, &cli.registry).await,
        Command::Audit(args) => return audit::run(args, &cli.registry).await,
        Command::Batch(args) => return batch::run(args, &cli.registry).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => error.report(),
    }
}
