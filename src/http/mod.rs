//! The HTTP surface: routes, shared state and middleware. `router(state)` is a plain function
//! so tests can drive it without a socket.

mod access_log;
mod auth;
mod cors;
pub mod error;
mod handlers;
mod headers;
mod input;
pub(crate) mod linger;
mod manage;
pub mod openapi;
mod schema;
mod trace;
mod v2;

use crate::auth::ApiKeys;
use crate::infer::Inference;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use input::ACCEPTED_CONTENT_TYPES;

/// `read_images` on a body of `content_type`, for the fuzz targets.
#[cfg(feature = "fuzzing")]
pub async fn fuzz_read_images(
    content_type: &str,
    body: Vec<u8>,
    limits: RequestLimits,
    pool: &crate::images::DecodePool,
) {
    let request = axum::http::Request::builder()
        .header(axum::http::header::CONTENT_TYPE, content_type)
        .body(axum::body::Body::from(body))
        .expect("a valid request");
    let _ = input::read_images(request, &limits, pool).await;
}

/// The v2 REST body parser, for the fuzz targets.
#[cfg(feature = "fuzzing")]
pub fn fuzz_parse_v2(body: bytes::Bytes, split: usize) {
    v2::fuzz_parse(body, split);
}

/// Bounds on what an HTTP request may send, checked while its body is read.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_images_per_request: usize,
    pub max_body_bytes: usize,
    pub body_timeout: std::time::Duration,
}

/// Everything handlers share: the inference service, the HTTP limits and the API keys.
pub struct AppState {
    pub inference: Arc<Inference>,
    /// Loads, rolls out and unloads models (the management API).
    pub manager: Arc<crate::manage::Manager>,
    /// `--admin-token`: the key of the management API (`None`: the API answers 403).
    pub admin: Option<Arc<ApiKeys>>,
    pub limits: RequestLimits,
    pub keys: Arc<ApiKeys>,
    /// `--protect-metrics`: `/metrics` needs a key too.
    pub protect_metrics: bool,
    /// `--cors-origin`: the origins whose pages may call the API (none: CORS is off).
    pub cors_origins: Vec<String>,
    /// `--access-log on`: one line per request.
    pub access_log: bool,
    /// `--tls-client-ca`: requests on a connection that presented no client certificate get
    /// 403, but for the health probes.
    pub require_client_certificate: bool,
}

/// Refused inference requests (429 overload, 503 unavailable) are held for
/// [`crate::infer::REFUSAL_PACE`] before they are answered; probes and other GETs are not.
async fn pace_refusals(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let inference = request.method() == axum::http::Method::POST;
    let response = next.run(request).await;
    if !inference {
        return response;
    }
    let status = response.status();
    if status == axum::http::StatusCode::TOO_MANY_REQUESTS
        || status == axum::http::StatusCode::SERVICE_UNAVAILABLE
    {
        crate::infer::pace_refusal().await;
    }
    response
}

/// Every route the router serves (tests check that `/openapi.json` documents exactly these).
pub const ROUTES: &[&str] = &[
    "/",
    "/openapi.json",
    "/v1/classify",
    "/v1/models/{model}/classify",
    "/v1/models",
    "/v1/models/{model}",
    "/v1/repository",
    "/health/live",
    "/health/ready",
    "/metrics",
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/stats",
    "/v2/models/{model}",
    "/v2/models/{model}/versions/{version}",
    "/v2/models/{model}/ready",
    "/v2/models/{model}/versions/{version}/ready",
    "/v2/models/{model}/stats",
    "/v2/models/{model}/versions/{version}/stats",
    "/v2/models/{model}/infer",
    "/v2/models/{model}/versions/{version}/infer",
    "/v2/repository/index",
    "/v2/repository/models/{model}/load",
    "/v2/repository/models/{model}/unload",
];

pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.limits.max_body_bytes;
    // Outside the API-key check, so that preflights are answered and errors carry the headers.
    let cors = tower::util::option_layer(cors::layer(&state.cors_origins));
    // Outside everything that can refuse a request, inside the request id it logs.
    let access_log = tower::util::option_layer(
        state
            .access_log
            .then(|| axum::middleware::from_fn(access_log::log_access)),
    );
    Router::new()
        .route("/", get(handlers::web_page))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/v1/classify", post(handlers::classify_default))
        .route(
            "/v1/models/{model}/classify",
            post(handlers::classify_model),
        )
        .route("/v1/models", get(handlers::list_models).post(manage::load))
        .route(
            "/v1/models/{model}",
            get(handlers::get_model).delete(manage::unload),
        )
        .route("/v1/repository", get(manage::repository))
        .route("/v2/repository/index", post(manage::v2_index))
        .route("/v2/repository/models/{model}/load", post(manage::v2_load))
        .route(
            "/v2/repository/models/{model}/unload",
            post(manage::v2_unload),
        )
        .route("/health/live", get(handlers::live))
        .route("/health/ready", get(handlers::ready))
        .route("/metrics", get(handlers::metrics))
        .merge(v2::routes())
        .fallback(handlers::not_found)
        .layer(axum::middleware::from_fn(pace_refusals))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(cors)
        .layer(CatchPanicLayer::custom(handlers::panic_response))
        .layer(access_log)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(trace::request_span)
                        // The access log (`--access-log`) is the INFO line per request.
                        .on_response(trace::RecordResponse),
                )
                .layer(tower::util::option_layer(crate::telemetry::active().then(
                    || axum::middleware::from_fn(trace::answer_with_traceparent),
                )))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(axum::middleware::from_fn(linger::linger_on_drop)),
        )
        .with_state(state)
}
