//! The `/v1` API and the operational endpoints. A classify request's body is read into images
//! here; the inference service does the rest, and the answer is rendered as `/v1` JSON.

use super::error::{ApiError, ErrorBody};
use super::input::{discard_body, read_images, reserve_body, RequestImages};
use super::types::{ClassifyResponse, ImageResult, Prediction, Timing};
use super::AppState;
use crate::backend::ModelHandle;
use crate::infer::{parse_timeout, ImageInput, ImageOutput, InferRequest, Outputs};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

pub const DEFAULT_TOP_K: usize = 5;

#[derive(Debug, Deserialize)]
pub struct ClassifyQuery {
    top_k: Option<String>,
    /// The client's own timeout (`250ms`, `1.5s`, ...), within `--request-timeout`.
    timeout: Option<String>,
}

type QueryResult = Result<Query<ClassifyQuery>, QueryRejection>;

pub async fn classify_default(
    State(state): State<Arc<AppState>>,
    query: QueryResult,
    request: Request,
) -> Response {
    let model = state.inference.default_model().to_owned();
    classify(state, model, query, request).await
}

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
    model_name: String,
    query: QueryResult,
    request: Request,
) -> Response {
    let mut infer = match state.inference.begin(&model_name) {
        Ok(infer) => infer,
        Err(err) => {
            discard_body(request);
            return ApiError::from(err).into_response();
        }
    };
    match classify_images(&state, &mut infer, query, request).await {
        Ok(response) => {
            infer.succeeded();
            response
        }
        Err(err) => {
            infer.failed(err.error_type(), err.is_server_error(), &err);
            err.into_response()
        }
    }
}

/// `?top_k=` and `?timeout=`, checked before the body is read: a bad query is refused
/// without reading it.
fn parse_query(
    query: QueryResult,
    num_classes: usize,
) -> Result<(Option<usize>, Option<Duration>), ApiError> {
    let query = query
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))?
        .0;
    let timeout = query
        .timeout
        .as_deref()
        .map(parse_timeout)
        .transpose()
        .map_err(ApiError::BadRequest)?;
    Ok((query_top_k(query.top_k, num_classes)?, timeout))
}

fn query_top_k(top_k: Option<String>, num_classes: usize) -> Result<Option<usize>, ApiError> {
    match top_k {
        Some(text) => {
            let k = text.parse::<usize>().map_err(|_| {
                ApiError::BadRequest(format!(
                    "top_k must be an integer between 1 and {num_classes}, not {text:?}"
                ))
            })?;
            check_top_k(k, num_classes).map(Some)
        }
        None => Ok(None),
    }
}

fn check_top_k(top_k: usize, num_classes: usize) -> Result<usize, ApiError> {
    if top_k == 0 || top_k > num_classes {
        return Err(ApiError::BadRequest(format!(
            "top_k must be between 1 and {num_classes}, not {top_k}"
        )));
    }
    Ok(top_k)
}

async fn classify_images(
    state: &AppState,
    infer: &mut InferRequest,
    query: QueryResult,
    request: Request,
) -> Result<Response, ApiError> {
    let model = infer.model().clone();
    let num_classes = model.info.num_classes;
    let checked = parse_query(query, num_classes)
        .and_then(|(top_k, timeout)| Ok((top_k, timeout, header_timeout(request.headers())?)));
    let (from_query, query_timeout, header_timeout) = match checked {
        Ok(checked) => checked,
        Err(err) => {
            discard_body(request);
            return Err(err);
        }
    };
    for timeout in [query_timeout, header_timeout].into_iter().flatten() {
        infer.limit_time(timeout);
    }
    let request = reserve_body(infer, request, state.limits.max_body_bytes).await?;
    let RequestImages {
        images,
        top_k: body_top_k,
    } = read_images(request, &state.limits, state.inference.pool()).await?;
    let top_k = match from_query.or(body_top_k) {
        Some(k) => check_top_k(k, num_classes)?,
        None => DEFAULT_TOP_K.min(num_classes),
    };
    let images = images.into_iter().map(ImageInput::Encoded).collect();
    let outputs = infer.run(images, Outputs::top_k(top_k)).await?;

    let labels = &model.info.labels;
    let mut results = Vec::with_capacity(outputs.len());
    let mut request_timing = Timing::default();
    for output in outputs {
        let result = image_result(labels, output);
        request_timing = request_timing.max(result.timing_ms);
        results.push(result);
    }
    request_timing.total = millis(infer.started().elapsed());
    let server_timing = request_timing.server_timing();
    let body = ClassifyResponse {
        model: model.name().to_owned(),
        results,
        timing_ms: request_timing,
    };
    let mut response = Json(body).into_response();
    if let Ok(value) = HeaderValue::from_str(&server_timing) {
        response.headers_mut().insert("server-timing", value);
    }
    Ok(response)
}

/// The `Request-Timeout` header (`250ms`, `1.5s`, ...), if the client sent one.
pub fn header_timeout(headers: &HeaderMap) -> Result<Option<Duration>, ApiError> {
    let Some(value) = headers.get(REQUEST_TIMEOUT) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("");
    parse_timeout(text)
        .map(Some)
        .map_err(|e| ApiError::BadRequest(format!("Request-Timeout header: {e}")))
}

/// A client's timeout for one request, as a header.
pub const REQUEST_TIMEOUT: &str = "request-timeout";

/// Milliseconds, rounded to the microsecond (what a client can use; more digits are noise).
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn image_result(labels: &[String], output: ImageOutput) -> ImageResult {
    let ImageOutput {
        prediction,
        decode,
        preprocess,
    } = output;
    let predictions = prediction
        .top
        .iter()
        .map(|&(index, score)| Prediction {
            index,
            label: label_of(labels, index),
            score,
        })
        .collect();
    ImageResult {
        predictions,
        batch_size: prediction.batch_size,
        timing_ms: Timing {
            decode: millis(decode),
            preprocess: millis(preprocess),
            queue: millis(prediction.queue_wait),
            inference: millis(prediction.inference),
            total: millis(decode + preprocess + prediction.queue_wait + prediction.inference),
        },
    }
}

/// A class's label, or `class_N` where the model has none for it.
pub fn label_of(labels: &[String], index: usize) -> String {
    labels
        .get(index)
        .cloned()
        .unwrap_or_else(|| format!("class_{index}"))
}

#[derive(Serialize)]
pub struct ModelDescription {
    #[serde(flatten)]
    info: crate::backend::ModelInfo,
    input_size: [usize; 3],
    backend: &'static str,
    state: &'static str,
    ready: bool,
    default: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    failure: Option<String>,
    /// Times the model thread was replaced after a wedged batch or a panic.
    restarts: u64,
    warmup_ms: Vec<crate::backend::WarmupTiming>,
}

fn describe(state: &AppState, model: &ModelHandle) -> ModelDescription {
    let (h, w) = model.info.preprocess.input_size;
    ModelDescription {
        info: model.info.clone(),
        input_size: [3, h, w],
        backend: model.status.backend(),
        state: model.status.state_name(),
        ready: model.status.is_ready(),
        default: model.name() == state.inference.default_model(),
        failure: model.status.failure(),
        restarts: model.status.restarts(),
        warmup_ms: model.status.warmup().to_vec(),
    }
}

pub async fn list_models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let models: Vec<_> = state
        .inference
        .models()
        .iter()
        .map(|m| describe(&state, m))
        .collect();
    Json(serde_json::json!({ "models": models }))
}

pub async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<ModelDescription>, ApiError> {
    let model = state.inference.model(&name)?;
    Ok(Json(describe(&state, model)))
}

pub async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "live" }))
}

pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let models: serde_json::Map<String, serde_json::Value> = state
        .inference
        .models()
        .iter()
        .map(|m| (m.name().to_owned(), m.status.state_name().into()))
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
        Json(serde_json::json!({ "status": word, "models": models })),
    )
        .into_response()
}

pub async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
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
