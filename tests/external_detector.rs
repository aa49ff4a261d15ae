//! A detector written outside the crate (`tests/common/mean_distance.rs`), registered
//! at run time and fitted and evaluated through the same workflows as the built-in
//! detectors: it must find planted anomalies.

mod common;

use cupbearer::data::backdoor::{Backdoor, Trigger};
use cupbearer::registry::{Registry, TaskEnv};
use cupbearer::tasks::backdoor::BackdoorTaskConfig;
use cupbearer::workflows::detector::{
    eval_detector, train_detector, DetectorSource, EvalOptions, FitOptions,
};
use cupbearer::workflows::Output;

#[test]
fn a_detector_registered_at_run_time_finds_a_planted_trigger() {
    if common::gpu().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = common::backdoored_run(tmp.path());
    let run_dir = tmp.path().join("classifier");
    let quiet = |dir| Output {
        dir: Some(dir),
        overwrite: false,
        progress: false,
    };

    let mut registry = Registry::builtin();
    registry.register_detector(common::mean_distance::ENTRY);
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
    train_detector(
        task.as_ref(),
        detector,
        &FitOptions::default(),
        &quiet(&det_dir),
    )
    .unwrap();
    let eval_dir = tmp.path().join("eval");
    let report = eval_detector(
        task.as_ref(),
        &DetectorSource::Run(det_dir.clone()),
        &EvalOptions {
            registry: &registry,
            batch_size: 64,
            seed: 0,
            aggregation: None,
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
            aggregation: None,
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
