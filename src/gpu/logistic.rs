//! Launchers and CPU references for `shaders/logistic.wgsl`: the per-sample terms of one
//! IRLS (Newton) step of logistic regression, and rows scaled by their IRLS weights.

use anyhow::Result;

use super::{simple_kernel, Binding, Dispatch, GpuContext, Slice};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LogisticParams {
    rows: u32,
    cols: u32,
    inv_rows: f32,
    _pad: u32,
}

const BINDINGS: [Binding; 6] = [
    Binding::ReadOnly,
    Binding::ReadOnly,
    Binding::ReadWrite,
    Binding::ReadWrite,
    Binding::ReadWrite,
    Binding::Uniform,
];

fn launch(
    ctx: &GpuContext,
    entry: &str,
    (rows, cols): (usize, usize),
    resources: [Option<Slice<'_>>; 5],
) -> Result<Dispatch> {
    let kernel = simple_kernel(
        ctx,
        &format!("logistic_{entry}"),
        &["logistic"],
        entry,
        &BINDINGS,
        &[],
    )?;
    let params = ctx.uniform(
        "logistic_params",
        &LogisticParams {
            rows: rows as u32,
            cols: cols as u32,
            inv_rows: 1.0 / rows as f32,
            _pad: 0,
        },
    );
    let [a, b, c, d, e] = resources;
    ctx.dispatch(
        &kernel,
        &[a, b, c, d, e, Some(Slice::whole(&params))],
        ctx.grid_1d(rows * cols, 64),
    )
}

/// Where [`irls_terms`] writes: per sample (p − y)/n, sqrt(p(1 − p)/n) and the loss.
pub struct IrlsTerms<'a> {
    pub residuals: Slice<'a>,
    pub weights: Slice<'a>,
    pub losses: Slice<'a>,
}

/// The IRLS terms of `rows` samples from their logits and 0/1 labels (as f32).
pub fn irls_terms(
    ctx: &GpuContext,
    rows: usize,
    logits: Slice<'_>,
    labels: Slice<'_>,
    out: &IrlsTerms<'_>,
) -> Result<Dispatch> {
    let res = [
        Some(logits),
        Some(labels),
        Some(out.residuals),
        Some(out.weights),
        Some(out.losses),
    ];
    launch(ctx, "irls", (rows, 1), res)
}

/// `out[i][j] = x[i][j] · w[i]` for a `rows` x `cols` matrix.
pub fn scale_rows(
    ctx: &GpuContext,
    (rows, cols): (usize, usize),
    x: Slice<'_>,
    w: Slice<'_>,
    out: Slice<'_>,
) -> Result<Dispatch> {
    launch(
        ctx,
        "scale_rows",
        (rows, cols),
        [Some(x), Some(w), Some(out), None, None],
    )
}

/// f64 reference of one sample's (residual, weight, loss) among `rows`.
pub fn irls_reference(z: f64, y: f64, rows: usize) -> (f64, f64, f64) {
    let p = 1.0 / (1.0 + (-z).exp());
    let n = rows as f64;
    let loss = z.max(0.0) + (-z.abs()).exp().ln_1p() - y * z;
    ((p - y) / n, (p * (1.0 - p) / n).sqrt(), loss)
}
