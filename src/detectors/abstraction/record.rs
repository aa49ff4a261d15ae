//! The abstraction on the GPU: per-batch buffers, the recorded forward / loss / backward
//! dispatches, and passes over sample sets.

use anyhow::{bail, Result};

use super::{Abstraction, OutputLoss};
use crate::detectors::{for_each_activation_batch, LayerScores, SampleSet};
use crate::gpu::abstraction::{cosine_distance, kl_divergence, LossArgs, LossGrads};
use crate::gpu::{Dispatch, GpuContext, Slice, StepParams};
use crate::model::gpu_mlp::Workspace;
use crate::model::layers::{
    BoundStack, Needs, ParamLayout, StackBackward, StackBuffers, StackForward,
};
use crate::model::mlp::Dense;
use crate::model::GpuMlp;

/// Per-batch buffers of the abstraction's forward pass and, when training, gradients.
pub(super) struct Tensors {
    /// z_l, l = 0..L.
    pub(super) z: Vec<wgpu::Buffer>,
    /// ẑ_l, l = 1..L (index l - 1).
    pub(super) zhat: Vec<wgpu::Buffer>,
    pub(super) yhat: wgpu::Buffer,
    /// dL/dz_l.
    pub(super) gz: Vec<wgpu::Buffer>,
    /// dL/d(pre-ReLU ẑ_l), l = 1..L (index l - 1).
    pub(super) gpre: Vec<wgpu::Buffer>,
    pub(super) gyhat: wgpu::Buffer,
    /// Each map's own batch buffers (im2col columns, pooling state).
    pub(super) maps: Vec<StackBuffers>,
}

/// What [`Abstraction::record`] records into: the parameters, the batch's tensors,
/// the per-sample loss buffers (written at the batch's position) and the step uniform.
#[derive(Clone, Copy)]
pub(super) struct Recording<'a> {
    pub(super) params: &'a Params<'a>,
    pub(super) t: &'a Tensors,
    pub(super) losses: &'a [wgpu::Buffer],
    pub(super) step: &'a wgpu::Buffer,
}

/// What [`Abstraction::pass`] leaves on the GPU: per-layer losses of every sample and,
/// if asked for, the last batch's parameter gradients.
pub(super) struct Pass {
    pub(super) layout: ParamLayout,
    pub(super) losses: Vec<wgpu::Buffer>,
    pub(super) grads: Option<wgpu::Buffer>,
}

/// The abstraction's parameters on the GPU, and where to put their gradients.
pub(super) struct Params<'a> {
    pub(super) layout: &'a ParamLayout,
    pub(super) values: &'a wgpu::Buffer,
    pub(super) grads: Option<&'a wgpu::Buffer>,
}

impl Abstraction {
    /// Gradients of the training loss over all of `samples` as one batch (what one
    /// training step computes), in the layout of [`Abstraction::layers`].
    pub fn batch_gradients(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
    ) -> Result<Vec<Dense>> {
        let n = samples.indices.len();
        let pass = self.pass(ctx, model, samples, n, true)?;
        let grads = pass.grads.expect("requested");
        let flat: Vec<f32> = ctx.read(Slice::whole(&grads))?;
        Ok(pass.layout.unflatten(&flat))
    }

    /// Per-layer losses of `samples` (in batches of `batch_size`) and, with
    /// `gradients`, the flat parameter gradients of the training loss (meaningful when
    /// the samples fit one batch).
    pub(crate) fn losses_and_gradients(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
        batch_size: usize,
        gradients: bool,
    ) -> Result<(LayerScores, Option<Vec<f32>>)> {
        let n = samples.indices.len();
        let pass = self.pass(ctx, model, samples, batch_size, gradients)?;
        let grads = pass
            .grads
            .as_ref()
            .map(|g| ctx.read::<f32>(Slice::whole(g)))
            .transpose()?;
        Ok((self.read_scores(ctx, &pass.losses, n)?, grads))
    }

    pub(super) fn read_scores(
        &self,
        ctx: &GpuContext,
        losses: &[wgpu::Buffer],
        n: usize,
    ) -> Result<LayerScores> {
        let last = self.num_hidden() - 1;
        let names = (1..=last)
            .map(|l| format!("layer{l}"))
            .chain(["output".to_string()])
            .collect();
        crate::gpu::block_on(LayerScores::read(ctx, names, losses, n))
    }

    /// Runs the abstraction over `samples` (forward and losses; with `gradients`, the
    /// backward pass too, each batch's parameter gradients overwriting the last).
    pub(super) fn pass(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
        batch_size: usize,
        gradients: bool,
    ) -> Result<Pass> {
        if self.layers.is_empty() {
            bail!("the abstraction detector is not trained");
        }
        self.check_model(model)?;
        let n = samples.indices.len();
        let max_rows = self.max_rows(ctx)?;
        let batch = batch_size.min(n.max(1));
        if gradients && batch > max_rows {
            bail!("gradients over {batch} samples at once exceed the storage binding limit ({max_rows} fit)");
        }
        let batch = batch.min(max_rows);
        let layout = self.layout();
        let values = ctx.buffer_from("abstraction params", &layout.flatten(&self.layers))?;
        let grads = gradients
            .then(|| ctx.zeros("abstraction grads", layout.total))
            .transpose()?;
        let params = Params {
            layout: &layout,
            values: &values,
            grads: grads.as_ref(),
        };
        let step = ctx.uniform("step", &StepParams::default());
        let losses = (0..self.num_hidden())
            .map(|l| ctx.zeros(&format!("abstraction loss {l}"), n))
            .collect::<Result<Vec<_>>>()?;
        for_each_activation_batch(
            ctx,
            model,
            samples,
            batch,
            &|ws| {
                let t = self.tensors(ctx, ws.rows, gradients)?;
                let rec = Recording {
                    params: &params,
                    t: &t,
                    losses: &losses,
                    step: &step,
                };
                self.record(ctx, model, ws, &rec)
            },
            |offset, _| {
                let p = StepParams {
                    batch_offset: offset as u32,
                    ..Default::default()
                };
                ctx.queue.write_buffer(&step, 0, bytemuck::bytes_of(&p));
                Ok(())
            },
        )?;
        Ok(Pass {
            layout,
            losses,
            grads,
        })
    }

    /// Per-layer losses of every sample: the consistency of hidden layers 1..L, then
    /// the output loss.
    pub(super) fn raw_scores(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
        batch_size: usize,
    ) -> Result<LayerScores> {
        Ok(self
            .losses_and_gradients(ctx, model, samples, batch_size, false)?
            .0)
    }

    pub(super) fn tensors(
        &self,
        ctx: &GpuContext,
        rows: usize,
        gradients: bool,
    ) -> Result<Tensors> {
        let d = self.widths();
        let per =
            |name: &str, range: std::ops::Range<usize>, on: bool| -> Result<Vec<wgpu::Buffer>> {
                if !on {
                    return Ok(Vec::new());
                }
                range
                    .map(|l| ctx.zeros(&format!("{name}{l}"), rows * d[l]))
                    .collect()
            };
        let l = d.len();
        let q = self.pred_dim();
        let maps = self
            .maps()?
            .into_iter()
            .enumerate()
            .map(|(i, map)| {
                let needs = Needs {
                    backward: gradients,
                    param_grads: gradients,
                    // Steps pass the gradient on to the state before them; τ maps end.
                    input_grad: gradients && i >= l,
                };
                map.buffers(ctx, rows, needs)
            })
            .collect::<Result<_>>()?;
        Ok(Tensors {
            z: per("z", 0..l, true)?,
            zhat: per("zhat", 1..l, true)?,
            yhat: ctx.zeros("yhat", rows * q)?,
            gz: per("gz", 0..l, gradients)?,
            gpre: per("gpre", 1..l, gradients)?,
            gyhat: ctx.zeros("gyhat", if gradients { rows * q } else { 1 })?,
            maps,
        })
    }

    /// The abstraction's forward pass, losses and (with `params.grads`) backward pass on
    /// the model's workspace `ws`. `losses[l - 1]` receives the consistency loss of hidden
    /// layer l (l = 1..L), `losses[L - 1]` the output loss, at the batch's position.
    pub(super) fn record(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        ws: &Workspace,
        rec: &Recording<'_>,
    ) -> Result<Vec<Dispatch>> {
        let Recording {
            params,
            t,
            losses,
            step,
        } = *rec;
        let rows = ws.rows;
        let l_count = self.num_hidden();
        let d = self.widths();
        let maps = self.maps()?;
        let batch_map = |i: usize| BoundStack {
            stack: &maps[i],
            rows,
            schedule: model.schedule,
            slots: std::slice::from_ref(&params.layout.layers[i]),
            values: params.values,
            buffers: &t.maps[i],
        };
        let forward = |x, out| StackForward {
            x,
            x_t: None,
            sparse: false,
            out,
        };
        let backward = |x, g, grads, gx| StackBackward {
            x,
            sparse: false,
            g,
            grads: Some(grads),
            gx,
            gx_mask: None,
        };
        let whole = Slice::whole;
        let mut ops = Vec::new();
        // Forward: z_l = τ_l(a_l); ẑ_{l+1} = m_l(z_l); ŷ = m_L(z_L).
        for (l, z) in t.z.iter().enumerate() {
            ops.extend(batch_map(l).forward(ctx, &forward(ws.activation(l), whole(z)))?);
        }
        for j in 0..l_count {
            let out = if j + 1 == l_count {
                &t.yhat
            } else {
                &t.zhat[j]
            };
            let m = batch_map(l_count + j);
            ops.extend(m.forward(ctx, &forward(whole(&t.z[j]), whole(out)))?);
        }
        // Losses, and the backward pass interleaved with them: the cosine loss of layer
        // l adds to dL/dz_l, which the backward step of m_l has written just before.
        let grads = params.grads;
        let cons_scale = 1.0 / (rows * l_count.saturating_sub(1).max(1)) as f32;
        let output_grads = grads.map(|_| LossGrads {
            pred: whole(&t.gyhat),
            reference: None,
            scale: 1.0 / rows as f32,
        });
        ops.push(kl_divergence(
            ctx,
            self.model.output_dim,
            self.config.output_loss_fn == OutputLoss::SingleClass,
            &LossArgs {
                rows,
                pred: whole(&t.yhat),
                reference: whole(&ws.logits),
                loss: whole(&losses[l_count - 1]),
                grads: output_grads.as_ref(),
                step,
            },
        )?);
        for j in (0..l_count).rev() {
            if let Some(g) = grads {
                let g_out = if j + 1 == l_count {
                    &t.gyhat
                } else {
                    &t.gpre[j]
                };
                let (x, g_out, gz) = (whole(&t.z[j]), whole(g_out), whole(&t.gz[j]));
                let m = batch_map(l_count + j);
                ops.extend(m.backward(ctx, &backward(x, g_out, g, Some(gz)))?);
            }
            if j >= 1 {
                let state_grads = grads.map(|_| LossGrads {
                    pred: whole(&t.gpre[j - 1]),
                    reference: Some(whole(&t.gz[j])),
                    scale: cons_scale,
                });
                let args = LossArgs {
                    rows,
                    pred: whole(&t.zhat[j - 1]),
                    reference: whole(&t.z[j]),
                    loss: whole(&losses[j - 1]),
                    grads: state_grads.as_ref(),
                    step,
                };
                ops.push(cosine_distance(ctx, d[j], true, &args)?);
            }
        }
        if let Some(g) = grads {
            for (l, gz) in t.gz.iter().enumerate() {
                let (x, gz) = (ws.activation(l), whole(gz));
                ops.extend(batch_map(l).backward(ctx, &backward(x, gz, g, None))?);
            }
        }
        Ok(ops)
    }
}
