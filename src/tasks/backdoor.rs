//! The backdoor task: is an input carrying a backdoor trigger?
//!
//! Trusted data: the clean training split of the classifier's data set. Normal test
//! data: the clean test split. Anomalous test data: the task's trigger (on every
//! sample) on the test split; the original took the training split, which overlaps the
//! fitting data (`anomalous_split: train` reproduces that).

use std::path::{Path, PathBuf};

use serde_json::Value;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{
    mix_sizes, SampleSpec, Source, Splits, Task, TestMix, TrainParts, TrainSplit, Untrusted,
};
use crate::data::backdoor::{Backdoor, Corner, Trigger, DEFAULT_NOISE_STD};
use crate::data::{Dataset, Split};
use crate::registry::{defaults_of, opt, ConfigSpec, Kind, Opt, TaskEntry, TaskEnv};
use crate::run::ClassifierRun;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalousSplit {
    Test,
    Train,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackdoorTaskConfig {
    /// The classifier run directory.
    pub run_path: PathBuf,
    /// The trigger of the anomalies (independent of the classifier's training one).
    pub backdoor: Backdoor,
    pub max_train_size: Option<usize>,
    pub max_test_size: Option<usize>,
    pub normal_weight: f64,
    pub anomalous_split: AnomalousSplit,
    /// Fraction of the training samples kept as trusted (clean) data; the rest is
    /// untrusted (absent in run dirs from before untrusted data: all trusted).
    #[serde(default = "super::all_trusted")]
    pub trusted_fraction: f64,
    /// Share of clean samples in the untrusted part; the others carry the trigger.
    #[serde(default = "super::half_clean")]
    pub clean_train_weight: f64,
}

impl Default for BackdoorTaskConfig {
    /// The original's defaults (the run path is required).
    fn default() -> Self {
        BackdoorTaskConfig {
            run_path: PathBuf::new(),
            backdoor: Backdoor {
                trigger: Trigger::Corner {
                    corner: Corner::TopLeft,
                },
                p_backdoor: 1.0,
                target_class: 0,
            },
            max_train_size: None,
            max_test_size: None,
            normal_weight: 0.5,
            anomalous_split: AnomalousSplit::Test,
            trusted_fraction: 1.0,
            clean_train_weight: 0.5,
        }
    }
}

pub struct BackdoorTask {
    config: BackdoorTaskConfig,
    run: ClassifierRun,
    splits: Splits,
    /// Draws the trusted / untrusted split.
    seed: u32,
}

impl BackdoorTask {
    pub fn new(mut config: BackdoorTaskConfig, data_dir: &Path, seed: u32) -> Result<Self> {
        let task = BackdoorTask::split_of(&config, seed);
        task.validate()?;
        let run = ClassifierRun::load(&config.run_path)?;
        if let Trigger::Wanet { .. } = config.backdoor.trigger {
            // The anomalies carry the classifier's own field (no noise mode).
            let trained = run
                .config
                .train_data
                .backdoor
                .filter(|b| b.wanet_grid().is_some());
            let Some(trained) = trained else {
                bail!(
                    "--task.backdoor wanet needs a classifier trained with a WaNet trigger \
                     (its field is the trigger); {} was not",
                    config.run_path.display()
                );
            };
            trained.check_stored_grid(&config.run_path)?;
            config.backdoor.trigger = trained.always().trigger;
        }
        config
            .backdoor
            .validate(run.model.config.output_dim)
            .context("task backdoor")?;
        Ok(BackdoorTask {
            splits: Splits::new(run.config.train_data.dataset, data_dir),
            config,
            run,
            seed,
        })
    }

    pub fn build(config: &serde_json::Value, env: &TaskEnv) -> Result<Box<dyn Task>> {
        let config = serde_json::from_value(config.clone()).context("backdoor task config")?;
        Ok(Box::new(BackdoorTask::new(
            config,
            &env.data_dir,
            env.seed,
        )?))
    }
}

impl BackdoorTask {
    fn split_of(config: &BackdoorTaskConfig, seed: u32) -> TrainSplit {
        TrainSplit {
            max_train_size: config.max_train_size,
            trusted_fraction: config.trusted_fraction,
            clean_train_weight: config.clean_train_weight,
            seed,
        }
    }

    fn parts(&self) -> Result<TrainParts> {
        BackdoorTask::split_of(&self.config, self.seed).parts(self.dataset(Split::Train)?.len())
    }
}

impl Task for BackdoorTask {
    fn kind(&self) -> &'static str {
        "backdoor"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("plain struct serialises")
    }

    fn classifier(&self) -> &ClassifierRun {
        &self.run
    }

    fn dataset(&self, split: Split) -> Result<&Dataset> {
        self.splits.get(split)
    }

    fn trusted(&self) -> Result<SampleSpec> {
        let trusted = self.parts()?.trusted;
        if trusted.is_empty() {
            anyhow::bail!("the task keeps no trusted samples (trusted_fraction 0)");
        }
        Ok(SampleSpec {
            source: Source::Data(Split::Train),
            indices: trusted,
            backdoor: None,
        })
    }

    fn untrusted(&self) -> Result<Vec<Untrusted>> {
        let parts = self.parts()?;
        let spec = |indices: Vec<u32>, backdoor: Option<Backdoor>| Untrusted {
            anomalous: backdoor.is_some(),
            samples: SampleSpec {
                source: Source::Data(Split::Train),
                indices,
                backdoor,
            },
        };
        Ok([
            spec(parts.untrusted_clean, None),
            spec(parts.untrusted_anomalous, Some(self.config.backdoor)),
        ]
        .into_iter()
        .filter(|u| !u.samples.indices.is_empty())
        .collect())
    }

    fn test_mix(&self) -> Result<TestMix> {
        let anomalous_split = match self.config.anomalous_split {
            AnomalousSplit::Test => Split::Test,
            AnomalousSplit::Train => Split::Train,
        };
        let (normal, anomalous) = mix_sizes(
            self.dataset(Split::Test)?.len(),
            self.dataset(anomalous_split)?.len(),
            self.config.normal_weight,
            self.config.max_test_size,
        )?;
        Ok(TestMix {
            normal: SampleSpec {
                source: Source::Data(Split::Test),
                indices: (0..normal as u32).collect(),
                backdoor: None,
            },
            anomalous: SampleSpec {
                source: Source::Data(anomalous_split),
                indices: (0..anomalous as u32).collect(),
                backdoor: Some(self.config.backdoor),
            },
        })
    }
}

/// The defaults, with the noise trigger's fields beside the corner's so that
/// `--task.backdoor noise` finds them.
fn defaults() -> Value {
    let mut config = defaults_of::<BackdoorTaskConfig>();
    let noise = Trigger::Noise {
        std: DEFAULT_NOISE_STD,
        clip: true,
    };
    // WaNet's fields are placeholders: the task takes the classifier's.
    let wanet = Trigger::Wanet {
        control_grid_width: 4,
        warping_strength: 0.5,
        grid_rescale: 1.0,
        p_noise: 0.0,
        grid_seed: 0,
    };
    let backdoor = config["backdoor"].as_object_mut().expect("an object");
    for t in [noise, wanet] {
        let t = serde_json::to_value(t).expect("triggers serialise");
        for (k, v) in t.as_object().expect("an object") {
            backdoor.entry(k.clone()).or_insert(v.clone());
        }
    }
    config
}

const fn required(o: Opt) -> Opt {
    Opt {
        required: true,
        ..o
    }
}

/// Options shared with the adversarial-examples task.
pub(super) const RUN_PATH: Opt = required(opt(
    "run_path",
    &["/run_path"],
    Kind::Str,
    "The classifier run directory (from train-classifier).",
));
pub(super) const MAX_TRAIN_SIZE: Opt = opt(
    "max_train_size",
    &["/max_train_size"],
    Kind::Int,
    "Fit on the first N trusted (training) samples only [none: all].",
);
pub(super) const MAX_TEST_SIZE: Opt = opt(
    "max_test_size",
    &["/max_test_size"],
    Kind::Int,
    "Total size of the test mix [none: the largest the data allow].",
);
pub(super) const NORMAL_WEIGHT: Opt = opt(
    "normal_weight",
    &["/normal_weight"],
    Kind::Float,
    "Fraction of normal samples in the test mix.",
);

pub(super) const TRUSTED_FRACTION: Opt = opt(
    "trusted_fraction",
    &["/trusted_fraction"],
    Kind::Float,
    "Fraction of the training samples kept trusted (clean); the rest is untrusted (seeded split).",
);
pub(super) const CLEAN_TRAIN_WEIGHT: Opt = opt(
    "clean_train_weight",
    &["/clean_train_weight"],
    Kind::Float,
    "Share of clean samples in the untrusted part; the others are anomalous (triggered, or adversarial examples).",
);

const OPTIONS: &[Opt] = &[
    RUN_PATH,
    required(opt("backdoor", &["/backdoor/kind"], Kind::Str, "The anomalies' trigger: corner, noise or wanet (the classifier's own warping field, from its run dir).")),
    opt("backdoor.corner", &["/backdoor/corner"], Kind::Str, "Corner trigger: top-left, top-right, bottom-left or bottom-right."),
    opt("backdoor.target_class", &["/backdoor/target_class"], Kind::Int, "The trigger's target class."),
    opt("backdoor.std", &["/backdoor/std"], Kind::Float, "Noise trigger: standard deviation."),
    opt("backdoor.clip", &["/backdoor/clip"], Kind::Bool, "Noise trigger: clip images to [0, 1] (the original 0.0.1 did not)."),
    opt("backdoor.p_backdoor", &["/backdoor/p_backdoor"], Kind::Float, "Fraction of anomalous samples that actually get the trigger."),
    MAX_TRAIN_SIZE,
    MAX_TEST_SIZE,
    NORMAL_WEIGHT,
    opt("anomalous_split", &["/anomalous_split"], Kind::Str, "Split the anomalies come from: test, or train (the original's choice, which overlaps the fitting data)."),
    TRUSTED_FRACTION,
    CLEAN_TRAIN_WEIGHT,
];

/// The registry entry.
pub const ENTRY: TaskEntry = TaskEntry {
    name: "backdoor",
    doc: "Are inputs carrying a trigger? Trusted: clean training images; anomalies: triggered test images.",
    config: ConfigSpec {
        defaults,
        options: OPTIONS,
        nested: &[],
        debug: &[("/max_train_size", "2"), ("/max_test_size", "2")],
    },
    build: BackdoorTask::build,
};
