//! Spectral signatures (Tran et al. 2018, the later upstream's `SpectralSignatureDetector`):
//! fitted on untrusted data only. Per layer the untrusted mean μ_u and the top `top_k`
//! eigenvectors V of the untrusted covariance; a sample's score is its squared
//! projection `Σ_k ((x − μ_u)·v_k)²` (upstream: k = 1), i.e. δᵀPδ with P = V·Vᵀ, scored
//! on the GPU like Mahalanobis. Stored like Mahalanobis (`covariance` = the untrusted
//! covariance, `precision` = P), so a reloaded detector scores identically.

use anyhow::{bail, Result};
use faer::Mat;
use serde::{Deserialize, Serialize};

use super::linalg::{eigh_descending, to_f32_row_major};
use super::quadratic::{self, LayerStats, Quadratic, QuadraticFit};
use super::{FitData, SampleSet, Uses};
use crate::gpu::GpuContext;
use crate::model::GpuMlp;
use crate::registry::{defaults_of, opt, ConfigSpec, DetectorEntry, Kind, Opt};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpectralConfig {
    /// Activation layers to use (0 = first); empty = all.
    pub layers: Vec<usize>,
    /// Eigenvectors of the untrusted covariance a score projects on.
    pub top_k: usize,
    /// Divide each layer's score by its width.
    pub normalize: bool,
    pub batch_size: usize,
    /// Fit on at most this many batches (0 = all).
    pub max_batches: usize,
    /// Columns per GPU block of P (0 = as many as one storage binding holds).
    pub block_columns: usize,
}

impl Default for SpectralConfig {
    /// The upstream's: the top eigenvector, raw scores.
    fn default() -> Self {
        SpectralConfig {
            layers: Vec::new(),
            top_k: 1,
            normalize: false,
            batch_size: 2048,
            max_batches: 0,
            block_columns: 0,
        }
    }
}

/// The spectral-signatures detector.
pub type Spectral = Quadratic<SpectralConfig>;

/// P = V_k·V_kᵀ of the top `k` eigenvectors of `sigma`.
pub fn top_projector(sigma: &Mat<f64>, k: usize) -> Result<Mat<f64>> {
    let d = sigma.nrows();
    if k > d {
        bail!("top_k {k} exceeds the layer's width {d}");
    }
    let (_, v) = eigh_descending(sigma)?;
    let top = v.subcols(0, k);
    Ok(top * top.transpose())
}

impl QuadraticFit for SpectralConfig {
    const KIND: &'static str = "spectral";

    fn uses() -> Uses {
        Uses {
            trusted: false,
            untrusted: true,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.top_k == 0 {
            bail!("top_k must be >= 1");
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
        let layers = quadratic::select_layers(model, &self.layers)?;
        let opts = self.moment_options("untrusted");
        let sets: Vec<&SampleSet<'_>> = data.untrusted.iter().collect();
        let moments = quadratic::moments(ctx, model, &sets, &layers, &opts, progress).await?;
        moments
            .into_iter()
            .map(|m| {
                Ok(LayerStats {
                    precision: to_f32_row_major(&top_projector(&m.sigma, self.top_k)?),
                    covariance: to_f32_row_major(&m.sigma),
                    layer: m.layer,
                    count: m.count,
                    mean: m.mean,
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
    opt(
        "top_k",
        &["/top_k"],
        Kind::Int,
        "Eigenvectors of the untrusted covariance a score projects on.",
    ),
];

/// The registry entry.
pub const ENTRY: DetectorEntry = DetectorEntry {
    name: "spectral",
    doc: "Spectral signatures: squared projection on the top eigenvectors of the untrusted covariance (needs --task.trusted_fraction < 1).",
    config: ConfigSpec {
        defaults: defaults_of::<SpectralConfig>,
        options: OPTIONS,
        nested: &[],
        debug: quadratic::DEBUG,
    },
    build: Spectral::build,
    load: Some(Spectral::load),
};
