//! TED, topological evolution dynamics (Mo et al. 2024, as adapted by the later
//! upstream's `TEDDetector`): stores up to `max_samples` trusted activations per layer
//! (as unit rows). For a sample and a reference layer r, its `n_neighbors` nearest
//! trusted samples by cosine similarity in r, and the rank of each of them among all
//! trusted samples by similarity to the sample in every other layer: a clean sample's
//! neighbours stay near it from layer to layer, a triggered one's scatter. Each
//! reference layer fits an outlier model on the trusted samples' own rank vectors (each
//! sample left out of its own neighbours and ranks) and a sample's layer score is the
//! mean (or max) over its neighbours of that model's score.
//!
//! On the GPU: unit rows, similarities by matmul against the stored trusted rows
//! (batches capped so one similarity block fits a storage binding), top-k and ranks
//! (`shaders/knn.wgsl`); only the k x (layers − 1) ranks per sample come back. The
//! outlier model is the Mahalanobis distance of the rank vectors (pseudo-inverse of
//! their covariance, f64 on the host). Upstream uses pyod's PCA, whose score sums the
//! distances from the standardised point to each principal axis *as if it were a point*;
//! we do not reproduce that. Fixed from upstream: the fit left each trusted sample in
//! its own ranks (rank 0), so fit and test rank vectors were offset by one.

use std::cell::RefCell;
use std::path::Path;

use anyhow::{bail, Context, Result};
use faer::Mat;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::linalg::pinv_symmetric;
use super::quadratic::select_layers;
use super::{read_activations, Aggregation, Detector, LayerScores, SampleSet};
use crate::gpu::knn::{normalize_rows, ranks, top_k, KnnParams};
use crate::gpu::matmul::{matmul, MatmulArgs, MatmulFlags};
use crate::gpu::{Dispatch, GpuContext, Slice};
use crate::model::batches::run_samples;
use crate::model::GpuMlp;
use crate::registry::{defaults_of, opt, ConfigSpec, DetectorEntry, Kind, Opt};

const METADATA_KEY: &str = "cupbearer_ted";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TedConfig {
    /// Activation layers (0 = first); empty = all. At least two.
    pub layers: Vec<usize>,
    pub n_neighbors: usize,
    /// How a sample's neighbours' scores combine.
    pub neighbor_aggregation: Aggregation,
    /// Trusted samples stored and ranked against (0 = all).
    pub max_samples: usize,
    /// Pseudo-inverse cutoff of the rank covariance, relative to its largest eigenvalue.
    pub rcond: f64,
    /// Samples per GPU batch (capped so a similarity block fits a storage binding).
    pub batch_size: usize,
}

impl Default for TedConfig {
    /// The upstream's 10 neighbours and mean; 5000 trusted samples.
    fn default() -> Self {
        TedConfig {
            layers: Vec::new(),
            n_neighbors: 10,
            neighbor_aggregation: Aggregation::Mean,
            max_samples: 5000,
            rcond: 1e-5,
            batch_size: 256,
        }
    }
}

/// One reference layer's outlier model of rank vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct RankModel {
    pub mean: Vec<f32>,
    /// (layers − 1)² row-major.
    pub precision: Vec<f32>,
}

impl RankModel {
    fn score(&self, v: &[f32]) -> f64 {
        let d = self.mean.len();
        let delta: Vec<f64> = v
            .iter()
            .zip(&self.mean)
            .map(|(&x, &m)| f64::from(x - m))
            .collect();
        (0..d)
            .map(|i| {
                let row = &self.precision[i * d..(i + 1) * d];
                delta[i]
                    * row
                        .iter()
                        .zip(&delta)
                        .map(|(&p, x)| f64::from(p) * x)
                        .sum::<f64>()
            })
            .sum()
    }
}

#[derive(Serialize, Deserialize)]
struct Stored {
    layers: Vec<usize>,
    samples: usize,
}

pub struct Ted {
    pub config: TedConfig,
    pub layers: Vec<usize>,
    /// Per layer, the trusted samples' unit rows (samples x width).
    pub trusted: Vec<Vec<f32>>,
    pub samples: usize,
    /// Per reference layer (in `layers` order).
    pub models: Vec<RankModel>,
}

/// Rank vectors of every sample: `[reference][sample][neighbour][other layer]`, flat
/// per reference layer (sample-major).
type Trajectories = Vec<Vec<f32>>;

impl Ted {
    pub fn new(config: TedConfig) -> Result<Self> {
        if config.n_neighbors == 0 {
            bail!("n_neighbors must be >= 1");
        }
        if !(1..=65535).contains(&config.batch_size) {
            bail!("batch_size must be in 1..=65535, got {}", config.batch_size);
        }
        Ok(Ted {
            config,
            layers: Vec::new(),
            trusted: Vec::new(),
            samples: 0,
            models: Vec::new(),
        })
    }

    pub fn build(config: &serde_json::Value) -> Result<Box<dyn Detector>> {
        let config = serde_json::from_value(config.clone()).context("ted config")?;
        Ok(Box::new(Self::new(config)?))
    }

    pub fn load(config: &serde_json::Value, path: &Path) -> Result<Box<dyn Detector>> {
        let mut det = Self::new(serde_json::from_value(config.clone()).context("ted config")?)?;
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let stored: Stored =
            crate::io::safetensors_metadata(&bytes, path, METADATA_KEY, "a TED detector")?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: corrupt safetensors file", path.display()))?;
        let tensor =
            |name: &str, shape: Option<&[usize]>| crate::io::f32_tensor(&st, path, name, shape);
        let others = stored.layers.len().saturating_sub(1);
        for &l in &stored.layers {
            let rows = tensor(&format!("layer{l}.trusted"), None)?;
            if rows.len() % stored.samples.max(1) != 0 {
                bail!(
                    "{}: layer{l}.trusted is not {} rows",
                    path.display(),
                    stored.samples
                );
            }
            det.trusted.push(rows);
            det.models.push(RankModel {
                mean: tensor(&format!("layer{l}.rank_mean"), Some(&[others]))?,
                precision: tensor(&format!("layer{l}.rank_precision"), Some(&[others, others]))?,
            });
        }
        det.layers = stored.layers;
        det.samples = stored.samples;
        Ok(Box::new(det))
    }

    fn widths(&self) -> Vec<usize> {
        self.trusted
            .iter()
            .map(|t| t.len() / self.samples)
            .collect()
    }

    /// Every sample's rank vectors; with `exclude_self` the samples are the stored
    /// trusted ones, in order, and each is left out of its own neighbours and ranks.
    fn trajectories(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
        batch_size: usize,
        exclude_self: bool,
    ) -> Result<Trajectories> {
        let (n_ref, k, layers) = (self.samples, self.config.n_neighbors, self.layers.len());
        let widths = self.widths();
        let trusted = self
            .trusted
            .iter()
            .map(|t| ctx.buffer_from("ted trusted", t))
            .collect::<Result<Vec<_>>>()?;
        let limit = ctx.limits.max_storage_buffer_binding_size as usize;
        let batch = batch_size.min(limit / (4 * n_ref)).max(1);
        let params = ctx.uniform("knn", &KnnParams::default());
        // Per plan (by rows): the rank buffers [reference][other layer], read back after
        // each batch.
        type PlanRanks = (usize, Vec<Vec<wgpu::Buffer>>);
        let plans: RefCell<Vec<PlanRanks>> = RefCell::new(Vec::new());
        let others = layers - 1;
        let n = samples.indices.len();
        let mut out: Trajectories = vec![vec![0f32; n * k * others]; layers];
        let mut done = 0;
        run_samples(
            ctx,
            model,
            samples,
            batch,
            &|ws| {
                let b = ws.rows;
                let mut ops: Vec<Dispatch> = Vec::new();
                let mut sims = Vec::new();
                for (li, &l) in self.layers.iter().enumerate() {
                    let d = widths[li];
                    let unit = ctx.zeros("ted query", b * d)?;
                    let s = ctx.zeros("ted similarities", b * n_ref)?;
                    ops.push(normalize_rows(
                        ctx,
                        b,
                        d,
                        ws.activation(l),
                        Slice::whole(&unit),
                    )?);
                    let args = MatmulArgs {
                        m: b,
                        n: n_ref,
                        k: d,
                        a: Slice::whole(&unit),
                        b: Slice::whole(&trusted[li]),
                        c: Slice::new(&s, 0, b * n_ref),
                        bias: None,
                        mask: None,
                    };
                    let flags = MatmulFlags {
                        b_nmajor: true,
                        ..Default::default()
                    };
                    ops.push(matmul(ctx, flags, model.schedule, &args)?);
                    sims.push(s);
                }
                let mut rank_bufs = Vec::new();
                for r in 0..layers {
                    let idx = ctx.zeros("ted neighbours", b * k)?;
                    let s_ref = Slice::new(&sims[r], 0, b * n_ref);
                    ops.push(top_k(ctx, b, s_ref, Slice::new(&idx, 0, b * k), &params)?);
                    let mut per_layer = Vec::new();
                    for l in (0..layers).filter(|&l| l != r) {
                        let rk = ctx.zeros("ted ranks", b * k)?;
                        let s_l = Slice::new(&sims[l], 0, b * n_ref);
                        let (idx, rk_s) = (Slice::new(&idx, 0, b * k), Slice::new(&rk, 0, b * k));
                        ops.push(ranks(ctx, b, k, s_l, idx, rk_s, &params)?);
                        per_layer.push(rk);
                    }
                    rank_bufs.push(per_layer);
                }
                plans.borrow_mut().push((b, rank_bufs));
                Ok(ops)
            },
            |offset, rows| {
                let p = KnnParams::new(rows, n_ref, k, exclude_self.then_some(offset));
                ctx.queue.write_buffer(&params, 0, bytemuck::bytes_of(&p));
                Ok(())
            },
            |plan| {
                let b = plan.ws.rows;
                let plans = plans.borrow();
                let (_, bufs) = plans
                    .iter()
                    .find(|(rows, _)| *rows == b)
                    .expect("a plan per size");
                for (r, per_layer) in bufs.iter().enumerate() {
                    for (o, buf) in per_layer.iter().enumerate() {
                        let got: Vec<f32> = ctx.read(Slice::new(buf, 0, b * k))?;
                        for (i, v) in got.into_iter().enumerate() {
                            out[r][(done * k + i) * others + o] = v;
                        }
                    }
                }
                done += b;
                Ok(())
            },
        )?;
        Ok(out)
    }
}

impl Detector for Ted {
    fn kind(&self) -> &'static str {
        "ted"
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
        if layers.len() < 2 {
            bail!("TED compares neighbours across layers: it needs at least two, got {layers:?}");
        }
        let n = match self.config.max_samples {
            0 => trusted.indices.len(),
            m => m.min(trusted.indices.len()),
        };
        let k = self.config.n_neighbors;
        if k + 1 >= n {
            bail!(
                "TED with {k} neighbours needs more than {} trusted samples, got {n}",
                k + 1
            );
        }
        let subset = SampleSet {
            indices: &trusted.indices[..n],
            ..*trusted
        };
        let widths = model.config.activation_dims();
        let limit = ctx.limits.max_storage_buffer_binding_size as usize;
        if let Some(&l) = layers.iter().find(|&&l| n * widths[l] * 4 > limit) {
            bail!(
                "{n} trusted samples of layer {l} ({} wide) exceed a storage binding; use \
                 --detector.max_samples {} or less",
                widths[l],
                limit / (4 * widths[l])
            );
        }
        let acts = read_activations(ctx, model, &subset, self.config.batch_size, &layers)?;
        // The stored rows are the GPU's unit rows, so a reload ranks identically.
        self.trusted = acts
            .iter()
            .zip(&layers)
            .map(|(a, &l)| {
                let d = widths[l];
                let x = ctx.buffer_from("ted activations", a)?;
                let unit = ctx.zeros("ted unit rows", n * d)?;
                let op = normalize_rows(ctx, n, d, Slice::whole(&x), Slice::whole(&unit))?;
                ctx.wait(Some(ctx.submit([&op])))?;
                ctx.read(Slice::new(&unit, 0, n * d))
            })
            .collect::<Result<_>>()?;
        self.layers = layers;
        self.samples = n;
        let traj = self.trajectories(ctx, model, &subset, self.config.batch_size, true)?;
        let others = self.layers.len() - 1;
        self.models = traj
            .iter()
            .map(|v| {
                let rows = v.len() / others;
                let mean: Vec<f64> = (0..others)
                    .map(|j| v.chunks(others).map(|r| f64::from(r[j])).sum::<f64>() / rows as f64)
                    .collect();
                let cov = Mat::from_fn(others, others, |a, b| {
                    v.chunks(others)
                        .map(|r| (f64::from(r[a]) - mean[a]) * (f64::from(r[b]) - mean[b]))
                        .sum::<f64>()
                        / (rows - 1) as f64
                });
                let p = pinv_symmetric(&cov, self.config.rcond)?;
                Ok(RankModel {
                    mean: mean.iter().map(|&m| m as f32).collect(),
                    precision: super::linalg::to_f32_row_major(&p),
                })
            })
            .collect::<Result<_>>()?;
        if progress {
            eprintln!(
                "ted: {n} trusted samples, {k} neighbours, layers {:?}",
                self.layers
            );
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
        if self.models.is_empty() {
            bail!("the detector is not fitted");
        }
        let dims = model.config.activation_dims();
        for (&l, d) in self.layers.iter().zip(self.widths()) {
            if dims.get(l) != Some(&d) {
                bail!(
                    "the detector was fitted on a layer {l} of width {d}, but this model's \
                     layer {l} has width {:?}: detector and model do not match",
                    dims.get(l)
                );
            }
        }
        let batch = batch_size.min(self.config.batch_size);
        let traj = self.trajectories(ctx, model, samples, batch, false)?;
        let (k, others) = (self.config.n_neighbors, self.layers.len() - 1);
        let scores = traj
            .iter()
            .zip(&self.models)
            .map(|(v, m)| {
                v.chunks(k * others)
                    .map(|sample| {
                        let s = sample.chunks(others).map(|r| m.score(r));
                        match self.config.neighbor_aggregation {
                            Aggregation::Mean => s.sum::<f64>() / k as f64,
                            Aggregation::Max => s.fold(f64::NEG_INFINITY, f64::max),
                        }
                    })
                    .collect()
            })
            .collect();
        Ok(LayerScores {
            names: self.layers.iter().map(|l| format!("layer{l}")).collect(),
            scores,
        })
    }

    fn save(&self, path: &Path) -> Result<()> {
        let others = self.layers.len() - 1;
        let mut tensors: Vec<crate::io::F32Tensor<'_>> = Vec::new();
        for ((l, t), m) in self.layers.iter().zip(&self.trusted).zip(&self.models) {
            let d = t.len() / self.samples;
            tensors.push((format!("layer{l}.trusted"), vec![self.samples, d], t));
            tensors.push((format!("layer{l}.rank_mean"), vec![others], &m.mean));
            tensors.push((
                format!("layer{l}.rank_precision"),
                vec![others, others],
                &m.precision,
            ));
        }
        let stored = Stored {
            layers: self.layers.clone(),
            samples: self.samples,
        };
        crate::io::write_f32_safetensors(
            path,
            &tensors,
            METADATA_KEY,
            serde_json::to_string(&stored)?,
        )
    }
}

const OPTIONS: &[Opt] = &[
    opt(
        "layers",
        &["/layers"],
        Kind::Layers,
        "Activation layers, by index or name (at least two) [none: all].",
    ),
    opt(
        "n_neighbors",
        &["/n_neighbors"],
        Kind::Int,
        "Nearest trusted neighbours per sample.",
    ),
    opt(
        "neighbor_aggregation",
        &["/neighbor_aggregation"],
        Kind::Str,
        "How the neighbours' scores combine: mean or max.",
    ),
    opt(
        "train.max_samples",
        &["/max_samples"],
        Kind::Int,
        "Trusted samples stored and ranked against (0 = all).",
    ),
    opt(
        "train.rcond",
        &["/rcond"],
        Kind::Float,
        "Pseudo-inverse cutoff of the rank covariance.",
    ),
    opt(
        "train.batch_size",
        &["/batch_size"],
        Kind::Int,
        "Samples per GPU batch.",
    ),
];

/// The registry entry.
pub const ENTRY: DetectorEntry = DetectorEntry {
    name: "ted",
    doc: "TED: do a sample's nearest trusted neighbours in one layer stay near it in the others (cosine k-NN ranks on the GPU)?",
    config: ConfigSpec {
        defaults: defaults_of::<TedConfig>,
        options: OPTIONS,
        nested: &[],
        debug: &[("/max_samples", "8"), ("/n_neighbors", "2"), ("/batch_size", "2")],
    },
    build: Ted::build,
    load: Some(Ted::load),
};
