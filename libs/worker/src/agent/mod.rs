//! The worker's registry agent: the worker registers itself, watches the
//! registry and loads every version assigned to it, fetching artifacts into
//! a content-addressed cache; it unloads versions that are no longer
//! assigned and reports the state of each one back (placements).
//!
//! Membership: the worker registers with its capacity, then heartbeats at
//! the interval the registry answers (with its in-flight requests and queue
//! depth), registering again when the registry no longer knows it. On
//! shutdown it drains: it tells the registry it is `draining`, keeps serving
//! for `drain_grace` so routers route around it, stops taking requests,
//! finishes those it holds, then deregisters for good (`gone`).
//!
//! Placement rule: a worker holds every version whose lifecycle is
//! `registered` or `ready`, whose artifact format its runtime loads and
//! that the registry assigns to it (`assigned_workers` lists it, or is
//! empty: every capable worker). Versions load one at a time, in one task,
//! so loads do not fight for the CPU; the watch keeps being consumed
//! meanwhile, and a version that stops being assigned while it loads is
//! abandoned. A version that stops being assigned once loaded is unloaded;
//! requests already holding it finish first.
//!
//! One file per concern: [`settings`] (the agent's settings and their
//! validation), [`placement`] (which versions this worker must hold),
//! [`cache`] (the content-addressed artifact cache), `reconcile` (the loop
//! that loads and unloads versions), `reporter` (placement reports) and
//! `membership` (registration, heartbeats and drain).

use std::time::Duration;

use tokio::sync::watch;

pub mod cache;
mod membership;
pub mod placement;
mod reconcile;
mod reporter;
pub mod settings;

pub use cache::{clean_partials, ensure_artifact, hash_file};
pub(crate) use membership::Membership;
pub use membership::Timings;
pub use placement::{Catalog, Plan, desired_versions, plan};
pub use reconcile::signature_json;
pub(crate) use reconcile::{Agent, run};
pub use settings::{DEFAULT_DRAIN_GRACE, RegistryAgentSettings, hostname, validate_agent_settings};

/// (model, version).
pub type Key = (String, u64);

/// Time allowed for a unary call to the registry.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a version could not be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadFailure {
    pub reason: String,
    /// Worth another attempt later (registry unreachable, I/O error), as
    /// opposed to a bad artifact or model.
    pub transient: bool,
}

impl LoadFailure {
    fn permanent(reason: impl Into<String>) -> LoadFailure {
        LoadFailure {
            reason: reason.into(),
            transient: false,
        }
    }

    fn transient(reason: impl Into<String>) -> LoadFailure {
        LoadFailure {
            reason: reason.into(),
            transient: true,
        }
    }
}

/// Runs blocking file work on tokio's blocking pool; a task that panicked
/// reads as an I/O error.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|error| Err(std::io::Error::other(error.to_string())))
}

/// Resolves once `stop` flips to true, or once its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

#[cfg(test)]
mod tests;
