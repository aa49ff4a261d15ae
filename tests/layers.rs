//! The layer library on its own, on odd shapes: every layer's forward pass against its
//! f64 reference, and a stack's parameter and input gradients against finite
//! differences of that reference.

mod common;

use common::{assert_close, gpu, random};
use cupbearer::gpu::matmul::Schedule;
use cupbearer::gpu::{GpuContext, Slice};
use cupbearer::model::layers::{
    BoundStack, Layer, Needs, ParamLayout, Shape, Stack, StackBackward, StackForward,
};
use cupbearer::model::mlp::Dense;

/// The loss whose gradients are checked: Σ out ⊙ w for fixed weights `w`.
fn loss(stack: &Stack, params: &[Dense], x: &[f64], rows: usize, w: &[f32]) -> f64 {
    let outs = stack.reference(params, x, rows).unwrap();
    let out = outs.last().unwrap();
    out.iter().zip(w).map(|(o, &w)| o * w as f64).sum()
}

struct Run {
    out: Vec<f32>,
    grads: Vec<f32>,
    gx: Option<Vec<f32>>,
}

/// Forward and backward of `stack` on the GPU for `rows` inputs `x`, with dL/dout = `w`.
fn run(
    ctx: &GpuContext,
    stack: &Stack,
    params: &[Dense],
    x: &[f32],
    rows: usize,
    w: &[f32],
    input_grad: bool,
) -> Run {
    let layout = ParamLayout::for_dims(&stack.param_dims());
    let values = ctx.buffer_from("values", &layout.flatten(params)).unwrap();
    let needs = Needs {
        backward: true,
        param_grads: true,
        input_grad,
    };
    let buffers = stack.buffers(ctx, rows, needs).unwrap();
    let xb = ctx.buffer_from("x", x).unwrap();
    let out = ctx.zeros("out", w.len()).unwrap();
    let g = ctx.buffer_from("g", w).unwrap();
    let grads = ctx.zeros("grads", layout.total).unwrap();
    let gx = ctx.zeros("gx", x.len()).unwrap();
    let bound = BoundStack {
        stack,
        rows,
        schedule: Schedule::for_context(ctx),
        slots: &layout.layers,
        values: &values,
        buffers: &buffers,
    };
    let forward = StackForward {
        x: Slice::whole(&xb),
        x_t: None,
        sparse: false,
        out: Slice::whole(&out),
    };
    let backward = StackBackward {
        x: Slice::whole(&xb),
        sparse: false,
        g: Slice::whole(&g),
        grads: Some(&grads),
        gx: input_grad.then(|| Slice::whole(&gx)),
        gx_mask: None,
    };
    let mut ops = bound.forward(ctx, &forward).unwrap();
    ops.extend(bound.backward(ctx, &backward).unwrap());
    ctx.submit(&ops);
    let flat: Vec<f32> = ctx.read(Slice::whole(&grads)).unwrap();
    Run {
        out: ctx.read(Slice::whole(&out)).unwrap(),
        grads: flat,
        gx: input_grad.then(|| ctx.read(Slice::whole(&gx)).unwrap()),
    }
}

/// Checks forward, parameter gradients and (if `input_grad`) input gradients.
fn check(ctx: &GpuContext, stack: &Stack, rows: usize, input_grad: bool, what: &str) {
    let input_len = rows * stack_input_width(stack);
    let params: Vec<Dense> = stack
        .param_dims()
        .iter()
        .enumerate()
        .map(|(i, &(fan_in, fan_out))| {
            let mut d = Dense::lecun(fan_in, fan_out, 7, i as u32);
            d.bias = random(fan_out, 40 + i as u32)
                .iter()
                .map(|v| v * 0.1)
                .collect();
            d
        })
        .collect();
    let x32: Vec<f32> = random(input_len, 3).iter().map(|v| v.abs()).collect();
    let x: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
    let out_len = rows * stack.output().width();
    let w = random(out_len, 5);
    let got = run(ctx, stack, &params, &x32, rows, &w, input_grad);

    let want = stack.reference(&params, &x, rows).unwrap();
    assert_close(
        &got.out,
        want.last().unwrap(),
        1e-4,
        1e-4,
        &format!("{what}: forward"),
    );

    let layout = ParamLayout::for_dims(&stack.param_dims());
    let h = 1e-3f32;
    let mut checked = 0;
    for (l, slot) in layout.layers.iter().enumerate() {
        let len = slot.fan_in * slot.fan_out;
        for (i, offset) in (0..len)
            .step_by(if len > 50 { 5 } else { 1 })
            .map(|i| (i, slot.kernel + i))
            .chain((0..slot.fan_out).map(|i| (len + i, slot.bias + i)))
        {
            let bump = |delta: f32| {
                let mut p = params.clone();
                let v = if i < len {
                    &mut p[l].kernel[i]
                } else {
                    &mut p[l].bias[i - len]
                };
                *v += delta;
                let moved = *v;
                (loss(stack, &p, &x, rows, &w), moved)
            };
            let ((up, vu), (down, vd)) = (bump(h), bump(-h));
            let fd = (up - down) / (vu - vd) as f64;
            let g = got.grads[offset] as f64;
            assert!(
                (g - fd).abs() <= 2e-3 + 2e-3 * fd.abs(),
                "{what}: d/dparam {l}[{i}]: got {g}, finite differences {fd}"
            );
            checked += 1;
        }
    }
    if let Some(gx) = &got.gx {
        for i in (0..input_len).step_by(3) {
            let bump = |delta: f64| {
                let mut xi = x.clone();
                xi[i] += delta;
                loss(stack, &params, &xi, rows, &w)
            };
            let fd = (bump(1e-4) - bump(-1e-4)) / 2e-4;
            let g = gx[i] as f64;
            assert!(
                (g - fd).abs() <= 2e-3 + 2e-3 * fd.abs(),
                "{what}: d/dx[{i}]: got {g}, finite differences {fd}"
            );
            checked += 1;
        }
    }
    assert!(checked > 20, "{what}: only {checked} gradients checked");
}

fn stack_input_width(stack: &Stack) -> usize {
    match stack.layers[0] {
        Layer::Dense { fan_in, .. } => fan_in,
        Layer::Conv { input, .. } | Layer::MaxPool { input } | Layer::GlobalMaxPool { input } => {
            input.width()
        }
        Layer::Gate { width } => width,
    }
}

#[test]
fn every_layer_matches_its_reference_and_finite_differences() {
    let Some(ctx) = gpu() else { return };
    let input = Shape::Spatial {
        height: 5,
        width: 7,
        channels: 2,
    };
    let conv = Layer::Conv {
        input,
        out_channels: 3,
        relu: true,
    };
    let pool = Layer::MaxPool {
        input: conv.output(),
    };
    let global = Layer::GlobalMaxPool {
        input: pool.output(),
    };
    let hidden = Layer::Dense {
        fan_in: 3,
        fan_out: 5,
        relu: true,
    };
    let out = Layer::Dense {
        fan_in: 5,
        fan_out: 2,
        relu: false,
    };
    // The classifier's shape of network: conv block, global pool, dense layers.
    let cnn = Stack::new(vec![conv, pool, global, hidden, out]);
    check(&ctx, &cnn, 3, true, "conv/pool/dense stack");
    check(
        &ctx,
        &cnn,
        2,
        false,
        "conv/pool/dense stack, parameters only",
    );
    // A conv without ReLU or pool, as the abstraction's τ.
    let tau = Stack::new(vec![Layer::Conv {
        input,
        out_channels: 1,
        relu: false,
    }]);
    check(&ctx, &tau, 2, true, "linear conv");
    // The axis-aligned τ: a gate, then a dense layer.
    let gated = Stack::new(vec![
        Layer::Gate { width: 6 },
        Layer::Dense {
            fan_in: 6,
            fan_out: 3,
            relu: false,
        },
    ]);
    check(&ctx, &gated, 4, false, "gate + dense");
}
