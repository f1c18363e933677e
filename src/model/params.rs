//! Where each parameter lives in the one flat buffer that holds them all.
//!
//! Weights, gradients and both AdamW moments share this layout, so one view of each buffer per
//! name, one global-norm reduction and one optimizer launch cover everything. Names are
//! `BertForSequenceClassification`'s. The query, key and value weights of a layer are adjacent
//! (and so are their biases), so that together they are the `[3·hidden, hidden]` weight of one
//! QKV GEMM.

use crate::backend::Backend;
use crate::config::BertConfig;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// The transformers name, e.g. `bert.encoder.layer.0.attention.self.query.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    /// In the Trainer's weight-decay group (everything but biases and LayerNorm weights).
    pub decay: bool,
}

impl ParamSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    pub specs: Vec<ParamSpec>,
    pub total: usize,
}

/// transformers' no-decay rule: biases and the weights of LayerNorm modules.
fn decays(name: &str) -> bool {
    !(name.ends_with("bias") || name.contains("LayerNorm"))
}

impl ParamLayout {
    pub fn new(cfg: &BertConfig) -> Self {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            (
                "bert.embeddings.word_embeddings.weight".into(),
                vec![cfg.vocab_size, h],
            ),
            (
                "bert.embeddings.position_embeddings.weight".into(),
                vec![cfg.max_position_embeddings, h],
            ),
            (
                "bert.embeddings.token_type_embeddings.weight".into(),
                vec![cfg.type_vocab_size, h],
            ),
            ("bert.embeddings.LayerNorm.weight".into(), vec![h]),
            ("bert.embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        for l in 0..cfg.num_hidden_layers {
            let p = format!("bert.encoder.layer.{l}");
            shapes.extend([
                (format!("{p}.attention.self.query.weight"), vec![h, h]),
                (format!("{p}.attention.self.key.weight"), vec![h, h]),
                (format!("{p}.attention.self.value.weight"), vec![h, h]),
                (format!("{p}.attention.self.query.bias"), vec![h]),
                (format!("{p}.attention.self.key.bias"), vec![h]),
                (format!("{p}.attention.self.value.bias"), vec![h]),
                (format!("{p}.attention.output.dense.weight"), vec![h, h]),
                (format!("{p}.attention.output.dense.bias"), vec![h]),
                (format!("{p}.attention.output.LayerNorm.weight"), vec![h]),
                (format!("{p}.attention.output.LayerNorm.bias"), vec![h]),
                (format!("{p}.intermediate.dense.weight"), vec![i, h]),
                (format!("{p}.intermediate.dense.bias"), vec![i]),
                (format!("{p}.output.dense.weight"), vec![h, i]),
                (format!("{p}.output.dense.bias"), vec![h]),
                (format!("{p}.output.LayerNorm.weight"), vec![h]),
                (format!("{p}.output.LayerNorm.bias"), vec![h]),
            ]);
        }
        shapes.extend([
            ("bert.pooler.dense.weight".into(), vec![h, h]),
            ("bert.pooler.dense.bias".into(), vec![h]),
            ("classifier.weight".into(), vec![cfg.num_labels(), h]),
            ("classifier.bias".into(), vec![cfg.num_labels()]),
        ]);
        let mut offset = 0;
        let specs = shapes
            .into_iter()
            .map(|(name, shape)| {
                let spec = ParamSpec {
                    decay: decays(&name),
                    name,
                    shape,
                    offset,
                };
                offset += spec.len();
                spec
            })
            .collect();
        ParamLayout {
            specs,
            total: offset,
        }
    }

    pub fn get(&self, name: &str) -> Option<&ParamSpec> {
        self.specs.iter().find(|s| s.name == name)
    }

    /// `(offset, length)` of the parameters from the first encoder layer (or the pooler) to the
    /// end: every weight a dense layer's GEMM reads (and the biases and LayerNorm parameters
    /// between them), not the embedding tables, which no GEMM reads.
    pub fn dense_range(&self) -> (usize, usize) {
        let start = self
            .specs
            .iter()
            .find(|s| s.name.starts_with("bert.encoder.") || s.name.starts_with("bert.pooler."))
            .map_or(self.total, |s| s.offset);
        (start, self.total - start)
    }

    fn range(&self, name: &str) -> (usize, usize) {
        let s = self
            .get(name)
            .unwrap_or_else(|| panic!("no parameter named {name}"));
        (s.offset, s.len())
    }

    /// Typed views of every parameter in `flat` (weights, gradients or an optimizer moment).
    pub fn views<B: Backend>(
        &self,
        backend: &B,
        flat: &B::Tensor,
        cfg: &BertConfig,
    ) -> BertTensors<B::Tensor> {
        let v = |name: &str| {
            let (o, n) = self.range(name);
            backend.view(flat, o, n)
        };
        // Views spanning several adjacent parameters (the fused QKV weight and bias).
        let span = |first: &str, count: usize| {
            let (o, n) = self.range(first);
            backend.view(flat, o, n * count)
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let p = format!("bert.encoder.layer.{l}");
                LayerTensors {
                    qkv_w: span(&format!("{p}.attention.self.query.weight"), 3),
                    qkv_b: span(&format!("{p}.attention.self.query.bias"), 3),
                    attn_out_w: v(&format!("{p}.attention.output.dense.weight")),
                    attn_out_b: v(&format!("{p}.attention.output.dense.bias")),
                    attn_ln_g: v(&format!("{p}.attention.output.LayerNorm.weight")),
                    attn_ln_b: v(&format!("{p}.attention.output.LayerNorm.bias")),
                    ffn_in_w: v(&format!("{p}.intermediate.dense.weight")),
                    ffn_in_b: v(&format!("{p}.intermediate.dense.bias")),
                    ffn_out_w: v(&format!("{p}.output.dense.weight")),
                    ffn_out_b: v(&format!("{p}.output.dense.bias")),
                    ffn_ln_g: v(&format!("{p}.output.LayerNorm.weight")),
                    ffn_ln_b: v(&format!("{p}.output.LayerNorm.bias")),
                }
            })
            .collect();
        BertTensors {
            word: v("bert.embeddings.word_embeddings.weight"),
            position: v("bert.embeddings.position_embeddings.weight"),
            token_type: v("bert.embeddings.token_type_embeddings.weight"),
            emb_ln_g: v("bert.embeddings.LayerNorm.weight"),
            emb_ln_b: v("bert.embeddings.LayerNorm.bias"),
            layers,
            pooler_w: v("bert.pooler.dense.weight"),
            pooler_b: v("bert.pooler.dense.bias"),
            classifier_w: v("classifier.weight"),
            classifier_b: v("classifier.bias"),
        }
    }
}

/// One encoder layer's parameters (or their gradients).
#[derive(Clone)]
pub struct LayerTensors<T> {
    /// `[3·hidden, hidden]`: query, key, value weights stacked.
    pub qkv_w: T,
    pub qkv_b: T,
    pub attn_out_w: T,
    pub attn_out_b: T,
    pub attn_ln_g: T,
    pub attn_ln_b: T,
    pub ffn_in_w: T,
    pub ffn_in_b: T,
    pub ffn_out_w: T,
    pub ffn_out_b: T,
    pub ffn_ln_g: T,
    pub ffn_ln_b: T,
}

/// Views of all parameters (or gradients) of a `BertForSequenceClassification`.
#[derive(Clone)]
pub struct BertTensors<T> {
    pub word: T,
    pub position: T,
    pub token_type: T,
    pub emb_ln_g: T,
    pub emb_ln_b: T,
    pub layers: Vec<LayerTensors<T>>,
    pub pooler_w: T,
    pub pooler_b: T,
    pub classifier_w: T,
    pub classifier_b: T,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dense_range_starts_after_the_embeddings() {
        let cfg = |layers: usize| {
            BertConfig::from_json(&format!(
                r#"{{"vocab_size":30,"hidden_size":12,"num_attention_heads":3,
                    "num_hidden_layers":{layers},"intermediate_size":20,
                    "max_position_embeddings":16,"num_labels":3}}"#
            ))
            .unwrap()
        };
        for layers in [0, 2] {
            let l = ParamLayout::new(&cfg(layers));
            let (start, len) = l.dense_range();
            assert_eq!(start + len, l.total);
            // Everything a GEMM reads is inside, and no embedding table is.
            for s in &l.specs {
                let inside = s.offset >= start;
                assert_eq!(
                    inside,
                    !s.name.starts_with("bert.embeddings."),
                    "{}",
                    s.name
                );
            }
        }
    }

    #[test]
    fn layout_is_contiguous_and_groups_decay() {
        let cfg = BertConfig::from_json(
            r#"{"vocab_size":30,"hidden_size":12,"num_attention_heads":3,"num_hidden_layers":2,
                "intermediate_size":20,"max_position_embeddings":16,"num_labels":3}"#,
        )
        .unwrap();
        let l = ParamLayout::new(&cfg);
        let mut at = 0;
        for s in &l.specs {
            assert_eq!(s.offset, at);
            at += s.len();
        }
        assert_eq!(at, l.total);
        assert_eq!(l.specs.len(), 5 + 2 * 16 + 4);
        let q = l
            .get("bert.encoder.layer.1.attention.self.query.weight")
            .unwrap();
        let k = l
            .get("bert.encoder.layer.1.attention.self.key.weight")
            .unwrap();
        assert_eq!(k.offset, q.offset + 144);
        assert!(
            q.decay
                && l.get("bert.embeddings.word_embeddings.weight")
                    .unwrap()
                    .decay
        );
        assert!(!l.get("bert.embeddings.LayerNorm.weight").unwrap().decay);
        assert!(!l.get("classifier.bias").unwrap().decay);
        assert_eq!(l.get("classifier.weight").unwrap().shape, vec![3, 12]);
    }
}
