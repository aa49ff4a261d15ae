// The axis-aligned abstraction's τ (the original's SoftmaxDrop): an elementwise gate
// z = a · sigmoid(s) with one learned score per feature, and the score gradient
// ds_j = Σ_r dz[r][j] · a[r][j] · σ'(s_j). One invocation per feature (column), looping
// over rows: no per-element division, and sums in a fixed order.

struct GateParams {
    rows: u32,
    dim: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> scores: array<f32>;
// gate: z; gate_grad: dz (read) is bound here too, ds below.
@group(0) @binding(2) var<storage, read_write> z: array<f32>;
@group(0) @binding(3) var<storage, read_write> dscores: array<f32>;
@group(0) @binding(4) var<uniform> params: GateParams;

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

@compute @workgroup_size(64, 1, 1)
fn gate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var j = gid.x; j < params.dim; j += nwg.x * 64u) {
        let g = sigmoid(scores[j]);
        for (var r = 0u; r < params.rows; r++) {
            z[r * params.dim + j] = a[r * params.dim + j] * g;
        }
    }
}

@compute @workgroup_size(64, 1, 1)
fn gate_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var j = gid.x; j < params.dim; j += nwg.x * 64u) {
        let g = sigmoid(scores[j]);
        var s = 0.0;
        for (var r = 0u; r < params.rows; r++) {
            s += z[r * params.dim + j] * a[r * params.dim + j];
        }
        dscores[j] = s * g * (1.0 - g);
    }
}
