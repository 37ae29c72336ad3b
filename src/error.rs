//! Errors of the layers below the front ends: the inference service's [`InferError`] and
//! model loading's [`LoadError`]. Neither knows a protocol: each front end maps `InferError` to
//! its own statuses in one place (`http::error`, `grpc::status`).
//!
//! `error_type` is both the field clients match on and the `reason` label of the failure
//! metric, so the two never disagree. Messages say what was wrong and what is accepted;
//! internal details are logged, not sent.

use crate::auth::KeyRefusal;
use crate::images::decode::DecodeError;

/// How a failed request is counted and logged, whatever its protocol: every front end's error
/// type says it, so that the service records an outcome from the error itself.
pub trait RequestFailure: std::fmt::Display {
    /// Stable machine-readable kind: the `error_type` clients see and the metric `reason`.
    fn error_type(&self) -> &'static str;

    /// The server's failure (unavailable or broken), not the client's.
    fn is_server_error(&self) -> bool;

    /// A server failure that is part of normal operation (loading, draining, a deadline that
    /// passed): worth counting, not worth an error in the log.
    fn is_expected(&self) -> bool;
}

/// Why the inference service refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("model {name:?} is not served here; available: {available}")]
    ModelNotFound { name: String, available: String },
    #[error("model {model:?} is not ready yet (loading or warming up)")]
    NotReady { model: String },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the server is handling its limit of {limit} requests; retry shortly")]
    TooManyRequests { limit: usize },
    #[error(
        "model {model:?} is at its queue limit ({limit} images admitted); retry after {retry_after_s} s"
    )]
    Overloaded {
        model: String,
        limit: usize,
        retry_after_s: u64,
    },
    #[error(
        "the server's in-flight memory budget ({}) is in use by other requests; retry shortly",
        crate::config::mib(*budget)
    )]
    MemoryBusy { budget: u64 },
    #[error(
        "{what} needs {}, more than the server's whole in-flight memory budget of {} \
         (--memory-budget); send a smaller image or body",
        crate::config::mib(*needed),
        crate::config::mib(*budget)
    )]
    OverMemoryBudget {
        what: &'static str,
        needed: u64,
        budget: u64,
    },
    #[error("the request holds no image")]
    NoImages,
    #[error("more than {limit} images in one request; split the request")]
    TooManyImages { limit: usize },
    #[error("image {index}: {source}")]
    Image { index: usize, source: DecodeError },
    /// A request the service cannot run as asked (the message says what is accepted).
    #[error("{0}")]
    InvalidInput(String),
    #[error(
        "the request did not finish within its timeout of {timeout_ms} ms{why}; raise the timeout \
         or retry when the model is less busy"
    )]
    DeadlineExceeded { timeout_ms: u64, why: String },
    #[error("inference failed; the error has been logged")]
    Internal,
    /// The API key's own limits (`--api-keys-file`) refused the request.
    #[error("{}", key_refusal_message(key, refusal))]
    KeyLimit { key: String, refusal: KeyRefusal },
}

fn key_refusal_message(key: &str, refusal: &KeyRefusal) -> String {
    match refusal {
        KeyRefusal::Rate {
            images,
            retry_after,
            policy,
        } => format!(
            "API key {key:?} is over its rate of {} images per {} s (this request: {images}); \
             retry after {} s",
            policy.quota,
            policy.window.as_secs_f64(),
            retry_after.as_secs_f64().ceil().max(1.0)
        ),
        KeyRefusal::OverBurst { images, burst } => format!(
            "the request holds {images} images, more than API key {key:?} may send at once \
             ({burst}, its burst); split the request"
        ),
        KeyRefusal::Concurrency { limit } => format!(
            "API key {key:?} has its limit of {limit} requests in flight; retry when one \
             finishes"
        ),
    }
}

impl InferError {
    /// Stable machine-readable kind: the `error_type` field and the metric `reason` label.
    pub fn error_type(&self) -> &'static str {
        match self {
            InferError::ModelNotFound { .. } => "model_not_found",
            InferError::NotReady { .. } => "not_ready",
            InferError::ShuttingDown => "shutting_down",
            InferError::TooManyRequests { .. } => "too_many_requests",
            InferError::Overloaded { .. } => "overloaded",
            InferError::MemoryBusy { .. } => "memory_busy",
            InferError::OverMemoryBudget { .. } => "over_memory_budget",
            InferError::NoImages | InferError::InvalidInput(_) => "bad_request",
            InferError::TooManyImages { .. } => "too_many_images",
            InferError::Image { source, .. } => match source {
                DecodeError::Empty => "empty_image",
                DecodeError::Unsupported { .. } => "unsupported_image_format",
                DecodeError::TooManyPixels { .. } => "image_too_large",
                DecodeError::Corrupt { .. } => "undecodable_image",
                DecodeError::AspectRatio { .. } => "unsupported_aspect_ratio",
            },
            InferError::DeadlineExceeded { .. } => "deadline_exceeded",
            InferError::Internal => "internal",
            InferError::KeyLimit { refusal, .. } => match refusal {
                KeyRefusal::Rate { .. } => "key_rate_limited",
                KeyRefusal::OverBurst { .. } => "key_over_burst",
                KeyRefusal::Concurrency { .. } => "key_concurrency_limited",
            },
        }
    }

    /// Failures that are the server's (unavailable or broken), not the client's.
    pub fn is_server_error(&self) -> bool {
        matches!(
            self,
            InferError::NotReady { .. }
                | InferError::ShuttingDown
                | InferError::DeadlineExceeded { .. }
                | InferError::Internal
        )
    }

    /// See [`RequestFailure::is_expected`].
    pub fn is_expected(&self) -> bool {
        matches!(
            self,
            InferError::NotReady { .. }
                | InferError::ShuttingDown
                | InferError::DeadlineExceeded { .. }
        )
    }

    /// Seconds a client should wait before retrying, for refusals that are temporary.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            InferError::Overloaded { retry_after_s, .. } => Some((*retry_after_s).max(1)),
            InferError::TooManyRequests { .. } | InferError::MemoryBusy { .. } => Some(1),
            InferError::KeyLimit { refusal, .. } => match refusal {
                KeyRefusal::Rate { retry_after, .. } => {
                    Some((retry_after.as_secs_f64().ceil() as u64).max(1))
                }
                KeyRefusal::Concurrency { .. } => Some(1),
                KeyRefusal::OverBurst { .. } => None,
            },
            // Loading or warming up takes seconds, not milliseconds.
            InferError::NotReady { .. } => Some(5),
            _ => None,
        }
    }
}

impl RequestFailure for InferError {
    fn error_type(&self) -> &'static str {
        InferError::error_type(self)
    }

    fn is_server_error(&self) -> bool {
        InferError::is_server_error(self)
    }

    fn is_expected(&self) -> bool {
        InferError::is_expected(self)
    }
}

impl From<crate::images::PoolError> for InferError {
    fn from(_: crate::images::PoolError) -> Self {
        InferError::Internal
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
    fn image_errors_name_the_image_and_their_kind() {
        let err = InferError::Image {
            index: 2,
            source: DecodeError::Empty,
        };
        assert_eq!(err.to_string(), "image 2: the image is empty (0 bytes)");
        assert_eq!(err.error_type(), "empty_image");
        assert!(!err.is_server_error());
    }

    #[test]
    fn temporary_refusals_say_when_to_retry() {
        let err = InferError::Overloaded {
            model: "m".into(),
            limit: 4,
            retry_after_s: 0,
        };
        assert_eq!(err.retry_after_secs(), Some(1));
        assert_eq!(InferError::NoImages.retry_after_secs(), None);
        assert!(InferError::ShuttingDown.is_server_error());
    }
}
