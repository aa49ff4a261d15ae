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

use super::abstraction_maps::{self as maps, BatchMap, Map, MapBuffers, MapParams, State};
use super::{for_each_activation_batch, Detector, LayerScores, SampleSet};
use crate::gpu::abstraction::{cosine_distance, kl_divergence, LossGrads};
use crate::gpu::adam::adam;
use crate::gpu::{Dispatch, GpuContext, Slice, StepParams};
use crate::model::batches::{BatchInputs, BatchPlans};
use crate::model::gpu_mlp::{ParamLayout, Workspace};
use crate::model::mlp::{load_layer, save_layers, Dense};
use crate::model::train::{run_epochs, EpochSchedule, LrSchedule};
use crate::model::{GpuMlp, Gradients, MlpConfig};
use crate::registry::{defaults_of, opt, ConfigSpec, DetectorEntry, Kind, Opt};

const METADATA_KEY: &str = "cupbearer.detector";
/// Keys the initialisation draws apart from the classifier's (same seed, same stream).
const INIT_LAYER_KEY: u32 = 1 << 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputLoss {
    /// KL divergence of the model's and the abstraction's class distributions.
    Kl,
    /// The same on [P(not class 0), P(class 0)] (the abstraction predicts 2 logits).
    SingleClass,
}

/// The τ maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbstractionKind {
    /// Affine maps to states of width / size_reduction.
    Simple,
    /// Elementwise gates z = a · sigmoid(s) (the original's SoftmaxDrop, scores
    /// initialised to 3): states keep the layer's width, so size_reduction does not
    /// apply (0.0.1 crashed unless it was 1).
    AxisAligned,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AbstractionConfig {
    pub abstraction: AbstractionKind,
    /// Abstract state width = round(layer width / size_reduction) (simple τ only).
    pub size_reduction: f64,
    pub output_loss_fn: OutputLoss,
    pub batch_size: usize,
    pub num_epochs: usize,
    pub learning_rate: f32,
    pub max_steps: Option<usize>,
    /// Standardise each layer's score by its mean and standard deviation on trusted
    /// data before averaging; `false` averages the raw losses (cupbearer 0.0.1).
    pub normalize: bool,
}

impl Default for AbstractionConfig {
    /// The original's defaults.
    fn default() -> Self {
        AbstractionConfig {
            abstraction: AbstractionKind::Simple,
            size_reduction: 4.0,
            output_loss_fn: OutputLoss::Kl,
            batch_size: 128,
            num_epochs: 10,
            learning_rate: 1e-3,
            max_steps: None,
            normalize: true,
        }
    }
}

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

/// Python's round (half to even), at least 1.
fn reduced(width: usize, reduction: f64) -> usize {
    let x = width as f64 / reduction;
    let r = x.round();
    let r = if (x - x.trunc() - 0.5).abs() < 1e-12 && r % 2.0 != 0.0 {
        r - 1.0
    } else {
        r
    };
    (r as usize).max(1)
}

/// Per-batch buffers of the abstraction's forward pass and, when training, gradients.
struct Tensors {
    /// z_l, l = 0..L.
    z: Vec<wgpu::Buffer>,
    /// ẑ_l, l = 1..L (index l - 1).
    zhat: Vec<wgpu::Buffer>,
    yhat: wgpu::Buffer,
    /// dL/dz_l.
    gz: Vec<wgpu::Buffer>,
    /// dL/d(pre-ReLU ẑ_l), l = 1..L (index l - 1).
    gpre: Vec<wgpu::Buffer>,
    gyhat: wgpu::Buffer,
    /// Each map's own batch buffers (im2col columns, pooling state).
    maps: Vec<MapBuffers>,
}

/// What [`Abstraction::pass`] leaves on the GPU: per-layer losses of every sample and,
/// if asked for, the last batch's parameter gradients.
struct Pass {
    layout: ParamLayout,
    losses: Vec<wgpu::Buffer>,
    grads: Option<wgpu::Buffer>,
}

/// The abstraction's parameters on the GPU, and where to put their gradients.
struct Params<'a> {
    layout: &'a ParamLayout,
    values: &'a wgpu::Buffer,
    grads: Option<&'a wgpu::Buffer>,
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
                let (fan_in, fan_out) = map.dims();
                load_layer(&st, path, &name, &map.kernel_shape(), fan_in, fan_out)
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

    /// Gradients of the training loss over all of `samples` as one batch (what one
    /// training step computes), in the layout of [`Abstraction::layers`].
    pub fn batch_gradients(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
    ) -> Result<Vec<Dense>> {
        let n = samples.indices.len();
        let pass = self.pass(ctx, model, samples, n, true)?;
        let grads = pass.grads.expect("requested");
        let flat: Vec<f32> = ctx.read(Slice::whole(&grads))?;
        Ok(pass.layout.unflatten(&flat))
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

    /// Where each map's parameters sit in the flat buffer (the layers exist, so the
    /// maps are known to be valid).
    fn layout(&self) -> ParamLayout {
        ParamLayout::for_dims(
            &self
                .layers
                .iter()
                .map(|d| (d.fan_in, d.fan_out))
                .collect::<Vec<_>>(),
        )
    }

    /// Per-layer losses of `samples` (in batches of `batch_size`) and, with
    /// `gradients`, the flat parameter gradients of the training loss (meaningful when
    /// the samples fit one batch).
    pub(crate) fn losses_and_gradients(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
        batch_size: usize,
        gradients: bool,
    ) -> Result<(LayerScores, Option<Vec<f32>>)> {
        let n = samples.indices.len();
        let pass = self.pass(ctx, model, samples, batch_size, gradients)?;
        let grads = pass
            .grads
            .as_ref()
            .map(|g| ctx.read::<f32>(Slice::whole(g)))
            .transpose()?;
        Ok((self.read_scores(ctx, &pass.losses, n)?, grads))
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

    fn read_scores(
        &self,
        ctx: &GpuContext,
        losses: &[wgpu::Buffer],
        n: usize,
    ) -> Result<LayerScores> {
        let scores = losses
            .iter()
            .map(|b| {
                let s: Vec<f32> = ctx.read(Slice::new(b, 0, n))?;
                Ok(s.into_iter().map(f64::from).collect())
            })
            .collect::<Result<_>>()?;
        let last = self.num_hidden() - 1;
        Ok(LayerScores {
            names: (1..=last)
                .map(|l| format!("layer{l}"))
                .chain(["output".to_string()])
                .collect(),
            scores,
        })
    }

    /// Runs the abstraction over `samples` (forward and losses; with `gradients`, the
    /// backward pass too, each batch's parameter gradients overwriting the last).
    fn pass(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
        batch_size: usize,
        gradients: bool,
    ) -> Result<Pass> {
        if self.layers.is_empty() {
            bail!("the abstraction detector is not trained");
        }
        self.check_model(model)?;
        let n = samples.indices.len();
        let max_rows = self.max_rows(ctx)?;
        let batch = batch_size.min(n.max(1));
        if gradients && batch > max_rows {
            bail!("gradients over {batch} samples at once exceed the storage binding limit ({max_rows} fit)");
        }
        let batch = batch.min(max_rows);
        let layout = self.layout();
        let values = ctx.buffer_from("abstraction params", &layout.flatten(&self.layers))?;
        let grads = gradients
            .then(|| ctx.zeros("abstraction grads", layout.total))
            .transpose()?;
        let params = Params {
            layout: &layout,
            values: &values,
            grads: grads.as_ref(),
        };
        let step = ctx.uniform("step", &StepParams::default());
        let losses = (0..self.num_hidden())
            .map(|l| ctx.zeros(&format!("abstraction loss {l}"), n))
            .collect::<Result<Vec<_>>>()?;
        for_each_activation_batch(
            ctx,
            model,
            samples,
            batch,
            &|ws| {
                let t = self.tensors(ctx, ws.rows, gradients)?;
                self.record(ctx, model, ws, &params, &t, &losses, &step)
            },
            |offset, _| {
                let p = StepParams {
                    batch_offset: offset as u32,
                    ..Default::default()
                };
                ctx.queue.write_buffer(&step, 0, bytemuck::bytes_of(&p));
                Ok(())
            },
        )?;
        Ok(Pass {
            layout,
            losses,
            grads,
        })
    }

    /// f64 reference of the training loss of a batch: the mean output KL plus the mean
    /// over samples and layers of the cosine distances. `hidden[l]` and `logits` are
    /// the model's (rows x width, row-major).
    pub fn loss_reference(&self, hidden: &[Vec<f64>], logits: &[f64], rows: usize) -> Result<f64> {
        use crate::gpu::abstraction::{cosine_distance_reference, kl_divergence_reference};
        let l_count = self.num_hidden();
        let maps = self.maps()?;
        let widths = self.widths();
        let z: Vec<Vec<f64>> = (0..l_count)
            .map(|l| maps::forward_reference(maps[l], &self.layers[l], &hidden[l], rows))
            .collect();
        let mut consistency = 0.0;
        for j in 0..l_count {
            let i = l_count + j;
            let out = maps::forward_reference(maps[i], &self.layers[i], &z[j], rows);
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

    /// Per-layer losses of every sample: the consistency of hidden layers 1..L, then
    /// the output loss.
    fn raw_scores(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
        batch_size: usize,
    ) -> Result<LayerScores> {
        Ok(self
            .losses_and_gradients(ctx, model, samples, batch_size, false)?
            .0)
    }

    fn num_hidden(&self) -> usize {
        self.model.activation_dims().len()
    }

    fn pred_dim(&self) -> usize {
        match self.config.output_loss_fn {
            OutputLoss::Kl => self.model.output_dim,
            OutputLoss::SingleClass => 2,
        }
    }

    fn axis_aligned(&self) -> bool {
        self.config.abstraction == AbstractionKind::AxisAligned
    }

    /// The model's activations: each conv block's pooled output, then each dense layer.
    fn activations(&self) -> Vec<State> {
        let convs = self
            .model
            .conv_blocks()
            .into_iter()
            .map(|b| State::Spatial {
                height: b.height / 2,
                width: b.width / 2,
                channels: b.out_channels,
            });
        convs
            .chain(self.model.hidden_dims.iter().map(|&d| State::Flat(d)))
            .collect()
    }

    /// The abstract states z_l: channels or widths reduced by size_reduction (the
    /// axis-aligned τ keeps them).
    fn states(&self) -> Vec<State> {
        let reduce = |n: usize| {
            if self.axis_aligned() {
                n
            } else {
                reduced(n, self.config.size_reduction)
            }
        };
        self.activations()
            .into_iter()
            .map(|a| match a {
                State::Spatial {
                    height,
                    width,
                    channels,
                } => State::Spatial {
                    height,
                    width,
                    channels: reduce(channels),
                },
                State::Flat(d) => State::Flat(reduce(d)),
            })
            .collect()
    }

    /// Abstract state widths d_l (flattened).
    fn widths(&self) -> Vec<usize> {
        self.states().into_iter().map(State::width).collect()
    }

    /// τ_0..τ_{L-1}, then m_0..m_{L-1}: each step has the type of the model's step
    /// between the same shapes (conv block, global pool + dense, dense).
    fn maps(&self) -> Result<Vec<Map>> {
        let (acts, z) = (self.activations(), self.states());
        let taus = acts.iter().zip(&z).map(|(&a, &s)| {
            if self.axis_aligned() {
                Ok(Map::Gate { width: a.width() })
            } else {
                Map::between(a, s, false, false)
            }
        });
        let steps = (0..z.len()).map(|j| match z.get(j + 1) {
            Some(&next) => Map::between(z[j], next, true, true),
            None => Map::between(z[j], State::Flat(self.pred_dim()), true, false),
        });
        taus.chain(steps).collect()
    }

    /// (fan_in, fan_out) of every map's parameters.
    fn dims(&self) -> Result<Vec<(usize, usize)>> {
        Ok(self.maps()?.into_iter().map(Map::dims).collect())
    }

    fn layer_names(&self) -> Vec<String> {
        let l = self.num_hidden();
        (0..l)
            .map(|i| format!("tau_{i}"))
            .chain((0..l).map(|i| format!("step_{i}")))
            .collect()
    }

    fn check_model(&self, model: &GpuMlp) -> Result<()> {
        if model.config != self.model {
            bail!(
                "the abstraction was trained for the model {:?}, but this model is {:?}: \
                 detector and model do not match",
                self.model,
                model.config
            );
        }
        Ok(())
    }

    /// The largest batch whose buffers each fit one storage binding.
    fn max_rows(&self, ctx: &GpuContext) -> Result<usize> {
        let per_sample = self
            .maps()?
            .into_iter()
            .map(Map::largest_buffer)
            .chain(self.widths())
            .max()
            .unwrap_or(1);
        let limit = ctx.limits.max_storage_buffer_binding_size as usize;
        Ok((limit / (4 * per_sample.max(1))).max(1))
    }

    fn tensors(&self, ctx: &GpuContext, rows: usize, gradients: bool) -> Result<Tensors> {
        let d = self.widths();
        let per =
            |name: &str, range: std::ops::Range<usize>, on: bool| -> Result<Vec<wgpu::Buffer>> {
                if !on {
                    return Ok(Vec::new());
                }
                range
                    .map(|l| ctx.zeros(&format!("{name}{l}"), rows * d[l]))
                    .collect()
            };
        let l = d.len();
        let q = self.pred_dim();
        let maps = self
            .maps()?
            .into_iter()
            .enumerate()
            .map(|(i, map)| MapBuffers::new(ctx, map, rows, gradients, i >= l))
            .collect::<Result<_>>()?;
        Ok(Tensors {
            z: per("z", 0..l, true)?,
            zhat: per("zhat", 1..l, true)?,
            yhat: ctx.zeros("yhat", rows * q)?,
            gz: per("gz", 0..l, gradients)?,
            gpre: per("gpre", 1..l, gradients)?,
            gyhat: ctx.zeros("gyhat", if gradients { rows * q } else { 1 })?,
            maps,
        })
    }

    /// The abstraction's forward pass, losses and (with `params.grads`) backward pass on
    /// the model's workspace `ws`. `losses[l - 1]` receives the consistency loss of hidden
    /// layer l (l = 1..L), `losses[L - 1]` the output loss, at the batch's position.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        ws: &Workspace,
        params: &Params<'_>,
        t: &Tensors,
        losses: &[wgpu::Buffer],
        step: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let rows = ws.rows;
        let l_count = self.num_hidden();
        let d = self.widths();
        let maps = self.maps()?;
        let batch_map = |i: usize| BatchMap {
            map: maps[i],
            rows,
            params: MapParams {
                slot: params.layout.layers[i],
                values: params.values,
            },
            buffers: &t.maps[i],
        };
        let whole = Slice::whole;
        let schedule = model.schedule;
        let mut ops = Vec::new();
        // Forward: z_l = τ_l(a_l); ẑ_{l+1} = m_l(z_l); ŷ = m_L(z_L).
        for (l, z) in t.z.iter().enumerate() {
            ops.extend(maps::forward(
                ctx,
                schedule,
                &batch_map(l),
                ws.activation(l),
                whole(z),
            )?);
        }
        for j in 0..l_count {
            let out = if j + 1 == l_count {
                &t.yhat
            } else {
                &t.zhat[j]
            };
            let m = batch_map(l_count + j);
            ops.extend(maps::forward(
                ctx,
                schedule,
                &m,
                whole(&t.z[j]),
                whole(out),
            )?);
        }
        // Losses, and the backward pass interleaved with them: the cosine loss of layer
        // l adds to dL/dz_l, which the backward step of m_l has written just before.
        let grads = params.grads;
        let cons_scale = 1.0 / (rows * l_count.saturating_sub(1).max(1)) as f32;
        ops.push(kl_divergence(
            ctx,
            rows,
            self.model.output_dim,
            self.config.output_loss_fn == OutputLoss::SingleClass,
            whole(&t.yhat),
            whole(&ws.logits),
            whole(&losses[l_count - 1]),
            grads
                .map(|_| LossGrads {
                    pred: whole(&t.gyhat),
                    reference: None,
                    scale: 1.0 / rows as f32,
                })
                .as_ref(),
            step,
        )?);
        for j in (0..l_count).rev() {
            if let Some(g) = grads {
                let g_out = if j + 1 == l_count {
                    &t.gyhat
                } else {
                    &t.gpre[j]
                };
                let (x, g_out, gz) = (whole(&t.z[j]), whole(g_out), whole(&t.gz[j]));
                let m = batch_map(l_count + j);
                ops.extend(maps::backward(ctx, schedule, &m, x, g_out, g, Some(gz))?);
            }
            if j >= 1 {
                ops.push(cosine_distance(
                    ctx,
                    rows,
                    d[j],
                    true,
                    whole(&t.zhat[j - 1]),
                    whole(&t.z[j]),
                    whole(&losses[j - 1]),
                    grads
                        .map(|_| LossGrads {
                            pred: whole(&t.gpre[j - 1]),
                            reference: Some(whole(&t.gz[j])),
                            scale: cons_scale,
                        })
                        .as_ref(),
                    step,
                )?);
            }
        }
        if let Some(g) = grads {
            for (l, gz) in t.gz.iter().enumerate() {
                let (x, gz) = (ws.activation(l), whole(gz));
                ops.extend(maps::backward(
                    ctx,
                    schedule,
                    &batch_map(l),
                    x,
                    gz,
                    g,
                    None,
                )?);
            }
        }
        Ok(ops)
    }
}

fn mean(ctx: &GpuContext, buf: &wgpu::Buffer, n: usize) -> Result<f64> {
    let v: Vec<f32> = ctx.read(Slice::new(buf, 0, n))?;
    Ok(v.iter().map(|&x| x as f64).sum::<f64>() / n.max(1) as f64)
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
        let values = ctx.buffer_from("abstraction params", &layout.flatten(&self.layers))?;
        let total = layout.total;
        let (grads, m, v) = (
            ctx.zeros("abstraction grads", total)?,
            ctx.zeros("abstraction adam m", total)?,
            ctx.zeros("abstraction adam v", total)?,
        );
        let n = trusted.indices.len();
        let indices = ctx.zeros("abstraction order", n)?;
        let step = ctx.uniform("step", &StepParams::default());
        let losses = (0..self.num_hidden())
            .map(|l| ctx.zeros(&format!("abstraction loss {l}"), n))
            .collect::<Result<Vec<_>>>()?;
        let params = Params {
            layout: &layout,
            values: &values,
            grads: Some(&grads),
        };
        let train_ops = |ws: &Workspace| -> Result<Vec<Dispatch>> {
            let t = self.tensors(ctx, ws.rows, true)?;
            let mut ops = self.record(ctx, model, ws, &params, &t, &losses, &step)?;
            let whole = Slice::whole;
            ops.push(adam(
                ctx,
                total,
                whole(&values),
                whole(&grads),
                whole(&m),
                whole(&v),
                &step,
            )?);
            Ok(ops)
        };
        let inputs = BatchInputs {
            data: trusted.data,
            indices: &indices,
            step: &step,
            backdoor: trusted.backdoor,
            seed: trusted.seed,
        };
        let plans = BatchPlans::new(
            ctx,
            model,
            &inputs,
            n,
            self.config.batch_size,
            Gradients::None,
            &train_ops,
        )?;
        let schedule = EpochSchedule {
            epochs: self.config.num_epochs,
            max_steps: self.config.max_steps,
            learning_rate: self.config.learning_rate,
            lr_schedule: LrSchedule::Constant,
            seed: trusted.seed,
            progress,
        };
        let last = self.num_hidden() - 1;
        run_epochs(
            ctx,
            &plans,
            &indices,
            &step,
            trusted.indices,
            &schedule,
            |e| {
                let output = mean(ctx, &losses[last], e.samples)?;
                let mut consistency = 0.0;
                for buf in &losses[..last] {
                    consistency += mean(ctx, buf, e.samples)? / last as f64;
                }
                if !(output.is_finite() && consistency.is_finite()) {
                    bail!(
                        "abstraction training diverged in epoch {} (output loss {output}, \
                     consistency {consistency}); try a smaller learning rate",
                        e.epoch
                    );
                }
                Ok(format!(
                    "output loss {output:.4}  consistency loss {consistency:.4}"
                ))
            },
        )?;
        let flat: Vec<f32> = ctx.read(Slice::whole(&values))?;
        self.layers = layout.unflatten(&flat);
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
            .map(|((name, map), d)| (name, map.kernel_shape(), d))
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

/// The options of [`AbstractionConfig`] (also those of the adversarial abstraction's
/// starting abstraction).
pub const OPTIONS: &[Opt] = &[
    opt("abstraction", &["/abstraction"], Kind::Str, "The tau maps: simple (affine, reduced width) or axis_aligned (elementwise gates, full width)."),
    opt("abstraction.size_reduction", &["/size_reduction"], Kind::Float, "Abstract state width = layer width / this (simple only)."),
    opt("abstraction.output_loss_fn", &["/output_loss_fn"], Kind::Str, "Output loss: kl or single_class."),
    opt("train.batch_size", &["/batch_size"], Kind::Int, "Samples per training batch."),
    opt("train.num_epochs", &["/num_epochs"], Kind::Int, "Training epochs."),
    Opt {
        aliases: &["train.learning_rate"],
        ..opt("train.optimizer.learning_rate", &["/learning_rate"], Kind::Float, "Adam learning rate.")
    },
    opt("train.max_steps", &["/max_steps"], Kind::Int, "Stop after this many steps."),
    opt("normalize", &["/normalize"], Kind::Bool, "Standardise each layer's score on trusted data (false: cupbearer 0.0.1)."),
];

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
