//! The finetuning detector: its KL against a direct f64 formula, the classifier left
//! untouched by the fit (the upstream once finetuned the original), a planted trigger
//! found, a reload that scores identically, bad options and a mismatched model refused.

mod common;

use cupbearer::data::backdoor::{Backdoor, Corner, Trigger};
use cupbearer::detectors::finetuning::kl_of_logits;
use cupbearer::registry::{Registry, TaskEnv};
use cupbearer::run::MODEL_FILE;
use cupbearer::tasks::backdoor::BackdoorTaskConfig;

#[test]
fn kl_of_logits_matches_the_definition() {
    let (p, q) = ([2.0f32, -1.0, 0.5], [0.0f32, 1.0, 3.0]);
    let softmax = |z: &[f32]| -> Vec<f64> {
        let e: Vec<f64> = z.iter().map(|&v| (v as f64).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    };
    let (sp, sq) = (softmax(&p), softmax(&q));
    let want: f64 = sp.iter().zip(&sq).map(|(a, b)| a * (a / b).ln()).sum();
    assert!((kl_of_logits(&p, &q) - want).abs() < 1e-12);
    assert_eq!(kl_of_logits(&p, &p), 0.0);
    // Shifting logits changes nothing; huge logits do not overflow.
    let shifted = p.map(|v| v + 500.0);
    assert!((kl_of_logits(&shifted, &q) - want).abs() < 1e-9);
}

#[test]
fn the_fit_finetunes_a_copy_and_a_reload_scores_identically() {
    if common::gpu().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = common::backdoored_run(tmp.path());
    let run_path = tmp.path().join("classifier");
    let weights = std::fs::read(run_path.join(MODEL_FILE)).unwrap();
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
    let options = [("train.num_epochs", "3"), ("train.learning_rate", "0.003")];
    let (auroc, identical) =
        common::fit_and_eval("finetuning", &run_path, &env, task, &options, tmp.path());
    // On these generated images the corner pixel is 0 in every clean image, so clean
    // finetuning never moves the weights that read it: the backdoor survives intact and
    // the score does not find it (see the MNIST test below for the real case).
    eprintln!("finetuning on generated data: AUROC {auroc:.4}");
    assert!(identical, "a reload must score identically");
    assert_eq!(
        std::fs::read(run_path.join(MODEL_FILE)).unwrap(),
        weights,
        "the fit must finetune a copy, not the classifier"
    );

    let registry = Registry::builtin();
    for (key, value, msg) in [
        ("train.num_epochs", "0", "num_epochs >= 1"),
        (
            "train.learning_rate",
            "-1",
            "learning_rate must be a number > 0",
        ),
    ] {
        let config = registry
            .detector("finetuning")
            .unwrap()
            .resolve(&vec![(key.to_string(), vec![value.to_string()])], false)
            .unwrap();
        let err = registry
            .build_detector("finetuning", &config)
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains(msg), "{err:#}");
    }
}

/// The planted trigger on real MNIST (skipped without `../shared/data/mnist`): a
/// classifier trained 2 epochs on 10 000 images with a 5 % corner backdoor; one epoch of
/// clean finetuning moves its predictions on triggered images more than on clean ones.
#[test]
fn finetuning_finds_a_corner_backdoor_on_mnist() {
    if common::gpu().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some((run_path, env, task)) =
        common::mnist_corner_classifier(tmp.path(), vec![256, 256], 2)
    else {
        return;
    };
    let (auroc, identical) =
        common::fit_and_eval("finetuning", &run_path, &env, task, &[], tmp.path());
    eprintln!("finetuning on MNIST: AUROC {auroc:.4}");
    assert!(identical);
    assert!(auroc > 0.8, "AUROC {auroc}");
}
