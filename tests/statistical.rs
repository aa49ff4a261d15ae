//! The untrusted-data detectors (spectral signatures, QUE) and the tasks' untrusted
//! split: scores against f64 references, reloads, a planted trigger, clear errors.

mod common;

use std::path::Path;

use cupbearer::data::backdoor::{Backdoor, Corner, Trigger};
use cupbearer::data::Dataset;
use cupbearer::detectors::que::{Que, QueConfig};
use cupbearer::detectors::spectral::{Spectral, SpectralConfig};
use cupbearer::detectors::supervised_probe::{Probe, ProbeConfig};
use cupbearer::detectors::{
    read_activations, Aggregation, Detector, FitData, LayerScores, SampleSet, ScoreScale,
};
use cupbearer::gpu::batch::GpuDataset;
use cupbearer::gpu::GpuContext;
use cupbearer::model::{GpuMlp, Mlp, MlpConfig};
use cupbearer::registry::{Registry, TaskEnv};
use cupbearer::run::DetectorRunConfig;
use cupbearer::tasks::backdoor::BackdoorTaskConfig;
use cupbearer::tasks::Task;
use cupbearer::workflows::detector::{
    eval_detector, train_detector, DetectorSource, EvalOptions, FitOptions,
};
use cupbearer::workflows::Output;
use faer::linalg::solvers::Solve;
use faer::Mat;

fn corner(p: f32) -> Backdoor {
    Backdoor {
        trigger: Trigger::Corner {
            corner: Corner::BottomRight,
        },
        p_backdoor: p,
        target_class: 0,
    }
}

/// Host activations of layer `l` of the samples of `sets`, as f64 rows.
fn acts(ctx: &GpuContext, model: &GpuMlp, sets: &[&SampleSet<'_>], l: usize) -> (Vec<f64>, usize) {
    let d = model.config.activation_dims()[l];
    let mut all = Vec::new();
    for s in sets {
        all.extend(read_activations(ctx, model, s, 64, &[l]).unwrap().remove(0));
    }
    (all.into_iter().map(f64::from).collect(), d)
}

/// Two-pass mean and (n−1) covariance.
fn moments(x: &[f64], d: usize) -> (Vec<f64>, Mat<f64>) {
    let n = x.len() / d;
    let mut mean = vec![0.0; d];
    for row in x.chunks(d) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += v / n as f64;
        }
    }
    let cov = Mat::from_fn(d, d, |i, j| {
        x.chunks(d)
            .map(|r| (r[i] - mean[i]) * (r[j] - mean[j]))
            .sum::<f64>()
            / (n - 1) as f64
    });
    (mean, cov)
}

/// The top eigenvector of a symmetric PSD matrix, and its eigenvalue, by power iteration.
fn top_eigen(m: &Mat<f64>) -> (Vec<f64>, f64) {
    let d = m.nrows();
    let mut v: Vec<f64> = (0..d).map(|i| 1.0 + i as f64 * 0.01).collect();
    let mut lambda = 0.0;
    for _ in 0..5000 {
        let w: Vec<f64> = (0..d)
            .map(|i| (0..d).map(|j| m[(i, j)] * v[j]).sum())
            .collect();
        let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        lambda = norm;
        v = w.iter().map(|x| x / norm).collect();
    }
    (v, lambda)
}

/// exp(A) of a small symmetric matrix by its Taylor series (‖A‖ ≤ 4 here).
fn expm(a: &Mat<f64>) -> Mat<f64> {
    let d = a.nrows();
    let mut term = Mat::from_fn(d, d, |i, j| f64::from(u8::from(i == j)));
    let mut sum = term.clone();
    for k in 1..60 {
        let next = &term * a;
        term = Mat::from_fn(d, d, |i, j| next[(i, j)] / k as f64);
        sum = &sum + &term;
    }
    sum
}

fn quad(delta: &[f64], p: &Mat<f64>) -> f64 {
    let d = delta.len();
    (0..d)
        .map(|i| (0..d).map(|j| delta[i] * p[(i, j)] * delta[j]).sum::<f64>())
        .sum()
}

fn close(got: &[f64], want: &[f64], what: &str) {
    close_to(got, want, 1e-3, what);
}

fn close_to(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}: sample {i}: got {g}, want {w}"
        );
    }
}

#[test]
fn max_aggregation_takes_the_largest_standardised_layer_score() {
    let scores = LayerScores {
        names: vec!["a".into(), "b".into()],
        scores: vec![vec![1.0, 2.0, -1.0], vec![10.0, 40.0, 20.0]],
    };
    let scale = |layer: &str, mean, std| ScoreScale {
        layer: layer.into(),
        mean,
        std,
    };
    let scales = [scale("b", 10.0, 10.0), scale("a", 0.0, 1.0)];
    assert_eq!(
        scores.combine(Aggregation::Max, &scales).unwrap(),
        [1.0, 3.0, 1.0]
    );
    assert_eq!(
        scores.combine(Aggregation::Mean, &[]).unwrap(),
        [5.5, 21.0, 9.5]
    );
    let err = scores.combine(Aggregation::Max, &scales[..1]).unwrap_err();
    assert!(err.to_string().contains("score scale of layer a"), "{err}");
    let got = scores.scales();
    assert_eq!((got[0].mean, got[1].mean), (2.0 / 3.0, 70.0 / 3.0));
}

/// The probe's objective minimised in f64 by Newton's method to full precision:
/// standardised features and a bias, mean log-loss + ‖w‖²/(2·c·n) (bias not penalised);
/// returns the log-odds of class 1 as weights and bias on raw features.
fn logistic_reference(x: &[f64], d: usize, y: &[f64], c: &ProbeConfig) -> (Vec<f64>, f64) {
    let n = y.len();
    let k = d + 1;
    let mean: Vec<f64> = (0..d)
        .map(|j| x.chunks(d).map(|r| r[j]).sum::<f64>() / n as f64)
        .collect();
    let sd: Vec<f64> = (0..d)
        .map(|j| {
            let v = x.chunks(d).map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n as f64;
            if v > 0.0 {
                v.sqrt()
            } else {
                1.0
            }
        })
        .collect();
    let rows: Vec<Vec<f64>> = x
        .chunks(d)
        .map(|r| {
            (0..d)
                .map(|j| (r[j] - mean[j]) / sd[j])
                .chain([1.0])
                .collect()
        })
        .collect();
    let lambda = 1.0 / (c.c * n as f64);
    let mut w = vec![0.0; k];
    for _ in 0..100 {
        let mut g = vec![0.0; k];
        let mut h = Mat::<f64>::zeros(k, k);
        for (row, &label) in rows.iter().zip(y) {
            let z: f64 = row.iter().zip(&w).map(|(a, b)| a * b).sum();
            let p = 1.0 / (1.0 + (-z).exp());
            for a in 0..k {
                g[a] += (p - label) * row[a] / n as f64;
                for b in 0..k {
                    h[(a, b)] += p * (1.0 - p) * row[a] * row[b] / n as f64;
                }
            }
        }
        for j in 0..d {
            g[j] += lambda * w[j];
            h[(j, j)] += lambda;
        }
        let rhs = Mat::from_fn(k, 1, |j, _| g[j]);
        let step = h.llt(faer::Side::Lower).unwrap().solve(&rhs);
        for j in 0..k {
            w[j] -= step[(j, 0)];
        }
        if g.iter().all(|v| v.abs() < 1e-13) {
            break;
        }
    }
    let weights: Vec<f64> = (0..d).map(|j| w[j] / sd[j]).collect();
    let b = w[d] - weights.iter().zip(&mean).map(|(w, m)| w * m).sum::<f64>();
    (weights, b)
}

#[test]
fn spectral_and_que_match_f64_references_and_reload_identically() {
    let Some(ctx) = common::gpu() else { return };
    let mlp = Mlp::init(
        &MlpConfig {
            input_shape: [6, 5, 1],
            conv_channels: Vec::new(),
            hidden_dims: vec![7, 5],
            output_dim: 10,
        },
        3,
    )
    .unwrap();
    let model = GpuMlp::upload(&ctx, &mlp).unwrap();
    let data = Dataset::synthetic(300, 6, 5, 1);
    let gdata = GpuDataset::upload(&ctx, &data.as_images()).unwrap();
    let (t_idx, c_idx, a_idx): (Vec<u32>, Vec<u32>, Vec<u32>) = (
        (0..150).collect(),
        (150..220).collect(),
        (220..300).collect(),
    );
    fn set<'a>(
        data: &'a GpuDataset,
        indices: &'a [u32],
        backdoor: Option<Backdoor>,
    ) -> SampleSet<'a> {
        SampleSet {
            data,
            indices,
            backdoor,
            seed: 0,
        }
    }
    let trusted = set(&gdata, &t_idx, None);
    let untrusted = [
        set(&gdata, &c_idx, None),
        set(&gdata, &a_idx, Some(corner(1.0))),
    ];
    let all: Vec<u32> = (0..300).collect();
    let scored = set(&gdata, &all, None);
    let data_for_fit = FitData {
        trusted: Some(&trusted),
        untrusted: &untrusted,
        untrusted_anomalous: &[false, true],
    };
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::builtin();

    let mut spectral = Spectral::new(SpectralConfig::default()).unwrap();
    spectral
        .fit_data(&ctx, &model, &data_for_fit, false)
        .unwrap();
    let got = spectral.layer_scores(&ctx, &model, &scored, 37).unwrap();
    for l in 0..2 {
        let (u, d) = acts(&ctx, &model, &[&untrusted[0], &untrusted[1]], l);
        let (mean, cov) = moments(&u, d);
        let (v, _) = top_eigen(&cov);
        let (x, _) = acts(&ctx, &model, &[&scored], l);
        let want: Vec<f64> = x
            .chunks(d)
            .map(|r| {
                r.iter()
                    .zip(&mean)
                    .zip(&v)
                    .map(|((x, m), v)| (x - m) * v)
                    .sum::<f64>()
                    .powi(2)
            })
            .collect();
        close(&got.scores[l], &want, &format!("spectral layer {l}"));
    }
    let path = dir.path().join("spectral.safetensors");
    spectral.save(&path).unwrap();
    let loaded = registry
        .load_detector("spectral", &spectral.config(), &path)
        .unwrap();
    assert_eq!(loaded.layer_scores(&ctx, &model, &scored, 37).unwrap(), got);

    for whiten_untrusted in [true, false] {
        let config = QueConfig {
            whiten_untrusted,
            ..QueConfig::default()
        };
        let mut que = Que::new(config.clone()).unwrap();
        que.fit_data(&ctx, &model, &data_for_fit, false).unwrap();
        let got = que.layer_scores(&ctx, &model, &scored, 64).unwrap();
        for l in 0..2 {
            let (t, d) = acts(&ctx, &model, &[&trusted], l);
            let (mt, ct) = moments(&t, d);
            let (u, _) = acts(&ctx, &model, &[&untrusted[0], &untrusted[1]], l);
            let (_, cu) = moments(&u, d);
            // Symmetric whitening V·diag(λ^-½)·Vᵀ of the trusted covariance (full rank).
            let eig = ct.self_adjoint_eigen(faer::Side::Lower).unwrap();
            let (vals, vecs) = (eig.S().column_vector(), eig.U());
            let w = Mat::from_fn(d, d, |i, j| vecs[(i, j)] / vals[j].sqrt()) * vecs.transpose();
            let m = if whiten_untrusted {
                w.transpose() * &cu * &w
            } else {
                cu.clone()
            };
            let (_, norm) = top_eigen(&m);
            let scaled = Mat::from_fn(d, d, |i, j| m[(i, j)] * 4.0 / norm);
            let p = &w * expm(&scaled) * w.transpose();
            let (x, _) = acts(&ctx, &model, &[&scored], l);
            let want: Vec<f64> = x
                .chunks(d)
                .map(|r| {
                    let delta: Vec<f64> = r.iter().zip(&mt).map(|(x, m)| x - m).collect();
                    quad(&delta, &p)
                })
                .collect();
            close(
                &got.scores[l],
                &want,
                &format!("que (whiten {whiten_untrusted}) layer {l}"),
            );
        }
        let path = dir.path().join("que.safetensors");
        que.save(&path).unwrap();
        let config = serde_json::to_value(&config).unwrap();
        let loaded = registry.load_detector("que", &config, &path).unwrap();
        assert_eq!(loaded.layer_scores(&ctx, &model, &scored, 64).unwrap(), got);
    }

    // The supervised probe: Newton steps with the sums on the GPU, against the same
    // regularised logistic regression solved in f64 (the log-odds of "anomalous").
    let config = ProbeConfig::default();
    let mut probe = Probe::new(config.clone()).unwrap();
    probe.fit_data(&ctx, &model, &data_for_fit, false).unwrap();
    let got = probe.layer_scores(&ctx, &model, &scored, 37).unwrap();
    for l in 0..2 {
        let (u, d) = acts(&ctx, &model, &[&untrusted[0], &untrusted[1]], l);
        let y: Vec<f64> = (0..u.len() / d)
            .map(|i| f64::from(u8::from(i >= 70)))
            .collect();
        let (w, b) = logistic_reference(&u, d, &y, &config);
        let (x, _) = acts(&ctx, &model, &[&scored], l);
        let want: Vec<f64> = x
            .chunks(d)
            .map(|r| b + r.iter().zip(&w).map(|(x, w)| x * w).sum::<f64>())
            .collect();
        close_to(&got.scores[l], &want, 1e-4, &format!("probe layer {l}"));
    }
    let path = dir.path().join("probe.safetensors");
    probe.save(&path).unwrap();
    let loaded = registry
        .load_detector("supervised_probe", &probe.config(), &path)
        .unwrap();
    assert_eq!(loaded.layer_scores(&ctx, &model, &scored, 64).unwrap(), got);
    // It needs both kinds of untrusted samples.
    let clean_only = FitData {
        trusted: Some(&trusted),
        untrusted: &untrusted[..1],
        untrusted_anomalous: &[false],
    };
    let err = Probe::new(ProbeConfig::default())
        .unwrap()
        .fit_data(&ctx, &model, &clean_only, false)
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("needs both clean and anomalous"),
        "{err:#}"
    );

    // QUE whitens with the trusted covariance: it needs more trusted samples than width.
    let few: Vec<u32> = (0..6).collect();
    let few_trusted = set(&gdata, &few, None);
    let mut que = Que::new(QueConfig::default()).unwrap();
    let err = que
        .fit_data(
            &ctx,
            &model,
            &FitData {
                trusted: Some(&few_trusted),
                untrusted: &untrusted,
                untrusted_anomalous: &[false, true],
            },
            false,
        )
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("needs more than 7 trusted samples"),
        "{err:#}"
    );
}

#[test]
fn untrusted_data_detectors_find_a_planted_trigger() {
    if common::gpu().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = common::backdoored_run(tmp.path());
    let registry = Registry::builtin();
    let env = TaskEnv { data_dir, seed: 0 };
    let task = |backdoor: Backdoor, trusted_fraction: f64| {
        let config = BackdoorTaskConfig {
            run_path: tmp.path().join("classifier"),
            backdoor,
            trusted_fraction,
            clean_train_weight: 0.8,
            ..BackdoorTaskConfig::default()
        };
        registry
            .build_task("backdoor", &serde_json::to_value(config).unwrap(), &env)
            .unwrap()
    };
    let split = task(corner(1.0), 0.5);
    let noise = Backdoor {
        trigger: Trigger::Noise {
            std: 0.5,
            clip: true,
        },
        ..corner(1.0)
    };
    let (trusted, untrusted) = (split.trusted().unwrap(), split.untrusted().unwrap());
    assert_eq!(trusted.indices.len(), 500);
    let sizes: Vec<usize> = untrusted.iter().map(|u| u.samples.indices.len()).collect();
    assert_eq!(sizes, [400, 100]);
    assert!(untrusted[0].samples.backdoor.is_none() && untrusted[1].samples.backdoor.is_some());
    assert!(!untrusted[0].anomalous && untrusted[1].anomalous);
    let mut every: Vec<u32> = trusted.indices.clone();
    every.extend(
        untrusted
            .iter()
            .flat_map(|u| u.samples.indices.iter().copied()),
    );
    every.sort_unstable();
    assert_eq!(
        every,
        (0..1000).collect::<Vec<u32>>(),
        "the split is a partition"
    );

    fn quiet(dir: &Path) -> Output<'_> {
        Output {
            dir: Some(dir),
            overwrite: false,
            progress: false,
        }
    }
    // Spectral signatures need the poison to dominate the untrusted data's top variance
    // direction: on this small model a corner pixel does not (AUROC ~0.48), noise does.
    // Beatrix too finds the noise (0.96) but not the corner pixel (0.42): on post-ReLU
    // dense layers most Gram features have MAD 0, so its score counts rare activations.
    // TED likewise: noise 0.95, the corner pixel 0.61.
    let noisy = task(noise, 0.5);
    let cases = [
        ("que", split.as_ref(), 0.99),
        ("mahalanobis", split.as_ref(), 0.99),
        ("spectral", noisy.as_ref(), 0.9),
        ("supervised_probe", split.as_ref(), 0.99),
        ("beatrix", noisy.as_ref(), 0.9),
        ("ted", noisy.as_ref(), 0.9),
    ];
    let evaluate = |task: &dyn Task, det_dir: &Path, eval_dir: &Path, aggregation| {
        eval_detector(
            task,
            &DetectorSource::Run(det_dir.to_path_buf()),
            &EvalOptions {
                registry: &registry,
                batch_size: 256,
                seed: 0,
                aggregation,
            },
            &quiet(eval_dir),
        )
        .unwrap()
    };
    for (i, (name, task, want)) in cases.into_iter().enumerate() {
        let det_dir = tmp.path().join(format!("{name}{i}"));
        let config = registry
            .detector(name)
            .unwrap()
            .resolve(&Vec::new(), false)
            .unwrap();
        let detector = registry.build_detector(name, &config).unwrap();
        let fit = FitOptions {
            layer_aggregation: Aggregation::Max,
            ..FitOptions::default()
        };
        let report = train_detector(task, detector, &fit, &quiet(&det_dir)).unwrap();
        // Every layer's score scale is recorded, measured on the fit data.
        let run = DetectorRunConfig::load(&det_dir).unwrap();
        let names: Vec<&str> = run.score_scales.iter().map(|s| s.layer.as_str()).collect();
        assert_eq!(names, ["layer0", "layer1"], "{name}");
        assert!(run
            .score_scales
            .iter()
            .all(|s| s.std > 0.0 && s.mean.is_finite()));
        assert_eq!(run.layer_aggregation, Aggregation::Max);
        // The run's default (max), then mean asked for explicitly.
        let max = evaluate(
            task,
            &det_dir,
            &tmp.path().join(format!("{name}{i}-max")),
            None,
        );
        let mean = evaluate(
            task,
            &det_dir,
            &tmp.path().join(format!("{name}{i}-mean")),
            Some(Aggregation::Mean),
        );
        assert_eq!(
            (max.layer_aggregation, mean.layer_aggregation),
            (Aggregation::Max, Aggregation::Mean)
        );
        eprintln!(
            "{name}: AUROC mean {:.4}, max {:.4} ({report:?})",
            mean.auc_roc, max.auc_roc
        );
        for r in [&mean, &max] {
            assert!(r.auc_roc > want, "{name}: AUROC {}", r.auc_roc);
        }
    }

    // All trusted (the default): nothing untrusted to fit on.
    let detector = registry
        .build_detector("spectral", &serde_json::json!({}))
        .unwrap();
    let all_trusted = task(corner(1.0), 1.0);
    let err = train_detector(
        all_trusted.as_ref(),
        detector,
        &FitOptions::default(),
        &quiet(&tmp.path().join("x")),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("fits on untrusted data, but the backdoor task has none"),
        "{msg}"
    );
    assert!(!tmp.path().join("x").exists());
}
