//! Mahalanobis detector: per layer, a Gaussian (mean, covariance) of the trusted
//! activations; the score of a sample is its squared Mahalanobis distance, divided by
//! the layer's width unless `normalize` is false (cupbearer 0.0.1 did not divide, so
//! wide layers dominated the mean over layers).
//!
//! Fitting streams batches on the GPU ([`StreamingCovariance`]: per batch a column mean,
//! a centred Gram matrix through the matmul kernel, and Chan's merge into running
//! statistics). The host then forms Σ = C/(n−1) in f64, regularises it and
//! pseudo-inverts it by eigendecomposition. Scoring is one GEMM (δ·P) and one row-dot
//! (with δ) per layer on the GPU. Matrices wider than one storage binding (a CNN's
//! 6272-wide first conv layer) go through both in column blocks.
//!
//! `detector.safetensors`: for each fitted layer `l` (index into the hidden layers),
//! `layer{l}.mean` f32 [d], `layer{l}.covariance` f32 [d, d] (Bessel-corrected,
//! before regularisation), `layer{l}.precision` f32 [d, d] (the matrix scores use) and
//! `layer{l}.count` i64 [1]; metadata `cupbearer.detector` holds the config as JSON.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use faer::Mat;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use super::linalg::{covariance, pinv_symmetric, regularize, to_f32_row_major, Regularization};
use super::{for_each_activation_batch, Detector, LayerScores, SampleSet};
use crate::gpu::matmul::{matmul, MatmulArgs, MatmulFlags};
use crate::gpu::stats::{center, column_blocks, row_dot, StatsParams, StreamingCovariance};
use crate::gpu::{GpuContext, Slice};
use crate::model::GpuMlp;
use crate::registry::{defaults_of, opt, ConfigSpec, DetectorEntry, Kind, Opt};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MahalanobisConfig {
    /// Hidden layers to use (0 = first); empty = all.
    pub layers: Vec<usize>,
    /// Eigenvalues at or below rcond · λ_max are dropped by the pseudo-inverse.
    pub rcond: f64,
    /// The original's "simplified relative Mahalanobis": subtract Σ_i δ_i² / Σ_ii.
    pub relative: bool,
    pub shrinkage: f64,
    pub ridge: f64,
    /// Divide each layer's distance by its width.
    pub normalize: bool,
    /// Samples per GPU batch while fitting and scoring.
    pub batch_size: usize,
    /// Fit on at most this many batches (0 = all).
    pub max_batches: usize,
    /// Columns per GPU block of a covariance or precision matrix (0 = as many as one
    /// storage binding holds; a CNN's first conv layer needs two blocks).
    pub block_columns: usize,
}

impl Default for MahalanobisConfig {
    fn default() -> Self {
        MahalanobisConfig {
            layers: Vec::new(),
            rcond: 1e-5,
            relative: false,
            shrinkage: 0.0,
            ridge: 0.0,
            normalize: true,
            batch_size: 2048,
            max_batches: 0,
            block_columns: 0,
        }
    }
}

/// Fitted statistics of one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerStats {
    pub layer: usize,
    pub count: u64,
    pub mean: Vec<f32>,
    pub covariance: Vec<f32>,
    pub precision: Vec<f32>,
}

pub struct Mahalanobis {
    pub config: MahalanobisConfig,
    pub stats: Vec<LayerStats>,
}

const METADATA_KEY: &str = "cupbearer.detector";

impl Mahalanobis {
    pub fn new(config: MahalanobisConfig) -> Result<Self> {
        if !(config.rcond >= 0.0 && config.rcond < 1.0) {
            bail!("rcond must be in [0, 1), got {}", config.rcond);
        }
        if config.batch_size < 2 || config.batch_size > 65535 {
            bail!("batch_size must be in 2..=65535, got {}", config.batch_size);
        }
        Regularization {
            shrinkage: config.shrinkage,
            ridge: config.ridge,
        }
        .validate()?;
        Ok(Mahalanobis {
            config,
            stats: Vec::new(),
        })
    }

    pub fn build(config: &serde_json::Value) -> Result<Box<dyn Detector>> {
        let config = serde_json::from_value(config.clone()).context("mahalanobis config")?;
        Ok(Box::new(Mahalanobis::new(config)?))
    }

    pub fn load(config: &serde_json::Value, path: &Path) -> Result<Box<dyn Detector>> {
        let mut det = Mahalanobis::new(serde_json::from_value(config.clone())?)?;
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
        let f32s =
            |name: &str, shape: &[usize]| crate::io::f32_tensor(&st, path, name, Some(shape));
        for layer in layers {
            let p = |s: &str| format!("layer{layer}.{s}");
            let d: usize = st.tensor(&p("mean"))?.shape().iter().product();
            let count = st
                .tensor(&p("count"))
                .ok()
                .filter(|t| t.dtype() == Dtype::I64 && t.data().len() == 8)
                .map(|t| i64::from_le_bytes(t.data().try_into().unwrap_or([0; 8])))
                .with_context(|| format!("{}: missing {}", path.display(), p("count")))?;
            det.stats.push(LayerStats {
                layer,
                count: count as u64,
                mean: f32s(&p("mean"), &[d])?,
                covariance: f32s(&p("covariance"), &[d, d])?,
                precision: f32s(&p("precision"), &[d, d])?,
            });
        }
        Ok(Box::new(det))
    }

    fn layers(&self, model: &GpuMlp) -> Result<Vec<usize>> {
        let hidden = model.config.activation_dims().len();
        if self.config.layers.is_empty() {
            return Ok((0..hidden).collect());
        }
        if let Some(&bad) = self.config.layers.iter().find(|&&l| l >= hidden) {
            bail!("layer {bad} does not exist: the model has {hidden} hidden layers");
        }
        Ok(self.config.layers.clone())
    }

    /// The matrix scores use: pinv(Σ), minus diag(1/Σ_ii) for the relative variant.
    fn precision(&self, sigma_raw: Mat<f64>) -> Result<Mat<f64>> {
        let diag: Vec<f64> = (0..sigma_raw.nrows()).map(|i| sigma_raw[(i, i)]).collect();
        let sigma = regularize(
            sigma_raw,
            Regularization {
                shrinkage: self.config.shrinkage,
                ridge: self.config.ridge,
            },
        )?;
        let mut p = pinv_symmetric(&sigma, self.config.rcond)?;
        if self.config.relative {
            for (i, v) in diag.iter().enumerate() {
                if *v > self.config.rcond {
                    p[(i, i)] -= 1.0 / v;
                }
            }
        }
        Ok(p)
    }
}

impl Detector for Mahalanobis {
    fn kind(&self) -> &'static str {
        "mahalanobis"
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
        let layers = self.layers(model)?;
        let batch = self.config.batch_size;
        let mut n = trusted.indices.len();
        if self.config.max_batches > 0 {
            n = n.min(self.config.max_batches * batch);
        }
        if n < 2 {
            bail!("fitting needs at least 2 trusted samples, got {n}");
        }
        let samples = SampleSet {
            indices: &trusted.indices[..n],
            ..*trusted
        };
        let dims = model.config.activation_dims();
        let streams = layers
            .iter()
            .map(|&l| {
                StreamingCovariance::new(ctx, dims[l], batch.min(n), self.config.block_columns)
            })
            .collect::<Result<Vec<_>>>()?;
        let start = Instant::now();
        let bar = crate::progress::bar(progress, n as u64, "covariance");
        for_each_activation_batch(
            ctx,
            model,
            &samples,
            batch,
            &|ws| {
                let mut ops = Vec::new();
                for (s, &l) in streams.iter().zip(&layers) {
                    let act = ws.activation(l);
                    ops.extend(s.record(ctx, model.schedule, ws.rows, act)?);
                }
                Ok(ops)
            },
            |offset, rows| {
                for s in &streams {
                    s.prepare(ctx, offset as u64, rows as u64);
                }
                bar.inc(rows as u64);
                Ok(())
            },
        )?;
        bar.finish_and_clear();
        let note = |msg: String| crate::progress::note(progress, &msg);
        note(format!(
            "statistics of {n} samples in {:.1} s",
            start.elapsed().as_secs_f64()
        ));
        self.stats.clear();
        for (stream, layer) in streams.into_iter().zip(layers) {
            let (mean, gram) = stream.read(ctx)?;
            drop(stream);
            let what = || format!("the trusted statistics of layer {layer}");
            crate::io::check_finite(&mean, what)?;
            crate::io::check_finite(&gram, what)?;
            let d = mean.len();
            let sigma = covariance(&gram, d, n as u64)?;
            drop(gram);
            let covariance = to_f32_row_major(&sigma);
            let start = Instant::now();
            let precision = to_f32_row_major(&self.precision(sigma)?);
            note(format!(
                "layer {layer}: {d}x{d} covariance inverted in {:.1} s",
                start.elapsed().as_secs_f64()
            ));
            self.stats.push(LayerStats {
                layer,
                count: n as u64,
                mean,
                covariance,
                precision,
            });
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
        if self.stats.is_empty() {
            bail!("the Mahalanobis detector is not fitted");
        }
        let hidden = &model.config.activation_dims();
        for s in &self.stats {
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
        let bufs = self
            .stats
            .iter()
            .map(|s| {
                let d = s.mean.len();
                let columns = column_blocks(d, limit, self.config.block_columns);
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
        let normalize = self.config.normalize;
        for_each_activation_batch(
            ctx,
            model,
            samples,
            batch,
            &|ws| {
                let rows = ws.rows;
                let mut ops = Vec::new();
                for (b, s) in bufs.iter().zip(&self.stats) {
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
        let scores = bufs
            .iter()
            .map(|b| {
                let s: Vec<f32> = ctx.read(Slice::new(&b.scores, 0, n))?;
                Ok(s.into_iter().map(f64::from).collect())
            })
            .collect::<Result<_>>()?;
        Ok(LayerScores {
            names: self
                .stats
                .iter()
                .map(|s| format!("layer{}", s.layer))
                .collect(),
            scores,
        })
    }

    fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for s in &self.stats {
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
        let metadata = HashMap::from([(METADATA_KEY.to_string(), self.config().to_string())]);
        crate::io::write_atomic(path, &safetensors::serialize(views, Some(metadata))?)
    }
}

const OPTIONS: &[Opt] = &[
    opt("layers", &["/layers"], Kind::Ints, "Hidden layers to use (0 = first) [none: all]."),
    opt("train.rcond", &["/rcond"], Kind::Float, "Pseudo-inverse cutoff relative to the largest eigenvalue."),
    opt("train.relative", &["/relative"], Kind::Bool, "The original's simplified relative Mahalanobis distance."),
    opt("train.shrinkage", &["/shrinkage"], Kind::Float, "Shrink the covariance towards tr(S)/d I by this fraction."),
    opt("train.ridge", &["/ridge"], Kind::Float, "Add eps I to the covariance (weights zero-variance directions such as a trigger pixel)."),
    opt("train.batch_size", &["/batch_size"], Kind::Int, "Samples per batch while fitting (the original: 4096; 2048 keeps peak memory under 300 MB on MNIST at the same speed)."),
    opt("train.max_batches", &["/max_batches"], Kind::Int, "Fit on at most this many batches (0 = all)."),
    opt("normalize", &["/normalize"], Kind::Bool, "Divide each layer's distance by its width (false: cupbearer 0.0.1)."),
];

/// The registry entry.
pub const ENTRY: DetectorEntry = DetectorEntry {
    name: "mahalanobis",
    doc: "Mahalanobis distance of each layer's activations to their trusted mean and covariance.",
    config: ConfigSpec {
        defaults: defaults_of::<MahalanobisConfig>,
        options: OPTIONS,
        nested: &[],
        debug: &[("/batch_size", "2"), ("/max_batches", "1")],
    },
    build: Mahalanobis::build,
    load: Some(Mahalanobis::load),
};
