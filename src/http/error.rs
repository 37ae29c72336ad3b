//! The HTTP status table of `/v1`: the service's [`InferError`]s plus the errors only HTTP has
//! (body size, timeout, media type, query), rendered as `{"error", "error_type"}`.

use crate::auth::KeyRefusal;
use crate::error::{InferError, RequestFailure};
use crate::images::decode::DecodeError;
use crate::v2::V2Error;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Infer(#[from] InferError),
    #[error("{0}")]
    BadRequest(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("{message}")]
    UnsupportedMediaType { message: String },
    #[error("the request body did not arrive within {seconds} s")]
    BodyTimeout { seconds: u64 },
}

/// The HTTP status of each service error (shared by `/v1` and v2 REST).
pub fn infer_status(err: &InferError) -> StatusCode {
    match err {
        InferError::ModelNotFound { .. } => StatusCode::NOT_FOUND,
        InferError::NotReady { .. } | InferError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        InferError::TooManyRequests { .. }
        | InferError::Overloaded { .. }
        | InferError::MemoryBusy { .. } => StatusCode::TOO_MANY_REQUESTS,
        InferError::OverMemoryBudget { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        InferError::NoImages | InferError::InvalidInput(_) => StatusCode::BAD_REQUEST,
        InferError::TooManyImages { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        InferError::Image { source, .. } => match source {
            DecodeError::Empty => StatusCode::BAD_REQUEST,
            DecodeError::Unsupported { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            DecodeError::TooManyPixels { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            DecodeError::Corrupt { .. } | DecodeError::AspectRatio { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
        },
        InferError::DeadlineExceeded { .. } => StatusCode::GATEWAY_TIMEOUT,
        InferError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        InferError::KeyLimit { refusal, .. } => match refusal {
            KeyRefusal::OverBurst { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            KeyRefusal::Rate { .. } | KeyRefusal::Concurrency { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
        },
    }
}

/// The HTTP status of a v2 REST error: Triton's mapping (not found 404, unavailable 503,
/// internal 500, every other client error 400), except that overload is 429 with
/// `Retry-After`, as on `/v1`, so that load balancers and clients back off.
pub fn v2_status(err: &V2Error) -> StatusCode {
    match err {
        V2Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        V2Error::Infer(err) => match infer_status(err) {
            status @ (StatusCode::NOT_FOUND
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::TOO_MANY_REQUESTS
            | StatusCode::GATEWAY_TIMEOUT
            | StatusCode::INTERNAL_SERVER_ERROR) => status,
            _ => StatusCode::BAD_REQUEST,
        },
    }
}

/// `Retry-After` for refusals that are temporary, and for a key over its rate the IETF
/// `RateLimit-Policy` and `RateLimit` headers (draft-ietf-httpapi-ratelimit-headers: the
/// policy's quota `q` per window `w` seconds; `r` left, `t` seconds until there is room).
pub fn set_retry_after(response: &mut Response, err: &InferError) {
    if let Some(seconds) = err.retry_after_secs() {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    if let InferError::KeyLimit {
        refusal: KeyRefusal::Rate { policy, .. },
        ..
    } = err
    {
        let window = policy.window.as_secs_f64().ceil().max(1.0) as u64;
        let reset = err.retry_after_secs().unwrap_or(1);
        for (name, value) in [
            (
                "ratelimit-policy",
                format!("\"images\";q={};w={window}", policy.quota),
            ),
            ("ratelimit", format!("\"images\";r=0;t={reset}")),
        ] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, value);
            }
        }
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Infer(err) => infer_status(err),
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// Stable machine-readable kind: the JSON `error_type` and the metric `reason` label.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::Infer(err) => err.error_type(),
            ApiError::BadRequest(_) => "bad_request",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::UnsupportedMediaType { .. } => "unsupported_media_type",
            ApiError::BodyTimeout { .. } => "body_timeout",
        }
    }

    pub fn is_server_error(&self) -> bool {
        self.status().is_server_error()
    }

    pub fn is_expected(&self) -> bool {
        matches!(self, ApiError::Infer(err) if err.is_expected())
    }
}

impl RequestFailure for ApiError {
    fn error_type(&self) -> &'static str {
        ApiError::error_type(self)
    }

    fn is_server_error(&self) -> bool {
        ApiError::is_server_error(self)
    }

    fn is_expected(&self) -> bool {
        ApiError::is_expected(self)
    }
}

/// A `/v1` error: a readable message and a stable kind.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
    #[schema(value_type = super::schema::ErrorType)]
    pub error_type: &'static str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = ErrorBody {
            error: self.to_string(),
            error_type: self.error_type(),
        };
        let mut response = (status, Json(body)).into_response();
        if let ApiError::Infer(err) = &self {
            set_retry_after(&mut response, err);
        }
        response
            .extensions_mut()
            .insert(crate::access::ErrorNote(self.error_type()));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_sets_retry_after() {
        let err = ApiError::from(InferError::Overloaded {
            model: "m".into(),
            limit: 4,
            retry_after_s: 0,
        });
        assert_eq!(err.status(), StatusCode::TOO_MANY_REQUESTS);
        let response = err.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn image_errors_keep_their_status_and_kind() {
        let err = ApiError::from(InferError::Image {
            index: 2,
            source: DecodeError::Empty,
        });
        assert_eq!(err.to_string(), "image 2: the image is empty (0 bytes)");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(err.error_type(), "empty_image");
    }
}
