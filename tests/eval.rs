//! Detection metrics against hand-computed and brute-force values, and the SVG plots.

use cupbearer::eval::metrics::{
    auroc, average_precision, detection_metrics, fpr_at_95_tpr, roc_curve, DetectionMetrics,
};
use cupbearer::eval::plots::{histogram_svg, roc_log_svg, roc_svg, HistogramAxes};

/// Linear counts, `bins` bins.
fn axes(bins: usize, log_x: bool) -> HistogramAxes {
    HistogramAxes {
        bins,
        log_x,
        log_count: false,
    }
}

const EPS: f64 = 1e-12;

fn labels(bits: &[u8]) -> Vec<bool> {
    bits.iter().map(|&b| b == 1).collect()
}

fn assert_close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() < EPS,
        "{what}: got {got}, want {want} (diff {})",
        got - want
    );
}

/// (AUROC, AP, FPR@95) in one go, each through its own public function.
fn all3(scores: &[f64], y: &[bool]) -> (f64, f64, f64) {
    (
        auroc(scores, y).unwrap(),
        average_precision(scores, y).unwrap(),
        fpr_at_95_tpr(scores, y).unwrap(),
    )
}

#[test]
fn perfect_separation() {
    let (a, ap, f) = all3(&[0.1, 0.2, 0.8, 0.9], &labels(&[0, 0, 1, 1]));
    assert_close(a, 1.0, "AUROC");
    assert_close(ap, 1.0, "AP");
    assert_close(f, 0.0, "FPR@95");
}

#[test]
fn reversed_scores() {
    // Descending: 0.9 n, 0.8 n, 0.2 p (R 1/2, P 1/3), 0.1 p (R 1, P 2/4).
    // AP = 1/2 * 1/3 + 1/2 * 1/2 = 5/12; 95 % TPR needs every sample flagged, so FPR 1.
    let (a, ap, f) = all3(&[0.9, 0.8, 0.2, 0.1], &labels(&[0, 0, 1, 1]));
    assert_close(a, 0.0, "AUROC");
    assert_close(ap, 5.0 / 12.0, "AP");
    assert_close(f, 1.0, "FPR@95");
}

#[test]
fn all_scores_equal() {
    // One threshold: everything flagged at once. ROC is the diagonal (0.5) and AP is the
    // precision of flagging everything, the fraction of positives.
    let y = labels(&[1, 0, 0, 1, 0]);
    let (a, ap, f) = all3(&[0.5; 5], &y);
    assert_close(a, 0.5, "AUROC");
    assert_close(ap, 0.4, "AP");
    assert_close(f, 1.0, "FPR@95");
    assert_eq!(
        roc_curve(&[0.5; 5], &y).unwrap(),
        vec![(0.0, 0.0), (1.0, 1.0)]
    );
}

#[test]
fn sklearn_docs_example() {
    // The example from sklearn's docs: roc_auc_score 0.75, average_precision_score 0.8333...
    // Descending: 0.8 p, 0.4 n, 0.35 p, 0.1 n; TPR reaches 1 at 0.35 with one FP of two.
    let scores = [0.1, 0.4, 0.35, 0.8];
    let y = labels(&[0, 0, 1, 1]);
    let (a, ap, f) = all3(&scores, &y);
    assert_close(a, 0.75, "AUROC");
    assert_close(ap, 0.8333333333333333, "AP");
    assert_close(f, 0.5, "FPR@95");
    assert_eq!(
        roc_curve(&scores, &y).unwrap(),
        vec![(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]
    );
}

#[test]
fn ties_across_classes() {
    // scores [1,1,2,2,3], labels [0,1,0,1,1]: P = 3, N = 2. Thresholds, descending, each tie
    // one group:  >=3: tp 1 fp 0 | >=2: tp 2 fp 1 | >=1: tp 3 fp 2.
    // AUROC (Mann-Whitney, tie = 1/2) over the 6 (pos, neg) pairs:
    //   pos 1 vs {1, 2}: 0.5 + 0; pos 2: 1 + 0.5; pos 3: 1 + 1  =>  4 / 6 = 2/3.
    //   (Trapezoids over (0,0) (0,1/3) (1/2,2/3) (1,1): 0 + 1/4 + 5/12 = 2/3, as sklearn.)
    // AP = sum (R_n - R_{n-1}) P_n = 1/3 * 1/1 + 1/3 * 2/3 + 1/3 * 3/5 = 34/45 = 0.7555...
    //   (An implementation that split ties would use P = 1/2 or 2/4 and get another value.)
    // FPR@95: TPR is 1/3, 2/3, 1 -> first reaches 0.95 at threshold 1, where FPR = 2/2 = 1.
    let scores = [1.0, 1.0, 2.0, 2.0, 3.0];
    let y = labels(&[0, 1, 0, 1, 1]);
    let (a, ap, f) = all3(&scores, &y);
    assert_close(a, 2.0 / 3.0, "AUROC");
    assert_close(ap, 34.0 / 45.0, "AP");
    assert_close(f, 1.0, "FPR@95");
    let roc = roc_curve(&scores, &y).unwrap();
    let want = [(0.0, 0.0), (0.0, 1.0 / 3.0), (0.5, 2.0 / 3.0), (1.0, 1.0)];
    assert_eq!(roc.len(), want.len());
    for (g, w) in roc.iter().zip(want) {
        assert_close(g.0, w.0, "fpr");
        assert_close(g.1, w.1, "tpr");
    }
}

#[test]
fn fpr_at_exactly_95_percent_tpr() {
    // 20 anomalies scored 2..=21 and 4 normals at 10.5, 2.5, 1.5, 0. Walking down, TPR hits
    // exactly 19/20 = 0.95 at threshold 3 with one FP (10.5): FPR 1/4. A strict `>` would
    // go on to threshold 2 (FP 2.5 included) and report 1/2.
    let mut scores: Vec<f64> = (2..=21).map(f64::from).collect();
    let mut y = vec![true; 20];
    scores.extend([10.5, 2.5, 1.5, 0.0]);
    y.extend([false; 4]);
    assert_close(fpr_at_95_tpr(&scores, &y).unwrap(), 0.25, "FPR@95");
}

#[test]
fn negative_zero_ties_with_zero() {
    // sklearn compares with ==, so -0.0 and 0.0 are one threshold (a tie: AUROC 0.5).
    assert_close(auroc(&[-0.0, 0.0], &[true, false]).unwrap(), 0.5, "AUROC");
    assert_close(auroc(&[0.0, -0.0], &[true, false]).unwrap(), 0.5, "AUROC");
}

#[test]
fn detection_metrics_agree_and_serialise() {
    let scores = [1.0, 1.0, 2.0, 2.0, 3.0];
    let y = labels(&[0, 1, 0, 1, 1]);
    let m = detection_metrics(&scores, &y).unwrap();
    assert_eq!(
        m,
        DetectionMetrics {
            auc_roc: auroc(&scores, &y).unwrap(),
            ap: average_precision(&scores, &y).unwrap(),
            fpr_at_95_tpr: fpr_at_95_tpr(&scores, &y).unwrap(),
            num_normal: 2,
            num_anomalous: 3,
        }
    );
    let json = serde_json::to_string(&m).unwrap();
    assert!(json.contains("\"auc_roc\""), "{json}");
    assert_eq!(serde_json::from_str::<DetectionMetrics>(&json).unwrap(), m);
}

/// splitmix64: a tiny deterministic generator so the brute-force cases are reproducible.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `n` samples, anomalies shifted up, scores rounded to one decimal so that ties are common.
fn random_case(seed: u64, n: usize) -> (Vec<f64>, Vec<bool>) {
    let mut rng = Rng(seed);
    let y: Vec<bool> = (0..n).map(|_| rng.unit() < 0.3).collect();
    let scores = y
        .iter()
        .map(|&a| {
            let s = rng.unit() * 2.0 + if a { 0.7 } else { 0.0 };
            (s * 10.0).round() / 10.0
        })
        .collect();
    (scores, y)
}

/// Pairwise definition: P(score_pos > score_neg) + 1/2 P(tie).
fn brute_auroc(scores: &[f64], y: &[bool]) -> f64 {
    let (mut credit, mut pairs) = (0.0, 0.0);
    for (i, &si) in scores.iter().enumerate().filter(|&(i, _)| y[i]) {
        for (_, &sj) in scores.iter().enumerate().filter(|&(j, _)| !y[j] && j != i) {
            pairs += 1.0;
            credit += if si > sj {
                1.0
            } else if si == sj {
                0.5
            } else {
                0.0
            };
        }
    }
    credit / pairs
}

/// Distinct scores, descending: the thresholds in sklearn's definition.
fn thresholds(scores: &[f64]) -> Vec<f64> {
    let mut t = scores.to_vec();
    t.sort_by(|a, b| b.partial_cmp(a).unwrap());
    t.dedup();
    t
}

/// (tp, fp) when flagging every sample with score >= t, by counting.
fn counts_at(scores: &[f64], y: &[bool], t: f64) -> (f64, f64) {
    let tp = scores.iter().zip(y).filter(|(&s, &l)| l && s >= t).count();
    let fp = scores.iter().zip(y).filter(|(&s, &l)| !l && s >= t).count();
    (tp as f64, fp as f64)
}

/// sklearn's AP by its definition: sum over thresholds of (R_n - R_{n-1}) * P_n.
fn brute_ap(scores: &[f64], y: &[bool]) -> f64 {
    let pos = y.iter().filter(|&&l| l).count() as f64;
    let (mut ap, mut r_prev) = (0.0, 0.0);
    for t in thresholds(scores) {
        let (tp, fp) = counts_at(scores, y, t);
        let r = tp / pos;
        ap += (r - r_prev) * (tp / (tp + fp));
        r_prev = r;
    }
    ap
}

fn brute_fpr95(scores: &[f64], y: &[bool]) -> f64 {
    let pos = y.iter().filter(|&&l| l).count() as f64;
    let neg = y.len() as f64 - pos;
    for t in thresholds(scores) {
        let (tp, fp) = counts_at(scores, y, t);
        if tp / pos >= 0.95 {
            return fp / neg;
        }
    }
    unreachable!("the lowest threshold flags everything")
}

#[test]
fn brute_force_agreement_with_many_ties() {
    for seed in 0..5 {
        let (scores, y) = random_case(seed, 200);
        let distinct = thresholds(&scores).len();
        assert!(
            distinct < 40,
            "the case should be tie-heavy, has {distinct} distinct scores"
        );
        let m = detection_metrics(&scores, &y).unwrap();
        assert_close(m.auc_roc, brute_auroc(&scores, &y), "AUROC vs pairwise");
        assert_close(m.ap, brute_ap(&scores, &y), "AP vs definition");
        assert_close(
            m.fpr_at_95_tpr,
            brute_fpr95(&scores, &y),
            "FPR@95 vs definition",
        );
        assert!(
            m.auc_roc > 0.6 && m.auc_roc < 1.0,
            "separable but not perfect: {m:?}"
        );

        let roc = roc_curve(&scores, &y).unwrap();
        assert_eq!(roc.len(), distinct + 1);
        assert_eq!((roc[0], roc[distinct]), ((0.0, 0.0), (1.0, 1.0)));
        assert!(roc.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }
}

#[test]
fn large_inputs_are_handled() {
    // (An O(n²) implementation would hang here; speed itself belongs in benchmarks.)
    let (scores, y) = random_case(42, 200_000);
    let m = detection_metrics(&scores, &y).unwrap();
    assert_eq!(m.num_normal + m.num_anomalous, 200_000);
    assert!(m.auc_roc > 0.6 && m.auc_roc < 1.0, "{m:?}");
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

#[test]
fn single_class_is_an_error() {
    let e = err_text(auroc(&[0.1, 0.2, 0.3], &[false; 3]));
    assert!(
        e.contains("AUROC needs both normal and anomalous samples; got 3 normal and 0 anomalous"),
        "{e}"
    );
    let e = err_text(detection_metrics(&[0.1, 0.2], &[true; 2]));
    assert!(e.contains("got 0 normal and 2 anomalous"), "{e}");
    for e in [
        err_text(average_precision(&[0.1], &[true])),
        err_text(fpr_at_95_tpr(&[0.1], &[true])),
        err_text(roc_curve(&[0.1], &[true])),
    ] {
        assert!(e.contains("needs both normal and anomalous samples"), "{e}");
    }
}

#[test]
fn empty_input_is_an_error() {
    let e = err_text(auroc(&[], &[]));
    assert!(e.contains("empty"), "{e}");
    let e = err_text(detection_metrics(&[], &[]));
    assert!(e.contains("empty"), "{e}");
}

#[test]
fn nan_is_an_error() {
    let scores = [0.1, f64::NAN, 0.3, f64::NAN];
    let y = labels(&[0, 1, 0, 1]);
    for e in [
        err_text(auroc(&scores, &y)),
        err_text(average_precision(&scores, &y)),
        err_text(detection_metrics(&scores, &y)),
    ] {
        assert!(e.contains("2 NaN"), "{e}");
        assert!(e.contains("index 1"), "{e}");
    }
}

#[test]
fn length_mismatch_is_an_error() {
    let e = err_text(auroc(&[0.1, 0.2, 0.3], &[true, false]));
    assert!(e.contains("3 scores but 2 labels"), "{e}");
    let e = err_text(roc_curve(&[0.1], &[true, false]));
    assert!(e.contains("1 scores but 2 labels"), "{e}");
}

/// Compares with scikit-learn when it is installed; it is not required, so skip silently.
#[test]
fn matches_sklearn_when_available() {
    let has_sklearn = std::process::Command::new("python3")
        .args(["-c", "import sklearn"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_sklearn {
        return;
    }
    let (scores, y) = random_case(7, 500);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("case.json");
    std::fs::write(&data, serde_json::to_string(&(&scores, &y)).unwrap()).unwrap();
    let snippet = r#"
import json, sys
import numpy as np
from sklearn.metrics import roc_auc_score, average_precision_score, roc_curve
s, y = json.load(open(sys.argv[1]))
s, y = np.array(s), np.array(y, dtype=int)
fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
print(json.dumps([roc_auc_score(y, s), average_precision_score(y, s),
                  float(fpr[np.argmax(tpr >= 0.95)])]))
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(snippet)
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let [a, ap, f]: [f64; 3] = serde_json::from_slice(&out.stdout).unwrap();
    let m = detection_metrics(&scores, &y).unwrap();
    assert_close(m.auc_roc, a, "AUROC vs sklearn");
    assert_close(m.ap, ap, "AP vs sklearn");
    assert_close(m.fpr_at_95_tpr, f, "FPR@95 vs sklearn");
}

/// The contents of the SVG's `<text>` elements (plotters writes one element per label).
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = &t[t.find('>')? + 1..];
            Some(body[..body.find("</text>")?].trim().to_string())
        })
        .collect()
}

/// Checks what every plot must have and that each of `labels` is a text element of its own
/// (so the viewer renders it with its fonts); returns the texts.
fn check_svg(path: &std::path::Path, labels: &[&str]) -> Vec<String> {
    let svg = std::fs::read_to_string(path).unwrap();
    assert!(
        svg.trim_start().starts_with("<svg"),
        "{}",
        &svg[..svg.len().min(200)]
    );
    assert!(!svg.contains("<image"), "text must not be rasterised");
    let texts = svg_texts(&svg);
    for label in labels {
        assert!(
            texts.iter().any(|t| t == label),
            "no <text> {label:?} in {}: {texts:?}",
            path.display()
        );
    }
    assert!(
        !path.with_extension("svg.tmp").exists(),
        "temp file left behind"
    );
    texts
}

/// Widths in pixels of the filled rectangles of one colour: histogram bars plus the legend
/// swatch.
fn rect_widths(path: &std::path::Path, fill: &str) -> Vec<f64> {
    let svg = std::fs::read_to_string(path).unwrap();
    svg.lines()
        .filter(|l| l.starts_with("<rect") && l.contains(&format!("fill=\"{fill}\"")))
        .map(|l| {
            let w = &l[l.find("width=\"").unwrap() + 7..];
            w[..w.find('"').unwrap()].parse().unwrap()
        })
        .collect()
}

fn count_rects(path: &std::path::Path, fill: &str) -> usize {
    rect_widths(path, fill).len()
}

const NORMAL_FILL: &str = "#1F77B4";
const ANOMALOUS_FILL: &str = "#D62728";

#[test]
fn histogram_plots() {
    let dir = tempfile::tempdir().unwrap();
    let (scores, y) = random_case(3, 300);
    let split = |want: bool| -> Vec<f64> {
        scores
            .iter()
            .zip(&y)
            .filter(|&(_, &l)| l == want)
            .map(|(&s, _)| s)
            .collect()
    };
    let (mut normal, anomalous) = (split(false), split(true));
    // Scores lie in [0, 2.7]; one outlier at 1000 must stay in range (the original clipped
    // at a percentile and hid it). 30 bins of width 33.3: everything else in bin 0.
    normal.push(1000.0);

    let path = dir.path().join("hist.svg");
    histogram_svg(
        &path,
        "Mahalanobis scores",
        &normal,
        &anomalous,
        &axes(30, false),
    )
    .unwrap();
    let texts = check_svg(
        &path,
        &[
            "Mahalanobis scores",
            "normal",
            "anomalous",
            "anomaly score",
            "count",
            "1000",
        ],
    );
    assert!(
        texts.iter().all(|t| t != "1200"),
        "axis overshoots: {texts:?}"
    );
    // Bars (plus one legend swatch each): normal in bins 0 and 29, anomalous in bin 0.
    assert_eq!(count_rects(&path, NORMAL_FILL), 3);
    assert_eq!(count_rects(&path, ANOMALOUS_FILL), 2);

    // Log counts: the same bars (one per non-empty bin), counts labelled 1, 10, 100.
    let counts_path = dir.path().join("hist_counts.svg");
    let log_counts = HistogramAxes {
        log_count: true,
        ..axes(30, false)
    };
    histogram_svg(&counts_path, "log counts", &normal, &anomalous, &log_counts).unwrap();
    let texts = check_svg(&counts_path, &["count (log scale)", "1", "10", "100"]);
    assert!(!texts.iter().any(|t| t == "count"), "{texts:?}");
    assert_eq!(count_rects(&counts_path, NORMAL_FILL), 3);
    assert_eq!(count_rects(&counts_path, ANOMALOUS_FILL), 2);

    // Log axis: ticks at round raw scores on log10(1 + score - min).
    let log_path = dir.path().join("hist_log.svg");
    histogram_svg(
        &log_path,
        "log scores",
        &normal,
        &anomalous,
        &axes(30, true),
    )
    .unwrap();
    let texts = check_svg(
        &log_path,
        &[
            "log scores",
            "normal",
            "anomalous",
            "0",
            "1",
            "10",
            "100",
            "1000",
        ],
    );
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("anomaly score") && t.contains("log10")),
        "{texts:?}"
    );
    assert!(
        count_rects(&log_path, NORMAL_FILL) > 5,
        "log bins spread the bulk out"
    );

    // Degenerate: all scores equal still draws one bin, even with one class empty.
    let flat = dir.path().join("flat.svg");
    histogram_svg(&flat, "flat", &[2.0; 4], &[], &axes(10, false)).unwrap();
    check_svg(&flat, &["flat", "normal", "anomalous", "2"]);
    let widths = rect_widths(&flat, NORMAL_FILL);
    assert_eq!(widths.len(), 2);
    assert!(
        widths.iter().any(|&w| w > 300.0),
        "the one bin spans the axis: {widths:?}"
    );
    assert_eq!(count_rects(&flat, ANOMALOUS_FILL), 1);
}

#[test]
fn roc_plot() {
    let dir = tempfile::tempdir().unwrap();
    let (scores, y) = random_case(5, 300);
    let all = roc_curve(&scores, &y).unwrap();
    let half = roc_curve(&scores[..150], &y[..150]).unwrap();
    let path = dir.path().join("roc.svg");
    let curves = vec![
        ("all (AUROC 0.912)".to_string(), all),
        ("layer 1 & co".to_string(), half),
    ];
    roc_svg(&path, "ROC: backdoor task", &curves).unwrap();
    check_svg(
        &path,
        &[
            "ROC: backdoor task",
            "all (AUROC 0.912)",
            "layer 1 &amp; co", // escaped as XML requires
            "chance",
            "false positive rate",
            "true positive rate",
            "0.0",
            "1.0",
        ],
    );
    // Chance diagonal + two curves, and their three legend samples.
    let svg = std::fs::read_to_string(&path).unwrap();
    for colour in ["#969696", "#1F77B4", "#FF7F0E"] {
        let lines = svg
            .lines()
            .filter(|l| l.starts_with("<polyline") && l.contains(&format!("stroke=\"{colour}\"")))
            .count();
        assert_eq!(lines, 2, "{colour}");
    }
}

#[test]
fn log_scale_roc_plot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("roc_log.svg");
    // A near-perfect detector: the interesting part is below FPR 0.01.
    let curve = vec![
        (0.0, 0.0),
        (0.0, 0.6),
        (0.0005, 0.9),
        (0.01, 0.99),
        (1.0, 1.0),
    ];
    roc_log_svg(
        &path,
        "log ROC",
        &[("all (AUROC 0.9990)".to_string(), curve)],
    )
    .unwrap();
    check_svg(
        &path,
        &[
            "log ROC",
            "all (AUROC 0.9990)",
            "false positive rate",
            "0.001",
            "0.01",
            "0.1",
        ],
    );
    // The FPR-0 points sit on the axis's left end instead of vanishing.
    let svg = std::fs::read_to_string(&path).unwrap();
    let curve_line = svg
        .lines()
        .find(|l| l.starts_with("<polyline") && l.contains("#1F77B4"))
        .unwrap();
    assert!(curve_line.matches(',').count() >= 5, "{curve_line}");
    assert!(roc_log_svg(&path, "t", &[("x".into(), vec![(f64::NAN, 0.0)])]).is_err());
}

#[test]
fn failed_plots_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();

    // Parent directory missing: the temp file cannot even be created.
    let missing = dir.path().join("no_such_dir").join("roc.svg");
    let curves = vec![("x".to_string(), vec![(0.0, 0.0), (1.0, 1.0)])];
    let e = err_text(roc_svg(&missing, "t", &curves));
    assert!(e.contains("no_such_dir"), "error should name the path: {e}");
    assert!(!missing.with_extension("svg.tmp").exists());

    // The temp file is written but the rename fails (target is a directory): it is removed.
    let blocked = dir.path().join("blocked.svg");
    std::fs::create_dir(&blocked).unwrap();
    let e = err_text(histogram_svg(
        &blocked,
        "t",
        &[1.0, 2.0],
        &[3.0],
        &axes(5, false),
    ));
    assert!(e.contains("blocked.svg"), "{e}");
    assert!(
        !blocked.with_extension("svg.tmp").exists(),
        "temp file left behind"
    );

    // Invalid input fails before anything is written.
    let bad = dir.path().join("bad.svg");
    assert!(histogram_svg(&bad, "t", &[1.0, f64::NAN], &[3.0], &axes(5, false)).is_err());
    assert!(histogram_svg(&bad, "t", &[1.0], &[3.0], &axes(0, false)).is_err());
    assert!(histogram_svg(&bad, "t", &[], &[], &axes(5, false)).is_err());
    assert!(roc_svg(&bad, "t", &[]).is_err());

    let mut left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(left, vec![std::ffi::OsString::from("blocked.svg")]);
}
