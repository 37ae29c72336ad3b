//! Wiring: turns a [`Config`] into running models, the inference service and its listeners
//! ([`run`], [`serve`]), or into the models and service alone ([`start_service`], what the CLI
//! drives in process); derives the budgets from what the container gives, finds every
//! model's files, and drains on shutdown.

use crate::backend::{self, ModelHandle, SpawnOptions};
use crate::config::{self, Config, ModelControl};
use crate::error::LoadError;
use crate::images::{self, decode::DecodeOptions};
use crate::manage::{self, Manager, ManagerParts};
use crate::metrics::Metrics;
use crate::repository::{self, ModelFiles, ModelSpec};
use crate::{auth, budget, cache, grpc, http, infer, registry, tls};
use anyhow::{anyhow, bail, Context, Result};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Process-wide tuning that must happen before libtorch allocates (call first in `main`).
pub fn tune_process() {
    backend::device::tune_allocator();
    backend::device::flush_denormals();
}

/// Serve until `shutdown` resolves, then drain: stop accepting, answer every admitted request,
/// stop the models, all within `--shutdown-timeout`. Returns an error if a model fails to load.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let grpc = match config.grpc_port {
        Some(port) => Some(
            TcpListener::bind((config.host.as_str(), port))
                .await
                .with_context(|| {
                    format!("cannot listen on {}:{port} (--grpc-port)", config.host)
                })?,
        ),
        None => None,
    };
    serve(
        config,
        Listeners {
            http: listener,
            grpc,
        },
        shutdown,
    )
    .await
}

/// The sockets a server answers on: HTTP (`/v1`, v2 REST, health, metrics) and, when given,
/// v2 gRPC.
pub struct Listeners {
    pub http: TcpListener,
    pub grpc: Option<TcpListener>,
}

/// [`run`] on listeners the caller bound (tests bind both to port 0).
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    config.validate().map_err(|e| anyhow!(e))?;
    let keys = api_keys(&config)?;
    let tls = tls_certificates(&config)?;
    let Service {
        inference,
        manager,
        loads,
    } = start_service(&config).await?;
    let stop = StopSignal::new();
    let tasks = spawn_listeners(
        &config,
        listeners,
        Shared {
            inference: &inference,
            manager: &manager,
            keys,
            tls,
        },
        &stop,
    )?;
    if manager.control() == ModelControl::Poll {
        tokio::spawn(
            manager
                .clone()
                .poll(config.repository_poll_interval, stop.stopped()),
        );
    }
    let failure = until_shutdown_or_load_failure(shutdown, loads).await;

    let deadline = Instant::now() + config.shutdown_timeout();
    tracing::info!("shutting down: no new connections, finishing admitted requests");
    inference.begin_shutdown();
    manager.begin_shutdown();
    stop.send();
    tasks.drain(deadline).await;
    stop_models(&manager.registry().all_handles(), deadline).await;
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// The inference keys (reloaded on SIGHUP) and the management key, if any.
fn api_keys(config: &Config) -> Result<Keys> {
    let inference = Arc::new(
        auth::ApiKeys::new(&config.api_keys, config.api_keys_file.as_deref())
            .map_err(|e| anyhow!(e))?,
    );
    log_authentication(&inference, config.protect_metrics);
    tokio::spawn(auth::reload_on_sighup(inference.clone()));
    let admin = match &config.admin_token {
        Some(token) => Some(Arc::new(
            auth::ApiKeys::new(std::slice::from_ref(token), None).map_err(|e| anyhow!(e))?,
        )),
        None => None,
    };
    Ok(Keys { inference, admin })
}

struct Keys {
    inference: Arc<auth::ApiKeys>,
    admin: Option<Arc<auth::ApiKeys>>,
}

/// `--tls-cert`'s certificates (reloaded on SIGHUP), when the listeners speak TLS. Bad files
/// stop the start-up, naming the flag and the file.
fn tls_certificates(config: &Config) -> Result<Option<Arc<tls::Certificates>>> {
    let Some(files) = config.tls_files() else {
        return Ok(None);
    };
    let certificates = Arc::new(tls::Certificates::load(files).map_err(|e| anyhow!(e))?);
    tracing::info!(
        cert = %certificates.files().cert.display(),
        client_certificates = if certificates.requires_client_certificate() {
            "required (--tls-client-ca)"
        } else {
            "not asked for"
        },
        "TLS on every listener"
    );
    tokio::spawn(tls::reload_on_sighup(certificates.clone()));
    Ok(Some(certificates))
}

/// What the listeners share: the service, the models, the keys and the certificates.
struct Shared<'a> {
    inference: &'a Arc<infer::Inference>,
    manager: &'a Arc<Manager>,
    keys: Keys,
    tls: Option<Arc<tls::Certificates>>,
}

/// Tells every listener and background task that the server is shutting down.
struct StopSignal {
    sender: watch::Sender<bool>,
}

impl StopSignal {
    fn new() -> Self {
        Self {
            sender: watch::channel(false).0,
        }
    }

    /// Resolves once [`StopSignal::send`] is called.
    fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut receiver = self.sender.subscribe();
        async move {
            let _ = receiver.wait_for(|stop| *stop).await;
        }
    }

    fn send(&self) {
        let _ = self.sender.send(true);
    }
}

/// The listeners' serving tasks: HTTP, and gRPC when it listens.
struct ListenerTasks {
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    grpc: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

/// Serve HTTP (and gRPC, when given a listener) until `stop` is sent; over TLS when
/// certificates are given.
fn spawn_listeners(
    config: &Config,
    listeners: Listeners,
    shared: Shared<'_>,
    stop: &StopSignal,
) -> Result<ListenerTasks> {
    let Shared {
        inference,
        manager,
        keys,
        tls,
    } = shared;
    let require_client_certificate = tls
        .as_ref()
        .is_some_and(|t| t.requires_client_certificate());
    let grpc = match listeners.grpc {
        Some(listener) => {
            tracing::info!(address = %listener.local_addr()?, tls = tls.is_some(), "gRPC listening");
            let settings = grpc::Settings {
                max_message_bytes: config.max_body_bytes,
                access_log: config.access_log == config::Switch::On,
                require_client_certificate,
            };
            let (inference, keys, shutdown) =
                (inference.clone(), keys.inference.clone(), stop.stopped());
            Some(match &tls {
                Some(certificates) => {
                    let incoming =
                        tls::TlsListener::new(listener, certificates.clone(), tls::Alpn::Grpc)?
                            .into_stream();
                    tokio::spawn(grpc::serve(incoming, inference, keys, settings, shutdown))
                }
                None => {
                    let incoming = grpc::plain_incoming(listener);
                    tokio::spawn(grpc::serve(incoming, inference, keys, settings, shutdown))
                }
            })
        }
        None => None,
    };
    let state = Arc::new(http::AppState {
        inference: inference.clone(),
        manager: manager.clone(),
        admin: keys.admin,
        limits: http::RequestLimits {
            max_images_per_request: config.max_images_per_request,
            max_body_bytes: config.max_body_bytes,
            body_timeout: std::time::Duration::from_secs(config.body_timeout),
        },
        keys: keys.inference,
        protect_metrics: config.protect_metrics,
        cors_origins: config.cors_origins.clone(),
        access_log: config.access_log == config::Switch::On,
        require_client_certificate,
    });
    let listener = listeners.http;
    let address = listener.local_addr()?;
    // `Peer` (the client's address and whether it presented a certificate) reaches every
    // request as `ConnectInfo<Peer>`: the access log and the mTLS check read it.
    let app = http::router(state).into_make_service_with_connect_info::<tls::Peer>();
    let http_shutdown = stop.stopped();
    // The same serving on both branches; the listener types differ.
    let http = match &tls {
        Some(certificates) => {
            let listener = tls::TlsListener::new(listener, certificates.clone(), tls::Alpn::Http)?;
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(http_shutdown)
                    .await
            })
        }
        None => tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(http_shutdown)
                .await
        }),
    };
    tracing::info!(%address, tls = tls.is_some(), "listening");
    Ok(ListenerTasks { http, grpc })
}

impl ListenerTasks {
    /// Wait until `deadline` for the requests and calls in flight to finish.
    async fn drain(self, deadline: Instant) {
        match tokio::time::timeout_at(deadline.into(), self.http).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "server error"),
            Ok(Err(e)) => tracing::error!(error = %e, "server task failed"),
            Err(_) => tracing::warn!("shutdown timeout reached with requests still in flight"),
        }
        if let Some(grpc) = self.grpc {
            match tokio::time::timeout_at(deadline.into(), grpc).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "gRPC server error"),
                Ok(Err(e)) => tracing::error!(error = %e, "gRPC server task failed"),
                Err(_) => {
                    tracing::warn!("shutdown timeout reached with gRPC calls still in flight")
                }
            }
        }
    }
}

/// Serve until `shutdown` resolves, or until a model fails to load (that failure).
async fn until_shutdown_or_load_failure(
    shutdown: impl Future<Output = ()> + Send,
    mut loads: JoinSet<Result<(), LoadError>>,
) -> Option<LoadError> {
    tokio::pin!(shutdown);
    let mut loading = true;
    loop {
        tokio::select! {
            _ = &mut shutdown => return None,
            loaded = loads.join_next(), if loading => match loaded {
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => return Some(e),
                Some(Err(join)) => return Some(LoadError::Invalid { model: "?".into(), message: join.to_string() }),
                None => { loading = false; tracing::info!("all models ready"); }
            },
        }
    }
}

/// The models and the inference service, started: what `serve` puts behind its listeners and
/// `visionserve classify` drives in process.
pub struct Service {
    pub inference: Arc<infer::Inference>,
    pub manager: Arc<Manager>,
    /// One task per model, finishing when it is loaded and warmed up (or failed to).
    loads: JoinSet<Result<(), LoadError>>,
}

impl Service {
    /// Wait until every model is loaded and warmed up; the first failure is returned.
    pub async fn wait_ready(&mut self) -> Result<()> {
        while let Some(loaded) = self.loads.join_next().await {
            match loaded {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(join) => return Err(anyhow!("a model load task failed: {join}")),
            }
        }
        Ok(())
    }

    /// Refuse new requests and stop the model threads (waiting for them until `deadline`).
    pub async fn stop(self, deadline: Instant) {
        self.inference.begin_shutdown();
        self.manager.begin_shutdown();
        stop_models(&self.manager.registry().all_handles(), deadline).await;
    }
}

/// Check the configuration, find every model's files (downloading `hf-hub:` sources), and
/// start loading them; the models turn ready in the background (see [`Service::wait_ready`]).
pub async fn start_service(config: &Config) -> Result<Service> {
    let specs = model_specs(config)?;
    let device = backend::device::resolve(config.device_choice().map_err(|e| anyhow!(e))?)?;
    tracing::info!("{}", backend::device::summary(device));
    // Checked before anything is downloaded or loaded.
    let default_model = config
        .default_model
        .clone()
        .unwrap_or_else(|| specs[0].name.clone());
    if !specs.iter().any(|spec| spec.name == default_model) {
        bail!("--default-model {default_model:?} is not among the served models");
    }
    let priority = config.priority_levels().map_err(|e| anyhow!(e))?;
    let located = locate_all(&specs).await?;

    let metrics = Arc::new(Metrics::new());
    let resources = budget::Resources::detect();
    let budgets = Budgets::derive(config, &resources, device.is_cuda());
    budgets.log(config, &resources);
    let registry = Arc::new(registry::Registry::default());
    let cache = cache::ResponseCache::new(config.cache_bytes, &metrics).map(Arc::new);
    let manager = Arc::new(Manager::new(ManagerParts {
        registry: registry.clone(),
        control: config.model_control,
        settings: spawn_options(config, device, &budgets, priority),
        metrics: metrics.clone(),
        memory_budget: budgets.models,
        // No admitted request outlives its timeout plus the time to send its body.
        drain_timeout: std::time::Duration::from_secs(config.request_timeout + config.body_timeout),
        repository: config.model_repository.clone(),
        cache: cache.clone(),
        jpeg_draft: config.jpeg_draft,
        cpus: resources.cpus,
        intra_op_threads: config.intra_op_threads,
    }));
    let loads = start_models(&manager, specs, located)?;
    let memory = Arc::new(budget::MemoryBudget::new(
        budgets.memory,
        metrics.memory_budget.clone(),
        metrics.memory_in_use.clone(),
    ));
    let inference = Arc::new(infer::Inference::new(infer::Parts {
        registry,
        default_model,
        limits: request_limits(config, priority),
        pool: images::DecodePool::new(budgets.decode_threads),
        memory,
        metrics,
        cache,
    }));
    Ok(Service {
        inference,
        manager,
        loads,
    })
}

/// What every model version is spawned with.
fn spawn_options(
    config: &Config,
    device: tch::Device,
    budgets: &Budgets,
    priority: crate::priority::Levels,
) -> SpawnOptions {
    SpawnOptions {
        device,
        dtype: config.dtype,
        backend: config.backend,
        max_batch_size: config
            .max_batch_size
            .unwrap_or(if device.is_cuda() { 32 } else { 8 }),
        max_batch_delay: config.max_batch_delay(),
        instances: budgets.instances,
        max_queue_images: config.max_queue_images,
        priority,
        batch_timeout: config.batch_timeout,
    }
}

/// The bounds the service enforces for every request.
fn request_limits(config: &Config, priority: crate::priority::Levels) -> infer::Limits {
    infer::Limits {
        priority,
        max_images_per_request: config.max_images_per_request,
        max_concurrent_requests: config.max_concurrent_requests,
        request_timeout: std::time::Duration::from_secs(config.request_timeout),
        decode: DecodeOptions {
            max_pixels: config.max_image_pixels,
            exif_transpose: config.exif_transpose,
            // Per model: `PreprocessConfig::decode_options` adds it where jpeg_draft is on.
            draft: None,
        },
    }
}

/// Start loading every model; each task finishes when its model is loaded and warmed up.
fn start_models(
    manager: &Manager,
    specs: Vec<ModelSpec>,
    located: Vec<ModelFiles>,
) -> Result<JoinSet<Result<(), LoadError>>> {
    let mut loads = JoinSet::new();
    for (spec, files) in specs.into_iter().zip(located) {
        let loaded = manager
            .start(&spec.name, &spec.source, files, &spec.options)
            .map_err(|e| LoadError::Invalid {
                model: spec.name.clone(),
                message: format!("{e:#}"),
            })?;
        if let Ok(handle) = manager.registry().lookup(&spec.name, None) {
            tracing::info!(
                model = %spec.name,
                architecture = %handle.info.architecture,
                device = %handle.info.device,
                input = ?handle.info.preprocess.input_size,
                "loading model"
            );
        }
        loads.spawn(wait_loaded(spec.name, loaded));
    }
    Ok(loads)
}

/// The bounds derived from what the container gives (each overridable by its flag).
struct Budgets {
    memory: u64,
    /// What the models' estimates may add up to (`--model-memory-budget`).
    models: u64,
    decode_threads: usize,
    /// The model copies and their intra-op threads.
    instances: backend::InstanceLayout,
}

impl Budgets {
    fn derive(config: &Config, resources: &budget::Resources, cuda: bool) -> Self {
        const RUNTIME: u64 = 512 << 20;
        const MIN_MODELS: u64 = 256 << 20;
        let memory = config
            .memory_budget
            .unwrap_or_else(|| resources.default_budget());
        Self {
            memory,
            models: config.model_memory_budget.unwrap_or_else(|| {
                resources
                    .memory_limit
                    .saturating_sub(memory)
                    .saturating_sub(config.cache_bytes)
                    .saturating_sub(RUNTIME)
                    .max(MIN_MODELS)
            }),
            // Decoding and the model share the CPUs rather than splitting them: decoding runs
            // in bursts between batches, and a model thread limited to half the cores would
            // leave them idle whenever nothing decodes.
            decode_threads: config.decode_threads.unwrap_or(resources.cpus),
            instances: backend::InstanceLayout::resolve(
                config.instances,
                resources.cpus,
                config.intra_op_threads,
                cuda,
            ),
        }
    }

    /// One line saying where each bound came from.
    fn log(&self, config: &Config, resources: &budget::Resources) {
        let origin = |given: bool, derived: &str| {
            if given {
                "set by flag".to_owned()
            } else {
                derived.to_owned()
            }
        };
        tracing::info!(
            memory_limit = %config::mib(resources.memory_limit),
            memory_limit_from = %resources.memory_source,
            cpus = resources.cpus,
            memory_budget = %config::mib(self.memory),
            model_memory_budget = %config::mib(self.models),
            memory_budget_from = %origin(config.memory_budget.is_some(), "memory limit / 4, at least 64 MiB"),
            decode_threads = self.decode_threads,
            instances = ?self.instances.copies(),
            threads_from = %origin(
                config.decode_threads.is_some() || config.intra_op_threads.is_some(),
                "the CPUs the process may use",
            ),
            "resources"
        );
        if (config.max_body_bytes as u64) > self.memory {
            tracing::warn!(
                max_body_bytes = config.max_body_bytes,
                memory_budget = self.memory,
                "--max-body-bytes is above the memory budget: bodies larger than the budget get 413"
            );
        }
    }
}

/// Say once whether keys are checked (never the keys themselves).
fn log_authentication(keys: &auth::ApiKeys, protect_metrics: bool) {
    if keys.enabled() {
        tracing::info!(
            keys = keys.count(),
            metrics_protected = protect_metrics,
            "API keys required on every endpoint but the health probes"
        );
    } else {
        tracing::warn!("no API key configured: anyone who reaches the port can use the server");
    }
}

async fn wait_loaded(model: String, loaded: backend::LoadOutcome) -> Result<(), LoadError> {
    match loaded.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(message)) => Err(LoadError::Invalid { model, message }),
        Err(_) => Err(LoadError::Invalid {
            model,
            message: "the model thread exited while loading".into(),
        }),
    }
}

async fn stop_models(models: &[Arc<ModelHandle>], deadline: Instant) {
    for model in models {
        model.close();
    }
    let models = models.to_vec();
    let joined = tokio::task::spawn_blocking(move || models.iter().for_each(|m| m.join()));
    if tokio::time::timeout_at(deadline.into(), joined)
        .await
        .is_err()
    {
        tracing::warn!("shutdown timeout reached while models were still running");
    }
}

fn model_specs(config: &Config) -> Result<Vec<ModelSpec>> {
    let mut specs: Vec<ModelSpec> = config
        .models
        .iter()
        .map(|m| ModelSpec::parse(m))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!(e))?;
    if let Some(root) = &config.model_repository {
        let found = repository::scan_repository(root).map_err(|e| anyhow!(e))?;
        if found.is_empty() {
            bail!(
                "--model-repository {}: no subfolder holds a config.json",
                root.display()
            );
        }
        specs.extend(found);
    }
    let mut names = std::collections::HashSet::new();
    for spec in &specs {
        if !names.insert(spec.name.as_str()) {
            bail!(
                "two models are named {:?}; name them with NAME=SOURCE",
                spec.name
            );
        }
    }
    Ok(specs)
}

/// Find every model's files at once, so that several `hf-hub:` downloads run in parallel.
async fn locate_all(specs: &[ModelSpec]) -> Result<Vec<ModelFiles>> {
    let mut lookups = JoinSet::new();
    for (index, spec) in specs.iter().cloned().enumerate() {
        lookups.spawn(async move { (index, locate(&spec).await) });
    }
    let mut found: Vec<Option<ModelFiles>> = specs.iter().map(|_| None).collect();
    while let Some(lookup) = lookups.join_next().await {
        let (index, files) = lookup?;
        found[index] = Some(files?);
    }
    Ok(found.into_iter().flatten().collect())
}

/// Find a model's files (`hf-hub:` sources may download).
async fn locate(spec: &ModelSpec) -> Result<ModelFiles> {
    manage::locate(&spec.source, spec.options.arch.as_deref())
        .await
        .map_err(|message| LoadError::Invalid {
            model: spec.name.clone(),
            message,
        })
        .with_context(|| format!("locating model {:?}", spec.name))
}
