//! The MLP on the host: configuration, Flax-default initialisation, safetensors
//! storage and an f64 CPU reference of the forward pass.
//!
//! `model.safetensors` holds, for each dense layer `i` (0 = first), `Dense_{i}.kernel`
//! as f32 `[in, out]` (so `y = x @ kernel + bias`, as in Flax) and `Dense_{i}.bias` as
//! f32 `[out]`. Inputs are images flattened in HWC order with values in [0, 1]. The
//! metadata key `cupbearer.model` holds the [`MlpConfig`] as JSON.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::rng;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlpConfig {
    /// (height, width, channels) of the input images.
    pub input_shape: [usize; 3],
    pub hidden_dims: Vec<usize>,
    pub output_dim: usize,
}

impl MlpConfig {
    pub fn input_dim(&self) -> usize {
        self.input_shape.iter().product()
    }

    /// (fan_in, fan_out) of every dense layer, input to output.
    pub fn layer_dims(&self) -> Vec<(usize, usize)> {
        let mut dims = vec![self.input_dim()];
        dims.extend(&self.hidden_dims);
        dims.push(self.output_dim);
        dims.windows(2).map(|w| (w[0], w[1])).collect()
    }

    pub fn validate(&self) -> Result<()> {
        if self.input_dim() == 0 || self.output_dim == 0 || self.hidden_dims.contains(&0) {
            bail!("every layer of the MLP needs a width >= 1, got {self:?}");
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    pub fan_in: usize,
    pub fan_out: usize,
    /// Row-major `[fan_in][fan_out]`.
    pub kernel: Vec<f32>,
    pub bias: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Mlp {
    pub config: MlpConfig,
    pub layers: Vec<Dense>,
}

const METADATA_KEY: &str = "cupbearer.model";
/// Flax's `lecun_normal` is a truncated normal on [-2, 2] rescaled to unit variance.
const TRUNCATED_NORMAL_STD: f64 = 0.879_625_661_034_239_8;

impl Mlp {
    /// LeCun-normal kernels and zero biases (Flax's `Dense` defaults), seeded.
    pub fn init(config: &MlpConfig, seed: u32) -> Result<Self> {
        config.validate()?;
        let layers = config
            .layer_dims()
            .into_iter()
            .enumerate()
            .map(|(l, (fan_in, fan_out))| Dense::lecun(fan_in, fan_out, seed, l as u32))
            .collect();
        Ok(Mlp {
            config: config.clone(),
            layers,
        })
    }

    pub fn num_params(&self) -> usize {
        self.layers
            .iter()
            .map(|d| d.kernel.len() + d.bias.len())
            .sum()
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let named: Vec<(String, &Dense)> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("Dense_{i}"), d))
            .collect();
        save_dense_layers(
            path,
            &named,
            METADATA_KEY,
            serde_json::to_string(&self.config)?,
        )
    }

    /// Loads and checks every tensor's presence, dtype and shape against the metadata.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let config: MlpConfig =
            crate::io::safetensors_metadata(&bytes, path, METADATA_KEY, "a cupbearer MLP")?;
        config.validate()?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: corrupt safetensors file", path.display()))?;
        let layers = config
            .layer_dims()
            .into_iter()
            .enumerate()
            .map(|(i, (fan_in, fan_out))| {
                load_dense_layer(&st, path, &format!("Dense_{i}"), fan_in, fan_out)
            })
            .collect::<Result<_>>()?;
        Ok(Mlp { config, layers })
    }

    /// f64 forward pass of `rows` inputs: (post-ReLU hidden activations, logits).
    pub fn forward_reference(&self, x: &[f64], rows: usize) -> (Vec<Vec<f64>>, Vec<f64>) {
        let mut hidden = Vec::new();
        let mut h = x.to_vec();
        for (l, d) in self.layers.iter().enumerate() {
            let last = l + 1 == self.layers.len();
            h = d.forward_reference(&h, rows, !last);
            if !last {
                hidden.push(h.clone());
            }
        }
        (hidden, h)
    }
}

impl Dense {
    /// A LeCun-normal kernel and a zero bias (Flax's `Dense` default); `layer` keys
    /// the seeded draws.
    pub fn lecun(fan_in: usize, fan_out: usize, seed: u32, layer: u32) -> Dense {
        let std = (1.0 / fan_in as f64).sqrt() / TRUNCATED_NORMAL_STD;
        let kernel = (0..fan_in * fan_out)
            .map(|i| {
                // Rejection sampling of the truncated normal; attempt = counter.
                (0u32..)
                    .map(|attempt| {
                        let h = |c| rng::rand_u32(seed, rng::STREAM_INIT, layer, i as u32, c);
                        rng::rand_normal(h(2 * attempt), h(2 * attempt + 1))
                    })
                    .find(|z| z.abs() <= 2.0)
                    .map(|z| (z * std) as f32)
                    .unwrap_or(0.0)
            })
            .collect();
        Dense {
            fan_in,
            fan_out,
            kernel,
            bias: vec![0.0; fan_out],
        }
    }

    /// f64 `x · kernel + bias` of `rows` inputs, optionally through a ReLU.
    pub fn forward_reference(&self, x: &[f64], rows: usize, relu: bool) -> Vec<f64> {
        let mut z = vec![0f64; rows * self.fan_out];
        for r in 0..rows {
            for o in 0..self.fan_out {
                let mut s = self.bias[o] as f64;
                for i in 0..self.fan_in {
                    s += x[r * self.fan_in + i] * self.kernel[i * self.fan_out + o] as f64;
                }
                z[r * self.fan_out + o] = if relu { s.max(0.0) } else { s };
            }
        }
        z
    }
}

/// Writes dense layers as `{name}.kernel` (f32 `[fan_in, fan_out]`) and `{name}.bias`
/// (f32 `[fan_out]`) tensors, with `meta` (JSON) under metadata key `key`.
pub fn save_dense_layers(
    path: &Path,
    layers: &[(String, &Dense)],
    key: &str,
    meta: String,
) -> Result<()> {
    let names: Vec<(String, String)> = layers
        .iter()
        .map(|(n, _)| (format!("{n}.kernel"), format!("{n}.bias")))
        .collect();
    let mut views = Vec::new();
    for ((_, d), (kn, bn)) in layers.iter().zip(&names) {
        let k = TensorView::new(
            Dtype::F32,
            vec![d.fan_in, d.fan_out],
            bytemuck::cast_slice(&d.kernel),
        )?;
        let b = TensorView::new(Dtype::F32, vec![d.fan_out], bytemuck::cast_slice(&d.bias))?;
        views.push((kn.as_str(), k));
        views.push((bn.as_str(), b));
    }
    let metadata = HashMap::from([(key.to_string(), meta)]);
    crate::io::write_atomic(path, &safetensors::serialize(views, Some(metadata))?)
}

/// Reads dense layer `name` (see [`save_dense_layers`]), checking dtypes and shapes.
pub fn load_dense_layer(
    st: &SafeTensors<'_>,
    path: &Path,
    name: &str,
    fan_in: usize,
    fan_out: usize,
) -> Result<Dense> {
    let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let t = crate::io::checked_tensor(st, path, name, Dtype::F32)?;
        if t.shape() != shape {
            bail!(
                "{}: tensor {name} has shape {:?}, expected {shape:?}",
                path.display(),
                t.shape()
            );
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    Ok(Dense {
        fan_in,
        fan_out,
        kernel: tensor(&format!("{name}.kernel"), &[fan_in, fan_out])?,
        bias: tensor(&format!("{name}.bias"), &[fan_out])?,
    })
}
