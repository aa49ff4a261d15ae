//! Kernel files at run time: `kernels export` writes the engine's sources, an exported
//! copy trains bit-identically, an edited one changes the result and is recorded, a
//! broken one is a clear error; `kernels list` describes every file.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn cupbearer(cwd: &Path, args: &[&str], shader_env: Option<&Path>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cupbearer"));
    c.current_dir(cwd)
        .args(args)
        .env("CUPBEARER_DATA_DIR", cwd.join("data"))
        .env_remove("CUPBEARER_SHADER_DIR");
    if let Some(dir) = shader_env {
        c.env("CUPBEARER_SHADER_DIR", dir);
    }
    c.output().expect("running cupbearer")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn exported_edited_and_broken_kernels() {
    if common::gpu().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    common::write_small_mnist(&cwd.join("data"));

    let listing = ok(&cupbearer(cwd, &["kernels", "list"], None));
    for name in cupbearer::gpu::shaders::BUILTIN.iter().map(|(n, _)| n) {
        assert!(
            listing.contains(&format!("{name}.wgsl")),
            "{name} not listed"
        );
    }
    assert!(
        listing.contains("checked against: adam_reference"),
        "{listing}"
    );
    assert_eq!(
        cupbearer::gpu::shaders::NOTES.len(),
        cupbearer::gpu::shaders::BUILTIN.len(),
        "every kernel file has notes"
    );

    ok(&cupbearer(cwd, &["kernels", "export", "k"], None));
    let again = cupbearer(cwd, &["kernels", "export", "k"], None);
    assert!(!again.status.success(), "export refuses to overwrite");

    let train = |dir: &str, extra: &[&str], env: Option<&Path>| {
        let mut args = vec![
            "train-classifier",
            "--train_data",
            "mnist",
            "--num_epochs",
            "1",
            "--model.hidden_dims",
            "16",
            "--quiet",
            "--dir.full",
            dir,
        ];
        args.extend(extra);
        cupbearer(cwd, &args, env)
    };
    ok(&train("builtin", &[], None));
    // The exported files are the engine's: bit-identical weights.
    ok(&train("exported", &["--shader-dir", "k"], None));
    let weights = |d: &str| std::fs::read(cwd.join(d).join("model.safetensors")).unwrap();
    assert_eq!(weights("builtin"), weights("exported"));
    let m = json(&cwd.join("exported/metrics.json"));
    let n_files = cupbearer::gpu::shaders::BUILTIN.len();
    assert_eq!(
        m["kernel_overrides"].as_array().unwrap().len(),
        n_files,
        "{m}"
    );
    assert!(json(&cwd.join("builtin/metrics.json"))
        .get("kernel_overrides")
        .is_none());

    // An edited Adam (twice the step), through the environment variable: another
    // result, and the one override recorded with its SHA-256.
    let edited = cwd.join("edited");
    std::fs::create_dir(&edited).unwrap();
    let adam = std::fs::read_to_string(cwd.join("k/adam.wgsl")).unwrap();
    let doubled = adam.replace(
        "params[i] -= step.learning_rate",
        "params[i] -= 2.0 * step.learning_rate",
    );
    std::fs::write(edited.join("adam.wgsl"), &doubled).unwrap();
    let out = train("edited_run", &[], Some(&edited));
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("kernel file adam.wgsl overridden by"));
    assert_ne!(weights("builtin"), weights("edited_run"));
    let o = &json(&cwd.join("edited_run/metrics.json"))["kernel_overrides"];
    assert_eq!(o.as_array().unwrap().len(), 1);
    assert_eq!(o[0]["kernel"], "adam");
    assert_eq!(o[0]["sha256"].as_str().unwrap().len(), 64);

    // A broken one: the file, line and source line, nothing written.
    std::fs::write(
        edited.join("adam.wgsl"),
        adam.replace("let m_hat", "let m_hat = = "),
    )
    .unwrap();
    let out = train("broken", &["--shader-dir", edited.to_str().unwrap()], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("adam.wgsl:") && err.contains("let m_hat = = "),
        "{err}"
    );
    assert!(!cwd.join("broken/model.safetensors").exists());
}

#[test]
fn kernels_check_passes_built_in_files_and_fails_a_wrong_edit() {
    if common::gpu().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let text = ok(&cupbearer(
        cwd,
        &["kernels", "check", "--kernel", "adam"],
        None,
    ));
    assert!(text.contains("adam  [adam, step]"), "{text}");
    assert!(text.contains("comparisons passed"), "{text}");

    // Twice the learning rate: it compiles and runs, and its check says it is wrong.
    ok(&cupbearer(cwd, &["kernels", "export", "k"], None));
    let adam = cwd.join("k/adam.wgsl");
    let source = std::fs::read_to_string(&adam).unwrap();
    let edited = source.replace(
        "params[i] -= step.learning_rate",
        "params[i] -= 2.0 * step.learning_rate",
    );
    assert_ne!(edited, source);
    std::fs::write(&adam, edited).unwrap();
    let args = [
        "kernels",
        "check",
        "--kernel",
        "adam",
        "--json",
        "check.json",
    ];
    let out = cupbearer(cwd, &args, Some(&cwd.join("k")));
    assert_eq!(out.status.code(), Some(1));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stdout.contains("FAILED"), "{stdout}");
    assert!(stderr.contains("adam.wgsl overridden by"), "{stderr}");
    assert!(
        stderr.contains("identical to the built-in ones"),
        "{stderr}"
    );
    assert!(stderr.contains("comparisons failed"), "{stderr}");
    let report = json(&cwd.join("check.json"));
    let overrides = report["kernel_overrides"].as_array().unwrap();
    let edited: Vec<&serde_json::Value> =
        overrides.iter().filter(|o| o["edited"] == true).collect();
    assert_eq!(edited.len(), 1, "{overrides:?}");
    assert_eq!(edited[0]["kernel"], "adam");
    let outcomes = report["outcomes"].as_array().unwrap();
    assert!(outcomes.iter().all(|o| o["passed"] == false), "{report}");

    let out = cupbearer(cwd, &["kernels", "check", "--kernel", "adamw"], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no kernel file is called adamw"),
        "{stderr}"
    );
}

#[test]
fn kernels_bench_times_built_in_and_edited_files_side_by_side() {
    if common::gpu().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let text = ok(&cupbearer(cwd, &["kernels", "bench", "--reps", "1"], None));
    assert!(text.contains("MLP training step"), "{text}");
    assert!(text.contains("matmul 1024x1024x1024"), "{text}");
    assert!(!text.contains("edited ms"), "{text}");

    // An edited Adam (the same arithmetic, spelled differently) is timed beside the
    // built-in one, dispatch for dispatch.
    ok(&cupbearer(cwd, &["kernels", "export", "k"], None));
    let adam = cwd.join("k/adam.wgsl");
    let source = std::fs::read_to_string(&adam).unwrap();
    let edited = source.replace("let g = grads[i];", "let g = grads[i] * 1.0;");
    assert_ne!(edited, source);
    std::fs::write(&adam, edited).unwrap();
    let args = ["kernels", "bench", "--reps", "1", "--json", "bench.json"];
    let text = ok(&cupbearer(cwd, &args, Some(&cwd.join("k"))));
    assert!(text.contains("edited ms"), "{text}");
    let report = json(&cwd.join("bench.json"));
    let (builtin, edited) = (&report["builtin"], &report["overridden"]);
    let kernels = builtin["mlp_step_kernels"].as_array().unwrap();
    assert_eq!(
        kernels.len(),
        edited["mlp_step_kernels"].as_array().unwrap().len()
    );
    assert!(kernels.iter().any(|k| k["file"] == "adam"));
    for k in kernels {
        assert!(k["ms"].as_f64().unwrap() > 0.0, "{k}");
    }
    assert!(builtin["matmul_1024"]["gflops"].as_f64().unwrap() > 0.0);
    assert!(edited["mlp_step_ms"].as_f64().unwrap() > 0.0);
}

/// The shell lines of the README's code block after `marker` (comments dropped).
fn readme_block(marker: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let after = &readme[readme.find(marker).expect("marker in README")..];
    let start = after.find("```bash\n").unwrap() + "```bash\n".len();
    let block = &after[start..start + after[start..].find("```").unwrap()];
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

#[test]
fn readme_worked_example_runs() {
    if common::gpu().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    common::write_small_mnist(&cwd.join("data"));
    let bin = Path::new(env!("CARGO_BIN_EXE_cupbearer")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let lines = readme_block("<!-- worked example: kernels -->");
    assert_eq!(lines.len(), 5, "{lines:?}");
    let mut outputs = Vec::new();
    for line in &lines {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", line])
            .current_dir(cwd)
            .env("PATH", &path)
            .env("CUPBEARER_DATA_DIR", cwd.join("data"))
            .env_remove("CUPBEARER_SHADER_DIR")
            .output()
            .unwrap();
        outputs.push(ok(&out));
    }
    // The edit took, passed its check, was timed beside the built-in Adam, and the run
    // records it.
    let adam = std::fs::read_to_string(cwd.join("my_kernels/adam.wgsl")).unwrap();
    assert!(adam.contains("@workgroup_size(256, 1, 1)") && adam.contains("nwg.x * 256u"));
    assert!(outputs[2].contains("comparisons passed"), "{}", outputs[2]);
    assert!(outputs[3].contains("edited ms"), "{}", outputs[3]);
    let metrics = json(&cwd.join("logs/adam256/metrics.json"));
    let edited: Vec<&serde_json::Value> = metrics["kernel_overrides"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["edited"] == true)
        .collect();
    assert_eq!(edited.len(), 1, "{metrics}");
    assert_eq!(edited[0]["kernel"], "adam");
}
