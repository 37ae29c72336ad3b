//! Where models come from: `--model` specs, Hub-layout folders and their `config.json`.
//!
//! A model is a folder in the Hugging Face Hub layout timm publishes (`timm/<model>.<tag>`):
//! `config.json` (`architecture`, `num_classes`, `pretrained_cfg`, optional `label_names`)
//! next to the weights: `model.safetensors` or `pytorch_model.bin` (a state dict for the
//! native architectures) or `model.pt` (TorchScript). Plain Rust: nothing here touches tch.
//!
//! Three parts, re-exported here so every item lives at `crate::repository::X`, each importing
//! only the ones below it:
//! - `spec`: the `--model NAME=SOURCE?opt=value` grammar ([`ModelSpec`]);
//! - `layout`: a model folder on disk ([`ModelFiles`], [`WeightsFormat`], [`WEIGHT_FILES`]);
//! - `config`: timm's `config.json` schema ([`HubConfig`]) resolved, with the deployment's
//!   [`ModelOptions`], into a [`ModelConfig`].
//!
//! [`scan_repository`] lists a `--model-repository` folder as specs.

mod config;
mod layout;
mod spec;

pub use config::{HubConfig, LabelDescriptions, ModelConfig, ModelOptions, PretrainedCfg};
pub use layout::{ModelFiles, WeightsFormat, CONFIG_FILE, WEIGHT_FILES};
pub use spec::{parse_options, ModelSpec};

use spec::default_name;
use std::path::Path;

/// The `--model-repository` folder: every subfolder with a config.json, by name.
pub fn scan_repository(root: &Path) -> Result<Vec<ModelSpec>, String> {
    let entries = std::fs::read_dir(root)
        .map_err(|e| format!("cannot read model repository {}: {e}", root.display()))?;
    let mut specs: Vec<ModelSpec> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join(CONFIG_FILE).is_file())
        .map(|p| ModelSpec {
            name: default_name(&p.to_string_lossy()),
            source: p.to_string_lossy().into_owned(),
            options: ModelOptions::default(),
        })
        .collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(specs)
}
