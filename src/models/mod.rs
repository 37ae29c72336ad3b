//! Model architectures and loading: everything that builds a network on libtorch.
//!
//! A served model is a [`Classifier`]: normalised NCHW images in, logits out. TorchScript
//! exports run through [`torchscript`]; the native families are implemented one file each
//! ([`efficientnet`] for EfficientNet V1, Lite and V2; [`coatnet`] for CoAtNet and CoAtNeXt),
//! with module paths equal to the checkpoint keys and presets named after the checkpoints,
//! sharing the inference-only layers in [`layers`]. [`weights`] reads checkpoints by key, and
//! [`catalog`] lists the released checkpoints for `visionserve models`.
//!
//! A native family describes its forward pass once, against [`ops::Ops`]: [`ops::Eager`] runs
//! it on libtorch (the `torch` backend, the reference), and [`onnx::Graph`] records it as an
//! ONNX graph (the `openvino` backend, and `visionserve export`).

pub mod catalog;
pub mod coatnet;
pub mod efficientnet;
pub mod layers;
pub mod onnx;
pub mod ops;
pub mod torchscript;
pub mod weights;

use crate::repository::{ModelFiles, WeightsFormat};
use anyhow::{bail, Context, Result};
use ops::{Eager, Ops};
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

    /// What the model is, for `/v1/models`: `native` (this crate's definition of the
    /// architecture) or `torchscript` (an opaque export).
    fn implementation(&self) -> &'static str;

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

/// What a native network's forward pass gives, in the values of whatever runs it.
pub struct NetworkOutput<V> {
    /// `[batch, num_classes]`.
    pub logits: V,
    /// `[batch, features]`: the pooled features before the classifier, as timm's
    /// `forward_head(x, pre_logits=True)` returns them.
    pub embeddings: V,
}

/// A native architecture built from its checkpoint: one of this folder's families.
pub enum Network {
    EfficientNet(Box<efficientnet::EfficientNet>),
    CoAtNet(Box<coatnet::CoAtNet>),
}

impl Network {
    /// The forward pass, run or recorded by `o`.
    pub fn forward<O: Ops>(&self, o: &mut O, input: &O::Value) -> NetworkOutput<O::Value> {
        match self {
            Network::EfficientNet(net) => net.forward(o, input),
            Network::CoAtNet(net) => net.forward(o, input),
        }
    }

    /// Build `architecture` from a state dict (`files`), with its weights on `device` in
    /// precision `kind`. `input_size` is the (height, width) it will be served at: CoAtNet's
    /// attention windows are built for it.
    pub fn load(
        files: &ModelFiles,
        num_classes: usize,
        input_size: (usize, usize),
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let architecture = files.config.architecture.as_str();
        let mut weights = Weights::load(&files.weights, files.format, device, kind)?;
        let network = build_native(architecture, num_classes as i64, input_size, &mut weights)
            .with_context(|| format!("building {architecture} from {}", files.weights.display()))?;
        weights
            .finish()
            .with_context(|| format!("loading {}", files.weights.display()))?;
        Ok(network)
    }

    /// The network as an ONNX graph for inputs of `input_size`, the batch left free.
    /// `metadata` goes into the model's `metadata_props`.
    pub fn to_onnx(
        &self,
        name: &str,
        input_size: (usize, usize),
        metadata: &[(&str, String)],
    ) -> onnx::OnnxModel {
        let mut graph = onnx::Graph::default();
        let input = onnx::Graph::input(input_size.0 as i64, input_size.1 as i64);
        let output = self.forward(&mut graph, &input);
        graph.finish(name, &input, output.logits, output.embeddings, metadata)
    }
}

impl Classifier for Network {
    fn forward_with_embeddings(&self, input: &Tensor) -> Result<Forward> {
        let output = self.forward(&mut Eager, input);
        Ok(Forward {
            logits: output.logits,
            embeddings: Some(output.embeddings),
        })
    }

    fn implementation(&self) -> &'static str {
        "native"
    }

    fn wants_channels_last(&self) -> bool {
        true
    }
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
        WeightsFormat::SafeTensors | WeightsFormat::Pickle => Ok(Box::new(Network::load(
            files,
            num_classes,
            input_size,
            device,
            kind,
        )?)),
    }
}

fn build_native(
    architecture: &str,
    num_classes: i64,
    input_size: (usize, usize),
    weights: &mut Weights,
) -> Result<Network> {
    if let Some(mut cfg) = efficientnet::Config::by_name(architecture) {
        cfg.num_classes = num_classes;
        return Ok(Network::EfficientNet(Box::new(
            efficientnet::EfficientNet::load(&cfg, weights)?,
        )));
    }
    if let Some(mut cfg) = coatnet::Config::by_name(architecture) {
        if input_size.0 != input_size.1 {
            bail!("{architecture} needs a square input, not {input_size:?}");
        }
        cfg.num_classes = num_classes;
        cfg.img_size = input_size.0 as i64;
        return Ok(Network::CoAtNet(Box::new(coatnet::CoAtNet::load(
            &cfg,
            weights.root(),
        )?)));
    }
    bail!(
        "architecture {architecture:?} has no native implementation (native: {}); export it to \
         TorchScript with weights/export.py and serve model.pt",
        native_architectures().collect::<Vec<_>>().join(", ")
    )
}
