//! The `train-detector` and `eval-detector` workflows as library calls.
//!
//! A detector run dir holds `config.json` ([`DetectorRunConfig`]) and
//! `detector.safetensors`. Evaluation writes `eval.json`, `scores.csv`,
//! `histogram.svg` and `roc.svg` into its output dir.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{Detector, LayerScores, MixSamples, SampleSet};
use crate::eval::metrics::{detection_metrics, roc_curve, DetectionMetrics};
use crate::eval::plots::{histogram_svg, roc_svg};
use crate::gpu::batch::GpuDataset;
use crate::gpu::GpuContext;
use crate::io::{write_atomic, write_json};
use crate::model::GpuMlp;
use crate::run::refuse_overwrite;
use crate::tasks::{SampleSpec, Source, Task};

pub const DETECTOR_CONFIG_FILE: &str = "config.json";
pub const DETECTOR_FILE: &str = "detector.safetensors";
pub const EVAL_FILE: &str = "eval.json";
pub const SCORES_FILE: &str = "scores.csv";
pub const HISTOGRAM_FILE: &str = "histogram.svg";
pub const ROC_FILE: &str = "roc.svg";

/// `config.json` of a detector run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DetectorRunConfig {
    pub command: String,
    pub cupbearer_version: String,
    pub task_kind: String,
    pub task: serde_json::Value,
    pub detector_kind: String,
    pub detector: serde_json::Value,
    pub seed: u32,
}

impl DetectorRunConfig {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(DETECTOR_CONFIG_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is not a detector run ({DETECTOR_CONFIG_FILE} missing; create one with \
                 `cupbearer train-detector`)",
                dir.display()
            )
        })?;
        let config: Self = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a detector run config", path.display()))?;
        if config.command != "train-detector" {
            bail!(
                "{} was written by `{}`, not train-detector",
                path.display(),
                config.command
            );
        }
        Ok(config)
    }
}

/// The GPU side of a task: context, model and the sources `specs` use, uploaded.
struct Loaded {
    ctx: GpuContext,
    model: GpuMlp,
    sources: HashMap<Source, GpuDataset>,
}

impl Loaded {
    fn new(task: &dyn Task, specs: &[&SampleSpec], progress: bool) -> Result<Self> {
        let ctx = GpuContext::new()?;
        crate::progress::note(progress, &format!("adapter: {}", ctx.adapter_name()));
        let mut sources = HashMap::new();
        for spec in specs {
            if let std::collections::hash_map::Entry::Vacant(e) = sources.entry(spec.source) {
                e.insert(task.upload(&ctx, spec.source)?);
            }
        }
        Ok(Loaded {
            model: GpuMlp::upload(&ctx, &task.classifier().model)?,
            sources,
            ctx,
        })
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
    pub fit_seconds: f64,
    pub wall_seconds: f64,
}

/// Fits a detector on the task's trusted data and writes the detector run dir.
pub fn train_detector(
    task: &dyn Task,
    mut detector: Box<dyn Detector>,
    seed: u32,
    out: Option<&Path>,
    overwrite: bool,
    progress: bool,
) -> Result<FitReport> {
    let wall = Instant::now();
    if let Some(out) = out {
        refuse_overwrite(out, &[DETECTOR_CONFIG_FILE, DETECTOR_FILE], overwrite)?;
    }
    let trusted = task.trusted()?;
    let gpu = Loaded::new(task, &[&trusted], progress)?;
    let fit = Instant::now();
    detector.fit(&gpu.ctx, &gpu.model, &gpu.samples(&trusted, seed), progress)?;
    let fit_seconds = fit.elapsed().as_secs_f64();
    if let Some(out) = out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        detector.save(&out.join(DETECTOR_FILE))?;
        let config = DetectorRunConfig {
            command: "train-detector".into(),
            cupbearer_version: env!("CARGO_PKG_VERSION").into(),
            task_kind: task.kind().into(),
            task: task.config(),
            detector_kind: detector.kind().into(),
            detector: detector.config(),
            seed,
        };
        write_json(&out.join(DETECTOR_CONFIG_FILE), &config)?;
    }
    Ok(FitReport {
        trusted_samples: trusted.indices.len(),
        fit_seconds,
        wall_seconds: wall.elapsed().as_secs_f64(),
    })
}

/// The ROC curve thinned to steps of at least 1/1000 in FPR or TPR, so that plots of
/// 20 000 distinct scores stay small.
fn roc_points(scores: &[f64], labels: &[bool]) -> Result<Vec<(f64, f64)>> {
    let curve = roc_curve(scores, labels)?;
    let mut kept: Vec<(f64, f64)> = Vec::new();
    for (i, &p) in curve.iter().enumerate() {
        let far = kept
            .last()
            .is_none_or(|q| (p.0 - q.0).abs() >= 1e-3 || (p.1 - q.1).abs() >= 1e-3);
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
    pub layers: Vec<LayerMetrics>,
    pub detector: PathBuf,
    pub adapter: String,
    pub score_seconds: f64,
    pub wall_seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerMetrics {
    pub layer: String,
    #[serde(rename = "AUC_ROC")]
    pub auc_roc: f64,
    #[serde(rename = "AP")]
    pub ap: f64,
}

/// Scores the task's test mix with a trained detector and writes the eval files, if
/// `out` is given. Adds files to `out` (which may be the detector's own dir); an
/// existing `eval.json` is refused unless `overwrite`.
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

pub fn eval_detector(
    task: &dyn Task,
    source: &DetectorSource,
    batch_size: usize,
    seed: u32,
    out: Option<&Path>,
    overwrite: bool,
    progress: bool,
) -> Result<EvalReport> {
    let wall = Instant::now();
    let outputs = [EVAL_FILE, SCORES_FILE, HISTOGRAM_FILE, ROC_FILE];
    if let Some(out) = out {
        refuse_overwrite(out, &outputs, overwrite)?;
    }
    let (detector, detector_path) = match source {
        DetectorSource::Run(dir) => {
            let run = DetectorRunConfig::load(dir)?;
            let det = super::load(&run.detector_kind, &run.detector, &dir.join(DETECTOR_FILE))?;
            (det, dir.clone())
        }
        DetectorSource::Config { kind, config } => (super::build(kind, config)?, PathBuf::new()),
    };
    let mix = task.test_mix()?;
    let trusted = if detector.needs_trusted() {
        Some(task.trusted()?)
    } else {
        None
    };
    let mut specs = vec![&mix.normal, &mix.anomalous];
    specs.extend(trusted.as_ref());
    let gpu = Loaded::new(task, &specs, progress)?;
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

    let labels: Vec<bool> = std::iter::repeat_n(false, mix.normal.indices.len())
        .chain(std::iter::repeat_n(true, mix.anomalous.indices.len()))
        .collect();
    let joined = |f: &dyn Fn(&LayerScores) -> Vec<f64>| {
        let mut v = f(&normal);
        v.extend(f(&anomalous));
        v
    };
    let total = joined(&|s| s.aggregate());
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
        layers,
        detector: detector_path,
        adapter: gpu.ctx.adapter_name(),
        score_seconds,
        wall_seconds: wall.elapsed().as_secs_f64(),
    };
    let Some(out) = out else {
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
    histogram_svg(&out.join(HISTOGRAM_FILE), &title, n, a, 100, false)?;
    roc_svg(&out.join(ROC_FILE), &title, &curves)?;
    write_json(&out.join(EVAL_FILE), &report)?;
    Ok(report)
}
