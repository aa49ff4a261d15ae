//! `cupbearer download`.

use std::path::PathBuf;

use anyhow::Result;

use crate::data::{download, resolve_data_dir, DatasetName};

#[derive(clap::Args)]
pub struct Args {
    /// Data set to fetch: mnist, fashion_mnist or cifar10.
    dataset: DatasetName,
    /// Data directory [default: $CUPBEARER_DATA_DIR, else ./data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Base URL to fetch from instead of the built-in mirrors (repeatable).
    #[arg(long)]
    mirror: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let dir = resolve_data_dir(args.data_dir.as_deref());
    let out = download::download(args.dataset, &dir, &args.mirror)?;
    eprintln!("{} is ready in {}", args.dataset, out.display());
    Ok(())
}
