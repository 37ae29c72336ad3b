//! The ModelInfer span as an OpenTelemetry server span (when `--otlp-endpoint` is set): it
//! continues the client's W3C trace from the call's metadata (`traceparent`, `tracestate`),
//! gets the call's outcome as attributes, and its own `traceparent` goes back in the response
//! metadata (or the error's), so that a client can find its trace.

use super::proto::ModelInferResponse;
use crate::access::AccessNote;
use crate::telemetry;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::Status;

/// What is known before the call runs: name, kind, protocol, size, and the trace it continues.
pub(super) fn describe_call(span: &tracing::Span, metadata: &MetadataMap, bytes_in: u64) {
    span.record("otel.name", "inference.GRPCInferenceService/ModelInfer");
    span.record("otel.kind", "server");
    span.record("protocol", "grpc");
    span.record("bytes_in", bytes_in as i64);
    telemetry::continue_trace(span, |name| metadata.get(name)?.to_str().ok());
}

/// Record how the call ended, and return the `traceparent` for the answer (`None` when
/// nothing is traced).
pub(super) fn record_outcome(
    span: &tracing::Span,
    outcome: &Result<(AccessNote, ModelInferResponse), (&'static str, Status)>,
) -> Option<AsciiMetadataValue> {
    if !telemetry::active() {
        return None;
    }
    match outcome {
        Ok((note, response)) => {
            span.record("status", "OK");
            span.record("bytes_out", prost::Message::encoded_len(response) as i64);
            span.record("version", note.version.as_str());
            span.record("images", note.images as i64);
            if !note.cache.is_empty() {
                span.record("cache", note.cache);
            }
        }
        Err((error_type, status)) => {
            span.record("status", format!("{:?}", status.code()));
            span.record("error_type", *error_type);
            // As for HTTP's 5xx: only the server's failures make the span an error
            // (OpenTelemetry's RPC conventions list these codes for servers).
            use tonic::Code;
            if matches!(
                status.code(),
                Code::Unknown
                    | Code::DeadlineExceeded
                    | Code::Unimplemented
                    | Code::Internal
                    | Code::Unavailable
                    | Code::DataLoss
            ) {
                span.record("otel.status_code", "ERROR");
            }
        }
    }
    telemetry::traceparent(span)?.parse().ok()
}
