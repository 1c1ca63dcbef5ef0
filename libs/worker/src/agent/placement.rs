//! Placement: which versions this worker must hold, given the registry's
//! state, and what to load and unload to get there.

use std::collections::{BTreeMap, BTreeSet};

use shamal_registry_client::proto::{Artifact, ModelState, WatchEvent};

use super::Key;

/// Placement state, as the registry spells it: the version is loading.
pub const LOADING: &str = "loading";
/// Placement state: the version serves requests.
pub const READY: &str = "ready";
/// Placement state: the version could not be loaded.
pub const FAILED: &str = "failed";
/// Placement state: the worker no longer holds the version.
pub const UNLOADED: &str = "unloaded";

/// The versions worker `worker_id` must hold: lifecycle `registered` or
/// `ready`, with an artifact in one of `formats`, assigned to it (see
/// [`shamal_registry_client::assigned_to`]).
pub fn desired_versions(
    models: &BTreeMap<String, ModelState>,
    formats: &[&str],
    worker_id: &str,
) -> BTreeMap<Key, Artifact> {
    models
        .values()
        .flat_map(|model| {
            model.versions.iter().filter_map(|version| {
                let artifact = version.artifact.as_ref()?;
                let wanted = matches!(version.lifecycle.as_str(), "registered" | "ready")
                    && formats.contains(&artifact.format.as_str())
                    && shamal_registry_client::assigned_to(version, worker_id);
                wanted.then(|| ((model.name.clone(), version.version), artifact.clone()))
            })
        })
        .collect()
}

/// What to do to go from the versions held to the desired ones.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Desired versions not held yet, in (model, version) order.
    pub load: Vec<Key>,
    /// Versions held that are no longer desired.
    pub unload: Vec<Key>,
}

/// Diffs the desired set against the versions held (attempted, whatever
/// the outcome).
pub fn plan<'a, V>(
    desired: &BTreeMap<Key, Artifact>,
    held: impl IntoIterator<Item = (&'a Key, V)>,
) -> Plan {
    let held: BTreeSet<&Key> = held.into_iter().map(|(key, _)| key).collect();
    Plan {
        load: desired
            .keys()
            .filter(|key| !held.contains(key))
            .cloned()
            .collect(),
        unload: held
            .into_iter()
            .filter(|key| !desired.contains_key(*key))
            .cloned()
            .collect(),
    }
}

/// The registry's state of every model, as Watch events bring it.
#[derive(Default)]
pub struct Catalog {
    pub models: BTreeMap<String, ModelState>,
}

impl Catalog {
    pub fn apply(&mut self, event: &WatchEvent) {
        if event.snapshot {
            self.models.clear();
        }
        for model in &event.models {
            self.models.insert(model.name.clone(), model.clone());
        }
        for name in &event.removed {
            self.models.remove(name);
        }
    }
}
