//! `cupbearer train-detector`.

use std::path::Path;

use anyhow::Result;

use super::detector_args::DetectorCommandArgs;
use crate::registry::Registry;
use crate::workflows::detector::{train_detector, FitOptions};
use crate::workflows::Output;

pub type Args = DetectorCommandArgs;

pub fn run(args: Args, registry: &Registry) -> Result<()> {
    let (kind, config) = args.new_detector(registry)?;
    let detector = registry.build_detector(kind, &config)?;
    let task = args.task(registry)?;
    let c = &args.common;
    let dir = c.output_dir(Some(Path::new("logs/train_detector")));
    let out = Output {
        dir: dir.as_deref(),
        overwrite: c.overwrite,
        progress: !c.quiet,
    };
    let report = train_detector(
        task.as_ref(),
        detector,
        &FitOptions {
            seed: c.seed,
            layer_aggregation: args.detector_layer_aggregation.unwrap_or_default(),
            dtype: args.dtype,
        },
        &out,
    )?;
    let target = dir.map_or("(debug: nothing written)".into(), |d| {
        d.display().to_string()
    });
    println!(
        "{kind} detector fitted on {} trusted and {} untrusted samples in {:.2} s ({:.2} s \
         wall) -> {target}",
        report.trusted_samples, report.untrusted_samples, report.fit_seconds, report.wall_seconds,
    );
    Ok(())
}
