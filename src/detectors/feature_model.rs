//! What the detectors that learn a model of the activations share (abstraction, VAE):
//! Adam on one flat parameter vector over shuffled trusted batches, one submit per step
//! (gather, the classifier's forward pass, the feature model's forward pass, losses,
//! backward, Adam), with one per-sample loss buffer per loss term, read back only at
//! epoch ends.

use anyhow::{bail, Result};

use super::SampleSet;
use crate::gpu::adam::adam;
use crate::gpu::{Dispatch, GpuContext, Slice, StepParams};
use crate::model::batches::{BatchInputs, BatchPlans};
use crate::model::gpu_mlp::Workspace;
use crate::model::train::{run_epochs, EpochSchedule, LrSchedule};
use crate::model::{GpuMlp, Gradients};

/// How the feature model trains; `what` names it in messages; `terms` loss buffers
/// are kept.
pub(crate) struct Training {
    pub what: &'static str,
    pub terms: usize,
    pub batch_size: usize,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub learning_rate: f32,
    pub progress: bool,
}

/// What a training step records into: the parameters and their gradients (flat), the
/// per-sample loss buffers (one per term, written at the batch's position) and the step
/// uniform.
pub(crate) struct TrainState<'a> {
    pub values: &'a wgpu::Buffer,
    pub grads: &'a wgpu::Buffer,
    pub losses: &'a [wgpu::Buffer],
    pub step: &'a wgpu::Buffer,
}

/// The dispatches of one training batch on the classifier's workspace (forward,
/// losses and backward; Adam is appended).
pub(crate) type RecordStep<'f> = dyn Fn(&Workspace, &TrainState<'_>) -> Result<Vec<Dispatch>> + 'f;

/// Trains the flat parameters `init` on `trusted` and returns them; `line` turns an epoch's mean loss per term into its progress line.
pub(crate) fn train(
    ctx: &GpuContext,
    model: &GpuMlp,
    trusted: &SampleSet<'_>,
    init: &[f32],
    opts: &Training,
    record: &RecordStep<'_>,
    line: &dyn Fn(&[f64]) -> String,
) -> Result<Vec<f32>> {
    let total = init.len();
    let values = ctx.buffer_from(&format!("{} params", opts.what), init)?;
    let (grads, m, v) = (
        ctx.zeros("feature model grads", total)?,
        ctx.zeros("feature model adam m", total)?,
        ctx.zeros("feature model adam v", total)?,
    );
    let n = trusted.indices.len();
    let indices = ctx.zeros("feature model order", n)?;
    let step = ctx.uniform("step", &StepParams::default());
    let losses = (0..opts.terms)
        .map(|l| ctx.zeros(&format!("{} loss {l}", opts.what), n))
        .collect::<Result<Vec<_>>>()?;
    let state = TrainState {
        values: &values,
        grads: &grads,
        losses: &losses,
        step: &step,
    };
    let train_ops = |ws: &Workspace| -> Result<Vec<Dispatch>> {
        let mut ops = record(ws, &state)?;
        let whole = Slice::whole;
        ops.push(adam(
            ctx,
            total,
            whole(&values),
            whole(&grads),
            whole(&m),
            whole(&v),
            &step,
        )?);
        Ok(ops)
    };
    let inputs = BatchInputs {
        data: trusted.data,
        indices: &indices,
        step: &step,
        backdoor: trusted.backdoor,
        seed: trusted.seed,
        augment: None,
    };
    let plans = BatchPlans::new(
        ctx,
        model,
        &inputs,
        n,
        opts.batch_size,
        Gradients::None,
        &train_ops,
    )?;
    let schedule = EpochSchedule {
        epochs: opts.epochs,
        max_steps: opts.max_steps,
        learning_rate: opts.learning_rate,
        lr_schedule: LrSchedule::Constant,
        seed: trusted.seed,
        progress: opts.progress,
    };
    let epochs = run_epochs(
        ctx,
        &plans,
        &indices,
        &step,
        trusted.indices,
        &schedule,
        async |e| {
            let means = losses
                .iter()
                .map(|b| mean(ctx, b, e.samples))
                .collect::<Result<Vec<_>>>()?;
            if means.iter().any(|m| !m.is_finite()) {
                bail!(
                    "{} training diverged in epoch {} (mean losses {means:?}); try a smaller \
                     learning rate",
                    opts.what,
                    e.epoch
                );
            }
            Ok(line(&means))
        },
    );
    crate::gpu::block_on(epochs)?;
    ctx.read(Slice::whole(&values))
}

/// The mean of the first `n` values of a per-sample loss buffer.
pub(crate) fn mean(ctx: &GpuContext, buf: &wgpu::Buffer, n: usize) -> Result<f64> {
    let v: Vec<f32> = ctx.read(Slice::new(buf, 0, n))?;
    Ok(v.iter().map(|&x| x as f64).sum::<f64>() / n.max(1) as f64)
}
