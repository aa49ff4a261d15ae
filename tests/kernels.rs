//! Every kernel against its f64 CPU reference, on odd, non-tile-aligned shapes.

mod common;

use common::{assert_close, gpu, random};
use cupbearer::gpu::adam::{adam, adam_reference, set_adam_step};
use cupbearer::gpu::loss::{softmax_cross_entropy, softmax_cross_entropy_reference, LossOutputs};
use cupbearer::gpu::matmul::{
    matmul, matmul_reference, HostMatmul, MatmulArgs, MatmulFlags, Schedule,
};
use cupbearer::gpu::reduce::{column_sums, column_sums_reference};
use cupbearer::gpu::{GpuContext, Slice, StepParams};

// Odd shapes, and shapes with M and N multiples of 4 (the whole-vec4 load paths); the
// last two span several 16x16 blocks in both directions.
const SHAPES: [(usize, usize, usize); 8] = [
    (1, 1, 1),
    (37, 29, 53),
    (130, 70, 33),
    (5, 3, 0),
    (36, 28, 53),
    (132, 44, 7),
    (67, 131, 19),
    (132, 136, 9),
];
const SCHEDULES: [Schedule; 3] = [
    Schedule::RegisterBlocked { bm: 16, bn4: 4 },
    Schedule::RegisterBlocked { bm: 4, bn4: 1 },
    Schedule::Tiled,
];

fn check_matmul(
    ctx: &GpuContext,
    flags: MatmulFlags,
    schedule: Schedule,
    (m, n, k): (usize, usize, usize),
) {
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
    let buf = |name: &str, v: &[f32]| ctx.buffer_from(name, v).unwrap();
    let (ga, gb, gbias, gmask) = (
        buf("a", &a),
        buf("b", &b),
        buf("bias", &bias),
        buf("mask", &mask),
    );
    let c = ctx.zeros("c", m * n).unwrap();
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
            c: Slice::whole(&c),
            bias: flags.bias.then(|| Slice::whole(&gbias)),
            mask: flags.relu_mask.then(|| Slice::whole(&gmask)),
        },
    )
    .unwrap();
    ctx.submit([&op]);
    let got: Vec<f32> = ctx.read(Slice::new(&c, 0, m * n)).unwrap();
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
    let what = format!("{schedule:?} {flags:?} {m}x{n}x{k}");
    assert_close(&got, &want, 1e-5, 1e-5, &what);
}

#[test]
fn matmul_layouts_match_reference() {
    let Some(ctx) = gpu() else { return };
    for schedule in SCHEDULES {
        for shape in SHAPES {
            for (a_kmajor, b_nmajor) in [(false, false), (true, false), (false, true), (true, true)]
            {
                let flags = MatmulFlags {
                    a_kmajor,
                    b_nmajor,
                    ..Default::default()
                };
                check_matmul(&ctx, flags, schedule, shape);
            }
        }
    }
}

#[test]
fn matmul_epilogues_match_reference() {
    let Some(ctx) = gpu() else { return };
    let epilogues = [
        MatmulFlags {
            bias: true,
            ..Default::default()
        },
        MatmulFlags {
            bias: true,
            relu: true,
            a_kmajor: true,
            ..Default::default()
        },
        MatmulFlags {
            relu_mask: true,
            b_nmajor: true,
            ..Default::default()
        },
        MatmulFlags {
            skip_zero_a: true,
            a_kmajor: true,
            ..Default::default()
        },
        MatmulFlags {
            skip_zero_a: true,
            bias: true,
            relu: true,
            ..Default::default()
        },
        MatmulFlags {
            bias: true,
            relu: true,
            b_nmajor: true,
            ..Default::default()
        },
    ];
    for schedule in SCHEDULES {
        for shape in SHAPES {
            for flags in epilogues {
                check_matmul(&ctx, flags, schedule, shape);
            }
        }
    }
}

#[test]
fn matmul_rejects_short_operands() {
    let Some(ctx) = gpu() else { return };
    let small = ctx.zeros("small", 4).unwrap();
    let err = matmul(
        &ctx,
        MatmulFlags::default(),
        Schedule::for_context(&ctx),
        &MatmulArgs {
            m: 3,
            n: 3,
            k: 3,
            a: Slice::new(&small, 0, 4),
            b: Slice::new(&small, 0, 4),
            c: Slice::new(&small, 0, 4),
            bias: None,
            mask: None,
        },
    )
    .err()
    .expect("a 3x3 multiply on 4-element buffers must be refused");
    assert!(
        err.to_string()
            .contains("operand a has 4 elements, needs 9"),
        "{err}"
    );
}

#[test]
fn column_sums_match_reference() {
    let Some(ctx) = gpu() else { return };
    for (rows, cols) in [(1, 1), (37, 29), (130, 70), (3, 200)] {
        let x = random(rows * cols, 7);
        let input = ctx.buffer_from("x", &x).unwrap();
        let sums = ctx.zeros("sums", cols).unwrap();
        let op = column_sums(
            &ctx,
            rows,
            cols,
            0.5,
            Slice::whole(&input),
            Slice::whole(&sums),
        )
        .unwrap();
        ctx.submit([&op]);
        let got: Vec<f32> = ctx.read(Slice::new(&sums, 0, cols)).unwrap();
        let want: Vec<f64> = column_sums_reference(rows, cols, &x)
            .iter()
            .map(|s| 0.5 * s)
            .collect();
        assert_close(&got, &want, 1e-5, 1e-5, "column sums");
    }
}

#[test]
fn softmax_cross_entropy_matches_reference() {
    let Some(ctx) = gpu() else { return };
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
            ctx.buffer_from("l", &logits).unwrap(),
            ctx.buffer_from("y", &labels).unwrap(),
        );
        let grad = ctx.zeros("grad", rows * classes).unwrap();
        let loss = ctx.zeros("loss", offset + rows).unwrap();
        let correct = ctx.zeros("correct", offset + rows).unwrap();
        let op = softmax_cross_entropy(
            &ctx,
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
        )
        .unwrap();
        ctx.submit([&op]);
        let want = softmax_cross_entropy_reference(classes, &logits, &labels);
        let got_loss: Vec<f32> = ctx.read(Slice::new(&loss, offset, rows)).unwrap();
        let got_correct: Vec<f32> = ctx.read(Slice::new(&correct, offset, rows)).unwrap();
        let got_grad: Vec<f32> = ctx.read(Slice::new(&grad, 0, rows * classes)).unwrap();
        let want_loss: Vec<f64> = want.iter().map(|w| w.0).collect();
        let want_correct: Vec<f64> = want.iter().map(|w| w.1 as u8 as f64).collect();
        let want_grad: Vec<f64> = want.iter().flat_map(|w| w.2.clone()).collect();
        assert_close(&got_loss, &want_loss, 1e-5, 1e-5, "loss");
        assert_close(&got_correct, &want_correct, 0.0, 0.0, "correct");
        assert_close(&got_grad, &want_grad, 1e-6, 1e-5, "grad");
    }
}

#[test]
fn adam_matches_reference_over_steps() {
    let Some(ctx) = gpu() else { return };
    let n = 1036;
    let init = random(n, 21);
    let params = ctx.buffer_from("p", &init).unwrap();
    let (m, v) = (ctx.zeros("m", n).unwrap(), ctx.zeros("v", n).unwrap());
    let grads_buf = ctx.zeros("g", n).unwrap();
    let step_buf = ctx.uniform("step", &StepParams::default());
    let op = adam(
        &ctx,
        n,
        Slice::whole(&params),
        Slice::whole(&grads_buf),
        Slice::whole(&m),
        Slice::whole(&v),
        &step_buf,
    )
    .unwrap();
    let mut p64: Vec<f64> = init.iter().map(|&x| x as f64).collect();
    let (mut m64, mut v64) = (vec![0f64; n], vec![0f64; n]);
    for t in 1..=3 {
        let g = random(n, 30 + t);
        ctx.queue
            .write_buffer(&grads_buf, 0, bytemuck::cast_slice(&g));
        let mut step = StepParams::default();
        set_adam_step(&mut step, 0.01, t);
        ctx.queue
            .write_buffer(&step_buf, 0, bytemuck::bytes_of(&step));
        ctx.submit([&op]);
        adam_reference(&mut p64, &g, &mut m64, &mut v64, 0.01, t as i32);
    }
    let got: Vec<f32> = ctx.read(Slice::new(&params, 0, n)).unwrap();
    assert_close(&got, &p64, 1e-6, 1e-5, "adam params");
}

/// One Adam update of 8 parameters from 1.0 with gradient 1 in `ctx`: the new values.
fn adam_once(ctx: &GpuContext) -> anyhow::Result<Vec<f32>> {
    let params = ctx.buffer_from("p", &[1.0f32; 8])?;
    let grads = ctx.buffer_from("g", &[1.0f32; 8])?;
    let (m, v) = (ctx.zeros("m", 8)?, ctx.zeros("v", 8)?);
    let mut step = StepParams::default();
    set_adam_step(&mut step, 0.1, 1);
    let step = ctx.uniform("step", &step);
    let whole = Slice::whole;
    let op = adam(
        ctx,
        8,
        whole(&params),
        whole(&grads),
        whole(&m),
        whole(&v),
        &step,
    )?;
    ctx.submit([&op]);
    ctx.read(Slice::new(&params, 0, 8))
}

#[test]
fn kernel_files_can_be_overridden_and_bad_ones_are_clear_errors() {
    use cupbearer::gpu::shaders::{Shaders, BUILTIN};
    if gpu().is_none() {
        return;
    }
    let builtin_adam = BUILTIN.iter().find(|(n, _)| *n == "adam").unwrap().1;
    let with = |files: &[(&str, String)]| -> anyhow::Result<GpuContext> {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        GpuContext::with_shaders(Shaders::from_dir(dir.path())?)
    };
    let base = adam_once(&with(&[]).unwrap()).unwrap();
    assert!((base[0] - 0.9).abs() < 1e-5, "{base:?}");
    // An edited file runs instead of the built-in one (here: twice the step) and is
    // reported with its SHA-256.
    let doubled = builtin_adam.replace(
        "params[i] -= step.learning_rate",
        "params[i] -= 2.0 * step.learning_rate",
    );
    assert_ne!(doubled, builtin_adam);
    let ctx = with(&[("adam.wgsl", doubled)]).unwrap();
    let got = adam_once(&ctx).unwrap();
    assert!((got[0] - 0.8).abs() < 1e-5, "{got:?}");
    let o = ctx.shaders.overrides();
    assert_eq!(
        (o.len(), o[0].kernel.as_str(), o[0].sha256.len()),
        (1, "adam", 64)
    );

    // A syntax error: the override's own path, line and column, and the source line.
    let broken = builtin_adam.replace("let m_hat", "let m_hat = = ");
    let err = adam_once(&with(&[("adam.wgsl", broken)]).unwrap()).unwrap_err();
    let msg = format!("{err:#}");
    let line = builtin_adam
        .lines()
        .position(|l| l.contains("let m_hat"))
        .unwrap()
        + 1;
    assert!(msg.contains(&format!("adam.wgsl:{line}:")), "{msg}");
    assert!(msg.contains("let m_hat = = "), "{msg}");
    // A validation error (a type mismatch), also located.
    let mistyped = builtin_adam.replace("let g = grads[i];", "let g = grads[i] + 1u;");
    let msg = format!(
        "{:#}",
        adam_once(&with(&[("adam.wgsl", mistyped)]).unwrap()).unwrap_err()
    );
    assert!(msg.contains("adam.wgsl:"), "{msg}");
    // A missing entry point.
    let renamed = builtin_adam.replace("fn main(", "fn main2(");
    let msg = format!(
        "{:#}",
        adam_once(&with(&[("adam.wgsl", renamed)]).unwrap()).unwrap_err()
    );
    assert!(msg.contains("no entry point `main`"), "{msg}");
    // A file that names no kernel file.
    let err = with(&[("adamw.wgsl", String::new())]).err().unwrap();
    assert!(
        format!("{err:#}").contains("no kernel file is called adamw.wgsl"),
        "{err:#}"
    );
    // Errors leave the device usable.
    let ctx = with(&[]).unwrap();
    ctx.check().unwrap();
}

#[test]
fn attack_start_and_update_match_reference() {
    use cupbearer::gpu::attack::{
        attack_ops, attack_start_reference, attack_update_reference, AttackBuffers, AttackStep,
    };
    let Some(ctx) = gpu() else { return };
    let (rows, dim) = (7, 13);
    // Pixels in [0, 1], some at the bounds; gradients with exact zeros.
    let x: Vec<f32> = random(rows * dim, 5)
        .iter()
        .map(|v| (v * 0.8 + 0.5).clamp(0.0, 1.0))
        .collect();
    let grad: Vec<f32> = random(rows * dim, 6)
        .iter()
        .enumerate()
        .map(|(i, &g)| if i % 5 == 0 { 0.0 } else { g })
        .collect();
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for random_start in [false, true] {
        let a = AttackStep {
            eps: 0.1,
            step_size: 0.07,
            random_start,
            seed: 9,
        };
        let gx = ctx.buffer_from("x", &x).unwrap();
        let gxt = ctx.zeros("xt", rows * dim).unwrap();
        let gx0 = ctx.zeros("x0", rows * dim).unwrap();
        let gg = ctx.buffer_from("grad", &grad).unwrap();
        let batch_offset = 40;
        let step = ctx.uniform(
            "step",
            &StepParams {
                batch_offset,
                ..Default::default()
            },
        );
        let ops = attack_ops(
            &ctx,
            rows,
            dim,
            &a,
            &AttackBuffers {
                x: Slice::whole(&gx),
                xt: Some(Slice::whole(&gxt)),
                x0: Slice::whole(&gx0),
                grad: Slice::whole(&gg),
            },
            &step,
        )
        .unwrap();
        // Two steps: the second must be projected back into the eps ball.
        ctx.submit([&ops.start, &ops.update, &ops.update]);
        let mut want = attack_start_reference(&x64, dim, batch_offset, &a);
        for _ in 0..2 {
            want = attack_update_reference(&want, &x64, &grad, &a);
        }
        let what = format!("random_start {random_start}");
        let got: Vec<f32> = ctx.read(Slice::whole(&gx)).unwrap();
        assert_close(&got, &want, 1e-6, 0.0, &what);
        let got_t: Vec<f32> = ctx.read(Slice::whole(&gxt)).unwrap();
        let want_t: Vec<f64> = (0..rows * dim)
            .map(|i| want[(i % rows) * dim + i / rows])
            .collect();
        assert_close(&got_t, &want_t, 1e-6, 0.0, &format!("{what} transposed"));
        let got0: Vec<f32> = ctx.read(Slice::whole(&gx0)).unwrap();
        assert_close(&got0, &x64, 0.0, 0.0, &format!("{what} x0"));
        for (i, (&g, &v0)) in got.iter().zip(&x).enumerate() {
            assert!(
                (g - v0).abs() <= a.eps + 1e-6,
                "{what}: element {i} left the ball"
            );
        }
    }
}

#[test]
fn abstraction_losses_match_reference() {
    use cupbearer::gpu::abstraction::{
        cosine_distance, cosine_distance_reference, kl_divergence, kl_divergence_reference,
        LossArgs, LossGrads,
    };
    let Some(ctx) = gpu() else { return };
    let (rows, dim, offset) = (11, 13, 5);
    let mut pred = random(rows * dim, 7);
    let mut reference = random(rows * dim, 8);
    // A zero prediction and a zero reference row: the eps branches.
    pred[2 * dim..3 * dim].fill(0.0);
    reference[4 * dim..5 * dim].fill(0.0);
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let step = ctx.uniform(
        "step",
        &StepParams {
            batch_offset: offset as u32,
            ..Default::default()
        },
    );
    let scale = 0.37;
    for relu in [false, true] {
        let gp = ctx.buffer_from("pred", &pred).unwrap();
        let gr = ctx.buffer_from("reference", &reference).unwrap();
        let loss = ctx.zeros("loss", offset + rows).unwrap();
        let grad_pred = ctx.zeros("grad_pred", rows * dim).unwrap();
        // The reference gradient is accumulated onto what is there.
        let prior = random(rows * dim, 9);
        let grad_ref = ctx.buffer_from("grad_ref", &prior).unwrap();
        let grads = LossGrads {
            pred: Slice::whole(&grad_pred),
            reference: Some(Slice::whole(&grad_ref)),
            scale,
        };
        let args = LossArgs {
            rows,
            pred: Slice::whole(&gp),
            reference: Slice::whole(&gr),
            loss: Slice::whole(&loss),
            grads: Some(&grads),
            step: &step,
        };
        let op = cosine_distance(&ctx, dim, relu, &args).unwrap();
        ctx.submit([&op]);
        let (l, ga, gb) =
            cosine_distance_reference(&to64(&pred), &to64(&reference), dim, relu, scale as f64);
        let what = format!("cosine relu {relu}");
        let got: Vec<f32> = ctx.read(Slice::new(&loss, offset, rows)).unwrap();
        assert_close(&got, &l, 1e-5, 1e-5, &what);
        let got: Vec<f32> = ctx.read(Slice::whole(&grad_pred)).unwrap();
        assert_close(&got, &ga, 1e-5, 1e-4, &format!("{what} grad pred"));
        let got: Vec<f32> = ctx.read(Slice::whole(&grad_ref)).unwrap();
        let want: Vec<f64> = gb.iter().zip(&prior).map(|(g, &p)| g + p as f64).collect();
        assert_close(&got, &want, 1e-5, 1e-4, &format!("{what} grad reference"));
    }

    let classes = 7;
    let logits = random(rows * classes, 10)
        .iter()
        .map(|v| 4.0 * v)
        .collect::<Vec<f32>>();
    for single_class in [false, true] {
        let pred_dim = if single_class { 2 } else { classes };
        let pred = random(rows * pred_dim, 11);
        let gp = ctx.buffer_from("pred", &pred).unwrap();
        let gl = ctx.buffer_from("logits", &logits).unwrap();
        let loss = ctx.zeros("loss", offset + rows).unwrap();
        let grad = ctx.zeros("grad", rows * pred_dim).unwrap();
        let grads = LossGrads {
            pred: Slice::whole(&grad),
            reference: None,
            scale,
        };
        let args = LossArgs {
            rows,
            pred: Slice::whole(&gp),
            reference: Slice::whole(&gl),
            loss: Slice::whole(&loss),
            grads: Some(&grads),
            step: &step,
        };
        let op = kl_divergence(&ctx, classes, single_class, &args).unwrap();
        ctx.submit([&op]);
        let (l, g) = kl_divergence_reference(
            &to64(&pred),
            &to64(&logits),
            classes,
            single_class,
            scale as f64,
        );
        let what = format!("kl single_class {single_class}");
        let got: Vec<f32> = ctx.read(Slice::new(&loss, offset, rows)).unwrap();
        assert_close(&got, &l, 1e-5, 1e-4, &what);
        assert!(
            l.iter().all(|&v| v > 0.0),
            "{what}: KL of different distributions"
        );
        let got: Vec<f32> = ctx.read(Slice::whole(&grad)).unwrap();
        assert_close(&got, &g, 1e-6, 1e-4, &format!("{what} grad"));
    }
}

#[test]
fn conv_and_pool_kernels_match_reference() {
    use cupbearer::gpu::conv::{
        col2im_reference, conv_op, global_max_grad_reference, global_max_reference,
        im2col_reference, max_pool_grad_reference, max_pool_reference, ConvArgs, ConvOp, Nhwc,
    };
    let Some(ctx) = gpu() else { return };
    // Odd height and width: pooling drops the last row and column.
    let s = Nhwc::new(3, 5, 7, 3);
    let x = random(s.len(), 21);
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let run = |op,
               src: &[f32],
               out_len: usize,
               argmax: Option<&wgpu::Buffer>,
               mask: Option<&wgpu::Buffer>| {
        let gsrc = ctx.buffer_from("src", src).unwrap();
        let dst = ctx.zeros("dst", out_len).unwrap();
        let args = ConvArgs {
            argmax: argmax.map(Slice::whole),
            mask: mask.map(Slice::whole),
            ..ConvArgs::new(Slice::whole(&gsrc), Slice::whole(&dst))
        };
        let d = conv_op(&ctx, op, s, &args).unwrap();
        ctx.submit([&d]);
        ctx.read::<f32>(Slice::new(&dst, 0, out_len)).unwrap()
    };
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();

    let cols = run(ConvOp::Im2col, &x, s.len() * 9, None, None);
    let want_cols = im2col_reference(&x64, s);
    assert_close(&cols, &want_cols, 0.0, 0.0, "im2col");
    // The transposed copy alone, [9·C][positions].
    let gsrc = ctx.buffer_from("src", &x).unwrap();
    let cols_t = ctx.zeros("cols_t", s.len() * 9).unwrap();
    let args = ConvArgs {
        dst: None,
        dst_t: Some(Slice::whole(&cols_t)),
        ..ConvArgs::new(Slice::whole(&gsrc), Slice::whole(&cols_t))
    };
    ctx.submit([&conv_op(&ctx, ConvOp::Im2col, s, &args).unwrap()]);
    let got: Vec<f32> = ctx.read(Slice::whole(&cols_t)).unwrap();
    let (rows, width) = (s.len() / s.channels as usize, 9 * s.channels as usize);
    let want: Vec<f64> = (0..rows * width)
        .map(|i| want_cols[(i % rows) * width + i / rows])
        .collect();
    assert_close(&got[..rows * width], &want, 0.0, 0.0, "im2col transposed");
    let dcols = random(s.len() * 9, 22);
    let dx = run(ConvOp::Col2im, &dcols, s.len(), None, None);
    let want = col2im_reference(&to64(&dcols), s);
    assert_close(&dx, &want, 1e-6, 1e-6, "col2im");
    // col2im is the adjoint of im2col: <im2col(x), d> = <x, col2im(d)>.
    let lhs: f64 = im2col_reference(&x64, s)
        .iter()
        .zip(&dcols)
        .map(|(a, &b)| a * b as f64)
        .sum();
    let rhs: f64 = x64.iter().zip(&want).map(|(a, b)| a * b).sum();
    assert!((lhs - rhs).abs() < 1e-9, "adjoint: {lhs} vs {rhs}");

    let p = s.pooled();
    let argmax = ctx.zeros("argmax", p.len()).unwrap();
    let pooled = run(ConvOp::MaxPool, &x, p.len(), Some(&argmax), None);
    let (want, want_arg) = max_pool_reference(&x64, s);
    assert_close(&pooled, &want, 0.0, 0.0, "max_pool");
    assert_eq!(
        ctx.read::<u32>(Slice::whole(&argmax)).unwrap()[..p.len()],
        want_arg[..]
    );
    // The ReLU mask: where the pre-pool value is not positive, no gradient.
    let mask = ctx.buffer_from("mask", &x).unwrap();
    let dpool = random(p.len(), 23);
    let grad = run(
        ConvOp::MaxPoolGrad,
        &dpool,
        s.len(),
        Some(&argmax),
        Some(&mask),
    );
    let want = max_pool_grad_reference(&to64(&dpool), &want_arg, &x64, s);
    assert_close(&grad, &want, 0.0, 0.0, "max_pool_grad");
    // With its transposed copy, [C][positions].
    let gdpool = ctx.buffer_from("dpool", &dpool).unwrap();
    let (rows_g, grad_t) = (
        ctx.zeros("g", s.len()).unwrap(),
        ctx.zeros("gt", s.len()).unwrap(),
    );
    let args = ConvArgs {
        argmax: Some(Slice::whole(&argmax)),
        mask: Some(Slice::whole(&mask)),
        dst_t: Some(Slice::whole(&grad_t)),
        ..ConvArgs::new(Slice::whole(&gdpool), Slice::whole(&rows_g))
    };
    ctx.submit([&conv_op(&ctx, ConvOp::MaxPoolGrad, s, &args).unwrap()]);
    let got: Vec<f32> = ctx.read(Slice::whole(&grad_t)).unwrap();
    let (n, c) = (s.len() / s.channels as usize, s.channels as usize);
    let want_t: Vec<f64> = (0..n * c).map(|i| want[(i % n) * c + i / n]).collect();
    assert_close(&got[..n * c], &want_t, 0.0, 0.0, "max_pool_grad transposed");
    assert!(want.iter().filter(|&&g| g != 0.0).count() > p.len() / 4);

    let g = (s.batch * s.channels) as usize;
    let gargmax = ctx.zeros("gargmax", g).unwrap();
    let gmax = run(ConvOp::GlobalMax, &x, g, Some(&gargmax), None);
    let (want, want_arg) = global_max_reference(&x64, s);
    assert_close(&gmax, &want, 0.0, 0.0, "global_max");
    let dg = random(g, 24);
    let grad = run(ConvOp::GlobalMaxGrad, &dg, s.len(), Some(&gargmax), None);
    assert_close(
        &grad,
        &global_max_grad_reference(&to64(&dg), &want_arg, s),
        0.0,
        0.0,
        "global_max_grad",
    );
}

#[test]
fn gate_matches_reference() {
    use cupbearer::gpu::gate::{gate, gate_grad, gate_grad_reference, gate_reference};
    let Some(ctx) = gpu() else { return };
    let (rows, dim) = (13, 70);
    let a = random(rows * dim, 31);
    let scores: Vec<f32> = random(dim, 32).iter().map(|v| 3.0 * v).collect();
    let dz = random(rows * dim, 33);
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let (ga, gs, gdz) = (
        ctx.buffer_from("a", &a).unwrap(),
        ctx.buffer_from("scores", &scores).unwrap(),
        ctx.buffer_from("dz", &dz).unwrap(),
    );
    let z = ctx.zeros("z", rows * dim).unwrap();
    let ds = ctx.zeros("ds", dim).unwrap();
    let w = Slice::whole;
    let ops = [
        gate(&ctx, rows, dim, w(&ga), w(&gs), w(&z)).unwrap(),
        gate_grad(&ctx, rows, dim, w(&ga), w(&gs), w(&gdz), w(&ds)).unwrap(),
    ];
    ctx.submit(&ops);
    let got: Vec<f32> = ctx.read(w(&z)).unwrap();
    assert_close(
        &got,
        &gate_reference(&to64(&a), &scores, dim),
        1e-6,
        1e-5,
        "gate",
    );
    let got: Vec<f32> = ctx.read(w(&ds)).unwrap();
    let want = gate_grad_reference(&to64(&a), &scores, &to64(&dz), dim);
    assert_close(&got, &want, 1e-5, 1e-4, "gate_grad");
}
