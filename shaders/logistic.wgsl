// Logistic regression by iteratively reweighted least squares (the supervised probe):
// per sample, from its logit z and 0/1 label y, the loss softplus(z) − y·z, the residual
// (p − y)/n and the IRLS weight sqrt(p(1 − p)/n), p = sigmoid(z); and rows scaled by
// those weights, whose Gram matrix is the Hessian of the mean loss.

struct LogisticParams {
    rows: u32,
    cols: u32,
    // 1 / rows: the loss is a mean.
    inv_rows: f32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> out0: array<f32>;
@group(0) @binding(3) var<storage, read_write> out1: array<f32>;
@group(0) @binding(4) var<storage, read_write> out2: array<f32>;
@group(0) @binding(5) var<uniform> params: LogisticParams;

// a = logits, b = labels: out0 = residuals, out1 = IRLS weights, out2 = losses.
@compute @workgroup_size(64, 1, 1)
fn irls(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var i = gid.x; i < params.rows; i += nwg.x * 64u) {
        let z = a[i];
        let y = b[i];
        // Stable forms for large |z|.
        let e = exp(-abs(z));
        let p = select(e / (1.0 + e), 1.0 / (1.0 + e), z >= 0.0);
        out0[i] = (p - y) * params.inv_rows;
        // p(1 − p) = e / (1 + e)², which keeps its precision where 1 − p rounds to 0.
        out1[i] = sqrt(e * params.inv_rows) / (1.0 + e);
        out2[i] = max(z, 0.0) + log(1.0 + e) - y * z;
    }
}

// a = rows x cols matrix, b = per-row weights: out0 = each row times its weight.
@compute @workgroup_size(64, 1, 1)
fn scale_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var i = gid.x; i < params.rows * params.cols; i += nwg.x * 64u) {
        out0[i] = a[i] * b[i / params.cols];
    }
}
