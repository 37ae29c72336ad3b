//! The API-key check in front of every HTTP route but the health probes (and `/metrics`
//! unless `--protect-metrics`), and under `--tls-client-ca` the client-certificate check in
//! front of every route but the probes. It runs before any handler, so a refused request's body is
//! never read: it is drained in the background (lingering) and the client gets its 401.

use super::input::discard_body;
use super::AppState;
use crate::auth::{ApiKeys, AuthError, KeyPolicy};
use crate::tls::Peer;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;

pub async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if state.require_client_certificate && !is_probe(path) && !presented_certificate(&request) {
        state.inference.metrics().unauthorized_request("http");
        let v2 = path.starts_with("/v2");
        discard_body(request);
        return certificate_refusal(v2);
    }
    if is_management(request.method(), path) {
        return require_admin_key(&state, request, next).await;
    }
    if is_open(path, state.protect_metrics) {
        return next.run(request).await;
    }
    let v2 = path.starts_with("/v2");
    match check_key(&state.keys, &request) {
        Ok(key) => {
            let mut request = request;
            // The key's limits are the inference service's to apply (`infer`).
            if let Some(key) = key {
                request.extensions_mut().insert(key);
            }
            next.run(request).await
        }
        Err(err) => {
            state.inference.metrics().unauthorized_request("http");
            discard_body(request);
            refusal(err, v2)
        }
    }
}

/// The key a request presents (`Authorization: Bearer` or `x-api-key`), checked against `keys`:
/// its policy, or `None` when `keys` is empty.
fn check_key(keys: &ApiKeys, request: &Request) -> Result<Option<Arc<KeyPolicy>>, AuthError> {
    let headers = request.headers();
    keys.check(
        headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
        headers.get("x-api-key").map(HeaderValue::as_bytes),
    )
}

/// The management API's routes: they take the admin key, and only it.
fn is_management(method: &Method, path: &str) -> bool {
    path == "/v1/repository"
        || path.starts_with("/v2/repository/")
        || (method == Method::POST && path == "/v1/models")
        || (method == Method::DELETE && path.starts_with("/v1/models/"))
}

/// `--admin-token`: 403 when none is configured (the API is off), 401 for a wrong or missing
/// key; an inference key is a wrong key here.
async fn require_admin_key(state: &AppState, request: Request, next: Next) -> Response {
    let v2 = request.uri().path().starts_with("/v2");
    let Some(admin) = &state.admin else {
        discard_body(request);
        let message = "the management API is off: start the server with --admin-token (and \
                       --model-control explicit to load and unload models)";
        let body = if v2 {
            serde_json::json!({ "error": message })
        } else {
            serde_json::json!({ "error": message, "error_type": "management_disabled" })
        };
        let note = crate::access::ErrorNote("management_disabled");
        return (StatusCode::FORBIDDEN, axum::Extension(note), Json(body)).into_response();
    };
    match check_key(admin, &request) {
        Ok(_) => next.run(request).await,
        Err(err) => {
            state.inference.metrics().unauthorized_request("http");
            discard_body(request);
            refusal(err, v2)
        }
    }
}

/// Probes must work without credentials (kubelet sends none): `/health/*` and the v2
/// protocol's health endpoints (server live/ready, model ready); `/metrics` too unless asked.
/// The web page and the API description hold no data: the page asks for a key itself.
fn is_open(path: &str, protect_metrics: bool) -> bool {
    path == "/"
        || path == "/openapi.json"
        || path.starts_with("/health/")
        || path.starts_with("/v2/health/")
        || is_model_ready(path)
        || (path == "/metrics" && !protect_metrics)
}

/// The health probes: what kubelet polls, open even under `--tls-client-ca` since its HTTPS
/// probes present no client certificate.
pub(super) fn is_probe(path: &str) -> bool {
    path.starts_with("/health/") || path.starts_with("/v2/health/") || is_model_ready(path)
}

/// The request's connection presented a client certificate in its TLS handshake (verified
/// there: an unverified one fails the handshake).
fn presented_certificate(request: &Request) -> bool {
    request
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .is_some_and(|peer| peer.0.client_certificate)
}

/// 403 for a request without a client certificate under mTLS. Not 401: a 401 must carry a
/// `WWW-Authenticate` challenge (RFC 9110, section 15.5.2) and no HTTP scheme asks for a TLS
/// certificate; no header the client could add would change the answer.
fn certificate_refusal(v2: bool) -> Response {
    let message = "a client certificate is required: this server checks them (--tls-client-ca); \
                   connect with a certificate its CA signed";
    let error_type = "client_certificate_required";
    let body = if v2 {
        serde_json::json!({ "error": message })
    } else {
        serde_json::json!({ "error": message, "error_type": error_type })
    };
    let note = crate::access::ErrorNote(error_type);
    (StatusCode::FORBIDDEN, axum::Extension(note), Json(body)).into_response()
}

/// `/v2/models/{m}/ready` or `/v2/models/{m}/versions/{v}/ready`.
fn is_model_ready(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/v2/models/") else {
        return false;
    };
    let segments: Vec<&str> = rest.split('/').collect();
    match segments.as_slice() {
        [model, "ready"] => !model.is_empty(),
        [model, "versions", version, "ready"] => !model.is_empty() && !version.is_empty(),
        _ => false,
    }
}

/// 401 in the protocol's error format (`/v1`: `{"error", "error_type"}`, v2: `{"error"}`),
/// with the `WWW-Authenticate` challenge.
fn refusal(err: AuthError, v2: bool) -> Response {
    let body = if v2 {
        serde_json::json!({ "error": err.to_string() })
    } else {
        serde_json::json!({ "error": err.to_string(), "error_type": err.error_type() })
    };
    let note = crate::access::ErrorNote(err.error_type());
    let mut response =
        (StatusCode::UNAUTHORIZED, axum::Extension(note), Json(body)).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(err.challenge()),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_probes_go_without_a_client_certificate() {
        assert!(is_probe("/health/live") && is_probe("/v2/health/ready"));
        assert!(is_probe("/v2/models/m/ready"));
        for path in [
            "/",
            "/openapi.json",
            "/metrics",
            "/v1/classify",
            "/v2/models/m/infer",
        ] {
            assert!(!is_probe(path), "{path}");
        }
    }

    #[test]
    fn probes_stay_open_and_metrics_only_unless_protected() {
        assert!(is_open("/health/ready", false));
        assert!(is_open("/v2/health/live", true));
        assert!(is_open("/metrics", false));
        assert!(!is_open("/metrics", true));
        assert!(!is_open("/v1/classify", false));
        assert!(is_open("/", true));
        assert!(is_open("/openapi.json", true));
        assert!(!is_open("/v2/models/m/infer", false));
        assert!(!is_open("/v2", false));
        assert!(is_open("/v2/models/m/versions/1/ready", true));
        assert!(!is_open("/v2/models/m/stats", false));
        assert!(!is_open("/v2/models/ready", false));
        assert!(!is_open("/v2/models//ready", false));
    }
}
