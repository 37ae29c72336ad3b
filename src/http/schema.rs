//! The schemas the handlers' OpenAPI annotations share: the error bodies and kinds, the
//! request bodies, the common responses and parameters. `openapi.rs` assembles the document
//! from these and the handlers; the handlers name these in their `#[utoipa::path]` attributes.

use crate::v1::ClassifyResponse;
use std::collections::BTreeMap;
use utoipa::openapi::{ContentBuilder, Header, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoParams, IntoResponses, ToSchema};

/// Every `error_type` a `/v1` error can carry (and the `reason` label of
/// `visionserve_request_failures_total`).
pub const ERROR_TYPES: &[&str] = &[
    "bad_request",
    "body_timeout",
    "body_too_large",
    "client_certificate_required",
    "conflict",
    "deadline_exceeded",
    "empty_image",
    "image_too_large",
    "insufficient_memory",
    "internal",
    "key_concurrency_limited",
    "key_over_burst",
    "key_rate_limited",
    "load_failed",
    "management_disabled",
    "memory_busy",
    "model_control_disabled",
    "model_not_found",
    "not_found",
    "not_ready",
    "over_memory_budget",
    "overloaded",
    "shutting_down",
    "too_many_images",
    "too_many_requests",
    "unauthorized",
    "undecodable_image",
    "unsupported_aspect_ratio",
    "unsupported_image_format",
    "unsupported_media_type",
];

/// A v2 error: `{"error": "..."}` (the protocol's error object).
#[derive(serde::Serialize, ToSchema)]
pub struct V2ErrorBody {
    pub error: String,
}

/// `multipart/form-data`: one or more parts, each an encoded image (any field name).
#[derive(ToSchema)]
#[allow(dead_code)] // a schema only: input.rs reads the parts
pub struct MultipartImages {
    #[schema(value_type = String, content_media_type = "application/octet-stream")]
    image: Vec<u8>,
}

/// `application/json`: base64-encoded images and an optional `top_k`.
#[derive(ToSchema)]
#[allow(dead_code)] // a schema only: input.rs parses this with a streaming deserializer
pub struct JsonImages {
    #[schema(content_encoding = "base64", min_items = 1)]
    images: Vec<String>,
    #[schema(minimum = 1)]
    top_k: Option<u32>,
}

/// An error's `error_type` (the enum of [`ERROR_TYPES`]).
pub struct ErrorType;

impl utoipa::PartialSchema for ErrorType {
    fn schema() -> RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some("Stable machine-readable kind of the error"))
            .enum_values(Some(ERROR_TYPES.iter().copied()))
            .into()
    }
}

impl ToSchema for ErrorType {}

/// `Request-Timeout: 250ms`: the client's own deadline, within `--request-timeout`; and
/// `Priority: 2`, its priority level.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct RequestTimeoutHeader {
    /// The client's own deadline (`250ms`, `1.5s`, `2`), within `--request-timeout`.
    #[param(rename = "request-timeout", example = "1.5s")]
    request_timeout: Option<String>,
    /// The request's priority level with `--priority-levels` above 1: a whole number, 1 the
    /// highest, 0 the default (the API key's level, else `--default-priority`); capped by the
    /// key's `priority=`. RFC 9218 values (`u=3, i`) are transport priorities and ignored.
    #[param(example = "2")]
    priority: Option<String>,
}

/// W3C Trace Context (https://www.w3.org/TR/trace-context/): a client's trace, continued by
/// the request's span when traces are exported (`--otlp-endpoint`).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct TraceContextHeaders {
    /// The client's span: `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`. Invalid
    /// values are ignored (the request starts a new trace).
    #[param(example = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]
    traceparent: Option<String>,
    /// Vendor-specific trace state, carried along with `traceparent`.
    #[param(example = "vendor=value")]
    tracestate: Option<String>,
}

/// The `traceparent` answer header: the request span's own trace context, when traces are
/// exported, so that a client can find its trace.
pub fn traceparent_header() -> Header {
    let mut header = Header::new(
        utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::String),
    );
    header.description = Some(
        "The server span's W3C trace context (`00-<trace id>-<span id>-<flags>`), when traces \
         are exported (--otlp-endpoint)"
            .into(),
    );
    header
}

/// A model in a v2 route.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct ModelPathParam {
    /// A served model's name.
    model: String,
}

/// `{model}` and `{version}` in a versioned v2 route.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct VersionedModelPathParam {
    /// A served model's name.
    model: String,
    /// The model's version: `1` for a name's first load, the next number for each rollout (GET /v2/models/{model} lists those loaded).
    #[param(example = "1")]
    version: String,
}

/// Triton's binary tensor extension.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct InferHeaderLength {
    /// Bytes of JSON at the start of an `application/octet-stream` body (binary tensors follow);
    /// `0`: the whole body is one encoded image.
    #[param(rename = "inference-header-content-length", minimum = 0)]
    inference_header_content_length: Option<u64>,
}

pub(super) fn json_response(description: &str, schema: &str) -> RefOr<utoipa::openapi::Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(schema)))
                .build(),
        )
        .build()
        .into()
}

fn retry_after(
    response: RefOr<utoipa::openapi::Response>,
    rate_limit: bool,
) -> RefOr<utoipa::openapi::Response> {
    let RefOr::T(mut response) = response else {
        return response;
    };
    let mut seconds = Header::new(
        utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::Integer),
    );
    seconds.description = Some("Seconds to wait before retrying".into());
    response.headers.insert("retry-after".into(), seconds);
    let rate_limit_headers = if rate_limit { 2 } else { 0 };
    for (name, description) in [
        ("ratelimit-policy", "Over an API key's rate: its quota as `\"images\";q=QUOTA;w=SECONDS` (draft-ietf-httpapi-ratelimit-headers)"),
        ("ratelimit", "Over an API key's rate: `\"images\";r=0;t=SECONDS` until it has room again"),
    ]
    .into_iter()
    .take(rate_limit_headers)
    {
        let mut header = Header::new(
            utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::String),
        );
        header.description = Some(description.into());
        response.headers.insert(name.into(), header);
    }
    RefOr::T(response)
}

/// The refusals every inference request can get before its body is looked at, or while it
/// is read and decoded (`schema`: the error object of the protocol).
fn inference_refusals(schema: &str) -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
    let rows: [(&str, &str); 11] = [
        ("400", "Bad request: the body, query or headers (`bad_request`, `empty_image`, `body_timeout` is 408)"),
        ("401", "A missing or wrong API key (`unauthorized`)"),
        ("404", "No such model or version (`model_not_found`)"),
        ("408", "The body did not arrive within `--body-timeout` (`body_timeout`)"),
        ("413", "Too large: body, image, image count or memory budget, or more images than the API key's burst (`body_too_large`, `image_too_large`, `too_many_images`, `over_memory_budget`, `key_over_burst`)"),
        ("415", "A content type or image format that is not accepted (`unsupported_media_type`, `unsupported_image_format`)"),
        ("422", "An image that cannot be decoded or has an extreme aspect ratio (`undecodable_image`, `unsupported_aspect_ratio`)"),
        ("429", "Busy: the queue (the request's priority level's share of it) or the memory budget is full, or the API key is over its rate or concurrency; retry after `Retry-After` (`overloaded`, `too_many_requests`, `memory_busy`, `key_rate_limited`, `key_concurrency_limited`). Over a key's rate, `RateLimit-Policy` and `RateLimit` (IETF draft) say the key's quota and when it has room again"),
        ("500", "An internal error (`internal`)"),
        ("503", "The model is loading or restarting, or the server is shutting down (`not_ready`, `shutting_down`)"),
        ("504", "The request's deadline passed before it ran (`deadline_exceeded`)"),
    ];
    rows.into_iter()
        .map(|(status, description)| {
            let response = json_response(description, schema);
            let response = if status == "429" || status == "503" {
                retry_after(response, status == "429")
            } else {
                response
            };
            (status.to_owned(), response)
        })
        .collect()
}

/// What a `/v1` classify request can answer.
pub struct ClassifyResponses;

impl IntoResponses for ClassifyResponses {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        let mut responses = inference_refusals("ErrorBody");
        let RefOr::T(mut ok) = json_response(
            "Top-k per image, in the order sent, with per-stage timing",
            ClassifyResponse::name().as_ref(),
        ) else {
            unreachable!("json_response builds a response")
        };
        let mut timing = Header::new(
            utoipa::openapi::ObjectBuilder::new()
                .schema_type(utoipa::openapi::schema::Type::String),
        );
        timing.description =
            Some("Per-stage durations in ms (decode, preprocess, queue, inference, total)".into());
        ok.headers.insert("server-timing".into(), timing);
        ok.headers
            .insert("traceparent".into(), traceparent_header());
        responses.insert("200".into(), RefOr::T(ok));
        responses
    }
}

/// What a v2 infer request can answer.
pub struct InferResponses;

impl IntoResponses for InferResponses {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        let mut responses = inference_refusals("V2ErrorBody");
        let ok = ResponseBuilder::new()
            .description(
                "The outputs: JSON, or with binary outputs a JSON header of \
                 `Inference-Header-Content-Length` bytes followed by the raw tensors",
            )
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("InferResponse")))
                    .build(),
            )
            .content(
                "application/octet-stream",
                ContentBuilder::new().schema(None::<Ref>).build(),
            )
            .header("traceparent", traceparent_header())
            .build();
        responses.insert("200".into(), RefOr::T(ok));
        responses
    }
}

/// 401 on `/v1` routes that need a key.
pub struct UnauthorizedResponse;

impl IntoResponses for UnauthorizedResponse {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        BTreeMap::from([(
            "401".to_owned(),
            json_response("A missing or wrong API key (`unauthorized`)", "ErrorBody"),
        )])
    }
}

/// 401 on v2 routes that need a key.
pub struct V2UnauthorizedResponse;

impl IntoResponses for V2UnauthorizedResponse {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        BTreeMap::from([(
            "401".to_owned(),
            json_response("A missing or wrong API key", "V2ErrorBody"),
        )])
    }
}
