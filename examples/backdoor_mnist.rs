//! The seed pipeline through the library API: train an MLP on MNIST with a corner-pixel
//! backdoor (5 % of the images poisoned), fit a Mahalanobis detector on clean training
//! activations, evaluate it on the corner trigger and on the noise-0.2 ablation, and
//! print one results table. Run dirs and plots go under `logs/backdoor_mnist/`.
//!
//!     cargo run --release --example backdoor_mnist [-- --quick] [--data-dir DIR]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use cupbearer::data::backdoor::{Backdoor, Corner, Trigger};
use cupbearer::data::{download, resolve_data_dir, Dataset, DatasetName, Split};
use cupbearer::detectors::mahalanobis::MahalanobisConfig;
use cupbearer::detectors::pipeline::{eval_detector, train_detector, DetectorSource, EvalReport};
use cupbearer::model::classifier::{train_classifier, RunOptions};
use cupbearer::model::MlpConfig;
use cupbearer::run::{ClassifierRunConfig, TrainDataConfig, TrainingConfig};
use cupbearer::tasks::backdoor::{AnomalousSplit, BackdoorTaskConfig};

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
    let data_dir = resolve_data_dir(args.data_dir.as_deref());
    if let Err(e) = Dataset::load(DatasetName::Mnist, Split::Test, &data_dir) {
        eprintln!("{e:#}\n-> downloading MNIST into {}", data_dir.display());
        download::download(DatasetName::Mnist, &data_dir, &[]).context(
            "MNIST is neither present nor downloadable; put the four IDX files into \
             <data dir>/mnist/ or point --data-dir at them",
        )?;
    }
    let backdoor = Backdoor {
        trigger: Trigger::Corner {
            corner: Corner::TopLeft,
        },
        p_backdoor: 0.05,
        target_class: 0,
    };
    let config = ClassifierRunConfig::new(
        TrainDataConfig {
            dataset: DatasetName::Mnist,
            max_size: args.quick.then_some(20_000),
            backdoor: Some(backdoor),
        },
        MlpConfig {
            input_shape: [28, 28, 1],
            conv_channels: Vec::new(),
            hidden_dims: vec![256, 256],
            output_dim: 10,
        },
        TrainingConfig {
            num_epochs: if args.quick { 2 } else { args.epochs },
            seed: args.seed,
            ..TrainingConfig::default()
        },
    );
    let start = Instant::now();
    let dir = args.out.join("classifier");
    let m = train_classifier(
        config,
        &RunOptions {
            dir: Some(dir.clone()),
            test_limit: None,
            data_dir: data_dir.clone(),
            overwrite: true,
            eval_batch_size: 2048,
            progress: true,
        },
    )?;
    let train_seconds = start.elapsed().as_secs_f64();

    // The detector task: clean training data to fit on, corner-triggered test images
    // as anomalies; the ablation swaps the trigger for plain Gaussian noise.
    let task = |trigger: Trigger| -> Result<Box<dyn cupbearer::tasks::Task>> {
        let config = BackdoorTaskConfig {
            run_path: dir.clone(),
            backdoor: Backdoor {
                trigger,
                p_backdoor: 1.0,
                ..backdoor
            },
            max_train_size: args.quick.then_some(20_000),
            max_test_size: None,
            normal_weight: 0.5,
            anomalous_split: AnomalousSplit::Test,
        };
        cupbearer::tasks::build("backdoor", &serde_json::to_value(config)?, &data_dir)
    };
    let corner_task = task(backdoor.trigger)?;
    let det_dir = args.out.join("detector");
    let start = Instant::now();
    let detector = cupbearer::detectors::build(
        "mahalanobis",
        &serde_json::to_value(MahalanobisConfig::default())?,
    )?;
    train_detector(
        corner_task.as_ref(),
        detector,
        args.seed,
        Some(&det_dir),
        true,
        true,
    )?;
    let fit_seconds = start.elapsed().as_secs_f64();
    let detector = DetectorSource::Run(det_dir.clone());
    let evaluate = |task: &dyn cupbearer::tasks::Task, out: &str| -> Result<(EvalReport, f64)> {
        let start = Instant::now();
        let r = eval_detector(
            task,
            &detector,
            2048,
            args.seed,
            Some(&args.out.join(out)),
            true,
            true,
        )?;
        Ok((r, start.elapsed().as_secs_f64()))
    };
    let (corner, corner_seconds) = evaluate(corner_task.as_ref(), "eval_corner")?;
    let noise_task = task(Trigger::Noise {
        std: 0.2,
        clip: true,
    })?;
    let (noise, noise_seconds) = evaluate(noise_task.as_ref(), "eval_noise")?;

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
        "| train-classifier s (samples/s)     | {train_seconds:.1} ({:.0}) |",
        m.samples_per_second
    );
    println!("| train-detector s                   | {fit_seconds:.1} |");
    println!("| eval-detector s (corner / noise)   | {corner_seconds:.1} / {noise_seconds:.1} |");
    println!("| adapter                            | {} |", m.adapter);
    println!("\nrun directories and plots: {}", args.out.display());
    Ok(())
}
