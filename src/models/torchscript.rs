//! Any TorchScript classifier (`torch.jit.save`), e.g. a timm or torchvision model exported by
//! `weights/export.py`. The module is run as is, in eval mode.

use super::{Classifier, Forward};
use anyhow::{Context, Result};
use std::path::Path;
use tch::{CModule, Device, Kind, Tensor};

pub struct TorchScriptModel {
    module: CModule,
}

impl TorchScriptModel {
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let mut module = CModule::load_on_device(path, device)
            .with_context(|| format!("loading TorchScript module {}", path.display()))?;
        module.f_set_eval()?;
        if kind != Kind::Float {
            module.to(device, kind, false);
        }
        Ok(Self { module })
    }
}

impl Classifier for TorchScriptModel {
    /// A TorchScript module is opaque: its `forward` gives logits, and nothing says which of its
    /// inner values are the embeddings.
    fn forward_with_embeddings(&self, input: &Tensor) -> Result<Forward> {
        Ok(Forward {
            logits: self.module.forward_ts(&[input])?,
            embeddings: None,
        })
    }

    fn implementation(&self) -> &'static str {
        "torchscript"
    }
}
