//! `cupbearer eval-detector`.

use anyhow::{bail, Result};

use super::detector_args::DetectorCommandArgs;
use crate::registry::Registry;
use crate::workflows::detector::{eval_detector, EvalOptions};
use crate::workflows::Output;

pub type Args = DetectorCommandArgs;

pub fn run(args: Args, registry: &Registry) -> Result<()> {
    let source = args.source(registry)?;
    let c = &args.common;
    // Like the original, eval writes nothing by default: only with --dir.full/--dir.base.
    let out = c.output_dir(None);
    if out.is_none() && !c.debug {
        bail!("eval-detector needs --dir.full DIR (or --dir.base) for its outputs");
    }
    let task = args.task(registry)?;
    let opts = EvalOptions {
        registry,
        batch_size: args.eval_batch_size(),
        seed: c.seed,
        aggregation: args.detector_layer_aggregation,
    };
    let output = Output {
        dir: out.as_deref(),
        overwrite: c.overwrite,
        progress: !c.quiet,
    };
    let r = eval_detector(task.as_ref(), &source, &opts, &output)?;
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
