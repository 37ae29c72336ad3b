//! A native network's forward pass recorded as an ONNX graph (opset 17), with the checkpoint's
//! weights as initializers named by their checkpoint keys: what the `openvino` backend
//! compiles, and what `visionserve export` writes for any other runtime.
//!
//! [`Graph`] implements [`Ops`]: running a model's `forward` on it records one or a few nodes
//! per operation instead of computing anything. It tracks every value's shape (the batch as
//! -1, a symbolic `batch` dimension in the graph), so that shape-dependent choices (TF "SAME"
//! padding, reshapes) are made once, at export, as the eager run makes them per batch.
//!
//! Operators without an opset-17 node are written as the patterns PyTorch's exporter writes
//! and runtimes fuse back: SiLU as `x * Sigmoid(x)`, exact GELU as
//! `x * 0.5 * (1 + Erf(x / sqrt 2))`, attention as MatMul, scale, bias, Softmax, MatMul.
//!
//! Graphs over 2 GiB (protobuf's limit for one message) keep their weights in a second file
//! next to the model (ONNX's external data), as every ONNX runtime expects.

use super::layers::{Act, ConvSpec, Padding, Pool};
use super::ops::{BatchNormWeights, Ops};
use super::weights::Param;
use anyhow::{bail, Context, Result};
use prost::Message;
use proto::tensor_proto::DataType;
use std::collections::HashSet;
use std::path::Path;
use tch::{Device, Kind};

/// ONNX's messages, compiled from `proto/onnx.proto` by build.rs.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

/// The operator set the graphs use.
pub const OPSET: i64 = 17;
/// The IR version that goes with [`OPSET`].
const IR_VERSION: i64 = 8;
/// The graph's input: normalised images, `[batch, 3, height, width]`.
pub const INPUT: &str = "input";
/// The graph's outputs: `[batch, classes]` and `[batch, features]`.
pub const LOGITS: &str = "logits";
pub const EMBEDDINGS: &str = "embeddings";
/// The name of the symbolic batch dimension.
pub const BATCH: &str = "batch";
/// Protobuf refuses messages of 2 GiB or more: above this, weights go to an external file.
const MAX_INLINE_BYTES: usize = (2 << 30) - (64 << 20);

/// A value in the graph being built: the name of the edge that carries it, and its shape
/// (the batch as -1).
#[derive(Debug, Clone, PartialEq)]
pub struct Edge {
    name: String,
    shape: Vec<i64>,
}

impl Edge {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn shape(&self) -> &[i64] {
        &self.shape
    }
}

/// A graph being recorded: nodes in execution order and the initializers they read.
#[derive(Default)]
pub struct Graph {
    nodes: Vec<proto::NodeProto>,
    initializers: Vec<proto::TensorProto>,
    /// Names of the initializers already added (a weight read twice is stored once).
    stored: HashSet<String>,
    /// Numbers the nodes and edges in order.
    count: usize,
}

/// An attribute of a node.
enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

impl Graph {
    /// The graph's input, `[batch, 3, height, width]`.
    pub fn input(height: i64, width: i64) -> Edge {
        Edge {
            name: INPUT.to_owned(),
            shape: vec![-1, 3, height, width],
        }
    }

    /// The whole model: `logits` and `embeddings` as its outputs, `metadata` as its
    /// `metadata_props` (what a user of the file needs to feed it: preprocessing, labels).
    pub fn finish(
        mut self,
        name: &str,
        input: &Edge,
        logits: Edge,
        embeddings: Edge,
        metadata: &[(&str, String)],
    ) -> OnnxModel {
        let logits = self.rename(logits, LOGITS);
        let embeddings = self.rename(embeddings, EMBEDDINGS);
        let graph = proto::GraphProto {
            name: Some(name.to_owned()),
            node: self.nodes,
            initializer: self.initializers,
            input: vec![value_info(input)],
            output: vec![value_info(&logits), value_info(&embeddings)],
            ..Default::default()
        };
        OnnxModel {
            proto: proto::ModelProto {
                ir_version: Some(IR_VERSION),
                opset_import: vec![proto::OperatorSetIdProto {
                    domain: Some(String::new()),
                    version: Some(OPSET),
                }],
                producer_name: Some(env!("CARGO_PKG_NAME").to_owned()),
                producer_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
                doc_string: Some(format!(
                    "{name}, exported by visionserve from its native model definition"
                )),
                graph: Some(graph),
                metadata_props: metadata
                    .iter()
                    .map(|(key, value)| proto::StringStringEntryProto {
                        key: Some((*key).to_owned()),
                        value: Some(value.clone()),
                    })
                    .collect(),
                ..Default::default()
            },
        }
    }

    /// `edge` under the graph-output name `name` (an Identity node, which runtimes remove).
    fn rename(&mut self, edge: Edge, name: &str) -> Edge {
        self.nodes
            .push(node("Identity", vec![edge.name], name, vec![]));
        Edge {
            name: name.to_owned(),
            shape: edge.shape,
        }
    }

    /// Add a node of `op` reading `inputs`; its output edge has `shape`.
    fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>, shape: Vec<i64>) -> Edge {
        self.count += 1;
        let name = format!("{}_{}", op.to_ascii_lowercase(), self.count);
        let inputs = inputs.iter().map(|i| (*i).to_owned()).collect();
        self.nodes.push(node(op, inputs, &name, attrs));
        Edge { name, shape }
    }

    /// The initializer holding `param` (added on first use), by name.
    fn weight(&mut self, param: &Param) -> String {
        let key = param.key().to_owned();
        if self.stored.insert(key.clone()) {
            self.initializers.push(float_tensor(&key, param));
        }
        key
    }

    /// A constant of `values` with `dims`.
    fn constant_f32(&mut self, values: &[f32], dims: &[i64]) -> String {
        self.count += 1;
        let name = format!("const_{}", self.count);
        self.initializers.push(proto::TensorProto {
            name: Some(name.clone()),
            dims: dims.to_vec(),
            data_type: Some(DataType::Float as i32),
            raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..Default::default()
        });
        name
    }

    fn scalar(&mut self, value: f32) -> String {
        self.constant_f32(&[value], &[])
    }

    fn constant_i64(&mut self, values: &[i64]) -> String {
        self.count += 1;
        let name = format!("const_{}", self.count);
        self.initializers.push(proto::TensorProto {
            name: Some(name.clone()),
            dims: vec![values.len() as i64],
            data_type: Some(DataType::Int64 as i32),
            raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..Default::default()
        });
        name
    }

    fn unary(&mut self, op: &str, x: &Edge) -> Edge {
        self.op(op, &[&x.name], vec![], x.shape.clone())
    }

    fn binary(&mut self, op: &str, a: &Edge, b: &str, b_shape: &[i64]) -> Edge {
        let shape = broadcast(&a.shape, b_shape);
        self.op(op, &[&a.name, b], vec![], shape)
    }

    fn transpose(&mut self, x: &Edge, perm: &[i64]) -> Edge {
        let shape = perm.iter().map(|&p| x.shape[p as usize]).collect();
        self.op(
            "Transpose",
            &[&x.name],
            vec![("perm", Attr::Ints(perm.to_vec()))],
            shape,
        )
    }
}

impl Ops for Graph {
    type Value = Edge;

    fn shape(&self, x: &Edge) -> Vec<i64> {
        x.shape.clone()
    }

    fn share(&self, x: &Edge) -> Edge {
        x.clone()
    }

    fn conv2d(&mut self, x: &Edge, weight: &Param, bias: Option<&Param>, s: &ConvSpec) -> Edge {
        let (h, w) = (x.shape[2], x.shape[3]);
        // ONNX orders pads as [top, left, bottom, right].
        let [top, bottom, left, right] = match s.padding {
            Padding::Symmetric(p) => [p; 4],
            Padding::TfSame => s.tf_same_pads(h, w),
        };
        let out =
            |size: i64, before: i64, after: i64| (size + before + after - s.kernel) / s.stride + 1;
        let shape = vec![
            x.shape[0],
            s.out_channels,
            out(h, top, bottom),
            out(w, left, right),
        ];
        let mut inputs = vec![x.name.clone(), self.weight(weight)];
        if let Some(bias) = bias {
            inputs.push(self.weight(bias));
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        self.op(
            "Conv",
            &inputs,
            vec![
                ("kernel_shape", Attr::Ints(vec![s.kernel, s.kernel])),
                ("strides", Attr::Ints(vec![s.stride, s.stride])),
                ("pads", Attr::Ints(vec![top, left, bottom, right])),
                ("dilations", Attr::Ints(vec![1, 1])),
                ("group", Attr::Int(s.groups)),
            ],
            shape,
        )
    }

    fn linear(&mut self, x: &Edge, weight: &Param, bias: Option<&Param>) -> Edge {
        let out_features = weight.tensor().size()[0];
        let mut inputs = vec![x.name.clone(), self.weight(weight)];
        if let Some(bias) = bias {
            inputs.push(self.weight(bias));
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let mut shape = x.shape.clone();
        *shape
            .last_mut()
            .expect("a linear layer's input has features") = out_features;
        self.op("Gemm", &inputs, vec![("transB", Attr::Int(1))], shape)
    }

    fn layer_norm_channels(&mut self, x: &Edge, weight: &Param, bias: &Param, eps: f64) -> Edge {
        let nhwc = self.transpose(x, &[0, 2, 3, 1]);
        let (scale, shift) = (self.weight(weight), self.weight(bias));
        let normed = self.op(
            "LayerNormalization",
            &[&nhwc.name, &scale, &shift],
            vec![
                ("axis", Attr::Int(-1)),
                ("epsilon", Attr::Float(eps as f32)),
            ],
            nhwc.shape.clone(),
        );
        self.transpose(&normed, &[0, 3, 1, 2])
    }

    fn batch_norm(&mut self, x: &Edge, norm: &BatchNormWeights, eps: f64) -> Edge {
        let inputs = [
            self.weight(&norm.weight),
            self.weight(&norm.bias),
            self.weight(&norm.running_mean),
            self.weight(&norm.running_var),
        ];
        self.op(
            "BatchNormalization",
            &[&x.name, &inputs[0], &inputs[1], &inputs[2], &inputs[3]],
            vec![("epsilon", Attr::Float(eps as f32))],
            x.shape.clone(),
        )
    }

    fn activation(&mut self, x: Edge, act: Act) -> Edge {
        match act {
            Act::Identity => x,
            Act::Relu => self.unary("Relu", &x),
            Act::Relu6 => {
                let (low, high) = (self.scalar(0.0), self.scalar(6.0));
                self.op("Clip", &[&x.name, &low, &high], vec![], x.shape.clone())
            }
            Act::Silu => {
                let gate = self.unary("Sigmoid", &x);
                self.binary("Mul", &x, &gate.name, &gate.shape)
            }
            Act::Gelu => {
                let root2 = self.scalar(std::f32::consts::SQRT_2);
                let scaled = self.binary("Div", &x, &root2, &[]);
                let erf = self.unary("Erf", &scaled);
                let one = self.scalar(1.0);
                let shifted = self.binary("Add", &erf, &one, &[]);
                let product = self.binary("Mul", &x, &shifted.name, &shifted.shape);
                let half = self.scalar(0.5);
                self.binary("Mul", &product, &half, &[])
            }
        }
    }

    fn sigmoid(&mut self, x: &Edge) -> Edge {
        self.unary("Sigmoid", x)
    }

    fn tanh(&mut self, x: &Edge) -> Edge {
        self.unary("Tanh", x)
    }

    fn add(&mut self, a: &Edge, b: &Edge) -> Edge {
        self.binary("Add", a, &b.name, &b.shape)
    }

    fn add_into(&mut self, x: Edge, other: &Edge) -> Edge {
        self.add(&x, other)
    }

    fn mul(&mut self, x: &Edge, other: &Edge) -> Edge {
        self.binary("Mul", x, &other.name, &other.shape)
    }

    fn scale(&mut self, x: Edge, gamma: &Param) -> Edge {
        let gamma_shape = gamma.tensor().size();
        let gamma = self.weight(gamma);
        self.binary("Mul", &x, &gamma, &gamma_shape)
    }

    fn mean_spatial(&mut self, x: &Edge) -> Edge {
        self.op(
            "ReduceMean",
            &[&x.name],
            vec![("axes", Attr::Ints(vec![2, 3])), ("keepdims", Attr::Int(0))],
            x.shape[..2].to_vec(),
        )
    }

    fn global_average_pool(&mut self, x: &Edge) -> Edge {
        let shape = vec![x.shape[0], x.shape[1], 1, 1];
        self.op("GlobalAveragePool", &[&x.name], vec![], shape)
    }

    fn flatten(&mut self, x: &Edge) -> Edge {
        let features = x.shape[1..].iter().product();
        self.op(
            "Flatten",
            &[&x.name],
            vec![("axis", Attr::Int(1))],
            vec![x.shape[0], features],
        )
    }

    fn pool(&mut self, x: &Edge, pool: Pool) -> Edge {
        let (op, kernel, pad) = match pool {
            Pool::Avg2 => ("AveragePool", 2, 0),
            Pool::Max => ("MaxPool", 3, 1),
        };
        let out = |size: i64| (size + 2 * pad - kernel) / 2 + 1;
        let shape = vec![x.shape[0], x.shape[1], out(x.shape[2]), out(x.shape[3])];
        self.op(
            op,
            &[&x.name],
            vec![
                ("kernel_shape", Attr::Ints(vec![kernel, kernel])),
                ("strides", Attr::Ints(vec![2, 2])),
                ("pads", Attr::Ints(vec![pad; 4])),
            ],
            shape,
        )
    }

    fn softmax(&mut self, x: &Edge, dim: i64) -> Edge {
        self.op(
            "Softmax",
            &[&x.name],
            vec![("axis", Attr::Int(dim))],
            x.shape.clone(),
        )
    }

    fn matmul(&mut self, a: &Edge, b: &Edge) -> Edge {
        let (ra, rb) = (a.shape.len(), b.shape.len());
        let mut shape = broadcast(&a.shape[..ra - 2], &b.shape[..rb - 2]);
        shape.extend([a.shape[ra - 2], b.shape[rb - 1]]);
        self.op("MatMul", &[&a.name, &b.name], vec![], shape)
    }

    fn reshape(&mut self, x: &Edge, shape: &[i64]) -> Edge {
        let target = self.constant_i64(shape);
        let known = x.shape.iter().all(|&d| d >= 0);
        let mut out = shape.to_vec();
        if known {
            let total: i64 = x.shape.iter().product();
            let rest: i64 = shape.iter().filter(|&&d| d >= 0).product();
            if let Some(free) = out.iter_mut().find(|d| **d < 0) {
                *free = total / rest.max(1);
            }
        }
        self.op("Reshape", &[&x.name, &target], vec![], out)
    }

    fn unsqueeze(&mut self, x: &Edge, dim: i64) -> Edge {
        let rank = x.shape.len() as i64 + 1;
        let dim = if dim < 0 { dim + rank } else { dim };
        let axes = self.constant_i64(&[dim]);
        let mut shape = x.shape.clone();
        shape.insert(dim as usize, 1);
        self.op("Unsqueeze", &[&x.name, &axes], vec![], shape)
    }

    fn narrow(&mut self, x: &Edge, dim: i64, start: i64, len: i64) -> Edge {
        let starts = self.constant_i64(&[start]);
        let ends = self.constant_i64(&[start + len]);
        let axes = self.constant_i64(&[dim]);
        let mut shape = x.shape.clone();
        shape[dim as usize] = len;
        self.op("Slice", &[&x.name, &starts, &ends, &axes], vec![], shape)
    }

    fn transpose_last(&mut self, x: &Edge) -> Edge {
        let rank = x.shape.len() as i64;
        let mut perm: Vec<i64> = (0..rank).collect();
        perm.swap(rank as usize - 1, rank as usize - 2);
        self.transpose(x, &perm)
    }

    fn attention(&mut self, q: &Edge, k: &Edge, v: &Edge, bias: &Param) -> Edge {
        let head_dim = *q
            .shape
            .last()
            .expect("attention inputs have a head dimension");
        let keys = self.transpose_last(k);
        let scores = self.matmul(q, &keys);
        let scale = self.scalar(1.0 / (head_dim as f32).sqrt());
        let scores = self.binary("Mul", &scores, &scale, &[]);
        let bias_shape = bias.tensor().size();
        let bias = self.weight(bias);
        let scores = self.binary("Add", &scores, &bias, &bias_shape);
        let weights = self.softmax(&scores, -1);
        self.matmul(&weights, v)
    }
}

/// NumPy broadcasting of two shapes, -1 (unknown) where either is unknown and the other not 1.
fn broadcast(a: &[i64], b: &[i64]) -> Vec<i64> {
    let rank = a.len().max(b.len());
    let dim = |s: &[i64], i: usize| {
        let offset = rank - s.len();
        if i < offset {
            1
        } else {
            s[i - offset]
        }
    };
    (0..rank)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (1, d) | (d, 1) => d,
            (x, y) if x == y => x,
            (x, y) => x.max(y),
        })
        .collect()
}

fn node(op: &str, inputs: Vec<String>, output: &str, attrs: Vec<(&str, Attr)>) -> proto::NodeProto {
    use proto::attribute_proto::AttributeType;
    proto::NodeProto {
        op_type: Some(op.to_owned()),
        name: Some(output.to_owned()),
        input: inputs,
        output: vec![output.to_owned()],
        attribute: attrs
            .into_iter()
            .map(|(name, value)| {
                let mut attr = proto::AttributeProto {
                    name: Some(name.to_owned()),
                    ..Default::default()
                };
                match value {
                    Attr::Int(i) => {
                        attr.r#type = Some(AttributeType::Int as i32);
                        attr.i = Some(i);
                    }
                    Attr::Ints(ints) => {
                        attr.r#type = Some(AttributeType::Ints as i32);
                        attr.ints = ints;
                    }
                    Attr::Float(f) => {
                        attr.r#type = Some(AttributeType::Float as i32);
                        attr.f = Some(f);
                    }
                }
                attr
            })
            .collect(),
        ..Default::default()
    }
}

/// An initializer holding `param`'s values as f32, in the standard (NCHW) layout.
fn float_tensor(name: &str, param: &Param) -> proto::TensorProto {
    let tensor = param
        .tensor()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let values = Vec::<f32>::try_from(tensor.flatten(0, -1)).unwrap_or_default();
    proto::TensorProto {
        name: Some(name.to_owned()),
        dims: tensor.size(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// A graph input's or output's type: f32 of `edge`'s shape, the batch symbolic.
fn value_info(edge: &Edge) -> proto::ValueInfoProto {
    use proto::tensor_shape_proto::dimension::Value;
    let dims = edge
        .shape
        .iter()
        .map(|&d| proto::tensor_shape_proto::Dimension {
            value: Some(if d < 0 {
                Value::DimParam(BATCH.to_owned())
            } else {
                Value::DimValue(d)
            }),
            ..Default::default()
        })
        .collect();
    proto::ValueInfoProto {
        name: Some(edge.name.clone()),
        r#type: Some(proto::TypeProto {
            value: Some(proto::type_proto::Value::TensorType(
                proto::type_proto::Tensor {
                    elem_type: Some(DataType::Float as i32),
                    shape: Some(proto::TensorShapeProto { dim: dims }),
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A finished ONNX model.
pub struct OnnxModel {
    proto: proto::ModelProto,
}

impl OnnxModel {
    pub fn proto(&self) -> &proto::ModelProto {
        &self.proto
    }

    /// Bytes of the weights stored in the graph.
    pub fn weight_bytes(&self) -> usize {
        self.proto
            .graph
            .iter()
            .flat_map(|g| &g.initializer)
            .map(|t| t.raw_data.as_ref().map_or(0, Vec::len))
            .sum()
    }

    /// Whether the model fits one protobuf message (under 2 GiB), weights included.
    pub fn fits_in_memory_buffer(&self) -> bool {
        self.proto.encoded_len() < MAX_INLINE_BYTES
    }

    /// The serialised model, weights included; an error for models over 2 GiB (see
    /// [`OnnxModel::write`]).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        if !self.fits_in_memory_buffer() {
            bail!(
                "the graph holds {} MiB of weights: over protobuf's 2 GiB limit for one message, \
                 so it can only be written with its weights in a separate file",
                self.weight_bytes() >> 20
            );
        }
        Ok(self.proto.encode_to_vec())
    }

    /// Write the model to `path`. A model over 2 GiB keeps its weights in `<path>.data` next
    /// to it (ONNX external data); the returned list names every file written.
    pub fn write(&self, path: &Path) -> Result<Vec<std::path::PathBuf>> {
        if self.fits_in_memory_buffer() {
            std::fs::write(path, self.proto.encode_to_vec())
                .with_context(|| format!("writing {}", path.display()))?;
            return Ok(vec![path.to_path_buf()]);
        }
        self.write_external(path)
    }

    /// Write the model to `path` with its weights in `<path>.data` beside it, whatever its
    /// size (tools that map weights from disk prefer it so).
    pub fn write_external(&self, path: &Path) -> Result<Vec<std::path::PathBuf>> {
        let data_path = path.with_file_name(format!(
            "{}.data",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("model.onnx")
        ));
        let location = data_path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("model.onnx.data")
            .to_owned();
        let mut model = self.proto.clone();
        let mut data = std::io::BufWriter::new(
            std::fs::File::create(&data_path)
                .with_context(|| format!("creating {}", data_path.display()))?,
        );
        let mut offset = 0u64;
        for tensor in model.graph.iter_mut().flat_map(|g| &mut g.initializer) {
            let Some(raw) = tensor.raw_data.take() else {
                continue;
            };
            // Page-aligned, so that runtimes can map each tensor instead of copying it.
            let padding = offset.next_multiple_of(4096) - offset;
            std::io::Write::write_all(&mut data, &vec![0u8; padding as usize])?;
            offset += padding;
            std::io::Write::write_all(&mut data, &raw)?;
            let entry = |key: &str, value: String| proto::StringStringEntryProto {
                key: Some(key.to_owned()),
                value: Some(value),
            };
            tensor.external_data = vec![
                entry("location", location.clone()),
                entry("offset", offset.to_string()),
                entry("length", raw.len().to_string()),
            ];
            tensor.data_location = Some(proto::tensor_proto::DataLocation::External as i32);
            offset += raw.len() as u64;
        }
        std::io::Write::flush(&mut data)?;
        std::fs::write(path, model.encode_to_vec())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(vec![path.to_path_buf(), data_path])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_broadcast_like_numpy_with_an_unknown_batch() {
        assert_eq!(broadcast(&[-1, 8, 4, 4], &[1, 8, 1, 1]), [-1, 8, 4, 4]);
        assert_eq!(broadcast(&[-1, 2, 9, 9], &[1, 2, 9, 9]), [-1, 2, 9, 9]);
        assert_eq!(broadcast(&[-1, 8, 4, 4], &[]), [-1, 8, 4, 4]);
        assert_eq!(broadcast(&[3], &[2, 1]), [2, 3]);
    }

    #[test]
    fn reshapes_infer_their_free_dimension_when_the_input_is_known() {
        let mut graph = Graph::default();
        let x = Edge {
            name: "x".into(),
            shape: vec![2, 6, 4],
        };
        assert_eq!(graph.reshape(&x, &[-1, 3, 16]).shape, [1, 3, 16]);
        let batch = Edge {
            name: "b".into(),
            shape: vec![-1, 6, 4],
        };
        assert_eq!(graph.reshape(&batch, &[-1, 24]).shape, [-1, 24]);
    }
}
