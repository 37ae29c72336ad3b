//! Request handlers. A classify request is validated, admitted, decoded on the pool, split into
//! one queue entry per image, and answered when every image has its prediction.

use super::input::{read_images, RequestImages};
use super::types::{ClassifyResponse, ImageResult, Prediction, Timing};
use super::AppState;
use crate::backend::ModelHandle;
use crate::error::{ApiError, ErrorBody};
use crate::pipeline::{self, ImageJob, ImagePrediction, InferenceError, Prepared};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

pub const DEFAULT_TOP_K: usize = 5;

#[derive(Debug, Deserialize)]
pub struct ClassifyQuery {
    top_k: Option<String>,
}

type QueryResult = Result<Query<ClassifyQuery>, QueryRejection>;

pub async fn classify_default(
    State(state): State<Arc<AppState>>,
    query: QueryResult,
    request: Request,
) -> Response {
    let model = state.default_model.clone();
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
    let started = Instant::now();
    let Some(model) = state.model(&model_name).cloned() else {
        let err = ApiError::ModelNotFound {
            name: model_name,
            available: state.model_names(),
        };
        state.metrics.unknown_model_request(err.error_type());
        return err.into_response();
    };
    // Atomics only because the handler future must be Send; nothing else touches them.
    let outcome = RequestOutcome {
        model: &model,
        started,
        images: AtomicUsize::new(0),
        recorded: AtomicBool::new(false),
    };
    let result = classify_images(&state, &model, query, request, started, &outcome.images).await;
    outcome.recorded.store(true, Ordering::Relaxed);
    let images = outcome.images.load(Ordering::Relaxed);
    match result {
        Ok(response) => {
            model.metrics.request_succeeded(images, started.elapsed());
            response
        }
        Err(err) => {
            if err.status().is_server_error()
                && !matches!(err, ApiError::NotReady { .. } | ApiError::ShuttingDown)
            {
                tracing::error!(model = %model.name(), error = %err, "request failed");
            } else {
                tracing::debug!(model = %model.name(), error = %err, "request rejected");
            }
            model.metrics.request_failed(
                err.error_type(),
                images,
                err.status().is_server_error(),
                started.elapsed(),
            );
            err.into_response()
        }
    }
}

/// Counts a request whose handler is dropped before it finishes: hyper drops it when the
/// client disconnects. Its queued images are dropped by the batcher; this records the request.
struct RequestOutcome<'a> {
    model: &'a ModelHandle,
    started: Instant,
    images: AtomicUsize,
    recorded: AtomicBool,
}

impl Drop for RequestOutcome<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // CatchPanicLayer answers 500; record it as the server's failure, not the client's.
            let elapsed = self.started.elapsed();
            self.model.metrics.request_failed(
                "internal",
                self.images.load(Ordering::Relaxed),
                true,
                elapsed,
            );
            return;
        }
        if !self.recorded.load(Ordering::Relaxed) {
            tracing::debug!(model = %self.model.name(), "client disconnected before the answer");
            self.model.metrics.request_failed(
                CLIENT_GONE,
                self.images.load(Ordering::Relaxed),
                false,
                self.started.elapsed(),
            );
        }
    }
}

/// `reason` label of requests whose client left before the answer.
pub const CLIENT_GONE: &str = "client_gone";

fn parse_top_k(
    query: QueryResult,
    body_top_k: Option<usize>,
    num_classes: usize,
) -> Result<usize, ApiError> {
    let query = query
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))?;
    let from_query = match query.0.top_k {
        Some(text) => Some(text.parse::<usize>().map_err(|_| {
            ApiError::BadRequest(format!(
                "top_k must be an integer between 1 and {num_classes}, not {text:?}"
            ))
        })?),
        None => None,
    };
    let top_k = from_query
        .or(body_top_k)
        .unwrap_or(DEFAULT_TOP_K.min(num_classes));
    if top_k == 0 || top_k > num_classes {
        return Err(ApiError::BadRequest(format!(
            "top_k must be between 1 and {num_classes}, not {top_k}"
        )));
    }
    Ok(top_k)
}

async fn classify_images(
    state: &AppState,
    model: &Arc<ModelHandle>,
    query: QueryResult,
    request: Request,
    started: Instant,
    image_count: &AtomicUsize,
) -> Result<Response, ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    model.ensure_ready()?;
    let _request_permit =
        state
            .requests
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::TooManyRequests {
                limit: state.limits.max_concurrent_requests,
            })?;
    let RequestImages {
        images,
        top_k: body_top_k,
    } = read_images(request, &state.limits, &state.pool).await?;
    let top_k = parse_top_k(query, body_top_k, model.info.num_classes)?;
    if images.is_empty() {
        return Err(ApiError::BadRequest("the request holds no image".into()));
    }
    if images.len() > state.limits.max_images_per_request {
        return Err(ApiError::TooManyImages {
            limit: state.limits.max_images_per_request,
        });
    }
    image_count.store(images.len(), Ordering::Relaxed);

    let mut admission = model.admit(images.len())?;
    let prepared = prepare_all(state, model, images).await?;
    let mut pending = Vec::with_capacity(prepared.len());
    let mut submit_error = None;
    for image in prepared {
        let (reply, answer) = oneshot::channel();
        if let Err(e) = model.submit(ImageJob {
            pixels: image.pixels,
            top_k,
            reply,
        }) {
            submit_error = Some(e);
            break;
        }
        pending.push((answer, image.decode, image.preprocess));
    }
    admission.images_queued();

    // Wait for every queued image, even once one has failed: dropping the others' receivers
    // would make them look abandoned by the client, and releasing the admission early would
    // under-count the images still in flight.
    let mut answers = Vec::with_capacity(pending.len());
    for (answer, decode, preprocess) in pending {
        answers.push((answer.await, decode, preprocess));
    }
    drop(admission);
    if let Some(e) = submit_error {
        return Err(e);
    }
    let mut results = Vec::with_capacity(answers.len());
    let mut request_timing = Timing::default();
    for (answer, decode, preprocess) in answers {
        let prediction = answer
            .map_err(|_| ApiError::Internal)?
            .map_err(|e| match e {
                InferenceError::Failed => ApiError::Internal,
                InferenceError::Stopped => ApiError::ShuttingDown,
            })?;
        let result = image_result(model, prediction, decode, preprocess);
        request_timing = request_timing.max(result.timing_ms);
        results.push(result);
    }
    request_timing.total = millis(started.elapsed());
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

/// Decode and preprocess every image on the pool, in parallel; the first failure (in image
/// order) fails the request and names the image.
async fn prepare_all(
    state: &AppState,
    model: &ModelHandle,
    images: Vec<bytes::Bytes>,
) -> Result<Vec<Prepared>, ApiError> {
    let count = images.len();
    let mut tasks = JoinSet::new();
    for (index, bytes) in images.into_iter().enumerate() {
        let pool = state.pool.clone();
        let decode = state.limits.decode;
        let cfg = model.info.preprocess.clone();
        let metric = model.metrics.preprocess.clone();
        tasks.spawn(async move {
            let prepared = pool
                .run(move || pipeline::prepare(&bytes, &decode, &cfg))
                .await;
            if let Ok(p) = &prepared {
                metric.observe((p.decode + p.preprocess).as_secs_f64());
            }
            (index, prepared)
        });
    }
    let mut slots: Vec<Option<Prepared>> = (0..count).map(|_| None).collect();
    let mut first_error: Option<(usize, ApiError)> = None;
    while let Some(joined) = tasks.join_next().await {
        let (index, prepared) = joined.map_err(|_| ApiError::Internal)?;
        match prepared {
            Ok(p) => slots[index] = Some(p),
            Err(source) => {
                if first_error.as_ref().is_none_or(|(i, _)| index < *i) {
                    first_error = Some((index, ApiError::Image { index, source }));
                }
            }
        }
    }
    if let Some((_, err)) = first_error {
        return Err(err);
    }
    Ok(slots
        .into_iter()
        .map(|s| s.expect("every image prepared"))
        .collect())
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn image_result(
    model: &ModelHandle,
    prediction: ImagePrediction,
    decode: Duration,
    preprocess: Duration,
) -> ImageResult {
    let labels = &model.info.labels;
    let predictions = prediction
        .top
        .iter()
        .map(|&(index, score)| Prediction {
            index,
            label: labels
                .get(index)
                .cloned()
                .unwrap_or_else(|| format!("class_{index}")),
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
        default: model.name() == state.default_model,
        failure: model.status.failure().map(str::to_owned),
        warmup_ms: model.status.warmup().to_vec(),
    }
}

pub async fn list_models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let models: Vec<_> = state.models.iter().map(|m| describe(&state, m)).collect();
    Json(serde_json::json!({ "models": models }))
}

pub async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<ModelDescription>, ApiError> {
    let model = state.model(&name).ok_or_else(|| ApiError::ModelNotFound {
        name,
        available: state.model_names(),
    })?;
    Ok(Json(describe(&state, model)))
}

pub async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "live" }))
}

pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let models: serde_json::Map<String, serde_json::Value> = state
        .models
        .iter()
        .map(|m| (m.name().to_owned(), m.status.state_name().into()))
        .collect();
    let (status, word) = if state.all_ready() {
        (StatusCode::OK, "ready")
    } else if state.is_shutting_down() {
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
            state.metrics.encode_openmetrics(),
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            state.metrics.encode_prometheus(),
        )
            .into_response()
    }
}

pub async fn not_found(request: Request) -> Response {
    let body = ErrorBody {
        error: format!(
            "no route for {} {}; see POST /v1/classify, POST /v1/models/{{model}}/classify, GET /v1/models, \
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
    ApiError::Internal.into_response()
}
