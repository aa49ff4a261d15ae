//! Launchers and CPU references for `shaders/abstraction.wgsl`: the abstraction
//! detector's consistency (cosine distance) and output (KL) losses with their gradients.

use anyhow::Result;

use super::{simple_kernel, Binding, Dispatch, GpuContext, Slice};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LossParams {
    rows: u32,
    dim: u32,
    pred_dim: u32,
    scale: f32,
}

/// Gradient outputs; `None` for scoring (losses only).
pub struct LossGrads<'a> {
    /// Written: d(scale·loss)/d(pred), or /d(pre-activation) for a post-ReLU pred.
    pub pred: Slice<'a>,
    /// Cosine only: d(scale·loss)/d(reference) is added here.
    pub reference: Option<Slice<'a>>,
    pub scale: f32,
}

/// The buffers of one loss dispatch over `rows` rows: the prediction, what it is
/// compared with (the actual state, or the model's logits), each row's loss, the
/// gradient outputs (`None`: losses only) and the step uniform.
#[derive(Clone, Copy)]
pub struct LossArgs<'a> {
    pub rows: usize,
    pub pred: Slice<'a>,
    pub reference: Slice<'a>,
    pub loss: Slice<'a>,
    pub grads: Option<&'a LossGrads<'a>>,
    pub step: &'a wgpu::Buffer,
}

fn launch(
    ctx: &GpuContext,
    entry: &str,
    constants: &[(&str, f64)],
    params: LossParams,
    args: &LossArgs<'_>,
) -> Result<Dispatch> {
    let LossArgs {
        pred,
        reference,
        loss,
        grads,
        step,
        ..
    } = *args;
    let mut constants = constants.to_vec();
    constants.push(("GRADS", grads.is_some() as u8 as f64));
    let kernel = simple_kernel(
        ctx,
        &format!("abstraction_{entry}"),
        &["step", "abstraction"],
        entry,
        &[
            Binding::ReadOnly,
            Binding::ReadOnly,
            Binding::ReadWrite,
            Binding::ReadWrite,
            Binding::ReadWrite,
            Binding::Uniform,
            Binding::Uniform,
        ],
        &constants,
    )?;
    let uniform = ctx.uniform("abstraction_loss_params", &params);
    ctx.dispatch(
        &kernel,
        &[
            Some(pred),
            Some(reference),
            Some(loss),
            grads.map(|g| g.pred),
            grads.and_then(|g| g.reference),
            Some(Slice::whole(&uniform)),
            Some(Slice::whole(step)),
        ],
        ctx.grid_1d(params.rows as usize, 64),
    )
}

/// Cosine distance of `pred` to `reference` (both rows x dim) per row; `relu_pred`:
/// the gradient goes to the pre-activation of a post-ReLU `pred`.
pub fn cosine_distance(
    ctx: &GpuContext,
    dim: usize,
    relu_pred: bool,
    args: &LossArgs<'_>,
) -> Result<Dispatch> {
    let params = LossParams {
        rows: args.rows as u32,
        dim: dim as u32,
        pred_dim: dim as u32,
        scale: args.grads.map_or(0.0, |g| g.scale),
    };
    let constants = [("RELU_PRED", relu_pred as u8 as f64)];
    launch(ctx, "cosine", &constants, params, args)
}

/// KL(softmax(logits) || softmax(pred)) per row; the reference is the logits, rows x
/// classes; `pred` is rows x classes, or rows x 2 with `single_class`.
pub fn kl_divergence(
    ctx: &GpuContext,
    classes: usize,
    single_class: bool,
    args: &LossArgs<'_>,
) -> Result<Dispatch> {
    let params = LossParams {
        rows: args.rows as u32,
        dim: classes as u32,
        pred_dim: if single_class { 2 } else { classes as u32 },
        scale: args.grads.map_or(0.0, |g| g.scale),
    };
    let constants = [("SINGLE_CLASS", single_class as u8 as f64)];
    launch(ctx, "kl", &constants, params, args)
}

/// f64 reference of [`cosine_distance`]: (loss, grad_pred, grad_reference).
pub fn cosine_distance_reference(
    pred: &[f64],
    reference: &[f64],
    dim: usize,
    relu_pred: bool,
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    const EPS: f64 = 1e-6;
    let (mut loss, mut ga, mut gb) = (Vec::new(), Vec::new(), Vec::new());
    for (a, b) in pred.chunks(dim).zip(reference.chunks(dim)) {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let la = a.iter().map(|x| x * x).sum::<f64>().sqrt();
        let lb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
        let (na, nb) = (la.max(EPS), lb.max(EPS));
        loss.push(1.0 - dot / (na * nb));
        let ca = if la > EPS {
            dot / (na.powi(3) * nb)
        } else {
            0.0
        };
        let cb = if lb > EPS {
            dot / (na * nb.powi(3))
        } else {
            0.0
        };
        for (&x, &y) in a.iter().zip(b) {
            let g = scale * (ca * x - y / (na * nb));
            ga.push(if relu_pred && x <= 0.0 { 0.0 } else { g });
            gb.push(scale * (cb * y - x / (na * nb)));
        }
    }
    (loss, ga, gb)
}

/// The model's (possibly collapsed) log-probabilities of one row.
fn log_probs(logits: &[f64], single_class: bool) -> Vec<f64> {
    let lse = |v: &[f64]| {
        let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
    };
    let total = lse(logits);
    if single_class {
        vec![lse(&logits[1..]) - total, logits[0] - total]
    } else {
        logits.iter().map(|l| l - total).collect()
    }
}

/// f64 reference of [`kl_divergence`]: (loss, grad_pred).
pub fn kl_divergence_reference(
    pred: &[f64],
    logits: &[f64],
    classes: usize,
    single_class: bool,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let pred_dim = if single_class { 2 } else { classes };
    let (mut loss, mut grad) = (Vec::new(), Vec::new());
    for (q, l) in pred.chunks(pred_dim).zip(logits.chunks(classes)) {
        let lp = log_probs(l, single_class);
        let lq = log_probs(q, false);
        loss.push(
            lp.iter()
                .zip(&lq)
                .map(|(a, b)| {
                    if a.exp() > 0.0 {
                        a.exp() * (a - b)
                    } else {
                        0.0
                    }
                })
                .sum(),
        );
        grad.extend(lp.iter().zip(&lq).map(|(a, b)| scale * (b.exp() - a.exp())));
    }
    (loss, grad)
}
