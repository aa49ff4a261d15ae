//! cupbearer in the browser: wasm-bindgen exports that run the library's async paths
//! (context creation, MNIST from bytes, classifier training with a trigger, the
//! quadratic detectors, kernel validation) for `web/index.html`. The page serialises
//! its calls; what they share lives in one thread-local [`Session`]. Every error comes
//! back as a rejected promise whose message the page shows.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;
use web_time::Instant;

use cupbearer::checks::{self, Outcome};
use cupbearer::data::backdoor::Backdoor;
use cupbearer::data::Dataset;
use cupbearer::detectors::mahalanobis::MahalanobisConfig;
use cupbearer::detectors::quadratic::{Quadratic, QuadraticFit};
use cupbearer::detectors::que::QueConfig;
use cupbearer::detectors::spectral::SpectralConfig;
use cupbearer::detectors::{FitData, LayerScores, SampleSet};
use cupbearer::eval::metrics::{detection_metrics, roc_curve};
use cupbearer::gpu::batch::GpuDataset;
use cupbearer::gpu::shaders::{self, Shaders, BUILTIN, NOTES};
use cupbearer::gpu::GpuContext;
use cupbearer::model::train::{test_results, train_on_async, TestSet, TrainOptions};
use cupbearer::model::{GpuMlp, Mlp, MlpConfig};
use cupbearer::progress;

/// Storage buffers one kernel binds at most (`batch.wgsl`'s gather).
const STORAGE_BUFFERS_NEEDED: u32 = 9;

#[derive(Default)]
struct Session {
    ctx: Option<Rc<GpuContext>>,
    /// Kernel files edited in the page, by name: what the next context compiles.
    edited: BTreeMap<String, String>,
    data: Option<Rc<Data>>,
    trained: Option<Rc<Trained>>,
}

struct Data {
    train: Dataset,
    test: Dataset,
}

/// A trained classifier with what it was trained on, for the detectors.
struct Trained {
    ctx: Rc<GpuContext>,
    model: GpuMlp,
    backdoor: Backdoor,
    seed: u32,
    train: GpuDataset,
    test: GpuDataset,
    test_labels: Vec<u8>,
}

thread_local! {
    static SESSION: RefCell<Session> = RefCell::default();
}

fn session<T>(f: impl FnOnce(&mut Session) -> T) -> T {
    SESSION.with(|s| f(&mut s.borrow_mut()))
}

fn js(e: anyhow::Error) -> JsError {
    JsError::new(&format!("{e:#}"))
}

#[wasm_bindgen(start)]
pub fn main() {
    console_error_panic_hook::set_once();
}

/// Progress lines and bars go to `callback(message, position, length)`.
fn report_to(callback: js_sys::Function) {
    progress::set_sink(move |event| {
        let (message, position, length) = match event {
            progress::Event::Bar {
                message,
                position,
                length,
            } => (message, position as f64, length as f64),
            progress::Event::Note(message) => (message, 0.0, 0.0),
        };
        let _ = callback.call3(
            &JsValue::NULL,
            &message.into(),
            &position.into(),
            &length.into(),
        );
    });
}

#[derive(Serialize)]
struct AdapterInfo {
    adapter: String,
    limits: BTreeMap<&'static str, u64>,
    kernels: Vec<&'static str>,
    edited: Vec<String>,
}

/// Creates the GPU context (compiling the page's edited kernel files, if any) and
/// describes the adapter as JSON. Refuses an adapter whose limits the engine exceeds.
#[wasm_bindgen]
pub async fn start() -> Result<String, JsError> {
    start_inner().await.map_err(js)
}

async fn start_inner() -> Result<String> {
    let edited = session(|s| {
        s.ctx = None;
        s.trained = None;
        s.edited.clone()
    });
    let shaders = shaders_with(&edited)?;
    for name in edited.keys() {
        shaders::validate_file(&shaders, name).map_err(anyhow::Error::msg)?;
    }
    let ctx = GpuContext::create(shaders).await?;
    let l = &ctx.limits;
    let info = AdapterInfo {
        adapter: ctx.adapter_name(),
        limits: BTreeMap::from([
            (
                "maxStorageBuffersPerShaderStage",
                l.max_storage_buffers_per_shader_stage as u64,
            ),
            (
                "maxStorageBufferBindingSize",
                l.max_storage_buffer_binding_size,
            ),
            ("maxBufferSize", l.max_buffer_size),
            (
                "maxComputeWorkgroupStorageSize",
                l.max_compute_workgroup_storage_size as u64,
            ),
            (
                "maxComputeInvocationsPerWorkgroup",
                l.max_compute_invocations_per_workgroup as u64,
            ),
        ]),
        kernels: BUILTIN.iter().map(|(n, _)| *n).collect(),
        edited: edited.keys().cloned().collect(),
    };
    if l.max_storage_buffers_per_shader_stage < STORAGE_BUFFERS_NEEDED {
        bail!(
            "adapter {} allows {} storage buffers per shader stage; the engine's batch \
             kernel binds {STORAGE_BUFFERS_NEEDED}",
            info.adapter,
            l.max_storage_buffers_per_shader_stage
        );
    }
    session(|s| s.ctx = Some(Rc::new(ctx)));
    Ok(serde_json::to_string(&info)?)
}

fn shaders_with(edited: &BTreeMap<String, String>) -> Result<Shaders> {
    edited
        .iter()
        .try_fold(Shaders::builtin(), |sh, (name, src)| {
            sh.with_source(name, src.clone(), &format!("{name}.wgsl (edited)"))
        })
}

fn context() -> Result<Rc<GpuContext>> {
    session(|s| s.ctx.clone()).context("no GPU context yet: call start() first")
}

/// The source of kernel file `name` as the next context compiles it.
#[wasm_bindgen]
pub fn kernel_source(name: &str) -> Result<String, JsError> {
    let edited = session(|s| s.edited.clone());
    let shaders = shaders_with(&edited).map_err(js)?;
    if !BUILTIN.iter().any(|(n, _)| *n == name) {
        return Err(js(anyhow::anyhow!("no kernel file is called {name}")));
    }
    Ok(shaders.get(name).to_string())
}

/// What the engine compiles kernel file `name` with, for the panel.
#[wasm_bindgen]
pub fn kernel_notes(name: &str) -> String {
    NOTES
        .iter()
        .find(|n| n.name == name)
        .map_or(String::new(), |n| {
            format!(
                "launcher {}; prepended: {}; variants: {}; references: {}",
                n.launcher,
                if n.prepended.is_empty() {
                    "none".to_string()
                } else {
                    n.prepended.join(", ")
                },
                if n.variants.is_empty() {
                    "one"
                } else {
                    n.variants
                },
                if n.references.is_empty() {
                    "none"
                } else {
                    n.references
                },
            )
        })
}

/// Checks `source` as kernel file `name` (naga's parse and validation, with the files
/// prepended to it) and, if it passes, keeps it for the next [`start`]; the error
/// names `name.wgsl (edited):line:col`. An unchanged built-in file drops the edit.
#[wasm_bindgen]
pub fn edit_kernel(name: &str, source: String) -> Result<String, JsError> {
    let mut edited = session(|s| s.edited.clone());
    edited.insert(name.to_string(), source);
    let shaders = shaders_with(&edited).map_err(js)?;
    shaders::validate_file(&shaders, name).map_err(|e| JsError::new(&e))?;
    if BUILTIN
        .iter()
        .any(|(n, b)| *n == name && *b == edited[name])
    {
        edited.remove(name);
    }
    let kept = edited.contains_key(name);
    session(|s| s.edited = edited);
    Ok(if kept {
        format!("{name}.wgsl parses and validates; the next run compiles the edit")
    } else {
        format!("{name}.wgsl is the built-in file")
    })
}

#[derive(Serialize)]
struct CheckSummary {
    file: String,
    checks: Vec<&'static str>,
    comparisons: usize,
    failed: Vec<Outcome>,
    seconds: f64,
}

/// Runs the f64-reference checks of kernel file `name` (the ones `cupbearer kernels
/// check --kernel name` runs) on the current context, which compiles the edits kept
/// by the last [`start`]; `progress` sees each check.
#[wasm_bindgen]
pub async fn check_kernel(name: String, progress: js_sys::Function) -> Result<String, JsError> {
    report_to(progress);
    check_inner(&name).await.map_err(js)
}

async fn check_inner(name: &str) -> Result<String> {
    let ctx = context()?;
    let start = Instant::now();
    let selected = checks::select(Some(name))?;
    let mut outcomes = Vec::new();
    let bar = progress::bar(true, selected.len() as u64, &format!("{name}.wgsl checks"));
    for check in &selected {
        outcomes.extend(checks::run_async(&ctx, check).await);
        bar.inc(1);
    }
    Ok(serde_json::to_string(&CheckSummary {
        file: name.to_string(),
        checks: selected.iter().map(|c| c.name).collect(),
        comparisons: outcomes.len(),
        failed: outcomes.into_iter().filter(|o| !o.passed).collect(),
        seconds: start.elapsed().as_secs_f64(),
    })?)
}

/// Loads MNIST from the bytes of its four IDX files (gzip or not), keeping the first
/// `n_train` training and `n_test` test images.
#[wasm_bindgen]
pub fn load_mnist(
    train_images: Vec<u8>,
    train_labels: Vec<u8>,
    test_images: Vec<u8>,
    test_labels: Vec<u8>,
    n_train: usize,
    n_test: usize,
) -> Result<String, JsError> {
    let load = |name, images, labels, n: usize, files: [&str; 2]| -> Result<Dataset> {
        let files = files.map(String::from);
        let mut d = Dataset::from_idx_bytes(name, images, labels, &files)?;
        if n == 0 || n > d.len() {
            bail!("{name}: asked for {n} images, the files hold {}", d.len());
        }
        d.truncate(n);
        Ok(d)
    };
    let train = load(
        "mnist/train",
        train_images,
        train_labels,
        n_train,
        ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"],
    )
    .map_err(js)?;
    let test = load(
        "mnist/test",
        test_images,
        test_labels,
        n_test,
        ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
    )
    .map_err(js)?;
    let summary = format!(
        "{} training and {} test images of {}x{}",
        train.len(),
        test.len(),
        train.height,
        train.width
    );
    session(|s| {
        s.data = Some(Rc::new(Data { train, test }));
        s.trained = None;
    });
    Ok(summary)
}

/// What the page's training form sends.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainRequest {
    backdoor: Backdoor,
    epochs: usize,
    batch_size: usize,
    learning_rate: f32,
    seed: u32,
    hidden: Vec<usize>,
}

#[derive(Serialize)]
struct TrainResponse {
    epochs: Vec<cupbearer::model::train::EpochMetrics>,
    clean_accuracy: f64,
    attack_success_rate: Option<f64>,
    steps: usize,
    train_seconds: f64,
    eval_seconds: f64,
    adapter: String,
    edited_kernels: Vec<String>,
}

/// Trains the classifier on the loaded data with the request's trigger (JSON
/// [`TrainRequest`]), then measures clean accuracy and attack success on the test
/// images; `progress(message, position, length)` sees each step and epoch.
#[wasm_bindgen]
pub async fn train(request: String, progress: js_sys::Function) -> Result<String, JsError> {
    report_to(progress);
    train_inner(&request).await.map_err(js)
}

async fn train_inner(request: &str) -> Result<String> {
    let req: TrainRequest = serde_json::from_str(request).context("training request")?;
    let ctx = context()?;
    let data = session(|s| s.data.clone()).context("no data loaded")?;
    req.backdoor.validate(data.train.num_classes)?;
    let config = MlpConfig {
        input_shape: [data.train.height, data.train.width, data.train.channels],
        conv_channels: Vec::new(),
        hidden_dims: req.hidden.clone(),
        output_dim: data.train.num_classes,
    };
    let model = GpuMlp::upload(&ctx, &Mlp::init(&config, req.seed)?)?;
    let train = GpuDataset::upload(&ctx, &data.train.as_images())?;
    let test = GpuDataset::upload(&ctx, &data.test.as_images())?;
    let all: Vec<u32> = (0..data.train.len() as u32).collect();
    let opts = TrainOptions {
        epochs: req.epochs,
        batch_size: req.batch_size,
        learning_rate: req.learning_rate,
        lr_schedule: Default::default(),
        seed: req.seed,
        max_steps: None,
        backdoor: Some(req.backdoor),
        augment: None,
        progress: true,
    };
    let report = train_on_async(&ctx, &model, &train, &all, &opts).await?;
    let start = Instant::now();
    let test_set = TestSet {
        data: &test,
        labels: &data.test.labels,
    };
    let results = test_results(&ctx, &model, &test_set, Some(&req.backdoor), req.seed, 512).await?;
    let response = TrainResponse {
        clean_accuracy: results.clean.accuracy,
        attack_success_rate: results.attack_success_rate,
        steps: report.steps,
        train_seconds: report.seconds,
        eval_seconds: start.elapsed().as_secs_f64(),
        epochs: report.epochs,
        adapter: ctx.adapter_name(),
        edited_kernels: ctx
            .shaders
            .overrides()
            .into_iter()
            .map(|o| o.kernel)
            .collect(),
    };
    let trained = Trained {
        ctx,
        model,
        backdoor: req.backdoor,
        seed: req.seed,
        train,
        test,
        test_labels: data.test.labels.clone(),
    };
    session(|s| s.trained = Some(Rc::new(trained)));
    Ok(serde_json::to_string(&response)?)
}

/// What the page's detector form sends.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetectRequest {
    /// `mahalanobis`, `que` or `spectral` (the detectors with async paths).
    detector: String,
    /// Trusted clean training images to fit on (the first ones).
    trusted: usize,
}

#[derive(Serialize)]
struct DetectResponse {
    detector: String,
    auc_roc: f64,
    ap: f64,
    fpr_at_95_tpr: f64,
    /// Sample scores: clean test images, then the same images with the trigger.
    clean_scores: Vec<f64>,
    triggered_scores: Vec<f64>,
    roc: Vec<(f64, f64)>,
    fit_seconds: f64,
    score_seconds: f64,
}

/// Fits a detector (JSON [`DetectRequest`]) on clean training images of the trained
/// classifier (`que` and `spectral` also on the poisoned training mix) and scores the
/// clean test images against their triggered copies.
#[wasm_bindgen]
pub async fn detect(request: String, progress: js_sys::Function) -> Result<String, JsError> {
    report_to(progress);
    detect_inner(&request).await.map_err(js)
}

async fn detect_inner(request: &str) -> Result<String> {
    let req: DetectRequest = serde_json::from_str(request).context("detector request")?;
    let t = session(|s| s.trained.clone()).context("train a classifier first")?;
    if req.trusted < 2 || req.trusted > t.train.len {
        bail!(
            "trusted: {} images asked for, the training set holds {}",
            req.trusted,
            t.train.len
        );
    }
    let trusted_idx: Vec<u32> = (0..req.trusted as u32).collect();
    let untrusted_idx: Vec<u32> = (req.trusted as u32..t.train.len as u32).collect();
    let trusted = SampleSet {
        data: &t.train,
        indices: &trusted_idx,
        backdoor: None,
        seed: t.seed,
    };
    let untrusted = [SampleSet {
        data: &t.train,
        indices: if untrusted_idx.len() >= 2 {
            &untrusted_idx
        } else {
            &trusted_idx
        },
        backdoor: Some(t.backdoor),
        seed: t.seed,
    }];
    let data = FitData {
        trusted: Some(&trusted),
        untrusted: &untrusted,
        untrusted_anomalous: &[],
    };
    let test_idx: Vec<u32> = (0..t.test_labels.len() as u32).collect();
    let set = |backdoor| SampleSet {
        data: &t.test,
        indices: &test_idx,
        backdoor,
        seed: t.seed,
    };
    let (clean, triggered) = (set(None), set(Some(t.backdoor.always())));
    let start = Instant::now();
    let sets = [&clean, &triggered];
    let (fit_seconds, [a, b]) = match req.detector.as_str() {
        "mahalanobis" => fit_and_score(MahalanobisConfig::default(), &t, &data, sets).await?,
        "que" => fit_and_score(QueConfig::default(), &t, &data, sets).await?,
        "spectral" => fit_and_score(SpectralConfig::default(), &t, &data, sets).await?,
        other => bail!("detector {other}: the page runs mahalanobis, que and spectral"),
    };
    let score_seconds = start.elapsed().as_secs_f64() - fit_seconds;
    let (clean_scores, triggered_scores) = (a.aggregate(), b.aggregate());
    let scores: Vec<f64> = clean_scores
        .iter()
        .chain(&triggered_scores)
        .copied()
        .collect();
    let labels: Vec<bool> = (0..scores.len()).map(|i| i >= clean_scores.len()).collect();
    let m = detection_metrics(&scores, &labels)?;
    let roc = thin(roc_curve(&scores, &labels)?, 400);
    Ok(serde_json::to_string(&DetectResponse {
        detector: req.detector,
        auc_roc: m.auc_roc,
        ap: m.ap,
        fpr_at_95_tpr: m.fpr_at_95_tpr,
        clean_scores,
        triggered_scores,
        roc,
        fit_seconds,
        score_seconds,
    })?)
}

/// Fits a quadratic detector of `config` on `data` and scores `sets`; also returns
/// the fit's seconds.
async fn fit_and_score<C: QuadraticFit>(
    config: C,
    t: &Trained,
    data: &FitData<'_>,
    sets: [&SampleSet<'_>; 2],
) -> Result<(f64, [LayerScores; 2])> {
    let start = Instant::now();
    let mut det = Quadratic::new(config)?;
    det.fit_async(&t.ctx, &t.model, data, true).await?;
    let fit_seconds = start.elapsed().as_secs_f64();
    let mut scores = Vec::new();
    for set in sets {
        scores.push(det.layer_scores_async(&t.ctx, &t.model, set, 512).await?);
    }
    let scores = scores.try_into().expect("two sets, two scores");
    Ok((fit_seconds, scores))
}

/// At most about `max` points of a curve, keeping its ends (for drawing).
fn thin(points: Vec<(f64, f64)>, max: usize) -> Vec<(f64, f64)> {
    let step = points.len().div_ceil(max).max(1);
    let last = points.len().saturating_sub(1);
    points
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || *i == last)
        .map(|(_, p)| p)
        .collect()
}
