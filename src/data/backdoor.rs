//! Backdoor triggers (data poisoning). The injection itself runs on the GPU in
//! `shaders/batch.wgsl`; this is the configuration and its CPU reference.

use std::str::FromStr;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

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
        Ok(())
    }

    /// Whether `sample` is poisoned in `epoch` (the same draw as the shader's).
    pub fn is_poisoned(&self, seed: u32, epoch: u32, sample: u32) -> bool {
        let h = rng::rand_u32(seed, rng::STREAM_COIN, epoch, sample, 0);
        rng::rand_unit(h) < self.p_backdoor
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
        if !self.is_poisoned(seed, epoch, sample) {
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
    (seed, epoch): (u32, u32),
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
            let draw = Draw {
                seed,
                epoch,
                sample: i,
            };
            label = b.apply_reference(&mut img, shape, label, draw);
        }
        x.extend(img);
        labels.push(label);
    }
    (x, labels)
}
