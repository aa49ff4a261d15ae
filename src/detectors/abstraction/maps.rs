//! The learned maps of the abstraction detector, for MLPs and CNNs alike: each τ and
//! each abstract computational step is one [`Map`], recorded on the GPU (forward and
//! backward) and mirrored by an f64 reference. A CNN's conv activations get conv maps,
//! as in cupbearer 0.0.1: τ = a 3x3 SAME conv to fewer channels, a step between conv
//! states = conv + ReLU + 2x2 max pool, the step into the first dense state = global
//! max pool + dense + ReLU.

use anyhow::Result;

use crate::gpu::conv::{conv_op, ConvArgs, ConvOp, Nhwc};
use crate::gpu::gate::{gate, gate_grad};
use crate::gpu::matmul::{matmul, MatmulArgs, MatmulFlags, Schedule};
use crate::gpu::{Dispatch, GpuContext, Slice};
use crate::model::gpu_mlp::{weight_gradients, LayerSlot, WeightGrads};
use crate::model::mlp::Dense;

/// The shape of one sample's activation or abstract state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// A conv block's pooled output, HWC.
    Spatial {
        height: usize,
        width: usize,
        channels: usize,
    },
    Flat(usize),
}

impl State {
    pub fn width(self) -> usize {
        match self {
            State::Spatial {
                height,
                width,
                channels,
            } => height * width * channels,
            State::Flat(d) => d,
        }
    }

    fn channels(self) -> usize {
        self.nhwc(1).channels as usize
    }

    /// Spatial positions per sample (1 for a flat state).
    fn positions(self) -> usize {
        self.width() / self.channels()
    }

    /// A batch of this state's spatial size with `channels` channels (a conv's output).
    fn with_channels(self, rows: usize, channels: usize) -> Nhwc {
        Nhwc {
            channels: channels as u32,
            ..self.nhwc(rows)
        }
    }

    fn nhwc(self, rows: usize) -> Nhwc {
        match self {
            State::Spatial {
                height,
                width,
                channels,
            } => Nhwc::new(rows, height, width, channels),
            State::Flat(d) => Nhwc::new(rows, 1, 1, d),
        }
    }
}

/// One learned map from an input state to an output state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Map {
    /// x·W + b, then ReLU if `relu`.
    Dense {
        fan_in: usize,
        fan_out: usize,
        relu: bool,
    },
    /// 3x3 SAME conv of a spatial input; with `block`, ReLU and a 2x2 max pool follow.
    Conv {
        input: State,
        out_channels: usize,
        block: bool,
    },
    /// Global max pool over height and width, then x·W + b and ReLU if `relu`.
    PoolDense {
        input: State,
        fan_out: usize,
        relu: bool,
    },
    /// Elementwise gate x·sigmoid(s) (the axis-aligned τ), stored as a [1, width] kernel.
    Gate { width: usize },
}

impl Map {
    /// The map from `input` to `output`, as the model's own step between those shapes
    /// would be (`step`), or as a τ (conv to fewer channels without ReLU/pool, affine).
    pub fn between(input: State, output: State, step: bool, relu: bool) -> Result<Map> {
        Ok(match (input, output) {
            (State::Spatial { .. }, State::Spatial { channels, .. }) => Map::Conv {
                input,
                out_channels: channels,
                block: step,
            },
            (State::Spatial { .. }, State::Flat(fan_out)) => Map::PoolDense {
                input,
                fan_out,
                relu,
            },
            (State::Flat(fan_in), State::Flat(fan_out)) => Map::Dense {
                fan_in,
                fan_out,
                relu,
            },
            (State::Flat(_), State::Spatial { .. }) => {
                anyhow::bail!("no abstract map from a flat state to a spatial one")
            }
        })
    }

    /// (fan_in, fan_out) of the parameters ([`Dense`] holds a conv kernel as
    /// `[9·in][out]`, the HWIO kernel flattened).
    pub fn dims(self) -> (usize, usize) {
        match self {
            Map::Dense {
                fan_in, fan_out, ..
            } => (fan_in, fan_out),
            Map::Conv {
                input,
                out_channels,
                ..
            } => (9 * input.channels(), out_channels),
            Map::PoolDense { input, fan_out, .. } => (input.channels(), fan_out),
            Map::Gate { width } => (1, width),
        }
    }

    /// The stored kernel's shape: HWIO for convs.
    pub fn kernel_shape(self) -> Vec<usize> {
        let (fan_in, fan_out) = self.dims();
        match self {
            Map::Conv { .. } => vec![3, 3, fan_in / 9, fan_out],
            _ => vec![fan_in, fan_out],
        }
    }

    /// Per-sample element counts of the map's batch buffers: (im2col columns, pre-pool
    /// conv output, pooled values (= argmax entries)).
    fn scratch(self) -> (usize, usize, usize) {
        match self {
            Map::Conv {
                input,
                out_channels,
                block: true,
            } => {
                let conv = input.with_channels(1, out_channels);
                let cols = input.positions() * self.dims().0;
                (cols, conv.len(), conv.pooled().len())
            }
            Map::Conv { input, .. } => (input.positions() * self.dims().0, 0, 0),
            Map::PoolDense { input, .. } => (0, 0, input.channels()),
            Map::Dense { .. } | Map::Gate { .. } => (0, 0, 0),
        }
    }

    /// The largest per-sample buffer the map needs (to bound batch sizes).
    pub fn largest_buffer(self) -> usize {
        let (cols, conv, pooled) = self.scratch();
        cols.max(conv).max(pooled)
    }
}

/// One map's batch buffers beyond its input and output.
pub(crate) struct MapBuffers {
    /// Conv: im2col of the input `[positions][9·in]`.
    cols: Option<wgpu::Buffer>,
    /// Conv block: the post-ReLU conv output before pooling, and which of the 2x2
    /// inputs each pooled output took; with gradients, dL/d(pre-ReLU conv output).
    conv: Option<wgpu::Buffer>,
    dconv: Option<wgpu::Buffer>,
    /// Pool-dense: the pooled input `[rows][channels]` and its gradient.
    pooled: Option<wgpu::Buffer>,
    dpooled: Option<wgpu::Buffer>,
    /// Conv block or pool-dense: argmax of the pooling (u32).
    argmax: Option<wgpu::Buffer>,
    /// Conv with an input gradient: the columns' gradient.
    dcols: Option<wgpu::Buffer>,
}

impl MapBuffers {
    /// `input_gradient`: the backward pass writes dL/dinput (steps, not τ).
    pub fn new(
        ctx: &GpuContext,
        map: Map,
        rows: usize,
        gradients: bool,
        input_gradient: bool,
    ) -> Result<Self> {
        let (cols, conv, pooled) = map.scratch();
        let buf = |name: &str, per: usize, on: bool| -> Result<Option<wgpu::Buffer>> {
            (on && per > 0)
                .then(|| ctx.zeros(name, rows * per))
                .transpose()
        };
        let pool_dense = matches!(map, Map::PoolDense { .. });
        Ok(MapBuffers {
            cols: buf("map cols", cols, true)?,
            conv: buf("map conv", conv, true)?,
            dconv: buf("map dconv", conv, gradients)?,
            pooled: buf("map pooled", pooled, pool_dense)?,
            dpooled: buf(
                "map dpooled",
                pooled,
                pool_dense && gradients && input_gradient,
            )?,
            argmax: buf("map argmax", pooled, true)?,
            dcols: buf("map dcols", cols, gradients && input_gradient)?,
        })
    }
}

/// Where a map's parameters live in the flat buffer.
#[derive(Clone, Copy)]
pub(crate) struct MapParams<'a> {
    pub slot: LayerSlot,
    pub values: &'a wgpu::Buffer,
}

/// A map applied to one batch: its parameters and batch buffers.
pub(crate) struct BatchMap<'a> {
    pub map: Map,
    pub rows: usize,
    pub params: MapParams<'a>,
    pub buffers: &'a MapBuffers,
}

impl MapParams<'_> {
    fn kernel(&self) -> Slice<'_> {
        Slice::new(
            self.values,
            self.slot.kernel,
            self.slot.fan_in * self.slot.fan_out,
        )
    }

    fn bias(&self) -> Slice<'_> {
        Slice::new(self.values, self.slot.bias, self.slot.fan_out)
    }
}

fn affine(
    ctx: &GpuContext,
    schedule: Schedule,
    (m, n, k): (usize, usize, usize),
    x: Slice<'_>,
    p: &MapParams<'_>,
    relu: bool,
    out: Slice<'_>,
) -> Result<Dispatch> {
    let flags = MatmulFlags {
        bias: true,
        relu,
        ..Default::default()
    };
    let args = MatmulArgs {
        m,
        n,
        k,
        a: x,
        b: p.kernel(),
        c: out,
        bias: Some(p.bias()),
        mask: None,
    };
    matmul(ctx, flags, schedule, &args)
}

/// `gx = g · Wᵀ` for `rows` output gradients of a layer with `p`'s kernel.
fn input_gradient(
    ctx: &GpuContext,
    schedule: Schedule,
    rows: usize,
    g: Slice<'_>,
    p: &MapParams<'_>,
    gx: Slice<'_>,
) -> Result<Dispatch> {
    let flags = MatmulFlags {
        b_nmajor: true,
        ..Default::default()
    };
    let args = MatmulArgs {
        m: rows,
        n: p.slot.fan_in,
        k: p.slot.fan_out,
        a: g,
        b: p.kernel(),
        c: gx,
        bias: None,
        mask: None,
    };
    matmul(ctx, flags, schedule, &args)
}

/// Dispatches of `out = map(x)` for the batch.
pub(crate) fn forward(
    ctx: &GpuContext,
    schedule: Schedule,
    m: &BatchMap<'_>,
    x: Slice<'_>,
    out: Slice<'_>,
) -> Result<Vec<Dispatch>> {
    let (map, rows, p, b) = (m.map, m.rows, &m.params, m.buffers);
    let whole = Slice::whole;
    let missing = || anyhow::anyhow!("abstraction map {map:?}: buffers missing");
    Ok(match map {
        Map::Dense {
            fan_in,
            fan_out,
            relu,
        } => vec![affine(
            ctx,
            schedule,
            (rows, fan_out, fan_in),
            x,
            p,
            relu,
            out,
        )?],
        Map::Gate { width } => vec![gate(ctx, rows, width, x, p.kernel(), out)?],
        Map::Conv {
            input,
            out_channels,
            block,
        } => {
            let shape = input.nhwc(rows);
            let positions = rows * input.positions();
            let cols = whole(b.cols.as_ref().ok_or_else(missing)?);
            let mut ops = vec![conv_op(
                ctx,
                ConvOp::Im2col,
                shape,
                &ConvArgs::new(x, cols),
            )?];
            let dims = (positions, out_channels, 9 * input.channels());
            if !block {
                ops.push(affine(ctx, schedule, dims, cols, p, false, out)?);
                return Ok(ops);
            }
            let conv = whole(b.conv.as_ref().ok_or_else(missing)?);
            ops.push(affine(ctx, schedule, dims, cols, p, true, conv)?);
            let args = ConvArgs {
                argmax: Some(whole(b.argmax.as_ref().ok_or_else(missing)?)),
                ..ConvArgs::new(conv, out)
            };
            let conv_shape = input.with_channels(rows, out_channels);
            ops.push(conv_op(ctx, ConvOp::MaxPool, conv_shape, &args)?);
            ops
        }
        Map::PoolDense {
            input,
            fan_out,
            relu,
        } => {
            let shape = input.nhwc(rows);
            let pooled = whole(b.pooled.as_ref().ok_or_else(missing)?);
            let args = ConvArgs {
                argmax: Some(whole(b.argmax.as_ref().ok_or_else(missing)?)),
                ..ConvArgs::new(x, pooled)
            };
            let dims = (rows, fan_out, input.channels());
            vec![
                conv_op(ctx, ConvOp::GlobalMax, shape, &args)?,
                affine(ctx, schedule, dims, pooled, p, relu, out)?,
            ]
        }
    })
}

/// Dispatches of the map's backward pass for the batch with input `x`: `g` is
/// dL/d(output), already through the ReLU where the map has one (the loss kernels mask
/// it). Writes (not adds) the map's slot of `grads`, and dL/dx to `gx` when given.
pub(crate) fn backward(
    ctx: &GpuContext,
    schedule: Schedule,
    m: &BatchMap<'_>,
    x: Slice<'_>,
    g: Slice<'_>,
    grads: &wgpu::Buffer,
    gx: Option<Slice<'_>>,
) -> Result<Vec<Dispatch>> {
    let (map, rows, p, b) = (m.map, m.rows, &m.params, m.buffers);
    let whole = Slice::whole;
    let missing = || anyhow::anyhow!("abstraction map {map:?}: gradient buffers missing");
    let mut ops = Vec::new();
    match map {
        Map::Dense { .. } => {
            ops.extend(weight_gradients(
                ctx,
                schedule,
                &WeightGrads {
                    slot: p.slot,
                    rows,
                    x,
                    g,
                    grads,
                    skip_zero_x: false,
                },
            )?);
            if let Some(gx) = gx {
                ops.push(input_gradient(ctx, schedule, rows, g, p, gx)?);
            }
        }
        Map::Gate { width } => {
            let dscores = Slice::new(grads, p.slot.kernel, width);
            ops.push(gate_grad(ctx, rows, width, x, p.kernel(), g, dscores)?);
        }
        Map::Conv {
            input,
            out_channels,
            block,
        } => {
            let shape = input.nhwc(rows);
            let positions = rows * input.positions();
            let g_conv = if block {
                let dconv = whole(b.dconv.as_ref().ok_or_else(missing)?);
                let args = ConvArgs {
                    argmax: Some(whole(b.argmax.as_ref().ok_or_else(missing)?)),
                    mask: Some(whole(b.conv.as_ref().ok_or_else(missing)?)),
                    ..ConvArgs::new(g, dconv)
                };
                let conv_shape = input.with_channels(rows, out_channels);
                ops.push(conv_op(ctx, ConvOp::MaxPoolGrad, conv_shape, &args)?);
                dconv
            } else {
                g
            };
            let cols = whole(b.cols.as_ref().ok_or_else(missing)?);
            ops.extend(weight_gradients(
                ctx,
                schedule,
                &WeightGrads {
                    slot: p.slot,
                    rows: positions,
                    x: cols,
                    g: g_conv,
                    grads,
                    skip_zero_x: false,
                },
            )?);
            if let Some(gx) = gx {
                let dcols = whole(b.dcols.as_ref().ok_or_else(missing)?);
                ops.push(input_gradient(ctx, schedule, positions, g_conv, p, dcols)?);
                ops.push(conv_op(
                    ctx,
                    ConvOp::Col2im,
                    shape,
                    &ConvArgs::new(dcols, gx),
                )?);
            }
        }
        Map::PoolDense { input, .. } => {
            let pooled = whole(b.pooled.as_ref().ok_or_else(missing)?);
            ops.extend(weight_gradients(
                ctx,
                schedule,
                &WeightGrads {
                    slot: p.slot,
                    rows,
                    x: pooled,
                    g,
                    grads,
                    skip_zero_x: false,
                },
            )?);
            if let Some(gx) = gx {
                let dpooled = whole(b.dpooled.as_ref().ok_or_else(missing)?);
                ops.push(input_gradient(ctx, schedule, rows, g, p, dpooled)?);
                let args = ConvArgs {
                    argmax: Some(whole(b.argmax.as_ref().ok_or_else(missing)?)),
                    ..ConvArgs::new(dpooled, gx)
                };
                ops.push(conv_op(
                    ctx,
                    ConvOp::GlobalMaxGrad,
                    input.nhwc(rows),
                    &args,
                )?);
            }
        }
    }
    Ok(ops)
}

/// f64 reference of [`forward`].
pub(crate) fn forward_reference(map: Map, layer: &Dense, x: &[f64], rows: usize) -> Vec<f64> {
    use crate::gpu::conv::{global_max_reference, im2col_reference, max_pool_reference};
    match map {
        Map::Dense { relu, .. } => layer.forward_reference(x, rows, relu),
        Map::Gate { width } => crate::gpu::gate::gate_reference(x, &layer.kernel, width),
        Map::Conv {
            input,
            out_channels,
            block,
        } => {
            let cols = im2col_reference(x, input.nhwc(rows));
            let conv = layer.forward_reference(&cols, rows * input.positions(), block);
            if !block {
                return conv;
            }
            let conv_shape = input.with_channels(rows, out_channels);
            max_pool_reference(&conv, conv_shape).0
        }
        Map::PoolDense { input, relu, .. } => {
            let (pooled, _) = global_max_reference(x, input.nhwc(rows));
            layer.forward_reference(&pooled, rows, relu)
        }
    }
}
