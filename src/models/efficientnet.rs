//! EfficientNet V1, EfficientNet-Lite and EfficientNetV2, natively on libtorch.
//!
//! Papers: Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks"
//! (ICML 2019, arXiv:1905.11946) and "EfficientNetV2: Smaller Models and Faster Training"
//! (ICML 2021, arXiv:2104.00298). Reference implementation mirrored here: timm
//! (`timm/models/efficientnet.py`, `_efficientnet_builder.py`, `_efficientnet_blocks.py`),
//! whose block strings, channel rounding, depth scaling, SE widths, TF "SAME" padding and
//! BatchNorm epsilons are reproduced exactly; torchvision's `efficientnet_v2_*` is the same
//! network as timm's `efficientnetv2_*` with BatchNorm eps 1e-3, and its checkpoints are renamed
//! onto timm's keys, as are efficientnet_pytorch's (`_blocks.N._bn1`).
//!
//! Module paths equal timm's checkpoint keys (`blocks.3.0.conv_pw`), so a Hub
//! `model.safetensors` loads without a renaming table. Presets are named after timm's models.

use super::layers::{
    make_divisible, timm_padding, Act, Conv2d, ConvSpec, GlobalContext, Linear, Padding,
    SqueezeExcite,
};
use super::ops::Ops;
use super::weights::{KeyPath, Scope, Weights};
use super::NetworkOutput;
use anyhow::{bail, Context, Result};

/// How each stage's channel attention is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attention {
    SqueezeExcite,
    /// timm's `GlobalContext` (`se_layer='gc'`).
    GlobalContext,
}

/// Whose key names a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStyle {
    Timm,
    /// torchvision `efficientnet_v2_*` (`features.3.0.block.1.0.weight`).
    Torchvision,
    /// efficientnet_pytorch (`_blocks.3._depthwise_conv.weight`).
    EfficientNetPyTorch,
}

/// An architecture: timm's generator arguments, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// One timm block string per stage, e.g. `ir_r3_k5_s2_e6_c40_se0.25`.
    pub stages: Vec<&'static str>,
    pub channel_multiplier: f64,
    /// Per-stage depth multipliers.
    pub depth_multiplier: Vec<f64>,
    /// Lite: the first and last stages keep their depth.
    pub fix_first_last_depth: bool,
    /// `round_channels`'s round_limit: 0.9, or 0 for the V2 base (B0-B3) generator.
    pub round_limit: f64,
    pub stem_size: i64,
    /// Lite: the stem keeps 32 channels whatever the multiplier.
    pub fix_stem: bool,
    pub num_features: i64,
    pub scale_num_features: bool,
    pub act: Act,
    pub bn_eps: f64,
    /// TF "SAME" padding (the `tf_` ports).
    pub tf_same_padding: bool,
    pub attention: Attention,
    pub num_classes: i64,
}

const V1_STAGES: [&str; 7] = [
    "ds_r1_k3_s1_e1_c16_se0.25",
    "ir_r2_k3_s2_e6_c24_se0.25",
    "ir_r2_k5_s2_e6_c40_se0.25",
    "ir_r3_k3_s2_e6_c80_se0.25",
    "ir_r3_k5_s1_e6_c112_se0.25",
    "ir_r4_k5_s2_e6_c192_se0.25",
    "ir_r1_k3_s1_e6_c320_se0.25",
];
const LITE_STAGES: [&str; 7] = [
    "ds_r1_k3_s1_e1_c16",
    "ir_r2_k3_s2_e6_c24",
    "ir_r2_k5_s2_e6_c40",
    "ir_r3_k3_s2_e6_c80",
    "ir_r3_k5_s1_e6_c112",
    "ir_r4_k5_s2_e6_c192",
    "ir_r1_k3_s1_e6_c320",
];
const V2_BASE_STAGES: [&str; 6] = [
    "cn_r1_k3_s1_e1_c16_skip",
    "er_r2_k3_s2_e4_c32",
    "er_r2_k3_s2_e4_c48",
    "ir_r3_k3_s2_e4_c96_se0.25",
    "ir_r5_k3_s1_e6_c112_se0.25",
    "ir_r8_k3_s2_e6_c192_se0.25",
];
const V2_S_STAGES: [&str; 6] = [
    "cn_r2_k3_s1_e1_c24_skip",
    "er_r4_k3_s2_e4_c48",
    "er_r4_k3_s2_e4_c64",
    "ir_r6_k3_s2_e4_c128_se0.25",
    "ir_r9_k3_s1_e6_c160_se0.25",
    "ir_r15_k3_s2_e6_c256_se0.25",
];
/// Ross Wightman's original V2-S reading of the paper (`rw=True`).
const V2_S_RW_STAGES: [&str; 6] = [
    "er_r2_k3_s1_e1_c24",
    "er_r4_k3_s2_e4_c48",
    "er_r4_k3_s2_e4_c64",
    "ir_r6_k3_s2_e4_c128_se0.25",
    "ir_r9_k3_s1_e6_c160_se0.25",
    "ir_r15_k3_s2_e6_c272_se0.25",
];
const V2_M_STAGES: [&str; 7] = [
    "cn_r3_k3_s1_e1_c24_skip",
    "er_r5_k3_s2_e4_c48",
    "er_r5_k3_s2_e4_c80",
    "ir_r7_k3_s2_e4_c160_se0.25",
    "ir_r14_k3_s1_e6_c176_se0.25",
    "ir_r18_k3_s2_e6_c304_se0.25",
    "ir_r5_k3_s1_e6_c512_se0.25",
];
const V2_L_STAGES: [&str; 7] = [
    "cn_r4_k3_s1_e1_c32_skip",
    "er_r7_k3_s2_e4_c64",
    "er_r7_k3_s2_e4_c96",
    "ir_r10_k3_s2_e4_c192_se0.25",
    "ir_r19_k3_s1_e6_c224_se0.25",
    "ir_r25_k3_s2_e6_c384_se0.25",
    "ir_r7_k3_s1_e6_c640_se0.25",
];
const V2_XL_STAGES: [&str; 7] = [
    "cn_r4_k3_s1_e1_c32_skip",
    "er_r8_k3_s2_e4_c64",
    "er_r8_k3_s2_e4_c96",
    "ir_r16_k3_s2_e4_c192_se0.25",
    "ir_r24_k3_s1_e6_c256_se0.25",
    "ir_r32_k3_s2_e6_c512_se0.25",
    "ir_r8_k3_s1_e6_c640_se0.25",
];

/// timm's `BN_EPS_TF_DEFAULT`, also torchvision's EfficientNetV2 eps.
const TF_BN_EPS: f64 = 1e-3;
const TORCH_BN_EPS: f64 = 1e-5;

impl Config {
    fn base(stages: &[&'static str], cm: f64, dm: f64) -> Self {
        Self {
            stages: stages.to_vec(),
            channel_multiplier: cm,
            depth_multiplier: vec![dm; stages.len()],
            fix_first_last_depth: false,
            round_limit: 0.9,
            stem_size: 32,
            fix_stem: false,
            num_features: 1280,
            scale_num_features: true,
            act: Act::Silu,
            bn_eps: TORCH_BN_EPS,
            tf_same_padding: false,
            attention: Attention::SqueezeExcite,
            num_classes: 1000,
        }
    }

    /// The `tf_` ports: TF "SAME" padding and BatchNorm eps 1e-3.
    fn tf(mut self) -> Self {
        self.tf_same_padding = true;
        self.bn_eps = TF_BN_EPS;
        self
    }

    fn efficientnet(cm: f64, dm: f64) -> Self {
        Self::base(&V1_STAGES, cm, dm)
    }

    fn lite(cm: f64, dm: f64) -> Self {
        Self {
            fix_first_last_depth: true,
            fix_stem: true,
            scale_num_features: false,
            act: Act::Relu6,
            ..Self::base(&LITE_STAGES, cm, dm)
        }
        .tf()
    }

    fn v2_base(cm: f64, dm: f64) -> Self {
        Self {
            round_limit: 0.0,
            ..Self::base(&V2_BASE_STAGES, cm, dm)
        }
        .tf()
    }

    fn v2_s(stages: &[&'static str], cm: f64, dm: f64, num_features: i64) -> Self {
        Self {
            stem_size: 24,
            num_features,
            ..Self::base(stages, cm, dm)
        }
    }

    /// V2 M/L/XL: the head keeps 1280 channels.
    fn v2_large(stages: &[&'static str], stem_size: i64) -> Self {
        Self {
            stem_size,
            scale_num_features: false,
            ..Self::base(stages, 1.0, 1.0)
        }
    }

    pub fn efficientnet_b0() -> Self {
        Self::efficientnet(1.0, 1.0)
    }
    pub fn efficientnet_b1() -> Self {
        Self::efficientnet(1.0, 1.1)
    }
    pub fn efficientnet_b2() -> Self {
        Self::efficientnet(1.1, 1.2)
    }
    pub fn efficientnet_b3() -> Self {
        Self::efficientnet(1.2, 1.4)
    }
    pub fn tf_efficientnet_b0() -> Self {
        Self::efficientnet(1.0, 1.0).tf()
    }
    pub fn tf_efficientnet_b1() -> Self {
        Self::efficientnet(1.0, 1.1).tf()
    }
    pub fn tf_efficientnet_b2() -> Self {
        Self::efficientnet(1.1, 1.2).tf()
    }
    pub fn tf_efficientnet_b3() -> Self {
        Self::efficientnet(1.2, 1.4).tf()
    }
    pub fn tf_efficientnet_b4() -> Self {
        Self::efficientnet(1.4, 1.8).tf()
    }
    pub fn tf_efficientnet_b5() -> Self {
        Self::efficientnet(1.6, 2.2).tf()
    }
    pub fn tf_efficientnet_b6() -> Self {
        Self::efficientnet(1.8, 2.6).tf()
    }
    pub fn tf_efficientnet_b7() -> Self {
        Self::efficientnet(2.0, 3.1).tf()
    }
    pub fn tf_efficientnet_lite0() -> Self {
        Self::lite(1.0, 1.0)
    }
    pub fn tf_efficientnet_lite1() -> Self {
        Self::lite(1.0, 1.1)
    }
    pub fn tf_efficientnet_lite2() -> Self {
        Self::lite(1.1, 1.2)
    }
    pub fn tf_efficientnet_lite3() -> Self {
        Self::lite(1.2, 1.4)
    }
    pub fn tf_efficientnet_lite4() -> Self {
        Self::lite(1.4, 1.8)
    }
    pub fn tf_efficientnetv2_b0() -> Self {
        Self::v2_base(1.0, 1.0)
    }
    pub fn tf_efficientnetv2_b1() -> Self {
        Self::v2_base(1.0, 1.1)
    }
    pub fn tf_efficientnetv2_b2() -> Self {
        Self::v2_base(1.1, 1.2)
    }
    pub fn tf_efficientnetv2_b3() -> Self {
        Self::v2_base(1.2, 1.4)
    }
    pub fn tf_efficientnetv2_s() -> Self {
        Self::v2_s(&V2_S_STAGES, 1.0, 1.0, 1280).tf()
    }
    pub fn tf_efficientnetv2_m() -> Self {
        Self::v2_large(&V2_M_STAGES, 24).tf()
    }
    pub fn tf_efficientnetv2_l() -> Self {
        Self::v2_large(&V2_L_STAGES, 32).tf()
    }
    pub fn tf_efficientnetv2_xl() -> Self {
        Self::v2_large(&V2_XL_STAGES, 32).tf()
    }
    pub fn efficientnetv2_rw_t() -> Self {
        Self::v2_s(&V2_S_STAGES, 0.8, 0.9, 1280)
    }
    pub fn gc_efficientnetv2_rw_t() -> Self {
        Self {
            attention: Attention::GlobalContext,
            ..Self::efficientnetv2_rw_t()
        }
    }
    pub fn efficientnetv2_rw_s() -> Self {
        Self::v2_s(&V2_S_RW_STAGES, 1.0, 1.0, 1792)
    }
    pub fn efficientnetv2_rw_m() -> Self {
        Self {
            depth_multiplier: vec![1.2, 1.2, 1.2, 1.2, 1.6, 1.6],
            ..Self::v2_s(&V2_S_RW_STAGES, 1.2, 1.0, 1792)
        }
    }
    /// torchvision `efficientnet_v2_s`: timm's V2-S with eps 1e-3 and symmetric padding.
    pub fn efficientnet_v2_s() -> Self {
        Self {
            bn_eps: TF_BN_EPS,
            ..Self::v2_s(&V2_S_STAGES, 1.0, 1.0, 1280)
        }
    }
    pub fn efficientnet_v2_m() -> Self {
        Self {
            bn_eps: TF_BN_EPS,
            ..Self::v2_large(&V2_M_STAGES, 24)
        }
    }
    pub fn efficientnet_v2_l() -> Self {
        Self {
            bn_eps: TF_BN_EPS,
            ..Self::v2_large(&V2_L_STAGES, 32)
        }
    }

    /// The preset named `architecture` (timm's model name, or torchvision's for
    /// `efficientnet_v2_*`).
    pub fn by_name(architecture: &str) -> Option<Self> {
        super::find_preset(PRESETS, architecture)
    }
}

/// Every architecture this file implements.
pub const PRESETS: &[super::Preset<Config>] = &[
    ("efficientnet_b0", Config::efficientnet_b0),
    ("efficientnet_b1", Config::efficientnet_b1),
    ("efficientnet_b2", Config::efficientnet_b2),
    ("efficientnet_b3", Config::efficientnet_b3),
    ("tf_efficientnet_b0", Config::tf_efficientnet_b0),
    ("tf_efficientnet_b1", Config::tf_efficientnet_b1),
    ("tf_efficientnet_b2", Config::tf_efficientnet_b2),
    ("tf_efficientnet_b3", Config::tf_efficientnet_b3),
    ("tf_efficientnet_b4", Config::tf_efficientnet_b4),
    ("tf_efficientnet_b5", Config::tf_efficientnet_b5),
    ("tf_efficientnet_b6", Config::tf_efficientnet_b6),
    ("tf_efficientnet_b7", Config::tf_efficientnet_b7),
    ("tf_efficientnet_lite0", Config::tf_efficientnet_lite0),
    ("tf_efficientnet_lite1", Config::tf_efficientnet_lite1),
    ("tf_efficientnet_lite2", Config::tf_efficientnet_lite2),
    ("tf_efficientnet_lite3", Config::tf_efficientnet_lite3),
    ("tf_efficientnet_lite4", Config::tf_efficientnet_lite4),
    ("tf_efficientnetv2_b0", Config::tf_efficientnetv2_b0),
    ("tf_efficientnetv2_b1", Config::tf_efficientnetv2_b1),
    ("tf_efficientnetv2_b2", Config::tf_efficientnetv2_b2),
    ("tf_efficientnetv2_b3", Config::tf_efficientnetv2_b3),
    ("tf_efficientnetv2_s", Config::tf_efficientnetv2_s),
    ("tf_efficientnetv2_m", Config::tf_efficientnetv2_m),
    ("tf_efficientnetv2_l", Config::tf_efficientnetv2_l),
    ("tf_efficientnetv2_xl", Config::tf_efficientnetv2_xl),
    ("efficientnetv2_rw_t", Config::efficientnetv2_rw_t),
    ("gc_efficientnetv2_rw_t", Config::gc_efficientnetv2_rw_t),
    ("efficientnetv2_rw_s", Config::efficientnetv2_rw_s),
    ("efficientnetv2_rw_m", Config::efficientnetv2_rw_m),
    ("efficientnet_v2_s", Config::efficientnet_v2_s),
    ("efficientnet_v2_m", Config::efficientnet_v2_m),
    ("efficientnet_v2_l", Config::efficientnet_v2_l),
];

// ---------------------------------------------------------------------------------------------
// Block strings and scaling rules (timm `_efficientnet_builder.py`)

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    /// `cn`: ConvBnAct.
    ConvBnAct,
    /// `ds`: depthwise-separable.
    DepthwiseSeparable,
    /// `er`: EdgeResidual, a.k.a. FusedMBConv.
    EdgeResidual,
    /// `ir`: InvertedResidual, a.k.a. MBConv.
    InvertedResidual,
}

/// One decoded block string.
#[derive(Debug, Clone, PartialEq)]
struct BlockDef {
    kind: BlockKind,
    repeats: usize,
    kernel: i64,
    stride: i64,
    exp_ratio: f64,
    out_channels: i64,
    se_ratio: f64,
    /// `_skip` forces a shortcut (cn), `_noskip` removes it (others).
    skip: Option<bool>,
}

fn parse_block(def: &str) -> Result<BlockDef> {
    let mut parts = def.split('_');
    let kind = match parts.next() {
        Some("cn") => BlockKind::ConvBnAct,
        Some("ds") => BlockKind::DepthwiseSeparable,
        Some("er") => BlockKind::EdgeResidual,
        Some("ir") => BlockKind::InvertedResidual,
        other => bail!("unsupported block type {other:?} in {def:?}"),
    };
    let mut block = BlockDef {
        kind,
        repeats: 1,
        kernel: 3,
        stride: 1,
        exp_ratio: 1.0,
        out_channels: 0,
        se_ratio: 0.0,
        skip: None,
    };
    for op in parts {
        match op {
            "skip" => block.skip = Some(true),
            "noskip" => block.skip = Some(false),
            _ => {
                let split = op
                    .find(|c: char| c.is_ascii_digit())
                    .with_context(|| format!("bad option {op:?} in {def:?}"))?;
                let (key, value) = op.split_at(split);
                match key {
                    "r" => block.repeats = value.parse()?,
                    "k" => block.kernel = value.parse()?,
                    "s" => block.stride = value.parse()?,
                    "e" => block.exp_ratio = value.parse()?,
                    "c" => block.out_channels = value.parse()?,
                    "se" => block.se_ratio = value.parse()?,
                    _ => bail!("unsupported option {op:?} in {def:?}"),
                }
            }
        }
    }
    Ok(block)
}

/// Python's `round` (half to even), as timm uses for SE widths.
fn round_half_even(value: f64) -> i64 {
    value.round_ties_even() as i64
}

impl Config {
    fn round_channels(&self, channels: i64) -> i64 {
        make_divisible(
            channels as f64 * self.channel_multiplier,
            8,
            self.round_limit,
        )
    }

    /// Blocks per stage after depth scaling: `ceil(repeats * multiplier)`.
    fn stage_depths(&self, defs: &[BlockDef]) -> Vec<usize> {
        let last = defs.len() - 1;
        defs.iter()
            .enumerate()
            .map(|(i, def)| {
                let fixed = self.fix_first_last_depth && (i == 0 || i == last);
                let multiplier = if fixed { 1.0 } else { self.depth_multiplier[i] };
                (def.repeats as f64 * multiplier).ceil() as usize
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Blocks

/// Channel attention after the depthwise (or expansion) convolution.
#[derive(Debug)]
enum ChannelAttention {
    Se(SqueezeExcite),
    Gc(Box<GlobalContext>),
}

impl ChannelAttention {
    /// `w`: the block's `se` module.
    fn load(w: Scope, cfg: &Config, channels: i64, rd_ratio: f64) -> Result<Self> {
        Ok(match cfg.attention {
            Attention::SqueezeExcite => {
                let reduced = round_half_even(channels as f64 * rd_ratio);
                Self::Se(SqueezeExcite::load(
                    w,
                    ("conv_reduce", "conv_expand"),
                    channels,
                    reduced,
                    cfg.act,
                )?)
            }
            Attention::GlobalContext => {
                let reduced = make_divisible(channels as f64 * rd_ratio, 1, 0.0);
                Self::Gc(Box::new(GlobalContext::load(
                    w, channels, reduced, cfg.act,
                )?))
            }
        })
    }

    fn forward<O: Ops>(&self, o: &mut O, x: &O::Value) -> O::Value {
        match self {
            Self::Se(se) => se.forward(o, x),
            Self::Gc(gc) => gc.forward(o, x),
        }
    }
}

/// One residual block; every convolution carries its folded BatchNorm.
#[derive(Debug)]
struct Block {
    /// `cn`: conv; `ds`: conv_dw; `er`: conv_exp; `ir`: conv_pw then conv_dw.
    convs: Vec<Conv2d>,
    attention: Option<ChannelAttention>,
    /// Pointwise projection without activation (`ds`: conv_pw, `er`/`ir`: conv_pwl).
    project: Option<Conv2d>,
    act: Act,
    skip: bool,
}

impl Block {
    fn forward<O: Ops>(&self, o: &mut O, x: &O::Value) -> O::Value {
        let mut y = o.share(x);
        for conv in &self.convs {
            let convolved = conv.forward(o, &y);
            y = self.act.apply(o, convolved);
        }
        if let Some(attention) = &self.attention {
            y = attention.forward(o, &y);
        }
        if let Some(project) = &self.project {
            y = project.forward(o, &y);
        }
        if self.skip {
            // `y` is this block's own output (every block has a convolution).
            y = o.add_into(y, x);
        }
        y
    }
}

struct BlockBuilder<'a> {
    cfg: &'a Config,
}

impl BlockBuilder<'_> {
    fn pad(&self, kernel: i64, stride: i64) -> Padding {
        timm_padding(self.cfg.tf_same_padding, kernel, stride, 1)
    }

    fn conv_bn(&self, conv: Scope, bn: Scope, spec: ConvSpec) -> Result<Conv2d> {
        Conv2d::load_with_batch_norm(conv, bn, spec, self.cfg.bn_eps)
    }

    fn attention(
        &self,
        w: Scope,
        def: &BlockDef,
        channels: i64,
    ) -> Result<Option<ChannelAttention>> {
        if def.se_ratio <= 0.0 {
            return Ok(None);
        }
        // The SE width is set from the block input: se_ratio / exp_ratio of the expanded width.
        let rd_ratio = def.se_ratio / def.exp_ratio;
        Ok(Some(ChannelAttention::load(
            w, self.cfg, channels, rd_ratio,
        )?))
    }

    /// The block under `w` (`blocks.{stage}.{index}`).
    fn build(&self, w: Scope, def: &BlockDef, in_ch: i64, stride: i64) -> Result<(Block, i64)> {
        let out = self.cfg.round_channels(def.out_channels);
        let (k, act) = (def.kernel, self.cfg.act);
        let block = match def.kind {
            BlockKind::ConvBnAct => Block {
                convs: vec![self.conv_bn(
                    w.pp("conv"),
                    w.pp("bn1"),
                    ConvSpec::new(in_ch, out, k, stride, self.pad(k, stride)),
                )?],
                attention: None,
                project: None,
                act,
                skip: def.skip == Some(true) && stride == 1 && in_ch == out,
            },
            BlockKind::DepthwiseSeparable => Block {
                convs: vec![self.conv_bn(
                    w.pp("conv_dw"),
                    w.pp("bn1"),
                    ConvSpec::depthwise(in_ch, k, stride, self.pad(k, stride)),
                )?],
                attention: self.attention(w.pp("se"), def, in_ch)?,
                project: Some(self.conv_bn(
                    w.pp("conv_pw"),
                    w.pp("bn2"),
                    ConvSpec::new(in_ch, out, 1, 1, Padding::Symmetric(0)),
                )?),
                act,
                skip: stride == 1 && in_ch == out && def.skip != Some(false),
            },
            BlockKind::EdgeResidual => {
                let mid = make_divisible(in_ch as f64 * def.exp_ratio, 8, 0.9);
                Block {
                    convs: vec![self.conv_bn(
                        w.pp("conv_exp"),
                        w.pp("bn1"),
                        ConvSpec::new(in_ch, mid, k, stride, self.pad(k, stride)),
                    )?],
                    attention: self.attention(w.pp("se"), def, mid)?,
                    project: Some(self.conv_bn(
                        w.pp("conv_pwl"),
                        w.pp("bn2"),
                        ConvSpec::new(mid, out, 1, 1, Padding::Symmetric(0)),
                    )?),
                    act,
                    skip: stride == 1 && in_ch == out && def.skip != Some(false),
                }
            }
            BlockKind::InvertedResidual => {
                let mid = make_divisible(in_ch as f64 * def.exp_ratio, 8, 0.9);
                let pw = self.conv_bn(
                    w.pp("conv_pw"),
                    w.pp("bn1"),
                    ConvSpec::new(in_ch, mid, 1, 1, Padding::Symmetric(0)),
                )?;
                let dw = self.conv_bn(
                    w.pp("conv_dw"),
                    w.pp("bn2"),
                    ConvSpec::depthwise(mid, k, stride, self.pad(k, stride)),
                )?;
                Block {
                    convs: vec![pw, dw],
                    attention: self.attention(w.pp("se"), def, mid)?,
                    project: Some(self.conv_bn(
                        w.pp("conv_pwl"),
                        w.pp("bn3"),
                        ConvSpec::new(mid, out, 1, 1, Padding::Symmetric(0)),
                    )?),
                    act,
                    skip: stride == 1 && in_ch == out && def.skip != Some(false),
                }
            }
        };
        Ok((block, out))
    }
}

// ---------------------------------------------------------------------------------------------
// The network

pub struct EfficientNet {
    conv_stem: Conv2d,
    blocks: Vec<Block>,
    conv_head: Conv2d,
    classifier: Linear,
    act: Act,
}

/// A resolved block: its kind and where it sits, for renaming other checkpoints' keys.
struct Layout {
    stages: Vec<(BlockKind, usize)>,
}

impl Config {
    fn block_defs(&self) -> Result<Vec<BlockDef>> {
        if self.depth_multiplier.len() != self.stages.len() {
            bail!("one depth multiplier per stage is required");
        }
        self.stages.iter().map(|s| parse_block(s)).collect()
    }

    fn layout(&self) -> Result<Layout> {
        let defs = self.block_defs()?;
        let depths = self.stage_depths(&defs);
        Ok(Layout {
            stages: defs.iter().zip(depths).map(|(d, n)| (d.kind, n)).collect(),
        })
    }
}

impl EfficientNet {
    /// Build `cfg` from a whole checkpoint, first renaming torchvision's or
    /// efficientnet_pytorch's keys to timm's.
    pub fn load(cfg: &Config, w: &mut Weights) -> Result<Self> {
        match key_style(w) {
            KeyStyle::Timm => {}
            KeyStyle::Torchvision => rename_torchvision(w, &cfg.layout()?)?,
            KeyStyle::EfficientNetPyTorch => rename_efficientnet_pytorch(w, &cfg.layout()?)?,
        }
        let w = w.root();
        let defs = cfg.block_defs()?;
        let depths = cfg.stage_depths(&defs);
        let stem = if cfg.fix_stem {
            cfg.stem_size
        } else {
            cfg.round_channels(cfg.stem_size)
        };
        let stem_pad = timm_padding(cfg.tf_same_padding, 3, 2, 1);
        let conv_stem = Conv2d::load_with_batch_norm(
            w.pp("conv_stem"),
            w.pp("bn1"),
            ConvSpec::new(3, stem, 3, 2, stem_pad),
            cfg.bn_eps,
        )?;

        let builder = BlockBuilder { cfg };
        let mut blocks = Vec::new();
        let mut channels = stem;
        for (stage, (def, depth)) in defs.iter().zip(&depths).enumerate() {
            for index in 0..*depth {
                // Only the first block of a stage strides.
                let stride = if index == 0 { def.stride } else { 1 };
                let (block, out) =
                    builder.build(w.pp("blocks").pp(stage).pp(index), def, channels, stride)?;
                blocks.push(block);
                channels = out;
            }
        }
        let features = if cfg.scale_num_features {
            cfg.round_channels(cfg.num_features)
        } else {
            cfg.num_features
        };
        let conv_head = Conv2d::load_with_batch_norm(
            w.pp("conv_head"),
            w.pp("bn2"),
            ConvSpec::new(channels, features, 1, 1, Padding::Symmetric(0)),
            cfg.bn_eps,
        )?;
        let classifier = Linear::load(w.pp("classifier"), features, cfg.num_classes, true)?;
        Ok(Self {
            conv_stem,
            blocks,
            conv_head,
            classifier,
            act: cfg.act,
        })
    }
}

impl EfficientNet {
    /// timm's `forward_features`, then `forward_head`: the embeddings are the pooled features
    /// (`pre_logits=True`), the logits the classifier applied to them.
    pub fn forward<O: Ops>(&self, o: &mut O, input: &O::Value) -> NetworkOutput<O::Value> {
        let x = self.conv_stem.forward(o, input);
        let mut x = self.act.apply(o, x);
        for block in &self.blocks {
            x = block.forward(o, &x);
        }
        let x = self.conv_head.forward(o, &x);
        let x = self.act.apply(o, x);
        let pooled = o.global_average_pool(&x);
        let pooled = o.flatten(&pooled);
        NetworkOutput {
            logits: self.classifier.forward(o, &pooled),
            embeddings: pooled,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Other checkpoints' key names

fn key_style(w: &Weights) -> KeyStyle {
    if w.contains("features.0.0.weight") {
        KeyStyle::Torchvision
    } else if w.contains("_conv_stem.weight") {
        KeyStyle::EfficientNetPyTorch
    } else {
        KeyStyle::Timm
    }
}

/// Rename keys by module prefix: `{from}.rest` becomes `{to}.rest` for the longest `from`.
fn rename_prefixes(w: &mut Weights, pairs: &[(KeyPath, KeyPath)]) -> Result<()> {
    w.rename(|key| {
        pairs
            .iter()
            .filter_map(|(from, to)| {
                let rest = key.strip_prefix(from.as_str())?.strip_prefix('.')?;
                Some((from.as_str().len(), to, rest))
            })
            .max_by_key(|(from_len, _, _)| *from_len)
            .map(|(_, to, rest)| to.pp(rest).into())
    })
}

fn rename_torchvision(w: &mut Weights, layout: &Layout) -> Result<()> {
    let root = KeyPath::root();
    let features = root.pp("features");
    let head = features.pp(layout.stages.len() + 1);
    let mut pairs = vec![
        (features.pp(0).pp(0), root.pp("conv_stem")),
        (features.pp(0).pp(1), root.pp("bn1")),
        (head.pp(0), root.pp("conv_head")),
        (head.pp(1), root.pp("bn2")),
        (root.pp("classifier").pp(1), root.pp("classifier")),
    ];
    for (stage, (kind, depth)) in layout.stages.iter().enumerate() {
        for index in 0..*depth {
            let tv = features.pp(stage + 1).pp(index).pp("block");
            let timm = root.pp("blocks").pp(stage).pp(index);
            let modules: &[(&str, &str)] = match kind {
                BlockKind::ConvBnAct => &[("0.0", "conv"), ("0.1", "bn1")],
                BlockKind::EdgeResidual => &[
                    ("0.0", "conv_exp"),
                    ("0.1", "bn1"),
                    ("1.0", "conv_pwl"),
                    ("1.1", "bn2"),
                ],
                BlockKind::InvertedResidual => &[
                    ("0.0", "conv_pw"),
                    ("0.1", "bn1"),
                    ("1.0", "conv_dw"),
                    ("1.1", "bn2"),
                    ("2.fc1", "se.conv_reduce"),
                    ("2.fc2", "se.conv_expand"),
                    ("3.0", "conv_pwl"),
                    ("3.1", "bn3"),
                ],
                BlockKind::DepthwiseSeparable => {
                    bail!("torchvision EfficientNetV2 has no depthwise-separable blocks")
                }
            };
            pairs.extend(modules.iter().map(|(a, b)| (tv.pp(a), timm.pp(b))));
        }
    }
    rename_prefixes(w, &pairs)
}

fn rename_efficientnet_pytorch(w: &mut Weights, layout: &Layout) -> Result<()> {
    let root = KeyPath::root();
    let mut pairs: Vec<(KeyPath, KeyPath)> = [
        ("_conv_stem", "conv_stem"),
        ("_bn0", "bn1"),
        ("_conv_head", "conv_head"),
        ("_bn1", "bn2"),
        ("_fc", "classifier"),
    ]
    .iter()
    .map(|(a, b)| (root.pp(a), root.pp(b)))
    .collect();
    let mut global = 0;
    for (stage, (kind, depth)) in layout.stages.iter().enumerate() {
        for index in 0..*depth {
            let ours = root.pp("blocks").pp(stage).pp(index);
            let theirs = root.pp("_blocks").pp(global);
            let modules: &[(&str, &str)] = match kind {
                BlockKind::DepthwiseSeparable => &[
                    ("_depthwise_conv", "conv_dw"),
                    ("_bn1", "bn1"),
                    ("_se_reduce", "se.conv_reduce"),
                    ("_se_expand", "se.conv_expand"),
                    ("_project_conv", "conv_pw"),
                    ("_bn2", "bn2"),
                ],
                BlockKind::InvertedResidual => &[
                    ("_expand_conv", "conv_pw"),
                    ("_bn0", "bn1"),
                    ("_depthwise_conv", "conv_dw"),
                    ("_bn1", "bn2"),
                    ("_se_reduce", "se.conv_reduce"),
                    ("_se_expand", "se.conv_expand"),
                    ("_project_conv", "conv_pwl"),
                    ("_bn2", "bn3"),
                ],
                _ => bail!("efficientnet_pytorch checkpoints hold V1/Lite networks only"),
            };
            pairs.extend(modules.iter().map(|(a, b)| (theirs.pp(a), ours.pp(b))));
            global += 1;
        }
    }
    rename_prefixes(w, &pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_block_strings() {
        let b = parse_block("ir_r15_k3_s2_e6_c256_se0.25").unwrap();
        assert_eq!(
            b,
            BlockDef {
                kind: BlockKind::InvertedResidual,
                repeats: 15,
                kernel: 3,
                stride: 2,
                exp_ratio: 6.0,
                out_channels: 256,
                se_ratio: 0.25,
                skip: None
            }
        );
        assert_eq!(
            parse_block("cn_r2_k3_s1_e1_c24_skip").unwrap().skip,
            Some(true)
        );
        assert!(parse_block("xx_r1").is_err());
    }

    #[test]
    fn channel_rounding_matches_timm() {
        // values checked against timm's make_divisible / round_channels
        assert_eq!(make_divisible(24.0 * 0.8, 8, 0.9), 24);
        assert_eq!(make_divisible(48.0 * 0.8, 8, 0.9), 40);
        assert_eq!(make_divisible(1280.0 * 1.1, 8, 0.0), 1408);
        assert_eq!(make_divisible(32.0 * 1.2, 8, 0.9), 40);
        assert_eq!(make_divisible(112.0 * 1.1, 8, 0.0), 120);
        assert_eq!(make_divisible(12.8, 1, 0.0), 13);
    }

    #[test]
    fn depth_scaling_matches_timm() {
        // tf_efficientnetv2_b3: depths [2,3,3,5,7,12]; rw_m: [3,5,5,8,15,24]; lite4 keeps the
        // first and last stages at one block.
        let depths = |c: Config| c.stage_depths(&c.block_defs().unwrap());
        assert_eq!(
            depths(Config::tf_efficientnetv2_b3()),
            vec![2, 3, 3, 5, 7, 12]
        );
        assert_eq!(
            depths(Config::efficientnetv2_rw_m()),
            vec![3, 5, 5, 8, 15, 24]
        );
        assert_eq!(depths(Config::tf_efficientnet_lite4())[0], 1);
        assert_eq!(depths(Config::tf_efficientnet_lite4())[6], 1);
        assert_eq!(
            depths(Config::efficientnetv2_rw_t()),
            vec![2, 4, 4, 6, 9, 14]
        );
    }

    #[test]
    fn renames_foreign_keys_onto_timm_module_paths() {
        let keys = [
            "features.0.0.weight",
            "features.1.0.block.0.1.running_var",
            "features.4.0.block.2.fc1.weight",
            "features.7.0.weight",
            "classifier.1.bias",
            "unrelated.weight",
        ];
        let zero = || tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
        let tensors = keys.iter().map(|k| (k.to_string(), zero())).collect();
        let mut w = Weights::from_tensors(tensors, tch::Device::Cpu, tch::Kind::Float);
        let layout = Config::efficientnet_v2_s().layout().unwrap();
        rename_torchvision(&mut w, &layout).unwrap();
        for key in [
            "conv_stem.weight",
            "blocks.0.0.bn1.running_var",
            "blocks.3.0.se.conv_reduce.weight",
            "conv_head.weight",
            "classifier.bias",
            "unrelated.weight",
        ] {
            assert!(w.contains(key), "{key}");
        }

        // The longest prefix ending at a module boundary wins: `a.1` is not a prefix of `a.10`.
        let tensors = ["a.1.x", "a.10.x"]
            .iter()
            .map(|k| (k.to_string(), zero()))
            .collect();
        let mut w = Weights::from_tensors(tensors, tch::Device::Cpu, tch::Kind::Float);
        let root = KeyPath::root();
        let pairs = [
            (root.pp("a"), root.pp("b")),
            (root.pp("a").pp(1), root.pp("c")),
        ];
        rename_prefixes(&mut w, &pairs).unwrap();
        assert!(w.contains("c.x") && w.contains("b.10.x"));
    }

    #[test]
    fn every_preset_decodes_and_is_its_own() {
        for (i, (name, make)) in PRESETS.iter().enumerate() {
            let cfg = make();
            assert!(cfg.block_defs().is_ok(), "{name}");
            // A copy-pasted preset (same name, or another preset's config under a new name)
            // would serve the wrong network.
            for (other, make_other) in &PRESETS[i + 1..] {
                assert_ne!(name, other, "preset named twice");
                assert!(
                    cfg != make_other(),
                    "{name} and {other} build the same network"
                );
            }
        }
        assert_eq!(Config::by_name("tf_efficientnetv2_xxl"), None);
    }
}
