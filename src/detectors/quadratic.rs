//! What the Gaussian detectors share (Mahalanobis, spectral signatures, QUE): per layer
//! a mean μ and a d x d matrix P, and the score δᵀPδ of δ = x − μ; the streamed
//! moments they are fitted from; their storage.
//!
//! Moments stream through the GPU ([`StreamingCovariance`]: per batch a column mean, a
//! centred Gram matrix through the matmul kernel, and Chan's merge into running
//! statistics); the host forms Σ = C/(n−1) in f64. Scoring is one GEMM (δ·P) and one
//! row-dot (with δ) per layer on the GPU. Matrices wider than one storage binding (a
//! CNN's 6272-wide first conv layer) go through both in column blocks.
//!
//! `detector.safetensors`: for each fitted layer `l` (index into the activation layers),
//! `layer{l}.mean` f32 [d], `layer{l}.covariance` f32 [d, d] (the fitted covariance),
//! `layer{l}.precision` f32 [d, d] (the matrix P scores use) and `layer{l}.count` i64
//! [1]; metadata `cupbearer.detector` holds the detector's config as JSON.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use web_time::Instant;

use anyhow::{bail, Context, Result};
use faer::Mat;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::linalg::covariance;
use super::{for_each_activation_batch, Detector, FitData, LayerScores, SampleSet, Uses};
use crate::gpu::matmul::{matmul, MatmulArgs, MatmulFlags};
use crate::gpu::stats::{center, column_blocks, row_dot, StatsParams, StreamingCovariance};
use crate::gpu::{GpuContext, Slice};
use crate::model::GpuMlp;
use crate::registry::{opt, Kind, Opt};

const METADATA_KEY: &str = "cupbearer.detector";

/// Fitted statistics of one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerStats {
    pub layer: usize,
    pub count: u64,
    pub mean: Vec<f32>,
    pub covariance: Vec<f32>,
    /// The matrix P of the score δᵀPδ, row-major.
    pub precision: Vec<f32>,
}

/// A layer's streamed moments: sample count, mean and (Bessel-corrected) covariance.
pub struct Moments {
    pub layer: usize,
    pub count: u64,
    pub mean: Vec<f32>,
    pub sigma: Mat<f64>,
}

/// How [`moments`] streams: samples per GPU batch, at most `max_batches` batches (0 =
/// all), columns per covariance block (0 = as many as a binding holds); `what` names
/// the samples ("trusted", "untrusted") in messages.
pub struct MomentOptions {
    pub batch_size: usize,
    pub max_batches: usize,
    pub block_columns: usize,
    pub what: &'static str,
}

/// How [`scores`] runs: columns per precision block (0 = as many as a binding holds),
/// and whether each layer's score is divided by its width.
pub struct ScoreOptions {
    pub block_columns: usize,
    pub normalize: bool,
}

/// The activation layers to fit: `chosen`, or all when empty.
pub fn select_layers(model: &GpuMlp, chosen: &[usize]) -> Result<Vec<usize>> {
    let hidden = model.config.activation_dims().len();
    if chosen.is_empty() {
        return Ok((0..hidden).collect());
    }
    if let Some(&bad) = chosen.iter().find(|&&l| l >= hidden) {
        bail!("layer {bad} does not exist: the model has {hidden} hidden layers");
    }
    Ok(chosen.to_vec())
}

/// Moments of `layers` over the samples of `sets` (in order; at most
/// `opts.max_batches` batches in all), streamed through the GPU and merged with Chan's
/// formula across batches and sets.
pub async fn moments(
    ctx: &GpuContext,
    model: &GpuMlp,
    sets: &[&SampleSet<'_>],
    layers: &[usize],
    opts: &MomentOptions,
    progress: bool,
) -> Result<Vec<Moments>> {
    let batch = opts.batch_size;
    let total: usize = sets.iter().map(|s| s.indices.len()).sum();
    let n = match opts.max_batches {
        0 => total,
        m => total.min(m * batch),
    };
    if n < 2 {
        bail!("fitting needs at least 2 {} samples, got {n}", opts.what);
    }
    let dims = model.config.activation_dims();
    let streams = layers
        .iter()
        .map(|&l| StreamingCovariance::new(ctx, dims[l], batch.min(n), opts.block_columns))
        .collect::<Result<Vec<_>>>()?;
    let start = Instant::now();
    let bar = crate::progress::bar(progress, n as u64, "covariance");
    let mut seen = 0;
    for set in sets {
        let take = set.indices.len().min(n - seen);
        if take == 0 {
            continue;
        }
        let samples = SampleSet {
            indices: &set.indices[..take],
            ..**set
        };
        for_each_activation_batch(
            ctx,
            model,
            &samples,
            batch,
            &|ws| {
                let mut ops = Vec::new();
                for (s, &l) in streams.iter().zip(layers) {
                    let act = ws.activation(l);
                    ops.extend(s.record(ctx, model.schedule, ws.rows, act)?);
                }
                Ok(ops)
            },
            |offset, rows| {
                for s in &streams {
                    s.prepare(ctx, (seen + offset) as u64, rows as u64);
                }
                bar.inc(rows as u64);
                Ok(())
            },
        )?;
        seen += take;
    }
    bar.finish_and_clear();
    crate::progress::note(
        progress,
        &format!(
            "statistics of {n} {} samples in {:.1} s",
            opts.what,
            start.elapsed().as_secs_f64()
        ),
    );
    let mut moments = Vec::new();
    for (stream, &layer) in streams.into_iter().zip(layers) {
        let (mean, gram) = stream.read(ctx).await?;
        drop(stream);
        let what = || format!("the {} statistics of layer {layer}", opts.what);
        crate::io::check_finite(&mean, what)?;
        crate::io::check_finite(&gram, what)?;
        let sigma = covariance(&gram, mean.len(), n as u64)?;
        moments.push(Moments {
            layer,
            count: n as u64,
            mean,
            sigma,
        });
    }
    Ok(moments)
}

/// Per-layer scores δᵀPδ / (d if `normalize`) of every sample, `batch_size` at a time.
pub async fn scores(
    ctx: &GpuContext,
    model: &GpuMlp,
    samples: &SampleSet<'_>,
    batch_size: usize,
    stats: &[LayerStats],
    opts: &ScoreOptions,
) -> Result<LayerScores> {
    if stats.is_empty() {
        bail!("the detector is not fitted");
    }
    let hidden = &model.config.activation_dims();
    for s in stats {
        match hidden.get(s.layer) {
            Some(&d) if d == s.mean.len() => {}
            other => bail!(
                "the detector was fitted on a layer {} of width {}, but this model's layer \
                 {} has width {:?}: detector and model do not match",
                s.layer,
                s.mean.len(),
                s.layer,
                other
            ),
        }
    }
    let n = samples.indices.len();
    let batch = batch_size.min(n.max(1));
    let limit = ctx.limits.max_storage_buffer_binding_size as usize;
    // δ·P a block of P's columns at a time, each block followed by its row dots.
    struct Block {
        columns: Range<usize>,
        /// P[:, columns], row-major d x w.
        precision: wgpu::Buffer,
        params: wgpu::Buffer,
    }
    struct Bufs {
        d: usize,
        mean: wgpu::Buffer,
        blocks: Vec<Block>,
        delta: wgpu::Buffer,
        t: wgpu::Buffer,
        scores: wgpu::Buffer,
    }
    let bufs = stats
        .iter()
        .map(|s| {
            let d = s.mean.len();
            let columns = column_blocks(d, limit, opts.block_columns);
            let blocks = columns
                .into_iter()
                .map(|columns| {
                    let p: Vec<f32> = s
                        .precision
                        .chunks_exact(d)
                        .flat_map(|row| &row[columns.clone()])
                        .copied()
                        .collect();
                    Ok(Block {
                        precision: ctx.buffer_from("precision", &p)?,
                        params: ctx.uniform("row_dot", &StatsParams::default()),
                        columns,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Bufs {
                d,
                mean: ctx.buffer_from("mean", &s.mean)?,
                delta: ctx.zeros("delta", batch * d)?,
                t: ctx.zeros("delta_p", batch * blocks[0].columns.len())?,
                scores: ctx.zeros("scores", n)?,
                blocks,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let normalize = opts.normalize;
    for_each_activation_batch(
        ctx,
        model,
        samples,
        batch,
        &|ws| {
            let rows = ws.rows;
            let mut ops = Vec::new();
            for (b, s) in bufs.iter().zip(stats) {
                let d = b.d;
                let delta = Slice::new(&b.delta, 0, rows * d);
                let act = ws.activation(s.layer);
                let mean = Slice::whole(&b.mean);
                ops.push(center(ctx, rows, d, 0..d, act, mean, delta)?);
                for block in &b.blocks {
                    let t = Slice::new(&b.t, 0, rows * block.columns.len());
                    let args = MatmulArgs {
                        m: rows,
                        n: block.columns.len(),
                        k: d,
                        a: delta,
                        b: Slice::whole(&block.precision),
                        c: t,
                        bias: None,
                        mask: None,
                    };
                    ops.push(matmul(ctx, MatmulFlags::default(), model.schedule, &args)?);
                    let scores = Slice::whole(&b.scores);
                    ops.push(row_dot(ctx, rows, t, delta, scores, &block.params)?);
                }
            }
            Ok(ops)
        },
        |offset, rows| {
            for b in &bufs {
                let scale = if normalize { 1.0 / b.d as f32 } else { 1.0 };
                for block in &b.blocks {
                    let p = StatsParams::row_dot(rows, &block.columns, b.d, scale, offset);
                    ctx.queue
                        .write_buffer(&block.params, 0, bytemuck::bytes_of(&p));
                }
            }
            Ok(())
        },
    )?;
    let names = stats.iter().map(|s| format!("layer{}", s.layer)).collect();
    LayerScores::read(ctx, names, bufs.iter().map(|b| &b.scores), n).await
}

/// Writes `stats` as safetensors, with `config` as the metadata.
pub fn save(path: &Path, stats: &[LayerStats], config: &serde_json::Value) -> Result<()> {
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for s in stats {
        let d = s.mean.len();
        let p = |n: &str| format!("layer{}.{n}", s.layer);
        let bytes = |v: &[f32]| bytemuck::cast_slice(v).to_vec();
        tensors.push((p("mean"), Dtype::F32, vec![d], bytes(&s.mean)));
        tensors.push((
            p("covariance"),
            Dtype::F32,
            vec![d, d],
            bytes(&s.covariance),
        ));
        tensors.push((p("precision"), Dtype::F32, vec![d, d], bytes(&s.precision)));
        let count = (s.count as i64).to_le_bytes().to_vec();
        tensors.push((p("count"), Dtype::I64, vec![1], count));
    }
    let views = tensors
        .iter()
        .map(|(name, dt, shape, data)| {
            Ok((name.as_str(), TensorView::new(*dt, shape.clone(), data)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([(METADATA_KEY.to_string(), config.to_string())]);
    crate::io::write_atomic(path, &safetensors::serialize(views, Some(metadata))?)
}

/// The statistics stored by [`save`].
pub fn load(path: &Path) -> Result<Vec<LayerStats>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: corrupt safetensors file", path.display()))?;
    let mut layers: Vec<usize> = st
        .names()
        .iter()
        .filter_map(|n| n.strip_prefix("layer")?.strip_suffix(".mean")?.parse().ok())
        .collect();
    layers.sort_unstable();
    if layers.is_empty() {
        bail!("{}: no fitted layers", path.display());
    }
    let f32s = |name: &str, shape: &[usize]| crate::io::f32_tensor(&st, path, name, Some(shape));
    let mut stats = Vec::new();
    for layer in layers {
        let p = |s: &str| format!("layer{layer}.{s}");
        let d: usize = st.tensor(&p("mean"))?.shape().iter().product();
        let count = st
            .tensor(&p("count"))
            .ok()
            .filter(|t| t.dtype() == Dtype::I64 && t.data().len() == 8)
            .map(|t| i64::from_le_bytes(t.data().try_into().unwrap_or([0; 8])))
            .with_context(|| format!("{}: missing {}", path.display(), p("count")))?;
        stats.push(LayerStats {
            layer,
            count: count as u64,
            mean: f32s(&p("mean"), &[d])?,
            covariance: f32s(&p("covariance"), &[d, d])?,
            precision: f32s(&p("precision"), &[d, d])?,
        });
    }
    Ok(stats)
}

/// Options every quadratic detector's config has (fields `layers`, `normalize`,
/// `batch_size`, `max_batches`).
pub const COMMON_OPTIONS: [Opt; 4] = [
    opt(
        "layers",
        &["/layers"],
        Kind::Layers,
        "Activation layers to use, by index or name (0 or layer0 = the first) [none: all].",
    ),
    opt(
        "normalize",
        &["/normalize"],
        Kind::Bool,
        "Divide each layer's score by its width.",
    ),
    opt(
        "train.batch_size",
        &["/batch_size"],
        Kind::Int,
        "Samples per batch while fitting.",
    ),
    opt(
        "train.max_batches",
        &["/max_batches"],
        Kind::Int,
        "Fit on at most this many batches (0 = all).",
    ),
];

/// `--debug` sizes of a quadratic detector.
pub const DEBUG: &[(&str, &str)] = &[("/batch_size", "2"), ("/max_batches", "1")];

/// The config of a detector that scores δᵀPδ per layer: what it fits on and how it
/// forms (μ, P) per layer. [`Quadratic`] is the detector.
pub trait QuadraticFit: serde::Serialize + serde::de::DeserializeOwned + 'static {
    /// The registry name.
    const KIND: &'static str;
    fn uses() -> Uses;
    /// Checks the settings beyond the batching (when a detector is built or loaded).
    fn validate(&self) -> Result<()> {
        Ok(())
    }
    /// The layers' fitted statistics (μ, the covariance stored with it, P). A future
    /// (not Send: WebGPU handles are not) so that the browser can await readbacks.
    #[allow(async_fn_in_trait)]
    async fn fit(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        data: &FitData<'_>,
        progress: bool,
    ) -> Result<Vec<LayerStats>>;
    /// (samples per batch, at most this many fitting batches (0 = all), columns per
    /// matrix block (0 = as many as a binding holds)).
    fn batching(&self) -> (usize, usize, usize);
    /// Whether each layer's score is divided by its width.
    fn normalize(&self) -> bool;

    /// How [`moments`] streams `what` samples for this config.
    fn moment_options(&self, what: &'static str) -> MomentOptions {
        let (batch_size, max_batches, block_columns) = self.batching();
        MomentOptions {
            batch_size,
            max_batches,
            block_columns,
            what,
        }
    }

    fn score_options(&self) -> ScoreOptions {
        ScoreOptions {
            block_columns: self.batching().2,
            normalize: self.normalize(),
        }
    }
}

/// A detector scoring δᵀPδ per layer (Mahalanobis, spectral signatures, QUE): its
/// config and, once fitted, its per-layer statistics.
pub struct Quadratic<C> {
    pub config: C,
    pub stats: Vec<LayerStats>,
}

impl<C: QuadraticFit> Quadratic<C> {
    pub fn new(config: C) -> Result<Self> {
        let batch = config.batching().0;
        if !(2..=65535).contains(&batch) {
            bail!("batch_size must be in 2..=65535, got {batch}");
        }
        config.validate()?;
        Ok(Quadratic {
            config,
            stats: Vec::new(),
        })
    }

    pub fn build(config: &serde_json::Value) -> Result<Box<dyn Detector>> {
        let config = serde_json::from_value(config.clone())
            .with_context(|| format!("{} config", C::KIND))?;
        Ok(Box::new(Self::new(config)?))
    }

    /// [`Detector::fit_data`] as a future (the browser's form).
    pub async fn fit_async(
        &mut self,
        ctx: &GpuContext,
        model: &GpuMlp,
        data: &FitData<'_>,
        progress: bool,
    ) -> Result<()> {
        let uses = C::uses();
        if uses.trusted && data.trusted.is_none() {
            bail!("the {} detector needs trusted samples", C::KIND);
        }
        if uses.untrusted && data.untrusted.is_empty() {
            bail!("the {} detector needs untrusted samples", C::KIND);
        }
        self.stats = self.config.fit(ctx, model, data, progress).await?;
        Ok(())
    }

    /// [`Detector::layer_scores`] as a future.
    pub async fn layer_scores_async(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
        batch_size: usize,
    ) -> Result<LayerScores> {
        let opts = self.config.score_options();
        scores(ctx, model, samples, batch_size, &self.stats, &opts).await
    }

    pub fn load(config: &serde_json::Value, path: &Path) -> Result<Box<dyn Detector>> {
        let mut det = Self::new(
            serde_json::from_value(config.clone())
                .with_context(|| format!("{} config", C::KIND))?,
        )?;
        det.stats = load(path)?;
        Ok(Box::new(det))
    }
}

impl<C: QuadraticFit> Detector for Quadratic<C> {
    fn kind(&self) -> &'static str {
        C::KIND
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("plain struct serialises")
    }

    fn uses(&self) -> Uses {
        C::uses()
    }

    fn fit(
        &mut self,
        ctx: &GpuContext,
        model: &GpuMlp,
        trusted: &SampleSet<'_>,
        progress: bool,
    ) -> Result<()> {
        let data = FitData {
            trusted: Some(trusted),
            untrusted: &[],
            untrusted_anomalous: &[],
        };
        self.fit_data(ctx, model, &data, progress)
    }

    fn fit_data(
        &mut self,
        ctx: &GpuContext,
        model: &GpuMlp,
        data: &FitData<'_>,
        progress: bool,
    ) -> Result<()> {
        crate::gpu::block_on(self.fit_async(ctx, model, data, progress))
    }

    fn layer_scores(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
        batch_size: usize,
    ) -> Result<LayerScores> {
        crate::gpu::block_on(self.layer_scores_async(ctx, model, samples, batch_size))
    }

    fn save(&self, path: &Path) -> Result<()> {
        save(path, &self.stats, &self.config())
    }
}
