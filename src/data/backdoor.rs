//! Backdoor triggers (data poisoning). The injection itself runs on the GPU in
//! `shaders/batch.wgsl`; this is the configuration and its CPU reference.

use std::str::FromStr;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Corner {
    TopLeft,
    TopRight,
    BottomLeft,
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

    /// CPU reference of the shader: poisons one image (values in [0, 1], HWC) in place
    /// and returns the new label.
    #[allow(clippy::too_many_arguments)]
    pub fn apply_reference(
        &self,
        image: &mut [f64],
        (height, width, channels): (usize, usize, usize),
        label: u32,
        seed: u32,
        epoch: u32,
        sample: u32,
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
