//! Classifiers trained elsewhere: a safetensors state dict in PyTorch naming and layout
//! (`nn.Sequential`, or the later upstream's `MLP` / `CNN` modules, optionally under a
//! Lightning `model.` prefix) or in ours (Flax's `Dense_i` / `Conv_i`), in f32, f16, bf16
//! or f64, read into an [`Mlp`]. Supported: 3x3 SAME convolutions (each followed by
//! ReLU and a 2x2 max pool, then a global max pool: the original's CNN) and dense layers
//! with ReLU between them, every layer with a bias.

use std::cmp::Ordering;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::mlp::{Dense, Mlp, MlpConfig};
pub use crate::io::tensor_f32;

/// The naming and layout of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `<module>.weight` `[out, in]` / conv `[out, in, 3, 3]`, `<module>.bias`.
    Pytorch,
    /// `Dense_i.kernel` `[in, out]`, `Conv_i.kernel` `[3, 3, in, out]` (ours).
    Flax,
}

/// How the checkpoint's first dense layer of an MLP flattens an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputLayout {
    /// Channels first (PyTorch's `ToTensor` then `view`).
    Chw,
    /// Channels last (ours, Flax's).
    Hwc,
}

/// What the importer needs besides the file.
#[derive(Clone, Copy, Debug)]
pub struct ImportOptions {
    /// (height, width, channels) of the model's inputs.
    pub input_shape: [usize; 3],
    /// None: CHW for PyTorch checkpoints, HWC for Flax ones.
    pub input_layout: Option<InputLayout>,
}

/// An imported model and how it was read.
pub struct Imported {
    pub mlp: Mlp,
    pub layout: Layout,
    pub input_layout: InputLayout,
    /// The tensors read, in layer order.
    pub tensors: Vec<String>,
}

/// Orders module paths by their dot-separated parts, numbers numerically
/// (`layers.linear_2` < `layers.linear_10`, `0` < `2` < `10`).
fn natural(a: &str, b: &str) -> Ordering {
    fn key(s: &str) -> Vec<(String, u64)> {
        s.split(['.', '_'])
            .map(|p| match p.parse::<u64>() {
                Ok(n) => (String::new(), n),
                Err(_) => (p.to_string(), 0),
            })
            .collect()
    }
    key(a).cmp(&key(b))
}

/// One parameterised layer as found in the file.
struct Found {
    /// The module path (or Flax layer name).
    module: String,
    conv: bool,
    /// Ours: `[fan_in][fan_out]` (conv: HWIO flattened).
    dense: Dense,
}

/// Tensor names with any leading `model.` / `module.` (Lightning, DataParallel) removed.
fn strip(name: &str) -> &str {
    let mut n = name;
    while let Some(rest) = n
        .strip_prefix("model.")
        .or_else(|| n.strip_prefix("module."))
    {
        n = rest;
    }
    n
}

fn pytorch_layers(st: &SafeTensors<'_>, path: &Path) -> Result<Vec<Found>> {
    let mut modules: Vec<String> = Vec::new();
    for name in st.names() {
        let stripped = strip(name);
        let Some(module) = stripped
            .strip_suffix(".weight")
            .or_else(|| stripped.strip_suffix(".bias"))
        else {
            bail!(
                "{}: unsupported tensor {name}: only Linear and Conv2d layers (weight and bias) \
                 can be imported, not e.g. BatchNorm statistics or embeddings",
                path.display()
            );
        };
        if !modules.iter().any(|m| m == module) {
            modules.push(module.to_string());
        }
    }
    modules.sort_by(|a, b| natural(a, b));
    let full = |suffix: &str, module: &str| -> Option<String> {
        st.names()
            .into_iter()
            .find(|n| strip(n) == format!("{module}.{suffix}"))
            .map(str::to_string)
    };
    modules
        .iter()
        .map(|module| {
            let weight = full("weight", module)
                .with_context(|| format!("{}: {module}.bias has no {module}.weight", path.display()))?;
            let bias = full("bias", module).with_context(|| {
                format!(
                    "{}: {weight} has no bias ({module}.bias): layers without a bias are not supported",
                    path.display()
                )
            })?;
            let w = st.tensor(&weight)?;
            let b = st.tensor(&bias)?;
            let values = tensor_f32(&w, path, &weight)?;
            let bias_values = tensor_f32(&b, path, &bias)?;
            let (conv, fan_in, fan_out, kernel) = match *w.shape() {
                [out, inp] => {
                    // [out][in] -> [in][out].
                    let k = (0..inp * out).map(|i| values[(i % out) * inp + i / out]).collect();
                    (false, inp, out, k)
                }
                [out, inp, 3, 3] => {
                    // [out][in][kh][kw] -> [kh][kw][in][out].
                    let k = (0..9 * inp * out)
                        .map(|i| {
                            let (o, rest) = (i % out, i / out);
                            let (c, khw) = (rest % inp, rest / inp);
                            values[(o * inp + c) * 9 + khw]
                        })
                        .collect();
                    (true, 9 * inp, out, k)
                }
                [_, _, kh, kw] => bail!(
                    "{}: {weight} is a {kh}x{kw} convolution; only 3x3 (SAME, stride 1) are supported",
                    path.display()
                ),
                ref shape => bail!(
                    "{}: {weight} has shape {shape:?}: not a Linear [out, in] or Conv2d \
                     [out, in, 3, 3] weight",
                    path.display()
                ),
            };
            if b.shape() != [fan_out] {
                bail!(
                    "{}: {bias} has shape {:?}, expected [{fan_out}] for {weight}",
                    path.display(),
                    b.shape()
                );
            }
            Ok(Found {
                module: module.clone(),
                conv,
                dense: Dense {
                    fan_in,
                    fan_out,
                    kernel,
                    bias: bias_values,
                },
            })
        })
        .collect()
}

fn flax_layers(st: &SafeTensors<'_>, path: &Path) -> Result<Vec<Found>> {
    let mut found = Vec::new();
    for (prefix, conv) in [("Conv", true), ("Dense", false)] {
        for i in 0.. {
            let module = format!("{prefix}_{i}");
            let (k, b) = (format!("{module}.kernel"), format!("{module}.bias"));
            let Ok(kv) = st.tensor(&k) else { break };
            let bv = st
                .tensor(&b)
                .with_context(|| format!("{}: {k} has no bias ({b})", path.display()))?;
            let (fan_in, fan_out) = match (conv, kv.shape()) {
                (true, &[3, 3, inp, out]) => (9 * inp, out),
                (false, &[inp, out]) => (inp, out),
                (_, shape) => bail!(
                    "{}: {k} has shape {shape:?}, expected {}",
                    path.display(),
                    if conv { "[3, 3, in, out]" } else { "[in, out]" }
                ),
            };
            if bv.shape() != [fan_out] {
                bail!(
                    "{}: {b} has shape {:?}, expected [{fan_out}]",
                    path.display(),
                    bv.shape()
                );
            }
            found.push(Found {
                module,
                conv,
                dense: Dense {
                    fan_in,
                    fan_out,
                    kernel: tensor_f32(&kv, path, &k)?,
                    bias: tensor_f32(&bv, path, &b)?,
                },
            });
        }
    }
    let used = 2 * found.len();
    if let Some(extra) = st.names().into_iter().find(|n| {
        !found
            .iter()
            .any(|f| **n == format!("{}.kernel", f.module) || **n == format!("{}.bias", f.module))
    }) {
        bail!(
            "{}: unexpected tensor {extra} in a Flax-style checkpoint (read {used} tensors of \
             Conv_i / Dense_i, numbered from 0 without gaps)",
            path.display()
        );
    }
    Ok(found)
}

/// Reads the checkpoint at `path` into a model.
pub fn import_checkpoint(path: &Path, opts: &ImportOptions) -> Result<Imported> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    if st.names().is_empty() {
        bail!("{}: no tensors", path.display());
    }
    let flax = st
        .names()
        .iter()
        .any(|n| n.starts_with("Dense_") || n.starts_with("Conv_"));
    let (layout, found) = if flax {
        (Layout::Flax, flax_layers(&st, path)?)
    } else {
        (Layout::Pytorch, pytorch_layers(&st, path)?)
    };
    let input_layout = opts.input_layout.unwrap_or(match layout {
        Layout::Pytorch => InputLayout::Chw,
        Layout::Flax => InputLayout::Hwc,
    });
    let convs = found.iter().take_while(|f| f.conv).count();
    if let Some(late) = found[convs..].iter().find(|f| f.conv) {
        bail!(
            "{}: convolution {} comes after a dense layer; supported are convolutions first, \
             then dense layers",
            path.display(),
            late.module
        );
    }
    if convs == found.len() {
        bail!(
            "{}: no dense layer: the model needs a linear output layer",
            path.display()
        );
    }
    let [h, w, c] = opts.input_shape;
    // Each layer's expected fan-in, checked as the layers chain.
    let mut expected = if convs > 0 { 9 * c } else { h * w * c };
    for (i, f) in found.iter().enumerate() {
        if i == convs && convs > 0 {
            // After the global max pool: the last conv's channels.
            expected = found[i - 1].dense.fan_out;
        }
        if f.dense.fan_in != expected {
            let want = if f.conv { expected / 9 } else { expected };
            let what = match (i, f.conv) {
                (0, true) => format!("the input's {c} channels"),
                (0, false) => format!("the input's {h}x{w}x{c} = {} values", h * w * c),
                _ => format!(
                    "{}'s {} outputs",
                    found[i - 1].module,
                    found[i - 1].dense.fan_out
                ),
            };
            let got = if f.conv {
                f.dense.fan_in / 9
            } else {
                f.dense.fan_in
            };
            bail!(
                "{}: {} takes {got} inputs but follows {what} (expected {want}): the layers do \
                 not chain (wrong --input_shape, or a layer this importer does not know)",
                path.display(),
                f.module
            );
        }
        expected = if f.conv {
            9 * f.dense.fan_out
        } else {
            f.dense.fan_out
        };
    }
    let mut layers: Vec<Dense> = found.iter().map(|f| f.dense.clone()).collect();
    if convs == 0 && input_layout == InputLayout::Chw && c > 1 {
        // Our images are flattened HWC: row (y, x, ch) of ours is row (ch, y, x) of theirs.
        let first = &mut layers[0];
        let out = first.fan_out;
        let theirs = first.kernel.clone();
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    let ours = (y * w + x) * c + ch;
                    let src = (ch * h + y) * w + x;
                    first.kernel[ours * out..(ours + 1) * out]
                        .copy_from_slice(&theirs[src * out..(src + 1) * out]);
                }
            }
        }
    }
    let dense_outs: Vec<usize> = found[convs..].iter().map(|f| f.dense.fan_out).collect();
    let config = MlpConfig {
        input_shape: opts.input_shape,
        conv_channels: found[..convs].iter().map(|f| f.dense.fan_out).collect(),
        hidden_dims: dense_outs[..dense_outs.len() - 1].to_vec(),
        output_dim: *dense_outs.last().expect("a dense layer"),
    };
    config.validate()?;
    let tensors = found
        .iter()
        .flat_map(|f| {
            let (k, b) = match layout {
                Layout::Pytorch => ("weight", "bias"),
                Layout::Flax => ("kernel", "bias"),
            };
            [format!("{}.{k}", f.module), format!("{}.{b}", f.module)]
        })
        .collect();
    Ok(Imported {
        mlp: Mlp { config, layers },
        layout,
        input_layout,
        tensors,
    })
}
