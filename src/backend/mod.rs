//! The op boundary between the model and the machine it runs on.
//!
//! The model (`crate::model::bert`) is written once against [`Backend`]; the CPU backend
//! (`cpu/`, plain Rust, fp32) is the reference of every op and the fallback without a GPU, and
//! the CUDA backend implements the same trait with kernels of the same names.
//!
//! Conventions every op follows (they mirror device pointers, so a GPU backend can keep them):
//! - Tensors are flat, row-major, and carry no shape: each op takes its dimensions explicitly and
//!   checks the lengths it was given.
//! - Outputs never alias inputs. A tensor may be a view into a larger buffer (all parameters live
//!   in one flat buffer, all their gradients in another).
//! - Activation gradients are overwritten, except where an op says it adds (`dx_accumulate`,
//!   `scatter_first_tokens_backward`).
//!   Parameter gradients are always accumulated (`+=`), as PyTorch's `.grad` is, so that
//!   gradient accumulation is a sequence of backward passes followed by one optimizer step.
//! - Sequences are described by a [`SeqLayout`]: a padded batch and an unpadded (packed) batch
//!   are the same thing with different row counts.

pub mod cpu;
pub mod cuda;
pub mod kernel_sources;
pub mod philox;

use anyhow::Result;

/// The label of a row the cross-entropy leaves out (PyTorch's `ignore_index`): its loss and its
/// logits' gradient are exactly 0. The dummy sequences of a batch padded to its
/// [`sequence_bucket`](crate::model::bert::sequence_bucket) carry it; the loss's mean
/// ([`LossSpec::normalizer`](crate::model::bert::LossSpec)) does not count them.
pub const IGNORE_LABEL: u32 = u32::MAX;

/// Activation function of the feed-forward block, from `config.json`'s `hidden_act`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: x·Φ(x) with the exact erf.
    GeluErf,
    /// `gelu_new`, `gelu_pytorch_tanh`: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
    GeluTanh,
    /// `relu`: max(x, 0).
    Relu,
}

/// The number format the dense layers' GEMMs read their operands in; products are always
/// accumulated in fp32 and written in fp32, or rounded once into a 16-bit output stored in this
/// format (PyTorch's autocast GEMMs: fp16/bf16 in, fp32 accumulate). Every other op computes in
/// fp32 whatever this is; under fp16/bf16 the feed-forward activations are stored in it
/// ([`Dtype`]).
///
/// The CPU backend emulates the reduced formats by rounding each operand (inputs, weights, the
/// output gradient) to the format before an fp32 GEMM, exactly what a tensor-core GEMM reads,
/// so it is the reference of the GPU's mixed-precision GEMMs (they differ only by summation
/// order: a product of two fp16/bf16 values is exact in fp32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// True fp32 (PyTorch's default: `allow_tf32 = False` for matmuls).
    #[default]
    F32,
    /// fp32 data read as TF32 by the tensor cores (10 mantissa bits): `--tf32`.
    Tf32,
    /// IEEE half: `--fp16` (with dynamic loss scaling in the trainer).
    F16,
    /// bfloat16: `--bf16`.
    Bf16,
}

impl MatmulPrecision {
    /// From the `--fp16`/`--bf16`/`--tf32` flags (`--fp16` and `--bf16` together are refused
    /// by the caller).
    pub fn from_flags(fp16: bool, bf16: bool, tf32: bool) -> Self {
        match (fp16, bf16, tf32) {
            (true, _, _) => MatmulPrecision::F16,
            (_, true, _) => MatmulPrecision::Bf16,
            (_, _, true) => MatmulPrecision::Tf32,
            _ => MatmulPrecision::F32,
        }
    }

    /// `v` as a GEMM in this precision reads it: rounded to nearest (ties to even) into the
    /// format and back. fp16 overflows to ±inf beyond 65504 and flushes below 2⁻²⁴, which is
    /// what dynamic loss scaling guards against.
    pub fn round(self, v: f32) -> f32 {
        match self {
            MatmulPrecision::F32 => v,
            MatmulPrecision::F16 => half::f16::from_f32(v).to_f32(),
            MatmulPrecision::Bf16 => half::bf16::from_f32(v).to_f32(),
            MatmulPrecision::Tf32 => round_to_tf32(v),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MatmulPrecision::F32 => "fp32",
            MatmulPrecision::Tf32 => "tf32",
            MatmulPrecision::F16 => "fp16",
            MatmulPrecision::Bf16 => "bf16",
        }
    }
}

/// How a tensor's elements are stored. Every op computes in fp32; a 16-bit tensor holds what an
/// fp32 result rounds to (to nearest, ties to even) when stored.
///
/// Most tensors are fp32. Under fp16/bf16 GEMMs, the activations that only GEMMs and one
/// other op touch (the feed-forward block's pre-activation and activation: half of a layer's
/// saved activations; the copies of the LayerNorm outputs the GEMMs read; Q, K, V and the
/// attention output where attention rounds to 16 bits anyway) are stored in the GEMMs' 16-bit
/// format, as PyTorch's autocast stores a linear layer's output:
/// [`Backend::zeros_in_matmul_format`] makes them, and only
/// the ops whose documentation says so take them (the others read and write fp32 only; the CPU
/// backend panics when given one, so the shared model code is checked by the CPU tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Dtype {
    #[default]
    F32,
    F16,
    Bf16,
}

impl Dtype {
    /// `v` as a tensor of this type stores it.
    pub fn round(self, v: f32) -> f32 {
        match self {
            Dtype::F32 => v,
            Dtype::F16 => half::f16::from_f32(v).to_f32(),
            Dtype::Bf16 => half::bf16::from_f32(v).to_f32(),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "fp32",
            Dtype::F16 => "fp16",
            Dtype::Bf16 => "bf16",
        }
    }
}

impl MatmulPrecision {
    /// The type [`Backend::zeros_in_matmul_format`] stores activations in: the GEMMs' 16-bit
    /// operand format under fp16/bf16, fp32 otherwise (TF32 reads fp32 storage).
    pub fn storage_dtype(self) -> Dtype {
        match self {
            MatmulPrecision::F16 => Dtype::F16,
            MatmulPrecision::Bf16 => Dtype::Bf16,
            MatmulPrecision::F32 | MatmulPrecision::Tf32 => Dtype::F32,
        }
    }
}

/// The 16-bit format attention rounds its matrix-product operands to under matmul precision
/// `precision`, or `F32` for none: `F16`/`Bf16` with head_dim 32 or 64 (the CUDA backend's
/// tensor-core kernels, kernels/attention_tc.cu, which compute what PyTorch AMP + SDPA does),
/// fp32 otherwise (kernels/attention.cu). The CPU backend follows the same rule, so it emulates
/// whichever the GPU runs.
pub fn attention_rounding(precision: MatmulPrecision, head_dim: usize) -> MatmulPrecision {
    match (precision, head_dim) {
        (MatmulPrecision::F16 | MatmulPrecision::Bf16, 32 | 64) => precision,
        _ => MatmulPrecision::F32,
    }
}

/// fp32 rounded to TF32's 10 mantissa bits, to nearest with ties away from zero (PTX's
/// `cvt.rna.tf32.f32`); inf and NaN pass through. Only close to what cuBLAS does: its TF32
/// kernels may hand fp32 bits to the tensor cores, which drop the low 13 bits (truncation), or
/// pick a non-tensor-core kernel, so TF32 results are compared with a tolerance of one TF32 ulp
/// per operand, never bit for bit.
fn round_to_tf32(v: f32) -> f32 {
    if !v.is_finite() {
        return v;
    }
    let bits = v.to_bits();
    // Adding half of the dropped 13-bit field carries into the kept bits at or above the
    // midpoint (ties away); an exponent overflow gives inf, as the hardware's does.
    f32::from_bits(bits.wrapping_add(1 << 12) & !0x1fff)
}

/// A backend ran out of device memory. Kept as a type in the error chain so that the trainer
/// can explain it in the run's terms (the batch size and sequence length to lower).
#[derive(Debug, thiserror::Error)]
#[error("out of GPU memory ({what})")]
pub struct OutOfMemory {
    /// What could not be allocated.
    pub what: String,
}

/// Whether `e`'s chain holds an [`OutOfMemory`].
pub fn is_out_of_memory(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<OutOfMemory>())
}

/// Where each sequence of a batch lives among the rows of a `[rows, hidden]` activation.
///
/// Sequence `b` occupies rows `starts[b] .. starts[b] + rows[b]`; its first `valid[b]` rows are
/// real tokens and the rest padding. Padding rows are computed like any other row (as
/// transformers does) but are never attended to. A padded batch has `rows[b] = seq_len`; a packed
/// batch has `rows[b] = valid[b]`. The sequences lie back to back from row 0, in batch order
/// ([`SeqLayout::is_back_to_back`]; the attention ops refuse other layouts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqLayout {
    pub starts: Vec<u32>,
    pub rows: Vec<u32>,
    pub valid: Vec<u32>,
}

impl SeqLayout {
    /// A right-padded batch: every sequence has `seq_len` rows, `lengths[b]` of them real.
    pub fn padded(lengths: &[usize], seq_len: usize) -> Self {
        assert!(lengths.iter().all(|&l| l >= 1 && l <= seq_len));
        SeqLayout {
            starts: (0..lengths.len()).map(|b| (b * seq_len) as u32).collect(),
            rows: vec![seq_len as u32; lengths.len()],
            valid: lengths.iter().map(|&l| l as u32).collect(),
        }
    }

    /// A packed batch: sequences back to back, no padding rows.
    pub fn packed(lengths: &[usize]) -> Self {
        assert!(lengths.iter().all(|&l| l >= 1));
        let mut starts = Vec::with_capacity(lengths.len());
        let mut at = 0u32;
        for &l in lengths {
            starts.push(at);
            at += l as u32;
        }
        SeqLayout {
            starts,
            rows: lengths.iter().map(|&l| l as u32).collect(),
            valid: lengths.iter().map(|&l| l as u32).collect(),
        }
    }

    pub fn batch(&self) -> usize {
        self.starts.len()
    }

    /// Total rows of the batch's activations.
    pub fn total_rows(&self) -> usize {
        self.starts
            .iter()
            .zip(&self.rows)
            .map(|(&s, &r)| (s + r) as usize)
            .max()
            .unwrap_or(0)
    }

    /// Longest sequence (in rows), the bound attention kernels size their tiles by.
    pub fn max_rows(&self) -> usize {
        self.rows.iter().copied().max().unwrap_or(0) as usize
    }

    /// Whether the sequences lie back to back from row 0 in batch order, as every layout the
    /// model makes does (padded, packed, padded to buckets). The attention ops require it: a
    /// row in no sequence would be left unwritten by the GPU's backward, and rows in two
    /// sequences would be written by two blocks at once.
    pub fn is_back_to_back(&self) -> bool {
        let mut at = 0u64;
        self.starts.iter().zip(&self.rows).all(|(&s, &r)| {
            let here = u64::from(s) == at;
            at += u64::from(r);
            here
        })
    }
}

/// The dimensions of multi-head attention over a `[rows, 3·heads·head_dim]` QKV tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    pub heads: usize,
    pub head_dim: usize,
}

/// Counter-based dropout parameters: which random numbers an op uses, so that backward can
/// regenerate forward's mask instead of storing it. `p == 0` means no dropout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
    /// Distinguishes every dropout site in every step: see [`philox::stream_id`].
    pub stream: u64,
}

impl Dropout {
    pub const NONE: Dropout = Dropout {
        p: 0.0,
        seed: 0,
        stream: 0,
    };
    pub fn is_active(&self) -> bool {
        self.p > 0.0
    }
}

/// The residual add a LayerNorm starts with, fused into it: `sum = dropout(x) + residual`
/// (BERT's `LayerNorm(dropout(dense(h)) + input)`), so the dropped-out branch is never written
/// to memory. The dropout draws element `i` of `x` (its flat index), as `dropout_forward` over
/// `x` would: the fusion changes no bit.
#[derive(Clone, Copy)]
pub struct ResidualAdd<'a, T> {
    pub residual: &'a T,
    /// Where `s` is kept for backward.
    pub sum: &'a T,
    pub dropout: Dropout,
}

/// Backward of [`ResidualAdd`]'s dropped-out branch, fused into LayerNorm's backward:
/// `dx = dropout_backward(∂/∂sum)` with the forward's mask regenerated.
#[derive(Clone, Copy)]
pub struct BranchGrad<'a, T> {
    pub dx: &'a T,
    pub dropout: Dropout,
}

/// Hyper-parameters of one AdamW step, as `torch.optim.AdamW` applies them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    // f64, as the Python floats torch computes the step's scalars from.
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// 1-based step count (bias correction).
    pub step: u64,
}

/// One parameter tensor's share of an AdamW update.
pub struct AdamWTensor<'a, T> {
    pub param: &'a T,
    pub grad: &'a T,
    pub exp_avg: &'a T,
    pub exp_avg_sq: &'a T,
    /// 0 for the no-decay group (biases, LayerNorm weights).
    pub weight_decay: f64,
}

/// The ops the model and the trainer are written against.
///
/// Each op's math and memory layout is documented once, in the header comment of its CPU
/// reference (`cpu/<op family>.rs`) and its kernel (`kernels/<op family>.cu`).
pub trait Backend {
    /// A flat fp32 (or, on a GPU, reduced-precision) tensor, or a view into one.
    type Tensor: Clone;
    /// A flat tensor of `u32` indices (token ids, labels, positions).
    type Ids: Clone;

    fn name(&self) -> String;
    /// The format the dense layers' GEMMs read their operands in.
    fn matmul_precision(&self) -> MatmulPrecision;

    /// Peak device bytes allocated by this backend since it was created (or since the last
    /// [`Backend::reset_peak_memory`]), or `None` where the
    /// backend does not count them (the CPU backend: its memory is the process's, see the peak
    /// RSS in `bench::memory`).
    fn peak_memory_bytes(&self) -> Option<u64> {
        None
    }
    /// Starts [`Backend::peak_memory_bytes`] over from the memory held now.
    fn reset_peak_memory(&self) {}

    // ---- memory ----
    /// `len` fp32 zeros.
    fn zeros(&self, len: usize) -> Result<Self::Tensor>;
    /// `len` zeros stored as the dense layers' GEMMs read their operands
    /// ([`MatmulPrecision::storage_dtype`]): 16-bit under fp16/bf16, else fp32. For activations
    /// whose producer and readers all take such tensors (see [`Dtype`]): `linear_forward`'s `x`
    /// and `out`, `linear_backward`'s `x`, `activation_forward`'s `x` and `out`,
    /// `activation_backward`'s `x`, `layernorm_forward`'s `out_copy`, attention's `qkv` and
    /// `out` (forward and backward) where [`Backend::attention_rounding`] is 16-bit; and `view`,
    /// `len`, `dtype`, `download` (not `download_start`), `fill_zero` and `copy`.
    fn zeros_in_matmul_format(&self, len: usize) -> Result<Self::Tensor>;
    /// How `t`'s elements are stored.
    fn dtype(&self, t: &Self::Tensor) -> Dtype;
    /// The format attention rounds its matrix-product operands to at `head_dim`
    /// ([`attention_rounding`]; the CUDA backend on a GPU without tensor-core attention keeps
    /// fp32). Where it is 16-bit, attention takes a `qkv` and an `out` stored in the matmul
    /// format, and the model stores them so.
    fn attention_rounding(&self, head_dim: usize) -> MatmulPrecision {
        attention_rounding(self.matmul_precision(), head_dim)
    }
    /// Makes ready what ops over a batch of this layout read (the CUDA backend uploads its
    /// arrays), so that a [`Backend::run_region`] finds it there and copies nothing in.
    fn prepare_layout(&self, _layout: &SeqLayout) -> Result<()> {
        Ok(())
    }
    /// Makes ready, outside any region, a 16-bit copy of `params` (the model's one flat
    /// parameter tensor) for [`Backend::refresh_weight_copies`]: the CUDA backend under fp16/bf16
    /// GEMMs allocates it; others have nothing to do.
    fn prepare_weight_copies(&self, _params: &Self::Tensor) -> Result<()> {
        Ok(())
    }
    /// Casts `params` into the copy [`Backend::prepare_weight_copies`] made, for the dense
    /// layers' GEMMs of the [`Backend::run_region`] this is called in (before any GEMM of it; no
    /// op of a region writes the parameters): each weight is then cast once per region, not
    /// once per GEMM that reads it (forward, backward, every micro-batch). The copy is used
    /// until the region ends. Outside a region, or without a prepared copy, nothing changes:
    /// the GEMMs cast their operands per call, to the same bits (a copy's view may be less
    /// aligned than a fresh allocation, and cuBLAS may then sum in another order).
    fn refresh_weight_copies(&self, _params: &Self::Tensor) -> Result<()> {
        Ok(())
    }
    /// Runs `region`: device work with no host copy, read-back or synchronization inside, the
    /// same sequence of ops every time it runs under `key` (its shapes). The CUDA backend with
    /// graphs on runs it as a CUDA graph (captured the second time the key is seen, replayed
    /// with the changed arguments after that: `cuda/graph.rs`); others just run it. The region
    /// may run twice on one call (a graph that could not stand for it is dropped before
    /// anything was queued), so it must not change host state.
    fn run_region(&self, _key: &[u64], region: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        region()
    }
    /// Whether [`Backend::run_region`] records graphs: batches are then padded to a few
    /// sequence counts and row counts ([`Backend::pads_to_buckets`]), so that one graph serves
    /// many batches.
    fn runs_graphs(&self) -> bool {
        false
    }
    /// Whether the trainer and evaluation pad each batch to its buckets
    /// ([`crate::model::bert::HostBatch::pad_to_buckets`]): when graphs are on (and on a CPU
    /// backend asked to, to test that the padding changes no result).
    fn pads_to_buckets(&self) -> bool {
        self.runs_graphs()
    }
    fn upload(&self, data: &[f32]) -> Result<Self::Tensor>;
    fn upload_ids(&self, data: &[u32]) -> Result<Self::Ids>;
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// `len` elements of `t` starting at `offset`, sharing its storage.
    fn view(&self, t: &Self::Tensor, offset: usize, len: usize) -> Self::Tensor;
    fn len(&self, t: &Self::Tensor) -> usize;
    fn fill_zero(&self, t: &Self::Tensor) -> Result<()>;
    /// `dst = src`, between tensors of one type, or from fp32 into a 16-bit tensor (rounded to
    /// nearest even).
    fn copy(&self, dst: &Self::Tensor, src: &Self::Tensor) -> Result<()>;

    // ---- dense layers (matmul.rs) ----
    /// `out[rows, n] = x[rows, k] · w[n, k]ᵀ + bias[n]` (PyTorch's `nn.Linear`). `x` and `out`
    /// may be stored in the matmul format ([`Backend::zeros_in_matmul_format`]): a 16-bit `x`
    /// is read as it is (no cast), a 16-bit `out` gets the fp32 result rounded once.
    #[allow(clippy::too_many_arguments)]
    fn linear_forward(
        &self,
        out: &Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: &Self::Tensor,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()>;
    /// `dx (=|+=) dout · w`, `dw += doutᵀ · x`, `dbias += Σ_rows dout`. `x` may be stored in the
    /// matmul format; the gradients are fp32.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        dx: Option<&Self::Tensor>,
        dx_accumulate: bool,
        dw: &Self::Tensor,
        dbias: &Self::Tensor,
        dout: &Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Tensor,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()>;

    // ---- embeddings (embedding.rs) ----
    /// `out[r] = word[ids[r]] + position[positions[r]] + token_type[type_ids[r]]`.
    #[allow(clippy::too_many_arguments)]
    fn embeddings_forward(
        &self,
        out: &Self::Tensor,
        word: &Self::Tensor,
        position: &Self::Tensor,
        token_type: &Self::Tensor,
        ids: &Self::Ids,
        positions: &Self::Ids,
        type_ids: &Self::Ids,
        hidden: usize,
    ) -> Result<()>;
    /// Scatter-adds `dout` into the three tables; the row `padding_idx` of `dword` gets nothing
    /// (`nn.Embedding(padding_idx=…)`).
    #[allow(clippy::too_many_arguments)]
    fn embeddings_backward(
        &self,
        dword: &Self::Tensor,
        dposition: &Self::Tensor,
        dtoken_type: &Self::Tensor,
        dout: &Self::Tensor,
        ids: &Self::Ids,
        positions: &Self::Ids,
        type_ids: &Self::Ids,
        hidden: usize,
        padding_idx: Option<u32>,
    ) -> Result<()>;

    // ---- LayerNorm (layernorm.rs) ----
    /// `s = dropout(x) + residual` into `sum` (when `residual` is given; else `s = x`), then
    /// `out = (s − mean)·rstd·gamma + beta` per row (fp32), keeping `mean` and `rstd` for
    /// backward. `out_copy`, when given, is a 16-bit tensor that receives `out` rounded once to
    /// its type: the copy the dense layers reading `out` take as their GEMM operand (and keep
    /// for backward), written in the same pass, while the fp32 `out` feeds the next residual add.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: &Self::Tensor,
        out_copy: Option<&Self::Tensor>,
        mean: &Self::Tensor,
        rstd: &Self::Tensor,
        x: &Self::Tensor,
        residual: Option<ResidualAdd<'_, Self::Tensor>>,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()>;
    /// `dx` (overwritten) from `dout`, the normalized input `x` (the `sum` of a fused residual),
    /// `mean`, `rstd`; `dgamma`, `dbeta` accumulated. With `branch`, also the gradient of the
    /// dropped-out branch of a fused residual add: `branch.dx = dropout_backward(dx)` (`dx`
    /// itself is the residual's gradient).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dx: &Self::Tensor,
        dgamma: &Self::Tensor,
        dbeta: &Self::Tensor,
        dout: &Self::Tensor,
        x: &Self::Tensor,
        mean: &Self::Tensor,
        rstd: &Self::Tensor,
        gamma: &Self::Tensor,
        rows: usize,
        cols: usize,
        branch: Option<BranchGrad<'_, Self::Tensor>>,
    ) -> Result<()>;

    // ---- activations (activation.rs) ----
    /// `out = act(x)`. `x` and `out` are both fp32, or both stored in the matmul format.
    fn activation_forward(
        &self,
        out: &Self::Tensor,
        x: &Self::Tensor,
        act: Activation,
    ) -> Result<()>;
    /// `dx = dout·act'(x)`: `dx` and `dout` fp32, `x` fp32 or stored in the matmul format.
    fn activation_backward(
        &self,
        dx: &Self::Tensor,
        dout: &Self::Tensor,
        x: &Self::Tensor,
        act: Activation,
    ) -> Result<()>;
    /// `out = tanh(x)` (the pooler).
    fn tanh_forward(&self, out: &Self::Tensor, x: &Self::Tensor) -> Result<()>;
    /// `dx = dout·(1 − y²)` from the forward output `y`.
    fn tanh_backward(&self, dx: &Self::Tensor, dout: &Self::Tensor, y: &Self::Tensor)
        -> Result<()>;

    // ---- dropout (dropout.rs) ----
    /// `out = x·keep/(1−p)` with `keep` drawn from Philox at (seed, stream, element index).
    fn dropout_forward(&self, out: &Self::Tensor, x: &Self::Tensor, d: Dropout) -> Result<()>;
    /// `dx = dout·keep/(1−p)`, the same mask regenerated.
    fn dropout_backward(&self, dx: &Self::Tensor, dout: &Self::Tensor, d: Dropout) -> Result<()>;

    // ---- rows of sequences (gather.rs) ----
    /// `out[b] = x[starts[b]]`: the first token ([CLS]) of every sequence.
    fn gather_first_tokens(
        &self,
        out: &Self::Tensor,
        x: &Self::Tensor,
        layout: &SeqLayout,
        hidden: usize,
    ) -> Result<()>;
    /// `dx[starts[b]] += dout[b]` (adds into `dx`: the caller zeroes it first).
    fn scatter_first_tokens_backward(
        &self,
        dx: &Self::Tensor,
        dout: &Self::Tensor,
        layout: &SeqLayout,
        hidden: usize,
    ) -> Result<()>;

    // ---- attention (attention.rs) ----
    /// Multi-head self-attention over `qkv[rows, 3, heads, head_dim]`:
    /// `out[rows, heads, head_dim] = dropout(softmax(Q·Kᵀ/√d + mask))·V`, keys limited to each
    /// sequence's valid rows. Keeps `lse[rows, heads]` (the softmax log-sum-exp) for backward.
    /// `qkv` and `out` may be stored in the matmul format where [`Backend::attention_rounding`]
    /// is 16-bit (`out` then holds the fp32 result rounded once, as autocast stores SDPA's).
    fn attention_forward(
        &self,
        out: &Self::Tensor,
        lse: &Self::Tensor,
        qkv: &Self::Tensor,
        layout: &SeqLayout,
        dims: AttentionDims,
        dropout: Dropout,
    ) -> Result<()>;
    /// `dqkv` (overwritten) from `dout`, recomputing the probabilities from `qkv` and `lse`
    /// (and `rowsum(dout ∘ out)` from `out` as stored); `qkv` and `out` as
    /// [`Backend::attention_forward`] takes them, the rest fp32.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: &Self::Tensor,
        dout: &Self::Tensor,
        qkv: &Self::Tensor,
        out: &Self::Tensor,
        lse: &Self::Tensor,
        layout: &SeqLayout,
        dims: AttentionDims,
        dropout: Dropout,
    ) -> Result<()>;

    // ---- loss (loss.rs) ----
    /// Per-row softmax cross-entropy with label smoothing `ε`:
    /// `loss[r] = (1−ε)·(−log p[label]) + ε·mean_c(−log p[c])`; exactly 0 for a row labelled
    /// [`IGNORE_LABEL`].
    fn cross_entropy_forward(
        &self,
        losses: &Self::Tensor,
        logits: &Self::Tensor,
        labels: &Self::Ids,
        classes: usize,
        smoothing: f32,
    ) -> Result<()>;
    /// `dlogits[r] = scale·(softmax(logits[r]) − (1−ε)·onehot(label) − ε/C)`; exactly 0 for a
    /// row labelled [`IGNORE_LABEL`].
    fn cross_entropy_backward(
        &self,
        dlogits: &Self::Tensor,
        logits: &Self::Tensor,
        labels: &Self::Ids,
        classes: usize,
        smoothing: f32,
        scale: f32,
    ) -> Result<()>;
    /// Both of the above in one pass, the training step's loss and its gradient:
    /// `losses[r] = (1−ε)·(−log p[label]) + ε·mean_c(−log p[c])` and
    /// `dlogits[r] = scale·(softmax(logits[r]) − (1−ε)·onehot(label) − ε/C)`, the same values as
    /// [`Backend::cross_entropy_forward`] and [`Backend::cross_entropy_backward`] give, with one
    /// log-sum-exp per row where the two compute it twice.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_forward_backward(
        &self,
        losses: &Self::Tensor,
        dlogits: &Self::Tensor,
        logits: &Self::Tensor,
        labels: &Self::Ids,
        classes: usize,
        smoothing: f32,
        scale: f32,
    ) -> Result<()>;

    // ---- optimizer (optim.rs) ----
    /// `out[0] = Σ x²` (accumulated in f64 on the CPU, fp32 on the GPU).
    fn sum_squares(&self, out: &Self::Tensor, x: &Self::Tensor) -> Result<()>;
    /// `x *= min(1, max_norm / (√sumsq[0] + 1e-6))`, as `torch.nn.utils.clip_grad_norm_`.
    fn clip_by_global_norm(
        &self,
        x: &Self::Tensor,
        sumsq: &Self::Tensor,
        max_norm: f32,
    ) -> Result<()>;
    /// `x *= s[0]`, the factor read on the device (the fp16 loss scale).
    fn scale_by(&self, x: &Self::Tensor, s: &Self::Tensor) -> Result<()>;
    /// Loss-scale unscaling: `x *= 1/scale[0]` (the reciprocal in fp32), and `found_inf[0] = 1`
    /// when any result is inf or NaN (`found_inf` is set, never cleared: the caller zeroes it).
    fn unscale_and_check(
        &self,
        x: &Self::Tensor,
        scale: &Self::Tensor,
        found_inf: &Self::Tensor,
    ) -> Result<()>;
    /// `GradScaler`'s update of `state = [scale, growth_tracker]` after a step whose unscaled
    /// gradients had an inf/NaN when `found_inf[0] != 0`: on one, `scale *= backoff` and the
    /// tracker restarts; else the tracker counts the clean step, and at `growth_interval` the
    /// scale is multiplied by `growth` (kept when that is not finite in fp32) and the tracker
    /// restarts. All on the device, so the next step's loss scale needs no host round trip.
    fn update_loss_scale(
        &self,
        state: &Self::Tensor,
        found_inf: &Self::Tensor,
        growth: f32,
        backoff: f32,
        growth_interval: u32,
    ) -> Result<()>;
    /// One `torch.optim.AdamW` step over each tensor; nothing at all when `skip` is given and
    /// `skip[0] != 0` (an fp16 step whose gradients overflowed, decided on the device).
    fn adamw_update(
        &self,
        tensors: &[AdamWTensor<'_, Self::Tensor>],
        step: &AdamWStep,
        skip: Option<&Self::Tensor>,
    ) -> Result<()>;

    // ---- reading back without waiting for the queue ----
    /// A copy of `t` on its way to the host.
    type Pending;
    /// Starts copying `t` to the host, in queue order but without waiting: the copy is made
    /// once the work queued before it is done, and later work does not delay it.
    fn download_start(&self, t: &Self::Tensor) -> Result<Self::Pending>;
    /// Waits for a copy [`Backend::download_start`] started (only for it, not for the work
    /// queued after it) and returns the values.
    fn download_finish(&self, pending: Self::Pending) -> Result<Vec<f32>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf32_keeps_ten_mantissa_bits_rounding_ties_away() {
        let ulp = 2f32.powi(-10); // TF32's spacing in [1, 2)
        let r = |v: f32| MatmulPrecision::Tf32.round(v);
        assert_eq!(r(1.0 + ulp), 1.0 + ulp);
        assert_eq!(r(1.0 + ulp / 4.0), 1.0); // below half: down
        assert_eq!(r(1.0 + ulp / 2.0), 1.0 + ulp); // the tie: away from zero
        assert_eq!(r(-(1.0 + ulp / 2.0)), -(1.0 + ulp));
        assert_eq!(r(1.0 + 0.75 * ulp), 1.0 + ulp);
        assert_eq!(r(2.0 - ulp / 2.0), 2.0); // carries into the exponent
        assert_eq!(r(f32::MAX), f32::INFINITY);
        assert!(r(f32::NAN).is_nan());
        assert_eq!(r(f32::NEG_INFINITY), f32::NEG_INFINITY);
    }

    #[test]
    fn fp16_and_bf16_round_as_the_hardware_casts() {
        let h = |v: f32| MatmulPrecision::F16.round(v);
        assert_eq!(h(65504.0), 65504.0);
        assert_eq!(h(65520.0), f32::INFINITY); // the loss scaler's overflow
        assert_eq!(h(2f32.powi(-26)), 0.0); // below half the smallest subnormal
        assert_eq!(h(1.0 + 2f32.powi(-11)), 1.0); // tie to even
        let b = |v: f32| MatmulPrecision::Bf16.round(v);
        assert_eq!(b(1.0 + 2f32.powi(-8)), 1.0); // tie to even
        assert_eq!(b(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(b(1e30), half::bf16::from_f32(1e30).to_f32());
        assert_eq!(MatmulPrecision::F32.round(0.1), 0.1);
    }

    #[test]
    fn layouts_back_to_back_from_row_zero() {
        let layout = |starts: &[u32], rows: &[u32]| SeqLayout {
            starts: starts.to_vec(),
            rows: rows.to_vec(),
            valid: vec![1; rows.len()],
        };
        assert!(SeqLayout::padded(&[3, 1, 4], 5).is_back_to_back());
        assert!(SeqLayout::packed(&[3, 1, 4]).is_back_to_back());
        assert!(layout(&[], &[]).is_back_to_back());
        assert!(!layout(&[1], &[3]).is_back_to_back(), "a gap before");
        assert!(!layout(&[0, 4], &[3, 2]).is_back_to_back(), "a gap between");
        assert!(!layout(&[0, 2], &[3, 2]).is_back_to_back(), "an overlap");
        assert!(
            !layout(&[3, 0], &[2, 3]).is_back_to_back(),
            "out of batch order"
        );
    }

    #[test]
    fn precision_from_the_flags() {
        use MatmulPrecision::*;
        assert_eq!(MatmulPrecision::from_flags(false, false, false), F32);
        assert_eq!(MatmulPrecision::from_flags(true, false, true), F16);
        assert_eq!(MatmulPrecision::from_flags(false, true, true), Bf16);
        assert_eq!(MatmulPrecision::from_flags(false, false, true), Tf32);
    }
}
