//! Anomaly detectors over the model's activations.
//!
//! A detector implements [`Detector`]: fit on trusted samples, score samples per layer,
//! save itself. To add one: write `src/detectors/<name>.rs` with a config struct, the
//! trait impl and a [`crate::registry::DetectorEntry`], and add one line to
//! [`crate::registry::Registry::builtin`] (or register it at run time from your own
//! crate: see the README's "Extending").

pub mod abstraction;
pub mod adversarial_abstraction;
pub mod linalg;
pub mod mahalanobis;
pub mod quadratic;
pub mod que;
pub mod spectral;

use std::path::Path;

use anyhow::Result;

use crate::gpu::GpuContext;
use crate::model::GpuMlp;

pub use crate::model::batches::{for_each_activation_batch, read_activations, SampleSet};

/// Per-layer anomaly scores: `scores[layer][sample]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerScores {
    pub names: Vec<String>,
    pub scores: Vec<Vec<f64>>,
}

impl LayerScores {
    /// The sample score: the mean over layers.
    pub fn aggregate(&self) -> Vec<f64> {
        let n = self.scores.first().map_or(0, Vec::len);
        (0..n)
            .map(|i| self.scores.iter().map(|l| l[i]).sum::<f64>() / self.scores.len() as f64)
            .collect()
    }
}

/// The data a detector fits on.
pub struct FitData<'a> {
    /// Clean samples; None when the task keeps none (`--task.trusted_fraction 0`).
    pub trusted: Option<&'a SampleSet<'a>>,
    /// A mix of clean and anomalous samples whose labels the detector does not know
    /// (one set per source and trigger); empty when the task has none.
    pub untrusted: &'a [SampleSet<'a>],
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
