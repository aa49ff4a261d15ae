//! Run-directory workflows: the commands as library calls. This is the only code that
//! creates a [`GpuContext`] for a command, reads and writes run directories and reports
//! progress; the library modules (`gpu`, `model`, `data`, `detectors`, `tasks`, `eval`)
//! never import it. The CLI and the example call these functions.

pub mod adversarial;
pub mod backdoor_mnist;
pub mod classifier;
pub mod detector;

use std::path::Path;

use anyhow::Result;

use crate::gpu::GpuContext;

/// Where and how a workflow writes: `dir` None writes nothing (`--debug`); existing
/// outputs are refused unless `overwrite`; `progress` allows progress output on stderr.
#[derive(Clone, Copy, Debug)]
pub struct Output<'a> {
    pub dir: Option<&'a Path>,
    pub overwrite: bool,
    pub progress: bool,
}

/// The command's GPU context (the adapter is named on stderr with `progress`).
fn context(progress: bool) -> Result<GpuContext> {
    let ctx = GpuContext::new()?;
    crate::progress::note(progress, &format!("adapter: {}", ctx.adapter_name()));
    Ok(ctx)
}
