//! Random initialization as transformers' `BertPreTrainedModel._init_weights` does it, drawn
//! from Philox so that a model is reproducible from its seed alone.
//!
//! Per module: Linear and Embedding weights ~ N(0, initializer_range), Linear biases 0,
//! LayerNorm weight 1 and bias 0, and the word embeddings' padding row (`padding_idx`) 0.
//! Parameter `i` of the [`ParamLayout`] draws from stream `INIT_STREAM_BASE | i`, so a pooler or
//! classifier head initialized while loading a checkpoint (`weights::load_weights`) gets the same
//! values as in a model initialized whole from the same seed and config.

use rayon::prelude::*;

use crate::backend::philox;
use crate::config::BertConfig;
use crate::model::params::{ParamLayout, ParamSpec};

/// Initialization streams live in the top half of Philox's stream space, so they can never meet a
/// dropout stream (`philox::stream_id` keeps those far below 2⁶³ for any realistic step count).
pub(crate) const INIT_STREAM_BASE: u64 = 1 << 63;

const WORD_EMBEDDINGS: &str = "bert.embeddings.word_embeddings.weight";

/// Every parameter of `layout` (built from `cfg`) freshly initialized under `seed`.
pub fn random_init(cfg: &BertConfig, layout: &ParamLayout, seed: u64) -> Vec<f32> {
    let mut flat = vec![0f32; layout.total];
    for (index, spec) in layout.specs.iter().enumerate() {
        let dst = &mut flat[spec.offset..spec.offset + spec.len()];
        init_param(dst, spec, index, cfg, seed);
    }
    flat
}

/// Parameter `spec` (number `index` in its layout) as `_init_weights` leaves it.
pub(crate) fn init_param(
    dst: &mut [f32],
    spec: &ParamSpec,
    index: usize,
    cfg: &BertConfig,
    seed: u64,
) {
    let name = spec.name.as_str();
    if name.ends_with("LayerNorm.weight") {
        dst.fill(1.0);
    } else if name.ends_with(".bias") {
        dst.fill(0.0);
    } else {
        fill_normal(
            dst,
            cfg.initializer_range,
            seed,
            INIT_STREAM_BASE | index as u64,
        );
        if name == WORD_EMBEDDINGS {
            // transformers' BertConfig defaults pad_token_id to 0 when config.json has none.
            let pad = cfg.pad_token_id.unwrap_or(0) as usize;
            let h = cfg.hidden_size;
            if let Some(row) = dst.get_mut(pad * h..(pad + 1) * h) {
                row.fill(0.0);
            }
        }
    }
}

/// N(0, std²) by Box–Muller: each Philox block's four uniforms give four normals. Blocks are
/// independent (counter-based), so they are drawn in parallel with the same result.
pub(crate) fn fill_normal(dst: &mut [f32], std: f32, seed: u64, stream: u64) {
    dst.par_chunks_mut(4)
        .enumerate()
        .for_each(|(block, chunk)| {
            let u = philox::uniform4(seed, stream, block as u64);
            let (z0, z1) = box_muller(u[0], u[1]);
            let (z2, z3) = box_muller(u[2], u[3]);
            for (d, z) in chunk.iter_mut().zip([z0, z1, z2, z3]) {
                *d = (z * std as f64) as f32;
            }
        });
}

/// Two independent standard normals from two uniforms in [0, 1).
fn box_muller(u1: f32, u2: f32) -> (f64, f64) {
    // 1 − u1 ∈ (0, 1], so the logarithm is finite.
    let r = (-2.0 * (1.0 - u1 as f64).ln()).sqrt();
    let theta = std::f64::consts::TAU * u2 as f64;
    (r * theta.cos(), r * theta.sin())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_config() -> BertConfig {
        BertConfig::from_json(
            r#"{"vocab_size":30,"hidden_size":12,"num_attention_heads":3,"num_hidden_layers":2,
                "intermediate_size":20,"max_position_embeddings":16,"pad_token_id":1,
                "initializer_range":0.5}"#,
        )
        .unwrap()
    }

    #[test]
    fn box_muller_gives_standard_normals() {
        let mut v = vec![0f32; 40_000];
        fill_normal(&mut v, 1.0, 11, INIT_STREAM_BASE);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let within_1sd = v.iter().filter(|x| x.abs() < 1.0).count() as f64 / n;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
        assert!(
            (within_1sd - 0.6827).abs() < 0.01,
            "P(|z|<1) = {within_1sd}"
        );
        assert!(v.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn follows_init_weights_per_module() {
        let cfg = small_config();
        let layout = ParamLayout::new(&cfg);
        let flat = random_init(&cfg, &layout, 7);
        let get = |name: &str| {
            let s = layout.get(name).unwrap();
            &flat[s.offset..s.offset + s.len()]
        };
        assert!(get("bert.embeddings.LayerNorm.weight")
            .iter()
            .all(|&x| x == 1.0));
        assert!(get("bert.encoder.layer.1.output.LayerNorm.bias")
            .iter()
            .all(|&x| x == 0.0));
        assert!(get("bert.encoder.layer.0.attention.self.query.bias")
            .iter()
            .all(|&x| x == 0.0));
        assert!(get("classifier.bias").iter().all(|&x| x == 0.0));

        // Word embeddings: normal, except the padding row (pad_token_id 1) which is zero.
        let word = get(WORD_EMBEDDINGS);
        assert!(word[12..24].iter().all(|&x| x == 0.0));
        assert!(word[..12].iter().all(|&x| x != 0.0));
        // Each weight is parameter i's stream scaled by initializer_range.
        let index = layout
            .specs
            .iter()
            .position(|s| s.name == "bert.encoder.layer.1.intermediate.dense.weight")
            .unwrap();
        let mut unit = vec![0f32; 240];
        fill_normal(&mut unit, 1.0, 7, INIT_STREAM_BASE | index as u64);
        let w = get("bert.encoder.layer.1.intermediate.dense.weight");
        for (a, b) in w.iter().zip(&unit) {
            assert!((a - b * 0.5).abs() < 1e-6);
        }
    }

    #[test]
    fn deterministic_per_seed() {
        let cfg = small_config();
        let layout = ParamLayout::new(&cfg);
        assert_eq!(random_init(&cfg, &layout, 3), random_init(&cfg, &layout, 3));
        assert_ne!(random_init(&cfg, &layout, 3), random_init(&cfg, &layout, 4));
    }

    #[test]
    fn bert_base_uncased_has_the_transformers_parameter_count() {
        // BertForSequenceClassification(BertConfig(num_labels=2)): sum(p.numel()) in
        // transformers 5.24 / torch 2.15.
        let cfg = BertConfig::builtin("bert-base-uncased").unwrap();
        assert_eq!(ParamLayout::new(&cfg).total, 109_483_778);
    }
}
