//! The seed pipeline through the library API: train an MLP on MNIST with a corner-pixel
//! backdoor (5 % of the images poisoned) and report clean accuracy and attack success.
//! (Detector fitting and evaluation join this example as the detectors land.)
//!
//!     cargo run --release --example backdoor_mnist [-- --quick] [--data-dir DIR]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use cupbearer::data::backdoor::{Backdoor, Corner, Trigger};
use cupbearer::data::{download, resolve_data_dir, Dataset, DatasetName, Split};
use cupbearer::model::classifier::{train_classifier, RunOptions};
use cupbearer::model::MlpConfig;
use cupbearer::run::{ClassifierRunConfig, TrainDataConfig, TrainingConfig};

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
    /// A small smoke run: 1 epoch on the first 6000 training images.
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
            max_size: args.quick.then_some(6000),
            backdoor: Some(backdoor),
        },
        MlpConfig {
            input_shape: [28, 28, 1],
            hidden_dims: vec![256, 256],
            output_dim: 10,
        },
        TrainingConfig {
            num_epochs: if args.quick { 1 } else { args.epochs },
            seed: args.seed,
            ..TrainingConfig::default()
        },
    );
    let start = Instant::now();
    let dir = args.out.join("classifier");
    let m = train_classifier(
        config,
        &RunOptions {
            dir: dir.clone(),
            data_dir,
            overwrite: true,
            eval_batch_size: 2048,
            progress: true,
        },
    )?;
    let seconds = start.elapsed().as_secs_f64();
    println!();
    println!("| metric                  | value |");
    println!("|-------------------------|-------|");
    println!("| clean test accuracy     | {:.4} |", m.clean_test_accuracy);
    println!(
        "| attack success rate     | {:.4} |",
        m.attack_success_rate.unwrap_or(f64::NAN)
    );
    println!("| training samples/s      | {:.0} |", m.samples_per_second);
    println!("| train-classifier (s)    | {seconds:.1} |");
    println!("| adapter                 | {} |", m.adapter);
    println!("\nrun directory: {}", dir.display());
    Ok(())
}
