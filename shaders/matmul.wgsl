// C[M,N] = A[M,K] · B[K,N] (+ bias[n]) (then ReLU, or times a ReLU mask). Two schedules share the load/store helpers below:
//  * main_regblock: no workgroup memory and no barriers; each invocation keeps a
//    BM x (4*BN4) block of C in registers. Software adapters (lavapipe) run barriers on
//    the CPU at a high cost, so this is the variant for them.
//  * main_tiled: 16x16 invocations stage TK x 64 tiles of A and B in workgroup memory;
//    each invocation owns a 4x4 block. The variant for real GPUs.
// The layout and epilogue flags are pipeline-overridable constants, so every variant
// compiles to straight-line code.

struct Dims { m: u32, n: u32, k: u32, _pad: u32 }

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read> mask: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;
@group(0) @binding(5) var<uniform> dims: Dims;
// The same A and B seen as vec4s, bound when the register-blocked schedule loads whole
// vec4s (A K-major with M % 4 == 0; B row-major with N % 4 == 0).
@group(0) @binding(6) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read> b4: array<vec4<f32>>;

// A stored K-major ([K][M], i.e. Aᵀ row-major) instead of row-major [M][K].
override A_KMAJOR: bool = false;
// B stored N-major ([N][K], i.e. Bᵀ row-major) instead of row-major [K][N].
override B_NMAJOR: bool = false;
override BIAS: bool = false;
override RELU: bool = false;
// Multiply by (mask[m][n] > 0): the ReLU backward of the layer whose output is `mask`.
override RELU_MASK: bool = false;

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
    var v = acc;
    if (BIAS) {
        v += bias[min(n, dims.n - 1u)];
    }
    if (RELU) {
        v = max(v, 0.0);
    }
    store_masked(m, n, v);
}

// The last step of every epilogue; the register-blocked schedule applies bias and
// ReLU to whole vec4s itself (512 inlined bias loads made its compile take 14 s).
fn store_masked(m: u32, n: u32, acc: f32) {
    if (m >= dims.m || n >= dims.n) {
        return;
    }
    var v = acc;
    if (RELU_MASK) {
        v = select(0.0, v, mask[m * dims.n + n] > 0.0);
    }
    c[m * dims.n + n] = v;
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
