//! The supervised linear probe (the later upstream's `SupervisedLinearProbe`, a
//! "skyline": it sees the untrusted data's anomaly labels, which no real detector has).
//! Per chosen layer an L2-regularised logistic regression on the untrusted activations,
//! the upstream's scikit-learn default objective (inverse regularisation `c` = 1, the
//! bias not penalised), solved by Newton's method (IRLS) from zero: per step the GPU
//! computes the logits, per-sample terms (`shaders/logistic.wgsl`), the gradient and
//! the Hessian (the Gram matrix of the weighted rows, one matmul); the host solves the
//! (d+1)² system in f64 with a backtracking line search. Features are standardised
//! first (upstream's optional `StandardScaler`, on by default here) and the scaler is
//! folded into the stored weights, so scoring is one row dot per sample: the log-odds
//! `w·x + b` of "anomalous" (upstream returns the probability: the same ranking, but it
//! saturates at 1.0, which ties the most anomalous samples). Unlike upstream, every
//! chosen layer gets its own probe.

use std::path::Path;

use anyhow::{bail, Context, Result};
use faer::linalg::solvers::Solve;
use faer::Mat;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::quadratic::select_layers;
use super::{
    for_each_activation_batch, read_activations, Detector, FitData, LayerScores, SampleSet, Uses,
};
use crate::gpu::logistic::{irls_terms, scale_rows, IrlsTerms};
use crate::gpu::matmul::{matmul, MatmulArgs, MatmulFlags};
use crate::gpu::stats::{row_dot, StatsParams};
use crate::gpu::{Dispatch, GpuContext, Slice};
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
    /// Inverse regularisation strength (scikit-learn's `C`): the objective is the mean
    /// log-loss plus ‖w‖² / (2·c·n).
    pub c: f64,
    /// Newton steps at most.
    pub max_iter: usize,
    /// Stop when every gradient component of the objective is below this.
    pub tol: f64,
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
            c: 1.0,
            max_iter: 100,
            tol: 1e-6,
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
    /// Each layer's regularised training objective after training.
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
        if config.max_iter == 0 {
            bail!("max_iter must be >= 1");
        }
        if !(config.c > 0.0 && config.c.is_finite()) {
            bail!("c must be positive, got {}", config.c);
        }
        if !(config.tol > 0.0 && config.tol.is_finite()) {
            bail!("tol must be positive, got {}", config.tol);
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

    /// Trains one layer's logistic regression (Newton steps, the sums on the GPU).
    fn train_layer(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        t: &Training<'_>,
    ) -> Result<(LayerProbe, Fitted)> {
        let n = t.n;
        let d = t.x.len() / n;
        let k = d + 1;
        // Rows padded with zeros to a multiple of 4 columns: the matmuls then load vec4s.
        let kp = k.next_multiple_of(4);
        let limit = ctx.limits.max_storage_buffer_binding_size as usize;
        if n * kp * 4 > limit {
            bail!(
                "{n} untrusted samples of layer {} ({d} wide) exceed this adapter's storage \
                 binding limit of {limit} bytes; use --detector.train.max_samples {} or less",
                t.layer,
                limit / (4 * kp)
            );
        }
        let (shift, scale) = standardizer(t.x, d, self.config.standardize);
        // Standardised features and a constant 1 for the bias.
        let xs: Vec<f32> =
            t.x.chunks_exact(d)
                .flat_map(|row| {
                    row.iter()
                        .zip(shift.iter().zip(&scale))
                        .map(|(&v, (m, s))| ((f64::from(v) - m) / s) as f32)
                        .chain([1.0])
                        .chain(std::iter::repeat_n(0.0, kp - k))
                })
                .collect();
        let x = ctx.buffer_from("probe inputs", &xs)?;
        let zeros = |name: &str, len: usize| ctx.zeros(name, len);
        let (w, z) = (zeros("probe weights", kp)?, zeros("probe logits", n)?);
        let (r, sw, loss) = (
            zeros("probe residuals", n)?,
            zeros("probe irls weights", n)?,
            zeros("probe losses", n)?,
        );
        let (xw, g, h) = (
            zeros("probe weighted rows", n * kp)?,
            zeros("probe gradient", kp)?,
            zeros("probe hessian", kp * kp)?,
        );
        let whole = Slice::whole;
        let mm = |flags: MatmulFlags, (m, cols, inner): (usize, usize, usize), a, b, c| {
            let args = MatmulArgs {
                m,
                n: cols,
                k: inner,
                a,
                b,
                c,
                bias: None,
                mask: None,
            };
            matmul(ctx, flags, model.schedule, &args)
        };
        let kmajor = MatmulFlags {
            a_kmajor: true,
            ..Default::default()
        };
        let terms = IrlsTerms {
            residuals: Slice::new(&r, 0, n),
            weights: Slice::new(&sw, 0, n),
            losses: Slice::new(&loss, 0, n),
        };
        let z_n = Slice::new(&z, 0, n);
        // The losses at `w`; with the Newton terms, also X̂ᵀr and (S·X̂)ᵀ(S·X̂).
        let evaluate = vec![
            mm(
                MatmulFlags::default(),
                (n, 1, kp),
                whole(&x),
                Slice::new(&w, 0, kp),
                z_n,
            )?,
            irls_terms(ctx, n, z_n, whole(t.labels), &terms)?,
        ];
        let mut newton = evaluate.clone();
        newton.push(mm(
            kmajor,
            (kp, 1, n),
            whole(&x),
            terms.residuals,
            Slice::new(&g, 0, kp),
        )?);
        let xw_s = Slice::new(&xw, 0, n * kp);
        newton.push(scale_rows(ctx, (n, kp), whole(&x), terms.weights, xw_s)?);
        newton.push(mm(
            kmajor,
            (kp, kp, n),
            xw_s,
            xw_s,
            Slice::new(&h, 0, kp * kp),
        )?);

        let lambda = 1.0 / (self.config.c * n as f64);
        // The regularised mean loss at `weights` (its terms read back).
        let objective = |weights: &[f64], ops: &[Dispatch]| -> Result<f64> {
            let w32: Vec<f32> = (0..kp)
                .map(|j| weights.get(j).map_or(0.0, |&v| v as f32))
                .collect();
            ctx.queue.write_buffer(&w, 0, bytemuck::cast_slice(&w32));
            ctx.wait(Some(ctx.submit(ops)))?;
            let l: Vec<f32> = ctx.read(Slice::new(&loss, 0, n))?;
            let penalty: f64 = weights[..d].iter().map(|v| v * v).sum::<f64>() * lambda / 2.0;
            Ok(l.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64 + penalty)
        };
        let mut weights = vec![0f64; k];
        let mut f = objective(&weights, &newton)?;
        let mut steps = 0;
        for _ in 0..self.config.max_iter {
            let grad: Vec<f32> = ctx.read(Slice::new(&g, 0, k))?;
            let hess: Vec<f32> = ctx.read(Slice::new(&h, 0, kp * kp))?;
            let reg = |j: usize| if j < d { lambda } else { 0.0 };
            let gradient = Mat::from_fn(k, 1, |j, _| f64::from(grad[j]) + reg(j) * weights[j]);
            if (0..k).all(|j| gradient[(j, 0)].abs() < self.config.tol) {
                break;
            }
            // A tiny ridge keeps the system positive definite on separable data.
            let hessian = Mat::from_fn(k, k, |a, b| {
                f64::from(hess[a * kp + b]) + if a == b { reg(a) + 1e-12 } else { 0.0 }
            });
            let step = hessian
                .llt(faer::Side::Lower)
                .map_err(|e| anyhow::anyhow!("probe of layer {}: Newton system: {e:?}", t.layer))?
                .solve(&gradient);
            let slope: f64 = (0..k).map(|j| gradient[(j, 0)] * step[(j, 0)]).sum();
            // Backtracking (Armijo): halve the step until the objective falls enough.
            let mut size = 1.0;
            let accepted = loop {
                let trial: Vec<f64> = (0..k).map(|j| weights[j] - size * step[(j, 0)]).collect();
                if objective(&trial, &evaluate)? <= f - 1e-4 * size * slope {
                    break Some(trial);
                }
                size /= 2.0;
                if size < 1e-10 {
                    break None;
                }
            };
            // No decrease left at f32 precision: converged as far as it goes.
            let Some(trial) = accepted else { break };
            weights = trial;
            steps += 1;
            f = objective(&weights, &newton)?;
        }
        if !f.is_finite() {
            bail!("the probe of layer {} diverged (objective {f})", t.layer);
        }
        Ok((
            fold(&weights, &shift, &scale, t.layer),
            Fitted {
                objective: f,
                steps,
            },
        ))
    }
}

/// How a layer's training ended.
struct Fitted {
    objective: f64,
    steps: usize,
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

/// Weights (and, last, the bias) on standardised inputs as weights and bias on raw ones.
fn fold(trained: &[f64], shift: &[f64], scale: &[f64], layer: usize) -> LayerProbe {
    let d = shift.len();
    let w: Vec<f64> = (0..d).map(|j| trained[j] / scale[j]).collect();
    let b = trained[d] - w.iter().zip(shift).map(|(w, m)| w * m).sum::<f64>();
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
        let mut y: Vec<f32> = Vec::new();
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
            y.extend(std::iter::repeat_n(f32::from(u8::from(anomalous)), take));
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
            let (probe, fitted) = self.train_layer(ctx, model, &t)?;
            if progress {
                eprintln!(
                    "probe layer{layer}: {} samples, {} Newton steps, objective {:.6}",
                    y.len(),
                    fitted.steps,
                    fitted.objective
                );
            }
            self.probes.push(probe);
            self.train_loss.push(fitted.objective);
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
        let names = self
            .probes
            .iter()
            .map(|p| format!("layer{}", p.layer))
            .collect();
        crate::gpu::block_on(LayerScores::read(
            ctx,
            names,
            bufs.iter().map(|b| &b.scores),
            n,
        ))
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
        "train.c",
        &["/c"],
        Kind::Float,
        "Inverse L2 regularisation strength (scikit-learn's C; the bias is not penalised).",
    ),
    opt(
        "train.max_iter",
        &["/max_iter"],
        Kind::Int,
        "Newton steps at most.",
    ),
    opt(
        "train.tol",
        &["/tol"],
        Kind::Float,
        "Stop when every gradient component of the objective is below this.",
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
        debug: &[("/max_iter", "2"), ("/max_samples", "64")],
    },
    build: Probe::build,
    load: Some(Probe::load),
};
