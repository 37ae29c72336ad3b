//! The HTTP surface: routes, shared state and middleware. `router(state)` is a plain function
//! so tests can drive it without a socket.

mod handlers;
mod input;
pub mod types;

use crate::backend::ModelHandle;
use crate::metrics::Metrics;
use crate::pipeline::decode::DecodeOptions;
use crate::pipeline::DecodePool;
use axum::extract::DefaultBodyLimit;
use axum::http::Request;
use axum::routing::{get, post};
use axum::Router;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

pub use input::ACCEPTED_CONTENT_TYPES;

#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_images_per_request: usize,
    pub max_body_bytes: usize,
    pub body_timeout: std::time::Duration,
    pub max_concurrent_requests: usize,
    pub decode: DecodeOptions,
}

/// Everything handlers share.
pub struct AppState {
    pub models: Vec<Arc<ModelHandle>>,
    pub default_model: String,
    pub limits: RequestLimits,
    pub pool: DecodePool,
    pub metrics: Arc<Metrics>,
    /// One permit per classification request being handled (`--max-concurrent-requests`).
    pub requests: Arc<tokio::sync::Semaphore>,
    shutting_down: AtomicBool,
}

impl AppState {
    pub fn new(
        models: Vec<Arc<ModelHandle>>,
        default_model: String,
        limits: RequestLimits,
        pool: DecodePool,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            models,
            default_model,
            requests: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_requests)),
            limits,
            pool,
            metrics,
            shutting_down: AtomicBool::new(false),
        }
    }

    pub fn model(&self, name: &str) -> Option<&Arc<ModelHandle>> {
        self.models.iter().find(|m| m.name() == name)
    }

    pub fn model_names(&self) -> String {
        self.models
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub fn all_ready(&self) -> bool {
        !self.is_shutting_down() && self.models.iter().all(|m| m.status.is_ready())
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.limits.max_body_bytes;
    Router::new()
        .route("/v1/classify", post(handlers::classify_default))
        .route("/v1/models/{model}/classify", post(handlers::classify_model))
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/models/{model}", get(handlers::get_model))
        .route("/health/live", get(handlers::live))
        .route("/health/ready", get(handlers::ready))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(handlers::panic_response))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|request: &Request<_>| {
                            let id = request
                                .extensions()
                                .get::<RequestId>()
                                .and_then(|id| id.header_value().to_str().ok())
                                .unwrap_or("-");
                            tracing::info_span!("request", id, method = %request.method(), path = %request.uri().path())
                        })
                        .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
                )
                .layer(PropagateRequestIdLayer::x_request_id()),
        )
        .with_state(state)
}
