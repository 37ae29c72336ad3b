//! Model architectures and loading: everything that builds a network on libtorch.
//!
//! A served model is a [`Classifier`]: normalised NCHW images in, logits out. TorchScript
//! exports run through [`torchscript`]; the native families (EfficientNet, CoAtNet) are
//! implemented in their own files with module paths equal to the checkpoint keys.

pub mod torchscript;

use crate::repository::{ModelFiles, WeightsFormat};
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// A loaded image classifier. Only the model thread calls it.
pub trait Classifier: Send {
    /// `input`: `[batch, 3, height, width]` in the model's dtype on its device. Returns logits
    /// `[batch, num_classes]`.
    fn forward(&self, input: &Tensor) -> Result<Tensor>;

    /// What runs, for `/v1/models` (e.g. "torchscript" or "native").
    fn backend(&self) -> &'static str;
}

/// Load the classifier described by `files` onto `device` in precision `kind`.
pub fn load(files: &ModelFiles, device: Device, kind: Kind) -> Result<Box<dyn Classifier>> {
    match files.format {
        WeightsFormat::TorchScript => Ok(Box::new(torchscript::TorchScriptModel::load(
            &files.weights,
            device,
            kind,
        )?)),
        WeightsFormat::SafeTensors | WeightsFormat::Pickle => bail!(
            "architecture {:?} has no native implementation; export it to TorchScript \
             (weights/export.py) and serve model.pt",
            files.config.architecture
        ),
    }
}
