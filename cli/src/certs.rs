//! `shamal certs init`: a development CA and one certificate per service.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use shamal_tls::dev::{DEFAULT_SERVICES, DEFAULT_TRUST_DOMAIN};
use shamal_tls::{DevPkiOptions, DevService, TlsError};

use crate::client::{CliError, CliResult};

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Write a development CA (`ca.pem`, `ca-key.pem`) and, for each
    /// service, `<service>.pem` and `<service>-key.pem` carrying its SPIFFE
    /// identity `spiffe://<trust-domain>/<service>/<id>`. Not for production:
    /// see docs/tls.md for issuing from a real CA.
    Init(InitArgs),
}

#[derive(Args)]
pub struct InitArgs {
    /// Directory to write into (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// Trust domain of the identities.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Extra DNS name or IP address for every certificate (repeatable);
    /// localhost, 127.0.0.1 and ::1 are always included.
    #[arg(long = "host", value_name = "HOST")]
    hosts: Vec<String>,
    /// A service to issue for, with an optional instance id (repeatable;
    /// default: router, registry, worker, batch, audit).
    #[arg(long = "service", value_name = "NAME[=ID]")]
    services: Vec<String>,
    /// Validity of the service certificates, in days.
    #[arg(long, default_value_t = 90)]
    days: u64,
    /// Validity of the CA, in days.
    #[arg(long, default_value_t = 3650)]
    ca_days: u64,
    /// Replace an existing CA and its certificates.
    #[arg(long)]
    force: bool,
}

pub fn run(command: CertsCommand) -> CliResult<()> {
    match command {
        CertsCommand::Init(args) => init(args),
    }
}

fn init(args: InitArgs) -> CliResult<()> {
    const DAY: u64 = 24 * 60 * 60;
    if args.days == 0 || args.ca_days == 0 || args.days > 36_500 || args.ca_days > 36_500 {
        return Err(CliError::Usage(
            "--days and --ca-days must be between 1 and 36500".to_owned(),
        ));
    }
    let services = if args.services.is_empty() {
        DEFAULT_SERVICES
            .iter()
            .map(|name| DevService::new(name))
            .collect()
    } else {
        args.services
            .iter()
            .map(|text| DevService::parse(text))
            .collect()
    };
    let options = DevPkiOptions {
        trust_domain: args.trust_domain,
        services,
        hosts: args.hosts,
        ca_validity: Duration::from_secs(args.ca_days * DAY),
        leaf_validity: Duration::from_secs(args.days * DAY),
        force: args.force,
    };
    let pki = shamal_tls::init_dev_pki(&args.dir, &options).map_err(|error| match error {
        TlsError::Config(message) => CliError::Usage(message),
        other => CliError::other(other.to_string()),
    })?;
    for path in &pki.written {
        println!("wrote {}", path.display());
    }
    for (service, identity) in &pki.services {
        println!("{:<10} {identity}", service.name);
    }
    println!(
        "hint: give each service its <service>.pem, <service>-key.pem and {} (docs/tls.md); keep ca-key.pem away from them",
        pki.dir.join("ca.pem").display()
    );
    Ok(())
}
