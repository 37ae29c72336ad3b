//! What runs a model copy's batches: libtorch (`torch.rs`) or OpenVINO (`openvino.rs`), chosen
//! per model version by `--backend` (or the model's `backend` option), and the warm-up that
//! every copy goes through before it turns ready, whichever runs it.

use super::openvino::{self, OpenVinoPrep, OpenVinoRunner, Unavailable};
use super::spec::WorkerSpec;
use super::torch::TorchRunner;
use super::WarmupTiming;
use crate::batching::{ImagePrediction, Outputs};
use crate::config::Backend;
use crate::images::Pixels;
use crate::metrics::BatchPhases;
use crate::repository::WeightsFormat;
use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};

/// A loaded copy of a model, on the backend that runs it.
pub enum Runner {
    Torch(TorchRunner),
    OpenVino(OpenVinoRunner),
}

/// What runs a model, for `/v1/models` and the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    /// `torch` or `openvino`.
    pub backend: &'static str,
    /// `native` (this crate's model definition) or `torchscript`.
    pub implementation: &'static str,
    /// The runtime and its version, e.g. `libtorch 2.11.0`.
    pub runtime: String,
}

impl Runner {
    /// Load `spec` with `threads` intra-op threads on the backend it asks for. `auto` runs a
    /// native model on OpenVINO on the CPU, and falls back to libtorch (saying why, once per
    /// version) where OpenVINO is missing or cannot compile the graph; an explicit `openvino`
    /// that cannot load fails the load with the cause. `openvino` is what the version's copies
    /// share to start on OpenVINO.
    pub fn load(spec: &WorkerSpec, threads: usize, openvino: &OpenVinoPrep) -> Result<Self> {
        let native = spec.files.format != WeightsFormat::TorchScript;
        let on_cpu = spec.device == tch::Device::Cpu;
        match spec.backend {
            Backend::Torch => Ok(Self::Torch(TorchRunner::load(spec)?)),
            Backend::Openvino if !on_cpu => bail!(
                "the openvino backend runs on the CPU; this model is on {}: use --backend torch \
                 (or auto) for GPUs",
                super::device::describe(spec.device)
            ),
            Backend::Openvino if !native => bail!(
                "the openvino backend runs this crate's native models; a TorchScript export runs \
                 on --backend torch"
            ),
            Backend::Openvino => match openvino.compile(spec, threads) {
                Ok(runner) => Ok(Self::OpenVino(runner)),
                Err(Unavailable { reason, .. }) => bail!("--backend openvino: {reason}"),
            },
            Backend::Auto if on_cpu && native => match openvino.compile(spec, threads) {
                Ok(runner) => Ok(Self::OpenVino(runner)),
                Err(Unavailable { reason, first }) => {
                    if first {
                        tracing::warn!(model = %spec.name, %reason, "OpenVINO cannot run this model; serving it on libtorch");
                    }
                    Ok(Self::Torch(TorchRunner::load(spec)?))
                }
            },
            Backend::Auto => Ok(Self::Torch(TorchRunner::load(spec)?)),
        }
    }

    pub fn execution(&self) -> Execution {
        match self {
            Self::Torch(runner) => Execution {
                backend: "torch",
                implementation: runner.implementation(),
                runtime: format!("libtorch {}", env!("VISIONSERVE_LIBTORCH_VERSION")),
            },
            Self::OpenVino(_) => Execution {
                backend: "openvino",
                implementation: "native",
                runtime: format!("OpenVINO {}", openvino::runtime().unwrap_or("?")),
            },
        }
    }

    /// Run a batch and copy off what `outputs` asks for, per image.
    pub fn run(&self, images: &[&Pixels], outputs: Outputs) -> Result<Vec<ImagePrediction>> {
        Ok(self.run_timed(images, outputs)?.0)
    }

    /// [`Runner::run`], and how long its three phases took.
    pub fn run_timed(
        &self,
        images: &[&Pixels],
        outputs: Outputs,
    ) -> Result<(Vec<ImagePrediction>, BatchPhases)> {
        match self {
            Self::Torch(runner) => runner.run_timed(images, outputs),
            Self::OpenVino(runner) => runner.run_timed(images, outputs),
        }
    }

    /// The length of the embeddings this model gives (`None`: it gives none).
    pub fn embedding_size(&self) -> Result<Option<usize>> {
        match self {
            Self::Torch(runner) => runner.embedding_size(),
            Self::OpenVino(runner) => Ok(Some(runner.embedding_size())),
        }
    }

    /// One image of the model's input size, all zeros.
    fn blank_image(&self) -> Pixels {
        let (h, w) = match self {
            Self::Torch(runner) => runner.input_size(),
            Self::OpenVino(runner) => runner.input_size(),
        };
        Pixels::Rgb8(vec![0u8; h * w * 3])
    }

    /// Run every batch size so that no client pays for first-call costs (graph optimisation,
    /// allocator growth, cuDNN autotuning), then time them: up to `TIMED_PASSES` passes over
    /// every size in turn (fewer once `TIMED_TIME` is spent, at least one), keeping each
    /// size's fastest run. Passes interleave the sizes so that a slow spell of the host hits
    /// them alike instead of making the later, larger sizes look slow, and the fastest run is
    /// the one other processes disturbed least. The profile decides where batches stop
    /// growing (`BatchPolicy`). Without `timed`, only the first pass runs (a copy whose
    /// profile nobody reads), and the result is empty.
    pub fn warm_up(&self, max_batch_size: usize, timed: bool) -> Result<Vec<WarmupTiming>> {
        const TIMED_PASSES: usize = 3;
        const TIMED_TIME: Duration = Duration::from_secs(3);
        let image = self.blank_image();
        let run = |batch: usize| -> Result<Duration> {
            let images = vec![&image; batch];
            let start = Instant::now();
            self.run(&images, Outputs::top_k(1))
                .with_context(|| format!("warm-up at batch size {batch}"))?;
            Ok(start.elapsed())
        };
        for batch in 1..=max_batch_size {
            run(batch)?;
        }
        if !timed {
            return Ok(Vec::new());
        }
        let (mut fastest, mut spent) = (vec![Duration::MAX; max_batch_size], Duration::ZERO);
        for _ in 0..TIMED_PASSES {
            for (i, fastest) in fastest.iter_mut().enumerate() {
                let took = run(i + 1)?;
                *fastest = (*fastest).min(took);
                spent += took;
            }
            if spent >= TIMED_TIME {
                break;
            }
        }
        Ok(fastest
            .iter()
            .enumerate()
            .map(|(i, took)| WarmupTiming::new(i + 1, took.as_secs_f64() * 1e3))
            .collect())
    }
}
