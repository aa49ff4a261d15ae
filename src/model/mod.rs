//! Models: the layer library ([`layers`], shared with the abstraction detector), the
//! classifier on the host (init, storage, CPU reference) and on the GPU, batching,
//! training and attacks.

pub mod attack;
pub mod batches;
pub mod gpu_mlp;
pub mod import;
pub mod layers;
pub mod mlp;
pub mod train;

pub use gpu_mlp::{GpuMlp, Gradients};
pub use mlp::{Mlp, MlpConfig};
