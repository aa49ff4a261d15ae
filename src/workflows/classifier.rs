//! The `train-classifier` workflow: load data, train on the GPU, evaluate clean accuracy
//! and attack success, write the run directory.

use std::path::PathBuf;
use web_time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::context;
use crate::data::backdoor::Backdoor;
use crate::data::backdoor::WANET_GRID_FILE;
use crate::data::{Dataset, Split};
use crate::gpu::batch::GpuDataset;
use crate::gpu::shaders::Override;
use crate::gpu::{block_on, GpuContext};
use crate::io::{store_as, write_json, SaveDtype};
use crate::model::train::{test_results, train, EpochMetrics, TestResults, TestSet, TrainOptions};
use crate::model::{GpuMlp, Mlp};
use crate::run::{refuse_overwrite, ClassifierRunConfig, CONFIG_FILE, METRICS_FILE, MODEL_FILE};

pub struct RunOptions {
    /// The run directory to create (or add to); None writes nothing (`--debug`).
    pub dir: Option<PathBuf>,
    /// Evaluate on the first N test samples only (`--debug`).
    pub test_limit: Option<usize>,
    pub data_dir: PathBuf,
    pub overwrite: bool,
    pub eval_batch_size: usize,
    pub progress: bool,
    /// Precision of `model.safetensors` (metrics are measured before rounding).
    pub dtype: SaveDtype,
}

/// `metrics.json` of a classifier run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClassifierMetrics {
    pub clean_test_accuracy: f64,
    pub clean_test_loss: f64,
    /// Fraction of triggered test images (true label != target) classified as target.
    pub attack_success_rate: Option<f64>,
    pub attack_samples: usize,
    pub epochs: Vec<EpochMetrics>,
    pub steps: usize,
    pub samples_per_second: f64,
    pub train_seconds: f64,
    pub wall_seconds: f64,
    pub adapter: String,
    /// Kernel files replaced by `--shader-dir` (name, path, SHA-256); none: built-in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_overrides: Vec<Override>,
}

impl ClassifierMetrics {
    pub fn summary(&self) -> String {
        let asr = self
            .attack_success_rate
            .map_or(String::new(), |a| format!(", attack success {a:.4}"));
        format!(
            "clean test accuracy {:.4}{asr}; {} steps in {:.1} s ({:.0} samples/s)",
            self.clean_test_accuracy, self.steps, self.train_seconds, self.samples_per_second
        )
    }
}

/// Runs the whole command. `config.model`'s input shape is taken from the data set.
/// Files are written only after training and evaluation succeed.
pub fn train_classifier(
    mut config: ClassifierRunConfig,
    opts: &RunOptions,
) -> Result<ClassifierMetrics> {
    let wall = Instant::now();
    let files = [CONFIG_FILE, MODEL_FILE, METRICS_FILE, WANET_GRID_FILE];
    let _claim = opts.dir.as_deref().map(super::claim).transpose()?;
    if let Some(dir) = &opts.dir {
        refuse_overwrite(dir, &files, opts.overwrite)?;
    }
    if opts.eval_batch_size == 0 {
        bail!("the evaluation batch size must be >= 1");
    }
    let Some(t) = config.training.clone() else {
        bail!("train-classifier needs a training configuration");
    };
    if t.num_epochs == 0 {
        bail!("--num_epochs must be >= 1: zero epochs would store an untrained model");
    }

    let dataset = config.train_data.dataset;
    let mut train_set = Dataset::load(dataset, Split::Train, &opts.data_dir)?;
    if let Some(n) = config.train_data.max_size {
        if n == 0 || n > train_set.len() {
            bail!(
                "max_size {n} out of range: {dataset} has {} training samples",
                train_set.len()
            );
        }
        train_set.truncate(n);
    }
    if let Some(a) = &config.train_data.augment {
        a.validate(train_set.height, train_set.width)?;
    }
    let mut test_set = Dataset::load(dataset, Split::Test, &opts.data_dir)?;
    if let Some(n) = opts.test_limit {
        test_set.truncate(n);
    }
    let mlp_config = config.model.layers_mut();
    mlp_config.input_shape = [train_set.height, train_set.width, train_set.channels];

    let ctx = context(opts.progress)?;
    let model = GpuMlp::upload(&ctx, &Mlp::init(mlp_config, t.seed)?)?;
    let train_gpu = GpuDataset::upload(&ctx, &train_set.as_images())?;
    drop(train_set);
    let report = train(
        &ctx,
        &model,
        &train_gpu,
        &TrainOptions {
            epochs: t.num_epochs,
            batch_size: t.batch_size,
            learning_rate: t.learning_rate,
            lr_schedule: t.lr_schedule,
            seed: t.seed,
            max_steps: t.max_steps,
            backdoor: config.train_data.backdoor,
            augment: config.train_data.augment,
            progress: opts.progress,
        },
    )?;
    drop(train_gpu);

    let test = evaluate_test(
        &ctx,
        &model,
        &test_set,
        config.train_data.backdoor.as_ref(),
        t.seed,
        opts.eval_batch_size,
    )?;
    let trained = model.download(&ctx)?;

    let metrics = ClassifierMetrics {
        clean_test_accuracy: test.clean.accuracy,
        clean_test_loss: test.clean.loss,
        attack_success_rate: test.attack_success_rate,
        attack_samples: test.attack_samples,
        steps: report.steps,
        samples_per_second: report.samples_per_second,
        train_seconds: report.seconds,
        epochs: report.epochs,
        wall_seconds: wall.elapsed().as_secs_f64(),
        adapter: ctx.adapter_name(),
        kernel_overrides: ctx.shaders.overrides(),
    };
    if let Some(dir) = &opts.dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_json(&dir.join(CONFIG_FILE), &config)?;
        trained.save(&dir.join(MODEL_FILE))?;
        store_as(&dir.join(MODEL_FILE), opts.dtype)?;
        if let Some(b) = &config.train_data.backdoor {
            b.store_grid(dir)?;
        }
        write_json(&dir.join(METRICS_FILE), &metrics)?;
    }
    Ok(metrics)
}

/// [`test_results`] on `test_set`, uploaded for the purpose.
pub(super) fn evaluate_test(
    ctx: &GpuContext,
    model: &GpuMlp,
    test_set: &Dataset,
    backdoor: Option<&Backdoor>,
    seed: u32,
    batch: usize,
) -> Result<TestResults> {
    let test_gpu = GpuDataset::upload(ctx, &test_set.as_images())?;
    let test = TestSet {
        data: &test_gpu,
        labels: &test_set.labels,
    };
    block_on(test_results(ctx, model, &test, backdoor, seed, batch))
}
