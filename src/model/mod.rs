//! Models: the host-side MLP (init, storage, CPU reference), its GPU-resident form and
//! the training loop.

pub mod attack;
pub mod batches;
pub mod gpu_mlp;
pub mod mlp;
pub mod train;

pub use gpu_mlp::{GpuMlp, Gradients};
pub use mlp::{Mlp, MlpConfig};
