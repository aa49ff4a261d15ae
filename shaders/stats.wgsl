// Streaming statistics for the detectors: centring, Chan's parallel merge of a batch's
// mean and centred Gram matrix into running ones, and per-row dot products (the
// second half of a Mahalanobis distance after the GEMM).

struct StatsParams {
    rows: u32,
    cols: u32,
    // Chan merge: n·m/(n+m) and m/(n+m) for a batch of m after n samples.
    gram_weight: f32,
    mean_weight: f32,
    // Row dot: result multiplier (1/d to normalise by the layer width), and where the
    // batch's first result goes (rewritten per batch).
    scale: f32,
    out_offset: u32,
    // A block of columns [col_offset, col_offset + cols) of a matrix with `stride`
    // columns: matrices too big for one storage binding are handled a block at a time.
    col_offset: u32,
    stride: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> y: array<f32>;
@group(0) @binding(2) var<storage, read> z: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<uniform> params: StatsParams;

// out[r][c] = x[r][off + c] - y[off + c] for the block's `cols` columns.
@compute @workgroup_size(64, 1, 1)
fn center(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let w = params.cols;
    for (var i = gid.x; i < params.rows * w; i += nwg.x * 64u) {
        let c = params.col_offset + i % w;
        out[i] = x[(i / w) * params.stride + c] - y[c];
    }
}

// Rows [off, off + rows) of the running centred Gram C (out, a rows x cols block of the
// cols x cols matrix) += the batch Gram's same block (x) + n·m/(n+m)·δδᵀ, with
// δ = batch mean (y) − running mean (z). Never E[x²] − E[x]².
@compute @workgroup_size(64, 1, 1)
fn merge_gram(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let d = params.cols;
    for (var i = gid.x; i < params.rows * d; i += nwg.x * 64u) {
        let a = params.col_offset + i / d;
        let b = i % d;
        let da = y[a] - z[a];
        let db = y[b] - z[b];
        out[i] += x[i] + params.gram_weight * da * db;
    }
}

// Running mean (out) += m/(n+m)·(batch mean (x) − running mean). After merge_gram.
@compute @workgroup_size(64, 1, 1)
fn merge_mean(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var i = gid.x; i < params.cols; i += nwg.x * 64u) {
        out[i] += params.mean_weight * (x[i] - out[i]);
    }
}

// out[r] += scale · Σ_c x[r][c]·y[r][off + c]: x is rows x cols, y rows x stride. Adds, so
// a quadratic form can be summed over column blocks; callers start from zeros.
@compute @workgroup_size(64, 1, 1)
fn row_dot(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var r = gid.x; r < params.rows; r += nwg.x * 64u) {
        var s = 0.0;
        let yr = r * params.stride + params.col_offset;
        for (var c = 0u; c < params.cols; c++) {
            s += x[r * params.cols + c] * y[yr + c];
        }
        out[params.out_offset + r] += params.scale * s;
    }
}
