//! Backdoor triggers (data poisoning). The injection itself runs on the GPU in
//! `shaders/batch.wgsl`; this is the configuration and its CPU reference.

use std::str::FromStr;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::data::augment::{augment_reference, Augment};
use crate::data::Dataset;
use crate::gpu::batch::{Mark, Poison};
use crate::rng;

/// The RNG key of one sample's trigger draws: run seed, epoch, data set index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Draw {
    pub seed: u32,
    pub epoch: u32,
    pub sample: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Corner {
    #[serde(alias = "top_left")]
    TopLeft,
    #[serde(alias = "top_right")]
    TopRight,
    #[serde(alias = "bottom_left")]
    BottomLeft,
    #[serde(alias = "bottom_right")]
    BottomRight,
}

impl Corner {
    /// (row, column) of the trigger pixel. Unlike the original, the names mean what
    /// they say (the original swapped top-right and bottom-left).
    pub fn pixel(self, height: usize, width: usize) -> (usize, usize) {
        match self {
            Corner::TopLeft => (0, 0),
            Corner::TopRight => (0, width - 1),
            Corner::BottomLeft => (height - 1, 0),
            Corner::BottomRight => (height - 1, width - 1),
        }
    }
}

impl FromStr for Corner {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.replace('_', "-").as_str() {
            "top-left" => Corner::TopLeft,
            "top-right" => Corner::TopRight,
            "bottom-left" => Corner::BottomLeft,
            "bottom-right" => Corner::BottomRight,
            _ => bail!(
                "unknown corner {s:?}: expected top-left, top-right, bottom-left or bottom-right"
            ),
        })
    }
}

/// The noise trigger's standard deviation when none is given (the original's).
pub const DEFAULT_NOISE_STD: f32 = 0.3;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Trigger {
    /// One pixel set to 1.0 in every channel.
    Corner { corner: Corner },
    /// Additive Gaussian noise, clipped to [0, 1] unless `clip` is false.
    Noise { std: f32, clip: bool },
    /// WaNet (Nguyen & Tran 2021): the image resampled through a smooth warping field,
    /// a `control_grid_width`² grid of displacements drawn from `grid_seed`, normalised
    /// to mean magnitude `warping_strength` ([`wanet_grid`]) and upsampled bicubically. With `p_noise`, a
    /// further share of samples gets the field plus per-pixel random warps and keeps its
    /// label (the paper's noise mode).
    Wanet {
        control_grid_width: u32,
        warping_strength: f32,
        grid_rescale: f32,
        p_noise: f32,
        grid_seed: u32,
    },
}

/// The file of a classifier run dir that holds its WaNet control grid: later commands
/// check that their trigger is this one (a different field is a different trigger).
pub const WANET_GRID_FILE: &str = "wanet_grid.safetensors";

/// The largest WaNet control grid (the kernel's uniform holds 2 x 8 x 8 values).
pub const MAX_WANET_GRID: u32 = 8;

/// The WaNet control grid, `[2][k][k]` (x then y displacement; a value f moves a pixel
/// by f/size of the normalised [-1, 1] range, about f/2 pixels): uniform in [-1, 1) from
/// `seed`, divided by its mean magnitude, times `strength` (the upstream HEAD's
/// normalisation).
pub fn wanet_grid(k: u32, strength: f32, seed: u32) -> Vec<f32> {
    let n = 2 * k * k;
    let g: Vec<f64> = (0..n)
        .map(|i| {
            2.0 * rng::rand_unit(rng::rand_u32(seed, rng::STREAM_WANET_GRID, 0, i, 0)) as f64 - 1.0
        })
        .collect();
    let mean = g.iter().map(|v| v.abs()).sum::<f64>() / n as f64;
    g.iter()
        .map(|v| (v / mean * strength as f64) as f32)
        .collect()
}

/// Torch's bicubic convolution weights (A = -0.75) of the 4 taps around fraction `t`.
fn cubic_weights(t: f64) -> [f64; 4] {
    let a = -0.75;
    let near = |x: f64| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// The WaNet sampling position of pixel (row `h`, column `w`) of an H x W image, in
/// pixel coordinates (x, y): identity plus the bicubically upsampled field (align
/// corners), scaled by `rescale` about the centre and clipped to the image; `jitter`
/// (noise mode, each in [-1, 1)) moves it by up to `rescale` pixels more.
pub fn wanet_position(
    grid: &[f32],
    k: usize,
    (h, w): (usize, usize),
    (height, width): (usize, usize),
    rescale: f64,
    jitter: Option<(f64, f64)>,
) -> (f64, f64) {
    let along = |i: usize, n: usize| {
        if n > 1 {
            i as f64 * (k - 1) as f64 / (n - 1) as f64
        } else {
            0.0
        }
    };
    let (u, v) = (along(w, width), along(h, height));
    let (wu, wv) = (cubic_weights(u - u.floor()), cubic_weights(v - v.floor()));
    let tap =
        |base: f64, j: usize| (base.floor() as i64 + j as i64 - 1).clamp(0, k as i64 - 1) as usize;
    let mut field = [0f64; 2];
    for (c, f) in field.iter_mut().enumerate() {
        for (a, wa) in wv.iter().enumerate() {
            for (b, wb) in wu.iter().enumerate() {
                *f += wa * wb * grid[(c * k + tap(v, a)) * k + tap(u, b)] as f64;
            }
        }
    }
    // Normalised coordinates in [-1, 1] (align corners), as grid_sample takes them.
    let norm = |i: usize, n: usize| {
        if n > 1 {
            2.0 * i as f64 / (n - 1) as f64 - 1.0
        } else {
            0.0
        }
    };
    let mut gx = ((norm(w, width) + field[0] / width as f64) * rescale).clamp(-1.0, 1.0);
    let mut gy = ((norm(h, height) + field[1] / height as f64) * rescale).clamp(-1.0, 1.0);
    if let Some((jx, jy)) = jitter {
        gx = (gx + rescale * jx / width as f64).clamp(-1.0, 1.0);
        gy = (gy + rescale * jy / height as f64).clamp(-1.0, 1.0);
    }
    let pixel = |g: f64, n: usize| (g + 1.0) / 2.0 * (n.max(1) - 1) as f64;
    (pixel(gx, width), pixel(gy, height))
}

/// Bilinear sample of channel `ch` of an HWC image at pixel position (x, y) (inside).
pub fn bilinear(
    image: &[f64],
    (height, width, channels): (usize, usize, usize),
    ch: usize,
    (x, y): (f64, f64),
) -> f64 {
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let at = |yy: f64, xx: f64| {
        let (yy, xx) = ((yy as usize).min(height - 1), (xx as usize).min(width - 1));
        image[(yy * width + xx) * channels + ch]
    };
    (1.0 - fy) * ((1.0 - fx) * at(y0, x0) + fx * at(y0, x0 + 1.0))
        + fy * ((1.0 - fx) * at(y0 + 1.0, x0) + fx * at(y0 + 1.0, x0 + 1.0))
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backdoor {
    #[serde(flatten)]
    pub trigger: Trigger,
    /// Probability that a sample is poisoned (coin flip per sample and epoch).
    pub p_backdoor: f32,
    /// Label given to poisoned samples.
    pub target_class: u32,
}

impl Backdoor {
    pub fn validate(&self, num_classes: usize) -> Result<()> {
        if !(0.0..=1.0).contains(&self.p_backdoor) {
            bail!("p_backdoor must be in [0, 1], got {}", self.p_backdoor);
        }
        if self.target_class as usize >= num_classes {
            bail!(
                "target_class {} out of range for {num_classes} classes",
                self.target_class
            );
        }
        if let Trigger::Noise { std, .. } = self.trigger {
            if !(std.is_finite() && std >= 0.0) {
                bail!("noise std must be finite and >= 0, got {std}");
            }
        }
        if let Trigger::Wanet {
            control_grid_width: k,
            warping_strength: s,
            grid_rescale: r,
            p_noise,
            ..
        } = self.trigger
        {
            if !(2..=MAX_WANET_GRID).contains(&k) {
                bail!("wanet control_grid_width must be in 2..={MAX_WANET_GRID}, got {k}");
            }
            if !(s.is_finite() && s >= 0.0) {
                bail!("wanet warping_strength must be finite and >= 0, got {s}");
            }
            if !(r.is_finite() && r > 0.0) {
                bail!("wanet grid_rescale must be finite and > 0, got {r}");
            }
            if !(0.0..=1.0).contains(&p_noise) || p_noise + self.p_backdoor > 1.0 {
                bail!(
                    "wanet p_noise must be in [0, 1] with p_noise + p_backdoor <= 1, got {p_noise} + {}",
                    self.p_backdoor
                );
            }
        }
        Ok(())
    }

    /// The same trigger on every sample (no noise mode): for attack success and anomalies.
    pub fn always(&self) -> Backdoor {
        let trigger = match self.trigger {
            Trigger::Wanet {
                control_grid_width,
                warping_strength,
                grid_rescale,
                grid_seed,
                ..
            } => Trigger::Wanet {
                control_grid_width,
                warping_strength,
                grid_rescale,
                p_noise: 0.0,
                grid_seed,
            },
            t => t,
        };
        Backdoor {
            trigger,
            p_backdoor: 1.0,
            ..*self
        }
    }

    /// The WaNet control grid, if this is a WaNet trigger.
    pub fn wanet_grid(&self) -> Option<(u32, Vec<f32>)> {
        match self.trigger {
            Trigger::Wanet {
                control_grid_width: k,
                warping_strength,
                grid_seed,
                ..
            } => Some((k, wanet_grid(k, warping_strength, grid_seed))),
            _ => None,
        }
    }

    /// Writes a WaNet trigger's control grid into run dir `dir` (nothing otherwise).
    pub fn store_grid(&self, dir: &std::path::Path) -> Result<()> {
        let Some((k, grid)) = self.wanet_grid() else {
            return Ok(());
        };
        let shape = vec![2, k as usize, k as usize];
        let meta = serde_json::to_string(&self.trigger)?;
        let path = dir.join(WANET_GRID_FILE);
        crate::io::write_f32_safetensors(&path, &[("grid".into(), shape, &grid)], "trigger", meta)
    }

    /// Checks that run dir `dir` stores this WaNet trigger's control grid.
    pub fn check_stored_grid(&self, dir: &std::path::Path) -> Result<()> {
        let Some((k, grid)) = self.wanet_grid() else {
            return Ok(());
        };
        let path = dir.join(WANET_GRID_FILE);
        let bytes = std::fs::read(&path).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e}: the run's WaNet control grid is missing",
                path.display()
            )
        })?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: corrupt safetensors file: {e}", path.display()))?;
        let k = k as usize;
        let stored = crate::io::f32_tensor(&st, &path, "grid", Some(&[2, k, k]))?;
        if stored != grid {
            bail!(
                "{}: the stored WaNet control grid is not the run's trigger's (a different \
                 field is a different trigger)",
                path.display()
            );
        }
        Ok(())
    }

    /// The share of samples warped with noise and left unlabelled (WaNet's noise mode).
    fn p_noise(&self) -> f32 {
        match self.trigger {
            Trigger::Wanet { p_noise, .. } => p_noise,
            _ => 0.0,
        }
    }

    /// Whether `sample` is poisoned in `epoch` (the same draw as the shader's): its coin
    /// falls in [p_noise, p_noise + p_backdoor); below p_noise it is noise-warped.
    pub fn is_poisoned(&self, seed: u32, epoch: u32, sample: u32) -> bool {
        let coin = self.coin(seed, epoch, sample);
        coin >= self.p_noise() && coin < self.p_noise() + self.p_backdoor
    }

    fn coin(&self, seed: u32, epoch: u32, sample: u32) -> f32 {
        rng::rand_unit(rng::rand_u32(seed, rng::STREAM_COIN, epoch, sample, 0))
    }

    /// The trigger as the gather kernel takes it, for `height` x `width` images of
    /// `num_classes` classes (checked here).
    pub fn poison(&self, height: usize, width: usize, num_classes: usize) -> Result<Poison> {
        self.validate(num_classes)?;
        let mark = match self.trigger {
            Trigger::Corner { corner } => {
                let (row, col) = corner.pixel(height, width);
                Mark::Pixel { row, col }
            }
            Trigger::Noise { std, clip } => Mark::Noise { std, clip },
            Trigger::Wanet {
                control_grid_width: k,
                warping_strength,
                grid_rescale,
                p_noise,
                grid_seed,
            } => {
                let mut grid = [0f32; 2 * (MAX_WANET_GRID * MAX_WANET_GRID) as usize];
                let g = wanet_grid(k, warping_strength, grid_seed);
                grid[..g.len()].copy_from_slice(&g);
                Mark::Warp {
                    grid_width: k,
                    grid,
                    rescale: grid_rescale,
                    p_noise,
                }
            }
        };
        Ok(Poison {
            mark,
            p: self.p_backdoor,
            target_class: self.target_class,
        })
    }

    /// CPU reference of the shader: poisons one image (values in [0, 1], HWC) of data
    /// set sample `sample` in place and returns the new label.
    pub fn apply_reference(
        &self,
        image: &mut [f64],
        (height, width, channels): (usize, usize, usize),
        label: u32,
        Draw {
            seed,
            epoch,
            sample,
        }: Draw,
    ) -> u32 {
        let noised = self.coin(seed, epoch, sample) < self.p_noise();
        if !noised && !self.is_poisoned(seed, epoch, sample) {
            return label;
        }
        match self.trigger {
            Trigger::Corner { corner } => {
                let (r, c) = corner.pixel(height, width);
                for ch in 0..channels {
                    image[(r * width + c) * channels + ch] = 1.0;
                }
            }
            Trigger::Noise { std, clip } => {
                for (p, v) in image.iter_mut().enumerate() {
                    let h1 = rng::rand_u32(seed, rng::STREAM_NOISE, epoch, sample, 2 * p as u32);
                    let h2 =
                        rng::rand_u32(seed, rng::STREAM_NOISE, epoch, sample, 2 * p as u32 + 1);
                    *v += std as f64 * rng::rand_normal(h1, h2);
                    if clip {
                        *v = v.clamp(0.0, 1.0);
                    }
                }
            }
            Trigger::Wanet {
                control_grid_width: k,
                warping_strength,
                grid_rescale,
                grid_seed,
                ..
            } => {
                let grid = wanet_grid(k, warping_strength, grid_seed);
                let shape = (height, width, channels);
                let source = image.to_vec();
                for h in 0..height {
                    for w in 0..width {
                        let p = (h * width + w) as u32;
                        let jitter = noised.then(|| {
                            let j = |i| {
                                let u = rng::rand_u32(seed, rng::STREAM_NOISE, epoch, sample, i);
                                2.0 * rng::rand_unit(u) as f64 - 1.0
                            };
                            (j(2 * p), j(2 * p + 1))
                        });
                        let at = wanet_position(
                            &grid,
                            k as usize,
                            (h, w),
                            (height, width),
                            grid_rescale as f64,
                            jitter,
                        );
                        for ch in 0..channels {
                            image[(h * width + w) * channels + ch] =
                                bilinear(&source, shape, ch, at);
                        }
                    }
                }
                if noised {
                    return label;
                }
            }
        }
        self.target_class
    }
}

/// CPU reference of the gather kernel: the batch (rows x sample_dim, f64) and labels
/// for `indices`, poisoned with the draws of `seed` in `epoch`.
pub fn batch_reference(
    data: &Dataset,
    indices: &[u32],
    backdoor: Option<&Backdoor>,
    draw: (u32, u32),
) -> (Vec<f64>, Vec<u32>) {
    let (x, labels, _) = augmented_batch_reference(data, indices, None, backdoor, draw);
    (x, labels)
}

/// [`batch_reference`] with training augmentation before the trigger; also which
/// elements are ambiguous (see [`augment_reference`]).
pub fn augmented_batch_reference(
    data: &Dataset,
    indices: &[u32],
    augment: Option<&Augment>,
    backdoor: Option<&Backdoor>,
    (seed, epoch): (u32, u32),
) -> (Vec<f64>, Vec<u32>, Vec<bool>) {
    let shape = (data.height, data.width, data.channels);
    let mut x = Vec::with_capacity(indices.len() * data.sample_dim());
    let mut labels = Vec::with_capacity(indices.len());
    let mut ambiguous = Vec::with_capacity(indices.len() * data.sample_dim());
    for &i in indices {
        let mut img: Vec<f64> = data
            .image(i as usize)
            .iter()
            .map(|&p| p as f64 / 255.0)
            .collect();
        let mut unsure = vec![false; img.len()];
        if let Some(a) = augment {
            let (augmented, pixels) = augment_reference(a, &img, shape, (seed, epoch, i));
            img = augmented;
            for (e, u) in unsure.iter_mut().enumerate() {
                *u = pixels[e / data.channels];
            }
        }
        let mut label = data.labels[i as usize] as u32;
        if let Some(b) = backdoor {
            let draw = Draw {
                seed,
                epoch,
                sample: i,
            };
            label = b.apply_reference(&mut img, shape, label, draw);
        }
        x.extend(img);
        labels.push(label);
        ambiguous.extend(unsure);
    }
    (x, labels, ambiguous)
}
