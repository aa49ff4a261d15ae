//! TED: the detector against a host reference, reloads and bad settings (its k-NN
//! kernels: tests/kernels.rs).

mod common;

use cupbearer::detectors::linalg::pinv_symmetric;
use cupbearer::detectors::ted::{Ted, TedConfig};
use cupbearer::detectors::{read_activations, Detector, SampleSet};
use cupbearer::gpu::batch::{FloatImages, GpuDataset};
use cupbearer::gpu::knn::order_reference;
use cupbearer::model::{GpuMlp, Mlp, MlpConfig};
use cupbearer::registry::Registry;
use faer::Mat;

/// Host TED: per reference layer the rank vectors of `queries` against `reference`
/// unit rows (each query i skipping reference column i when `self_excluded`).
fn trajectories(
    reference: &[Vec<f64>],
    queries: &[Vec<f64>],
    n_ref: usize,
    k: usize,
    self_excluded: bool,
) -> Vec<Vec<Vec<f64>>> {
    let layers = reference.len();
    let n_q = queries[0].len() / (reference[0].len() / n_ref);
    let unit = |x: &[f64], d: usize| -> Vec<f64> {
        x.chunks(d)
            .flat_map(|r| {
                let n = r.iter().map(|v| v * v).sum::<f64>().sqrt();
                r.iter()
                    .map(move |v| if n > 0.0 { v / n } else { 0.0 })
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let widths: Vec<usize> = reference.iter().map(|r| r.len() / n_ref).collect();
    let q: Vec<Vec<f64>> = queries
        .iter()
        .zip(&widths)
        .map(|(x, &d)| unit(x, d))
        .collect();
    let sims = |l: usize, i: usize| -> Vec<f64> {
        let d = widths[l];
        let qi = &q[l][i * d..(i + 1) * d];
        reference[l]
            .chunks(d)
            .map(|t| t.iter().zip(qi).map(|(a, b)| a * b).sum())
            .collect()
    };
    (0..layers)
        .map(|r| {
            (0..n_q)
                .flat_map(|i| {
                    let excl = self_excluded.then_some(i);
                    let near = order_reference(&sims(r, i), excl);
                    let orders: Vec<Vec<usize>> = (0..layers)
                        .map(|l| order_reference(&sims(l, i), excl))
                        .collect();
                    near[..k]
                        .iter()
                        .map(|&j| {
                            (0..layers)
                                .filter(|&l| l != r)
                                .map(|l| orders[l].iter().position(|&o| o == j).unwrap() as f64)
                                .collect::<Vec<f64>>()
                        })
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .collect()
}

#[test]
fn ted_matches_a_host_reference_and_reloads_identically() {
    let Some(ctx) = common::gpu() else { return };
    let registry = Registry::builtin();
    let mlp = Mlp::init(
        &MlpConfig {
            input_shape: [6, 5, 1],
            conv_channels: Vec::new(),
            hidden_dims: vec![7, 6, 5],
            output_dim: 10,
        },
        4,
    )
    .unwrap();
    let model = GpuMlp::upload(&ctx, &mlp).unwrap();
    // Random pixels: activations are then nowhere near collinear, so f32 and f64
    // similarities order the same way.
    let pixels: Vec<f32> = common::random(150 * 30, 11)
        .iter()
        .map(|v| v.abs())
        .collect();
    let labels = vec![0u32; 150];
    let images = FloatImages {
        pixels: &pixels,
        labels: &labels,
        shape: [6, 5, 1],
        num_classes: 10,
    };
    let gdata = GpuDataset::upload_f32(&ctx, "random", &images).unwrap();
    let (t_idx, s_idx): (Vec<u32>, Vec<u32>) = ((0..70).collect(), (70..150).collect());
    let set = |indices| SampleSet {
        data: &gdata,
        indices,
        backdoor: None,
        seed: 0,
    };
    let (trusted, scored) = (set(&t_idx), set(&s_idx));
    let config = TedConfig {
        n_neighbors: 3,
        max_samples: 61,
        batch_size: 16,
        ..TedConfig::default()
    };
    let mut det = Ted::new(config.clone()).unwrap();
    det.fit(&ctx, &model, &trusted, false).unwrap();
    let got = det.layer_scores(&ctx, &model, &scored, 23).unwrap();
    assert_eq!(got.names, ["layer0", "layer1", "layer2"]);

    let host = |s: &SampleSet<'_>| -> Vec<Vec<f64>> {
        read_activations(&ctx, &model, s, 64, &[0, 1, 2])
            .unwrap()
            .into_iter()
            .map(|a| a.into_iter().map(f64::from).collect())
            .collect()
    };
    let reference: Vec<Vec<f64>> = det
        .trusted
        .iter()
        .map(|t| t.iter().map(|&v| f64::from(v)).collect())
        .collect();
    let fit_traj = trajectories(&reference, &host(&set(&t_idx[..61])), 61, 3, true);
    let score_traj = trajectories(&reference, &host(&scored), 61, 3, false);
    for r in 0..3 {
        let v = &fit_traj[r];
        let mean: Vec<f64> = (0..2)
            .map(|j| v.iter().map(|x| x[j]).sum::<f64>() / v.len() as f64)
            .collect();
        let cov = Mat::from_fn(2, 2, |a, b| {
            v.iter()
                .map(|x| (x[a] - mean[a]) * (x[b] - mean[b]))
                .sum::<f64>()
                / (v.len() - 1) as f64
        });
        let p = pinv_symmetric(&cov, 1e-5).unwrap();
        let want: Vec<f64> = score_traj[r]
            .chunks(3)
            .map(|nbrs| {
                nbrs.iter()
                    .map(|x| {
                        let d = [x[0] - mean[0], x[1] - mean[1]];
                        (0..2)
                            .map(|a| (0..2).map(|b| d[a] * p[(a, b)] * d[b]).sum::<f64>())
                            .sum::<f64>()
                    })
                    .sum::<f64>()
                    / 3.0
            })
            .collect();
        let got32: Vec<f32> = got.scores[r].iter().map(|&v| v as f32).collect();
        common::assert_close(
            &got32,
            &want,
            1e-4,
            1e-4,
            &format!("ted reference layer {r}"),
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ted.safetensors");
    det.save(&path).unwrap();
    let loaded = registry.load_detector("ted", &det.config(), &path).unwrap();
    assert_eq!(loaded.layer_scores(&ctx, &model, &scored, 64).unwrap(), got);

    // Bad settings are clear errors.
    let one_layer = TedConfig {
        layers: vec![1],
        ..config.clone()
    };
    let err = Ted::new(one_layer)
        .unwrap()
        .fit(&ctx, &model, &trusted, false)
        .unwrap_err();
    assert!(format!("{err:#}").contains("needs at least two"), "{err:#}");
    let few = set(&t_idx[..4]);
    let err = Ted::new(config)
        .unwrap()
        .fit(&ctx, &model, &few, false)
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("needs more than 4 trusted samples"),
        "{err:#}"
    );
    let err = registry
        .build_detector(
            "ted",
            &serde_json::json!({"neighbor_aggregation": "median"}),
        )
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("median"), "{err:#}");
}
