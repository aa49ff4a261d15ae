//! `cupbearer eval-detector`.

use anyhow::{bail, Result};

use super::detector_args::DetectorCommandArgs;
use crate::data::resolve_data_dir;
use crate::detectors::pipeline::eval_detector;

pub type Args = DetectorCommandArgs;

pub fn run(mut args: Args) -> Result<()> {
    args.apply_debug();
    let (task_kind, task_config) = args.task.resolve(args.common.seed)?;
    let source = args.detector.source()?;
    let c = &args.common;
    // Like the original, eval writes nothing by default: only with --dir.full/--dir.base.
    let out = c.output_dir(None);
    if out.is_none() && !c.debug {
        bail!("eval-detector needs --dir.full DIR (or --dir.base) for its outputs");
    }
    let data_dir = resolve_data_dir(c.data_dir.as_deref());
    let task = crate::tasks::build(task_kind, &task_config, &data_dir)?;
    let r = eval_detector(
        task.as_ref(),
        &source,
        args.detector.eval_batch_size(),
        c.seed,
        out.as_deref(),
        c.overwrite,
        !c.quiet,
    )?;
    let layers: Vec<String> = r
        .layers
        .iter()
        .map(|l| format!("{} {:.4}", l.layer, l.auc_roc))
        .collect();
    println!(
        "AUC_ROC {:.4}  AP {:.4}  FPR@95TPR {:.4}  ({} normal, {} anomalous; layers: {}) in {:.2} s -> {}",
        r.auc_roc,
        r.ap,
        r.fpr_at_95_tpr,
        r.num_normal,
        r.num_anomalous,
        layers.join(", "),
        r.wall_seconds,
        out.map_or("(debug: nothing written)".into(), |d| d.display().to_string())
    );
    Ok(())
}
