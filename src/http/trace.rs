//! The HTTP request span: created by tower-http's `TraceLayer`, it continues the client's
//! W3C trace (`traceparent`), is exported as an OpenTelemetry server span when
//! `--otlp-endpoint` is set ([`crate::telemetry`]), and gets the request's outcome as
//! attributes (model, version, protocol, images, bytes, status, `error_type`, cache).
//! The answer carries the span's own `traceparent`, so that a client can find its trace.

use super::access_log::{content_length, is_quiet, protocol_of};
use crate::access::{AccessNote, ErrorNote};
use crate::telemetry;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Response};
use axum::middleware::Next;
use http_body::Body;
use tower_http::request_id::RequestId;
use tower_http::trace::{DefaultOnResponse, OnResponse};
use tracing::field::Empty;

/// The span of one HTTP request. The OpenTelemetry fields (`otel.*` and the outcome) are
/// declared empty and filled only when traces are exported: an empty field costs the log
/// nothing.
pub fn request_span<B>(request: &Request<B>) -> tracing::Span {
    let id = request
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or("-");
    // Probes and scrapes get a DEBUG span: an orchestrator polls them every few seconds, and
    // they are neither logged at INFO (see the access log) nor traced.
    macro_rules! request_span {
        ($level:expr) => {
            tracing::span!(
                $level,
                "request",
                id,
                method = %request.method(),
                path = %request.uri().path(),
                otel.name = Empty,
                otel.kind = Empty,
                otel.status_code = Empty,
                http.route = Empty,
                protocol = Empty,
                model = Empty,
                version = Empty,
                images = Empty,
                bytes_in = Empty,
                bytes_out = Empty,
                status = Empty,
                error_type = Empty,
                cache = Empty,
            )
        };
    }
    // Probes and scrapes get a DEBUG span: an orchestrator polls them every few seconds, and
    // they are neither logged at INFO (see the access log) nor traced.
    let span = if is_quiet(request.uri().path()) {
        request_span!(tracing::Level::DEBUG)
    } else {
        request_span!(tracing::Level::INFO)
    };
    if telemetry::active() {
        describe_request(&span, request);
    }
    span
}

/// What is known of a traced request before it runs: its name (method and route, as the
/// OpenTelemetry HTTP conventions name server spans), kind, protocol, and the trace it
/// continues.
fn describe_request<B>(span: &tracing::Span, request: &Request<B>) {
    let path = request.uri().path();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(path, |p| p.as_str());
    span.record("otel.name", format!("{} {route}", request.method()));
    span.record("otel.kind", "server");
    span.record("http.route", route);
    span.record("protocol", protocol_of(path));
    if let Some(bytes) = content_length(request.headers()) {
        span.record("bytes_in", bytes as i64);
    }
    let headers = request.headers();
    telemetry::continue_trace(span, |name| headers.get(name)?.to_str().ok());
}

/// `TraceLayer`'s answer hook: the debug line as before, and, when traced, the outcome.
#[derive(Clone, Copy)]
pub struct RecordResponse;

impl<B: Body> OnResponse<B> for RecordResponse {
    fn on_response(
        self,
        response: &Response<B>,
        latency: std::time::Duration,
        span: &tracing::Span,
    ) {
        DefaultOnResponse::new()
            .level(tracing::Level::DEBUG)
            .on_response(response, latency, span);
        if telemetry::active() {
            record_outcome(span, response);
        }
    }
}

fn record_outcome<B: Body>(span: &tracing::Span, response: &Response<B>) {
    let status = response.status();
    span.record("status", i64::from(status.as_u16()));
    // Server spans are errors for 5xx only: a 4xx is the client's (OTel HTTP conventions).
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    if let Some(bytes) = response.body().size_hint().exact() {
        span.record("bytes_out", bytes as i64);
    }
    if let Some(ErrorNote(error_type)) = response.extensions().get::<ErrorNote>() {
        span.record("error_type", *error_type);
    }
    if let Some(note) = response.extensions().get::<AccessNote>() {
        span.record("model", note.model.as_str());
        span.record("version", note.version.as_str());
        span.record("images", note.images as i64);
        if !note.cache.is_empty() {
            span.record("cache", note.cache);
        }
    }
}

/// Add the request span's `traceparent` to the answer (inside `TraceLayer`, where that span
/// is the current one). Only layered when traces are exported.
pub async fn answer_with_traceparent(request: Request, next: Next) -> axum::response::Response {
    let mut response = next.run(request).await;
    if let Some(value) = telemetry::traceparent(&tracing::Span::current())
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        response.headers_mut().insert("traceparent", value);
    }
    response
}
