//! Run-directory workflows: the commands as library calls. This is the only code that
//! creates a [`GpuContext`] for a command, reads and writes run directories and reports
//! progress; the library modules (`gpu`, `model`, `data`, `detectors`, `tasks`, `eval`)
//! never import it. The CLI and the example call these functions.

pub mod adversarial;
#[cfg(feature = "native")]
pub mod backdoor_mnist;
pub mod classifier;
pub mod detector;
pub mod import;
pub mod kernels;
pub mod suite;

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

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
    // Always said: a result made with edited kernels must not pass for the built-in's.
    let overrides = ctx.shaders.overrides();
    for o in overrides.iter().filter(|o| o.edited) {
        eprintln!(
            "kernel file {}.wgsl overridden by {} (edited, sha256 {})",
            o.kernel,
            o.path.display(),
            &o.sha256[..12]
        );
    }
    let same: Vec<String> = overrides
        .iter()
        .filter(|o| !o.edited)
        .map(|o| format!("{}.wgsl", o.kernel))
        .collect();
    if !same.is_empty() {
        eprintln!(
            "kernel files identical to the built-in ones, from the shader dir: {}",
            same.join(", ")
        );
    }
    Ok(ctx)
}

/// The lock file of a claimed output directory.
pub const LOCK_FILE: &str = ".cupbearer.lock";

/// An output directory held by one run: an exclusive lock on `DIR/.cupbearer.lock`,
/// released when the claim is dropped or the process ends (even by `kill -9`), so a
/// second run into the same directory fails at once instead of mixing its files with
/// the first's. Dropping the claim removes the lock file, and the directory too if the
/// claim created it and nothing was written.
pub struct Claim {
    dir: PathBuf,
    created: bool,
    _lock: File,
}

/// Claims `dir` (created if missing) for this run.
pub fn claim(dir: &Path) -> Result<Claim> {
    let created = !dir.exists();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(LOCK_FILE);
    // Another run may remove the lock file between our open and our lock: retry until the
    // locked file is the one at `path`.
    for _ in 0..8 {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => bail!(
                "{} is in use by another cupbearer run (it holds {LOCK_FILE}); wait for that \
                 run to end or choose another output directory",
                dir.display()
            ),
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        if same_file(&file, &path) {
            return Ok(Claim {
                dir: dir.to_path_buf(),
                created,
                _lock: file,
            });
        }
    }
    bail!("could not lock {}: it keeps being replaced", path.display())
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &File, path: &Path) -> bool {
    path.exists()
}

impl Drop for Claim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join(LOCK_FILE));
        if self.created {
            // Only succeeds if the run wrote nothing.
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}
