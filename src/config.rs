//! The model's `config.json`, read as transformers' `BertConfig` reads it.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::backend::Activation;

/// The fields of a BERT `config.json` this crate uses, with transformers' defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Activation,
    /// The `hidden_act` string as written, saved back unchanged.
    pub hidden_act_name: String,
    pub hidden_dropout_prob: f32,
    pub attention_probs_dropout_prob: f32,
    /// `None` means "use hidden_dropout_prob", as `BertForSequenceClassification` does.
    pub classifier_dropout: Option<f32>,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
    pub initializer_range: f32,
    pub pad_token_id: Option<u32>,
    /// Label names by id; `num_labels` is its length.
    pub id2label: Vec<String>,
    /// The whole file, so that saving keeps every field this struct does not model.
    pub raw: serde_json::Map<String, Value>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default = "default_model_type")]
    model_type: String,
    vocab_size: usize,
    #[serde(default = "d768")]
    hidden_size: usize,
    #[serde(default = "d12")]
    num_hidden_layers: usize,
    #[serde(default = "d12")]
    num_attention_heads: usize,
    #[serde(default = "d3072")]
    intermediate_size: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "d01")]
    hidden_dropout_prob: f32,
    #[serde(default = "d01")]
    attention_probs_dropout_prob: f32,
    #[serde(default)]
    classifier_dropout: Option<f32>,
    #[serde(default = "d512")]
    max_position_embeddings: usize,
    #[serde(default = "d2")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f32,
    #[serde(default = "default_init")]
    initializer_range: f32,
    #[serde(default)]
    pad_token_id: Option<u32>,
    #[serde(default = "default_pos")]
    position_embedding_type: String,
    #[serde(default)]
    id2label: Option<BTreeMap<String, String>>,
    #[serde(default)]
    num_labels: Option<usize>,
}

fn default_model_type() -> String {
    "bert".into()
}
fn d768() -> usize {
    768
}
fn d12() -> usize {
    12
}
fn d3072() -> usize {
    3072
}
fn default_act() -> String {
    "gelu".into()
}
fn d01() -> f32 {
    0.1
}
fn d512() -> usize {
    512
}
fn d2() -> usize {
    2
}
fn default_eps() -> f32 {
    1e-12
}
fn default_init() -> f32 {
    0.02
}
fn default_pos() -> String {
    "absolute".into()
}

/// Configs known by name, as their Hub `config.json` has them (the fields this crate reads), for
/// building a randomly initialized model without a folder (`bertft-cuda bench --config`).
const BUILTIN: &[(&str, &str)] = &[(
    "bert-base-uncased",
    r#"{"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "initializer_range": 0.02, "pad_token_id": 0, "position_embedding_type": "absolute"}"#,
)];

/// Model types whose weights and layer sequence are BERT's own.
const BERT_COMPATIBLE: &[&str] = &["bert"];

impl BertConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("{}", path.display()))
    }

    /// A built-in config by name (2 labels, as `BertConfig()` has).
    pub fn builtin(name: &str) -> Result<Self> {
        match BUILTIN.iter().find(|(n, _)| *n == name) {
            Some((_, json)) => Self::from_json(json),
            None => bail!(
                "no built-in config named {name:?} (built-in: {})",
                Self::builtin_names().join(", ")
            ),
        }
    }

    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _)| *n).collect()
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).context("invalid JSON")?;
        let Value::Object(raw) = value else {
            bail!("config is not a JSON object")
        };
        let c: RawConfig = serde_json::from_value(Value::Object(raw.clone()))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if !BERT_COMPATIBLE.contains(&c.model_type.as_str()) {
            bail!(
                "model_type {:?} is not supported (supported: {})",
                c.model_type,
                BERT_COMPATIBLE.join(", ")
            );
        }
        if c.position_embedding_type != "absolute" {
            bail!(
                "position_embedding_type {:?} is not supported (only \"absolute\")",
                c.position_embedding_type
            );
        }
        let hidden_act = match c.hidden_act.as_str() {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => bail!(
                "hidden_act {other:?} is not supported (supported: gelu, gelu_new, gelu_pytorch_tanh, relu)"
            ),
        };
        if c.num_attention_heads == 0 || c.hidden_size % c.num_attention_heads != 0 {
            bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size,
                c.num_attention_heads
            );
        }
        let id2label = match (&c.id2label, c.num_labels) {
            (Some(map), _) => {
                let mut labels = vec![None; map.len()];
                for (k, v) in map {
                    let id: usize = k
                        .parse()
                        .with_context(|| format!("id2label key {k:?} is not an integer"))?;
                    if id >= labels.len() {
                        bail!("id2label ids must be 0..{}, found {id}", map.len());
                    }
                    labels[id] = Some(v.clone());
                }
                labels.into_iter().map(|l| l.unwrap()).collect()
            }
            (None, n) => (0..n.unwrap_or(2)).map(|i| format!("LABEL_{i}")).collect(),
        };
        Ok(BertConfig {
            model_type: c.model_type,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            intermediate_size: c.intermediate_size,
            hidden_act,
            hidden_act_name: c.hidden_act,
            hidden_dropout_prob: c.hidden_dropout_prob,
            attention_probs_dropout_prob: c.attention_probs_dropout_prob,
            classifier_dropout: c.classifier_dropout,
            max_position_embeddings: c.max_position_embeddings,
            type_vocab_size: c.type_vocab_size,
            layer_norm_eps: c.layer_norm_eps,
            initializer_range: c.initializer_range,
            pad_token_id: c.pad_token_id,
            id2label,
            raw,
        })
    }

    pub fn num_labels(&self) -> usize {
        self.id2label.len()
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The dropout applied to the pooled output before the classifier.
    pub fn classifier_dropout_prob(&self) -> f32 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }

    /// Replaces the label set (ids in order), as fine-tuning on a new dataset does.
    pub fn set_labels(&mut self, id2label: Vec<String>) {
        self.id2label = id2label;
    }

    /// The `config.json` of a saved `BertForSequenceClassification`: the original fields, with
    /// the architecture, the labels and the problem type set.
    pub fn to_classifier_json(&self) -> String {
        let mut raw = self.raw.clone();
        raw.insert(
            "architectures".into(),
            serde_json::json!(["BertForSequenceClassification"]),
        );
        raw.insert("model_type".into(), Value::String(self.model_type.clone()));
        let id2label: serde_json::Map<String, Value> = self
            .id2label
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), Value::String(l.clone())))
            .collect();
        let label2id: serde_json::Map<String, Value> = self
            .id2label
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), Value::from(i)))
            .collect();
        raw.insert("id2label".into(), Value::Object(id2label));
        raw.insert("label2id".into(), Value::Object(label2id));
        raw.remove("num_labels");
        raw.insert(
            "problem_type".into(),
            Value::String("single_label_classification".into()),
        );
        serde_json::to_string_pretty(&Value::Object(raw)).expect("a JSON map always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINI: &str = r#"{"model_type":"bert","vocab_size":50,"hidden_size":12,"num_attention_heads":3,
        "num_hidden_layers":2,"intermediate_size":20,"hidden_act":"gelu_new",
        "id2label":{"1":"pos","0":"neg"}}"#;

    #[test]
    fn reads_fields_and_defaults() {
        let c = BertConfig::from_json(MINI).unwrap();
        assert_eq!(c.hidden_act, Activation::GeluTanh);
        assert_eq!(c.head_dim(), 4);
        assert_eq!(c.id2label, vec!["neg", "pos"]);
        assert_eq!(c.layer_norm_eps, 1e-12);
        assert_eq!(c.classifier_dropout_prob(), 0.1);
        assert_eq!(c.max_position_embeddings, 512);
    }

    #[test]
    fn builtin_bert_base_uncased() {
        let c = BertConfig::builtin("bert-base-uncased").unwrap();
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.num_attention_heads),
            (768, 12, 12)
        );
        assert_eq!((c.intermediate_size, c.vocab_size), (3072, 30522));
        assert_eq!((c.max_position_embeddings, c.type_vocab_size), (512, 2));
        assert_eq!(c.hidden_act, Activation::GeluErf);
        assert_eq!((c.layer_norm_eps, c.initializer_range), (1e-12, 0.02));
        assert_eq!(c.num_labels(), 2);
        let err = format!("{:#}", BertConfig::builtin("bert-large").unwrap_err());
        assert!(
            err.contains("bert-large") && err.contains("bert-base-uncased"),
            "{err}"
        );
    }

    #[test]
    fn num_labels_without_names() {
        let c = BertConfig::from_json(r#"{"vocab_size":5,"num_labels":3}"#).unwrap();
        assert_eq!(c.id2label, vec!["LABEL_0", "LABEL_1", "LABEL_2"]);
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        for (json, needle) in [
            (
                r#"{"vocab_size":5,"model_type":"gpt2"}"#,
                "model_type \"gpt2\"",
            ),
            (
                r#"{"vocab_size":5,"position_embedding_type":"relative_key"}"#,
                "relative_key",
            ),
            (r#"{"vocab_size":5,"hidden_act":"swish"}"#, "swish"),
            (
                r#"{"vocab_size":5,"hidden_size":10,"num_attention_heads":3}"#,
                "multiple",
            ),
        ] {
            let err = format!("{:#}", BertConfig::from_json(json).unwrap_err());
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn classifier_json_round_trips_labels() {
        let c = BertConfig::from_json(MINI).unwrap();
        let back = BertConfig::from_json(&c.to_classifier_json()).unwrap();
        assert_eq!(back.id2label, c.id2label);
        assert!(c
            .to_classifier_json()
            .contains("BertForSequenceClassification"));
    }
}
