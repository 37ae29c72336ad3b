//! visionserve: an image-classification inference server on libtorch.
//!
//! One image's path through the code, in folder order:
//!
//! ```text
//! http/, grpc     front ends: /v1 REST, v2 REST (http/v2.rs) and v2 gRPC; they parse, call the
//!                 inference service, render, and map its errors to their statuses (one table
//!                 each: http/error.rs, grpc::status)
//! v1, v2          the protocols' own semantics, shared by their front ends: /v1's results and
//!                 top_k (HTTP and the CLI), v2's tensors (REST and gRPC)
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
//! name, `error` the service's and loading's errors. `server` wires it all together; [`run`]
//! takes its listener and shutdown signal from the caller, so tests run servers on port 0.

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
pub mod server;
pub mod v1;
pub mod v2;

pub use server::{run, serve, start_service, tune_process, Listeners, Service};
