//! The `cupbearer` binary end to end: a run on generated data, the safetensors contract
//! checked from Python, and clear errors (exit code != 0, nothing written) on bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cupbearer::data::backdoor::batch_reference;
use cupbearer::data::{idx, Dataset, Split};
use cupbearer::gpu::batch::GpuDataset;
use cupbearer::model::train::predict_logits;
use cupbearer::model::GpuMlp;
use cupbearer::run::ClassifierRun;

fn cupbearer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cupbearer"))
        .args(args)
        .env_remove("CUPBEARER_DATA_DIR")
        .output()
        .expect("running cupbearer")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn generated_data_dir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    common::write_mnist_like(
        tmp.path(),
        &Dataset::synthetic(900, 12, 10, 1),
        &Dataset::synthetic(300, 12, 10, 2),
    );
    tmp
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The original README's command, verbatim but for the program name, plus small sizes.
fn train_args<'a>(data: &'a str, run: &'a str) -> Vec<&'a str> {
    vec![
        "train_classifier",
        "--train_data",
        "backdoor",
        "--train_data.original",
        "mnist",
        "--train_data.backdoor",
        "corner",
        "--model",
        "mlp",
        "--dir.full",
        run,
        "--data-dir",
        data,
        "--num_epochs",
        "4",
        "--model.hidden_dims",
        "48",
        "32",
        "--train_data.backdoor.p_backdoor",
        "0.2",
        "--optim.learning_rate",
        "0.003",
        "--batch_size",
        "50",
        "--quiet",
    ]
}

/// Evaluates the run's `model.safetensors` in numpy (`tests/python/check_forward.py`)
/// on 100 test images and compares with our logits.
fn check_with_numpy(run: &Path, data_dir: &Path, scratch: &Path) {
    let loaded = cupbearer::run::ClassifierRun::load(run).unwrap();
    let ctx = common::gpu().unwrap();
    let test = Dataset::load(cupbearer::data::DatasetName::Mnist, Split::Test, data_dir).unwrap();
    let indices: Vec<u32> = (0..100).collect();
    let model = GpuMlp::upload(&ctx, &loaded.model).unwrap();
    let logits = predict_logits(
        &ctx,
        &model,
        &GpuDataset::upload(&ctx, &test.as_images()).unwrap(),
        &indices,
        64,
    )
    .unwrap();
    let (x, _) = batch_reference(&test, &indices, None, (0, 0));
    let x: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let dim = test.sample_dim();
    let views = vec![
        (
            "inputs",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![100, dim],
                bytemuck::cast_slice(&x),
            )
            .unwrap(),
        ),
        (
            "logits",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![100, 10],
                bytemuck::cast_slice(&logits),
            )
            .unwrap(),
        ),
    ];
    let reference = scratch.join("reference.safetensors");
    std::fs::write(&reference, safetensors::serialize(views, None).unwrap()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_forward.py");
    let py = Command::new("python3")
        .arg(&script)
        .arg(run.join("model.safetensors"))
        .arg(&reference)
        .output();
    match py {
        Ok(o) if o.status.success() => {}
        Ok(o)
            if std::env::var_os("CI").is_none()
                && String::from_utf8_lossy(&o.stderr).contains("ModuleNotFoundError") =>
        {
            eprintln!("skipping the Python check: numpy/safetensors not installed")
        }
        Ok(o) => panic!(
            "python check failed:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => assert!(
            std::env::var_os("CI").is_none(),
            "python3 missing under CI: {e}"
        ),
    }
}

#[test]
fn train_classifier_writes_a_loadable_run_dir() {
    if common::gpu().is_none() {
        return;
    }
    let data = generated_data_dir();
    let out_dir = tempfile::tempdir().unwrap();
    let run = out_dir.path().join("classifier");
    let out = cupbearer(&train_args(s(data.path()), s(&run)));
    assert!(out.status.success(), "{}", stderr(&out));

    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
    let acc = metrics["clean_test_accuracy"].as_f64().unwrap();
    let asr = metrics["attack_success_rate"].as_f64().unwrap();
    assert!(acc >= 0.95, "clean accuracy {acc}");
    assert!(asr >= 0.9, "attack success {asr}");
    assert_eq!(metrics["epochs"].as_array().unwrap().len(), 4);
    assert!(metrics["samples_per_second"].as_f64().unwrap() > 0.0);

    let loaded = ClassifierRun::load(&run).unwrap();
    let c = &loaded.config;
    assert_eq!(c.train_data.backdoor.unwrap().p_backdoor, 0.2);
    assert_eq!(c.training.as_ref().unwrap().num_epochs, 4);
    assert_eq!(loaded.model.config.hidden_dims, vec![48, 32]);
    assert_eq!(loaded.model.config.input_shape, [12, 10, 1]);

    // The same model, evaluated in numpy from the safetensors file, gives our logits.
    check_with_numpy(&run, data.path(), out_dir.path());

    // A second run into the same dir is refused and leaves the first run intact.
    let before = std::fs::read(run.join("model.safetensors")).unwrap();
    let again = cupbearer(&train_args(s(data.path()), s(&run)));
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("refusing to overwrite"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        before,
        std::fs::read(run.join("model.safetensors")).unwrap()
    );
}

/// Runs a training command expected to fail; checks the message and that no run dir appeared.
fn assert_fails_cleanly(data_dir: &Path, extra: &[&str], expected: &str) {
    let out_dir = tempfile::tempdir().unwrap();
    let run = out_dir.path().join("run");
    let mut args = train_args(s(data_dir), s(&run));
    args.extend(extra);
    let out = cupbearer(&args);
    let err = stderr(&out);
    assert!(!out.status.success(), "expected failure, got success");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    assert!(err.contains(expected), "expected {expected:?} in: {err}");
    assert!(!run.exists(), "a failed run left {} behind", run.display());
}

#[test]
fn missing_data_is_a_clear_error() {
    let empty = tempfile::tempdir().unwrap();
    assert_fails_cleanly(empty.path(), &[], "cupbearer download mnist");
}

#[test]
fn corrupt_and_inconsistent_idx_files_are_clear_errors() {
    let data = generated_data_dir();
    let images = data.path().join("mnist/train-images-idx3-ubyte.gz");
    let labels = data.path().join("mnist/train-labels-idx1-ubyte.gz");
    // Labels for fewer images than the images file holds.
    idx::write_labels(&labels, &[1u8; 899], true).unwrap();
    assert_fails_cleanly(data.path(), &[], "900");
    // A truncated images file.
    idx::write_labels(&labels, &[1u8; 900], true).unwrap();
    let raw = idx::read_images(&images).unwrap();
    std::fs::remove_file(&images).unwrap();
    let raw_path = data.path().join("mnist/train-images-idx3-ubyte");
    idx::write_images(&raw_path, raw.rows, raw.cols, &raw.pixels, false).unwrap();
    let bytes = std::fs::read(&raw_path).unwrap();
    std::fs::write(&raw_path, &bytes[..bytes.len() - 7]).unwrap();
    assert_fails_cleanly(data.path(), &[], "train-images-idx3-ubyte");
}

#[test]
fn bad_flags_are_clear_errors() {
    let data = generated_data_dir();
    assert_fails_cleanly(
        data.path(),
        &["--train_data.backdoor.p_backdoor", "1.5"],
        "p_backdoor",
    );
    assert_fails_cleanly(
        data.path(),
        &["--train_data.backdoor.target_class", "10"],
        "target_class 10",
    );
    assert_fails_cleanly(
        data.path(),
        &["--train_data.backdoor.corner", "middle"],
        "middle",
    );
    let out = cupbearer(&[
        "train-classifier",
        "--train_data",
        "backdoor",
        "--dir.full",
        "/nonexistent/x",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--train_data.original"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn help_documents_both_spellings() {
    let out = cupbearer(&["train-classifier", "-h"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--train-data-original"), "{help}");
    assert!(help.contains("--train_data.original"), "{help}");
    assert!(help.contains("0.05"), "{help}");
}

#[test]
fn detector_help_lists_every_registered_option_with_its_default() {
    for command in ["train-detector", "eval-detector"] {
        let out = cupbearer(&[command, "-h"]);
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        for line in [
            "mahalanobis:",
            "--detector.train.rcond",
            "[default: 0.00001]",
            "--detector.train.optimizer.learning_rate      Adam learning rate. [default: 0.001]",
            "adversarial_abstraction:",
            "--task.backdoor.std",
            "[default: 0.3]",
            "--task.run_path",
            "[default: required]",
        ] {
            assert!(help.contains(line), "{command} -h lacks {line:?}:\n{help}");
        }
    }
}

#[test]
fn layer_options_take_indices_or_names() {
    let registry = cupbearer::registry::Registry::builtin();
    for name in ["mahalanobis", "que", "spectral"] {
        let entry = registry.detector(name).unwrap();
        let raw = vec![("layers".to_string(), vec!["layer1".into(), "0".into()])];
        let config = entry.resolve(&raw, false).unwrap();
        assert_eq!(config["layers"], serde_json::json!([1, 0]), "{name}");
        let bad = vec![("layers".to_string(), vec!["layerx".into()])];
        let err = format!("{:#}", entry.resolve(&bad, false).unwrap_err());
        assert!(err.contains("option layers"), "{name}: {err}");
    }
}

#[test]
fn unknown_or_bad_detector_and_task_options_are_clear_errors() {
    // Options are checked before any run dir or data is read.
    let base = [
        "train-detector",
        "--task",
        "backdoor",
        "--task.run_path",
        "/nonexistent/run",
        "--task.backdoor",
        "corner",
    ];
    let fails = |extra: &[&str], want: &[&str]| {
        let out = cupbearer(&[&base[..], extra].concat());
        assert_eq!(out.status.code(), Some(1), "{extra:?}");
        let err = stderr(&out);
        for w in want {
            assert!(err.contains(w), "{extra:?}: {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
    };
    fails(
        &[
            "--detector",
            "mahalanobis",
            "--detector.train.num_epochs",
            "3",
        ],
        &[
            "detector mahalanobis has no option \"train.num_epochs\"",
            "--detector.train.rcond",
        ],
    );
    fails(
        &["--detector", "mahalanobis", "--detector.train.rcond", "abc"],
        &["detector mahalanobis: option train.rcond: expected a number, got \"abc\""],
    );
    fails(
        &["--detector", "mahalanobis", "--detector.layers", "0", "x"],
        &["option layers: expected a non-negative integer, got \"x\""],
    );
    fails(
        &["--detector", "abstraction", "--detector.normalize", "maybe"],
        &["option normalize: expected true or false"],
    );
    fails(
        &[
            "--detector",
            "abstraction",
            "--detector.abstraction",
            "diagonal",
        ],
        &["unknown variant `diagonal`", "axis_aligned"],
    );
    fails(
        &["--detector", "mahalanobs"],
        &[
            "unknown detector \"mahalanobs\"",
            "mahalanobis, abstraction",
        ],
    );
    fails(
        &["--detector", "adversarial_abstraction"],
        &["adversarial_abstraction is evaluation-only"],
    );
    fails(
        &["--detector", "mahalanobis", "--task.eps", "0.1"],
        &["task backdoor has no option \"eps\"", "--task.backdoor.std"],
    );
    // Dashed and underscored spellings of a valid key reach the same option.
    fails(
        &["--detector", "mahalanobis", "--detector-train-rcond=2"],
        &["rcond must be in [0, 1), got 2"],
    );
    // The task's required options are named.
    let out = cupbearer(&[
        "train-detector",
        "--task",
        "backdoor",
        "--task.backdoor",
        "corner",
        "--detector",
        "mahalanobis",
    ]);
    assert!(
        stderr(&out).contains("task backdoor needs --task.run_path"),
        "{}",
        stderr(&out)
    );
    // Commands without tasks refuse task options instead of ignoring them.
    let out = cupbearer(&[
        "train-classifier",
        "--train_data",
        "mnist",
        "--task.backdoor",
        "corner",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unexpected option \"backdoor\""),
        "{}",
        stderr(&out)
    );
}

/// Full MNIST, one epoch, when the shared copy is present.
#[test]
fn one_epoch_on_real_mnist() {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if !shared.join("mnist").exists() || common::gpu().is_none() {
        eprintln!("skipping: {} not present", shared.display());
        return;
    }
    let out_dir = tempfile::tempdir().unwrap();
    let run = out_dir.path().join("mnist");
    let out = cupbearer(&[
        "train-classifier",
        "--train_data",
        "backdoor",
        "--train_data.original",
        "mnist",
        "--train_data.backdoor",
        "corner",
        "--dir.full",
        s(&run),
        "--data-dir",
        s(&shared),
        "--num_epochs",
        "1",
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    let acc = metrics["clean_test_accuracy"].as_f64().unwrap();
    let asr = metrics["attack_success_rate"].as_f64().unwrap();
    assert!(acc >= 0.95, "clean accuracy {acc}");
    assert!(asr >= 0.95, "attack success {asr}");
}

#[test]
fn no_gpu_adapter_names_the_package_to_install() {
    let data = generated_data_dir();
    let out_dir = tempfile::tempdir().unwrap();
    let run = out_dir.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_cupbearer"))
        .args(train_args(s(data.path()), s(&run)))
        // Hide every Vulkan driver; the Vulkan-only backend then has no adapter.
        .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
        .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
        .env("WGPU_BACKEND", "vulkan")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("mesa-vulkan-drivers"), "{err}");
    assert!(!run.exists());
}

#[test]
fn download_from_a_dead_mirror_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // Port 9 (discard) on loopback: nothing listens, the connection is refused.
    let out = cupbearer(&[
        "download",
        "mnist",
        "--data-dir",
        s(dir.path()),
        "--mirror",
        "http://127.0.0.1:9/",
    ]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("127.0.0.1:9"), "{err}");
    assert!(!dir.path().join("mnist").exists(), "nothing left behind");
}

/// A CNN's model.safetensors (Conv_{i}.kernel in HWIO) gives our logits in numpy.
#[test]
fn cnn_safetensors_match_numpy() {
    if common::gpu().is_none() {
        return;
    }
    let data = generated_data_dir();
    let out_dir = tempfile::tempdir().unwrap();
    let run = out_dir.path().join("cnn");
    let out = cupbearer(&[
        "train_classifier",
        "--train_data",
        "mnist",
        "--model",
        "cnn",
        "--model.channels",
        "3",
        "5",
        "--model.dense_dims",
        "8",
        "--num_epochs",
        "1",
        "--data-dir",
        s(data.path()),
        "--dir.full",
        s(&run),
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    check_with_numpy(&run, data.path(), out_dir.path());
}
