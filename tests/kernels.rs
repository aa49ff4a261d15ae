//! Every kernel file against its f64 CPU reference and every backward pass against
//! finite differences, through the same checks `cupbearer kernels check` runs (one test
//! per check); then launcher argument checks and kernel-file overrides.

mod common;

use common::gpu;
use cupbearer::checks::{self, CHECKS};
use cupbearer::gpu::adam::{adam, set_adam_step};
use cupbearer::gpu::matmul::{matmul, MatmulArgs, MatmulFlags, Schedule};
use cupbearer::gpu::shaders::{Shaders, BUILTIN};
use cupbearer::gpu::{GpuContext, Slice, StepParams};

/// Runs check `name` and fails with every comparison that did not pass.
fn passes(name: &str) {
    let Some(ctx) = gpu() else { return };
    let check = CHECKS.iter().find(|c| c.name == name).unwrap();
    let outcomes = checks::run(&ctx, check);
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.passed).collect();
    assert!(!outcomes.is_empty(), "{name} compared nothing");
    assert!(failed.is_empty(), "{name}: {failed:#?}");
}

/// One test per check, in `mod check` (`cargo test check::matmul_layouts`).
macro_rules! check_tests {
    ($($name:ident),* $(,)?) => {
        mod check {
            $(#[test]
            fn $name() {
                super::passes(stringify!($name));
            })*
        }
        const TESTED: &[&str] = &[$(stringify!($name)),*];
    };
}

check_tests!(
    matmul_layouts,
    matmul_epilogues,
    column_sums,
    softmax_cross_entropy,
    adam,
    conv_and_pool,
    gate,
    gather,
    attack,
    abstraction_losses,
    stats,
    gram,
    knn,
    logistic,
    vae,
    layer_gradients,
    model_param_gradients,
    model_input_gradients,
);

#[test]
fn every_check_has_a_test_and_every_kernel_file_a_check() {
    let names: Vec<&str> = CHECKS.iter().map(|c| c.name).collect();
    assert_eq!(names, TESTED);
    for (file, _) in BUILTIN {
        let selected = checks::select(Some(file)).unwrap();
        assert!(!selected.is_empty(), "no check exercises {file}.wgsl");
    }
    let err = checks::select(Some("matmull")).err().unwrap();
    assert!(
        format!("{err}").contains("no kernel file is called matmull"),
        "{err}"
    );
}

/// A context whose kernel files are `files` (name, text) over the built-in ones.
fn with_files(files: &[(&str, String)]) -> anyhow::Result<GpuContext> {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    GpuContext::with_shaders(Shaders::from_dir(dir.path())?)
}

fn builtin(name: &str) -> &'static str {
    BUILTIN.iter().find(|(n, _)| *n == name).unwrap().1
}

#[test]
fn an_edited_kernel_that_computes_wrongly_fails_its_check() {
    if gpu().is_none() {
        return;
    }
    // Twice the step: compiles, runs, and is wrong.
    let doubled = builtin("adam").replace(
        "params[i] -= step.learning_rate",
        "params[i] -= 2.0 * step.learning_rate",
    );
    let ctx = with_files(&[("adam.wgsl", doubled)]).unwrap();
    let adam_check = checks::select(Some("adam")).unwrap();
    assert_eq!(adam_check.len(), 1);
    let outcomes = checks::run(&ctx, adam_check[0]);
    assert!(outcomes.iter().all(|o| !o.passed), "{outcomes:#?}");
    assert!(outcomes[0].message.as_deref().unwrap().contains("element"));
    // The matmul checks do not use adam.wgsl and still pass.
    let matmul_check = CHECKS.iter().find(|c| c.name == "column_sums").unwrap();
    assert!(checks::run(&ctx, matmul_check).iter().all(|o| o.passed));
    // A file that does not compile fails the check with naga's located message.
    let broken = builtin("gate").replace("fn gate(", "fn gate(;");
    let ctx = with_files(&[("gate.wgsl", broken)]).unwrap();
    let outcomes = checks::run(&ctx, CHECKS.iter().find(|c| c.name == "gate").unwrap());
    let msg = outcomes.last().unwrap().message.clone().unwrap();
    assert!(msg.contains("gate.wgsl:"), "{msg}");
}

/// The checks above exercise the shared-A (subgroup broadcast) matmul on lavapipe only
/// if its context turned subgroups on: lavapipe has them, 8 lanes wide.
#[test]
fn lavapipe_contexts_use_8_lane_subgroups() {
    let Some(ctx) = gpu() else { return };
    let info = &ctx.adapter_info;
    if info.backend == wgpu::Backend::Vulkan && info.name.contains("llvmpipe") {
        assert_eq!(ctx.subgroup_size, Some(8), "{}", ctx.adapter_name());
    }
}

#[test]
fn matmul_rejects_short_operands() {
    let Some(ctx) = gpu() else { return };
    let small = ctx.zeros("small", 4).unwrap();
    let err = matmul(
        &ctx,
        MatmulFlags::default(),
        Schedule::for_context(&ctx),
        &MatmulArgs {
            m: 3,
            n: 3,
            k: 3,
            a: Slice::new(&small, 0, 4),
            b: Slice::new(&small, 0, 4),
            c: Slice::new(&small, 0, 4),
            bias: None,
            mask: None,
        },
    )
    .err()
    .expect("a 3x3 multiply on 4-element buffers must be refused");
    assert!(
        err.to_string()
            .contains("operand a has 4 elements, needs 9"),
        "{err}"
    );
}

/// One Adam update of 8 parameters from 1.0 with gradient 1 in `ctx`: the new values.
fn adam_once(ctx: &GpuContext) -> anyhow::Result<Vec<f32>> {
    let params = ctx.buffer_from("p", &[1.0f32; 8])?;
    let grads = ctx.buffer_from("g", &[1.0f32; 8])?;
    let (m, v) = (ctx.zeros("m", 8)?, ctx.zeros("v", 8)?);
    let mut step = StepParams::default();
    set_adam_step(&mut step, 0.1, 1);
    let step = ctx.uniform("step", &step);
    let whole = Slice::whole;
    let op = adam(
        ctx,
        8,
        whole(&params),
        whole(&grads),
        whole(&m),
        whole(&v),
        &step,
    )?;
    ctx.submit([&op]);
    ctx.read(Slice::new(&params, 0, 8))
}

#[test]
fn kernel_files_can_be_overridden_and_bad_ones_are_clear_errors() {
    if gpu().is_none() {
        return;
    }
    let builtin_adam = builtin("adam");
    let with = with_files;
    let base = adam_once(&with(&[]).unwrap()).unwrap();
    assert!((base[0] - 0.9).abs() < 1e-5, "{base:?}");
    // An edited file runs instead of the built-in one (here: twice the step) and is
    // reported with its SHA-256.
    let doubled = builtin_adam.replace(
        "params[i] -= step.learning_rate",
        "params[i] -= 2.0 * step.learning_rate",
    );
    assert_ne!(doubled, builtin_adam);
    let ctx = with(&[("adam.wgsl", doubled)]).unwrap();
    let got = adam_once(&ctx).unwrap();
    assert!((got[0] - 0.8).abs() < 1e-5, "{got:?}");
    let o = ctx.shaders.overrides();
    assert_eq!(
        (o.len(), o[0].kernel.as_str(), o[0].sha256.len()),
        (1, "adam", 64)
    );

    // A syntax error: the override's own path, line and column, and the source line.
    let broken = builtin_adam.replace("let m_hat", "let m_hat = = ");
    let err = adam_once(&with(&[("adam.wgsl", broken)]).unwrap()).unwrap_err();
    let msg = format!("{err:#}");
    let line = builtin_adam
        .lines()
        .position(|l| l.contains("let m_hat"))
        .unwrap()
        + 1;
    assert!(msg.contains(&format!("adam.wgsl:{line}:")), "{msg}");
    assert!(msg.contains("let m_hat = = "), "{msg}");
    // A validation error (a type mismatch), also located.
    let mistyped = builtin_adam.replace("let g = grads[i];", "let g = grads[i] + 1u;");
    let msg = format!(
        "{:#}",
        adam_once(&with(&[("adam.wgsl", mistyped)]).unwrap()).unwrap_err()
    );
    assert!(msg.contains("adam.wgsl:"), "{msg}");
    // A missing entry point.
    let renamed = builtin_adam.replace("fn main(", "fn main2(");
    let msg = format!(
        "{:#}",
        adam_once(&with(&[("adam.wgsl", renamed)]).unwrap()).unwrap_err()
    );
    assert!(msg.contains("no entry point `main`"), "{msg}");
    // A file that names no kernel file.
    let err = with(&[("adamw.wgsl", String::new())]).err().unwrap();
    assert!(
        format!("{err:#}").contains("no kernel file is called adamw.wgsl"),
        "{err:#}"
    );
    // Errors leave the device usable.
    let ctx = with(&[]).unwrap();
    ctx.check().unwrap();
}
