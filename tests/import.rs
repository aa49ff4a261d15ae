//! `import-model`: PyTorch-style checkpoints written by numpy (tests/python/
//! write_checkpoints.py) in f16, bf16 and f32, the upstream's MLP and CNN naming and
//! nn.Sequential's, imported through the CLI; our GPU logits against numpy's; a detector
//! on the imported run; broken checkpoints as clear errors that write nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fixtures::write_cifar;
use cupbearer::data::Split;
use cupbearer::gpu::batch::{FloatImages, GpuDataset};
use cupbearer::model::train::predict_logits;
use cupbearer::model::GpuMlp;
use cupbearer::run::ClassifierRun;

fn cupbearer(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cupbearer"))
        .current_dir(cwd)
        .args(args)
        .env("CUPBEARER_DATA_DIR", cwd.join("data"))
        .output()
        .expect("running cupbearer")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs the Python writer into `dir`; false (skip) when numpy is missing outside CI.
fn write_checkpoints(dir: &Path) -> bool {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/write_checkpoints.py");
    match Command::new("python3").arg(&script).arg(dir).output() {
        Ok(o) if o.status.success() => true,
        Ok(o) if std::env::var_os("CI").is_none() && stderr(&o).contains("ModuleNotFoundError") => {
            eprintln!("skipping: numpy not installed");
            false
        }
        Ok(o) => panic!("write_checkpoints.py failed: {}", stderr(&o)),
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "python3 missing under CI: {e}"
            );
            false
        }
    }
}

/// The reference file's inputs ([N, C, H, W]) as HWC images and its logits.
fn reference(path: &Path) -> (Vec<usize>, Vec<f32>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |name: &str| -> (Vec<usize>, Vec<f32>) {
        let t = st.tensor(name).unwrap();
        let v = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), v)
    };
    let ((shape, chw), (_, logits)) = (f32s("inputs"), f32s("logits"));
    let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    let mut hwc = vec![0f32; chw.len()];
    for s in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                hwc[s * h * w * c + p * c + ch] = chw[s * h * w * c + ch * h * w + p];
            }
        }
    }
    (vec![h, w, c, n], hwc, logits)
}

#[test]
fn pytorch_checkpoints_import_and_match_numpy() {
    let Some(ctx) = common::gpu() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let ckpt = cwd.join("ckpt");
    if !write_checkpoints(&ckpt) {
        return;
    }
    common::write_small_mnist(&cwd.join("data"));
    let cifar = cwd.join("data/cifar10/cifar-10-batches-bin");
    write_cifar(&cifar, Split::Train, &[4; 5], 0);
    write_cifar(&cifar, Split::Test, &[20], 100);

    let cases = [
        (
            "mlp_f16",
            "--train_data backdoor --train_data.original mnist --train_data.backdoor corner",
        ),
        ("seq_f32", "--train_data cifar10"),
        ("cnn_bf16", "--train_data cifar10"),
    ];
    for (name, data) in cases {
        let file = ckpt.join(format!("{name}.safetensors"));
        let refs = ckpt.join(format!("{name}_ref.safetensors"));
        let dir = format!("logs/{name}");
        let mut args = vec!["import-model", "--checkpoint", file.to_str().unwrap()];
        args.extend(data.split_whitespace());
        args.extend([
            "--reference",
            refs.to_str().unwrap(),
            "--dir.full",
            &dir,
            "--quiet",
        ]);
        let out = cupbearer(cwd, &args);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("clean test accuracy"), "{stdout}");

        let run = ClassifierRun::load(&cwd.join(&dir)).unwrap();
        assert_eq!(run.config.command, "import-model");
        let record = run.config.imported.as_ref().unwrap();
        assert_eq!(record.sha256.len(), 64);
        let metrics: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(cwd.join(&dir).join("metrics.json")).unwrap(),
        )
        .unwrap();
        assert!(metrics["clean_test_accuracy"].as_f64().is_some());
        assert_eq!(
            metrics["attack_success_rate"].is_number(),
            name == "mlp_f16",
            "{name}"
        );

        // Our GPU forward pass of the stored run against numpy's logits.
        let (shape, images, want) = reference(&refs);
        let n = shape[3];
        let labels = vec![0u32; n];
        let data = GpuDataset::upload_f32(
            &ctx,
            "reference",
            &FloatImages {
                pixels: &images,
                labels: &labels,
                shape: [shape[0], shape[1], shape[2]],
                num_classes: 10,
            },
        )
        .unwrap();
        let model = GpuMlp::upload(&ctx, &run.model).unwrap();
        let indices: Vec<u32> = (0..n as u32).collect();
        let got = predict_logits(&ctx, &model, &data, &indices, 4).unwrap();
        let want64: Vec<f64> = want.iter().map(|&v| f64::from(v)).collect();
        common::assert_close(&got, &want64, 1e-4, 1e-4, &format!("{name} logits"));
    }
    let cnn = ClassifierRun::load(&cwd.join("logs/cnn_bf16")).unwrap();
    assert_eq!(
        (
            cnn.model.config.conv_channels.clone(),
            cnn.model.config.hidden_dims.clone()
        ),
        (vec![4, 6], vec![8])
    );

    // Every detector works on an imported run.
    let fit = cupbearer(
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
            "logs/mlp_f16",
            "--dir.full",
            "logs/det",
            "--quiet",
        ],
    );
    assert!(fit.status.success(), "{}", stderr(&fit));

    // A wrong input layout is caught by the reference logits.
    let seq = ckpt.join("seq_f32.safetensors");
    let seq_ref = ckpt.join("seq_f32_ref.safetensors");
    let out = cupbearer(
        cwd,
        &[
            "import-model",
            "--checkpoint",
            seq.to_str().unwrap(),
            "--train_data",
            "cifar10",
            "--input_layout",
            "hwc",
            "--reference",
            seq_ref.to_str().unwrap(),
            "--dir.full",
            "logs/wrong",
            "--quiet",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("of reference sample"),
        "{}",
        stderr(&out)
    );
    assert!(!cwd.join("logs/wrong").exists());

    // Broken checkpoints: clear errors naming the tensor, nothing written.
    for (name, msg) in [
        ("no_bias", "layers.linear_1.weight has no bias"),
        ("batchnorm", "unsupported tensor model.bn.running_mean"),
        (
            "bad_chain",
            "layers.linear_1 takes 15 inputs but follows layers.linear_0's 16 outputs",
        ),
        ("nan", "tensor model.layers.linear_2.weight"),
    ] {
        let file = ckpt.join(format!("{name}.safetensors"));
        let dir = format!("logs/{name}");
        let out = cupbearer(
            cwd,
            &[
                "import-model",
                "--checkpoint",
                file.to_str().unwrap(),
                "--train_data",
                "mnist",
                "--dir.full",
                &dir,
                "--quiet",
            ],
        );
        assert!(!out.status.success(), "{name}");
        assert!(stderr(&out).contains(msg), "{name}: {}", stderr(&out));
        assert!(!cwd.join(&dir).exists(), "{name}: nothing written");
    }
    // The MNIST model does not fit CIFAR images.
    let mlp = ckpt.join("mlp_f16.safetensors");
    let out = cupbearer(
        cwd,
        &[
            "import-model",
            "--checkpoint",
            mlp.to_str().unwrap(),
            "--train_data",
            "cifar10",
            "--dir.full",
            "logs/x",
            "--quiet",
        ],
    );
    assert!(
        stderr(&out).contains("the layers do not chain"),
        "{}",
        stderr(&out)
    );
}

/// Dtype of every tensor of a safetensors file.
fn dtypes(path: &Path) -> Vec<safetensors::Dtype> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(_, v)| v.dtype()).collect()
}

#[test]
fn saved_dtypes_read_back_transparently() {
    if common::gpu().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    common::write_small_mnist(&cwd.join("data"));
    let train = "train_classifier --train_data backdoor --train_data.original mnist \
                 --train_data.backdoor corner --train_data.backdoor.p_backdoor 0.2 \
                 --num_epochs 3 --model.hidden_dims 48 32 --quiet";
    for (dir, dtype) in [("c32", "f32"), ("c16", "f16")] {
        let mut args: Vec<&str> = train.split_whitespace().collect();
        args.extend(["--dtype", dtype, "--dir.full", dir]);
        let out = cupbearer(cwd, &args);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert!(dtypes(&cwd.join("c16/model.safetensors"))
        .iter()
        .all(|&d| d == safetensors::Dtype::F16));
    // The f16 file holds the f32 weights rounded to nearest even, read back as f32.
    let (full, half) = (
        ClassifierRun::load(&cwd.join("c32")).unwrap().model,
        ClassifierRun::load(&cwd.join("c16")).unwrap().model,
    );
    for (a, b) in full.layers.iter().zip(&half.layers) {
        let rounded: Vec<f32> = a
            .kernel
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        assert_eq!(rounded, b.kernel);
    }

    // Our own (Flax-style) files import as they are.
    let out = cupbearer(
        cwd,
        &[
            "import-model",
            "--checkpoint",
            "c32/model.safetensors",
            "--train_data",
            "mnist",
            "--dir.full",
            "ours",
            "--quiet",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let ours = ClassifierRun::load(&cwd.join("ours")).unwrap();
    assert_eq!(ours.model.layers, full.layers);
    assert_eq!(
        ours.config.imported.unwrap().layout,
        cupbearer::model::import::Layout::Flax
    );

    let mut aucs = Vec::new();
    let task = "--task backdoor --task.backdoor corner --task.run_path c32";
    for (dir, dtype) in [("d32", "f32"), ("d16", "bf16")] {
        let fit = format!(
            "train-detector --detector mahalanobis {task} --dtype {dtype} --dir.full {dir} --quiet"
        );
        let out = cupbearer(cwd, &fit.split_whitespace().collect::<Vec<_>>());
        assert!(out.status.success(), "{}", stderr(&out));
        let eval = format!("eval-detector --detector from_run --detector.path {dir} {task} --dir.full {dir}/eval --quiet");
        let out = cupbearer(cwd, &eval.split_whitespace().collect::<Vec<_>>());
        assert!(out.status.success(), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(cwd.join(dir).join("eval/eval.json")).unwrap(),
        )
        .unwrap();
        aucs.push(report["AUC_ROC"].as_f64().unwrap());
    }
    let stored = dtypes(&cwd.join("d16/detector.safetensors"));
    assert!(
        stored.contains(&safetensors::Dtype::BF16) && !stored.contains(&safetensors::Dtype::F32),
        "{stored:?}"
    );
    assert!(
        (aucs[0] - aucs[1]).abs() < 0.01,
        "f32 {} vs bf16 {}",
        aucs[0],
        aucs[1]
    );
    assert!(aucs[0] > 0.9, "{aucs:?}");
    // A Mahalanobis precision exceeds f16's range: refused, and the run is not complete.
    let fit =
        format!("train-detector --detector mahalanobis {task} --dtype f16 --dir.full dx --quiet");
    let out = cupbearer(cwd, &fit.split_whitespace().collect::<Vec<_>>());
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not fit F16"),
        "{}",
        stderr(&out)
    );
    assert!(!cwd.join("dx/config.json").exists());
}

#[test]
fn values_beyond_f16_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("big.safetensors");
    let values = [1.0f32, 1e6];
    cupbearer::io::write_f32_safetensors(
        &path,
        &[("x".into(), vec![2], &values[..])],
        "k",
        "{}".into(),
    )
    .unwrap();
    let err = cupbearer::io::store_as(&path, cupbearer::io::SaveDtype::F16).unwrap_err();
    assert!(format!("{err:#}").contains("does not fit F16"), "{err:#}");
    // Left as it was.
    assert_eq!(dtypes(&path), [safetensors::Dtype::F32]);
    cupbearer::io::store_as(&path, cupbearer::io::SaveDtype::Bf16).unwrap();
    assert_eq!(dtypes(&path), [safetensors::Dtype::BF16]);
}
