//! Checks of the detectors' and attacks' kernel files: FGSM/PGD steps, the abstraction
//! losses, the streaming statistics (Chan merges, row dots), Beatrix's Gram features,
//! TED's k-NN kernels and the probe's IRLS terms.

use anyhow::Result;

use super::{random, to64, Check, Checker};
use crate::gpu::abstraction::{
    cosine_distance, cosine_distance_reference, kl_divergence, kl_divergence_reference, LossArgs,
    LossGrads,
};
use crate::gpu::attack::{
    attack_ops, attack_start_reference, attack_update_reference, AttackBuffers, AttackStep,
};
use crate::gpu::beatrix::{
    gram_deviation, gram_deviation_reference, gram_features, gram_features_reference, upper_pairs,
    GramInputs, GramParams, GramShape,
};
use crate::gpu::knn::{normalize_rows, order_reference, ranks, top_k, KnnParams};
use crate::gpu::logistic::{irls_reference, irls_terms, scale_rows, IrlsTerms};
use crate::gpu::matmul::Schedule;
use crate::gpu::stats::{mean_and_gram_reference, row_dot, StatsParams, StreamingCovariance};
use crate::gpu::{GpuContext, Slice, StepParams};

pub const ATTACK: Check = Check {
    name: "attack",
    files: &["attack", "rng", "step"],
    run: |c| {
        Box::pin(async move {
            let ctx = c.ctx;
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
            let x64 = to64(&x);
            for random_start in [false, true] {
                c.variant(format!("start (random {random_start}) + 2 updates"));
                let a = AttackStep {
                    eps: 0.1,
                    step_size: 0.07,
                    random_start,
                    seed: 9,
                };
                let gx = ctx.buffer_from("x", &x)?;
                let gxt = ctx.zeros("xt", rows * dim)?;
                let gx0 = ctx.zeros("x0", rows * dim)?;
                let gg = ctx.buffer_from("grad", &grad)?;
                let batch_offset = 40;
                let step = ctx.uniform(
                    "step",
                    &StepParams {
                        batch_offset,
                        ..Default::default()
                    },
                );
                let bufs = AttackBuffers {
                    x: Slice::whole(&gx),
                    xt: Some(Slice::whole(&gxt)),
                    x0: Slice::whole(&gx0),
                    grad: Slice::whole(&gg),
                };
                let ops = attack_ops(ctx, rows, dim, &a, &bufs, &step)?;
                // Two steps: the second must be projected back into the eps ball.
                ctx.submit([&ops.start, &ops.update, &ops.update]);
                let mut want = attack_start_reference(&x64, dim, batch_offset, &a);
                for _ in 0..2 {
                    want = attack_update_reference(&want, &x64, &grad, &a);
                }
                let got: Vec<f32> = ctx.read_async(Slice::whole(&gx)).await?;
                c.close("7x13", &got, &want, 1e-6, 0.0);
                let got_t: Vec<f32> = ctx.read_async(Slice::whole(&gxt)).await?;
                let want_t: Vec<f64> = (0..rows * dim)
                    .map(|i| want[(i % rows) * dim + i / rows])
                    .collect();
                c.close("7x13 transposed", &got_t, &want_t, 1e-6, 0.0);
                let got0: Vec<f32> = ctx.read_async(Slice::whole(&gx0)).await?;
                c.close("7x13 start copy", &got0, &x64, 0.0, 0.0);
                let outside = got
                    .iter()
                    .zip(&x)
                    .position(|(g, v)| (g - v).abs() > a.eps + 1e-6);
                c.require("inside the eps ball", outside.is_none(), || {
                    format!("element {outside:?} left it")
                });
            }
            Ok(())
        })
    },
};

pub const ABSTRACTION_LOSSES: Check = Check {
    name: "abstraction_losses",
    files: &["abstraction", "step"],
    run: |c| Box::pin(abstraction_losses(c)),
};

async fn abstraction_losses(c: &mut Checker<'_>) -> Result<()> {
    let ctx = c.ctx;
    let (rows, dim, offset) = (11, 13, 5);
    let mut pred = random(rows * dim, 7);
    let mut reference = random(rows * dim, 8);
    // A zero prediction and a zero reference row: the eps branches.
    pred[2 * dim..3 * dim].fill(0.0);
    reference[4 * dim..5 * dim].fill(0.0);
    let step = ctx.uniform(
        "step",
        &StepParams {
            batch_offset: offset as u32,
            ..Default::default()
        },
    );
    let scale = 0.37;
    for (relu, with_grads) in [(false, true), (true, true), (false, false)] {
        c.variant(format!("cosine (relu {relu}, gradients {with_grads})"));
        let gp = ctx.buffer_from("pred", &pred)?;
        let gr = ctx.buffer_from("reference", &reference)?;
        let loss = ctx.zeros("loss", offset + rows)?;
        let grad_pred = ctx.zeros("grad_pred", rows * dim)?;
        // The reference gradient is accumulated onto what is there.
        let prior = random(rows * dim, 9);
        let grad_ref = ctx.buffer_from("grad_ref", &prior)?;
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
            grads: with_grads.then_some(&grads),
            step: &step,
        };
        ctx.submit([&cosine_distance(ctx, dim, relu, &args)?]);
        let (l, ga, gb) =
            cosine_distance_reference(&to64(&pred), &to64(&reference), dim, relu, scale as f64);
        let got: Vec<f32> = ctx.read_async(Slice::new(&loss, offset, rows)).await?;
        c.close("11x13 loss", &got, &l, 1e-5, 1e-5);
        if with_grads {
            let got: Vec<f32> = ctx.read_async(Slice::whole(&grad_pred)).await?;
            c.close("11x13 gradient (prediction)", &got, &ga, 1e-5, 1e-4);
            let got: Vec<f32> = ctx.read_async(Slice::whole(&grad_ref)).await?;
            let want: Vec<f64> = gb.iter().zip(&prior).map(|(g, &p)| g + p as f64).collect();
            c.close("11x13 gradient (reference)", &got, &want, 1e-5, 1e-4);
        }
    }

    let classes = 7;
    let logits: Vec<f32> = random(rows * classes, 10).iter().map(|v| 4.0 * v).collect();
    for single_class in [false, true] {
        c.variant(format!("kl (single_class {single_class})"));
        let pred_dim = if single_class { 2 } else { classes };
        let pred = random(rows * pred_dim, 11);
        let gp = ctx.buffer_from("pred", &pred)?;
        let gl = ctx.buffer_from("logits", &logits)?;
        let loss = ctx.zeros("loss", offset + rows)?;
        let grad = ctx.zeros("grad", rows * pred_dim)?;
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
        ctx.submit([&kl_divergence(ctx, classes, single_class, &args)?]);
        let (l, g) = kl_divergence_reference(
            &to64(&pred),
            &to64(&logits),
            classes,
            single_class,
            scale as f64,
        );
        let got: Vec<f32> = ctx.read_async(Slice::new(&loss, offset, rows)).await?;
        c.close(format!("11x{classes} loss"), &got, &l, 1e-5, 1e-4);
        c.require(
            "KL of different distributions > 0",
            l.iter().all(|&v| v > 0.0),
            || format!("reference losses {l:?}"),
        );
        let got: Vec<f32> = ctx.read_async(Slice::whole(&grad)).await?;
        c.close(format!("11x{classes} gradient"), &got, &g, 1e-6, 1e-4);
    }
    Ok(())
}

/// Streams `x` (rows x d) through [`StreamingCovariance`] in batches of the given sizes,
/// with Gram blocks at most `block_columns` wide (0: one block): (mean, centred Gram).
async fn streamed_statistics(
    ctx: &GpuContext,
    x: &[f32],
    d: usize,
    batches: &[usize],
    block_columns: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let max = batches.iter().copied().max().unwrap_or(1);
    let stream = StreamingCovariance::new(ctx, d, max, block_columns)?;
    let input = ctx.zeros("x", max * d)?;
    let mut offset = 0;
    for &rows in batches {
        let batch = &x[offset * d..(offset + rows) * d];
        ctx.queue
            .write_buffer(&input, 0, bytemuck::cast_slice(batch));
        stream.prepare(ctx, offset as u64, rows as u64);
        let xs = Slice::new(&input, 0, rows * d);
        ctx.submit(&stream.record(ctx, Schedule::for_context(ctx), rows, xs)?);
        offset += rows;
    }
    stream.read(ctx).await
}

pub const STATS: Check = Check {
    name: "stats",
    files: &["stats", "matmul"],
    run: |c| {
        Box::pin(async move {
            let d = 13;
            c.variant("center + merge_mean + merge_gram (Chan)");
            for batches in [vec![1; 23], vec![7, 5, 13, 1, 2], vec![40]] {
                let rows: usize = batches.iter().sum();
                let x: Vec<f32> = random(rows * d, 5)
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v + (i % d) as f32)
                    .collect();
                let (want_mean, want_gram) = mean_and_gram_reference(rows, d, &x);
                // One block, and uneven blocks of at most 5 columns.
                for block_columns in [0, 5] {
                    let (mean, gram) =
                        streamed_statistics(c.ctx, &x, d, &batches, block_columns).await?;
                    let what = format!("batches {batches:?}, blocks of {block_columns}");
                    c.close(format!("mean, {what}"), &mean, &want_mean, 1e-5, 1e-5);
                    c.close(format!("gram, {what}"), &gram, &want_gram, 1e-4, 1e-4);
                }
            }
            // A large offset relative to the spread is where E[x²] − E[x]² would fail.
            let (d, rows) = (8, 60_000);
            let x: Vec<f32> = random(rows * d, 9)
                .iter()
                .map(|v| 100.0 + 0.5 * v)
                .collect();
            let mut batches = vec![4096; rows / 4096];
            batches.push(rows % 4096);
            let (mean, gram) = streamed_statistics(c.ctx, &x, d, &batches, 0).await?;
            let (want_mean, want_gram) = mean_and_gram_reference(rows, d, &x);
            c.close(
                "mean, 60000 samples at offset 100",
                &mean,
                &want_mean,
                0.0,
                1e-6,
            );
            // Relative to the diagonal scale: off-diagonals are near zero.
            let scale: Vec<f64> = (0..d * d)
                .map(|i| (want_gram[(i / d) * (d + 1)] * want_gram[(i % d) * (d + 1)]).sqrt())
                .collect();
            let got: Vec<f32> = gram
                .iter()
                .zip(&scale)
                .map(|(&g, s)| (g as f64 / s) as f32)
                .collect();
            let want: Vec<f64> = want_gram.iter().zip(&scale).map(|(w, s)| w / s).collect();
            c.close(
                "gram / diagonal scale, 60000 samples at offset 100",
                &got,
                &want,
                1e-4,
                0.0,
            );

            c.variant("row_dot");
            let ctx = c.ctx;
            let (rows, d, block) = (37, 11, 3..9);
            let x = random(rows * block.len(), 12);
            let y = random(rows * d, 13);
            let prior = random(rows + 2, 14);
            let (gx, gy, out) = (
                ctx.buffer_from("x", &x)?,
                ctx.buffer_from("y", &y)?,
                ctx.buffer_from("out", &prior)?,
            );
            let params = ctx.uniform("p", &StatsParams::row_dot(rows, &block, d, 0.5, 2));
            let op = row_dot(
                ctx,
                rows,
                Slice::whole(&gx),
                Slice::whole(&gy),
                Slice::whole(&out),
                &params,
            )?;
            ctx.submit([&op]);
            let got: Vec<f32> = ctx.read_async(Slice::whole(&out)).await?;
            let w = block.len();
            let want: Vec<f64> = (0..rows + 2)
                .map(|i| {
                    let dot = i.checked_sub(2).map_or(0.0, |r| {
                        (0..w)
                            .map(|k| x[r * w + k] as f64 * y[r * d + block.start + k] as f64)
                            .sum()
                    });
                    prior[i] as f64 + 0.5 * dot
                })
                .collect();
            c.close(
                "37 rows, columns 3..9 of 11, offset 2",
                &got,
                &want,
                1e-5,
                1e-5,
            );
            Ok(())
        })
    },
};

pub const GRAM: Check = Check {
    name: "gram",
    files: &["beatrix"],
    run: |c| {
        Box::pin(async move {
            let ctx = c.ctx;
            for (rows, positions, channels) in [(5, 3, 7), (3, 1, 11), (2, 6, 1)] {
                let shape = GramShape {
                    rows,
                    positions,
                    channels,
                };
                let f = shape.features();
                let x = random(rows * positions * channels, 7);
                let xb = ctx.buffer_from("x", &x)?;
                let pairs = ctx.buffer_from("pairs", &upper_pairs(channels)?)?;
                for power in 1..=4u32 {
                    let what = format!("{rows}x{positions}x{channels} power {power}");
                    c.variant("features");
                    let want = gram_features_reference(&to64(&x), shape, power as i32);
                    let params = ctx.uniform("p", &GramParams::new(shape, power, 1.0, 0));
                    let input = GramInputs {
                        x: Slice::whole(&xb),
                        pairs: Slice::whole(&pairs),
                        params: &params,
                    };
                    let out = ctx.zeros("g", rows * f)?;
                    ctx.submit([&gram_features(ctx, shape, &input, Slice::whole(&out))?]);
                    let got: Vec<f32> = ctx.read_async(Slice::new(&out, 0, rows * f)).await?;
                    c.close(&what, &got, &want, 1e-5, 1e-4);

                    c.variant("deviation");
                    // Bounds around the first row's features, so that some fall outside; the
                    // scores add to what the output holds, from `out_offset` on.
                    let lo: Vec<f32> = (0..f)
                        .map(|j| (want[j] - 0.1 * (j % 3) as f64) as f32)
                        .collect();
                    let hi: Vec<f32> = (0..f)
                        .map(|j| (want[j] + 0.05 * (j % 2) as f64) as f32)
                        .collect();
                    let (offset, scale) = (2, 0.5f64);
                    let params =
                        ctx.uniform("p", &GramParams::new(shape, power, scale as f32, offset));
                    let input = GramInputs {
                        params: &params,
                        ..input
                    };
                    let (lb, hb) = (ctx.buffer_from("lo", &lo)?, ctx.buffer_from("hi", &hi)?);
                    let scores = ctx.buffer_from("s", &vec![1.0f32; rows + offset])?;
                    let bounds = (Slice::whole(&lb), Slice::whole(&hb));
                    ctx.submit([&gram_deviation(
                        ctx,
                        shape,
                        &input,
                        bounds,
                        Slice::whole(&scores),
                    )?]);
                    let got: Vec<f32> = ctx.read_async(Slice::whole(&scores)).await?;
                    let (lo64, hi64) = (to64(&lo), to64(&hi));
                    let mut expect = vec![1.0; offset];
                    expect.extend(
                        want.chunks(f)
                            .map(|g| 1.0 + scale * gram_deviation_reference(g, &lo64, &hi64)),
                    );
                    c.require(
                        format!("{what}: some features fall outside"),
                        expect[offset + 1] > 1.0,
                        || "the second row deviates by nothing".into(),
                    );
                    c.close(&what, &got, &expect, 1e-4, 1e-3);
                }
            }
            Ok(())
        })
    },
};

pub const KNN: Check = Check {
    name: "knn",
    files: &["knn"],
    run: |c| {
        Box::pin(async move {
            let ctx = c.ctx;
            let (rows, cols, k, dim) = (5, 37, 4, 3);
            // Coarse values so that rows have ties.
            let sims: Vec<f32> = random(rows * cols, 3)
                .into_iter()
                .map(|v| (v * 4.0).round() / 4.0)
                .collect();
            let s = ctx.buffer_from("sims", &sims)?;
            for exclude_from in [None, Some(2)] {
                let params = ctx.uniform("p", &KnnParams::new(rows, cols, k, exclude_from));
                let idx = ctx.zeros("idx", rows * k)?;
                let op = top_k(
                    ctx,
                    rows,
                    Slice::whole(&s),
                    Slice::new(&idx, 0, rows * k),
                    &params,
                )?;
                ctx.submit([&op]);
                let got: Vec<u32> = ctx.read_async(Slice::new(&idx, 0, rows * k)).await?;
                // Ranks of columns chosen for each row (not the top ones), in another order.
                let chosen: Vec<u32> = (0..rows * k).map(|i| ((i * 7 + 3) % cols) as u32).collect();
                let chosen_b = ctx.buffer_from("chosen", &chosen)?;
                let out = ctx.zeros("ranks", rows * k)?;
                let op = ranks(
                    ctx,
                    rows,
                    k,
                    Slice::whole(&s),
                    Slice::whole(&chosen_b),
                    Slice::new(&out, 0, rows * k),
                    &params,
                )?;
                ctx.submit([&op]);
                let got_ranks: Vec<f32> = ctx.read_async(Slice::new(&out, 0, rows * k)).await?;
                let (mut want_top, mut got_r, mut want_r) = (Vec::new(), Vec::new(), Vec::new());
                for r in 0..rows {
                    let order = order_reference(
                        &to64(&sims[r * cols..(r + 1) * cols]),
                        exclude_from.map(|e| e + r),
                    );
                    want_top.extend(order[..k].iter().map(|&c| c as u32));
                    for m in 0..k {
                        // An excluded column has no rank; the kernel counts what precedes it.
                        if let Some(want) =
                            order.iter().position(|&o| o == chosen[r * k + m] as usize)
                        {
                            got_r.push(got_ranks[r * k + m]);
                            want_r.push(want as f64);
                        }
                    }
                }
                let what = format!("5x37 with ties, k 4, self-exclusion {exclude_from:?}");
                c.variant("topk");
                c.equal(&what, &got, &want_top);
                c.variant("ranks");
                c.close(&what, &got_r, &want_r, 0.0, 0.0);
            }
            c.variant("normalize_rows");
            let x = random(rows * dim, 5);
            let xb = ctx.buffer_from("x", &x)?;
            let out = ctx.zeros("unit", rows * dim)?;
            ctx.submit([&normalize_rows(
                ctx,
                rows,
                dim,
                Slice::whole(&xb),
                Slice::whole(&out),
            )?]);
            let got: Vec<f32> = ctx.read_async(Slice::new(&out, 0, rows * dim)).await?;
            let want: Vec<f64> = to64(&x)
                .chunks(dim)
                .flat_map(|r| {
                    let n = r.iter().map(|v| v * v).sum::<f64>().sqrt();
                    r.iter().map(move |v| v / n).collect::<Vec<_>>()
                })
                .collect();
            c.close("5x3", &got, &want, 1e-6, 1e-5);
            Ok(())
        })
    },
};

pub const LOGISTIC: Check = Check {
    name: "logistic",
    files: &["logistic"],
    run: |c| {
        Box::pin(async move {
            let ctx = c.ctx;
            for rows in [1, 37, 130] {
                // Logits up to ±30: the stable loss branches and saturated weights.
                let z: Vec<f32> = random(rows, 15).iter().map(|v| 30.0 * v * v * v).collect();
                let y: Vec<f32> = (0..rows).map(|r| (r % 3 == 0) as u8 as f32).collect();
                let (gz, gy) = (ctx.buffer_from("z", &z)?, ctx.buffer_from("y", &y)?);
                let out = [
                    ctx.zeros("r", rows)?,
                    ctx.zeros("w", rows)?,
                    ctx.zeros("l", rows)?,
                ];
                let terms = IrlsTerms {
                    residuals: Slice::whole(&out[0]),
                    weights: Slice::whole(&out[1]),
                    losses: Slice::whole(&out[2]),
                };
                ctx.submit([&irls_terms(
                    ctx,
                    rows,
                    Slice::whole(&gz),
                    Slice::whole(&gy),
                    &terms,
                )?]);
                // Per sample (residual, weight, loss), as three columns.
                let want: Vec<[f64; 3]> = z
                    .iter()
                    .zip(&y)
                    .map(|(&z, &y)| {
                        let (r, w, l) = irls_reference(z as f64, y as f64, rows);
                        [r, w, l]
                    })
                    .collect();
                c.variant("irls");
                for (j, (name, buf)) in ["residuals", "weights", "losses"]
                    .iter()
                    .zip(&out)
                    .enumerate()
                {
                    let got: Vec<f32> = ctx.read_async(Slice::new(buf, 0, rows)).await?;
                    let w: Vec<f64> = want.iter().map(|t| t[j]).collect();
                    c.close(format!("{rows} samples {name}"), &got, &w, 1e-6, 1e-5);
                }

                c.variant("scale_rows");
                let cols = 7;
                let x = random(rows * cols, 16);
                let gx = ctx.buffer_from("x", &x)?;
                let scaled = ctx.zeros("xs", rows * cols)?;
                let op = scale_rows(
                    ctx,
                    (rows, cols),
                    Slice::whole(&gx),
                    Slice::whole(&out[1]),
                    Slice::whole(&scaled),
                )?;
                ctx.submit([&op]);
                let got: Vec<f32> = ctx.read_async(Slice::new(&scaled, 0, rows * cols)).await?;
                let w: Vec<f64> = (0..rows * cols)
                    .map(|i| x[i] as f64 * want[i / cols][1])
                    .collect();
                c.close(format!("{rows}x{cols}"), &got, &w, 1e-6, 1e-5);
            }
            Ok(())
        })
    },
};

pub const VAE: Check = Check {
    name: "vae",
    files: &["vae", "rng", "step"],
    run: |c| Box::pin(vae(c)),
};

/// Every entry point of the VAE loss file against its f64 reference, with and without
/// latent noise, at an odd batch position of a training epoch.
async fn vae(c: &mut Checker<'_>) -> Result<()> {
    use crate::gpu::vae::{
        latent_grad_reference, loss_reference, sample_reference, vae_latent_grad, vae_loss,
        vae_sample, LossIo, VaeShape,
    };
    let ctx = c.ctx;
    let (rows, dim, latent, offset, epoch) = (11, 13, 5, 7u32, 2u32);
    let step = ctx.uniform(
        "step",
        &StepParams {
            epoch,
            batch_offset: offset,
            ..Default::default()
        },
    );
    // log σ² in [-2, 2): exp() over a real range.
    let enc: Vec<f32> = random(rows * 2 * latent, 21)
        .iter()
        .map(|v| 2.0 * v)
        .collect();
    let x = random(rows * dim, 22);
    let recon = random(rows * dim, 23);
    let dz = random(rows * latent, 24);
    let (genc, gx, grecon, gdz) = (
        ctx.buffer_from("enc", &enc)?,
        ctx.buffer_from("x", &x)?,
        ctx.buffer_from("recon", &recon)?,
        ctx.buffer_from("dz", &dz)?,
    );
    for noise in [false, true] {
        let shape = VaeShape {
            rows,
            dim,
            latent,
            seed: 5,
            kld_weight: 0.7,
            noise,
            scale: 0.37,
        };
        c.variant(format!("sample (noise {noise})"));
        let z = ctx.zeros("z", rows * latent)?;
        ctx.submit([&vae_sample(
            ctx,
            &shape,
            Slice::whole(&genc),
            Slice::whole(&z),
            &step,
        )?]);
        let want = sample_reference(&shape, &to64(&enc), epoch, offset);
        c.close(
            "11x5 latent",
            &ctx.read_async::<f32>(Slice::whole(&z)).await?,
            &want,
            1e-5,
            1e-5,
        );
        if noise {
            let mu = sample_reference(
                &VaeShape {
                    noise: false,
                    ..shape
                },
                &to64(&enc),
                0,
                0,
            );
            c.require("the noise moves z", want != mu, || "z = mu".into());
        }
        c.variant(format!("latent_grad (noise {noise})"));
        let g = ctx.zeros("grad enc", rows * 2 * latent)?;
        ctx.submit([&vae_latent_grad(
            ctx,
            &shape,
            Slice::whole(&genc),
            Slice::whole(&gdz),
            Slice::whole(&g),
            &step,
        )?]);
        let want = latent_grad_reference(&shape, &to64(&enc), &to64(&dz), epoch, offset);
        c.close(
            "11x10 encoder gradient",
            &ctx.read_async::<f32>(Slice::whole(&g)).await?,
            &want,
            1e-5,
            1e-4,
        );
    }
    for grads in [true, false] {
        c.variant(format!("vae_loss (gradients {grads})"));
        let shape = VaeShape {
            rows,
            dim,
            latent,
            seed: 5,
            kld_weight: 0.7,
            noise: false,
            scale: 0.37,
        };
        let loss = ctx.zeros("loss", offset as usize + rows)?;
        let g = ctx.zeros("grad recon", rows * dim)?;
        let io = LossIo {
            x: Slice::whole(&gx),
            recon: Slice::whole(&grecon),
            enc: Slice::whole(&genc),
            loss: Slice::whole(&loss),
            grad_recon: grads.then(|| Slice::whole(&g)),
        };
        ctx.submit([&vae_loss(ctx, &shape, &io, &step)?]);
        let (l, gr) = loss_reference(&shape, &to64(&x), &to64(&recon), &to64(&enc));
        let got: Vec<f32> = ctx
            .read_async(Slice::new(&loss, offset as usize, rows))
            .await?;
        c.close("11x13 loss", &got, &l, 1e-5, 1e-5);
        if grads {
            c.close(
                "11x13 reconstruction gradient",
                &ctx.read_async::<f32>(Slice::whole(&g)).await?,
                &gr,
                1e-6,
                1e-4,
            );
        }
    }
    Ok(())
}
