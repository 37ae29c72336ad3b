//! The Open Inference Protocol (KServe v2) over gRPC: `inference.GRPCInferenceService` from
//! Triton's published `grpc_service.proto` (the subset in `proto/`), plus the standard
//! `grpc.health.v1.Health` service. Like `http::v2`, it only translates between protobuf and the
//! protocol's tensors in `crate::v2`; the inference service runs the request. Its status table
//! is [`status`].

use crate::auth::ApiKeys;
use crate::error::InferError;
use crate::infer::{InferRequest, Inference};
use crate::v2::{self, Data, Datatype, Input, RequestedOutput, V2Error};
use proto::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use proto::infer_parameter::ParameterChoice;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tonic::codegen::http;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tracing::Instrument;

/// The generated protocol types and service traits.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("inference");
}

/// The gRPC status of a v2 error.
pub fn status(err: &V2Error) -> Status {
    let message = err.to_string();
    match err {
        V2Error::InvalidArgument(_) => Status::invalid_argument(message),
        V2Error::Infer(err) => match err {
            InferError::ModelNotFound { .. } => Status::not_found(message),
            InferError::NotReady { .. } | InferError::ShuttingDown => Status::unavailable(message),
            InferError::TooManyRequests { .. }
            | InferError::Overloaded { .. }
            | InferError::MemoryBusy { .. }
            | InferError::OverMemoryBudget { .. } => Status::resource_exhausted(message),
            InferError::DeadlineExceeded { .. } => Status::deadline_exceeded(message),
            InferError::Internal => Status::internal(message),
            InferError::NoImages
            | InferError::TooManyImages { .. }
            | InferError::Image { .. }
            | InferError::InvalidInput(_) => Status::invalid_argument(message),
        },
    }
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
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let service = GrpcInferenceServiceServer::new(InferenceService {
        inference: inference.clone(),
        next_id: AtomicU64::new(1),
    })
    .max_decoding_message_size(max_message_bytes)
    .max_encoding_message_size(usize::MAX);
    tokio::spawn(report_health(health, inference.clone()));
    tonic::transport::Server::builder()
        // An encoded image is 50 KB to a few MB: with HTTP/2's default 64 KiB windows every
        // request would wait for window updates.
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(4 * STREAM_WINDOW_BYTES))
        .tcp_nodelay(true)
        .layer(tower::layer::layer_fn(move |inner| RequireApiKey {
            inner,
            keys: keys.clone(),
            inference: inference.clone(),
        }))
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}

/// The gate in front of every gRPC call: it stamps when the call arrived (for deadlines), and
/// checks API keys on every method but the health checks (`grpc.health.v1` and the protocol's
/// ServerLive, ServerReady, ModelReady, as `/v2/health/*` over REST). It sees only the call's
/// path and metadata, so a refused call's message is never decoded: UNAUTHENTICATED comes
/// straight back.
#[derive(Clone)]
struct RequireApiKey<S> {
    inner: S,
    keys: Arc<ApiKeys>,
    inference: Arc<Inference>,
}

/// When a call's headers arrived (stamped by [`RequireApiKey`], which runs first).
#[derive(Debug, Clone, Copy)]
struct Arrival(std::time::Instant);

fn is_open_method(path: &str) -> bool {
    const SERVICE: &str = "/inference.GRPCInferenceService/";
    path.starts_with("/grpc.health.v1.Health/")
        || path
            .strip_prefix(SERVICE)
            .is_some_and(|method| matches!(method, "ServerLive" | "ServerReady" | "ModelReady"))
}

impl<S, B> tower::Service<http::Request<B>> for RequireApiKey<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        request
            .extensions_mut()
            .insert(Arrival(std::time::Instant::now()));
        if !is_open_method(request.uri().path()) {
            let headers = request.headers();
            let value = |name| headers.get(name).map(http::HeaderValue::as_bytes);
            if let Err(err) = self.keys.check(value("authorization"), value("x-api-key")) {
                self.inference.metrics().unauthorized_request("grpc");
                let refusal = Status::unauthenticated(err.to_string()).into_http();
                return Box::pin(std::future::ready(Ok(refusal)));
            }
        }
        Box::pin(self.inner.call(request))
    }
}

/// Keep `grpc.health.v1` in step with readiness: the whole server ("") and the inference
/// service are SERVING once every model is ready, NOT_SERVING before that and while shutting
/// down.
async fn report_health(health: tonic_health::server::HealthReporter, inference: Arc<Inference>) {
    const SERVICE: &str = "inference.GRPCInferenceService";
    let mut last = None;
    loop {
        let status = if inference.all_ready() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            health.set_service_status("", status).await;
            health.set_service_status(SERVICE, status).await;
            last = Some(status);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

struct InferenceService {
    inference: Arc<Inference>,
    next_id: AtomicU64,
}

impl InferenceService {
    fn model(&self, name: &str, version: &str) -> Result<Arc<crate::backend::ModelHandle>, Status> {
        self.inference
            .model_version(name, Some(version))
            .map_err(|e| status(&e.into()))
    }

    async fn infer(
        &self,
        infer: &mut InferRequest,
        request: proto::ModelInferRequest,
    ) -> Result<proto::ModelInferResponse, V2Error> {
        // tonic has already received and decoded the message: it holds memory until the
        // request ends.
        infer
            .reserve_body(prost::Message::encoded_len(&request) as u64)
            .await?;
        let requested: Vec<RequestedOutput> = request
            .outputs
            .iter()
            .map(requested_output)
            .collect::<Result<_, _>>()?;
        let inputs = inputs(request.inputs, request.raw_input_contents)?;
        let model = infer.model().clone();
        let mut plan = v2::plan(&model, inputs, &requested)?;
        let images = std::mem::take(&mut plan.images);
        let results = infer.run(images, plan.outputs).await?;
        let outputs = v2::render(&model, &plan, &results);
        Ok(proto::ModelInferResponse {
            model_name: model.name().to_owned(),
            model_version: model.version().to_owned(),
            id: request.id,
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
        })
    }
}

/// The client's deadline from the `grpc-timeout` header (`<digits><H|M|S|m|u|n>`), if any.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    // The protocol allows at most 8 digits (and so no overflow below).
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => std::time::Duration::from_secs(value * 3600),
        "M" => std::time::Duration::from_secs(value * 60),
        "S" => std::time::Duration::from_secs(value),
        "m" => std::time::Duration::from_millis(value),
        "u" => std::time::Duration::from_micros(value),
        "n" => std::time::Duration::from_nanos(value),
        _ => return None,
    })
}

/// The v2 `timeout` parameter, in microseconds as Triton reads it.
fn timeout_parameter(
    request: &proto::ModelInferRequest,
) -> Result<Option<std::time::Duration>, V2Error> {
    match request
        .parameters
        .get("timeout")
        .and_then(|p| p.parameter_choice.as_ref())
    {
        // Triton reads 0 as "no timeout".
        None | Some(ParameterChoice::Int64Param(0)) | Some(ParameterChoice::Uint64Param(0)) => {
            Ok(None)
        }
        Some(ParameterChoice::Int64Param(us)) if *us > 0 => {
            Ok(Some(std::time::Duration::from_micros(*us as u64)))
        }
        Some(ParameterChoice::Uint64Param(us)) if *us > 0 => {
            Ok(Some(std::time::Duration::from_micros(*us)))
        }
        Some(other) => Err(invalid(format!(
            "parameter \"timeout\" must be a positive number of microseconds, not {other:?}"
        ))),
    }
}

fn invalid(message: String) -> V2Error {
    V2Error::InvalidArgument(message)
}

fn requested_output(
    output: &proto::model_infer_request::InferRequestedOutputTensor,
) -> Result<RequestedOutput, V2Error> {
    let classification = match output
        .parameters
        .get("classification")
        .and_then(|p| p.parameter_choice.as_ref())
    {
        None => None,
        Some(ParameterChoice::Int64Param(k)) if *k > 0 => Some(*k as usize),
        Some(ParameterChoice::Uint64Param(k)) if *k > 0 => Some(*k as usize),
        Some(other) => {
            return Err(invalid(format!(
                "output {:?}: classification must be a positive int64, not {other:?}",
                output.name
            )))
        }
    };
    Ok(RequestedOutput {
        name: output.name.clone(),
        classification,
    })
}

/// The inputs, with their data from `raw_input_contents` (one entry per input, in order) or
/// from their typed `contents`.
fn inputs(
    tensors: Vec<proto::model_infer_request::InferInputTensor>,
    raw: Vec<bytes::Bytes>,
) -> Result<Vec<Input>, V2Error> {
    if !raw.is_empty() && raw.len() != tensors.len() {
        return Err(invalid(format!(
            "raw_input_contents has {} entries for {} inputs; give one per input, or none",
            raw.len(),
            tensors.len()
        )));
    }
    let mut raw = raw.into_iter();
    tensors
        .into_iter()
        .map(|tensor| {
            let datatype = Datatype::parse(&tensor.datatype)?;
            let data = match (raw.next(), tensor.contents) {
                (Some(raw), _) => Data::from_raw(&tensor.name, datatype, raw)?,
                (None, Some(contents)) => typed_data(&tensor.name, datatype, contents)?,
                (None, None) => {
                    return Err(invalid(format!(
                        "input {:?} has neither contents nor raw_input_contents",
                        tensor.name
                    )))
                }
            };
            Ok(Input {
                name: tensor.name,
                datatype,
                shape: tensor.shape,
                data,
            })
        })
        .collect()
}

fn typed_data(
    name: &str,
    datatype: Datatype,
    contents: proto::InferTensorContents,
) -> Result<Data, V2Error> {
    Ok(match datatype {
        Datatype::Bytes => Data::Bytes(
            contents
                .bytes_contents
                .into_iter()
                .map(bytes::Bytes::from)
                .collect(),
        ),
        // UINT8 travels in `uint_contents`, one u32 per element.
        Datatype::Uint8 => Data::Uint8(
            contents
                .uint_contents
                .iter()
                .map(|&v| {
                    u8::try_from(v).map_err(|_| {
                        invalid(format!(
                            "input {name:?}: UINT8 element {v} is larger than 255"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        Datatype::Fp32 => Data::Fp32(contents.fp32_contents),
        _ => Data::Unsupported,
    })
}

fn duration(d: v2::StatisticDuration) -> Option<proto::StatisticDuration> {
    Some(proto::StatisticDuration {
        count: d.count,
        ns: d.ns,
    })
}

fn statistics(stats: v2::ModelStats) -> proto::ModelStatistics {
    let s = stats.inference_stats;
    proto::ModelStatistics {
        name: stats.name,
        version: stats.version,
        last_inference: stats.last_inference,
        inference_count: stats.inference_count,
        execution_count: stats.execution_count,
        inference_stats: Some(proto::InferStatistics {
            success: duration(s.success),
            fail: duration(s.fail),
            queue: duration(s.queue),
            compute_input: duration(s.compute_input),
            compute_infer: duration(s.compute_infer),
            compute_output: duration(s.compute_output),
            cache_hit: None,
            cache_miss: None,
        }),
        batch_stats: stats
            .batch_stats
            .into_iter()
            .map(|b| proto::InferBatchStatistics {
                batch_size: b.batch_size,
                compute_input: duration(b.compute_input),
                compute_infer: duration(b.compute_infer),
                compute_output: duration(b.compute_output),
            })
            .collect(),
        memory_usage: Vec::new(),
        response_stats: Default::default(),
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
        let request = request.into_inner();
        let id = match request.id.as_str() {
            "" => format!("grpc-{}", self.next_id.fetch_add(1, Ordering::Relaxed)),
            id => id.to_owned(),
        };
        let span =
            tracing::info_span!("request", id, rpc = "ModelInfer", model = %request.model_name);
        let answer = async move {
            let timeout = timeout_parameter(&request).map_err(|e| status(&e))?;
            let mut infer = self
                .inference
                .begin_version(&request.model_name, Some(&request.model_version))
                .map_err(|e| status(&e.into()))?;
            infer.use_cache(crate::cache::CacheUse::from_cache_control(
                cache_control.as_deref(),
            ));
            if let Some(deadline) = deadline {
                infer.limit_time(deadline.saturating_duration_since(infer.started()));
            }
            if let Some(timeout) = timeout {
                infer.limit_time(timeout);
            }
            match self.infer(&mut infer, request).await {
                Ok(response) => {
                    infer.succeeded();
                    Ok(Response::new(response))
                }
                Err(err) => {
                    infer.failed(err.error_type(), err.is_server_error(), &err);
                    Err(status(&err))
                }
            }
        }
        .instrument(span)
        .await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_health_methods_are_open() {
        assert!(is_open_method("/grpc.health.v1.Health/Check"));
        assert!(is_open_method(
            "/inference.GRPCInferenceService/ServerReady"
        ));
        assert!(is_open_method("/inference.GRPCInferenceService/ModelReady"));
        assert!(!is_open_method(
            "/inference.GRPCInferenceService/ModelInfer"
        ));
        assert!(!is_open_method(
            "/inference.GRPCInferenceService/ModelMetadata"
        ));
        assert!(!is_open_method("/other.Service/ServerLive"));
    }

    #[test]
    fn errors_map_to_grpc_codes() {
        let code = |err: V2Error| status(&err).code();
        assert_eq!(
            code(V2Error::InvalidArgument("x".into())),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(InferError::NotReady { model: "m".into() }.into()),
            tonic::Code::Unavailable
        );
        assert_eq!(
            code(
                InferError::Overloaded {
                    model: "m".into(),
                    limit: 1,
                    retry_after_s: 1
                }
                .into()
            ),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            code(
                InferError::ModelNotFound {
                    name: "x".into(),
                    available: "m".into()
                }
                .into()
            ),
            tonic::Code::NotFound
        );
        assert_eq!(
            code(InferError::NoImages.into()),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn grpc_timeouts_parse() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&metadata), None);
        metadata.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(
            grpc_timeout(&metadata),
            Some(std::time::Duration::from_millis(250))
        );
        metadata.insert("grpc-timeout", "3S".parse().unwrap());
        assert_eq!(
            grpc_timeout(&metadata),
            Some(std::time::Duration::from_secs(3))
        );
        for bad in ["x", "S", "999999999H"] {
            metadata.insert("grpc-timeout", bad.parse().unwrap());
            assert_eq!(grpc_timeout(&metadata), None, "{bad}");
        }
    }

    #[test]
    fn uint8_typed_contents_must_fit_a_byte() {
        let contents = proto::InferTensorContents {
            uint_contents: vec![0, 255, 256],
            ..Default::default()
        };
        let err = typed_data("pixels", Datatype::Uint8, contents).unwrap_err();
        assert!(err.to_string().contains("256"), "{err}");
    }

    #[test]
    fn raw_contents_need_one_entry_per_input() {
        let tensor = proto::model_infer_request::InferInputTensor {
            name: "image".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            ..Default::default()
        };
        let raw = vec![bytes::Bytes::new(), bytes::Bytes::new()];
        let err = inputs(vec![tensor], raw).unwrap_err();
        assert!(err.to_string().contains("one per input"), "{err}");
    }
}
