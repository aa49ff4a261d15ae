//! Classifier training and evaluation on the GPU. A training step (gather + poison,
//! forward, loss, backward, Adam, per-sample metrics) is one submit; nothing is read
//! back inside an epoch.

use std::collections::VecDeque;
use web_time::Instant;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::batches::{run_batches, BatchInputs, BatchPlan, BatchPlans, SampleSet, MAX_IN_FLIGHT};
use super::gpu_mlp::{GpuMlp, Gradients, Workspace};
use crate::data::backdoor::Backdoor;
use crate::gpu::adam::{adam, set_adam_step};
use crate::gpu::batch::{Augment, GpuDataset};
use crate::gpu::loss::{softmax_cross_entropy, LossOutputs};
use crate::gpu::{Dispatch, GpuContext, Slice, StepParams};
use crate::progress;
use crate::rng;

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f32,
    pub lr_schedule: LrSchedule,
    pub seed: u32,
    /// Cap on the total number of optimisation steps.
    pub max_steps: Option<usize>,
    /// Poisoning applied to the training batches.
    pub backdoor: Option<Backdoor>,
    /// Augmentation of the training batches (before the trigger).
    pub augment: Option<Augment>,
    pub progress: bool,
}

/// How the learning rate changes over the planned steps. The original had no schedule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    #[default]
    Constant,
    /// Half a cosine from the base rate down to zero at the last planned step.
    Cosine,
}

impl LrSchedule {
    /// The rate of 0-based step `step` out of `total` planned steps.
    pub fn rate(self, base: f32, step: usize, total: usize) -> f32 {
        match self {
            LrSchedule::Constant => base,
            LrSchedule::Cosine => {
                let progress = step as f64 / total.max(1) as f64;
                (base as f64 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
            }
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub steps: usize,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainReport {
    pub epochs: Vec<EpochMetrics>,
    pub steps: usize,
    pub samples: usize,
    pub seconds: f64,
    pub samples_per_second: f64,
}

/// Per-sample outputs of the loss kernel, indexed by position in the epoch order.
pub(crate) struct SampleMetrics {
    pub loss: wgpu::Buffer,
    pub correct: wgpu::Buffer,
}

impl SampleMetrics {
    pub(crate) fn new(ctx: &GpuContext, n: usize) -> Result<Self> {
        Ok(SampleMetrics {
            loss: ctx.zeros("sample_loss", n)?,
            correct: ctx.zeros("sample_correct", n)?,
        })
    }

    /// Mean loss and accuracy over the first `n` positions, summed in f64 in order.
    pub(crate) async fn read_means(&self, ctx: &GpuContext, n: usize) -> Result<(f64, f64)> {
        let loss: Vec<f32> = ctx.read_async(Slice::new(&self.loss, 0, n)).await?;
        let correct: Vec<f32> = ctx.read_async(Slice::new(&self.correct, 0, n)).await?;
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / n.max(1) as f64;
        Ok((mean(&loss), mean(&correct)))
    }
}

/// Optimiser state: gradients and Adam moments, laid out like the parameters.
/// What one training step reads and writes beside the model and its workspace: the
/// epoch's sample order, the step parameters, per-sample metrics and Adam's state.
pub(crate) struct StepBuffers {
    pub indices: wgpu::Buffer,
    pub step: wgpu::Buffer,
    pub metrics: SampleMetrics,
    grads: wgpu::Buffer,
    m: wgpu::Buffer,
    v: wgpu::Buffer,
}

impl StepBuffers {
    /// For training `model` on `n` samples.
    pub(crate) fn new(ctx: &GpuContext, model: &GpuMlp, n: usize) -> Result<Self> {
        let total = model.layout.total;
        Ok(StepBuffers {
            indices: ctx.zeros("epoch_indices", n)?,
            step: ctx.uniform("step", &StepParams::default()),
            metrics: SampleMetrics::new(ctx, n)?,
            grads: ctx.zeros("grads", total)?,
            m: ctx.zeros("adam_m", total)?,
            v: ctx.zeros("adam_v", total)?,
        })
    }

    /// What a training step runs after the forward pass: loss, backward, Adam.
    pub(crate) fn ops(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        ws: &Workspace,
    ) -> Result<Vec<Dispatch>> {
        let mut ops = vec![loss_op(ctx, model, ws, &self.metrics, &self.step)?];
        ops.extend(model.backward(ctx, ws, &self.grads)?);
        let whole = Slice::whole;
        let (grads, m, v) = (whole(&self.grads), whole(&self.m), whole(&self.v));
        let total = model.layout.total;
        ops.push(adam(
            ctx,
            total,
            whole(&model.params),
            grads,
            m,
            v,
            &self.step,
        )?);
        Ok(ops)
    }
}

/// The loss kernel of a plan: per-sample metrics at the batch's position, dL/dlogits.
pub(crate) fn loss_op(
    ctx: &GpuContext,
    model: &GpuMlp,
    ws: &Workspace,
    metrics: &SampleMetrics,
    step: &wgpu::Buffer,
) -> Result<Dispatch> {
    softmax_cross_entropy(
        ctx,
        ws.rows,
        model.config.output_dim,
        Slice::whole(&ws.logits),
        Slice::whole(&ws.labels),
        &LossOutputs {
            grad: Slice::whole(&ws.dlogits),
            sample_loss: Slice::whole(&metrics.loss),
            sample_correct: Slice::whole(&metrics.correct),
        },
        step,
    )
}

/// Trains `model` in place on every sample of `data`; returns per-epoch metrics.
pub fn train(
    ctx: &GpuContext,
    model: &GpuMlp,
    data: &GpuDataset,
    opts: &TrainOptions,
) -> Result<TrainReport> {
    let all: Vec<u32> = (0..data.len as u32).collect();
    train_on(ctx, model, data, &all, opts)
}

/// Trains `model` in place on the samples `samples` of `data` (each epoch a seeded
/// shuffle of them); returns per-epoch metrics.
pub fn train_on(
    ctx: &GpuContext,
    model: &GpuMlp,
    data: &GpuDataset,
    samples: &[u32],
    opts: &TrainOptions,
) -> Result<TrainReport> {
    crate::gpu::block_on(train_on_async(ctx, model, data, samples, opts))
}

/// [`train_on`] as a future (the browser's form).
pub async fn train_on_async(
    ctx: &GpuContext,
    model: &GpuMlp,
    data: &GpuDataset,
    samples: &[u32],
    opts: &TrainOptions,
) -> Result<TrainReport> {
    if let Some(&bad) = samples.iter().find(|&&i| i as usize >= data.len) {
        bail!(
            "sample index {bad} out of range for a data set of {}",
            data.len
        );
    }
    if opts.epochs == 0 || opts.max_steps == Some(0) {
        bail!("training needs at least one epoch and one step (num_epochs and max_steps >= 1)");
    }
    let n = samples.len();
    if n == 0 {
        bail!("training needs at least one sample");
    }
    let buffers = StepBuffers::new(ctx, model, n)?;
    let (indices, step, metrics) = (&buffers.indices, &buffers.step, &buffers.metrics);
    let inputs = BatchInputs {
        data,
        indices,
        step,
        backdoor: opts.backdoor,
        seed: opts.seed,
        augment: opts.augment,
    };
    let train_ops = |ws: &Workspace| buffers.ops(ctx, model, ws);
    let plans = BatchPlans::new(
        ctx,
        model,
        &inputs,
        n,
        opts.batch_size,
        Gradients::Params,
        &train_ops,
    )?;
    let start = Instant::now();
    let mut report = TrainReport {
        epochs: Vec::new(),
        steps: 0,
        samples: 0,
        seconds: 0.0,
        samples_per_second: 0.0,
    };
    let schedule = EpochSchedule {
        epochs: opts.epochs,
        max_steps: opts.max_steps,
        learning_rate: opts.learning_rate,
        lr_schedule: opts.lr_schedule,
        seed: opts.seed,
        progress: opts.progress,
    };
    (report.steps, report.samples) =
        run_epochs(ctx, &plans, indices, step, samples, &schedule, async |e| {
            // Samples are processed in order, so positions 0..seen hold this epoch's metrics.
            let (loss, acc) = metrics.read_means(ctx, e.samples).await?;
            if !loss.is_finite() {
                bail!(
                    "training diverged: the mean loss of epoch {} is {loss}; \
                     try a smaller learning rate",
                    e.epoch
                );
            }
            report.epochs.push(EpochMetrics {
                epoch: e.epoch,
                train_loss: loss,
                train_accuracy: acc,
                steps: e.steps,
                seconds: e.seconds,
            });
            Ok(format!("loss {loss:.4}  accuracy {acc:.4}"))
        })
        .await?;
    report.seconds = start.elapsed().as_secs_f64();
    report.samples_per_second = report.samples as f64 / report.seconds.max(1e-9);
    Ok(report)
}

/// How [`run_epochs`] steps through the data.
pub(crate) struct EpochSchedule {
    pub epochs: usize,
    /// Cap on the total number of steps.
    pub max_steps: Option<usize>,
    pub learning_rate: f32,
    pub lr_schedule: LrSchedule,
    /// Seeds the per-epoch shuffles.
    pub seed: u32,
    pub progress: bool,
}

/// What an epoch did, for the caller's end-of-epoch bookkeeping.
pub(crate) struct EpochDone {
    /// 1-based.
    pub epoch: usize,
    pub steps: usize,
    pub samples: usize,
    pub seconds: f64,
}

/// Runs optimisation epochs over `samples`: per epoch a fresh seeded shuffle written to
/// `indices`, then one submit per batch with `step` holding the batch position and the
/// Adam step. `epoch_end` reads back the epoch's metrics and returns a progress line.
/// Returns (steps, samples) in all.
pub(crate) async fn run_epochs(
    ctx: &GpuContext,
    plans: &BatchPlans,
    indices: &wgpu::Buffer,
    step: &wgpu::Buffer,
    samples: &[u32],
    schedule: &EpochSchedule,
    mut epoch_end: impl AsyncFnMut(&EpochDone) -> Result<String>,
) -> Result<(usize, usize)> {
    if !(schedule.learning_rate.is_finite() && schedule.learning_rate > 0.0) {
        bail!(
            "learning rate must be positive, got {}",
            schedule.learning_rate
        );
    }
    let n = samples.len();
    let batch = plans.batch_size();
    let steps_per_epoch = n.div_ceil(batch);
    let planned = (schedule.epochs * steps_per_epoch).min(schedule.max_steps.unwrap_or(usize::MAX));
    let (mut total_steps, mut total_samples) = (0, 0);
    for epoch in 0..schedule.epochs {
        if schedule.max_steps.is_some_and(|m| total_steps >= m) {
            break;
        }
        let epoch_start = Instant::now();
        let order: Vec<u32> = rng::shuffled_indices(n, schedule.seed, epoch as u32)
            .into_iter()
            .map(|i| samples[i as usize])
            .collect();
        ctx.queue
            .write_buffer(indices, 0, bytemuck::cast_slice(&order));
        let bar = progress::bar(
            schedule.progress,
            steps_per_epoch as u64,
            &format!("epoch {}/{}", epoch + 1, schedule.epochs),
        );
        let mut in_flight = VecDeque::new();
        let (mut steps, mut seen) = (0, 0);
        for s in 0..steps_per_epoch {
            if schedule.max_steps.is_some_and(|m| total_steps >= m) {
                break;
            }
            let offset = s * batch;
            let plan = plans.pick(n - offset);
            let lr = schedule
                .lr_schedule
                .rate(schedule.learning_rate, total_steps, planned);
            total_steps += 1;
            let mut params = StepParams {
                epoch: epoch as u32,
                batch_offset: offset as u32,
                ..Default::default()
            };
            set_adam_step(&mut params, lr, total_steps as u32);
            ctx.queue.write_buffer(step, 0, bytemuck::bytes_of(&params));
            in_flight.push_back(ctx.submit(&plan.ops));
            if in_flight.len() > MAX_IN_FLIGHT {
                ctx.finish(in_flight.pop_front()).await?;
            }
            steps += 1;
            seen += plan.ws.rows;
            bar.inc(1);
        }
        ctx.finish(None).await?;
        bar.finish_and_clear();
        total_samples += seen;
        let done = EpochDone {
            epoch: epoch + 1,
            steps,
            samples: seen,
            seconds: epoch_start.elapsed().as_secs_f64(),
        };
        let line = epoch_end(&done).await?;
        progress::note(
            schedule.progress,
            &format!("epoch {:>3}: {line}  ({:.1} s)", done.epoch, done.seconds),
        );
    }
    Ok((total_steps, total_samples))
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub loss: f64,
    pub accuracy: f64,
    pub samples: usize,
}

/// Runs a forward-only pass with the loss kernel over `indices`; `after` sees each plan
/// once its batch is submitted.
fn eval_batches(
    ctx: &GpuContext,
    model: &GpuMlp,
    samples: &SampleSet<'_>,
    batch_size: usize,
    after: impl FnMut(&BatchPlan) -> Result<()>,
) -> Result<SampleMetrics> {
    let SampleSet {
        data,
        indices,
        backdoor,
        seed,
    } = *samples;
    let n = indices.len();
    if let Some(&bad) = indices.iter().find(|&&i| i as usize >= data.len) {
        bail!(
            "sample index {bad} out of range for a data set of {}",
            data.len
        );
    }
    let order = ctx.buffer_from("eval_indices", indices)?;
    let step = ctx.uniform("step", &StepParams::default());
    let metrics = SampleMetrics::new(ctx, n)?;
    let inputs = BatchInputs {
        data,
        indices: &order,
        step: &step,
        backdoor,
        seed,
        augment: None,
    };
    let loss = |ws: &Workspace| Ok(vec![loss_op(ctx, model, ws, &metrics, &step)?]);
    let batch = batch_size.min(model.max_rows(ctx));
    let plans = BatchPlans::new(ctx, model, &inputs, n, batch, Gradients::None, &loss)?;
    run_batches(ctx, &plans, &step, n, |_, _| Ok(()), after)?;
    Ok(metrics)
}

/// Loss and accuracy of `model` on the samples `indices`, optionally all poisoned by
/// `backdoor` (labels then become the target class, so accuracy = attack success).
pub fn evaluate(
    ctx: &GpuContext,
    model: &GpuMlp,
    data: &GpuDataset,
    indices: &[u32],
    backdoor: Option<&Backdoor>,
    seed: u32,
    batch_size: usize,
) -> Result<EvalMetrics> {
    let samples = SampleSet {
        data,
        indices,
        backdoor: backdoor.copied(),
        seed,
    };
    crate::gpu::block_on(evaluate_async(ctx, model, &samples, batch_size))
}

/// [`evaluate`] of a [`SampleSet`], as a future (the browser's form).
pub async fn evaluate_async(
    ctx: &GpuContext,
    model: &GpuMlp,
    samples: &SampleSet<'_>,
    batch_size: usize,
) -> Result<EvalMetrics> {
    let n = samples.indices.len();
    let metrics = eval_batches(ctx, model, samples, batch_size, |_| Ok(()))?;
    let (loss, accuracy) = metrics.read_means(ctx, n).await?;
    Ok(EvalMetrics {
        loss,
        accuracy,
        samples: n,
    })
}

/// A model's clean test metrics and, with a trigger, its attack success.
pub struct TestResults {
    pub clean: EvalMetrics,
    pub attack_success_rate: Option<f64>,
    pub attack_samples: usize,
}

/// A test split on the GPU with its labels on the host.
pub struct TestSet<'a> {
    pub data: &'a GpuDataset,
    pub labels: &'a [u8],
}

/// Clean accuracy on `test`; with `backdoor`, the fraction of triggered test images
/// whose true label is not the target that the model classifies as the target.
pub async fn test_results(
    ctx: &GpuContext,
    model: &GpuMlp,
    test: &TestSet<'_>,
    backdoor: Option<&Backdoor>,
    seed: u32,
    batch: usize,
) -> Result<TestResults> {
    let all: Vec<u32> = (0..test.labels.len() as u32).collect();
    let set = |indices, backdoor| SampleSet {
        data: test.data,
        indices,
        backdoor,
        seed,
    };
    let clean = evaluate_async(ctx, model, &set(&all, None), batch).await?;
    let (attack_success_rate, attack_samples) = match backdoor {
        Some(b) => {
            let victims: Vec<u32> = all
                .iter()
                .copied()
                .filter(|&i| test.labels[i as usize] as u32 != b.target_class)
                .collect();
            let triggered = set(&victims, Some(b.always()));
            let m = evaluate_async(ctx, model, &triggered, batch).await?;
            (Some(m.accuracy), m.samples)
        }
        None => (None, 0),
    };
    Ok(TestResults {
        clean,
        attack_success_rate,
        attack_samples,
    })
}

/// Logits (`indices.len() x output_dim`, row-major) of clean samples; reads back per batch.
pub fn predict_logits(
    ctx: &GpuContext,
    model: &GpuMlp,
    data: &GpuDataset,
    indices: &[u32],
    batch_size: usize,
) -> Result<Vec<f32>> {
    let samples = SampleSet {
        data,
        indices,
        backdoor: None,
        seed: 0,
    };
    sample_logits(ctx, model, &samples, batch_size)
}

/// The logits of `samples` (with their trigger, if any), row-major.
pub fn sample_logits(
    ctx: &GpuContext,
    model: &GpuMlp,
    samples: &SampleSet<'_>,
    batch_size: usize,
) -> Result<Vec<f32>> {
    let classes = model.config.output_dim;
    let mut logits = Vec::with_capacity(samples.indices.len() * classes);
    eval_batches(ctx, model, samples, batch_size, |plan| {
        let len = plan.ws.rows * classes;
        logits.extend(ctx.read::<f32>(Slice::new(&plan.ws.logits, 0, len))?);
        Ok(())
    })?;
    Ok(logits)
}

#[cfg(test)]
mod tests {
    use super::LrSchedule;

    #[test]
    fn cosine_decays_from_the_base_rate_to_zero() {
        let rate = |step| LrSchedule::Cosine.rate(0.01, step, 100);
        assert_eq!(rate(0), 0.01);
        assert!((rate(50) - 0.005).abs() < 1e-9);
        assert!(rate(99) > 0.0 && rate(99) < 1e-5);
        assert!((1..100).all(|s| rate(s) < rate(s - 1)));
        assert_eq!(LrSchedule::Constant.rate(0.01, 99, 100), 0.01);
    }
}
