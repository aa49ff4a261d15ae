// Softmax cross-entropy over rows of logits: per-sample loss and correctness are
// written at the batch's position in the epoch (summed on the host at epoch end, in a
// fixed order, so metrics are reproducible), and dL/dlogits of the batch-mean loss.
// Needs step.wgsl prepended.

struct LossParams {
    rows: u32,
    classes: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> labels: array<u32>;
@group(0) @binding(2) var<storage, read_write> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> sample_loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> sample_correct: array<f32>;
@group(0) @binding(5) var<uniform> params: LossParams;
@group(0) @binding(6) var<uniform> step: Step;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var r = gid.x; r < params.rows; r += nwg.x * 64u) {
        row(r);
    }
}

fn row(r: u32) {
    let base = r * params.classes;
    var best = logits[base];
    var arg = 0u;
    for (var c = 1u; c < params.classes; c++) {
        let l = logits[base + c];
        // Strict > keeps the first maximum, as argmax does.
        if (l > best) {
            best = l;
            arg = c;
        }
    }
    var sum = 0.0;
    for (var c = 0u; c < params.classes; c++) {
        sum += exp(logits[base + c] - best);
    }
    let lse = best + log(sum);
    let label = labels[r];
    let scale = 1.0 / f32(params.rows);
    for (var c = 0u; c < params.classes; c++) {
        let p = exp(logits[base + c] - lse);
        grad[base + c] = (p - select(0.0, 1.0, c == label)) * scale;
    }
    sample_loss[step.batch_offset + r] = lse - logits[base + label];
    sample_correct[step.batch_offset + r] = select(0.0, 1.0, arg == label);
}
