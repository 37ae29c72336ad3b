//! Building blocks shared by the native architectures, in inference form: BatchNorm is folded
//! into the convolution before it at load time, and every layer only has a forward pass.

use super::weights::Scope;
use anyhow::Result;
use tch::{Kind, Tensor};

/// Activation functions, applied in place on freshly computed tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Identity,
    Relu,
    Relu6,
    Silu,
    /// Exact (erf) GELU, as `nn.GELU()`.
    Gelu,
}

impl Act {
    pub fn apply(self, mut x: Tensor) -> Tensor {
        match self {
            Act::Identity => x,
            Act::Relu => x.relu_(),
            // nn.ReLU6 is hardtanh(0, 6): the same min/max as clamp.
            Act::Relu6 => x.clamp_(0.0, 6.0),
            Act::Silu => x.silu_(),
            Act::Gelu => x.gelu("none"),
        }
    }
}

/// The same values with NHWC strides ("channels last"). oneDNN's CPU convolutions and cuDNN's
/// tensor-core kernels are fastest on this layout: batch-8 EfficientNet-Lite0 ran 35 % faster
/// on CPU here than with NCHW weights. Convolutions keep the layout of their input, so one
/// conversion of the input and of each weight at load time keeps the whole network in it.
pub fn channels_last(t: Tensor) -> Result<Tensor> {
    Ok(t.f_permute([0, 2, 3, 1])?
        .f_contiguous()?
        .f_permute([0, 3, 1, 2])?)
}

/// timm's `make_divisible`: round `value` to a multiple of `divisor` (at least `divisor`),
/// going one step up when rounding down lost more than `1 - round_limit` of it.
pub fn make_divisible(value: f64, divisor: i64, round_limit: f64) -> i64 {
    let rounded = ((value + divisor as f64 / 2.0) as i64 / divisor * divisor).max(divisor);
    if (rounded as f64) < round_limit * value {
        rounded + divisor
    } else {
        rounded
    }
}

/// How a convolution pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// PyTorch padding, the same on both sides.
    Symmetric(i64),
    /// TensorFlow "SAME" for strided convolutions: computed from the input size, with the odd
    /// pixel on the right/bottom (timm's `Conv2dSame`).
    TfSame,
}

/// timm's padding choice: `''` pads symmetrically; `'same'` is static (symmetric) when the
/// stride is 1 and dynamic TF padding otherwise.
pub fn timm_padding(tf_same: bool, kernel: i64, stride: i64, dilation: i64) -> Padding {
    if tf_same && !(stride == 1 && (dilation * (kernel - 1)) % 2 == 0) {
        Padding::TfSame
    } else {
        Padding::Symmetric(((stride - 1) + dilation * (kernel - 1)) / 2)
    }
}

/// TF "SAME" padding for one spatial size: (before, after).
fn same_pad(size: i64, kernel: i64, stride: i64, dilation: i64) -> (i64, i64) {
    let out = (size + stride - 1) / stride;
    let pad = ((out - 1) * stride + (kernel - 1) * dilation + 1 - size).max(0);
    (pad / 2, pad - pad / 2)
}

/// Shape of a convolution to load.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub in_channels: i64,
    pub out_channels: i64,
    pub kernel: i64,
    pub stride: i64,
    pub groups: i64,
    pub padding: Padding,
}

impl ConvSpec {
    pub fn new(
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
        padding: Padding,
    ) -> Self {
        Self {
            in_channels,
            out_channels,
            kernel,
            stride,
            groups: 1,
            padding,
        }
    }

    pub fn depthwise(channels: i64, kernel: i64, stride: i64, padding: Padding) -> Self {
        Self {
            in_channels: channels,
            out_channels: channels,
            kernel,
            stride,
            groups: channels,
            padding,
        }
    }

    /// `groups` = `in_channels / group_size` (timm's `num_groups`).
    pub fn grouped(mut self, groups: i64) -> Self {
        self.groups = groups;
        self
    }

    fn weight_shape(&self) -> [i64; 4] {
        [
            self.out_channels,
            self.in_channels / self.groups,
            self.kernel,
            self.kernel,
        ]
    }
}

/// A 2-D convolution with an optional bias (where BatchNorm was folded in, the bias holds it).
#[derive(Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    spec: ConvSpec,
}

/// BatchNorm parameters in f64, for folding.
struct BatchNormParams {
    scale: Tensor,
    shift: Tensor,
}

impl BatchNormParams {
    /// Eval-mode BatchNorm as `x * scale + shift` (weight, bias, running stats under `w`).
    fn load(w: Scope, channels: i64, eps: f64) -> Result<Self> {
        let get = |name: &str| -> Result<Tensor> {
            Ok(w.get(name, &[channels])?.f_to_kind(Kind::Double)?)
        };
        let (gamma, beta, mean, var) = (
            get("weight")?,
            get("bias")?,
            get("running_mean")?,
            get("running_var")?,
        );
        let scale = gamma.f_div(&var.f_add_scalar(eps)?.f_sqrt()?)?;
        let shift = beta.f_sub(&mean.f_mul(&scale)?)?;
        Ok(Self { scale, shift })
    }
}

impl Conv2d {
    /// A convolution stored as `weight` (and `bias` when `bias`) under `w`.
    pub fn load(w: Scope, spec: ConvSpec, bias: bool) -> Result<Self> {
        let weight = w.get("weight", &spec.weight_shape())?;
        let bias = bias
            .then(|| w.get("bias", &[spec.out_channels]))
            .transpose()?;
        Ok(Self {
            weight: channels_last(w.place(weight)?)?,
            bias: bias.map(|b| w.place(b)).transpose()?,
            spec,
        })
    }

    /// A bias-free convolution followed by an eval-mode BatchNorm, folded into one convolution:
    /// `w' = w * gamma / sqrt(var + eps)`, `b' = beta - mean * gamma / sqrt(var + eps)`, in f64.
    /// This removes a full pass over every activation map; results differ from the unfolded
    /// layers by rounding only. `conv` and `bn` are the two modules' scopes (usually siblings).
    pub fn load_with_batch_norm(conv: Scope, bn: Scope, spec: ConvSpec, eps: f64) -> Result<Self> {
        let weight = conv
            .get("weight", &spec.weight_shape())?
            .f_to_kind(Kind::Double)?;
        let bn = BatchNormParams::load(bn, spec.out_channels, eps)?;
        let weight = weight
            .f_mul(&bn.scale.f_view([-1, 1, 1, 1])?)?
            .f_to_kind(Kind::Float)?;
        let bias = bn.shift.f_to_kind(Kind::Float)?;
        Ok(Self {
            weight: channels_last(conv.place(weight)?)?,
            bias: Some(conv.place(bias)?),
            spec,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let s = &self.spec;
        match s.padding {
            Padding::Symmetric(p) => x.conv2d(
                &self.weight,
                self.bias.as_ref(),
                [s.stride],
                [p],
                [1],
                s.groups,
            ),
            Padding::TfSame => {
                let (h, w) = (x.size()[2], x.size()[3]);
                let (top, bottom) = same_pad(h, s.kernel, s.stride, 1);
                let (left, right) = same_pad(w, s.kernel, s.stride, 1);
                let padded = x.constant_pad_nd([left, right, top, bottom]);
                padded.conv2d(
                    &self.weight,
                    self.bias.as_ref(),
                    [s.stride],
                    [0],
                    [1],
                    s.groups,
                )
            }
        }
    }
}

/// `nn.Linear`, accepting `[o, i]` or `[o, i, 1, 1]` checkpoints.
#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn load(w: Scope, in_features: i64, out_features: i64, bias: bool) -> Result<Self> {
        let weight = w.get("weight", &[out_features, in_features])?;
        let bias = bias.then(|| w.get("bias", &[out_features])).transpose()?;
        Ok(Self {
            weight: w.place(weight)?,
            bias: bias.map(|b| w.place(b)).transpose()?,
        })
    }

    /// A 1x1 convolution (`[o, i, 1, 1]` in the checkpoint) applied as a matrix product.
    pub fn load_pointwise_conv(w: Scope, in_features: i64, out_features: i64) -> Result<Self> {
        let weight = w.get("weight", &[out_features, in_features, 1, 1])?;
        let bias = w.get("bias", &[out_features])?;
        Ok(Self {
            weight: w.place(weight.f_reshape([out_features, in_features])?)?,
            bias: Some(w.place(bias)?),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// LayerNorm over the channels of an NCHW map (timm's `LayerNorm2d`).
#[derive(Debug)]
pub struct LayerNorm2d {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    channels: i64,
}

impl LayerNorm2d {
    pub fn load(w: Scope, channels: i64, eps: f64) -> Result<Self> {
        let weight = w.get("weight", &[channels])?;
        let bias = w.get("bias", &[channels])?;
        Ok(Self {
            weight: w.place(weight)?,
            bias: w.place(bias)?,
            eps,
            channels,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.permute([0, 2, 3, 1])
            .layer_norm(
                [self.channels],
                Some(&self.weight),
                Some(&self.bias),
                self.eps,
                false,
            )
            .permute([0, 3, 1, 2])
    }
}

/// An eval-mode BatchNorm that cannot be folded into a neighbouring convolution.
#[derive(Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
}

impl BatchNorm2d {
    pub fn load(w: Scope, channels: i64, eps: f64) -> Result<Self> {
        let get = |name: &str| -> Result<Tensor> { w.get(name, &[channels]) };
        let (weight, bias, mean, var) = (
            get("weight")?,
            get("bias")?,
            get("running_mean")?,
            get("running_var")?,
        );
        Ok(Self {
            weight: w.place(weight)?,
            bias: w.place(bias)?,
            running_mean: w.place(mean)?,
            running_var: w.place(var)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            false,
            0.1,
            self.eps,
            true,
        )
    }
}

/// Squeeze-and-excitation: global average, reduce, activation, expand, sigmoid gate. The 1x1
/// convolutions run as matrix products on the pooled vector.
#[derive(Debug)]
pub struct SqueezeExcite {
    reduce: Linear,
    expand: Linear,
    act: Act,
}

impl SqueezeExcite {
    /// `names` are the module names of the reduce and expand convolutions under `w` (timm
    /// EfficientNet: `conv_reduce`/`conv_expand`; CoAtNet: `fc1`/`fc2`).
    pub fn load(
        w: Scope,
        names: (&str, &str),
        channels: i64,
        reduced: i64,
        act: Act,
    ) -> Result<Self> {
        Ok(Self {
            reduce: Linear::load_pointwise_conv(w.pp(names.0), channels, reduced)?,
            expand: Linear::load_pointwise_conv(w.pp(names.1), reduced, channels)?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let pooled = x.mean_dim([2i64, 3].as_slice(), false, x.kind());
        let gate = self
            .expand
            .forward(&self.act.apply(self.reduce.forward(&pooled)))
            .sigmoid();
        let (b, c) = (gate.size()[0], gate.size()[1]);
        x * gate.view([b, c, 1, 1])
    }
}

/// timm's `GlobalContext` attention (fuse_scale only): softmax-weighted spatial context, an MLP
/// with LayerNorm2d, and a sigmoid gate.
#[derive(Debug)]
pub struct GlobalContext {
    conv_attn: Conv2d,
    fc1: Conv2d,
    norm: LayerNorm2d,
    fc2: Conv2d,
    act: Act,
}

impl GlobalContext {
    pub fn load(w: Scope, channels: i64, reduced: i64, act: Act) -> Result<Self> {
        let pointwise = |i, o| ConvSpec::new(i, o, 1, 1, Padding::Symmetric(0));
        let mlp = w.pp("mlp_scale");
        Ok(Self {
            conv_attn: Conv2d::load(w.pp("conv_attn"), pointwise(channels, 1), true)?,
            fc1: Conv2d::load(mlp.pp("fc1"), pointwise(channels, reduced), true)?,
            norm: LayerNorm2d::load(mlp.pp("norm"), reduced, 1e-6)?,
            fc2: Conv2d::load(mlp.pp("fc2"), pointwise(reduced, channels), true)?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let [b, c, h, w] = x.size()[..] else {
            unreachable!("NCHW input")
        };
        let attn = self
            .conv_attn
            .forward(x)
            .reshape([b, 1, h * w])
            .softmax(-1, x.kind())
            .unsqueeze(3);
        let context = x
            .reshape([b, c, h * w])
            .unsqueeze(1)
            .matmul(&attn)
            .view([b, c, 1, 1]);
        let mlp = self.fc2.forward(
            &self
                .act
                .apply(self.norm.forward(&self.fc1.forward(&context))),
        );
        x * mlp.sigmoid()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf_same_padding_puts_the_extra_pixel_last() {
        assert_eq!(same_pad(224, 3, 2, 1), (0, 1));
        assert_eq!(same_pad(225, 3, 2, 1), (1, 1));
        assert_eq!(same_pad(300, 5, 2, 1), (1, 2));
        assert_eq!(same_pad(7, 3, 1, 1), (1, 1));
    }

    #[test]
    fn timm_padding_is_static_for_stride_one() {
        assert_eq!(timm_padding(true, 3, 1, 1), Padding::Symmetric(1));
        assert_eq!(timm_padding(true, 5, 2, 1), Padding::TfSame);
        assert_eq!(timm_padding(false, 5, 2, 1), Padding::Symmetric(2));
        assert_eq!(timm_padding(false, 3, 2, 1), Padding::Symmetric(1));
        assert_eq!(timm_padding(false, 1, 1, 1), Padding::Symmetric(0));
    }
}
