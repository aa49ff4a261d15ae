// Gram-matrix statistics of activations (Beatrix, Ma et al. 2023): per sample the p-th
// order Gram matrix over positions, G_ab = Σ_pos x[pos][a]^p · x[pos][b]^p, its signed
// p-th root sign(G)·|G|^(1/p), upper triangle with the diagonal (the feature index maps
// to (a, b) through `pairs`); and each sample's deviation outside trusted bounds.

struct GramParams {
    rows: u32,
    positions: u32,
    channels: u32,
    features: u32,
    power: u32,
    // Where the batch's first score goes (rewritten per batch), and its multiplier.
    out_offset: u32,
    scale: f32,
    // Keeps the relative deviation finite at a zero bound (float16's smallest normal,
    // as upstream).
    eps: f32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> pairs: array<u32>;
@group(0) @binding(2) var<storage, read> lo: array<f32>;
@group(0) @binding(3) var<storage, read> hi: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<uniform> params: GramParams;

// v^p by multiplication: pow() is undefined for negative bases.
fn ipow(v: f32, p: u32) -> f32 {
    var r = 1.0;
    for (var i = 0u; i < p; i++) {
        r *= v;
    }
    return r;
}

fn gram(row: u32, f: u32) -> f32 {
    let pair = pairs[f];
    let a = pair >> 16u;
    let b = pair & 0xffffu;
    let base = row * params.positions * params.channels;
    var g = 0.0;
    for (var pos = 0u; pos < params.positions; pos++) {
        let o = base + pos * params.channels;
        g += ipow(x[o + a], params.power) * ipow(x[o + b], params.power);
    }
    if (g == 0.0) {
        return 0.0;
    }
    return sign(g) * pow(abs(g), 1.0 / f32(params.power));
}

// out[row][f] = the row's Gram feature f.
@compute @workgroup_size(64, 1, 1)
fn features(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let total = params.rows * params.features;
    for (var i = gid.x; i < total; i += nwg.x * 64u) {
        out[i] = gram(i / params.features, i % params.features);
    }
}

var<workgroup> partial: array<f32, 64>;

// out[out_offset + row] += scale · Σ_f relu(lo_f − g_f)/(|lo_f| + eps) + relu(g_f − hi_f)/(|hi_f| + eps):
// one workgroup per row (rows beyond 65535 wrap round in y).
@compute @workgroup_size(64, 1, 1)
fn deviation(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.x + wid.y * 65535u;
    // Uniform control flow: every invocation of a workgroup takes the same branch.
    if (row >= params.rows) {
        return;
    }
    var s = 0.0;
    for (var f = lid.x; f < params.features; f += 64u) {
        let g = gram(row, f);
        s += max(lo[f] - g, 0.0) / (abs(lo[f]) + params.eps)
            + max(g - hi[f], 0.0) / (abs(hi[f]) + params.eps);
    }
    partial[lid.x] = s;
    workgroupBarrier();
    for (var half = 32u; half > 0u; half >>= 1u) {
        if (lid.x < half) {
            partial[lid.x] += partial[lid.x + half];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        out[params.out_offset + row] += params.scale * partial[0];
    }
}
