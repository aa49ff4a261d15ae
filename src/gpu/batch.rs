//! The data set resident on the GPU, and the launcher for `shaders/batch.wgsl`
//! (gather + normalise + trigger injection).

use anyhow::{bail, Result};

use super::{simple_kernel, Binding, Dispatch, GpuContext, Slice, RNG_WGSL, STEP_WGSL};
use crate::data::backdoor::{Backdoor, Trigger};
use crate::data::Dataset;

/// A data set uploaded once: pixels as packed u8 (4 per u32 word), labels as u32.
pub struct GpuDataset {
    pub images: wgpu::Buffer,
    pub labels: wgpu::Buffer,
    pub len: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub num_classes: usize,
    /// Fraction of non-zero pixels.
    pub density: f64,
}

impl GpuDataset {
    pub fn upload(ctx: &GpuContext, data: &Dataset) -> Result<Self> {
        // The shader reads bytes as little-endian u32 words: upload the bytes as they are.
        let images = if data.images.len().is_multiple_of(4) {
            ctx.buffer_from(&format!("{} images", data.name), &data.images)?
        } else {
            let mut padded = data.images.clone();
            padded.resize(data.images.len().next_multiple_of(4), 0);
            ctx.buffer_from(&format!("{} images", data.name), &padded)?
        };
        let labels: Vec<u32> = data.labels.iter().map(|&l| l as u32).collect();
        Ok(GpuDataset {
            images,
            labels: ctx.buffer_from(&format!("{} labels", data.name), &labels)?,
            len: data.len(),
            height: data.height,
            width: data.width,
            channels: data.channels,
            num_classes: data.num_classes,
            density: data.images.iter().filter(|&&p| p != 0).count() as f64
                / data.images.len().max(1) as f64,
        })
    }

    pub fn sample_dim(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// Whether skipping all-zero input blocks pays (measured on lavapipe: MNIST at
    /// 19 % non-zero gains ~15 % per training step; dense data loses up to 60 %).
    pub fn is_sparse(&self) -> bool {
        self.density < 0.3
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BatchParams {
    rows: u32,
    sample_dim: u32,
    width: u32,
    channels: u32,
    kind: u32,
    target_class: u32,
    corner_row: u32,
    corner_col: u32,
    p_backdoor: f32,
    noise_std: f32,
    clip: u32,
    seed: u32,
}

/// Where a batch goes: `x` is rows x sample_dim (row-major), `xt` (optional) its
/// transpose.
pub struct BatchOutputs<'a> {
    pub x: Slice<'a>,
    pub xt: Option<Slice<'a>>,
    pub labels: Slice<'a>,
}

/// Gathers `rows` samples listed at `indices[step.batch_offset..]`, optionally poisoned.
#[allow(clippy::too_many_arguments)]
pub fn gather_batch(
    ctx: &GpuContext,
    data: &GpuDataset,
    rows: usize,
    indices: Slice<'_>,
    out: &BatchOutputs<'_>,
    backdoor: Option<&Backdoor>,
    seed: u32,
    step: &wgpu::Buffer,
) -> Result<Dispatch> {
    if rows > 65535 {
        bail!("batch of {rows} rows exceeds the 65535 limit of one dispatch");
    }
    let kernel = simple_kernel(
        ctx,
        "gather_batch",
        &[
            RNG_WGSL,
            STEP_WGSL,
            include_str!("../../shaders/batch.wgsl"),
        ],
        "main",
        &[
            Binding::ReadOnly,
            Binding::ReadOnly,
            Binding::ReadOnly,
            Binding::ReadWrite,
            Binding::ReadWrite,
            Binding::Uniform,
            Binding::Uniform,
            Binding::ReadWrite,
        ],
        &[("WRITE_T", out.xt.is_some() as u8 as f64)],
    )?;
    let mut p = BatchParams {
        rows: rows as u32,
        sample_dim: data.sample_dim() as u32,
        width: data.width as u32,
        channels: data.channels as u32,
        kind: 0,
        target_class: 0,
        corner_row: 0,
        corner_col: 0,
        p_backdoor: 0.0,
        noise_std: 0.0,
        clip: 0,
        seed,
    };
    if let Some(b) = backdoor {
        b.validate(data.num_classes)?;
        p.p_backdoor = b.p_backdoor;
        p.target_class = b.target_class;
        match b.trigger {
            Trigger::Corner { corner } => {
                let (r, c) = corner.pixel(data.height, data.width);
                (p.kind, p.corner_row, p.corner_col) = (1, r as u32, c as u32);
            }
            Trigger::Noise { std, clip } => {
                (p.kind, p.noise_std, p.clip) = (2, std, clip as u32);
            }
        }
    }
    let params = ctx.uniform("batch_params", &p);
    ctx.dispatch(
        &kernel,
        &[
            Some(Slice::whole(&data.images)),
            Some(Slice::whole(&data.labels)),
            Some(indices),
            Some(out.x),
            Some(out.labels),
            Some(Slice::whole(&params)),
            Some(Slice::whole(step)),
            out.xt,
        ],
        [rows as u32, 1, 1],
    )
}

/// CPU reference: the batch (rows x sample_dim, f64) and labels for `indices`.
pub fn gather_batch_reference(
    data: &Dataset,
    indices: &[u32],
    backdoor: Option<&Backdoor>,
    seed: u32,
    epoch: u32,
) -> (Vec<f64>, Vec<u32>) {
    let shape = (data.height, data.width, data.channels);
    let mut x = Vec::with_capacity(indices.len() * data.sample_dim());
    let mut labels = Vec::with_capacity(indices.len());
    for &i in indices {
        let mut img: Vec<f64> = data
            .image(i as usize)
            .iter()
            .map(|&p| p as f64 / 255.0)
            .collect();
        let mut label = data.labels[i as usize] as u32;
        if let Some(b) = backdoor {
            label = b.apply_reference(&mut img, shape, label, seed, epoch, i);
        }
        x.extend(img);
        labels.push(label);
    }
    (x, labels)
}
