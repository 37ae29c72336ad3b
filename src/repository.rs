//! Where models come from: `--model` specs, Hub-layout folders and their `config.json`.
//!
//! A model is a folder in the Hugging Face Hub layout timm publishes (`timm/<model>.<tag>`):
//! `config.json` (`architecture`, `num_classes`, `pretrained_cfg`, optional `label_names`)
//! next to the weights: `model.safetensors` or `pytorch_model.bin` (a state dict for the
//! native architectures) or `model.pt` (TorchScript). Plain Rust: nothing here touches tch.

use crate::labels;
use crate::pipeline::preprocess::{CropMode, PreprocessConfig};
use crate::pipeline::resize::Filter;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Weight files we look for in a model folder, in order of preference.
pub const WEIGHT_FILES: [&str; 3] = ["model.safetensors", "pytorch_model.bin", "model.pt"];
pub const CONFIG_FILE: &str = "config.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightsFormat {
    /// A TorchScript module (`torch.jit.save`), run as is.
    TorchScript,
    /// A safetensors state dict for a native architecture.
    SafeTensors,
    /// A pickled state dict (`torch.save`: `pytorch_model.bin`, `.pth`).
    Pickle,
}

impl WeightsFormat {
    pub fn from_path(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_str()?;
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext {
            "safetensors" => Some(Self::SafeTensors),
            "bin" | "pth" | "pth.tar" => Some(Self::Pickle),
            "pt" | "torchscript" | "ts" if name != "pytorch_model.pt" => Some(Self::TorchScript),
            _ => None,
        }
    }
}

/// One `--model` argument: `NAME=SOURCE?opt=value&...` or `SOURCE`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub source: String,
    pub options: ModelOptions,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelOptions {
    /// Serve at this square input size instead of the checkpoint's default.
    pub input_size: Option<usize>,
    /// The architecture, for weight files that come without a config.json.
    pub arch: Option<String>,
}

impl ModelSpec {
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (name_and_source, query) = match spec.split_once('?') {
            Some((head, query)) => (head, Some(query)),
            None => (spec, None),
        };
        let (name, source) = match name_and_source.split_once('=') {
            Some((name, source)) if !name.contains('/') && !name.contains(':') => {
                (name.to_owned(), source.to_owned())
            }
            _ => (default_name(name_and_source), name_and_source.to_owned()),
        };
        if name.is_empty() || source.is_empty() {
            return Err(format!("--model {spec:?}: expected NAME=SOURCE or SOURCE"));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "--model {spec:?}: model names may only use letters, digits, '-', '_' and '.'"
            ));
        }
        let options = query.map(parse_options).transpose()?.unwrap_or_default();
        Ok(Self {
            name,
            source,
            options,
        })
    }
}

fn parse_options(query: &str) -> Result<ModelOptions, String> {
    let mut options = ModelOptions::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("model option {pair:?} is not key=value"))?;
        match key {
            "input_size" => {
                let size: usize = value
                    .parse()
                    .map_err(|_| format!("input_size must be a positive integer, not {value:?}"))?;
                if !(16..=4096).contains(&size) {
                    return Err(format!("input_size {size} is outside 16..=4096"));
                }
                options.input_size = Some(size);
            }
            "arch" => options.arch = Some(value.to_owned()),
            _ => {
                return Err(format!(
                    "unknown model option {key:?} (known: input_size, arch)"
                ))
            }
        }
    }
    Ok(options)
}

/// A name for a model given only by its source: the folder name, or the Hub repo's model name
/// without its tag (`hf-hub:timm/tf_efficientnetv2_s.in1k` -> `tf_efficientnetv2_s`).
fn default_name(source: &str) -> String {
    if let Some(repo) = source.strip_prefix("hf-hub:") {
        let repo = repo.split('@').next().unwrap_or(repo);
        let model = repo.rsplit('/').next().unwrap_or(repo);
        return model.split('.').next().unwrap_or(model).to_owned();
    }
    let path = Path::new(source.trim_end_matches('/'));
    let path = if WeightsFormat::from_path(path).is_some() {
        path.parent().unwrap_or(path)
    } else {
        path
    };
    path.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model")
        .to_owned()
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

/// A model's files on disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: HubConfig,
    pub weights: PathBuf,
    pub format: WeightsFormat,
}

/// Preprocessing for weight files that come without a config.json (torchvision's `.pth`, the
/// efficientnet_pytorch Lite weights): the values their own libraries evaluate with.
fn builtin_config(architecture: &str) -> Option<HubConfig> {
    let imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
    let half = ([0.5; 3], [0.5; 3]);
    // torchvision's Resize(s) + CenterCrop(s) is crop_pct 1.0.
    let (size, interpolation, crop_pct, (mean, std)) = match architecture {
        "efficientnet_v2_s" => (384, "bilinear", 1.0, imagenet),
        "efficientnet_v2_m" => (480, "bilinear", 1.0, imagenet),
        "efficientnet_v2_l" => (480, "bicubic", 1.0, half),
        "tf_efficientnet_lite0" => (224, "bicubic", 0.875, half),
        "tf_efficientnet_lite1" => (240, "bicubic", 0.882, half),
        "tf_efficientnet_lite2" => (260, "bicubic", 0.89, half),
        "tf_efficientnet_lite3" => (300, "bilinear", 0.904, half),
        "tf_efficientnet_lite4" => (380, "bilinear", 0.92, half),
        _ => return None,
    };
    Some(HubConfig {
        architecture: architecture.to_owned(),
        num_classes: Some(1000),
        num_features: None,
        label_names: None,
        label_descriptions: None,
        pretrained_cfg: PretrainedCfg {
            input_size: [3, size, size],
            test_input_size: None,
            fixed_input_size: false,
            interpolation: interpolation.to_owned(),
            crop_pct,
            test_crop_pct: None,
            crop_mode: Some("center".into()),
            mean,
            std,
            num_classes: Some(1000),
            tag: None,
        },
    })
}

impl ModelFiles {
    pub fn locate(source: &Path) -> Result<Self, String> {
        Self::locate_with(source, None)
    }

    /// Find the config and weights for a local SOURCE: a folder, or one weights file in one.
    /// `arch` overrides the config's architecture; a weights file without config.json needs
    /// it, naming an architecture whose preprocessing is built in.
    pub fn locate_with(source: &Path, arch: Option<&str>) -> Result<Self, String> {
        let (dir, weights) = if source.is_dir() {
            let weights = WEIGHT_FILES
                .iter()
                .map(|f| source.join(f))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    format!(
                        "{} holds none of {}",
                        source.display(),
                        WEIGHT_FILES.join(", ")
                    )
                })?;
            (source.to_path_buf(), weights)
        } else if source.is_file() {
            (
                source.parent().unwrap_or(Path::new(".")).to_path_buf(),
                source.to_path_buf(),
            )
        } else {
            return Err(format!("{} does not exist", source.display()));
        };
        let format = WeightsFormat::from_path(&weights).ok_or_else(|| {
            format!(
                "{}: unknown weights format (expected .safetensors, .bin/.pth or TorchScript .pt)",
                weights.display()
            )
        })?;
        let config_path = dir.join(CONFIG_FILE);
        let mut config = match arch {
            _ if config_path.is_file() => HubConfig::read(&config_path)?,
            Some(arch) => builtin_config(arch).ok_or_else(|| {
                format!(
                    "{} has no config.json and {arch:?} has no built-in preprocessing; add a config.json",
                    dir.display()
                )
            })?,
            None => {
                return Err(format!(
                    "{} has no config.json; add one (weights/export.py writes it) or name the \
                     architecture with ?arch=NAME",
                    dir.display()
                ))
            }
        };
        if let Some(arch) = arch {
            config.architecture = arch.to_owned();
        }
        Ok(Self {
            dir,
            config,
            weights,
            format,
        })
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_model_specs() {
        let s = ModelSpec::parse("lite0=weights/tf_efficientnet_lite0").unwrap();
        assert_eq!(
            (s.name.as_str(), s.source.as_str()),
            ("lite0", "weights/tf_efficientnet_lite0")
        );
        let s = ModelSpec::parse("weights/tf_efficientnet_lite0/").unwrap();
        assert_eq!(s.name, "tf_efficientnet_lite0");
        let s = ModelSpec::parse("weights/tf_efficientnet_lite0/model.pt").unwrap();
        assert_eq!(s.name, "tf_efficientnet_lite0");
        let s = ModelSpec::parse("hf-hub:timm/tf_efficientnetv2_s.in21k_ft_in1k?input_size=300")
            .unwrap();
        assert_eq!(s.name, "tf_efficientnetv2_s");
        assert_eq!(s.source, "hf-hub:timm/tf_efficientnetv2_s.in21k_ft_in1k");
        assert_eq!(s.options.input_size, Some(300));
        assert!(ModelSpec::parse("m=x?size=3")
            .unwrap_err()
            .contains("unknown model option"));
        assert!(ModelSpec::parse("bad name=x").is_err());
    }

    fn config(json: &str) -> HubConfig {
        serde_json::from_str(json).unwrap()
    }

    const V2S: &str = r#"{"architecture":"tf_efficientnetv2_s","num_classes":1000,"num_features":1280,
        "pretrained_cfg":{"tag":"in1k","custom_load":false,"input_size":[3,300,300],
        "test_input_size":[3,384,384],"fixed_input_size":false,"interpolation":"bicubic",
        "crop_pct":1.0,"crop_mode":"center","mean":[0.5,0.5,0.5],"std":[0.5,0.5,0.5],
        "num_classes":1000,"pool_size":[10,10],"first_conv":"conv_stem","classifier":"classifier"}}"#;

    #[test]
    fn serves_at_the_test_size_unless_told_otherwise() {
        let cfg = config(V2S);
        let resolved = cfg.resolve(&ModelOptions::default()).unwrap();
        assert_eq!(resolved.preprocess.input_size, (384, 384));
        assert_eq!(resolved.labels[282], "tiger cat");
        let opts = ModelOptions {
            input_size: Some(300),
            arch: None,
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
            arch: None,
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
            arch: None,
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

    #[test]
    fn recognises_weight_formats() {
        assert_eq!(
            WeightsFormat::from_path(Path::new("a/model.safetensors")),
            Some(WeightsFormat::SafeTensors)
        );
        assert_eq!(
            WeightsFormat::from_path(Path::new("a/pytorch_model.bin")),
            Some(WeightsFormat::Pickle)
        );
        assert_eq!(
            WeightsFormat::from_path(Path::new("a/model.pt")),
            Some(WeightsFormat::TorchScript)
        );
        assert_eq!(WeightsFormat::from_path(Path::new("a/x.onnx")), None);
    }
}
