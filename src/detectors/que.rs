//! Quantum entropy scoring (QUE; the later upstream's `QuantumEntropyDetector`): fitted
//! on trusted and untrusted data. Per layer, whitening of the trusted activations,
//! `W = V·diag(λ^−½)·Vᵀ` (eigenvalues at or below `rcond·λ_max` dropped), and the
//! untrusted covariance M, either of the whitened activations (`whiten_untrusted`, the
//! QUE of Diakonikolas et al.; default) or of the raw ones (the upstream's choice). A
//! sample's score is `wᵀ exp(α·M/‖M‖₂) w` with `w = (x − μ_t)·W`, i.e. δᵀPδ with
//! P = W·exp(α·M/‖M‖₂)·Wᵀ, scored on the GPU like Mahalanobis.
//!
//! Fixed from the upstream: P is stored, so a reloaded detector scores (the upstream's
//! could not). The upstream whitens with PCA (`W = V·diag(λ^−½)`), which with the raw M
//! multiplies PCA coordinates by a matrix in feature coordinates: the score then depends
//! on the order and signs of the eigenvectors the solver returns. The symmetric
//! whitening used here gives the same scores as PCA whitening for the whitened M and a
//! well-defined score for the raw one.
//!
//! `detector.safetensors` as Mahalanobis's: `mean` = μ_t, `covariance` = the trusted
//! covariance, `precision` = P.

use anyhow::{bail, Result};
use faer::Mat;
use serde::{Deserialize, Serialize};

use super::linalg::{eigh_descending, to_f32_row_major};
use super::quadratic::{self, LayerStats, Moments, Quadratic, QuadraticFit};
use super::{FitData, SampleSet, Uses};
use crate::gpu::GpuContext;
use crate::model::GpuMlp;
use crate::registry::{defaults_of, opt, ConfigSpec, DetectorEntry, Kind, Opt};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueConfig {
    /// Activation layers to use (0 = first); empty = all.
    pub layers: Vec<usize>,
    /// Whitening drops eigenvalues at or below rcond · λ_max.
    pub rcond: f64,
    /// The exponent's scale α.
    pub alpha: f64,
    /// M = the covariance of the whitened untrusted activations (else of the raw ones).
    pub whiten_untrusted: bool,
    /// Divide each layer's score by its width.
    pub normalize: bool,
    pub batch_size: usize,
    /// Fit on at most this many batches of each kind (0 = all).
    pub max_batches: usize,
    /// Columns per GPU block of P (0 = as many as one storage binding holds).
    pub block_columns: usize,
}

impl Default for QueConfig {
    /// The upstream's α = 4 and rcond 1e-5; whitened M (see the module docs).
    fn default() -> Self {
        QueConfig {
            layers: Vec::new(),
            rcond: 1e-5,
            alpha: 4.0,
            whiten_untrusted: true,
            normalize: false,
            batch_size: 2048,
            max_batches: 0,
            block_columns: 0,
        }
    }
}

/// The QUE detector.
pub type Que = Quadratic<QueConfig>;

impl QueConfig {
    /// P of one layer from its trusted and untrusted moments.
    pub fn score_matrix(&self, trusted: &Moments, untrusted: &Moments) -> Result<Mat<f64>> {
        let d = trusted.mean.len();
        if trusted.count as usize <= d {
            bail!(
                "QUE whitens layer {} of width {d} with the trusted covariance, which needs \
                 more than {d} trusted samples (got {}): keep more data trusted",
                trusted.layer,
                trusted.count
            );
        }
        let (values, v) = eigh_descending(&trusted.sigma)?;
        let cutoff = self.rcond * values.first().copied().unwrap_or(0.0).max(0.0);
        let scale: Vec<f64> = values
            .iter()
            .map(|&l| if l > cutoff { l.powf(-0.5) } else { 0.0 })
            .collect();
        // Symmetric (ZCA) whitening W = V·diag(λ^−½)·Vᵀ: with whitened M the score is
        // the same for any whitening, and with raw M it keeps w in M's coordinates.
        let scaled = Mat::from_fn(d, d, |i, j| v[(i, j)] * scale[j]);
        let w = &scaled * v.transpose();
        let m = if self.whiten_untrusted {
            w.transpose() * &untrusted.sigma * &w
        } else {
            untrusted.sigma.clone()
        };
        let (mv, mu) = eigh_descending(&m)?;
        let norm = mv.first().copied().unwrap_or(0.0);
        if norm.is_nan() || norm <= 0.0 {
            bail!(
                "layer {}: the untrusted activations do not vary: QUE has nothing to score",
                trusted.layer
            );
        }
        let e: Vec<f64> = mv.iter().map(|&x| (self.alpha * x / norm).exp()).collect();
        // exp(αM/‖M‖) = U·diag(e)·Uᵀ, through faer's blocked products.
        let scaled = Mat::from_fn(d, d, |i, k| mu[(i, k)] * e[k]);
        let exp = &scaled * mu.transpose();
        Ok(&w * exp * w.transpose())
    }
}

impl QuadraticFit for QueConfig {
    const KIND: &'static str = "que";

    fn uses() -> Uses {
        Uses {
            trusted: true,
            untrusted: true,
        }
    }

    fn validate(&self) -> Result<()> {
        if !(self.rcond >= 0.0 && self.rcond < 1.0) {
            bail!("rcond must be in [0, 1), got {}", self.rcond);
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!("alpha must be > 0, got {}", self.alpha);
        }
        Ok(())
    }

    fn batching(&self) -> (usize, usize, usize) {
        (self.batch_size, self.max_batches, self.block_columns)
    }

    fn normalize(&self) -> bool {
        self.normalize
    }

    async fn fit(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        data: &FitData<'_>,
        progress: bool,
    ) -> Result<Vec<LayerStats>> {
        let trusted = data.trusted.expect("checked by Quadratic");
        let layers = quadratic::select_layers(model, &self.layers)?;
        let opts = self.moment_options("trusted");
        let t = quadratic::moments(ctx, model, &[trusted], &layers, &opts, progress).await?;
        let sets: Vec<&SampleSet<'_>> = data.untrusted.iter().collect();
        let opts = self.moment_options("untrusted");
        let u = quadratic::moments(ctx, model, &sets, &layers, &opts, progress).await?;
        t.into_iter()
            .zip(&u)
            .map(|(t, u)| {
                Ok(LayerStats {
                    precision: to_f32_row_major(&self.score_matrix(&t, u)?),
                    covariance: to_f32_row_major(&t.sigma),
                    layer: t.layer,
                    count: t.count,
                    mean: t.mean,
                })
            })
            .collect()
    }
}

const OPTIONS: &[Opt] = &[
    quadratic::COMMON_OPTIONS[0],
    quadratic::COMMON_OPTIONS[1],
    quadratic::COMMON_OPTIONS[2],
    quadratic::COMMON_OPTIONS[3],
    opt("train.rcond", &["/rcond"], Kind::Float, "Whitening drops eigenvalues at or below rcond x the largest."),
    opt("alpha", &["/alpha"], Kind::Float, "Scale of the exponent, exp(alpha M / |M|)."),
    opt("whiten_untrusted", &["/whiten_untrusted"], Kind::Bool, "M = covariance of the whitened untrusted activations (false: of the raw ones, as upstream)."),
];

/// The registry entry.
pub const ENTRY: DetectorEntry = DetectorEntry {
    name: "que",
    doc: "Quantum entropy scoring of trusted-whitened activations against the untrusted covariance (needs --task.trusted_fraction < 1).",
    config: ConfigSpec {
        defaults: defaults_of::<QueConfig>,
        options: OPTIONS,
        nested: &[],
        debug: quadratic::DEBUG,
    },
    build: Que::build,
    load: Some(Que::load),
};
