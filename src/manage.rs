//! Models at run time (`--model-control`): load, roll out and unload without a restart, and
//! the repository poller. The registry (`registry.rs`) holds the state; this file drives it.
//!
//! - **Load** (`POST /v1/models`, v2's `/v2/repository/models/{m}/load`): locate the files
//!   (any source `--model` accepts, `hf-hub:` included), estimate the memory and refuse if the
//!   budget cannot hold it, spawn the model, wait for its warm-up, then serve it.
//! - **Rollout**: loading a name that is served loads the new version beside the old one;
//!   once it is ready, `name` resolves to it and the old version drains. A failed load leaves
//!   the old version serving and keeps the reason for `GET /v1/repository`.
//! - **Drain**: a version that stopped serving waits until no request holds it (each request
//!   holds its version from the lookup, see `Registry::lease`), then its threads stop, its
//!   memory goes back to the system (`malloc_trim`), its metric series and cached answers go.
//! - **Poll** (`--model-control poll`): `--model-repository` is scanned every
//!   `--repository-poll-interval`; a folder that was added, changed or removed, and then stayed
//!   the same for one more scan (so a copy in progress is never loaded half-written), is
//!   loaded, rolled out or unloaded.
//!
//! Triton's model control (none / explicit / poll) is the model for the modes and the v2
//! repository extension.

use crate::backend::{device, LoadOutcome, ModelHandle, SpawnOptions, VersionSpec};
use crate::cache::ResponseCache;
use crate::config::ModelControl;
use crate::metrics::Metrics;
use crate::registry::{check_name, Registry, RegistryError, RepositoryEntry};
use crate::repository::{ModelFiles, ModelOptions, CONFIG_FILE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Working memory per image of the largest batch, as a multiple of the f32 input: the widest
/// activations of the served families at their input size are about 10 to 16 times the input
/// (EfficientNet's expanded stage-1 maps), a few of them live at once.
const WORKING_MEMORY_PER_INPUT: u64 = 24;

/// What to load.
#[derive(Debug, Clone)]
pub struct LoadRequest {
    pub name: String,
    /// Anything `--model` accepts after `NAME=`: a folder, a weights file, `hf-hub:ORG/REPO`.
    pub source: String,
    /// `None`: one more than the highest numeric version the name has had.
    pub version: Option<String>,
    pub options: ModelOptions,
}

/// Why a management request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error("{0}")]
    Disabled(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("model {name:?} version {version} failed to load: {reason}")]
    LoadFailed {
        name: String,
        version: String,
        reason: String,
    },
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl ManageError {
    /// The `error_type` clients match on.
    pub fn error_type(&self) -> &'static str {
        match self {
            ManageError::Disabled(_) => "model_control_disabled",
            ManageError::Invalid(_) => "bad_request",
            ManageError::Registry(RegistryError::NotFound { .. }) => "model_not_found",
            ManageError::Registry(RegistryError::OverBudget { .. }) => "insufficient_memory",
            ManageError::Registry(_) => "conflict",
            ManageError::LoadFailed { .. } => "load_failed",
            ManageError::ShuttingDown => "shutting_down",
        }
    }
}

/// Loads, rolls out, drains and polls.
pub struct Manager {
    registry: Arc<Registry>,
    control: ModelControl,
    settings: SpawnOptions,
    metrics: Arc<Metrics>,
    /// `--model-memory-budget`: what every version's estimate together may reach.
    memory_budget: u64,
    /// The longest a draining version waits for its requests.
    drain_timeout: Duration,
    repository: Option<PathBuf>,
    cache: Option<Arc<ResponseCache>>,
    /// `--jpeg-draft`: for models whose options do not say.
    jpeg_draft: bool,
    /// What a model's own `instances` option is resolved against.
    cpus: usize,
    intra_op_threads: Option<usize>,
    shutting_down: std::sync::atomic::AtomicBool,
}

/// What [`Manager`] is built from.
pub struct ManagerParts {
    pub registry: Arc<Registry>,
    pub control: ModelControl,
    pub settings: SpawnOptions,
    pub metrics: Arc<Metrics>,
    pub memory_budget: u64,
    pub drain_timeout: Duration,
    pub repository: Option<PathBuf>,
    pub cache: Option<Arc<ResponseCache>>,
    pub jpeg_draft: bool,
    /// The CPUs the process may use, and `--intra-op-threads`.
    pub cpus: usize,
    pub intra_op_threads: Option<usize>,
}

impl Manager {
    pub fn new(parts: ManagerParts) -> Self {
        Self {
            registry: parts.registry,
            control: parts.control,
            settings: parts.settings,
            metrics: parts.metrics,
            memory_budget: parts.memory_budget,
            drain_timeout: parts.drain_timeout,
            repository: parts.repository,
            cache: parts.cache,
            jpeg_draft: parts.jpeg_draft,
            cpus: parts.cpus,
            intra_op_threads: parts.intra_op_threads,
            shutting_down: Default::default(),
        }
    }

    pub fn control(&self) -> ModelControl {
        self.control
    }

    pub fn memory_budget(&self) -> u64 {
        self.memory_budget
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// No more loads: the server is stopping.
    pub fn begin_shutdown(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn explicit_only(&self, what: &str) -> Result<(), ManageError> {
        match self.control {
            ModelControl::Explicit => Ok(()),
            ModelControl::None => Err(ManageError::Disabled(format!(
                "cannot {what}: the server runs with --model-control none (the models given at \
                 start-up); start it with --model-control explicit and --admin-token"
            ))),
            ModelControl::Poll => Err(ManageError::Disabled(format!(
                "cannot {what}: the server runs with --model-control poll, so the model \
                 repository folder decides; add, change or remove a folder there"
            ))),
        }
    }

    /// A start-up model: version 1, serving at once (the server is not ready until it is).
    /// Start-up models are not refused for memory (the operator chose them), only warned about.
    pub fn start(
        &self,
        name: &str,
        source: &str,
        files: ModelFiles,
        options: &ModelOptions,
    ) -> anyhow::Result<LoadOutcome> {
        let request = LoadRequest {
            name: name.to_owned(),
            source: source.to_owned(),
            version: Some("1".to_owned()),
            options: options.clone(),
        };
        let (version, loaded) = self.begin_version(&request, files, u64::MAX)?;
        if self.registry.estimated_bytes() > self.memory_budget {
            tracing::warn!(
                model = name,
                budget = %crate::config::mib(self.memory_budget),
                holders = %self.registry.holders(),
                "the start-up models' estimated memory is above --model-memory-budget: run-time loads will be refused"
            );
        }
        self.registry.promote(name, &version);
        Ok(loaded)
    }

    /// Resolve the config, estimate the memory, reserve the version in the registry (refused
    /// beyond `budget`) and spawn the model; a spawn that fails is recorded as a failed load.
    fn begin_version(
        &self,
        request: &LoadRequest,
        files: ModelFiles,
        budget: u64,
    ) -> Result<(String, LoadOutcome), ManageError> {
        let LoadRequest { name, source, .. } = request;
        let options = ModelOptions {
            jpeg_draft: request.options.jpeg_draft.or(Some(self.jpeg_draft)),
            ..request.options.clone()
        };
        let config = files
            .config
            .resolve(&options)
            .map_err(|e| ManageError::Invalid(format!("source {source:?}: {e}")))?;
        let (settings, estimate) = self.settings_for(
            name,
            &files,
            &config.preprocess.input_size,
            self.settings_with(&request.options),
        );
        let version =
            self.registry
                .begin_load(name, request.version.as_deref(), source, estimate, budget)?;
        tracing::info!(model = %name, %version, %source, estimated = %crate::config::mib(estimate), "loading a model version");
        match self.spawn(name, &version, source, files, config, settings) {
            Ok((handle, loaded)) => {
                self.registry.attach(name, &version, handle);
                Ok((version, loaded))
            }
            Err(e) => {
                let reason = format!("{e:#}");
                self.registry.fail(name, &version, reason.clone());
                Err(ManageError::LoadFailed {
                    name: name.clone(),
                    version,
                    reason,
                })
            }
        }
    }

    /// `POST /v1/models`: load (or roll out) a version; with `wait`, answer once it serves.
    pub async fn load(
        self: &Arc<Self>,
        request: LoadRequest,
        wait: bool,
    ) -> Result<RepositoryEntry, ManageError> {
        self.explicit_only("load a model")?;
        self.load_unchecked(request, wait).await
    }

    /// `DELETE /v1/models/{m}`: stop serving every version of `name`; with `wait`, answer once
    /// they are drained and freed.
    pub async fn unload(
        self: &Arc<Self>,
        name: &str,
        wait: bool,
    ) -> Result<Vec<RepositoryEntry>, ManageError> {
        self.explicit_only("unload a model")?;
        self.unload_unchecked(name, wait).await
    }

    async fn load_unchecked(
        self: &Arc<Self>,
        request: LoadRequest,
        wait: bool,
    ) -> Result<RepositoryEntry, ManageError> {
        if self.is_shutting_down() {
            return Err(ManageError::ShuttingDown);
        }
        check_name("model name", &request.name).map_err(ManageError::Invalid)?;
        if let Some(version) = &request.version {
            check_name("version", version).map_err(ManageError::Invalid)?;
        }
        let files = locate(&request.source, request.options.arch.as_deref())
            .await
            .map_err(|e| ManageError::Invalid(format!("source {:?}: {e}", request.source)))?;
        let (version, loaded) = self.begin_version(&request, files, self.memory_budget)?;
        let name = request.name;
        // The load finishes in a task of its own: a client that hangs up while waiting (its
        // handler future is dropped) must not leave the version loading forever.
        let manager = self.clone();
        let (finished_name, finished_version) = (name.clone(), version.clone());
        let finish = tokio::spawn(async move {
            manager
                .finish_load(&finished_name, &finished_version, loaded)
                .await
        });
        if wait {
            finish.await.map_err(|e| ManageError::LoadFailed {
                name: name.clone(),
                version: version.clone(),
                reason: format!("the load task failed: {e}"),
            })??;
        }
        Ok(self.entry(&name, &version))
    }

    /// Serve a loaded version (draining the previous one), or record why it failed.
    async fn finish_load(
        self: &Arc<Self>,
        name: &str,
        version: &str,
        loaded: LoadOutcome,
    ) -> Result<(), ManageError> {
        let outcome = loaded
            .await
            .unwrap_or_else(|_| Err("the model thread exited while loading".into()));
        match outcome {
            Ok(()) if !self.is_shutting_down() => {
                tracing::info!(model = %name, %version, "model version ready: serving it");
                if let Some(previous) = self.registry.promote(name, version) {
                    self.spawn_drain(previous);
                }
                Ok(())
            }
            Ok(()) => {
                let reason = "the server shut down while it loaded".to_owned();
                if let Some(handle) = self.registry.fail(name, version, reason) {
                    self.retire(handle).await;
                }
                Err(ManageError::ShuttingDown)
            }
            Err(reason) => {
                tracing::warn!(model = %name, %version, %reason, "model version failed to load; the serving version (if any) stays");
                // Requests may hold this version (a lease taken while it loaded): they finish
                // before the threads stop.
                if let Some(handle) = self.registry.fail(name, version, reason.clone()) {
                    self.retire(handle).await;
                }
                Err(ManageError::LoadFailed {
                    name: name.to_owned(),
                    version: version.to_owned(),
                    reason,
                })
            }
        }
    }

    async fn unload_unchecked(
        self: &Arc<Self>,
        name: &str,
        wait: bool,
    ) -> Result<Vec<RepositoryEntry>, ManageError> {
        check_name("model name", name).map_err(|e| {
            ManageError::Invalid(format!(
                "{e}; an unload takes a name and unloads every version of it"
            ))
        })?;
        let draining = self.registry.begin_unload(name)?;
        let entries = draining
            .iter()
            .map(|h| self.entry(h.name(), h.version()))
            .collect();
        tracing::info!(model = %name, versions = draining.len(), "unloading: draining");
        let drains: Vec<_> = draining.into_iter().map(|h| self.spawn_drain(h)).collect();
        if wait {
            for drain in drains {
                let _ = drain.await;
            }
        }
        Ok(entries)
    }

    fn spawn_drain(self: &Arc<Self>, handle: Arc<ModelHandle>) -> tokio::task::JoinHandle<()> {
        let manager = self.clone();
        tokio::spawn(async move { manager.drain(handle).await })
    }

    /// A drained version: retired, then gone from the repository.
    async fn drain(&self, handle: Arc<ModelHandle>) {
        let (name, version) = (handle.name().to_owned(), handle.version().to_owned());
        self.retire(handle).await;
        self.registry.remove(&name, &version);
        tracing::info!(model = %name, %version, "model version unloaded and freed");
    }

    /// Wait for the version's requests (at most `drain_timeout`), stop its threads, then drop
    /// its series and cached answers (after the stop, so that no batch still running recreates
    /// them) and give its memory back.
    async fn retire(&self, handle: Arc<ModelHandle>) {
        let deadline = Instant::now() + self.drain_timeout;
        while handle.requests_in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = handle.requests_in_flight();
        if left > 0 {
            tracing::warn!(model = %handle.name(), version = %handle.version(), requests = left, "drain timeout: stopping the version with requests still in flight");
        }
        let (id, metrics) = (handle.id(), handle.metrics.clone());
        stop(handle).await;
        self.metrics.remove_model(&metrics);
        if let Some(cache) = &self.cache {
            cache.invalidate_model(id);
        }
        // The model's tensors were freed when its threads ended; give the pages back.
        let _ = tokio::task::spawn_blocking(device::release_freed_memory).await;
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down
            .load(std::sync::atomic::Ordering::Acquire)
    }

    fn entry(&self, name: &str, version: &str) -> RepositoryEntry {
        self.registry
            .list()
            .into_iter()
            .find(|e| e.name == name && e.version == version)
            .unwrap_or_else(|| RepositoryEntry {
                name: name.to_owned(),
                version: version.to_owned(),
                source: String::new(),
                state: "unloaded",
                serving: false,
                reason: None,
                estimated_bytes: 0,
            })
    }

    fn spawn(
        &self,
        name: &str,
        version: &str,
        source: &str,
        files: ModelFiles,
        config: crate::repository::ModelConfig,
        settings: SpawnOptions,
    ) -> anyhow::Result<(Arc<ModelHandle>, LoadOutcome)> {
        let metrics = self.metrics.for_model(name, version);
        let spec = VersionSpec {
            name: name.to_owned(),
            version: version.to_owned(),
            source: source.to_owned(),
            files,
            config,
        };
        ModelHandle::spawn(spec, metrics.clone(), settings)
            .inspect_err(|_| self.metrics.remove_model(&metrics))
    }

    /// The server's settings with a model's own options in place of the flags they override.
    fn settings_with(&self, options: &ModelOptions) -> SpawnOptions {
        let mut settings = self.settings;
        settings.backend = options.backend.unwrap_or(settings.backend);
        settings.dtype = options.dtype.unwrap_or(settings.dtype);
        settings.max_batch_size = options.max_batch_size.unwrap_or(settings.max_batch_size);
        if let Some(ms) = options.max_batch_delay_ms {
            settings.max_batch_delay = Duration::from_millis(ms);
        }
        if let Some(instances) = options.instances {
            settings.instances = crate::backend::InstanceLayout::resolve(
                instances,
                self.cpus,
                self.intra_op_threads,
                settings.device.is_cuda(),
            );
        }
        settings
    }

    /// How a model is spawned, and its estimated memory: `settings`, except that
    /// `--instances auto` runs one copy with every thread where its copies' estimate does not
    /// fit in what is left of the model memory budget (each copy holds its own weights and
    /// working memory, and one copy is what a tight budget can afford). An explicit
    /// `--instances N` is kept as given.
    fn settings_for(
        &self,
        name: &str,
        files: &ModelFiles,
        input_size: &(usize, usize),
        settings: SpawnOptions,
    ) -> (SpawnOptions, u64) {
        let estimate = self.estimate(files, input_size, &settings);
        let room = self
            .memory_budget
            .saturating_sub(self.registry.estimated_bytes());
        if settings.instances.solo_threads.is_none() || estimate <= room {
            return (settings, estimate);
        }
        let single = SpawnOptions {
            instances: settings.instances.single(),
            ..settings
        };
        tracing::warn!(
            model = name,
            estimated = %crate::config::mib(estimate),
            room = %crate::config::mib(room),
            "--instances auto: one copy, since its copies' estimated memory does not fit in what is left of --model-memory-budget"
        );
        (single, self.estimate(files, input_size, &single))
    }

    /// A version's memory, estimated before loading: the weights file once per copy
    /// (halved for f16/bf16 from an f32 file would be optimistic, so it is not), plus
    /// working memory for the largest batch.
    fn estimate(
        &self,
        files: &ModelFiles,
        input_size: &(usize, usize),
        settings: &SpawnOptions,
    ) -> u64 {
        let weights = std::fs::metadata(&files.weights).map_or(0, |m| m.len());
        let (h, w) = *input_size;
        let input = 3 * h as u64 * w as u64 * 4;
        let working = settings.max_batch_size as u64 * input * WORKING_MEMORY_PER_INPUT;
        (weights + working) * settings.instances.copies().len() as u64
    }

    /// `--model-control poll`: apply the repository folder's changes until `stop` resolves.
    pub async fn poll(
        self: Arc<Self>,
        interval: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let Some(root) = self.repository.clone() else {
            return;
        };
        let mut watcher = FolderWatcher::new(scan_folders(&root).unwrap_or_default());
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let scanned = {
                let root = root.clone();
                tokio::task::spawn_blocking(move || scan_folders(&root)).await
            };
            // A folder that cannot be read (a remount) is not a folder emptied: skip the scan.
            let Ok(Some(scanned)) = scanned else {
                tracing::warn!(repository = %root.display(), "repository poll: cannot read the folder; trying again");
                continue;
            };
            for change in watcher.changes(scanned) {
                if let Err(e) = self.apply(&root, &change).await {
                    tracing::warn!(change = ?change, error = %e, "repository poll: not applied");
                    // Refused for now (a load in progress, the memory budget while a rollout
                    // drains): tried again at the next scan. A failed load waits for a change.
                    if matches!(
                        e,
                        ManageError::Registry(
                            RegistryError::LoadInProgress { .. } | RegistryError::OverBudget { .. }
                        )
                    ) {
                        watcher.retry(&change);
                    }
                }
            }
        }
    }

    async fn apply(
        self: &Arc<Self>,
        root: &Path,
        change: &FolderChange,
    ) -> Result<(), ManageError> {
        match change {
            FolderChange::Load(name) => {
                let request = LoadRequest {
                    name: name.clone(),
                    source: root.join(name).to_string_lossy().into_owned(),
                    version: None,
                    options: ModelOptions::default(),
                };
                self.load_unchecked(request, true).await.map(|_| ())
            }
            FolderChange::Unload(name) => self.unload_unchecked(name, false).await.map(|_| ()),
        }
    }

    /// `POST /v2/repository/models/{m}/load` without a source: the folder of that name in
    /// `--model-repository`.
    pub fn repository_source(&self, name: &str) -> Option<String> {
        let folder = self.repository.as_ref()?.join(name);
        folder
            .join(CONFIG_FILE)
            .is_file()
            .then(|| folder.to_string_lossy().into_owned())
    }
}

/// Stop a version's threads and wait for them (off the async workers).
async fn stop(handle: Arc<ModelHandle>) {
    handle.close();
    let _ = tokio::task::spawn_blocking(move || handle.join()).await;
}

/// Find a model's files; `hf-hub:` sources may download (blocking), so this runs off the
/// async workers.
pub async fn locate(source: &str, arch: Option<&str>) -> Result<ModelFiles, String> {
    let source = source.to_owned();
    let arch = arch.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let path = if source.starts_with(crate::hub::PREFIX) {
            crate::hub::resolve(&source)?
        } else {
            PathBuf::from(&source)
        };
        ModelFiles::locate_with(&path, arch.as_deref())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// A folder's identity for the poller: every file's name, size and modification time.
type Fingerprint = Vec<(String, u64, Option<SystemTime>)>;

/// The model folders of a repository (subfolders holding a config.json), by name; `None` if
/// the folder cannot be read.
fn scan_folders(root: &Path) -> Option<BTreeMap<String, Fingerprint>> {
    let entries = std::fs::read_dir(root).ok()?;
    let folders = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join(CONFIG_FILE).is_file())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_owned();
            Some((name, fingerprint(&p)))
        })
        .collect();
    Some(folders)
}

fn fingerprint(folder: &Path) -> Fingerprint {
    let mut files: Fingerprint = std::fs::read_dir(folder)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    // Follows links: mounted volumes (Kubernetes ConfigMaps, PVC layouts)
                    // swap files through symlinks.
                    let meta = std::fs::metadata(e.path()).ok()?;
                    meta.is_file().then(|| {
                        (
                            e.file_name().to_string_lossy().into_owned(),
                            meta.len(),
                            meta.modified().ok(),
                        )
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// What the poller does about one folder.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FolderChange {
    /// Added or changed: load it (a rollout if the name is served).
    Load(String),
    /// Removed: unload it.
    Unload(String),
}

/// Turns successive scans into changes, each applied once the folder held still for a scan.
struct FolderWatcher {
    /// What was last applied (or found at start-up), by name.
    applied: BTreeMap<String, Fingerprint>,
    /// The previous scan: a difference is acted on only when two scans agree.
    previous: BTreeMap<String, Fingerprint>,
}

impl FolderWatcher {
    fn new(initial: BTreeMap<String, Fingerprint>) -> Self {
        Self {
            applied: initial.clone(),
            previous: initial,
        }
    }

    fn changes(&mut self, scanned: BTreeMap<String, Fingerprint>) -> Vec<FolderChange> {
        let mut changes = Vec::new();
        for (name, print) in &scanned {
            let settled = self.previous.get(name) == Some(print);
            if settled && self.applied.get(name) != Some(print) {
                self.applied.insert(name.clone(), print.clone());
                changes.push(FolderChange::Load(name.clone()));
            }
        }
        let removed: Vec<String> = self
            .applied
            .keys()
            .filter(|name| !scanned.contains_key(*name) && !self.previous.contains_key(*name))
            .cloned()
            .collect();
        for name in removed {
            self.applied.remove(&name);
            changes.push(FolderChange::Unload(name));
        }
        self.previous = scanned;
        changes
    }

    /// Forget that `change` was applied, so that the next scan makes it again.
    fn retry(&mut self, change: &FolderChange) {
        match change {
            FolderChange::Load(name) => {
                self.applied.remove(name);
            }
            FolderChange::Unload(name) => {
                let print = self.previous.get(name).cloned().unwrap_or_default();
                self.applied.insert(name.clone(), print);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(folders: &[(&str, u64)]) -> BTreeMap<String, Fingerprint> {
        folders
            .iter()
            .map(|(name, size)| {
                (
                    name.to_string(),
                    vec![("model.safetensors".into(), *size, None)],
                )
            })
            .collect()
    }

    #[test]
    fn the_poller_acts_once_a_folder_holds_still() {
        let mut watcher = FolderWatcher::new(scan(&[("a", 1)]));
        assert!(watcher.changes(scan(&[("a", 1)])).is_empty());
        // b appears while being copied: nothing until two scans agree.
        assert!(watcher.changes(scan(&[("a", 1), ("b", 5)])).is_empty());
        assert!(watcher.changes(scan(&[("a", 1), ("b", 9)])).is_empty());
        assert_eq!(
            watcher.changes(scan(&[("a", 1), ("b", 9)])),
            vec![FolderChange::Load("b".into())]
        );
        assert!(
            watcher.changes(scan(&[("a", 1), ("b", 9)])).is_empty(),
            "applied once"
        );
        // a changes (a new version), then b goes away.
        assert!(watcher.changes(scan(&[("a", 2), ("b", 9)])).is_empty());
        assert_eq!(
            watcher.changes(scan(&[("a", 2), ("b", 9)])),
            vec![FolderChange::Load("a".into())]
        );
        assert!(watcher.changes(scan(&[("a", 2)])).is_empty());
        assert_eq!(
            watcher.changes(scan(&[("a", 2)])),
            vec![FolderChange::Unload("b".into())]
        );
        // A refused change comes back at the next scan.
        assert!(watcher.changes(scan(&[("a", 3)])).is_empty());
        let change = watcher.changes(scan(&[("a", 3)]));
        assert_eq!(change, vec![FolderChange::Load("a".into())]);
        watcher.retry(&change[0]);
        assert_eq!(
            watcher.changes(scan(&[("a", 3)])),
            vec![FolderChange::Load("a".into())]
        );
    }
}
