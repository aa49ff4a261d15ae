//! Kernel throughput on the current adapter: `cargo bench --bench kernels [-- FILTER]`.
//! Prints GFLOP/s per matmul variant and shape (median of repeated single-pass submits).

use std::time::Instant;

use cupbearer::gpu::matmul::{matmul, MatmulArgs, MatmulFlags, Schedule};
use cupbearer::gpu::{GpuContext, Slice};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let ctx = GpuContext::new()?;
    println!("adapter: {}", ctx.adapter_name());
    // (name, m, n, k, a_kmajor, b_nmajor): the MLP's forward, dW and dX shapes.
    let cases = [
        ("fwd 128x784.784x256", 128, 256, 784, true, false),
        ("fwd 128x256.256x256", 128, 256, 256, true, false),
        ("fwdrow 128x784.784x256", 128, 256, 784, false, false),
        ("fwdrow 128x256.256x256", 128, 256, 256, false, false),
        ("dW 784x128.128x256", 784, 256, 128, true, false),
        ("dW 256x128.128x256", 256, 256, 128, true, false),
        ("dX 128x256.(256x256)T", 128, 256, 256, false, true),
        ("512^3", 512, 512, 512, true, false),
        ("1024^3", 1024, 1024, 1024, true, false),
    ];
    let schedules = [Schedule::RegisterBlocked { bm: 32, bn4: 4 }];
    println!(
        "{:<24} {:<36} {:>10} {:>9}",
        "shape", "schedule", "ms", "GFLOP/s"
    );
    for (name, m, n, k, a_kmajor, b_nmajor) in cases {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        // Random contents: never-written buffers may all map the zero page, which flatters.
        let random = |len: usize, seed: u32| -> Vec<f32> {
            (0..len as u32)
                .map(|i| cupbearer::rng::rand_unit(cupbearer::rng::rand_u32(seed, 0, i, 0, 0)))
                .collect()
        };
        let a = ctx.buffer_from("a", &random(m * k, 1))?;
        let b = ctx.buffer_from("b", &random(k * n, 2))?;
        let c = ctx.zeros("c", m * n)?;
        for (schedule, ep) in schedules.iter().flat_map(|s| (0..3).map(move |e| (s, e))) {
            let flags = MatmulFlags {
                a_kmajor,
                b_nmajor,
                bias: ep >= 1,
                relu: ep >= 2,
                ..Default::default()
            };
            let bias = ctx.buffer_from("bias", &random(n, 3))?;
            let op = matmul(
                &ctx,
                flags,
                *schedule,
                &MatmulArgs {
                    m,
                    n,
                    k,
                    a: Slice::whole(&a),
                    b: Slice::whole(&b),
                    c: Slice::whole(&c),
                    bias: flags.bias.then(|| Slice::whole(&bias)),
                    mask: None,
                },
            )?;
            ctx.submit([&op]);
            ctx.wait(None)?;
            let reps = if m * n * k > 100_000_000 { 3 } else { 20 };
            let times: Vec<f64> = (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    ctx.submit([&op]);
                    ctx.wait(None).unwrap();
                    t.elapsed().as_secs_f64()
                })
                .collect();
            let t = median(times);
            let gflops = 2.0 * (m * n * k) as f64 / t / 1e9;
            println!(
                "{name:<24} {:<36} {:>10.3} {:>9.2}",
                format!("{ep} {schedule:?}"),
                t * 1e3,
                gflops
            );
        }
    }
    Ok(())
}
