//! The MLP resident on the GPU: parameters in one flat buffer (so Adam is one
//! dispatch), per-batch workspaces, and the recorded forward/backward dispatch lists.

use anyhow::{bail, Context, Result};

use super::mlp::{Dense, Mlp, MlpConfig};
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

/// Activations and gradients of one batch of `rows` samples, all row-major
/// `[rows][width]` unless marked transposed.
pub struct Workspace {
    pub rows: usize,
    /// Inputs are mostly zeros (MNIST: 19 % non-zero): the first layer's forward and
    /// weight-gradient matmuls skip all-zero input blocks. On dense data the check
    /// costs more than it saves, so callers set this from the data set's density.
    pub sparse_input: bool,
    pub x: wgpu::Buffer,
    /// `[input_dim][rows]`: the first matmul reads its A operand K-major, as vec4s.
    pub xt: wgpu::Buffer,
    pub labels: wgpu::Buffer,
    /// Post-ReLU hidden activations, one per hidden layer.
    pub hidden: Vec<wgpu::Buffer>,
    pub logits: wgpu::Buffer,
    /// dL/dlogits, then dL/d(pre-activation) of each hidden layer.
    pub dlogits: wgpu::Buffer,
    pub dz: Vec<wgpu::Buffer>,
    /// dL/dx, with [`Gradients::Input`].
    pub dx: Option<wgpu::Buffer>,
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

    pub fn workspace(
        &self,
        ctx: &GpuContext,
        rows: usize,
        sparse_input: bool,
        gradients: Gradients,
    ) -> Result<Workspace> {
        let widths = &self.config.hidden_dims;
        let dim = self.config.input_dim();
        let classes = self.config.output_dim;
        let per_layer = |name: &str| -> Result<Vec<wgpu::Buffer>> {
            widths
                .iter()
                .enumerate()
                .map(|(l, &w)| ctx.zeros(&format!("{name}{l}"), rows * w))
                .collect()
        };
        Ok(Workspace {
            rows,
            sparse_input,
            x: ctx.zeros("x", rows * dim)?,
            xt: ctx.zeros("xt", rows * dim)?,
            labels: ctx.zeros("labels", rows)?,
            hidden: per_layer("hidden")?,
            logits: ctx.zeros("logits", rows * classes)?,
            dlogits: ctx.zeros("dlogits", rows * classes)?,
            dz: if gradients == Gradients::None {
                Vec::new()
            } else {
                per_layer("dz")?
            },
            dx: (gradients == Gradients::Input)
                .then(|| ctx.zeros("dx", rows * dim))
                .transpose()?,
        })
    }

    fn kernel_slice(&self, l: usize) -> Slice<'_> {
        let s = self.layout.layers[l];
        Slice::new(&self.params, s.kernel, s.fan_in * s.fan_out)
    }

    /// Dispatches from `ws.xt` to `ws.logits`, keeping every hidden activation.
    pub fn forward(&self, ctx: &GpuContext, ws: &Workspace) -> Result<Vec<Dispatch>> {
        let last = self.layout.layers.len() - 1;
        self.layout
            .layers
            .iter()
            .enumerate()
            .map(|(l, s)| {
                let input = if l == 0 { &ws.xt } else { &ws.hidden[l - 1] };
                let hidden = l < last;
                let flags = MatmulFlags {
                    a_kmajor: l == 0,
                    skip_zero_a: l == 0 && ws.sparse_input,
                    bias: true,
                    relu: hidden,
                    ..Default::default()
                };
                matmul(
                    ctx,
                    flags,
                    self.schedule,
                    &MatmulArgs {
                        m: ws.rows,
                        n: s.fan_out,
                        k: s.fan_in,
                        a: Slice::whole(input),
                        b: self.kernel_slice(l),
                        c: Slice::whole(if hidden { &ws.hidden[l] } else { &ws.logits }),
                        bias: Some(Slice::new(&self.params, s.bias, s.fan_out)),
                        mask: None,
                    },
                )
            })
            .collect()
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
        let mut ops = Vec::new();
        for (l, s) in self.layout.layers.iter().enumerate().rev() {
            let g = self.output_gradient(ws, l);
            let input = if l == 0 { &ws.x } else { &ws.hidden[l - 1] };
            // dW = inputᵀ · g: the row-major input is exactly Aᵀ stored K-major.
            ops.push(matmul(
                ctx,
                MatmulFlags {
                    a_kmajor: true,
                    skip_zero_a: l == 0 && ws.sparse_input,
                    ..Default::default()
                },
                self.schedule,
                &MatmulArgs {
                    m: s.fan_in,
                    n: s.fan_out,
                    k: ws.rows,
                    a: Slice::whole(input),
                    b: Slice::whole(g),
                    c: Slice::new(grads, s.kernel, s.fan_in * s.fan_out),
                    bias: None,
                    mask: None,
                },
            )?);
            ops.push(column_sums(
                ctx,
                ws.rows,
                s.fan_out,
                1.0,
                Slice::whole(g),
                Slice::new(grads, s.bias, s.fan_out),
            )?);
            // The input gradient of the first layer is not needed for training.
            if l > 0 {
                ops.push(self.backprop(ctx, ws, l)?);
            }
        }
        Ok(ops)
    }

    /// Dispatches from `ws.dlogits` to `ws.dx` = dL/dx, skipping parameter gradients.
    pub fn input_gradient(&self, ctx: &GpuContext, ws: &Workspace) -> Result<Vec<Dispatch>> {
        if ws.dx.is_none() {
            bail!("input_gradient needs a workspace created with Gradients::Input");
        }
        (0..self.layout.layers.len())
            .rev()
            .map(|l| self.backprop(ctx, ws, l))
            .collect()
    }

    /// dL/d(output) of layer `l`: the logits' gradient, or a hidden pre-activation's.
    fn output_gradient<'w>(&self, ws: &'w Workspace, l: usize) -> &'w wgpu::Buffer {
        if l + 1 == self.layout.layers.len() {
            &ws.dlogits
        } else {
            &ws.dz[l]
        }
    }

    /// Layer `l`'s input gradient `g · Wᵀ`: for a hidden input masked by ReLU' (fused
    /// into the matmul epilogue) into `ws.dz[l - 1]`, for the network input into `ws.dx`.
    fn backprop(&self, ctx: &GpuContext, ws: &Workspace, l: usize) -> Result<Dispatch> {
        let s = self.layout.layers[l];
        let (out, mask) = match l {
            0 => (
                ws.dx.as_ref().context("workspace has no input gradient")?,
                None,
            ),
            _ => (&ws.dz[l - 1], Some(Slice::whole(&ws.hidden[l - 1]))),
        };
        matmul(
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
                a: Slice::whole(self.output_gradient(ws, l)),
                b: self.kernel_slice(l),
                c: Slice::whole(out),
                bias: None,
                mask,
            },
        )
    }
}
