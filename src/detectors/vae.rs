//! The VAE detector (the later upstream's `VAEDetector`): per chosen activation layer
//! of width d a variational autoencoder, encoder d → 2d → ReLU → 2·latent (μ, log σ²)
//! and decoder latent → 2d → ReLU → d, built from the layer library's dense layers.
//! Loss per sample = mean squared reconstruction error + `kld_weight` ·
//! KL(N(μ, σ²) ‖ N(0, 1)); trained with Adam on trusted activations, every step one
//! submit (classifier forward, VAE forwards, `shaders/vae.wgsl`'s sampling and loss,
//! backward, Adam). A sample's score per layer is that loss, with z = μ (deterministic)
//! unless `score_noise` (the upstream also samples at scoring time).
//!
//! Conv activations are flattened (h·w·c wide), as the Gaussian detectors read them.
//! `detector.safetensors`: per fitted layer `l`, `layer{l}.encoder{0,1}` and
//! `layer{l}.decoder{0,1}` (`.kernel` [fan_in, fan_out], `.bias` [fan_out]); metadata
//! `cupbearer.detector` holds the config, the model and the fitted layers.

use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::feature_model::{self, TrainState, Training};
use super::quadratic::select_layers;
use super::{for_each_activation_batch, Detector, LayerScores, SampleSet};
use crate::gpu::vae::{
    loss_reference, sample_reference, vae_latent_grad, vae_loss, vae_sample, LossIo, VaeShape,
};
use crate::gpu::{Dispatch, GpuContext, Slice, StepParams};
use crate::model::batches::EVAL_EPOCH;
use crate::model::gpu_mlp::Workspace;
use crate::model::layers::{
    BoundStack, Layer, Needs, ParamLayout, Stack, StackBackward, StackBuffers, StackForward,
};
use crate::model::mlp::{load_layer, save_layers, Dense};
use crate::model::{GpuMlp, MlpConfig};
use crate::registry::{defaults_of, opt, ConfigSpec, DetectorEntry, Kind, Opt};

const METADATA_KEY: &str = "cupbearer.detector";
/// Keys the initialisation draws apart from the classifier's and the abstraction's.
const INIT_KEY: u32 = 2 << 16;
/// Parameterised layers per VAE: encoder 0, 1, decoder 0, 1.
const PARTS: [&str; 4] = ["encoder0", "encoder1", "decoder0", "decoder1"];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaeConfig {
    /// Activation layers to model (0 = first); empty = all.
    pub layers: Vec<usize>,
    pub latent_dim: usize,
    pub kld_weight: f32,
    pub batch_size: usize,
    pub num_epochs: usize,
    pub learning_rate: f32,
    pub max_steps: Option<usize>,
    /// Sample the latent at scoring time too (the upstream does when kld_weight > 0).
    pub score_noise: bool,
}

impl Default for VaeConfig {
    /// The upstream's defaults (Adam 1e-3, one epoch of batches of 32, kld_weight 1);
    /// latent 32 as its MNIST test has for 128-wide layers.
    fn default() -> Self {
        VaeConfig {
            layers: Vec::new(),
            latent_dim: 32,
            kld_weight: 1.0,
            batch_size: 32,
            num_epochs: 1,
            learning_rate: 1e-3,
            max_steps: None,
            score_noise: false,
        }
    }
}

/// What the trained parameters belong to, stored with them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Stored {
    config: VaeConfig,
    model: MlpConfig,
    layers: Vec<usize>,
    seed: u32,
}

#[derive(Clone)]
pub struct Vae {
    pub config: VaeConfig,
    model: MlpConfig,
    /// The fitted activation layers and their widths.
    layers: Vec<usize>,
    dims: Vec<usize>,
    /// Four per fitted layer, in [`PARTS`] order.
    params: Vec<Dense>,
    /// Seeds the latent noise.
    seed: u32,
}

/// A stack's forward pass from a row-major input.
fn forward<'a>(x: Slice<'a>, out: Slice<'a>) -> StackForward<'a> {
    StackForward {
        x,
        x_t: None,
        sparse: false,
        out,
    }
}

/// One layer's VAE: its two stacks.
struct Net {
    encoder: Stack,
    decoder: Stack,
}

/// One layer's batch tensors.
struct Tensors {
    enc: wgpu::Buffer,
    z: wgpu::Buffer,
    recon: wgpu::Buffer,
    /// Gradients (training only): d/d(recon), d/dz, d/d(enc).
    g_recon: Option<wgpu::Buffer>,
    dz: Option<wgpu::Buffer>,
    g_enc: Option<wgpu::Buffer>,
    encoder: StackBuffers,
    decoder: StackBuffers,
}

/// How a recorded batch runs: its parameters, gradients (None: scoring), per-layer loss
/// buffers, step uniform, whether the latent is sampled, and the gradient scale.
struct Recording<'a> {
    values: &'a wgpu::Buffer,
    grads: Option<&'a wgpu::Buffer>,
    losses: &'a [wgpu::Buffer],
    step: &'a wgpu::Buffer,
    noise: bool,
}

impl Vae {
    pub fn new(config: VaeConfig) -> Result<Self> {
        if config.latent_dim == 0 {
            bail!("latent_dim must be >= 1");
        }
        if !(config.kld_weight.is_finite() && config.kld_weight >= 0.0) {
            bail!(
                "kld_weight must be a number >= 0, got {}",
                config.kld_weight
            );
        }
        if config.batch_size == 0 || config.batch_size > 65535 {
            bail!("batch_size must be in 1..=65535, got {}", config.batch_size);
        }
        if config.num_epochs == 0 {
            bail!("num_epochs must be >= 1");
        }
        if !(config.learning_rate.is_finite() && config.learning_rate > 0.0) {
            bail!(
                "learning_rate must be a number > 0, got {}",
                config.learning_rate
            );
        }
        Ok(Vae {
            config,
            model: MlpConfig::default(),
            layers: Vec::new(),
            dims: Vec::new(),
            params: Vec::new(),
            seed: 0,
        })
    }

    pub fn build(config: &serde_json::Value) -> Result<Box<dyn Detector>> {
        let config = serde_json::from_value(config.clone()).context("vae config")?;
        Ok(Box::new(Vae::new(config)?))
    }

    pub fn load(config: &serde_json::Value, path: &Path) -> Result<Box<dyn Detector>> {
        let mut det = Vae::new(serde_json::from_value(config.clone()).context("vae config")?)?;
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let stored: Stored =
            crate::io::safetensors_metadata(&bytes, path, METADATA_KEY, "a VAE detector")?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: corrupt safetensors file", path.display()))?;
        det.set_model(&stored.model, &stored.layers)?;
        det.seed = stored.seed;
        det.params = det
            .param_names()
            .into_iter()
            .zip(det.param_dims())
            .map(|(name, (fan_in, fan_out))| {
                load_layer(&st, path, &name, &[fan_in, fan_out], fan_in, fan_out)
            })
            .collect::<Result<_>>()?;
        Ok(Box::new(det))
    }

    fn set_model(&mut self, model: &MlpConfig, layers: &[usize]) -> Result<()> {
        let dims = model.activation_dims();
        if let Some(&bad) = layers.iter().find(|&&l| l >= dims.len()) {
            bail!(
                "layer {bad} does not exist: the model has {} hidden layers",
                dims.len()
            );
        }
        self.model = model.clone();
        self.layers = layers.to_vec();
        self.dims = layers.iter().map(|&l| dims[l]).collect();
        Ok(())
    }

    /// Fresh parameters for `layers` of `model`: LeCun-normal kernels, zero biases.
    pub fn init(&mut self, model: &MlpConfig, layers: &[usize], seed: u32) -> Result<()> {
        self.set_model(model, layers)?;
        self.seed = seed;
        self.params = self
            .param_dims()
            .into_iter()
            .enumerate()
            .map(|(i, (fan_in, fan_out))| Dense::lecun(fan_in, fan_out, seed, INIT_KEY + i as u32))
            .collect();
        Ok(())
    }

    /// The parameters, four per fitted layer (encoder 0, 1, decoder 0, 1).
    pub fn params(&self) -> &[Dense] {
        &self.params
    }

    pub fn params_mut(&mut self) -> &mut [Dense] {
        &mut self.params
    }

    fn net(&self, d: usize) -> Net {
        let l = self.config.latent_dim;
        let dense = |fan_in, fan_out, relu| Layer::Dense {
            fan_in,
            fan_out,
            relu,
        };
        Net {
            encoder: Stack::new(vec![dense(d, 2 * d, true), dense(2 * d, 2 * l, false)]),
            decoder: Stack::new(vec![dense(l, 2 * d, true), dense(2 * d, d, false)]),
        }
    }

    fn param_dims(&self) -> Vec<(usize, usize)> {
        self.dims
            .iter()
            .flat_map(|&d| {
                let net = self.net(d);
                let mut dims = net.encoder.param_dims();
                dims.extend(net.decoder.param_dims());
                dims
            })
            .collect()
    }

    fn param_names(&self) -> Vec<String> {
        self.layers
            .iter()
            .flat_map(|l| PARTS.iter().map(move |p| format!("layer{l}.{p}")))
            .collect()
    }

    fn layout(&self) -> ParamLayout {
        ParamLayout::for_dims(&self.param_dims())
    }

    fn shape(&self, i: usize, rows: usize, noise: bool) -> VaeShape {
        VaeShape {
            rows,
            dim: self.dims[i],
            latent: self.config.latent_dim,
            seed: self.seed,
            kld_weight: self.config.kld_weight,
            noise: noise && self.config.kld_weight > 0.0,
            scale: 1.0 / (rows * self.dims.len()) as f32,
        }
    }

    /// The largest batch whose buffers each fit one storage binding.
    fn max_rows(&self, ctx: &GpuContext) -> Result<usize> {
        let limit = ctx.limits.max_storage_buffer_binding_size as usize;
        let total = self.layout().total;
        if 4 * total > limit {
            bail!(
                "the VAEs have {total} parameters, more than one storage binding holds \
                 ({} MiB): choose fewer or narrower layers with --detector.layers",
                limit >> 20
            );
        }
        let widest = self.dims.iter().max().copied().unwrap_or(1);
        let per_sample = (2 * widest).max(2 * self.config.latent_dim);
        Ok((limit / (4 * per_sample)).max(1))
    }

    fn check_model(&self, model: &GpuMlp) -> Result<()> {
        if self.params.is_empty() {
            bail!("the VAE detector is not fitted");
        }
        if model.config != self.model {
            bail!(
                "the VAEs were trained for the model {:?}, but this model is {:?}",
                self.model,
                model.config
            );
        }
        Ok(())
    }

    fn tensors(&self, ctx: &GpuContext, i: usize, rows: usize, grads: bool) -> Result<Tensors> {
        let (d, l) = (self.dims[i], self.config.latent_dim);
        let net = self.net(d);
        let zeros = |name: &str, len: usize| ctx.zeros(name, rows * len);
        let grad = |name: &str, len: usize| grads.then(|| zeros(name, len)).transpose();
        let needs = |input_grad| Needs {
            backward: grads,
            param_grads: grads,
            input_grad: grads && input_grad,
        };
        Ok(Tensors {
            enc: zeros("vae enc", 2 * l)?,
            z: zeros("vae z", l)?,
            recon: zeros("vae recon", d)?,
            g_recon: grad("vae grad recon", d)?,
            dz: grad("vae grad z", l)?,
            g_enc: grad("vae grad enc", 2 * l)?,
            encoder: net.encoder.buffers(ctx, rows, needs(false))?,
            decoder: net.decoder.buffers(ctx, rows, needs(true))?,
        })
    }

    /// Every layer's VAE on the classifier's workspace `ws`: forward, per-sample loss
    /// into `rec.losses[i]` at the batch's position and, with `rec.grads`, backward.
    fn record(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        ws: &Workspace,
        rec: &Recording<'_>,
    ) -> Result<Vec<Dispatch>> {
        let layout = self.layout();
        let rows = ws.rows;
        let mut ops = Vec::new();
        for (i, &layer) in self.layers.iter().enumerate() {
            let t = self.tensors(ctx, i, rows, rec.grads.is_some())?;
            let whole = Slice::whole;
            let net = self.net(self.dims[i]);
            let slots = &layout.layers[4 * i..4 * i + 4];
            let bound = |stack, slots, buffers| BoundStack {
                stack,
                rows,
                schedule: model.schedule,
                slots,
                values: rec.values,
                buffers,
            };
            let encoder = bound(&net.encoder, &slots[..2], &t.encoder);
            let decoder = bound(&net.decoder, &slots[2..], &t.decoder);
            let shape = self.shape(i, rows, rec.noise);
            let x = ws.activation(layer);
            ops.extend(encoder.forward(ctx, &forward(x, whole(&t.enc)))?);
            ops.push(vae_sample(
                ctx,
                &shape,
                whole(&t.enc),
                whole(&t.z),
                rec.step,
            )?);
            ops.extend(decoder.forward(ctx, &forward(whole(&t.z), whole(&t.recon)))?);
            let io = LossIo {
                x,
                recon: whole(&t.recon),
                enc: whole(&t.enc),
                loss: whole(&rec.losses[i]),
                grad_recon: t.g_recon.as_ref().map(whole),
            };
            ops.push(vae_loss(ctx, &shape, &io, rec.step)?);
            let (Some(grads), Some(g_recon), Some(dz), Some(g_enc)) =
                (rec.grads, &t.g_recon, &t.dz, &t.g_enc)
            else {
                continue;
            };
            let gz = StackBackward {
                x: whole(&t.z),
                sparse: false,
                g: whole(g_recon),
                grads: Some(grads),
                gx: Some(whole(dz)),
                gx_mask: None,
            };
            ops.extend(decoder.backward(ctx, &gz)?);
            ops.push(vae_latent_grad(
                ctx,
                &shape,
                whole(&t.enc),
                whole(dz),
                whole(g_enc),
                rec.step,
            )?);
            let genc = StackBackward {
                x,
                g: whole(g_enc),
                gx: None,
                ..gz
            };
            ops.extend(encoder.backward(ctx, &genc)?);
        }
        Ok(ops)
    }

    /// Per-layer losses of every sample (in batches of `batch_size`) and, with
    /// `gradients`, the parameter gradients of the mean training loss of the last batch
    /// (the whole set when it fits one batch), drawn as epoch 0's first batch.
    pub fn losses_and_gradients(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
        batch_size: usize,
        gradients: bool,
    ) -> Result<(LayerScores, Option<Vec<Dense>>)> {
        self.check_model(model)?;
        let n = samples.indices.len();
        let max_rows = self.max_rows(ctx)?;
        let batch = batch_size.min(n.max(1));
        if gradients && batch > max_rows {
            bail!("gradients over {batch} samples at once exceed the storage binding limit ({max_rows} fit)");
        }
        let layout = self.layout();
        let values = ctx.buffer_from("vae params", &layout.flatten(&self.params))?;
        let grads = gradients
            .then(|| ctx.zeros("vae grads", layout.total))
            .transpose()?;
        let step = ctx.uniform("step", &StepParams::default());
        let losses = (0..self.layers.len())
            .map(|l| ctx.zeros(&format!("vae loss {l}"), n))
            .collect::<Result<Vec<_>>>()?;
        let rec = Recording {
            values: &values,
            grads: grads.as_ref(),
            losses: &losses,
            step: &step,
            noise: gradients || self.config.score_noise,
        };
        let epoch = if gradients { 0 } else { EVAL_EPOCH };
        for_each_activation_batch(
            ctx,
            model,
            samples,
            batch.min(max_rows),
            &|ws| self.record(ctx, model, ws, &rec),
            |offset, _| {
                let p = StepParams {
                    epoch,
                    batch_offset: offset as u32,
                    ..Default::default()
                };
                ctx.queue.write_buffer(&step, 0, bytemuck::bytes_of(&p));
                Ok(())
            },
        )?;
        let names = self.layers.iter().map(|l| format!("layer{l}")).collect();
        let scores = crate::gpu::block_on(LayerScores::read(ctx, names, &losses, n))?;
        let grads = grads
            .map(|g| Ok::<_, anyhow::Error>(layout.unflatten(&ctx.read(Slice::whole(&g))?)))
            .transpose()?;
        Ok((scores, grads))
    }

    /// f64 reference of the per-layer losses of `rows` samples whose activations of the
    /// fitted layers are `acts` (one rows x width matrix each), as the first batch of
    /// `epoch`, the latent sampled if `noise`.
    pub fn loss_reference(
        &self,
        acts: &[Vec<f64>],
        rows: usize,
        epoch: u32,
        noise: bool,
    ) -> Result<Vec<Vec<f64>>> {
        (0..self.layers.len())
            .map(|i| {
                let net = self.net(self.dims[i]);
                let p = &self.params[4 * i..4 * i + 4];
                let shape = self.shape(i, rows, noise);
                let last = |v: Vec<Vec<f64>>| v.into_iter().last().unwrap_or_default();
                let enc = last(net.encoder.reference(&p[..2], &acts[i], rows)?);
                let z = sample_reference(&shape, &enc, epoch, 0);
                let recon = last(net.decoder.reference(&p[2..], &z, rows)?);
                Ok(loss_reference(&shape, &acts[i], &recon, &enc).0)
            })
            .collect()
    }
}

impl Detector for Vae {
    fn kind(&self) -> &'static str {
        "vae"
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
        let layers = select_layers(model, &self.config.layers)?;
        self.init(&model.config, &layers, trusted.seed)?;
        let max_rows = self.max_rows(ctx)?;
        if self.config.batch_size > max_rows {
            bail!(
                "a training batch of {} exceeds the storage binding limit for these VAEs; \
                 use --detector.train.batch_size {max_rows} or less",
                self.config.batch_size
            );
        }
        let training = Training {
            what: "VAE",
            terms: layers.len(),
            batch_size: self.config.batch_size,
            epochs: self.config.num_epochs,
            max_steps: self.config.max_steps,
            learning_rate: self.config.learning_rate,
            progress,
        };
        let record = |ws: &Workspace, s: &TrainState<'_>| {
            let rec = Recording {
                values: s.values,
                grads: Some(s.grads),
                losses: s.losses,
                step: s.step,
                noise: true,
            };
            self.record(ctx, model, ws, &rec)
        };
        let names: Vec<String> = layers.iter().map(|l| format!("layer{l}")).collect();
        let line = |means: &[f64]| {
            let parts: Vec<String> = names
                .iter()
                .zip(means)
                .map(|(n, m)| format!("{n} {m:.4}"))
                .collect();
            format!("loss {}", parts.join("  "))
        };
        let layout = self.layout();
        let flat = feature_model::train(
            ctx,
            model,
            trusted,
            &layout.flatten(&self.params),
            &training,
            &record,
            &line,
        )?;
        self.params = layout.unflatten(&flat);
        Ok(())
    }

    fn layer_scores(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
        batch_size: usize,
    ) -> Result<LayerScores> {
        let (scores, _) = self.losses_and_gradients(ctx, model, samples, batch_size, false)?;
        for (name, s) in scores.names.iter().zip(&scores.scores) {
            if let Some(i) = s.iter().position(|v| !v.is_finite()) {
                bail!("VAE: the {name} score of sample {i} is {}", s[i]);
            }
        }
        Ok(scores)
    }

    fn save(&self, path: &Path) -> Result<()> {
        if self.params.is_empty() {
            bail!("the VAE detector is not fitted");
        }
        let named: Vec<(String, Vec<usize>, &Dense)> = self
            .param_names()
            .into_iter()
            .zip(&self.params)
            .map(|(name, d)| (name, vec![d.fan_in, d.fan_out], d))
            .collect();
        let stored = Stored {
            config: self.config.clone(),
            model: self.model.clone(),
            layers: self.layers.clone(),
            seed: self.seed,
        };
        save_layers(path, &named, METADATA_KEY, serde_json::to_string(&stored)?)
    }
}

const OPTIONS: &[Opt] = &[
    opt(
        "layers",
        &["/layers"],
        Kind::Layers,
        "Activation layers to model, by index or name (0 or layer0 = the first) [none: all].",
    ),
    opt(
        "latent_dim",
        &["/latent_dim"],
        Kind::Int,
        "Latent dimensions of each layer's VAE.",
    ),
    opt(
        "kld_weight",
        &["/kld_weight"],
        Kind::Float,
        "Weight of the KL term (0: a plain autoencoder, no sampling).",
    ),
    opt(
        "score_noise",
        &["/score_noise"],
        Kind::Bool,
        "Sample the latent when scoring too (the upstream does); false scores with z = mu.",
    ),
    opt(
        "train.batch_size",
        &["/batch_size"],
        Kind::Int,
        "Samples per training batch.",
    ),
    opt(
        "train.num_epochs",
        &["/num_epochs"],
        Kind::Int,
        "Training epochs.",
    ),
    Opt {
        aliases: &["train.learning_rate"],
        ..opt(
            "train.optimizer.learning_rate",
            &["/learning_rate"],
            Kind::Float,
            "Adam learning rate.",
        )
    },
    opt(
        "train.max_steps",
        &["/max_steps"],
        Kind::Int,
        "Stop after this many steps.",
    ),
];

/// The registry entry.
pub const ENTRY: DetectorEntry = DetectorEntry {
    name: "vae",
    doc: "Variational autoencoder per layer, trained on trusted activations; scores the reconstruction loss plus the weighted KL.",
    config: ConfigSpec {
        defaults: defaults_of::<VaeConfig>,
        options: OPTIONS,
        nested: &[],
        debug: &[("/batch_size", "2"), ("/num_epochs", "1"), ("/max_steps", "1")],
    },
    build: Vae::build,
    load: Some(Vae::load),
};
