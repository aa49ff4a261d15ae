//! Shared test helpers: a GPU context (or a skip), and deterministic random data.
#![allow(dead_code)]

pub mod fixtures;
pub mod mean_distance;

use std::path::Path;

use cupbearer::data::{idx, Dataset};
use cupbearer::gpu::GpuContext;

/// A context on whatever adapter exists. Without one, tests skip, except under CI
/// (where a missing driver must fail the run).
pub fn gpu() -> Option<GpuContext> {
    match GpuContext::new() {
        Ok(ctx) => Some(ctx),
        Err(e) if std::env::var_os("CI").is_some() => panic!("no GPU adapter under CI: {e:#}"),
        Err(e) => {
            eprintln!("skipping GPU test: {e:#}");
            None
        }
    }
}

/// Uniform values in [-1, 1), deterministic in `seed`.
pub fn random(len: usize, seed: u32) -> Vec<f32> {
    (0..len as u32)
        .map(|i| cupbearer::rng::rand_unit(cupbearer::rng::rand_u32(seed, 99, i, 0, 0)) * 2.0 - 1.0)
        .collect()
}

/// |got - want| <= atol + rtol * |want| for every element.
pub fn assert_close(got: &[f32], want: &[f64], atol: f64, rtol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= atol + rtol * w.abs(),
            "{what}: element {i}: got {g}, want {w} (error {err:e})"
        );
    }
}

/// Writes a synthetic data set as MNIST-named IDX files under `dir/mnist/`.
pub fn write_mnist_like(dir: &Path, train: &Dataset, test: &Dataset) {
    let d = dir.join("mnist");
    std::fs::create_dir_all(&d).unwrap();
    for (prefix, set) in [("train", train), ("t10k", test)] {
        idx::write_images(
            &d.join(format!("{prefix}-images-idx3-ubyte.gz")),
            set.height,
            set.width,
            &set.images,
            true,
        )
        .unwrap();
        idx::write_labels(
            &d.join(format!("{prefix}-labels-idx1-ubyte.gz")),
            &set.labels,
            true,
        )
        .unwrap();
    }
}

/// The tests' MNIST stand-in under `dir/mnist/`: 1000 training and 400 test 12x10
/// synthetic images.
pub fn write_small_mnist(dir: &Path) {
    write_mnist_like(
        dir,
        &Dataset::synthetic(1000, 12, 10, 1),
        &Dataset::synthetic(400, 12, 10, 2),
    );
}

/// A classifier run at `dir/classifier`, trained on [`write_small_mnist`] data (written to
/// `dir/data`, returned) poisoned with a bottom-right corner trigger on 20 % of the
/// images (target 0): 48-32 MLP, 4 epochs, attack success checked above 0.9.
pub fn backdoored_run(dir: &Path) -> std::path::PathBuf {
    use cupbearer::data::backdoor::{Corner, Trigger};
    backdoored_run_with(
        dir,
        Trigger::Corner {
            corner: Corner::BottomRight,
        },
    )
}

/// [`backdoored_run`] with another trigger.
pub fn backdoored_run_with(
    dir: &Path,
    trigger: cupbearer::data::backdoor::Trigger,
) -> std::path::PathBuf {
    use cupbearer::data::backdoor::Backdoor;
    use cupbearer::data::DatasetName;
    use cupbearer::model::MlpConfig;
    use cupbearer::run::{ClassifierRunConfig, TrainDataConfig, TrainingConfig};

    let data_dir = dir.join("data");
    write_small_mnist(&data_dir);
    let backdoor = Backdoor {
        trigger,
        p_backdoor: 0.2,
        target_class: 0,
    };
    let config = ClassifierRunConfig::new(
        TrainDataConfig {
            dataset: DatasetName::Mnist,
            max_size: None,
            backdoor: Some(backdoor),
            augment: None,
        },
        MlpConfig {
            hidden_dims: vec![48, 32],
            output_dim: 10,
            ..MlpConfig::default()
        },
        TrainingConfig {
            num_epochs: 4,
            ..TrainingConfig::default()
        },
    );
    let metrics = classifier_run(config, &dir.join("classifier"), &data_dir);
    assert!(
        metrics.attack_success_rate.unwrap() > 0.9,
        "{}",
        metrics.summary()
    );
    data_dir
}

/// Trains `config` into the run dir `run` on the data under `data_dir`, quietly.
pub fn classifier_run(
    config: cupbearer::run::ClassifierRunConfig,
    run: &Path,
    data_dir: &Path,
) -> cupbearer::workflows::classifier::ClassifierMetrics {
    use cupbearer::workflows::classifier::{train_classifier, RunOptions};
    train_classifier(
        config,
        &RunOptions {
            dir: Some(run.to_path_buf()),
            test_limit: None,
            data_dir: data_dir.to_path_buf(),
            overwrite: false,
            eval_batch_size: 512,
            progress: false,
            dtype: Default::default(),
        },
    )
    .unwrap()
}

fn quiet(dir: &Path) -> cupbearer::workflows::Output<'_> {
    cupbearer::workflows::Output {
        dir: Some(dir),
        overwrite: false,
        progress: false,
    }
}

/// Fits `detector` (with `options`) on the backdoor task of `run_path`, evaluates it
/// twice (the second from the stored state) into `out`: the AUROC, and whether both
/// evaluations wrote the same scores.
pub fn fit_and_eval(
    detector: &str,
    run_path: &Path,
    env: &cupbearer::registry::TaskEnv,
    task: cupbearer::tasks::backdoor::BackdoorTaskConfig,
    options: &[(&str, &str)],
    out: &Path,
) -> (f64, bool) {
    use cupbearer::workflows::detector::{
        eval_detector, train_detector, DetectorSource, EvalOptions, FitOptions,
    };
    let registry = cupbearer::registry::Registry::builtin();
    let task = cupbearer::tasks::backdoor::BackdoorTaskConfig {
        run_path: run_path.to_path_buf(),
        ..task
    };
    let task = registry
        .build_task("backdoor", &serde_json::to_value(task).unwrap(), env)
        .unwrap();
    let options: Vec<(String, Vec<String>)> = options
        .iter()
        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
        .collect();
    let config = registry
        .detector(detector)
        .unwrap()
        .resolve(&options, false)
        .unwrap();
    let built = registry.build_detector(detector, &config).unwrap();
    let det_dir = out.join("det");
    train_detector(
        task.as_ref(),
        built,
        &FitOptions::default(),
        &quiet(&det_dir),
    )
    .unwrap();
    let opts = EvalOptions {
        registry: &registry,
        batch_size: 256,
        seed: 0,
        aggregation: None,
    };
    let source = DetectorSource::Run(det_dir);
    let first = eval_detector(task.as_ref(), &source, &opts, &quiet(&out.join("e1"))).unwrap();
    eval_detector(task.as_ref(), &source, &opts, &quiet(&out.join("e2"))).unwrap();
    let scores = |d: &str| std::fs::read(out.join(d).join("scores.csv")).unwrap();
    (first.auc_roc, scores("e1") == scores("e2"))
}

/// A corner-backdoored (p 0.05, top-left) MLP of `hidden_dims` trained `epochs` epochs on
/// the first 10 000 images of the real MNIST in `../shared/data` (None, with a note, when
/// that is absent), written to `dir/classifier`; with the task that detects its trigger
/// (10 000 trusted images, a 2 000-image test mix).
pub fn mnist_corner_classifier(
    dir: &Path,
    hidden_dims: Vec<usize>,
    epochs: usize,
) -> Option<(
    std::path::PathBuf,
    cupbearer::registry::TaskEnv,
    cupbearer::tasks::backdoor::BackdoorTaskConfig,
)> {
    use cupbearer::data::backdoor::{Backdoor, Corner, Trigger};
    use cupbearer::data::DatasetName;
    use cupbearer::model::MlpConfig;
    use cupbearer::run::{ClassifierRunConfig, TrainDataConfig, TrainingConfig};
    let data_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if !data_dir.join("mnist").is_dir() {
        eprintln!("skipping: no MNIST at {}", data_dir.display());
        return None;
    }
    let backdoor = Backdoor {
        trigger: Trigger::Corner {
            corner: Corner::TopLeft,
        },
        p_backdoor: 0.05,
        target_class: 0,
    };
    let config = ClassifierRunConfig::new(
        TrainDataConfig {
            dataset: DatasetName::Mnist,
            max_size: Some(10_000),
            backdoor: Some(backdoor),
            augment: None,
        },
        MlpConfig {
            hidden_dims,
            output_dim: 10,
            ..MlpConfig::default()
        },
        TrainingConfig {
            num_epochs: epochs,
            ..TrainingConfig::default()
        },
    );
    let run_path = dir.join("classifier");
    let metrics = classifier_run(config, &run_path, &data_dir);
    assert!(
        metrics.attack_success_rate.unwrap() > 0.8,
        "{}",
        metrics.summary()
    );
    let task = cupbearer::tasks::backdoor::BackdoorTaskConfig {
        backdoor: Backdoor {
            p_backdoor: 1.0,
            ..backdoor
        },
        max_train_size: Some(10_000),
        max_test_size: Some(2_000),
        ..Default::default()
    };
    Some((
        run_path,
        cupbearer::registry::TaskEnv { data_dir, seed: 0 },
        task,
    ))
}
