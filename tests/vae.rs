//! The VAE detector: its training gradients against finite differences of an f64
//! reference of the loss (latent noise included), its scores against that reference, a
//! planted trigger found with a reload that scores identically, bad options refused.

mod common;

use cupbearer::data::backdoor::{batch_reference, Backdoor, Corner, Trigger};
use cupbearer::data::Dataset;
use cupbearer::detectors::vae::{Vae, VaeConfig};
use cupbearer::detectors::{Detector, SampleSet};
use cupbearer::gpu::batch::GpuDataset;
use cupbearer::model::{GpuMlp, Mlp, MlpConfig};
use cupbearer::registry::{Registry, TaskEnv};
use cupbearer::tasks::backdoor::BackdoorTaskConfig;

/// The training loss: the mean over layers of the mean over samples.
fn mean_loss(per_layer: &[Vec<f64>]) -> f64 {
    per_layer
        .iter()
        .map(|l| l.iter().sum::<f64>() / l.len() as f64)
        .sum::<f64>()
        / per_layer.len() as f64
}

#[test]
fn gradients_match_finite_differences_and_scores_the_reference() {
    let Some(ctx) = common::gpu() else { return };
    let config = MlpConfig {
        input_shape: [6, 5, 1],
        conv_channels: Vec::new(),
        hidden_dims: vec![7, 4],
        output_dim: 10,
    };
    let data = Dataset::synthetic(23, 6, 5, 4);
    let mlp = Mlp::init(&config, 3).unwrap();
    let model = GpuMlp::upload(&ctx, &mlp).unwrap();
    let gdata = GpuDataset::upload(&ctx, &data.as_images()).unwrap();
    let indices: Vec<u32> = (0..9).map(|i| (i * 5) % 23).collect();
    let samples = SampleSet {
        data: &gdata,
        indices: &indices,
        backdoor: None,
        seed: 0,
    };
    let (x, _) = batch_reference(&data, &indices, None, (0, 0));
    let (hidden, _) = mlp.forward_reference(&x, indices.len());
    let rows = indices.len();
    let mut det = Vae::new(VaeConfig {
        latent_dim: 3,
        kld_weight: 0.7,
        ..Default::default()
    })
    .unwrap();
    det.init(&config, &[0, 1], 11).unwrap();
    // Non-zero biases exercise every gradient path.
    for d in det.params_mut() {
        for (i, b) in d.bias.iter_mut().enumerate() {
            *b = 0.1 * ((i % 3) as f32 - 0.5);
        }
    }

    // Scores (z = mu) and the training pass (z sampled) against the f64 reference.
    for noise in [false, true] {
        let (got, _) = det
            .losses_and_gradients(&ctx, &model, &samples, rows, noise)
            .unwrap();
        let want = det.loss_reference(&hidden, rows, 0, noise).unwrap();
        for (l, (g, w)) in got.scores.iter().zip(&want).enumerate() {
            let g: Vec<f32> = g.iter().map(|&v| v as f32).collect();
            common::assert_close(&g, w, 1e-5, 1e-4, &format!("noise {noise} layer {l}"));
        }
    }
    let with_noise = det.loss_reference(&hidden, rows, 0, true).unwrap();
    let without = det.loss_reference(&hidden, rows, 0, false).unwrap();
    assert_ne!(with_noise, without, "the latent noise must change the loss");

    let (_, grads) = det
        .losses_and_gradients(&ctx, &model, &samples, rows, true)
        .unwrap();
    let grads = grads.unwrap();
    let h = 1e-4f32;
    let mut checked = 0;
    for (p, g) in grads.iter().enumerate() {
        for is_bias in [false, true] {
            let len = if is_bias {
                g.bias.len()
            } else {
                g.kernel.len()
            };
            for i in 0..len {
                let loss_at = |delta: f32| {
                    let mut d = det.clone();
                    let layer = &mut d.params_mut()[p];
                    let v = if is_bias {
                        &mut layer.bias[i]
                    } else {
                        &mut layer.kernel[i]
                    };
                    *v += delta;
                    let at = *v as f64;
                    (
                        mean_loss(&d.loss_reference(&hidden, rows, 0, true).unwrap()),
                        at,
                    )
                };
                let ((lp, vp), (lm, vm)) = (loss_at(h), loss_at(-h));
                let fd = (lp - lm) / (vp - vm);
                let got = if is_bias { g.bias[i] } else { g.kernel[i] } as f64;
                assert!(
                    (got - fd).abs() <= 2e-4 + 2e-3 * fd.abs(),
                    "parameter {p} {} {i}: gpu {got}, finite difference {fd}",
                    if is_bias { "bias" } else { "kernel" }
                );
                checked += 1;
            }
        }
    }
    // Layer 0 (7 wide): 7·14 + 14 + 14·6 + 6 + 3·14 + 14 + 14·7 + 7; layer 1 likewise.
    assert!(checked >= 300, "{checked}");
}

#[test]
fn a_planted_trigger_is_found_and_a_reload_scores_identically() {
    if common::gpu().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = common::backdoored_run(tmp.path());
    let env = TaskEnv { data_dir, seed: 0 };
    let task = BackdoorTaskConfig {
        backdoor: Backdoor {
            trigger: Trigger::Corner {
                corner: Corner::BottomRight,
            },
            p_backdoor: 1.0,
            target_class: 0,
        },
        ..BackdoorTaskConfig::default()
    };
    let run_path = tmp.path().join("classifier");
    let options = [("train.num_epochs", "20"), ("kld_weight", "0")];
    let (auroc, identical) =
        common::fit_and_eval("vae", &run_path, &env, task, &options, tmp.path());
    eprintln!("VAE on generated data: AUROC {auroc:.4}");
    assert!(identical, "a reload must score identically");
    assert!(auroc > 0.9, "AUROC {auroc}");

    let registry = Registry::builtin();
    for (key, value, msg) in [
        ("latent_dim", "0", "latent_dim must be >= 1"),
        ("kld_weight", "-1", "kld_weight must be a number >= 0"),
        ("train.num_epochs", "0", "num_epochs must be >= 1"),
    ] {
        let config = registry
            .detector("vae")
            .unwrap()
            .resolve(&vec![(key.to_string(), vec![value.to_string()])], false)
            .unwrap();
        let err = registry.build_detector("vae", &config).err().unwrap();
        assert!(format!("{err:#}").contains(msg), "{err:#}");
    }
}

/// The upstream's performance test on real MNIST (skipped without `../shared/data`):
/// a 128-128 MLP trained 3 epochs on a 5 % corner backdoor (here on 10 000 images), a
/// VAE per layer with latent 32 trained one epoch: AUROC > 0.97 per layer upstream.
#[test]
fn the_vae_finds_a_corner_backdoor_on_mnist() {
    if common::gpu().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some((run_path, env, task)) =
        common::mnist_corner_classifier(tmp.path(), vec![128, 128], 3)
    else {
        return;
    };
    let options = [("kld_weight", "0")];
    let (auroc, identical) =
        common::fit_and_eval("vae", &run_path, &env, task.clone(), &options, tmp.path());
    let (with_kl, _) =
        common::fit_and_eval("vae", &run_path, &env, task, &[], &tmp.path().join("kl"));
    eprintln!("VAE on MNIST: AUROC {auroc:.4} (kld_weight 0), {with_kl:.4} (kld_weight 1)");
    assert!(identical);
    assert!(auroc > 0.97, "AUROC {auroc}");
}

#[test]
fn an_unfitted_or_mismatched_vae_is_an_error() {
    let Some(ctx) = common::gpu() else { return };
    let config = MlpConfig {
        input_shape: [6, 5, 1],
        conv_channels: Vec::new(),
        hidden_dims: vec![7, 4],
        output_dim: 10,
    };
    let mlp = Mlp::init(&config, 3).unwrap();
    let model = GpuMlp::upload(&ctx, &mlp).unwrap();
    let data = Dataset::synthetic(5, 6, 5, 4);
    let gdata = GpuDataset::upload(&ctx, &data.as_images()).unwrap();
    let samples = SampleSet {
        data: &gdata,
        indices: &[0, 1, 2],
        backdoor: None,
        seed: 0,
    };
    let det = Vae::new(VaeConfig::default()).unwrap();
    let err = det.layer_scores(&ctx, &model, &samples, 8).err().unwrap();
    assert!(format!("{err:#}").contains("not fitted"), "{err:#}");
    let mut det = Vae::new(VaeConfig::default()).unwrap();
    let other = MlpConfig {
        hidden_dims: vec![7, 5],
        ..config.clone()
    };
    det.init(&other, &[0], 1).unwrap();
    let err = det.layer_scores(&ctx, &model, &samples, 8).err().unwrap();
    assert!(
        format!("{err:#}").contains("trained for the model"),
        "{err:#}"
    );
    assert!(
        det.init(&config, &[2], 1).is_err(),
        "layer 2 does not exist"
    );
}
