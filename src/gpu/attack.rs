//! Launcher and CPU reference for `shaders/attack.wgsl`: the input updates of FGSM and
//! PGD (projected sign-gradient steps inside an L∞ ball).

use anyhow::{bail, Result};

use super::{simple_kernel, Binding, Dispatch, GpuContext, Slice};
use crate::rng::{rand_u32, rand_unit, STREAM_ATTACK_START};

/// The L∞ attack's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttackStep {
    pub eps: f32,
    pub step_size: f32,
    pub random_start: bool,
    pub seed: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttackParams {
    rows: u32,
    dim: u32,
    eps: f32,
    step_size: f32,
    random_start: u32,
    seed: u32,
    _pad: [u32; 2],
}

/// The batch being attacked: `x` (rows x dim) and, if the model reads it, its
/// transpose `xt`, rewritten together; `x0` holds the clean batch.
pub struct AttackBuffers<'a> {
    pub x: Slice<'a>,
    pub xt: Option<Slice<'a>>,
    pub x0: Slice<'a>,
    pub grad: Slice<'a>,
}

/// The two dispatches of an attack on a batch: `start` (save the clean batch, random
/// start) and `update` (one projected step; record it once per attack step).
pub struct AttackOps {
    pub start: Dispatch,
    pub update: Dispatch,
}

pub fn attack_ops(
    ctx: &GpuContext,
    rows: usize,
    dim: usize,
    attack: &AttackStep,
    bufs: &AttackBuffers<'_>,
    step: &wgpu::Buffer,
) -> Result<AttackOps> {
    if !(attack.eps.is_finite() && attack.eps >= 0.0) {
        bail!(
            "attack eps must be a finite number >= 0, got {}",
            attack.eps
        );
    }
    if !(attack.step_size.is_finite() && attack.step_size >= 0.0) {
        bail!("attack step size must be >= 0, got {}", attack.step_size);
    }
    let params = ctx.uniform(
        "attack_params",
        &AttackParams {
            rows: rows as u32,
            dim: dim as u32,
            eps: attack.eps,
            step_size: attack.step_size,
            random_start: attack.random_start as u32,
            seed: attack.seed,
            _pad: [0; 2],
        },
    );
    let bindings = [
        Some(bufs.x),
        bufs.xt,
        Some(bufs.x0),
        Some(bufs.grad),
        Some(Slice::whole(&params)),
        Some(Slice::whole(step)),
    ];
    let op = |entry: &str| -> Result<Dispatch> {
        let kernel = simple_kernel(
            ctx,
            &format!("attack_{entry}"),
            &["rng", "step", "attack"],
            entry,
            &[
                Binding::ReadWrite,
                Binding::ReadWrite,
                Binding::ReadWrite,
                Binding::ReadOnly,
                Binding::Uniform,
                Binding::Uniform,
            ],
            &[("WRITE_T", bufs.xt.is_some() as u8 as f64)],
        )?;
        ctx.dispatch(&kernel, &bindings, ctx.grid_1d(rows * dim, 64))
    };
    Ok(AttackOps {
        start: op("start")?,
        update: op("update")?,
    })
}

/// f64 reference of `start` for a batch at `batch_offset`: the starting point.
pub fn attack_start_reference(
    x0: &[f64],
    dim: usize,
    batch_offset: u32,
    a: &AttackStep,
) -> Vec<f64> {
    x0.iter()
        .enumerate()
        .map(|(i, &v)| {
            if !a.random_start {
                return v;
            }
            let sample = batch_offset + (i / dim) as u32;
            let h = rand_u32(a.seed, STREAM_ATTACK_START, sample, (i % dim) as u32, 0);
            let u = 2.0 * rand_unit(h) as f64 - 1.0;
            (v + a.eps as f64 * u).clamp(0.0, 1.0)
        })
        .collect()
}

/// f64 reference of `update`.
pub fn attack_update_reference(x: &[f64], x0: &[f64], grad: &[f32], a: &AttackStep) -> Vec<f64> {
    let eps = a.eps as f64;
    x.iter()
        .zip(x0)
        .zip(grad)
        .map(|((&v, &v0), &g)| {
            // WGSL's sign(0) is 0, like jnp.sign / torch.sign.
            let s = if g > 0.0 {
                1.0
            } else if g < 0.0 {
                -1.0
            } else {
                0.0
            };
            (v + a.step_size as f64 * s)
                .clamp(v0 - eps, v0 + eps)
                .clamp(0.0, 1.0)
        })
        .collect()
}
