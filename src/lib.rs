//! visionserve: an image-classification inference server on libtorch.
//!
//! One image's path through the code, in folder order; imports point down this list, never up
//! (`docs/import_graph.py --check` keeps it so):
//!
//! ```text
//! server          wiring: config to models, service and listeners; budgets; drain on shutdown
//! cli             `visionserve classify|models|download|export|config`: a front end in the
//!                 same process, and the command line over the environment over --config
//! bench/, tune/   tools that measure servers from outside, over the network: a load generator
//!                 for any v2 server, and the search for this machine's best configuration
//!                 (each candidate a fresh child process)
//! http/, grpc/    front ends: /v1 REST, v2 REST (http/v2.rs) and v2 gRPC; each parses its
//!                 protocol into an `infer::Intake`, makes one call, renders the answer, and
//!                 maps errors to its statuses in one table (http/error.rs, grpc/status.rs)
//! v1, v2          the protocols' own semantics, shared by their front ends: v1's results and
//!                 top_k; v2's tensors, plan and render (REST and gRPC)
//! infer           the inference service, `Inference::infer`, the one entry point: admission,
//!                 deadline, cache policy, body reservation, decode on the pool, one queue
//!                 entry per image, the wait for answers, each request counted once
//! manage,         models at run time: `registry` holds them by name and version (what
//! registry, cache requests resolve), `manage` loads, rolls out, drains and polls them, `cache`
//!                 keeps answers by image content
//! images/         bytes to model-ready pixels: decode, resize (Pillow's), crop, on a bounded
//!                 pool of blocking threads (no tch)
//! batching/       one job per image, the queue's policy (pure) and the batcher task that hands
//!                 batches to the model threads through one-slot channels
//! backend/        the model threads: own the model, normalise the batch on the device, run
//!                 forward, compute what the batch's images asked for (top-k, probabilities,
//!                 logits, embeddings), answer each image on its own oneshot
//! models/         the networks: TorchScript, and native architectures keyed like their checkpoints
//! repository      `--model` specs to files and configs (timm's `pretrained_cfg`)
//! ```
//!
//! Leaves below all of these: `config` (flags, their defaults and the values people write in
//! them), `error` (the service's and loading's errors, and how a failure is counted), `metrics`
//! (every Prometheus name), `budget` (what the container gives, the in-flight memory budget),
//! `auth` (API keys and their quotas), `priority` (request priority levels), `tls` (certificates,
//! reloaded on SIGHUP, and the TLS accept loop), `labels`, `hub`, `access` (the access log's
//! line), `telemetry` (OpenTelemetry: the exporter, W3C trace context, stage spans recorded after
//! the fact), `report` (HTML and SVG charts for bench and tune). [`run`] takes its listener and shutdown signal from the caller, so
//! tests run servers on port 0.

pub mod access;
pub mod auth;
pub mod backend;
pub mod batching;
pub mod bench;
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
pub mod priority;
pub mod registry;
pub mod report;
pub mod repository;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod tune;
pub mod v1;
pub mod v2;

pub use server::{run, serve, start_service, tune_process, Listeners, Service};
