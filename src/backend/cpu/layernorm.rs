//! LayerNorm over the last dimension, optionally fused with the residual add before it.
//!
//! Forward (per row of `cols`):
//!   `s = x`, or with a fused residual add `s = dropout(x) + residual` (kept in `sum`), `mean = Σs/cols`, `var = Σ(s − mean)²/cols` (biased, as PyTorch),
//!   `rstd = 1/√(var + eps)`, `out = (s − mean)·rstd·gamma + beta`; `mean`, `rstd` are kept.
//! Backward, with `ŝ = (s − mean)·rstd` and `g = dout·gamma`:
//!   `ds = rstd·(g − mean(g) − ŝ·mean(g·ŝ))`, `dgamma += Σ_rows dout·ŝ`, `dbeta += Σ_rows dout`.
//!   For a fused residual, `ds` is the gradient of `residual`, and `dropout_backward(ds)` (with
//!   the forward's mask) the gradient of the branch `x`, written by the backend when asked.
//! Statistics are accumulated in f64 here (the reference); kernels keep them in fp32.

use rayon::prelude::*;

use super::dropout::dropout_forward;
use crate::backend::Dropout;

#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    s: &[f32],
    gamma: &[f32],
    beta: &[f32],
    rows: usize,
    cols: usize,
    eps: f32,
) {
    assert_eq!(
        (out.len(), s.len(), mean.len(), rstd.len()),
        (rows * cols, rows * cols, rows, rows)
    );
    assert_eq!((gamma.len(), beta.len()), (cols, cols));
    out.par_chunks_mut(cols)
        .zip(s.par_chunks(cols))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((o, x), (m, r))| {
            let mu = x.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
            let var = x.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / cols as f64;
            let rs = 1.0 / (var + eps as f64).sqrt();
            for c in 0..cols {
                o[c] = ((x[c] as f64 - mu) * rs) as f32 * gamma[c] + beta[c];
            }
            (*m, *r) = (mu as f32, rs as f32);
        });
}

/// `sum = dropout(x) + residual`, the residual add a fused LayerNorm starts with (the same
/// mask as `dropout_forward` over `x`).
pub fn residual_add(sum: &mut [f32], x: &[f32], residual: &[f32], d: Dropout) {
    assert_eq!((x.len(), residual.len()), (sum.len(), sum.len()));
    dropout_forward(sum, x, d);
    sum.par_iter_mut()
        .zip(residual.par_iter())
        .for_each(|(s, r)| *s += r);
}

#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    dout: &[f32],
    s: &[f32],
    mean: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    rows: usize,
    cols: usize,
) {
    assert_eq!(
        (dx.len(), dout.len(), s.len(), mean.len(), rstd.len()),
        (rows * cols, rows * cols, rows * cols, rows, rows)
    );
    assert_eq!((dgamma.len(), dbeta.len(), gamma.len()), (cols, cols, cols));
    dx.par_chunks_mut(cols).enumerate().for_each(|(r, dxr)| {
        let (x, dy) = (
            &s[r * cols..(r + 1) * cols],
            &dout[r * cols..(r + 1) * cols],
        );
        let (mu, rs) = (mean[r] as f64, rstd[r] as f64);
        let (mut mean_g, mut mean_gx) = (0.0f64, 0.0f64);
        for c in 0..cols {
            let g = dy[c] as f64 * gamma[c] as f64;
            mean_g += g;
            mean_gx += g * (x[c] as f64 - mu) * rs;
        }
        mean_g /= cols as f64;
        mean_gx /= cols as f64;
        for c in 0..cols {
            let xhat = (x[c] as f64 - mu) * rs;
            let g = dy[c] as f64 * gamma[c] as f64;
            dxr[c] = (rs * (g - mean_g - xhat * mean_gx)) as f32;
        }
    });
    // Parameter gradients: reduce over rows in blocks, in parallel.
    let partial = (0..rows)
        .into_par_iter()
        .chunks(64)
        .map(|rs_block| {
            let (mut dg, mut db) = (vec![0.0f32; cols], vec![0.0f32; cols]);
            for r in rs_block {
                let (x, dy) = (
                    &s[r * cols..(r + 1) * cols],
                    &dout[r * cols..(r + 1) * cols],
                );
                for c in 0..cols {
                    let xhat = (x[c] - mean[r]) * rstd[r];
                    dg[c] += dy[c] * xhat;
                    db[c] += dy[c];
                }
            }
            (dg, db)
        })
        .collect::<Vec<_>>();
    for (dg, db) in partial {
        dgamma.iter_mut().zip(&dg).for_each(|(a, v)| *a += v);
        dbeta.iter_mut().zip(&db).for_each(|(a, v)| *a += v);
    }
}
