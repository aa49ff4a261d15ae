//! `cupbearer train-classifier`.

use std::path::Path;

use anyhow::{bail, Result};
use clap::ValueEnum;

use crate::data::resolve_data_dir;
use crate::io::SaveDtype;
use crate::model::train::LrSchedule;
use crate::model::MlpConfig;
use crate::run::{ClassifierRunConfig, TrainingConfig};
use crate::workflows::classifier::{train_classifier, RunOptions};

use super::train_data_args::TrainDataArgs;
use super::Optimizer;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModelKind {
    Mlp,
    Cnn,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    data: TrainDataArgs,
    /// Model architecture: mlp, or cnn (3x3 conv + ReLU + 2x2 max-pool blocks, a global
    /// max pool, then dense layers).
    #[arg(long, value_enum, default_value = "mlp")]
    model: ModelKind,
    /// MLP: widths of the hidden layers.
    #[arg(long, num_args = 1.., default_values_t = [256, 256], value_name = "N")]
    model_hidden_dims: Vec<usize>,
    /// CNN: output channels of the conv blocks.
    #[arg(long, num_args = 1.., default_values_t = [32, 64], value_name = "C")]
    model_channels: Vec<usize>,
    /// CNN: widths of the dense layers after the global max pool.
    #[arg(long, num_args = 1.., default_values_t = [256, 256], value_name = "N")]
    model_dense_dims: Vec<usize>,
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
    /// Learning-rate schedule over the planned steps (ours; the original's is constant).
    #[arg(long, value_parser = super::serde_enum::<LrSchedule>, default_value = "constant", value_name = "SCHEDULE")]
    optim_schedule: LrSchedule,
    /// Precision of model.safetensors: f32, f16 or bf16 (read back transparently;
    /// metrics.json is measured before rounding).
    #[arg(long, value_parser = super::serde_enum::<SaveDtype>, default_value = "f32", value_name = "DTYPE")]
    dtype: SaveDtype,
    #[command(flatten)]
    common: super::CommonArgs,
}

impl Args {
    fn resolve(&self) -> Result<ClassifierRunConfig> {
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
        let (conv_channels, hidden_dims) = match self.model {
            ModelKind::Mlp => (Vec::new(), self.model_hidden_dims.clone()),
            ModelKind::Cnn => (self.model_channels.clone(), self.model_dense_dims.clone()),
        };
        let Optimizer::Adam = self.optim;
        Ok(ClassifierRunConfig::new(
            self.data.resolve(self.model_output_dim, self.common.seed)?,
            // The input shape is filled in from the data set.
            MlpConfig {
                input_shape: [0; 3],
                conv_channels,
                hidden_dims,
                output_dim: self.model_output_dim,
            },
            TrainingConfig {
                optimizer: "adam".into(),
                learning_rate: self.optim_learning_rate,
                lr_schedule: self.optim_schedule,
                num_epochs: self.num_epochs,
                batch_size: self.batch_size,
                max_steps: self.max_steps,
                seed: self.common.seed,
            },
        ))
    }
}

pub fn run(mut args: Args) -> Result<()> {
    if args.common.debug {
        args.data.train_data_max_size = Some(2);
        args.model_hidden_dims = vec![2, 2];
        (args.model_channels, args.model_dense_dims) = (vec![2], vec![2]);
        (args.num_epochs, args.max_steps) = (1, Some(1));
        (args.batch_size, args.max_batch_size) = (2, 2);
    }
    let config = args.resolve()?;
    let c = &args.common;
    let dir = c.output_dir(Some(Path::new("logs/train_classifier")));
    let metrics = train_classifier(
        config,
        &RunOptions {
            dir: dir.clone(),
            test_limit: c.debug.then_some(2),
            data_dir: resolve_data_dir(c.data_dir.as_deref()),
            overwrite: c.overwrite,
            eval_batch_size: args.max_batch_size,
            progress: !c.quiet,
            dtype: args.dtype,
        },
    )?;
    let target = dir.map_or("(debug: nothing written)".into(), |d| {
        d.display().to_string()
    });
    println!("{} -> {target}", metrics.summary());
    Ok(())
}
