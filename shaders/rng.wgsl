// Counter-based RNG shared by the kernels that draw random numbers (mirrored on the
// host in src/rng.rs): every draw is a pure function of (seed, stream, a, b, c), so
// results do not depend on the dispatch layout or on the order of work.

fn hash_u32(x_in: u32) -> u32 {
    // "lowbias32" integer hash (C. Wellons).
    var x = x_in;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

fn rand_u32(seed: u32, stream: u32, a: u32, b: u32, c: u32) -> u32 {
    var h = hash_u32(seed ^ (stream * 0x9e3779b9u));
    h = hash_u32(h ^ a);
    h = hash_u32(h ^ b);
    return hash_u32(h ^ c);
}

// Uniform in [0, 1) with 24 random bits.
fn rand_unit(h: u32) -> f32 {
    return f32(h >> 8u) * (1.0 / 16777216.0);
}

// Standard normal by Box-Muller from two independent draws.
fn rand_normal(h1: u32, h2: u32) -> f32 {
    let u1 = (f32(h1 >> 8u) + 1.0) * (1.0 / 16777216.0);
    let u2 = rand_unit(h2);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

const STREAM_COIN: u32 = 1u;
const STREAM_NOISE: u32 = 2u;
// 3 and 4 are host-only (shuffle, init): see src/rng.rs.
const STREAM_ATTACK_START: u32 = 5u;
// 6 is host-only (the WaNet grid).
const STREAM_VAE: u32 = 7u;
const STREAM_AUGMENT: u32 = 8u;
