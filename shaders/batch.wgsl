// Builds a float batch in [0, 1] from the u8 data set resident on the GPU, gathering
// the samples listed in `indices`, optionally augments it (crop, rotation, flip: each
// output pixel reads the source pixel the augmentation maps it to, or 0), and injects
// the backdoor trigger into the augmented image: a per-sample coin flip decides whether
// the sample is poisoned (coin in [p_noise, p_noise + p_backdoor)); a poisoned sample
// gets the trigger and the label `target_class`.
// Needs rng.wgsl and step.wgsl prepended.

struct BatchParams {
    rows: u32,
    sample_dim: u32,
    width: u32,
    channels: u32,
    target_class: u32,
    corner_row: u32,
    corner_col: u32,
    p_backdoor: f32,
    noise_std: f32,
    clip: u32,
    seed: u32,
    // The pixels are split over data0..data3 (each within the storage binding limit).
    samples_per_chunk: u32,
    height: u32,
    // WaNet: the k x k control grid of (x, y) displacements, grid[c][i][j] packed 4 per
    // vec4; coins below p_noise warp with random jitter too and keep their label.
    grid_width: u32,
    rescale: f32,
    p_noise: f32,
    // Augmentation (when AUGMENT): the probabilities of a crop of the image padded by
    // `padding`, of a rotation by up to ±max_angle radians, and of a horizontal flip.
    crop_p: f32,
    padding: u32,
    rotation_p: f32,
    max_angle: f32,
    flip_p: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    grid: array<vec4<f32>, 32>,
}

// One sample's augmentation draws.
struct Aug {
    on: bool,
    crop: bool,
    // Crop offsets into the padded image, in [0, 2·padding].
    top: i32,
    left: i32,
    rotate: bool,
    cos_a: f32,
    sin_a: f32,
    flip: bool,
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
// The trigger (0 = none, KIND_* below) and whether to augment are pipeline constants:
// llvmpipe runs a data-dependent branch's code even when no lane takes it, so a uniform
// switch here cost 6x (5.1 ms against 0.8 ms per MNIST batch).
override KIND: u32 = 0u;
override AUGMENT: bool = false;
// How many of data0..data3 hold samples: with one, loads skip the switch over them.
override CHUNKS: u32 = 4u;
// Read packed u8 pixels a word (4 pixels) per load: set when nothing moves pixels (no
// augmentation, no warp) and every sample starts on a word (sample_dim % 4 == 0).
override QUADS: bool = false;

const KIND_CORNER: u32 = 1u;
const KIND_NOISE: u32 = 2u;
const KIND_WARP: u32 = 3u;

// One workgroup per row (few, large workgroups: cheap on CPU adapters too).
@compute @workgroup_size(64, 1, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wid.x;
    let sample = indices[step.batch_offset + r];
    // Every invocation of a sample draws the same coin: keyed on (epoch, sample).
    let coin = rand_unit(rand_u32(params.seed, STREAM_COIN, step.epoch, sample, 0u));
    let noised = KIND == KIND_WARP && coin < params.p_noise;
    let poisoned = KIND != 0u && coin >= params.p_noise
        && coin < params.p_noise + params.p_backdoor;
    if (lid.x == 0u) {
        y[r] = select(labels_all[sample], params.target_class, poisoned);
    }
    // Where the sample lives, decoded once per row (not per pixel).
    let chunk = sample / params.samples_per_chunk;
    let base = (sample % params.samples_per_chunk) * params.sample_dim;
    if (QUADS) {
        for (var q = lid.x; q < params.sample_dim / 4u; q += 64u) {
            let w = word(chunk, base / 4u + q);
            for (var i = 0u; i < 4u; i++) {
                let p = 4u * q + i;
                let v = triggered(sample, p, f32((w >> (8u * i)) & 255u) / 255.0, poisoned);
                put(r, p, v);
            }
        }
        return;
    }
    let aug = draw_aug(sample);
    for (var p = lid.x; p < params.sample_dim; p += 64u) {
        var v: f32;
        if (KIND == KIND_WARP && (poisoned || noised)) {
            v = warped(sample, chunk, base, p, noised, aug);
        } else {
            v = pixel(sample, chunk, base, p, poisoned, aug);
        }
        put(r, p, v);
    }
}

fn put(r: u32, p: u32, v: f32) {
    x[r * params.sample_dim + p] = v;
    if (WRITE_T) {
        xt[p * params.rows + r] = v;
    }
}

// The value stored at `index` of data{chunk}, in [0, 1].
fn load(chunk: u32, index: u32) -> f32 {
    if (F32_PIXELS) {
        return bitcast<f32>(word(chunk, index));
    }
    return f32((word(chunk, index / 4u) >> (8u * (index % 4u))) & 255u) / 255.0;
}

fn aug_unit(sample: u32, k: u32) -> f32 {
    return rand_unit(rand_u32(params.seed, STREAM_AUGMENT, step.epoch, sample, k));
}

fn draw_aug(sample: u32) -> Aug {
    var a: Aug;
    a.on = AUGMENT;
    if (!a.on) {
        return a;
    }
    let span = 2u * params.padding + 1u;
    a.crop = aug_unit(sample, 0u) < params.crop_p;
    a.top = i32(min(u32(aug_unit(sample, 1u) * f32(span)), span - 1u));
    a.left = i32(min(u32(aug_unit(sample, 2u) * f32(span)), span - 1u));
    a.rotate = aug_unit(sample, 3u) < params.rotation_p;
    let angle = (2.0 * aug_unit(sample, 4u) - 1.0) * params.max_angle;
    a.cos_a = cos(angle);
    a.sin_a = sin(angle);
    a.flip = aug_unit(sample, 5u) < params.flip_p;
    return a;
}

// Value (x, y, channel c) of the augmented image of the sample at `base` of data{chunk}:
// the source pixel that the flip, then the rotation (counter-clockwise by the angle,
// nearest neighbour), then the crop map it to, or 0 where that falls outside.
fn aug_load(chunk: u32, base: u32, aug: Aug, x_in: u32, y_in: u32, c: u32) -> f32 {
    let w = i32(params.width);
    let h = i32(params.height);
    var x = i32(x_in);
    var y = i32(y_in);
    if (aug.on) {
        if (aug.flip) {
            x = w - 1 - x;
        }
        if (aug.rotate) {
            let cx = 0.5 * f32(w - 1);
            let cy = 0.5 * f32(h - 1);
            let dx = f32(x) - cx;
            let dy = f32(y) - cy;
            x = i32(round(aug.cos_a * dx - aug.sin_a * dy + cx));
            y = i32(round(aug.sin_a * dx + aug.cos_a * dy + cy));
        }
        if (aug.crop) {
            x += aug.left - i32(params.padding);
            y += aug.top - i32(params.padding);
        }
        if (x < 0 || y < 0 || x >= w || y >= h) {
            return 0.0;
        }
    }
    return load(chunk, base + (u32(y) * params.width + u32(x)) * params.channels + c);
}

// Value p of the (augmented) sample at `base` of data{chunk}, with its trigger.
fn pixel(sample: u32, chunk: u32, base: u32, p: u32, poisoned: bool, aug: Aug) -> f32 {
    if (aug.on) {
        let pix = p / params.channels;
        return triggered(sample, p, aug_load(chunk, base, aug, pix % params.width, pix / params.width, p % params.channels), poisoned);
    }
    return triggered(sample, p, load(chunk, base + p), poisoned);
}

// `value` of pixel p of `sample`, with the (corner or noise) trigger if poisoned.
fn triggered(sample: u32, p: u32, value: f32, poisoned: bool) -> f32 {
    var v = value;
    if (poisoned) {
        if (KIND == KIND_CORNER) {
            let pixel = p / params.channels;
            if (pixel / params.width == params.corner_row && pixel % params.width == params.corner_col) {
                v = 1.0;
            }
        } else if (KIND == KIND_NOISE) {
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
    if (CHUNKS == 1u) {
        return data0[i];
    }
    switch chunk {
        case 0u: { return data0[i]; }
        case 1u: { return data1[i]; }
        case 2u: { return data2[i]; }
        default: { return data3[i]; }
    }
}

fn grid_value(c: u32, i: u32, j: u32) -> f32 {
    let idx = (c * params.grid_width + i) * params.grid_width + j;
    return params.grid[idx / 4u][idx % 4u];
}

// Torch's bicubic convolution weights (A = -0.75) of the 4 taps around fraction t.
fn cubic_weights(t: f32) -> vec4<f32> {
    let a = -0.75;
    let x = vec4<f32>(t + 1.0, t, 1.0 - t, 2.0 - t);
    let near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    let far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
    return vec4<f32>(far.x, near.y, near.z, far.w);
}

// Position i of n on the control grid (align corners), and in [-1, 1].
fn along(i: u32, n: u32) -> f32 {
    return select(0.0, f32(i) * f32(params.grid_width - 1u) / f32(n - 1u), n > 1u);
}

fn normalised(i: u32, n: u32) -> f32 {
    return select(0.0, 2.0 * f32(i) / f32(n - 1u) - 1.0, n > 1u);
}

// Where pixel `pix` samples from, in pixel coordinates (x, y): the identity plus the
// bicubically upsampled field, rescaled and clipped to the image, plus the noise
// mode's jitter.
fn warp_position(pix: u32, sample: u32, noised: bool) -> vec2<f32> {
    let size = vec2<u32>(params.width, params.height);
    let at = vec2<u32>(pix % params.width, pix / params.width);
    let uv = vec2<f32>(along(at.x, size.x), along(at.y, size.y));
    let wu = cubic_weights(uv.x - floor(uv.x));
    let wv = cubic_weights(uv.y - floor(uv.y));
    let last = i32(params.grid_width) - 1;
    var field = vec2<f32>(0.0);
    for (var a = 0; a < 4; a++) {
        let ti = u32(clamp(i32(floor(uv.y)) + a - 1, 0, last));
        for (var b = 0; b < 4; b++) {
            let tj = u32(clamp(i32(floor(uv.x)) + b - 1, 0, last));
            field += wv[a] * wu[b] * vec2<f32>(grid_value(0u, ti, tj), grid_value(1u, ti, tj));
        }
    }
    let sizef = vec2<f32>(size);
    let identity = vec2<f32>(normalised(at.x, size.x), normalised(at.y, size.y));
    var g = clamp((identity + field / sizef) * params.rescale, vec2<f32>(-1.0), vec2<f32>(1.0));
    if (noised) {
        let jx = 2.0 * rand_unit(rand_u32(params.seed, STREAM_NOISE, step.epoch, sample, 2u * pix)) - 1.0;
        let jy = 2.0 * rand_unit(rand_u32(params.seed, STREAM_NOISE, step.epoch, sample, 2u * pix + 1u)) - 1.0;
        g = clamp(g + params.rescale * vec2<f32>(jx, jy) / sizef, vec2<f32>(-1.0), vec2<f32>(1.0));
    }
    return (g + 1.0) / 2.0 * vec2<f32>(max(size, vec2<u32>(1u)) - 1u);
}

// Value p (pixel p / channels, channel p % channels) of the (augmented) sample at
// `base` of data{chunk}, bilinearly resampled at its WaNet position.
fn warped(sample: u32, chunk: u32, base: u32, p: u32, noised: bool, aug: Aug) -> f32 {
    let c = p % params.channels;
    let pos = warp_position(p / params.channels, sample, noised);
    let lo = floor(pos);
    let f = pos - lo;
    let x0 = min(u32(lo.x), params.width - 1u);
    let y0 = min(u32(lo.y), params.height - 1u);
    let x1 = min(x0 + 1u, params.width - 1u);
    let y1 = min(y0 + 1u, params.height - 1u);
    let v00 = aug_load(chunk, base, aug, x0, y0, c);
    let v01 = aug_load(chunk, base, aug, x1, y0, c);
    let v10 = aug_load(chunk, base, aug, x0, y1, c);
    let v11 = aug_load(chunk, base, aug, x1, y1, c);
    return (1.0 - f.y) * ((1.0 - f.x) * v00 + f.x * v01) + f.y * ((1.0 - f.x) * v10 + f.x * v11);
}
