//! Launchers and CPU references for `shaders/vae.wgsl`: the VAE detector's latent
//! sampling (reparameterisation), its per-sample loss (reconstruction MSE plus the
//! weighted KL to N(0, 1)) and the loss's gradient w.r.t. the encoder output.

use anyhow::Result;

use super::{simple_kernel, Binding, Dispatch, GpuContext, Slice};
use crate::rng::{rand_normal, rand_u32, STREAM_VAE};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct VaeParams {
    rows: u32,
    dim: u32,
    latent: u32,
    seed: u32,
    kld_weight: f32,
    scale: f32,
    _pad: [u32; 2],
}

/// One layer's VAE over a batch: `rows` samples of width `dim`, `latent` latent
/// dimensions; `noise` draws the latent from (seed, step.epoch, sample position), else
/// z = mu; `scale` multiplies every gradient (1 / (rows · layers) for the mean loss).
#[derive(Clone, Copy, Debug)]
pub struct VaeShape {
    pub rows: usize,
    pub dim: usize,
    pub latent: usize,
    pub seed: u32,
    pub kld_weight: f32,
    pub noise: bool,
    pub scale: f32,
}

/// The buffers a dispatch reads and writes (None where an entry point does not use one).
#[derive(Clone, Copy, Default)]
struct Io<'a> {
    enc: Option<Slice<'a>>,
    x: Option<Slice<'a>>,
    recon: Option<Slice<'a>>,
    dz: Option<Slice<'a>>,
    z: Option<Slice<'a>>,
    loss: Option<Slice<'a>>,
    grad_recon: Option<Slice<'a>>,
    grad_enc: Option<Slice<'a>>,
}

fn launch(
    ctx: &GpuContext,
    entry: &str,
    shape: &VaeShape,
    io: &Io<'_>,
    step: &wgpu::Buffer,
    n: usize,
) -> Result<Dispatch> {
    use Binding::{ReadOnly, ReadWrite, Uniform};
    let constants = [
        ("NOISE", shape.noise as u8 as f64),
        ("GRADS", io.grad_recon.is_some() as u8 as f64),
    ];
    let kernel = simple_kernel(
        ctx,
        &format!("vae_{entry}"),
        &["step", "rng", "vae"],
        entry,
        &[
            ReadOnly, ReadOnly, ReadOnly, ReadOnly, ReadWrite, ReadWrite, ReadWrite, ReadWrite,
            Uniform, Uniform,
        ],
        &constants,
    )?;
    let params = VaeParams {
        rows: shape.rows as u32,
        dim: shape.dim as u32,
        latent: shape.latent as u32,
        seed: shape.seed,
        kld_weight: shape.kld_weight,
        scale: shape.scale,
        _pad: [0; 2],
    };
    let uniform = ctx.uniform("vae_params", &params);
    ctx.dispatch(
        &kernel,
        &[
            io.enc,
            io.x,
            io.recon,
            io.dz,
            io.z,
            io.loss,
            io.grad_recon,
            io.grad_enc,
            Some(Slice::whole(&uniform)),
            Some(Slice::whole(step)),
        ],
        ctx.grid_1d(n, 64),
    )
}

/// z = mu + eps · exp(log_var / 2) from the encoder output `enc` ([rows][2·latent]).
pub fn vae_sample(
    ctx: &GpuContext,
    shape: &VaeShape,
    enc: Slice<'_>,
    z: Slice<'_>,
    step: &wgpu::Buffer,
) -> Result<Dispatch> {
    let io = Io {
        enc: Some(enc),
        z: Some(z),
        ..Default::default()
    };
    launch(ctx, "sample", shape, &io, step, shape.rows * shape.latent)
}

/// The operands of [`vae_loss`]: the layer's activation `x`, the decoder's `recon`, the
/// encoder's `enc`, where each sample's loss goes (at step.batch_offset + row) and,
/// for training, d(scale·loss)/d(recon).
#[derive(Clone, Copy)]
pub struct LossIo<'a> {
    pub x: Slice<'a>,
    pub recon: Slice<'a>,
    pub enc: Slice<'a>,
    pub loss: Slice<'a>,
    pub grad_recon: Option<Slice<'a>>,
}

/// Per-sample MSE(recon, x) + kld_weight · KL(N(mu, exp(log_var)) || N(0, 1)).
pub fn vae_loss(
    ctx: &GpuContext,
    shape: &VaeShape,
    io: &LossIo<'_>,
    step: &wgpu::Buffer,
) -> Result<Dispatch> {
    let io = Io {
        enc: Some(io.enc),
        x: Some(io.x),
        recon: Some(io.recon),
        loss: Some(io.loss),
        grad_recon: io.grad_recon,
        ..Default::default()
    };
    launch(ctx, "vae_loss", shape, &io, step, shape.rows)
}

/// d(scale·loss)/d(enc) from `dz` = d(scale·loss)/dz (the decoder's input gradient).
pub fn vae_latent_grad(
    ctx: &GpuContext,
    shape: &VaeShape,
    enc: Slice<'_>,
    dz: Slice<'_>,
    grad_enc: Slice<'_>,
    step: &wgpu::Buffer,
) -> Result<Dispatch> {
    let io = Io {
        enc: Some(enc),
        dz: Some(dz),
        grad_enc: Some(grad_enc),
        ..Default::default()
    };
    launch(
        ctx,
        "latent_grad",
        shape,
        &io,
        step,
        shape.rows * shape.latent,
    )
}

/// The latent noise of sample position `sample` (batch offset + row) in `epoch`.
pub fn eps_reference(shape: &VaeShape, epoch: u32, sample: u32, j: usize) -> f64 {
    if !shape.noise {
        return 0.0;
    }
    let j = j as u32;
    rand_normal(
        rand_u32(shape.seed, STREAM_VAE, epoch, sample, 2 * j),
        rand_u32(shape.seed, STREAM_VAE, epoch, sample, 2 * j + 1),
    )
}

/// f64 reference of [`vae_sample`] for a batch at `offset` of `epoch`.
pub fn sample_reference(shape: &VaeShape, enc: &[f64], epoch: u32, offset: u32) -> Vec<f64> {
    let l = shape.latent;
    let mut z = Vec::with_capacity(shape.rows * l);
    for (r, e) in enc.chunks(2 * l).enumerate() {
        for j in 0..l {
            let eps = eps_reference(shape, epoch, offset + r as u32, j);
            z.push(e[j] + eps * (0.5 * e[l + j]).exp());
        }
    }
    z
}

/// f64 reference of [`vae_loss`]: (per-sample loss, d(scale·loss)/d(recon)).
pub fn loss_reference(
    shape: &VaeShape,
    x: &[f64],
    recon: &[f64],
    enc: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let (d, l) = (shape.dim, shape.latent);
    let scale = shape.scale as f64;
    let (mut loss, mut grad) = (Vec::new(), Vec::new());
    for ((xr, rr), e) in x.chunks(d).zip(recon.chunks(d)).zip(enc.chunks(2 * l)) {
        let mse = xr.iter().zip(rr).map(|(a, b)| (b - a).powi(2)).sum::<f64>() / d as f64;
        grad.extend(
            xr.iter()
                .zip(rr)
                .map(|(a, b)| scale * 2.0 * (b - a) / d as f64),
        );
        let kl: f64 = (0..l)
            .map(|j| {
                let (mu, lv) = (e[j], e[l + j]);
                -0.5 * (1.0 + lv - mu * mu - lv.exp())
            })
            .sum();
        loss.push(mse + shape.kld_weight as f64 * kl);
    }
    (loss, grad)
}

/// f64 reference of [`vae_latent_grad`] for a batch at `offset` of `epoch`.
pub fn latent_grad_reference(
    shape: &VaeShape,
    enc: &[f64],
    dz: &[f64],
    epoch: u32,
    offset: u32,
) -> Vec<f64> {
    let l = shape.latent;
    let w = shape.scale as f64 * shape.kld_weight as f64;
    let mut out = vec![0.0; enc.len()];
    for (r, (e, g)) in enc.chunks(2 * l).zip(dz.chunks(l)).enumerate() {
        for j in 0..l {
            let (mu, lv) = (e[j], e[l + j]);
            let eps = eps_reference(shape, epoch, offset + r as u32, j);
            out[r * 2 * l + j] = g[j] + w * mu;
            out[r * 2 * l + l + j] =
                0.5 * g[j] * eps * (0.5 * lv).exp() + 0.5 * w * (lv.exp() - 1.0);
        }
    }
    out
}
