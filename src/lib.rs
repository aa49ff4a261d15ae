//! cupbearer: mechanistic anomaly detection on a WGSL compute engine.
//!
//! Layout: [`gpu`] is the engine (context, kernels with CPU references), [`checks`] its
//! self-checks (kernels against references, gradients against finite differences), [`data`] the
//! data sets and triggers, [`model`] the MLP and its training, [`run`] the on-disk
//! contract between commands, [`cli`] the `cupbearer` command.

pub mod checks;
#[cfg(feature = "native")]
pub mod cli;
pub mod data;
pub mod detectors;
pub mod eval;
pub mod gpu;
pub mod io;
pub mod model;
pub mod progress;
pub mod registry;
pub mod rng;
pub mod run;
pub mod tasks;
pub mod workflows;
