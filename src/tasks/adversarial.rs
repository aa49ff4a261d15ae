//! The adversarial-examples task: is an input an adversarial example?
//!
//! Trusted data: the clean training split (or the `trusted_fraction` of it; the
//! untrusted rest mixes clean images with adversarial examples of the others,
//! `RUN/adv_examples_train.safetensors`). Anomalous test data: adversarial examples of
//! the classifier, `RUN/adv_examples.safetensors`, made in process on first use (the
//! original spawned `python`) from the test split. Normal test data: clean test images
//! that were not attacked (the original reused training data).
//!
//! [`attack_examples`] and [`store_examples`] also serve the `make-adversarial-examples`
//! workflow.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    mix_sizes, SampleSpec, Source, Splits, Task, TestMix, TrainParts, TrainSplit, Untrusted,
};
use crate::data::adversarial::{AdversarialExamples, AdversarialMeta};
use crate::data::{Dataset, Split};
use crate::eval::images::write_pairs_png;
use crate::gpu::batch::{FloatImages, GpuDataset};
use crate::gpu::GpuContext;
use crate::io::write_json;
use crate::model::attack::{attack, AttackConfig};
use crate::model::attack::{AttackMethod, DEFAULT_EPS, DEFAULT_PGD_STEPS};
use crate::model::GpuMlp;
use crate::registry::{defaults_of, opt, ConfigSpec, Kind, Opt, TaskEntry, TaskEnv};
use crate::run::ClassifierRun;

pub const EXAMPLES_FILE: &str = "adv_examples.safetensors";
pub const REPORT_FILE: &str = "adv_examples.json";
pub const GRID_FILE: &str = "adv_examples.png";
/// Adversarial examples of the untrusted training samples (`trusted_fraction` < 1),
/// and their report.
pub const TRAIN_EXAMPLES_FILE: &str = "adv_examples_train.safetensors";
pub const TRAIN_REPORT_FILE: &str = "adv_examples_train.json";

/// How to make adversarial examples of a classifier run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdversarialOptions {
    pub attack: AttackConfig,
    /// The split to attack.
    pub split: Split,
    /// Attack the first N samples of the split [default: half of it, leaving the other
    /// half as clean normal samples for the task].
    pub max_examples: Option<usize>,
    /// Fail if the accuracy after the attack is above this (the original: 0.1).
    pub success_threshold: f64,
    /// Keep only examples the classifier gets wrong after the attack.
    pub only_successful: bool,
}

/// `adv_examples.json`: the original's fields, plus ours.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdversarialReport {
    pub original_loss: f64,
    pub new_loss: f64,
    pub original_accuracy: f64,
    pub new_accuracy: f64,
    pub eps: f32,
    /// Examples attacked.
    pub num_attacked: usize,
    /// Examples stored (fewer than attacked with `only_successful`).
    pub num_examples: usize,
    pub options: AdversarialOptions,
    pub adapter: String,
    pub attack_seconds: f64,
}

/// Attacks the classifier of `run` on the first samples of `data` (already checked by
/// [`AdversarialOptions`]); nothing is written.
pub fn attack_examples(
    ctx: &GpuContext,
    run: &ClassifierRun,
    data: &Dataset,
    opts: &AdversarialOptions,
    progress: bool,
) -> Result<(AdversarialExamples, AdversarialReport)> {
    let n = opts.max_examples.unwrap_or(data.len() / 2).min(data.len());
    if n == 0 {
        bail!(
            "nothing to attack: {} has no samples (or max_examples is 0)",
            data.name
        );
    }
    let indices: Vec<u32> = (0..n as u32).collect();
    attack_samples(ctx, run, data, &indices, opts, progress)
}

/// Attacks the classifier of `run` on the samples `indices` of `data`
/// (`opts.max_examples` is not consulted); nothing is written.
pub fn attack_samples(
    ctx: &GpuContext,
    run: &ClassifierRun,
    data: &Dataset,
    indices: &[u32],
    opts: &AdversarialOptions,
    progress: bool,
) -> Result<(AdversarialExamples, AdversarialReport)> {
    if !(0.0..=1.0).contains(&opts.success_threshold) {
        bail!(
            "success_threshold must be in [0, 1], got {}",
            opts.success_threshold
        );
    }
    let n = indices.len();
    let model = GpuMlp::upload(ctx, &run.model)?;
    let gdata = GpuDataset::upload(ctx, &data.as_images())?;
    let outcome = attack(ctx, &model, &gdata, indices, &opts.attack, progress)?;
    let mut report = AdversarialReport {
        original_loss: outcome.original_loss(),
        new_loss: outcome.new_loss(),
        original_accuracy: outcome.original_accuracy(),
        new_accuracy: outcome.new_accuracy(),
        eps: opts.attack.eps,
        num_attacked: n,
        num_examples: n,
        options: opts.clone(),
        adapter: ctx.adapter_name(),
        attack_seconds: outcome.seconds,
    };
    if report.new_accuracy > opts.success_threshold {
        bail!(
            "attack too weak: accuracy after the attack is {:.4} (before {:.4}, loss {:.3} -> \
             {:.3}) > success_threshold {}. Raise --eps (e.g. 0.25 on MNIST), use --attack pgd \
             with more --steps, or raise --success_threshold",
            report.new_accuracy,
            report.original_accuracy,
            report.original_loss,
            report.new_loss,
            opts.success_threshold
        );
    }
    let [h, w, c] = run.model.config.input_shape;
    let mut examples = AdversarialExamples {
        meta: AdversarialMeta {
            dataset: run.config.train_data.dataset,
            split: opts.split,
            num_classes: data.num_classes,
            attack: serde_json::to_value(&opts.attack)?,
        },
        shape: [h, w, c],
        images: outcome.images,
        labels: indices
            .iter()
            .map(|&i| data.labels[i as usize] as u32)
            .collect(),
        source_indices: indices.to_vec(),
    };
    if opts.only_successful {
        examples.retain(|i| !outcome.correct_after[i]);
        report.num_examples = examples.len();
        if examples.is_empty() {
            bail!("no attack succeeded: nothing to keep with only_successful");
        }
    }
    Ok((examples, report))
}

/// The files [`store_examples`] writes into a classifier run dir.
pub const FILES: [&str; 3] = [EXAMPLES_FILE, REPORT_FILE, GRID_FILE];

/// Writes `adv_examples.safetensors`, `adv_examples.json` and `adv_examples.png` (clean |
/// adversarial pairs of `data`) into `dir`, replacing existing ones.
pub fn store_examples(
    dir: &Path,
    data: &Dataset,
    examples: &AdversarialExamples,
    report: &AdversarialReport,
) -> Result<()> {
    examples.save(&dir.join(EXAMPLES_FILE))?;
    write_json(&dir.join(REPORT_FILE), report)?;
    let shown = examples.len().min(9);
    let [h, w, c] = examples.shape;
    let d = h * w * c;
    let pairs: Vec<(Vec<f32>, &[f32])> = (0..shown)
        .map(|i| {
            let clean = data.image(examples.source_indices[i] as usize);
            (
                clean.iter().map(|&p| p as f32 / 255.0).collect(),
                &examples.images[i * d..(i + 1) * d],
            )
        })
        .collect();
    write_pairs_png(&dir.join(GRID_FILE), &pairs, [h, w, c])
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdversarialTaskConfig {
    /// The classifier run directory (also where the examples are stored).
    pub run_path: PathBuf,
    /// The attack used when the examples do not exist yet.
    pub attack: AttackConfig,
    pub success_threshold: f64,
    pub only_successful: bool,
    pub max_train_size: Option<usize>,
    pub max_test_size: Option<usize>,
    pub normal_weight: f64,
    /// Fraction of the training samples kept trusted; of the untrusted rest a
    /// `clean_train_weight` share stays clean, the others are attacked.
    #[serde(default = "super::all_trusted")]
    pub trusted_fraction: f64,
    #[serde(default = "super::half_clean")]
    pub clean_train_weight: f64,
}

impl Default for AdversarialTaskConfig {
    /// The original's defaults (the run path is required).
    fn default() -> Self {
        AdversarialTaskConfig {
            run_path: PathBuf::new(),
            attack: AttackConfig {
                // PGD's count; FGSM takes one step.
                steps: DEFAULT_PGD_STEPS,
                ..AttackConfig::new(AttackMethod::Fgsm, DEFAULT_EPS, DEFAULT_PGD_STEPS, None)
            },
            success_threshold: 0.1,
            only_successful: false,
            max_train_size: None,
            max_test_size: None,
            normal_weight: 0.5,
            trusted_fraction: 1.0,
            clean_train_weight: 0.5,
        }
    }
}

pub struct AdversarialTask {
    config: AdversarialTaskConfig,
    run: ClassifierRun,
    splits: Splits,
    /// Draws the trusted / untrusted split.
    seed: u32,
    examples: OnceLock<AdversarialExamples>,
    train_examples: OnceLock<AdversarialExamples>,
}

impl AdversarialTask {
    pub fn new(config: AdversarialTaskConfig, data_dir: &Path, seed: u32) -> Result<Self> {
        let task = AdversarialTask::split_of(&config, seed);
        task.validate()?;
        let run = ClassifierRun::load(&config.run_path)?;
        Ok(AdversarialTask {
            splits: Splits::new(run.config.train_data.dataset, data_dir),
            run,
            config,
            seed,
            examples: OnceLock::new(),
            train_examples: OnceLock::new(),
        })
    }

    fn split_of(config: &AdversarialTaskConfig, seed: u32) -> TrainSplit {
        TrainSplit {
            max_train_size: config.max_train_size,
            trusted_fraction: config.trusted_fraction,
            clean_train_weight: config.clean_train_weight,
            seed,
        }
    }

    fn parts(&self) -> Result<TrainParts> {
        AdversarialTask::split_of(&self.config, self.seed).parts(self.dataset(Split::Train)?.len())
    }

    /// Loads the stored examples of the untrusted anomalous training samples, or attacks
    /// them and stores them (`RUN/adv_examples_train.*`).
    fn load_or_make_train(&self, ctx: &GpuContext, progress: bool) -> Result<()> {
        let wanted = self.parts()?.untrusted_anomalous;
        if self.train_examples.get().is_some() || wanted.is_empty() {
            return Ok(());
        }
        let path = self.run.dir.join(TRAIN_EXAMPLES_FILE);
        let examples = if path.exists() {
            let stored = AdversarialExamples::load(&path)?;
            if stored.meta.split != Split::Train || stored.source_indices != wanted {
                bail!(
                    "{} holds adversarial examples of other training images than this task's                      untrusted split (another --seed, trusted_fraction, clean_train_weight or                      max_train_size made it): delete it to attack this split",
                    path.display()
                );
            }
            stored
        } else {
            eprintln!(
                "{} not found: attacking {} untrusted training images",
                path.display(),
                wanted.len()
            );
            let opts = AdversarialOptions {
                attack: self.config.attack.clone(),
                split: Split::Train,
                max_examples: None,
                success_threshold: self.config.success_threshold,
                // Every attacked image stays: the untrusted mix keeps its proportions.
                only_successful: false,
            };
            let train = self.dataset(Split::Train)?;
            let (examples, report) =
                attack_samples(ctx, &self.run, train, &wanted, &opts, progress)?;
            examples.save(&path)?;
            write_json(&self.run.dir.join(TRAIN_REPORT_FILE), &report)?;
            examples
        };
        let _ = self.train_examples.set(examples);
        Ok(())
    }

    /// The task from its config, attacking with the command's seed.
    pub fn build(config: &Value, env: &TaskEnv) -> Result<Box<dyn Task>> {
        let mut config: AdversarialTaskConfig =
            serde_json::from_value(config.clone()).context("adversarial task config")?;
        let a = &config.attack;
        config.attack = AttackConfig {
            batch_size: a.batch_size,
            seed: env.seed,
            ..AttackConfig::new(a.method, a.eps, a.steps, a.step_size)
        };
        Ok(Box::new(AdversarialTask::new(
            config,
            &env.data_dir,
            env.seed,
        )?))
    }

    /// The examples [`Task::prepare`] loaded or made.
    pub fn examples(&self) -> Result<&AdversarialExamples> {
        self.examples.get().context(
            "the adversarial examples are not loaded yet: call Task::prepare before test_mix",
        )
    }

    /// Loads the stored examples, or attacks the test split with `ctx` and stores them.
    fn load_or_make(&self, ctx: &GpuContext, progress: bool) -> Result<()> {
        if self.examples.get().is_some() {
            return Ok(());
        }
        let path = self.run.dir.join(EXAMPLES_FILE);
        let examples = if path.exists() {
            let stored = AdversarialExamples::load(&path)?;
            let wanted = serde_json::to_value(&self.config.attack)?;
            let differs = ["method", "eps", "steps", "step_size"]
                .iter()
                .any(|k| stored.meta.attack.get(k) != wanted.get(k));
            if differs {
                eprintln!(
                    "using the stored examples in {} (attack {}); the task's attack flags \
                     apply only when that file is missing",
                    path.display(),
                    stored.meta.attack
                );
            }
            stored
        } else {
            eprintln!("{} not found: attacking the test split", path.display());
            let test = self.dataset(Split::Test)?;
            let w = self.config.normal_weight;
            // Leave enough clean test images for the normal side of the mix.
            let n = match self.config.max_test_size {
                Some(m) => (m as f64 * (1.0 - w)).ceil() as usize,
                None => (test.len() as f64 * (1.0 - w)) as usize,
            };
            let opts = AdversarialOptions {
                attack: self.config.attack.clone(),
                split: Split::Test,
                max_examples: Some(n),
                success_threshold: self.config.success_threshold,
                only_successful: self.config.only_successful,
            };
            let (examples, report) = attack_examples(ctx, &self.run, test, &opts, progress)?;
            // The report and picture belong to the missing examples: replace them.
            store_examples(&self.run.dir, test, &examples, &report)?;
            examples
        };
        let [h, w, c] = self.run.model.config.input_shape;
        if examples.shape != [h, w, c]
            || examples.meta.dataset != self.run.config.train_data.dataset
        {
            bail!(
                "{}: examples of {} {:?} do not fit the classifier ({} {:?})",
                path.display(),
                examples.meta.dataset,
                examples.shape,
                self.run.config.train_data.dataset,
                [h, w, c]
            );
        }
        let _ = self.examples.set(examples);
        Ok(())
    }
}

impl Task for AdversarialTask {
    fn kind(&self) -> &'static str {
        "adversarial_examples"
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

    fn prepare(&self, ctx: &GpuContext, progress: bool) -> Result<()> {
        self.load_or_make(ctx, progress)?;
        self.load_or_make_train(ctx, progress)
    }

    fn upload(&self, ctx: &GpuContext, source: Source) -> Result<GpuDataset> {
        match source {
            Source::Data(split) => GpuDataset::upload(ctx, &self.dataset(split)?.as_images()),
            Source::Adversarial(split) => {
                let e = match split {
                    Split::Test => self.examples()?,
                    Split::Train => self.train_examples.get().context(
                        "the training adversarial examples are not loaded: call Task::prepare",
                    )?,
                };
                GpuDataset::upload_f32(
                    ctx,
                    "adversarial examples",
                    &FloatImages {
                        pixels: &e.images,
                        labels: &e.labels,
                        shape: e.shape,
                        num_classes: e.meta.num_classes,
                    },
                )
            }
        }
    }

    fn trusted(&self) -> Result<SampleSpec> {
        let trusted = self.parts()?.trusted;
        if trusted.is_empty() {
            bail!("the task keeps no trusted samples (trusted_fraction 0)");
        }
        Ok(SampleSpec {
            source: Source::Data(Split::Train),
            indices: trusted,
            backdoor: None,
        })
    }

    fn untrusted(&self) -> Result<Vec<Untrusted>> {
        let parts = self.parts()?;
        let anomalous = parts.untrusted_anomalous.len() as u32;
        let spec = |source, indices: Vec<u32>| Untrusted {
            anomalous: source != Source::Data(Split::Train),
            samples: SampleSpec {
                source,
                indices,
                backdoor: None,
            },
        };
        Ok([
            spec(Source::Data(Split::Train), parts.untrusted_clean),
            // The stored examples are in the order of the anomalous indices.
            spec(Source::Adversarial(Split::Train), (0..anomalous).collect()),
        ]
        .into_iter()
        .filter(|u| !u.samples.indices.is_empty())
        .collect())
    }

    fn test_mix(&self) -> Result<TestMix> {
        let examples = self.examples()?;
        let test_len = self.dataset(Split::Test)?.len();
        // Normal images must not be the clean twins of the anomalies.
        let mut attacked = vec![false; test_len];
        if examples.meta.split == Split::Test {
            for &i in &examples.source_indices {
                if let Some(a) = attacked.get_mut(i as usize) {
                    *a = true;
                }
            }
        }
        let clean: Vec<u32> = (0..test_len as u32)
            .filter(|&i| !attacked[i as usize])
            .collect();
        if clean.is_empty() {
            bail!(
                "all {test_len} test images were attacked, none is left as a normal sample: \
                 remake the examples with `cupbearer make-adversarial-examples --max_examples N` \
                 (N < {test_len}) and --overwrite"
            );
        }
        let (normal, anomalous) = mix_sizes(
            clean.len(),
            examples.len(),
            self.config.normal_weight,
            self.config.max_test_size,
        )?;
        Ok(TestMix {
            normal: SampleSpec {
                source: Source::Data(Split::Test),
                indices: clean[..normal].to_vec(),
                backdoor: None,
            },
            anomalous: SampleSpec {
                source: Source::Adversarial(Split::Test),
                indices: (0..anomalous as u32).collect(),
                backdoor: None,
            },
        })
    }
}

const OPTIONS: &[Opt] = &[
    super::backdoor::RUN_PATH,
    opt(
        "attack",
        &["/attack/method"],
        Kind::Str,
        "The attack, when RUN/adv_examples.safetensors must be made: fgsm or pgd.",
    ),
    opt(
        "eps",
        &["/attack/eps"],
        Kind::Float,
        "The attack's L-infinity radius.",
    ),
    opt("steps", &["/attack/steps"], Kind::Int, "PGD steps."),
    opt(
        "step_size",
        &["/attack/step_size"],
        Kind::Float,
        "PGD step size [none: 2.5 eps/steps].",
    ),
    opt(
        "attack_batch_size",
        &["/attack/batch_size"],
        Kind::Int,
        "Samples per attack batch.",
    ),
    opt(
        "success_threshold",
        &["/success_threshold"],
        Kind::Float,
        "Fail when the accuracy after the attack is above this.",
    ),
    opt(
        "only_successful",
        &["/only_successful"],
        Kind::Bool,
        "Keep only examples the classifier gets wrong.",
    ),
    super::backdoor::MAX_TRAIN_SIZE,
    super::backdoor::MAX_TEST_SIZE,
    super::backdoor::NORMAL_WEIGHT,
    super::backdoor::TRUSTED_FRACTION,
    super::backdoor::CLEAN_TRAIN_WEIGHT,
];

/// The registry entry.
pub const ENTRY: TaskEntry = TaskEntry {
    name: "adversarial_examples",
    doc: "Are inputs adversarial examples of the classifier? Made on first use into the run dir.",
    config: ConfigSpec {
        defaults: defaults_of::<AdversarialTaskConfig>,
        options: OPTIONS,
        nested: &[],
        debug: &[
            ("/max_train_size", "2"),
            ("/max_test_size", "2"),
            ("/attack/batch_size", "1"),
            ("/success_threshold", "1.0"),
        ],
    },
    build: AdversarialTask::build,
};
