//! The abstraction detector (cupbearer 0.0.1's `abstraction`): learned maps τ_l from
//! each hidden activation a_l to a small abstract state z_l = τ_l(a_l), and abstract
//! computational steps m_l predicting the next state from the current one
//! (ẑ_{l+1} = relu(m_l(z_l))) and, from the last, the model's output (ŷ = m_L(z_L)).
//! Trained with Adam on trusted data to minimise KL(model ‖ softmax(ŷ)) plus the mean
//! cosine distance between ẑ_l and z_l; an anomaly's score per layer is that
//! consistency loss (and the output KL), i.e. how badly the abstraction explains it.
//!
//! Fixes relative to the original: the consistency loss is divided by the number of
//! layers once (0.0.1 did it twice), and every epoch is shuffled (0.0.1 never
//! shuffled). Everything runs on the GPU inside the model's batch plans: one submit per
//! training step (model forward, abstraction forward, losses, backward, Adam).

use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

mod config;
mod maps;
mod record;
mod shapes;

pub use config::{AbstractionConfig, AbstractionKind, OutputLoss, OPTIONS};

use super::feature_model::{self, TrainState, Training};
use super::{Detector, LayerScores, SampleSet};
use crate::gpu::{Dispatch, GpuContext};
use crate::model::gpu_mlp::Workspace;
use crate::model::mlp::{load_layer, save_layers, Dense};
use crate::model::{GpuMlp, MlpConfig};
use crate::registry::{defaults_of, ConfigSpec, DetectorEntry};
use record::{Params, Recording};

const METADATA_KEY: &str = "cupbearer.detector";
/// Keys the initialisation draws apart from the classifier's (same seed, same stream).
const INIT_LAYER_KEY: u32 = 1 << 16;

/// Trusted samples scored after training to standardise the layer scores.
const NORMALIZATION_SAMPLES: usize = 10_000;

/// What the trained parameters belong to, stored with them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Stored {
    config: AbstractionConfig,
    hidden_dims: Vec<usize>,
    classes: usize,
    /// A CNN's conv channels and input shape (absent for MLPs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    conv_channels: Vec<usize>,
    #[serde(default)]
    input_shape: [usize; 3],
    score_stats: Vec<(f64, f64)>,
}

#[derive(Clone)]
pub struct Abstraction {
    pub config: AbstractionConfig,
    /// The model the abstraction was built for.
    model: MlpConfig,
    /// τ_0..τ_{L-1}, then m_0..m_{L-1}.
    layers: Vec<Dense>,
    /// (mean, standard deviation) of each layer's score on trusted data.
    score_stats: Vec<(f64, f64)>,
}

impl Abstraction {
    pub fn new(config: AbstractionConfig) -> Result<Self> {
        if !(config.size_reduction.is_finite() && config.size_reduction >= 1.0) {
            bail!("size_reduction must be >= 1, got {}", config.size_reduction);
        }
        if config.batch_size == 0 || config.batch_size > 65535 {
            bail!("batch_size must be in 1..=65535, got {}", config.batch_size);
        }
        if config.num_epochs == 0 {
            bail!("num_epochs must be >= 1");
        }
        Ok(Abstraction {
            config,
            model: MlpConfig {
                input_shape: [0; 3],
                conv_channels: Vec::new(),
                hidden_dims: Vec::new(),
                output_dim: 0,
            },
            layers: Vec::new(),
            score_stats: Vec::new(),
        })
    }

    pub fn build(config: &serde_json::Value) -> Result<Box<dyn Detector>> {
        let config = serde_json::from_value(config.clone()).context("abstraction config")?;
        Ok(Box::new(Abstraction::new(config)?))
    }

    pub fn load(config: &serde_json::Value, path: &Path) -> Result<Box<dyn Detector>> {
        Ok(Box::new(Self::load_trained(config, path)?))
    }

    /// A trained abstraction from its config and `detector.safetensors`.
    pub fn load_trained(config: &serde_json::Value, path: &Path) -> Result<Self> {
        let mut det = Abstraction::new(serde_json::from_value(config.clone())?)?;
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let stored: Stored =
            crate::io::safetensors_metadata(&bytes, path, METADATA_KEY, "an abstraction detector")?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: corrupt safetensors file", path.display()))?;
        det.model = MlpConfig {
            input_shape: stored.input_shape,
            conv_channels: stored.conv_channels,
            hidden_dims: stored.hidden_dims,
            output_dim: stored.classes,
        };
        det.score_stats = stored.score_stats;
        det.layers = det
            .maps()?
            .into_iter()
            .zip(det.layer_names())
            .map(|(map, name)| {
                let layer = maps::param_layer(&map);
                let (fan_in, fan_out) = layer.params().expect("a parameterised layer");
                load_layer(&st, path, &name, &layer.kernel_shape(), fan_in, fan_out)
            })
            .collect::<Result<_>>()?;
        Ok(det)
    }

    /// Fresh (untrained) parameters for `model`: LeCun-normal kernels, zero biases.
    pub fn init(&mut self, model: &MlpConfig, seed: u32) -> Result<()> {
        self.model = model.clone();
        if self.num_hidden() == 0 {
            bail!("the abstraction detector needs a model with hidden layers");
        }
        if self.config.output_loss_fn == OutputLoss::SingleClass && self.model.output_dim < 2 {
            bail!("single_class needs a model with at least 2 classes");
        }
        let taus = self.num_hidden();
        let axis = self.axis_aligned();
        self.layers = self
            .dims()?
            .iter()
            .enumerate()
            .map(|(i, &(fan_in, fan_out))| {
                let mut d = Dense::lecun(fan_in, fan_out, seed, INIT_LAYER_KEY + i as u32);
                if axis && i < taus {
                    d.kernel.fill(3.0);
                }
                d
            })
            .collect();
        Ok(())
    }

    /// τ_0..τ_{L-1}, then m_0..m_{L-1}.
    pub fn layers(&self) -> &[Dense] {
        &self.layers
    }

    pub fn layers_mut(&mut self) -> &mut [Dense] {
        &mut self.layers
    }

    /// The parameters as one flat vector, and the length of its τ part (the steps'
    /// parameters follow).
    pub(crate) fn flat_params(&self) -> (Vec<f32>, usize) {
        let layout = self.layout();
        let taus = layout.layers[self.num_hidden()].kernel;
        (layout.flatten(&self.layers), taus)
    }

    pub(crate) fn set_flat_params(&mut self, flat: &[f32]) {
        self.layers = self.layout().unflatten(flat);
    }

    /// The training loss of per-sample losses: mean output loss plus the mean of the
    /// layers' mean consistency losses.
    pub(crate) fn training_loss(raw: &LayerScores) -> f64 {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let (output, consistency) = raw.scores.split_last().expect("at least the output loss");
        let cons: f64 = consistency.iter().map(|v| mean(v)).sum::<f64>();
        mean(output) + cons / consistency.len().max(1) as f64
    }

    /// Standardises raw layer scores with the trusted statistics (when configured).
    pub(crate) fn standardize(&self, scores: &mut LayerScores) -> Result<()> {
        if !self.config.normalize {
            return Ok(());
        }
        if self.score_stats.len() != scores.scores.len() {
            bail!("the abstraction detector has no score statistics: refit it");
        }
        for (layer, &(mean, std)) in scores.scores.iter_mut().zip(&self.score_stats) {
            for v in layer.iter_mut() {
                *v = (*v - mean) / std.max(1e-12);
            }
        }
        Ok(())
    }

    /// f64 reference of the training loss of a batch: the mean output KL plus the mean
    /// over samples and layers of the cosine distances. `hidden[l]` and `logits` are
    /// the model's (rows x width, row-major).
    pub fn loss_reference(&self, hidden: &[Vec<f64>], logits: &[f64], rows: usize) -> Result<f64> {
        use crate::gpu::abstraction::{cosine_distance_reference, kl_divergence_reference};
        let l_count = self.num_hidden();
        let maps = self.maps()?;
        let widths = self.widths();
        // Each map's output: the last of its stack's outputs.
        let apply = |i: usize, x: &[f64]| -> Result<Vec<f64>> {
            let outs = maps[i].reference(std::slice::from_ref(&self.layers[i]), x, rows)?;
            Ok(outs.into_iter().last().unwrap_or_default())
        };
        let z: Vec<Vec<f64>> = (0..l_count)
            .map(|l| apply(l, &hidden[l]))
            .collect::<Result<_>>()?;
        let mut consistency = 0.0;
        for j in 0..l_count {
            let i = l_count + j;
            let out = apply(i, &z[j])?;
            let mean = |v: Vec<f64>| v.iter().sum::<f64>() / rows as f64;
            if j + 1 == l_count {
                let single = self.config.output_loss_fn == OutputLoss::SingleClass;
                let classes = self.model.output_dim;
                let (kl, _) = kl_divergence_reference(&out, logits, classes, single, 0.0);
                consistency += mean(kl);
            } else {
                let (cos, ..) =
                    cosine_distance_reference(&out, &z[j + 1], widths[j + 1], true, 0.0);
                consistency += mean(cos) / (l_count - 1) as f64;
            }
        }
        Ok(consistency)
    }
}

impl Detector for Abstraction {
    fn kind(&self) -> &'static str {
        "abstraction"
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
        self.init(&model.config, trusted.seed)?;
        let max_rows = self.max_rows(ctx)?;
        if self.config.batch_size > max_rows {
            bail!(
                "a training batch of {} exceeds the storage binding limit for this model's \
                 abstraction; use --detector.train.batch_size {max_rows} or less",
                self.config.batch_size
            );
        }
        let layout = self.layout();
        let training = Training {
            what: "abstraction",
            terms: self.num_hidden(),
            batch_size: self.config.batch_size,
            epochs: self.config.num_epochs,
            max_steps: self.config.max_steps,
            learning_rate: self.config.learning_rate,
            progress,
        };
        let record = |ws: &Workspace, s: &TrainState<'_>| -> Result<Vec<Dispatch>> {
            let t = self.tensors(ctx, ws.rows, true)?;
            let params = Params {
                layout: &layout,
                values: s.values,
                grads: Some(s.grads),
            };
            let rec = Recording {
                params: &params,
                t: &t,
                losses: s.losses,
                step: s.step,
            };
            self.record(ctx, model, ws, &rec)
        };
        let line = |means: &[f64]| {
            let (output, layers) = means.split_last().expect("at least the output loss");
            let consistency = layers.iter().sum::<f64>() / layers.len().max(1) as f64;
            format!("output loss {output:.4}  consistency loss {consistency:.4}")
        };
        let flat = feature_model::train(
            ctx,
            model,
            trusted,
            &layout.flatten(&self.layers),
            &training,
            &record,
            &line,
        )?;
        self.layers = layout.unflatten(&flat);
        let n = trusted.indices.len();
        let subset = &trusted.indices[..n.min(NORMALIZATION_SAMPLES)];
        let raw = self.raw_scores(
            ctx,
            model,
            &SampleSet {
                indices: subset,
                ..*trusted
            },
            self.config.batch_size.max(1024),
        )?;
        self.score_stats = raw
            .scores
            .iter()
            .map(|v| {
                let m = v.iter().sum::<f64>() / v.len() as f64;
                let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
                (m, var.sqrt())
            })
            .collect();
        Ok(())
    }

    fn layer_scores(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
        batch_size: usize,
    ) -> Result<LayerScores> {
        let mut scores = self.raw_scores(ctx, model, samples, batch_size)?;
        self.standardize(&mut scores)?;
        Ok(scores)
    }

    fn save(&self, path: &Path) -> Result<()> {
        let named: Vec<(String, Vec<usize>, &Dense)> = self
            .layer_names()
            .into_iter()
            .zip(self.maps()?)
            .zip(&self.layers)
            .map(|((name, map), d)| (name, maps::param_layer(&map).kernel_shape(), d))
            .collect();
        let stored = Stored {
            config: self.config.clone(),
            hidden_dims: self.model.hidden_dims.clone(),
            classes: self.model.output_dim,
            conv_channels: self.model.conv_channels.clone(),
            input_shape: self.model.input_shape,
            score_stats: self.score_stats.clone(),
        };
        save_layers(path, &named, METADATA_KEY, serde_json::to_string(&stored)?)
    }
}

/// The registry entry.
pub const ENTRY: DetectorEntry = DetectorEntry {
    name: "abstraction",
    doc: "Learned abstraction of the activations (tau maps and abstract steps); scores its consistency with the model.",
    config: ConfigSpec {
        defaults: defaults_of::<AbstractionConfig>,
        options: OPTIONS,
        nested: &[],
        debug: &[("/batch_size", "2"), ("/num_epochs", "1"), ("/max_steps", "1")],
    },
    build: Abstraction::build,
    load: Some(Abstraction::load),
};
