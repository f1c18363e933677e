//! Naive f64 references of the backend ops, for `tests/cpu_ops.rs`.
//!
//! Each function is named as the op it checks and is written from the math (the op's header
//! comment in `src/backend/cpu/`, and what PyTorch computes), as plain loops in f64 — not from
//! the backend's code, so that one mistake cannot hide in both. Inputs are f64 slices, so the
//! forwards double as the functions that central finite differences differentiate.
#![allow(dead_code)]

use bertft_cuda::backend::philox::uniform;
use bertft_cuda::backend::{Activation, AttentionDims, Dropout, MatmulPrecision, SeqLayout};

// ---------------------------------------------------------------------------------------------
// Checking helpers
// ---------------------------------------------------------------------------------------------

/// fp32's unit roundoff, 2⁻²⁴ ≈ 6e-8: one rounding moves a value by at most `U·|value|`, and a
/// sum of `n` terms, in any order, by at most about `n·U·Σ|terms|`.
pub const U: f64 = 1.0 / 16_777_216.0;

pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

pub fn abs(x: &[f64]) -> Vec<f64> {
    x.iter().map(|v| v.abs()).collect()
}

/// Panics, naming the worst element, unless `|got[i] − want[i]| ≤ tol(i)` for every `i`.
/// Returns the largest `|got − want|` (handy when choosing a tolerance).
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: impl Fn(usize) -> f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let (mut worst, mut worst_ratio, mut max_err) = (usize::MAX, 0.0f64, 0.0f64);
    for i in 0..got.len() {
        let err = (got[i] as f64 - want[i]).abs();
        let ratio = if err.is_nan() {
            f64::INFINITY
        } else {
            err / tol(i)
        };
        max_err = max_err.max(err);
        if ratio > worst_ratio {
            (worst, worst_ratio) = (i, ratio);
        }
    }
    assert!(
        worst_ratio <= 1.0,
        "{what}: element {worst} of {}: got {}, want {}, |diff| {:.3e} > tolerance {:.3e}",
        got.len(),
        got[worst],
        want[worst],
        (got[worst] as f64 - want[worst]).abs(),
        tol(worst)
    );
    max_err
}

/// Central finite differences of a scalar function: `∂f/∂x_k ≈ (f(x + h·e_k) − f(x − h·e_k))/2h`.
/// In f64 with `h ≈ 1e-4` and O(1) derivatives the error is `h²·|f'''|/6 + 1e-16·|f|/h ≈ 1e-9`.
pub fn finite_differences(f: impl Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|k| {
            let x0 = xp[k];
            xp[k] = x0 + h;
            let fp = f(&xp);
            xp[k] = x0 - h;
            let fm = f(&xp);
            xp[k] = x0;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// `Σ a·b`: the scalar loss `⟨dout, y⟩` whose gradient a backward op computes.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

// ---------------------------------------------------------------------------------------------
// Dense layers: nn.Linear, y = x·Wᵀ + b
// ---------------------------------------------------------------------------------------------

/// `out[r, j] = bias[j] + Σ_c x[r, c]·w[j, c]`, x `[rows, k]`, w `[n, k]`.
pub fn linear_forward(
    x: &[f64],
    w: &[f64],
    bias: &[f64],
    rows: usize,
    k: usize,
    n: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; rows * n];
    for r in 0..rows {
        for j in 0..n {
            let mut acc = bias[j];
            for c in 0..k {
                acc += x[r * k + c] * w[j * k + c];
            }
            out[r * n + j] = acc;
        }
    }
    out
}

/// `(dx, dw, dbias)` of `⟨dout, linear(x)⟩`: `dx = dout·W`, `dW = doutᵀ·x`, `dbias = Σ_r dout`.
pub fn linear_backward(
    dout: &[f64],
    x: &[f64],
    w: &[f64],
    rows: usize,
    k: usize,
    n: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut dx, mut dw, mut db) = (vec![0.0; rows * k], vec![0.0; n * k], vec![0.0; n]);
    for r in 0..rows {
        for j in 0..n {
            let g = dout[r * n + j];
            db[j] += g;
            for c in 0..k {
                dx[r * k + c] += g * w[j * k + c];
                dw[j * k + c] += g * x[r * k + c];
            }
        }
    }
    (dx, dw, db)
}

// ---------------------------------------------------------------------------------------------
// Embeddings: three nn.Embedding lookups summed
// ---------------------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
pub fn embeddings_forward(
    word: &[f64],
    position: &[f64],
    token_type: &[f64],
    ids: &[u32],
    positions: &[u32],
    type_ids: &[u32],
    hidden: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; ids.len() * hidden];
    for r in 0..ids.len() {
        let (w, p, t) = (ids[r] as usize, positions[r] as usize, type_ids[r] as usize);
        for c in 0..hidden {
            out[r * hidden + c] =
                word[w * hidden + c] + position[p * hidden + c] + token_type[t * hidden + c];
        }
    }
    out
}

/// Gradients of the three tables (`[entries, hidden]` with the given entry counts): every row
/// that was read gets `dout` of each row that read it; `nn.Embedding(padding_idx)` leaves the
/// padding row's gradient at zero (its forward still reads it).
#[allow(clippy::too_many_arguments)]
pub fn embeddings_backward(
    dout: &[f64],
    ids: &[u32],
    positions: &[u32],
    type_ids: &[u32],
    hidden: usize,
    entries: (usize, usize, usize),
    padding_idx: Option<u32>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut dword = vec![0.0; entries.0 * hidden];
    let mut dpos = vec![0.0; entries.1 * hidden];
    let mut dtype = vec![0.0; entries.2 * hidden];
    for r in 0..ids.len() {
        for c in 0..hidden {
            let g = dout[r * hidden + c];
            if padding_idx != Some(ids[r]) {
                dword[ids[r] as usize * hidden + c] += g;
            }
            dpos[positions[r] as usize * hidden + c] += g;
            dtype[type_ids[r] as usize * hidden + c] += g;
        }
    }
    (dword, dpos, dtype)
}

// ---------------------------------------------------------------------------------------------
// LayerNorm (PyTorch: biased variance, eps inside the square root)
// ---------------------------------------------------------------------------------------------

/// `(out, mean, rstd)` per row: `out = (s − μ)/√(σ² + eps)·γ + β`, `σ² = Σ(s − μ)²/cols`.
pub fn layernorm_forward(
    s: &[f64],
    gamma: &[f64],
    beta: &[f64],
    rows: usize,
    cols: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut out, mut mean, mut rstd) = (vec![0.0; rows * cols], vec![0.0; rows], vec![0.0; rows]);
    for r in 0..rows {
        let row = &s[r * cols..(r + 1) * cols];
        let mu = row.iter().sum::<f64>() / cols as f64;
        let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / cols as f64;
        let rs = 1.0 / (var + eps).sqrt();
        for c in 0..cols {
            out[r * cols + c] = (row[c] - mu) * rs * gamma[c] + beta[c];
        }
        (mean[r], rstd[r]) = (mu, rs);
    }
    (out, mean, rstd)
}

/// `(ds, dgamma, dbeta)` of `⟨dout, layernorm(s)⟩`, through the full Jacobian of `ŝ`
/// (a different route from the header's closed form):
/// `∂ŝ_k/∂s_c = r·(δ_kc − 1/n) − r³·(s_k − μ)(s_c − μ)/n`, `r = 1/√(σ² + eps)`.
pub fn layernorm_backward(
    dout: &[f64],
    s: &[f64],
    gamma: &[f64],
    rows: usize,
    cols: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = cols as f64;
    let (mut ds, mut dgamma, mut dbeta) =
        (vec![0.0; rows * cols], vec![0.0; cols], vec![0.0; cols]);
    for r in 0..rows {
        let row = &s[r * cols..(r + 1) * cols];
        let dy = &dout[r * cols..(r + 1) * cols];
        let mu = row.iter().sum::<f64>() / n;
        let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / n;
        let rs = 1.0 / (var + eps).sqrt();
        for c in 0..cols {
            let mut acc = 0.0;
            for k in 0..cols {
                let delta = if k == c { 1.0 } else { 0.0 };
                let jac = rs * (delta - 1.0 / n) - rs.powi(3) * (row[k] - mu) * (row[c] - mu) / n;
                acc += dy[k] * gamma[k] * jac;
            }
            ds[r * cols + c] = acc;
            dgamma[c] += dy[c] * (row[c] - mu) * rs;
            dbeta[c] += dy[c];
        }
    }
    (ds, dgamma, dbeta)
}

// ---------------------------------------------------------------------------------------------
// Activations
// ---------------------------------------------------------------------------------------------

/// Standard normal CDF Φ and density φ.
fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}
fn normal_pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// transformers' `gelu` (x·Φ(x), `F.gelu`), `gelu_new`/`gelu_pytorch_tanh`
/// (`0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`), and `relu`.
pub fn activation_forward(x: &[f64], act: Activation) -> Vec<f64> {
    x.iter()
        .map(|&x| match act {
            Activation::GeluErf => x * normal_cdf(x),
            Activation::GeluTanh => {
                let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3));
                0.5 * x * (1.0 + u.tanh())
            }
            Activation::Relu => {
                if x > 0.0 {
                    x
                } else {
                    0.0
                }
            }
        })
        .collect()
}

/// `dx = dout·y'(x)`, the derivatives worked out by hand.
pub fn activation_backward(dout: &[f64], x: &[f64], act: Activation) -> Vec<f64> {
    x.iter()
        .zip(dout)
        .map(|(&x, &g)| {
            let dy = match act {
                Activation::GeluErf => normal_cdf(x) + x * normal_pdf(x),
                Activation::GeluTanh => {
                    let c = (2.0 / std::f64::consts::PI).sqrt();
                    let u = c * (x + 0.044715 * x.powi(3));
                    let sech2 = 1.0 / u.cosh().powi(2);
                    0.5 * (1.0 + u.tanh()) + 0.5 * x * sech2 * c * (1.0 + 3.0 * 0.044715 * x * x)
                }
                Activation::Relu => {
                    if x > 0.0 {
                        1.0
                    } else {
                        0.0
                    }
                }
            };
            g * dy
        })
        .collect()
}

pub fn tanh_forward(x: &[f64]) -> Vec<f64> {
    x.iter().map(|v| v.tanh()).collect()
}

/// `dx = dout·sech²(x)`, from the input (the op reads its output `y` instead: `1 − y²`).
pub fn tanh_backward(dout: &[f64], x: &[f64]) -> Vec<f64> {
    x.iter()
        .zip(dout)
        .map(|(x, g)| g / x.cosh().powi(2))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Dropout (Philox counter-based mask)
// ---------------------------------------------------------------------------------------------

/// Element `index` of a dropout site is kept when its uniform is at least `p` (compared in f32,
/// as documented).
pub fn dropout_keep(d: Dropout, index: u64) -> bool {
    uniform(d.seed, d.stream, index) >= d.p
}

/// `out[i] = keep[i] ? x[i]/(1 − p) : 0`; the identity when `p = 0`.
pub fn dropout_forward(x: &[f64], d: Dropout) -> Vec<f64> {
    if d.p == 0.0 {
        return x.to_vec();
    }
    let p = d.p as f64;
    (0..x.len())
        .map(|i| {
            if dropout_keep(d, i as u64) {
                x[i] / (1.0 - p)
            } else {
                0.0
            }
        })
        .collect()
}

/// Dropout is linear, so its backward is the same map applied to `dout`.
pub fn dropout_backward(dout: &[f64], d: Dropout) -> Vec<f64> {
    dropout_forward(dout, d)
}

// ---------------------------------------------------------------------------------------------
// First tokens ([CLS])
// ---------------------------------------------------------------------------------------------

pub fn gather_first_tokens(x: &[f64], layout: &SeqLayout, hidden: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for &s in &layout.starts {
        let s = s as usize;
        out.extend_from_slice(&x[s * hidden..(s + 1) * hidden]);
    }
    out
}

/// The gradient of `⟨dout, gather(x)⟩` with respect to `x` (`[total_rows, hidden]`).
pub fn scatter_first_tokens_backward(dout: &[f64], layout: &SeqLayout, hidden: usize) -> Vec<f64> {
    let mut dx = vec![0.0; layout.total_rows() * hidden];
    for (b, &s) in layout.starts.iter().enumerate() {
        for c in 0..hidden {
            dx[s as usize * hidden + c] += dout[b * hidden + c];
        }
    }
    dx
}

// ---------------------------------------------------------------------------------------------
// Multi-head self-attention (BertSelfAttention with the padding mask)
// ---------------------------------------------------------------------------------------------

/// The documented Philox element of attention probability (b, h, i, j):
/// `((b·heads + h)·2¹⁶ + i)·2¹⁶ + j`.
pub fn attention_dropout_index(b: usize, h: usize, heads: usize, i: usize, j: usize) -> u64 {
    (((b * heads + h) as u64 * 65536 + i as u64) * 65536) + j as u64
}

/// The dropout factor of probability (b, h, i, j): `1/(1 − p)` if kept, else 0 (1 without dropout).
fn attention_factor(d: Dropout, b: usize, h: usize, heads: usize, i: usize, j: usize) -> f64 {
    if !d.is_active() {
        return 1.0;
    }
    if dropout_keep(d, attention_dropout_index(b, h, heads, i, j)) {
        1.0 / (1.0 - d.p as f64)
    } else {
        0.0
    }
}

/// Element `c` of q (part 0), k (1) or v (2) of head `h` at row `r` of `qkv[rows, 3, heads, d]`.
fn qkv_at(r: usize, part: usize, h: usize, c: usize, dims: AttentionDims) -> usize {
    let hidden = dims.heads * dims.head_dim;
    r * 3 * hidden + part * hidden + h * dims.head_dim + c
}

/// `(out[rows, heads·d], lse[rows, heads])`: for every query row of every sequence (padding
/// rows included), softmax over the sequence's valid keys of `q·k/√d`, dropout on the
/// probabilities, times V. Rows outside every sequence stay zero.
pub fn attention_forward(
    qkv: &[f64],
    layout: &SeqLayout,
    dims: AttentionDims,
    d: Dropout,
) -> (Vec<f64>, Vec<f64>) {
    let (heads, hd) = (dims.heads, dims.head_dim);
    let hidden = heads * hd;
    let rows = layout.total_rows();
    let scale = 1.0 / (hd as f64).sqrt();
    let (mut out, mut lse) = (vec![0.0; rows * hidden], vec![0.0; rows * heads]);
    for b in 0..layout.batch() {
        let (start, n, valid) = (
            layout.starts[b] as usize,
            layout.rows[b] as usize,
            layout.valid[b] as usize,
        );
        for h in 0..heads {
            for i in 0..n {
                let scores: Vec<f64> = (0..valid)
                    .map(|j| {
                        let mut s = 0.0;
                        for c in 0..hd {
                            s += qkv[qkv_at(start + i, 0, h, c, dims)]
                                * qkv[qkv_at(start + j, 1, h, c, dims)];
                        }
                        s * scale
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                let l = max + total.ln();
                lse[(start + i) * heads + h] = l;
                for j in 0..valid {
                    let p = (scores[j] - l).exp() * attention_factor(d, b, h, heads, i, j);
                    for c in 0..hd {
                        out[(start + i) * hidden + h * hd + c] +=
                            p * qkv[qkv_at(start + j, 2, h, c, dims)];
                    }
                }
            }
        }
    }
    (out, lse)
}

/// `dqkv` of `⟨dout, attention(qkv)⟩` by the plain chain rule: with `a_ij = p_ij·m_ij`,
/// `dv_j += a_ij·dO_i`, `dp_ij = m_ij·(dO_i·v_j)`, `ds_ij = p_ij·(dp_ij − Σ_k p_ik·dp_ik)`,
/// `dq_i += scale·Σ_j ds_ij·k_j`, `dk_j += scale·ds_ij·q_i`.
pub fn attention_backward(
    dout: &[f64],
    qkv: &[f64],
    layout: &SeqLayout,
    dims: AttentionDims,
    d: Dropout,
) -> Vec<f64> {
    let (heads, hd) = (dims.heads, dims.head_dim);
    let hidden = heads * hd;
    let rows = layout.total_rows();
    let scale = 1.0 / (hd as f64).sqrt();
    let mut dqkv = vec![0.0; rows * 3 * hidden];
    for b in 0..layout.batch() {
        let (start, n, valid) = (
            layout.starts[b] as usize,
            layout.rows[b] as usize,
            layout.valid[b] as usize,
        );
        for h in 0..heads {
            for i in 0..n {
                let q = |c: usize| qkv[qkv_at(start + i, 0, h, c, dims)];
                let k = |j: usize, c: usize| qkv[qkv_at(start + j, 1, h, c, dims)];
                let v = |j: usize, c: usize| qkv[qkv_at(start + j, 2, h, c, dims)];
                let d_o = |c: usize| dout[(start + i) * hidden + h * hd + c];
                let scores: Vec<f64> = (0..valid)
                    .map(|j| (0..hd).map(|c| q(c) * k(j, c)).sum::<f64>() * scale)
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = e.iter().sum();
                let p: Vec<f64> = e.iter().map(|e| e / total).collect();
                let m: Vec<f64> = (0..valid)
                    .map(|j| attention_factor(d, b, h, heads, i, j))
                    .collect();
                let dp: Vec<f64> = (0..valid)
                    .map(|j| m[j] * (0..hd).map(|c| d_o(c) * v(j, c)).sum::<f64>())
                    .collect();
                let pdp: f64 = (0..valid).map(|j| p[j] * dp[j]).sum();
                for j in 0..valid {
                    let ds = p[j] * (dp[j] - pdp);
                    for c in 0..hd {
                        dqkv[qkv_at(start + j, 2, h, c, dims)] += p[j] * m[j] * d_o(c);
                        dqkv[qkv_at(start + i, 0, h, c, dims)] += scale * ds * k(j, c);
                        dqkv[qkv_at(start + j, 1, h, c, dims)] += scale * ds * q(c);
                    }
                }
            }
        }
    }
    dqkv
}

/// Attention with 16-bit products (kernels/attention_tc.cu's header has the math), in f64 from
/// the rounded operands, each output with an error bound (`*_tol`) that an implementation
/// computing in fp32 in any summation order must meet:
/// - a value rounded to 16 bits (`r16`: P̃, P̂, dŜ) is computed in fp32 with a relative error at
///   most `eps` (derived below); rounding is monotone, so the implementation's r16 lies in
///   `[r16(x − δ), r16(x + δ)]`: its distance from the reference's r16 is at most the width of
///   that interval, nonzero only when `x` is within `δ` of a rounding midpoint (a "flip", one
///   16-bit ulp of the element). Each flip's width, times the factor it is multiplied by, is
///   added to the bound of the outputs it reaches;
/// - every fp32 sum of n terms (products of 16-bit values are exact in fp32) is within
///   `(n + 8)·2U·Σ|terms|` (2U: tensor cores may truncate instead of rounding);
/// - fp16's subnormal probabilities (e < 2⁻¹⁴) may be rounded at a shifted exponent by the
///   tiled online softmax: ≤ 2⁻²⁴ each.
///
/// The forward runs from `qkv`; the backward from `qkv`, `dout` and the given `out` and `lse`
/// (those the implementation under test is given).
pub struct Attention16 {
    pub out: Vec<f64>,
    pub out_tol: Vec<f64>,
    pub lse: Vec<f64>,
    pub lse_tol: Vec<f64>,
    pub dqkv: Vec<f64>,
    pub dqkv_tol: Vec<f64>,
}

#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
pub fn attention_16(
    qkv: &[f32],
    dout: &[f32],
    out_in: &[f32],
    lse_in: &[f32],
    layout: &SeqLayout,
    dims: AttentionDims,
    d: Dropout,
    prec: MatmulPrecision,
) -> Attention16 {
    let (heads, hd) = (dims.heads, dims.head_dim);
    let hidden = heads * hd;
    let rows = layout.total_rows();
    let r16 = |x: f64| prec.round(x as f32) as f64;
    // The fp32 constants the implementations use.
    let scale = (1.0 / (hd as f32).sqrt()) as f64;
    let c2 = ((1.0 / (hd as f32).sqrt()) * std::f32::consts::LOG2_E) as f64;
    let log2e = std::f32::consts::LOG2_E as f64;
    let rp = if !d.is_active() {
        1.0
    } else if d.p < 1.0 {
        (1.0 / (1.0 - d.p)) as f64
    } else {
        0.0
    };
    let keep = |b: usize, h: usize, i: usize, j: usize| {
        !d.is_active() || dropout_keep(d, attention_dropout_index(b, h, heads, i, j))
    };
    let u2 = 2.0 * U;
    let q16: Vec<f64> = qkv.iter().map(|&x| r16(x as f64)).collect();
    let do16: Vec<f64> = dout.iter().map(|&x| r16(x as f64)).collect();
    let sub16 = if prec == MatmulPrecision::F16 {
        2f64.powi(-24)
    } else {
        0.0
    };
    let mut a = Attention16 {
        out: vec![0.0; rows * hidden],
        out_tol: vec![0.0; rows * hidden],
        lse: vec![0.0; rows * heads],
        lse_tol: vec![0.0; rows * heads],
        dqkv: vec![0.0; rows * 3 * hidden],
        dqkv_tol: vec![0.0; rows * 3 * hidden],
    };
    for b in 0..layout.batch() {
        let (start, n, valid) = (
            layout.starts[b] as usize,
            layout.rows[b] as usize,
            layout.valid[b] as usize,
        );
        for h in 0..heads {
            let q = |i: usize, c: usize| q16[qkv_at(start + i, 0, h, c, dims)];
            let k = |j: usize, c: usize| q16[qkv_at(start + j, 1, h, c, dims)];
            let v = |j: usize, c: usize| q16[qkv_at(start + j, 2, h, c, dims)];
            let d_o = |i: usize, c: usize| do16[(start + i) * hidden + h * hd + c];
            // (S_ij, Σ_c |q k|) for every query and key.
            let sc: Vec<Vec<(f64, f64)>> = (0..n)
                .map(|i| {
                    (0..valid)
                        .map(|j| {
                            (0..hd).fold((0.0, 0.0), |(s, m), c| {
                                (s + q(i, c) * k(j, c), m + (q(i, c) * k(j, c)).abs())
                            })
                        })
                        .collect()
                })
                .collect();
            // The fp32 relative error of 2^(c2·S − shift): S's sum, c2·S, the subtraction, exp2.
            let eps = |s: f64, m: f64, shift: f64| {
                std::f64::consts::LN_2
                    * (c2 * (hd as f64 + 8.0) * u2 * m + 4.0 * U * ((c2 * s).abs() + shift.abs()))
                    + 2f64.powi(-21)
            };
            let flip = |x: f64, delta: f64| (r16(x + delta) - r16(x - delta)).abs();
            // ---- forward ----
            for i in 0..n {
                let s2: Vec<f64> = sc[i].iter().map(|&(s, _)| c2 * s).collect();
                let mx = s2.iter().copied().fold(f64::NEG_INFINITY, f64::max).ceil();
                let e: Vec<f64> = s2.iter().map(|x| (x - mx).exp2()).collect();
                let l: f64 = e.iter().sum();
                let eps_j: Vec<f64> = (0..valid)
                    .map(|j| eps(sc[i][j].0, sc[i][j].1, mx))
                    .collect();
                let eps_max = eps_j.iter().copied().fold(0.0, f64::max);
                let lrel = eps_max + (valid as f64 + 8.0) * u2;
                a.lse[(start + i) * heads + h] = (mx + l.log2()) * std::f64::consts::LN_2;
                a.lse_tol[(start + i) * heads + h] = 2.0 * lrel + 8.0 * U * (mx.abs() + 1.0) + 1e-7;
                for c in 0..hd {
                    let (mut o, mut mag, mut slack) = (0.0, 0.0, 0.0);
                    for j in 0..valid {
                        if !keep(b, h, i, j) {
                            continue;
                        }
                        let p = r16(e[j]);
                        o += p * v(j, c);
                        mag += p * v(j, c).abs();
                        let sub = if e[j] < 2f64.powi(-14) { sub16 } else { 0.0 };
                        slack += (flip(e[j], e[j] * eps_j[j]) + sub) * v(j, c).abs();
                    }
                    let at = (start + i) * hidden + h * hd + c;
                    a.out[at] = rp / l * o;
                    a.out_tol[at] = rp / l * (slack + mag * (2.0 * lrel + 16.0 * U));
                }
            }
            // ---- backward ----
            for i in 0..n {
                let at = (start + i) * hidden + h * hd;
                let (big_d, d_mag) = (0..hd).fold((0.0, 0.0), |(s, m), c| {
                    let t = dout[at + c] as f64 * out_in[at + c] as f64;
                    (s + t, m + t.abs())
                });
                let ed = (hd as f64 + 8.0) * u2 * d_mag;
                let lse2 = lse_in[(start + i) * heads + h] as f64 * log2e;
                for j in 0..valid {
                    let p = (c2 * sc[i][j].0 - lse2).exp2();
                    let ep = eps(sc[i][j].0, sc[i][j].1, lse2) + 4.0 * U;
                    let (dp, dp_mag) = (0..hd).fold((0.0, 0.0), |(s, m), c| {
                        (s + d_o(i, c) * v(j, c), m + (d_o(i, c) * v(j, c)).abs())
                    });
                    let kept = keep(b, h, i, j);
                    let f = if kept { rp } else { 0.0 };
                    let pm = if kept { r16(p) } else { 0.0 };
                    let pm_w = if kept { flip(p, p * ep) } else { 0.0 };
                    let x = p * (f * dp - big_d);
                    let dx =
                        x.abs() * (ep + 4.0 * U) + p * (f * (hd as f64 + 8.0) * u2 * dp_mag + ed);
                    let ds = r16(x);
                    let ds_w = flip(x, dx);
                    for c in 0..hd {
                        let (vq, vk, vv) = (
                            qkv_at(start + i, 0, h, c, dims),
                            qkv_at(start + j, 1, h, c, dims),
                            qkv_at(start + j, 2, h, c, dims),
                        );
                        a.dqkv[vv] += rp * pm * d_o(i, c);
                        a.dqkv_tol[vv] +=
                            rp * (pm_w + pm * (n as f64 + 8.0) * u2) * d_o(i, c).abs();
                        a.dqkv[vq] += scale * ds * k(j, c);
                        a.dqkv_tol[vq] +=
                            scale * (ds_w + ds.abs() * (valid as f64 + 8.0) * u2) * k(j, c).abs();
                        a.dqkv[vk] += scale * ds * q(i, c);
                        a.dqkv_tol[vk] +=
                            scale * (ds_w + ds.abs() * (n as f64 + 8.0) * u2) * q(i, c).abs();
                    }
                }
            }
        }
    }
    a
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy with label smoothing (F.cross_entropy(label_smoothing=ε), per row)
// ---------------------------------------------------------------------------------------------

/// PyTorch's smoothed target: `q_c = (1 − ε)·[c = y] + ε/C`.
fn smoothed_target(label: u32, classes: usize, eps: f64) -> Vec<f64> {
    (0..classes)
        .map(|c| (1.0 - eps) * if c == label as usize { 1.0 } else { 0.0 } + eps / classes as f64)
        .collect()
}

fn log_softmax(z: &[f64]) -> Vec<f64> {
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
    z.iter().map(|v| v - lse).collect()
}

/// `loss[r] = −Σ_c q_c·log softmax(z_r)_c`.
pub fn cross_entropy_forward(logits: &[f64], labels: &[u32], classes: usize, eps: f64) -> Vec<f64> {
    labels
        .iter()
        .enumerate()
        .map(|(r, &y)| {
            let logp = log_softmax(&logits[r * classes..(r + 1) * classes]);
            let q = smoothed_target(y, classes, eps);
            -(0..classes).map(|c| q[c] * logp[c]).sum::<f64>()
        })
        .collect()
}

/// The gradient of `scale·Σ_r loss[r]`: `scale·(softmax(z_r) − q)` (as `Σ_c q_c = 1`).
pub fn cross_entropy_backward(
    logits: &[f64],
    labels: &[u32],
    classes: usize,
    eps: f64,
    scale: f64,
) -> Vec<f64> {
    let mut dz = vec![0.0; logits.len()];
    for (r, &y) in labels.iter().enumerate() {
        let logp = log_softmax(&logits[r * classes..(r + 1) * classes]);
        let q = smoothed_target(y, classes, eps);
        for c in 0..classes {
            dz[r * classes + c] = scale * (logp[c].exp() - q[c]);
        }
    }
    dz
}

// ---------------------------------------------------------------------------------------------
// Optimizer: clip_grad_norm_ and torch.optim.AdamW
// ---------------------------------------------------------------------------------------------

pub fn sum_squares(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum()
}

/// `torch.nn.utils.clip_grad_norm_`: `g *= clamp(max_norm/(‖g‖₂ + 1e-6), max = 1)`.
pub fn clip_by_global_norm(x: &[f64], max_norm: f64) -> Vec<f64> {
    let norm = sum_squares(x).sqrt();
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    x.iter().map(|v| v * coef).collect()
}

/// One step of `torch.optim.AdamW` (`_single_tensor_adamw`, no amsgrad, not maximizing), as
/// its source reads:
/// ```text
/// param.mul_(1 - lr * weight_decay)
/// exp_avg.lerp_(grad, 1 - beta1)
/// exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
/// step_size = lr / (1 - beta1 ** step)
/// denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
/// param.addcdiv_(exp_avg, denom, value=-step_size)
/// ```
#[allow(clippy::too_many_arguments)]
pub fn adamw_update(
    param: &mut [f64],
    grad: &[f64],
    exp_avg: &mut [f64],
    exp_avg_sq: &mut [f64],
    lr: f64,
    (beta1, beta2): (f64, f64),
    eps: f64,
    weight_decay: f64,
    step: u64,
) {
    let bias_correction1 = 1.0 - beta1.powf(step as f64);
    let bias_correction2 = 1.0 - beta2.powf(step as f64);
    let step_size = lr / bias_correction1;
    for i in 0..param.len() {
        param[i] *= 1.0 - lr * weight_decay;
        exp_avg[i] = beta1 * exp_avg[i] + (1.0 - beta1) * grad[i];
        exp_avg_sq[i] = beta2 * exp_avg_sq[i] + (1.0 - beta2) * grad[i] * grad[i];
        let denom = exp_avg_sq[i].sqrt() / bias_correction2.sqrt() + eps;
        param[i] -= step_size * exp_avg[i] / denom;
    }
}
