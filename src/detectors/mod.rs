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
