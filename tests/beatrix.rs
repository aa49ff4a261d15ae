//! Beatrix: the detector's exact medians and scores against a host reference (dense
//! and conv layers), reloads, and bad configurations (its kernels: tests/kernels.rs).

mod common;

use cupbearer::data::Dataset;
use cupbearer::detectors::beatrix::{Beatrix, BeatrixConfig};
use cupbearer::detectors::{read_activations, Detector, SampleSet};
use cupbearer::gpu::batch::GpuDataset;
use cupbearer::gpu::beatrix::{gram_deviation_reference, gram_features_reference, GramShape};
use cupbearer::model::{GpuMlp, Mlp, MlpConfig};
use cupbearer::registry::Registry;

/// The lower median.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) / 2]
}

#[test]
fn beatrix_matches_a_host_reference_and_reloads_identically() {
    let Some(ctx) = common::gpu() else { return };
    let registry = Registry::builtin();
    // A conv block (pooled 3 x 2 positions x 3 channels) and two dense layers.
    let mlp = Mlp::init(
        &MlpConfig {
            input_shape: [6, 5, 1],
            conv_channels: vec![3],
            hidden_dims: vec![7, 5],
            output_dim: 10,
        },
        3,
    )
    .unwrap();
    let model = GpuMlp::upload(&ctx, &mlp).unwrap();
    let data = Dataset::synthetic(200, 6, 5, 1);
    let gdata = GpuDataset::upload(&ctx, &data.as_images()).unwrap();
    let (t_idx, s_idx): (Vec<u32>, Vec<u32>) = ((0..120).collect(), (100..200).collect());
    let set = |indices| SampleSet {
        data: &gdata,
        indices,
        backdoor: None,
        seed: 0,
    };
    let (trusted, scored) = (set(&t_idx), set(&s_idx));
    let config = BeatrixConfig {
        powers: vec![1, 2, 3],
        mad_scale: 2.0,
        max_samples: 101,
        batch_size: 32,
        ..BeatrixConfig::default()
    };
    let mut det = Beatrix::new(config.clone()).unwrap();
    det.fit(&ctx, &model, &trusted, false).unwrap();
    let got = det.layer_scores(&ctx, &model, &scored, 45).unwrap();
    assert_eq!(got.names, ["layer0", "layer1", "layer2"]);
    let fitted = set(&t_idx[..101]);
    for (l, (positions, channels)) in [(6, 3), (1, 7), (1, 5)].into_iter().enumerate() {
        let shape = |rows| GramShape {
            rows,
            positions,
            channels,
        };
        let f = shape(1).features();
        let host = |s: &SampleSet<'_>| -> Vec<f64> {
            let a = read_activations(&ctx, &model, s, 64, &[l])
                .unwrap()
                .remove(0);
            a.into_iter().map(f64::from).collect()
        };
        let (xt, xs) = (host(&fitted), host(&scored));
        let mut want = vec![0.0; s_idx.len()];
        for (pi, power) in [1, 2, 3].into_iter().enumerate() {
            let gt = gram_features_reference(&xt, shape(101), power);
            let (mut lo, mut hi) = (Vec::new(), Vec::new());
            for j in 0..f {
                let mut col: Vec<f64> = gt.chunks(f).map(|r| r[j]).collect();
                let m = median(&mut col);
                let mut dev: Vec<f64> = col.iter().map(|v| (v - m).abs()).collect();
                let mad = median(&mut dev);
                let stats = &det.stats[l].powers[pi];
                let what = format!("layer {l} power {power} feature {j}");
                assert!(
                    (f64::from(stats.median[j]) - m).abs() <= 1e-5 * m.abs().max(1.0),
                    "median {what}"
                );
                assert!(
                    (f64::from(stats.mad[j]) - mad).abs() <= 1e-5 * mad.abs().max(1.0),
                    "mad {what}"
                );
                lo.push(m - 2.0 * mad);
                hi.push(m + 2.0 * mad);
            }
            let gs = gram_features_reference(&xs, shape(s_idx.len()), power);
            for (w, g) in want.iter_mut().zip(gs.chunks(f)) {
                *w += gram_deviation_reference(g, &lo, &hi) / (f * 3) as f64;
            }
        }
        let got32: Vec<f32> = got.scores[l].iter().map(|&v| v as f32).collect();
        common::assert_close(&got32, &want, 1e-4, 1e-3, &format!("beatrix layer {l}"));
        assert!(
            want.iter().any(|&w| w > 0.0),
            "layer {l}: some samples deviate"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("beatrix.safetensors");
    det.save(&path).unwrap();
    let loaded = registry
        .load_detector("beatrix", &det.config(), &path)
        .unwrap();
    assert_eq!(loaded.layer_scores(&ctx, &model, &scored, 64).unwrap(), got);

    // Bad configurations are clear errors.
    for (options, msg) in [
        (serde_json::json!({"powers": []}), "powers must be 1..=8"),
        (
            serde_json::json!({"powers": [0, 2]}),
            "powers must be 1..=8",
        ),
        (
            serde_json::json!({"mad_scale": -1.0}),
            "mad_scale must be >= 0",
        ),
    ] {
        let err = registry.build_detector("beatrix", &options).err().unwrap();
        assert!(format!("{err:#}").contains(msg), "{options}: {err:#}");
    }
    let one = set(&t_idx[..1]);
    let err = Beatrix::new(BeatrixConfig::default())
        .unwrap()
        .fit(&ctx, &model, &one, false)
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("at least 2 trusted samples"),
        "{err:#}"
    );
}
