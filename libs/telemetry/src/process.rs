//! The process skeleton every service binary shares: tracing, the command
//! line, the configuration (exit 64 when invalid), `--print-config`, bind
//! (exit 71 when a port cannot be had), run until SIGINT or SIGTERM.
//!
//! A service's `main.rs` is then a short script:
//!
//! ```ignore
//! const SERVICE: Service = Service { name: "shamal-router", about: "…",
//!     env_prefix: "SHAMAL_ROUTER_", version: env!("CARGO_PKG_VERSION") };
//! let config = match SERVICE.configure(RouterConfig::load) { Ok(c) => c, Err(code) => return code };
//! SERVICE.serve(bind(&config).await, |listeners, metrics, shutdown| run(config, listeners, metrics, shutdown)).await
//! ```

use std::ffi::OsString;
use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;

use clap::{Arg, ArgMatches, Args, Command, FromArgMatches};
use serde::Serialize;

use crate::MetricsRegistry;
use crate::config::{ConfigError, printable};

/// Exit code of an invalid configuration (`EX_CONFIG`).
pub const EXIT_CONFIG: u8 = 64;
/// Exit code of a listener that cannot be bound (`EX_OSERR`).
pub const EXIT_BIND: u8 = 71;

/// The future that completes when the process is asked to stop.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A service binary's identity and the prefix of its environment variables.
#[derive(Clone, Copy, Debug)]
pub struct Service {
    /// Binary name, the prefix of its error messages (`shamal-router`).
    pub name: &'static str,
    /// One line for `--help`.
    pub about: &'static str,
    /// Prefix of the environment variables (`SHAMAL_ROUTER_`): each flag
    /// that takes a value and names no variable of its own is also read
    /// from `<prefix><FIELD>`, the field's name in upper case
    /// (`--grpc-listen`, field `grpc_listen`: `SHAMAL_ROUTER_GRPC_LISTEN`).
    /// A flag beats its variable.
    pub env_prefix: &'static str,
    /// `--version` (the binary's `CARGO_PKG_VERSION`).
    pub version: &'static str,
}

/// A service's command line: its settings `A` and `--print-config`.
#[derive(Debug)]
pub struct ServiceCli<A> {
    pub args: A,
    /// Print the effective configuration as TOML (secrets redacted) and exit.
    pub print_config: bool,
}

const PRINT_CONFIG: &str = "print_config";

impl Service {
    /// The clap command: `A`'s flags, each with its environment variable
    /// (see [`Service::env_prefix`]), and `--print-config`.
    pub fn command<A: Args>(&self) -> Command {
        let command = A::augment_args(Command::new(self.name))
            .about(self.about)
            .version(self.version)
            .arg(
                Arg::new(PRINT_CONFIG)
                    .long("print-config")
                    .action(clap::ArgAction::SetTrue)
                    .help("Print the effective configuration as TOML (secrets redacted) and exit"),
            );
        let prefix = self.env_prefix;
        command.mut_args(|arg| {
            let takes_value = arg.get_action().takes_values();
            if !takes_value || arg.get_env().is_some() {
                return arg;
            }
            let name = format!("{prefix}{}", arg.get_id().as_str().to_ascii_uppercase());
            arg.env(name)
        })
    }

    /// The environment variables the service reads with `A`'s flags: for a
    /// service's test that every documented variable is read.
    pub fn variables_read<A: Args>(&self) -> Vec<String> {
        self.command::<A>()
            .get_arguments()
            .filter_map(|arg| arg.get_env())
            .map(|name| name.to_string_lossy().into_owned())
            .collect()
    }

    /// Parses `arguments` (the program name first) and the environment.
    pub fn try_parse_from<A, I, T>(&self, arguments: I) -> Result<ServiceCli<A>, clap::Error>
    where
        A: Args + FromArgMatches,
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let matches = self.command::<A>().try_get_matches_from(arguments)?;
        Self::from_matches(&matches)
    }

    fn from_matches<A: FromArgMatches>(matches: &ArgMatches) -> Result<ServiceCli<A>, clap::Error> {
        Ok(ServiceCli {
            args: A::from_arg_matches(matches)?,
            print_config: matches.get_flag(PRINT_CONFIG),
        })
    }

    /// Starts the process: installs tracing, parses the command line
    /// (exiting as clap does on `--help` or a bad flag), loads the
    /// configuration with `load` and, with `--print-config`, prints it.
    /// `Err` carries the code to exit with: 64 for an invalid
    /// configuration, 0 after `--print-config`.
    pub fn configure<A, C>(
        &self,
        load: impl FnOnce(&A) -> Result<C, ConfigError>,
    ) -> Result<C, ExitCode>
    where
        A: Args + FromArgMatches,
        C: Serialize,
    {
        crate::init_tracing();
        let matches = self.command::<A>().get_matches();
        let cli = Self::from_matches::<A>(&matches).unwrap_or_else(|error| error.exit());
        let config = load(&cli.args).map_err(|error| {
            eprintln!("{}: invalid configuration: {error}", self.name);
            ExitCode::from(EXIT_CONFIG)
        })?;
        if cli.print_config {
            match printable(&config) {
                Ok(text) => println!("{text}"),
                Err(error) => {
                    eprintln!("{}: cannot print the configuration: {error}", self.name);
                    return Err(ExitCode::FAILURE);
                }
            }
            return Err(ExitCode::SUCCESS);
        }
        Ok(config)
    }

    /// Runs the service on `listeners` (exit 71 when binding failed) with a
    /// fresh metrics registry until SIGINT or SIGTERM, and maps its result
    /// to the exit code (1 on failure, logged). `run` is called only once
    /// the listeners are bound, so it is where to log that the service
    /// listens.
    pub async fn serve<L, F, E>(
        &self,
        listeners: std::io::Result<L>,
        run: impl FnOnce(L, MetricsRegistry, Shutdown) -> F,
    ) -> ExitCode
    where
        F: Future<Output = Result<(), E>>,
        E: Display,
    {
        let listeners = match listeners {
            Ok(listeners) => listeners,
            Err(error) => {
                eprintln!("{}: {error}", self.name);
                return ExitCode::from(EXIT_BIND);
            }
        };
        match run(
            listeners,
            MetricsRegistry::new(),
            Box::pin(crate::shutdown_signal()),
        )
        .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(service = self.name, error = %error, "service failed");
                ExitCode::FAILURE
            }
        }
    }
}

/// The environment variable names starting with `prefix` that `documents`
/// mention (sorted, once each): for a service's test that every variable
/// its documentation names is read.
pub fn documented_variables(prefix: &str, documents: &[&str]) -> Vec<String> {
    let mut names = Vec::new();
    for text in documents {
        let mut rest = *text;
        while let Some(found) = rest.find(prefix) {
            let tail = &rest[found..];
            let length = tail
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            // `SHAMAL_ROUTER_*` and the like name a family, not a variable.
            if length > prefix.len() {
                names.push(tail[..length].to_owned());
            }
            rest = &tail[length.max(prefix.len())..];
        }
    }
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, Default, clap::Args)]
    struct Shared {
        #[arg(long)]
        grpc_listen: Option<String>,
    }

    #[derive(Debug, Default, clap::Args)]
    struct ExampleArgs {
        #[arg(long)]
        config: Option<String>,
        #[command(flatten)]
        shared: Shared,
        #[arg(long = "worker", value_delimiter = ',')]
        workers: Vec<String>,
        #[arg(long, env = "ORT_DYLIB_PATH")]
        library: Option<String>,
        #[arg(long)]
        verbose: bool,
    }

    const EXAMPLE: Service = Service {
        name: "shamal-example",
        about: "example",
        env_prefix: "SHAMAL_EXAMPLE_",
        version: "0.0.0",
    };

    #[test]
    fn every_value_flag_reads_its_prefixed_variable() {
        let command = EXAMPLE.command::<ExampleArgs>();
        let env = |id: &str| {
            command
                .get_arguments()
                .find(|arg| arg.get_id() == id)
                .and_then(|arg| arg.get_env())
                .map(|name| name.to_string_lossy().into_owned())
        };
        assert_eq!(env("config").as_deref(), Some("SHAMAL_EXAMPLE_CONFIG"));
        assert_eq!(
            env("grpc_listen").as_deref(),
            Some("SHAMAL_EXAMPLE_GRPC_LISTEN"),
            "flattened args too"
        );
        assert_eq!(
            env("workers").as_deref(),
            Some("SHAMAL_EXAMPLE_WORKERS"),
            "named after the field, not the flag"
        );
        assert_eq!(env("library").as_deref(), Some("ORT_DYLIB_PATH"), "kept");
        assert_eq!(env("verbose"), None, "switches have none");
        assert_eq!(env(PRINT_CONFIG), None);

        let cli: ServiceCli<ExampleArgs> = EXAMPLE
            .try_parse_from([
                "shamal-example",
                "--grpc-listen",
                "a:1",
                "--worker",
                "b:1,c:1",
                "--print-config",
            ])
            .unwrap();
        assert!(cli.print_config);
        assert_eq!(cli.args.shared.grpc_listen.as_deref(), Some("a:1"));
        assert_eq!(cli.args.workers, ["b:1", "c:1"]);
    }

    #[test]
    fn documented_variables_are_found() {
        let names = documented_variables(
            "SHAMAL_EXAMPLE_",
            &[
                "| `SHAMAL_EXAMPLE_GRPC_LISTEN` | `SHAMAL_EXAMPLE_*` and SHAMAL_EXAMPLE_A1=2",
                "SHAMAL_EXAMPLE_GRPC_LISTEN, SHAMAL_OTHER_X",
            ],
        );
        assert_eq!(names, ["SHAMAL_EXAMPLE_A1", "SHAMAL_EXAMPLE_GRPC_LISTEN"]);
    }
}
