//! The HTTP side of the access log ([`crate::access`]): a middleware outside the API-key check,
//! the body limit and the panic guard, so that every request is logged once, refusals (401,
//! 413, 429) included, with what its handler noted on the response.

use crate::access::{self, AccessNote, AccessRecord, ErrorNote};
use crate::tls::Peer;
use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::Response;
use http_body::Body;
use std::time::Instant;

/// Routes an orchestrator or a scraper polls: logged at DEBUG.
pub(super) fn is_quiet(path: &str) -> bool {
    path.starts_with("/health/") || path.starts_with("/v2/health/") || path == "/metrics"
}

pub(super) fn protocol_of(path: &str) -> &'static str {
    if path.starts_with("/v1/") {
        "v1"
    } else if path.starts_with("/v2/") || path == "/v2" {
        "v2"
    } else {
        "http"
    }
}

pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name)?.to_str().ok().map(str::to_owned)
}

/// Log the request once its answer's head is ready.
pub async fn log_access(request: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    // The route, not the path: no model names or junk paths of any length in the route field.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("-", |p| p.as_str())
        .to_owned();
    let client = request
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map_or_else(|| "-".to_owned(), |c| c.0.address.to_string());
    // Owned before the await: a borrow of the request held across it would make the future
    // not Send (the body is not Sync).
    let request_id = header_text(request.headers(), "x-request-id").unwrap_or_else(|| "-".into());
    let traceparent = header_text(request.headers(), "traceparent");
    let bytes_in = content_length(request.headers());
    // With traces exported, the request span's own trace (the client's, or a new one).
    let own_trace = crate::telemetry::trace_id(&tracing::Span::current());
    let response = next.run(request).await;
    let bytes_out = response
        .body()
        .size_hint()
        .exact()
        .or_else(|| content_length(response.headers()));
    access::log(&AccessRecord {
        request_id: &request_id,
        trace_id: own_trace
            .as_deref()
            .or_else(|| access::trace_id(traceparent.as_deref()))
            .unwrap_or("-"),
        client,
        protocol: protocol_of(&path),
        method: &method,
        route: &route,
        bytes_in,
        bytes_out,
        status: response.status().as_u16().to_string(),
        error_type: response.extensions().get::<ErrorNote>().map(|e| e.0),
        note: response.extensions().get::<AccessNote>(),
        total: start.elapsed(),
        quiet: is_quiet(&path),
    });
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_sorted_by_protocol_and_probes_are_quiet() {
        assert_eq!(protocol_of("/v1/classify"), "v1");
        assert_eq!(protocol_of("/v2/models/m/infer"), "v2");
        assert_eq!(protocol_of("/openapi.json"), "http");
        assert!(is_quiet("/health/ready") && is_quiet("/v2/health/live") && is_quiet("/metrics"));
        assert!(!is_quiet("/v1/classify"));
    }
}
