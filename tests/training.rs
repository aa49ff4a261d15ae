//! The batch/trigger kernel, MLP gradients against finite differences, and training
//! on small generated data.

mod common;

use common::gpu;
use cupbearer::data::backdoor::{batch_reference, Backdoor, Corner, Trigger};
use cupbearer::data::Dataset;
use cupbearer::gpu::batch::{gather_batch, BatchOutputs, FloatImages, Gather, GpuDataset};
use cupbearer::gpu::loss::{softmax_cross_entropy, LossOutputs};
use cupbearer::gpu::{Dispatch, GpuContext, Slice, StepParams};
use cupbearer::model::gpu_mlp::Workspace;
use cupbearer::model::layers::ParamLayout;
use cupbearer::model::train::{evaluate, predict_logits, train, LrSchedule, TrainOptions};
use cupbearer::model::{GpuMlp, Gradients, Mlp, MlpConfig};

fn corner(corner: Corner, p: f32) -> Backdoor {
    Backdoor {
        trigger: Trigger::Corner { corner },
        p_backdoor: p,
        target_class: 3,
    }
}

/// Runs the batch kernel for `indices` in `epoch`: (x, xt, labels).
fn gpu_batch(
    ctx: &GpuContext,
    data: &GpuDataset,
    indices: &[u32],
    backdoor: Option<&Backdoor>,
    seed: u32,
    epoch: u32,
) -> (Vec<f32>, Vec<u32>) {
    let rows = indices.len();
    let dim = data.sample_dim();
    let idx = ctx.buffer_from("idx", indices).unwrap();
    let (x, y) = (
        ctx.zeros("x", rows * dim).unwrap(),
        ctx.zeros("y", rows).unwrap(),
    );
    let xt = ctx.zeros("xt", rows * dim).unwrap();
    let step = ctx.uniform(
        "step",
        &StepParams {
            epoch,
            ..Default::default()
        },
    );
    let poison = backdoor.map(|b| b.poison(data.height, data.width, data.num_classes).unwrap());
    let gather = Gather {
        data,
        rows,
        indices: Slice::whole(&idx),
        poison,
        seed,
        step: &step,
    };
    let outputs = BatchOutputs {
        x: Slice::whole(&x),
        xt: Some(Slice::whole(&xt)),
        labels: Slice::whole(&y),
    };
    let op = gather_batch(ctx, &gather, &outputs).unwrap();
    ctx.submit([&op]);
    let x: Vec<f32> = ctx.read(Slice::new(&x, 0, rows * dim)).unwrap();
    let xt: Vec<f32> = ctx.read(Slice::new(&xt, 0, rows * dim)).unwrap();
    for r in 0..rows {
        for p in 0..dim {
            assert_eq!(xt[p * rows + r], x[r * dim + p], "transposed copy");
        }
    }
    (x, ctx.read(Slice::new(&y, 0, rows)).unwrap())
}

#[test]
fn gather_matches_reference_with_and_without_triggers() {
    let Some(ctx) = gpu() else { return };
    let data = Dataset::synthetic(53, 9, 7, 5);
    let gdata = GpuDataset::upload(&ctx, &data.as_images()).unwrap();
    let indices: Vec<u32> = (0..37).map(|i| (i * 17) % 53).collect();
    let noise = Backdoor {
        trigger: Trigger::Noise {
            std: 0.3,
            clip: true,
        },
        p_backdoor: 0.5,
        target_class: 1,
    };
    let unclipped = Backdoor {
        trigger: Trigger::Noise {
            std: 0.3,
            clip: false,
        },
        ..noise
    };
    for backdoor in [
        None,
        Some(corner(Corner::BottomLeft, 0.5)),
        Some(noise),
        Some(unclipped),
    ] {
        let (x, y) = gpu_batch(&ctx, &gdata, &indices, backdoor.as_ref(), 7, 2);
        let (want_x, want_y) = batch_reference(&data, &indices, backdoor.as_ref(), (7, 2));
        common::assert_close(&x, &want_x, 1e-5, 1e-5, &format!("batch {backdoor:?}"));
        assert_eq!(y, want_y, "labels {backdoor:?}");
    }
    // Unclipped noise leaves [0, 1] somewhere; clipped never does.
    let (x, ..) = gpu_batch(&ctx, &gdata, &indices, Some(&unclipped), 7, 2);
    assert!(x.iter().any(|&v| !(0.0..=1.0).contains(&v)));
    let (x, ..) = gpu_batch(&ctx, &gdata, &indices, Some(&noise), 7, 2);
    assert!(x.iter().all(|&v| (0.0..=1.0).contains(&v)));
}

#[test]
fn data_sets_split_over_several_bindings_gather_the_same() {
    let Some(ctx) = gpu() else { return };
    // 63-byte samples: chunks must hold a multiple of 4 samples to start on a word.
    let data = Dataset::synthetic(53, 9, 7, 5);
    let indices: Vec<u32> = (0..37).map(|i| (i * 17) % 53).collect();
    let (want_x, want_y) = batch_reference(&data, &indices, None, (0, 0));
    // 4 chunks of 16 samples (1008 B) for 53 samples; one chunk; too many chunks.
    for (limit, chunks) in [(1100, 4), (1 << 20, 1)] {
        let gdata = GpuDataset::upload_chunked(&ctx, &data.as_images(), limit).unwrap();
        assert_eq!(gdata.chunks.len(), chunks);
        let (x, y) = gpu_batch(&ctx, &gdata, &indices, None, 0, 0);
        common::assert_close(&x, &want_x, 1e-6, 0.0, &format!("{chunks} chunks"));
        assert_eq!(y, want_y);
    }
    let err = GpuDataset::upload_chunked(&ctx, &data.as_images(), 700)
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("storage bindings"), "{err:#}");
    // Float pixels take the same path.
    let pixels: Vec<f32> = data.images.iter().map(|&p| p as f32 / 255.0).collect();
    let labels: Vec<u32> = data.labels.iter().map(|&l| l as u32).collect();
    let fdata = GpuDataset::upload_f32(
        &ctx,
        "floats",
        &FloatImages {
            pixels: &pixels,
            labels: &labels,
            shape: [9, 7, 1],
            num_classes: 10,
        },
    )
    .unwrap();
    let (x, y) = gpu_batch(&ctx, &fdata, &indices, None, 0, 0);
    common::assert_close(&x, &want_x, 1e-6, 0.0, "f32 pixels");
    assert_eq!(y, want_y);
}

#[test]
fn corner_names_mean_what_they_say() {
    let Some(ctx) = gpu() else { return };
    let (h, w) = (6, 5);
    let data = Dataset::synthetic(4, h, w, 1);
    let gdata = GpuDataset::upload(&ctx, &data.as_images()).unwrap();
    for (c, (row, col)) in [
        (Corner::TopLeft, (0, 0)),
        (Corner::TopRight, (0, w - 1)),
        (Corner::BottomLeft, (h - 1, 0)),
        (Corner::BottomRight, (h - 1, w - 1)),
    ] {
        let (x, y) = gpu_batch(&ctx, &gdata, &[0, 1, 2, 3], Some(&corner(c, 1.0)), 0, 0);
        for r in 0..4 {
            let img = &x[r * h * w..(r + 1) * h * w];
            let clean: Vec<f32> = data.image(r).iter().map(|&p| p as f32 / 255.0).collect();
            for p in 0..h * w {
                let want = if p == row * w + col { 1.0 } else { clean[p] };
                assert_eq!(img[p], want, "{c:?} image {r} pixel {p}");
            }
        }
        assert_eq!(y, vec![3; 4], "poisoned samples take the target label");
    }
}

#[test]
fn coin_flips_are_seeded_per_epoch_and_at_the_requested_rate() {
    let Some(ctx) = gpu() else { return };
    let n = 4000;
    let data = Dataset::synthetic(n, 4, 4, 2);
    let gdata = GpuDataset::upload(&ctx, &data.as_images()).unwrap();
    let idx: Vec<u32> = (0..n as u32).collect();
    let b = corner(Corner::TopLeft, 0.05);
    // Poisoned = top-left pixel 1.0 (synthetic images keep corners at 0).
    let poisoned = |seed, epoch| -> Vec<bool> {
        let (x, ..) = gpu_batch(&ctx, &gdata, &idx, Some(&b), seed, epoch);
        (0..n).map(|r| x[r * 16] == 1.0).collect()
    };
    let e0 = poisoned(11, 0);
    let count = e0.iter().filter(|&&p| p).count() as f64;
    // Binomial(4000, 0.05): mean 200, sd 13.8; 5 sd either side.
    assert!(
        (count - 200.0).abs() < 69.0,
        "{count} poisoned of {n} at p=0.05"
    );
    assert_eq!(e0, poisoned(11, 0), "same seed and epoch, same coin flips");
    assert_ne!(e0, poisoned(11, 1), "another epoch, other coin flips");
    assert_ne!(e0, poisoned(12, 0), "another seed, other coin flips");
    // The flips depend on the sample, not on its position in the batch.
    let rev: Vec<u32> = idx.iter().rev().copied().collect();
    let (x, ..) = gpu_batch(&ctx, &gdata, &rev, Some(&b), 11, 0);
    for (r, &s) in rev.iter().enumerate() {
        assert_eq!(x[r * 16] == 1.0, e0[s as usize]);
    }
}

/// Mean cross-entropy of the f64 reference forward pass.
fn reference_loss(mlp: &Mlp, x: &[f64], labels: &[u32]) -> f64 {
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
    fn new(cnn: bool) -> Self {
        let (h, w) = if cnn { (8, 7) } else { (5, 3) };
        let config = MlpConfig {
            input_shape: [h, w, 1],
            conv_channels: if cnn { vec![3, 4] } else { Vec::new() },
            hidden_dims: if cnn { vec![5] } else { vec![7, 6] },
            output_dim: 10,
        };
        let mut mlp = Mlp::init(&config, 3).unwrap();
        for d in &mut mlp.layers {
            for (i, b) in d.bias.iter_mut().enumerate() {
                *b = 0.05 * ((i % 3) as f32 - 1.0);
            }
        }
        GradientCase {
            data: Dataset::synthetic(19, h, w, 4),
            mlp,
            indices: (0..13).map(|i| (i * 5) % 19).collect(),
        }
    }

    /// Runs gather, forward, loss and `backward(model, ws)` on the GPU.
    fn run(
        &self,
        ctx: &GpuContext,
        gradients: Gradients,
        backward: impl Fn(&GpuMlp, &Workspace) -> Vec<Dispatch>,
    ) -> (GpuMlp, Workspace) {
        let rows = self.indices.len();
        let model = GpuMlp::upload(ctx, &self.mlp).unwrap();
        let gdata = GpuDataset::upload(ctx, &self.data.as_images()).unwrap();
        let ws = model.workspace(ctx, rows, true, gradients).unwrap();
        let idx = ctx.buffer_from("idx", &self.indices).unwrap();
        let step = ctx.uniform("step", &StepParams::default());
        let metrics = ctx.zeros("metrics", rows).unwrap();
        let mut ops = vec![gather_batch(
            ctx,
            &Gather {
                data: &gdata,
                rows,
                indices: Slice::whole(&idx),
                poison: None,
                seed: 0,
                step: &step,
            },
            &BatchOutputs {
                x: Slice::whole(&ws.x),
                xt: (!self.mlp.config.is_cnn()).then(|| Slice::whole(&ws.xt)),
                labels: Slice::whole(&ws.labels),
            },
        )
        .unwrap()];
        ops.extend(model.forward(ctx, &ws).unwrap());
        ops.push(
            softmax_cross_entropy(
                ctx,
                rows,
                10,
                Slice::whole(&ws.logits),
                Slice::whole(&ws.labels),
                &LossOutputs {
                    grad: Slice::whole(&ws.dlogits),
                    sample_loss: Slice::whole(&metrics),
                    sample_correct: Slice::whole(&metrics),
                },
                &step,
            )
            .unwrap(),
        );
        ops.extend(backward(&model, &ws));
        ctx.submit(&ops);
        (model, ws)
    }
}

#[test]
fn mlp_and_cnn_gradients_match_finite_differences() {
    let Some(ctx) = gpu() else { return };
    for cnn in [false, true] {
        let case = GradientCase::new(cnn);
        let (mlp, config) = (&case.mlp, &case.mlp.config);
        let grads = ctx.zeros("grads", ParamLayout::new(config).total).unwrap();
        let (model, _ws) = case.run(&ctx, Gradients::Params, |model, ws| {
            model.backward(&ctx, ws, &grads).unwrap()
        });
        let flat: Vec<f32> = ctx.read(Slice::whole(&grads)).unwrap();
        let got = model.layout.unflatten(&flat);

        let (data, indices) = (&case.data, &case.indices);
        let (x, labels) = batch_reference(data, indices, None, (0, 0));
        let h = 1e-4;
        let mut checked = 0;
        for (l, got_l) in got.iter().enumerate() {
            let (nk, nb) = (mlp.layers[l].kernel.len(), mlp.layers[l].bias.len());
            for (i, is_bias) in (0..nk)
                .map(|i| (i, false))
                .chain((0..nb).map(|i| (i, true)))
            {
                let fd = {
                    let mut plus = mlp.clone();
                    let mut minus = mlp.clone();
                    let (p, m) = if is_bias {
                        (&mut plus.layers[l].bias[i], &mut minus.layers[l].bias[i])
                    } else {
                        (
                            &mut plus.layers[l].kernel[i],
                            &mut minus.layers[l].kernel[i],
                        )
                    };
                    *p += h as f32;
                    *m -= h as f32;
                    let dp = (*p as f64) - (*m as f64);
                    (reference_loss(&plus, &x, &labels) - reference_loss(&minus, &x, &labels)) / dp
                };
                let g = if is_bias {
                    got_l.bias[i]
                } else {
                    got_l.kernel[i]
                } as f64;
                assert!(
                    (g - fd).abs() <= 2e-4 + 2e-3 * fd.abs(),
                    "cnn {cnn} layer {l} {} {i}: gpu {g}, finite difference {fd}",
                    if is_bias { "bias" } else { "kernel" }
                );
                checked += 1;
            }
        }
        assert_eq!(checked, mlp.num_params());
    }
}

#[test]
fn mlp_and_cnn_input_gradients_match_finite_differences() {
    let Some(ctx) = gpu() else { return };
    for cnn in [false, true] {
        let case = GradientCase::new(cnn);
        let (_model, ws) = case.run(&ctx, Gradients::Input, |model, ws| {
            model.input_gradient(&ctx, ws).unwrap()
        });
        let got: Vec<f32> = ctx.read(Slice::whole(ws.dx.as_ref().unwrap())).unwrap();
        let (x, labels) = batch_reference(&case.data, &case.indices, None, (0, 0));
        assert_eq!(got.len(), x.len());
        let h = 1e-5;
        let mut nonzero = 0;
        for i in 0..x.len() {
            let (mut plus, mut minus) = (x.clone(), x.clone());
            plus[i] += h;
            minus[i] -= h;
            let fd = (reference_loss(&case.mlp, &plus, &labels)
                - reference_loss(&case.mlp, &minus, &labels))
                / (2.0 * h);
            let g = got[i] as f64;
            assert!(
                (g - fd).abs() <= 1e-5 + 2e-3 * fd.abs(),
                "cnn {cnn} input {i}: gpu {g}, finite difference {fd}"
            );
            nonzero += (fd.abs() > 1e-6) as usize;
        }
        // Most inputs must matter, or the comparison proves little.
        assert!(
            nonzero > x.len() / 2,
            "cnn {cnn}: {nonzero} of {} non-zero",
            x.len()
        );
    }
}

fn small_options(seed: u32, backdoor: Option<Backdoor>) -> TrainOptions {
    TrainOptions {
        epochs: 4,
        batch_size: 50,
        learning_rate: 3e-3,
        lr_schedule: LrSchedule::Constant,
        seed,
        max_steps: None,
        backdoor,
        progress: false,
    }
}

#[test]
fn training_learns_synthetic_data_and_the_backdoor() {
    let Some(ctx) = gpu() else { return };
    let train_set = Dataset::synthetic(1234, 12, 10, 1);
    let test_set = Dataset::synthetic(300, 12, 10, 2);
    let config = MlpConfig {
        input_shape: [12, 10, 1],
        conv_channels: Vec::new(),
        hidden_dims: vec![48, 32],
        output_dim: 10,
    };
    let backdoor = corner(Corner::BottomRight, 0.1);
    let model = GpuMlp::upload(&ctx, &Mlp::init(&config, 0).unwrap()).unwrap();
    let gtrain = GpuDataset::upload(&ctx, &train_set.as_images()).unwrap();
    let report = train(&ctx, &model, &gtrain, &small_options(0, Some(backdoor))).unwrap();
    assert_eq!(report.epochs.len(), 4);
    assert_eq!(report.samples, 4 * 1234);
    assert!(report.epochs[3].train_loss < report.epochs[0].train_loss);
    let gtest = GpuDataset::upload(&ctx, &test_set.as_images()).unwrap();
    let all: Vec<u32> = (0..300).collect();
    let clean = evaluate(&ctx, &model, &gtest, &all, None, 0, 64).unwrap();
    assert!(clean.accuracy >= 0.95, "clean accuracy {}", clean.accuracy);
    let victims: Vec<u32> = all
        .iter()
        .copied()
        .filter(|&i| test_set.labels[i as usize] != 3)
        .collect();
    let always = Backdoor {
        p_backdoor: 1.0,
        ..backdoor
    };
    let asr = evaluate(&ctx, &model, &gtest, &victims, Some(&always), 0, 64).unwrap();
    assert!(asr.accuracy >= 0.9, "attack success {}", asr.accuracy);

    // The GPU forward pass agrees with the f64 reference of the downloaded weights.
    let mlp = model.download(&ctx).unwrap();
    let logits = predict_logits(&ctx, &model, &gtest, &all[..37], 16).unwrap();
    let (x, _) = batch_reference(&test_set, &all[..37], None, (0, 0));
    let (_, want) = mlp.forward_reference(&x, 37);
    common::assert_close(&logits, &want, 1e-4, 1e-4, "logits");
}

#[test]
fn same_seed_gives_bit_identical_weights() {
    let Some(ctx) = gpu() else { return };
    let data = Dataset::synthetic(230, 8, 8, 3);
    let config = MlpConfig {
        input_shape: [8, 8, 1],
        conv_channels: Vec::new(),
        hidden_dims: vec![17],
        output_dim: 10,
    };
    let gdata = GpuDataset::upload(&ctx, &data.as_images()).unwrap();
    let run = |seed| {
        let model = GpuMlp::upload(&ctx, &Mlp::init(&config, seed).unwrap()).unwrap();
        let opts = TrainOptions {
            epochs: 2,
            ..small_options(seed, Some(corner(Corner::TopLeft, 0.2)))
        };
        train(&ctx, &model, &gdata, &opts).unwrap();
        model.download(&ctx).unwrap()
    };
    let a = run(5);
    assert_eq!(a, run(5), "same seed, same weights");
    assert_ne!(a, run(6), "another seed, other weights");
}

#[test]
fn max_steps_caps_training() {
    let Some(ctx) = gpu() else { return };
    let data = Dataset::synthetic(100, 4, 4, 3);
    let config = MlpConfig {
        input_shape: [4, 4, 1],
        conv_channels: Vec::new(),
        hidden_dims: vec![5],
        output_dim: 10,
    };
    let gdata = GpuDataset::upload(&ctx, &data.as_images()).unwrap();
    let model = GpuMlp::upload(&ctx, &Mlp::init(&config, 0).unwrap()).unwrap();
    let opts = TrainOptions {
        batch_size: 30,
        max_steps: Some(5),
        ..small_options(0, None)
    };
    let report = train(&ctx, &model, &gdata, &opts).unwrap();
    assert_eq!(report.steps, 5);
    // 4 steps (30+30+30+10) in epoch 1, then 1 step of 30.
    assert_eq!(report.samples, 130);
    assert_eq!(report.epochs.len(), 2);
}

#[test]
fn divergence_and_oversized_buffers_are_errors() {
    let Some(ctx) = gpu() else { return };
    let data = Dataset::synthetic(200, 6, 6, 3);
    let config = MlpConfig {
        input_shape: [6, 6, 1],
        conv_channels: Vec::new(),
        hidden_dims: vec![8],
        output_dim: 10,
    };
    let gdata = GpuDataset::upload(&ctx, &data.as_images()).unwrap();
    let model = GpuMlp::upload(&ctx, &Mlp::init(&config, 0).unwrap()).unwrap();
    let opts = TrainOptions {
        learning_rate: 1e30,
        ..small_options(0, None)
    };
    let err = train(&ctx, &model, &gdata, &opts).expect_err("lr 1e30 must diverge");
    assert!(err.to_string().contains("diverged"), "{err}");

    let huge = ctx.limits.max_buffer_size / 4 + 1;
    let err = ctx
        .zeros("huge", huge as usize)
        .expect_err("beyond the adapter's limit");
    assert!(
        err.to_string()
            .contains("exceeds this adapter's maximum buffer size"),
        "{err}"
    );
}

#[test]
fn cnn_learns_synthetic_data_and_the_backdoor() {
    let Some(ctx) = gpu() else { return };
    let train_set = Dataset::synthetic(1200, 12, 10, 1);
    let test_set = Dataset::synthetic(300, 12, 10, 2);
    let config = MlpConfig {
        input_shape: [12, 10, 1],
        conv_channels: vec![8, 16],
        hidden_dims: vec![32],
        output_dim: 10,
    };
    let model = GpuMlp::upload(&ctx, &Mlp::init(&config, 0).unwrap()).unwrap();
    let gtrain = GpuDataset::upload(&ctx, &train_set.as_images()).unwrap();
    let gtest = GpuDataset::upload(&ctx, &test_set.as_images()).unwrap();
    let backdoor = corner(Corner::TopLeft, 0.1);
    let mut opts = small_options(0, Some(backdoor));
    opts.epochs = 8;
    train(&ctx, &model, &gtrain, &opts).unwrap();
    let test: Vec<u32> = (0..300).collect();
    let clean = evaluate(&ctx, &model, &gtest, &test, None, 0, 64).unwrap();
    assert!(clean.accuracy >= 0.95, "clean accuracy {}", clean.accuracy);
    let always = Backdoor {
        p_backdoor: 1.0,
        ..backdoor
    };
    let triggered = evaluate(&ctx, &model, &gtest, &test, Some(&always), 0, 64).unwrap();
    assert!(
        triggered.accuracy >= 0.9,
        "attack success {}",
        triggered.accuracy
    );
    // Saved and loaded, the CNN computes the same logits.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let mlp = model.download(&ctx).unwrap();
    mlp.save(&path).unwrap();
    let loaded = Mlp::load(&path).unwrap();
    assert_eq!(loaded, mlp);
    let a = predict_logits(&ctx, &model, &gtest, &test[..50], 64).unwrap();
    let b = predict_logits(
        &ctx,
        &GpuMlp::upload(&ctx, &loaded).unwrap(),
        &gtest,
        &test[..50],
        64,
    )
    .unwrap();
    assert_eq!(a, b);
}
