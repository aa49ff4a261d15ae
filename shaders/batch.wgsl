// Builds a float batch in [0, 1] from the u8 data set resident on the GPU, gathering
// the samples listed in `indices`, and injects the backdoor trigger: a per-sample coin
// flip (probability p_backdoor) decides whether the sample is poisoned; a poisoned
// sample gets the trigger and the label `target_class`.
// Needs rng.wgsl and step.wgsl prepended.

struct BatchParams {
    rows: u32,
    sample_dim: u32,
    width: u32,
    channels: u32,
    // 0 = none, 1 = corner pixel, 2 = Gaussian noise.
    kind: u32,
    target_class: u32,
    corner_row: u32,
    corner_col: u32,
    p_backdoor: f32,
    noise_std: f32,
    clip: u32,
    seed: u32,
    // The pixels are split over data0..data3 (each within the storage binding limit).
    samples_per_chunk: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// u8 pixels, 4 per word (or f32), of samples [k·samples_per_chunk, (k+1)·samples_per_chunk)
// in data{k}.
@group(0) @binding(0) var<storage, read> data0: array<u32>;
@group(0) @binding(1) var<storage, read> labels_all: array<u32>;
@group(0) @binding(2) var<storage, read> indices: array<u32>;
@group(0) @binding(3) var<storage, read_write> x: array<f32>;  // [rows][sample_dim]
@group(0) @binding(4) var<storage, read_write> y: array<u32>;
@group(0) @binding(5) var<uniform> params: BatchParams;
@group(0) @binding(6) var<uniform> step: Step;
@group(0) @binding(7) var<storage, read_write> xt: array<f32>; // [sample_dim][rows]
@group(0) @binding(8) var<storage, read> data1: array<u32>;
@group(0) @binding(9) var<storage, read> data2: array<u32>;
@group(0) @binding(10) var<storage, read> data3: array<u32>;

// Also write the transpose: the layout the first matmul reads fastest (K-major).
override WRITE_T: bool = false;
// Pixels stored as f32 bit patterns (computed images) instead of packed u8.
override F32_PIXELS: bool = false;

const KIND_CORNER: u32 = 1u;
const KIND_NOISE: u32 = 2u;

// One workgroup per row (few, large workgroups: cheap on CPU adapters too).
@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wid.x;
    let sample = indices[step.batch_offset + r];
    // Every invocation of a sample draws the same coin: keyed on (epoch, sample).
    let coin = rand_unit(rand_u32(params.seed, STREAM_COIN, step.epoch, sample, 0u));
    let poisoned = params.kind != 0u && coin < params.p_backdoor;
    if (lid.x == 0u) {
        y[r] = select(labels_all[sample], params.target_class, poisoned);
    }
    // Where the sample lives, decoded once per row (not per pixel).
    let chunk = sample / params.samples_per_chunk;
    let base = (sample % params.samples_per_chunk) * params.sample_dim;
    for (var p = lid.x; p < params.sample_dim; p += 64u) {
        let v = pixel(sample, chunk, base + p, p, poisoned);
        x[r * params.sample_dim + p] = v;
        if (WRITE_T) {
            xt[p * params.rows + r] = v;
        }
    }
}

// Pixel p of a sample stored at `index` of data{chunk}.
fn pixel(sample: u32, chunk: u32, index: u32, p: u32, poisoned: bool) -> f32 {
    var v: f32;
    if (F32_PIXELS) {
        v = bitcast<f32>(word(chunk, index));
    } else {
        v = f32((word(chunk, index / 4u) >> (8u * (index % 4u))) & 255u) / 255.0;
    }
    if (poisoned) {
        if (params.kind == KIND_CORNER) {
            let pixel = p / params.channels;
            if (pixel / params.width == params.corner_row && pixel % params.width == params.corner_col) {
                v = 1.0;
            }
        } else if (params.kind == KIND_NOISE) {
            let h1 = rand_u32(params.seed, STREAM_NOISE, step.epoch, sample, 2u * p);
            let h2 = rand_u32(params.seed, STREAM_NOISE, step.epoch, sample, 2u * p + 1u);
            v += params.noise_std * rand_normal(h1, h2);
            if (params.clip != 0u) {
                v = clamp(v, 0.0, 1.0);
            }
        }
    }
    return v;
}

fn word(chunk: u32, i: u32) -> u32 {
    switch chunk {
        case 0u: { return data0[i]; }
        case 1u: { return data1[i]; }
        case 2u: { return data2[i]; }
        default: { return data3[i]; }
    }
}
