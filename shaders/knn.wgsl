// Cosine nearest neighbours and ranks for TED: rows scaled to unit length; per row of a
// similarity matrix (rows x cols) its top k columns; and the rank of given columns in
// a row. The order is total: higher similarity first, then the lower column index, so
// ties cannot make results depend on the schedule.

struct KnnParams {
    rows: u32,
    cols: u32,
    dim: u32,
    k: u32,
    // With `exclude` 1, column `exclude_offset + row` (the query itself, when the
    // queries are the reference samples) takes no part; rewritten per batch.
    exclude: u32,
    exclude_offset: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> idx_in: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read_write> idx_out: array<u32>;
@group(0) @binding(4) var<uniform> params: KnnParams;

fn excluded(row: u32, col: u32) -> bool {
    return params.exclude == 1u && col == params.exclude_offset + row;
}

// Whether (va, ia) comes before (vb, ib) in the order.
fn before(va: f32, ia: u32, vb: f32, ib: u32) -> bool {
    return va > vb || (va == vb && ia < ib);
}

// out[r] = x[r] / |x[r]| (all-zero rows stay zero), rows x dim.
@compute @workgroup_size(64, 1, 1)
fn normalize_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var r = gid.x; r < params.rows; r += nwg.x * 64u) {
        var s = 0.0;
        for (var c = 0u; c < params.dim; c++) {
            let v = x[r * params.dim + c];
            s += v * v;
        }
        let inv = select(0.0, inverseSqrt(s), s > 0.0);
        for (var c = 0u; c < params.dim; c++) {
            out[r * params.dim + c] = x[r * params.dim + c] * inv;
        }
    }
}

var<workgroup> best_v: array<f32, 64>;
var<workgroup> best_i: array<u32, 64>;

// idx_out[row][m], m < k: the row's m-th column in the order (x = similarities, rows x
// cols). One workgroup per row; k rounds of a workgroup-wide minimum in the order,
// each over the columns after the previous round's pick.
@compute @workgroup_size(64, 1, 1)
fn topk(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.x + wid.y * 65535u;
    if (row >= params.rows) {
        return;
    }
    let base = row * params.cols;
    var prev_v = 0.0;
    var prev_i = 0xffffffffu;
    for (var m = 0u; m < params.k; m++) {
        var bv = 0.0;
        var bi = 0xffffffffu;
        for (var c = lid.x; c < params.cols; c += 64u) {
            let v = x[base + c];
            let later = m == 0u || before(prev_v, prev_i, v, c);
            if (later && !excluded(row, c) && (bi == 0xffffffffu || before(v, c, bv, bi))) {
                bv = v;
                bi = c;
            }
        }
        best_v[lid.x] = bv;
        best_i[lid.x] = bi;
        workgroupBarrier();
        for (var half = 32u; half > 0u; half >>= 1u) {
            if (lid.x < half) {
                let ov = best_v[lid.x + half];
                let oi = best_i[lid.x + half];
                if (oi != 0xffffffffu && (best_i[lid.x] == 0xffffffffu || before(ov, oi, best_v[lid.x], best_i[lid.x]))) {
                    best_v[lid.x] = ov;
                    best_i[lid.x] = oi;
                }
            }
            workgroupBarrier();
        }
        prev_v = best_v[0];
        prev_i = best_i[0];
        if (lid.x == 0u) {
            idx_out[row * params.k + m] = prev_i;
        }
        workgroupBarrier();
    }
}

// out[row][m] = the rank (0 = first) of column idx_in[row][m] in the row's order of x
// (similarities, rows x cols).
@compute @workgroup_size(64, 1, 1)
fn ranks(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var i = gid.x; i < params.rows * params.k; i += nwg.x * 64u) {
        let row = i / params.k;
        let j = idx_in[i];
        let base = row * params.cols;
        let s = x[base + j];
        var rank = 0u;
        for (var c = 0u; c < params.cols; c++) {
            if (!excluded(row, c) && before(x[base + c], c, s, j)) {
                rank++;
            }
        }
        out[i] = f32(rank);
    }
}
