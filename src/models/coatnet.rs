//! CoAtNet (and CoAtNeXt): convolution stages followed by relative-attention transformer stages,
//! natively on libtorch.
//!
//! Paper: Dai, Liu, Le & Tan, "CoAtNet: Marrying Convolution and Attention for All Data Sizes"
//! (NeurIPS 2021, arXiv:2106.04803). Reference implementation mirrored here: timm
//! (`timm/models/maxxvit.py`: `MbConvBlock`, `ConvNeXtBlock`, `TransformerBlock2d`,
//! `Attention2d`, `Downsample2d`, `Stem`, and `timm/layers/pos_embed_rel.py`: `RelPosBias`,
//! `RelPosMlp`), including its `_rw` variants (pre-norm activation, early SE, pooled strides,
//! shortcut biases, LayerScale, log-coordinate MLP position bias) and the paper configurations
//! (`coatnet_0_224`..`coatnet_5_224`, with the norm + MLP + tanh head).
//!
//! Module paths equal timm's checkpoint keys (`stages.2.blocks.0.attn.qkv`). The relative
//! position index and log coordinates are not in checkpoints; they are computed here, and each
//! block's attention bias, which does not depend on the input, is computed once at load.
//! Attention runs through libtorch's fused scaled-dot-product attention with the bias as mask,
//! as timm does by default.

pub use super::layers::Pool;
use super::layers::{
    make_divisible, Act, BatchNorm2d, Conv2d, ConvSpec, LayerNorm2d, Linear, Padding, SqueezeExcite,
};
use super::ops::Ops;
use super::weights::{Param, Scope};
use super::NetworkOutput;
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    BatchNorm,
    LayerNorm,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ConvBlock {
    MbConv,
    /// ConvNeXt block (coatnext): 7x7 depthwise, LayerNorm, MLP, LayerScale.
    ConvNeXt {
        layer_scale: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrideMode {
    /// Average-pool after the pre-norm, then an unstrided depthwise conv.
    Pool,
    /// Strided depthwise conv.
    Depthwise,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RelPos {
    /// A learned table indexed by relative position (`relative_position_bias_table`).
    Table,
    /// An MLP over log-spaced relative coordinates (timm `RelPosMlp`, mode "cr").
    Mlp { hidden: i64 },
}

/// Convolution stage settings (timm `MaxxVitConvCfg`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConvCfg {
    pub block: ConvBlock,
    pub expand_ratio: f64,
    /// Expansion width from the output (paper) or input (rw) channels.
    pub expand_output: bool,
    pub pre_norm_act: bool,
    /// Bias on the final 1x1 projection and the shortcut's 1x1 expansion.
    pub output_bias: bool,
    pub stride_mode: StrideMode,
    /// Shortcut pooling.
    pub pool: Pool,
    /// Pooling inside the block in `Pool` stride mode.
    pub downsample_pool: Pool,
    /// SE between the depthwise conv and its norm (rw) instead of after the norm.
    pub attn_early: bool,
    pub attn_act: Act,
    pub attn_ratio: f64,
    pub act: Act,
    pub norm: NormKind,
    pub norm_eps: f64,
}

/// Transformer stage settings (timm `MaxxVitTransformerCfg`).
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerCfg {
    pub dim_head: i64,
    pub expand_ratio: f64,
    /// Heads from the output width (paper) or the input width (rw).
    pub expand_first: bool,
    pub shortcut_bias: bool,
    pub pool: Pool,
    pub rel_pos: RelPos,
    pub layer_scale: bool,
    pub norm: NormKind,
    pub norm_eps: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageKind {
    Conv,
    Transformer,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub embed_dim: [i64; 4],
    pub depths: [usize; 4],
    pub stages: [StageKind; 4],
    pub stem_width: (i64, i64),
    pub conv: ConvCfg,
    pub transformer: TransformerCfg,
    /// Paper configs: pool, norm, Linear + tanh, classifier (`NormMlpClassifierHead`).
    pub head_hidden_size: Option<i64>,
    /// The input size the attention windows are built for (CoAtNets have a fixed input size).
    pub img_size: i64,
    pub num_classes: i64,
}

const C: StageKind = StageKind::Conv;
const T: StageKind = StageKind::Transformer;

/// The paper's defaults (timm `MaxxVitConvCfg()` / `MaxxVitTransformerCfg()`).
fn paper_conv() -> ConvCfg {
    ConvCfg {
        block: ConvBlock::MbConv,
        expand_ratio: 4.0,
        expand_output: true,
        pre_norm_act: false,
        output_bias: true,
        stride_mode: StrideMode::Depthwise,
        pool: Pool::Avg2,
        downsample_pool: Pool::Avg2,
        attn_early: false,
        attn_act: Act::Silu,
        attn_ratio: 0.25,
        act: Act::Gelu,
        norm: NormKind::BatchNorm,
        norm_eps: 1e-5,
    }
}

fn paper_transformer() -> TransformerCfg {
    TransformerCfg {
        dim_head: 32,
        expand_ratio: 4.0,
        expand_first: true,
        shortcut_bias: true,
        pool: Pool::Avg2,
        rel_pos: RelPos::Table,
        layer_scale: false,
        norm: NormKind::LayerNorm,
        norm_eps: 1e-6,
    }
}

/// timm `_rw_coat_cfg` with its defaults.
fn rw_coat() -> (ConvCfg, TransformerCfg) {
    let conv = ConvCfg {
        stride_mode: StrideMode::Pool,
        pre_norm_act: true,
        expand_output: false,
        output_bias: false,
        attn_act: Act::Relu,
        act: Act::Silu,
        ..paper_conv()
    };
    let transformer = TransformerCfg {
        expand_first: false,
        ..paper_transformer()
    };
    (conv, transformer)
}

/// timm `_rw_max_cfg` with its defaults.
fn rw_max() -> (ConvCfg, TransformerCfg) {
    let conv = ConvCfg {
        expand_output: false,
        output_bias: false,
        attn_ratio: 1.0 / 16.0,
        act: Act::Silu,
        ..paper_conv()
    };
    let transformer = TransformerCfg {
        expand_first: false,
        ..paper_transformer()
    };
    (conv, transformer)
}

impl Config {
    fn new(
        embed_dim: [i64; 4],
        depths: [usize; 4],
        stem_width: (i64, i64),
        (conv, transformer): (ConvCfg, TransformerCfg),
    ) -> Self {
        Self {
            embed_dim,
            depths,
            stages: [C, C, T, T],
            stem_width,
            conv,
            transformer,
            head_hidden_size: None,
            img_size: 224,
            num_classes: 1000,
        }
    }

    fn paper(embed_dim: [i64; 4], depths: [usize; 4], stem_width: i64) -> Self {
        Self {
            head_hidden_size: Some(embed_dim[3]),
            ..Self::new(
                embed_dim,
                depths,
                (stem_width, stem_width),
                (paper_conv(), paper_transformer()),
            )
        }
    }

    fn map_conv(mut self, f: impl FnOnce(&mut ConvCfg)) -> Self {
        f(&mut self.conv);
        self
    }

    fn map_transformer(mut self, f: impl FnOnce(&mut TransformerCfg)) -> Self {
        f(&mut self.transformer);
        self
    }

    const NANO: [i64; 4] = [64, 128, 256, 512];
    const SMALL: [i64; 4] = [96, 192, 384, 768];
    const MEDIUM: [i64; 4] = [128, 256, 512, 1024];
    const LARGE: [i64; 4] = [192, 384, 768, 1536];

    pub fn coatnet_pico_rw_224() -> Self {
        Self::new(Self::NANO, [2, 3, 5, 2], (32, 64), rw_max()).map_conv(|c| {
            c.output_bias = true;
            c.attn_ratio = 0.25;
        })
    }
    pub fn coatnet_nano_rw_224() -> Self {
        Self::coatnet_pico_rw_224()
            .with_depths([3, 4, 6, 3])
            .map_conv(|c| c.stride_mode = StrideMode::Pool)
    }
    pub fn coatnet_0_rw_224() -> Self {
        Self::new(Self::SMALL, [2, 3, 7, 2], (32, 64), rw_coat())
            .map_conv(|c| c.attn_early = true)
            .map_transformer(|t| t.shortcut_bias = false)
    }
    pub fn coatnet_1_rw_224() -> Self {
        Self::coatnet_0_rw_224()
            .with_depths([2, 6, 14, 2])
            .map_conv(|c| c.stride_mode = StrideMode::Depthwise)
    }
    pub fn coatnet_2_rw_224() -> Self {
        Self::new(Self::MEDIUM, [2, 6, 14, 2], (64, 128), rw_coat()).map_conv(|c| {
            c.stride_mode = StrideMode::Depthwise;
            c.attn_act = Act::Silu;
        })
    }
    pub fn coatnet_3_rw_224() -> Self {
        Self {
            embed_dim: Self::LARGE,
            stem_width: (96, 192),
            ..Self::coatnet_2_rw_224()
        }
        .map_transformer(|t| t.layer_scale = true)
    }
    pub fn coatnet_bn_0_rw_224() -> Self {
        Self::coatnet_0_rw_224()
            .map_conv(|c| c.stride_mode = StrideMode::Depthwise)
            .map_transformer(|t| t.norm = NormKind::BatchNorm)
    }
    pub fn coatnet_rmlp_nano_rw_224() -> Self {
        Self::coatnet_pico_rw_224()
            .with_depths([3, 4, 6, 3])
            .map_transformer(|t| t.rel_pos = RelPos::Mlp { hidden: 384 })
    }
    pub fn coatnet_rmlp_0_rw_224() -> Self {
        Self::new(Self::SMALL, [2, 3, 7, 2], (32, 64), rw_coat())
            .map_conv(|c| c.stride_mode = StrideMode::Depthwise)
            .map_transformer(|t| t.rel_pos = RelPos::Mlp { hidden: 512 })
    }
    pub fn coatnet_rmlp_1_rw_224() -> Self {
        Self::new(Self::SMALL, [2, 6, 14, 2], (32, 64), rw_coat())
            .map_conv(|c| {
                c.pool = Pool::Max;
                c.attn_early = true;
            })
            .map_transformer(|t| {
                t.pool = Pool::Max;
                t.shortcut_bias = false;
                t.rel_pos = RelPos::Mlp { hidden: 384 };
            })
    }
    pub fn coatnet_rmlp_1_rw2_224() -> Self {
        Self::new(Self::SMALL, [2, 6, 14, 2], (32, 64), rw_coat())
            .map_conv(|c| c.stride_mode = StrideMode::Depthwise)
            .map_transformer(|t| t.rel_pos = RelPos::Mlp { hidden: 512 })
    }
    pub fn coatnet_rmlp_2_rw_224() -> Self {
        Self::coatnet_2_rw_224().map_transformer(|t| {
            t.layer_scale = true;
            t.rel_pos = RelPos::Mlp { hidden: 512 };
        })
    }
    pub fn coatnet_rmlp_2_rw_384() -> Self {
        Self {
            img_size: 384,
            ..Self::coatnet_rmlp_2_rw_224()
        }
    }
    pub fn coatnet_rmlp_3_rw_224() -> Self {
        Self {
            embed_dim: Self::LARGE,
            stem_width: (96, 192),
            ..Self::coatnet_rmlp_2_rw_224()
        }
    }
    pub fn coatnext_nano_rw_224() -> Self {
        let conv = ConvCfg {
            block: ConvBlock::ConvNeXt { layer_scale: true },
            expand_output: false,
            norm: NormKind::LayerNorm,
            norm_eps: 1e-6,
            ..paper_conv()
        };
        let transformer = TransformerCfg {
            expand_first: false,
            ..paper_transformer()
        };
        Self::new(Self::NANO, [3, 4, 6, 3], (32, 64), (conv, transformer))
    }
    pub fn coatnet_0_224() -> Self {
        Self::paper(Self::SMALL, [2, 3, 5, 2], 64)
    }
    pub fn coatnet_1_224() -> Self {
        Self::paper(Self::SMALL, [2, 6, 14, 2], 64)
    }
    pub fn coatnet_2_224() -> Self {
        Self::paper(Self::MEDIUM, [2, 6, 14, 2], 128)
    }
    pub fn coatnet_3_224() -> Self {
        Self::paper(Self::LARGE, [2, 6, 14, 2], 192)
    }
    pub fn coatnet_4_224() -> Self {
        Self::paper(Self::LARGE, [2, 12, 28, 2], 192)
    }
    pub fn coatnet_5_224() -> Self {
        Self::paper([256, 512, 1280, 2048], [2, 12, 28, 2], 192)
    }

    fn with_depths(self, depths: [usize; 4]) -> Self {
        Self { depths, ..self }
    }

    /// The preset named `architecture` (timm's model name).
    pub fn by_name(architecture: &str) -> Option<Self> {
        super::find_preset(PRESETS, architecture)
    }
}

pub const PRESETS: &[super::Preset<Config>] = &[
    ("coatnet_pico_rw_224", Config::coatnet_pico_rw_224),
    ("coatnet_nano_rw_224", Config::coatnet_nano_rw_224),
    ("coatnet_0_rw_224", Config::coatnet_0_rw_224),
    ("coatnet_1_rw_224", Config::coatnet_1_rw_224),
    ("coatnet_2_rw_224", Config::coatnet_2_rw_224),
    ("coatnet_3_rw_224", Config::coatnet_3_rw_224),
    ("coatnet_bn_0_rw_224", Config::coatnet_bn_0_rw_224),
    ("coatnet_rmlp_nano_rw_224", Config::coatnet_rmlp_nano_rw_224),
    ("coatnet_rmlp_0_rw_224", Config::coatnet_rmlp_0_rw_224),
    ("coatnet_rmlp_1_rw_224", Config::coatnet_rmlp_1_rw_224),
    ("coatnet_rmlp_1_rw2_224", Config::coatnet_rmlp_1_rw2_224),
    ("coatnet_rmlp_2_rw_224", Config::coatnet_rmlp_2_rw_224),
    ("coatnet_rmlp_2_rw_384", Config::coatnet_rmlp_2_rw_384),
    ("coatnet_rmlp_3_rw_224", Config::coatnet_rmlp_3_rw_224),
    ("coatnext_nano_rw_224", Config::coatnext_nano_rw_224),
    ("coatnet_0_224", Config::coatnet_0_224),
    ("coatnet_1_224", Config::coatnet_1_224),
    ("coatnet_2_224", Config::coatnet_2_224),
    ("coatnet_3_224", Config::coatnet_3_224),
    ("coatnet_4_224", Config::coatnet_4_224),
    ("coatnet_5_224", Config::coatnet_5_224),
];

// ---------------------------------------------------------------------------------------------
// Layers

/// A norm over channels of an NCHW map, with an optional activation.
#[derive(Debug)]
enum Norm {
    Batch(BatchNorm2d),
    Layer(LayerNorm2d),
}

impl Norm {
    fn load(w: Scope, kind: NormKind, channels: i64, eps: f64) -> Result<Self> {
        Ok(match kind {
            NormKind::BatchNorm => Norm::Batch(BatchNorm2d::load(w, channels, eps)?),
            NormKind::LayerNorm => Norm::Layer(LayerNorm2d::load(w, channels, eps)?),
        })
    }

    fn forward<O: Ops>(&self, o: &mut O, x: &O::Value) -> O::Value {
        match self {
            Norm::Batch(bn) => bn.forward(o, x),
            Norm::Layer(ln) => ln.forward(o, x),
        }
    }
}

/// timm `Downsample2d`: pool, then a 1x1 expansion when the width changes.
#[derive(Debug)]
struct Downsample {
    pool: Pool,
    expand: Option<Conv2d>,
}

impl Downsample {
    fn load(w: Scope, pool: Pool, dim: i64, dim_out: i64, bias: bool) -> Result<Self> {
        let expand = (dim != dim_out)
            .then(|| Conv2d::load(w.pp("expand"), pointwise(dim, dim_out), bias))
            .transpose()?;
        Ok(Self { pool, expand })
    }

    fn forward<O: Ops>(&self, o: &mut O, x: &O::Value) -> O::Value {
        let x = o.pool(x, self.pool);
        match &self.expand {
            Some(expand) => expand.forward(o, &x),
            None => x,
        }
    }
}

fn pointwise(i: i64, o: i64) -> ConvSpec {
    ConvSpec::new(i, o, 1, 1, Padding::Symmetric(0))
}

/// LayerScale (`gamma` per channel) of the module `w`.
fn layer_scale(w: Scope, channels: i64) -> Result<Param> {
    let gamma = w.get("gamma", &[channels])?.f_view([1, channels, 1, 1])?;
    w.param("gamma", gamma)
}

/// A ConvMlp: 1x1 conv, activation, 1x1 conv.
#[derive(Debug)]
struct ConvMlp {
    fc1: Conv2d,
    fc2: Conv2d,
    act: Act,
}

impl ConvMlp {
    fn load(w: Scope, dim: i64, hidden: i64, bias: bool, act: Act) -> Result<Self> {
        Ok(Self {
            fc1: Conv2d::load(w.pp("fc1"), pointwise(dim, hidden), bias)?,
            fc2: Conv2d::load(w.pp("fc2"), pointwise(hidden, dim), bias)?,
            act,
        })
    }

    fn forward<O: Ops>(&self, o: &mut O, x: &O::Value) -> O::Value {
        let hidden = self.fc1.forward(o, x);
        let hidden = self.act.apply(o, hidden);
        self.fc2.forward(o, &hidden)
    }
}

// ---------------------------------------------------------------------------------------------
// Blocks

/// timm `MbConvBlock`.
#[derive(Debug)]
struct MbConv {
    shortcut: Option<Downsample>,
    pre_norm: BatchNorm2d,
    pre_act: Act,
    down: Option<Pool>,
    /// conv1_1x1 with norm1 folded in.
    conv1: Conv2d,
    /// conv2_kxk; with norm2 folded in unless the SE sits between them.
    conv2: Conv2d,
    se_early: Option<(SqueezeExcite, BatchNorm2d)>,
    se: Option<SqueezeExcite>,
    conv3: Conv2d,
    act: Act,
}

impl MbConv {
    fn load(w: Scope, cfg: &ConvCfg, in_ch: i64, out_ch: i64, stride: i64) -> Result<Self> {
        let base = if cfg.expand_output { out_ch } else { in_ch };
        let mid = make_divisible(base as f64 * cfg.expand_ratio, 8, 0.9);
        let eps = cfg.norm_eps;
        let shortcut = (stride == 2)
            .then(|| Downsample::load(w.pp("shortcut"), cfg.pool, in_ch, out_ch, cfg.output_bias))
            .transpose()?;
        let pre_norm = BatchNorm2d::load(w.pp("pre_norm"), in_ch, eps)?;
        let (down, dw_stride) = match cfg.stride_mode {
            StrideMode::Pool if stride == 2 => (Some(cfg.downsample_pool), 1),
            StrideMode::Pool => (None, 1),
            StrideMode::Depthwise => (None, stride),
        };
        let conv1 = Conv2d::load_with_batch_norm(
            w.pp("conv1_1x1"),
            w.pp("norm1"),
            pointwise(in_ch, mid),
            eps,
        )?;
        let dw = ConvSpec::depthwise(mid, 3, dw_stride, Padding::Symmetric(1));
        let rd = (cfg.attn_ratio * (if cfg.expand_output { out_ch } else { mid }) as f64) as i64;
        let (conv2, se_early, se) = if cfg.attn_early {
            let conv2 = Conv2d::load(w.pp("conv2_kxk"), dw, false)?;
            let se = SqueezeExcite::load(w.pp("se_early"), ("fc1", "fc2"), mid, rd, cfg.attn_act)?;
            let norm2 = BatchNorm2d::load(w.pp("norm2"), mid, eps)?;
            (conv2, Some((se, norm2)), None)
        } else {
            let conv2 = Conv2d::load_with_batch_norm(w.pp("conv2_kxk"), w.pp("norm2"), dw, eps)?;
            let se = SqueezeExcite::load(w.pp("se"), ("fc1", "fc2"), mid, rd, cfg.attn_act)?;
            (conv2, None, Some(se))
        };
        let conv3 = Conv2d::load(w.pp("conv3_1x1"), pointwise(mid, out_ch), cfg.output_bias)?;
        let pre_act = if cfg.pre_norm_act {
            cfg.act
        } else {
            Act::Identity
        };
        Ok(Self {
            shortcut,
            pre_norm,
            pre_act,
            down,
            conv1,
            conv2,
            se_early,
            se,
            conv3,
            act: cfg.act,
        })
    }

    fn forward<O: Ops>(&self, o: &mut O, x: &O::Value) -> O::Value {
        let shortcut = match &self.shortcut {
            Some(s) => s.forward(o, x),
            None => o.share(x),
        };
        let normed = self.pre_norm.forward(o, x);
        let mut y = self.pre_act.apply(o, normed);
        if let Some(pool) = self.down {
            y = o.pool(&y, pool);
        }
        let expanded = self.conv1.forward(o, &y);
        y = self.act.apply(o, expanded);
        y = self.conv2.forward(o, &y);
        if let Some((se, norm2)) = &self.se_early {
            let excited = se.forward(o, &y);
            let normed = norm2.forward(o, &excited);
            y = self.act.apply(o, normed);
        } else {
            y = self.act.apply(o, y);
        }
        if let Some(se) = &self.se {
            y = se.forward(o, &y);
        }
        let projected = self.conv3.forward(o, &y);
        o.add(&projected, &shortcut)
    }
}

/// timm `ConvNeXtBlock` with a conv MLP (coatnext).
#[derive(Debug)]
struct ConvNeXt {
    shortcut: ConvNeXtShortcut,
    conv_dw: Conv2d,
    norm: LayerNorm2d,
    mlp: ConvMlp,
    gamma: Option<Param>,
}

#[derive(Debug)]
enum ConvNeXtShortcut {
    Identity,
    Down(Downsample),
    Project(Conv2d),
}

impl ConvNeXt {
    fn load(
        w: Scope,
        cfg: &ConvCfg,
        in_ch: i64,
        out_ch: i64,
        stride: i64,
        layer_scale_on: bool,
    ) -> Result<Self> {
        if cfg.stride_mode != StrideMode::Depthwise {
            bail!("ConvNeXt blocks with pooled strides are not implemented");
        }
        let shortcut = if stride == 2 {
            ConvNeXtShortcut::Down(Downsample::load(
                w.pp("shortcut"),
                Pool::Avg2,
                in_ch,
                out_ch,
                true,
            )?)
        } else if in_ch != out_ch {
            ConvNeXtShortcut::Project(Conv2d::load(
                w.pp("shortcut"),
                pointwise(in_ch, out_ch),
                cfg.output_bias,
            )?)
        } else {
            ConvNeXtShortcut::Identity
        };
        // Depthwise with a channel multiplier when the width grows (groups = in_ch).
        let dw = ConvSpec::new(in_ch, out_ch, 7, stride, Padding::Symmetric(3)).grouped(in_ch);
        Ok(Self {
            shortcut,
            conv_dw: Conv2d::load(w.pp("conv_dw"), dw, cfg.output_bias)?,
            norm: LayerNorm2d::load(w.pp("norm"), out_ch, cfg.norm_eps)?,
            mlp: ConvMlp::load(
                w.pp("mlp"),
                out_ch,
                (cfg.expand_ratio * out_ch as f64) as i64,
                cfg.output_bias,
                cfg.act,
            )?,
            gamma: layer_scale_on
                .then(|| layer_scale(w.pp("ls"), out_ch))
                .transpose()?,
        })
    }

    fn forward<O: Ops>(&self, o: &mut O, x: &O::Value) -> O::Value {
        let shortcut = match &self.shortcut {
            ConvNeXtShortcut::Identity => o.share(x),
            ConvNeXtShortcut::Down(d) => d.forward(o, x),
            ConvNeXtShortcut::Project(c) => c.forward(o, x),
        };
        let y = self.conv_dw.forward(o, x);
        let y = self.norm.forward(o, &y);
        let mut y = self.mlp.forward(o, &y);
        if let Some(gamma) = &self.gamma {
            y = o.scale(y, gamma);
        }
        o.add(&y, &shortcut)
    }
}

/// Relative position index (timm `gen_relative_position_index`): for query `q` and key `k`,
/// `(qh - kh + H - 1) * (2W - 1) + (qw - kw + W - 1)`, flattened over `[N, N]`.
fn relative_position_index(h: i64, w: i64) -> Vec<i64> {
    let n = h * w;
    let mut index = Vec::with_capacity((n * n) as usize);
    for q in 0..n {
        for k in 0..n {
            let (qh, qw, kh, kw) = (q / w, q % w, k / w, k % w);
            index.push((qh - kh + h - 1) * (2 * w - 1) + (qw - kw + w - 1));
        }
    }
    index
}

/// timm `gen_relative_log_coords(mode='cr')`: `[2H-1, 2W-1, 2]` of `sign(d) * ln(1 + |d|)`,
/// computed with the same f32 tensor operations as the reference.
fn relative_log_coords(h: i64, w: i64) -> Result<Tensor> {
    let dh = Tensor::f_arange_start(-(h - 1), h, (Kind::Int64, tch::Device::Cpu))?
        .f_to_kind(Kind::Float)?;
    let dw = Tensor::f_arange_start(-(w - 1), w, (Kind::Int64, tch::Device::Cpu))?
        .f_to_kind(Kind::Float)?;
    let grid = Tensor::f_meshgrid_indexing(&[dh, dw], "ij")?;
    let table = Tensor::f_stack(&grid, 0)?
        .f_permute([1, 2, 0])?
        .f_contiguous()?;
    Ok(table
        .f_sign()?
        .f_mul(&table.f_abs()?.f_add_scalar(1.0)?.f_log()?)?)
}

/// The attention bias of one block, `[1, heads, N, N]`, from its checkpoint parameters.
fn relative_position_bias(
    w: Scope,
    rel_pos: RelPos,
    heads: i64,
    window: (i64, i64),
) -> Result<Param> {
    let (h, wd) = window;
    let n = h * wd;
    let distances = (2 * h - 1) * (2 * wd - 1);
    let per_distance = match rel_pos {
        RelPos::Table => w.get("relative_position_bias_table", &[distances, heads])?,
        RelPos::Mlp { hidden } => {
            // Computed once, in f32 on the CPU as the reference computes it per forward.
            let (fc1, fc2) = (w.pp("mlp").pp("fc1"), w.pp("mlp").pp("fc2"));
            let (w1, b1) = (
                fc1.get("weight", &[hidden, 2])?,
                fc1.get("bias", &[hidden])?,
            );
            let (w2, b2) = (
                fc2.get("weight", &[heads, hidden])?,
                fc2.get("bias", &[heads])?,
            );
            let hidden_out = relative_log_coords(h, wd)?
                .f_linear(&w1, Some(&b1))?
                .f_relu()?;
            hidden_out
                .f_linear(&w2, Some(&b2))?
                .f_reshape([-1, heads])?
        }
    };
    let index = Tensor::from_slice(&relative_position_index(h, wd));
    let bias = per_distance
        .f_index_select(0, &index)?
        .f_view([n, n, heads])?
        .f_permute([2, 0, 1])?
        .f_unsqueeze(0)?
        .f_contiguous()?;
    w.param("bias", bias)
}

/// timm `Attention2d` (head-first q/k/v layout) with a precomputed relative position bias.
#[derive(Debug)]
struct Attention {
    qkv: Conv2d,
    proj: Conv2d,
    bias: Param,
    heads: i64,
    dim_head: i64,
}

impl Attention {
    fn forward<O: Ops>(&self, o: &mut O, x: &O::Value) -> O::Value {
        let [_, _, h, w] = o.shape(x)[..] else {
            unreachable!("NCHW input")
        };
        let (heads, dh) = (self.heads, self.dim_head);
        let qkv = self.qkv.forward(o, x);
        let qkv = o.reshape(&qkv, &[-1, heads, 3 * dh, h * w]);
        let mut part = |i: i64| {
            let part = o.narrow(&qkv, 2, i * dh, dh);
            o.transpose_last(&part)
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let out = o.attention(&q, &k, &v, &self.bias);
        let out = o.transpose_last(&out);
        let out = o.reshape(&out, &[-1, heads * dh, h, w]);
        self.proj.forward(o, &out)
    }
}

/// timm `TransformerBlock2d`.
#[derive(Debug)]
struct TransformerBlock {
    shortcut: Option<Downsample>,
    norm1: Norm,
    norm1_down: Option<Pool>,
    attn: Attention,
    ls1: Option<Param>,
    norm2: Norm,
    mlp: ConvMlp,
    ls2: Option<Param>,
}

impl TransformerBlock {
    fn load(
        w: Scope,
        cfg: &TransformerCfg,
        dim: i64,
        dim_out: i64,
        stride: i64,
        window: (i64, i64),
    ) -> Result<Self> {
        let eps = cfg.norm_eps;
        let (shortcut, norm1, norm1_down) = if stride == 2 {
            let shortcut =
                Downsample::load(w.pp("shortcut"), cfg.pool, dim, dim_out, cfg.shortcut_bias)?;
            let norm = Norm::load(w.pp("norm1").pp("norm"), cfg.norm, dim, eps)?;
            (Some(shortcut), norm, Some(cfg.pool))
        } else {
            if dim != dim_out {
                bail!("a stride-1 transformer block cannot change width ({dim} -> {dim_out})");
            }
            (None, Norm::load(w.pp("norm1"), cfg.norm, dim, eps)?, None)
        };
        let dim_attn = if cfg.expand_first { dim_out } else { dim };
        let heads = dim_attn / cfg.dim_head;
        let a = w.pp("attn");
        let attn = Attention {
            qkv: Conv2d::load(a.pp("qkv"), pointwise(dim, 3 * dim_attn), true)?,
            bias: relative_position_bias(a.pp("rel_pos"), cfg.rel_pos, heads, window)?,
            proj: Conv2d::load(a.pp("proj"), pointwise(dim_attn, dim_out), true)?,
            heads,
            dim_head: cfg.dim_head,
        };
        let ls = |name: &str| -> Result<Option<Param>> {
            cfg.layer_scale
                .then(|| layer_scale(w.pp(name), dim_out))
                .transpose()
        };
        Ok(Self {
            shortcut,
            norm1,
            norm1_down,
            attn,
            ls1: ls("ls1")?,
            norm2: Norm::load(w.pp("norm2"), cfg.norm, dim_out, eps)?,
            mlp: ConvMlp::load(
                w.pp("mlp"),
                dim_out,
                (dim_out as f64 * cfg.expand_ratio) as i64,
                true,
                Act::Gelu,
            )?,
            ls2: ls("ls2")?,
        })
    }

    fn forward<O: Ops>(&self, o: &mut O, x: &O::Value) -> O::Value {
        let shortcut = match &self.shortcut {
            Some(s) => s.forward(o, x),
            None => o.share(x),
        };
        let mut y = self.norm1.forward(o, x);
        if let Some(pool) = self.norm1_down {
            y = o.pool(&y, pool);
        }
        let mut y = self.attn.forward(o, &y);
        if let Some(gamma) = &self.ls1 {
            y = o.scale(y, gamma);
        }
        let x = o.add(&shortcut, &y);
        let y = self.norm2.forward(o, &x);
        let mut y = self.mlp.forward(o, &y);
        if let Some(gamma) = &self.ls2 {
            y = o.scale(y, gamma);
        }
        o.add(&x, &y)
    }
}

#[derive(Debug)]
enum Block {
    MbConv(Box<MbConv>),
    ConvNeXt(Box<ConvNeXt>),
    Transformer(Box<TransformerBlock>),
}

impl Block {
    fn forward<O: Ops>(&self, o: &mut O, x: &O::Value) -> O::Value {
        match self {
            Block::MbConv(b) => b.forward(o, x),
            Block::ConvNeXt(b) => b.forward(o, x),
            Block::Transformer(b) => b.forward(o, x),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The network

#[derive(Debug)]
enum StemNorm {
    /// BatchNorm + act folded into conv1.
    Folded(Act),
    /// LayerNorm2d + act (coatnext).
    Layer(LayerNorm2d, Act),
}

#[derive(Debug)]
enum Head {
    /// rw/coatnext: `norm` on the map, average pool, `head.fc`.
    Classifier { norm: Norm, fc: Linear },
    /// Paper: average pool, `head.norm`, `head.pre_logits.fc` + tanh, `head.fc`.
    NormMlp {
        norm: LayerNorm2d,
        pre_logits: Linear,
        fc: Linear,
    },
}

pub struct CoAtNet {
    stem_conv1: Conv2d,
    stem_norm: StemNorm,
    stem_conv2: Conv2d,
    blocks: Vec<Block>,
    head: Head,
}

impl CoAtNet {
    /// Build `cfg` from the checkpoint seen from `w` (the whole checkpoint: `w.root()`).
    pub fn load(cfg: &Config, w: Scope) -> Result<Self> {
        let (stem_conv1, stem_norm, stem_conv2) = load_stem(cfg, w.pp("stem"))?;
        Ok(Self {
            stem_conv1,
            stem_norm,
            stem_conv2,
            blocks: load_blocks(cfg, w.clone())?,
            head: load_head(cfg, w)?,
        })
    }
}

/// `stem`: a strided 3x3 convolution with its norm and activation, then another 3x3.
fn load_stem(cfg: &Config, stem: Scope) -> Result<(Conv2d, StemNorm, Conv2d)> {
    let (s0, s1) = cfg.stem_width;
    let stem_conv = |i, o, stride| ConvSpec::new(i, o, 3, stride, Padding::Symmetric(1));
    let (conv1, norm) = match cfg.conv.norm {
        NormKind::BatchNorm => (
            Conv2d::load_with_batch_norm(
                stem.pp("conv1"),
                stem.pp("norm1"),
                stem_conv(3, s0, 2),
                cfg.conv.norm_eps,
            )?,
            StemNorm::Folded(cfg.conv.act),
        ),
        NormKind::LayerNorm => (
            Conv2d::load(stem.pp("conv1"), stem_conv(3, s0, 2), false)?,
            StemNorm::Layer(
                LayerNorm2d::load(stem.pp("norm1"), s0, cfg.conv.norm_eps)?,
                cfg.conv.act,
            ),
        ),
    };
    let conv2 = Conv2d::load(stem.pp("conv2"), stem_conv(s0, s1, 1), false)?;
    Ok((conv1, norm, conv2))
}

/// `stages.{s}.blocks.{i}`: each stage halves the map in its first block; transformer blocks
/// build their attention windows for the map size they see.
fn load_blocks(cfg: &Config, w: Scope) -> Result<Vec<Block>> {
    let mut blocks = Vec::new();
    let mut channels = cfg.stem_width.1;
    let mut feat = cfg.img_size / 2;
    for (stage, ((&dim, &depth), &kind)) in cfg
        .embed_dim
        .iter()
        .zip(&cfg.depths)
        .zip(&cfg.stages)
        .enumerate()
    {
        feat = (feat - 1) / 2 + 1;
        for index in 0..depth {
            let p = w.pp("stages").pp(stage).pp("blocks").pp(index);
            let stride = if index == 0 { 2 } else { 1 };
            blocks.push(load_block(cfg, kind, p, channels, dim, stride, feat)?);
            channels = dim;
        }
    }
    Ok(blocks)
}

fn load_block(
    cfg: &Config,
    kind: StageKind,
    p: Scope,
    channels: i64,
    dim: i64,
    stride: i64,
    feat: i64,
) -> Result<Block> {
    Ok(match (kind, cfg.conv.block) {
        (StageKind::Conv, ConvBlock::MbConv) => {
            Block::MbConv(Box::new(MbConv::load(p, &cfg.conv, channels, dim, stride)?))
        }
        (StageKind::Conv, ConvBlock::ConvNeXt { layer_scale }) => Block::ConvNeXt(Box::new(
            ConvNeXt::load(p, &cfg.conv, channels, dim, stride, layer_scale)?,
        )),
        (StageKind::Transformer, _) => Block::Transformer(Box::new(TransformerBlock::load(
            p,
            &cfg.transformer,
            channels,
            dim,
            stride,
            (feat, feat),
        )?)),
    })
}

/// The rw/coatnext head (`norm`, `head.fc`) or the paper's (`head.norm`,
/// `head.pre_logits.fc`, `head.fc`).
fn load_head(cfg: &Config, w: Scope) -> Result<Head> {
    let features = cfg.embed_dim[3];
    let head = w.pp("head");
    Ok(match cfg.head_hidden_size {
        None => Head::Classifier {
            norm: Norm::load(
                w.pp("norm"),
                cfg.transformer.norm,
                features,
                cfg.transformer.norm_eps,
            )?,
            fc: Linear::load(head.pp("fc"), features, cfg.num_classes, true)?,
        },
        Some(hidden) => Head::NormMlp {
            norm: LayerNorm2d::load(head.pp("norm"), features, cfg.transformer.norm_eps)?,
            pre_logits: Linear::load(head.pp("pre_logits").pp("fc"), features, hidden, true)?,
            fc: Linear::load(head.pp("fc"), hidden, cfg.num_classes, true)?,
        },
    })
}

impl CoAtNet {
    pub fn forward<O: Ops>(&self, o: &mut O, input: &O::Value) -> NetworkOutput<O::Value> {
        let x = self.stem_conv1.forward(o, input);
        let x = match &self.stem_norm {
            StemNorm::Folded(act) => act.apply(o, x),
            StemNorm::Layer(norm, act) => {
                let normed = norm.forward(o, &x);
                act.apply(o, normed)
            }
        };
        let mut x = self.stem_conv2.forward(o, &x);
        for block in &self.blocks {
            x = block.forward(o, &x);
        }
        // timm's `forward_head(x, pre_logits=True)` stops before the last `fc`: after the
        // pooling for the rw/coatnext head, after `pre_logits` (fc + tanh) for the paper head.
        let (embeddings, fc) = match &self.head {
            Head::Classifier { norm, fc } => {
                let normed = norm.forward(o, &x);
                let pooled = o.global_average_pool(&normed);
                (o.flatten(&pooled), fc)
            }
            Head::NormMlp {
                norm,
                pre_logits,
                fc,
            } => {
                let pooled = o.global_average_pool(&x);
                let normed = norm.forward(o, &pooled);
                let flat = o.flatten(&normed);
                let hidden = pre_logits.forward(o, &flat);
                (o.tanh(&hidden), fc)
            }
        };
        NetworkOutput {
            logits: fc.forward(o, &embeddings),
            embeddings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_position_index_matches_timm() {
        // 2x2 window: index[q=0,k=3] = (0-1+1)*3 + (0-1+1) = 0; index[q=3,k=0] = 2*3+2 = 8.
        let index = relative_position_index(2, 2);
        assert_eq!(index.len(), 16);
        assert_eq!(index[3], 0);
        assert_eq!(index[12], 8);
        assert_eq!(
            index[0], 4,
            "a token and itself sit at the center of the table"
        );
        assert!(index.iter().all(|&i| (0..9).contains(&i)));
    }

    #[test]
    fn log_coords_are_signed_log1p() {
        let coords = relative_log_coords(2, 3).unwrap();
        assert_eq!(coords.size(), [3, 5, 2]);
        let corner = Vec::<f32>::try_from(coords.get(0).get(0)).unwrap();
        assert!(
            (corner[0] + 2f32.ln()).abs() < 1e-6 && (corner[1] + 3f32.ln()).abs() < 1e-6,
            "{corner:?}"
        );
    }

    #[test]
    fn mbconv_widths_match_timm() {
        assert_eq!(make_divisible(64.0 * 4.0, 8, 0.9), 256);
        assert_eq!(make_divisible(96.0 * 4.0, 8, 0.9), 384);
    }

    #[test]
    fn every_preset_is_its_own() {
        for (i, (name, make)) in PRESETS.iter().enumerate() {
            let cfg = make();
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
        assert_eq!(Config::by_name("coatnet_6_224"), None);
        assert_eq!(Config::coatnet_rmlp_2_rw_384().img_size, 384);
        assert_eq!(Config::coatnet_5_224().head_hidden_size, Some(2048));
    }
}
