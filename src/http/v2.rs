//! The Open Inference Protocol (KServe v2) over REST, on the same port as `/v1`, with Triton's
//! binary-tensor, classification and statistics extensions. This file only translates between
//! JSON (+ binary sections) and the protocol's tensors in `crate::v2`; the inference service
//! runs the request.

use super::error::{v2_status, ApiError};
use super::headers::{cache_timing, cache_use, header_priority, header_timeout, request_key};
use super::input::{body_bytes, body_reservation, decode_base64, within_body_timeout};
use super::schema::{
    InferHeaderLength, InferResponses, ModelPathParam, RequestTimeoutHeader, TraceContextHeaders,
    V2ErrorBody, V2UnauthorizedResponse,
};
use super::{AppState, RequestLimits};
use crate::backend::ModelHandle;
use crate::error::{InferError, RequestFailure};
use crate::images::DecodePool;
use crate::infer::{Answer, Inference, Intake, ModelRef, Plan, RequestOptions};
use crate::v2::{self, Data, Datatype, Input, Output, OutputData, RequestedOutput, V2Error};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// Length of the JSON part of a body that carries binary tensors after it; 0 means the whole
/// body is the one input (a raw image).
pub const HEADER_LENGTH: &str = "inference-header-content-length";

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{model}/stats", get(model_stats))
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(model_stats),
        )
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer))
}

/// `{model}` and the optional `{version}` of a route.
#[derive(Deserialize)]
pub(super) struct ModelPath {
    model: String,
    version: Option<String>,
}

/// A v2 REST failure: `{"error": "..."}` with the protocol's status.
pub(super) enum Failure {
    Http(ApiError),
    V2(V2Error),
}

impl From<ApiError> for Failure {
    fn from(err: ApiError) -> Self {
        match err {
            ApiError::Infer(err) => Failure::V2(err.into()),
            other => Failure::Http(other),
        }
    }
}

impl From<V2Error> for Failure {
    fn from(err: V2Error) -> Self {
        Failure::V2(err)
    }
}

impl From<crate::error::InferError> for Failure {
    fn from(err: crate::error::InferError) -> Self {
        Failure::V2(err.into())
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Http(err) => err.fmt(f),
            Failure::V2(err) => err.fmt(f),
        }
    }
}

impl RequestFailure for Failure {
    fn error_type(&self) -> &'static str {
        match self {
            Failure::Http(err) => err.error_type(),
            Failure::V2(err) => err.error_type(),
        }
    }

    fn is_server_error(&self) -> bool {
        match self {
            Failure::Http(err) => err.is_server_error(),
            Failure::V2(err) => err.is_server_error(),
        }
    }

    fn is_expected(&self) -> bool {
        match self {
            Failure::Http(err) => err.is_expected(),
            Failure::V2(err) => err.is_expected(),
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = match &self {
            Failure::Http(err) => err.status(),
            Failure::V2(err) => v2_status(err),
        };
        let mut response = (
            status,
            Json(V2ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        if let Failure::V2(V2Error::Infer(err)) = &self {
            super::error::set_retry_after(&mut response, err);
        }
        response
            .extensions_mut()
            .insert(crate::access::ErrorNote(self.error_type()));
        response
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ServerMetadata {
    #[schema(value_type = String, example = "visionserve")]
    name: &'static str,
    #[schema(value_type = String)]
    version: &'static str,
    #[schema(value_type = Vec<String>)]
    extensions: &'static [&'static str],
}

/// Server metadata: name, version and the protocol extensions served.
#[utoipa::path(get, path = "/v2", tag = "v2", operation_id = "v2_server_metadata",
    responses((status = 200, description = "Server metadata", body = ServerMetadata), V2UnauthorizedResponse))]
pub(super) async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: env!("CARGO_PKG_NAME"),
        version: env!("CARGO_PKG_VERSION"),
        extensions: v2::EXTENSIONS,
    })
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ServerLive {
    live: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ServerReady {
    ready: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelReady {
    name: String,
    ready: bool,
}

/// Every model's statistics (Triton's statistics extension).
#[derive(Serialize, utoipa::ToSchema)]
pub struct Statistics {
    model_stats: Vec<v2::ModelStats>,
}

/// Server liveness.
#[utoipa::path(get, path = "/v2/health/live", tag = "v2", operation_id = "v2_server_live",
    responses((status = 200, description = "Alive", body = ServerLive)))]
pub(super) async fn live() -> Json<ServerLive> {
    Json(ServerLive { live: true })
}

/// Server readiness: every model loaded and warmed up, not shutting down.
#[utoipa::path(get, path = "/v2/health/ready", tag = "v2", operation_id = "v2_server_ready",
    responses(
        (status = 200, description = "Ready", body = ServerReady),
        (status = 503, description = "Not ready", body = ServerReady),
    ))]
pub(super) async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let ready = state.inference.all_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(ServerReady { ready })).into_response()
}

fn find_model(
    inference: &Inference,
    path: &ModelPath,
) -> Result<Arc<crate::backend::ModelHandle>, Failure> {
    Ok(inference.model_version(&path.model, path.version.as_deref())?)
}

/// Model metadata: its tensors (inputs `image` BYTES or `pixels` UINT8; outputs
/// `probabilities`, `logits`, `embeddings`).
#[utoipa::path(get, path = "/v2/models/{model}", tag = "v2", operation_id = "v2_model_metadata",
    params(ModelPathParam),
    responses(
        (status = 200, description = "Model metadata", body = v2::ModelMetadata),
        (status = 404, description = "No such model", body = V2ErrorBody),
        V2UnauthorizedResponse,
    ))]
pub(super) async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(path): Path<ModelPath>,
) -> Result<Json<v2::ModelMetadata>, Failure> {
    let model = find_model(&state.inference, &path)?;
    let versions = state.inference.registry().versions(model.name());
    Ok(Json(v2::model_metadata(&model, versions)))
}

/// Model readiness.
#[utoipa::path(get, path = "/v2/models/{model}/ready", tag = "v2", operation_id = "v2_model_ready",
    params(ModelPathParam),
    responses(
        (status = 200, description = "The model is ready", body = ModelReady),
        (status = 503, description = "The model is loading, restarting or the server is draining", body = ModelReady),
        (status = 404, description = "No such model", body = V2ErrorBody),
    ))]
pub(super) async fn model_ready(
    State(state): State<Arc<AppState>>,
    Path(path): Path<ModelPath>,
) -> Result<Response, Failure> {
    let model = find_model(&state.inference, &path)?;
    let ready = model.status.is_ready() && !state.inference.is_shutting_down();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = ModelReady {
        name: model.name().to_owned(),
        ready,
    };
    Ok((status, Json(body)).into_response())
}

/// One model's statistics.
#[utoipa::path(get, path = "/v2/models/{model}/stats", tag = "v2", operation_id = "v2_model_statistics",
    params(ModelPathParam),
    responses(
        (status = 200, description = "The model's statistics", body = Statistics),
        (status = 404, description = "No such model", body = V2ErrorBody),
        V2UnauthorizedResponse,
    ))]
pub(super) async fn model_stats(
    State(state): State<Arc<AppState>>,
    Path(path): Path<ModelPath>,
) -> Result<Json<Statistics>, Failure> {
    let model = find_model(&state.inference, &path)?;
    Ok(Json(Statistics {
        model_stats: vec![v2::model_stats(&model)],
    }))
}

/// Every model's statistics.
#[utoipa::path(get, path = "/v2/models/stats", tag = "v2", operation_id = "v2_statistics",
    responses((status = 200, description = "Every model's statistics", body = Statistics), V2UnauthorizedResponse))]
pub(super) async fn all_stats(State(state): State<Arc<AppState>>) -> Json<Statistics> {
    let model_stats = state
        .inference
        .models()
        .iter()
        .map(|m| v2::model_stats(m))
        .collect();
    Json(Statistics { model_stats })
}

/// Inference: JSON tensors, or Triton's binary tensor extension (a JSON header of
/// `Inference-Header-Content-Length` bytes followed by the raw tensors), or a raw encoded image
/// (`Inference-Header-Content-Length: 0`).
#[utoipa::path(post, path = "/v2/models/{model}/infer", tag = "v2", operation_id = "v2_model_infer",
    params(ModelPathParam, InferHeaderLength, RequestTimeoutHeader, TraceContextHeaders),
    request_body(description = "JSON tensors, or binary tensors after a JSON header, or one raw image",
        content((InferRequestJson = "application/json"), ("application/octet-stream"))),
    responses(InferResponses),
    security((), ("api_key" = []), ("bearer" = []))
)]
pub(super) async fn infer(
    State(state): State<Arc<AppState>>,
    Path(path): Path<ModelPath>,
    request: Request,
) -> Response {
    let intake = RestIntake {
        request,
        limits: state.limits,
        pool: state.inference.pool().clone(),
        header_length: None,
    };
    let model = ModelRef::new(&path.model, path.version.as_deref());
    match state.inference.infer(model, intake).await {
        Ok(answer) => render(&state, answer),
        Err(err) => err.into_response(),
    }
}

/// A v2 REST infer request: its headers, checked before the body is read, then its body of
/// JSON tensors, binary tensors or one raw image.
struct RestIntake {
    request: Request,
    limits: RequestLimits,
    pool: DecodePool,
    /// `Inference-Header-Content-Length`: where the JSON ends (0: the body is one image).
    header_length: Option<usize>,
}

/// What the response needs besides the results.
struct RestKeep {
    tensors: v2::Tensors,
    id: Option<String>,
    binary: BinaryOutputs,
}

impl Intake for RestIntake {
    type Keep = RestKeep;
    type Error = Failure;

    fn options(&mut self, _model: &ModelHandle) -> Result<RequestOptions, Failure> {
        let body_bytes = body_reservation(&self.request, self.limits.max_body_bytes)?;
        let headers = self.request.headers();
        self.header_length = header_length(headers)?;
        let mut options = RequestOptions {
            cache: cache_use(headers),
            body_bytes: Some(body_bytes),
            priority: header_priority(headers)?,
            key: request_key(self.request.extensions()),
            ..RequestOptions::default()
        };
        if let Some(timeout) = header_timeout(headers)? {
            options.limit_time(timeout);
        }
        Ok(options)
    }

    async fn read(self, model: Arc<ModelHandle>) -> Result<Plan<RestKeep>, Failure> {
        let limits = &self.limits;
        let body =
            within_body_timeout(limits, body_bytes(self.request, limits.max_body_bytes)).await?;
        let parsed = match self.header_length {
            // Raw binary request: the body is one encoded image.
            Some(0) => ParsedRequest::raw_image(body),
            header_length => {
                let split = header_length.unwrap_or(body.len());
                self.pool
                    .run(move || ParsedRequest::parse(body, split))
                    .await
                    .map_err(InferError::from)??
            }
        };
        let plan = v2::plan(&model, parsed.inputs, &parsed.outputs)?;
        Ok(Plan {
            images: plan.images,
            outputs: plan.outputs,
            timeout: parsed.timeout,
            priority: parsed.priority,
            keep: RestKeep {
                tensors: plan.keep,
                id: parsed.id,
                binary: parsed.binary,
            },
        })
    }
}

/// The response's tensors, with whether the answers came from the cache in `Server-Timing`.
fn render(state: &AppState, answer: Answer<RestKeep>) -> Response {
    let note = answer.access_note(state.inference.cache().is_some());
    let Answer {
        model,
        outputs: results,
        keep,
        ..
    } = answer;
    let outputs = v2::render(&model, &keep.tensors, &results);
    let mut response = render_response(
        model.name(),
        model.version(),
        keep.id,
        outputs,
        &keep.binary,
    );
    if state.inference.cache().is_some() {
        let timing = cache_timing(results.iter().map(|r| r.cached));
        if let Ok(value) = HeaderValue::from_str(timing.trim_start_matches(", ")) {
            response.headers_mut().insert("server-timing", value);
        }
    }
    response.extensions_mut().insert(note);
    response
}

fn header_length(headers: &HeaderMap) -> Result<Option<usize>, Failure> {
    let Some(value) = headers.get(HEADER_LENGTH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| {
            Failure::V2(V2Error::InvalidArgument(format!(
                "the Inference-Header-Content-Length header must be the byte length of the JSON part, not {value:?}"
            )))
        })
}

/// The JSON part of a v2 infer request.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = InferRequest)]
pub struct InferRequestJson {
    id: Option<String>,
    /// Some clients (the kserve SDK) repeat the route's model here; the route decides.
    #[serde(default, rename = "model_name")]
    _model_name: Option<String>,
    #[serde(default, rename = "model_version")]
    _model_version: Option<String>,
    /// `binary_data_output`, `classification`, `timeout` (see the README).
    #[serde(default)]
    #[schema(value_type = Object)]
    parameters: HashMap<String, Value>,
    #[schema(min_items = 1)]
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Vec<OutputJson>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = InferInput)]
pub struct InputJson {
    /// `image` (BYTES: encoded images) or `pixels` (UINT8 or FP32, N x 3 x H x W).
    #[schema(example = "image")]
    name: String,
    shape: Vec<i64>,
    #[schema(example = "BYTES")]
    datatype: String,
    /// `binary_data_size` when the data is in the binary section.
    #[serde(default)]
    #[schema(value_type = Object)]
    parameters: HashMap<String, Value>,
    /// The tensor's elements (flat or nested), base64 strings for BYTES; absent when binary.
    #[schema(value_type = Option<Value>)]
    data: Option<Value>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = InferRequestedOutput)]
pub struct OutputJson {
    /// `probabilities`, `logits` or `embeddings`.
    name: String,
    /// `binary_data` and `classification` (top-k as "score:index:label" strings).
    #[serde(default)]
    #[schema(value_type = Object)]
    parameters: HashMap<String, Value>,
}

/// Which outputs go in the binary section of the response.
#[derive(Default)]
struct BinaryOutputs {
    all: bool,
    named: HashMap<String, bool>,
}

impl BinaryOutputs {
    fn is_binary(&self, name: &str) -> bool {
        self.named.get(name).copied().unwrap_or(self.all)
    }
}

struct ParsedRequest {
    id: Option<String>,
    /// The `timeout` parameter (microseconds, as Triton reads it).
    timeout: Option<std::time::Duration>,
    /// The `priority` parameter (Triton's: 1 = the highest level, 0 = the default).
    priority: Option<u64>,
    inputs: Vec<Input>,
    outputs: Vec<RequestedOutput>,
    binary: BinaryOutputs,
}

/// The body parser, for the fuzz targets.
#[cfg(feature = "fuzzing")]
pub(super) fn fuzz_parse(body: Bytes, split: usize) {
    let _ = ParsedRequest::parse(body, split);
}

impl ParsedRequest {
    fn raw_image(body: Bytes) -> Self {
        Self {
            id: None,
            timeout: None,
            priority: None,
            inputs: vec![Input {
                name: v2::INPUT_IMAGE.to_owned(),
                datatype: Datatype::Bytes,
                shape: vec![1],
                data: Data::Bytes(vec![body]),
            }],
            outputs: Vec::new(),
            binary: BinaryOutputs::default(),
        }
    }

    /// Parse `body[..split]` as JSON, taking the inputs' binary data from `body[split..]`.
    fn parse(body: Bytes, split: usize) -> Result<Self, Failure> {
        if split > body.len() {
            return Err(invalid(format!(
                "Inference-Header-Content-Length is {split} but the body has only {} bytes",
                body.len()
            )));
        }
        let request: InferRequestJson = serde_json::from_slice(&body[..split]).map_err(|e| {
            invalid(format!(
                "invalid inference request JSON ({e}); expected {{\"inputs\": [{{\"name\", \"shape\", \"datatype\", \"data\"}}], \"outputs\"?: [{{\"name\"}}]}}"
            ))
        })?;
        let mut binary = body.slice(split..);
        let inputs = request
            .inputs
            .into_iter()
            .map(|input| input_tensor(input, &mut binary))
            .collect::<Result<Vec<_>, _>>()?;
        if !binary.is_empty() {
            return Err(invalid(format!(
                "{} bytes of binary data are left over after the inputs' binary_data_size",
                binary.len()
            )));
        }
        let mut outputs = Vec::with_capacity(request.outputs.len());
        let mut named = HashMap::new();
        for output in request.outputs {
            let classification = match output.parameters.get("classification") {
                None => None,
                Some(k) => Some(count_parameter(
                    &format!("output {:?}", output.name),
                    "classification",
                    k,
                )?),
            };
            if let Some(binary) = output.parameters.get("binary_data") {
                named.insert(output.name.clone(), bool_parameter("binary_data", binary)?);
            }
            outputs.push(RequestedOutput {
                name: output.name,
                classification,
            });
        }
        let all = match request.parameters.get("binary_data_output") {
            Some(value) => bool_parameter("binary_data_output", value)?,
            None => false,
        };
        // Triton reads a timeout of 0 as "no timeout".
        let timeout = match request.parameters.get("timeout") {
            Some(value) => match count_parameter("the request", "timeout", value)? {
                0 => None,
                us => Some(std::time::Duration::from_micros(us as u64)),
            },
            None => None,
        };
        let priority = match request.parameters.get("priority") {
            Some(value) => Some(value.as_u64().ok_or_else(|| {
                invalid(format!(
                    "parameter \"priority\" must be a level (1 = the highest, 0 = the \
                     default), not {value}"
                ))
            })?),
            None => None,
        };
        Ok(Self {
            id: request.id,
            timeout,
            priority,
            inputs,
            outputs,
            binary: BinaryOutputs { all, named },
        })
    }
}

fn invalid(message: String) -> Failure {
    Failure::V2(V2Error::InvalidArgument(message))
}

/// `what`: whose parameter it is, e.g. `output "logits"`.
fn count_parameter(what: &str, name: &str, value: &Value) -> Result<usize, Failure> {
    value.as_u64().map(|k| k as usize).ok_or_else(|| {
        invalid(format!(
            "{what}: parameter {name:?} must be a positive integer, not {value}"
        ))
    })
}

fn bool_parameter(name: &str, value: &Value) -> Result<bool, Failure> {
    value.as_bool().ok_or_else(|| {
        invalid(format!(
            "parameter {name:?} must be true or false, not {value}"
        ))
    })
}

/// One input: its data from the binary section (`binary_data_size`) or from JSON.
fn input_tensor(input: InputJson, binary: &mut Bytes) -> Result<Input, Failure> {
    let datatype = Datatype::parse(&input.datatype)?;
    let data = match input.parameters.get("binary_data_size") {
        Some(size) => {
            let size =
                count_parameter(&format!("input {:?}", input.name), "binary_data_size", size)?;
            if size > binary.len() {
                return Err(invalid(format!(
                    "input {:?}: binary_data_size is {size} but only {} bytes of binary data remain",
                    input.name,
                    binary.len()
                )));
            }
            Data::from_raw(&input.name, datatype, binary.split_to(size))?
        }
        None => {
            let value = input.data.ok_or_else(|| {
                invalid(format!(
                    "input {:?} has neither \"data\" nor a binary_data_size parameter",
                    input.name
                ))
            })?;
            json_data(&input.name, datatype, value)?
        }
    };
    Ok(Input {
        name: input.name,
        datatype,
        shape: input.shape,
        data,
    })
}

/// Elements of JSON `data` (flat or nested row-major arrays). `BYTES` elements that carry
/// images are base64 text: JSON strings cannot hold arbitrary bytes.
fn json_data(name: &str, datatype: Datatype, value: Value) -> Result<Data, Failure> {
    let mut flat = Vec::new();
    flatten(value, &mut flat);
    let element = |i: usize, expected: &str, got: &Value| {
        invalid(format!(
            "input {name:?} element {i}: expected {expected}, not {got}"
        ))
    };
    Ok(match datatype {
        Datatype::Bytes => Data::Bytes(
            flat.iter()
                .enumerate()
                .map(|(i, v)| {
                    let text = v.as_str().ok_or_else(|| element(i, "a string", v))?;
                    decode_base64(text).map_err(|_| {
                        invalid(format!(
                            "input {name:?} element {i}: BYTES elements in JSON must be base64-encoded \
                             files; send raw bytes with the binary tensor extension (binary_data_size)"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        Datatype::Uint8 => Data::Uint8(
            flat.iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_u64()
                        .and_then(|x| u8::try_from(x).ok())
                        .ok_or_else(|| element(i, "an integer from 0 to 255", v))
                })
                .collect::<Result<_, _>>()?,
        ),
        Datatype::Fp32 => Data::Fp32(
            flat.iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_f64()
                        .map(|x| x as f32)
                        .ok_or_else(|| element(i, "a number", v))
                })
                .collect::<Result<_, _>>()?,
        ),
        _ => Data::Unsupported,
    })
}

fn flatten(value: Value, out: &mut Vec<Value>) {
    match value {
        Value::Array(items) => items.into_iter().for_each(|v| flatten(v, out)),
        other => out.push(other),
    }
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = InferResponse)]
pub struct InferResponseJson<'a> {
    #[schema(value_type = String)]
    model_name: &'a str,
    #[schema(value_type = String)]
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    outputs: Vec<OutputTensorJson<'a>>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = InferOutput)]
pub struct OutputTensorJson<'a> {
    #[schema(value_type = String, example = "probabilities")]
    name: &'static str,
    #[schema(value_type = String, example = "FP32")]
    datatype: &'static str,
    #[schema(value_type = Vec<i64>)]
    shape: &'a [i64],
    /// `{"binary_data_size": n}` when the tensor is in the binary section.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    parameters: Option<Value>,
    /// Row-major values: numbers for FP32, strings for BYTES (classification labels).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<OutputValueSchema>>)]
    data: Option<OutputDataJson<'a>>,
}

/// One element of an output tensor.
#[derive(Serialize, utoipa::ToSchema)]
#[allow(dead_code)] // a schema: OutputDataJson writes these
#[schema(as = OutputValue)]
#[serde(untagged)]
enum OutputValueSchema {
    Number(f32),
    Text(String),
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutputDataJson<'a> {
    Fp32(&'a [f32]),
    Strings(Vec<&'a str>),
}

/// The response: JSON alone, or JSON followed by the binary outputs.
fn render_response(
    model: &str,
    version: &str,
    id: Option<String>,
    outputs: Vec<Output>,
    binary: &BinaryOutputs,
) -> Response {
    let mut raw_parts = Vec::new();
    let tensors = outputs
        .iter()
        .map(|output| {
            let mut tensor = OutputTensorJson {
                name: output.name,
                datatype: output.datatype.name(),
                shape: &output.shape,
                parameters: None,
                data: None,
            };
            if binary.is_binary(output.name) {
                let raw = output.data.to_raw();
                tensor.parameters = Some(serde_json::json!({ "binary_data_size": raw.len() }));
                raw_parts.push(raw);
            } else {
                tensor.data = Some(match &output.data {
                    OutputData::Fp32(values) => OutputDataJson::Fp32(values),
                    OutputData::Bytes(elements) => OutputDataJson::Strings(
                        elements
                            .iter()
                            .map(|e| std::str::from_utf8(e).unwrap_or(""))
                            .collect(),
                    ),
                });
            }
            tensor
        })
        .collect();
    let json = serde_json::to_vec(&InferResponseJson {
        model_name: model,
        model_version: version,
        id,
        outputs: tensors,
    })
    .expect("serialising a response cannot fail");
    if raw_parts.is_empty() {
        return ([(header::CONTENT_TYPE, "application/json")], json).into_response();
    }
    let json_length = json.len();
    let mut body = json;
    for part in raw_parts {
        body.extend_from_slice(&part);
    }
    let mut response = ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response();
    response
        .headers_mut()
        .insert(HEADER_LENGTH, HeaderValue::from(json_length));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str, binary: &[u8]) -> Result<ParsedRequest, Failure> {
        let mut body = json.as_bytes().to_vec();
        body.extend_from_slice(binary);
        ParsedRequest::parse(Bytes::from(body), json.len())
    }

    fn message(result: Result<ParsedRequest, Failure>) -> String {
        match result {
            Ok(_) => panic!("expected an error"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn binary_inputs_are_cut_from_the_binary_section_in_order() {
        let json = r#"{"inputs": [{"name": "pixels", "shape": [1, 2], "datatype": "UINT8", "parameters": {"binary_data_size": 2}}],
                       "outputs": [{"name": "probabilities", "parameters": {"classification": 3, "binary_data": true}}],
                       "parameters": {"binary_data_output": false}, "id": "r1"}"#;
        let parsed = parse(json, &[7, 9]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.id.as_deref(), Some("r1"));
        let Data::Uint8(values) = &parsed.inputs[0].data else {
            panic!("UINT8 data")
        };
        assert_eq!(values, &[7, 9]);
        assert_eq!(parsed.outputs[0].classification, Some(3));
        assert!(parsed.binary.is_binary("probabilities"));
        assert!(!parsed.binary.is_binary("logits"));
    }

    #[test]
    fn binary_sizes_must_add_up() {
        let json = r#"{"inputs": [{"name": "pixels", "shape": [3], "datatype": "UINT8", "parameters": {"binary_data_size": 3}}]}"#;
        assert!(message(parse(json, &[1, 2])).contains("only 2 bytes"));
        assert!(message(parse(json, &[1, 2, 3, 4])).contains("left over"));
    }

    #[test]
    fn json_bytes_elements_are_base64() {
        let json = r#"{"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["aGVsbG8=", "aGk"]}]}"#;
        let parsed = parse(json, &[]).unwrap_or_else(|e| panic!("{e}"));
        let Data::Bytes(files) = &parsed.inputs[0].data else {
            panic!("BYTES data")
        };
        assert_eq!(files, &[Bytes::from("hello"), Bytes::from("hi")]);
        let bad = r#"{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]}"#;
        assert!(message(parse(bad, &[])).contains("base64"));
    }

    #[test]
    fn nested_json_data_is_flattened_and_checked() {
        let json = r#"{"inputs": [{"name": "pixels", "shape": [2, 2], "datatype": "UINT8", "data": [[1, 2], [3, 255]]}]}"#;
        let parsed = parse(json, &[]).unwrap_or_else(|e| panic!("{e}"));
        let Data::Uint8(values) = &parsed.inputs[0].data else {
            panic!("UINT8 data")
        };
        assert_eq!(values, &[1, 2, 3, 255]);
        let bad =
            r#"{"inputs": [{"name": "pixels", "shape": [1], "datatype": "UINT8", "data": [256]}]}"#;
        assert!(message(parse(bad, &[])).contains("0 to 255"));
    }

    #[test]
    fn malformed_requests_say_what_is_expected() {
        assert!(message(parse("{", &[])).contains("expected {\"inputs\""));
        let no_data = r#"{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]}"#;
        assert!(message(parse(no_data, &[])).contains("neither"));
        let datatype =
            r#"{"inputs": [{"name": "image", "shape": [1], "datatype": "STRING", "data": []}]}"#;
        assert!(message(parse(datatype, &[])).contains("unknown datatype"));
        assert!(
            message(ParsedRequest::parse(Bytes::from_static(b"{}"), 10)).contains("only 2 bytes")
        );
    }

    #[test]
    fn binary_outputs_follow_the_json() {
        let outputs = vec![Output {
            name: v2::OUTPUT_PROBABILITIES,
            datatype: Datatype::Fp32,
            shape: vec![1, 2],
            data: OutputData::Fp32(vec![0.25, 0.75]),
        }];
        let binary = BinaryOutputs {
            all: true,
            named: HashMap::new(),
        };
        let response = render_response("m", "1", Some("x".into()), outputs, &binary);
        let length: usize = response.headers()[HEADER_LENGTH]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body = futures_body(response);
        let json: Value = serde_json::from_slice(&body[..length]).unwrap();
        assert_eq!(json["id"], "x");
        assert_eq!(json["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(
            &body[length..],
            &[0.25f32, 0.75].map(f32::to_le_bytes).concat()[..]
        );
    }

    fn futures_body(response: Response) -> Bytes {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
            .unwrap()
    }
}
