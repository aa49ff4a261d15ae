// One Adam step (optax semantics: eps added to sqrt of the bias-corrected second
// moment) over every parameter of the model, stored in one flat buffer whose length
// is a multiple of 4 (elementwise, so vec4 is just 4x less loop overhead).
// Needs step.wgsl prepended.

struct AdamParams {
    // Number of vec4s.
    count: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> params: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> grads: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> m1: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> m2: array<vec4<f32>>;
@group(0) @binding(4) var<uniform> dims: AdamParams;
@group(0) @binding(5) var<uniform> step: Step;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    for (var i = gid.x; i < dims.count; i += nwg.x * 64u) {
        update(i);
    }
}

fn update(i: u32) {
    let g = grads[i];
    let m = step.beta1 * m1[i] + (1.0 - step.beta1) * g;
    let v = step.beta2 * m2[i] + (1.0 - step.beta2) * g * g;
    m1[i] = m;
    m2[i] = v;
    let m_hat = m / step.bias_correction1;
    let v_hat = v / step.bias_correction2;
    params[i] -= step.learning_rate * m_hat / (sqrt(v_hat) + step.eps);
}
