//! The engine's self-checks: every kernel file's variants against f64 CPU references on
//! odd, non-tile-aligned shapes, and finite-difference checks of the backward passes
//! built from them. `cupbearer kernels check` and the test suite run this same code, so
//! an edited kernel (`--shader-dir`) is checked exactly as the built-in one is; and
//! the benchmarks that compare an edited kernel's speed with the built-in one's.

pub mod bench;
mod detector_kernels;
mod gradients;
mod train_kernels;

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;

use anyhow::{bail, Result};

use serde::Serialize;
pub use train_kernels::gather_on_gpu;

use crate::gpu::shaders::BUILTIN;
use crate::gpu::GpuContext;

/// What a check's `run` returns: a future, so that the browser can await its readbacks.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<()>> + 'a>>;

/// One check: a group of comparisons about the kernel files it names.
pub struct Check {
    pub name: &'static str,
    /// The kernel files it exercises, the one it is about first.
    pub files: &'static [&'static str],
    pub run: for<'a, 'c> fn(&'a mut Checker<'c>) -> CheckFuture<'a>,
}

/// Every check, in the order `kernels check` runs them.
pub const CHECKS: &[Check] = &[
    train_kernels::MATMUL_LAYOUTS,
    train_kernels::MATMUL_EPILOGUES,
    train_kernels::COLUMN_SUMS,
    train_kernels::SOFTMAX_CROSS_ENTROPY,
    train_kernels::ADAM,
    train_kernels::CONV_AND_POOL,
    train_kernels::GATE,
    train_kernels::GATHER,
    detector_kernels::ATTACK,
    detector_kernels::ABSTRACTION_LOSSES,
    detector_kernels::STATS,
    detector_kernels::GRAM,
    detector_kernels::KNN,
    detector_kernels::LOGISTIC,
    detector_kernels::VAE,
    gradients::LAYERS,
    gradients::MODEL_PARAMS,
    gradients::MODEL_INPUTS,
];

/// The checks that exercise kernel file `kernel` (all of them for None).
pub fn select(kernel: Option<&str>) -> Result<Vec<&'static Check>> {
    let Some(kernel) = kernel else {
        return Ok(CHECKS.iter().collect());
    };
    let kernel = kernel.strip_suffix(".wgsl").unwrap_or(kernel);
    if !BUILTIN.iter().any(|(n, _)| *n == kernel) {
        let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        bail!(
            "no kernel file is called {kernel}; the files are {}",
            names.join(", ")
        );
    }
    Ok(CHECKS
        .iter()
        .filter(|c| c.files.contains(&kernel))
        .collect())
}

/// One comparison of a kernel's output with its reference (or one property).
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub check: &'static str,
    pub variant: String,
    pub case: String,
    pub elements: usize,
    pub max_abs_error: f64,
    /// Over elements whose reference is not zero.
    pub max_rel_error: f64,
    /// The largest error as a share of its tolerance `atol + rtol * |want|` (<= 1 passes).
    pub tolerance_used: f64,
    pub passed: bool,
    /// Why it failed: the worst element, a violated property or the error.
    pub message: Option<String>,
}

/// What a check function records its comparisons into.
pub struct Checker<'a> {
    pub ctx: &'a GpuContext,
    check: &'static str,
    variant: String,
    outcomes: Vec<Outcome>,
}

impl<'a> Checker<'a> {
    /// Names the variant (schedule, flags, entry point) of the comparisons that follow.
    pub fn variant(&mut self, variant: impl Display) {
        self.variant = variant.to_string();
    }

    fn push(&mut self, case: String, elements: usize, errors: [f64; 3], message: Option<String>) {
        let [max_abs_error, max_rel_error, tolerance_used] = errors;
        self.outcomes.push(Outcome {
            check: self.check,
            variant: self.variant.clone(),
            case,
            elements,
            max_abs_error,
            max_rel_error,
            tolerance_used,
            passed: message.is_none(),
            message,
        });
    }

    /// `|got - want| <= atol + rtol * |want|` for every element (NaN fails).
    pub fn close(
        &mut self,
        case: impl Into<String>,
        got: &[f32],
        want: &[f64],
        atol: f64,
        rtol: f64,
    ) {
        let case = case.into();
        if got.len() != want.len() {
            let msg = format!("{} elements, the reference has {}", got.len(), want.len());
            return self.push(case, got.len(), [f64::NAN; 3], Some(msg));
        }
        let (mut abs, mut rel, mut used) = (0f64, 0f64, 0f64);
        let mut worst = None;
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = (g as f64 - w).abs();
            let tol = atol + rtol * w.abs();
            let share = if err == 0.0 {
                0.0
            } else if tol == 0.0 || err.is_nan() {
                f64::INFINITY
            } else {
                err / tol
            };
            abs = abs.max(err);
            if w != 0.0 {
                rel = rel.max(err / w.abs());
            }
            if share > used {
                used = share;
                if share > 1.0 {
                    worst = Some(format!("element {i}: got {g}, want {w} (error {err:e})"));
                }
            }
        }
        self.push(case, got.len(), [abs, rel, used], worst);
    }

    /// Exact equality of integer outputs (argmax indices, labels, ranks).
    pub fn equal(&mut self, case: impl Into<String>, got: &[u32], want: &[u32]) {
        let got: Vec<f32> = got.iter().map(|&v| v as f32).collect();
        let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        self.close(case, &got, &want, 0.0, 0.0);
    }

    fn new(ctx: &'a GpuContext, check: &'static Check) -> Self {
        Checker {
            ctx,
            check: check.name,
            variant: String::new(),
            outcomes: Vec::new(),
        }
    }

    /// The check stopped with `e` before its end.
    fn failed(&mut self, e: anyhow::Error) {
        let e = format!("error: {e:#}");
        self.push("(did not run to the end)".into(), 0, [f64::NAN; 3], Some(e));
    }

    /// A property of the output; `detail` says how it was violated.
    pub fn require(&mut self, case: impl Into<String>, ok: bool, detail: impl FnOnce() -> String) {
        self.push(case.into(), 0, [0.0; 3], (!ok).then(detail));
    }
}

/// Runs `check`; an error (a kernel that does not compile, a GPU fault) becomes a
/// failed outcome instead of ending the run.
pub fn run(ctx: &GpuContext, check: &'static Check) -> Vec<Outcome> {
    crate::gpu::block_on(async { Ok(run_async(ctx, check).await) }).unwrap_or_else(|e| {
        let mut c = Checker::new(ctx, check);
        c.failed(e);
        c.outcomes
    })
}

/// [`run`] as a future (the browser's form).
pub async fn run_async(ctx: &GpuContext, check: &'static Check) -> Vec<Outcome> {
    let mut c = Checker::new(ctx, check);
    if let Err(e) = (check.run)(&mut c).await {
        c.failed(e);
    }
    c.outcomes
}

/// Uniform values in [-1, 1), deterministic in `seed`.
pub fn random(len: usize, seed: u32) -> Vec<f32> {
    use crate::rng::{rand_u32, rand_unit};
    (0..len as u32)
        .map(|i| rand_unit(rand_u32(seed, 99, i, 0, 0)) * 2.0 - 1.0)
        .collect()
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}
