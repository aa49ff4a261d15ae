//! The flags of `train-detector` and `eval-detector`. `--task` and `--detector` name
//! registry entries; every other `--task.<key>` / `--detector.<key>` flag is taken out of
//! the command line before clap sees it ([`split_options`]) and set in that entry's
//! config by the registry.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::detectors::Aggregation;
use crate::io::SaveDtype;
use crate::registry::{RawOptions, Registry, TaskEnv};
use crate::tasks::Task;
use crate::workflows::detector::DetectorSource;

/// `--detector` value that names a trained detector run (`--detector.path`).
const FROM_RUN: &str = "from_run";

/// The `--task.*` and `--detector.*` options of a command line.
#[derive(Clone, Debug, Default)]
pub struct EntryOptions {
    pub task: RawOptions,
    pub detector: RawOptions,
}

/// Flags clap parses itself, normalised ([`super::normalize_flag`]).
const FIXED: &[&str] = &[
    "--task",
    "--detector",
    "--detector-path",
    "--detector-max-batch-size",
    "--detector-layer-aggregation",
];

/// Takes the `--task.<key>` / `--detector.<key>` flags (any spelling) and their values
/// out of `args`, normalising the rest for clap: a flag's values are the following
/// arguments up to the next flag (`--key=value` gives one). Keys keep their spelling.
pub fn split_options(args: impl IntoIterator<Item = OsString>) -> (Vec<OsString>, EntryOptions) {
    let mut kept = Vec::new();
    let mut options = EntryOptions::default();
    let is_flag = |s: &str| s.starts_with('-') && s.parse::<f64>().is_err();
    let mut iter = args.into_iter().peekable();
    while let Some(arg) = iter.next() {
        let normalized = super::normalize_flag(arg.clone());
        let (Some(s), Some(n)) = (arg.to_str(), normalized.to_str()) else {
            kept.push(normalized);
            continue;
        };
        let (original, value) = match s.split_once('=') {
            Some((o, v)) => (o, Some(v.to_string())),
            None => (s, None),
        };
        let name = n.split_once('=').map_or(n, |(name, _)| name);
        // The prefixes `--task.` and `--detector.` are as long as their normal forms.
        let target = if FIXED.contains(&name) {
            None
        } else if name.starts_with("--task-") {
            Some((&mut options.task, &original["--task.".len()..]))
        } else if name.starts_with("--detector-") {
            Some((&mut options.detector, &original["--detector.".len()..]))
        } else {
            None
        };
        let Some((list, key)) = target else {
            kept.push(normalized);
            continue;
        };
        let mut values: Vec<String> = value.into_iter().collect();
        if values.is_empty() {
            while let Some(next) = iter.peek().and_then(|a| a.to_str()) {
                if is_flag(next) {
                    break;
                }
                values.push(next.to_string());
                iter.next();
            }
        }
        list.push((key.to_string(), values));
    }
    (kept, options)
}

#[derive(clap::Args)]
pub struct DetectorCommandArgs {
    /// The task (listed below with its --task.<key> options).
    #[arg(long, value_name = "TASK")]
    pub task: String,
    /// The detector (listed below with its --detector.<key> options); eval-detector
    /// takes `from_run` (a trained detector, --detector.path) or an evaluation-only one.
    #[arg(long, value_name = "DETECTOR")]
    pub detector: String,
    /// Detector run directory (with --detector from_run).
    #[arg(long, value_name = "DIR")]
    pub detector_path: Option<PathBuf>,
    /// Samples per GPU batch while scoring (adversarial_abstraction: per finetuned
    /// test batch).
    #[arg(long, default_value_t = 2048, value_name = "N")]
    pub detector_max_batch_size: usize,
    /// How layer scores combine: mean (of raw scores) or max (of each layer's score
    /// standardised on the fit data). train-detector records it as the run's default;
    /// eval-detector uses the run's unless given [default: mean].
    #[arg(long, value_parser = super::serde_enum::<Aggregation>, value_name = "mean|max")]
    pub detector_layer_aggregation: Option<Aggregation>,
    /// train-detector: precision of detector.safetensors (f32, f16 or bf16; read back
    /// transparently).
    #[arg(long, value_parser = super::serde_enum::<SaveDtype>, default_value = "f32", value_name = "DTYPE")]
    pub dtype: SaveDtype,
    #[command(flatten)]
    pub common: super::CommonArgs,
    /// Filled from the command line by [`split_options`].
    #[arg(skip)]
    pub options: EntryOptions,
}

impl DetectorCommandArgs {
    /// The task, built from its options.
    pub fn task(&self, registry: &Registry) -> Result<Box<dyn Task>> {
        let c = &self.common;
        let entry = registry.task(&self.task)?;
        let config = entry.resolve(&self.options.task, c.debug)?;
        let env = TaskEnv {
            data_dir: crate::data::resolve_data_dir(c.data_dir.as_deref()),
            seed: c.seed,
        };
        (entry.build)(&config, &env)
    }

    /// (registry name, JSON config) of the detector train-detector fits.
    pub fn new_detector(&self, registry: &Registry) -> Result<(&'static str, serde_json::Value)> {
        if is_from_run(&self.detector) {
            bail!(
                "--detector from_run loads a trained detector; train-detector needs a detector \
                 type such as mahalanobis"
            );
        }
        let entry = registry.detector(&self.detector)?;
        if entry.load.is_none() {
            bail!(
                "{} is evaluation-only: nothing to train; use it with eval-detector",
                entry.name
            );
        }
        Ok((
            entry.name,
            entry.resolve(&self.options.detector, self.common.debug)?,
        ))
    }

    /// What eval-detector scores with: a trained detector's directory, or an
    /// evaluation-only detector.
    pub fn source(&self, registry: &Registry) -> Result<DetectorSource> {
        if is_from_run(&self.detector) {
            if let Some((key, _)) = self.options.detector.first() {
                bail!(
                    "--detector.{key} does not apply to --detector from_run: the trained \
                     detector's options are stored in its run"
                );
            }
            let dir = self.detector_path.clone();
            return Ok(DetectorSource::Run(
                dir.context("--detector from_run needs --detector.path DIR")?,
            ));
        }
        let entry = registry.detector(&self.detector)?;
        if entry.load.is_some() {
            bail!(
                "eval-detector evaluates a trained detector: use --detector from_run \
                 --detector.path DIR (train one with train-detector --detector {})",
                entry.name
            );
        }
        Ok(DetectorSource::Config {
            kind: entry.name.into(),
            config: entry.resolve(&self.options.detector, self.common.debug)?,
        })
    }

    /// Scoring batch size (`--debug`: 2).
    pub fn eval_batch_size(&self) -> usize {
        if self.common.debug {
            2
        } else {
            self.detector_max_batch_size
        }
    }
}

fn is_from_run(name: &str) -> bool {
    name.replace('-', "_") == FROM_RUN
}
