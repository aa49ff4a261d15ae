//! The abstraction's shapes: the model's activations, the abstract states and the maps
//! between them, and the parameter layout.

use anyhow::{bail, Result};

use super::maps;
use super::{Abstraction, AbstractionKind, OutputLoss};
use crate::gpu::GpuContext;
use crate::model::layers::ParamLayout;
use crate::model::layers::{Shape, Stack};
use crate::model::GpuMlp;

/// Python's round (half to even), at least 1.
pub(super) fn reduced(width: usize, reduction: f64) -> usize {
    let x = width as f64 / reduction;
    let r = x.round();
    let r = if (x - x.trunc() - 0.5).abs() < 1e-12 && r % 2.0 != 0.0 {
        r - 1.0
    } else {
        r
    };
    (r as usize).max(1)
}

impl Abstraction {
    /// Where each map's parameters sit in the flat buffer (the layers exist, so the
    /// maps are known to be valid).
    pub(super) fn layout(&self) -> ParamLayout {
        ParamLayout::for_dims(
            &self
                .layers
                .iter()
                .map(|d| (d.fan_in, d.fan_out))
                .collect::<Vec<_>>(),
        )
    }

    pub(super) fn num_hidden(&self) -> usize {
        self.model.activation_dims().len()
    }

    pub(super) fn pred_dim(&self) -> usize {
        match self.config.output_loss_fn {
            OutputLoss::Kl => self.model.output_dim,
            OutputLoss::SingleClass => 2,
        }
    }

    pub(super) fn axis_aligned(&self) -> bool {
        self.config.abstraction == AbstractionKind::AxisAligned
    }

    /// The model's activations: each conv block's pooled output, then each dense layer.
    pub(super) fn activations(&self) -> Vec<Shape> {
        let convs = self
            .model
            .conv_blocks()
            .into_iter()
            .map(|b| Shape::Spatial {
                height: b.height / 2,
                width: b.width / 2,
                channels: b.out_channels,
            });
        convs
            .chain(self.model.hidden_dims.iter().map(|&d| Shape::Flat(d)))
            .collect()
    }

    /// The abstract states z_l: channels or widths reduced by size_reduction (the
    /// axis-aligned τ keeps them).
    pub(super) fn states(&self) -> Vec<Shape> {
        let reduce = |n: usize| {
            if self.axis_aligned() {
                n
            } else {
                reduced(n, self.config.size_reduction)
            }
        };
        self.activations()
            .into_iter()
            .map(|a| match a {
                Shape::Spatial {
                    height,
                    width,
                    channels,
                } => Shape::Spatial {
                    height,
                    width,
                    channels: reduce(channels),
                },
                Shape::Flat(d) => Shape::Flat(reduce(d)),
            })
            .collect()
    }

    /// Abstract state widths d_l (flattened).
    pub(super) fn widths(&self) -> Vec<usize> {
        self.states().into_iter().map(Shape::width).collect()
    }

    /// τ_0..τ_{L-1}, then m_0..m_{L-1}: each step has the type of the model's step
    /// between the same shapes (conv block, global pool + dense, dense).
    pub(super) fn maps(&self) -> Result<Vec<Stack>> {
        let (acts, z) = (self.activations(), self.states());
        let taus = acts.iter().zip(&z).map(|(&a, &s)| {
            if self.axis_aligned() {
                Ok(maps::gate(a.width()))
            } else {
                maps::between(a, s, false, false)
            }
        });
        let steps = (0..z.len()).map(|j| match z.get(j + 1) {
            Some(&next) => maps::between(z[j], next, true, true),
            None => maps::between(z[j], Shape::Flat(self.pred_dim()), true, false),
        });
        taus.chain(steps).collect()
    }

    /// (fan_in, fan_out) of every map's parameters.
    pub(super) fn dims(&self) -> Result<Vec<(usize, usize)>> {
        Ok(self
            .maps()?
            .into_iter()
            .map(|m| {
                maps::param_layer(&m)
                    .params()
                    .expect("a parameterised layer")
            })
            .collect())
    }

    pub(super) fn layer_names(&self) -> Vec<String> {
        let l = self.num_hidden();
        (0..l)
            .map(|i| format!("tau_{i}"))
            .chain((0..l).map(|i| format!("step_{i}")))
            .collect()
    }

    pub(super) fn check_model(&self, model: &GpuMlp) -> Result<()> {
        if model.config != self.model {
            bail!(
                "the abstraction was trained for the model {:?}, but this model is {:?}: \
                 detector and model do not match",
                self.model,
                model.config
            );
        }
        Ok(())
    }

    /// The largest batch whose buffers each fit one storage binding.
    pub(super) fn max_rows(&self, ctx: &GpuContext) -> Result<usize> {
        let per_sample = self
            .maps()?
            .into_iter()
            .map(|m| m.largest_buffer())
            .chain(self.widths())
            .max()
            .unwrap_or(1);
        let limit = ctx.limits.max_storage_buffer_binding_size as usize;
        Ok((limit / (4 * per_sample.max(1))).max(1))
    }
}
