//! A dataset tokenized once up front: token ids, token type ids and label ids per row.

use anyhow::{Context, Result};

use crate::data::tokenize::TextTokenizer;

/// Some rows of a set: token ids, token type ids, and labels when the set has them.
pub type Rows<'a> = (Vec<&'a [u32]>, Vec<&'a [u32]>, Option<Vec<u32>>);

pub struct EncodedSet {
    pub ids: Vec<Vec<u32>>,
    pub type_ids: Vec<Vec<u32>>,
    pub labels: Option<Vec<u32>>,
}

impl EncodedSet {
    /// Tokenizes `texts` (with `pairs`) truncated to `max_length` tokens.
    pub fn encode(
        tokenizer: &TextTokenizer,
        texts: &[String],
        pairs: Option<&[String]>,
        labels: Option<Vec<u32>>,
        max_length: usize,
    ) -> Result<Self> {
        let items: Vec<(&str, Option<&str>)> = match pairs {
            Some(p) => texts
                .iter()
                .zip(p)
                .map(|(t, p)| (t.as_str(), Some(p.as_str())))
                .collect(),
            None => texts.iter().map(|t| (t.as_str(), None)).collect(),
        };
        let encoded = tokenizer
            .encode_batch(&items, max_length)
            .context("tokenizing")?;
        let (ids, type_ids) = encoded.into_iter().map(|e| (e.ids, e.type_ids)).unzip();
        Ok(EncodedSet {
            ids,
            type_ids,
            labels,
        })
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Token counts per row (for length-grouped sampling).
    pub fn lengths(&self) -> Vec<usize> {
        self.ids.iter().map(|s| s.len()).collect()
    }

    /// The rows `rows` as slices, with their labels.
    pub fn rows(&self, rows: &[usize]) -> Rows<'_> {
        let ids = rows.iter().map(|&r| self.ids[r].as_slice()).collect();
        let types = rows.iter().map(|&r| self.type_ids[r].as_slice()).collect();
        let labels = self
            .labels
            .as_ref()
            .map(|l| rows.iter().map(|&r| l[r]).collect());
        (ids, types, labels)
    }
}
