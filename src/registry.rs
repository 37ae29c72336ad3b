//! The served models by name and version: what requests resolve, what `GET /v1/repository`
//! lists, and the bookkeeping of a rollout. Plain data behind one lock; loading, warming up and
//! draining happen in `manage`, which drives the transitions here.
//!
//! Every name has at most one *serving* version, the one `name` resolves to; `name@version`
//! resolves any version still loaded (loading or serving). A rollout is: a new version enters
//! as `Loading`, then [`Registry::promote`] makes it serving and turns the previous one
//! `Draining` (no longer resolvable: its admitted requests finish, then `manage` frees it).
//! A failed load stays listed as `Failed` with its reason until the name's next load.

use crate::backend::{InFlight, ModelHandle};
use serde::Serialize;
use std::sync::{Arc, RwLock};

/// Where a version is in its life. `manage` moves it forward; nothing moves it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Being located, loaded and warmed up; reachable only as `name@version`.
    Loading,
    /// What `name` resolves to.
    Serving,
    /// Replaced or unloaded: finishing its admitted requests before it is freed.
    Draining,
    /// The load failed; the reason is kept for the repository listing.
    Failed(String),
}

/// One version of a model, as the registry keeps it.
struct Entry {
    name: String,
    version: String,
    source: String,
    phase: Phase,
    /// Set while the model's threads exist (from spawn until drained).
    handle: Option<Arc<ModelHandle>>,
    /// The memory the load was admitted with (`manage::estimate`), held until freed.
    estimated_bytes: u64,
}

/// A version as `GET /v1/repository` and `POST /v2/repository/index` show it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RepositoryEntry {
    pub name: String,
    pub version: String,
    pub source: String,
    /// `loading`, `warming`, `ready`, `restarting`, `draining` or `failed`.
    #[schema(example = "ready")]
    pub state: &'static str,
    /// Whether `name` alone resolves to this version.
    pub serving: bool,
    /// Why the load failed or the model is restarting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The memory this version was admitted with (weights per instance plus working memory).
    pub estimated_bytes: u64,
}

/// Why a registry change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("model {name:?} already has a version loading ({version}); wait for it to finish")]
    LoadInProgress { name: String, version: String },
    #[error("model {name:?} already has a version {version:?}; give another version or none (the next number)")]
    VersionExists { name: String, version: String },
    #[error("model {name:?} is not served here; available: {available}")]
    NotFound { name: String, available: String },
    #[error(
        "model {name:?} needs about {} (its weights for every instance plus working memory), but \
         {} of the {} model memory budget is held by {holders}; unload a model or raise \
         --model-memory-budget",
        crate::config::mib(*needed),
        crate::config::mib(*in_use),
        crate::config::mib(*budget)
    )]
    OverBudget {
        name: String,
        needed: u64,
        in_use: u64,
        budget: u64,
        holders: String,
    },
}

/// Why a lookup found nothing: the names, or the name's versions, that exist.
pub enum Missing {
    NoModel { available: String },
    NoVersion { versions: Vec<String> },
}

#[derive(Default)]
pub struct Registry {
    entries: RwLock<Vec<Entry>>,
    /// The highest numeric version each name has had (taken under the `entries` write lock).
    highest: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl Registry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Entry>> {
        self.entries.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Entry>> {
        self.entries.write().unwrap_or_else(|e| e.into_inner())
    }

    /// `name` (its serving version) or `name` at `version` (any version still loaded).
    pub fn lookup(&self, name: &str, version: Option<&str>) -> Result<Arc<ModelHandle>, Missing> {
        find(&self.read(), name, version).cloned()
    }

    /// [`Registry::lookup`] for a request: the version's in-flight count is raised under the
    /// lock, so once [`Registry::promote`] or [`Registry::begin_unload`] returns, no new
    /// request can reach the version they turned draining and its count only falls.
    pub fn lease(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<(Arc<ModelHandle>, InFlight), Missing> {
        let entries = self.read();
        let handle = find(&entries, name, version)?;
        Ok((handle.clone(), handle.in_flight()))
    }

    /// Every name's serving version, by name.
    pub fn serving(&self) -> Vec<Arc<ModelHandle>> {
        let entries = self.read();
        let mut models: Vec<Arc<ModelHandle>> = entries
            .iter()
            .filter(|e| e.phase == Phase::Serving)
            .filter_map(|e| e.handle.clone())
            .collect();
        models.sort_by(|a, b| a.name().cmp(b.name()));
        models
    }

    /// The versions of `name` that requests can reach (loading or serving).
    pub fn versions(&self, name: &str) -> Vec<String> {
        loaded_versions(&self.read(), name)
    }

    /// The served names, for error messages.
    pub fn available(&self) -> String {
        available(&self.read())
    }

    /// The versions holding memory and their estimates, for messages.
    pub fn holders(&self) -> String {
        holders(&self.read())
    }

    /// Every known version: loading, serving, draining and failed ones.
    pub fn list(&self) -> Vec<RepositoryEntry> {
        let entries = self.read();
        let mut list: Vec<RepositoryEntry> = entries.iter().map(describe).collect();
        list.sort_by(|a, b| {
            (a.name.as_str(), version_order(&a.version))
                .cmp(&(b.name.as_str(), version_order(&b.version)))
        });
        list
    }

    /// Memory held by every version whose threads exist (loading, serving or draining).
    pub fn estimated_bytes(&self) -> u64 {
        held_bytes(&self.read())
    }

    /// Reserve a version of `name` for loading: `version`, or one more than the highest
    /// numeric version the name has had. Refused while another version of the name loads, or
    /// if the version exists. A failed entry of the same version is replaced.
    pub fn begin_load(
        &self,
        name: &str,
        version: Option<&str>,
        source: &str,
        estimated_bytes: u64,
        budget: u64,
    ) -> Result<String, RegistryError> {
        let mut entries = self.write();
        no_load_in_progress(&entries, name)?;
        let mut highest = self.highest.lock().unwrap_or_else(|e| e.into_inner());
        let last = highest.get(name).copied().unwrap_or(0);
        let version = match version {
            Some(v) => v.to_owned(),
            None => (last + 1).to_string(),
        };
        if entries
            .iter()
            .any(|e| e.name == name && e.version == version && !matches!(e.phase, Phase::Failed(_)))
        {
            return Err(RegistryError::VersionExists {
                name: name.to_owned(),
                version,
            });
        }
        let in_use = held_bytes(&entries);
        if in_use + estimated_bytes > budget {
            return Err(RegistryError::OverBudget {
                name: name.to_owned(),
                needed: estimated_bytes,
                in_use,
                budget,
                holders: holders(&entries),
            });
        }
        // Numbers are never given twice, even after an unload: a client that pinned `m@1`
        // must not reach another model under that name.
        if let Ok(number) = version.parse::<u64>() {
            highest.insert(name.to_owned(), last.max(number));
        }
        // A new attempt replaces the name's failed entries: the listing keeps the latest reason.
        entries.retain(|e| !(e.name == name && matches!(e.phase, Phase::Failed(_))));
        entries.push(Entry {
            name: name.to_owned(),
            version: version.clone(),
            source: source.to_owned(),
            phase: Phase::Loading,
            handle: None,
            estimated_bytes,
        });
        Ok(version)
    }

    /// The loading version's threads exist.
    pub fn attach(&self, name: &str, version: &str, handle: Arc<ModelHandle>) {
        if let Some(entry) = find_mut(&mut self.write(), name, version) {
            entry.handle = Some(handle);
        }
    }

    /// The load failed: keep the reason, hand back the handle (if any) to be stopped.
    pub fn fail(&self, name: &str, version: &str, reason: String) -> Option<Arc<ModelHandle>> {
        let mut entries = self.write();
        let entry = find_mut(&mut entries, name, version)?;
        entry.phase = Phase::Failed(reason);
        entry.handle.take()
    }

    /// Make `version` the one `name` serves; the previous serving version (if any) starts
    /// draining and its handle is returned.
    pub fn promote(&self, name: &str, version: &str) -> Option<Arc<ModelHandle>> {
        let mut entries = self.write();
        let mut previous = None;
        for entry in entries.iter_mut().filter(|e| e.name == name) {
            if entry.version == version {
                entry.phase = Phase::Serving;
            } else if entry.phase == Phase::Serving {
                entry.phase = Phase::Draining;
                previous = entry.handle.clone();
            }
        }
        previous
    }

    /// Stop serving every loaded version of `name` (they drain); their handles are returned.
    /// Refused while a version of it loads: unload after the load finishes.
    pub fn begin_unload(&self, name: &str) -> Result<Vec<Arc<ModelHandle>>, RegistryError> {
        let mut entries = self.write();
        no_load_in_progress(&entries, name)?;
        let serving = |e: &Entry| e.name == name && e.phase == Phase::Serving && e.handle.is_some();
        if !entries.iter().any(serving) {
            return Err(RegistryError::NotFound {
                name: name.to_owned(),
                available: available(&entries),
            });
        }
        let mut draining = Vec::new();
        for entry in entries.iter_mut().filter(|e| serving(e)) {
            entry.phase = Phase::Draining;
            draining.extend(entry.handle.clone());
        }
        // Failed attempts of an unloaded name are forgotten with it.
        entries.retain(|e| !(e.name == name && matches!(e.phase, Phase::Failed(_))));
        Ok(draining)
    }

    /// A drained version is gone: it leaves the listing and gives back its memory.
    pub fn remove(&self, name: &str, version: &str) {
        self.write()
            .retain(|e| !(e.name == name && e.version == version && e.phase == Phase::Draining));
    }

    /// Every handle, whatever its phase (shutdown stops them all).
    pub fn all_handles(&self) -> Vec<Arc<ModelHandle>> {
        self.read()
            .iter()
            .filter_map(|e| e.handle.clone())
            .collect()
    }
}

fn find_mut<'a>(entries: &'a mut [Entry], name: &str, version: &str) -> Option<&'a mut Entry> {
    entries
        .iter_mut()
        .find(|e| e.name == name && e.version == version)
}

/// One load per name at a time: a second load or an unload waits for it to finish.
fn no_load_in_progress(entries: &[Entry], name: &str) -> Result<(), RegistryError> {
    match entries
        .iter()
        .find(|e| e.name == name && e.phase == Phase::Loading)
    {
        Some(loading) => Err(RegistryError::LoadInProgress {
            name: name.to_owned(),
            version: loading.version.clone(),
        }),
        None => Ok(()),
    }
}

/// A version holds memory from the moment its load is admitted until it is drained.
fn holds_memory(entry: &Entry) -> bool {
    !matches!(entry.phase, Phase::Failed(_))
}

fn held_bytes(entries: &[Entry]) -> u64 {
    entries
        .iter()
        .filter(|e| holds_memory(e))
        .map(|e| e.estimated_bytes)
        .sum()
}

/// The versions holding memory, for a message: `name@version (N MiB)`.
fn holders(entries: &[Entry]) -> String {
    let held: Vec<String> = entries
        .iter()
        .filter(|e| holds_memory(e))
        .map(|e| {
            format!(
                "{}@{} ({})",
                e.name,
                e.version,
                crate::config::mib(e.estimated_bytes)
            )
        })
        .collect();
    if held.is_empty() {
        "nothing".into()
    } else {
        held.join(", ")
    }
}

fn find<'a>(
    entries: &'a [Entry],
    name: &str,
    version: Option<&str>,
) -> Result<&'a Arc<ModelHandle>, Missing> {
    let resolvable = |e: &&Entry| match version {
        None => e.phase == Phase::Serving,
        Some(v) => e.version == v && matches!(e.phase, Phase::Serving | Phase::Loading),
    };
    if let Some(handle) = entries
        .iter()
        .filter(|e| e.name == name)
        .find(resolvable)
        .and_then(|e| e.handle.as_ref())
    {
        return Ok(handle);
    }
    let versions = loaded_versions(entries, name);
    Err(if versions.is_empty() {
        Missing::NoModel {
            available: available(entries),
        }
    } else {
        Missing::NoVersion { versions }
    })
}

fn loaded_versions(entries: &[Entry], name: &str) -> Vec<String> {
    let mut versions: Vec<String> = entries
        .iter()
        .filter(|e| e.name == name && matches!(e.phase, Phase::Serving | Phase::Loading))
        .map(|e| e.version.clone())
        .collect();
    versions.sort_by_key(|v| version_order(v));
    versions
}

fn available(entries: &[Entry]) -> String {
    let mut names: Vec<&str> = entries
        .iter()
        .filter(|e| e.phase == Phase::Serving)
        .map(|e| e.name.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Numeric versions in numeric order, then the others by text.
fn version_order(version: &str) -> (u64, String) {
    match version.parse::<u64>() {
        Ok(n) => (n, String::new()),
        Err(_) => (u64::MAX, version.to_owned()),
    }
}

fn describe(entry: &Entry) -> RepositoryEntry {
    let (state, reason) = match (&entry.phase, &entry.handle) {
        (Phase::Failed(reason), _) => ("failed", Some(reason.clone())),
        (Phase::Draining, _) => ("draining", None),
        (_, Some(handle)) => (handle.status.state_name(), handle.status.failure()),
        (_, None) => ("loading", None),
    };
    RepositoryEntry {
        name: entry.name.clone(),
        version: entry.version.clone(),
        source: entry.source.clone(),
        state,
        serving: entry.phase == Phase::Serving,
        reason,
        estimated_bytes: entry.estimated_bytes,
    }
}

/// A model name as clients write it: `name`, or `name@version`.
pub fn split_version(spec: &str) -> (&str, Option<&str>) {
    match spec.split_once('@') {
        Some((name, version)) => (name, Some(version)),
        None => (spec, None),
    }
}

/// Names and versions become URL path segments and metric labels: letters, digits, `_`, `-`
/// and `.`, at most 64 characters, not starting with `.`.
pub fn check_name(what: &str, value: &str) -> Result<(), String> {
    let valid = !value.is_empty()
        && value.len() <= 64
        && !value.starts_with('.')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{what} {value:?} is not valid: use 1 to 64 letters, digits, '_', '-' or '.', not starting with '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_number_themselves_and_a_load_in_progress_blocks_the_next() {
        let registry = Registry::default();
        assert_eq!(
            registry.begin_load("m", None, "a", 10, u64::MAX).unwrap(),
            "1"
        );
        assert!(matches!(
            registry.begin_load("m", None, "b", 10, u64::MAX),
            Err(RegistryError::LoadInProgress { .. })
        ));
        registry.promote("m", "1");
        assert_eq!(
            registry.begin_load("m", None, "b", 10, u64::MAX).unwrap(),
            "2"
        );
        assert_eq!(registry.estimated_bytes(), 20);
        assert!(matches!(
            registry.begin_load("big", None, "z", 100, 110),
            Err(RegistryError::OverBudget {
                needed: 100,
                in_use: 20,
                ..
            })
        ));
        registry.fail("m", "2", "broken".into());
        assert_eq!(
            registry.estimated_bytes(),
            10,
            "a failed load holds nothing"
        );
        // The next attempt takes the next number and replaces the failed entry.
        assert_eq!(
            registry.begin_load("m", None, "c", 10, u64::MAX).unwrap(),
            "3"
        );
        assert!(registry.list().iter().all(|e| e.state != "failed"));
        assert!(matches!(
            registry.begin_load("x", Some("1"), "a", 1, u64::MAX),
            Ok(v) if v == "1"
        ));
        registry.promote("x", "1");
        assert!(matches!(
            registry.begin_load("x", Some("1"), "a", 1, u64::MAX),
            Err(RegistryError::VersionExists { .. })
        ));
    }

    #[test]
    fn a_rollout_drains_the_old_version_and_an_unload_drains_the_name() {
        let registry = Registry::default();
        registry.begin_load("m", None, "a", 1, u64::MAX).unwrap();
        assert!(registry.promote("m", "1").is_none(), "nothing to drain");
        registry.begin_load("m", None, "b", 1, u64::MAX).unwrap();
        // No handles in this test: promote returns the old handle only when one exists.
        assert!(registry.promote("m", "2").is_none());
        let states: Vec<(String, &str, bool)> = registry
            .list()
            .into_iter()
            .map(|e| (e.version, e.state, e.serving))
            .collect();
        assert_eq!(
            states,
            vec![
                ("1".into(), "draining", false),
                ("2".into(), "loading", true)
            ]
        );
        registry.remove("m", "1");
        assert_eq!(registry.list().len(), 1);
        assert!(matches!(
            registry.begin_unload("nope"),
            Err(RegistryError::NotFound { .. })
        ));
        assert!(
            matches!(
                registry.begin_unload("m"),
                Err(RegistryError::NotFound { .. })
            ),
            "a version without threads has nothing to drain"
        );
        registry.fail("m", "2", "gone".into());
        assert_eq!(
            registry.begin_load("m", None, "c", 1, u64::MAX).unwrap(),
            "3",
            "numbers are never reused"
        );
        assert!(
            matches!(
                registry.begin_unload("m"),
                Err(RegistryError::LoadInProgress { .. })
            ),
            "an unload waits for the load in progress"
        );
    }

    #[test]
    fn names_and_versions_are_path_and_label_safe() {
        for good in ["lite0", "tf_efficientnetv2_s.in21k", "v-2", "2024.05"] {
            assert!(check_name("name", good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "a@b", "a b", "é", &"x".repeat(65)] {
            assert!(check_name("name", bad).is_err(), "{bad:?}");
        }
        assert_eq!(split_version("m@2"), ("m", Some("2")));
        assert_eq!(split_version("m"), ("m", None));
        assert!(version_order("10") > version_order("9"));
    }
}
