//! Launcher and CPU reference for `shaders/reduce.wgsl` (column sums).

use anyhow::Result;

use super::{simple_kernel, Binding, Dispatch, GpuContext, Slice};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ReduceParams {
    rows: u32,
    cols: u32,
    scale: f32,
    _pad: u32,
}

/// `sums[c] = scale · Σ_r input[r][c]` for a row-major `rows x cols` input.
pub fn column_sums(
    ctx: &GpuContext,
    rows: usize,
    cols: usize,
    scale: f32,
    input: Slice<'_>,
    sums: Slice<'_>,
) -> Result<Dispatch> {
    let kernel = simple_kernel(
        ctx,
        "column_sums",
        &["reduce"],
        "column_sums",
        &[Binding::ReadOnly, Binding::ReadWrite, Binding::Uniform],
        &[],
    )?;
    let params = ctx.uniform(
        "column_sums_params",
        &ReduceParams {
            rows: rows as u32,
            cols: cols as u32,
            scale,
            _pad: 0,
        },
    );
    ctx.dispatch(
        &kernel,
        &[Some(input), Some(sums), Some(Slice::whole(&params))],
        ctx.grid_1d(cols, 64),
    )
}

pub fn column_sums_reference(rows: usize, cols: usize, input: &[f32]) -> Vec<f64> {
    (0..cols)
        .map(|c| (0..rows).map(|r| input[r * cols + c] as f64).sum())
        .collect()
}
