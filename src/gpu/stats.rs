//! Launchers and CPU references for `shaders/stats.wgsl`: centring, Chan merges of
//! batch statistics, and row dot products.

use anyhow::Result;

use super::{simple_kernel, Binding, Dispatch, GpuContext, Slice};

const SOURCE: &str = include_str!("../../shaders/stats.wgsl");
const BINDINGS: [Binding; 5] = [
    Binding::ReadOnly,
    Binding::ReadOnly,
    Binding::ReadOnly,
    Binding::ReadWrite,
    Binding::Uniform,
];

/// `struct StatsParams` of the shader. The Chan weights change per batch, so callers
/// that merge keep this in a buffer they rewrite before each submit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StatsParams {
    pub rows: u32,
    pub cols: u32,
    pub gram_weight: f32,
    pub mean_weight: f32,
    pub scale: f32,
    pub out_offset: u32,
    pub _pad: [u32; 2],
}

impl StatsParams {
    /// Weights for merging a batch of `m` samples after `n`.
    pub fn chan(cols: usize, n: u64, m: u64) -> Self {
        let total = (n + m) as f64;
        StatsParams {
            cols: cols as u32,
            gram_weight: (n as f64 * m as f64 / total) as f32,
            mean_weight: (m as f64 / total) as f32,
            ..Default::default()
        }
    }
}

fn launch(
    ctx: &GpuContext,
    entry: &str,
    inputs: [Option<Slice<'_>>; 3],
    out: Slice<'_>,
    params: &wgpu::Buffer,
    items: usize,
) -> Result<Dispatch> {
    let kernel = simple_kernel(ctx, entry, &[SOURCE], entry, &BINDINGS, &[])?;
    let [x, y, z] = inputs;
    ctx.dispatch(
        &kernel,
        &[x, y, z, Some(out), Some(Slice::whole(params))],
        ctx.grid_1d(items, 64),
    )
}

/// `out[r][c] = x[r][c] - mean[c]` for `rows x cols`.
pub fn center(
    ctx: &GpuContext,
    rows: usize,
    cols: usize,
    x: Slice<'_>,
    mean: Slice<'_>,
    out: Slice<'_>,
) -> Result<Dispatch> {
    let params = ctx.uniform(
        "center_params",
        &StatsParams {
            rows: rows as u32,
            cols: cols as u32,
            ..Default::default()
        },
    );
    launch(
        ctx,
        "center",
        [Some(x), Some(mean), None],
        out,
        &params,
        rows * cols,
    )
}

/// `gram += batch_gram + w·δδᵀ`, `δ = batch_mean - mean`, with `w` from `params`
/// (a [`StatsParams::chan`] the caller rewrites per batch).
pub fn merge_gram(
    ctx: &GpuContext,
    cols: usize,
    batch_gram: Slice<'_>,
    batch_mean: Slice<'_>,
    mean: Slice<'_>,
    gram: Slice<'_>,
    params: &wgpu::Buffer,
) -> Result<Dispatch> {
    let inputs = [Some(batch_gram), Some(batch_mean), Some(mean)];
    launch(ctx, "merge_gram", inputs, gram, params, cols * cols)
}

/// `mean += mean_weight·(batch_mean - mean)`; record after [`merge_gram`].
pub fn merge_mean(
    ctx: &GpuContext,
    cols: usize,
    batch_mean: Slice<'_>,
    mean: Slice<'_>,
    params: &wgpu::Buffer,
) -> Result<Dispatch> {
    launch(
        ctx,
        "merge_mean",
        [Some(batch_mean), None, None],
        mean,
        params,
        cols,
    )
}

/// `out[out_offset + r] = scale · Σ_c x[r][c]·y[r][c]` with `rows`, `cols`, `scale` and
/// `out_offset` from `params` (rewritten per batch by the caller).
pub fn row_dot(
    ctx: &GpuContext,
    rows: usize,
    x: Slice<'_>,
    y: Slice<'_>,
    out: Slice<'_>,
    params: &wgpu::Buffer,
) -> Result<Dispatch> {
    launch(ctx, "row_dot", [Some(x), Some(y), None], out, params, rows)
}

/// f64 reference: mean and centred Gram (Σ (x-μ)(x-μ)ᵀ) of `rows x cols` samples,
/// computed in two passes.
pub fn mean_and_gram_reference(rows: usize, cols: usize, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let mut mean = vec![0f64; cols];
    for r in 0..rows {
        for c in 0..cols {
            mean[c] += x[r * cols + c] as f64 / rows as f64;
        }
    }
    let mut gram = vec![0f64; cols * cols];
    for r in 0..rows {
        for a in 0..cols {
            let da = x[r * cols + a] as f64 - mean[a];
            for b in 0..cols {
                gram[a * cols + b] += da * (x[r * cols + b] as f64 - mean[b]);
            }
        }
    }
    (mean, gram)
}
