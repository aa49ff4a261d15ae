//! `cupbearer train-classifier`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde::Serialize;

use crate::data::backdoor::{Backdoor, Corner, Trigger};
use crate::data::{resolve_data_dir, Dataset, DatasetName, Split};
use crate::gpu::batch::GpuDataset;
use crate::gpu::GpuContext;
use crate::io::write_json;
use crate::model::train::{evaluate, train, EpochMetrics, TrainOptions};
use crate::model::{GpuMlp, Mlp, MlpConfig};
use crate::run::{
    refuse_overwrite, resolve_run_dir, ClassifierRunConfig, ModelConfig, TrainDataConfig,
    TrainingConfig, CONFIG_FILE, METRICS_FILE, MODEL_FILE,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TriggerKind {
    Corner,
    Noise,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModelKind {
    Mlp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Optimizer {
    Adam,
}

#[derive(clap::Args)]
pub struct Args {
    /// Training data: a data set (mnist, fashion_mnist), or `backdoor` = a data set
    /// (--train_data.original) poisoned with a trigger (--train_data.backdoor).
    #[arg(long, value_name = "DATA")]
    train_data: String,
    /// The clean data set under a backdoor: mnist or fashion_mnist.
    #[arg(long, value_name = "DATASET")]
    train_data_original: Option<DatasetName>,
    /// Trigger of the training backdoor.
    #[arg(long, value_enum, value_name = "TRIGGER")]
    train_data_backdoor: Option<TriggerKind>,
    /// Fraction of training samples poisoned (per epoch). The original's default of 1.0
    /// poisons every image and yields a constant classifier; 0.05 is what it intended.
    #[arg(long, default_value_t = 0.05, value_name = "P")]
    train_data_backdoor_p_backdoor: f32,
    /// Trigger pixel: top-left, top-right, bottom-left or bottom-right (the names mean
    /// what they say; the original swapped top-right and bottom-left).
    #[arg(long, default_value = "top-left", value_name = "CORNER")]
    train_data_backdoor_corner: Corner,
    /// Label given to poisoned samples.
    #[arg(long, default_value_t = 0, value_name = "CLASS")]
    train_data_backdoor_target_class: u32,
    /// Standard deviation of the noise trigger.
    #[arg(long, default_value_t = 0.3, value_name = "STD")]
    train_data_backdoor_std: f32,
    /// Clip noisy images to [0, 1] (the original 0.0.1 did not).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    train_data_backdoor_clip: bool,
    /// Use only the first N training samples.
    #[arg(long, value_name = "N")]
    train_data_max_size: Option<usize>,
    /// Model architecture.
    #[arg(long, value_enum, default_value = "mlp")]
    model: ModelKind,
    /// Widths of the hidden layers.
    #[arg(long, num_args = 1.., default_values_t = [256, 256], value_name = "N")]
    model_hidden_dims: Vec<usize>,
    /// Number of outputs (classes).
    #[arg(long, default_value_t = 10, value_name = "N")]
    model_output_dim: usize,
    /// Accepted for compatibility; must equal --model.output_dim.
    #[arg(long, default_value_t = 10, value_name = "N")]
    num_classes: usize,
    #[arg(long, default_value_t = 10, value_name = "N")]
    num_epochs: usize,
    #[arg(long, default_value_t = 128, value_name = "N")]
    batch_size: usize,
    /// Batch size of the final evaluation.
    #[arg(long, default_value_t = 2048, value_name = "N")]
    max_batch_size: usize,
    /// Stop after this many optimisation steps in total.
    #[arg(long, value_name = "N")]
    max_steps: Option<usize>,
    #[arg(long, value_enum, default_value = "adam")]
    optim: Optimizer,
    #[arg(long, default_value_t = 1e-3, value_name = "LR")]
    optim_learning_rate: f32,
    /// Seeds initialisation, shuffling, coin flips and noise: same seed, same weights.
    #[arg(long, default_value_t = 0)]
    seed: u32,
    /// Output directory (the run dir).
    #[arg(long, value_name = "DIR")]
    dir_full: Option<PathBuf>,
    /// Parent of the run dir when --dir.full is not given.
    #[arg(long, default_value = "logs/train_classifier", value_name = "DIR")]
    dir_base: PathBuf,
    /// Name of the run dir under --dir.base [default: the current time].
    #[arg(long, value_name = "NAME")]
    dir_run: Option<String>,
    /// Data directory [default: $CUPBEARER_DATA_DIR, else ./data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Replace an existing model in the run dir.
    #[arg(long)]
    overwrite: bool,
    /// No progress bars or per-epoch lines.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Serialize)]
struct Metrics {
    clean_test_accuracy: f64,
    clean_test_loss: f64,
    /// Fraction of triggered test images (true label != target) classified as target.
    attack_success_rate: Option<f64>,
    attack_samples: usize,
    epochs: Vec<EpochMetrics>,
    steps: usize,
    samples_per_second: f64,
    train_seconds: f64,
    wall_seconds: f64,
    adapter: String,
}

impl Args {
    fn resolve(&self) -> Result<ClassifierRunConfig> {
        let (dataset, backdoor) = match self.train_data.as_str() {
            "backdoor" => {
                let original = self.train_data_original.context(
                    "--train_data backdoor needs --train_data.original (mnist or fashion_mnist)",
                )?;
                let kind = self.train_data_backdoor.context(
                    "--train_data backdoor needs --train_data.backdoor (corner or noise)",
                )?;
                let trigger = match kind {
                    TriggerKind::Corner => Trigger::Corner {
                        corner: self.train_data_backdoor_corner,
                    },
                    TriggerKind::Noise => Trigger::Noise {
                        std: self.train_data_backdoor_std,
                        clip: self.train_data_backdoor_clip,
                    },
                };
                let b = Backdoor {
                    trigger,
                    p_backdoor: self.train_data_backdoor_p_backdoor,
                    target_class: self.train_data_backdoor_target_class,
                };
                b.validate(self.model_output_dim)?;
                (original, Some(b))
            }
            name => (
                DatasetName::parse(name)
                    .context("--train_data takes `backdoor` or a data set name")?,
                None,
            ),
        };
        if self.num_classes != self.model_output_dim {
            bail!(
                "--num_classes {} differs from --model.output_dim {}",
                self.num_classes,
                self.model_output_dim
            );
        }
        if self.max_batch_size == 0 {
            bail!("--max_batch_size must be >= 1");
        }
        let ModelKind::Mlp = self.model;
        let Optimizer::Adam = self.optim;
        Ok(ClassifierRunConfig {
            command: "train-classifier".into(),
            cupbearer_version: env!("CARGO_PKG_VERSION").into(),
            train_data: TrainDataConfig {
                dataset,
                max_size: self.train_data_max_size,
                backdoor,
            },
            // The input shape is filled in from the data set.
            model: ModelConfig::Mlp(MlpConfig {
                input_shape: [0; 3],
                hidden_dims: self.model_hidden_dims.clone(),
                output_dim: self.model_output_dim,
            }),
            training: TrainingConfig {
                optimizer: "adam".into(),
                learning_rate: self.optim_learning_rate,
                num_epochs: self.num_epochs,
                batch_size: self.batch_size,
                max_steps: self.max_steps,
                seed: self.seed,
            },
        })
    }
}

pub fn run(args: Args) -> Result<()> {
    let wall = Instant::now();
    let mut config = args.resolve()?;
    let dir = resolve_run_dir(
        args.dir_full.as_deref(),
        &args.dir_base,
        args.dir_run.as_deref(),
    );
    let files = [CONFIG_FILE, MODEL_FILE, METRICS_FILE];
    refuse_overwrite(&dir, &files, args.overwrite)?;
    let progress = !args.quiet;

    let data_dir = resolve_data_dir(args.data_dir.as_deref());
    let dataset = config.train_data.dataset;
    let mut train_set = Dataset::load(dataset, Split::Train, &data_dir)?;
    if let Some(n) = config.train_data.max_size {
        if n == 0 || n > train_set.len() {
            bail!(
                "--train_data.max_size {n} out of range: {} has {} training samples",
                dataset,
                train_set.len()
            );
        }
        train_set.truncate(n);
    }
    let test_set = Dataset::load(dataset, Split::Test, &data_dir)?;
    let ModelConfig::Mlp(mlp_config) = &mut config.model;
    mlp_config.input_shape = [train_set.height, train_set.width, train_set.channels];

    let ctx = GpuContext::new()?;
    if progress {
        eprintln!("adapter: {}", ctx.adapter_name());
    }
    let t = &config.training;
    let model = GpuMlp::upload(&ctx, &Mlp::init(mlp_config, t.seed)?)?;
    let train_gpu = GpuDataset::upload(&ctx, &train_set)?;
    let report = train(
        &ctx,
        &model,
        &train_gpu,
        &TrainOptions {
            epochs: t.num_epochs,
            batch_size: t.batch_size,
            learning_rate: t.learning_rate,
            seed: t.seed,
            max_steps: t.max_steps,
            backdoor: config.train_data.backdoor,
            progress,
        },
    )?;
    drop(train_gpu);

    let test_gpu = GpuDataset::upload(&ctx, &test_set)?;
    let all: Vec<u32> = (0..test_set.len() as u32).collect();
    let clean = evaluate(
        &ctx,
        &model,
        &test_gpu,
        &all,
        None,
        t.seed,
        args.max_batch_size,
    )?;
    let (attack_success_rate, attack_samples) = match &config.train_data.backdoor {
        Some(b) => {
            let mut full = *b;
            full.p_backdoor = 1.0;
            let victims: Vec<u32> = all
                .iter()
                .copied()
                .filter(|&i| test_set.labels[i as usize] as u32 != b.target_class)
                .collect();
            let m = evaluate(
                &ctx,
                &model,
                &test_gpu,
                &victims,
                Some(&full),
                t.seed,
                args.max_batch_size,
            )?;
            (Some(m.accuracy), m.samples)
        }
        None => (None, 0),
    };
    let trained = model.download(&ctx)?;

    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_json(&dir.join(CONFIG_FILE), &config)?;
    trained.save(&dir.join(MODEL_FILE))?;
    let metrics = Metrics {
        clean_test_accuracy: clean.accuracy,
        clean_test_loss: clean.loss,
        attack_success_rate,
        attack_samples,
        steps: report.steps,
        samples_per_second: report.samples_per_second,
        train_seconds: report.seconds,
        epochs: report.epochs,
        wall_seconds: wall.elapsed().as_secs_f64(),
        adapter: ctx.adapter_name(),
    };
    write_json(&dir.join(METRICS_FILE), &metrics)?;
    let asr = attack_success_rate.map_or(String::new(), |a| format!(", attack success {a:.4}"));
    println!(
        "clean test accuracy {:.4}{asr}; {} steps in {:.1} s ({:.0} samples/s) -> {}",
        clean.accuracy,
        metrics.steps,
        metrics.train_seconds,
        metrics.samples_per_second,
        dir.display()
    );
    Ok(())
}
