//! `inference.GRPCInferenceService`: health and metadata methods, statistics, and ModelInfer
//! as parse, one call to the inference service, render.

use super::auth::Arrival;
use super::convert::{self, grpc_timeout, inputs, requested_output, statistics, timeout_parameter};
use super::proto;
use super::proto::grpc_inference_service_server::GrpcInferenceService;
use super::status::status;
use super::trace;
use crate::backend::ModelHandle;
use crate::cache::CacheUse;
use crate::infer::{Answer, Inference, Intake, ModelRef, Plan, RequestOptions};
use crate::v2::{self, RequestedOutput, V2Error};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::Instrument;

pub(super) struct InferenceService {
    pub(super) inference: Arc<Inference>,
    pub(super) next_id: AtomicU64,
    /// `--access-log on`: one line per ModelInfer call.
    pub(super) access_log: bool,
}

impl InferenceService {
    fn model(&self, name: &str, version: &str) -> Result<Arc<crate::backend::ModelHandle>, Status> {
        self.inference
            .model_version(name, Some(version))
            .map_err(|e| status(&e.into()))
    }
}

/// A ModelInfer call: its message (already received and decoded by tonic) and what its
/// metadata said.
struct GrpcIntake {
    request: proto::ModelInferRequest,
    /// When the client's deadline passes, answered a little early (see `model_infer`).
    deadline: Option<std::time::Instant>,
    /// The `timeout` parameter.
    timeout: Option<std::time::Duration>,
    /// The `priority` parameter or metadata.
    priority: Option<u64>,
    /// The API key the call presented, whose limits the service applies.
    key: Option<Arc<crate::auth::KeyPolicy>>,
    cache: CacheUse,
}

/// What the response needs besides the results.
struct GrpcKeep {
    tensors: v2::Tensors,
    id: String,
}

impl Intake for GrpcIntake {
    type Keep = GrpcKeep;
    type Error = V2Error;

    fn options(&mut self, _model: &ModelHandle) -> Result<RequestOptions, V2Error> {
        let mut options = RequestOptions {
            cache: self.cache,
            // The message is in memory already: it holds memory until the request ends.
            body_bytes: Some(prost::Message::encoded_len(&self.request) as u64),
            priority: self.priority,
            key: self.key.take(),
            ..RequestOptions::default()
        };
        if let Some(deadline) = self.deadline {
            options.limit_time(deadline.saturating_duration_since(std::time::Instant::now()));
        }
        if let Some(timeout) = self.timeout {
            options.limit_time(timeout);
        }
        Ok(options)
    }

    async fn read(self, model: Arc<ModelHandle>) -> Result<Plan<GrpcKeep>, V2Error> {
        let request = self.request;
        let requested: Vec<RequestedOutput> = request
            .outputs
            .iter()
            .map(requested_output)
            .collect::<Result<_, _>>()?;
        let inputs = inputs(request.inputs, request.raw_input_contents)?;
        let plan = v2::plan(&model, inputs, &requested)?;
        Ok(Plan {
            images: plan.images,
            outputs: plan.outputs,
            timeout: None,
            priority: None,
            keep: GrpcKeep {
                tensors: plan.keep,
                id: request.id,
            },
        })
    }
}

/// The response message: every output's raw bytes in `raw_output_contents`.
fn render(answer: Answer<GrpcKeep>) -> proto::ModelInferResponse {
    let Answer {
        model,
        outputs,
        keep,
        ..
    } = answer;
    let outputs = v2::render(&model, &keep.tensors, &outputs);
    proto::ModelInferResponse {
        model_name: model.name().to_owned(),
        model_version: model.version().to_owned(),
        id: keep.id,
        parameters: Default::default(),
        raw_output_contents: outputs.iter().map(|o| o.data.to_raw().into()).collect(),
        outputs: outputs
            .into_iter()
            .map(|o| proto::model_infer_response::InferOutputTensor {
                name: o.name.to_owned(),
                datatype: o.datatype.name().to_owned(),
                shape: o.shape,
                parameters: Default::default(),
                contents: None,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _: Request<proto::ServerLiveRequest>,
    ) -> Result<Response<proto::ServerLiveResponse>, Status> {
        Ok(Response::new(proto::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<proto::ServerReadyRequest>,
    ) -> Result<Response<proto::ServerReadyResponse>, Status> {
        Ok(Response::new(proto::ServerReadyResponse {
            ready: self.inference.all_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<proto::ModelReadyRequest>,
    ) -> Result<Response<proto::ModelReadyResponse>, Status> {
        let request = request.into_inner();
        let model = self.model(&request.name, &request.version)?;
        Ok(Response::new(proto::ModelReadyResponse {
            ready: model.status.is_ready() && !self.inference.is_shutting_down(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<proto::ServerMetadataRequest>,
    ) -> Result<Response<proto::ServerMetadataResponse>, Status> {
        Ok(Response::new(proto::ServerMetadataResponse {
            name: env!("CARGO_PKG_NAME").to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            // The repository extension is REST-only here: the KServe gRPC service has no
            // repository methods.
            extensions: v2::EXTENSIONS
                .iter()
                .filter(|e| **e != "model_repository")
                .map(|e| (*e).to_owned())
                .collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<proto::ModelMetadataRequest>,
    ) -> Result<Response<proto::ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let model = self.model(&request.name, &request.version)?;
        let metadata = v2::model_metadata(&model, self.inference.registry().versions(model.name()));
        let tensors = |tensors: Vec<v2::TensorMetadata>| {
            tensors
                .into_iter()
                .map(|t| proto::model_metadata_response::TensorMetadata {
                    name: t.name.to_owned(),
                    datatype: t.datatype.to_owned(),
                    shape: t.shape,
                })
                .collect()
        };
        Ok(Response::new(proto::ModelMetadataResponse {
            name: metadata.name,
            versions: metadata.versions,
            platform: metadata.platform,
            inputs: tensors(metadata.inputs),
            outputs: tensors(metadata.outputs),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<proto::ModelInferRequest>,
    ) -> Result<Response<proto::ModelInferResponse>, Status> {
        // Answer a little before the client's deadline: tonic enforces grpc-timeout itself,
        // from when the call's headers arrived, and answers CANCELLED "Timeout expired"; ours
        // says DEADLINE_EXCEEDED and why, and counts the request as such. Both clocks start at
        // the headers, so receiving and decoding the message count against ours too.
        let arrived = request
            .extensions()
            .get::<Arrival>()
            .map_or_else(std::time::Instant::now, |a| a.0);
        let deadline = grpc_timeout(request.metadata())
            .map(|t| arrived + t.saturating_sub((t / 5).min(std::time::Duration::from_millis(25))));
        let cache_control = request
            .metadata()
            .get("cache-control")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let client = request
            .remote_addr()
            .map_or_else(|| "-".to_owned(), |a| a.to_string());
        let traceparent = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let priority_metadata = request
            .metadata()
            .get("priority")
            .map(|v| v.to_str().unwrap_or("?").to_owned());
        let key = request
            .extensions()
            .get::<Arc<crate::auth::KeyPolicy>>()
            .cloned();
        let (metadata, _, request) = request.into_parts();
        let bytes_in = prost::Message::encoded_len(&request) as u64;
        let id = match request.id.as_str() {
            "" => format!("grpc-{}", self.next_id.fetch_add(1, Ordering::Relaxed)),
            id => id.to_owned(),
        };
        let span = tracing::info_span!(
            "request",
            id,
            rpc = "ModelInfer",
            model = %request.model_name,
            otel.name = Empty,
            otel.kind = Empty,
            otel.status_code = Empty,
            protocol = Empty,
            version = Empty,
            images = Empty,
            bytes_in = Empty,
            bytes_out = Empty,
            status = Empty,
            error_type = Empty,
            cache = Empty,
        );
        if crate::telemetry::active() {
            trace::describe_call(&span, &metadata, bytes_in);
        }
        let cache_on = self.inference.cache().is_some();
        let outcome = async move {
            let failed = |err: V2Error| (err.error_type(), status(&err));
            let timeout = timeout_parameter(&request).map_err(failed)?;
            let priority =
                convert::priority(&request, priority_metadata.as_deref()).map_err(failed)?;
            let model_name = request.model_name.clone();
            let model_version = request.model_version.clone();
            let intake = GrpcIntake {
                request,
                deadline,
                timeout,
                priority,
                key,
                cache: CacheUse::from_cache_control(cache_control.as_deref()),
            };
            self.inference
                .infer(ModelRef::new(&model_name, Some(&model_version)), intake)
                .await
                .map(|answer| (answer.access_note(cache_on), render(answer)))
                .map_err(failed)
        }
        .instrument(span.clone())
        .await;
        let traceparent_out = trace::record_outcome(&span, &outcome);
        if self.access_log {
            let (note, bytes_out, code, error_type) = match &outcome {
                Ok((note, response)) => {
                    let size = prost::Message::encoded_len(response) as u64;
                    (Some(note), Some(size), tonic::Code::Ok, None)
                }
                Err((error_type, status)) => (None, None, status.code(), Some(*error_type)),
            };
            crate::access::log(&crate::access::AccessRecord {
                request_id: &id,
                trace_id: crate::telemetry::trace_id(&span)
                    .as_deref()
                    .or_else(|| crate::access::trace_id(traceparent.as_deref()))
                    .unwrap_or("-"),
                client,
                protocol: "grpc",
                method: "POST",
                route: "/inference.GRPCInferenceService/ModelInfer",
                bytes_in: Some(bytes_in),
                bytes_out,
                status: format!("{code:?}"),
                error_type,
                note,
                total: arrived.elapsed(),
                quiet: false,
            });
        }
        let mut answer = outcome
            .map(|(_, response)| Response::new(response))
            .map_err(|(_, status)| status);
        if let Some(value) = traceparent_out {
            match &mut answer {
                Ok(response) => response.metadata_mut().insert("traceparent", value),
                Err(status) => status.metadata_mut().insert("traceparent", value),
            };
        }
        if answer.as_ref().is_err_and(|status| {
            matches!(
                status.code(),
                tonic::Code::ResourceExhausted | tonic::Code::Unavailable
            )
        }) {
            crate::infer::pace_refusal().await;
        }
        answer
    }

    async fn model_statistics(
        &self,
        request: Request<proto::ModelStatisticsRequest>,
    ) -> Result<Response<proto::ModelStatisticsResponse>, Status> {
        let request = request.into_inner();
        let model_stats = if request.name.is_empty() {
            self.inference
                .models()
                .iter()
                .map(|m| statistics(v2::model_stats(m)))
                .collect()
        } else {
            let model = self.model(&request.name, &request.version)?;
            vec![statistics(v2::model_stats(&model))]
        };
        Ok(Response::new(proto::ModelStatisticsResponse {
            model_stats,
        }))
    }
}
