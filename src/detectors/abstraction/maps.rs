//! The abstraction detector's learned maps, built from the model's layer library: each
//! τ and each abstract computational step is a small [`Stack`] with one parameterised
//! layer. A CNN's conv activations get conv maps, as in cupbearer 0.0.1: τ = a 3x3 SAME
//! conv to fewer channels, a step between conv states = conv + ReLU + 2x2 max pool, the
//! step into the first dense state = global max pool + dense + ReLU.

use anyhow::{bail, Result};

use crate::model::layers::{Layer, Shape, Stack};

/// The map from `input` to `output`, as the model's own step between those shapes
/// would be (`step`), or as a τ (conv to fewer channels without ReLU/pool, affine).
pub(crate) fn between(input: Shape, output: Shape, step: bool, relu: bool) -> Result<Stack> {
    let layers = match (input, output) {
        (Shape::Spatial { .. }, Shape::Spatial { channels, .. }) => {
            let conv = Layer::Conv {
                input,
                out_channels: channels,
                relu: step,
            };
            if step {
                vec![
                    conv,
                    Layer::MaxPool {
                        input: conv.output(),
                    },
                ]
            } else {
                vec![conv]
            }
        }
        (Shape::Spatial { .. }, Shape::Flat(fan_out)) => vec![
            Layer::GlobalMaxPool { input },
            Layer::Dense {
                fan_in: input.channels(),
                fan_out,
                relu,
            },
        ],
        (Shape::Flat(fan_in), Shape::Flat(fan_out)) => vec![Layer::Dense {
            fan_in,
            fan_out,
            relu,
        }],
        (Shape::Flat(_), Shape::Spatial { .. }) => {
            bail!("no abstract map from a flat state to a spatial one")
        }
    };
    Ok(Stack::new(layers))
}

/// The axis-aligned τ: an elementwise gate of the full width.
pub(crate) fn gate(width: usize) -> Stack {
    Stack::new(vec![Layer::Gate { width }])
}

/// A map's parameterised layer (each map has exactly one).
pub(crate) fn param_layer(map: &Stack) -> Layer {
    map.param_layers()
        .next()
        .expect("every abstraction map has parameters")
}
