//! The CUDA backend against the CPU reference: every op on the same random inputs through
//! [`CpuBackend`] and [`CudaBackend`], then a whole model forward + backward and six AdamW
//! training steps.
//!
//! Each test first opens GPU 0. Without a CUDA driver or GPU it prints exactly
//! `skipped: no CUDA device` and returns (the only allowed skip); any other failure to open the
//! backend fails the test.
//!
//! Tolerances (fp32, unit roundoff U = 2⁻²⁴ ≈ 6e-8): element-wise ops use the same formulas in
//! fp32 on both sides, so they agree to a few ulps (rtol 1e-6, CUDA's erff/expf/tanhf are within
//! 2 ulps of the correctly rounded values). Sums (GEMM, LayerNorm statistics, attention, the
//! loss) are added in different orders (and the CPU adds some in f64), so they agree to about
//! n·U relative to the sum of magnitudes: rtol 1e-5 relative to each element plus the same
//! relative to the largest element of the output (`close`). Gradients that go through several
//! sums get 5e-5. Dropout masks and gathers are compared exactly. The whole model: logits and
//! losses 3e-5, every parameter's gradient 1e-4 (the attention key bias, whose gradient is zero
//! up to rounding, against 1e-5 of the largest gradient). Training: weights within 1e-4 absolute
//! after six AdamW steps (the key bias excepted, see `six_training_steps`).
//!
//! Mixed precision: the CPU backend with the same [`MatmulPrecision`] rounds the GEMM operands
//! as the GPU's casts do (round to nearest even), and products of fp16/bf16 values are exact in
//! fp32, so fp16/bf16 GEMMs are held to fp32's 1e-5. TF32 gets 2e-3: the tensor cores' own
//! conversion of fp32 operands may truncate where the CPU rounds (one TF32 ulp, 2⁻¹⁰ relative,
//! per operand). Training in fp16/bf16: losses within 1% of the CPU's emulation (the issue's
//! bound), the first step's (forward only) within 1e-4.

mod common;

use bertft_cuda::backend::cpu::CpuBackend;
use bertft_cuda::backend::cuda::{driver, CudaBackend, CudaTensor};
use bertft_cuda::backend::philox::uniform;
use bertft_cuda::backend::{
    Activation, AdamWStep, AdamWTensor, AttentionDims, Backend, BranchGrad, Dropout, Dtype,
    MatmulPrecision, ResidualAdd, SeqLayout, IGNORE_LABEL,
};
use bertft_cuda::model::bert::{Activations, Batch, HostBatch, LossSpec, Mode};
use bertft_cuda::model::Classifier;
use bertft_cuda::train::loss_scale::LossScaler;
use bertft_cuda::train::optimizer::{AdamW, AdamWConfig};
use bertft_cuda::train::step::{
    queue_train_step, train_step, StepReport, StepScratch, StepSettings,
};
use common::fixture::{has_zero_exact_gradient, max_abs_diff};
use common::naive;
use common::tiny::*;

use std::io::Write;

const CPU: CpuBackend = CpuBackend::FP32;

/// GPU 0, or `None` (after printing `skipped: no CUDA device`) when there is no driver or no GPU.
fn gpu() -> Option<CudaBackend> {
    let no_device = match driver() {
        Err(_) => true,
        Ok(d) => d
            .gpus()
            .unwrap_or_else(|e| panic!("the CUDA driver cannot list its GPUs: {e:#}"))
            .is_empty(),
    };
    if no_device {
        // Straight to the stderr handle: libtest captures eprintln! of passing tests, and a skip
        // must be seen in the suite's output.
        let _ = writeln!(std::io::stderr(), "skipped: no CUDA device");
        return None;
    }
    Some(CudaBackend::new(0).unwrap_or_else(|e| panic!("CudaBackend::new(0): {e:#}")))
}

/// `|gpu − cpu| ≤ rtol·(|cpu| + max|cpu|)` element-wise (max over the finite values), naming
/// the worst element; where the CPU's value is not finite, the GPU's must be the same bits (an
/// infinite max|cpu| would let everything pass, and NaN passes nothing).
fn close(what: &str, gpu: &[f32], cpu: &[f32], rtol: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths differ");
    let scale = cpu
        .iter()
        .filter(|v| v.is_finite())
        .map(|v| v.abs() as f64)
        .fold(0.0, f64::max);
    let mut worst = None;
    let mut worst_ratio = 0.0f64;
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        let err = (g as f64 - c as f64).abs();
        let tol = rtol * (c.abs() as f64 + scale) + 1e-30;
        let ratio = if !c.is_finite() {
            if g.to_bits() == c.to_bits() && !c.is_nan() {
                0.0
            } else {
                f64::INFINITY
            }
        } else if err.is_nan() {
            f64::INFINITY
        } else {
            err / tol
        };
        if ratio > worst_ratio {
            worst_ratio = ratio;
            worst = Some(i);
        }
    }
    if let Some(i) = worst {
        assert!(
            worst_ratio <= 1.0,
            "{what}: element {i} of {}: gpu {}, cpu {}, |diff| {:.3e} > tolerance {:.3e} \
             (rtol {rtol:e}, max|cpu| {scale:.3e})",
            gpu.len(),
            gpu[i],
            cpu[i],
            (gpu[i] as f64 - cpu[i] as f64).abs(),
            rtol * (cpu[i].abs() as f64 + scale)
        );
    }
}

/// Bit-for-bit equality.
fn exact(what: &str, gpu: &[f32], cpu: &[f32]) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths differ");
    if let Some(i) = (0..gpu.len()).find(|&i| gpu[i].to_bits() != cpu[i].to_bits()) {
        panic!("{what}: element {i}: gpu {}, cpu {}", gpu[i], cpu[i]);
    }
}

/// Compares named outputs of one case.
fn compare(case: &str, gpu: &[(&str, Vec<f32>)], cpu: &[(&str, Vec<f32>)], rtol: f64) {
    for ((name, g), (_, c)) in gpu.iter().zip(cpu) {
        close(&format!("{case}: {name}"), g, c, rtol);
    }
}

fn up<B: Backend>(be: &B, x: &[f32]) -> B::Tensor {
    be.upload(x).unwrap()
}

fn down<B: Backend>(be: &B, t: &B::Tensor) -> Vec<f32> {
    be.download(t).unwrap()
}

/// A tensor holding `x` at element offset `offset` of a larger buffer (an unaligned view when
/// `offset % 4 != 0`, to reach the kernels' scalar paths).
fn up_at<B: Backend>(be: &B, x: &[f32], offset: usize) -> B::Tensor {
    let mut padded = random_vec(offset, 999, 1.0);
    padded.extend_from_slice(x);
    padded.extend(random_vec(3, 998, 1.0));
    let t = be.upload(&padded).unwrap();
    be.view(&t, offset, x.len())
}

fn random_ids(n: usize, seed: u64, below: u32) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((uniform(seed, 7, i) * below as f32) as u32).min(below - 1))
        .collect()
}

// ---- dense layers ----

fn linear_case<B: Backend>(
    be: &B,
    rows: usize,
    k: usize,
    n: usize,
    with_dx: bool,
    dx_accumulate: bool,
) -> Vec<(&'static str, Vec<f32>)> {
    let s = (rows * 1000 + k * 10 + n) as u64;
    let x = up(be, &random_vec(rows * k, s, 1.0));
    let w = up(be, &random_vec(n * k, s + 1, 0.5));
    let bias = up(be, &random_vec(n, s + 2, 0.5));
    let out = up(be, &random_vec(rows * n, s + 3, 9.0));
    be.linear_forward(&out, &x, &w, &bias, rows, k, n).unwrap();
    let dout = up(be, &random_vec(rows * n, s + 4, 1.0));
    let dx = up(be, &random_vec(rows * k, s + 5, 1.0));
    let dw = up(be, &random_vec(n * k, s + 6, 1.0));
    let dbias = up(be, &random_vec(n, s + 7, 1.0));
    be.linear_backward(
        with_dx.then_some(&dx),
        dx_accumulate,
        &dw,
        &dbias,
        &dout,
        &x,
        &w,
        rows,
        k,
        n,
    )
    .unwrap();
    vec![
        ("out", down(be, &out)),
        ("dx", down(be, &dx)),
        ("dw", down(be, &dw)),
        ("dbias", down(be, &dbias)),
    ]
}

#[test]
fn linear() {
    let Some(g) = gpu() else { return };
    for rows in [1, 7, 33] {
        for (k, n) in [(5, 20), (20, 37), (37, 5), (64, 96), (1, 3)] {
            for (with_dx, acc) in [(true, false), (true, true), (false, false)] {
                let case = format!("rows {rows}, k {k}, n {n}, dx {with_dx}, accumulate {acc}");
                compare(
                    &case,
                    &linear_case(&g, rows, k, n, with_dx, acc),
                    &linear_case(&CPU, rows, k, n, with_dx, acc),
                    1e-5,
                );
            }
        }
    }
}

/// `out = x·wᵀ + bias` with `out`, `x` and `w` views at `offset` elements into larger buffers,
/// and `bias` at `bias_offset`.
fn linear_forward_at<B: Backend>(
    be: &B,
    (rows, k, n): (usize, usize, usize),
    (offset, bias_offset): (usize, usize),
) -> Vec<f32> {
    let s = (rows * 1000 + k * 10 + n + offset) as u64;
    let out = up_at(be, &random_vec(rows * n, s, 9.0), offset);
    let x = up_at(be, &random_vec(rows * k, s + 1, 1.0), offset);
    let w = up_at(be, &random_vec(n * k, s + 2, 0.5), offset);
    let bias = up_at(be, &random_vec(n, s + 3, 0.5), bias_offset);
    be.linear_forward(&out, &x, &w, &bias, rows, k, n).unwrap();
    down(be, &out)
}

/// The forward GEMM takes the bias in cuBLASLt's epilogue where it can, and two cuBLAS GEMMs
/// where it cannot: a bias not 16-byte aligned (a view at an odd offset of the flat parameter
/// buffer can be one), or a single row or column. Both paths, in every GEMM precision, against
/// the CPU emulating it (tolerances as `linear_reduced_precision`'s), and which path ran is
/// checked: the epilogue must be taken wherever the bias is aligned, also with operands that are
/// only 4-byte aligned (the heuristic is told their real alignment).
#[test]
fn linear_forward_bias_epilogue_and_fallback() {
    for (p, rtol) in [
        (MatmulPrecision::F32, 1e-5),
        (MatmulPrecision::F16, 1e-5),
        (MatmulPrecision::Bf16, 1e-5),
        (MatmulPrecision::Tf32, 2e-3),
    ] {
        let Some((g, c)) = pair(p) else { return };
        // (operands, bias) offsets in elements: 1 is 4-byte aligned, 0 and 4 are 16-byte.
        for offsets in [(0, 0), (4, 4), (1, 1), (1, 4), (0, 1)] {
            for shape in [
                (33, 64, 96),
                (7, 37, 20),
                (128, 384, 1152),
                (1, 64, 96),
                (33, 64, 1),
            ] {
                let before = g.bias_epilogue_gemms();
                let got = linear_forward_at(&g, shape, offsets);
                let epilogue = g.bias_epilogue_gemms() - before;
                let case = format!("{} {shape:?} at offsets {offsets:?}", p.name());
                close(&case, &got, &linear_forward_at(&c, shape, offsets), rtol);
                let (rows, k, n) = shape;
                let eligible = offsets.1 % 4 == 0 && rows > 1 && n > 1;
                if !eligible {
                    // Our own rule: the fallback bias GEMM.
                    assert_eq!(epilogue, 0, "{case}: GEMMs through the bias epilogue");
                } else if offsets.0 % 4 == 0 && k % 8 == 0 {
                    // Aligned operands and leading dimensions: cuBLASLt has an algorithm.
                    assert_eq!(epilogue, 1, "{case}: GEMMs through the bias epilogue");
                } else {
                    // Misaligned operands or an odd k: cuBLASLt may offer none, and the
                    // fallback then runs; either is right, the values are checked above.
                    assert!(epilogue <= 1, "{case}: {epilogue} epilogue GEMMs");
                    let _ = writeln!(
                        std::io::stderr(),
                        "{case}: {}",
                        ["fallback bias GEMM", "cuBLASLt bias epilogue"][epilogue as usize]
                    );
                }
            }
        }
    }
}

/// GPU 0 with its dense layers' GEMMs in `p`, and the CPU emulating the same.
fn pair(p: MatmulPrecision) -> Option<(CudaBackend, CpuBackend)> {
    Some((
        gpu()?.with_matmul_precision(p),
        CpuBackend::with_matmul_precision(p),
    ))
}

#[test]
fn linear_reduced_precision() {
    for (p, rtol) in [
        (MatmulPrecision::F16, 1e-5),
        (MatmulPrecision::Bf16, 1e-5),
        (MatmulPrecision::Tf32, 2e-3),
    ] {
        let Some((g, c)) = pair(p) else { return };
        for rows in [1, 7, 33, 130] {
            for (k, n) in [(5, 20), (37, 5), (64, 96), (384, 1152)] {
                for (with_dx, acc) in [(true, false), (true, true), (false, false)] {
                    let case = format!(
                        "{} rows {rows}, k {k}, n {n}, dx {with_dx}, accumulate {acc}",
                        p.name()
                    );
                    compare(
                        &case,
                        &linear_case(&g, rows, k, n, with_dx, acc),
                        &linear_case(&c, rows, k, n, with_dx, acc),
                        rtol,
                    );
                }
            }
        }
    }
}

/// A linear layer's forward and backward with its weight a view of a flat parameter buffer,
/// either cast per GEMM or read from the region's 16-bit copy (`refresh_weight_copies`); the
/// outputs in the order of `linear_case`.
fn linear_from_params(
    be: &CudaBackend,
    (rows, k, n): (usize, usize, usize),
    w_at: usize,
    weight_copies: bool,
) -> Vec<(&'static str, Vec<f32>)> {
    let s = (rows * 1000 + k * 10 + n) as u64;
    // The copy covers `dense` (from element 4 of the buffer); the weight lies `w_at` elements
    // into it, the bias after it, and more parameters after them.
    let flat = up(be, &random_vec(4 + w_at + n * k + n + 5, s, 0.5));
    let dense = be.view(&flat, 4, w_at + n * k + n + 5);
    let w = be.view(&flat, 4 + w_at, n * k);
    let bias = be.view(&flat, 4 + w_at + n * k, n);
    let x = up(be, &random_vec(rows * k, s + 1, 1.0));
    let out = up(be, &random_vec(rows * n, s + 2, 9.0));
    let dout = up(be, &random_vec(rows * n, s + 3, 1.0));
    let dx = up(be, &random_vec(rows * k, s + 4, 1.0));
    let dw = up(be, &random_vec(n * k, s + 5, 1.0));
    let dbias = up(be, &random_vec(n, s + 6, 1.0));
    if weight_copies {
        be.prepare_weight_copies(&dense).unwrap();
    }
    be.run_region(&[s], &mut || {
        be.refresh_weight_copies(&dense)?;
        be.linear_forward(&out, &x, &w, &bias, rows, k, n)?;
        be.linear_backward(Some(&dx), false, &dw, &dbias, &dout, &x, &w, rows, k, n)
    })
    .unwrap();
    vec![
        ("out", down(be, &out)),
        ("dx", down(be, &dx)),
        ("dw", down(be, &dw)),
        ("dbias", down(be, &dbias)),
    ]
}

/// The weights' 16-bit copy, cast once per region, gives the GEMMs the bits of the per-call
/// casts (both round to nearest even), for fp16 and bf16: exactly where the weight's copy is as
/// aligned as a fresh allocation (cuBLAS picks its kernels by alignment too), within fp32
/// summation order where it is not; and a copy is only read inside the region that cast it.
#[test]
fn refresh_weight_copies() {
    for p in [MatmulPrecision::F16, MatmulPrecision::Bf16] {
        let Some(g) = gpu() else { return };
        let (per_call, with_copy) = (
            g.with_matmul_precision(p),
            gpu().unwrap().with_matmul_precision(p),
        );
        for shape in [(1, 5, 20), (33, 37, 5), (130, 384, 1152)] {
            // 128 elements in: 256 bytes into the copy, as aligned as an allocation.
            for w_at in [128, 2] {
                let case = format!("{} {shape:?}, weight at {w_at}", p.name());
                let want = linear_from_params(&per_call, shape, w_at, false);
                let got = linear_from_params(&with_copy, shape, w_at, true);
                for ((name, w), (_, g)) in want.iter().zip(&got) {
                    match w_at {
                        128 => exact(&format!("{case}: {name}"), g, w),
                        _ => close(&format!("{case}: {name}"), g, w, 1e-5),
                    }
                }
            }
        }
        // Outside a region the copy is stale: a weight changed after the region is read as
        // it is now.
        let be = gpu().unwrap().with_matmul_precision(p);
        let (rows, k, n) = (4, 8, 8);
        let flat = up(&be, &random_vec(n * k + n, 5, 0.5));
        let (w, bias) = (be.view(&flat, 0, n * k), be.view(&flat, n * k, n));
        let x = up(&be, &random_vec(rows * k, 6, 1.0));
        let out = up(&be, &vec![0.0; rows * n]);
        be.prepare_weight_copies(&flat).unwrap();
        be.run_region(&[1], &mut || be.refresh_weight_copies(&flat))
            .unwrap();
        be.copy(&w, &up(&be, &vec![0.0; n * k])).unwrap();
        be.linear_forward(&out, &x, &w, &bias, rows, k, n).unwrap();
        let bias_rows: Vec<f32> = down(&be, &bias).repeat(rows);
        exact(
            &format!("{} stale copy", p.name()),
            &down(&be, &out),
            &bias_rows,
        );
    }
}

// ---- embeddings ----

fn embeddings_case<B: Backend>(
    be: &B,
    rows: usize,
    hidden: usize,
    padding_idx: Option<u32>,
) -> Vec<(&'static str, Vec<f32>)> {
    let (vocab, maxpos, types) = (40, 16, 2);
    let s = (rows * 100 + hidden) as u64;
    let word = up(be, &random_vec(vocab * hidden, s, 1.0));
    let position = up(be, &random_vec(maxpos * hidden, s + 1, 1.0));
    let token_type = up(be, &random_vec(types * hidden, s + 2, 1.0));
    let mut id_vals = random_ids(rows, s + 3, vocab as u32);
    if rows > 2 {
        id_vals[1] = 0; // the padding row
        id_vals[2] = id_vals[0]; // a repeated token
    }
    let ids = be.upload_ids(&id_vals).unwrap();
    let positions = be
        .upload_ids(
            &(0..rows as u32)
                .map(|r| r % maxpos as u32)
                .collect::<Vec<_>>(),
        )
        .unwrap();
    let type_ids = be
        .upload_ids(&random_ids(rows, s + 4, types as u32))
        .unwrap();
    let out = up(be, &random_vec(rows * hidden, s + 5, 9.0));
    be.embeddings_forward(
        &out,
        &word,
        &position,
        &token_type,
        &ids,
        &positions,
        &type_ids,
        hidden,
    )
    .unwrap();
    let dout = up(be, &random_vec(rows * hidden, s + 6, 1.0));
    let dword = up(be, &random_vec(vocab * hidden, s + 7, 1.0));
    let dposition = up(be, &random_vec(maxpos * hidden, s + 8, 1.0));
    let dtoken_type = up(be, &random_vec(types * hidden, s + 9, 1.0));
    be.embeddings_backward(
        &dword,
        &dposition,
        &dtoken_type,
        &dout,
        &ids,
        &positions,
        &type_ids,
        hidden,
        padding_idx,
    )
    .unwrap();
    vec![
        ("out", down(be, &out)),
        ("dword", down(be, &dword)),
        ("dposition", down(be, &dposition)),
        ("dtoken_type", down(be, &dtoken_type)),
    ]
}

#[test]
fn embeddings() {
    let Some(g) = gpu() else { return };
    for rows in [1, 7, 33, 100] {
        for hidden in [5, 20, 37, 64] {
            for padding in [None, Some(0)] {
                let case = format!("rows {rows}, hidden {hidden}, padding {padding:?}");
                let (gg, cc) = (
                    embeddings_case(&g, rows, hidden, padding),
                    embeddings_case(&CPU, rows, hidden, padding),
                );
                // Forward adds the same three fp32 numbers in the same order.
                close(&format!("{case}: out"), &gg[0].1, &cc[0].1, 1e-6);
                // Backward adds with atomics, in any order.
                compare(&case, &gg[1..], &cc[1..], 1e-5);
            }
        }
    }
}

// ---- LayerNorm ----

/// `residual`: none, or the dropout probability of the fused `dropout(x) + residual` (0: none),
/// whose branch gradient backward then writes too.
fn layernorm_case<B: Backend>(
    be: &B,
    rows: usize,
    cols: usize,
    residual: Option<f32>,
) -> Vec<(&'static str, Vec<f32>)> {
    layernorm_case_at(be, rows, cols, residual, 0)
}

/// As `layernorm_case`, with every tensor a view at element `offset` (odd offsets reach the
/// kernels' scalar paths, forward and backward).
fn layernorm_case_at<B: Backend>(
    be: &B,
    rows: usize,
    cols: usize,
    residual: Option<f32>,
    offset: usize,
) -> Vec<(&'static str, Vec<f32>)> {
    let s = (rows * 10000 + cols * 10 + residual.is_some() as usize) as u64;
    // An offset and a spread per row, as real activations have.
    let xv: Vec<f32> = random_vec(rows * cols, s, 2.0)
        .iter()
        .enumerate()
        .map(|(i, v)| v + 0.5 * ((i / cols) % 5) as f32)
        .collect();
    let x = up_at(be, &xv, offset);
    let b = up_at(be, &random_vec(rows * cols, s + 1, 1.0), offset);
    let sum = up_at(be, &random_vec(rows * cols, s + 2, 9.0), offset);
    let gamma_v: Vec<f32> = random_vec(cols, s + 3, 0.3)
        .iter()
        .map(|v| v + 1.0)
        .collect();
    let gamma = up_at(be, &gamma_v, offset);
    let beta = up_at(be, &random_vec(cols, s + 4, 0.3), offset);
    let out = up_at(be, &random_vec(rows * cols, s + 5, 9.0), offset);
    let mean = up_at(be, &random_vec(rows, s + 6, 9.0), offset);
    let rstd = up_at(be, &random_vec(rows, s + 7, 9.0), offset);
    let dropout = residual.map(|p| Dropout {
        p,
        seed: s + 12,
        stream: 5,
    });
    be.layernorm_forward(
        &out,
        None,
        &mean,
        &rstd,
        &x,
        dropout.map(|dropout| ResidualAdd {
            residual: &b,
            sum: &sum,
            dropout,
        }),
        &gamma,
        &beta,
        rows,
        cols,
        1e-12,
    )
    .unwrap();
    let normalized = if residual.is_some() { &sum } else { &x };
    let dout = up_at(be, &random_vec(rows * cols, s + 8, 1.0), offset);
    let dx = up_at(be, &random_vec(rows * cols, s + 9, 9.0), offset);
    let dgamma = up_at(be, &random_vec(cols, s + 10, 1.0), offset);
    let dbeta = up_at(be, &random_vec(cols, s + 11, 1.0), offset);
    let dbranch = up_at(be, &random_vec(rows * cols, s + 13, 9.0), offset);
    be.layernorm_backward(
        &dx,
        &dgamma,
        &dbeta,
        &dout,
        normalized,
        &mean,
        &rstd,
        &gamma,
        rows,
        cols,
        dropout.map(|dropout| BranchGrad {
            dx: &dbranch,
            dropout,
        }),
    )
    .unwrap();
    let mut outs = vec![
        ("out", down(be, &out)),
        ("mean", down(be, &mean)),
        ("rstd", down(be, &rstd)),
        ("dx", down(be, &dx)),
        ("dgamma", down(be, &dgamma)),
        ("dbeta", down(be, &dbeta)),
    ];
    if residual.is_some() {
        outs.push(("dbranch", down(be, &dbranch)));
        outs.push(("sum", down(be, &sum)));
    }
    outs
}

#[test]
fn layernorm() {
    let Some(g) = gpu() else { return };
    // 3000 rows: several rows per warp in the backward's partials (above 8·SMs rows); 2048
    // columns: dynamic shared memory past 48 KiB, and the forward's scalar path (cols > 1024)
    // with the backward's vector path.
    for rows in [1, 7, 33, 300, 3000] {
        for cols in [5, 20, 37, 64, 768, 1024, 1030, 2048] {
            // Without a residual, with one, and with the dropout fused before it: the same
            // Philox mask as the CPU's (a mask differing in one element fails by far).
            for residual in [None, Some(0.0), Some(0.1)] {
                let case = format!("rows {rows}, cols {cols}, residual {residual:?}");
                let (gg, cc) = (
                    layernorm_case(&g, rows, cols, residual),
                    layernorm_case(&CPU, rows, cols, residual),
                );
                compare(&case, &gg[..3], &cc[..3], 1e-5);
                compare(&case, &gg[3..], &cc[3..], 5e-5);
            }
        }
    }
    // Views at odd and even unaligned offsets: the scalar paths of forward and backward (BERT's
    // widths otherwise always take the vector paths), against the CPU too.
    for offset in [1, 2] {
        for (rows, cols) in [(7, 64), (33, 768), (5, 1024)] {
            for residual in [None, Some(0.1)] {
                let case =
                    format!("rows {rows}, cols {cols}, residual {residual:?}, offset {offset}");
                let (gg, cc) = (
                    layernorm_case_at(&g, rows, cols, residual, offset),
                    layernorm_case_at(&CPU, rows, cols, residual, offset),
                );
                compare(&case, &gg[..3], &cc[..3], 1e-5);
                compare(&case, &gg[3..], &cc[3..], 5e-5);
            }
        }
    }
}

// ---- activations stored in the matmul format ----

/// `x` at element `offset` of a tensor stored in `be`'s matmul format (16-bit under
/// fp16/bf16): an fp32 upload copied in (`copy` rounds it).
fn stored_at<B: Backend>(be: &B, x: &[f32], offset: usize) -> B::Tensor {
    stored_in(be, x, offset).0
}

/// As `stored_at`, with the whole zeroed allocation the view lies in (3 elements after it), for
/// `guards_intact`.
fn stored_in<B: Backend>(be: &B, x: &[f32], offset: usize) -> (B::Tensor, B::Tensor) {
    let big = be.zeros_in_matmul_format(offset + x.len() + 3).unwrap();
    let t = be.view(&big, offset, x.len());
    be.copy(&t, &up_at(be, x, offset)).unwrap();
    (t, big)
}

/// The elements of `big` outside the view at `offset` of `len` elements are still 0: no op
/// addressed a 16-bit view with the wrong element size or wrote past it.
fn guards_intact<B: Backend>(what: &str, be: &B, big: &B::Tensor, offset: usize, len: usize) {
    let all = down(be, big);
    for (i, v) in all.iter().enumerate() {
        if i < offset || i >= offset + len {
            assert_eq!(
                *v, 0.0,
                "{what}: element {i} outside the view [{offset}, +{len}) written"
            );
        }
    }
}

/// 16-bit results of the same math on both backends: equal bits, except where the fp32 values
/// before the one rounding differed (summation order) across a rounding
/// boundary, which moves the stored value by one ulp of the format, or where they cancelled to
/// near 0 and their fp32 differences, up to `1e-5·max|cpu|` as in `linear_reduced_precision`,
/// exceed that ulp. Both are rare (fp32 differences ~1e-6 relative, an fp16 ulp ~1e-3, a bf16 ulp
/// ~8e-3): at most 2% of the elements may differ. A bias rounded to 16 bits before the add, or
/// a value rounded twice, moves a quarter or more of them.
fn one_rounding_apart(what: &str, gpu: &[f32], cpu: &[f32], dtype: Dtype) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths differ");
    let mantissa_bits = if dtype == Dtype::Bf16 { 7 } else { 10 };
    let scale = cpu.iter().map(|v| v.abs() as f64).fold(0.0, f64::max);
    let mut differing = 0;
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        if g.to_bits() == c.to_bits() {
            continue;
        }
        differing += 1;
        let ulp = 2f64.powi(((c.abs() as f64).log2().floor() as i32).max(-14) - mantissa_bits);
        let tol = ulp + 1e-5 * scale;
        assert!(
            c.is_finite() && (g as f64 - c as f64).abs() <= tol,
            "{what}: element {i}: gpu {g}, cpu {c}, more than {tol:e} (one ulp, {ulp:e}, and \
             fp32 noise) apart"
        );
    }
    assert!(
        differing * 50 <= gpu.len().max(50),
        "{what}: {differing} of {} elements differ",
        gpu.len()
    );
}

/// A dense layer with its input and output stored in the matmul format: the stored input, the
/// output, and the gradients (dx accumulated).
fn stored_linear_case<B: Backend>(
    be: &B,
    (rows, k, n): (usize, usize, usize),
    (offset, bias_offset): (usize, usize),
) -> Vec<(&'static str, Vec<f32>)> {
    let s = (rows * 1000 + k * 10 + n + offset) as u64;
    let (x, x_big) = stored_in(be, &random_vec(rows * k, s, 1.0), offset);
    let w = up_at(be, &random_vec(n * k, s + 1, 0.1), offset);
    // A bias larger than the product: rounding it to 16 bits before the add would move most
    // outputs.
    let bias = up_at(be, &random_vec(n, s + 2, 4.0), bias_offset);
    let (out, out_big) = stored_in(be, &random_vec(rows * n, s + 3, 9.0), offset);
    be.linear_forward(&out, &x, &w, &bias, rows, k, n).unwrap();
    guards_intact("linear_forward x", be, &x_big, offset, rows * k);
    guards_intact("linear_forward out", be, &out_big, offset, rows * n);
    let dout = up_at(be, &random_vec(rows * n, s + 4, 1.0), offset);
    let dx = up_at(be, &random_vec(rows * k, s + 5, 1.0), offset);
    let dw = up_at(be, &random_vec(n * k, s + 6, 1.0), offset);
    let dbias = up_at(be, &random_vec(n, s + 7, 1.0), bias_offset);
    be.linear_backward(Some(&dx), true, &dw, &dbias, &dout, &x, &w, rows, k, n)
        .unwrap();
    vec![
        ("x", down(be, &x)),
        ("out", down(be, &out)),
        ("dx", down(be, &dx)),
        ("dw", down(be, &dw)),
        ("dbias", down(be, &dbias)),
    ]
}

/// An activation with its input and output stored in the matmul format: the output (16-bit),
/// the same backend's fp32 activation of the same input values rounded as a 16-bit store rounds
/// it, and the input gradient (fp32).
fn stored_activation_case<B: Backend>(
    be: &B,
    n: usize,
    act: Activation,
    offset: usize,
) -> [Vec<f32>; 3] {
    let s = n as u64 * 3 + offset as u64;
    let x = stored_at(be, &random_vec(n, s, 4.0), offset);
    let (out, out_big) = stored_in(be, &random_vec(n, s + 1, 9.0), offset);
    be.activation_forward(&out, &x, act).unwrap();
    guards_intact("activation_forward out", be, &out_big, offset, n);
    let wide = up_at(be, &random_vec(n, s + 4, 9.0), offset);
    be.activation_forward(&wide, &up_at(be, &down(be, &x), offset), act)
        .unwrap();
    let dtype = be.dtype(&x);
    let rounded = down(be, &wide).iter().map(|&v| dtype.round(v)).collect();
    let dout = up_at(be, &random_vec(n, s + 2, 1.0), offset);
    let dx = up_at(be, &random_vec(n, s + 3, 9.0), offset);
    be.activation_backward(&dx, &dout, &x, act).unwrap();
    [down(be, &out), rounded, down(be, &dx)]
}

/// The ops that take 16-bit tensors (`Backend::zeros_in_matmul_format`), each on inputs both
/// backends hold bit for bit (checked: the stored input); views at odd offsets reach the
/// kernels' scalar paths and 2-byte-aligned GEMM operands, a bias at an odd offset the fallback
/// GEMMs (fp32 scratch, then a cast), and nothing outside a view may change. The dense layer's
/// 16-bit output as `one_rounding_apart`; the activation's 16-bit output bit for bit as the
/// GPU's own fp32 activation rounded (GELU's negative tail cancels, so GPU and CPU fp32 values
/// there differ by far more than 1e-6 relative and would flip many 16-bit roundings; the fp32
/// values are compared with the CPU's by `activations`); the fp32 gradients with the
/// tolerances of `linear_reduced_precision` and `activations`.
#[test]
fn matmul_format_storage() {
    for (p, dtype) in [
        (MatmulPrecision::F16, Dtype::F16),
        (MatmulPrecision::Bf16, Dtype::Bf16),
    ] {
        let Some((g, c)) = pair(p) else { return };
        assert_eq!(g.dtype(&g.zeros_in_matmul_format(3).unwrap()), dtype);
        for offset in [0, 1] {
            for bias_offset in [0, 1] {
                for shape in [(33, 64, 96), (7, 37, 20), (128, 384, 1536), (1, 64, 96)] {
                    let offsets = (offset, bias_offset);
                    let case = format!("{} {shape:?} at offsets {offsets:?}", p.name());
                    let before = g.bias_epilogue_gemms();
                    let got = stored_linear_case(&g, shape, offsets);
                    let path = ["fallback GEMMs + cast", "cuBLASLt bias epilogue, 16-bit D"]
                        [(g.bias_epilogue_gemms() - before).min(1) as usize];
                    let _ = writeln!(std::io::stderr(), "{case}: {path}");
                    let want = stored_linear_case(&c, shape, offsets);
                    exact(&format!("{case}: x stored"), &got[0].1, &want[0].1);
                    one_rounding_apart(&format!("{case}: out"), &got[1].1, &want[1].1, dtype);
                    compare(&case, &got[2..], &want[2..], 1e-5);
                }
            }
            for n in [1, 7, 33 * 37, 4099] {
                for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Relu] {
                    let case = format!("{} n {n}, {act:?}, offset {offset}", p.name());
                    let got = stored_activation_case(&g, n, act, offset);
                    let want = stored_activation_case(&c, n, act, offset);
                    exact(&format!("{case}: out"), &got[0], &got[1]);
                    close(&format!("{case}: dx"), &got[2], &want[2], 1e-6);
                }
            }
            // The copy at the tensors' offset, and (fp32 tensors aligned) at offsets that leave
            // only the copy unaligned to its 8-byte stores (1, 2) or aligned to them (4).
            for copy_offset in [offset, offset + 1, offset + 2, offset + 4] {
                for (rows, cols) in [(33, 768), (7, 37), (300, 384), (1, 1024), (5, 1030)] {
                    let case = format!(
                        "{} layernorm {rows}x{cols}, offsets {offset}, copy {copy_offset}",
                        p.name()
                    );
                    let offsets = (offset, copy_offset);
                    stored_layernorm_case(&g, rows, cols, offsets, &case);
                    stored_layernorm_case(&c, rows, cols, offsets, &format!("cpu {case}"));
                }
            }
        }
    }
}

/// LayerNorm (with the fused dropout and residual add) writing its fp32 output and the 16-bit
/// copy the GEMMs read: on the backend itself, the copy is the output rounded once, bit for
/// bit; the output is bit for bit the one written without a copy (the copy's alignment never
/// picks the kernel's path); nothing outside the copy's view changes. At offset 0 with `cols` a
/// multiple of 4 (and at most 1024) the kernel's vector path, else its scalar path; the copy at
/// `copy_offset`, a multiple of 4 for its 8-byte stores, else stored element by element. (The
/// fp32 output against the CPU's: `layernorm`.)
fn stored_layernorm_case<B: Backend>(
    be: &B,
    rows: usize,
    cols: usize,
    (offset, copy_offset): (usize, usize),
    what: &str,
) {
    let s = (rows * 100 + cols + offset + 7 * copy_offset) as u64;
    let x = up_at(be, &random_vec(rows * cols, s, 2.0), offset);
    let residual = up_at(be, &random_vec(rows * cols, s + 1, 1.0), offset);
    let gamma: Vec<f32> = random_vec(cols, s + 2, 0.3)
        .iter()
        .map(|v| v + 1.0)
        .collect();
    let (gamma, beta) = (
        up_at(be, &gamma, offset),
        up_at(be, &random_vec(cols, s + 3, 0.3), offset),
    );
    let run = |copy: Option<&B::Tensor>| {
        let out = up_at(be, &random_vec(rows * cols, s + 4, 9.0), offset);
        let sum = up_at(be, &random_vec(rows * cols, s + 5, 9.0), offset);
        let (mean, rstd) = (be.zeros(rows).unwrap(), be.zeros(rows).unwrap());
        let dropout = Dropout {
            p: 0.1,
            seed: s,
            stream: 3,
        };
        let add = ResidualAdd {
            residual: &residual,
            sum: &sum,
            dropout,
        };
        be.layernorm_forward(
            &out,
            copy,
            &mean,
            &rstd,
            &x,
            Some(add),
            &gamma,
            &beta,
            rows,
            cols,
            1e-12,
        )
        .unwrap();
        down(be, &out)
    };
    let (copy, big) = stored_in(be, &random_vec(rows * cols, s + 6, 9.0), copy_offset);
    let out = run(Some(&copy));
    guards_intact(&format!("{what}: copy"), be, &big, copy_offset, rows * cols);
    exact(&format!("{what}: out"), &out, &run(None));
    let dtype = be.dtype(&copy);
    let rounded: Vec<f32> = out.iter().map(|&v| dtype.round(v)).collect();
    exact(&format!("{what}: copy"), &down(be, &copy), &rounded);
}

// ---- activations ----

fn activation_case<B: Backend>(
    be: &B,
    n: usize,
    act: Activation,
    offset: usize,
) -> Vec<(&'static str, Vec<f32>)> {
    let s = n as u64 * 3 + offset as u64;
    let x = up_at(be, &random_vec(n, s, 4.0), offset);
    let dout = up_at(be, &random_vec(n, s + 1, 1.0), offset);
    let out = up_at(be, &random_vec(n, s + 2, 9.0), offset);
    let dx = up_at(be, &random_vec(n, s + 3, 9.0), offset);
    be.activation_forward(&out, &x, act).unwrap();
    be.activation_backward(&dx, &dout, &x, act).unwrap();
    let y = up_at(be, &random_vec(n, s + 4, 9.0), offset);
    let dy = up_at(be, &random_vec(n, s + 5, 9.0), offset);
    be.tanh_forward(&y, &x).unwrap();
    be.tanh_backward(&dy, &dout, &y).unwrap();
    vec![
        ("out", down(be, &out)),
        ("dx", down(be, &dx)),
        ("tanh", down(be, &y)),
        ("tanh dx", down(be, &dy)),
    ]
}

#[test]
fn activations() {
    let Some(g) = gpu() else { return };
    for n in [1, 7, 33 * 37, 4099] {
        for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Relu] {
            for offset in [0, 1] {
                let case = format!("n {n}, {act:?}, offset {offset}");
                compare(
                    &case,
                    &activation_case(&g, n, act, offset),
                    &activation_case(&CPU, n, act, offset),
                    1e-6,
                );
            }
        }
    }
}

// ---- dropout ----

fn dropout_case<B: Backend>(
    be: &B,
    n: usize,
    d: Dropout,
    offset: usize,
) -> Vec<(&'static str, Vec<f32>)> {
    let s = n as u64 + 17;
    // No zeros among the inputs, so a zero output is a dropped element.
    let nonzero = |v: Vec<f32>| -> Vec<f32> {
        v.into_iter()
            .map(|x| if x.abs() < 1e-3 { 0.5 } else { x })
            .collect()
    };
    let x = up_at(be, &nonzero(random_vec(n, s, 1.0)), offset);
    let dout = up_at(be, &nonzero(random_vec(n, s + 1, 1.0)), offset);
    let out = up_at(be, &random_vec(n, s + 2, 9.0), offset);
    let dx = up_at(be, &random_vec(n, s + 3, 9.0), offset);
    be.dropout_forward(&out, &x, d).unwrap();
    be.dropout_backward(&dx, &dout, d).unwrap();
    vec![("out", down(be, &out)), ("dx", down(be, &dx))]
}

#[test]
fn dropout() {
    let Some(g) = gpu() else { return };
    for n in [1, 7, 33 * 37, 4101] {
        for p in [0.0, 0.1, 0.5] {
            for offset in [0, 3] {
                let d = Dropout {
                    p,
                    seed: 1234,
                    stream: 77 + n as u64,
                };
                let case = format!("n {n}, p {p}, offset {offset}");
                let (gg, cc) = (
                    dropout_case(&g, n, d, offset),
                    dropout_case(&CPU, n, d, offset),
                );
                for ((name, gv), (_, cv)) in gg.iter().zip(&cc) {
                    // The same mask and the same fp32 product x·(1/(1−p)).
                    exact(&format!("{case}: {name}"), gv, cv);
                }
            }
        }
    }
}

/// The GPU with `p`'s tensor-core attention, or None after a skip line (no device, or sm < 80).
fn tensor_core_gpu(p: MatmulPrecision) -> Option<CudaBackend> {
    let (g, _) = pair(p)?;
    if g.attention_rounding(32) == MatmulPrecision::F32 {
        let _ = writeln!(
            std::io::stderr(),
            "skipped: no tensor-core attention (sm < 80)"
        );
        return None;
    }
    Some(g)
}

/// fp32 attention (head dim 5) refuses a 16-bit `which` (qkv or out): it would misread it.
/// A layout with a gap or an overlap between its sequences is refused before any launch, in
/// forward and backward (a row in no sequence would keep stale gradients; rows in two
/// sequences would be written by two blocks at once).
#[test]
fn attention_refuses_layouts_not_back_to_back() {
    let Some(g) = gpu() else { return };
    let dims = AttentionDims {
        heads: 1,
        head_dim: 4,
    };
    for (what, starts) in [("gap", vec![0, 4]), ("overlap", vec![0, 2])] {
        let layout = SeqLayout {
            starts,
            rows: vec![3, 2],
            valid: vec![3, 2],
        };
        let (out, lse) = (up(&g, &[0.0; 6 * 4]), up(&g, &[0.0; 6]));
        let qkv = up(&g, &random_vec(6 * 12, 1, 1.0));
        let err = g
            .attention_forward(&out, &lse, &qkv, &layout, dims, Dropout::NONE)
            .unwrap_err();
        assert!(err.to_string().contains("back to back"), "{what}: {err:#}");
        let (dout, dqkv) = (up(&g, &[1.0; 6 * 4]), up(&g, &[0.0; 6 * 12]));
        let err = g
            .attention_backward(&dqkv, &dout, &qkv, &out, &lse, &layout, dims, Dropout::NONE)
            .unwrap_err();
        assert!(
            err.to_string().contains("back to back"),
            "{what} backward: {err:#}"
        );
    }
}

fn fp32_attention_refuses(g: &CudaBackend, which: &str) {
    let layout = SeqLayout::packed(&[3, 2]);
    let dims = AttentionDims {
        heads: 2,
        head_dim: 5,
    };
    let tensor = |n: usize, narrow: bool| match narrow {
        true => stored_at(g, &random_vec(n, 1, 1.0), 0),
        false => up(g, &random_vec(n, 1, 1.0)),
    };
    let (qkv, out) = (
        tensor(5 * 30, which == "qkv"),
        tensor(5 * 10, which == "out"),
    );
    let lse = up(g, &[0.0; 5 * 2]);
    let err = g
        .attention_forward(&out, &lse, &qkv, &layout, dims, Dropout::NONE)
        .unwrap_err();
    let want = format!("{which}, but this head dim runs fp32 attention");
    assert!(err.to_string().contains(&want), "{err:#}");
    let (dout, dqkv) = (up(g, &[1.0; 5 * 10]), up(g, &[0.0; 5 * 30]));
    let err = g
        .attention_backward(&dqkv, &dout, &qkv, &out, &lse, &layout, dims, Dropout::NONE)
        .unwrap_err();
    assert!(err.to_string().contains(&want), "backward: {err:#}");
}

/// The tensor-core attention reads `qkv` stored 16-bit (the model keeps it so under
/// `--fp16`/`--bf16` at head dims 32 and 64) or fp32 (cast first by the launcher, to the values
/// the kernels' rounding gives): the same kernels on the same 16-bit values, so the results are
/// bit for bit those of `attention_tensor_cores`' fp32 input. fp32 attention (other head dims)
/// refuses a 16-bit qkv.
#[test]
fn attention_reads_stored_qkv() {
    for p in [MatmulPrecision::F16, MatmulPrecision::Bf16] {
        let Some(g) = tensor_core_gpu(p) else { return };
        for (name, layout) in layouts() {
            for (heads, head_dim) in [(2, 32), (3, 64)] {
                for offset in [0, 1, 3] {
                    let dims = AttentionDims { heads, head_dim };
                    let d = Dropout {
                        p: 0.1,
                        seed: 42,
                        stream: 9,
                    };
                    let case = format!(
                        "{} {name}, {heads} heads of {head_dim}, offset {offset}",
                        p.name()
                    );
                    let wide = attention_case_with(&g, &layout, dims, d, (offset, false));
                    let narrow = attention_case_with(&g, &layout, dims, d, (offset, true));
                    for ((what, a), (_, b)) in narrow.iter().zip(&wide) {
                        exact(&format!("{case}: {what}"), a, b);
                    }
                }
            }
        }
        fp32_attention_refuses(&g, "qkv");
    }
}

/// The tensor-core attention stores its output 16-bit where the model keeps it so (`_out16`
/// kernels) and backward reads it as stored (`attention_backward_delta_out_*`), each on the GPU
/// against its own fp32 path, bit for bit: the stored output is the fp32 output rounded once
/// (the same fp32 value, one conversion), lse is unchanged, and the gradients equal those from
/// an fp32 tensor of the rounded values (the delta kernels sum the same products in the same
/// order). Views at offsets 1 and 3 reach unaligned 16-bit stores; nothing outside a view
/// changes. fp32 attention (other head dims) refuses a 16-bit output.
#[test]
fn attention_stores_its_output() {
    for p in [MatmulPrecision::F16, MatmulPrecision::Bf16] {
        let Some(g) = tensor_core_gpu(p) else { return };
        for (name, layout) in layouts() {
            for (heads, head_dim) in [(2, 32), (3, 64)] {
                for offset in [0, 1, 3] {
                    let case = format!(
                        "{} {name}, {heads} heads of {head_dim}, offset {offset}",
                        p.name()
                    );
                    let dims = AttentionDims { heads, head_dim };
                    for (what, a, b) in stored_out_case(&g, &layout, dims, offset) {
                        exact(&format!("{case}: {what}"), &a, &b);
                    }
                }
            }
        }
        fp32_attention_refuses(&g, "out");
    }
}

/// `attention_stores_its_output`'s pairs, each to be equal bit for bit: (what, from the 16-bit
/// output, from the fp32 path).
fn stored_out_case<B: Backend>(
    be: &B,
    layout: &SeqLayout,
    dims: AttentionDims,
    offset: usize,
) -> Vec<(&'static str, Vec<f32>, Vec<f32>)> {
    let rows = layout.total_rows();
    let (heads, hidden) = (dims.heads, dims.heads * dims.head_dim);
    let s = (rows * 1000 + hidden * 10 + heads + offset) as u64;
    let d = Dropout {
        p: 0.1,
        seed: 42,
        stream: 9,
    };
    let qkv = stored_at(be, &random_vec(rows * 3 * hidden, s, 1.5), offset);
    let forward = |out: &B::Tensor| {
        let lse = up(be, &random_vec(rows * heads, s + 2, 9.0));
        be.attention_forward(out, &lse, &qkv, layout, dims, d)
            .unwrap();
        down(be, &lse)
    };
    let (narrow, big) = stored_in(be, &random_vec(rows * hidden, s + 1, 9.0), offset);
    let wide = up_at(be, &random_vec(rows * hidden, s + 1, 9.0), offset);
    let (lse_narrow, lse_wide) = (forward(&narrow), forward(&wide));
    guards_intact("attention out", be, &big, offset, rows * hidden);
    let dtype = be.dtype(&narrow);
    let rounded: Vec<f32> = down(be, &wide).iter().map(|&v| dtype.round(v)).collect();
    let dout = up_at(be, &random_vec(rows * hidden, s + 3, 1.0), offset);
    let backward = |out: &B::Tensor| {
        let dqkv = up(be, &random_vec(rows * 3 * hidden, s + 4, 9.0));
        let lse = up(be, &lse_wide);
        be.attention_backward(&dqkv, &dout, &qkv, out, &lse, layout, dims, d)
            .unwrap();
        down(be, &dqkv)
    };
    vec![
        ("out", down(be, &narrow), rounded.clone()),
        ("lse", lse_narrow, lse_wide.clone()),
        (
            "dqkv",
            backward(&narrow),
            backward(&up_at(be, &rounded, offset)),
        ),
    ]
}

// ---- first tokens ----

fn layouts() -> Vec<(&'static str, SeqLayout)> {
    vec![
        ("padded", SeqLayout::padded(&[7, 3, 6, 1], 7)),
        ("packed", SeqLayout::packed(&[7, 3, 6, 1])),
        ("one row", SeqLayout::packed(&[1])),
        ("long padded", SeqLayout::padded(&[70, 33], 70)),
        ("long packed", SeqLayout::packed(&[33, 70, 5])),
    ]
}

fn first_tokens_case<B: Backend>(
    be: &B,
    layout: &SeqLayout,
    hidden: usize,
) -> Vec<(&'static str, Vec<f32>)> {
    let (rows, batch) = (layout.total_rows(), layout.batch());
    let s = (rows * 100 + hidden) as u64;
    let x = up(be, &random_vec(rows * hidden, s, 1.0));
    let out = up(be, &random_vec(batch * hidden, s + 1, 9.0));
    be.gather_first_tokens(&out, &x, layout, hidden).unwrap();
    let dout = up(be, &random_vec(batch * hidden, s + 2, 1.0));
    let dx = up(be, &random_vec(rows * hidden, s + 3, 1.0));
    be.scatter_first_tokens_backward(&dx, &dout, layout, hidden)
        .unwrap();
    vec![("out", down(be, &out)), ("dx", down(be, &dx))]
}

#[test]
fn first_tokens() {
    let Some(g) = gpu() else { return };
    for (name, layout) in layouts() {
        for hidden in [5, 20, 37, 64] {
            let case = format!("{name}, hidden {hidden}");
            let (gg, cc) = (
                first_tokens_case(&g, &layout, hidden),
                first_tokens_case(&CPU, &layout, hidden),
            );
            for ((n, gv), (_, cv)) in gg.iter().zip(&cc) {
                exact(&format!("{case}: {n}"), gv, cv);
            }
        }
    }
}

// ---- attention ----

fn attention_case<B: Backend>(
    be: &B,
    layout: &SeqLayout,
    dims: AttentionDims,
    d: Dropout,
) -> Vec<(&'static str, Vec<f32>)> {
    attention_case_with(be, layout, dims, d, (0, false))
}

/// As `attention_case`, with `qkv` a view at element `offset` (odd offsets reach the kernels'
/// unaligned paths), stored in the matmul format when `stored` (and the elements around the
/// view then checked untouched).
fn attention_case_with<B: Backend>(
    be: &B,
    layout: &SeqLayout,
    dims: AttentionDims,
    d: Dropout,
    (offset, stored): (usize, bool),
) -> Vec<(&'static str, Vec<f32>)> {
    let rows = layout.total_rows();
    let (heads, hidden) = (dims.heads, dims.heads * dims.head_dim);
    let s = (rows * 1000 + hidden * 10 + heads) as u64;
    let qkv = random_vec(rows * 3 * hidden, s, 1.5);
    let (qkv, guarded) = match stored {
        true => {
            let (view, big) = stored_in(be, &qkv, offset);
            (view, Some(big))
        }
        false => (up_at(be, &qkv, offset), None),
    };
    let out = up(be, &random_vec(rows * hidden, s + 1, 9.0));
    let lse = up(be, &random_vec(rows * heads, s + 2, 9.0));
    be.attention_forward(&out, &lse, &qkv, layout, dims, d)
        .unwrap();
    let dout = up(be, &random_vec(rows * hidden, s + 3, 1.0));
    let dqkv = up(be, &random_vec(rows * 3 * hidden, s + 4, 9.0));
    be.attention_backward(&dqkv, &dout, &qkv, &out, &lse, layout, dims, d)
        .unwrap();
    if let Some(big) = guarded {
        guards_intact("attention qkv", be, &big, offset, rows * 3 * hidden);
    }
    vec![
        ("out", down(be, &out)),
        ("lse", down(be, &lse)),
        ("dqkv", down(be, &dqkv)),
    ]
}

/// fp32 attention (attention.cu): `gpu()` is an fp32 backend, so head dims 32 and 64 here run
/// the CUDA-core kernels, not the tensor-core ones (those are `attention_tensor_cores`).
#[test]
fn attention() {
    let Some(g) = gpu() else { return };
    assert_eq!(g.matmul_precision(), MatmulPrecision::F32);
    for (name, layout) in layouts() {
        // d = 1, an odd d above 32, and d = 128 (every column group live, the most registers)
        // on the generic path.
        for (heads, head_dim) in [
            (2, 5),
            (3, 12),
            (2, 32),
            (1, 64),
            (2, 100),
            (1, 1),
            (1, 33),
            (1, 128),
        ] {
            for p in [0.0, 0.1, 0.5] {
                let dims = AttentionDims { heads, head_dim };
                fp32_attention_against_cpu(&g, name, &layout, dims, p, 1.0);
            }
        }
    }
}

/// fp32 attention's forward (out, lse) within `1e-5·scale` and backward (dqkv) within
/// `5e-5·scale` of the CPU's (`close`'s relative measure), dropout `p` drawn from one site.
fn fp32_attention_against_cpu(
    g: &CudaBackend,
    name: &str,
    layout: &SeqLayout,
    dims: AttentionDims,
    p: f32,
    scale: f64,
) {
    let d = Dropout {
        p,
        seed: 42,
        stream: 9,
    };
    let case = format!(
        "{name}, {} heads of {}, dropout {p}",
        dims.heads, dims.head_dim
    );
    let (gg, cc) = (
        attention_case(g, layout, dims, d),
        attention_case(&CPU, layout, dims, d),
    );
    compare(&case, &gg[..2], &cc[..2], 1e-5 * scale);
    compare(&case, &gg[2..], &cc[2..], 5e-5 * scale);
}

/// fp32 attention at BERT's lengths (128, 512) and at the key-tile edges (32, 64 and one either
/// side), which `attention`'s layouts (70 rows at most) do not reach: fp32 and TF32 training runs
/// the `_d64` kernel at these lengths. Tolerances are `attention`'s scaled by the longest sum
/// (512 keys or queries against 70): fp32 summation error grows with the number of terms, and
/// the two sides add in different orders.
#[test]
fn attention_at_bert_lengths() {
    let Some(g) = gpu() else { return };
    let layouts = [
        (
            "padded [512, 128] in 512",
            SeqLayout::padded(&[512, 128], 512),
        ),
        (
            "packed [1, 32, 63, 64, 65, 127, 128, 129]",
            SeqLayout::packed(&[1, 32, 63, 64, 65, 127, 128, 129]),
        ),
    ];
    let longest = 512.0 / 70.0;
    for (name, layout) in layouts {
        for (heads, head_dim) in [(2, 5), (1, 32), (2, 64), (1, 128)] {
            for p in [0.0, 0.1] {
                let dims = AttentionDims { heads, head_dim };
                fp32_attention_against_cpu(&g, name, &layout, dims, p, longest);
            }
        }
    }
}

/// The tensor-core attention (kernels/attention_tc.cu: `--fp16`/`--bf16` at head_dim 32 and 64)
/// against the CPU's emulation of it and against `naive::attention_16`'s per-element bounds.
///
/// Tolerances (see `naive::attention_16`): both sides compute in fp32 from the same 16-bit
/// operands, in different summation orders (tensor cores vs the CPU's GEMM), so a sum of n
/// terms may differ by (n + 8)·2U·Σ|terms|. Where a value is rounded to 16 bits (P̃ in forward,
/// P̂ and dŜ in backward), an fp32 difference δ before rounding changes the rounded value only
/// if the value lies within δ of a rounding midpoint; then it moves by one 16-bit ulp of that
/// element (2⁻¹⁰ relative for fp16, 2⁻⁷ for bf16), which reaches the outputs through one
/// product: one ulp of p_ij times |v_j|·rp/l_i in o_i, of P̂_ij times rp·|dO_i| in dv_j, of dŜ_ij
/// times scale·|k_j| or scale·|q_i| in dq_i and dk_j. δ is bounded from the operands: the score's
/// dot product ((d + 8)·2U·c2·Σ|q̂·k̂|, times ln 2 in the exponential), exp2f's error (2⁻²¹), the
/// fp32 roundings of the scaled score and of the shift (4U each), and for dŜ the dot products
/// dÔ·v̂ and dO·o of dP and D. The reference adds each possible flip's full width to the bound
/// of the outputs it reaches, so the bound is rigorous but only loose at the few elements near a
/// midpoint; elsewhere it is the fp32 summation bound. fp16's subnormal probabilities
/// (e < 2⁻¹⁴) add 2⁻²⁴ each (the online softmax may round them at a shifted exponent).
/// The backward runs on the CPU's out and lse on both sides, so forward flips do not move it.
#[test]
fn attention_tensor_cores() {
    let layouts = [
        (
            "padded [1, 7, 33, 100] in 129",
            SeqLayout::padded(&[1, 7, 33, 100], 129),
        ),
        (
            "packed [1, 7, 33, 128, 129, 300]",
            SeqLayout::packed(&[1, 7, 33, 128, 129, 300]),
        ),
        (
            "padded [512, 128] in 512",
            SeqLayout::padded(&[512, 128], 512),
        ),
        (
            "packed rows [512, 100] valid [300, 37]",
            SeqLayout {
                starts: vec![0, 512],
                rows: vec![512, 100],
                valid: vec![300, 37],
            },
        ),
    ];
    for prec in [MatmulPrecision::F16, MatmulPrecision::Bf16] {
        // sm < 80 runs fp32 attention under 16-bit precisions: not what this test is about.
        let Some(g) = tensor_core_gpu(prec) else {
            return;
        };
        let cpu = CpuBackend::with_matmul_precision(prec);
        for (li, (lname, layout)) in layouts.iter().enumerate() {
            for (heads, head_dim) in [(2, 32), (2, 64)] {
                for p in [0.0, 0.1] {
                    let dims = AttentionDims { heads, head_dim };
                    let d = Dropout {
                        p,
                        seed: 42,
                        stream: 9,
                    };
                    let case = format!(
                        "{} {lname}, {heads} heads of {head_dim}, dropout {p}",
                        prec.name()
                    );
                    let rows = layout.total_rows();
                    let hidden = heads * head_dim;
                    let s = 7000 + 100 * li as u64 + head_dim as u64;
                    let qkv = random_vec(rows * 3 * hidden, s, 1.5);
                    let dout = random_vec(rows * hidden, s + 1, 1.0);
                    // The CPU emulation: forward, then backward from its out and lse.
                    let (c_out, c_lse, c_dqkv) = {
                        let out = up(&cpu, &random_vec(rows * hidden, s + 2, 9.0));
                        let lse = up(&cpu, &random_vec(rows * heads, s + 3, 9.0));
                        let qkv_t = up(&cpu, &qkv);
                        cpu.attention_forward(&out, &lse, &qkv_t, layout, dims, d)
                            .unwrap();
                        let dqkv = up(&cpu, &random_vec(rows * 3 * hidden, s + 4, 9.0));
                        cpu.attention_backward(
                            &dqkv,
                            &up(&cpu, &dout),
                            &qkv_t,
                            &out,
                            &lse,
                            layout,
                            dims,
                            d,
                        )
                        .unwrap();
                        (down(&cpu, &out), down(&cpu, &lse), down(&cpu, &dqkv))
                    };
                    // The GPU: forward; backward from the CPU's out and lse (each twice:
                    // bitwise the same, as a kernel without races or atomics gives).
                    let out = up(&g, &random_vec(rows * hidden, s + 2, 9.0));
                    let lse = up(&g, &random_vec(rows * heads, s + 3, 9.0));
                    let qkv_t = up(&g, &qkv);
                    g.attention_forward(&out, &lse, &qkv_t, layout, dims, d)
                        .unwrap();
                    let (g_out, g_lse) = (down(&g, &out), down(&g, &lse));
                    let (out2, lse2) = (
                        up(&g, &random_vec(rows * hidden, s + 5, 9.0)),
                        up(&g, &random_vec(rows * heads, s + 6, 9.0)),
                    );
                    g.attention_forward(&out2, &lse2, &qkv_t, layout, dims, d)
                        .unwrap();
                    exact(&format!("{case}: out run to run"), &down(&g, &out2), &g_out);
                    exact(&format!("{case}: lse run to run"), &down(&g, &lse2), &g_lse);
                    let (out_c, lse_c, dout_t) = (up(&g, &c_out), up(&g, &c_lse), up(&g, &dout));
                    let mut g_dqkv = Vec::new();
                    for _ in 0..2 {
                        let dqkv = up(&g, &random_vec(rows * 3 * hidden, s + 4, 9.0));
                        g.attention_backward(
                            &dqkv, &dout_t, &qkv_t, &out_c, &lse_c, layout, dims, d,
                        )
                        .unwrap();
                        let x = down(&g, &dqkv);
                        if !g_dqkv.is_empty() {
                            exact(&format!("{case}: dqkv run to run"), &x, &g_dqkv);
                        }
                        g_dqkv = x;
                    }
                    let r = naive::attention_16(&qkv, &dout, &c_out, &c_lse, layout, dims, d, prec);
                    for (name, gv, cv, want, tol) in [
                        ("out", &g_out, &c_out, &r.out, &r.out_tol),
                        ("lse", &g_lse, &c_lse, &r.lse, &r.lse_tol),
                        ("dqkv", &g_dqkv, &c_dqkv, &r.dqkv, &r.dqkv_tol),
                    ] {
                        naive::assert_close(&format!("{case}: gpu {name}"), gv, want, |i| {
                            tol[i] + 1e-30
                        });
                        // Both within the bound of the reference: within twice it of each other.
                        let cv64: Vec<f64> = cv.iter().map(|&x| x as f64).collect();
                        naive::assert_close(
                            &format!("{case}: gpu vs cpu {name}"),
                            gv,
                            &cv64,
                            |i| 2.0 * tol[i] + 1e-30,
                        );
                    }
                }
            }
        }
    }
}

// ---- loss ----

/// Random labels, every third row (from the second) labelled IGNORE_LABEL (loss and gradient 0).
fn loss_labels(rows: usize, classes: usize, seed: u64) -> Vec<u32> {
    let mut labels = random_ids(rows, seed, classes as u32);
    labels
        .iter_mut()
        .skip(1)
        .step_by(3)
        .for_each(|l| *l = IGNORE_LABEL);
    labels
}

fn loss_case<B: Backend>(
    be: &B,
    rows: usize,
    classes: usize,
    smoothing: f32,
) -> Vec<(&'static str, Vec<f32>)> {
    let s = (rows * 100 + classes) as u64;
    let logits = up(be, &random_vec(rows * classes, s, 3.0));
    let labels = be.upload_ids(&loss_labels(rows, classes, s + 1)).unwrap();
    let losses = up(be, &random_vec(rows, s + 2, 9.0));
    be.cross_entropy_forward(&losses, &logits, &labels, classes, smoothing)
        .unwrap();
    let dlogits = up(be, &random_vec(rows * classes, s + 3, 9.0));
    be.cross_entropy_backward(
        &dlogits,
        &logits,
        &labels,
        classes,
        smoothing,
        1.0 / rows as f32,
    )
    .unwrap();
    vec![
        ("losses", down(be, &losses)),
        ("dlogits", down(be, &dlogits)),
    ]
}

#[test]
fn cross_entropy() {
    let Some(g) = gpu() else { return };
    for rows in [1, 7, 33] {
        for classes in [2, 3, 37] {
            for smoothing in [0.0, 0.1] {
                let case = format!("rows {rows}, classes {classes}, smoothing {smoothing}");
                let got = loss_case(&g, rows, classes, smoothing);
                compare(
                    &case,
                    &got,
                    &loss_case(&CPU, rows, classes, smoothing),
                    1e-5,
                );
                // The ignored rows: exactly 0 (not merely close).
                for r in (1..rows).step_by(3) {
                    assert_eq!(got[0].1[r].to_bits(), 0, "{case}: row {r}'s loss");
                    let dz = &got[1].1[r * classes..][..classes];
                    assert!(
                        dz.iter().all(|d| d.to_bits() == 0),
                        "{case}: row {r}: {dz:?}"
                    );
                }
            }
        }
    }
}

/// [`loss_case`]'s inputs through the fused op, into outputs that start as other garbage.
fn fused_loss_case<B: Backend>(
    be: &B,
    rows: usize,
    classes: usize,
    smoothing: f32,
) -> Vec<(&'static str, Vec<f32>)> {
    let s = (rows * 100 + classes) as u64;
    let logits = up(be, &random_vec(rows * classes, s, 3.0));
    let labels = be.upload_ids(&loss_labels(rows, classes, s + 1)).unwrap();
    let losses = up(be, &random_vec(rows, s + 4, 9.0));
    let dlogits = up(be, &random_vec(rows * classes, s + 5, 9.0));
    be.cross_entropy_forward_backward(
        &losses,
        &dlogits,
        &logits,
        &labels,
        classes,
        smoothing,
        1.0 / rows as f32,
    )
    .unwrap();
    vec![
        ("losses", down(be, &losses)),
        ("dlogits", down(be, &dlogits)),
    ]
}

/// The fused op against the CPU reference (as `cross_entropy`), and bit for bit against the
/// GPU's own forward and backward kernels: the training step switched to it, and its numbers
/// must not change.
#[test]
fn cross_entropy_forward_backward() {
    let Some(g) = gpu() else { return };
    for rows in [1, 3, 37] {
        for classes in [2, 3, 5, 33] {
            for smoothing in [0.0, 0.1] {
                let case = format!("rows {rows}, classes {classes}, smoothing {smoothing}");
                let fused = fused_loss_case(&g, rows, classes, smoothing);
                compare(
                    &case,
                    &fused,
                    &fused_loss_case(&CPU, rows, classes, smoothing),
                    1e-5,
                );
                let apart = loss_case(&g, rows, classes, smoothing);
                for ((name, f), (_, a)) in fused.iter().zip(&apart) {
                    exact(&format!("{case}: fused vs apart {name}"), f, a);
                }
            }
        }
    }
}

// ---- optimizer ----

fn norm_case<B: Backend>(be: &B, n: usize, max_norm: f32) -> Vec<(&'static str, Vec<f32>)> {
    let xv = random_vec(n, n as u64, 1.0);
    let x = up(be, &xv);
    let sumsq = up(be, &[7.0, 8.0]);
    be.sum_squares(&sumsq, &x).unwrap();
    let computed = down(be, &sumsq);
    // Clip both with the same Σx² (the CPU's, in f64), so that only the clipping is compared.
    let exact_sumsq = xv.iter().map(|&v| v as f64 * v as f64).sum::<f64>() as f32;
    let given = up(be, &[exact_sumsq]);
    be.clip_by_global_norm(&x, &given, max_norm).unwrap();
    vec![("sumsq", computed[..1].to_vec()), ("clipped", down(be, &x))]
}

#[test]
fn sum_squares_and_clipping() {
    let Some(g) = gpu() else { return };
    for n in [1, 7, 5000, 100_003] {
        for max_norm in [0.5, 1e6] {
            let case = format!("n {n}, max_norm {max_norm}");
            compare(
                &case,
                &norm_case(&g, n, max_norm),
                &norm_case(&CPU, n, max_norm),
                1e-5,
            );
        }
    }
}

/// fp16 loss scaling on the device: unscaling of finite values, then with an inf and a NaN
/// planted; the scale applied to a tensor; the scale's update from states on each branch of
/// its rule; AdamW skipped on the flag; and the flag read back through `download_start`.
fn loss_scale_case<B: Backend>(be: &B, n: usize, offset: usize) -> Vec<(&'static str, Vec<f32>)> {
    let v = random_vec(n, 40 + n as u64, 3e4);
    let x = up_at(be, &v, offset);
    let (scale, flag) = (up(be, &[65536.0]), up(be, &[0.0]));
    be.unscale_and_check(&x, &scale, &flag).unwrap();
    let mut planted = v.clone();
    planted[n / 2] = f32::INFINITY;
    planted[n - 1] = f32::NAN;
    let bad_flag = up(be, &[0.0]);
    be.unscale_and_check(&up_at(be, &planted, offset), &up(be, &[2.0]), &bad_flag)
        .unwrap();
    let scaled = up_at(be, &v, offset);
    be.scale_by(&scaled, &up(be, &[0.25])).unwrap();
    let mut states = Vec::new();
    for (s, tracker) in [
        (65536.0f32, 0.0f32),
        (65536.0, 1999.0),
        (2f32.powi(127), 1999.0),
    ] {
        for found in [0.0, 1.0] {
            let state = up(be, &[s, tracker]);
            be.update_loss_scale(&state, &up(be, &[found]), 2.0, 0.5, 2000)
                .unwrap();
            states.extend(down(be, &state));
        }
    }
    let p = up(be, &v);
    let tensors = [AdamWTensor {
        param: &p,
        grad: &x,
        exp_avg: &be.zeros(n).unwrap(),
        exp_avg_sq: &be.zeros(n).unwrap(),
        weight_decay: 0.01,
    }];
    let step = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        step: 1,
    };
    be.adamw_update(&tensors, &step, Some(&bad_flag)).unwrap();
    let pending = be.download_start(&bad_flag).unwrap();
    vec![
        ("unscaled", down(be, &x)),
        ("flag (finite)", down(be, &flag)),
        ("flag (inf, NaN)", down(be, &bad_flag)),
        ("scaled by 0.25", down(be, &scaled)),
        ("updated states", states),
        ("params after a skipped AdamW", down(be, &p)),
        (
            "flag read back without waiting",
            be.download_finish(pending).unwrap(),
        ),
    ]
}

#[test]
fn loss_scaling() {
    let Some(g) = gpu() else { return };
    for n in [1, 7, 5000, 100_003] {
        for offset in [0, 1] {
            let (gc, cc) = (
                loss_scale_case(&g, n, offset),
                loss_scale_case(&CPU, n, offset),
            );
            for ((name, a), (_, b)) in gc.iter().zip(&cc) {
                exact(&format!("loss scaling n {n} offset {offset}: {name}"), a, b);
            }
            assert_eq!(cc[2].1, [1.0]);
            assert_eq!(cc[5].1, random_vec(n, 40 + n as u64, 3e4));
        }
    }
}

/// Three AdamW steps over: segments of one flat buffer (as the optimizer passes them, one
/// shared launch), plus tensors in allocations of their own and views at different offsets of
/// different buffers (the per-tensor fallback).
fn adamw_case<B: Backend>(be: &B) -> Vec<(&'static str, Vec<f32>)> {
    let total = 70_000 + 300;
    let params = up(be, &random_vec(total, 1, 1.0));
    let m = up(be, &random_vec(total, 2, 0.1));
    let v: Vec<f32> = random_vec(total, 3, 0.01).iter().map(|x| x.abs()).collect();
    let v = up(be, &v);
    let grads = up(be, &random_vec(total, 4, 1.0));
    // Segments (offset, len, decay): odd offsets and lengths, one over 64 Ki elements.
    let segs = [
        (0usize, 7usize, 0.01f64),
        (7, 13, 0.0),
        (20, 70_000, 0.01),
        (70_020, 280, 0.0),
    ];
    // Separate allocations.
    let lone: Vec<B::Tensor> = (0..4)
        .map(|i| {
            up(
                be,
                &random_vec(37, 10 + i, 0.5)
                    .iter()
                    .map(|x| x.abs())
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    // Views at different offsets of one buffer.
    let mixed = up(
        be,
        &random_vec(400, 20, 0.5)
            .iter()
            .map(|x| x.abs())
            .collect::<Vec<_>>(),
    );
    let mixed_views: Vec<B::Tensor> = [0, 101, 203, 305]
        .iter()
        .map(|&o| be.view(&mixed, o, 33))
        .collect();
    let seg_views: Vec<[B::Tensor; 4]> = segs
        .iter()
        .map(|&(o, l, _)| {
            [
                be.view(&params, o, l),
                be.view(&grads, o, l),
                be.view(&m, o, l),
                be.view(&v, o, l),
            ]
        })
        .collect();
    for t in 1..=3u64 {
        let mut tensors: Vec<AdamWTensor<'_, B::Tensor>> = seg_views
            .iter()
            .zip(&segs)
            .map(|(vs, &(_, _, wd))| AdamWTensor {
                param: &vs[0],
                grad: &vs[1],
                exp_avg: &vs[2],
                exp_avg_sq: &vs[3],
                weight_decay: wd,
            })
            .collect();
        tensors.push(AdamWTensor {
            param: &lone[0],
            grad: &lone[1],
            exp_avg: &lone[2],
            exp_avg_sq: &lone[3],
            weight_decay: 0.1,
        });
        tensors.push(AdamWTensor {
            param: &mixed_views[0],
            grad: &mixed_views[1],
            exp_avg: &mixed_views[2],
            exp_avg_sq: &mixed_views[3],
            weight_decay: 0.0,
        });
        be.adamw_update(
            &tensors,
            &AdamWStep {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                step: t,
            },
            None,
        )
        .unwrap();
    }
    vec![
        ("params", down(be, &params)),
        ("exp_avg", down(be, &m)),
        ("exp_avg_sq", down(be, &v)),
        ("lone param", down(be, &lone[0])),
        ("lone exp_avg", down(be, &lone[2])),
        ("lone exp_avg_sq", down(be, &lone[3])),
        ("mixed", down(be, &mixed)),
    ]
}

#[test]
fn adamw_update() {
    let Some(g) = gpu() else { return };
    // The kernel rounds every operation explicitly, as the CPU does: equal to a few ulps at
    // most (the CPU may contract to FMA).
    compare("adamw", &adamw_case(&g), &adamw_case(&CPU), 1e-6);
}

// ---- the whole model ----

fn tiny_batch_on<B: Backend>(be: &B, packed: bool) -> Batch<B> {
    let (ids, types, labels) = tiny_batch();
    let ids: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
    let types: Vec<&[u32]> = types.iter().map(|v| v.as_slice()).collect();
    if packed {
        Batch::packed(be, &ids, &types, Some(&labels)).unwrap()
    } else {
        Batch::padded(be, &ids, &types, Some(&labels), 0).unwrap()
    }
}

/// Logits, per-row losses and the flat gradient of one forward + backward.
fn model_case<B: Backend>(be: &B, act: &str, packed: bool, mode: Mode) -> [Vec<f32>; 3] {
    let cfg = tiny_config(act);
    let model = Classifier::new(be, cfg.clone(), &tiny_weights(&cfg, 1)).unwrap();
    let batch = tiny_batch_on(be, packed);
    let acts = Activations::new(be, &model.cfg, batch.rows(), batch.size()).unwrap();
    let bert = model.bert(be);
    model.zero_grads(be).unwrap();
    bert.forward(&batch, &acts, mode).unwrap();
    let losses = bert.losses(&batch, &acts, 0.1).unwrap();
    bert.backward(
        &model.grad_views,
        &batch,
        &acts,
        mode,
        LossSpec::mean(0.1, batch.size()),
    )
    .unwrap();
    [
        be.download(&acts.logits).unwrap(),
        losses,
        be.download(&model.grads).unwrap(),
    ]
}

#[test]
fn model_forward_backward() {
    let Some(g) = gpu() else { return };
    let layout = bertft_cuda::model::params::ParamLayout::new(&tiny_config("gelu"));
    for act in ["gelu", "gelu_new", "relu"] {
        for packed in [false, true] {
            for mode in [Mode::Eval, Mode::Train { seed: 5, step: 2 }] {
                let case = format!("{act}, packed {packed}, {mode:?}");
                let [gl, gloss, ggrad] = model_case(&g, act, packed, mode);
                let [cl, closs, cgrad] = model_case(&CPU, act, packed, mode);
                // Two layers of sums: a few 1e-6 relative at most.
                close(&format!("{case}: logits"), &gl, &cl, 3e-5);
                close(&format!("{case}: losses"), &gloss, &closs, 3e-5);
                let global = cgrad.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
                for s in &layout.specs {
                    let r = s.offset..s.offset + s.len();
                    if has_zero_exact_gradient(&s.name) {
                        // Zero up to rounding on both sides: compare with the global scale.
                        let d = max_abs_diff(&ggrad[r.clone()], &cgrad[r]);
                        assert!(
                            d <= 1e-5 * global,
                            "{case}: {}: diff {d:.3e} (global max {global:.3e})",
                            s.name
                        );
                    } else {
                        close(
                            &format!("{case}: grad {}", s.name),
                            &ggrad[r.clone()],
                            &cgrad[r],
                            1e-4,
                        );
                    }
                }
            }
        }
    }
}

/// Weights and losses after `steps` AdamW steps with dropout, clipping and weight decay.
fn training<B: Backend>(be: &B, steps: u64) -> (Vec<f32>, Vec<f64>) {
    let (weights, reports) = training_reports(be, steps);
    (weights, reports.iter().map(|r| r.loss).collect())
}

fn training_reports<B: Backend>(be: &B, steps: u64) -> (Vec<f32>, Vec<StepReport>) {
    let cfg = tiny_config("gelu");
    let model = Classifier::new(be, cfg.clone(), &tiny_weights(&cfg, 3)).unwrap();
    let config = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(be, &model.layout, &model.params, &model.grads, config).unwrap();
    let mut scratch = StepScratch::new(be).unwrap();
    let settings = StepSettings {
        max_grad_norm: 0.5,
        label_smoothing: 0.1,
        dropout_seed: Some(7),
    };
    let micro = [tiny_batch_on(be, false), tiny_batch_on(be, true)];
    let reports = (0..steps)
        .map(|s| {
            train_step(
                be,
                &model,
                &mut opt,
                &mut scratch,
                &micro,
                2 * s,
                1e-3,
                &settings,
            )
            .unwrap()
        })
        .collect();
    (be.download(&model.params).unwrap(), reports)
}

/// `steps` queued fp16 steps from a loss scale of 2²¹ (the first few overflow), read back at the
/// end: the reports, and AdamW's step count (skipped steps left out).
fn queued_fp16_run<B: Backend>(be: &B, steps: u64) -> (Vec<StepReport>, u64) {
    let cfg = tiny_config("gelu");
    let model = Classifier::new(be, cfg.clone(), &tiny_weights(&cfg, 3)).unwrap();
    let mut opt = AdamW::new(
        be,
        &model.layout,
        &model.params,
        &model.grads,
        AdamWConfig::default(),
    )
    .unwrap();
    let mut scratch = StepScratch::new(be).unwrap();
    let scaler = LossScaler {
        scale: 2f64.powi(21),
        growth_tracker: 0,
    };
    scratch.set_loss_scaler(be, scaler).unwrap();
    let settings = StepSettings {
        max_grad_norm: 0.5,
        label_smoothing: 0.1,
        dropout_seed: Some(7),
    };
    let micro = [tiny_batch_on(be, false), tiny_batch_on(be, true)];
    for s in 0..steps {
        let schedule = |taken: u64| 1e-3 * (taken + 1) as f64;
        queue_train_step(
            be,
            &model,
            &mut opt,
            &mut scratch,
            &micro,
            2 * s,
            &schedule,
            &settings,
        )
        .unwrap();
    }
    let reports = scratch.take_reports(be, &mut opt).unwrap();
    (reports, opt.step)
}

#[test]
fn queued_fp16_steps_skip_overflows_on_the_device_as_on_the_cpu() {
    let Some((g, c)) = pair(MatmulPrecision::F16) else {
        return;
    };
    let (gr, g_steps) = queued_fp16_run(&g, 8);
    let (cr, c_steps) = queued_fp16_run(&c, 8);
    let skipped = |r: &[StepReport]| r.iter().map(StepReport::skipped).collect::<Vec<_>>();
    assert_eq!(skipped(&gr), skipped(&cr), "which steps overflowed");
    assert!(skipped(&cr).contains(&true) && skipped(&cr).contains(&false));
    assert_eq!(g_steps, c_steps, "AdamW steps taken");
    for (s, (a, b)) in gr.iter().zip(&cr).enumerate() {
        assert_eq!(a.lr, b.lr, "step {s}: learning rate");
        let rel = (a.loss - b.loss).abs() / b.loss.abs();
        assert!(rel <= 1e-2, "step {s}: gpu loss {}, cpu {}", a.loss, b.loss);
    }
}

#[test]
fn six_training_steps() {
    let Some(g) = gpu() else { return };
    let (gw, gl) = training(&g, 6);
    let (cw, cl) = training(&CPU, 6);
    let (start, _) = training(&CPU, 0);
    assert!(
        max_abs_diff(&cw, &start) > 1e-4,
        "the steps must move the weights"
    );
    let layout = bertft_cuda::model::params::ParamLayout::new(&tiny_config("gelu"));
    for s in &layout.specs {
        let r = s.offset..s.offset + s.len();
        let d = max_abs_diff(&gw[r.clone()], &cw[r]);
        if has_zero_exact_gradient(&s.name) {
            // Its gradient is zero up to rounding, so AdamW's first steps move it by ±lr in the
            // direction of the rounding noise (different on each side): only bounded by
            // 2 · 6 steps · lr (1e-3).
            assert!(d <= 1.2e-2, "{} after 6 steps: diff {d:.3e}", s.name);
        } else {
            assert!(d <= 1e-4, "{} after 6 steps: diff {d:.3e}", s.name);
        }
    }
    for (s, (a, b)) in gl.iter().zip(&cl).enumerate() {
        assert!(
            (a - b).abs() <= 3e-5 * b.abs().max(1.0),
            "loss of step {s}: gpu {a}, cpu {b}"
        );
    }
}

#[test]
fn six_training_steps_in_fp16_and_bf16() {
    for p in [MatmulPrecision::F16, MatmulPrecision::Bf16] {
        let Some((g, c)) = pair(p) else { return };
        let (_, gr) = training_reports(&g, 6);
        let (_, cr) = training_reports(&c, 6);
        for (s, (a, b)) in gr.iter().zip(&cr).enumerate() {
            let rel = (a.loss - b.loss).abs() / b.loss.abs();
            let bound = if s == 0 { 1e-4 } else { 1e-2 };
            assert!(
                rel <= bound,
                "{} step {s}: gpu loss {}, cpu {} (relative {rel:.2e} > {bound:e})",
                p.name(),
                a.loss,
                b.loss
            );
            assert_eq!(a.skipped(), b.skipped(), "{} step {s}", p.name());
        }
    }
}

#[test]
fn views_upload_download_copy() {
    let Some(g) = gpu() else { return };
    let data = random_vec(1000, 5, 1.0);
    let t = g.upload(&data).unwrap();
    assert_eq!(g.download(&t).unwrap(), data);
    let v = g.view(&t, 3, 500);
    assert_eq!(g.len(&v), 500);
    assert_eq!(g.download(&v).unwrap(), &data[3..503]);
    let w = g.view(&v, 10, 7);
    assert_eq!(g.download(&w).unwrap(), &data[13..20]);
    let dst = g.zeros(7).unwrap();
    assert_eq!(g.download(&dst).unwrap(), vec![0.0; 7]);
    g.copy(&dst, &w).unwrap();
    assert_eq!(g.download(&dst).unwrap(), &data[13..20]);
    g.fill_zero(&w).unwrap();
    let mut want = data.clone();
    want[13..20].fill(0.0);
    assert_eq!(g.download(&t).unwrap(), want);
    let empty = g.upload(&[]).unwrap();
    assert!(g.download(&empty).unwrap().is_empty());
    assert!(
        g.copy(&dst, &v).is_err(),
        "a copy between different lengths"
    );
    assert!(!g.name().is_empty());
}

/// Runs every case above on the CPU only (no GPU needed): the cases' shapes, views and
/// tolerances are exercised on every machine, so a GPU run fails only for the backend's sake.
#[test]
fn cases_run_on_the_cpu() {
    for rows in [1, 33] {
        for (k, n) in [(5, 20), (64, 96), (1, 3)] {
            let c = linear_case(&CPU, rows, k, n, true, true);
            compare("linear", &c, &c, 1e-5);
            linear_case(&CPU, rows, k, n, false, false);
            linear_forward_at(&CPU, (rows, k, n), (1, 4));
        }
        for hidden in [5, 64] {
            embeddings_case(&CPU, rows, hidden, Some(0));
            embeddings_case(&CPU, rows, hidden, None);
        }
        for cols in [5, 1030] {
            for residual in [None, Some(0.0), Some(0.1)] {
                layernorm_case(&CPU, rows, cols, residual);
            }
        }
        for classes in [2, 37] {
            loss_case(&CPU, rows, classes, 0.1);
        }
    }
    for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Relu] {
        activation_case(&CPU, 4099, act, 1);
    }
    let d = Dropout {
        p: 0.5,
        seed: 1,
        stream: 2,
    };
    let c = dropout_case(&CPU, 4101, d, 3);
    exact("dropout", &c[0].1, &c[0].1);
    assert!(c[0].1.contains(&0.0) && c[0].1.iter().any(|&v| v != 0.0));
    for (_, layout) in layouts() {
        first_tokens_case(&CPU, &layout, 37);
        for (heads, head_dim) in [(2, 5), (1, 64)] {
            attention_case(&CPU, &layout, AttentionDims { heads, head_dim }, d);
        }
    }
    norm_case(&CPU, 5000, 0.5);
    loss_scale_case(&CPU, 5000, 1);
    for p in [MatmulPrecision::F16, MatmulPrecision::Tf32] {
        let c = CpuBackend::with_matmul_precision(p);
        linear_case(&c, 33, 384, 1152, true, true);
        training_reports(&c, 1);
    }
    let (reports, _) = queued_fp16_run(&CpuBackend::with_matmul_precision(MatmulPrecision::F16), 8);
    assert!(reports.iter().any(StepReport::skipped) && !reports.iter().all(StepReport::skipped));
    adamw_case(&CPU);
    model_case(&CPU, "gelu", true, Mode::Train { seed: 5, step: 2 });
    let (w, _) = training(&CPU, 1);
    assert!(w.iter().all(|v| v.is_finite()));
}

// ---- CUDA graphs ----

/// Two layers, hidden 64 in two heads of 32: the tensor-core attention under fp16.
fn graph_config() -> bertft_cuda::config::BertConfig {
    bertft_cuda::config::BertConfig::from_json(
        r#"{"vocab_size":40,"hidden_size":64,"num_attention_heads":2,"num_hidden_layers":2,
            "intermediate_size":96,"max_position_embeddings":16,"type_vocab_size":2,
            "num_labels":3,"hidden_act":"gelu","pad_token_id":0,"layer_norm_eps":1e-12,
            "hidden_dropout_prob":0.1,"attention_probs_dropout_prob":0.1}"#,
    )
    .unwrap()
}

/// [`tiny_batch`]'s sequences in another order for step `step`, micro-batch `k`, with tokens
/// and labels of their own, padded to 32 rows (packed, the last sequence padded as
/// `HostBatch::pad_rows_to` does) or to 8 per sequence (padded): the same shape every step, but
/// another layout and other tokens, so that a graph replayed with a stale layout, batch address
/// or grid computes something else.
fn step_batch<B: Backend>(be: &B, step: u64, k: u64, packed: bool) -> Batch<B> {
    let (ids, types, labels) = tiny_batch();
    let turn = (step + k) as usize % 4;
    let order: Vec<usize> = (0..4).map(|i| (i + turn) % 4).collect();
    let ids: Vec<Vec<u32>> = order
        .iter()
        .map(|&i| {
            ids[i]
                .iter()
                .map(|&t| 1 + (t + 7 * step as u32 + 3 * k as u32) % 39)
                .collect()
        })
        .collect();
    let types: Vec<Vec<u32>> = order.iter().map(|&i| types[i].clone()).collect();
    let labels: Vec<u32> = order
        .iter()
        .map(|&i| (labels[i] + step as u32) % 3)
        .collect();
    let ids: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
    let types: Vec<&[u32]> = types.iter().map(|v| v.as_slice()).collect();
    let host = if packed {
        let mut host = HostBatch::packed(&ids, &types, Some(&labels)).unwrap();
        host.pad_rows_to(32, 0);
        host
    } else {
        HostBatch::padded_to(&ids, &types, Some(&labels), 0, 8).unwrap()
    };
    Batch::upload(be, host).unwrap()
}

/// `steps` queued steps alternating two step shapes (one padded micro-batch; a padded and a
/// packed one), each batch uploaded for its step with tokens of its own, the learning rate
/// changing every step, dropout on: the weights after them, and the reports.
fn graph_run(be: &CudaBackend, steps: u64) -> (Vec<f32>, Vec<StepReport>) {
    let cfg = graph_config();
    let model = Classifier::new(be, cfg.clone(), &tiny_weights(&cfg, 4)).unwrap();
    let config = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(be, &model.layout, &model.params, &model.grads, config).unwrap();
    let mut scratch = StepScratch::new(be).unwrap();
    let settings = StepSettings {
        max_grad_norm: 0.5,
        label_smoothing: 0.1,
        dropout_seed: Some(11),
    };
    let schedule = |taken: u64| 1e-3 * (1.0 + taken as f64 / 10.0);
    // Every step's batches stay alive, so no two steps' batches share an address.
    let mut kept = Vec::new();
    for s in 0..steps {
        let micro = match s % 2 {
            0 => vec![step_batch(be, s, 0, false)],
            _ => vec![step_batch(be, s, 0, false), step_batch(be, s, 1, true)],
        };
        queue_train_step(
            be,
            &model,
            &mut opt,
            &mut scratch,
            &micro,
            2 * s,
            &schedule,
            &settings,
        )
        .unwrap();
        kept.push(micro);
    }
    let reports = scratch.take_reports(be, &mut opt).unwrap();
    (be.download(&model.params).unwrap(), reports)
}

/// The training step through CUDA graphs against the same steps queued eagerly: each step
/// shape runs eagerly once, is captured the second time and replayed after that, with the new
/// batch's addresses and the new dropout streams patched in. The same kernels run on the same
/// arguments, so only the embeddings' backward (fp32 atomics, in no fixed order) tells the runs
/// apart: losses within 1e-5 relative in fp32 (1e-3 in fp16, where such a difference can flip
/// a 16-bit rounding), weights within 1e-5 (1e-4), the key bias (zero gradient up to rounding)
/// within 2 · steps · lr. A replay with a stale argument (last step's tokens or dropout mask)
/// changes the losses by far more.
#[test]
fn training_steps_through_cuda_graphs() {
    if gpu().is_none() {
        return;
    }
    const STEPS: u64 = 10;
    for (p, loss_tol, weight_tol) in [
        (MatmulPrecision::F32, 1e-5, 1e-5),
        (MatmulPrecision::F16, 1e-3, 1e-4),
    ] {
        let open = || CudaBackend::new(0).unwrap().with_matmul_precision(p);
        let eager = open();
        let graphed = open().with_cuda_graphs(true);
        let (we, re) = graph_run(&eager, STEPS);
        let (wg, rg) = graph_run(&graphed, STEPS);
        let stats = graphed.graph_stats().expect("graphs on");
        // Two step shapes, each: eager, captured, then replayed.
        assert_eq!(
            (
                stats.captures,
                stats.replays,
                stats.mismatches,
                stats.failures
            ),
            (2, STEPS - 4, 0, 0),
            "{}: {stats:?}",
            p.name()
        );
        // Each replay moves at least the embeddings' ids, positions and token types, every
        // dropout site's stream, and the attention layouts (two layers, forward and backward).
        assert!(
            stats.patched_nodes >= 8 * stats.replays,
            "{}: {} nodes patched in {} replays",
            p.name(),
            stats.patched_nodes,
            stats.replays
        );
        assert!(eager.graph_stats().is_none());
        assert_eq!(re.len(), rg.len());
        for (s, (a, b)) in rg.iter().zip(&re).enumerate() {
            assert_eq!(a.lr, b.lr, "{} step {s}: learning rate", p.name());
            assert_eq!(a.skipped(), b.skipped(), "{} step {s}: skipped", p.name());
            let rel = (a.loss - b.loss).abs() / b.loss.abs();
            assert!(
                rel <= loss_tol,
                "{} step {s}: loss through graphs {}, eager {} ({rel:.2e})",
                p.name(),
                a.loss,
                b.loss
            );
        }
        let layout = bertft_cuda::model::params::ParamLayout::new(&graph_config());
        for spec in &layout.specs {
            let r = spec.offset..spec.offset + spec.len();
            let d = max_abs_diff(&wg[r.clone()], &we[r]);
            let bound = if has_zero_exact_gradient(&spec.name) {
                2.0 * STEPS as f32 * 2e-3
            } else {
                weight_tol
            };
            assert!(
                d <= bound,
                "{}: {} after {STEPS} steps: diff {d:.3e}",
                p.name(),
                spec.name
            );
        }
    }
}

/// Step `step`'s batch of a token-budget run: 2 to 7 sequences ([`tiny_batch`]'s, in turn, with
/// tokens and labels of their own), packed, padded to its buckets when `pad` (8 sequences, 64
/// rows: one graph for all of them).
fn budget_batch<B: Backend>(be: &B, step: u64, pad: bool) -> Batch<B> {
    let (ids, types, labels) = tiny_batch();
    let n = 2 + step as usize % 6;
    let pick: Vec<usize> = (0..n).map(|i| (i + step as usize) % 4).collect();
    let ids: Vec<Vec<u32>> = pick
        .iter()
        .enumerate()
        .map(|(j, &i)| {
            ids[i]
                .iter()
                .map(|&t| 1 + (t + 5 * step as u32 + 3 * j as u32) % 39)
                .collect()
        })
        .collect();
    let types: Vec<Vec<u32>> = pick.iter().map(|&i| types[i].clone()).collect();
    let labels: Vec<u32> = pick
        .iter()
        .enumerate()
        .map(|(j, &i)| (labels[i] + step as u32 + j as u32) % 3)
        .collect();
    let ids: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
    let types: Vec<&[u32]> = types.iter().map(|v| v.as_slice()).collect();
    let mut host = HostBatch::packed(&ids, &types, Some(&labels)).unwrap();
    if pad {
        host.pad_to_buckets(0);
        assert_eq!((host.size(), host.layout.total_rows()), (8, 64));
    }
    assert_eq!(host.real_size(), n);
    Batch::upload(be, host).unwrap()
}

/// `steps` queued steps of [`budget_batch`]es (dropout on, clipping, label smoothing): the
/// weights after them, and the reports.
fn budget_run(be: &CudaBackend, steps: u64, pad: bool) -> (Vec<f32>, Vec<StepReport>) {
    let cfg = graph_config();
    let model = Classifier::new(be, cfg.clone(), &tiny_weights(&cfg, 6)).unwrap();
    let mut opt = AdamW::new(
        be,
        &model.layout,
        &model.params,
        &model.grads,
        AdamWConfig::default(),
    )
    .unwrap();
    let mut scratch = StepScratch::new(be).unwrap();
    let settings = StepSettings {
        max_grad_norm: 0.5,
        label_smoothing: 0.1,
        dropout_seed: Some(12),
    };
    let mut kept = Vec::new();
    for s in 0..steps {
        let micro = vec![budget_batch(be, s, pad)];
        queue_train_step(
            be,
            &model,
            &mut opt,
            &mut scratch,
            &micro,
            s,
            &|_| 1e-3,
            &settings,
        )
        .unwrap();
        kept.push(micro);
    }
    let reports = scratch.take_reports(be, &mut opt).unwrap();
    (be.download(&model.params).unwrap(), reports)
}

/// Token-budget steps (2 to 7 sequences each) padded to their buckets share one CUDA graph:
/// captured on the second step, replayed on every later one with the new batch, loss scale
/// and dropout streams patched in. Their losses are the eager runs' of the same padded batches
/// (fp32: within 1e-5 relative, weights within 1e-5 but the key bias's 2 · steps · lr, as in
/// `training_steps_through_cuda_graphs`) and of the unpadded batches (the dummies' loss and
/// gradient are 0 and the mean counts the real sequences; GEMMs over other shapes may sum in
/// another order: 1e-4 relative).
#[test]
fn token_budget_steps_padded_to_buckets_share_one_cuda_graph() {
    if gpu().is_none() {
        return;
    }
    const STEPS: u64 = 12;
    let (_, ru) = budget_run(&gpu().unwrap(), STEPS, false);
    let (we, re) = budget_run(&gpu().unwrap(), STEPS, true);
    let graphed = gpu().unwrap().with_cuda_graphs(true);
    let (wg, rg) = budget_run(&graphed, STEPS, true);
    let stats = graphed.graph_stats().expect("graphs on");
    assert_eq!(
        (
            stats.captures,
            stats.replays,
            stats.mismatches,
            stats.failures
        ),
        (1, STEPS - 2, 0, 0),
        "{stats:?}"
    );
    assert_eq!((rg.len(), re.len(), ru.len()), (12, 12, 12));
    for s in 0..STEPS as usize {
        let (g, e, u) = (rg[s].loss, re[s].loss, ru[s].loss);
        assert!(
            (g - e).abs() <= 1e-5 * e.abs(),
            "step {s}: loss through graphs {g}, eager {e}"
        );
        assert!(
            (e - u).abs() <= 1e-4 * u.abs(),
            "step {s}: loss padded {e}, unpadded {u}"
        );
    }
    let layout = bertft_cuda::model::params::ParamLayout::new(&graph_config());
    for spec in &layout.specs {
        let r = spec.offset..spec.offset + spec.len();
        let d = max_abs_diff(&wg[r.clone()], &we[r]);
        let bound = if has_zero_exact_gradient(&spec.name) {
            2.0 * STEPS as f32 * 1e-3
        } else {
            1e-5
        };
        assert!(
            d <= bound,
            "{} after {STEPS} steps: diff {d:.3e}",
            spec.name
        );
    }
}

/// Evaluation through CUDA graphs against eager evaluation: five batches of eight rows in other
/// orders (other layouts, the same 34 rows: one row bucket, 64), so the forward is captured on
/// the second batch and replayed on the other three with their tokens and layouts patched in. The same
/// kernels on the same real rows; GEMMs over the padded row count may sum in another order:
/// logits and loss within 1e-5 relative (fp32).
#[test]
fn evaluation_through_cuda_graphs() {
    if gpu().is_none() {
        return;
    }
    let (ids, types, labels) = tiny_batch();
    let mut set = bertft_cuda::data::encoded::EncodedSet {
        ids: Vec::new(),
        type_ids: Vec::new(),
        labels: Some(Vec::new()),
    };
    // Batches of eight rows in another order each time (other layouts), all in 64 rows.
    for r in 0..40u32 {
        let i = ((r + r / 8) % 4) as usize;
        let row: Vec<u32> = ids[i].iter().map(|&t| 1 + (t + 5 * r) % 39).collect();
        set.ids.push(row);
        set.type_ids.push(types[i].clone());
        set.labels.as_mut().unwrap().push((labels[i] + r) % 3);
    }
    let run = |be: &CudaBackend| {
        let cfg = graph_config();
        let model = Classifier::new(be, cfg.clone(), &tiny_weights(&cfg, 5)).unwrap();
        let mut acts = bertft_cuda::train::step::ActivationCache::default();
        let batching = bertft_cuda::data::sampler::Batching::Rows {
            size: 8,
            drop_last: false,
        };
        bertft_cuda::train::evaluate::predict(be, &model, &mut acts, &set, batching, 0.1).unwrap()
    };
    let eager = gpu().unwrap();
    let graphed = gpu().unwrap().with_cuda_graphs(true);
    let (pe, pg) = (run(&eager), run(&graphed));
    let stats = graphed.graph_stats().expect("graphs on");
    assert_eq!(
        (
            stats.captures,
            stats.replays,
            stats.mismatches,
            stats.failures
        ),
        (1, 3, 0, 0),
        "{stats:?}"
    );
    assert!(
        stats.patched_nodes >= 3,
        "{stats:?}: the layouts must be patched"
    );
    let flat = |p: &bertft_cuda::train::evaluate::Predictions| p.logits.concat();
    close("logits through graphs", &flat(&pg), &flat(&pe), 1e-5);
    let (lg, le) = (pg.loss.unwrap(), pe.loss.unwrap());
    assert!(
        (lg - le).abs() <= 1e-5 * le.abs(),
        "loss through graphs {lg}, eager {le}"
    );
}

/// `run_region` itself: a region of a memset and a dropout, run six times. The first run is
/// eager, the second captured, the third replayed with the dropout's stream patched; the fourth
/// zeroes another tensor (a memset is not patched: a mismatch, run eagerly), the fifth captures
/// that shape again and the sixth replays it. Every output is the CPU's dropout, bit for bit
/// (dropout is exact: x·(1/(1−p)) in fp32 or 0).
#[test]
fn run_region_captures_replays_patches_and_falls_back() {
    let Some(g) = gpu() else { return };
    let g = g.with_cuda_graphs(true);
    let n = 1000;
    let x = random_vec(n, 21, 1.0);
    let xg = up(&g, &x);
    let (a, b) = (up(&g, &vec![7.0; n]), up(&g, &vec![7.0; n]));
    let runs: [(&CudaTensor, u64, (u64, u64, u64)); 6] = [
        (&a, 1, (0, 0, 0)),
        (&a, 2, (1, 0, 0)),
        (&a, 3, (1, 1, 0)),
        (&b, 4, (1, 1, 1)),
        (&b, 5, (2, 1, 1)),
        (&b, 6, (2, 2, 1)),
    ];
    for (i, (out, stream, counts)) in runs.into_iter().enumerate() {
        let d = Dropout {
            p: 0.3,
            seed: 9,
            stream,
        };
        g.run_region(&[77], &mut || {
            g.fill_zero(out)?;
            g.dropout_forward(out, &xg, d)
        })
        .unwrap();
        let want = {
            let c = up(&CPU, &x);
            let o = CPU.zeros(n).unwrap();
            CPU.dropout_forward(&o, &c, d).unwrap();
            down(&CPU, &o)
        };
        exact(
            &format!("run {i}: dropout stream {stream}"),
            &down(&g, out),
            &want,
        );
        let s = g.graph_stats().unwrap();
        assert_eq!(
            (s.captures, s.replays, s.mismatches),
            counts,
            "after run {i}: {s:?}"
        );
    }
    let s = g.graph_stats().unwrap();
    assert_eq!(s.failures, 0);
    assert!(s.patched_nodes >= 2, "{s:?}");
}

/// A region in which the last handle of an allocation made before it goes (the input of its
/// dropout, here): the free waits for the region's graph, so the capture is kept (a free node
/// for memory the graph does not own would break it: no capture, and the rerun finds its input
/// gone). Four runs: eager, captured, replayed twice, each on a new input (the dropout's
/// pointer patched); each output the CPU's dropout of its input, bit for bit. (A replay whose
/// free came before its launch would most likely still read intact memory: that order is the
/// code's, `replay_region`, not something this test can see.)
#[test]
fn run_region_defers_frees_of_earlier_allocations() {
    let Some(g) = gpu() else { return };
    let g = g.with_cuda_graphs(true);
    let n = 4096;
    let out = up(&g, &vec![7.0; n]);
    let d = Dropout {
        p: 0.3,
        seed: 5,
        stream: 1,
    };
    for (i, counts) in [(0, 0), (1, 0), (1, 1), (1, 2)].into_iter().enumerate() {
        let x = random_vec(n, 40 + i as u64, 1.0);
        let mut input = Some(up(&g, &x));
        g.run_region(&[78], &mut || {
            let x = input.take().expect("the region runs once per step here");
            let scratch = g.zeros(n)?;
            g.dropout_forward(&scratch, &x, d)?;
            drop(x);
            let late = g.zeros(n)?;
            g.copy(&late, &scratch)?;
            g.copy(&out, &late)
        })
        .unwrap();
        let want = {
            let o = CPU.zeros(n).unwrap();
            CPU.dropout_forward(&o, &up(&CPU, &x), d).unwrap();
            down(&CPU, &o)
        };
        exact(&format!("run {i}"), &down(&g, &out), &want);
        let s = g.graph_stats().unwrap();
        assert_eq!((s.captures, s.replays), counts, "after run {i}: {s:?}");
        assert_eq!((s.failures, s.mismatches), (0, 0), "after run {i}: {s:?}");
    }
}
