//! Hostile inputs: mutated files for every reader (no panic, only errors), non-finite
//! numbers in stored tensors and in scores, zero epochs, and two runs racing for one
//! output directory.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;

use common::fixtures::{cifar_batches, err_text};
use cupbearer::data::backdoor::{Backdoor, Corner, Trigger};
use cupbearer::data::{cifar, idx, Dataset, DatasetName};
use cupbearer::detectors::mahalanobis::{LayerStats, Mahalanobis, MahalanobisConfig};
use cupbearer::detectors::{Detector, LayerScores, SampleSet};
use cupbearer::gpu::GpuContext;
use cupbearer::io::write_json;
use cupbearer::model::{GpuMlp, Mlp, MlpConfig};
use cupbearer::registry::{defaults_of, ConfigSpec, DetectorEntry, Registry, TaskEnv};
use cupbearer::run::{ClassifierRun, ClassifierRunConfig, TrainDataConfig, TrainingConfig};
use cupbearer::tasks::backdoor::BackdoorTaskConfig;
use cupbearer::workflows::detector::{eval_detector, DetectorSource, EvalOptions};
use cupbearer::workflows::{claim, Output, LOCK_FILE};

/// A seeded xorshift generator for the mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `valid` mutated: truncated, with flipped bits, or with a header window overwritten
/// by random or extreme bytes.
fn mutate(valid: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = valid.to_vec();
    match rng.below(4) {
        0 => b.truncate(rng.below(b.len())),
        1 => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
        }
        2 => {
            let at = rng.below(b.len().min(64));
            let fill = [0x00, 0xff, 0x7f, 0x80][rng.below(4)];
            for v in b.iter_mut().skip(at).take(8) {
                *v = fill;
            }
        }
        _ => {
            let at = rng.below(b.len().min(64));
            for v in b.iter_mut().skip(at).take(1 + rng.below(8)) {
                *v = rng.next() as u8;
            }
        }
    }
    b
}

/// Feeds `cases` mutations of `valid`, written to `path`, to `read`: any result but a
/// panic is fine. Returns how many were rejected.
fn fuzz(path: &Path, valid: &[u8], cases: usize, seed: u64, read: impl Fn(&Path)) -> usize {
    let mut rng = Rng(seed);
    let mut panics = Vec::new();
    for case in 0..cases {
        std::fs::write(path, mutate(valid, &mut rng)).unwrap();
        if catch_unwind(AssertUnwindSafe(|| read(path))).is_err() {
            panics.push(case);
        }
    }
    assert!(
        panics.is_empty(),
        "{}: panicked on cases {panics:?}",
        path.display()
    );
    cases
}

fn small_mlp() -> MlpConfig {
    MlpConfig {
        input_shape: [4, 3, 1],
        conv_channels: Vec::new(),
        hidden_dims: vec![5],
        output_dim: 3,
    }
}

/// A classifier run dir at `run` with an untrained `mlp` (no GPU needed).
fn untrained_run(run: &Path, mlp: &MlpConfig) {
    std::fs::create_dir_all(run).unwrap();
    Mlp::init(mlp, 0)
        .unwrap()
        .save(&run.join("model.safetensors"))
        .unwrap();
    let config = ClassifierRunConfig::new(
        TrainDataConfig {
            dataset: DatasetName::Mnist,
            max_size: None,
            backdoor: None,
            augment: None,
        },
        mlp.clone(),
        TrainingConfig::default(),
    );
    write_json(&run.join("config.json"), &config).unwrap();
}

/// A Mahalanobis detector file with one 5-wide layer of made-up statistics.
fn fake_detector(path: &Path) {
    let det = Mahalanobis {
        config: MahalanobisConfig::default(),
        stats: vec![LayerStats {
            layer: 0,
            count: 9,
            mean: vec![0.5; 5],
            covariance: vec![0.25; 25],
            precision: vec![1.0; 25],
        }],
    };
    det.save(path).unwrap();
}

#[test]
fn mutated_files_are_errors_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let images = Dataset::synthetic(20, 5, 3, 1);
    let valid = d.join("valid-images");
    idx::write_images(&valid, 5, 3, &images.images, false).unwrap();
    let raw = std::fs::read(&valid).unwrap();
    fuzz(&d.join("images"), &raw, 2000, 1, |p| {
        let _ = idx::read_images(p);
    });
    idx::write_images(&valid, 5, 3, &images.images, true).unwrap();
    let gz = std::fs::read(&valid).unwrap();
    fuzz(&d.join("images.gz"), &gz, 1000, 2, |p| {
        let _ = idx::read_images(p);
    });
    idx::write_labels(&valid, &images.labels, false).unwrap();
    let labels = std::fs::read(&valid).unwrap();
    fuzz(&d.join("labels"), &labels, 2000, 3, |p| {
        let _ = idx::read_labels(p);
    });

    let batch = cifar_batches(&[3], 0).remove(0);
    fuzz(&d.join("test_batch.bin"), &batch, 1000, 4, |p| {
        let _ = cifar::read_batches(&[p.to_path_buf()]);
    });

    let model = d.join("model.safetensors");
    Mlp::init(&small_mlp(), 0).unwrap().save(&model).unwrap();
    let model_bytes = std::fs::read(&model).unwrap();
    fuzz(&d.join("mutated.safetensors"), &model_bytes, 2000, 5, |p| {
        let _ = Mlp::load(p);
    });

    let detector = d.join("detector.safetensors");
    fake_detector(&detector);
    let detector_bytes = std::fs::read(&detector).unwrap();
    let config = serde_json::to_value(MahalanobisConfig::default()).unwrap();
    let registry = Registry::builtin();
    fuzz(&d.join("mutated-detector"), &detector_bytes, 2000, 6, |p| {
        let _ = registry.load_detector("mahalanobis", &config, p);
    });

    let run = d.join("run");
    untrained_run(&run, &small_mlp());
    assert!(ClassifierRun::load(&run).is_ok());
    let config_bytes = std::fs::read(run.join("config.json")).unwrap();
    let mut rng = Rng(7);
    for _ in 0..1000 {
        std::fs::write(run.join("config.json"), mutate(&config_bytes, &mut rng)).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| ClassifierRun::load(&run).map(|_| ())));
        assert!(r.is_ok(), "config.json reader panicked");
    }
}

/// The byte offset of tensor `name`'s data in a safetensors file.
fn tensor_offset(bytes: &[u8], name: &str) -> usize {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let data = st.tensor(name).unwrap().data();
    data.as_ptr() as usize - bytes.as_ptr() as usize
}

fn poison(path: &Path, name: &str, index: usize, value: f32) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = tensor_offset(&bytes, name) + 4 * index;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn non_finite_stored_tensors_are_errors_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    Mlp::init(&small_mlp(), 0).unwrap().save(&model).unwrap();
    poison(&model, "Dense_0.kernel", 3, f32::NAN);
    let msg = err_text(Mlp::load(&model));
    assert!(
        msg.contains("Dense_0.kernel") && msg.contains("NaN at index 3"),
        "{msg}"
    );

    Mlp::init(&small_mlp(), 0).unwrap().save(&model).unwrap();
    poison(&model, "Dense_1.bias", 0, f32::INFINITY);
    let msg = err_text(Mlp::load(&model));
    assert!(msg.contains("Dense_1.bias") && msg.contains("inf"), "{msg}");

    let detector = dir.path().join("detector.safetensors");
    fake_detector(&detector);
    poison(&detector, "layer0.precision", 7, f32::NAN);
    let config = serde_json::to_value(MahalanobisConfig::default()).unwrap();
    let msg = err_text(
        Registry::builtin()
            .load_detector("mahalanobis", &config, &detector)
            .map(|_| ()),
    );
    assert!(
        msg.contains("layer0.precision") && msg.contains("NaN"),
        "{msg}"
    );
}

fn cupbearer(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cupbearer"))
        .args(args)
        .env_remove("CUPBEARER_DATA_DIR")
        .output()
        .unwrap()
}

#[test]
fn a_corrupt_checkpoint_stops_train_detector_and_zero_epochs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    untrained_run(&run, &small_mlp());
    poison(
        &run.join("model.safetensors"),
        "Dense_0.kernel",
        0,
        f32::NAN,
    );
    let out_dir = dir.path().join("detector");
    let out = cupbearer(&[
        "train-detector",
        "--task",
        "backdoor",
        "--task.run_path",
        run.to_str().unwrap(),
        "--task.backdoor",
        "corner",
        "--detector",
        "mahalanobis",
        "--dir.full",
        out_dir.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Dense_0.kernel holds NaN"), "{err}");
    assert!(
        !out_dir.exists(),
        "a failed run leaves its output dir behind"
    );

    let target = dir.path().join("untrained");
    let out = cupbearer(&[
        "train-classifier",
        "--train_data",
        "mnist",
        "--num_epochs",
        "0",
        "--dir.full",
        target.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--num_epochs must be >= 1"), "{err}");
    assert!(!target.exists());
}

#[test]
fn a_second_run_into_a_claimed_directory_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("new");
    let first = claim(&target).unwrap();
    assert!(target.join(LOCK_FILE).is_file());
    let msg = err_text(claim(&target).map(|_| ()));
    assert!(msg.contains("in use by another cupbearer run"), "{msg}");
    // The same from another process: the command fails before loading anything.
    let out = cupbearer(&[
        "train-classifier",
        "--train_data",
        "mnist",
        "--dir.full",
        target.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("in use by another cupbearer run"), "{err}");
    // Released: the claim's empty directory is gone, and it can be claimed again.
    drop(first);
    assert!(!target.exists());
    let again = claim(&target).unwrap();
    std::fs::write(target.join("kept"), b"x").unwrap();
    drop(again);
    assert!(target.join("kept").is_file() && !target.join(LOCK_FILE).exists());
}

/// A detector whose scores are NaN.
struct Broken;

impl Detector for Broken {
    fn kind(&self) -> &'static str {
        "broken"
    }
    fn config(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    fn fit(
        &mut self,
        _: &GpuContext,
        _: &GpuMlp,
        _: &SampleSet<'_>,
        _: bool,
    ) -> anyhow::Result<()> {
        Ok(())
    }
    fn layer_scores(
        &self,
        _: &GpuContext,
        _: &GpuMlp,
        samples: &SampleSet<'_>,
        _: usize,
    ) -> anyhow::Result<LayerScores> {
        let mut scores = vec![1.0; samples.indices.len()];
        scores[1] = f64::NAN;
        Ok(LayerScores {
            names: vec!["layer0".into()],
            scores: vec![scores],
        })
    }
    fn save(&self, _: &Path) -> anyhow::Result<()> {
        Ok(())
    }
}

#[derive(Default, serde::Serialize)]
struct NoOptions {}

#[test]
fn a_nan_score_is_an_error_not_a_rank() {
    if common::gpu().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    common::write_mnist_like(
        &data_dir,
        &Dataset::synthetic(40, 4, 3, 1),
        &Dataset::synthetic(20, 4, 3, 2),
    );
    let run = dir.path().join("run");
    let mlp = MlpConfig {
        output_dim: 10,
        ..small_mlp()
    };
    untrained_run(&run, &mlp);
    let mut registry = Registry::builtin();
    registry.register_detector(DetectorEntry {
        name: "broken",
        doc: "NaN scores.",
        config: ConfigSpec {
            defaults: defaults_of::<NoOptions>,
            options: &[],
            nested: &[],
            debug: &[],
        },
        build: |_| Ok(Box::new(Broken)),
        load: None,
    });
    let task_config = BackdoorTaskConfig {
        run_path: run,
        backdoor: Backdoor {
            trigger: Trigger::Corner {
                corner: Corner::TopLeft,
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
    let out = dir.path().join("eval");
    let err = eval_detector(
        task.as_ref(),
        &DetectorSource::Config {
            kind: "broken".into(),
            config: serde_json::json!({}),
        },
        &EvalOptions {
            registry: &registry,
            batch_size: 8,
            seed: 0,
            aggregation: None,
        },
        &Output {
            dir: Some(&out),
            overwrite: false,
            progress: false,
        },
    )
    .err()
    .unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("scored normal sample 1 NaN on layer layer0"),
        "{msg}"
    );
    assert!(!out.exists(), "nothing is written");
}

#[test]
fn a_write_failing_part_way_keeps_the_old_file_and_leaves_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.json");
    cupbearer::io::write_atomic(&path, b"old content").unwrap();
    let err = cupbearer::io::write_atomic_with(&path, |f| {
        use std::io::Write;
        f.write_all(b"new con")?;
        Err(std::io::Error::other("No space left on device"))
    })
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("No space left on device"),
        "{err:#}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"old content");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["metrics.json"]);
}

#[test]
fn a_kernel_that_does_not_finish_is_an_error_and_writes_nothing() {
    if common::gpu().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    common::write_small_mnist(&cwd.join("data"));
    // An Adam whose loop never exits (software drivers cap loops, so it ends after a
    // few seconds there; GPUs would run it forever).
    let kernels = cwd.join("k");
    std::fs::create_dir(&kernels).unwrap();
    let builtin = cupbearer::gpu::shaders::BUILTIN
        .iter()
        .find(|(n, _)| *n == "adam")
        .unwrap()
        .1;
    let spinning = builtin.replace(
        "fn update(i: u32) {\n",
        "fn update(i: u32) {\n    loop { m1[i].x = fract(m1[i].x * 1.37 + 0.1); if (m1[i].x > 2.0) { break; } }\n",
    );
    assert_ne!(spinning, builtin);
    std::fs::write(kernels.join("adam.wgsl"), spinning).unwrap();
    let run = cwd.join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_cupbearer"))
        .current_dir(cwd)
        .args([
            "--shader-dir",
            "k",
            "train-classifier",
            "--train-data",
            "mnist",
        ])
        .args(["--num-epochs", "1", "--dir-full", "run"])
        .env("CUPBEARER_DATA_DIR", cwd.join("data"))
        .env("CUPBEARER_GPU_TIMEOUT", "0.5")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the GPU finished no work for 0.5 s"),
        "{stderr}"
    );
    assert!(!run.join("model.safetensors").exists());
    assert!(!run.join("metrics.json").exists());

    // A bad timeout is refused before any work.
    let out = Command::new(env!("CARGO_BIN_EXE_cupbearer"))
        .args(["kernels", "check", "--kernel", "gate"])
        .env("CUPBEARER_GPU_TIMEOUT", "soon")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CUPBEARER_GPU_TIMEOUT=soon: expected a number of seconds"),
        "{stderr}"
    );
}

#[test]
fn a_lost_device_is_an_error_not_a_panic() {
    let Some(ctx) = common::gpu() else { return };
    let buf = ctx.buffer_from("x", &[1.0f32; 4]).unwrap();
    ctx.device.destroy();
    let result = catch_unwind(AssertUnwindSafe(|| {
        ctx.read::<f32>(cupbearer::gpu::Slice::whole(&buf))
    }));
    let err = result
        .expect("reading from a lost device panicked")
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("GPU device lost"), "{msg}");
}
