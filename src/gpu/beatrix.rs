//! Launchers and CPU references for `shaders/beatrix.wgsl`: Gram-matrix features of
//! activations and each sample's deviation outside per-feature bounds.

use anyhow::{bail, Result};

use super::{simple_kernel, Binding, Dispatch, GpuContext, Slice};

const BINDINGS: [Binding; 6] = [
    Binding::ReadOnly,
    Binding::ReadOnly,
    Binding::ReadOnly,
    Binding::ReadOnly,
    Binding::ReadWrite,
    Binding::Uniform,
];

/// float16's smallest normal number: upstream's guard against zero bounds.
pub const EPS: f32 = 6.103_515_6e-5;

/// A batch of activations: `rows` samples of `positions` x `channels` (NHWC rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GramShape {
    pub rows: usize,
    pub positions: usize,
    pub channels: usize,
}

impl GramShape {
    /// Upper-triangle entries (diagonal included) of a channels x channels matrix.
    pub fn features(&self) -> usize {
        self.channels * (self.channels + 1) / 2
    }
}

/// `struct GramParams` of the shader; scoring rewrites `out_offset` per batch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GramParams {
    pub rows: u32,
    pub positions: u32,
    pub channels: u32,
    pub features: u32,
    pub power: u32,
    pub out_offset: u32,
    pub scale: f32,
    pub eps: f32,
}

impl GramParams {
    pub fn new(shape: GramShape, power: u32, scale: f32, out_offset: usize) -> Self {
        GramParams {
            rows: shape.rows as u32,
            positions: shape.positions as u32,
            channels: shape.channels as u32,
            features: shape.features() as u32,
            power,
            out_offset: out_offset as u32,
            scale,
            eps: EPS,
        }
    }
}

/// The (a, b) pairs of the upper triangle, a ≤ b, row by row, packed `a << 16 | b`.
pub fn upper_pairs(channels: usize) -> Result<Vec<u32>> {
    if channels > 1 << 16 {
        bail!("Gram features of {channels} channels: at most 65536 are supported");
    }
    Ok((0..channels)
        .flat_map(|a| (a..channels).map(move |b| ((a as u32) << 16) | b as u32))
        .collect())
}

/// What a Gram kernel reads: the activations, the feature pairs and the uniform.
#[derive(Clone, Copy)]
pub struct GramInputs<'a> {
    pub x: Slice<'a>,
    pub pairs: Slice<'a>,
    pub params: &'a wgpu::Buffer,
}

/// `out[row][f]` = sample `row`'s Gram feature `f` (rows x features).
pub fn gram_features(
    ctx: &GpuContext,
    shape: GramShape,
    input: &GramInputs<'_>,
    out: Slice<'_>,
) -> Result<Dispatch> {
    let kernel = simple_kernel(
        ctx,
        "beatrix_features",
        &["beatrix"],
        "features",
        &BINDINGS,
        &[],
    )?;
    ctx.dispatch(
        &kernel,
        &[
            Some(input.x),
            Some(input.pairs),
            None,
            None,
            Some(out),
            Some(Slice::whole(input.params)),
        ],
        ctx.grid_1d(shape.rows * shape.features(), 64),
    )
}

/// `out[out_offset + row] += scale · Σ_f` relative deviation of feature f outside
/// `[lo_f, hi_f]`.
pub fn gram_deviation(
    ctx: &GpuContext,
    shape: GramShape,
    input: &GramInputs<'_>,
    bounds: (Slice<'_>, Slice<'_>),
    out: Slice<'_>,
) -> Result<Dispatch> {
    let kernel = simple_kernel(
        ctx,
        "beatrix_deviation",
        &["beatrix"],
        "deviation",
        &BINDINGS,
        &[],
    )?;
    let rows = shape.rows as u32;
    ctx.dispatch(
        &kernel,
        &[
            Some(input.x),
            Some(input.pairs),
            Some(bounds.0),
            Some(bounds.1),
            Some(out),
            Some(Slice::whole(input.params)),
        ],
        [rows.min(65535), rows.div_ceil(65535), 1],
    )
}

/// f64 reference: every row's Gram features (rows x features).
pub fn gram_features_reference(x: &[f64], shape: GramShape, power: i32) -> Vec<f64> {
    let (p, c) = (shape.positions, shape.channels);
    let mut out = Vec::with_capacity(shape.rows * shape.features());
    for row in x.chunks_exact(p * c) {
        for a in 0..c {
            for b in a..c {
                let g: f64 = (0..p)
                    .map(|pos| row[pos * c + a].powi(power) * row[pos * c + b].powi(power))
                    .sum();
                out.push(
                    g.signum()
                        * g.abs().powf(1.0 / f64::from(power))
                        * f64::from(u8::from(g != 0.0)),
                );
            }
        }
    }
    out
}

/// f64 reference of one row's summed relative deviation outside the bounds.
pub fn gram_deviation_reference(g: &[f64], lo: &[f64], hi: &[f64]) -> f64 {
    let eps = f64::from(EPS);
    g.iter()
        .zip(lo.iter().zip(hi))
        .map(|(&g, (&l, &h))| {
            (l - g).max(0.0) / (l.abs() + eps) + (g - h).max(0.0) / (h.abs() + eps)
        })
        .sum()
}
