//! The model FLOPs of a training step, the numerator of MFU (model FLOPs utilization).
//!
//! The standard count (Kaplan et al. 2020; PaLM's MFU, Chowdhery et al. 2022), per token:
//!
//! ```text
//! training FLOPs per token = 6·N_matmul + 12·layers·hidden·seq
//! ```
//!
//! - `N_matmul` ([`matmul_params`]): the weights of the matrix multiplications every token goes
//!   through, `layers·(4·hidden² + 2·hidden·intermediate)` (Q, K, V, attention output; the
//!   feed-forward pair). A multiply-add is 2 FLOPs and backward costs twice forward (the
//!   gradients of the input and of the weight), hence 2·3 = 6 per weight.
//! - Attention: per layer and token, QKᵀ and PV take 2·seq·hidden FLOPs each in forward
//!   (2·2·seq·hidden), ×3 for forward and backward: 12·seq·hidden per layer.
//!
//! Not counted, as in the usual estimate: embedding lookups (no multiplications), the pooler and
//! classifier (one token per sequence: under 0.01% of bert-base at seq 128), and element-wise work
//! (LayerNorm, GELU, softmax, dropout, AdamW). `benches/hf_reference.py` uses the same formula,
//! so both sides' MFU are comparable.

use crate::config::BertConfig;

/// Weights of the per-token matrix multiplications of the encoder (no biases, embeddings,
/// pooler or classifier).
pub fn matmul_params(cfg: &BertConfig) -> u64 {
    let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    cfg.num_hidden_layers as u64 * (4 * h * h + 2 * h * i)
}

/// Training (forward + backward) FLOPs per token at sequence length `seq_len`.
pub fn train_flops_per_token(cfg: &BertConfig, seq_len: usize) -> u64 {
    let attention = 12 * cfg.num_hidden_layers as u64 * cfg.hidden_size as u64 * seq_len as u64;
    6 * matmul_params(cfg) + attention
}

/// Training FLOPs of one step of `batch` sequences of `seq_len` tokens.
pub fn train_flops_per_step(cfg: &BertConfig, batch: usize, seq_len: usize) -> u64 {
    train_flops_per_token(cfg, seq_len) * (batch * seq_len) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bert-base at seq 128, by hand: per layer 4·768² + 2·768·3072 = 2,359,296 + 4,718,592
    /// = 7,077,888 weights, ×12 = 84,934,656; ×6 = 509,607,936; attention 12·12·768·128 =
    /// 14,155,776; total 523,763,712 FLOPs per token, ×32·128 tokens for a batch of 32.
    #[test]
    fn bert_base_at_seq_128_by_hand() {
        let cfg = BertConfig::builtin("bert-base-uncased").unwrap();
        assert_eq!(matmul_params(&cfg), 84_934_656);
        assert_eq!(train_flops_per_token(&cfg, 128), 523_763_712);
        assert_eq!(train_flops_per_step(&cfg, 32, 128), 523_763_712 * 4096);
    }
}
