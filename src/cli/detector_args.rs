//! Task and detector flags shared by `train-detector` and `eval-detector`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

use crate::data::backdoor::{Backdoor, Corner, Trigger};
use crate::detectors::abstraction::{AbstractionConfig, AbstractionKind, OutputLoss};
use crate::detectors::adversarial_abstraction::AdversarialAbstractionConfig;
use crate::detectors::mahalanobis::MahalanobisConfig;
use crate::detectors::pipeline::DetectorSource;
use crate::model::attack::{AttackConfig, AttackMethod, DEFAULT_EPS, DEFAULT_PGD_STEPS};
use crate::tasks::adversarial::AdversarialTaskConfig;
use crate::tasks::backdoor::{AnomalousSplit, BackdoorTaskConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TaskKind {
    Backdoor,
    #[value(name = "adversarial_examples", alias = "adversarial-examples")]
    AdversarialExamples,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TriggerKind {
    Corner,
    Noise,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SplitArg {
    Test,
    Train,
}

#[derive(clap::Args)]
pub struct TaskArgs {
    /// The task: `backdoor` (are inputs carrying a trigger?) or `adversarial_examples`
    /// (are inputs adversarial examples of the classifier?).
    #[arg(long, value_enum)]
    task: TaskKind,
    /// The classifier run directory (from train-classifier).
    #[arg(long, value_name = "DIR")]
    task_run_path: PathBuf,
    /// Backdoor task: the anomalies' trigger, corner or noise.
    #[arg(long, value_enum, value_name = "TRIGGER")]
    task_backdoor: Option<TriggerKind>,
    #[arg(long, default_value = "top-left", value_name = "CORNER")]
    task_backdoor_corner: Corner,
    #[arg(long, default_value_t = 0, value_name = "CLASS")]
    task_backdoor_target_class: u32,
    #[arg(long, default_value_t = 0.3, value_name = "STD")]
    task_backdoor_std: f32,
    /// Clip noisy images to [0, 1] (the original 0.0.1 did not).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    task_backdoor_clip: bool,
    /// Fraction of anomalous samples that actually get the trigger.
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    task_backdoor_p_backdoor: f32,
    /// Fit on the first N trusted (training) samples only.
    #[arg(long, value_name = "N")]
    task_max_train_size: Option<usize>,
    /// Total size of the test mix.
    #[arg(long, value_name = "N")]
    task_max_test_size: Option<usize>,
    /// Fraction of normal samples in the test mix.
    #[arg(long, default_value_t = 0.5, value_name = "W")]
    task_normal_weight: f64,
    /// Split the anomalies come from: test (default) or train (the original's choice,
    /// which overlaps the fitting data).
    #[arg(long, value_enum, default_value = "test", value_name = "SPLIT")]
    task_anomalous_split: SplitArg,
    /// Adversarial task, when RUN/adv_examples.safetensors must be made: the attack.
    #[arg(long, value_enum, default_value = "fgsm", value_name = "METHOD")]
    task_attack: AttackMethod,
    /// Adversarial task: the attack's L∞ radius.
    #[arg(long, default_value_t = DEFAULT_EPS, value_name = "EPS")]
    task_eps: f32,
    /// Adversarial task: PGD steps.
    #[arg(long, default_value_t = DEFAULT_PGD_STEPS, value_name = "N")]
    task_steps: usize,
    /// Adversarial task: PGD step size [default: 2.5·eps/steps].
    #[arg(long, value_name = "S")]
    task_step_size: Option<f32>,
    /// Adversarial task: samples per attack batch.
    #[arg(long, default_value_t = 128, value_name = "N")]
    task_attack_batch_size: usize,
    /// Adversarial task: fail when the accuracy after the attack is above this.
    #[arg(long, default_value_t = 0.1, value_name = "ACC")]
    task_success_threshold: f64,
    /// Adversarial task: keep only examples the classifier gets wrong.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    task_only_successful: bool,
}

impl TaskArgs {
    /// `--debug`: 2 trusted samples, a test mix of 2, attacks of batch 1 that may fail.
    pub fn debug(&mut self) {
        (self.task_max_train_size, self.task_max_test_size) = (Some(2), Some(2));
        (self.task_attack_batch_size, self.task_success_threshold) = (1, 1.0);
    }

    /// (registry name, JSON config).
    pub fn resolve(&self, seed: u32) -> Result<(&'static str, serde_json::Value)> {
        match self.task {
            TaskKind::Backdoor => self.backdoor(),
            TaskKind::AdversarialExamples => {
                let mut attack = AttackConfig::new(
                    self.task_attack,
                    self.task_eps,
                    self.task_steps,
                    self.task_step_size,
                );
                (attack.batch_size, attack.seed) = (self.task_attack_batch_size, seed);
                let config = AdversarialTaskConfig {
                    run_path: self.task_run_path.clone(),
                    attack,
                    success_threshold: self.task_success_threshold,
                    only_successful: self.task_only_successful,
                    max_train_size: self.task_max_train_size,
                    max_test_size: self.task_max_test_size,
                    normal_weight: self.task_normal_weight,
                };
                Ok(("adversarial_examples", serde_json::to_value(config)?))
            }
        }
    }

    fn backdoor(&self) -> Result<(&'static str, serde_json::Value)> {
        let Some(kind) = self.task_backdoor else {
            bail!("--task backdoor needs --task.backdoor corner|noise (the anomalies' trigger)");
        };
        let trigger = match kind {
            TriggerKind::Corner => Trigger::Corner {
                corner: self.task_backdoor_corner,
            },
            TriggerKind::Noise => Trigger::Noise {
                std: self.task_backdoor_std,
                clip: self.task_backdoor_clip,
            },
        };
        let config = BackdoorTaskConfig {
            run_path: self.task_run_path.clone(),
            backdoor: Backdoor {
                trigger,
                p_backdoor: self.task_backdoor_p_backdoor,
                target_class: self.task_backdoor_target_class,
            },
            max_train_size: self.task_max_train_size,
            max_test_size: self.task_max_test_size,
            normal_weight: self.task_normal_weight,
            anomalous_split: match self.task_anomalous_split {
                SplitArg::Test => AnomalousSplit::Test,
                SplitArg::Train => AnomalousSplit::Train,
            },
        };
        Ok(("backdoor", serde_json::to_value(config)?))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DetectorKind {
    Mahalanobis,
    Abstraction,
    /// Evaluation only: finetunes an abstraction (--detector.load_path) per test batch.
    #[value(name = "adversarial_abstraction", alias = "adversarial-abstraction")]
    AdversarialAbstraction,
    /// A detector trained earlier (--detector.path).
    #[value(name = "from_run", alias = "from-run")]
    FromRun,
}

#[derive(Clone, clap::Args)]
pub struct DetectorArgs {
    #[arg(long, value_enum)]
    pub detector: DetectorKind,
    /// Detector run directory (with --detector from_run).
    #[arg(long, value_name = "DIR")]
    pub detector_path: Option<PathBuf>,
    /// Hidden layers to use (0 = first) [default: all].
    #[arg(long, num_args = 1.., value_name = "L")]
    detector_layers: Vec<usize>,
    /// Pseudo-inverse cutoff relative to the largest eigenvalue.
    #[arg(long, default_value_t = 1e-5, value_name = "R")]
    detector_train_rcond: f64,
    /// The original's simplified relative Mahalanobis distance.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    detector_train_relative: bool,
    /// Shrink the covariance towards tr(Σ)/d·I by this fraction.
    #[arg(long, default_value_t = 0.0, value_name = "S")]
    detector_train_shrinkage: f64,
    /// Add ε·I to the covariance (weights zero-variance directions such as a trigger pixel).
    #[arg(long, default_value_t = 0.0, value_name = "EPS")]
    detector_train_ridge: f64,
    /// Samples per batch while fitting [default: mahalanobis 2048 (the original: 4096;
    /// 2048 keeps peak memory under 300 MB on MNIST at the same speed), abstraction 128].
    #[arg(long, value_name = "N")]
    detector_train_batch_size: Option<usize>,
    /// Abstraction: the τ maps, simple (affine, reduced width) or axis_aligned
    /// (elementwise gates, full width).
    #[arg(long, value_enum, default_value = "simple", value_name = "KIND")]
    detector_abstraction: AbstractionKind,
    /// Abstraction: abstract state width = layer width / this (simple only).
    #[arg(long, default_value_t = 4.0, value_name = "R")]
    detector_abstraction_size_reduction: f64,
    /// Abstraction: output loss, kl or single_class.
    #[arg(long, value_enum, default_value = "kl", value_name = "LOSS")]
    detector_abstraction_output_loss_fn: OutputLoss,
    /// Abstraction: training epochs.
    #[arg(long, default_value_t = 10, value_name = "N")]
    detector_train_num_epochs: usize,
    /// Abstraction: Adam learning rate.
    #[arg(
        long,
        alias = "detector-train-learning-rate",
        default_value_t = 1e-3,
        value_name = "LR"
    )]
    detector_train_optimizer_learning_rate: f32,
    /// Abstraction: stop after this many steps.
    #[arg(long, value_name = "N")]
    detector_train_max_steps: Option<usize>,
    /// Accepted for compatibility: Adam is the only optimiser.
    #[arg(long, value_enum, value_name = "OPT")]
    detector_train_optimizer: Option<super::Optimizer>,
    /// Accepted for compatibility (the original's validation sets never worked).
    #[arg(long, value_name = "N")]
    detector_train_check_val_every_n_epoch: Option<usize>,
    /// Accepted for compatibility (progress bars follow --quiet).
    #[arg(long, action = clap::ArgAction::Set, value_name = "BOOL")]
    detector_train_enable_progress_bar: Option<bool>,
    /// Accepted for compatibility: the original's class path of the abstraction; use
    /// --detector.abstraction simple|axis_aligned.
    #[arg(long, value_name = "CLASS")]
    detector_abstraction_cls: Option<String>,
    /// Fit on at most this many batches (0 = all).
    #[arg(long, default_value_t = 0, value_name = "N")]
    detector_train_max_batches: usize,
    /// Accepted for compatibility (progress bars follow --quiet).
    #[arg(long, action = clap::ArgAction::Set, value_name = "BOOL")]
    detector_train_pbar: Option<bool>,
    /// Mahalanobis: divide each layer's distance by its width; abstraction: standardise
    /// each layer's score on trusted data. `false` reproduces cupbearer 0.0.1.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    detector_normalize: bool,
    /// Samples per GPU batch while scoring (adversarial_abstraction: per finetuned
    /// test batch).
    #[arg(long, default_value_t = 2048, value_name = "N")]
    detector_max_batch_size: usize,
    /// Adversarial abstraction: a trained abstraction detector run [default: random].
    #[arg(long, value_name = "DIR")]
    detector_load_path: Option<PathBuf>,
    /// Adversarial abstraction: trusted samples per finetuning step.
    #[arg(long, default_value_t = 128, value_name = "N")]
    detector_num_train_samples: usize,
    /// Adversarial abstraction: finetuning steps per test batch.
    #[arg(long, default_value_t = 1, value_name = "N")]
    detector_num_steps: usize,
    /// Adversarial abstraction: weight of the trusted loss.
    #[arg(long, default_value_t = 0.5, value_name = "W")]
    detector_normal_weight: f64,
    /// Adversarial abstraction: no trusted gradient below the trusted loss's level.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    detector_clip: bool,
}

impl DetectorArgs {
    /// `--debug`: batches of 2, one fitting batch.
    pub fn debug(&mut self) {
        (self.detector_num_train_samples, self.detector_num_steps) = (1, 1);
        (
            self.detector_train_batch_size,
            self.detector_train_max_batches,
        ) = (Some(2), 1);
        (
            self.detector_train_num_epochs,
            self.detector_train_max_steps,
        ) = (1, Some(1));
        self.detector_max_batch_size = 2;
    }

    /// (registry name, JSON config) of a new detector.
    pub fn resolve(&self) -> Result<(&'static str, serde_json::Value)> {
        match self.detector {
            DetectorKind::Mahalanobis => {
                let config = MahalanobisConfig {
                    layers: self.detector_layers.clone(),
                    rcond: self.detector_train_rcond,
                    relative: self.detector_train_relative,
                    shrinkage: self.detector_train_shrinkage,
                    ridge: self.detector_train_ridge,
                    normalize: self.detector_normalize,
                    batch_size: self.detector_train_batch_size.unwrap_or(2048),
                    max_batches: self.detector_train_max_batches,
                    ..Default::default()
                };
                Ok(("mahalanobis", serde_json::to_value(config)?))
            }
            DetectorKind::Abstraction => {
                let config = AbstractionConfig {
                    abstraction: self.detector_abstraction,
                    size_reduction: self.detector_abstraction_size_reduction,
                    output_loss_fn: self.detector_abstraction_output_loss_fn,
                    batch_size: self.detector_train_batch_size.unwrap_or(128),
                    num_epochs: self.detector_train_num_epochs,
                    learning_rate: self.detector_train_optimizer_learning_rate,
                    max_steps: self.detector_train_max_steps,
                    normalize: self.detector_normalize,
                };
                Ok(("abstraction", serde_json::to_value(config)?))
            }
            DetectorKind::AdversarialAbstraction => {
                let (_, abstraction) = Self {
                    detector: DetectorKind::Abstraction,
                    ..self.clone()
                }
                .resolve()?;
                let config = AdversarialAbstractionConfig {
                    load_path: self.detector_load_path.clone(),
                    num_train_samples: self.detector_num_train_samples,
                    num_steps: self.detector_num_steps,
                    normal_weight: self.detector_normal_weight,
                    clip: self.detector_clip,
                    learning_rate: self.detector_train_optimizer_learning_rate as f64,
                    abstraction: serde_json::from_value(abstraction)?,
                };
                Ok(("adversarial_abstraction", serde_json::to_value(config)?))
            }
            DetectorKind::FromRun => {
                bail!("--detector from_run loads a trained detector; train-detector needs a detector type such as mahalanobis")
            }
        }
    }

    /// What eval-detector scores with: a trained detector's directory, or an
    /// evaluation-only detector.
    pub fn source(&self) -> Result<DetectorSource> {
        match self.detector {
            DetectorKind::FromRun => {
                Ok(DetectorSource::Run(self.detector_path.clone().context(
                    "--detector from_run needs --detector.path DIR",
                )?))
            }
            DetectorKind::AdversarialAbstraction => {
                let (kind, config) = self.resolve()?;
                Ok(DetectorSource::Config {
                    kind: kind.into(),
                    config,
                })
            }
            _ => bail!(
                "eval-detector evaluates a trained detector: use --detector from_run \
                 --detector.path DIR (train one with train-detector)"
            ),
        }
    }

    pub fn eval_batch_size(&self) -> usize {
        self.detector_max_batch_size
    }
}

/// The flags of `train-detector` and `eval-detector`.
#[derive(clap::Args)]
pub struct DetectorCommandArgs {
    #[command(flatten)]
    pub task: TaskArgs,
    #[command(flatten)]
    pub detector: DetectorArgs,
    #[command(flatten)]
    pub common: super::CommonArgs,
}

impl DetectorCommandArgs {
    /// Applies `--debug`'s tiny sizes.
    pub fn apply_debug(&mut self) {
        if self.common.debug {
            self.task.debug();
            self.detector.debug();
        }
    }
}
