//! The classifier on the host: configuration, Flax-default initialisation,
//! safetensors storage and an f64 CPU reference of the forward pass.
//!
//! The model is an MLP, optionally preceded by convolution blocks (the original's CNN):
//! per conv block a 3x3 SAME convolution, ReLU and 2x2 max pool; then a global max pool
//! over height and width; then dense layers with ReLU and a linear output.
//!
//! `model.safetensors` holds, for each conv block `i`, `Conv_{i}.kernel` as f32
//! `[3, 3, in, out]` (HWIO, as in Flax) and `Conv_{i}.bias` `[out]`; for each dense layer
//! `i` (0 = first), `Dense_{i}.kernel` as f32 `[in, out]` (so `y = x @ kernel + bias`)
//! and `Dense_{i}.bias` `[out]`. Inputs are images flattened in HWC order with values in
//! [0, 1]. The metadata key `cupbearer.model` holds the [`MlpConfig`] as JSON.

use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::SafeTensors;
use serde::{Deserialize, Serialize};

use super::layers::{Layer, Shape, Stack};
use crate::rng;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlpConfig {
    /// (height, width, channels) of the input images.
    pub input_shape: [usize; 3],
    /// Output channels of the conv blocks (empty for an MLP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conv_channels: Vec<usize>,
    /// Widths of the hidden dense layers.
    pub hidden_dims: Vec<usize>,
    pub output_dim: usize,
}

/// A layer whose activations detectors read ([`MlpConfig::activation_layers`]); in a
/// workspace they are `rows x width()` values, row-major (HWC within a row).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivationLayer {
    pub index: usize,
    pub name: String,
    /// Per sample: `[h, w, c]` for a conv block, `[d]` for a dense layer.
    pub shape: Vec<usize>,
}

impl ActivationLayer {
    pub fn width(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One conv block's input: (height, width, channels), and its output channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvBlock {
    pub height: usize,
    pub width: usize,
    pub in_channels: usize,
    pub out_channels: usize,
}

impl ConvBlock {
    /// Flattened size of the block's output (after pooling), per sample.
    pub fn pooled_dim(&self) -> usize {
        (self.height / 2) * (self.width / 2) * self.out_channels
    }
}

impl MlpConfig {
    pub fn input_dim(&self) -> usize {
        self.input_shape.iter().product()
    }

    pub fn is_cnn(&self) -> bool {
        !self.conv_channels.is_empty()
    }

    /// The conv blocks, input to output.
    pub fn conv_blocks(&self) -> Vec<ConvBlock> {
        let [mut h, mut w, mut c] = self.input_shape;
        self.conv_channels
            .iter()
            .map(|&out| {
                let block = ConvBlock {
                    height: h,
                    width: w,
                    in_channels: c,
                    out_channels: out,
                };
                (h, w, c) = (h / 2, w / 2, out);
                block
            })
            .collect()
    }

    /// Input width of the first dense layer: the image, or the global max pool of the
    /// last conv block's channels.
    pub fn dense_input_dim(&self) -> usize {
        self.conv_channels
            .last()
            .copied()
            .unwrap_or_else(|| self.input_dim())
    }

    /// (fan_in, fan_out) of every parameterised layer, input to output; a conv
    /// layer's kernel is `[9·in, out]` (the HWIO kernel flattened).
    pub fn layer_dims(&self) -> Vec<(usize, usize)> {
        let convs = self
            .conv_blocks()
            .into_iter()
            .map(|b| (9 * b.in_channels, b.out_channels));
        let mut dims = vec![self.dense_input_dim()];
        dims.extend(&self.hidden_dims);
        dims.push(self.output_dim);
        convs.chain(dims.windows(2).map(|w| (w[0], w[1]))).collect()
    }

    /// The network as a [`Stack`]: per conv block a 3x3 conv with ReLU and a 2x2 max
    /// pool, then (after conv blocks) a global max pool, then the dense layers, ReLU on
    /// all but the last. Its parameterised layers are [`MlpConfig::layer_dims`].
    pub fn stack(&self) -> Stack {
        let mut layers = Vec::new();
        for b in self.conv_blocks() {
            let input = Shape::Spatial {
                height: b.height,
                width: b.width,
                channels: b.in_channels,
            };
            let conv = Layer::Conv {
                input,
                out_channels: b.out_channels,
                relu: true,
            };
            layers.push(conv);
            layers.push(Layer::MaxPool {
                input: conv.output(),
            });
        }
        if let Some(&pool) = layers.last() {
            layers.push(Layer::GlobalMaxPool {
                input: pool.output(),
            });
        }
        let n = self.conv_channels.len();
        let dense = &self.layer_dims()[n..];
        for (l, &(fan_in, fan_out)) in dense.iter().enumerate() {
            layers.push(Layer::Dense {
                fan_in,
                fan_out,
                relu: l + 1 < dense.len(),
            });
        }
        Stack::new(layers)
    }

    /// Indices into [`MlpConfig::stack`] of the layers whose outputs are the
    /// [`MlpConfig::activation_layers`]: the max pools and the hidden dense layers.
    pub fn activation_positions(&self) -> Vec<usize> {
        let stack = self.stack();
        let last = stack.layers.len() - 1;
        (0..last)
            .filter(|&i| matches!(stack.layers[i], Layer::MaxPool { .. } | Layer::Dense { .. }))
            .collect()
    }

    /// Widths of the activations detectors see: each conv block's pooled output
    /// (flattened HWC), then each hidden dense layer (post-ReLU).
    pub fn activation_dims(&self) -> Vec<usize> {
        self.conv_blocks()
            .iter()
            .map(ConvBlock::pooled_dim)
            .chain(self.hidden_dims.iter().copied())
            .collect()
    }

    /// The layers detectors read, named `layer{i}` in [`MlpConfig::activation_dims`]
    /// order: each conv block's pooled output `[h, w, c]`, then each hidden dense
    /// layer's post-ReLU output `[d]`.
    pub fn activation_layers(&self) -> Vec<ActivationLayer> {
        let convs = self
            .conv_blocks()
            .iter()
            .map(|b| vec![b.height / 2, b.width / 2, b.out_channels])
            .collect::<Vec<_>>();
        let dense = self.hidden_dims.iter().map(|&d| vec![d]);
        convs
            .into_iter()
            .chain(dense)
            .enumerate()
            .map(|(index, shape)| ActivationLayer {
                index,
                name: format!("layer{index}"),
                shape,
            })
            .collect()
    }

    /// Safetensors names and kernel shapes of [`MlpConfig::layer_dims`].
    pub fn layer_names(&self) -> Vec<(String, Vec<usize>)> {
        let convs = self.conv_blocks().into_iter().enumerate().map(|(i, b)| {
            (
                format!("Conv_{i}"),
                vec![3, 3, b.in_channels, b.out_channels],
            )
        });
        let n = self.conv_channels.len();
        let dense = self.layer_dims()[n..]
            .iter()
            .enumerate()
            .map(|(i, &(fan_in, fan_out))| (format!("Dense_{i}"), vec![fan_in, fan_out]))
            .collect::<Vec<_>>();
        convs.chain(dense).collect()
    }

    pub fn validate(&self) -> Result<()> {
        if self.input_dim() == 0
            || self.output_dim == 0
            || self.hidden_dims.contains(&0)
            || self.conv_channels.contains(&0)
        {
            bail!("every layer of the model needs a width >= 1, got {self:?}");
        }
        if let Some(b) = self
            .conv_blocks()
            .iter()
            .find(|b| b.height < 2 || b.width < 2)
        {
            bail!(
                "a conv block's 2x2 max pool needs an input of at least 2x2, got {}x{} \
                 (too many conv blocks for {:?} images)",
                b.height,
                b.width,
                self.input_shape
            );
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
        let named: Vec<(String, Vec<usize>, &Dense)> = self
            .config
            .layer_names()
            .into_iter()
            .zip(&self.layers)
            .map(|((name, shape), d)| (name, shape, d))
            .collect();
        save_layers(
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
            .layer_names()
            .into_iter()
            .zip(config.layer_dims())
            .map(|((name, shape), (fan_in, fan_out))| {
                load_layer(&st, path, &name, &shape, fan_in, fan_out)
            })
            .collect::<Result<_>>()?;
        Ok(Mlp { config, layers })
    }

    /// f64 forward pass of `rows` inputs: (the activations of
    /// [`MlpConfig::activation_dims`], logits).
    pub fn forward_reference(&self, x: &[f64], rows: usize) -> (Vec<Vec<f64>>, Vec<f64>) {
        let mut outs = self
            .config
            .stack()
            .reference(&self.layers, x, rows)
            .expect("a model has every layer's parameters");
        let logits = outs.pop().unwrap_or_default();
        let activations = self
            .config
            .activation_positions()
            .into_iter()
            .map(|i| std::mem::take(&mut outs[i]))
            .collect();
        (activations, logits)
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

/// Writes layers as `{name}.kernel` (f32 of the given kernel shape, e.g. `[fan_in,
/// fan_out]` or HWIO) and `{name}.bias` (f32 `[fan_out]`) tensors, with `meta` (JSON)
/// under metadata key `key`.
pub fn save_layers(
    path: &Path,
    layers: &[(String, Vec<usize>, &Dense)],
    key: &str,
    meta: String,
) -> Result<()> {
    let tensors: Vec<crate::io::F32Tensor<'_>> = layers
        .iter()
        .flat_map(|(n, shape, d)| {
            [
                (format!("{n}.kernel"), shape.clone(), d.kernel.as_slice()),
                (format!("{n}.bias"), vec![d.fan_out], d.bias.as_slice()),
            ]
        })
        .collect();
    crate::io::write_f32_safetensors(path, &tensors, key, meta)
}

/// Reads layer `name` (see [`save_layers`]), checking dtypes and shapes.
pub fn load_layer(
    st: &SafeTensors<'_>,
    path: &Path,
    name: &str,
    kernel_shape: &[usize],
    fan_in: usize,
    fan_out: usize,
) -> Result<Dense> {
    let tensor = |name: &str, shape: &[usize]| crate::io::f32_tensor(st, path, name, Some(shape));
    Ok(Dense {
        fan_in,
        fan_out,
        kernel: tensor(&format!("{name}.kernel"), kernel_shape)?,
        bias: tensor(&format!("{name}.bias"), &[fan_out])?,
    })
}
