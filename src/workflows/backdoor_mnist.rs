//! The seed pipeline (`examples/backdoor_mnist.rs`): train an MLP on MNIST with a
//! corner-pixel backdoor (5 % of the images poisoned), fit a Mahalanobis detector on clean
//! training activations, evaluate it on the corner trigger and on the noise-0.2
//! ablation. Run dirs and plots go under `out`.

use std::path::{Path, PathBuf};
use web_time::Instant;

use anyhow::{Context, Result};

use super::classifier::{train_classifier, ClassifierMetrics, RunOptions};
use super::detector::{
    eval_detector, train_detector, DetectorSource, EvalOptions, EvalReport, FitOptions,
};
use super::Output;
use crate::data::backdoor::{Backdoor, Corner, Trigger};
use crate::data::{download, Dataset, DatasetName, Split};
use crate::detectors::mahalanobis::MahalanobisConfig;
use crate::io::SaveDtype;
use crate::model::MlpConfig;
use crate::registry::{Registry, TaskEnv};
use crate::run::{ClassifierRunConfig, TrainDataConfig, TrainingConfig};
use crate::tasks::backdoor::{AnomalousSplit, BackdoorTaskConfig};
use crate::tasks::Task;

pub struct PipelineOptions {
    /// MNIST is downloaded here when missing.
    pub data_dir: PathBuf,
    pub epochs: usize,
    pub seed: u32,
    /// A small smoke run: 2 epochs on the first 20 000 training images.
    pub quick: bool,
    /// Where the run directories go (replaced).
    pub out: PathBuf,
    pub progress: bool,
}

/// What the pipeline measured.
pub struct PipelineReport {
    pub classifier: ClassifierMetrics,
    pub corner: EvalReport,
    pub noise: EvalReport,
    pub train_seconds: f64,
    pub fit_seconds: f64,
    pub corner_seconds: f64,
    pub noise_seconds: f64,
}

pub fn run(opts: &PipelineOptions) -> Result<PipelineReport> {
    let data_dir = &opts.data_dir;
    if let Err(e) = Dataset::load(DatasetName::Mnist, Split::Test, data_dir) {
        eprintln!("{e:#}\n-> downloading MNIST into {}", data_dir.display());
        download::download(DatasetName::Mnist, data_dir, &[]).context(
            "MNIST is neither present nor downloadable; put the four IDX files into \
             <data dir>/mnist/ or point --data-dir at them",
        )?;
    }
    let backdoor = Backdoor {
        trigger: Trigger::Corner {
            corner: Corner::TopLeft,
        },
        p_backdoor: 0.05,
        target_class: 0,
    };
    let quick_size = opts.quick.then_some(20_000);
    let config = ClassifierRunConfig::new(
        TrainDataConfig {
            dataset: DatasetName::Mnist,
            max_size: quick_size,
            backdoor: Some(backdoor),
            augment: None,
        },
        MlpConfig {
            input_shape: [28, 28, 1],
            conv_channels: Vec::new(),
            hidden_dims: vec![256, 256],
            output_dim: 10,
        },
        TrainingConfig {
            num_epochs: if opts.quick { 2 } else { opts.epochs },
            seed: opts.seed,
            ..TrainingConfig::default()
        },
    );
    let start = Instant::now();
    let dir = opts.out.join("classifier");
    let classifier = train_classifier(
        config,
        &RunOptions {
            dir: Some(dir.clone()),
            test_limit: None,
            data_dir: data_dir.clone(),
            overwrite: true,
            eval_batch_size: 2048,
            progress: opts.progress,
            dtype: SaveDtype::F32,
        },
    )?;
    let train_seconds = start.elapsed().as_secs_f64();

    // The detector task: clean training data to fit on, corner-triggered test images
    // as anomalies; the ablation swaps the trigger for plain Gaussian noise.
    let registry = Registry::builtin();
    let env = TaskEnv {
        data_dir: data_dir.clone(),
        seed: opts.seed,
    };
    let task = |trigger: Trigger| -> Result<Box<dyn Task>> {
        let config = BackdoorTaskConfig {
            run_path: dir.clone(),
            backdoor: Backdoor {
                trigger,
                p_backdoor: 1.0,
                ..backdoor
            },
            max_train_size: quick_size,
            anomalous_split: AnomalousSplit::Test,
            ..BackdoorTaskConfig::default()
        };
        registry.build_task("backdoor", &serde_json::to_value(config)?, &env)
    };
    let corner_task = task(backdoor.trigger)?;
    let det_dir = opts.out.join("detector");
    let start = Instant::now();
    let detector = registry.build_detector(
        "mahalanobis",
        &serde_json::to_value(MahalanobisConfig::default())?,
    )?;
    train_detector(
        corner_task.as_ref(),
        detector,
        &FitOptions {
            seed: opts.seed,
            ..FitOptions::default()
        },
        &replace(&det_dir, opts.progress),
    )?;
    let fit_seconds = start.elapsed().as_secs_f64();
    let detector = DetectorSource::Run(det_dir.clone());
    let eval = EvalOptions {
        registry: &registry,
        batch_size: 2048,
        seed: opts.seed,
        aggregation: None,
    };
    let evaluate = |task: &dyn Task, out: &str| -> Result<(EvalReport, f64)> {
        let start = Instant::now();
        let dir = opts.out.join(out);
        let r = eval_detector(task, &detector, &eval, &replace(&dir, opts.progress))?;
        Ok((r, start.elapsed().as_secs_f64()))
    };
    let (corner, corner_seconds) = evaluate(corner_task.as_ref(), "eval_corner")?;
    let noise_task = task(Trigger::Noise {
        std: 0.2,
        clip: true,
    })?;
    let (noise, noise_seconds) = evaluate(noise_task.as_ref(), "eval_noise")?;
    Ok(PipelineReport {
        classifier,
        corner,
        noise,
        train_seconds,
        fit_seconds,
        corner_seconds,
        noise_seconds,
    })
}

/// Writes into `dir`, replacing earlier outputs.
fn replace(dir: &Path, progress: bool) -> Output<'_> {
    Output {
        dir: Some(dir),
        overwrite: true,
        progress,
    }
}
