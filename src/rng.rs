//! Host mirror of `shaders/rng.wgsl`: a counter-based RNG, so every random draw (init,
//! shuffling, coin flips, noise) is a pure function of (seed, stream, counters).

pub fn hash_u32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846ca68b);
    x ^= x >> 16;
    x
}

pub fn rand_u32(seed: u32, stream: u32, a: u32, b: u32, c: u32) -> u32 {
    let mut h = hash_u32(seed ^ stream.wrapping_mul(0x9e3779b9));
    h = hash_u32(h ^ a);
    h = hash_u32(h ^ b);
    hash_u32(h ^ c)
}

/// Uniform in [0, 1) with 24 random bits (bit-identical to the shader's `rand_unit`).
pub fn rand_unit(h: u32) -> f32 {
    (h >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Standard normal by Box-Muller (f64 here; the shader computes the same in f32).
pub fn rand_normal(h1: u32, h2: u32) -> f64 {
    let u1 = ((h1 >> 8) as f64 + 1.0) / 16_777_216.0;
    let u2 = (h2 >> 8) as f64 / 16_777_216.0;
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Streams keep independent uses of one seed apart.
pub const STREAM_COIN: u32 = 1;
pub const STREAM_NOISE: u32 = 2;
pub const STREAM_SHUFFLE: u32 = 3;
pub const STREAM_INIT: u32 = 4;
pub const STREAM_ATTACK_START: u32 = 5;
/// The WaNet control grid (drawn on the host only).
pub const STREAM_WANET_GRID: u32 = 6;
/// The VAE detector's latent noise.
pub const STREAM_VAE: u32 = 7;
/// Training augmentations (crop offsets, rotation angle, flip and their coins).
pub const STREAM_AUGMENT: u32 = 8;

/// Fisher-Yates permutation of 0..n for (seed, epoch).
pub fn shuffled_indices(n: usize, seed: u32, epoch: u32) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let h = rand_u32(seed, STREAM_SHUFFLE, epoch, i as u32, 0);
        // Multiply-shift maps the hash onto 0..=i without modulo bias worth noting.
        let j = ((h as u64 * (i as u64 + 1)) >> 32) as usize;
        idx.swap(i, j);
    }
    idx
}
