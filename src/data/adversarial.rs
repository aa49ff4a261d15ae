//! Stored adversarial examples: `RUN/adv_examples.safetensors` holds `adv_examples`
//! (f32 `[N, H, W, C]`, pixels in [0, 1]), `labels` (i64 `[N]`, the true labels) and
//! `source_indices` (i64 `[N]`, which sample of the source split each one perturbs);
//! metadata key `cupbearer.adversarial` holds [`AdversarialMeta`] as JSON. The file
//! loads with `safetensors.numpy.load_file` / `safetensors.torch.load_file`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use super::{DatasetName, Split};
use crate::io::{checked_tensor, write_atomic};

const METADATA_KEY: &str = "cupbearer.adversarial";

/// Where the examples came from and how they were made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdversarialMeta {
    pub dataset: DatasetName,
    pub split: Split,
    pub num_classes: usize,
    /// The attack's configuration (see `model::attack::AttackConfig`).
    pub attack: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdversarialExamples {
    pub meta: AdversarialMeta,
    /// (height, width, channels).
    pub shape: [usize; 3],
    /// `len() * H * W * C` values.
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    pub source_indices: Vec<u32>,
}

impl AdversarialExamples {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn sample_dim(&self) -> usize {
        self.shape.iter().product()
    }

    /// Keeps the examples for which `keep(i)` holds, in order.
    pub fn retain(&mut self, keep: impl Fn(usize) -> bool) {
        let d = self.sample_dim();
        let kept: Vec<usize> = (0..self.len()).filter(|&i| keep(i)).collect();
        self.images = kept
            .iter()
            .flat_map(|&i| self.images[i * d..(i + 1) * d].iter().copied())
            .collect();
        self.labels = kept.iter().map(|&i| self.labels[i]).collect();
        self.source_indices = kept.iter().map(|&i| self.source_indices[i]).collect();
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let n = self.len();
        let [h, w, c] = self.shape;
        let as_i64 =
            |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect() };
        let (labels, sources) = (as_i64(&self.labels), as_i64(&self.source_indices));
        let views = vec![
            (
                "adv_examples",
                TensorView::new(
                    Dtype::F32,
                    vec![n, h, w, c],
                    bytemuck::cast_slice(&self.images),
                )?,
            ),
            ("labels", TensorView::new(Dtype::I64, vec![n], &labels)?),
            (
                "source_indices",
                TensorView::new(Dtype::I64, vec![n], &sources)?,
            ),
        ];
        let metadata =
            HashMap::from([(METADATA_KEY.to_string(), serde_json::to_string(&self.meta)?)]);
        write_atomic(path, &safetensors::serialize(views, Some(metadata))?)
    }

    /// Loads and checks shapes, dtypes, label range and pixel range.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let meta: AdversarialMeta = crate::io::safetensors_metadata(
            &bytes,
            path,
            METADATA_KEY,
            "written by make-adversarial-examples",
        )?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: corrupt safetensors file", path.display()))?;
        let images = checked_tensor(&st, path, "adv_examples", Dtype::F32)?;
        let &[n, h, w, c] = images.shape() else {
            bail!(
                "{}: adv_examples has shape {:?}, expected [N, H, W, C]",
                path.display(),
                images.shape()
            );
        };
        let ints = |name: &str| -> Result<Vec<u32>> {
            let t = checked_tensor(&st, path, name, Dtype::I64)?;
            if t.shape() != [n] {
                bail!(
                    "{}: {name} has shape {:?}, expected [{n}]",
                    path.display(),
                    t.shape()
                );
            }
            t.data()
                .chunks_exact(8)
                .map(|b| {
                    let v = i64::from_le_bytes(b.try_into().expect("8-byte chunk"));
                    u32::try_from(v).with_context(|| {
                        format!("{}: {name} value {v} out of range", path.display())
                    })
                })
                .collect()
        };
        let labels = ints("labels")?;
        let source_indices = ints("source_indices")?;
        if let Some(&l) = labels.iter().find(|&&l| l as usize >= meta.num_classes) {
            bail!(
                "{}: label {l} out of range 0..{}",
                path.display(),
                meta.num_classes
            );
        }
        let images: Vec<f32> = images
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4-byte chunk")))
            .collect();
        if let Some(v) = images.iter().find(|v| !(0.0..=1.0).contains(*v)) {
            bail!("{}: pixel value {v} outside [0, 1]", path.display());
        }
        Ok(AdversarialExamples {
            meta,
            shape: [h, w, c],
            images,
            labels,
            source_indices,
        })
    }
}
