//! `cupbearer make-adversarial-examples`: attack a classifier run's model and store the
//! examples in the run directory (the adversarial-examples task does this on demand).

use anyhow::{Context, Result};

use crate::data::{resolve_data_dir, Dataset, Split};
use crate::model::attack::{AttackConfig, AttackMethod, DEFAULT_EPS, DEFAULT_PGD_STEPS};
use crate::run::ClassifierRun;
use crate::tasks::adversarial::AdversarialOptions;
use crate::workflows::adversarial::make_adversarial_examples;
use crate::workflows::Output;

#[derive(clap::Args)]
pub struct Args {
    /// fgsm (one step of size eps, the original) or pgd (projected steps from a random
    /// start).
    #[arg(long, value_parser = super::serde_enum::<AttackMethod>, default_value = "fgsm", value_name = "METHOD")]
    attack: AttackMethod,
    /// L∞ radius in pixel units [0, 1]; the original's default 8/255 is too small to
    /// fool an MNIST MLP (try 0.25, or pgd).
    #[arg(long, default_value_t = DEFAULT_EPS, value_name = "EPS")]
    eps: f32,
    /// PGD steps.
    #[arg(long, default_value_t = DEFAULT_PGD_STEPS, value_name = "N")]
    steps: usize,
    /// PGD step size [default: 2.5·eps/steps].
    #[arg(long, value_name = "S")]
    step_size: Option<f32>,
    #[arg(long, default_value_t = 128, value_name = "N")]
    batch_size: usize,
    /// Attack the first N samples of the split [default: half, leaving the rest as clean
    /// normal samples for the adversarial_examples task].
    #[arg(long, value_name = "N")]
    max_examples: Option<usize>,
    /// The split to attack (the original: the training data).
    #[arg(long, value_parser = super::serde_enum::<Split>, default_value = "test", value_name = "SPLIT")]
    split: Split,
    /// Fail when the accuracy after the attack is above this.
    #[arg(long, default_value_t = 0.1, value_name = "ACC")]
    success_threshold: f64,
    /// Store only the examples the classifier gets wrong.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    only_successful: bool,
    /// Accepted for compatibility (the report is always written).
    #[arg(long, action = clap::ArgAction::Set, value_name = "BOOL")]
    save_config: Option<bool>,
    #[command(flatten)]
    common: super::CommonArgs,
}

pub fn run(mut args: Args) -> Result<()> {
    let c = &args.common;
    if c.debug {
        (args.max_examples, args.batch_size, args.success_threshold) = (Some(2), 2, 1.0);
    }
    let run_dir = c
        .dir_full
        .as_deref()
        .context("make-adversarial-examples needs --dir.full RUN: the classifier run to attack")?;
    let run = ClassifierRun::load(run_dir)?;
    let split = args.split;
    let data_dir = resolve_data_dir(c.data_dir.as_deref());
    let data = Dataset::load(run.config.train_data.dataset, split, &data_dir)?;
    let mut attack = AttackConfig::new(args.attack, args.eps, args.steps, args.step_size);
    attack.batch_size = args.batch_size;
    attack.seed = c.seed;
    let opts = AdversarialOptions {
        attack,
        split,
        max_examples: args.max_examples,
        success_threshold: args.success_threshold,
        only_successful: args.only_successful,
    };
    let out = Output {
        dir: Some(run_dir),
        overwrite: c.overwrite,
        progress: !c.quiet,
    };
    let (_, r) = make_adversarial_examples(&run, &data, &opts, &out)?;
    println!(
        "{:?} eps {}: {} examples; accuracy {:.4} -> {:.4}, loss {:.4} -> {:.4} in {:.2} s -> {}",
        opts.attack.method,
        r.eps,
        r.num_examples,
        r.original_accuracy,
        r.new_accuracy,
        r.original_loss,
        r.new_loss,
        r.attack_seconds,
        run_dir.display()
    );
    Ok(())
}
