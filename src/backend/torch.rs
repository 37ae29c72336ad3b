//! The `torch` backend: any [`Classifier`] on libtorch, on the CPU or a GPU. The reference
//! for native models (their forward pass run by `models::ops::Eager`), and the only backend
//! for TorchScript exports and GPUs.

use super::spec::WorkerSpec;
use crate::batching::{ImagePrediction, Outputs};
use crate::images::Pixels;
use crate::metrics::BatchPhases;
use crate::models::{self, Classifier};
use anyhow::{bail, Result};
use std::cell::RefCell;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Turns preprocessed u8 images into probabilities on libtorch: the part of inference that is
/// the same for every architecture.
pub struct TorchRunner {
    model: Box<dyn Classifier>,
    device: Device,
    kind: Kind,
    height: i64,
    width: i64,
    mean: Tensor,
    std: Tensor,
    num_classes: usize,
    channels_last: bool,
    /// Where a batch's u8 pixels are gathered: `[capacity, H, W, 3]`, allocated once for the
    /// largest batch seen and reused, so that a batch costs one copy per image and no
    /// allocation. On CUDA it is pinned (page-locked) memory, so the upload is a DMA that
    /// runs without blocking this thread.
    staging: RefCell<Option<Tensor>>,
}

impl TorchRunner {
    /// Load the model `spec` describes and wrap it.
    pub fn load(spec: &WorkerSpec) -> Result<Self> {
        super::device::warn_if_torch_emulates_bf16(spec.kind, spec.device);
        let model = models::load(
            &spec.files,
            spec.num_classes,
            spec.preprocess.input_size,
            spec.device,
            spec.kind,
        )?;
        Self::new(model, spec)
    }

    /// `native` or `torchscript`.
    pub fn implementation(&self) -> &'static str {
        self.model.implementation()
    }

    /// The model's input (height, width).
    pub fn input_size(&self) -> (usize, usize) {
        (self.height as usize, self.width as usize)
    }

    pub fn new(model: Box<dyn Classifier>, spec: &WorkerSpec) -> Result<Self> {
        let (height, width) = spec.preprocess.input_size;
        let channel_tensor = |v: [f32; 3]| -> Result<Tensor> {
            Ok(Tensor::from_slice(&v)
                .f_view([1, 3, 1, 1])?
                .f_to_device(spec.device)?)
        };
        Ok(Self {
            channels_last: model.wants_channels_last(),
            model,
            device: spec.device,
            kind: spec.kind,
            height: height as i64,
            width: width as i64,
            mean: channel_tensor(spec.preprocess.mean)?,
            std: channel_tensor(spec.preprocess.std)?,
            num_classes: spec.num_classes,
            staging: RefCell::new(None),
        })
    }

    /// Normalise exactly as torchvision's `ToTensor` + `Normalize` do on a PIL image (u8 to
    /// f32, `/ 255`, `- mean`, `/ std`, each a separate f32 operation), on the model's device so
    /// that only u8 pixels cross to a GPU.
    fn input(&self, images: &[&Pixels]) -> Result<Tensor> {
        let rgb8: Option<Vec<&[u8]>> = images
            .iter()
            .map(|p| match p {
                Pixels::Rgb8(pixels) => Some(pixels.as_slice()),
                Pixels::Normalized(_) => None,
            })
            .collect();
        let x = match rgb8 {
            // The common case: one upload and one normalisation for the whole batch.
            Some(rgb8) => self.normalize(&rgb8)?,
            // A client sent normalised pixels: build the batch image by image.
            None => {
                let parts = images
                    .iter()
                    .map(|p| match p {
                        Pixels::Rgb8(pixels) => self.normalize(&[pixels.as_slice()]),
                        Pixels::Normalized(values) => self.normalized_nchw(values),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::f_cat(&parts, 0)?
            }
        };
        Ok(if self.kind == Kind::Float {
            x
        } else {
            x.f_to_kind(self.kind)?
        })
    }

    /// `u8` HWC images to normalised `f32` NCHW.
    fn normalize(&self, images: &[&[u8]]) -> Result<Tensor> {
        let batch = self.stage(images)?;
        // The u8 buffer is NHWC; permuting gives an NCHW view with channels-last strides,
        // which native models keep, and TorchScript exports get as a contiguous copy. On a GPU
        // the upload is asynchronous: it is ordered before the kernels that read it.
        let on_device = if self.device == Device::Cpu {
            batch
        } else {
            batch.f_to_device_(self.device, Kind::Uint8, true, false)?
        };
        let nchw = on_device.f_permute([0, 3, 1, 2])?;
        let nchw = if self.channels_last {
            nchw
        } else {
            nchw.f_contiguous()?
        };
        Ok(nchw
            .f_to_kind(Kind::Float)?
            .f_div_scalar(255)?
            .f_sub(&self.mean)?
            .f_div(&self.std)?)
    }

    /// Copy `images` into the staging buffer; returns the `[n, H, W, 3]` part they fill.
    fn stage(&self, images: &[&[u8]]) -> Result<Tensor> {
        let n = images.len() as i64;
        let image_bytes = (self.height * self.width * 3) as usize;
        if let Some(bad) = images.iter().find(|image| image.len() != image_bytes) {
            bail!(
                "an image of {} bytes does not match the model input ({image_bytes} bytes)",
                bad.len()
            );
        }
        let mut staging = self.staging.borrow_mut();
        let capacity = staging.as_ref().map_or(0, |t| t.size()[0]);
        if capacity < n {
            let buffer =
                Tensor::f_empty([n, self.height, self.width, 3], (Kind::Uint8, Device::Cpu))?;
            *staging = Some(if self.device.is_cuda() {
                buffer.f_pin_memory(self.device)?
            } else {
                buffer
            });
        }
        let batch = staging
            .as_ref()
            .expect("allocated above")
            .f_narrow(0, 0, n)?;
        let base = batch.data_ptr() as *mut u8;
        for (i, image) in images.iter().enumerate() {
            // SAFETY: `batch` is a contiguous u8 tensor of n * image_bytes bytes that this
            // thread alone uses (the previous batch's reads of it finished: its outputs were
            // copied off, which waits for the device), and each image has exactly
            // image_bytes bytes (checked above), so the copies stay inside it and do not
            // overlap their sources.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    image.as_ptr(),
                    base.add(i * image_bytes),
                    image_bytes,
                );
            }
        }
        Ok(batch)
    }

    /// One CHW image a client normalised itself, as `[1, 3, H, W]` with the strides the model
    /// wants.
    fn normalized_nchw(&self, values: &[f32]) -> Result<Tensor> {
        let nchw = Tensor::from_slice(values)
            .f_view([1, 3, self.height, self.width])?
            .f_to_device(self.device)?;
        Ok(if self.channels_last {
            nchw.f_permute([0, 2, 3, 1])?
                .f_contiguous()?
                .f_permute([0, 3, 1, 2])?
        } else {
            nchw
        })
    }

    /// Run a batch and copy off the device what `outputs` asks for, per image.
    pub fn run(&self, images: &[&Pixels], outputs: Outputs) -> Result<Vec<ImagePrediction>> {
        Ok(self.run_timed(images, outputs)?.0)
    }

    /// [`TorchRunner::run`], and how long its three phases took. On a GPU, where kernels run
    /// asynchronously, the forward pass is only waited for when outputs are copied off, so its
    /// time shows up in `output`.
    pub fn run_timed(
        &self,
        images: &[&Pixels],
        outputs: Outputs,
    ) -> Result<(Vec<ImagePrediction>, BatchPhases)> {
        let n = images.len();
        let start = Instant::now();
        let input = self.input(images)?;
        let input_done = Instant::now();
        let forward = self.model.forward_with_embeddings(&input)?;
        let forward_done = Instant::now();
        let expected = [n as i64, self.num_classes as i64];
        if forward.logits.size() != expected {
            bail!(
                "the model returned logits of shape {:?}, but its config.json says num_classes = {}",
                forward.logits.size(),
                self.num_classes
            );
        }
        let logits = forward.logits.f_to_kind(Kind::Float)?;
        let probs = logits.f_softmax(-1, Kind::Float)?;
        let mut predictions = vec![ImagePrediction::default(); n];
        let k = outputs.top_k.min(self.num_classes);
        if k > 0 {
            let (values, indices) = probs.f_topk(k as i64, -1, true, true)?;
            let values = to_rows(&values, n)?;
            let indices =
                Vec::<i64>::try_from(indices.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?;
            for ((prediction, v), i) in predictions.iter_mut().zip(values).zip(indices.chunks(k)) {
                prediction.top = i.iter().map(|&i| i as usize).zip(v).collect();
            }
        }
        if outputs.probabilities {
            for (prediction, row) in predictions.iter_mut().zip(to_rows(&probs, n)?) {
                prediction.probabilities = Some(row);
            }
        }
        if outputs.logits {
            for (prediction, row) in predictions.iter_mut().zip(to_rows(&logits, n)?) {
                prediction.logits = Some(row);
            }
        }
        if outputs.embeddings {
            let embeddings = forward
                .embeddings
                .ok_or_else(|| anyhow::anyhow!("this model does not expose embeddings"))?
                .f_to_kind(Kind::Float)?;
            for (prediction, row) in predictions.iter_mut().zip(to_rows(&embeddings, n)?) {
                prediction.embeddings = Some(row);
            }
        }
        let copied_off = k > 0 || outputs.probabilities || outputs.logits || outputs.embeddings;
        if let (Device::Cuda(index), false) = (self.device, copied_off) {
            // Nothing was copied off, which would have waited for the device: wait here, so
            // that the next batch does not overwrite the staging buffer while it uploads.
            tch::Cuda::synchronize(index as i64);
        }
        let phases = BatchPhases {
            input: input_done - start,
            infer: forward_done - input_done,
            output: forward_done.elapsed(),
        };
        Ok((predictions, phases))
    }

    /// The length of the embeddings this model gives (`None`: it gives none).
    pub fn embedding_size(&self) -> Result<Option<usize>> {
        let image = Tensor::f_zeros([1, 3, self.height, self.width], (self.kind, self.device))?;
        let forward = self.model.forward_with_embeddings(&image)?;
        Ok(forward
            .embeddings
            .map(|e| e.size().last().copied().unwrap_or(0) as usize))
    }
}

/// A `[n, m]` tensor as `n` rows of `f32` on the CPU.
fn to_rows(tensor: &Tensor, n: usize) -> Result<Vec<Vec<f32>>> {
    let flat = Vec::<f32>::try_from(tensor.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?;
    let width = flat.len() / n.max(1);
    Ok(flat.chunks(width.max(1)).map(<[f32]>::to_vec).collect())
}
