//! `cupbearer train-detector`.

use std::path::PathBuf;

use anyhow::Result;

use super::detector_args::{DetectorArgs, TaskArgs};
use crate::data::resolve_data_dir;
use crate::detectors::pipeline::train_detector;
use crate::run::resolve_run_dir;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    task: TaskArgs,
    #[command(flatten)]
    detector: DetectorArgs,
    #[command(flatten)]
    common: super::CommonArgs,
}

pub fn run(args: Args) -> Result<()> {
    let (task_kind, task_config) = args.task.resolve()?;
    let (kind, config) = args.detector.resolve()?;
    let detector = crate::detectors::build(kind, &config)?;
    let c = &args.common;
    let out = resolve_run_dir(
        c.dir_full.as_deref(),
        c.dir_base
            .as_deref()
            .unwrap_or(&PathBuf::from("logs/train_detector")),
        c.dir_run.as_deref(),
    );
    let data_dir = resolve_data_dir(c.data_dir.as_deref());
    let task = crate::tasks::build(task_kind, &task_config, &data_dir)?;
    let report = train_detector(task.as_ref(), detector, c.seed, &out, c.overwrite, !c.quiet)?;
    println!(
        "{kind} detector fitted on {} trusted samples in {:.2} s ({:.2} s wall) -> {}",
        report.trusted_samples,
        report.fit_seconds,
        report.wall_seconds,
        out.display()
    );
    Ok(())
}
