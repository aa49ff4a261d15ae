// Losses of the abstraction detector, one invocation per sample (row):
//   cosine: consistency of a predicted abstract state with the abstraction of the true
//           activation, 1 - <a, b> / (max(|a|, 1e-6) · max(|b|, 1e-6)) (optax's
//           cosine_distance); the gradient w.r.t. the prediction's pre-activation (its
//           ReLU mask applied) is written, the one w.r.t. the target added.
//   kl:     KL(p || q) of the model's output distribution p and the abstraction's
//           prediction q = softmax(pred); `single_class` collapses p to
//           [P(not class 0), P(class 0)]. The gradient w.r.t. pred is q - p.
// Per-sample losses go to position step.batch_offset + row; gradients are multiplied by
// params.scale (1 / (rows · terms) for a mean loss).
// Needs step.wgsl prepended.

struct LossParams {
    rows: u32,
    // cosine: state width; kl: the model's classes.
    dim: u32,
    // kl: width of pred (classes, or 2 with single_class).
    pred_dim: u32,
    scale: f32,
}

@group(0) @binding(0) var<storage, read> pred: array<f32>;
@group(0) @binding(1) var<storage, read> reference: array<f32>;
@group(0) @binding(2) var<storage, read_write> loss: array<f32>;
@group(0) @binding(3) var<storage, read_write> grad_pred: array<f32>;
@group(0) @binding(4) var<storage, read_write> grad_reference: array<f32>;
@group(0) @binding(5) var<uniform> params: LossParams;
@group(0) @binding(6) var<uniform> step: Step;

override GRADS: bool = true;
// cosine: pred is post-ReLU, so its gradient is masked where pred <= 0.
override RELU_PRED: bool = true;
override SINGLE_CLASS: bool = false;

const NORM_EPS: f32 = 1e-6;

@compute @workgroup_size(64, 1, 1)
fn cosine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var r = gid.x; r < params.rows; r += nwg.x * 64u) {
        let base = r * params.dim;
        var dot = 0.0;
        var aa = 0.0;
        var bb = 0.0;
        for (var j = 0u; j < params.dim; j++) {
            let a = pred[base + j];
            let b = reference[base + j];
            dot += a * b;
            aa += a * a;
            bb += b * b;
        }
        let la = sqrt(aa);
        let lb = sqrt(bb);
        let na = max(la, NORM_EPS);
        let nb = max(lb, NORM_EPS);
        loss[step.batch_offset + r] = 1.0 - dot / (na * nb);
        if (GRADS) {
            // d/da of -dot/(na·nb): -b/(na·nb) + dot·a/(na³·nb) where |a| > eps.
            let ca = select(0.0, dot / (na * na * na * nb), la > NORM_EPS);
            let cb = select(0.0, dot / (na * nb * nb * nb), lb > NORM_EPS);
            let inv = 1.0 / (na * nb);
            for (var j = 0u; j < params.dim; j++) {
                let a = pred[base + j];
                let b = reference[base + j];
                var ga = params.scale * (ca * a - inv * b);
                if (RELU_PRED && a <= 0.0) {
                    ga = 0.0;
                }
                grad_pred[base + j] = ga;
                grad_reference[base + j] += params.scale * (cb * b - inv * a);
            }
        }
    }
}

@compute @workgroup_size(64, 1, 1)
fn kl(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var r = gid.x; r < params.rows; r += nwg.x * 64u) {
        kl_row(r);
    }
}

// log-sum-exp of the model's logits over classes [first, dim) of the row at base.
fn lse(base: u32, first: u32) -> f32 {
    var m = reference[base + first];
    for (var c = first + 1u; c < params.dim; c++) {
        m = max(m, reference[base + c]);
    }
    var s = 0.0;
    for (var c = first; c < params.dim; c++) {
        s += exp(reference[base + c] - m);
    }
    return m + log(s);
}

// log p_c of the (possibly collapsed) model distribution.
fn log_p(base: u32, c: u32, total: f32) -> f32 {
    if (SINGLE_CLASS) {
        if (c == 1u) {
            return reference[base] - total;
        }
        return lse(base, 1u) - total;
    }
    return reference[base + c] - total;
}

fn kl_row(r: u32) {
    let base = r * params.dim;
    let pbase = r * params.pred_dim;
    let total = lse(base, 0u);
    var m = pred[pbase];
    for (var c = 1u; c < params.pred_dim; c++) {
        m = max(m, pred[pbase + c]);
    }
    var s = 0.0;
    for (var c = 0u; c < params.pred_dim; c++) {
        s += exp(pred[pbase + c] - m);
    }
    let q_total = m + log(s);
    var kl = 0.0;
    for (var c = 0u; c < params.pred_dim; c++) {
        let lp = log_p(base, c, total);
        let p = exp(lp);
        let lq = pred[pbase + c] - q_total;
        if (p > 0.0) {
            kl += p * (lp - lq);
        }
        if (GRADS) {
            grad_pred[pbase + c] = params.scale * (exp(lq) - p);
        }
    }
    loss[step.batch_offset + r] = kl;
}
