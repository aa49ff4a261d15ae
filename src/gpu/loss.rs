//! Launcher and CPU reference for `shaders/loss.wgsl` (softmax cross-entropy).

use anyhow::Result;

use super::{simple_kernel, Binding, Dispatch, GpuContext, Slice};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LossParams {
    rows: u32,
    classes: u32,
    _pad: [u32; 2],
}

/// Outputs of one softmax cross-entropy dispatch.
pub struct LossOutputs<'a> {
    /// dL/dlogits of the batch-mean loss, `rows x classes`.
    pub grad: Slice<'a>,
    /// Per-sample loss, written at `step.batch_offset + row`.
    pub sample_loss: Slice<'a>,
    /// Per-sample 1.0 / 0.0 for argmax == label, same positions.
    pub sample_correct: Slice<'a>,
}

pub fn softmax_cross_entropy(
    ctx: &GpuContext,
    rows: usize,
    classes: usize,
    logits: Slice<'_>,
    labels: Slice<'_>,
    out: &LossOutputs<'_>,
    step: &wgpu::Buffer,
) -> Result<Dispatch> {
    let kernel = simple_kernel(
        ctx,
        "softmax_cross_entropy",
        &["step", "loss"],
        "main",
        &[
            Binding::ReadOnly,
            Binding::ReadOnly,
            Binding::ReadWrite,
            Binding::ReadWrite,
            Binding::ReadWrite,
            Binding::Uniform,
            Binding::Uniform,
        ],
        &[],
    )?;
    let params = ctx.uniform(
        "loss_params",
        &LossParams {
            rows: rows as u32,
            classes: classes as u32,
            _pad: [0; 2],
        },
    );
    ctx.dispatch(
        &kernel,
        &[
            Some(logits),
            Some(labels),
            Some(out.grad),
            Some(out.sample_loss),
            Some(out.sample_correct),
            Some(Slice::whole(&params)),
            Some(Slice::whole(step)),
        ],
        ctx.grid_1d(rows, 64),
    )
}

/// Per-row (loss, correct, gradient row) in f64.
pub fn softmax_cross_entropy_reference(
    classes: usize,
    logits: &[f32],
    labels: &[u32],
) -> Vec<(f64, bool, Vec<f64>)> {
    let rows = labels.len();
    logits
        .chunks(classes)
        .zip(labels)
        .map(|(row, &label)| {
            let mx = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = mx + row.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
            let arg = row
                .iter()
                .enumerate()
                .fold(0, |best, (i, &v)| if v > row[best] { i } else { best });
            let grad = row
                .iter()
                .enumerate()
                .map(|(c, &v)| {
                    ((v as f64 - lse).exp() - if c == label as usize { 1.0 } else { 0.0 })
                        / rows as f64
                })
                .collect();
            (
                lse - row[label as usize] as f64,
                arg == label as usize,
                grad,
            )
        })
        .collect()
}
