//! Evaluation of anomaly detectors: threshold-free detection metrics and SVG plots of scores.

pub mod images;
pub mod metrics;
pub mod plots;
