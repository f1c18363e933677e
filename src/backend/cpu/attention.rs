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
//!
//! The CPU reference computes each (sequence, head) with small GEMMs over strided views of
//! `qkv` (the score matrix is a per-head temporary, never a tensor of the op), heads in parallel.
//!
//! 16-bit products (`rounding` F16 or Bf16, chosen by [`crate::backend::attention_rounding`]):
//! the emulation of kernels/attention_tc.cu (its header has the math), so that the GPU's
//! tensor-core attention has a reference that rounds where it rounds. The two still differ by
//! summation order, by the GPU's exp2f (ex2.approx.f32 based, up to 2 ulp) and log2f against
//! `f32::exp2`/`log2` here, and by the 16-bit rounding flips these cause near a midpoint;
//! tests/cuda_ops.rs (`attention_tensor_cores`) bounds both against an f64 reference instead of
//! comparing them bitwise. Q, K, V and dO are rounded to the format; with `c2 = (1/√d)·log2 e`,
//! `s = c2·(q̂·k̂)`, `M = ⌈max_j s_j⌉`,
//! `e_j = 2^(s_j − M)`, `l = Σ e_j`: `P̃ = r16(e)·keep`, `o = (rp/l)·P̃·V̂`,
//! `lse = (M + log2 l)·ln 2`; backward `P = 2^(c2·(q̂·k̂) − lse·log2 e)`, `dP = dÔ·V̂ᵀ`,
//! `P̂ = r16(P·keep)`, `dŜ = r16(P·(keep·rp·dP − D))`, `dv = rp·P̂ᵀ·dÔ`, `dq = scale·dŜ·K̂`,
//! `dk = scale·dŜᵀ·Q̂` (`rp = 1/(1−p)`, 0 for p ≥ 1, 1 without dropout; `D = dO·o` from dO in
//! fp32 and o as stored: `r16(o)` when the backend keeps `out` 16-bit).
//! Any other `rounding` computes in fp32 as described above.

use rayon::prelude::*;

use super::matmul::{round_operand, sgemm_serial};
use crate::backend::philox::uniform4;
use crate::backend::{AttentionDims, Dropout, MatmulPrecision, SeqLayout};

/// Whether `rounding` selects the 16-bit emulation.
fn is_16bit(rounding: MatmulPrecision) -> bool {
    matches!(rounding, MatmulPrecision::F16 | MatmulPrecision::Bf16)
}

/// The factor kept elements are scaled by: `1/(1−p)`, 0 when everything is dropped, 1 without
/// dropout (the kernels' `keep_factor`).
fn keep_factor(d: Dropout) -> f32 {
    if !d.is_active() {
        1.0
    } else if d.p < 1.0 {
        1.0 / (1.0 - d.p)
    } else {
        0.0
    }
}

/// `(1/√d)·log2 e` in fp32, as the tensor-core kernels compute it.
fn scale_log2(d: usize) -> f32 {
    (1.0 / (d as f32).sqrt()) * std::f32::consts::LOG2_E
}

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

/// One (sequence, head): its rows, and the offsets of its Q, K, V within `qkv`.
struct Head {
    b: usize,
    h: usize,
    start: usize,
    rows: usize,
    valid: usize,
    q: usize,
    k: usize,
    v: usize,
}

fn heads_of(layout: &SeqLayout, dims: AttentionDims) -> Vec<Head> {
    let hidden = dims.heads * dims.head_dim;
    let mut v = Vec::new();
    for b in 0..layout.batch() {
        let start = layout.starts[b] as usize;
        for h in 0..dims.heads {
            let q = start * 3 * hidden + h * dims.head_dim;
            v.push(Head {
                b,
                h,
                start,
                rows: layout.rows[b] as usize,
                valid: layout.valid[b] as usize,
                q,
                k: q + hidden,
                v: q + 2 * hidden,
            });
        }
    }
    v
}

/// `s = scale·Q·Kᵀ` (`[rows, valid]`) of one head.
fn scores(s: &mut [f32], qkv: &[f32], head: &Head, d: usize, hidden: usize, scale: f32) {
    let qkv_rs = 3 * hidden;
    sgemm_serial(
        head.rows,
        head.valid,
        d,
        &qkv[head.q..],
        (qkv_rs, 1),
        &qkv[head.k..],
        (1, qkv_rs),
        s,
        false,
    );
    s.iter_mut().for_each(|x| *x *= scale);
}

/// What the GPU launcher checks too: sequences of at most 65535 rows, each with 1 ≤ valid ≤ rows
/// (a sequence with no valid key has no softmax).
fn assert_layout(layout: &SeqLayout) {
    assert!(
        layout.is_back_to_back(),
        "the sequences must lie back to back from row 0 (starts {:?}, rows {:?})",
        layout.starts,
        layout.rows
    );
    assert!(
        layout.max_rows() < 1 << 16,
        "sequences are limited to 65535 rows"
    );
    for (b, (&v, &r)) in layout.valid.iter().zip(&layout.rows).enumerate() {
        assert!(
            v >= 1 && v <= r,
            "sequence {b} has {v} valid rows out of {r} (needs 1 ≤ valid ≤ rows)"
        );
    }
}

pub fn attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &[f32],
    layout: &SeqLayout,
    dims: AttentionDims,
    dropout: Dropout,
    rounding: MatmulPrecision,
) {
    assert_layout(layout);
    if is_16bit(rounding) {
        return attention_forward_16(out, lse, qkv, layout, dims, dropout, rounding);
    }
    let AttentionDims { heads, head_dim: d } = dims;
    let hidden = heads * d;
    let rows = layout.total_rows();
    assert_eq!(
        (out.len(), lse.len(), qkv.len()),
        (rows * hidden, rows * heads, rows * 3 * hidden)
    );
    let scale = 1.0 / (d as f32).sqrt();
    let results: Vec<_> = heads_of(layout, dims)
        .into_par_iter()
        .map(|head| {
            let (n, valid) = (head.rows, head.valid);
            let mut p = vec![0.0f32; n * valid];
            scores(&mut p, qkv, &head, d, hidden, scale);
            let mut l = vec![0.0f32; n];
            let mut m = vec![0.0f32; valid];
            for (i, row) in p.chunks_mut(valid).enumerate() {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                row.iter_mut().for_each(|s| {
                    *s = (*s - max).exp();
                    sum += *s;
                });
                l[i] = max + sum.ln();
                dropout_factors(&mut m, dropout, head.b, head.h, heads, i);
                row.iter_mut().zip(&m).for_each(|(x, f)| *x = *x / sum * f);
            }
            let mut o = vec![0.0f32; n * d];
            sgemm_serial(
                n,
                d,
                valid,
                &p,
                (valid, 1),
                &qkv[head.v..],
                (3 * hidden, 1),
                &mut o,
                false,
            );
            (head, o, l)
        })
        .collect();
    for (head, o, l) in results {
        for (i, oi) in o.chunks(d).enumerate() {
            out[(head.start + i) * hidden + head.h * d..][..d].copy_from_slice(oi);
            lse[(head.start + i) * heads + head.h] = l[i];
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
    rounding: MatmulPrecision,
) {
    assert_layout(layout);
    if is_16bit(rounding) {
        return attention_backward_16(dqkv, dout, qkv, out, lse, layout, dims, dropout, rounding);
    }
    let AttentionDims { heads, head_dim: d } = dims;
    let hidden = heads * d;
    let rows = layout.total_rows();
    assert_eq!(
        (dqkv.len(), dout.len(), out.len(), qkv.len(), lse.len()),
        (
            rows * 3 * hidden,
            rows * hidden,
            rows * hidden,
            rows * 3 * hidden,
            rows * heads
        )
    );
    let scale = 1.0 / (d as f32).sqrt();
    let qkv_rs = 3 * hidden;
    let results: Vec<_> = heads_of(layout, dims)
        .into_par_iter()
        .map(|head| {
            let (n, valid) = (head.rows, head.valid);
            let o_at = head.start * hidden + head.h * d;
            // p: probabilities recomputed from the kept log-sum-exp.
            let mut p = vec![0.0f32; n * valid];
            scores(&mut p, qkv, &head, d, hidden, scale);
            for (i, row) in p.chunks_mut(valid).enumerate() {
                let l = lse[(head.start + i) * heads + head.h];
                row.iter_mut().for_each(|s| *s = (*s - l).exp());
            }
            // dp[i, j] = dO_i·v_j
            let mut dp = vec![0.0f32; n * valid];
            sgemm_serial(
                n,
                valid,
                d,
                &dout[o_at..],
                (hidden, 1),
                &qkv[head.v..],
                (1, qkv_rs),
                &mut dp,
                false,
            );
            // pm = p·m (the dropped probabilities forward used); ds = p·(m·dp − D)·scale.
            let mut pm = vec![0.0f32; n * valid];
            let mut m = vec![0.0f32; valid];
            for i in 0..n {
                let at = (head.start + i) * hidden + head.h * d;
                let big_d: f32 = dout[at..at + d]
                    .iter()
                    .zip(&out[at..at + d])
                    .map(|(a, b)| a * b)
                    .sum();
                dropout_factors(&mut m, dropout, head.b, head.h, heads, i);
                let r = i * valid..(i + 1) * valid;
                for ((pm, ds), (p, f)) in pm[r.clone()]
                    .iter_mut()
                    .zip(&mut dp[r.clone()])
                    .zip(p[r].iter().zip(&m))
                {
                    *pm = p * f;
                    *ds = p * (f * *ds - big_d) * scale;
                }
            }
            let ds = dp;
            // dv = pmᵀ·dO, dq = ds·K, dk = dsᵀ·Q
            let (dq, dk, dv) = head_grads(&pm, &ds, &dout[o_at..], qkv, &head, d, hidden);
            (head, dq, dk, dv)
        })
        .collect();
    scatter_head_grads(dqkv, results, d, qkv_rs);
}

/// [`attention_forward`] with 16-bit products (see the module header).
fn attention_forward_16(
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &[f32],
    layout: &SeqLayout,
    dims: AttentionDims,
    dropout: Dropout,
    rounding: MatmulPrecision,
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
    let qkv = round_operand(qkv, rounding);
    let qkv_rs = 3 * hidden;
    let c2 = scale_log2(d);
    let rp = keep_factor(dropout);
    let results: Vec<_> = heads_of(layout, dims)
        .into_par_iter()
        .map(|head| {
            let (n, valid) = (head.rows, head.valid);
            // p: raw scores q̂·k̂, then the rounded, dropped e.
            let mut p = vec![0.0f32; n * valid];
            sgemm_serial(
                n,
                valid,
                d,
                &qkv[head.q..],
                (qkv_rs, 1),
                &qkv[head.k..],
                (1, qkv_rs),
                &mut p,
                false,
            );
            let mut l = vec![0.0f32; n];
            let mut inv = vec![0.0f32; n];
            let mut m = vec![0.0f32; valid];
            for (i, row) in p.chunks_mut(valid).enumerate() {
                row.iter_mut().for_each(|s| *s *= c2);
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max).ceil();
                dropout_factors(&mut m, dropout, head.b, head.h, heads, i);
                let mut sum = 0.0f32;
                for (x, f) in row.iter_mut().zip(&m) {
                    let e = (*x - max).exp2();
                    sum += e;
                    *x = if *f != 0.0 { rounding.round(e) } else { 0.0 };
                }
                l[i] = (max + sum.log2()) * std::f32::consts::LN_2;
                inv[i] = if sum > 0.0 { rp / sum } else { 0.0 };
            }
            let mut o = vec![0.0f32; n * d];
            sgemm_serial(
                n,
                d,
                valid,
                &p,
                (valid, 1),
                &qkv[head.v..],
                (qkv_rs, 1),
                &mut o,
                false,
            );
            for (oi, s) in o.chunks_mut(d).zip(&inv) {
                oi.iter_mut().for_each(|x| *x *= s);
            }
            (head, o, l)
        })
        .collect();
    for (head, o, l) in results {
        for (i, oi) in o.chunks(d).enumerate() {
            out[(head.start + i) * hidden + head.h * d..][..d].copy_from_slice(oi);
            lse[(head.start + i) * heads + head.h] = l[i];
        }
    }
}

/// [`attention_backward`] with 16-bit products (see the module header).
#[allow(clippy::too_many_arguments)]
fn attention_backward_16(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    layout: &SeqLayout,
    dims: AttentionDims,
    dropout: Dropout,
    rounding: MatmulPrecision,
) {
    let AttentionDims { heads, head_dim: d } = dims;
    let hidden = heads * d;
    let rows = layout.total_rows();
    assert_eq!(
        (dqkv.len(), dout.len(), out.len(), qkv.len(), lse.len()),
        (
            rows * 3 * hidden,
            rows * hidden,
            rows * hidden,
            rows * 3 * hidden,
            rows * heads
        )
    );
    let (qkv, dout16) = (round_operand(qkv, rounding), round_operand(dout, rounding));
    let scale = 1.0 / (d as f32).sqrt();
    let c2 = scale_log2(d);
    let rp = keep_factor(dropout);
    let qkv_rs = 3 * hidden;
    let results: Vec<_> = heads_of(layout, dims)
        .into_par_iter()
        .map(|head| {
            let (n, valid) = (head.rows, head.valid);
            let o_at = head.start * hidden + head.h * d;
            let mut p = vec![0.0f32; n * valid];
            sgemm_serial(
                n,
                valid,
                d,
                &qkv[head.q..],
                (qkv_rs, 1),
                &qkv[head.k..],
                (1, qkv_rs),
                &mut p,
                false,
            );
            for (i, row) in p.chunks_mut(valid).enumerate() {
                let l2 = lse[(head.start + i) * heads + head.h] * std::f32::consts::LOG2_E;
                row.iter_mut().for_each(|s| *s = (*s * c2 - l2).exp2());
            }
            // dp[i, j] = dÔ_i·v̂_j
            let mut dp = vec![0.0f32; n * valid];
            sgemm_serial(
                n,
                valid,
                d,
                &dout16[o_at..],
                (hidden, 1),
                &qkv[head.v..],
                (1, qkv_rs),
                &mut dp,
                false,
            );
            // pm = P̂ = r16(p·keep); ds = dŜ = r16(p·(keep·rp·dp − D)).
            let mut pm = vec![0.0f32; n * valid];
            let mut m = vec![0.0f32; valid];
            for i in 0..n {
                let at = (head.start + i) * hidden + head.h * d;
                let big_d: f32 = dout[at..at + d]
                    .iter()
                    .zip(&out[at..at + d])
                    .map(|(a, b)| a * b)
                    .sum();
                dropout_factors(&mut m, dropout, head.b, head.h, heads, i);
                let r = i * valid..(i + 1) * valid;
                for ((pm, ds), (p, f)) in pm[r.clone()]
                    .iter_mut()
                    .zip(&mut dp[r.clone()])
                    .zip(p[r].iter().zip(&m))
                {
                    let keep = *f != 0.0;
                    *pm = if keep { rounding.round(*p) } else { 0.0 };
                    let f = if keep { rp } else { 0.0 };
                    *ds = rounding.round(p * (f * *ds - big_d));
                }
            }
            let ds = dp;
            // dv = P̂ᵀ·dÔ, dq = dŜ·K̂, dk = dŜᵀ·Q̂ (then scaled)
            let (mut dq, mut dk, mut dv) =
                head_grads(&pm, &ds, &dout16[o_at..], &qkv, &head, d, hidden);
            dv.iter_mut().for_each(|x| *x *= rp);
            dq.iter_mut().for_each(|x| *x *= scale);
            dk.iter_mut().for_each(|x| *x *= scale);
            (head, dq, dk, dv)
        })
        .collect();
    scatter_head_grads(dqkv, results, d, qkv_rs);
}

/// One head's `dv = pmᵀ·dO`, `dq = ds·K`, `dk = dsᵀ·Q` from its `pm` and `ds` (`[rows, valid]`),
/// `dout` from the head's first output element, and `qkv` (both backward paths share it).
fn head_grads(
    pm: &[f32],
    ds: &[f32],
    dout: &[f32],
    qkv: &[f32],
    head: &Head,
    d: usize,
    hidden: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (n, valid, qkv_rs) = (head.rows, head.valid, 3 * hidden);
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; n * d],
        vec![0.0f32; valid * d],
        vec![0.0f32; valid * d],
    );
    sgemm_serial(
        valid,
        d,
        n,
        pm,
        (1, valid),
        dout,
        (hidden, 1),
        &mut dv,
        false,
    );
    sgemm_serial(
        n,
        d,
        valid,
        ds,
        (valid, 1),
        &qkv[head.k..],
        (qkv_rs, 1),
        &mut dq,
        false,
    );
    sgemm_serial(
        valid,
        d,
        n,
        ds,
        (1, valid),
        &qkv[head.q..],
        (qkv_rs, 1),
        &mut dk,
        false,
    );
    (dq, dk, dv)
}

/// One head with its (dq, dk, dv).
type HeadGrads = (Head, Vec<f32>, Vec<f32>, Vec<f32>);

/// Writes every head's gradients into `dqkv` (zero elsewhere: padding keys' slots stay 0).
fn scatter_head_grads(dqkv: &mut [f32], results: Vec<HeadGrads>, d: usize, qkv_rs: usize) {
    dqkv.fill(0.0);
    for (head, dq, dk, dv) in results {
        for (i, g) in dq.chunks(d).enumerate() {
            dqkv[head.q + i * qkv_rs..][..d].copy_from_slice(g);
        }
        for (j, (gk, gv)) in dk.chunks(d).zip(dv.chunks(d)).enumerate() {
            dqkv[head.k + j * qkv_rs..][..d].copy_from_slice(gk);
            dqkv[head.v + j * qkv_rs..][..d].copy_from_slice(gv);
        }
    }
}
