//! Finite-difference checks of the backward passes: each layer of the layer library
//! (forward against its f64 reference, parameter and input gradients against central
//! differences of that reference), and the classifier's whole training step.

use anyhow::Result;

use super::{random, Check, Checker};
use crate::data::backdoor::batch_reference;
use crate::data::Dataset;
use crate::gpu::batch::GpuDataset;
use crate::gpu::matmul::Schedule;
use crate::gpu::{Dispatch, GpuContext, Slice, StepParams};
use crate::model::batches::{BatchInputs, BatchPlan};
use crate::model::gpu_mlp::Workspace;
use crate::model::layers::{
    BoundStack, Layer, Needs, ParamLayout, Shape, Stack, StackBackward, StackForward,
};
use crate::model::mlp::Dense;
use crate::model::train::{loss_op, SampleMetrics};
use crate::model::{GpuMlp, Gradients, Mlp, MlpConfig};

/// What the layer checks compile: matmul, the conv family, column sums and the gate.
const LAYER_FILES: &[&str] = &["matmul", "conv", "reduce", "gate"];

pub const LAYERS: Check = Check {
    name: "layer_gradients",
    files: LAYER_FILES,
    run: |c| {
        Box::pin(async move {
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
            let dense = |fan_in, fan_out, relu| Layer::Dense {
                fan_in,
                fan_out,
                relu,
            };
            // The classifier's shape of network: conv block, global pool, dense layers.
            let cnn = Stack::new(vec![
                conv,
                pool,
                global,
                dense(3, 5, true),
                dense(5, 2, false),
            ]);
            c.variant("conv/pool/dense stack");
            check_stack(c, &cnn, 3, true).await?;
            c.variant("conv/pool/dense stack, parameters only");
            check_stack(c, &cnn, 2, false).await?;
            // A conv without ReLU or pool, as the abstraction's τ.
            let tau = Stack::new(vec![Layer::Conv {
                input,
                out_channels: 1,
                relu: false,
            }]);
            c.variant("linear conv");
            check_stack(c, &tau, 2, true).await?;
            // The axis-aligned τ: a gate, then a dense layer.
            let gated = Stack::new(vec![Layer::Gate { width: 6 }, dense(6, 3, false)]);
            c.variant("gate + dense");
            check_stack(c, &gated, 4, false).await
        })
    },
};

/// The loss whose gradients are checked: Σ out ⊙ w for fixed weights `w`.
fn weighted_sum(stack: &Stack, params: &[Dense], x: &[f64], rows: usize, w: &[f32]) -> Result<f64> {
    let outs = stack.reference(params, x, rows)?;
    let out = outs.last().map_or(&[][..], |o| &o[..]);
    Ok(out.iter().zip(w).map(|(o, &w)| o * w as f64).sum())
}

struct StackRun {
    out: Vec<f32>,
    grads: Vec<f32>,
    gx: Option<Vec<f32>>,
}

/// Forward and backward of `stack` on the GPU for `rows` inputs `x`, with dL/dout = `w`.
async fn run_stack(
    ctx: &GpuContext,
    (stack, params): (&Stack, &[Dense]),
    (x, rows): (&[f32], usize),
    w: &[f32],
    input_grad: bool,
) -> Result<StackRun> {
    let layout = ParamLayout::for_dims(&stack.param_dims());
    let values = ctx.buffer_from("values", &layout.flatten(params))?;
    let needs = Needs {
        backward: true,
        param_grads: true,
        input_grad,
    };
    let buffers = stack.buffers(ctx, rows, needs)?;
    let xb = ctx.buffer_from("x", x)?;
    let out = ctx.zeros("out", w.len())?;
    let g = ctx.buffer_from("g", w)?;
    let grads = ctx.zeros("grads", layout.total)?;
    let gx = ctx.zeros("gx", x.len())?;
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
    let mut ops = bound.forward(ctx, &forward)?;
    ops.extend(bound.backward(ctx, &backward)?);
    ctx.submit(&ops);
    Ok(StackRun {
        out: ctx.read_async(Slice::new(&out, 0, w.len())).await?,
        grads: ctx.read_async(Slice::new(&grads, 0, layout.total)).await?,
        gx: if input_grad {
            Some(ctx.read_async(Slice::new(&gx, 0, x.len())).await?)
        } else {
            None
        },
    })
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

/// Forward, parameter gradients and (if `input_grad`) input gradients of `stack`.
async fn check_stack(
    c: &mut Checker<'_>,
    stack: &Stack,
    rows: usize,
    input_grad: bool,
) -> Result<()> {
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
    let w = random(rows * stack.output().width(), 5);
    let got = run_stack(c.ctx, (stack, &params), (&x32, rows), &w, input_grad).await?;
    let want = stack.reference(&params, &x, rows)?;
    let want_out = want.last().map_or(&[][..], |o| &o[..]);
    c.close(
        format!("{rows} rows forward"),
        &got.out,
        want_out,
        1e-4,
        1e-4,
    );

    let layout = ParamLayout::for_dims(&stack.param_dims());
    let h = 1e-3f32;
    let (mut gpu, mut fd) = (Vec::new(), Vec::new());
    for (l, slot) in layout.layers.iter().enumerate() {
        let len = slot.fan_in * slot.fan_out;
        let sampled = (0..len).step_by(if len > 50 { 5 } else { 1 });
        for (i, offset) in sampled
            .map(|i| (i, slot.kernel + i))
            .chain((0..slot.fan_out).map(|i| (len + i, slot.bias + i)))
        {
            let bump = |delta: f32| -> Result<(f64, f32)> {
                let mut p = params.clone();
                let v = if i < len {
                    &mut p[l].kernel[i]
                } else {
                    &mut p[l].bias[i - len]
                };
                *v += delta;
                let moved = *v;
                Ok((weighted_sum(stack, &p, &x, rows, &w)?, moved))
            };
            let ((up, vu), (down, vd)) = (bump(h)?, bump(-h)?);
            fd.push((up - down) / (vu - vd) as f64);
            gpu.push(got.grads[offset]);
        }
    }
    let mut checked = gpu.len();
    c.close(format!("{rows} rows d/dparams"), &gpu, &fd, 2e-3, 2e-3);
    if let Some(gx) = &got.gx {
        let (mut gpu, mut fd) = (Vec::new(), Vec::new());
        for i in (0..input_len).step_by(3) {
            let bump = |delta: f64| {
                let mut xi = x.clone();
                xi[i] += delta;
                weighted_sum(stack, &params, &xi, rows, &w)
            };
            fd.push((bump(1e-4)? - bump(-1e-4)?) / 2e-4);
            gpu.push(gx[i]);
        }
        checked += gpu.len();
        c.close(format!("{rows} rows d/dx"), &gpu, &fd, 2e-3, 2e-3);
    }
    c.require("enough gradients compared", checked > 20, || {
        format!("only {checked} gradients")
    });
    Ok(())
}

/// What the model checks compile: a whole training step's kernel files.
const STEP_FILES: &[&str] = &["matmul", "conv", "reduce", "loss", "batch", "rng", "step"];

pub const MODEL_PARAMS: Check = Check {
    name: "model_param_gradients",
    files: STEP_FILES,
    run: |c| {
        Box::pin(async move {
            for cnn in [false, true] {
                c.variant(if cnn { "cnn" } else { "mlp" });
                let case = GradientCase::new(cnn)?;
                let (mlp, config) = (&case.mlp, &case.mlp.config);
                let ctx = c.ctx;
                let grads = ctx.zeros("grads", ParamLayout::new(config).total)?;
                let (model, _ws) = case.run(ctx, Gradients::Params, |model, ws| {
                    model.backward(ctx, ws, &grads)
                })?;
                let flat: Vec<f32> = ctx
                    .read_async(Slice::new(&grads, 0, model.layout.total))
                    .await?;
                let got = model.layout.unflatten(&flat);
                let (x, labels) = batch_reference(&case.data, &case.indices, None, (0, 0));
                let h = 1e-4f32;
                for (l, got_l) in got.iter().enumerate() {
                    let (nk, nb) = (mlp.layers[l].kernel.len(), mlp.layers[l].bias.len());
                    let (mut gpu, mut fd) = (Vec::new(), Vec::new());
                    for (i, is_bias) in (0..nk)
                        .map(|i| (i, false))
                        .chain((0..nb).map(|i| (i, true)))
                    {
                        let (mut plus, mut minus) = (mlp.clone(), mlp.clone());
                        let (p, m) = (
                            entry(&mut plus, l, i, is_bias),
                            entry(&mut minus, l, i, is_bias),
                        );
                        *p += h;
                        *m -= h;
                        let dp = (*p as f64) - (*m as f64);
                        fd.push(
                            (mean_cross_entropy(&plus, &x, &labels)
                                - mean_cross_entropy(&minus, &x, &labels))
                                / dp,
                        );
                        gpu.push(if is_bias {
                            got_l.bias[i]
                        } else {
                            got_l.kernel[i]
                        });
                    }
                    c.close(
                        format!("layer {l}, every kernel and bias entry"),
                        &gpu,
                        &fd,
                        2e-4,
                        2e-3,
                    );
                }
            }
            Ok(())
        })
    },
};

pub const MODEL_INPUTS: Check = Check {
    name: "model_input_gradients",
    files: STEP_FILES,
    run: |c| {
        Box::pin(async move {
            for cnn in [false, true] {
                c.variant(if cnn { "cnn" } else { "mlp" });
                let case = GradientCase::new(cnn)?;
                let ctx = c.ctx;
                let (_model, ws) = case.run(ctx, Gradients::Input, |model, ws| {
                    model.input_gradient(ctx, ws)
                })?;
                let dx = ws
                    .dx
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("no input gradient buffer"))?;
                let (x, labels) = batch_reference(&case.data, &case.indices, None, (0, 0));
                let got: Vec<f32> = ctx.read_async(Slice::new(dx, 0, x.len())).await?;
                let h = 1e-5;
                let fd: Vec<f64> = (0..x.len())
                    .map(|i| {
                        let (mut plus, mut minus) = (x.clone(), x.clone());
                        plus[i] += h;
                        minus[i] -= h;
                        (mean_cross_entropy(&case.mlp, &plus, &labels)
                            - mean_cross_entropy(&case.mlp, &minus, &labels))
                            / (2.0 * h)
                    })
                    .collect();
                c.close("13 samples, every pixel", &got, &fd, 1e-5, 2e-3);
                // Most inputs must matter, or the comparison proves little.
                let nonzero = fd.iter().filter(|v| v.abs() > 1e-6).count();
                c.require("most pixels matter", nonzero > x.len() / 2, || {
                    format!("{nonzero} of {} non-zero", x.len())
                });
            }
            Ok(())
        })
    },
};

/// Kernel entry `i` (or bias entry, for `is_bias`) of layer `l`.
fn entry(m: &mut Mlp, l: usize, i: usize, is_bias: bool) -> &mut f32 {
    let layer = &mut m.layers[l];
    if is_bias {
        &mut layer.bias[i]
    } else {
        &mut layer.kernel[i]
    }
}

/// Mean cross-entropy of the f64 reference forward pass.
fn mean_cross_entropy(mlp: &Mlp, x: &[f64], labels: &[u32]) -> f64 {
    let rows = labels.len();
    let (_, logits) = mlp.forward_reference(x, rows);
    let c = mlp.config.output_dim;
    (0..rows)
        .map(|r| {
            let row = &logits[r * c..(r + 1) * c];
            let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + row.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
            lse - row[labels[r] as usize]
        })
        .sum::<f64>()
        / rows as f64
}

/// A small MLP, or CNN, with non-zero biases (so every gradient path is exercised) on
/// synthetic images, and 13 of its samples. The CNN's blocks see 8x7 and 4x3 inputs,
/// so pooling drops a column and the global pool covers two positions.
struct GradientCase {
    data: Dataset,
    mlp: Mlp,
    indices: Vec<u32>,
}

impl GradientCase {
    fn new(cnn: bool) -> Result<Self> {
        let (h, w) = if cnn { (8, 7) } else { (5, 3) };
        let config = MlpConfig {
            input_shape: [h, w, 1],
            conv_channels: if cnn { vec![3, 4] } else { Vec::new() },
            hidden_dims: if cnn { vec![5] } else { vec![7, 6] },
            output_dim: 10,
        };
        let mut mlp = Mlp::init(&config, 3)?;
        for d in &mut mlp.layers {
            for (i, b) in d.bias.iter_mut().enumerate() {
                *b = 0.05 * ((i % 3) as f32 - 1.0);
            }
        }
        Ok(GradientCase {
            data: Dataset::synthetic(19, h, w, 4),
            mlp,
            indices: (0..13).map(|i| (i * 5) % 19).collect(),
        })
    }

    /// Runs gather, forward, loss and `backward(model, ws)` on the GPU, as training
    /// records them.
    fn run(
        &self,
        ctx: &GpuContext,
        gradients: Gradients,
        backward: impl Fn(&GpuMlp, &Workspace) -> Result<Vec<Dispatch>>,
    ) -> Result<(GpuMlp, Workspace)> {
        let rows = self.indices.len();
        let model = GpuMlp::upload(ctx, &self.mlp)?;
        let gdata = GpuDataset::upload(ctx, &self.data.as_images())?;
        let indices = ctx.buffer_from("idx", &self.indices)?;
        let step = ctx.uniform("step", &StepParams::default());
        let metrics = SampleMetrics::new(ctx, rows)?;
        let inputs = BatchInputs {
            data: &gdata,
            indices: &indices,
            step: &step,
            backdoor: None,
            seed: 0,
            augment: None,
        };
        let extra = |ws: &Workspace| -> Result<Vec<Dispatch>> {
            let mut ops = vec![loss_op(ctx, &model, ws, &metrics, &step)?];
            ops.extend(backward(&model, ws)?);
            Ok(ops)
        };
        let plan = BatchPlan::new(ctx, &model, &inputs, rows, gradients, &extra)?;
        ctx.submit(&plan.ops);
        Ok((model, plan.ws))
    }
}
