//! Launchers and CPU references for `shaders/stats.wgsl` (centring, Chan merges of
//! batch statistics, row dot products), and [`StreamingCovariance`], which chains them
//! with the matmul kernel.

use std::ops::Range;

use anyhow::Result;

use super::matmul::{matmul, MatmulArgs, MatmulFlags, Schedule};
use super::reduce::column_sums;
use super::{simple_kernel, Binding, Dispatch, GpuContext, Slice};

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
    pub col_offset: u32,
    pub stride: u32,
}

impl StatsParams {
    /// Weights for merging a batch of `m` samples after `n` into the Gram rows `block`
    /// of a `d`-dimensional statistic.
    pub fn chan(block: &Range<usize>, d: usize, n: u64, m: u64) -> Self {
        let total = (n + m) as f64;
        StatsParams {
            rows: block.len() as u32,
            cols: d as u32,
            gram_weight: (n as f64 * m as f64 / total) as f32,
            mean_weight: (m as f64 / total) as f32,
            col_offset: block.start as u32,
            ..Default::default()
        }
    }

    /// Row dots of a `rows` x `block.len()` matrix with the columns `block` of a
    /// `rows` x `d` one, scaled by `scale`, written from `out_offset` on.
    pub fn row_dot(
        rows: usize,
        block: &Range<usize>,
        d: usize,
        scale: f32,
        out_offset: usize,
    ) -> Self {
        StatsParams {
            rows: rows as u32,
            cols: block.len() as u32,
            scale,
            out_offset: out_offset as u32,
            col_offset: block.start as u32,
            stride: d as u32,
            ..Default::default()
        }
    }

    /// Row dots of a `rows` x `d` matrix with one `d`-vector (stride 0: every row reads
    /// the same `y`), written from `out_offset` on.
    pub fn row_dot_vector(rows: usize, d: usize, out_offset: usize) -> Self {
        StatsParams {
            rows: rows as u32,
            cols: d as u32,
            scale: 1.0,
            out_offset: out_offset as u32,
            ..Default::default()
        }
    }
}

/// Column ranges of a matrix with `d` columns whose `d` x w pieces (f32) each fit in
/// `limit_bytes`, at most `max_columns` wide when that is nonzero; as even as possible.
pub fn column_blocks(d: usize, limit_bytes: usize, max_columns: usize) -> Vec<Range<usize>> {
    let mut w = (limit_bytes / (4 * d.max(1))).max(1);
    if max_columns > 0 {
        w = w.min(max_columns);
    }
    let blocks = d.div_ceil(w).max(1);
    let w = d.div_ceil(blocks);
    (0..blocks).map(|i| i * w..((i + 1) * w).min(d)).collect()
}

fn launch(
    ctx: &GpuContext,
    entry: &str,
    inputs: [Option<Slice<'_>>; 3],
    out: Slice<'_>,
    params: &wgpu::Buffer,
    items: usize,
) -> Result<Dispatch> {
    let kernel = simple_kernel(ctx, entry, &["stats"], entry, &BINDINGS, &[])?;
    let [x, y, z] = inputs;
    ctx.dispatch(
        &kernel,
        &[x, y, z, Some(out), Some(Slice::whole(params))],
        ctx.grid_1d(items, 64),
    )
}

/// `out[r][c] = x[r][columns.start + c] - mean[columns.start + c]`: the centred
/// `columns` of a `rows` x `d` matrix, as a `rows` x `columns.len()` one.
pub fn center(
    ctx: &GpuContext,
    rows: usize,
    d: usize,
    columns: Range<usize>,
    x: Slice<'_>,
    mean: Slice<'_>,
    out: Slice<'_>,
) -> Result<Dispatch> {
    let params = ctx.uniform(
        "center_params",
        &StatsParams {
            rows: rows as u32,
            cols: columns.len() as u32,
            col_offset: columns.start as u32,
            stride: d as u32,
            ..Default::default()
        },
    );
    let inputs = [Some(x), Some(mean), None];
    launch(ctx, "center", inputs, out, &params, rows * columns.len())
}

/// `gram += batch_gram + w·δδᵀ`, `δ = batch_mean - mean`, for the Gram rows and the
/// weight `w` in `params` (a [`StatsParams::chan`] the caller rewrites per batch);
/// `gram` and `batch_gram` hold just those rows, `entries` values.
pub fn merge_gram(
    ctx: &GpuContext,
    entries: usize,
    batch_gram: Slice<'_>,
    batch_mean: Slice<'_>,
    mean: Slice<'_>,
    gram: Slice<'_>,
    params: &wgpu::Buffer,
) -> Result<Dispatch> {
    let inputs = [Some(batch_gram), Some(batch_mean), Some(mean)];
    launch(ctx, "merge_gram", inputs, gram, params, entries)
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

/// `out[out_offset + r] += scale · Σ_c x[r][c]·y[r][col_offset + c]` with the shapes and
/// offsets of a [`StatsParams::row_dot`] in `params` (rewritten per batch by the caller).
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

/// Running mean and centred Gram matrix of a stream of batches of `d`-dimensional rows,
/// on the GPU: per batch a column mean, the centred batch, its Gram through the matmul
/// kernel and Chan's merge. The Gram lives in row blocks (see [`column_blocks`]) that
/// each fit one storage binding: a CNN layer's 6272 x 6272 f32 matrix does not.
pub struct StreamingCovariance {
    pub d: usize,
    pub blocks: Vec<Range<usize>>,
    mean: wgpu::Buffer,
    batch_mean: wgpu::Buffer,
    centred: wgpu::Buffer,
    /// One block's centred columns, the K-major left operand (with several blocks).
    centred_block: Option<wgpu::Buffer>,
    batch_gram: wgpu::Buffer,
    grams: Vec<wgpu::Buffer>,
    /// Per block: its Gram rows and the Chan weights, rewritten before each submit.
    params: Vec<wgpu::Buffer>,
}

impl StreamingCovariance {
    /// For batches of at most `max_rows`; `max_columns` caps the block width (0: as
    /// wide as a storage binding allows).
    pub fn new(ctx: &GpuContext, d: usize, max_rows: usize, max_columns: usize) -> Result<Self> {
        let limit = ctx.limits.max_storage_buffer_binding_size as usize;
        let blocks = column_blocks(d, limit, max_columns);
        let w = blocks[0].len();
        Ok(StreamingCovariance {
            d,
            mean: ctx.zeros("mean", d)?,
            batch_mean: ctx.zeros("batch_mean", d)?,
            centred: ctx.zeros("centred", max_rows * d)?,
            centred_block: match blocks.len() {
                1 => None,
                _ => Some(ctx.zeros("centred_block", max_rows * w)?),
            },
            batch_gram: ctx.zeros("batch_gram", w * d)?,
            grams: blocks
                .iter()
                .map(|b| ctx.zeros("gram", b.len() * d))
                .collect::<Result<_>>()?,
            params: blocks
                .iter()
                .map(|_| ctx.uniform("chan", &StatsParams::default()))
                .collect(),
            blocks,
        })
    }

    /// The dispatches that merge a batch of `rows` rows (row-major in `x`).
    pub fn record(
        &self,
        ctx: &GpuContext,
        schedule: Schedule,
        rows: usize,
        x: Slice<'_>,
    ) -> Result<Vec<Dispatch>> {
        let d = self.d;
        let whole = Slice::whole;
        let centred = Slice::new(&self.centred, 0, rows * d);
        let mut ops = vec![
            column_sums(ctx, rows, d, 1.0 / rows as f32, x, whole(&self.batch_mean))?,
            center(ctx, rows, d, 0..d, x, whole(&self.batch_mean), centred)?,
        ];
        for ((block, gram), params) in self.blocks.iter().zip(&self.grams).zip(&self.params) {
            let w = block.len();
            let a = match &self.centred_block {
                Some(buf) => {
                    let a = Slice::new(buf, 0, rows * w);
                    let mean = whole(&self.batch_mean);
                    ops.push(center(ctx, rows, d, block.clone(), x, mean, a)?);
                    a
                }
                None => centred,
            };
            let batch_gram = Slice::new(&self.batch_gram, 0, w * d);
            // Rows `block` of (X−x̄)ᵀ(X−x̄): row-major centred columns are Aᵀ stored K-major.
            let args = MatmulArgs {
                m: w,
                n: d,
                k: rows,
                a,
                b: centred,
                c: batch_gram,
                bias: None,
                mask: None,
            };
            let flags = MatmulFlags {
                a_kmajor: true,
                ..Default::default()
            };
            ops.push(matmul(ctx, flags, schedule, &args)?);
            let (batch_mean, mean) = (whole(&self.batch_mean), whole(&self.mean));
            let gram = whole(gram);
            ops.push(merge_gram(
                ctx,
                w * d,
                batch_gram,
                batch_mean,
                mean,
                gram,
                params,
            )?);
        }
        let (batch_mean, mean) = (whole(&self.batch_mean), whole(&self.mean));
        ops.push(merge_mean(ctx, d, batch_mean, mean, &self.params[0])?);
        Ok(ops)
    }

    /// Writes the Chan weights for a batch of `rows` after `seen` samples; call before
    /// the submit of that batch's [`StreamingCovariance::record`] ops.
    pub fn prepare(&self, ctx: &GpuContext, seen: u64, rows: u64) {
        for (block, params) in self.blocks.iter().zip(&self.params) {
            let p = StatsParams::chan(block, self.d, seen, rows);
            ctx.queue.write_buffer(params, 0, bytemuck::bytes_of(&p));
        }
    }

    /// (mean, row-major d x d centred Gram).
    pub async fn read(&self, ctx: &GpuContext) -> Result<(Vec<f32>, Vec<f32>)> {
        let d = self.d;
        let mean = ctx.read_async(Slice::new(&self.mean, 0, d)).await?;
        let mut gram = Vec::with_capacity(d * d);
        for (block, buf) in self.blocks.iter().zip(&self.grams) {
            gram.extend(
                ctx.read_async::<f32>(Slice::new(buf, 0, block.len() * d))
                    .await?,
            );
        }
        Ok((mean, gram))
    }
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
