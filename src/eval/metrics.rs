//! Detection metrics for anomaly scores, with scikit-learn's semantics.
//!
//! Conventions: the positive class is *anomalous* (`label == true`) and a higher score means
//! "more anomalous". Every threshold sits at a distinct score and tied scores are grouped into
//! one threshold, exactly as `sklearn.metrics.roc_curve` / `precision_recall_curve` do, so the
//! numbers here can be compared with the original Python cupbearer.
//!
//! All metrics come from one sort of the scores (`Sweep`); [`detection_metrics`] sorts once
//! for all three.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Cumulative confusion counts while the threshold sweeps down over the distinct scores.
///
/// Entry `i` counts the samples with `score >= thresholds[i]`, thresholds in descending order;
/// the last entry therefore counts everything (`tps.last() == pos`, `fps.last() == neg`).
/// Counts stay integers so that AUROC and the 95 % TPR cut are exact.
struct Sweep {
    tps: Vec<u64>,
    fps: Vec<u64>,
    pos: u64,
    neg: u64,
}

impl Sweep {
    /// Validates the input and sweeps it; `what` names the metric in error messages.
    fn new(scores: &[f64], labels: &[bool], what: &str) -> Result<Self> {
        if scores.len() != labels.len() {
            bail!(
                "{what}: got {} scores but {} labels; they must pair up one to one",
                scores.len(),
                labels.len()
            );
        }
        if scores.is_empty() {
            bail!("{what}: no samples (scores and labels are empty)");
        }
        let nan = scores.iter().filter(|s| s.is_nan()).count();
        if nan > 0 {
            let first = scores.iter().position(|s| s.is_nan()).unwrap_or(0);
            bail!("{what}: scores contain {nan} NaN value(s), the first at index {first}");
        }
        let pos = labels.iter().filter(|&&l| l).count() as u64;
        let neg = labels.len() as u64 - pos;
        if pos == 0 || neg == 0 {
            bail!(
                "{what} needs both normal and anomalous samples; got {neg} normal and {pos} anomalous"
            );
        }

        let mut order: Vec<usize> = (0..scores.len()).collect();
        // No NaN is left, so `total_cmp` agrees with `<` except that it orders -0.0 before
        // 0.0; the two still end up adjacent and the `==` grouping below merges them.
        order.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]));

        let (mut tps, mut fps) = (Vec::new(), Vec::new());
        let (mut tp, mut fp) = (0u64, 0u64);
        for (k, &i) in order.iter().enumerate() {
            if labels[i] {
                tp += 1;
            } else {
                fp += 1;
            }
            let group_ends = order.get(k + 1).is_none_or(|&j| scores[j] != scores[i]);
            if group_ends {
                tps.push(tp);
                fps.push(fp);
            }
        }
        Ok(Self { tps, fps, pos, neg })
    }

    /// Trapezoidal area under the ROC curve, which with tied scores grouped equals the
    /// Mann-Whitney U statistic with half credit for ties. Summed in integers: each step adds
    /// `dfp * (tp_prev + tp) / 2`, kept doubled to stay integral.
    fn auroc(&self) -> f64 {
        let (mut twice_area, mut tp_prev, mut fp_prev) = (0u128, 0u64, 0u64);
        for (&tp, &fp) in self.tps.iter().zip(&self.fps) {
            twice_area += u128::from(fp - fp_prev) * u128::from(tp_prev + tp);
            (tp_prev, fp_prev) = (tp, fp);
        }
        twice_area as f64 / (2.0 * self.pos as f64 * self.neg as f64)
    }

    /// sklearn's step-wise AP: `sum_n (R_n - R_{n-1}) * P_n`, no interpolation.
    fn average_precision(&self) -> f64 {
        let mut tp_prev = 0u64;
        let mut ap = 0.0;
        for (&tp, &fp) in self.tps.iter().zip(&self.fps) {
            if tp > tp_prev {
                let recall_step = (tp - tp_prev) as f64 / self.pos as f64;
                ap += recall_step * (tp as f64 / (tp + fp) as f64);
            }
            tp_prev = tp;
        }
        ap
    }

    /// FPR at the first threshold (walking down from the highest score) where TPR >= 0.95,
    /// i.e. the lowest FPR that still catches 95 % of anomalies. `20 tp >= 19 pos` avoids
    /// comparing a rounded ratio with the inexact float 0.95.
    fn fpr_at_95_tpr(&self) -> f64 {
        let k = self
            .tps
            .iter()
            .position(|&tp| 20 * tp >= 19 * self.pos)
            .unwrap_or(self.tps.len() - 1); // unreachable: the last entry has tp == pos
        self.fps[k] as f64 / self.neg as f64
    }

    fn roc_points(&self) -> Vec<(f64, f64)> {
        let (p, n) = (self.pos as f64, self.neg as f64);
        std::iter::once((0.0, 0.0))
            .chain(
                self.tps
                    .iter()
                    .zip(&self.fps)
                    .map(|(&tp, &fp)| (fp as f64 / n, tp as f64 / p)),
            )
            .collect()
    }
}

/// AUROC with ties handled as scikit-learn's `roc_auc_score` (equivalently the Mann-Whitney U
/// statistic with average ranks for ties).
pub fn auroc(scores: &[f64], labels: &[bool]) -> Result<f64> {
    Ok(Sweep::new(scores, labels, "AUROC")?.auroc())
}

/// Average precision exactly as `sklearn.metrics.average_precision_score`: sum over distinct
/// thresholds (descending) of `(R_n - R_{n-1}) * P_n`, ties grouped into one threshold, no
/// interpolation.
pub fn average_precision(scores: &[f64], labels: &[bool]) -> Result<f64> {
    Ok(Sweep::new(scores, labels, "average precision")?.average_precision())
}

/// False-positive rate at the first threshold, sweeping down from the highest score, whose TPR
/// is >= 0.95 (thresholds at distinct scores; ties grouped): the lowest FPR that still flags
/// 95 % of the anomalies.
pub fn fpr_at_95_tpr(scores: &[f64], labels: &[bool]) -> Result<f64> {
    Ok(Sweep::new(scores, labels, "FPR@95%TPR")?.fpr_at_95_tpr())
}

/// ROC curve points `(fpr, tpr)` from `(0, 0)` to `(1, 1)`: the origin, then one point per
/// distinct threshold in descending order. Unlike sklearn's default no collinear points are
/// dropped, so the curve has `distinct scores + 1` points.
pub fn roc_curve(scores: &[f64], labels: &[bool]) -> Result<Vec<(f64, f64)>> {
    Ok(Sweep::new(scores, labels, "ROC curve")?.roc_points())
}

/// The headline numbers of one detector on one test set, as stored in a run's results.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DetectionMetrics {
    pub auc_roc: f64,
    pub ap: f64,
    pub fpr_at_95_tpr: f64,
    pub num_normal: usize,
    pub num_anomalous: usize,
}

/// AUROC, AP and FPR@95%TPR together, from a single sort of the scores.
pub fn detection_metrics(scores: &[f64], labels: &[bool]) -> Result<DetectionMetrics> {
    let sweep = Sweep::new(scores, labels, "AUROC")?;
    Ok(DetectionMetrics {
        auc_roc: sweep.auroc(),
        ap: sweep.average_precision(),
        fpr_at_95_tpr: sweep.fpr_at_95_tpr(),
        num_normal: sweep.neg as usize,
        num_anomalous: sweep.pos as usize,
    })
}
