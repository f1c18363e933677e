//! Dropout with a counter-based mask (Philox; see `backend::philox`).
//!
//! `keep[i] = uniform(seed, stream, i) ≥ p`, `out[i] = keep[i] ? x[i]/(1−p) : 0`.
//! Backward regenerates `keep` from the same (seed, stream) instead of reading a stored mask:
//! `dx[i] = keep[i] ? dout[i]/(1−p) : 0`. Element `i` is the flat index within the tensor.

use rayon::prelude::*;

use crate::backend::philox::uniform4;
use crate::backend::Dropout;

/// `out[i] = keep[i]·x[i]/(1−p)`: forward and backward are the same map.
pub fn dropout_apply(out: &mut [f32], x: &[f32], d: Dropout) {
    assert_eq!(out.len(), x.len());
    if !d.is_active() {
        out.copy_from_slice(x);
        return;
    }
    let scale = 1.0 / (1.0 - d.p);
    out.par_chunks_mut(4)
        .zip(x.par_chunks(4))
        .enumerate()
        .for_each(|(block, (o, x))| {
            let u = uniform4(d.seed, d.stream, block as u64);
            for i in 0..o.len() {
                o[i] = if u[i] >= d.p { x[i] * scale } else { 0.0 };
            }
        });
}

pub fn dropout_forward(out: &mut [f32], x: &[f32], d: Dropout) {
    dropout_apply(out, x, d)
}

pub fn dropout_backward(dx: &mut [f32], dout: &[f32], d: Dropout) {
    dropout_apply(dx, dout, d)
}
