//! Beatrix: the Gram-feature and deviation kernels against f64 references on odd
//! shapes, the detector's exact medians and scores against a host reference (dense and
//! conv layers), reloads, and bad configurations.

mod common;

use cupbearer::data::Dataset;
use cupbearer::detectors::beatrix::{Beatrix, BeatrixConfig};
use cupbearer::detectors::{read_activations, Detector, SampleSet};
use cupbearer::gpu::batch::GpuDataset;
use cupbearer::gpu::beatrix::{
    gram_deviation, gram_deviation_reference, gram_features, gram_features_reference, upper_pairs,
    GramInputs, GramParams, GramShape,
};
use cupbearer::gpu::Slice;
use cupbearer::model::{GpuMlp, Mlp, MlpConfig};
use cupbearer::registry::Registry;

#[test]
fn gram_kernels_match_f64_references() {
    let Some(ctx) = common::gpu() else { return };
    for (rows, positions, channels) in [(5, 3, 7), (3, 1, 11), (2, 6, 1)] {
        let shape = GramShape {
            rows,
            positions,
            channels,
        };
        let f = shape.features();
        let x = common::random(rows * positions * channels, 7);
        let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let xb = ctx.buffer_from("x", &x).unwrap();
        let pairs = ctx
            .buffer_from("pairs", &upper_pairs(channels).unwrap())
            .unwrap();
        for power in 1..=4u32 {
            let what = format!("{shape:?} power {power}");
            let want = gram_features_reference(&x64, shape, power as i32);
            let params = ctx.uniform("p", &GramParams::new(shape, power, 1.0, 0));
            let input = GramInputs {
                x: Slice::whole(&xb),
                pairs: Slice::whole(&pairs),
                params: &params,
            };
            let out = ctx.zeros("g", rows * f).unwrap();
            let op = gram_features(&ctx, shape, &input, Slice::whole(&out)).unwrap();
            ctx.submit([&op]);
            let got: Vec<f32> = ctx.read(Slice::new(&out, 0, rows * f)).unwrap();
            common::assert_close(&got, &want, 1e-5, 1e-4, &format!("features {what}"));

            // Bounds around the first row's features, so that some fall outside; the
            // scores add to what the output holds, from `out_offset` on.
            let lo: Vec<f32> = (0..f)
                .map(|j| (want[j] - 0.1 * (j % 3) as f64) as f32)
                .collect();
            let hi: Vec<f32> = (0..f)
                .map(|j| (want[j] + 0.05 * (j % 2) as f64) as f32)
                .collect();
            let (offset, scale) = (2, 0.5f64);
            let params = ctx.uniform("p", &GramParams::new(shape, power, scale as f32, offset));
            let input = GramInputs {
                params: &params,
                ..input
            };
            let (lb, hb) = (
                ctx.buffer_from("lo", &lo).unwrap(),
                ctx.buffer_from("hi", &hi).unwrap(),
            );
            let scores = ctx.buffer_from("s", &vec![1.0f32; rows + offset]).unwrap();
            let bounds = (Slice::whole(&lb), Slice::whole(&hb));
            let op = gram_deviation(&ctx, shape, &input, bounds, Slice::whole(&scores)).unwrap();
            ctx.submit([&op]);
            let got: Vec<f32> = ctx.read(Slice::whole(&scores)).unwrap();
            let (lo64, hi64): (Vec<f64>, Vec<f64>) = lo
                .iter()
                .zip(&hi)
                .map(|(&l, &h)| (f64::from(l), f64::from(h)))
                .unzip();
            let mut expect = vec![1.0; offset];
            expect.extend(
                want.chunks(f)
                    .map(|g| 1.0 + scale * gram_deviation_reference(g, &lo64, &hi64)),
            );
            assert!(
                expect[offset + 1] > 1.0,
                "{what}: some features fall outside"
            );
            common::assert_close(&got, &expect, 1e-4, 1e-3, &format!("deviation {what}"));
        }
    }
}

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
