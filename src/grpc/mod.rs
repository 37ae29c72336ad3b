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
use tokio_stream::StreamExt;

pub use status::status;

/// The generated protocol types and service traits.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("inference");
}

/// HTTP/2 flow-control window per stream.
pub const STREAM_WINDOW_BYTES: u32 = 2 << 20;

/// What the gRPC listener is started with besides the inference service.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Messages are bounded like HTTP bodies.
    pub max_message_bytes: usize,
    /// `--access-log on`.
    pub access_log: bool,
    /// `--tls-client-ca`: calls on connections without a client certificate are refused.
    pub require_client_certificate: bool,
}

/// Serves both gRPC services on the connections of `incoming` (TCP or TLS streams) until
/// `shutdown` resolves, then finishes the calls in flight. The inference service checks API
/// keys (`keys`) and, under mTLS, the client certificate before a message is decoded; the
/// health service stays open.
///
/// TLS is done by `crate::tls` rather than tonic's `tls_config`: tonic's is fixed when the
/// server starts, and certificates must be re-read on SIGHUP.
pub async fn serve<I, IO, IE>(
    incoming: I,
    inference: Arc<Inference>,
    keys: Arc<ApiKeys>,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error>
where
    I: futures::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Settings {
        max_message_bytes,
        access_log,
        require_client_certificate,
    } = settings;
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
        .layer(tower::layer::layer_fn(move |inner| auth::RequireApiKey {
            inner,
            keys: keys.clone(),
            inference: inference.clone(),
            access_log,
            require_client_certificate,
        }))
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// The plain-TCP connections of `listener`, for [`serve`].
pub fn plain_incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        // What the builder's `tcp_nodelay` does for the listeners tonic binds itself.
        if let Ok(stream) = &accepted {
            let _ = stream.set_nodelay(true);
        }
        accepted
    })
}
