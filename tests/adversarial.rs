//! FGSM and PGD on a trained model: they raise the loss, stay inside the L∞ ball and
//! the pixel range, and are reproducible.

mod common;

use common::gpu;
use cupbearer::data::Dataset;
use cupbearer::gpu::batch::GpuDataset;
use cupbearer::model::attack::{attack, AttackConfig, AttackMethod};
use cupbearer::model::train::{evaluate, train, LrSchedule, TrainOptions};
use cupbearer::model::{GpuMlp, Mlp, MlpConfig};

#[test]
fn fgsm_and_pgd_raise_the_loss_within_eps() {
    let Some(ctx) = gpu() else { return };
    let data = Dataset::synthetic(300, 9, 11, 5);
    let config = MlpConfig {
        input_shape: [9, 11, 1],
        conv_channels: Vec::new(),
        hidden_dims: vec![24, 16],
        output_dim: 10,
    };
    // An odd count: a partial last batch.
    let indices: Vec<u32> = (0..77).map(|i| (i * 3) % 300).collect();
    let model = GpuMlp::upload(&ctx, &Mlp::init(&config, 1).unwrap()).unwrap();
    let gdata = GpuDataset::upload(&ctx, &data.as_images()).unwrap();
    let opts = TrainOptions {
        epochs: 20,
        batch_size: 32,
        learning_rate: 3e-3,
        lr_schedule: LrSchedule::Constant,
        seed: 0,
        max_steps: None,
        backdoor: None,
        progress: false,
        augment: None,
    };
    train(&ctx, &model, &gdata, &opts).unwrap();
    let clean = evaluate(&ctx, &model, &gdata, &indices, None, 0, 64).unwrap();
    let d = 99;
    let eps = 0.15;
    let mut fgsm = AttackConfig::new(AttackMethod::Fgsm, eps, 1, None);
    fgsm.batch_size = 20;
    let mut pgd = AttackConfig::new(AttackMethod::Pgd, eps, 7, None);
    pgd.batch_size = 20;
    for config in [&fgsm, &pgd] {
        let out = attack(&ctx, &model, &gdata, &indices, config, false).unwrap();
        let what = format!("{:?}", config.method);
        assert_eq!(out.images.len(), indices.len() * d, "{what}");
        assert!(
            (out.original_accuracy() - clean.accuracy).abs() < 1e-9,
            "{what}"
        );
        assert!((out.original_loss() - clean.loss).abs() < 1e-5, "{what}");
        assert!(
            clean.accuracy > 0.9,
            "the model must have learned: {}",
            clean.accuracy
        );
        assert!(
            out.new_loss() > out.original_loss() + 0.5,
            "{what}: loss {} -> {}",
            out.original_loss(),
            out.new_loss()
        );
        assert!(out.new_accuracy() < out.original_accuracy(), "{what}");
        for (r, &s) in indices.iter().enumerate() {
            for (p, &clean) in data.image(s as usize).iter().enumerate() {
                let x = clean as f32 / 255.0;
                let adv = out.images[r * d + p];
                assert!(
                    (0.0..=1.0).contains(&adv),
                    "{what}: pixel {adv} out of range"
                );
                assert!(
                    (adv - x).abs() <= eps + 1e-6,
                    "{what}: sample {r} pixel {p} left the ball"
                );
                if config.method == AttackMethod::Fgsm {
                    // One signed step: ±eps, unless clipped at 0/1 or a zero gradient.
                    let moved = (adv - x).abs();
                    let clipped = adv == 0.0 || adv == 1.0;
                    assert!(
                        moved == 0.0 || (moved - eps).abs() < 1e-6 || clipped,
                        "{what}: sample {r} pixel {p} moved {moved}"
                    );
                }
            }
        }
    }
    // The random start is seeded: the same seed gives the same examples, another seed not.
    let a = attack(&ctx, &model, &gdata, &indices, &pgd, false).unwrap();
    let b = attack(&ctx, &model, &gdata, &indices, &pgd, false).unwrap();
    assert_eq!(a.images, b.images);
    pgd.seed = 1;
    let c = attack(&ctx, &model, &gdata, &indices, &pgd, false).unwrap();
    assert_ne!(a.images, c.images);
}
