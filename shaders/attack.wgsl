// Adversarial input updates (FGSM / PGD) on a batch x (rows x dim, row-major) that the
// first matmul also reads transposed (xt, dim x rows): both are rewritten.
//   start: x0 = x (the clean batch); with a random start, x += U(-eps, eps), clipped.
//   step:  x = clip(clip(x + step_size · sign(dL/dx), x0 ± eps), 0, 1).
// Needs rng.wgsl and step.wgsl prepended.

struct AttackParams {
    rows: u32,
    dim: u32,
    eps: f32,
    step_size: f32,
    random_start: u32,
    seed: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> xt: array<f32>;
@group(0) @binding(2) var<storage, read_write> x0: array<f32>;
@group(0) @binding(3) var<storage, read> grad: array<f32>;
@group(0) @binding(4) var<uniform> params: AttackParams;
@group(0) @binding(5) var<uniform> step: Step;

// The transposed copy exists only for models that read it (MLPs).
override WRITE_T: bool = true;

fn store(i: u32, v: f32) {
    x[i] = v;
    if (WRITE_T) {
        xt[(i % params.dim) * params.rows + i / params.dim] = v;
    }
}

@compute @workgroup_size(64, 1, 1)
fn start(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var i = gid.x; i < params.rows * params.dim; i += nwg.x * 64u) {
        let v = x[i];
        x0[i] = v;
        if (params.random_start != 0u) {
            // Keyed on the sample's position in the whole attack, not in the batch.
            let h = rand_u32(params.seed, STREAM_ATTACK_START, step.batch_offset + i / params.dim, i % params.dim, 0u);
            store(i, clamp(v + params.eps * (2.0 * rand_unit(h) - 1.0), 0.0, 1.0));
        }
    }
}

@compute @workgroup_size(64, 1, 1)
fn update(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var i = gid.x; i < params.rows * params.dim; i += nwg.x * 64u) {
        let moved = x[i] + params.step_size * sign(grad[i]);
        store(i, clamp(clamp(moved, x0[i] - params.eps, x0[i] + params.eps), 0.0, 1.0));
    }
}
