//! Every op of the CPU backend, one test each, named as the op.
//!
//! Each op is called through the [`Backend`] trait on [`CpuBackend`] (as the model calls it) on
//! fresh random non-zero inputs (no 0s or 1s that could hide a missing term) and several shapes,
//! odd ones included, and compared with a naive f64 implementation written from the math
//! (`tests/common/naive.rs`, same names). Every backward op is also compared with central finite
//! differences of the naive forward (in f64), and the conventions of `backend/mod.rs` are
//! checked: outputs are overwritten (they start as garbage), parameter gradients accumulate onto
//! non-zero buffers, activation gradients accumulate only where the op says so.
//!
//! Tolerances: `U = 2⁻²⁴ ≈ 6e-8` is fp32's unit roundoff; a sum of `n` terms rounded in fp32,
//! in any order, is within about `n·U·Σ|terms|` of the exact sum, so most tolerances below are
//! that bound, per element. Finite differences are in f64 with `h = 1e-4`, accurate to ~1e-9, so
//! comparing with them costs only a small absolute term on top of the op's own rounding.

mod common;

use std::sync::Arc;

use bertft_cuda::backend::cpu::{CpuBackend, CpuTensor};
use bertft_cuda::backend::philox::uniform;
use bertft_cuda::backend::{
    attention_rounding, Activation, AdamWStep, AdamWTensor, AttentionDims, Backend, BranchGrad,
    Dropout, Dtype, MatmulPrecision, ResidualAdd, SeqLayout, IGNORE_LABEL,
};
use common::naive::{self, abs, assert_close, dot, f64s, finite_differences, U};
use common::tiny::random_vec;

const BE: CpuBackend = CpuBackend::FP32;

/// Step of the central finite differences (in f64; see `naive::finite_differences`).
const H: f64 = 1e-4;
/// What finite differences add to a tolerance: their truncation error `h²·|f'''|/6` and f64
/// rounding `1e-16·|f|/h`, both below 1e-8 for the O(1)-to-O(100) losses used here.
const FD_ERR: f64 = 1e-7;

fn up(x: &[f32]) -> CpuTensor {
    BE.upload(x).unwrap()
}
fn down(t: &CpuTensor) -> Vec<f32> {
    BE.download(t).unwrap()
}
fn up_ids(x: &[u32]) -> Arc<Vec<u32>> {
    BE.upload_ids(x).unwrap()
}

/// Magnitudes uniform in `[0.02·scale, scale)`, random signs: never zero, never ±scale exactly.
fn nonzero(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    random_vec(n, seed, 1.0)
        .into_iter()
        .map(|r| {
            let m = (0.02 + 0.98 * r.abs()) * scale;
            if r < 0.0 {
                -m
            } else {
                m
            }
        })
        .collect()
}

/// Indices uniform in `[0, bound)`.
fn rand_ids(n: usize, seed: u64, bound: u32) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((uniform(seed, 7, i) * bound as f32) as u32).min(bound - 1))
        .collect()
}

fn add(a: &[f64], b: &[f64], times: f64) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| a + times * b).collect()
}

fn max_abs(x: &[f64]) -> f64 {
    x.iter().fold(0.0, |m, v| m.max(v.abs()))
}

// ---- dense layers ----------------------------------------------------------------------------

/// (rows, k, n): a single row, odd sizes, k = 1, and one large enough (rows·k·n ≥ 32768) for the
/// GEMM's multi-threaded path.
const LINEAR_SHAPES: [(usize, usize, usize); 5] =
    [(1, 5, 3), (7, 20, 37), (33, 37, 5), (5, 1, 7), (40, 48, 37)];

#[test]
fn linear_forward() {
    for (case, &(rows, k, n)) in LINEAR_SHAPES.iter().enumerate() {
        let seed = 100 + 10 * case as u64;
        let x = nonzero(rows * k, seed, 1.0);
        let w = nonzero(n * k, seed + 1, 1.0);
        let b = nonzero(n, seed + 2, 1.0);
        let out = up(&nonzero(rows * n, seed + 3, 50.0));
        BE.linear_forward(&out, &up(&x), &up(&w), &up(&b), rows, k, n)
            .unwrap();
        let (x, w, b) = (f64s(&x), f64s(&w), f64s(&b));
        let want = naive::linear_forward(&x, &w, &b, rows, k, n);
        // A sum of k + 1 terms (bias included) in fp32: (k + 2)·U·Σ|terms|, where Σ|terms| is
        // the same layer applied to |x|, |w|, |bias|.
        let mag = naive::linear_forward(&abs(&x), &abs(&w), &abs(&b), rows, k, n);
        assert_close(
            &format!("linear_forward {rows}x{k}x{n}"),
            &down(&out),
            &want,
            |i| (k + 2) as f64 * U * mag[i],
        );
    }
}

#[test]
fn linear_backward() {
    for (case, &(rows, k, n)) in LINEAR_SHAPES.iter().enumerate() {
        let name = format!("linear_backward {rows}x{k}x{n}");
        let seed = 200 + 10 * case as u64;
        let x = nonzero(rows * k, seed, 1.0);
        let w = nonzero(n * k, seed + 1, 1.0);
        let b = nonzero(n, seed + 2, 1.0);
        let dout = nonzero(rows * n, seed + 3, 1.0);
        let (xt, wt, dt) = (up(&x), up(&w), up(&dout));
        let (x, w, b, dout) = (f64s(&x), f64s(&w), f64s(&b), f64s(&dout));
        let (gx, gw, gb) = naive::linear_backward(&dout, &x, &w, rows, k, n);
        // Σ|terms| of each gradient element: the same products on absolute values.
        let (mx, mw, mb) = naive::linear_backward(&abs(&dout), &abs(&x), &abs(&w), rows, k, n);
        // dx sums n terms, dw and dbias sum `rows` terms, plus one rounding per accumulation:
        // (terms + 3)·U·(|initial value| + calls·Σ|terms|).
        let tol_x = |calls: f64, pre: &[f64]| {
            let pre = pre.to_vec();
            let mx = mx.clone();
            move |i: usize| (n + 3) as f64 * U * (pre[i].abs() + calls * mx[i])
        };
        let tol_rows = |calls: f64, pre: &[f64], m: &[f64]| {
            let (pre, m) = (pre.to_vec(), m.to_vec());
            move |i: usize| (rows + 3) as f64 * U * (pre[i].abs() + calls * m[i])
        };

        // 1. dx overwritten (it starts as garbage); dw, dbias from zero.
        let dx = up(&nonzero(rows * k, seed + 4, 50.0));
        let (dw, db) = (BE.zeros(n * k).unwrap(), BE.zeros(n).unwrap());
        BE.linear_backward(Some(&dx), false, &dw, &db, &dt, &xt, &wt, rows, k, n)
            .unwrap();
        let zx = vec![0.0; rows * k];
        let (zw, zb) = (vec![0.0; n * k], vec![0.0; n]);
        assert_close(&format!("{name} dx"), &down(&dx), &gx, tol_x(1.0, &zx));
        assert_close(
            &format!("{name} dw"),
            &down(&dw),
            &gw,
            tol_rows(1.0, &zw, &mw),
        );
        assert_close(
            &format!("{name} dbias"),
            &down(&db),
            &gb,
            tol_rows(1.0, &zb, &mb),
        );

        // ... and against finite differences of the forward, L = ⟨dout, x·wᵀ + b⟩ (small shapes).
        if rows * k * n <= 7 * 20 * 37 {
            let fx = finite_differences(
                |x| dot(&dout, &naive::linear_forward(x, &w, &b, rows, k, n)),
                &x,
                H,
            );
            let fw = finite_differences(
                |w| dot(&dout, &naive::linear_forward(&x, w, &b, rows, k, n)),
                &w,
                H,
            );
            let fb = finite_differences(
                |b| dot(&dout, &naive::linear_forward(&x, &w, b, rows, k, n)),
                &b,
                H,
            );
            let t = tol_x(1.0, &zx);
            assert_close(&format!("{name} dx vs FD"), &down(&dx), &fx, |i| {
                t(i) + FD_ERR
            });
            let t = tol_rows(1.0, &zw, &mw);
            assert_close(&format!("{name} dw vs FD"), &down(&dw), &fw, |i| {
                t(i) + FD_ERR
            });
            let t = tol_rows(1.0, &zb, &mb);
            assert_close(&format!("{name} dbias vs FD"), &down(&db), &fb, |i| {
                t(i) + FD_ERR
            });
        }

        // 2. A second call with dx_accumulate: everything doubles.
        BE.linear_backward(Some(&dx), true, &dw, &db, &dt, &xt, &wt, rows, k, n)
            .unwrap();
        let twice = |g: &[f64]| g.iter().map(|v| 2.0 * v).collect::<Vec<_>>();
        assert_close(
            &format!("{name} dx accumulated"),
            &down(&dx),
            &twice(&gx),
            tol_x(2.0, &zx),
        );
        assert_close(
            &format!("{name} dw twice"),
            &down(&dw),
            &twice(&gw),
            tol_rows(2.0, &zw, &mw),
        );
        assert_close(
            &format!("{name} dbias twice"),
            &down(&db),
            &twice(&gb),
            tol_rows(2.0, &zb, &mb),
        );

        // 3. No dx; dw and dbias are views into one gradient buffer, pre-filled with non-zero
        //    values they must add to, between sentinels that must not change.
        let pre = nonzero(3 + n * k + n + 3, seed + 5, 1.0);
        let grads = up(&pre);
        let (dw, db) = (BE.view(&grads, 3, n * k), BE.view(&grads, 3 + n * k, n));
        BE.linear_backward(None, false, &dw, &db, &dt, &xt, &wt, rows, k, n)
            .unwrap();
        let pre_w = f64s(&pre[3..3 + n * k]);
        let pre_b = f64s(&pre[3 + n * k..3 + n * k + n]);
        assert_close(
            &format!("{name} dw += onto a view"),
            &down(&dw),
            &add(&pre_w, &gw, 1.0),
            tol_rows(1.0, &pre_w, &mw),
        );
        assert_close(
            &format!("{name} dbias += onto a view"),
            &down(&db),
            &add(&pre_b, &gb, 1.0),
            tol_rows(1.0, &pre_b, &mb),
        );
        let after = down(&grads);
        let sentinels = [0, 1, 2, after.len() - 3, after.len() - 2, after.len() - 1];
        for i in sentinels {
            assert_eq!(after[i], pre[i], "{name}: wrote outside its views");
        }
    }
}

// ---- embeddings --------------------------------------------------------------------------------

const VOCAB: usize = 11;
const MAX_POS: usize = 9;
const TYPES: usize = 3;
const PAD: u32 = 3;

/// (rows, hidden) with ids that repeat and include PAD, so scatter-adds collide.
fn embedding_case(rows: usize, seed: u64) -> [Vec<u32>; 3] {
    let mut ids = rand_ids(rows, seed, VOCAB as u32);
    ids[rows / 2] = PAD;
    if rows > 2 {
        ids[rows - 1] = PAD;
    }
    [
        ids,
        rand_ids(rows, seed + 1, MAX_POS as u32),
        rand_ids(rows, seed + 2, TYPES as u32),
    ]
}

const EMBEDDING_SHAPES: [(usize, usize); 3] = [(1, 5), (7, 20), (33, 37)];

#[test]
fn embeddings_forward() {
    for (case, &(rows, hidden)) in EMBEDDING_SHAPES.iter().enumerate() {
        let seed = 300 + 10 * case as u64;
        let [ids, pos, types] = embedding_case(rows, seed);
        let word = nonzero(VOCAB * hidden, seed + 3, 1.0);
        let position = nonzero(MAX_POS * hidden, seed + 4, 1.0);
        let token_type = nonzero(TYPES * hidden, seed + 5, 1.0);
        let out = up(&nonzero(rows * hidden, seed + 6, 50.0));
        BE.embeddings_forward(
            &out,
            &up(&word),
            &up(&position),
            &up(&token_type),
            &up_ids(&ids),
            &up_ids(&pos),
            &up_ids(&types),
            hidden,
        )
        .unwrap();
        let (w, p, t) = (f64s(&word), f64s(&position), f64s(&token_type));
        // The padding row is read like any other (nn.Embedding's forward does not mask it).
        let want = naive::embeddings_forward(&w, &p, &t, &ids, &pos, &types, hidden);
        let mag =
            naive::embeddings_forward(&abs(&w), &abs(&p), &abs(&t), &ids, &pos, &types, hidden);
        // Three terms, two fp32 additions: 2·U·Σ|terms| (3U for margin).
        assert_close(
            &format!("embeddings_forward {rows}x{hidden}"),
            &down(&out),
            &want,
            |i| 3.0 * U * mag[i],
        );
    }
}

#[test]
fn embeddings_backward() {
    for (case, &(rows, hidden)) in EMBEDDING_SHAPES.iter().enumerate() {
        let name = format!("embeddings_backward {rows}x{hidden}");
        let seed = 400 + 10 * case as u64;
        let [ids, pos, types] = embedding_case(rows, seed);
        let (idt, post, typt) = (up_ids(&ids), up_ids(&pos), up_ids(&types));
        let dout = nonzero(rows * hidden, seed + 3, 1.0);
        let dt = up(&dout);
        let dout = f64s(&dout);
        let entries = (VOCAB, MAX_POS, TYPES);
        // Scatter-adds of at most `rows` terms per table row, onto a non-zero start:
        // (rows + 3)·U·(|start| + calls·Σ|terms|).
        let tol = |pre: &[f64], mag: &[f64], calls: f64| {
            let (pre, mag) = (pre.to_vec(), mag.to_vec());
            move |i: usize| (rows + 3) as f64 * U * (pre[i].abs() + calls * mag[i])
        };
        let absd = abs(&dout);

        // With padding_idx: pre-filled tables, two calls → start + 2·gradient; the PAD row of
        // the word table keeps its start exactly.
        let pres: Vec<Vec<f32>> = [VOCAB, MAX_POS, TYPES]
            .iter()
            .enumerate()
            .map(|(t, &e)| nonzero(e * hidden, seed + 4 + t as u64, 1.0))
            .collect();
        let grads: Vec<CpuTensor> = pres.iter().map(|p| up(p)).collect();
        for _ in 0..2 {
            BE.embeddings_backward(
                &grads[0],
                &grads[1],
                &grads[2],
                &dt,
                &idt,
                &post,
                &typt,
                hidden,
                Some(PAD),
            )
            .unwrap();
        }
        let (gw, gp, gt) =
            naive::embeddings_backward(&dout, &ids, &pos, &types, hidden, entries, Some(PAD));
        let (mw, mp, mt) =
            naive::embeddings_backward(&absd, &ids, &pos, &types, hidden, entries, Some(PAD));
        for (t, (g, m)) in [(gw, mw), (gp, mp), (gt, mt)].iter().enumerate() {
            let pre = f64s(&pres[t]);
            assert_close(
                &format!("{name} table {t} (padding_idx {PAD}), two calls"),
                &down(&grads[t]),
                &add(&pre, g, 2.0),
                tol(&pre, m, 2.0),
            );
        }
        let pad_row = PAD as usize * hidden..(PAD as usize + 1) * hidden;
        assert_eq!(
            &down(&grads[0])[pad_row.clone()],
            &pres[0][pad_row.clone()],
            "{name}: the padding_idx row got a gradient"
        );

        // Without padding_idx, from zero: against the naive scatter and finite differences of
        // L = ⟨dout, word[ids] + position[pos] + type[types]⟩. The PAD row is read by forward
        // (its finite difference is non-zero) and now gets its gradient.
        let grads: Vec<CpuTensor> = [VOCAB, MAX_POS, TYPES]
            .iter()
            .map(|&e| BE.zeros(e * hidden).unwrap())
            .collect();
        BE.embeddings_backward(
            &grads[0], &grads[1], &grads[2], &dt, &idt, &post, &typt, hidden, None,
        )
        .unwrap();
        let tables: Vec<Vec<f64>> = [VOCAB, MAX_POS, TYPES]
            .iter()
            .enumerate()
            .map(|(t, &e)| f64s(&nonzero(e * hidden, seed + 7 + t as u64, 1.0)))
            .collect();
        let (gw, gp, gt) =
            naive::embeddings_backward(&dout, &ids, &pos, &types, hidden, entries, None);
        let (mw, mp, mt) =
            naive::embeddings_backward(&absd, &ids, &pos, &types, hidden, entries, None);
        for (t, (g, m)) in [(gw, mw), (gp, mp), (gt, mt)].iter().enumerate() {
            let fd = finite_differences(
                |table| {
                    let mut ts = tables.clone();
                    ts[t] = table.to_vec();
                    dot(
                        &dout,
                        &naive::embeddings_forward(
                            &ts[0], &ts[1], &ts[2], &ids, &pos, &types, hidden,
                        ),
                    )
                },
                &tables[t],
                H,
            );
            let zero = vec![0.0; g.len()];
            let got = down(&grads[t]);
            let tl = tol(&zero, m, 1.0);
            assert_close(&format!("{name} table {t}, no padding_idx"), &got, g, &tl);
            assert_close(&format!("{name} table {t} vs FD"), &got, &fd, |i| {
                tl(i) + FD_ERR
            });
            if t == 0 {
                assert!(fd[pad_row.clone()].iter().any(|&v| v != 0.0));
            }
        }
    }
}

// ---- LayerNorm ---------------------------------------------------------------------------------

const LAYERNORM_SHAPES: [(usize, usize); 3] = [(1, 5), (7, 20), (33, 37)];

struct LayerNormCase {
    a: Vec<f32>,
    b: Option<Vec<f32>>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

/// Inputs off-centre (mean ≈ 1.5) so that the mean matters; gains around 1 but never 1.
fn layernorm_case(rows: usize, cols: usize, residual: bool, seed: u64) -> LayerNormCase {
    LayerNormCase {
        a: nonzero(rows * cols, seed, 1.0)
            .iter()
            .map(|v| v + 1.5)
            .collect(),
        b: residual.then(|| nonzero(rows * cols, seed + 1, 0.7)),
        gamma: nonzero(cols, seed + 2, 0.5)
            .iter()
            .map(|v| v + 1.0)
            .collect(),
        beta: nonzero(cols, seed + 3, 0.5),
    }
}

impl LayerNormCase {
    /// The op's forward: (out, mean, rstd, the normalized input `s` (= a, or the fused sum)).
    fn forward(&self, rows: usize, cols: usize, eps: f32, seed: u64) -> [CpuTensor; 4] {
        let garbage = |n, s| up(&nonzero(n, seed + s, 50.0));
        let (out, mean, rstd) = (
            garbage(rows * cols, 10),
            garbage(rows, 11),
            garbage(rows, 12),
        );
        let a = up(&self.a);
        let (bt, sum) = (self.b.as_ref().map(|b| up(b)), garbage(rows * cols, 13));
        let residual = bt.as_ref().map(|b| ResidualAdd {
            residual: b,
            sum: &sum,
            dropout: Dropout::NONE,
        });
        BE.layernorm_forward(
            &out,
            None,
            &mean,
            &rstd,
            &a,
            residual,
            &up(&self.gamma),
            &up(&self.beta),
            rows,
            cols,
            eps,
        )
        .unwrap();
        let s = if self.b.is_some() { sum } else { a };
        [out, mean, rstd, s]
    }

    /// The exact (f64) input of the normalization: a, or a + b.
    fn s64(&self) -> Vec<f64> {
        match &self.b {
            Some(b) => add(&f64s(&self.a), &f64s(b), 1.0),
            None => f64s(&self.a),
        }
    }
}

#[test]
fn layernorm_forward() {
    for (case, &(rows, cols)) in LAYERNORM_SHAPES.iter().enumerate() {
        // eps 1e-2 moves rstd by ~1.5%, so eps outside the square root (or missing) shows.
        for eps in [1e-12f32, 1e-2] {
            for residual in [false, true] {
                let name = format!("layernorm_forward {rows}x{cols} eps {eps} residual {residual}");
                let seed = 500 + 10 * case as u64;
                let c = layernorm_case(rows, cols, residual, seed);
                let [out, mean, rstd, s] = c.forward(rows, cols, eps, seed);
                let s64 = c.s64();
                let (g, b) = (f64s(&c.gamma), f64s(&c.beta));
                let (w_out, w_mean, w_rstd) =
                    naive::layernorm_forward(&s64, &g, &b, rows, cols, eps as f64);
                if residual {
                    // One fp32 addition.
                    assert_close(&format!("{name} sum"), &down(&s), &s64, |i| {
                        U * s64[i].abs()
                    });
                }
                // The statistics are exact but for the fp32 rounding of the sum (U·|s| per
                // element; zero without residual) and of the stored value (U relative):
                // mean within 2U·(|μ| + max|s|); rstd, whose variance moves by 2σ·U·max|s|,
                // within U·r·(2 + 2·r·max|s|).
                let smax: Vec<f64> = (0..rows)
                    .map(|r| max_abs(&s64[r * cols..(r + 1) * cols]))
                    .collect();
                assert_close(&format!("{name} mean"), &down(&mean), &w_mean, |r| {
                    2.0 * U * (w_mean[r].abs() + smax[r])
                });
                assert_close(&format!("{name} rstd"), &down(&rstd), &w_rstd, |r| {
                    U * w_rstd[r] * (2.0 + 2.0 * w_rstd[r] * smax[r])
                });
                // out = ŝ·γ + β: three fp32 roundings of the output's terms, plus ŝ's error from
                // the statistics, r·U·max|s|·(2 + 2·|ŝ|), scaled by |γ|.
                assert_close(&format!("{name} out"), &down(&out), &w_out, |i| {
                    let (r, col) = (i / cols, i % cols);
                    let xhat = (w_out[i] - b[col]) / g[col];
                    4.0 * U * ((xhat * g[col]).abs() + b[col].abs())
                        + U * w_rstd[r] * smax[r] * (2.0 + 2.0 * xhat.abs()) * g[col].abs()
                });
            }
        }
    }
}

#[test]
fn layernorm_backward() {
    let eps = 1e-5f32;
    for (case, &(rows, cols)) in LAYERNORM_SHAPES.iter().enumerate() {
        for residual in [false, true] {
            let name = format!("layernorm_backward {rows}x{cols} residual {residual}");
            let seed = 600 + 10 * case as u64;
            let c = layernorm_case(rows, cols, residual, seed);
            let [_, mean, rstd, s] = c.forward(rows, cols, eps, seed);
            let dout = nonzero(rows * cols, seed + 5, 1.0);
            let dx = up(&nonzero(rows * cols, seed + 6, 50.0));
            let (pre_g, pre_b) = (nonzero(cols, seed + 7, 1.0), nonzero(cols, seed + 8, 1.0));
            let (dgamma, dbeta) = (up(&pre_g), up(&pre_b));
            let (dt, gt) = (up(&dout), up(&c.gamma));
            // Twice: dx is overwritten (the same both times), dgamma and dbeta accumulate.
            for _ in 0..2 {
                BE.layernorm_backward(
                    &dx, &dgamma, &dbeta, &dt, &s, &mean, &rstd, &gt, rows, cols, None,
                )
                .unwrap();
            }
            // The naive gradient at the input the op normalized (the fp32 sum, if fused).
            let (s64, g64, dout) = (f64s(&down(&s)), f64s(&c.gamma), f64s(&dout));
            let (w_dx, w_dg, w_db) =
                naive::layernorm_backward(&dout, &s64, &g64, rows, cols, eps as f64);
            let (_, _, w_rstd) = naive::layernorm_forward(&s64, &g64, &g64, rows, cols, eps as f64);
            // dx is computed in f64 from fp32 mean and rstd (U relative each; the mean's error
            // U·|μ| shifts ŝ by r·U·|μ|): within 8U·r·(1 + r·|μ|)·max_row|dout·γ|.
            let mu = f64s(&down(&mean));
            let gmax: Vec<f64> = (0..rows)
                .map(|r| {
                    (0..cols)
                        .map(|k| (dout[r * cols + k] * g64[k]).abs())
                        .fold(0.0, f64::max)
                })
                .collect();
            let tol_dx = |i: usize| {
                let r = i / cols;
                8.0 * U * w_rstd[r] * (1.0 + w_rstd[r] * mu[r].abs()) * gmax[r]
            };
            let got_dx = down(&dx);
            assert_close(&format!("{name} dx"), &got_dx, &w_dx, tol_dx);
            // dgamma sums `rows` products dout·ŝ with ŝ computed in fp32 ((s − μ)·r: a
            // cancellation worth U·|s|·r) onto a non-zero start, twice:
            // (rows + 4)·U·(|start| + 2·Σ_r |dout|·(|ŝ| + r·|s|)).
            let mag_g: Vec<f64> = (0..cols)
                .map(|k| {
                    (0..rows)
                        .map(|r| {
                            let sv = s64[r * cols + k];
                            let xhat = (sv - mu[r]) * w_rstd[r];
                            dout[r * cols + k].abs() * (xhat.abs() + w_rstd[r] * sv.abs())
                        })
                        .sum()
                })
                .collect();
            let mag_b: Vec<f64> = (0..cols)
                .map(|k| (0..rows).map(|r| dout[r * cols + k].abs()).sum())
                .collect();
            let (pg, pb) = (f64s(&pre_g), f64s(&pre_b));
            assert_close(
                &format!("{name} dgamma (+= twice)"),
                &down(&dgamma),
                &add(&pg, &w_dg, 2.0),
                |k| (rows + 4) as f64 * U * (pg[k].abs() + 2.0 * mag_g[k]),
            );
            assert_close(
                &format!("{name} dbeta (+= twice)"),
                &down(&dbeta),
                &add(&pb, &w_db, 2.0),
                |k| (rows + 4) as f64 * U * (pb[k].abs() + 2.0 * mag_b[k]),
            );

            // Finite differences of L = ⟨dout, LayerNorm(a (+ b))⟩ with respect to a, b (the
            // fused residual's two inputs get the same gradient), γ and β.
            let (a64, b64) = (f64s(&c.a), c.b.as_ref().map(|b| f64s(b)));
            let beta64 = f64s(&c.beta);
            let loss = |a: &[f64], b: Option<&[f64]>, g: &[f64], be: &[f64]| {
                let s = match b {
                    Some(b) => add(a, b, 1.0),
                    None => a.to_vec(),
                };
                dot(
                    &dout,
                    &naive::layernorm_forward(&s, g, be, rows, cols, eps as f64).0,
                )
            };
            let b_ref = b64.as_deref();
            let fa = finite_differences(|a| loss(a, b_ref, &g64, &beta64), &a64, H);
            assert_close(&format!("{name} dx vs FD (x)"), &got_dx, &fa, |i| {
                tol_dx(i) + FD_ERR
            });
            if let Some(b) = &b64 {
                let fb = finite_differences(|b| loss(&a64, Some(b), &g64, &beta64), b, H);
                assert_close(&format!("{name} dx vs FD (residual)"), &got_dx, &fb, |i| {
                    tol_dx(i) + FD_ERR
                });
            }
            let fg = finite_differences(|g| loss(&a64, b_ref, g, &beta64), &g64, H);
            let fbeta = finite_differences(|be| loss(&a64, b_ref, &g64, be), &beta64, H);
            assert_close(
                &format!("{name} dgamma vs FD"),
                &down(&dgamma),
                &add(&pg, &fg, 2.0),
                |k| (rows + 4) as f64 * U * (pg[k].abs() + 2.0 * mag_g[k]) + 2.0 * FD_ERR,
            );
            assert_close(
                &format!("{name} dbeta vs FD"),
                &down(&dbeta),
                &add(&pb, &fbeta, 2.0),
                |k| (rows + 4) as f64 * U * (pb[k].abs() + 2.0 * mag_b[k]) + 2.0 * FD_ERR,
            );
        }
    }
}

/// The dropout fused into LayerNorm's residual add is `dropout_forward` then the plain residual
/// add, bit for bit, and its branch gradient is `dropout_backward` of the residual's gradient:
/// the fusion changes no result (the unfused sequence is checked against f64 above and in the
/// dropout tests).
#[test]
fn layernorm_fused_dropout() {
    let eps = 1e-5f32;
    for (case, &(rows, cols)) in LAYERNORM_SHAPES.iter().enumerate() {
        for d in dropouts() {
            let name = format!("layernorm fused dropout {rows}x{cols} p {}", d.p);
            let seed = 1500 + 10 * case as u64;
            let c = layernorm_case(rows, cols, true, seed);
            let (x, residual) = (up(&c.a), up(c.b.as_ref().unwrap()));
            let (gamma, beta) = (up(&c.gamma), up(&c.beta));
            let dout = up(&nonzero(rows * cols, seed + 5, 1.0));
            let n = rows * cols;
            // Both paths start from the same garbage in every output, and both accumulate into
            // the same non-zero dgamma/dbeta.
            let fresh = |k: u64| up(&nonzero(n, seed + k, 50.0));
            let run = |fused: bool| {
                let (out, sum, dx, dbranch) = (fresh(10), fresh(11), fresh(12), fresh(13));
                let (mean, rstd) = (
                    up(&nonzero(rows, seed + 14, 9.0)),
                    up(&nonzero(rows, seed + 15, 9.0)),
                );
                let (dgamma, dbeta) = (
                    up(&nonzero(cols, seed + 16, 1.0)),
                    up(&nonzero(cols, seed + 17, 1.0)),
                );
                if fused {
                    let add = ResidualAdd {
                        residual: &residual,
                        sum: &sum,
                        dropout: d,
                    };
                    BE.layernorm_forward(
                        &out,
                        None,
                        &mean,
                        &rstd,
                        &x,
                        Some(add),
                        &gamma,
                        &beta,
                        rows,
                        cols,
                        eps,
                    )
                    .unwrap();
                    let branch = BranchGrad {
                        dx: &dbranch,
                        dropout: d,
                    };
                    BE.layernorm_backward(
                        &dx,
                        &dgamma,
                        &dbeta,
                        &dout,
                        &sum,
                        &mean,
                        &rstd,
                        &gamma,
                        rows,
                        cols,
                        Some(branch),
                    )
                    .unwrap();
                } else {
                    let dropped = fresh(18);
                    BE.dropout_forward(&dropped, &x, d).unwrap();
                    let add = ResidualAdd {
                        residual: &residual,
                        sum: &sum,
                        dropout: Dropout::NONE,
                    };
                    BE.layernorm_forward(
                        &out,
                        None,
                        &mean,
                        &rstd,
                        &dropped,
                        Some(add),
                        &gamma,
                        &beta,
                        rows,
                        cols,
                        eps,
                    )
                    .unwrap();
                    BE.layernorm_backward(
                        &dx, &dgamma, &dbeta, &dout, &sum, &mean, &rstd, &gamma, rows, cols, None,
                    )
                    .unwrap();
                    BE.dropout_backward(&dbranch, &dx, d).unwrap();
                }
                [out, sum, mean, rstd, dx, dbranch, dgamma, dbeta].map(|t| down(&t))
            };
            let (fused, unfused) = (run(true), run(false));
            let names = [
                "out", "sum", "mean", "rstd", "dx", "dbranch", "dgamma", "dbeta",
            ];
            for ((what, f), u) in names.iter().zip(&fused).zip(&unfused) {
                assert_eq!(f, u, "{name}: {what}");
            }
            // The mask is really applied: where an element is dropped, sum is the residual alone
            // and the branch gets no gradient; elsewhere the branch gradient is dx/(1 − p).
            let (sum, dx, dbranch) = (&fused[1], &fused[4], &fused[5]);
            let (xs, rs) = (&c.a, c.b.as_ref().unwrap());
            let mut dropped = 0;
            for i in 0..n {
                if naive::dropout_keep(d, i as u64) {
                    assert_eq!(
                        sum[i],
                        xs[i] * (1.0 / (1.0 - d.p)) + rs[i],
                        "{name}: sum[{i}]"
                    );
                    assert_eq!(
                        dbranch[i],
                        dx[i] * (1.0 / (1.0 - d.p)),
                        "{name}: dbranch[{i}]"
                    );
                } else {
                    dropped += 1;
                    assert_eq!(sum[i], rs[i], "{name}: sum[{i}], dropped");
                    assert_eq!(dbranch[i], 0.0, "{name}: dbranch[{i}], dropped");
                }
            }
            if n > 100 {
                assert!(dropped > 0, "{name}: nothing dropped");
            }
        }
    }
}

// ---- activations -------------------------------------------------------------------------------

const ACTIVATIONS: [Activation; 3] = [Activation::GeluErf, Activation::GeluTanh, Activation::Relu];
const ELEMENTWISE_SIZES: [usize; 3] = [1, 7, 1221];

#[test]
fn activation_forward() {
    for act in ACTIVATIONS {
        for (case, &n) in ELEMENTWISE_SIZES.iter().enumerate() {
            let seed = 700 + 10 * case as u64;
            let x = nonzero(n, seed, 4.0);
            let out = up(&nonzero(n, seed + 1, 50.0));
            BE.activation_forward(&out, &up(&x), act).unwrap();
            let x = f64s(&x);
            let want = naive::activation_forward(&x, act);
            // fp32 evaluation of y = x·(something in [0, 1]) from a handful of roundings (and
            // erf/tanh to ~1 ulp): the errors are absolute, U·|x| each (for x < 0, 1 + erf and
            // 1 + tanh cancel), and the argument's rounding is amplified by the slope, ≤ |x|.
            assert_close(
                &format!("activation_forward {act:?} n {n}"),
                &down(&out),
                &want,
                |i| 8.0 * U * x[i].abs() * (1.0 + x[i].abs()),
            );
        }
    }
}

#[test]
fn activation_backward() {
    for act in ACTIVATIONS {
        for (case, &n) in ELEMENTWISE_SIZES.iter().enumerate() {
            let name = format!("activation_backward {act:?} n {n}");
            let seed = 800 + 10 * case as u64;
            // |x| ≥ 0.08 > h: finite differences never straddle relu's kink.
            let (x, dout) = (nonzero(n, seed, 4.0), nonzero(n, seed + 1, 1.0));
            let dx = up(&nonzero(n, seed + 2, 50.0));
            BE.activation_backward(&dx, &up(&dout), &up(&x), act)
                .unwrap();
            let (x, dout) = (f64s(&x), f64s(&dout));
            let want = naive::activation_backward(&dout, &x, act);
            let fd = finite_differences(|x| dot(&dout, &naive::activation_forward(x, act)), &x, H);
            // y' in fp32 from a handful of roundings, amplified by the slopes of Φ, φ, tanh
            // (≤ x² here): 8U·(1 + x²)·|dout|.
            let tol = |i: usize| 8.0 * U * (1.0 + x[i] * x[i]) * dout[i].abs();
            let got = down(&dx);
            assert_close(&name, &got, &want, tol);
            assert_close(&format!("{name} vs FD"), &got, &fd, |i| tol(i) + FD_ERR);
        }
    }
}

#[test]
fn tanh_forward() {
    for (case, &n) in ELEMENTWISE_SIZES.iter().enumerate() {
        let seed = 900 + 10 * case as u64;
        let x = nonzero(n, seed, 3.0);
        let out = up(&nonzero(n, seed + 1, 50.0));
        BE.tanh_forward(&out, &up(&x)).unwrap();
        let want = naive::tanh_forward(&f64s(&x));
        // fp32 tanh (the platform's tanhf) is within a couple of ulps (an ulp is ≤ 2U relative).
        assert_close(&format!("tanh_forward n {n}"), &down(&out), &want, |i| {
            8.0 * U * want[i].abs()
        });
    }
}

#[test]
fn tanh_backward() {
    for (case, &n) in ELEMENTWISE_SIZES.iter().enumerate() {
        let name = format!("tanh_backward n {n}");
        let seed = 1000 + 10 * case as u64;
        let (x, dout) = (nonzero(n, seed, 3.0), nonzero(n, seed + 1, 1.0));
        let y = up(&vec![0.0; n]);
        BE.tanh_forward(&y, &up(&x)).unwrap();
        let dx = up(&nonzero(n, seed + 2, 50.0));
        BE.tanh_backward(&dx, &up(&dout), &y).unwrap();
        let (x, dout) = (f64s(&x), f64s(&dout));
        // The naive derivative is sech²(x), from x; the op's is 1 − y² from its fp32 output y.
        let want = naive::tanh_backward(&dout, &x);
        let fd = finite_differences(|x| dot(&dout, &naive::tanh_forward(x)), &x, H);
        // y's error (≤ 8U·|y|) moves 1 − y² by 16U·y², plus three roundings: 20U·|dout|.
        let tol = |i: usize| 20.0 * U * dout[i].abs();
        let got = down(&dx);
        assert_close(&name, &got, &want, tol);
        assert_close(&format!("{name} vs FD"), &got, &fd, |i| tol(i) + FD_ERR);
    }
}

// ---- dropout -----------------------------------------------------------------------------------

/// Seeds and streams with high words set, so both halves of Philox's key and counter matter.
fn dropouts() -> Vec<Dropout> {
    vec![
        Dropout {
            p: 0.1,
            seed: 0x9E37_79B9_7F4A_7C15,
            stream: 3,
        },
        Dropout {
            p: 0.5,
            seed: 1234,
            stream: (5 << 32) | 9,
        },
    ]
}
const DROPOUT_SIZES: [usize; 4] = [1, 7, 1221, 20001];

#[test]
fn dropout_forward() {
    for d in dropouts() {
        for (case, &n) in DROPOUT_SIZES.iter().enumerate() {
            let name = format!("dropout_forward p {} n {n}", d.p);
            let seed = 1100 + 10 * case as u64;
            let x = nonzero(n, seed, 1.0);
            let out = up(&nonzero(n, seed + 1, 50.0));
            BE.dropout_forward(&out, &up(&x), d).unwrap();
            let got = down(&out);
            // Kept exactly where Philox's uniform of the element index is ≥ p, scaled by
            // 1/(1 − p) (fp32 1 − p, its inverse, one product: 3U relative); dropped ones 0.
            let want = naive::dropout_forward(&f64s(&x), d);
            assert_close(&name, &got, &want, |i| 3.0 * U * want[i].abs());
            for (i, g) in got.iter().enumerate() {
                assert_eq!(
                    *g == 0.0,
                    !naive::dropout_keep(d, i as u64),
                    "{name}: element {i}"
                );
            }
            // About 1 − p of the elements are kept: within 5 standard deviations.
            if n >= 1000 {
                let kept = got.iter().filter(|v| **v != 0.0).count() as f64 / n as f64;
                let sd = (d.p as f64 * (1.0 - d.p as f64) / n as f64).sqrt();
                assert!(
                    (kept - (1.0 - d.p as f64)).abs() < 5.0 * sd,
                    "{name}: kept {kept}"
                );
            }
            if n == 1221 {
                // The index is the element's within the tensor: views at other offsets of larger
                // buffers draw the same mask.
                let mut big = nonzero(n + 8, seed + 2, 1.0);
                big[5..5 + n].copy_from_slice(&x);
                let (xb, ob) = (up(&big), up(&vec![7.0; n + 4]));
                BE.dropout_forward(&BE.view(&ob, 3, n), &BE.view(&xb, 5, n), d)
                    .unwrap();
                assert_eq!(
                    &down(&ob)[3..3 + n],
                    &got[..],
                    "{name}: a view changed the mask"
                );
                // Another stream, another seed (high word only): other masks.
                for other in [
                    Dropout {
                        stream: d.stream + 1,
                        ..d
                    },
                    Dropout {
                        seed: d.seed ^ (1 << 40),
                        ..d
                    },
                ] {
                    let o = up(&vec![0.0; n]);
                    BE.dropout_forward(&o, &up(&x), other).unwrap();
                    let differ = down(&o).iter().zip(&got).filter(|(a, b)| a != b).count();
                    assert!(differ > n / 20, "{name}: {other:?} drew the same mask");
                }
                // p = 0: the identity.
                let o = up(&vec![7.0; n]);
                BE.dropout_forward(&o, &up(&x), Dropout { p: 0.0, ..d })
                    .unwrap();
                assert_eq!(down(&o), x, "{name}: p = 0 is not the identity");
            }
        }
    }
}

#[test]
fn dropout_backward() {
    for d in dropouts() {
        for (case, &n) in DROPOUT_SIZES.iter().enumerate() {
            let name = format!("dropout_backward p {} n {n}", d.p);
            let seed = 1200 + 10 * case as u64;
            let (x, dout) = (nonzero(n, seed, 1.0), nonzero(n, seed + 1, 1.0));
            let out = up(&vec![0.0; n]);
            BE.dropout_forward(&out, &up(&x), d).unwrap();
            let dx = up(&nonzero(n, seed + 2, 50.0));
            BE.dropout_backward(&dx, &up(&dout), d).unwrap();
            let (got, fwd) = (down(&dx), down(&out));
            // Backward regenerates forward's mask exactly.
            for i in 0..n {
                assert_eq!(
                    got[i] == 0.0,
                    fwd[i] == 0.0,
                    "{name}: element {i}'s mask differs"
                );
            }
            let dout = f64s(&dout);
            let want = naive::dropout_backward(&dout, d);
            // As forward: 3U relative.
            assert_close(&name, &got, &want, |i| 3.0 * U * want[i].abs());
            if n <= 1221 {
                let fd =
                    finite_differences(|x| dot(&dout, &naive::dropout_forward(x, d)), &f64s(&x), H);
                assert_close(&format!("{name} vs FD"), &got, &fd, |i| {
                    3.0 * U * want[i].abs() + FD_ERR
                });
            }
        }
    }
}

// ---- first tokens ------------------------------------------------------------------------------

fn layouts() -> Vec<(&'static str, SeqLayout)> {
    vec![
        ("padded [7, 3, 1] in 7", SeqLayout::padded(&[7, 3, 1], 7)),
        ("packed [5, 1, 9]", SeqLayout::packed(&[5, 1, 9])),
        ("padded [5, 8] in 9", SeqLayout::padded(&[5, 8], 9)),
    ]
}

#[test]
fn gather_first_tokens() {
    for (li, (lname, layout)) in layouts().into_iter().enumerate() {
        for hidden in [5, 20, 37] {
            let seed = 1300 + 10 * li as u64 + hidden as u64;
            let rows = layout.total_rows();
            let x = nonzero(rows * hidden, seed, 1.0);
            let out = up(&nonzero(layout.batch() * hidden, seed + 1, 50.0));
            BE.gather_first_tokens(&out, &up(&x), &layout, hidden)
                .unwrap();
            let want = naive::gather_first_tokens(&f64s(&x), &layout, hidden);
            // A copy: exact.
            assert_close(
                &format!("gather_first_tokens {lname} hidden {hidden}"),
                &down(&out),
                &want,
                |_| 0.0,
            );
        }
    }
}

#[test]
fn scatter_first_tokens_backward() {
    for (li, (lname, layout)) in layouts().into_iter().enumerate() {
        for hidden in [5, 20, 37] {
            let name = format!("scatter_first_tokens_backward {lname} hidden {hidden}");
            let seed = 1400 + 10 * li as u64 + hidden as u64;
            let rows = layout.total_rows();
            let dout = nonzero(layout.batch() * hidden, seed, 1.0);
            let dt = up(&dout);
            let dout = f64s(&dout);
            let want = naive::scatter_first_tokens_backward(&dout, &layout, hidden);
            // It accumulates (`+=`, as documented): a non-zero start, two calls. The rows that
            // are no sequence's first stay bit for bit; the others are two fp32 additions.
            let pre = nonzero(rows * hidden, seed + 1, 1.0);
            let dx = up(&pre);
            for _ in 0..2 {
                BE.scatter_first_tokens_backward(&dx, &dt, &layout, hidden)
                    .unwrap();
            }
            let got = down(&dx);
            let pre64 = f64s(&pre);
            let expected = add(&pre64, &want, 2.0);
            assert_close(&name, &got, &expected, |i| {
                2.0 * U * (pre64[i].abs() + 2.0 * want[i].abs())
            });
            for r in 0..rows {
                if !layout.starts.contains(&(r as u32)) {
                    assert_eq!(
                        &got[r * hidden..(r + 1) * hidden],
                        &pre[r * hidden..(r + 1) * hidden],
                        "{name}: row {r}"
                    );
                }
            }
            // From zero, against finite differences of L = ⟨dout, gather(x)⟩: exact.
            let dx = BE.zeros(rows * hidden).unwrap();
            BE.scatter_first_tokens_backward(&dx, &dt, &layout, hidden)
                .unwrap();
            let x = f64s(&nonzero(rows * hidden, seed + 2, 1.0));
            let fd = finite_differences(
                |x| dot(&dout, &naive::gather_first_tokens(x, &layout, hidden)),
                &x,
                H,
            );
            assert_close(&format!("{name} vs FD"), &down(&dx), &fd, |_| FD_ERR);
        }
    }
}

// ---- attention ---------------------------------------------------------------------------------

/// (heads, head_dim): head dims 1, 5, 12, 32.
const ATTENTION_DIMS: [(usize, usize); 4] = [(1, 1), (2, 5), (3, 12), (2, 32)];

fn attention_dropouts() -> [Dropout; 2] {
    [
        Dropout::NONE,
        Dropout {
            p: 0.2,
            seed: 0x1234_5678_9ABC_DEF0,
            stream: (3 << 20) | 5,
        },
    ]
}

/// The op's forward: (out, lse).
fn attention_forward_op(
    qkv: &[f32],
    layout: &SeqLayout,
    dims: AttentionDims,
    d: Dropout,
) -> (CpuTensor, CpuTensor) {
    let rows = layout.total_rows();
    let hidden = dims.heads * dims.head_dim;
    let out = up(&nonzero(rows * hidden, 1, 50.0));
    let lse = up(&nonzero(rows * dims.heads, 2, 50.0));
    BE.attention_forward(&out, &lse, &up(qkv), layout, dims, d)
        .unwrap();
    (out, lse)
}

/// The rounding error of attention in fp32, relative to a scale (of the output or of the
/// gradient): a score is a d-term dot product, off by up to d·U·|s|max, which is the relative
/// error it gives its probability; a softmax row sums `valid` terms, the output another
/// `valid`, and exp, log, the products a few roundings more. So (2·valid + 8 + d·|s|max)·U,
/// times the scale.
fn attention_tol(layout: &SeqLayout, d: usize, smax: f64, scale: f64) -> f64 {
    let valid = *layout.valid.iter().max().unwrap() as usize;
    ((2 * valid + 8) as f64 + d as f64 * smax) * U * scale
}

#[test]
fn attention_forward() {
    for (li, (lname, layout)) in layouts().into_iter().enumerate() {
        for (heads, hd) in ATTENTION_DIMS {
            for d in attention_dropouts() {
                let name = format!(
                    "attention_forward {lname} heads {heads} head_dim {hd} p {}",
                    d.p
                );
                let dims = AttentionDims {
                    heads,
                    head_dim: hd,
                };
                let rows = layout.total_rows();
                let seed = 1500 + 100 * li as u64 + 10 * hd as u64;
                let qkv = nonzero(rows * 3 * heads * hd, seed, 1.5);
                let (out, lse) = attention_forward_op(&qkv, &layout, dims, d);
                let (w_out, w_lse) = naive::attention_forward(&f64s(&qkv), &layout, dims, d);
                // |s| ≤ √d·1.5²; output scale max|v|/(1 − p); lse's scale is 1 + |lse|.
                let smax = (hd as f64).sqrt() * 2.25;
                let out_scale = 1.5 / (1.0 - d.p as f64);
                assert_close(&format!("{name} out"), &down(&out), &w_out, |_| {
                    attention_tol(&layout, hd, smax, out_scale)
                });
                // lse is [rows, heads] (attention.rs's header).
                assert_close(&format!("{name} lse"), &down(&lse), &w_lse, |i| {
                    attention_tol(&layout, hd, smax, 1.0 + w_lse[i].abs())
                });
                // Masks do not depend on how the batch is laid out: the same sequences packed
                // give the same rows.
                if lname.starts_with("padded") {
                    let lengths: Vec<usize> = layout.valid.iter().map(|&v| v as usize).collect();
                    let packed = SeqLayout::packed(&lengths);
                    let width = 3 * heads * hd;
                    let mut qkv_p = Vec::new();
                    for b in 0..layout.batch() {
                        let s = layout.starts[b] as usize;
                        qkv_p.extend_from_slice(&qkv[s * width..(s + lengths[b]) * width]);
                    }
                    let (out_p, _) = attention_forward_op(&qkv_p, &packed, dims, d);
                    let (out_p, out) = (down(&out_p), down(&out));
                    let hidden = heads * hd;
                    for b in 0..layout.batch() {
                        let (s, sp) = (layout.starts[b] as usize, packed.starts[b] as usize);
                        assert_eq!(
                            &out[s * hidden..(s + lengths[b]) * hidden],
                            &out_p[sp * hidden..(sp + lengths[b]) * hidden],
                            "{name}: packed differs from padded in sequence {b}"
                        );
                    }
                }
            }
        }
    }
}

/// Forward then backward (from the forward's out and lse) of attention on `be`:
/// (out, lse, dqkv).
fn attention_run(
    be: &CpuBackend,
    qkv: &[f32],
    dout: &[f32],
    layout: &SeqLayout,
    dims: AttentionDims,
    d: Dropout,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = layout.total_rows();
    let hidden = dims.heads * dims.head_dim;
    let out = be.upload(&nonzero(rows * hidden, 1, 50.0)).unwrap();
    let lse = be.upload(&nonzero(rows * dims.heads, 2, 50.0)).unwrap();
    let qkv = be.upload(qkv).unwrap();
    be.attention_forward(&out, &lse, &qkv, layout, dims, d)
        .unwrap();
    let dqkv = be.upload(&nonzero(rows * 3 * hidden, 3, 50.0)).unwrap();
    be.attention_backward(
        &dqkv,
        &be.upload(dout).unwrap(),
        &qkv,
        &out,
        &lse,
        layout,
        dims,
        d,
    )
    .unwrap();
    let down = |t| be.download(t).unwrap();
    (down(&out), down(&lse), down(&dqkv))
}

/// Attention with 16-bit products (`--fp16`/`--bf16` at head_dim 32 or 64: the emulation of the
/// GPU's tensor-core kernels) against `naive::attention_16`, an f64 computation from the
/// rounded operands whose per-element bounds are fp32 summation error plus the 16-bit rounding
/// flips it allows (its doc comment). The rounding must matter: somewhere the result differs
/// from fp32 attention by more than those bounds (else this test could not fail).
#[test]
fn attention_16bit() {
    let mut wide = layouts();
    wide.push(("padded [70, 33] in 70", SeqLayout::padded(&[70, 33], 70)));
    wide.push((
        "packed rows [40, 9] valid [21, 9]",
        SeqLayout {
            starts: vec![0, 40],
            rows: vec![40, 9],
            valid: vec![21, 9],
        },
    ));
    for prec in [MatmulPrecision::F16, MatmulPrecision::Bf16] {
        let be = CpuBackend::with_matmul_precision(prec);
        let (mut out_differs, mut dqkv_differs) = (false, false);
        for (li, (lname, layout)) in wide.iter().enumerate() {
            for (heads, hd) in [(2, 32), (1, 64)] {
                for d in attention_dropouts() {
                    let name = format!(
                        "attention {} {lname} heads {heads} head_dim {hd} p {}",
                        prec.name(),
                        d.p
                    );
                    assert_eq!(attention_rounding(prec, hd), prec);
                    let dims = AttentionDims {
                        heads,
                        head_dim: hd,
                    };
                    let rows = layout.total_rows();
                    let seed = 2500 + 100 * li as u64 + hd as u64;
                    // Queries and keys of 2.5 give peaked softmax rows (large probabilities,
                    // whose rounding shows in the output).
                    let mut qkv = nonzero(rows * 3 * heads * hd, seed, 1.5);
                    for (x, r) in qkv.iter_mut().zip(0..) {
                        if (r / (heads * hd)) % 3 < 2 {
                            *x *= 2.5 / 1.5;
                        }
                    }
                    let dout = nonzero(rows * heads * hd, seed + 1, 1.0);
                    let (out, lse, dqkv) = attention_run(&be, &qkv, &dout, layout, dims, d);
                    let r = naive::attention_16(&qkv, &dout, &out, &lse, layout, dims, d, prec);
                    assert_close(&format!("{name} out"), &out, &r.out, |i| {
                        r.out_tol[i] + 1e-30
                    });
                    assert_close(&format!("{name} lse"), &lse, &r.lse, |i| r.lse_tol[i]);
                    assert_close(&format!("{name} dqkv"), &dqkv, &r.dqkv, |i| {
                        r.dqkv_tol[i] + 1e-30
                    });
                    let (out32, _, dqkv32) = attention_run(&BE, &qkv, &dout, layout, dims, d);
                    let beyond = |x: &[f32], w: &[f64], tol: &[f64]| {
                        (0..x.len()).any(|i| (x[i] as f64 - w[i]).abs() > 2.0 * tol[i])
                    };
                    out_differs |= beyond(&out32, &r.out, &r.out_tol);
                    dqkv_differs |= beyond(&dqkv32, &r.dqkv, &r.dqkv_tol);
                }
            }
        }
        assert!(
            out_differs && dqkv_differs,
            "{}: fp32 attention is within the 16-bit bounds everywhere (out {out_differs}, \
             dqkv {dqkv_differs}): the test cannot tell rounding from none",
            prec.name()
        );
    }
    // Other head dims keep fp32 attention under 16-bit GEMMs (the GPU has no tensor-core
    // kernel for them): bit-identical to the fp32 backend.
    let layout = SeqLayout::padded(&[7, 3], 7);
    let dims = AttentionDims {
        heads: 2,
        head_dim: 12,
    };
    let qkv = nonzero(14 * 3 * 24, 7, 1.5);
    let dout = nonzero(14 * 24, 8, 1.0);
    let d = attention_dropouts()[1];
    let be = CpuBackend::with_matmul_precision(MatmulPrecision::F16);
    assert_eq!(
        attention_rounding(MatmulPrecision::F16, 12),
        MatmulPrecision::F32
    );
    assert_eq!(
        attention_run(&be, &qkv, &dout, &layout, dims, d),
        attention_run(&BE, &qkv, &dout, &layout, dims, d)
    );
}

#[test]
fn attention_backward() {
    for (li, (lname, layout)) in layouts().into_iter().enumerate() {
        for (heads, hd) in ATTENTION_DIMS {
            for d in attention_dropouts() {
                let name = format!(
                    "attention_backward {lname} heads {heads} head_dim {hd} p {}",
                    d.p
                );
                let dims = AttentionDims {
                    heads,
                    head_dim: hd,
                };
                let hidden = heads * hd;
                let rows = layout.total_rows();
                let seed = 1600 + 100 * li as u64 + 10 * hd as u64;
                let qkv = nonzero(rows * 3 * hidden, seed, 1.5);
                let dout = nonzero(rows * hidden, seed + 1, 1.0);
                let (out, lse) = attention_forward_op(&qkv, &layout, dims, d);
                let dqkv = up(&nonzero(rows * 3 * hidden, seed + 2, 50.0));
                BE.attention_backward(&dqkv, &up(&dout), &up(&qkv), &out, &lse, &layout, dims, d)
                    .unwrap();
                let got = down(&dqkv);
                let (qkv, dout) = (f64s(&qkv), f64s(&dout));
                let want = naive::attention_backward(&dout, &qkv, &layout, dims, d);
                // The scale of the gradient's terms: 4·max|dqkv| (4× for cancellation among them).
                let smax = (hd as f64).sqrt() * 2.25;
                let g_scale = 4.0 * naive::abs(&want).iter().fold(0.0, |m: f64, v| m.max(*v));
                let tol = attention_tol(&layout, hd, smax, g_scale);
                assert_close(&name, &got, &want, |_| tol);
                // Padding keys get exactly zero K and V gradient; padding queries do get a Q one
                // (when they attend to two keys or more: over one key, softmax is constant).
                for b in 0..layout.batch() {
                    let (s, n, v) = (
                        layout.starts[b] as usize,
                        layout.rows[b] as usize,
                        layout.valid[b] as usize,
                    );
                    for r in s + v..s + n {
                        let row = &got[r * 3 * hidden..(r + 1) * 3 * hidden];
                        assert!(
                            row[hidden..].iter().all(|&g| g == 0.0),
                            "{name}: padding key row {r} has a gradient"
                        );
                        if v >= 2 {
                            assert!(
                                row[..hidden].iter().any(|&g| g != 0.0),
                                "{name}: padding query row {r} has no gradient"
                            );
                        }
                    }
                }
                // Finite differences of L = ⟨dout, attention(qkv)⟩ (the head dims up to 12).
                if hd <= 12 {
                    let fd = finite_differences(
                        |q| dot(&dout, &naive::attention_forward(q, &layout, dims, d).0),
                        &qkv,
                        H,
                    );
                    assert_close(&format!("{name} vs FD"), &got, &fd, |_| tol + FD_ERR);
                }
            }
        }
    }
}

// ---- loss --------------------------------------------------------------------------------------

/// (rows, classes, logit offset): a large offset checks the log-sum-exp is stable.
const CE_SHAPES: [(usize, usize, f32); 4] =
    [(1, 2, 0.0), (7, 3, 0.0), (33, 5, 40.0), (7, 37, -3.0)];

fn ce_case(rows: usize, classes: usize, offset: f32, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let logits = nonzero(rows * classes, seed, 3.0)
        .iter()
        .map(|v| v + offset)
        .collect();
    (logits, rand_ids(rows, seed + 1, classes as u32))
}

#[test]
fn cross_entropy_forward() {
    for (case, &(rows, classes, offset)) in CE_SHAPES.iter().enumerate() {
        for smoothing in [0.0f32, 0.1] {
            let seed = 1700 + 10 * case as u64;
            let (logits, labels) = ce_case(rows, classes, offset, seed);
            let losses = up(&nonzero(rows, seed + 2, 50.0));
            BE.cross_entropy_forward(&losses, &up(&logits), &up_ids(&labels), classes, smoothing)
                .unwrap();
            let want =
                naive::cross_entropy_forward(&f64s(&logits), &labels, classes, smoothing as f64);
            // Computed in f64 from the fp32 logits, rounded once: U·|loss| (2U for margin);
            // the absolute term covers the f64 log-sum-exp of logits ~40.
            assert_close(
                &format!("cross_entropy_forward {rows}x{classes} ε {smoothing}"),
                &down(&losses),
                &want,
                |i| 2.0 * U * want[i].abs() + 1e-12,
            );
        }
    }
}

#[test]
fn cross_entropy_backward() {
    for (case, &(rows, classes, offset)) in CE_SHAPES.iter().enumerate() {
        for smoothing in [0.0f32, 0.1] {
            for scale in [1.0 / rows as f32, 0.37] {
                let name =
                    format!("cross_entropy_backward {rows}x{classes} ε {smoothing} scale {scale}");
                let seed = 1800 + 10 * case as u64;
                let (logits, labels) = ce_case(rows, classes, offset, seed);
                let dz = up(&nonzero(rows * classes, seed + 2, 50.0));
                BE.cross_entropy_backward(
                    &dz,
                    &up(&logits),
                    &up_ids(&labels),
                    classes,
                    smoothing,
                    scale,
                )
                .unwrap();
                let (z, eps, s) = (f64s(&logits), smoothing as f64, scale as f64);
                let want = naive::cross_entropy_backward(&z, &labels, classes, eps, s);
                // f64 inside, one rounding out.
                let tol = |i: usize| 2.0 * U * want[i].abs() + 1e-12;
                let got = down(&dz);
                assert_close(&name, &got, &want, tol);
                // The gradient of scale·Σ_r loss_r, the mean loss for scale = 1/rows.
                let fd = finite_differences(
                    |z| {
                        s * naive::cross_entropy_forward(z, &labels, classes, eps)
                            .iter()
                            .sum::<f64>()
                    },
                    &z,
                    H,
                );
                assert_close(&format!("{name} vs FD"), &got, &fd, |i| tol(i) + FD_ERR);
            }
        }
    }
}

/// The bits of `x`, so that equality is bitwise (and a NaN equals itself).
fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// The fused op gives exactly what the forward and the backward give (the training step relies
/// on it: its numbers did not change when it switched to the fused op).
#[test]
fn cross_entropy_forward_backward() {
    for (rows, classes) in [1, 3, 37]
        .into_iter()
        .flat_map(|r| [2, 3, 5, 33].map(|c| (r, c)))
    {
        for smoothing in [0.0f32, 0.1] {
            for scale in [1.0 / rows as f32, 0.37] {
                let name = format!("{rows}x{classes} ε {smoothing} scale {scale}");
                let seed = 1900 + (100 * rows + classes) as u64;
                let (logits, labels) = ce_case(rows, classes, 0.5, seed);
                let (logits, labels) = (up(&logits), up_ids(&labels));
                // Outputs start as different garbage: each must be overwritten.
                let fused = [
                    up(&nonzero(rows, seed + 2, 50.0)),
                    up(&nonzero(rows * classes, seed + 3, 50.0)),
                ];
                BE.cross_entropy_forward_backward(
                    &fused[0], &fused[1], &logits, &labels, classes, smoothing, scale,
                )
                .unwrap();
                let apart = [
                    up(&nonzero(rows, seed + 4, 50.0)),
                    up(&nonzero(rows * classes, seed + 5, 50.0)),
                ];
                BE.cross_entropy_forward(&apart[0], &logits, &labels, classes, smoothing)
                    .unwrap();
                BE.cross_entropy_backward(&apart[1], &logits, &labels, classes, smoothing, scale)
                    .unwrap();
                for (what, f, a) in [
                    ("losses", &fused[0], &apart[0]),
                    ("dlogits", &fused[1], &apart[1]),
                ] {
                    assert_eq!(bits(&down(f)), bits(&down(a)), "{name}: {what}");
                }
            }
        }
    }
}

/// A row labelled `IGNORE_LABEL` (a dummy sequence of a batch padded to its sequence bucket) has
/// loss 0 and gradient 0 exactly, whatever its logits, the smoothing and the scale; the other
/// rows are computed as without it.
#[test]
fn cross_entropy_ignores_the_ignore_label() {
    let (rows, classes) = (7, 5);
    for smoothing in [0.0f32, 0.1] {
        for scale in [1.0 / 3.0, f32::MAX] {
            let (logits, labels) = ce_case(rows, classes, 40.0, 1900);
            let ignored = [1, 4, 6];
            let mut with_ignored = labels.clone();
            for &r in &ignored {
                with_ignored[r] = IGNORE_LABEL;
            }
            let run = |labels: &[u32]| {
                let losses = up(&nonzero(rows, 1902, 50.0));
                let dz = up(&nonzero(rows * classes, 1903, 50.0));
                let (z, y) = (up(&logits), up_ids(labels));
                BE.cross_entropy_forward(&losses, &z, &y, classes, smoothing)
                    .unwrap();
                BE.cross_entropy_backward(&dz, &z, &y, classes, smoothing, scale)
                    .unwrap();
                (down(&losses), down(&dz))
            };
            let (losses, dz) = run(&with_ignored);
            let (want_losses, want_dz) = run(&labels);
            for r in 0..rows {
                let dz_r = &dz[r * classes..][..classes];
                if ignored.contains(&r) {
                    assert_eq!(losses[r].to_bits(), 0, "row {r}'s loss");
                    assert!(dz_r.iter().all(|g| g.to_bits() == 0), "row {r}: {dz_r:?}");
                } else {
                    assert_eq!(losses[r], want_losses[r], "row {r}'s loss");
                    assert_eq!(dz_r, &want_dz[r * classes..][..classes], "row {r}");
                }
            }
        }
    }
}

/// Attention takes only layouts whose sequences lie back to back from row 0: on the GPU, a row
/// in no sequence would keep stale gradients and rows in two sequences would race.
#[test]
#[should_panic(expected = "back to back")]
fn attention_rejects_a_layout_with_a_gap() {
    let layout = SeqLayout {
        starts: vec![0, 4],
        rows: vec![3, 2],
        valid: vec![3, 2],
    };
    let dims = AttentionDims {
        heads: 1,
        head_dim: 4,
    };
    let (out, lse) = (up(&[0.0; 6 * 4]), up(&[0.0; 6]));
    let qkv = up(&nonzero(6 * 12, 1, 1.0));
    BE.attention_forward(&out, &lse, &qkv, &layout, dims, Dropout::NONE)
        .unwrap();
}

/// Labels out of range other than `IGNORE_LABEL` are still an error of the caller.
#[test]
#[should_panic(expected = "out of range")]
fn cross_entropy_rejects_other_labels_out_of_range() {
    let losses = up(&[0.0; 2]);
    let labels = up_ids(&[0, IGNORE_LABEL - 1]);
    BE.cross_entropy_forward(&losses, &up(&[0.5; 6]), &labels, 3, 0.1)
        .unwrap();
}

/// The reduced precisions the dense layers can read their operands in.
const REDUCED: [MatmulPrecision; 3] = [
    MatmulPrecision::F16,
    MatmulPrecision::Bf16,
    MatmulPrecision::Tf32,
];

fn rounded(x: &[f32], p: MatmulPrecision) -> Vec<f64> {
    x.iter().map(|&v| p.round(v) as f64).collect()
}

/// The fp32 result differs from `want` somewhere by more than `tol`: the test would notice
/// operands that were not rounded.
fn assert_rounding_shows(name: &str, fp32: &[f64], want: &[f64], tol: impl Fn(usize) -> f64) {
    assert!(
        fp32.iter()
            .zip(want)
            .enumerate()
            .any(|(i, (a, b))| (a - b).abs() > tol(i)),
        "{name}: rounding the operands changes nothing at this tolerance, so the test cannot \
         tell whether they were rounded"
    );
}

#[test]
fn linear_forward_reduced_precision() {
    // The GPU's fp16/bf16/TF32 GEMMs read rounded operands and accumulate in fp32; the CPU
    // emulates exactly that. Reference: the f64 layer on the rounded operands; the tolerance is
    // fp32 accumulation's, as in `linear_forward` (the products of rounded operands are exact).
    for p in REDUCED {
        let be = CpuBackend::with_matmul_precision(p);
        for (case, &(rows, k, n)) in LINEAR_SHAPES.iter().enumerate() {
            let name = format!("linear_forward {} {rows}x{k}x{n}", p.name());
            let seed = 2500 + 10 * case as u64;
            let x = nonzero(rows * k, seed, 1.0);
            let w = nonzero(n * k, seed + 1, 1.0);
            let b = nonzero(n, seed + 2, 1.0);
            let out = up(&nonzero(rows * n, seed + 3, 50.0));
            be.linear_forward(&out, &up(&x), &up(&w), &up(&b), rows, k, n)
                .unwrap();
            let want =
                naive::linear_forward(&rounded(&x, p), &rounded(&w, p), &f64s(&b), rows, k, n);
            let mag = naive::linear_forward(
                &abs(&f64s(&x)),
                &abs(&f64s(&w)),
                &abs(&f64s(&b)),
                rows,
                k,
                n,
            );
            let tol = |i: usize| (k + 2) as f64 * U * mag[i];
            assert_close(&name, &down(&out), &want, tol);
            let fp32 = naive::linear_forward(&f64s(&x), &f64s(&w), &f64s(&b), rows, k, n);
            assert_rounding_shows(&name, &fp32, &want, tol);
        }
    }
}

#[test]
fn linear_backward_reduced_precision() {
    // dx and dw from rounded dout, w, x; dbias sums the unrounded dout in fp32.
    for p in REDUCED {
        let be = CpuBackend::with_matmul_precision(p);
        for (case, &(rows, k, n)) in LINEAR_SHAPES.iter().enumerate() {
            let name = format!("linear_backward {} {rows}x{k}x{n}", p.name());
            let seed = 2600 + 10 * case as u64;
            let x = nonzero(rows * k, seed, 1.0);
            let w = nonzero(n * k, seed + 1, 1.0);
            let dout = nonzero(rows * n, seed + 3, 1.0);
            let dx = up(&nonzero(rows * k, seed + 4, 50.0));
            let (dw, db) = (be.zeros(n * k).unwrap(), be.zeros(n).unwrap());
            be.linear_backward(
                Some(&dx),
                false,
                &dw,
                &db,
                &up(&dout),
                &up(&x),
                &up(&w),
                rows,
                k,
                n,
            )
            .unwrap();
            let (gx, gw, _) = naive::linear_backward(
                &rounded(&dout, p),
                &rounded(&x, p),
                &rounded(&w, p),
                rows,
                k,
                n,
            );
            let (_, _, gb) = naive::linear_backward(&f64s(&dout), &f64s(&x), &f64s(&w), rows, k, n);
            let (mx, mw, mb) = naive::linear_backward(
                &abs(&f64s(&dout)),
                &abs(&f64s(&x)),
                &abs(&f64s(&w)),
                rows,
                k,
                n,
            );
            let tol_x = |i: usize| (n + 3) as f64 * U * mx[i];
            let tol_w = |i: usize| (rows + 3) as f64 * U * mw[i];
            assert_close(&format!("{name} dx"), &down(&dx), &gx, tol_x);
            assert_close(&format!("{name} dw"), &down(&dw), &gw, tol_w);
            assert_close(&format!("{name} dbias"), &down(&db), &gb, |i| {
                (rows + 3) as f64 * U * mb[i]
            });
            let (fx, fw, _) =
                naive::linear_backward(&f64s(&dout), &f64s(&x), &f64s(&w), rows, k, n);
            assert_rounding_shows(&format!("{name} dx"), &fx, &gx, tol_x);
            assert_rounding_shows(&format!("{name} dw"), &fw, &gw, tol_w);
        }
    }
}

// ---- optimizer ---------------------------------------------------------------------------------

#[test]
fn sum_squares() {
    // Sizes across the op's 2¹⁴-element chunks.
    for (case, &n) in [1usize, 7, 16385, 40000].iter().enumerate() {
        let x = nonzero(n, 1900 + case as u64, 1.0);
        let out = up(&[123.0]);
        BE.sum_squares(&out, &up(&x)).unwrap();
        let want = naive::sum_squares(&f64s(&x));
        // Accumulated in f64 (relative n·1e-16), rounded once to fp32: U relative (2U margin).
        assert_close(&format!("sum_squares n {n}"), &down(&out), &[want], |_| {
            2.0 * U * want
        });
    }
}

#[test]
fn clip_by_global_norm() {
    // (n, value scale, max_norm): clipped (‖g‖ ≈ 20 > 1), untouched (‖g‖ < 100), and a norm of
    // ~1.5e-7 against max_norm 1e-7, where clip_grad_norm_'s 1e-6 dominates the coefficient
    // (0.09 with it, 0.67 without).
    for (case, &(n, scale, max_norm)) in [
        (1221usize, 1.0f32, 1.0f32),
        (1221, 1.0, 100.0),
        (7, 1e-7, 1e-7),
        (1, 3.0, 0.5),
    ]
    .iter()
    .enumerate()
    {
        let name = format!("clip_by_global_norm n {n} max_norm {max_norm}");
        let x = nonzero(n, 2000 + case as u64, scale);
        let (xt, sumsq) = (up(&x), up(&[0.0]));
        BE.sum_squares(&sumsq, &xt).unwrap();
        BE.clip_by_global_norm(&xt, &sumsq, max_norm).unwrap();
        let got = down(&xt);
        let want = naive::clip_by_global_norm(&f64s(&x), max_norm as f64);
        // The coefficient from the fp32 sum of squares (U/2), rounded to fp32 (U), one product
        // (U): 3U relative.
        assert_close(&name, &got, &want, |i| 3.0 * U * want[i].abs());
        if case == 1 {
            assert_eq!(
                got, x,
                "{name}: a norm below max_norm changed the gradients"
            );
        }
    }
}

#[test]
fn unscale_and_check() {
    // Finite gradients: scaled, flag untouched (it is set, never cleared). Then one inf, one
    // NaN, at either end of the buffer and past the 4-wide vector part. The scale is read from
    // a device tensor, its reciprocal taken in fp32.
    let scale = up(&[65536.0]);
    let inv_scale = 1.0 / 65536.0;
    for (case, &n) in [1usize, 7, 1221].iter().enumerate() {
        let x = nonzero(n, 2100 + case as u64, 3e4);
        let (xt, flag) = (up(&x), up(&[0.0]));
        BE.unscale_and_check(&xt, &scale, &flag).unwrap();
        let want: Vec<f64> = x.iter().map(|&v| v as f64 * inv_scale).collect();
        // One product rounded to fp32 (a power of two: exact here, U allowed).
        assert_close(
            &format!("unscale_and_check n {n}"),
            &down(&xt),
            &want,
            |i| U * want[i].abs(),
        );
        assert_eq!(
            down(&flag),
            [0.0],
            "n {n}: finite gradients raised the flag"
        );
        let set = up(&[1.0]);
        BE.unscale_and_check(&up(&x), &scale, &set).unwrap();
        assert_eq!(down(&set), [1.0], "n {n}: the flag was cleared");
        for (bad, at) in [
            (f32::INFINITY, 0),
            (f32::NEG_INFINITY, n - 1),
            (f32::NAN, n / 2),
        ] {
            let mut y = x.clone();
            y[at] = bad;
            let flag = up(&[0.0]);
            BE.unscale_and_check(&up(&y), &scale, &flag).unwrap();
            assert_eq!(down(&flag), [1.0], "n {n}: {bad} at {at} not detected");
        }
    }
}

#[test]
fn scale_by() {
    for (case, &n) in [1usize, 7, 1221].iter().enumerate() {
        let x = nonzero(n, 2150 + case as u64, 2.0);
        let xt = up(&x);
        BE.scale_by(&xt, &up(&[3.0])).unwrap();
        let want: Vec<f64> = x.iter().map(|&v| v as f64 * 3.0).collect();
        assert_close(&format!("scale_by n {n}"), &down(&xt), &want, |i| {
            U * want[i].abs()
        });
    }
}

#[test]
fn update_loss_scale() {
    // Against the host's LossScaler (GradScaler's rule), from states on either side of each
    // branch: overflow, a clean step, the 2000th clean step, and growth that would overflow fp32.
    use bertft_cuda::train::loss_scale::{
        LossScaler, BACKOFF_FACTOR, GROWTH_FACTOR, GROWTH_INTERVAL,
    };
    for (scale, tracker) in [
        (65536.0f64, 0u32),
        (65536.0, 1998),
        (65536.0, 1999),
        (2f64.powi(127), 1999),
        (1.0, 7),
    ] {
        for found_inf in [false, true] {
            let state = up(&[scale as f32, tracker as f32]);
            BE.update_loss_scale(
                &state,
                &up(&[if found_inf { 1.0 } else { 0.0 }]),
                GROWTH_FACTOR as f32,
                BACKOFF_FACTOR as f32,
                GROWTH_INTERVAL,
            )
            .unwrap();
            let mut host = LossScaler {
                scale,
                growth_tracker: tracker,
            };
            host.update(found_inf);
            assert_eq!(
                down(&state),
                [host.scale as f32, host.growth_tracker as f32],
                "from ({scale}, {tracker}), found_inf {found_inf}"
            );
        }
    }
}

#[test]
fn adamw_skips_on_the_overflow_flag() {
    let (p, g) = (nonzero(9, 2190, 1.0), nonzero(9, 2191, 1.0));
    let (pt, gt, m, v) = (up(&p), up(&g), BE.zeros(9).unwrap(), BE.zeros(9).unwrap());
    let tensors = [AdamWTensor {
        param: &pt,
        grad: &gt,
        exp_avg: &m,
        exp_avg_sq: &v,
        weight_decay: 0.01,
    }];
    let step = AdamWStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        step: 1,
    };
    BE.adamw_update(&tensors, &step, Some(&up(&[1.0]))).unwrap();
    assert_eq!(
        (down(&pt), down(&m), down(&v)),
        (p.clone(), vec![0.0; 9], vec![0.0; 9])
    );
    BE.adamw_update(&tensors, &step, Some(&up(&[0.0]))).unwrap();
    assert_ne!(down(&pt), p, "a clear flag must let the update through");
}

#[test]
fn adamw_update() {
    // Three tensors in one flat buffer (as the trainer lays them out), with the decay groups'
    // weight decays and gradients of very different scales (1e-5 makes eps matter).
    let lens = [1usize, 7, 37];
    let decays = [0.01, 0.0, 0.1];
    let grad_scales = [1.0f32, 1e-3, 1e-5];
    let total: usize = lens.iter().sum();
    let offsets: Vec<usize> = lens
        .iter()
        .scan(0, |at, &l| Some(std::mem::replace(at, *at + l)))
        .collect();
    for (hi, &(lr, beta1, beta2, eps)) in [(1e-3, 0.9, 0.999, 1e-8), (0.05, 0.8, 0.99, 1e-6)]
        .iter()
        .enumerate()
    {
        let init = nonzero(total, 2100 + hi as u64, 1.0);
        let (param, grad) = (up(&init), BE.zeros(total).unwrap());
        let (m, v) = (BE.zeros(total).unwrap(), BE.zeros(total).unwrap());
        let mut p64 = f64s(&init);
        let (mut m64, mut v64) = (vec![0.0; total], vec![0.0; total]);
        for step in 1..=6u64 {
            let name =
                format!("adamw_update lr {lr} betas ({beta1}, {beta2}) eps {eps} step {step}");
            let mut g = Vec::new();
            for (t, &l) in lens.iter().enumerate() {
                g.extend(nonzero(
                    l,
                    2200 + 10 * step + t as u64 + 100 * hi as u64,
                    grad_scales[t],
                ));
            }
            BE.copy(&grad, &up(&g)).unwrap();
            let views = |t: &CpuTensor| -> Vec<CpuTensor> {
                (0..3).map(|i| BE.view(t, offsets[i], lens[i])).collect()
            };
            let (pv, gv, mv, vv) = (views(&param), views(&grad), views(&m), views(&v));
            let tensors: Vec<AdamWTensor<'_, CpuTensor>> = (0..3)
                .map(|i| AdamWTensor {
                    param: &pv[i],
                    grad: &gv[i],
                    exp_avg: &mv[i],
                    exp_avg_sq: &vv[i],
                    weight_decay: decays[i],
                })
                .collect();
            BE.adamw_update(
                &tensors,
                &AdamWStep {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    step,
                },
                Some(&up(&[0.0])),
            )
            .unwrap();
            let g64 = f64s(&g);
            for i in 0..3 {
                let r = offsets[i]..offsets[i] + lens[i];
                naive::adamw_update(
                    &mut p64[r.clone()],
                    &g64[r.clone()],
                    &mut m64[r.clone()],
                    &mut v64[r],
                    lr,
                    (beta1, beta2),
                    eps,
                    decays[i],
                    step,
                );
            }
            // The op keeps its state in fp32 (as torch does) and the naive one in f64: each step
            // adds a few roundings, 4U relative to the moments' scale (|m| + |g|, |v| + g²), and
            // to θ three (the decay factor, the product, the subtraction: 4U·|θ| with margin)
            // plus the update's, ≤ 16U·lr·|m̂/(√v̂ + ε)| (≤ 4 here). So `step` times that.
            let st = step as f64;
            assert_close(&format!("{name} exp_avg"), &down(&m), &m64, |i| {
                st * 4.0 * U * (m64[i].abs() + g64[i].abs())
            });
            assert_close(&format!("{name} exp_avg_sq"), &down(&v), &v64, |i| {
                st * 4.0 * U * (v64[i] + g64[i] * g64[i])
            });
            assert_close(&format!("{name} param"), &down(&param), &p64, |i| {
                st * (4.0 * U * p64[i].abs() + 64.0 * U * lr)
            });
        }
    }
}

// ---- activations stored in the matmul format ---------------------------------------------

/// Bitwise equality of two op results.
fn same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{what}: element {i}: {} vs {}", got[i], want[i]);
    }
}

/// `x` in a tensor of `be`'s matmul format (through `copy`, which rounds).
fn stored<B: Backend>(be: &B, x: &[f32]) -> B::Tensor {
    let t = be.zeros_in_matmul_format(x.len()).unwrap();
    be.copy(&t, &be.upload(x).unwrap()).unwrap();
    t
}

/// Under fp16/bf16 GEMMs the feed-forward activations and the LayerNorm outputs are kept 16-bit
/// (`Dtype`): a 16-bit output (or LayerNorm's 16-bit copy of its fp32 output) holds the fp32
/// result rounded once, and a 16-bit input gives the ops exactly what the fp32 tensor of the
/// same values gives (the GEMMs round their operands to that format anyway, and the activation
/// computes in fp32). So every check here is bit for bit, against the fp32 path and
/// `Dtype::round`.
#[test]
fn matmul_format_storage() {
    for p in [MatmulPrecision::F32, MatmulPrecision::Tf32] {
        let be = CpuBackend::with_matmul_precision(p);
        let t = be.zeros_in_matmul_format(5).unwrap();
        assert_eq!(be.dtype(&t), Dtype::F32, "{}", p.name());
    }
    for (p, dtype) in [
        (MatmulPrecision::F16, Dtype::F16),
        (MatmulPrecision::Bf16, Dtype::Bf16),
    ] {
        let be = CpuBackend::with_matmul_precision(p);
        let round = |v: &[f32]| v.iter().map(|&x| dtype.round(x)).collect::<Vec<f32>>();
        let t = be.zeros_in_matmul_format(7).unwrap();
        assert_eq!(be.dtype(&t), dtype);
        assert_eq!(be.dtype(&be.view(&t, 2, 3)), dtype, "a view keeps the type");
        assert!(down(&t).iter().all(|&v| v == 0.0));

        // copy rounds into 16 bits; 1e5 is beyond fp16's range (inf there, finite in bf16).
        let mut v = nonzero(33, 1, 3.0);
        v[3] = 1e5;
        let c = stored(&be, &v);
        same_bits(
            &format!("{} copy", p.name()),
            &be.download(&c).unwrap(),
            &round(&v),
        );
        assert_eq!(
            be.download(&c).unwrap()[3].is_infinite(),
            dtype == Dtype::F16
        );

        for &(rows, k, n) in &LINEAR_SHAPES {
            let name = format!("{} linear {rows}x{k}x{n}", p.name());
            let seed = (rows * 100 + k * 10 + n) as u64;
            let (x, w, b) = (
                nonzero(rows * k, seed, 1.0),
                nonzero(n * k, seed + 1, 1.0),
                nonzero(n, seed + 2, 1.0),
            );
            let (w, b) = (up(&w), up(&b));
            let wide = up(&nonzero(rows * n, seed + 3, 9.0));
            be.linear_forward(&wide, &up(&x), &w, &b, rows, k, n)
                .unwrap();
            let narrow = stored(&be, &nonzero(rows * n, seed + 4, 9.0));
            let x16 = stored(&be, &x);
            be.linear_forward(&narrow, &x16, &w, &b, rows, k, n)
                .unwrap();
            same_bits(&name, &be.download(&narrow).unwrap(), &round(&down(&wide)));

            let dout = nonzero(rows * n, seed + 5, 1.0);
            let backward = |x: &CpuTensor| {
                let (dx, dw, db) = (
                    up(&nonzero(rows * k, seed + 6, 1.0)),
                    up(&nonzero(n * k, seed + 7, 1.0)),
                    up(&nonzero(n, seed + 8, 1.0)),
                );
                be.linear_backward(Some(&dx), true, &dw, &db, &up(&dout), x, &w, rows, k, n)
                    .unwrap();
                [down(&dx), down(&dw), down(&db)]
            };
            let (from_wide, from_narrow) = (backward(&up(&round(&x))), backward(&x16));
            for (what, (a, b)) in ["dx", "dw", "dbias"]
                .iter()
                .zip(from_narrow.iter().zip(&from_wide))
            {
                same_bits(&format!("{name} backward {what}"), a, b);
            }
        }

        for act in ACTIVATIONS {
            for &n in &ELEMENTWISE_SIZES {
                let name = format!("{} {act:?} n {n}", p.name());
                let x = round(&nonzero(n, 900 + n as u64, 4.0));
                let wide = up(&nonzero(n, 901, 9.0));
                be.activation_forward(&wide, &up(&x), act).unwrap();
                let narrow = stored(&be, &nonzero(n, 902, 9.0));
                be.activation_forward(&narrow, &stored(&be, &x), act)
                    .unwrap();
                same_bits(&name, &be.download(&narrow).unwrap(), &round(&down(&wide)));

                let dout = up(&nonzero(n, 903, 1.0));
                let (dx_wide, dx_narrow) = (up(&nonzero(n, 904, 9.0)), up(&nonzero(n, 905, 9.0)));
                be.activation_backward(&dx_wide, &dout, &up(&x), act)
                    .unwrap();
                be.activation_backward(&dx_narrow, &dout, &stored(&be, &x), act)
                    .unwrap();
                same_bits(
                    &format!("{name} backward"),
                    &down(&dx_narrow),
                    &down(&dx_wide),
                );
            }
        }

        // LayerNorm's 16-bit copy of its output: the fp32 output (the same bits as without a
        // copy) rounded once, with and without the fused residual add.
        for &(rows, cols) in &LAYERNORM_SHAPES {
            for residual in [false, true] {
                let name = format!("{} layernorm {rows}x{cols} residual {residual}", p.name());
                let c = layernorm_case(rows, cols, residual, (rows * cols) as u64);
                let [plain, ..] = c.forward(rows, cols, 1e-12, 7);
                let (out, mean, rstd) = (
                    up(&nonzero(rows * cols, 1, 9.0)),
                    up(&nonzero(rows, 2, 9.0)),
                    up(&nonzero(rows, 3, 9.0)),
                );
                let copy = stored(&be, &nonzero(rows * cols, 4, 9.0));
                let (b, sum) = (
                    c.b.as_ref().map(|b| up(b)),
                    up(&nonzero(rows * cols, 5, 9.0)),
                );
                be.layernorm_forward(
                    &out,
                    Some(&copy),
                    &mean,
                    &rstd,
                    &up(&c.a),
                    b.as_ref().map(|b| ResidualAdd {
                        residual: b,
                        sum: &sum,
                        dropout: Dropout::NONE,
                    }),
                    &up(&c.gamma),
                    &up(&c.beta),
                    rows,
                    cols,
                    1e-12,
                )
                .unwrap();
                same_bits(&name, &down(&out), &down(&plain));
                same_bits(
                    &format!("{name} copy"),
                    &be.download(&copy).unwrap(),
                    &round(&down(&out)),
                );
            }
        }
        let (g, zero) = (up(&[1.0; 4]), up(&[0.0; 4]));
        let ln_into = |copy: &CpuTensor| {
            be.layernorm_forward(
                &up(&[0.0; 4]),
                Some(copy),
                &up(&[0.0]),
                &up(&[0.0]),
                &up(&[1.0, 2.0, 3.0, 4.0]),
                None,
                &g,
                &zero,
                1,
                4,
                1e-12,
            )
        };
        assert!(ln_into(&up(&[0.0; 4])).is_err(), "an fp32 copy");
        assert!(
            ln_into(&stored(&be, &[0.0; 5])).is_err(),
            "a copy of another length"
        );
        let other = match dtype {
            Dtype::F16 => CpuBackend::with_matmul_precision(MatmulPrecision::Bf16),
            _ => CpuBackend::with_matmul_precision(MatmulPrecision::F16),
        };
        let err = ln_into(&stored(&other, &[0.0; 4])).unwrap_err();
        assert!(err.to_string().contains("matmul format"), "{err}");

        // Mixed types where the op wants one, and another backend's format, are errors.
        let (x16, out32) = (stored(&be, &[0.5; 4]), up(&[0.0; 4]));
        let err = be
            .activation_forward(&out32, &x16, Activation::GeluErf)
            .unwrap_err();
        assert!(err.to_string().contains("activation_forward"), "{err}");
        let other = match dtype {
            Dtype::F16 => CpuBackend::with_matmul_precision(MatmulPrecision::Bf16),
            _ => CpuBackend::with_matmul_precision(MatmulPrecision::F16),
        };
        let foreign = stored(&other, &[0.5; 4]);
        let err = be
            .activation_backward(&up(&[0.0; 4]), &up(&[1.0; 4]), &foreign, Activation::Relu)
            .unwrap_err();
        assert!(err.to_string().contains("matmul format"), "{err}");
        assert!(be.copy(&up(&[0.0; 4]), &x16).is_err(), "16-bit into fp32");
    }
}

/// An op that reads fp32 only refuses a 16-bit tensor loudly (on the CUDA backend it would read
/// the wrong bytes): the CPU tests of the shared model code thereby check that it never passes
/// one.
#[test]
#[should_panic(expected = "reads and writes fp32 only")]
fn fp32_only_ops_refuse_16_bit_tensors() {
    let be = CpuBackend::with_matmul_precision(MatmulPrecision::F16);
    let x = stored(&be, &[0.5; 8]);
    let _ = be.tanh_forward(&up(&[0.0; 8]), &x);
}

/// The cases of the stored-tensor attention tests: fp16 and bf16 at head dims 32 and 64 (the
/// tensor-core rounding) and 5 (fp32 attention), dropout on.
fn stored_attention_cases() -> impl Iterator<Item = (MatmulPrecision, AttentionDims, Dropout)> {
    let d = Dropout {
        p: 0.1,
        seed: 3,
        stream: 4,
    };
    [MatmulPrecision::F16, MatmulPrecision::Bf16]
        .into_iter()
        .flat_map(move |p| {
            [(2, 32), (1, 64), (3, 5)]
                .map(|(heads, head_dim)| (p, AttentionDims { heads, head_dim }, d))
        })
}

/// Attention reads a `qkv` stored in the matmul format where it rounds its operands to that
/// format anyway (`Backend::attention_rounding`: fp16/bf16 at head dims 32 and 64), with bit for
/// bit the results of the fp32 tensor holding the same values; elsewhere (fp32 attention) a
/// 16-bit qkv is an error, not a silent change of the numbers.
#[test]
fn attention_reads_qkv_stored_in_the_matmul_format() {
    let layout = SeqLayout::packed(&[5, 2, 7]);
    let rows = layout.total_rows();
    for (p, dims, d) in stored_attention_cases() {
        let be = CpuBackend::with_matmul_precision(p);
        let AttentionDims { heads, head_dim } = dims;
        let hidden = heads * head_dim;
        let dtype = p.storage_dtype();
        let qkv: Vec<f32> = nonzero(rows * 3 * hidden, 5, 1.5)
            .into_iter()
            .map(|v| dtype.round(v))
            .collect();
        let dout = nonzero(rows * hidden, 6, 1.0);
        let name = format!("{} {heads} heads of {head_dim}", p.name());
        let run = |qkv_t: &CpuTensor| -> Result<Vec<Vec<f32>>, anyhow::Error> {
            let out = up(&nonzero(rows * hidden, 1, 50.0));
            let lse = up(&nonzero(rows * heads, 2, 50.0));
            be.attention_forward(&out, &lse, qkv_t, &layout, dims, d)?;
            let dqkv = up(&nonzero(rows * 3 * hidden, 3, 50.0));
            be.attention_backward(&dqkv, &up(&dout), qkv_t, &out, &lse, &layout, dims, d)?;
            Ok(vec![down(&out), down(&lse), down(&dqkv)])
        };
        let wide = run(&up(&qkv)).unwrap();
        let narrow = run(&stored(&be, &qkv));
        if be.attention_rounding(head_dim) == MatmulPrecision::F32 {
            let err = narrow.unwrap_err();
            assert!(err.to_string().contains("qkv"), "{name}: {err}");
            continue;
        }
        for (what, (a, b)) in ["out", "lse", "dqkv"]
            .iter()
            .zip(narrow.unwrap().iter().zip(&wide))
        {
            same_bits(&format!("{name}: {what}"), a, b);
        }
    }
}

/// Where attention rounds to the matmul format (head dims 32 and 64 under fp16/bf16) its output
/// may be stored in it: the stored output is the fp32 one rounded once, and backward reads it as
/// stored (`rowsum(dO ∘ O)` from the rounded values, as FlashAttention-2 reads its 16-bit O):
/// not the backward of the unrounded output (the check that carries weight here: the CPU reads
/// a 16-bit tensor's values as an fp32 one's, so equality with the backward given an fp32
/// tensor of the rounded values holds by construction; on the GPU it is a real check,
/// `attention_stores_its_output`). Elsewhere a 16-bit output is an error, forward and backward.
#[test]
fn attention_stores_its_output_in_the_matmul_format() {
    let layout = SeqLayout::packed(&[5, 2, 7]);
    let rows = layout.total_rows();
    for (p, dims, d) in stored_attention_cases() {
        let be = CpuBackend::with_matmul_precision(p);
        let dtype = p.storage_dtype();
        let AttentionDims { heads, head_dim } = dims;
        let hidden = heads * head_dim;
        let qkv = stored(&be, &nonzero(rows * 3 * hidden, 5, 1.5));
        let dout = up(&nonzero(rows * hidden, 6, 1.0));
        let name = format!("{} {heads} heads of {head_dim}", p.name());
        let forward = |out: &CpuTensor| {
            let lse = up(&nonzero(rows * heads, 2, 50.0));
            be.attention_forward(out, &lse, &qkv, &layout, dims, d)
                .map(|()| down(&lse))
        };
        let backward = |out: &CpuTensor, lse: &[f32]| {
            let dqkv = up(&nonzero(rows * 3 * hidden, 3, 50.0));
            be.attention_backward(&dqkv, &dout, &qkv, out, &up(lse), &layout, dims, d)
                .unwrap();
            down(&dqkv)
        };
        let narrow = stored(&be, &nonzero(rows * hidden, 1, 50.0));
        if be.attention_rounding(head_dim) == MatmulPrecision::F32 {
            let err = forward(&narrow).unwrap_err();
            let want = format!("a {} out, but head dim 5", dtype.name());
            assert!(err.to_string().contains(&want), "{name}: {err}");
            let dqkv = up(&nonzero(rows * 3 * hidden, 3, 50.0));
            let lse = up(&nonzero(rows * heads, 2, 1.0));
            let err = be
                .attention_backward(&dqkv, &dout, &qkv, &narrow, &lse, &layout, dims, d)
                .unwrap_err();
            assert!(err.to_string().contains(&want), "{name} backward: {err}");
            continue;
        }
        let wide = up(&nonzero(rows * hidden, 1, 50.0));
        let (lse_wide, lse_narrow) = (forward(&wide).unwrap(), forward(&narrow).unwrap());
        same_bits(&format!("{name}: lse"), &lse_narrow, &lse_wide);
        let rounded: Vec<f32> = down(&wide).iter().map(|&v| dtype.round(v)).collect();
        let stored_out = be.download(&narrow).unwrap();
        same_bits(&format!("{name}: out"), &stored_out, &rounded);
        let from_stored = backward(&narrow, &lse_wide);
        same_bits(
            &format!("{name}: dqkv"),
            &from_stored,
            &backward(&up(&rounded), &lse_wide),
        );
        assert_ne!(
            from_stored,
            backward(&wide, &lse_wide),
            "{name}: O's rounding unseen"
        );
    }
}
