//! visionserve: an image-classification inference server on libtorch.
//!
//! One image's path through the code, in folder order:
//!
//! ```text
//! http/, grpc     front ends: /v1 REST, v2 REST (http/v2.rs) and v2 gRPC; they parse, call the
//!                 inference service, render, and map its errors to their statuses (one table
//!                 each: http/error.rs, grpc::status)
//! v2              the Open Inference Protocol's tensors, shared by v2 REST and gRPC
//! infer           the inference service: admission, decode on the pool, one queue entry per
//!                 image, the wait for answers, each request counted once
//! images/         decode + resize/crop on a bounded thread pool (no tch)
//! batching/       one job per image, the queue's policy and the batcher task, which forms
//!                 batches and hands them over through a one-slot channel
//! backend/        the model thread: owns the model, normalises the batch on the device, runs
//!                 forward, computes what the batch's images asked for (top-k, probabilities,
//!                 logits, embeddings), answers each image on its own oneshot
//! models/         the networks: TorchScript, and native architectures keyed like their checkpoints
//! ```
//!
//! `registry` holds the served models by name and version (what requests resolve), `manage`
//! loads, rolls out, drains and polls them at run time, `cache` keeps answers by image content;
//! `repository` turns `--model` specs into files and configs, `metrics` holds every Prometheus
//! name, `error` the service's and loading's errors. [`run`] wires it all together and takes its
//! listener and shutdown signal from the caller, so tests run servers on port 0.

pub mod auth;
pub mod backend;
pub mod batching;
pub mod budget;
pub mod cache;
pub mod cli;
pub mod config;
pub mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod grpc;
pub mod http;
pub mod hub;
pub mod images;
pub mod infer;
pub mod labels;
pub mod manage;
pub mod metrics;
pub mod models;
pub mod registry;
pub mod repository;
pub mod v2;

use anyhow::{anyhow, bail, Context, Result};
use backend::{ModelHandle, SpawnOptions};
use config::Config;
use config::ModelControl;
use error::LoadError;
use images::decode::DecodeOptions;
use manage::{Manager, ManagerParts};
use metrics::Metrics;
use repository::{ModelFiles, ModelSpec};
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
    let Listeners {
        http: listener,
        grpc: grpc_listener,
    } = listeners;
    config.validate().map_err(|e| anyhow!(e))?;
    let keys = Arc::new(
        auth::ApiKeys::new(&config.api_keys, config.api_keys_file.as_deref())
            .map_err(|e| anyhow!(e))?,
    );
    log_authentication(&keys, config.protect_metrics);
    tokio::spawn(auth::reload_on_sighup(keys.clone()));
    let admin = match &config.admin_token {
        Some(token) => Some(Arc::new(
            auth::ApiKeys::new(std::slice::from_ref(token), None).map_err(|e| anyhow!(e))?,
        )),
        None => None,
    };
    let Service {
        inference,
        manager,
        mut loads,
    } = start_service(&config).await?;
    let state = Arc::new(http::AppState {
        inference: inference.clone(),
        manager: manager.clone(),
        admin,
        limits: http::RequestLimits {
            max_images_per_request: config.max_images_per_request,
            max_body_bytes: config.max_body_bytes,
            body_timeout: std::time::Duration::from_secs(config.body_timeout),
        },
        keys: keys.clone(),
        protect_metrics: config.protect_metrics,
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut stop_rx = stop_rx.clone();
        async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        }
    };
    let grpc = match grpc_listener {
        Some(listener) => {
            tracing::info!(address = %listener.local_addr()?, "gRPC listening");
            let inference = inference.clone();
            let shutdown = stopped();
            Some(tokio::spawn(grpc::serve(
                listener,
                inference,
                keys.clone(),
                config.max_body_bytes,
                shutdown,
            )))
        }
        None => None,
    };
    if manager.control() == ModelControl::Poll {
        tokio::spawn(
            manager
                .clone()
                .poll(config.repository_poll_interval, stopped()),
        );
    }
    let address = listener.local_addr()?;
    let app = http::router(state.clone());
    let http_shutdown = stopped();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(http_shutdown)
            .await
    });
    tracing::info!(%address, "listening");

    tokio::pin!(shutdown);
    let mut failure = None;
    let mut loading = true;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            loaded = loads.join_next(), if loading => match loaded {
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => { failure = Some(e); break; }
                Some(Err(join)) => { failure = Some(LoadError::Invalid { model: "?".into(), message: join.to_string() }); break; }
                None => { loading = false; tracing::info!("all models ready"); }
            },
        }
    }

    let deadline = Instant::now() + config.shutdown_timeout();
    tracing::info!("shutting down: no new connections, finishing admitted requests");
    inference.begin_shutdown();
    manager.begin_shutdown();
    let _ = stop_tx.send(true);
    match tokio::time::timeout_at(deadline.into(), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "server error"),
        Ok(Err(e)) => tracing::error!(error = %e, "server task failed"),
        Err(_) => tracing::warn!("shutdown timeout reached with requests still in flight"),
    }
    if let Some(grpc) = grpc {
        match tokio::time::timeout_at(deadline.into(), grpc).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "gRPC server error"),
            Ok(Err(e)) => tracing::error!(error = %e, "gRPC server task failed"),
            Err(_) => tracing::warn!("shutdown timeout reached with gRPC calls still in flight"),
        }
    }
    stop_models(&manager.registry().all_handles(), deadline).await;
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(()),
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
    let max_batch_size = config
        .max_batch_size
        .unwrap_or(if device.is_cuda() { 32 } else { 8 });
    tracing::info!("{}", backend::device::summary(device));

    // Checked before anything is downloaded or loaded.
    let default_model = config
        .default_model
        .clone()
        .unwrap_or_else(|| specs[0].name.clone());
    if !specs.iter().any(|spec| spec.name == default_model) {
        bail!("--default-model {default_model:?} is not among the served models");
    }
    let located = locate_all(&specs).await?;

    let metrics = Arc::new(Metrics::new());
    let resources = budget::Resources::detect();
    let budgets = Budgets::derive(config, &resources, device.is_cuda());
    budgets.log(config, &resources);
    let memory = Arc::new(budget::MemoryBudget::new(
        budgets.memory,
        metrics.memory_budget.clone(),
        metrics.memory_in_use.clone(),
    ));
    let registry = Arc::new(registry::Registry::default());
    let cache = cache::ResponseCache::new(config.cache_bytes, &metrics).map(Arc::new);
    let manager = Arc::new(Manager::new(ManagerParts {
        registry: registry.clone(),
        control: config.model_control,
        settings: SpawnOptions {
            device,
            dtype: config.dtype,
            max_batch_size,
            max_batch_delay: config.max_batch_delay(),
            instances: budgets.instances,
            max_queue_images: config.max_queue_images,
            batch_timeout: config.batch_timeout,
        },
        metrics: metrics.clone(),
        memory_budget: budgets.models,
        // No admitted request outlives its timeout plus the time to send its body.
        drain_timeout: std::time::Duration::from_secs(config.request_timeout + config.body_timeout),
        repository: config.model_repository.clone(),
        cache: cache.clone(),
    }));
    let mut loads = JoinSet::new();
    for (spec, files) in specs.into_iter().zip(located) {
        let loaded = manager
            .start(&spec.name, &spec.source, files, &spec.options)
            .map_err(|e| LoadError::Invalid {
                model: spec.name.clone(),
                message: format!("{e:#}"),
            })?;
        if let Ok(handle) = registry.lookup(&spec.name, None) {
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

    let inference = Arc::new(infer::Inference::new(infer::Parts {
        registry,
        default_model,
        limits: infer::Limits {
            max_images_per_request: config.max_images_per_request,
            max_concurrent_requests: config.max_concurrent_requests,
            request_timeout: std::time::Duration::from_secs(config.request_timeout),
            decode: DecodeOptions {
                max_pixels: config.max_image_pixels,
                exif_transpose: config.exif_transpose,
            },
        },
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
