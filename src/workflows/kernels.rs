//! `kernels check` and `kernels bench` as library calls: the engine's self-checks and
//! benchmarks on this process's kernel files (built-in, or `--shader-dir` overrides).

use anyhow::Result;
use serde::Serialize;

use crate::checks::bench::{self, BenchOptions, BenchReport};
use crate::checks::{self, Check, Outcome};
use crate::gpu::shaders::{Override, Shaders};
use crate::gpu::GpuContext;

/// Every outcome of a `kernels check` run and what it ran on.
#[derive(Serialize)]
pub struct CheckReport {
    pub adapter: String,
    pub kernel_overrides: Vec<Override>,
    pub outcomes: Vec<Outcome>,
}

impl CheckReport {
    pub fn failures(&self) -> impl Iterator<Item = &Outcome> {
        self.outcomes.iter().filter(|o| !o.passed)
    }
}

/// Runs the checks of kernel file `kernel` (every check for None), telling `done`
/// about each check as it finishes.
pub fn check(
    kernel: Option<&str>,
    mut done: impl FnMut(&Check, &[Outcome]),
) -> Result<CheckReport> {
    let selected = checks::select(kernel)?;
    let ctx = super::context(true)?;
    let mut outcomes = Vec::new();
    for check in selected {
        let got = checks::run(&ctx, check);
        done(check, &got);
        outcomes.extend(got);
    }
    Ok(CheckReport {
        adapter: ctx.adapter_name(),
        kernel_overrides: ctx.shaders.overrides(),
        outcomes,
    })
}

/// The benchmarks on the built-in kernel files and, when this process has edited
/// overrides, on those too (same adapter, one after the other).
#[derive(Serialize)]
pub struct BenchComparison {
    pub kernel_overrides: Vec<Override>,
    pub builtin: BenchReport,
    pub overridden: Option<BenchReport>,
}

pub fn bench(opts: BenchOptions) -> Result<BenchComparison> {
    let ctx = super::context(true)?;
    let overrides = ctx.shaders.overrides();
    let edited = overrides.iter().any(|o| o.edited);
    let builtin = bench::run(&GpuContext::with_shaders(Shaders::builtin())?, opts)?;
    let overridden = if edited {
        Some(bench::run(&ctx, opts)?)
    } else {
        None
    };
    Ok(BenchComparison {
        kernel_overrides: overrides,
        builtin,
        overridden,
    })
}
