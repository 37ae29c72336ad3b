//! The released timm checkpoints the native architectures serve, with the preprocessing each
//! was evaluated with (`pretrained_cfg`), for `visionserve models`. The served preprocessing
//! always comes from the checkpoint's own config.json; this table only tells users what to
//! expect. Sources: timm's default cfgs (`timm/models/efficientnet.py`, `maxxvit.py`) and the
//! `config.json` of each `timm/<architecture>.<tag>` repository on the Hugging Face Hub.

/// One released checkpoint: `timm/<repo>` on the Hugging Face Hub.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Checkpoint {
    /// `<architecture>.<tag>`.
    pub repo: &'static str,
    pub input: u32,
    /// timm's `test_input_size` (validate.py `--use-test-size`), where the checkpoint has one.
    pub test_input: Option<u32>,
    pub crop_pct: f64,
    pub crop_mode: &'static str,
    pub interpolation: &'static str,
    /// `imagenet` (mean 0.485,0.456,0.406, std 0.229,0.224,0.225) or `0.5/0.5`.
    pub normalization: &'static str,
}

impl Checkpoint {
    pub fn architecture(&self) -> &'static str {
        self.repo
            .split_once('.')
            .map_or(self.repo, |(arch, _)| arch)
    }
}

const fn ckpt(
    repo: &'static str,
    input: u32,
    test_input: Option<u32>,
    crop_pct: f64,
    crop_mode: &'static str,
    normalization: &'static str,
) -> Checkpoint {
    Checkpoint {
        repo,
        input,
        test_input,
        crop_pct,
        crop_mode,
        interpolation: "bicubic",
        normalization,
    }
}

const IMAGENET: &str = "imagenet";
const HALF: &str = "0.5/0.5";

pub const CHECKPOINTS: &[Checkpoint] = &[
    ckpt(
        "tf_efficientnet_lite0.in1k",
        224,
        None,
        0.875,
        "center",
        HALF,
    ),
    ckpt(
        "efficientnetv2_rw_t.ra2_in1k",
        224,
        Some(288),
        1.0,
        "center",
        IMAGENET,
    ),
    ckpt(
        "efficientnetv2_rw_s.ra2_in1k",
        288,
        Some(384),
        1.0,
        "center",
        IMAGENET,
    ),
    ckpt(
        "efficientnetv2_rw_m.agc_in1k",
        320,
        Some(416),
        1.0,
        "center",
        IMAGENET,
    ),
    ckpt(
        "tf_efficientnetv2_s.in21k_ft_in1k",
        300,
        Some(384),
        1.0,
        "center",
        HALF,
    ),
    ckpt(
        "tf_efficientnetv2_s.in1k",
        300,
        Some(384),
        1.0,
        "center",
        HALF,
    ),
    ckpt(
        "tf_efficientnetv2_s.in21k",
        300,
        Some(384),
        1.0,
        "center",
        HALF,
    ),
    ckpt(
        "tf_efficientnetv2_m.in21k_ft_in1k",
        384,
        Some(480),
        1.0,
        "squash",
        HALF,
    ),
    ckpt(
        "tf_efficientnetv2_m.in1k",
        384,
        Some(480),
        1.0,
        "squash",
        HALF,
    ),
    ckpt(
        "tf_efficientnetv2_m.in21k",
        384,
        Some(480),
        1.0,
        "squash",
        HALF,
    ),
    ckpt(
        "tf_efficientnetv2_l.in21k_ft_in1k",
        384,
        Some(480),
        1.0,
        "squash",
        HALF,
    ),
    ckpt(
        "tf_efficientnetv2_l.in1k",
        384,
        Some(480),
        1.0,
        "squash",
        HALF,
    ),
    ckpt(
        "tf_efficientnetv2_l.in21k",
        384,
        Some(480),
        1.0,
        "squash",
        HALF,
    ),
    ckpt(
        "tf_efficientnetv2_xl.in21k_ft_in1k",
        384,
        Some(512),
        1.0,
        "squash",
        HALF,
    ),
    ckpt(
        "tf_efficientnetv2_xl.in21k",
        384,
        Some(512),
        1.0,
        "squash",
        HALF,
    ),
    ckpt(
        "tf_efficientnetv2_b0.in1k",
        192,
        Some(224),
        0.875,
        "center",
        IMAGENET,
    ),
    ckpt(
        "tf_efficientnetv2_b1.in1k",
        192,
        Some(240),
        0.882,
        "center",
        IMAGENET,
    ),
    ckpt(
        "tf_efficientnetv2_b2.in1k",
        208,
        Some(260),
        0.890,
        "center",
        IMAGENET,
    ),
    ckpt(
        "tf_efficientnetv2_b3.in21k_ft_in1k",
        240,
        Some(300),
        0.9,
        "squash",
        HALF,
    ),
    ckpt(
        "tf_efficientnetv2_b3.in1k",
        240,
        Some(300),
        0.904,
        "center",
        IMAGENET,
    ),
    ckpt(
        "tf_efficientnetv2_b3.in21k",
        240,
        Some(300),
        0.904,
        "center",
        HALF,
    ),
    ckpt(
        "coatnet_nano_rw_224.sw_in1k",
        224,
        None,
        0.9,
        "center",
        HALF,
    ),
    ckpt(
        "coatnet_rmlp_nano_rw_224.sw_in1k",
        224,
        None,
        0.9,
        "center",
        HALF,
    ),
    ckpt("coatnet_0_rw_224.sw_in1k", 224, None, 0.95, "center", HALF),
    ckpt(
        "coatnet_bn_0_rw_224.sw_in1k",
        224,
        None,
        0.95,
        "center",
        IMAGENET,
    ),
    ckpt("coatnet_1_rw_224.sw_in1k", 224, None, 0.95, "center", HALF),
    ckpt(
        "coatnet_rmlp_1_rw_224.sw_in1k",
        224,
        None,
        0.95,
        "center",
        HALF,
    ),
    ckpt(
        "coatnet_rmlp_1_rw2_224.sw_in12k_ft_in1k",
        224,
        None,
        0.95,
        "center",
        HALF,
    ),
    ckpt(
        "coatnet_rmlp_2_rw_224.sw_in1k",
        224,
        None,
        0.95,
        "center",
        HALF,
    ),
    ckpt(
        "coatnet_2_rw_224.sw_in12k_ft_in1k",
        224,
        None,
        0.95,
        "center",
        HALF,
    ),
    ckpt(
        "coatnet_rmlp_2_rw_224.sw_in12k_ft_in1k",
        224,
        None,
        0.95,
        "center",
        HALF,
    ),
    ckpt(
        "coatnet_rmlp_2_rw_384.sw_in12k_ft_in1k",
        384,
        None,
        1.0,
        "squash",
        HALF,
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_checkpoint_names_a_native_architecture() {
        let native: Vec<&str> = crate::models::native_architectures().collect();
        for checkpoint in CHECKPOINTS {
            assert!(
                native.contains(&checkpoint.architecture()),
                "{} has no native preset",
                checkpoint.repo
            );
        }
    }
}
