//! Model architectures and loading: everything that builds a network on libtorch.
//!
//! A served model is a [`Classifier`]: normalised NCHW images in, logits out. TorchScript
//! exports run through [`torchscript`]; the native families are implemented one file each
//! ([`efficientnet`] for EfficientNet V1, Lite and V2; [`coatnet`] for CoAtNet and CoAtNeXt),
//! with module paths equal to the checkpoint keys and presets named after the checkpoints,
//! sharing the inference-only layers in [`layers`]. [`weights`] reads checkpoints by key, and
//! [`catalog`] lists the released checkpoints for `visionserve models`.

pub mod catalog;
pub mod coatnet;
pub mod efficientnet;
pub mod layers;
pub mod torchscript;
pub mod weights;

use crate::repository::{ModelFiles, WeightsFormat};
use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};
use weights::Weights;

/// What a forward pass gives: the logits, and for native models the embeddings they came from.
pub struct Forward {
    /// `[batch, num_classes]`.
    pub logits: Tensor,
    /// `[batch, features]`: the pooled features before the classifier, as timm's
    /// `forward_head(x, pre_logits=True)` returns them. `None` where the model is opaque.
    pub embeddings: Option<Tensor>,
}

/// A loaded image classifier. Only the model thread calls it.
pub trait Classifier: Send {
    /// `input`: `[batch, 3, height, width]` in the model's dtype on its device. Returns logits
    /// `[batch, num_classes]`.
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_embeddings(input)?.logits)
    }

    /// Logits and, where the architecture is known, the embeddings (one pass for both).
    fn forward_with_embeddings(&self, input: &Tensor) -> Result<Forward>;

    /// What runs, for `/v1/models` ("torchscript" or "native").
    fn backend(&self) -> &'static str;

    /// Whether the input should have NHWC strides (see `layers::channels_last`).
    fn wants_channels_last(&self) -> bool {
        false
    }
}

/// A named architecture preset: timm's model name and the function building its config.
pub type Preset<C> = (&'static str, fn() -> C);

/// The preset named `name` in `table`.
pub fn find_preset<C>(table: &[Preset<C>], name: &str) -> Option<C> {
    table
        .iter()
        .find(|(preset, _)| *preset == name)
        .map(|(_, make)| make())
}

/// The architectures implemented natively.
pub fn native_architectures() -> impl Iterator<Item = &'static str> {
    efficientnet::PRESETS
        .iter()
        .map(|(name, _)| *name)
        .chain(coatnet::PRESETS.iter().map(|(name, _)| *name))
}

/// Load the classifier described by `files` onto `device` in precision `kind`. `input_size`
/// is the (height, width) it will be served at: CoAtNet's attention windows are built for it.
pub fn load(
    files: &ModelFiles,
    num_classes: usize,
    input_size: (usize, usize),
    device: Device,
    kind: Kind,
) -> Result<Box<dyn Classifier>> {
    match files.format {
        WeightsFormat::TorchScript => Ok(Box::new(torchscript::TorchScriptModel::load(
            &files.weights,
            device,
            kind,
        )?)),
        WeightsFormat::SafeTensors | WeightsFormat::Pickle => {
            let architecture = files.config.architecture.as_str();
            let mut weights = Weights::load(&files.weights, files.format, device, kind)?;
            let model = load_native(architecture, num_classes as i64, input_size, &mut weights)
                .with_context(|| {
                    format!("building {architecture} from {}", files.weights.display())
                })?;
            weights
                .finish()
                .with_context(|| format!("loading {}", files.weights.display()))?;
            Ok(model)
        }
    }
}

fn load_native(
    architecture: &str,
    num_classes: i64,
    input_size: (usize, usize),
    weights: &mut Weights,
) -> Result<Box<dyn Classifier>> {
    if let Some(mut cfg) = efficientnet::Config::by_name(architecture) {
        cfg.num_classes = num_classes;
        return Ok(Box::new(efficientnet::EfficientNet::load(&cfg, weights)?));
    }
    if let Some(mut cfg) = coatnet::Config::by_name(architecture) {
        if input_size.0 != input_size.1 {
            bail!("{architecture} needs a square input, not {input_size:?}");
        }
        cfg.num_classes = num_classes;
        cfg.img_size = input_size.0 as i64;
        return Ok(Box::new(coatnet::CoAtNet::load(&cfg, weights.root())?));
    }
    bail!(
        "architecture {architecture:?} has no native implementation (native: {}); export it to \
         TorchScript with weights/export.py and serve model.pt",
        native_architectures().collect::<Vec<_>>().join(", ")
    )
}
