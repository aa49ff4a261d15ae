//! Classifier training and evaluation on the GPU. A training step (gather + poison,
//! forward, loss, backward, Adam, per-sample metrics) is one submit; nothing is read
//! back inside an epoch.

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::gpu_mlp::{GpuMlp, Workspace};
use crate::data::backdoor::Backdoor;
use crate::gpu::adam::{adam, set_adam_step};
use crate::gpu::batch::{gather_batch, BatchOutputs, GpuDataset};
use crate::gpu::loss::{softmax_cross_entropy, LossOutputs};
use crate::gpu::{Dispatch, GpuContext, Slice, StepParams};
use crate::progress;
use crate::rng;

/// The `epoch` key of the RNG for evaluation batches: never a training epoch.
pub const EVAL_EPOCH: u32 = u32::MAX;
/// Submits allowed in flight before the host waits (bounds queued work and memory).
const MAX_IN_FLIGHT: usize = 4;

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f32,
    pub seed: u32,
    /// Cap on the total number of optimisation steps.
    pub max_steps: Option<usize>,
    /// Poisoning applied to the training batches.
    pub backdoor: Option<Backdoor>,
    pub progress: bool,
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
struct SampleMetrics {
    loss: wgpu::Buffer,
    correct: wgpu::Buffer,
}

impl SampleMetrics {
    fn new(ctx: &GpuContext, n: usize) -> Result<Self> {
        Ok(SampleMetrics {
            loss: ctx.zeros("sample_loss", n)?,
            correct: ctx.zeros("sample_correct", n)?,
        })
    }

    /// Mean loss and accuracy over the first `n` positions, summed in f64 in order.
    fn read_means(&self, ctx: &GpuContext, n: usize) -> Result<(f64, f64)> {
        let loss: Vec<f32> = ctx.read(Slice::new(&self.loss, 0, n))?;
        let correct: Vec<f32> = ctx.read(Slice::new(&self.correct, 0, n))?;
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / n.max(1) as f64;
        Ok((mean(&loss), mean(&correct)))
    }
}

/// Buffers shared by every batch plan of one run.
struct Shared<'a> {
    data: &'a GpuDataset,
    indices: wgpu::Buffer,
    step: wgpu::Buffer,
    metrics: SampleMetrics,
    backdoor: Option<Backdoor>,
    seed: u32,
}

/// The recorded dispatches of one batch size.
struct Plan {
    ws: Workspace,
    ops: Vec<Dispatch>,
}

/// Optimiser state: gradients and Adam moments, laid out like the parameters.
struct Optimizer {
    grads: wgpu::Buffer,
    m: wgpu::Buffer,
    v: wgpu::Buffer,
}

impl Plan {
    fn new(
        ctx: &GpuContext,
        model: &GpuMlp,
        s: &Shared<'_>,
        rows: usize,
        opt: Option<&Optimizer>,
    ) -> Result<Self> {
        let ws = model.workspace(ctx, rows, s.data.is_sparse(), opt.is_some())?;
        let mut ops = vec![gather_batch(
            ctx,
            s.data,
            rows,
            Slice::whole(&s.indices),
            &BatchOutputs {
                x: Slice::whole(&ws.x),
                xt: Some(Slice::whole(&ws.xt)),
                labels: Slice::whole(&ws.labels),
            },
            s.backdoor.as_ref(),
            s.seed,
            &s.step,
        )?];
        ops.extend(model.forward(ctx, &ws)?);
        ops.push(softmax_cross_entropy(
            ctx,
            rows,
            model.config.output_dim,
            Slice::whole(&ws.logits),
            Slice::whole(&ws.labels),
            &LossOutputs {
                grad: Slice::whole(&ws.dlogits),
                sample_loss: Slice::whole(&s.metrics.loss),
                sample_correct: Slice::whole(&s.metrics.correct),
            },
            &s.step,
        )?);
        if let Some(opt) = opt {
            ops.extend(model.backward(ctx, &ws, &opt.grads)?);
            let n = model.layout.total;
            ops.push(adam(
                ctx,
                n,
                Slice::whole(&model.params),
                Slice::whole(&opt.grads),
                Slice::whole(&opt.m),
                Slice::whole(&opt.v),
                &s.step,
            )?);
        }
        Ok(Plan { ws, ops })
    }
}

/// The plan for a batch with `remaining` samples left in the epoch.
fn pick<'p>(full: &'p Plan, tail: Option<&'p Plan>, remaining: usize) -> &'p Plan {
    match tail {
        Some(t) if remaining < full.ws.rows => t,
        _ => full,
    }
}

/// A plan for full batches and one for the last, partial batch (if any).
fn plans(
    ctx: &GpuContext,
    model: &GpuMlp,
    s: &Shared<'_>,
    n: usize,
    batch: usize,
    opt: Option<&Optimizer>,
) -> Result<(Plan, Option<Plan>)> {
    let full = Plan::new(ctx, model, s, batch.min(n), opt)?;
    let tail = match n % batch {
        r if r != 0 && n > batch => Some(Plan::new(ctx, model, s, r, opt)?),
        _ => None,
    };
    Ok((full, tail))
}

fn check_compatible(model: &GpuMlp, data: &GpuDataset, batch_size: usize) -> Result<()> {
    let shape = [data.height, data.width, data.channels];
    if model.config.input_shape != shape {
        bail!(
            "model expects inputs of shape {:?} but the data set has {shape:?}",
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
    if batch_size == 0 || batch_size > 65535 {
        bail!("batch size must be in 1..=65535, got {batch_size}");
    }
    if data.len == 0 {
        bail!("the data set is empty");
    }
    Ok(())
}

/// Trains `model` in place; returns per-epoch metrics.
pub fn train(
    ctx: &GpuContext,
    model: &GpuMlp,
    data: &GpuDataset,
    opts: &TrainOptions,
) -> Result<TrainReport> {
    check_compatible(model, data, opts.batch_size)?;
    if !(opts.learning_rate.is_finite() && opts.learning_rate > 0.0) {
        bail!("learning rate must be positive, got {}", opts.learning_rate);
    }
    let n = data.len;
    let shared = Shared {
        data,
        indices: ctx.zeros("epoch_indices", n)?,
        step: ctx.uniform("step", &StepParams::default()),
        metrics: SampleMetrics::new(ctx, n)?,
        backdoor: opts.backdoor,
        seed: opts.seed,
    };
    let opt = Optimizer {
        grads: ctx.zeros("grads", model.layout.total)?,
        m: ctx.zeros("adam_m", model.layout.total)?,
        v: ctx.zeros("adam_v", model.layout.total)?,
    };
    let (full, tail) = plans(ctx, model, &shared, n, opts.batch_size, Some(&opt))?;
    let batch = full.ws.rows;
    let steps_per_epoch = n.div_ceil(batch);
    let start = Instant::now();
    let mut report = TrainReport {
        epochs: Vec::new(),
        steps: 0,
        samples: 0,
        seconds: 0.0,
        samples_per_second: 0.0,
    };
    for epoch in 0..opts.epochs {
        if opts.max_steps.is_some_and(|m| report.steps >= m) {
            break;
        }
        let epoch_start = Instant::now();
        let order = rng::shuffled_indices(n, opts.seed, epoch as u32);
        ctx.queue
            .write_buffer(&shared.indices, 0, bytemuck::cast_slice(&order));
        let bar = progress::bar(
            opts.progress,
            steps_per_epoch as u64,
            &format!("epoch {}/{}", epoch + 1, opts.epochs),
        );
        let mut in_flight = VecDeque::new();
        let (mut steps, mut seen) = (0, 0);
        for s in 0..steps_per_epoch {
            if opts.max_steps.is_some_and(|m| report.steps >= m) {
                break;
            }
            let offset = s * batch;
            let plan = pick(&full, tail.as_ref(), n - offset);
            report.steps += 1;
            let mut step = StepParams {
                epoch: epoch as u32,
                batch_offset: offset as u32,
                ..Default::default()
            };
            set_adam_step(&mut step, opts.learning_rate, report.steps as u32);
            ctx.queue
                .write_buffer(&shared.step, 0, bytemuck::bytes_of(&step));
            in_flight.push_back(ctx.submit(&plan.ops));
            if in_flight.len() > MAX_IN_FLIGHT {
                ctx.wait(in_flight.pop_front())?;
            }
            steps += 1;
            seen += plan.ws.rows;
            bar.inc(1);
        }
        ctx.wait(None)?;
        bar.finish_and_clear();
        // Samples are processed in order, so positions 0..seen hold this epoch's metrics.
        let (loss, acc) = shared.metrics.read_means(ctx, seen)?;
        if !loss.is_finite() {
            bail!(
                "training diverged: the mean loss of epoch {} is {loss}; \
                 try a smaller learning rate",
                epoch + 1
            );
        }
        report.samples += seen;
        report.epochs.push(EpochMetrics {
            epoch: epoch + 1,
            train_loss: loss,
            train_accuracy: acc,
            steps,
            seconds: epoch_start.elapsed().as_secs_f64(),
        });
        progress::note(
            opts.progress,
            &format!(
                "epoch {:>3}: loss {loss:.4}  accuracy {acc:.4}  ({:.1} s)",
                epoch + 1,
                epoch_start.elapsed().as_secs_f64()
            ),
        );
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.samples_per_second = report.samples as f64 / report.seconds.max(1e-9);
    Ok(report)
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub loss: f64,
    pub accuracy: f64,
    pub samples: usize,
}

/// Runs a forward-only plan over positions `0..n` of `shared.indices` in batches,
/// calling `after` once each batch is submitted.
fn for_each_eval_batch(
    ctx: &GpuContext,
    model: &GpuMlp,
    shared: &Shared<'_>,
    n: usize,
    batch_size: usize,
    mut after: impl FnMut(&Plan) -> Result<()>,
) -> Result<()> {
    let (full, tail) = plans(ctx, model, shared, n, batch_size, None)?;
    for offset in (0..n).step_by(full.ws.rows) {
        let plan = pick(&full, tail.as_ref(), n - offset);
        let step = StepParams {
            epoch: EVAL_EPOCH,
            batch_offset: offset as u32,
            ..Default::default()
        };
        ctx.queue
            .write_buffer(&shared.step, 0, bytemuck::bytes_of(&step));
        ctx.submit(&plan.ops);
        after(plan)?;
    }
    Ok(())
}

fn eval_shared<'a>(
    ctx: &GpuContext,
    data: &'a GpuDataset,
    indices: &[u32],
    backdoor: Option<&Backdoor>,
    seed: u32,
) -> Result<Shared<'a>> {
    if indices.is_empty() {
        bail!("nothing to evaluate: no samples selected");
    }
    if let Some(&bad) = indices.iter().find(|&&i| i as usize >= data.len) {
        bail!(
            "sample index {bad} out of range for a data set of {}",
            data.len
        );
    }
    Ok(Shared {
        data,
        indices: ctx.buffer_from("eval_indices", indices)?,
        step: ctx.uniform("step", &StepParams::default()),
        metrics: SampleMetrics::new(ctx, indices.len())?,
        backdoor: backdoor.copied(),
        seed,
    })
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
    check_compatible(model, data, batch_size)?;
    let shared = eval_shared(ctx, data, indices, backdoor, seed)?;
    let n = indices.len();
    for_each_eval_batch(ctx, model, &shared, n, batch_size, |_| Ok(()))?;
    let (loss, accuracy) = shared.metrics.read_means(ctx, n)?;
    Ok(EvalMetrics {
        loss,
        accuracy,
        samples: n,
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
    check_compatible(model, data, batch_size)?;
    let shared = eval_shared(ctx, data, indices, None, 0)?;
    let classes = model.config.output_dim;
    let mut logits = Vec::with_capacity(indices.len() * classes);
    for_each_eval_batch(ctx, model, &shared, indices.len(), batch_size, |plan| {
        let rows = plan.ws.rows * classes;
        logits.extend(ctx.read::<f32>(Slice::new(&plan.ws.logits, 0, rows))?);
        Ok(())
    })?;
    Ok(logits)
}
