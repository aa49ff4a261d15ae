//! Running the model over samples in batches. A [`BatchPlan`] is recorded once per
//! batch size: gather (+ trigger) of the samples at `step.batch_offset`, the forward
//! pass, and whatever the caller appends (loss, backward and Adam for training,
//! statistics or scores for detectors). Each batch is then one submit.

use std::collections::VecDeque;

use anyhow::{bail, Result};

use super::gpu_mlp::{GpuMlp, Gradients, Workspace};
use crate::data::backdoor::Backdoor;
use crate::gpu::batch::{gather_batch, Augment, BatchOutputs, Gather, GpuDataset};
use crate::gpu::{Dispatch, GpuContext, Slice, StepParams};

/// The `epoch` key of the RNG for evaluation batches: never a training epoch.
pub const EVAL_EPOCH: u32 = u32::MAX;
/// Submits allowed in flight before the host waits (bounds queued work and memory).
pub const MAX_IN_FLIGHT: usize = 4;

/// Samples to run through the model: which samples of a data set on the GPU, with an
/// optional trigger (drawn with `seed`).
pub struct SampleSet<'a> {
    pub data: &'a GpuDataset,
    pub indices: &'a [u32],
    pub backdoor: Option<Backdoor>,
    pub seed: u32,
}

/// What a plan's gather reads: the data set, the sample order and the per-step
/// parameters (rewritten before each submit).
pub struct BatchInputs<'a> {
    pub data: &'a GpuDataset,
    pub indices: &'a wgpu::Buffer,
    pub step: &'a wgpu::Buffer,
    pub backdoor: Option<Backdoor>,
    pub seed: u32,
    /// Training augmentation (never for evaluation or detectors).
    pub augment: Option<Augment>,
}

/// The recorded dispatches of one batch size.
pub struct BatchPlan {
    pub ws: Workspace,
    pub ops: Vec<Dispatch>,
}

/// Dispatches a caller appends to a plan, given its workspace.
pub type Extra<'f> = dyn Fn(&Workspace) -> Result<Vec<Dispatch>> + 'f;

impl BatchPlan {
    pub fn new(
        ctx: &GpuContext,
        model: &GpuMlp,
        inputs: &BatchInputs<'_>,
        rows: usize,
        gradients: Gradients,
        extra: &Extra<'_>,
    ) -> Result<Self> {
        let data = inputs.data;
        let ws = model.workspace(ctx, rows, data.is_sparse(), gradients)?;
        let poison = inputs
            .backdoor
            .map(|b| b.poison(data.height, data.width, data.num_classes))
            .transpose()?;
        let gather = Gather {
            data,
            rows,
            indices: Slice::whole(inputs.indices),
            augment: inputs.augment,
            poison,
            seed: inputs.seed,
            step: inputs.step,
        };
        let mut ops = vec![gather_batch(
            ctx,
            &gather,
            &BatchOutputs {
                x: Slice::whole(&ws.x),
                // Only an MLP's first matmul reads the transposed batch.
                xt: (!model.config.is_cnn()).then(|| Slice::whole(&ws.xt)),
                labels: Slice::whole(&ws.labels),
            },
        )?];
        ops.extend(model.forward(ctx, &ws)?);
        ops.extend(extra(&ws)?);
        Ok(BatchPlan { ws, ops })
    }
}

/// A plan for full batches and one for the last, partial batch of `n` samples.
pub struct BatchPlans {
    full: BatchPlan,
    tail: Option<BatchPlan>,
}

impl BatchPlans {
    pub fn new(
        ctx: &GpuContext,
        model: &GpuMlp,
        inputs: &BatchInputs<'_>,
        n: usize,
        batch_size: usize,
        gradients: Gradients,
        extra: &Extra<'_>,
    ) -> Result<Self> {
        check_compatible(model, inputs.data, n, batch_size)?;
        let batch = batch_size.min(n);
        let max = model.max_rows(ctx);
        if batch > max {
            bail!(
                "a batch of {batch} needs buffers over this adapter's storage binding limit \
                 for this model; use a batch size of at most {max}"
            );
        }
        let plan = |rows| BatchPlan::new(ctx, model, inputs, rows, gradients, extra);
        Ok(BatchPlans {
            full: plan(batch)?,
            tail: (!n.is_multiple_of(batch))
                .then(|| plan(n % batch))
                .transpose()?,
        })
    }

    pub fn batch_size(&self) -> usize {
        self.full.ws.rows
    }

    /// The plan for the batch with `remaining` samples left.
    pub fn pick(&self, remaining: usize) -> &BatchPlan {
        match &self.tail {
            Some(t) if remaining < self.full.ws.rows => t,
            _ => &self.full,
        }
    }
}

fn check_compatible(model: &GpuMlp, data: &GpuDataset, n: usize, batch: usize) -> Result<()> {
    let shape = [data.height, data.width, data.channels];
    if model.config.input_shape != shape {
        bail!(
            "the model expects inputs of shape {:?} but the data set has {shape:?}",
            model.config.input_shape
        );
    }
    if data.num_classes > model.config.output_dim {
        bail!(
            "the data set has {} classes but the model only {} outputs",
            data.num_classes,
            model.config.output_dim
        );
    }
    if batch == 0 || batch > 65535 {
        bail!("batch size must be in 1..=65535, got {batch}");
    }
    if n == 0 {
        bail!("no samples to run");
    }
    Ok(())
}

/// Runs `plans` over positions `0..n` of the sample order in the evaluation epoch:
/// per batch, `before(offset, rows)` (to rewrite per-batch uniforms), one submit, then
/// `after(plan)`. Returns once the GPU has finished.
pub fn run_batches(
    ctx: &GpuContext,
    plans: &BatchPlans,
    step: &wgpu::Buffer,
    n: usize,
    mut before: impl FnMut(usize, usize) -> Result<()>,
    mut after: impl FnMut(&BatchPlan) -> Result<()>,
) -> Result<()> {
    let mut in_flight = VecDeque::new();
    for offset in (0..n).step_by(plans.batch_size()) {
        let plan = plans.pick(n - offset);
        let params = StepParams {
            epoch: EVAL_EPOCH,
            batch_offset: offset as u32,
            ..Default::default()
        };
        ctx.queue.write_buffer(step, 0, bytemuck::bytes_of(&params));
        before(offset, plan.ws.rows)?;
        in_flight.push_back(ctx.submit(&plan.ops));
        if in_flight.len() > MAX_IN_FLIGHT {
            ctx.wait(in_flight.pop_front())?;
        }
        after(plan)?;
    }
    ctx.wait(None)
}

/// [`run_batches`] over a [`SampleSet`], with `extra(ws)` appended to each plan: how GPU
/// detectors read activations ([`Workspace::activation`]) without leaving the GPU.
pub fn for_each_activation_batch(
    ctx: &GpuContext,
    model: &GpuMlp,
    samples: &SampleSet<'_>,
    batch_size: usize,
    extra: &Extra<'_>,
    before: impl FnMut(usize, usize) -> Result<()>,
) -> Result<()> {
    run_samples(ctx, model, samples, batch_size, extra, before, |_| Ok(()))
}

/// The activations of `layers` ([`crate::model::MlpConfig::activation_layers`]
/// indices) for every sample, read back to the host: per layer `n x width` values,
/// row-major. For prototyping detectors on the host; each batch waits for its readback.
pub fn read_activations(
    ctx: &GpuContext,
    model: &GpuMlp,
    samples: &SampleSet<'_>,
    batch_size: usize,
    layers: &[usize],
) -> Result<Vec<Vec<f32>>> {
    let all = model.config.activation_layers();
    if let Some(&bad) = layers.iter().find(|&&l| l >= all.len()) {
        bail!(
            "layer {bad} does not exist: the model has {} activation layers",
            all.len()
        );
    }
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); layers.len()];
    run_samples(
        ctx,
        model,
        samples,
        batch_size,
        &|_| Ok(Vec::new()),
        |_, _| Ok(()),
        |plan| {
            for (o, &l) in out.iter_mut().zip(layers) {
                o.extend(ctx.read::<f32>(plan.ws.activation(l))?);
            }
            Ok(())
        },
    )?;
    Ok(out)
}

/// [`for_each_activation_batch`] with `after(plan)` once each batch is submitted (to
/// read back what the batch wrote; each read waits for the GPU).
pub fn run_samples(
    ctx: &GpuContext,
    model: &GpuMlp,
    samples: &SampleSet<'_>,
    batch_size: usize,
    extra: &Extra<'_>,
    before: impl FnMut(usize, usize) -> Result<()>,
    after: impl FnMut(&BatchPlan) -> Result<()>,
) -> Result<()> {
    let n = samples.indices.len();
    if let Some(&bad) = samples
        .indices
        .iter()
        .find(|&&i| i as usize >= samples.data.len)
    {
        bail!(
            "sample index {bad} out of range for a data set of {}",
            samples.data.len
        );
    }
    let indices = ctx.buffer_from("sample_indices", samples.indices)?;
    let step = ctx.uniform("step", &StepParams::default());
    let inputs = BatchInputs {
        data: samples.data,
        indices: &indices,
        step: &step,
        backdoor: samples.backdoor,
        seed: samples.seed,
        augment: None,
    };
    // Forward-only results do not depend on the batch size: cap it to what fits.
    let batch = batch_size.min(model.max_rows(ctx));
    let plans = BatchPlans::new(ctx, model, &inputs, n, batch, Gradients::None, extra)?;
    run_batches(ctx, &plans, &step, n, before, after)
}
