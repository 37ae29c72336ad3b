//! Response bodies.

use serde::Serialize;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ClassifyResponse {
    pub model: String,
    /// The version that answered (`name@version` addresses one).
    pub version: String,
    pub results: Vec<ImageResult>,
    pub timing_ms: Timing,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ImageResult {
    pub predictions: Vec<Prediction>,
    /// Answered from the response cache (`--cache-bytes`): nothing was decoded or run, and
    /// the stage times are zero.
    pub cached: bool,
    /// Images in the batch this image ran in.
    pub batch_size: usize,
    pub timing_ms: Timing,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Prediction {
    pub index: usize,
    pub label: String,
    pub score: f32,
}

/// Milliseconds per stage. For a request, each stage is the slowest of its images (images are
/// decoded in parallel and share batches), and `total` is the wall time in the server.
#[derive(Debug, Default, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct Timing {
    pub decode: f64,
    pub preprocess: f64,
    pub queue: f64,
    pub inference: f64,
    pub total: f64,
}

impl Timing {
    pub fn max(self, other: Timing) -> Timing {
        Timing {
            decode: self.decode.max(other.decode),
            preprocess: self.preprocess.max(other.preprocess),
            queue: self.queue.max(other.queue),
            inference: self.inference.max(other.inference),
            total: self.total.max(other.total),
        }
    }

    /// The `Server-Timing` header value (durations in milliseconds).
    pub fn server_timing(&self) -> String {
        format!(
            "decode;dur={:.3}, preprocess;dur={:.3}, queue;dur={:.3}, inference;dur={:.3}, total;dur={:.3}",
            self.decode, self.preprocess, self.queue, self.inference, self.total
        )
    }
}
