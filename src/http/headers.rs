//! Request and response headers that `/v1` and v2 REST read and write alike: the client's
//! `Request-Timeout`, its `Priority`, its `Cache-Control`, and the cache entry of
//! `Server-Timing`; and the API key the request presented (put there by `auth`).

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

/// The `Priority` header as a level number (1 = the highest, 0 = the default), if the client
/// sent one; RFC 9218's transport priorities (`u=3, i`) are not ours and read as none.
pub fn header_priority(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(PRIORITY) else {
        return Ok(None);
    };
    crate::priority::parse(value.to_str().unwrap_or("?"))
        .map_err(|e| ApiError::BadRequest(format!("Priority header: {e}")))
}

/// A request's priority level, as a header.
pub const PRIORITY: &str = "priority";

/// The API key the request presented, whose limits the service applies.
pub fn request_key(
    extensions: &axum::http::Extensions,
) -> Option<std::sync::Arc<crate::auth::KeyPolicy>> {
    extensions
        .get::<std::sync::Arc<crate::auth::KeyPolicy>>()
        .cloned()
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
