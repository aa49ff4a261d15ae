//! `cupbearer train-detector`.

use std::path::Path;

use anyhow::Result;

use super::detector_args::DetectorCommandArgs;
use crate::data::resolve_data_dir;
use crate::detectors::pipeline::train_detector;

pub type Args = DetectorCommandArgs;

pub fn run(mut args: Args) -> Result<()> {
    args.apply_debug();
    let (task_kind, task_config) = args.task.resolve(args.common.seed)?;
    let (kind, config) = args.detector.resolve()?;
    let detector = crate::detectors::build(kind, &config)?;
    let c = &args.common;
    let out = c.output_dir(Some(Path::new("logs/train_detector")));
    let data_dir = resolve_data_dir(c.data_dir.as_deref());
    let task = crate::tasks::build(task_kind, &task_config, &data_dir)?;
    let report = train_detector(
        task.as_ref(),
        detector,
        c.seed,
        out.as_deref(),
        c.overwrite,
        !c.quiet,
    )?;
    let target = out.map_or("(debug: nothing written)".into(), |d| {
        d.display().to_string()
    });
    println!(
        "{kind} detector fitted on {} trusted samples in {:.2} s ({:.2} s wall) -> {target}",
        report.trusted_samples, report.fit_seconds, report.wall_seconds,
    );
    Ok(())
}
