//! The benchmark's data: fixed-length batches of random token ids, every position a real token
//! (no padding), drawn from Philox so that a run is reproducible from its seed.

use anyhow::Result;

use crate::backend::philox::uniform;
use crate::backend::Backend;
use crate::config::BertConfig;
use crate::model::bert::Batch;

/// Batch streams sit between the dropout streams (`philox::stream_id(step, site)`, below 2⁶²
/// for any realistic step count) and the initialization streams (from 2⁶³).
const BATCH_STREAM_BASE: u64 = 1 << 62;

/// The batch of step `step`: `batch` rows of `seq_len` ids that are never the padding id, token
/// type 0, uniform labels.
pub fn random_batch<B: Backend>(
    backend: &B,
    cfg: &BertConfig,
    batch: usize,
    seq_len: usize,
    seed: u64,
    step: u64,
) -> Result<Batch<B>> {
    let pad = cfg.pad_token_id.unwrap_or(0);
    let stream = BATCH_STREAM_BASE | (step << 1);
    let ids: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..seq_len)
                .map(|t| {
                    let u = uniform(seed, stream, (b * seq_len + t) as u64);
                    non_pad_id(u, cfg.vocab_size, pad)
                })
                .collect()
        })
        .collect();
    let labels: Vec<u32> = (0..batch)
        .map(|b| {
            let u = uniform(seed, stream | 1, b as u64);
            ((u * cfg.num_labels() as f32) as u32).min(cfg.num_labels() as u32 - 1)
        })
        .collect();
    let types = vec![vec![0u32; seq_len]; batch];
    let id_refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let type_refs: Vec<&[u32]> = types.iter().map(Vec::as_slice).collect();
    Batch::padded_to(backend, &id_refs, &type_refs, Some(&labels), pad, seq_len)
}

/// A uniform id among the vocabulary's, the padding id skipped (unless it is the only one).
fn non_pad_id(u: f32, vocab: usize, pad: u32) -> u32 {
    if vocab <= 1 {
        return 0;
    }
    let id = ((u * (vocab - 1) as f32) as u32).min(vocab as u32 - 2);
    if id >= pad {
        id + 1
    } else {
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn ids_cover_the_vocabulary_but_the_padding_id() {
        let seen: std::collections::BTreeSet<u32> = (0..1000)
            .map(|i| non_pad_id(i as f32 / 1000.0, 5, 2))
            .collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 1, 3, 4]);
        assert_eq!(non_pad_id(0.99999, 30522, 0), 30521);
    }

    #[test]
    fn full_length_rows_reproducible_per_seed_and_step() {
        let cfg = BertConfig::from_json(
            r#"{"vocab_size":30,"hidden_size":12,"num_attention_heads":3,"num_labels":3}"#,
        )
        .unwrap();
        let a = random_batch(&CpuBackend::FP32, &cfg, 3, 7, 42, 5).unwrap();
        let b = random_batch(&CpuBackend::FP32, &cfg, 3, 7, 42, 5).unwrap();
        let c = random_batch(&CpuBackend::FP32, &cfg, 3, 7, 42, 6).unwrap();
        assert_eq!(a.layout.valid, vec![7, 7, 7]);
        assert_eq!(a.ids, b.ids);
        assert_ne!(a.ids, c.ids);
        assert!(a.ids.iter().all(|&id| id != 0 && id < 30));
        assert!(a.host_labels.unwrap().iter().all(|&l| l < 3));
    }
}
