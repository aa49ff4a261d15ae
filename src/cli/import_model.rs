//! `cupbearer import-model`.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::train_data_args::TrainDataArgs;
use crate::data::resolve_data_dir;
use crate::io::SaveDtype;
use crate::model::import::InputLayout;
use crate::workflows::import::{import_model, ImportModelOptions};
use crate::workflows::Output;

#[derive(clap::Args)]
pub struct Args {
    /// The checkpoint: a safetensors state dict in PyTorch naming (nn.Sequential, or the
    /// upstream's MLP / CNN; a `model.` prefix is dropped) or ours (Dense_i / Conv_i),
    /// f32, f16, bf16 or f64.
    #[arg(long, value_name = "FILE")]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: TrainDataArgs,
    /// How the checkpoint's first dense layer flattens images: chw (PyTorch) or hwc
    /// (ours) [default: by the checkpoint's naming].
    #[arg(long, value_parser = super::serde_enum::<InputLayout>, value_name = "chw|hwc")]
    input_layout: Option<InputLayout>,
    /// A safetensors file of reference `inputs` (N samples as [N, C, H, W], [N, H, W, C]
    /// or flat in the checkpoint's input layout; values in [0, 1]) and `logits`
    /// (N x classes) the imported model must reproduce.
    #[arg(long, value_name = "FILE")]
    reference: Option<PathBuf>,
    /// Batch size of the test evaluation.
    #[arg(long, default_value_t = 2048, value_name = "N")]
    max_batch_size: usize,
    /// Precision of the stored model.safetensors: f32, f16 or bf16.
    #[arg(long, value_parser = super::serde_enum::<SaveDtype>, default_value = "f32", value_name = "DTYPE")]
    dtype: SaveDtype,
    #[command(flatten)]
    common: super::CommonArgs,
}

pub fn run(args: Args) -> Result<()> {
    let c = &args.common;
    let dir = c.output_dir(Some(Path::new("logs/import_model")));
    // The trigger is checked against the model's outputs once they are known.
    let train_data = args.data.resolve(usize::MAX, 0)?;
    let metrics = import_model(
        &ImportModelOptions {
            checkpoint: &args.checkpoint,
            train_data,
            input_layout: args.input_layout,
            reference: args.reference.as_deref(),
            data_dir: resolve_data_dir(c.data_dir.as_deref()),
            eval_batch_size: args.max_batch_size,
            seed: c.seed,
            dtype: args.dtype,
        },
        &Output {
            dir: dir.as_deref(),
            overwrite: c.overwrite,
            progress: !c.quiet,
        },
    )?;
    let asr = metrics
        .attack_success_rate
        .map_or(String::new(), |a| format!(", attack success {a:.4}"));
    let target = dir.map_or("(nothing written)".into(), |d| d.display().to_string());
    println!(
        "imported: clean test accuracy {:.4}{asr} -> {target}",
        metrics.clean_test_accuracy
    );
    Ok(())
}
