//! What a run leaves in its logs: classification metrics and the Trainer's metrics line.

use bertft_cuda::train::metrics::{
    classification_metrics, format_metrics_line, python_float_repr, Metrics,
};

// ---------------------------------------------------------------------------------------------
// Metrics

fn assert_metrics(got: Metrics, want: [f64; 5], case: &str) {
    let got_arr = [
        got.accuracy,
        got.f1,
        got.precision,
        got.recall,
        got.matthews_correlation,
    ];
    let names = [
        "accuracy",
        "f1",
        "precision",
        "recall",
        "matthews_correlation",
    ];
    for ((g, w), name) in got_arr.iter().zip(want).zip(names) {
        // Summation order may differ from numpy's by an ulp or so; nothing more.
        assert!((g - w).abs() < 1e-12, "{case}: {name} = {g}, want {w}");
    }
}

#[test]
fn binary_metrics_by_hand() {
    // Confusion (truth × prediction): tp = 4, fp = 2, fn = 2, tn = 2.
    let labels = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1];
    let preds = [1, 1, 0, 1, 0, 1, 0, 1, 1, 0];
    let m = classification_metrics(&preds, &labels, 2);
    // precision = recall = 4/6; MCC = (tp·tn − fp·fn)/√((tp+fp)(tp+fn)(tn+fp)(tn+fn))
    //           = (8 − 4)/√(6·6·4·4) = 4/24.
    let mcc = 4.0 / 24.0;
    assert_metrics(
        m,
        [0.6, 4.0 / 6.0, 4.0 / 6.0, 4.0 / 6.0, mcc],
        "binary by hand",
    );
}

#[test]
fn macro_average_skips_classes_absent_on_both_sides() {
    // Class 3 is declared but never occurs: scikit-learn's macro mean is over 3 classes.
    let labels = [0, 1, 2, 2, 1, 0, 2, 1];
    let preds = [0, 2, 1, 2, 1, 0, 0, 2];
    let m = classification_metrics(&preds, &labels, 4);
    // Per class (precision, recall): 0: (2/3, 1), 1: (1/2, 1/3), 2: (1/3, 1/3).
    let precision = (2.0 / 3.0 + 0.5 + 1.0 / 3.0) / 3.0;
    let recall = (1.0 + 1.0 / 3.0 + 1.0 / 3.0) / 3.0;
    assert!((m.precision - precision).abs() < 1e-12, "{m:?}");
    assert!((m.recall - recall).abs() < 1e-12, "{m:?}");
}

/// Expected values are scikit-learn 1.9.1's outputs (accuracy_score, f1_score,
/// precision_score, recall_score with average="binary" for two labels and "macro"
/// otherwise, zero_division=0; matthews_corrcoef), hard-coded from their Python reprs.
#[test]
fn metrics_match_scikit_learn() {
    type Case = (
        &'static str,
        &'static [u32],
        &'static [u32],
        usize,
        [f64; 5],
    );
    let cases: [Case; 8] = [
        (
            "binary",
            &[1, 0, 1, 1, 0, 1, 0, 0, 1, 1],
            &[1, 1, 0, 1, 0, 1, 0, 1, 1, 0],
            2,
            [
                0.6,
                0.6666666666666666,
                0.6666666666666666,
                0.6666666666666666,
                0.16666666666666666,
            ],
        ),
        (
            "multi-class, a declared class never occurs",
            &[0, 1, 2, 2, 1, 0, 2, 1],
            &[0, 2, 1, 2, 1, 0, 0, 2],
            4,
            [
                0.5,
                0.5111111111111112,
                0.49999999999999994,
                0.5555555555555555,
                0.2619047619047619,
            ],
        ),
        (
            "multi-class, class 1 never predicted",
            &[0, 1, 2, 2, 1, 0, 2, 1, 2],
            &[0, 0, 2, 2, 0, 0, 2, 0, 2],
            3,
            [
                0.6666666666666666,
                0.5238095238095238,
                0.4666666666666666,
                0.6666666666666666,
                0.6139406135149205,
            ],
        ),
        (
            "multi-class, all correct",
            &[0, 1, 2, 1, 0],
            &[0, 1, 2, 1, 0],
            3,
            [1.0, 1.0, 1.0, 1.0, 1.0],
        ),
        (
            "binary, all wrong",
            &[0, 1, 1, 0, 1],
            &[1, 0, 0, 1, 0],
            2,
            [0.0, 0.0, 0.0, 0.0, -1.0],
        ),
        (
            "multi-class, all wrong",
            &[0, 1, 2, 0],
            &[1, 2, 0, 2],
            3,
            [0.0, 0.0, 0.0, 0.0, -0.5],
        ),
        (
            "binary, no positives anywhere",
            &[0, 0, 0, 0],
            &[0, 0, 0, 0],
            2,
            [1.0, 0.0, 0.0, 0.0, 0.0],
        ),
        (
            "binary, constant prediction",
            &[1, 0, 1, 1],
            &[1, 1, 1, 1],
            2,
            [0.75, 0.8571428571428571, 0.75, 1.0, 0.0],
        ),
    ];
    for (name, labels, preds, num_labels, want) in cases {
        let got = classification_metrics(preds, labels, num_labels);
        assert_metrics(got, want, name);
    }
}

#[test]
fn floats_print_as_python_repr() {
    // Right-hand sides are Python 3.11's repr() of the same values.
    let cases = [
        (5e-05, "5e-05"),
        (0.1, "0.1"),
        (3.0, "3.0"),
        (1234567.0, "1234567.0"),
        (1e16, "1e+16"),
        (2.5e-07, "2.5e-07"),
        (0.0001, "0.0001"),
        (1234567890123456.0, "1234567890123456.0"),
        (123456789012345680.0, "1.2345678901234568e+17"),
        (-0.0, "-0.0"),
        (1e22, "1e+22"),
        (1.5e300, "1.5e+300"),
        (-2.5e-10, "-2.5e-10"),
        (1.0 / 3.0, "0.3333333333333333"),
        (100.0, "100.0"),
        (1e-320, "1e-320"),
        // Exactly halfway between two shortest candidates (sums exact in binary): Python
        // keeps the even digit.
        (1690060720831323.0 + 0.25, "1690060720831323.2"),
        (233115890514796.0 + 0.125, "233115890514796.12"),
        (f64::INFINITY, "inf"),
        (f64::NEG_INFINITY, "-inf"),
        (f64::NAN, "nan"),
    ];
    for (value, want) in cases {
        assert_eq!(python_float_repr(value), want, "repr of {value:e}");
    }
}

#[test]
fn metrics_line_is_a_python_dict() {
    let entries = [
        ("epoch".to_string(), 1.0),
        ("eval_loss".to_string(), 0.5),
        ("eval_accuracy".to_string(), 0.82),
        ("learning_rate".to_string(), 5e-05),
    ];
    assert_eq!(
        format_metrics_line(&entries),
        "{'epoch': 1.0, 'eval_loss': 0.5, 'eval_accuracy': 0.82, 'learning_rate': 5e-05}"
    );
    assert_eq!(format_metrics_line(&[]), "{}");
}
