//! Training augmentations (the later upstream's RandomCrop, RandomRotation and
//! RandomHorizontalFlip): their defaults per data set, their checks, and the f64 CPU
//! reference of what the gather kernel (`shaders/batch.wgsl`) does with them.

use anyhow::{bail, Result};

pub use crate::gpu::batch::Augment;
use crate::rng::{rand_u32, rand_unit, STREAM_AUGMENT};

use super::DatasetName;

impl Augment {
    /// The upstream's defaults (from the WaNet paper): crop p 0.8 with padding 5,
    /// rotation p 0.5 by up to 10°, and for CIFAR-10 a horizontal flip p 0.5.
    pub fn upstream(dataset: DatasetName) -> Self {
        Augment {
            crop_p: 0.8,
            padding: 5,
            rotation_p: 0.5,
            degrees: 10.0,
            flip_p: if dataset == DatasetName::Cifar10 {
                0.5
            } else {
                0.0
            },
        }
    }

    pub fn validate(&self, height: usize, width: usize) -> Result<()> {
        for (name, p) in [
            ("crop_p", self.crop_p),
            ("rotation_p", self.rotation_p),
            ("flip_p", self.flip_p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                bail!("augment.{name} must be in [0, 1], got {p}");
            }
        }
        if self.padding as usize > height.min(width) {
            bail!(
                "augment.padding {} exceeds the {height}x{width} image",
                self.padding
            );
        }
        if !(self.degrees.is_finite() && (0.0..=180.0).contains(&self.degrees)) {
            bail!("augment.degrees must be in [0, 180], got {}", self.degrees);
        }
        Ok(())
    }
}

/// One sample's draws, as the kernel makes them.
struct Draws {
    crop: Option<(i64, i64)>,
    rotation: Option<f64>,
    flip: bool,
}

fn draws(a: &Augment, seed: u32, epoch: u32, sample: u32) -> Draws {
    let u = |k| rand_unit(rand_u32(seed, STREAM_AUGMENT, epoch, sample, k));
    let span = 2 * a.padding + 1;
    let offset = |k| ((u(k) * span as f32) as u32).min(span - 1) as i64;
    Draws {
        crop: (u(0) < a.crop_p).then(|| (offset(1), offset(2))),
        rotation: (u(3) < a.rotation_p)
            .then(|| ((2.0 * u(4) - 1.0) * a.degrees.to_radians()) as f64),
        flip: u(5) < a.flip_p,
    }
}

/// The augmented image of `image` (HWC, `shape` = (height, width, channels)) for
/// (seed, epoch, sample), and which pixels are ambiguous: their rotated source
/// coordinate lies within 1e-3 of a rounding tie, where the kernel's f32 arithmetic may
/// pick the other neighbour.
pub fn augment_reference(
    a: &Augment,
    image: &[f64],
    (height, width, channels): (usize, usize, usize),
    (seed, epoch, sample): (u32, u32, u32),
) -> (Vec<f64>, Vec<bool>) {
    let d = draws(a, seed, epoch, sample);
    let (w, h) = (width as i64, height as i64);
    let mut out = vec![0.0; image.len()];
    let mut ambiguous = vec![false; height * width];
    for y in 0..h {
        for x in 0..w {
            let (mut sx, mut sy) = (if d.flip { w - 1 - x } else { x }, y);
            if let Some(angle) = d.rotation {
                let (cx, cy) = ((w - 1) as f64 / 2.0, (h - 1) as f64 / 2.0);
                let (dx, dy) = (sx as f64 - cx, sy as f64 - cy);
                let fx = angle.cos() * dx - angle.sin() * dy + cx;
                let fy = angle.sin() * dx + angle.cos() * dy + cy;
                let tie = |v: f64| ((v - v.floor()) - 0.5).abs() < 1e-3;
                ambiguous[(y * w + x) as usize] = tie(fx) || tie(fy);
                (sx, sy) = (fx.round_ties_even() as i64, fy.round_ties_even() as i64);
            }
            if let Some((top, left)) = d.crop {
                sx += left - a.padding as i64;
                sy += top - a.padding as i64;
            }
            if sx < 0 || sy < 0 || sx >= w || sy >= h {
                continue;
            }
            for c in 0..channels {
                out[((y * w + x) as usize) * channels + c] =
                    image[((sy * w + sx) as usize) * channels + c];
            }
        }
    }
    (out, ambiguous)
}
