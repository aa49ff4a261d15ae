//! The `import-model` workflow: a classifier trained elsewhere (a safetensors state dict,
//! [`crate::model::import`]) into a classifier run dir that every detector, task and
//! suite can use, with its clean test accuracy and, given its trigger, attack success.

use std::path::{Path, PathBuf};
use web_time::Instant;

use anyhow::{bail, Context, Result};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

use super::classifier::{evaluate_test, ClassifierMetrics};
use super::{claim, context, Output};
use crate::data::{Dataset, Split};
use crate::io::{store_as, write_json, SaveDtype};
use crate::model::import::{import_checkpoint, tensor_f32, ImportOptions, Imported, InputLayout};
use crate::model::GpuMlp;
use crate::run::{
    refuse_overwrite, ClassifierRunConfig, ImportRecord, ModelConfig, TrainDataConfig, CONFIG_FILE,
    METRICS_FILE, MODEL_FILE,
};

/// What to import and how to check it.
pub struct ImportModelOptions<'a> {
    pub checkpoint: &'a Path,
    /// What the model was trained on: the data set (its test split is evaluated, its
    /// image shape is the model's input) and the trigger, if any.
    pub train_data: TrainDataConfig,
    /// None: by the checkpoint's layout (PyTorch: CHW, Flax: HWC).
    pub input_layout: Option<InputLayout>,
    /// A safetensors file with `inputs` (N samples: [N, C, H, W], [N, H, W, C], or flat
    /// in the checkpoint's input layout) and `logits` (N x classes) the model must
    /// reproduce.
    pub reference: Option<&'a Path>,
    pub data_dir: PathBuf,
    pub eval_batch_size: usize,
    pub seed: u32,
    /// Precision of the stored `model.safetensors`.
    pub dtype: SaveDtype,
}

/// Logits the imported model must reproduce: the largest difference allowed, relative
/// to the largest reference logit (at least 1).
const REFERENCE_TOLERANCE: f64 = 1e-3;

/// Checks the model's f64 forward pass against the reference logits.
fn check_reference(imported: &Imported, path: &Path) -> Result<usize> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let get = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        let t = st.tensor(name).with_context(|| {
            format!(
                "{}: a reference file needs tensors `inputs` and `logits`",
                path.display()
            )
        })?;
        Ok((t.shape().to_vec(), tensor_f32(&t, path, name)?))
    };
    let ((in_shape, inputs), (out_shape, logits)) = (get("inputs")?, get("logits")?);
    let config = &imported.mlp.config;
    let [h, w, c] = config.input_shape;
    let (n, d, classes) = (
        in_shape.first().copied().unwrap_or(0),
        h * w * c,
        config.output_dim,
    );
    if n == 0 || inputs.len() != n * d || out_shape != [n, classes] {
        bail!(
            "{}: inputs {in_shape:?} and logits {out_shape:?} do not fit a model of {h}x{w}x{c} \
             inputs and {classes} outputs",
            path.display()
        );
    }
    // The reference's own layout, from its shape where that tells (a wrong
    // --input_layout then shows as wrong logits), else the model's.
    let layout = match in_shape[1..] {
        [a, b, e] if [a, b, e] == [c, h, w] && [a, b, e] != [h, w, c] => InputLayout::Chw,
        [a, b, e] if [a, b, e] == [h, w, c] && [a, b, e] != [c, h, w] => InputLayout::Hwc,
        _ => imported.input_layout,
    };
    // Ours are HWC rows.
    let x: Vec<f64> = (0..n * d)
        .map(|i| {
            let (s, r) = (i / d, i % d);
            let (pos, ch) = (r / c, r % c);
            let src = match layout {
                InputLayout::Hwc => r,
                InputLayout::Chw => ch * h * w + pos,
            };
            f64::from(inputs[s * d + src])
        })
        .collect();
    let (_, ours) = imported.mlp.forward_reference(&x, n);
    let scale = logits.iter().fold(1f64, |m, &v| m.max(f64::from(v).abs()));
    for (i, (&theirs, &mine)) in logits.iter().zip(&ours).enumerate() {
        if (f64::from(theirs) - mine).abs() > REFERENCE_TOLERANCE * scale {
            bail!(
                "{}: the imported model's logit {} of reference sample {} is {mine:.5}, the \
                 reference says {theirs:.5}: wrong --input_layout, layer order or \
                 architecture (imported as {:?})",
                path.display(),
                i % classes,
                i / classes,
                config
            );
        }
    }
    Ok(n)
}

/// Imports the checkpoint, evaluates it and writes the run dir (`config.json` last:
/// with it the run is complete; nothing is written if any check fails).
pub fn import_model(opts: &ImportModelOptions<'_>, out: &Output<'_>) -> Result<ClassifierMetrics> {
    let wall = Instant::now();
    let _claim = out.dir.map(claim).transpose()?;
    if let Some(dir) = out.dir {
        refuse_overwrite(dir, &[CONFIG_FILE, MODEL_FILE, METRICS_FILE], out.overwrite)?;
    }
    let test_set = Dataset::load(opts.train_data.dataset, Split::Test, &opts.data_dir)?;
    let imported = import_checkpoint(
        opts.checkpoint,
        &ImportOptions {
            input_shape: [test_set.height, test_set.width, test_set.channels],
            input_layout: opts.input_layout,
        },
    )?;
    let config = &imported.mlp.config;
    if config.output_dim < test_set.num_classes {
        bail!(
            "{}: the model has {} outputs but {} has {} classes",
            opts.checkpoint.display(),
            config.output_dim,
            opts.train_data.dataset,
            test_set.num_classes
        );
    }
    if let Some(b) = &opts.train_data.backdoor {
        b.validate(config.output_dim)?;
    }
    if let Some(reference) = opts.reference {
        let n = check_reference(&imported, reference)?;
        crate::progress::note(
            out.progress,
            &format!("the imported model reproduces the {n} reference samples' logits"),
        );
    }
    let ctx = context(out.progress)?;
    let model = GpuMlp::upload(&ctx, &imported.mlp)?;
    let test = evaluate_test(
        &ctx,
        &model,
        &test_set,
        opts.train_data.backdoor.as_ref(),
        opts.seed,
        opts.eval_batch_size,
    )?;
    let bytes = std::fs::read(opts.checkpoint)?;
    let run = ClassifierRunConfig {
        command: "import-model".into(),
        cupbearer_version: env!("CARGO_PKG_VERSION").into(),
        train_data: opts.train_data.clone(),
        model: ModelConfig::new(config.clone()),
        training: None,
        imported: Some(ImportRecord {
            checkpoint: std::fs::canonicalize(opts.checkpoint)
                .unwrap_or_else(|_| opts.checkpoint.to_path_buf()),
            sha256: format!("{:x}", Sha256::digest(&bytes)),
            layout: imported.layout,
            input_layout: imported.input_layout,
            tensors: imported.tensors.clone(),
        }),
    };
    let metrics = ClassifierMetrics {
        clean_test_accuracy: test.clean.accuracy,
        clean_test_loss: test.clean.loss,
        attack_success_rate: test.attack_success_rate,
        attack_samples: test.attack_samples,
        epochs: Vec::new(),
        steps: 0,
        samples_per_second: 0.0,
        train_seconds: 0.0,
        wall_seconds: wall.elapsed().as_secs_f64(),
        adapter: ctx.adapter_name(),
        kernel_overrides: ctx.shaders.overrides(),
    };
    if let Some(dir) = out.dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        imported.mlp.save(&dir.join(MODEL_FILE))?;
        store_as(&dir.join(MODEL_FILE), opts.dtype)?;
        write_json(&dir.join(METRICS_FILE), &metrics)?;
        write_json(&dir.join(CONFIG_FILE), &run)?;
    }
    Ok(metrics)
}
