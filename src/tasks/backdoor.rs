//! The backdoor task: is an input carrying a backdoor trigger?
//!
//! Trusted data: the clean training split of the classifier's data set. Normal test
//! data: the clean test split. Anomalous test data: the task's trigger (on every
//! sample) on the test split; the original took the training split, which overlaps the
//! fitting data (`anomalous_split: train` reproduces that).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::{mix_sizes, SampleSpec, Source, Splits, Task, TestMix};
use crate::data::backdoor::Backdoor;
use crate::data::{Dataset, Split};
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
}

pub struct BackdoorTask {
    config: BackdoorTaskConfig,
    run: ClassifierRun,
    splits: Splits,
}

impl BackdoorTask {
    pub fn new(config: BackdoorTaskConfig, data_dir: &Path) -> Result<Self> {
        let run = ClassifierRun::load(&config.run_path)?;
        config
            .backdoor
            .validate(run.model.config.output_dim)
            .context("task backdoor")?;
        Ok(BackdoorTask {
            splits: Splits::new(run.config.train_data.dataset, data_dir),
            config,
            run,
        })
    }

    pub fn build(config: &serde_json::Value, data_dir: &Path) -> Result<Box<dyn Task>> {
        let config = serde_json::from_value(config.clone()).context("backdoor task config")?;
        Ok(Box::new(BackdoorTask::new(config, data_dir)?))
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
        let available = self.dataset(Split::Train)?.len();
        let n = self.config.max_train_size.unwrap_or(available);
        if n == 0 || n > available {
            anyhow::bail!("max_train_size {n} out of range 1..={available}");
        }
        Ok(SampleSpec {
            source: Source::Data(Split::Train),
            indices: (0..n as u32).collect(),
            backdoor: None,
        })
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
