//! Launcher and CPU reference for `shaders/matmul.wgsl`.

use std::sync::Arc;

use anyhow::{bail, Result};

use super::context::{Binding, Dispatch, GpuContext, Kernel, KernelSpec, Slice};

const BINDINGS: [Binding; 10] = [
    Binding::ReadOnly,  // a
    Binding::ReadOnly,  // b
    Binding::ReadOnly,  // bias
    Binding::ReadOnly,  // mask
    Binding::ReadWrite, // c
    Binding::Uniform,   // dims
    Binding::ReadOnly,  // a as vec4
    Binding::ReadOnly,  // b as vec4
    Binding::ReadWrite, // c as vec4 (then c itself is not bound)
    Binding::ReadOnly,  // mask as vec4
];

/// Operand layouts and the fused epilogue, i.e. which pipeline variant runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MatmulFlags {
    /// A is stored K-major: `a[k*M + m]` (the layout the register-blocked kernel likes).
    pub a_kmajor: bool,
    /// B is stored N-major: `b[n*K + k]`.
    pub b_nmajor: bool,
    pub bias: bool,
    pub relu: bool,
    /// Multiply each output by `mask[m][n] > 0` (ReLU backward).
    pub relu_mask: bool,
    /// Skip the k steps where the invocation's whole block of A is zero (sparse inputs;
    /// the check is uniform across a SIMD row on lavapipe). Exact unless B holds NaN or
    /// infinity, whose products with zero are then not formed.
    pub skip_zero_a: bool,
}

/// Which schedule runs; [`Schedule::for_context`] picks by adapter type.
impl std::fmt::Display for MatmulFlags {
    /// The set flags joined by `+` (`row-major` when none is set).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let named = [
            (self.a_kmajor, "a_kmajor"),
            (self.b_nmajor, "b_nmajor"),
            (self.bias, "bias"),
            (self.relu, "relu"),
            (self.relu_mask, "relu_mask"),
            (self.skip_zero_a, "skip_zero_a"),
        ];
        let set: Vec<&str> = named
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| *n)
            .collect();
        if set.is_empty() {
            f.write_str("row-major")
        } else {
            f.write_str(&set.join("+"))
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Barrier-free register blocking: `bm` rows x `4*bn4` columns per invocation.
    RegisterBlocked { bm: u32, bn4: u32 },
    /// 64x64 tiles staged in workgroup memory.
    Tiled,
}

impl Schedule {
    /// 16x16 blocks: as fast as 32x16 on lavapipe within its noise with plain loads, and
    /// a third of the driver's compile time (paid at each cold start). [`matmul`] runs
    /// products with shared A loads in 32x8 blocks, where they pay.
    pub fn for_context(ctx: &GpuContext) -> Self {
        if ctx.is_cpu() {
            Schedule::RegisterBlocked { bm: 16, bn4: 4 }
        } else {
            Schedule::Tiled
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Dims {
    m: u32,
    n: u32,
    k: u32,
    _pad: u32,
}

/// The operands of one multiply. `c` is M x N row-major.
pub struct MatmulArgs<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Slice<'a>,
    pub b: Slice<'a>,
    pub c: Slice<'a>,
    pub bias: Option<Slice<'a>>,
    pub mask: Option<Slice<'a>>,
}

/// Whether the register-blocked schedule reads A and B and writes C (and reads the
/// mask) as whole vec4s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct VecLoads {
    a: bool,
    b: bool,
    c: bool,
    /// A's vec4s are loaded once per SIMD row, one per lane, and handed round with
    /// `subgroupBroadcast`: the 8 lanes of a row need the same A, and lavapipe turns
    /// every storage load into a loop over the lanes. Needs subgroups of exactly 8 lanes
    /// (one workgroup) and, with whole-vec4 (K-major) A, `bm` dividing 32; a row-major
    /// A is read as vec4s along k (K % 4 == 0: 4 k steps per load), `bm` a multiple
    /// of 8.
    shared_a: bool,
    /// An N-major B is read as vec4s along k (K % 4 == 0): one load per column per 4 k
    /// steps instead of one per step. With shared A loads only (their loops step k by
    /// 4), and `bm` at least 8 where A is K-major.
    b_kvec: bool,
}

/// Whether `matmul` shares the loads of a row-major A with `k` columns (bound at a
/// 16-byte offset) on this context: where that holds, a row-major A is as fast as a
/// K-major one, and a caller holding both layouts need not write the K-major one.
pub fn shares_row_major_a(ctx: &GpuContext, k: usize) -> bool {
    ctx.subgroup_size == Some(SHARED_A_LANES) && k.is_multiple_of(4)
}

/// Whether shared A loads of a `bm`-row block step k by at most 4 (K-major A, `kmajor`:
/// 32 / bm steps a load), so that B can be read 4 k steps a load.
fn can_read_b_along_k(bm: u32, kmajor: bool) -> bool {
    !kmajor || bm >= 8
}

/// The subgroup size shared A loads are generated for: lavapipe's on 256-bit SIMD.
const SHARED_A_LANES: u32 = 8;

/// Whether a block of `bm` rows can share its A loads: one round of loads covers a whole
/// number of k steps (K-major A, `kmajor`), or a whole number of rows per lane.
fn can_share_a(bm: u32, kmajor: bool) -> bool {
    if kmajor {
        (4 * SHARED_A_LANES).is_multiple_of(bm)
    } else {
        bm.is_multiple_of(SHARED_A_LANES)
    }
}

fn kernel(
    ctx: &GpuContext,
    flags: MatmulFlags,
    schedule: Schedule,
    vec: VecLoads,
) -> Result<Arc<Kernel>> {
    // The register-blocked schedule's entry point is generated after the file.
    let (generated, entry) = match schedule {
        Schedule::RegisterBlocked { bm, bn4 } => (
            Some(format!("\n{}", register_blocked(bm, bn4, vec, flags))),
            "main_regblock",
        ),
        Schedule::Tiled => (None, "main_tiled"),
    };
    let f = flags;
    let constants = [
        ("A_KMAJOR", f.a_kmajor as u8 as f64),
        ("B_NMAJOR", f.b_nmajor as u8 as f64),
        ("BIAS", f.bias as u8 as f64),
        ("RELU", f.relu as u8 as f64),
        ("RELU_MASK", f.relu_mask as u8 as f64),
    ];
    ctx.kernel(&KernelSpec {
        key: format!("matmul_{schedule:?}_{flags:?}_{vec:?}"),
        parts: &["matmul"],
        generated: generated.as_deref(),
        entry,
        bindings: &BINDINGS,
        constants: &constants,
    })
}

const XYZW: [&str; 4] = ["x", "y", "z", "w"];

/// WGSL of the register-blocked schedule for a `bm` x `4*bn4` block per invocation.
/// Generated rather than looped over arrays: lavapipe keeps arrays indexed in loops in
/// scratch memory, but named values in registers.
fn register_blocked(bm: u32, bn4: u32, vec: VecLoads, flags: MatmulFlags) -> String {
    use std::fmt::Write;
    let (rows, cols) = (0..bm, 0..bn4);
    let mut w = String::new();
    // With shared A loads every lane of the row block (one workgroup) must reach the
    // broadcasts, so a lane past the last column runs on clamped columns unstored.
    let (lane, done) = if vec.shared_a {
        (
            ", @builtin(subgroup_invocation_id) lane: u32",
            "m0 >= dims.m",
        )
    } else {
        ("", "n0 >= dims.n || m0 >= dims.m")
    };
    let _ = writeln!(
        w,
        "@compute @workgroup_size(8, 1, 1)\n\
         fn main_regblock(@builtin(global_invocation_id) gid: vec3<u32>{lane}) {{\n\
         let n0 = gid.x * {}u;\nlet m0 = gid.y * {bm}u;\n\
         if ({done}) {{ return; }}\n\
         // Out-of-range rows and columns read clamped addresses.\n\
         let last_m = dims.m - 1u;\nlet last_n = vec4<u32>(dims.n - 1u);\n\
         let last_m4 = dims.m / 4u - 1u;\nlet last_n4 = dims.n / 4u - 1u;",
        4 * bn4
    );
    for i in rows.clone() {
        let _ = writeln!(w, "let row{i} = min(m0 + {i}u, last_m);");
    }
    for j in cols.clone() {
        let _ = writeln!(
            w,
            "let col{j} = min(vec4<u32>(n0 + {}u) + vec4<u32>(0u, 1u, 2u, 3u), last_n);",
            4 * j
        );
    }
    for i in rows.clone() {
        for j in cols.clone() {
            let _ = writeln!(w, "var acc{i}_{j} = vec4<f32>(0.0);");
        }
    }
    let q = bm / 4;
    let all_zero = || {
        let zero: Vec<String> = if vec.a {
            (0..q)
                .map(|i| format!("all(aq{i} == vec4<f32>(0.0))"))
                .collect()
        } else {
            rows.clone().map(|i| format!("as{i} == 0.0")).collect()
        };
        zero.join(" && ")
    };
    // One k step's B loads and fmas, given its A (aq* or as*) and `k`.
    let step = |w: &mut String, t: usize| {
        for j in cols.clone() {
            if vec.b_kvec {
                let _ = writeln!(
                    w,
                    "let bv{j} = vec4<f32>(bk{j}_0.{c}, bk{j}_1.{c}, bk{j}_2.{c}, bk{j}_3.{c});",
                    c = XYZW[t % 4]
                );
            } else if vec.b {
                let _ = writeln!(
                    w,
                    "let bv{j} = b4[k * (dims.n / 4u) + min(gid.x * {bn4}u + {j}u, last_n4)];"
                );
            } else {
                let _ = writeln!(
                    w,
                    "let bv{j} = vec4<f32>(load_b(k, col{j}.x), load_b(k, col{j}.y), load_b(k, col{j}.z), load_b(k, col{j}.w));"
                );
            }
        }
        for i in rows.clone() {
            if vec.a {
                let _ = writeln!(
                    w,
                    "let av{i} = vec4<f32>(aq{}.{});",
                    i / 4,
                    XYZW[i as usize % 4]
                );
            } else {
                let _ = writeln!(w, "let av{i} = vec4<f32>(as{i});");
            }
            for j in cols.clone() {
                let _ = writeln!(w, "acc{i}_{j} = fma(av{i}, bv{j}, acc{i}_{j});");
            }
        }
    };
    // Column j's B vec4s along k at k0 (component c of col{j} is bk{j}_c).
    let b_kvec_loads = |w: &mut String| {
        if vec.b_kvec {
            for j in cols.clone() {
                for (e, c) in XYZW.iter().enumerate() {
                    let _ = writeln!(
                        w,
                        "let bk{j}_{e} = b4[col{j}.{c} * (dims.k / 4u) + k0 / 4u];"
                    );
                }
            }
        }
    };
    if vec.shared_a && !vec.a {
        // Lane l loads k steps k0..k0+3 of rows l, l + 8, ...; row i comes from lane
        // i % 8, its step s is component s.
        let _ = writeln!(w, "for (var k0 = 0u; k0 < dims.k; k0 += 4u) {{");
        for t in 0..bm / SHARED_A_LANES {
            let _ = writeln!(
                w,
                "let ar{t} = a4[min(m0 + {}u + lane, last_m) * (dims.k / 4u) + k0 / 4u];",
                t * SHARED_A_LANES
            );
        }
        for i in rows.clone() {
            let _ = writeln!(
                w,
                "let arow{i} = subgroupBroadcast(ar{}, {}u);",
                i / SHARED_A_LANES,
                i % SHARED_A_LANES
            );
        }
        b_kvec_loads(&mut w);
        for (s, c) in XYZW.iter().enumerate() {
            let _ = writeln!(w, "{{\nlet k = k0 + {s}u;");
            for i in rows.clone() {
                let _ = writeln!(w, "let as{i} = arow{i}.{c};");
            }
            if flags.skip_zero_a {
                let _ = writeln!(w, "if (!({})) {{", all_zero());
            }
            step(&mut w, s);
            if flags.skip_zero_a {
                w.push_str("}\n");
            }
            w.push_str("}\n");
        }
    } else if vec.shared_a {
        // Lane l loads vec4 l % q of the row block at k step l / q: `steps` k steps per
        // load, 4 per B load (whole loads: K % 4 == 0) where B is read along k.
        let steps = (SHARED_A_LANES / q) as usize;
        let per_loop = if vec.b_kvec { 4 } else { steps };
        let _ = writeln!(w, "for (var k0 = 0u; k0 < dims.k; k0 += {per_loop}u) {{");
        b_kvec_loads(&mut w);
        for t in 0..per_loop {
            let (g, s) = (t / steps, t % steps);
            if s == 0 {
                let _ = writeln!(
                    w,
                    "let ashared{g} = a4[min(k0 + {}u + lane / {q}u, dims.k - 1u) * (dims.m / 4u) + min(gid.y * {q}u + lane % {q}u, last_m4)];",
                    g * steps
                );
            }
            let _ = writeln!(w, "{{\nlet k = k0 + {t}u;");
            for i in 0..q {
                let _ = writeln!(
                    w,
                    "let aq{i} = subgroupBroadcast(ashared{g}, {}u);",
                    s as u32 * q + i
                );
            }
            let mut guard = Vec::new();
            if t > 0 && !vec.b_kvec {
                guard.push("k < dims.k".to_string());
            }
            if flags.skip_zero_a {
                guard.push(format!("!({})", all_zero()));
            }
            if !guard.is_empty() {
                let _ = writeln!(w, "if ({}) {{", guard.join(" && "));
            }
            step(&mut w, t);
            if !guard.is_empty() {
                w.push_str("}\n");
            }
            w.push_str("}\n");
        }
    } else {
        let _ = writeln!(w, "for (var k = 0u; k < dims.k; k++) {{");
        for i in 0..if vec.a { q } else { bm } {
            let load = if vec.a {
                format!("a4[k * (dims.m / 4u) + min(gid.y * {q}u + {i}u, last_m4)]")
            } else {
                format!("load_a(row{i}, k)")
            };
            let name = if vec.a { "aq" } else { "as" };
            let _ = writeln!(w, "let {name}{i} = {load};");
        }
        if flags.skip_zero_a {
            let _ = writeln!(w, "if ({}) {{ continue; }}", all_zero());
        }
        step(&mut w, 0);
    }
    let _ = writeln!(w, "}}");
    if vec.shared_a {
        w.push_str("if (n0 >= dims.n) { return; }\n");
    }
    // Where each accumulator's operands came from: its row and column, clamped as the
    // loads clamped them (whole vec4s clamp to the last vec4).
    for i in rows.clone() {
        if vec.a {
            let _ = writeln!(
                w,
                "let srow{i} = 4u * min(gid.y * {}u + {}u, last_m4) + {}u;",
                bm / 4,
                i / 4,
                i % 4
            );
        } else {
            let _ = writeln!(w, "let srow{i} = row{i};");
        }
    }
    for j in cols.clone() {
        if vec.b {
            let _ = writeln!(
                w,
                "let scol{j} = vec4<u32>(4u * min(gid.x * {bn4}u + {j}u, last_n4)) + vec4<u32>(0u, 1u, 2u, 3u);"
            );
        } else {
            let _ = writeln!(w, "let scol{j} = col{j};");
        }
    }
    if flags.bias {
        for j in cols.clone() {
            let b = XYZW.map(|c| format!("bias[scol{j}.{c}]"));
            let _ = writeln!(w, "let bias{j} = vec4<f32>({});", b.join(", "));
        }
    }
    // Stores without a guard where possible: an element past the last row (or, with
    // scalar stores, column) read a clamped row and column of A and B (srow, scol),
    // so it holds exactly the value of the element there, which this invocation owns
    // and writes too, with the same bits. Whole vec4s of C past the last column are
    // skipped instead. (256 guarded scalar stores were most of the driver's compile
    // time: 0.7-2.2 s a variant.)
    for i in rows {
        for j in cols.clone() {
            let mut v = format!("acc{i}_{j}");
            if flags.bias {
                v = format!("{v} + bias{j}");
            }
            if flags.relu {
                v = format!("max({v}, vec4<f32>(0.0))");
            }
            let _ = writeln!(w, "let v{i}_{j} = {v};");
            if vec.c {
                let _ = writeln!(
                    w,
                    "if (n0 + {}u < dims.n) {{ c4[srow{i} * (dims.n / 4u) + gid.x * {bn4}u + {j}u] = v{i}_{j}; }}",
                    4 * j
                );
            } else {
                for c in XYZW {
                    let _ = writeln!(w, "c[srow{i} * dims.n + scol{j}.{c}] = v{i}_{j}.{c};");
                }
            }
        }
    }
    if flags.relu_mask {
        relu_mask_pass(&mut w, bm, bn4, vec);
    }
    w.push_str("}\n");
    w
}

/// The ReLU mask, applied to the stored block in a second pass, a loop: unrolled, its
/// loads were 0.5 s of each masked variant's compile. Elements stored at clamped
/// addresses are masked again, to the same bits.
fn relu_mask_pass(w: &mut String, bm: u32, bn4: u32, vec: VecLoads) {
    use std::fmt::Write;
    let _ = writeln!(
        w,
        "for (var t = 0u; t < {}u; t++) {{\nlet i = t / {bn4}u;\nlet j = t % {bn4}u;",
        bm * bn4
    );
    if vec.a {
        let _ = writeln!(
            w,
            "let srow = 4u * min(gid.y * {}u + i / 4u, last_m4) + i % 4u;",
            bm / 4
        );
    } else {
        let _ = writeln!(w, "let srow = min(m0 + i, last_m);");
    }
    if vec.c {
        let _ = writeln!(
            w,
            "if (n0 + 4u * j < dims.n) {{\n\
             let at = srow * (dims.n / 4u) + gid.x * {bn4}u + j;\n\
             c4[at] = select(vec4<f32>(0.0), c4[at], mask4[at] > vec4<f32>(0.0));\n}}"
        );
    } else {
        if vec.b {
            let _ = writeln!(
                w,
                "let scol = vec4<u32>(4u * min(gid.x * {bn4}u + j, last_n4)) + vec4<u32>(0u, 1u, 2u, 3u);"
            );
        } else {
            w.push_str(
                "let scol = min(vec4<u32>(n0 + 4u * j) + vec4<u32>(0u, 1u, 2u, 3u), last_n);\n",
            );
        }
        for c in XYZW {
            let _ = writeln!(
                w,
                "{{\nlet at = srow * dims.n + scol.{c};\nc[at] = select(0.0, c[at], mask[at] > 0.0);\n}}"
            );
        }
    }
    w.push_str("}\n");
}

/// (label, generated WGSL, override constants) of one matmul variant.
pub type GeneratedVariant = (String, String, Vec<(String, f64)>);

/// Every register-blocked entry point the engine can generate for `bm` x `4·bn4`
/// blocks: per flag combination and load width, (label, the WGSL appended to
/// `matmul.wgsl`, the override constants it is compiled with). What the backend
/// translation test checks on every target language.
pub fn generated_variants(bm: u32, bn4: u32) -> Vec<GeneratedVariant> {
    let mut out = Vec::new();
    for bits in 0..64u32 {
        let flags = MatmulFlags {
            a_kmajor: bits & 1 != 0,
            b_nmajor: bits & 2 != 0,
            bias: bits & 4 != 0,
            relu: bits & 8 != 0,
            relu_mask: bits & 16 != 0,
            skip_zero_a: bits & 32 != 0,
        };
        if flags.relu && flags.relu_mask {
            continue;
        }
        let constants = [
            ("A_KMAJOR", flags.a_kmajor),
            ("B_NMAJOR", flags.b_nmajor),
            ("BIAS", flags.bias),
            ("RELU", flags.relu),
            ("RELU_MASK", flags.relu_mask),
        ]
        .map(|(k, v)| (k.to_string(), f64::from(u8::from(v))))
        .to_vec();
        for bits in 0..32u32 {
            let (a, b, c) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
            let (shared_a, b_kvec) = (bits & 8 != 0, bits & 16 != 0);
            if shared_a && !can_share_a(bm, a) {
                continue;
            }
            if b_kvec && !(shared_a && flags.b_nmajor && !b && can_read_b_along_k(bm, a)) {
                continue;
            }
            let vec = VecLoads {
                a,
                b,
                c,
                shared_a,
                b_kvec,
            };
            out.push((
                format!("{flags:?} {vec:?}"),
                register_blocked(bm, bn4, vec, flags),
                constants.clone(),
            ));
        }
    }
    out
}

/// Builds one matmul dispatch; the shape lives in its own uniform buffer.
pub fn matmul<'a>(
    ctx: &GpuContext,
    flags: MatmulFlags,
    schedule: Schedule,
    args: &MatmulArgs<'a>,
) -> Result<Dispatch> {
    let (m, n, k) = (args.m, args.n, args.k);
    let need = |name: &str, s: Option<&Slice<'_>>, len: usize, wanted: bool| -> Result<()> {
        match (s, wanted) {
            (Some(s), true) if (s.len as usize) < len => {
                bail!(
                    "matmul {m}x{n}x{k}: operand {name} has {} elements, needs {len}",
                    s.len
                )
            }
            (None, true) => bail!("matmul {m}x{n}x{k}: operand {name} missing"),
            (Some(_), false) => bail!("matmul {m}x{n}x{k}: operand {name} given but unused"),
            _ => Ok(()),
        }
    };
    need("a", Some(&args.a), m * k, true)?;
    need("b", Some(&args.b), k * n, true)?;
    need("c", Some(&args.c), m * n, true)?;
    need("bias", args.bias.as_ref(), n, flags.bias)?;
    need("mask", args.mask.as_ref(), m * n, flags.relu_mask)?;
    if flags.relu && flags.relu_mask {
        bail!("matmul: relu and relu_mask are exclusive");
    }
    let a_vec = flags.a_kmajor && m % 4 == 0 && args.a.offset.is_multiple_of(4);
    // A row-major A is shared as vec4s along k (layer 2's forward, the input gradients).
    let a_rows = !flags.a_kmajor && shares_row_major_a(ctx, k) && args.a.offset.is_multiple_of(4);
    let share_a = (a_vec && ctx.subgroup_size == Some(SHARED_A_LANES)) || a_rows;
    // A product narrower than a register block (the 10-wide output layer) runs in
    // 4x4 blocks: 12x the invocations of 16x16 ones to spread over the cores, and a
    // twentieth of the compile time; in 8x4 ones with shared A loads (logits 0.37 ->
    // 0.21 ms, their dW 0.31 -> 0.23). So does a product whose grid would be a single
    // workgroup, which leaves a core idle (conv 1's dW, 9x32x100352: 18.9 -> 10.3 ms).
    // Shared A loads pay in 32-row blocks (each B load feeds twice the rows): 32x8
    // blocks run layer 1 and the dW products 1.3-1.4x as fast as 16x16 ones, as fast
    // as 32x16 within noise at a third of its compile time (0.3 vs 0.9 s a variant).
    // The sums are the same, in the same order, whatever the block.
    let schedule = match schedule {
        Schedule::RegisterBlocked { bm, bn4 }
            if n < 4 * bn4 as usize
                || (n as u32).div_ceil(4 * bn4).div_ceil(8) * (m as u32).div_ceil(bm) < 2 =>
        {
            let bm = if share_a { 8 } else { 4 };
            Schedule::RegisterBlocked { bm, bn4: 1 }
        }
        Schedule::RegisterBlocked { bm: 16, .. } if share_a => {
            Schedule::RegisterBlocked { bm: 32, bn4: 2 }
        }
        s => s,
    };
    // Whole-vec4 loads and stores need 4-aligned rows and 16-byte-aligned bindings.
    let aligned = |s: &Option<Slice<'_>>| s.as_ref().is_none_or(|s| s.offset.is_multiple_of(4));
    let vec = match schedule {
        Schedule::RegisterBlocked { bm, .. } => {
            let a = a_vec && bm % 4 == 0;
            let shared_a = share_a && a == flags.a_kmajor && can_share_a(bm, a);
            VecLoads {
                a,
                b: !flags.b_nmajor && n % 4 == 0 && args.b.offset.is_multiple_of(4),
                c: n % 4 == 0 && args.c.offset.is_multiple_of(4) && aligned(&args.mask),
                shared_a,
                b_kvec: shared_a
                    && flags.b_nmajor
                    && k % 4 == 0
                    && args.b.offset.is_multiple_of(4)
                    && can_read_b_along_k(bm, a),
            }
        }
        Schedule::Tiled => VecLoads {
            a: false,
            b: false,
            c: false,
            shared_a: false,
            b_kvec: false,
        },
    };
    let kernel = kernel(ctx, flags, schedule, vec)?;
    let vec_view = |s: Slice<'a>, len: usize, on: bool| {
        (on && len > 0).then_some(Slice {
            len: len as u64,
            ..s
        })
    };
    let dims = ctx.uniform(
        "matmul_dims",
        &Dims {
            m: m as u32,
            n: n as u32,
            k: k as u32,
            _pad: 0,
        },
    );
    let workgroups = match schedule {
        Schedule::RegisterBlocked { bm, bn4 } => [
            (n as u32).div_ceil(4 * bn4).div_ceil(8),
            (m as u32).div_ceil(bm),
            1,
        ],
        Schedule::Tiled => [(n as u32).div_ceil(64), (m as u32).div_ceil(64), 1],
    };
    if workgroups[0] > 65535 || workgroups[1] > 65535 {
        bail!("matmul {m}x{n}x{k} needs more than 65535 workgroups in one dimension");
    }
    ctx.dispatch(
        &kernel,
        &[
            Some(args.a),
            Some(args.b),
            args.bias,
            args.mask,
            (!vec.c).then_some(args.c),
            Some(Slice::whole(&dims)),
            vec_view(args.a, m * k, vec.a || vec.shared_a),
            vec_view(args.b, k * n, vec.b || vec.b_kvec),
            vec_view(args.c, m * n, vec.c),
            args.mask.and_then(|s| vec_view(s, m * n, vec.c)),
        ],
        workgroups,
    )
    .map(|d| {
        let extra = if flags.bias { n } else { 0 } + if flags.relu_mask { m * n } else { 0 };
        let bytes = 4 * (m * k + k * n + m * n + extra) as u64;
        let label = format!("matmul {m}x{n}x{k} {flags}");
        d.with_work(2 * (m * n * k) as u64, bytes, label)
    })
}

/// Host operands of [`matmul_reference`], laid out as [`MatmulArgs`]' are.
pub struct HostMatmul<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub mask: Option<&'a [f32]>,
}

/// f64 CPU reference of the same computation.
pub fn matmul_reference(flags: MatmulFlags, op: &HostMatmul<'_>) -> Vec<f64> {
    let HostMatmul {
        m,
        n,
        k,
        a,
        b,
        bias,
        mask,
    } = *op;
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for p in 0..k {
                let av = if flags.a_kmajor {
                    a[p * m + i]
                } else {
                    a[i * k + p]
                };
                let bv = if flags.b_nmajor {
                    b[j * k + p]
                } else {
                    b[p * n + j]
                };
                s += av as f64 * bv as f64;
            }
            if let Some(bias) = bias {
                s += bias[j] as f64;
            }
            if flags.relu {
                s = s.max(0.0);
            }
            if let Some(mask) = mask {
                if mask[i * n + j] <= 0.0 {
                    s = 0.0;
                }
            }
            c[i * n + j] = s;
        }
    }
    c
}
