//! A detector written outside the crate, as a researcher would: the per-feature
//! standardised distance to the trusted mean, on host-side activations. It is registered
//! at run time and fitted and evaluated through the same workflows as the built-in
//! detectors, and must find a planted corner trigger.

mod common;

use std::path::Path;

use anyhow::{Context, Result};
use cupbearer::data::backdoor::{Backdoor, Corner, Trigger};
use cupbearer::data::{Dataset, DatasetName};
use cupbearer::detectors::{read_activations, Detector, LayerScores, SampleSet};
use cupbearer::gpu::GpuContext;
use cupbearer::model::{GpuMlp, MlpConfig};
use cupbearer::registry::{defaults_of, opt, ConfigSpec, DetectorEntry, Kind, Registry, TaskEnv};
use cupbearer::run::{ClassifierRunConfig, TrainDataConfig, TrainingConfig};
use cupbearer::tasks::backdoor::BackdoorTaskConfig;
use cupbearer::workflows::classifier::{train_classifier, RunOptions};
use cupbearer::workflows::detector::{eval_detector, train_detector, DetectorSource, EvalOptions};
use cupbearer::workflows::Output;
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

const ENTRY: DetectorEntry = DetectorEntry {
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

#[test]
fn a_detector_registered_at_run_time_finds_a_planted_trigger() {
    if common::gpu().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    common::write_mnist_like(
        &data_dir,
        &Dataset::synthetic(1000, 12, 10, 1),
        &Dataset::synthetic(400, 12, 10, 2),
    );
    let corner = Backdoor {
        trigger: Trigger::Corner {
            corner: Corner::BottomRight,
        },
        p_backdoor: 0.2,
        target_class: 0,
    };
    let run_dir = tmp.path().join("classifier");
    let config = ClassifierRunConfig::new(
        TrainDataConfig {
            dataset: DatasetName::Mnist,
            max_size: None,
            backdoor: Some(corner),
        },
        MlpConfig {
            hidden_dims: vec![48, 32],
            output_dim: 10,
            ..MlpConfig::default()
        },
        TrainingConfig {
            num_epochs: 4,
            ..TrainingConfig::default()
        },
    );
    let quiet = |dir| Output {
        dir: Some(dir),
        overwrite: false,
        progress: false,
    };
    let metrics = train_classifier(
        config,
        &RunOptions {
            dir: Some(run_dir.clone()),
            test_limit: None,
            data_dir: data_dir.clone(),
            overwrite: false,
            eval_batch_size: 512,
            progress: false,
        },
    )
    .unwrap();
    assert!(
        metrics.attack_success_rate.unwrap() > 0.9,
        "{}",
        metrics.summary()
    );

    let mut registry = Registry::builtin();
    registry.register_detector(ENTRY);
    let entry = registry.detector("mean-distance").unwrap();
    let raw = vec![("eps".to_string(), vec!["0.01".to_string()])];
    let detector_config = entry.resolve(&raw, false).unwrap();
    assert_eq!(detector_config["eps"], 0.01);
    // Anomalies: Gaussian noise on the test images (a single corner pixel is too faint
    // for a per-feature distance; Mahalanobis needs the covariance for that).
    let task_config = BackdoorTaskConfig {
        run_path: run_dir,
        backdoor: Backdoor {
            trigger: Trigger::Noise {
                std: 0.5,
                clip: true,
            },
            p_backdoor: 1.0,
            target_class: 0,
        },
        ..BackdoorTaskConfig::default()
    };
    let env = TaskEnv { data_dir, seed: 0 };
    let task = registry
        .build_task(
            "backdoor",
            &serde_json::to_value(task_config).unwrap(),
            &env,
        )
        .unwrap();
    let det_dir = tmp.path().join("detector");
    let detector = registry
        .build_detector("mean_distance", &detector_config)
        .unwrap();
    train_detector(task.as_ref(), detector, 0, &quiet(&det_dir)).unwrap();
    let eval_dir = tmp.path().join("eval");
    let report = eval_detector(
        task.as_ref(),
        &DetectorSource::Run(det_dir.clone()),
        &EvalOptions {
            registry: &registry,
            batch_size: 64,
            seed: 0,
        },
        &quiet(&eval_dir),
    )
    .unwrap();
    assert!(
        report.auc_roc > 0.95,
        "AUROC {} {:?}",
        report.auc_roc,
        report.layers
    );
    assert_eq!(report.layers.len(), 2);
    assert!(eval_dir.join("scores.csv").is_file());

    // Without the registration, the stored run names a detector nobody knows.
    let err = eval_detector(
        task.as_ref(),
        &DetectorSource::Run(tmp.path().join("detector")),
        &EvalOptions {
            registry: &Registry::builtin(),
            batch_size: 64,
            seed: 0,
        },
        &Output {
            dir: None,
            overwrite: false,
            progress: false,
        },
    )
    .err()
    .unwrap();
    assert!(
        format!("{err:#}").contains("unknown detector \"mean_distance\""),
        "{err:#}"
    );
}
