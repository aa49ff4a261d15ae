//! Pins the results of `cargo run --example backdoor_mnist -- --quick` on the shared
//! MNIST copy: any change that moves results (weights, scores) shows here. On lavapipe
//! the outputs are bit-identical run to run, so their SHA-256 digests are pinned; other
//! adapters round differently and get the metrics to a tolerance.
//!
//! A change that moves results by rounding updates these pins in the same commit and
//! says why.

mod common;

use std::path::Path;

use cupbearer::workflows::backdoor_mnist::{run, PipelineOptions};
use sha2::{Digest, Sha256};

const DATA: &str = "../shared/data";

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn quick_example_results_are_pinned() {
    if common::gpu().is_none() {
        return;
    }
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join(DATA);
    if !data.join("mnist").is_dir() {
        eprintln!("skipping: no MNIST at {}", data.display());
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let r = run(&PipelineOptions {
        data_dir: data,
        epochs: 10,
        seed: 0,
        quick: true,
        out: out.path().to_path_buf(),
        progress: false,
    })
    .unwrap();
    let m = &r.classifier;
    let got = [
        m.clean_test_accuracy,
        m.attack_success_rate.unwrap(),
        r.corner.auc_roc,
        r.corner.ap,
        r.noise.auc_roc,
    ];
    let want = [0.9469, 0.9490, 0.9979, 0.9969, 0.9342];
    if !m.adapter.starts_with("llvmpipe") {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 0.01, "{got:?} vs {want:?} on {}", m.adapter);
        }
        return;
    }
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 5e-5, "{got:?} vs {want:?}");
    }
    let digests = [
        (
            "classifier/model.safetensors",
            "94eeaef6630feeccf708d85897eb390dd5c0abd53bd145981d7cba9470823858",
        ),
        (
            "detector/detector.safetensors",
            "011c0645cb5c4d2665312ea1d03ac5dabca3a3e2a8fb3cf28d0474b9929b5356",
        ),
        (
            "eval_corner/scores.csv",
            "158de3ab1a6440da47c53be4f59690006eb5e85154f65ad26e54c5abe23c4852",
        ),
        (
            "eval_noise/scores.csv",
            "8fb7f21dec096a85ce247c58fa08aea44866d0e800335817f982e1f8f8651fc8",
        ),
    ];
    for (file, want) in digests {
        assert_eq!(sha256(&out.path().join(file)), want, "{file} changed");
    }
}
