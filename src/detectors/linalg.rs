//! Host-side f64 linear algebra for the detectors (faer: blocked and multi-threaded, so
//! a CNN layer's 6272 x 6272 covariance decomposes in seconds, where an unblocked
//! eigensolver takes the better part of an hour).

use anyhow::{anyhow, bail, Result};
use faer::{Mat, Side};

/// Regularisation applied to a covariance before inversion.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Regularization {
    /// Σ ← (1−s)·Σ + s·(tr Σ / d)·I. (Upstream cupbearer used tr Σ without the 1/d.)
    pub shrinkage: f64,
    /// Σ ← Σ + ε·I: gives zero-variance directions (e.g. a pixel that is always 0
    /// in clean data) a finite, large weight instead of none.
    pub ridge: f64,
}

impl Regularization {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.shrinkage) || self.ridge.is_nan() || self.ridge < 0.0 {
            bail!("shrinkage must be in [0, 1] and ridge >= 0, got {self:?}");
        }
        Ok(())
    }
}

/// `C / (n − 1)` from a row-major d x d Gram matrix (Bessel-corrected covariance).
pub fn covariance(gram: &[f32], d: usize, n: u64) -> Result<Mat<f64>> {
    if n < 2 {
        bail!("a covariance needs at least 2 samples, got {n}");
    }
    if gram.len() != d * d {
        bail!("Gram matrix has {} entries, expected {d}x{d}", gram.len());
    }
    // The GPU accumulates in f32: symmetrise to remove rounding asymmetry.
    let scale = 0.5 / (n - 1) as f64;
    Ok(Mat::from_fn(d, d, |i, j| {
        (gram[i * d + j] as f64 + gram[j * d + i] as f64) * scale
    }))
}

pub fn regularize(mut sigma: Mat<f64>, reg: Regularization) -> Result<Mat<f64>> {
    reg.validate()?;
    let d = sigma.nrows();
    if reg.shrinkage > 0.0 {
        let target = trace(&sigma) / d as f64;
        for j in 0..d {
            for i in 0..d {
                sigma[(i, j)] *= 1.0 - reg.shrinkage;
            }
            sigma[(j, j)] += reg.shrinkage * target;
        }
    }
    for i in 0..d {
        sigma[(i, i)] += reg.ridge;
    }
    Ok(sigma)
}

pub fn trace(m: &Mat<f64>) -> f64 {
    (0..m.nrows().min(m.ncols())).map(|i| m[(i, i)]).sum()
}

/// Pseudo-inverse of a symmetric matrix by eigendecomposition: eigenvalues at or
/// below `rcond · max |λ|` are treated as zero (numpy's `pinv(hermitian=True)`).
pub fn pinv_symmetric(sigma: &Mat<f64>, rcond: f64) -> Result<Mat<f64>> {
    let d = sigma.nrows();
    if (0..d).any(|j| (0..d).any(|i| !sigma[(i, j)].is_finite())) {
        bail!("covariance has non-finite entries (NaN/inf activations?)");
    }
    let eig = sigma
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| anyhow!("eigendecomposition of the {d}x{d} covariance failed: {e:?}"))?;
    let values = eig.S().column_vector();
    let max = (0..d).fold(0f64, |m, j| m.max(values[j].abs()));
    let cutoff = rcond * max;
    let inv: Vec<f64> = (0..d)
        .map(|j| {
            let l = values[j];
            if l.abs() > cutoff {
                1.0 / l
            } else {
                0.0
            }
        })
        .collect();
    let u = eig.U();
    let scaled = Mat::from_fn(d, d, |i, j| u[(i, j)] * inv[j]);
    Ok(&scaled * u.transpose())
}

/// A symmetric matrix as row-major f32 (the layout the GPU and safetensors use).
pub fn to_f32_row_major(m: &Mat<f64>) -> Vec<f32> {
    let (rows, cols) = (m.nrows(), m.ncols());
    (0..rows * cols)
        .map(|k| m[(k / cols, k % cols)] as f32)
        .collect()
}

/// Eigendecomposition of a symmetric matrix: eigenvalues largest first, and the
/// eigenvectors as the columns of the matrix, in the same order.
pub fn eigh_descending(sigma: &Mat<f64>) -> Result<(Vec<f64>, Mat<f64>)> {
    let d = sigma.nrows();
    if (0..d).any(|j| (0..d).any(|i| !sigma[(i, j)].is_finite())) {
        bail!("matrix has non-finite entries (NaN/inf activations?)");
    }
    let eig = sigma
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| anyhow!("eigendecomposition of a {d}x{d} matrix failed: {e:?}"))?;
    let values = eig.S().column_vector();
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    let u = eig.U();
    Ok((
        order.iter().map(|&j| values[j]).collect(),
        Mat::from_fn(d, d, |i, k| u[(i, order[k])]),
    ))
}
