//! Softmax cross-entropy with label smoothing, per row of `[rows, classes]` logits.
//!
//! `log p_c = z_c − logsumexp(z)`,
//! `loss = (1−ε)·(−log p_y) + ε·mean_c(−log p_c)`   (= PyTorch's `cross_entropy(label_smoothing=ε)`),
//! `dz_c = scale·(p_c − (1−ε)·[c = y] − ε/C)`.
//! The caller reduces `loss` (the mean over rows) and passes `scale = 1/rows` to backward.
//! A row labelled [`IGNORE_LABEL`] (a dummy sequence of a batch padded to its sequence bucket)
//! has loss 0 and gradient 0 exactly, and the caller's mean does not count it; any other label
//! out of range panics.

use crate::backend::IGNORE_LABEL;

pub fn log_softmax_row(z: &[f32]) -> Vec<f64> {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    z.iter().map(|&v| v as f64 - lse).collect()
}

fn checked_label(label: u32, classes: usize) -> usize {
    assert!(
        (label as usize) < classes,
        "label {label} out of range for {classes} classes"
    );
    label as usize
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
    let eps = smoothing as f64;
    for (r, z) in logits.chunks(classes).enumerate() {
        if labels[r] == IGNORE_LABEL {
            losses[r] = 0.0;
            continue;
        }
        let logp = log_softmax_row(z);
        let y = checked_label(labels[r], classes);
        let mean_nll = -logp.iter().sum::<f64>() / classes as f64;
        losses[r] = ((1.0 - eps) * -logp[y] + eps * mean_nll) as f32;
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
    let eps = smoothing as f64;
    for (r, (dz, z)) in dlogits
        .chunks_mut(classes)
        .zip(logits.chunks(classes))
        .enumerate()
    {
        if labels[r] == IGNORE_LABEL {
            dz.fill(0.0);
            continue;
        }
        let logp = log_softmax_row(z);
        let y = checked_label(labels[r], classes);
        for c in 0..classes {
            let target = (1.0 - eps) * (c == y) as u8 as f64 + eps / classes as f64;
            dz[c] = (scale as f64 * (logp[c].exp() - target)) as f32;
        }
    }
}
