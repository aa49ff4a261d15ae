//! The supervised linear probe (the later upstream's `SupervisedLinearProbe`, a
//! "skyline": it sees the untrusted data's anomaly labels, which no real detector has).
//! Per chosen layer a logistic regression on the untrusted activations, trained
//! full-batch with Adam on the GPU as a one-layer stack with softmax cross-entropy over
//! {clean, anomalous}, from zero weights (so no seed). Features are standardised first
//! (upstream's optional `StandardScaler`, on by default here) and the scaler is folded
//! into the stored weights, so scoring is one row dot per sample: the log-odds
//! `w·x + b` of "anomalous" (upstream returns the probability: the same ranking, but it
//! saturates at 1.0, which ties the most anomalous samples). Unlike upstream, every
//! chosen layer gets its own probe.

use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::quadratic::select_layers;
use super::{
    for_each_activation_batch, read_activations, Detector, FitData, LayerScores, SampleSet, Uses,
};
use crate::gpu::adam::{adam, set_adam_step};
use crate::gpu::loss::{softmax_cross_entropy, LossOutputs};
use crate::gpu::stats::{row_dot, StatsParams};
use crate::gpu::{GpuContext, Slice, StepParams};
use crate::model::batches::MAX_IN_FLIGHT;
use crate::model::layers::{BoundStack, Layer, Needs, ParamLayout, StackBackward, StackForward};
use crate::model::mlp::{load_layer, save_layers, Dense};
use crate::model::GpuMlp;
use crate::registry::{defaults_of, opt, ConfigSpec, DetectorEntry, Kind, Opt};

const METADATA_KEY: &str = "cupbearer_probe";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeConfig {
    /// Activation layers to probe (0 = first); empty = all.
    pub layers: Vec<usize>,
    /// Standardise each feature (mean 0, variance 1 over the untrusted samples).
    pub standardize: bool,
    /// Full-batch Adam steps.
    pub steps: usize,
    pub learning_rate: f32,
    /// Samples per batch when reading activations and scoring.
    pub batch_size: usize,
    /// Train on at most this many untrusted samples, the same share of each set
    /// (0 = all).
    pub max_samples: usize,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            layers: Vec::new(),
            standardize: true,
            steps: 200,
            learning_rate: 0.03,
            batch_size: 2048,
            max_samples: 0,
        }
    }
}

/// One layer's probe, the scaler folded in: score = `weights · x + bias`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerProbe {
    pub layer: usize,
    pub weights: Vec<f32>,
    pub bias: f32,
}

pub struct Probe {
    pub config: ProbeConfig,
    pub probes: Vec<LayerProbe>,
    /// The mean training loss of each layer's probe after training.
    pub train_loss: Vec<f64>,
}

/// What one layer's probe trains on: standardised features and 0/1 labels.
struct Training<'a> {
    layer: usize,
    x: &'a [f32],
    labels: &'a wgpu::Buffer,
    n: usize,
}

impl Probe {
    pub fn new(config: ProbeConfig) -> Result<Self> {
        if !(1..=65535).contains(&config.batch_size) {
            bail!("batch_size must be in 1..=65535, got {}", config.batch_size);
        }
        if config.steps == 0 {
            bail!("steps must be >= 1");
        }
        if !(config.learning_rate > 0.0 && config.learning_rate.is_finite()) {
            bail!(
                "learning_rate must be positive, got {}",
                config.learning_rate
            );
        }
        Ok(Probe {
            config,
            probes: Vec::new(),
            train_loss: Vec::new(),
        })
    }

    pub fn build(config: &serde_json::Value) -> Result<Box<dyn Detector>> {
        let config = serde_json::from_value(config.clone()).context("supervised_probe config")?;
        Ok(Box::new(Self::new(config)?))
    }

    pub fn load(config: &serde_json::Value, path: &Path) -> Result<Box<dyn Detector>> {
        let mut det =
            Self::new(serde_json::from_value(config.clone()).context("supervised_probe config")?)?;
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let stored: Vec<(usize, usize)> =
            crate::io::safetensors_metadata(&bytes, path, METADATA_KEY, "a supervised probe")?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: corrupt safetensors file", path.display()))?;
        det.probes = stored
            .into_iter()
            .map(|(layer, d)| {
                let dense = load_layer(&st, path, &format!("layer{layer}"), &[d, 1], d, 1)?;
                Ok(LayerProbe {
                    layer,
                    weights: dense.kernel,
                    bias: dense.bias[0],
                })
            })
            .collect::<Result<_>>()?;
        Ok(Box::new(det))
    }

    /// Trains one layer's logistic regression on the GPU.
    fn train_layer(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        t: &Training<'_>,
    ) -> Result<(LayerProbe, f64)> {
        let n = t.n;
        let d = t.x.len() / n;
        let limit = ctx.limits.max_storage_buffer_binding_size as usize;
        if n * d * 4 > limit {
            bail!(
                "{n} untrusted samples of layer {} ({d} wide) exceed this adapter's storage \
                 binding limit of {limit} bytes; use --detector.max_samples {} or less",
                t.layer,
                limit / (4 * d)
            );
        }
        let (shift, scale) = standardizer(t.x, d, self.config.standardize);
        let xs: Vec<f32> =
            t.x.chunks_exact(d)
                .flat_map(|row| {
                    row.iter()
                        .zip(shift.iter().zip(&scale))
                        .map(|(&v, (m, s))| ((f64::from(v) - m) / s) as f32)
                })
                .collect();
        let x = ctx.buffer_from("probe inputs", &xs)?;
        let stack = crate::model::layers::Stack::new(vec![Layer::Dense {
            fan_in: d,
            fan_out: 2,
            relu: false,
        }]);
        let layout = ParamLayout::for_dims(&stack.param_dims());
        let zeros = |name: &str, len: usize| ctx.zeros(name, len);
        let (values, grads, m, v) = (
            zeros("probe params", layout.total)?,
            zeros("probe grads", layout.total)?,
            zeros("probe adam m", layout.total)?,
            zeros("probe adam v", layout.total)?,
        );
        let (logits, dlogits) = (
            zeros("probe logits", 2 * n)?,
            zeros("probe dlogits", 2 * n)?,
        );
        let (loss, correct) = (zeros("probe loss", n)?, zeros("probe correct", n)?);
        let needs = Needs {
            backward: true,
            param_grads: true,
            input_grad: false,
        };
        let buffers = stack.buffers(ctx, n, needs)?;
        let bound = BoundStack {
            stack: &stack,
            rows: n,
            schedule: model.schedule,
            slots: &layout.layers,
            values: &values,
            buffers: &buffers,
        };
        let step = ctx.uniform("step", &StepParams::default());
        let whole = Slice::whole;
        let mut ops = bound.forward(
            ctx,
            &StackForward {
                x: whole(&x),
                x_t: None,
                sparse: false,
                out: whole(&logits),
            },
        )?;
        let out = LossOutputs {
            grad: whole(&dlogits),
            sample_loss: whole(&loss),
            sample_correct: whole(&correct),
        };
        ops.push(softmax_cross_entropy(
            ctx,
            n,
            2,
            whole(&logits),
            whole(t.labels),
            &out,
            &step,
        )?);
        ops.extend(bound.backward(
            ctx,
            &StackBackward {
                x: whole(&x),
                sparse: false,
                g: whole(&dlogits),
                grads: Some(&grads),
                gx: None,
                gx_mask: None,
            },
        )?);
        let update = adam(
            ctx,
            layout.total,
            whole(&values),
            whole(&grads),
            whole(&m),
            whole(&v),
            &step,
        )?;
        ops.push(update);
        let mut in_flight = std::collections::VecDeque::new();
        for t in 1..=self.config.steps {
            let mut p = StepParams::default();
            set_adam_step(&mut p, self.config.learning_rate, t as u32);
            ctx.queue.write_buffer(&step, 0, bytemuck::bytes_of(&p));
            in_flight.push_back(ctx.submit(&ops));
            if in_flight.len() > MAX_IN_FLIGHT {
                ctx.wait(in_flight.pop_front())?;
            }
        }
        ctx.wait(None)?;
        // The loss of the last step's forward pass (before its update).
        let losses: Vec<f32> = ctx.read(Slice::new(&loss, 0, n))?;
        let mean_loss = losses.iter().map(|&l| f64::from(l)).sum::<f64>() / n as f64;
        if !mean_loss.is_finite() {
            bail!(
                "the probe of layer {} diverged (loss {mean_loss}); try a smaller learning rate",
                t.layer
            );
        }
        let flat: Vec<f32> = ctx.read(whole(&values))?;
        let trained = layout.unflatten(&flat).remove(0);
        Ok((fold(&trained, &shift, &scale, t.layer), mean_loss))
    }
}

/// Per-feature shift and scale: mean and standard deviation (1 where constant), or
/// (0, 1) without standardising.
fn standardizer(x: &[f32], d: usize, standardize: bool) -> (Vec<f64>, Vec<f64>) {
    if !standardize {
        return (vec![0.0; d], vec![1.0; d]);
    }
    let n = (x.len() / d) as f64;
    let mut mean = vec![0.0; d];
    for row in x.chunks_exact(d) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += f64::from(v) / n;
        }
    }
    let mut var = vec![0.0; d];
    for row in x.chunks_exact(d) {
        for ((s, &v), m) in var.iter_mut().zip(row).zip(&mean) {
            *s += (f64::from(v) - m).powi(2) / n;
        }
    }
    let scale = var
        .into_iter()
        .map(|v| if v > 0.0 { v.sqrt() } else { 1.0 })
        .collect();
    (mean, scale)
}

/// The log-odds of class 1 of a trained two-class layer on standardised inputs, as
/// weights and bias on raw inputs.
fn fold(trained: &Dense, shift: &[f64], scale: &[f64], layer: usize) -> LayerProbe {
    let k = &trained.kernel;
    let w: Vec<f64> = (0..shift.len())
        .map(|j| (f64::from(k[2 * j + 1]) - f64::from(k[2 * j])) / scale[j])
        .collect();
    let b = f64::from(trained.bias[1])
        - f64::from(trained.bias[0])
        - w.iter().zip(shift).map(|(w, m)| w * m).sum::<f64>();
    LayerProbe {
        layer,
        weights: w.into_iter().map(|v| v as f32).collect(),
        bias: b as f32,
    }
}

impl Detector for Probe {
    fn kind(&self) -> &'static str {
        "supervised_probe"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("plain struct serialises")
    }

    fn uses(&self) -> Uses {
        Uses {
            trusted: false,
            untrusted: true,
        }
    }

    fn fit(
        &mut self,
        _ctx: &GpuContext,
        _model: &GpuMlp,
        _trusted: &SampleSet<'_>,
        _progress: bool,
    ) -> Result<()> {
        bail!("the supervised probe trains on labelled untrusted data, not on trusted data alone")
    }

    fn fit_data(
        &mut self,
        ctx: &GpuContext,
        model: &GpuMlp,
        data: &FitData<'_>,
        progress: bool,
    ) -> Result<()> {
        let labels = data.untrusted_anomalous;
        if labels.len() != data.untrusted.len() {
            bail!("the supervised probe needs the anomaly label of every untrusted set");
        }
        if !(labels.contains(&true) && labels.contains(&false)) {
            bail!(
                "the supervised probe needs both clean and anomalous untrusted samples; set \
                 --task.clean_train_weight strictly between 0 and 1"
            );
        }
        let layers = select_layers(model, &self.config.layers)?;
        let total: usize = data.untrusted.iter().map(|s| s.indices.len()).sum();
        let cap = match self.config.max_samples {
            0 => total,
            m => m.min(total),
        };
        let mut features: Vec<Vec<f32>> = vec![Vec::new(); layers.len()];
        let mut y: Vec<u32> = Vec::new();
        for (set, &anomalous) in data.untrusted.iter().zip(labels) {
            // The sets are random draws already, so a prefix is a random subsample.
            let take = (set.indices.len() * cap).div_ceil(total);
            let sub = SampleSet {
                indices: &set.indices[..take],
                ..*set
            };
            let acts = read_activations(ctx, model, &sub, self.config.batch_size, &layers)?;
            for (f, a) in features.iter_mut().zip(acts) {
                f.extend(a);
            }
            y.extend(std::iter::repeat_n(u32::from(anomalous), take));
        }
        let labels = ctx.buffer_from("probe labels", &y)?;
        self.probes.clear();
        self.train_loss.clear();
        for (&layer, x) in layers.iter().zip(&features) {
            let t = Training {
                layer,
                x,
                labels: &labels,
                n: y.len(),
            };
            let (probe, loss) = self.train_layer(ctx, model, &t)?;
            if progress {
                eprintln!(
                    "probe layer{layer}: {} samples, training loss {loss:.4}",
                    y.len()
                );
            }
            self.probes.push(probe);
            self.train_loss.push(loss);
        }
        Ok(())
    }

    fn layer_scores(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
        batch_size: usize,
    ) -> Result<LayerScores> {
        if self.probes.is_empty() {
            bail!("the detector is not fitted");
        }
        let dims = model.config.activation_dims();
        for p in &self.probes {
            if dims.get(p.layer) != Some(&p.weights.len()) {
                bail!(
                    "the probe was fitted on a layer {} of width {}, but this model's layer {} \
                     has width {:?}: detector and model do not match",
                    p.layer,
                    p.weights.len(),
                    p.layer,
                    dims.get(p.layer)
                );
            }
        }
        let n = samples.indices.len();
        struct Bufs {
            weights: wgpu::Buffer,
            params: wgpu::Buffer,
            scores: wgpu::Buffer,
        }
        let bufs = self
            .probes
            .iter()
            .map(|p| {
                Ok(Bufs {
                    weights: ctx.buffer_from("probe weights", &p.weights)?,
                    params: ctx.uniform("row_dot", &StatsParams::default()),
                    // The row dots add to the bias.
                    scores: ctx.buffer_from("probe scores", &vec![p.bias; n])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for_each_activation_batch(
            ctx,
            model,
            samples,
            batch_size.min(n.max(1)),
            &|ws| {
                self.probes
                    .iter()
                    .zip(&bufs)
                    .map(|(p, b)| {
                        let act = ws.activation(p.layer);
                        let (w, out) = (Slice::whole(&b.weights), Slice::whole(&b.scores));
                        row_dot(ctx, ws.rows, act, w, out, &b.params)
                    })
                    .collect()
            },
            |offset, rows| {
                for (p, b) in self.probes.iter().zip(&bufs) {
                    let params = StatsParams::row_dot_vector(rows, p.weights.len(), offset);
                    ctx.queue
                        .write_buffer(&b.params, 0, bytemuck::bytes_of(&params));
                }
                Ok(())
            },
        )?;
        let scores = bufs
            .iter()
            .map(|b| {
                let s: Vec<f32> = ctx.read(Slice::new(&b.scores, 0, n))?;
                Ok(s.into_iter().map(f64::from).collect())
            })
            .collect::<Result<_>>()?;
        Ok(LayerScores {
            names: self
                .probes
                .iter()
                .map(|p| format!("layer{}", p.layer))
                .collect(),
            scores,
        })
    }

    fn save(&self, path: &Path) -> Result<()> {
        let dense: Vec<Dense> = self
            .probes
            .iter()
            .map(|p| Dense {
                fan_in: p.weights.len(),
                fan_out: 1,
                kernel: p.weights.clone(),
                bias: vec![p.bias],
            })
            .collect();
        let named: Vec<(String, Vec<usize>, &Dense)> = self
            .probes
            .iter()
            .zip(&dense)
            .map(|(p, d)| (format!("layer{}", p.layer), vec![d.fan_in, 1], d))
            .collect();
        let stored: Vec<(usize, usize)> = self
            .probes
            .iter()
            .map(|p| (p.layer, p.weights.len()))
            .collect();
        save_layers(path, &named, METADATA_KEY, serde_json::to_string(&stored)?)
    }
}

const OPTIONS: &[Opt] = &[
    opt(
        "layers",
        &["/layers"],
        Kind::Layers,
        "Activation layers to probe, by index or name (0 or layer0 = the first) [none: all].",
    ),
    opt(
        "standardize",
        &["/standardize"],
        Kind::Bool,
        "Standardise features before the regression (folded into the stored weights).",
    ),
    opt(
        "train.steps",
        &["/steps"],
        Kind::Int,
        "Full-batch Adam steps.",
    ),
    opt(
        "train.learning_rate",
        &["/learning_rate"],
        Kind::Float,
        "Adam learning rate.",
    ),
    opt(
        "train.batch_size",
        &["/batch_size"],
        Kind::Int,
        "Samples per batch when reading activations and scoring.",
    ),
    opt(
        "train.max_samples",
        &["/max_samples"],
        Kind::Int,
        "Train on at most this many untrusted samples (0 = all).",
    ),
];

/// The registry entry.
pub const ENTRY: DetectorEntry = DetectorEntry {
    name: "supervised_probe",
    doc: "Skyline: logistic regression on labelled untrusted activations, trained on the GPU (needs --task.trusted_fraction < 1).",
    config: ConfigSpec {
        defaults: defaults_of::<ProbeConfig>,
        options: OPTIONS,
        nested: &[],
        debug: &[("/steps", "2"), ("/max_samples", "64")],
    },
    build: Probe::build,
    load: Some(Probe::load),
};
