//! The first token of every sequence (BERT's [CLS], read by the pooler).
//!
//! Forward: `out[b, :] = x[starts[b], :]`; backward: `dx[starts[b], :] += dout[b, :]`.
//! `x` is `[rows, hidden]`, `out` is `[batch, hidden]`.

use crate::backend::SeqLayout;

pub fn gather_first_tokens(out: &mut [f32], x: &[f32], layout: &SeqLayout, hidden: usize) {
    assert_eq!(out.len(), layout.batch() * hidden);
    for (b, &start) in layout.starts.iter().enumerate() {
        let s = start as usize * hidden;
        out[b * hidden..(b + 1) * hidden].copy_from_slice(&x[s..s + hidden]);
    }
}

pub fn scatter_first_tokens_backward(
    dx: &mut [f32],
    dout: &[f32],
    layout: &SeqLayout,
    hidden: usize,
) {
    assert_eq!(dout.len(), layout.batch() * hidden);
    for (b, &start) in layout.starts.iter().enumerate() {
        let s = start as usize * hidden;
        dx[s..s + hidden]
            .iter_mut()
            .zip(&dout[b * hidden..(b + 1) * hidden])
            .for_each(|(d, g)| *d += g);
    }
}
