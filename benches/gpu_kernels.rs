//! Every kernel family of the CUDA backend at BERT-base and MiniLM shapes, timed on the GPU with
//! CUDA events (`CudaBackend::time_on_stream` through criterion's `iter_custom`, so criterion's
//! times are GPU times), each beside the ceilings measured on the same GPU in the same run: a
//! 1 GiB device-to-device copy (GB/s) and 8192³ GEMMs through `linear_forward` in fp16 and fp32
//! (TFLOP/s).
//!
//! Shapes: batch 32 × sequence 128 = 4096 rows (every token real); BERT-base (hidden 768, 12
//! heads of 64, intermediate 3072, 30522 words, 512 positions) and all-MiniLM-L6-v2 (hidden 384,
//! 12 heads of 32, intermediate 1536) where they differ. Attention also at sequence 512 (batch 8:
//! the same 4096 rows). Dropout is on where training has it (p 0.1).
//!
//! Each op's criterion throughput is what it must move or compute, counted in the comment where
//! it is set up: `Throughput::BytesDecimal` (criterion prints GB/s) for the memory-bound ops,
//! `Throughput::Elements` of FLOPs for the GEMMs (criterion prints Gelem/s: read GFLOP/s), both
//! for attention (criterion prints the FLOPs). Bytes are the minimum the op must read and write
//! (inputs read once, outputs written once, fp32), not what the kernels actually move (tiles
//! re-read, L2 hits, scratch), so GB/s is the effective bandwidth and its share of the copy's is
//! how close the op is to memory-bound speed. GEMM FLOPs are 2·m·n·k per product (bias sums and
//! the fp16 operand casts not counted: they are in the time, as in a training step; the fp16
//! ceiling pays them too). After each op one summary line gives its time per run and its rate as
//! a share of the ceiling it is bound by (GPU time per run: the total over every run criterion
//! timed, divided by their number); they are printed again together at the end.
//!
//! Without a CUDA driver or GPU it prints `skipped: no CUDA device` and exits 0. How to run it on
//! a GPU machine without cargo: benches/README.md.

use std::cell::RefCell;
use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use bertft_cuda::backend::cuda::{driver, CudaBackend, CudaIds, CudaTensor};
use bertft_cuda::backend::{
    Activation, AdamWStep, AdamWTensor, AttentionDims, Backend, BranchGrad, Dropout,
    MatmulPrecision, ResidualAdd, SeqLayout,
};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput};

const BATCH: usize = 32;
const SEQ: usize = 128;
/// Rows of every [rows, hidden] activation: batch 32 × sequence 128.
const ROWS: usize = BATCH * SEQ;
const VOCAB: usize = 30522;
const MAX_POSITIONS: usize = 512;
const TYPES: usize = 2;
/// bert-base-uncased with a 2-label head (benches/README.md).
const BERT_PARAMS: usize = 109_483_778;
/// The ceilings' sizes.
const COPY_BYTES: usize = 1 << 30;
const GEMM_N: usize = 8192;
/// Fewer samples than this (criterion's `--test` mode runs each op once): no summary line.
const MIN_SAMPLES: usize = 5;

#[derive(Clone, Copy)]
struct Model {
    name: &'static str,
    hidden: usize,
    heads: usize,
    head_dim: usize,
    intermediate: usize,
}

const BERT: Model = Model {
    name: "bert",
    hidden: 768,
    heads: 12,
    head_dim: 64,
    intermediate: 3072,
};
const MINILM: Model = Model {
    name: "minilm",
    hidden: 384,
    heads: 12,
    head_dim: 32,
    intermediate: 1536,
};
const MODELS: [Model; 2] = [BERT, MINILM];

/// What an op's rate is measured against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ceiling {
    /// Device-to-device copy of 1 GiB: bytes read + written per second.
    Copy,
    /// 8192³ GEMM through `linear_forward`, fp16 operands (cast per call), fp32 accumulate.
    GemmF16,
    /// The same in fp32 (no TF32): also the bound of the fp32 CUDA-core attention kernels.
    GemmF32,
}

impl Ceiling {
    const ALL: [Ceiling; 3] = [Ceiling::Copy, Ceiling::GemmF16, Ceiling::GemmF32];

    fn name(self) -> &'static str {
        match self {
            Ceiling::Copy => "copy",
            Ceiling::GemmF16 => "fp16 GEMM",
            Ceiling::GemmF32 => "fp32 GEMM",
        }
    }

    fn of(p: MatmulPrecision) -> Ceiling {
        match p {
            MatmulPrecision::F16 | MatmulPrecision::Bf16 => Ceiling::GemmF16,
            _ => Ceiling::GemmF32,
        }
    }
}

/// What one run of an op must move or compute.
#[derive(Clone, Copy, Debug)]
enum Work {
    /// Bytes read + written at least; bound by the copy.
    Bytes(u64),
    /// FLOPs of GEMMs; bound by the GEMM ceiling of their precision.
    Flops(u64, Ceiling),
    /// Attention: FLOPs, bound by the GEMM ceiling of its precision (the fp32 GEMM for the
    /// CUDA-core kernels, the fp16 GEMM for the tensor-core ones), and bytes (by the copy).
    FlopsAndBytes(u64, u64, Ceiling),
}

impl Work {
    fn throughput(self) -> Throughput {
        match self {
            Work::Bytes(b) => Throughput::BytesDecimal(b),
            Work::Flops(f, _) => Throughput::Elements(f),
            Work::FlopsAndBytes(f, b, _) => Throughput::ElementsAndBytes {
                elements: f,
                bytes: b,
            },
        }
    }
}

fn bytes(n: usize) -> Work {
    Work::Bytes(n as u64)
}

/// One run of an op, its tensors captured.
type Op<'g> = Box<dyn FnMut() -> Result<()> + 'g>;

/// An op to time: its backend, its work, and how to allocate its tensors (only when criterion
/// runs it: a filtered-out op allocates nothing).
struct Case<'g> {
    be: &'g CudaBackend,
    work: Work,
    setup: Box<dyn FnOnce() -> Result<Op<'g>> + 'g>,
}

fn case<'g, S, F>(be: &'g CudaBackend, work: Work, setup: S) -> Case<'g>
where
    S: FnOnce() -> Result<F> + 'g,
    F: FnMut() -> Result<()> + 'g,
{
    Case {
        be,
        work,
        setup: Box::new(move || Ok(Box::new(setup()?) as Op<'g>)),
    }
}

/// GPU 0 with fp32 GEMMs, and again with fp16 GEMM operands (one context, two streams; each
/// op's tensors are allocated on the backend that runs it).
struct Gpus {
    fp32: CudaBackend,
    fp16: CudaBackend,
    /// bf16 GEMM operands: the bf16 tensor-core attention.
    bf16: CudaBackend,
}

impl Gpus {
    fn be(&self, p: MatmulPrecision) -> &CudaBackend {
        match p {
            MatmulPrecision::F16 => &self.fp16,
            MatmulPrecision::Bf16 => &self.bf16,
            _ => &self.fp32,
        }
    }
}

/// Uniform in [-1, 1) from a splitmix64 sequence (fast enough for the 8192² operands).
fn random_host(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03;
    (0..len)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 40) as f32 * (2.0 / (1u64 << 24) as f32) - 1.0
        })
        .collect()
}

fn random(be: &CudaBackend, len: usize, seed: u64) -> Result<CudaTensor> {
    be.upload(&random_host(len, seed))
}

fn random_ids(be: &CudaBackend, len: usize, below: usize, seed: u64) -> Result<CudaIds> {
    let ids: Vec<u32> = random_host(len, seed)
        .iter()
        .map(|&u| (((u + 1.0) * 0.5 * below as f32) as u32).min(below as u32 - 1))
        .collect();
    be.upload_ids(&ids)
}

const TRAIN_DROPOUT: Dropout = Dropout {
    p: 0.1,
    seed: 42,
    stream: 7,
};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn fmt_time(secs: f64) -> String {
    if secs < 1e-3 {
        format!("{:.1} µs", secs * 1e6)
    } else {
        format!("{:.3} ms", secs * 1e3)
    }
}

fn fail(what: &str, e: anyhow::Error) -> ! {
    eprintln!("gpu_kernels: {what}: {e:#}");
    std::process::exit(1)
}

/// A case's op, set up and run once (waited for).
fn prepare<'g>(
    be: &CudaBackend,
    setup: Box<dyn FnOnce() -> Result<Op<'g>> + 'g>,
) -> Result<Op<'g>> {
    let mut op = setup().context("setting up")?;
    op().and_then(|()| be.synchronize()).context("first run")?;
    Ok(op)
}

/// Runs the cases through criterion and keeps the ceilings and the summary lines.
struct Runner<'g> {
    gpus: &'g Gpus,
    /// Rate per ceiling (bytes/s or FLOP/s), from the `ceiling` group or measured on demand.
    ceilings: [Option<f64>; 3],
    lines: Vec<String>,
}

impl<'g> Runner<'g> {
    /// Times `case` as `group/function/param`: its GPU seconds per run over every run criterion
    /// timed (warm-up included: total time over total runs, so the few short warm-up samples
    /// weigh little), or `None` when criterion did not measure it (filtered out, `--test`,
    /// `--list`). The op runs once untimed first (first-use costs: cuBLAS' choice of kernel,
    /// the memory pool growing, a layout's upload).
    fn time(
        &mut self,
        group: &mut BenchmarkGroup<'_, WallTime>,
        id: &str,
        function: &str,
        param: &str,
        case: Case<'g>,
    ) -> Option<f64> {
        let Case { be, work, setup } = case;
        let mut setup = Some(setup);
        let mut op: Option<Op<'g>> = None;
        // (runs, GPU seconds) of each call criterion made.
        let samples = RefCell::new(Vec::<(u64, f64)>::new());
        group.throughput(work.throughput());
        group.bench_function(BenchmarkId::new(function, param), |b| {
            let op = op.get_or_insert_with(|| {
                let setup = setup.take().expect("set up once");
                prepare(be, setup).unwrap_or_else(|e| fail(id, e))
            });
            b.iter_custom(|iters| {
                let t = be
                    .time_on_stream(iters, &mut *op)
                    .unwrap_or_else(|e| fail(id, e));
                samples.borrow_mut().push((iters, t.as_secs_f64()));
                t
            })
        });
        drop(op); // frees the tensors (stream-ordered) before the next op allocates
        let s = samples.into_inner();
        let runs: u64 = s.iter().map(|&(n, _)| n).sum();
        let secs: f64 = s.iter().map(|&(_, t)| t).sum();
        (s.len() >= MIN_SAMPLES && runs > 0).then(|| secs / runs as f64)
    }

    /// [`Self::time`] and its summary line.
    fn bench(
        &mut self,
        group: &mut BenchmarkGroup<'_, WallTime>,
        group_name: &str,
        function: &str,
        param: &str,
        case: Case<'g>,
    ) {
        let id = format!("{group_name}/{function}/{param}");
        let work = case.work;
        if let Some(secs) = self.time(group, &id, function, param, case) {
            self.report(&id, secs, work);
        }
    }

    fn report(&mut self, id: &str, secs: f64, work: Work) {
        let gbs = |this: &mut Self, b: u64| {
            let rate = b as f64 / secs;
            format!("{:.0} GB/s{}", rate / 1e9, this.share(rate, Ceiling::Copy))
        };
        let tflops = |this: &mut Self, f: u64, c: Ceiling| {
            let rate = f as f64 / secs;
            format!("{:.2} TFLOP/s{}", rate / 1e12, this.share(rate, c))
        };
        let achieved = match work {
            Work::Bytes(b) => gbs(self, b),
            Work::Flops(f, c) => tflops(self, f, c),
            Work::FlopsAndBytes(f, b, c) => {
                format!("{}; {}", tflops(self, f, c), gbs(self, b))
            }
        };
        let line = format!("{id:<58} {:>11}  {achieved}", fmt_time(secs));
        println!("summary: {line}");
        let _ = std::io::stdout().flush();
        self.lines.push(line);
    }

    /// " = x% of the <ceiling>" for `rate`, measuring the ceiling now if the `ceiling` group
    /// did not (filtered out).
    fn share(&mut self, rate: f64, c: Ceiling) -> String {
        if self.ceilings[c as usize].is_none() {
            match measure_ceiling(self.gpus, c) {
                Ok(v) => self.ceilings[c as usize] = Some(v),
                Err(e) => eprintln!("gpu_kernels: measuring the {} ceiling: {e:#}", c.name()),
            }
        }
        match self.ceilings[c as usize] {
            Some(ceiling) => format!(" = {:.1}% of {}", 100.0 * rate / ceiling, c.name()),
            None => " (no ceiling)".into(),
        }
    }
}

/// A ceiling op (the `ceiling` group, and [`measure_ceiling`]).
fn ceiling_case(gpus: &Gpus, c: Ceiling) -> Case<'_> {
    match c {
        // A 1 GiB device-to-device copy (cuMemcpyDtoDAsync): reads 1 GiB, writes 1 GiB.
        Ceiling::Copy => {
            let be = &gpus.fp32;
            case(be, bytes(2 * COPY_BYTES), move || {
                let (src, dst) = (be.zeros(COPY_BYTES / 4)?, be.zeros(COPY_BYTES / 4)?);
                Ok(move || be.copy(&dst, &src))
            })
        }
        // out[8192, 8192] = x·wᵀ + bias: 2·8192³ FLOPs (random operands: zeros would draw less
        // power and clock higher).
        Ceiling::GemmF16 | Ceiling::GemmF32 => {
            let p = if c == Ceiling::GemmF16 {
                MatmulPrecision::F16
            } else {
                MatmulPrecision::F32
            };
            let be = gpus.be(p);
            let n = GEMM_N;
            case(be, Work::Flops(2 * (n as u64).pow(3), c), move || {
                let x = random(be, n * n, 1)?;
                let w = random(be, n * n, 2)?;
                let bias = random(be, n, 3)?;
                let out = be.zeros(n * n)?;
                Ok(move || be.linear_forward(&out, &x, &w, &bias, n, n, n))
            })
        }
    }
}

/// A ceiling's rate measured outside criterion: the median of 5 timings of ~0.2 s each, after
/// a warm-up.
fn measure_ceiling(gpus: &Gpus, c: Ceiling) -> Result<f64> {
    let Case { be, work, setup } = ceiling_case(gpus, c);
    let mut op = setup()?;
    be.time_on_stream(3, &mut op)?;
    let once = be.time_on_stream(1, &mut op)?.as_secs_f64();
    let n = (0.2 / once.max(1e-6)).clamp(1.0, 1000.0) as u64;
    let mut per_run = (0..5)
        .map(|_| Ok(be.time_on_stream(n, &mut op)?.as_secs_f64() / n as f64))
        .collect::<Result<Vec<f64>>>()?;
    let secs = median(&mut per_run);
    Ok(match work {
        Work::Bytes(b) => b as f64 / secs,
        Work::Flops(f, _) | Work::FlopsAndBytes(f, _, _) => f as f64 / secs,
    })
}

fn ceiling(r: &mut Runner<'_>, c: &mut Criterion) {
    let mut g = c.benchmark_group("ceiling");
    // The fp32 GEMM takes ~20 ms a run: few samples, more time.
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for k in Ceiling::ALL {
        let (function, param) = match k {
            Ceiling::Copy => ("copy_dtod", "1GiB".to_string()),
            Ceiling::GemmF16 => ("gemm_fp16", format!("{GEMM_N}x{GEMM_N}x{GEMM_N}")),
            Ceiling::GemmF32 => ("gemm_fp32", format!("{GEMM_N}x{GEMM_N}x{GEMM_N}")),
        };
        let id = format!("ceiling/{function}/{param}");
        let case = ceiling_case(r.gpus, k);
        let work = case.work;
        if let Some(secs) = r.time(&mut g, &id, function, &param, case) {
            r.ceilings[k as usize] = Some(match work {
                Work::Bytes(b) => b as f64 / secs,
                Work::Flops(f, _) | Work::FlopsAndBytes(f, _, _) => f as f64 / secs,
            });
            r.report(&id, secs, work);
        }
    }
    g.finish();
}

/// The dense layers of one encoder layer, (name, in k, out n).
fn linear_shapes(m: Model) -> [(&'static str, usize, usize); 4] {
    [
        ("qkv", m.hidden, 3 * m.hidden),
        ("attn_out", m.hidden, m.hidden),
        ("ffn_up", m.hidden, m.intermediate),
        ("ffn_down", m.intermediate, m.hidden),
    ]
}

fn linear(r: &mut Runner<'_>, c: &mut Criterion) {
    let mut g = c.benchmark_group("linear");
    let gpus = r.gpus;
    for p in [MatmulPrecision::F32, MatmulPrecision::F16] {
        let be = gpus.be(p);
        let ceiling = Ceiling::of(p);
        for m in MODELS {
            for (name, k, n) in linear_shapes(m) {
                let rows = ROWS;
                let param = format!("{}_{name}_{rows}x{k}x{n}", m.name);
                let flops = 2 * (rows * k * n) as u64;
                // out[rows, n] = x[rows, k]·w[n, k]ᵀ + bias: 2·rows·k·n FLOPs.
                r.bench(
                    &mut g,
                    "linear",
                    &format!("fwd_{}", p.name()),
                    &param,
                    case(be, Work::Flops(flops, ceiling), move || {
                        let x = random(be, rows * k, 1)?;
                        let w = random(be, n * k, 2)?;
                        let bias = random(be, n, 3)?;
                        let out = be.zeros(rows * n)?;
                        Ok(move || be.linear_forward(&out, &x, &w, &bias, rows, k, n))
                    }),
                );
                // dx = dout·w and dw += doutᵀ·x: 2 × 2·rows·k·n FLOPs (dbias not counted).
                r.bench(
                    &mut g,
                    "linear",
                    &format!("bwd_{}", p.name()),
                    &param,
                    case(be, Work::Flops(2 * flops, ceiling), move || {
                        let x = random(be, rows * k, 1)?;
                        let w = random(be, n * k, 2)?;
                        let dout = random(be, rows * n, 4)?;
                        let dx = be.zeros(rows * k)?;
                        let dw = be.zeros(n * k)?;
                        let dbias = be.zeros(n)?;
                        Ok(move || {
                            be.linear_backward(
                                Some(&dx),
                                false,
                                &dw,
                                &dbias,
                                &dout,
                                &x,
                                &w,
                                rows,
                                k,
                                n,
                            )
                        })
                    }),
                );
            }
        }
    }
    g.finish();
}

fn layernorm(r: &mut Runner<'_>, c: &mut Criterion) {
    let mut g = c.benchmark_group("layernorm");
    let be = &r.gpus.fp32;
    for m in MODELS {
        let (rows, cols) = (ROWS, m.hidden);
        let param = format!("{}_{rows}x{cols}", m.name);
        let (rc, r_, c_) = ((rows * cols) as u64, rows as u64, cols as u64);
        let inputs = move || -> Result<[CudaTensor; 5]> {
            Ok([
                random(be, rows * cols, 1)?,
                random(be, cols, 2)?,
                random(be, cols, 3)?,
                be.zeros(rows)?,
                be.zeros(rows)?,
            ])
        };
        // Reads x, gamma, beta; writes out, mean, rstd: 4·(2·rows·cols + 2·cols + 2·rows).
        r.bench(
            &mut g,
            "layernorm",
            "fwd",
            &param,
            case(be, Work::Bytes(4 * (2 * rc + 2 * c_ + 2 * r_)), move || {
                let [x, gamma, beta, mean, rstd] = inputs()?;
                let out = be.zeros(rows * cols)?;
                Ok(move || {
                    be.layernorm_forward(
                        &out, None, &mean, &rstd, &x, None, &gamma, &beta, rows, cols, 1e-12,
                    )
                })
            }),
        );
        // sum = dropout(x) + residual fused (training's hidden dropout): reads x, residual,
        // gamma, beta; writes sum, out, mean, rstd: 4·(4·rows·cols + 2·cols + 2·rows). Under
        // fp16/bf16 the model also writes out's 16-bit copy (2·rows·cols more bytes), on the
        // fp16 backend here, as each op's tensors are allocated on the backend that runs it.
        for (name, copied) in [
            ("fwd_dropout_residual", false),
            ("fwd_dropout_residual_f16_copy", true),
        ] {
            let be = if copied { &r.gpus.fp16 } else { be };
            let bytes = 4 * (4 * rc + 2 * c_ + 2 * r_) + if copied { 2 * rc } else { 0 };
            r.bench(
                &mut g,
                "layernorm",
                name,
                &param,
                case(be, Work::Bytes(bytes), move || {
                    let (x, gamma, beta) = (
                        random(be, rows * cols, 1)?,
                        random(be, cols, 2)?,
                        random(be, cols, 3)?,
                    );
                    let (mean, rstd) = (be.zeros(rows)?, be.zeros(rows)?);
                    let residual = random(be, rows * cols, 4)?;
                    let (sum, out) = (be.zeros(rows * cols)?, be.zeros(rows * cols)?);
                    let copy = match copied {
                        true => Some(be.zeros_in_matmul_format(rows * cols)?),
                        false => None,
                    };
                    Ok(move || {
                        be.layernorm_forward(
                            &out,
                            copy.as_ref(),
                            &mean,
                            &rstd,
                            &x,
                            Some(ResidualAdd {
                                residual: &residual,
                                sum: &sum,
                                dropout: TRAIN_DROPOUT,
                            }),
                            &gamma,
                            &beta,
                            rows,
                            cols,
                            1e-12,
                        )
                    })
                }),
            );
        }
        // Reads dout, x, mean, rstd, gamma; writes dx; dgamma, dbeta read and written (the
        // per-block partials not counted): 4·(3·rows·cols + 2·rows + 5·cols).
        r.bench(
            &mut g,
            "layernorm",
            "bwd",
            &param,
            case(be, Work::Bytes(4 * (3 * rc + 2 * r_ + 5 * c_)), move || {
                let [x, gamma, beta, mean, rstd] = inputs()?;
                let out = be.zeros(rows * cols)?;
                be.layernorm_forward(
                    &out, None, &mean, &rstd, &x, None, &gamma, &beta, rows, cols, 1e-12,
                )?;
                let dout = random(be, rows * cols, 5)?;
                let dx = be.zeros(rows * cols)?;
                let (dgamma, dbeta) = (be.zeros(cols)?, be.zeros(cols)?);
                Ok(move || {
                    be.layernorm_backward(
                        &dx, &dgamma, &dbeta, &dout, &x, &mean, &rstd, &gamma, rows, cols, None,
                    )
                })
            }),
        );
        // The same, also writing the dropped-out branch's gradient (training's residual
        // blocks): one more rows·cols write, 4·(4·rows·cols + 2·rows + 5·cols).
        r.bench(
            &mut g,
            "layernorm",
            "bwd_dropout_branch",
            &param,
            case(be, Work::Bytes(4 * (4 * rc + 2 * r_ + 5 * c_)), move || {
                let [x, gamma, beta, mean, rstd] = inputs()?;
                let out = be.zeros(rows * cols)?;
                be.layernorm_forward(
                    &out, None, &mean, &rstd, &x, None, &gamma, &beta, rows, cols, 1e-12,
                )?;
                let dout = random(be, rows * cols, 5)?;
                let (dx, dbranch) = (be.zeros(rows * cols)?, be.zeros(rows * cols)?);
                let (dgamma, dbeta) = (be.zeros(cols)?, be.zeros(cols)?);
                Ok(move || {
                    be.layernorm_backward(
                        &dx,
                        &dgamma,
                        &dbeta,
                        &dout,
                        &x,
                        &mean,
                        &rstd,
                        &gamma,
                        rows,
                        cols,
                        Some(BranchGrad {
                            dx: &dbranch,
                            dropout: TRAIN_DROPOUT,
                        }),
                    )
                })
            }),
        );
    }
    g.finish();
}

fn activation(r: &mut Runner<'_>, c: &mut Criterion) {
    let mut g = c.benchmark_group("activation");
    let be = &r.gpus.fp32;
    for m in MODELS {
        // The FFN's intermediate activation, [rows, intermediate]; both models use erf GELU.
        let n = ROWS * m.intermediate;
        let param = format!("{}_{ROWS}x{}", m.name, m.intermediate);
        // Reads x, writes out: 8·n.
        r.bench(
            &mut g,
            "activation",
            "gelu_fwd",
            &param,
            case(be, bytes(8 * n), move || {
                let (x, out) = (random(be, n, 1)?, be.zeros(n)?);
                Ok(move || be.activation_forward(&out, &x, Activation::GeluErf))
            }),
        );
        // Reads dout, x; writes dx: 12·n.
        r.bench(
            &mut g,
            "activation",
            "gelu_bwd",
            &param,
            case(be, bytes(12 * n), move || {
                let (x, dout, dx) = (random(be, n, 1)?, random(be, n, 2)?, be.zeros(n)?);
                Ok(move || be.activation_backward(&dx, &dout, &x, Activation::GeluErf))
            }),
        );
    }
    g.finish();
}

fn dropout(r: &mut Runner<'_>, c: &mut Criterion) {
    let mut g = c.benchmark_group("dropout");
    let be = &r.gpus.fp32;
    for m in MODELS {
        // The hidden-state dropouts (embeddings, attention output, FFN output): [rows, hidden],
        // p 0.1, the mask regenerated from Philox (not stored).
        let n = ROWS * m.hidden;
        let param = format!("{}_{ROWS}x{}", m.name, m.hidden);
        // Reads x, writes out: 8·n (bwd: reads dout, writes dx, the same).
        for (function, backward) in [("fwd", false), ("bwd", true)] {
            r.bench(
                &mut g,
                "dropout",
                function,
                &param,
                case(be, bytes(8 * n), move || {
                    let (x, out) = (random(be, n, 1)?, be.zeros(n)?);
                    Ok(move || {
                        if backward {
                            be.dropout_backward(&out, &x, TRAIN_DROPOUT)
                        } else {
                            be.dropout_forward(&out, &x, TRAIN_DROPOUT)
                        }
                    })
                }),
            );
        }
    }
    g.finish();
}

/// Attention at the models' shapes: the fp32 CUDA-core kernels (attention.cu, `fwd`/`bwd`,
/// against the fp32 GEMM) and, under fp16/bf16 GEMMs, the tensor-core kernels (attention_tc.cu,
/// `fwd_fp16`, `bwd_bf16`, …, against the fp16 GEMM ceiling, as PyTorch AMP + SDPA would be).
fn attention(r: &mut Runner<'_>, c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    let gpus = r.gpus;
    for (prec, m, seq) in [
        MatmulPrecision::F32,
        MatmulPrecision::F16,
        MatmulPrecision::Bf16,
    ]
    .into_iter()
    .flat_map(|p| {
        MODELS
            .into_iter()
            .flat_map(move |m| [128, 512].map(|s| (p, m, s)))
    }) {
        let be = gpus.be(prec);
        let ceiling = Ceiling::of(prec);
        let (fwd_id, bwd_id) = match prec {
            MatmulPrecision::F32 => ("fwd".to_string(), "bwd".to_string()),
            p => (format!("fwd_{}", p.name()), format!("bwd_{}", p.name())),
        };
        {
            // Padded layout, every sequence full length; 4096 rows at either length.
            let batch = ROWS / seq;
            let rows = batch * seq;
            let dims = AttentionDims {
                heads: m.heads,
                head_dim: m.head_dim,
            };
            let hidden = m.heads * m.head_dim;
            let param = format!("{}_b{batch}_s{seq}_h{}_d{}", m.name, m.heads, m.head_dim);
            let layout = SeqLayout::padded(&vec![seq; batch], seq);
            let (rh, rheads) = ((rows * hidden) as u64, (rows * m.heads) as u64);
            // Model FLOPs (FlashAttention's count; the dropout mask and the backward's
            // recomputation not counted): forward Q·Kᵀ and P·V, 2 × 2·seq·d per query and head
            // = 4·rows·seq·hidden; backward 2.5× that.
            let fwd_flops = 4 * rh * seq as u64;
            // qkv and out as the model stores them: 16-bit where the tensor-core kernels run
            // (they read qkv and write out so), else fp32.
            let narrow = be.attention_rounding(m.head_dim) != MatmulPrecision::F32;
            let elem = if narrow { 2 } else { 4 };
            // Reads qkv, writes out and lse: rows·(3·hidden·elem + hidden·elem + 4·heads).
            let fwd_bytes = 4 * elem * rh + 4 * rheads;
            let inputs = {
                let layout = layout.clone();
                move || -> Result<[CudaTensor; 3]> {
                    let wide = random(be, 3 * rows * hidden, 1)?;
                    let qkv = match narrow {
                        true => {
                            let t = be.zeros_in_matmul_format(3 * rows * hidden)?;
                            be.copy(&t, &wide)?;
                            t
                        }
                        false => wide,
                    };
                    let out = match narrow {
                        true => be.zeros_in_matmul_format(rows * hidden)?,
                        false => be.zeros(rows * hidden)?,
                    };
                    let lse = be.zeros(rows * m.heads)?;
                    be.attention_forward(&out, &lse, &qkv, &layout, dims, TRAIN_DROPOUT)?;
                    Ok([qkv, out, lse])
                }
            };
            {
                let layout = layout.clone();
                let inputs = inputs.clone();
                r.bench(
                    &mut g,
                    "attention",
                    &fwd_id,
                    &param,
                    case(
                        be,
                        Work::FlopsAndBytes(fwd_flops, fwd_bytes, ceiling),
                        move || {
                            let [qkv, out, lse] = inputs()?;
                            Ok(move || {
                                be.attention_forward(&out, &lse, &qkv, &layout, dims, TRAIN_DROPOUT)
                            })
                        },
                    ),
                );
            }
            // Reads qkv, out, dout (fp32), lse; writes dqkv (fp32); delta written and read:
            // rows·(4·hidden·elem + 16·hidden + 12·heads).
            let bwd_bytes = 4 * elem * rh + 16 * rh + 12 * rheads;
            r.bench(
                &mut g,
                "attention",
                &bwd_id,
                &param,
                case(
                    be,
                    Work::FlopsAndBytes(fwd_flops * 5 / 2, bwd_bytes, ceiling),
                    move || {
                        let [qkv, out, lse] = inputs()?;
                        let dout = random(be, rows * hidden, 2)?;
                        let dqkv = be.zeros(3 * rows * hidden)?;
                        Ok(move || {
                            be.attention_backward(
                                &dqkv,
                                &dout,
                                &qkv,
                                &out,
                                &lse,
                                &layout,
                                dims,
                                TRAIN_DROPOUT,
                            )
                        })
                    },
                ),
            );
        }
    }
    g.finish();
}

fn cross_entropy(r: &mut Runner<'_>, c: &mut Criterion) {
    let mut g = c.benchmark_group("cross_entropy");
    let be = &r.gpus.fp32;
    // The classifier's loss (batch 32, 2 labels: launch-bound), and a vocabulary-sized softmax
    // over 4096 rows, where the kernels' bandwidth shows.
    for (rows, classes) in [(BATCH, 2), (ROWS, VOCAB)] {
        let param = format!("{rows}x{classes}");
        let (rc, r_) = ((rows * classes) as u64, rows as u64);
        let inputs = move || -> Result<(CudaTensor, CudaIds)> {
            Ok((
                random(be, rows * classes, 1)?,
                random_ids(be, rows, classes, 2)?,
            ))
        };
        // Reads logits and labels, writes losses: 4·(rows·classes + 2·rows).
        r.bench(
            &mut g,
            "cross_entropy",
            "fwd",
            &param,
            case(be, Work::Bytes(4 * (rc + 2 * r_)), move || {
                let (logits, labels) = inputs()?;
                let losses = be.zeros(rows)?;
                Ok(move || be.cross_entropy_forward(&losses, &logits, &labels, classes, 0.0))
            }),
        );
        // Reads logits and labels, writes dlogits: 4·(2·rows·classes + rows).
        r.bench(
            &mut g,
            "cross_entropy",
            "bwd",
            &param,
            case(be, Work::Bytes(4 * (2 * rc + r_)), move || {
                let (logits, labels) = inputs()?;
                let dlogits = be.zeros(rows * classes)?;
                Ok(move || {
                    be.cross_entropy_backward(&dlogits, &logits, &labels, classes, 0.0, 1.0 / 32.0)
                })
            }),
        );
        // The training step's fused op. Reads logits and labels, writes losses and dlogits:
        // 4·(2·rows·classes + 2·rows).
        r.bench(
            &mut g,
            "cross_entropy",
            "fwd_bwd",
            &param,
            case(be, Work::Bytes(4 * (2 * rc + 2 * r_)), move || {
                let (logits, labels) = inputs()?;
                let (losses, dlogits) = (be.zeros(rows)?, be.zeros(rows * classes)?);
                Ok(move || {
                    be.cross_entropy_forward_backward(
                        &losses,
                        &dlogits,
                        &logits,
                        &labels,
                        classes,
                        0.0,
                        1.0 / 32.0,
                    )
                })
            }),
        );
    }
    g.finish();
}

fn adamw(r: &mut Runner<'_>, c: &mut Criterion) {
    let mut g = c.benchmark_group("adamw");
    let be = &r.gpus.fp32;
    let n = BERT_PARAMS;
    // BERT-base's parameters as one flat tensor, one launch. Reads param, grad, exp_avg,
    // exp_avg_sq; writes param, exp_avg, exp_avg_sq: 28·n.
    r.bench(
        &mut g,
        "adamw",
        "update",
        &format!("bert_{n}_params"),
        case(be, bytes(28 * n), move || {
            let param = random(be, n, 1)?;
            let grad = random(be, n, 2)?;
            let (exp_avg, exp_avg_sq) = (be.zeros(n)?, be.zeros(n)?);
            let step = AdamWStep {
                lr: 2e-5,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                step: 1,
            };
            Ok(move || {
                be.adamw_update(
                    &[AdamWTensor {
                        param: &param,
                        grad: &grad,
                        exp_avg: &exp_avg,
                        exp_avg_sq: &exp_avg_sq,
                        weight_decay: 0.01,
                    }],
                    &step,
                    None,
                )
            })
        }),
    );
    g.finish();
}

fn embeddings(r: &mut Runner<'_>, c: &mut Criterion) {
    let mut g = c.benchmark_group("embeddings");
    let be = &r.gpus.fp32;
    for m in MODELS {
        let h = m.hidden;
        let rows = ROWS;
        let param = format!("{}_{rows}x{h}", m.name);
        let (rh, r_) = ((rows * h) as u64, rows as u64);
        // Random word ids, positions 0..128 in every sequence, token type 0.
        let ids = move || -> Result<[CudaIds; 3]> {
            let positions: Vec<u32> = (0..rows).map(|i| (i % SEQ) as u32).collect();
            Ok([
                random_ids(be, rows, VOCAB, 1)?,
                be.upload_ids(&positions)?,
                be.upload_ids(&vec![0; rows])?,
            ])
        };
        // Reads three table rows and three ids per token, writes out: 4·(4·rows·hidden + 3·rows).
        r.bench(
            &mut g,
            "embeddings",
            "fwd",
            &param,
            case(be, Work::Bytes(4 * (4 * rh + 3 * r_)), move || {
                let [words, positions, types] = ids()?;
                let word = random(be, VOCAB * h, 2)?;
                let position = random(be, MAX_POSITIONS * h, 3)?;
                let token_type = random(be, TYPES * h, 4)?;
                let out = be.zeros(rows * h)?;
                Ok(move || {
                    be.embeddings_forward(
                        &out,
                        &word,
                        &position,
                        &token_type,
                        &words,
                        &positions,
                        &types,
                        h,
                    )
                })
            }),
        );
        // Reads dout and three ids per token, adds each dout row into three table rows (an
        // atomic add counted as a 4-byte read and write): 4·(7·rows·hidden + 3·rows).
        r.bench(
            &mut g,
            "embeddings",
            "bwd",
            &param,
            case(be, Work::Bytes(4 * (7 * rh + 3 * r_)), move || {
                let [words, positions, types] = ids()?;
                let dword = be.zeros(VOCAB * h)?;
                let dposition = be.zeros(MAX_POSITIONS * h)?;
                let dtoken_type = be.zeros(TYPES * h)?;
                let dout = random(be, rows * h, 5)?;
                Ok(move || {
                    be.embeddings_backward(
                        &dword,
                        &dposition,
                        &dtoken_type,
                        &dout,
                        &words,
                        &positions,
                        &types,
                        h,
                        Some(0),
                    )
                })
            }),
        );
    }
    g.finish();
}

fn main() {
    // As tests/cuda_ops.rs: no driver, or a driver that sees no GPU, is the one allowed skip.
    let no_device = match driver() {
        Err(_) => true,
        Ok(d) => d
            .gpus()
            .unwrap_or_else(|e| fail("the CUDA driver cannot list its GPUs", e))
            .is_empty(),
    };
    if no_device {
        println!("skipped: no CUDA device");
        return;
    }
    let fp32 = CudaBackend::new(0).unwrap_or_else(|e| fail("CudaBackend::new(0)", e));
    let fp16 = CudaBackend::new(0)
        .unwrap_or_else(|e| fail("CudaBackend::new(0)", e))
        .with_matmul_precision(MatmulPrecision::F16);
    let bf16 = CudaBackend::new(0)
        .unwrap_or_else(|e| fail("CudaBackend::new(0)", e))
        .with_matmul_precision(MatmulPrecision::Bf16);
    println!("gpu: {}", fp32.name());
    let gpus = Gpus { fp32, fp16, bf16 };

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(30)
        .configure_from_args();
    let mut r = Runner {
        gpus: &gpus,
        ceilings: [None; 3],
        lines: Vec::new(),
    };
    ceiling(&mut r, &mut c);
    linear(&mut r, &mut c);
    layernorm(&mut r, &mut c);
    activation(&mut r, &mut c);
    dropout(&mut r, &mut c);
    attention(&mut r, &mut c);
    cross_entropy(&mut r, &mut c);
    adamw(&mut r, &mut c);
    embeddings(&mut r, &mut c);
    c.final_summary();

    if !r.lines.is_empty() {
        println!("\nGPU time per run (over every run criterion timed), against the ceilings:");
        let ceilings: Vec<String> = Ceiling::ALL
            .iter()
            .filter_map(|&k| {
                r.ceilings[k as usize].map(|v| match k {
                    Ceiling::Copy => format!("{} {:.0} GB/s", k.name(), v / 1e9),
                    _ => format!("{} {:.1} TFLOP/s", k.name(), v / 1e12),
                })
            })
            .collect();
        println!("ceilings: {}", ceilings.join(", "));
        for line in &r.lines {
            println!("{line}");
        }
    }
}
