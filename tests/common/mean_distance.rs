//! A detector written outside the crate, as a researcher would: the per-feature
//! standardised distance to the trusted mean, on host-side activations. Registered at
//! run time by the external-detector and suite tests.

use std::path::Path;

use anyhow::{Context, Result};
use cupbearer::detectors::{read_activations, Detector, LayerScores, SampleSet};
use cupbearer::gpu::GpuContext;
use cupbearer::model::GpuMlp;
use cupbearer::registry::{defaults_of, opt, ConfigSpec, DetectorEntry, Kind};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct MeanDistanceConfig {
    /// Added to every variance, so constant features do not divide by zero.
    eps: f64,
}

impl Default for MeanDistanceConfig {
    fn default() -> Self {
        MeanDistanceConfig { eps: 1e-3 }
    }
}

/// Per activation layer: the trusted mean and variance of each feature.
struct MeanDistance {
    config: MeanDistanceConfig,
    means: Vec<Vec<f32>>,
    variances: Vec<Vec<f32>>,
}

const BATCH: usize = 256;

impl MeanDistance {
    fn build(config: &serde_json::Value) -> Result<Box<dyn Detector>> {
        Ok(Box::new(MeanDistance {
            config: serde_json::from_value(config.clone())?,
            means: Vec::new(),
            variances: Vec::new(),
        }))
    }

    fn load(config: &serde_json::Value, path: &Path) -> Result<Box<dyn Detector>> {
        let bytes = std::fs::read(path)?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let read = |name: String| -> Result<Vec<f32>> {
            let t = st.tensor(&name).with_context(|| name.clone())?;
            Ok(bytemuck::pod_collect_to_vec(t.data()))
        };
        let layers = st.names().len() / 2;
        Ok(Box::new(MeanDistance {
            config: serde_json::from_value(config.clone())?,
            means: (0..layers)
                .map(|l| read(format!("layer{l}.mean")))
                .collect::<Result<_>>()?,
            variances: (0..layers)
                .map(|l| read(format!("layer{l}.var")))
                .collect::<Result<_>>()?,
        }))
    }
}

fn all_layers(model: &GpuMlp) -> Vec<usize> {
    (0..model.config.activation_layers().len()).collect()
}

impl Detector for MeanDistance {
    fn kind(&self) -> &'static str {
        "mean_distance"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).unwrap()
    }

    fn fit(
        &mut self,
        ctx: &GpuContext,
        model: &GpuMlp,
        trusted: &SampleSet<'_>,
        _: bool,
    ) -> Result<()> {
        let n = trusted.indices.len();
        let acts = read_activations(ctx, model, trusted, BATCH, &all_layers(model))?;
        (self.means, self.variances) = acts
            .iter()
            .map(|a| {
                let d = a.len() / n;
                let mut mean = vec![0f64; d];
                let mut sq = vec![0f64; d];
                for row in a.chunks(d) {
                    for (j, &v) in row.iter().enumerate() {
                        mean[j] += v as f64 / n as f64;
                        sq[j] += (v as f64).powi(2) / n as f64;
                    }
                }
                let var = mean
                    .iter()
                    .zip(&sq)
                    .map(|(m, s)| (s - m * m).max(0.0) as f32);
                (mean.iter().map(|&m| m as f32).collect(), var.collect())
            })
            .unzip();
        Ok(())
    }

    fn layer_scores(
        &self,
        ctx: &GpuContext,
        model: &GpuMlp,
        samples: &SampleSet<'_>,
        batch_size: usize,
    ) -> Result<LayerScores> {
        let layers = all_layers(model);
        let acts = read_activations(ctx, model, samples, batch_size, &layers)?;
        let scores = acts
            .iter()
            .zip(self.means.iter().zip(&self.variances))
            .map(|(a, (mean, var))| {
                a.chunks(mean.len())
                    .map(|row| {
                        let sum: f64 = row
                            .iter()
                            .zip(mean.iter().zip(var))
                            .map(|(&x, (&m, &v))| {
                                (x - m) as f64 * (x - m) as f64 / (v as f64 + self.config.eps)
                            })
                            .sum();
                        sum / mean.len() as f64
                    })
                    .collect()
            })
            .collect();
        let names = model
            .config
            .activation_layers()
            .into_iter()
            .map(|l| l.name)
            .collect();
        Ok(LayerScores { names, scores })
    }

    fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        for (l, (m, v)) in self.means.iter().zip(&self.variances).enumerate() {
            tensors.push((format!("layer{l}.mean"), m.clone()));
            tensors.push((format!("layer{l}.var"), v.clone()));
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(name, values)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![values.len()],
                    bytemuck::cast_slice(values),
                )
                .unwrap();
                (name.clone(), view)
            })
            .collect();
        cupbearer::io::write_atomic(path, &safetensors::serialize(views, None)?)
    }
}

pub const ENTRY: DetectorEntry = DetectorEntry {
    name: "mean_distance",
    doc: "Standardised squared distance to the trusted mean, per layer.",
    config: ConfigSpec {
        defaults: defaults_of::<MeanDistanceConfig>,
        options: &[opt(
            "eps",
            &["/eps"],
            Kind::Float,
            "Added to every variance.",
        )],
        nested: &[],
        debug: &[],
    },
    build: MeanDistance::build,
    load: Some(MeanDistance::load),
};
