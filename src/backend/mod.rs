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

/// Where each sequence of a batch lives among the rows of a `[rows, hidden]` activation.
///
/// Sequence `b` occupies rows `starts[b] .. starts[b] + rows[b]`; its first `valid[b]` rows are
/// real tokens and the rest padding. Padding rows are computed like any other row (as
/// transformers does) but are never attended to. A padded batch has `rows[b] = seq_len`; a packed
/// batch has `rows[b] = valid[b]`.
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

    /// Peak device bytes allocated by this backend since it was created, or `None` where the
    /// backend does not count them: the CPU backend (its memory is the process's: see the peak
    /// RSS in `bench::memory`), and for now the CUDA backend, whose allocator's counter is still
    /// to come (until then it keeps this default).
    fn peak_memory_bytes(&self) -> Option<u64> {
        None
    }

    // ---- memory ----
    fn zeros(&self, len: usize) -> Result<Self::Tensor>;
    fn upload(&self, data: &[f32]) -> Result<Self::Tensor>;
    fn upload_ids(&self, data: &[u32]) -> Result<Self::Ids>;
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// `len` elements of `t` starting at `offset`, sharing its storage.
    fn view(&self, t: &Self::Tensor, offset: usize, len: usize) -> Self::Tensor;
    fn len(&self, t: &Self::Tensor) -> usize;
    fn fill_zero(&self, t: &Self::Tensor) -> Result<()>;
    fn copy(&self, dst: &Self::Tensor, src: &Self::Tensor) -> Result<()>;

    // ---- dense layers (matmul.rs) ----
    /// `out[rows, n] = x[rows, k] · w[n, k]ᵀ + bias[n]` (PyTorch's `nn.Linear`).
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
    /// `dx (=|+=) dout · w`, `dw += doutᵀ · x`, `dbias += Σ_rows dout`.
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
    /// `sum = a + b` (when `residual` is given as `(b, sum)`), then
    /// `out = (s − mean)·rstd·gamma + beta` per row, keeping `mean` and `rstd` for backward.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: &Self::Tensor,
        mean: &Self::Tensor,
        rstd: &Self::Tensor,
        x: &Self::Tensor,
        residual: Option<(&Self::Tensor, &Self::Tensor)>,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()>;
    /// `dx` (overwritten) from `dout`, the normalized input `x` (the `sum` of a fused residual),
    /// `mean`, `rstd`; `dgamma`, `dbeta` accumulated.
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
    ) -> Result<()>;

    // ---- activations (activation.rs) ----
    fn activation_forward(
        &self,
        out: &Self::Tensor,
        x: &Self::Tensor,
        act: Activation,
    ) -> Result<()>;
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
    fn attention_forward(
        &self,
        out: &Self::Tensor,
        lse: &Self::Tensor,
        qkv: &Self::Tensor,
        layout: &SeqLayout,
        dims: AttentionDims,
        dropout: Dropout,
    ) -> Result<()>;
    /// `dqkv` (overwritten) from `dout`, recomputing the probabilities from `qkv` and `lse`.
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
    /// `loss[r] = (1−ε)·(−log p[label]) + ε·mean_c(−log p[c])`.
    fn cross_entropy_forward(
        &self,
        losses: &Self::Tensor,
        logits: &Self::Tensor,
        labels: &Self::Ids,
        classes: usize,
        smoothing: f32,
    ) -> Result<()>;
    /// `dlogits[r] = scale·(softmax(logits[r]) − (1−ε)·onehot(label) − ε/C)`.
    fn cross_entropy_backward(
        &self,
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
    /// One `torch.optim.AdamW` step over each tensor.
    fn adamw_update(
        &self,
        tensors: &[AdamWTensor<'_, Self::Tensor>],
        step: &AdamWStep,
    ) -> Result<()>;
}
