//! timm's `config.json` schema ([`HubConfig`], `pretrained_cfg`) and its resolution into the
//! [`ModelConfig`] a model is served with (input size, crop, normalisation, labels).

use crate::images::preprocess::{CropMode, PreprocessConfig};
use crate::images::resize::Filter;
use crate::labels;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Per-model options (`--model NAME=SOURCE?opt=value`, the management API's `options`): what
/// a deployment changes about a checkpoint's own config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelOptions {
    /// Serve at this square input size instead of the checkpoint's default.
    pub input_size: Option<usize>,
    /// The architecture, for weight files that come without a config.json.
    pub arch: Option<String>,
    /// What runs it, instead of `--backend`.
    pub backend: Option<crate::config::Backend>,
    /// Decode large JPEGs smaller, instead of `--jpeg-draft`.
    pub jpeg_draft: Option<bool>,
    /// Instead of `--dtype`.
    pub dtype: Option<crate::config::DType>,
    /// Instead of `--max-batch-size`.
    pub max_batch_size: Option<usize>,
    /// Instead of `--max-batch-delay-ms`.
    pub max_batch_delay_ms: Option<u64>,
    /// Instead of `--instances`.
    pub instances: Option<crate::config::Instances>,
}

/// `config.json` as timm writes it (`timm.models._hub.save_for_hf`).
#[derive(Debug, Clone, Deserialize)]
pub struct HubConfig {
    pub architecture: String,
    #[serde(default)]
    pub num_classes: Option<usize>,
    #[serde(default)]
    pub num_features: Option<usize>,
    #[serde(default)]
    pub label_names: Option<Vec<String>>,
    #[serde(default)]
    pub label_descriptions: Option<LabelDescriptions>,
    pub pretrained_cfg: PretrainedCfg,
}

/// timm writes descriptions as a map from label name to text; accept a plain list too.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum LabelDescriptions {
    List(Vec<String>),
    Map(BTreeMap<String, String>),
}

/// The `pretrained_cfg` fields that decide preprocessing (timm's names).
#[derive(Debug, Clone, Deserialize)]
pub struct PretrainedCfg {
    pub input_size: [usize; 3],
    #[serde(default)]
    pub test_input_size: Option<[usize; 3]>,
    #[serde(default)]
    pub fixed_input_size: bool,
    #[serde(default = "default_interpolation")]
    pub interpolation: String,
    #[serde(default = "default_crop_pct")]
    pub crop_pct: f64,
    /// Crop fraction for evaluation at `test_input_size` (timm's `use_test_size`).
    #[serde(default)]
    pub test_crop_pct: Option<f64>,
    #[serde(default)]
    pub crop_mode: Option<String>,
    pub mean: [f64; 3],
    pub std: [f64; 3],
    #[serde(default)]
    pub num_classes: Option<usize>,
    #[serde(default)]
    pub tag: Option<String>,
}

fn default_interpolation() -> String {
    "bicubic".into()
}

fn default_crop_pct() -> f64 {
    0.875
}

/// Everything the server needs to know about a model before loading its weights.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: String,
    pub tag: Option<String>,
    pub num_classes: usize,
    pub labels: Vec<String>,
    pub preprocess: PreprocessConfig,
    /// Whether the architecture only works at its trained size (CoAtNet's attention windows).
    pub fixed_input_size: bool,
}

impl HubConfig {
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a valid config.json: {e}", path.display()))
    }

    /// Resolve the served configuration: the test-time input size unless overridden, labels
    /// from the config or the built-in sets.
    pub fn resolve(&self, options: &ModelOptions) -> Result<ModelConfig, String> {
        let cfg = &self.pretrained_cfg;
        let num_classes = self
            .num_classes
            .or(cfg.num_classes)
            .ok_or("config.json has no num_classes")?;
        let default_size = match cfg.test_input_size {
            Some(test) if !cfg.fixed_input_size => test,
            _ => cfg.input_size,
        };
        // As timm's resolve_data_config(use_test_size=True): the test-time crop goes with the
        // test-time size; an explicit size gets the training crop.
        let crop_pct = match options.input_size {
            None => cfg.test_crop_pct.unwrap_or(cfg.crop_pct),
            Some(_) => cfg.crop_pct,
        };
        let (height, width) = match options.input_size {
            Some(size) => {
                if cfg.fixed_input_size && size != cfg.input_size[1] {
                    return Err(format!(
                        "{} only works at its trained input size {} (fixed_input_size), not {size}",
                        self.architecture, cfg.input_size[1]
                    ));
                }
                (size, size)
            }
            None => (default_size[1], default_size[2]),
        };
        if default_size[0] != 3 {
            return Err(format!(
                "only 3-channel inputs are supported, config has {}",
                default_size[0]
            ));
        }
        let interpolation = match cfg.interpolation.as_str() {
            "bicubic" => Filter::Bicubic,
            "bilinear" => Filter::Bilinear,
            other => {
                return Err(format!(
                    "interpolation {other:?} is not supported (bicubic, bilinear)"
                ))
            }
        };
        let crop_mode = match cfg.crop_mode.as_deref() {
            None | Some("center") => CropMode::Center,
            Some("squash") => CropMode::Squash,
            Some(other) => {
                return Err(format!(
                    "crop_mode {other:?} is not supported (center, squash)"
                ))
            }
        };
        if !(crop_pct > 0.0 && crop_pct <= 4.0) {
            return Err(format!("crop_pct {crop_pct} is out of range"));
        }
        if cfg.std.iter().any(|&s| s <= 0.0) {
            return Err("std must be positive".into());
        }
        let labels = self.labels(num_classes)?;
        Ok(ModelConfig {
            architecture: self.architecture.clone(),
            tag: cfg.tag.clone(),
            num_classes,
            labels,
            fixed_input_size: cfg.fixed_input_size,
            preprocess: PreprocessConfig {
                input_size: (height, width),
                interpolation,
                crop_pct,
                crop_mode,
                mean: cfg.mean.map(|v| v as f32),
                std: cfg.std.map(|v| v as f32),
                // The server's --jpeg-draft fills an unset option before resolving.
                jpeg_draft: options.jpeg_draft.unwrap_or(false),
            },
        })
    }

    fn labels(&self, num_classes: usize) -> Result<Vec<String>, String> {
        let labels = match (&self.label_descriptions, &self.label_names) {
            (Some(LabelDescriptions::List(list)), _) => list.clone(),
            (Some(LabelDescriptions::Map(map)), Some(names)) => names
                .iter()
                .map(|n| map.get(n).cloned().unwrap_or_else(|| n.clone()))
                .collect(),
            (_, Some(names)) => names.clone(),
            (Some(LabelDescriptions::Map(_)), None) | (None, None) => {
                labels::builtin(num_classes).unwrap_or_else(|| labels::numbered(num_classes))
            }
        };
        if labels.len() != num_classes {
            return Err(format!(
                "config.json lists {} labels for {num_classes} classes",
                labels.len()
            ));
        }
        Ok(labels)
    }
}

/// timm's config.json for `tf_efficientnetv2_s.in1k`; `layout`'s tests use it too.
#[cfg(test)]
pub(super) const V2S: &str = r#"{"architecture":"tf_efficientnetv2_s","num_classes":1000,"num_features":1280,
        "pretrained_cfg":{"tag":"in1k","custom_load":false,"input_size":[3,300,300],
        "test_input_size":[3,384,384],"fixed_input_size":false,"interpolation":"bicubic",
        "crop_pct":1.0,"crop_mode":"center","mean":[0.5,0.5,0.5],"std":[0.5,0.5,0.5],
        "num_classes":1000,"pool_size":[10,10],"first_conv":"conv_stem","classifier":"classifier"}}"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> HubConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn serves_at_the_test_size_unless_told_otherwise() {
        let cfg = config(V2S);
        let resolved = cfg.resolve(&ModelOptions::default()).unwrap();
        assert_eq!(resolved.preprocess.input_size, (384, 384));
        assert_eq!(resolved.labels[282], "tiger cat");
        let opts = ModelOptions {
            input_size: Some(300),
            ..ModelOptions::default()
        };
        assert_eq!(
            cfg.resolve(&opts).unwrap().preprocess.input_size,
            (300, 300)
        );
    }

    #[test]
    fn the_test_crop_goes_with_the_test_size() {
        let json = V2S.replace(
            r#""crop_pct":1.0,"#,
            r#""crop_pct":0.9,"test_crop_pct":0.95,"#,
        );
        let cfg = config(&json);
        assert_eq!(
            cfg.resolve(&ModelOptions::default())
                .unwrap()
                .preprocess
                .crop_pct,
            0.95
        );
        let opts = ModelOptions {
            input_size: Some(300),
            ..ModelOptions::default()
        };
        assert_eq!(cfg.resolve(&opts).unwrap().preprocess.crop_pct, 0.9);
    }

    #[test]
    fn fixed_size_models_refuse_other_sizes() {
        let json = V2S.replace(r#""fixed_input_size":false"#, r#""fixed_input_size":true"#);
        let cfg = config(&json);
        assert_eq!(
            cfg.resolve(&ModelOptions::default())
                .unwrap()
                .preprocess
                .input_size,
            (300, 300)
        );
        let opts = ModelOptions {
            input_size: Some(224),
            ..ModelOptions::default()
        };
        assert!(cfg.resolve(&opts).unwrap_err().contains("fixed_input_size"));
    }

    #[test]
    fn labels_come_from_the_config_when_present() {
        let json = r#"{"architecture":"x","num_classes":2,"label_names":["n1","n2"],
            "label_descriptions":{"n1":"cat","n2":"dog"},
            "pretrained_cfg":{"input_size":[3,8,8],"mean":[0,0,0],"std":[1,1,1]}}"#;
        let resolved = config(json).resolve(&ModelOptions::default()).unwrap();
        assert_eq!(resolved.labels, vec!["cat", "dog"]);
        assert_eq!(resolved.preprocess.crop_pct, 0.875);
        let bad = json.replace(r#""num_classes":2"#, r#""num_classes":3"#);
        assert!(config(&bad)
            .resolve(&ModelOptions::default())
            .unwrap_err()
            .contains("3 classes"));
    }
}
