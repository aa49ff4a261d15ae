//! The seed pipeline through the library API ([`cupbearer::workflows::backdoor_mnist`]):
//! train an MLP on MNIST with a corner-pixel backdoor (5 % of the images poisoned), fit a
//! Mahalanobis detector on clean training activations, evaluate it on the corner trigger
//! and on the noise-0.2 ablation, and print one results table. Run dirs and plots go
//! under `logs/backdoor_mnist/`.
//!
//!     cargo run --release --example backdoor_mnist [-- --quick] [--data-dir DIR]

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use cupbearer::data::resolve_data_dir;
use cupbearer::workflows::backdoor_mnist::{run, PipelineOptions};

#[derive(Parser)]
struct Args {
    /// Data directory [default: $CUPBEARER_DATA_DIR, else ./data]; MNIST is downloaded
    /// there when missing.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 0)]
    seed: u32,
    /// A small smoke run: 2 epochs on the first 20 000 training images.
    #[arg(long)]
    quick: bool,
    /// Where the run directories go.
    #[arg(long, default_value = "logs/backdoor_mnist")]
    out: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let r = run(&PipelineOptions {
        data_dir: resolve_data_dir(args.data_dir.as_deref()),
        epochs: args.epochs,
        seed: args.seed,
        quick: args.quick,
        out: args.out.clone(),
        progress: true,
    })?;
    let (m, corner, noise) = (&r.classifier, &r.corner, &r.noise);
    println!();
    println!("| result                             | value |");
    println!("|------------------------------------|-------|");
    println!(
        "| clean test accuracy                | {:.4} |",
        m.clean_test_accuracy
    );
    let asr = m.attack_success_rate.unwrap_or(f64::NAN);
    println!("| attack success rate                | {asr:.4} |");
    println!(
        "| corner AUROC / AP                  | {:.4} / {:.4} |",
        corner.auc_roc, corner.ap
    );
    println!(
        "| corner FPR at 95% TPR              | {:.4} |",
        corner.fpr_at_95_tpr
    );
    println!(
        "| noise-0.2 ablation AUROC (lower ok)| {:.4} |",
        noise.auc_roc
    );
    println!(
        "| train-classifier s (samples/s)     | {:.1} ({:.0}) |",
        r.train_seconds, m.samples_per_second
    );
    println!(
        "| train-detector s                   | {:.1} |",
        r.fit_seconds
    );
    println!(
        "| eval-detector s (corner / noise)   | {:.1} / {:.1} |",
        r.corner_seconds, r.noise_seconds
    );
    println!("| adapter                            | {} |", m.adapter);
    println!("\nrun directories and plots: {}", args.out.display());
    for dir in ["eval_corner", "eval_noise"] {
        let d = args.out.join(dir);
        for plot in [
            "roc.svg",
            "roc_log.svg",
            "histogram.svg",
            "histogram_log.svg",
        ] {
            println!("  {}", d.join(plot).display());
        }
    }
    Ok(())
}
