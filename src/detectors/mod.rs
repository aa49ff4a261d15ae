//! Anomaly detectors over the model's activations.
//!
//! A detector implements [`Detector`]: fit on trusted samples, score samples per layer,
//! save itself. To add one: write `src/detectors/<name>.rs` with a config struct, the
//! trait impl and a [`crate::registry::DetectorEntry`], and add one line to
//! [`crate::registry::Registry::builtin`] (or register it at run time from your own
//! crate: see the README's "Extending").

pub mod abstraction;
pub mod adversarial_abstraction;
pub mod beatrix;
pub(crate) mod feature_model;
pub mod finetuning;
pub mod linalg;
pub mod mahalanobis;
pub mod quadratic;
pub mod que;
pub mod spectral;
pub mod supervised_probe;
pub mod ted;
pub mod vae;

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::gpu::GpuContext;
use crate::model::GpuMlp;

pub use crate::model::batches::{for_each_activation_batch, read_activations, SampleSet};

/// Per-layer anomaly scores: `scores[layer][sample]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerScores {
    pub names: Vec<String>,
    pub scores: Vec<Vec<f64>>,
}

/// How per-layer scores combine into a sample's score.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    /// The mean of the raw layer scores (upstream's default).
    #[default]
    Mean,
    /// The max over layers of each layer's score standardised by its mean and standard
    /// deviation on the fit data ([`ScoreScale`]), so that no layer wins by its units.
    Max,
}

/// A layer's score distribution on (a prefix of) the data the detector was fitted on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreScale {
    pub layer: String,
    pub mean: f64,
    pub std: f64,
}

impl LayerScores {
    /// The sample score: the mean over layers.
    pub fn aggregate(&self) -> Vec<f64> {
        let n = self.scores.first().map_or(0, Vec::len);
        (0..n)
            .map(|i| self.scores.iter().map(|l| l[i]).sum::<f64>() / self.scores.len() as f64)
            .collect()
    }

    /// The sample score under `how`; `Max` standardises by `scales` (one per layer).
    pub fn combine(&self, how: Aggregation, scales: &[ScoreScale]) -> anyhow::Result<Vec<f64>> {
        if how == Aggregation::Mean {
            return Ok(self.aggregate());
        }
        let standardized = self
            .names
            .iter()
            .zip(&self.scores)
            .map(|(name, s)| {
                let scale = scales.iter().find(|c| &c.layer == name).ok_or_else(|| {
                    anyhow::anyhow!(
                        "layer aggregation max needs the score scale of layer {name}, which                          this detector run lacks (fitted by an older version?): fit it again"
                    )
                })?;
                let sd = if scale.std > 0.0 { scale.std } else { 1.0 };
                Ok(s.iter().map(|v| (v - scale.mean) / sd).collect::<Vec<f64>>())
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let n = self.scores.first().map_or(0, Vec::len);
        Ok((0..n)
            .map(|i| {
                standardized
                    .iter()
                    .map(|l| l[i])
                    .fold(f64::NEG_INFINITY, f64::max)
            })
            .collect())
    }

    /// Each layer's mean and (population) standard deviation.
    pub fn scales(&self) -> Vec<ScoreScale> {
        self.names
            .iter()
            .zip(&self.scores)
            .map(|(name, s)| {
                let n = s.len().max(1) as f64;
                let mean = s.iter().sum::<f64>() / n;
                let var = s.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
                ScoreScale {
                    layer: name.clone(),
                    mean,
                    std: var.sqrt(),
                }
            })
            .collect()
    }

    /// Reads the first `n` scores of each layer's GPU buffer (`buffers` in `names`
    /// order): how GPU detectors return what their kernels wrote.
    pub async fn read<'b>(
        ctx: &GpuContext,
        names: Vec<String>,
        buffers: impl IntoIterator<Item = &'b wgpu::Buffer>,
        n: usize,
    ) -> Result<Self> {
        let mut scores = Vec::new();
        for b in buffers {
            let s: Vec<f32> = ctx.read_async(crate::gpu::Slice::new(b, 0, n)).await?;
            scores.push(s.into_iter().map(f64::from).collect());
        }
        Ok(LayerScores { names, scores })
    }

    /// Appends another set's scores of the same layers.
    pub fn extend(&mut self, other: LayerScores) -> anyhow::Result<()> {
        if self.names.is_empty() {
            *self = other;
            return Ok(());
        }
        if self.names != other.names {
            anyhow::bail!(
                "layer scores of different layers: {:?} vs {:?}",
                self.names,
                other.names
            );
        }
        for (a, b) in self.scores.iter_mut().zip(other.scores) {
            a.extend(b);
        }
        Ok(())
    }
}

/// The data a detector fits on.
pub struct FitData<'a> {
    /// Clean samples; None when the task keeps none (`--task.trusted_fraction 0`).
    pub trusted: Option<&'a SampleSet<'a>>,
    /// A mix of clean and anomalous samples whose labels the detector does not know
    /// (one set per source and trigger); empty when the task has none.
    pub untrusted: &'a [SampleSet<'a>],
    /// Whether each untrusted set is anomalous: for skyline detectors that are meant
    /// to see labels (the supervised probe); every other detector ignores it.
    pub untrusted_anomalous: &'a [bool],
}

/// Which of a task's training data a detector fits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uses {
    pub trusted: bool,
    pub untrusted: bool,
}

pub trait Detector {
    /// The registry name, e.g. "mahalanobis".
    fn kind(&self) -> &'static str;
    /// The detector's configuration, stored in the detector run's `config.json`.
    fn config(&self) -> serde_json::Value;
    /// Fits on trusted samples (never on anomalies); `progress` allows progress output
    /// on stderr for long fits.
    fn fit(
        &mut self,
        ctx: &GpuContext,
        model: &GpuMlp,
        trusted: &SampleSet<'_>,
        progress: bool,
    ) -> Result<()>;
    /// The data [`Detector::fit_data`] needs: trusted only, unless overridden.
    fn uses(&self) -> Uses {
        Uses {
            trusted: true,
            untrusted: false,
        }
    }
    /// Fits on the task's data (what the workflows call); the default fits on the
    /// trusted samples with [`Detector::fit`].
    fn fit_data(
        &mut self,
        ctx: &GpuContext,
        model: &GpuMlp,
        data: &FitData<'_>,
        progress: bool,
    ) -> Result<()> {
        let trusted = data.trusted.ok_or_else(|| {
            anyhow::anyhow!(
                "the {} detector fits on trusted data, but the task has none",
                self.kind()
            )
        })?;
        self.fit(ctx, model, trusted, progress)
    }
    /// Scores every sample, per layer (higher = more anomalous), `batch_size` at a time.
    fn layer_scores(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
        batch_size: usize,
    ) -> Result<LayerScores>;
    /// Writes the fitted state as safetensors.
    fn save(&self, path: &Path) -> Result<()>;
    /// Whether [`Detector::score_mix`] uses the task's trusted samples.
    fn needs_trusted(&self) -> bool {
        false
    }
    /// Scores a test mix: (normal, anomalous). Detectors whose scores depend on the
    /// batch (the adversarial abstraction finetunes on each) see both sets together;
    /// the default scores each on its own.
    fn score_mix(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        mix: &MixSamples<'_>,
        batch_size: usize,
    ) -> Result<(LayerScores, LayerScores)> {
        Ok((
            self.layer_scores(ctx, model, mix.normal, batch_size)?,
            self.layer_scores(ctx, model, mix.anomalous, batch_size)?,
        ))
    }
}

/// The samples of a test mix, and the trusted ones for detectors that need them.
pub struct MixSamples<'a> {
    pub normal: &'a SampleSet<'a>,
    pub anomalous: &'a SampleSet<'a>,
    pub trusted: Option<&'a SampleSet<'a>>,
}
