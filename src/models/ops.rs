//! The operations the native architectures are written in, and the reference that runs them.
//!
//! A model file describes its network once, as calls on an [`Ops`]: which layer, in which
//! order, with which weights. Two implementations run that description:
//! - [`Eager`] executes each operation on libtorch as it is called. It makes exactly the calls
//!   the model files made before they were written against this trait, so its outputs are the
//!   reference, bit for bit;
//! - `onnx::Graph` records each operation as ONNX nodes, with the weights as initializers, for
//!   OpenVINO (the `openvino` backend) or any other ONNX runtime (`visionserve export`).
//!
//! The operations are the few these families need, at the level their layers think in
//! (a convolution with its padding rule, LayerNorm over the channels of an NCHW map,
//! attention with an additive bias), so that each implementation can map them to its best
//! primitive. Shapes use -1 for the batch wherever a model reshapes: a graph does not know it.

use super::weights::Param;
use tch::Tensor;

/// What a model file's forward pass is written against. `Value` is a tensor flowing through
/// the network: a libtorch tensor, or an edge of a graph being built.
///
/// Methods that take a value by value may reuse its memory: pass only a value computed for
/// this purpose, never one that is still read elsewhere (see [`Ops::share`]).
pub trait Ops {
    type Value;

    /// The dimensions of `x`, the batch as -1 where it is not known (a graph's input).
    fn shape(&self, x: &Self::Value) -> Vec<i64>;

    /// Another handle to `x`, for a branch that reads it later (a shortcut).
    fn share(&self, x: &Self::Value) -> Self::Value;

    /// A 2-D convolution, padded as `spec` says, with an optional bias.
    fn conv2d(
        &mut self,
        x: &Self::Value,
        weight: &Param,
        bias: Option<&Param>,
        spec: &ConvSpec,
    ) -> Self::Value;

    /// `x @ weight^T + bias` over the last dimension (`nn.Linear`).
    fn linear(&mut self, x: &Self::Value, weight: &Param, bias: Option<&Param>) -> Self::Value;

    /// LayerNorm over the channels of an NCHW map (timm's `LayerNorm2d`).
    fn layer_norm_channels(
        &mut self,
        x: &Self::Value,
        weight: &Param,
        bias: &Param,
        eps: f64,
    ) -> Self::Value;

    /// An eval-mode BatchNorm over the channels of an NCHW map.
    fn batch_norm(&mut self, x: &Self::Value, norm: &BatchNormWeights, eps: f64) -> Self::Value;

    /// `act(x)`, reusing `x`'s memory.
    fn activation(&mut self, x: Self::Value, act: Act) -> Self::Value;

    fn sigmoid(&mut self, x: &Self::Value) -> Self::Value;

    fn tanh(&mut self, x: &Self::Value) -> Self::Value;

    /// `a + b`, as a new value. The order matters to the reference: libtorch lays the sum
    /// out like `a` where the two are laid out differently, and later kernels follow layouts.
    fn add(&mut self, a: &Self::Value, b: &Self::Value) -> Self::Value;

    /// `x + other`, reusing `x`'s memory (`x += other`).
    fn add_into(&mut self, x: Self::Value, other: &Self::Value) -> Self::Value;

    /// `x * other`, broadcast, as a new value.
    fn mul(&mut self, x: &Self::Value, other: &Self::Value) -> Self::Value;

    /// `x * gamma` (LayerScale), reusing `x`'s memory.
    fn scale(&mut self, x: Self::Value, gamma: &Param) -> Self::Value;

    /// The mean over the spatial dimensions: `[B, C, H, W]` to `[B, C]`.
    fn mean_spatial(&mut self, x: &Self::Value) -> Self::Value;

    /// Global average pooling that keeps the map's rank: `[B, C, H, W]` to `[B, C, 1, 1]`.
    fn global_average_pool(&mut self, x: &Self::Value) -> Self::Value;

    /// Every dimension after the batch in one: `[B, ...]` to `[B, N]`.
    fn flatten(&mut self, x: &Self::Value) -> Self::Value;

    fn pool(&mut self, x: &Self::Value, pool: Pool) -> Self::Value;

    fn softmax(&mut self, x: &Self::Value, dim: i64) -> Self::Value;

    fn matmul(&mut self, a: &Self::Value, b: &Self::Value) -> Self::Value;

    fn reshape(&mut self, x: &Self::Value, shape: &[i64]) -> Self::Value;

    fn unsqueeze(&mut self, x: &Self::Value, dim: i64) -> Self::Value;

    /// `len` entries of dimension `dim` from `start`.
    fn narrow(&mut self, x: &Self::Value, dim: i64, start: i64, len: i64) -> Self::Value;

    /// The last two dimensions swapped, laid out contiguously.
    fn transpose_last(&mut self, x: &Self::Value) -> Self::Value;

    /// Scaled dot-product attention of `[B, heads, N, d]` queries, keys and values, with an
    /// additive `bias` on the scores.
    fn attention(
        &mut self,
        q: &Self::Value,
        k: &Self::Value,
        v: &Self::Value,
        bias: &Param,
    ) -> Self::Value;
}

/// An eval-mode BatchNorm's four tensors.
#[derive(Debug)]
pub struct BatchNormWeights {
    pub weight: Param,
    pub bias: Param,
    pub running_mean: Param,
    pub running_var: Param,
}

// ---------------------------------------------------------------------------------------------
// What the operations take

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
    /// `self(x)`, reusing `x`'s memory: pass a freshly computed value.
    pub fn apply<O: Ops>(self, o: &mut O, x: O::Value) -> O::Value {
        o.activation(x, self)
    }
}

/// Spatial pooling with stride 2, as CoAtNet's downsampling uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// AvgPool2d(2, 2).
    Avg2,
    /// MaxPool2d(3, 2, padding 1).
    Max,
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

    /// TF "SAME" padding for an input of `height` x `width`: `[top, bottom, left, right]`.
    pub fn tf_same_pads(&self, height: i64, width: i64) -> [i64; 4] {
        let (top, bottom) = same_pad(height, self.kernel, self.stride, 1);
        let (left, right) = same_pad(width, self.kernel, self.stride, 1);
        [top, bottom, left, right]
    }

    pub fn weight_shape(&self) -> [i64; 4] {
        [
            self.out_channels,
            self.in_channels / self.groups,
            self.kernel,
            self.kernel,
        ]
    }
}

/// Runs each operation on libtorch at once: the reference implementation.
#[derive(Debug, Default, Clone, Copy)]
pub struct Eager;

impl Ops for Eager {
    type Value = Tensor;

    fn shape(&self, x: &Tensor) -> Vec<i64> {
        x.size()
    }

    fn share(&self, x: &Tensor) -> Tensor {
        x.shallow_clone()
    }

    fn conv2d(&mut self, x: &Tensor, weight: &Param, bias: Option<&Param>, s: &ConvSpec) -> Tensor {
        let (weight, bias) = (weight.tensor(), bias.map(Param::tensor));
        match s.padding {
            Padding::Symmetric(p) => x.conv2d(weight, bias, [s.stride], [p], [1], s.groups),
            Padding::TfSame => {
                let [top, bottom, left, right] = s.tf_same_pads(x.size()[2], x.size()[3]);
                let padded = x.constant_pad_nd([left, right, top, bottom]);
                padded.conv2d(weight, bias, [s.stride], [0], [1], s.groups)
            }
        }
    }

    fn linear(&mut self, x: &Tensor, weight: &Param, bias: Option<&Param>) -> Tensor {
        x.linear(weight.tensor(), bias.map(Param::tensor))
    }

    fn layer_norm_channels(
        &mut self,
        x: &Tensor,
        weight: &Param,
        bias: &Param,
        eps: f64,
    ) -> Tensor {
        let channels = weight.tensor().size()[0];
        x.permute([0, 2, 3, 1])
            .layer_norm(
                [channels],
                Some(weight.tensor()),
                Some(bias.tensor()),
                eps,
                false,
            )
            .permute([0, 3, 1, 2])
    }

    fn batch_norm(&mut self, x: &Tensor, norm: &BatchNormWeights, eps: f64) -> Tensor {
        x.batch_norm(
            Some(norm.weight.tensor()),
            Some(norm.bias.tensor()),
            Some(norm.running_mean.tensor()),
            Some(norm.running_var.tensor()),
            false,
            0.1,
            eps,
            true,
        )
    }

    fn activation(&mut self, mut x: Tensor, act: Act) -> Tensor {
        match act {
            Act::Identity => x,
            Act::Relu => x.relu_(),
            // nn.ReLU6 is hardtanh(0, 6): the same min/max as clamp.
            Act::Relu6 => x.clamp_(0.0, 6.0),
            Act::Silu => x.silu_(),
            Act::Gelu => x.gelu("none"),
        }
    }

    fn sigmoid(&mut self, x: &Tensor) -> Tensor {
        x.sigmoid()
    }

    fn tanh(&mut self, x: &Tensor) -> Tensor {
        x.tanh()
    }

    fn add(&mut self, a: &Tensor, b: &Tensor) -> Tensor {
        a + b
    }

    fn add_into(&mut self, mut x: Tensor, other: &Tensor) -> Tensor {
        x += other;
        x
    }

    fn mul(&mut self, x: &Tensor, other: &Tensor) -> Tensor {
        x * other
    }

    fn scale(&mut self, mut x: Tensor, gamma: &Param) -> Tensor {
        x *= gamma.tensor();
        x
    }

    fn mean_spatial(&mut self, x: &Tensor) -> Tensor {
        x.mean_dim([2i64, 3].as_slice(), false, x.kind())
    }

    fn global_average_pool(&mut self, x: &Tensor) -> Tensor {
        x.adaptive_avg_pool2d([1, 1])
    }

    fn flatten(&mut self, x: &Tensor) -> Tensor {
        x.flatten(1, -1)
    }

    fn pool(&mut self, x: &Tensor, pool: Pool) -> Tensor {
        match pool {
            Pool::Avg2 => x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>),
            Pool::Max => x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false),
        }
    }

    fn softmax(&mut self, x: &Tensor, dim: i64) -> Tensor {
        x.softmax(dim, x.kind())
    }

    fn matmul(&mut self, a: &Tensor, b: &Tensor) -> Tensor {
        a.matmul(b)
    }

    fn reshape(&mut self, x: &Tensor, shape: &[i64]) -> Tensor {
        x.reshape(shape)
    }

    fn unsqueeze(&mut self, x: &Tensor, dim: i64) -> Tensor {
        x.unsqueeze(dim)
    }

    fn narrow(&mut self, x: &Tensor, dim: i64, start: i64, len: i64) -> Tensor {
        x.narrow(dim, start, len)
    }

    fn transpose_last(&mut self, x: &Tensor) -> Tensor {
        x.transpose(-1, -2).contiguous()
    }

    fn attention(&mut self, q: &Tensor, k: &Tensor, v: &Tensor, bias: &Param) -> Tensor {
        // libtorch's fused kernel, with the bias as an additive mask, as timm runs it.
        Tensor::scaled_dot_product_attention(q, k, v, Some(bias.tensor()), 0.0, false, None, false)
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
        let spec = ConvSpec::new(3, 8, 3, 2, Padding::TfSame);
        assert_eq!(spec.tf_same_pads(224, 225), [0, 1, 1, 1]);
    }
}
