//! OpenTelemetry traces (`--otlp-endpoint`): the exporter and tracer set up at start-up, the
//! W3C trace context a client sends (`traceparent`, `tracestate`), and the stage spans that are
//! recorded after the fact with their own start and end times.
//!
//! The request spans are the `tracing` spans the front ends already open; the
//! `tracing-opentelemetry` layer (added to the one subscriber in `main.rs`) turns them into
//! OpenTelemetry spans. Work done on other threads (decoding on the decode pool, the wait in
//! the queue) is timed there and recorded here as children of the request span with explicit
//! timestamps, so no span is entered or moved across threads.
//!
//! Without an endpoint nothing is installed: [`active`] is one atomic load, and every other
//! function here returns at once.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Link, SpanKind, TraceContextExt, TraceId, TraceState, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SamplingDecision, SamplingResult, SdkTracer, SdkTracerProvider, ShouldSample,
};
use opentelemetry_sdk::Resource;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The tracer of the stage spans; set once, when an endpoint is configured.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Whether traces are being recorded and exported (an endpoint is configured).
pub fn active() -> bool {
    TRACER.get().is_some()
}

/// What `--otlp-endpoint`, `--otlp-service-name` and `--trace-sample-ratio` asked for.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub endpoint: Option<String>,
    pub service_name: Option<String>,
    pub sample_ratio: Option<f64>,
}

/// How spans travel to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Grpc,
    HttpProtobuf,
}

/// The endpoint and its transport: the flag wins over the OTel environment variables
/// (OTLP exporter spec: the signal-specific variable wins over the general one).
fn endpoint(
    settings: &Settings,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<(String, Transport)> {
    let url = settings
        .endpoint
        .clone()
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .filter(|url| !url.trim().is_empty())?;
    let protocol =
        env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
    let transport = transport_of(&url, protocol.as_deref());
    Some((url, transport))
}

/// gRPC unless the URL says HTTP: port 4318 (OTLP/HTTP's default port), a `/v1/traces` path,
/// or `http/protobuf` in OTEL_EXPORTER_OTLP_PROTOCOL.
fn transport_of(url: &str, protocol: Option<&str>) -> Transport {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (authority, path) = after_scheme.split_once('/').unwrap_or((after_scheme, ""));
    let http = protocol.is_some_and(|p| p.trim().starts_with("http/"))
        || authority.ends_with(":4318")
        || path.trim_end_matches('/').ends_with("v1/traces");
    if http {
        Transport::HttpProtobuf
    } else {
        Transport::Grpc
    }
}

/// The URL an HTTP exporter posts to: a given `/v1/traces` path is kept, otherwise it is
/// appended (as for OTEL_EXPORTER_OTLP_ENDPOINT in the OTLP exporter spec).
fn http_traces_url(url: &str) -> String {
    let trimmed = url.trim_end_matches('/');
    if trimmed.ends_with("/v1/traces") {
        trimmed.to_owned()
    } else {
        format!("{trimmed}/v1/traces")
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// What [`init`] set up: the provider to flush on exit and the layer for the subscriber.
pub struct Installed {
    pub provider: SdkTracerProvider,
    pub tracer: SdkTracer,
    /// Where spans go, for the start-up log line.
    pub describe: String,
}

/// Build the exporter and the tracer provider when an endpoint is configured (`Ok(None)`
/// otherwise). Must run inside the tokio runtime: the gRPC exporter's channel lives on it.
pub fn init(settings: &Settings) -> anyhow::Result<Option<Installed>> {
    let Some((url, transport)) = endpoint(settings, &env_var) else {
        return Ok(None);
    };
    // The flag is checked by its parser; the OTEL_* variables are checked here.
    crate::config::parse_otlp_endpoint(&url).map_err(|e| anyhow::anyhow!("OTLP endpoint {e}"))?;
    let exporter = match transport {
        Transport::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(url.clone())
            .build(),
        Transport::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(http_traces_url(&url))
            .build(),
    }
    .map_err(|e| anyhow::anyhow!("cannot export traces to {url}: {e}"))?;
    let service_name = settings
        .service_name
        .clone()
        .or_else(|| env_var("OTEL_SERVICE_NAME"))
        .unwrap_or_else(|| "visionserve".to_owned());
    let base: Box<dyn ShouldSample> = match settings.sample_ratio {
        Some(ratio) => Box::new(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        )))),
        // OTEL_TRACES_SAMPLER(_ARG), read by the SDK; parent-based always-on without them.
        None => opentelemetry_sdk::trace::Config::default().sampler,
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(BatchFollowsRequests { base })
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.clone())
                .build(),
        )
        .build();
    let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "visionserve");
    let _ = TRACER.set(tracer.clone());
    let describe = format!(
        "{url} over {}, service.name {service_name}",
        match transport {
            Transport::Grpc => "gRPC",
            Transport::HttpProtobuf => "HTTP/protobuf",
        }
    );
    Ok(Some(Installed {
        provider,
        tracer,
        describe,
    }))
}

/// Send what is still buffered and stop the exporter (at exit, after the drain).
pub fn shutdown(provider: &SdkTracerProvider) {
    if let Err(e) = provider.shutdown_with_timeout(std::time::Duration::from_secs(5)) {
        eprintln!("warning: exporting the last traces failed: {e}");
    }
}

/// The configured sampler, except for batch spans: a span with no parent but links (a batch,
/// linked to the requests it served) is sampled when one of those requests is, so that every
/// sampled request's trace can reach the batch that ran it, whatever the ratio.
#[derive(Debug, Clone)]
struct BatchFollowsRequests {
    base: Box<dyn ShouldSample>,
}

impl ShouldSample for BatchFollowsRequests {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let has_parent = parent_context.is_some_and(|cx| cx.has_active_span());
        if !has_parent && !links.is_empty() {
            let sampled = links.iter().any(|l| l.span_context.is_sampled());
            return SamplingResult {
                decision: if sampled {
                    SamplingDecision::RecordAndSample
                } else {
                    SamplingDecision::Drop
                },
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            };
        }
        self.base
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

/// A W3C trace context read from a carrier (HTTP headers, gRPC metadata).
struct Carrier<'a, F: Fn(&str) -> Option<&'a str>>(F);

impl<'a, F: Fn(&str) -> Option<&'a str>> Extractor for Carrier<'a, F> {
    fn get(&self, key: &str) -> Option<&str> {
        (self.0)(key)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// Continue the client's trace: make the context in `traceparent`/`tracestate` (W3C Trace
/// Context) the parent of `span`, a request span just created. `header` looks a header up.
pub fn continue_trace<'a>(span: &tracing::Span, header: impl Fn(&str) -> Option<&'a str>) {
    if !active() || header("traceparent").is_none() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Carrier(header));
    let _ = span.set_parent(parent);
}

/// The `traceparent` of `span` (W3C Trace Context: `00-<trace id>-<span id>-<flags>`), for the
/// response, so that a client can find the trace; `None` when nothing is traced.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !active() {
        return None;
    }
    let cx = span.context();
    let span_context = cx.span().span_context().clone();
    span_context.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        )
    })
}

/// The trace id of `span` (32 hex digits) when traces are exported, for the access log.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    if !active() {
        return None;
    }
    let span_context = span.context().span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// A request span's OpenTelemetry context, taken once, so that the stages recorded under it
/// do not each look it up. Empty when tracing is off or the request is not sampled: then
/// recording a stage costs a branch.
#[derive(Debug, Clone, Default)]
pub struct RequestTrace {
    parent: Option<Context>,
}

impl RequestTrace {
    /// The trace of `span` (a request span), if it is sampled.
    pub fn of(span: &tracing::Span) -> Self {
        if !active() {
            return Self::default();
        }
        let cx = span.context();
        let sampled = cx.span().span_context().is_sampled();
        Self {
            parent: sampled.then_some(cx),
        }
    }

    pub fn is_recording(&self) -> bool {
        self.parent.is_some()
    }

    /// The trace id (32 hex digits), for exemplars.
    pub fn trace_id(&self) -> Option<String> {
        let cx = self.parent.as_ref()?;
        Some(cx.span().span_context().trace_id().to_string())
    }

    /// Record a stage (`body read`, `decode`, ...) that ran from `start` to `end`, as a child
    /// of the request span.
    pub fn stage(&self, name: &'static str, start: Instant, end: Instant) {
        self.stage_with(name, start, end, &[]);
    }

    /// [`Self::stage`] with integer attributes.
    pub fn stage_with(
        &self,
        name: &'static str,
        start: Instant,
        end: Instant,
        attributes: &[(&'static str, i64)],
    ) {
        let (Some(parent), Some(tracer)) = (&self.parent, TRACER.get()) else {
            return;
        };
        let mut span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(wall_clock(start))
            .with_attributes(attributes.iter().map(|&(k, v)| KeyValue::new(k, v)))
            .start_with_context(tracer, parent);
        opentelemetry::trace::Span::end_with_timestamp(&mut span, wall_clock(end));
    }
}

/// The wall-clock time of `instant` (spans carry wall-clock times; stages are timed with the
/// monotonic clock).
fn wall_clock(instant: Instant) -> SystemTime {
    let now = Instant::now();
    let wall = SystemTime::now();
    if instant <= now {
        wall - (now - instant)
    } else {
        wall + (instant - now)
    }
}

/// The context of a request span, for a batch span's link to it (`None` when nothing is
/// traced or the request is not sampled).
pub fn link_to(span: &tracing::Span) -> Option<opentelemetry::trace::SpanContext> {
    if !active() {
        return None;
    }
    let span_context = span.context().span().span_context().clone();
    span_context.is_sampled().then_some(span_context)
}

/// Link `span` (not yet entered) to the span `to`.
pub fn add_link(span: &tracing::Span, to: opentelemetry::trace::SpanContext) {
    span.add_link(to);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_url_says_which_transport() {
        assert_eq!(transport_of("http://localhost:4317", None), Transport::Grpc);
        assert_eq!(
            transport_of("http://collector:4318", None),
            Transport::HttpProtobuf
        );
        assert_eq!(
            transport_of("https://otlp.example.com/v1/traces", None),
            Transport::HttpProtobuf
        );
        assert_eq!(
            transport_of("http://collector:55680", Some("http/protobuf")),
            Transport::HttpProtobuf
        );
        assert_eq!(
            transport_of("http://collector:4317", Some("grpc")),
            Transport::Grpc
        );
    }

    #[test]
    fn http_urls_end_in_v1_traces_once() {
        assert_eq!(http_traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(http_traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            http_traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }

    #[test]
    fn endpoints_without_tls_only() {
        use crate::config::parse_otlp_endpoint;
        assert!(parse_otlp_endpoint("http://collector:4317").is_ok());
        assert!(parse_otlp_endpoint("https://collector:4317")
            .unwrap_err()
            .contains("without TLS"));
        assert!(parse_otlp_endpoint("collector:4317").is_err());
        assert!(parse_otlp_endpoint("http://").is_err());
    }

    #[test]
    fn the_flag_wins_over_the_environment_and_nothing_means_off() {
        assert_eq!(endpoint(&Settings::default(), &no_env), None);
        let env = |name: &str| match name {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://env:4317".to_owned()),
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => Some("http://traces:4318/v1/traces".to_owned()),
            _ => None,
        };
        assert_eq!(
            endpoint(&Settings::default(), &env),
            Some((
                "http://traces:4318/v1/traces".to_owned(),
                Transport::HttpProtobuf
            ))
        );
        let flag = Settings {
            endpoint: Some("http://flag:4317".to_owned()),
            ..Settings::default()
        };
        assert_eq!(
            endpoint(&flag, &env),
            Some(("http://flag:4317".to_owned(), Transport::Grpc))
        );
    }

    #[test]
    fn batches_follow_the_requests_they_served() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags};
        let sampler = BatchFollowsRequests {
            base: Box::new(Sampler::AlwaysOff),
        };
        let link = |flags| {
            Link::with_context(SpanContext::new(
                TraceId::from_bytes([7; 16]),
                SpanId::from_bytes([9; 8]),
                flags,
                true,
                TraceState::default(),
            ))
        };
        let decide = |links: &[Link]| {
            sampler
                .should_sample(
                    None,
                    TraceId::from_bytes([1; 16]),
                    "batch",
                    &SpanKind::Internal,
                    &[],
                    links,
                )
                .decision
        };
        assert_eq!(
            decide(&[link(TraceFlags::default()), link(TraceFlags::SAMPLED)]),
            SamplingDecision::RecordAndSample
        );
        assert_eq!(
            decide(&[link(TraceFlags::default())]),
            SamplingDecision::Drop
        );
        // No links: the configured sampler decides.
        assert_eq!(decide(&[]), SamplingDecision::Drop);
    }
}
