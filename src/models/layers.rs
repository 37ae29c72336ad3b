//! Building blocks shared by the native architectures, in inference form: BatchNorm is folded
//! into the convolution before it at load time, and every layer only has a forward pass,
//! written against [`Ops`] so that it runs eagerly on libtorch or is recorded as a graph.

pub use super::ops::{Act, ConvSpec, Padding, Pool};
use super::ops::{BatchNormWeights, Ops};
use super::weights::{Param, Scope};
use anyhow::Result;
use tch::{Kind, Tensor};

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

/// timm's padding choice: `''` pads symmetrically; `'same'` is static (symmetric) when the
/// stride is 1 and dynamic TF padding otherwise.
pub fn timm_padding(tf_same: bool, kernel: i64, stride: i64, dilation: i64) -> Padding {
    if tf_same && !(stride == 1 && (dilation * (kernel - 1)) % 2 == 0) {
        Padding::TfSame
    } else {
        Padding::Symmetric(((stride - 1) + dilation * (kernel - 1)) / 2)
    }
}

/// A 2-D convolution with an optional bias (where BatchNorm was folded in, the bias holds it).
#[derive(Debug)]
pub struct Conv2d {
    weight: Param,
    bias: Option<Param>,
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
            weight: w.param("weight", weight)?.map(channels_last)?,
            bias: bias.map(|b| w.param("bias", b)).transpose()?,
            spec,
        })
    }

    /// A bias-free convolution followed by an eval-mode BatchNorm, folded into one convolution:
    /// `w' = w * gamma / sqrt(var + eps)`, `b' = beta - mean * gamma / sqrt(var + eps)`, in f64.
    /// This removes a full pass over every activation map; results differ from the unfolded
    /// layers by rounding only. `conv` and `bn` are the two modules' scopes (usually siblings);
    /// the folded weights keep the convolution's keys.
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
            weight: conv.param("weight", weight)?.map(channels_last)?,
            bias: Some(conv.param("bias", bias)?),
            spec,
        })
    }

    pub fn forward<O: Ops>(&self, o: &mut O, x: &O::Value) -> O::Value {
        o.conv2d(x, &self.weight, self.bias.as_ref(), &self.spec)
    }
}

/// `nn.Linear`, accepting `[o, i]` or `[o, i, 1, 1]` checkpoints.
#[derive(Debug)]
pub struct Linear {
    weight: Param,
    bias: Option<Param>,
}

impl Linear {
    pub fn load(w: Scope, in_features: i64, out_features: i64, bias: bool) -> Result<Self> {
        let weight = w.get("weight", &[out_features, in_features])?;
        let bias = bias.then(|| w.get("bias", &[out_features])).transpose()?;
        Ok(Self {
            weight: w.param("weight", weight)?,
            bias: bias.map(|b| w.param("bias", b)).transpose()?,
        })
    }

    /// A 1x1 convolution (`[o, i, 1, 1]` in the checkpoint) applied as a matrix product.
    pub fn load_pointwise_conv(w: Scope, in_features: i64, out_features: i64) -> Result<Self> {
        let weight = w.get("weight", &[out_features, in_features, 1, 1])?;
        let bias = w.get("bias", &[out_features])?;
        Ok(Self {
            weight: w.param("weight", weight.f_reshape([out_features, in_features])?)?,
            bias: Some(w.param("bias", bias)?),
        })
    }

    pub fn forward<O: Ops>(&self, o: &mut O, x: &O::Value) -> O::Value {
        o.linear(x, &self.weight, self.bias.as_ref())
    }
}

/// LayerNorm over the channels of an NCHW map (timm's `LayerNorm2d`).
#[derive(Debug)]
pub struct LayerNorm2d {
    weight: Param,
    bias: Param,
    eps: f64,
}

impl LayerNorm2d {
    pub fn load(w: Scope, channels: i64, eps: f64) -> Result<Self> {
        let weight = w.get("weight", &[channels])?;
        let bias = w.get("bias", &[channels])?;
        Ok(Self {
            weight: w.param("weight", weight)?,
            bias: w.param("bias", bias)?,
            eps,
        })
    }

    pub fn forward<O: Ops>(&self, o: &mut O, x: &O::Value) -> O::Value {
        o.layer_norm_channels(x, &self.weight, &self.bias, self.eps)
    }
}

/// An eval-mode BatchNorm that cannot be folded into a neighbouring convolution.
#[derive(Debug)]
pub struct BatchNorm2d {
    weights: BatchNormWeights,
    eps: f64,
}

impl BatchNorm2d {
    pub fn load(w: Scope, channels: i64, eps: f64) -> Result<Self> {
        let param = |name: &str| -> Result<Param> { w.param(name, w.get(name, &[channels])?) };
        Ok(Self {
            weights: BatchNormWeights {
                weight: param("weight")?,
                bias: param("bias")?,
                running_mean: param("running_mean")?,
                running_var: param("running_var")?,
            },
            eps,
        })
    }

    pub fn forward<O: Ops>(&self, o: &mut O, x: &O::Value) -> O::Value {
        o.batch_norm(x, &self.weights, self.eps)
    }
}

/// Squeeze-and-excitation: global average, reduce, activation, expand, sigmoid gate. The 1x1
/// convolutions run as matrix products on the pooled vector.
#[derive(Debug)]
pub struct SqueezeExcite {
    reduce: Linear,
    expand: Linear,
    act: Act,
    channels: i64,
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
            channels,
        })
    }

    pub fn forward<O: Ops>(&self, o: &mut O, x: &O::Value) -> O::Value {
        let pooled = o.mean_spatial(x);
        let reduced = self.reduce.forward(o, &pooled);
        let reduced = self.act.apply(o, reduced);
        let gate = self.expand.forward(o, &reduced);
        let gate = o.sigmoid(&gate);
        let gate = o.reshape(&gate, &[-1, self.channels, 1, 1]);
        o.mul(x, &gate)
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

    pub fn forward<O: Ops>(&self, o: &mut O, x: &O::Value) -> O::Value {
        let [_, c, h, w] = o.shape(x)[..] else {
            unreachable!("NCHW input")
        };
        let attn = self.conv_attn.forward(o, x);
        let attn = o.reshape(&attn, &[-1, 1, h * w]);
        let attn = o.softmax(&attn, -1);
        let attn = o.unsqueeze(&attn, 3);
        let flat = o.reshape(x, &[-1, c, h * w]);
        let flat = o.unsqueeze(&flat, 1);
        let context = o.matmul(&flat, &attn);
        let context = o.reshape(&context, &[-1, c, 1, 1]);
        let mlp = self.fc1.forward(o, &context);
        let mlp = self.norm.forward(o, &mlp);
        let mlp = self.act.apply(o, mlp);
        let mlp = self.fc2.forward(o, &mlp);
        let gate = o.sigmoid(&mlp);
        o.mul(x, &gate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timm_padding_is_static_for_stride_one() {
        assert_eq!(timm_padding(true, 3, 1, 1), Padding::Symmetric(1));
        assert_eq!(timm_padding(true, 5, 2, 1), Padding::TfSame);
        assert_eq!(timm_padding(false, 5, 2, 1), Padding::Symmetric(2));
        assert_eq!(timm_padding(false, 3, 2, 1), Padding::Symmetric(1));
        assert_eq!(timm_padding(false, 1, 1, 1), Padding::Symmetric(0));
    }
}
