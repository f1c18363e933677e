//! A tiny random BERT classifier and batches for tests that need no files.
#![allow(dead_code)]

use bertft_cuda::backend::philox::uniform;
use bertft_cuda::config::BertConfig;
use bertft_cuda::model::params::ParamLayout;

/// Odd sizes on purpose: hidden 20 (not a power of two), head dim 5, intermediate 33.
pub fn tiny_config(hidden_act: &str) -> BertConfig {
    BertConfig::from_json(&format!(
        r#"{{"vocab_size":40,"hidden_size":20,"num_attention_heads":4,"num_hidden_layers":2,
            "intermediate_size":33,"max_position_embeddings":16,"type_vocab_size":2,"num_labels":3,
            "hidden_act":"{hidden_act}","pad_token_id":0,"layer_norm_eps":1e-12,
            "hidden_dropout_prob":0.1,"attention_probs_dropout_prob":0.1}}"#
    ))
    .unwrap()
}

/// Uniform in [-scale, scale) from a seed (no shared RNG state between tests).
pub fn random_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    (0..n as u64)
        .map(|i| (uniform(seed, 99, i) * 2.0 - 1.0) * scale)
        .collect()
}

/// Random weights with LayerNorm gains around 1.
pub fn tiny_weights(cfg: &BertConfig, seed: u64) -> Vec<f32> {
    let layout = ParamLayout::new(cfg);
    let mut flat = random_vec(layout.total, seed, 0.3);
    for s in &layout.specs {
        if s.name.ends_with("LayerNorm.weight") {
            flat[s.offset..s.offset + s.len()]
                .iter_mut()
                .for_each(|v| *v += 1.0);
        }
    }
    flat
}

/// Four sequences of lengths 7, 3, 6, 1 (one pair) with labels.
pub fn tiny_batch() -> (Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<u32>) {
    let ids = vec![
        vec![2, 5, 9, 17, 3, 21, 3],
        vec![2, 33, 3],
        vec![2, 7, 8, 39, 12, 3],
        vec![2],
    ];
    let types = vec![vec![0, 0, 0, 0, 0, 1, 1], vec![0; 3], vec![0; 6], vec![0]];
    (ids, types, vec![2, 0, 1, 2])
}
