//! The batch/trigger kernel's seeding, chunking and corner names, and training on
//! small generated data (the kernels' references and gradients: tests/kernels.rs).

mod common;

use common::gpu;
use cupbearer::checks::gather_on_gpu;
use cupbearer::data::backdoor::{batch_reference, Backdoor, Corner, Trigger};
use cupbearer::data::Dataset;
use cupbearer::gpu::batch::{FloatImages, GpuDataset};
use cupbearer::gpu::GpuContext;
use cupbearer::model::train::{evaluate, predict_logits, train, LrSchedule, TrainOptions};
use cupbearer::model::{GpuMlp, Mlp, MlpConfig};

fn corner(corner: Corner, p: f32) -> Backdoor {
    Backdoor {
        trigger: Trigger::Corner { corner },
        p_backdoor: p,
        target_class: 3,
    }
}

/// Runs the batch kernel for `indices` in `epoch`: (x, labels), the transposed copy checked.
fn gpu_batch(
    ctx: &GpuContext,
    data: &GpuDataset,
    indices: &[u32],
    backdoor: Option<&Backdoor>,
    seed: u32,
    epoch: u32,
) -> (Vec<f32>, Vec<u32>) {
    let gathered = gather_on_gpu(ctx, data, indices, (None, backdoor), (seed, epoch));
    let (x, y, transposed) = cupbearer::gpu::block_on(gathered).unwrap();
    assert!(transposed, "transposed copy");
    (x, y)
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

fn small_options(seed: u32, backdoor: Option<Backdoor>) -> TrainOptions {
    TrainOptions {
        epochs: 4,
        batch_size: 50,
        learning_rate: 3e-3,
        lr_schedule: LrSchedule::Constant,
        seed,
        max_steps: None,
        backdoor,
        augment: None,
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
