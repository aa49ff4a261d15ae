//! The finetuning detector (the later upstream's `FinetuningAnomalyDetector`): a copy of
//! the classifier is finetuned on trusted data with Adam (the classifier's own training
//! step on the GPU); a sample's score is KL(softmax(original) ‖ softmax(finetuned)) of
//! its logits, in f64. The idea: finetuning on clean data erodes a backdoor, so the two
//! models disagree most on triggered inputs. The finetuned weights are stored as the
//! detector's safetensors (the model file format), so a reload scores identically.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{Detector, LayerScores, SampleSet};
use crate::gpu::GpuContext;
use crate::model::train::{sample_logits, train_on, LrSchedule, TrainOptions};
use crate::model::{GpuMlp, Mlp};
use crate::registry::{defaults_of, opt, ConfigSpec, DetectorEntry, Kind, Opt};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuningConfig {
    pub num_epochs: usize,
    pub learning_rate: f32,
    pub batch_size: usize,
    /// Cap on finetuning steps (0 = none).
    pub max_steps: usize,
}

impl Default for FinetuningConfig {
    /// The upstream's Adam at 1e-3 for one epoch; batches as our classifier's.
    fn default() -> Self {
        FinetuningConfig {
            num_epochs: 1,
            learning_rate: 1e-3,
            batch_size: 128,
            max_steps: 0,
        }
    }
}

pub struct Finetuning {
    config: FinetuningConfig,
    finetuned: Option<Mlp>,
}

/// The layer name of the one score.
const SCORE: &str = "kl";

impl Finetuning {
    pub fn new(config: FinetuningConfig) -> Result<Self> {
        if config.num_epochs == 0 || config.batch_size == 0 {
            bail!("finetuning needs num_epochs >= 1 and batch_size >= 1");
        }
        if !(config.learning_rate.is_finite() && config.learning_rate > 0.0) {
            bail!(
                "learning_rate must be a number > 0, got {}",
                config.learning_rate
            );
        }
        Ok(Finetuning {
            config,
            finetuned: None,
        })
    }

    pub fn build(config: &serde_json::Value) -> Result<Box<dyn Detector>> {
        let config = serde_json::from_value(config.clone()).context("finetuning config")?;
        Ok(Box::new(Self::new(config)?))
    }

    pub fn load(config: &serde_json::Value, path: &Path) -> Result<Box<dyn Detector>> {
        let mut det =
            Self::new(serde_json::from_value(config.clone()).context("finetuning config")?)?;
        det.finetuned = Some(Mlp::load(path)?);
        Ok(Box::new(det))
    }
}

/// KL(softmax(p) ‖ softmax(q)) of one row of logits each, in f64.
pub fn kl_of_logits(p: &[f32], q: &[f32]) -> f64 {
    let log_softmax = |z: &[f32]| -> Vec<f64> {
        let max = z
            .iter()
            .map(|&v| v as f64)
            .fold(f64::NEG_INFINITY, f64::max);
        let lse = max + z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        z.iter().map(|&v| v as f64 - lse).collect()
    };
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}

impl Detector for Finetuning {
    fn kind(&self) -> &'static str {
        "finetuning"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("plain struct serialises")
    }

    fn fit(
        &mut self,
        ctx: &GpuContext,
        model: &GpuMlp,
        trusted: &SampleSet<'_>,
        progress: bool,
    ) -> Result<()> {
        // A copy: the classifier itself stays as it is.
        let copy = GpuMlp::upload(ctx, &model.download(ctx)?)?;
        let opts = TrainOptions {
            epochs: self.config.num_epochs,
            batch_size: self.config.batch_size,
            learning_rate: self.config.learning_rate,
            lr_schedule: LrSchedule::Constant,
            seed: trusted.seed,
            max_steps: (self.config.max_steps > 0).then_some(self.config.max_steps),
            backdoor: trusted.backdoor,
            augment: None,
            progress,
        };
        train_on(ctx, &copy, trusted.data, trusted.indices, &opts)
            .context("finetuning the classifier's copy")?;
        self.finetuned = Some(copy.download(ctx)?);
        Ok(())
    }

    fn layer_scores(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
        batch_size: usize,
    ) -> Result<LayerScores> {
        let Some(finetuned) = &self.finetuned else {
            bail!("the detector is not fitted");
        };
        if finetuned.config != model.config {
            bail!(
                "the finetuned model ({:?}) is not a copy of this classifier ({:?})",
                finetuned.config,
                model.config
            );
        }
        let tuned = GpuMlp::upload(ctx, finetuned)?;
        let original = sample_logits(ctx, model, samples, batch_size)?;
        let after = sample_logits(ctx, &tuned, samples, batch_size)?;
        let c = model.config.output_dim;
        let scores: Vec<f64> = original
            .chunks(c)
            .zip(after.chunks(c))
            .map(|(p, q)| kl_of_logits(p, q))
            .collect();
        if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
            bail!("finetuning: the score of sample {i} is {}", scores[i]);
        }
        Ok(LayerScores {
            names: vec![SCORE.to_string()],
            scores: vec![scores],
        })
    }

    fn save(&self, path: &Path) -> Result<()> {
        match &self.finetuned {
            Some(m) => m.save(path),
            None => bail!("the detector is not fitted"),
        }
    }
}

const OPTIONS: &[Opt] = &[
    opt(
        "train.num_epochs",
        &["/num_epochs"],
        Kind::Int,
        "Epochs of finetuning on the trusted data.",
    ),
    opt(
        "train.learning_rate",
        &["/learning_rate"],
        Kind::Float,
        "Adam's learning rate.",
    ),
    opt(
        "train.batch_size",
        &["/batch_size"],
        Kind::Int,
        "Samples per finetuning step (and per scoring batch).",
    ),
    opt(
        "train.max_steps",
        &["/max_steps"],
        Kind::Int,
        "Cap on finetuning steps (0 = none).",
    ),
];

/// The registry entry.
pub const ENTRY: DetectorEntry = DetectorEntry {
    name: "finetuning",
    doc: "Finetuning: KL(original ‖ finetuned) of the logits after finetuning a copy of the classifier on trusted data.",
    config: ConfigSpec {
        defaults: defaults_of::<FinetuningConfig>,
        options: OPTIONS,
        nested: &[],
        debug: &[("/batch_size", "2"), ("/max_steps", "1")],
    },
    build: Finetuning::build,
    load: Some(Finetuning::load),
};
