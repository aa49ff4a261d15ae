//! The data set resident on the GPU, and the launcher for `shaders/batch.wgsl`
//! (gather + normalise + trigger injection). It knows images and labels, not data sets or
//! triggers: the data layer hands it [`ByteImages`] and a [`Poison`].

use anyhow::{bail, Result};

use super::{simple_kernel, Binding, Dispatch, GpuContext, Slice};

/// u8 images (HWC per sample, scaled by 1/255 on the GPU) and their labels on the host.
pub struct ByteImages<'a> {
    pub name: &'a str,
    pub pixels: &'a [u8],
    pub labels: &'a [u8],
    /// (height, width, channels).
    pub shape: [usize; 3],
    pub num_classes: usize,
}

/// What the gather kernel writes into a poisoned sample.
// The warp grid (512 B) is built once per dispatch and copied into its uniform; boxing
// it would cost Poison its Copy for no gain.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mark {
    /// This pixel set to 1.0 in every channel.
    Pixel { row: usize, col: usize },
    /// Additive Gaussian noise, clipped to [0, 1] if `clip`.
    Noise { std: f32, clip: bool },
    /// Resampled through a warping field: a `grid_width`² control grid of (x, y)
    /// displacements (`grid[c][i][j]`, the first 2·grid_width² values), upsampled
    /// bicubically; coins below `p_noise` get random per-pixel warps too and keep their
    /// label.
    Warp {
        grid_width: u32,
        grid: [f32; 128],
        rescale: f32,
        p_noise: f32,
    },
}

/// Trigger injection as the kernel sees it: each sample is poisoned with probability
/// `p` (a per-sample coin of the step's seed) and relabelled `target_class`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Poison {
    pub mark: Mark,
    pub p: f32,
    pub target_class: u32,
}

/// Random training augmentations, drawn per sample and epoch and applied before the
/// trigger, in the later upstream's order: a crop of the image padded with `padding`
/// zeros on each side, at an offset uniform in [0, 2·padding]² (the upstream drew it from
/// [0, padding)), with probability `crop_p`; a rotation about the centre by an angle
/// uniform in [-degrees, degrees] (nearest neighbour, zero fill), with probability
/// `rotation_p`; a horizontal flip with probability `flip_p`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    pub crop_p: f32,
    pub padding: u32,
    pub rotation_p: f32,
    pub degrees: f32,
    pub flip_p: f32,
}

/// Storage bindings a data set may span (`data0..data3` in `shaders/batch.wgsl`): with
/// 128 MiB bindings, data sets up to 512 MiB (CIFAR-10's training set is 154 MB).
pub const MAX_CHUNKS: usize = 4;

/// A data set uploaded once: pixels as packed u8 (4 per u32 word) or, for computed
/// images such as adversarial examples, as f32 in [0, 1]; labels as u32. Pixels are split
/// into chunks of whole samples, each within the adapter's storage binding limit.
pub struct GpuDataset {
    pub chunks: Vec<wgpu::Buffer>,
    pub samples_per_chunk: usize,
    pub f32_pixels: bool,
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
    pub fn upload(ctx: &GpuContext, data: &ByteImages<'_>) -> Result<Self> {
        Self::upload_chunked(ctx, data, ctx.limits.max_storage_buffer_binding_size)
    }

    /// [`GpuDataset::upload`] with chunks of at most `max_chunk_bytes` (tests use small
    /// ones to cover the multi-chunk path).
    pub fn upload_chunked(
        ctx: &GpuContext,
        data: &ByteImages<'_>,
        max_chunk_bytes: u64,
    ) -> Result<Self> {
        let labels: Vec<u32> = data.labels.iter().map(|&l| l as u32).collect();
        let [height, width, channels] = data.shape;
        let images = Pixels {
            name: data.name,
            bytes: data.pixels,
            bytes_per_value: 1,
            sample_values: height * width * channels,
        };
        let (chunks, samples_per_chunk) = images.upload(ctx, max_chunk_bytes)?;
        Ok(GpuDataset {
            chunks,
            samples_per_chunk,
            f32_pixels: false,
            labels: ctx.buffer_from(&format!("{} labels", data.name), &labels)?,
            len: data.labels.len(),
            height,
            width,
            channels,
            num_classes: data.num_classes,
            density: data.pixels.iter().filter(|&&p| p != 0).count() as f64
                / data.pixels.len().max(1) as f64,
        })
    }

    /// Uploads float images (`len * height * width * channels` values, HWC).
    pub fn upload_f32(ctx: &GpuContext, name: &str, images: &FloatImages<'_>) -> Result<Self> {
        let [height, width, channels] = images.shape;
        let len = images.labels.len();
        if images.pixels.len() != len * height * width * channels {
            bail!(
                "{name}: {} pixel values for {len} images of shape {:?}",
                images.pixels.len(),
                images.shape
            );
        }
        if let Some(&l) = images
            .labels
            .iter()
            .find(|&&l| l as usize >= images.num_classes)
        {
            bail!("{name}: label {l} out of range 0..{}", images.num_classes);
        }
        let pixels = Pixels {
            name,
            bytes: bytemuck::cast_slice(images.pixels),
            bytes_per_value: 4,
            sample_values: height * width * channels,
        };
        let (chunks, samples_per_chunk) =
            pixels.upload(ctx, ctx.limits.max_storage_buffer_binding_size)?;
        Ok(GpuDataset {
            chunks,
            samples_per_chunk,
            f32_pixels: true,
            labels: ctx.buffer_from(&format!("{name} labels"), images.labels)?,
            len,
            height,
            width,
            channels,
            num_classes: images.num_classes,
            density: images.pixels.iter().filter(|&&p| p != 0.0).count() as f64
                / images.pixels.len().max(1) as f64,
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

/// Pixel bytes of a data set on their way to the GPU.
struct Pixels<'a> {
    name: &'a str,
    bytes: &'a [u8],
    bytes_per_value: usize,
    sample_values: usize,
}

impl Pixels<'_> {
    /// Uploads in chunks of whole samples, each at most `max_chunk_bytes` and a whole
    /// number of u32 words; returns the chunks and the samples per chunk.
    fn upload(&self, ctx: &GpuContext, max_chunk_bytes: u64) -> Result<(Vec<wgpu::Buffer>, usize)> {
        let sample_bytes = (self.sample_values * self.bytes_per_value).max(1);
        // Chunks must start on a word: a multiple of `step` samples.
        let step = 4 / gcd(sample_bytes, 4);
        let fit = (max_chunk_bytes as usize / sample_bytes) / step * step;
        let samples = self.bytes.len() / sample_bytes;
        if fit == 0 {
            bail!(
                "{}: one sample ({sample_bytes} B) exceeds the storage binding limit",
                self.name
            );
        }
        let per_chunk = fit.min(samples.next_multiple_of(step).max(step));
        let chunks: Vec<&[u8]> = self.bytes.chunks(per_chunk * sample_bytes).collect();
        if chunks.len() > MAX_CHUNKS {
            bail!(
                "{}: {} MiB of pixels need {} storage bindings of at most {} MiB; at most \
                 {MAX_CHUNKS} are supported",
                self.name,
                self.bytes.len() >> 20,
                chunks.len(),
                max_chunk_bytes >> 20
            );
        }
        let buffers = chunks
            .iter()
            .enumerate()
            .map(|(i, chunk)| {
                let mut words = chunk.to_vec();
                // The shader reads little-endian u32 words: pad the last one.
                words.resize(chunk.len().next_multiple_of(4), 0);
                ctx.buffer_from(&format!("{} images {i}", self.name), &words)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((buffers, per_chunk))
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Float images on the host, for [`GpuDataset::upload_f32`].
pub struct FloatImages<'a> {
    pub pixels: &'a [f32],
    pub labels: &'a [u32],
    /// (height, width, channels).
    pub shape: [usize; 3],
    pub num_classes: usize,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
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
    samples_per_chunk: u32,
    height: u32,
    grid_width: u32,
    rescale: f32,
    p_noise: f32,
    crop_p: f32,
    padding: u32,
    rotation_p: f32,
    /// In radians.
    max_angle: f32,
    flip_p: f32,
    _pad: [u32; 3],
    grid: [f32; 128],
}

/// Where a batch goes: `x` is rows x sample_dim (row-major), `xt` (optional) its
/// transpose.
pub struct BatchOutputs<'a> {
    pub x: Slice<'a>,
    pub xt: Option<Slice<'a>>,
    pub labels: Slice<'a>,
}

/// What [`gather_batch`] reads: `rows` samples of `data` listed at
/// `indices[step.batch_offset..]`, augmented by `augment` and poisoned by `poison` with
/// draws from `seed`.
pub struct Gather<'a> {
    pub data: &'a GpuDataset,
    pub rows: usize,
    pub indices: Slice<'a>,
    pub augment: Option<Augment>,
    pub poison: Option<Poison>,
    pub seed: u32,
    pub step: &'a wgpu::Buffer,
}

/// Gathers a batch into `out`, optionally poisoned.
pub fn gather_batch(ctx: &GpuContext, g: &Gather<'_>, out: &BatchOutputs<'_>) -> Result<Dispatch> {
    let Gather {
        data,
        rows,
        indices,
        augment,
        poison,
        seed,
        step,
    } = *g;
    if rows > 65535 {
        bail!("batch of {rows} rows exceeds the 65535 limit of one dispatch");
    }
    // The trigger's KIND in shaders/batch.wgsl (0 = none).
    let mut kind = 0u32;
    let mut p = BatchParams {
        rows: rows as u32,
        sample_dim: data.sample_dim() as u32,
        width: data.width as u32,
        channels: data.channels as u32,
        target_class: 0,
        corner_row: 0,
        corner_col: 0,
        p_backdoor: 0.0,
        noise_std: 0.0,
        clip: 0,
        seed,
        samples_per_chunk: data.samples_per_chunk as u32,
        height: data.height as u32,
        grid_width: 0,
        rescale: 1.0,
        p_noise: 0.0,
        crop_p: augment.map_or(0.0, |a| a.crop_p),
        padding: augment.map_or(0, |a| a.padding),
        rotation_p: augment.map_or(0.0, |a| a.rotation_p),
        max_angle: augment.map_or(0.0, |a| a.degrees.to_radians()),
        flip_p: augment.map_or(0.0, |a| a.flip_p),
        _pad: [0; 3],
        grid: [0.0; 128],
    };
    if let Some(b) = poison {
        if b.target_class as usize >= data.num_classes {
            bail!(
                "target_class {} out of range for {} classes",
                b.target_class,
                data.num_classes
            );
        }
        p.p_backdoor = b.p;
        p.target_class = b.target_class;
        match b.mark {
            Mark::Pixel { row, col } => {
                if row >= data.height || col >= data.width {
                    bail!(
                        "trigger pixel ({row}, {col}) outside {}x{} images",
                        data.height,
                        data.width
                    );
                }
                (kind, p.corner_row, p.corner_col) = (1, row as u32, col as u32);
            }
            Mark::Noise { std, clip } => {
                (kind, p.noise_std, p.clip) = (2, std, clip as u32);
            }
            Mark::Warp {
                grid_width,
                grid,
                rescale,
                p_noise,
            } => {
                (kind, p.grid_width, p.grid, p.rescale, p.p_noise) =
                    (3, grid_width, grid, rescale, p_noise);
            }
        }
    }
    // Whole words of packed pixels: a quarter of the loads (an MNIST batch of 128 took
    // 0.44-0.71 ms, now 0.33).
    let quads =
        !data.f32_pixels && augment.is_none() && kind != 3 && data.sample_dim().is_multiple_of(4);
    let kernel = simple_kernel(
        ctx,
        "gather_batch",
        &["rng", "step", "batch"],
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
            Binding::ReadOnly,
            Binding::ReadOnly,
            Binding::ReadOnly,
        ],
        &[
            ("WRITE_T", out.xt.is_some() as u8 as f64),
            ("F32_PIXELS", data.f32_pixels as u8 as f64),
            ("KIND", kind as f64),
            ("AUGMENT", augment.is_some() as u8 as f64),
            ("CHUNKS", data.chunks.len() as f64),
            ("QUADS", quads as u8 as f64),
        ],
    )?;
    let params = ctx.uniform("batch_params", &p);
    ctx.dispatch(
        &kernel,
        &[
            Some(Slice::whole(&data.chunks[0])),
            Some(Slice::whole(&data.labels)),
            Some(indices),
            Some(out.x),
            Some(out.labels),
            Some(Slice::whole(&params)),
            Some(Slice::whole(step)),
            out.xt,
            data.chunks.get(1).map(Slice::whole),
            data.chunks.get(2).map(Slice::whole),
            data.chunks.get(3).map(Slice::whole),
        ],
        [rows as u32, 1, 1],
    )
}
