//! The classifier resident on the GPU: parameters in one flat buffer (so Adam is one
//! dispatch), per-batch workspaces, and the recorded forward/backward dispatch lists of
//! its layer [`Stack`] (`MlpConfig::stack`).

use anyhow::{bail, Result};

use super::layers::{
    BoundStack, Needs, ParamLayout, Stack, StackBackward, StackBuffers, StackForward,
};
use super::mlp::{Mlp, MlpConfig};
use crate::gpu::matmul::Schedule;
use crate::gpu::{Dispatch, GpuContext, Slice};

impl ParamLayout {
    pub fn new(config: &MlpConfig) -> Self {
        Self::for_dims(&config.layer_dims())
    }
}

pub struct GpuMlp {
    pub config: MlpConfig,
    pub layout: ParamLayout,
    pub params: wgpu::Buffer,
    pub schedule: Schedule,
    stack: Stack,
    /// Stack indices of the activations detectors read.
    activations: Vec<usize>,
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

/// The buffers of one batch of `rows` samples, all row-major `[rows][width]` unless
/// marked transposed.
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
    pub logits: wgpu::Buffer,
    /// dL/dlogits, written by the loss.
    pub dlogits: wgpu::Buffer,
    /// dL/dx, with [`Gradients::Input`].
    pub dx: Option<wgpu::Buffer>,
    /// Everything between input and logits.
    layers: StackBuffers,
    activations: Vec<usize>,
}

impl Workspace {
    /// Activation layer `layer` of the batch: `rows x width` values, the width of its
    /// [`crate::model::mlp::ActivationLayer`].
    pub fn activation(&self, layer: usize) -> Slice<'_> {
        Slice::whole(&self.layers.acts[self.activations[layer]])
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
            stack: mlp.config.stack(),
            activations: mlp.config.activation_positions(),
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
        let zeros = |name: &str, len: usize| ctx.zeros(name, rows * len);
        let cnn = self.config.is_cnn();
        let needs = Needs {
            backward: gradients != Gradients::None,
            param_grads: gradients == Gradients::Params,
            input_grad: gradients == Gradients::Input,
        };
        Ok(Workspace {
            rows,
            sparse_input: sparse_input && !cnn,
            x: zeros("x", dim)?,
            // Only an MLP's first matmul reads the transposed batch.
            xt: zeros("xt", if cnn { 1 } else { dim })?,
            labels: zeros("labels", 1)?,
            logits: zeros("logits", classes)?,
            dlogits: zeros("dlogits", classes)?,
            dx: needs.input_grad.then(|| zeros("dx", dim)).transpose()?,
            layers: self.stack.buffers(ctx, rows, needs)?,
            activations: self.activations.clone(),
        })
    }

    fn bound<'a>(&'a self, ws: &'a Workspace) -> BoundStack<'a> {
        BoundStack {
            stack: &self.stack,
            rows: ws.rows,
            schedule: self.schedule,
            slots: &self.layout.layers,
            values: &self.params,
            buffers: &ws.layers,
        }
    }

    /// Dispatches from the batch (`ws.x`, or `ws.xt` for an MLP) to `ws.logits`,
    /// keeping every activation.
    pub fn forward(&self, ctx: &GpuContext, ws: &Workspace) -> Result<Vec<Dispatch>> {
        let io = StackForward {
            x: Slice::whole(&ws.x),
            x_t: (!self.config.is_cnn()).then(|| Slice::whole(&ws.xt)),
            sparse: ws.sparse_input,
            out: Slice::whole(&ws.logits),
        };
        self.bound(ws).forward(ctx, &io)
    }

    /// Dispatches from `ws.dlogits` to the parameter gradients in `grads` (same layout
    /// as the parameters).
    pub fn backward(
        &self,
        ctx: &GpuContext,
        ws: &Workspace,
        grads: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        self.backward_to(ctx, ws, Some(grads), None)
    }

    /// Dispatches from `ws.dlogits` to `ws.dx` = dL/dx, skipping parameter gradients.
    pub fn input_gradient(&self, ctx: &GpuContext, ws: &Workspace) -> Result<Vec<Dispatch>> {
        let Some(dx) = &ws.dx else {
            bail!("input_gradient needs a workspace created with Gradients::Input");
        };
        self.backward_to(ctx, ws, None, Some(Slice::whole(dx)))
    }

    fn backward_to(
        &self,
        ctx: &GpuContext,
        ws: &Workspace,
        grads: Option<&wgpu::Buffer>,
        gx: Option<Slice<'_>>,
    ) -> Result<Vec<Dispatch>> {
        let io = StackBackward {
            x: Slice::whole(&ws.x),
            sparse: ws.sparse_input,
            g: Slice::whole(&ws.dlogits),
            grads,
            gx,
            gx_mask: None,
        };
        self.bound(ws).backward(ctx, &io)
    }
}
