//! The `/v1` API and the operational endpoints. A classify request is parsed here into a
//! [`V1Intake`], the inference service runs it, and the answer is rendered as `/v1` JSON.

use super::error::{ApiError, ErrorBody};
use super::headers::{cache_timing, cache_use, header_priority, header_timeout, request_key};
use super::input::{body_reservation, read_images, RequestImages};
use super::schema::{
    ClassifyResponses, JsonImages, MultipartImages, RequestTimeoutHeader, TraceContextHeaders,
    UnauthorizedResponse,
};
use super::{AppState, RequestLimits};
use crate::backend::ModelHandle;
use crate::config::parse_timeout;
use crate::images::DecodePool;
use crate::infer::{Answer, ImageInput, Intake, ModelRef, Outputs, Plan, RequestOptions};
use crate::v1::{self, DEFAULT_TOP_K};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ClassifyQuery {
    /// How many classes to return per image, best first (default 5; at most the model's
    /// class count). Overrides `top_k` in a JSON body.
    #[param(value_type = Option<u32>, minimum = 1)]
    top_k: Option<String>,
    /// The client's own timeout (`250ms`, `1.5s`, `2`), within `--request-timeout`.
    #[param(value_type = Option<String>, example = "1.5s")]
    timeout: Option<String>,
    /// The request's priority level with `--priority-levels` above 1: 1 is the highest, 0 the
    /// default level (the API key's, if it has one, else `--default-priority`). Overrides a
    /// `Priority` header.
    #[param(value_type = Option<u32>, minimum = 0)]
    priority: Option<String>,
}

type QueryResult = Result<Query<ClassifyQuery>, QueryRejection>;

/// Classify with the default model.
#[utoipa::path(
    post,
    path = "/v1/classify",
    tag = "v1",
    params(ClassifyQuery, RequestTimeoutHeader, TraceContextHeaders),
    request_body(description = "One raw image (its Content-Type), several as multipart parts, or base64 in JSON",
        content(("image/jpeg"), ("image/png"), ("image/webp"), ("image/gif"), ("image/bmp"),
                ("application/octet-stream"), (MultipartImages = "multipart/form-data"),
                (JsonImages = "application/json"))),
    responses(ClassifyResponses),
    security((), ("api_key" = []), ("bearer" = []))
)]
pub async fn classify_default(
    State(state): State<Arc<AppState>>,
    query: QueryResult,
    request: Request,
) -> Response {
    let model = state.inference.default_model().to_owned();
    classify(state, model, query, request).await
}

/// Classify with the model `{model}`.
#[utoipa::path(
    post,
    path = "/v1/models/{model}/classify",
    tag = "v1",
    params(("model" = String, Path, description = "A served model's name (GET /v1/models)"), ClassifyQuery, RequestTimeoutHeader, TraceContextHeaders),
    request_body(description = "One raw image (its Content-Type), several as multipart parts, or base64 in JSON",
        content(("image/jpeg"), ("image/png"), ("image/webp"), ("image/gif"), ("image/bmp"),
                ("application/octet-stream"), (MultipartImages = "multipart/form-data"),
                (JsonImages = "application/json"))),
    responses(ClassifyResponses),
    security((), ("api_key" = []), ("bearer" = []))
)]
pub async fn classify_model(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    query: QueryResult,
    request: Request,
) -> Response {
    classify(state, model, query, request).await
}

async fn classify(
    state: Arc<AppState>,
    model: String,
    query: QueryResult,
    request: Request,
) -> Response {
    let intake = V1Intake {
        query: Some(query),
        request,
        limits: state.limits,
        pool: state.inference.pool().clone(),
        top_k: None,
    };
    match state.inference.infer(ModelRef::parse(&model), intake).await {
        Ok(answer) => render(&state, answer),
        Err(err) => err.into_response(),
    }
}

/// A `/v1` classify request: its query and headers, checked before the body is read (a bad
/// query is refused without reading it), then its body of images.
struct V1Intake {
    /// Taken when the options are parsed.
    query: Option<QueryResult>,
    request: Request,
    limits: RequestLimits,
    pool: DecodePool,
    /// `?top_k=`, which overrides a `top_k` in a JSON body.
    top_k: Option<usize>,
}

impl Intake for V1Intake {
    type Keep = ();
    type Error = ApiError;

    fn options(&mut self, model: &ModelHandle) -> Result<RequestOptions, ApiError> {
        let num_classes = model.info.num_classes;
        let query = self
            .query
            .take()
            .expect("options are parsed once")
            .map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))?
            .0;
        let query_timeout = query
            .timeout
            .as_deref()
            .map(parse_timeout)
            .transpose()
            .map_err(ApiError::BadRequest)?;
        self.top_k = query
            .top_k
            .map(|text| v1::parse_top_k(&text, num_classes))
            .transpose()
            .map_err(ApiError::BadRequest)?;
        let headers = self.request.headers();
        let query_priority = query
            .priority
            .as_deref()
            .map(crate::priority::parse)
            .transpose()
            .map_err(|e| ApiError::BadRequest(format!("?priority=: {e}")))?
            .flatten();
        let mut options = RequestOptions {
            cache: cache_use(headers),
            priority: query_priority.or(header_priority(headers)?),
            key: request_key(self.request.extensions()),
            ..RequestOptions::default()
        };
        for timeout in [query_timeout, header_timeout(headers)?]
            .into_iter()
            .flatten()
        {
            options.limit_time(timeout);
        }
        options.body_bytes = Some(body_reservation(&self.request, self.limits.max_body_bytes)?);
        Ok(options)
    }

    async fn read(self, model: Arc<ModelHandle>) -> Result<Plan<()>, ApiError> {
        let num_classes = model.info.num_classes;
        let RequestImages {
            images,
            top_k: body_top_k,
        } = read_images(self.request, &self.limits, &self.pool).await?;
        let top_k = match self.top_k.or(body_top_k) {
            Some(k) => v1::check_top_k(k, num_classes).map_err(ApiError::BadRequest)?,
            None => DEFAULT_TOP_K.min(num_classes),
        };
        Ok(Plan {
            images: images.into_iter().map(ImageInput::Encoded).collect(),
            outputs: Outputs::top_k(top_k),
            timeout: None,
            priority: None,
            keep: (),
        })
    }
}

/// The `/v1` JSON answer, with the stages in `Server-Timing`.
fn render(state: &AppState, answer: Answer<()>) -> Response {
    let note = answer.access_note(state.inference.cache().is_some());
    let body = v1::classify_response(&answer.model, answer.outputs, answer.elapsed);
    let mut server_timing = body.timing_ms.server_timing();
    if state.inference.cache().is_some() {
        server_timing.push_str(&cache_timing(body.results.iter().map(|r| r.cached)));
    }
    let mut response = Json(body).into_response();
    response.extensions_mut().insert(note);
    if let Ok(value) = HeaderValue::from_str(&server_timing) {
        response.headers_mut().insert("server-timing", value);
    }
    response
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelDescription {
    #[serde(flatten)]
    info: crate::backend::ModelInfo,
    /// Channels, height, width.
    input_size: [usize; 3],
    /// What runs it: `torch` (libtorch) or `openvino` (native models on the CPU); empty while
    /// loading.
    #[schema(value_type = String, example = "openvino")]
    backend: &'static str,
    /// `native` (this crate's definition of the architecture) or `torchscript`.
    #[schema(value_type = String, example = "native")]
    implementation: &'static str,
    /// The backend's runtime and its version.
    #[schema(value_type = String, example = "OpenVINO 2026.4.1")]
    runtime: String,
    #[schema(value_type = ModelStateSchema)]
    state: &'static str,
    ready: bool,
    default: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<String>,
    /// Times the model thread was replaced after a wedged batch or a panic.
    restarts: u64,
    /// The warm-up profile: every batch size up to `max_batch_size`, its fastest time and
    /// throughput.
    warmup_ms: Vec<crate::backend::WarmupTiming>,
    /// Where the batcher stops growing batches, derived from the profile (absent until the
    /// model has warmed up).
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_policy: Option<crate::backend::BatchPolicy>,
}

fn describe(state: &AppState, model: &ModelHandle) -> ModelDescription {
    let (h, w) = model.info.preprocess.input_size;
    ModelDescription {
        info: model.info.clone(),
        input_size: [3, h, w],
        backend: model.status.backend(),
        implementation: model.status.implementation(),
        runtime: model.status.runtime().to_owned(),
        state: model.status.state_name(),
        ready: model.status.is_ready(),
        default: model.name() == state.inference.default_model(),
        failure: model.status.failure(),
        restarts: model.status.restarts(),
        warmup_ms: model.status.warmup().to_vec(),
        batch_policy: model.status.batch_policy(),
    }
}

/// Every served model.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelList {
    models: Vec<ModelDescription>,
}

/// A model's state in `/v1/models` and `/health/ready`.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = ModelState)]
#[allow(dead_code)] // a schema: the handlers write `ModelStatus::state_name()`'s words
enum ModelStateSchema {
    Loading,
    Warming,
    Ready,
    Failed,
    Restarting,
}

/// List the served models, their preprocessing and state.
#[utoipa::path(get, path = "/v1/models", tag = "v1",
    responses((status = 200, description = "The served models", body = ModelList), UnauthorizedResponse))]
pub async fn list_models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let models = state
        .inference
        .models()
        .iter()
        .map(|m| describe(&state, m))
        .collect();
    Json(ModelList { models })
}

/// One model: architecture, checkpoint, preprocessing, batching, state and warm-up profile.
#[utoipa::path(get, path = "/v1/models/{model}", tag = "v1",
    params(("model" = String, Path, description = "A served model's name")),
    responses(
        (status = 200, description = "The model", body = ModelDescription),
        (status = 404, description = "No such model (`model_not_found`)", body = ErrorBody),
        UnauthorizedResponse,
    ))]
pub async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<ModelDescription>, ApiError> {
    let model = state.inference.model(&name)?;
    Ok(Json(describe(&state, &model)))
}

/// The page to try the models in a browser (`src/http/ui/index.html`: one self-contained file,
/// compiled in, so the binary needs no asset folder and the page no network).
const WEB_PAGE: &str = include_str!("ui/index.html");

/// The page to try the models in a browser.
#[utoipa::path(get, path = "/", tag = "operations",
    responses((status = 200, description = "An HTML page", content_type = "text/html")))]
pub async fn web_page() -> Response {
    static POLICY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let policy = POLICY.get_or_init(|| content_security_policy(WEB_PAGE));
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CONTENT_SECURITY_POLICY, policy.as_str()),
        ],
        WEB_PAGE,
    )
        .into_response()
}

/// A strict policy for the page: only its own inline script and style (allowed by their
/// SHA-256, so an injected one would not run), images from the page (previews are `blob:`
/// URLs), requests to this server only, and no framing.
fn content_security_policy(page: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let hash = |open: &str, close: &str| {
        let start = page.find(open).map(|i| i + open.len()).unwrap_or(0);
        let end = page[start..].find(close).map_or(start, |i| start + i);
        let digest = sha2::Sha256::digest(&page.as_bytes()[start..end]);
        format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(digest)
        )
    };
    format!(
        "default-src 'none'; script-src {}; style-src {}; img-src 'self' blob: data:; \
         connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash("<script>", "</script>"),
        hash("<style>", "</style>")
    )
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Liveness {
    #[schema(value_type = String, example = "live")]
    status: &'static str,
}

/// Liveness: the process answers (it may still be loading models).
#[utoipa::path(get, path = "/health/live", tag = "operations",
    responses((status = 200, description = "The process is alive", body = Liveness)))]
pub async fn live() -> Json<Liveness> {
    Json(Liveness { status: "live" })
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Readiness {
    #[schema(value_type = String, example = "ready", pattern = "^(ready|not_ready|shutting_down)$")]
    status: &'static str,
    /// Each model's state.
    #[schema(value_type = std::collections::HashMap<String, ModelStateSchema>)]
    models: std::collections::BTreeMap<String, &'static str>,
}

/// Readiness: 200 once every model is loaded and warmed up; 503 while loading, restarting or
/// draining after SIGTERM.
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, description = "Every model is ready", body = Readiness),
        (status = 503, description = "Some model is not ready, or the server is shutting down", body = Readiness),
    ))]
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let models = state
        .inference
        .models()
        .iter()
        .map(|m| (m.name().to_owned(), m.status.state_name()))
        .collect();
    let (status, word) = if state.inference.all_ready() {
        (StatusCode::OK, "ready")
    } else if state.inference.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting_down")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    (
        status,
        Json(Readiness {
            status: word,
            models,
        }),
    )
        .into_response()
}

/// Prometheus metrics (text format 0.0.4, or OpenMetrics when the `Accept` header asks for it).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "The metrics", content_type = "text/plain"),
        UnauthorizedResponse,
    ))]
pub async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(cache) = state.inference.cache() {
        cache.refresh_gauges();
    }
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    if wants_openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            state.inference.metrics().encode_openmetrics(),
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            state.inference.metrics().encode_prometheus(),
        )
            .into_response()
    }
}

pub async fn not_found(request: Request) -> Response {
    let body = ErrorBody {
        error: format!(
            "no route for {} {}; see POST /v1/classify, POST /v1/models/{{model}}/classify, GET /v1/models, \
             POST /v2/models/{{model}}/infer, GET /v2/models/{{model}}, GET /v2/health/ready, \
             GET /health/live, GET /health/ready, GET /metrics",
            request.method(),
            request.uri().path()
        ),
        error_type: "not_found",
    };
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

pub fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("handler panicked");
    ApiError::from(crate::error::InferError::Internal).into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_policy_allows_exactly_its_own_script_and_style() {
        let page = "<html><style>p{}</style><script>go()</script></html>";
        let policy = super::content_security_policy(page);
        assert!(policy.contains("default-src 'none'"), "{policy}");
        assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
        assert_eq!(policy.matches("'sha256-").count(), 2, "{policy}");
        let other = super::content_security_policy("<style>p{}</style><script>evil()</script>");
        assert_ne!(policy, other, "another script gets another hash");
        // The real page is covered too: the browser test (tests/ops/test_web_ui.py) runs it
        // under this header and fails on a console error.
        assert!(super::content_security_policy(super::WEB_PAGE).contains("script-src 'sha256-"));
    }
}
