//! The `openvino` backend: a native model's own description, recorded as an ONNX graph
//! (`models::onnx`), compiled by OpenVINO for the CPU and run by it.
//!
//! OpenVINO is loaded at run time (the `openvino` crate's runtime linking), from the PyPI
//! wheel `make` installs beside libtorch, so that the binary starts without it. The library
//! is looked for, in order: `$VISIONSERVE_OPENVINO_LIB` (the path of `libopenvino_c.so*`), the
//! wheel found at build time, then the `openvino` crate's own search (`$OPENVINO_INSTALL_DIR`,
//! `$LD_LIBRARY_PATH`, system folders).
//!
//! A batch never touches libtorch: the u8 pixels are normalised straight into OpenVINO's input
//! tensor (with the same f32 operations as torchvision's `ToTensor` + `Normalize`, so the
//! values are bit for bit the torch path's), and softmax and top-k run on the logits it
//! returns.

use super::spec::WorkerSpec;
use crate::batching::{ImagePrediction, Outputs};
use crate::images::Pixels;
use crate::metrics::BatchPhases;
use crate::models::{onnx, Network};
use anyhow::{anyhow, bail, Context, Result};
use openvino::{
    CompiledModel, Core, DeviceType, ElementType, InferRequest, RwPropertyKey, Shape, Tensor,
};
use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// The environment variable naming `libopenvino_c.so` (or its versioned file).
pub const LIBRARY_ENV: &str = "VISIONSERVE_OPENVINO_LIB";

/// OpenVINO's version, once its library is loaded (`Err`: why it cannot be).
pub fn runtime() -> Result<&'static str, String> {
    static LOADED: OnceLock<Result<String, String>> = OnceLock::new();
    LOADED
        .get_or_init(load_library)
        .as_ref()
        .map(String::as_str)
        .map_err(Clone::clone)
}

fn load_library() -> Result<String, String> {
    let candidates: Vec<PathBuf> = std::env::var_os(LIBRARY_ENV)
        .map(PathBuf::from)
        .into_iter()
        .chain(option_env!("VISIONSERVE_OPENVINO_LIB_BUILT").map(PathBuf::from))
        .collect();
    let mut tried = Vec::new();
    for path in &candidates {
        match openvino_sys::library::load_from(path.clone()) {
            Ok(()) => return Ok(version()),
            Err(e) => tried.push(format!("{}: {e}", path.display())),
        }
    }
    match openvino_sys::library::load() {
        Ok(()) => Ok(version()),
        Err(e) => {
            tried.push(format!("the default search ({e})"));
            Err(format!(
                "the OpenVINO runtime library (libopenvino_c.so) was not found; tried {}. \
                 `make` installs it (the PyPI wheel openvino); elsewhere set {LIBRARY_ENV} to its path",
                tried.join("; ")
            ))
        }
    }
}

fn version() -> String {
    let build = openvino::version().build_number;
    // "2026.4.1-22982-e213a147257-releases/2026/4": the release is the first part.
    build.split('-').next().unwrap_or(&build).to_owned()
}

/// What a version's copies share to start on OpenVINO: the ONNX graph, built once from the
/// checkpoint and dropped once every copy has compiled it (a copy started later, to replace
/// one, builds it again), and, once a copy has found that OpenVINO cannot run the model, why
/// (so that the others do not try again).
#[derive(Default)]
pub struct OpenVinoPrep {
    state: Mutex<PrepState>,
}

#[derive(Default)]
struct PrepState {
    graph: Option<Graph>,
    /// Copies that have not compiled yet: the graph is kept for them.
    pending: usize,
    unavailable: Option<String>,
}

/// A serialised graph, as OpenVINO reads it: from memory, or (over protobuf's 2 GiB limit)
/// from a file with its weights beside it, in a folder removed when dropped.
enum Graph {
    InMemory(Vec<u8>),
    OnDisk { folder: PathBuf, model: PathBuf },
}

impl Drop for Graph {
    fn drop(&mut self) {
        if let Graph::OnDisk { folder, .. } = self {
            let _ = std::fs::remove_dir_all(folder);
        }
    }
}

/// Why OpenVINO cannot run a model; `first` for the copy that found out.
#[derive(Debug)]
pub struct Unavailable {
    pub reason: String,
    pub first: bool,
}

impl OpenVinoPrep {
    /// For a version of `copies` copies, which share one graph.
    pub fn for_copies(copies: usize) -> Self {
        Self {
            state: Mutex::new(PrepState {
                pending: copies,
                ..PrepState::default()
            }),
        }
    }

    /// Compile one copy of the model of `spec` with `threads` inference threads. Copies
    /// compile one at a time, so that the first failure is found once.
    pub fn compile(
        &self,
        spec: &WorkerSpec,
        threads: usize,
    ) -> Result<OpenVinoRunner, Unavailable> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(reason) = &state.unavailable {
            return Err(Unavailable {
                reason: reason.clone(),
                first: false,
            });
        }
        let compiled = runtime().map_err(|e| anyhow!(e)).and_then(|_| {
            let graph = match state.graph.take() {
                Some(graph) => graph,
                None => build_graph(spec)?,
            };
            let compiled = OpenVinoRunner::compile(spec, threads, &graph);
            state.graph = Some(graph);
            compiled
        });
        state.pending = state.pending.saturating_sub(1);
        if state.pending == 0 {
            state.graph = None;
        }
        compiled.map_err(|e| {
            let reason = format!("{e:#}");
            state.unavailable = Some(reason.clone());
            Unavailable {
                reason,
                first: true,
            }
        })
    }
}

/// The model's ONNX graph: its checkpoint loaded on the CPU in f32, recorded, serialised.
fn build_graph(spec: &WorkerSpec) -> Result<Graph> {
    let started = Instant::now();
    let graph = record_graph(spec)?;
    tracing::info!(
        model = %spec.name,
        ms = started.elapsed().as_millis() as u64,
        on_disk = matches!(graph, Graph::OnDisk { .. }),
        "recorded the model as an ONNX graph for OpenVINO"
    );
    Ok(graph)
}

fn record_graph(spec: &WorkerSpec) -> Result<Graph> {
    let _no_grad = tch::no_grad_guard();
    let input_size = spec.preprocess.input_size;
    let network = Network::load(
        &spec.files,
        spec.num_classes,
        input_size,
        tch::Device::Cpu,
        tch::Kind::Float,
    )?;
    let model = network.to_onnx(&spec.name, input_size, &[]);
    drop(network);
    if model.fits_in_memory_buffer() {
        return Ok(Graph::InMemory(model.to_bytes()?));
    }
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let folder = std::env::temp_dir().join(format!(
        "visionserve-onnx-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
    let graph = Graph::OnDisk {
        model: folder.join("model.onnx"),
        folder,
    };
    if let Graph::OnDisk { model: path, .. } = &graph {
        model.write(path)?;
    }
    Ok(graph)
}

/// Runs batches on one compiled copy of the model.
pub struct OpenVinoRunner {
    request: RefCell<InferRequest>,
    /// Kept alive with the request (OpenVINO's request holds it too).
    _compiled: CompiledModel,
    /// One input tensor per batch size, allocated on first use.
    inputs: RefCell<Vec<Option<Tensor>>>,
    /// `table[c][v]`: pixel value `v` of channel `c`, normalised.
    table: Box<[[f32; 256]; 3]>,
    height: usize,
    width: usize,
    num_classes: usize,
    embedding_size: usize,
}

impl OpenVinoRunner {
    /// Compile `graph` (the model of `spec`) for the CPU with `threads` inference threads, in
    /// the precision its dtype asks for (f32 unless `--dtype bf16`).
    fn compile(spec: &WorkerSpec, threads: usize, graph: &Graph) -> Result<Self> {
        let mut core = Core::new().map_err(|e| anyhow!("starting OpenVINO: {e}"))?;
        let precision = match spec.kind {
            tch::Kind::BFloat16 => "bf16",
            _ => "f32",
        };
        let threads = threads.to_string();
        core.set_properties(
            &DeviceType::CPU,
            [
                // OpenVINO otherwise picks bf16 on CPUs that have it: f32 is what was asked for.
                (RwPropertyKey::HintInferencePrecision, precision),
                // One stream with this copy's threads: the copies of `--instances` are the
                // streams, and the batcher feeds them.
                (RwPropertyKey::NumStreams, "1"),
                (RwPropertyKey::InferenceNumThreads, threads.as_str()),
                (RwPropertyKey::HintPerformanceMode, "LATENCY"),
                // Copies run side by side; pinned, each would claim the same cores.
                (RwPropertyKey::HintEnableCpuPinning, "NO"),
                // Denormals flushed to zero, as the torch path's model threads do.
                (
                    RwPropertyKey::Other("CPU_DENORMALS_OPTIMIZATION".into()),
                    "YES",
                ),
            ],
        )
        .map_err(|e| anyhow!("setting OpenVINO's CPU properties: {e}"))?;
        let model = match graph {
            Graph::InMemory(bytes) => core.read_model_from_buffer(bytes, None),
            Graph::OnDisk { model, .. } => core.read_model_from_file(&model.to_string_lossy(), ""),
        }
        .map_err(|e| anyhow!("OpenVINO could not read the model's ONNX graph: {e}"))?;
        let mut compiled = core
            .compile_model(&model, DeviceType::CPU)
            .map_err(|e| anyhow!("OpenVINO could not compile the model for the CPU: {e}"))?;
        warn_if_not_bf16(spec, &compiled);
        let request = compiled
            .create_infer_request()
            .map_err(|e| anyhow!("creating an OpenVINO infer request: {e}"))?;
        let embedding_size = embedding_size(&compiled)?;
        let (height, width) = spec.preprocess.input_size;
        Ok(Self {
            request: RefCell::new(request),
            _compiled: compiled,
            inputs: RefCell::new(Vec::new()),
            table: Box::new(normalisation_table(
                spec.preprocess.mean,
                spec.preprocess.std,
            )),
            height,
            width,
            num_classes: spec.num_classes,
            embedding_size,
        })
    }

    pub fn embedding_size(&self) -> usize {
        self.embedding_size
    }

    /// The model's input (height, width).
    pub fn input_size(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    /// Run a batch and compute, per image, what `outputs` asks for; with the time of each phase.
    pub fn run_timed(
        &self,
        images: &[&Pixels],
        outputs: Outputs,
    ) -> Result<(Vec<ImagePrediction>, BatchPhases)> {
        let start = Instant::now();
        let n = images.len();
        let mut request = self.request.borrow_mut();
        {
            let mut inputs = self.inputs.borrow_mut();
            let input = self.input_tensor(&mut inputs, n)?;
            self.fill(input, images)?;
            request
                .set_input_tensor(input)
                .map_err(|e| anyhow!("setting the input: {e}"))?;
        }
        let input_done = Instant::now();
        request
            .infer()
            .map_err(|e| anyhow!("OpenVINO inference failed: {e}"))?;
        let infer_done = Instant::now();
        let logits_tensor = request
            .get_tensor(onnx::LOGITS)
            .map_err(|e| anyhow!("reading the logits: {e}"))?;
        let logits = logits_tensor
            .get_data::<f32>()
            .map_err(|e| anyhow!("reading the logits: {e}"))?;
        if logits.len() != n * self.num_classes {
            bail!(
                "the model returned {} logits for {n} images, but its config.json says num_classes = {}",
                logits.len(),
                self.num_classes
            );
        }
        let embeddings = if outputs.embeddings {
            let tensor = request
                .get_tensor(onnx::EMBEDDINGS)
                .map_err(|e| anyhow!("reading the embeddings: {e}"))?;
            let values = tensor
                .get_data::<f32>()
                .map_err(|e| anyhow!("reading the embeddings: {e}"))?
                .to_vec();
            Some(values)
        } else {
            None
        };
        let predictions = predictions(logits, embeddings.as_deref(), n, outputs);
        let phases = BatchPhases {
            input: input_done - start,
            infer: infer_done - input_done,
            output: infer_done.elapsed(),
        };
        Ok((predictions, phases))
    }

    /// The input tensor for a batch of `n`, `[n, 3, H, W]`, made once per batch size.
    fn input_tensor<'a>(
        &self,
        inputs: &'a mut Vec<Option<Tensor>>,
        n: usize,
    ) -> Result<&'a mut Tensor> {
        if inputs.len() < n {
            inputs.resize_with(n, || None);
        }
        let slot = &mut inputs[n - 1];
        if slot.is_none() {
            let shape = Shape::new(&[n as i64, 3, self.height as i64, self.width as i64])
                .map_err(|e| anyhow!("{e}"))?;
            *slot = Some(
                Tensor::new(ElementType::F32, &shape)
                    .map_err(|e| anyhow!("allocating the input: {e}"))?,
            );
        }
        Ok(slot.as_mut().expect("filled above"))
    }

    /// Write `images` into `input` as normalised CHW f32.
    fn fill(&self, input: &mut Tensor, images: &[&Pixels]) -> Result<()> {
        let plane = self.height * self.width;
        let data = input
            .get_data_mut::<f32>()
            .map_err(|e| anyhow!("writing the input: {e}"))?;
        for (image, out) in images.iter().zip(data.chunks_exact_mut(3 * plane)) {
            match image {
                Pixels::Rgb8(hwc) => {
                    if hwc.len() != 3 * plane {
                        bail!(
                            "an image of {} bytes does not match the model input ({} bytes)",
                            hwc.len(),
                            3 * plane
                        );
                    }
                    normalise_into(hwc, out, plane, &self.table);
                }
                Pixels::Normalized(chw) => {
                    if chw.len() != 3 * plane {
                        bail!("normalised pixels of the wrong size ({} values)", chw.len());
                    }
                    out.copy_from_slice(chw);
                }
            }
        }
        Ok(())
    }
}

/// Say once that OpenVINO runs f32 where bf16 was asked for: it does so, silently, on CPUs
/// without bf16 instructions.
fn warn_if_not_bf16(spec: &WorkerSpec, compiled: &CompiledModel) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if spec.kind != tch::Kind::BFloat16 {
        return;
    }
    let key = openvino::PropertyKey::Rw(RwPropertyKey::HintInferencePrecision);
    let precision = compiled.get_property(&key).map(|p| p.to_string());
    if precision.as_deref().is_ok_and(|p| !p.contains("bf16")) {
        WARNED.call_once(|| {
            tracing::warn!(
                model = %spec.name,
                precision = %precision.unwrap_or_default(),
                "--dtype bf16: OpenVINO runs this model in f32, as this CPU has no bf16 instructions"
            )
        });
    }
}

/// The length of the model's `embeddings` output.
fn embedding_size(compiled: &CompiledModel) -> Result<usize> {
    let node = compiled
        .get_output_by_name(onnx::EMBEDDINGS)
        .map_err(|e| anyhow!("the compiled model has no embeddings output: {e}"))?;
    let shape = node
        .get_partial_shape()
        .map_err(|e| anyhow!("the embeddings' shape: {e}"))?;
    let last = shape
        .get_dimensions()
        .last()
        .copied()
        .context("the embeddings have no dimensions")?;
    Ok(last.get_max().max(0) as usize)
}

/// Every u8 value of each channel, normalised exactly as the torch path does it: to f32, `/
/// 255`, `- mean`, `/ std`, each a separate f32 operation.
fn normalisation_table(mean: [f32; 3], std: [f32; 3]) -> [[f32; 256]; 3] {
    let mut table = [[0f32; 256]; 3];
    for (c, row) in table.iter_mut().enumerate() {
        for (v, out) in row.iter_mut().enumerate() {
            *out = ((v as f32) / 255.0 - mean[c]) / std[c];
        }
    }
    table
}

/// One HWC u8 image into CHW f32 planes of `plane` values.
fn normalise_into(hwc: &[u8], out: &mut [f32], plane: usize, table: &[[f32; 256]; 3]) {
    let (red, rest) = out.split_at_mut(plane);
    let (green, blue) = rest.split_at_mut(plane);
    for (i, pixel) in hwc.chunks_exact(3).enumerate() {
        red[i] = table[0][pixel[0] as usize];
        green[i] = table[1][pixel[1] as usize];
        blue[i] = table[2][pixel[2] as usize];
    }
}

/// Per image: softmax over its logits, its top-k, and the rows `outputs` asks for.
fn predictions(
    logits: &[f32],
    embeddings: Option<&[f32]>,
    n: usize,
    outputs: Outputs,
) -> Vec<ImagePrediction> {
    let classes = logits.len() / n.max(1);
    let width = embeddings.map_or(0, |e| e.len() / n.max(1));
    (0..n)
        .map(|i| {
            let row = &logits[i * classes..(i + 1) * classes];
            let probabilities = softmax(row);
            ImagePrediction {
                top: top_k(&probabilities, outputs.top_k),
                logits: outputs.logits.then(|| row.to_vec()),
                embeddings: embeddings.map(|e| e[i * width..(i + 1) * width].to_vec()),
                probabilities: outputs.probabilities.then_some(probabilities),
                ..ImagePrediction::default()
            }
        })
        .collect()
}

/// `exp(x - max) / sum`, in f32 as libtorch computes it.
fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// The `k` largest probabilities with their classes, best first (ties: lower class first).
fn top_k(probabilities: &[f32], k: usize) -> Vec<(usize, f32)> {
    let k = k.min(probabilities.len());
    if k == 0 {
        return Vec::new();
    }
    let mut ranked: Vec<(usize, f32)> = probabilities.iter().copied().enumerate().collect();
    let by_score = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    ranked.select_nth_unstable_by(k - 1, by_score);
    ranked.truncate(k);
    ranked.sort_by(by_score);
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_matches_the_torch_path_bit_for_bit() {
        let mean = [0.485, 0.456, 0.406];
        let std = [0.229, 0.224, 0.225];
        let table = normalisation_table(mean, std);
        let pixels: Vec<u8> = (0..=255u8).flat_map(|v| [v, 255 - v, v / 2]).collect();
        let plane = 256;
        let mut ours = vec![0f32; 3 * plane];
        normalise_into(&pixels, &mut ours, plane, &table);
        let torch = tch::Tensor::from_slice(&pixels)
            .view([1, 16, 16, 3])
            .permute([0, 3, 1, 2])
            .to_kind(tch::Kind::Float)
            .divide_scalar(255)
            .f_sub(&tch::Tensor::from_slice(&mean).view([1, 3, 1, 1]))
            .unwrap()
            .f_div(&tch::Tensor::from_slice(&std).view([1, 3, 1, 1]))
            .unwrap()
            .contiguous();
        let torch = Vec::<f32>::try_from(torch.flatten(0, -1)).unwrap();
        assert_eq!(ours.len(), torch.len());
        for (a, b) in ours.iter().zip(&torch) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a} vs {b}");
        }
    }

    #[test]
    fn top_k_is_sorted_and_stable_on_ties() {
        let p = [0.1, 0.4, 0.1, 0.4, 0.0];
        assert_eq!(top_k(&p, 3), vec![(1, 0.4), (3, 0.4), (0, 0.1)]);
        assert_eq!(top_k(&p, 0), vec![]);
        assert_eq!(top_k(&p, 9).len(), 5);
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_the_order() {
        let p = softmax(&[1.0, 3.0, -2.0, 4.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[3] > p[1] && p[1] > p[0] && p[0] > p[2]);
    }

    #[test]
    fn predictions_keep_only_what_was_asked() {
        let logits = [0.0, 1.0, 2.0, 2.0, 1.0, 0.0];
        let outputs = Outputs {
            top_k: 1,
            probabilities: false,
            logits: true,
            embeddings: false,
        };
        let predictions = predictions(&logits, None, 2, outputs);
        assert_eq!(predictions[0].top[0].0, 2);
        assert_eq!(predictions[1].top[0].0, 0);
        assert_eq!(predictions[1].logits.as_deref(), Some(&[2.0, 1.0, 0.0][..]));
        assert!(predictions[0].probabilities.is_none());
    }
}
