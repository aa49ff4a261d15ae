//! `Suite`: a grid of tasks x detectors from a TOML spec, with a detector registered
//! from outside the crate, cached classifiers, resumed cells, recorded failures, and
//! the command line.

mod common;

use std::process::Command;

use cupbearer::registry::Registry;
use cupbearer::workflows::suite::{Suite, SuiteOptions};

const SPEC: &str = r#"
name = "tiny"

[[task]]
name = "corner"
dataset = "mnist"
hidden_dims = [48, 32]
epochs = 4
backdoor = { kind = "corner", corner = "bottom-right", p_backdoor = 0.2, target_class = 0 }
options = { backdoor = "corner", "backdoor.corner" = "bottom-right" }
ablation = [{ name = "noise", options = { backdoor = "noise", "backdoor.std" = 0.5 } }]

[[detector]]
name = "mahalanobis"

[[detector]]
name = "mean-distance"
detector = "mean_distance"
options = { eps = 0.01 }

# Needs untrusted data, which this task (all trusted) lacks: a failing cell.
[[detector]]
name = "spectral"
"#;

#[test]
fn a_suite_runs_its_grid_resumes_and_records_failures() {
    if common::gpu().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    common::write_small_mnist(&data_dir);
    let mut registry = Registry::builtin();
    registry.register_detector(common::mean_distance::ENTRY);
    let suite = Suite::from_spec(SPEC).unwrap();
    let dir = tmp.path().join("suite");
    let opts = SuiteOptions {
        dir: dir.clone(),
        data_dir: data_dir.clone(),
        only_tasks: Vec::new(),
        only_detectors: Vec::new(),
        progress: false,
    };
    let results = suite.run(&registry, &opts).unwrap();
    let auroc = |det: &str, mix: &str| {
        results
            .iter()
            .find(|r| r.detector == det && r.mix == mix && r.layer == "all")
            .and_then(|r| r.auc_roc)
            .unwrap_or_else(|| panic!("{det} {mix}: {results:?}"))
    };
    assert!(auroc("mahalanobis", "main") > 0.95, "{results:?}");
    assert!(auroc("mean-distance", "noise") > 0.95, "{results:?}");
    let failed: Vec<_> = results.iter().filter(|r| r.error.is_some()).collect();
    assert_eq!(failed.len(), 1, "{results:?}");
    assert!(
        failed[0].detector == "spectral"
            && failed[0]
                .error
                .as_ref()
                .unwrap()
                .contains("fits on untrusted data"),
        "{failed:?}"
    );
    let board = std::fs::read_to_string(dir.join("leaderboard.md")).unwrap();
    assert!(
        board.contains("| corner | noise |") && board.contains("failed"),
        "{board}"
    );
    let maha = results
        .iter()
        .find(|r| r.detector == "mahalanobis")
        .unwrap();
    assert!(maha.fit_seconds.is_some_and(|s| s > 0.0), "{maha:?}");
    assert!(maha.train_seconds.is_some_and(|s| s > 0.0), "{maha:?}");
    let csv = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    assert!(csv.starts_with("suite,task,detector,mix,layer,auc_roc,ap,fpr_at_95_tpr,fit_seconds"));
    // Long format: per cell and mix the aggregate row, then one per layer.
    let all: Vec<_> = results.iter().filter(|r| r.layer == "all").collect();
    assert_eq!(all.len(), 5, "{results:?}");
    let layer0 = results
        .iter()
        .find(|r| r.detector == "mahalanobis" && r.mix == "main" && r.layer == "layer0")
        .unwrap_or_else(|| panic!("no per-layer row: {results:?}"));
    assert!(
        layer0.auc_roc.is_some_and(|a| (0.0..=1.0).contains(&a)) && layer0.fpr_at_95_tpr.is_none()
    );
    assert_eq!(csv.lines().count(), 1 + results.len(), "{csv}");
    assert!(csv.contains(",mahalanobis,main,layer0,"), "{csv}");
    // One classifier, trained once; each cell is an ordinary detector run dir.
    let classifiers: Vec<_> = std::fs::read_dir(dir.join("classifiers"))
        .unwrap()
        .collect();
    assert_eq!(classifiers.len(), 1);
    let cell = dir.join("cells/corner/mahalanobis");
    assert!(cell.join("detector/detector.safetensors").is_file());
    assert!(cell.join("eval-noise/eval.json").is_file());

    // A re-run skips finished cells: their files are untouched.
    let eval = cell.join("eval/eval.json");
    let before = std::fs::metadata(&eval).unwrap().modified().unwrap();
    let again = suite.run(&registry, &opts).unwrap();
    assert_eq!(
        std::fs::metadata(&eval).unwrap().modified().unwrap(),
        before
    );
    assert_eq!(again.len(), results.len());
    assert_eq!(auroc("mahalanobis", "main"), again[0].auc_roc.unwrap());

    // Filters name what exists.
    let bad = SuiteOptions {
        only_detectors: vec!["nope".into()],
        ..opts
    };
    let err = suite.run(&registry, &bad).unwrap_err();
    assert!(
        format!("{err:#}").contains("has no detector \"nope\""),
        "{err:#}"
    );

    // The command: a spec file, a filter, and exit 1 when a cell failed.
    let spec = tmp.path().join("tiny.toml");
    std::fs::write(&spec, SPEC.replace("mean_distance", "mahalanobis")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cupbearer"))
        .args([
            "suite",
            "--spec",
            spec.to_str().unwrap(),
            "--only-detectors",
            "spectral",
        ])
        .args(["--dir.base", tmp.path().to_str().unwrap(), "--quiet"])
        .env("CUPBEARER_DATA_DIR", &data_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("1 cell(s) failed"), "{err}");
    assert!(tmp.path().join("tiny/leaderboard.md").is_file());
    let svg = std::fs::read_to_string(dir.join("heatmap.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("mahalanobis"), "{svg}");
}

#[test]
fn suite_refuses_debug_instead_of_ignoring_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cupbearer"))
        .args(["suite", "--suite", "quick", "--debug", "--dir.full"])
        .arg(tmp.path().join("s"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("suite has no --debug mode"), "{err}");
    assert!(!tmp.path().join("s").exists(), "nothing is written");
}

#[test]
fn bad_specs_are_clear_errors() {
    for (spec, want) in [
        (
            "name = \"x\"",
            "needs at least one [[task]] and one [[detector]]",
        ),
        (
            "name = \"../x\"\n[[task]]\nname=\"a\"\ndataset=\"mnist\"\n[[detector]]\nname=\"m\"",
            "use letters",
        ),
        ("name = \"x\"\ncolour = 1", "unknown field `colour`"),
        (
            "name = \"x\"\n[[task]]\nname=\"a\"\ndataset=\"imagenet\"",
            "imagenet",
        ),
    ] {
        let err = Suite::from_spec(spec).unwrap_err();
        assert!(format!("{err:#}").contains(want), "{spec}: {err:#}");
    }
    for name in ["quick", "seed", "standard"] {
        let suite = Suite::builtin(name).unwrap();
        // Every built-in detector and task option resolves.
        let registry = Registry::builtin();
        for d in &suite.detectors {
            registry
                .detector(d.detector.as_deref().unwrap_or(&d.name))
                .unwrap();
        }
        assert!(!suite.tasks.is_empty());
    }
    assert!(format!("{:#}", Suite::builtin("huge").unwrap_err()).contains("quick, seed"));
}
