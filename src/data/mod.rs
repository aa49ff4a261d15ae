//! Data sets: IDX and CIFAR-10 file I/O, MNIST / Fashion-MNIST / CIFAR-10 loading and
//! downloading, synthetic data, stored adversarial examples.

/// Adversarial examples stored next to a classifier run.
pub mod adversarial;
/// Training augmentations (crop, rotation, flip) and their CPU reference.
pub mod augment;
/// Backdoor triggers (data poisoning) applied to these data sets.
pub mod backdoor;
pub mod cifar;
pub mod datasets;
#[cfg(feature = "native")]
pub mod download;
pub mod idx;

pub use datasets::{Dataset, DatasetName, Split};

use std::path::{Path, PathBuf};

/// Env var naming the data directory when no flag is given.
pub const DATA_DIR_ENV: &str = "CUPBEARER_DATA_DIR";

/// Data dir resolution: the flag, then env `CUPBEARER_DATA_DIR` (if non-empty), then
/// `./data`. The flag wins so a single run can be redirected without touching the
/// environment.
pub fn resolve_data_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(dir) = flag {
        return dir.to_path_buf();
    }
    match std::env::var_os(DATA_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from("data"),
    }
}
