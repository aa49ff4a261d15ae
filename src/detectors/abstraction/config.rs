//! The abstraction detector's configuration and its command-line options.

use serde::{Deserialize, Serialize};

use crate::registry::{opt, Kind, Opt};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputLoss {
    /// KL divergence of the model's and the abstraction's class distributions.
    Kl,
    /// The same on [P(not class 0), P(class 0)] (the abstraction predicts 2 logits).
    SingleClass,
}

/// The τ maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbstractionKind {
    /// Affine maps to states of width / size_reduction.
    Simple,
    /// Elementwise gates z = a · sigmoid(s) (the original's SoftmaxDrop, scores
    /// initialised to 3): states keep the layer's width, so size_reduction does not
    /// apply (0.0.1 crashed unless it was 1).
    AxisAligned,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AbstractionConfig {
    pub abstraction: AbstractionKind,
    /// Abstract state width = round(layer width / size_reduction) (simple τ only).
    pub size_reduction: f64,
    pub output_loss_fn: OutputLoss,
    pub batch_size: usize,
    pub num_epochs: usize,
    pub learning_rate: f32,
    pub max_steps: Option<usize>,
    /// Standardise each layer's score by its mean and standard deviation on trusted
    /// data before averaging; `false` averages the raw losses (cupbearer 0.0.1).
    pub normalize: bool,
}

impl Default for AbstractionConfig {
    /// The original's defaults.
    fn default() -> Self {
        AbstractionConfig {
            abstraction: AbstractionKind::Simple,
            size_reduction: 4.0,
            output_loss_fn: OutputLoss::Kl,
            batch_size: 128,
            num_epochs: 10,
            learning_rate: 1e-3,
            max_steps: None,
            normalize: true,
        }
    }
}

/// The options of [`AbstractionConfig`] (also those of the adversarial abstraction's
/// starting abstraction).
pub const OPTIONS: &[Opt] = &[
    opt("abstraction", &["/abstraction"], Kind::Str, "The tau maps: simple (affine, reduced width) or axis_aligned (elementwise gates, full width)."),
    opt("abstraction.size_reduction", &["/size_reduction"], Kind::Float, "Abstract state width = layer width / this (simple only)."),
    opt("abstraction.output_loss_fn", &["/output_loss_fn"], Kind::Str, "Output loss: kl or single_class."),
    opt("train.batch_size", &["/batch_size"], Kind::Int, "Samples per training batch."),
    opt("train.num_epochs", &["/num_epochs"], Kind::Int, "Training epochs."),
    Opt {
        aliases: &["train.learning_rate"],
        ..opt("train.optimizer.learning_rate", &["/learning_rate"], Kind::Float, "Adam learning rate.")
    },
    opt("train.max_steps", &["/max_steps"], Kind::Int, "Stop after this many steps."),
    opt("normalize", &["/normalize"], Kind::Bool, "Standardise each layer's score on trusted data (false: cupbearer 0.0.1)."),
];
