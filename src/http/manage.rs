//! The management API: what `manage.rs` does, over HTTP. Every route here takes the admin key
//! (`--admin-token`), never an inference key (`auth.rs` decides before the handler runs).
//!
//! - `/v1`: `GET /v1/repository`, `POST /v1/models` (load or roll out), `DELETE
//!   /v1/models/{m}` (unload); both changes wait for the outcome unless `?wait=false` (then
//!   202 and the state to poll in `GET /v1/repository`).
//! - v2's model repository extension, as Triton serves it: `POST /v2/repository/index`,
//!   `POST /v2/repository/models/{m}/load` (optional `{"parameters": {"source", "version",
//!   and any `--model` option}}`; without a source, the folder `{m}` of `--model-repository`) and
//!   `.../unload`.

use super::error::ErrorBody;
use super::schema::{UnauthorizedResponse, V2ErrorBody, V2UnauthorizedResponse};
use super::AppState;
use crate::config::ModelControl;
use crate::manage::{LoadRequest, ManageError};
use crate::registry::RepositoryEntry;
use crate::repository::parse_options;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

/// `/v1` status of each management refusal.
fn status(err: &ManageError) -> StatusCode {
    use crate::registry::RegistryError;
    match err {
        ManageError::Disabled(_) => StatusCode::FORBIDDEN,
        ManageError::Invalid(_) => StatusCode::BAD_REQUEST,
        ManageError::Registry(RegistryError::NotFound { .. }) => StatusCode::NOT_FOUND,
        ManageError::Registry(RegistryError::OverBudget { .. }) => StatusCode::INSUFFICIENT_STORAGE,
        ManageError::Registry(_) => StatusCode::CONFLICT,
        ManageError::LoadFailed { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        ManageError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn refusal(err: ManageError) -> Response {
    let body = ErrorBody {
        error: err.to_string(),
        error_type: err.error_type(),
    };
    let note = crate::access::ErrorNote(err.error_type());
    (status(&err), axum::Extension(note), Json(body)).into_response()
}

fn v2_refusal(err: ManageError) -> Response {
    let body = V2ErrorBody {
        error: err.to_string(),
    };
    let note = crate::access::ErrorNote(err.error_type());
    (status(&err), axum::Extension(note), Json(body)).into_response()
}

fn bad_request(message: String) -> ManageError {
    ManageError::Invalid(message)
}

/// Every known model version and how the server manages them.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Repository {
    /// `none`, `explicit` or `poll` (`--model-control`).
    #[schema(value_type = String, example = "explicit")]
    model_control: ModelControl,
    /// `--model-memory-budget`, and what the loaded versions' estimates take of it.
    memory_budget_bytes: u64,
    memory_estimated_bytes: u64,
    models: Vec<RepositoryEntry>,
}

/// Every model version the server knows: loading, warming, ready, restarting, draining, or
/// failed with its reason.
#[utoipa::path(get, path = "/v1/repository", tag = "management",
    responses(
        (status = 200, description = "The repository", body = Repository),
        (status = 403, description = "No --admin-token is configured (`management_disabled`)", body = ErrorBody),
        UnauthorizedResponse,
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn repository(State(state): State<Arc<AppState>>) -> Json<Repository> {
    let manager = &state.manager;
    Json(Repository {
        model_control: manager.control(),
        memory_budget_bytes: manager.memory_budget(),
        memory_estimated_bytes: manager.registry().estimated_bytes(),
        models: manager.registry().list(),
    })
}

/// What to load: a name, a source and optionally a version and options.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadBody {
    /// The name clients use; loading a served name rolls out a new version of it.
    #[schema(example = "lite0")]
    name: String,
    /// Anything `--model` accepts: a Hub-layout folder, a weights file, or `hf-hub:ORG/REPO`.
    #[schema(example = "weights/tf_efficientnet_lite0")]
    source: String,
    /// Default: one more than the name's highest numeric version.
    #[serde(default)]
    version: Option<String>,
    /// `--model` options: `input_size` (16 to 4096), `arch`, `backend` (`torch`, `openvino`,
    /// `auto`), `jpeg_draft` (true or false), `dtype` (`f32`, `f16`, `bf16`), `max_batch_size`,
    /// `max_batch_delay_ms`, `instances` (`auto` or a number).
    #[serde(default)]
    #[schema(value_type = Object)]
    options: BTreeMap<String, Value>,
}

/// `?wait=false`: answer 202 at once rather than when the change is done.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Wait for the load (ready or failed) or the unload (drained and freed); default true.
    wait: Option<bool>,
}

/// `{"input_size": 300, "arch": "...", "jpeg_draft": true}` as the `--model` option grammar.
fn options_query(options: &BTreeMap<String, Value>) -> Result<String, ManageError> {
    let pairs: Result<Vec<String>, ManageError> = options
        .iter()
        .map(|(key, value)| match value {
            Value::String(text) => Ok(format!("{key}={text}")),
            Value::Number(number) => Ok(format!("{key}={number}")),
            Value::Bool(switch) => Ok(format!("{key}={switch}")),
            other => Err(bad_request(format!(
                "option {key:?} must be a string, a number or a boolean, not {other}"
            ))),
        })
        .collect();
    Ok(pairs?.join("&"))
}

fn load_request(
    name: String,
    source: String,
    version: Option<String>,
    options: &BTreeMap<String, Value>,
) -> Result<LoadRequest, ManageError> {
    let options = parse_options(&options_query(options)?).map_err(bad_request)?;
    Ok(LoadRequest {
        name,
        source,
        version,
        options,
    })
}

fn wait_of(query: Result<Query<WaitQuery>, QueryRejection>) -> Result<bool, ManageError> {
    query
        .map(|q| q.0.wait.unwrap_or(true))
        .map_err(|e| bad_request(format!("invalid query string: {}", e.body_text())))
}

/// Load a model, or roll out a new version of a served one: it loads and warms up beside the
/// serving version, then takes its traffic while the old one drains. A failed load leaves the
/// serving version as it was.
#[utoipa::path(post, path = "/v1/models", tag = "management",
    params(WaitQuery),
    request_body(content = LoadBody, content_type = "application/json"),
    responses(
        (status = 201, description = "Loaded, warmed up and serving", body = RepositoryEntry),
        (status = 202, description = "Loading (`?wait=false`): follow it in GET /v1/repository", body = RepositoryEntry),
        (status = 400, description = "A bad body, name, version, source or option (`bad_request`)", body = ErrorBody),
        (status = 403, description = "No --admin-token (`management_disabled`), or --model-control is not explicit (`model_control_disabled`)", body = ErrorBody),
        (status = 409, description = "A version of this name is loading, or the version exists (`conflict`)", body = ErrorBody),
        (status = 422, description = "The files were found but did not load (`load_failed`)", body = ErrorBody),
        (status = 503, description = "The server is shutting down (`shutting_down`)", body = ErrorBody),
        (status = 507, description = "The model's estimated memory does not fit --model-memory-budget (`insufficient_memory`)", body = ErrorBody),
        UnauthorizedResponse,
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn load(
    State(state): State<Arc<AppState>>,
    query: Result<Query<WaitQuery>, QueryRejection>,
    body: Result<Json<LoadBody>, JsonRejection>,
) -> Response {
    let parsed = wait_of(query).and_then(|wait| {
        let Json(body) = body.map_err(|e| {
            bad_request(format!(
                "the body must be JSON {{\"name\", \"source\", \"version\"?, \"options\"?}}: {}",
                e.body_text()
            ))
        })?;
        Ok((
            wait,
            load_request(body.name, body.source, body.version, &body.options)?,
        ))
    });
    let (wait, request) = match parsed {
        Ok(parsed) => parsed,
        Err(err) => return refusal(err),
    };
    match state.manager.load(request, wait).await {
        Ok(entry) if wait => (StatusCode::CREATED, Json(entry)).into_response(),
        Ok(entry) => (StatusCode::ACCEPTED, Json(entry)).into_response(),
        Err(err) => refusal(err),
    }
}

/// The versions an unload stopped serving.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Unloaded {
    unloaded: Vec<RepositoryEntry>,
}

/// Unload a model: it stops taking requests at once (404 from then on), finishes those it
/// admitted, and its memory is freed.
#[utoipa::path(delete, path = "/v1/models/{model}", tag = "management",
    params(("model" = String, Path, description = "A served model's name"), WaitQuery),
    responses(
        (status = 200, description = "Unloaded and freed", body = Unloaded),
        (status = 202, description = "Draining (`?wait=false`)", body = Unloaded),
        (status = 400, description = "A bad query (`bad_request`)", body = ErrorBody),
        (status = 403, description = "No --admin-token (`management_disabled`), or --model-control is not explicit (`model_control_disabled`)", body = ErrorBody),
        (status = 404, description = "No such model (`model_not_found`)", body = ErrorBody),
        (status = 409, description = "A version of it is loading (`conflict`)", body = ErrorBody),
        UnauthorizedResponse,
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn unload(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Response {
    let wait = match wait_of(query) {
        Ok(wait) => wait,
        Err(err) => return refusal(err),
    };
    match state.manager.unload(&model, wait).await {
        Ok(unloaded) => {
            let status = if wait {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            (status, Json(Unloaded { unloaded })).into_response()
        }
        Err(err) => refusal(err),
    }
}

/// One row of the v2 repository index (Triton's shape).
#[derive(Serialize, utoipa::ToSchema)]
pub struct IndexEntry {
    name: String,
    version: String,
    /// `READY`, `LOADING`, `UNLOADING` or `UNAVAILABLE` (failed or restarting).
    #[schema(example = "READY")]
    state: &'static str,
    reason: String,
}

/// Optional body of `POST /v2/repository/index` (`{"ready": true}` lists only ready models).
#[derive(Deserialize, Default, utoipa::ToSchema)]
pub struct IndexBody {
    #[serde(default)]
    ready: bool,
}

/// The v2 repository index: every model version and its state.
#[utoipa::path(post, path = "/v2/repository/index", tag = "v2", operation_id = "v2_repository_index",
    request_body(content = Option<IndexBody>, content_type = "application/json"),
    responses(
        (status = 200, description = "The index", body = [IndexEntry]),
        (status = 400, description = "A body that is not the index request", body = V2ErrorBody),
        (status = 403, description = "No --admin-token is configured", body = V2ErrorBody),
        V2UnauthorizedResponse,
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn v2_index(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(e) => return v2_refusal(bad_request(format!("the body could not be read: {e}"))),
    };
    let request: IndexBody = if body.iter().all(u8::is_ascii_whitespace) {
        IndexBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(e) => {
                return v2_refusal(bad_request(format!(
                    "the body must be empty or {{\"ready\": bool}}: {e}"
                )))
            }
        }
    };
    let index: Vec<IndexEntry> = state
        .manager
        .registry()
        .list()
        .into_iter()
        .filter(|e| !request.ready || e.state == "ready")
        .map(|e| IndexEntry {
            state: match e.state {
                "ready" => "READY",
                "loading" | "warming" => "LOADING",
                "draining" => "UNLOADING",
                _ => "UNAVAILABLE",
            },
            reason: e.reason.unwrap_or_default(),
            name: e.name,
            version: e.version,
        })
        .collect();
    Json(index).into_response()
}

/// Optional body of a v2 load: `{"parameters": {"source": ..., "version": ..., "input_size": ...}}`.
#[derive(Deserialize, Default, utoipa::ToSchema)]
pub struct V2LoadBody {
    #[serde(default)]
    #[schema(value_type = Object)]
    parameters: BTreeMap<String, Value>,
}

/// Load (or roll out) a model; waits for the outcome. Without a `source` parameter, the
/// folder of that name in `--model-repository`.
#[utoipa::path(post, path = "/v2/repository/models/{model}/load", tag = "v2", operation_id = "v2_repository_load",
    params(("model" = String, Path, description = "The model's name")),
    request_body(content = Option<V2LoadBody>, content_type = "application/json"),
    responses(
        (status = 200, description = "Loaded and serving", body = Object),
        (status = 400, description = "A bad body, name, source or option", body = V2ErrorBody),
        (status = 403, description = "No --admin-token, or --model-control is not explicit", body = V2ErrorBody),
        (status = 409, description = "A version is loading, or the version exists", body = V2ErrorBody),
        (status = 422, description = "The files did not load", body = V2ErrorBody),
        (status = 503, description = "Shutting down", body = V2ErrorBody),
        (status = 507, description = "The estimated memory does not fit --model-memory-budget", body = V2ErrorBody),
        V2UnauthorizedResponse,
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn v2_load(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(e) => return v2_refusal(bad_request(format!("the body could not be read: {e}"))),
    };
    match v2_load_request(&state, model, &body) {
        Ok(request) => match state.manager.load(request, true).await {
            Ok(_) => Json(serde_json::json!({})).into_response(),
            Err(err) => v2_refusal(err),
        },
        Err(err) => v2_refusal(err),
    }
}

fn v2_load_request(
    state: &AppState,
    model: String,
    body: &[u8],
) -> Result<LoadRequest, ManageError> {
    let mut parameters = if body.iter().all(u8::is_ascii_whitespace) {
        BTreeMap::new()
    } else {
        serde_json::from_slice::<V2LoadBody>(body)
            .map_err(|e| {
                bad_request(format!(
                    "the body must be empty or {{\"parameters\": {{\"source\", \"version\", and --model options: \"input_size\", \"arch\", \"backend\", \"jpeg_draft\"}}}}: {e}"
                ))
            })?
            .parameters
    };
    let text = |value: Value, what: &str| match value {
        Value::String(text) => Ok(text),
        other => Err(bad_request(format!(
            "parameter {what:?} must be a string, not {other}"
        ))),
    };
    let source = match parameters.remove("source") {
        Some(source) => text(source, "source")?,
        None => state.manager.repository_source(&model).ok_or_else(|| {
            bad_request(format!(
                "no \"source\" parameter, and --model-repository has no folder {model:?} with a config.json"
            ))
        })?,
    };
    let version = parameters
        .remove("version")
        .map(|v| text(v, "version"))
        .transpose()?;
    load_request(model, source, version, &parameters)
}

/// Unload a model (every version); waits until it is drained and freed.
#[utoipa::path(post, path = "/v2/repository/models/{model}/unload", tag = "v2", operation_id = "v2_repository_unload",
    params(("model" = String, Path, description = "A served model's name")),
    responses(
        (status = 200, description = "Unloaded", body = Object),
        (status = 403, description = "No --admin-token, or --model-control is not explicit", body = V2ErrorBody),
        (status = 404, description = "No such model", body = V2ErrorBody),
        (status = 409, description = "A version of it is loading", body = V2ErrorBody),
        V2UnauthorizedResponse,
    ),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn v2_unload(State(state): State<Arc<AppState>>, Path(model): Path<String>) -> Response {
    match state.manager.unload(&model, true).await {
        Ok(_) => Json(serde_json::json!({})).into_response(),
        Err(err) => v2_refusal(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_options_read_as_the_model_option_grammar() {
        let options = BTreeMap::from([
            ("input_size".to_owned(), serde_json::json!(300)),
            ("arch".to_owned(), serde_json::json!("tf_efficientnetv2_s")),
            ("jpeg_draft".to_owned(), serde_json::json!(true)),
        ]);
        let request = load_request("m".into(), "s".into(), None, &options).unwrap();
        assert_eq!(request.options.input_size, Some(300));
        assert_eq!(request.options.jpeg_draft, Some(true));
        assert_eq!(request.options.arch.as_deref(), Some("tf_efficientnetv2_s"));
        let bad = BTreeMap::from([("input_size".to_owned(), serde_json::json!([1]))]);
        assert!(load_request("m".into(), "s".into(), None, &bad).is_err());
        let unknown = BTreeMap::from([("size".to_owned(), serde_json::json!(3))]);
        let err = load_request("m".into(), "s".into(), None, &unknown).unwrap_err();
        assert!(err.to_string().contains("unknown model option"), "{err}");
    }
}
