//! Benchmarks of the engine's kernels (`cupbearer kernels bench`, `cargo bench`): one
//! MNIST training step's dispatches one by one (ms, GFLOP/s where the launcher counts
//! its arithmetic, GB/s of the ranges it binds), the whole MLP and CNN steps as one
//! submit each, a 1024^3 matmul and the covariance statistics. Times are medians of
//! wall-clock submit-and-wait; a dispatch timed alone runs in copies, so its time is
//! its share of a step (which is one submit): its own fixed cost (15-70 us on
//! lavapipe) but not a submit's.

use web_time::Instant;

use anyhow::Result;
use serde::Serialize;

use crate::data::Dataset;
use crate::gpu::adam::set_adam_step;
use crate::gpu::batch::GpuDataset;
use crate::gpu::matmul::{matmul, MatmulArgs, MatmulFlags, Schedule};
use crate::gpu::stats::StreamingCovariance;
use crate::gpu::{Dispatch, GpuContext, Slice, StepParams};
use crate::model::batches::{BatchInputs, BatchPlan};
use crate::model::gpu_mlp::Workspace;
use crate::model::train::StepBuffers;
use crate::model::{GpuMlp, Gradients, Mlp, MlpConfig};

/// Median seconds of `reps` runs of `ops` (one submit each, waited for), after one
/// untimed run (the driver compiles pipelines at first use).
pub fn time_ops(ctx: &GpuContext, ops: &[&Dispatch], reps: usize) -> Result<f64> {
    ctx.submit(ops.iter().copied());
    ctx.wait(None)?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        ctx.submit(ops.iter().copied());
        ctx.wait(None)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Seconds of a dispatch's first run (with the driver's compile, which lavapipe does
/// at a kernel's first use: cold with `MESA_SHADER_CACHE_DISABLE=true`) and the median
/// of later ones.
#[derive(Clone, Copy, Debug)]
pub struct DispatchTime {
    pub first: f64,
    pub steady: f64,
}

/// Times `ops` (one dispatch, or a sequence timed as one): their first run, then the
/// median of `reps` submits that repeat them until each takes about 4 ms (at most 16
/// copies), so submit-and-wait's fixed cost (see [`BenchReport::submit_ms`]) is spread
/// over the copies.
pub fn time_dispatch(ctx: &GpuContext, ops: &[&Dispatch], reps: usize) -> Result<DispatchTime> {
    let t = Instant::now();
    ctx.submit(ops.iter().copied());
    ctx.wait(None)?;
    let first = t.elapsed().as_secs_f64();
    let once = time_ops(ctx, ops, 1)?;
    let copies = ((4e-3 / once).ceil() as usize).clamp(1, 16);
    let repeated: Vec<&Dispatch> = (0..copies).flat_map(|_| ops.iter().copied()).collect();
    let steady = time_ops(ctx, &repeated, reps)? / copies as f64;
    Ok(DispatchTime { first, steady })
}

/// Uniform values in [0, 1) (never-written buffers map the zero page and flatter).
pub fn random(len: usize, seed: u32) -> Vec<f32> {
    use crate::rng::{rand_u32, rand_unit};
    (0..len as u32)
        .map(|i| rand_unit(rand_u32(seed, 0, i, 0, 0)))
        .collect()
}

/// The 0.0.1 pipeline's MLP on MNIST: 784-256-256-10; with `cnn`, the original's CNN
/// (conv 32, conv 64, dense 256 256).
pub fn mnist_model(cnn: bool) -> MlpConfig {
    MlpConfig {
        input_shape: [28, 28, 1],
        conv_channels: if cnn { vec![32, 64] } else { Vec::new() },
        hidden_dims: vec![256, 256],
        output_dim: 10,
    }
}

/// Every dispatch of one training step (batch 128) of `config` on MNIST-shaped
/// synthetic data, as training records it: gather, forward, loss, backward, Adam.
pub fn training_step(ctx: &GpuContext, config: &MlpConfig) -> Result<Vec<Dispatch>> {
    let [h, w, _] = config.input_shape;
    let data = Dataset::synthetic(1024, h, w, 1);
    let gdata = GpuDataset::upload(ctx, &data.as_images())?;
    let model = GpuMlp::upload(ctx, &Mlp::init(config, 0)?)?;
    let buffers = StepBuffers::new(ctx, &model, data.len())?;
    let idx: Vec<u32> = (0..data.len() as u32).collect();
    ctx.queue
        .write_buffer(&buffers.indices, 0, bytemuck::cast_slice(&idx));
    let mut params = StepParams::default();
    set_adam_step(&mut params, 1e-3, 1);
    ctx.queue
        .write_buffer(&buffers.step, 0, bytemuck::bytes_of(&params));
    let inputs = BatchInputs {
        data: &gdata,
        indices: &buffers.indices,
        step: &buffers.step,
        backdoor: None,
        seed: 0,
        augment: None,
    };
    let extra = |ws: &Workspace| buffers.ops(ctx, &model, ws);
    Ok(BatchPlan::new(ctx, &model, &inputs, 128, Gradients::Params, &extra)?.ops)
}

/// One dispatch's time and throughput.
#[derive(Clone, Debug, Serialize)]
pub struct KernelTime {
    pub kernel: String,
    pub file: String,
    pub ms: f64,
    /// The first run: compile (where not cached) and one run.
    pub first_ms: f64,
    /// None where the launcher does not count its arithmetic.
    pub gflops: Option<f64>,
    /// Bytes of the bound ranges over the time: a lower bound of the traffic.
    pub gbps: f64,
}

impl KernelTime {
    fn of(op: &Dispatch, t: DispatchTime) -> Self {
        let seconds = t.steady;
        KernelTime {
            kernel: op.label().to_string(),
            file: op.kernel_file().to_string(),
            ms: seconds * 1e3,
            first_ms: t.first * 1e3,
            gflops: (op.flops() > 0).then(|| op.flops() as f64 / seconds / 1e9),
            gbps: op.bytes() as f64 / seconds / 1e9,
        }
    }
}

/// What `kernels bench` measures on one context.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub adapter: String,
    /// The MLP step's dispatches, each timed alone (in copies: see [`time_dispatch`]).
    pub mlp_step_kernels: Vec<KernelTime>,
    /// An empty submit and its wait: what a step pays once, a kernel timed in one
    /// submit of its own on top of its time.
    pub submit_ms: f64,
    /// The whole MLP step, one submit.
    pub mlp_step_ms: f64,
    pub cnn_step_ms: Option<f64>,
    pub matmul_1024: KernelTime,
    /// Mean and centred Gram of 4096 rows of 256 (one detector statistics batch).
    pub covariance_4096x256: KernelTime,
}

/// Repetitions per timing, and whether to time the (slow on CPUs) CNN step.
#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    pub reps: usize,
    pub cnn: bool,
}

pub fn run(ctx: &GpuContext, opts: BenchOptions) -> Result<BenchReport> {
    let ops = training_step(ctx, &mnist_model(false))?;
    let mut kernels = Vec::with_capacity(ops.len());
    for op in &ops {
        kernels.push(KernelTime::of(op, time_dispatch(ctx, &[op], opts.reps)?));
    }
    let submit_ms = time_ops(ctx, &[], opts.reps)? * 1e3;
    let all: Vec<&Dispatch> = ops.iter().collect();
    let mlp_step_ms = time_ops(ctx, &all, opts.reps)? * 1e3;
    let cnn_step_ms = if opts.cnn {
        let ops = training_step(ctx, &mnist_model(true))?;
        let all: Vec<&Dispatch> = ops.iter().collect();
        Some(time_ops(ctx, &all, opts.reps.min(5))? * 1e3)
    } else {
        None
    };

    let n = 1024;
    let (a, b) = (
        ctx.buffer_from("a", &random(n * n, 1))?,
        ctx.buffer_from("b", &random(n * n, 2))?,
    );
    let c = ctx.zeros("c", n * n)?;
    let args = MatmulArgs {
        m: n,
        n,
        k: n,
        a: Slice::whole(&a),
        b: Slice::whole(&b),
        c: Slice::whole(&c),
        bias: None,
        mask: None,
    };
    let flags = MatmulFlags {
        a_kmajor: true,
        ..Default::default()
    };
    let op = matmul(ctx, flags, Schedule::for_context(ctx), &args)?;
    let matmul_1024 = KernelTime::of(&op, time_dispatch(ctx, &[&op], opts.reps.min(5))?);

    let (rows, d) = (4096, 256);
    let stream = StreamingCovariance::new(ctx, d, rows, 0)?;
    let x = ctx.buffer_from("x", &random(rows * d, 3))?;
    stream.prepare(ctx, 0, rows as u64);
    let ops = stream.record(ctx, Schedule::for_context(ctx), rows, Slice::whole(&x))?;
    let all: Vec<&Dispatch> = ops.iter().collect();
    let timed = time_dispatch(ctx, &all, opts.reps.min(10))?;
    let (t, first_ms) = (timed.steady, timed.first * 1e3);
    // Read twice (mean, centring), the centred copy written once and read twice (Gram).
    let bytes = (rows * d * 4 * 5) as u64;
    let covariance_4096x256 = KernelTime {
        kernel: format!("{} dispatches (mean, center, gram, merges)", ops.len()),
        file: "stats".into(),
        ms: t * 1e3,
        first_ms,
        gflops: Some(2.0 * (rows * d * d) as f64 / t / 1e9),
        gbps: bytes as f64 / t / 1e9,
    };
    Ok(BenchReport {
        adapter: ctx.adapter_name(),
        mlp_step_kernels: kernels,
        submit_ms,
        mlp_step_ms,
        cnn_step_ms,
        matmul_1024,
        covariance_4096x256,
    })
}
