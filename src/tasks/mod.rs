//! Tasks: what a detector is trained and tested on. A task provides the classifier,
//! trusted (clean) samples to fit on, and a test mix of normal and anomalous samples.
//!
//! To add one: write `src/tasks/<name>.rs` with a config struct, the [`Task`] impl and a
//! [`crate::registry::TaskEntry`], and add one line to
//! [`crate::registry::Registry::builtin`] (or register it at run time from your own crate).

pub mod adversarial;
pub mod backdoor;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Result};

use crate::data::backdoor::Backdoor;
use crate::data::{Dataset, DatasetName, Split};
use crate::gpu::batch::GpuDataset;
use crate::gpu::GpuContext;
use crate::run::ClassifierRun;

/// A task data set's splits, each loaded on first use (commands need only some).
pub struct Splits {
    name: DatasetName,
    data_dir: PathBuf,
    train: OnceLock<Dataset>,
    test: OnceLock<Dataset>,
}

impl Splits {
    pub fn new(name: DatasetName, data_dir: &Path) -> Self {
        Splits {
            name,
            data_dir: data_dir.to_path_buf(),
            train: OnceLock::new(),
            test: OnceLock::new(),
        }
    }

    pub fn get(&self, split: Split) -> Result<&Dataset> {
        let cell = match split {
            Split::Train => &self.train,
            Split::Test => &self.test,
        };
        if cell.get().is_none() {
            let _ = cell.set(Dataset::load(self.name, split, &self.data_dir)?);
        }
        Ok(cell.get().expect("initialised above"))
    }
}

/// Where samples come from: a split of the task's data set, or images the task
/// computed from one (adversarial examples).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    Data(Split),
    Adversarial(Split),
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Data(Split::Train) => "train",
            Source::Data(Split::Test) => "test",
            Source::Adversarial(Split::Test) => "adversarial",
            Source::Adversarial(Split::Train) => "adversarial_train",
        }
    }
}

/// The sample-order key of the trusted / untrusted split: no training epoch uses it.
const SPLIT_EPOCH: u32 = u32::MAX - 1;

/// How a task divides its training samples: a `trusted_fraction` of them stays trusted
/// (clean), the rest is untrusted, of which a `clean_train_weight` share stays clean and
/// the rest is made anomalous.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainSplit {
    pub max_train_size: Option<usize>,
    pub trusted_fraction: f64,
    pub clean_train_weight: f64,
    pub seed: u32,
}

/// The training split's indices, divided.
pub struct TrainParts {
    pub trusted: Vec<u32>,
    pub untrusted_clean: Vec<u32>,
    pub untrusted_anomalous: Vec<u32>,
}

impl TrainSplit {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("trusted_fraction", self.trusted_fraction),
            ("clean_train_weight", self.clean_train_weight),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!("{name} must be in [0, 1], got {v}");
            }
        }
        Ok(())
    }

    /// The parts of `available` training samples (the first `max_train_size`): all
    /// trusted in order when `trusted_fraction` is 1, else a seeded permutation cut at
    /// the fraction, its untrusted part cut at the clean weight.
    pub fn parts(&self, available: usize) -> Result<TrainParts> {
        let n = self.max_train_size.unwrap_or(available);
        if n == 0 || n > available {
            bail!("max_train_size {n} out of range 1..={available}");
        }
        if self.trusted_fraction >= 1.0 {
            return Ok(TrainParts {
                trusted: (0..n as u32).collect(),
                untrusted_clean: Vec::new(),
                untrusted_anomalous: Vec::new(),
            });
        }
        let mut trusted = crate::rng::shuffled_indices(n, self.seed, SPLIT_EPOCH);
        let mut untrusted_clean =
            trusted.split_off((n as f64 * self.trusted_fraction).round() as usize);
        let clean = (untrusted_clean.len() as f64 * self.clean_train_weight).round() as usize;
        let untrusted_anomalous = untrusted_clean.split_off(clean);
        Ok(TrainParts {
            trusted,
            untrusted_clean,
            untrusted_anomalous,
        })
    }
}

/// Serde default of a trusted fraction: all trusted (configs from before the split).
pub(crate) fn all_trusted() -> f64 {
    1.0
}

/// Serde default of a clean train weight: the upstream's 0.5.
pub(crate) fn half_clean() -> f64 {
    0.5
}

/// Samples of one source, optionally triggered.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleSpec {
    pub source: Source,
    pub indices: Vec<u32>,
    pub backdoor: Option<Backdoor>,
}

/// Untrusted training samples of one source and trigger, with their anomaly label
/// (which only label-supervised detectors, the probe skyline, may read).
#[derive(Clone, Debug, PartialEq)]
pub struct Untrusted {
    pub samples: SampleSpec,
    pub anomalous: bool,
}

/// The evaluation mix: normal samples are labelled 0, anomalous ones 1.
#[derive(Clone, Debug, PartialEq)]
pub struct TestMix {
    pub normal: SampleSpec,
    pub anomalous: SampleSpec,
}

pub trait Task {
    fn kind(&self) -> &'static str;
    fn config(&self) -> serde_json::Value;
    /// The classifier under test.
    fn classifier(&self) -> &ClassifierRun;
    /// A split of the task's data set, loaded on first use (commands need only some).
    fn dataset(&self, split: Split) -> Result<&Dataset>;
    /// Uploads the samples of `source`; tasks with computed images override this.
    fn upload(&self, ctx: &GpuContext, source: Source) -> Result<GpuDataset> {
        match source {
            Source::Data(split) => GpuDataset::upload(ctx, &self.dataset(split)?.as_images()),
            Source::Adversarial(_) => {
                bail!("the {} task has no adversarial examples", self.kind())
            }
        }
    }
    /// Computes what [`Task::test_mix`] and [`Task::untrusted`] samples need on the GPU
    /// (the adversarial task's examples, when not stored yet); evaluation, and fitting
    /// on untrusted data, call it first.
    fn prepare(&self, _ctx: &GpuContext, _progress: bool) -> Result<()> {
        Ok(())
    }
    /// Trusted data to fit detectors on (clean).
    fn trusted(&self) -> Result<SampleSpec>;
    /// Untrusted training data: clean and anomalous samples mixed, one spec per source
    /// and trigger (the detector is not told which is which); none by default.
    fn untrusted(&self) -> Result<Vec<Untrusted>> {
        Ok(Vec::new())
    }
    fn test_mix(&self) -> Result<TestMix>;
}

/// Sizes of the normal and anomalous parts of a test mix, as the original computes
/// them: with `max_size`, `floor(max·w)` normal and the rest anomalous; otherwise the
/// largest mix with normal fraction `w` that the available samples allow.
pub fn mix_sizes(
    normal_available: usize,
    anomalous_available: usize,
    normal_weight: f64,
    max_size: Option<usize>,
) -> Result<(usize, usize)> {
    if !(normal_weight > 0.0 && normal_weight < 1.0) {
        bail!("normal_weight must be in (0, 1), got {normal_weight}");
    }
    let (normal, anomalous) = match max_size {
        Some(m) => {
            let normal = (m as f64 * normal_weight) as usize;
            (normal, m - normal)
        }
        None => {
            let len = ((normal_available as f64 / normal_weight) as usize)
                .min((anomalous_available as f64 / (1.0 - normal_weight)) as usize);
            let normal = (len as f64 * normal_weight) as usize;
            (normal, len - normal)
        }
    };
    if normal > normal_available || anomalous > anomalous_available {
        bail!(
            "a test mix of {normal} normal and {anomalous} anomalous samples needs more data \
             than available ({normal_available} normal, {anomalous_available} anomalous)"
        );
    }
    if normal == 0 || anomalous == 0 {
        bail!("the test mix would be empty on one side ({normal} normal, {anomalous} anomalous)");
    }
    Ok((normal, anomalous))
}
