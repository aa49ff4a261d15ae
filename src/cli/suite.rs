//! `cupbearer suite`: every detector of a suite against every task of it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::data::resolve_data_dir;
use crate::registry::Registry;
use crate::workflows::suite::{Suite, SuiteOptions};

#[derive(clap::Args)]
pub struct Args {
    /// A built-in suite: quick (an MNIST subset, seconds on lavapipe), seed (the original
    /// README's pipeline and its noise ablation, full MNIST) or standard (MNIST,
    /// Fashion-MNIST and CIFAR-10 x corner and noise triggers x every built-in detector
    /// that fits; hours) [default: quick].
    #[arg(long, value_name = "NAME", conflicts_with = "spec")]
    suite: Option<String>,
    /// A suite spec (TOML; see the README's "Suites").
    #[arg(long, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// Run only these tasks (comma-separated names).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    only_tasks: Vec<String>,
    /// Run only these detectors (comma-separated names).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    only_detectors: Vec<String>,
    #[command(flatten)]
    common: super::CommonArgs,
}

pub fn run(args: Args, registry: &Registry) -> Result<()> {
    let suite = match &args.spec {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Suite::from_spec(&text).with_context(|| format!("{}", path.display()))?
        }
        None => Suite::builtin(args.suite.as_deref().unwrap_or("quick"))?,
    };
    let c = &args.common;
    if c.debug {
        // Debug-sized cells would land in (and be resumed from) the suite's dir.
        bail!(
            "suite has no --debug mode: for a fast run use --suite quick, or --only_tasks \
             and --only_detectors to run part of a suite"
        );
    }
    // The suite's own dir by default, so that re-running the command resumes it.
    let dir = match (&c.dir_full, &c.dir_run) {
        (None, None) => c
            .dir_base
            .as_deref()
            .unwrap_or(Path::new("logs/suite"))
            .join(&suite.name),
        _ => c
            .output_dir(Some(Path::new("logs/suite")))
            .context("suite needs an output directory")?,
    };
    let results = suite.run(
        registry,
        &SuiteOptions {
            dir: dir.clone(),
            data_dir: resolve_data_dir(c.data_dir.as_deref()),
            only_tasks: args.only_tasks.clone(),
            only_detectors: args.only_detectors.clone(),
            progress: !c.quiet,
        },
    )?;
    print!("{}", std::fs::read_to_string(dir.join("leaderboard.md"))?);
    println!("\nresults: {}", dir.display());
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 {
        bail!(
            "{failed} cell(s) failed: see {}",
            dir.join("results.json").display()
        );
    }
    Ok(())
}
