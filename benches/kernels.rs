//! Engine benchmarks on the current adapter: `cargo bench --bench kernels [-- FILTER]`.
//! Prints tables and writes `target/bench.json` so runs can be compared:
//! matmul GFLOP/s per variant and shape, the per-kernel breakdown of one training
//! step, training samples/s, covariance accumulation GB/s and detector fit/scoring
//! samples/s. Inputs are random (never-written buffers map the zero page and flatter).

use std::time::Instant;

use cupbearer::checks::bench::{mnist_model, random, time_dispatch, time_ops, training_step};
use cupbearer::data::Dataset;
use cupbearer::detectors::mahalanobis::{Mahalanobis, MahalanobisConfig};
use cupbearer::detectors::{Detector, SampleSet};
use cupbearer::gpu::batch::GpuDataset;
use cupbearer::gpu::matmul::{matmul, MatmulArgs, MatmulFlags, Schedule};
use cupbearer::gpu::{Dispatch, GpuContext, Slice};
use cupbearer::model::train::{train, LrSchedule, TrainOptions};
use cupbearer::model::{GpuMlp, Mlp};
use serde_json::json;

/// Random operands of an m x n x k product and its output buffer.
struct Operands {
    dims: (usize, usize, usize),
    a: wgpu::Buffer,
    b: wgpu::Buffer,
    c: wgpu::Buffer,
}

impl Operands {
    fn new(ctx: &GpuContext, m: usize, n: usize, k: usize) -> anyhow::Result<Self> {
        Ok(Operands {
            dims: (m, n, k),
            a: ctx.buffer_from("a", &random(m * k, 1))?,
            b: ctx.buffer_from("b", &random(k * n, 2))?,
            c: ctx.zeros("c", m * n)?,
        })
    }

    fn dispatch(
        &self,
        ctx: &GpuContext,
        flags: MatmulFlags,
        schedule: Schedule,
    ) -> anyhow::Result<Dispatch> {
        let (m, n, k) = self.dims;
        let args = MatmulArgs {
            m,
            n,
            k,
            a: Slice::whole(&self.a),
            b: Slice::whole(&self.b),
            c: Slice::whole(&self.c),
            bias: None,
            mask: None,
        };
        matmul(ctx, flags, schedule, &args)
    }
}

fn bench_matmul(ctx: &GpuContext, filter: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    // (name, m, n, k, a_kmajor, b_nmajor): the MLP's forward, dW and dX shapes, and the
    // CNN's (batch 128: conv 1 on 28x28x1, conv 2 on 14x14x32) as the step runs them.
    let cases = [
        ("fwd 128x784.784x256", 128, 256, 784, false, false),
        // Layer 1 as the step runs it: the gathered batch's transpose is K-major.
        ("fwd xT 128x784.784x256", 128, 256, 784, true, false),
        ("fwd 128x256.256x256", 128, 256, 256, false, false),
        ("dW 784x128.128x256", 784, 256, 128, true, false),
        ("dW 256x128.128x256", 256, 256, 128, true, false),
        ("dX 128x256.(256x256)T", 128, 256, 256, false, true),
        ("out fwd 128x256.256x10", 128, 10, 256, false, false),
        ("out dW 256x128.128x10", 256, 10, 128, true, false),
        ("conv1 fwd 100352x9.9x32", 100352, 32, 9, true, false),
        ("conv2 fwd 25088x288.288x64", 25088, 64, 288, true, false),
        ("conv2 dW 288x25088.25088x64", 288, 64, 25088, true, false),
        ("conv2 dcols 25088x64.(288x64)T", 25088, 288, 64, true, true),
        ("conv1 dW 9x100352.100352x32", 9, 32, 100352, true, false),
        // The CNN abstraction's conv-block step (8 -> 16 channels on 14x14): dW.
        ("abs dW 72x25088.25088x16", 72, 16, 25088, true, false),
        ("512^3", 512, 512, 512, true, false),
        ("1024^3", 1024, 1024, 1024, true, false),
    ];
    // Also the other register-blocked shapes: 4x4 blocks keep more lanes busy on
    // skinny products; 32x16 halves the B loads per FLOP.
    let mut schedules = vec![Schedule::for_context(ctx)];
    if !ctx.is_cpu() {
        schedules.push(Schedule::RegisterBlocked { bm: 16, bn4: 4 });
    }
    schedules.push(Schedule::RegisterBlocked { bm: 32, bn4: 4 });
    schedules.push(Schedule::RegisterBlocked { bm: 4, bn4: 1 });
    let mut rows = Vec::new();
    println!(
        "\n{:<24} {:<36} {:>9} {:>9}",
        "matmul", "schedule", "ms", "GFLOP/s"
    );
    for (name, m, n, k, a_kmajor, b_nmajor) in cases {
        if !name.contains(filter) {
            continue;
        }
        let operands = Operands::new(ctx, m, n, k)?;
        for &schedule in &schedules {
            let flags = MatmulFlags {
                a_kmajor,
                b_nmajor,
                ..Default::default()
            };
            // The first dispatch of a new pipeline includes the driver's shader compile
            // (lavapipe JIT-compiles at first use; Mesa caches it on disk afterwards).
            let first = Instant::now();
            let op = operands.dispatch(ctx, flags, schedule)?;
            ctx.submit([&op]);
            ctx.wait(None)?;
            let first_ms = first.elapsed().as_secs_f64() * 1e3;
            let reps = if m * n * k > 100_000_000 { 5 } else { 30 };
            let t = time_ops(ctx, &[&op], reps)?;
            let gflops = 2.0 * (m * n * k) as f64 / t / 1e9;
            let s = format!("{schedule:?}");
            println!(
                "{name:<24} {s:<36} {:>9.3} {gflops:>9.2} {first_ms:>10.1}",
                t * 1e3
            );
            rows.push(json!({"shape": name, "schedule": s, "ms": t * 1e3, "gflops": gflops, "first_dispatch_ms": first_ms}));
        }
    }
    Ok(rows)
}

/// Whether a second device adds throughput (issue: lavapipe might run one queue on one
/// core): `reps` MLP-layer matmuls on this device, then the same work split over this
/// device and a second one, each driven from its own thread. Returns the JSON row.
fn bench_two_devices(ctx: &GpuContext) -> anyhow::Result<serde_json::Value> {
    let (m, n, k, reps) = (512, 256, 784, 40);
    let work = |ctx: &GpuContext, reps: usize| -> anyhow::Result<()> {
        let operands = Operands::new(ctx, m, n, k)?;
        let op = operands.dispatch(ctx, MatmulFlags::default(), Schedule::for_context(ctx))?;
        for _ in 0..reps {
            ctx.submit([&op]);
        }
        ctx.wait(None)
    };
    work(ctx, 1)?;
    let second = GpuContext::new()?;
    work(&second, 1)?;
    let t = Instant::now();
    work(ctx, reps)?;
    let one = t.elapsed().as_secs_f64();
    let t = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let other = s.spawn(|| work(&second, reps / 2));
        work(ctx, reps - reps / 2)?;
        other.join().expect("second device thread panicked")
    })?;
    let two = t.elapsed().as_secs_f64();
    let gflop = 2.0 * (m * n * k * reps) as f64 / 1e9;
    println!(
        "\n{:<40} {:>12}",
        "one vs two devices (same work)", "GFLOP/s"
    );
    println!("{:<40} {:>12.2}", "one device", gflop / one);
    println!(
        "{:<40} {:>12.2}",
        "two devices, one thread each",
        gflop / two
    );
    Ok(json!({"one_device_gflops": gflop / one, "two_devices_gflops": gflop / two}))
}

/// Per-kernel milliseconds of one training step (batch 128) of an MNIST model, each
/// kernel's share of a step (timed in copies, without a submit's fixed cost).
fn bench_step(ctx: &GpuContext, name: &str, cnn: bool) -> anyhow::Result<serde_json::Value> {
    let ops = training_step(ctx, &mnist_model(cnn))?;
    println!(
        "\n{:<70} {:>9}",
        format!("{name} training step (batch 128), per kernel"),
        "ms"
    );
    let mut kernels = Vec::new();
    for op in &ops {
        let t = time_dispatch(ctx, &[op], 20)?.steady;
        let name: String = op.label().chars().take(70).collect();
        println!("{name:<70} {:>9.3}", t * 1e3);
        kernels.push(json!({"kernel": op.label(), "ms": t * 1e3}));
    }
    let all: Vec<&Dispatch> = ops.iter().collect();
    let whole = time_ops(ctx, &all, 20)?;
    let submit = time_ops(ctx, &[], 20)?;
    println!("{:<70} {:>9.3}", "whole step, one submit", whole * 1e3);
    println!(
        "{:<70} {:>9.3}",
        "an empty submit and its wait",
        submit * 1e3
    );
    Ok(json!({"kernels": kernels, "step_ms": whole * 1e3, "submit_ms": submit * 1e3}))
}

fn main() -> anyhow::Result<()> {
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let ctx = GpuContext::new()?;
    let adapter = ctx.adapter_name();
    println!("adapter: {adapter}");
    let matmuls = bench_matmul(&ctx, &filter)?;
    let step = bench_step(&ctx, "MLP", false)?;
    let cnn_step = bench_step(&ctx, "CNN", true)?;
    let devices = bench_two_devices(&ctx)?;

    // End to end: training, detector fit and scoring on MNIST-shaped synthetic data.
    let n = 20_000;
    let data = Dataset::synthetic(n, 28, 28, 7);
    let gdata = GpuDataset::upload(&ctx, &data.as_images())?;
    let model = GpuMlp::upload(&ctx, &Mlp::init(&mnist_model(false), 0)?)?;
    let opts = TrainOptions {
        epochs: 1,
        batch_size: 128,
        learning_rate: 1e-3,
        lr_schedule: LrSchedule::Constant,
        seed: 0,
        max_steps: None,
        backdoor: None,
        progress: false,
        augment: None,
    };
    let report = train(&ctx, &model, &gdata, &opts)?;
    let idx: Vec<u32> = (0..n as u32).collect();
    let set = SampleSet {
        data: &gdata,
        indices: &idx,
        backdoor: None,
        seed: 0,
    };
    let mut det = Mahalanobis::new(MahalanobisConfig::default())?;
    let t = Instant::now();
    det.fit(&ctx, &model, &set, false)?;
    let fit = t.elapsed().as_secs_f64();
    let t = Instant::now();
    det.layer_scores(&ctx, &model, &set, 4096)?;
    let score = t.elapsed().as_secs_f64();
    // Covariance accumulation reads each activation twice (mean, centring) and the
    // centred copy twice (Gram): bytes per fitted sample = 2 layers x 256 x 4 x 4.
    let cov_gb = (n * 2 * 256 * 4 * 4) as f64 / 1e9;
    println!("\n{:<40} {:>12}", "end to end (20 000 samples)", "value");
    println!(
        "{:<40} {:>12.0}",
        "training samples/s", report.samples_per_second
    );
    println!(
        "{:<40} {:>12.0}",
        "detector fit samples/s (incl. forward)",
        n as f64 / fit
    );
    println!(
        "{:<40} {:>12.2}",
        "covariance accumulation GB/s (lower bound)",
        cov_gb / fit
    );
    println!(
        "{:<40} {:>12.0}",
        "detector scoring samples/s",
        n as f64 / score
    );

    let out = json!({
        "adapter": adapter,
        "matmul": matmuls,
        "training_step": step,
        "cnn_training_step": cnn_step,
        "devices": devices,
        "training_samples_per_second": report.samples_per_second,
        "detector_fit_samples_per_second": n as f64 / fit,
        "covariance_gb_per_second": cov_gb / fit,
        "detector_score_samples_per_second": n as f64 / score,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bench.json"), serde_json::to_string_pretty(&out)?)?;
    println!("\nwrote {}", dir.join("bench.json").display());
    Ok(())
}
