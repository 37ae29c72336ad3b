//! The Open Inference Protocol (KServe v2) as tensors, shared by its two front ends:
//! `http::v2` (REST, with Triton's binary-tensor and classification extensions) and `grpc`.
//!
//! A served model looks like this to a v2 client:
//! - inputs: `image` (`BYTES`, shape `[-1]` or `[-1, 1]`: encoded image files), or `pixels`
//!   (`UINT8 [-1, 3, H, W]`: already preprocessed RGB, timm's transform before `ToTensor`; or
//!   `FP32` of the same shape, already normalised). A request gives exactly one of them.
//! - outputs: `probabilities` and `logits` (`FP32 [-1, C]`), and for native models
//!   `embeddings` (`FP32 [-1, F]`, the pooled features before the classifier). A request that
//!   names none gets all of them. `{"classification": k}` on `probabilities` or `logits` turns
//!   it into `BYTES [-1, k]` strings `"score:index:label"`, best first.
//!
//! The front ends decode their wire format into [`Input`]s and [`RequestedOutput`]s, call
//! [`plan`], run the plan's images through the inference service, and encode what [`render`]
//! returns.

use crate::backend::ModelHandle;
use crate::error::InferError;
use crate::infer::{ImageInput, ImageOutput, Outputs, Pixels, Plan};
use bytes::Bytes;
use serde::Serialize;
use std::sync::atomic::Ordering;

pub const INPUT_IMAGE: &str = "image";
pub const INPUT_PIXELS: &str = "pixels";
pub const OUTPUT_PROBABILITIES: &str = "probabilities";
pub const OUTPUT_LOGITS: &str = "logits";
pub const OUTPUT_EMBEDDINGS: &str = "embeddings";

pub const PLATFORM: &str = "visionserve";
/// The extensions of the protocol served, for `GET /v2` and ServerMetadata.
pub const EXTENSIONS: &[&str] = &[
    "classification",
    "binary_tensor_data",
    "statistics",
    "model_repository",
];

/// A v2 error: the request does not fit the protocol or the model, or the service refused it.
#[derive(Debug, thiserror::Error)]
pub enum V2Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Infer(#[from] InferError),
}

impl V2Error {
    /// The `reason` label of the failure metric.
    pub fn error_type(&self) -> &'static str {
        match self {
            V2Error::InvalidArgument(_) => "bad_request",
            V2Error::Infer(err) => err.error_type(),
        }
    }

    pub fn is_server_error(&self) -> bool {
        matches!(self, V2Error::Infer(err) if err.is_server_error())
    }
}

impl crate::error::RequestFailure for V2Error {
    fn error_type(&self) -> &'static str {
        V2Error::error_type(self)
    }

    fn is_server_error(&self) -> bool {
        V2Error::is_server_error(self)
    }

    fn is_expected(&self) -> bool {
        matches!(self, V2Error::Infer(err) if err.is_expected())
    }
}

fn invalid(message: impl Into<String>) -> V2Error {
    V2Error::InvalidArgument(message.into())
}

/// The tensor datatypes the protocol names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datatype {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Bf16,
    Fp32,
    Fp64,
    Bytes,
}

impl Datatype {
    const ALL: [(Datatype, &'static str); 14] = [
        (Datatype::Bool, "BOOL"),
        (Datatype::Uint8, "UINT8"),
        (Datatype::Uint16, "UINT16"),
        (Datatype::Uint32, "UINT32"),
        (Datatype::Uint64, "UINT64"),
        (Datatype::Int8, "INT8"),
        (Datatype::Int16, "INT16"),
        (Datatype::Int32, "INT32"),
        (Datatype::Int64, "INT64"),
        (Datatype::Fp16, "FP16"),
        (Datatype::Bf16, "BF16"),
        (Datatype::Fp32, "FP32"),
        (Datatype::Fp64, "FP64"),
        (Datatype::Bytes, "BYTES"),
    ];

    pub fn parse(name: &str) -> Result<Self, V2Error> {
        Self::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(d, _)| *d)
            .ok_or_else(|| invalid(format!("unknown datatype {name:?}")))
    }

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(d, _)| *d == self)
            .map_or("?", |(_, n)| n)
    }
}

/// An input tensor's elements, as the wire gave them.
#[derive(Debug, Clone)]
pub enum Data {
    /// `BYTES` elements.
    Bytes(Vec<Bytes>),
    Uint8(Vec<u8>),
    Fp32(Vec<f32>),
    /// A datatype no input of ours takes; kept only to say so.
    Unsupported,
}

impl Data {
    fn len(&self) -> Option<usize> {
        match self {
            Data::Bytes(v) => Some(v.len()),
            Data::Uint8(v) => Some(v.len()),
            Data::Fp32(v) => Some(v.len()),
            Data::Unsupported => None,
        }
    }

    /// Elements from a raw little-endian buffer (the binary extension and gRPC's
    /// `raw_input_contents`): `BYTES` elements each carry a 4-byte little-endian length.
    pub fn from_raw(name: &str, datatype: Datatype, raw: Bytes) -> Result<Data, V2Error> {
        match datatype {
            Datatype::Bytes => split_length_prefixed(name, raw).map(Data::Bytes),
            Datatype::Uint8 => Ok(Data::Uint8(raw.to_vec())),
            Datatype::Fp32 => {
                if !raw.len().is_multiple_of(4) {
                    return Err(invalid(format!(
                        "input {name:?}: {} bytes of FP32 data is not a whole number of 4-byte values",
                        raw.len()
                    )));
                }
                Ok(Data::Fp32(
                    raw.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ))
            }
            _ => Ok(Data::Unsupported),
        }
    }
}

/// Split a raw `BYTES` tensor into its elements.
fn split_length_prefixed(name: &str, raw: Bytes) -> Result<Vec<Bytes>, V2Error> {
    let mut elements = Vec::new();
    let mut at = 0;
    while at < raw.len() {
        let Some(prefix) = raw.get(at..at + 4) else {
            return Err(invalid(format!(
                "input {name:?}: BYTES data ends inside an element's 4-byte length prefix"
            )));
        };
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        let start = at + 4;
        if raw.len() - start < len {
            return Err(invalid(format!(
                "input {name:?}: a BYTES element declares {len} bytes but only {} remain",
                raw.len() - start
            )));
        }
        elements.push(raw.slice(start..start + len));
        at = start + len;
    }
    Ok(elements)
}

/// Encode `BYTES` elements with their 4-byte little-endian length prefixes.
pub fn join_length_prefixed(elements: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(elements.iter().map(|e| e.len() + 4).sum());
    for element in elements {
        out.extend_from_slice(&(element.len() as u32).to_le_bytes());
        out.extend_from_slice(element);
    }
    out
}

/// One input tensor of a request.
#[derive(Debug, Clone)]
pub struct Input {
    pub name: String,
    pub datatype: Datatype,
    pub shape: Vec<i64>,
    pub data: Data,
}

/// One output a request asks for.
#[derive(Debug, Clone, Default)]
pub struct RequestedOutput {
    pub name: String,
    /// The classification extension: the `k` best classes as strings.
    pub classification: Option<usize>,
}

/// What an output of the response holds.
#[derive(Debug, Clone)]
pub enum OutputData {
    Fp32(Vec<f32>),
    Bytes(Vec<Vec<u8>>),
}

impl OutputData {
    /// Little-endian raw bytes (the binary extension and gRPC's `raw_output_contents`).
    pub fn to_raw(&self) -> Vec<u8> {
        match self {
            OutputData::Fp32(values) => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            OutputData::Bytes(elements) => join_length_prefixed(elements),
        }
    }
}

/// One output tensor of a response.
#[derive(Debug, Clone)]
pub struct Output {
    pub name: &'static str,
    pub datatype: Datatype,
    pub shape: Vec<i64>,
    pub data: OutputData,
}

/// The tensors to answer with, in the order the request named them, each with its
/// classification count: built by [`plan`], used by [`render`].
#[derive(Debug)]
pub struct Tensors {
    answer: Vec<(&'static str, Option<usize>)>,
}

/// Check a request against the model's tensors and turn it into the service's plan: images,
/// outputs, and the tensors to answer with.
pub fn plan(
    model: &ModelHandle,
    inputs: Vec<Input>,
    requested: &[RequestedOutput],
) -> Result<Plan<Tensors>, V2Error> {
    let images = images_from_inputs(model, inputs)?;
    let has_embeddings = model.status.embedding_size().is_some();
    let mut answer = Vec::new();
    if requested.is_empty() {
        answer.push((OUTPUT_PROBABILITIES, None));
        answer.push((OUTPUT_LOGITS, None));
        if has_embeddings {
            answer.push((OUTPUT_EMBEDDINGS, None));
        }
    }
    for output in requested {
        let name = output_name(&output.name, has_embeddings)?;
        if answer.iter().any(|(n, _)| *n == name) {
            return Err(invalid(format!("output {name:?} is requested twice")));
        }
        if let Some(k) = output.classification {
            let classes = model.info.num_classes;
            if name == OUTPUT_EMBEDDINGS {
                return Err(invalid(
                    "the classification extension applies to \"probabilities\" or \"logits\", not \"embeddings\"",
                ));
            }
            if k == 0 || k > classes {
                return Err(invalid(format!(
                    "classification must be between 1 and {classes}, not {k}"
                )));
            }
        }
        answer.push((name, output.classification));
    }
    let mut outputs = Outputs::top_k(0);
    for &(name, classification) in &answer {
        outputs.top_k = outputs.top_k.max(classification.unwrap_or(0));
        match name {
            OUTPUT_PROBABILITIES => outputs.probabilities |= classification.is_none(),
            OUTPUT_LOGITS => outputs.logits = true,
            _ => outputs.embeddings = true,
        }
    }
    Ok(Plan {
        images,
        outputs,
        timeout: None,
        priority: None,
        keep: Tensors { answer },
    })
}

fn output_name(name: &str, has_embeddings: bool) -> Result<&'static str, V2Error> {
    match name {
        OUTPUT_PROBABILITIES => Ok(OUTPUT_PROBABILITIES),
        OUTPUT_LOGITS => Ok(OUTPUT_LOGITS),
        OUTPUT_EMBEDDINGS if has_embeddings => Ok(OUTPUT_EMBEDDINGS),
        _ => Err(invalid(format!(
            "unknown output {name:?}; this model's outputs: {}",
            output_names(has_embeddings).join(", ")
        ))),
    }
}

fn output_names(has_embeddings: bool) -> Vec<&'static str> {
    let mut names = vec![OUTPUT_PROBABILITIES, OUTPUT_LOGITS];
    if has_embeddings {
        names.push(OUTPUT_EMBEDDINGS);
    }
    names
}

/// The request's images, from its one input (`image` or `pixels`).
fn images_from_inputs(model: &ModelHandle, inputs: Vec<Input>) -> Result<Vec<ImageInput>, V2Error> {
    let mut inputs = inputs.into_iter();
    let (Some(input), None) = (inputs.next(), inputs.next()) else {
        return Err(invalid(format!(
            "a request has exactly one input: {INPUT_IMAGE:?} (BYTES, encoded image files) or \
             {INPUT_PIXELS:?} (UINT8 or FP32 [-1, 3, H, W])"
        )));
    };
    if let Some(len) = input.data.len() {
        let declared = element_count(&input)?;
        if declared != len {
            return Err(invalid(format!(
                "input {:?}: shape {:?} holds {declared} elements but {len} were sent",
                input.name, input.shape
            )));
        }
    }
    match input.name.as_str() {
        INPUT_IMAGE => encoded_images(input),
        INPUT_PIXELS => pixel_images(model, input),
        other => Err(invalid(format!(
            "unknown input {other:?}; this model's inputs: {INPUT_IMAGE:?} (BYTES) or {INPUT_PIXELS:?} (UINT8 or FP32)"
        ))),
    }
}

fn element_count(input: &Input) -> Result<usize, V2Error> {
    input.shape.iter().try_fold(1usize, |n, &d| {
        usize::try_from(d)
            .ok()
            .and_then(|d| n.checked_mul(d))
            .ok_or_else(|| {
                invalid(format!(
                    "input {:?}: shape {:?} is not a list of non-negative sizes",
                    input.name, input.shape
                ))
            })
    })
}

fn encoded_images(input: Input) -> Result<Vec<ImageInput>, V2Error> {
    let shape_ok = matches!(input.shape.as_slice(), [_] | [_, 1]);
    let Data::Bytes(files) = input.data else {
        return Err(invalid(format!(
            "input {INPUT_IMAGE:?} must be BYTES (encoded image files), not {}",
            input.datatype.name()
        )));
    };
    if !shape_ok {
        return Err(invalid(format!(
            "input {INPUT_IMAGE:?} must have shape [N] or [N, 1], not {:?}",
            input.shape
        )));
    }
    Ok(files.into_iter().map(ImageInput::Encoded).collect())
}

fn pixel_images(model: &ModelHandle, input: Input) -> Result<Vec<ImageInput>, V2Error> {
    let (h, w) = model.info.preprocess.input_size;
    let expected = [3, h as i64, w as i64];
    if input.shape.len() != 4 || input.shape[1..] != expected {
        return Err(invalid(format!(
            "input {INPUT_PIXELS:?} must have shape [N, 3, {h}, {w}] for model {:?}, not {:?}",
            model.name(),
            input.shape
        )));
    }
    let per_image = 3 * h * w;
    match input.data {
        // NCHW from the client; the model thread takes u8 images as HWC, like decoded ones.
        Data::Uint8(values) => Ok(values
            .chunks_exact(per_image)
            .map(|chw| ImageInput::Pixels(Pixels::Rgb8(chw_to_hwc(chw, h * w))))
            .collect()),
        Data::Fp32(values) => Ok(values
            .chunks_exact(per_image)
            .map(|chw| ImageInput::Pixels(Pixels::Normalized(chw.to_vec())))
            .collect()),
        _ => Err(invalid(format!(
            "input {INPUT_PIXELS:?} must be UINT8 (preprocessed RGB) or FP32 (normalised), not {}",
            input.datatype.name()
        ))),
    }
}

fn chw_to_hwc(chw: &[u8], plane: usize) -> Vec<u8> {
    let mut hwc = vec![0u8; chw.len()];
    for (i, pixel) in hwc.chunks_exact_mut(3).enumerate() {
        pixel[0] = chw[i];
        pixel[1] = chw[plane + i];
        pixel[2] = chw[2 * plane + i];
    }
    hwc
}

/// The response tensors for `results`, in the order the request named them.
pub fn render(model: &ModelHandle, tensors: &Tensors, results: &[ImageOutput]) -> Vec<Output> {
    let n = results.len() as i64;
    tensors
        .answer
        .iter()
        .map(|&(name, classification)| match classification {
            Some(k) => classification_output(model, name, k, results),
            None => {
                let rows: Vec<&[f32]> = results
                    .iter()
                    .map(|r| {
                        let p = &r.prediction;
                        match name {
                            OUTPUT_PROBABILITIES => p.probabilities.as_deref(),
                            OUTPUT_LOGITS => p.logits.as_deref(),
                            _ => p.embeddings.as_deref(),
                        }
                        .unwrap_or_default()
                    })
                    .collect();
                let width = rows.first().map_or(0, |r| r.len()) as i64;
                Output {
                    name,
                    datatype: Datatype::Fp32,
                    shape: vec![n, width],
                    data: OutputData::Fp32(rows.concat()),
                }
            }
        })
        .collect()
}

/// Triton's classification strings: `score:index:label`, the score printed as C++'s
/// `std::to_string` prints a float (six decimals).
fn classification_output(
    model: &ModelHandle,
    name: &'static str,
    k: usize,
    results: &[ImageOutput],
) -> Output {
    let labels = &model.info.labels;
    let mut strings = Vec::with_capacity(results.len() * k);
    for result in results {
        let p = &result.prediction;
        for &(index, probability) in p.top.iter().take(k) {
            let score = match (name, &p.logits) {
                (OUTPUT_LOGITS, Some(logits)) => logits[index],
                _ => probability,
            };
            let text = match labels.get(index) {
                Some(label) => format!("{score:.6}:{index}:{label}"),
                None => format!("{score:.6}:{index}"),
            };
            strings.push(text.into_bytes());
        }
    }
    Output {
        name,
        datatype: Datatype::Bytes,
        shape: vec![results.len() as i64, k as i64],
        data: OutputData::Bytes(strings),
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TensorMetadata {
    #[schema(value_type = String)]
    pub name: &'static str,
    #[schema(value_type = String, example = "FP32")]
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

/// The model's tensors as the metadata endpoints describe them; `versions`: those loaded.
pub fn model_metadata(model: &ModelHandle, versions: Vec<String>) -> ModelMetadata {
    let (h, w) = model.info.preprocess.input_size;
    let classes = model.info.num_classes as i64;
    let mut outputs = vec![
        TensorMetadata {
            name: OUTPUT_PROBABILITIES,
            datatype: "FP32",
            shape: vec![-1, classes],
        },
        TensorMetadata {
            name: OUTPUT_LOGITS,
            datatype: "FP32",
            shape: vec![-1, classes],
        },
    ];
    if let Some(features) = model.status.embedding_size() {
        outputs.push(TensorMetadata {
            name: OUTPUT_EMBEDDINGS,
            datatype: "FP32",
            shape: vec![-1, features as i64],
        });
    }
    ModelMetadata {
        name: model.name().to_owned(),
        versions,
        platform: format!("{PLATFORM}_{}", model.status.implementation()),
        inputs: vec![
            TensorMetadata {
                name: INPUT_IMAGE,
                datatype: "BYTES",
                shape: vec![-1],
            },
            TensorMetadata {
                name: INPUT_PIXELS,
                datatype: "UINT8",
                shape: vec![-1, 3, h as i64, w as i64],
            },
        ],
        outputs,
    }
}

/// `{count, ns}`.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct StatisticDuration {
    pub count: u64,
    pub ns: u64,
}

impl From<(u64, u64)> for StatisticDuration {
    fn from((count, ns): (u64, u64)) -> Self {
        Self { count, ns }
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct InferenceStats {
    pub success: StatisticDuration,
    pub fail: StatisticDuration,
    pub queue: StatisticDuration,
    pub compute_input: StatisticDuration,
    pub compute_infer: StatisticDuration,
    pub compute_output: StatisticDuration,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BatchStats {
    pub batch_size: u64,
    pub compute_input: StatisticDuration,
    pub compute_infer: StatisticDuration,
    pub compute_output: StatisticDuration,
}

/// Triton's `ModelStatistics`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ModelStats {
    pub name: String,
    pub version: String,
    pub last_inference: u64,
    pub inference_count: u64,
    pub execution_count: u64,
    pub inference_stats: InferenceStats,
    pub batch_stats: Vec<BatchStats>,
}

/// The model's statistics, from the counters its metrics keep.
pub fn model_stats(model: &ModelHandle) -> ModelStats {
    let stats = &model.metrics.stats;
    let batch_stats = stats
        .batches
        .iter()
        .enumerate()
        .filter(|(_, phases)| phases[1].get().0 > 0)
        .map(|(i, phases)| BatchStats {
            batch_size: i as u64 + 1,
            compute_input: phases[0].get().into(),
            compute_infer: phases[1].get().into(),
            compute_output: phases[2].get().into(),
        })
        .collect();
    ModelStats {
        name: model.name().to_owned(),
        version: model.version().to_owned(),
        last_inference: stats.last_inference_ms.load(Ordering::Relaxed),
        inference_count: stats.inference_count.load(Ordering::Relaxed),
        execution_count: stats.execution_count.load(Ordering::Relaxed),
        inference_stats: InferenceStats {
            success: stats.success.get().into(),
            fail: stats.fail.get().into(),
            queue: stats.queue.get().into(),
            compute_input: stats.compute_input.get().into(),
            compute_infer: stats.compute_infer.get().into(),
            compute_output: stats.compute_output.get().into(),
        },
        batch_stats,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_tensors_round_trip_through_length_prefixes() {
        let elements = vec![b"abc".to_vec(), Vec::new(), vec![0xff; 300]];
        let raw = Bytes::from(join_length_prefixed(&elements));
        let Data::Bytes(back) = Data::from_raw("image", Datatype::Bytes, raw).unwrap() else {
            panic!("BYTES data");
        };
        let back: Vec<Vec<u8>> = back.iter().map(|b| b.to_vec()).collect();
        assert_eq!(back, elements);
    }

    #[test]
    fn truncated_bytes_tensors_are_refused() {
        let mut raw = join_length_prefixed(&[b"abcdef".to_vec()]);
        raw.truncate(7);
        let err = Data::from_raw("image", Datatype::Bytes, Bytes::from(raw)).unwrap_err();
        assert!(err.to_string().contains("declares 6 bytes"), "{err}");
        let err =
            Data::from_raw("image", Datatype::Bytes, Bytes::from_static(&[1, 0])).unwrap_err();
        assert!(err.to_string().contains("length prefix"), "{err}");
    }

    #[test]
    fn fp32_raw_data_is_little_endian() {
        let raw = Bytes::from(
            [1.5f32, -2.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>(),
        );
        let Data::Fp32(values) = Data::from_raw("pixels", Datatype::Fp32, raw).unwrap() else {
            panic!("FP32 data");
        };
        assert_eq!(values, [1.5, -2.0]);
        assert!(Data::from_raw("pixels", Datatype::Fp32, Bytes::from_static(&[0; 5])).is_err());
        assert_eq!(OutputData::Fp32(vec![1.5]).to_raw(), 1.5f32.to_le_bytes());
    }

    #[test]
    fn chw_becomes_hwc() {
        // Two pixels: R = [1, 2], G = [3, 4], B = [5, 6].
        assert_eq!(chw_to_hwc(&[1, 2, 3, 4, 5, 6], 2), [1, 3, 5, 2, 4, 6]);
    }

    #[test]
    fn datatypes_parse_by_their_protocol_names() {
        assert_eq!(Datatype::parse("FP32").unwrap(), Datatype::Fp32);
        assert_eq!(Datatype::Bytes.name(), "BYTES");
        assert!(Datatype::parse("FLOAT").is_err());
    }
}
