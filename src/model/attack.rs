//! Adversarial examples on the GPU: FGSM (one signed-gradient step of size eps, as the
//! original) and PGD (several projected steps inside the L∞ ball, optionally from a
//! random start). Each batch of the attack is one submit: gather, forward, loss, then per
//! step input gradient, update, forward and loss.

use web_time::Instant;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::batches::{run_batches, BatchInputs, BatchPlans};
use super::gpu_mlp::{GpuMlp, Gradients, Workspace};
use super::train::{loss_op, SampleMetrics};
use crate::gpu::attack::{attack_ops, AttackBuffers, AttackStep};
use crate::gpu::batch::GpuDataset;
use crate::gpu::{Dispatch, GpuContext, Slice, StepParams};
use crate::progress;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttackMethod {
    /// Fast gradient sign method: x + eps·sign(∇x loss), one step.
    Fgsm,
    /// Projected gradient descent: `steps` sign steps of `step_size`, projected onto the
    /// eps ball after each.
    Pgd,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttackConfig {
    pub method: AttackMethod,
    /// L∞ radius (pixels are in [0, 1]).
    pub eps: f32,
    /// PGD steps (FGSM: always 1).
    pub steps: usize,
    /// PGD step size [default: 2.5·eps/steps, Madry et al.].
    pub step_size: Option<f32>,
    /// PGD: start from a uniform random point of the eps ball.
    pub random_start: bool,
    pub batch_size: usize,
    pub seed: u32,
}

/// The original's FGSM radius, 8/255.
pub const DEFAULT_EPS: f32 = 8.0 / 255.0;
/// PGD steps when not given.
pub const DEFAULT_PGD_STEPS: usize = 20;

impl AttackConfig {
    /// An attack from command-line choices; PGD starts at a random point of the ball.
    pub fn new(method: AttackMethod, eps: f32, steps: usize, step_size: Option<f32>) -> Self {
        AttackConfig {
            method,
            eps,
            steps: match method {
                AttackMethod::Fgsm => 1,
                AttackMethod::Pgd => steps,
            },
            step_size,
            random_start: method == AttackMethod::Pgd,
            batch_size: 128,
            seed: 0,
        }
    }

    /// (number of update steps, the per-step kernel parameters).
    fn schedule(&self) -> Result<(usize, AttackStep)> {
        if !(self.eps.is_finite() && self.eps > 0.0) {
            bail!("attack eps must be > 0, got {}", self.eps);
        }
        Ok(match self.method {
            AttackMethod::Fgsm => (
                1,
                AttackStep {
                    eps: self.eps,
                    step_size: self.eps,
                    random_start: false,
                    seed: self.seed,
                },
            ),
            AttackMethod::Pgd => {
                if self.steps == 0 {
                    bail!("PGD needs at least one step");
                }
                let step_size = self.step_size.unwrap_or(2.5 * self.eps / self.steps as f32);
                (
                    self.steps,
                    AttackStep {
                        eps: self.eps,
                        step_size,
                        random_start: self.random_start,
                        seed: self.seed,
                    },
                )
            }
        })
    }
}

/// What an attack produced: the perturbed images (`n x sample_dim`, HWC) and the model's
/// loss / correctness per sample before and after.
pub struct AttackOutcome {
    pub images: Vec<f32>,
    pub loss_before: Vec<f32>,
    pub loss_after: Vec<f32>,
    pub correct_before: Vec<bool>,
    pub correct_after: Vec<bool>,
    pub seconds: f64,
}

fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64
}

fn accuracy(v: &[bool]) -> f64 {
    v.iter().filter(|&&c| c).count() as f64 / v.len().max(1) as f64
}

impl AttackOutcome {
    pub fn original_loss(&self) -> f64 {
        mean(&self.loss_before)
    }
    pub fn new_loss(&self) -> f64 {
        mean(&self.loss_after)
    }
    pub fn original_accuracy(&self) -> f64 {
        accuracy(&self.correct_before)
    }
    pub fn new_accuracy(&self) -> f64 {
        accuracy(&self.correct_after)
    }
}

/// Attacks the clean samples `indices` of `data` against their true labels.
pub fn attack(
    ctx: &GpuContext,
    model: &GpuMlp,
    data: &GpuDataset,
    indices: &[u32],
    config: &AttackConfig,
    show_progress: bool,
) -> Result<AttackOutcome> {
    let (steps, params) = config.schedule()?;
    let n = indices.len();
    if let Some(&bad) = indices.iter().find(|&&i| i as usize >= data.len) {
        bail!(
            "sample index {bad} out of range for a data set of {}",
            data.len
        );
    }
    let start = Instant::now();
    let dim = model.config.input_dim();
    let order = ctx.buffer_from("attack_indices", indices)?;
    let step = ctx.uniform("step", &StepParams::default());
    let before = SampleMetrics::new(ctx, n)?;
    let after = SampleMetrics::new(ctx, n)?;
    let inputs = BatchInputs {
        data,
        indices: &order,
        step: &step,
        backdoor: None,
        seed: config.seed,
        augment: None,
    };
    let attack_batch = |ws: &Workspace| -> Result<Vec<Dispatch>> {
        let x0 = ctx.zeros("x0", ws.rows * dim)?;
        let dx = ws.dx.as_ref().expect("Gradients::Input workspace");
        let update = attack_ops(
            ctx,
            ws.rows,
            dim,
            &params,
            &AttackBuffers {
                x: Slice::whole(&ws.x),
                xt: (!model.config.is_cnn()).then(|| Slice::whole(&ws.xt)),
                x0: Slice::whole(&x0),
                grad: Slice::whole(dx),
            },
            &step,
        )?;
        // The forward pass of the clean batch is already in the plan.
        let mut ops = vec![loss_op(ctx, model, ws, &before, &step)?, update.start];
        let forward_and_loss = [
            model.forward(ctx, ws)?,
            vec![loss_op(ctx, model, ws, &after, &step)?],
        ]
        .concat();
        if params.random_start {
            ops.extend(forward_and_loss.iter().cloned());
        }
        for _ in 0..steps {
            ops.extend(model.input_gradient(ctx, ws)?);
            ops.push(update.update.clone());
            ops.extend(forward_and_loss.iter().cloned());
        }
        Ok(ops)
    };
    let plans = BatchPlans::new(
        ctx,
        model,
        &inputs,
        n,
        config.batch_size,
        Gradients::Input,
        &attack_batch,
    )?;
    let bar = progress::bar(show_progress, n as u64, "attack");
    let mut images = Vec::with_capacity(n * dim);
    run_batches(
        ctx,
        &plans,
        &step,
        n,
        |_, _| Ok(()),
        |plan| {
            images.extend(ctx.read::<f32>(Slice::whole(&plan.ws.x))?);
            bar.inc(plan.ws.rows as u64);
            Ok(())
        },
    )?;
    bar.finish_and_clear();
    let read = |m: &SampleMetrics| -> Result<(Vec<f32>, Vec<bool>)> {
        let loss: Vec<f32> = ctx.read(Slice::whole(&m.loss))?;
        let correct: Vec<f32> = ctx.read(Slice::whole(&m.correct))?;
        Ok((loss, correct.iter().map(|&c| c != 0.0).collect()))
    };
    let (loss_before, correct_before) = read(&before)?;
    let (loss_after, correct_after) = read(&after)?;
    if let Some(i) = loss_after.iter().position(|l| !l.is_finite()) {
        bail!("the attacked model's loss is not finite (sample {i}): is the classifier diverged?");
    }
    Ok(AttackOutcome {
        images,
        loss_before,
        loss_after,
        correct_before,
        correct_after,
        seconds: start.elapsed().as_secs_f64(),
    })
}
