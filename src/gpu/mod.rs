//! The WGSL compute engine: device context, one launcher per shader (each with its CPU
//! reference), and the per-step parameter block shared by the training kernels.

pub mod abstraction;
pub mod adam;
pub mod attack;
pub mod batch;
pub mod beatrix;
pub mod context;
pub mod conv;
pub mod gate;
pub mod knn;
pub mod logistic;
pub mod loss;
pub mod matmul;
pub mod reduce;
pub mod shaders;
pub mod stats;
pub mod vae;
pub mod watchdog;

pub use context::{
    block_on, Binding, Dispatch, GpuContext, GpuHang, Kernel, KernelSpec, Slice,
    BROWSER_NEEDS_ASYNC, GPU_TIMEOUT_ENV, SUBGROUPS_ENV,
};

/// `struct Step` of `shaders/step.wgsl`: rewritten before every training step.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StepParams {
    pub epoch: u32,
    pub batch_offset: u32,
    pub _pad0: [u32; 2],
    pub learning_rate: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub bias_correction1: f32,
    pub bias_correction2: f32,
    pub _pad1: [f32; 2],
}

/// Compiles a simple kernel family (no schedule variants) from kernel files `parts`
/// (names in [`shaders::BUILTIN`], concatenated in order).
pub(crate) fn simple_kernel(
    ctx: &GpuContext,
    name: &str,
    parts: &[&str],
    entry: &str,
    bindings: &[Binding],
    constants: &[(&str, f64)],
) -> anyhow::Result<std::sync::Arc<Kernel>> {
    let key = format!("{name}_{constants:?}");
    ctx.kernel(&KernelSpec {
        key,
        parts,
        generated: None,
        entry,
        bindings,
        constants,
    })
}
