//! Anomaly detectors over the model's activations.
//!
//! A detector implements [`Detector`]: fit on trusted samples, score samples per layer,
//! save itself. To add one: write `src/detectors/<name>.rs` with a config type and the
//! trait impl, and add one line to [`REGISTRY`] (see the README's worked example).

pub mod linalg;
pub mod mahalanobis;
pub mod pipeline;

use std::collections::VecDeque;
use std::path::Path;

use anyhow::{bail, Result};

use crate::data::backdoor::Backdoor;
use crate::gpu::batch::{gather_batch, BatchOutputs, GpuDataset};
use crate::gpu::{Dispatch, GpuContext, Slice, StepParams};
use crate::model::gpu_mlp::Workspace;
use crate::model::train::EVAL_EPOCH;
use crate::model::GpuMlp;

/// Samples to run through the model: which samples of a data set on the GPU, with an
/// optional trigger (drawn with `seed`, in the evaluation epoch of the RNG).
pub struct SampleSet<'a> {
    pub data: &'a GpuDataset,
    pub indices: &'a [u32],
    pub backdoor: Option<Backdoor>,
    pub seed: u32,
}

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
    /// Fits on trusted samples (never on anomalies).
    fn fit(&mut self, ctx: &GpuContext, model: &GpuMlp, trusted: &SampleSet<'_>) -> Result<()>;
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
}

/// Builds an unfitted detector from its JSON config.
pub type BuildFn = fn(&serde_json::Value) -> Result<Box<dyn Detector>>;
/// Loads a fitted detector: (its JSON config, the safetensors file).
pub type LoadFn = fn(&serde_json::Value, &Path) -> Result<Box<dyn Detector>>;

/// name → (build, load). One line per detector.
pub const REGISTRY: &[(&str, BuildFn, LoadFn)] = &[(
    "mahalanobis",
    mahalanobis::Mahalanobis::build,
    mahalanobis::Mahalanobis::load,
)];

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

/// Submits allowed in flight before the host waits.
const MAX_IN_FLIGHT: usize = 4;

/// Runs the model over `samples` in batches: per batch one submit of gather (+trigger),
/// forward, and the dispatches `extra(ws, rows)` adds (built once per batch size).
/// `before(offset, rows)` runs before each submit, to rewrite per-batch uniforms.
pub fn for_each_activation_batch(
    ctx: &GpuContext,
    model: &GpuMlp,
    samples: &SampleSet<'_>,
    batch_size: usize,
    extra: impl Fn(&Workspace, usize) -> Result<Vec<Dispatch>>,
    mut before: impl FnMut(usize, usize) -> Result<()>,
) -> Result<()> {
    let n = samples.indices.len();
    if n == 0 {
        bail!("no samples to run");
    }
    if batch_size == 0 || batch_size > 65535 {
        bail!("batch size must be in 1..=65535, got {batch_size}");
    }
    let data = samples.data;
    if model.config.input_shape != [data.height, data.width, data.channels] {
        bail!(
            "the model expects inputs of shape {:?}, the data set has {:?}",
            model.config.input_shape,
            [data.height, data.width, data.channels]
        );
    }
    let indices = ctx.buffer_from("sample_indices", samples.indices)?;
    let step = ctx.uniform("step", &StepParams::default());
    let plan = |rows: usize| -> Result<(Workspace, Vec<Dispatch>)> {
        let ws = model.workspace(ctx, rows, data.is_sparse(), false)?;
        let mut ops = vec![gather_batch(
            ctx,
            data,
            rows,
            Slice::whole(&indices),
            &BatchOutputs {
                x: Slice::whole(&ws.x),
                xt: Some(Slice::whole(&ws.xt)),
                labels: Slice::whole(&ws.labels),
            },
            samples.backdoor.as_ref(),
            samples.seed,
            &step,
        )?];
        ops.extend(model.forward(ctx, &ws)?);
        ops.extend(extra(&ws, rows)?);
        Ok((ws, ops))
    };
    let batch = batch_size.min(n);
    let full = plan(batch)?;
    let tail = (!n.is_multiple_of(batch))
        .then(|| plan(n % batch))
        .transpose()?;
    let mut in_flight = VecDeque::new();
    for offset in (0..n).step_by(batch) {
        let rows = batch.min(n - offset);
        let (_, ops) = match &tail {
            Some(t) if rows < batch => t,
            _ => &full,
        };
        let params = StepParams {
            epoch: EVAL_EPOCH,
            batch_offset: offset as u32,
            ..Default::default()
        };
        ctx.queue
            .write_buffer(&step, 0, bytemuck::bytes_of(&params));
        before(offset, rows)?;
        in_flight.push_back(ctx.submit(ops));
        if in_flight.len() > MAX_IN_FLIGHT {
            ctx.wait(in_flight.pop_front())?;
        }
    }
    ctx.wait(None)
}
