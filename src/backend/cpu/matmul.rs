//! Dense layers: `nn.Linear` forward and backward over row-major matrices.
//!
//! Forward:  `out[r, j] = bias[j] + Σ_k x[r, k]·w[j, k]`   (x: [rows, k], w: [n, k], out: [rows, n])
//! Backward: `dx[r, k] (= | +=) Σ_j dout[r, j]·w[j, k]` (`+=` with `dx_accumulate`),
//!           `dw[j, k] += Σ_r dout[r, j]·x[r, k]`,  `dbias[j] += Σ_r dout[r, j]`.
//! The GEMMs go through the gemm crate, whose strides make the transposes free.
//!
//! Precision: with a reduced [`MatmulPrecision`] every GEMM operand (`x`, `w`, `dout`) is first
//! rounded to that format, then multiplied and accumulated in fp32, which is what a GPU's
//! fp16/bf16/TF32 tensor-core GEMM with fp32 accumulation reads and does. The bias and its
//! gradient stay fp32 (the GPU adds the bias with an fp32 GEMM and sums `dout` in fp32).

use std::borrow::Cow;

use gemm::Parallelism;
use rayon::prelude::*;

use crate::backend::MatmulPrecision;

/// `v` as a GEMM in precision `p` reads it (borrowed unchanged in fp32).
pub fn round_operand(v: &[f32], p: MatmulPrecision) -> Cow<'_, [f32]> {
    if p == MatmulPrecision::F32 {
        Cow::Borrowed(v)
    } else {
        Cow::Owned(v.par_iter().map(|&x| p.round(x)).collect())
    }
}

/// `c[m, n] (= | +=) a[m, k]·b[k, n]`, element (i, j) of a matrix at `i·rs + j·cs`.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    c: &mut [f32],
    accumulate: bool,
) {
    let threads = if m * n * k < 32 * 1024 {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    };
    sgemm_on(
        m,
        n,
        k,
        a,
        (a_rs, a_cs),
        b,
        (b_rs, b_cs),
        c,
        accumulate,
        threads,
    )
}

/// [`sgemm`] on the calling thread only (for callers that are already parallel).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_serial(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
    c: &mut [f32],
    accumulate: bool,
) {
    sgemm_on(
        m,
        n,
        k,
        a,
        a_strides,
        b,
        b_strides,
        c,
        accumulate,
        Parallelism::None,
    )
}

#[allow(clippy::too_many_arguments)]
fn sgemm_on(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    c: &mut [f32],
    accumulate: bool,
    threads: Parallelism,
) {
    assert!(c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    assert!(a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    assert!(b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: the asserts above keep every strided access inside the slices; c does not alias
    // a or b (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            threads,
        );
    }
}

#[allow(clippy::too_many_arguments)]
pub fn linear_forward(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    rows: usize,
    k: usize,
    n: usize,
    precision: MatmulPrecision,
) {
    assert_eq!(
        (out.len(), x.len(), w.len(), bias.len()),
        (rows * n, rows * k, n * k, n)
    );
    let (x, w) = (round_operand(x, precision), round_operand(w, precision));
    out.par_chunks_mut(n)
        .for_each(|row| row.copy_from_slice(bias));
    // x·wᵀ: wᵀ[kk, j] = w[j, kk], so rows of wᵀ step by 1 and columns by k.
    sgemm(rows, n, k, &x, (k, 1), &w, (1, k), out, true);
}

#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dx: Option<&mut [f32]>,
    dx_accumulate: bool,
    dw: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    rows: usize,
    k: usize,
    n: usize,
    precision: MatmulPrecision,
) {
    assert_eq!(
        (dw.len(), dbias.len(), dout.len(), x.len(), w.len()),
        (n * k, n, rows * n, rows * k, n * k)
    );
    let dout_full = dout;
    let dout = round_operand(dout, precision);
    if let Some(dx) = dx {
        assert_eq!(dx.len(), rows * k);
        let w = round_operand(w, precision);
        sgemm(rows, k, n, &dout, (n, 1), &w, (k, 1), dx, dx_accumulate);
    }
    // doutᵀ·x: doutᵀ[j, r] = dout[r, j].
    let x = round_operand(x, precision);
    sgemm(n, k, rows, &dout, (1, n), &x, (k, 1), dw, true);
    column_sums_add(dbias, dout_full, rows, n);
}

/// `sums[j] += Σ_r m[r, j]`, over row blocks in parallel.
pub fn column_sums_add(sums: &mut [f32], m: &[f32], rows: usize, cols: usize) {
    const BLOCK: usize = 64;
    let partial = m[..rows * cols]
        .par_chunks(BLOCK * cols)
        .map(|block| {
            let mut acc = vec![0.0f32; cols];
            for row in block.chunks(cols) {
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            acc
        })
        .collect::<Vec<_>>();
    for acc in partial {
        sums.iter_mut().zip(&acc).for_each(|(s, a)| *s += a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(
        m: usize,
        n: usize,
        k: usize,
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
    ) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|kk| a(i, kk) * b(kk, j)).sum();
            }
        }
        c
    }

    #[test]
    fn sgemm_matches_naive_with_transposes() {
        let (m, n, k) = (37, 29, 51);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let want = naive(m, n, k, |i, kk| a[i * k + kk], |kk, j| b[kk * n + j]);
        let mut c = vec![1.0; m * n];
        sgemm(m, n, k, &a, (k, 1), &b, (n, 1), &mut c, false);
        c.iter()
            .zip(&want)
            .for_each(|(x, y)| assert!((x - y).abs() < 1e-4));
        // b read as its transpose: (bᵀ)ᵀ with b stored [n, k].
        let want_t = naive(m, k, k.min(n), |i, kk| a[i * k + kk], |kk, j| b[j * n + kk]);
        let mut ct = vec![0.0; m * k];
        sgemm(m, k, k.min(n), &a, (k, 1), &b, (1, n), &mut ct, false);
        ct.iter()
            .zip(&want_t)
            .for_each(|(x, y)| assert!((x - y).abs() < 1e-4));
    }
}
