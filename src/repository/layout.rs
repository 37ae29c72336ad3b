//! A model folder on disk: which files it holds ([`WEIGHT_FILES`], [`CONFIG_FILE`]), their
//! [`WeightsFormat`], locating them ([`ModelFiles`]) and the built-in preprocessing for weights
//! that come without a config.json.

use super::config::{HubConfig, PretrainedCfg};
use std::path::{Path, PathBuf};

/// Weight files we look for in a model folder, in order of preference.
pub const WEIGHT_FILES: [&str; 3] = ["model.safetensors", "pytorch_model.bin", "model.pt"];
pub const CONFIG_FILE: &str = "config.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
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
        // timm's training checkpoints are `*.pth.tar`: a torch.save file despite the name
        // (`extension()` would only see "tar").
        if name.ends_with(".pth.tar") {
            return Some(Self::Pickle);
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext {
            "safetensors" => Some(Self::SafeTensors),
            "bin" | "pth" => Some(Self::Pickle),
            "pt" | "torchscript" | "ts" if name != "pytorch_model.pt" => Some(Self::TorchScript),
            _ => None,
        }
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
        match arch {
            Some(arch) if config_path.is_file() && config.architecture != arch => {
                return Err(format!(
                    "?arch={arch} conflicts with {}, which names {:?}; drop ?arch= or correct config.json",
                    config_path.display(),
                    config.architecture
                ))
            }
            Some(arch) => config.architecture = arch.to_owned(),
            None => {}
        }
        Ok(Self {
            dir,
            config,
            weights,
            format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::config::V2S;

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
        assert_eq!(
            WeightsFormat::from_path(Path::new("a/model_best.pth.tar")),
            Some(WeightsFormat::Pickle)
        );
        assert_eq!(WeightsFormat::from_path(Path::new("a/x.tar")), None);
        assert_eq!(WeightsFormat::from_path(Path::new("a/x.onnx")), None);
    }

    #[test]
    fn arch_must_agree_with_config_json() {
        let dir = std::env::temp_dir().join(format!("vs-arch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), V2S).unwrap();
        std::fs::write(dir.join("model.safetensors"), b"").unwrap();
        let same = ModelFiles::locate_with(&dir, Some("tf_efficientnetv2_s"));
        assert_eq!(same.unwrap().config.architecture, "tf_efficientnetv2_s");
        let err = ModelFiles::locate_with(&dir, Some("tf_efficientnetv2_m")).unwrap_err();
        assert!(err.contains("conflicts with"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
