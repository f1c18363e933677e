//! Tokenization: `tokenizer.json` through the tokenizers crate, or BERT WordPiece from `vocab.txt`.
//!
//! Either way the output is what transformers' fast tokenizer gives with `truncation=True` and no
//! padding: `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, cut longest-first to `max_length`, with
//! token type 0 for the first segment and 1 for the second. Padding is the batcher's job.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::Value;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::utils::truncation::{
    truncate_encodings, TruncationDirection, TruncationParams, TruncationStrategy,
};
use tokenizers::{AddedToken, Encoding, PostProcessor, Tokenizer};

/// The files of a saved tokenizer, copied next to a saved model.
pub const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
];

const TOKENIZER_JSON: &str = "tokenizer.json";
const VOCAB_TXT: &str = "vocab.txt";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";

/// One tokenized example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

pub struct TextTokenizer {
    /// Built without truncation or padding: both depend on the call (see [`TextTokenizer::encode`]).
    inner: Tokenizer,
    pad_id: u32,
    /// Special tokens added around one segment, and around a pair.
    added_single: usize,
    added_pair: usize,
    files: Vec<PathBuf>,
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json`, or builds BERT's tokenizer from `dir/vocab.txt` (and
    /// `tokenizer_config.json`, `special_tokens_map.json` when present) as transformers' fast
    /// conversion does.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join(TOKENIZER_JSON);
        let vocab = dir.join(VOCAB_TXT);
        let settings = Settings::read(dir)?;
        let inner = if json.is_file() {
            from_tokenizer_json(&json)?
        } else if vocab.is_file() {
            from_vocab(&vocab, &settings)?
        } else {
            bail!(
                "{}: no {TOKENIZER_JSON} or {VOCAB_TXT} in this folder",
                dir.display()
            );
        };
        let source = if json.is_file() { json } else { vocab };
        let pad_id = inner.token_to_id(&settings.pad_token).ok_or_else(|| {
            anyhow!(
                "{}: the pad token {:?} is not in the vocabulary",
                source.display(),
                settings.pad_token
            )
        })?;
        let Some(processor) = inner.get_post_processor() else {
            bail!(
                "{}: no post_processor, so no [CLS]/[SEP] would be added",
                source.display()
            );
        };
        let (added_single, added_pair) =
            (processor.added_tokens(false), processor.added_tokens(true));
        let files = TOKENIZER_FILES
            .iter()
            .map(|f| dir.join(f))
            .filter(|p| p.is_file())
            .collect();
        Ok(TextTokenizer {
            inner,
            pad_id,
            added_single,
            added_pair,
            files,
        })
    }

    /// `[CLS] text [SEP] (pair [SEP])`, at most `max_length` tokens, cut longest-first.
    pub fn encode(&self, text: &str, pair: Option<&str>, max_length: usize) -> Result<Encoded> {
        let added = if pair.is_some() {
            self.added_pair
        } else {
            self.added_single
        };
        ensure!(
            max_length >= added,
            "max_length {max_length} cannot hold the {added} special tokens of {}",
            if pair.is_some() { "a pair" } else { "one text" }
        );
        let first = self.segment(text)?;
        let second = pair.map(|p| self.segment(p)).transpose()?;
        // What the tokenizers crate does with truncation set on the tokenizer, done per call so that
        // one tokenizer serves every max_length without being mutated.
        let params = TruncationParams {
            max_length: max_length - added,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        };
        let (mut first, mut second) = truncate_encodings(first, second, &params)
            .map_err(|e| anyhow!("cannot truncate: {e}"))?;
        // The cut-off tails are never used; post-processing them would be wasted work.
        first.take_overflowing();
        if let Some(s) = second.as_mut() {
            s.take_overflowing();
        }
        let encoding = self
            .inner
            .post_process(first, second, true)
            .map_err(|e| anyhow!("cannot add special tokens: {e}"))?;
        Ok(Encoded {
            ids: encoding.get_ids().to_vec(),
            type_ids: encoding.get_type_ids().to_vec(),
        })
    }

    /// [`TextTokenizer::encode`] over many examples, in parallel, in order.
    pub fn encode_batch(
        &self,
        items: &[(&str, Option<&str>)],
        max_length: usize,
    ) -> Result<Vec<Encoded>> {
        items
            .par_iter()
            .enumerate()
            .map(|(i, (text, pair))| {
                self.encode(text, *pair, max_length)
                    .with_context(|| format!("example {i}"))
            })
            .collect()
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The tokenizer files of the folder it was loaded from, to copy next to a saved model.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// One segment's tokens, before truncation and special tokens.
    fn segment(&self, text: &str) -> Result<Encoding> {
        self.inner
            .encode(text, false)
            .map_err(|e| anyhow!("cannot tokenize {text:?}: {e}"))
    }
}

fn from_tokenizer_json(path: &Path) -> Result<Tokenizer> {
    let mut tokenizer =
        Tokenizer::from_file(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    // The file's own padding and truncation (often fixed-length 128) would fight ours.
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(tokenizer)
}

/// transformers' `BertConverter`: BertNormalizer, BertPreTokenizer, WordPiece, BERT post-processing,
/// and the special tokens registered so that a literal "[SEP]" in text stays one token.
fn from_vocab(path: &Path, s: &Settings) -> Result<Tokenizer> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let vocab = WordPiece::read_bytes(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let id = |token: &str| {
        vocab.get(token).copied().ok_or_else(|| {
            anyhow!(
                "{}: the special token {token:?} is not in the vocabulary",
                path.display()
            )
        })
    };
    let (cls, sep) = (id(&s.cls_token)?, id(&s.sep_token)?);
    id(&s.pad_token)?;
    id(&s.unk_token)?;
    let has_mask = vocab.contains_key(&s.mask_token);
    let model = WordPiece::builder()
        .vocab(vocab)
        .unk_token(s.unk_token.clone())
        .continuing_subword_prefix("##".into())
        .max_input_chars_per_word(100)
        .build()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(BertNormalizer::new(
            true,
            s.tokenize_chinese_chars,
            s.strip_accents,
            s.do_lower_case,
        )))
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_post_processor(Some(BertProcessing::new(
        (s.sep_token.clone(), sep),
        (s.cls_token.clone(), cls),
    )));
    let mut specials = vec![&s.pad_token, &s.unk_token, &s.cls_token, &s.sep_token];
    if has_mask {
        specials.push(&s.mask_token);
    }
    tokenizer
        .add_special_tokens(
            specials
                .into_iter()
                .map(|t| AddedToken::from(t.clone(), true)),
        )
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(tokenizer)
}

/// What `tokenizer_config.json` and `special_tokens_map.json` say, with `BertTokenizer`'s defaults.
#[derive(Debug)]
struct Settings {
    do_lower_case: bool,
    tokenize_chinese_chars: bool,
    /// `None` follows `do_lower_case` (BertNormalizer's own rule).
    strip_accents: Option<bool>,
    unk_token: String,
    sep_token: String,
    pad_token: String,
    cls_token: String,
    mask_token: String,
}

#[derive(Deserialize, Default)]
struct RawSettings {
    do_lower_case: Option<bool>,
    tokenize_chinese_chars: Option<bool>,
    strip_accents: Option<bool>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

impl Settings {
    fn read(dir: &Path) -> Result<Self> {
        let config: RawSettings = read_json(&dir.join(TOKENIZER_CONFIG))?.unwrap_or_default();
        let map: serde_json::Map<String, Value> =
            read_json(&dir.join(SPECIAL_TOKENS_MAP))?.unwrap_or_default();
        // transformers lets special_tokens_map.json override tokenizer_config.json.
        let token = |key: &str, default: &str| {
            [map.get(key), config.rest.get(key)]
                .into_iter()
                .flatten()
                .find_map(token_content)
                .unwrap_or_else(|| default.to_string())
        };
        Ok(Settings {
            do_lower_case: config.do_lower_case.unwrap_or(true),
            tokenize_chinese_chars: config.tokenize_chinese_chars.unwrap_or(true),
            strip_accents: config.strip_accents,
            unk_token: token("unk_token", "[UNK]"),
            sep_token: token("sep_token", "[SEP]"),
            pad_token: token("pad_token", "[PAD]"),
            cls_token: token("cls_token", "[CLS]"),
            mask_token: token("mask_token", "[MASK]"),
        })
    }
}

/// A special token is saved either as its text or as an AddedToken object with a `content`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Parses an optional JSON file; a present but malformed one is an error naming it.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    // serde_json's message carries the line and column.
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| anyhow!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_tokens_are_text_or_added_token_objects() {
        assert_eq!(
            token_content(&serde_json::json!("[CLS]")),
            Some("[CLS]".into())
        );
        assert_eq!(
            token_content(&serde_json::json!({"content": "<s>", "lstrip": false})),
            Some("<s>".into())
        );
        assert_eq!(token_content(&Value::Null), None);
    }
}
