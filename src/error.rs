//! Errors a client can cause or see, with their HTTP status and a stable `error_type`.
//!
//! `error_type` is both the JSON field clients match on and the `reason` label of the failure
//! metric, so the two never disagree. Messages say what was wrong and what is accepted;
//! internal details are logged, not sent.

use crate::pipeline::decode::DecodeError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("{message}")]
    UnsupportedMediaType { message: String },
    #[error("image {index}: {source}")]
    Image { index: usize, source: DecodeError },
    #[error("more than {limit} images in one request; split the request")]
    TooManyImages { limit: usize },
    #[error("the request body did not arrive within {seconds} s")]
    BodyTimeout { seconds: u64 },
    #[error("the server is handling its limit of {limit} requests; retry shortly")]
    TooManyRequests { limit: usize },
    #[error("model {name:?} is not served here; available: {available}")]
    ModelNotFound { name: String, available: String },
    #[error(
        "model {model:?} is at its queue limit ({limit} images admitted); retry after {retry_after_s} s"
    )]
    Overloaded {
        model: String,
        limit: usize,
        retry_after_s: u64,
    },
    #[error("model {model:?} is not ready yet (loading or warming up)")]
    NotReady { model: String },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("inference failed; the error has been logged")]
    Internal,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Image { source, .. } => match source {
                DecodeError::Empty => StatusCode::BAD_REQUEST,
                DecodeError::Unsupported { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                DecodeError::TooManyPixels { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                DecodeError::Corrupt { .. } | DecodeError::AspectRatio { .. } => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
            },
            ApiError::TooManyImages { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::ModelNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotReady { .. } | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable machine-readable kind: the JSON `error_type` and the metric `reason` label.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::UnsupportedMediaType { .. } => "unsupported_media_type",
            ApiError::Image { source, .. } => match source {
                DecodeError::Empty => "empty_image",
                DecodeError::Unsupported { .. } => "unsupported_image_format",
                DecodeError::TooManyPixels { .. } => "image_too_large",
                DecodeError::Corrupt { .. } => "undecodable_image",
                DecodeError::AspectRatio { .. } => "unsupported_aspect_ratio",
            },
            ApiError::TooManyImages { .. } => "too_many_images",
            ApiError::BodyTimeout { .. } => "body_timeout",
            ApiError::TooManyRequests { .. } => "too_many_requests",
            ApiError::ModelNotFound { .. } => "model_not_found",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::NotReady { .. } => "not_ready",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::Internal => "internal",
        }
    }
}

#[derive(serde::Serialize)]
pub struct ErrorBody {
    pub error: String,
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
        let retry_after = match self {
            ApiError::Overloaded { retry_after_s, .. } => Some(retry_after_s.max(1)),
            ApiError::TooManyRequests { .. } => Some(1),
            // Loading or warming up takes seconds, not milliseconds.
            ApiError::NotReady { .. } => Some(5),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Why loading a model failed at start-up. Reported once, then the process exits.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model {model:?}: {message}")]
    Invalid { model: String, message: String },
    #[error("model {model:?}: {source:#}")]
    Backend {
        model: String,
        source: anyhow::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_sets_retry_after() {
        let err = ApiError::Overloaded {
            model: "m".into(),
            limit: 4,
            retry_after_s: 0,
        };
        assert_eq!(err.status(), StatusCode::TOO_MANY_REQUESTS);
        let response = err.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn image_errors_name_the_image() {
        let err = ApiError::Image {
            index: 2,
            source: DecodeError::Empty,
        };
        assert_eq!(err.to_string(), "image 2: the image is empty (0 bytes)");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(err.error_type(), "empty_image");
    }
}
