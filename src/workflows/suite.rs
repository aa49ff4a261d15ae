//! `cupbearer suite`: every detector of a spec against every task of it, one command.
//! A spec (TOML) names tasks (a classifier to train and the detection task on it, with
//! its `--task.*` options and ablations) and detectors (a registry name and its
//! `--detector.*` options). Each classifier is trained once and cached under the suite
//! dir by its resolved config; each cell (task x detector) is a detector run dir plus
//! one eval dir per test mix, so any cell can be inspected or re-run with the three
//! commands. Finished cells are skipped on a re-run; a failing cell is recorded and the
//! suite goes on. Outputs: `results.json`, `results.csv`, `leaderboard.md`,
//! `heatmap.svg`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::classifier::{train_classifier, ClassifierMetrics, RunOptions};
use super::detector::{
    eval_detector, train_detector, DetectorSource, EvalOptions, EvalReport, FitOptions, FitReport,
};
use super::{claim, Output};
use crate::data::augment::Augment;
use crate::data::backdoor::Backdoor;
use crate::data::DatasetName;
use crate::detectors::Aggregation;
use crate::io::{write_atomic, write_json};
use crate::model::MlpConfig;
use crate::registry::{RawOptions, Registry, TaskEnv};
use crate::run::{
    ClassifierRunConfig, TrainDataConfig, TrainingConfig, EVAL_FILE, FIT_FILE, METRICS_FILE,
};

/// A suite spec, as read from TOML.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    pub name: String,
    #[serde(rename = "task", default)]
    pub tasks: Vec<TaskSpec>,
    #[serde(rename = "detector", default)]
    pub detectors: Vec<DetectorSpec>,
}

/// A classifier (trained on a possibly poisoned data set) and a detection task on it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub name: String,
    pub dataset: DatasetName,
    /// Train the classifier on the first N training samples only.
    #[serde(default)]
    pub max_train_size: Option<usize>,
    #[serde(default = "default_hidden")]
    pub hidden_dims: Vec<usize>,
    #[serde(default)]
    pub conv_channels: Vec<usize>,
    /// Classes of the data set (all the built-in ones have 10).
    #[serde(default = "default_classes")]
    pub output_dim: usize,
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// The training data's backdoor (none: a clean classifier).
    #[serde(default)]
    pub backdoor: Option<Backdoor>,
    /// Training augmentation (none: off).
    #[serde(default)]
    pub augment: Option<Augment>,
    #[serde(default)]
    pub seed: u32,
    /// The detection task's registry name.
    #[serde(default = "default_task")]
    pub kind: String,
    /// Its `--task.*` options (`run_path` is the cached classifier).
    #[serde(default)]
    pub options: toml::Table,
    /// Extra test mixes: option overrides, e.g. noise instead of the trigger.
    #[serde(default, rename = "ablation")]
    pub ablations: Vec<Ablation>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Ablation {
    pub name: String,
    pub options: toml::Table,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorSpec {
    /// The cell's label, and the registry name unless `detector` is given.
    pub name: String,
    #[serde(default)]
    pub detector: Option<String>,
    #[serde(default)]
    pub options: toml::Table,
    /// How the cell combines layer scores (default: mean).
    #[serde(default)]
    pub layer_aggregation: Option<Aggregation>,
}

fn default_hidden() -> Vec<usize> {
    vec![256, 256]
}

fn default_classes() -> usize {
    10
}

fn default_epochs() -> usize {
    10
}

fn default_task() -> String {
    "backdoor".into()
}

const QUICK: &str = r#"
name = "quick"

[[task]]
name = "mnist-corner"
dataset = "mnist"
max_train_size = 20000
hidden_dims = [128, 64]
epochs = 2
backdoor = { kind = "corner", corner = "top-left", p_backdoor = 0.05, target_class = 0 }
options = { backdoor = "corner", trusted_fraction = 0.5, max_train_size = 20000, max_test_size = 4000 }
ablation = [{ name = "noise0.2", options = { backdoor = "noise", "backdoor.std" = 0.2 } }]

[[detector]]
name = "mahalanobis"

[[detector]]
name = "mahalanobis-max"
detector = "mahalanobis"
layer_aggregation = "max"

[[detector]]
name = "que"

[[detector]]
name = "spectral"

[[detector]]
name = "supervised_probe"

[[detector]]
name = "beatrix"

[[detector]]
name = "ted"

[[detector]]
name = "finetuning"

[[detector]]
name = "vae"

# kld_weight 0: a plain autoencoder (the KL term hides a corner trigger, see the README).
[[detector]]
name = "vae-ae"
detector = "vae"
options = { kld_weight = 0 }

[[detector]]
name = "abstraction"
options = { "train.num_epochs" = 2 }

[[detector]]
name = "adversarial_abstraction"
"#;

const SEED: &str = r#"
name = "seed"

[[task]]
name = "mnist-corner"
dataset = "mnist"
backdoor = { kind = "corner", corner = "top-left", p_backdoor = 0.05, target_class = 0 }
options = { backdoor = "corner" }
ablation = [{ name = "noise0.2", options = { backdoor = "noise", "backdoor.std" = 0.2 } }]

[[detector]]
name = "mahalanobis"
"#;

/// MNIST, Fashion-MNIST and CIFAR-10, each with a corner and a noise backdoor, against
/// every built-in detector that fits (full data, 10 epochs: hours on lavapipe).
const STANDARD: &str = r#"
name = "standard"

[[task]]
name = "mnist-corner"
dataset = "mnist"
backdoor = { kind = "corner", corner = "top-left", p_backdoor = 0.05, target_class = 0 }
options = { backdoor = "corner", trusted_fraction = 0.5 }
ablation = [{ name = "noise0.2", options = { backdoor = "noise", "backdoor.std" = 0.2 } }]

[[task]]
name = "mnist-noise"
dataset = "mnist"
backdoor = { kind = "noise", std = 0.3, clip = true, p_backdoor = 0.05, target_class = 0 }
options = { backdoor = "noise", trusted_fraction = 0.5 }

# WaNet at strength 1.0: the MLP does not learn the paper's 0.5 with 20 % noise mode
# in 10 epochs (attack success 0.01); this reaches 0.80 in 10 epochs, 0.97 in 30.
[[task]]
name = "mnist-wanet"
dataset = "mnist"
epochs = 30
backdoor = { kind = "wanet", control_grid_width = 4, warping_strength = 1.0, grid_rescale = 1.0, p_noise = 0.0, grid_seed = 0, p_backdoor = 0.1, target_class = 0 }
options = { backdoor = "wanet", trusted_fraction = 0.5 }

[[task]]
name = "fashion-corner"
dataset = "fashion_mnist"
backdoor = { kind = "corner", corner = "top-left", p_backdoor = 0.05, target_class = 0 }
options = { backdoor = "corner", trusted_fraction = 0.5 }

[[task]]
name = "fashion-noise"
dataset = "fashion_mnist"
backdoor = { kind = "noise", std = 0.3, clip = true, p_backdoor = 0.05, target_class = 0 }
options = { backdoor = "noise", trusted_fraction = 0.5 }

[[task]]
name = "cifar10-corner"
dataset = "cifar10"
backdoor = { kind = "corner", corner = "top-left", p_backdoor = 0.05, target_class = 0 }
options = { backdoor = "corner", trusted_fraction = 0.5 }

[[task]]
name = "cifar10-noise"
dataset = "cifar10"
backdoor = { kind = "noise", std = 0.3, clip = true, p_backdoor = 0.05, target_class = 0 }
options = { backdoor = "noise", trusted_fraction = 0.5 }

[[detector]]
name = "mahalanobis"

[[detector]]
name = "que"

[[detector]]
name = "spectral"

[[detector]]
name = "supervised_probe"

[[detector]]
name = "beatrix"

[[detector]]
name = "ted"

[[detector]]
name = "finetuning"

[[detector]]
name = "vae"

[[detector]]
name = "vae-ae"
detector = "vae"
options = { kld_weight = 0 }

[[detector]]
name = "abstraction"
"#;

/// What one row of results describes.
#[derive(Clone, Copy)]
struct Cell<'a> {
    task: &'a TaskSpec,
    det: &'a DetectorSpec,
    eval: Option<&'a EvalReport>,
    fit: Option<&'a FitReport>,
    classifier: Option<&'a ClassifierMetrics>,
}

/// One evaluated test mix of a cell, or the error that stopped the cell.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CellResult {
    pub suite: String,
    pub task: String,
    pub detector: String,
    /// `main`, or the ablation's name.
    pub mix: String,
    /// `all` (the detector's sample score), or one layer's own score (`layer0`, ...).
    #[serde(default = "all_layers")]
    pub layer: String,
    pub auc_roc: Option<f64>,
    pub ap: Option<f64>,
    pub fpr_at_95_tpr: Option<f64>,
    pub score_seconds: Option<f64>,
    /// The detector's fit (`fit.json` of its run; none for evaluation-only ones).
    pub fit_seconds: Option<f64>,
    /// The classifier's training (its `metrics.json`).
    pub train_seconds: Option<f64>,
    pub clean_accuracy: Option<f64>,
    pub attack_success: Option<f64>,
    pub adapter: Option<String>,
    pub error: Option<String>,
    pub cupbearer_version: String,
}

fn all_layers() -> String {
    ALL.into()
}

/// The `layer` of a row about the aggregate score.
const ALL: &str = "all";

/// Where and how a suite runs.
pub struct SuiteOptions {
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    /// Run only these tasks / detectors (empty: all).
    pub only_tasks: Vec<String>,
    pub only_detectors: Vec<String>,
    pub progress: bool,
}

/// Spec options as the registry's raw `key = values` pairs.
fn raw(table: &toml::Table) -> RawOptions {
    table
        .iter()
        .map(|(k, v)| {
            let one = |v: &toml::Value| match v {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let values = match v {
                toml::Value::Array(items) => items.iter().map(one).collect(),
                other => vec![one(other)],
            };
            (k.clone(), values)
        })
        .collect()
}

/// A name usable as a directory.
fn slug(name: &str) -> Result<&str> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if !ok {
        bail!("suite name {name:?}: use letters, digits, '-', '_' and '.' only");
    }
    Ok(name)
}

impl Suite {
    pub fn from_spec(text: &str) -> Result<Suite> {
        let suite: Suite = toml::from_str(text).context("bad suite spec")?;
        slug(&suite.name)?;
        for t in &suite.tasks {
            slug(&t.name)?;
            for a in &t.ablations {
                slug(&a.name)?;
            }
        }
        for d in &suite.detectors {
            slug(&d.name)?;
        }
        if suite.tasks.is_empty() || suite.detectors.is_empty() {
            bail!(
                "suite {}: needs at least one [[task]] and one [[detector]]",
                suite.name
            );
        }
        Ok(suite)
    }

    /// A built-in suite: `quick` (MNIST subset, seconds on lavapipe), `seed` (the
    /// original README's pipeline and its ablation, full MNIST) or `standard` (three
    /// data sets x two triggers x every built-in detector that fits).
    pub fn builtin(name: &str) -> Result<Suite> {
        match name {
            "quick" => Suite::from_spec(QUICK),
            "seed" => Suite::from_spec(SEED),
            "standard" => Suite::from_spec(STANDARD),
            _ => bail!("unknown built-in suite {name:?}; available: quick, seed, standard"),
        }
    }

    /// Runs every selected cell; a failing cell is recorded, not fatal.
    pub fn run(&self, registry: &Registry, opts: &SuiteOptions) -> Result<Vec<CellResult>> {
        let wanted =
            |list: &[String], name: &str| list.is_empty() || list.iter().any(|n| n == name);
        for (list, names, what) in [
            (
                &opts.only_tasks,
                self.tasks.iter().map(|t| &t.name).collect::<Vec<_>>(),
                "task",
            ),
            (
                &opts.only_detectors,
                self.detectors.iter().map(|d| &d.name).collect(),
                "detector",
            ),
        ] {
            if let Some(bad) = list.iter().find(|n| !names.contains(n)) {
                bail!("suite {} has no {what} {bad:?}", self.name);
            }
        }
        let _claim = claim(&opts.dir)?;
        let cells = self
            .tasks
            .iter()
            .filter(|t| wanted(&opts.only_tasks, &t.name))
            .count()
            * self
                .detectors
                .iter()
                .filter(|d| wanted(&opts.only_detectors, &d.name))
                .count();
        let bar = crate::progress::bar(opts.progress, cells as u64, "cells");
        let mut results = Vec::new();
        for task in self
            .tasks
            .iter()
            .filter(|t| wanted(&opts.only_tasks, &t.name))
        {
            let classifier = self.classifier(task, opts);
            for det in self
                .detectors
                .iter()
                .filter(|d| wanted(&opts.only_detectors, &d.name))
            {
                let cell = classifier
                    .as_ref()
                    .map_err(|e| anyhow::anyhow!("{e:#}"))
                    .and_then(|(dir, m)| self.cell(registry, task, det, dir, m, opts));
                bar.inc(1);
                match cell {
                    Ok(rows) => results.extend(rows),
                    Err(e) => {
                        crate::progress::note(
                            opts.progress,
                            &format!("cell {} x {} failed: {e:#}", task.name, det.name),
                        );
                        let cell = Cell {
                            task,
                            det,
                            eval: None,
                            fit: None,
                            classifier: None,
                        };
                        results.push(self.row(&cell, "main", Some(format!("{e:#}"))));
                    }
                }
            }
        }
        bar.finish_and_clear();
        write_json(&opts.dir.join("results.json"), &results)?;
        write_atomic(&opts.dir.join("results.csv"), csv(&results).as_bytes())?;
        write_atomic(
            &opts.dir.join("leaderboard.md"),
            leaderboard(self, &results).as_bytes(),
        )?;
        self.heatmap(&opts.dir.join("heatmap.svg"), &results)?;
        Ok(results)
    }

    /// The task's classifier run dir (trained on first use) and its metrics.
    fn classifier(
        &self,
        task: &TaskSpec,
        opts: &SuiteOptions,
    ) -> Result<(PathBuf, ClassifierMetrics)> {
        let config = ClassifierRunConfig::new(
            TrainDataConfig {
                dataset: task.dataset,
                max_size: task.max_train_size,
                backdoor: task.backdoor,
                augment: task.augment,
            },
            MlpConfig {
                input_shape: [0; 3],
                conv_channels: task.conv_channels.clone(),
                hidden_dims: task.hidden_dims.clone(),
                output_dim: task.output_dim,
            },
            TrainingConfig {
                num_epochs: task.epochs,
                seed: task.seed,
                ..TrainingConfig::default()
            },
        );
        let key: String = Sha256::digest(serde_json::to_vec(&config)?)
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect();
        let dir = opts
            .dir
            .join("classifiers")
            .join(format!("{}-{key}", task.name));
        let metrics_path = dir.join(METRICS_FILE);
        if metrics_path.is_file() {
            crate::progress::note(opts.progress, &format!("classifier {}: cached", task.name));
            let text = std::fs::read_to_string(&metrics_path)?;
            return Ok((dir, serde_json::from_str(&text)?));
        }
        crate::progress::note(
            opts.progress,
            &format!("classifier {}: training", task.name),
        );
        let metrics = train_classifier(
            config,
            &RunOptions {
                dir: Some(dir.clone()),
                test_limit: None,
                data_dir: opts.data_dir.clone(),
                // A run interrupted before its metrics were written is redone.
                overwrite: true,
                eval_batch_size: 2048,
                progress: opts.progress,
                dtype: Default::default(),
            },
        )?;
        Ok((dir, metrics))
    }

    /// Fits the detector on the task (unless a finished run exists) and evaluates every
    /// test mix not evaluated yet.
    fn cell(
        &self,
        registry: &Registry,
        task: &TaskSpec,
        det: &DetectorSpec,
        classifier: &Path,
        metrics: &ClassifierMetrics,
        opts: &SuiteOptions,
    ) -> Result<Vec<CellResult>> {
        let cell = opts.dir.join("cells").join(&task.name).join(&det.name);
        let kind = det.detector.as_deref().unwrap_or(&det.name);
        let entry = registry.detector(kind)?;
        let env = TaskEnv {
            data_dir: opts.data_dir.clone(),
            seed: task.seed,
        };
        let mut base = raw(&task.options);
        base.push(("run_path".into(), vec![classifier.display().to_string()]));
        let build_task = |extra: &RawOptions| {
            let mut options = base.clone();
            options.extend(extra.iter().cloned());
            let task_entry = registry.task(&task.kind)?;
            (task_entry.build)(&task_entry.resolve(&options, false)?, &env)
        };
        let mixes: Vec<(String, RawOptions)> = std::iter::once(("main".to_string(), Vec::new()))
            .chain(
                task.ablations
                    .iter()
                    .map(|a| (a.name.clone(), raw(&a.options))),
            )
            .collect();
        let eval_dir = |mix: &str| {
            cell.join(if mix == "main" {
                "eval".into()
            } else {
                format!("eval-{mix}")
            })
        };
        let done = |mix: &str| eval_dir(mix).join(EVAL_FILE).is_file();
        let det_dir = cell.join("detector");
        let config = entry.resolve(&raw(&det.options), false)?;
        // Evaluation-only detectors (adversarial_abstraction) are built per evaluation.
        let source = if entry.load.is_none() {
            DetectorSource::Config {
                kind: kind.into(),
                config,
            }
        } else {
            // config.json is written last: with it the detector run is complete.
            let fitted = det_dir.join(crate::run::DETECTOR_CONFIG_FILE).is_file();
            if !fitted && !mixes.iter().all(|(m, _)| done(m)) {
                crate::progress::note(
                    opts.progress,
                    &format!("cell {} x {}: fitting", task.name, det.name),
                );
                let detector = registry.build_detector(kind, &config)?;
                let out = Output {
                    dir: Some(&det_dir),
                    overwrite: true,
                    progress: opts.progress,
                };
                let fit = FitOptions {
                    seed: task.seed,
                    layer_aggregation: det.layer_aggregation.unwrap_or_default(),
                    ..Default::default()
                };
                train_detector(build_task(&Vec::new())?.as_ref(), detector, &fit, &out)?;
            }
            DetectorSource::Run(det_dir)
        };
        let mut rows = Vec::new();
        for (mix, extra) in &mixes {
            let dir = eval_dir(mix);
            let report: EvalReport = if done(mix) {
                crate::progress::note(
                    opts.progress,
                    &format!(
                        "cell {} x {} ({mix}): done before, skipped",
                        task.name, det.name
                    ),
                );
                serde_json::from_str(&std::fs::read_to_string(dir.join(EVAL_FILE))?)?
            } else {
                let eval = EvalOptions {
                    registry,
                    batch_size: 2048,
                    seed: task.seed,
                    aggregation: det.layer_aggregation,
                };
                let out = Output {
                    dir: Some(&dir),
                    overwrite: true,
                    progress: opts.progress,
                };
                let t = build_task(extra)?;
                eval_detector(t.as_ref(), &source, &eval, &out)?
            };
            let fit: Option<FitReport> =
                std::fs::read_to_string(cell.join("detector").join(FIT_FILE))
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok());
            let row = Cell {
                task,
                det,
                eval: Some(&report),
                fit: fit.as_ref(),
                classifier: Some(metrics),
            };
            let all = self.row(&row, mix, None);
            // Each layer's own AUROC and AP (no FPR@95 per layer in eval.json).
            let layers: Vec<CellResult> = report
                .layers
                .iter()
                .map(|l| CellResult {
                    layer: l.layer.clone(),
                    auc_roc: Some(l.auc_roc),
                    ap: Some(l.ap),
                    fpr_at_95_tpr: None,
                    ..all.clone()
                })
                .collect();
            rows.push(all);
            rows.extend(layers);
        }
        Ok(rows)
    }

    fn row(&self, cell: &Cell<'_>, mix: &str, error: Option<String>) -> CellResult {
        let Cell {
            task,
            det,
            eval: r,
            fit,
            classifier: m,
        } = *cell;
        CellResult {
            suite: self.name.clone(),
            task: task.name.clone(),
            detector: det.name.clone(),
            mix: mix.into(),
            layer: ALL.into(),
            auc_roc: r.map(|r| r.auc_roc),
            ap: r.map(|r| r.ap),
            fpr_at_95_tpr: r.map(|r| r.fpr_at_95_tpr),
            score_seconds: r.map(|r| r.score_seconds),
            fit_seconds: fit.map(|f| f.fit_seconds),
            train_seconds: m.map(|m| m.train_seconds),
            clean_accuracy: m.map(|m| m.clean_test_accuracy),
            attack_success: m.and_then(|m| m.attack_success_rate),
            adapter: r.map(|r| r.adapter.clone()),
            error,
            cupbearer_version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

impl Suite {
    /// `heatmap.svg`: AUROC per (task, mix) row and detector column.
    fn heatmap(&self, path: &Path, results: &[CellResult]) -> Result<()> {
        let cols: Vec<String> = self.detectors.iter().map(|d| d.name.clone()).collect();
        let mut rows: Vec<(String, String)> = Vec::new();
        for r in results {
            let key = (r.task.clone(), r.mix.clone());
            if r.error.is_none() && !rows.contains(&key) {
                rows.push(key);
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        let values = rows
            .iter()
            .map(|(task, mix)| {
                cols.iter()
                    .map(|d| {
                        results
                            .iter()
                            .find(|r| {
                                &r.task == task
                                    && &r.mix == mix
                                    && &r.detector == d
                                    && r.layer == ALL
                            })
                            .and_then(|r| r.auc_roc)
                    })
                    .collect()
            })
            .collect::<Vec<_>>();
        let labels: Vec<String> = rows.iter().map(|(t, m)| format!("{t} / {m}")).collect();
        let title = format!("suite {}: AUROC", self.name);
        crate::eval::plots::heatmap_svg(path, &title, &labels, &cols, &values)
    }
}

fn num(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| format!("{v:.4}"))
}

fn csv(results: &[CellResult]) -> String {
    let mut s = String::from(
        "suite,task,detector,mix,layer,auc_roc,ap,fpr_at_95_tpr,fit_seconds,score_seconds,\
         train_seconds,clean_accuracy,attack_success,adapter,cupbearer_version,error\n",
    );
    for r in results {
        let error = r.error.as_deref().unwrap_or("").replace(['"', '\n'], "'");
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},\"{}\",{},\"{error}\"",
            r.suite,
            r.task,
            r.detector,
            r.mix,
            r.layer,
            num(r.auc_roc),
            num(r.ap),
            num(r.fpr_at_95_tpr),
            num(r.fit_seconds),
            num(r.score_seconds),
            num(r.train_seconds),
            num(r.clean_accuracy),
            num(r.attack_success),
            r.adapter.as_deref().unwrap_or(""),
            r.cupbearer_version,
        );
    }
    s
}

/// Tasks (and their mixes) as rows, detectors as columns: AUROC / AP, the best per row
/// in bold; failed cells say so.
fn leaderboard(suite: &Suite, results: &[CellResult]) -> String {
    let detectors: Vec<&str> = suite.detectors.iter().map(|d| d.name.as_str()).collect();
    let mut s = format!("# Suite `{}`: AUROC / AP\n\n| task | mix |", suite.name);
    for d in &detectors {
        let _ = write!(s, " {d} |");
    }
    s.push_str("\n|---|---|");
    s.push_str(&"---|".repeat(detectors.len()));
    s.push('\n');
    let mut rows: Vec<(&str, &str)> = Vec::new();
    for r in results {
        if !rows.contains(&(r.task.as_str(), r.mix.as_str())) {
            rows.push((&r.task, &r.mix));
        }
    }
    for (task, mix) in rows {
        let cell = |d: &str| {
            results.iter().find(|r| {
                r.task == task
                    && r.detector == d
                    && r.layer == ALL
                    && (r.mix == mix || r.error.is_some())
            })
        };
        let best = detectors
            .iter()
            .filter_map(|d| cell(d).and_then(|r| r.auc_roc))
            .fold(f64::NAN, f64::max);
        let _ = write!(s, "| {task} | {mix} |");
        for d in &detectors {
            let text = match cell(d) {
                Some(CellResult { error: Some(_), .. }) => "failed".to_string(),
                Some(r) => {
                    let t = format!("{} / {}", num(r.auc_roc), num(r.ap));
                    if r.auc_roc == Some(best) {
                        format!("**{t}**")
                    } else {
                        t
                    }
                }
                None => String::new(),
            };
            let _ = write!(s, " {text} |");
        }
        s.push('\n');
    }
    s
}
