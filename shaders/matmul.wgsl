// C[M,N] = A[M,K] · B[K,N] (+ bias[n]) (then ReLU, or times a ReLU mask), optionally also
// storing Cᵀ. Two schedules share the load/store helpers below:
//  * main_regblock: no workgroup memory and no barriers; each invocation keeps a
//    BM x (4*BN4) block of C in registers. Software adapters (lavapipe) run barriers on
//    the CPU at a high cost, so this is the variant for them.
//  * main_tiled: 16x16 invocations stage TK x 64 tiles of A and B in workgroup memory;
//    each invocation owns a 4x4 block. The variant for real GPUs.
// The layout and epilogue flags are pipeline-overridable constants, so every variant
// compiles to straight-line code. Block sizes (BM, BN4, WG_X, WG_Y) are prepended as
// `const`s by the launcher (function-scope array sizes cannot be overrides).

struct Dims { m: u32, n: u32, k: u32, _pad: u32 }

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read> mask: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;
@group(0) @binding(5) var<storage, read_write> ct: array<f32>;
@group(0) @binding(6) var<uniform> dims: Dims;

// A stored K-major ([K][M], i.e. Aᵀ row-major) instead of row-major [M][K].
override A_KMAJOR: bool = false;
// B stored N-major ([N][K], i.e. Bᵀ row-major) instead of row-major [K][N].
override B_NMAJOR: bool = false;
override BIAS: bool = false;
override RELU: bool = false;
// Multiply by (mask[m][n] > 0): the ReLU backward of the layer whose output is `mask`.
override RELU_MASK: bool = false;
override STORE_T: bool = false;

fn load_a(m: u32, k: u32) -> f32 {
    if (A_KMAJOR) {
        return a[k * dims.m + m];
    }
    return a[m * dims.k + k];
}

fn load_b(k: u32, n: u32) -> f32 {
    if (B_NMAJOR) {
        return b[n * dims.k + k];
    }
    return b[k * dims.n + n];
}

fn store(m: u32, n: u32, acc: f32) {
    if (m >= dims.m || n >= dims.n) {
        return;
    }
    var v = acc;
    if (BIAS) {
        v += bias[n];
    }
    if (RELU) {
        v = max(v, 0.0);
    }
    if (RELU_MASK) {
        v = select(0.0, v, mask[m * dims.n + n] > 0.0);
    }
    c[m * dims.n + n] = v;
    if (STORE_T) {
        ct[n * dims.m + m] = v;
    }
}

@compute @workgroup_size(WG_X, WG_Y, 1)
fn main_regblock(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n0 = gid.x * BN4 * 4u;
    let m0 = gid.y * BM;
    if (n0 >= dims.n || m0 >= dims.m) {
        return;
    }
    // Out-of-range rows/columns read clamped (valid) addresses; store() drops them.
    var rows: array<u32, BM>;
    for (var i = 0u; i < BM; i++) {
        rows[i] = min(m0 + i, dims.m - 1u);
    }
    var cols: array<vec4<u32>, BN4>;
    for (var j = 0u; j < BN4; j++) {
        cols[j] = min(vec4<u32>(n0 + 4u * j) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(dims.n - 1u));
    }
    var acc: array<array<vec4<f32>, BN4>, BM>;
    for (var k = 0u; k < dims.k; k++) {
        var bv: array<vec4<f32>, BN4>;
        for (var j = 0u; j < BN4; j++) {
            let cj = cols[j];
            bv[j] = vec4<f32>(load_b(k, cj.x), load_b(k, cj.y), load_b(k, cj.z), load_b(k, cj.w));
        }
        for (var i = 0u; i < BM; i++) {
            let av = vec4<f32>(load_a(rows[i], k));
            for (var j = 0u; j < BN4; j++) {
                acc[i][j] = fma(av, bv[j], acc[i][j]);
            }
        }
    }
    for (var i = 0u; i < BM; i++) {
        for (var j = 0u; j < BN4; j++) {
            let n = n0 + 4u * j;
            store(m0 + i, n, acc[i][j].x);
            store(m0 + i, n + 1u, acc[i][j].y);
            store(m0 + i, n + 2u, acc[i][j].z);
            store(m0 + i, n + 3u, acc[i][j].w);
        }
    }
}

const TILE: u32 = 64u;
const TK: u32 = 16u;
var<workgroup> tile_a: array<array<f32, TILE>, TK>; // [k][m]
var<workgroup> tile_b: array<array<f32, TILE>, TK>; // [k][n]

@compute @workgroup_size(16, 16, 1)
fn main_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m_base = wid.y * TILE;
    let n_base = wid.x * TILE;
    let tid = lid.y * 16u + lid.x;
    var acc: array<array<f32, 4>, 4>;
    for (var k0 = 0u; k0 < dims.k; k0 += TK) {
        for (var e = 0u; e < 4u; e++) {
            let idx = tid + e * 256u;
            // Neighbouring invocations read neighbouring addresses for either layout.
            var kk = idx / TILE;
            var mm = idx % TILE;
            if (!A_KMAJOR) {
                kk = idx % TK;
                mm = idx / TK;
            }
            let ka = k0 + kk;
            let ma = m_base + mm;
            let va = load_a(min(ma, dims.m - 1u), min(ka, dims.k - 1u));
            tile_a[kk][mm] = select(0.0, va, ka < dims.k && ma < dims.m);
            var kb = idx / TILE;
            var nb = idx % TILE;
            if (B_NMAJOR) {
                kb = idx % TK;
                nb = idx / TK;
            }
            let kg = k0 + kb;
            let ng = n_base + nb;
            let vb = load_b(min(kg, dims.k - 1u), min(ng, dims.n - 1u));
            tile_b[kb][nb] = select(0.0, vb, kg < dims.k && ng < dims.n);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            var bv: array<f32, 4>;
            for (var j = 0u; j < 4u; j++) {
                bv[j] = tile_b[kk][lid.x * 4u + j];
            }
            for (var i = 0u; i < 4u; i++) {
                let av = tile_a[kk][lid.y * 4u + i];
                for (var j = 0u; j < 4u; j++) {
                    acc[i][j] = fma(av, bv[j], acc[i][j]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            store(m_base + lid.y * 4u + i, n_base + lid.x * 4u + j, acc[i][j]);
        }
    }
}
