//! Launcher and CPU reference for `shaders/matmul.wgsl`.

use std::sync::Arc;

use anyhow::{bail, Result};

use super::context::{Binding, Dispatch, GpuContext, Kernel, KernelSpec, Slice};

const SOURCE: &str = include_str!("../../shaders/matmul.wgsl");
const BINDINGS: [Binding; 7] = [
    Binding::ReadOnly,  // a
    Binding::ReadOnly,  // b
    Binding::ReadOnly,  // bias
    Binding::ReadOnly,  // mask
    Binding::ReadWrite, // c
    Binding::ReadWrite, // ct
    Binding::Uniform,   // dims
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
    /// Also write Cᵀ (N x M) to `ct`.
    pub store_t: bool,
}

/// Which schedule runs; [`Schedule::for_context`] picks by adapter type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Barrier-free register blocking: `bm` rows x `4*bn4` columns per invocation.
    RegisterBlocked { bm: u32, bn4: u32 },
    /// 64x64 tiles staged in workgroup memory.
    Tiled,
}

impl Schedule {
    pub fn for_context(ctx: &GpuContext) -> Self {
        if ctx.is_cpu() {
            Schedule::RegisterBlocked { bm: 32, bn4: 4 }
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
    pub ct: Option<Slice<'a>>,
}

fn kernel(ctx: &GpuContext, flags: MatmulFlags, schedule: Schedule) -> Result<Arc<Kernel>> {
    // Register-blocked invocations run 8 to a SIMD row on lavapipe: keep workgroups
    // small so that small outputs still spread over all cores.
    let (bm, bn4, entry) = match schedule {
        Schedule::RegisterBlocked { bm, bn4 } => (bm, bn4, "main_regblock"),
        Schedule::Tiled => (1, 1, "main_tiled"),
    };
    let source = format!(
        "const BM: u32 = {bm}u;\nconst BN4: u32 = {bn4}u;\nconst WG_X: u32 = 8u;\nconst WG_Y: u32 = 1u;\n{SOURCE}"
    );
    let f = flags;
    let constants = [
        ("A_KMAJOR", f.a_kmajor as u8 as f64),
        ("B_NMAJOR", f.b_nmajor as u8 as f64),
        ("BIAS", f.bias as u8 as f64),
        ("RELU", f.relu as u8 as f64),
        ("RELU_MASK", f.relu_mask as u8 as f64),
        ("STORE_T", f.store_t as u8 as f64),
    ];
    ctx.kernel(&KernelSpec {
        key: format!("matmul_{schedule:?}_{flags:?}"),
        source: &source,
        entry,
        bindings: &BINDINGS,
        constants: &constants,
    })
}

/// Builds one matmul dispatch; the shape lives in its own uniform buffer.
pub fn matmul(
    ctx: &GpuContext,
    flags: MatmulFlags,
    schedule: Schedule,
    args: &MatmulArgs<'_>,
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
    need("ct", args.ct.as_ref(), m * n, flags.store_t)?;
    if flags.relu && flags.relu_mask {
        bail!("matmul: relu and relu_mask are exclusive");
    }
    let kernel = kernel(ctx, flags, schedule)?;
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
            Some(args.c),
            args.ct,
            Some(Slice::whole(&dims)),
        ],
        workgroups,
    )
}

/// f64 CPU reference of the same computation (C only; Cᵀ is its transpose).
#[allow(clippy::too_many_arguments)]
pub fn matmul_reference(
    flags: MatmulFlags,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    mask: Option<&[f32]>,
) -> Vec<f64> {
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
