//! `--cors-origin`: which web pages on other origins may call the API from a browser.
//!
//! tower-http's `CorsLayer` answers preflights (before the API key is checked: browsers send
//! none on a preflight) and adds the `Access-Control-*` headers to every answer, errors
//! included, so a page can read a 401 or a 429 as well as a classification.

use axum::http::{header, HeaderName, HeaderValue, Method};
use std::time::Duration;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

/// The request headers the API reads: keys, content types, deadlines, cache control, v2's
/// binary header length. `Authorization` must be named: a wildcard does not cover it.
const REQUEST_HEADERS: [&str; 9] = [
    "authorization",
    "x-api-key",
    "content-type",
    "request-timeout",
    "priority",
    "cache-control",
    "inference-header-content-length",
    // W3C Trace Context: a page's trace continues through the server.
    "traceparent",
    "tracestate",
];

/// The answer headers a page may read besides the CORS-safelisted ones.
const RESPONSE_HEADERS: [&str; 7] = [
    "server-timing",
    // The server span's trace context, so that a page can find its trace.
    "traceparent",
    "x-request-id",
    "retry-after",
    "ratelimit",
    "ratelimit-policy",
    "inference-header-content-length",
];

/// The layer for `origins` (`*`, or exact origins), or none when no origin is allowed.
pub fn layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::from(Any)
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let names = |names: &[&'static str]| -> Vec<HeaderName> {
        names.iter().map(|n| HeaderName::from_static(n)).collect()
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers(names(&REQUEST_HEADERS))
            .expose_headers(names(&RESPONSE_HEADERS))
            // Browsers cache a preflight's answer this long (Chromium caps it at 2 hours).
            .max_age(Duration::from_secs(600))
            .vary([header::ORIGIN]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_without_origins() {
        assert!(layer(&[]).is_none());
        assert!(layer(&["*".into()]).is_some());
        assert!(layer(&["https://app.example.com".into()]).is_some());
    }
}
