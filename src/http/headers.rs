//! Request and response headers that `/v1` and v2 REST read and write alike: the client's
//! `Request-Timeout`, its `Cache-Control`, and the cache entry of `Server-Timing`.

use super::error::ApiError;
use crate::cache::CacheUse;
use crate::config::parse_timeout;
use axum::http::{header, HeaderMap};
use std::time::Duration;

/// A client's timeout for one request, as a header.
pub const REQUEST_TIMEOUT: &str = "request-timeout";

/// How the request may use the response cache, from its `Cache-Control` header.
pub fn cache_use(headers: &HeaderMap) -> CacheUse {
    CacheUse::from_cache_control(
        headers
            .get(header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok()),
    )
}

/// The `Server-Timing` entry saying whether the answers came from the response cache: `hit`
/// (all of them), `miss` (none) or `partial`.
pub fn cache_timing(cached: impl Iterator<Item = bool>) -> String {
    let (mut hits, mut total) = (0, 0);
    for hit in cached {
        total += 1;
        hits += usize::from(hit);
    }
    let word = match hits {
        0 => "miss",
        h if h == total => "hit",
        _ => "partial",
    };
    format!(", cache;desc={word}")
}

/// The `Request-Timeout` header (`250ms`, `1.5s`, ...), if the client sent one.
pub fn header_timeout(headers: &HeaderMap) -> Result<Option<Duration>, ApiError> {
    let Some(value) = headers.get(REQUEST_TIMEOUT) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("");
    parse_timeout(text)
        .map(Some)
        .map_err(|e| ApiError::BadRequest(format!("Request-Timeout header: {e}")))
}
