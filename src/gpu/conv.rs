//! Launcher and CPU references for `shaders/conv.wgsl`: im2col / col2im for 3x3 SAME
//! convolutions, 2x2 max pooling and global max pooling, with their backward passes.

use anyhow::Result;

use super::{simple_kernel, Binding, Dispatch, GpuContext, Slice};

/// An HWC batch: `[batch][height][width][channels]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Nhwc {
    pub batch: u32,
    pub height: u32,
    pub width: u32,
    pub channels: u32,
}

impl Nhwc {
    pub fn new(batch: usize, height: usize, width: usize, channels: usize) -> Self {
        Nhwc {
            batch: batch as u32,
            height: height as u32,
            width: width as u32,
            channels: channels as u32,
        }
    }

    pub fn len(&self) -> usize {
        (self.batch * self.height * self.width * self.channels) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The 2x2 max pool's output shape (VALID: odd sizes round down).
    pub fn pooled(&self) -> Nhwc {
        Nhwc {
            height: self.height / 2,
            width: self.width / 2,
            ..*self
        }
    }

    fn index(&self, b: usize, y: usize, x: usize, c: usize) -> usize {
        ((b * self.height as usize + y) * self.width as usize + x) * self.channels as usize + c
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvOp {
    /// src: the input [shape]; dst: columns [batch·H·W][9·C] and/or dst_t: the same
    /// transposed.
    Im2col,
    /// src: column gradients; dst: input gradient [shape].
    Col2im,
    /// src: [shape]; dst: [shape.pooled()]; argmax written.
    MaxPool,
    /// src: pooled gradient; dst: [shape] (and dst_t, transposed), masked where `mask`
    /// (the pre-pool ReLU output) is not positive.
    MaxPoolGrad,
    /// src: [shape]; dst: [batch][channels]; argmax written.
    GlobalMax,
    /// src: [batch][channels]; dst: [shape].
    GlobalMaxGrad,
}

impl ConvOp {
    fn entry(self) -> &'static str {
        match self {
            ConvOp::Im2col => "im2col",
            ConvOp::Col2im => "col2im",
            ConvOp::MaxPool => "max_pool",
            ConvOp::MaxPoolGrad => "max_pool_grad",
            ConvOp::GlobalMax => "global_max",
            ConvOp::GlobalMaxGrad => "global_max_grad",
        }
    }

    /// Invocations: one per spatial position (of the pooled output for MaxPool), or per
    /// (sample, channel) for GlobalMax.
    fn invocations(self, s: Nhwc) -> usize {
        let positions = |s: Nhwc| (s.batch * s.height * s.width) as usize;
        match self {
            ConvOp::MaxPool => positions(s.pooled()),
            ConvOp::GlobalMax => (s.batch * s.channels) as usize,
            ConvOp::Im2col | ConvOp::Col2im | ConvOp::MaxPoolGrad | ConvOp::GlobalMaxGrad => {
                positions(s)
            }
        }
    }
}

/// The bindings of a conv kernel: `dst` is required by every op but im2col, which
/// writes `dst` (row-major columns) and/or `dst_t` (transposed); max_pool_grad also
/// writes `dst_t` when given.
#[derive(Clone, Copy)]
pub struct ConvArgs<'a> {
    pub src: Slice<'a>,
    pub dst: Option<Slice<'a>>,
    pub dst_t: Option<Slice<'a>>,
    pub argmax: Option<Slice<'a>>,
    pub mask: Option<Slice<'a>>,
}

impl<'a> ConvArgs<'a> {
    /// `src` -> `dst`, nothing else.
    pub fn new(src: Slice<'a>, dst: Slice<'a>) -> Self {
        ConvArgs {
            src,
            dst: Some(dst),
            dst_t: None,
            argmax: None,
            mask: None,
        }
    }
}

pub fn conv_op(ctx: &GpuContext, op: ConvOp, shape: Nhwc, args: &ConvArgs<'_>) -> Result<Dispatch> {
    if args.dst.is_none() && (op != ConvOp::Im2col || args.dst_t.is_none()) {
        anyhow::bail!("conv {}: needs a destination", op.entry());
    }
    let kernel = simple_kernel(
        ctx,
        &format!("conv_{}", op.entry()),
        &["conv"],
        op.entry(),
        &[
            Binding::ReadOnly,
            Binding::ReadWrite,
            Binding::ReadWrite,
            Binding::ReadOnly,
            Binding::Uniform,
            Binding::ReadWrite,
        ],
        &[
            ("WRITE_ROWS", args.dst.is_some() as u8 as f64),
            ("WRITE_T", args.dst_t.is_some() as u8 as f64),
        ],
    )?;
    let params = ctx.uniform("conv_params", &shape);
    ctx.dispatch(
        &kernel,
        &[
            Some(args.src),
            args.dst,
            args.argmax,
            args.mask,
            Some(Slice::whole(&params)),
            args.dst_t,
        ],
        ctx.grid_1d(op.invocations(shape), 64),
    )
}

/// Tap k = ky·3 + kx of output (y, x) reads input (y + ky - 1, x + kx - 1).
fn tap(s: Nhwc, y: usize, x: usize, k: usize) -> Option<(usize, usize)> {
    let sy = (y + k / 3).checked_sub(1)?;
    let sx = (x + k % 3).checked_sub(1)?;
    (sy < s.height as usize && sx < s.width as usize).then_some((sy, sx))
}

fn positions(s: Nhwc) -> impl Iterator<Item = (usize, usize, usize)> {
    let (b, h, w) = (s.batch as usize, s.height as usize, s.width as usize);
    (0..b).flat_map(move |b| (0..h).flat_map(move |y| (0..w).map(move |x| (b, y, x))))
}

pub fn im2col_reference(x: &[f64], s: Nhwc) -> Vec<f64> {
    let c = s.channels as usize;
    let mut cols = Vec::with_capacity(s.len() * 9);
    for (b, y, xx) in positions(s) {
        for k in 0..9 {
            for ch in 0..c {
                cols.push(tap(s, y, xx, k).map_or(0.0, |(sy, sx)| x[s.index(b, sy, sx, ch)]));
            }
        }
    }
    cols
}

pub fn col2im_reference(dcols: &[f64], s: Nhwc) -> Vec<f64> {
    let c = s.channels as usize;
    let mut dx = vec![0.0; s.len()];
    for (row, (b, y, x)) in positions(s).enumerate() {
        for k in 0..9 {
            if let Some((sy, sx)) = tap(s, y, x, k) {
                for ch in 0..c {
                    dx[s.index(b, sy, sx, ch)] += dcols[(row * 9 + k) * c + ch];
                }
            }
        }
    }
    dx
}

pub fn max_pool_reference(x: &[f64], s: Nhwc) -> (Vec<f64>, Vec<u32>) {
    let p = s.pooled();
    let (mut out, mut arg) = (Vec::new(), Vec::new());
    for (b, y, xx) in positions(p) {
        for c in 0..s.channels as usize {
            let v = |k: usize| x[s.index(b, 2 * y + k / 2, 2 * xx + k % 2, c)];
            let best = (1..4).fold(0, |best, k| if v(k) > v(best) { k } else { best });
            out.push(v(best));
            arg.push(best as u32);
        }
    }
    (out, arg)
}

pub fn max_pool_grad_reference(dpool: &[f64], argmax: &[u32], mask: &[f64], s: Nhwc) -> Vec<f64> {
    let p = s.pooled();
    let mut dx = vec![0.0; s.len()];
    for (o, (b, y, x)) in positions(p).enumerate() {
        for c in 0..s.channels as usize {
            let i = o * s.channels as usize + c;
            let k = argmax[i] as usize;
            let at = s.index(b, 2 * y + k / 2, 2 * x + k % 2, c);
            if mask[at] > 0.0 {
                dx[at] = dpool[i];
            }
        }
    }
    dx
}

pub fn global_max_reference(x: &[f64], s: Nhwc) -> (Vec<f64>, Vec<u32>) {
    let (hw, c) = ((s.height * s.width) as usize, s.channels as usize);
    let (mut out, mut arg) = (Vec::new(), Vec::new());
    for b in 0..s.batch as usize {
        for ch in 0..c {
            let v = |p: usize| x[(b * hw + p) * c + ch];
            let best = (1..hw).fold(0, |best, p| if v(p) > v(best) { p } else { best });
            out.push(v(best));
            arg.push(best as u32);
        }
    }
    (out, arg)
}

pub fn global_max_grad_reference(dg: &[f64], argmax: &[u32], s: Nhwc) -> Vec<f64> {
    let (hw, c) = ((s.height * s.width) as usize, s.channels as usize);
    let mut dx = vec![0.0; s.len()];
    for (o, (&g, &p)) in dg.iter().zip(argmax).enumerate() {
        let (b, ch) = (o / c, o % c);
        dx[(b * hw + p as usize) * c + ch] = g;
    }
    dx
}
