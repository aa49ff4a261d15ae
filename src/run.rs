//! Run directories: what `train-classifier` writes and later commands read.
//!
//! A classifier run dir holds `config.json` ([`ClassifierRunConfig`]),
//! `model.safetensors` (see [`crate::model::mlp`]) and `metrics.json`. A detector run dir
//! holds `config.json` ([`DetectorRunConfig`]), `detector.safetensors` and `fit.json`; evaluation
//! adds `eval.json`, `scores.csv`, `histogram.svg`, `roc.svg` and `roc_log.svg` to its
//! output dir.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::augment::Augment;
use crate::data::backdoor::Backdoor;
use crate::data::DatasetName;
use crate::detectors::{Aggregation, ScoreScale};
use crate::model::train::LrSchedule;
use crate::model::{Mlp, MlpConfig};

pub const CONFIG_FILE: &str = "config.json";
pub const MODEL_FILE: &str = "model.safetensors";
pub const METRICS_FILE: &str = "metrics.json";
pub const DETECTOR_CONFIG_FILE: &str = "config.json";
pub const DETECTOR_FILE: &str = "detector.safetensors";
/// What fitting took: samples and seconds (`workflows::detector::FitReport`).
pub const FIT_FILE: &str = "fit.json";
pub const EVAL_FILE: &str = "eval.json";
pub const SCORES_FILE: &str = "scores.csv";
pub const HISTOGRAM_FILE: &str = "histogram.svg";
/// The same histogram with counts on a log scale.
pub const HISTOGRAM_LOG_FILE: &str = "histogram_log.svg";
pub const ROC_FILE: &str = "roc.svg";
/// The ROC curve with the false positive rate on a log scale (1e-4 .. 1).
pub const ROC_LOG_FILE: &str = "roc_log.svg";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainDataConfig {
    pub dataset: DatasetName,
    /// Only the first `max_size` training samples were used.
    pub max_size: Option<usize>,
    pub backdoor: Option<Backdoor>,
    /// Training augmentation (off when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augment: Option<Augment>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelConfig {
    Mlp(MlpConfig),
    /// An [`MlpConfig`] with conv blocks.
    Cnn(MlpConfig),
}

impl ModelConfig {
    pub fn new(config: MlpConfig) -> Self {
        if config.is_cnn() {
            ModelConfig::Cnn(config)
        } else {
            ModelConfig::Mlp(config)
        }
    }

    pub fn layers(&self) -> &MlpConfig {
        match self {
            ModelConfig::Mlp(c) | ModelConfig::Cnn(c) => c,
        }
    }

    pub fn layers_mut(&mut self) -> &mut MlpConfig {
        match self {
            ModelConfig::Mlp(c) | ModelConfig::Cnn(c) => c,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingConfig {
    pub optimizer: String,
    pub learning_rate: f32,
    /// Absent in run dirs written before schedules existed: constant.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    pub num_epochs: usize,
    pub batch_size: usize,
    pub max_steps: Option<usize>,
    pub seed: u32,
}

impl Default for TrainingConfig {
    /// The original's defaults: Adam 1e-3, 10 epochs of batch 128, seed 0.
    fn default() -> Self {
        TrainingConfig {
            optimizer: "adam".into(),
            learning_rate: 1e-3,
            lr_schedule: LrSchedule::Constant,
            num_epochs: 10,
            batch_size: 128,
            max_steps: None,
            seed: 0,
        }
    }
}

/// `config.json` of a classifier run: the full resolved configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassifierRunConfig {
    /// `train-classifier`, or `import-model` for a model trained elsewhere.
    pub command: String,
    pub cupbearer_version: String,
    /// What the model was trained on (for an imported model: what the user says).
    pub train_data: TrainDataConfig,
    pub model: ModelConfig,
    /// How it was trained here; none for an imported model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingConfig>,
    /// Where an imported model came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported: Option<ImportRecord>,
}

/// The source of an imported model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImportRecord {
    pub checkpoint: PathBuf,
    pub sha256: String,
    pub layout: crate::model::import::Layout,
    pub input_layout: crate::model::import::InputLayout,
    /// The tensors read, in layer order.
    pub tensors: Vec<String>,
}

impl ClassifierRunConfig {
    pub fn new(train_data: TrainDataConfig, model: MlpConfig, training: TrainingConfig) -> Self {
        ClassifierRunConfig {
            command: "train-classifier".into(),
            cupbearer_version: env!("CARGO_PKG_VERSION").into(),
            train_data,
            model: ModelConfig::new(model),
            training: Some(training),
            imported: None,
        }
    }
}

/// A classifier run read back from disk.
pub struct ClassifierRun {
    pub dir: PathBuf,
    pub config: ClassifierRunConfig,
    pub model: Mlp,
}

impl ClassifierRun {
    pub fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            bail!(
                "{} is not a classifier run: {CONFIG_FILE} is missing (create one with \
                 `cupbearer train-classifier --dir.full {}`)",
                dir.display(),
                dir.display()
            );
        }
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        let config: ClassifierRunConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a classifier run config", config_path.display()))?;
        if !matches!(config.command.as_str(), "train-classifier" | "import-model") {
            bail!(
                "{} was written by `{}`, not by train-classifier or import-model",
                config_path.display(),
                config.command
            );
        }
        let model = Mlp::load(&dir.join(MODEL_FILE))?;
        let expected = config.model.layers();
        if &model.config != expected {
            bail!(
                "{}: the model's architecture {:?} differs from {CONFIG_FILE}'s {:?}",
                dir.join(MODEL_FILE).display(),
                model.config,
                expected
            );
        }
        Ok(ClassifierRun {
            dir: dir.to_path_buf(),
            config,
            model,
        })
    }
}

/// `config.json` of a detector run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DetectorRunConfig {
    pub command: String,
    pub cupbearer_version: String,
    pub task_kind: String,
    pub task: serde_json::Value,
    pub detector_kind: String,
    pub detector: serde_json::Value,
    pub seed: u32,
    /// Each layer's score distribution on the fit data (for `--layer_aggregation max`);
    /// empty in runs from before it was recorded.
    #[serde(default)]
    pub score_scales: Vec<ScoreScale>,
    /// The run's default layer aggregation (eval-detector's unless overridden).
    #[serde(default)]
    pub layer_aggregation: Aggregation,
}

impl DetectorRunConfig {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(DETECTOR_CONFIG_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is not a detector run ({DETECTOR_CONFIG_FILE} missing; create one with \
                 `cupbearer train-detector`)",
                dir.display()
            )
        })?;
        let config: Self = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a detector run config", path.display()))?;
        if config.command != "train-detector" {
            bail!(
                "{} was written by `{}`, not train-detector",
                path.display(),
                config.command
            );
        }
        Ok(config)
    }
}

/// `--dir.full`, else `--dir.base/--dir.run` (run defaults to the current UTC time).
pub fn resolve_run_dir(full: Option<&Path>, base: &Path, run: Option<&str>) -> PathBuf {
    match full {
        Some(f) => f.to_path_buf(),
        None => {
            let stamp = run.map(str::to_string).unwrap_or_else(|| {
                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string()
                    .trim_end_matches('Z')
                    .replace([':', 'T'], "-")
            });
            base.join(stamp)
        }
    }
}

/// Fails if any of `files` exists in `dir` (unless `overwrite`).
pub fn refuse_overwrite(dir: &Path, files: &[&str], overwrite: bool) -> Result<()> {
    if overwrite {
        return Ok(());
    }
    if let Some(f) = files.iter().map(|f| dir.join(f)).find(|p| p.exists()) {
        bail!(
            "refusing to overwrite {}: choose another output directory or pass --overwrite",
            f.display()
        );
    }
    Ok(())
}
