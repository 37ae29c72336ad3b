//! The Open Inference Protocol (KServe v2) over gRPC: `inference.GRPCInferenceService` from
//! Triton's published `grpc_service.proto` (the subset in `proto/`), plus the standard
//! `grpc.health.v1.Health` service. Like `http::v2`, it only translates between protobuf and the
//! protocol's tensors in `crate::v2`; the inference service runs the request.
//!
//! - `service`: the protocol's methods, and ModelInfer as parse, one service call, render;
//! - `convert`: protobuf messages to and from the protocol's tensors, parameters and statistics;
//! - `status`: the status table (the service's errors as gRPC codes);
//! - `auth`: the API-key gate in front of every method but the health checks;
//! - `health`: `grpc.health.v1` kept in step with readiness;
//! - `trace`: the ModelInfer span's trace context and outcome (OpenTelemetry).

mod auth;
mod convert;
mod health;
mod service;
mod status;
mod trace;

use crate::auth::ApiKeys;
use crate::infer::Inference;
use proto::grpc_inference_service_server::GrpcInferenceServiceServer;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::net::TcpListener;

pub use status::status;

/// The generated protocol types and service traits.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("inference");
}

/// HTTP/2 flow-control window per stream.
pub const STREAM_WINDOW_BYTES: u32 = 2 << 20;

/// Serves both gRPC services on `listener` until `shutdown` resolves, then finishes the calls
/// in flight. Messages are bounded like HTTP bodies (`max_message_bytes`). The inference
/// service checks API keys (`keys`) from the call's metadata before its message is decoded;
/// the health service stays open.
pub async fn serve(
    listener: TcpListener,
    inference: Arc<Inference>,
    keys: Arc<ApiKeys>,
    max_message_bytes: usize,
    access_log: bool,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let service = GrpcInferenceServiceServer::new(service::InferenceService {
        inference: inference.clone(),
        next_id: AtomicU64::new(1),
        access_log,
    })
    .max_decoding_message_size(max_message_bytes)
    .max_encoding_message_size(usize::MAX);
    tokio::spawn(health::report_health(health, inference.clone()));
    tonic::transport::Server::builder()
        // An encoded image is 50 KB to a few MB: with HTTP/2's default 64 KiB windows every
        // request would wait for window updates.
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(4 * STREAM_WINDOW_BYTES))
        .tcp_nodelay(true)
        .layer(tower::layer::layer_fn(move |inner| auth::RequireApiKey {
            inner,
            keys: keys.clone(),
            inference: inference.clone(),
            access_log,
        }))
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}
