//! Launcher and CPU reference for `shaders/adam.wgsl`.

use anyhow::Result;

use super::{simple_kernel, Binding, Dispatch, GpuContext, Slice, StepParams};

pub const BETA1: f32 = 0.9;
pub const BETA2: f32 = 0.999;
pub const EPS: f32 = 1e-8;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AdamParams {
    count: u32,
    _pad: [u32; 3],
}

/// Fills the optimiser fields of `step` for update number `t` (1-based).
pub fn set_adam_step(step: &mut StepParams, learning_rate: f32, t: u32) {
    step.learning_rate = learning_rate;
    step.beta1 = BETA1;
    step.beta2 = BETA2;
    step.eps = EPS;
    step.bias_correction1 = 1.0 - BETA1.powi(t as i32);
    step.bias_correction2 = 1.0 - BETA2.powi(t as i32);
}

/// One Adam update of all `count` parameters (a multiple of 4) in a single dispatch.
pub fn adam(
    ctx: &GpuContext,
    count: usize,
    params: Slice<'_>,
    grads: Slice<'_>,
    m: Slice<'_>,
    v: Slice<'_>,
    step: &wgpu::Buffer,
) -> Result<Dispatch> {
    if !count.is_multiple_of(4) {
        anyhow::bail!("adam: {count} parameters is not a multiple of 4");
    }
    let kernel = simple_kernel(
        ctx,
        "adam",
        &["step", "adam"],
        "main",
        &[
            Binding::ReadWrite,
            Binding::ReadOnly,
            Binding::ReadWrite,
            Binding::ReadWrite,
            Binding::Uniform,
            Binding::Uniform,
        ],
        &[],
    )?;
    let dims = ctx.uniform(
        "adam_params",
        &AdamParams {
            count: (count / 4) as u32,
            _pad: [0; 3],
        },
    );
    ctx.dispatch(
        &kernel,
        &[
            Some(params),
            Some(grads),
            Some(m),
            Some(v),
            Some(Slice::whole(&dims)),
            Some(Slice::whole(step)),
        ],
        ctx.grid_1d(count / 4, 64),
    )
}

/// f64 reference of one step; updates `params`, `m`, `v` in place.
pub fn adam_reference(
    params: &mut [f64],
    grads: &[f32],
    m: &mut [f64],
    v: &mut [f64],
    lr: f64,
    t: i32,
) {
    let (b1, b2) = (BETA1 as f64, BETA2 as f64);
    for i in 0..params.len() {
        let g = grads[i] as f64;
        m[i] = b1 * m[i] + (1.0 - b1) * g;
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        let m_hat = m[i] / (1.0 - b1.powi(t));
        let v_hat = v[i] / (1.0 - b2.powi(t));
        params[i] -= lr * m_hat / (v_hat.sqrt() + EPS as f64);
    }
}
