//! The `train-detector` and `eval-detector` workflows: fit a detector on a task's trusted
//! data and write a detector run dir; score a task's test mix and write the evaluation
//! files (formats in [`crate::run`]).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use web_time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{claim, context, Output};
use crate::detectors::{
    Aggregation, Detector, FitData, LayerScores, MixSamples, SampleSet, ScoreScale,
};
use crate::eval::metrics::{detection_metrics, roc_curve, DetectionMetrics};
use crate::eval::plots::{histogram_svg, roc_log_svg, roc_svg, HistogramAxes, LOG_FPR_MIN};
use crate::gpu::batch::GpuDataset;
use crate::gpu::shaders::Override;
use crate::gpu::GpuContext;
use crate::io::{store_as, write_atomic, write_json, SaveDtype};
use crate::model::GpuMlp;
use crate::registry::Registry;
use crate::run::{
    refuse_overwrite, DetectorRunConfig, DETECTOR_CONFIG_FILE, DETECTOR_FILE, EVAL_FILE, FIT_FILE,
    HISTOGRAM_FILE, HISTOGRAM_LOG_FILE, ROC_FILE, ROC_LOG_FILE, SCORES_FILE,
};
use crate::tasks::{SampleSpec, Source, Task};

/// The GPU side of a task: context, model and the sources the specs use, uploaded.
struct Loaded {
    ctx: GpuContext,
    model: GpuMlp,
    sources: HashMap<Source, GpuDataset>,
}

impl Loaded {
    fn new(task: &dyn Task, progress: bool) -> Result<Self> {
        let ctx = context(progress)?;
        Ok(Loaded {
            model: GpuMlp::upload(&ctx, &task.classifier().model)?,
            sources: HashMap::new(),
            ctx,
        })
    }

    fn upload(&mut self, task: &dyn Task, specs: &[&SampleSpec]) -> Result<()> {
        for spec in specs {
            if let std::collections::hash_map::Entry::Vacant(e) = self.sources.entry(spec.source) {
                e.insert(task.upload(&self.ctx, spec.source)?);
            }
        }
        Ok(())
    }

    fn samples<'a>(&'a self, spec: &'a SampleSpec, seed: u32) -> SampleSet<'a> {
        SampleSet {
            data: &self.sources[&spec.source],
            indices: &spec.indices,
            backdoor: spec.backdoor,
            seed,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FitReport {
    pub trusted_samples: usize,
    pub untrusted_samples: usize,
    pub fit_seconds: f64,
    pub wall_seconds: f64,
    /// Kernel files replaced by `--shader-dir` (name, path, SHA-256); none: built-in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_overrides: Vec<Override>,
}

/// How train-detector fits: triggers drawn from `seed`; `layer_aggregation` is recorded
/// as the run's default for evaluation.
#[derive(Clone, Copy, Debug, Default)]
pub struct FitOptions {
    pub seed: u32,
    pub layer_aggregation: Aggregation,
    /// Precision of `detector.safetensors` (f32 by default).
    pub dtype: SaveDtype,
}

/// Fits a detector on the task's trusted data and writes the detector run dir.
pub fn train_detector(
    task: &dyn Task,
    mut detector: Box<dyn Detector>,
    opts: &FitOptions,
    out: &Output<'_>,
) -> Result<FitReport> {
    let seed = opts.seed;
    let wall = Instant::now();
    let _claim = out.dir.map(claim).transpose()?;
    if let Some(dir) = out.dir {
        refuse_overwrite(
            dir,
            &[DETECTOR_CONFIG_FILE, DETECTOR_FILE, FIT_FILE],
            out.overwrite,
        )?;
    }
    let uses = detector.uses();
    let trusted = uses.trusted.then(|| task.trusted()).transpose()?;
    let untrusted = if uses.untrusted {
        task.untrusted()?
    } else {
        Vec::new()
    };
    if uses.untrusted && untrusted.is_empty() {
        bail!(
            "the {} detector fits on untrusted data, but the {} task has none: keep only part \
             of the training data trusted, e.g. --task.trusted_fraction 0.5",
            detector.kind(),
            task.kind()
        );
    }
    let mut gpu = Loaded::new(task, out.progress)?;
    if !untrusted.is_empty() {
        // Untrusted anomalies may be computed (the adversarial task's examples).
        task.prepare(&gpu.ctx, out.progress)?;
    }
    let specs: Vec<&SampleSpec> = trusted
        .iter()
        .chain(untrusted.iter().map(|u| &u.samples))
        .collect();
    gpu.upload(task, &specs)?;
    let trusted_set = trusted.as_ref().map(|t| gpu.samples(t, seed));
    let untrusted_sets: Vec<SampleSet<'_>> = untrusted
        .iter()
        .map(|u| gpu.samples(&u.samples, seed))
        .collect();
    let labels: Vec<bool> = untrusted.iter().map(|u| u.anomalous).collect();
    let data = FitData {
        trusted: trusted_set.as_ref(),
        untrusted: &untrusted_sets,
        untrusted_anomalous: &labels,
    };
    let fit = Instant::now();
    detector.fit_data(&gpu.ctx, &gpu.model, &data, out.progress)?;
    let fit_seconds = fit.elapsed().as_secs_f64();
    let scales = score_scales(&gpu, &*detector, &data)?;
    if let Some(dir) = out.dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        detector.save(&dir.join(DETECTOR_FILE))?;
        store_as(&dir.join(DETECTOR_FILE), opts.dtype)?;
    }
    let report = FitReport {
        trusted_samples: trusted.as_ref().map_or(0, |t| t.indices.len()),
        untrusted_samples: untrusted.iter().map(|u| u.samples.indices.len()).sum(),
        fit_seconds,
        wall_seconds: wall.elapsed().as_secs_f64(),
        kernel_overrides: gpu.ctx.shaders.overrides(),
    };
    if let Some(dir) = out.dir {
        write_json(&dir.join(FIT_FILE), &report)?;
        // Written last: a run dir with a config is a finished run.
        write_json(
            &dir.join(DETECTOR_CONFIG_FILE),
            &DetectorRunConfig {
                score_scales: scales,
                layer_aggregation: opts.layer_aggregation,
                ..config_of(task, &*detector, seed)
            },
        )?;
    }
    Ok(report)
}

/// `config.json` of a detector run.
fn config_of(task: &dyn Task, detector: &dyn Detector, seed: u32) -> DetectorRunConfig {
    DetectorRunConfig {
        command: "train-detector".into(),
        cupbearer_version: env!("CARGO_PKG_VERSION").into(),
        task_kind: task.kind().into(),
        task: task.config(),
        detector_kind: detector.kind().into(),
        detector: detector.config(),
        seed,
        score_scales: Vec::new(),
        layer_aggregation: Aggregation::Mean,
    }
}

/// Samples of the fit data a detector's score scales are measured on.
const SCALE_SAMPLES: usize = 4096;

/// Each layer's score distribution over up to [`SCALE_SAMPLES`] samples of the fit
/// data: the trusted samples, or else the same share of every untrusted set (the
/// detector does not know which are anomalous, so neither does its scale).
fn score_scales(
    gpu: &Loaded,
    detector: &dyn Detector,
    data: &FitData<'_>,
) -> Result<Vec<ScoreScale>> {
    let sets: Vec<&SampleSet<'_>> = match data.trusted {
        Some(t) => vec![t],
        None => data.untrusted.iter().collect(),
    };
    let total: usize = sets.iter().map(|s| s.indices.len()).sum();
    let mut scores = LayerScores {
        names: Vec::new(),
        scores: Vec::new(),
    };
    for set in sets {
        let take = (set.indices.len() * SCALE_SAMPLES.min(total)).div_ceil(total.max(1));
        let prefix = SampleSet {
            indices: &set.indices[..take],
            ..*set
        };
        scores.extend(detector.layer_scores(&gpu.ctx, &gpu.model, &prefix, 1024)?)?;
    }
    Ok(scores.scales())
}

/// The ROC curve thinned to steps of at least 1/1000 in FPR or TPR (or 1/100 of a
/// decade of FPR, for the log-scale plot), so that plots of 20 000 scores stay small.
fn roc_points(scores: &[f64], labels: &[bool]) -> Result<Vec<(f64, f64)>> {
    let curve = roc_curve(scores, labels)?;
    let mut kept: Vec<(f64, f64)> = Vec::new();
    for (i, &p) in curve.iter().enumerate() {
        // Steps of 1/1000 on the linear plot, and of 1/100 decade on the log one.
        let log = |x: f64| x.max(LOG_FPR_MIN).log10();
        let far = kept.last().is_none_or(|q| {
            (p.0 - q.0).abs() >= 1e-3
                || (p.1 - q.1).abs() >= 1e-3
                || (log(p.0) - log(q.0)).abs() >= 1e-2
        });
        if far || i + 1 == curve.len() {
            kept.push(p);
        }
    }
    Ok(kept)
}

/// `eval.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    #[serde(rename = "AUC_ROC")]
    pub auc_roc: f64,
    #[serde(rename = "AP")]
    pub ap: f64,
    #[serde(rename = "FPR_at_95_TPR")]
    pub fpr_at_95_tpr: f64,
    pub num_normal: usize,
    pub num_anomalous: usize,
    /// How the layers' scores combine into `score` (and the metrics above).
    pub layer_aggregation: Aggregation,
    pub layers: Vec<LayerMetrics>,
    pub detector: PathBuf,
    pub adapter: String,
    pub score_seconds: f64,
    pub wall_seconds: f64,
    /// Kernel files replaced by `--shader-dir` (name, path, SHA-256); none: built-in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_overrides: Vec<Override>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerMetrics {
    pub layer: String,
    #[serde(rename = "AUC_ROC")]
    pub auc_roc: f64,
    #[serde(rename = "AP")]
    pub ap: f64,
}

/// The detector eval-detector scores with.
pub enum DetectorSource {
    /// A detector run dir from train-detector.
    Run(PathBuf),
    /// An evaluation-only detector built from its config (adversarial_abstraction).
    Config {
        kind: String,
        config: serde_json::Value,
    },
}

/// How eval-detector scores: `batch_size` samples per GPU batch, triggers drawn from `seed`.
pub struct EvalOptions<'a> {
    pub registry: &'a Registry,
    pub batch_size: usize,
    pub seed: u32,
    /// How layer scores combine into the sample score (`max` needs a detector run's
    /// score scales); None: the detector run's default (mean for eval-only detectors).
    pub aggregation: Option<Aggregation>,
}

/// Scores the task's test mix with a detector and writes the eval files if `out.dir`
/// is given (which may be the detector's own dir); existing outputs are refused unless
/// `out.overwrite`.
pub fn eval_detector(
    task: &dyn Task,
    source: &DetectorSource,
    opts: &EvalOptions<'_>,
    out: &Output<'_>,
) -> Result<EvalReport> {
    let wall = Instant::now();
    let outputs = [
        EVAL_FILE,
        SCORES_FILE,
        HISTOGRAM_FILE,
        HISTOGRAM_LOG_FILE,
        ROC_FILE,
        ROC_LOG_FILE,
    ];
    let _claim = out.dir.map(claim).transpose()?;
    if let Some(dir) = out.dir {
        refuse_overwrite(dir, &outputs, out.overwrite)?;
    }
    let (detector, detector_path, scales, aggregation) = match source {
        DetectorSource::Run(dir) => {
            let run = DetectorRunConfig::load(dir)?;
            let det = opts.registry.load_detector(
                &run.detector_kind,
                &run.detector,
                &dir.join(DETECTOR_FILE),
            )?;
            let how = opts.aggregation.unwrap_or(run.layer_aggregation);
            (det, dir.clone(), run.score_scales, how)
        }
        DetectorSource::Config { kind, config } => (
            opts.registry.build_detector(kind, config)?,
            PathBuf::new(),
            Vec::new(),
            opts.aggregation.unwrap_or_default(),
        ),
    };
    let (seed, batch_size) = (opts.seed, opts.batch_size);
    let mut gpu = Loaded::new(task, out.progress)?;
    task.prepare(&gpu.ctx, out.progress)?;
    let mix = task.test_mix()?;
    let trusted = if detector.needs_trusted() {
        Some(task.trusted()?)
    } else {
        None
    };
    let mut specs = vec![&mix.normal, &mix.anomalous];
    specs.extend(trusted.as_ref());
    gpu.upload(task, &specs)?;
    let start = Instant::now();
    let (normal_set, anomalous_set) = (
        gpu.samples(&mix.normal, seed),
        gpu.samples(&mix.anomalous, seed),
    );
    let trusted_set = trusted.as_ref().map(|t| gpu.samples(t, seed));
    let (normal, anomalous) = detector.score_mix(
        &gpu.ctx,
        &gpu.model,
        &MixSamples {
            normal: &normal_set,
            anomalous: &anomalous_set,
            trusted: trusted_set.as_ref(),
        },
        batch_size,
    )?;
    let score_seconds = start.elapsed().as_secs_f64();
    for (side, scores) in [("normal", &normal), ("anomalous", &anomalous)] {
        for (name, layer) in scores.names.iter().zip(&scores.scores) {
            if let Some(i) = layer.iter().position(|v| !v.is_finite()) {
                bail!(
                    "the {} detector scored {side} sample {i} {} on layer {name}: a score must \
                     be a number (are the model's activations finite?)",
                    detector.kind(),
                    layer[i]
                );
            }
        }
    }

    let labels: Vec<bool> = std::iter::repeat_n(false, mix.normal.indices.len())
        .chain(std::iter::repeat_n(true, mix.anomalous.indices.len()))
        .collect();
    let joined = |f: &dyn Fn(&LayerScores) -> Vec<f64>| {
        let mut v = f(&normal);
        v.extend(f(&anomalous));
        v
    };
    let total = {
        let mut v = normal.combine(aggregation, &scales)?;
        v.extend(anomalous.combine(aggregation, &scales)?);
        v
    };
    let DetectionMetrics {
        auc_roc,
        ap,
        fpr_at_95_tpr,
        num_normal,
        num_anomalous,
    } = detection_metrics(&total, &labels)?;
    let mut layers = Vec::new();
    let mut curves = vec![(
        format!("all (AUROC {auc_roc:.4})"),
        roc_points(&total, &labels)?,
    )];
    let per_layer: Vec<Vec<f64>> = (0..normal.names.len())
        .map(|l| joined(&|s| s.scores[l].clone()))
        .collect();
    for (name, scores) in normal.names.iter().zip(&per_layer) {
        let m = detection_metrics(scores, &labels)?;
        curves.push((
            format!("{name} (AUROC {:.4})", m.auc_roc),
            roc_points(scores, &labels)?,
        ));
        layers.push(LayerMetrics {
            layer: name.clone(),
            auc_roc: m.auc_roc,
            ap: m.ap,
        });
    }

    let report = EvalReport {
        auc_roc,
        ap,
        fpr_at_95_tpr,
        num_normal,
        num_anomalous,
        layer_aggregation: aggregation,
        layers,
        detector: detector_path,
        adapter: gpu.ctx.adapter_name(),
        score_seconds,
        wall_seconds: wall.elapsed().as_secs_f64(),
        kernel_overrides: gpu.ctx.shaders.overrides(),
    };
    let Some(out) = out.dir else {
        return Ok(report);
    };
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut csv = format!("split,sample,anomalous,{},score\n", normal.names.join(","));
    let mut row = 0;
    for spec in [&mix.normal, &mix.anomalous] {
        let split = spec.source.name();
        for &i in &spec.indices {
            let _ = write!(csv, "{split},{i},{}", labels[row] as u8);
            for layer in &per_layer {
                let _ = write!(csv, ",{}", layer[row]);
            }
            let _ = writeln!(csv, ",{}", total[row]);
            row += 1;
        }
    }
    write_atomic(&out.join(SCORES_FILE), csv.as_bytes())?;
    let (n, a) = total.split_at(num_normal);
    let title = format!("{} detector, {} task", detector.kind(), task.kind());
    for (file, log_count) in [(HISTOGRAM_FILE, false), (HISTOGRAM_LOG_FILE, true)] {
        let axes = HistogramAxes {
            bins: 100,
            log_x: false,
            log_count,
        };
        histogram_svg(&out.join(file), &title, n, a, &axes)?;
    }
    roc_svg(&out.join(ROC_FILE), &title, &curves)?;
    roc_log_svg(&out.join(ROC_LOG_FILE), &title, &curves)?;
    write_json(&out.join(EVAL_FILE), &report)?;
    Ok(report)
}
