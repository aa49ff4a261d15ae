// Scaled column sums of a row-major [rows][cols] matrix (bias gradients with scale 1,
// column means with 1/rows). One invocation per column sums its rows in order, so the
// result is deterministic.

struct ReduceParams {
    rows: u32,
    cols: u32,
    scale: f32,
    _pad0: u32,
}

@group(0) @binding(0) var<storage, read> input: array<f32>;
@group(0) @binding(1) var<storage, read_write> sums: array<f32>;
@group(0) @binding(2) var<uniform> params: ReduceParams;

@compute @workgroup_size(64, 1, 1)
fn column_sums(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var col = gid.x; col < params.cols; col += nwg.x * 64u) {
        var s = 0.0;
        for (var r = 0u; r < params.rows; r++) {
            s += input[r * params.cols + col];
        }
        sums[col] = params.scale * s;
    }
}
