//! The `/v1` API's answers, shared by its HTTP front end (`http::handlers`) and the CLI: each
//! image's top-k classes with their labels and stage times, a request's response, and the
//! rules for `top_k`.

use crate::backend::ModelHandle;
use crate::infer::ImageOutput;
use serde::Serialize;
use std::time::Duration;

/// Classes per image when a request does not say.
pub const DEFAULT_TOP_K: usize = 5;

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

/// `top_k` must name between 1 and every class of the model.
pub fn check_top_k(top_k: usize, num_classes: usize) -> Result<usize, String> {
    if top_k == 0 || top_k > num_classes {
        return Err(format!(
            "top_k must be between 1 and {num_classes}, not {top_k}"
        ));
    }
    Ok(top_k)
}

/// `top_k` as text (a query parameter), checked as [`check_top_k`] checks it.
pub fn parse_top_k(text: &str, num_classes: usize) -> Result<usize, String> {
    let k = text.parse::<usize>().map_err(|_| {
        format!("top_k must be an integer between 1 and {num_classes}, not {text:?}")
    })?;
    check_top_k(k, num_classes)
}

/// A request's response: each image's result in request order, and per stage the slowest
/// image's time, with `elapsed` (the request's wall time in the server) as the total.
pub fn classify_response(
    model: &ModelHandle,
    outputs: Vec<ImageOutput>,
    elapsed: Duration,
) -> ClassifyResponse {
    let labels = &model.info.labels;
    let mut results = Vec::with_capacity(outputs.len());
    let mut timing = Timing::default();
    for output in outputs {
        let result = image_result(labels, output);
        timing = timing.max(result.timing_ms);
        results.push(result);
    }
    timing.total = millis(elapsed);
    ClassifyResponse {
        model: model.name().to_owned(),
        version: model.version().to_owned(),
        results,
        timing_ms: timing,
    }
}

/// One image's result: its top-k with labels, and its stage times.
pub fn image_result(labels: &[String], output: ImageOutput) -> ImageResult {
    let ImageOutput {
        prediction,
        decode,
        preprocess,
        cached,
    } = output;
    let predictions = prediction
        .top
        .iter()
        .map(|&(index, score)| Prediction {
            index,
            label: label_of(labels, index),
            score,
        })
        .collect();
    ImageResult {
        predictions,
        cached,
        batch_size: prediction.batch_size,
        timing_ms: Timing {
            decode: millis(decode),
            preprocess: millis(preprocess),
            queue: millis(prediction.queue_wait),
            inference: millis(prediction.inference),
            total: millis(decode + preprocess + prediction.queue_wait + prediction.inference),
        },
    }
}

/// A class's label, or `class_N` where the model has none for it.
pub fn label_of(labels: &[String], index: usize) -> String {
    labels
        .get(index)
        .cloned()
        .unwrap_or_else(|| format!("class_{index}"))
}

/// Milliseconds, rounded to the microsecond (what a client can use; more digits are noise).
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
