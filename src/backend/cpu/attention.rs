//! Multi-head self-attention with the padding mask and attention dropout, flash-style: forward
//! keeps only the log-sum-exp of each softmax row, backward recomputes the probabilities.
//!
//! Layout (`H = heads·d`): `qkv[r, 3, heads, d]` — the output of one QKV GEMM, so
//! `q(r, h) = qkv[r·3H + h·d ..][..d]`, `k` at `+H`, `v` at `+2H`; `out[r, heads, d]` (= `[rows, H]`);
//! `lse[r, heads]`. Sequence `b` is rows `starts[b] .. starts[b] + rows[b]`, of which the first
//! `valid[b]` are keys; padding rows are queries like any other (as transformers computes them).
//!
//! Forward, for query `i` and key `j < valid` of head `h` in sequence `b`, scale `1/√d`:
//!   `s_ij = scale·q_i·k_j`, `lse_i = log Σ_j e^(s_ij)`, `p_ij = e^(s_ij − lse_i)`,
//!   `o_i = Σ_j p_ij·m_ij·v_j` with the dropout factor `m_ij = keep_ij/(1−p)`.
//! Backward, with `D_i = dO_i·o_i` (equal to `Σ_j p_ij·m_ij·(dO_i·v_j)`):
//!   `dv_j = Σ_i p_ij·m_ij·dO_i`, `ds_ij = p_ij·(m_ij·(dO_i·v_j) − D_i)`,
//!   `dq_i = scale·Σ_j ds_ij·k_j`, `dk_j = scale·Σ_i ds_ij·q_i`; padding keys get zero gradient.
//! Dropout element of (b, h, i, j): Philox index `((b·heads + h)·2¹⁶ + i)·2¹⁶ + j`, so masks do
//! not depend on how the batch is laid out in rows.

use rayon::prelude::*;

use crate::backend::philox::uniform4;
use crate::backend::{AttentionDims, Dropout, SeqLayout};

/// The dropout factors `m_ij` of one query row (all 1 without dropout).
fn dropout_factors(factors: &mut [f32], d: Dropout, b: usize, h: usize, heads: usize, i: usize) {
    if !d.is_active() {
        factors.fill(1.0);
        return;
    }
    let scale = 1.0 / (1.0 - d.p);
    let row_index = (((b * heads + h) as u64) << 32) | ((i as u64) << 16);
    for (chunk, fs) in factors.chunks_mut(4).enumerate() {
        let u = uniform4(d.seed, d.stream, (row_index >> 2) + chunk as u64);
        for (f, u) in fs.iter_mut().zip(u) {
            *f = if u >= d.p { scale } else { 0.0 };
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

struct Head<'a> {
    qkv: &'a [f32],
    start: usize,
    stride: usize,
    h_off: usize,
    hidden: usize,
    d: usize,
}

impl Head<'_> {
    fn q(&self, i: usize) -> &[f32] {
        &self.qkv[(self.start + i) * self.stride + self.h_off..][..self.d]
    }
    fn k(&self, j: usize) -> &[f32] {
        &self.qkv[(self.start + j) * self.stride + self.hidden + self.h_off..][..self.d]
    }
    fn v(&self, j: usize) -> &[f32] {
        &self.qkv[(self.start + j) * self.stride + 2 * self.hidden + self.h_off..][..self.d]
    }
}

fn heads_of(layout: &SeqLayout, heads: usize) -> Vec<(usize, usize)> {
    (0..layout.batch())
        .flat_map(|b| (0..heads).map(move |h| (b, h)))
        .collect()
}

pub fn attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &[f32],
    layout: &SeqLayout,
    dims: AttentionDims,
    dropout: Dropout,
) {
    let AttentionDims { heads, head_dim: d } = dims;
    let hidden = heads * d;
    let rows = layout.total_rows();
    assert_eq!(
        (out.len(), lse.len(), qkv.len()),
        (rows * hidden, rows * heads, rows * 3 * hidden)
    );
    assert!(
        layout.max_rows() < 1 << 16,
        "sequences are limited to 65535 rows"
    );
    let scale = 1.0 / (d as f32).sqrt();
    let results: Vec<_> = heads_of(layout, heads)
        .into_par_iter()
        .map(|(b, h)| {
            let (start, n_rows, valid) = (
                layout.starts[b] as usize,
                layout.rows[b] as usize,
                layout.valid[b] as usize,
            );
            let head = Head {
                qkv,
                start,
                stride: 3 * hidden,
                h_off: h * d,
                hidden,
                d,
            };
            let (mut o, mut l) = (vec![0.0f32; n_rows * d], vec![0.0f32; n_rows]);
            let (mut p, mut m) = (vec![0.0f32; valid], vec![0.0f32; valid]);
            for i in 0..n_rows {
                let q = head.q(i);
                for j in 0..valid {
                    p[j] = scale * dot(q, head.k(j));
                }
                let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                p.iter_mut().for_each(|s| {
                    *s = (*s - max).exp();
                    sum += *s;
                });
                l[i] = max + sum.ln();
                dropout_factors(&mut m, dropout, b, h, heads, i);
                let oi = &mut o[i * d..(i + 1) * d];
                for j in 0..valid {
                    axpy(oi, p[j] / sum * m[j], head.v(j));
                }
            }
            (b, h, o, l)
        })
        .collect();
    for (b, h, o, l) in results {
        let start = layout.starts[b] as usize;
        for (i, oi) in o.chunks(d).enumerate() {
            out[(start + i) * hidden + h * d..][..d].copy_from_slice(oi);
            lse[(start + i) * heads + h] = l[i];
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    layout: &SeqLayout,
    dims: AttentionDims,
    dropout: Dropout,
) {
    let AttentionDims { heads, head_dim: d } = dims;
    let hidden = heads * d;
    let rows = layout.total_rows();
    assert_eq!(
        (dqkv.len(), dout.len(), out.len()),
        (rows * 3 * hidden, rows * hidden, rows * hidden)
    );
    let scale = 1.0 / (d as f32).sqrt();
    let results: Vec<_> = heads_of(layout, heads)
        .into_par_iter()
        .map(|(b, h)| {
            let (start, n_rows, valid) = (
                layout.starts[b] as usize,
                layout.rows[b] as usize,
                layout.valid[b] as usize,
            );
            let head = Head {
                qkv,
                start,
                stride: 3 * hidden,
                h_off: h * d,
                hidden,
                d,
            };
            let (mut dq, mut dk, mut dv) = (
                vec![0.0f32; n_rows * d],
                vec![0.0f32; valid * d],
                vec![0.0f32; valid * d],
            );
            let mut m = vec![0.0f32; valid];
            for i in 0..n_rows {
                let (q, row) = (head.q(i), (start + i) * hidden + h * d);
                let (d_o, o) = (&dout[row..row + d], &out[row..row + d]);
                let big_d = dot(d_o, o);
                let l = lse[(start + i) * heads + h];
                dropout_factors(&mut m, dropout, b, h, heads, i);
                for j in 0..valid {
                    let p = (scale * dot(q, head.k(j)) - l).exp();
                    let dp = dot(d_o, head.v(j));
                    axpy(&mut dv[j * d..(j + 1) * d], p * m[j], d_o);
                    let ds = p * (m[j] * dp - big_d) * scale;
                    axpy(&mut dq[i * d..(i + 1) * d], ds, head.k(j));
                    axpy(&mut dk[j * d..(j + 1) * d], ds, q);
                }
            }
            (b, h, dq, dk, dv)
        })
        .collect();
    dqkv.fill(0.0);
    for (b, h, dq, dk, dv) in results {
        let start = layout.starts[b] as usize;
        let at = |r: usize, part: usize| (start + r) * 3 * hidden + part * hidden + h * d;
        for (i, g) in dq.chunks(d).enumerate() {
            dqkv[at(i, 0)..][..d].copy_from_slice(g);
        }
        for (j, (gk, gv)) in dk.chunks(d).zip(dv.chunks(d)).enumerate() {
            dqkv[at(j, 1)..][..d].copy_from_slice(gk);
            dqkv[at(j, 2)..][..d].copy_from_slice(gv);
        }
    }
}
