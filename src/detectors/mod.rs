//! Anomaly detectors over the model's activations.
//!
//! A detector implements [`Detector`]: fit on trusted samples, score samples per layer,
//! save itself. To add one: write `src/detectors/<name>.rs` with a config type and the
//! trait impl, and add one line to [`REGISTRY`] (see the README's worked example).

pub mod abstraction;
mod abstraction_maps;
pub mod adversarial_abstraction;
pub mod linalg;
pub mod mahalanobis;
pub mod pipeline;

use std::path::Path;

use anyhow::{bail, Result};

use crate::gpu::GpuContext;
use crate::model::GpuMlp;

pub use crate::model::batches::{for_each_activation_batch, SampleSet};

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

/// Builds an unfitted detector from its JSON config.
pub type BuildFn = fn(&serde_json::Value) -> Result<Box<dyn Detector>>;
/// Loads a fitted detector: (its JSON config, the safetensors file).
pub type LoadFn = fn(&serde_json::Value, &Path) -> Result<Box<dyn Detector>>;

/// name → (build, load). One line per detector.
pub const REGISTRY: &[(&str, BuildFn, LoadFn)] = &[
    (
        "mahalanobis",
        mahalanobis::Mahalanobis::build,
        mahalanobis::Mahalanobis::load,
    ),
    (
        "abstraction",
        abstraction::Abstraction::build,
        abstraction::Abstraction::load,
    ),
    (
        "adversarial_abstraction",
        adversarial_abstraction::AdversarialAbstraction::build,
        |_, _| bail!("adversarial_abstraction is evaluation-only: nothing is stored"),
    ),
];

fn entry(kind: &str) -> Result<&'static (&'static str, BuildFn, LoadFn)> {
    REGISTRY
        .iter()
        .find(|(name, ..)| *name == kind)
        .ok_or_else(|| {
            let names: Vec<_> = REGISTRY.iter().map(|(n, ..)| *n).collect();
            anyhow::anyhow!("unknown detector {kind:?}; available: {}", names.join(", "))
        })
}

pub fn build(kind: &str, config: &serde_json::Value) -> Result<Box<dyn Detector>> {
    (entry(kind)?.1)(config)
}

pub fn load(kind: &str, config: &serde_json::Value, path: &Path) -> Result<Box<dyn Detector>> {
    if !path.is_file() {
        bail!("{} is missing: not a trained detector run", path.display());
    }
    (entry(kind)?.2)(config, path)
}
