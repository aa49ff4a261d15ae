//! The `make-adversarial-examples` workflow: attack a classifier run's model and store
//! the examples in its run directory (the adversarial-examples task also makes them on
//! demand).

use anyhow::Result;

use super::{context, Output};
use crate::data::adversarial::AdversarialExamples;
use crate::data::Dataset;
use crate::run::{refuse_overwrite, ClassifierRun};
use crate::tasks::adversarial::{
    attack_examples, store_examples, AdversarialOptions, AdversarialReport, FILES,
};

/// Attacks the classifier of `run` on `data` and, if `out.dir` is given (the run's own
/// directory), writes the examples, their report and a picture there.
pub fn make_adversarial_examples(
    run: &ClassifierRun,
    data: &Dataset,
    opts: &AdversarialOptions,
    out: &Output<'_>,
) -> Result<(AdversarialExamples, AdversarialReport)> {
    let _claim = out.dir.map(super::claim).transpose()?;
    if let Some(dir) = out.dir {
        refuse_overwrite(dir, &FILES, out.overwrite)?;
    }
    let ctx = context(out.progress)?;
    let (examples, report) = attack_examples(&ctx, run, data, opts, out.progress)?;
    if let Some(dir) = out.dir {
        store_examples(dir, data, &examples, &report)?;
    }
    Ok((examples, report))
}
