//! The BERT sequence classifier's layer sequence, forward and backward, over [`Backend`].
//!
//! This is the one place that says which ops run in which order and which tensors are kept for
//! backward; every backend runs exactly this code. It follows transformers'
//! `BertForSequenceClassification`:
//!
//! ```text
//! x₀ = dropout(LN(word[ids] + position[pos] + token_type[types]))
//! per layer:  qkv = x·Wqkvᵀ + b               (one GEMM for Q, K and V)
//!             a   = attention(qkv)            (softmax(QKᵀ/√d + mask), dropout, ·V)
//!             h   = LN(dropout(a·Woᵀ + bo) + x)
//!             x'  = LN(dropout(act(h·W1ᵀ + b1)·W2ᵀ + b2) + h)
//! pooled = tanh(x_L[CLS]·Wpᵀ + bp);  logits = dropout(pooled)·Wcᵀ + bc
//! ```
//! Kept for backward (per layer): qkv, the attention output and its log-sum-exp, both residual
//! sums with their LayerNorm statistics, both LayerNorm outputs, the feed-forward
//! pre-activation and activation. Those that backward reads only as a GEMM operand or the
//! activation's input (the LayerNorm outputs, the feed-forward pre-activation and activation)
//! are stored as the GEMMs read their operands (16 bits under fp16/bf16, as autocast stores
//! the fp16 copy of a linear layer's input and its output: [`Storage::MatmulFormat`]), and so
//! is qkv where attention rounds it to that format anyway (the tensor-core attention, head dims
//! 32 and 64; [`Storage::of_qkv`]), and the attention output there (SDPA's output under
//! autocast is fp16 too); everything else is fp32. The residual stream itself stays
//! fp32: under fp16/bf16 each encoder LayerNorm writes its fp32 output, which the next residual
//! add reads, into one of two buffers shared by all layers (`Activations::stream`) and its
//! 16-bit copy, which is kept, in the same pass (the embeddings' output is cast after its
//! dropout). Dropout masks are regenerated, never stored; the
//! dropout of each residual block's branch is fused into the LayerNorm after it (`ResidualAdd`,
//! `BranchGrad`), so the dropped-out branch is never written.

use anyhow::{ensure, Result};

use crate::backend::philox::stream_id;
use crate::backend::{
    AttentionDims, Backend, BranchGrad, Dropout, Dtype, MatmulPrecision, ResidualAdd, SeqLayout,
    IGNORE_LABEL,
};
use crate::config::BertConfig;
use crate::model::params::{BertTensors, LayerTensors};

/// Whether dropout is on, and which random numbers it draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No dropout (evaluation, prediction).
    Eval,
    /// Dropout drawn from `seed` at micro-step `step` (each forward of a step differs).
    Train { seed: u64, step: u64 },
}

/// The row count a batch of `rows` rows is padded to when its steps run as CUDA graphs: the
/// next multiple of 64, or of an eighth of the power of two at or below `rows` when that is
/// larger. At most 12.5% of padding rows (beyond 64 of them), 8 shapes per octave of batch
/// size.
pub fn row_bucket(rows: usize) -> usize {
    if rows == 0 {
        return 0;
    }
    let octave = 1usize << (usize::BITS - 1 - rows.leading_zeros());
    rows.next_multiple_of((octave / 8).max(64))
}

/// The sequence count a batch of `n` sequences is padded to (with dummy sequences,
/// [`HostBatch::pad_sequences_to`]) when its steps run as CUDA graphs: the next multiple of 8,
/// or of an eighth of the power of two at or below `n` when that is larger.
///
/// The count is part of a graph's key because the pooler's and the classifier's GEMMs, the
/// `[CLS]` gather and the loss have one row per sequence (a cuBLAS call cannot be patched in a
/// graph), and with token-budget batches it changes almost every batch. A dummy sequence costs
/// one token row of the encoder (attending to itself only) and one row of those per-sequence
/// ops, far less than a real sequence (one or more rows, typically tens), so the bound can be
/// the same kind as [`row_bucket`]'s: at most 7 dummies below 64 sequences and 12.5% of the
/// sequences above, 8 shapes per octave of sequence count (a token-budget run whose batches hold
/// 40 to 120 sequences meets 11 of them). Multiples of 8 also keep the per-sequence GEMMs'
/// row count aligned for tensor cores. [`HostBatch::pad_to_buckets`] takes the bucket above a
/// full one when the rows need padding, so that a dummy, not a real sequence, takes them.
pub fn sequence_bucket(n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let octave = 1usize << (usize::BITS - 1 - n.leading_zeros());
    n.next_multiple_of((octave / 8).max(8))
}

/// The most rows one sequence may have, and the most sequences one batch may have: the attention
/// kernels index them in 16 bits (the CUDA backend's `check_layout`), so padding stops there.
pub const MAX_SEQUENCE_ROWS: usize = 65535;
pub const MAX_BATCH_SEQUENCES: usize = 65535;

/// A batch as the host builds it, before upload: token ids, positions and token type ids laid
/// out as `layout` says, and the labels. Plain vectors, so that it can be built on another
/// thread than the one that owns the backend (see `train::prefetch`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBatch {
    pub layout: SeqLayout,
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub labels: Option<Vec<u32>>,
    /// The sequences that are not dummies ([`HostBatch::pad_sequences_to`]): the first `real`
    /// of the layout.
    real: usize,
}

impl HostBatch {
    /// Sequences right-padded with `pad_id` to the longest of the batch, as transformers'
    /// dynamic padding does (positions 0.. on every row, padding rows of token type 0).
    pub fn padded(
        ids: &[&[u32]],
        type_ids: &[&[u32]],
        labels: Option<&[u32]>,
        pad_id: u32,
    ) -> Result<Self> {
        let seq_len = ids.iter().map(|s| s.len()).max().unwrap_or(0);
        Self::padded_to(ids, type_ids, labels, pad_id, seq_len)
    }

    /// As [`HostBatch::padded`], to a fixed `seq_len`.
    pub fn padded_to(
        ids: &[&[u32]],
        type_ids: &[&[u32]],
        labels: Option<&[u32]>,
        pad_id: u32,
        seq_len: usize,
    ) -> Result<Self> {
        ensure!(!ids.is_empty(), "empty batch");
        ensure!(
            ids.len() == type_ids.len(),
            "ids and token type ids differ in batch size"
        );
        for (i, (s, t)) in ids.iter().zip(type_ids).enumerate() {
            ensure!(
                !s.is_empty() && s.len() <= seq_len,
                "sequence {i} has {} tokens (limit {seq_len})",
                s.len()
            );
            ensure!(
                s.len() == t.len(),
                "sequence {i}: {} ids but {} token type ids",
                s.len(),
                t.len()
            );
        }
        let mut flat_ids = vec![pad_id; ids.len() * seq_len];
        let mut flat_types = vec![0u32; ids.len() * seq_len];
        for (b, (s, t)) in ids.iter().zip(type_ids).enumerate() {
            flat_ids[b * seq_len..][..s.len()].copy_from_slice(s);
            flat_types[b * seq_len..][..t.len()].copy_from_slice(t);
        }
        let positions: Vec<u32> = (0..ids.len()).flat_map(|_| 0..seq_len as u32).collect();
        let lengths: Vec<usize> = ids.iter().map(|s| s.len()).collect();
        Self::new(
            SeqLayout::padded(&lengths, seq_len),
            flat_ids,
            positions,
            flat_types,
            labels,
        )
    }

    /// Sequences back to back with no padding rows (the variable-length path).
    pub fn packed(ids: &[&[u32]], type_ids: &[&[u32]], labels: Option<&[u32]>) -> Result<Self> {
        ensure!(!ids.is_empty(), "empty batch");
        let lengths: Vec<usize> = ids.iter().map(|s| s.len()).collect();
        ensure!(lengths.iter().all(|&l| l > 0), "empty sequence in batch");
        let flat_ids: Vec<u32> = ids.concat();
        let flat_types: Vec<u32> = type_ids.concat();
        ensure!(
            flat_ids.len() == flat_types.len(),
            "ids and token type ids differ in length"
        );
        let positions: Vec<u32> = lengths.iter().flat_map(|&l| 0..l as u32).collect();
        Self::new(
            SeqLayout::packed(&lengths),
            flat_ids,
            positions,
            flat_types,
            labels,
        )
    }

    /// Pads the batch to `total_rows` rows (or until its last sequence has
    /// [`MAX_SEQUENCE_ROWS`]) by giving its last sequence that many more padding rows (`pad_id`,
    /// token type 0, position 0: any valid index, since a padding row is never attended to and
    /// its gradient is exactly zero). The loss and every gradient stay those of
    /// the unpadded batch up to fp32 summation order (the weight gradients' GEMMs and the
    /// reductions run over more rows, adding zeros); what changes is the shape, so that a CUDA
    /// graph made for [`row_bucket`]'s shape serves every batch of that bucket. The attention
    /// kernels then also compute the padding rows' queries of the last sequence (a batch with
    /// dummies spreads them over those instead, [`HostBatch::spread_rows_over_dummies`]).
    pub fn pad_rows_to(&mut self, total_rows: usize, pad_id: u32) {
        let rows = self.layout.total_rows();
        if total_rows <= rows || self.layout.batch() == 0 {
            return;
        }
        // The last sequence in row order (the packed and padded layouts keep batch order).
        let last = (0..self.layout.batch())
            .max_by_key(|&b| self.layout.starts[b] + self.layout.rows[b])
            .expect("a batch has a sequence");
        // Not past the rows a sequence may have (the attention kernels' limit): a batch that
        // big stops short of its bucket, a graph shape of its own.
        let room = MAX_SEQUENCE_ROWS.saturating_sub(self.layout.rows[last] as usize);
        let extra = (total_rows - rows).min(room);
        self.layout.rows[last] += extra as u32;
        let total_rows = rows + extra;
        self.ids.resize(total_rows, pad_id);
        self.type_ids.resize(total_rows, 0);
        self.positions.resize(total_rows, 0);
    }

    /// Pads the batch to `total` sequences by appending dummy sequences after its rows: each one
    /// token (`pad_id`, position 0, token type 0) labelled [`IGNORE_LABEL`] (when the batch has
    /// labels), so that its loss and gradient are exactly zero, and [`HostBatch::real_size`]
    /// still counts the sequences before them. Appended at the end, they change nothing of the
    /// real sequences: not their rows, not their batch indices, so not the attention they see
    /// nor the dropout they draw (Philox streams are indexed by element, and attention's by
    /// sequence, head and row within the sequence). What changes is the shape, so that a CUDA
    /// graph made for [`sequence_bucket`]'s shape serves every batch of that bucket.
    pub fn pad_sequences_to(&mut self, total: usize, pad_id: u32) {
        let n = self.layout.batch();
        if total <= n {
            return;
        }
        let rows = self.layout.total_rows();
        debug_assert_eq!(self.ids.len(), rows);
        for k in 0..total - n {
            self.layout.starts.push((rows + k) as u32);
            self.layout.rows.push(1);
            self.layout.valid.push(1);
        }
        let total_rows = rows + (total - n);
        self.ids.resize(total_rows, pad_id);
        self.type_ids.resize(total_rows, 0);
        self.positions.resize(total_rows, 0);
        if let Some(labels) = &mut self.labels {
            labels.resize(total, IGNORE_LABEL);
        }
    }

    /// Pads the batch to its buckets, as steps and evaluation batches that run as CUDA graphs
    /// are: first its sequences to their [`sequence_bucket`] (dummies, which count as rows),
    /// then its rows to [`row_bucket`], the padding rows spread over the dummies
    /// ([`HostBatch::spread_rows_over_dummies`]), so that the real sequences keep their shapes.
    /// A batch whose sequences are on a bucket but whose rows are not takes the bucket above,
    /// for dummies to take those rows; one on both buckets (fixed-length batches) is left as it
    /// is. The loss, the gradients and the real sequences' logits stay those of the unpadded
    /// batch (up to fp32 summation order of the weight gradients).
    pub fn pad_to_buckets(&mut self, pad_id: u32) {
        let (n, real, rows) = (self.size(), self.real, self.layout.total_rows());
        let mut sequences = sequence_bucket(real);
        if sequences == real && n == real && row_bucket(rows) != rows {
            sequences = sequence_bucket(real + 1);
        }
        // Not past the sequences a batch may have (the attention kernels' grid).
        self.pad_sequences_to(sequences.min(MAX_BATCH_SEQUENCES.max(n)), pad_id);
        self.spread_rows_over_dummies(row_bucket(self.layout.total_rows()), pad_id);
    }

    /// Pads the batch to `total_rows` rows by lengthening its dummy sequences (those after the
    /// real ones, laid out last) evenly, each by padding rows as [`HostBatch::pad_rows_to`]'s;
    /// without dummies, as [`HostBatch::pad_rows_to`]. Spread, not given to one sequence: the
    /// attention kernels' grid is sized by the longest sequence of the batch, so one long
    /// padding sequence would launch blocks for every sequence over its whole length (most of
    /// them exiting at once), and the dummies' rows are cheap (one valid key each).
    pub fn spread_rows_over_dummies(&mut self, total_rows: usize, pad_id: u32) {
        let (n, real, rows) = (self.layout.batch(), self.real, self.layout.total_rows());
        if n == real || total_rows <= rows {
            return self.pad_rows_to(total_rows, pad_id);
        }
        let (dummies, extra) = (n - real, total_rows - rows);
        let mut start = self.layout.starts[real] as usize;
        for (k, b) in (real..n).enumerate() {
            let more = extra / dummies + usize::from(k < extra % dummies);
            let len = (self.layout.rows[b] as usize + more).min(MAX_SEQUENCE_ROWS);
            self.layout.starts[b] = start as u32;
            self.layout.rows[b] = len as u32;
            start += len;
        }
        self.ids.resize(start, pad_id);
        self.type_ids.resize(start, 0);
        self.positions.resize(start, 0);
    }

    fn new(
        layout: SeqLayout,
        ids: Vec<u32>,
        positions: Vec<u32>,
        type_ids: Vec<u32>,
        labels: Option<&[u32]>,
    ) -> Result<Self> {
        if let Some(l) = labels {
            ensure!(
                l.len() == layout.batch(),
                "{} labels for {} sequences",
                l.len(),
                layout.batch()
            );
        }
        Ok(HostBatch {
            real: layout.batch(),
            layout,
            ids,
            positions,
            type_ids,
            labels: labels.map(<[u32]>::to_vec),
        })
    }

    /// Sequences in the layout, dummies included.
    pub fn size(&self) -> usize {
        self.layout.batch()
    }

    /// Sequences that are not dummies: the first `real_size()` of the layout.
    pub fn real_size(&self) -> usize {
        self.real
    }
}

/// One batch of token ids on the backend, with where each sequence lies.
pub struct Batch<B: Backend> {
    pub layout: SeqLayout,
    pub ids: B::Ids,
    pub positions: B::Ids,
    pub type_ids: B::Ids,
    pub labels: Option<B::Ids>,
    /// Host copy of the labels (loss reduction and metrics).
    pub host_labels: Option<Vec<u32>>,
    /// The largest position id (checked against the position table before use).
    pub max_position: u32,
    /// See [`Batch::real_size`].
    real: usize,
}

impl<B: Backend> Batch<B> {
    /// [`HostBatch::padded`], uploaded.
    pub fn padded(
        backend: &B,
        ids: &[&[u32]],
        type_ids: &[&[u32]],
        labels: Option<&[u32]>,
        pad_id: u32,
    ) -> Result<Self> {
        Self::upload(backend, HostBatch::padded(ids, type_ids, labels, pad_id)?)
    }

    /// [`HostBatch::padded_to`], uploaded.
    pub fn padded_to(
        backend: &B,
        ids: &[&[u32]],
        type_ids: &[&[u32]],
        labels: Option<&[u32]>,
        pad_id: u32,
        seq_len: usize,
    ) -> Result<Self> {
        let host = HostBatch::padded_to(ids, type_ids, labels, pad_id, seq_len)?;
        Self::upload(backend, host)
    }

    /// [`HostBatch::packed`], uploaded.
    pub fn packed(
        backend: &B,
        ids: &[&[u32]],
        type_ids: &[&[u32]],
        labels: Option<&[u32]>,
    ) -> Result<Self> {
        Self::upload(backend, HostBatch::packed(ids, type_ids, labels)?)
    }

    /// Copies a host batch to the backend.
    pub fn upload(backend: &B, host: HostBatch) -> Result<Self> {
        // Uploaded with the batch, not inside the step (a CUDA graph copies nothing in).
        backend.prepare_layout(&host.layout)?;
        let real = host.real_size();
        ensure!(
            real <= host.size(),
            "{real} real sequences in a batch of {}",
            host.size()
        );
        if let Some(labels) = &host.labels {
            ensure!(
                labels[real..].iter().all(|&l| l == IGNORE_LABEL),
                "a dummy sequence with a label the loss does not ignore"
            );
        }
        let max_position = host.positions.iter().copied().max().unwrap_or(0);
        Ok(Batch {
            max_position,
            ids: backend.upload_ids(&host.ids)?,
            positions: backend.upload_ids(&host.positions)?,
            type_ids: backend.upload_ids(&host.type_ids)?,
            labels: host
                .labels
                .as_deref()
                .map(|l| backend.upload_ids(l))
                .transpose()?,
            host_labels: host.labels,
            layout: host.layout,
            real,
        })
    }

    pub fn rows(&self) -> usize {
        self.layout.total_rows()
    }

    /// Sequences in the layout, dummies included (the shape ops run at).
    pub fn size(&self) -> usize {
        self.layout.batch()
    }

    /// Sequences that are not dummies ([`HostBatch::pad_sequences_to`]): the first
    /// `real_size()` of the layout, the ones the loss's mean counts and whose logits are kept.
    pub fn real_size(&self) -> usize {
        self.real
    }
}

/// What one encoder layer keeps from forward for backward. The LayerNorm outputs are kept in
/// the matmul format ([`Activations::stream`] holds their fp32 values while forward needs them).
pub struct LayerActs<T> {
    pub qkv: T,
    pub attn: T,
    pub attn_lse: T,
    pub attn_sum: T,
    pub attn_ln_mean: T,
    pub attn_ln_rstd: T,
    pub attn_ln_out: T,
    pub ffn_pre: T,
    pub ffn_act: T,
    pub ffn_sum: T,
    pub ffn_ln_mean: T,
    pub ffn_ln_rstd: T,
    /// The layer's output, as the next layer's GEMMs read it (with a stream: its 16-bit copy,
    /// not written for the last layer, whose output only the pooler reads, from the stream).
    pub ffn_ln_out: T,
}

/// How an activation buffer is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    F32,
    /// [`Backend::zeros_in_matmul_format`]: for a tensor only the ops that take 16-bit tensors
    /// touch (a dense layer's input or output, the activation's input or output, LayerNorm's
    /// copy of its output, attention's qkv and output where it rounds to 16 bits).
    MatmulFormat,
}

impl Storage {
    /// Where `qkv` and the attention output are kept: in the matmul format where `backend`'s
    /// attention rounds qkv to that format anyway (for qkv the same rounding model: on the CPU
    /// the same bits, on the GPU up to the QKV GEMM's summation order, its 16-bit output being
    /// another cuBLASLt plan; the output is what the attention-output GEMM reads rounded anyway,
    /// and backward's `rowsum(dO ∘ O)` reads it as stored, as FlashAttention-2 does), else fp32.
    pub fn of_qkv<B: Backend>(backend: &B, cfg: &BertConfig) -> Storage {
        match backend.attention_rounding(cfg.head_dim()) {
            MatmulPrecision::F32 => Storage::F32,
            _ => Storage::MatmulFormat,
        }
    }

    fn zeros<B: Backend>(self, backend: &B, len: usize) -> Result<B::Tensor> {
        match self {
            Storage::F32 => backend.zeros(len),
            Storage::MatmulFormat => backend.zeros_in_matmul_format(len),
        }
    }
}

/// Every buffer forward and backward use for one batch shape: allocated once, reused.
pub struct Activations<T> {
    pub rows: usize,
    pub batch: usize,
    pub emb_sum: T,
    pub emb_ln_mean: T,
    pub emb_ln_rstd: T,
    /// The embeddings' LayerNorm output before dropout (forward only): its own buffer where
    /// there is no stream, else `stream[1]` (unused until the first layer's attention block);
    /// see [`Activations::emb_ln_out`].
    emb_ln_out: Option<T>,
    /// The first layer's input (embeddings after dropout), as the LayerNorm outputs are kept:
    /// its 16-bit copy where there is a stream (the fp32 values in `stream[0]`).
    pub emb_out: T,
    pub layers: Vec<LayerActs<T>>,
    /// The residual stream in fp32 where the LayerNorm outputs are kept in 16 bits (`None` where
    /// the matmul format is fp32: the kept outputs are the stream): `[0]` holds a layer's input
    /// and then its output, `[1]` its attention block's output. Forward only.
    stream: Option<[T; 2]>,
    pub cls: T,
    pub pooled_pre: T,
    pub pooled: T,
    pub pooled_drop: T,
    pub logits: T,
    pub losses: T,
    // Scratch, not kept between forward and backward.
    /// A dense layer's output before the dropout fused into the next LayerNorm (forward), and
    /// that dropout's input gradient (backward).
    proj: T,
    g_hidden: [T; 3],
    g_qkv: T,
    g_inter: [T; 2],
    g_pool: [T; 3],
    g_logits: T,
}

impl<T: Clone> Activations<T> {
    /// Fresh buffers for `batch` sequences in `rows` rows.
    pub fn new<B: Backend<Tensor = T>>(
        backend: &B,
        cfg: &BertConfig,
        rows: usize,
        batch: usize,
    ) -> Result<Self> {
        Self::with_plan(backend, cfg, rows, batch, StoragePlan::of(backend, cfg))
    }

    /// As [`Activations::new`], stored as `plan` says (tests compare plans).
    pub fn with_plan<B: Backend<Tensor = T>>(
        backend: &B,
        cfg: &BertConfig,
        rows: usize,
        batch: usize,
        plan: StoragePlan,
    ) -> Result<Self> {
        Self::build(cfg, rows, batch, plan, |n, storage| {
            storage.zeros(backend, n)
        })
    }

    /// Every buffer, each of the length and storage `alloc` is asked for, in a fixed order (so
    /// that a second build can hand out views of a first one's buffers).
    fn build(
        cfg: &BertConfig,
        rows: usize,
        batch: usize,
        plan: StoragePlan,
        alloc: impl FnMut(usize, Storage) -> Result<T>,
    ) -> Result<Self> {
        let (h, i, heads) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
        );
        let alloc = std::cell::RefCell::new(alloc);
        let z = |n: usize| (alloc.borrow_mut())(n, Storage::F32);
        let z16 = |n: usize| (alloc.borrow_mut())(n, Storage::MatmulFormat);
        let zqkv = |n: usize| (alloc.borrow_mut())(n, plan.qkv);
        // The LayerNorm outputs (and the embeddings' dropped-out one): kept in the matmul
        // format beside an fp32 stream, or fp32 and the stream themselves.
        let zln = |n: usize| match plan.stream {
            true => z16(n),
            false => z(n),
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                Ok(LayerActs {
                    qkv: zqkv(rows * 3 * h)?,
                    attn: zqkv(rows * h)?,
                    attn_lse: z(rows * heads)?,
                    attn_sum: z(rows * h)?,
                    attn_ln_mean: z(rows)?,
                    attn_ln_rstd: z(rows)?,
                    attn_ln_out: zln(rows * h)?,
                    ffn_pre: z16(rows * i)?,
                    ffn_act: z16(rows * i)?,
                    ffn_sum: z(rows * h)?,
                    ffn_ln_mean: z(rows)?,
                    ffn_ln_rstd: z(rows)?,
                    ffn_ln_out: zln(rows * h)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Activations {
            rows,
            batch,
            emb_sum: z(rows * h)?,
            emb_ln_mean: z(rows)?,
            emb_ln_rstd: z(rows)?,
            emb_ln_out: match plan.stream {
                true => None,
                false => Some(z(rows * h)?),
            },
            emb_out: zln(rows * h)?,
            layers,
            stream: match plan.stream {
                true => Some([z(rows * h)?, z(rows * h)?]),
                false => None,
            },
            cls: z(batch * h)?,
            pooled_pre: z(batch * h)?,
            pooled: z(batch * h)?,
            pooled_drop: z(batch * h)?,
            logits: z(batch * cfg.num_labels())?,
            losses: z(batch)?,
            proj: z(rows * h)?,
            g_hidden: [z(rows * h)?, z(rows * h)?, z(rows * h)?],
            g_qkv: z(rows * 3 * h)?,
            g_inter: [z(rows * i)?, z(rows * i)?],
            g_pool: [z(batch * h)?, z(batch * h)?, z(batch * h)?],
            g_logits: z(batch * cfg.num_labels())?,
        })
    }

    /// The encoder's output `[rows, hidden]` after the last forward, in fp32.
    pub fn last_hidden_state(&self) -> &T {
        let kept = self
            .layers
            .last()
            .map(|l| &l.ffn_ln_out)
            .unwrap_or(&self.emb_out);
        self.normalized(kept, 0).0
    }

    /// The embeddings' LayerNorm output before dropout.
    fn emb_ln_out(&self) -> &T {
        match (&self.emb_ln_out, &self.stream) {
            (Some(own), _) => own,
            (None, Some(stream)) => &stream[1],
            (None, None) => {
                unreachable!("build gives emb_ln_out a buffer where there is no stream")
            }
        }
    }

    /// Where a LayerNorm (or the embeddings' dropout) whose output is kept as `kept` writes:
    /// the fp32 output the residual add after it reads, and the 16-bit copy, `kept` itself, when
    /// that is not the same tensor (`slot`: see [`Activations::stream`]).
    fn normalized<'a>(&'a self, kept: &'a T, slot: usize) -> (&'a T, Option<&'a T>) {
        match &self.stream {
            Some(stream) => (&stream[slot], Some(kept)),
            None => (kept, None),
        }
    }
}

/// How [`Activations`] stores the tensors whose storage depends on the backend and the model
/// (the feed-forward ones are always in the matmul format).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoragePlan {
    /// qkv and the attention output: [`Storage::of_qkv`].
    pub qkv: Storage,
    /// The LayerNorm outputs kept in the matmul format, with the fp32 residual stream in
    /// [`Activations::stream`]; only where that format is 16-bit (else they are the stream).
    pub stream: bool,
}

impl StoragePlan {
    /// What [`Activations::new`] uses.
    pub fn of<B: Backend>(backend: &B, cfg: &BertConfig) -> Self {
        StoragePlan {
            qkv: Storage::of_qkv(backend, cfg),
            stream: backend.matmul_precision().storage_dtype() != Dtype::F32,
        }
    }
}

/// One set of activation buffers sized for the largest batch seen, handed out as views for
/// each batch shape: with dynamic padding every batch has its own shape, and buffers per shape
/// would pile up.
pub struct ActivationArena<T> {
    capacity: (usize, usize),
    buffers: Vec<T>,
}

impl<T: Clone> Default for ActivationArena<T> {
    fn default() -> Self {
        ActivationArena {
            capacity: (0, 0),
            buffers: Vec::new(),
        }
    }
}

impl<T: Clone> ActivationArena<T> {
    /// Activations for `batch` sequences in `rows` rows: views of the arena's buffers, which
    /// grow (once, to the larger of each dimension) when the shape does not fit.
    pub fn get<B: Backend<Tensor = T>>(
        &mut self,
        backend: &B,
        cfg: &BertConfig,
        rows: usize,
        batch: usize,
    ) -> Result<Activations<T>> {
        let (cap_rows, cap_batch) = self.capacity;
        let plan = StoragePlan::of(backend, cfg);
        if rows > cap_rows || batch > cap_batch {
            let capacity = (rows.max(cap_rows), batch.max(cap_batch));
            self.buffers.clear();
            let buffers = &mut self.buffers;
            Activations::build(cfg, capacity.0, capacity.1, plan, |n, storage| {
                let t = storage.zeros(backend, n)?;
                buffers.push(t.clone());
                Ok(t)
            })?;
            self.capacity = capacity;
        }
        let mut next = self.buffers.iter();
        Activations::build(cfg, rows, batch, plan, |n, _| {
            let big = next.next().expect("the same buffers in the same order");
            Ok(backend.view(big, 0, n))
        })
    }
}

/// The dropout sites of the model, each drawing its own Philox stream.
#[derive(Clone, Copy)]
enum Site {
    Embeddings,
    AttentionProbs(usize),
    AttentionOutput(usize),
    FeedForwardOutput(usize),
    Classifier,
}

impl Site {
    fn id(self, layers: usize) -> u32 {
        (match self {
            Site::Embeddings => 0,
            Site::AttentionProbs(l) => 1 + 3 * l,
            Site::AttentionOutput(l) => 2 + 3 * l,
            Site::FeedForwardOutput(l) => 3 + 3 * l,
            Site::Classifier => 1 + 3 * layers,
        }) as u32
    }
}

/// The loss a backward pass differentiates: the mean cross-entropy over `normalizer` rows (the
/// real sequences of the whole accumulated batch — dummies, labelled [`IGNORE_LABEL`], add 0 and
/// are not counted — so micro-batches add up to one batch's gradient), times `loss_scale` (fp16
/// loss scaling; 1 otherwise).
#[derive(Clone, Copy, Debug)]
pub struct LossSpec {
    pub label_smoothing: f32,
    pub normalizer: usize,
    pub loss_scale: f32,
}

impl LossSpec {
    /// The mean over `normalizer` rows, unscaled.
    pub fn mean(label_smoothing: f32, normalizer: usize) -> Self {
        LossSpec {
            label_smoothing,
            normalizer,
            loss_scale: 1.0,
        }
    }

    /// The factor of each row's loss gradient: in fp32, as GradScaler's `loss * scale` is, then
    /// divided as the mean's backward does.
    fn grad_scale(&self) -> f32 {
        self.loss_scale / self.normalizer as f32
    }
}

/// The batch's labels, which a loss needs.
fn labels_of<B: Backend>(batch: &Batch<B>) -> Result<&B::Ids> {
    batch
        .labels
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the batch has no labels"))
}

/// The model over one backend: its config and its parameter views.
pub struct Bert<'a, B: Backend> {
    pub backend: &'a B,
    pub cfg: &'a BertConfig,
    pub weights: &'a BertTensors<B::Tensor>,
}

impl<B: Backend> Bert<'_, B> {
    fn dims(&self) -> (usize, usize, usize) {
        (
            self.cfg.hidden_size,
            self.cfg.intermediate_size,
            self.cfg.num_labels(),
        )
    }

    fn dropout(&self, mode: Mode, site: Site, p: f32) -> Dropout {
        match mode {
            Mode::Train { seed, step } if p > 0.0 => Dropout {
                p,
                seed,
                stream: stream_id(step, site.id(self.cfg.num_hidden_layers)),
            },
            _ => Dropout::NONE,
        }
    }

    fn attention_dims(&self) -> AttentionDims {
        AttentionDims {
            heads: self.cfg.num_attention_heads,
            head_dim: self.cfg.head_dim(),
        }
    }

    fn check_shape(&self, batch: &Batch<B>, acts: &Activations<B::Tensor>) -> Result<()> {
        ensure!(
            acts.rows == batch.rows() && acts.batch == batch.size(),
            "activations for {}×{} used with a batch of {} sequences in {} rows",
            acts.batch,
            acts.rows,
            batch.size(),
            batch.rows()
        );
        // Real tokens only: padding rows carry positions of their own (see
        // `HostBatch::pad_rows_to`), checked with the other indices.
        let longest = batch.layout.valid.iter().copied().max().unwrap_or(0) as usize;
        ensure!(
            longest <= self.cfg.max_position_embeddings,
            "a sequence of {longest} tokens exceeds max_position_embeddings {}",
            self.cfg.max_position_embeddings
        );
        ensure!(
            (batch.max_position as usize) < self.cfg.max_position_embeddings,
            "a sequence of {} rows exceeds max_position_embeddings {}",
            batch.max_position + 1,
            self.cfg.max_position_embeddings
        );
        Ok(())
    }

    /// Forward through the classifier: `acts.logits` holds `[batch, num_labels]` after it.
    pub fn forward(
        &self,
        batch: &Batch<B>,
        acts: &Activations<B::Tensor>,
        mode: Mode,
    ) -> Result<()> {
        self.check_shape(batch, acts)?;
        let (be, w, cfg) = (self.backend, self.weights, self.cfg);
        let (h, _, c) = self.dims();
        let (rows, n) = (batch.rows(), batch.size());
        let eps = cfg.layer_norm_eps;
        be.embeddings_forward(
            &acts.emb_sum,
            &w.word,
            &w.position,
            &w.token_type,
            &batch.ids,
            &batch.positions,
            &batch.type_ids,
            h,
        )?;
        be.layernorm_forward(
            acts.emb_ln_out(),
            None,
            &acts.emb_ln_mean,
            &acts.emb_ln_rstd,
            &acts.emb_sum,
            None,
            &w.emb_ln_g,
            &w.emb_ln_b,
            rows,
            h,
            eps,
        )?;
        let p_hidden = cfg.hidden_dropout_prob;
        let (emb_out, emb_copy) = acts.normalized(&acts.emb_out, 0);
        be.dropout_forward(
            emb_out,
            acts.emb_ln_out(),
            self.dropout(mode, Site::Embeddings, p_hidden),
        )?;
        // The first layer's GEMM operand: the embeddings' 16-bit copy, cast after the dropout
        // (the encoder's LayerNorms write theirs in the same pass instead).
        if let Some(copy) = emb_copy {
            be.copy(copy, emb_out)?;
        }
        let mut x = &acts.emb_out;
        for (l, (lw, la)) in w.layers.iter().zip(&acts.layers).enumerate() {
            self.layer_forward(l, lw, la, acts, x, &batch.layout, mode)?;
            x = &la.ffn_ln_out;
        }
        be.gather_first_tokens(&acts.cls, acts.last_hidden_state(), &batch.layout, h)?;
        be.linear_forward(
            &acts.pooled_pre,
            &acts.cls,
            &w.pooler_w,
            &w.pooler_b,
            n,
            h,
            h,
        )?;
        be.tanh_forward(&acts.pooled, &acts.pooled_pre)?;
        let p_cls = cfg.classifier_dropout_prob();
        be.dropout_forward(
            &acts.pooled_drop,
            &acts.pooled,
            self.dropout(mode, Site::Classifier, p_cls),
        )?;
        be.linear_forward(
            &acts.logits,
            &acts.pooled_drop,
            &w.classifier_w,
            &w.classifier_b,
            n,
            h,
            c,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: usize,
        w: &LayerTensors<B::Tensor>,
        a: &LayerActs<B::Tensor>,
        acts: &Activations<B::Tensor>,
        x: &B::Tensor,
        layout: &SeqLayout,
        mode: Mode,
    ) -> Result<()> {
        let (be, cfg) = (self.backend, self.cfg);
        let (h, i, _) = self.dims();
        let rows = layout.total_rows();
        let (eps, p_hidden) = (cfg.layer_norm_eps, cfg.hidden_dropout_prob);
        // `x` as the residual adds read it (fp32), and where the LayerNorms write.
        let x_f32 = acts.normalized(x, 0).0;
        let (attn_ln_f32, attn_ln_copy) = acts.normalized(&a.attn_ln_out, 1);
        let (ffn_ln_f32, ffn_ln_copy) = acts.normalized(&a.ffn_ln_out, 0);
        // The last layer's copy has no reader (backward reads each layer's input, the pooler
        // the fp32 stream): not written, its buffer left as it is.
        let ffn_ln_copy = ffn_ln_copy.filter(|_| l + 1 < cfg.num_hidden_layers);
        be.linear_forward(&a.qkv, x, &w.qkv_w, &w.qkv_b, rows, h, 3 * h)?;
        let attn_drop = self.dropout(
            mode,
            Site::AttentionProbs(l),
            cfg.attention_probs_dropout_prob,
        );
        be.attention_forward(
            &a.attn,
            &a.attn_lse,
            &a.qkv,
            layout,
            self.attention_dims(),
            attn_drop,
        )?;
        be.linear_forward(
            &acts.proj,
            &a.attn,
            &w.attn_out_w,
            &w.attn_out_b,
            rows,
            h,
            h,
        )?;
        // attn_sum = dropout(proj) + x, fused into the LayerNorm.
        be.layernorm_forward(
            attn_ln_f32,
            attn_ln_copy,
            &a.attn_ln_mean,
            &a.attn_ln_rstd,
            &acts.proj,
            Some(ResidualAdd {
                residual: x_f32,
                sum: &a.attn_sum,
                dropout: self.dropout(mode, Site::AttentionOutput(l), p_hidden),
            }),
            &w.attn_ln_g,
            &w.attn_ln_b,
            rows,
            h,
            eps,
        )?;
        be.linear_forward(
            &a.ffn_pre,
            &a.attn_ln_out,
            &w.ffn_in_w,
            &w.ffn_in_b,
            rows,
            h,
            i,
        )?;
        be.activation_forward(&a.ffn_act, &a.ffn_pre, cfg.hidden_act)?;
        be.linear_forward(
            &acts.proj,
            &a.ffn_act,
            &w.ffn_out_w,
            &w.ffn_out_b,
            rows,
            i,
            h,
        )?;
        // ffn_sum = dropout(proj) + attn_ln_out, fused into the LayerNorm. It overwrites the
        // stream's x, which nothing reads any more.
        be.layernorm_forward(
            ffn_ln_f32,
            ffn_ln_copy,
            &a.ffn_ln_mean,
            &a.ffn_ln_rstd,
            &acts.proj,
            Some(ResidualAdd {
                residual: attn_ln_f32,
                sum: &a.ffn_sum,
                dropout: self.dropout(mode, Site::FeedForwardOutput(l), p_hidden),
            }),
            &w.ffn_ln_g,
            &w.ffn_ln_b,
            rows,
            h,
            eps,
        )
    }

    /// Per-row losses of the last forward into `acts.losses` (left on the device).
    pub fn compute_losses(
        &self,
        batch: &Batch<B>,
        acts: &Activations<B::Tensor>,
        label_smoothing: f32,
    ) -> Result<()> {
        self.backend.cross_entropy_forward(
            &acts.losses,
            &acts.logits,
            labels_of(batch)?,
            self.cfg.num_labels(),
            label_smoothing,
        )
    }

    /// Per-row losses of the last forward into `acts.losses` and their gradient, that of
    /// `loss`, into `acts.g_logits`, in one pass (the training step's loss and the start of its
    /// backward): then [`Bert::backward_from_logits_grad`].
    pub fn compute_losses_and_grad(
        &self,
        batch: &Batch<B>,
        acts: &Activations<B::Tensor>,
        loss: LossSpec,
    ) -> Result<()> {
        self.backend.cross_entropy_forward_backward(
            &acts.losses,
            &acts.g_logits,
            &acts.logits,
            labels_of(batch)?,
            self.cfg.num_labels(),
            loss.label_smoothing,
            loss.grad_scale(),
        )
    }

    /// Per-row losses of the last forward into `acts.losses`; returns them on the host.
    pub fn losses(
        &self,
        batch: &Batch<B>,
        acts: &Activations<B::Tensor>,
        label_smoothing: f32,
    ) -> Result<Vec<f32>> {
        self.compute_losses(batch, acts, label_smoothing)?;
        self.backend.download(&acts.losses)
    }

    /// Backward from the loss of the last forward (same `batch`, `acts`, `mode`), accumulating
    /// every parameter's gradient into `grads`.
    pub fn backward(
        &self,
        grads: &BertTensors<B::Tensor>,
        batch: &Batch<B>,
        acts: &Activations<B::Tensor>,
        mode: Mode,
        loss: LossSpec,
    ) -> Result<()> {
        self.check_shape(batch, acts)?;
        self.backend.cross_entropy_backward(
            &acts.g_logits,
            &acts.logits,
            labels_of(batch)?,
            self.cfg.num_labels(),
            loss.label_smoothing,
            loss.grad_scale(),
        )?;
        self.backward_with(grads, batch, acts, mode, None)
    }

    /// Backward from the loss gradient that [`Bert::compute_losses_and_grad`] left in
    /// `acts.g_logits` (same `batch`, `acts`, `mode` as the forward), multiplied by `scale[0]`
    /// when given, a factor held on the device (the fp16 loss scale, which the host does not
    /// wait to learn); accumulates every parameter's gradient into `grads`.
    pub fn backward_from_logits_grad(
        &self,
        grads: &BertTensors<B::Tensor>,
        batch: &Batch<B>,
        acts: &Activations<B::Tensor>,
        mode: Mode,
        device_scale: Option<&B::Tensor>,
    ) -> Result<()> {
        self.check_shape(batch, acts)?;
        self.backward_with(grads, batch, acts, mode, device_scale)
    }

    /// Backward from the loss gradient in `acts.g_logits` (shapes already checked).
    fn backward_with(
        &self,
        grads: &BertTensors<B::Tensor>,
        batch: &Batch<B>,
        acts: &Activations<B::Tensor>,
        mode: Mode,
        device_scale: Option<&B::Tensor>,
    ) -> Result<()> {
        let (be, w, cfg) = (self.backend, self.weights, self.cfg);
        let (h, _, c) = self.dims();
        let (rows, n) = (batch.rows(), batch.size());
        if let Some(s) = device_scale {
            // (p − y)·fl(1/N)·2^k: the same bits as torch's (p − y)·fl(2^k/N) for a power-of-two
            // scale, unless (p − y)/N is subnormal.
            be.scale_by(&acts.g_logits, s)?;
        }
        let [g_pool_drop, g_pooled, g_cls] = &acts.g_pool;
        be.linear_backward(
            Some(g_pool_drop),
            false,
            &grads.classifier_w,
            &grads.classifier_b,
            &acts.g_logits,
            &acts.pooled_drop,
            &w.classifier_w,
            n,
            h,
            c,
        )?;
        let p_cls = cfg.classifier_dropout_prob();
        be.dropout_backward(
            g_pooled,
            g_pool_drop,
            self.dropout(mode, Site::Classifier, p_cls),
        )?;
        be.tanh_backward(g_pool_drop, g_pooled, &acts.pooled)?;
        be.linear_backward(
            Some(g_cls),
            false,
            &grads.pooler_w,
            &grads.pooler_b,
            g_pool_drop,
            &acts.cls,
            &w.pooler_w,
            n,
            h,
            h,
        )?;

        // g_out: gradient of the current layer's output; the other two buffers are scratch.
        let [mut g_out, mut g_in, mut g_tmp] =
            [&acts.g_hidden[0], &acts.g_hidden[1], &acts.g_hidden[2]];
        be.fill_zero(g_out)?;
        be.scatter_first_tokens_backward(g_out, g_cls, &batch.layout, h)?;
        for l in (0..cfg.num_hidden_layers).rev() {
            let x = if l == 0 {
                &acts.emb_out
            } else {
                &acts.layers[l - 1].ffn_ln_out
            };
            self.layer_backward(
                l,
                &grads.layers[l],
                acts,
                x,
                g_out,
                g_in,
                g_tmp,
                &batch.layout,
                mode,
            )?;
            // The layer's input gradient (in g_in) is the output gradient of the layer below.
            (g_out, g_in, g_tmp) = (g_in, g_out, g_tmp);
        }
        be.dropout_backward(
            g_in,
            g_out,
            self.dropout(mode, Site::Embeddings, cfg.hidden_dropout_prob),
        )?;
        be.layernorm_backward(
            g_tmp,
            &grads.emb_ln_g,
            &grads.emb_ln_b,
            g_in,
            &acts.emb_sum,
            &acts.emb_ln_mean,
            &acts.emb_ln_rstd,
            &w.emb_ln_g,
            rows,
            h,
            None,
        )?;
        be.embeddings_backward(
            &grads.word,
            &grads.position,
            &grads.token_type,
            g_tmp,
            &batch.ids,
            &batch.positions,
            &batch.type_ids,
            h,
            cfg.pad_token_id,
        )
    }

    /// One layer backward: from `g_out` (gradient of the layer's output) to `g_in` (of its
    /// input `x`), accumulating the layer's parameter gradients. `g_tmp` is scratch.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: usize,
        g: &LayerTensors<B::Tensor>,
        acts: &Activations<B::Tensor>,
        x: &B::Tensor,
        g_out: &B::Tensor,
        g_in: &B::Tensor,
        g_tmp: &B::Tensor,
        layout: &SeqLayout,
        mode: Mode,
    ) -> Result<()> {
        let (be, cfg) = (self.backend, self.cfg);
        let (w, a) = (&self.weights.layers[l], &acts.layers[l]);
        let (h, i, _) = self.dims();
        let rows = layout.total_rows();
        let p_hidden = cfg.hidden_dropout_prob;
        let [g_act, g_pre] = &acts.g_inter;

        // Feed-forward block: x' = LN(dropout(W2·act(W1·h)) + h).
        // g_tmp = ∂/∂ffn_sum, which is also the residual branch's share of ∂/∂h; proj = the
        // dropout's backward of it (fused).
        be.layernorm_backward(
            g_tmp,
            &g.ffn_ln_g,
            &g.ffn_ln_b,
            g_out,
            &a.ffn_sum,
            &a.ffn_ln_mean,
            &a.ffn_ln_rstd,
            &w.ffn_ln_g,
            rows,
            h,
            Some(BranchGrad {
                dx: &acts.proj,
                dropout: self.dropout(mode, Site::FeedForwardOutput(l), p_hidden),
            }),
        )?;
        be.linear_backward(
            Some(g_act),
            false,
            &g.ffn_out_w,
            &g.ffn_out_b,
            &acts.proj,
            &a.ffn_act,
            &w.ffn_out_w,
            rows,
            i,
            h,
        )?;
        be.activation_backward(g_pre, g_act, &a.ffn_pre, cfg.hidden_act)?;
        // g_tmp += W1ᵀ-path: now the whole ∂/∂h.
        be.linear_backward(
            Some(g_tmp),
            true,
            &g.ffn_in_w,
            &g.ffn_in_b,
            g_pre,
            &a.attn_ln_out,
            &w.ffn_in_w,
            rows,
            h,
            i,
        )?;

        // Attention block: h = LN(dropout(Wo·attn(Wqkv·x)) + x).
        // g_in = ∂/∂attn_sum, the residual branch's share of ∂/∂x; proj = the dropout's
        // backward of it (fused).
        be.layernorm_backward(
            g_in,
            &g.attn_ln_g,
            &g.attn_ln_b,
            g_tmp,
            &a.attn_sum,
            &a.attn_ln_mean,
            &a.attn_ln_rstd,
            &w.attn_ln_g,
            rows,
            h,
            Some(BranchGrad {
                dx: &acts.proj,
                dropout: self.dropout(mode, Site::AttentionOutput(l), p_hidden),
            }),
        )?;
        be.linear_backward(
            Some(g_tmp),
            false,
            &g.attn_out_w,
            &g.attn_out_b,
            &acts.proj,
            &a.attn,
            &w.attn_out_w,
            rows,
            h,
            h,
        )?;
        let attn_drop = self.dropout(
            mode,
            Site::AttentionProbs(l),
            cfg.attention_probs_dropout_prob,
        );
        be.attention_backward(
            &acts.g_qkv,
            g_tmp,
            &a.qkv,
            &a.attn,
            &a.attn_lse,
            layout,
            self.attention_dims(),
            attn_drop,
        )?;
        be.linear_backward(
            Some(g_in),
            true,
            &g.qkv_w,
            &g.qkv_b,
            &acts.g_qkv,
            x,
            &w.qkv_w,
            rows,
            h,
            3 * h,
        )
    }
}
