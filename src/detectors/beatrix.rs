//! Beatrix (Ma et al., "The Beatrix Resurrections", the later upstream's
//! `BeatrixDetector`): per layer and power p, each sample's Gram features (the signed
//! p-th root of the p-th order Gram matrix over positions, upper triangle with the
//! diagonal; `shaders/beatrix.wgsl`), and the trusted median and median absolute
//! deviation (MAD) of every feature. A sample's layer score is the mean over powers of
//! the mean over features of its relative deviation outside
//! `median ± mad_scale·MAD`.
//!
//! The medians are exact, over up to `max_samples` trusted samples (the paper fits on a
//! small clean set); upstream approximates them by an exponential moving average of
//! per-batch medians, which depends on the batch size and order. A dense layer is one
//! position, so its Gram features are `|x_a x_b|` (even p) or `x_a x_b` (odd p): on
//! post-ReLU activations every power gives the same features.

use std::cell::RefCell;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::quadratic::select_layers;
use super::{for_each_activation_batch, Detector, LayerScores, SampleSet};
use crate::gpu::beatrix::{
    gram_deviation, gram_features, upper_pairs, GramInputs, GramParams, GramShape,
};
use crate::gpu::{GpuContext, Slice};
use crate::model::batches::run_samples;
use crate::model::GpuMlp;
use crate::registry::{defaults_of, opt, ConfigSpec, DetectorEntry, Kind, Opt};

const METADATA_KEY: &str = "cupbearer_beatrix";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BeatrixConfig {
    /// Activation layers to use (0 = first); empty = all.
    pub layers: Vec<usize>,
    /// Gram matrix orders.
    pub powers: Vec<usize>,
    /// Bounds are the median ± this many MADs.
    pub mad_scale: f64,
    /// Trusted samples the medians are taken over (0 = all).
    pub max_samples: usize,
    /// Samples per GPU batch while fitting and scoring (capped to a storage binding).
    pub batch_size: usize,
}

impl Default for BeatrixConfig {
    /// The upstream's: powers 1-4, 10 MADs.
    fn default() -> Self {
        BeatrixConfig {
            layers: Vec::new(),
            powers: vec![1, 2, 3, 4],
            mad_scale: 10.0,
            max_samples: 1024,
            batch_size: 256,
        }
    }
}

/// The trusted statistics of one layer and power.
#[derive(Clone, Debug, PartialEq)]
pub struct PowerStats {
    pub power: usize,
    pub median: Vec<f32>,
    pub mad: Vec<f32>,
}

/// The trusted statistics of one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerStats {
    pub layer: usize,
    pub positions: usize,
    pub channels: usize,
    pub powers: Vec<PowerStats>,
}

/// What `detector.safetensors`'s metadata records of a layer.
#[derive(Serialize, Deserialize)]
struct StoredLayer {
    layer: usize,
    positions: usize,
    channels: usize,
    powers: Vec<usize>,
}

pub struct Beatrix {
    pub config: BeatrixConfig,
    pub stats: Vec<LayerStats>,
}

/// The lower median (torch's `median`), in place.
fn median(values: &mut [f32]) -> f32 {
    let mid = (values.len() - 1) / 2;
    *values.select_nth_unstable_by(mid, f32::total_cmp).1
}

/// (positions, channels) of each activation layer.
fn layer_shapes(model: &GpuMlp) -> Vec<(usize, usize)> {
    model
        .config
        .activation_layers()
        .iter()
        .map(|a| match a.shape[..] {
            [h, w, c] => (h * w, c),
            [d] => (1, d),
            _ => unreachable!("activations are [h, w, c] or [d]"),
        })
        .collect()
}

impl Beatrix {
    pub fn new(config: BeatrixConfig) -> Result<Self> {
        if config.powers.is_empty() || config.powers.iter().any(|&p| !(1..=8).contains(&p)) {
            bail!(
                "powers must be 1..=8 (at least one), got {:?}",
                config.powers
            );
        }
        if !(config.mad_scale >= 0.0 && config.mad_scale.is_finite()) {
            bail!("mad_scale must be >= 0, got {}", config.mad_scale);
        }
        if !(1..=65535).contains(&config.batch_size) {
            bail!("batch_size must be in 1..=65535, got {}", config.batch_size);
        }
        Ok(Beatrix {
            config,
            stats: Vec::new(),
        })
    }

    pub fn build(config: &serde_json::Value) -> Result<Box<dyn Detector>> {
        let config = serde_json::from_value(config.clone()).context("beatrix config")?;
        Ok(Box::new(Self::new(config)?))
    }

    pub fn load(config: &serde_json::Value, path: &Path) -> Result<Box<dyn Detector>> {
        let mut det = Self::new(serde_json::from_value(config.clone()).context("beatrix config")?)?;
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let stored: Vec<StoredLayer> =
            crate::io::safetensors_metadata(&bytes, path, METADATA_KEY, "a beatrix detector")?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: corrupt safetensors file", path.display()))?;
        det.stats = stored
            .into_iter()
            .map(|s| {
                let f = GramShape {
                    rows: 1,
                    positions: s.positions,
                    channels: s.channels,
                }
                .features();
                let powers = s
                    .powers
                    .iter()
                    .map(|&power| {
                        let t = |n: &str| {
                            let name = format!("layer{}.power{power}.{n}", s.layer);
                            crate::io::f32_tensor(&st, path, &name, Some(&[f]))
                        };
                        Ok(PowerStats {
                            power,
                            median: t("median")?,
                            mad: t("mad")?,
                        })
                    })
                    .collect::<Result<_>>()?;
                Ok(LayerStats {
                    layer: s.layer,
                    positions: s.positions,
                    channels: s.channels,
                    powers,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Box::new(det))
    }

    /// Rows per batch whose Gram features (`features` per row) fit one storage binding.
    fn rows_per_batch(&self, ctx: &GpuContext, features: usize) -> Result<usize> {
        let limit = ctx.limits.max_storage_buffer_binding_size as usize;
        let rows = limit / (4 * features);
        if rows == 0 {
            bail!("one sample's {features} Gram features exceed a storage binding");
        }
        Ok(self.config.batch_size.min(rows))
    }

    /// Every sample's Gram features of one layer and power, read back (n x features).
    fn features(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
        layer: (usize, usize, usize),
        power: usize,
    ) -> Result<Vec<f32>> {
        let (l, positions, channels) = layer;
        let shape = |rows| GramShape {
            rows,
            positions,
            channels,
        };
        let f = shape(1).features();
        let pairs = ctx.buffer_from("gram pairs", &upper_pairs(channels)?)?;
        // One output buffer per batch size (the full batches and the last).
        let outputs: RefCell<Vec<(usize, wgpu::Buffer, wgpu::Buffer)>> = RefCell::new(Vec::new());
        let batch = self.rows_per_batch(ctx, f)?;
        let mut all = Vec::with_capacity(samples.indices.len() * f);
        run_samples(
            ctx,
            model,
            samples,
            batch,
            &|ws| {
                let s = shape(ws.rows);
                let out = ctx.zeros("gram features", ws.rows * f)?;
                let params = ctx.uniform("gram", &GramParams::new(s, power as u32, 1.0, 0));
                let input = GramInputs {
                    x: ws.activation(l),
                    pairs: Slice::whole(&pairs),
                    params: &params,
                };
                let op = gram_features(ctx, s, &input, Slice::whole(&out))?;
                outputs.borrow_mut().push((ws.rows, out, params));
                Ok(vec![op])
            },
            |_, _| Ok(()),
            |plan| {
                let outs = outputs.borrow();
                let (_, out, _) = outs
                    .iter()
                    .find(|(rows, ..)| *rows == plan.ws.rows)
                    .expect("a buffer per plan");
                all.extend(ctx.read::<f32>(Slice::new(out, 0, plan.ws.rows * f))?);
                Ok(())
            },
        )?;
        Ok(all)
    }
}

impl Detector for Beatrix {
    fn kind(&self) -> &'static str {
        "beatrix"
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
        let shapes = layer_shapes(model);
        let n = match self.config.max_samples {
            0 => trusted.indices.len(),
            m => m.min(trusted.indices.len()),
        };
        if n < 2 {
            bail!("beatrix needs at least 2 trusted samples, got {n}");
        }
        let subset = SampleSet {
            indices: &trusted.indices[..n],
            ..*trusted
        };
        self.stats.clear();
        for l in layers {
            let (positions, channels) = shapes[l];
            let mut powers = Vec::new();
            for &power in &self.config.powers {
                let g = self.features(ctx, model, &subset, (l, positions, channels), power)?;
                let f = g.len() / n;
                let mut column = vec![0f32; n];
                let (mut med, mut mad) = (Vec::with_capacity(f), Vec::with_capacity(f));
                for j in 0..f {
                    for (c, row) in column.iter_mut().zip(g.chunks_exact(f)) {
                        *c = row[j];
                    }
                    let m = median(&mut column);
                    for c in column.iter_mut() {
                        *c = (*c - m).abs();
                    }
                    med.push(m);
                    mad.push(median(&mut column));
                }
                crate::io::check_finite(&med, || {
                    format!("beatrix layer{l} power {power} medians")
                })?;
                powers.push(PowerStats {
                    power,
                    median: med,
                    mad,
                });
            }
            if progress {
                eprintln!(
                    "beatrix layer{l}: {} Gram features x {} powers over {n} trusted samples",
                    channels * (channels + 1) / 2,
                    powers.len()
                );
            }
            self.stats.push(LayerStats {
                layer: l,
                positions,
                channels,
                powers,
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
            bail!("the detector is not fitted");
        }
        let shapes = layer_shapes(model);
        for s in &self.stats {
            if shapes.get(s.layer) != Some(&(s.positions, s.channels)) {
                bail!(
                    "the detector was fitted on a layer {} of {} positions x {} channels, but \
                     this model's is {:?}: detector and model do not match",
                    s.layer,
                    s.positions,
                    s.channels,
                    shapes.get(s.layer)
                );
            }
        }
        let n = samples.indices.len();
        // Bounds per layer and power, and the uniforms rewritten per batch.
        struct Bufs {
            pairs: wgpu::Buffer,
            bounds: Vec<(wgpu::Buffer, wgpu::Buffer, wgpu::Buffer)>,
            scores: wgpu::Buffer,
        }
        let k = self.config.mad_scale as f32;
        let bufs = self
            .stats
            .iter()
            .map(|s| {
                let bounds = s
                    .powers
                    .iter()
                    .map(|p| {
                        let bound = |sign: f32| -> Vec<f32> {
                            p.median
                                .iter()
                                .zip(&p.mad)
                                .map(|(m, d)| m + sign * k * d)
                                .collect()
                        };
                        Ok((
                            ctx.buffer_from("gram lo", &bound(-1.0))?,
                            ctx.buffer_from("gram hi", &bound(1.0))?,
                            ctx.uniform("gram", &GramParams::default()),
                        ))
                    })
                    .collect::<Result<_>>()?;
                Ok(Bufs {
                    pairs: ctx.buffer_from("gram pairs", &upper_pairs(s.channels)?)?,
                    bounds,
                    scores: ctx.zeros("beatrix scores", n)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let shape = |s: &LayerStats, rows| GramShape {
            rows,
            positions: s.positions,
            channels: s.channels,
        };
        for_each_activation_batch(
            ctx,
            model,
            samples,
            batch_size.min(self.config.batch_size).min(n.max(1)),
            &|ws| {
                let mut ops = Vec::new();
                for (s, b) in self.stats.iter().zip(&bufs) {
                    for (lo, hi, params) in &b.bounds {
                        let input = GramInputs {
                            x: ws.activation(s.layer),
                            pairs: Slice::whole(&b.pairs),
                            params,
                        };
                        let bounds = (Slice::whole(lo), Slice::whole(hi));
                        let out = Slice::whole(&b.scores);
                        ops.push(gram_deviation(ctx, shape(s, ws.rows), &input, bounds, out)?);
                    }
                }
                Ok(ops)
            },
            |offset, rows| {
                for (s, b) in self.stats.iter().zip(&bufs) {
                    let shape = shape(s, rows);
                    // The mean over features, then over powers.
                    let scale = 1.0 / (shape.features() * s.powers.len()) as f32;
                    for (p, (_, _, params)) in s.powers.iter().zip(&b.bounds) {
                        let value = GramParams::new(shape, p.power as u32, scale, offset);
                        ctx.queue
                            .write_buffer(params, 0, bytemuck::bytes_of(&value));
                    }
                }
                Ok(())
            },
        )?;
        let names = self
            .stats
            .iter()
            .map(|s| format!("layer{}", s.layer))
            .collect();
        crate::gpu::block_on(LayerScores::read(
            ctx,
            names,
            bufs.iter().map(|b| &b.scores),
            n,
        ))
    }

    fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<crate::io::F32Tensor<'_>> = Vec::new();
        for s in &self.stats {
            for p in &s.powers {
                let name = |n: &str| format!("layer{}.power{}.{n}", s.layer, p.power);
                tensors.push((name("median"), vec![p.median.len()], &p.median));
                tensors.push((name("mad"), vec![p.mad.len()], &p.mad));
            }
        }
        let stored: Vec<StoredLayer> = self
            .stats
            .iter()
            .map(|s| StoredLayer {
                layer: s.layer,
                positions: s.positions,
                channels: s.channels,
                powers: s.powers.iter().map(|p| p.power).collect(),
            })
            .collect();
        crate::io::write_f32_safetensors(
            path,
            &tensors,
            METADATA_KEY,
            serde_json::to_string(&stored)?,
        )
    }
}

const OPTIONS: &[Opt] = &[
    super::quadratic::COMMON_OPTIONS[0],
    opt(
        "powers",
        &["/powers"],
        Kind::Ints,
        "Gram matrix orders (1..=8).",
    ),
    opt(
        "mad_scale",
        &["/mad_scale"],
        Kind::Float,
        "Bounds are the trusted median ± this many median absolute deviations.",
    ),
    opt(
        "train.max_samples",
        &["/max_samples"],
        Kind::Int,
        "Trusted samples the exact medians are taken over (0 = all; memory grows with it).",
    ),
    opt(
        "train.batch_size",
        &["/batch_size"],
        Kind::Int,
        "Samples per GPU batch while fitting and scoring.",
    ),
];

/// The registry entry.
pub const ENTRY: DetectorEntry = DetectorEntry {
    name: "beatrix",
    doc: "Beatrix: Gram-matrix features (powers 1-4) outside the trusted median ± 10 MAD.",
    config: ConfigSpec {
        defaults: defaults_of::<BeatrixConfig>,
        options: OPTIONS,
        nested: &[],
        debug: &[("/max_samples", "4"), ("/batch_size", "2")],
    },
    build: Beatrix::build,
    load: Some(Beatrix::load),
};
