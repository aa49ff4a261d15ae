//! Launchers and CPU references for `shaders/knn.wgsl`: unit rows, top-k columns and
//! ranks of columns in rows of a similarity matrix (TED's cosine nearest neighbours;
//! the similarities themselves are a matmul of unit rows).

use anyhow::{bail, Result};

use super::{simple_kernel, Binding, Dispatch, GpuContext, Slice};

const BINDINGS: [Binding; 5] = [
    Binding::ReadOnly,
    Binding::ReadOnly,
    Binding::ReadWrite,
    Binding::ReadWrite,
    Binding::Uniform,
];

/// `struct KnnParams` of the shader; callers that exclude the query itself rewrite
/// `exclude_offset` per batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct KnnParams {
    pub rows: u32,
    pub cols: u32,
    pub dim: u32,
    pub k: u32,
    pub exclude: u32,
    pub exclude_offset: u32,
    pub _pad: [u32; 2],
}

impl KnnParams {
    /// `rows` x `cols` similarities, `k` neighbours; with `exclude_from`, row r's
    /// own column `exclude_from + r` is skipped.
    pub fn new(rows: usize, cols: usize, k: usize, exclude_from: Option<usize>) -> Self {
        KnnParams {
            rows: rows as u32,
            cols: cols as u32,
            k: k as u32,
            exclude: exclude_from.is_some() as u32,
            exclude_offset: exclude_from.unwrap_or(0) as u32,
            ..Default::default()
        }
    }
}

fn launch(
    ctx: &GpuContext,
    entry: &str,
    resources: [Option<Slice<'_>>; 4],
    params: &wgpu::Buffer,
    workgroups: [u32; 3],
) -> Result<Dispatch> {
    let kernel = simple_kernel(
        ctx,
        &format!("knn_{entry}"),
        &["knn"],
        entry,
        &BINDINGS,
        &[],
    )?;
    let [a, b, c, d] = resources;
    ctx.dispatch(
        &kernel,
        &[a, b, c, d, Some(Slice::whole(params))],
        workgroups,
    )
}

/// `out[r] = x[r] / |x[r]|` for `rows` rows of `dim` (zero rows stay zero).
pub fn normalize_rows(
    ctx: &GpuContext,
    rows: usize,
    dim: usize,
    x: Slice<'_>,
    out: Slice<'_>,
) -> Result<Dispatch> {
    let params = ctx.uniform(
        "normalize_rows",
        &KnnParams {
            rows: rows as u32,
            dim: dim as u32,
            ..Default::default()
        },
    );
    launch(
        ctx,
        "normalize_rows",
        [Some(x), None, Some(out), None],
        &params,
        ctx.grid_1d(rows, 64),
    )
}

/// `idx[r][m]`: row r's m-th column of `sims` (higher first, then lower index).
pub fn top_k(
    ctx: &GpuContext,
    rows: usize,
    sims: Slice<'_>,
    idx: Slice<'_>,
    params: &wgpu::Buffer,
) -> Result<Dispatch> {
    if rows == 0 {
        bail!("top_k of no rows");
    }
    let r = rows as u32;
    launch(
        ctx,
        "topk",
        [Some(sims), None, None, Some(idx)],
        params,
        [r.min(65535), r.div_ceil(65535), 1],
    )
}

/// `out[r][m]` = the rank of column `idx[r][m]` in row r of `sims`.
pub fn ranks(
    ctx: &GpuContext,
    rows: usize,
    k: usize,
    sims: Slice<'_>,
    idx: Slice<'_>,
    out: Slice<'_>,
    params: &wgpu::Buffer,
) -> Result<Dispatch> {
    launch(
        ctx,
        "ranks",
        [Some(sims), Some(idx), Some(out), None],
        params,
        ctx.grid_1d(rows * k, 64),
    )
}

/// The order of [`top_k`] and [`ranks`] over one row's columns (finite values; -0 and
/// 0 are equal, as on the GPU), `exclude` left out.
pub fn order_reference(row: &[f64], exclude: Option<usize>) -> Vec<usize> {
    let mut cols: Vec<usize> = (0..row.len()).filter(|&c| Some(c) != exclude).collect();
    cols.sort_by(|&a, &b| {
        row[b]
            .partial_cmp(&row[a])
            .expect("finite similarities")
            .then(a.cmp(&b))
    });
    cols
}
