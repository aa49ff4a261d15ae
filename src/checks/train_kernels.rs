//! Checks of the training step's kernel files: matmul (every schedule, layout and
//! epilogue), column sums, softmax cross-entropy, Adam, the conv/pool family, the gate
//! and the batch gather with its triggers.

use anyhow::Result;

use super::{random, to64, Check, Checker};
use crate::data::backdoor::{
    augmented_batch_reference, batch_reference, Backdoor, Corner, Trigger,
};
use crate::data::Dataset;
use crate::gpu::adam::{adam, adam_reference, set_adam_step};
use crate::gpu::batch::{gather_batch, Augment, BatchOutputs, Gather, GpuDataset};
use crate::gpu::conv::{
    col2im_reference, conv_op, global_max_grad_reference, global_max_reference, im2col_reference,
    max_pool_grad_reference, max_pool_reference, ConvArgs, ConvOp, Nhwc,
};
use crate::gpu::gate::{gate, gate_grad, gate_grad_reference, gate_reference};
use crate::gpu::loss::{softmax_cross_entropy, softmax_cross_entropy_reference, LossOutputs};
use crate::gpu::matmul::{matmul, matmul_reference, HostMatmul, MatmulArgs, MatmulFlags, Schedule};
use crate::gpu::reduce::{column_sums, column_sums_reference};
use crate::gpu::{GpuContext, Slice, StepParams};

// Odd shapes, and shapes with M and N multiples of 4 (the whole-vec4 load paths) or K
// a multiple of 4 (row-major A shared along k); the 132-row ones span several 16x16
// blocks in both directions; the last three are narrower than a block or one block
// high.
const SHAPES: [(usize, usize, usize); 13] = [
    (1, 1, 1),
    (37, 29, 53),
    (130, 70, 33),
    (5, 3, 0),
    (36, 28, 53),
    (132, 44, 7),
    (67, 131, 19),
    (132, 136, 9),
    (67, 131, 20),
    (132, 136, 12),
    // Narrower than a block, with shared A loads; one block high and two wide.
    (36, 10, 20),
    (37, 9, 24),
    (9, 32, 40),
];
/// Every schedule the engine compiles: both register-block shapes (software adapters;
/// 16x16 runs K-major products in 32x8 blocks where A loads are shared) and the tiled
/// kernel (GPUs).
const SCHEDULES: [Schedule; 3] = [
    Schedule::RegisterBlocked { bm: 16, bn4: 4 },
    Schedule::RegisterBlocked { bm: 4, bn4: 1 },
    Schedule::Tiled,
];

async fn check_matmul(
    c: &mut Checker<'_>,
    flags: MatmulFlags,
    schedule: Schedule,
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    let ctx = c.ctx;
    let mut a = random(m * k, 1);
    if flags.skip_zero_a {
        // Whole zero k-columns (skipped by every row block) and scattered zeros.
        for (i, v) in a.iter_mut().enumerate() {
            let (row, kk) = if flags.a_kmajor {
                (i % m, i / m)
            } else {
                (i / k, i % k)
            };
            if kk % 3 != 0 || (row * 7 + kk) % 5 == 0 {
                *v = 0.0;
            }
        }
    }
    let b = random(k * n, 2);
    let bias = random(n, 3);
    let mask = random(m * n, 4);
    let (ga, gb) = (ctx.buffer_from("a", &a)?, ctx.buffer_from("b", &b)?);
    let (gbias, gmask) = (
        ctx.buffer_from("bias", &bias)?,
        ctx.buffer_from("mask", &mask)?,
    );
    let out = ctx.zeros("c", m * n)?;
    let op = matmul(
        ctx,
        flags,
        schedule,
        &MatmulArgs {
            m,
            n,
            k,
            a: Slice::whole(&ga),
            b: Slice::whole(&gb),
            c: Slice::whole(&out),
            bias: flags.bias.then(|| Slice::whole(&gbias)),
            mask: flags.relu_mask.then(|| Slice::whole(&gmask)),
        },
    )?;
    ctx.submit([&op]);
    let got: Vec<f32> = ctx.read_async(Slice::new(&out, 0, m * n)).await?;
    let want = matmul_reference(
        flags,
        &HostMatmul {
            m,
            n,
            k,
            a: &a,
            b: &b,
            bias: flags.bias.then_some(&bias[..]),
            mask: flags.relu_mask.then_some(&mask[..]),
        },
    );
    c.close(format!("{m}x{n}x{k}"), &got, &want, 1e-5, 1e-5);
    Ok(())
}

async fn matmul_over(c: &mut Checker<'_>, flag_sets: &[MatmulFlags]) -> Result<()> {
    for schedule in SCHEDULES {
        for &flags in flag_sets {
            c.variant(format!("{schedule:?} {flags}"));
            for shape in SHAPES {
                check_matmul(c, flags, schedule, shape).await?;
            }
        }
    }
    Ok(())
}

pub const MATMUL_LAYOUTS: Check = Check {
    name: "matmul_layouts",
    files: &["matmul"],
    run: |c| {
        Box::pin(async move {
            let layouts: Vec<MatmulFlags> =
                [(false, false), (true, false), (false, true), (true, true)]
                    .into_iter()
                    .map(|(a_kmajor, b_nmajor)| MatmulFlags {
                        a_kmajor,
                        b_nmajor,
                        ..Default::default()
                    })
                    .collect();
            matmul_over(c, &layouts).await
        })
    },
};

pub const MATMUL_EPILOGUES: Check = Check {
    name: "matmul_epilogues",
    files: &["matmul"],
    run: |c| {
        Box::pin(async move {
            let d = MatmulFlags::default();
            let epilogues = [
                MatmulFlags { bias: true, ..d },
                MatmulFlags {
                    bias: true,
                    relu: true,
                    a_kmajor: true,
                    ..d
                },
                MatmulFlags {
                    relu_mask: true,
                    b_nmajor: true,
                    ..d
                },
                MatmulFlags {
                    skip_zero_a: true,
                    a_kmajor: true,
                    ..d
                },
                MatmulFlags {
                    skip_zero_a: true,
                    bias: true,
                    relu: true,
                    ..d
                },
                MatmulFlags {
                    bias: true,
                    relu: true,
                    b_nmajor: true,
                    ..d
                },
            ];
            matmul_over(c, &epilogues).await
        })
    },
};

pub const COLUMN_SUMS: Check = Check {
    name: "column_sums",
    files: &["reduce"],
    run: |c| {
        Box::pin(async move {
            let ctx = c.ctx;
            for (rows, cols) in [(1, 1), (37, 29), (130, 70), (3, 200)] {
                let x = random(rows * cols, 7);
                let input = ctx.buffer_from("x", &x)?;
                let sums = ctx.zeros("sums", cols)?;
                let op = column_sums(
                    ctx,
                    rows,
                    cols,
                    0.5,
                    Slice::whole(&input),
                    Slice::whole(&sums),
                )?;
                ctx.submit([&op]);
                let got: Vec<f32> = ctx.read_async(Slice::new(&sums, 0, cols)).await?;
                let want: Vec<f64> = column_sums_reference(rows, cols, &x)
                    .iter()
                    .map(|s| 0.5 * s)
                    .collect();
                c.close(format!("{rows}x{cols}"), &got, &want, 1e-5, 1e-5);
            }
            Ok(())
        })
    },
};

pub const SOFTMAX_CROSS_ENTROPY: Check = Check {
    name: "softmax_cross_entropy",
    files: &["loss", "step"],
    run: |c| {
        Box::pin(async move {
            let ctx = c.ctx;
            for (rows, classes) in [(1, 1), (37, 10), (130, 3)] {
                let logits: Vec<f32> = random(rows * classes, 11).iter().map(|v| v * 8.0).collect();
                let labels: Vec<u32> = (0..rows as u32).map(|r| (r * 7) % classes as u32).collect();
                let offset = 5;
                let step = ctx.uniform(
                    "step",
                    &StepParams {
                        batch_offset: offset as u32,
                        ..Default::default()
                    },
                );
                let (gl, gy) = (
                    ctx.buffer_from("l", &logits)?,
                    ctx.buffer_from("y", &labels)?,
                );
                let grad = ctx.zeros("grad", rows * classes)?;
                let loss = ctx.zeros("loss", offset + rows)?;
                let correct = ctx.zeros("correct", offset + rows)?;
                let op = softmax_cross_entropy(
                    ctx,
                    rows,
                    classes,
                    Slice::whole(&gl),
                    Slice::whole(&gy),
                    &LossOutputs {
                        grad: Slice::whole(&grad),
                        sample_loss: Slice::whole(&loss),
                        sample_correct: Slice::whole(&correct),
                    },
                    &step,
                )?;
                ctx.submit([&op]);
                let want = softmax_cross_entropy_reference(classes, &logits, &labels);
                let shape = format!("{rows}x{classes}");
                let got: Vec<f32> = ctx.read_async(Slice::new(&loss, offset, rows)).await?;
                let w: Vec<f64> = want.iter().map(|w| w.0).collect();
                c.close(format!("{shape} loss"), &got, &w, 1e-5, 1e-5);
                let got: Vec<f32> = ctx.read_async(Slice::new(&correct, offset, rows)).await?;
                let w: Vec<f64> = want.iter().map(|w| w.1 as u8 as f64).collect();
                c.close(format!("{shape} correct"), &got, &w, 0.0, 0.0);
                let got: Vec<f32> = ctx.read_async(Slice::new(&grad, 0, rows * classes)).await?;
                let w: Vec<f64> = want.iter().flat_map(|w| w.2.clone()).collect();
                c.close(format!("{shape} gradient"), &got, &w, 1e-6, 1e-5);
            }
            Ok(())
        })
    },
};

pub const ADAM: Check = Check {
    name: "adam",
    files: &["adam", "step"],
    run: |c| {
        Box::pin(async move {
            let ctx = c.ctx;
            for n in [4, 1036] {
                let init = random(n, 21);
                let params = ctx.buffer_from("p", &init)?;
                let (m, v) = (ctx.zeros("m", n)?, ctx.zeros("v", n)?);
                let grads = ctx.zeros("g", n)?;
                let step_buf = ctx.uniform("step", &StepParams::default());
                let w = Slice::whole;
                let op = adam(ctx, n, w(&params), w(&grads), w(&m), w(&v), &step_buf)?;
                let mut p64 = to64(&init);
                let (mut m64, mut v64) = (vec![0f64; n], vec![0f64; n]);
                for t in 1..=3 {
                    let g = random(n, 30 + t);
                    ctx.queue.write_buffer(&grads, 0, bytemuck::cast_slice(&g));
                    let mut step = StepParams::default();
                    set_adam_step(&mut step, 0.01, t);
                    ctx.queue
                        .write_buffer(&step_buf, 0, bytemuck::bytes_of(&step));
                    ctx.submit([&op]);
                    adam_reference(&mut p64, &g, &mut m64, &mut v64, 0.01, t as i32);
                }
                let got: Vec<f32> = ctx.read_async(Slice::new(&params, 0, n)).await?;
                c.close(format!("{n} parameters, 3 steps"), &got, &p64, 1e-6, 1e-5);
            }
            Ok(())
        })
    },
};

pub const CONV_AND_POOL: Check = Check {
    name: "conv_and_pool",
    files: &["conv"],
    run: |c| Box::pin(conv_and_pool(c)),
};

async fn conv_and_pool(c: &mut Checker<'_>) -> Result<()> {
    let ctx = c.ctx;
    // Odd height and width: pooling drops the last row and column.
    let s = Nhwc::new(3, 5, 7, 3);
    let x = random(s.len(), 21);
    let x64 = to64(&x);
    let run = async |op,
                     src: &[f32],
                     out_len: usize,
                     argmax: Option<&wgpu::Buffer>,
                     mask: Option<&wgpu::Buffer>|
           -> Result<Vec<f32>> {
        let gsrc = ctx.buffer_from("src", src)?;
        let dst = ctx.zeros("dst", out_len)?;
        let args = ConvArgs {
            argmax: argmax.map(Slice::whole),
            mask: mask.map(Slice::whole),
            ..ConvArgs::new(Slice::whole(&gsrc), Slice::whole(&dst))
        };
        ctx.submit([&conv_op(ctx, op, s, &args)?]);
        ctx.read_async::<f32>(Slice::new(&dst, 0, out_len)).await
    };
    // Element i of the [cols][rows] copy of a [rows][cols] matrix.
    let transposed = |m: &[f64], rows: usize, cols: usize| -> Vec<f64> {
        (0..rows * cols)
            .map(|i| m[(i % rows) * cols + i / rows])
            .collect()
    };

    c.variant("im2col");
    let cols = run(ConvOp::Im2col, &x, s.len() * 9, None, None).await?;
    let want_cols = im2col_reference(&x64, s);
    c.close("3x5x7x3", &cols, &want_cols, 0.0, 0.0);
    // The transposed copy alone, [9·C][positions].
    let gsrc = ctx.buffer_from("src", &x)?;
    let cols_t = ctx.zeros("cols_t", s.len() * 9)?;
    let args = ConvArgs {
        dst: None,
        dst_t: Some(Slice::whole(&cols_t)),
        ..ConvArgs::new(Slice::whole(&gsrc), Slice::whole(&cols_t))
    };
    ctx.submit([&conv_op(ctx, ConvOp::Im2col, s, &args)?]);
    let got: Vec<f32> = ctx.read_async(Slice::whole(&cols_t)).await?;
    let (rows, width) = (s.len() / s.channels as usize, 9 * s.channels as usize);
    let want = transposed(&want_cols, rows, width);
    c.close("3x5x7x3 transposed", &got[..rows * width], &want, 0.0, 0.0);

    c.variant("col2im");
    let dcols = random(s.len() * 9, 22);
    let dx = run(ConvOp::Col2im, &dcols, s.len(), None, None).await?;
    let want = col2im_reference(&to64(&dcols), s);
    c.close("3x5x7x3", &dx, &want, 1e-6, 1e-6);
    // col2im is the adjoint of im2col: <im2col(x), d> = <x, col2im(d)>.
    let lhs: f64 = want_cols
        .iter()
        .zip(&dcols)
        .map(|(a, &b)| a * b as f64)
        .sum();
    let rhs: f64 = x64.iter().zip(&want).map(|(a, b)| a * b).sum();
    c.require(
        "the references are adjoint",
        (lhs - rhs).abs() < 1e-9,
        || format!("<im2col(x), d> = {lhs}, <x, col2im(d)> = {rhs}"),
    );

    c.variant("max_pool");
    let p = s.pooled();
    let argmax = ctx.zeros("argmax", p.len())?;
    let pooled = run(ConvOp::MaxPool, &x, p.len(), Some(&argmax), None).await?;
    let (want, want_arg) = max_pool_reference(&x64, s);
    c.close("3x5x7x3", &pooled, &want, 0.0, 0.0);
    let got_arg = ctx.read_async::<u32>(Slice::whole(&argmax)).await?;
    c.equal("3x5x7x3 argmax", &got_arg[..p.len()], &want_arg);

    c.variant("max_pool_grad");
    // The ReLU mask: where the pre-pool value is not positive, no gradient.
    let mask = ctx.buffer_from("mask", &x)?;
    let dpool = random(p.len(), 23);
    let grad = run(
        ConvOp::MaxPoolGrad,
        &dpool,
        s.len(),
        Some(&argmax),
        Some(&mask),
    )
    .await?;
    let want = max_pool_grad_reference(&to64(&dpool), &want_arg, &x64, s);
    c.close("3x5x7x3", &grad, &want, 0.0, 0.0);
    let nonzero = want.iter().filter(|&&g| g != 0.0).count();
    c.require(
        "most windows pass a gradient",
        nonzero > p.len() / 4,
        || format!("only {nonzero} non-zero gradients"),
    );
    // With its transposed copy, [C][positions].
    let gdpool = ctx.buffer_from("dpool", &dpool)?;
    let (rows_g, grad_t) = (ctx.zeros("g", s.len())?, ctx.zeros("gt", s.len())?);
    let args = ConvArgs {
        argmax: Some(Slice::whole(&argmax)),
        mask: Some(Slice::whole(&mask)),
        dst_t: Some(Slice::whole(&grad_t)),
        ..ConvArgs::new(Slice::whole(&gdpool), Slice::whole(&rows_g))
    };
    ctx.submit([&conv_op(ctx, ConvOp::MaxPoolGrad, s, &args)?]);
    let got: Vec<f32> = ctx.read_async(Slice::whole(&grad_t)).await?;
    let (n, ch) = (s.len() / s.channels as usize, s.channels as usize);
    c.close(
        "3x5x7x3 transposed",
        &got[..n * ch],
        &transposed(&want, n, ch),
        0.0,
        0.0,
    );

    c.variant("global_max");
    let g = (s.batch * s.channels) as usize;
    let gargmax = ctx.zeros("gargmax", g)?;
    let gmax = run(ConvOp::GlobalMax, &x, g, Some(&gargmax), None).await?;
    let (want, want_arg) = global_max_reference(&x64, s);
    c.close("3x5x7x3", &gmax, &want, 0.0, 0.0);
    c.variant("global_max_grad");
    let dg = random(g, 24);
    let grad = run(ConvOp::GlobalMaxGrad, &dg, s.len(), Some(&gargmax), None).await?;
    let want = global_max_grad_reference(&to64(&dg), &want_arg, s);
    c.close("3x5x7x3", &grad, &want, 0.0, 0.0);
    Ok(())
}

pub const GATE: Check = Check {
    name: "gate",
    files: &["gate"],
    run: |c| {
        Box::pin(async move {
            let ctx = c.ctx;
            for (rows, dim) in [(13, 70), (1, 3)] {
                let a = random(rows * dim, 31);
                let scores: Vec<f32> = random(dim, 32).iter().map(|v| 3.0 * v).collect();
                let dz = random(rows * dim, 33);
                let ga = ctx.buffer_from("a", &a)?;
                let gs = ctx.buffer_from("scores", &scores)?;
                let gdz = ctx.buffer_from("dz", &dz)?;
                let z = ctx.zeros("z", rows * dim)?;
                let ds = ctx.zeros("ds", dim)?;
                let w = Slice::whole;
                let ops = [
                    gate(ctx, rows, dim, w(&ga), w(&gs), w(&z))?,
                    gate_grad(ctx, rows, dim, w(&ga), w(&gs), w(&gdz), w(&ds))?,
                ];
                ctx.submit(&ops);
                let shape = format!("{rows}x{dim}");
                c.variant("gate");
                let got: Vec<f32> = ctx.read_async(Slice::new(&z, 0, rows * dim)).await?;
                c.close(
                    &shape,
                    &got,
                    &gate_reference(&to64(&a), &scores, dim),
                    1e-6,
                    1e-5,
                );
                c.variant("gate_grad");
                let got: Vec<f32> = ctx.read_async(Slice::new(&ds, 0, dim)).await?;
                let want = gate_grad_reference(&to64(&a), &scores, &to64(&dz), dim);
                c.close(&shape, &got, &want, 1e-5, 1e-4);
            }
            Ok(())
        })
    },
};

/// Runs the batch kernel for `indices` in `epoch`, augmented and poisoned as asked: the
/// batch rows, their labels, and whether the transposed copy it writes beside them is
/// exact.
pub async fn gather_on_gpu(
    ctx: &GpuContext,
    data: &GpuDataset,
    indices: &[u32],
    (augment, backdoor): (Option<&Augment>, Option<&Backdoor>),
    (seed, epoch): (u32, u32),
) -> Result<(Vec<f32>, Vec<u32>, bool)> {
    let rows = indices.len();
    let dim = data.sample_dim();
    let idx = ctx.buffer_from("idx", indices)?;
    let (x, y) = (ctx.zeros("x", rows * dim)?, ctx.zeros("y", rows)?);
    let xt = ctx.zeros("xt", rows * dim)?;
    let step = ctx.uniform(
        "step",
        &StepParams {
            epoch,
            ..Default::default()
        },
    );
    let poison = backdoor
        .map(|b| b.poison(data.height, data.width, data.num_classes))
        .transpose()?;
    let gather = Gather {
        data,
        rows,
        indices: Slice::whole(&idx),
        augment: augment.copied(),
        poison,
        seed,
        step: &step,
    };
    let outputs = BatchOutputs {
        x: Slice::whole(&x),
        xt: Some(Slice::whole(&xt)),
        labels: Slice::whole(&y),
    };
    ctx.submit([&gather_batch(ctx, &gather, &outputs)?]);
    let x: Vec<f32> = ctx.read_async(Slice::new(&x, 0, rows * dim)).await?;
    let xt: Vec<f32> = ctx.read_async(Slice::new(&xt, 0, rows * dim)).await?;
    let transposed = (0..rows * dim).all(|i| xt[(i % dim) * rows + i / dim] == x[i]);
    Ok((
        x,
        ctx.read_async(Slice::new(&y, 0, rows)).await?,
        transposed,
    ))
}

pub const GATHER: Check = Check {
    name: "gather",
    files: &["batch", "rng", "step"],
    run: |c| {
        Box::pin(async move {
            let data = Dataset::synthetic(53, 9, 7, 5);
            let gdata = GpuDataset::upload(c.ctx, &data.as_images())?;
            let indices: Vec<u32> = (0..37).map(|i| (i * 17) % 53).collect();
            let noise = |clip| Backdoor {
                trigger: Trigger::Noise { std: 0.3, clip },
                p_backdoor: 0.5,
                target_class: 1,
            };
            let corner = Backdoor {
                trigger: Trigger::Corner {
                    corner: Corner::BottomLeft,
                },
                p_backdoor: 0.5,
                target_class: 3,
            };
            let wanet = |warping_strength, grid_rescale, p_noise| Backdoor {
                trigger: Trigger::Wanet {
                    control_grid_width: 4,
                    warping_strength,
                    grid_rescale,
                    p_noise,
                    grid_seed: 11,
                },
                p_backdoor: 0.4,
                target_class: 2,
            };
            let triggers = [
                None,
                Some(corner),
                Some(noise(true)),
                Some(noise(false)),
                Some(wanet(0.5, 1.0, 0.0)),
                // Noise mode (jittered warps that keep their label) and a rescaled field.
                Some(wanet(0.5, 0.9, 0.3)),
                // A strong field: samples far from their pixel, clipped at the borders.
                Some(wanet(8.0, 1.0, 0.2)),
            ];
            for backdoor in triggers {
                let name = backdoor.map_or("clean".to_string(), |b| match b.trigger {
                    Trigger::Wanet {
                        warping_strength: s,
                        grid_rescale: r,
                        p_noise: n,
                        ..
                    } => format!("Wanet {{ strength: {s}, rescale: {r}, p_noise: {n} }}"),
                    t => format!("{t:?}"),
                });
                c.variant(&name);
                let x = check_gather(c, &data, &gdata, &indices, backdoor.as_ref()).await?;
                if let Some(Trigger::Wanet { .. }) = backdoor.map(|b| b.trigger) {
                    let (clean, _) = batch_reference(&data, &indices, None, (7, 2));
                    let moved = x
                        .iter()
                        .zip(&clean)
                        .any(|(&a, b)| (a as f64 - b).abs() > 0.05);
                    c.require("the warp moves pixels", moved, || {
                        "the batch is the clean one".into()
                    });
                }
                // Unclipped noise leaves [0, 1] somewhere; clipped never does.
                if let Some(Trigger::Noise { clip, .. }) = backdoor.map(|b| b.trigger) {
                    let inside = x.iter().all(|&v| (0.0..=1.0).contains(&v));
                    c.require("range", inside == clip, || {
                        format!("clip {clip}, but all pixels in [0, 1] is {inside}")
                    });
                }
            }
            // A zero field warps nothing: every pixel samples itself.
            c.variant("Wanet identity (strength 0)");
            let identity = Backdoor {
                p_backdoor: 1.0,
                ..wanet(0.0, 1.0, 0.0)
            };
            let (x, y, _) =
                gather_on_gpu(c.ctx, &gdata, &indices, (None, Some(&identity)), (7, 2)).await?;
            let (clean, _) = batch_reference(&data, &indices, None, (7, 2));
            c.close(
                "37 of 53 9x7 images vs the clean batch",
                &x,
                &clean,
                1e-6,
                0.0,
            );
            c.require("all relabelled", y.iter().all(|&l| l == 2), || {
                format!("labels {y:?}")
            });
            // Images of whole words of pixels (8x7) are read a word per load.
            let words = Dataset::synthetic(53, 8, 7, 6);
            let gwords = GpuDataset::upload(c.ctx, &words.as_images())?;
            let cases = [
                ("clean", None),
                ("corner", Some(corner)),
                ("noise", Some(noise(true))),
            ];
            for (name, backdoor) in cases {
                c.variant(format!("8x7 images, {name}"));
                check_gather(c, &words, &gwords, &indices, backdoor.as_ref()).await?;
            }
            gather_augmented(c, &data, &gdata, &indices, &[corner, wanet(1.0, 1.0, 0.0)]).await
        })
    },
};

/// The batch kernel's rows, labels and transposed copy for `indices` (seed 7, epoch 2)
/// against the reference; returns the rows.
async fn check_gather(
    c: &mut Checker<'_>,
    data: &Dataset,
    gdata: &GpuDataset,
    indices: &[u32],
    backdoor: Option<&Backdoor>,
) -> Result<Vec<f32>> {
    let (x, y, transposed) = gather_on_gpu(c.ctx, gdata, indices, (None, backdoor), (7, 2)).await?;
    let (want_x, want_y) = batch_reference(data, indices, backdoor, (7, 2));
    let case = format!(
        "{} of {} {}x{} images",
        indices.len(),
        data.len(),
        data.height,
        data.width
    );
    c.close(case, &x, &want_x, 1e-5, 1e-5);
    c.equal("labels", &y, &want_y);
    c.require("transposed copy", transposed, || {
        "differs from the rows".into()
    });
    Ok(x)
}

/// Augmentations alone and before triggers, against the reference. Rotated pixels whose
/// source coordinate is within 1e-3 of a rounding tie may pick either neighbour in f32:
/// those are left out of the comparison (and must be rare).
async fn gather_augmented(
    c: &mut Checker<'_>,
    data: &Dataset,
    gdata: &GpuDataset,
    indices: &[u32],
    triggers: &[Backdoor],
) -> Result<()> {
    let only = |crop_p, rotation_p, flip_p| Augment {
        crop_p,
        padding: 2,
        rotation_p,
        degrees: 25.0,
        flip_p,
    };
    let cases = [
        ("crop", only(1.0, 0.0, 0.0), None),
        ("rotation", only(0.0, 1.0, 0.0), None),
        ("flip", only(0.0, 0.0, 1.0), None),
        (
            "crop 0.6, rotation 0.5, flip 0.5",
            only(0.6, 0.5, 0.5),
            None,
        ),
        ("all, corner", only(0.6, 0.5, 0.5), Some(triggers[0])),
        // WaNet samples between pixels: without rotation there are no ties.
        (
            "crop and flip, WaNet",
            only(0.6, 0.0, 0.5),
            Some(triggers[1]),
        ),
    ];
    for (name, aug, backdoor) in cases {
        c.variant(format!("augment: {name}"));
        let (x, y, transposed) = gather_on_gpu(
            c.ctx,
            gdata,
            indices,
            (Some(&aug), backdoor.as_ref()),
            (7, 2),
        )
        .await?;
        let (want, want_y, ambiguous) =
            augmented_batch_reference(data, indices, Some(&aug), backdoor.as_ref(), (7, 2));
        let unsure = ambiguous.iter().filter(|&&a| a).count();
        let keep = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .zip(&ambiguous)
                .filter(|(_, &a)| !a)
                .map(|(&v, _)| v)
                .collect()
        };
        let want_kept: Vec<f64> = want
            .iter()
            .zip(&ambiguous)
            .filter(|(_, &a)| !a)
            .map(|(&v, _)| v)
            .collect();
        let case = format!("37 of 53 9x7 images ({unsure} tie pixels left out)");
        c.close(case, &keep(&x), &want_kept, 1e-5, 1e-5);
        c.require("ties are rare", unsure * 100 <= x.len(), || {
            format!("{unsure} of {} elements", x.len())
        });
        c.equal("labels", &y, &want_y);
        c.require("transposed copy", transposed, || {
            "differs from the rows".into()
        });
        let (clean, _) = batch_reference(data, indices, None, (7, 2));
        let moved = x
            .iter()
            .zip(&clean)
            .any(|(&a, b)| (a as f64 - b).abs() > 0.05);
        c.require("the augmentation moves pixels", moved, || {
            "the batch is the clean one".into()
        });
    }
    Ok(())
}
