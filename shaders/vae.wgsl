// The VAE detector's latent sampling and loss (the encoder and decoder are the layer
// library's dense layers). Per row (sample) of a layer's activation x [rows][dim]:
//   enc = [mu | log_var] [rows][2·latent], the encoder's output;
//   sample:      z = mu + eps · exp(log_var / 2), eps ~ N(0, 1) drawn from
//                (seed, epoch, batch_offset + row, j) when NOISE, else 0 (z = mu);
//   loss:        loss[batch_offset + row] = mean_i (recon_i - x_i)^2
//                  + kld_weight · (-1/2) Σ_j (1 + log_var_j - mu_j^2 - exp(log_var_j));
//                with GRADS also d(scale·loss)/d(recon) = scale · 2 (recon - x) / dim;
//   latent_grad: from dz = d(scale·loss)/dz (the decoder's input gradient),
//                d/dmu = dz + scale · kld_weight · mu and
//                d/dlog_var = dz · eps · exp(log_var / 2) / 2
//                             + scale · kld_weight · (exp(log_var) - 1) / 2.
// scale is 1 / (rows · layers) for the training loss (a mean over samples and layers).
// Needs step.wgsl and rng.wgsl prepended.

struct VaeParams {
    rows: u32,
    dim: u32,
    latent: u32,
    seed: u32,
    kld_weight: f32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> enc: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> recon: array<f32>;
@group(0) @binding(3) var<storage, read> dz: array<f32>;
@group(0) @binding(4) var<storage, read_write> z: array<f32>;
@group(0) @binding(5) var<storage, read_write> loss: array<f32>;
@group(0) @binding(6) var<storage, read_write> grad_recon: array<f32>;
@group(0) @binding(7) var<storage, read_write> grad_enc: array<f32>;
@group(0) @binding(8) var<uniform> params: VaeParams;
@group(0) @binding(9) var<uniform> step: Step;

override NOISE: bool = false;
override GRADS: bool = true;

fn eps(r: u32, j: u32) -> f32 {
    if (!NOISE) {
        return 0.0;
    }
    let s = step.batch_offset + r;
    return rand_normal(
        rand_u32(params.seed, STREAM_VAE, step.epoch, s, 2u * j),
        rand_u32(params.seed, STREAM_VAE, step.epoch, s, 2u * j + 1u),
    );
}

@compute @workgroup_size(64, 1, 1)
fn sample(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let total = params.rows * params.latent;
    for (var i = gid.x; i < total; i += nwg.x * 64u) {
        let r = i / params.latent;
        let j = i % params.latent;
        let base = r * 2u * params.latent;
        z[i] = enc[base + j] + eps(r, j) * exp(0.5 * enc[base + params.latent + j]);
    }
}

@compute @workgroup_size(64, 1, 1)
fn vae_loss(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let inv_dim = 1.0 / f32(params.dim);
    for (var r = gid.x; r < params.rows; r += nwg.x * 64u) {
        let base = r * params.dim;
        var sq = 0.0;
        for (var i = 0u; i < params.dim; i++) {
            let d = recon[base + i] - x[base + i];
            sq += d * d;
            if (GRADS) {
                grad_recon[base + i] = params.scale * 2.0 * d * inv_dim;
            }
        }
        let ebase = r * 2u * params.latent;
        var kl = 0.0;
        for (var j = 0u; j < params.latent; j++) {
            let mu = enc[ebase + j];
            let lv = enc[ebase + params.latent + j];
            kl += 1.0 + lv - mu * mu - exp(lv);
        }
        loss[step.batch_offset + r] = sq * inv_dim - 0.5 * params.kld_weight * kl;
    }
}

@compute @workgroup_size(64, 1, 1)
fn latent_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let total = params.rows * params.latent;
    let w = params.scale * params.kld_weight;
    for (var i = gid.x; i < total; i += nwg.x * 64u) {
        let r = i / params.latent;
        let j = i % params.latent;
        let base = r * 2u * params.latent;
        let mu = enc[base + j];
        let lv = enc[base + params.latent + j];
        let g = dz[i];
        grad_enc[base + j] = g + w * mu;
        grad_enc[base + params.latent + j] =
            0.5 * g * eps(r, j) * exp(0.5 * lv) + 0.5 * w * (exp(lv) - 1.0);
    }
}
