//! The layer library: every step of the classifier and of the abstraction detector's
//! maps. A [`Layer`] knows its parameter shape, its per-batch scratch buffers, how to
//! record its forward and backward dispatches, and its f64 CPU reference. A [`Stack`]
//! chains layers (the classifier is one, each abstraction map another) and owns the
//! buffers between them. Parameters live in one flat buffer ([`ParamLayout`]): each
//! parameterised layer of a stack takes the next slot.

use anyhow::{bail, Result};

use super::mlp::Dense;
use crate::gpu::conv::{
    conv_op, global_max_reference, im2col_reference, max_pool_reference, ConvArgs, ConvOp, Nhwc,
};
use crate::gpu::gate::{gate, gate_grad, gate_reference};
use crate::gpu::matmul::{matmul, shares_row_major_a, MatmulArgs, MatmulFlags, Schedule};
use crate::gpu::reduce::column_sums;
use crate::gpu::{Dispatch, GpuContext, Slice};

/// Tensors start on 256-byte boundaries: WebGPU's largest storage offset alignment.
const ALIGN: usize = 64;

/// Offsets (in f32 elements) of every parameterised layer's kernel and bias in a flat
/// buffer (one buffer, so Adam is one dispatch).
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub layers: Vec<LayerSlot>,
    pub total: usize,
}

/// Where one layer's kernel (`fan_in x fan_out`, row-major) and bias sit.
#[derive(Clone, Copy, Debug)]
pub struct LayerSlot {
    pub fan_in: usize,
    pub fan_out: usize,
    pub kernel: usize,
    pub bias: usize,
}

impl ParamLayout {
    /// Slots for layers of the given (fan_in, fan_out).
    pub fn for_dims(dims: &[(usize, usize)]) -> Self {
        let mut total = 0;
        let mut take = |len: usize| {
            let at = total;
            total += len.div_ceil(ALIGN) * ALIGN;
            at
        };
        let layers = dims
            .iter()
            .map(|&(fan_in, fan_out)| LayerSlot {
                fan_in,
                fan_out,
                kernel: take(fan_in * fan_out),
                bias: take(fan_out),
            })
            .collect();
        ParamLayout { layers, total }
    }

    pub fn flatten(&self, layers: &[Dense]) -> Vec<f32> {
        let mut flat = vec![0f32; self.total];
        for (s, d) in self.layers.iter().zip(layers) {
            flat[s.kernel..s.kernel + d.kernel.len()].copy_from_slice(&d.kernel);
            flat[s.bias..s.bias + d.bias.len()].copy_from_slice(&d.bias);
        }
        flat
    }

    pub fn unflatten(&self, flat: &[f32]) -> Vec<Dense> {
        self.layers
            .iter()
            .map(|s| Dense {
                fan_in: s.fan_in,
                fan_out: s.fan_out,
                kernel: flat[s.kernel..s.kernel + s.fan_in * s.fan_out].to_vec(),
                bias: flat[s.bias..s.bias + s.fan_out].to_vec(),
            })
            .collect()
    }
}

/// The shape of one sample's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// HWC.
    Spatial {
        height: usize,
        width: usize,
        channels: usize,
    },
    Flat(usize),
}

impl Shape {
    pub fn width(self) -> usize {
        match self {
            Shape::Spatial {
                height,
                width,
                channels,
            } => height * width * channels,
            Shape::Flat(d) => d,
        }
    }

    pub fn channels(self) -> usize {
        self.nhwc(1).channels as usize
    }

    /// Spatial positions per sample (1 for a flat shape).
    pub fn positions(self) -> usize {
        self.width() / self.channels().max(1)
    }

    pub fn nhwc(self, rows: usize) -> Nhwc {
        match self {
            Shape::Spatial {
                height,
                width,
                channels,
            } => Nhwc::new(rows, height, width, channels),
            Shape::Flat(d) => Nhwc::new(rows, 1, 1, d),
        }
    }

    fn with_channels(self, channels: usize) -> Shape {
        match self {
            Shape::Spatial { height, width, .. } => Shape::Spatial {
                height,
                width,
                channels,
            },
            Shape::Flat(_) => Shape::Flat(channels),
        }
    }
}

/// One step of a network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// x·W + b, then ReLU if `relu`.
    Dense {
        fan_in: usize,
        fan_out: usize,
        relu: bool,
    },
    /// 3x3 SAME convolution + bias of a spatial input (im2col, then a matmul), then ReLU
    /// if `relu`. The kernel is `[9·in][out]`, the HWIO kernel flattened.
    Conv {
        input: Shape,
        out_channels: usize,
        relu: bool,
    },
    /// 2x2 max pool, stride 2 (odd sizes round down).
    MaxPool { input: Shape },
    /// Max over height and width, per channel.
    GlobalMaxPool { input: Shape },
    /// Elementwise gate x·sigmoid(s), the scores stored as a `[1][width]` kernel.
    Gate { width: usize },
}

impl Layer {
    pub fn output(self) -> Shape {
        match self {
            Layer::Dense { fan_out, .. } => Shape::Flat(fan_out),
            Layer::Conv {
                input,
                out_channels,
                ..
            } => input.with_channels(out_channels),
            Layer::MaxPool { input } => match input {
                Shape::Spatial {
                    height,
                    width,
                    channels,
                } => Shape::Spatial {
                    height: height / 2,
                    width: width / 2,
                    channels,
                },
                flat => flat,
            },
            Layer::GlobalMaxPool { input } => Shape::Flat(input.channels()),
            Layer::Gate { width } => Shape::Flat(width),
        }
    }

    /// (fan_in, fan_out) of the parameters, if it has any.
    pub fn params(self) -> Option<(usize, usize)> {
        match self {
            Layer::Dense {
                fan_in, fan_out, ..
            } => Some((fan_in, fan_out)),
            Layer::Conv {
                input,
                out_channels,
                ..
            } => Some((9 * input.channels(), out_channels)),
            Layer::Gate { width } => Some((1, width)),
            Layer::MaxPool { .. } | Layer::GlobalMaxPool { .. } => None,
        }
    }

    /// The stored kernel's shape: HWIO for a conv, `[fan_in, fan_out]` otherwise.
    pub fn kernel_shape(self) -> Vec<usize> {
        let (fan_in, fan_out) = self.params().unwrap_or((0, 0));
        match self {
            Layer::Conv { .. } => vec![3, 3, fan_in / 9, fan_out],
            _ => vec![fan_in, fan_out],
        }
    }

    /// Whether a ReLU ends the layer (its consumer masks the gradient it passes back).
    pub fn relu(self) -> bool {
        matches!(
            self,
            Layer::Dense { relu: true, .. } | Layer::Conv { relu: true, .. }
        )
    }

    /// Per-sample sizes of the scratch buffers: (im2col columns, argmax entries).
    fn scratch(self) -> (usize, usize) {
        match self {
            Layer::Conv { input, .. } => (input.positions() * 9 * input.channels(), 0),
            Layer::MaxPool { .. } | Layer::GlobalMaxPool { .. } => (0, self.output().width()),
            Layer::Dense { .. } | Layer::Gate { .. } => (0, 0),
        }
    }

    /// The layer's scratch for a batch of `rows`: `input_grad` if its backward pass
    /// computes dL/dinput.
    pub fn buffers(
        self,
        ctx: &GpuContext,
        rows: usize,
        param_grads: bool,
        input_grad: bool,
    ) -> Result<LayerBuffers> {
        let (cols, argmax) = self.scratch();
        let buf = |name: &str, per: usize, on: bool| -> Result<Option<wgpu::Buffer>> {
            (on && per > 0)
                .then(|| ctx.zeros(name, rows * per))
                .transpose()
        };
        // Where row-major A loads are shared the forward reads the row-major columns the
        // parameter gradients need anyway: the K-major copy is not written at all.
        let rows_forward = match self {
            Layer::Conv { input, .. } => {
                param_grads && shares_row_major_a(ctx, 9 * input.channels())
            }
            _ => false,
        };
        Ok(LayerBuffers {
            cols_t: buf("cols_t", cols, !rows_forward)?,
            cols: buf("cols", cols, param_grads)?,
            dcols: buf("dcols", cols, input_grad)?,
            argmax: buf("argmax", argmax, true)?,
        })
    }

    /// The largest per-sample buffer the layer needs (to bound batch sizes).
    pub fn largest_buffer(self) -> usize {
        let (cols, argmax) = self.scratch();
        cols.max(argmax).max(self.output().width())
    }

    /// f64 reference of the forward pass of `rows` inputs.
    pub fn reference(self, params: Option<&Dense>, x: &[f64], rows: usize) -> Result<Vec<f64>> {
        let need = || params.ok_or_else(|| anyhow::anyhow!("{self:?} needs its parameters"));
        Ok(match self {
            Layer::Dense { relu, .. } => need()?.forward_reference(x, rows, relu),
            Layer::Conv { input, relu, .. } => {
                let cols = im2col_reference(x, input.nhwc(rows));
                need()?.forward_reference(&cols, rows * input.positions(), relu)
            }
            Layer::MaxPool { input } => max_pool_reference(x, input.nhwc(rows)).0,
            Layer::GlobalMaxPool { input } => global_max_reference(x, input.nhwc(rows)).0,
            Layer::Gate { width } => gate_reference(x, &need()?.kernel, width),
        })
    }
}

/// A layer's batch buffers beyond its input and output.
pub struct LayerBuffers {
    /// Conv: im2col of the input, K-major `[9·in][positions]` (the forward matmul's
    /// fast layout, unless it shares row-major loads) and, for parameter gradients,
    /// row-major `[positions][9·in]` (for dW = colsᵀ·g); with an input gradient, the
    /// columns' gradient.
    cols_t: Option<wgpu::Buffer>,
    cols: Option<wgpu::Buffer>,
    dcols: Option<wgpu::Buffer>,
    /// Pools: which input each output took (u32).
    argmax: Option<wgpu::Buffer>,
}

/// A layer's parameters: its slot in the flat `values` buffer.
#[derive(Clone, Copy)]
pub struct ParamRef<'a> {
    pub slot: LayerSlot,
    pub values: &'a wgpu::Buffer,
}

impl ParamRef<'_> {
    pub fn kernel(&self) -> Slice<'_> {
        let s = self.slot;
        Slice::new(self.values, s.kernel, s.fan_in * s.fan_out)
    }

    pub fn bias(&self) -> Slice<'_> {
        Slice::new(self.values, self.slot.bias, self.slot.fan_out)
    }
}

/// A layer applied to one batch.
#[derive(Clone, Copy)]
pub struct BoundLayer<'a> {
    pub layer: Layer,
    pub rows: usize,
    pub schedule: Schedule,
    pub params: Option<ParamRef<'a>>,
    pub buffers: &'a LayerBuffers,
}

/// A layer's forward pass: `out = layer(x)`. `x_t` is the input stored K-major (a dense
/// layer then reads it, skipping all-zero blocks if `sparse`).
#[derive(Clone, Copy)]
pub struct Forward<'a> {
    pub x: Slice<'a>,
    pub x_t: Option<Slice<'a>>,
    pub sparse: bool,
    pub out: Slice<'a>,
}

/// A layer's backward pass from `g` = dL/d(output), before the ReLU where the layer
/// has one (its consumer, or the loss, masks it). Writes (not adds) the layer's slot of
/// `grads` if given, and dL/dx to `gx` if given, masked where `mask` (the input, when
/// its producer ends in a ReLU) is not positive; pools can also write `gx_t`, the same
/// transposed, and a conv reads `g_t` (g transposed) when given.
#[derive(Clone, Copy)]
pub struct Backward<'a> {
    pub x: Slice<'a>,
    pub g: Slice<'a>,
    pub g_t: Option<Slice<'a>>,
    pub sparse: bool,
    pub grads: Option<&'a wgpu::Buffer>,
    pub gx: Option<Slice<'a>>,
    pub gx_t: Option<Slice<'a>>,
    pub mask: Option<Slice<'a>>,
}

impl BoundLayer<'_> {
    fn params(&self) -> Result<&ParamRef<'_>> {
        self.params
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("{:?}: no parameters bound", self.layer))
    }

    fn scratch<'b>(&self, b: &'b Option<wgpu::Buffer>, what: &str) -> Result<Slice<'b>> {
        b.as_ref()
            .map(Slice::whole)
            .ok_or_else(|| anyhow::anyhow!("{:?}: no {what} buffer", self.layer))
    }

    pub fn forward(&self, ctx: &GpuContext, io: &Forward<'_>) -> Result<Vec<Dispatch>> {
        let (rows, b) = (self.rows, self.buffers);
        Ok(match self.layer {
            Layer::Dense {
                fan_in,
                fan_out,
                relu,
            } => {
                let p = self.params()?;
                let flags = MatmulFlags {
                    a_kmajor: io.x_t.is_some(),
                    skip_zero_a: io.x_t.is_some() && io.sparse,
                    bias: true,
                    relu,
                    ..Default::default()
                };
                let args = MatmulArgs {
                    m: rows,
                    n: fan_out,
                    k: fan_in,
                    a: io.x_t.unwrap_or(io.x),
                    b: p.kernel(),
                    c: io.out,
                    bias: Some(p.bias()),
                    mask: None,
                };
                vec![matmul(ctx, flags, self.schedule, &args)?]
            }
            Layer::Conv {
                input,
                out_channels,
                relu,
            } => {
                let p = self.params()?;
                let (cols, cols_t) = (b.cols.as_ref().map(Slice::whole), b.cols_t.as_ref());
                let a = match cols_t {
                    Some(t) => Slice::whole(t),
                    None => self.scratch(&b.cols, "im2col")?,
                };
                let im2col = ConvArgs {
                    dst: cols,
                    dst_t: cols_t.map(Slice::whole),
                    ..ConvArgs::new(io.x, a)
                };
                let flags = MatmulFlags {
                    a_kmajor: cols_t.is_some(),
                    bias: true,
                    relu,
                    ..Default::default()
                };
                let args = MatmulArgs {
                    m: rows * input.positions(),
                    n: out_channels,
                    k: 9 * input.channels(),
                    a,
                    b: p.kernel(),
                    c: io.out,
                    bias: Some(p.bias()),
                    mask: None,
                };
                vec![
                    conv_op(ctx, ConvOp::Im2col, input.nhwc(rows), &im2col)?,
                    matmul(ctx, flags, self.schedule, &args)?,
                ]
            }
            Layer::MaxPool { input } | Layer::GlobalMaxPool { input } => {
                let op = match self.layer {
                    Layer::MaxPool { .. } => ConvOp::MaxPool,
                    _ => ConvOp::GlobalMax,
                };
                let args = ConvArgs {
                    argmax: Some(self.scratch(&b.argmax, "argmax")?),
                    ..ConvArgs::new(io.x, io.out)
                };
                vec![conv_op(ctx, op, input.nhwc(rows), &args)?]
            }
            Layer::Gate { width } => {
                vec![gate(
                    ctx,
                    rows,
                    width,
                    io.x,
                    self.params()?.kernel(),
                    io.out,
                )?]
            }
        })
    }

    pub fn backward(&self, ctx: &GpuContext, io: &Backward<'_>) -> Result<Vec<Dispatch>> {
        let (rows, b) = (self.rows, self.buffers);
        let unsupported = |what: &str| anyhow::anyhow!("{:?}: no {what} here", self.layer);
        let mut ops = Vec::new();
        match self.layer {
            Layer::Dense {
                fan_in, fan_out, ..
            } => {
                let p = self.params()?;
                if let Some(grads) = io.grads {
                    let w = WeightGrads {
                        slot: p.slot,
                        rows,
                        x: io.x,
                        g: io.g,
                        grads,
                        skip_zero_x: io.sparse,
                    };
                    ops.extend(weight_gradients(ctx, self.schedule, &w)?);
                }
                if let Some(gx) = io.gx {
                    // dx = (g · Wᵀ) ⊙ (x > 0), the mask fused into the matmul epilogue.
                    let flags = MatmulFlags {
                        b_nmajor: true,
                        relu_mask: io.mask.is_some(),
                        ..Default::default()
                    };
                    let args = MatmulArgs {
                        m: rows,
                        n: fan_in,
                        k: fan_out,
                        a: io.g,
                        b: p.kernel(),
                        c: gx,
                        bias: None,
                        mask: io.mask,
                    };
                    ops.push(matmul(ctx, flags, self.schedule, &args)?);
                }
            }
            Layer::Conv {
                input,
                out_channels,
                ..
            } => {
                let p = self.params()?;
                let positions = rows * input.positions();
                if let Some(grads) = io.grads {
                    let w = WeightGrads {
                        slot: p.slot,
                        rows: positions,
                        x: self.scratch(&b.cols, "row-major im2col")?,
                        g: io.g,
                        grads,
                        skip_zero_x: false,
                    };
                    ops.extend(weight_gradients(ctx, self.schedule, &w)?);
                }
                if let Some(gx) = io.gx {
                    if io.mask.is_some() {
                        return Err(unsupported("masked input gradient"));
                    }
                    let dcols = self.scratch(&b.dcols, "column gradient")?;
                    let flags = MatmulFlags {
                        a_kmajor: io.g_t.is_some(),
                        b_nmajor: true,
                        ..Default::default()
                    };
                    let args = MatmulArgs {
                        m: positions,
                        n: 9 * input.channels(),
                        k: out_channels,
                        a: io.g_t.unwrap_or(io.g),
                        b: p.kernel(),
                        c: dcols,
                        bias: None,
                        mask: None,
                    };
                    ops.push(matmul(ctx, flags, self.schedule, &args)?);
                    let col2im = ConvArgs::new(dcols, gx);
                    ops.push(conv_op(ctx, ConvOp::Col2im, input.nhwc(rows), &col2im)?);
                }
            }
            Layer::MaxPool { input } => {
                if let Some(gx) = io.gx {
                    let args = ConvArgs {
                        argmax: Some(self.scratch(&b.argmax, "argmax")?),
                        mask: io.mask,
                        dst_t: io.gx_t,
                        ..ConvArgs::new(io.g, gx)
                    };
                    ops.push(conv_op(ctx, ConvOp::MaxPoolGrad, input.nhwc(rows), &args)?);
                }
            }
            Layer::GlobalMaxPool { input } => {
                if let Some(gx) = io.gx {
                    if io.mask.is_some() {
                        return Err(unsupported("masked input gradient"));
                    }
                    let args = ConvArgs {
                        argmax: Some(self.scratch(&b.argmax, "argmax")?),
                        ..ConvArgs::new(io.g, gx)
                    };
                    ops.push(conv_op(
                        ctx,
                        ConvOp::GlobalMaxGrad,
                        input.nhwc(rows),
                        &args,
                    )?);
                }
            }
            Layer::Gate { width } => {
                if io.gx.is_some() {
                    return Err(unsupported("input gradient"));
                }
                if let Some(grads) = io.grads {
                    let p = self.params()?;
                    let dscores = Slice::new(grads, p.slot.kernel, width);
                    ops.push(gate_grad(
                        ctx,
                        rows,
                        width,
                        io.x,
                        p.kernel(),
                        io.g,
                        dscores,
                    )?);
                }
            }
        }
        Ok(ops)
    }
}

/// The operands of [`weight_gradients`]: `rows` inputs `x` (rows x fan_in) and output
/// gradients `g` (rows x fan_out) of the layer at `slot` of `grads`; `skip_zero_x` skips
/// all-zero input blocks (sparse inputs).
#[derive(Clone, Copy)]
struct WeightGrads<'a> {
    slot: LayerSlot,
    rows: usize,
    x: Slice<'a>,
    g: Slice<'a>,
    grads: &'a wgpu::Buffer,
    skip_zero_x: bool,
}

/// Parameter gradients of one dense (or im2col'd conv) layer: dW = xᵀ·g (the
/// row-major input is exactly xᵀ stored K-major) and db = column sums of g.
fn weight_gradients(
    ctx: &GpuContext,
    schedule: Schedule,
    w: &WeightGrads<'_>,
) -> Result<[Dispatch; 2]> {
    let s = w.slot;
    let flags = MatmulFlags {
        a_kmajor: true,
        skip_zero_a: w.skip_zero_x,
        ..Default::default()
    };
    let args = MatmulArgs {
        m: s.fan_in,
        n: s.fan_out,
        k: w.rows,
        a: w.x,
        b: w.g,
        c: Slice::new(w.grads, s.kernel, s.fan_in * s.fan_out),
        bias: None,
        mask: None,
    };
    Ok([
        matmul(ctx, flags, schedule, &args)?,
        column_sums(
            ctx,
            w.rows,
            s.fan_out,
            1.0,
            w.g,
            Slice::new(w.grads, s.bias, s.fan_out),
        )?,
    ])
}

/// Layers applied in sequence, input to output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stack {
    pub layers: Vec<Layer>,
}

/// What a stack's backward pass computes besides the gradients between its layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needs {
    /// Any backward pass at all.
    pub backward: bool,
    pub param_grads: bool,
    /// dL/d(the stack's input).
    pub input_grad: bool,
}

/// A stack's batch buffers: every layer's scratch, and the outputs (and, with a
/// backward pass, the output gradients) of every layer but the last, whose output and
/// gradient the caller owns.
pub struct StackBuffers {
    needs: Needs,
    pub acts: Vec<wgpu::Buffer>,
    grads: Vec<Option<wgpu::Buffer>>,
    /// The gradient transposed, where a conv's input gradient reads it (written by the
    /// max pool after it).
    grads_t: Vec<Option<wgpu::Buffer>>,
    scratch: Vec<LayerBuffers>,
}

/// A stack's forward pass: its input (and the input K-major, for a first dense layer),
/// and where the last layer writes.
#[derive(Clone, Copy)]
pub struct StackForward<'a> {
    pub x: Slice<'a>,
    pub x_t: Option<Slice<'a>>,
    pub sparse: bool,
    pub out: Slice<'a>,
}

/// A stack's backward pass from `g` = dL/d(output) (before the last layer's ReLU):
/// parameter gradients into `grads`, dL/dinput into `gx` (masked by `gx_mask`).
#[derive(Clone, Copy)]
pub struct StackBackward<'a> {
    pub x: Slice<'a>,
    pub sparse: bool,
    pub g: Slice<'a>,
    pub grads: Option<&'a wgpu::Buffer>,
    pub gx: Option<Slice<'a>>,
    pub gx_mask: Option<Slice<'a>>,
}

/// A stack applied to one batch, its parameters at `slots` of `values`.
#[derive(Clone, Copy)]
pub struct BoundStack<'a> {
    pub stack: &'a Stack,
    pub rows: usize,
    pub schedule: Schedule,
    pub slots: &'a [LayerSlot],
    pub values: &'a wgpu::Buffer,
    pub buffers: &'a StackBuffers,
}

impl Stack {
    pub fn new(layers: Vec<Layer>) -> Self {
        Stack { layers }
    }

    pub fn output(&self) -> Shape {
        self.layers.last().map_or(Shape::Flat(0), |l| l.output())
    }

    /// (fan_in, fan_out) of the parameterised layers, in order.
    pub fn param_dims(&self) -> Vec<(usize, usize)> {
        self.layers.iter().filter_map(|l| l.params()).collect()
    }

    /// The parameterised layers, in order.
    pub fn param_layers(&self) -> impl Iterator<Item = Layer> + '_ {
        self.layers.iter().copied().filter(|l| l.params().is_some())
    }

    /// The largest per-sample buffer (to bound batch sizes).
    pub fn largest_buffer(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.largest_buffer())
            .max()
            .unwrap_or(1)
    }

    /// Whether layer `i`'s backward pass computes its input gradient: the stack's input
    /// gradient is wanted, or a layer below has parameters whose gradients are.
    fn input_grad(&self, i: usize, needs: Needs) -> bool {
        let params_below = self.layers[..i].iter().any(|l| l.params().is_some());
        needs.backward && (needs.input_grad || (needs.param_grads && params_below))
    }

    pub fn buffers(&self, ctx: &GpuContext, rows: usize, needs: Needs) -> Result<StackBuffers> {
        let n = self.layers.len();
        let inner = &self.layers[..n.saturating_sub(1)];
        let zeros = |name: &str, l: &Layer| ctx.zeros(name, rows * l.output().width());
        Ok(StackBuffers {
            needs,
            acts: inner
                .iter()
                .map(|l| zeros("activation", l))
                .collect::<Result<_>>()?,
            grads: inner
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let read = self.input_grad(i + 1, needs);
                    read.then(|| zeros("gradient", l)).transpose()
                })
                .collect::<Result<_>>()?,
            grads_t: inner
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let read = matches!(l, Layer::Conv { .. }) && self.input_grad(i, needs);
                    let written = matches!(self.layers[i + 1], Layer::MaxPool { .. });
                    (read && written)
                        .then(|| zeros("gradient_t", l))
                        .transpose()
                })
                .collect::<Result<_>>()?,
            scratch: self
                .layers
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let param_grads = needs.backward && needs.param_grads;
                    l.buffers(ctx, rows, param_grads, self.input_grad(i, needs))
                })
                .collect::<Result<_>>()?,
        })
    }

    /// f64 reference: every layer's output for `rows` inputs, `params` holding the
    /// parameterised layers' in order.
    pub fn reference(&self, params: &[Dense], x: &[f64], rows: usize) -> Result<Vec<Vec<f64>>> {
        let mut params = params.iter();
        let mut outs: Vec<Vec<f64>> = Vec::new();
        for l in &self.layers {
            let p = if l.params().is_some() {
                params.next()
            } else {
                None
            };
            let input = outs.last().map_or(x, Vec::as_slice);
            outs.push(l.reference(p, input, rows)?);
        }
        Ok(outs)
    }
}

impl BoundStack<'_> {
    fn layer(&self, i: usize, slot: &mut usize) -> BoundLayer<'_> {
        let layer = self.stack.layers[i];
        let params = layer.params().map(|_| {
            let p = ParamRef {
                slot: self.slots[*slot],
                values: self.values,
            };
            *slot += 1;
            p
        });
        BoundLayer {
            layer,
            rows: self.rows,
            schedule: self.schedule,
            params,
            buffers: &self.buffers.scratch[i],
        }
    }

    /// Index of layer `i`'s first parameter slot.
    fn first_slot(&self, i: usize) -> usize {
        self.stack.layers[..i]
            .iter()
            .filter(|l| l.params().is_some())
            .count()
    }

    pub fn forward(&self, ctx: &GpuContext, io: &StackForward<'_>) -> Result<Vec<Dispatch>> {
        let b = self.buffers;
        let last = self.stack.layers.len() - 1;
        let mut slot = 0;
        let mut ops = Vec::new();
        for i in 0..=last {
            let layer = self.layer(i, &mut slot);
            let first = i == 0;
            let step = Forward {
                x: if first {
                    io.x
                } else {
                    Slice::whole(&b.acts[i - 1])
                },
                x_t: io.x_t.filter(|_| first),
                sparse: first && io.sparse,
                out: if i == last {
                    io.out
                } else {
                    Slice::whole(&b.acts[i])
                },
            };
            ops.extend(layer.forward(ctx, &step)?);
        }
        Ok(ops)
    }

    pub fn backward(&self, ctx: &GpuContext, io: &StackBackward<'_>) -> Result<Vec<Dispatch>> {
        let b = self.buffers;
        let layers = &self.stack.layers;
        let last = layers.len() - 1;
        if !b.needs.backward {
            bail!("backward needs buffers made for a backward pass");
        }
        let grad = |i: usize| -> Result<Slice<'_>> {
            b.grads[i]
                .as_ref()
                .map(Slice::whole)
                .ok_or_else(|| anyhow::anyhow!("backward needs buffers made for a backward pass"))
        };
        let mut ops = Vec::new();
        for i in (0..=last).rev() {
            let mut slot = self.first_slot(i);
            let layer = self.layer(i, &mut slot);
            let (x, gx, gx_t, mask) = if i == 0 {
                (io.x, io.gx, None, io.gx_mask)
            } else {
                let x = Slice::whole(&b.acts[i - 1]);
                let relu = layers[i - 1].relu();
                let gx_t = b.grads_t[i - 1].as_ref().map(Slice::whole);
                let gx = self
                    .stack
                    .input_grad(i, b.needs)
                    .then(|| grad(i - 1))
                    .transpose()?;
                (x, gx, gx_t, relu.then_some(x))
            };
            let step = Backward {
                x,
                g: if i == last { io.g } else { grad(i)? },
                g_t: b.grads_t.get(i).and_then(Option::as_ref).map(Slice::whole),
                sparse: i == 0 && io.sparse,
                grads: io.grads,
                gx,
                gx_t,
                mask,
            };
            ops.extend(layer.backward(ctx, &step)?);
        }
        Ok(ops)
    }
}
