//! Host-side f64 linear algebra for the detectors (nalgebra).

use anyhow::{bail, Result};
use nalgebra::DMatrix;

/// Regularisation applied to a covariance before inversion.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Regularization {
    /// Σ ← (1−s)·Σ + s·(tr Σ / d)·I. (Upstream cupbearer used tr Σ without the 1/d.)
    pub shrinkage: f64,
    /// Σ ← Σ + ε·I: gives zero-variance directions (e.g. a pixel that is always 0
    /// in clean data) a finite, large weight instead of none.
    pub ridge: f64,
}

/// `C / (n − 1)` as a d x d matrix (Bessel-corrected covariance).
pub fn covariance(gram: &[f64], d: usize, n: u64) -> Result<DMatrix<f64>> {
    if n < 2 {
        bail!("a covariance needs at least 2 samples, got {n}");
    }
    if gram.len() != d * d {
        bail!("Gram matrix has {} entries, expected {d}x{d}", gram.len());
    }
    // The GPU accumulates in f32: symmetrise to remove rounding asymmetry.
    let c = DMatrix::from_row_slice(d, d, gram) / (n - 1) as f64;
    Ok((&c + c.transpose()) * 0.5)
}

pub fn regularize(mut sigma: DMatrix<f64>, reg: Regularization) -> Result<DMatrix<f64>> {
    let d = sigma.nrows();
    if !(0.0..=1.0).contains(&reg.shrinkage) || reg.ridge < 0.0 {
        bail!("shrinkage must be in [0, 1] and ridge >= 0, got {reg:?}");
    }
    if reg.shrinkage > 0.0 {
        let target = sigma.trace() / d as f64;
        sigma *= 1.0 - reg.shrinkage;
        for i in 0..d {
            sigma[(i, i)] += reg.shrinkage * target;
        }
    }
    for i in 0..d {
        sigma[(i, i)] += reg.ridge;
    }
    Ok(sigma)
}

/// Pseudo-inverse of a symmetric matrix by eigendecomposition: eigenvalues at or
/// below `rcond · max |λ|` are treated as zero (numpy's `pinv(hermitian=True)`).
pub fn pinv_symmetric(sigma: &DMatrix<f64>, rcond: f64) -> Result<DMatrix<f64>> {
    if sigma.iter().any(|v| !v.is_finite()) {
        bail!("covariance has non-finite entries (NaN/inf activations?)");
    }
    let eig = sigma.clone().symmetric_eigen();
    let max = eig.eigenvalues.iter().fold(0f64, |m, v| m.max(v.abs()));
    let cutoff = rcond * max;
    let inv: Vec<f64> = eig
        .eigenvalues
        .iter()
        .map(|&l| if l.abs() > cutoff { 1.0 / l } else { 0.0 })
        .collect();
    let v = &eig.eigenvectors;
    let scaled = DMatrix::from_fn(v.nrows(), v.ncols(), |i, j| v[(i, j)] * inv[j]);
    Ok(&scaled * v.transpose())
}
