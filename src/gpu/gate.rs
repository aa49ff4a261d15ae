//! Launchers and CPU references for `shaders/gate.wgsl`: the axis-aligned abstraction's
//! elementwise gate z = a · sigmoid(s) and its score gradient.

use anyhow::Result;

use super::{simple_kernel, Binding, Dispatch, GpuContext, Slice};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GateParams {
    rows: u32,
    dim: u32,
    _pad: [u32; 2],
}

fn launch(
    ctx: &GpuContext,
    entry: &str,
    (rows, dim): (usize, usize),
    bindings: [Option<Slice<'_>>; 4],
) -> Result<Dispatch> {
    let kernel = simple_kernel(
        ctx,
        entry,
        &["gate"],
        entry,
        &[
            Binding::ReadOnly,
            Binding::ReadOnly,
            Binding::ReadWrite,
            Binding::ReadWrite,
            Binding::Uniform,
        ],
        &[],
    )?;
    let params = ctx.uniform(
        "gate_params",
        &GateParams {
            rows: rows as u32,
            dim: dim as u32,
            _pad: [0; 2],
        },
    );
    let [a, s, z, ds] = bindings;
    ctx.dispatch(
        &kernel,
        &[a, s, z, ds, Some(Slice::whole(&params))],
        ctx.grid_1d(dim, 64),
    )
}

/// `z = a · sigmoid(scores)` for `a`, `z` of rows x dim and `scores` of dim.
pub fn gate(
    ctx: &GpuContext,
    rows: usize,
    dim: usize,
    a: Slice<'_>,
    scores: Slice<'_>,
    z: Slice<'_>,
) -> Result<Dispatch> {
    launch(
        ctx,
        "gate",
        (rows, dim),
        [Some(a), Some(scores), Some(z), None],
    )
}

/// `dscores_j = Σ_r dz[r][j] · a[r][j] · σ'(scores_j)`.
pub fn gate_grad(
    ctx: &GpuContext,
    rows: usize,
    dim: usize,
    a: Slice<'_>,
    scores: Slice<'_>,
    dz: Slice<'_>,
    dscores: Slice<'_>,
) -> Result<Dispatch> {
    let bindings = [Some(a), Some(scores), Some(dz), Some(dscores)];
    launch(ctx, "gate_grad", (rows, dim), bindings)
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// f64 reference of [`gate`].
pub fn gate_reference(a: &[f64], scores: &[f32], dim: usize) -> Vec<f64> {
    a.iter()
        .enumerate()
        .map(|(i, &v)| v * sigmoid(scores[i % dim] as f64))
        .collect()
}

/// f64 reference of [`gate_grad`].
pub fn gate_grad_reference(a: &[f64], scores: &[f32], dz: &[f64], dim: usize) -> Vec<f64> {
    (0..dim)
        .map(|j| {
            let g = sigmoid(scores[j] as f64);
            let s: f64 = a
                .iter()
                .zip(dz)
                .skip(j)
                .step_by(dim)
                .map(|(x, d)| x * d)
                .sum();
            s * g * (1.0 - g)
        })
        .collect()
}
