//! Classification metrics as the Hugging Face examples compute them.
//!
//! The examples' `compute_metrics` call `evaluate`'s accuracy/f1/precision/recall/matthews
//! metrics, which are thin wrappers over scikit-learn; the formulas here follow scikit-learn's
//! so that numbers logged by this crate compare directly with a Python run:
//!
//! - two labels: f1/precision/recall of class 1 as the positive class (`average="binary"`);
//! - more labels: the unweighted mean over the classes that occur in the labels or the
//!   predictions (`average="macro"` with `labels=None`, so a class that never occurs on either
//!   side does not drag the mean down);
//! - a ratio with a zero denominator is 0 (`zero_division=0`);
//! - MCC is the multiclass generalisation computed from the confusion matrix, 0 when its
//!   denominator is 0.

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Metrics {
    pub accuracy: f64,
    pub f1: f64,
    pub precision: f64,
    pub recall: f64,
    pub matthews_correlation: f64,
}

/// Accuracy, f1, precision, recall and MCC of `predictions` against `labels`.
///
/// An empty input gives all zeros (scikit-learn would warn and return NaN or raise; a 0 keeps
/// logs and the best-checkpoint comparison well defined). Class ids at or above `num_labels`
/// are counted as their own classes rather than panicking, as scikit-learn would.
pub fn classification_metrics(predictions: &[u32], labels: &[u32], num_labels: usize) -> Metrics {
    assert_eq!(
        predictions.len(),
        labels.len(),
        "classification_metrics: {} predictions for {} labels",
        predictions.len(),
        labels.len()
    );
    let confusion = Confusion::new(predictions, labels, num_labels);
    let (precision, recall, f1) = if num_labels == 2 {
        confusion.class_scores(1)
    } else {
        confusion.macro_scores()
    };
    Metrics {
        accuracy: ratio(confusion.correct(), confusion.total()),
        f1,
        precision,
        recall,
        matthews_correlation: confusion.matthews(),
    }
}

/// `counts[truth][predicted]`, square over every class id seen or declared.
struct Confusion {
    counts: Vec<Vec<u64>>,
}

impl Confusion {
    fn new(predictions: &[u32], labels: &[u32], num_labels: usize) -> Self {
        let seen = predictions.iter().chain(labels).map(|&c| c as usize + 1);
        let n = seen.max().unwrap_or(0).max(num_labels);
        let mut counts = vec![vec![0u64; n]; n];
        for (&p, &t) in predictions.iter().zip(labels) {
            counts[t as usize][p as usize] += 1;
        }
        Confusion { counts }
    }

    fn classes(&self) -> usize {
        self.counts.len()
    }

    fn true_count(&self, class: usize) -> u64 {
        self.counts[class].iter().sum()
    }

    fn predicted_count(&self, class: usize) -> u64 {
        self.counts.iter().map(|row| row[class]).sum()
    }

    fn correct(&self) -> u64 {
        (0..self.classes()).map(|c| self.counts[c][c]).sum()
    }

    fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    /// (precision, recall, f1) of one class against all others.
    fn class_scores(&self, class: usize) -> (f64, f64, f64) {
        let tp = self.counts[class][class];
        let (truth, predicted) = (self.true_count(class), self.predicted_count(class));
        // f1 as scikit-learn writes it, 2tp / (|true| + |predicted|): the same value as the
        // harmonic mean of precision and recall, but without rounding through them.
        (
            ratio(tp, predicted),
            ratio(tp, truth),
            ratio(2 * tp, truth + predicted),
        )
    }

    /// Means of the per-class scores over the classes present in labels or predictions.
    fn macro_scores(&self) -> (f64, f64, f64) {
        let present: Vec<usize> = (0..self.classes())
            .filter(|&c| self.true_count(c) + self.predicted_count(c) > 0)
            .collect();
        if present.is_empty() {
            return (0.0, 0.0, 0.0);
        }
        let sums = present
            .iter()
            .map(|&c| self.class_scores(c))
            .fold((0.0, 0.0, 0.0), |a, s| (a.0 + s.0, a.1 + s.1, a.2 + s.2));
        let n = present.len() as f64;
        (sums.0 / n, sums.1 / n, sums.2 / n)
    }

    /// scikit-learn's `matthews_corrcoef`: covariances from the confusion matrix's marginals.
    fn matthews(&self) -> f64 {
        let k = self.classes();
        let t: Vec<f64> = (0..k).map(|c| self.true_count(c) as f64).collect();
        let p: Vec<f64> = (0..k).map(|c| self.predicted_count(c) as f64).collect();
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let n = self.total() as f64;
        let cov_tp = self.correct() as f64 * n - dot(&t, &p);
        let cov_pp = n * n - dot(&p, &p);
        let cov_tt = n * n - dot(&t, &t);
        let denominator = cov_pp * cov_tt;
        if denominator == 0.0 {
            0.0
        } else {
            cov_tp / denominator.sqrt()
        }
    }
}

/// `num / den`, or 0 for an empty denominator (scikit-learn's `zero_division=0`).
fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// The Trainer's log line: a Python dict repr, e.g. `{'epoch': 1.0, 'eval_loss': 0.5}`.
///
/// Printed exactly as Python prints it so that logs of the two implementations diff cleanly.
pub fn format_metrics_line(entries: &[(String, f64)]) -> String {
    let items: Vec<String> = entries
        .iter()
        .map(|(key, value)| format!("{}: {}", python_str_repr(key), python_float_repr(*value)))
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// Python's `repr(str)`: single quotes unless the text holds a single quote and no double
/// quote; backslashes, the chosen quote and control characters escaped.
fn python_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Python's `repr(float)`.
///
/// Both languages print the shortest digits that round-trip; they differ in layout. Python
/// switches to exponent notation when the decimal exponent is below -4 or at least 16, writes
/// the exponent signed with at least two digits (`1e-05`, `1e+16`), and keeps `.0` on
/// integral values in positional notation.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    let sci = shortest_scientific(x.abs());
    let (mantissa, exp) = sci
        .split_once('e')
        .expect("`{:e}` always writes an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` writes an integer exponent");
    let digits: String = mantissa.chars().filter(|&c| c != '.').collect();
    let sign = if x.is_sign_negative() { "-" } else { "" };
    let body = if (-4..16).contains(&exp) {
        positional(&digits, exp)
    } else {
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{exp_sign}{:02}", exp.abs())
    };
    format!("{sign}{body}")
}

/// The shortest round-trip digits of `x` as `d[.ddd]e<exp>`, ties between two shortest
/// candidates going to the even one as in Python.
///
/// Rust's `{:e}` finds how many digits are needed but breaks an exact tie upwards
/// (1690060720831323.25 → `…323.3`, Python `…323.2`); re-rounding the exact value to that
/// many digits, which Rust does half-to-even, gives Python's choice. The nearest decimal of
/// that length is at least as close as `{:e}`'s, so it round-trips as well.
fn shortest_scientific(x: f64) -> String {
    let shortest = format!("{x:e}");
    let mantissa = shortest.split_once('e').map_or(&*shortest, |(m, _)| m);
    let digits = mantissa.chars().filter(char::is_ascii_digit).count();
    format!("{x:.prec$e}", prec = digits - 1)
}

/// `digits` (d₀d₁…, value d₀.d₁… × 10^exp) written without an exponent, always with a
/// fractional part.
fn positional(digits: &str, exp: i32) -> String {
    if exp < 0 {
        let zeros = "0".repeat((-exp - 1) as usize);
        return format!("0.{zeros}{digits}");
    }
    let int_len = exp as usize + 1;
    if digits.len() <= int_len {
        let zeros = "0".repeat(int_len - digits.len());
        format!("{digits}{zeros}.0")
    } else {
        format!("{}.{}", &digits[..int_len], &digits[int_len..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_ids_beyond_num_labels_as_classes() {
        let m = classification_metrics(&[0, 5], &[0, 5], 3);
        assert_eq!(m.accuracy, 1.0);
        assert_eq!(m.f1, 1.0);
    }

    #[test]
    fn empty_input_is_all_zero() {
        let m = classification_metrics(&[], &[], 3);
        assert_eq!(m.accuracy, 0.0);
        assert_eq!(m.f1, 0.0);
        assert_eq!(m.matthews_correlation, 0.0);
    }

    #[test]
    #[should_panic(expected = "3 predictions for 2 labels")]
    fn mismatched_lengths_panic() {
        classification_metrics(&[0, 1, 1], &[0, 1], 2);
    }

    #[test]
    fn str_repr_picks_quotes_like_python() {
        assert_eq!(python_str_repr("eval_loss"), "'eval_loss'");
        assert_eq!(python_str_repr("it's"), "\"it's\"");
        assert_eq!(python_str_repr("a'b\"c"), "'a\\'b\"c'");
        assert_eq!(python_str_repr("a\\b\n"), "'a\\\\b\\n'");
    }

    #[test]
    fn positional_places_the_point() {
        assert_eq!(positional("5", -5), "0.00005");
        assert_eq!(positional("125", 0), "1.25");
        assert_eq!(positional("125", 2), "125.0");
        assert_eq!(positional("125", 4), "12500.0");
    }
}
