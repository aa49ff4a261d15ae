//! The MLP resident on the GPU: parameters in one flat buffer (so Adam is one
//! dispatch), per-batch workspaces, and the recorded forward/backward dispatch lists.

use anyhow::{bail, Result};

use super::mlp::{ConvBlock, Dense, Mlp, MlpConfig};
use crate::gpu::conv::{conv_op, ConvArgs, ConvOp, Nhwc};
use crate::gpu::matmul::{matmul, MatmulArgs, MatmulFlags, Schedule};
use crate::gpu::reduce::column_sums;
use crate::gpu::{Dispatch, GpuContext, Slice};

/// Tensors start on 256-byte boundaries: WebGPU's largest storage offset alignment.
const ALIGN: usize = 64;

/// Offsets (in f32 elements) of every layer's kernel and bias in the flat buffer.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub layers: Vec<LayerSlot>,
    pub total: usize,
}

#[derive(Clone, Copy, Debug)]
pub struct LayerSlot {
    pub fan_in: usize,
    pub fan_out: usize,
    pub kernel: usize,
    pub bias: usize,
}

impl ParamLayout {
    pub fn new(config: &MlpConfig) -> Self {
        Self::for_dims(&config.layer_dims())
    }

    /// Slots for dense layers of the given (fan_in, fan_out).
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

pub struct GpuMlp {
    pub config: MlpConfig,
    pub layout: ParamLayout,
    pub params: wgpu::Buffer,
    pub schedule: Schedule,
}

/// Which gradient buffers a workspace holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gradients {
    /// Forward only (evaluation, detectors).
    None,
    /// Back to the parameters (training).
    Params,
    /// Back to the input (adversarial attacks).
    Input,
}

/// Buffers of one conv block for a batch.
pub struct ConvWorkspace {
    pub block: ConvBlock,
    /// im2col of the block's input, `[9·in][rows·H·W]` (the forward matmul reads it
    /// K-major) and, with gradients, `[rows·H·W][9·in]` (for dW = colsᵀ·dconv).
    pub cols_t: wgpu::Buffer,
    pub cols: Option<wgpu::Buffer>,
    /// Post-ReLU convolution output `[rows][H][W][out]`.
    pub conv: wgpu::Buffer,
    /// Which of the 2x2 inputs each pooled output took (u32).
    pub argmax: wgpu::Buffer,
    /// With gradients: dL/d(pre-ReLU conv output), row-major and transposed (the
    /// columns' gradient matmul reads it K-major), and dL/d(pooled output).
    pub dconv: Option<wgpu::Buffer>,
    pub dconv_t: Option<wgpu::Buffer>,
    pub dpooled: Option<wgpu::Buffer>,
}

/// Activations and gradients of one batch of `rows` samples, all row-major
/// `[rows][width]` unless marked transposed.
pub struct Workspace {
    pub rows: usize,
    /// Inputs are mostly zeros (MNIST: 19 % non-zero): the first layer's forward and
    /// weight-gradient matmuls skip all-zero input blocks. On dense data the check
    /// costs more than it saves, so callers set this from the data set's density.
    pub sparse_input: bool,
    pub x: wgpu::Buffer,
    /// `[input_dim][rows]`: an MLP's first matmul reads its A operand K-major, as vec4s.
    pub xt: wgpu::Buffer,
    pub labels: wgpu::Buffer,
    /// The activations detectors see ([`MlpConfig::activation_dims`]): each conv
    /// block's pooled output, then each hidden dense layer's post-ReLU output.
    pub hidden: Vec<wgpu::Buffer>,
    pub conv: Vec<ConvWorkspace>,
    /// CNN: the global max pool over the last block `[rows][channels]`, its argmax and,
    /// with gradients, its gradient.
    pub global: Option<(wgpu::Buffer, wgpu::Buffer, Option<wgpu::Buffer>)>,
    pub logits: wgpu::Buffer,
    /// dL/dlogits, then dL/d(pre-activation) of each hidden dense layer.
    pub dlogits: wgpu::Buffer,
    pub dz: Vec<wgpu::Buffer>,
    /// CNN: column gradients, sized for the largest block that needs them.
    pub dcols: Option<wgpu::Buffer>,
    /// dL/dx, with [`Gradients::Input`].
    pub dx: Option<wgpu::Buffer>,
}

impl Workspace {
    /// Activation layer `layer` of the batch: `rows x width` values, the width of its
    /// [`crate::model::mlp::ActivationLayer`].
    pub fn activation(&self, layer: usize) -> Slice<'_> {
        Slice::whole(&self.hidden[layer])
    }
}

impl GpuMlp {
    pub fn upload(ctx: &GpuContext, mlp: &Mlp) -> Result<Self> {
        let layout = ParamLayout::new(&mlp.config);
        Ok(GpuMlp {
            config: mlp.config.clone(),
            params: ctx.buffer_from("mlp params", &layout.flatten(&mlp.layers))?,
            layout,
            schedule: Schedule::for_context(ctx),
        })
    }

    pub fn download(&self, ctx: &GpuContext) -> Result<Mlp> {
        let flat: Vec<f32> = ctx.read(Slice::whole(&self.params))?;
        Ok(Mlp {
            config: self.config.clone(),
            layers: self.layout.unflatten(&flat),
        })
    }

    /// The largest batch whose buffers fit the adapter's storage binding limit.
    pub fn max_rows(&self, ctx: &GpuContext) -> usize {
        let per_sample = self
            .config
            .conv_blocks()
            .iter()
            .map(|b| b.height * b.width * 9 * b.in_channels.max(b.out_channels))
            .chain([self.config.input_dim()])
            .max()
            .unwrap_or(1)
            * 4;
        (ctx.limits.max_storage_buffer_binding_size as usize / per_sample).max(1)
    }

    pub fn workspace(
        &self,
        ctx: &GpuContext,
        rows: usize,
        sparse_input: bool,
        gradients: Gradients,
    ) -> Result<Workspace> {
        let dim = self.config.input_dim();
        let classes = self.config.output_dim;
        let grads = gradients != Gradients::None;
        let zeros = |name: &str, len: usize| ctx.zeros(name, rows * len);
        let blocks = self.config.conv_blocks();
        // Blocks whose input gradient is computed: all but the first, unless attacking.
        let first = usize::from(gradients != Gradients::Input);
        let conv = blocks
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let positions = b.height * b.width;
                Ok(ConvWorkspace {
                    block: b,
                    cols_t: zeros(&format!("cols_t{i}"), positions * 9 * b.in_channels)?,
                    cols: grads
                        .then(|| zeros(&format!("cols{i}"), positions * 9 * b.in_channels))
                        .transpose()?,
                    conv: zeros(&format!("conv{i}"), positions * b.out_channels)?,
                    argmax: zeros(&format!("argmax{i}"), b.pooled_dim())?,
                    dconv: grads
                        .then(|| zeros(&format!("dconv{i}"), positions * b.out_channels))
                        .transpose()?,
                    dconv_t: (grads && i >= first)
                        .then(|| zeros(&format!("dconv_t{i}"), positions * b.out_channels))
                        .transpose()?,
                    dpooled: grads
                        .then(|| zeros(&format!("dpooled{i}"), b.pooled_dim()))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let global = blocks
            .last()
            .map(|b| -> Result<_> {
                let c = b.out_channels;
                Ok((
                    zeros("global", c)?,
                    zeros("global_argmax", c)?,
                    grads.then(|| zeros("dglobal", c)).transpose()?,
                ))
            })
            .transpose()?;
        let dcols = blocks
            .iter()
            .skip(first)
            .map(|b| b.height * b.width * 9 * b.in_channels)
            .max()
            .filter(|_| grads)
            .map(|len| zeros("dcols", len))
            .transpose()?;
        let dense_hidden = |name: &str| -> Result<Vec<wgpu::Buffer>> {
            self.config
                .hidden_dims
                .iter()
                .enumerate()
                .map(|(l, &w)| zeros(&format!("{name}{l}"), w))
                .collect()
        };
        let mut hidden: Vec<wgpu::Buffer> = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| zeros(&format!("pooled{i}"), b.pooled_dim()))
            .collect::<Result<_>>()?;
        hidden.extend(dense_hidden("hidden")?);
        Ok(Workspace {
            rows,
            sparse_input: sparse_input && blocks.is_empty(),
            x: zeros("x", dim)?,
            // Only an MLP's first matmul reads the transposed batch.
            xt: zeros("xt", if blocks.is_empty() { dim } else { 1 })?,
            labels: zeros("labels", 1)?,
            hidden,
            conv,
            global,
            logits: zeros("logits", classes)?,
            dlogits: zeros("dlogits", classes)?,
            dz: if grads {
                dense_hidden("dz")?
            } else {
                Vec::new()
            },
            dcols,
            dx: (gradients == Gradients::Input)
                .then(|| zeros("dx", dim))
                .transpose()?,
        })
    }

    fn kernel_slice(&self, l: usize) -> Slice<'_> {
        let s = self.layout.layers[l];
        Slice::new(&self.params, s.kernel, s.fan_in * s.fan_out)
    }

    fn bias_slice(&self, l: usize) -> Slice<'_> {
        let s = self.layout.layers[l];
        Slice::new(&self.params, s.bias, s.fan_out)
    }

    fn num_conv(&self) -> usize {
        self.config.conv_channels.len()
    }

    /// Dispatches from the batch (`ws.x`, or `ws.xt` for an MLP) to `ws.logits`,
    /// keeping every activation.
    pub fn forward(&self, ctx: &GpuContext, ws: &Workspace) -> Result<Vec<Dispatch>> {
        let whole = Slice::whole;
        let rows = ws.rows;
        let mut ops = Vec::new();
        for (i, cw) in ws.conv.iter().enumerate() {
            let b = cw.block;
            let input = if i == 0 { &ws.x } else { &ws.hidden[i - 1] };
            let shape = Nhwc::new(rows, b.height, b.width, b.in_channels);
            ops.push(conv_op(
                ctx,
                ConvOp::Im2col,
                shape,
                &ConvArgs {
                    dst: cw.cols.as_ref().map(whole),
                    dst_t: Some(whole(&cw.cols_t)),
                    ..ConvArgs::new(whole(input), whole(&cw.cols_t))
                },
            )?);
            let flags = MatmulFlags {
                a_kmajor: true,
                bias: true,
                relu: true,
                ..Default::default()
            };
            ops.push(matmul(
                ctx,
                flags,
                self.schedule,
                &MatmulArgs {
                    m: rows * b.height * b.width,
                    n: b.out_channels,
                    k: 9 * b.in_channels,
                    a: whole(&cw.cols_t),
                    b: self.kernel_slice(i),
                    c: whole(&cw.conv),
                    bias: Some(self.bias_slice(i)),
                    mask: None,
                },
            )?);
            let out = Nhwc::new(rows, b.height, b.width, b.out_channels);
            let args = ConvArgs {
                argmax: Some(whole(&cw.argmax)),
                ..ConvArgs::new(whole(&cw.conv), whole(&ws.hidden[i]))
            };
            ops.push(conv_op(ctx, ConvOp::MaxPool, out, &args)?);
        }
        let n_conv = self.num_conv();
        if let (Some((global, argmax, _)), Some(cw)) = (&ws.global, ws.conv.last()) {
            let b = cw.block;
            let shape = Nhwc::new(rows, b.height / 2, b.width / 2, b.out_channels);
            let args = ConvArgs {
                argmax: Some(whole(argmax)),
                ..ConvArgs::new(whole(&ws.hidden[n_conv - 1]), whole(global))
            };
            ops.push(conv_op(ctx, ConvOp::GlobalMax, shape, &args)?);
        }
        let dense = &self.layout.layers[n_conv..];
        for (l, s) in dense.iter().enumerate() {
            let (input, a_kmajor) = self.dense_input(ws, l, true);
            let hidden = l + 1 < dense.len();
            let flags = MatmulFlags {
                a_kmajor,
                skip_zero_a: a_kmajor && ws.sparse_input,
                bias: true,
                relu: hidden,
                ..Default::default()
            };
            ops.push(matmul(
                ctx,
                flags,
                self.schedule,
                &MatmulArgs {
                    m: rows,
                    n: s.fan_out,
                    k: s.fan_in,
                    a: whole(input),
                    b: self.kernel_slice(n_conv + l),
                    c: whole(if hidden {
                        &ws.hidden[n_conv + l]
                    } else {
                        &ws.logits
                    }),
                    bias: Some(self.bias_slice(n_conv + l)),
                    mask: None,
                },
            )?);
        }
        Ok(ops)
    }

    /// The input of dense layer `l` (0 = first dense layer) and whether it is stored
    /// K-major: an MLP's first layer reads the transposed batch in the forward pass
    /// (`forward`) and the row-major batch (= its transpose, K-major) for dW.
    fn dense_input<'w>(
        &self,
        ws: &'w Workspace,
        l: usize,
        forward: bool,
    ) -> (&'w wgpu::Buffer, bool) {
        match (l, &ws.global) {
            (0, Some((global, ..))) => (global, false),
            (0, None) if forward => (&ws.xt, true),
            (0, None) => (&ws.x, true),
            _ => (&ws.hidden[self.num_conv() + l - 1], false),
        }
    }

    /// Dispatches from `ws.dlogits` to the parameter gradients in `grads` (same layout
    /// as the parameters).
    pub fn backward(
        &self,
        ctx: &GpuContext,
        ws: &Workspace,
        grads: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        if ws.dz.len() != self.config.hidden_dims.len() {
            bail!("backward needs a workspace created with gradients");
        }
        let mut ops = self.dense_backward(ctx, ws, Some(grads), false)?;
        ops.extend(self.conv_backward(ctx, ws, Some(grads), false)?);
        Ok(ops)
    }

    /// Dispatches from `ws.dlogits` to `ws.dx` = dL/dx, skipping parameter gradients.
    pub fn input_gradient(&self, ctx: &GpuContext, ws: &Workspace) -> Result<Vec<Dispatch>> {
        if ws.dx.is_none() {
            bail!("input_gradient needs a workspace created with Gradients::Input");
        }
        let mut ops = self.dense_backward(ctx, ws, None, true)?;
        ops.extend(self.conv_backward(ctx, ws, None, true)?);
        Ok(ops)
    }

    /// dL/d(output) of dense layer `l`: the logits' gradient, or a hidden pre-activation's.
    fn output_gradient<'w>(&self, ws: &'w Workspace, l: usize) -> &'w wgpu::Buffer {
        if l + 1 == self.config.hidden_dims.len() + 1 {
            &ws.dlogits
        } else {
            &ws.dz[l]
        }
    }

    /// The dense layers' backward pass: parameter gradients (with `grads`) and input
    /// gradients down to the first dense layer's input (a CNN's global pool; an MLP's
    /// pixels only with `to_input`).
    fn dense_backward(
        &self,
        ctx: &GpuContext,
        ws: &Workspace,
        grads: Option<&wgpu::Buffer>,
        to_input: bool,
    ) -> Result<Vec<Dispatch>> {
        let n_conv = self.num_conv();
        let mut ops = Vec::new();
        for (l, s) in self.layout.layers[n_conv..].iter().enumerate().rev() {
            let g = self.output_gradient(ws, l);
            if let Some(grads) = grads {
                let (input, _) = self.dense_input(ws, l, false);
                let sparse = l == 0 && ws.sparse_input;
                let (x, g) = (Slice::whole(input), Slice::whole(g));
                let w = WeightGrads {
                    slot: *s,
                    rows: ws.rows,
                    x,
                    g,
                    grads,
                    skip_zero_x: sparse,
                };
                ops.extend(weight_gradients(ctx, self.schedule, &w)?);
            }
            // dz = (g · Wᵀ) ⊙ (hidden > 0), the mask fused into the matmul epilogue.
            let (out, mask) = match (l, &ws.global) {
                (0, Some((.., dglobal))) => (dglobal.as_ref(), None),
                (0, None) => (ws.dx.as_ref().filter(|_| to_input), None),
                _ => (
                    Some(&ws.dz[l - 1]),
                    Some(Slice::whole(&ws.hidden[n_conv + l - 1])),
                ),
            };
            let Some(out) = out else { continue };
            ops.push(matmul(
                ctx,
                MatmulFlags {
                    b_nmajor: true,
                    relu_mask: mask.is_some(),
                    ..Default::default()
                },
                self.schedule,
                &MatmulArgs {
                    m: ws.rows,
                    n: s.fan_in,
                    k: s.fan_out,
                    a: Slice::whole(g),
                    b: self.kernel_slice(n_conv + l),
                    c: Slice::whole(out),
                    bias: None,
                    mask,
                },
            )?);
        }
        Ok(ops)
    }

    /// The conv blocks' backward pass from the global pool's gradient: parameter
    /// gradients (with `grads`) and input gradients (to the pixels with `to_input`).
    fn conv_backward(
        &self,
        ctx: &GpuContext,
        ws: &Workspace,
        grads: Option<&wgpu::Buffer>,
        to_input: bool,
    ) -> Result<Vec<Dispatch>> {
        let (Some((_, argmax, Some(dglobal))), Some(last)) = (&ws.global, ws.conv.last()) else {
            return Ok(Vec::new());
        };
        let whole = Slice::whole;
        let missing = || anyhow::anyhow!("conv backward needs a workspace created with gradients");
        let rows = ws.rows;
        let b = last.block;
        let pooled = Nhwc::new(rows, b.height / 2, b.width / 2, b.out_channels);
        let dlast = last.dpooled.as_ref().ok_or_else(missing)?;
        let args = ConvArgs {
            argmax: Some(whole(argmax)),
            ..ConvArgs::new(whole(dglobal), whole(dlast))
        };
        let mut ops = vec![conv_op(ctx, ConvOp::GlobalMaxGrad, pooled, &args)?];
        for (i, cw) in ws.conv.iter().enumerate().rev() {
            let b = cw.block;
            let positions = rows * b.height * b.width;
            let (dpooled, dconv) = (
                cw.dpooled.as_ref().ok_or_else(missing)?,
                cw.dconv.as_ref().ok_or_else(missing)?,
            );
            let out = Nhwc::new(rows, b.height, b.width, b.out_channels);
            let target = match i {
                0 if to_input => ws.dx.as_ref(),
                0 => None,
                _ => ws.conv[i - 1].dpooled.as_ref(),
            };
            let args = ConvArgs {
                argmax: Some(whole(&cw.argmax)),
                mask: Some(whole(&cw.conv)),
                // The transposed copy only feeds the input gradient.
                dst_t: cw.dconv_t.as_ref().filter(|_| target.is_some()).map(whole),
                ..ConvArgs::new(whole(dpooled), whole(dconv))
            };
            ops.push(conv_op(ctx, ConvOp::MaxPoolGrad, out, &args)?);
            if let Some(grads) = grads {
                let cols = whole(cw.cols.as_ref().ok_or_else(missing)?);
                let s = self.layout.layers[i];
                let w = WeightGrads {
                    slot: s,
                    rows: positions,
                    x: cols,
                    g: whole(dconv),
                    grads,
                    skip_zero_x: false,
                };
                ops.extend(weight_gradients(ctx, self.schedule, &w)?);
            }
            let Some(target) = target else { continue };
            let dcols = ws.dcols.as_ref().ok_or_else(missing)?;
            let dconv_t = cw.dconv_t.as_ref().ok_or_else(missing)?;
            let cols_len = positions * 9 * b.in_channels;
            ops.push(matmul(
                ctx,
                MatmulFlags {
                    a_kmajor: true,
                    b_nmajor: true,
                    ..Default::default()
                },
                self.schedule,
                &MatmulArgs {
                    m: positions,
                    n: 9 * b.in_channels,
                    k: b.out_channels,
                    a: whole(dconv_t),
                    b: self.kernel_slice(i),
                    c: Slice::new(dcols, 0, cols_len),
                    bias: None,
                    mask: None,
                },
            )?);
            let input = Nhwc::new(rows, b.height, b.width, b.in_channels);
            let args = ConvArgs::new(Slice::new(dcols, 0, cols_len), whole(target));
            ops.push(conv_op(ctx, ConvOp::Col2im, input, &args)?);
        }
        Ok(ops)
    }
}

/// The operands of [`weight_gradients`]: `rows` inputs `x` (rows x fan_in) and output
/// gradients `g` (rows x fan_out) of the layer at `slot` of `grads`; `skip_zero_x` skips
/// all-zero input blocks (sparse inputs).
#[derive(Clone, Copy)]
pub(crate) struct WeightGrads<'a> {
    pub slot: LayerSlot,
    pub rows: usize,
    pub x: Slice<'a>,
    pub g: Slice<'a>,
    pub grads: &'a wgpu::Buffer,
    pub skip_zero_x: bool,
}

/// Parameter gradients of one dense (or im2col'd conv) layer: dW = xᵀ·g (the
/// row-major input is exactly xᵀ stored K-major) and db = column sums of g.
pub(crate) fn weight_gradients(
    ctx: &GpuContext,
    schedule: Schedule,
    w: &WeightGrads<'_>,
) -> Result<[Dispatch; 2]> {
    let WeightGrads {
        slot: s,
        rows,
        x,
        g,
        grads,
        skip_zero_x,
    } = *w;
    let flags = MatmulFlags {
        a_kmajor: true,
        skip_zero_a: skip_zero_x,
        ..Default::default()
    };
    let args = MatmulArgs {
        m: s.fan_in,
        n: s.fan_out,
        k: rows,
        a: x,
        b: g,
        c: Slice::new(grads, s.kernel, s.fan_in * s.fan_out),
        bias: None,
        mask: None,
    };
    Ok([
        matmul(ctx, flags, schedule, &args)?,
        column_sums(
            ctx,
            rows,
            s.fan_out,
            1.0,
            g,
            Slice::new(grads, s.bias, s.fan_out),
        )?,
    ])
}
