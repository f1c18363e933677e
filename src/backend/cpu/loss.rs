//! Softmax cross-entropy with label smoothing, per row of `[rows, classes]` logits.
//!
//! `log p_c = z_c − logsumexp(z)`,
//! `loss = (1−ε)·(−log p_y) + ε·mean_c(−log p_c)`   (= PyTorch's `cross_entropy(label_smoothing=ε)`),
//! `dz_c = scale·(p_c − (1−ε)·[c = y] − ε/C)`.
//! The caller reduces `loss` (the mean over rows) and passes `scale = 1/rows` to backward.
//!
//! The forward, the backward and the fused forward + backward share the per-row math
//! ([`row_loss`], [`row_grad`]) over one log-softmax per row, so the fused op gives exactly the
//! bits of the other two.
//!
//! A row labelled [`IGNORE_LABEL`] (a dummy sequence of a batch padded to its sequence bucket)
//! has loss 0 and gradient 0 exactly, and the caller's mean does not count it; any other label
//! out of range panics.

use crate::backend::IGNORE_LABEL;

pub fn log_softmax_row(z: &[f32]) -> Vec<f64> {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    z.iter().map(|&v| v as f64 - lse).collect()
}

/// The label as an index, `None` for [`IGNORE_LABEL`].
fn checked_label(label: u32, classes: usize) -> Option<usize> {
    if label == IGNORE_LABEL {
        return None;
    }
    assert!(
        (label as usize) < classes,
        "label {label} out of range for {classes} classes"
    );
    Some(label as usize)
}

/// One row's loss from its log-probabilities `logp` and label `y` (0 for an ignored row).
fn row_loss(logp: &[f64], y: Option<usize>, smoothing: f32) -> f32 {
    let Some(y) = y else {
        return 0.0;
    };
    let eps = smoothing as f64;
    let mean_nll = -logp.iter().sum::<f64>() / logp.len() as f64;
    ((1.0 - eps) * -logp[y] + eps * mean_nll) as f32
}

/// One row's gradient `dz` (overwritten) from its log-probabilities `logp` and label `y` (0
/// for an ignored row).
fn row_grad(dz: &mut [f32], logp: &[f64], y: Option<usize>, smoothing: f32, scale: f32) {
    let Some(y) = y else {
        dz.fill(0.0);
        return;
    };
    let (eps, classes) = (smoothing as f64, logp.len());
    for c in 0..classes {
        let target = (1.0 - eps) * (c == y) as u8 as f64 + eps / classes as f64;
        dz[c] = (scale as f64 * (logp[c].exp() - target)) as f32;
    }
}

pub fn cross_entropy_forward(
    losses: &mut [f32],
    logits: &[f32],
    labels: &[u32],
    classes: usize,
    smoothing: f32,
) {
    assert_eq!(
        (losses.len(), logits.len()),
        (labels.len(), labels.len() * classes)
    );
    for (r, z) in logits.chunks(classes).enumerate() {
        let y = checked_label(labels[r], classes);
        losses[r] = row_loss(&log_softmax_row(z), y, smoothing);
    }
}

pub fn cross_entropy_backward(
    dlogits: &mut [f32],
    logits: &[f32],
    labels: &[u32],
    classes: usize,
    smoothing: f32,
    scale: f32,
) {
    assert_eq!(
        (dlogits.len(), logits.len()),
        (labels.len() * classes, labels.len() * classes)
    );
    for (r, (dz, z)) in dlogits
        .chunks_mut(classes)
        .zip(logits.chunks(classes))
        .enumerate()
    {
        let y = checked_label(labels[r], classes);
        row_grad(dz, &log_softmax_row(z), y, smoothing, scale);
    }
}

/// [`cross_entropy_forward`] and [`cross_entropy_backward`] in one pass: each row's
/// log-softmax is computed once and gives both its loss and its gradient.
pub fn cross_entropy_forward_backward(
    losses: &mut [f32],
    dlogits: &mut [f32],
    logits: &[f32],
    labels: &[u32],
    classes: usize,
    smoothing: f32,
    scale: f32,
) {
    let rows = labels.len();
    assert_eq!(
        (losses.len(), dlogits.len(), logits.len()),
        (rows, rows * classes, rows * classes)
    );
    for (r, (dz, z)) in dlogits
        .chunks_mut(classes)
        .zip(logits.chunks(classes))
        .enumerate()
    {
        let y = checked_label(labels[r], classes);
        let logp = log_softmax_row(z);
        losses[r] = row_loss(&logp, y, smoothing);
        row_grad(dz, &logp, y, smoothing, scale);
    }
}
