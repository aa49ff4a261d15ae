//! `train-detector` and `eval-detector` end to end on generated data: the original
//! README's four commands in sequence, and clear errors on bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use cupbearer::data::Dataset;

fn cupbearer(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cupbearer"))
        .current_dir(cwd)
        .args(args)
        .env("CUPBEARER_DATA_DIR", cwd.join("data"))
        .output()
        .expect("running cupbearer")
}

/// A command line split at whitespace (no quoting needed in these tests).
fn words(command: &str) -> Vec<&str> {
    command.split_whitespace().collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A work dir with generated MNIST-like data in `data/mnist/`.
fn workdir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    common::write_small_mnist(&tmp.path().join("data"));
    tmp
}

/// A workdir with small MNIST and a small corner-backdoored classifier in `logs/c`.
fn corner_classifier_workdir() -> tempfile::TempDir {
    let w = workdir();
    let mut train = words(
        "train_classifier --train_data backdoor --train_data.original mnist \
         --train_data.backdoor corner --model mlp --dir.full logs/c",
    );
    train.extend(SMALL);
    run_ok(w.path(), &train);
    w
}

fn run_ok(cwd: &Path, args: &[&str]) -> String {
    let out = cupbearer(cwd, args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `command` fails with `msg` on stderr and leaves no `out` dir behind.
fn assert_refused(cwd: &Path, command: &str, msg: &str, out: &str) {
    let run = cupbearer(cwd, &words(command));
    assert!(
        !run.status.success() && stderr(&run).contains(msg),
        "{command}: {}",
        stderr(&run)
    );
    assert!(!cwd.join(out).exists(), "{command}: wrote {out}");
}

fn eval_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const SMALL: [&str; 8] = [
    "--num_epochs",
    "4",
    "--model.hidden_dims",
    "48",
    "32",
    "--train_data.backdoor.p_backdoor",
    "0.2",
    "--quiet",
];

#[test]
fn the_original_readme_commands_run_in_sequence() {
    if common::gpu().is_none() {
        return;
    }
    let w = workdir();
    let cwd = w.path();
    // The original README's four commands, verbatim but for the program name (the
    // classifier gets small sizes on top).
    let readme = [
        "train_classifier --train_data backdoor --train_data.original mnist \
         --train_data.backdoor corner --model mlp --dir.full logs/classifier",
        "train_detector --detector mahalanobis --task backdoor --task.backdoor corner \
         --task.run_path logs/classifier --dir.full logs/detector",
        "eval_detector --detector from_run --detector.path logs/detector --task backdoor \
         --task.backdoor corner --task.run_path logs/classifier --dir.full logs/detector",
        "eval_detector --detector from_run --detector.path logs/detector --task backdoor \
         --task.backdoor noise --task.backdoor.std 0.2 --task.run_path logs/classifier \
         --dir.full logs/detector_ablation",
    ];
    for (i, command) in readme.iter().enumerate() {
        let mut args = words(command);
        if i == 0 {
            args.extend(SMALL);
        }
        run_ok(cwd, &args);
    }
    let det = cwd.join("logs/detector");
    for f in [
        "config.json",
        "detector.safetensors",
        "eval.json",
        "scores.csv",
        "histogram.svg",
        "histogram_log.svg",
        "roc.svg",
        "roc_log.svg",
    ] {
        assert!(det.join(f).is_file(), "{f} missing");
    }
    let corner = eval_json(&det.join("eval.json"));
    let auc = corner["AUC_ROC"].as_f64().unwrap();
    assert!(auc >= 0.99, "corner AUROC {auc}");
    assert!(corner["AP"].as_f64().unwrap() >= 0.99);
    assert_eq!(corner["num_normal"], 400);
    assert_eq!(corner["num_anomalous"], 400);
    assert_eq!(corner["layers"].as_array().unwrap().len(), 2);
    let csv = std::fs::read_to_string(det.join("scores.csv")).unwrap();
    assert_eq!(
        csv.lines().next().unwrap(),
        "split,sample,anomalous,layer0,layer1,score"
    );
    assert_eq!(csv.lines().count(), 801);
    assert!(cwd.join("logs/detector_ablation/eval.json").is_file());

    // Evaluating into the same dir again is refused, naming the file.
    let again = cupbearer(cwd, &words(readme[2]));
    assert!(!again.status.success());
    assert!(stderr(&again).contains("eval.json"), "{}", stderr(&again));

    // A detector from another model (other hidden widths) is a shape mismatch.
    run_ok(
        cwd,
        &words(
            "train_classifier --train_data backdoor --train_data.original mnist \
             --train_data.backdoor corner --dir.full logs/other --model.hidden_dims 16 16 \
             --num_epochs 1 --quiet",
        ),
    );
    let eval = |det: &str, run: &str, out: &str| {
        let command = format!(
            "eval_detector --detector from_run --detector.path {det} --task backdoor \
             --task.backdoor corner --task.run_path {run} --dir.full {out}"
        );
        cupbearer(cwd, &words(&command))
    };
    let mismatch = eval("logs/detector", "logs/other", "logs/mismatch");
    assert!(!mismatch.status.success());
    let err = stderr(&mismatch);
    assert!(err.contains("do not match"), "{err}");
    assert!(!cwd.join("logs/mismatch/eval.json").exists());

    // A detector dir without its weights.
    std::fs::create_dir_all(cwd.join("logs/broken")).unwrap();
    std::fs::copy(det.join("config.json"), cwd.join("logs/broken/config.json")).unwrap();
    let broken = eval("logs/broken", "logs/classifier", "logs/broken_eval");
    assert!(!broken.status.success());
    let err = stderr(&broken);
    assert!(err.contains("detector.safetensors"), "{err}");
}

#[test]
fn a_run_path_that_is_not_a_classifier_run_is_a_clear_error() {
    let w = workdir();
    let cwd = w.path();
    std::fs::create_dir_all(cwd.join("not_a_run")).unwrap();
    let out = cupbearer(
        cwd,
        &[
            "train-detector",
            "--detector",
            "mahalanobis",
            "--task",
            "backdoor",
            "--task.backdoor",
            "corner",
            "--task.run_path",
            "not_a_run",
            "--dir.full",
            "logs/detector",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a classifier run"),
        "{}",
        stderr(&out)
    );
    assert!(!cwd.join("logs/detector").exists());
}

#[test]
fn debug_runs_every_command_tiny_and_writes_only_with_dir_full() {
    if common::gpu().is_none() {
        return;
    }
    let w = workdir();
    let cwd = w.path();
    let classifier = [
        "train_classifier",
        "--debug",
        "--train_data",
        "backdoor",
        "--train_data.original",
        "mnist",
        "--train_data.backdoor",
        "corner",
        "--quiet",
    ];
    let out = run_ok(cwd, &classifier);
    assert!(out.contains("nothing written"), "{out}");
    assert!(
        !cwd.join("logs").exists(),
        "--debug without --dir.full writes nothing"
    );
    let mut with_dir = classifier.to_vec();
    with_dir.extend(["--dir.full", "logs/c"]);
    run_ok(cwd, &with_dir);
    let run = cupbearer::run::ClassifierRun::load(&cwd.join("logs/c")).unwrap();
    assert_eq!(run.model.config.hidden_dims, vec![2, 2]);
    let metrics = eval_json(&cwd.join("logs/c/metrics.json"));
    assert_eq!(metrics["steps"], 1);

    let task = [
        "--task",
        "backdoor",
        "--task.backdoor",
        "corner",
        "--task.run_path",
        "logs/c",
        "--quiet",
    ];
    let mut detector = vec!["train_detector", "--debug", "--detector", "mahalanobis"];
    detector.extend(task);
    run_ok(cwd, &detector);
    assert!(!cwd.join("logs/train_detector").exists());
    detector.extend(["--dir.full", "logs/d"]);
    run_ok(cwd, &detector);
    assert!(cwd.join("logs/d/detector.safetensors").is_file());

    let mut eval = vec![
        "eval_detector",
        "--debug",
        "--detector",
        "from_run",
        "--detector.path",
        "logs/d",
    ];
    eval.extend(task);
    let out = run_ok(cwd, &eval);
    assert!(out.contains("1 normal, 1 anomalous"), "{out}");
    assert!(!cwd.join("logs/d/eval.json").exists());

    // make-adversarial-examples attacks 2 samples; the task in debug mode makes one.
    let out = run_ok(
        cwd,
        &words("make_adversarial_examples --debug --dir.full logs/c --quiet"),
    );
    assert!(out.contains("2 examples"), "{out}");
    std::fs::remove_file(cwd.join("logs/c/adv_examples.safetensors")).unwrap();
    let adversarial = [
        "--task",
        "adversarial_examples",
        "--task.run_path",
        "logs/c",
        "--quiet",
    ];
    let mut eval = eval[..6].to_vec();
    eval.extend(adversarial);
    let out = run_ok(cwd, &eval);
    assert!(out.contains("1 normal, 1 anomalous"), "{out}");
}

/// The adversarial-examples task: examples made by the command and on demand, scored by
/// Mahalanobis; a too-weak attack, an existing file and a corrupt file are clear errors.
#[test]
fn adversarial_examples_task_end_to_end() {
    if common::gpu().is_none() {
        return;
    }
    let w = workdir();
    let cwd = w.path();
    let mut train = words("train_classifier --train_data mnist --model mlp --dir.full logs/c");
    train.extend(&SMALL[..5]);
    train.push("--quiet");
    run_ok(cwd, &train);
    let examples = cwd.join("logs/c/adv_examples.safetensors");

    // The original's default (FGSM, eps 8/255) does not fool this model: nothing is kept.
    let weak = cupbearer(cwd, &words("make_adversarial_examples --dir.full logs/c"));
    assert!(!weak.status.success());
    assert!(
        stderr(&weak).contains("attack too weak"),
        "{}",
        stderr(&weak)
    );
    assert!(!examples.exists());

    let make = "make_adversarial_examples --dir.full logs/c --eps 0.3 --quiet";
    let out = run_ok(cwd, &words(make));
    assert!(out.contains("200 examples"), "{out}");
    let report = eval_json(&cwd.join("logs/c/adv_examples.json"));
    assert!(report["new_accuracy"].as_f64().unwrap() <= 0.1, "{report}");
    let loaded = cupbearer::data::adversarial::AdversarialExamples::load(&examples).unwrap();
    assert_eq!(loaded.source_indices, (0..200).collect::<Vec<u32>>());
    assert_eq!((loaded.shape, loaded.len()), ([12, 10, 1], 200));
    assert!(cwd.join("logs/c/adv_examples.png").is_file());
    let again = cupbearer(cwd, &words(make));
    assert!(
        stderr(&again).contains("refusing to overwrite"),
        "{}",
        stderr(&again)
    );

    let task = "--task adversarial_examples --task.run_path logs/c";
    run_ok(
        cwd,
        &words(&format!(
            "train_detector --detector mahalanobis {task} --dir.full logs/d --quiet"
        )),
    );
    let eval = format!(
        "eval_detector --detector from_run --detector.path logs/d {task} --dir.full logs/e --quiet"
    );
    run_ok(cwd, &words(&eval));
    let report = eval_json(&cwd.join("logs/e/eval.json"));
    // 200 clean test images that were not attacked, 200 adversarial examples.
    assert_eq!(
        (
            report["num_normal"].as_u64(),
            report["num_anomalous"].as_u64()
        ),
        (Some(200), Some(200))
    );
    let auc = report["AUC_ROC"].as_f64().unwrap();
    assert!(auc >= 0.9, "adversarial AUROC {auc}");
    let csv = std::fs::read_to_string(cwd.join("logs/e/scores.csv")).unwrap();
    assert_eq!(
        csv.lines()
            .filter(|l| l.starts_with("adversarial,"))
            .count(),
        200
    );

    // Made on demand by the task (PGD from the task's flags) when the file is missing.
    std::fs::remove_file(&examples).unwrap();
    let pgd = format!("{eval} --task.attack pgd --task.eps 0.2 --task.steps 5 --overwrite");
    run_ok(cwd, &words(&pgd));
    let made = cupbearer::data::adversarial::AdversarialExamples::load(&examples).unwrap();
    assert_eq!(made.meta.attack["method"], "pgd");

    // Untrusted data: half the training images trusted, of the rest half clean and half
    // attacked (stored as adv_examples_train.safetensors, in the split's order); QUE
    // fits on both, the probe on the labels.
    let split = format!(
        "{task} --task.trusted_fraction 0.5 --task.attack pgd --task.eps 0.2 --task.steps 5"
    );
    for det in ["que", "supervised_probe"] {
        run_ok(
            cwd,
            &words(&format!(
                "train_detector --detector {det} {split} --dir.full logs/{det} --quiet"
            )),
        );
        let eval = format!(
            "eval_detector --detector from_run --detector.path logs/{det} {split} \
             --dir.full logs/{det}-eval --quiet"
        );
        run_ok(cwd, &words(&eval));
        let auc = eval_json(&cwd.join(format!("logs/{det}-eval/eval.json")))["AUC_ROC"]
            .as_f64()
            .unwrap();
        assert!(
            auc >= 0.9,
            "{det} on adversarial untrusted data: AUROC {auc}"
        );
    }
    let fit = eval_json(&cwd.join("logs/que/fit.json"));
    assert_eq!(
        (
            fit["trusted_samples"].as_u64(),
            fit["untrusted_samples"].as_u64()
        ),
        (Some(500), Some(500))
    );
    let train_examples = cwd.join("logs/c/adv_examples_train.safetensors");
    let stored = cupbearer::data::adversarial::AdversarialExamples::load(&train_examples).unwrap();
    assert_eq!(stored.meta.split, cupbearer::data::Split::Train);
    assert_eq!(stored.len(), 250);
    assert!(cwd.join("logs/c/adv_examples_train.json").is_file());
    // Another seed draws another split: the stored examples are of other images.
    let other = cupbearer(
        cwd,
        &words(&format!(
            "train_detector --detector que {split} --seed 1 --dir.full logs/q1 --quiet"
        )),
    );
    assert!(!other.status.success());
    assert!(
        stderr(&other).contains("holds adversarial examples of other training images"),
        "{}",
        stderr(&other)
    );
    assert!(!cwd.join("logs/q1").join("config.json").exists());

    // A corrupt file is an error naming it, not a silent re-attack.
    std::fs::write(&examples, b"not safetensors").unwrap();
    let corrupt = cupbearer(cwd, &words(&pgd));
    assert!(!corrupt.status.success());
    assert!(
        stderr(&corrupt).contains("adv_examples.safetensors"),
        "{}",
        stderr(&corrupt)
    );
}

/// The abstraction detector through the CLI with the original's flags, and --debug.
#[test]
fn abstraction_detector_from_the_command_line() {
    if common::gpu().is_none() {
        return;
    }
    let w = corner_classifier_workdir();
    let cwd = w.path();
    let task = "--task backdoor --task.backdoor corner --task.run_path logs/c";
    for (dir, loss) in [("logs/kl", "kl"), ("logs/single", "single_class")] {
        run_ok(
            cwd,
            &words(&format!(
                "train_detector --detector abstraction --detector.abstraction.size_reduction 4 \
                 --detector.abstraction.output_loss_fn {loss} --detector.train.num_epochs 20 \
                 --detector.train.batch_size 64 --detector.train.optimizer adam \
                 --detector.train.optimizer.learning_rate 0.003 {task} --dir.full {dir} --quiet"
            )),
        );
        run_ok(
            cwd,
            &words(&format!(
                "eval_detector --detector from_run --detector.path {dir} {task} --dir.full {dir} --quiet"
            )),
        );
        let report = eval_json(&cwd.join(dir).join("eval.json"));
        let layers: Vec<&str> = report["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["layer"].as_str().unwrap())
            .collect();
        assert_eq!(layers, ["layer1", "output"]);
        let auc = report["AUC_ROC"].as_f64().unwrap();
        assert!(auc >= 0.9, "{loss}: AUROC {auc}");
    }
    // The adversarial abstraction finetunes the trained one per test batch, clipped or
    // not (0.0.1 crashed with clip false); it is evaluation-only.
    for (dir, clip) in [("logs/adv", "true"), ("logs/adv_noclip", "false")] {
        run_ok(
            cwd,
            &words(&format!(
                "eval_detector --detector adversarial_abstraction --detector.load_path logs/kl \
                 --detector.num_train_samples 64 --detector.num_steps 2 --detector.clip {clip} \
                 --detector.max_batch_size 256 {task} --dir.full {dir} --quiet"
            )),
        );
        let report = eval_json(&cwd.join(dir).join("eval.json"));
        assert_eq!(
            (
                report["num_normal"].as_u64(),
                report["num_anomalous"].as_u64()
            ),
            (Some(400), Some(400))
        );
        let auc = report["AUC_ROC"].as_f64().unwrap();
        assert!(auc >= 0.8, "clip {clip}: AUROC {auc}");
    }
    let train = cupbearer(
        cwd,
        &words(&format!(
            "train_detector --detector adversarial_abstraction {task} --dir.full logs/x"
        )),
    );
    assert!(
        stderr(&train).contains("evaluation-only"),
        "{}",
        stderr(&train)
    );
    // The axis-aligned abstraction trains with any size_reduction (0.0.1 crashed
    // unless it was 1).
    run_ok(
        cwd,
        &words(&format!(
            "train_detector --detector abstraction --detector.abstraction axis_aligned \
             --detector.abstraction.size_reduction 4 --detector.train.num_epochs 2 {task} \
             --dir.full logs/axis --quiet"
        )),
    );
    run_ok(
        cwd,
        &words(&format!(
            "eval_detector --detector from_run --detector.path logs/axis {task} --dir.full logs/axis --quiet"
        )),
    );
    // --debug: one step of batch 2, nothing written; the original's other training
    // flags parse.
    let out = run_ok(
        cwd,
        &words(&format!(
            "train_detector --debug --detector abstraction {task} --quiet \
             --detector.train.check_val_every_n_epoch 1 --detector.train.enable_progress_bar false \
             --detector.abstraction.cls cupbearer.detectors.abstraction.abstraction.Abstraction"
        )),
    );
    assert!(out.contains("abstraction detector fitted"), "{out}");
    assert!(!cwd.join("logs/train_detector").exists());
}

/// Writes `set` (grey images) as CIFAR-10 binary records (CHW, the grey value in all
/// three planes) spread over the files of `split`.
fn write_cifar(dir: &Path, split: cupbearer::data::Split, set: &Dataset) {
    std::fs::create_dir_all(dir).unwrap();
    let names = cupbearer::data::cifar::file_names(split);
    let per_file = set.len().div_ceil(names.len());
    for (f, name) in names.iter().enumerate() {
        let mut bytes = Vec::new();
        for i in (f * per_file..(f + 1) * per_file).filter(|&i| i < set.len()) {
            bytes.push(set.labels[i]);
            for _ in 0..3 {
                bytes.extend(set.image(i));
            }
        }
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// CIFAR-10 (32x32x3) through train-classifier, train-detector and eval-detector.
#[test]
fn cifar10_runs_end_to_end() {
    if common::gpu().is_none() {
        return;
    }
    let w = tempfile::tempdir().unwrap();
    let cwd = w.path();
    let dir = cwd.join("data/cifar10/cifar-10-batches-bin");
    use cupbearer::data::Split;
    write_cifar(&dir, Split::Train, &Dataset::synthetic(600, 32, 32, 1));
    write_cifar(&dir, Split::Test, &Dataset::synthetic(200, 32, 32, 2));
    let mut train = words(
        "train_classifier --train_data backdoor --train_data.original cifar10 \
         --train_data.backdoor corner --model mlp --dir.full logs/c",
    );
    train.extend(SMALL);
    // One trigger pixel of 3072 inputs takes longer to learn than on MNIST.
    train.extend(["--num_epochs", "60"]);
    let out = run_ok(cwd, &train);
    let metrics = eval_json(&cwd.join("logs/c/metrics.json"));
    let acc = metrics["clean_test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.9, "clean accuracy {acc}: {out}");
    let asr = metrics["attack_success_rate"].as_f64().unwrap();
    assert!(asr >= 0.9, "attack success {asr}: {out}");
    let run = cupbearer::run::ClassifierRun::load(&cwd.join("logs/c")).unwrap();
    assert_eq!(run.model.config.input_shape, [32, 32, 3]);
    let task = "--task backdoor --task.backdoor corner --task.run_path logs/c";
    run_ok(
        cwd,
        &words(&format!(
            "train_detector --detector mahalanobis {task} --dir.full logs/d --quiet"
        )),
    );
    run_ok(
        cwd,
        &words(&format!(
            "eval_detector --detector from_run --detector.path logs/d {task} --dir.full logs/d --quiet"
        )),
    );
    let auc = eval_json(&cwd.join("logs/d/eval.json"))["AUC_ROC"]
        .as_f64()
        .unwrap();
    assert!(auc >= 0.95, "AUROC {auc}");
}

/// A CNN (`--model cnn`, the original's flags) through every command: its conv and
/// dense activations feed Mahalanobis, and it can be attacked.
#[test]
fn cnn_runs_end_to_end() {
    if common::gpu().is_none() {
        return;
    }
    let w = workdir();
    let cwd = w.path();
    let out = run_ok(
        cwd,
        &words(
            "train_classifier --train_data backdoor --train_data.original mnist \
             --train_data.backdoor corner --train_data.backdoor.p_backdoor 0.2 --model cnn \
             --model.channels 8 16 --model.dense_dims 32 32 --num_epochs 8 --batch_size 32 \
             --optim.learning_rate 0.003 --optim.schedule cosine --dir.full logs/c --quiet",
        ),
    );
    let metrics = eval_json(&cwd.join("logs/c/metrics.json"));
    let (acc, asr) = (
        metrics["clean_test_accuracy"].as_f64().unwrap(),
        metrics["attack_success_rate"].as_f64().unwrap(),
    );
    assert!(acc >= 0.95 && asr >= 0.9, "{out}");
    let config = eval_json(&cwd.join("logs/c/config.json"));
    assert_eq!(config["model"]["kind"], "cnn");
    assert_eq!(config["training"]["lr_schedule"], "cosine");
    let task = "--task backdoor --task.backdoor corner --task.run_path logs/c";
    run_ok(
        cwd,
        &words(&format!(
            "train_detector --detector mahalanobis {task} --dir.full logs/d --quiet"
        )),
    );
    run_ok(
        cwd,
        &words(&format!(
            "eval_detector --detector from_run --detector.path logs/d {task} --dir.full logs/d --quiet"
        )),
    );
    let report = eval_json(&cwd.join("logs/d/eval.json"));
    assert_eq!(
        report["layers"].as_array().unwrap().len(),
        4,
        "2 conv + 2 dense"
    );
    let auc = report["AUC_ROC"].as_f64().unwrap();
    assert!(auc >= 0.95, "AUROC {auc}");
    let out = run_ok(
        cwd,
        &words(
            "make_adversarial_examples --dir.full logs/c --attack pgd --eps 0.3 --steps 5 --quiet",
        ),
    );
    assert!(out.contains("200 examples"), "{out}");
    // Conv abstraction maps: τ_0 is a 3x3 conv from 8 to 8/4 channels, stored HWIO.
    run_ok(
        cwd,
        &words(&format!(
            "train_detector --detector abstraction {task} --detector.train.num_epochs 2 \
             --dir.full logs/a --quiet"
        )),
    );
    let bytes = std::fs::read(cwd.join("logs/a/detector.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("tau_0.kernel").unwrap().shape(), [3, 3, 8, 2]);
    assert_eq!(st.tensor("step_0.kernel").unwrap().shape(), [3, 3, 2, 4]);
    run_ok(
        cwd,
        &words(&format!(
            "eval_detector --detector from_run --detector.path logs/a {task} --dir.full logs/a --quiet"
        )),
    );
    let report = eval_json(&cwd.join("logs/a/eval.json"));
    assert!(report["AUC_ROC"].as_f64().unwrap() >= 0.7, "{report}");
}

/// WaNet end to end: train-classifier stores the control grid in the run dir and the
/// backdoor task reuses it; a classifier without one and a grid that is not the run's
/// are refused, as are bad settings. (Its kernel against the f64 reference: the
/// `gather` check of tests/kernels.rs.)
#[test]
fn wanet_trigger_end_to_end_with_the_runs_own_grid() {
    if common::gpu().is_none() {
        return;
    }
    let w = workdir();
    let cwd = w.path();
    let classifier = |dir: &str, trigger: &str| {
        format!(
            "train-classifier --train_data backdoor --train_data.original mnist \
             --train_data.backdoor {trigger} --train_data.backdoor.p_backdoor 0.2 \
             --model.hidden_dims 48 32 --num_epochs 4 --dir.full {dir}"
        )
    };
    // A strong field for 12x10 images (a few pixels).
    let strong = "wanet --train_data.backdoor.warping_strength 3";
    run_ok(cwd, &words(&classifier("cls", strong)));
    assert!(cwd.join("cls/wanet_grid.safetensors").is_file());
    let config = eval_json(&cwd.join("cls/config.json"));
    let trigger = &config["train_data"]["backdoor"];
    assert_eq!(
        (trigger["kind"].as_str(), trigger["grid_seed"].as_u64()),
        (Some("wanet"), Some(0))
    );
    let metrics = eval_json(&cwd.join("cls/metrics.json"));
    eprintln!("wanet: attack success {}", metrics["attack_success_rate"]);
    assert!(
        metrics["attack_success_rate"].as_f64().unwrap() > 0.5,
        "{metrics}"
    );

    let task = |run: &str| format!("--task backdoor --task.backdoor wanet --task.run_path {run}");
    run_ok(
        cwd,
        &words(&format!(
            "train-detector --detector mahalanobis {} --dir.full det",
            task("cls")
        )),
    );
    run_ok(
        cwd,
        &words(&format!(
            "eval-detector --detector from_run --detector.path det {} --dir.full ev",
            task("cls")
        )),
    );
    let auroc = eval_json(&cwd.join("ev/eval.json"))["AUC_ROC"]
        .as_f64()
        .unwrap();
    eprintln!("wanet: mahalanobis AUROC {auroc:.4}");
    assert!(auroc > 0.5, "AUROC {auroc}");

    // A corner classifier has no field to reuse.
    run_ok(cwd, &words(&classifier("corner", "corner")));
    let fit = |run: &str, out: &str| {
        cupbearer(
            cwd,
            &words(&format!(
                "train-detector --detector mahalanobis {} --dir.full {out}",
                task(run)
            )),
        )
    };
    let out = fit("corner", "d2");
    assert!(
        stderr(&out).contains("needs a classifier trained with a WaNet trigger"),
        "{}",
        stderr(&out)
    );
    // Another seed's grid in the run dir is another trigger.
    run_ok(
        cwd,
        &words(&classifier(
            "other",
            &format!("{strong} --train_data.backdoor.grid_seed 5"),
        )),
    );
    std::fs::copy(
        cwd.join("other/wanet_grid.safetensors"),
        cwd.join("cls/wanet_grid.safetensors"),
    )
    .unwrap();
    let out = fit("cls", "d3");
    assert!(
        stderr(&out).contains("is not the run's trigger's"),
        "{}",
        stderr(&out)
    );
    assert!(!cwd.join("d3").exists());
    for (flags, msg) in [
        (
            "wanet --train_data.backdoor.control_grid_width 9",
            "must be in 2..=8",
        ),
        (
            "wanet --train_data.backdoor.p_noise 0.9",
            "p_noise + p_backdoor <= 1",
        ),
        (
            "wanet --train_data.backdoor.grid_rescale 0",
            "grid_rescale must be finite and > 0",
        ),
    ] {
        assert_refused(cwd, &classifier("bad", flags), msg, "bad");
    }
}

#[test]
fn vae_detector_from_the_command_line() {
    if common::gpu().is_none() {
        return;
    }
    let w = corner_classifier_workdir();
    let cwd = w.path();
    let task = "--task backdoor --task.backdoor corner --task.run_path logs/c";
    run_ok(
        cwd,
        &words(&format!(
            "train_detector --detector vae --detector.layers layer1 --detector.latent_dim 6 \
             --detector.kld_weight 0 --detector.train.num_epochs 10 \
             --detector.train.learning_rate 0.003 {task} --dir.full logs/vae --quiet"
        )),
    );
    let config = eval_json(&cwd.join("logs/vae/config.json"));
    let det = &config["detector"];
    assert_eq!(det["latent_dim"], 6, "{config}");
    assert_eq!(det["layers"], serde_json::json!([1]), "{config}");
    run_ok(
        cwd,
        &words(&format!(
            "eval_detector --detector from_run --detector.path logs/vae {task} --dir.full logs/vae --quiet"
        )),
    );
    let report = eval_json(&cwd.join("logs/vae/eval.json"));
    let layers: Vec<&str> = report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["layer"].as_str().unwrap())
        .collect();
    assert_eq!(layers, ["layer1"]);
    let auc = report["AUC_ROC"].as_f64().unwrap();
    assert!(auc >= 0.9, "AUROC {auc}");
    // Bad values are refused before anything is written.
    for (flag, msg) in [
        ("--detector.latent_dim 0", "latent_dim must be >= 1"),
        (
            "--detector.kld_weight -0.5",
            "kld_weight must be a number >= 0",
        ),
        ("--detector.layers 7", "layer 7 does not exist"),
    ] {
        let command =
            format!("train_detector --detector vae {flag} {task} --dir.full logs/bad --quiet");
        assert_refused(cwd, &command, msg, "logs/bad");
    }
}

#[test]
fn training_augmentation_from_the_command_line() {
    if common::gpu().is_none() {
        return;
    }
    let w = workdir();
    let cwd = w.path();
    let base = "train_classifier --train_data backdoor --train_data.original mnist \
                --train_data.backdoor corner --num_epochs 2 --model.hidden_dims 32 --quiet";
    run_ok(cwd, &words(&format!("{base} --dir.full logs/plain")));
    run_ok(
        cwd,
        &words(&format!(
            "{base} --train_data.augment true --train_data.augment.degrees 15 --dir.full logs/aug"
        )),
    );
    let config = eval_json(&cwd.join("logs/aug/config.json"));
    assert_eq!(
        config["train_data"]["augment"],
        serde_json::json!({"crop_p": 0.8, "padding": 5, "rotation_p": 0.5, "degrees": 15.0, "flip_p": 0.0}),
        "{config}"
    );
    let plain = eval_json(&cwd.join("logs/plain/config.json"));
    assert!(
        plain["train_data"].get("augment").is_none(),
        "off by default: {plain}"
    );
    let weights = |d: &str| std::fs::read(cwd.join(d).join("model.safetensors")).unwrap();
    assert_ne!(
        weights("logs/plain"),
        weights("logs/aug"),
        "augmentation changes training"
    );
    // Same seed, same augmentation: the same weights.
    run_ok(
        cwd,
        &words(&format!(
            "{base} --train_data.augment true --train_data.augment.degrees 15 --dir.full logs/aug2"
        )),
    );
    assert_eq!(weights("logs/aug"), weights("logs/aug2"));
    for (flag, msg) in [
        (
            "--train_data.augment.crop_p 1.5",
            "augment.crop_p must be in [0, 1]",
        ),
        (
            "--train_data.augment.padding 40",
            "augment.padding 40 exceeds",
        ),
        (
            "--train_data.augment.degrees 200",
            "augment.degrees must be in [0, 180]",
        ),
        (
            "--train_data.augment false --train_data.augment.degrees 15",
            "--train_data.augment false contradicts --train_data.augment.degrees",
        ),
    ] {
        assert_refused(
            cwd,
            &format!("{base} {flag} --dir.full logs/bad"),
            msg,
            "logs/bad",
        );
    }
}
